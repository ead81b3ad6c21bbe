"""Small-sample statistics for the studies' reports (defined in docs/studies.md,
"Statistics"): bootstrap confidence intervals (plain, paired, stratified, ratio of
means), Spearman rank correlation with ties and its bootstrap CI, Spearman within cells,
and a verdict on a paper's claim from a CI.

numpy (and the standard library) only; every function is deterministic given `seed`.

Which bootstrap interval. The studies have n = 2..8 units per comparison (checkpoints x
seeds). The plain percentile interval is too narrow there: the bootstrap distribution
of a mean has the plug-in variance s^2 (n-1)/n^2 and normal rather than Student-t tails,
so a nominal 95% interval covers the mean of normal data about 89% of the time at n = 8,
80% at n = 4 and 50% at n = 2. BCa corrects bias and skew, not this narrowness (its
jackknife acceleration is itself noisy at n <= 8 and undefined at n = 2), so it
undercovers about as much. The default here is therefore the *expanded percentile*
interval (Hesterberg 2015, "What Teachers Should Know About the Bootstrap", Am. Stat.
69:371): percentiles of the same bootstrap distribution at the adjusted tail
alpha'/2 = Phi(-sqrt(n/(n-H)) t_{alpha/2, n-H}) (H = 1, or the number of strata), which
restores near-nominal coverage for means at small n, keeps the percentile interval's
respect for monotone transformations (a ratio's interval maps to its log's), and at
n = 2 widens to the range of the bootstrap distribution instead of claiming a tight
interval. `method="percentile"` gives the plain interval.

A limit no bootstrap interval escapes: every resample lies within the data's range, so
no bootstrap CI of a mean extends beyond [min, max]. All n values fall on one side of
the true mean with probability 2^(1-n) (continuous symmetric data), so a bootstrap CI
covers at most 1 - 2^(1-n) (`coverage_ceiling`): 50% at n = 2, 75% at 3, 87.5% at 4,
93.75% at 5; only from n = 6 can it reach 95%. Below that, read a bootstrap CI as a
range of what was seen, and prefer `method="t"` (the Student t interval of a mean,
bootstrap_ci with stat=np.mean and paired_diff_ci only), which can extend beyond the
data when the values are near normal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np

METHODS = ("expanded", "percentile", "t")
VERDICTS = ("agree", "disagree", "inconclusive")
_NORMAL = NormalDist()


# --- Student t quantiles (integer degrees of freedom, exact) ---------------------------

def _t_cdf(t: float, df: int) -> float:
    """CDF of Student's t with integer df (Abramowitz & Stegun 26.7.3 / 26.7.4)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd
        term, total = c, (c if df > 1 else 0.0)
        for k in range(3, df - 1, 2):  # cos^k theta * (2.4...(k-1)) / (1.3...k)
            term *= c * c * (k - 1) / k
            total += term
        a = 2 / math.pi * (theta + s * total)
    else:
        term, total = 1.0, 1.0
        for k in range(2, df - 1, 2):  # cos^k theta * (1.3...(k-1)) / (2.4...k)
            term *= c * c * (k - 1) / k
            total += term
        a = s * total
    return 0.5 + math.copysign(a / 2, t)


def _t_ppf(p: float, df: int) -> float:
    """Quantile of Student's t with integer df, by bisection on the exact CDF."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -_t_ppf(1 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def coverage_ceiling(n: int) -> float:
    """The most a bootstrap CI of a mean can cover with n units of continuous symmetric
    data: 1 - 2^(1-n) (the CI never leaves [min, max]; all n values lie on one side of
    the mean with probability 2^(1-n))."""
    return 1 - 2.0 ** (1 - n) if n >= 1 else 0.0


def tail_level(level: float, n: int, n_strata: int = 1, method: str = "expanded") -> float:
    """The one-sided tail probability whose bootstrap percentiles bound the interval:
    (1 - level)/2 for "percentile"; Phi(-sqrt(n/(n-H)) t_{(1-level)/2, n-H}) for
    "expanded" (H = n_strata). Needs n > H."""
    if method not in ("expanded", "percentile"):
        raise ValueError(f"tail_level is for the bootstrap methods, got {method!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a = (1 - level) / 2
    if method == "percentile":
        return a
    df = n - n_strata
    if df < 1:
        raise ValueError(f"the expanded interval needs n > number of strata (n={n}, strata={n_strata})")
    return _NORMAL.cdf(math.sqrt(n / df) * _t_ppf(a, df))


# --- resampling ----------------------------------------------------------------------

def _as_1d(values, name="values") -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        a = a.reshape(-1)
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN; drop the missing cells before computing a CI")
    return a


def _strata_index(strata, n: int) -> list[np.ndarray]:
    """Indices of each stratum, strata in order of first appearance."""
    if strata is None:
        return [np.arange(n)]
    labels = list(strata)
    if len(labels) != n:
        raise ValueError(f"strata has {len(labels)} labels for {n} values")
    groups: dict = {}
    for i, s in enumerate(labels):
        groups.setdefault(s, []).append(i)
    return [np.asarray(ix, dtype=np.int64) for ix in groups.values()]


def _resample(n: int, groups: list[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) indices: each stratum resampled with replacement within itself."""
    if len(groups) == 1:
        return rng.integers(0, n, size=(n_boot, n))
    idx = np.empty((n_boot, n), dtype=np.int64)
    col = 0
    for g in groups:
        m = len(g)
        idx[:, col:col + m] = g[rng.integers(0, m, size=(n_boot, m))]
        col += m
    return idx


