"""widen_: grow a model, its optimizer state and its LR schedule in place.

The data path is plan -> one primitive per parameter group -> new state:
  1. plan_growth (or the plan given) says how every parameter grows;
  2. everything is validated before anything changes (atomicity);
  3. the primitive (growkern.ops) builds each parameter and its optimizer moments
     together, a batch of parameters per call (one CUDA launch per dtype), and
     the batch's old tensors are released before the next one;
  4. the model's adapter (growkern/adapter.py) updates its config and everything
     derived from it (module attributes, buffers); the schedule is set.
Any model with an adapter grows the same way: growkern.GPT, the Hugging Face
families in growkern/families.py, and classes registered by users.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import mup
from . import schedule as schedule_mod
from .adapter import Adapter, adapter_for
from .ops import TensorScales, WidenGroup
from .plan import GrowthPlan, TensorPlan, plan_growth

SUPPORTED_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
SCHEDULES = ("continue", "rewarm", "restart")


@dataclass
class GrowthReport:
    strategy: str
    backend: str
    dims_before: dict
    dims_after: dict
    params_before: int
    params_after: int
    bytes_allocated: int  # bytes of the new parameters and optimizer state
    seconds: float
    exact: bool  # the plan claims function preservation at step 0
    preservation: dict | None = None  # max_abs_dlogits, kl_small_wide, dloss (probe_batch given)
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        dims = "  ".join(f"{k} {self.dims_before[k]}->{self.dims_after[k]}" for k in self.dims_before)
        lines = [
            f"growkern.widen_  strategy={self.strategy}  backend={self.backend}",
            f"  {dims}",
            f"  parameters {self.params_before:,} -> {self.params_after:,}   "
            f"new state {self.bytes_allocated / 2**20:.1f} MiB   {self.seconds * 1e3:.1f} ms",
        ]
        if self.preservation is not None:
            p = self.preservation
            lines.append(f"  step-0 preservation: max|dlogits| {p['max_abs_dlogits']:.3e}  "
                         f"KL(small||wide) {p['kl_small_wide']:.3e}  dloss {p['dloss']:+.3e}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _dims(shape) -> dict:
    return {"d_model": shape.d_model, "d_ff": shape.d_ff, "n_head": shape.n_head,
            "n_kv_head": shape.n_kv_head, "head_dim": shape.head_dim}


def unwrap(model):
    """The model under torch.compile / DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def unwrap_optimizer(optimizer):
    """The torch optimizer under wrappers that hold it as `.optimizer` (accelerate's
    AcceleratedOptimizer, which the HF Trainer steps)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def unwrap_scheduler(scheduler):
    """The torch LR scheduler under wrappers that hold it as `.scheduler` (accelerate)."""
    while isinstance(getattr(scheduler, "scheduler", None), torch.optim.lr_scheduler.LRScheduler):
        scheduler = scheduler.scheduler
    return scheduler


def _stored_shape(tp: TensorPlan, shape) -> tuple[int, ...]:
    return tuple(shape)[::-1] if tp.transposed else tuple(shape)


# --- validation: everything that can be checked is checked before any change ----

def _validate(model, adapter: Adapter, optimizer, scheduler, plan: GrowthPlan, schedule: str, rewarm_steps):
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
        if _stored_shape(tp, p.shape) != tp.old_shape:
            raise ValueError(f"cannot map parameter {name}: shape {tuple(p.shape)}, the plan expects "
                             f"{_stored_shape(tp, tp.old_shape)}")
        if p.device.type == "meta":
            raise ValueError(f"parameter {name} is on the meta device (no values to grow); "
                             f"load or materialize the model first")
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
            raise ValueError("the scheduler must drive the optimizer passed to widen_")


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


def _check_new_config(model, adapter: Adapter, plan: GrowthPlan, ref_old, ref_new):
    """The model class built from the old config must have the model's parameters, and
    built from the new config the grown ones: else the config cannot express the growth."""
    live = {n: tuple(p.shape) for n, p in model.named_parameters()}
    old = {n: tuple(p.shape) for n, p in ref_old.named_parameters()}
    if live != old:
        diff = sorted(set(live.items()) ^ set(old.items()))[:3]
        raise ValueError(f"{type(model).__name__} built from its own config does not have the model's "
                         f"parameters (differences: {diff}); growkern rebuilds derived state from the "
                         f"config, so the model must be what its config describes")
    for name, p in ref_new.named_parameters():
        tp = plan.tensors.get(name)
        want = None if tp is None else _stored_shape(tp, tp.new_shape)
        if want != tuple(p.shape):
            raise ValueError(f"the grown {name} would have shape {want}, but {type(model).__name__} built "
                             f"from the new config has {tuple(p.shape)}: its config cannot express this "
                             f"growth (adapter {adapter.name!r}, config keys {adapter.config_keys}); "
                             f"allowed: targets the config can hold, e.g. a growth factor")


def _check_memory(model, optimizer, plan, shards: int = 1):
    """Fail up front when the new state cannot fit on the device (this rank's 1/shards
    of it under FSDP2)."""
    need = new_state_bytes(model, optimizer, plan) // shards
    dev = next(model.parameters()).device
    free = _free_bytes(dev)
    if free is not None and need > free:
        raise MemoryError(f"growth needs {need / 2**30:.2f} GiB of new state on {dev}, "
                          f"{free / 2**30:.2f} GiB are free; nothing was changed")
    return need


def _free_bytes(dev: torch.device) -> int | None:
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


def _moments(optimizer, p) -> dict:
    """The optimizer state tensors of p that grow with it (exp_avg, ...), in state order."""
    state = optimizer.state.get(p, {}) if optimizer is not None else {}
    return {k: v for k, v in state.items() if k in MOMENT_KEYS and torch.is_tensor(v)}


def new_state_bytes(model, optimizer, plan) -> int:
    """Bytes of the grown parameters and their optimizer moments (what widen_ allocates,
    and about what a checkpoint of the grown state holds)."""
    total = 0
    for name, p in model.named_parameters():
        n = math.prod(plan.tensors[name].new_shape)
        total += n * (p.element_size() + sum(v.element_size() for v in _moments(optimizer, p).values()))
    return total


# --- the groups handed to the primitive ----------------------------------------

def _rms_mapped(old: torch.Tensor, tp: TensorPlan) -> float:
    """RMS over the non-fresh entries of the mapped (pre-noise) tensor, from the old
    tensor alone: sum (a_r b_c x[src_r, src_c])^2 = u^T (x*x) v with u, v the summed
    squared scales of each source index."""
    x2 = old.detach().to(torch.float64) ** 2
    r_ok = tp.rows.src >= 0
    u = torch.zeros(tp.rows.old, dtype=torch.float64).index_add_(
        0, tp.rows.src[r_ok], tp.rows.scale[r_ok] ** 2).to(x2.device)
    if tp.cols is None:
        total, count = (u * x2).sum(), int(r_ok.sum())
    else:
        c_ok = tp.cols.src >= 0
        v = torch.zeros(tp.cols.old, dtype=torch.float64).index_add_(
            0, tp.cols.src[c_ok], tp.cols.scale[c_ok] ** 2).to(x2.device)
        total, count = u @ x2 @ v, int(r_ok.sum()) * int(c_ok.sum())
    return math.sqrt(float(total) / count) if count else 0.0


def build_group(tp: TensorPlan, param: torch.Tensor, moments: dict, strategy, seed: int) -> WidenGroup:
    """The primitive's input for one parameter and its moments (param first)."""
    def signs(axis):
        n = axis.src.numel()
        sign = axis.sign if axis.sign is not None else torch.zeros(n, dtype=torch.float64)
        idx = axis.noise_idx if axis.noise_idx is not None else torch.arange(n)
        return sign, idx

    row_sign, _ = signs(tp.rows)
    col_sign = noise_col = None
    if tp.cols is not None:
        col_sign, noise_col = signs(tp.cols)
    group = WidenGroup(tp.rows.src, None if tp.cols is None else tp.cols.src,
                       row_sign, col_sign, noise_col, seed)
    sigma = sigma_fresh = 0.0
    if tp.noise or tp.noise_fresh:
        unit = _rms_mapped(param, tp) if tp.noise_mode == "relative" else 1.0
        sigma, sigma_fresh = tp.noise * unit, tp.noise_fresh * unit
    group.members.append(TensorScales(tp.rows.scale, None if tp.cols is None else tp.cols.scale,
                                      tp.fresh_value, sigma, sigma_fresh, tp.stream))
    m_rows, m_cols = _moment_scales(tp, strategy.moments)
    for key in moments:
        power = 2 if key in ("exp_avg_sq", "max_exp_avg_sq") else 1
        group.members.append(TensorScales(m_rows ** power, None if m_cols is None else m_cols ** power))
    return group


