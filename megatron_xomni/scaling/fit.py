"""Scaling-law fits with bootstrap confidence intervals (Chinchilla approaches 2 and 3).

Symbols: N = parameters (the caller chooses the count, see `models/xomni/flops.py`), D = training
tokens, C = training FLOPs, L = validation loss in nats. `flops_per_token(N)` is the compute
relation C = flops_per_token(N) * D; the default is the standard C = 6 N D.

Approach 3 (Hoffmann et al. 2022, as replicated by Besiroglu et al. / Epoch AI 2024): fit
    L(N, D) = E + A / N^alpha + B / D^beta
in log space, log L = LSE(a - alpha log N, b - beta log D, e) with a = log A, b = log B,
e = log E, minimising the Huber loss (delta = 1e-3) of the log residuals with L-BFGS-B. The
objective is evaluated at every point of Hoffmann's grid of initialisations (vectorised, cheap);
L-BFGS-B then starts from the best `n_starts` of them and the best optimum wins. Running
L-BFGS-B from all 4,500 grid points would cost ~1000x more for the same optimum on these
smooth problems, and would make the bootstrap unaffordable.

Approach 2: for each compute budget, a parabola of L against log N over that budget's runs;
its vertex is N_opt(C). Power laws N_opt = G C^a and D_opt = H C^b are least-squares lines in
log-log space.

Intervals: nonparametric bootstrap, percentile intervals. Approach 3 resamples runs with
replacement; approach 2 resamples runs within each budget (the design of budgets is fixed),
redrawing a budget's resample when it has < 3 distinct sizes or no minimum.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from threadpoolctl import threadpool_limits

FlopsPerToken = Callable[[np.ndarray], np.ndarray]


def six_n(params):
    """The standard compute relation: 6 N FLOPs per training token (2 forward + 4 backward)."""
    return 6.0 * np.asarray(params, dtype=float)


@dataclass(frozen=True)
class Run:
    """One training run: its size, data, compute and final loss."""

    params: float
    tokens: float
    flops: float
    loss: float
    budget: Optional[float] = None
    """Planned compute budget; approach 2 groups runs by it (else by nearly equal `flops`)."""
    name: str = ""


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap percentile interval."""

    value: float
    low: float
    high: float

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def estimate(value: float, samples, confidence: float) -> Estimate:
    """Point estimate with the central `confidence` percentile interval of `samples`."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    q = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [q, 1.0 - q]) if samples.size else (math.nan, math.nan)
    return Estimate(float(value), float(low), float(high))


def _one_blas_thread(fn):
    """Run a fit with single-threaded BLAS. L-BFGS-B and polyfit make thousands of tiny BLAS
    calls; a multi-threaded OpenBLAS wakes its threads for each, which on a busy 2-core
    machine made a fit with 200 resamples 35x slower (17 s instead of 0.5 s)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


def _check_confidence(confidence: float, n_bootstrap: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.9 for 90 % intervals")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap={n_bootstrap} must be >= 1 (>= 200 for usable intervals)")


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _arrays(runs: Sequence[Run]):
    n = np.array([r.params for r in runs], dtype=float)
    d = np.array([r.tokens for r in runs], dtype=float)
    loss = np.array([r.loss for r in runs], dtype=float)
    c = np.array([r.flops for r in runs], dtype=float)
    cols = np.stack([n, d, loss, c])
    bad = (~np.isfinite(cols) | (cols <= 0)).any(axis=0)
    if bad.any():
        r = runs[int(np.argmax(bad))]
        raise ValueError(f"run {r.name or r} has a non-positive or non-finite params/tokens/loss/flops: "
                         "drop it from the table before fitting")
    return n, d, loss


