"""`growkern grow`: widen (and deepen) a checkpoint with its optimizer and schedule state.

A growkern checkpoint loads, grows with widen_ (step-0 preservation measured on a
validation batch) and saves with the growth in its history; a distributed (DCP) one
grows offline, a tensor at a time (growkern.train.offline); a Hugging Face model
directory or Trainer checkpoint grows through growkern.hf into a new directory of its
kind. What the growth will cost is announced, and refused when the disk cannot hold it,
before anything is written, for every kind; a write that fails anyway (the disk filled
up meanwhile) is one line, with nothing half-written and the source untouched.
grow_checkpoint is also the demo's growth step.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import sys
from pathlib import Path

from ..growth.checks import format_bytes, new_state_bytes, state_bytes
from ..growth.deepen import deepen_
from ..growth.depth import DEPTH_STRATEGIES, plan_depth
from ..growth.plan import plan_growth
from ..growth.strategies import strategies
from ..growth.widen import widen_
from ..train import checkpoint as ckpt_mod
from ..train.distributed import resolve_device
from ..train.offline import deepen_dcp, grow_dcp
from .common import CLIError, _Formatter, check_free_space, corpus_for, val_batches


def _probe_batch(corpus, tcfg, device):
    x, y = val_batches(corpus, tcfg, 1)[0]
    return x.to(device), y.to(device)


def parse_options(items) -> dict:
    """KEY=VALUE strings -> dict, values read as Python literals where they parse."""
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
    `plan`: the plan_growth of the same targets, when the caller made it already.
    `schedule` None: the strategy's own ("restart" for szp, a new run; else "continue")."""
    targets = growth_targets(factor, d_model, d_ff, n_head)
    if plan is None:
        plan = plan_growth(ck.model, strategy=strategy, seed=seed, **targets, **(options or {}))
    if schedule is None:
        schedule = getattr(plan.strategy, "default_schedule", "continue")
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


def grow_hf(args, kind: str, depth: dict | None = None) -> int:
    """`growkern grow` of a Hugging Face model directory or Trainer checkpoint into the
    new directory --out."""
    what = "a Trainer checkpoint" if kind == "trainer" else "a Hugging Face model directory"
    if args.schedule in ("rewarm", "restart"):
        why = {"rewarm": "Trainer builds a fresh LR scheduler when it resumes and would drop the ramp; re-warm "
                         "with growkern.hf.GrowthCallback(schedule='rewarm') in the training run instead",
               "restart": "Trainer rebuilds its LR schedule from its TrainingArguments when it resumes and "
                          "loads scheduler.pt (copied unchanged); to start a new schedule, train the grown "
                          "model in a new Trainer run, without resume_from_checkpoint"}[args.schedule] \
            if kind == "trainer" else "a model directory has no LR schedule"
        raise CLIError(f"--schedule {args.schedule}: {args.ckpt} is {what}, and {why}")
    if args.data:
        raise CLIError(f"--data picks the validation probe of growkern checkpoints; {args.ckpt} is {what}")
    from .. import hf  # imports transformers, an optional dependency
    out = Path(args.out)

    def announce(e):
        _announce(e["dims_before"], e["dims_after"], e["params_before"], e["params_after"], e["bytes"], out)

    from transformers.utils import logging as hf_logging
    # transformers' progress bars and load reports: the growth report says what happened,
    # and what goes wrong is growkern's one error line (hf.load_model)
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        widths = dict(factor=args.factor, d_model=args.d_model, d_ff=args.d_ff, n_head=args.n_head)
        targets = growth_targets(**widths) if depth is None or any(v is not None for v in widths.values()) else {}
        deep = {} if depth is None else dict(n_layer=depth["n_layer"], depth_strategy=depth["strategy"],
                                             positions=depth["positions"])
        report = hf.grow_saved(args.ckpt, out, device=resolve_device(args.device), strategy=args.strategy,
                               seed=args.seed, before_write=announce, **targets, **deep,
                               **parse_options(args.option))
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
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
    _announce(plan.old.widths(), plan.new.widths(), sum(p.numel() for p in model.parameters()),
              sum(math.prod(tp.new_shape) for tp in plan.tensors.values()),
              new_state_bytes(model, optimizer, plan), out)


