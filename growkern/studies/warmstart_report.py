"""The warmstart study's report: rankings per regime and lag, selector correlations,
the comparison with the paper's findings, results.csv and the plots."""
from __future__ import annotations

from pathlib import Path

from .. import metrics
from .presets import SMOKE_NOTE
from .progress import fmt_seconds
from .report import fmt, md_table, mean, plots_section, pyplot, save_figure, write_csv, write_text
from .warmstart import COLUMNS, PRESERVING, SELECTORS

PAPER = "Preservation Is Not Enough for Width Growth (arXiv 2604.04281)"
LOG_SELECTORS = ("pres_kl", "probe_escape")  # >= 0, spanning many decades (0 drawn at 1e-16)
SAME_TOL = 1e-4  # nats: mean curves this close at every eval step are named as coinciding in the legend


def ranking(rows, regime: str, strategies, column: str) -> list[tuple[str, float]]:
    """(strategy, mean of column over checkpoints and seeds), best (lowest) first."""
    means = [(s, mean(r[column] for r in rows if r["regime"] == regime and r["strategy"] == s))
             for s in strategies]
    return sorted(means, key=lambda t: t[1])


def selector_correlations(rows, regime: str) -> dict[str, float]:
    sub = [r for r in rows if r["regime"] == regime]
    return {sel: metrics.spearman([r[sel] for r in sub], [r["final_loss"] for r in sub]) for sel in SELECTORS}


def _rank_of(order, strategy):
    names = [s for s, _ in order]
    return names.index(strategy) + 1 if strategy in names else None


def _gap(order, strategy) -> str:
    d = dict(order)
    return f"{fmt(d[strategy] - order[0][1], 4)} nats" if strategy in d else "-"