# ---- approach 3 ---------------------------------------------------------------------------
# Hoffmann et al. (2022), appendix D.2: the grid of initialisations, in log space.
_GRID = np.array(list(itertools.product(
    np.arange(0.0, 30.0, 5.0),  # a = log A
    np.arange(0.0, 30.0, 5.0),  # b = log B
    np.arange(-1.0, 1.5, 0.5),  # e = log E
    np.arange(0.0, 2.5, 0.5),  # alpha
    np.arange(0.0, 2.5, 0.5),  # beta
)))
EXPONENT_BOUNDS = (0.0, 5.0)
"""L-BFGS-B's box for alpha and beta."""
_BOUNDS = [(None, None), (None, None), (None, None), EXPONENT_BOUNDS, EXPONENT_BOUNDS]


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _lse3(t):
    """log-sum-exp over axis 0 of three terms (scipy's general one costs ~10x more per call)."""
    m = t.max(axis=0)
    return m + np.log(np.exp(t - m).sum(axis=0))


def _objective(theta, x, y, logl, delta):
    """Mean Huber loss of log residuals (scaled by 1/delta) and its gradient."""
    a, b, e, alpha, beta = theta
    t = np.stack([a - alpha * x, b - beta * y, np.full_like(x, e)])
    lse = _lse3(t)
    r = lse - logl
    scale = 1.0 / (delta * x.size)
    g = np.clip(r, -delta, delta) * scale  # d(huber)/dr
    w = np.exp(t - lse) * g  # softmax weights times the residual derivative
    grad = np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[0] * x).sum(), -(w[1] * y).sum()])
    return float(_huber(r, delta).sum() * scale), grad


