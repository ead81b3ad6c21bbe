"""growkern._C: loading it, the ops' fake (meta) implementations, the backend call.

The extension registers, under torch.ops.growkern (TORCH_LIBRARY(growkern)):

  widen_group(Tensor[] srcs, Tensor row_src, Tensor? col_src, Tensor[] row_scales,
              Tensor[] col_scales, float[] fresh_values, float[] sigmas,
              float[] sigma_fresh, Tensor row_sign, Tensor? col_sign,
              Tensor? noise_col, int seed, int[] streams, int row_offset=0) -> Tensor[]
      One call widens a parameter and all its moments (srcs, in member order)
      with the group's shared maps; col_src None means 1-D tensors (then
      col_scales is empty). Index maps are int64 (-1 = fresh), scales and signs
      any float dtype (used as float32, float64 for float64 sources). The maps
      may live on the CPU for CUDA sources: they are packed and moved in one copy.
      The noise of entry (r, c) is N(seed, stream, r + row_offset, noise_col[c])
      (growkern.ops): row_offset, in [0, 2**32), is WidenGroup.row_offset, so
      rows [lo, hi) of a tensor can be built alone with the full build's noise.
      Implementations: CPU and CUDA, each the one-group case of widen_groups.
      The CPU kernels draw float32 normals 16 (AVX-512) or 8 (AVX2) lanes at a
      time, with the same bits as the scalar code (csrc/philox_simd.h);
      GROWKERN_CPU_ISA=scalar|avx2|avx512 caps the set, `cpu_isa()` says which.
  widen_groups(Tensor[] srcs, int[] group_sizes, Tensor[] row_src, Tensor?[] col_src,
               Tensor[] row_sign, Tensor?[] col_sign, Tensor?[] noise_col, int[] seeds,
               Tensor[] row_scales, Tensor?[] col_scales, float[] fresh_values,
               float[] sigmas, float[] sigma_fresh, int[] streams,
               int[] row_offsets=[]) -> Tensor[]
      Many groups in one call: group g has group_sizes[g] members; per-member
      lists hold the members of group 0, then group 1, ...; per-group lists one
      entry per group (row_offsets: one per group, or empty for all 0). CUDA:
      one staging copy and one launch per dtype for all of them (apex
      multi_tensor_apply style); CPU: the same staged jobs, each by the row
      loop under at::parallel_for.
  philox_words(Tensor rows, Tensor cols, int seed, int stream) -> Tensor
      Philox4x32-10((rows, cols, 0, 0), (seed, stream)) as int64 [..., 4]: the
      raw integer stream, for tests.
"""
from __future__ import annotations

import os

import torch

_state: dict = {}


def _build_reason() -> str:
    try:
        from .. import _build_info as bi
        if getattr(bi, "REASON", ""):
            return f" (setup.py: {bi.REASON})"
    except Exception:
        pass
    return ""


CPU_ISAS = ("scalar", "avx2", "avx512")


def load():
    """The extension module, or None; the reason is in `load_error()`."""
    if "mod" in _state:
        return _state["mod"]
    cap = os.environ.get("GROWKERN_CPU_ISA")
    if cap is not None and cap not in CPU_ISAS:  # the extension reads it once, at import
        raise ValueError(f"GROWKERN_CPU_ISA must be one of {', '.join(CPU_ISAS)} (a cap on the CPU "
                         f"kernels' instruction set), got {cap!r}")
    try:
        from .. import _C as mod
    except Exception as e:  # not built, or built against another torch
        _state["mod"] = None
        _state["err"] = (f"growkern._C is not importable: {e}{_build_reason()}; build it with "
                         f"pip install --no-build-isolation -e .")
        return None
    try:
        _register_fakes()
    except Exception as e:  # pragma: no cover - very old torch
        _state["fake_err"] = repr(e)
    _state["mod"] = mod
    _state["err"] = ""
    return mod


def load_error() -> str:
    load()
    return _state.get("err", "")


def cpu_isa() -> tuple[str, str]:
    """(the instruction set the CPU kernels draw normals with, the best this CPU and
    build have), e.g. ("avx512", "avx512"); ("", "") without the extension."""
    mod = load()
    if mod is None:
        return "", ""
    return getattr(mod, "CPU_ISA", "scalar"), getattr(mod, "CPU_ISA_MAX", "scalar")


def with_cuda() -> bool:
    mod = load()
    return bool(mod is not None and getattr(mod, "WITH_CUDA", 0))


