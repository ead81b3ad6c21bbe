"""A host copy of a model's whole training state, put back in place after each candidate.

select_warm_start grows one candidate after another from the same small state. Rather
than keep K grown copies, it keeps one copy of the small state on the host and, after
each candidate, puts it back into the *same* objects the user holds: the same
nn.Parameter objects get their old data back, the optimizer and the scheduler load
their old state dicts, and the config and every module's plain attributes and buffers
(which the adapter changed with the widths) are restored. So references the user
keeps (param groups, hooks, the scheduler's optimizer) stay valid, and with
apply=False the model, optimizer and scheduler end bit-identical to how they began.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..growth.adapter import config_attributes


def _host(obj):
    """obj with every tensor copied to the CPU (state dicts nest tensors in dicts and lists)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host(v) for v in obj)
    return copy.deepcopy(obj)


class TrainingState:
    """The small state of (model, optimizer, scheduler), taken once and restored in place."""

    def __init__(self, model: nn.Module, optimizer, scheduler=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config = getattr(model, "config", None)
        self.config_vars = copy.deepcopy(vars(self.config)) if self.config is not None else None
        self.params = [(p, _host(p), None if p.grad is None else _host(p.grad)) for p in model.parameters()]
        self.attrs, self.buffers = {}, {}
        for name, mod in model.named_modules():
            self.attrs[name] = copy.deepcopy(config_attributes(mod))  # what Adapter.sync may change
            self.buffers[name] = {k: (None if b is None else (b.device, _host(b)))
                                  for k, b in mod._buffers.items()}
        self.training = {name: mod.training for name, mod in model.named_modules()}
        self.optimizer_state = _host(optimizer.state_dict()) if optimizer is not None else None
        # the scheduler whole (class and attributes), not its state_dict: a re-warm swaps
        # its class and a restart adds an attribute, which load_state_dict would keep
        self.scheduler_class = type(scheduler)
        self.scheduler_vars = self._scheduler_copy(vars(scheduler)) if scheduler is not None else None
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def _scheduler_copy(self, attrs: dict) -> dict:
        """A deep copy of a scheduler's attributes that shares the optimizer (and, through
        it, the parameters) rather than copying it; chained schedulers' children too."""
        return copy.deepcopy(attrs, memo={id(self.optimizer): self.optimizer})

    def restore(self) -> None:
        model = self.model
        if self.config is not None:
            model.config = self.config  # adapters that replace the config object get the user's back
            vars(self.config).clear()
            vars(self.config).update(copy.deepcopy(self.config_vars))
        mods = dict(model.named_modules())
        for name, attrs in self.attrs.items():
            for k, v in attrs.items():
                setattr(mods[name], k, copy.deepcopy(v))
        for name, bufs in self.buffers.items():
            for k, saved in bufs.items():
                mods[name]._buffers[k] = None if saved is None else saved[1].to(saved[0], copy=True)
        for p, data, grad in self.params:
            p.data = data.to(p.device, copy=True)
            p.grad = None if grad is None else grad.to(p.device, copy=True)
        if self.optimizer is not None:
            self.optimizer.state.clear()
            # a copy: load_state_dict keeps CPU tensors such as AdamW's `step` as they are,
            # and the next optimizer.step() would then count up in the snapshot itself
            self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        if self.scheduler is not None:
            self.scheduler.__class__ = self.scheduler_class
            vars(self.scheduler).clear()
            vars(self.scheduler).update(self._scheduler_copy(self.scheduler_vars))
        for name, mod in mods.items():
            mod.training = self.training[name]
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