def _interval(boot: np.ndarray, level: float, n: int, n_strata: int, method: str) -> tuple[float, float]:
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return math.nan, math.nan
    a = tail_level(level, n, n_strata, method)
    lo, hi = np.quantile(boot, [a, 1 - a])
    return float(lo), float(hi)


def _apply_stat(stat: Callable, samples: np.ndarray) -> np.ndarray:
    """stat over each row of samples; vectorised when stat takes axis= (numpy reductions)."""
    try:
        out = np.asarray(stat(samples, axis=1), dtype=np.float64)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([float(stat(row)) for row in samples])


def _check(n_boot: int, level: float, method: str, allow_t: bool = True) -> None:
    if method == "t" and not allow_t:
        raise ValueError("method='t' is for means (bootstrap_ci with np.mean, paired_diff_ci); "
                         "use 'expanded' or 'percentile'")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def bootstrap_ci(values, stat: Callable = np.mean, n_boot: int = 10000, level: float = 0.95,
                 seed: int = 0, *, strata=None, method: str = "expanded") -> tuple[float, float, float]:
    """(estimate, lo, hi): stat(values) and its bootstrap confidence interval at `level`.

    Units (the entries of `values`) are resampled with replacement, within each stratum
    when `strata` (one label per value) is given, so every resample keeps the strata's
    sizes. The interval is the expanded percentile interval (module docstring; "percentile"
    for the plain one, "t" for the Student t interval of a mean, no resampling). n == 1, or one unit per stratum: (estimate, nan, nan); n == 0:
    all nan. `stat` is a numpy reduction taking axis= (np.mean, np.median) or any
    function of a 1-d array."""
    _check(n_boot, level, method)
    if method == "t" and stat is not np.mean:
        raise ValueError("method='t' is the Student t interval of a mean: use stat=np.mean")
    x = _as_1d(values)
    n = x.size
    if n == 0:
        return math.nan, math.nan, math.nan
    est = float(stat(x))
    groups = _strata_index(strata, n)
    if n - len(groups) < 1:
        return est, math.nan, math.nan
    if method == "t":
        return (est, *_t_interval(x, groups, level))
    idx = _resample(n, groups, n_boot, np.random.default_rng(seed))
    boot = _apply_stat(stat, x[idx])
    lo, hi = _interval(boot, level, n, len(groups), method)
    return est, lo, hi


def _t_interval(x: np.ndarray, groups: list[np.ndarray], level: float) -> tuple[float, float]:
    """Student t interval of the mean of x; with strata, of the stratified mean (the same
    number: strata weighted by their sizes) with variance sum_h (n_h/n)^2 s_h^2 / n_h and
    n - H degrees of freedom (a stratum of one unit adds no variance)."""
    n = x.size
    var = sum((len(g) / n) ** 2 * (x[g].var(ddof=1) / len(g) if len(g) > 1 else 0.0) for g in groups)
    half = _t_ppf(1 - (1 - level) / 2, n - len(groups)) * math.sqrt(var)
    m = float(x.mean())
    return m - half, m + half


def paired_diff_ci(a, b, n_boot: int = 10000, level: float = 0.95, seed: int = 0, *, strata=None,
                   method: str = "expanded") -> tuple[float, float, float]:
    """(mean(a - b), lo, hi) for paired observations: a[i] and b[i] are two candidates
    measured on the same unit i (e.g. the same (checkpoint, seed) cell); the units are
    resampled, so the pairing (and what the two candidates share in a cell) is kept."""
    a, b = _as_1d(a, "a"), _as_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired_diff_ci needs equal lengths, got {a.size} and {b.size}")
    return bootstrap_ci(a - b, np.mean, n_boot, level, seed, strata=strata, method=method)


