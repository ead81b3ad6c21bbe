"""Command line: `growkern train | grow | eval | sample | demo` (also `python -m growkern`).

Every command that writes takes --out, a run directory: its checkpoint goes to
RUN/ckpt and its metrics to RUN/metrics.jsonl. Wherever a CKPT is expected, a run
directory or the checkpoint directory itself is accepted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ..train import checkpoint as ckpt_mod
from ..train import distributed as dist_mod
from ..models.gpt import GPTConfig
from ..train.distributed import resolve_device
from ..train.loop import (LRSchedule, TrainConfig, build_optimizer, build_scheduler, evaluate, flops_per_token,
                          init_model, make_batches, seed_everything, train)

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

# Flags that override the preset/config file: (flag, section, field, type, help).
# --block-size sets the model's context and the training sequence length together.
MODEL_FLAGS = [
    ("--vocab-size", "model", "vocab_size", int, "tokenizer vocabulary to train (the model gets its actual size)"),
    ("--block-size", "model", "block_size", int, "context length (also the training sequence length)"),
    ("--n-layer", "model", "n_layer", int, "transformer blocks"),
    ("--n-head", "model", "n_head", int, "attention heads"),
    ("--n-kv-head", "model", "n_kv_head", int, "key/value heads, grouped-query attention (default n_head)"),
    ("--d-model", "model", "d_model", int, "residual width"),
    ("--d-ff", "model", "d_ff", int, "MLP width (default 4 d_model)"),
    ("--norm", "model", "norm", str, "normalization"),
    ("--mlp", "model", "mlp", str, "MLP kind"),
    ("--pos", "model", "pos", str, "positions: learned embeddings or RoPE"),
]
TRAIN_FLAGS = [
    ("--steps", "train", "steps", int, "total optimizer steps (the LR schedule's horizon)"),
    ("--batch-size", "train", "batch_size", int, "sequences per micro-batch; under torchrun the global batch "
     "(all processes together, divisible by their number)"),
    ("--lr", "train", "lr", float, "peak learning rate"),
    ("--min-lr", "train", "min_lr", float, "final learning rate (cosine, wsd)"),
    ("--warmup", "train", "warmup", int, "linear warmup steps"),
    ("--schedule", "train", "schedule", str, "LR after warmup: constant, cosine, or warmup-stable-decay"),
    ("--decay-frac", "train", "decay_frac", float, "wsd: fraction of the steps spent decaying"),
    ("--weight-decay", "train", "weight_decay", float, "AdamW weight decay (matrices only)"),
    ("--grad-clip", "train", "grad_clip", float, "max gradient norm, 0 disables"),
    ("--grad-accum", "train", "grad_accum", int, "micro-batches per optimizer step"),
    ("--eval-every", "train", "eval_every", int, "steps between val evaluations, 0 disables"),
    ("--eval-batches", "train", "eval_batches", int, "val batches per evaluation"),
    ("--regime", "train", "regime", str, "deterministic (bit-reproducible) or stochastic (dropout, shuffled)"),
    ("--dropout", "train", "dropout", float, "dropout (stochastic regime)"),
    ("--seed", "train", "seed", int, "seed of init, data order and dropout"),
    ("--salt", "train", "salt", int, "stochastic regime: mixed into the data order"),
    ("--device", "train", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--dtype", "train", "dtype", str, "autocast dtype; auto: bf16 on CUDA, float32 on CPU"),
    ("--log-every", "train", "log_every", int, "print a line every N steps when no progress bar"),
]
# What may change when resuming: the rest is baked into the optimizer/schedule state.
RESUMABLE = {"steps", "eval_every", "eval_batches", "regime", "dropout", "salt", "device", "dtype",
             "log_every", "compile", "progress", "log_path", "grad_accum"}


class CLIError(Exception):
    pass


# --- data -----------------------------------------------------------------------

def repo_sample() -> Path:
    """The offline TinyStories sample beside the repository (../shared/data/tinystories)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "tinystories"


def default_data(data: str | None) -> str | None:
    """--data, then $GROWKERN_DATA, then the sample beside the repo; None means the hub."""
    if data:
        return data
    if os.environ.get("GROWKERN_DATA"):
        return os.environ["GROWKERN_DATA"]
    sample = repo_sample()
    if (sample / "train.txt").is_file() and (sample / "valid.txt").is_file():
        return str(sample)
    return None


def prepare_corpus(data: str | None, vocab_size: int):
    from ..train import data as D
    data_dir = D.resolve_data_dir(default_data(data))
    corpus = D.prepare(data_dir, vocab_size=vocab_size)
    return corpus, data_dir


def corpus_for(ck: ckpt_mod.Checkpoint, data: str | None):
    """The corpus a checkpoint was trained on, tokenized with its own tokenizer. When
    the data differ from the run's, they are tokenized with the checkpoint's tokenizer."""
    from ..train import data as D
    ref = ck.tokenizer or {}
    data_dir = D.resolve_data_dir(default_data(data) or ref.get("data"))
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
    from ..train.data import eval_batches
    return eval_batches(corpus.valid, tcfg.block_size, tcfg.batch_size,
                        tcfg.eval_batches if n is None else (n or None))


# --- configs --------------------------------------------------------------------

