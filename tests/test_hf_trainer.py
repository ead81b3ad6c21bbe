"""growkern.hf with real transformers models (tiny random configs, CPU): GrowthCallback
inside Trainer.train(), and `growkern grow` of model directories and Trainer checkpoints."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, Trainer, TrainingArguments)

import growkern  # noqa: E402
from growkern import cli  # noqa: E402
from growkern.hf import GrowthCallback  # noqa: E402

VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


class Tokens(torch.utils.data.Dataset):
    """Random token ids, the same every time."""

    def __init__(self, n=32, length=8):
        self.x = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def trainer_for(model, out, callbacks=(), **overrides):
    kw = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, report_to=[], logging_steps=1,
              use_cpu=True, disable_tqdm=True, save_strategy="no")
    args = TrainingArguments(**{**kw, **overrides})
    return Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=list(callbacks))


def logged(trainer, key):
    return {r["step"]: r[key] for r in trainer.state.log_history if key in r}


def growths(trainer):
    return [r for r in trainer.state.log_history if "growth_strategy" in r]


def assert_moments_fit(trainer, steps):
    """Every parameter's AdamW moments have its shape and have taken `steps` steps."""
    opt = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer around torch's
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len(list(trainer.model.parameters()))
    for p in params:
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
        assert float(st["step"]) == steps


