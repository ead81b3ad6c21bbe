"""Names for staged writes and the cleanup of what killed writers leave behind.

A file or directory is written under a hidden staging name beside its target,
`.{name}.tmp-{pid}-{uuid8}`, then renamed over it, so readers see the old version or
the new one. A writer killed before the rename leaves its staging copy; the next
writer of the same target removes the copies of processes that no longer exist.
Used by checkpoints, metrics logs, the data and tokenizer caches, and the studies'
results. `atomic_open` is the whole recipe for one file.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path


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
    file or the whole new one, never a prefix (removed on failure). Text modes write
    UTF-8. What killed writers of `path` left is removed first."""
    path = Path(path)
    remove_stale_staging(path)
    tmp = staging_name(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
