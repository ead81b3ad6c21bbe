"""Everything widen_ checks before it changes anything (atomicity), and the memory it needs.

A growth either happens whole or not at all: the model, its optimizer, its scheduler,
the plan and the schedule options are validated here up front, the class is built from
the old and the new config to show that the config can express the growth, and the new
state must fit on the device. Each refusal is one ValueError/TypeError/MemoryError
naming the problem and what is allowed.
"""
from __future__ import annotations

import math

import torch

from .adapter import Adapter
from .maps import GrowthPlan
from .schedule import SCHEDULES
from .wrappers import unwrap_optimizer

SUPPORTED_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def validate(model, adapter: Adapter, optimizer, scheduler, plan: GrowthPlan, schedule: str, rewarm_steps):
    if plan.adapter != adapter.name:
        raise ValueError(f"the plan was made for a {plan.adapter} model, this is a {adapter.name} model "
                         f"({type(model).__name__})")
    shape = adapter.shape(model)
    if plan.old != shape:
        raise ValueError(f"the plan was made for {plan.old}, but the model is {shape}")
    params = dict(model.named_parameters())
    if set(params) != set(plan.tensors):
        missing, extra = set(plan.tensors) - set(params), set(params) - set(plan.tensors)
        raise ValueError(f"cannot map this model: parameters missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")
    for name, p in params.items():
        tp = plan.tensors[name]
        if tp.stored(p.shape) != tp.old_shape:
            raise ValueError(f"cannot map parameter {name}: shape {tuple(p.shape)}, the plan expects "
                             f"{tp.stored(tp.old_shape)}")
        if p.device.type == "meta":
            raise ValueError(f"parameter {name} is on the meta device (no values to grow); "
                             f"load or materialize the model first")
    validate_training_state(model, optimizer, scheduler, schedule, rewarm_steps)


def validate_training_state(model, optimizer, scheduler, schedule: str, rewarm_steps, op: str = "widen_"):
    """The optimizer, scheduler and schedule options any growth (width or depth) takes."""
    if optimizer is not None:
        _validate_optimizer_params(model, optimizer)
        if type(optimizer) not in SUPPORTED_OPTIMIZERS:
            raise TypeError(f"unsupported optimizer {type(optimizer).__name__}; allowed: "
                            f"{', '.join(o.__name__ for o in SUPPORTED_OPTIMIZERS)}")
        for p, st in optimizer.state.items():
            for k, v in st.items():
                if k in MOMENT_KEYS and torch.is_tensor(v) and v.shape != p.shape:
                    raise ValueError(f"optimizer state {k!r} has shape {tuple(v.shape)}, its parameter "
                                     f"{tuple(p.shape)}")
                if k not in MOMENT_KEYS and k != "step":
                    raise ValueError(f"optimizer state has an entry {k!r} growkern cannot map; "
                                     f"known: {', '.join(MOMENT_KEYS)}, step")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "restart" and scheduler is None:
        raise ValueError("schedule='restart' needs the scheduler (pass scheduler=...)")
    if schedule == "rewarm":
        if scheduler is None:
            raise ValueError("schedule='rewarm' needs the scheduler (pass scheduler=...)")
        if isinstance(rewarm_steps, bool) or not isinstance(rewarm_steps, int) or rewarm_steps < 1:
            raise ValueError(f"schedule='rewarm' needs rewarm_steps, an int >= 1; got {rewarm_steps!r}")
    if scheduler is not None:
        if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            raise TypeError(f"unsupported scheduler {type(scheduler).__name__}; allowed: "
                            f"torch.optim.lr_scheduler.LRScheduler subclasses")
        if optimizer is None or unwrap_optimizer(scheduler.optimizer) is not optimizer:
            raise ValueError(f"the scheduler must drive the optimizer passed to {op}")


def _validate_optimizer_params(model, optimizer):
    """The optimizer must hold exactly the model's trainable parameters, each once:
    state left on a parameter growkern does not grow breaks the next step."""
    ids = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in ids:
                raise ValueError(f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not one "
                                 f"of the model's; pass the optimizer that trains this model")
            if id(p) in seen:
                raise ValueError(f"the optimizer holds parameter {ids[id(p)]} twice")
            seen.add(id(p))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"the optimizer does not hold {len(missing)} trainable parameter(s) of the model "
                         f"(first: {missing[0]}); pass the optimizer that trains this model")


def param_shapes(model) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def check_old_reference(model, ref_old) -> dict:
    """The model class built from the model's own config must have the model's parameters
    (growth rebuilds derived state from the config, width or depth); returns their shapes."""
    live, old = param_shapes(model), param_shapes(ref_old)
    if live != old:
        diff = sorted(set(live.items()) ^ set(old.items()))[:3]
        raise ValueError(f"{type(model).__name__} built from its own config does not have the model's "
                         f"parameters (differences: {diff}); growkern rebuilds derived state from the "
                         f"config, so the model must be what its config describes")
    return live


def check_new_config(model, adapter: Adapter, plan: GrowthPlan, ref_old, ref_new):
    """The model class built from the old config must have the model's parameters, and
    built from the new config the grown ones: else the config cannot express the growth."""
    check_old_reference(model, ref_old)
    for name, p in ref_new.named_parameters():
        tp = plan.tensors.get(name)
        want = None if tp is None else tp.stored(tp.new_shape)
        if want != tuple(p.shape):
            raise ValueError(f"the grown {name} would have shape {want}, but {type(model).__name__} built "
                             f"from the new config has {tuple(p.shape)}: its config cannot express this "
                             f"growth (adapter {adapter.name!r}, config keys {adapter.config_keys}); "
                             f"allowed: targets the config can hold, e.g. a growth factor")


def check_memory(model, optimizer, plan, shards: int = 1):
    """Fail up front when the new state cannot fit on the device (this rank's 1/shards
    of it under FSDP2)."""
    need = new_state_bytes(model, optimizer, plan) // shards
    dev = next(model.parameters()).device
    free = free_bytes(dev)
    if free is not None and need > free:
        raise MemoryError(f"growth needs {format_bytes(need)} of new state on {dev}, "
                          f"{format_bytes(free)} are free; nothing was changed")
    return need


def format_bytes(n: int) -> str:
    """A size in the largest binary unit it fills at least once, to three significant
    digits: 5.00 MiB, not 0.00 GiB; 812 B; 2.41 GiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.2f} {unit}" if abs(v) < 10 else f"{v:.1f} {unit}" if abs(v) < 100 else f"{v:.0f} {unit}"
    return f"{n} B"


def free_bytes(dev: torch.device) -> int | None:
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def moments(optimizer, p) -> dict:
    """The optimizer state tensors of p that grow with it (exp_avg, ...), in state order."""
    state = optimizer.state.get(p, {}) if optimizer is not None else {}
    return {k: v for k, v in state.items() if k in MOMENT_KEYS and torch.is_tensor(v)}


def state_bytes(params, optimizer) -> int:
    """Bytes of `params` and their optimizer moments (a checkpoint holds about as much)."""
    return sum(p.numel() * p.element_size() + sum(v.numel() * v.element_size() for v in moments(optimizer, p).values())
               for p in params)


def new_state_bytes(model, optimizer, plan) -> int:
    """Bytes of the grown parameters and their optimizer moments (what widen_ allocates,
    and about what a checkpoint of the grown state holds)."""
    total = 0
    for name, p in model.named_parameters():
        n = math.prod(plan.tensors[name].new_shape)
        total += n * (p.element_size() + sum(v.element_size() for v in moments(optimizer, p).values()))
    return total