def load_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise CLIError("reading --config needs Python 3.11+ or `pip install tomli`") from None
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    unknown = sorted(set(cfg) - {"model", "train"})
    if unknown:
        raise CLIError(f"{path}: unknown table(s) {unknown}; use [model] and [train]")
    return cfg


def _check_fields(section: dict, cls, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise CLIError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def flag_overrides(args) -> dict:
    out = {"model": {}, "train": {}}
    for flag, section, name, _, _ in MODEL_FLAGS + TRAIN_FLAGS:
        v = getattr(args, flag[2:].replace("-", "_"), None)
        if v is not None:
            out[section][name] = v
    if getattr(args, "compile", False):
        out["train"]["compile"] = True
    if getattr(args, "no_progress", False):
        out["train"]["progress"] = False
    return out


def build_configs(args) -> tuple[dict, TrainConfig]:
    """Preset < config file < flags. Returns the model fields (vocab_size still the
    tokenizer request) and the TrainConfig."""
    preset = PRESETS[args.preset]
    model, tr = dict(preset["model"]), dict(preset["train"])
    if args.config:
        file_cfg = load_toml(args.config)
        _check_fields(file_cfg.get("model", {}), GPTConfig, f"{args.config} [model]")
        _check_fields(file_cfg.get("train", {}), TrainConfig, f"{args.config} [train]")
        model.update(file_cfg.get("model", {}))
        tr.update(file_cfg.get("train", {}))
    flags = flag_overrides(args)
    model.update(flags["model"])
    tr.update(flags["train"])
    if "block_size" in flags["model"] or "block_size" not in tr:
        tr["block_size"] = model["block_size"]
    return model, TrainConfig.from_dict(tr)


CHOICES = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"), "pos": ("learned", "rope"),
           "schedule": ("constant", "cosine", "wsd"), "regime": ("deterministic", "stochastic"),
           "dtype": ("auto", "float32", "bfloat16")}


def add_flags(p: argparse.ArgumentParser, table, title: str):
    g = p.add_argument_group(title)
    defaults = {section: {f.name: f.default for f in dataclasses.fields(cls)}
                for section, cls in (("model", GPTConfig), ("train", TrainConfig))}
    for flag, section, name, typ, help_ in table:
        # show what the flag overrides: the presets' values, else the config's default
        values = [f"{k} {PRESETS[k][section][name]}" for k in PRESETS if name in PRESETS[k][section]]
        if not values and defaults[section][name] is not None:
            values = [f"default {defaults[section][name]}"]
        if name in CHOICES:
            values.append("one of " + ", ".join(CHOICES[name]))
        g.add_argument(flag, type=typ, default=None, metavar=name.upper(), choices=CHOICES.get(name),
                       help=f"{help_} [{'; '.join(values)}]" if values else help_)


# --- commands -------------------------------------------------------------------

def run_dir(path) -> Path:
    """The run directory of a CKPT argument (RUN/ckpt -> RUN)."""
    p = Path(path)
    return p.parent if p.name == "ckpt" and (p / ckpt_mod.META).is_file() else p


def _saver(out: Path, model, optimizer, scheduler, batches, tcfg, tokenizer, tok_file, history):
    def save(step):
        ckpt_mod.save(out / "ckpt", model, optimizer, scheduler, step=step, train_config=tcfg,
                      batches=batches, tokenizer=tokenizer, tokenizer_file=tok_file,
                      growth_history=history)
    return save


def cmd_train(args) -> int:
    """Under torchrun with more than one process (RANK, WORLD_SIZE, LOCAL_RANK set):
    data-parallel with torch's DDP, --batch-size the global batch, rank 0 writing the
    log and checkpoints (docs/distributed.md)."""
    ctx = dist_mod.init_from_env(args.device or "auto")
    try:
        return _train(args, ctx)
    finally:
        if ctx.distributed:
            dist_mod.shutdown()


