"""The training loop: config, optimizer, LR schedule, evaluation and `train`.

Written to be read top to bottom, like nanoGPT's train.py, and to stay out of the
way of growth: the optimizer is a plain AdamW over the model's own nn.Parameters
and the schedule a plain LambdaLR, so `growkern.widen_` can grow both in place
between two calls of `train` and training simply goes on.

Two regimes:
  * deterministic: dropout 0, a fixed data order (batch i depends on the seed only),
    deterministic kernels. Two runs on the same machine give bit-identical losses,
    and stopping at step k and resuming from a checkpoint gives the same losses as
    not stopping.
  * stochastic: dropout and/or a shuffled data order mixed with a salt; still
    seeded, so a run can be repeated, but meant to differ across salts.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ..growth import mup
from ..growth.placement import local, reshard
from ..growth.wrappers import unwrap
from ..models.gpt import GPT, param_kind
from . import distributed as dist_mod
from .data import Batches
from .staging import atomic_open, remove_stale_staging, write_error

SCHEDULES = ("constant", "cosine", "wsd")
REGIMES = ("deterministic", "stochastic")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    steps: int = 1000            # optimizer steps of the whole run: the LR schedule's horizon
    batch_size: int = 16         # sequences per micro-batch; data-parallel: the global batch of all ranks
    block_size: int = 128        # tokens per sequence (<= the model's block_size)
    lr: float = 1e-3             # peak LR
    min_lr: float = 1e-4         # LR at the end of the decay (cosine, wsd)
    warmup: int = 100            # linear warmup steps, from lr/warmup to lr
    schedule: str = "cosine"     # constant | cosine | wsd (warmup-stable-decay)
    decay_frac: float = 0.2      # wsd: fraction of `steps` spent in the final linear decay
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    # Weight decay goes on matrices only: norm gains and biases (1-D) are scales and
    # offsets whose natural value is 1 or 0, and decaying them towards 0 only hurts.
    # Embeddings are matrices and are decayed by default, as in nanoGPT; with tied
    # embeddings the same tensor is also the output projection.
    decay_embeddings: bool = True
    grad_clip: float = 1.0       # max global grad norm; 0 disables clipping
    grad_accum: int = 1          # micro-batches per optimizer step
    eval_every: int = 100        # steps between val evaluations; 0 disables
    eval_batches: int = 8        # val batches per evaluation
    regime: str = "deterministic"
    dropout: float = 0.0         # stochastic regime only
    seed: int = 0                # model init, data order, dropout
    salt: int = 0                # stochastic regime: mixed into the data order
    compile: bool = False
    device: str = "auto"         # auto: cuda when available, else cpu
    dtype: str = "auto"          # autocast dtype; auto: bfloat16 on CUDA, float32 on CPU
    fused: bool | None = None    # fused AdamW; None: on CUDA and CPU (one kernel, not a loop)
    peak_flops: float | None = None  # for MFU; None: looked up from the GPU's name
    log_path: str | None = None  # JSONL metrics, one record per step (appended; records past
                                 # start_step, logged by a run killed after its checkpoint, dropped)
    progress: bool = True        # tqdm bar when stderr is a terminal, else a line every PROGRESS_EVERY_S
    log_every: int = 0           # print a line every N steps when no bar is shown; 0: never

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"TrainConfig: {msg}")

        for name in ("steps", "batch_size", "block_size", "grad_accum", "eval_batches"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"{name} must be a positive int, got {v!r}")
        for name in ("warmup", "eval_every", "log_every", "seed", "salt"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{name} must be an int >= 0, got {v!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(0 < self.decay_frac <= 1, f"decay_frac must be in (0, 1], got {self.decay_frac}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(self.regime in REGIMES, f"regime must be one of {REGIMES}, got {self.regime!r}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.regime == "stochastic" or self.dropout == 0,
             f"the deterministic regime trains without dropout (got dropout={self.dropout}); "
             f"use regime='stochastic' for dropout")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig has no field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


# --- seeding and determinism ----------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_model(config, seed: int = 0, device="cpu") -> GPT:
    """A GPT whose initial weights depend on `seed` only (not on the global RNG)."""
    model = GPT(config)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.to(device)


@contextlib.contextmanager
def determinism(enabled: bool):
    """Deterministic kernels while training, restoring the process's settings after.
    warn_only: ops without a deterministic implementation warn instead of failing."""
    if not enabled:
        yield
        return
    # cuBLAS is deterministic only with a fixed workspace; it reads this on first use.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the model's dropout (config and modules) to p."""
    gpt = unwrap(model)
    if gpt.config.dropout != p:
        gpt.config = gpt.config.replace(dropout=p)
        gpt.rebuild_buffers()


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32. bf16 needs no loss scaling."""
    if cfg.dtype == "float32" or (cfg.dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def make_batches(tokens, cfg: TrainConfig):
    """The training stream of the regime: fixed order, or shuffled with the salt."""
    return Batches(tokens, cfg.block_size, cfg.batch_size, seed=cfg.seed,
                   shuffle=cfg.regime == "stochastic", salt=cfg.salt)


# --- optimizer and schedule -----------------------------------------------------

def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Two AdamW groups: decayed matrices, and undecayed 1-D gains/biases (and
    embeddings when decay_embeddings is off). Each group keeps the parameter names,
    which the checkpoint uses to check that the state belongs to the model. Under muP
    the decayed matrices split by LR multiplier (_mup_groups)."""
    gpt = unwrap(model)
    embeddings = {id(gpt.wte.weight)} | ({id(gpt.wpe.weight)} if gpt.wpe is not None else set())
    decay, no_decay = [], []
    for name, p in gpt.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and (cfg.decay_embeddings or id(p) not in embeddings):
            decay.append((name, p))
        else:
            no_decay.append((name, p))
    if getattr(gpt.config, "parameterization", "sp") == "mup":
        return _mup_groups(gpt, cfg, decay, no_decay)
    return [{"params": [p for _, p in decay], "param_names": [n for n, _ in decay],
             "weight_decay": cfg.weight_decay},
            {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay],
             "weight_decay": 0.0}]


