"""Backends of the widen primitive (growkern.ops), behind one function.

A backend is `fn(tensors, group) -> new tensors`: tensors[i] is rebuilt with
group.members[i]. Its batch form (`resolve_backend(..., batch=True)`) takes a
list of (tensors, group) and returns the list of results; the native backends
do a whole batch in one op call (one CUDA launch per dtype), the others loop.
"reference" is the torch specification and always available.

  cpu     growkern._C's C++ kernels (CPU tensors)
  cuda    growkern._C's CUDA kernels (CUDA tensors; the extension built with CUDA)
  triton  growkern/kernels/widen_triton.py (CUDA tensors; CPU under TRITON_INTERPRET=1)
  auto    CUDA tensors: cuda if built, else triton, else reference;
          CPU tensors: cpu if built, else reference (warns once when it falls back)

Nothing here imports the extension or triton until a backend is asked for, and
a missing or broken extension never makes `import growkern` fail.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from .spec import WidenGroup, reference_widen

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

_cache: dict = {}
_warned: set = set()


def widen_reference(tensors: list[torch.Tensor], group: WidenGroup) -> list[torch.Tensor]:
    return [reference_widen(t, group, m) for t, m in zip(tensors, group.members)]


def _ext_backends() -> dict[str, tuple[object, str]]:
    if "ext" not in _cache:
        from . import ext
        mod = ext.load()
        if mod is None:
            why = ext.load_error()
            _cache["ext"] = {"cpu": (None, why), "cuda": (None, why)}
        else:
            cpu = (ext.widen_cpu, "")
            if not ext.with_cuda():
                cuda = (None, "growkern._C was built without CUDA kernels (torch without CUDA or no nvcc "
                              "at build time; FORCE_CUDA=1 to force)")
            elif not torch.cuda.is_available():
                cuda = (None, "growkern._C has CUDA kernels but no CUDA device is available")
            else:
                cuda = (ext.widen_cuda, "")
            _cache["ext"] = {"cpu": cpu, "cuda": cuda}
    return _cache["ext"]


def _triton_backend() -> tuple[object, str]:
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    key = ("triton", interpret)
    if key not in _cache:
        if importlib.util.find_spec("triton") is None:
            _cache[key] = (None, "triton is not installed (pip install triton)")
        elif not interpret and not torch.cuda.is_available():
            _cache[key] = (None, "Triton needs a CUDA device (or TRITON_INTERPRET=1 to interpret on the CPU)")
        else:
            try:
                from .widen_triton import widen_triton
                _cache[key] = (widen_triton, "")
            except Exception as e:  # a triton that does not match this torch
                _cache[key] = (None, f"triton failed to import: {e!r}")
    return _cache[key]


def _availability() -> dict[str, tuple[object, str]]:
    """name -> (function or None, why not)."""
    ext = _ext_backends()
    return {
        "reference": (widen_reference, ""),
        "cpu": ext["cpu"],
        "cuda": ext["cuda"],
        "triton": _triton_backend(),
    }


def backends() -> dict[str, str]:
    """What is available: name -> "available" or the reason it is not."""
    return {k: ("available" if fn is not None else why) for k, (fn, why) in _availability().items()}


def _warn_once(key: str, msg: str):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _looped(fn):
    def many(items):
        return [fn(tensors, group) for tensors, group in items]
    return many


def _batched(fn, name):
    if name in ("cpu", "cuda"):
        from . import ext
        return ext.widen_many_cpu if name == "cpu" else ext.widen_many_cuda
    return _looped(fn)


def resolve_backend(name: str, device: torch.device, batch: bool = False):
    """(function, resolved name) of backend `name` for tensors on `device`; with
    batch=True the function takes and returns lists, one entry per group."""
    fn, resolved = _resolve(name, device)
    return (_batched(fn, resolved), resolved) if batch else (fn, resolved)


def _resolve(name: str, device: torch.device):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    device = torch.device(device)
    if name == "reference":
        return widen_reference, "reference"
    avail = _availability()
    if name == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpu",) if device.type == "cpu" else ()
        for cand in order:
            if avail[cand][0] is not None:
                return avail[cand][0], cand
        if order:
            why = "; ".join(f"{c}: {avail[c][1]}" for c in order)
            _warn_once(f"auto-{device.type}", f"growkern: no native widen kernel for {device.type} tensors, "
                                              f"using the reference ({why})")
        return widen_reference, "reference"
    fn, why = avail[name]
    if fn is None:
        raise ValueError(f"backend {name!r} is not available: {why}")
    return fn, name
