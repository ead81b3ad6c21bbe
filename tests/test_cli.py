"""Command line, run in-process: train -> grow -> continue -> eval -> sample, demo, errors."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from growkern.train import checkpoint as C
from growkern import cli
from growkern.train import data as D

REAL = Path(__file__).resolve().parents[2] / "shared/data/tinystories"
needs_real = pytest.mark.skipif(not (REAL / "train.txt").is_file() or not (REAL / "valid.txt").is_file(),
                                reason=f"TinyStories sample not found at {REAL}")
# tiny preset, made smaller still so the whole chain takes seconds
FAST = ["--vocab-size", "512", "--batch-size", "4", "--block-size", "32", "--eval-batches", "1",
        "--no-progress"]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GROWKERN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GROWKERN_DATA", raising=False)

    def no_network(url, dest):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(D, "download", no_network)


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@needs_real
def test_grow_in_depth_then_width_and_depth_resumes(tmp_path, capsys):
    small, deep, both = tmp_path / "small", tmp_path / "deep", tmp_path / "both"
    assert run(capsys, "train", "--preset", "tiny", "--data", REAL, "--steps", 8, "--stop-at", 4,
               "--out", small, *FAST)[0] == 0
    rc, out, _ = run(capsys, "grow", small, "--n-layer", 3, "--positions", 1, "--out", deep)
    assert rc == 0 and "n_layer 2->3" in out and "blocks [0 1 1z]" in out
    grown = C.load(deep)
    assert grown.gpt_config.n_layer == 3 and grown.gpt_config.d_model == 64
    (entry,) = grown.growth_history
    assert entry["operation"] == "deepen_" and entry["preservation"]["kl_small_wide"] == 0
    rc, out, _ = run(capsys, "train", "--resume", deep)
    assert rc == 0 and "step 8:" in out and C.load(deep).step == 8

    rc, out, _ = run(capsys, "grow", small, "--factor", 2, "--n-layer", 4, "--depth-strategy", "stack",
                     "--out", both)
    assert rc == 0 and "d_model 64->128" in out and "n_layer 2->4" in out
    grown = C.load(both)
    assert (grown.gpt_config.n_layer, grown.gpt_config.d_model) == (4, 128)
    assert [e.get("operation", "widen_") for e in grown.growth_history] == ["widen_", "deepen_"]
    assert run(capsys, "train", "--resume", both)[0] == 0

    for argv, message in [(["--n-layer", 2], "greater than"), (["--positions", "0"], "go with --n-layer"),
                          (["--n-layer", 3, "--positions", "a"], "block indices"),
                          (["--factor", 2, "--n-layer", 5, "--depth-strategy", "upscale"], "even")]:
        rc, _, err = run(capsys, "grow", small, *argv, "--out", tmp_path / "bad")
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()


@needs_real
def test_train_grow_continue_eval_sample(tmp_path, capsys):
    small, wide = tmp_path / "small", tmp_path / "wide"
    rc, out, _ = run(capsys, "train", "--preset", "tiny", "--data", REAL, "--steps", 8, "--stop-at", 4,
                     "--eval-every", 2, "--out", small, *FAST)
    assert rc == 0 and "step 4:" in out
    assert C.load(small).step == 4 and C.load(small).train_config.steps == 8
    assert len((small / "metrics.jsonl").read_text().splitlines()) == 4

    rc, out, _ = run(capsys, "grow", small, "--factor", 2, "--strategy", "perturb", "--seed", 1,
                     "--option", "noise=0.05", "--schedule", "rewarm", "--rewarm-steps", 2, "--out", wide)
    assert rc == 0 and "step-0 preservation" in out and "d_model 64->128" in out
    grown = C.load(wide)
    assert grown.step == 4 and grown.gpt_config.d_model == 128
    (entry,) = grown.growth_history
    assert entry["strategy"].startswith("perturb(noise=0.05") and entry["step"] == 4
    assert entry["options"] == {"noise": 0.05} and entry["schedule"] == "rewarm"
    assert entry["preservation"]["kl_small_wide"] < 1e-8

    rc, out, _ = run(capsys, "train", "--resume", wide)  # continues in its own run directory
    assert rc == 0 and "resuming" in out and "step 8:" in out
    done = C.load(wide)
    assert done.step == 8 and len(done.growth_history) == 1
    assert [json.loads(line)["step"] for line in (wide / "metrics.jsonl").read_text().splitlines()] == [5, 6, 7, 8]

    rc, out, _ = run(capsys, "eval", wide, "--json")
    result = json.loads(out)
    assert rc == 0 and result["step"] == 8 and result["d_model"] == 128 and 0 < result["val_loss"] < 7

    rc, out, _ = run(capsys, "sample", wide / "ckpt", "--prompt", "Once upon a time", "--tokens", 10,
                     "--seed", 3)
    assert rc == 0 and out.startswith("Once upon a time")
    assert run(capsys, "sample", wide, "--tokens", 10, "--seed", 3)[1] == out  # seeded

    rc, out, _ = run(capsys, "train", "--resume", wide)
    assert rc == 0 and "nothing to do" in out
    rc, _, err = run(capsys, "train", "--resume", wide, "--lr", "0.1")
    assert rc == 2 and "cannot change ['lr'] when resuming" in err
    rc, _, err = run(capsys, "train", "--resume", wide, "--d-model", "256")
    assert rc == 2 and "grow" in err


@needs_real
def test_cli_resume_is_exact(tmp_path, capsys):
    def losses(run_dir):
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    common = ["--data", REAL, "--steps", 6, "--warmup", 2, "--eval-every", 0, *FAST]
    assert run(capsys, "train", "--out", tmp_path / "full", *common)[0] == 0
    assert run(capsys, "train", "--out", tmp_path / "cut", "--stop-at", 3, *common)[0] == 0
    assert run(capsys, "train", "--resume", tmp_path / "cut")[0] == 0
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


@needs_real
def test_grow_refuses_what_would_lose_or_waste_work(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "small", tmp_path / "wide"
    assert run(capsys, "train", "--data", REAL, "--steps", 2, "--out", src, *FAST)[0] == 0
    trained = (src / "ckpt" / C.META).read_bytes()

    def refused(*argv, words):
        rc, stdout, err = run(capsys, "grow", *argv)
        (error,) = [line for line in err.splitlines() if ": warning: " not in line]
        assert rc == 2 and error.startswith("growkern grow: error: ") and words in error, err
        assert "Traceback" not in stdout + err
        assert (src / "ckpt" / C.META).read_bytes() == trained

    refused(src, "--out", src, words="already holds a checkpoint (the one being grown)")
    refused(src / "ckpt", "--out", src, words="the one being grown")
    refused(src, "--factor", 1, "--out", out, words="factor 1.0 leaves every width unchanged")
    refused(src, "--d-model", 64, "--out", out, words="the targets leave every width unchanged")
    refused(src, "--factor", 1000, "--out", out, words="GiB")  # memory or disk, said in one line
    import growkern.growth.checks
    with monkeypatch.context() as m:
        m.setattr(growkern.growth.checks, "free_bytes", lambda dev: 1000)
        refused(src, "--out", out, words="MiB of new state on cpu, 1000 B are free; nothing was changed")
    assert not out.exists()

    rc, stdout, err = run(capsys, "grow", src, "--factor", 5, "--out", out)
    assert rc == 0 and "-> 320" in stdout and "checkpoint about" in stdout and "growkern grow: warning: this growth" in err
    refused(src, "--out", out, words=f"{out / 'ckpt'} already holds a checkpoint; give a new --out, or --force")
    rc, stdout, _ = run(capsys, "grow", src, "--out", out, "--force")
    assert rc == 0 and C.load(out).gpt_config.d_model == 128
    rc, _, _ = run(capsys, "grow", src, "--out", src, "--force")  # in place, when asked for
    assert rc == 0 and C.load(src).gpt_config.d_model == 128


@needs_real
def test_config_file_and_flag_precedence(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("[model]\nn_layer = 1\nd_model = 32\n[train]\nsteps = 2\nlr = 0.002\nbatch_size = 2\n")
    rc, _, _ = run(capsys, "train", "--config", toml, "--data", REAL, "--out", tmp_path / "r",
                   "--lr", "0.003", *FAST)
    ck = C.load(tmp_path / "r")
    assert rc == 0 and ck.gpt_config.n_layer == 1 and ck.gpt_config.d_model == 32
    assert ck.train_config.steps == 2 and ck.train_config.lr == 0.003 and ck.train_config.batch_size == 4
    rc, _, err = run(capsys, "train", "--data", REAL, "--out", tmp_path / "r", "--steps", 1, *FAST)
    assert rc == 2 and "already holds a checkpoint" in err
    rc, _, _ = run(capsys, "train", "--data", REAL, "--out", tmp_path / "r", "--steps", 1, "--force", *FAST)
    assert rc == 0 and C.load(tmp_path / "r").step == 1
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 1
    toml.write_text("[train]\nstepz = 2\n")
    rc, _, err = run(capsys, "train", "--config", toml, "--data", REAL, "--out", tmp_path / "r2")
    assert rc == 2 and "stepz" in err


@needs_real
def test_demo_smoke(tmp_path, capsys):
    threads = cli.torch.get_num_threads()
    rc, out, _ = run(capsys, "demo", "--data", REAL, "--steps", 4, "--out", tmp_path / "demo", "--threads", 1)
    assert cli.torch.get_num_threads() == threads
    assert rc == 0
    for text in ("step-0 preservation", "grown + continued", "wide from scratch", "small continued"):
        assert text in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert abs(summary["val_grown_step0"] - summary["val_small"]) < 1e-4
    assert C.load(tmp_path / "demo" / "wide").growth_history[0]["step"] == 2


def test_errors_and_help(tmp_path, capsys):
    rc, _, err = run(capsys, "eval", tmp_path / "missing")
    assert rc == 2 and "does not exist" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("train", "grow", "eval", "sample", "demo"):
        assert cmd in text
    with pytest.raises(SystemExit):
        cli.main(["grow", "x", "--out", "y", "--strategy", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "growkern", "grow", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--rewarm-steps" in r.stdout


def test_broken_extension_does_not_break_the_core(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_EXTENSIONS", [])
    monkeypatch.setattr(cli, "_EXTENSION_MODULES", (("json", "no_such_function"), ("growkern.nope", "f")))
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr()
    assert e.value.code == 0 and "demo" in out.out and "could not load json.no_such_function" in out.err


# --- full disks, damaged checkpoints, Ctrl-C: one line, nothing half-written ------------

def tree(path) -> dict:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(Path(path).rglob("*")) if f.is_file()}


def staging_leftovers(path) -> list:
    return sorted(str(p) for p in Path(path).rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def one_error_line(err, command):
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith(f"growkern {command}: error: "), err
    assert "Traceback" not in err


def disk_full(kind):
    """A writer that fails as a full disk makes it fail: an OSError naming the file, or
    torch.save's RuntimeError raised while the file's OSError is handled."""
    if kind == "OSError":
        def fail(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    else:
        def fail(path):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    return fail


@needs_real
@pytest.mark.parametrize("writer_error", ["OSError", "torch's RuntimeError"])
def test_full_disk_is_one_line_and_keeps_what_was_there(writer_error, tmp_path, capsys, monkeypatch):
    src = tmp_path / "run"
    assert run(capsys, "train", "--data", REAL, "--steps", 4, "--stop-at", 2, "--out", src, *FAST)[0] == 0
    before = tree(src / "ckpt")
    real, fail = C._write_torch, disk_full(writer_error)

    def full(path, obj):
        if path.name != "optimizer.pt":
            return real(path, obj)
        path.write_bytes(b"\0" * 10)  # what got down before the disk filled
        fail(path)

    monkeypatch.setattr(C, "_write_torch", full)
    for argv in (["train", "--resume", src], ["grow", src, "--out", tmp_path / "wide"],
                 ["train", "--data", REAL, "--steps", 2, "--out", tmp_path / "new", *FAST]):
        rc, _, err = run(capsys, *argv)
        one_error_line(err, argv[0])
        assert rc == 2 and "cannot write" in err and "no space left on device" in err and "nothing was written" in err
        if writer_error == "OSError":
            assert "ckpt (optimizer.pt): " in err
    assert tree(src / "ckpt") == before  # the previous checkpoint, as it was
    assert not (tmp_path / "wide").exists() and not (tmp_path / "new" / "ckpt").exists()
    assert staging_leftovers(tmp_path) == []


@needs_real
def test_train_checks_the_free_space_before_training(tmp_path, capsys, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=5 * 2**20 + 1000))
    new = tmp_path / "new"
    rc, out, err = run(capsys, "train", "--data", REAL, "--steps", 2, "--out", new, *FAST, "--d-model", 256)
    one_error_line(err, "train")
    assert rc == 2 and "5.00 MiB free; nothing was written" in err and "0.00 GiB" not in err
    assert not (new / "metrics.jsonl").exists()  # not a step trained


def dcp_checkpoint(path):
    """A distributed (DCP) checkpoint, as torchrun writes one, from one process."""
    from growkern import GPTConfig
    from growkern.train.loop import TrainConfig, build_optimizer, build_scheduler, init_model, make_batches, train
    tokens = np.random.default_rng(0).integers(0, 61, 5000).astype(np.uint16)
    tcfg = TrainConfig(steps=8, batch_size=4, block_size=16, lr=1e-2, warmup=2, progress=False, eval_every=0)
    model = init_model(GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, d_model=16), 0)
    opt = build_optimizer(model, tcfg)
    sched = build_scheduler(opt, tcfg)
    batches = make_batches(tokens, tcfg)
    train(model, opt, sched, batches, tcfg, end_step=3)
    C.save(path, model, opt, sched, step=3, train_config=tcfg, batches=batches, storage="dcp")
    return path


@pytest.fixture(scope="module")
def dcp_source(tmp_path_factory):
    return dcp_checkpoint(tmp_path_factory.mktemp("dcp") / "src")


def failing_dcp_write(fail):
    """A stand-in for write_dcp_lazily that starts a shard, then fails with what
    fail(shard) raises, wrapped in a CheckpointException as torch.distributed.checkpoint
    wraps a writer's failure."""
    from torch.distributed.checkpoint.api import CheckpointException

    def write(directory, specs, build):
        directory.mkdir(parents=True)
        shard = directory / "__0_0.distcp"
        shard.write_bytes(b"\0" * 10)
        try:
            fail(shard)
        except BaseException as e:
            with C.quiet_dcp():
                raise CheckpointException("CheckpointException ranks:dict_keys([0])", {0: (e, [])})
    return write