def _announce(old: dict, new: dict, before: int, after: int, size: int, out: Path, how: str = "") -> None:
    dims = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in ("d_model", "d_ff", "n_head", "n_layer") if k in old)
    print(f"growing {dims}: {before:,} -> {after:,} parameters (x{after / before:.1f}), "
          f"checkpoint about {format_bytes(size)}{how}")
    if after > LARGE_GROWTH * before:
        print(f"growkern grow: warning: this growth multiplies the parameters by {after / before:.0f}; the usual "
              f"factors are 2-4 (x4-x16 parameters)", file=sys.stderr)
    check_free_space(out, size, "the grown checkpoint")


def _grow_dcp(args, src: Path, out: Path, targets: dict, options: dict) -> int:
    """A distributed (DCP) checkpoint grows offline, one tensor at a time (growkern/train/offline.py)."""
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


def depth_options(args) -> dict | None:
    """deepen_'s keywords from --n-layer, --depth-strategy and --positions, or None."""
    if args.n_layer is None:
        if args.positions is not None or args.depth_strategy is not None:
            raise CLIError("--depth-strategy and --positions go with --n-layer N (the new number of blocks)")
        return None
    positions = None
    if args.positions is not None:
        try:
            positions = [int(p) for p in args.positions.split(",") if p.strip()]
        except ValueError:
            raise CLIError(f"--positions wants old block indices separated by commas (e.g. 1,3), got "
                           f"{args.positions!r}") from None
    return dict(n_layer=args.n_layer, strategy=args.depth_strategy or "identity", positions=positions,
                seed=args.seed)


def _announce_depth(ck, depth: dict, out: Path) -> None:
    """What depth growth (after any width growth) will cost, before it is done."""
    model, optimizer = ck.model, ck.optimizer
    layers = model.blocks
    plan = plan_depth(len(layers), **depth)  # the CLI's own check of the arguments, nothing changed
    added = [p for j in plan.added for p in layers[plan.sources[j]].parameters()]
    before = sum(p.numel() for p in model.parameters())
    after = before + sum(p.numel() for p in added)
    size = state_bytes(list(model.parameters()) + added, optimizer)
    print(f"growing n_layer {plan.old} -> {plan.new} ({plan.strategy}): {before:,} -> {after:,} parameters "
          f"(x{after / before:.1f}), checkpoint about {format_bytes(size)}")
    check_free_space(out, size, "the grown checkpoint")


def _deepen_dcp(args, src: Path, out: Path, depth: dict) -> int:
    """A distributed (DCP) checkpoint deepened offline, one tensor at a time."""
    def announce(e):
        _announce(e["dims_before"], e["dims_after"], e["params_before"], e["params_after"], e["bytes"], out,
                  ", one tensor at a time (distributed checkpoint)")

    entry = deepen_dcp(src, out / "ckpt", before_write=announce, **depth)
    for note in entry["notes"]:
        print(f"  note: {note}")
    print(f"grown checkpoint at step {entry['step']}: {out / 'ckpt'} ({entry['seconds']:.1f} s; check it with "
          f"`growkern eval {out}`)")
    return 0


