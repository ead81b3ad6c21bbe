"""Full-state checkpoints: everything needed to continue a run exactly, or grow it.

A checkpoint is a directory:

    meta.json          format, step, GPTConfig, TrainConfig, tokenizer reference,
                       growth history, parameter names, the parallelism of the run
                       that wrote it (parallel, world_size), and the size and sha256 of
                       every other file (written last: its presence marks completion)
    model.safetensors  weights (model.pt when safetensors is not installed)
    optimizer.pt       optimizer.state_dict()
    state.pt           scheduler.state_dict(), RNG states (torch, CUDA, numpy,
                       python), data cursor (Batches.state_dict())
    tokenizer.json     a copy of the tokenizer, so eval/sample need no cache

A distributed run (DDP or FSDP2 under torchrun) writes its tensors with
torch.distributed.checkpoint instead: dcp/ holds every rank's shards (weights as
"model/NAME", optimizer moments as "optim/INDEX/KEY"), optimizer.pt the optimizer's
param_groups and non-tensor state, and meta.json says "storage": "dcp". All ranks
write into the same hidden directory (on a filesystem every rank sees), rank 0
swaps it in; it loads in one process (eval, sample, grow) or on any number of ranks.

Saving writes a hidden temporary directory beside the target and swaps it in with
one rename, so a crash at any point leaves either the old checkpoint or the new one,
never a mix; the hidden directory a killed save leaves behind is removed by the next
save or load of that checkpoint. Loading checks everything it can and names what is
wrong.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..growth import schedule as schedule_mod
from ..growth.wrappers import unwrap
from ..models.gpt import GPT, GPTConfig
from .distributed import context, shard_model
from .loop import LRSchedule, TrainConfig, build_optimizer, build_scheduler, make_batches
from .staging import remove_stale_staging, staging_name, write_error

FORMAT = 1
META = "meta.json"
WEIGHTS_ST, WEIGHTS_PT = "model.safetensors", "model.pt"
OPTIMIZER, STATE, TOKENIZER = "optimizer.pt", "state.pt", "tokenizer.json"
REQUIRED_META = ("format", "step", "gpt_config", "train_config", "files", "weights",
                 "param_names", "growth_history")

try:
    import safetensors.torch as _st
except ImportError:  # optional: torch.save is the fallback
    _st = None


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or inconsistent; the message says what."""


# --- RNG ------------------------------------------------------------------------