def _moment_scales(tp: TensorPlan, mode: str):
    if mode in ("exact", "asym"):
        return tp.moment_scales()
    kept_r = (tp.rows.src >= 0).double()
    kept_c = None if tp.cols is None else (tp.cols.src >= 0).double()
    if mode == "keep":
        return kept_r, kept_c
    return kept_r * 0, None if kept_c is None else kept_c * 0  # "zero"


def _orthogonalize_fresh_rows(w: torch.Tensor, tp: TensorPlan) -> int:
    """Project the fresh rows onto the orthogonal complement of the old rows' span and
    give each the old rows' RMS. Returns how many rows found no room (left as drawn)."""
    fresh = tp.rows.src < 0
    if not fresh.any():
        return 0
    x = w.detach().to(torch.float64)
    old_rows, new_rows = x[~fresh.to(w.device)], x[fresh.to(w.device)]
    target = old_rows.pow(2).mean().sqrt() * math.sqrt(x.shape[1])
    _, s, vh = torch.linalg.svd(old_rows, full_matrices=False)
    rank = int((s > s.max() * max(x.shape) * torch.finfo(torch.float64).eps).sum()) if s.numel() else 0
    basis = vh[:rank]
    proj = new_rows - (new_rows @ basis.T) @ basis
    norms = proj.norm(dim=1, keepdim=True)
    room = norms.squeeze(1) > 1e-6 * new_rows.norm(dim=1).clamp(min=1e-300)
    out = torch.where(room[:, None], proj / norms.clamp(min=1e-300) * target, new_rows)
    x[fresh.to(w.device)] = out
    w.copy_(x.to(w.dtype))
    return int((~room).sum())


