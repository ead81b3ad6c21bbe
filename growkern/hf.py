"""Hugging Face transformers integration.

- GrowthCallback grows the model, the optimizer state and the LR schedule in place
  during `Trainer.train()`, at the end of one global step; training then goes on. A
  run resumed from a checkpoint saved after the growth resumes with the same script:
  the callback grows the fresh model to the checkpoint's shapes before the Trainer loads
  it. A growth is recorded in trainer_state.json, by the callback or by `growkern grow`,
  and the callback never grows a model twice.
- grow_saved grows a model directory (save_pretrained) or a Trainer checkpoint
  (`checkpoint-N/`, with optimizer.pt), for `growkern grow`: every file it reads is
  checked first (a truncated or corrupt one is a ValueError naming it), and the new
  directory is written whole or not at all.

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
from .growth.adapter import adapter_for
from .growth.checks import new_state_bytes, state_bytes
from .growth.deepen import deepen_, deepened_shapes, find_layers
from .growth.depth import DEPTH_STRATEGIES, plan_depth
from .growth.plan import plan_growth
from .growth.strategies import make_strategy
from .growth.widen import widen_
from .growth.wrappers import unwrap_scheduler
from .train.checkpoint import _write_torch, staged_directory

logger = logging.get_logger(__name__)

SCHEDULES = ("continue", "rewarm")
# who grew a model, as trainer_state.json records it (GrowthCallback attributes "grown_by",
# log_history entries "growth_by")
GROWN_BY_CALLBACK, GROWN_BY_CLI, GROWN_BY_LOAD = "GrowthCallback", "growkern grow", "loading a grown checkpoint"


# --- the callback ---------------------------------------------------------------------


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value >= high):
        allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
        raise ValueError(f"GrowthCallback: {name} must be {allowed}, got {value!r}")


def _validate(at_step, targets, strategy, seed, schedule, rewarm_steps, strategy_options, depth=None):
    """Everything that can be checked without the model, so that a bad argument fails
    when the callback is made, not after `at_step` steps of training."""
    _check_int("at_step", at_step, 1)
    if all(v is None for v in targets.values()) and depth is None:
        raise ValueError("GrowthCallback: give a growth target: factor= (e.g. 2) and/or d_model=, d_ff=, n_head= "
                         "(width), n_layer= (depth)")
    if depth is not None:
        _check_int("n_layer", depth["n_layer"], 2)
        if depth["strategy"] not in DEPTH_STRATEGIES:
            raise ValueError(f"GrowthCallback: depth_strategy must be one of {', '.join(DEPTH_STRATEGIES)}, "
                             f"got {depth['strategy']!r}")
        positions = depth["positions"]
        if positions is not None and not (isinstance(positions, (list, tuple)) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in positions)):
            raise ValueError(f"GrowthCallback: positions must be a list of block indices, got {positions!r}")
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
    nn.Parameter objects, now wider. Arguments as growkern.widen_; with n_layer= (and
    depth_strategy=, positions=, as growkern.deepen_'s n_layer, strategy, positions) it
    also grows in depth, after the width and in the same step, and the new blocks'
    parameters join the Trainer's optimizer. n_layer alone grows depth only.

    It grows once. The step it grew at goes into trainer_state.json (the callback is
    an ExportableState), and a run resumed from a checkpoint at or past `at_step`
    holds the grown model already, so it is not grown again. The growth report is
    printed and appended to `state.log_history` (keys growth_*).

    Resuming past the growth needs no other script: Trainer.train(resume_from_checkpoint=)
    loads the checkpoint's weights into the model it was given before any callback
    event, so the callback hooks that load (on_init_end) and, when the checkpoint holds
    the shapes this callback's growth makes, grows the fresh model the same way first;
    the Trainer then builds the optimizer over it and loads the grown moments. A
    checkpoint grown otherwise stops with a ValueError saying to build the model from
    the checkpoint's config.json (AutoModelForCausalLM.from_pretrained(checkpoint)).

    It never grows a model twice: not when the checkpoint records the growth (this
    callback's, or `growkern grow`'s, which marks every GrowthCallback of the checkpoint
    as grown), nor a model that already has the explicit target widths; it says so in
    the log instead.

    Single-process and DDP runs (torchrun): under DDP every rank grows its replica the
    same way and widen_ rebuilds the DDP wrapper's reducer for the new parameters. FSDP
    and DeepSpeed Trainer runs are refused: their engines keep shards and buffers sized
    for the parameters they were set up with.
    """

    def __init__(self, at_step: int, factor=None, d_model=None, d_ff=None, n_head=None,
                 strategy: str = "exact_copy", seed: int = 0, schedule: str = "continue",
                 rewarm_steps: int | None = None, n_layer: int | None = None, depth_strategy: str = "identity",
                 positions=None, **strategy_options):
        targets = dict(factor=factor, d_model=d_model, d_ff=d_ff, n_head=n_head)
        depth = None if n_layer is None else dict(
            n_layer=n_layer, strategy=depth_strategy, positions=None if positions is None else list(positions))
        _validate(at_step, targets, strategy, seed, schedule, rewarm_steps, strategy_options, depth)
        self.at_step = at_step
        self.targets = {k: v for k, v in targets.items() if v is not None}
        self.depth = depth  # deepen_'s n_layer, strategy, positions; after the width growth, if any
        self.strategy, self.seed, self.schedule, self.rewarm_steps = strategy, seed, schedule, rewarm_steps
        self.strategy_options = dict(strategy_options)
        # the global step the growth happened at, and by whom (GROWN_BY_*): this callback,
        # `growkern grow` (recorded in the checkpoint), or loading a grown checkpoint
        self.grown_at: int | None = None
        self.grown_by: str | None = None
        self.report = None  # the GrowthReport, in the process that grew (the depth one: depth_report)
        self.depth_report = None
        self.skipped_because: str | None = None  # why this run does not grow (the widths are the targets)
        self._load_hook = None  # on the model from on_init_end to on_train_begin
        self._grown_on_load = False

    def __repr__(self) -> str:
        options = {**self.targets, "strategy": self.strategy, **self.strategy_options}
        if self.depth is not None:
            options = {**(options if self.targets else {}), "n_layer": self.depth["n_layer"],
                       "depth_strategy": self.depth["strategy"]}
        return f"GrowthCallback(at_step={self.at_step}, {', '.join(f'{k}={v!r}' for k, v in options.items())})"

    def state(self) -> dict:
        # args rebuild the callback (Trainer's restore_callback_states_from_checkpoint)
        depth = {} if self.depth is None else {"n_layer": self.depth["n_layer"], "depth_strategy": self.depth["strategy"],
                                               "positions": self.depth["positions"]}
        return {"args": {"at_step": self.at_step, **self.targets, "strategy": self.strategy, "seed": self.seed,
                         "schedule": self.schedule, "rewarm_steps": self.rewarm_steps, **depth,
                         **self.strategy_options},
                "attributes": {"grown_at": self.grown_at, "grown_by": self.grown_by}}

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # the first thing Trainer.train(resume_from_checkpoint=) does is load the checkpoint's
        # weights into this model, before any other event: the hook sees them first
        if model is not None and self._load_hook is None:
            self._load_hook = model.register_load_state_dict_pre_hook(self._grow_before_load)

    def _grow_before_load(self, model, state_dict, prefix, *_):
        """A checkpoint saved after this callback's growth loads into the fresh model given
        to the Trainer once the model is grown the same way (without optimizer: the
        Trainer builds it afterwards, over the grown parameters, and loads the grown
        moments). Anything else that does not fit is a ValueError saying what to do."""
        if prefix:  # the root module's load only: state_dict holds every parameter
            return
        params = dict(model.named_parameters())
        plan, grown = self._grown_shapes(model) if self.grown_at is None else (None, None)
        known = set(params) | set(grown or ())
        saved = {n: tuple(t.shape) for n, t in state_dict.items() if n in known and torch.is_tensor(t)}
        differ = [n for n, shape in saved.items() if n not in params or shape != tuple(params[n].shape)]
        if not differ:
            return
        if grown is not None and all(grown.get(n) == shape for n, shape in saved.items()):
            before = (adapter_for(model).shape(model).widths(), len(find_layers(model, adapter_for(model))[1]))
            self._grow(model, plan)
            after = (adapter_for(model).shape(model).widths(), len(find_layers(model, adapter_for(model))[1]))
            self._grown_on_load = True
            logger.warning(f"{self!r}: the checkpoint being loaded holds the grown model "
                           f"({_dims({**before[0], 'n_layer': before[1]}, {**after[0], 'n_layer': after[1]})}); "
                           f"grew the model given to the Trainer the same way before loading it")
            return
        name = differ[0]
        here = list(params[name].shape) if name in params else "absent"
        raise ValueError(
            f"{self!r}: the checkpoint being loaded does not fit this {type(model).__name__}: {name} is "
            f"{list(saved[name])} in the checkpoint, {here} in the model"
            + (f" (and {list(grown[name])} after this callback's growth)" if grown and name in grown else "")
            + ". Build the model from the checkpoint you resume, whose config.json has its widths: "
              "model = AutoModelForCausalLM.from_pretrained(checkpoint), then "
              "Trainer(model=model, ...).train(resume_from_checkpoint=checkpoint)")

    def _grown_shapes(self, model):
        """(width plan or None, parameter name -> shape after this callback's growth), or
        (None, None) when it cannot grow this model."""
        try:
            plan = None
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            if self.targets:
                plan = plan_growth(model, **self.targets, strategy=self.strategy, seed=self.seed,
                                   **self.strategy_options)
                shapes = {n: tuple(tp.stored(tp.new_shape)) for n, tp in plan.tensors.items()}
            if self.depth is not None:
                path, layers = find_layers(model, adapter_for(model))
                shapes = deepened_shapes(shapes, path, plan_depth(len(layers), **self.depth, seed=self.seed))
            return plan, shapes
        except (TypeError, ValueError):
            return None, None

    def _grow(self, model, plan=None, optimizer=None, lr_scheduler=None):
        """This callback's growth: width (widen_), then depth (deepen_), as it was set up.
        Returns their GrowthReports (None for a growth not asked for)."""
        widened = bool(self.targets)
        report = depth_report = None
        if widened:
            kw = dict(plan=plan) if plan is not None else dict(**self.targets, strategy=self.strategy,
                                                                seed=self.seed, **self.strategy_options)
            report = widen_(model, optimizer, lr_scheduler, schedule=self.schedule if optimizer else None,
                            rewarm_steps=self.rewarm_steps if optimizer else None, **kw)
        if self.depth is not None:
            last = not widened and optimizer is not None
            depth_report = deepen_(model, optimizer, lr_scheduler, **self.depth, seed=self.seed,
                                   schedule=self.schedule if last else "continue",
                                   rewarm_steps=self.rewarm_steps if last else None)
        return report, depth_report

    def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        if self._load_hook is not None:  # the checkpoint is loaded: later loads are none of its business
            self._load_hook.remove()
            self._load_hook = None
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
        record = self._recorded_growth(state, name)
        if record is not None:
            self.grown_at, self.grown_by = record
            say = logger.info if self.grown_by == GROWN_BY_CALLBACK else logger.warning
            say(f"{self!r}: the checkpoint records the growth ({self.grown_by} at step {self.grown_at}); "
                f"not growing again")
        elif self._grown_on_load:
            self.grown_at, self.grown_by = state.global_step, GROWN_BY_LOAD
        elif state.global_step >= self.at_step:
            logger.warning(f"{self!r}: resuming at step {state.global_step} from a checkpoint with no record "
                           f"of this growth; not growing")
        elif not isinstance(state.stateful_callbacks[name], list):
            # not with several GrowthCallbacks: an earlier one changes the model this one sees
            self.skipped_because = self._at_targets(model)
            if self.skipped_because:
                logger.warning(f"{self!r}: {self.skipped_because}; not growing")
            else:
                self._check_plan(model)

    def _check_plan(self, model):
        """Plan the growth now, so that targets this model cannot take fail before training does."""
        try:
            if self.targets:
                plan_growth(model, **self.targets, strategy=self.strategy, seed=self.seed, **self.strategy_options)
            if self.depth is not None:
                plan_depth(len(find_layers(model, adapter_for(model))[1]), **self.depth, seed=self.seed)
        except (TypeError, ValueError) as e:
            raise type(e)(f"GrowthCallback(at_step={self.at_step}) cannot grow this {type(model).__name__}: "
                          f"{e}") from None

    def _recorded_growth(self, state, name) -> tuple[int, str] | None:
        """(step, who) of the growth the resumed checkpoint records for this callback: its
        own entry in stateful_callbacks (grown by it, or marked by `growkern grow`), or a
        growth of `growkern grow` in log_history (a checkpoint saved without this callback)."""
        saved = state.stateful_callbacks.get(name)
        for entry in saved if isinstance(saved, list) else [saved]:
            if isinstance(entry, dict) and entry.get("args", {}).get("at_step") == self.at_step:
                attributes = entry.get("attributes") or {}
                if attributes.get("grown_at") is not None:
                    return attributes["grown_at"], attributes.get("grown_by") or GROWN_BY_CALLBACK
        for record in reversed(state.log_history or []):
            if isinstance(record, dict) and record.get("growth_by") == GROWN_BY_CLI:
                return record.get("step", state.global_step), GROWN_BY_CLI
        return None

    def _at_targets(self, model) -> str | None:
        """Why the model needs no growth, when it has every width given as a target
        already (a factor always grows: no width is its target)."""
        if "factor" in self.targets or model is None:
            return None
        try:
            adapter = adapter_for(model)
            widths = adapter.shape(model).widths()
            if self.depth is not None:
                widths["n_layer"] = len(find_layers(model, adapter)[1])
        except (TypeError, ValueError):
            return None  # _check_plan says what is wrong with this model
        targets = {**self.targets, **({"n_layer": self.depth["n_layer"]} if self.depth else {})}
        if all(widths[k] == v for k, v in targets.items()):
            return f"the model has the target widths already ({', '.join(f'{k} {v}' for k, v in targets.items())})"
        return None

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.grown_at is not None or self.skipped_because or state.global_step != self.at_step:
            return
        # model, optimizer and lr_scheduler are the objects Trainer steps: the model
        # unwrapped, accelerate's AcceleratedOptimizer around the torch optimizer, and
        # the scheduler driving that wrapper; widen_ unwraps what it needs.
        self.report, self.depth_report = self._grow(model, optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.grown_at, self.grown_by = state.global_step, GROWN_BY_CALLBACK
        for report in (self.report, self.depth_report):
            if report is not None:
                state.log_history.append(_log_entry(report, state.epoch, state.global_step))
                print(f"step {state.global_step}: {report}")


def _dims(before: dict, after: dict) -> str:
    return ", ".join(f"{k} {before[k]} -> {after[k]}" for k in before if before[k] != after[k])


def _log_entry(report, epoch, step) -> dict:
    """The report as a Trainer log record (the keys Trainer.log adds: epoch, step)."""
    entry = {"growth_strategy": report.strategy, "growth_seconds": report.seconds,
             "growth_params_before": report.params_before, "growth_params_after": report.params_after}
    for k in report.dims_before:
        entry[f"growth_{k}_before"] = report.dims_before[k]
        entry[f"growth_{k}_after"] = report.dims_after[k]
    return {**entry, "epoch": epoch, "step": step}


# --- saved models and Trainer checkpoints -----------------------------------------------

# the weight files of save_pretrained: save_pretrained writes the grown ones, the old never go along
WEIGHTS = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
OPTIMIZER, SCHEDULER, TRAINER_STATE = "optimizer.pt", "scheduler.pt", "trainer_state.json"


def load_weights_only(path: Path, map_location="cpu"):
    """torch.load that refuses files which need pickle (they can run any code); a
    truncated or corrupt file is a ValueError naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises what its zip reader and unpickler raise
        unsafe = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), None)
        if unsafe:
            raise ValueError(f"{path} does not load with torch.load(weights_only=True), and growkern loads "
                             f"nothing else (a pickle can run arbitrary code): {unsafe}") from None
        raise ValueError(f"{path} cannot be read (truncated or corrupt?): {type(e).__name__}: "
                         f"{_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _read_json(path: Path, what: str = "an object") -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, not {what}")
    return data


def check_readable(src: Path) -> None:
    """Every file of model directory or Trainer checkpoint `src` that growkern reads or
    rewrites parses: config.json, the weights (safetensors headers cover their files;
    shard indexes name shards that exist), optimizer.pt and scheduler.pt (torch.load,
    weights only), trainer_state.json. ValueError naming the first that does not,
    before anything is loaded or written. (A .bin weight file is read by the loader,
    weights only, and named by load_model when it fails.)"""
    _read_json(src / "config.json", "a model config")
    for f in sorted(src.iterdir()):
        if not f.is_file() or not WEIGHTS.fullmatch(f.name):
            continue
        if f.name.endswith(".index.json"):
            shards = _read_json(f, "a shard index").get("weight_map")
            if not isinstance(shards, dict):
                raise ValueError(f"{f} has no weight_map (a shard index maps parameter names to files)")
            missing = sorted({str(x) for x in shards.values()} - {p.name for p in src.iterdir()})
            if missing:
                raise ValueError(f"{f} names shard(s) {', '.join(missing)}, which {src} does not have")
        elif f.suffix == ".safetensors":
            from safetensors import safe_open  # a dependency of growkern and of transformers
            try:
                with safe_open(str(f), "pt") as handle:
                    handle.keys()
            except Exception as e:  # SafetensorError: header length, JSON, data not covering the file
                raise ValueError(f"{f} is not a readable safetensors file (truncated or corrupt?): "
                                 f"{_first_line(e)}") from None
    for name in (OPTIMIZER, SCHEDULER):
        if (src / name).is_file() and not isinstance(load_weights_only(src / name), dict):
            raise ValueError(f"{src / name} holds no state_dict (a dict)")
    if (src / TRAINER_STATE).is_file():
        state = _read_json(src / TRAINER_STATE, "a TrainerState")
        if not isinstance(state.get("log_history", []), list) or \
                not isinstance(state.get("stateful_callbacks") or {}, dict):
            raise ValueError(f"{src / TRAINER_STATE} is not a TrainerState: log_history must be a list and "
                             f"stateful_callbacks an object")


def load_model(src: Path, device="cpu"):
    """AutoModelForCausalLM.from_pretrained(src) on `device`, its failures (a file that
    does not read, weights that do not fit the config or do not cover the model, a
    dtype it cannot train) a ValueError naming the directory."""
    try:
        model, info = AutoModelForCausalLM.from_pretrained(src, output_loading_info=True)
    except MemoryError:
        raise
    except Exception as e:  # the loaders raise OSError, SafetensorError, RuntimeError, KeyError, ...
        raise ValueError(f"{src}: transformers cannot load the model: {type(e).__name__}: {_first_line(e)}") \
            from None
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing:  # from_pretrained initializes them at random and goes on
        raise ValueError(f"{src}: the weight files lack {len(missing)} of the model's parameters "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); growkern grows "
                         f"trained weights, not freshly initialized ones (weights of another model, or damaged?)")
    if unexpected:  # from_pretrained drops them: config.json describes another model than the weights
        raise ValueError(f"{src}: the weight files hold {len(unexpected)} tensors the model built from config.json "
                         f"does not have ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}); "
                         f"config.json and the weights describe different models")
    bad = sorted({str(p.dtype) for p in model.parameters() if not p.is_floating_point()})
    if bad:
        raise ValueError(f"{src}: the model's weights load as {', '.join(bad)}; growkern grows floating-point "
                         f"weights (the files hold the wrong dtype?)")
    return model.to(device)


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


def record_growth(trainer_state: dict, report) -> dict:
    """trainer_state.json of a checkpoint grown by `growkern grow`: the growth in its
    log_history (as GrowthCallback logs one, with growth_by "growkern grow"), and every
    GrowthCallback entry that has not grown marked as grown at this step, so that
    resuming with the callback still in the script does not grow the model again."""
    state = json.loads(json.dumps(trainer_state))  # a copy
    step = state.get("global_step") or 0
    state.setdefault("log_history", []).append(
        {**_log_entry(report, state.get("epoch"), step), "growth_by": GROWN_BY_CLI})
    entries = (state.get("stateful_callbacks") or {}).get(GrowthCallback.__name__)
    for entry in entries if isinstance(entries, list) else [entries]:
        if isinstance(entry, dict):
            attributes = entry.setdefault("attributes", {})
            if isinstance(attributes, dict) and attributes.get("grown_at") is None:
                attributes.update(grown_at=step, grown_by=GROWN_BY_CLI)
    return state


# widen_'s own keywords; the rest of grow_saved's keywords are plan_growth's
WIDEN_KEYWORDS = ("schedule", "rewarm_steps", "backend")


def grow_saved(path, out, *, device="cpu", before_write=None, n_layer=None, depth_strategy="identity",
               positions=None, **widen_kwargs):
    """Grow the model directory or Trainer checkpoint `path` into the new directory
    `out`: the grown model (save_pretrained, safetensors) and, where `path` has one,
    the grown optimizer.pt; trainer_state.json with the growth recorded (record_growth);
    every other file copied unchanged (so a Trainer checkpoint keeps its LR schedule,
    scheduler.pt). Every file read is checked first (check_readable, load_model).
    `before_write(entry)` is called once the growth is planned, before the model
    changes or anything is written (it may raise to stop; `growkern grow` announces the
    growth and checks the disk): entry has dims_before, dims_after, params_before,
    params_after and bytes, about what `out` will hold. `out` is written whole or not at
    all; a full disk is a one-line WriteError. Returns the GrowthReport, with the step-0
    preservation measured on random tokens (probe_tokens). With n_layer (depth_strategy,
    positions) the model also grows in depth with deepen_, after the width when widths
    are given too (then the width's report is returned; both are recorded); n_layer
    alone grows depth only and returns deepen_'s report."""
    src, out = Path(path), Path(out)
    check_out(src, out)
    has_optimizer = (src / OPTIMIZER).is_file()
    rest = _other_files(src, trainer_checkpoint=has_optimizer or (src / TRAINER_STATE).is_file())
    check_readable(src)
    trainer_state = _read_json(src / TRAINER_STATE) if (src / TRAINER_STATE).is_file() else None
    model = load_model(src, device)
    optimizer = load_trainer_optimizer(src, model, device) if has_optimizer else None
    widen_only = {k: widen_kwargs.pop(k) for k in WIDEN_KEYWORDS if k in widen_kwargs}
    widen = n_layer is None or any(widen_kwargs.get(k) is not None for k in ("factor", "d_model", "d_ff", "n_head"))
    plan = plan_growth(model, **widen_kwargs) if widen else None
    depth = None
    if n_layer is not None:
        layers = find_layers(model, adapter_for(model))[1]
        depth = plan_depth(len(layers), n_layer=n_layer, strategy=depth_strategy, positions=positions,
                           seed=widen_kwargs.get("seed", 0))
    if before_write is not None:
        n0 = sum(p.numel() for p in model.parameters())
        n1 = sum(math.prod(tp.new_shape) for tp in plan.tensors.values()) if plan else n0  # after the width
        size = new_state_bytes(model, optimizer, plan) if plan else state_bytes(model.parameters(), optimizer)
        before, after = (plan.old.widths(), plan.new.widths()) if plan else ({}, {})
        n2 = n1
        if depth is not None:  # each added block grows with the width as the others do
            n2 += round(sum(p.numel() for j in depth.added for p in layers[depth.sources[j]].parameters()) * n1 / n0)
            before, after = {**before, "n_layer": depth.old}, {**after, "n_layer": depth.new}
        before_write({"dims_before": before, "dims_after": after, "params_before": n0, "params_after": n2,
                      "bytes": round(size * n2 / n1) + sum(f.stat().st_size for f in rest)})
    reports = []
    if plan is not None:
        reports.append(widen_(model, optimizer, plan=plan, probe_batch=probe_tokens(model, plan.seed), **widen_only))
    if depth is not None:
        reports.append(deepen_(model, optimizer, n_layer=n_layer, strategy=depth_strategy, positions=positions,
                               seed=depth.seed, probe_batch=probe_tokens(model, depth.seed),
                               **({} if plan is not None else widen_only)))
    report = reports[0]
    if len(reports) == 2:  # the width's report, with the depth growth that followed it
        report.notes.append("then " + str(reports[1]).replace("\n", "\n  "))
    with staged_directory(out) as tmp:  # out is complete or absent, never half-written
        model.save_pretrained(tmp)
        if optimizer is not None:
            _write_torch(tmp / OPTIMIZER, optimizer.state_dict())
        for f in rest:
            if f.name == TRAINER_STATE and trainer_state is not None:
                recorded = trainer_state
                for r in reports:
                    recorded = record_growth(recorded, r)
                text = json.dumps(recorded, indent=2, sort_keys=True) + "\n"
                (tmp / TRAINER_STATE).write_text(text, encoding="utf-8")  # as TrainerState.save_to_json
            elif not (tmp / f.name).exists():  # save_pretrained wrote the grown config.json
                shutil.copy2(f, tmp / f.name)
    return report
