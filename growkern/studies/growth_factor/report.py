"""The growth-factor study's report: the speedup over (g, r) as a mean over seeds with its
CI, g as width and parameter ratio, the verdicts on the paper's findings, the largest g
that pays off per budget, losses, results.csv, summary.csv, scratch_curve.csv and plots."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import stats
from ..presets import SMOKE_NOTE, fmt_factor as fg
from ..progress import fmt_seconds
from ..render import fmt, md_table, plots_section, pyplot, save_figure, write_csv, write_text
from .design import COLUMNS

PAPER = "When is Warmstarting Effective for Scaling Language Models? (arXiv 2605.13405)"
SUMMARY_COLUMNS = ("factor", "param_ratio", "budget", "n_seeds", "speedup_mean", "speedup_lo", "speedup_hi",
                   "ci_method", "lower_bounds", "speedups", "final_loss_mean")
CI_METHOD = "t"  # Student t over seeds: at n = 2..5 no bootstrap CI can reach 95% (stats.coverage_ceiling)
REFERENCE_FACTOR = 2


def interpolate(xs, ys, x):
    """Linear interpolation of a curve at x (None outside it)."""
    for i in range(1, len(xs)):
        if xs[i - 1] <= x <= xs[i]:
            if xs[i] == xs[i - 1]:
                return ys[i]
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return None


def mean_ci(values):
    """(mean, lo, hi) over seeds: the Student t interval (no CI from one seed)."""
    return stats.bootstrap_ci(values, np.mean, method=CI_METHOD)


def summarize(rows, factors, budgets) -> list[dict]:
    """One row per (g, r): the speedup's mean over seeds with its 95% t interval."""
    out = []
    for g in factors:
        for r in budgets:
            sub = sorted((x for x in rows if x["factor"] == g and x["budget"] == r), key=lambda x: x["seed"])
            if not sub:
                continue
            m, lo, hi = mean_ci([x["speedup"] for x in sub])
            out.append({"factor": g, "param_ratio": sub[0]["param_ratio"], "budget": r, "n_seeds": len(sub),
                        "speedup_mean": m, "speedup_lo": lo, "speedup_hi": hi, "ci_method": CI_METHOD,
                        "lower_bounds": sum(not x["speedup_exact"] for x in sub),
                        "speedups": " ".join(x["speedup_text"] for x in sub),
                        "final_loss_mean": float(np.mean([x["final_loss"] for x in sub]))})
    return out


def ci_text(m, lo, hi) -> str:
    if any(isinstance(v, float) and math.isnan(v) for v in (lo, hi)):
        return f"{m:.2f}"
    return f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


def _per_seed(rows, fn, seeds):
    """fn(rows of one seed) per seed, the seeds where it is defined."""
    vals = []
    for s in seeds:
        v = fn([x for x in rows if x["seed"] == s])
        if v is not None and not math.isnan(v):
            vals.append(v)
    return vals


def findings(rows, factors, budgets, seeds) -> list[stats.Finding]:
    """The paper's findings tested on this study's speedups; the unit is a seed (its small
    models and scratch run are shared by every cell of that seed), the CI a Student t
    interval over seeds."""
    out = []
    sp = lambda sub, g, r: next((x["speedup"] for x in sub if x["factor"] == g and x["budget"] == r), None)

    def finding(claim, paper, fn, test):
        vals = _per_seed(rows, fn, seeds)
        m, lo, hi = mean_ci(vals) if vals else (math.nan, math.nan, math.nan)
        out.append(stats.Finding(claim, paper, m, lo, hi, len(vals), test))

    g0 = REFERENCE_FACTOR if REFERENCE_FACTOR in factors else None
    if g0 is not None:
        finding(f"speedup at g = {fg(g0)}, mean over budgets {', '.join(f'{r:g}' for r in budgets)}",
                f"growth pays off (speedup > 1) at g = {fg(g0)}",
                lambda sub: np.mean([sp(sub, g0, r) for r in budgets]), "> 1")
        for r in budgets:
            finding(f"speedup at g = {fg(g0)}, r = {r:g}", f"growth pays off at g = {fg(g0)}",
                    lambda sub, r=r: sp(sub, g0, r), "> 1")
    if len(budgets) >= 2:
        x = np.log2(np.asarray(budgets, dtype=float))

        def slope(sub):
            per_g = []
            for g in factors:
                y = np.asarray([sp(sub, g, r) for r in budgets], dtype=float)
                per_g.append(float(np.polyfit(x, y, 1)[0]))
            return float(np.mean(per_g))
        finding("slope of the speedup against log2(budget), mean over factors (per doubling of r)",
                "the speedup diminishes as the budget grows", slope, "< 0")
    gmax = max(factors)
    finding(f"speedup at the largest factor g = {fg(gmax)}, mean over budgets",
            "there is an upper bound on g beyond which growth does not pay (speedup < 1)",
            lambda sub: np.mean([sp(sub, gmax, r) for r in budgets]), "< 1")
    if g0 is not None and gmax > g0:
        finding(f"speedup at g = {fg(g0)} minus speedup at g = {fg(gmax)}, mean over budgets",
                "growing by more than the best factor pays less (the speedup falls beyond it)",
                lambda sub: np.mean([sp(sub, g0, r) - sp(sub, gmax, r) for r in budgets]), "> 0")
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