# --- the mutation ---------------------------------------------------------------

def batch_indices(sizes: list[int]) -> list[list[int]]:
    """Consecutive items in batches of at most max(sizes) bytes of old state each.
    Each batch is one call of the primitive (one CUDA launch per dtype), and the
    peak extra memory stays the new state plus the largest group's old state, as
    with one group at a time."""
    budget = max(sizes, default=0)
    batches, batch, used = [], [], 0
    for i, size in enumerate(sizes):
        if batch and used + size > budget:
            batches.append(batch)
            batch, used = [], 0
        batch.append(i)
        used += size
    if batch:
        batches.append(batch)
    return batches


def _batches(model, optimizer, sharded: bool = False):
    named = list(model.named_parameters())
    if sharded:  # one parameter at a time: each is gathered whole
        return [[item] for item in named]
    sizes = [p.nbytes + sum(v.nbytes for v in _moments(optimizer, p).values()) for _, p in named]
    return [[named[i] for i in b] for b in batch_indices(sizes)]


def _replace_data(p: nn.Parameter, new: torch.Tensor):
    """p.data = new, for a new shape. Autograd caches a leaf's gradient accumulator,
    with the old shape, for as long as any graph that used it is alive (e.g. the last
    step's `loss`); it only drops it when the dtype or device changes. Passing through
    an empty tensor of another dtype makes it build a fresh one on the next backward."""
    other = torch.float32 if new.dtype != torch.float32 else torch.float64
    p.data = torch.empty(0, dtype=other, device=new.device)
    p.data = new


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def logits_of(output) -> torch.Tensor:
    """The logits of a causal LM's forward: growkern.GPT's (logits, loss), a transformers
    ModelOutput, or a tensor."""
    if torch.is_tensor(output):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def _check_probe(probe_batch, shape, device) -> None:
    """probe_batch is token ids (batch, seq), or (ids, targets), the model can read."""
    allowed = "allowed: an integer tensor of token ids (batch, seq), or a pair (ids, targets)"
    parts = list(probe_batch) if isinstance(probe_batch, (tuple, list)) else [probe_batch]
    if not 1 <= len(parts) <= 2 or not all(torch.is_tensor(t) for t in parts):
        got = type(probe_batch).__name__
        if isinstance(probe_batch, (tuple, list)):
            got += f" of ({', '.join(type(t).__name__ for t in parts)})"
        raise TypeError(f"probe_batch: got {got}; {allowed}")
    for what, t in zip(("ids", "targets"), parts):
        if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"probe_batch {what} have dtype {t.dtype}; {allowed}")
        if t.dim() != 2 or t.numel() == 0:
            raise ValueError(f"probe_batch {what} have shape {tuple(t.shape)}; {allowed}")
        if t.device != device:
            raise ValueError(f"probe_batch {what} are on {t.device}, the model on {device}; move them")
    x = parts[0]
    if len(parts) == 2 and parts[1].shape != x.shape:
        raise ValueError(f"probe_batch targets have shape {tuple(parts[1].shape)}, the ids {tuple(x.shape)}; "
                         f"they must match")
    if len(parts) == 1 and x.shape[1] < 2:
        raise ValueError("probe_batch ids without targets need sequences of 2 or more tokens "
                         "(the targets are the ids shifted by one)")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= shape.vocab_size:
        raise ValueError(f"probe_batch ids range over [{lo}, {hi}]; allowed: [0, {shape.vocab_size - 1}] "
                         f"(vocab_size {shape.vocab_size})")
    if len(parts) == 2:
        y = parts[1][parts[1] != -100]  # the ignore index of nll_loss and transformers' labels
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= shape.vocab_size):
            raise ValueError(f"probe_batch targets range over [{int(y.min())}, {int(y.max())}]; allowed: "
                             f"[0, {shape.vocab_size - 1}], or -100 to ignore a position")
    if shape.n_positions is not None and x.shape[1] > shape.n_positions:
        raise ValueError(f"probe_batch sequences have {x.shape[1]} tokens; the model has {shape.n_positions} "
                         f"positions")