def grow(capsys, *argv):
    rc = cli.main(["grow", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """checkpoint-2 of a 4-step Llama run with the default optimizer, no growth."""
    out = tmp_path_factory.mktemp("llama_run")
    trainer_for(llama(), out, max_steps=4, save_strategy="steps", save_steps=2).train()
    return out / "checkpoint-2"


def test_callback_grows_mid_run_with_default_optimizer(tmp_path, capsys):
    model = llama()
    params = list(model.parameters())
    trainer = trainer_for(model, tmp_path, [GrowthCallback(at_step=3, factor=2)], gradient_accumulation_steps=2)
    assert trainer.args.optim == "adamw_torch_fused" and trainer.args.max_grad_norm > 0
    trainer.train()

    assert trainer.state.global_step == 6
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.num_attention_heads) == (32, 64, 4)
    assert all(a is b for a, b in zip(params, model.parameters()))  # grown in place
    assert trainer.model_wrapped is model and trainer.optimizer.optimizer.defaults["fused"]
    assert_moments_fit(trainer, steps=6)  # the grown moments kept stepping
    losses, norms = logged(trainer, "loss"), logged(trainer, "grad_norm")
    assert sorted(losses) == list(range(1, 7)) and all(map(math.isfinite, losses.values()))
    assert all(math.isfinite(norms[s]) and norms[s] > 0 for s in (4, 5, 6))
    assert logged(trainer, "learning_rate")[4] == pytest.approx(5e-5 * (1 - 3 / 6))  # linear schedule goes on
    (entry,) = growths(trainer)
    assert entry["step"] == 3 and entry["growth_d_model_before"] == 16 and entry["growth_d_model_after"] == 32
    assert entry["growth_params_after"] > entry["growth_params_before"] and entry["growth_seconds"] > 0
    assert "growkern.widen_" in capsys.readouterr().out


def test_resume_past_growth_grows_once_and_keeps_the_rewarm(tmp_path):
    def callback():
        return GrowthCallback(at_step=2, factor=2, schedule="rewarm", rewarm_steps=4)

    full = trainer_for(gpt2(), tmp_path / "full", [callback()], save_strategy="steps", save_steps=3)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"  # saved after the growth, mid-ramp
    model = GPT2LMHeadModel.from_pretrained(ckpt)
    assert model.config.n_embd == 32
    cb = callback()
    resumed = trainer_for(model, tmp_path / "resumed", [cb], save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(ckpt))

    assert model.config.n_embd == 32 and cb.grown_at == 2 and cb.report is None
    assert len(growths(resumed)) == 1  # the record from the first run, in the loaded log history
    assert_moments_fit(resumed, steps=6)
    for key in ("loss", "learning_rate"):  # an exact continuation, the ramp included (step 5 is on it)
        want, got = logged(full, key), logged(resumed, key)
        assert [got[s] for s in (4, 5, 6)] == pytest.approx([want[s] for s in (4, 5, 6)], rel=1e-5)
    assert logged(full, "learning_rate")[5] < 5e-5 * (1 - 4 / 6) * 0.9  # the ramp is still below the schedule
    state = transformers.TrainerState.load_from_json(tmp_path / "resumed" / "checkpoint-6" / "trainer_state.json")
    assert state.stateful_callbacks["GrowthCallback"]["attributes"]["grown_at"] == 2


def test_grown_trainer_checkpoint_resumes(llama_checkpoint, tmp_path, capsys):
    out = tmp_path / "grown"
    rc, text, err = grow(capsys, llama_checkpoint, "--factor", 2, "--out", out)
    assert rc == 0, err
    assert "growkern.widen_" in text and "Trainer checkpoint" in text
    for name in ("scheduler.pt", "rng_state.pth", "training_args.bin"):
        assert (out / name).read_bytes() == (llama_checkpoint / name).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["grown"]  # no temporary directory left
    # trainer_state.json: as it was, plus the growth in its log history
    before = json.loads((llama_checkpoint / "trainer_state.json").read_text())
    after = json.loads((out / "trainer_state.json").read_text())
    record = after["log_history"].pop()
    assert after == before
    assert record["growth_by"] == "growkern grow" and record["step"] == 2
    assert (record["growth_d_model_before"], record["growth_d_model_after"]) == (16, 32)

    # a model built from OUT, a new Trainer; the callback present must neither grow again
    # nor break the checkpoint save (its entry was missing from the loaded state)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32
    trainer = trainer_for(model, tmp_path / "resumed", [GrowthCallback(at_step=2, factor=2)], max_steps=4,
                          save_strategy="steps", save_steps=2)
    trainer.train(resume_from_checkpoint=str(out))
    assert trainer.state.global_step == 4 and model.config.hidden_size == 32
    assert_moments_fit(trainer, steps=4)  # the grown moments were loaded: a fresh optimizer would say 2
    losses = logged(trainer, "loss")
    assert all(math.isfinite(losses[s]) for s in (3, 4))
    assert (tmp_path / "resumed" / "checkpoint-4" / "optimizer.pt").is_file()


def test_model_directory_grows_to_the_in_memory_logits(tmp_path, capsys):
    src, out = tmp_path / "small", tmp_path / "wide"
    gpt2().save_pretrained(src)
    (src / "tokenizer.json").write_text('{"model": "test"}')
    rc, text, err = grow(capsys, src, "--factor", 2, "--strategy", "exact_copy", "--seed", 3, "--out", out)
    assert rc == 0, err
    assert "step-0 preservation: max|dlogits|" in text
    assert (out / "tokenizer.json").read_text() == '{"model": "test"}' and not (out / "optimizer.pt").exists()

    small = GPT2LMHeadModel.from_pretrained(src)
    twin = GPT2LMHeadModel.from_pretrained(src)
    growkern.widen_(twin, factor=2, strategy="exact_copy", seed=3)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.equal(logits, twin(ids).logits)
        torch.testing.assert_close(logits, small(ids).logits, atol=1e-5, rtol=1e-5)  # exact_copy preserves
    assert loaded.config.n_embd == 32

    before = sorted(p.name for p in out.iterdir())
    rc, _, err = grow(capsys, src, "--out", out)
    assert rc == 2 and "exists" in err and sorted(p.name for p in out.iterdir()) == before
    rc, _, err = grow(capsys, src, "--out", src)
    assert rc == 2 and "--out" in err


class NeedsPickle:
    pass


def test_pickled_optimizer_is_refused(llama_checkpoint, tmp_path, capsys):
    ckpt, out = tmp_path / "checkpoint-2", tmp_path / "grown"
    shutil.copytree(llama_checkpoint, ckpt)
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    torch.save({**sd, "extra": NeedsPickle()}, ckpt / "optimizer.pt")
    rc, _, err = grow(capsys, ckpt, "--out", out)
    assert rc == 2 and "weights_only=True" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # neither OUT nor a temporary


def test_grow_refuses_what_it_cannot_do(llama_checkpoint, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    rc, _, err = grow(capsys, other, "--out", tmp_path / "o1")
    assert rc == 2 and "not a growkern checkpoint" in err and "Trainer checkpoint" in err and "notes.txt" in err
    rc, _, err = grow(capsys, llama_checkpoint, "--schedule", "rewarm", "--rewarm-steps", 2, "--out", tmp_path / "o2")
    assert rc == 2 and "GrowthCallback(schedule='rewarm')" in err
    (tmp_path / "o3").mkdir()
    rc, _, err = grow(capsys, llama_checkpoint, "--out", tmp_path / "o3")
    assert rc == 2 and "exists" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o3", "other"]


def test_targets_the_model_cannot_take_fail_before_training(tmp_path):
    model = llama()
    trainer = trainer_for(model, tmp_path, [GrowthCallback(at_step=3, n_head=3)])
    with pytest.raises(ValueError, match="at_step=3.*n_head"):
        trainer.train()
    assert trainer.state.global_step == 0 and model.config.num_attention_heads == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(at_step=0, factor=2), "at_step"),
    (dict(at_step=2.0, factor=2), "at_step"),
    (dict(at_step=3), "factor"),
    (dict(at_step=3, factor=0.5), "factor"),
    (dict(at_step=3, d_model=-8), "d_model"),
    (dict(at_step=3, factor=2, strategy="nope"), "nope"),
    (dict(at_step=3, factor=2, noise=0.1), "noise"),
    (dict(at_step=3, factor=2, seed=-1), "seed"),
    (dict(at_step=3, factor=2, schedule="warm"), "schedule"),
    (dict(at_step=3, factor=2, schedule="rewarm"), "rewarm_steps"),
    (dict(at_step=3, factor=2, rewarm_steps=5), "rewarm_steps"),
    (dict(at_step=3, n_layer=1), "n_layer"),
    (dict(at_step=3, n_layer=4, depth_strategy="tall"), "depth_strategy"),
    (dict(at_step=3, n_layer=4, positions="0"), "positions"),
])
def test_callback_arguments_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GrowthCallback(**kwargs)


