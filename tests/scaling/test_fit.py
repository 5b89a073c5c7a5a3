"""The scaling-law fits recover planted laws, and their intervals cover the truth.

Synthetic sweeps: L(N, D) = E + A/N^alpha + B/D^beta with Chinchilla's fitted values (Hoffmann
et al. 2022), 1 % multiplicative noise, on an iso-FLOP grid (5 budgets x 7 sizes, C = 6 N D).
Each budget's sizes span a decade either side of a point near (0.8x) the true optimum, the way
a sweep is laid out around a guess; the closed forms below are written here, independently of
the fitting code.
"""

import math

import numpy as np
import pytest

from megatron_xomni.scaling.fit import (
    Approach3Fit,
    Estimate,
    Run,
    fit_approach2,
    fit_approach3,
    fit_table,
    six_n,
)
from megatron_xomni.scaling.report import write_report

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
N_EXP = BETA / (ALPHA + BETA)  # N_opt ∝ C^(beta/(alpha+beta)) under C = 6ND
BUDGETS = np.logspace(18, 22, 5)
REPEATS, N_BOOT = 20, 200


def _law(n, d, law=(E, A, B, ALPHA, BETA)):
    e, a, b, alpha, beta = law
    return e + a / n**alpha + b / d**beta


def _n_opt(c, law=(E, A, B, ALPHA, BETA)):
    """Closed form: minimise L(N, C/6N) over N."""
    _, a, b, alpha, beta = law
    g = (alpha * a / (beta * b)) ** (1.0 / (alpha + beta))
    return g * (c / 6.0) ** (beta / (alpha + beta))


def _sweep(seed, law=(E, A, B, ALPHA, BETA), sizes=7, noise=0.01):
    rng = np.random.default_rng(seed)
    runs = []
    for c in BUDGETS:
        for n in 0.8 * _n_opt(c) * np.logspace(-1.0, 1.0, sizes):
            d = c / (6.0 * n)
            loss = _law(n, d, law) * math.exp(noise * rng.standard_normal())
            runs.append(Run(params=n, tokens=d, flops=c, loss=loss, budget=c))
    return runs


@pytest.fixture(scope="module")
def repeats():
    out = []
    for seed in range(REPEATS):
        runs = _sweep(seed)
        out.append((fit_approach3(runs, n_bootstrap=N_BOOT, seed=seed),
                    fit_approach2(runs, n_bootstrap=N_BOOT, seed=seed)))
    return out


def test_approach3_recovers_alpha_and_beta(repeats):
    for f3, _ in repeats:
        assert abs(f3.alpha.value - ALPHA) <= 0.05, f3.alpha
        assert abs(f3.beta.value - BETA) <= 0.05, f3.beta
        assert abs(f3.params_exponent.value - N_EXP) <= 0.05


def test_approach2_recovers_n_opt_exponent(repeats):
    for _, f2 in repeats:
        assert abs(f2.a.value - N_EXP) <= 0.05, f2.a
        # D_opt = C / 6 N_opt, so the exponents of N_opt and D_opt add up to 1
        assert f2.a.value + f2.b.value == pytest.approx(1.0, abs=1e-9)


def test_bootstrap_intervals_cover_the_truth(repeats):
    for f3, f2 in repeats:
        assert f3.samples.shape == (N_BOOT, 5) and f2.samples.shape == (N_BOOT, 4)
        assert f3.confidence == 0.9
        for est in (f3.alpha, f3.beta, f2.a):
            assert est.low < est.value < est.high  # non-degenerate intervals around the estimate
    cover = {
        "alpha": sum(f3.alpha.covers(ALPHA) for f3, _ in repeats),
        "beta": sum(f3.beta.covers(BETA) for f3, _ in repeats),
        "approach-2 exponent": sum(f2.a.covers(N_EXP) for _, f2 in repeats),
    }
    assert all(k >= 16 for k in cover.values()), cover


def _exact_fit(law):
    """An Approach3Fit holding the true parameters (point and 'bootstrap' samples)."""
    ests = {k: Estimate(v, v, v) for k, v in zip(("E", "A", "B", "alpha", "beta"), law)}
    return Approach3Fit(**ests, confidence=0.9, n_runs=0, huber_delta=1e-3, objective=0.0,
                        samples=np.array([law] * 3))