def rng_state() -> dict:
    """Every RNG a run draws from, in a form torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(gauss)),
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# --- writing --------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_weights(directory: Path, model: GPT) -> str:
    # named_parameters lists a tied tensor once, which safetensors requires
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    tensors.update({n: b.detach().contiguous() for n, b in model.named_buffers()
                    if n in model.state_dict()})  # persistent buffers only
    if _st is not None:
        _st.save_file(tensors, str(directory / WEIGHTS_ST))
        return WEIGHTS_ST
    _write_torch(directory / WEIGHTS_PT, tensors)
    return WEIGHTS_PT


def _write_torch(path: Path, obj) -> None:
    # through a file object: torch.save to a path reports a failed write (a full disk)
    # as RuntimeError "unexpected pos" and nothing else; to a file object, it raises
    # that while the file's OSError is handled (or the OSError itself), re-raised here
    # naming the file
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except (OSError, RuntimeError) as e:
            cause = e if isinstance(e, OSError) else e.__context__
            if isinstance(cause, OSError) and cause.errno is not None and not cause.filename:
                raise OSError(cause.errno, cause.strerror, str(path)) from e
            raise


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def file_entry(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    system cannot, so the caller falls back to two renames."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def staged_directory(path: Path, tmp: Path | None = None, made: list[Path] | None = None):
    """A hidden temporary directory beside `path`, to write into. When the block
    succeeds, its files are synced and it replaces `path` (or becomes it) with one
    atomic exchange, so a crash at any point leaves the old directory or the new one,
    never a mix; on failure it is removed and `path` is untouched, and a failed write
    (a full disk) is a one-line WriteError naming the file (staging.write_error). What
    killed writes of `path` left beside it is removed first (remove_stale_staging).
    `tmp`: a staging directory made already (make_staging), as the ranks of a
    distributed save share, and `made` the directories made for it (new_parents)."""
    if tmp is None:
        made = new_parents(path)
        tmp = make_staging(path)
    made = made or []
    try:
        yield tmp
        for f in sorted(tmp.rglob("*"), reverse=True):  # files, then their directories
            _fsync(f)
        _fsync(tmp)
        if path.exists():
            if not _exchange(tmp, path):  # now tmp holds the old directory
                old = staging_name(path, "old")
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync(path.parent)
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is no Exception
        shutil.rmtree(tmp, ignore_errors=True)
        for d in made:  # the directories made for it, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        err = write_error(e, path, tmp)  # the free space it reports is what the user has, staging gone
        if err is None:
            raise
        raise err from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def new_parents(path: Path) -> list[Path]:
    """The directories above `path` that do not exist yet (deepest first): what a write
    of `path` makes, and a failed one removes again (if they are still empty)."""
    return [p for p in path.parents if not p.exists()]


def make_staging(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    tmp = staging_name(path)
    tmp.mkdir()
    return tmp


def _to_dict(x):
    return asdict(x) if is_dataclass(x) else dict(x)


def save(path, model, optimizer, scheduler, *, step: int, train_config: TrainConfig,
         batches=None, data_state: dict | None = None, tokenizer: dict | None = None,
         tokenizer_file=None,
         growth_history=(), rng: dict | None = None, extra: dict | None = None,
         storage: str | None = None, write_tensors=None, optimizer_skeleton: dict | None = None) -> Path:
    """Write a full-state checkpoint to directory `path`, atomically replacing any
    checkpoint there. `batches`: the training stream (its cursor is saved);
    `tokenizer`: a reference such as tokenizer_ref(corpus) (path, cache key, vocab);
    `tokenizer_file`: a tokenizer.json to copy in (default: tokenizer['path']);
    `growth_history`: GrowthReports or dicts; `rng`: default, the current RNG states.
    `storage`: "file" (one process writes), "dcp" (torch.distributed.checkpoint);
    default: "dcp" for a DDP or FSDP2 model (then a collective: every rank calls save),
    else "file". For writers that stream the tensors (growkern/train/offline.py): with
    storage="dcp", `write_tensors(directory)` writes dcp/ instead of the model's and
    optimizer's tensors, and `optimizer_skeleton` is optimizer.pt's content."""
    if storage not in (None, "file", "dcp"):
        raise ValueError(f"storage must be 'file' or 'dcp', got {storage!r}")
    path = Path(path)
    ctx = context(model)
    parallel = ctx.describe()  # a DDP wrapper: {"parallel": "ddp", "world_size": N}
    model = unwrap(model)
    # load() rebuilds both from the TrainConfig, so they must be the ones it would build
    if any("param_names" not in g for g in optimizer.param_groups):
        raise ValueError("save() needs the optimizer of growkern.train.build_optimizer "
                         "(its param groups carry the parameter names)")
    if not (isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
            and all(isinstance(f, LRSchedule) for f in scheduler.lr_lambdas)):
        raise ValueError("save() needs the scheduler of growkern.train.build_scheduler "
                         "(a LambdaLR of LRSchedule)")
    if (write_tensors is not None or optimizer_skeleton is not None) and storage != "dcp":
        raise ValueError("write_tensors and optimizer_skeleton go with storage='dcp'")
    if ctx.distributed and storage == "file":
        raise ValueError("a distributed model is saved with storage='dcp' (each rank writes its shards)")
    if path.exists() and not (path / META).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not a growkern checkpoint; refusing to replace it")
    distributed = ctx.distributed or storage == "dcp"
    made = new_parents(path) if ctx.is_main else []
    if ctx.distributed:  # a collective: rank 0 makes the staging directory, every rank writes into it
        name = [str(make_staging(path)) if ctx.is_main else None]
        dist.broadcast_object_list(name, src=0, group=ctx.group)
        tmp = Path(name[0])
        err = None
        try:
            _write_dcp(tmp, model, optimizer, ctx)
        except Exception as e:  # noqa: BLE001 - re-raised below, after every rank knows
            err = e
        failed = torch.tensor([float(err is not None)])
        dist.all_reduce(failed, group=ctx.group)  # every rank learns whether all wrote their shards
        if failed.item():
            if ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                for d in made:
                    with contextlib.suppress(OSError):
                        d.rmdir()
            if err is not None:
                raise write_error(err, path) or err
            raise RuntimeError(f"saving {path} failed on another rank; the previous checkpoint is kept")
        rng_ranks = [None] * ctx.world_size  # each rank's RNG: a resume on as many ranks continues each stream
        dist.all_gather_object(rng_ranks, rng_state(), group=ctx.group)
        if not ctx.is_main:
            dist.barrier(group=ctx.group)  # rank 0 finishes and swaps the directory in
            return path
    else:
        rng_ranks = None
        tmp = make_staging(path)
    try:
        with staged_directory(path, tmp, made):  # a failure from here on removes tmp, leaves path as it was
            if not ctx.distributed and write_tensors is not None:
                write_tensors(tmp / DCP_DIR)
            elif not ctx.distributed and distributed:
                _write_dcp(tmp, model, optimizer, ctx)
            if distributed:
                weights = DCP_DIR
                _write_torch(tmp / OPTIMIZER, optimizer_skeleton or _optimizer_skeleton(optimizer))
            else:
                weights = _write_weights(tmp, model)
                _write_torch(tmp / OPTIMIZER, optimizer.state_dict())
            _write_torch(tmp / STATE, {
                "scheduler": scheduler.state_dict(),
                "rng": rng if rng is not None else rng_state(),
                "data": batches.state_dict() if batches is not None else data_state,
                **({"rng_ranks": rng_ranks} if rng_ranks and rng is None else {}),
            })
            tok_src = tokenizer_file or (tokenizer or {}).get("path")
            if tok_src and Path(tok_src).is_file():
                shutil.copyfile(tok_src, tmp / TOKENIZER)
            files = {str(f.relative_to(tmp)): file_entry(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
            meta = {
                "format": FORMAT, "step": int(step),
                "gpt_config": model.config.to_dict(), "train_config": train_config.to_dict(),
                "tokenizer": tokenizer, "growth_history": [_to_dict(r) for r in growth_history],
                "weights": weights, "storage": "dcp" if distributed else "file",
                "param_names": [g.get("param_names") for g in optimizer.param_groups],
                "torch": torch.__version__, "files": files, "extra": extra or {},
                **parallel,
            }
            _write_json(tmp / META, meta)  # last: a directory without it is not a checkpoint
    finally:
        if ctx.distributed:
                dist.barrier(group=ctx.group)
    return path


DCP_DIR = "dcp"


def _write_dcp(tmp: Path, model, optimizer, ctx) -> None:
    """Every rank writes its shards of the weights and optimizer moments (FSDP2's
    DTensors; DDP's replicated tensors are written once) with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    tensors = {f"model/{n}": p.detach() for n, p in model.named_parameters()}
    tensors.update({f"model/{n}": b.detach() for n, b in model.named_buffers() if n in model.state_dict()})
    for i, st in optimizer.state_dict()["state"].items():
        tensors.update({f"optim/{i}/{k}": v for k, v in st.items() if torch.is_tensor(v)})
    with quiet_dcp():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp / DCP_DIR)),
                 process_group=ctx.group if ctx.distributed else None, no_dist=not ctx.distributed)


