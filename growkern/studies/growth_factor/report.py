"""The growth-factor study's report: the speedup over (g, r) as a mean over seeds with its
CI, g as width and parameter ratio, the epochs of data each budget's runs see (budgets
that repeat the training text more than the preset's max_epochs are marked and left out
of the verdicts), szp against the comparison operators, the reliability of each g, the
Holm-adjusted verdicts on the paper's findings, the largest g that pays off per budget,
losses, results.csv, summary.csv, scratch_curve.csv and plots."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import stats
from ..presets import SMOKE_NOTE, fmt_factor as fg
from ..progress import fmt_seconds
from ..render import fmt, md_table, plots_section, pyplot, save_figure, write_csv, write_text
from .design import COLUMNS, best_so_far

PAPER = "When is Warmstarting Effective for Scaling Language Models? (arXiv 2605.13405)"
SUMMARY_COLUMNS = ("strategy", "factor", "param_ratio", "budget", "n_seeds", "speedup_mean", "speedup_lo",
                   "speedup_hi", "ci_method", "lower_bounds", "speedups", "final_loss_mean", "best_loss_mean",
                   "epochs", "repeats")
CI_METHOD = "t"  # Student t over seeds: at n = 2..5 no bootstrap CI can reach 95% (stats.coverage_ceiling)
# The comparators, fixed before any run: the paper's reference factor, tested against the
# largest factor (upper bound, "more than the best pays less") and against every other
# factor (reliability); the preset's strategy against each of its compare_strategies.
REFERENCE_FACTOR = 2
ALPHA = 0.05  # family-wise error rate of Holm's adjustment over a report's findings


def interpolate(xs, ys, x):
    """Linear interpolation of a curve at x (None outside it)."""
    for i in range(1, len(xs)):
        if xs[i - 1] <= x <= xs[i]:
            if xs[i] == xs[i - 1]:
                return ys[i]
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return None


def mean_ci(values, level: float = 0.95):
    """(mean, lo, hi) over seeds: the Student t interval (no CI from one seed)."""
    return stats.bootstrap_ci(values, np.mean, level=level, method=CI_METHOD)


def seed_interval(values, level: float = 0.95, bounds=(-math.inf, math.inf)):
    """(mean, lo, hi) of per-seed values at `level`: the t interval over seeds, clipped to
    the quantity's range `bounds` (a share difference lies in [-1, 1]). When every seed
    gives the same value (a share of a few budgets often does) the t interval is a point
    whatever n, but all n seeds land on one side of the true mean by chance with
    probability 2^(1-n) (the sign test): the point stands for levels up to 1 - 2^(1-n)
    only, above it the whole range (no 95% verdict from 5 such seeds, p = 0.0625)."""
    v = np.asarray(values, dtype=float)
    if v.size > 1 and np.ptp(v) == 0:
        x = float(v[0])
        return (x, x, x) if level <= 1 - 2.0 ** (1 - v.size) else (x, *bounds)
    est, lo, hi = mean_ci(v, level) if v.size else (math.nan, math.nan, math.nan)
    return est, max(lo, bounds[0]), min(hi, bounds[1])


def _strategy(x, default=None):
    """A row's strategy (synthetic rows without one belong to `default`)."""
    return x.get("strategy", default)


def _strategies(rows) -> list:
    """The strategies of the rows in order of appearance ([None] for rows without one)."""
    return list(dict.fromkeys(_strategy(x) for x in rows)) or [None]


def summarize(rows, factors, budgets, strategies=None) -> list[dict]:
    """One row per (strategy, g, r): the speedup's mean over seeds with its 95% t interval,
    and the most epochs of data any of the cell's runs saw."""
    out = []
    for strat in strategies or _strategies(rows):
        for g in factors:
            for r in budgets:
                sub = sorted((x for x in rows if _strategy(x) == strat and x["factor"] == g and x["budget"] == r),
                             key=lambda x: x["seed"])
                if not sub:
                    continue
                m, lo, hi = mean_ci([x["speedup"] for x in sub])
                most = max(x.get("epochs", 0.0) for x in sub)
                out.append({"strategy": strat or "", "factor": g, "param_ratio": sub[0]["param_ratio"], "budget": r,
                            "n_seeds": len(sub), "speedup_mean": m, "speedup_lo": lo, "speedup_hi": hi,
                            "ci_method": CI_METHOD, "lower_bounds": sum(not x["speedup_exact"] for x in sub),
                            "speedups": " ".join(x["speedup_text"] for x in sub),
                            "final_loss_mean": float(np.mean([x["final_loss"] for x in sub])),
                            "best_loss_mean": float(np.mean([x.get("best_loss", x["final_loss"]) for x in sub])),
                            "epochs": most, "repeats": any(x.get("repeats", False) for x in sub)})
    return out


