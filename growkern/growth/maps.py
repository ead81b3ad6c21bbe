"""The maps of a growth: for every width dimension, which old unit each new unit copies.

The types every plan is made of (growkern/growth/plan.py builds them, the strategies
adjust them, growkern/growth/apply.py hands them to the kernels):

- a DimMap per width dimension (d_model, d_ff, kv_head, head, head_dim): for
  each new unit its source unit (or -1: fresh) and its fan-in split, the
  coefficient applied to the weights that consume the unit;
- a TensorPlan per parameter: the row (output) and column (input) axes of the
  new tensor read off the DimMaps by the parameter's roles (an Axis each), with
  weight scales, noise layout, the moment scales of the exact moment rule, and the
  strategy's choices. A fused tensor's axis is its segments' axes end to end;
- the GrowthPlan: the old and new Shape, the DimMaps and the TensorPlans.

The math is written up in docs/growth.md.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

from .adapter import Shape

DIMS = ("d_model", "d_ff", "kv_head", "head", "head_dim")


def copy_index(src: torch.Tensor) -> torch.Tensor:
    """Per index of a map, its ordinal among the copies of its source (0: the original; -1: fresh)."""
    src = torch.as_tensor(src).long().flatten()
    n = src.numel()
    out = torch.full((n,), -1, dtype=torch.long)
    if n == 0:
        return out
    order = torch.argsort(src, stable=True)  # each source's copies together, in index order
    s = src[order]
    t = torch.arange(n)
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = s[1:] != s[:-1]
    start = torch.cummax(torch.where(first, t, torch.zeros_like(t)), 0).values
    out[order] = torch.where(s >= 0, t - start, torch.full_like(t, -1))
    return out


@dataclass(frozen=True)
class DimMap:
    """How one width dimension grows from `old` units to len(src) units."""
    name: str
    old: int
    src: torch.Tensor  # int64 [new]; -1 = fresh unit
    split: torch.Tensor  # float64 [new]; 1/k for a unit copied k times, 0 for fresh

    @property
    def new(self) -> int:
        return self.src.numel()

    @property
    def counts(self) -> torch.Tensor:
        """Per new unit, how many new units share its source (0 for fresh units)."""
        ok = self.src >= 0
        per_old = torch.bincount(self.src[ok], minlength=self.old)
        return torch.where(ok, per_old[self.src.clamp(min=0)], torch.zeros_like(self.src))

    @property
    def copy_index(self) -> torch.Tensor:
        return copy_index(self.src)

    @property
    def exact_clone(self) -> bool:
        return bool((self.src >= 0).all())

    @staticmethod
    def build(name: str, old: int, new: int, *, copies: bool, remainder: str,
              generator: torch.Generator | None = None) -> "DimMap":
        """Tile the old units k = new // old times when `copies`, else keep them once;
        the units left over are clones of old units picked by the generator
        (remainder="clone") or fresh (remainder="fresh")."""
        k, r = divmod(new, old) if copies else (1, new - old)
        parts = [torch.arange(old).repeat(k)]
        if r:
            if remainder == "clone":
                parts.append(torch.randperm(old, generator=generator)[:r].sort().values)
            else:
                parts.append(torch.full((r,), -1, dtype=torch.long))
        src = torch.cat(parts)
        dm = DimMap(name, old, src, torch.zeros(new, dtype=torch.float64))
        counts = dm.counts
        split = torch.where(counts > 0, 1.0 / counts.clamp(min=1).double(), torch.zeros_like(dm.split))
        return DimMap(name, old, src, split)

    @staticmethod
    def identity(name: str, n: int) -> "DimMap":
        return DimMap(name, n, torch.arange(n), torch.ones(n, dtype=torch.float64))

    def kron(self, inner: "DimMap") -> "DimMap":
        """Axis of (self unit, inner unit) pairs, index = outer * inner.new + inner."""
        so, si = self.src[:, None], inner.src[None, :]
        src = torch.where((so >= 0) & (si >= 0), so * inner.old + si, torch.full_like(so * si, -1))
        split = self.split[:, None] * inner.split[None, :]
        return DimMap(f"{self.name}x{inner.name}", self.old * inner.old, src.flatten(), split.flatten())

    def describe(self) -> str:
        counts = self.counts
        fresh = int((self.src < 0).sum())
        ks = sorted(set(counts[counts > 0].tolist()))
        return (f"{self.name:9s} {self.old:6d} -> {self.new:6d}  copies per unit {ks or '-'}"
                f"  fresh {fresh}")


def query_heads(kv: DimMap, group: int) -> DimMap:
    """Query heads follow their kv head: query head h reads kv head h // group, so a
    copied kv head brings copies of the `group` query heads that read it."""
    g = torch.arange(kv.new * group)
    kv_src = kv.src[g // group]
    src = torch.where(kv_src >= 0, kv_src * group + g % group, torch.full_like(g, -1))
    return DimMap("head", kv.old * group, src, kv.split[g // group].clone())


@dataclass
class Axis:
    """One axis of a new tensor: where each index reads from, and its noise layout."""
    src: torch.Tensor  # int64
    scale: torch.Tensor  # float64, the weight scale (split, norm rescale, ...)
    segments: tuple  # ((dim, role), ...): the dims laid end to end on this axis
    old: int  # length of the old axis
    sign: torch.Tensor | None = None  # float64, 0 = no noise on this index
    noise_idx: torch.Tensor | None = None  # int64, the noise counter of this index

    @property
    def role(self) -> str:
        """The segments' role when they share one ("produce", "consume", "query", "norm",
        "fixed"); "mixed" otherwise (a fused [q | k | v] axis)."""
        roles = {r for _, r in self.segments}
        return roles.pop() if len(roles) == 1 else "mixed"

    @property
    def dim(self) -> str:
        return "+".join(d for d, _ in self.segments)

    def moment_scale(self) -> torch.Tensor:
        """The exact moment rule: an entry copied into units j with weight scales a_j
        gets gradient g / A with A = sum of a_j over its copies (docs/growth.md)."""
        ok = self.src >= 0
        A = torch.zeros(self.old, dtype=torch.float64).index_add_(0, self.src[ok], self.scale[ok])
        a = A[self.src.clamp(min=0)]
        return torch.where(ok & (a != 0), 1.0 / torch.where(a != 0, a, torch.ones_like(a)), torch.zeros_like(a))


@dataclass
class TensorPlan:
    """How one parameter (and its optimizer moments) is rebuilt, in (out, in)
    orientation: a `transposed` parameter is stored as (in, out) and is read and
    written through its transpose."""
    name: str
    old_shape: tuple[int, ...]  # in (out, in) orientation
    rows: Axis
    cols: Axis | None
    init_std: float  # the wide model's init std for this parameter
    kind: str = "matrix"  # "matrix", "bias", "gain", "norm_bias" (growkern.adapter.Param)
    transposed: bool = False
    final_norm: bool = False  # the norm whose output only the LM head reads (Param.final_norm)
    # norms computing x_hat * (gain_offset + w): scales and fresh_value act on the
    # effective gain gain_offset + w (widen_ converts)
    gain_offset: float = 0.0
    fresh_value: float = 0.0
    # noise on entries with a source (times the axis signs) and on fresh entries;
    # "relative": sigma = noise * RMS of the mapped tensor over its non-fresh entries
    # (before noise); "absolute": sigma = noise
    noise: float = 0.0
    noise_fresh: float = 0.0
    noise_mode: str = "relative"
    orthogonalize_fresh_rows: bool = False
    moment_mask_rows: torch.Tensor | None = None  # extra 0/1 factor on the moment scales
    moment_mask_cols: torch.Tensor | None = None
    # the plan whose maps and moment rule the optimizer moments follow when they are not
    # this one's (Strategy.moment_strategy); None: the moments share this plan's maps
    moment_plan: "TensorPlan | None" = None

    @property
    def new_shape(self) -> tuple[int, ...]:
        if self.cols is None:
            return (self.rows.src.numel(),)
        return (self.rows.src.numel(), self.cols.src.numel())

    def stored(self, shape) -> tuple[int, ...]:
        """A shape in (out, in) orientation as the parameter stores it (and back)."""
        return tuple(shape)[::-1] if self.transposed else tuple(shape)

    @property
    def stream(self) -> int:
        """The tensor's noise stream: a stable hash of its name."""
        return zlib.crc32(self.name.encode())

    def moment_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = self.rows.moment_scale()
        cols = None if self.cols is None else self.cols.moment_scale()
        if self.moment_mask_rows is not None:
            rows = rows * self.moment_mask_rows
        if self.moment_mask_cols is not None and cols is not None:
            cols = cols * self.moment_mask_cols
        return rows, cols