@contextlib.contextmanager
def quiet_dcp():
    """torch.distributed.checkpoint warns that no process group is up each time one
    process reads or writes on purpose (no_dist). It also wraps what went wrong on each
    rank in a CheckpointException, which is a BaseException, not an Exception: a
    KeyboardInterrupt or growkern CheckpointError in it is raised as itself, anything
    else as a RuntimeError from it (its failures, such as a full disk's OSError, stay
    in the chain for staging.write_error)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")
        try:
            yield
        except BaseException as e:
            failures = getattr(e, "failures", None)
            if isinstance(e, Exception) or not isinstance(failures, dict):
                raise
            inner = [f[0] if isinstance(f, tuple) and f else f for f in failures.values()]
            own = next((x for x in inner if isinstance(x, (KeyboardInterrupt, CheckpointError))), None)
            if own is not None:
                raise own from None
            raise RuntimeError("torch.distributed.checkpoint failed: " + "; ".join(
                f"{type(x).__name__}: {x}" for x in inner)) from e


def _optimizer_skeleton(optimizer) -> dict:
    """optimizer.state_dict() without its tensors (they are in dcp/)."""
    sd = optimizer.state_dict()
    return {"state": {i: {k: v for k, v in st.items() if not torch.is_tensor(v)}
                      for i, st in sd["state"].items()},
            "tensor_keys": {i: [k for k, v in st.items() if torch.is_tensor(v)] for i, st in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def _dcp_metadata(path: Path):
    import torch.distributed.checkpoint as dcp
    try:
        return dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata()
    except Exception as e:
        raise _err(path, f"cannot read the metadata of {DCP_DIR}/: {e}") from None


def dcp_keys(path: Path) -> list[str]:
    """The tensor keys of a DCP checkpoint, in its metadata's order."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = _dcp_metadata(path).state_dict_metadata
    return [k for k, m in md.items() if isinstance(m, TensorStorageMetadata)]


