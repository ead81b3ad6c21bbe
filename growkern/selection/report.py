"""A selection's result: the ranking with paired differences to the best, and its files.

Selection.rows holds one dict per candidate (means over repeats); Selection.runs one
per (candidate, repeat), with its training-loss curve. The best candidate has the
lowest mean held-out loss at the end (at the probe when budget=0); candidates within
`tol` nats of it in every repeat are ties, and among ties the first in the order
given wins (list the one you prefer first). With two or more repeats each other
candidate's paired difference to the best gets a Student t interval over repeats.

The report also says how far a short probe can be trusted in the chosen regime, from
growkern's own warm-start study when its committed results are beside the package
(results/warmstart-cpu/results.csv): how often the probe's winner was the winner of
the long continuation, and the rank correlation between the two.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..studies import stats
from ..studies.render import fmt, md_table, pyplot, save_figure, write_csv, write_text
from ..studies.render import mean as _mean

ROW_COLUMNS = ("rank", "candidate", "strategy", "status", "final_loss", "probe_loss", "loss_step0", "dloss_step0",
               "pres_kl", "escape", "diff_to_best", "diff_lo", "diff_hi", "repeats", "seconds")
STUDY_RESULTS = Path(__file__).resolve().parents[2] / "results" / "warmstart-cpu" / "results.csv"


@dataclass
class Selection:
    rows: list  # one dict per candidate, ranked (ROW_COLUMNS)
    runs: list  # one dict per (candidate, repeat)
    best: str
    metric: str  # "final_loss", or "probe_loss" when budget = 0
    tol: float
    settings: dict = field(default_factory=dict)
    growth: object = None  # the winner's GrowthReport when applied

    @classmethod
    def from_runs(cls, runs, names, *, metric, tol, **settings) -> "Selection":
        by = {n: sorted((r for r in runs if r["candidate"] == n), key=lambda r: r["repeat"]) for n in names}
        means = {n: _mean([r[metric] for r in by[n]]) for n in names}
        order = sorted(names, key=lambda n: (means[n], names.index(n)))
        best = order[0]
        tied = [n for n in names if all(abs(a[metric] - b[metric]) <= tol for a, b in zip(by[n], by[best]))]
        best = tied[0]  # the first listed among the ties
        order = [best] + [n for n in order if n != best]
        rows = []
        for rank, n in enumerate(order, start=1):
            rs = by[n]
            d = [a[metric] - b[metric] for a, b in zip(rs, by[best])]
            if len(d) >= 2 and n != best:
                est, lo, hi = stats.paired_diff_ci(d, [0.0] * len(d), method="t")
            else:
                est, lo, hi = _mean(d), math.nan, math.nan
            if n == best:
                status = "best"
            elif n in tied:
                status = f"tie (within {tol:g} nats in every repeat)"
            elif math.isnan(lo):
                status = "behind (1 repeat: no interval)"
            elif lo > 0:
                status = "worse"
            else:
                status = "not separated"
            rows.append({
                "rank": rank, "candidate": n, "strategy": rs[0]["strategy"], "status": status,
                "final_loss": _mean([r["final_loss"] for r in rs]), "probe_loss": _mean([r["probe_loss"] for r in rs]),
                "loss_step0": _mean([r["loss_step0"] for r in rs]),
                "dloss_step0": _mean([r["loss_step0"] - r["loss_small"] for r in rs]),
                "pres_kl": _mean([r["pres_kl"] for r in rs]), "escape": _mean([r["escape"] for r in rs]),
                "diff_to_best": est, "diff_lo": lo, "diff_hi": hi, "repeats": len(rs),
                "seconds": sum(r["seconds"] for r in rs)})
        return cls(rows=rows, runs=list(runs), best=best, metric=metric, tol=tol, settings=settings)

    def __str__(self) -> str:
        return self.report()

    def report(self) -> str:
        """The ranking as markdown: settings, table, what it means, how far a probe is trusted."""
        s = self.settings
        steps = s.get("budget") or s.get("probe_steps")
        at = f"after {steps} steps" if self.metric == "final_loss" else f"at the {steps}-step probe (budget 0)"
        lines = [
            "# Which warm start to continue from", "",
            f"Grown to {', '.join(f'{k} {v:g}' for k, v in s.get('targets', {}).items())}; "
            f"{len(self.rows)} candidates x {s.get('repeats', 1)} repeat(s), continued {steps} steps in the "
            f"{s.get('regime')} regime; held-out loss of the small model {fmt(s.get('loss_small'))}. "
            f"Ranked by the mean held-out loss {at}; differences within {self.tol:g} nats are ties.", "",
            md_table(["rank", "candidate", "status", "final loss", f"probe ({s.get('probe_steps')} steps)",
                      "step-0 loss change", "update escape", "loss - best [95% CI]", "time"],
                     [[r["rank"], r["candidate"], r["status"], r["final_loss"], r["probe_loss"], r["dloss_step0"],
                       r["escape"], _diff_text(r), f"{r['seconds']:.1f}s"] for r in self.rows]), "",
            f"**Continue from `{self.best}`.** " + _meaning(self), "",
            "Columns: the step-0 loss change is the grown model's held-out loss before training minus the "
            "small model's (0 for function-preserving growth up to float rounding); update escape is the "
            "fraction of the first probe-window update that leaves the cloned subspace (docs/studies.md).", "",
            "## How far a probe-only ranking can be trusted", "", trust_note(s.get("regime", "deterministic")),
        ]
        if self.growth is not None:
            lines += ["", "## Applied", "", "```", str(self.growth), "```"]
        return "\n".join(lines) + "\n"

    def write(self, out) -> list[Path]:
        """ranking.md, ranking.csv and curves.png (when matplotlib is there) into `out`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = [write_text(out / "ranking.md", self.report()), write_csv(out / "ranking.csv", self.rows, ROW_COLUMNS)]
        plt = pyplot()
        if plt is not None:
            files.append(self._plot(plt, out / "curves.png"))
        return files

    def _plot(self, plt, path):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in self.rows:
            runs = [x for x in self.runs if x["candidate"] == r["candidate"]]
            n = min(len(x["train_losses"]) for x in runs)
            curve = [_mean([x["train_losses"][i] for x in runs]) for i in range(n)]
            k = max(1, n // 16)  # a running mean over ~1/16 of the run: training losses are noisy
            smooth = [_mean(curve[max(0, i - k + 1):i + 1]) for i in range(n)]
            line, = ax.plot(range(1, n + 1), smooth, lw=1.2, label=r["candidate"])
            pts = [(0, r["loss_step0"]), (self.settings.get("probe_steps"), r["probe_loss"])]
            if self.metric == "final_loss":
                pts.append((self.settings.get("budget"), r["final_loss"]))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--", color=line.get_color(), ms=4, lw=0.8)
        ax.set_xlabel("steps after growth")
        ax.set_ylabel("loss (lines: training, running mean; dots: held-out)")
        ax.legend(fontsize=8)
        ax.set_title("warm-start candidates after growth")
        return save_figure(plt, fig, path)


def _diff_text(r) -> str:
    if r["status"] == "best":
        return "-"
    d = fmt(r["diff_to_best"])
    return d if math.isnan(r["diff_lo"]) else f"{d} [{fmt(r['diff_lo'])}, {fmt(r['diff_hi'])}]"


def _meaning(sel: Selection) -> str:
    ties = [r["candidate"] for r in sel.rows if r["status"].startswith("tie")]
    worse = [r["candidate"] for r in sel.rows if r["status"] == "worse"]
    open_ = [r["candidate"] for r in sel.rows if r["status"] in ("not separated", "behind (1 repeat: no interval)")]
    parts = []
    if ties:
        parts.append(f"{', '.join(ties)} tie with it (the same losses up to float noise: the choice among them "
                     f"does not matter here)")
    if worse:
        parts.append(f"{', '.join(worse)} are worse by an interval that excludes 0")
    if open_:
        why = ("their intervals include 0: more repeats (or a longer budget) would separate them"
               if sel.settings.get("repeats", 1) > 1 else "with one repeat there is no interval: rerun with "
                                                           "repeats >= 3 before trusting small differences")
        parts.append(f"{', '.join(open_)} are behind, but {why}")
    return "; ".join(parts) + "." if parts else ""


def trust_note(regime: str, path: Path = STUDY_RESULTS) -> str:
    """How often, in growkern's warm-start study, the probe's winner was the final winner."""
    if not path.is_file():
        return ("growkern's warm-start study (results/warmstart-cpu) is not beside this installation, so there "
                "is no measured rate here; see docs/studies.md, Study 1.")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    from ..studies.warmstart.design import PAPER_FAMILIES
    main = [r for r in rows if r.get("regime") == regime and r.get("candidate") in PAPER_FAMILIES + ("szp",)]
    if not main:
        return f"growkern's warm-start study has no {regime} rows; see docs/studies.md, Study 1."
    cells: dict = {}
    for r in main:
        cells.setdefault((r["base_seed"], r["checkpoint"]), []).append(r)
    agree = 0
    rhos = []
    for rs in cells.values():
        probe = stats.snap_ties([float(r["probe_loss"]) for r in rs], stats.TIE_TOL)
        final = stats.snap_ties([float(r["final_loss"]) for r in rs], stats.TIE_TOL)
        winners = {i for i, v in enumerate(final) if v == min(final)}
        agree += min(range(len(rs)), key=lambda i: probe[i]) in winners
        rho = stats.spearman(probe, final)
        if not math.isnan(rho):
            rhos.append(rho)
    lag = {r.get("probe_lag") for r in main} - {None}
    rho, lo, hi = stats.bootstrap_ci(rhos, method="t") if len(rhos) >= 2 else (_mean(rhos), math.nan, math.nan)
    return (f"In growkern's warm-start study ({regime} regime; {len(cells)} checkpoint cells of a 4-layer, d_model "
            f"64 GPT grown x2 on TinyStories; candidates {', '.join(sorted({r['candidate'] for r in main}))}), the "
            f"candidate best at the short probe was also best after the full continuation in {agree} of "
            f"{len(cells)} cells, and the within-cell Spearman correlation of probe and final loss was "
            f"{rho:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if not math.isnan(lo) else "")
            + (f" (probe lag {', '.join(sorted(lag))})" if lag else "")
            + ". A model and data unlike the study's may differ: when the budget allows, rank by a continuation "
              "as long as the one you care about.")