def ratio_ci(num, den, n_boot: int = 10000, level: float = 0.95, seed: int = 0, *, strata=None,
             method: str = "expanded") -> tuple[float, float, float]:
    """(mean(num) / mean(den), lo, hi): a ratio of means (e.g. a speedup: compute scratch
    needs over compute the grown run used), resampling the pairs (num[i], den[i])
    together. Being a percentile interval, it maps to the interval of log(ratio)."""
    num, den = _as_1d(num, "num"), _as_1d(den, "den")
    if num.shape != den.shape:
        raise ValueError(f"ratio_ci needs equal lengths, got {num.size} and {den.size}")
    _check(n_boot, level, method, allow_t=False)
    n = num.size
    if n == 0:
        return math.nan, math.nan, math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        est = float(num.mean() / den.mean())
    groups = _strata_index(strata, n)
    if n - len(groups) < 1:
        return est, math.nan, math.nan
    idx = _resample(n, groups, n_boot, np.random.default_rng(seed))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = num[idx].mean(1) / den[idx].mean(1)
    lo, hi = _interval(boot, level, n, len(groups), method)
    return est, lo, hi


# --- Spearman ------------------------------------------------------------------------

TIE_TOL = 1e-5  # nats: losses closer than this are float noise at these sizes, ranked as ties


def snap_ties(a, tol: float = 0.0) -> np.ndarray:
    """a with every value replaced by the smallest value of its tie chain: sorted values
    whose consecutive gaps are all <= tol form one chain. tol = 0 returns a unchanged, so
    rankdata(snap_ties(a, tol)) ranks values within tol of each other as ties."""
    a = np.asarray(a, dtype=np.float64)
    if tol <= 0 or a.size < 2:
        return a
    if not tol < math.inf:
        raise ValueError(f"tie tolerance must be finite, got {tol}")
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    start = np.r_[True, np.diff(s) > tol]
    out = np.empty_like(a)
    out[order] = s[np.flatnonzero(start)[np.cumsum(start) - 1]]
    return out


def rankdata(a) -> np.ndarray:
    """Ranks 1..n of a 1-d array, ties sharing their average rank."""
    a = np.asarray(a, dtype=np.float64)
    sorter = np.argsort(a, kind="mergesort")
    inv = np.empty_like(sorter)
    inv[sorter] = np.arange(a.size)
    s = a[sorter]
    obs = np.r_[True, s[1:] != s[:-1]]
    dense = np.cumsum(obs)[inv]
    count = np.r_[np.nonzero(obs)[0], a.size]
    return 0.5 * (count[dense] + count[dense - 1] + 1)


def _rank_rows(a: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis of a 2-d array."""
    n = a.shape[1]
    if n > 64:
        return np.apply_along_axis(rankdata, 1, a)
    out = np.empty(a.shape, dtype=np.float64)
    chunk = max(1, 2_000_000 // (n * n))
    for i in range(0, a.shape[0], chunk):
        b = a[i:i + chunk]
        less = (b[:, None, :] < b[:, :, None]).sum(-1)
        equal = (b[:, None, :] == b[:, :, None]).sum(-1)
        out[i:i + chunk] = less + (equal + 1) / 2
    return out


def _pearson_rows(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    dx = rx - rx.mean(-1, keepdims=True)
    dy = ry - ry.mean(-1, keepdims=True)
    vx, vy = (dx * dx).sum(-1), (dy * dy).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (dx * dy).sum(-1) / np.sqrt(vx * vy)
    return np.where((vx > 0) & (vy > 0), np.clip(r, -1.0, 1.0), np.nan)


def spearman(x, y, tol: float = 0.0) -> float:
    """Spearman rank correlation: the Pearson correlation of the average ranks (ties
    averaged, as scipy.stats.spearmanr; values within `tol` are ties, see snap_ties).
    nan below 2 points or when x or y is constant."""
    x, y = snap_ties(_as_1d(x, "x"), tol), snap_ties(_as_1d(y, "y"), tol)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal lengths, got {x.size} and {y.size}")
    if x.size < 2:
        return math.nan
    return float(_pearson_rows(rankdata(x)[None], rankdata(y)[None])[0])


def spearman_ci(x, y, n_boot: int = 10000, level: float = 0.95, seed: int = 0, *, strata=None,
                method: str = "expanded", tol: float = 0.0) -> tuple[float, float, float]:
    """(rho, lo, hi): Spearman's rho and its bootstrap CI over units (the pairs
    (x[i], y[i]) are resampled together; within strata if given). Resamples where x or y
    is constant (rho undefined) are dropped. Below 4 units the CI is (nan, nan): a rank
    correlation's bootstrap is degenerate there (at n = 2 every defined resample is +-1)."""
    _check(n_boot, level, method, allow_t=False)
    x, y = snap_ties(_as_1d(x, "x"), tol), snap_ties(_as_1d(y, "y"), tol)
    rho = spearman(x, y)
    n = x.size
    groups = _strata_index(strata, n)
    if n < 4 or n - len(groups) < 1:
        return rho, math.nan, math.nan
    idx = _resample(n, groups, n_boot, np.random.default_rng(seed))
    boot = _pearson_rows(_rank_rows(x[idx]), _rank_rows(y[idx]))
    lo, hi = _interval(boot, level, n, len(groups), method)
    return rho, lo, hi