def dcp_tensor_meta(path: Path, key: str) -> torch.Tensor:
    """A meta tensor of the size and dtype of one tensor of a DCP checkpoint."""
    m = _dcp_metadata(path).state_dict_metadata[key]
    return torch.empty(m.size, dtype=m.properties.dtype, device="meta")


def read_dcp_tensor(path: Path, key: str) -> torch.Tensor:
    """One whole tensor of a DCP checkpoint, on the CPU (reads only its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    want = dcp_tensor_meta(path, key)
    out = {key: torch.empty(want.shape, dtype=want.dtype)}
    try:
        with quiet_dcp():
            dcp.load(out, storage_reader=dcp.FileSystemReader(str(path / DCP_DIR)),
                     planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    except Exception as e:
        raise _err(path, f"cannot read {key} from {DCP_DIR}/: {e}") from None
    return out[key]


def write_dcp_lazily(directory: Path, specs: dict, build) -> None:
    """Write a DCP checkpoint (one process) whose tensors have the sizes and dtypes of
    `specs` (meta tensors by key) and whose values `build(key)` makes when the writer
    gets to that key: one tensor in memory at a time."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class BuildOnWrite(DefaultSavePlanner):
        def lookup_object(self, index):
            t = build(index.fqn)
            want = specs[index.fqn]
            if t.shape != want.shape or t.dtype != want.dtype:
                raise RuntimeError(f"{index.fqn}: built {tuple(t.shape)} {t.dtype}, planned "
                                   f"{tuple(want.shape)} {want.dtype}")
            return t.cpu()

    with quiet_dcp():
        dcp.save(specs, storage_writer=dcp.FileSystemWriter(str(directory), thread_count=1),
                 planner=BuildOnWrite(), no_dist=True)