def _plots(out: Path, p, summary, rows, curves) -> list[Path]:
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
        ax.plot(xs, ms, color=color, label=f"r = {r:g}")
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
    ax.set_ylabel("speedup over scratch")
    ax.set_title(f"growth-factor ({p.name}, {p.strategy}): speedup vs g, mean over {len(p.seeds)} seeds, "
                 f"95% t CI\n(x: seeds; hollow triangles: a lower bound in some seed, scratch not matched "
                 f"within {p.scratch_factor:g}x compute)", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(save_figure(plt, fig, out / "speedup_vs_g.png"))

    seed = p.seeds[0]
    scratch = curves[seed]
    fig, axes = plt.subplots(1, len(p.budgets), figsize=(4.8 * len(p.budgets), 4), squeeze=False)
    for ax, r in zip(axes[0], p.budgets):
        sub = sorted((x for x in rows if x["budget"] == r and x["seed"] == seed), key=lambda x: x["factor"])
        limit = p.scratch_factor * max(x["total_flops"] for x in sub)
        pts = [(f, l) for f, l in scratch if 0 < f <= limit]
        ax.plot([f for f, _ in pts], [l for _, l in pts], color="black", lw=1.5, label="scratch")
        for i, x in enumerate(sub):
            color = plt.get_cmap("plasma")(i / max(1, len(sub) - 1) * 0.85)
            c = [(f, l) for f, l in x["curve"] if f > 0]
            ax.plot([f for f, _ in c], [l for _, l in c], color=color, lw=1, label=f"g = {fg(x['factor'])}")
            ax.scatter([x["total_flops"]], [x["final_loss"]], color=color, s=12, zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("training compute (FLOPs)")
        ax.set_ylabel("val loss (nats/token)")
        ax.set_title(f"budget r = {r:g} tokens/parameter", fontsize=10)
        finals = [x["final_loss"] for x in sub] + [l for _, l in pts]
        lo = min(finals)
        ax.set_ylim(lo - 0.1, lo + 2.0)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"growth-factor ({p.name}): val loss vs compute, seed {seed} (small model, then grown)")
    fig.tight_layout()
    files.append(save_figure(plt, fig, out / "loss_vs_compute.png"))
    return files


def write_report(out: Path, p, rows, curves, meta: dict) -> list[Path]:
    """curves: seed -> the scratch curve as [flops, val_loss] pairs."""
    rows = sorted(rows, key=lambda x: (x["factor"], x["budget"], x["seed"]))
    summary = summarize(rows, p.factors, p.budgets)
    found = findings(rows, p.factors, p.budgets, p.seeds)
    files = [write_csv(out / "results.csv", rows, COLUMNS), write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)]
    tps, fpt = meta["tokens_per_step"], meta["flops_per_token_target"]
    files.append(write_csv(out / "scratch_curve.csv",
                           [{"seed": seed, "step": round(f / (tps * fpt)), "tokens": round(f / fpt), "flops": f,
                             "val_loss": l} for seed in p.seeds for f, l in curves[seed]],
                           ("seed", "step", "tokens", "flops", "val_loss")))
    plots = _plots(out, p, summary, rows, curves)
    files += plots
    n_seeds = len(p.seeds)

    L = [f"# Growth-factor study, preset `{p.name}`", "",
         f"Which growth factor pays off, following {PAPER}. Protocol, compute and speedup "
         f"definitions: [docs/studies.md](../../docs/studies.md).", "", "## Preset", ""]
    L += [f"- {line}" for line in p.describe()]
    L.append(f"- target: {meta['params_target']:,} non-embedding parameters N, "
             f"{fmt(meta['flops_per_token_target'])} training FLOPs per token; {tps} tokens per step")
    L.append(f"- data: TinyStories, {meta['train_tokens']:,} train / {meta['valid_tokens']:,} validation tokens "
             f"(byte-level BPE, vocab {meta['vocab_size']}; cache key {meta['corpus_key']})")
    L.append(f"- scratch: one run per seed of {meta['scratch_steps']} steps ({meta['scratch_steps'] * tps:,} "
             f"tokens) = {p.scratch_factor:g}x the largest grown run's compute; the scratch run of each grown "
             f"run is the prefix of its seed's run up to {p.scratch_factor:g}x that run's compute (constant LR "
             f"after warmup and a fixed data order make the prefix identical to a shorter run)")
    if p.name == "smoke":
        L.append(f"- {SMOKE_NOTE}")
    if meta.get("budgets_missing"):
        L.append(f"- **partial report**: budgets {', '.join(f'{r:g}' for r in meta['budgets_missing'])} are not "
                 f"computed yet (the study runs budget by budget and rewrites this report after each; rerun "
                 f"the command to finish it)")
    longest = max(x["small_tokens"] + x["grown_tokens"] for x in rows)
    if meta["train_tokens"] < max(longest, meta["scratch_steps"] * tps):
        L.append(f"- the longest runs see more tokens than the training split holds "
                 f"({meta['train_tokens']:,}; up to {max(longest, meta['scratch_steps'] * tps) / meta['train_tokens']:.1f} "
                 f"epochs): they repeat data (random windows), so val loss at large budgets also reflects "
                 f"repetition")
    L += ["", "Sizes and steps (steps = budget x parameters / tokens per step). g is the width ratio "
          "d_model / small d_model; N/N_s the non-embedding parameter ratio:", ""]
    head = ["g (width)", "N/N_s (params)", "small d_model", "heads", "d_ff", "N_s"] + \
           [f"small / grown steps, r={r:g}" for r in p.budgets]
    table = []
    for g in p.factors:
        sub = {x["budget"]: x for x in rows if x["factor"] == g and x["seed"] == p.seeds[0]}
        any_ = next(iter(sub.values()))
        table.append([f"{fg(g)}", f"{any_['param_ratio']:.2f}", any_["small_d_model"], any_["small_n_head"],
                      any_["small_d_ff"], any_["params_small"]]
                     + [f"{sub[r]['small_steps']} / {sub[r]['grown_steps']}" for r in p.budgets])
    L += [md_table(head, table), ""]

    L += ["## Run", "", f"- command: `{meta['command']}`",
          f"- wall time of this invocation: {fmt_seconds(meta['wall_seconds'])} ({meta['computed']} runs "
          f"computed, {meta['cached']} read from the cache) with {meta.get('workers', 1)} worker(s); compute "
          f"time of all runs: {fmt_seconds(meta['compute_seconds'])} (scratch {fmt_seconds(meta['scratch_seconds'])})",
          f"- device: {meta['device']}, torch threads per worker: {meta['threads'] or 'default'}", ""]

    L += ["## Speedup", "",
          "`speedup(g, r) = C_scratch(L_grown) / C_grown`: the compute scratch needs to reach the grown run's "
          "final val loss over the grown run's compute (small model included), each grown run against its own "
          f"seed's scratch run. `>x`: scratch did not reach it within {p.scratch_factor:g}x the grown run's "
          f"compute, so x is a lower bound (a mean over seeds that includes one is a lower bound too).", "",
          f"Mean over {n_seeds} seed(s) with its 95% CI, the Student t interval over seeds (t with "
          f"{n_seeds - 1} degree(s) of freedom"
          + (": with 2 seeds the quantile is 12.7, so the interval is wide, about 6.4 times the gap between "
             "the two seeds on each side; no bootstrap interval can cover a mean with 95% from 2 seeds, "
             "stats.coverage_ceiling is 50%; the width rests on that one gap, so two seeds that agree by "
             "chance give a narrow interval: read an agree from 2 seeds as a strong hint, not a settled "
             "result)" if n_seeds == 2 else ")") + ":", ""]
    sm = {(x["factor"], x["budget"]): x for x in summary}
    L += [md_table(["g (width)", "N/N_s (params)"] + [f"r = {r:g}" for r in p.budgets],
                   [[f"{fg(g)}", f"{sm[(g, p.budgets[0])]['param_ratio']:.2f}"]
                    + [ci_text(sm[(g, r)]["speedup_mean"], sm[(g, r)]["speedup_lo"], sm[(g, r)]["speedup_hi"])
                       + (" (lower bound)" if sm[(g, r)]["lower_bounds"] else "") for r in p.budgets]
                    for g in p.factors]), ""]
    L += ["Per seed (" + ", ".join(f"seed {s}" for s in p.seeds) + "):", ""]
    L += [md_table(["g (width)", "N/N_s (params)"] + [f"r = {r:g}" for r in p.budgets],
                   [[f"{fg(g)}", f"{sm[(g, p.budgets[0])]['param_ratio']:.2f}"]
                    + [sm[(g, r)]["speedups"] for r in p.budgets] for g in p.factors]), ""]

    L += ["## Findings", "",
          f"Each claim of the paper (as summarized on the right) tested on a quantity computed per seed (a seed's "
          f"small models and scratch run are shared by all its cells, so the seed is the unit), its mean over "
          f"the {n_seeds} seed(s) and 95% Student t CI: **agree** when the CI lies on the claimed side, "
          f"**disagree** when it lies on the other side, **inconclusive** when it contains the threshold.", ""]
    L += [f.markdown() for f in found]
    L += [""]

    L += ["Largest growth factor whose mean speedup is > 1, per budget:", ""]
    table = []
    for r in p.budgets:
        g, all_smaller, sure = largest_paying_factor(summary, p.factors, r)
        table.append([f"{r:g}", "none" if g is None else f"{fg(g)} (N/N_s {sm[(g, r)]['param_ratio']:.1f})",
                      "-" if g is None else ("yes" if sure else "no"),
                      "-" if g is None else ("yes" if all_smaller else "no"),
                      ", ".join(f"{fg(h)}: {ci_text(sm[(h, r)]['speedup_mean'], sm[(h, r)]['speedup_lo'], sm[(h, r)]['speedup_hi'])}"
                                for h in p.factors)])
    L += [md_table(["budget r", "largest g with mean speedup > 1", "its CI excludes 1",
                    "every smaller g > 1 too", "speedups"], table), ""]

    L += ["## Losses", "", "Val loss of the small model at growth, right after growth, at the end of the grown "
          "run, and of the same seed's scratch run at the same compute (interpolated).", ""]
    table = []
    for x in rows:
        sc = curves[x["seed"]]
        at = interpolate([f for f, _ in sc], [l for _, l in sc], x["total_flops"])
        table.append([f"{fg(x['factor'])}", f"{x['budget']:g}", x["seed"], x["loss_small"], x["loss_after_growth"],
                      x["final_loss"], at, x["total_flops"], x["scratch_flops_to_match"], x["speedup_text"]])
    L += [md_table(["g", "r", "seed", "small at growth", "after growth", "grown final", "scratch at equal compute",
                    "grown compute", "scratch compute to match", "speedup"], table), ""]

    L += plots_section(plots, "`speedup_vs_g.png`: mean speedup over seeds against g per budget with its 95% t "
                       "CI (crosses: the seeds; hollow triangles: lower bounds). `loss_vs_compute.png`: val loss "
                       f"against compute per budget for seed {p.seeds[0]}, scratch and each grown run (small-model "
                       "phase, then the grown model; the dot is the end).")
    L += ["", f"Rows: `results.csv` (one row per (g, r, seed)), `summary.csv` (one per (g, r)); scratch curves: "
          f"`scratch_curve.csv`; each run's curves and config: `runs/<key>.json`."]
    files.append(write_text(out / "report.md", "\n".join(L) + "\n"))
    return files
