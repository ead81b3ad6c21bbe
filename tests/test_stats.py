"""growkern.studies.stats: coverage of the bootstrap CIs on synthetic draws, Spearman
against scipy (or hand-computed cases), verdict logic, determinism."""
import math

import numpy as np
import pytest

from growkern.studies import stats
from growkern.studies.metrics import spearman as metrics_spearman

try:
    import scipy.stats as sps
except ImportError:  # pragma: no cover
    sps = None


def _coverage(method, n, reps=400, n_boot=2000, truth=0.0, draw=None):
    rng = np.random.default_rng(123)
    hits = 0
    for r in range(reps):
        x = draw(rng, n) if draw else rng.normal(truth, 1.0, size=n)
        _, lo, hi = stats.bootstrap_ci(x, n_boot=n_boot, seed=r, method=method)
        hits += lo <= truth <= hi
    return hits / reps


def test_bootstrap_ci_coverage_n8():
    """400 draws of n = 8 standard normals, nominal 95%. The binomial SE at 400 draws is
    ~0.011. The expanded percentile interval (the default) covers ~0.945 here: band
    [0.91, 0.98]. The plain percentile interval undercovers at n = 8 (the bootstrap
    variance of a mean is s^2 (n-1)/n^2 with normal tails: ~0.90 expected): band
    [0.85, 0.95], and it is below the expanded one on the same draws."""
    expanded = _coverage("expanded", 8)
    percentile = _coverage("percentile", 8)
    assert 0.91 <= expanded <= 0.98, expanded
    assert 0.85 <= percentile <= 0.95, percentile
    assert percentile < expanded


def test_small_n_coverage_ceiling_and_t_interval():
    """At n = 4 no bootstrap CI of a mean leaves [min, max], so it covers at most
    1 - 2^(1-4) = 0.875; the Student t interval reaches ~0.95 on normal data."""
    assert stats.coverage_ceiling(4) == 0.875
    assert _coverage("expanded", 4, reps=300, n_boot=1000) <= 0.875 + 0.05
    assert 0.91 <= _coverage("t", 4, reps=300) <= 0.98


def test_bootstrap_ci_edge_cases_and_determinism():
    x = np.random.default_rng(0).normal(size=6)
    a = stats.bootstrap_ci(x, seed=7)
    assert a == stats.bootstrap_ci(x, seed=7)  # deterministic under a seed
    assert a != stats.bootstrap_ci(x, seed=8)
    est, lo, hi = a
    assert est == pytest.approx(x.mean()) and lo < est < hi
    assert x.min() <= lo and hi <= x.max()
    e1, lo1, hi1 = stats.bootstrap_ci([2.5])
    assert e1 == 2.5 and math.isnan(lo1) and math.isnan(hi1)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([]))
    assert stats.bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0, 3.0)
    # n = 2: the expanded interval is the data's range
    assert stats.bootstrap_ci([1.0, 2.0]) == (1.5, 1.0, 2.0)
    # a statistic without axis=, and the median
    med = stats.bootstrap_ci(x, stat=lambda v: float(np.median(v)), n_boot=500)
    assert med == stats.bootstrap_ci(x, stat=np.median, n_boot=500)
    with pytest.raises(ValueError, match="NaN"):
        stats.bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="method"):
        stats.bootstrap_ci(x, method="bca")
    with pytest.raises(ValueError, match="np.mean"):
        stats.bootstrap_ci(x, stat=np.median, method="t")


def test_stratified_and_paired():
    rng = np.random.default_rng(1)
    # two strata with very different levels: stratified resampling keeps 4 of each,
    # so the CI of the mean is narrower than resampling the 8 units freely
    x = np.r_[rng.normal(0, 0.1, 4), rng.normal(10, 0.1, 4)]
    strata = [0] * 4 + [1] * 4
    _, lo_s, hi_s = stats.bootstrap_ci(x, strata=strata)
    _, lo, hi = stats.bootstrap_ci(x)
    assert hi_s - lo_s < 0.2 * (hi - lo)
    # one unit per stratum: no variance left
    assert math.isnan(stats.bootstrap_ci([1.0, 2.0], strata=["a", "b"])[1])
    # paired differences: a shared cell effect cancels
    cell = rng.normal(0, 5, size=8)
    a, b = cell + 1.0 + rng.normal(0, 0.05, 8), cell + rng.normal(0, 0.05, 8)
    est, lo, hi = stats.paired_diff_ci(a, b)
    assert est == pytest.approx(np.mean(a - b)) and 0.8 < lo < 1.0 < hi < 1.2
    assert stats.verdict(est, lo, hi, "> 0") == "agree"
    t_est, t_lo, t_hi = stats.paired_diff_ci(a, b, method="t", strata=strata)
    assert t_est == pytest.approx(est) and t_lo < 1.0 < t_hi
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_diff_ci([1.0, 2.0], [1.0])


def test_ratio_ci_covers_true_ratio():
    """Speedup-like pairs: den ~ N(4, 0.4), num = 2 den + noise, true ratio of means 2.
    Coverage over 200 draws of n = 8 pairs, nominal 95%: band [0.88, 0.99]."""
    rng = np.random.default_rng(5)
    hits = 0
    for r in range(200):
        den = rng.normal(4.0, 0.4, 8)
        num = 2 * den + rng.normal(0, 0.5, 8)
        est, lo, hi = stats.ratio_ci(num, den, n_boot=1000, seed=r)
        assert est == pytest.approx(num.mean() / den.mean())
        hits += lo <= 2.0 <= hi
    assert 0.88 <= hits / 200 <= 0.99, hits / 200
    with pytest.raises(ValueError, match="'t'"):
        stats.ratio_ci(num, den, method="t")