# --- resuming past a growth; growth recorded wherever it happens -------------------------

def test_the_same_script_resumes_past_the_growth(tmp_path):
    """The first run's script resumed as it is: the Trainer is given the small model,
    the checkpoint holds the grown one; the callback grows the model to the checkpoint's
    shapes before the Trainer loads it, and the run goes on as the uninterrupted one."""
    def callback():
        return GrowthCallback(at_step=2, factor=2)

    full = trainer_for(gpt2(), tmp_path / "full", [callback()], save_strategy="steps", save_steps=3)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"  # saved after the growth
    model, cb = gpt2(), callback()
    resumed = trainer_for(model, tmp_path / "resumed", [cb])
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert model.config.n_embd == 32 and (cb.grown_at, cb.grown_by) == (2, "GrowthCallback") and cb.report is None
    assert_moments_fit(resumed, steps=6)
    want, got = logged(full, "loss"), logged(resumed, "loss")
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([want[s] for s in (4, 5, 6)], rel=1e-5)

    # a checkpoint this callback's growth does not fit: what to do, not the loader's size mismatch
    model = gpt2()
    other = trainer_for(model, tmp_path / "other", [GrowthCallback(at_step=2, factor=4)])
    with pytest.raises(ValueError, match=r"AutoModelForCausalLM\.from_pretrained\(checkpoint\)") as e:
        other.train(resume_from_checkpoint=str(ckpt))
    assert "GrowthCallback(at_step=2, factor=4" in str(e.value) and "size mismatch" not in str(e.value)
    assert model.config.n_embd == 16 and other.state.global_step == 0