def _register_fakes():
    if getattr(torch.library, "register_fake", None) is None:
        return

    if _state.get("fakes"):
        return
    _state["fakes"] = True

    @torch.library.register_fake("growkern::widen_group")
    def _widen_group_fake(srcs, row_src, col_src, row_scales, col_scales, fresh_values, sigmas,
                          sigma_fresh, row_sign, col_sign, noise_col, seed, streams, row_offset=0):
        R = row_src.shape[0]
        shape = (R,) if col_src is None else (R, col_src.shape[0])
        return [s.new_empty(shape) for s in srcs]

    @torch.library.register_fake("growkern::widen_groups")
    def _widen_groups_fake(srcs, group_sizes, row_src, col_src, row_sign, col_sign, noise_col, seeds,
                           row_scales, col_scales, fresh_values, sigmas, sigma_fresh, streams, row_offsets=()):
        outs, k = [], 0
        for g, n in enumerate(group_sizes):
            R = row_src[g].shape[0]
            shape = (R,) if col_src[g] is None else (R, col_src[g].shape[0])
            outs += [s.new_empty(shape) for s in srcs[k:k + n]]
            k += n
        return outs

    @torch.library.register_fake("growkern::philox_words")
    def _philox_words_fake(rows, cols, seed, stream):
        return rows.new_empty((*rows.shape, 4))


def op_args(tensors, group):
    """The widen_group arguments for backend-style (tensors, group)."""
    ms = group.members
    if len(tensors) != len(ms):
        raise ValueError(f"widen: {len(tensors)} tensors for {len(ms)} members")
    two_d = group.col_src is not None
    return ([t.detach() for t in tensors], group.row_src, group.col_src,
            [m.row_scale for m in ms], [m.col_scale for m in ms] if two_d else [],
            [float(m.fresh_value) for m in ms], [float(m.sigma) for m in ms],
            [float(m.sigma_fresh) for m in ms], group.row_sign,
            group.col_sign if two_d else None, group.noise_col if two_d else None,
            int(group.seed), [int(m.stream) for m in ms], int(group.row_offset))


def widen_ext(tensors, group) -> list[torch.Tensor]:
    """The backend function of "cpu" and "cuda": one op call for the whole group."""
    if load() is None:
        raise RuntimeError(load_error())
    return list(torch.ops.growkern.widen_group(*op_args(tensors, group)))


def groups_args(items):
    """The widen_groups arguments for a list of backend-style (tensors, group)."""
    # group_sizes, row_src, col_src, row_sign, col_sign, noise_col, seeds, row_offsets
    per_group = ([], [], [], [], [], [], [], [])
    per_member = ([], [], [], [], [], [], [])  # srcs, row_scales, col_scales, fresh, sigmas, sigma_fresh, streams
    for tensors, group in items:
        (srcs, row_src, col_src, row_scales, col_scales, fresh, sigmas, sigma_fresh, row_sign, col_sign,
         noise_col, seed, streams, row_offset) = op_args(tensors, group)
        for lst, v in zip(per_group, (len(srcs), row_src, col_src, row_sign, col_sign, noise_col, seed,
                                      row_offset)):
            lst.append(v)
        col_scales = col_scales or [None] * len(srcs)
        for lst, vs in zip(per_member, (srcs, row_scales, col_scales, fresh, sigmas, sigma_fresh, streams)):
            lst.extend(vs)
    srcs, row_scales, col_scales, fresh, sigmas, sigma_fresh, streams = per_member
    sizes, row_src, col_src, row_sign, col_sign, noise_col, seeds, row_offsets = per_group
    return (srcs, sizes, row_src, col_src, row_sign, col_sign, noise_col, seeds, row_scales, col_scales,
            fresh, sigmas, sigma_fresh, streams, row_offsets)


def widen_many_ext(items) -> list[list[torch.Tensor]]:
    """The batch form of "cpu" and "cuda": one widen_groups call for all the groups."""
    if load() is None:
        raise RuntimeError(load_error())
    if not items:
        return []
    flat = list(torch.ops.growkern.widen_groups(*groups_args(items)))
    out, k = [], 0
    for tensors, _ in items:
        out.append(flat[k:k + len(tensors)])
        k += len(tensors)
    return out


def philox_words(rows: torch.Tensor, cols: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    if load() is None:
        raise RuntimeError(load_error())
    return torch.ops.growkern.philox_words(rows, cols, seed, stream)


def _on_device(device_type: str, tensors, backend: str):
    if any(t.device.type != device_type for t in tensors):
        other = "backend='cuda'/'triton'/'auto' for GPU ones" if device_type == "cpu" else "backend='cpu'/'auto' for CPU ones"
        raise ValueError(f"the {backend} backend takes {device_type.upper()} tensors; use {other}")


def widen_cpu(tensors, group) -> list[torch.Tensor]:
    """The "cpu" backend: the C++ kernels, CPU tensors only."""
    _on_device("cpu", tensors, "cpu")
    return widen_ext(tensors, group)


def widen_cuda(tensors, group) -> list[torch.Tensor]:
    """The "cuda" backend: the CUDA kernels, CUDA tensors only."""
    _on_device("cuda", tensors, "cuda")
    return widen_ext(tensors, group)


def widen_many_cpu(items) -> list[list[torch.Tensor]]:
    _on_device("cpu", [t for ts, _ in items for t in ts], "cpu")
    return widen_many_ext(items)


def widen_many_cuda(items) -> list[list[torch.Tensor]]:
    _on_device("cuda", [t for ts, _ in items for t in ts], "cuda")
    return widen_many_ext(items)


# growkern._C names this module as the home of its fake implementations
# (set_python_module): importing it registers them when the extension is loaded.
load()
