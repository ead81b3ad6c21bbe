"""Full-state checkpoints: exact resume, atomic saves, validation, growth through a checkpoint."""
import json
import os
import random

import numpy as np
import pytest
import torch

import growkern
from growkern.train import checkpoint as C
from growkern.train.loop import build_optimizer, build_scheduler, init_model, make_batches, train

from test_train import cfg, dead_pid, synthetic_tokens, tiny

TOKENS = synthetic_tokens()


def fresh(tcfg, gcfg=None):
    model = init_model(gcfg or tiny(), tcfg.seed)
    opt = build_optimizer(model, tcfg)
    return model, opt, build_scheduler(opt, tcfg), make_batches(TOKENS, tcfg)


def save_at(path, tcfg, steps, **kw):
    model, opt, sched, batches = fresh(tcfg)
    train(model, opt, sched, batches, tcfg, end_step=steps)
    C.save(path, model, opt, sched, step=steps, train_config=tcfg, batches=batches, **kw)
    return model, opt, sched, batches


def losses(hist):
    return [r["loss"] for r in hist]


# --- exact resume ----------------------------------------------------------------

@pytest.mark.parametrize("regime", ["deterministic", "stochastic"])
def test_exact_resume(tmp_path, regime):
    tcfg = cfg(steps=12, warmup=3, schedule="cosine", regime=regime,
               dropout=0.1 if regime == "stochastic" else 0.0, salt=3)
    torch.manual_seed(1)
    model, opt, sched, batches = fresh(tcfg)
    full = train(model, opt, sched, batches, tcfg)

    torch.manual_seed(1)
    m, o, s, b = fresh(tcfg)
    first = train(m, o, s, b, tcfg, end_step=5)
    C.save(tmp_path / "ck", m, o, s, step=5, train_config=tcfg, batches=b)
    torch.manual_seed(999)  # whatever happens in between must not matter
    random.seed(999)
    np.random.seed(999)

    ck = C.load(tmp_path / "ck")
    ck.restore_rng()
    assert ck.step == 5 and ck.data["step"] == 5 and ck.scheduler.last_epoch == 5
    rest = train(ck.model, ck.optimizer, ck.scheduler, ck.batches(TOKENS), ck.train_config, start_step=ck.step)
    assert losses(first + rest) == losses(full)  # bit for bit
    assert [r["lr"] for r in first + rest] == [r["lr"] for r in full]
    for p, q in zip(model.parameters(), ck.model.parameters()):
        assert torch.equal(p, q)


def test_contents_roundtrip(tmp_path):
    tcfg = cfg(steps=6)
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"fake": "tokenizer"}')
    ref = {"path": str(tok), "cache_key": "abc123", "vocab_size": 50, "vocab_request": 64, "data": "/x"}
    torch.manual_seed(7)
    rng = C.rng_state()
    model, opt, sched, batches = save_at(tmp_path / "ck", tcfg, 4, tokenizer=ref,
                                         growth_history=[{"strategy": "none"}], rng=rng)
    ck = C.load(tmp_path / "ck")
    assert ck.gpt_config == model.config and ck.train_config == tcfg
    assert ck.tokenizer == ref and ck.tokenizer_file.read_text() == tok.read_text()
    assert ck.growth_history == [{"strategy": "none"}]
    assert ck.data == batches.state_dict()
    assert torch.equal(ck.rng["torch"], rng["torch"])
    assert ck.model.lm_head.weight is ck.model.wte.weight  # ties survive
    assert ck.meta["weights"] == ("model.safetensors" if C._st is not None else "model.pt")
    # the run directory layout resolves too
    os.rename(tmp_path / "ck", tmp_path / "ckpt")
    assert C.load(tmp_path).step == 4


def test_torch_save_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "_st", None)
    model, *_ = save_at(tmp_path / "ck", cfg(), 2)
    assert (tmp_path / "ck" / "model.pt").is_file()
    ck = C.load(tmp_path / "ck")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ck.model.parameters()))


# --- atomic saves ----------------------------------------------------------------

def leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("swap", ["exchange", "rename"])
def test_crash_mid_save_keeps_the_old_checkpoint(tmp_path, monkeypatch, swap):
    if swap == "rename":
        monkeypatch.setattr(C, "_exchange", lambda a, b: False)
    tcfg = cfg()
    model, opt, sched, batches = save_at(tmp_path / "ck", tcfg, 3)
    before = (tmp_path / "ck" / "meta.json").read_text()
    train(model, opt, sched, batches, tcfg, start_step=3, end_step=5)

    real = C._write_torch

    def crash(path, obj):
        real(path, obj)
        if path.name == "state.pt":  # after weights and optimizer are written
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(C, "_write_torch", crash)
    with pytest.raises(KeyboardInterrupt):
        C.save(tmp_path / "ck", model, opt, sched, step=5, train_config=tcfg, batches=batches)
    assert leftovers(tmp_path) == []
    assert (tmp_path / "ck" / "meta.json").read_text() == before
    assert C.load(tmp_path / "ck").step == 3  # checksums verified: intact
    with pytest.raises(KeyboardInterrupt):  # a first save that crashes leaves nothing
        C.save(tmp_path / "new", model, opt, sched, step=5, train_config=tcfg, batches=batches)
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []

    monkeypatch.setattr(C, "_write_torch", real)
    C.save(tmp_path / "ck", model, opt, sched, step=5, train_config=tcfg, batches=batches)
    assert C.load(tmp_path / "ck").step == 5 and leftovers(tmp_path) == []


