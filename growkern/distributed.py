"""Data-parallel training across processes, and growth of a DDP-wrapped model.

The engine is PyTorch's own: torchrun starts the processes, torch.distributed joins
them (gloo on CPU, NCCL on CUDA), DistributedDataParallel averages the gradients.
This module holds the little growkern adds (docs/distributed.md):

  * setup from torchrun's environment (init_from_env, device_for, wrap);
  * the data split: every rank draws the same *global* batch of the fixed data order
    and keeps its own rows (shard), so the global batch, the data cursor and the
    loss curve are those of a single process with the same --batch-size;
  * rank-0-only side effects (is_main, run_on_main, main_first) and the reductions
    the training loop logs (mean_over_ranks, broadcast_float);
  * FSDP2 (shard_model): torch's fully_shard per block and on the root, the optimizer
    moved onto the sharded parameters;
  * widen_ of a DDP wrapper (or of its .module: the wrapper is found): DDP caches
    per-parameter state of the old shapes (the
    Reducer's gradient buckets, its hooks on each parameter's gradient accumulator,
    the bucket views); widen_ releases that Reducer before growing and builds a new
    one on the same wrapper afterwards with DDP's own init helper (check_growable,
    release_reducer, rebuild_reducer). Every rank must call widen_.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

try:  # FSDP2 (torch >= 2.6)
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    FSDPModule = MixedPrecisionPolicy = fully_shard = DTensor = None

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, world_size, local_rank, and the parallelism
    ("single", "ddp" or "fsdp")."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    kind: str = "single"
    group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> dict:
        """What metrics records and checkpoint metadata say about the run."""
        return {"parallel": self.kind, "world_size": self.world_size}


SINGLE = Context()


def env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's environment, or None outside it."""
    if not all(k in os.environ for k in ENV_KEYS):
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def device_for(device: str, local_rank: int = 0) -> torch.device:
    """The training device of this rank: "auto" is cuda:LOCAL_RANK when CUDA is there,
    else cpu; a bare "cuda" is cuda:LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_from_env(device: str = "auto") -> Context:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT): NCCL when this rank trains on CUDA, else gloo. Outside torchrun,
    or with a world of one, nothing happens and the run is a plain single process."""
    found = env()
    if found is None or found[1] <= 1:
        return SINGLE
    rank, world, local = found
    dev = device_for(device, local)
    if not dist.is_initialized():
        if dev.type == "cuda":  # NCCL for CUDA tensors; gloo too, for a CPU checkpoint resumed here
            torch.cuda.set_device(dev)
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return Context(rank, world, local, "ddp", None)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """The model in torch's DistributedDataParallel (unchanged for a single process).
    Buffers are not broadcast at each forward: growkern.GPT's are functions of its
    config, identical on every rank."""
    if not ctx.distributed:
        return model
    dev = next(model.parameters()).device
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, forward_sync_buffers=False)


# the module lists holding the transformer blocks, by model family (growkern.GPT,
# Llama-style transformers models, GPT-2): fully_shard goes on each of their items
BLOCK_LISTS = ("blocks", "model.layers", "transformer.h")


def blocks_of(model: nn.Module) -> list[nn.Module]:
    for path in BLOCK_LISTS:
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
        if isinstance(m, nn.ModuleList):
            return list(m)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} to shard; "
                     f"looked for a ModuleList at {', '.join(BLOCK_LISTS)}")


def shard_model(model: nn.Module, optimizer, ctx: Context, param_dtype: torch.dtype | None = None,
                device: torch.device | None = None):
    """FSDP2: torch's fully_shard on every transformer block and on the root, over a
    1-D mesh of all ranks (each parameter's rows split as torch.chunk splits them;
    param_dtype: compute in that dtype, reduce gradients in the parameters' dtype).
    fully_shard makes new (DTensor) parameters, so the optimizer is moved onto them:
    its groups hold the new objects and its state this rank's rows of the old, full
    state (every rank holds the same full state before: a new run, or a checkpoint
    loaded whole). `device`: where the shards will live, for a model still on the meta
    device (default: the parameters' device). Returns the model, now an FSDPModule."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    if fully_shard is None:
        raise RuntimeError(f"FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6; this is "
                           f"{torch.__version__}")
    dev = device or next(model.parameters()).device
    mesh = init_device_mesh(dev.type, (ctx.world_size,))
    # gradients reduced in the parameters' own dtype (FSDP's default would reduce in param_dtype)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype,
                              reduce_dtype=next(model.parameters()).dtype if param_dtype is not None else None)
    before = dict(model.named_parameters())
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if optimizer is None:
        return model
    after = dict(model.named_parameters())
    new_of = {id(p): after[n] for n, p in before.items()}
    state = {}
    for p, st in optimizer.state.items():
        new = new_of[id(p)]
        state[new] = {k: distribute_tensor(v, mesh, [Shard(0)], src_data_rank=None)
                      if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0 else v
                      for k, v in st.items()}
    for group in optimizer.param_groups:
        group["params"] = [new_of[id(p)] for p in group["params"]]
    optimizer.state.clear()
    optimizer.state.update(state)
    return model


def gradient_sync(model, enabled: bool):
    """A context in which backward does (or, enabled=False, does not) reduce gradients
    across ranks: DDP's no_sync, FSDP2's set_requires_gradient_sync; nothing for a
    single process. For gradient accumulation: sync at the last micro-batch only."""
    if enabled:
        return contextlib.nullcontext()
    ddp = find_ddp(model, wrapped_only=True)
    if ddp is not None:
        return ddp.no_sync()
    fsdp = find_fsdp(model)
    if fsdp is not None:
        return _fsdp_no_sync(fsdp)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(fsdp):
    fsdp.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        fsdp.set_requires_gradient_sync(True)


def reshard(model: nn.Module) -> None:
    """Free every FSDP2 module's gathered parameters, so that the module holds its
    sharded parameters again (the optimizer's): an eval forward leaves the root
    gathered until a backward."""
    for m in model.modules():
        if FSDPModule is not None and isinstance(m, FSDPModule):
            m.reshard()


def local(t):
    """A plain tensor of a DTensor's full value (a collective: every rank calls it in
    the same order); other tensors as they are."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


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
    import gc
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
    return m if FSDPModule is not None and isinstance(m, FSDPModule) else None


