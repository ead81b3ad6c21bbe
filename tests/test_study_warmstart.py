"""The warmstart study's protocol and report on known answers (docs/studies.md, "Study 1"):
the escape verdicts per regime and lag with the constant-order caveat, per-checkpoint
findings with the pooled summary, ties within stats.TIE_TOL, clipped and degenerate
intervals, Holm's adjustment and the comparators fixed in advance, the Run section's
compute time; the small_equal_compute reference, the shuffle regime and structured with
exact_copy's moments; the cpu preset's plan. Synthetic rows fed to the report functions,
tiny models, and one narrowed smoke run."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import growkern
from growkern import GPT, GPTConfig
from growkern.studies import run_warmstart, stats
from growkern.studies.presets import get_preset
from growkern.studies.warmstart import design
from growkern.studies.warmstart import report as wr

REAL = Path(__file__).resolve().parents[2] / "shared/data/tinystories"
SEEDS8 = tuple(range(8))


def synthetic(p, value, seeds=SEEDS8, ckpts=(10, 20), regimes=("deterministic",), names=None) -> list[dict]:
    """One row per (regime, seed, checkpoint, candidate) with every column the report reads;
    value(regime, seed, ckpt, name) -> the row's overrides (final_loss, probe_escape, ...)."""
    names = names or [c.name for c in design.candidates(p) if c.group in ("main", "noise")]
    rows = []
    for regime in regimes:
        for seed in seeds:
            for ckpt in ckpts:
                for name in names:
                    row = {"regime": regime, "base_seed": seed, "checkpoint": ckpt, "candidate": name,
                           "strategy": name.split("@")[0], "group": "main", "final_loss": 3.0, "auc": 3.0,
                           "probe_loss": 3.5, "loss_small": 3.1, "curve": [[0, 3.2], [4, 3.1]],
                           **{k: 0.0 for k in design.SELECTORS if k not in ("probe_loss",)}}
                    row.update(value(regime, seed, ckpt, name))
                    rows.append(row)
    return rows


def smoke(**overrides):
    return get_preset("warmstart", "smoke", **overrides)


def by_claim(found, *words):
    return [f for f in found if all(w in f.claim for w in words)]


# --- the escape claim ------------------------------------------------------------------

def test_escape_gets_a_verdict_per_regime_and_lag_with_a_caveat_when_its_order_is_fixed():
    """Over the escape pool, the paper's escape claim is tested in every regime at the probe
    lag and at the end, per checkpoint and pooled. Deterministic and shuffle: the escape
    order is the same in every cell (a caveat says so); more escape goes with a lower final
    and a higher probe loss. Stochastic: the order changes between cells and the final loss
    follows the escape (misleads)."""
    p = smoke(checkpoints=(10, 20))
    pool = design.escape_pool(p)
    assert set(pool) == {"exact_copy", "perturb", "asym_reset", "structured", "perturb@0.1", "perturb_np@0.1"}
    rng = np.random.default_rng(0)

    def value(regime, seed, ckpt, name):
        i = pool.index(name)
        if regime == "stochastic":
            e = float(rng.permutation(len(pool))[i])  # the order changes from cell to cell
            return {"probe_escape": 10.0 ** (e - 6), "final_loss": 3.0 + 0.01 * e + 1e-3 * rng.normal(),
                    "probe_loss": 3.5 + 1e-3 * rng.normal()}
        return {"probe_escape": 10.0 ** (i - 6), "final_loss": 3.0 - 0.01 * i, "probe_loss": 3.5 + 0.01 * i}

    rows = synthetic(p, value, regimes=("deterministic", "shuffle", "stochastic"), names=pool)
    cells = wr.cells_of(rows)
    found = stats.holm_adjust(wr.findings(rows, p, cells))
    escape = by_claim(found, "update escape")
    assert len(escape) == 3 * 2 * 3  # regimes x (probe lag, final) x (two checkpoints, pooled)
    verdict = {wr.claim_parts(f)[1:] + ("final" if "final loss" in f.claim else "probe",): f for f in escape}
    for scope in ("checkpoint 10", "checkpoint 20", "pooled"):
        helps = verdict[("deterministic", scope, "final")]
        assert helps.test == "< 0" and helps.verdict == "agree" and helps.estimate == pytest.approx(-1.0)
        misleads = verdict[("deterministic", scope, "probe")]
        assert misleads.test == "> 0" and misleads.verdict == "agree"
        assert verdict[("stochastic", scope, "final")].test == "> 0"
        assert "escape order the same in every cell" in helps.detail
        assert "escape order" not in verdict[("stochastic", scope, "final")].detail
    stochastic = verdict[("stochastic", "pooled", "final")]
    assert stochastic.verdict == "agree" and stochastic.holm == "agree"
    # 8 seeds giving rho = -1 each: the sign test's p = 2^-7, which cannot pass Holm among
    # the report's 45 findings (it needs p < 0.05 / 45)
    assert len(found) == 45 and helps.p == pytest.approx(2.0 ** -7, rel=0.02) and helps.holm == "inconclusive"
    text = "\n".join(wr.findings_lines(found, p, rows, cells))
    assert "**caveat, deterministic**: the escape order is the same in all 16 cells" in text
    assert "**caveat, shuffle**" in text and "caveat, stochastic" not in text
    assert "stochastic: the escape order differs between the 16 cells" in text


