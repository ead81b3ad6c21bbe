"""`growkern train`: train a GPT from a preset, a config file and flags, or resume a
checkpoint; under torchrun with DDP or FSDP2 (docs/distributed.md).

A new run's configuration is the preset, overridden by the --config file's [model] and
[train] tables, overridden by the flags (MODEL_FLAGS, TRAIN_FLAGS). A resumed run keeps
its model and may change only what the optimizer and schedule state allow (RESUMABLE).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from ..models.gpt import GPTConfig
from ..train import checkpoint as ckpt_mod
from ..train import distributed as dist_mod
from ..train.distributed import resolve_device
from ..train.loop import (LRSchedule, TrainConfig, build_optimizer, build_scheduler, init_model, make_batches,
                          seed_everything, train)
from .common import (PRESETS, CLIError, _Formatter, check_free_space, corpus_for, positive_int, prepare_corpus,
                     run_dir, val_batches)

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


# --- the command ----------------------------------------------------------------

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
        rc = _train(args, ctx)
        # every rank done before any tears down its connections: a rank whose peer closed
        # its gloo pairs mid-exit can abort ("terminate called without an active exception")
        dist_mod.barrier(ctx)
        return rc
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
    if ctx.is_main:  # the checkpoint written at the end must fit: say so now, not after training
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        check_free_space(out, 3 * weights, f"the checkpoint {out / 'ckpt'} (weights and AdamW moments)")
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


# --- parser ---------------------------------------------------------------------

def add_parsers(sub) -> None:
    """`growkern train` on the subparsers of build_parser."""
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
