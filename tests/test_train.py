"""Training loop: schedules, optimizer groups, regimes, metrics, learning on real text."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from growkern import GPTConfig
from growkern.train import checkpoint as C
from growkern.train import data as D
from growkern.train import loop as train_mod
from growkern.train.loop import (LRSchedule, TrainConfig, build_optimizer, build_scheduler, determinism, evaluate,
                                 flops_per_token, init_model, make_batches, train)

REAL = Path(__file__).resolve().parents[2] / "shared/data/tinystories"


def synthetic_tokens(n=20_000, vocab=61, seed=0):
    # a noisy repeating pattern: learnable, so losses move, and free of any data file
    rng = np.random.default_rng(seed)
    base = np.arange(n) % 17 * 3 % vocab
    noise = rng.integers(0, vocab, n)
    return np.where(rng.random(n) < 0.2, noise, base).astype(np.uint16)


def tiny(vocab=61, **kw):
    return GPTConfig(**{**dict(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, d_model=16), **kw})


def cfg(**kw):
    return TrainConfig(**{**dict(steps=10, batch_size=4, block_size=16, lr=1e-2, min_lr=1e-3, warmup=2,
                                 eval_every=0, progress=False), **kw})


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    r = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                       text=True, timeout=120, check=True)
    return int(r.stdout)


TIMING = ("dt_ms", "tok_s", "mfu")


def log_records(path):
    """The records of a JSONL metrics log, without the timing fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in Path(path).read_text().splitlines()]


def run(tcfg, tokens, gcfg=None, **train_kw):
    model = init_model(gcfg or tiny(), tcfg.seed)
    opt = build_optimizer(model, tcfg)
    sched = build_scheduler(opt, tcfg)
    batches = make_batches(tokens, tcfg)
    hist = train(model, opt, sched, batches, tcfg, **train_kw)
    return model, hist, batches


# --- schedules -----------------------------------------------------------------

@pytest.mark.parametrize("kind,expect", [
    ("constant", {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 55: 1.0, 99: 1.0, 100: 1.0}),
    ("cosine", {0: 0.1, 9: 1.0, 10: 1.0, 55: 0.55, 100: 0.1, 150: 0.1}),
    ("wsd", {0: 0.1, 9: 1.0, 10: 1.0, 79: 1.0, 80: 1.0, 90: 0.55, 100: 0.1, 120: 0.1}),
])
def test_schedule_values(kind, expect):
    f = LRSchedule(kind, steps=100, warmup=10, min_ratio=0.1, decay_frac=0.2)
    for step, value in expect.items():
        assert f(step) == pytest.approx(value, abs=1e-12), (kind, step)


def test_scheduler_drives_the_optimizer():
    tcfg = cfg(steps=20, warmup=4, lr=2e-3, min_lr=2e-4, schedule="wsd", decay_frac=0.5)
    model = init_model(tiny())
    opt = build_optimizer(model, tcfg)
    sched = build_scheduler(opt, tcfg)
    f = LRSchedule.from_config(tcfg)
    for s in range(25):
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(2e-3 * f(s), rel=1e-12)
        opt.step()
        sched.step()


def test_config_validation():
    with pytest.raises(ValueError, match="deterministic regime trains without dropout"):
        TrainConfig(dropout=0.1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="no field"):
        TrainConfig.from_dict({"stepz": 3})
    c = TrainConfig(betas=[0.8, 0.9])
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


# --- optimizer -----------------------------------------------------------------

def test_param_groups_decay_matrices_only():
    model = init_model(tiny(norm="layernorm", bias=True))
    opt = build_optimizer(model, cfg(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert "wte.weight" in decay["param_names"] and "ln_f.weight" in no_decay["param_names"]
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(model.parameters()))  # tied lm_head/wte counted once
    opt = build_optimizer(model, cfg(decay_embeddings=False))
    assert "wte.weight" in opt.param_groups[1]["param_names"]


def test_flops_per_token():
    model = init_model(tiny())
    c = model.config
    assert flops_per_token(model, 16) == 6 * model.num_params(non_embedding=True) + 6 * c.n_layer * c.d_model * 16


# --- regimes -------------------------------------------------------------------

def test_deterministic_runs_are_bit_identical():
    tokens = synthetic_tokens()
    m1, h1, _ = run(cfg(grad_accum=2), tokens)
    m2, h2, _ = run(cfg(grad_accum=2), tokens)
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]
    assert [r["grad_norm"] for r in h1] == [r["grad_norm"] for r in h2]
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_stochastic_regime_is_seeded_and_salted():
    tokens = synthetic_tokens()
    c = cfg(regime="stochastic", dropout=0.1, salt=1)
    torch.manual_seed(5)
    m, h1, _ = run(c, tokens)
    assert m.config.dropout == 0.1 and m.blocks[0].drop.p == 0.1
    torch.manual_seed(5)
    _, h2, _ = run(c, tokens)
    torch.manual_seed(5)
    _, h3, _ = run(c.replace(salt=2), tokens)
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]
    assert [r["loss"] for r in h1] != [r["loss"] for r in h3]
    b1, b2 = make_batches(tokens, c), make_batches(tokens, c.replace(salt=2))
    assert not torch.equal(b1.batch(0)[0], b2.batch(0)[0])


def test_determinism_context_restores_settings():
    before = torch.are_deterministic_algorithms_enabled()
    with determinism(True):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


# --- the loop ------------------------------------------------------------------