# --- per checkpoint, pooled as the summary --------------------------------------------------

def test_findings_per_checkpoint_with_the_pooled_summary():
    """structured beats exact_copy at checkpoint 10 and loses at checkpoint 20: the
    per-checkpoint verdicts say so, the pooled summary (a seed's two averaged) does not."""
    p = smoke(checkpoints=(10, 20))

    def value(regime, seed, ckpt, name):
        if name == "structured":  # the seeds' pooled means alternate around 0
            return {"final_loss": 3.0 + (-0.01 + 1e-4 * (seed % 3) if ckpt == 10 else 0.01 + 1e-3 * (-1) ** seed)}
        return {"final_loss": 3.0}

    rows = synthetic(p, value)
    found = wr.findings(rows, p, wr.cells_of(rows))
    wins = {wr.claim_parts(f)[2]: f for f in by_claim(found, "structured - exact_copy")}
    assert list(wins) == ["checkpoint 10", "checkpoint 20", "pooled"]
    assert wins["checkpoint 10"].verdict == "agree" and wins["checkpoint 20"].verdict == "disagree"
    assert wins["pooled"].verdict == "inconclusive" and all(f.n == 8 for f in wins.values())


def test_the_comparator_is_fixed_in_advance_not_the_best_other_of_the_data():
    """asym_reset has the lowest probe loss after exact_copy, but "exact copy ranks first"
    compares exact_copy with structured, the comparator named before any run."""
    p = smoke(checkpoints=(10, 20))
    probe = {"exact_copy": 3.50, "perturb": 3.50, "asym_reset": 3.49, "structured": 3.60}
    rows = synthetic(p, lambda r, s, c, name: {"probe_loss": probe.get(name, 3.7) + 1e-4 * s},
                     names=list(probe))
    found = wr.findings(rows, p, wr.cells_of(rows))
    (f,) = [f for f in by_claim(found, "probe loss, exact_copy") if f.claim.endswith("pooled")]
    assert "exact_copy - structured (comparator fixed in advance)" in f.claim
    assert f.estimate == pytest.approx(-0.10) and f.verdict == "agree"
    assert design.COMPARATOR == {"exact_copy": "structured", "structured": "exact_copy"}


# --- ties, bounded and degenerate intervals -------------------------------------------------