def _probe(model, probe_batch):
    x = probe_batch[0] if isinstance(probe_batch, (tuple, list)) else probe_batch
    y = probe_batch[1] if isinstance(probe_batch, (tuple, list)) and len(probe_batch) > 1 else None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = logits_of(model(x))
    model.train(was_training)
    logits = logits.double()
    if y is None:
        logits, y = logits[:, :-1], x[:, 1:]
    return logits, y.long()  # nll_loss takes int64 targets only; _check_probe allows any integer dtype


def _preservation(small_logits, wide_logits, y) -> dict:
    lp_s = F.log_softmax(small_logits, -1)
    lp_w = F.log_softmax(wide_logits, -1)
    kl = (lp_s.exp() * (lp_s - lp_w)).sum(-1).mean()
    loss_s = F.nll_loss(lp_s.flatten(0, 1), y.flatten())
    loss_w = F.nll_loss(lp_w.flatten(0, 1), y.flatten())
    return {"max_abs_dlogits": float((wide_logits - small_logits).abs().max()),
            "kl_small_wide": float(kl), "dloss": float(loss_w - loss_s),
            "loss_small": float(loss_s), "loss_wide": float(loss_w)}


# --- muP learning rates and the restarted schedule ----------------------------------

RESTART_KEY = "_growkern_restart"  # on a restarted scheduler: {"steps_before": scheduler steps before}


def _mup_lr_ratios(model, optimizer, old_config, new_config) -> list[tuple[float, float]] | None:
    """Per optimizer group of a muP model, (factor on its LR, its new muP LR multiplier):
    the new multiplier of its parameters over the old (growkern.mup.lr_multiplier; 1/2 for
    hidden matrices when d_model doubles, 1 for the rest). None for SP models or without
    an optimizer. A group whose parameters' LRs would change differently cannot follow
    the width: ValueError, before anything changes."""
    if optimizer is None or not mup.is_mup(old_config):
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for i, group in enumerate(optimizer.param_groups):
        seen = {}  # ratio -> (a parameter, its new multiplier)
        for p in group["params"]:
            n = names[id(p)]
            new = mup.lr_multiplier(n, new_config)
            seen.setdefault(new / mup.lr_multiplier(n, old_config), (n, new))
        if len(seen) > 1:
            (r1, (n1, _)), (r2, (n2, _)) = list(seen.items())[:2]
            raise ValueError(f"muP: optimizer group {i} holds {n1} (LR x{r1:g} at the new width) and {n2} "
                             f"(x{r2:g}); their muP learning rates change differently with width, so one "
                             f"group LR cannot follow. Give hidden matrices their own groups "
                             f"(growkern.train.build_optimizer does)")
        out.append(next(iter(seen.items()), (1.0, (None, None))))
    return [(r, mult) for r, (_, mult) in out]