def _train(args, ctx: dist_mod.Context) -> int:
    t_start = time.perf_counter()
    say = print if ctx.is_main else (lambda *a, **k: None)
    device_of = (lambda d: resolve_device(d, ctx.local_rank)) if ctx.distributed else resolve_device
    if args.resume:
        flags = flag_overrides(args)
        if flags["model"]:
            raise CLIError(f"model flags {sorted(flags['model'])} cannot change when resuming "
                           f"(use `growkern grow` to change the width)")
        if args.config:
            raise CLIError("--config applies to new runs; when resuming give flags")
        fixed = sorted(set(flags["train"]) - RESUMABLE)
        if fixed:
            raise CLIError(f"cannot change {fixed} when resuming: the optimizer and schedule state "
                           f"were built with them (resumable: {sorted(RESUMABLE)})")
        _, meta = ckpt_mod.read_meta(args.resume)
        device = flags["train"].get("device") or meta["train_config"].get("device", "auto")
        sharded = bool(args.fsdp and ctx.distributed and meta.get("storage") == "dcp")
        if sharded:  # each rank reads its shards: the whole model is never in one process
            ck = ckpt_mod.load_sharded(args.resume, dist_mod.Context(ctx.rank, ctx.world_size, ctx.local_rank,
                                                                       "fsdp"),
                                       device_of(device), getattr(torch, args.fsdp_param_dtype or "", None))
        else:
            ck = ckpt_mod.load(args.resume, device=device_of(device))
        tcfg = ck.train_config.replace(**flags["train"])
        model, optimizer, scheduler, start = ck.model, ck.optimizer, ck.scheduler, ck.step
        # a new horizon moves the schedule; everything else in it stays
        scheduler.lr_lambdas[0].__dict__.update(vars(LRSchedule.from_config(tcfg)))
        with dist_mod.main_first(ctx):  # rank 0 fills the token caches, the others read them
            corpus, data_dir = corpus_for(ck, args.data)
        ck.restore_rng()
        own_rng = ctx.distributed and ck.restore_rng_of(ctx.rank, ctx.world_size)
        batches = ck.batches(corpus.train, tcfg)
        tokenizer, tok_file, history = ck.tokenizer, ck.tokenizer_file, ck.growth_history
        out = Path(args.out) if args.out else run_dir(ck.path)
        say(f"resuming {ck.path} at step {start} -> {tcfg.steps}  "
            f"(d_model {model.config.d_model}, {model.num_params():,} parameters"
            f"{'; each rank read its shards' if sharded else ''})")
    else:
        own_rng = sharded = False
        model_fields, tcfg = build_configs(args)
        _check_fields(model_fields, GPTConfig, "model config")
        out = Path(args.out or "runs/train")
        if (out / "ckpt" / ckpt_mod.META).is_file():
            if not args.force:
                raise CLIError(f"{out} already holds a checkpoint; continue it with --resume {out}, "
                               f"or start over with --force")
            if ctx.is_main:
                (out / "metrics.jsonl").unlink(missing_ok=True)
        with dist_mod.main_first(ctx):  # rank 0 trains the tokenizer and fills the caches
            corpus, data_dir = prepare_corpus(args.data, model_fields["vocab_size"])
        gcfg = GPTConfig(**{**model_fields, "vocab_size": corpus.vocab_size, "dropout": tcfg.dropout})
        seed_everything(tcfg.seed)
        model = init_model(gcfg, tcfg.seed, device_of(tcfg.device))
        optimizer, start = build_optimizer(model, tcfg), 0
        scheduler = build_scheduler(optimizer, tcfg)
        batches = make_batches(corpus.train, tcfg)
        tokenizer = ckpt_mod.tokenizer_ref(corpus, data_dir, model_fields["vocab_size"])
        tok_file, history = None, []
        say(f"training {model.num_params():,} parameters on {data_dir} "
            f"({len(corpus.train):,} train tokens, vocab {corpus.vocab_size}) -> {out}")
    tcfg = tcfg.replace(log_path=str(out / "metrics.jsonl"))
    end = tcfg.steps if args.stop_at is None else min(args.stop_at, tcfg.steps)
    if start >= end:
        say(f"nothing to do: the checkpoint is at step {start}, the run ends at {end}")
        return 0
    if (args.fsdp or args.fsdp_param_dtype) and not ctx.distributed:
        raise CLIError("--fsdp shards the model over the processes of torchrun "
                       "(torchrun --nproc_per_node N -m growkern train --fsdp ...); this is one process")
    if args.fsdp_param_dtype and not args.fsdp:
        raise CLIError("--fsdp-param-dtype goes with --fsdp")
    if ctx.distributed:
        dist_mod.check_batch(tcfg.batch_size, ctx)
        if tcfg.regime == "stochastic" and not own_rng:
            dist_mod.decorrelate_rng(ctx)  # each rank its own dropout masks
        if args.fsdp:
            ctx = dist_mod.Context(ctx.rank, ctx.world_size, ctx.local_rank, "fsdp")
            if not sharded:
                model = dist_mod.shard_model(model, optimizer, ctx, getattr(torch, args.fsdp_param_dtype or "", None))
            kind = "sharded (FSDP2)"
        else:
            model = dist_mod.wrap(model, ctx)
            kind = "data-parallel (DDP)"
        say(f"{kind} on {ctx.world_size} processes: global batch {tcfg.batch_size}, "
            f"{tcfg.batch_size // ctx.world_size} sequences per rank; checkpoints with torch.distributed.checkpoint")
    # a distributed save is a collective: every rank writes its shards, rank 0 the rest
    save = _saver(out, model, optimizer, scheduler, batches, tcfg, tokenizer, tok_file, history)

    def on_step(rec):
        if args.save_every and rec["step"] % args.save_every == 0 and rec["step"] < end:
            save(rec["step"])

    hist = train(model, optimizer, scheduler, batches, tcfg, start_step=start, end_step=end,
                 eval_data=val_batches(corpus, tcfg), on_step=on_step)
    step = hist[-1]["step"]
    save(step)
    last = hist[-1]
    say(f"step {step}: train loss {last['loss']:.4f}, val loss {last.get('val_loss', float('nan')):.4f}, "
        f"{sum(r['dt_ms'] for r in hist) / 1e3:.1f} s training, "
        f"{time.perf_counter() - t_start:.1f} s total; checkpoint {out / 'ckpt'}")
    return 0


def _probe_batch(corpus, tcfg, device):
    x, y = val_batches(corpus, tcfg, 1)[0]
    return x.to(device), y.to(device)


