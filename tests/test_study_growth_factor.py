"""The growth-factor study's review fixes (docs/studies.md, "Study 2"): speedups read off
best-so-far envelopes, the epochs of data per budget and run kind with budgets that
repeat the data left out of the verdicts, the operator comparison (szp against
exact_copy and perturb), "most reliable" defined and tested across g, Holm-adjusted
verdicts with the comparators named in the report, the progress lines, the smoke
preset's default output outside the repository, and the cpu preset's held-out set and
cost. Synthetic rows and curves where a known answer is needed, one smoke run for the
wiring."""
import csv
import json
import math
from pathlib import Path

import pytest

from growkern.studies import stats
from growkern.studies.growth_factor import design, report as gf_report, run as gf_run
from growkern.studies.presets import GROWTH_FACTOR, get_preset
from growkern.studies.result import default_out

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared/data/tinystories"
needs_data = pytest.mark.skipif(not (REAL / "train.txt").is_file(),
                                reason="TinyStories sample not found at ../shared/data/tinystories")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- synthetic rows: the report's functions on known answers -------------------------

def synthetic_rows(speedup, factors=(4 / 3, 2, 4), budgets=(5, 10, 20), seeds=(0, 1, 2, 3, 4),
                   strategies=("szp",), epochs=None):
    """One results.csv row per (strategy, g, r, seed) with speedup(strategy, g, r, seed) and
    the epochs of epochs(r) (default: 1, no repetition)."""
    rows = []
    for strat in strategies:
        for g in factors:
            for r in budgets:
                for s in seeds:
                    v = speedup(strat, g, r, s)
                    if v is None:
                        continue
                    e = epochs(r) if epochs else 1.0
                    rows.append({
                        "factor": g, "param_ratio": g * g, "budget": r, "seed": s, "growth_seed": 0,
                        "strategy": strat, "parameterization": "mup", "mup_base_width": 64, "small_d_model": 64 / g,
                        "small_n_head": 4 / g, "small_d_ff": 128 / g, "params_small": round(1000 / g ** 2),
                        "params_target": 1000, "small_steps": r, "grown_steps": 10 * r, "small_tokens": 100 * r,
                        "grown_tokens": 1000 * r, "small_flops": 1e6 * r / g ** 2, "total_flops": 1e7 * r,
                        "loss_small": 3.0, "loss_after_growth": 3.1, "final_loss": 2.5, "best_loss": 2.45,
                        "scratch_flops_to_match": 1e7 * r * v, "speedup": v, "speedup_exact": True,
                        "speedup_text": f"{v:.2f}", "small_epochs": e / 10, "grown_epochs": e, "scratch_epochs": e,
                        "epochs": e, "repeats": e > 2.0, "seconds": 1.0, "key": f"{strat}-{g}-{r}-{s}",
                        "curve": [[0.0, 5.0], [1e7 * r, 2.45]]})
    return rows


def by_paper(found, text):
    return [f for f in found if text in f.paper]


def test_speedup_reads_the_best_so_far_envelope_of_scratch():
    """A scratch curve that rises between evaluations: the compute at which it reaches L
    is read off its running minimum, not interpolated across the rise."""
    assert design.best_so_far([5.0, 3.0, 4.0, 2.5, 2.7, 2.0]) == [5.0, 3.0, 3.0, 2.5, 2.5, 2.0]
    flops, losses = [0.0, 1.0, 2.0, 3.0], [5.0, 3.0, 4.0, 2.5]
    value, exact = design.speedup_cell(flops, losses, grown_flops=2.0, grown_loss=2.8)
    # envelope 5, 3, 3, 2.5: reaches 2.8 at 2 + (3 - 2.8) / 0.5 = 2.4 (the raw curve: 2.8)
    assert exact and value == pytest.approx(2.4 / 2.0)
    assert design.scratch_flops_read(flops, losses, 2.0, 2.8) == pytest.approx(2.4)
    # a lower bound reads scratch to the end of its window (2x the grown run's compute)
    value, exact = design.speedup_cell(flops, losses, grown_flops=1.0, grown_loss=1.0)
    assert not exact and design.scratch_flops_read(flops, losses, 1.0, 1.0) == pytest.approx(2.0)