def ci_text(m, lo, hi, digits: int = 2) -> str:
    if any(isinstance(v, float) and math.isnan(v) for v in (lo, hi)):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def repetition(rows, budgets, max_epochs: float) -> dict:
    """budget -> the epochs of training text its runs saw: the small models' and the grown
    runs' (small model + continuation: the grown model continues its small model's data
    stream) per g, scratch's up to where the budget's speedups are read (the most over its
    cells), the most of any run, and whether that is more than max_epochs."""
    out = {}
    for r in budgets:
        sub = [x for x in rows if x["budget"] == r]
        if not sub:
            continue
        factors = sorted({x["factor"] for x in sub})
        most = max(x.get("epochs", 0.0) for x in sub)
        out[r] = {"small": {g: max(x.get("small_epochs", 0.0) for x in sub if x["factor"] == g) for g in factors},
                  "grown": {g: max(x.get("grown_epochs", 0.0) for x in sub if x["factor"] == g) for g in factors},
                  "scratch": max(x.get("scratch_epochs", 0.0) for x in sub), "epochs": most,
                  "repeats": most > max_epochs}
    return out


def verdict_budgets(rows, budgets, max_epochs: float) -> tuple:
    """The budgets the verdicts rest on: those whose runs all see the text <= max_epochs times."""
    rep = repetition(rows, budgets, max_epochs)
    return tuple(r for r in budgets if r in rep and not rep[r]["repeats"])


def reliability(rows, factors, budgets, seeds, strategy=None) -> dict:
    """g -> how reliably growing by g pays over `budgets`: "above" of "cells" (budget, seed)
    cells with speedup > 1 (a lower bound counts only when it is itself > 1), and "worst"
    = (budget, mean speedup over seeds) at the budget where the mean is lowest."""
    out = {}
    for g in factors:
        sub = [x for x in rows if _strategy(x, strategy) == strategy and x["factor"] == g and x["budget"] in budgets
               and x["seed"] in seeds]
        if not sub:
            continue
        means = {r: float(np.mean([x["speedup"] for x in sub if x["budget"] == r]))
                 for r in budgets if any(x["budget"] == r for x in sub)}
        worst = min(means, key=lambda r: means[r])
        out[g] = {"above": sum(x["speedup"] > 1 for x in sub), "cells": len(sub), "worst": (worst, means[worst])}
    return out


def findings(rows, factors, budgets, seeds, *, strategy=None, compare_strategies=(), compare_factors=(),
             per_budget: bool = True) -> list[stats.Finding]:
    """The paper's findings tested on this study's speedups over `budgets` (the caller's
    choice: the report passes the budgets that do not repeat the data); the unit is a seed
    (its small models and scratch run are shared by every cell of that seed), the CI a
    Student t interval over seeds, and every finding carries ci_at for Holm's adjustment.
    `strategy`: the rows of the main operator (None: rows without a strategy);
    `compare_strategies` at `compare_factors`: the operators szp is compared with."""
    out = []
    budgets = tuple(budgets)
    cell = {(_strategy(x, strategy), x["factor"], x["budget"], x["seed"]): x for x in rows}

    def sp(seed, g, r, strat=strategy):
        x = cell.get((strat, g, r, seed))
        return math.nan if x is None else x["speedup"]

    def over(values):
        """The mean of per-budget values (nan when one is missing)."""
        return float(np.mean(values)) if len(values) else math.nan

    def share(seed, g):
        """The share of budgets where growing by g pays, for one seed (nan when a cell is missing)."""
        return over([float(v > 1) if not math.isnan(v) else math.nan for v in (sp(seed, g, r) for r in budgets)])

    def finding(claim, paper, fn, test, uses, bounds=(-math.inf, math.inf)):
        vals = tuple(v for v in (fn(seed) for seed in seeds) if v is not None and not math.isnan(v))
        ci_at = lambda level: seed_interval(vals, level, bounds)  # noqa: E731
        m, lo, hi = ci_at(0.95)
        lower = sum(1 for strat, g, rs in uses for r in rs for seed in seeds
                    if (strat, g, r, seed) in cell and not cell[(strat, g, r, seed)]["speedup_exact"])
        detail = [f"{lower} lower bound(s) among its speedups"] if lower else []
        if len(vals) > 1 and len(set(vals)) == 1:
            detail.append(f"every seed gives {m:.4g}: the sign test's interval (p = {2.0 ** (1 - len(vals)):.2g})")
        out.append(stats.Finding(claim, paper, m, lo, hi, len(vals), test, detail="; ".join(detail), ci_at=ci_at))

    on = ", ".join(f"{r:g}" for r in budgets)
    g0 = REFERENCE_FACTOR if REFERENCE_FACTOR in factors else None
    gmax = max(factors)
    if g0 is not None:
        finding(f"speedup at g = {fg(g0)}, mean over budgets {on}",
                f"growth pays off (speedup > 1) at g = {fg(g0)}",
                lambda seed: over([sp(seed, g0, r) for r in budgets]), "> 1", [(strategy, g0, budgets)])
        if per_budget:
            for r in budgets:
                finding(f"speedup at g = {fg(g0)}, r = {r:g}", f"growth pays off at g = {fg(g0)}",
                        lambda seed, r=r: sp(seed, g0, r), "> 1", [(strategy, g0, (r,))])
    if len(budgets) >= 2:
        x = np.log2(np.asarray(budgets, dtype=float))

        def slope(seed):
            per_g = []
            for g in factors:
                y = np.asarray([sp(seed, g, r) for r in budgets], dtype=float)
                per_g.append(float(np.polyfit(x, y, 1)[0]) if not np.isnan(y).any() else math.nan)
            return float(np.mean(per_g))
        finding(f"slope of the speedup against log2(budget) over budgets {on}, mean over factors "
                f"(per doubling of r)", "the speedup diminishes as the budget grows", slope, "< 0",
                [(strategy, g, budgets) for g in factors])
    finding(f"speedup at the largest factor g = {fg(gmax)}, mean over budgets {on}",
            "there is an upper bound on g beyond which growth does not pay (speedup < 1)",
            lambda seed: over([sp(seed, gmax, r) for r in budgets]), "< 1", [(strategy, gmax, budgets)])
    if g0 is not None and gmax > g0:
        finding(f"speedup at g = {fg(g0)} minus speedup at g = {fg(gmax)}, mean over budgets {on}",
                "growing by more than the best factor pays less (the speedup falls beyond it)",
                lambda seed: over([sp(seed, g0, r) - sp(seed, gmax, r) for r in budgets]), "> 0",
                [(strategy, g, budgets) for g in (g0, gmax)])
    if g0 is not None:
        # "g = 2 is the most reliable": against every other factor, by the share of
        # (budget, seed) cells with speedup > 1 and by the mean speedup at g's worst budget
        rel = reliability(rows, factors, budgets, seeds, strategy)
        for h in (h for h in factors if h != g0 and h in rel and g0 in rel):
            finding(f"share of budgets with speedup > 1, g = {fg(g0)} minus g = {fg(h)} (per seed, budgets {on})",
                    f"g = {fg(g0)} is the most reliable factor: speedup > 1 in the largest share of "
                    f"(budget, seed) cells",
                    lambda seed, h=h: share(seed, g0) - share(seed, h), "> 0", [], bounds=(-1.0, 1.0))
            (w0, _), (wh, _) = rel[g0]["worst"], rel[h]["worst"]
            finding(f"worst-budget mean speedup, g = {fg(g0)} (its worst budget r = {w0:g}) minus g = {fg(h)} "
                    f"(r = {wh:g})",
                    f"g = {fg(g0)} is the most reliable factor: the highest mean speedup at its worst budget",
                    lambda seed, h=h, w0=w0, wh=wh: sp(seed, g0, w0) - sp(seed, h, wh), "> 0",
                    [(strategy, g0, (w0,)), (strategy, h, (wh,))])
    for g in (g for g in factors if any(abs(g - c) < 1e-9 for c in compare_factors)):
        for op in (op for op in compare_strategies if op != strategy):
            if not any((op, g, r, seed) in cell for r in budgets for seed in seeds):
                continue
            finding(f"speedup of {strategy} minus {op} at g = {fg(g)}, mean over budgets {on}",
                    "simple operators (szp: shrink, zero-pad, perturb) beat complex ones",
                    lambda seed, g=g, op=op: over([sp(seed, g, r) - sp(seed, g, r, op) for r in budgets]), "> 0",
                    [(strategy, g, budgets), (op, g, budgets)])
    return out


