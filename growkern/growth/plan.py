"""plan_growth: how every parameter of a model grows, before any tensor is touched.

A plan is built from a model's widths and parameter layout (its adapter,
growkern/growth/adapter.py; no tensor values), is deterministic given its seed, and is
what every backend executes. The target widths come from a factor or explicit
targets; the strategy (growkern/growth/strategies.py) picks each dimension's map
(growkern/growth/maps.py) and adjusts each parameter's TensorPlan, whose axes are read
off the maps by the parameter's roles in the adapter's table.

The math is written up in docs/growth.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import mup
from .adapter import EMBEDDING, Adapter, Param, Shape, adapter_for, adapter_for_config
from .maps import Axis, DimMap, GrowthPlan, TensorPlan, query_heads, residual_norm_scale
from .strategies import make_strategy
from .wrappers import unwrap


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

    empty = [k for k, v in c.widths().items() if v < 1]
    if empty:  # e.g. a config of 0 layers or no MLP beside weights that have them: DimMaps need units
        raise ValueError(f"the model's {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} 0 (widths "
                         f"{c.widths()}, {c.n_layer} layers): nothing to grow there; growkern grows models "
                         f"with at least one unit of every width")
    asked = [name for name, v in (("n_head", n_head), ("d_model", d_model), ("d_ff", d_ff)) if v is not None]
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

    widths = {"d_model": (c.d_model, d_model), "d_ff": (c.d_ff, d_ff), "n_head": (c.n_head, n_head)}
    # the targets given first, so a refusal names what was asked for (n_head=3 of 4 heads,
    # not the d_model = 3 x head_dim it implies)
    for name in asked + [k for k in widths if k not in asked]:
        old, new = widths[name]
        if new > MAX_WIDTH:
            raise ValueError(f"target {name}={new:.3g} is beyond any model (at most {MAX_WIDTH:,}); "
                             f"allowed: a factor or target that gives a width a device can hold")
        if new < old and name == "n_head":
            raise ValueError(f"target n_head={new} is fewer heads than the current {old}; growkern only grows "
                             f"(allowed: n_head >= {old}, a multiple of the GQA group size {group}"
                             f"{f', with d_model = n_head x head_dim {hd}' if tied else ''})")
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
    """The model to plan for: a model, or a config an adapter builds (a growkern
    GPTConfig: planned on a meta-device GPT)."""
    if isinstance(target, nn.Module):
        model = unwrap(target)
        return model, adapter_for(model)
    adapter = adapter_for_config(target)
    if adapter is not None:
        return adapter.build_reference(target), adapter
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
    if strat.moment_strategy is not None:
        # the moments follow another strategy's plan of the same growth (its maps and
        # moment rule): structured with moments="mapped" takes exact_copy's
        twin = plan_growth(model, factor=factor, d_model=d_model, d_ff=d_ff, n_head=n_head,
                           strategy=strat.moment_strategy, seed=seed)
        for name, tp in plan.tensors.items():
            tp.moment_plan = twin.tensors[name]
    return plan


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
