"""Growth plans: for every width dimension, which old unit each new unit copies.

A plan is built from a config alone (no tensors), is deterministic given its
seed, and is what every backend executes. Its parts:

- a DimMap per width dimension (d_model, d_ff, kv_head, head, head_dim): for
  each new unit its source unit (or -1: fresh) and its fan-in split, the
  coefficient applied to the weights that consume the unit;
- a TensorPlan per parameter: the row and column axes of the new tensor read
  off the DimMaps by the parameter's role, with weight scales, noise layout,
  the moment scales of the exact moment rule, and the strategy's choices.

The math is written up in docs/growth.md.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

from .model import GPTConfig, init_std, is_norm_gain

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
    role: str  # "produce", "consume", "query", "norm", "fixed"
    dim: str  # the width dimension, or "vocab"/"position"
    old: int  # length of the old axis
    sign: torch.Tensor | None = None  # float64, 0 = no noise on this index
    noise_idx: torch.Tensor | None = None  # int64, the noise counter of this index

    def moment_scale(self) -> torch.Tensor:
        """The exact moment rule: an entry copied into units j with weight scales a_j
        gets gradient g / A with A = sum of a_j over its copies (docs/growth.md)."""
        ok = self.src >= 0
        A = torch.zeros(self.old, dtype=torch.float64).index_add_(0, self.src[ok], self.scale[ok])
        a = A[self.src.clamp(min=0)]
        return torch.where(ok & (a != 0), 1.0 / torch.where(a != 0, a, torch.ones_like(a)), torch.zeros_like(a))


@dataclass
class TensorPlan:
    """How one parameter (and its optimizer moments) is rebuilt."""
    name: str
    old_shape: tuple[int, ...]
    rows: Axis
    cols: Axis | None
    init_std: float  # the wide model's init std for this parameter
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


# --- the parameters of growkern.GPT and the axes they sit on -----------------------

def parameter_layout(config: GPTConfig) -> dict[str, tuple[tuple[str, str], tuple[str, str] | None]]:
    """name -> ((row dim, role), (col dim, role) or None), for every parameter of GPT(config).
    Roles: "produce" writes the units of its dim, "consume" reads them (fan-in, split),
    "norm" is a norm's gain or bias, "query" the rows of q_proj, "fixed" an axis that
    does not grow."""
    c = config
    lay: dict = {"wte.weight": (("vocab", "fixed"), ("d_model", "produce"))}
    if c.pos == "learned":
        lay["wpe.weight"] = (("position", "fixed"), ("d_model", "produce"))

    def linear(name, out_dim, out_role, in_dim):
        lay[f"{name}.weight"] = ((out_dim, out_role), (in_dim, "consume"))
        if c.bias:
            lay[f"{name}.bias"] = ((out_dim, out_role), None)

    def norm(name):
        lay[f"{name}.weight"] = (("d_model", "norm"), None)
        if c.bias and c.norm == "layernorm":
            lay[f"{name}.bias"] = (("d_model", "norm"), None)

    for i in range(c.n_layer):
        b = f"blocks.{i}"
        norm(f"{b}.ln_1")
        linear(f"{b}.attn.q_proj", "q", "query", "d_model")
        linear(f"{b}.attn.k_proj", "kv", "produce", "d_model")
        linear(f"{b}.attn.v_proj", "kv", "produce", "d_model")
        linear(f"{b}.attn.o_proj", "d_model", "produce", "q")
        norm(f"{b}.ln_2")
        if c.mlp == "swiglu":
            linear(f"{b}.mlp.gate", "d_ff", "produce", "d_model")
        linear(f"{b}.mlp.up", "d_ff", "produce", "d_model")
        linear(f"{b}.mlp.down", "d_model", "produce", "d_ff")
    norm("ln_f")
    if not c.tie_embeddings:
        lay["lm_head.weight"] = (("vocab", "fixed"), ("d_model", "consume"))
    return lay


@dataclass
class GrowthPlan:
    old: GPTConfig
    new: GPTConfig
    strategy: "object"  # a growkern.strategies.Strategy
    seed: int
    dims: dict[str, DimMap]
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    exact: bool = True  # whether the plan is function preserving at step 0
    not_exact_because: str = ""

    def summary(self) -> str:
        o, n = self.old, self.new
        lines = [
            f"GrowthPlan  strategy={self.strategy.describe()}  seed={self.seed}",
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

def _target_config(config: GPTConfig, factor, d_model, d_ff, n_head) -> GPTConfig:
    c = config
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
    if n_head is None:
        if d_model is not None:
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
        d_model = n_head * hd if (factor is not None or n_head != c.n_head) else c.d_model
    if d_ff is None:
        d_ff = round(c.d_ff * factor) if factor is not None else c.d_ff

    for name, old, new in (("d_model", c.d_model, d_model), ("d_ff", c.d_ff, d_ff), ("n_head", c.n_head, n_head)):
        if new < old:
            raise ValueError(f"target {name}={new} is smaller than the current {old}; "
                             f"growkern only grows (allowed: {name} >= {old})")
    if d_model % n_head:
        raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}; allowed: "
                         f"d_model a multiple of n_head")
    if n_head % group:
        raise ValueError(f"n_head={n_head} is not a multiple of the GQA group size {group} "
                         f"(n_head/n_kv_head = {c.n_head}/{c.n_kv_head}); kv heads grow with the same factor")
    new_hd = d_model // n_head
    if new_hd < hd:
        raise ValueError(f"head_dim would shrink from {hd} to {new_hd}; allowed: n_head <= d_model/{hd}")
    if new_hd != hd and c.pos == "rope":
        raise ValueError(f"head_dim growth ({hd} -> {new_hd}) is not supported with pos='rope' "
                         f"(rotary pairs do not survive it); grow heads at fixed head_dim instead "
                         f"(n_head = d_model / {hd}), or use pos='learned'")
    return c.replace(d_model=d_model, d_ff=d_ff, n_head=n_head, n_kv_head=n_head // group)


def plan_growth(config: GPTConfig, *, factor: float | None = None, d_model: int | None = None,
                d_ff: int | None = None, n_head: int | None = None, strategy="exact_copy",
                seed: int = 0, **strategy_options) -> GrowthPlan:
    """Plan the growth of a GPTConfig. `factor` scales d_model, d_ff and the heads
    together (head_dim fixed); explicit targets override. Raises ValueError on
    anything it cannot plan; plans nothing half-way."""
    from .strategies import make_strategy

    if not isinstance(config, GPTConfig):
        raise TypeError(f"plan_growth needs a growkern.GPTConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    strat = make_strategy(strategy, **strategy_options)
    new = _target_config(config, factor, d_model, d_ff, n_head)
    gen = torch.Generator().manual_seed(seed)

    group = config.n_head // config.n_kv_head
    dims = {
        "d_model": strat.dim_map("d_model", config.d_model, new.d_model, gen),
        "d_ff": strat.dim_map("d_ff", config.d_ff, new.d_ff, gen),
        "kv_head": strat.dim_map("kv_head", config.n_kv_head, new.n_kv_head, gen),
        "head_dim": strat.dim_map("head_dim", config.head_dim, new.head_dim, gen),
    }
    dims["head"] = query_heads(dims["kv_head"], group)
    plan = GrowthPlan(config, new, strat, seed, dims)
    plan.new = strat.adjust_config(plan)
    plan.exact, plan.not_exact_because = strat.preservation(plan)
    for name, (row, col) in parameter_layout(config).items():
        tp = _tensor_plan(plan, name, row, col)
        plan.tensors[name] = strat.tensor_plan(plan, tp)
    return plan


def residual_norm_scale(plan: GrowthPlan) -> float:
    """Norm gains on a residual stream whose old units are copied k times and padded
    with zeros to N units: mean(x^2) shrinks by k n / N, so the gains (and eps) take
    sqrt(k n / N) (resp. k n / N) to give the same output. 1 for pure tiling."""
    dm = plan.dims["d_model"]
    kept = int((dm.src >= 0).sum())
    return math.sqrt(kept / dm.new)


def _axis(plan: GrowthPlan, dim: str, role: str) -> Axis:
    dims = plan.dims
    if dim == "vocab":
        dm = DimMap.identity("vocab", plan.old.vocab_size)
    elif dim == "position":
        dm = DimMap.identity("position", plan.old.block_size)
    elif dim == "q":
        dm = dims["head"].kron(dims["head_dim"])
    elif dim == "kv":
        dm = dims["kv_head"].kron(dims["head_dim"])
    else:
        dm = dims[dim]
    ones = torch.ones(dm.new, dtype=torch.float64)
    if role == "consume":
        scale = dm.split.clone()
    elif role == "query":
        # q.k / sqrt(head_dim) is kept when the q rows of a head_dim unit copied k
        # times take sqrt(hd_new / hd_old) / k (docs/growth.md, attention).
        hd = dims["head_dim"]
        per_dim = math.sqrt(hd.new / hd.old) * hd.split
        scale = per_dim.repeat(dims["head"].new)
    elif role == "norm":
        scale = ones * residual_norm_scale(plan)
    else:
        scale = ones
    return Axis(dm.src.clone(), scale, role, dim, dm.old)


def _tensor_plan(plan: GrowthPlan, name: str, row, col) -> TensorPlan:
    rows = _axis(plan, *row)
    cols = None if col is None else _axis(plan, *col)
    old_shape = (rows.old,) if cols is None else (rows.old, cols.old)
    tp = TensorPlan(name, old_shape, rows, cols, init_std(name, plan.new))
    if is_norm_gain(name):
        tp.fresh_value = residual_norm_scale(plan)
    if name.startswith("ln_f.") and plan.old.tie_embeddings:
        # Tied embeddings: the d_model axis of wte both produces the residual (no
        # split) and is read by the head (needs the split). The split moves into
        # the final norm, whose output only the head reads.
        rows.scale = rows.scale * plan.dims["d_model"].split
    return tp