def _mup_groups(gpt, cfg: TrainConfig, decay: list, no_decay: list) -> list[dict]:
    """muP (growkern/growth/mup.py): SP's decayed group cut where its parameters change between
    hidden matrices (lr / m) and the rest (lr): [wte, wpe], [hidden matrices], [lm_head]
    (the parameters keep SP's order, so at the base width training is SP's bit for bit);
    then the undecayed group as under SP. Each group holds its LR ("lr") and its
    multiplier ("mup_lr_mult"), which widen_ updates when the width changes."""
    mult = {n: mup.lr_multiplier(param_kind(n), gpt.config) for n, _ in decay + no_decay}
    runs = []
    for n, p in decay:
        hidden = param_kind(n) == "hidden"
        if not runs or runs[-1][0] != hidden:
            runs.append((hidden, []))
        runs[-1][1].append((n, p))
    groups = []
    for members, wd in [(r, cfg.weight_decay) for _, r in runs] + [(no_decay, 0.0)]:
        if not members:
            continue
        m = mult[members[0][0]]
        assert all(mult[n] == m for n, _ in members), "one LR multiplier per group"
        groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members],
                       "weight_decay": wd, "lr": cfg.lr * m, "mup_lr_mult": m})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Fused AdamW updates every tensor in one kernel; on CPU it is about 10x faster than
    # the default per-tensor loop and just as deterministic. widen_ grows its state too.
    device = next(model.parameters()).device
    fused = cfg.fused if cfg.fused is not None else device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=fused or None)


class LRSchedule:
    """LR multiplier for 0-indexed training step s, handed to LambdaLR.

    A callable object rather than a closure, so that LambdaLR.state_dict() stores its
    fields and a checkpoint can tell which schedule it was made with.
    """

    def __init__(self, kind: str, steps: int, warmup: int, min_ratio: float, decay_frac: float = 0.2):
        self.kind, self.steps, self.warmup = kind, steps, warmup
        self.min_ratio, self.decay_frac = min_ratio, decay_frac

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "LRSchedule":
        return cls(cfg.schedule, cfg.steps, cfg.warmup, cfg.min_lr / cfg.lr, cfg.decay_frac)

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup  # never 0: step 0 already learns something
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            p = min(1.0, (s - self.warmup) / max(1, self.steps - self.warmup))
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        # wsd: hold the peak, then decay linearly to min over the last decay_frac of the run
        start = max(self.warmup, self.steps - round(self.decay_frac * self.steps))
        if s < start:
            return 1.0
        p = min(1.0, (s - start) / max(1, self.steps - start))
        return 1.0 - (1 - self.min_ratio) * p

    def __eq__(self, other):
        return isinstance(other, LRSchedule) and vars(self) == vars(other)

    def __repr__(self):
        return f"LRSchedule({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def build_scheduler(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR (not a chain of schedulers) so that growkern.schedule's rewarm ramp can
    # wrap it and its state round-trips through a checkpoint.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule.from_config(cfg))


# --- evaluation and FLOPs -------------------------------------------------------

