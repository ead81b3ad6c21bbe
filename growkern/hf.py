"""Hugging Face transformers integration.

- GrowthCallback grows the model, the optimizer state and the LR schedule in place
  during `Trainer.train()`, at the end of one global step; training then goes on.
- grow_saved grows a model directory (save_pretrained) or a Trainer checkpoint
  (`checkpoint-N/`, with optimizer.pt), for `growkern grow`.

This module imports transformers; `import growkern` does not import it.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from .growth import schedule as schedule_mod
from .growth.plan import plan_growth
from .growth.strategies import make_strategy
from .growth.widen import widen_
from .growth.wrappers import unwrap_scheduler
from .train.checkpoint import staged_directory

logger = logging.get_logger(__name__)

SCHEDULES = ("continue", "rewarm")


# --- the callback ---------------------------------------------------------------------


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value >= high):
        allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
        raise ValueError(f"GrowthCallback: {name} must be {allowed}, got {value!r}")


def _validate(at_step, targets, strategy, seed, schedule, rewarm_steps, strategy_options):
    """Everything that can be checked without the model, so that a bad argument fails
    when the callback is made, not after `at_step` steps of training."""
    _check_int("at_step", at_step, 1)
    if all(v is None for v in targets.values()):
        raise ValueError("GrowthCallback: give a growth target: factor= (e.g. 2) and/or d_model=, d_ff=, n_head=")
    factor = targets["factor"]
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                               or not math.isfinite(factor) or factor < 1):
        raise ValueError(f"GrowthCallback: factor must be a finite number >= 1 (growth only), got {factor!r}")
    for name in ("d_model", "d_ff", "n_head"):
        if targets[name] is not None:
            _check_int(name, targets[name], 1)
    _check_int("seed", seed, 0, 2**32)
    if schedule not in SCHEDULES:
        raise ValueError(f"GrowthCallback: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "rewarm":
        _check_int("rewarm_steps", rewarm_steps, 1)
    elif rewarm_steps is not None:
        raise ValueError(f"GrowthCallback: rewarm_steps applies to schedule='rewarm' only, got "
                         f"rewarm_steps={rewarm_steps!r} with schedule={schedule!r}")
    if not isinstance(strategy, str):
        raise ValueError(f"GrowthCallback: strategy must be the name of a registered strategy, "
                         f"got {type(strategy).__name__}")
    make_strategy(strategy, **strategy_options)  # unknown strategy or option: ValueError naming what is allowed
    try:  # the arguments go into trainer_state.json with every checkpoint
        json.dumps(strategy_options)
    except TypeError as e:
        raise ValueError(f"GrowthCallback: strategy options must be JSON values (numbers, strings, bools): {e}") \
            from None


class GrowthCallback(TrainerCallback, ExportableState):
    """Grow the model in width at the end of global step `at_step`, with the Trainer's
    optimizer state and LR scheduler, in place: the Trainer keeps stepping the same
    nn.Parameter objects, now wider. Arguments as growkern.widen_.

    It grows once. The step it grew at goes into trainer_state.json (the callback is
    an ExportableState), and a run resumed from a checkpoint at or past `at_step`
    holds the grown model already, so it is not grown again. The growth report is
    printed and appended to `state.log_history` (keys growth_*).

    Single-process and DDP runs (torchrun): under DDP every rank grows its replica the
    same way and widen_ rebuilds the DDP wrapper's reducer for the new parameters. FSDP
    and DeepSpeed Trainer runs are refused: their engines keep shards and buffers sized
    for the parameters they were set up with.
    """

    def __init__(self, at_step: int, factor=None, d_model=None, d_ff=None, n_head=None,
                 strategy: str = "exact_copy", seed: int = 0, schedule: str = "continue",
                 rewarm_steps: int | None = None, **strategy_options):
        targets = dict(factor=factor, d_model=d_model, d_ff=d_ff, n_head=n_head)
        _validate(at_step, targets, strategy, seed, schedule, rewarm_steps, strategy_options)
        self.at_step = at_step
        self.targets = {k: v for k, v in targets.items() if v is not None}
        self.strategy, self.seed, self.schedule, self.rewarm_steps = strategy, seed, schedule, rewarm_steps
        self.strategy_options = dict(strategy_options)
        self.grown_at: int | None = None  # the global step this callback grew the model at
        self.report = None  # the GrowthReport, in the process that grew

    def state(self) -> dict:
        # args rebuild the callback (Trainer's restore_callback_states_from_checkpoint)
        return {"args": {"at_step": self.at_step, **self.targets, "strategy": self.strategy, "seed": self.seed,
                         "schedule": self.schedule, "rewarm_steps": self.rewarm_steps, **self.strategy_options},
                "attributes": {"grown_at": self.grown_at}}

    def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise ValueError("GrowthCallback supports single-process and DDP training, not FSDP or DeepSpeed "
                             "Trainer runs: their engines keep shards and buffers sized for the old parameters "
                             "(FSDP2: growkern train --fsdp, or widen_ of your own fully_shard model)")
        name = type(self).__name__
        # Trainer._save_checkpoint indexes stateful_callbacks[name] and raises KeyError when the
        # run resumed from a checkpoint saved without this callback
        state.stateful_callbacks.setdefault(name, self.state())
        if lr_scheduler is not None:
            # a resumed Trainer builds a fresh scheduler and loads scheduler.pt: a pending
            # re-warm ramp is in its state but needs its step() back
            schedule_mod.reattach(unwrap_scheduler(lr_scheduler))
        if self.grown_at is not None:
            return
        if state.global_step >= self.at_step:
            self._resumed_past(state, name)
        elif not isinstance(state.stateful_callbacks[name], list):
            # not with several GrowthCallbacks: an earlier one changes the model this one sees
            self._check_plan(model)

    def _check_plan(self, model):
        """Plan the growth now, so that targets this model cannot take fail before training does."""
        try:
            plan_growth(model, **self.targets, strategy=self.strategy, seed=self.seed, **self.strategy_options)
        except (TypeError, ValueError) as e:
            raise type(e)(f"GrowthCallback(at_step={self.at_step}) cannot grow this {type(model).__name__}: "
                          f"{e}") from None

    def _resumed_past(self, state, name):
        """Resumed at or past at_step: the checkpoint was saved after the growth (or the
        run never grew), and on_step_end will not see at_step again."""
        saved = state.stateful_callbacks.get(name)
        for entry in saved if isinstance(saved, list) else [saved]:
            if isinstance(entry, dict) and entry.get("args", {}).get("at_step") == self.at_step:
                self.grown_at = entry.get("attributes", {}).get("grown_at")
                if self.grown_at is not None:
                    return
        logger.warning(f"GrowthCallback(at_step={self.at_step}): resuming at step {state.global_step} from a "
                       f"checkpoint with no record of this growth; not growing (expected for a checkpoint "
                       f"grown with `growkern grow`)")

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.grown_at is not None or state.global_step != self.at_step:
            return
        # model, optimizer and lr_scheduler are the objects Trainer steps: the model
        # unwrapped, accelerate's AcceleratedOptimizer around the torch optimizer, and
        # the scheduler driving that wrapper; widen_ unwraps what it needs.
        self.report = widen_(model, optimizer, lr_scheduler, **self.targets, strategy=self.strategy,
                             seed=self.seed, schedule=self.schedule, rewarm_steps=self.rewarm_steps,
                             **self.strategy_options)
        self.grown_at = state.global_step
        state.log_history.append(_log_entry(self.report, state))
        print(f"step {state.global_step}: {self.report}")


def _log_entry(report, state) -> dict:
    """The report as a Trainer log record (the keys Trainer.log adds: epoch, step)."""
    entry = {"growth_strategy": report.strategy, "growth_seconds": report.seconds,
             "growth_params_before": report.params_before, "growth_params_after": report.params_after}
    for k in report.dims_before:
        entry[f"growth_{k}_before"] = report.dims_before[k]
        entry[f"growth_{k}_after"] = report.dims_after[k]
    return {**entry, "epoch": state.epoch, "step": state.global_step}


# --- saved models and Trainer checkpoints -----------------------------------------------

# the weight files of save_pretrained: save_pretrained writes the grown ones, the old never go along
WEIGHTS = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
OPTIMIZER, TRAINER_STATE = "optimizer.pt", "trainer_state.json"


def load_weights_only(path: Path, map_location="cpu"):
    """torch.load that refuses files which need pickle (they can run any code)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} does not load with torch.load(weights_only=True), and growkern loads "
                         f"nothing else (a pickle can run arbitrary code): {e}") from None