def _grid_objective(grid, x, y, logl, delta):
    """The objective at every grid point, vectorised: [len(grid)]."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    t = np.stack(np.broadcast_arrays(a - alpha * x, b - beta * y, e))
    r = _lse3(t) - logl
    return _huber(r, delta).mean(axis=1) / delta


def _fit_log_params(x, y, logl, delta, starts):
    best = None
    for theta0 in starts:
        res = minimize(_objective, theta0, args=(x, y, logl, delta), jac=True, method="L-BFGS-B",
                       bounds=_BOUNDS, options={"maxiter": 500, "ftol": 1e-12, "gtol": 1e-9})
        if best is None or res.fun < best.fun:
            best = res
    return best


def _best_grid_starts(x, y, logl, delta, k):
    values = _grid_objective(_GRID, x, y, logl, delta)
    return _GRID[np.argsort(values)[:k]]


def _to_linear(theta):
    """(a, b, e, alpha, beta) -> (E, A, B, alpha, beta)."""
    a, b, e, alpha, beta = np.moveaxis(np.asarray(theta), -1, 0)
    return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=-1)


APPROACH3_PARAMS = ("E", "A", "B", "alpha", "beta")


@dataclass(frozen=True)
class ComputeOptimum:
    """The loss-minimising allocation of one compute budget, with intervals."""

    flops: float
    params: Estimate
    tokens: Estimate
    tokens_per_param: Estimate
    loss: Estimate


@dataclass
class Approach3Fit:
    E: Estimate
    A: Estimate
    B: Estimate
    alpha: Estimate
    beta: Estimate
    confidence: float
    n_runs: int
    huber_delta: float
    objective: float
    samples: np.ndarray
    """Bootstrap parameter sets [n_bootstrap, 5], columns E, A, B, alpha, beta."""

    @property
    def point(self) -> np.ndarray:
        return np.array([getattr(self, k).value for k in APPROACH3_PARAMS])

    def loss(self, params, tokens, theta: Optional[np.ndarray] = None):
        """L(N, D) from the point estimate (or from one parameter set `theta`)."""
        E, A, B, alpha, beta = self.point if theta is None else theta
        return E + A / np.asarray(params, float) ** alpha + B / np.asarray(tokens, float) ** beta

    def _exponent(self, which: str) -> Estimate:
        def f(p):
            return p[..., 4 if which == "n" else 3] / (p[..., 3] + p[..., 4])

        return estimate(f(self.point), f(self.samples), self.confidence)

    @property
    def params_exponent(self) -> Estimate:
        """a in N_opt ∝ C^a, = beta / (alpha + beta) when C ∝ N D."""
        return self._exponent("n")

    @property
    def tokens_exponent(self) -> Estimate:
        """b in D_opt ∝ C^b, = alpha / (alpha + beta) when C ∝ N D."""
        return self._exponent("d")

    def _optimum_one(self, theta, flops, flops_per_token):
        def loss_at(u):
            n = math.exp(u)
            return float(self.loss(n, flops / float(flops_per_token(n)), theta))

        res = minimize_scalar(loss_at, bounds=(0.0, math.log(flops)), method="bounded",
                              options={"xatol": 1e-7})
        n = math.exp(res.x)
        return n, flops / float(flops_per_token(n)), res.fun

    def optimum(self, flops: float, flops_per_token: FlopsPerToken = six_n) -> ComputeOptimum:
        """argmin over N of L(N, C / flops_per_token(N)) at budget C, intervals from the bootstrap."""
        point = self._optimum_one(self.point, flops, flops_per_token)
        boot = np.array([self._optimum_one(t, flops, flops_per_token) for t in self.samples])
        n, d, loss = (estimate(point[i], boot[:, i], self.confidence) for i in range(3))
        ratio = estimate(point[1] / point[0], boot[:, 1] / boot[:, 0], self.confidence)
        return ComputeOptimum(flops, n, d, ratio, loss)


@_one_blas_thread
def fit_approach3(runs: Sequence[Run], *, huber_delta: float = 1e-3, n_starts: int = 16,
                  n_bootstrap: int = 200, bootstrap_starts: int = 0, confidence: float = 0.9,
                  seed=0) -> Approach3Fit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta with bootstrap percentile intervals.

    n_starts: L-BFGS-B starts (the best points of Hoffmann's grid) for the point estimate.
    Each bootstrap refit starts from the point estimate (a resample's optimum lies near it) and
    from the `bootstrap_starts` best grid points of its own resample (0: none; each costs a grid
    evaluation and one more L-BFGS-B run).
    """
    _check_confidence(confidence, n_bootstrap)
    if len(runs) < 6:
        raise ValueError(f"approach 3 fits 5 parameters and needs >= 6 runs, got {len(runs)}: "
                         "add runs (sizes x budgets) to the sweep")
    n, d, loss = _arrays(runs)
    x, y, logl = np.log(n), np.log(d), np.log(loss)
    if np.unique(n).size < 2 or np.unique(d).size < 2:
        raise ValueError("approach 3 needs runs with >= 2 distinct sizes and >= 2 distinct token "
                         "counts: vary both in the sweep")
    best = _fit_log_params(x, y, logl, huber_delta, _best_grid_starts(x, y, logl, huber_delta, n_starts))
    rng = _rng(seed)
    samples = np.empty((n_bootstrap, 5))
    for i in range(n_bootstrap):
        idx = rng.integers(0, n.size, n.size)
        bx, by, bl = x[idx], y[idx], logl[idx]
        starts = [best.x]
        if bootstrap_starts:
            starts += list(_best_grid_starts(bx, by, bl, huber_delta, bootstrap_starts))
        samples[i] = _fit_log_params(bx, by, bl, huber_delta, starts).x
    point, boot = _to_linear(best.x), _to_linear(samples)
    est = {k: estimate(point[i], boot[:, i], confidence) for i, k in enumerate(APPROACH3_PARAMS)}
    return Approach3Fit(**est, confidence=confidence, n_runs=len(runs), huber_delta=huber_delta,
                        objective=float(best.fun), samples=boot)