def cmd_grow(args) -> int:
    depth = depth_options(args)
    if args.rewarm_steps is not None and args.schedule != "rewarm":
        raise CLIError(f"--rewarm-steps goes with --schedule rewarm, not with "
                       f"{f'--schedule {args.schedule}' if args.schedule else 'the default schedule'}")
    kind = checkpoint_kind(args.ckpt)
    if kind != "growkern":
        return grow_hf(args, kind, depth)
    out = Path(args.out)
    src, src_meta = ckpt_mod.read_meta(args.ckpt)
    _check_grow_out(src, out, args.force)
    if args.schedule == "rewarm" and not args.rewarm_steps:
        raise CLIError("--schedule rewarm needs --rewarm-steps N")
    widths = dict(factor=args.factor, d_model=args.d_model, d_ff=args.d_ff, n_head=args.n_head)
    widen = depth is None or any(v is not None for v in widths.values())  # --n-layer alone: depth only
    targets = growth_targets(**widths)
    options = parse_options(args.option)
    taken = sorted(set(options) & {"factor", "d_model", "d_ff", "n_head", "strategy", "seed"})
    if taken:
        raise CLIError(f"--option {taken[0]}=... is a growth argument, not a strategy option; give it as "
                       f"--{taken[0].replace('_', '-')}")
    if src_meta.get("storage") == "dcp":
        if depth is not None and widen:
            raise CLIError(f"{src} is a distributed checkpoint, grown offline one growth at a time: give the width "
                           f"and the depth (--n-layer) to two `growkern grow` commands")
        if depth is not None:
            return _deepen_dcp(args, src, out, depth)
        return _grow_dcp(args, src, out, targets, options)
    ck = ckpt_mod.load(args.ckpt, device=resolve_device(args.device))
    corpus, _ = corpus_for(ck, args.data)
    history = []
    if widen:
        try:
            plan = plan_growth(ck.model, strategy=args.strategy, seed=args.seed, **targets, **options)
        except TypeError as e:  # a strategy option of the wrong type
            raise CLIError(str(e)) from None
        if depth is not None:
            plan_depth(len(ck.model.blocks), **depth)  # both growths' arguments checked before either runs
        _announce_growth(ck.model, ck.optimizer, plan, out)
        report, entry = grow_checkpoint(ck, corpus, **targets, strategy=args.strategy, seed=args.seed,
                                        schedule=args.schedule, rewarm_steps=args.rewarm_steps,
                                        options=options, plan=plan)
        print(report)
        p = report.preservation
        print(f"  probe batch loss (validation): small {p['loss_small']:.4f} -> wide {p['loss_wide']:.4f}")
        history.append(entry)
    if depth is not None:
        _announce_depth(ck, depth, out)
        device = next(ck.model.parameters()).device
        report = deepen_(ck.model, ck.optimizer, ck.scheduler, **depth,
                         probe_batch=_probe_batch(corpus, ck.train_config, device),
                         schedule="continue" if widen else (args.schedule or "continue"),
                         rewarm_steps=None if widen else args.rewarm_steps)
        print(report)
        p = report.preservation
        print(f"  probe batch loss (validation): shallow {p['loss_small']:.4f} -> deep {p['loss_wide']:.4f}")
        entry = dataclasses.asdict(report)
        entry.update(step=ck.step, source=str(ck.path), positions=depth["positions"], seed=args.seed)
        history.append(entry)
    ckpt_mod.save(out / "ckpt", ck.model, ck.optimizer, ck.scheduler, step=ck.step,
                  train_config=ck.train_config, data_state=ck.data, rng=ck.rng,
                  tokenizer=ck.tokenizer, tokenizer_file=ck.tokenizer_file,
                  growth_history=ck.growth_history + history, storage=ck.meta.get("storage", "file"))
    print(f"grown checkpoint at step {ck.step}: {out / 'ckpt'}")
    return 0


# --- parser ---------------------------------------------------------------------

def add_parsers(sub) -> None:
    """`growkern grow` on the subparsers of build_parser."""
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
    g.add_argument("--schedule", choices=["continue", "rewarm", "restart"],
                   help="the LR schedule after growth (growkern checkpoints): continue it, re-warm it "
                        "linearly over --rewarm-steps, or restart it from its step 0 (a new run, warmup "
                        "again) (default: the strategy's: restart for szp, continue for the others)")
    g.add_argument("--rewarm-steps", type=int, metavar="N", help="length of the re-warm ramp")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy option, repeatable (e.g. noise=0.05, preserving=False)")
    g.add_argument("--n-layer", type=int, metavar="N",
                   help="grow in depth to N blocks with growkern.deepen_ (growkern checkpoints; alone it grows "
                        "depth only, with width targets the width grows first)")
    g.add_argument("--depth-strategy", choices=DEPTH_STRATEGIES,
                   help="how the new blocks are made (default identity: copies with zero residual outputs, "
                        "function preserving)")
    g.add_argument("--positions", metavar="I,J,...",
                   help="old blocks after which identity, fresh and interleave put new blocks, one per new "
                        "block (default: spread evenly)")
    g.add_argument("--data", metavar="PATH", help="data for the validation probe (default: the run's)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--force", action="store_true", help="replace a checkpoint already in OUT/ckpt "
                                                        "(growkern checkpoints)")
    g.set_defaults(func=cmd_grow)