@dataclass
class GrowthPlan:
    old: Shape
    new: Shape
    strategy: "object"  # a growkern.growth.strategies.Strategy
    seed: int
    dims: dict[str, DimMap]
    adapter: str = ""  # the name of the adapter the plan was made with
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    exact: bool = True  # whether the plan is function preserving at step 0
    not_exact_because: str = ""
    # muP models (growkern/mup.py): the width multiplier m = d_model / mup_base_width
    # before and after; None for SP models
    width_mult: tuple[float, float] | None = None

    def summary(self) -> str:
        o, n = self.old, self.new
        lines = [
            f"GrowthPlan  model={self.adapter}  strategy={self.strategy.describe()}  seed={self.seed}",
            f"  d_model {o.d_model}->{n.d_model}  d_ff {o.d_ff}->{n.d_ff}  heads {o.n_head}->{n.n_head}"
            f"  kv_heads {o.n_kv_head}->{n.n_kv_head}  head_dim {o.head_dim}->{n.head_dim}",
        ]
        lines += ["  " + dm.describe() for dm in self.dims.values()]
        if self.exact:
            lines.append("  function preserving at step 0: yes")
        else:
            lines.append(f"  function preserving at step 0: no ({self.not_exact_because})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def residual_norm_scale(plan: GrowthPlan) -> float:
    """Norm gains on a residual stream whose old units are copied k times and padded
    with zeros to N units: mean(x^2) shrinks by k n / N, so the gains (and eps) take
    sqrt(k n / N) (resp. k n / N) to give the same output. 1 for pure tiling."""
    dm = plan.dims["d_model"]
    kept = int((dm.src >= 0).sum())
    return math.sqrt(kept / dm.new)
