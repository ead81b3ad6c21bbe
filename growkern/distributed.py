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

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, world_size, local_rank, and the parallelism
    ("single" or "ddp")."""
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


def context(model) -> Context:
    """The Context of a model: "ddp" with its process group's rank and size when it is
    a DDP wrapper (through torch.compile), else a single process."""
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
