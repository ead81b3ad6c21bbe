"""Growth plans: for every width dimension, which old unit each new unit copies.

A plan is built from a model's widths and parameter layout (its adapter,
growkern/adapter.py; no tensor values), is deterministic given its seed, and is
what every backend executes. Its parts:

- a DimMap per width dimension (d_model, d_ff, kv_head, head, head_dim): for
  each new unit its source unit (or -1: fresh) and its fan-in split, the
  coefficient applied to the weights that consume the unit;
- a TensorPlan per parameter: the row (output) and column (input) axes of the
  new tensor read off the DimMaps by the parameter's roles, with weight scales,
  noise layout, the moment scales of the exact moment rule, and the strategy's
  choices. A fused tensor's axis is its segments' axes end to end.

The math is written up in docs/growth.md.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import mup
from .adapter import EMBEDDING, Adapter, Param, Shape, adapter_for, adapter_named
from .model import GPTConfig

DIMS = ("d_model", "d_ff", "kv_head", "head", "head_dim")


def copy_index(src: torch.Tensor) -> torch.Tensor:
    """Per index of a map, its ordinal among the copies of its source (0: the original; -1: fresh)."""
    out = [-1] * src.numel()
    seen: dict[int, int] = {}
    for j, s in enumerate(src.tolist()):
        if s >= 0:
            out[j] = seen.get(s, 0)
            seen[s] = out[j] + 1
    return torch.tensor(out, dtype=torch.long)


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

    @property
    def new_shape(self) -> tuple[int, ...]:
        if self.cols is None:
            return (self.rows.src.numel(),)
        return (self.rows.src.numel(), self.cols.src.numel())

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


# --- the plan ------------------------------------------------------------------------


@dataclass
class GrowthPlan:
    old: Shape
    new: Shape
    strategy: "object"  # a growkern.strategies.Strategy
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


# --- targets -----------------------------------------------------------------------

def _target_shape(c: Shape, factor, d_model, d_ff, n_head) -> Shape:
    if factor is None and d_model is None and d_ff is None and n_head is None:
        raise ValueError("plan_growth: give a growth factor (factor=2, ...) or explicit targets "
                         "(d_model=, d_ff=, n_head=)")
    if factor is not None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise ValueError(f"factor must be a finite number >= 1, got {factor!r}")
        if factor < 1:
            raise ValueError(f"factor must be >= 1 (growth only), got {factor}")
    for name, v in (("d_model", d_model), ("d_ff", d_ff), ("n_head", n_head)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")

    group = c.n_head // c.n_kv_head
    hd = c.head_dim
    tied = c.head_dim_tied  # d_model = n_head * head_dim; else head_dim is free (Qwen3, Gemma)
    if n_head is None:
        if d_model is not None and tied:
            if d_model % hd:
                raise ValueError(
                    f"d_model={d_model} is not a multiple of the current head_dim ({hd}); give "
                    f"n_head= too (allowed: d_model divisible by n_head, and n_head a multiple of "
                    f"the GQA group size {group})")
            n_head = d_model // hd
        elif factor is not None:
            n_head = max(1, round(c.n_kv_head * factor)) * group
        else:
            n_head = c.n_head
    if d_model is None:
        if tied:
            d_model = n_head * hd if (factor is not None or n_head != c.n_head) else c.d_model
        else:
            d_model = round(c.d_model * factor) if factor is not None else c.d_model
    if d_ff is None:
        d_ff = round(c.d_ff * factor) if factor is not None else c.d_ff

    for name, old, new in (("d_model", c.d_model, d_model), ("d_ff", c.d_ff, d_ff), ("n_head", c.n_head, n_head)):
        if new > MAX_WIDTH:
            raise ValueError(f"target {name}={new:.3g} is beyond any model (at most {MAX_WIDTH:,}); "
                             f"allowed: a factor or target that gives a width a device can hold")
        if new < old:
            raise ValueError(f"target {name}={new} is smaller than the current {old}; "
                             f"growkern only grows (allowed: {name} >= {old})")
    if (d_model, d_ff, n_head) == (c.d_model, c.d_ff, c.n_head):
        asked = f"factor {factor} leaves" if factor is not None else "the targets leave"
        raise ValueError(f"{asked} every width unchanged (d_model {c.d_model}, d_ff {c.d_ff}, "
                         f"n_head {c.n_head}): nothing to grow; allowed: a factor whose rounded widths "
                         f"grow, or a target larger than the current width")
    if n_head % group:
        raise ValueError(f"n_head={n_head} is not a multiple of the GQA group size {group} "
                         f"(n_head/n_kv_head = {c.n_head}/{c.n_kv_head}); kv heads grow with the same factor")
    if tied:
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}; allowed: "
                             f"d_model a multiple of n_head")
        new_hd = d_model // n_head
    else:
        new_hd = hd
    if new_hd < hd:
        raise ValueError(f"head_dim would shrink from {hd} to {new_hd}; allowed: n_head <= d_model/{hd}")
    if new_hd != hd and not c.head_dim_growth:
        raise ValueError(f"head_dim growth ({hd} -> {new_hd}) is not supported for this model (rotary "
                         f"pairs do not survive it, or attention does not read its scale from head_dim); "
                         f"grow heads at fixed head_dim instead (n_head = d_model / {hd})")
    return c.replace(d_model=d_model, d_ff=d_ff, n_head=n_head, n_kv_head=n_head // group, head_dim=new_hd)


def _model_and_adapter(target) -> tuple[nn.Module, Adapter]:
    """The model to plan for: a model, or a growkern GPTConfig (planned on a meta-device GPT)."""
    if isinstance(target, GPTConfig):
        adapter = adapter_named("growkern.GPT")
        return adapter.build_reference(target), adapter
    if isinstance(target, nn.Module):
        from .widen import unwrap
        model = unwrap(target)
        return model, adapter_for(model)
    raise TypeError(f"plan_growth needs a model (growkern.GPT, a transformers causal LM, or a class "
                    f"registered with growkern.register_adapter) or a growkern.GPTConfig; "
                    f"got {type(target).__name__}")


MAX_WIDTH = 2**24  # 16M units: one d_model x d_ff matrix at this width is already ~1e14 entries


def plan_growth(model, *, factor: float | None = None, d_model: int | None = None,
                d_ff: int | None = None, n_head: int | None = None, strategy="exact_copy",
                seed: int = 0, **strategy_options) -> GrowthPlan:
    """Plan the growth of `model` (any model widen_ grows, or a growkern.GPTConfig).
    `factor` scales d_model, d_ff and the heads together (head_dim fixed); explicit
    targets override. Raises ValueError on anything it cannot plan; plans nothing half-way."""
    from .strategies import make_strategy

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    model, adapter = _model_and_adapter(model)
    strat = make_strategy(strategy, **strategy_options)
    layout = adapter.layout(model)
    old = adapter.shape(model, layout)
    new = _target_shape(old, factor, d_model, d_ff, n_head)
    if adapter.embed_multiplier is not None:
        new = new.replace(embed_multiplier=float(adapter.embed_multiplier(new)))
    gen = torch.Generator().manual_seed(seed)

    group = old.n_head // old.n_kv_head
    dims = {
        "d_model": strat.dim_map("d_model", old.d_model, new.d_model, gen),
        "d_ff": strat.dim_map("d_ff", old.d_ff, new.d_ff, gen),
        "kv_head": strat.dim_map("kv_head", old.n_kv_head, new.n_kv_head, gen),
        "head_dim": strat.dim_map("head_dim", old.head_dim, new.head_dim, gen),
    }
    dims["head"] = query_heads(dims["kv_head"], group)
    plan = GrowthPlan(old, new, strat, seed, dims, adapter=adapter.name)
    config = getattr(model, "config", None)
    if mup.is_mup(config):
        plan.width_mult = (mup.width_mult(config), mup.width_mult(adapter.new_config(config, plan.new)))
    plan.new = strat.adjust_config(plan)
    plan.exact, plan.not_exact_because = strat.preservation(plan)
    # init stds are the wide model's (muP's depend on the width)
    new_config = adapter.new_config(config, plan.new) if config is not None else None
    for name, spec in layout.items():
        tp = _tensor_plan(plan, name, spec, adapter.init_std_of(new_config, name, spec), adapter.gain_offset)
        plan.tensors[name] = strat.tensor_plan(plan, tp)
    return plan


def residual_norm_scale(plan: GrowthPlan) -> float:
    """Norm gains on a residual stream whose old units are copied k times and padded
    with zeros to N units: mean(x^2) shrinks by k n / N, so the gains (and eps) take
    sqrt(k n / N) (resp. k n / N) to give the same output. 1 for pure tiling."""
    dm = plan.dims["d_model"]
    kept = int((dm.src >= 0).sum())
    return math.sqrt(kept / dm.new)


def _segment_map(plan: GrowthPlan, dim: str) -> DimMap:
    dims = plan.dims
    if dim == "vocab":
        return DimMap.identity("vocab", plan.old.vocab_size)
    if dim == "position":
        return DimMap.identity("position", plan.old.n_positions)
    if dim == "q":
        return dims["head"].kron(dims["head_dim"])
    if dim == "kv":
        return dims["kv_head"].kron(dims["head_dim"])
    return dims[dim]


def _segment_scale(plan: GrowthPlan, dm: DimMap, role: str) -> torch.Tensor:
    dims = plan.dims
    if role == "consume":
        return dm.split.clone()
    if role == "query":
        # q.k / sqrt(head_dim) is kept when the q rows of a head_dim unit copied k
        # times take sqrt(hd_new / hd_old) / k (docs/growth.md, attention).
        hd = dims["head_dim"]
        return (math.sqrt(hd.new / hd.old) * hd.split).repeat(dims["head"].new)
    if role == "norm":
        return torch.full((dm.new,), residual_norm_scale(plan), dtype=torch.float64)
    return torch.ones(dm.new, dtype=torch.float64)


def _axis(plan: GrowthPlan, segments) -> Axis:
    """The segments' axes end to end: source indices shift by the old lengths before them."""
    srcs, scales, old = [], [], 0
    for dim, role in segments:
        dm = _segment_map(plan, dim)
        srcs.append(torch.where(dm.src >= 0, dm.src + old, dm.src))
        scales.append(_segment_scale(plan, dm, role))
        old += dm.old
    return Axis(torch.cat(srcs), torch.cat(scales), tuple(segments), old)


