"""The growth-factor study's report: the speedup table over (g, r), the largest g that
pays off per budget, losses, results.csv, scratch_curve.csv and the plots."""
from __future__ import annotations

from pathlib import Path

from .growth_factor import COLUMNS
from .presets import SMOKE_NOTE
from .progress import fmt_seconds
from .report import fmt, md_table, plots_section, pyplot, save_figure, write_csv, write_text

PAPER = "When is Warmstarting Effective for Scaling Language Models? (arXiv 2605.13405)"


def interpolate(xs, ys, x):
    """Linear interpolation of a curve at x (None outside it)."""
    for i in range(1, len(xs)):
        if xs[i - 1] <= x <= xs[i]:
            if xs[i] == xs[i - 1]:
                return ys[i]
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return None


def largest_paying_factor(rows, factors, budget):
    """(largest g with speedup > 1 at this budget or None, whether every smaller g pays too)."""
    pays = {r["factor"]: r["speedup"] > 1 for r in rows if r["budget"] == budget}
    good = [g for g in factors if pays.get(g)]
    if not good:
        return None, False
    g = max(good)
    return g, all(pays.get(h) for h in factors if h <= g)


def _plots(out: Path, p, rows, scratch) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    files = []
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, r in enumerate(p.budgets):
        sub = sorted((x for x in rows if x["budget"] == r), key=lambda x: x["factor"])
        color = cmap(i / max(1, len(p.budgets) - 1))
        ax.plot([x["factor"] for x in sub], [x["speedup"] for x in sub], color=color, label=f"r = {r:g}")
        for x in sub:
            ax.scatter([x["factor"]], [x["speedup"]], color=color if x["speedup_exact"] else "none",
                       edgecolors=color, marker="o" if x["speedup_exact"] else "^", s=40, zorder=3)
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(p.factors))
    ax.set_xticklabels([f"{g:g}" for g in p.factors])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("growth factor g")
    ax.set_ylabel("speedup over scratch")
    ax.set_title(f"growth-factor ({p.name}, {p.strategy}): speedup vs g\n"
                 f"(hollow triangles: lower bounds, scratch never matched within {p.scratch_factor:g}x compute)",
                 fontsize=9)
    ax.legend(fontsize=8)
    files.append(save_figure(plt, fig, out / "speedup_vs_g.png"))

    fig, axes = plt.subplots(1, len(p.budgets), figsize=(4.8 * len(p.budgets), 4), squeeze=False)
    for ax, r in zip(axes[0], p.budgets):
        sub = sorted((x for x in rows if x["budget"] == r), key=lambda x: x["factor"])
        limit = p.scratch_factor * max(x["total_flops"] for x in sub)
        pts = [(f, l) for f, l in scratch if 0 < f <= limit]
        ax.plot([f for f, _ in pts], [l for _, l in pts], color="black", lw=1.5, label="scratch")
        for i, x in enumerate(sub):
            color = plt.get_cmap("plasma")(i / max(1, len(sub) - 1) * 0.85)
            c = [(f, l) for f, l in x["curve"] if f > 0]
            ax.plot([f for f, _ in c], [l for _, l in c], color=color, lw=1, label=f"g = {x['factor']:g}")
            ax.scatter([x["total_flops"]], [x["final_loss"]], color=color, s=12, zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("training compute (FLOPs)")
        ax.set_ylabel("val loss (nats/token)")
        ax.set_title(f"budget r = {r:g} tokens/parameter", fontsize=10)
        finals = [x["final_loss"] for x in sub] + [l for _, l in pts]
        lo = min(finals)
        ax.set_ylim(lo - 0.1, lo + 2.0)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"growth-factor ({p.name}): val loss vs compute (small model, then grown)")
    fig.tight_layout()
    files.append(save_figure(plt, fig, out / "loss_vs_compute.png"))
    return files