def test_compute_optimum_matches_closed_form_and_brute_force():
    law = (E, A, B, ALPHA, BETA)
    fit = _exact_fit(law)
    for c in (1e19, 1e23):
        opt = fit.optimum(c)
        n = _n_opt(c)
        assert opt.params.value == pytest.approx(n, rel=1e-5)
        assert opt.tokens.value == pytest.approx(c / (6 * n), rel=1e-5)
        assert opt.tokens_per_param.value == pytest.approx(c / (6 * n * n), rel=1e-5)
        assert opt.loss.value == pytest.approx(_law(n, c / (6 * n)), rel=1e-9)
    # Another compute relation (a fixed per-token cost on top of 6N, like attention): brute force.
    c = 1e20
    fpt = lambda n: 6.0 * n + 2e9  # noqa: E731
    opt = fit.optimum(c, fpt)
    grid = np.logspace(6, 12, 600_001)
    n_best = grid[np.argmin(_law(grid, c / fpt(grid)))]
    assert opt.params.value == pytest.approx(n_best, rel=1e-4)
    assert opt.tokens.value == pytest.approx(c / fpt(opt.params.value), rel=1e-9)


def test_approach2_tokens_from_runs_agree_with_the_compute_relation():
    runs = _sweep(3)
    from_runs = fit_approach2(runs, n_bootstrap=20)
    from_relation = fit_approach2(runs, n_bootstrap=20, flops_per_token=six_n)
    for b in from_runs.budgets:  # the synthetic runs satisfy C = 6 N D exactly
        assert b.tokens_opt == pytest.approx(b.flops / (6 * b.params_opt), rel=1e-9)
    assert from_runs.b.value == pytest.approx(from_relation.b.value, abs=1e-9)


def test_approach2_refuses_too_few_sizes_per_budget():
    runs = _sweep(0)
    sizes = sorted({r.params for r in runs if r.budget == BUDGETS[2]})
    runs = [r for r in runs if r.budget != BUDGETS[2] or r.params in sizes[:2]]
    with pytest.raises(ValueError) as e:
        fit_approach2(runs)
    msg = str(e.value)
    assert "\n" not in msg
    assert "budget 1e+20 FLOPs has 2" in msg and ">= 3 model sizes" in msg and "add sizes" in msg
    with pytest.raises(ValueError, match="needs >= 2 compute budgets"):
        fit_approach2([r for r in _sweep(0) if r.budget == BUDGETS[0]])


def test_fit_table_fits_text_and_image_loss_separately(tmp_path):
    image_law = (2.4, 900.0, 250.0, 0.45, 0.24)
    text, image = _sweep(5), _sweep(6, law=image_law)
    rows = [{"name": f"r{i}", "params": str(t.params), "tokens": str(t.tokens), "flops": str(t.flops),
             "budget": str(t.budget), "text_loss": str(t.loss), "image_loss": str(m.loss)}
            for i, (t, m) in enumerate(zip(text, image))]
    rows[0]["image_loss"] = ""  # e.g. a run whose validation had no image tokens
    fits = fit_table(rows, n_bootstrap=30)
    assert fits["text_loss"].skipped == 0 and fits["image_loss"].skipped == 1
    assert len(fits["image_loss"].runs) == len(rows) - 1
    assert abs(fits["text_loss"].approach3.alpha.value - ALPHA) <= 0.05
    assert abs(fits["image_loss"].approach3.alpha.value - image_law[3]) <= 0.05
    assert abs(fits["image_loss"].approach3.beta.value - image_law[4]) <= 0.05

    paths = write_report(fits, tmp_path, budget=1e21)
    names = sorted(p.name for p in paths)
    assert names == sorted(["summary.md"] + [f"{c}_{k}.png" for c in ("text_loss", "image_loss")
                                             for k in ("vs_flops", "isoflops", "frontier")])
    for p in paths[1:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    summary = (tmp_path / "summary.md").read_text()
    for col, fit in fits.items():
        assert f"## {col}" in summary
        assert f"| alpha | {fit.approach3.alpha.value:.4g} ({fit.approach3.alpha.low:.4g} – " in summary
        assert f"a = {fit.approach2.a.value:.3f} ({fit.approach2.a.low:.3f}" in summary
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_bad_runs_are_refused_in_one_line():
    runs = _sweep(0)
    runs[4] = Run(params=runs[4].params, tokens=runs[4].tokens, flops=runs[4].flops, loss=float("nan"),
                  budget=runs[4].budget, name="broken")
    for fit in (fit_approach3, fit_approach2):
        with pytest.raises(ValueError, match=r"^run broken has a non-positive or non-finite .* drop it"):
            fit(runs, n_bootstrap=2)
    with pytest.raises(ValueError, match="needs >= 6 runs"):
        fit_approach3(_sweep(0)[:5])
    with pytest.raises(ValueError, match=r"confidence=1.5 must be in \(0, 1\)"):
        fit_approach3(_sweep(0), confidence=1.5)