def trainer_param_groups(model) -> list[list[list]]:
    """The parameter groups a Trainer's optimizer can have, in the Trainer's order:
    its default [decay, no decay] (Trainer.create_optimizer), or one group of all
    parameters (an optimizer passed to the Trainer as AdamW(model.parameters()))."""
    # get_decay_parameter_names does not use the Trainer: call it as the installed
    # transformers defines it, so the grouping follows its version
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [[[p for n, p in named if n in decay], [p for n, p in named if n not in decay]],
            [[p for _, p in named]]]


def load_trainer_optimizer(path: Path, model, device="cpu") -> torch.optim.Optimizer:
    """The optimizer of Trainer checkpoint `path`, rebuilt over `model`'s parameters."""
    sd = load_weights_only(path / OPTIMIZER, device)
    if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list) or "state" not in sd:
        raise ValueError(f"{path / OPTIMIZER} is not an optimizer state_dict (no state and param_groups)")
    saved = [len(g["params"]) for g in sd["param_groups"]]
    groups = next((g for g in trainer_param_groups(model) if [len(x) for x in g] == saved), None)
    if groups is None:
        layouts = [[len(x) for x in g] for g in trainer_param_groups(model)]
        raise ValueError(f"{path / OPTIMIZER} has parameter groups of sizes {saved}; the model's parameters "
                         f"group as the Trainer's optimizer {layouts[0]} (decay, no decay) or {layouts[1]}")
    keys = set(sd["param_groups"][0])
    if "betas" in keys:  # AdamW, Adam, fused or not: the same state (exp_avg, exp_avg_sq, step)
        cls = torch.optim.AdamW
    elif "momentum" in keys:
        cls = torch.optim.SGD
    else:
        raise ValueError(f"{path / OPTIMIZER}: growkern rebuilds torch AdamW/Adam (Trainer optim adamw_torch, "
                         f"adamw_torch_fused) and SGD; these param groups have keys {sorted(keys)}")
    optimizer = cls([{"params": g} for g in groups], lr=sd["param_groups"][0]["lr"])
    optimizer.load_state_dict(sd)  # the saved hyperparameters (fused, betas, ...) come with it
    return optimizer


