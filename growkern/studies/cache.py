"""Per-run result cache: each run's result is one JSON file named by a hash of its full
config, written atomically, so an interrupted study keeps every finished run and a
rerun recomputes only runs whose config changed."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..train.staging import atomic_open

# Bump when a change in the study code changes results, so old results are not reused.
STUDY_VERSION = 2


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def config_key(config: dict) -> str:
    """Short sha256 of a config (canonical JSON, keys sorted)."""
    blob = json.dumps(_jsonable({"study_version": STUDY_VERSION, **config}), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write_json(path, obj) -> None:
    """Write JSON atomically (staging.atomic_open): readers see the old file or the
    whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=1, sort_keys=True)
        f.write("\n")


def read_json(path):
    """The JSON at path, or None when it is missing or unreadable (a torn write is
    impossible, but a hand-edited file may be)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RunStore:
    """Results of runs under `<root>/<key>.json`; counts hits and computed runs."""

    def __init__(self, root):
        self.root = Path(root)
        self.hits = 0
        self.computed = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def has(self, key: str) -> bool:
        return self.get(key, count=False) is not None

    def get(self, key: str, count: bool = True):
        rec = read_json(self.path(key))
        if not isinstance(rec, dict) or rec.get("key") != key or "result" not in rec:
            return None
        if count:
            self.hits += 1
        return rec["result"]

    def put(self, key: str, config: dict, result: dict) -> None:
        atomic_write_json(self.path(key), {"key": key, "config": config, "result": result})
        self.computed += 1

    def cached(self, key: str, config: dict, compute):
        """The stored result for key, or compute() stored under it."""
        res = self.get(key)
        if res is None:
            res = compute()
            self.put(key, config, res)
        return res


def check_output(out, study: str, preset: dict, corpus_key: str | None = None, force: bool = False) -> None:
    """Refuse to write a study's report over a different study's: `out`/study.json names
    the study, preset and data whose results the folder holds. Per-run results are keyed
    by their config and never clash; the report, results.csv and plots would be replaced."""
    held = read_json(Path(out) / "study.json")
    if force or not isinstance(held, dict):
        return
    preset = json.loads(json.dumps(_jsonable(preset)))  # as study.json stores it: tuples are lists
    mine = {"study": study, "preset": preset, "corpus_key": corpus_key}
    differ = [k for k in mine if mine[k] is not None and held.get(k) != mine[k]]
    if not differ:
        return
    if "study" in differ:
        what = f"the {held.get('study')} study"
    elif "preset" in differ:
        fields = sorted(k for k in set(preset) | set(held.get("preset") or {})
                        if preset.get(k) != (held.get("preset") or {}).get(k))
        what = f"preset {(held.get('preset') or {}).get('name')!r} (differs in {', '.join(fields)})"
    else:
        what = f"results on other data ({held.get('data')})"
    raise ValueError(f"{out} holds {what}; this {study} run would replace its report: give another "
                     f"--out folder, or --force to replace it")