def test_dcp_grow_onto_a_full_disk(dcp_source, tmp_path, capsys, monkeypatch):
    """torch.distributed.checkpoint wraps a writer's failure in a CheckpointException (a
    BaseException); a full disk in it is the same one line."""
    src = tmp_path / "src"
    shutil.copytree(dcp_source, src)
    before = tree(src)
    monkeypatch.setattr(C, "write_dcp_lazily", failing_dcp_write(disk_full("torch's RuntimeError")))
    rc, _, err = run(capsys, "grow", src, "--out", tmp_path / "wide")
    one_error_line(err, "grow")
    assert rc == 2 and "cannot write" in err and "no space left on device" in err
    assert tree(src) == before and not (tmp_path / "wide").exists() and staging_leftovers(tmp_path) == []


def test_damaged_dcp_checkpoint_is_named_in_one_line(dcp_source, tmp_path, capsys):
    for damage in ("truncated shard", "corrupt metadata", "missing shard"):
        src = tmp_path / damage.replace(" ", "-")
        shutil.copytree(dcp_source, src)
        shard = next((src / "dcp").glob("*.distcp"))
        if damage == "truncated shard":
            shard.write_bytes(shard.read_bytes()[:-64])
        elif damage == "corrupt metadata":
            meta = src / "dcp" / ".metadata"
            meta.write_bytes(meta.read_bytes()[:40] + b"\xff" * 40 + meta.read_bytes()[80:])
        else:
            shard.unlink()
        before = tree(src)
        for argv in (["grow", src, "--out", tmp_path / "wide"], ["eval", src]):
            rc, _, err = run(capsys, *argv)
            one_error_line(err, argv[0])
            assert rc == 2 and ("dcp/" in err or "distcp" in err), (damage, err)
        assert tree(src) == before and not (tmp_path / "wide").exists()