def _tensor_plan(plan: GrowthPlan, name: str, spec: Param, init_std: float, gain_offset: float) -> TensorPlan:
    rows = _axis(plan, spec.rows)
    cols = None if spec.cols is None else _axis(plan, spec.cols)
    old_shape = (rows.old,) if cols is None else (rows.old, cols.old)
    tp = TensorPlan(name, old_shape, rows, cols, init_std, kind=spec.kind, transposed=spec.transposed,
                    final_norm=spec.final_norm, gain_offset=gain_offset if spec.kind == "gain" else 0.0)
    if spec.kind == "gain" and rows.role == "norm":
        tp.fresh_value = residual_norm_scale(plan)
    elif spec.kind == "gain":
        tp.fresh_value = 1.0
    # The residual stream starts as multiplier * embedding row (Gemma: sqrt(d_model)).
    # The embedding's produce axis takes m_old / m_new so the stream starts the same.
    ratio = plan.old.embed_multiplier / plan.new.embed_multiplier
    if spec == EMBEDDING:
        cols.scale = cols.scale * ratio
    if spec.final_norm and plan.old.tie_embeddings:
        # Tied embeddings: the d_model axis of the embedding both produces the residual
        # (no split) and is read by the head (needs the split, and undoes the ratio above).
        # Both move into the final norm, whose output only the head reads.
        rows.scale = rows.scale * plan.dims["d_model"].split / ratio
    if plan.width_mult is not None:
        # muP: the logits are multiplied by 1/m, which growth changes to 1/m'. What feeds
        # them takes m'/m so the logits stay the same: the untied head's fan-in, or with
        # tied embeddings the final norm (as for the embedding multiplier above).
        out = plan.width_mult[1] / plan.width_mult[0]
        if mup.param_kind(spec) == "output":
            cols.scale = cols.scale * out
        elif spec.final_norm and plan.old.tie_embeddings:
            rows.scale = rows.scale * out
    return tp
