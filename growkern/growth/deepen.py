"""deepen_: grow a model in depth in place, with its optimizer state and LR schedule.

The data path mirrors widen_'s: plan_depth (depth.py) says where each block of the
grown model comes from; everything is validated, the model class is built from the
old and the new config on the meta device, and every new block is built before
anything changes; then the blocks are put in order in the same nn.ModuleList, their
parameters join the optimizer in their sources' param groups, and the adapter brings
the config and everything derived from it (layer indices, per-layer attention kinds,
GPT-2's per-layer attention scale) up to date from the two builds.

Moment rule (docs/growth.md, "Depth"): a copied tensor takes a copy of its source's
optimizer state (moments and step): it is the source's weight at the same point of
training, so the source's gradient statistics are the best estimate of its own. A
tensor set to zero (identity's residual outputs) or drawn afresh (fresh) starts with
no optimizer state, as any new parameter: its source's moments describe a weight it
no longer is, and kept beside a large step count they would make its first updates
up to 1/sqrt(1 - beta2) times too large.
"""
from __future__ import annotations

import copy
import time
import zlib

import torch
import torch.nn as nn

from . import checks
from .adapter import Adapter, adapter_for
from .depth import FRESH, KEEP, ZERO_OUT, DepthPlan, plan_depth
from .placement import Sharded, placement_for
from .probe import check_probe, preservation, probe_logits
from .schedule import apply_schedule, check_restartable
from .widen import GrowthReport, _num_params
from .wrappers import unwrap, unwrap_optimizer, unwrap_scheduler