def _read_dcp(path: Path) -> dict:
    """The whole tensors of a DCP checkpoint in this process, by key, on the CPU."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    try:
        reader = dcp.FileSystemReader(str(path / DCP_DIR))
        md = reader.read_metadata()
        out = {k: torch.empty(m.size, dtype=m.properties.dtype)
               for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
        # every rank reads every tensor whole: no collective needed, so no process group used
        with quiet_dcp():
            dcp.load(out, storage_reader=reader, no_dist=True)
    except Exception as e:
        raise _err(path, f"cannot read the distributed checkpoint {DCP_DIR}/: {e}") from None
    return out


# --- reading --------------------------------------------------------------------

def resolve(path) -> Path:
    """The checkpoint directory for `path`: the checkpoint itself or a run directory
    holding one in ckpt/. Leftovers of killed saves of either are removed on the way
    (remove_stale_staging)."""
    path = Path(path)
    for cand in (path, path / "ckpt"):
        remove_stale_staging(cand)
    for cand in (path, path / "ckpt"):
        if (cand / META).is_file():
            return cand
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: it does not exist")
    raise CheckpointError(f"{path} is not a growkern checkpoint (no {META} in it or in {path / 'ckpt'}); "
                          f"an interrupted save leaves no directory, so this is another kind of directory")


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: GPT
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    gpt_config: GPTConfig
    train_config: TrainConfig
    rng: dict
    data: dict | None
    tokenizer: dict | None
    growth_history: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    rng_ranks: list | None = None  # every rank's RNG states, from a distributed save

    def restore_rng_of(self, rank: int, world_size: int) -> bool:
        """Put back rank `rank`'s own RNG states when the checkpoint was written by
        `world_size` ranks (True); else nothing (False: the caller derives the rank's
        stream from the shared state, distributed.decorrelate_rng)."""
        if not self.rng_ranks or len(self.rng_ranks) != world_size:
            return False
        set_rng_state(self.rng_ranks[rank])
        return True

    @property
    def tokenizer_file(self) -> Path | None:
        f = self.path / TOKENIZER
        return f if f.is_file() else None

    def restore_rng(self) -> None:
        """Put every RNG back where it was at save time (needed for exact resume)."""
        set_rng_state(self.rng)

    def batches(self, tokens, train_config: TrainConfig | None = None):
        """The training stream at the saved cursor. With a train_config that differs
        from the saved one (e.g. another regime), its order and the saved cursor."""
        b = make_batches(tokens, train_config or self.train_config)
        if self.data is not None:
            if train_config is None:
                b.load_state_dict(self.data)
            else:
                b.step = int(self.data["step"])
        return b


def _err(path, msg):
    return CheckpointError(f"checkpoint {path}: {msg}")


def read_meta(path) -> tuple[Path, dict]:
    path = resolve(path)
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except ValueError as e:
        raise _err(path, f"{META} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise _err(path, f"{META} must hold an object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise _err(path, f"{META} lacks key(s) {missing}")
    if meta["format"] != FORMAT:
        raise _err(path, f"format {meta['format']!r}, this growkern reads format {FORMAT}")
    return path, meta


def _check_files(path: Path, meta: dict, verify: bool) -> None:
    listed = meta["files"]
    storage = meta.get("storage", "file")
    if storage not in ("file", "dcp"):
        raise _err(path, f"storage {storage!r}; this growkern reads 'file' and 'dcp'")
    need = (OPTIMIZER, STATE) + ((meta["weights"],) if storage == "file" else (f"{DCP_DIR}/.metadata",))
    for name in need:
        if name not in listed:
            raise _err(path, f"{META} does not list {name}")
    for name, entry in listed.items():
        f = path / name
        if not f.is_file():
            raise _err(path, f"file {name} is missing")
        if f.stat().st_size != entry["bytes"]:
            raise _err(path, f"file {name} has {f.stat().st_size} bytes, {META} says {entry['bytes']} "
                             f"(truncated or replaced)")
        if verify and file_entry(f)["sha256"] != entry["sha256"]:
            raise _err(path, f"file {name} is corrupt: its sha256 differs from the one in {META}")


def _configs(path: Path, meta: dict) -> tuple[GPTConfig, TrainConfig]:
    try:
        gcfg = GPTConfig(**meta["gpt_config"])
    except (TypeError, ValueError) as e:
        raise _err(path, f"bad gpt_config: {e}") from None
    try:
        tcfg = TrainConfig.from_dict(meta["train_config"])
    except (TypeError, ValueError) as e:
        raise _err(path, f"bad train_config: {e}") from None
    if tcfg.block_size > gcfg.block_size:
        raise _err(path, f"config mismatch: train_config.block_size {tcfg.block_size} > "
                         f"gpt_config.block_size {gcfg.block_size}")
    tok = meta.get("tokenizer") or {}
    if tok.get("vocab_size") and tok["vocab_size"] > gcfg.vocab_size:
        raise _err(path, f"config mismatch: the tokenizer has {tok['vocab_size']} tokens, "
                         f"gpt_config.vocab_size is {gcfg.vocab_size}")
    if tcfg.dropout != gcfg.dropout:
        raise _err(path, f"config mismatch: train_config.dropout {tcfg.dropout} != "
                         f"gpt_config.dropout {gcfg.dropout}")
    return gcfg, tcfg


def _read_weights_file(path: Path, meta: dict, device) -> dict:
    f = path / meta["weights"]
    try:
        if meta["weights"] == WEIGHTS_ST:
            if _st is None:
                raise _err(path, "weights are in safetensors format: pip install safetensors")
            return _st.load_file(str(f), device=str(device))
        return torch.load(f, map_location=device, weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise _err(path, f"cannot read {meta['weights']}: {e}") from None


def _load_weights(path: Path, meta: dict, model: GPT, device, sd: dict | None = None) -> None:
    """The weights into `model`: from the weights file, or `sd` (read from dcp/)."""
    if sd is None:
        sd = _read_weights_file(path, meta, device)
    expected = dict(model.named_parameters())
    expected.update({n: b for n, b in model.named_buffers() if n in model.state_dict()})
    missing = [n for n in expected if n not in sd]
    unexpected = [n for n in sd if n not in expected]
    wrong = [f"{n}: checkpoint {tuple(sd[n].shape)}, gpt_config expects {tuple(t.shape)}"
             for n, t in expected.items() if n in sd and sd[n].shape != t.shape]
    problems = []
    if missing:
        problems.append(f"missing weights {missing}")
    if unexpected:
        problems.append(f"unexpected weights {unexpected}")
    if wrong:
        problems.append("wrong shapes vs gpt_config (" + "; ".join(wrong) + ")")
    if problems:
        raise _err(path, "; ".join(problems))
    with torch.no_grad():
        for n, t in expected.items():
            t.copy_(sd[n])


def _load_optimizer(path: Path, meta: dict, optimizer, model: GPT, device, tensors: dict | None = None) -> None:
    try:
        sd = torch.load(path / OPTIMIZER, map_location=device, weights_only=True)
    except Exception as e:
        raise _err(path, f"cannot read {OPTIMIZER}: {e}") from None
    if tensors is not None:  # a DCP checkpoint: the moments come from dcp/
        try:
            for i, keys in sd.pop("tensor_keys").items():
                sd["state"][i].update({k: tensors[f"optim/{i}/{k}"].to(device) for k in keys})
        except KeyError as e:
            raise _err(path, f"{DCP_DIR}/ lacks optimizer tensor {e}") from None
    for k in ("state", "param_groups"):
        if k not in sd:
            raise _err(path, f"{OPTIMIZER} lacks key {k!r}")
    built = [g["param_names"] for g in optimizer.param_groups]
    saved = [g.get("param_names") for g in sd["param_groups"]]
    if saved != built:
        raise _err(path, f"config mismatch: the optimizer's parameter groups {saved} do not match "
                         f"the model and train_config's {built}")
    params = dict(model.named_parameters())
    names = [n for g in built for n in g]
    for idx, st in sd["state"].items():
        if not isinstance(idx, int) or not 0 <= idx < len(names):
            raise _err(path, f"optimizer state for unknown parameter index {idx!r}")
        p = params[names[idx]]
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                raise _err(path, f"optimizer state {k!r} of {names[idx]} has shape {tuple(v.shape)}, "
                                 f"the parameter {tuple(p.shape)}")
    optimizer.load_state_dict(sd)


def _load_state(path: Path) -> dict:
    try:
        st = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _err(path, f"cannot read {STATE}: {e}") from None
    for k in ("scheduler", "rng", "data"):
        if k not in st:
            raise _err(path, f"{STATE} lacks key {k!r}")
    return st


def _load_scheduler(path: Path, sched_state: dict, scheduler, tcfg: TrainConfig, step: int) -> None:
    want = LRSchedule.from_config(tcfg)
    got = (sched_state.get("lr_lambdas") or [None])[0]
    if got != vars(want):
        raise _err(path, f"config mismatch: the scheduler state was made for LRSchedule({got}), "
                         f"train_config gives {want}")
    # widen_(schedule="restart") puts the scheduler back to 0 and keeps the steps before
    restarted = (sched_state.get("_growkern_restart") or {}).get("steps_before", 0)
    if not isinstance(sched_state.get("last_epoch"), int) or sched_state["last_epoch"] + restarted != step:
        raise _err(path, f"config mismatch: the scheduler has taken {sched_state.get('last_epoch')} "
                         f"steps, the checkpoint is at step {step}")
    scheduler.load_state_dict(sched_state)
    schedule_mod.reattach(scheduler)  # a pending rewarm ramp comes back with its state


def load(path, device="cpu", verify: bool = True) -> Checkpoint:
    """Load a checkpoint (directory, or run directory with ckpt/) into a fresh model,
    AdamW and LambdaLR on `device`, ready to continue. Raises CheckpointError naming
    what is missing or inconsistent. RNG states are returned, not applied: call
    ckpt.restore_rng() before resuming for an exact continuation."""
    path, meta = read_meta(path)
    _check_files(path, meta, verify)
    gcfg, tcfg = _configs(path, meta)
    step = meta["step"]
    if not isinstance(step, int) or step < 0:
        raise _err(path, f"step must be an int >= 0, got {step!r}")
    device = torch.device(device)
    model = GPT(gcfg).to(device)
    tensors = _read_dcp(path) if meta.get("storage") == "dcp" else None
    weights = None
    if tensors is not None:
        weights = {k[len("model/"):]: v.to(device) for k, v in tensors.items() if k.startswith("model/")}
    _load_weights(path, meta, model, device, weights)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    _load_optimizer(path, meta, optimizer, model, device, tensors)
    state = _load_state(path)
    _load_scheduler(path, state["scheduler"], scheduler, tcfg, step)
    return Checkpoint(path=path, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                      gpt_config=gcfg, train_config=tcfg, rng=state["rng"], data=state["data"],
                      rng_ranks=state.get("rng_ranks"),
                      tokenizer=meta.get("tokenizer"), growth_history=list(meta["growth_history"]),
                      meta=meta)


def load_sharded(path, ctx, device, param_dtype: torch.dtype | None = None, verify: bool = True) -> Checkpoint:
    """A distributed (DCP) checkpoint straight into an FSDP2-sharded model, optimizer
    and scheduler on `ctx`'s ranks (a collective): the model is built on the meta
    device, sharded (distributed.shard_model), given storage, and DCP reads into each
    rank's shards only what the rank holds, resharding from however many ranks wrote
    it. The whole model is never in one process. Validation as in load(), against the
    checkpoint's DCP metadata; verify: rank 0 checks every file's sha256."""
    path, meta = read_meta(path)
    if meta.get("storage") != "dcp":
        raise _err(path, "load_sharded reads distributed (DCP) checkpoints; load() reads this one")
    _check_files(path, meta, verify and ctx.is_main)
    gcfg, tcfg = _configs(path, meta)
    step = meta["step"]
    if not isinstance(step, int) or step < 0:
        raise _err(path, f"step must be an int >= 0, got {step!r}")
    skeleton = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    md = _dcp_metadata(path).state_dict_metadata
    stored = {k: md[k].size for k in dcp_keys(path)}
    with torch.device("meta"):
        model = GPT(gcfg)
    params = dict(model.named_parameters())
    want = {f"model/{n}": p.shape for n, p in params.items()}
    problems = [f"missing {k}" for k in want if k not in stored]
    problems += [f"{k}: checkpoint {tuple(stored[k])}, gpt_config expects {tuple(v)}"
                 for k, v in want.items() if k in stored and tuple(stored[k]) != tuple(v)]
    if problems:
        raise _err(path, "; ".join(problems[:5]))
    model = shard_model(model, None, ctx, param_dtype, device=torch.device(device))
    model.to_empty(device=device)
    model.rebuild_buffers()  # RoPE tables: functions of the config, made on the new storage
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg)  # sets the groups' LRs to its step 0: load them after
    built = [g["param_names"] for g in optimizer.param_groups]
    saved = [g.get("param_names") for g in skeleton["param_groups"]]
    if saved != built:
        raise _err(path, f"config mismatch: the optimizer's parameter groups {saved} do not match "
                         f"the model and train_config's {built}")
    names = [n for g in built for n in g]
    sharded = dict(model.named_parameters())
    targets = {f"model/{n}": p.detach() for n, p in sharded.items()}
    for i, keys in skeleton["tensor_keys"].items():
        p = sharded[names[i]]
        st = optimizer.state[p]
        st.update(skeleton["state"].get(i, {}))
        for k in keys:
            key = f"optim/{i}/{k}"
            if key not in stored:
                raise _err(path, f"{DCP_DIR}/ lacks optimizer tensor {key}")
            st[k] = (torch.zeros(stored[key], dtype=md[key].properties.dtype) if k == "step"
                     else torch.zeros_like(p.detach()))
            targets[key] = st[k]
    for group, g in zip(optimizer.param_groups, skeleton["param_groups"]):
        group.update({k: v for k, v in g.items() if k != "params"})
    import torch.distributed.checkpoint as dcp
    try:
        with quiet_dcp():  # its CheckpointException as a RuntimeError, caught here
            dcp.load(targets, storage_reader=dcp.FileSystemReader(str(path / DCP_DIR)), process_group=ctx.group)
    except Exception as e:
        raise _err(path, f"cannot read the distributed checkpoint {DCP_DIR}/: {e}") from None
    state = _load_state(path)
    _load_scheduler(path, state["scheduler"], scheduler, tcfg, step)
    return Checkpoint(path=path, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                      gpt_config=gcfg, train_config=tcfg, rng=state["rng"], data=state["data"],
                      rng_ranks=state.get("rng_ranks"), tokenizer=meta.get("tokenizer"),
                      growth_history=list(meta["growth_history"]), meta=meta)


def tokenizer_ref(corpus, data_dir=None, vocab_request: int | None = None) -> dict:
    """What identifies a run's tokenizer and token cache (growkern.data.Corpus)."""
    return {"path": str(Path(corpus.path) / TOKENIZER), "cache_key": corpus.key,
            "cache_dir": str(corpus.path), "vocab_size": corpus.vocab_size,
            "vocab_request": vocab_request, "data": str(data_dir) if data_dir else None}