def test_repeating_budgets_are_marked_and_left_out_of_the_verdicts():
    """Budget 20 sees the data 3 times (> max_epochs 2): marked, not in a verdict."""
    rows = synthetic_rows(lambda strat, g, r, s: 1.3 - 0.01 * r + 0.01 * s,
                          epochs=lambda r: {5: 0.6, 10: 1.2, 20: 3.0}[r])
    rep = gf_report.repetition(rows, (5, 10, 20), 2.0)
    assert [rep[r]["repeats"] for r in (5, 10, 20)] == [False, False, True]
    assert rep[20]["epochs"] == 3.0 and rep[5]["grown"][2] == 0.6 and rep[5]["small"][2] == pytest.approx(0.06)
    assert gf_report.verdict_budgets(rows, (5, 10, 20), 2.0) == (5, 10)
    assert gf_report.verdict_budgets(rows, (5, 10, 20), 3.5) == (5, 10, 20)


def test_most_reliable_is_share_of_cells_and_worst_budget_across_g():
    """The reviewer's count: by the share of (budget, seed) cells above 1, g = 4 leads
    17/20 against g = 2's 14/20; the finding g = 2 minus g = 4 must come out negative."""
    above = {2: 14, 4: 17, 4 / 3: 10}
    budgets, seeds = (5, 10, 20, 40), (0, 1, 2, 3, 4)

    def speedup(strat, g, r, s):
        k = budgets.index(r) * len(seeds) + s  # cells 0..19; the first `above[g]` are > 1
        return (1.2 if k < above[g] else 0.9) + 0.001 * s
    rows = synthetic_rows(speedup, budgets=budgets, seeds=seeds)
    rel = gf_report.reliability(rows, (4 / 3, 2, 4), budgets, seeds, "szp")
    assert (rel[2]["above"], rel[2]["cells"], rel[4]["above"]) == (14, 20, 17)
    assert rel[2]["worst"][0] == 40 and rel[2]["worst"][1] == pytest.approx(0.902)
    found = gf_report.findings(rows, (4 / 3, 2, 4), budgets, seeds, strategy="szp")
    share = {f.claim.split("minus g = ")[1].split(" ")[0]: f for f in by_paper(found, "largest share")}
    assert set(share) == {"4/3", "4"}  # against every other factor, named in advance
    assert share["4"].estimate == pytest.approx((14 - 17) / 20) and share["4"].verdict != "agree"
    assert share["4/3"].estimate == pytest.approx((14 - 10) / 20)
    worst = by_paper(found, "worst budget")
    assert len(worst) == 2 and all(f.n == 5 for f in worst)
    # every seed loses the same one budget of three at g = 4 and none at g = 2: the per-seed
    # differences are all 1/3, a zero-width t interval; 5 equal signs are p = 2^-4 = 0.0625
    # under the sign test, so no 95% verdict, and the interval is the share's range
    rows = synthetic_rows(lambda strat, g, r, s: 0.9 if (g == 4 and r == 20) else 1.1 + 0.01 * s)
    found = gf_report.findings(rows, (4 / 3, 2, 4), (5, 10, 20), seeds, strategy="szp")
    f = next(f for f in by_paper(found, "largest share") if f.claim.split("minus g = ")[1].startswith("4 "))
    assert (f.estimate, f.lo, f.hi, f.verdict) == (pytest.approx(1 / 3), -1.0, 1.0, "inconclusive")
    assert "sign test" in f.detail and stats.p_value(f.ci_at, f.test) == pytest.approx(0.0625, rel=0.02)


def test_operator_comparison_finds_the_better_operator():
    """szp ahead of exact_copy by 0.2 and of perturb by 0.1 at g = 2 and 4 (not run at 4/3)."""
    gap = {"szp": 0.0, "exact_copy": 0.2, "perturb": 0.1}

    def speedup(strat, g, r, s):
        if strat != "szp" and g == 4 / 3:
            return None
        return 1.2 - gap[strat] + 0.01 * ((s * 7 + r + len(strat)) % 3)  # seeds differ, operators too
    rows = synthetic_rows(speedup, strategies=("szp", "exact_copy", "perturb"))
    found = gf_report.findings(rows, (4 / 3, 2, 4), (5, 10, 20), (0, 1, 2, 3, 4), strategy="szp",
                               compare_strategies=("exact_copy", "perturb"), compare_factors=(2, 4))
    ops = by_paper(found, "simple operators")
    assert [f.claim.split(" at g")[0] for f in ops] == ["speedup of szp minus exact_copy",
                                                        "speedup of szp minus perturb"] * 2
    assert [f.estimate for f in ops] == pytest.approx([0.2, 0.1, 0.2, 0.1], abs=0.02)
    assert all(f.verdict == "agree" for f in ops)
    # the other tables and findings read the preset's strategy only
    summary = gf_report.summarize(rows, (4 / 3, 2, 4), (5, 10, 20))
    assert {x["strategy"] for x in summary} == {"szp", "exact_copy", "perturb"} and len(summary) == 3 * 3 + 2 * 2 * 3