def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, dtype: torch.dtype | None = None) -> float:
    """Mean next-token loss (nats/token) over (x, y) batches, weighted by batch size."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for x, y in batches:
            with _autocast(device, dtype):
                _, loss = model(x.to(device), y.to(device))
            total += float(loss) * x.shape[0]
            n += x.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate got no batches")
    return total / n


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (forward + backward through the non-embedding
    parameters) + 6 L d_model T (attention scores and weighted sum; the causal mask
    halves the 12 L d T of full attention). Same convention as docs/studies.md."""
    gpt = unwrap(model)
    c = gpt.config
    return 6 * gpt.num_params(non_embedding=True) + 6 * c.n_layer * c.d_model * seq_len


# Dense peak FLOP/s (bf16 tensor cores, plain fp32) for MFU, matched by substring of the
# device name, longer names first; cfg.peak_flops overrides. SXM parts where both exist.
PEAK_FLOPS = {
    "H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12), "L4": (121e12, 30.3e12), "A10": (125e12, 31.2e12),
    "4090": (165e12, 82.6e12), "3090": (71e12, 35.6e12), "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


def peak_flops(device: torch.device, dtype) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAK_FLOPS.items():
        if key in name:
            return bf16 if dtype is not None else fp32
    return None


# --- the loop -------------------------------------------------------------------

def drop_records_after(path, step: int) -> None:
    """Make the JSONL log at `path` hold only the complete records of steps <= `step`.
    A run killed after its last checkpoint logged steps that resuming from that
    checkpoint logs again, and a kill mid-write leaves a torn last line; both go, so an
    interrupted and resumed run logs what an uninterrupted one does. The log is
    rewritten atomically (staging.atomic_open), and only when something goes."""
    path = Path(path)
    remove_stale_staging(path)  # the temp file of a rewrite that was killed
    try:
        lines = path.read_bytes().splitlines(keepends=True)
    except FileNotFoundError:
        return
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # torn by a kill mid-write
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line if line.endswith(b"\n") else line + b"\n")
    if keep == lines:
        return
    with atomic_open(path) as f:
        f.writelines(keep)


class _JsonlLog:
    def __init__(self, path):
        self.f, self.path, self.failed = None, path, False
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict):
        if self.f is not None:
            try:
                self.f.write(json.dumps(record) + "\n")
                self.f.flush()  # a crashed run keeps its curve up to the last step
            except OSError as e:  # a full disk: one line naming the log, not a traceback
                self.failed = True
                raise write_error(e, self.path) or e from e

    def close(self):
        if self.f is not None:
            try:
                self.f.close()
            except OSError:
                if not self.failed:  # else the failed write is being reported already
                    raise


def _progress_bar(cfg: TrainConfig, start: int, end: int):
    show = cfg.progress and sys.stderr.isatty()
    if not show:
        return None
    return tqdm(total=end, initial=start, unit="step", dynamic_ncols=True, leave=True)