def parse_options(items) -> dict:
    """KEY=VALUE strings -> dict, values read as Python literals where they parse."""
    import ast
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--option wants KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def growth_targets(factor=None, d_model=None, d_ff=None, n_head=None) -> dict:
    """The widen_ targets given, or factor 2 when none is."""
    targets = {k: v for k, v in dict(factor=factor, d_model=d_model, d_ff=d_ff, n_head=n_head).items()
               if v is not None}
    return targets or {"factor": 2}


def grow_checkpoint(ck, corpus, *, factor=None, d_model=None, d_ff=None, n_head=None,
                    strategy="exact_copy", seed=0, schedule="continue", rewarm_steps=None,
                    options=None, plan=None):
    """widen_ a loaded checkpoint in place; returns the GrowthReport and its history entry.
    `plan`: the plan_growth of the same targets, when the caller made it already."""
    from ..growth.plan import plan_growth
    from ..growth.widen import widen_
    targets = growth_targets(factor, d_model, d_ff, n_head)
    if plan is None:
        plan = plan_growth(ck.model, strategy=strategy, seed=seed, **targets, **(options or {}))
    device = next(ck.model.parameters()).device
    report = widen_(ck.model, ck.optimizer, ck.scheduler, plan=plan,
                    probe_batch=_probe_batch(corpus, ck.train_config, device),
                    schedule=schedule, rewarm_steps=rewarm_steps)
    entry = dataclasses.asdict(report)
    entry.update(step=ck.step, source=str(ck.path), schedule=schedule, rewarm_steps=rewarm_steps,
                 seed=seed, targets=targets, options=options or {})
    return report, entry


# what save_pretrained writes as weights, one of them in every Hugging Face model directory
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


def checkpoint_kind(path) -> str:
    """What `growkern grow` was given, by its files: "growkern" (meta.json in it or in
    its ckpt/), "hf" (a Hugging Face model directory: config.json and weights) or
    "trainer" (a Trainer checkpoint: that plus trainer_state.json or optimizer.pt)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}: it does not exist")
    if (p / ckpt_mod.META).is_file() or (p / "ckpt" / ckpt_mod.META).is_file():
        return "growkern"
    if (p / "config.json").is_file() and any((p / w).is_file() for w in HF_WEIGHTS):
        return "trainer" if (p / "trainer_state.json").is_file() or (p / "optimizer.pt").is_file() else "hf"
    names = sorted(f.name for f in p.iterdir()) if p.is_dir() else []
    found = f"it holds {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}" if names else \
        ("it is a file" if p.is_file() else "it is empty")
    raise CLIError(f"{p} is not a growkern checkpoint (no {ckpt_mod.META} in it or in {p / 'ckpt'}), nor a "
                   f"Hugging Face model directory or Trainer checkpoint (config.json and one of "
                   f"{', '.join(HF_WEIGHTS)}); {found}")


def grow_hf(args, kind: str) -> int:
    """`growkern grow` of a Hugging Face model directory or Trainer checkpoint into the
    new directory --out."""
    what = "a Trainer checkpoint" if kind == "trainer" else "a Hugging Face model directory"
    if args.schedule == "rewarm":
        why = ("Trainer builds a fresh LR scheduler when it resumes and would drop the ramp; re-warm with "
               "growkern.hf.GrowthCallback(schedule='rewarm') in the training run instead"
               if kind == "trainer" else "a model directory has no LR schedule")
        raise CLIError(f"--schedule rewarm: {args.ckpt} is {what}, and {why}")
    if args.data:
        raise CLIError(f"--data picks the validation probe of growkern checkpoints; {args.ckpt} is {what}")
    from .. import hf
    report = hf.grow_saved(args.ckpt, args.out, device=resolve_device(args.device), strategy=args.strategy,
                           seed=args.seed, **growth_targets(args.factor, args.d_model, args.d_ff, args.n_head),
                           **parse_options(args.option))
    print(report)
    print("  (step-0 preservation measured on random token ids)")
    print(f"grown {what}: {args.out}")
    if kind == "trainer":
        print(f"resume it with a model built from it: AutoModelForCausalLM.from_pretrained({str(args.out)!r}), "
              f"then trainer.train(resume_from_checkpoint={str(args.out)!r})")
    return 0


# A growth that multiplies the parameters by more than this is announced as a warning.
LARGE_GROWTH = 16


def _check_grow_out(src: Path, out: Path, force: bool) -> None:
    """OUT/ckpt must not hold a checkpoint (the source's own above all) unless --force."""
    target = out / "ckpt"
    if target.resolve() != src.resolve() and target.resolve().is_relative_to(src.resolve()):
        raise CLIError(f"--out {out} is inside the checkpoint being grown ({src}); give a new --out")
    if not (target / ckpt_mod.META).is_file() or force:
        return
    same = target.resolve() == src.resolve()
    raise CLIError(f"{target} already holds a checkpoint{' (the one being grown)' if same else ''}; "
                   f"give a new --out, or --force to replace it")


def _announce_growth(model, optimizer, plan, out: Path) -> None:
    """Say what the growth will cost before doing it, and refuse what the disk cannot hold."""
    from ..growth.checks import new_state_bytes
    _announce(plan.old.widths(), plan.new.widths(), sum(p.numel() for p in model.parameters()),
              sum(math.prod(tp.new_shape) for tp in plan.tensors.values()),
              new_state_bytes(model, optimizer, plan), out)


def _announce(old: dict, new: dict, before: int, after: int, size: int, out: Path, how: str = "") -> None:
    dims = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in ("d_model", "d_ff", "n_head"))
    print(f"growing {dims}: {before:,} -> {after:,} parameters (x{after / before:.1f}), "
          f"checkpoint about {size / 2**30:.2f} GiB{how}")
    if after > LARGE_GROWTH * before:
        print(f"growkern grow: warning: this growth multiplies the parameters by {after / before:.0f}; the usual "
              f"factors are 2-4 (x4-x16 parameters)", file=sys.stderr)
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if size > free:
        raise CLIError(f"the grown checkpoint needs about {size / 2**30:.2f} GiB, {existing} has "
                       f"{free / 2**30:.2f} GiB free; nothing was written")