def deepen_(model, optimizer=None, scheduler=None, *, n_layer: int | None = None, factor: float | None = None,
            strategy: str = "identity", positions=None, seed: int = 0, probe_batch=None,
            schedule: str = "continue", rewarm_steps: int | None = None, backend: str = "auto") -> GrowthReport:
    """Grow `model` in depth in place, with its optimizer state and LR schedule. A
    DistributedDataParallel model grows on every rank (a collective, as widen_: each rank
    calls it with the same arguments between optimizer steps) and its Reducer is rebuilt
    over the new parameter list; FSDP2 models are refused for now.

    `model`: any model widen_ grows (growkern.GPT, the Hugging Face families, registered
    adapters). `n_layer` (or `factor` x the current depth) is the new number of blocks;
    `strategy` one of identity, fresh (function preserving), interleave, stack, upscale
    (growkern/growth/depth.py, docs/growth.md); `positions` the old blocks after which
    identity, fresh and interleave put their new blocks (default: spread evenly); `seed`
    draws fresh's blocks. The old blocks stay the same modules and nn.Parameter objects;
    new parameters join the optimizer in their sources' param groups (each group's
    parameters then in the model's order, as an optimizer built afresh from the grown
    model holds them), with the moment rule of this module's docstring. `schedule`:
    "continue", "rewarm" (over rewarm_steps) or "restart", as in widen_. `backend` is
    accepted for symmetry with widen_: depth growth copies whole tensors, which torch's
    copy does at the memory's speed. Raises ValueError/TypeError/MemoryError, with
    nothing changed, on anything it cannot do."""
    t0 = time.perf_counter()
    placement = placement_for(model)  # one process, or DDP replicas (every rank grows the same way)
    if isinstance(placement, Sharded):
        raise TypeError("deepen_ cannot yet grow an FSDP2 (fully_shard) model in place: the new blocks would "
                        "need their own fully_shard. Grow the checkpoint (growkern grow --n-layer), or the "
                        "model before sharding it")
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"deepen_ grows a torch.nn.Module; got {type(model).__name__}")
    adapter = adapter_for(model)
    optimizer, scheduler = unwrap_optimizer(optimizer), unwrap_scheduler(scheduler)
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch' for depth growth (whole tensors are copied), "
                         f"got {backend!r}")
    path, layers = find_layers(model, adapter)
    key = adapter.config_keys.get("n_layer")
    if key is None:
        raise ValueError(f"adapter {adapter.name!r} names no config key for the number of layers "
                         f"(config_keys['n_layer']); deepen_ needs it to write the new depth")
    if getattr(model.config, key, None) != len(layers):
        raise ValueError(f"config.{key} is {getattr(model.config, key, None)!r} but {path} holds {len(layers)} "
                         f"blocks; the model must be what its config describes")
    plan = plan_depth(len(layers), n_layer=n_layer, factor=factor, strategy=strategy, positions=positions,
                      seed=seed)

    # --- everything is checked before anything changes ---
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            raise ValueError(f"parameter {name} is on the meta device (no values to grow); "
                             f"load or materialize the model first")
    checks.validate_training_state(model, optimizer, scheduler, schedule, rewarm_steps, op="deepen_")
    placement.check(model, None)
    if schedule == "restart":
        check_restartable(scheduler)
    new_config = new_depth_config(adapter, model.config, plan)
    ref_old = adapter.build_reference(model.config, like=model)
    ref_new = adapter.build_reference(new_config, like=model)
    check_references(model, path, plan, ref_old, ref_new)
    new_bytes = check_memory(model, layers, optimizer, plan)
    device = next(model.parameters()).device
    shape = adapter.shape(model)
    if probe_batch is not None:
        check_probe(probe_batch, shape, device)
        small_logits, probe_y = probe_logits(model, probe_batch)
    params_before = _num_params(model)
    # the new blocks, built aside: a failure here leaves the model as it was
    blocks = [layers[s] if kind == KEEP else new_block(layers[s], kind, j, plan, adapter, path, new_config)
              for j, (s, kind) in enumerate(zip(plan.sources, plan.kinds))]

    # --- from here on, state changes ---
    placement.release()
    if optimizer is not None:
        join_optimizer(optimizer, layers, blocks, plan, adapter, path)
    rescale_queries(blocks, plan, adapter, path, shape, model.config, new_config, optimizer)
    layers._modules.clear()
    for j, block in enumerate(blocks):
        layers._modules[str(j)] = block
    if optimizer is not None:
        model_order(optimizer, model)
    apply_depth_config(adapter, model, new_config, plan)
    adapter.sync(model, ref_old, ref_new, old_name=lambda name: _source_name(name, path, plan))
    notes = [f"blocks {plan.describe()} (old index of each; c copy, z residual outputs zero, f fresh)"]
    notes += placement.finish(model)  # DDP: a Reducer over the new parameter list
    notes += apply_schedule(optimizer, scheduler, None, new_config, schedule, rewarm_steps)
    if not plan.exact:
        notes.append(f"not function preserving at step 0: {plan.strategy} puts copies of trained blocks "
                     f"into the residual stream")
    report = GrowthReport(
        strategy=plan.strategy, backend="torch", dims_before={"n_layer": plan.old},
        dims_after={"n_layer": plan.new}, params_before=params_before, params_after=_num_params(model),
        bytes_allocated=new_bytes, seconds=time.perf_counter() - t0, exact=plan.exact, notes=notes,
        operation="deepen_")
    if probe_batch is not None:
        deep_logits, _ = probe_logits(model, probe_batch)
        report.preservation = preservation(small_logits, deep_logits, probe_y)
    return report


# --- where the blocks are -----------------------------------------------------------------


def find_layers(model: nn.Module, adapter: Adapter) -> tuple[str, nn.ModuleList]:
    """The dotted path and the nn.ModuleList of the model's blocks: adapter.layers, or the
    one prefix of every "<prefix>.<index>.<rest>" parameter name."""
    path = adapter.layers
    if path is None:
        prefixes = set()
        for name, _ in model.named_parameters():
            parts = name.split(".")
            for i, part in enumerate(parts[:-1]):
                if part.isdigit():
                    prefixes.add(".".join(parts[:i]))
                    break
        if len(prefixes) != 1:
            raise ValueError(f"cannot tell which module holds {type(model).__name__}'s blocks (indexed parameter "
                             f"prefixes: {sorted(prefixes) or 'none'}); set Adapter.layers to its path")
        path = prefixes.pop()
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"adapter {adapter.name!r}: {type(model).__name__} has no module {path!r} "
                         f"(Adapter.layers)") from None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{path} is a {type(layers).__name__}; deepen_ grows an nn.ModuleList of blocks")
    return path, layers


