"""What a study call returns (run_warmstart, run_growth_factor): the output folder, the
rows of results.csv, and how many runs were trained in the call or read from the cache;
the command line a report records when the study was called from Python; and where a
study writes when no output folder is given."""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..train.data import cache_root


@dataclass
class StudyResult:
    out: Path
    rows: list
    computed: int  # runs trained in this call
    cached: int  # runs read from the cache
    train_steps: int  # optimizer steps trained in this call (base + continuations)
    seconds: float
    files: list = field(default_factory=list)


def default_command(study: str, preset_name: str, out) -> str:
    """The command line that reruns `study` (warmstart, growth-factor) with this preset into `out`."""
    return shlex.join([Path(sys.executable).name, "-m", "growkern.studies", study,
                       "--preset", preset_name, "--out", str(out)])


def default_out(study: str, preset_name: str) -> Path:
    """Where a study writes when no --out is given: results/<study>-<preset> under the
    working directory (the committed results' place), except for the smoke preset, a
    pipeline check whose outputs nobody commits: <cache>/studies/<study>-smoke
    ($GROWKERN_CACHE, default ~/.cache/growkern), outside the repository, so a smoke run
    leaves `git status` clean and a rerun reuses its cached runs."""
    if preset_name == "smoke":
        return cache_root() / "studies" / f"{study}-smoke"
    return Path("results") / f"{study}-{preset_name}"