def test_a_loss_difference_within_the_tie_tolerance_is_never_agree_or_disagree():
    """-1.19e-7 nats at n = 2 with a zero-width interval, or at n = 8 with an interval
    that excludes 0 but lies within 1e-5 of it: inconclusive, also after Holm. A real
    difference of 1e-3 still agrees."""
    cells2 = [(s, 10) for s in (0, 1)]
    cells8 = [(s, 10) for s in SEEDS8]
    tiny = wr.finding("loss, a - b, deterministic, pooled", "a wins", np.full(2, -1.19e-7), cells2, "< 0", tie=True)
    assert tiny.verdict == "inconclusive" and "tied" in tiny.detail
    jitter = np.array([-1.19e-7 + 1e-9 * i for i in range(8)])
    near = wr.finding("loss, a - b, deterministic, pooled", "a wins", jitter, cells8, "< 0", tie=True)
    assert near.hi < 0 and stats.verdict(near.estimate, near.lo, near.hi, "< 0") == "agree"  # the bare interval
    assert near.verdict == "inconclusive"
    real = wr.finding("loss, a - b, deterministic, pooled", "a wins", -1e-3 + jitter, cells8, "< 0", tie=True)
    assert real.verdict == "agree"
    stats.holm_adjust([tiny, near, real])
    assert (tiny.holm, near.holm, real.holm) == ("inconclusive", "inconclusive", "agree")


def test_ranks_and_spearman_treat_losses_within_the_tolerance_as_ties():
    assert wr.tied_ranks([3.0, 3.0 + 2e-7, 3.1, 2.9]) == ["2=", "2=", "4", "1"]
    rows = [{"probe_escape": e, "final_loss": 3.0 + d} for e, d in ((0.0, 0.0), (1e-5, 1e-7), (0.7, -2e-7))]
    assert math.isnan(wr.rho(rows, "probe_escape", "final_loss"))  # every loss tied: no ranking
    assert stats.spearman([r["probe_escape"] for r in rows], [r["final_loss"] for r in rows]) == pytest.approx(-0.5)
    rows.append({"probe_escape": 1.0, "final_loss": 3.1})
    assert wr.rho(rows, "probe_escape", "final_loss") == pytest.approx(stats.spearman([0, 1, 2, 3], [1, 1, 1, 4]))


def test_perturb_is_reported_tied_with_exact_copy_not_ranked(tmp_path, monkeypatch):
    """perturb 2e-7 nats from exact_copy in every cell shares its rank, its gap reads
    "(tie)", and the report says it is tied, not ranked; rankings per checkpoint and pooled."""
    p = smoke(checkpoints=(10, 20), regimes=("deterministic",), references=(), rewarm_strategies=())
    final = {"exact_copy": 3.0, "perturb": 3.0 + 2e-7, "asym_reset": 3.01, "structured": 2.99,
             "perturb@0.1": 3.0 - 3e-6, "perturb_np@0.1": 3.02}
    rows = synthetic(p, lambda r, s, c, name: {"final_loss": final[name] + 1e-3 * s, "auc": final[name]})
    monkeypatch.setattr(wr, "_plots", lambda *a, **k: [])
    meta = {"command": "x", "wall_seconds": 1.0, "computed": 0, "cached": len(rows), "device": "cpu", "threads": 1,
            "data": "d", "corpus_key": "k", "train_tokens": 1, "valid_tokens": 1, "vocab_size": 512,
            "base_keys": {}, "workers": 2, "compute_seconds": 60.0, "computed_seconds": 0.0, "base_seconds": {}}
    wr.write_report(tmp_path, p, rows, meta)
    report = (tmp_path / "report.md").read_text()
    for scope in ("checkpoint 10", "checkpoint 20", "pooled"):
        assert f"### deterministic regime, {scope}" in report
    table = report[report.index("### deterministic regime, pooled"):report.index("Within 1e-05 nats")]
    ranks = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in table.splitlines() if line.startswith("| ")}
    assert ranks["structured"] == "1" and ranks["exact_copy"] == ranks["perturb"] == ranks["perturb@0.1"] == "2="
    assert "(tie)" in next(line for line in table.splitlines() if line.startswith("| perturb |"))
    assert "deterministic: perturb (largest |difference| in a cell 2.00e-07 nats), perturb@0.1" in report
    assert "tied, not ranked" in report


