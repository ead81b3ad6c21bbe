"""LR schedule after growth: "continue" leaves the scheduler alone; "rewarm" multiplies
the LR by a linear ramp over the next N optimizer steps, as staged training does;
"restart" puts the scheduler back to its step 0 (a new run, as szp starts). Under muP
every optimizer group's LR first follows the new width (mup_lr_ratios, apply_schedule).

The ramp lives on the scheduler object itself (its class gains a small mixin and its
__dict__ a `_growkern_rewarm` entry), so it goes through scheduler.state_dict() and
load_state_dict(). A scheduler built afresh and loaded from such a state dict gets the
ramp back with `growkern.schedule.reattach(scheduler)`.
"""
from __future__ import annotations

import torch

from . import mup

SCHEDULES = ("continue", "rewarm", "restart")

KEY = "_growkern_rewarm"


class _RewarmMixin:
    def step(self, *args, **kwargs):
        rw = getattr(self, KEY)
        groups = self.optimizer.param_groups
        # let the underlying (possibly chainable) schedule see its own, un-ramped LRs
        for g, lr in zip(groups, rw["base"]):
            g["lr"] = lr
        super().step(*args, **kwargs)
        rw["base"] = [g["lr"] for g in groups]
        rw["done"] += 1
        _apply(self)


def ramp_factor(done: int, steps: int) -> float:
    """LR factor for the optimizer step after `done` post-growth steps: (done + 1) / steps, capped at 1."""
    return min(1.0, (done + 1) / steps)


def _apply(scheduler):
    rw = getattr(scheduler, KEY)
    f = ramp_factor(rw["done"], rw["steps"])
    for g, lr in zip(scheduler.optimizer.param_groups, rw["base"]):
        g["lr"] = lr * f
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


_CLASSES: dict[type, type] = {}


def reattach(scheduler):
    """Give `scheduler` the rewarm behaviour if its state holds a ramp (e.g. after
    load_state_dict into a fresh scheduler). Returns the scheduler."""
    if hasattr(scheduler, KEY) and not isinstance(scheduler, _RewarmMixin):
        cls = type(scheduler)
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"Rewarm{cls.__name__}", (_RewarmMixin, cls), {})
        scheduler.__class__ = _CLASSES[cls]
    return scheduler


def rewarm_(scheduler, steps: int):
    """Start a linear LR ramp over the next `steps` optimizer steps (the first uses 1/steps
    of the scheduled LR, step `steps` and later the full LR)."""
    if isinstance(scheduler, _RewarmMixin):
        base = getattr(scheduler, KEY)["base"]  # already ramping: keep the un-ramped LRs
    else:
        base = [g["lr"] for g in scheduler.optimizer.param_groups]
    setattr(scheduler, KEY, {"steps": int(steps), "done": 0, "base": list(base)})
    reattach(scheduler)
    _apply(scheduler)
    return scheduler


# --- muP learning rates and the restarted schedule ----------------------------------

RESTART_KEY = "_growkern_restart"  # on a restarted scheduler: {"steps_before": scheduler steps before}


def mup_lr_ratios(model, optimizer, old_config, new_config) -> list[tuple[float, float]] | None:
    """Per optimizer group of a muP model, (factor on its LR, its new muP LR multiplier):
    the new multiplier of its parameters over the old (growkern.growth.mup.lr_multiplier; 1/2 for
    hidden matrices when d_model doubles, 1 for the rest). None for SP models or without
    an optimizer. A group whose parameters' LRs would change differently cannot follow
    the width: ValueError, before anything changes."""
    if optimizer is None or not mup.is_mup(old_config):
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    kinds = mup.kinds(model)
    out = []
    for i, group in enumerate(optimizer.param_groups):
        seen = {}  # ratio -> (a parameter, its new multiplier)
        for p in group["params"]:
            n = names[id(p)]
            new = mup.lr_multiplier(kinds[n], new_config)
            seen.setdefault(new / mup.lr_multiplier(kinds[n], old_config), (n, new))
        if len(seen) > 1:
            (r1, (n1, _)), (r2, (n2, _)) = list(seen.items())[:2]
            raise ValueError(f"muP: optimizer group {i} holds {n1} (LR x{r1:g} at the new width) and {n2} "
                             f"(x{r2:g}); their muP learning rates change differently with width, so one "
                             f"group LR cannot follow. Give hidden matrices their own groups "
                             f"(growkern.train.loop.build_optimizer does)")
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
            rw = getattr(sch, KEY, None)
            if rw is not None:
                rw["base"] = [times(lr, r) for lr, (r, _) in zip(rw["base"], ratios)]
    return changed


def check_restartable(scheduler):
    if getattr(scheduler, "_schedulers", None) or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(f"schedule='restart' cannot restart a {type(scheduler).__name__}; allowed: a single "
                         f"LRScheduler (LambdaLR, CosineAnnealingLR, ...), or build a new scheduler yourself")


def _restart_schedule(scheduler) -> None:
    """Put the scheduler back to its step 0, as when it was built: every group's LR back
    to the scheduler's base LR, last_epoch -1, then the scheduler's own first step (so
    warmup runs again). A pending rewarm ramp is dropped. The scheduler steps taken
    before are kept in its state (RESTART_KEY), so a checkpoint can still tell how many
    training steps it has seen."""
    if isinstance(scheduler, _RewarmMixin):
        delattr(scheduler, KEY)
        scheduler.__class__ = type(scheduler).__bases__[1]  # (_RewarmMixin, the scheduler's class)
    before = getattr(scheduler, RESTART_KEY, {}).get("steps_before", 0) + max(scheduler.last_epoch, 0)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = lr
    setattr(scheduler, RESTART_KEY, {"steps_before": before})
    scheduler.last_epoch = -1
    scheduler._initial_step()


def apply_schedule(optimizer, scheduler, lr_ratios, new_config, schedule: str, rewarm_steps) -> list[str]:
    """After the tensors grew: muP group LRs to the new width (lr_ratios from
    mup_lr_ratios, None for SP), then the schedule ("continue", "rewarm", "restart").
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
        rewarm_(scheduler, rewarm_steps)
    return notes