def _source_name(name: str, path: str, plan: DepthPlan) -> str:
    """A module's name in the grown model -> its source's name in the old one."""
    prefix = path + "." if path else ""
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix):].partition(".")
    if not index.isdigit():
        return name
    return f"{prefix}{plan.sources[int(index)]}" + (f".{rest}" if rest else "")


# --- the config -----------------------------------------------------------------------------


def new_depth_config(adapter: Adapter, config, plan: DepthPlan):
    """A copy of `config` with the new depth, each per-layer list taking its source's
    entries and each count of leading layers counting the new blocks from among them."""
    out = copy.deepcopy(config)
    setattr(out, adapter.config_keys["n_layer"], plan.new)
    for attr in adapter.layer_lists:
        v = getattr(config, attr, None)
        if v is None:
            continue
        if not isinstance(v, (list, tuple)) or len(v) != plan.old:
            raise ValueError(f"config.{attr} should list one entry per layer ({plan.old}), got {v!r}")
        setattr(out, attr, type(v)(v[s] for s in plan.sources))
    for attr in adapter.layer_counts:
        v = getattr(config, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            setattr(out, attr, sum(1 for s in plan.sources if s < v))
    return out


def apply_depth_config(adapter: Adapter, model: nn.Module, new_config, plan: DepthPlan) -> None:
    if not adapter.config_in_place:
        model.config = new_config
        return
    for attr in (adapter.config_keys["n_layer"],) + tuple(adapter.layer_lists) + tuple(adapter.layer_counts):
        if hasattr(new_config, attr):
            setattr(model.config, attr, copy.deepcopy(getattr(new_config, attr)))


def deepened_shapes(shapes: dict, path: str, plan: DepthPlan) -> dict:
    """Parameter name -> shape after the depth growth of `plan`, from the names and shapes
    before it: block j's parameters are block sources[j]'s."""
    prefix = path + "." if path else ""
    out = {}
    for n, shape in shapes.items():
        index, _, rest = n[len(prefix):].partition(".") if n.startswith(prefix) else ("", "", "")
        if not index.isdigit():
            out[n] = shape
    for j, s in enumerate(plan.sources):
        for n, shape in shapes.items():
            if n.startswith(f"{prefix}{s}."):
                out[f"{prefix}{j}." + n[len(f"{prefix}{s}."):]] = shape
    return out


def check_references(model, path: str, plan: DepthPlan, ref_old, ref_new) -> None:
    """The class built from the old config is the model; built from the new one, it has
    exactly the grown model's parameters (so the config expresses the new depth)."""
    want = deepened_shapes(checks.check_old_reference(model, ref_old), path, plan)
    got = checks.param_shapes(ref_new)
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise ValueError(f"{type(model).__name__} built from the config with {plan.new} layers does not have "
                         f"the grown blocks (differences: {diff}); its config cannot express this depth")


def check_memory(model, layers, optimizer, plan: DepthPlan) -> int:
    need = sum(checks.state_bytes(layers[plan.sources[j]].parameters(), optimizer if plan.kinds[j] != FRESH else None)
               for j in plan.added)
    dev = next(model.parameters()).device
    free = checks.free_bytes(dev)
    if free is not None and need > free:
        raise MemoryError(f"depth growth needs {checks.format_bytes(need)} of new state on {dev}, "
                          f"{checks.format_bytes(free)} are free; nothing was changed")
    return need


# --- the new blocks ---------------------------------------------------------------------------


def is_residual_output(adapter: Adapter, name: str) -> bool:
    """A block's tensor that writes the residual stream: its output axis is d_model, produced
    (attention and MLP output projections and their biases)."""
    spec = adapter.spec_of(name)
    return spec.kind in ("matrix", "bias") and all(seg == ("d_model", "produce") for seg in spec.rows)


def new_block(source: nn.Module, kind: str, j: int, plan: DepthPlan, adapter: Adapter, path: str, new_config):
    """A copy of `source` as block j of the grown model: kept as is (COPY), its residual
    outputs zero (ZERO_OUT), or drawn from the model's init with zero residual outputs (FRESH)."""
    block = copy.deepcopy(source)
    prefix = f"{path}.{plan.sources[j]}." if path else f"{plan.sources[j]}."
    new_prefix = f"{path}.{j}." if path else f"{j}."
    gen = torch.Generator().manual_seed(zlib.crc32(f"deepen {plan.seed} {j}".encode()))
    with torch.no_grad():
        for local, p in block.named_parameters():
            p.grad = None
            spec = adapter.spec_of(prefix + local)
            if kind == FRESH:
                if spec.kind == "matrix":
                    std = adapter.init_std_of(new_config, new_prefix + local, spec)
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std))
                elif spec.kind == "gain":
                    p.fill_(1.0 - adapter.gain_offset)
                else:
                    p.zero_()
            if kind in (ZERO_OUT, FRESH) and is_residual_output(adapter, prefix + local):
                p.zero_()
    return block