# ---- approach 2 ---------------------------------------------------------------------------
def group_budgets(runs: Sequence[Run], rtol: float = 0.1) -> list[tuple[float, list[Run]]]:
    """Runs grouped into compute budgets, ascending: by `budget` when every run has one, else
    runs whose FLOPs lie within `rtol` of the group's smallest (budget = their geometric mean)."""
    labelled = [r.budget is not None for r in runs]
    if any(labelled) and not all(labelled):
        raise ValueError("some runs have a budget and some do not: give every run its planned "
                         "budget, or none (then runs are grouped by their FLOPs)")
    if runs and all(labelled):
        keys = sorted({float(r.budget) for r in runs})
        return [(c, [r for r in runs if float(r.budget) == c]) for c in keys]
    groups: list[list[Run]] = []
    for r in sorted(runs, key=lambda r: r.flops):
        if groups and r.flops <= groups[-1][0].flops * (1.0 + rtol):
            groups[-1].append(r)
        else:
            groups.append([r])
    return [(float(np.exp(np.mean(np.log([r.flops for r in g])))), g) for g in groups]


@dataclass(frozen=True)
class IsoFlopBudget:
    """One budget's runs and the vertex of its parabola L = c2 u^2 + c1 u + c0, u = log N."""

    flops: float
    params: np.ndarray
    tokens: np.ndarray
    losses: np.ndarray
    coeffs: tuple[float, float, float]
    params_opt: float
    tokens_opt: float
    loss_opt: float

    @property
    def inside(self) -> bool:
        """True when N_opt lies within the sampled sizes (otherwise it is extrapolated)."""
        return bool(self.params.min() <= self.params_opt <= self.params.max())


def _vertex(flops, n, d, loss, flops_per_token):
    """(c2, c1, c0), N_opt, D_opt, L_opt, or None when the parabola has no minimum."""
    u = np.log(n)
    c2, c1, c0 = np.polyfit(u, loss, 2)
    if not c2 > 0:
        return None
    u_opt = -c1 / (2.0 * c2)
    if not abs(u_opt) < 700.0:  # a nearly flat resample: the vertex is nowhere (exp overflows)
        return None
    n_opt = math.exp(u_opt)
    if flops_per_token is not None:
        d_opt = flops / float(flops_per_token(n_opt))
    else:  # D at N_opt from the budget's own runs: log D is ~linear in log N along an iso-FLOP line
        s1, s0 = np.polyfit(u, np.log(d), 1)
        d_opt = math.exp(s0 + s1 * u_opt)
    return (c2, c1, c0), n_opt, d_opt, c0 - c1 * c1 / (4.0 * c2)


def _power_law(flops, values):
    """log-log least squares: returns (log G, a) of values = G C^a."""
    a, log_g = np.polyfit(np.log(flops), np.log(values), 1)
    return log_g, a


APPROACH2_PARAMS = ("log_G", "a", "log_H", "b")


@dataclass
class Approach2Fit:
    budgets: list[IsoFlopBudget]
    a: Estimate
    """Exponent of N_opt = G C^a."""
    G: Estimate
    b: Estimate
    """Exponent of D_opt = H C^b."""
    H: Estimate
    confidence: float
    samples: np.ndarray
    """Bootstrap power laws [n_bootstrap, 4], columns log G, a, log H, b."""
    redraws: int
    """Budget resamples redrawn for < 3 distinct sizes or no minimum."""
    dropped: list = dataclasses.field(default_factory=list)
    """Budgets left out because their loss has no minimum in log N (`drop_flat=True`)."""

    def _at(self, flops, log_col, exp_col):
        f = lambda p: np.exp(p[..., log_col] + p[..., exp_col] * math.log(flops))  # noqa: E731
        point = np.array([math.log(self.G.value), self.a.value, math.log(self.H.value), self.b.value])
        return f(point), f(self.samples)

    def params_opt(self, flops: float) -> Estimate:
        return estimate(*self._at(flops, 0, 1), self.confidence)

    def tokens_opt(self, flops: float) -> Estimate:
        return estimate(*self._at(flops, 2, 3), self.confidence)

    def tokens_per_param(self, flops: float) -> Estimate:
        (n, ns), (d, ds) = self._at(flops, 0, 1), self._at(flops, 2, 3)
        return estimate(d / n, ds / ns, self.confidence)