# Off a terminal (a pipe, a log file, CI, a notebook) there is no bar: with progress on
# and no log_every lines, a plain line goes to stderr at most this often, and at the end.
PROGRESS_EVERY_S = 20.0


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _ProgressLines:
    """The bar's stand-in off a terminal: format_record lines with elapsed time and ETA."""

    def __init__(self, start: int, end: int, every: float):
        self.start, self.end, self.every = start, end, every
        self.t0 = self.last = time.perf_counter()
        self.shown = None

    def update(self, rec: dict, final: bool = False) -> None:
        now = time.perf_counter()
        if (now - self.last < self.every and not final) or rec["step"] == self.shown:
            return
        self.last, self.shown = now, rec["step"]
        elapsed, done = now - self.t0, rec["step"] - self.start
        eta = elapsed / done * (self.end - rec["step"]) if done > 0 else 0.0
        print(f"{format_record(rec, self.end)} | {_duration(elapsed)} elapsed, ETA {_duration(eta)}",
              file=sys.stderr, flush=True)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches: Iterator,
          cfg: TrainConfig, *, start_step: int = 0, end_step: int | None = None,
          eval_data: list | None = None, on_step: Callable[[dict], bool | None] | None = None
          ) -> list[dict]:
    """Train from `start_step` (optimizer steps already done) to `end_step` (default
    cfg.steps; the schedule's horizon stays cfg.steps, so a run can stop early and be
    resumed, or be grown half-way). Returns one metrics record per step:
    step (updates done after it), loss, lr, grad_norm, dt_ms, tok_s, mfu (CUDA),
    and val_loss where evaluated (every cfg.eval_every steps and at the end, when
    eval_data is given). `on_step(record)` runs after each step; returning True stops.
    The records go to cfg.log_path too, after dropping those of steps past start_step
    that a run killed after its last checkpoint left there (drop_records_after).

    A DistributedDataParallel `model` trains data-parallel (growkern/distributed.py):
    cfg.batch_size is the global batch, each rank takes its rows of it, the logged loss
    is the mean over ranks, eval, the log and progress run on rank 0 (val_loss is sent
    to every rank), records carry parallel and world_size and are the same on every
    rank, so on_step must decide the same everywhere.
    """
    ctx = dist_mod.context(model)
    dist_mod.check_batch(cfg.batch_size, ctx)
    end = cfg.steps if end_step is None else end_step
    device = next(model.parameters()).device
    dtype = autocast_dtype(cfg, device)
    gpt = unwrap(model)
    if cfg.block_size > gpt.config.block_size:
        raise ValueError(f"TrainConfig.block_size {cfg.block_size} exceeds the model's "
                         f"block_size {gpt.config.block_size}")
    set_dropout(gpt, cfg.dropout)
    fwd = torch.compile(model) if cfg.compile and not hasattr(model, "_orig_mod") else model
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    peak = cfg.peak_flops or peak_flops(device, dtype)
    if peak:
        peak *= ctx.world_size  # tokens_per_step is the global batch's
    if cfg.log_path and ctx.is_main:
        drop_records_after(cfg.log_path, start_step)  # steps a killed run logged past its checkpoint
    log = _JsonlLog(cfg.log_path if ctx.is_main else None)
    bar = _progress_bar(cfg, start_step, end) if ctx.is_main else None
    lines = (_ProgressLines(start_step, end, PROGRESS_EVERY_S)
             if bar is None and cfg.progress and not cfg.log_every and ctx.is_main else None)
    rec = None
    history = []
    model.train()
    try:
        with determinism(cfg.regime == "deterministic"):
            for step in range(start_step, end):
                t0 = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                loss_sum = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    x, y = next(batches)
                    if ctx.distributed:  # this rank's rows of the global batch
                        x, y = dist_mod.shard(x, ctx), dist_mod.shard(y, ctx)
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    # DDP/FSDP2: gradients are averaged over ranks once, at the last micro-batch
                    with dist_mod.gradient_sync(model, micro == cfg.grad_accum - 1):
                        with _autocast(device, dtype):
                            _, loss = fwd(x, y)
                        # the mean over micro-batches, so grad_accum does not change the LR's meaning
                        (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach().float()
                if cfg.grad_clip > 0:
                    grad_norm = local(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                else:  # (FSDP2: each norm of a sharded gradient is a collective)
                    grad_norm = torch.linalg.vector_norm(
                        torch.stack([local(p.grad.norm()) for p in params if p.grad is not None]))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum = dist_mod.mean_over_ranks(loss_sum, ctx)  # the global batch's loss
                # one device sync per step, for both numbers
                train_loss, grad_norm = torch.stack([loss_sum / cfg.grad_accum, grad_norm.float()]).tolist()
                dt = time.perf_counter() - t0

                rec = {"step": step + 1, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                       "dt_ms": dt * 1e3, "tok_s": tokens_per_step / dt}
                if peak:
                    rec["mfu"] = flops_per_token(gpt, cfg.block_size) * tokens_per_step / dt / peak
                if ctx.distributed:
                    rec.update(ctx.describe())
                last = step + 1 == end
                if eval_data is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
                    if ctx.kind == "fsdp":  # every rank: the forward gathers the shards
                        rec["val_loss"] = evaluate(model, eval_data, dtype)
                        reshard(model)  # a forward without backward leaves the root gathered
                    elif ctx.distributed:  # on rank 0, through the module (no DDP collectives)
                        val = evaluate(gpt, eval_data, dtype) if ctx.is_main else None
                        rec["val_loss"] = dist_mod.broadcast_float(val, ctx, device)
                    else:
                        rec["val_loss"] = evaluate(fwd, eval_data, dtype)
                history.append(rec)
                log.write(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{rec[k]:.4g}" for k in ("loss", "val_loss", "lr") if k in rec}
                                    | {"tok/s": f"{rec['tok_s']:.0f}"})
                elif cfg.log_every and ctx.is_main and ((step + 1) % cfg.log_every == 0 or last
                                                        or "val_loss" in rec):
                    print(format_record(rec, end), flush=True)
                elif lines is not None and not last:
                    lines.update(rec)
                if on_step is not None and on_step(rec):
                    break
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"loss is {train_loss} at step {step + 1}")
        if lines is not None and rec is not None:
            lines.update(rec, final=True)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    return history


def format_record(rec: dict, end: int | None = None) -> str:
    s = f"step {rec['step']}" + (f"/{end}" if end else "")
    s += f" | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | {rec['tok_s']:,.0f} tok/s"
    if "mfu" in rec:
        s += f" | mfu {rec['mfu']:.1%}"
    if "val_loss" in rec:
        s += f" | val {rec['val_loss']:.4f}"
    return s
