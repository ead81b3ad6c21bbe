"""The two studies (docs/studies.md), each one command that trains, grows, continues and
writes results.csv, report.md and PNG plots into its output folder:

- run_warmstart / `growkern study warmstart`: which warm start to continue from;
- run_growth_factor / `growkern study growth-factor`: which growth factor pays off.

Each study is a package with its design, its run and its report (warmstart/,
growth_factor/: design.py, run.py, report.py); the helpers both use are flat modules
here (presets, cache, runs, pool, heldout, metrics, stats, render, progress, result).

Presets (smoke, cpu, paper) are in growkern.studies.presets. For the CLI owner:
add_study_parser(subparsers) adds `study warmstart|growth-factor` to a subparsers
object; run_study_cli(args) runs the parsed command.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .growth_factor import run_growth_factor
from .presets import GROWTH_FACTOR, WARMSTART, get_preset
from .result import StudyResult, default_out
from .warmstart import run_warmstart

__all__ = ["run_warmstart", "run_growth_factor", "StudyResult", "get_preset", "add_study_parser",
           "add_study_commands", "run_study_cli", "STUDIES"]

STUDIES = {"warmstart": run_warmstart, "growth-factor": run_growth_factor}


def add_study_commands(subparsers) -> None:
    """Add `warmstart` and `growth-factor` commands to an argparse subparsers object."""
    helps = {"warmstart": "which warm start to continue from (rankings of growth strategies)",
             "growth-factor": "which growth factor pays off (speedup over scratch per factor and budget)"}
    for name, help_ in helps.items():
        presets = WARMSTART if name == "warmstart" else GROWTH_FACTOR
        sp = subparsers.add_parser(name, help=help_, description=help_)
        sp.add_argument("--preset", default="smoke", choices=sorted(presets),
                        help="sizes and budgets: smoke (CI, minutes), cpu (under an hour on 2 CPU cores), "
                             "paper (one GPU)")
        seeds_help = ("base models" if name == "warmstart" else
                      "small models' and scratch runs' inits and data orders")
        field = "base_seeds" if name == "warmstart" else "seeds"
        defaults = "; ".join(f"{n} {','.join(map(str, getattr(pr, field)))}" for n, pr in presets.items())
        sp.add_argument("--seeds", type=_seed_list, default=None, metavar="S,S,...",
                        help=f"seeds of the {seeds_help} (default: the preset's: {defaults}); runs of "
                             f"seeds already in --out are reused, so adding seeds computes only theirs")
        sp.add_argument("--out", default=None,
                        help=f"output folder (default results/{name}-<preset>; for smoke, a pipeline "
                             f"check, {default_out(name, 'smoke')} outside the repository, under "
                             f"$GROWKERN_CACHE or ~/.cache/growkern); rerunning into it reuses every "
                             f"finished run")
        sp.add_argument("--data", default=None,
                        help="directory with train.txt/valid.txt (default: $GROWKERN_DATA, then "
                             "../shared/data/tinystories, then a download)")
        sp.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
        sp.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the preset's; 1 for smoke and cpu)")
        if name == "growth-factor":
            sp.add_argument("--strategy", default=None,
                            help="growth strategy (default: the preset's, szp)")
        sp.add_argument("--workers", type=int, default=None,
                        help="processes running independent runs at once (default: every core on a "
                             "CPU, 1 on a GPU); results do not depend on it")
        sp.add_argument("--force", action="store_true",
                        help="replace the report of a different preset, data or study in --out")
        sp.add_argument("--quiet", action="store_true", help="no progress lines")
        sp.set_defaults(study=name)


def _seed_list(text: str) -> tuple:
    """'0,1,2' -> (0, 1, 2): distinct non-negative integers."""
    try:
        seeds = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers like 0,1,2, got {text!r}")
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def add_study_parser(subparsers):
    """Add `study warmstart|growth-factor` to the growkern CLI's subparsers; returns the
    `study` parser. Dispatch with run_study_cli(args)."""
    p = subparsers.add_parser("study", help="run a study: warmstart or growth-factor",
                              description="Run a study end to end (docs/studies.md).")
    add_study_commands(p.add_subparsers(dest="study", required=True, metavar="{warmstart,growth-factor}"))
    p.set_defaults(func=run_study_cli)
    return p


def run_study_cli(args, command: str | None = None) -> int:
    """Run the study parsed by add_study_parser/add_study_commands; `command` is the
    command line recorded in the report (default: this process's). Returns 0."""
    overrides = {}
    if getattr(args, "seeds", None):
        overrides["base_seeds" if args.study == "warmstart" else "seeds"] = args.seeds
    if getattr(args, "strategy", None):
        overrides["strategy"] = args.strategy
    if command is None:
        command = shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])
    out = args.out if args.out is not None else default_out(args.study, args.preset)
    STUDIES[args.study](args.preset, out, args.data, device=args.device, threads=args.threads,
                        progress=not args.quiet, command=command, force=args.force,
                        workers=args.workers, **overrides)
    return 0