def largest_paying_factor(summary, factors, budget):
    """(largest g whose mean speedup is > 1 at this budget or None, whether every smaller g
    pays too, whether the largest one's CI excludes 1)."""
    cells = {x["factor"]: x for x in summary if x["budget"] == budget}
    good = [g for g in factors if g in cells and cells[g]["speedup_mean"] > 1]
    if not good:
        return None, False, False
    g = max(good)
    sure = not math.isnan(cells[g]["speedup_lo"]) and cells[g]["speedup_lo"] > 1
    return g, all(cells[h]["speedup_mean"] > 1 for h in factors if h <= g and h in cells), sure


def _plots(out: Path, p, summary, rows, curves, rep) -> list[Path]:
    """summary, rows: the preset's strategy only; rep: repetition() per budget."""
    plt = pyplot()
    if plt is None:
        return []
    files = []
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, r in enumerate(p.budgets):
        sub = sorted((x for x in summary if x["budget"] == r), key=lambda x: x["factor"])
        color = cmap(i / max(1, len(p.budgets) - 1))
        xs = [x["factor"] * (1 + 0.02 * (i - (len(p.budgets) - 1) / 2)) for x in sub]  # staggered
        ms = [x["speedup_mean"] for x in sub]
        repeats = rep.get(r, {}).get("repeats", False)
        ax.plot(xs, ms, color=color, ls="--" if repeats else "-",
                label=f"r = {r:g}" + (f" (repeats the data {rep[r]['epochs']:.1f}x)" if repeats else ""))
        for xv, x in zip(xs, sub):
            if not math.isnan(x["speedup_lo"]):
                lo = max(x["speedup_lo"], 1e-3)
                ax.errorbar([xv], [x["speedup_mean"]], yerr=[[x["speedup_mean"] - lo],
                            [x["speedup_hi"] - x["speedup_mean"]]], color=color, capsize=3, lw=0.8)
            exact = x["lower_bounds"] == 0
            ax.scatter([xv], [x["speedup_mean"]], color=color if exact else "none", edgecolors=color,
                       marker="o" if exact else "^", s=40, zorder=3)
        for x in (x for x in rows if x["budget"] == r):  # the seeds
            ax.scatter([x["factor"] * (1 + 0.02 * (i - (len(p.budgets) - 1) / 2))], [x["speedup"]],
                       color=color, marker="x", s=12, alpha=0.6, zorder=2)
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(p.factors))
    ratios = {x["factor"]: x["param_ratio"] for x in summary}
    ax.set_xticklabels([f"{fg(g)}\n(N/N_s {ratios.get(g, float('nan')):.1f})" for g in p.factors], fontsize=8)
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    lo = min([x["speedup_lo"] for x in summary if not math.isnan(x["speedup_lo"])] +
             [x["speedup"] for x in rows])
    hi = max([x["speedup_hi"] for x in summary if not math.isnan(x["speedup_hi"])] +
             [x["speedup"] for x in rows])
    ax.set_ylim(max(0.0, min(lo, 0.9) - 0.05), max(hi, 1.1) + 0.05)
    ax.set_xlabel("growth factor g: width ratio (non-embedding parameter ratio)")
    ax.set_ylabel("speedup over scratch (best-so-far envelopes)")
    ax.set_title(f"growth-factor ({p.name}, {p.strategy}): speedup vs g, mean over {len(p.seeds)} seeds, "
                 f"95% t CI\n(x: seeds; hollow triangles: a lower bound in some seed, scratch not matched "
                 f"within {p.scratch_factor:g}x compute; dashed: budget repeats the data)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(save_figure(plt, fig, out / "speedup_vs_g.png"))

    seed = p.seeds[0]
    scratch = curves[seed]
    fig, axes = plt.subplots(1, len(p.budgets), figsize=(4.8 * len(p.budgets), 4), squeeze=False)
    for ax, r in zip(axes[0], p.budgets):
        sub = sorted((x for x in rows if x["budget"] == r and x["seed"] == seed), key=lambda x: x["factor"])
        limit = p.scratch_factor * max(x["total_flops"] for x in sub)
        pts = [(f, l, e) for (f, l), e in zip(scratch, best_so_far([l for _, l in scratch])) if 0 < f <= limit]
        ax.plot([f for f, _, _ in pts], [l for _, l, _ in pts], color="gray", lw=0.8, label="scratch")
        ax.plot([f for f, _, _ in pts], [e for _, _, e in pts], color="black", lw=1.5,
                label="scratch, best so far")
        for i, x in enumerate(sub):
            color = plt.get_cmap("plasma")(i / max(1, len(sub) - 1) * 0.85)
            c = [(f, l) for f, l in x["curve"] if f > 0]
            ax.plot([f for f, _ in c], [l for _, l in c], color=color, lw=1, label=f"g = {fg(x['factor'])}")
            ax.scatter([x["total_flops"]], [x["best_loss"]], color=color, s=12, zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("training compute (FLOPs)")
        ax.set_ylabel("val loss (nats/token)")
        repeats = rep.get(r, {}).get("repeats", False)
        ax.set_title(f"budget r = {r:g} tokens/parameter" + (" (repeats the data)" if repeats else ""),
                     fontsize=10)
        finals = [x["best_loss"] for x in sub] + [l for _, l, _ in pts]
        lo = min(finals)
        ax.set_ylim(lo - 0.1, lo + 2.0)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"growth-factor ({p.name}, {p.strategy}): val loss vs compute, seed {seed} (small model, "
                 f"then grown; dot: the grown run's best loss)")
    fig.tight_layout()
    files.append(save_figure(plt, fig, out / "loss_vs_compute.png"))
    return files


def _budget_head(r, rep, mark="†") -> str:
    return f"r = {r:g}" + (f" {mark}" if rep.get(r, {}).get("repeats") else "")


def depth_section(p, depth_rows, width_rows, budgets) -> tuple[list[str], list]:
    """The depth axis (docs/studies.md, "Depth axis"): a table of speedups per operator and
    small shape, and the four findings fixed before the runs, D1 (stack minus width growth
    at the matched parameter ratio) and D2 (identity minus stack) per depth ratio, over
    `budgets` (the depth budgets that do not repeat the data), with their own Holm family."""
    if not depth_rows:
        return [], []
    cell = {(x["strategy"], x["factor"], x["depth_ratio"], x["budget"], x["seed"]): x
            for x in list(depth_rows) + list(width_rows)}
    shapes = list(dict.fromkeys((x["strategy"], x["factor"], x["depth_ratio"]) for x in depth_rows))
    ratio = {(x["factor"], x["depth_ratio"]): x["param_ratio"] for x in list(depth_rows) + list(width_rows)}
    all_budgets = sorted({x["budget"] for x in depth_rows})

    def sp(strat, g, k, r, seed):
        x = cell.get((strat, g, k, r, seed))
        return math.nan if x is None else x["speedup"]

    def matched_width(k):
        """The width factor whose parameter ratio is nearest the depth ratio k's."""
        target = ratio[(1.0, k)]
        return min(p.factors, key=lambda g: abs(math.log(ratio.get((g, 1), math.inf) / target)))

    table = []
    for strat, g, k in [(p.strategy, matched_width(k), 1) for k in p.depth_ratios] + shapes:
        vals = []
        for r in all_budgets:
            v = [sp(strat, g, k, r, seed) for seed in p.seeds]
            v = [x for x in v if not math.isnan(x)]
            vals.append(ci_text(*seed_interval(v)) if len(v) > 1 else "-")
        shape = (f"width / {fg(g)}" if g != 1 else "width 1") + (f", depth / {k}" if k > 1 else "")
        table.append([strat, shape, f"{ratio.get((g, k), math.nan):.2f}"] + vals)
    found = []

    def finding(claim, paper, a, b):
        vals = []
        for seed in p.seeds:
            d = [sp(*a, r, seed) - sp(*b, r, seed) for r in budgets]
            if d and not any(math.isnan(x) for x in d):
                vals.append(float(np.mean(d)))
        ci_at = lambda level, vals=tuple(vals): seed_interval(vals, level)  # noqa: E731
        m, lo, hi = ci_at(0.95)
        found.append(stats.Finding(claim, paper, m, lo, hi, len(vals), "> 0", ci_at=ci_at))

    on = ", ".join(f"{r:g}" for r in budgets)
    for k in p.depth_ratios:
        g = matched_width(k)
        if "stack" in p.depth_strategies:
            finding(f"speedup of depth:stack (depth / {k}, N/N_s {ratio[(1.0, k)]:.2f}) minus {p.strategy} "
                    f"(width / {fg(g)}, N/N_s {ratio[(g, 1)]:.2f}), mean over budgets {on}",
                    "stacking beats width growth", ("depth:stack", 1.0, k), (p.strategy, g, 1))
        if {"stack", "identity"} <= set(p.depth_strategies):
            finding(f"speedup of depth:identity minus depth:stack at depth / {k}, mean over budgets {on}",
                    "function-preserving depth growth beats stacking", ("depth:identity", 1.0, k),
                    ("depth:stack", 1.0, k))
    stats.holm_adjust(found, ALPHA)
    L = ["## Depth axis", "",
         "Small models with fewer layers at the target's width, grown to the target's depth by each depth "
         "strategy, and (both) small models narrower and shallower, grown by "
         f"{p.strategy} in width and then identity in depth in the same step; each run against its seed's "
         "scratch run, as above. The protocol and the comparators were fixed before any depth run "
         "(docs/studies.md, 'Depth axis'): each depth ratio k is compared with the width factor of the "
         "nearest parameter ratio. Speedup, mean [95% t CI] over seeds:", "",
         md_table(["operator", "small model", "N/N_s"] + [f"r = {r:g}" for r in all_budgets], table), "",
         f"Findings (unit: the seed; Holm's adjustment over these {len(found)}, a family of their own; budgets "
         f"{on}):", ""]
    L += [f.markdown() for f in found] + [""]
    return L, found


def write_report(out: Path, p, rows, curves, meta: dict) -> list[Path]:
    """curves: seed -> the scratch curve as [flops, val_loss] pairs."""
    all_rows = rows
    depth_rows = [x for x in rows if x.get("depth_ratio", 1) != 1 or x["strategy"].startswith("depth:")]
    rows = [x for x in rows if x not in depth_rows]
    order = {s: i for i, s in enumerate((p.strategy, *p.compare_strategies))}
    rows = sorted(rows, key=lambda x: (order.get(x["strategy"], len(order)), x["strategy"], x["factor"],
                                       x["budget"], x["seed"]))
    main = [x for x in rows if x["strategy"] == p.strategy]
    strategies = list(dict.fromkeys(x["strategy"] for x in rows))
    summary = summarize(rows, p.factors, p.budgets, strategies)
    main_summary = [x for x in summary if x["strategy"] == p.strategy]
    rep = repetition(rows, p.budgets, p.max_epochs)
    clean = verdict_budgets(rows, p.budgets, p.max_epochs)
    flagged = [r for r in p.budgets if rep.get(r, {}).get("repeats")]
    flagged_text = ", ".join(f"r = {r:g} ({rep[r]['epochs']:.2f} epochs)" for r in flagged)
    found = findings(rows, p.factors, clean, p.seeds, strategy=p.strategy, compare_strategies=p.compare_strategies,
                     compare_factors=p.compare_factors) if clean else []
    stats.holm_adjust(found, ALPHA)
    files = [write_csv(out / "results.csv", all_rows, COLUMNS), write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)]
    tps, fpt = meta["tokens_per_step"], meta["flops_per_token_target"]
    files.append(write_csv(out / "scratch_curve.csv",
                           [{"seed": seed, "step": round(f / (tps * fpt)), "tokens": round(f / fpt), "flops": f,
                             "val_loss": l, "val_loss_best": e} for seed in p.seeds
                            for (f, l), e in zip(curves[seed], best_so_far([l for _, l in curves[seed]]))],
                           ("seed", "step", "tokens", "flops", "val_loss", "val_loss_best")))
    plots = _plots(out, p, main_summary, main, curves, rep)
    files += plots
    n_seeds = len(p.seeds)
    n_train = meta["train_tokens"]
    compared = [s for s in strategies if s != p.strategy]

    L = [f"# Growth-factor study, preset `{p.name}`", "",
         f"Which growth factor pays off, following {PAPER}. Protocol, compute and speedup "
         f"definitions: [docs/studies.md](../../docs/studies.md).", "", "## Preset", ""]
    L += [f"- {line}" for line in p.describe()]
    L.append(f"- target: {meta['params_target']:,} non-embedding parameters N, "
             f"{fmt(meta['flops_per_token_target'])} training FLOPs per token; {tps} tokens per step")
    L.append(f"- data: TinyStories, {n_train:,} train / {meta['valid_tokens']:,} validation tokens "
             f"(byte-level BPE, vocab {meta['vocab_size']}; cache key {meta['corpus_key']}); held-out set: "
             f"{meta.get('heldout_tokens', p.heldout_windows * p.block_size):,} validation tokens")
    L.append(f"- scratch: one run per seed of {meta['scratch_steps']} steps ({meta['scratch_steps'] * tps:,} "
             f"tokens, {meta['scratch_steps'] * tps / n_train:.2f} epochs) = {p.scratch_factor:g}x the largest "
             f"grown run's compute; the scratch run of each grown run is the prefix of its seed's run up to "
             f"{p.scratch_factor:g}x that run's compute (constant LR after warmup and a fixed data order make "
             f"the prefix identical to a shorter run)")
    if p.name == "smoke":
        L.append(f"- {SMOKE_NOTE}")
    if meta.get("budgets_missing"):
        L.append(f"- **partial report**: budgets {', '.join(f'{r:g}' for r in meta['budgets_missing'])} are not "
                 f"computed yet (the study runs budget by budget and rewrites this report after each; rerun "
                 f"the command to finish it)")
    if flagged:
        L.append(f"- **budgets that repeat the data**: {flagged_text}: their runs see the {n_train:,} "
                 f"training tokens more than {p.max_epochs:g} times, so their speedups measure repetition as "
                 f"much as growth; marked † in the tables and left out of the verdicts (section Data repetition)")
    L += ["", "Sizes and steps (steps = budget x parameters / tokens per step). g is the width ratio "
          "d_model / small d_model; N/N_s the non-embedding parameter ratio:", ""]
    head = ["g (width)", "N/N_s (params)", "small d_model", "heads", "d_ff", "N_s"] + \
           [f"small / grown steps, {_budget_head(r, rep)}" for r in p.budgets]
    table = []
    for g in p.factors:
        sub = {x["budget"]: x for x in main if x["factor"] == g and x["seed"] == p.seeds[0]}
        any_ = next(iter(sub.values()))
        table.append([f"{fg(g)}", f"{any_['param_ratio']:.2f}", any_["small_d_model"], any_["small_n_head"],
                      any_["small_d_ff"], any_["params_small"]]
                     + [f"{sub[r]['small_steps']} / {sub[r]['grown_steps']}" for r in p.budgets])
    L += [md_table(head, table), ""]

    L += ["## Data repetition", "",
          f"Epochs of the training split ({n_train:,} tokens) each kind of run sees, per budget: the small model "
          f"(r N_s tokens), the grown run's lineage (the small model's tokens plus the continuation's r N: the "
          f"grown model continues its small model's data stream), and scratch up to where the budget's "
          f"speedups are read (where its envelope reaches a grown run's best loss, or the end of its "
          f"{p.scratch_factor:g}x window for a lower bound; the most over the budget's cells). A budget whose "
          f"runs see the text more than {p.max_epochs:g} times (the preset's max_epochs) is marked † and left "
          f"out of the verdicts.", ""]
    gs = " / ".join(fg(g) for g in p.factors)
    table = []
    for r in p.budgets:
        if r not in rep:
            continue
        e = rep[r]
        table.append([f"{r:g}", " / ".join(f"{e['small'].get(g, math.nan):.2f}" for g in p.factors),
                      " / ".join(f"{e['grown'].get(g, math.nan):.2f}" for g in p.factors), f"{e['scratch']:.2f}",
                      f"{e['epochs']:.2f}", f"**yes** † (> {p.max_epochs:g}): not in the verdicts" if e["repeats"]
                      else "no"])
    L += [md_table(["budget r", f"small model (g = {gs})", f"grown run, small + continuation (g = {gs})",
                    "scratch, to where its speedups are read", "most", "repeats the data"], table), ""]

    L += ["## Run", "", f"- command: `{meta['command']}`",
          f"- wall time of this invocation: {fmt_seconds(meta['wall_seconds'])} ({meta['computed']} runs "
          f"computed, {meta['cached']} read from the cache) with {meta.get('workers', 1)} worker(s); compute "
          f"time of all runs: {fmt_seconds(meta['compute_seconds'])} (scratch {fmt_seconds(meta['scratch_seconds'])})",
          f"- device: {meta['device']}, torch threads per worker: {meta['threads'] or 'default'}", ""]

    note = f"† repeats the training text more than {p.max_epochs:g} times: shown, not in the verdicts."
    sm = {(x["strategy"], x["factor"], x["budget"]): x for x in summary}

    def cell_text(strat, g, r):
        x = sm.get((strat, g, r))
        if x is None:
            return "-"
        return (ci_text(x["speedup_mean"], x["speedup_lo"], x["speedup_hi"])
                + (" (lower bound)" if x["lower_bounds"] else ""))

    L += ["## Speedup", "",
          "`speedup(g, r) = C_scratch(L_grown) / C_grown`: the compute scratch needs to reach the grown run's "
          "best val loss over the grown run's compute (small model included), each grown run against its own "
          "seed's scratch run. Both curves are read as best-so-far envelopes (the running minimum of the "
          "val loss): `L_grown` is the best loss the grown run showed, `C_scratch(L)` the first compute at "
          "which scratch's envelope reaches L (linear between evaluations), so a noisy rise of the raw curve "
          f"cannot move the reading. `>x`: scratch did not reach it within {p.scratch_factor:g}x the grown run's "
          f"compute, so x is a lower bound (a mean over seeds that includes one is a lower bound too).", "",
          f"{p.strategy}: mean over {n_seeds} seed(s) with its 95% CI, the Student t interval over seeds (t with "
          f"{n_seeds - 1} degree(s) of freedom"
          + (": with 2 seeds the quantile is 12.7, so the interval is wide, about 6.4 times the gap between "
             "the two seeds on each side; no bootstrap interval can cover a mean with 95% from 2 seeds, "
             "stats.coverage_ceiling is 50%; the width rests on that one gap, so two seeds that agree by "
             "chance give a narrow interval: read an agree from 2 seeds as a strong hint, not a settled "
             "result)" if n_seeds == 2 else ")") + ":", ""]
    ratio = {x["factor"]: x["param_ratio"] for x in main_summary}
    L += [md_table(["g (width)", "N/N_s (params)"] + [_budget_head(r, rep) for r in p.budgets],
                   [[f"{fg(g)}", f"{ratio[g]:.2f}"] + [cell_text(p.strategy, g, r) for r in p.budgets]
                    for g in p.factors])]
    L += ["", note if flagged else "", ""] if flagged else [""]
    L += ["Per seed (" + ", ".join(f"seed {s}" for s in p.seeds) + "):", ""]
    L += [md_table(["g (width)", "N/N_s (params)"] + [_budget_head(r, rep) for r in p.budgets],
                   [[f"{fg(g)}", f"{ratio[g]:.2f}"]
                    + [sm[(p.strategy, g, r)]["speedups"] if (p.strategy, g, r) in sm else "-" for r in p.budgets]
                    for g in p.factors]), ""]

    if compared:
        cf = [g for g in p.factors if p.compared(g)]
        L += [f"## Operators: {p.strategy} against {', '.join(compared)}", "",
              f"The same small models grown at g = {', '.join(fg(g) for g in cf)} by each operator, every budget "
              f"and seed, each against its seed's scratch run: {p.strategy} as the preset runs it, the others "
              f"with their own defaults (exact_copy and perturb keep the function and continue with the small "
              f"model's moments, step and schedule). Speedup, mean [95% t CI] over seeds:", ""]
        L += [md_table(["g (width)", "operator"] + [_budget_head(r, rep) for r in p.budgets],
                       [[f"{fg(g)}", strat] + [cell_text(strat, g, r) for r in p.budgets]
                        for g in cf for strat in strategies if (strat, g, p.budgets[0]) in sm]), ""]
        L += ["Best val loss of the grown runs, mean over seeds:", ""]
        L += [md_table(["g (width)", "operator"] + [_budget_head(r, rep) for r in p.budgets],
                       [[f"{fg(g)}", strat] + [fmt(sm[(strat, g, r)]["best_loss_mean"]) if (strat, g, r) in sm
                                               else "-" for r in p.budgets]
                        for g in cf for strat in strategies if (strat, g, p.budgets[0]) in sm]), ""]

    L += ["## Reliability of each factor", "",
          f"How reliably growing by g pays ({p.strategy}): the share of (budget, seed) cells with speedup > 1 (a "
          f"lower bound counts when it is itself > 1) and the mean speedup over seeds at g's worst budget, over "
          f"the verdicts' budgets ({', '.join(f'{r:g}' for r in clean) or 'none'}) and over all budgets.", ""]
    rel_clean = reliability(rows, p.factors, clean, p.seeds, p.strategy)
    rel_all = reliability(rows, p.factors, p.budgets, p.seeds, p.strategy)

    def rel_text(rel, g, what):
        if g not in rel:
            return "-"
        x = rel[g]
        if what == "share":
            return f"{x['above']}/{x['cells']} ({x['above'] / x['cells']:.0%})"
        return f"{x['worst'][1]:.2f} (r = {x['worst'][0]:g})"
    L += [md_table(["g (width)", "cells > 1, verdicts' budgets", "worst-budget mean, verdicts' budgets",
                    "cells > 1, all budgets", "worst-budget mean, all budgets"],
                   [[f"{fg(g)}", rel_text(rel_clean, g, "share"), rel_text(rel_clean, g, "worst"),
                     rel_text(rel_all, g, "share"), rel_text(rel_all, g, "worst")] for g in p.factors]), ""]

    L += ["## Findings", "",
          f"Each claim of the paper (as summarized on the right) tested on a quantity computed per seed (a seed's "
          f"small models and scratch run are shared by all its cells, so the seed is the unit), its mean over "
          f"the {n_seeds} seed(s) and 95% Student t CI: **agree** when the CI lies on the claimed side, "
          f"**disagree** when it lies on the other side, **inconclusive** when it contains the threshold.", "",
          f"- **Budgets**: the verdicts rest on the budgets whose runs see the training text at most "
          f"{p.max_epochs:g} times: {', '.join(f'r = {r:g}' for r in clean) or 'none'}"
          + (f"; left out: {flagged_text}" if flagged else "") + ".",
          f"- **Comparators, fixed before the runs**: the reference factor g = {fg(REFERENCE_FACTOR)} (the paper's), "
          f"against the largest factor g = {fg(max(p.factors))} (upper bound; more than the best factor) and "
          f"against every other factor of the preset (reliability: share of cells > 1, worst-budget mean "
          f"speedup); {p.strategy} against each of the preset's compare_strategies "
          f"({', '.join(compared) or 'none'}) at g = {', '.join(fg(g) for g in p.factors if p.compared(g)) or '-'}.",
          f"- **Multiple testing**: Holm's step-down adjustment over the {len(found)} findings below (family-wise "
          f"error {ALPHA:g}; stats.holm_adjust): p is the two-sided p-value of the t interval, the Holm verdict "
          f"the one that survives the adjustment (a finding that does not is inconclusive).", ""]
    if found:
        L += [f.markdown() for f in found]
    else:
        L.append(f"No verdicts: every budget repeats the data more than {p.max_epochs:g} times.")
    L += [""]
    if flagged and clean != tuple(p.budgets):
        desc = findings(rows, p.factors, p.budgets, p.seeds, strategy=p.strategy,
                        compare_strategies=p.compare_strategies, compare_factors=p.compare_factors,
                        per_budget=False)
        L += ["Over all budgets, including those that repeat the data (descriptive, not verdicts: these "
              "values mix growth with repetition):", ""]
        L += [f"- {f.claim} = {ci_text(f.estimate, f.lo, f.hi, 4)} (n = {f.n}; paper: {f.paper})" for f in desc]
        L += [""]

    L += ["Largest growth factor whose mean speedup is > 1, per budget:", ""]
    table = []
    msm = {(x["factor"], x["budget"]): x for x in main_summary}
    for r in p.budgets:
        g, all_smaller, sure = largest_paying_factor(main_summary, p.factors, r)
        table.append([_budget_head(r, rep)[4:],
                      "none" if g is None else f"{fg(g)} (N/N_s {msm[(g, r)]['param_ratio']:.1f})",
                      "-" if g is None else ("yes" if sure else "no"),
                      "-" if g is None else ("yes" if all_smaller else "no"),
                      ", ".join(f"{fg(h)}: {cell_text(p.strategy, h, r)}" for h in p.factors if (h, r) in msm)])
    L += [md_table(["budget r", "largest g with mean speedup > 1", "its CI excludes 1",
                    "every smaller g > 1 too", "speedups"], table), ""]
    if flagged:
        L += [note, ""]

    L += depth_section(p, depth_rows, rows, tuple(r for r in p.depth_budgets if r in clean))[0]
    L += ["## Losses", "", "Val loss of the small model at growth, right after growth, at the end of the grown "
          "run and the best it showed (the speedup's L_grown), and of the same seed's scratch envelope at the "
          "same compute (interpolated); epochs: the most any of the cell's runs saw.", ""]
    table = []
    for x in rows:
        sc = curves[x["seed"]]
        at = interpolate([f for f, _ in sc], best_so_far([l for _, l in sc]), x["total_flops"])
        table.append([f"{fg(x['factor'])}", f"{x['budget']:g}", x["seed"], x["strategy"], x["loss_small"],
                      x["loss_after_growth"], x["final_loss"], x["best_loss"], at, x["total_flops"],
                      x["scratch_flops_to_match"], x["speedup_text"],
                      f"{x['epochs']:.2f}" + (" †" if x["repeats"] else "")])
    L += [md_table(["g", "r", "seed", "operator", "small at growth", "after growth", "grown final", "grown best",
                    "scratch at equal compute", "grown compute", "scratch compute to match", "speedup", "epochs"],
                   table), ""]

    L += plots_section(plots, "`speedup_vs_g.png`: mean speedup over seeds against g per budget with its 95% t "
                       "CI (crosses: the seeds; hollow triangles: lower bounds; dashed: a budget that repeats the "
                       f"data). `loss_vs_compute.png`: val loss against compute per budget for seed {p.seeds[0]}, "
                       "scratch (raw and best so far) and each grown run (small-model phase, then the grown "
                       "model; the dot is its best loss).")
    L += ["", "Rows: `results.csv` (one row per (g, r, seed, operator)), `summary.csv` (one per (operator, g, r)); "
          "scratch curves: `scratch_curve.csv`; each run's curves and config: `runs/<key>.json`."]
    files.append(write_text(out / "report.md", "\n".join(L) + "\n"))
    return files