def test_intervals_of_bounded_quantities_are_clipped_and_say_so():
    cells = [(s, 10) for s in (0, 1)]
    f = wr.finding("rho difference, deterministic, pooled", "probe selects", np.array([-0.5, 1.9]), cells, "> 0",
                   bounds=wr.RHO_DIFF_RANGE)
    assert -2 <= f.lo <= f.hi <= 2 and f.verdict == "inconclusive"
    assert "CI clipped to [-2, 2] from [-14.55, 15.95]" in f.detail
    assert all(-2 <= v <= 2 for v in f.ci_at(0.99)[1:])


def test_seeds_that_all_agree_exactly_give_the_sign_tests_interval_not_a_point():
    """Two seeds with the same Spearman give a zero-width t interval: no verdict from that
    (p = 0.5); eight such seeds are evidence (p = 2^-7)."""
    two = wr.finding("rho, deterministic, pooled", "x", np.array([0.8, 0.8]), [(0, 10), (1, 10)], "> 0",
                     bounds=wr.RHO_RANGE)
    assert two.verdict == "inconclusive" and (two.lo, two.hi) == (-1.0, 1.0)
    assert stats.p_value(two.ci_at, two.test) == pytest.approx(0.5, rel=0.02)
    eight = wr.finding("rho, deterministic, pooled", "x", np.full(8, 0.8), [(s, 10) for s in SEEDS8], "> 0",
                       bounds=wr.RHO_RANGE)
    assert eight.verdict == "agree" and stats.p_value(eight.ci_at, eight.test) == pytest.approx(2 ** -7, rel=0.02)


def test_every_finding_is_holm_adjusted_across_the_report():
    """Each finding carries ci_at; holm_adjust over all of them turns a lone 95% agree with
    p ~ 0.03 into inconclusive among the report's findings."""
    p = smoke(checkpoints=(10, 20), regimes=("deterministic", "stochastic"))
    rng = np.random.default_rng(1)

    def value(regime, seed, ckpt, name):
        structured = name == "structured" and regime == "deterministic"
        return {"final_loss": 3.0 - (0.002 if structured else 0.0) + 0.002 * rng.normal(),
                "probe_loss": 3.5 + 0.01 * rng.normal(), "probe_escape": rng.random()}

    rows = synthetic(p, value, regimes=p.regimes)
    found = wr.findings(rows, p, wr.cells_of(rows))
    assert len(found) == 30 and all(f.ci_at is not None for f in found)
    stats.holm_adjust(found)
    assert all(f.holm in stats.VERDICTS and 0 < f.p <= 1 for f in found)
    weak = [f for f in found if f.verdict == "agree" and f.p > 0.05 / len(found)]
    assert weak and all(f.holm == "inconclusive" for f in weak)


# --- the Run section -------------------------------------------------------------------------

def test_the_run_section_records_the_runs_compute_apart_from_this_invocations_wall_time():
    """A re-render from the cache took 0.4 s; the runs themselves took 1h29m (their own
    times, kept in the cache) plus the base models'."""
    meta = {"command": "python -m growkern.studies warmstart --preset cpu", "wall_seconds": 0.4, "computed": 0,
            "cached": 336, "device": "cpu", "threads": 1, "workers": 2, "compute_seconds": 5355.7,
            "computed_seconds": 0.0, "base_keys": {0: "a", 1: "b"}, "base_seconds": {"a": 60.0, "b": 70.0}}
    text = "\n".join(wr.run_lines(meta, 336))
    assert "the 336 continuations' own times sum to 1h29m" in text
    assert "the base models 2m10s (2 of 2 timed when trained)" in text
    assert "this invocation: 0s of wall time (a re-render of the report from the cache" in text
    assert "wall time of this invocation: 0s" not in text


