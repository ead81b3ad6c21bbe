"""The studies end to end on the smoke preset: outputs, caching and resumption, and
known answers of the study wiring (docs/studies.md)."""
import csv
import math
from pathlib import Path

import pytest

import growkern.train
from growkern.studies import growth_factor, run_growth_factor, run_warmstart
from growkern.studies.__main__ import main as studies_main
from growkern.studies.warmstart import COLUMNS as WS_COLUMNS, PRESERVING

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
    monkeypatch.setattr(growkern.train, "train", fail)


def assert_png(path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- warmstart --------------------------------------------------------------------

@pytest.fixture(scope="module")
def warmstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("warmstart")
    return out, run_warmstart("smoke", out, data=REAL, progress=False)


def test_warmstart_outputs(warmstart):
    out, res = warmstart
    assert res.computed == 56 and res.cached == 0
    columns, rows = read_csv(out / "results.csv")
    assert tuple(columns) == WS_COLUMNS
    # one row per candidate x regime x checkpoint x seed
    combos = {(r["strategy"], r["regime"], r["checkpoint"], r["seed"]) for r in rows}
    assert len(rows) == len(combos) == 7 * 2 * 2 * 2
    assert {r["checkpoint"] for r in rows} == {"20", "40"}
    for r in rows:
        for c in ("pres_kl", "pres_dloss", "probe_kl", "probe_rms", "probe_escape", "probe_loss",
                  "final_loss", "auc"):
            assert math.isfinite(float(r[c])), (c, r)
    report = (out / "report.md").read_text()
    for text in ("preset `smoke`", "base model: d_model 16", "checkpoints at steps 20, 40", "wall time",
                 "### deterministic regime", "### stochastic regime", "## Selectors",
                 "## Comparison with the paper", "preservation at step 0", "reduced grids"):
        assert text in report, text
    if HAVE_MPL:
        for name in ("curves_deterministic.png", "curves_stochastic.png", "selectors.png"):
            assert_png(out / name)


def test_warmstart_known_answers(warmstart):
    out, _ = warmstart
    _, rows = read_csv(out / "results.csv")
    pick = lambda **kw: [r for r in rows if all(r[k] == v for k, v in kw.items())]  # noqa: E731
    # copies stay copies in the deterministic regime; noise breaks the symmetry
    for r in pick(strategy="exact_copy", regime="deterministic"):
        assert float(r["probe_escape"]) < 1e-6
    for r in pick(strategy="perturb"):
        assert float(r["probe_escape"]) > 0
    for r in pick(strategy="exact_copy", regime="stochastic"):
        assert float(r["probe_escape"]) > 0  # dropout breaks it too
    # step-0 preservation: exact for the preserving strategies (RMSNorm), not for szp
    for r in rows:
        kl = float(r["pres_kl"])
        if r["strategy"] in PRESERVING:
            assert abs(kl) < 1e-9 * float(r["loss_small"]), r
            assert r["plan_preserving"] == "True"
        elif r["strategy"] == "szp":
            assert kl > 1e-4
    # deterministic regime: the same data order for every candidate, so exact_copy
    # (no noise) gives the same run for both seeds; the stochastic regime differs
    det = pick(strategy="exact_copy", regime="deterministic", checkpoint="40")
    assert det[0]["final_loss"] == det[1]["final_loss"]
    sto = pick(strategy="exact_copy", regime="stochastic", checkpoint="40")
    assert sto[0]["final_loss"] != sto[1]["final_loss"]


def test_warmstart_rerun_trains_nothing(warmstart, monkeypatch):
    out, _ = warmstart
    before = (out / "results.csv").read_text()
    no_training(monkeypatch)
    res = run_warmstart("smoke", out, data=REAL, progress=False)
    assert (res.computed, res.cached, res.train_steps) == (0, 56, 0)
    assert (out / "results.csv").read_text() == before
    # the CLI on the same folder: everything cached as well
    assert studies_main(["warmstart", "--preset", "smoke", "--out", str(out), "--data", str(REAL),
                         "--quiet"]) == 0
    assert "python -m growkern.studies warmstart --preset smoke" in (out / "report.md").read_text()


def test_warmstart_interrupted_reruns_only_what_is_missing(warmstart):
    out, res = warmstart
    lost = sorted((out / "runs").glob("*.json"))[:2]  # as if the study stopped before them
    for f in lost:
        f.unlink()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    before = strip(read_csv(out / "results.csv")[1])
    again = run_warmstart("smoke", out, data=REAL, progress=False)
    assert (again.computed, again.cached) == (2, 54)
    assert again.train_steps == 2 * 32  # the base checkpoints are reused: continuations only
    assert strip(read_csv(out / "results.csv")[1]) == before  # bit-identical recomputation


# --- growth factor ----------------------------------------------------------------

@pytest.fixture(scope="module")
def growth(tmp_path_factory):
    out = tmp_path_factory.mktemp("growth")
    return out, run_growth_factor("smoke", out, data=REAL, progress=False)


def test_growth_factor_outputs(growth):
    out, res = growth
    columns, rows = read_csv(out / "results.csv")
    assert tuple(columns) == growth_factor.COLUMNS
    assert len(rows) == 3 * 2
    assert {(r["factor"], r["budget"]) for r in rows} == {(g, b) for g in ("1.5", "2", "4") for b in ("1", "2")}
    for r in rows:
        assert r["strategy"] == "szp"
        assert float(r["speedup"]) > 0
        assert r["speedup_text"] == (f"{float(r['speedup']):.2f}" if r["speedup_exact"] == "True"
                                     else f">{float(r['speedup']):.2f}")
        # small model on r N_s tokens, grown model on r N tokens (rounded to whole steps)
        assert abs(int(r["small_tokens"]) - float(r["budget"]) * int(r["params_small"])) <= 128
        assert abs(int(r["grown_tokens"]) - float(r["budget"]) * int(r["params_target"])) <= 128
    assert {r["small_d_model"] for r in rows} == {"16", "12", "6"}  # d_model / g at head_dim 2
    _, scratch = read_csv(out / "scratch_curve.csv")
    total = max(float(r["total_flops"]) for r in rows)
    assert float(scratch[-1]["flops"]) >= 2 * total * (1 - 1e-9)  # twice the largest grown run
    report = (out / "report.md").read_text()
    for text in ("preset `smoke`", "## Speedup", "| g \\ r |", "Largest growth factor", "wall time",
                 "budgets r: 1, 2", "growth factors g: 1.5, 2, 4"):
        assert text in report, text
    if HAVE_MPL:
        for name in ("speedup_vs_g.png", "loss_vs_compute.png"):
            assert_png(out / name)


def test_speedup_of_a_run_against_itself_is_one(growth):
    out, _ = growth
    _, scratch = read_csv(out / "scratch_curve.csv")
    flops = [float(r["flops"]) for r in scratch]
    losses = [float(r["val_loss"]) for r in scratch]
    k = losses.index(min(losses))  # a point of the curve that no earlier point reaches
    value, exact = growth_factor.speedup_cell(flops, losses, flops[k], losses[k])
    assert exact and value == pytest.approx(1.0, rel=1e-12)
    # a loss scratch never reaches: its whole (2x-truncated) compute is a lower bound
    value, exact = growth_factor.speedup_cell(flops, losses, flops[-1] / 4, min(losses) - 1)
    assert not exact and growth_factor.speedup_text(value, exact).startswith(">")
    assert value <= 2.0


def test_growth_factor_rerun_and_resume(growth, monkeypatch):
    out, _ = growth
    before = (out / "results.csv").read_text()
    with monkeypatch.context() as m:
        no_training(m)
        res = run_growth_factor("smoke", out, data=REAL, progress=False)
        assert (res.computed, res.train_steps) == (0, 0)
    assert (out / "results.csv").read_text() == before
    # a lost grown run is recomputed alone, from the kept small-model checkpoint
    _, rows = read_csv(out / "results.csv")
    row = next(r for r in rows if r["factor"] == "2" and r["budget"] == "2")
    (out / "runs" / f"{row['key']}.json").unlink()
    res = run_growth_factor("smoke", out, data=REAL, progress=False)
    assert res.computed == 1 and res.train_steps == int(row["grown_steps"])
    _, again = read_csv(out / "results.csv")
    new = next(r for r in again if r["key"] == row["key"])
    assert new["final_loss"] == row["final_loss"]  # deterministic: the same run again


def test_growth_exact_strategy_preserves_at_non_integer_factors(tmp_path):
    """RMSNorm makes exact_copy growth exact at g = 1.5 too (zero-padded residual)."""
    res = run_growth_factor("smoke", tmp_path, data=REAL, progress=False, strategy="exact_copy",
                            budgets=(1,))
    for r in res.rows:
        assert r["loss_after_growth"] == pytest.approx(r["loss_small"], abs=1e-5), r["factor"]