def context(model) -> Context:
    """The Context of a model: "ddp" or "fsdp" with its process group's rank and size
    when it is a DDP wrapper or an FSDP2 root (through torch.compile), else a single
    process."""
    fsdp = find_fsdp(model)
    if fsdp is not None:
        param = next(p for p in fsdp.parameters() if isinstance(p, DTensor))
        pg = param.device_mesh.get_group()
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank(pg)))
        return Context(dist.get_rank(pg), dist.get_world_size(pg), local, "fsdp", pg)
    ddp = find_ddp(model, wrapped_only=True)
    if ddp is None:
        return SINGLE
    pg = ddp.process_group
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank(pg)))
    return Context(dist.get_rank(pg), dist.get_world_size(pg), local, "ddp", pg)


# --- data and reductions ---------------------------------------------------------

def check_batch(batch_size: int, ctx: Context) -> None:
    if batch_size % ctx.world_size:
        raise ValueError(f"batch_size {batch_size} is the global batch and must be divisible by the "
                         f"world size {ctx.world_size} (each rank trains on batch_size / world_size rows)")


def shard(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """This rank's rows of a global batch: rows [rank * b, (rank + 1) * b), b = B / world."""
    if not ctx.distributed:
        return t
    b = t.shape[0] // ctx.world_size
    return t[ctx.rank * b:(ctx.rank + 1) * b]


def mean_over_ranks(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of a tensor over ranks (every rank gets it); SUM then divide, since
    gloo has no AVG."""
    if not ctx.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t, group=ctx.group)
    return t / ctx.world_size


def broadcast_float(value: float | None, ctx: Context, device) -> float | None:
    """Rank 0's value on every rank."""
    if not ctx.distributed:
        return value
    t = torch.tensor([float("nan") if value is None else value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0, group=ctx.group)
    return float(t)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier(group=ctx.group)


def run_on_main(fn, ctx: Context):
    """fn() on rank 0 only; the other ranks wait for it at a barrier."""
    def call(*args, **kwargs):
        out = fn(*args, **kwargs) if ctx.is_main else None
        barrier(ctx)
        return out
    return call


@contextlib.contextmanager
def main_first(ctx: Context):
    """Rank 0 runs the block first (e.g. tokenizes the data and writes the caches), then
    the others (who find the caches)."""
    if not ctx.is_main:
        barrier(ctx)
    try:
        yield
    finally:
        if ctx.is_main:
            barrier(ctx)


def decorrelate_rng(ctx: Context) -> None:
    """Give each rank its own torch RNG stream (dropout masks), derived from the current,
    identical, state and the rank: ranks would otherwise draw the same masks. Called in
    the stochastic regime of a distributed run only."""
    if not ctx.distributed:
        return
    base = int(torch.randint(0, 2**62, (1,)))
    torch.manual_seed((base + 0x9E3779B97F4A7C15 * ctx.rank) % 2**63)


# --- growth of a DDP-wrapped model -------------------------------------------------

def check_growable(ddp: DDP) -> None:
    """Refuse, before anything changes, DDP configurations whose cached state
    rebuild_reducer cannot rebuild."""
    def no(what):
        raise ValueError(f"widen_ cannot grow a DistributedDataParallel model {what}; supported: DDP "
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
    params, sparse = ddp._build_params_for_reducer()
    from torch.distributed.utils import _verify_param_shape_across_processes
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


# --- growth of an FSDP2-sharded model ------------------------------------------------

def fsdp_params(model: nn.Module) -> dict:
    """id(sharded parameter) -> its FSDPParam (torch's per-parameter FSDP state), over
    every fully_shard-ed module of the model."""
    out = {}
    for m in model.modules():
        if FSDPModule is not None and isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            for fp in (group.fsdp_params if group is not None else ()):
                out[id(fp.sharded_param)] = fp
    return out


def check_fsdp_growable(model: nn.Module, plan) -> dict:
    """Refuse, before anything changes, what sharded growth cannot do; returns
    fsdp_params(model). Moves every module to its sharded state (an eval forward
    leaves the root unsharded)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, HSDPMeshInfo

    def no(what):
        raise ValueError(f"widen_ cannot grow this FSDP2 model: {what}; supported: fully_shard on a 1-D "
                         f"mesh, parameters sharded on dim 0, no CPU offload (growkern.distributed.shard_model)")
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
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            if group is not None:
                group._all_gather_result = None
                group._all_gather_output = torch.empty(0, device=group.device)