# --- the references and the shuffle regime ----------------------------------------------------

def test_structured_with_mapped_moments_has_structureds_weights_and_exact_copys_moments():
    """structured(moments="mapped"): weights bit for bit structured's, AdamW moments bit for
    bit exact_copy's (the default gives new units zero moments), in widen_ and in the
    one-tensor path of offline growth."""
    from growkern.growth.apply import grow_tensor
    from growkern.kernels.backends import resolve_backend

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16, d_ff=64, norm="rmsnorm"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 16))
    for _ in range(3):
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad()

    def grow(strategy, **options):
        m = copy.deepcopy(model)
        o = torch.optim.AdamW(m.parameters(), lr=1e-2)
        o.load_state_dict(opt.state_dict())
        rep = growkern.widen_(m, o, factor=2, strategy=strategy, seed=0, **options)
        return m, o, rep

    mapped, zero, clone = grow("structured", moments="mapped"), grow("structured"), grow("exact_copy")
    assert mapped[2].strategy == "structured(moments=mapped)" and mapped[2].exact
    for (name, a), b, c in zip(mapped[0].named_parameters(), zero[0].parameters(), clone[0].parameters()):
        assert torch.equal(a, b), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(mapped[1].state[a][key], clone[1].state[c][key]), (name, key)
    up = dict(zero[0].named_parameters())["blocks.0.mlp.up.weight"]
    assert zero[1].state[up]["exp_avg_sq"][64:].abs().max() == 0  # the default: new d_ff units start at 0
    plan = growkern.plan_growth(model, factor=2, strategy="structured", moments="mapped")
    tp = plan.tensors["blocks.0.mlp.up.weight"]
    widen_many = resolve_backend("auto", torch.device("cpu"), batch=True)[0]
    old = opt.state[dict(model.named_parameters())["blocks.0.mlp.up.weight"]]["exp_avg"]
    grown = dict(mapped[0].named_parameters())["blocks.0.mlp.up.weight"]
    assert torch.equal(grow_tensor(tp, old, "exp_avg", plan.strategy, 0, widen_many), mapped[1].state[grown]["exp_avg"])
    with pytest.raises(ValueError, match="structured: moments must be 'zero' or 'mapped', got 'keep'"):
        growkern.plan_growth(model, factor=2, strategy="structured", moments="keep")


def test_heldout_pass_gives_the_separate_evaluations_numbers():
    """One forward per model gives exactly what val_loss and heldout_kl give with one each."""
    from growkern.studies.heldout import heldout_kl, val_loss
    from growkern.studies.warmstart.run import heldout_pass

    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16, d_ff=64, norm="rmsnorm")
    a, b = GPT(cfg), GPT(cfg)
    windows = [(torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))) for _ in range(3)]
    loss, loss_ref, kl = heldout_pass(a, windows, ref=b)
    assert (loss, loss_ref, kl) == (val_loss(a, windows), val_loss(b, windows), heldout_kl(b, a, windows))
    assert heldout_pass(a, windows)[0] == val_loss(a, windows)


def test_small_equal_compute_spends_the_grown_candidates_flops():
    """cpu preset: the wide model (d_model 128) has the committed run's 926,848 parameters and
    3.84 times the small model's training FLOPs per token, so the small model continues 492
    steps for a grown candidate's 128, on the base schedule stretched to them."""
    p = get_preset("warmstart", "cpu")
    small, _ = design.base_configs(p, p.vocab_size, 0)
    with torch.device("meta"):
        assert GPT(design.wide_config(p, small)).num_params() == 926_848
    ratio = design.flops_per_token(design.wide_config(p, small), 64) / design.flops_per_token(small, 64)
    assert ratio == pytest.approx(3.841, abs=1e-3) and design.equal_compute_steps(p, small) == 492
    from growkern.studies.warmstart.run import StretchedSchedule
    base = growkern.train.loop.LRSchedule("cosine", p.horizon, p.warmup, p.min_lr_ratio)
    stretched = StretchedSchedule(base, 1000, 128, 492)
    assert stretched(0) == base(1000) and stretched(492) == pytest.approx(base(1128))
    assert stretched(246) == pytest.approx(base(1064))