def check_out(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"--out {out} is {src} or inside it; write the grown copy elsewhere")
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"--out {out} exists; growkern grow writes a new directory and replaces nothing")


def _other_files(src: Path, trainer_checkpoint: bool) -> list[Path]:
    """The files of `src` that go to the grown copy unchanged (tokenizer, trainer_state.json,
    scheduler.pt, rng_state*.pth, training_args.bin, ...): all but weights and optimizer."""
    dirs = sorted(p.name for p in src.iterdir() if p.is_dir())
    if trainer_checkpoint and dirs:
        # DeepSpeed and FSDP keep model and optimizer shards in subdirectories growkern does not grow
        raise ValueError(f"{src} has subdirectories {dirs} (DeepSpeed or FSDP state?); growkern grows "
                         f"single-process Trainer checkpoints (model weights and optimizer.pt)")
    if dirs:
        print(f"note: subdirectories of {src} are not copied: {', '.join(dirs)}")
    return [p for p in sorted(src.iterdir())
            if p.is_file() and not WEIGHTS.fullmatch(p.name) and p.name != OPTIMIZER]


def probe_tokens(model, seed: int, batch: int = 2, length: int = 8) -> torch.Tensor:
    """Random token ids for the step-0 preservation check (no data comes with a model directory)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)
    return ids.to(next(model.parameters()).device)


def grow_saved(path, out, *, device="cpu", **widen_kwargs):
    """Grow the model directory or Trainer checkpoint `path` into the new directory
    `out`: the grown model (save_pretrained, safetensors) and, where `path` has one,
    the grown optimizer.pt; every other file copied unchanged (so a Trainer
    checkpoint keeps its LR schedule, scheduler.pt). Returns the GrowthReport, with the
    step-0 preservation measured on random tokens (probe_tokens)."""
    src, out = Path(path), Path(out)
    check_out(src, out)
    has_optimizer = (src / OPTIMIZER).is_file()
    rest = _other_files(src, trainer_checkpoint=has_optimizer or (src / TRAINER_STATE).is_file())
    model = AutoModelForCausalLM.from_pretrained(src).to(device)
    optimizer = load_trainer_optimizer(src, model, device) if has_optimizer else None
    report = widen_(model, optimizer, probe_batch=probe_tokens(model, widen_kwargs.get("seed", 0)), **widen_kwargs)
    with staged_directory(out) as tmp:  # out is complete or absent, never half-written
        model.save_pretrained(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        for f in rest:
            if not (tmp / f.name).exists():  # save_pretrained wrote the grown config.json
                shutil.copy2(f, tmp / f.name)
    return report