def test_metrics_log_stop_and_eval(tmp_path):
    tokens = synthetic_tokens()
    log = tmp_path / "m" / "metrics.jsonl"
    ev = D.eval_batches(tokens, 16, 4, max_batches=2)
    seen = []
    model, hist, batches = run(cfg(steps=10, eval_every=3, grad_accum=2, log_path=str(log)), tokens,
                               end_step=7, eval_data=ev, on_step=lambda r: seen.append(r["step"]))
    assert [r["step"] for r in hist] == seen == list(range(1, 8))
    assert batches.step == 14  # two micro-batches per step
    assert [r["step"] for r in hist if "val_loss" in r] == [3, 6, 7]  # every 3 and at the end
    assert hist[-1]["val_loss"] == evaluate(model, ev)
    for r in hist:
        assert {"loss", "lr", "grad_norm", "dt_ms", "tok_s"} <= set(r) and "mfu" not in r  # CPU: no MFU
        assert r["tok_s"] > 0 and math.isfinite(r["loss"])
    assert [json.loads(line) for line in log.read_text().splitlines()] == hist
    # a truthy on_step stops the run
    _, hist, _ = run(cfg(), tokens, on_step=lambda r: r["step"] == 2)
    assert len(hist) == 2


def test_resume_drops_steps_logged_past_the_checkpoint(tmp_path):
    # killed after step 7 (mid-write of step 8) with its last checkpoint at step 5: the
    # resumed run must not log steps 6 and 7 twice, nor keep the torn line
    tokens = synthetic_tokens()
    run(cfg(steps=9, log_path=str(tmp_path / "full.jsonl")), tokens)
    log = tmp_path / "cut.jsonl"
    tcfg = cfg(steps=9, log_path=str(log))
    model = init_model(tiny(), tcfg.seed)
    opt = build_optimizer(model, tcfg)
    sched = build_scheduler(opt, tcfg)
    batches = make_batches(tokens, tcfg)
    train(model, opt, sched, batches, tcfg, end_step=5)
    C.save(tmp_path / "ck", model, opt, sched, step=5, train_config=tcfg, batches=batches)
    train(model, opt, sched, batches, tcfg, start_step=5, end_step=7)
    with open(log, "a") as f:
        f.write('{"step": 8, "loss": 3.1')  # torn: no end, no newline
    stale = tmp_path / f".cut.jsonl.tmp-{dead_pid()}-0123abcd"  # a rewrite that was killed
    stale.write_text("{}\n")
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()[:-1]] == [1, 2, 3, 4, 5, 6, 7]

    ck = C.load(tmp_path / "ck")
    ck.restore_rng()
    train(ck.model, ck.optimizer, ck.scheduler, ck.batches(tokens), tcfg, start_step=ck.step)
    assert [r["step"] for r in log_records(log)] == list(range(1, 10))
    assert log_records(log) == log_records(tmp_path / "full.jsonl")
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "cut.jsonl", "full.jsonl"]

    # nothing to drop: the log is left as it is (not rewritten)
    before = log.stat()
    train_mod.drop_records_after(log, 9)
    assert (log.stat().st_ino, log.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_progress_lines_off_a_terminal(monkeypatch, capsys):
    tokens = synthetic_tokens()
    ev = D.eval_batches(tokens, 16, 4, max_batches=1)
    # capsys's stderr is not a terminal: no tqdm bar, plain lines instead
    monkeypatch.setattr(train_mod, "PROGRESS_EVERY_S", 0.0, raising=False)  # a line after every step
    run(cfg(steps=4, progress=True), tokens, eval_data=ev)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 4, err
    for k, line in enumerate(lines, 1):
        assert line.startswith(f"step {k}/4 | loss ") and " | lr " in line and " tok/s" in line, line
        assert " elapsed, ETA " in line, line
    assert " | val " in lines[-1] and " | val " not in lines[0]
    assert lines[-1].endswith("ETA 0:00")

    monkeypatch.setattr(train_mod, "PROGRESS_EVERY_S", 1e9)  # rate-limited: only the end
    run(cfg(steps=4, progress=True), tokens, on_step=lambda r: r["step"] == 3)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("step 3/4 | loss ")

    monkeypatch.setattr(train_mod, "PROGRESS_EVERY_S", 0.0)
    run(cfg(steps=4, progress=True, log_every=2), tokens)  # log_every prints already: no doubles
    out, err = capsys.readouterr()
    assert err == "" and [line.split(" |")[0] for line in out.splitlines()] == ["step 2/4", "step 4/4"]
    run(cfg(steps=4, progress=False), tokens)
    assert capsys.readouterr() == ("", "")


def test_block_size_must_fit_the_model():
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        run(cfg(block_size=32), synthetic_tokens())


@pytest.mark.skipif(not (REAL / "train.txt").is_file(), reason=f"TinyStories sample not found at {REAL}")
def test_loss_falls_on_real_text(tmp_path):
    corpus = D.prepare(REAL, vocab_size=512, cache_dir=tmp_path)
    tcfg = cfg(steps=40, batch_size=8, block_size=32, lr=1e-2, min_lr=1e-3, warmup=4)
    gcfg = tiny(vocab=corpus.vocab_size, block_size=32, d_model=32)
    ev = D.eval_batches(corpus.valid, 32, 8, max_batches=4)
    model = init_model(gcfg)
    before = evaluate(model, ev)
    assert before == pytest.approx(math.log(corpus.vocab_size), abs=0.3)  # uniform at init
    _, hist, _ = run(tcfg, corpus.train, gcfg, eval_data=ev)
    assert hist[-1]["val_loss"] < before - 0.7
    assert np.mean([r["loss"] for r in hist[-5:]]) < np.mean([r["loss"] for r in hist[:5]]) - 0.5
