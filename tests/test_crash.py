"""Crash safety: SIGKILL a real `growkern train` process at random moments, mostly
while it saves. Every kill leaves a checkpoint that loads and verifies, the next run
cleans up what the killed ones left, and the run ends bit-identical to one that was
never interrupted (weights, optimizer state, metrics without duplicate steps)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from growkern.train import checkpoint as C
from growkern import cli

from test_train import log_records

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared/data/tinystories"
STEPS, KILLS, SEED = 24, 3, 1234
ARGS = ["--data", REAL, "--steps", STEPS, "--warmup", 3, "--vocab-size", 512, "--batch-size", 4,
        "--block-size", 32, "--eval-every", 0, "--eval-batches", 1, "--no-progress", "--threads", 1]
TIMEOUT = 240  # seconds, for any one process: generous for a loaded 2-core machine


def argv(*a):
    return [str(x) for x in a]


def staging(d: Path):
    """What interrupted writes leave: `.NAME.tmp-*` / `.NAME.old-*`, anywhere under d."""
    return sorted(str(p.relative_to(d)) for p in d.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def same_state(a: C.Checkpoint, b: C.Checkpoint):
    assert a.step == b.step
    for (n, p), (m, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert n == m and torch.equal(p, q), n
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    assert a.scheduler.state_dict() == b.scheduler.state_dict() and a.data == b.data


# Each run is a fresh `python -m growkern ...` process, started ahead so that its
# imports (torch, and torch._dynamo, which the first optimizer pulls in: some 5 s of
# one core) overlap the other runs; it waits for its arguments on stdin, then runs the
# package's __main__ as -m does.
LAUNCH = """import json, runpy, sys
import torch._dynamo, growkern.cli
line = sys.stdin.readline()
if not line:
    sys.exit(0)
sys.argv = ["growkern", *json.loads(line)]
runpy.run_module("growkern", run_name="__main__", alter_sys=True)
"""


@pytest.mark.skipif(not (REAL / "train.txt").is_file() or not (REAL / "valid.txt").is_file(),
                    reason=f"TinyStories sample not found at {REAL}")
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_saves_then_resume_is_exact(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GROWKERN_CACHE", str(tmp_path / "cache"))  # shared with the subprocesses
    monkeypatch.delenv("GROWKERN_DATA", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run_dir, rng = tmp_path / "run", random.Random(SEED)
    saved = False  # a save has completed: from then on a checkpoint must always be there
    history = []   # per kill: (delay, checkpoint step after it, leftovers after it)

    def command(save_every=1):
        if (run_dir / "ckpt" / C.META).is_file():
            a = ["train", "--resume", run_dir, "--data", REAL, "--no-progress", "--threads", 1]
        else:
            a = ["train", "--out", run_dir, *ARGS]
        return argv(*a, *(["--save-every", save_every] if save_every else []))

    def saving(pid):  # process pid is staging a save right now
        nonlocal saved
        saved = saved or (run_dir / "ckpt" / C.META).is_file()
        return run_dir.is_dir() and any(n.startswith(f".ckpt.tmp-{pid}-") for n in os.listdir(run_dir))

    def go(i, args):
        try:
            procs[i].stdin.write((json.dumps(args) + "\n").encode())
            procs[i].stdin.close()
        except BrokenPipeError:
            pytest.fail(f"run {i} died before it was given its arguments:\n{output(i)}")
        return procs[i]

    def output(i):
        return (tmp_path / f"run{i}.log").read_text(errors="replace")

    logs = [open(tmp_path / f"run{i}.log", "wb") for i in range(KILLS + 1)]
    procs = [subprocess.Popen([sys.executable, "-c", LAUNCH], stdin=subprocess.PIPE, stdout=f,
                              stderr=subprocess.STDOUT, cwd=tmp_path) for f in logs]
    try:
        for kill in range(KILLS):
            proc = go(kill, command())
            deadline = time.monotonic() + TIMEOUT
            while not saving(proc.pid) and proc.poll() is None:
                assert time.monotonic() < deadline, f"run {kill} never started saving:\n{output(kill)}"
                time.sleep(0.002)
            # the first kill lands right in the save it saw start, the others anywhere
            # within a few steps (saves take most of a step's time)
            delay = 0.0 if kill == 0 else rng.uniform(0, 0.15)
            time.sleep(delay)
            finished = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait(timeout=TIMEOUT)
            assert rc == -signal.SIGKILL or (finished and rc == 0), f"rc {rc}:\n{output(kill)}"
            left = staging(run_dir)
            # (a) the checkpoint is intact after every kill; absent only while no save completed
            if (run_dir / "ckpt").exists():
                copy = tmp_path / f"check{kill}"  # a copy: load's cleanup must leave run_dir alone
                shutil.copytree(run_dir / "ckpt", copy)
                step = C.load(copy, verify=True).step
                shutil.rmtree(copy)
                assert 1 <= step <= STEPS and step >= max([h[1] for h in history] + [0])
                saved = True
            else:
                assert not saved, f"kill {kill}: the checkpoint is gone after a save completed"
                step = 0
            history.append((round(delay, 3), step, left))
            if finished:
                break

        # the next run resumes (or starts) and goes to the end; meanwhile, on the other
        # core, the uninterrupted run in-process (the first run tokenized the data for it)
        proc = go(KILLS, command(save_every=0))
        assert cli.main(argv("train", "--out", tmp_path / "ref", *ARGS)) == 0
        capsys.readouterr()
        assert proc.wait(timeout=TIMEOUT) == 0, output(KILLS)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=TIMEOUT)
        for f in logs:
            f.close()
    # (b) nothing of the killed runs is left behind
    assert staging(run_dir) == [], history
    # (c) bit-identical to the uninterrupted run, metrics included, each step once
    same_state(C.load(run_dir), C.load(tmp_path / "ref"))
    assert [r["step"] for r in log_records(run_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert log_records(run_dir / "metrics.jsonl") == log_records(tmp_path / "ref" / "metrics.jsonl")
    print(f"kills (delay s, checkpoint step, leftovers): {history}")