def test_every_finding_is_holm_adjustable():
    rows = synthetic_rows(lambda strat, g, r, s: 1.1 + 0.02 * s - 0.001 * r,
                          strategies=("szp", "exact_copy"))
    found = gf_report.findings(rows, (4 / 3, 2, 4), (5, 10, 20), (0, 1, 2, 3, 4), strategy="szp",
                               compare_strategies=("exact_copy",), compare_factors=(2, 4))
    assert found and all(f.ci_at is not None for f in found)
    for f in found:  # ci_at at the report's level is the interval shown
        assert f.ci_at(0.95) == pytest.approx((f.estimate, f.lo, f.hi), nan_ok=True)
    stats.holm_adjust(found)
    assert all(f.holm in stats.VERDICTS and 0 < f.p <= 1 for f in found)
    assert all(f.holm in (f.verdict, "inconclusive") for f in found)  # Holm only withholds


def test_report_marks_repetition_and_names_comparators(tmp_path, monkeypatch):
    """write_report on synthetic rows: epochs per run kind, † on the budget that repeats,
    verdicts only on the others, Holm on every verdict line, comparators stated."""
    monkeypatch.setattr(gf_report, "pyplot", lambda: None)  # no plots needed here
    budgets = (5, 10, 20)

    def speedup(strat, g, r, s):
        if strat != "szp" and g == 4 / 3:
            return None
        return 1.25 - 0.005 * r + 0.01 * s - (0.05 if strat != "szp" else 0.0)
    rows = synthetic_rows(speedup, budgets=budgets, strategies=("szp", "exact_copy", "perturb"),
                          epochs=lambda r: {5: 0.6, 10: 1.2, 20: 3.0}[r])
    p = get_preset("growth-factor", "cpu", budgets=budgets)
    curves = {s: [[0.0, 5.0], [1e8, 3.0], [2e8, 3.2], [4e8, 2.4]] for s in p.seeds}
    meta = {"tokens_per_step": 1024, "flops_per_token_target": 1e3, "params_target": 1000, "train_tokens": 10**6,
            "valid_tokens": 10**5, "heldout_tokens": 65536, "vocab_size": 258, "corpus_key": "k", "scratch_steps": 400,
            "command": "x", "wall_seconds": 1.0, "computed": 1, "cached": 0, "compute_seconds": 1.0,
            "scratch_seconds": 0.5, "device": "cpu", "threads": 1}
    gf_report.write_report(tmp_path, p, rows, curves, meta)
    text = (tmp_path / "report.md").read_text()
    for want in ("## Data repetition", "| 20 | 0.30 / 0.30 / 0.30 | 3.00 / 3.00 / 3.00 | 3.00 | 3.00 | **yes** †",
                 "| 5 | 0.06 / 0.06 / 0.06 | 0.60 / 0.60 / 0.60 | 0.60 | 0.60 | no |", "r = 20 †",
                 "left out: r = 20 (3.00 epochs)", "**Comparators, fixed before the runs**",
                 "szp against each of the preset's compare_strategies (exact_copy, perturb) at g = 2, 4",
                 "Holm's step-down adjustment", "## Operators: szp against exact_copy, perturb",
                 "## Reliability of each factor", "descriptive, not verdicts", "65,536 tokens"):
        assert want in text, want
    verdicts = [line for line in text.splitlines() if line.startswith("- **") and "(Holm: **" in line]
    assert len(verdicts) == 14 and not any("r = 20" in v for v in verdicts)
    assert sum("mean over budgets 5, 10 =" in v for v in verdicts) == 7  # g = 2, g = 4, 2 - 4, operators (4)
    summary = read_csv(tmp_path / "summary.csv")
    assert {x["repeats"] for x in summary if x["budget"] == "20"} == {"True"}
    curve = read_csv(tmp_path / "scratch_curve.csv")
    assert [float(x["val_loss_best"]) for x in curve if x["seed"] == "0"] == [5.0, 3.0, 3.0, 2.4]


# --- the run's wiring ---------------------------------------------------------------------

