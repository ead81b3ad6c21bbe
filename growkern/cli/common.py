"""What the commands share: their error, the presets, finding and tokenizing the data,
run directories and argument types.

A CLIError is a mistake of the user's: main prints it as one line and exits 2. The
data of a command is --data, then $GROWKERN_DATA, then the sample beside the repository,
then the hub (growkern.train.data.default_data); a checkpoint's data is tokenized with its
own tokenizer (corpus_for).
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

from ..growth.checks import format_bytes
from ..train import checkpoint as ckpt_mod
from ..train import data as D
from ..train.loop import TrainConfig

# tiny: a CPU run of a couple of minutes on 2 cores; small: a GPU-sized starting point.
# model.vocab_size is the tokenizer's requested size; the model gets the actual one.
PRESETS = {
    "tiny": {
        "model": dict(vocab_size=2048, block_size=128, n_layer=2, n_head=4, d_model=64),
        "train": dict(steps=400, batch_size=16, block_size=128, lr=3e-3, min_lr=3e-4, warmup=40,
                      weight_decay=0.1, eval_every=100, eval_batches=8, log_every=50),
    },
    "small": {
        "model": dict(vocab_size=4096, block_size=256, n_layer=4, n_head=4, d_model=256),
        "train": dict(steps=5000, batch_size=32, block_size=256, lr=1e-3, min_lr=1e-4, warmup=200,
                      weight_decay=0.1, eval_every=250, eval_batches=20, log_every=100),
    },
}


class CLIError(Exception):
    pass


# --- data -----------------------------------------------------------------------

def prepare_corpus(data: str | None, vocab_size: int):
    data_dir = D.resolve_data_dir(D.default_data(data))
    corpus = D.prepare(data_dir, vocab_size=vocab_size)
    return corpus, data_dir


def corpus_for(ck: ckpt_mod.Checkpoint, data: str | None):
    """The corpus a checkpoint was trained on, tokenized with its own tokenizer. When
    the data differ from the run's, they are tokenized with the checkpoint's tokenizer."""
    ref = ck.tokenizer or {}
    data_dir = D.resolve_data_dir(D.default_data(data) or ref.get("data"))
    train_f, valid_f = D.split_files(data_dir)
    vocab = ref.get("vocab_request") or ref.get("vocab_size") or ck.gpt_config.vocab_size
    if ref.get("cache_key") == D.cache_key(train_f, valid_f, None, vocab):
        return D.prepare(data_dir, vocab_size=vocab), data_dir
    tok = ck.tokenizer_file or (Path(ref["path"]) if ref.get("path") else None)
    if tok is None or not tok.is_file():
        raise CLIError(f"{ck.path} has no tokenizer.json and its tokenizer cache is gone; "
                       f"cannot tokenize {data_dir}")
    return D.prepare(data_dir, tokenizer_path=tok), data_dir


def val_batches(corpus, tcfg: TrainConfig, n: int | None = None):
    return D.eval_batches(corpus.valid, tcfg.block_size, tcfg.batch_size,
                          tcfg.eval_batches if n is None else (n or None))


def check_free_space(out: Path, size: int, what: str) -> None:
    """Refuse, before anything is written (or trained), to write `size` bytes of `what`
    under `out` when its filesystem has less free."""
    existing = next((p for p in (out, *out.parents) if p.exists()), Path.cwd())
    free = shutil.disk_usage(existing).free
    if size > free:
        raise CLIError(f"{what} needs about {format_bytes(size)}, {existing} has {format_bytes(free)} free; "
                       f"nothing was written")


def run_dir(path) -> Path:
    """The run directory of a CKPT argument (RUN/ckpt -> RUN)."""
    p = Path(path)
    return p.parent if p.name == "ckpt" and (p / ckpt_mod.META).is_file() else p


# --- parser ---------------------------------------------------------------------

def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} is below {low}; allowed: integers >= {low}")
        return v
    return parse


positive_int, non_negative_int = _int_at_least(1), _int_at_least(0)


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{v} is not a positive finite number")
    return v


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows a default only where there is one worth showing."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.option_strings and action.default is not None and action.default is not False \
                and action.default not in (argparse.SUPPRESS, []) and "%(default)" not in h:
            h += " (default: %(default)s)"
        return h