def comparison(rows, p, ranks, corr) -> str:
    """A plain paragraph: where our rankings agree and disagree with the paper."""
    lag, end = p.probe_lag, p.continuation
    agree, disagree = [], []
    regimes = [r for r in ("deterministic", "stochastic") if r in p.regimes]

    def claim(ok, yes, no):
        (agree if ok else disagree).append(yes if ok else no)

    if "exact_copy" in p.strategies:
        for regime in regimes:
            first = ranks[(regime, "probe")][0][0]
            rk = _rank_of(ranks[(regime, "probe")], "exact_copy")
            claim(first == "exact_copy",
                  f"exact_copy ranks first in the {lag}-step probe of the {regime} regime",
                  f"in the {lag}-step probe of the {regime} regime exact_copy ranks {rk}, "
                  f"{_gap(ranks[(regime, 'probe')], 'exact_copy')} behind {first}")
        if "stochastic" in regimes:
            first = ranks[("stochastic", "final")][0][0]
            rk = _rank_of(ranks[("stochastic", "final")], "exact_copy")
            claim(first == "exact_copy",
                  f"exact_copy ranks first after the {end}-step stochastic continuation",
                  f"after the {end}-step stochastic continuation exact_copy ranks {rk}, "
                  f"{_gap(ranks[('stochastic', 'final')], 'exact_copy')} behind {first}")
    if "structured" in p.strategies and "deterministic" in regimes:
        first = ranks[("deterministic", "final")][0][0]
        rk = _rank_of(ranks[("deterministic", "final")], "structured")
        claim(first == "structured",
              f"the structured non-clone start wins the {end}-step deterministic continuation",
              f"the {end}-step deterministic continuation is won by {first}, not by the structured "
              f"start (rank {rk}, {_gap(ranks[('deterministic', 'final')], 'structured')} behind)")
    # preservation as a selector
    rhos = {reg: corr[reg]["pres_kl"] for reg in regimes}
    strong = all(rho == rho and rho >= 0.5 for rho in rhos.values())
    rho_txt = ", ".join(f"{fmt(v, 2)} ({k})" for k, v in rhos.items())
    pres = [s for s in PRESERVING if s in p.strategies]
    spread = ""
    if len(pres) >= 2:
        spreads = []
        for reg in regimes:
            finals = [m for s, m in ranks[(reg, "final")] if s in pres]
            spreads.append(f"{fmt(max(finals) - min(finals), 4)} nats ({reg})")
        spread = (f"; the preserving strategies ({', '.join(pres)}) all have pres_kl at rounding level "
                  f"yet their mean final losses span {', '.join(spreads)}")
    claim(not strong,
          f"preservation at step 0 is not a universal selector: Spearman(pres_kl, final_loss) is "
          f"{rho_txt}{spread}",
          f"here step-0 preservation does predict the final loss in every regime (Spearman(pres_kl, "
          f"final_loss) = {rho_txt}){spread}")

    text = [f"The paper ({PAPER}) finds that exact-copy symmetric warm starts rank first in every "
            f"16-step probe and in stochastic 128-step continuations, while the structured non-clone "
            f"start wins deterministic 128-step continuation, and that preservation at step 0 is not a "
            f"universal selector."]
    if agree:
        text.append("We agree where " + "; ".join(agree) + ".")
    if disagree:
        text.append("We disagree where " + "; ".join(disagree) + ".")
    text.append(f"(Rankings are means over {len(p.checkpoints)} checkpoints x {len(p.seeds)} seeds; "
                f"this preset's probe lag is {lag} and its continuation {end} steps"
                + ("; at this scale mean differences of a few thousandths of a nat are within seed noise"
                   if p.name != "paper" else "") + ".)")
    return " ".join(text)


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
        sub = [r for r in rows if r["regime"] == regime]
        rho = selector_correlations(rows, regime)
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
    rows = sorted(rows, key=lambda r: (p.regimes.index(r["regime"]), r["checkpoint"], r["seed"],
                                       p.strategies.index(r["strategy"])))
    files = [write_csv(out / "results.csv", rows, COLUMNS)]
    ranks = {}
    for regime in p.regimes:
        ranks[(regime, "probe")] = ranking(rows, regime, p.strategies, "probe_loss")
        ranks[(regime, "final")] = ranking(rows, regime, p.strategies, "final_loss")
    corr = {regime: selector_correlations(rows, regime) for regime in p.regimes}
    plots = _plots(out, p, rows)
    files += plots

    L = [f"# Warmstart study, preset `{p.name}`", "",
         f"Which warm start to continue from after width growth, following {PAPER}. "
         f"Protocol and metric definitions: [docs/studies.md](../../docs/studies.md).", "",
         "## Preset", ""]
    L += [f"- {line}" for line in p.describe()]
    L.append(f"- data: TinyStories, {meta['train_tokens']:,} train / {meta['valid_tokens']:,} validation "
             f"tokens (byte-level BPE, vocab {meta['vocab_size']}; cache key {meta['corpus_key']})")
    if p.name == "smoke":
        L.append(f"- {SMOKE_NOTE}")
    L += ["", "## Run", "",
          f"- command: `{meta['command']}`",
          f"- wall time of this invocation: {fmt_seconds(meta['wall_seconds'])} "
          f"({meta['computed']} continuations computed, {meta['cached']} read from the cache); "
          f"compute time of all {len(rows)} continuations: {fmt_seconds(meta['compute_seconds'])}",
          f"- device: {meta['device']}, torch threads: {meta['threads'] or 'default'}", ""]

    L += ["## Rankings", "",
          f"Mean over {len(p.checkpoints)} checkpoints x {len(p.seeds)} seeds; rank 1 is best. "
          f"Lag {p.probe_lag} ranks by `probe_loss`, the end (step {p.continuation}) by `final_loss`.", ""]
    for regime in p.regimes:
        probe = dict(ranks[(regime, "probe")])
        final = dict(ranks[(regime, "final")])
        table = []
        for s, _ in ranks[(regime, "final")]:
            sub = [r for r in rows if r["regime"] == regime and r["strategy"] == s]
            table.append([s, _rank_of(ranks[(regime, "probe")], s), probe[s], _rank_of(ranks[(regime, "final")], s),
                          final[s], mean(r["auc"] for r in sub), mean(r["pres_kl"] for r in sub),
                          mean(r["pres_dloss"] for r in sub), mean(r["probe_kl"] for r in sub),
                          mean(r["probe_rms"] for r in sub), mean(r["probe_escape"] for r in sub)])
        L += [f"### {regime} regime", "",
              md_table(["strategy", f"rank @{p.probe_lag}", "probe_loss", f"rank @{p.continuation}",
                        "final_loss", "auc", "pres_kl", "pres_dloss", "probe_kl", "probe_rms", "probe_escape"],
                       table), ""]

    L += ["## Selectors", "",
          "Spearman rank correlation of each selector with `final_loss`, over all candidates x "
          "checkpoints x seeds of a regime (positive: a larger selector value goes with a worse final "
          "loss).", ""]
    L += [md_table(["selector"] + list(p.regimes), [[sel] + [corr[r][sel] for r in p.regimes] for sel in SELECTORS]),
          ""]
    L += ["## Comparison with the paper", "", comparison(rows, p, ranks, corr), ""]

    L += ["## Final loss per checkpoint", "", "Mean over seeds.", ""]
    for regime in p.regimes:
        table = []
        for s in p.strategies:
            table.append([s] + [mean(r["final_loss"] for r in rows if r["regime"] == regime
                                     and r["strategy"] == s and r["checkpoint"] == c) for c in p.checkpoints])
        L += [f"### {regime} regime", "", md_table(["strategy"] + [f"ckpt {c}" for c in p.checkpoints], table), ""]

    L += plots_section(plots, "`curves_<regime>.png`: val loss after growth per strategy (mean over seeds; the dotted "
              "line marks the probe lag, the dashed one the base model; candidates off the zoomed scale "
              "are named in the panel), and below it each candidate's gap to the best one at that step "
              "(symlog); the legend names curves that coincide with another within 1e-4 nats. "
              "`selectors.png`: each selector "
              "against the final loss, per regime.")
    L += ["", f"Rows: `results.csv` ({len(rows)} rows: candidate x regime x checkpoint x seed); each run's "
          f"curve and config: `runs/<key>.json`."]
    files.append(write_text(out / "report.md", "\n".join(L) + "\n"))
    return files