def test_progress_lines_keep_a_space_after_the_label(capsys):
    """`(budgets <= 2):resuming` lost its separator; step lines had two blanks."""
    log = gf_run._logger("scratch seed 0 to step 133 (budgets <= 2)")
    log("resuming from the checkpoint at step 66")
    log("  step 100/133  val 4.9")
    err = capsys.readouterr().err.splitlines()
    assert err == ["[growth-factor] scratch seed 0 to step 133 (budgets <= 2): resuming from the checkpoint at step 66",
                   "[growth-factor] scratch seed 0 to step 133 (budgets <= 2): step 100/133  val 4.9"]


def test_smoke_output_defaults_outside_the_repository(monkeypatch, tmp_path, capsys):
    from growkern.studies import STUDIES, add_study_commands, run_study_cli
    from growkern.studies.__main__ import main as studies_main
    monkeypatch.delenv("GROWKERN_CACHE", raising=False)
    for study in ("growth-factor", "warmstart"):
        out = default_out(study, "smoke").resolve()
        assert REPO not in out.parents and out.name == f"{study}-smoke"
        assert default_out(study, "cpu") == Path("results") / f"{study}-cpu"  # committed results stay
    monkeypatch.setenv("GROWKERN_CACHE", str(tmp_path))
    assert default_out("growth-factor", "smoke") == tmp_path / "studies" / "growth-factor-smoke"
    # the CLI passes it on (both studies), and run_growth_factor resolves it from Python
    import argparse
    parser = argparse.ArgumentParser()
    add_study_commands(parser.add_subparsers(dest="study"))
    seen = {}
    for study in ("growth-factor", "warmstart"):
        monkeypatch.setitem(STUDIES, study, lambda preset, out, *a, _s=study, **k: seen.__setitem__(_s, out))
        run_study_cli(parser.parse_args([study, "--preset", "smoke"]), command="x")
    assert seen == {s: tmp_path / "studies" / f"{s}-smoke" for s in ("growth-factor", "warmstart")}

    class Stop(Exception):
        pass

    def stop(out, *args, **kwargs):
        raise Stop(out)
    monkeypatch.setattr(gf_run, "check_output", stop)
    with pytest.raises(Stop) as e:
        gf_run.run_growth_factor("smoke", progress=False)
    assert Path(e.value.args[0]) == tmp_path / "studies" / "growth-factor-smoke"
    with pytest.raises(SystemExit):
        studies_main(["growth-factor", "--help"])
    assert "outside the repository" in " ".join(capsys.readouterr().out.split())


def test_preset_fields_are_validated():
    with pytest.raises(ValueError, match="compare_factors must be among the factors"):
        design.validate(get_preset("growth-factor", "smoke", compare_factors=(3,)))
    with pytest.raises(ValueError, match="unknown strategy 'copy_all'"):
        design.validate(get_preset("growth-factor", "smoke", compare_strategies=("copy_all",)))
    p = get_preset("growth-factor", "smoke", strategy="exact_copy")
    assert p.compared(2) == ("perturb",) and p.compared(1.5) == ()  # the main strategy is not compared with itself
    assert design.grown_strategies(p, 4) == ("exact_copy", "perturb")
    assert design.growth_options(get_preset("growth-factor", "smoke", strategy_options=(("shrink", 0.5),)),
                                 "perturb") == ({}, None)  # a comparison runs with its own defaults


# --- the cpu preset: held-out set and cost --------------------------------------------

def _planned_flops(p, vocab_size, train_tokens=None):
    """Training and evaluation FLOPs the preset plans (every seed, nothing cached), and the
    most epochs of the verdict budgets' runs given train_tokens; an evaluation of a token
    costs a third of training on it (forward only)."""
    from growkern.models.gpt import GPT
    from growkern.train import loop as train_mod
    target = design.target_config(p, vocab_size)

    def sizes(cfg):
        m = GPT(cfg)
        return m.num_params(non_embedding=True), train_mod.flops_per_token(m, p.block_size)
    tps = p.batch_size * p.block_size
    n_t, f_t = sizes(target)
    heldout = p.heldout_windows * p.block_size
    train = evals = 0.0
    biggest = {}
    for g in p.factors:
        n_s, f_s = sizes(design.small_config(target, p, g))
        small_steps = design.steps_for(max(p.budgets) * n_s, tps)
        train += small_steps * tps * f_s
        evals += (small_steps / p.eval_every + len(p.budgets)) * heldout * f_s / 3
        for r in p.budgets:
            s, c = design.steps_for(r * n_s, tps), design.steps_for(r * n_t, tps)
            biggest[r] = max(biggest.get(r, 0.0), s * tps * f_s + c * tps * f_t)
            runs = len(design.grown_strategies(p, g))
            train += runs * c * tps * f_t
            evals += runs * (c / p.eval_every + 2) * heldout * f_t / 3
    scratch = p.scratch_factor * max(biggest.values()) / f_t  # tokens
    train += scratch * f_t
    evals += (scratch / tps / p.scratch_every) * heldout * f_t / 3
    return len(p.seeds) * train, len(p.seeds) * evals


