"""Command line: `growkern train | grow | select | eval | sample | demo` (also `python -m growkern`).

Every command that writes takes --out, a run directory: its checkpoint goes to
RUN/ckpt and its metrics to RUN/metrics.jsonl. Wherever a CKPT is expected, a run
directory or the checkpoint directory itself is accepted.

One module per command (train, grow, select, evaluate: eval and sample, demo), each with its
cmd_* function and an add_parsers(subparsers) that adds its parser; common.py holds
what they share. This module assembles the parser, with the commands other packages
add (extend), and runs a command: a user's mistake, a corrupt file or a full disk is one
error line and exit status 2; Ctrl-C is one line and exit status 130, no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

import torch

from ..train import checkpoint as ckpt_mod
from . import demo, evaluate, grow, select, train
from .common import CLIError, _Formatter

COMMANDS = (train, grow, select, evaluate, demo)  # the modules, in the order `growkern --help` lists them


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="growkern", formatter_class=_Formatter,
        description="Train a GPT on TinyStories, grow it in width with its whole training state, "
                    "and keep training.",
        epilog="Quick start:  growkern demo\n"
               "Step by step:\n"
               "  growkern train --preset tiny --steps 400 --stop-at 200 --out runs/small\n"
               "  growkern grow runs/small --factor 2 --strategy perturb --out runs/wide\n"
               "  growkern train --resume runs/wide\n"
               "  growkern eval runs/wide\n"
               "  growkern sample runs/wide --prompt 'Once upon a time'\n"
               "Data: --data PATH, $GROWKERN_DATA, ../shared/data/tinystories beside the repo, "
               "or a download from the Hugging Face hub.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parsers(sub)
    for register in _EXTENSIONS:
        register(sub)
    return p


# Other modules add subcommands with `growkern.cli.extend(fn)`, fn(subparsers) adding a
# parser whose `func` default runs it; (module, function) pairs below are loaded on use.
_EXTENSIONS: list = []
_EXTENSION_MODULES = (("growkern.studies", "add_study_parser"),)


def extend(fn):
    _EXTENSIONS.append(fn)
    return fn


def _load_extensions():
    for name, attr in _EXTENSION_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                continue
            fn = getattr(importlib.import_module(name), attr)
        except Exception as e:  # a broken extension must not take the core commands down
            print(f"growkern: warning: could not load {name}.{attr}: {e}", file=sys.stderr)
            continue
        if fn not in _EXTENSIONS:
            _EXTENSIONS.append(fn)


def main(argv=None) -> int:
    try:
        _load_extensions()
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        if os.environ.get("GROWKERN_DEBUG"):
            raise
        return _interrupted(None)
    threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return args.func(args) or 0
    except (CLIError, ckpt_mod.CheckpointError, OSError, ValueError, MemoryError) as e:
        if os.environ.get("GROWKERN_DEBUG"):
            raise
        # one line, whatever the message: a library's may span several (transformers' loaders)
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"growkern {args.command}: error: {text or type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("GROWKERN_DEBUG"):
            raise
        return _interrupted(args.command)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their setting back


def _interrupted(command: str | None) -> int:
    """Ctrl-C: one line and the shell's status for SIGINT (128 + 2), no traceback.
    Writes in flight were staged (checkpoints, logs, caches) and are gone; what was
    there before is as it was."""
    print(f"growkern{f' {command}' if command else ''}: interrupted; files being written were "
          f"discarded, what was there before is kept", file=sys.stderr)
    return 130
