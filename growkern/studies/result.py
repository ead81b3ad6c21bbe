"""What a study call returns (run_warmstart, run_growth_factor): the output folder, the
rows of results.csv, and how many runs were trained in the call or read from the cache;
and the command line a report records when the study was called from Python."""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path


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