def write_report(out: Path, p, rows, scratch, meta: dict) -> list[Path]:
    rows = sorted(rows, key=lambda x: (x["factor"], x["budget"]))
    files = [write_csv(out / "results.csv", rows, COLUMNS)]
    tps, fpt = meta["tokens_per_step"], meta["flops_per_token_target"]
    files.append(write_csv(out / "scratch_curve.csv",
                           [{"step": round(f / (tps * fpt)), "tokens": round(f / fpt), "flops": f, "val_loss": l}
                            for f, l in scratch], ("step", "tokens", "flops", "val_loss")))
    plots = _plots(out, p, rows, scratch)
    files += plots
    s_flops, s_loss = [f for f, _ in scratch], [l for _, l in scratch]

    L = [f"# Growth-factor study, preset `{p.name}`", "",
         f"Which growth factor pays off, following {PAPER}. Protocol, compute and speedup "
         f"definitions: [docs/studies.md](../../docs/studies.md).", "", "## Preset", ""]
    L += [f"- {line}" for line in p.describe()]
    L.append(f"- target: {meta['params_target']:,} non-embedding parameters N, "
             f"{fmt(meta['flops_per_token_target'])} training FLOPs per token; {tps} tokens per step")
    L.append(f"- data: TinyStories, {meta['train_tokens']:,} train / {meta['valid_tokens']:,} validation tokens "
             f"(byte-level BPE, vocab {meta['vocab_size']}; cache key {meta['corpus_key']})")
    L.append(f"- scratch: one run of {meta['scratch_steps']} steps ({meta['scratch_steps'] * tps:,} tokens) = "
             f"{p.scratch_factor:g}x the largest grown run's compute; the scratch run of each grown run is its "
             f"prefix up to {p.scratch_factor:g}x that run's compute (constant LR after warmup and a fixed data "
             f"order make the prefix identical to a shorter run)")
    if p.name == "smoke":
        L.append(f"- {SMOKE_NOTE}")
    if meta["train_tokens"] < max(x["small_tokens"] + x["grown_tokens"] for x in rows):
        L.append(f"- the longest runs see more tokens than the training split holds "
                 f"({meta['train_tokens']:,}): they repeat data (random windows), so val loss at large budgets "
                 f"also reflects repetition")
    L += ["", "Sizes and steps (steps = budget x parameters / tokens per step):", ""]
    head = ["g", "small d_model", "heads", "d_ff", "N_s"] + [f"small / grown steps, r={r:g}" for r in p.budgets]
    table = []
    for g in p.factors:
        sub = {x["budget"]: x for x in rows if x["factor"] == g}
        any_ = next(iter(sub.values()))
        table.append([f"{g:g}", any_["small_d_model"], any_["small_n_head"], any_["small_d_ff"],
                      any_["params_small"]] + [f"{sub[r]['small_steps']} / {sub[r]['grown_steps']}" for r in p.budgets])
    L += [md_table(head, table), ""]

    L += ["## Run", "", f"- command: `{meta['command']}`",
          f"- wall time of this invocation: {fmt_seconds(meta['wall_seconds'])} ({meta['computed']} runs "
          f"computed, {meta['cached']} read from the cache); compute time of all runs: "
          f"{fmt_seconds(meta['compute_seconds'])} (scratch {fmt_seconds(meta['scratch_seconds'])})",
          f"- device: {meta['device']}, torch threads: {meta['threads'] or 'default'}", ""]

    L += ["## Speedup", "",
          "`speedup(g, r) = C_scratch(L_grown) / C_grown`: the compute scratch needs to reach the grown run's "
          "final val loss over the grown run's compute (small model included). `>x`: scratch did not reach it "
          f"within {p.scratch_factor:g}x the grown run's compute, so x is a lower bound.", ""]
    sp = {(x["factor"], x["budget"]): x for x in rows}
    L += [md_table(["g \\ r"] + [f"r = {r:g}" for r in p.budgets],
                   [[f"{g:g}"] + [sp[(g, r)]["speedup_text"] for r in p.budgets] for g in p.factors]), ""]
    L += ["Largest growth factor whose speedup is > 1, per budget:", ""]
    table = []
    for r in p.budgets:
        g, all_smaller = largest_paying_factor(rows, p.factors, r)
        table.append([f"{r:g}", "none" if g is None else f"{g:g}",
                      "-" if g is None else ("yes" if all_smaller else "no"),
                      ", ".join(f"{h:g}: {sp[(h, r)]['speedup_text']}" for h in p.factors)])
    L += [md_table(["budget r", "largest g with speedup > 1", "every smaller g > 1 too", "speedups"], table), ""]

    L += ["## Losses", "", "Val loss of the small model at growth, right after growth, at the end of the grown "
          "run, and of scratch at the same compute (interpolated).", ""]
    table = []
    for x in rows:
        at = interpolate(s_flops, s_loss, x["total_flops"])
        table.append([f"{x['factor']:g}", f"{x['budget']:g}", x["loss_small"], x["loss_after_growth"],
                      x["final_loss"], at, x["total_flops"], x["scratch_flops_to_match"]])
    L += [md_table(["g", "r", "small at growth", "after growth", "grown final", "scratch at equal compute",
                    "grown compute", "scratch compute to match"], table), ""]

    L += plots_section(plots, "`speedup_vs_g.png`: speedup against g per budget (hollow triangles are lower bounds). "
              "`loss_vs_compute.png`: val loss against compute per budget, scratch and each grown run "
              "(small-model phase, then the grown model; the dot is the end).")
    L += ["", f"Rows: `results.csv` (one row per (g, r)); scratch curve: `scratch_curve.csv`; each run's "
          f"curves and config: `runs/<key>.json`."]
    files.append(write_text(out / "report.md", "\n".join(L) + "\n"))
    return files