def test_cpu_preset_heldout_set_and_cost():
    """At least 64K held-out tokens, at most a fifth of the compute spent evaluating, and
    the whole preset (operator runs included) within 10% of the FLOPs of the five-seed run
    that took ~52 min on two Xeon cores (12.5 + 19.6 min for seeds 2-4, seeds 0-1 alike)."""
    p = GROWTH_FACTOR["cpu"]
    assert p.heldout_windows * p.block_size >= 65536
    assert GROWTH_FACTOR["paper"].heldout_windows * GROWTH_FACTOR["paper"].block_size >= 65536
    assert set(p.compare_factors) >= {2, 4} and set(p.compare_strategies) == {"exact_copy", "perturb"}
    train, evals = _planned_flops(p, p.vocab_size)
    assert evals / (train + evals) < 0.2
    before = get_preset("growth-factor", "cpu", vocab_size=288, budgets=(5, 10, 20, 40), eval_every=50,
                        eval_batch_size=32, eval_batches=4, compare_strategies=())
    old_train, old_evals = _planned_flops(before, 288)
    assert train + evals <= 1.1 * (old_train + old_evals)


def test_cpu_preset_budgets_mostly_fit_two_epochs():
    """Bytes as tokens (vocab 258) give 1.40M training tokens: budgets up to 10 stay within
    2 epochs for every grown lineage (small + continuation), 20 does not."""
    p = GROWTH_FACTOR["cpu"]
    train_tokens = 1_401_057  # the sample's train split at vocab 258 (growkern.data.prepare)
    tps = p.batch_size * p.block_size
    target = design.target_config(p, p.vocab_size)
    from growkern.models.gpt import GPT
    n_t = GPT(target).num_params(non_embedding=True)
    for r in p.budgets:
        most = 0.0
        for g in p.factors:
            n_s = GPT(design.small_config(target, p, g)).num_params(non_embedding=True)
            tokens = (design.steps_for(r * n_s, tps) + design.steps_for(r * n_t, tps)) * tps
            most = max(most, design.epochs(tokens, train_tokens))
        assert (most > p.max_epochs) == (r > 10), (r, most)


# --- one smoke run: rows, caching, protocol ------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gf-smoke")
    return out, gf_run.run_growth_factor("smoke", out, data=REAL, progress=False, workers=2)


@needs_data
def test_smoke_rows_use_envelopes_and_count_epochs(smoke):
    out, res = smoke
    rows = read_csv(out / "results.csv")
    meta = json.loads((out / "study.json").read_text())
    scratch = {}
    for x in read_csv(out / "scratch_curve.csv"):
        scratch.setdefault(x["seed"], []).append((float(x["flops"]), float(x["val_loss"])))
    moved = 0
    for r in rows:
        run = json.loads((out / "runs" / f"{r['key']}.json").read_text())
        assert run["config"]["protocol"] == design.PROTOCOL == 3
        curve = run["result"]["grown_curve"]
        assert float(r["best_loss"]) == min(l for _, l in curve) and float(r["final_loss"]) == curve[-1][1]
        sc = scratch[r["seed"]]
        value, exact = design.speedup_cell([f for f, _ in sc], [l for _, l in sc], float(r["total_flops"]),
                                           float(r["best_loss"]))
        assert float(r["speedup"]) == pytest.approx(value) and (r["speedup_exact"] == "True") == exact
        moved += float(r["best_loss"]) < float(r["final_loss"])
        n = meta["train_tokens"]
        assert float(r["small_epochs"]) == pytest.approx(int(r["small_tokens"]) / n)
        assert float(r["grown_epochs"]) == pytest.approx((int(r["small_tokens"]) + int(r["grown_tokens"])) / n)
        assert float(r["epochs"]) == max(float(r["grown_epochs"]), float(r["scratch_epochs"]))
        assert r["repeats"] == "False"  # smoke runs are far below an epoch
    assert moved >= 1  # some grown run's best loss is not its last: the envelope matters
    assert {r["strategy"] for r in rows} == {"szp", "exact_copy", "perturb"}
    report = (out / "report.md").read_text()
    assert "## Data repetition" in report and "Holm" in report and "## Operators" in report
    assert not any(math.isnan(float(r["speedup"])) for r in rows)