@dataclass
class WithinSpearman:
    """Spearman's rho within cells, summarised, next to the pooled value."""
    pooled: float  # rho over all rows together
    pooled_lo: float
    pooled_hi: float
    n_rows: int
    within: float  # mean over cells of the per-cell rho
    within_lo: float  # bootstrap CI of that mean, cells as units
    within_hi: float
    n_cells: int  # cells with a defined rho
    n_skipped: int  # cells with fewer than 2 rows or a constant x or y
    cells: dict = field(default_factory=dict)  # cell key (tuple) -> rho (nan if undefined)


def spearman_within(rows: Sequence[dict], group_keys, x: str, y: str, n_boot: int = 10000,
                    level: float = 0.95, seed: int = 0, *, method: str = "expanded",
                    tol: float = 0.0) -> WithinSpearman:
    """Spearman between columns x and y of `rows` (dicts, e.g. results.csv rows) computed
    within each cell of `group_keys` (e.g. ("checkpoint", "regime", "seed")), so that what
    differs between cells (a checkpoint's overall loss level) cannot make the correlation;
    summarised as the mean over cells with a bootstrap CI over cells, next to the pooled
    rho over all rows with its bootstrap CI over rows. Rows whose x or y is missing or
    nan are left out. Values within `tol` of each other (within a cell, or pooled) are
    ties. Cells are resampled as if independent; cells sharing a checkpoint are not, so
    read the within CI as a lower bound on the uncertainty."""
    keys = (group_keys,) if isinstance(group_keys, str) else tuple(group_keys)

    def num(r, c):
        v = r.get(c)
        return None if v is None else float(v)
    good = [r for r in rows if num(r, x) is not None and num(r, y) is not None
            and not math.isnan(num(r, x)) and not math.isnan(num(r, y))]
    cells: dict = {}
    for r in good:
        cells.setdefault(tuple(r[k] for k in keys), []).append((num(r, x), num(r, y)))
    rhos = {k: spearman([a for a, _ in v], [b for _, b in v], tol) for k, v in cells.items()}
    defined = [v for v in rhos.values() if not math.isnan(v)]
    w, wlo, whi = bootstrap_ci(defined, np.mean, n_boot, level, seed, method=method)
    p, plo, phi = spearman_ci([num(r, x) for r in good], [num(r, y) for r in good], n_boot, level, seed,
                              method=method, tol=tol)
    return WithinSpearman(pooled=p, pooled_lo=plo, pooled_hi=phi, n_rows=len(good), within=w,
                          within_lo=wlo, within_hi=whi, n_cells=len(defined),
                          n_skipped=len(rhos) - len(defined), cells=rhos)


# --- verdicts on a paper's claims -------------------------------------------------------

def parse_claim(claim) -> tuple[str, float]:
    """"> 0", "<0", "> 1.5" or (">", 1.5) -> (op, threshold)."""
    if isinstance(claim, (tuple, list)) and len(claim) == 2:
        op, thr = claim
    elif isinstance(claim, str) and claim.strip()[:1] in ("<", ">"):
        s = claim.strip()
        op, thr = s[0], s[1:]
    else:
        raise ValueError(f"a claim is '> t' or '< t' (or ('>', t)), got {claim!r}")
    if op not in ("<", ">"):
        raise ValueError(f"a claim's operator is '>' or '<', got {op!r}")
    try:
        return op, float(thr)
    except (TypeError, ValueError):
        raise ValueError(f"a claim's threshold must be a number, got {thr!r}") from None


