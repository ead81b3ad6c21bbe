"""The warmstart study's report: the findings (each paper claim per regime and
checkpoint, pooled over the checkpoints as a summary, Holm-adjusted across the report),
rankings per regime and checkpoint, where structured's advantage comes from, the
schedule and noise comparisons, selector correlations within cells and pooled;
results.csv and the plots.

The conventions (docs/studies.md, "Study 1"): the unit of replication is the base seed
(a seed's checkpoints come from one base run: a per-cell quantity is taken at one
checkpoint, or averaged over the seed's checkpoints for the pooled summary, and its CI
is a Student t interval over seeds); val losses within stats.TIE_TOL nats are ties
(they share a rank, tie in Spearman, and a loss difference inside the tolerance is
never agree or disagree); intervals of bounded quantities (a Spearman, a difference of
two) are clipped to their range; the comparator of every "ranks first" finding is fixed
in advance (design.COMPARATOR), and every gap in the rankings is to design.REFERENCE."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from .. import stats
from ..presets import SMOKE_NOTE
from ..progress import fmt_seconds
from ..render import fmt, fmt_sig, md_table, mean, plots_section, pyplot, save_figure, write_csv, write_text
from .design import (COLUMNS, COMPARATOR, PAPER_FAMILIES, REFERENCE, SELECTORS, SMALL_EQUAL_COMPUTE, candidates,
                     escape_pool)

PAPER = "Preservation Is Not Enough for Width Growth (arXiv 2604.04281)"
LOG_SELECTORS = ("pres_kl", "escape0", "probe_escape")  # >= 0, spanning many decades (0 drawn at 1e-16)
SAME_TOL = 1e-4  # nats: mean curves this close at every eval step are named as coinciding in the legend
# Step-0 preservation by an exactly preserving strategy is float32 rounding (KL ~1e-13,
# loss change ~1e-7): below these floors a selector reads 0, so such candidates tie
# instead of being ranked by rounding noise (perturb_np at noise 1e-3 is at KL ~3e-6).
SELECTOR_FLOORS = {"pres_kl": 1e-9, "pres_dloss": 1e-6}
TIE_TOL = stats.TIE_TOL
# Columns in nats of val loss: values within TIE_TOL of each other are float noise at
# these sizes (perturb at noise 0.01 is exact_copy to ~2e-7), so they rank as ties.
LOSS_COLUMNS = ("final_loss", "auc", "probe_loss", "pres_dloss")
RHO_RANGE = (-1.0, 1.0)  # a Spearman, and a mean of them
RHO_DIFF_RANGE = (-2.0, 2.0)  # a difference of two
CELL = ("base_seed", "checkpoint")  # a base model's checkpoint: the unit every candidate shares
# The unit of replication is the base seed: the checkpoints of one seed come from one base
# run and are not independent draws, so a per-cell quantity is averaged over the seed's
# checkpoints first and the CI is taken over seeds (the growth-factor study does the same).
NAN3 = (math.nan, math.nan, math.nan)


def cells_of(rows) -> list[tuple]:
    return sorted({tuple(r[k] for k in CELL) for r in rows})


def scopes(cells) -> list[tuple[str, list]]:
    """(label, cells) for each checkpoint, then "pooled" (every cell, a seed's checkpoints
    averaged: the summary) when there is more than one checkpoint."""
    out = [(f"checkpoint {c}", [x for x in cells if x[1] == c]) for c in sorted({x[1] for x in cells})]
    return out + [("pooled", list(cells))] if len(out) > 1 else out


def per_cell(rows, regime: str, candidate: str, column: str, cells) -> np.ndarray:
    """column of `candidate` in each cell (nan where missing), in the order of `cells`."""
    got = {tuple(r[k] for k in CELL): r.get(column) for r in rows
           if r["regime"] == regime and r["candidate"] == candidate}
    return np.array([np.nan if got.get(c) is None else float(got[c]) for c in cells])


def per_seed(x, cells) -> np.ndarray:
    """A per-cell array averaged over each base seed's checkpoints (cells without a value
    left out; seeds with none dropped), in seed order."""
    x = np.asarray(x, dtype=float)
    seeds = sorted({c[0] for c in cells})
    vals = [[v for c, v in zip(cells, x) if c[0] == s and not np.isnan(v)] for s in seeds]
    return np.array([np.mean(v) for v in vals if v])


def mean_ci(x, cells, level: float = 0.95) -> tuple[float, float, float]:
    """Mean over seeds of a per-cell array and its Student t CI over seeds (bootstrap
    percentiles cannot cover at n <= 5); no CI from one seed."""
    x = per_seed(x, cells)
    return stats.bootstrap_ci(x, method="t", level=level) if x.size else NAN3


def diff_ci(a, b, cells) -> tuple[float, float, float]:
    """Mean of a - b over the cells both have, paired, with its 95% t CI over seeds."""
    return mean_ci(np.asarray(a, float) - np.asarray(b, float), cells)


def n_seeds(x, cells) -> int:
    return int(per_seed(x, cells).size)


def cell_signs(x, test: str) -> str:
    """How many cells lie on the tested side, e.g. '4 of 4 cells < 0' (descriptive: the
    cells of a seed are not independent)."""
    op, t = stats.parse_claim(test)
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    side = int(np.sum(x > t) if op == ">" else np.sum(x < t))
    return f"{side} of {x.size} cells {op} {t:g}"


def floored(rows) -> list[dict]:
    """rows with the selectors of SELECTOR_FLOORS set to 0 below their floor."""
    return [{**r, **{k: 0.0 for k, f in SELECTOR_FLOORS.items() if r.get(k) is not None and abs(float(r[k])) < f}}
            for r in rows]


def tie_snapped(values, column: str) -> np.ndarray:
    """values of `column`, those of a loss column within TIE_TOL of each other made equal
    (stats.snap_ties), so ranks and Spearman treat them as ties."""
    x = np.asarray(values, dtype=float)
    return stats.snap_ties(x, TIE_TOL) if column in LOSS_COLUMNS else x


def rho(rs, x: str, y: str) -> float:
    """Spearman of columns x and y over rows `rs` (rows missing either left out; loss
    columns tie within TIE_TOL); nan below 2 rows or when a column is constant."""
    pairs = [(float(r[x]), float(r[y])) for r in rs if r.get(x) is not None and r.get(y) is not None]
    pairs = [(a, b) for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 2:
        return math.nan
    return stats.spearman(tie_snapped([a for a, _ in pairs], x), tie_snapped([b for _, b in pairs], y))


def by_cell(rows, regime: str, names) -> dict:
    """cell -> the (floored) rows of `names` in `regime`."""
    out: dict = {}
    for r in floored([r for r in rows if r["regime"] == regime and r["candidate"] in names]):
        out.setdefault(tuple(r[k] for k in CELL), []).append(r)
    return out


def within_spearman(rows, regime: str, names, x: str, y: str) -> stats.WithinSpearman:
    """Spearman of x with y over `names` within each cell, and pooled over all their rows
    (the CIs are the report's, over seeds: within_ci)."""
    cells = by_cell(rows, regime, names)
    rhos = {c: rho(rs, x, y) for c, rs in cells.items()}
    defined = [v for v in rhos.values() if not math.isnan(v)]
    everything = [r for rs in cells.values() for r in rs]
    return stats.WithinSpearman(
        pooled=rho(everything, x, y), pooled_lo=math.nan, pooled_hi=math.nan, n_rows=len(everything),
        within=float(np.mean(defined)) if defined else math.nan, within_lo=math.nan, within_hi=math.nan,
        n_cells=len(defined), n_skipped=len(rhos) - len(defined), cells=rhos)


def within_ci(ws, cells) -> tuple[float, float, float]:
    """The mean within-cell Spearman of a stats.WithinSpearman, with its t CI over seeds
    (clipped to [-1, 1], where a mean of correlations lives)."""
    est, lo, hi = mean_ci([ws.cells.get(c, math.nan) for c in cells], cells)
    return est, max(lo, -1.0), min(hi, 1.0)


def ci_text(est, lo, hi, digits=4) -> str:
    if math.isnan(lo):
        return fmt(est, digits)
    return f"{fmt(est, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def tied_ranks(means) -> list[str]:
    """Competition ranks of `means` (lowest first); means within TIE_TOL of each other (in
    a chain) share the best of their ranks, marked "=" (e.g. 2=, 2=, 4)."""
    snapped = stats.snap_ties(np.asarray(means, dtype=float), TIE_TOL)
    counts = Counter(snapped.tolist())
    return [f"{1 + int(np.sum(snapped < x))}{'=' if counts[x] > 1 else ''}" for x in snapped.tolist()]


def ranking(rows, regime: str, names, column: str, cells) -> list[tuple[str, float, str]]:
    """(candidate, mean of column over seeds, rank with ties), best (lowest) first."""
    means = [(s, mean_ci(per_cell(rows, regime, s, column, cells), cells)[0]) for s in names]
    means = sorted((t for t in means if not math.isnan(t[1])), key=lambda t: t[1])
    return [(s, m, rk) for (s, m), rk in zip(means, tied_ranks([m for _, m in means]))]


def selector_table(rows, regime, names, target: str):
    """selector -> within_spearman of selector vs target over `names` (cells: base model x checkpoint)."""
    return {sel: within_spearman(rows, regime, names, sel, target) for sel in SELECTORS}


def rho_text(ws, cells) -> tuple[str, str]:
    """(within, pooled) cells of the selector table; 'tied' where the selector gives every
    candidate the same value (no ranking at all)."""
    if ws.n_cells == 0 and ws.n_skipped:
        return "tied in every cell", "tied" if math.isnan(ws.pooled) else fmt(ws.pooled, 2)
    return ci_text(*within_ci(ws, cells), 2), fmt(ws.pooled, 2)


# --- findings ---------------------------------------------------------------------------

def finding(claim: str, paper: str, values, cells, test: str, *, tie: bool = False, bounds=None,
            note: str = "") -> stats.Finding:
    """The Finding on a per-cell quantity: its mean over seeds and t interval over seeds,
    with ci_at (the interval at any level) for Holm's adjustment. tie: a loss difference,
    whose values within TIE_TOL of 0 are no difference: the verdict (and Holm's) comes
    from the interval widened by TIE_TOL on each side, so it is never agree or disagree
    on a difference inside the tolerance. bounds: the quantity's range, to which the
    interval is clipped (the t interval of a bounded mean can leave it; the clip never
    moves it across a threshold inside the range, so no verdict changes)."""
    seeds = per_seed(values, cells)
    same = seeds.size > 1 and np.ptp(seeds) == 0

    def interval(level: float) -> tuple[float, float, float]:
        if same:
            # Every seed gives the same value (a rank correlation of a few candidates often
            # does): the t interval is a point whatever n. All n seeds land on one side of
            # the true mean by chance with probability 2^(1-n) (the sign test), so the point
            # stands for levels up to 1 - 2^(1-n) only, above it the whole range: no verdict
            # from 2 such seeds (p = 0.5), p = 0.008 from 8.
            x = float(seeds[0])
            if level <= 1 - 2.0 ** (1 - seeds.size):
                return x, x, x
            return (x, *(bounds if bounds is not None else (-math.inf, math.inf)))
        est, lo, hi = stats.bootstrap_ci(seeds, method="t", level=level) if seeds.size else NAN3
        if bounds is not None:
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        return est, lo, hi

    def ci_at(level: float) -> tuple[float, float, float]:
        est, lo, hi = interval(level)
        return (est, lo - TIE_TOL, hi + TIE_TOL) if tie else (est, lo, hi)

    est, lo, hi = interval(0.95)
    detail = [cell_signs(values, test)]
    if tie and abs(est) <= TIE_TOL:
        detail.append(f"tied: |difference| within {TIE_TOL:g} nats")
    if same:
        detail.append(f"every seed gives {_fmt(est)}: the sign test's interval (p = {2.0 ** (1 - seeds.size):.2g})")
    elif bounds is not None and seeds.size > 1:
        raw = stats.bootstrap_ci(seeds, method="t")
        if raw[1] < bounds[0] or raw[2] > bounds[1]:
            detail.append(f"CI clipped to [{bounds[0]:g}, {bounds[1]:g}] from [{_fmt(raw[1])}, {_fmt(raw[2])}]")
    if note:
        detail.append(note)
    return stats.Finding(claim, paper, est, lo, hi, int(seeds.size), test, verdict=stats.verdict(*ci_at(0.95), test),
                         detail="; ".join(detail), ci_at=ci_at)


def _fmt(x) -> str:
    return fmt(x, 2)


def escape_order(rows, regime: str, pool, cells) -> tuple[list[str] | None, int]:
    """(the pool's order by probe_escape, lowest first, if it is the same in every cell
    holding the whole pool, else None; how many such cells)."""
    orders = set()
    cell_rows = by_cell(rows, regime, pool)
    full = [cell_rows[c] for c in cells if c in cell_rows and len(cell_rows[c]) == len(pool)]
    for rs in full:
        if any(r.get("probe_escape") is None for r in rs):
            return None, len(full)
        esc = stats.rankdata([float(r["probe_escape"]) for r in rs])
        orders.add(tuple(sorted(((e, r["candidate"]) for e, r in zip(esc, rs)))))
    if len(orders) != 1:
        return None, len(full)
    (order,) = orders
    return [name for _, name in order], len(full)


def regimes_of(p, rows) -> list[str]:
    return [r for r in p.regimes if any(x["regime"] == r for x in rows)]


def findings(rows, p, cells) -> list[stats.Finding]:
    """Every finding of the report: each claim per regime, per checkpoint and pooled over
    the checkpoints (the summary); Holm's adjustment is left to the caller (holm_adjust)."""
    names = {r["candidate"] for r in rows}
    regimes = regimes_of(p, rows)
    lag, end = p.probe_lag, p.continuation
    out = []

    def diff(regime, column, a, b, cs):
        return per_cell(rows, regime, a, column, cs) - per_cell(rows, regime, b, column, cs)

    ec, st = "exact_copy", "structured"
    if {ec, st} <= names:
        for regime in regimes:
            for label, cs in scopes(cells):
                out.append(finding(
                    f"{lag}-step probe loss, {ec} - {COMPARATOR[ec]} (comparator fixed in advance), {regime}, {label}",
                    f"exact copy ranks first in every {lag}-step probe", diff(regime, "probe_loss", ec, st, cs), cs,
                    "< 0", tie=True))
        for regime in [r for r in regimes if r != "deterministic"]:
            for label, cs in scopes(cells):
                out.append(finding(
                    f"final loss after {end} steps, {ec} - {COMPARATOR[ec]} (comparator fixed in advance), {regime}, "
                    f"{label}", "exact copy ranks first in stochastic continuation",
                    diff(regime, "final_loss", ec, st, cs), cs, "< 0", tie=True,
                    note="shuffling alone, no dropout" if regime == "shuffle" else ""))
        if "deterministic" in regimes:
            for label, cs in scopes(cells):
                out.append(finding(
                    f"final loss after {end} steps, {st} - {COMPARATOR[st]} (comparator fixed in advance), "
                    f"deterministic, {label}", "the structured non-clone start wins deterministic continuation",
                    diff("deterministic", "final_loss", st, ec, cs), cs, "< 0", tie=True))

    pool = [s for s in PAPER_FAMILIES if s in names]
    for regime in regimes:
        groups = by_cell(rows, regime, pool)

        def probe_minus_pres(rs) -> float:
            if len(rs) < 2:
                return math.nan
            # a pres_kl that ties every candidate (all exactly preserving) selects nothing:
            # rho 0, not undefined
            pres = 0.0 if len({r["pres_kl"] for r in rs}) == 1 else rho(rs, "pres_kl", "final_loss")
            return rho(rs, "probe_loss", "final_loss") - pres

        for label, cs in scopes(cells):
            out.append(finding(
                f"Spearman with final loss within a cell, probe_loss minus pres_kl (0 where pres_kl ties every "
                f"candidate), paper's four families, {regime}, {label}",
                "step-0 preservation is not a universal selector (a short probe selects better)",
                np.array([probe_minus_pres(groups.get(c, [])) for c in cs]), cs, "> 0", bounds=RHO_DIFF_RANGE))

    pool = [s for s in escape_pool(p) if s in names]
    claim = ("early escape from the cloned subspace helps in long deterministic continuation but misleads at "
             "short lag and under stochastic continuation")
    for regime in regimes:
        groups = by_cell(rows, regime, pool)
        order, _ = escape_order(rows, regime, pool, cells)
        for target, when in (("probe_loss", f"{lag}-step probe loss"), ("final_loss", f"final loss after {end} steps")):
            helps = regime == "deterministic" and target == "final_loss"
            for label, cs in scopes(cells):
                out.append(finding(
                    f"within-cell Spearman of the update escape at lag {lag} with the {when}, escape pool "
                    f"({len(pool)} candidates), {regime}, {label}",
                    claim, np.array([rho(groups.get(c, []), "probe_escape", target) for c in cs]), cs,
                    "< 0" if helps else "> 0", bounds=RHO_RANGE,
                    note="; ".join(n for n in (f"the paper: escape {'helps' if helps else 'misleads'} here",
                                               "escape order the same in every cell" if order else "") if n)))
    return out


# --- plots ------------------------------------------------------------------------------

def _mean_curves(rows, regime, checkpoints, names) -> dict:
    """(checkpoint, candidate) -> (steps, val loss averaged over seeds)."""
    means = {}
    for step in checkpoints:
        for s in names:
            curves = [r["curve"] for r in rows if r["regime"] == regime and r["checkpoint"] == step
                      and r["candidate"] == s]
            if curves:
                xs = [x for x, _ in curves[0]]
                means[(step, s)] = (xs, [mean(c[i][1] for c in curves) for i in range(len(xs))])
    return means


def _same_as(means, names, s):
    """The first earlier candidate whose curves are within SAME_TOL of s's at every eval step
    of every checkpoint (it would hide s's curve), or None."""
    for t in names[:names.index(s)]:
        pairs = [(ys, means[(step, t)][1]) for (step, u), (_, ys) in means.items() if u == s and (step, t) in means]
        if pairs and all(abs(a - b) <= SAME_TOL for ys, zs in pairs for a, b in zip(ys, zs)):
            return t
    return None


def _plots(out: Path, p, rows, names) -> list[Path]:
    """curves_<regime>.png and selectors.png for the candidates `names` (rows carry
    "candidate"; the small_equal_compute curve's steps are the grown candidates' compute)."""
    plt = pyplot()
    if plt is None:
        return []
    files = []
    names = list(names)
    # a distinct (color, line style, marker) per candidate; markers on every 4th eval step,
    # staggered, so up to four coinciding curves all stay visible
    styles = {s: dict(color=plt.get_cmap("tab10")(i % 10), ls=("-", "--", "-.", ":")[i % 4],
                      marker="osD^vPX*"[i % 8], markevery=(i % 4, 4), ms=4, lw=1.2)
              for i, s in enumerate(names)}
    colors = {s: st["color"] for s, st in styles.items()}
    regimes = [r for r in p.regimes if any(x["regime"] == r for x in rows)]
    for regime in regimes:
        means = _mean_curves(rows, regime, p.checkpoints, names)
        labels = {s: s if (t := _same_as(means, names, s)) is None else f"{s} (= {t} within {SAME_TOL:.0e} nats)"
                  for s in names}
        fig, axes = plt.subplots(2, len(p.checkpoints), figsize=(5.5 * len(p.checkpoints), 7.5), sharex="col",
                                 squeeze=False)
        handles = {}
        for ax, gap, step in zip(axes[0], axes[1], p.checkpoints):
            here = [s for s in names if (step, s) in means]
            if not here:
                continue
            # the best candidate at each eval step, every curve read at the first one's steps
            grid = means[(step, here[0])][0]
            at = {s: np.interp(grid, *means[(step, s)]) for s in here}
            best = np.min([at[s] for s in here], axis=0)
            for s in here:
                xs, ys = means[(step, s)]
                handles[labels[s]], = ax.plot(xs, ys, **styles[s])
                gap.plot(grid, at[s] - best, **styles[s])
            small = [r["loss_small"] for r in rows if r["checkpoint"] == step]
            if small:
                handles["base (small) model"] = ax.axhline(small[0], color="gray", ls="--", lw=0.8)
            for a in (ax, gap):
                a.axvline(p.probe_lag, color="gray", ls=":", lw=0.8)
            ax.set_title(f"{regime}, grown at step {step}")
            ax.set_ylabel("val loss (nats/token)")
            # the scratch curve starts far above: zoom on the warm starts, the gap panel shows all
            warm = [y for (c, s), (_, ys) in means.items() if c == step and s != "scratch" for y in ys]
            if warm:
                lo, hi = min(warm), max(warm)
                ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
            lo, hi = ax.get_ylim()
            off = [s for s in here if not any(lo <= y <= hi for y in means[(step, s)][1])]
            if off:
                ax.text(0.98, 0.97, f"off scale: {', '.join(off)} (see gap below)", transform=ax.transAxes,
                        ha="right", va="top", fontsize=8)
            gap.set_yscale("symlog", linthresh=1e-3)
            gap.set_ylim(bottom=-3e-4)  # gaps are >= 0; keep the best candidate's zero line off the edge
            gap.set_xlabel("steps after growth (small_equal_compute: the grown candidates' compute)")
            gap.set_ylabel("gap to the best candidate at that step\n(nats, symlog)")
        fig.suptitle(f"warmstart ({p.name}): val loss after growth, mean over seeds")
        fig.tight_layout()
        fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        files.append(save_figure(plt, fig, out / f"curves_{regime}.png"))

    fig, axes = plt.subplots(len(regimes), len(SELECTORS), figsize=(3.3 * len(SELECTORS), 3.2 * len(regimes)),
                             squeeze=False)
    for i, regime in enumerate(regimes):
        sub = floored([r for r in rows if r["regime"] == regime and r["candidate"] in names])
        for j, sel in enumerate(SELECTORS):
            ax = axes[i][j]
            for s in names:
                pts = [(float(r[sel]), r["final_loss"]) for r in sub if r["candidate"] == s and r.get(sel) is not None]
                if sel in LOG_SELECTORS:
                    pts = [(max(x, 1e-16), y) for x, y in pts]
                if pts:
                    ax.scatter([x for x, _ in pts], [y for _, y in pts], s=14, color=colors[s], label=s)
            if sel in LOG_SELECTORS:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_title(f"{regime}: {sel}\nSpearman {fmt(rho(sub, sel, 'final_loss'), 2)}", fontsize=9)
            ax.set_xlabel(sel, fontsize=8)
            if j == 0:
                ax.set_ylabel("final_loss")
            ax.tick_params(labelsize=7)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    files.append(save_figure(plt, fig, out / "selectors.png"))
    return files


# --- the report ---------------------------------------------------------------------------

def _col_text(x) -> str:
    """The mean of a per-cell column to 3 significant digits, '-' where it does not apply."""
    x = np.asarray(x, dtype=float)
    return "-" if np.isnan(x).all() else fmt_sig(float(np.nanmean(x)))


def _gap_text(est, lo, hi) -> str:
    """A paired loss difference [CI], marked as a tie when it lies within TIE_TOL."""
    text = ci_text(est, lo, hi)
    return f"{text} (tie)" if abs(est) <= TIE_TOL else text


def run_lines(meta: dict, n_rows: int) -> list[str]:
    """The Run section's lines: the runs' own compute time (the cached runs' times
    included, as each run stored them) and, apart from it, this invocation's wall time."""
    workers = meta.get("workers", 1)
    computed, cached = meta["computed"], meta["cached"]
    base = meta.get("base_seconds") or {}
    n_base = len(meta.get("base_keys") or {})
    total = meta["compute_seconds"] + sum(base.values())
    lines = [f"- command: `{meta['command']}`",
             f"- compute of the runs: the {n_rows} continuations' own times sum to "
             f"{fmt_seconds(meta['compute_seconds'])} ({computed} computed in this invocation, "
             f"{fmt_seconds(meta.get('computed_seconds', 0.0))} of it; {cached} read from the cache, which keeps "
             f"each run's own time); the base models "
             + (f"{fmt_seconds(sum(base.values()))} ({len(base)} of {n_base} timed when trained)" if base
                else "untimed (trained before their times were recorded)")
             + f"; about {fmt_seconds(total / max(1, workers))} of wall time with {workers} worker process(es)",
             f"- this invocation: {fmt_seconds(meta['wall_seconds'])} of wall time"
             + (" (a re-render of the report from the cache: nothing was computed)" if computed == 0 else ""),
             f"- device: {meta['device']}, torch threads per process: {meta['threads'] or 'default'}"]
    return lines


def claim_parts(f: stats.Finding) -> tuple[str, str, str]:
    """(quantity, regime, scope) of a finding (findings() writes "quantity, regime, scope")."""
    quantity, regime, scope = f.claim.rsplit(", ", 2)
    return quantity, regime, scope


def _ci_cell(f: stats.Finding) -> str:
    ci = "no CI" if math.isnan(f.lo) or math.isnan(f.hi) else f"[{stats._fmt(f.lo)}, {stats._fmt(f.hi)}]"
    return f"{stats._fmt(f.estimate)} {ci}"


def findings_lines(found, p, rows, cells) -> list[str]:
    """The Findings section's body: a table per paper claim and quantity, a row per regime
    and checkpoint with the pooled summary after them, and the escape caveats."""
    L = []
    groups: dict = {}
    for f in found:
        groups.setdefault(f.paper, {}).setdefault(claim_parts(f)[0], []).append(f)
    for paper, quantities in groups.items():
        L += [f"### {paper[0].upper()}{paper[1:]}", ""]
        for quantity, fs in quantities.items():
            table = []
            for f in fs:
                _, regime, scope = claim_parts(f)
                cells_side, _, notes = f.detail.partition("; ")
                table.append([regime, _short(scope), _ci_cell(f), f.n, cells_side, f.test, f"**{f.verdict}**",
                              f"{f.holm} ({f.p:.2g})" if f.holm else "-", notes or "-"])
            L += [f"{quantity[0].upper()}{quantity[1:]}:", "",
                  md_table(["regime", "checkpoint", "estimate, 95% CI", "n", "cells", "tested", "verdict",
                            "Holm (p)", "notes"], table), ""]
        if paper.startswith("early escape"):
            pool = [s for s in escape_pool(p) if any(r["candidate"] == s for r in rows)]
            L += ["", f"Escape pool: {', '.join(pool)} (the update escape at lag {p.probe_lag} varies over them "
                  f"from 0, exact_copy without dropout, to most of the update, structured)."]
            for regime in regimes_of(p, rows):
                order, k = escape_order(rows, regime, pool, cells)
                if order:
                    L.append(f"- **caveat, {regime}**: the escape order is the same in all {k} cells "
                             f"({' < '.join(order)}): escape labels the candidates here rather than varying "
                             f"between cells as a selector's input would, so its Spearman tests whether the "
                             f"loss order follows this one fixed order, not whether escape selects.")
                elif k:
                    L.append(f"- {regime}: the escape order differs between the {k} cells.")
            L.append("")
    return L


def _short(scope: str) -> str:
    """A scope label for a table's checkpoint column: "500", "pooled"."""
    return scope.removeprefix("checkpoint ")


def write_report(out: Path, p, rows, meta: dict) -> list[Path]:
    cands = candidates(p)
    order = {c.name: i for i, c in enumerate(cands)}
    regime_order = {r: i for i, r in enumerate(p.regimes)}
    rows = sorted(rows, key=lambda r: (regime_order.get(r["regime"], len(regime_order)), r["base_seed"],
                                       r["checkpoint"], order.get(r["candidate"], len(order))))
    files = [write_csv(out / "results.csv", rows, COLUMNS)]
    cells = cells_of(rows)
    present = {r["candidate"] for r in rows}
    # every candidate that runs on every base seed (not the re-warmed ones): the rankings
    ranked = [c.name for c in cands if c.group != "schedule" and c.name in present]
    grown = [s for s in ranked if s != SMALL_EQUAL_COMPUTE]
    plots = _plots(out, p, [r for r in rows if r["candidate"] in ranked], ranked)
    files += plots
    seeds = sorted({c[0] for c in cells})
    sweep = [sd for sd in seeds if p.sweeps(sd)]
    regimes = regimes_of(p, rows)
    found = stats.holm_adjust(findings(rows, p, cells))

    L = [f"# Warmstart study, preset `{p.name}`", "",
         f"Which warm start to continue from after width growth, following {PAPER}. "
         f"Protocol, metric and statistics definitions: [docs/studies.md](../../docs/studies.md).", "",
         "## Preset", ""]
    L += [f"- {line}" for line in p.describe()]
    L.append(f"- data: TinyStories, {meta['train_tokens']:,} train / {meta['valid_tokens']:,} validation "
             f"tokens (byte-level BPE, vocab {meta['vocab_size']}; cache key {meta['corpus_key']})")
    if p.name == "smoke":
        L.append(f"- {SMOKE_NOTE}")
    L += ["", "## Run", ""] + run_lines(meta, len(rows))
    L += ["", f"The unit of replication is the base seed: the {len(p.checkpoints)} checkpoint(s) of a seed come "
          f"from one base run. Every number below is a mean over seeds with its 95% confidence interval in "
          f"brackets (Student t over seeds, n - 1 degrees of freedom; differences paired within each cell), "
          f"at each checkpoint and pooled over the checkpoints (each seed's checkpoints averaged first) as a "
          f"summary: n = {len(seeds)} seeds ({len(cells)} cells)"
          + (f", {len(sweep)} for the re-warm table" if len(sweep) != len(seeds) else "")
          + f". Val losses within {TIE_TOL:g} nats are ties (float noise at this size): they share a rank, tie "
          f"in every Spearman, and a loss difference within the tolerance is never agree or disagree. "
          f"Intervals of bounded quantities (a Spearman in [-1, 1], a difference of two in [-2, 2]) are "
          f"clipped to their range (a t interval can leave it; a clip never moves it across 0). Where every "
          f"seed gives the same value the t interval is a point, so the sign test's takes its place (p = "
          f"2^(1-n): no verdict from 2 seeds). Each finding also counts the cells on its side (descriptive "
          f"only).", ""]

    L += ["## Findings", "",
          f"Each claim of the paper per regime, at each checkpoint and pooled over the checkpoints (the "
          f"summary). The comparator of each \"ranks first\" and \"wins\" claim was fixed before any run, "
          f"not chosen as the best other candidate of the same data: the paper's two constructions against "
          f"each other, exact_copy against structured and structured against exact_copy. perturb (noise "
          f"0.01) is exact_copy to within {TIE_TOL:g} nats by construction (antithetic noise keeps the "
          f"clones' sums) and is reported as tied with it (Rankings), not ranked. The bold verdict is the "
          f"finding's own 95% interval's; \"Holm\" is the verdict after Holm's step-down adjustment across "
          f"all {len(found)} findings of this report (family-wise error 5%; p: the smallest 1 - level whose "
          f"t interval excludes 0).", ""]
    L += findings_lines(found, p, rows, cells)
    L += ["agree: the interval lies on the paper's side; disagree: on the other side; inconclusive: "
          "it covers the boundary (or, for a loss difference, reaches within the tie tolerance of it).", ""]

    L += ["## Rankings", "",
          f"Every candidate run on every base seed, per regime, at each checkpoint and pooled. Ranked by the "
          f"final loss after {p.continuation} steps and by the AUC (mean val loss over the continuation); "
          f"candidates within {TIE_TOL:g} nats share a rank (\"2=\"). `minus {REFERENCE}` is the paired "
          f"difference of the final loss to {REFERENCE} (the fixed reference; \"(tie)\": within the "
          f"tolerance). `{SMALL_EQUAL_COMPUTE}`: the base model continued ungrown for the same FLOPs as a "
          f"grown candidate's continuation (its probe at the probe lag's compute; growth metrics do not "
          f"apply). pres_kl, escape0, the update escape and the relative update RMS are means over cells.", ""]
    for regime in regimes:
        here = [s for s in ranked if any(r["candidate"] == s and r["regime"] == regime for r in rows)]
        for label, cs in scopes(cells):
            fin = ranking(rows, regime, here, "final_loss", cs)
            auc_rank = {s: rk for s, _, rk in ranking(rows, regime, here, "auc", cs)}
            ref = per_cell(rows, regime, REFERENCE, "final_loss", cs)
            table = []
            for s, _, rk in fin:
                col = lambda c: per_cell(rows, regime, s, c, cs)  # noqa: E731
                gap = "-" if s == REFERENCE or np.isnan(ref).all() else _gap_text(*diff_ci(col("final_loss"), ref, cs))
                table.append([s, rk, ci_text(*mean_ci(col("final_loss"), cs)), gap, auc_rank.get(s, "-"),
                              ci_text(*mean_ci(col("auc"), cs)), ci_text(*mean_ci(col("probe_loss"), cs)),
                              _col_text(col("pres_kl")), _col_text(col("escape0")), _col_text(col("probe_escape")),
                              _col_text(col("probe_rms"))])
            L += [f"### {regime} regime, {label}", "",
                  md_table(["candidate", "rank (final)", "final_loss", f"minus {REFERENCE}", "rank (AUC)", "auc",
                            f"probe_loss @{p.probe_lag}", "pres_kl", "escape0", f"update escape @{p.probe_lag}",
                            f"rel. update RMS @{p.probe_lag}"], table), ""]
        ties = []
        for s in here:
            if s == REFERENCE:
                continue
            d = per_cell(rows, regime, s, "final_loss", cells) - per_cell(rows, regime, REFERENCE, "final_loss", cells)
            d = d[~np.isnan(d)]
            if d.size and np.abs(d).max() <= TIE_TOL:
                ties.append(f"{s} (largest |difference| in a cell {fmt_sig(float(np.abs(d).max()))} nats)")
        if ties:
            L += [f"Within {TIE_TOL:g} nats of {REFERENCE} in the final loss in every cell, {regime}: "
                  f"{', '.join(ties)}: tied, not ranked.", ""]

    if {"structured", "structured_mapped", "exact_copy"} <= present:
        L += ["## Where structured's advantage comes from", "",
              "structured differs from exact_copy in its weights (new units orthogonal to the old ones, zero "
              "fan-out, instead of clones) and in its moments (zero for the new units, the old units' kept, "
              "instead of the clone map's moment rule). structured_mapped has structured's weights and "
              "exact_copy's moments: if it matches structured, the weights make the difference; if it matches "
              "exact_copy, the zero moments do. Final loss, paired differences within each cell (negative: the "
              "first is better).", ""]
        table = []
        for regime in [r for r in regimes if any(x["candidate"] == "structured_mapped" and x["regime"] == r
                                                  for x in rows)]:
            for label, cs in scopes(cells):
                col = lambda s: per_cell(rows, regime, s, "final_loss", cs)  # noqa: E731
                table.append([regime, _short(label), _gap_text(*diff_ci(col("structured"), col("exact_copy"), cs)),
                              _gap_text(*diff_ci(col("structured_mapped"), col("exact_copy"), cs)),
                              _gap_text(*diff_ci(col("structured"), col("structured_mapped"), cs))])
        L += [md_table(["regime", "checkpoint", "structured - exact_copy", "structured_mapped - exact_copy",
                        "structured - structured_mapped"], table), ""]

    sched = [c for c in cands if c.group == "schedule" and c.name in present]
    if sched:
        sweep_cells = [c for c in cells if p.sweeps(c[0])]
        L += ["## Continue vs re-warm", "",
              f"The same grown model continued on the base run's {p.schedule} schedule, or with the "
              f"schedule re-warmed linearly over {p.rewarm_steps} steps: re-warmed minus continued, paired "
              f"within each cell, over the {len(sweep)} sweep seed(s) (negative: re-warming helps).", ""]
        table = []
        for regime in regimes:
            for c in sched:
                if not any(r["candidate"] == c.name and r["regime"] == regime for r in rows):
                    continue
                for label, cs in scopes(sweep_cells):
                    d = [_gap_text(*diff_ci(per_cell(rows, regime, c.name, k, cs),
                                            per_cell(rows, regime, c.strategy, k, cs), cs))
                         for k in ("final_loss", "auc")]
                    table.append([regime, c.strategy, _short(label), *d])
        L += [md_table(["regime", "strategy", "checkpoint", "final_loss, rewarm - continue",
                        "auc, rewarm - continue"], table), ""]

    noisy = [c for c in cands if c.strategy in ("perturb", "perturb_np") and c.group in ("main", "noise")
             and c.name in present]
    if noisy and "exact_copy" in present:
        L += ["## Noise scale of perturb", "",
              "perturb adds relative noise of the given scale to the clones, antithetic (function preserving) "
              "or not (perturb_np); final loss minus exact_copy's (the same clones without noise), paired "
              "within each cell, at each checkpoint and pooled.", ""]
        table = []
        labels = [label for label, _ in scopes(cells)]
        for regime in regimes:
            for c in noisy:
                col = lambda k: per_cell(rows, regime, c.name, k, cells)  # noqa: E731
                if np.isnan(col("final_loss")).all():
                    continue
                gaps = [_gap_text(*diff_ci(per_cell(rows, regime, c.name, "final_loss", cs),
                                           per_cell(rows, regime, "exact_copy", "final_loss", cs), cs))
                        for _, cs in scopes(cells)]
                table.append([regime, c.strategy, f"{dict(c.options).get('noise', 0.01):g}", *gaps,
                              _col_text(col("pres_kl")), _col_text(col("escape0")), _col_text(col("probe_escape"))])
        L += [md_table(["regime", "strategy", "noise", *[f"minus exact_copy, {_short(lb)}" for lb in labels], "pres_kl",
                        "escape0", f"update escape @{p.probe_lag}"], table), ""]

    four = [s for s in PAPER_FAMILIES if s in present]
    L += ["## Selectors", "",
          "Spearman rank correlation of each selector with the final loss (and the AUC): within each cell "
          "(base model x checkpoint; the mean over cells with its t CI over seeds, pooled over checkpoints and "
          "at each) and pooled over all cells, for the paper's four families "
          f"({', '.join(four)}) and for every grown candidate run on every seed. Positive: a larger selector "
          f"value goes with a worse loss. Loss columns tie within {TIE_TOL:g} nats. `pres_kl` below "
          f"{SELECTOR_FLOORS['pres_kl']:g} and `pres_dloss` below {SELECTOR_FLOORS['pres_dloss']:g} in "
          "magnitude (float32 rounding of an exactly preserved function) read 0: candidates that all "
          "preserve exactly tie, and a selector tied in every cell ranks nothing.", ""]
    ckpt_scopes = [(label, cs) for label, cs in scopes(cells) if label != "pooled"]
    for regime in regimes:
        table = []
        for target in ("final_loss", "auc"):
            t4, ta = selector_table(rows, regime, four, target), selector_table(rows, regime, grown, target)
            for sel in SELECTORS:
                within4, pooled4 = rho_text(t4[sel], cells)
                at = [rho_text(t4[sel], cs)[0] for _, cs in ckpt_scopes] if len(ckpt_scopes) > 1 else []
                table.append([target, sel, within4, *at, pooled4, *rho_text(ta[sel], cells)])
        at_heads = [f"within, four, {label}" for label, _ in ckpt_scopes] if len(ckpt_scopes) > 1 else []
        L += [f"### {regime} regime", "",
              md_table(["target", "selector", "within, four families", *at_heads, "pooled, four",
                        "within, all grown", "pooled, all grown"], table), ""]

    L += plots_section(plots, "`curves_<regime>.png`: val loss after growth per candidate (mean over "
                       "seeds; the dotted line marks the probe lag, the dashed one the base model; candidates "
                       "off the zoomed scale are named in the panel; small_equal_compute is drawn at the grown "
                       "candidates' compute), and below it each candidate's gap to the best one at that step "
                       "(symlog); the legend names curves that coincide with another within 1e-4 nats. "
                       "`selectors.png`: each selector against the final loss, per regime.")
    L += ["", f"Rows: `results.csv` ({len(rows)} rows: candidate x regime x base model x checkpoint); each "
          f"run's curve and config: `runs/<key>.json`."]
    files.append(write_text(out / "report.md", "\n".join(L) + "\n"))
    return files
