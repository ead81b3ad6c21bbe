"""Command line, run in-process: train -> grow -> continue -> eval -> sample, demo, errors."""
import json
import subprocess
import sys
from pathlib import Path

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
        refused(src, "--out", out, words="GiB are free; nothing was changed")
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