@_one_blas_thread
def fit_approach2(runs: Sequence[Run], *, flops_per_token: Optional[FlopsPerToken] = None,
                  n_bootstrap: int = 200, confidence: float = 0.9, seed=0,
                  budget_rtol: float = 0.1, drop_flat: bool = False) -> Approach2Fit:
    """Iso-FLOP parabolas per budget, then N_opt(C) and D_opt(C) power laws with intervals.

    flops_per_token: D_opt = C / flops_per_token(N_opt); None takes D_opt from the runs (log D
    regressed on log N within each budget). drop_flat: leave out (and list in `dropped`) a budget
    whose parabola has no minimum instead of refusing the fit; >= 2 budgets must remain.
    """
    _check_confidence(confidence, n_bootstrap)
    _arrays(runs)
    groups = group_budgets(runs, budget_rtol)
    if len(groups) < 2:
        raise ValueError(f"approach 2 needs >= 2 compute budgets to fit N_opt(C), got {len(groups)}: "
                         "add a budget to the sweep")
    data = []
    for c, g in groups:
        n, d, loss = _arrays(g)
        sizes = np.unique(n)
        if sizes.size < 3:
            raise ValueError(f"approach 2 needs >= 3 model sizes per compute budget, but budget "
                             f"{c:.3g} FLOPs has {sizes.size}: add sizes to that budget or drop it")
        data.append((c, n, d, loss))
    budgets, dropped, kept = [], [], []
    for c, n, d, loss in data:
        v = _vertex(c, n, d, loss, flops_per_token)
        if v is None:
            if drop_flat:
                dropped.append(c)
                continue
            raise ValueError(f"budget {c:.3g} FLOPs: loss vs log N has no minimum (the parabola opens "
                             "downward): widen the size range around the optimum")
        budgets.append(IsoFlopBudget(c, n, d, loss, tuple(map(float, v[0])), *map(float, v[1:])))
        kept.append((c, n, d, loss))
    if len(budgets) < 2:
        raise ValueError(f"approach 2 needs >= 2 budgets whose loss has a minimum in log N; "
                         f"{len(dropped)} of {len(data)} have none ({', '.join(f'{c:.3g}' for c in dropped)} FLOPs): "
                         "widen the size range around the optimum")
    data = kept
    cs = np.array([b.flops for b in budgets])
    point = np.array([*_power_law(cs, [b.params_opt for b in budgets]),
                      *_power_law(cs, [b.tokens_opt for b in budgets])])
    rng = _rng(seed)
    samples = np.empty((n_bootstrap, 4))
    redraws = 0
    for i in range(n_bootstrap):
        n_opt, d_opt = [], []
        for c, n, d, loss in data:
            for _ in range(1000):
                idx = rng.integers(0, n.size, n.size)
                v = _vertex(c, n[idx], d[idx], loss[idx], flops_per_token) if np.unique(n[idx]).size >= 3 else None
                if v is not None:
                    break
                redraws += 1
            else:
                raise ValueError(f"budget {c:.3g} FLOPs: no bootstrap resample has a minimum: the "
                                 "loss curve is too flat or noisy for approach 2; add sizes or steps")
            n_opt.append(v[1])
            d_opt.append(v[2])
        samples[i] = [*_power_law(cs, n_opt), *_power_law(cs, d_opt)]
    e = {k: estimate(point[i], samples[:, i], confidence) for i, k in enumerate(APPROACH2_PARAMS)}
    expo = lambda x: Estimate(_exp(x.value), _exp(x.low), _exp(x.high))  # noqa: E731
    return Approach2Fit(budgets, e["a"], expo(e["log_G"]), e["b"], expo(e["log_H"]), confidence,
                        samples, redraws, dropped)


def _exp(x: float) -> float:
    """exp that saturates to inf: over a narrow span of budgets a bootstrap resample's power-law
    prefactor can be astronomically large; the interval then says "unbounded" instead of failing."""
    return math.exp(x) if x < 709.0 else math.inf


# ---- a table of runs with several losses -----------------------------------------------------
TABLE_LOSSES = ("text_loss", "image_loss")