def _schedulers(scheduler):
    """The scheduler and the ones it chains (SequentialLR, ChainedScheduler)."""
    yield scheduler
    for sub in getattr(scheduler, "_schedulers", None) or ():
        yield from _schedulers(sub)


def _scale_lrs(optimizer, scheduler, ratios) -> list[int]:
    """Multiply each group's LR, initial_lr and the schedulers' base LRs (and a rewarm
    ramp's un-ramped LRs) by its muP factor. Returns the groups that changed."""
    def times(lr, r):
        return lr * r if r != 1.0 else lr

    changed = [i for i, (r, _) in enumerate(ratios) if r != 1.0]
    for group, (r, mult) in zip(optimizer.param_groups, ratios):
        group["lr"] = times(group["lr"], r)
        if "initial_lr" in group:
            group["initial_lr"] = times(group["initial_lr"], r)
        if "mup_lr_mult" in group and mult is not None:
            group["mup_lr_mult"] = mult
    if scheduler is not None:
        for sch in _schedulers(scheduler):
            sch.base_lrs = [times(lr, r) for lr, (r, _) in zip(sch.base_lrs, ratios)]
            if getattr(sch, "_last_lr", None) is not None:
                sch._last_lr = [times(lr, r) for lr, (r, _) in zip(sch._last_lr, ratios)]
            rw = getattr(sch, schedule_mod.KEY, None)
            if rw is not None:
                rw["base"] = [times(lr, r) for lr, (r, _) in zip(rw["base"], ratios)]
    return changed


def _check_restartable(scheduler):
    if getattr(scheduler, "_schedulers", None) or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(f"schedule='restart' cannot restart a {type(scheduler).__name__}; allowed: a single "
                         f"LRScheduler (LambdaLR, CosineAnnealingLR, ...), or build a new scheduler yourself")


def _restart_schedule(scheduler) -> None:
    """Put the scheduler back to its step 0, as when it was built: every group's LR back
    to the scheduler's base LR, last_epoch -1, then the scheduler's own first step (so
    warmup runs again). A pending rewarm ramp is dropped. The scheduler steps taken
    before are kept in its state (RESTART_KEY), so a checkpoint can still tell how many
    training steps it has seen."""
    if isinstance(scheduler, schedule_mod._RewarmMixin):
        delattr(scheduler, schedule_mod.KEY)
        scheduler.__class__ = type(scheduler).__bases__[1]  # (_RewarmMixin, the scheduler's class)
    before = getattr(scheduler, RESTART_KEY, {}).get("steps_before", 0) + max(scheduler.last_epoch, 0)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = lr
    setattr(scheduler, RESTART_KEY, {"steps_before": before})
    scheduler.last_epoch = -1
    scheduler._initial_step()


def apply_schedule(optimizer, scheduler, lr_ratios, new_config, schedule: str, rewarm_steps) -> list[str]:
    """After the tensors grew: muP group LRs to the new width (lr_ratios from
    _mup_lr_ratios, None for SP), then the schedule ("continue", "rewarm", "restart").
    Returns the report's notes."""
    notes = []
    if lr_ratios is not None:
        changed = _scale_lrs(optimizer, scheduler, lr_ratios)
        if changed:
            notes.append(f"muP: the LRs of optimizer groups {changed} follow the width "
                         f"(x{lr_ratios[changed[0]][0]:g}); output multiplier "
                         f"{mup.output_multiplier(new_config):g}")
    if scheduler is not None and schedule == "restart":
        _restart_schedule(scheduler)
        notes.append("schedule restarted: the scheduler is back at its step 0")
    if scheduler is not None and schedule == "rewarm":
        schedule_mod.rewarm_(scheduler, rewarm_steps)
    return notes


def grow_tensor(tp: TensorPlan, old: torch.Tensor, role: str | None, strategy, seed: int, widen_many) -> torch.Tensor:
    """One new tensor alone, as widen_ builds it with its group: the parameter (role
    None) or one of its optimizer moments (role "exp_avg", ...), `old` in its stored
    layout. For writers that hold one tensor at a time (growkern/offline.py)."""
    x = old.t() if tp.transposed else old
    group = build_group(tp, x, {} if role is None else {role: x}, strategy, seed)
    if role is not None:
        group.members = group.members[1:]
    out = widen_many([([x], group)])[0][0]
    if role is None:
        if tp.orthogonalize_fresh_rows:
            _orthogonalize_fresh_rows(out, tp)
        if tp.gain_offset:
            _finish_gain(out, tp)
    return out.t().contiguous() if tp.transposed else out


