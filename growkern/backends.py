"""Backends of the widen primitive (growkern.ops), behind one function.

A backend is `fn(tensors, group) -> new tensors`: tensors[i] is rebuilt with
group.members[i]. "reference" is the torch specification and always available.
"""
from __future__ import annotations

import torch

from .ops import WidenGroup, reference_widen

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


def widen_reference(tensors: list[torch.Tensor], group: WidenGroup) -> list[torch.Tensor]:
    return [reference_widen(t, group, m) for t, m in zip(tensors, group.members)]


def _availability() -> dict[str, tuple[object, str]]:
    """name -> (function or None, why not)."""
    return {
        "reference": (widen_reference, ""),
        "cpu": (None, "the C++ extension growkern._C is not part of this build yet"),
        "cuda": (None, "the CUDA extension is not part of this build yet"),
        "triton": (None, "Triton kernels are not part of this build yet"),
    }


def backends() -> dict[str, str]:
    """What is available: name -> "available" or the reason it is not."""
    return {k: ("available" if fn is not None else why) for k, (fn, why) in _availability().items()}


def resolve_backend(name: str, device: torch.device):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    avail = _availability()
    if name == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        for cand in order:
            if avail[cand][0] is not None:
                return avail[cand][0], cand
        return widen_reference, "reference"
    fn, why = avail[name]
    if fn is None:
        raise ValueError(f"backend {name!r} is not available: {why}")
    return fn, name
