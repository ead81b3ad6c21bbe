"""Where a model's tensors live while it grows: one process, DDP replicas or FSDP2 shards.

The growth itself (growkern/growth/apply.py) is the same everywhere; the placements
differ only at a few moments, which are this module's interface (Placement):

  check(model, plan)    before anything changes: refuse what cannot be grown here
  settle()              after a probe forward: the modules hold the optimizer's parameters
  release()             the first change: drop what caches the old shapes
  read(t)               an old tensor, whole (FSDP2: all-gathered, one at a time)
  rows(tp, p)           the rows of the new tensor this process builds (None: all)
  install(p, tp, ...)   the new tensor into the same nn.Parameter, and its moments
  finish(model)         rebuild and verify; the report's notes

SingleProcess is the plain case. Replicated (DistributedDataParallel): every rank grows
the same way; DDP caches per-parameter state of the old shapes (the Reducer's gradient
buckets, its hooks on each parameter's gradient accumulator, the bucket views), so that
Reducer is released before growing and a new one built on the same wrapper afterwards
with DDP's own init helper, and every rank checks that every rank grew the same.
Sharded (FSDP2, fully_shard): each rank gathers one old parameter at a time and builds
only its own rows of the new one (the kernels' row_offset keeps the noise keyed by the
global row), then FSDP's per-parameter metadata is rebuilt with its own initializer on
the same Parameter objects. Either way widen_ is a collective: every rank calls it with
the same arguments, between optimizer steps (docs/distributed.md).
"""
from __future__ import annotations

import gc
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from torch.distributed.utils import _verify_param_shape_across_processes


def _loaded(module: str, name: str):
    """torch's `module.name` when that module is loaded, else None. An object can only be
    an instance of a loaded class, so FSDP2's FSDPModule and DTensor are looked up rather
    than imported: importing them would add about half a second to `import growkern`."""
    return getattr(sys.modules.get(module), name, None)


def _is_fsdp(m) -> bool:
    cls = _loaded("torch.distributed.fsdp", "FSDPModule")
    return cls is not None and isinstance(m, cls)


def _is_dtensor(t) -> bool:
    cls = _loaded("torch.distributed.tensor", "DTensor")
    return cls is not None and isinstance(t, cls)