def _finish_gain(p: torch.Tensor, tp: TensorPlan, rows: tuple[int, int] | None = None):
    """Norms computing x_hat * (offset + w): the primitive mapped w with the scales of
    the effective gain; w' = a w + offset (a - 1) on kept entries, fresh ones hold
    the effective value and take - offset. `rows`: p holds only these rows [lo, hi)."""
    lo, hi = rows if rows is not None else (0, tp.rows.src.numel())
    kept = (tp.rows.src[lo:hi] >= 0).to(p.device)
    a = tp.rows.scale[lo:hi].to(p.device)
    fix = torch.where(kept, tp.gain_offset * (a - 1), torch.full_like(a, -tp.gain_offset))
    p.copy_((p.double() + fix).to(p.dtype))


def widen_(model, optimizer=None, scheduler=None, *, plan: GrowthPlan | None = None,
           probe_batch=None, schedule: str | None = None, rewarm_steps: int | None = None,
           backend: str = "auto", **plan_kwargs) -> GrowthReport:
    """Grow `model` in width in place, with its optimizer state and LR schedule.

    `model` is a growkern.GPT, a transformers causal LM of a known family (GPT-2,
    Llama, Mistral, Qwen2/3, Phi-3, Gemma2/3), or a class registered with
    growkern.register_adapter; torch.compile and DDP wrappers are looked through, as
    are accelerate's optimizer and scheduler wrappers. A DistributedDataParallel model
    is grown on every rank (widen_ is then a collective: each rank calls it with the
    same arguments, between optimizer steps) and its Reducer rebuilt on the same
    wrapper; an FSDP2 model (fully_shard) is grown the same way, each rank gathering
    one old parameter at a time and building only its own rows of the new one
    (growkern/distributed.py, docs/distributed.md). Give a `plan` or the keywords
    of growkern.plan_growth (factor=, d_model=, d_ff=, n_head=, strategy=, seed=,
    strategy options). The nn.Parameter objects stay the same, so optimizer
    param_groups, hooks and references stay valid; model.config describes the new
    widths. `schedule`: "continue" (the LR goes on), "rewarm" (a ramp over
    rewarm_steps), "restart" (the scheduler back to its step 0, warmup again); None:
    the strategy's default ("restart" for szp, else "continue"). A muP model's groups'
    LRs (and the scheduler's base LRs) follow the new width (growkern/mup.py).
    Raises ValueError/TypeError, with nothing changed, on anything it cannot do."""
    t0 = time.perf_counter()
    from . import distributed
    ddp = distributed.find_ddp(model)  # the wrapper, or the one around this module: its Reducer is rebuilt
    fsdp = distributed.find_fsdp(model)  # an FSDP2 root: grown shard by shard
    if fsdp is not None:
        distributed.reshard(fsdp)  # the modules hold their sharded parameters (the optimizer's) again
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"widen_ grows a torch.nn.Module; got {type(model).__name__}")
    adapter = adapter_for(model)
    optimizer = unwrap_optimizer(optimizer)
    scheduler = unwrap_scheduler(scheduler)
    if plan is None:
        plan = plan_growth(model, **plan_kwargs)
    elif plan_kwargs:
        raise ValueError(f"give either plan= or plan_growth keywords, not both (got {sorted(plan_kwargs)})")
    if schedule is None:  # the strategy's: "continue", or "restart" for szp (a new run)
        schedule = getattr(plan.strategy, "default_schedule", "continue")
        if schedule == "restart" and scheduler is None:
            schedule = "continue"  # no scheduler to restart
    _validate(model, adapter, optimizer, scheduler, plan, schedule, rewarm_steps)
    if schedule == "restart":
        _check_restartable(scheduler)
    if ddp is not None:
        distributed.check_growable(ddp)
    if fsdp is not None:
        fsdp_of = distributed.check_fsdp_growable(model, plan)  # and reshards every module
    # memory first: the reference builds below allocate each new-width parameter briefly
    new_bytes = _check_memory(model, optimizer, plan, 1 if fsdp is None else distributed.context(model).world_size)
    new_config = adapter.new_config(model.config, plan.new)
    ref_old = adapter.build_reference(model.config, like=model)
    ref_new = adapter.build_reference(new_config, like=model)
    _check_new_config(model, adapter, plan, ref_old, ref_new)
    lr_ratios = _mup_lr_ratios(model, optimizer, model.config, new_config)
    from .backends import resolve_backend
    widen_many, backend_name = resolve_backend(backend, next(model.parameters()).device, batch=True)
    if probe_batch is not None:
        _check_probe(probe_batch, plan.old, next(model.parameters()).device)
        small_logits, probe_y = _probe(model, probe_batch)
        if fsdp is not None:
            distributed.reshard(fsdp)  # a forward leaves the FSDP2 root gathered
    params_before = _num_params(model)
    notes = []
    no_room = 0

    # --- from here on, state changes ---
    if ddp is not None:
        distributed.release_reducer(ddp)  # its buckets and hooks hold the old shapes
    strategy = plan.strategy
    with torch.no_grad():
        for batch in _batches(model, optimizer, sharded=fsdp is not None):
            items, states = [], []
            for name, p in batch:
                tp = plan.tensors[name]
                moments = _moments(optimizer, p)
                # FSDP2: the whole old tensors (an all-gather each), one parameter at a time
                olds = [distributed.local(t.detach()) for t in (p, *moments.values())]
                if tp.transposed:  # the plan reads (out, in); the primitive takes any strides
                    olds = [t.t() for t in olds]
                group = build_group(tp, olds[0], moments, strategy, plan.seed)
                rows = None
                if fsdp is not None:  # only the new rows (stored dim 0) this rank holds
                    rows = distributed.owned_rows(_stored_shape(tp, tp.new_shape)[0], fsdp_of[id(p)])
                    group = group.cols(*rows) if tp.transposed else group.rows(*rows)
                items.append((olds, group))
                states.append((optimizer.state.get(p, {}) if optimizer is not None else {}, list(moments), rows))
            results = widen_many(items)
            del items  # the old tensors of this batch go once their owners let go below
            for (name, p), (state, keys, rows), outs in zip(batch, states, results):
                tp = plan.tensors[name]
                if tp.orthogonalize_fresh_rows:
                    no_room += _orthogonalize_fresh_rows(outs[0], tp)
                if tp.gain_offset:
                    _finish_gain(outs[0], tp, rows)
                if tp.transposed:
                    outs = [t.t().contiguous() for t in outs]
                if fsdp is not None:
                    new_shape = _stored_shape(tp, tp.new_shape)
                    outs = [outs[0], *distributed.install_shard(fsdp_of[id(p)], p, new_shape, outs[0], outs[1:])]
                else:
                    _replace_data(p, outs[0])
                for key, new in zip(keys, outs[1:]):
                    state[key] = new
                if strategy.reset_step and "step" in state:
                    state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0
                if p.grad is not None:
                    p.grad = None  # a gradient of the old shape is meaningless now
            del results
    if no_room:
        notes.append(f"{no_room} new fan-in rows had no room orthogonal to the old rows "
                     f"(the old rows span their fan-in space) and stay as drawn")
    adapter.apply_config(model, new_config)
    adapter.sync(model, ref_old, ref_new)
    if ddp is not None:
        distributed.rebuild_reducer(ddp)  # collective: every rank grows
        notes.append("DDP: a new Reducer was built on the same wrapper for the grown parameters")
    if fsdp is not None:
        distributed.finish_fsdp_growth(model)
        notes.append("FSDP2: each rank built only its own rows of every grown tensor")
    notes += apply_schedule(optimizer, scheduler, lr_ratios, new_config, schedule, rewarm_steps)

    report = GrowthReport(
        strategy=strategy.describe(), backend=backend_name, dims_before=_dims(plan.old),
        dims_after=_dims(plan.new), params_before=params_before, params_after=_num_params(model),
        bytes_allocated=new_bytes, seconds=time.perf_counter() - t0, exact=plan.exact, notes=notes)
    if not plan.exact:
        notes.append(f"not function preserving at step 0: {plan.not_exact_because}")
    if probe_batch is not None:
        wide_logits, _ = _probe(model, probe_batch)
        if fsdp is not None:
            distributed.reshard(fsdp)
        report.preservation = _preservation(small_logits, wide_logits, probe_y)
    return report
