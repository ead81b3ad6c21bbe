"""LR schedule after growth: "continue" leaves the scheduler alone; "rewarm" multiplies
the LR by a linear ramp over the next N optimizer steps, as staged training does.

The ramp lives on the scheduler object itself (its class gains a small mixin and its
__dict__ a `_growkern_rewarm` entry), so it goes through scheduler.state_dict() and
load_state_dict(). A scheduler built afresh and loaded from such a state dict gets the
ramp back with `growkern.schedule.reattach(scheduler)`.
"""
from __future__ import annotations

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