@pytest.mark.parametrize("model_from", ["grown config", "the script's small model"])
def test_checkpoint_grown_by_the_cli_is_not_grown_again(model_from, tmp_path, capsys, caplog):
    def callback():
        return GrowthCallback(at_step=3, factor=2)

    trainer_for(llama(), tmp_path / "run", [callback()], max_steps=4, save_strategy="steps", save_steps=2).train()
    ckpt, grown = tmp_path / "run" / "checkpoint-2", tmp_path / "grown"  # saved before the callback's step
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["GrowthCallback"]
    assert saved["attributes"]["grown_at"] is None
    rc, _, err = grow(capsys, ckpt, "--factor", 2, "--out", grown)
    assert rc == 0, err
    marked = json.loads((grown / "trainer_state.json").read_text())["stateful_callbacks"]["GrowthCallback"]
    assert marked["attributes"] == {"grown_at": 2, "grown_by": "growkern grow"}

    model = AutoModelForCausalLM.from_pretrained(grown) if model_from == "grown config" else llama()
    cb = callback()
    trainer = trainer_for(model, tmp_path / "resumed", [cb], max_steps=4, save_strategy="steps", save_steps=4)
    with caplog.at_level("WARNING", logger="growkern.hf"):
        trainer.train(resume_from_checkpoint=str(grown))
    assert model.config.hidden_size == 32 and cb.report is None  # 32, not 64
    assert (cb.grown_at, cb.grown_by) == (2, "growkern grow")
    assert "records the growth (growkern grow at step 2); not growing again" in caplog.text
    assert_moments_fit(trainer, steps=4)
    resaved = transformers.TrainerState.load_from_json(tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json")
    assert resaved.stateful_callbacks["GrowthCallback"]["attributes"] == {"grown_at": 2, "grown_by": "growkern grow"}


def test_callback_does_not_grow_a_model_with_its_target_widths(tmp_path, caplog):
    model = llama()  # hidden 16, intermediate 32, 2 heads
    cb = GrowthCallback(at_step=2, d_model=16, d_ff=32)
    with caplog.at_level("WARNING", logger="growkern.hf"):
        trainer_for(model, tmp_path, [cb], max_steps=3).train()
    assert cb.report is None and cb.grown_at is None and model.config.hidden_size == 16
    assert "the model has the target widths already (d_model 16, d_ff 32); not growing" in caplog.text


# --- corrupt files and full disks: one line, exit 2, nothing written, the source untouched -----

def tree(path):
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture(params=["model directory", "Trainer checkpoint"])
def source(request, llama_checkpoint, tmp_path):
    src = tmp_path / "src"
    if request.param == "Trainer checkpoint":
        shutil.copytree(llama_checkpoint, src)
    else:
        llama().save_pretrained(src)
    return src


def refused_untouched(capsys, src, *argv, words=()):
    before = tree(src)
    out = src.parent / "out"
    rc, text, err = grow(capsys, src, *argv, "--out", out)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("growkern grow: error: "), err
    assert "Traceback" not in text + err and all(w in err for w in words), err
    assert tree(src) == before and sorted(p.name for p in src.parent.iterdir()) == ["src"]  # no OUT, no staging
    return err


def test_truncated_weights_are_named_in_one_line(source, capsys):
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    refused_untouched(capsys, source, words=("model.safetensors", "truncated or corrupt"))


def test_full_disk_while_writing_the_weights(source, capsys, monkeypatch):
    """safetensors reports a full disk as SafetensorError (what it raised on a full tmpfs)."""
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # what a writer got down before the disk filled
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    refused_untouched(capsys, source, words=("cannot write", "out: no space left on device", "nothing was written"))


def test_full_disk_while_writing_the_optimizer(llama_checkpoint, tmp_path, capsys, monkeypatch):
    import errno
    import os
    src = tmp_path / "src"
    shutil.copytree(llama_checkpoint, src)
    real = torch.save

    def save(obj, f, *args, **kwargs):  # torch.save of optimizer.pt onto a disk that fills up
        if Path(getattr(f, "name", f)).name != "optimizer.pt":
            return real(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    refused_untouched(capsys, src, words=("(optimizer.pt)", "no space left on device"))


def test_grow_checks_the_free_space_first_in_a_sensible_unit(source, capsys, monkeypatch):
    usage = shutil.disk_usage(source)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=5000))
    err = refused_untouched(capsys, source, words=("4.88 KiB free; nothing was written",))
    assert "GiB" not in err


def test_callback_grows_width_and_depth_in_one_step_and_the_same_script_resumes(tmp_path, capsys):
    def callback():
        return GrowthCallback(at_step=2, factor=2, n_layer=4, depth_strategy="identity")

    full = trainer_for(gpt2(), tmp_path / "full", [callback()], save_strategy="steps", save_steps=3)
    full.train()
    model = full.model
    assert (model.config.n_embd, model.config.n_layer, len(model.transformer.h)) == (32, 4, 4)
    assert [a.attn.layer_idx for a in model.transformer.h] == [0, 1, 2, 3]
    opt = full.optimizer.optimizer
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    steps = {n: float(opt.state[p]["step"]) for n, p in model.named_parameters()}
    assert steps["transformer.h.1.attn.c_proj.weight"] == 4  # identity's zeroed outputs: fresh at step 2
    assert steps["transformer.h.1.attn.c_attn.weight"] == 6  # their inputs: copied moments and step
    assert [(r["growth_strategy"], r["step"]) for r in growths(full)] == [("exact_copy", 2), ("identity", 2)]
    assert "growkern.deepen_" in capsys.readouterr().out

    ckpt = tmp_path / "full" / "checkpoint-3"  # the grown model, from the first run's script
    small, cb = gpt2(), callback()
    resumed = trainer_for(small, tmp_path / "resumed", [cb])
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert (small.config.n_embd, small.config.n_layer) == (32, 4) and cb.grown_by == "GrowthCallback"
    want, got = logged(full, "loss"), logged(resumed, "loss")
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([want[s] for s in (4, 5, 6)], rel=1e-5)


def test_callback_grows_depth_alone_mid_run(tmp_path):
    model = llama()
    trainer = trainer_for(model, tmp_path, [GrowthCallback(at_step=3, n_layer=2, depth_strategy="interleave")])
    trainer.train()
    assert model.config.num_hidden_layers == 2 and trainer.state.global_step == 6
    assert_moments_fit(trainer, steps=6)  # interleave copies every moment with its step
    (entry,) = growths(trainer)
    assert (entry["growth_n_layer_before"], entry["growth_n_layer_after"]) == (1, 2)
