"""Data-parallel training across processes: torchrun, DDP and FSDP2 for the training loop.

The engine is PyTorch's own: torchrun starts the processes, torch.distributed joins
them (gloo on CPU, NCCL on CUDA), DistributedDataParallel averages the gradients.
This module holds the little growkern adds (docs/distributed.md):

  * setup from torchrun's environment (init_from_env, resolve_device, wrap);
  * the data split: every rank draws the same *global* batch of the fixed data order
    and keeps its own rows (shard), so the global batch, the data cursor and the
    loss curve are those of a single process with the same --batch-size;
  * rank-0-only side effects (is_main, run_on_main, main_first) and the reductions
    the training loop logs (mean_over_ranks, broadcast_float);
  * FSDP2 (shard_model): torch's fully_shard per block and on the root, the optimizer
    moved onto the sharded parameters;
  * gradient_sync (DDP's no_sync, FSDP2's set_requires_gradient_sync) and context,
    what a wrapped model's ranks are.
Growing a DDP or FSDP2 model is the library's part: growkern/growth/placement.py.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..growth.placement import find_ddp, find_fsdp

try:  # FSDP2 (torch >= 2.6)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - older torch
    init_device_mesh = MixedPrecisionPolicy = fully_shard = DTensor = Shard = distribute_tensor = None

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


def resolve_device(device: str | None, local_rank: int | None = None) -> torch.device:
    """The device of this process: "auto" (or None) is cuda when CUDA is there, else cpu;
    under torchrun (local_rank given) "cuda" and "auto" mean cuda:LOCAL_RANK."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and local_rank is not None:
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
    dev = resolve_device(device, local)
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
