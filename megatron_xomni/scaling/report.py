"""The fit's outputs: a Markdown summary and matplotlib plots (Agg, no pyplot global state).

Per loss column: loss vs FLOPs per model size with approach 3's curves, the iso-FLOP curves with
approach 2's parabolas, and the compute-optimal frontier N_opt(C) from both approaches with its
bootstrap interval band.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from megatron_xomni.scaling.fit import EXPONENT_BOUNDS, Estimate, FlopsPerToken, LossFit, six_n


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename into place: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _e(x: Estimate, fmt: str = ".4g") -> str:
    return f"{x.value:{fmt}} ({x.low:{fmt}} – {x.high:{fmt}})"


def _bound_notes(a3) -> list[str]:
    """A line for each exponent whose estimate sits on the edge of the search box: there the runs
    do not determine it (e.g. alpha = 5 when the loss barely depends on N over the sampled sizes)."""
    out = []
    for name, term in (("alpha", "N"), ("beta", "D")):
        v = getattr(a3, name).value
        lo, hi = EXPONENT_BOUNDS
        if v <= lo + 1e-6 or v >= hi - 1e-6:
            out += [f"{name} = {v:g} is at the edge of the search range [{lo:g}, {hi:g}]: these runs do not "
                    f"determine it (the loss barely changes with {term} beyond what the other term explains); "
                    "its interval and the exponents built from it are not informative.", ""]
    return out


def summary_markdown(fits: Mapping[str, LossFit], budget: float,
                     flops_per_token: FlopsPerToken = six_n, title: str = "Scaling-law fit",
                     notes: Sequence[str] = ()) -> str:
    """Exponents with intervals, compute-optimal tokens per parameter and the predicted loss at
    `budget` FLOPs, for every fitted loss column. `notes`: lines under the title (what N, D, C and
    L are)."""
    lines = [f"# {title}", "", *notes, *([""] if notes else [])]
    for col, fit in fits.items():
        a3, a2 = fit.approach3, fit.approach2
        pct = f"{100 * a3.confidence:g} %"
        lines += [
            f"## {col}", "",
            f"{len(fit.runs)} runs ({fit.skipped} rows without {col} skipped); {pct} bootstrap "
            f"percentile intervals from {len(a3.samples)} resamples.", "",
            "### Approach 3: L(N, D) = E + A / N^alpha + B / D^beta", "",
            f"Huber loss (delta = {a3.huber_delta:g}) on log-loss, L-BFGS-B from a grid of starts.", "",
            "| parameter | estimate (interval) |", "|---|---|",
            *(f"| {k} | {_e(getattr(a3, k))} |" for k in ("E", "A", "B", "alpha", "beta")),
            f"| a = beta/(alpha+beta), N_opt ∝ C^a | {_e(a3.params_exponent, '.3f')} |",
            f"| b = alpha/(alpha+beta), D_opt ∝ C^b | {_e(a3.tokens_exponent, '.3f')} |", "",
            *_bound_notes(a3),
            "### Approach 2: a parabola in log N per compute budget", "",
        ]
        if a2 is None:
            lines += [f"Not fitted: {fit.approach2_note}.", ""]
        else:
            lines += ["| budget C (FLOPs) | runs | sizes | N_opt | D_opt | L_opt | vertex inside sizes |",
                      "|---|---|---|---|---|---|---|"]
            for b in a2.budgets:
                lines.append(f"| {b.flops:.3g} | {b.params.size} | {np.unique(b.params).size} | "
                             f"{b.params_opt:.4g} | {b.tokens_opt:.4g} | {b.loss_opt:.4f} | "
                             f"{'yes' if b.inside else 'no (extrapolated)'} |")
            for c in a2.dropped:
                lines.append(f"| {c:.3g} | — | — | — | — | — | left out: no minimum in log N |")
            lines += [
                "",
                f"N_opt = G C^a: a = {_e(a2.a, '.3f')}, G = {_e(a2.G)}  ",
                f"D_opt = H C^b: b = {_e(a2.b, '.3f')}, H = {_e(a2.H)}", "",
            ]
            if np.ptp(a2.samples[:, 1]) == 0.0:
                lines += ["Approach 2's intervals have zero width: every budget has exactly 3 sizes, and a "
                          "resample must keep all 3 to fit its parabola, so every resample is the same fit. "
                          "Sweeps with >= 4 sizes per budget get intervals.", ""]
        opt = a3.optimum(budget, flops_per_token)
        two = (lambda f, fmt=".4g": _e(f(budget), fmt)) if a2 is not None else (lambda f, fmt=None: "—")
        lines += [
            f"### At C = {budget:.3g} FLOPs", "",
            "| quantity | approach 3 | approach 2 |", "|---|---|---|",
            f"| N_opt (parameters) | {_e(opt.params)} | {two(a2 and a2.params_opt)} |",
            f"| D_opt (tokens) | {_e(opt.tokens)} | {two(a2 and a2.tokens_opt)} |",
            f"| tokens per parameter | {_e(opt.tokens_per_param, '.3g')} | "
            f"{two(a2 and a2.tokens_per_param, '.3g')} |",
            f"| predicted loss | {_e(opt.loss, '.4f')} | — |", "",
        ]
    return "\n".join(lines)


def write_summary(path, fits: Mapping[str, LossFit], budget: float,
                  flops_per_token: FlopsPerToken = six_n, title: str = "Scaling-law fit",
                  notes: Sequence[str] = ()) -> Path:
    path = Path(path)
    text = summary_markdown(fits, budget, flops_per_token, title, notes)
    atomic_write(path, lambda p: p.write_text(text))
    return path


# ---- plots ------------------------------------------------------------------------------------
def _figure():
    from matplotlib.figure import Figure  # heavy: imported only when plotting

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    return path


def _colors(k: int):
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0.0, 0.9, max(k, 1)))


def plot_loss_vs_flops(fit: LossFit, path, flops_per_token: FlopsPerToken = six_n) -> Path:
    """Loss vs training FLOPs, one series per model size, with approach 3's L(N, C/fpt(N)) drawn
    around the FLOPs each size was run at."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm

    fig, ax = _figure()
    runs = fit.runs
    sizes = sorted({r.params for r in runs})
    norm, cmap = LogNorm(min(sizes), max(sizes)), colormaps["viridis"]
    for n in sizes:
        pts = sorted((r.flops, r.loss) for r in runs if r.params == n)
        c, loss = map(np.array, zip(*pts))
        color = cmap(norm(n))
        grid = np.logspace(math.log10(c.min()) - 0.3, math.log10(c.max()) + 0.3, 50)
        ax.plot(grid, fit.approach3.loss(n, grid / float(flops_per_token(n))), color=color, lw=1, alpha=0.7)
        ax.scatter(c, loss, color=color, s=18, label=f"N = {n:.3g}", zorder=3)
    losses = np.array([r.loss for r in runs])
    ax.set_ylim(losses.min() - 0.05 * np.ptp(losses), losses.max() + 0.1 * np.ptp(losses))
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel=fit.column,
           title=f"{fit.column}: runs and the approach-3 fit")
    if len(sizes) <= 8:
        ax.legend(fontsize=7)
    else:  # an iso-FLOP design has a size per run: a colour scale reads better than a legend
        fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label="parameters N")
    return _save(fig, Path(path))