def test_save_and_load_remove_what_killed_saves_left(tmp_path):
    model, opt, sched, batches = save_at(tmp_path / "ck", cfg(), 2)
    dead = dead_pid()

    def staged(name, kind, pid, tag="0123abcd"):  # a save of `name` by process `pid`
        d = tmp_path / f".{name}.{kind}-{pid}-{tag}"
        d.mkdir()
        (d / "optimizer.pt").write_bytes(b"\0" * 1000)
        return d.name

    keep = sorted([staged("ck", "tmp", os.getpid(), "feedbeef"),  # a live, concurrent writer
                   staged("ck2", "tmp", dead),                     # another target's
                   staged("ck", "tmp", dead, "not-ours")])          # not a staging name
    killed = [staged("ck", "tmp", dead), staged("ck", "old", dead, "89abcdef")]
    C.save(tmp_path / "ck", model, opt, sched, step=2, train_config=cfg(), batches=batches)
    assert leftovers(tmp_path) == keep and not any((tmp_path / k).exists() for k in killed)

    staged("ck", "tmp", dead)  # a load (e.g. to resume) cleans up too
    assert C.load(tmp_path / "ck").step == 2 and leftovers(tmp_path) == keep
    staged("ckpt", "tmp", dead)  # in a run directory too
    os.rename(tmp_path / "ck", tmp_path / "ckpt")
    assert C.load(tmp_path).step == 2 and leftovers(tmp_path) == keep

    # killed between the two renames of the fallback swap: the target is gone, the old
    # version waits as .old-, the new one as .tmp-; the old one comes back
    os.rename(tmp_path / "ckpt", tmp_path / f".ckpt.old-{dead}-00000000")
    staged("ckpt", "tmp", dead)
    assert C.load(tmp_path / "ckpt").step == 2 and leftovers(tmp_path) == keep


def test_save_needs_growkern_optimizer_and_scheduler(tmp_path):
    model, opt, sched, _ = fresh(cfg())
    plain = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="build_optimizer"):
        C.save(tmp_path / "ck", model, plain, torch.optim.lr_scheduler.LambdaLR(plain, lambda s: 1.0),
               step=0, train_config=cfg())
    with pytest.raises(ValueError, match="build_scheduler"):
        C.save(tmp_path / "ck", model, opt, torch.optim.lr_scheduler.StepLR(opt, 10), step=0,
               train_config=cfg())
    assert not (tmp_path / "ck").exists()