def rescale_queries(blocks, plan: DepthPlan, adapter: Adapter, path: str, shape, old_config, new_config,
                    optimizer) -> None:
    """Where the attention scale depends on the layer index (adapter.query_scale_at), block
    j, built from old block i, gets its query rows times c = scale(i)/scale(j), so it
    computes what its source did; its optimizer moments follow as the gradients of the
    rescaled weight would (exp_avg / c, exp_avg_sq / c^2)."""
    if adapter.query_scale_at is None:
        return
    sizes = {"q": shape.n_head * shape.head_dim, "kv": shape.n_kv_head * shape.head_dim,
             "d_model": shape.d_model, "d_ff": shape.d_ff, "head_dim": shape.head_dim}
    for j, (block, s) in enumerate(zip(blocks, plan.sources)):
        c = adapter.query_scale_at(old_config, s) / adapter.query_scale_at(new_config, j)
        if c == 1.0:
            continue
        for local, p in block.named_parameters():
            spec = adapter.spec_of(f"{path}.{s}.{local}")
            start = 0
            for dim, role in spec.rows:
                rows = slice(start, start + sizes[dim])
                start += sizes[dim]
                if role != "query":
                    continue
                pick = (lambda t: t[:, rows]) if spec.transposed else (lambda t: t[rows])
                with torch.no_grad():
                    pick(p).mul_(c)
                    for k, v in (optimizer.state.get(p, {}) if optimizer is not None else {}).items():
                        if k in ("exp_avg", "momentum_buffer"):
                            pick(v).div_(c)
                        elif k in ("exp_avg_sq", "max_exp_avg_sq"):
                            pick(v).div_(c * c)


# --- the optimizer ------------------------------------------------------------------------------


def join_optimizer(optimizer, layers, blocks, plan: DepthPlan, adapter: Adapter, path: str) -> None:
    """Each new block's parameters join the param group of their sources, with the
    moment rule of the module docstring."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for j in plan.added:
        kind, s = plan.kinds[j], plan.sources[j]
        src = dict(layers[s].named_parameters())
        for local, p in blocks[j].named_parameters():
            sp = src[local]
            group = group_of.get(id(sp))
            if group is None:
                continue  # a frozen source: its copy stays frozen and out of the optimizer
            group["params"].append(p)
            fresh_state = kind == FRESH or (kind == ZERO_OUT and is_residual_output(adapter, f"{path}.{s}.{local}"))
            if fresh_state or sp not in optimizer.state:
                continue
            state = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                     for k, v in optimizer.state[sp].items()}
            optimizer.state[p] = state


def model_order(optimizer, model: nn.Module) -> None:
    """Each group's parameters in the model's order: the order an optimizer built afresh
    from the grown model has, which state_dict indices (and so checkpoints) depend on;
    the groups' param_names, where they have them, renamed to match."""
    named = list(model.named_parameters())
    rank = {id(p): i for i, (_, p) in enumerate(named)}
    for group in optimizer.param_groups:
        group["params"].sort(key=lambda p: rank.get(id(p), len(rank)))
        if "param_names" in group:  # torch's named groups (growkern.train's optimizer has them)
            group["param_names"] = [named[rank[id(p)]][0] for p in group["params"]]