def plot_isoflops(fit: LossFit, path) -> Path:
    """Loss vs N per budget with approach 2's parabolas and their vertices."""
    fig, ax = _figure()
    budgets = fit.approach2.budgets
    for color, b in zip(_colors(len(budgets)), budgets):
        ax.scatter(b.params, b.losses, color=color, s=18, label=f"C = {b.flops:.2g}")
        u = np.log(b.params)
        uu = np.linspace(u.min() - 0.2, u.max() + 0.2, 100)
        ax.plot(np.exp(uu), np.polyval(b.coeffs, uu), color=color, lw=1)
        ax.scatter([b.params_opt], [b.loss_opt], color=color, marker="*", s=90, edgecolor="k", lw=0.5)
    ax.set(xscale="log", xlabel="parameters N", ylabel=fit.column,
           title=f"{fit.column}: iso-FLOP curves (approach 2)")
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_frontier(fit: LossFit, path, flops_per_token: FlopsPerToken = six_n, points: int = 12) -> Path:
    """N_opt(C): approach 2's vertices, its power law and band; approach 3's frontier and band."""
    fig, ax = _figure()
    a2, a3 = fit.approach2, fit.approach3
    cs = np.array([b.flops for b in a2.budgets] if a2 is not None else [r.flops for r in fit.runs])
    grid = np.logspace(math.log10(cs.min()) - 0.5, math.log10(cs.max()) + 0.5, points)
    if a2 is not None:
        q = (1.0 - a2.confidence) / 2.0
        boot = np.exp(a2.samples[:, :1] + a2.samples[:, 1:2] * np.log(grid))  # [n_bootstrap, points]
        ax.fill_between(grid, *np.quantile(boot, [q, 1 - q], axis=0), color="C0", alpha=0.2,
                        label=f"approach 2, {100 * a2.confidence:g} % band")
        ax.plot(grid, [a2.params_opt(c).value for c in grid], color="C0", label=f"approach 2: a = {a2.a.value:.3f}")
        ax.scatter(cs, [b.params_opt for b in a2.budgets], color="C0", zorder=3, label="iso-FLOP vertices")
    opt = [a3.optimum(c, flops_per_token).params for c in grid]
    ax.fill_between(grid, [o.low for o in opt], [o.high for o in opt], color="C1", alpha=0.2,
                    label=f"approach 3, {100 * a3.confidence:g} % band")
    ax.plot(grid, [o.value for o in opt], color="C1", label=f"approach 3: a = {a3.params_exponent.value:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="compute-optimal N",
           title=f"{fit.column}: compute-optimal model size")
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def write_report(fits: Mapping[str, LossFit], out_dir, budget: float,
                 flops_per_token: FlopsPerToken = six_n, title: str = "Scaling-law fit",
                 notes: Sequence[str] = ()) -> list[Path]:
    """summary.md and three plots per loss column (two without approach 2: no iso-FLOP curves)
    into out_dir; returns the paths written."""
    out = Path(out_dir)
    paths = [write_summary(out / "summary.md", fits, budget, flops_per_token, title, notes)]
    for col, fit in fits.items():
        paths.append(plot_loss_vs_flops(fit, out / f"{col}_vs_flops.png", flops_per_token))
        if fit.approach2 is not None:
            paths.append(plot_isoflops(fit, out / f"{col}_isoflops.png"))
        paths.append(plot_frontier(fit, out / f"{col}_frontier.png", flops_per_token))
    return paths