def test_refuses_to_replace_other_directories(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    model, opt, sched, batches = fresh(cfg())
    with pytest.raises(FileExistsError, match="not a growkern checkpoint"):
        C.save(tmp_path / "notes", model, opt, sched, step=0, train_config=cfg())
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


# --- validation ------------------------------------------------------------------

def edit_meta(path, fn):
    meta = json.loads((path / "meta.json").read_text())
    fn(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def reseal(path, name):
    edit_meta(path, lambda m: m["files"].__setitem__(name, C.file_entry(path / name)))


@pytest.fixture
def saved(tmp_path):
    save_at(tmp_path / "ck", cfg(steps=6), 2)
    return tmp_path / "ck"


def test_error_missing_file(saved):
    (saved / "optimizer.pt").unlink()
    with pytest.raises(C.CheckpointError, match="file optimizer.pt is missing"):
        C.load(saved)


def test_error_missing_meta_key(saved):
    edit_meta(saved, lambda m: m.pop("step"))
    with pytest.raises(C.CheckpointError, match=r"lacks key\(s\) \['step'\]"):
        C.load(saved)


def test_error_missing_weight(saved):
    name = C.json.loads((saved / "meta.json").read_text())["weights"]
    if name == "model.safetensors":
        from safetensors.torch import load_file, save_file
        sd = load_file(str(saved / name))
        del sd["blocks.1.mlp.up.weight"]
        save_file(sd, str(saved / name))
    else:
        sd = torch.load(saved / name)
        del sd["blocks.1.mlp.up.weight"]
        torch.save(sd, saved / name)
    with pytest.raises(C.CheckpointError, match="model.* bytes"):  # tampering is caught first
        C.load(saved)
    reseal(saved, name)
    with pytest.raises(C.CheckpointError, match=r"missing weights \['blocks.1.mlp.up.weight'\]"):
        C.load(saved)


def test_error_wrong_shape_for_config(saved):
    edit_meta(saved, lambda m: m["gpt_config"].update(d_model=32, d_ff=None))
    with pytest.raises(C.CheckpointError, match=r"wrong shapes vs gpt_config \(wte.weight: checkpoint "
                                                r"\(61, 16\), gpt_config expects \(61, 32\)"):
        C.load(saved)


def test_error_train_config_mismatch(saved):
    edit_meta(saved, lambda m: m["train_config"].update(steps=99))
    with pytest.raises(C.CheckpointError, match="scheduler state was made for"):
        C.load(saved)
    edit_meta(saved, lambda m: m["train_config"].update(steps=6, block_size=64))
    with pytest.raises(C.CheckpointError, match="block_size 64 > gpt_config.block_size 16"):
        C.load(saved)
    edit_meta(saved, lambda m: m["train_config"].update(block_size=16, decay_embeddings=False))
    with pytest.raises(C.CheckpointError, match="parameter groups"):
        C.load(saved)
    edit_meta(saved, lambda m: m["train_config"].update(decay_embeddings=True, nonsense=1))
    with pytest.raises(C.CheckpointError, match=r"bad train_config: .*nonsense"):
        C.load(saved)


def test_error_step_mismatch_and_corruption(saved):
    edit_meta(saved, lambda m: m.update(step=3))
    with pytest.raises(C.CheckpointError, match="scheduler has taken 2 steps, the checkpoint is at step 3"):
        C.load(saved)
    edit_meta(saved, lambda m: m.update(step=2))
    data = bytearray((saved / "state.pt").read_bytes())
    data[-20] ^= 0xFF
    (saved / "state.pt").write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match="state.pt is corrupt"):
        C.load(saved)
    (saved / "state.pt").write_bytes(bytes(data[:100]))
    with pytest.raises(C.CheckpointError, match="truncated"):
        C.load(saved)


def test_error_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.CheckpointError, match="not a growkern checkpoint"):
        C.load(tmp_path / "empty")


# --- growth through a checkpoint ------------------------------------------------

@pytest.mark.parametrize("schedule", ["continue", "rewarm"])
def test_grow_via_checkpoint_keeps_function_and_trains_on(tmp_path, schedule):
    tcfg = cfg(steps=12, schedule="constant", warmup=0)
    save_at(tmp_path / "small", tcfg, 4)
    ck = C.load(tmp_path / "small")
    x, y = make_batches(TOKENS, tcfg).batch(1000)
    ck.model.eval()
    with torch.no_grad():
        before = ck.model(x)[0]
    report = growkern.widen_(ck.model, ck.optimizer, ck.scheduler, factor=2, strategy="exact_copy",
                             probe_batch=(x, y), schedule=schedule,
                             rewarm_steps=4 if schedule == "rewarm" else None)
    assert report.preservation["max_abs_dlogits"] < 1e-5 and report.preservation["kl_small_wide"] < 1e-10
    C.save(tmp_path / "wide", ck.model, ck.optimizer, ck.scheduler, step=ck.step, train_config=tcfg,
           data_state=ck.data, rng=ck.rng, growth_history=[report])

    wide = C.load(tmp_path / "wide")
    assert wide.gpt_config.d_model == 32 and wide.gpt_config.d_ff == 128
    assert wide.growth_history[0]["strategy"] == report.strategy
    assert wide.growth_history[0]["preservation"]["kl_small_wide"] == report.preservation["kl_small_wide"]
    wide.model.eval()
    with torch.no_grad():
        after = wide.model(x)[0]
    assert (after - before).abs().max() < 1e-5
    wide.restore_rng()
    hist = train(wide.model, wide.optimizer, wide.scheduler, wide.batches(TOKENS), wide.train_config,
                 start_step=wide.step)
    assert len(hist) == 8 and all(np.isfinite(losses(hist)))
    lrs = [r["lr"] for r in hist]
    if schedule == "rewarm":  # the ramp survives the checkpoint: 1/4, 2/4, 3/4, then full
        assert lrs[:5] == pytest.approx([tcfg.lr * f for f in (0.25, 0.5, 0.75, 1.0, 1.0)])
    else:
        assert lrs == pytest.approx([tcfg.lr] * 8)
    # the same continuation without the checkpoint round trip is identical
    ck.restore_rng()
    direct = train(ck.model, ck.optimizer, ck.scheduler, ck.batches(TOKENS), tcfg, start_step=ck.step)
    assert losses(direct) == losses(hist)