def test_ctrl_c_is_one_line_and_exit_130(dcp_source, tmp_path, capsys, monkeypatch):
    """Interrupted while writing (inside torch.distributed.checkpoint, which wraps the
    KeyboardInterrupt in its CheckpointException): one line, 130, nothing written."""
    src = tmp_path / "src"
    shutil.copytree(dcp_source, src)
    before = tree(src)

    def interrupt(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "write_dcp_lazily", failing_dcp_write(interrupt))
    rc, out, err = run(capsys, "grow", src, "--out", tmp_path / "wide")
    assert rc == 130 and err.strip().splitlines() == [
        "growkern grow: interrupted; files being written were discarded, what was there before is kept"]
    assert "Traceback" not in out + err
    assert tree(src) == before and not (tmp_path / "wide").exists() and staging_leftovers(tmp_path) == []


def test_real_sigint_prints_no_traceback(dcp_source, tmp_path):
    """A real Ctrl-C (SIGINT) in a separate process, in the middle of `growkern grow`."""
    code = ("import os, signal, sys\n"
            "from growkern import cli\n"
            "from growkern.train import checkpoint as C\n"
            "def write(*args): os.kill(os.getpid(), signal.SIGINT)\n"
            "C.write_dcp_lazily = write\n"
            f"sys.exit(cli.main(['grow', {str(dcp_source)!r}, '--out', {str(tmp_path / 'wide')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("growkern grow: interrupted")
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1, r.stderr
    assert not (tmp_path / "wide").exists()


def test_grow_schedule_offers_restart(dcp_source, tmp_path, capsys):
    rc, out, err = run(capsys, "grow", dcp_source, "--schedule", "restart", "--out", tmp_path / "restarted")
    assert rc == 0, err
    ck = C.load(tmp_path / "restarted")
    assert ck.growth_history[-1]["schedule"] == "restart" and ck.step == 3
    assert ck.scheduler.last_epoch == 0 and ck.scheduler.state_dict()["_growkern_restart"]["steps_before"] == 3
    rc, _, _ = run(capsys, "grow", dcp_source, "--strategy", "szp", "--out", tmp_path / "szp")
    assert rc == 0 and C.load(tmp_path / "szp").growth_history[-1]["schedule"] == "restart"  # szp's own
    rc, _, _ = run(capsys, "grow", dcp_source, "--out", tmp_path / "continued")
    assert rc == 0 and C.load(tmp_path / "continued").scheduler.last_epoch == 3
    rc, _, err = run(capsys, "grow", dcp_source, "--rewarm-steps", 2, "--out", tmp_path / "x")
    assert rc == 2 and "--rewarm-steps goes with --schedule rewarm" in err
    with pytest.raises(SystemExit):
        cli.main(["grow", "--help"])
    assert "restart it from its step 0" in capsys.readouterr().out


def test_sample_help_says_what_each_option_does(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for words in ("Generate text with a checkpoint's model and tokenizer",
                  "--prompt TEXT the text the story starts with",
                  "--temperature TEMPERATURE divides the logits before sampling",
                  "--seed SEED seed of the sampling; sample i of --num uses seed + i"):
        assert words in text, words


def test_grow_deepens_a_distributed_checkpoint_offline(dcp_source, tmp_path, capsys):
    out = tmp_path / "deep"
    rc, stdout, _ = run(capsys, "grow", dcp_source, "--n-layer", 4, "--depth-strategy", "interleave", "--out", out)
    assert rc == 0 and "n_layer 2 -> 4" in stdout and "one tensor at a time" in stdout
    grown = C.load(out)
    assert grown.gpt_config.n_layer == 4 and grown.meta["storage"] == "dcp"
    assert grown.growth_history[-1]["operation"] == "deepen_"
    rc, _, err = run(capsys, "grow", dcp_source, "--factor", 2, "--n-layer", 4, "--out", tmp_path / "both")
    assert rc == 2 and "two `growkern grow` commands" in err and not (tmp_path / "both").exists()
