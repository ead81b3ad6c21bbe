"""Growth strategies: each a small named unit deciding how new units are made.

A strategy answers four questions for a plan (growkern/growth/maps.py):
- dim_map: which old unit each new unit of a dimension copies, or that it is fresh;
- tensor_plan: per parameter, the noise and any extra scaling;
- moments: how optimizer moments are carried ("exact": the moment rule,
  "asym": the rule for original units and zero for their copies, "keep": moments
  of kept entries unchanged, "zero": all zero), and whether the step count resets;
- default_schedule: the widen_ schedule used when none is given ("continue", or
  "restart" for a strategy that starts a new training run);
- preservation: whether the plan is function preserving at step 0, and if not why.

Register your own with `growkern.register_strategy(MyStrategy)`.
"""
from __future__ import annotations

import inspect
import math

import torch

from . import mup
from .maps import DimMap, GrowthPlan, TensorPlan, copy_index, residual_norm_scale

_REGISTRY: dict[str, type["Strategy"]] = {}


def register_strategy(cls: type["Strategy"]) -> type["Strategy"]:
    """Register a Strategy subclass under its `name` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"register_strategy needs a Strategy subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty string")
    _REGISTRY[cls.name] = cls
    return cls


def strategies() -> list[str]:
    return sorted(_REGISTRY)


def make_strategy(strategy, **options) -> "Strategy":
    if isinstance(strategy, Strategy):
        if options:
            raise ValueError("pass options to the Strategy's constructor, not with an instance")
        return strategy
    if strategy not in _REGISTRY:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(strategies())}")
    cls = _REGISTRY[strategy]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "options")]
    for k in options:
        if k not in allowed:
            raise ValueError(f"strategy {strategy!r} has no option {k!r}; allowed: {allowed or 'none'}")
    return cls(**options)


def first_copies(src: torch.Tensor) -> torch.Tensor:
    """1.0 where an index is the first occurrence of its source, 0.0 for later copies and fresh."""
    return (copy_index(src) == 0).double()


def antithetic(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise signs and counters for the copies of each source: copies (0, 1), (2, 3), ...
    share one draw with signs +1/-1, an odd last copy gets none, so the sum over the
    copies of every source is unchanged. Fresh indices get sign 0 and their own counter."""
    src = torch.as_tensor(src).long().flatten()
    n = src.numel()
    idx = torch.arange(n)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64), idx
    c = copy_index(src)
    kept = src >= 0
    copies = torch.zeros(n, dtype=torch.long)
    copies[kept] = torch.bincount(src[kept])[src[kept]]  # how many copies each index's source has
    paired = kept & (c < 2 * (copies // 2))  # an odd last copy draws nothing
    sign = torch.where(paired, 1.0 - 2.0 * (c % 2).double(), torch.zeros(n, dtype=torch.float64))
    order = torch.argsort(src, stable=True)  # the partner of copy 2i+1 is copy 2i, just before it
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    second = (paired & (c % 2 == 1)).nonzero().squeeze(1)
    idx[second] = order[rank[second] - 1]
    return sign, idx


class Strategy:
    """Base: exact symmetric clones. Subclasses override what differs."""
    name = "base"
    preserving = True
    moments = "exact"
    reset_step = False
    rescale_norms = True  # rescale norm gains and eps for zero-padded residual units
    default_schedule = "continue"  # widen_'s schedule when none is given
    # another strategy whose maps and moment rule the optimizer moments follow instead of
    # this one's (structured, moments="mapped": exact_copy's); None: this strategy's
    moment_strategy: str | None = None

    def __init__(self):
        pass

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}({opts})" if opts else self.name

    def options(self) -> dict:
        return {}

    def dim_map(self, dim: str, old: int, new: int, generator) -> DimMap:
        # The residual stream pads with fresh zero units beyond the largest uniform
        # tiling, so norms see the same statistics (exact for RMSNorm); every other
        # dimension gives its remainder to extra clones of seeded-random old units.
        remainder = "fresh" if dim == "d_model" else "clone"
        return DimMap.build(dim, old, new, copies=True, remainder=remainder, generator=generator)

    def adjust_config(self, plan: GrowthPlan):
        if not self.rescale_norms:
            return plan.new
        return plan.new.replace(norm_eps=plan.old.norm_eps * residual_norm_scale(plan) ** 2)

    def preservation(self, plan: GrowthPlan) -> tuple[bool, str]:
        if not self.preserving:
            return False, f"strategy {self.name} does not preserve the function"
        if plan.old.norm == "layernorm" and not plan.dims["d_model"].exact_clone:
            return False, ("LayerNorm over a zero-padded residual stream (d_model growth that is "
                           "not a whole multiple, or non-clone residual units) changes the mean; "
                           "RMSNorm is exact")
        if plan.old.eps_fixed_because and plan.new.norm_eps != plan.old.norm_eps:
            return False, (f"RMSNorm over a zero-padded residual stream needs its eps rescaled, but "
                           f"{plan.old.eps_fixed_because} (the error is of the order of eps)")
        return True, ""

    def tensor_plan(self, plan: GrowthPlan, tp: TensorPlan) -> TensorPlan:
        return tp


@register_strategy
class ExactCopy(Strategy):
    """Symmetric clones, fan-in split 1/k, moments by the exact rule."""
    name = "exact_copy"


@register_strategy
class Perturb(Strategy):
    """exact_copy plus symmetry-breaking noise. preserving=True: antithetic noise on the
    fan-in copies (+e on one copy, -e on its partner) and on the fan-out of zero-valued
    fresh units; preserving=False: independent noise on every entry of every matrix.
    sigma = noise * RMS of the mapped matrix over its non-fresh entries."""
    name = "perturb"

    def __init__(self, noise: float = 0.01, preserving: bool = True):
        super().__init__()
        if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
            raise ValueError(f"perturb: noise must be a finite number >= 0, got {noise!r}")
        if not isinstance(preserving, bool):
            raise ValueError(f"perturb: preserving must be True or False, got {preserving!r}")
        self.noise, self.preserving = float(noise), preserving

    def options(self):
        return {"noise": self.noise, "preserving": self.preserving}

    def tensor_plan(self, plan, tp):
        if tp.cols is None:
            return tp
        rows, cols = tp.rows, tp.cols
        rows.sign = torch.ones(rows.src.numel(), dtype=torch.float64)
        if self.preserving:
            if cols.role != "consume":
                return tp
            cols.sign, cols.noise_idx = antithetic(cols.src)
            # fresh columns read zero-valued units: noise there keeps the function
            if bool((cols.src < 0).any()) and bool((rows.src >= 0).all()):
                tp.noise_fresh = self.noise
        else:
            cols.sign = torch.ones(cols.src.numel(), dtype=torch.float64)
            tp.noise_fresh = self.noise
        tp.noise = self.noise
        return tp


@register_strategy
class AsymReset(Strategy):
    """exact_copy weights; moments kept (by the exact rule) for the original unit and
    zeroed for its copies, or zeroed everywhere with zero_all=True."""
    name = "asym_reset"

    def __init__(self, zero_all: bool = False):
        super().__init__()
        if not isinstance(zero_all, bool):
            raise ValueError(f"asym_reset: zero_all must be True or False, got {zero_all!r}")
        self.zero_all = zero_all
        self.moments = "zero" if zero_all else "asym"

    def options(self):
        return {"zero_all": self.zero_all}

    def tensor_plan(self, plan, tp):
        tp.moment_mask_rows = first_copies(tp.rows.src)
        if tp.cols is not None:
            tp.moment_mask_cols = first_copies(tp.cols.src)
        return tp


# which (dim, role) axes hold the fan-in weights of a unit, for non-clone strategies
_FAN_IN = {("d_ff", "produce"), ("kv", "produce"), ("q", "query")}


@register_strategy
class Structured(Strategy):
    """Non-clone units. New d_ff units and heads: fan-in rows random, orthogonal to the
    span of the old units' fan-in rows and scaled to their RMS; fan-out zero. New
    residual (d_model) units: fan-in zero, fan-out random (they read zero, so the
    function is kept), norms rescaled. head_dim grows by cloning. moments="zero" (the
    default): new units' moments are zero, old units' kept; moments="mapped": every
    moment is what exact_copy maps it to (the clone map and its exact moment rule), so
    the weights alone differ from exact_copy's (an ablation of where structured's
    advantage comes from)."""
    name = "structured"

    def __init__(self, moments: str = "zero"):
        super().__init__()
        if moments not in ("zero", "mapped"):
            raise ValueError(f"structured: moments must be 'zero' or 'mapped', got {moments!r}")
        self.moment_init = moments
        self.moment_strategy = "exact_copy" if moments == "mapped" else None

    def options(self):
        return {"moments": self.moment_init}

    def dim_map(self, dim, old, new, generator):
        if dim == "head_dim":
            return super().dim_map(dim, old, new, generator)
        return DimMap.build(dim, old, new, copies=False, remainder="fresh")

    def tensor_plan(self, plan, tp):
        if tp.cols is None:
            return tp
        fresh_fan_in = any(seg in _FAN_IN for seg in tp.rows.segments) and bool((tp.rows.src < 0).any())
        fresh_fan_out = tp.cols.role == "consume" and tp.cols.dim == "d_model" and bool((tp.cols.src < 0).any())
        if fresh_fan_in or fresh_fan_out:
            tp.rows.sign = torch.zeros(tp.rows.src.numel(), dtype=torch.float64)
            tp.cols.sign = torch.zeros(tp.cols.src.numel(), dtype=torch.float64)
            tp.noise_fresh = 1.0
            tp.orthogonalize_fresh_rows = fresh_fan_in
        return tp


@register_strategy
class ShrinkZeroPadPerturb(Strategy):
    """Shrink, zero-pad, perturb, and start a new training run (the default,
    shrink="mup"): kept entries times the muP factor of their tensor (growkern.mup.
    szp_shrink: d_old/d_new for hidden matrices and the readout, 1 for embeddings,
    biases and gains), new entries zero plus N(0, std^2) with the muP init std at the
    new width (growkern.mup.szp_init_std); optimizer moments zero, AdamW's step 0, and
    widen_'s schedule "restart" unless another is given. An SP model takes the muP
    factors with base width = its old d_model.

    shrink=<number> is the earlier operator: every non-gain entry times `shrink`, then
    N(0, init_std^2) noise on every matrix entry at the wide model's init std; with
    carry_state=True the moments of kept entries and the step are carried and the
    schedule continues (szp(shrink=0.5, carry_state=True) is szp before muP).
    Norm gains are kept (new ones 1). Not function preserving."""
    name = "szp"
    preserving = False
    rescale_norms = False

    def __init__(self, shrink="mup", carry_state: bool = False):
        super().__init__()
        if not (shrink == "mup" or (isinstance(shrink, (int, float)) and not isinstance(shrink, bool)
                                    and 0 <= shrink <= 1)):
            raise ValueError(f"szp: shrink must be 'mup' or a number in [0, 1], got {shrink!r}")
        if not isinstance(carry_state, bool):
            raise ValueError(f"szp: carry_state must be True or False, got {carry_state!r}")
        self.shrink = shrink if shrink == "mup" else float(shrink)
        self.carry_state = carry_state
        self.moments = "keep" if carry_state else "zero"
        self.reset_step = not carry_state
        self.default_schedule = "continue" if carry_state else "restart"

    def options(self):
        return {"shrink": self.shrink, "carry_state": self.carry_state}

    def dim_map(self, dim, old, new, generator):
        return DimMap.build(dim, old, new, copies=False, remainder="fresh")

    def preservation(self, plan):
        return False, "szp shrinks and perturbs the weights"

    def tensor_plan(self, plan, tp):
        if self.shrink != "mup":
            return self._fixed_shrink(tp)
        d_old, d_new = plan.old.d_model, plan.new.d_model
        multiplier_form = plan.width_mult is not None  # a muP model: logits times 1/m
        if tp.kind in ("gain", "norm_bias"):
            f = 1.0
            if tp.final_norm and plan.old.tie_embeddings:
                # the tied head reads only the final norm: the readout's factor goes there,
                # with the embedding multiplier's compensation (Gemma; docs/growth.md)
                f = (mup.szp_shrink("output", d_old, d_new, multiplier_form)
                     * plan.new.embed_multiplier / plan.old.embed_multiplier)
            tp.rows.scale = torch.full_like(tp.rows.scale, f)
            tp.fresh_value = f if tp.kind == "gain" else 0.0
            return tp
        kind = mup.classify(tp.kind, tp.rows.segments, None if tp.cols is None else tp.cols.segments)
        if kind == "output":  # drop exact_copy's logit compensation: the readout shrinks
            tp.cols.scale = (tp.cols.src >= 0).double()
        tp.rows.scale = tp.rows.scale * mup.szp_shrink(kind, d_old, d_new, multiplier_form)
        if tp.cols is not None:
            tp.noise = 0.0
            tp.noise_fresh = mup.szp_init_std(kind, tp.init_std, d_old, d_new, multiplier_form)
            tp.noise_mode = "absolute"
        return tp

    def _fixed_shrink(self, tp):
        if tp.kind in ("gain", "norm_bias"):
            tp.rows.scale = torch.ones_like(tp.rows.scale)
            tp.fresh_value = 1.0 if tp.kind == "gain" else 0.0
            return tp
        tp.rows.scale = tp.rows.scale * self.shrink
        if tp.cols is not None:
            tp.rows.sign = torch.ones(tp.rows.src.numel(), dtype=torch.float64)
            tp.cols.sign = torch.ones(tp.cols.src.numel(), dtype=torch.float64)
            tp.noise = tp.noise_fresh = tp.init_std
            tp.noise_mode = "absolute"
        return tp


@register_strategy
class Scratch(Strategy):
    """A fresh init of the wide model (N(0, init_std^2) from the growth's noise stream,
    biases 0, norm gains 1), zero moments, step reset: the baseline."""
    name = "scratch"
    preserving = False
    moments = "zero"
    reset_step = True
    rescale_norms = False

    def dim_map(self, dim, old, new, generator):
        return DimMap(dim, old, torch.full((new,), -1, dtype=torch.long), torch.zeros(new, dtype=torch.float64))

    def preservation(self, plan):
        return False, "scratch is a fresh initialization"

    def tensor_plan(self, plan, tp):
        # every axis is fresh, vocab and position included
        tp.rows.src = torch.full_like(tp.rows.src, -1)
        if tp.cols is not None:
            tp.cols.src = torch.full_like(tp.cols.src, -1)
            tp.noise_fresh = tp.init_std
            tp.noise_mode = "absolute"
        tp.fresh_value = 1.0 if tp.kind == "gain" else 0.0
        return tp