@needs_data
def test_smoke_comparison_runs_are_cached_like_the_others(smoke, monkeypatch):
    out, first = smoke
    import growkern.train.loop

    def fail(*args, **kwargs):
        raise AssertionError("a cached study trained something")
    monkeypatch.setattr(growkern.train.loop, "train", fail)
    res = gf_run.run_growth_factor("smoke", out, data=REAL, progress=False, workers=1)
    assert (res.computed, res.train_steps) == (0, 0) and res.cached == first.computed
    assert sum(r["strategy"] != "szp" for r in res.rows) == 2 * 2 * 2 * 2  # 2 operators x g 2, 4 x 2 budgets x 2 seeds


def test_depth_findings_test_the_protocols_comparators():
    """D1 compares stack at depth ratio k with the width factor of the nearest parameter
    ratio (g = 2 for k = 4); D2 identity with stack; each a seed-level mean over budgets."""
    p = get_preset("growth-factor", "cpu")
    width = synthetic_rows(lambda s, g, r, seed: 1.2 + 0.01 * seed, factors=(4 / 3, 2, 4), budgets=(2.5, 5, 10))
    for x in width:
        x["depth_ratio"] = 1
    depth = []
    for k, ratio in ((2, 2.0), (4, 4.0)):
        for strat, v in (("depth:stack", 1.0), ("depth:identity", 1.1)):
            rows = synthetic_rows(lambda s, g, r, seed, v=v: v + 0.01 * seed + 0.003 * (seed % 2) * (v > 1.05),
                                  factors=(1.0,), budgets=(2.5, 5, 10),
                                  strategies=(strat,))
            for x in rows:
                x.update(depth_ratio=k, param_ratio=ratio)
            depth += rows
    lines, found = gf_report.depth_section(p, depth, width, (2.5, 5, 10))
    assert len(found) == 4 and "## Depth axis" in lines
    stack_vs_width = by_paper(found, "stacking beats width growth")
    assert [f.verdict for f in stack_vs_width] == ["inconclusive", "inconclusive"]  # p = 2^-4 with 5 seeds
    assert all(f.estimate == pytest.approx(-0.2) for f in stack_vs_width)  # the same in every seed: sign test
    assert "szp (width / 2, N/N_s 4.00)" in stack_vs_width[1].claim  # k = 4 against g = 2
    identity = by_paper(found, "function-preserving depth growth beats stacking")
    assert [f.verdict for f in identity] == ["agree", "agree"]
    assert identity[0].estimate == pytest.approx(0.1 + 0.003 * 2 / 5)
    assert all(f.holm for f in found)


@needs_data
def test_depth_axis_grows_small_models_in_depth_and_reports_them(tmp_path):
    out = tmp_path / "gf"
    kw = dict(data=REAL, progress=False, workers=1, n_layer=2, budgets=(1,), depth_ratios=(2,), both=((2, 2),),
              depth_budgets=(1,), factors=(2,), compare_factors=(2,), compare_strategies=())
    res = gf_run.run_growth_factor("smoke", out, **kw)
    rows = read_csv(out / "results.csv")
    depth = {r["strategy"]: r for r in rows if r["depth_ratio"] == "2" and r["seed"] == "0"}
    assert set(depth) == {"depth:stack", "depth:identity", "both"}
    assert {r["small_n_layer"] for r in depth.values()} == {"1"}
    ident, stack = depth["depth:identity"], depth["depth:stack"]
    # identity keeps the small model's function: its loss right after growth is the small model's
    assert float(ident["loss_after_growth"]) == pytest.approx(float(ident["loss_small"]), abs=1e-5)
    assert abs(float(stack["loss_after_growth"]) - float(stack["loss_small"])) > 1e-4
    text = (out / "report.md").read_text()
    assert "## Depth axis" in text and "stacking beats width growth" in text
    again = gf_run.run_growth_factor("smoke", out, **kw)
    assert again.computed == 0 and again.cached == res.computed + res.cached
