"""The warmstart study's report: rankings with confidence intervals per regime, the
schedule and noise comparisons, selector correlations within cells and pooled, and one
verdict per paper finding; results.csv and the plots."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import stats
from ..presets import SMOKE_NOTE
from ..progress import fmt_seconds
from ..render import fmt, fmt_sig, md_table, mean, plots_section, pyplot, save_figure, write_csv, write_text
from .design import COLUMNS, PAPER_FAMILIES, SELECTORS, candidates

PAPER = "Preservation Is Not Enough for Width Growth (arXiv 2604.04281)"
LOG_SELECTORS = ("pres_kl", "escape0", "probe_escape")  # >= 0, spanning many decades (0 drawn at 1e-16)
SAME_TOL = 1e-4  # nats: mean curves this close at every eval step are named as coinciding in the legend
# Step-0 preservation by an exactly preserving strategy is float32 rounding (KL ~1e-13,
# loss change ~1e-7): below these floors a selector reads 0, so such candidates tie
# instead of being ranked by rounding noise (perturb_np at noise 1e-3 is at KL ~3e-6).
SELECTOR_FLOORS = {"pres_kl": 1e-9, "pres_dloss": 1e-6}
CELL = ("base_seed", "checkpoint")  # a base model's checkpoint: the unit every candidate shares
# The unit of replication is the base seed: the checkpoints of one seed come from one base
# run and are not independent draws, so a per-cell quantity is averaged over the seed's
# checkpoints first and the CI is taken over seeds (the growth-factor study does the same).


def cells_of(rows) -> list[tuple]:
    return sorted({tuple(r[k] for k in CELL) for r in rows})


def per_cell(rows, regime: str, candidate: str, column: str, cells) -> np.ndarray:
    """column of `candidate` in each cell (nan where missing), in the order of `cells`."""
    got = {tuple(r[k] for k in CELL): r[column] for r in rows
           if r["regime"] == regime and r["candidate"] == candidate}
    return np.array([np.nan if got.get(c) is None else float(got[c]) for c in cells])


def per_seed(x, cells) -> np.ndarray:
    """A per-cell array averaged over each base seed's checkpoints (cells without a value
    left out; seeds with none dropped), in seed order."""
    x = np.asarray(x, dtype=float)
    seeds = sorted({c[0] for c in cells})
    vals = [[v for c, v in zip(cells, x) if c[0] == s and not np.isnan(v)] for s in seeds]
    return np.array([np.mean(v) for v in vals if v])


def mean_ci(x, cells) -> tuple[float, float, float]:
    """Mean over seeds of a per-cell array and its 95% Student t CI over seeds (bootstrap
    percentiles cannot cover at n <= 5); no CI from one seed."""
    x = per_seed(x, cells)
    return stats.bootstrap_ci(x, method="t") if x.size else (math.nan, math.nan, math.nan)


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
    return [{**r, **{k: 0.0 for k, f in SELECTOR_FLOORS.items() if k in r and abs(float(r[k])) < f}}
            for r in rows]


def within_ci(ws, cells) -> tuple[float, float, float]:
    """The mean within-cell Spearman of a stats.WithinSpearman, with its t CI over seeds
    (clipped to [-1, 1], where a mean of correlations lives)."""
    est, lo, hi = mean_ci([ws.cells.get(c, math.nan) for c in cells], cells)
    return est, max(lo, -1.0), min(hi, 1.0)


def ci_text(est, lo, hi, digits=4) -> str:
    if math.isnan(lo):
        return fmt(est, digits)
    return f"{fmt(est, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def ranking(rows, regime: str, names, column: str) -> list[tuple[str, float]]:
    """(candidate, mean of column over cells), best (lowest) first."""
    means = [(s, mean(r[column] for r in rows if r["regime"] == regime and r["candidate"] == s)) for s in names]
    return sorted((t for t in means if not math.isnan(t[1])), key=lambda t: t[1])


def best_other(rows, regime, names, column, than: str) -> str:
    return next(s for s, _ in ranking(rows, regime, names, column) if s != than)


def lead(rows, regime, names, column, who: str, cells) -> tuple[np.ndarray, str]:
    """who's column minus that of the best other candidate (by mean), per cell (< 0: who
    ranks first), and that candidate."""
    other = best_other(rows, regime, names, column, who)
    d = per_cell(rows, regime, who, column, cells) - per_cell(rows, regime, other, column, cells)
    return d, other


def selector_table(rows, regime, names, target: str):
    """selector -> WithinSpearman of selector vs target over `names` (cells: base model x checkpoint)."""
    sub = floored([r for r in rows if r["regime"] == regime and r["candidate"] in names])
    return {sel: stats.spearman_within(sub, CELL, sel, target, n_boot=2000) for sel in SELECTORS}


def rho_text(ws, cells) -> tuple[str, str]:
    """(within, pooled) cells of the selector table; 'tied' where the selector gives every
    candidate the same value (no ranking at all)."""
    if ws.n_cells == 0 and ws.n_skipped:
        return "tied in every cell", "tied" if math.isnan(ws.pooled) else fmt(ws.pooled, 2)
    return ci_text(*within_ci(ws, cells), 2), fmt(ws.pooled, 2)


def findings(rows, p, cells) -> list[stats.Finding]:
    main = [c.name for c in candidates(p) if c.group == "main"]
    regimes = [r for r in ("deterministic", "stochastic") if r in p.regimes]
    out = []
    lag, end = p.probe_lag, p.continuation

    def finding(claim, paper, per_cell_values, test):
        est, lo, hi = mean_ci(per_cell_values, cells)
        return stats.Finding(claim, paper, est, lo, hi, n_seeds(per_cell_values, cells), test,
                             detail=cell_signs(per_cell_values, test))

    if "exact_copy" in main:
        for regime in regimes:
            d, other = lead(rows, regime, main, "probe_loss", "exact_copy", cells)
            out.append(finding(f"{lag}-step probe loss, exact_copy - {other} (best other), {regime}",
                               f"exact copy ranks first in every {lag}-step probe", d, "< 0"))
        if "stochastic" in regimes:
            d, other = lead(rows, "stochastic", main, "final_loss", "exact_copy", cells)
            out.append(finding(f"final loss after {end} steps, exact_copy - {other} (best other), stochastic",
                               "exact copy ranks first in stochastic continuation", d, "< 0"))
    if "structured" in main and "deterministic" in regimes:
        d, other = lead(rows, "deterministic", main, "final_loss", "structured", cells)
        out.append(finding(f"final loss after {end} steps, structured - {other} (best other), deterministic",
                           "the structured non-clone start wins deterministic continuation", d, "< 0"))
    pool = [s for s in main if s in PAPER_FAMILIES]
    for regime in regimes:
        by_cell: dict = {}
        for r in floored([r for r in rows if r["regime"] == regime and r["candidate"] in pool]):
            by_cell.setdefault(tuple(r[k] for k in CELL), []).append(r)

        def probe_minus_pres(rs) -> float:
            if len(rs) < 2:
                return math.nan
            final = [r["final_loss"] for r in rs]
            pres = [r["pres_kl"] for r in rs]
            # a pres_kl that ties every candidate (all exactly preserving) selects nothing:
            # rho 0, not undefined
            rho_pres = 0.0 if len(set(pres)) == 1 else stats.spearman(pres, final)
            return stats.spearman([r["probe_loss"] for r in rs], final) - rho_pres

        d = np.array([probe_minus_pres(by_cell.get(c, [])) for c in cells])
        out.append(finding(
            f"Spearman with final loss within a cell, probe_loss minus pres_kl (0 where pres_kl ties every "
            f"candidate), paper's four families, {regime}",
            "step-0 preservation is not a universal selector (a short probe selects better)", d, "> 0"))
    return out


def _mean_curves(rows, regime, checkpoints, strategies) -> dict:
    """(checkpoint, strategy) -> (steps, val loss averaged over seeds)."""
    means = {}
    for step in checkpoints:
        for s in strategies:
            curves = [r["curve"] for r in rows if r["regime"] == regime and r["checkpoint"] == step
                      and r["strategy"] == s]
            if curves:
                xs = [x for x, _ in curves[0]]
                means[(step, s)] = (xs, [mean(c[i][1] for c in curves) for i in range(len(xs))])
    return means


def _same_as(means, strategies, s):
    """The first earlier strategy whose curves are within SAME_TOL of s's at every eval step
    of every checkpoint (it would hide s's curve), or None."""
    for t in strategies[:strategies.index(s)]:
        pairs = [(ys, means[(step, t)][1]) for (step, u), (_, ys) in means.items() if u == s and (step, t) in means]
        if pairs and all(abs(a - b) <= SAME_TOL for ys, zs in pairs for a, b in zip(ys, zs)):
            return t
    return None


def _plots(out: Path, p, rows) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    files = []
    # a distinct (color, line style, marker) per strategy; markers on every 4th eval step,
    # staggered, so up to four coinciding curves all stay visible
    styles = {s: dict(color=plt.get_cmap("tab10")(i % 10), ls=("-", "--", "-.", ":")[i % 4],
                      marker="osD^vPX*"[i % 8], markevery=(i % 4, 4), ms=4, lw=1.2)
              for i, s in enumerate(p.strategies)}
    colors = {s: st["color"] for s, st in styles.items()}
    for regime in p.regimes:
        means = _mean_curves(rows, regime, p.checkpoints, p.strategies)
        labels = {s: s if (t := _same_as(means, p.strategies, s)) is None else f"{s} (= {t} within {SAME_TOL:.0e} nats)"
                  for s in p.strategies}
        fig, axes = plt.subplots(2, len(p.checkpoints), figsize=(5.5 * len(p.checkpoints), 7.5), sharex="col",
                                 squeeze=False)
        handles = {}
        for ax, gap, step in zip(axes[0], axes[1], p.checkpoints):
            here = [s for s in p.strategies if (step, s) in means]
            if not here:
                continue
            best = [min(ys) for ys in zip(*(means[(step, s)][1] for s in here))]
            for s in here:
                xs, ys = means[(step, s)]
                handles[labels[s]], = ax.plot(xs, ys, **styles[s])
                gap.plot(xs, [y - b for y, b in zip(ys, best)], **styles[s])
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
            gap.set_xlabel("steps after growth")
            gap.set_ylabel("gap to the best candidate at that step\n(nats, symlog)")
        fig.suptitle(f"warmstart ({p.name}): val loss after growth, mean over seeds")
        fig.tight_layout()
        fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        files.append(save_figure(plt, fig, out / f"curves_{regime}.png"))

    fig, axes = plt.subplots(len(p.regimes), len(SELECTORS), figsize=(3.3 * len(SELECTORS), 3.2 * len(p.regimes)),
                             squeeze=False)
    for i, regime in enumerate(p.regimes):
        sub = floored([r for r in rows if r["regime"] == regime])
        rho = {sel: stats.spearman([r[sel] for r in sub], [r["final_loss"] for r in sub]) for sel in SELECTORS}
        for j, sel in enumerate(SELECTORS):
            ax = axes[i][j]
            for s in p.strategies:
                pts = [(r[sel], r["final_loss"]) for r in sub if r["strategy"] == s]
                if sel in LOG_SELECTORS:
                    pts = [(max(x, 1e-16), y) for x, y in pts]
                ax.scatter([x for x, _ in pts], [y for _, y in pts], s=14, color=colors[s], label=s)
            if sel in LOG_SELECTORS:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_title(f"{regime}: {sel}\nSpearman {fmt(rho[sel], 2)}", fontsize=9)
            ax.set_xlabel(sel, fontsize=8)
            if j == 0:
                ax.set_ylabel("final_loss")
            ax.tick_params(labelsize=7)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    files.append(save_figure(plt, fig, out / "selectors.png"))
    return files


def write_report(out: Path, p, rows, meta: dict) -> list[Path]:
    cands = candidates(p)
    order = {c.name: i for i, c in enumerate(cands)}
    rows = sorted(rows, key=lambda r: (p.regimes.index(r["regime"]), r["base_seed"], r["checkpoint"],
                                       order.get(r["candidate"], len(order))))
    files = [write_csv(out / "results.csv", rows, COLUMNS)]
    cells = cells_of(rows)
    main = [c.name for c in cands if c.group == "main"]
    plots = _plots(out, p, [r for r in rows if r["group"] == "main"])
    files += plots
    n = len(cells)
    seeds = sorted({c[0] for c in cells})
    sweep = [sd for sd in seeds if p.sweeps(sd)]

    L = [f"# Warmstart study, preset `{p.name}`", "",
         f"Which warm start to continue from after width growth, following {PAPER}. "
         f"Protocol, metric and statistics definitions: [docs/studies.md](../../docs/studies.md).", "",
         "## Preset", ""]
    L += [f"- {line}" for line in p.describe()]
    L.append(f"- data: TinyStories, {meta['train_tokens']:,} train / {meta['valid_tokens']:,} validation "
             f"tokens (byte-level BPE, vocab {meta['vocab_size']}; cache key {meta['corpus_key']})")
    if p.name == "smoke":
        L.append(f"- {SMOKE_NOTE}")
    L += ["", "## Run", "",
          f"- command: `{meta['command']}`",
          f"- wall time of this invocation: {fmt_seconds(meta['wall_seconds'])} "
          f"({meta['computed']} continuations computed, {meta['cached']} read from the cache, "
          f"{meta.get('workers', 1)} worker process(es)); compute time of all {len(rows)} continuations: "
          f"{fmt_seconds(meta['compute_seconds'])}",
          f"- device: {meta['device']}, torch threads per process: {meta['threads'] or 'default'}", "",
          f"The unit of replication is the base seed: the {len(p.checkpoints)} checkpoint(s) of a seed come "
          f"from one base run, so each quantity is averaged over a seed's checkpoints first. Every number "
          f"below is a mean over seeds with its 95% confidence interval in brackets (Student t over seeds, "
          f"n - 1 degrees of freedom; differences paired within each cell): n = {len(seeds)} seeds "
          f"({n} cells) for the main candidates"
          + (f", {len(sweep)} for the re-warm and noise tables" if len(sweep) != len(seeds) else "")
          + ". Read a difference whose interval covers 0 as no difference. Each finding also counts the "
          "cells on its side (descriptive only).", ""]

    L += ["## Findings", ""]
    L += [f.markdown() for f in findings(rows, p, cells)]
    L += ["", "agree: the interval lies on the paper's side; disagree: on the other side; inconclusive: "
          "it covers the boundary.", ""]

    L += ["## Rankings", "",
          f"Main candidates (each strategy with its default options; szp and scratch restart the "
          f"schedule, the others continue it). Rank by the final loss after {p.continuation} steps and "
          f"by the AUC (mean val loss over the continuation); `gap` is the paired difference of the "
          f"final loss to the best candidate.", ""]
    for regime in p.regimes:
        fin = ranking(rows, regime, main, "final_loss")
        auc_rank = [s for s, _ in ranking(rows, regime, main, "auc")]
        best = fin[0][0]
        table = []
        for i, (s, _) in enumerate(fin):
            col = lambda c: per_cell(rows, regime, s, c, cells)  # noqa: E731
            gap = (diff_ci(col("final_loss"), per_cell(rows, regime, best, "final_loss", cells), cells)
                   if s != best else None)
            table.append([s, i + 1, ci_text(*mean_ci(col("final_loss"), cells)),
                          "-" if gap is None else ci_text(*gap), auc_rank.index(s) + 1,
                          ci_text(*mean_ci(col("auc"), cells)), ci_text(*mean_ci(col("probe_loss"), cells)),
                          fmt_sig(np.nanmean(col("pres_kl"))),
                          fmt_sig(np.nanmean(col("escape0"))), fmt_sig(np.nanmean(col("probe_escape"))),
                          fmt_sig(np.nanmean(col("probe_rms")))])
        L += [f"### {regime} regime", "",
              md_table(["candidate", "rank (final)", "final_loss", "gap to best", "rank (AUC)", "auc",
                        f"probe_loss @{p.probe_lag}", "pres_kl", "escape0", f"update escape @{p.probe_lag}",
                        f"rel. update RMS @{p.probe_lag}"], table), ""]

    sched = [c for c in cands if c.group == "schedule"]
    if sched:
        L += ["## Continue vs re-warm", "",
              f"The same grown model continued on the base run's {p.schedule} schedule, or with the "
              f"schedule re-warmed linearly over {p.rewarm_steps} steps: re-warmed minus continued, paired "
              f"within each cell, over the {len(sweep)} sweep seed(s) (negative: re-warming helps).", ""]
        table = []
        for regime in p.regimes:
            for c in sched:
                d_f = diff_ci(per_cell(rows, regime, c.name, "final_loss", cells),
                              per_cell(rows, regime, c.strategy, "final_loss", cells), cells)
                d_a = diff_ci(per_cell(rows, regime, c.name, "auc", cells),
                              per_cell(rows, regime, c.strategy, "auc", cells), cells)
                table.append([regime, c.strategy, ci_text(*d_f), ci_text(*d_a)])
        L += [md_table(["regime", "strategy", "final_loss, rewarm - continue", "auc, rewarm - continue"],
                       table), ""]

    noise = sorted({r["noise"] for r in rows if r["strategy"] in ("perturb", "perturb_np") and r["noise"]} |
                   {0.01})
    if any(c.group == "noise" for c in cands) and "exact_copy" in main:
        L += ["## Noise scale of perturb", "",
              "Deterministic regime. perturb adds relative noise of the given scale to the clones, "
              "antithetic (function preserving) or not; differences to exact_copy (the same clones "
              f"without noise), paired within each cell; every row over the {len(sweep)} sweep seed(s), "
              f"the 0.01 rows (the main candidates) included, so the rows compare.", ""]
        table = []
        sweep_cells = [c for c in cells if p.sweeps(c[0])]
        ref = per_cell(rows, "deterministic", "exact_copy", "final_loss", sweep_cells)
        for s in ("perturb", "perturb_np"):
            for nz in noise:
                name = s if nz == 0.01 else f"{s}@{nz:g}"
                col = lambda c: per_cell(rows, "deterministic", name, c, sweep_cells)  # noqa: E731
                if np.isnan(col("final_loss")).all():
                    continue
                table.append([s, nz, ci_text(*mean_ci(col("final_loss"), sweep_cells)),
                              ci_text(*diff_ci(col("final_loss"), ref, sweep_cells)), fmt_sig(np.nanmean(col("pres_kl"))),
                              fmt_sig(np.nanmean(col("escape0"))), fmt_sig(np.nanmean(col("probe_escape")))])
        L += [md_table(["strategy", "noise", "final_loss", "minus exact_copy", "pres_kl", "escape0",
                        f"update escape @{p.probe_lag}"], table), ""]

    L += ["## Selectors", "",
          "Spearman rank correlation of each selector with the final loss (and the AUC) over the main "
          "candidates: within each cell (base model x checkpoint; the mean over cells with its t "
          "CI over seeds) and pooled over all cells, for the paper's four families "
          f"({', '.join(s for s in main if s in PAPER_FAMILIES)}) and for all main candidates. Positive: "
          "a larger selector value goes with a worse loss. The paper's pool has only the four families; "
          "szp and scratch, far worse than the rest, make pooled correlations easy. `pres_kl` below "
          f"{SELECTOR_FLOORS['pres_kl']:g} and `pres_dloss` below {SELECTOR_FLOORS['pres_dloss']:g} in "
          "magnitude (float32 rounding of an exactly preserved function) read 0: candidates that all "
          "preserve exactly tie, and a selector tied in every cell ranks nothing.", ""]
    for regime in p.regimes:
        table = []
        four = [s for s in main if s in PAPER_FAMILIES]
        for target in ("final_loss", "auc"):
            t4, ta = selector_table(rows, regime, four, target), selector_table(rows, regime, main, target)
            for sel in SELECTORS:
                table.append([target, sel, *rho_text(t4[sel], cells), *rho_text(ta[sel], cells)])
        L += [f"### {regime} regime", "",
              md_table(["target", "selector", "within, four families", "pooled, four", "within, all main",
                        "pooled, all"], table), ""]

    L += plots_section(plots, "`curves_<regime>.png`: val loss after growth per main candidate (mean over "
                       "cells; the dotted line marks the probe lag, the dashed one the base model; candidates "
                       "off the zoomed scale are named in the panel), and below it each candidate's gap to the "
                       "best one at that step (symlog); the legend names curves that coincide with another "
                       "within 1e-4 nats. `selectors.png`: each selector against the final loss, per regime.")
    L += ["", f"Rows: `results.csv` ({len(rows)} rows: candidate x regime x base model x checkpoint); each "
          f"run's curve and config: `runs/<key>.json`."]
    files.append(write_text(out / "report.md", "\n".join(L) + "\n"))
    return files
