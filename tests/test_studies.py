"""The studies end to end on the smoke preset: outputs, caching and resumption, and
known answers of the study wiring (docs/studies.md)."""
import csv
import math
from pathlib import Path

import pytest

import growkern.train.loop
from growkern.studies import run_growth_factor, run_warmstart
from growkern.studies.__main__ import main as studies_main
from growkern.studies.growth_factor import design as gf_design
from growkern.studies.warmstart.design import COLUMNS as WS_COLUMNS, PRESERVING

REAL = Path(__file__).resolve().parents[2] / "shared/data/tinystories"
pytestmark = pytest.mark.skipif(not (REAL / "train.txt").is_file(),
                                reason="TinyStories sample not found at ../shared/data/tinystories")

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a cached study trained something")
    monkeypatch.setattr(growkern.train.loop, "train", fail)


def assert_png(path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- warmstart --------------------------------------------------------------------

@pytest.fixture(scope="module")
def warmstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("warmstart")
    # two worker processes: the pool's path; results must not depend on it (rerun test below)
    return out, run_warmstart("smoke", out, data=REAL, progress=False, workers=2)


# smoke: per (base seed, checkpoint) 4 main candidates and perturb / perturb_np at noise 0.1
# in 3 regimes, 4 references and 3 re-warmed ones in 2 regimes
SMOKE_ROWS = (4 * 3 + 2 * 3 + 4 * 2 + 3 * 2) * 2 * 2


def test_warmstart_outputs(warmstart):
    out, res = warmstart
    assert res.computed == SMOKE_ROWS and res.cached == 0
    columns, rows = read_csv(out / "results.csv")
    assert tuple(columns) == WS_COLUMNS
    combos = {(r["candidate"], r["regime"], r["checkpoint"], r["base_seed"]) for r in rows}
    assert len(rows) == len(combos) == len({r["key"] for r in rows}) == SMOKE_ROWS  # no duplicate runs
    assert {r["checkpoint"] for r in rows} == {"20", "40"} and {r["base_seed"] for r in rows} == {"0", "1"}
    assert {r["schedule"] for r in rows if r["strategy"] in ("szp", "scratch")} == {"restart"}
    assert {r["candidate"] for r in rows if r["group"] == "noise"} == {"perturb@0.1", "perturb_np@0.1"}
    for r in rows:
        grown = r["candidate"] != "small_equal_compute"  # growth metrics do not apply to it: empty
        for c in ("pres_kl", "pres_dloss", "escape0", "escape_1", "escape_4", "probe_kl", "probe_rms",
                  "probe_update_rms", "probe_escape", "probe_loss", "final_loss", "auc"):
            if grown or c.startswith(("probe_kl", "probe_rms", "probe_update", "probe_loss", "final", "auc")):
                assert math.isfinite(float(r[c])), (c, r)
            else:
                assert r[c] == "", (c, r)
    report = (out / "report.md").read_text()
    for text in ("preset `smoke`", "base model: d_model 16", "checkpoints at steps 20, 40", "wall time",
                 "## Findings", "Exact copy ranks first", "95% CI", "### deterministic regime",
                 "### shuffle regime", "### stochastic regime", "## Continue vs re-warm", "## Noise scale of perturb",
                 "## Selectors", "within, four families", "reduced grids", "Holm", "small_equal_compute",
                 "## Where structured's advantage comes from"):
        assert text in report, text
    assert any(v in report for v in ("**agree**", "**disagree**", "**inconclusive**"))
    if HAVE_MPL:
        for name in ("curves_deterministic.png", "curves_stochastic.png", "selectors.png"):
            assert_png(out / name)


def test_warmstart_known_answers(warmstart):
    out, _ = warmstart
    _, rows = read_csv(out / "results.csv")
    pick = lambda **kw: [r for r in rows if all(r[k] == v for k, v in kw.items())]  # noqa: E731
    # the update escapes the clone subspace only where something breaks the symmetry:
    # not for exact_copy in the deterministic regime; noise and dropout do
    for r in pick(candidate="exact_copy", regime="deterministic"):
        assert float(r["probe_escape"]) < 1e-10 and float(r["escape0"]) == 0
    for r in pick(candidate="perturb_np@0.1"):
        assert float(r["probe_escape"]) > 1e-8 and float(r["escape0"]) > 0
    for r in pick(candidate="exact_copy", regime="stochastic"):
        assert float(r["probe_escape"]) > 1e-6  # dropout breaks it too
    for r in pick(candidate="exact_copy", regime="shuffle"):
        assert float(r["probe_escape"]) < 1e-10  # another data order does not
    # more noise, more escape (the sweep)
    for cell in {(r["base_seed"], r["checkpoint"]) for r in rows}:
        one = lambda name: next(r for r in pick(candidate=name, regime="deterministic")  # noqa: E731
                                if (r["base_seed"], r["checkpoint"]) == cell)
        assert float(one("perturb@0.1")["escape0"]) > float(one("perturb")["escape0"])
    # step-0 preservation: exact for the preserving strategies (RMSNorm), not for szp
    for r in rows:
        if r["candidate"] == "small_equal_compute":
            continue  # not grown
        kl = float(r["pres_kl"])
        if r["strategy"] in PRESERVING:
            assert abs(kl) < 1e-9 * float(r["loss_small"]), r
            assert r["plan_preserving"] == "True"
        elif r["strategy"] == "szp":
            assert kl > 1e-4
    # different base seeds are different base models: every candidate differs between them
    for name in {r["candidate"] for r in rows}:
        for regime in ("deterministic", "shuffle", "stochastic"):
            a, b = (pick(candidate=name, regime=regime, checkpoint="40", base_seed=s) for s in ("0", "1"))
            if a:
                assert a[0]["loss_small"] != b[0]["loss_small"] and a[0]["final_loss"] != b[0]["final_loss"]


def test_warmstart_rerun_trains_nothing(warmstart, monkeypatch):
    out, _ = warmstart
    before = (out / "results.csv").read_text()
    no_training(monkeypatch)
    res = run_warmstart("smoke", out, data=REAL, progress=False, workers=1)
    assert (res.computed, res.cached, res.train_steps) == (0, SMOKE_ROWS, 0)
    assert (out / "results.csv").read_text() == before
    # the CLI on the same folder: everything cached as well
    assert studies_main(["warmstart", "--preset", "smoke", "--out", str(out), "--data", str(REAL),
                         "--quiet"]) == 0
    assert "python -m growkern.studies warmstart --preset smoke" in (out / "report.md").read_text()


def test_a_study_never_replaces_another_studys_report_unasked(warmstart, monkeypatch, capsys):
    out, _ = warmstart
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    no_training(monkeypatch)
    with pytest.raises(ValueError, match=r"holds the warmstart study; .* give another --out .* or --force"):
        run_growth_factor("smoke", out, data=REAL, progress=False)
    with pytest.raises(ValueError, match=r"holds preset 'smoke' \(differs in continuation\)"):
        run_warmstart("smoke", out, data=REAL, progress=False, continuation=64)
    with pytest.raises(ValueError, match=r"holds preset 'smoke' \(differs in .*name"):
        run_warmstart("cpu", out, data=REAL, progress=False)
    assert studies_main(["growth-factor", "--out", str(out), "--data", str(REAL), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: " in err and "Traceback" not in err
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before


def test_warmstart_interrupted_reruns_only_what_is_missing(warmstart):
    out, res = warmstart
    import json
    lost = sorted((out / "runs").glob("*.json"))[:2]  # as if the study stopped before them
    lost_steps = sum(json.loads(f.read_text())["result"]["train_steps"] for f in lost)
    for f in lost:
        f.unlink()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    before = strip(read_csv(out / "results.csv")[1])
    again = run_warmstart("smoke", out, data=REAL, progress=False, workers=1)
    assert (again.computed, again.cached) == (2, SMOKE_ROWS - 2)
    assert again.train_steps == lost_steps  # the base checkpoints are reused: continuations only
    assert strip(read_csv(out / "results.csv")[1]) == before  # bit-identical recomputation


def test_seeds_added_later_run_only_their_main_candidates(warmstart, tmp_path):
    """--seeds 0,1,2 on a finished 2-seed study computes seed 2's candidates but the re-warmed
    ones (sweep_seed_count keeps those on seeds 0 and 1), reuses the rest, and the findings
    count 3 seeds."""
    import shutil
    out, _ = warmstart
    shutil.copytree(out / "runs", tmp_path / "runs")
    shutil.copytree(out / "cache", tmp_path / "cache")
    shutil.copy(out / "study.json", tmp_path / "study.json")
    assert studies_main(["warmstart", "--preset", "smoke", "--out", str(tmp_path), "--data", str(REAL),
                         "--seeds", "0,1,2", "--quiet", "--workers", "1"]) == 2  # another preset: --force
    res = run_warmstart("smoke", tmp_path, data=REAL, progress=False, workers=1, force=True,
                        base_seeds=(0, 1, 2), sweep_seed_count=2)
    assert (res.computed, res.cached) == ((4 * 3 + 2 * 3 + 4 * 2) * 2, SMOKE_ROWS)
    _, rows = read_csv(tmp_path / "results.csv")
    assert {r["group"] for r in rows if r["base_seed"] == "2"} == {"main", "noise", "reference"}
    report = (tmp_path / "report.md").read_text()
    section = report[report.index("## Findings"):report.index("## Rankings")]
    findings = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "**" in line]
    assert findings and all(cols[3] == "3" for cols in findings)  # the n column
    with pytest.raises(ValueError, match=r"sweep_seed_count must be None \(every base seed\) or an int >= 0"):
        run_warmstart("smoke", tmp_path, data=REAL, progress=False, force=True, sweep_seed_count=-1)


def test_warmstart_intervals_take_the_base_seed_as_the_unit():
    """Two checkpoints of one base seed are not two independent draws: a quantity that is
    the same at both checkpoints of each seed has the CI of its per-seed values, n = seeds."""
    import numpy as np

    from growkern.studies import stats
    from growkern.studies.warmstart import report as wr

    cells = [(seed, ckpt) for seed in (0, 1, 2) for ckpt in (10, 20)]
    per_seed = {0: 0.010, 1: 0.013, 2: 0.007}
    x = np.array([per_seed[s] for s, _ in cells])
    assert wr.mean_ci(x, cells) == pytest.approx(stats.bootstrap_ci(list(per_seed.values()), method="t"))
    naive = stats.bootstrap_ci(x, method="t")  # six "units": a narrower, false interval
    assert naive[2] - naive[1] < wr.mean_ci(x, cells)[2] - wr.mean_ci(x, cells)[1]
    # a seed's checkpoints are averaged first; a missing cell leaves that seed's other one
    y = np.array([1.0, 3.0, 5.0, np.nan, 2.0, 2.0])
    assert list(wr.per_seed(y, cells)) == [2.0, 5.0, 2.0]
    assert wr.n_seeds(np.array([1.0, 2.0, np.nan, np.nan, 3.0, 4.0]), cells) == 2
    assert wr.cell_signs(np.array([-1.0, -2.0, 0.5, np.nan]), "< 0") == "2 of 3 cells < 0"


def test_rounding_noise_in_step0_preservation_ranks_nothing():
    """Exactly preserving candidates differ in pres_kl only by float32 rounding (~1e-13):
    that must tie them, not rank them. Synthetic cells where the rounding noise happens to
    follow the final loss: pres_kl is reported tied, and the probe finding compares the
    probe's correlation with 0."""
    from growkern.studies.warmstart import report as wr
    from growkern.studies.presets import get_preset

    p = get_preset("warmstart", "smoke", regimes=("deterministic",))
    final = {"exact_copy": 3.0, "perturb": 3.1, "asym_reset": 3.2, "structured": 2.9}
    rows = [{"regime": "deterministic", "candidate": c, "strategy": c, "group": "main", "base_seed": seed,
             "checkpoint": ckpt, "final_loss": f + 0.01 * seed, "auc": f, "probe_loss": f + 0.5,
             "pres_kl": 1e-13 * f, "pres_dloss": 1e-7 * f, **{k: 0.5 for k in wr.SELECTORS if k not in
                                                               ("probe_loss", "pres_kl", "pres_dloss")}}
            for seed in (0, 1, 2) for ckpt in (10, 20) for c, f in final.items()]
    cells = wr.cells_of(rows)
    table = wr.selector_table(rows, "deterministic", list(final), "final_loss")
    assert wr.rho_text(table["pres_kl"], cells) == ("tied in every cell", "tied")
    assert wr.rho_text(table["pres_dloss"], cells)[0] == "tied in every cell"
    probe = [f for f in wr.findings(rows, p, cells) if "probe_loss minus pres_kl" in f.claim]
    assert len(probe) == 3  # checkpoints 10 and 20, and pooled
    assert all(f.estimate == pytest.approx(1.0) and f.n == 3 for f in probe)
    assert rows[0]["pres_kl"] == 1e-13 * 3.0  # the raw values stay as measured


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed")
def test_warmstart_curve_plot_shows_every_candidate(tmp_path, monkeypatch):
    """Synthetic rows: perturb coincides with exact_copy (1e-6 nats), scratch lies far above
    the warm starts. Every candidate must still show, in its own style, and the pair is named."""
    from types import SimpleNamespace

    from matplotlib.colors import to_rgba

    from growkern.studies.warmstart import report as warmstart_report

    base = [4.0, 3.9, 3.85, 3.8, 3.78]
    shift = {"exact_copy": 0.0, "perturb": 1e-6, "structured": -0.03, "szp": 0.2, "scratch": 3.0}
    p = SimpleNamespace(name="synthetic", strategies=tuple(shift), regimes=("deterministic",), checkpoints=(10, 20),
                        probe_lag=2)
    rows = [{"regime": "deterministic", "checkpoint": c, "seed": seed, "candidate": s, "loss_small": 4.0,
             "curve": [[2 * i, y + d + 0.01 * seed] for i, y in enumerate(base)], "final_loss": base[-1] + d,
             "probe_loss": base[1] + d} for c in p.checkpoints for seed in (0, 1) for s, d in shift.items()]
    figs = []
    monkeypatch.setattr(warmstart_report, "SELECTORS", ("probe_loss",))  # a small selectors.png
    monkeypatch.setattr(warmstart_report, "save_figure", lambda plt, fig, path: figs.append(fig) or path)
    warmstart_report._plots(tmp_path, p, rows, p.strategies)
    fig = figs[0]  # curves_deterministic
    style = lambda ln: (to_rgba(ln.get_color()), ln.get_linestyle(), ln.get_marker())  # noqa: E731
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    entries = {t.get_text(): style(ln) for lg in legends for t, ln in zip(lg.get_texts(), lg.get_lines())}
    named = {s: next(t for t in entries if t.split(" ")[0] == s) for s in p.strategies}
    assert len({entries[t] for t in named.values()}) == len(p.strategies)  # no two share a style
    assert "exact_copy" in named["perturb"]  # the coinciding pair is named in the legend

    def shows(ax, ln):
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        return ln.get_visible() and any(x0 <= x <= x1 and y0 <= y <= y1 for x, y in ln.get_xydata())

    for s, text in named.items():
        for c in range(len(p.checkpoints)):  # in every checkpoint's column of panels
            column = [ax for ax in fig.axes if ax.get_subplotspec().colspan.start == c]
            assert any(shows(ax, ln) for ax in column for ln in ax.get_lines() if style(ln) == entries[text]), (s, c)
    for f in figs:
        warmstart_report.pyplot().close(f)


# --- growth factor ----------------------------------------------------------------

@pytest.fixture(scope="module")
def growth(tmp_path_factory):
    out = tmp_path_factory.mktemp("growth")
    return out, run_growth_factor("smoke", out, data=REAL, progress=False, workers=2)


# smoke: szp at factors 1.5, 2, 4, and exact_copy and perturb at 2 and 4, x budgets 1, 2 x seeds 0, 1
GF_SMOKE_ROWS = (3 + 2 * 2) * 2 * 2


def test_growth_factor_outputs(growth):
    out, res = growth
    columns, all_rows = read_csv(out / "results.csv")
    assert tuple(columns) == gf_design.COLUMNS
    assert len(all_rows) == GF_SMOKE_ROWS
    assert {(r["factor"], r["strategy"]) for r in all_rows} == {
        ("1.5", "szp"), ("2", "szp"), ("4", "szp"), ("2", "exact_copy"), ("4", "exact_copy"), ("2", "perturb"),
        ("4", "perturb")}
    rows = [r for r in all_rows if r["strategy"] == "szp"]
    assert {(r["factor"], r["budget"], r["seed"]) for r in rows} == {
        (g, b, s) for g in ("1.5", "2", "4") for b in ("1", "2") for s in ("0", "1")}
    for r in all_rows:
        assert r["growth_seed"] == "0"
        assert r["parameterization"] == "mup" and r["mup_base_width"] == "24"  # one base width: the target's
        assert float(r["param_ratio"]) == pytest.approx(int(r["params_target"]) / int(r["params_small"]))
        assert float(r["speedup"]) > 0
        assert r["speedup_text"] == (f"{float(r['speedup']):.2f}" if r["speedup_exact"] == "True"
                                     else f">{float(r['speedup']):.2f}")
        # small model on r N_s tokens, grown model on r N tokens (rounded to whole steps)
        assert abs(int(r["small_tokens"]) - float(r["budget"]) * int(r["params_small"])) <= 128
        assert abs(int(r["grown_tokens"]) - float(r["budget"]) * int(r["params_target"])) <= 128
    assert {r["small_d_model"] for r in rows} == {"16", "12", "6"}  # d_model / g at head_dim 2
    # the parameter ratio grows faster than the width ratio (~g^2 for the hidden matrices)
    ratio = {r["factor"]: float(r["param_ratio"]) for r in rows}
    assert 1.5 < ratio["1.5"] < ratio["2"] < ratio["4"] and ratio["4"] > 4 * 2
    # the seeds differ (init and data order), the growth noise does not
    by = {(r["factor"], r["budget"], r["seed"]): r for r in rows}
    assert by[("2", "2", "0")]["loss_small"] != by[("2", "2", "1")]["loss_small"]
    _, scratch = read_csv(out / "scratch_curve.csv")
    assert {r["seed"] for r in scratch} == {"0", "1"}
    total = max(float(r["total_flops"]) for r in rows)
    for seed in ("0", "1"):
        last = [r for r in scratch if r["seed"] == seed][-1]
        assert float(last["flops"]) >= 2 * total * (1 - 1e-9)  # twice the largest grown run
    columns, summary = read_csv(out / "summary.csv")
    assert len(summary) == (3 + 2 * 2) * 2
    for s in summary:
        sub = [float(r["speedup"]) for r in all_rows
               if (r["strategy"], r["factor"], r["budget"]) == (s["strategy"], s["factor"], s["budget"])]
        assert s["n_seeds"] == "2" and s["ci_method"] == "t"
        assert float(s["speedup_mean"]) == pytest.approx(sum(sub) / 2)
        assert float(s["speedup_lo"]) <= min(sub) and float(s["speedup_hi"]) >= max(sub)
    report = (out / "report.md").read_text()
    for text in ("preset `smoke`", "## Speedup", "| g (width) | N/N_s (params) |", "Largest growth factor",
                 "wall time", "budgets r: 1, 2", "growth factors g (width ratio): 1.5, 2, 4", "## Findings",
                 "muP, base width 24", "Student t", "paper: growth pays off (speedup > 1) at g = 2",
                 "paper: the speedup diminishes as the budget grows",
                 "paper: there is an upper bound on g beyond which growth does not pay"):
        assert text in report, text
    # the findings: g = 2 over the budgets and per budget (3), slope, upper bound, g = 2 vs 4,
    # reliability against 1.5 and 4 (2 x 2), szp against exact_copy and perturb at 2 and 4 (4)
    verdicts = [line for line in report.splitlines()
                if line.startswith("- **") and line.split("**")[1] in ("agree", "disagree", "inconclusive")]
    assert len(verdicts) == 14 and all("(Holm: **" in line for line in verdicts)
    assert "partial report" not in report
    if HAVE_MPL:
        for name in ("speedup_vs_g.png", "loss_vs_compute.png"):
            assert_png(out / name)


def test_growth_factor_runs_are_mup_with_the_targets_base_width(growth):
    """Every model of the study, small or grown or scratch, is muP with base width = the
    target's d_model; szp restarts the schedule (the strategy's default)."""
    out, _ = growth
    import json
    kinds = {}
    for f in (out / "runs").glob("*.json"):
        cfg = json.loads(f.read_text())["config"]
        kinds.setdefault(cfg["kind"], []).append(cfg)
    assert len(kinds["gf-grown"]) == GF_SMOKE_ROWS and len(kinds["gf-scratch-result"]) == 2 * 2  # seeds x segments
    for cfg in kinds["gf-grown"]:
        assert cfg["target"]["parameterization"] == "mup" and cfg["target"]["mup_base_width"] == 24
        assert cfg["growth_schedule"] is None and cfg["growth_seed"] == 0
        assert cfg["strategy"] in ("szp", "exact_copy", "perturb") and cfg["strategy_options"] == {}
    ckpts = list((out / "cache" / "small").glob("*/step-*"))
    assert ckpts
    from growkern.train import checkpoint as ckpt_mod
    ck = ckpt_mod.load(ckpts[0])
    assert ck.model.config.parameterization == "mup" and ck.model.config.mup_base_width == 24
    assert ck.model.config.d_model < 24


def test_growth_factor_findings_known_answers():
    """The verdicts on synthetic speedups: two seeds that agree closely."""
    from growkern.studies.growth_factor.report import findings, summarize
    factors, budgets, seeds = (1.5, 2, 4), (5, 10, 20, 40), (0, 1)
    sp = {1.5: 1.6, 2: 1.5, 4: 0.7}  # pays at 1.5 and 2, not at 4
    rows = [{"factor": g, "budget": r, "seed": s, "param_ratio": g * g, "speedup_exact": True,
             "speedup": sp[g] - 0.1 * math.log2(r / 5) + 0.01 * s, "final_loss": 2.0,
             "speedup_text": "x"} for g in factors for r in budgets for s in seeds]
    got = {f.paper: f for f in findings(rows, factors, budgets, seeds)}
    assert got["growth pays off (speedup > 1) at g = 2"].verdict == "agree"
    slope = got["the speedup diminishes as the budget grows"]
    assert slope.verdict == "agree" and slope.estimate == pytest.approx(-0.1)
    assert got["there is an upper bound on g beyond which growth does not pay (speedup < 1)"].verdict == "agree"
    assert all(f.n == 2 for f in got.values())
    summary = summarize(rows, factors, budgets)
    cell = next(x for x in summary if x["factor"] == 2 and x["budget"] == 5)
    assert cell["speedup_mean"] == pytest.approx(1.505) and cell["speedup_lo"] < 1.5 < 1.51 < cell["speedup_hi"]
    # seeds that disagree widely: inconclusive, not agree
    noisy = [{**x, "speedup": x["speedup"] + (0.8 if x["seed"] else -0.8)} for x in rows]
    got = {f.paper: f for f in findings(noisy, factors, budgets, seeds)}
    assert got["growth pays off (speedup > 1) at g = 2"].verdict == "inconclusive"


def test_speedup_of_a_run_against_itself_is_one(growth):
    out, _ = growth
    _, scratch = read_csv(out / "scratch_curve.csv")
    scratch = [r for r in scratch if r["seed"] == "0"]
    flops = [float(r["flops"]) for r in scratch]
    losses = [float(r["val_loss"]) for r in scratch]
    k = losses.index(min(losses))  # a point of the curve that no earlier point reaches
    value, exact = gf_design.speedup_cell(flops, losses, flops[k], losses[k])
    assert exact and value == pytest.approx(1.0, rel=1e-12)
    # a loss scratch never reaches: its whole (2x-truncated) compute is a lower bound
    value, exact = gf_design.speedup_cell(flops, losses, flops[-1] / 4, min(losses) - 1)
    assert not exact and gf_design.speedup_text(value, exact).startswith(">")
    assert value <= 2.0


def test_growth_factor_rerun_and_resume(growth, monkeypatch):
    out, _ = growth
    before = (out / "results.csv").read_text()
    with monkeypatch.context() as m:
        no_training(m)
        res = run_growth_factor("smoke", out, data=REAL, progress=False, workers=1)
        assert (res.computed, res.train_steps) == (0, 0)
    assert (out / "results.csv").read_text() == before
    # a lost grown run is recomputed alone, from the kept small-model checkpoint
    _, rows = read_csv(out / "results.csv")
    row = next(r for r in rows if r["factor"] == "2" and r["budget"] == "2" and r["seed"] == "1"
               and r["strategy"] == "szp")
    (out / "runs" / f"{row['key']}.json").unlink()
    res = run_growth_factor("smoke", out, data=REAL, progress=False, workers=1)
    assert res.computed == 1 and res.train_steps == int(row["grown_steps"])
    _, again = read_csv(out / "results.csv")
    new = next(r for r in again if r["key"] == row["key"])
    assert new["final_loss"] == row["final_loss"]  # deterministic: the same run again, in another process
    assert new["speedup"] == row["speedup"]


def test_growth_exact_strategy_preserves_at_non_integer_factors(tmp_path):
    """RMSNorm makes exact_copy growth exact at g = 1.5 too (zero-padded residual), also
    under muP (the output multiplier is compensated)."""
    res = run_growth_factor("smoke", tmp_path, data=REAL, progress=False, strategy="exact_copy",
                            budgets=(1,), seeds=(0,), workers=1, compare_strategies=())
    for r in res.rows:
        assert r["loss_after_growth"] == pytest.approx(r["loss_small"], abs=1e-5), r["factor"]


def test_a_pool_worker_whose_study_died_while_it_started_exits():
    """The parent-death signal is armed in the worker's initializer; a study that died
    before that (the worker now has another parent) must not leave the worker running."""
    import subprocess
    import sys
    code = "from growkern.studies.pool import _init_worker; _init_worker(1, -1); print('still running')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "still running" not in r.stdout
