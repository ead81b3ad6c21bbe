"""The objects under the wrappers a training loop puts around a model, its optimizer and
its LR scheduler: growth always acts on the torch objects themselves.

One place for it, so that every caller (widen_, plan_growth, the training loop, the
checkpoints) looks through the same wrappers: torch.compile's OptimizedModule,
DistributedDataParallel and DataParallel for models; accelerate's AcceleratedOptimizer
and AcceleratedScheduler (what the Hugging Face Trainer steps) for the others.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def unwrap(model):
    """The model under torch.compile / DistributedDataParallel / DataParallel wrappers."""
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
