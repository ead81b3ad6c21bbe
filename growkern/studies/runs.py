"""Deterministic training runs that keep full-state checkpoints at chosen steps and
resume from the latest one: a base model's checkpoints are trained once and reused,
a run cut short picks up where it stopped, and a run asked for more steps extends
the one already there (the schedules used are constant after warmup and the data
order is fixed, so a shorter run is exactly a prefix of a longer one)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from ..train import checkpoint as ckpt_mod
from ..train import loop as train_mod
from .heldout import val_loss


def _existing(root: Path) -> dict[int, dict]:
    """step -> meta of the complete checkpoints under root (step-<N> directories)."""
    out = {}
    if not root.is_dir():
        return out
    for d in root.glob("step-*"):
        try:
            _, meta = ckpt_mod.read_meta(d)
        except (ckpt_mod.CheckpointError, FileNotFoundError):
            continue
        out[int(meta["step"])] = {"path": d, "curve": meta["extra"].get("curve", []),
                                  "kind": meta["extra"].get("kind", "kept")}
    return out


def existing_checkpoints(root) -> dict[int, list]:
    """step -> val-loss curve ([step, loss] pairs) of the complete checkpoints under root."""
    return {s: info["curve"] for s, info in _existing(Path(root)).items()}


def checkpointed_run(root, *, init: Callable, tokens, windows, save_steps, eval_every: int,
                     keep_every: int = 0, device="cpu", tokenizer=None,
                     log: Callable[[str], None] | None = None, log_every_s: float = 30.0,
                     counter: dict | None = None) -> dict[int, dict]:
    """Train until every step in save_steps has a checkpoint under `root`/step-<N>.

    init() -> (model, optimizer, scheduler, batches, train_config, start_step, curve) starts
    the run afresh; otherwise it resumes from the latest checkpoint below the first
    missing step. The val loss is evaluated every eval_every steps (absolute step
    numbers) and at each save step; each checkpoint stores the curve so far, a list of
    [step, val_loss]. keep_every > 0 adds resume checkpoints every that many steps
    (only the latest is kept). `log` gets a line at most every log_every_s seconds.
    Returns {step: {"path", "curve"}} for save_steps.
    `counter["steps"]` (if given) is increased by the optimizer steps trained."""
    root = Path(root)
    targets = sorted(set(int(s) for s in save_steps))
    have = _existing(root)
    need = [s for s in targets if s not in have]
    if need:
        starts = [s for s in have if s < need[0]]
        if starts:
            k = max(starts)
            ck = ckpt_mod.load(have[k]["path"], device=device)
            ck.restore_rng()
            model, opt, sched = ck.model, ck.optimizer, ck.scheduler
            tcfg, start, curve = ck.train_config, ck.step, [list(p) for p in have[k]["curve"]]
            batches = ck.batches(tokens)
            if log:
                log(f"resuming from the checkpoint at step {k}")
        else:
            model, opt, sched, batches, tcfg, start, curve = init()
        end = need[-1]
        save_set = set(need)
        last_log = [time.perf_counter()]

        def on_step(rec):
            step = rec["step"]
            if (eval_every and step % eval_every == 0) or step in save_set:
                loss = val_loss(model, windows)
                curve.append([step, loss])
                if log and time.perf_counter() - last_log[0] >= log_every_s and step != end:
                    log(f"  step {step}/{end}  val {loss:.4f}")
                    last_log[0] = time.perf_counter()
            kept = step in save_set
            if kept or (keep_every and step % keep_every == 0):
                ckpt_mod.save(root / f"step-{step}", model, opt, sched, step=step, train_config=tcfg,
                              batches=batches, tokenizer=tokenizer,
                              extra={"curve": curve, "kind": "kept" if kept else "resume"})
                for s, info in _existing(root).items():  # only the latest resume point stays
                    if info["kind"] == "resume" and s < step:
                        shutil.rmtree(info["path"], ignore_errors=True)
            if counter is not None:
                counter["steps"] = counter.get("steps", 0) + 1

        train_mod.train(model, opt, sched, batches, tcfg, start_step=start, end_step=end, on_step=on_step)
        have = _existing(root)
    return {s: {"path": have[s]["path"], "curve": have[s]["curve"]} for s in targets}


def fresh_start(gcfg, tcfg, tokens, windows, device, seed: int):
    """init() for checkpointed_run: a model initialised from seed at step 0."""
    model = train_mod.init_model(gcfg, seed=seed, device=device)
    opt = train_mod.build_optimizer(model, tcfg)
    sched = train_mod.build_scheduler(opt, tcfg)
    batches = train_mod.make_batches(tokens, tcfg)
    return model, opt, sched, batches, tcfg, 0, [[0, val_loss(model, windows)]]