@dataclass
class LossFit:
    """Both approaches fitted to one loss column of a run table."""

    column: str
    runs: list[Run]
    approach3: Approach3Fit
    approach2: Optional[Approach2Fit]
    skipped: int
    """Rows without a finite value in this column (e.g. text-only runs for image_loss)."""
    approach2_note: str = ""
    """Why approach 2 is missing (not an iso-FLOP design, or no usable budgets)."""


def _number(row, key):
    v = row.get(key)
    try:
        return float(v) if v not in (None, "") else math.nan
    except (TypeError, ValueError):
        return math.nan


def runs_from_table(rows, loss_column: str) -> tuple[list[Run], int]:
    """Runs from table rows (dicts, e.g. csv.DictReader) with columns params, tokens, flops,
    `loss_column`, optionally budget and name. Returns (runs, rows skipped for a missing loss)."""
    runs, skipped = [], 0
    for i, row in enumerate(rows):
        missing = [k for k in ("params", "tokens", "flops") if not np.isfinite(_number(row, k))]
        if missing:
            raise ValueError(f"row {i} ({row.get('name', '')}) has no {missing[0]}: every run needs "
                             "params, tokens and flops")
        loss = _number(row, loss_column)
        if not np.isfinite(loss):
            skipped += 1
            continue
        budget = _number(row, "budget")
        runs.append(Run(_number(row, "params"), _number(row, "tokens"), _number(row, "flops"), loss,
                        budget if np.isfinite(budget) else None, str(row.get("name", ""))))
    return runs, skipped


def fit_table(rows, columns: Sequence[str] = TABLE_LOSSES, *, n_bootstrap: int = 200,
              confidence: float = 0.9, seed=0, flops_per_token: Optional[FlopsPerToken] = None,
              approach2: Optional[bool] = None, **approach3_kwargs) -> dict[str, LossFit]:
    """Fit approaches 3 and 2 separately to each loss column (text and image loss by default).

    flops_per_token goes to approach 2 (D_opt = C / flops_per_token(N_opt)); None takes D from
    the runs. approach2: True fits it (errors raise), None fits it when every run has a budget (an
    iso-FLOP design), dropping budgets without a minimum and noting why it is missing otherwise;
    False skips it."""
    rows = list(rows)
    out = {}
    for col in columns:
        runs, skipped = runs_from_table(rows, col)
        a2, note = None, ""
        try:
            a3 = fit_approach3(runs, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed,
                               **approach3_kwargs)
            if approach2 is None and not all(r.budget is not None for r in runs):
                note = "not an iso-FLOP design (runs without a compute budget)"
            elif approach2 is not False:
                try:
                    a2 = fit_approach2(runs, flops_per_token=flops_per_token, n_bootstrap=n_bootstrap,
                                       confidence=confidence, seed=seed, drop_flat=approach2 is None)
                except ValueError as e:
                    if approach2:
                        raise
                    note = str(e)
            else:
                note = "not requested"
        except ValueError as e:
            raise ValueError(f"{col}: {e}") from None
        out[col] = LossFit(col, runs, a3, a2, skipped, note)
    return out


def compute_relation(runs: Sequence[Run]) -> FlopsPerToken:
    """FLOPs per token as a function of N from the runs themselves (C / D per size), interpolated
    piecewise linearly in log-log space and extended along the end segments (one size: C/D ∝ N)."""
    pts = {}
    for r in runs:
        pts.setdefault(r.params, []).append(r.flops / r.tokens)
    if not pts:
        raise ValueError("no runs to take the compute relation from")
    x = np.log(np.array(sorted(pts)))
    y = np.log(np.array([np.mean(pts[k]) for k in sorted(pts)]))

    def fpt(params):
        u = np.log(np.asarray(params, dtype=float))
        if x.size == 1:
            return np.exp(y[0] + (u - x[0]))
        lo = y[0] + (u - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
        hi = y[-1] + (u - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
        return np.exp(np.where(u < x[0], lo, np.where(u > x[-1], hi, np.interp(u, x, y))))

    return fpt
