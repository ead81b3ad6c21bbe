"""Names for staged writes and the cleanup of what killed writers leave behind.

A file or directory is written under a hidden staging name beside its target,
`.{name}.tmp-{pid}-{uuid8}`, then renamed over it, so readers see the old version or
the new one. A writer killed before the rename leaves its staging copy; the next
writer of the same target removes the copies of processes that no longer exist.
Used by checkpoints, metrics logs, the data and tokenizer caches, and the studies'
results. `atomic_open` is the whole recipe for one file.

A write that fails (a full disk above all) is reported by write_error in one line:
what was being written, the problem, and that nothing was (the staging copy is gone).
Writers say "disk full" in different ways: OSError ENOSPC, torch.save's RuntimeError
"unexpected pos" raised while the file's OSError is handled, safetensors' and
torch.distributed.checkpoint's text; disk_full reads them all.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from pathlib import Path

from ..growth.checks import format_bytes


def _pid_alive(pid: int) -> bool:
    """False only when no process `pid` exists; True when it does or we cannot tell."""
    if pid <= 0:
        return True  # 0 and negatives name process groups: never treat as gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, owned by someone else
        return True
    return True


def staging_name(path: Path, kind: str = "tmp") -> Path:
    """`.{name}.{kind}-{pid}-{uuid8}` beside `path`: where a write of `path` is staged
    (kind "tmp") or where its previous version waits to be removed (kind "old")."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_staging(path) -> list[Path]:
    """Remove what interrupted writes of `path` left beside it: the staging folders or
    files `.{name}.tmp-{pid}-{uuid8}` and `.{name}.old-{pid}-{uuid8}` of writer processes
    that no longer exist (a killed save leaves up to a whole checkpoint there). Those of
    a live process (a concurrent writer) are left alone. When `path` itself is missing
    because a save was killed between the two renames of the fallback swap, the
    previous version (`.old-`) is put back first. Best effort: what cannot be removed
    stays. Returns the paths removed."""
    path = Path(path)
    if not path.name:
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")
    stale, olds = [], []
    try:
        for e in os.scandir(path.parent):
            m = pattern.fullmatch(e.name)
            if m and not _pid_alive(int(m.group(2))):
                stale.append(Path(e.path))
                if m.group(1) == "old" and e.is_dir(follow_symlinks=False):
                    olds.append((e.stat(follow_symlinks=False).st_mtime, Path(e.path)))
    except OSError:
        return []
    if olds and not os.path.lexists(path):
        newest = max(olds)[1]
        stale.remove(newest)  # the only copy left: put back, or else kept
        with contextlib.suppress(OSError):
            os.rename(newest, path)
    removed = []
    for p in stale:
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:  # gone already (another cleaner), or not ours to remove
            pass
    return removed


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """A file object to write `path` through: it is written under a staging name beside
    `path`, synced, and renamed over it when the block succeeds, so readers see the old
    file or the whole new one, never a prefix (removed on failure; a failed write is a
    one-line WriteError). Text modes write UTF-8. What killed writers of `path` left is
    removed first."""
    path = Path(path)
    remove_stale_staging(path)
    tmp = staging_name(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is no Exception
        tmp.unlink(missing_ok=True)
        err = write_error(e, path)
        if err is None:
            raise
        raise err from e
    finally:
        tmp.unlink(missing_ok=True)


# --- failed writes ------------------------------------------------------------------

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how writers that raise no OSError say it: safetensors ("No space left on device (os
# error 28)"), torch.distributed.checkpoint (each rank's traceback in its message)
DISK_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# torch.save's own writer, when a write of the file it was given fails
TORCH_WRITE_FAILED = ("unexpected pos", "file write failed")


class WriteError(OSError):
    """A failed write of a checkpoint, log or cache, said in one line: what was being
    written, the problem, and that nothing was written."""


def _chain(e: BaseException, seen: set | None = None):
    """`e`, what it was raised from or while handling (unless suppressed), and the
    failures a torch.distributed.checkpoint CheckpointException carries per rank."""
    seen = set() if seen is None else seen
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                inner = failure[0] if isinstance(failure, tuple) and failure else failure
                if isinstance(inner, BaseException):
                    yield from _chain(inner, seen)
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)


def disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk (or the quota) is full, in any writer's words."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in DISK_FULL_ERRNOS:
            return True
        if any(t in str(x).lower() for t in DISK_FULL_TEXTS):
            return True
    return False


def _being_written(staging: Path | None, e: BaseException) -> str:
    """The file a failed write was writing, relative to its staging directory, when
    the error names it (an OSError's filename); else "" (safetensors and
    torch.distributed.checkpoint do not say)."""
    if staging is None:
        return ""
    for x in _chain(e):
        name = getattr(x, "filename", None)
        if isinstance(x, OSError) and name:
            with contextlib.suppress(ValueError):
                return str(Path(name).relative_to(staging))
    return ""


def write_error(e: BaseException, target, staging: Path | None = None) -> WriteError | None:
    """`e`, raised while writing `target` (through the staging directory `staging`), as
    a one-line WriteError naming the file and the problem, when it is a failed write
    (disk full, or an OSError of the writer); else None (not a write problem: re-raise it)."""
    if isinstance(e, WriteError):
        return e
    if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        return None
    target = Path(target)
    if disk_full(e):
        where = next((p for p in (target, *target.parents) if p.exists()), Path.cwd())
        try:
            free = f" ({format_bytes(shutil.disk_usage(where).free)} free on {where})"
        except OSError:
            free = ""
        problem, code = f"no space left on device{free}", errno.ENOSPC
    else:
        os_error = next((x for x in _chain(e) if isinstance(x, OSError)), None)
        if os_error is None or not (isinstance(e, OSError)
                                    or any(t in str(x) for x in _chain(e) for t in TORCH_WRITE_FAILED)):
            return None
        name = getattr(os_error, "filename", None)
        if name and staging is not None and not Path(name).is_relative_to(staging):
            return None  # a file read along the way (a source to copy), not one being written
        problem, code = os_error.strerror or str(os_error), os_error.errno
    inside = _being_written(staging, e)
    kept = f"; {target} is as it was" if os.path.lexists(target) else ""
    err = WriteError(f"cannot write {target}{f' ({inside})' if inside else ''}: {problem}; "
                     f"nothing was written{kept}")
    err.errno = code
    return err