def _grow_dcp(args, src: Path, out: Path, targets: dict, options: dict) -> int:
    """A distributed (DCP) checkpoint grows offline, one tensor at a time (growkern/offline.py)."""
    from ..train.offline import grow_dcp

    def announce(e):
        _announce(e["dims_before"], e["dims_after"], e["params_before"], e["params_after"], e["bytes"], out,
                  ", one tensor at a time (distributed checkpoint)")

    try:
        entry = grow_dcp(src, out / "ckpt", strategy=args.strategy, seed=args.seed, schedule=args.schedule,
                         rewarm_steps=args.rewarm_steps, options=options, before_write=announce, **targets)
    except TypeError as e:  # a strategy option of the wrong type
        raise CLIError(str(e)) from None
    for note in entry["notes"]:
        print(f"  note: {note}")
    print(f"grown checkpoint at step {entry['step']}: {out / 'ckpt'} ({entry['seconds']:.1f} s; check it with "
          f"`growkern eval {out}`)")
    return 0


def cmd_grow(args) -> int:
    kind = checkpoint_kind(args.ckpt)
    if kind != "growkern":
        return grow_hf(args, kind)
    from ..growth.plan import plan_growth
    out = Path(args.out)
    src, src_meta = ckpt_mod.read_meta(args.ckpt)
    _check_grow_out(src, out, args.force)
    if args.schedule == "rewarm" and not args.rewarm_steps:
        raise CLIError("--schedule rewarm needs --rewarm-steps N")
    targets = growth_targets(args.factor, args.d_model, args.d_ff, args.n_head)
    options = parse_options(args.option)
    taken = sorted(set(options) & {"factor", "d_model", "d_ff", "n_head", "strategy", "seed"})
    if taken:
        raise CLIError(f"--option {taken[0]}=... is a growth argument, not a strategy option; give it as "
                       f"--{taken[0].replace('_', '-')}")
    if src_meta.get("storage") == "dcp":
        return _grow_dcp(args, src, out, targets, options)
    ck = ckpt_mod.load(args.ckpt, device=resolve_device(args.device))
    try:
        plan = plan_growth(ck.model, strategy=args.strategy, seed=args.seed, **targets, **options)
    except TypeError as e:  # a strategy option of the wrong type
        raise CLIError(str(e)) from None
    _announce_growth(ck.model, ck.optimizer, plan, out)
    corpus, _ = corpus_for(ck, args.data)
    report, entry = grow_checkpoint(ck, corpus, **targets, strategy=args.strategy, seed=args.seed,
                                    schedule=args.schedule, rewarm_steps=args.rewarm_steps,
                                    options=options, plan=plan)
    print(report)
    p = report.preservation
    print(f"  probe batch loss (validation): small {p['loss_small']:.4f} -> wide {p['loss_wide']:.4f}")
    ckpt_mod.save(out / "ckpt", ck.model, ck.optimizer, ck.scheduler, step=ck.step,
                  train_config=ck.train_config, data_state=ck.data, rng=ck.rng,
                  tokenizer=ck.tokenizer, tokenizer_file=ck.tokenizer_file,
                  growth_history=ck.growth_history + [entry], storage=ck.meta.get("storage", "file"))
    print(f"grown checkpoint at step {ck.step}: {out / 'ckpt'}")
    return 0


def cmd_eval(args) -> int:
    ck = ckpt_mod.load(args.ckpt, device=resolve_device(args.device))
    corpus, data_dir = corpus_for(ck, args.data)
    batches = val_batches(corpus, ck.train_config, args.batches)
    loss = evaluate(ck.model, batches)
    tokens = sum(x.numel() for x, _ in batches)
    result = {"step": ck.step, "val_loss": loss, "ppl": math.exp(loss), "tokens": tokens,
              "d_model": ck.gpt_config.d_model, "params": ck.model.num_params(),
              "growths": len(ck.growth_history)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{ck.path} (step {ck.step}, d_model {ck.gpt_config.d_model}, {result['params']:,} params, "
              f"{len(ck.growth_history)} growth(s)): val loss {loss:.4f}, ppl {math.exp(loss):.2f} "
              f"on {tokens:,} tokens of {data_dir}")
    return 0


def load_tokenizer(ck):
    from ..train.data import load_tokenizer as load
    f = ck.tokenizer_file or (Path(ck.tokenizer["path"]) if (ck.tokenizer or {}).get("path") else None)
    if f is None or not f.is_file():
        raise CLIError(f"{ck.path} has no tokenizer.json and its tokenizer cache is gone")
    return load(f)


def generate_text(model, tok, prompt: str, tokens: int, temperature: float, top_k: int | None, seed: int):
    from ..train.data import BOS, EOS
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    device = next(model.parameters()).device
    ids = [bos] + tok.encode(prompt, add_special_tokens=False).ids  # stories start after BOS
    idx = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k, generator=gen)[0].tolist()
    new = out[len(ids):]
    if eos in new:
        new = new[:new.index(eos)]
    return prompt + tok.decode(new)