def test_the_cpu_preset_plan():
    """432 continuations (336 before): the four families and perturb / perturb_np at noise 0.1
    in three regimes on 8 seeds, the references in two, three re-warmed ones on 4 seeds; no
    run within the tie tolerance of exact_copy by construction (perturb at 1e-3 and 3e-2,
    perturb+rewarm) and no scratch; val loss every 32 steps."""
    p = get_preset("warmstart", "cpu")
    runs = design.planned_runs(p)
    assert len(runs) == 432 and len(design.planned_runs(smoke())) == 128
    names = {c.name for _, _, c, _ in runs}
    assert not names & {"perturb@0.001", "perturb@0.03", "perturb_np@0.001", "perturb+rewarm", "scratch"}
    assert {r for *_, r in runs} == {"deterministic", "shuffle", "stochastic"}
    assert {r for _, _, c, r in runs if c.group in ("reference", "schedule")} == {"deterministic", "stochastic"}
    count = lambda group: sum(c.group == group for _, _, c, _ in runs)  # noqa: E731
    assert (count("main"), count("noise"), count("reference"), count("schedule")) == (192, 96, 96, 48)
    assert p.eval_every == 32 and p.probe_lag == 16


@pytest.mark.skipif(not (REAL / "train.txt").is_file(), reason="TinyStories sample not found")
def test_small_equal_compute_and_the_shuffle_regime_end_to_end(tmp_path):
    """One seed, one checkpoint of the smoke preset: exact_copy and small_equal_compute in
    the three regimes. The reference trains the equal-compute steps on the small model and
    carries no growth metrics; shuffle differs from deterministic in the data and from
    stochastic in dropout alone (exact_copy's update stays in the clone subspace without
    dropout); every run's config holds the protocol."""
    res = run_warmstart("smoke", tmp_path, data=REAL, progress=False, workers=1, base_seeds=(0,), checkpoints=(20,),
                        strategies=("exact_copy",), noise_scales=(), references=("small_equal_compute",),
                        rewarm_strategies=(), reference_regimes=None)
    rows = {(r["candidate"], r["regime"]): r for r in res.rows}
    assert len(res.rows) == 6
    p = smoke()
    steps = design.equal_compute_steps(p, design.base_configs(p, 512, 0)[0])
    for regime in ("deterministic", "shuffle", "stochastic"):
        ref, grown = rows[("small_equal_compute", regime)], rows[("exact_copy", regime)]
        assert ref["steps"] == ref["train_steps"] == steps and grown["steps"] == 16
        assert abs(ref["flops"] / grown["flops"] - 1) < 1 / steps
        assert ref["params_wide"] == ref["params_small"] < grown["params_wide"]
        assert ref["pres_kl"] is None and ref["probe_escape"] is None and math.isfinite(ref["probe_loss"])
        assert ref["curve"][-1][0] == pytest.approx(16) and len(ref["curve"]) == len(grown["curve"])
    final = {r: rows[("exact_copy", r)]["final_loss"] for r in ("deterministic", "shuffle", "stochastic")}
    assert len(set(final.values())) == 3
    assert rows[("exact_copy", "shuffle")]["probe_escape"] < 1e-10 < 1e-6 < rows[("exact_copy", "stochastic")][
        "probe_escape"]
    configs = [json.loads(f.read_text())["config"] for f in (tmp_path / "runs").glob("*.json")]
    assert {c["protocol"] for c in configs} == {design.PROTOCOL}
    assert {c["regime"]: c["dropout"] for c in configs} == {"deterministic": 0.0, "shuffle": 0.0, "stochastic": 0.1}
    report = (tmp_path / "report.md").read_text()
    assert "| small_equal_compute |" in report and "6 computed in this invocation" in report