def verdict(estimate: float, lo: float, hi: float, claim="> 0") -> str:
    """Whether a CI [lo, hi] supports a claim "quantity > t" (or "< t"): "agree" when
    the interval lies strictly on the claimed side of t (it excludes the opposite),
    "disagree" when it lies strictly on the other side, "inconclusive" when it contains
    t or is undefined (nan, e.g. a single unit). `estimate` only matters when it is nan
    (inconclusive)."""
    op, t = parse_claim(claim)
    vals = (estimate, lo, hi)
    if any(v is None or math.isnan(v) for v in vals):
        return "inconclusive"
    if lo > hi:
        raise ValueError(f"verdict needs lo <= hi, got [{lo}, {hi}]")
    if op == ">":
        return "agree" if lo > t else "disagree" if hi < t else "inconclusive"
    return "agree" if hi < t else "disagree" if lo > t else "inconclusive"


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.2e}"
    return f"{x:.4f}"


@dataclass
class Finding:
    """One paper claim tested against the study's numbers, for the reports."""
    claim: str  # what is measured, e.g. "final loss, structured - exact_copy (deterministic)"
    paper: str  # what the paper says, e.g. "the structured start wins deterministic continuation"
    estimate: float
    lo: float
    hi: float
    n: int  # independent units behind the CI (e.g. seeds)
    test: str = "> 0"  # the claim as a condition on the quantity
    level: float = 0.95
    verdict: str = ""  # computed from (estimate, lo, hi, test) when left empty
    detail: str = ""  # a descriptive note shown after n, e.g. "4 of 4 cells < 0"
    # level -> (estimate, lo, hi): the same interval at another level, for Holm's
    # adjustment across a report's findings (holm_adjust); None: not adjustable
    ci_at: Callable | None = field(default=None, repr=False, compare=False)
    p: float = math.nan  # the smallest 1 - level whose interval excludes the test's threshold
    holm: str = ""  # the verdict after Holm's adjustment (set by holm_adjust)

    def __post_init__(self):
        if not self.verdict:
            self.verdict = verdict(self.estimate, self.lo, self.hi, self.test)
        elif self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def markdown(self) -> str:
        """One markdown list line."""
        ci = (f"[{_fmt(self.lo)}, {_fmt(self.hi)}]" if not (math.isnan(self.lo) or math.isnan(self.hi))
              else "no CI")
        adj = f" (Holm: **{self.holm}**, p = {self.p:.2g})" if self.holm else ""
        return (f"- **{self.verdict}**{adj}: {self.claim} = {_fmt(self.estimate)}, {self.level:.0%} CI {ci} "
                f"(n = {self.n}{'; ' + self.detail if self.detail else ''}; paper: {self.paper}; "
                f"tested: {self.test})")


# --- many findings at once ----------------------------------------------------------------

def p_value(ci_at: Callable, claim="> 0", floor: float = 1e-6) -> float:
    """The two-sided p-value implied by a family of intervals: the smallest alpha whose
    (1 - alpha) interval excludes the claim's threshold (on either side), by bisection
    on alpha (intervals widen as alpha falls). 1.0 when every interval tried includes it;
    `floor` when it is excluded already at level 1 - floor."""
    _, t = parse_claim(claim)

    def excludes(alpha):
        est, lo, hi = ci_at(1 - alpha)
        if any(v is None or math.isnan(v) for v in (est, lo, hi)):
            return False
        return lo > t or hi < t
    if excludes(floor):
        return floor
    if not excludes(1 - 1e-9):
        return 1.0
    lo_a, hi_a = floor, 1 - 1e-9  # excludes(hi_a) and not excludes(lo_a)
    for _ in range(40):
        mid = math.sqrt(lo_a * hi_a)
        lo_a, hi_a = (lo_a, mid) if excludes(mid) else (mid, hi_a)
        if hi_a / lo_a < 1.01:
            break
    return hi_a


def holm_adjust(findings: Sequence[Finding], alpha: float = 0.05) -> list[Finding]:
    """Holm's step-down adjustment across a report's findings (family-wise error alpha):
    the k-th smallest p-value (k = 0, 1, ...) is tested at alpha / (m - k) and testing
    stops at the first that fails. A finding that passes gets the verdict of its interval
    at level 1 - alpha / (m - k), which excludes the threshold; the others "inconclusive".
    Findings without `ci_at` are left as they are (holm stays ""). Returns the findings."""
    adjustable = [f for f in findings if f.ci_at is not None]
    for f in adjustable:
        f.p = p_value(f.ci_at, f.test)
    m = len(adjustable)
    failed = False
    for k, f in enumerate(sorted(adjustable, key=lambda f: f.p)):
        a = alpha / (m - k)
        if failed or f.p > a:
            failed = True
            f.holm = "inconclusive"
        else:
            f.holm = verdict(*f.ci_at(1 - a), f.test)
    return list(findings)