def cmd_sample(args) -> int:
    ck = ckpt_mod.load(args.ckpt, device=resolve_device(args.device))
    tok = load_tokenizer(ck)
    for i in range(args.num):
        text = generate_text(ck.model, tok, args.prompt, args.tokens, args.temperature,
                             args.top_k or None, args.seed + i)
        print(text if args.num == 1 else f"--- sample {i + 1}\n{text}")
    return 0


def _fmt_flops(f: float) -> str:
    return f"{f / 1e12:.2f} TF" if f >= 1e11 else f"{f / 1e9:.1f} GF"


def cmd_demo(args) -> int:
    """Train tiny, grow 2x, continue; compare with continuing small and with a wide
    model trained from scratch on the same data for the same steps."""
    t_all = time.perf_counter()
    out = Path(args.out)
    preset = PRESETS["tiny"]
    total = args.steps
    grow_at = args.grow_at if args.grow_at is not None else total // 2
    if not 0 < grow_at < total:
        raise CLIError(f"--grow-at must be in (0, --steps={total}), got {grow_at}")
    corpus, data_dir = prepare_corpus(args.data, preset["model"]["vocab_size"])
    tcfg = TrainConfig.from_dict({**preset["train"], "steps": total, "seed": args.seed,
                                  "device": args.device, "warmup": max(1, total // 15),
                                  "eval_every": max(1, total // 6), "log_every": 0})
    gcfg = GPTConfig(**{**preset["model"], "vocab_size": corpus.vocab_size})
    device = resolve_device(tcfg.device)
    ev = val_batches(corpus, tcfg)
    tokref = ckpt_mod.tokenizer_ref(corpus, data_dir, preset["model"]["vocab_size"])
    tokens_per_step = tcfg.batch_size * tcfg.block_size
    print(f"growkern demo: TinyStories from {data_dir} ({len(corpus.train):,} train tokens, "
          f"vocab {corpus.vocab_size}); {total} steps of {tokens_per_step:,} tokens, growth 2x at "
          f"step {grow_at} ({args.strategy}); output in {out}")
    rows = []

    def segment(name, model, opt, sched, batches, start, end, history=()):
        # one training segment, logged to OUT/name/metrics.jsonl and saved to OUT/name/ckpt
        log = out / name / "metrics.jsonl"
        log.unlink(missing_ok=True)  # a rerun of the demo starts its curves afresh
        cfg = tcfg.replace(log_path=str(log))
        t0 = time.perf_counter()
        hist = train(model, opt, sched, batches, cfg, start_step=start, end_step=end, eval_data=ev)
        secs = time.perf_counter() - t0
        ckpt_mod.save(out / name / "ckpt", model, opt, sched, step=end, train_config=tcfg,
                      batches=batches, tokenizer=tokref, growth_history=history)
        flops = flops_per_token(model, tcfg.block_size) * tokens_per_step * (end - start)
        curve = " ".join(f"{r['val_loss']:.3f}" for r in hist if "val_loss" in r)
        print(f"  {name:<16} steps {start:>4} -> {end:<4} d_model {model.config.d_model:<4} "
              f"{secs:5.1f} s  val loss {hist[-1]['val_loss']:.4f}   (curve: {curve})")
        return hist[-1]["val_loss"], flops, secs

    # 1. the small model, up to the growth step (the schedule spans all `total` steps)
    seed_everything(tcfg.seed)
    small = init_model(gcfg, tcfg.seed, device)
    print(f"[1/4] train the small model ({small.num_params():,} parameters)")
    opt = build_optimizer(small, tcfg)
    sched = build_scheduler(opt, tcfg)
    v_small, f_small, s_small = segment("small", small, opt, sched, make_batches(corpus.train, tcfg), 0, grow_at)

    # 2. grow it from its checkpoint: weights, AdamW moments and schedule together
    print("[2/4] grow it 2x from its checkpoint")
    ck = ckpt_mod.load(out / "small" / "ckpt", device=device)
    report, entry = grow_checkpoint(ck, corpus, factor=2, strategy=args.strategy, seed=args.seed)
    print("\n".join("  " + line for line in str(report).splitlines()))
    v_grown0 = evaluate(ck.model, ev)
    print(f"  val loss: small {v_small:.4f} -> grown {v_grown0:.4f} (change {v_grown0 - v_small:+.2e}) "
          f"before any further step")
    history = ck.growth_history + [entry]
    ckpt_mod.save(out / "grown" / "ckpt", ck.model, ck.optimizer, ck.scheduler, step=ck.step,
                  train_config=tcfg, data_state=ck.data, rng=ck.rng, tokenizer=tokref,
                  growth_history=history)

    # 3. keep training the grown model on the same stream
    print(f"[3/4] continue the grown model to step {total}")
    ck.restore_rng()
    v_wide, f_wide, s_wide = segment("wide", ck.model, ck.optimizer, ck.scheduler,
                                     ck.batches(corpus.train), grow_at, total, history)
    wide_cfg = ck.model.config
    result = {"data": str(data_dir), "steps": total, "grow_at": grow_at, "strategy": args.strategy,
              "report": entry, "val_small": v_small, "val_grown_step0": v_grown0, "val_grown_final": v_wide,
              "flops_grown": f_small + f_wide, "seconds_grown": s_small + s_wide}
    rows.append(("small, before growth", grow_at, gcfg.d_model, f_small, v_small))
    rows.append(("grown, step 0 after", grow_at, wide_cfg.d_model, f_small, v_grown0))
    rows.append(("grown + continued", total, wide_cfg.d_model, f_small + f_wide, v_wide))

    # 4. what growth is measured against
    if not args.no_baselines:
        print("[4/4] baselines on the same data and schedule: small continued, wide from scratch")
        ck = ckpt_mod.load(out / "small" / "ckpt", device=device)
        ck.restore_rng()
        v_sc, f_sc, _ = segment("small-continued", ck.model, ck.optimizer, ck.scheduler,
                                ck.batches(corpus.train), grow_at, total)
        scratch_cfg = gcfg.replace(d_model=wide_cfg.d_model, d_ff=wide_cfg.d_ff, n_head=wide_cfg.n_head,
                                   n_kv_head=wide_cfg.n_kv_head)
        seed_everything(tcfg.seed)
        wide = init_model(scratch_cfg, tcfg.seed, device)
        opt = build_optimizer(wide, tcfg)
        v_sw, f_sw, _ = segment("scratch-wide", wide, opt, build_scheduler(opt, tcfg),
                                make_batches(corpus.train, tcfg), 0, total)
        rows.append(("small continued", total, gcfg.d_model, f_small + f_sc, v_sc))
        rows.append(("wide from scratch", total, scratch_cfg.d_model, f_sw, v_sw))
        result.update(val_small_continued=v_sc, val_scratch_wide=v_sw, flops_scratch_wide=f_sw)
        # growth spends less compute than the wide run: read the scratch curve at the same FLOPs
        curve = [(0, math.log(corpus.vocab_size))] + [
            (json.loads(line)["step"], json.loads(line)["val_loss"])
            for line in (out / "scratch-wide" / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in json.loads(line)]
        at = (f_small + f_wide) / f_sw * total
        for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
            if s0 <= at <= s1:
                v_eq = v0 + (v1 - v0) * (at - s0) / (s1 - s0)
                rows.append(("wide from scratch", round(at), scratch_cfg.d_model, f_small + f_wide, v_eq))
                result["val_scratch_wide_equal_flops"] = v_eq
                break
    else:
        print("[4/4] baselines skipped (--no-baselines)")

    p = report.preservation
    print("\nstep-0 preservation of the growth (validation batch): "
          f"max|dlogits| {p['max_abs_dlogits']:.2e}, KL(small||wide) {p['kl_small_wide']:.2e}, "
          f"dloss {p['dloss']:+.2e}")
    print(f"\n  {'run':<22}{'steps':>6}{'d_model':>9}{'train FLOPs':>13}{'val loss':>10}")
    for name, steps, d, f, v in rows:
        print(f"  {name:<22}{steps:>6}{d:>9}{_fmt_flops(f):>13}{v:>10.4f}")
    if "val_scratch_wide_equal_flops" in result:
        print("  (the last row is read off the scratch run's val curve at the grown run's compute, "
              "linear interpolation; at step 0 the loss is taken as log(vocab))")
    result["seconds_total"] = time.perf_counter() - t_all
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ndone in {result['seconds_total']:.0f} s; checkpoints, metrics.jsonl and summary.json in {out}")
    print(f"next: growkern sample {out / 'wide'}   |   growkern eval {out / 'wide'}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    from ..growth.strategies import strategies
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

    t = sub.add_parser("train", formatter_class=_Formatter, help="train a model, or resume a checkpoint",
                       description="Train a GPT from a preset (flags and --config override it), or "
                                   "resume a checkpoint with --resume. Writes OUT/ckpt and OUT/metrics.jsonl.")
    t.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="starting configuration")
    t.add_argument("--config", metavar="FILE.toml", help="[model] and [train] tables overriding the preset")
    t.add_argument("--resume", metavar="CKPT", help="continue this checkpoint (exactly, in the "
                                                    "deterministic regime)")
    t.add_argument("--data", metavar="PATH", help="directory with train.txt and valid.txt")
    t.add_argument("--out", metavar="DIR", help="run directory (default runs/train, or the resumed run's)")
    t.add_argument("--stop-at", type=int, metavar="K", help="stop after step K (the schedule still "
                                                            "spans --steps); resume later")
    t.add_argument("--save-every", type=int, default=0, metavar="N", help="also checkpoint every N steps")
    t.add_argument("--force", action="store_true", help="start a new run in an OUT that holds one")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 (fully_shard per block and the "
                                                       "root) instead of DDP")
    t.add_argument("--fsdp-param-dtype", choices=["bfloat16", "float16"], metavar="DTYPE",
                   help="with --fsdp: compute in this dtype (bfloat16, float16), reduce gradients in the "
                        "parameters' dtype")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads (default: torch's); "
                                                            "1 is steadier on a busy machine")
    add_flags(t, MODEL_FLAGS, "model (new runs only)")
    add_flags(t, TRAIN_FLAGS, "training")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("grow", formatter_class=_Formatter, help="widen a checkpoint with its optimizer "
                                                                "and schedule state",
                       description="Load CKPT, grow model, AdamW state and LR schedule with "
                                   "growkern.widen_, print the GrowthReport with the step-0 "
                                   "preservation on a validation batch, and save OUT/ckpt with the "
                                   "report in its growth history.\n"
                                   "CKPT may also be a Hugging Face model directory (save_pretrained) "
                                   "or a Trainer checkpoint (checkpoint-N/): OUT is then a new "
                                   "directory of the same kind, with the grown model (and "
                                   "optimizer.pt) and the other files copied; resume a grown Trainer "
                                   "checkpoint with a model built from OUT.")
    g.add_argument("ckpt", metavar="CKPT", help="growkern checkpoint or run directory, Hugging Face model "
                                                "directory, or Trainer checkpoint")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="run directory for the grown checkpoint (OUT/ckpt); for a Hugging Face model or "
                        "Trainer checkpoint, the new directory itself, which must not exist")
    g.add_argument("--factor", type=float, help="scale d_model, d_ff and heads (default 2)")
    g.add_argument("--d-model", type=int, help="target d_model (overrides --factor for it)")
    g.add_argument("--d-ff", type=int, help="target d_ff")
    g.add_argument("--n-head", type=int, help="target query heads")
    g.add_argument("--strategy", default="exact_copy", choices=strategies(), help="how new units are made")
    g.add_argument("--seed", type=int, default=0, help="seed of the growth's noise")
    g.add_argument("--schedule", default="continue", choices=["continue", "rewarm"],
                   help="keep the LR schedule, or re-warm it linearly (growkern checkpoints)")
    g.add_argument("--rewarm-steps", type=int, metavar="N", help="length of the re-warm ramp")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy option, repeatable (e.g. noise=0.05, preserving=False)")
    g.add_argument("--data", metavar="PATH", help="data for the validation probe (default: the run's)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--force", action="store_true", help="replace a checkpoint already in OUT/ckpt "
                                                        "(growkern checkpoints)")
    g.set_defaults(func=cmd_grow)

    e = sub.add_parser("eval", formatter_class=_Formatter, help="validation loss of a checkpoint",
                       description="Mean next-token loss on fixed validation windows.")
    e.add_argument("ckpt", metavar="CKPT", help="checkpoint or run directory")
    e.add_argument("--data", metavar="PATH", help="default: the run's data")
    e.add_argument("--batches", type=int, help="val batches (default: the run's eval_batches; 0: all)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", formatter_class=_Formatter, help="generate text from a checkpoint")
    s.add_argument("ckpt", metavar="CKPT", help="checkpoint or run directory")
    s.add_argument("--prompt", default="Once upon a time")
    s.add_argument("--tokens", type=non_negative_int, default=200, help="new tokens at most (stops at end of story)")
    s.add_argument("--temperature", type=positive_float, default=0.8)
    s.add_argument("--top-k", type=non_negative_int, default=50, help="0 disables")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num", type=positive_int, default=1, help="number of samples")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.set_defaults(func=cmd_sample)

    d = sub.add_parser("demo", formatter_class=_Formatter,
                       help="train tiny, grow 2x, keep training, compare (a few minutes on a CPU)",
                       description="The README's main job: train a tiny GPT on TinyStories, grow it 2x "
                                   "with its optimizer state, continue training, and print the step-0 "
                                   "preservation and val losses before and after growth, against "
                                   "continuing the small model and a wide model trained from scratch.")
    d.add_argument("--data", metavar="PATH", help="directory with train.txt and valid.txt")
    d.add_argument("--out", default="runs/demo", metavar="DIR")
    d.add_argument("--strategy", default="perturb", choices=strategies(),
                   help="perturb: clones plus antithetic noise, function preserving")
    d.add_argument("--steps", type=int, default=600, help="total steps; growth at half-way")
    d.add_argument("--grow-at", type=int, help="step of the growth (default steps/2)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-baselines", action="store_true", help="skip the small and scratch-wide runs")
    d.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads (default: torch's); "
                                                            "1 is steadier on a busy machine")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    d.set_defaults(func=cmd_demo)

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
    import importlib
    import importlib.util
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
    _load_extensions()
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return args.func(args) or 0
    except (CLIError, ckpt_mod.CheckpointError, OSError, ValueError, MemoryError) as e:
        if os.environ.get("GROWKERN_DEBUG"):
            raise
        print(f"growkern {args.command}: error: {e or type(e).__name__}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) get their setting back


if __name__ == "__main__":
    sys.exit(main())