def test_spearman_matches_scipy_or_known_cases():
    known = [([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
             ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
             ([1, 1, 2], [5, 5, 9], 1.0),
             # ties: ranks x (1.5, 1.5, 3, 4), y (1, 2, 3.5, 3.5), centred on 2.5:
             # cov 1.5 + 0.5 + 0.5 + 1.5 = 4, both variances 4.5
             ([1, 1, 2, 3], [1, 2, 3, 3], 4 / 4.5),
             ([3, 1, 2], [1, 2, 3], -0.5)]
    for x, y, rho in known:
        assert stats.spearman(x, y) == pytest.approx(rho)
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(stats.spearman([1.0], [2.0]))
    assert stats.rankdata([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    rng = np.random.default_rng(2)
    for n in (5, 12, 40):
        x = rng.integers(0, 6, n).astype(float)  # many ties
        y = x + rng.integers(0, 4, n)
        ours = stats.spearman(x, y)
        assert ours == pytest.approx(metrics_spearman(list(x), list(y)), abs=1e-12)
        if sps is not None:
            assert ours == pytest.approx(sps.spearmanr(x, y)[0], abs=1e-12)
            assert np.allclose(stats.rankdata(x), sps.rankdata(x))
        # the vectorised ranks of the bootstrap equal the 1-d ranks
        idx = rng.integers(0, n, (7, n))
        assert np.array_equal(stats._rank_rows(x[idx]), np.array([stats.rankdata(r) for r in x[idx]]))


def test_t_quantiles():
    assert stats._t_ppf(0.975, 1) == pytest.approx(12.7062047, rel=1e-7)
    assert stats._t_ppf(0.975, 7) == pytest.approx(2.36462425, rel=1e-7)
    assert stats._t_ppf(0.025, 30) == pytest.approx(-2.04227246, rel=1e-7)
    if sps is not None:
        for df in (1, 2, 3, 6, 11):
            for p in (0.6, 0.9, 0.995):
                assert stats._t_ppf(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-8)


def test_spearman_ci_and_within():
    rng = np.random.default_rng(3)
    x = rng.normal(size=30)
    y = x + rng.normal(0, 0.3, 30)
    rho, lo, hi = stats.spearman_ci(x, y, n_boot=2000)
    assert lo < rho < hi and lo > 0.6 and hi <= 1
    assert stats.spearman_ci(x, y, n_boot=2000) == (rho, lo, hi)
    assert math.isnan(stats.spearman_ci([1, 2, 3], [1, 3, 2])[1])  # below 4 units: no CI
    # within cells the selector predicts perfectly; the cells' levels are anti-correlated
    # with the selector, so pooling all rows hides it
    rows = []
    for ck, level in ((100, 10.0), (200, 0.0)):
        for seed in (0, 1):
            for s in range(5):
                rows.append({"checkpoint": ck, "seed": seed, "sel": s + (0 if ck == 100 else 20) + 0.1 * seed,
                             "final_loss": level + s})
    rows.append({"checkpoint": 300, "seed": 0, "sel": 1.0, "final_loss": 2.0})  # a 1-row cell: skipped
    rows.append({"checkpoint": 100, "seed": 0, "sel": float("nan"), "final_loss": 2.0})  # nan: left out
    w = stats.spearman_within(rows, ("checkpoint", "seed"), "sel", "final_loss", n_boot=500)
    assert w.n_cells == 4 and w.n_skipped == 1 and w.n_rows == 21
    assert w.within == pytest.approx(1.0) and w.within_lo == pytest.approx(1.0)
    assert w.pooled < 0
    assert w.cells[(100, 0)] == pytest.approx(1.0) and math.isnan(w.cells[(300, 0)])


def test_verdict_logic_and_finding():
    v = stats.verdict
    assert v(0.5, 0.1, 0.9, "> 0") == "agree"
    assert v(-0.5, -0.9, -0.1, "> 0") == "disagree"
    assert v(0.1, -0.2, 0.4, "> 0") == "inconclusive"
    assert v(0.0, 0.0, 0.4, "> 0") == "inconclusive"  # the boundary is in the CI
    assert v(-0.5, -0.9, -0.1, "< 0") == "agree"
    assert v(0.5, 0.1, 0.9, "<0") == "disagree"
    assert v(1.6, 1.2, 2.0, "> 1") == "agree"
    assert v(0.9, 0.8, 0.95, "> 1") == "disagree"
    assert v(1.1, 0.9, 1.3, (">", 1)) == "inconclusive"
    assert v(1.0, float("nan"), float("nan"), "> 0") == "inconclusive"
    for bad in ("= 0", ">= x", 0, ("!", 1)):
        with pytest.raises(ValueError):
            v(0.5, 0.1, 0.9, bad)
    f = stats.Finding("final loss, exact_copy - structured (deterministic)",
                      "the structured start wins deterministic continuation", 0.0123, 0.004, 0.02, 4)
    assert f.verdict == "agree"
    line = f.markdown()
    assert "\n" not in line and line.startswith("- **agree**")
    assert "0.0123" in line and "[0.0040, 0.0200]" in line and "n = 4" in line and "> 0" in line
    g = stats.Finding("speedup at g = 2", "pays off", 0.8, 0.7, 0.9, 3, test="> 1")
    assert g.verdict == "disagree"
    assert "no CI" in stats.Finding("x", "y", 1.0, float("nan"), float("nan"), 1).markdown()
    assert "(n = 2; 4 of 4 cells < 0; paper: y" in stats.Finding("x", "y", -1.0, -2.0, -0.5, 2, "< 0",
                                                                detail="4 of 4 cells < 0").markdown()
