"""Grow a distributed (DCP) checkpoint offline, holding one tensor at a time.

(grow_dcp in width; deepen_dcp in depth, below.)

A checkpoint written by `torch.distributed.checkpoint` may not fit one process whole.
grow_dcp reads its metadata, builds the model and optimizer skeletons on the meta
device (no memory) to make the plan and move the muP learning rates and the schedule,
then writes the new checkpoint's dcp/ through a save planner that builds each new
tensor when the writer asks for it: read that one old tensor from the source, grow it
with the same primitive and maps widen_ uses (growkern.growth.apply.grow_tensor), hand it to
the writer, drop it. Peak memory: one old tensor and its new version, not the model.

The result is what `ckpt_mod.load` + widen_ + `save(storage="dcp")` would write, tensor
for tensor (tests/test_offline.py); what it cannot do without the whole model is the
step-0 preservation measurement on a probe batch (run `growkern eval` on the result).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..growth.adapter import adapter_for
from ..growth.apply import grow_tensor
from ..growth.checks import MOMENT_KEYS
from ..growth.deepen import _source_name, is_residual_output, new_block
from ..growth.depth import FRESH, ZERO_OUT, plan_depth
from ..growth.plan import plan_growth
from ..growth.schedule import SCHEDULES, apply_schedule, mup_lr_ratios
from ..kernels.backends import resolve_backend
from ..models.gpt import GPT, Block
from . import checkpoint as C
from .loop import build_optimizer, build_scheduler


def _tensor_index(path: Path, meta: dict, skeleton: dict, params: dict) -> dict:
    """DCP key -> (parameter name, role) for every tensor of the checkpoint: role None
    for a weight, a moment key, "step", or "buffer" for a persistent buffer."""
    names = [n for g in meta["param_names"] for n in g]
    index = {}
    for key in C.dcp_keys(path):
        kind, _, rest = key.partition("/")
        if kind == "model":
            index[key] = (rest, None if rest in params else "buffer")
        elif kind == "optim":
            i, _, role = rest.partition("/")
            index[key] = (names[int(i)], role)
    for i, roles in skeleton.get("tensor_keys", {}).items():
        for role in roles:
            if role not in MOMENT_KEYS + ("step",):
                raise C.CheckpointError(f"checkpoint {path}: optimizer state {role!r} of {names[i]} cannot be "
                                        f"grown; known: {', '.join(MOMENT_KEYS)}, step")
    return index


def _open_dcp(src, how: str):
    """(path, meta, GPTConfig, TrainConfig) of the DCP checkpoint `src`, its files checked;
    ValueError saying `how` to grow any other checkpoint."""
    path, meta = C.read_meta(src)
    if meta.get("storage") != "dcp":
        raise ValueError(f"{path} is not a distributed (DCP) checkpoint; grow it with {how}")
    C._check_files(path, meta, verify=True)
    gcfg, tcfg = C._configs(path, meta)
    return path, meta, gcfg, tcfg


def _write_dcp(out, config, optimizer, scheduler, path, meta, tcfg, state, entry, specs, build, skeleton):
    """The grown checkpoint at `out`: the source's step, data cursor, RNG and tokenizer, its
    growth history plus `entry`, and dcp/ written by the writer calling build(key)."""
    C.save(out, _Described(config), optimizer, scheduler, step=meta["step"], train_config=tcfg,
           data_state=state["data"], rng=state["rng"], tokenizer=meta.get("tokenizer"),
           tokenizer_file=path / C.TOKENIZER if (path / C.TOKENIZER).is_file() else None,
           growth_history=list(meta["growth_history"]) + [entry], storage="dcp",
           write_tensors=lambda d: C.write_dcp_lazily(d, specs, build), optimizer_skeleton=skeleton)


def grow_dcp(src, out, *, strategy: str = "exact_copy", seed: int = 0, schedule: str | None = None,
             rewarm_steps: int | None = None, backend: str = "auto", options: dict | None = None,
             before_write=None, **targets) -> dict:
    """Grow the DCP checkpoint `src` (a checkpoint directory or run directory) into a
    DCP checkpoint at `out`, one tensor at a time. `targets`: factor=, d_model=, d_ff=,
    n_head= as for plan_growth; `options`: strategy options; `before_write(entry)` is
    called once everything is validated, before anything is written (it may raise to
    stop). Returns the growth-history entry written into the new checkpoint (its
    "bytes": the size of the new tensors)."""
    t0 = time.perf_counter()
    path, meta, gcfg, tcfg = _open_dcp(src, "growkern.widen_ after checkpoint.load, or `growkern grow`")
    with torch.device("meta"):
        model = GPT(gcfg)
    plan = plan_growth(model, strategy=strategy, seed=seed, **targets, **(options or {}))
    if schedule is None:
        schedule = getattr(plan.strategy, "default_schedule", "continue")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "rewarm" and (isinstance(rewarm_steps, bool) or not isinstance(rewarm_steps, int)
                                 or rewarm_steps < 1):
        raise ValueError(f"schedule='rewarm' needs rewarm_steps, an int >= 1; got {rewarm_steps!r}")
    adapter = adapter_for(model)
    new_config = adapter.new_config(gcfg, plan.new)

    # the optimizer's groups and the scheduler, on meta parameters: their LRs and the schedule move
    skeleton = torch.load(path / C.OPTIMIZER, map_location="cpu", weights_only=True)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)  # sets the groups' LRs to its step 0: load them after
    optimizer.load_state_dict({"state": {}, "param_groups": skeleton["param_groups"]})
    state = C._load_state(path)
    C._load_scheduler(path, state["scheduler"], scheduler, tcfg, meta["step"])
    notes = apply_schedule(optimizer, scheduler, mup_lr_ratios(model, optimizer, gcfg, new_config),
                           new_config, schedule, rewarm_steps)

    params = dict(model.named_parameters())
    index = _tensor_index(path, meta, skeleton, params)
    widen_many, backend_name = resolve_backend(backend, torch.device("cpu"), batch=True)
    specs = {}
    for key, (name, role) in index.items():
        old = C.dcp_tensor_meta(path, key)
        if role in (None,) + MOMENT_KEYS:
            shape = plan.tensors[name].stored(plan.tensors[name].new_shape)
        else:
            shape = old.shape  # step counters; buffers (none of growkern.GPT's persist)
        specs[key] = torch.empty(shape, dtype=old.dtype, device="meta")

    def build(key):
        name, role = index[key]
        old = C.read_dcp_tensor(path, key)
        if role == "step":
            return torch.zeros_like(old) if plan.strategy.reset_step else old
        if role == "buffer":
            return old
        return grow_tensor(plan.tensors[name], old, role, plan.strategy, plan.seed, widen_many)

    new_skeleton = {"state": skeleton["state"], "tensor_keys": skeleton["tensor_keys"],
                    "param_groups": optimizer.state_dict()["param_groups"]}
    params_before = sum(p.numel() for p in params.values())
    params_after = sum(specs[f"model/{n}"].numel() for n in params)
    entry = {"strategy": plan.strategy.describe(), "backend": backend_name, "offline": True,
             "dims_before": plan.old.widths(), "dims_after": plan.new.widths(),
             "params_before": params_before, "params_after": params_after, "exact": plan.exact,
             "notes": notes + ["grown offline one tensor at a time (growkern.train.offline.grow_dcp); "
                               "step-0 preservation not measured"],
             "step": meta["step"], "source": str(path), "schedule": schedule, "rewarm_steps": rewarm_steps,
             "seed": seed, "targets": targets, "options": options or {},
             "bytes": sum(t.numel() * t.element_size() for t in specs.values())}
    if before_write is not None:
        before_write(entry)
    _write_dcp(out, new_config, optimizer, scheduler, path, meta, tcfg, state, entry, specs, build, new_skeleton)
    entry["seconds"] = time.perf_counter() - t0
    return entry


def deepen_dcp(src, out, *, n_layer=None, factor=None, strategy: str = "identity", positions=None, seed: int = 0,
               before_write=None) -> dict:
    """Grow the DCP checkpoint `src` in depth into a DCP checkpoint at `out`, one tensor at
    a time: what ckpt_mod.load + deepen_ + save(storage="dcp") write (tests/test_offline.py).
    Each tensor of the new checkpoint is its source block's (copied, zeroed, or for fresh
    blocks drawn as deepen_ draws them, one block at a time); optimizer state follows
    deepen_'s moment rule; the schedule continues. Returns the growth-history entry."""
    t0 = time.perf_counter()
    path, meta, gcfg, tcfg = _open_dcp(src, "growkern.deepen_ after checkpoint.load, or `growkern grow --n-layer`")
    plan = plan_depth(gcfg.n_layer, n_layer=n_layer, factor=factor, strategy=strategy, positions=positions,
                      seed=seed)
    new_cfg = gcfg.replace(n_layer=plan.new)
    with torch.device("meta"):
        model, new_model = GPT(gcfg), GPT(new_cfg)
    adapter = adapter_for(model)
    skeleton = torch.load(path / C.OPTIMIZER, map_location="cpu", weights_only=True)
    optimizer = build_optimizer(new_model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)  # sets the groups' LRs to its step 0: load them after
    for group, saved in zip(optimizer.param_groups, skeleton["param_groups"]):
        group.update({k: v for k, v in saved.items() if k not in ("params", "param_names")})
    state = C._load_state(path)
    C._load_scheduler(path, state["scheduler"], scheduler, tcfg, meta["step"])

    old_names = [n for g in meta["param_names"] for n in g]
    old_index = {n: i for i, n in enumerate(old_names)}
    new_names = [n for g in optimizer.param_groups for n in g["param_names"]]

    def block_of(name):
        head, _, rest = name.partition(".")
        index = rest.partition(".")[0]
        return int(index) if head == "blocks" and index.isdigit() else None

    def fresh_state(name):  # deepen_'s moment rule: zeroed or fresh tensors start with no state
        j = block_of(name)
        kind = plan.kinds[j] if j is not None else None
        return kind == FRESH or (kind == ZERO_OUT and is_residual_output(adapter, name))

    specs, sources = {}, {}  # new DCP key -> (source key or None, parameter name)
    stored = set(C.dcp_keys(path))
    for n in new_model.state_dict():
        key = f"model/{n}"
        src_name = _source_name(n, "blocks", plan)
        if f"model/{src_name}" not in stored:
            continue  # a tied alias (lm_head.weight) or a buffer the checkpoint does not keep
        old = C.dcp_tensor_meta(path, f"model/{src_name}")
        specs[key] = torch.empty(old.shape, dtype=old.dtype, device="meta")
        sources[key] = (f"model/{src_name}", n)
    tensor_keys, plain_state = {}, {}
    for i, n in enumerate(new_names):
        src_i = old_index[_source_name(n, "blocks", plan)]
        if fresh_state(n) or src_i not in skeleton["tensor_keys"]:
            continue
        tensor_keys[i] = list(skeleton["tensor_keys"][src_i])
        plain_state[i] = dict(skeleton["state"].get(src_i, {}))
        for role in tensor_keys[i]:
            key = f"optim/{src_i}/{role}"
            old = C.dcp_tensor_meta(path, key)
            specs[f"optim/{i}/{role}"] = torch.empty(old.shape, dtype=old.dtype, device="meta")
            sources[f"optim/{i}/{role}"] = (key, n)
    fresh_blocks = {}

    def build(key):
        src_key, name = sources[key]
        j = block_of(name)
        kind = plan.kinds[j] if j is not None else None
        if key.startswith("model/") and kind == FRESH:
            if j not in fresh_blocks:  # deepen_'s draws for block j, in its order
                fresh_blocks.clear()
                with torch.device("meta"):
                    template = Block(gcfg)
                template = template.to_empty(device="cpu").to(specs[key].dtype)  # every value is drawn anew
                fresh_blocks[j] = dict(new_block(template, FRESH, j, plan, adapter, "blocks", new_cfg)
                                       .named_parameters(prefix=f"blocks.{j}"))
            return fresh_blocks[j][name].detach().clone()
        old = C.read_dcp_tensor(path, src_key)
        if key.startswith("model/") and kind == ZERO_OUT and is_residual_output(adapter, name):
            return torch.zeros_like(old)
        return old

    new_skeleton = {"state": plain_state, "tensor_keys": tensor_keys,
                    "param_groups": optimizer.state_dict()["param_groups"]}
    params_before = sum(p.numel() for p in model.parameters())
    params_after = sum(p.numel() for p in new_model.parameters())
    entry = {"strategy": plan.strategy, "backend": "torch", "offline": True, "operation": "deepen_",
             "dims_before": {"n_layer": plan.old}, "dims_after": {"n_layer": plan.new},
             "params_before": params_before, "params_after": params_after, "exact": plan.exact,
             "notes": [f"blocks {plan.describe()}", "grown offline one tensor at a time "
                       "(growkern.train.offline.deepen_dcp); step-0 preservation not measured"],
             "step": meta["step"], "source": str(path), "schedule": "continue", "seed": seed,
             "positions": positions, "bytes": sum(t.numel() * t.element_size() for t in specs.values())}
    if before_write is not None:
        before_write(entry)
    _write_dcp(out, new_cfg, optimizer, scheduler, path, meta, tcfg, state, entry, specs, build, new_skeleton)
    entry["seconds"] = time.perf_counter() - t0
    return entry


class _Described:
    """What checkpoint.save reads of a model when the tensors are written by someone
    else: its config."""
    def __init__(self, config):
        self.config = config