class SingleProcess:
    """The whole model in this process: each new tensor replaces its parameter's data."""
    shards = 1  # the new state is split over this many processes (the memory check)
    one_at_a_time = False  # whether old parameters must be read one at a time

    def check(self, model: nn.Module, plan) -> None:
        pass

    def settle(self) -> None:
        pass

    def release(self) -> None:
        pass

    def read(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def rows(self, tp, p) -> tuple[int, int] | None:
        return None

    def install(self, p: nn.Parameter, tp, param: torch.Tensor, moments: list) -> list:
        """Make `param` p's data (the same nn.Parameter object); returns the moments to store."""
        replace_data(p, param)
        return moments

    def finish(self, model: nn.Module) -> list[str]:
        return []


class Replicated(SingleProcess):
    """A DistributedDataParallel model: every replica grows the same way."""

    def __init__(self, ddp: DDP):
        self.ddp = ddp

    def check(self, model, plan) -> None:
        check_growable(self.ddp, "widen_" if plan is not None else "deepen_")

    def release(self) -> None:
        release_reducer(self.ddp)  # its buckets and hooks hold the old shapes

    def finish(self, model) -> list[str]:
        rebuild_reducer(self.ddp)  # collective: every rank grows
        return ["DDP: a new Reducer was built on the same wrapper for the grown parameters"]


class Sharded(SingleProcess):
    """An FSDP2 root: each rank builds and keeps only its own rows of every new tensor."""
    one_at_a_time = True

    def __init__(self, root: nn.Module):
        self.root = root
        self.fsdp_params = {}
        reshard(root)  # the modules hold their sharded parameters (the optimizer's) again

    @property
    def shards(self) -> int:
        param = next(p for p in self.root.parameters() if _is_dtensor(p))
        return dist.get_world_size(param.device_mesh.get_group())

    def check(self, model, plan) -> None:
        self.fsdp_params = check_fsdp_growable(model, plan)  # and reshards every module

    def settle(self) -> None:
        reshard(self.root)  # a forward leaves the FSDP2 root gathered

    def read(self, t):
        return local(t)  # the whole old tensor: an all-gather, one parameter at a time

    def rows(self, tp, p):
        return owned_rows(tp.stored(tp.new_shape)[0], self.fsdp_params[id(p)])

    def install(self, p, tp, param, moments):
        return install_shard(self.fsdp_params[id(p)], p, tp.stored(tp.new_shape), param, moments)

    def finish(self, model) -> list[str]:
        finish_fsdp_growth(model)
        return ["FSDP2: each rank built only its own rows of every grown tensor"]


def placement_for(model) -> SingleProcess:
    """The placement of `model` as widen_ was handed it: an FSDP2 root (through
    torch.compile), a DDP wrapper or a module some live DDP wrapper holds, else one
    process."""
    ddp = find_ddp(model)  # the wrapper, or the one around this module: its Reducer is rebuilt
    fsdp = find_fsdp(model)
    if fsdp is not None:
        return Sharded(fsdp)
    if ddp is not None:
        return Replicated(ddp)
    return SingleProcess()


def replace_data(p: nn.Parameter, new: torch.Tensor):
    """p.data = new, for a new shape. Autograd caches a leaf's gradient accumulator,
    with the old shape, for as long as any graph that used it is alive (e.g. the last
    step's `loss`); it only drops it when the dtype or device changes. Passing through
    an empty tensor of another dtype makes it build a fresh one on the next backward."""
    other = torch.float32 if new.dtype != torch.float32 else torch.float64
    p.data = torch.empty(0, dtype=other, device=new.device)
    p.data = new


# --- finding the wrappers -------------------------------------------------------------

def reshard(model: nn.Module) -> None:
    """Free every FSDP2 module's gathered parameters, so that the module holds its
    sharded parameters again (the optimizer's): an eval forward leaves the root
    gathered until a backward."""
    for m in model.modules():
        if _is_fsdp(m):
            m.reshard()


def local(t):
    """A plain tensor of a DTensor's full value (a collective: every rank calls it in
    the same order); other tensors as they are."""
    return t.full_tensor() if _is_dtensor(t) else t


def find_ddp(model, wrapped_only: bool = False) -> DDP | None:
    """The DDP wrapper of `model`: itself (through torch.compile), or (unless
    wrapped_only) a live DDP object whose .module is `model` (found among the objects
    the garbage collector tracks, while a process group is up), so that widen_(ddp.module), as in a
    Trainer callback, grows through its wrapper instead of silently leaving it a
    Reducer of the old shapes."""
    m = model
    while hasattr(m, "_orig_mod"):
        m = m._orig_mod
    if isinstance(m, DDP):
        return m
    if wrapped_only or not isinstance(m, nn.Module) or not (dist.is_available() and dist.is_initialized()):
        return None
    found = [o for o in gc.get_objects() if DDP in type(o).__mro__ and o.module is m]  # one heap pass
    if len(found) > 1:
        raise ValueError(f"{type(m).__name__} is wrapped by {len(found)} live DistributedDataParallel objects; "
                         f"each keeps hooks on its parameters. Drop the old ones (del, gc.collect()) and "
                         f"grow through the one that trains")
    return found[0] if found else None


def find_fsdp(model) -> nn.Module | None:
    """The model itself (through torch.compile) when it is a root FSDP2 module
    (fully_shard applied to it), else None."""
    m = model
    while hasattr(m, "_orig_mod"):
        m = m._orig_mod
    return m if _is_fsdp(m) else None


# --- DDP: the Reducer of the old shapes is released and rebuilt --------------------------

def check_growable(ddp: DDP, op: str = "widen_") -> None:
    """Refuse, before anything changes, DDP configurations whose cached state
    rebuild_reducer cannot rebuild."""
    def no(what):
        raise ValueError(f"{op} cannot grow a DistributedDataParallel model {what}; supported: DDP "
                         f"with the default reducer, with or without static_graph, gradient_as_bucket_view, "
                         f"find_unused_parameters and Python comm hooks (register_comm_hook)")
    if not dist.is_initialized():
        no("whose process group is gone")
    if getattr(ddp, "mixed_precision", None) is not None:
        no("with DDP's mixed_precision (its low-precision parameter copies are not rebuilt)")
    if getattr(ddp, "_use_python_reducer", False):
        no("under compiled autograd's Python reducer")
    if getattr(ddp, "_delay_all_reduce_params", None):
        no("with delay_all_reduce_named_params (its gradient buffer has the old sizes)")
    if any(hasattr(p, "_in_backward_optimizers") for p in ddp._module_parameters):
        no("with optimizers applied in backward (their state is not the optimizer widen_ grows)")
    if getattr(ddp, "reducer", None) is None:
        no("whose Reducer is missing (a widen_ interrupted on it)")
    hook = ddp._get_ddp_logging_data().get("comm_hook") or ""
    if hook and not ddp._comm_hooks:
        no(f"with the built-in comm hook {hook} (it cannot be read back to register it again)")


def release_reducer(ddp: DDP) -> None:
    """Drop the Reducer and its Logger: they hold the gradient buckets (a copy of every
    gradient, of the old sizes) and hooks on each parameter's gradient accumulator, an
    autograd node that keeps the old shape for as long as something holds it."""
    ddp.reducer._remove_autograd_hooks()
    ddp.reducer = None
    ddp.logger = None


def rebuild_reducer(ddp: DDP) -> None:
    """Build a new Reducer for the grown parameters on the same wrapper, as DDP's own
    __setstate__ does (_build_params_for_reducer, _ddp_init_helper); then register the
    Python comm hooks and the static graph again, and let the lazy init and the bucket
    rebuild run again at the next forward. Collective: checks on every rank that every
    rank holds the same grown shapes and values (a rank grown differently is an error
    on all ranks, not silently diverging replicas)."""
    # the parameter list DDP keeps from its construction (deepen_ adds parameters)
    ddp._module_parameters = [p for n, p in ddp.module.named_parameters() if n not in ddp.parameters_to_ignore]
    params, sparse = ddp._build_params_for_reducer()
    _verify_param_shape_across_processes(ddp.process_group, params)
    _check_same_values(ddp)
    ddp._ddp_init_helper(params, sparse, ddp._build_debug_param_to_name_mapping(params), ddp.static_graph)
    for hook, state in ddp._comm_hooks:
        ddp.logger._set_comm_hook_name(hook.__qualname__)
        dist._register_comm_hook(ddp.reducer, state, hook)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
        ddp._static_graph_delay_allreduce_enqueued = False
    ddp._has_rebuilt_buckets = False
    ddp._lazy_init_ran = False


def fingerprint(t: torch.Tensor) -> int:
    """A hash of a tensor's bits that does not depend on how a sum is split (an integer
    sum wraps around, so any order gives the same value)."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    bits = t.detach().contiguous().view(ints).flatten().to(torch.int64)
    weight = torch.arange(bits.numel(), device=bits.device) % 65521 + 1  # row order counts
    return int((bits * weight).sum())


def _check_same_values(ddp: DDP) -> None:
    named = [(n, p) for n, p in ddp.module.named_parameters()]
    dev = named[0][1].device if named else torch.device("cpu")
    mine = torch.tensor([fingerprint(p) for _, p in named], dtype=torch.int64, device=dev)
    ref = mine.clone()
    dist.broadcast(ref, 0, group=ddp.process_group)
    bad = (mine != ref).to(torch.int64)
    dist.all_reduce(bad, group=ddp.process_group)  # every rank learns which differ somewhere
    if bad.any():
        first = named[int(bad.nonzero()[0])][0]
        raise RuntimeError(f"widen_ under DDP: the grown parameters differ across ranks (first: {first}); "
                           f"every rank must call widen_ with the same model state and arguments "
                           f"(plan, strategy, seed)")


# --- FSDP2: each rank builds and installs only its own rows -----------------------------

def fsdp_params(model: nn.Module) -> dict:
    """id(sharded parameter) -> its FSDPParam (torch's per-parameter FSDP state), over
    every fully_shard-ed module of the model."""
    out = {}
    for m in model.modules():
        if _is_fsdp(m):
            group = m._get_fsdp_state()._fsdp_param_group
            for fp in (group.fsdp_params if group is not None else ()):
                out[id(fp.sharded_param)] = fp
    return out


def check_fsdp_growable(model: nn.Module, plan) -> dict:
    """Refuse, before anything changes, what sharded growth cannot do; returns
    fsdp_params(model). Moves every module to its sharded state (an eval forward
    leaves the root unsharded)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, HSDPMeshInfo  # an FSDP2 model: loaded

    def no(what):
        raise ValueError(f"widen_ cannot grow this FSDP2 model: {what}; supported: fully_shard on a 1-D "
                         f"mesh, parameters sharded on dim 0, no CPU offload (growkern.train.distributed.shard_model)")
    if not dist.is_initialized():
        no("its process group is gone")
    reshard(model)  # the module attributes are the sharded parameters again
    fps = fsdp_params(model)
    for name, p in model.named_parameters():
        fp = fps.get(id(p))
        if fp is None:
            no(f"parameter {name} is not managed by fully_shard")
        if fp.fsdp_placement.dim != 0 or fp.is_dtensor:
            no(f"parameter {name} is sharded as {fp.fsdp_placement} (or holds a DTensor of its own)")
        if isinstance(fp.mesh_info, HSDPMeshInfo) or not isinstance(fp.mesh_info, FSDPMeshInfo):
            no(f"parameter {name} is on a {type(fp.mesh_info).__name__} (HSDP or replicate)")
        if fp.offload_to_cpu:
            no(f"parameter {name} is offloaded to the CPU")
        if hasattr(fp, "_extensions_data"):
            no(f"parameter {name} uses FSDP all-gather extensions")
        if plan.tensors[name].orthogonalize_fresh_rows:
            no(f"the strategy orthogonalizes {name}'s fresh rows against all old rows, which no rank "
               f"holds after sharding; use a strategy without orthogonalize_fresh_rows")
    return fps


def owned_rows(n: int, fp) -> tuple[int, int]:
    """The rows [lo, hi) of an n-row tensor this rank holds under FSDP2's dim-0
    split (torch.chunk: chunks of ceil(n / world), the last ones shorter or empty)."""
    world, rank = fp.mesh_info.shard_mesh_size, fp.mesh_info.shard_mesh_rank
    size = -(-n // world)
    lo = min(rank * size, n)
    return lo, min(lo + size, n)


def install_shard(fp, p: nn.Parameter, new_shape, shard: torch.Tensor, moments: list) -> list:
    """Make `p` (the same nn.Parameter object) the sharded parameter of new global
    shape `new_shape` whose rows on this rank are `shard`: FSDP's own initializer
    rebuilds the FSDPParam's metadata from a meta tensor of the new shape (sizes,
    padding, DTensor spec), the padded local storage then takes the shard, and the
    parameter's contents are swapped in place (torch.utils.swap_tensors) so that the
    optimizer's keys and the module's references stay valid. Returns the moments as
    DTensors with the parameter's sharding."""
    uid = fp._orig_param_uid
    meta = nn.Parameter(torch.empty(new_shape, dtype=shard.dtype, device="meta"), requires_grad=p.requires_grad)
    fp._init_sharded_param(meta, fp.device, None, fp.mesh_info)
    if fp.post_forward_mesh_info is not None:
        fp._init_sharded_post_forward_param_metadata(meta)
    fp._orig_param_uid = uid
    padded = shard.new_zeros(fp.padded_sharded_param_size)
    padded[:shard.shape[0]].copy_(shard)
    fp._sharded_param_data = padded.view(-1)
    new = nn.Parameter(fp.to_sharded_dtensor(padded.narrow(0, 0, shard.shape[0])), requires_grad=p.requires_grad)
    p.grad = None
    torch.utils.swap_tensors(p, new)
    fp.sharded_param = p
    fp._setattr_on_modules(p)
    # the unsharded parameter and all-gather buffers are rebuilt at the next all-gather
    fp.all_gather_outputs = []
    fp._unsharded_inner_tensors = []
    fp.unsharded_accumulated_grad = None
    if hasattr(fp, "_unsharded_param"):
        del fp._unsharded_param
    return [fp.to_sharded_dtensor(m) for m in moments]


def finish_fsdp_growth(model: nn.Module) -> None:
    """Drop what each FSDP parameter group cached of the old sizes."""
    for m in model.modules():
        if _is_fsdp(m):
            group = m._get_fsdp_state()._fsdp_param_group
            if group is not None:
                group._all_gather_result = None
                group._all_gather_output = torch.empty(0, device=group.device)
