"""`growkern select`: which warm start to continue a checkpoint from, for its own data.

The checkpoint (a growkern checkpoint or a Hugging Face Trainer checkpoint) loads with
its optimizer and schedule; every candidate grows from it and continues on the run's
data (growkern.selection); OUT gets ranking.md, ranking.csv, curves.png and the
winner as a full-state checkpoint of the source's kind, which `growkern train --resume
OUT` (or `trainer.train(resume_from_checkpoint=OUT)`) continues. What the selection
costs is printed before it starts; everything is checked first, and OUT is written
whole or not at all.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..growth.strategies import strategies
from ..studies.progress import fmt_seconds
from ..selection.run import DEFAULT_CANDIDATES, REGIMES, select_warm_start
from ..train import checkpoint as ckpt_mod
from ..train import data as D
from ..train.distributed import resolve_device
from .common import CLIError, _Formatter, corpus_for, non_negative_int, positive_float, positive_int, val_batches
from .grow import checkpoint_kind, growth_targets


def _candidates(text: str | None) -> list[str]:
    names = [c.strip() for c in (text or ",".join(DEFAULT_CANDIDATES)).split(",") if c.strip()]
    known = strategies()
    bad = [c for c in names if c not in known]
    if bad or not names:
        raise CLIError(f"--candidates: unknown strategy {bad[0] if bad else '(none given)'!r}; allowed: "
                       f"{', '.join(known)}, comma-separated")
    if len(set(names)) != len(names):
        raise CLIError(f"--candidates lists {next(c for c in names if names.count(c) > 1)!r} twice")
    return names


def _check_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise CLIError(f"--out {out} exists; growkern select writes a new directory and replaces nothing")


def _feed(tokens_needed: int, tokens_have: int, what: str, steps: int) -> None:
    if tokens_needed > tokens_have:
        raise CLIError(f"--budget: {steps} steps per candidate need {tokens_needed:,} training tokens, and {what} "
                       f"has {tokens_have:,}; a selection that repeats the data ranks memorization. Give a smaller "
                       f"--budget or more --data")


def _announce(n_cand: int, repeats: int, steps: int, tokens_per_step: int, n_eval_tokens: int, params: int,
              step_seconds: float) -> None:
    train_tokens = n_cand * repeats * steps * tokens_per_step
    eval_tokens = n_cand * repeats * 3 * n_eval_tokens
    flops = 6 * params * train_tokens + 2 * params * eval_tokens
    est = n_cand * repeats * (steps + 1) * step_seconds
    print(f"selecting among {n_cand} candidates x {repeats} repeat(s) x {steps} steps x {tokens_per_step:,} tokens "
          f"= {train_tokens:,} training tokens (+ {eval_tokens:,} evaluated), about {flops:.2e} FLOPs on the "
          f"grown model ({params:,} parameters); estimated {fmt_seconds(est)} (from a timed step of the small "
          f"model, scaled by the parameter ratio)", flush=True)


def _step_seconds(model, batch, ratio: float) -> float:
    """One forward of the small model without gradients, x3 for a training step, x the growth."""
    was = model.training
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        model(batch[0])
        dt = time.perf_counter() - t0
    model.train(was)
    return 3 * dt * ratio


def _progress(msg: str) -> None:
    print(f"[select] {msg}", file=sys.stderr, flush=True)


def _grown_params(model, targets, strategy) -> int:
    from ..growth.plan import plan_growth
    plan = plan_growth(model, strategy=strategy, **targets)
    return sum(math.prod(tp.new_shape) for tp in plan.tensors.values())


def _select_growkern(args, out: Path, names: list[str], targets: dict) -> int:
    ck = ckpt_mod.load(args.ckpt, device=resolve_device(args.device))
    if ck.meta.get("storage") == "dcp":
        raise CLIError(f"{args.ckpt} is a distributed checkpoint; select grows one process's state: convert it "
                       f"with growkern train --resume on one process first")
    corpus, _ = corpus_for(ck, args.data)
    tcfg = ck.train_config
    steps = args.budget or args.probe_steps
    tokens_per_step = tcfg.batch_size * tcfg.block_size
    _feed(steps * tokens_per_step, len(corpus.train), "the training split", steps)
    stream = ck.batches(corpus.train)
    batches = [stream.batch(stream.step + i) for i in range(steps * args.repeats)]  # what the run sees next
    device = next(ck.model.parameters()).device
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    evals = [(x.to(device), y.to(device)) for x, y in val_batches(corpus, tcfg)]
    small = sum(p.numel() for p in ck.model.parameters())
    wide = _grown_params(ck.model, targets, names[0])
    _announce(len(names), args.repeats, steps, tokens_per_step, sum(x.numel() for x, _ in evals), wide,
              _step_seconds(ck.model, batches[0], wide / small))
    sel = select_warm_start(ck.model, ck.optimizer, ck.scheduler, batches=batches, eval_batches=evals,
                            candidates=names, budget=args.budget, probe_steps=args.probe_steps, regime=args.regime,
                            repeats=args.repeats, seed=args.seed, apply=True, progress=_progress, **targets)
    entry = dataclasses.asdict(sel.growth)
    entry.update(step=ck.step, source=str(ck.path), schedule=None, seed=args.seed, targets=targets,
                 selection={"best": sel.best, "regime": args.regime, "budget": args.budget,
                            "candidates": names, "repeats": args.repeats})
    with ckpt_mod.staged_directory(out) as tmp:
        sel.write(tmp)
        ckpt_mod.save(tmp / "ckpt", ck.model, ck.optimizer, ck.scheduler, step=ck.step, train_config=tcfg,
                      data_state=ck.data, rng=ck.rng, tokenizer=ck.tokenizer, tokenizer_file=ck.tokenizer_file,
                      growth_history=ck.growth_history + [entry], storage="file")
    print(sel.report())
    print(f"winner {sel.best}, grown at step {ck.step}: {out / 'ckpt'}; continue it with `growkern train --resume "
          f"{out}`")
    return 0


def _hf_tokens(src: Path, data, block: int, need_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """The train and valid text tokenized with the checkpoint's own tokenizer, each story
    followed by its end-of-text token; train capped at what the selection can use."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:  # noqa: BLE001  transformers raises many kinds for a missing tokenizer
        raise CLIError(f"{src}: no tokenizer that transformers can load ({type(e).__name__}); select tokenizes "
                       f"the data with the checkpoint's own tokenizer (save it with the Trainer's "
                       f"processing_class)") from None
    train_f, valid_f = D.split_files(D.resolve_data_dir(D.default_data(data)))
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []

    def encode(path, cap):
        ids = []
        for story in D.read_stories(path):
            ids += tok(story, add_special_tokens=False)["input_ids"] + eos
            if cap and len(ids) > cap:
                break
        return np.asarray(ids, dtype=np.int64)
    return encode(train_f, need_windows * (block + 1) * 2), encode(valid_f, 64 * (block + 1))


def _windows(tokens: np.ndarray, block: int, batch: int, n_batches: int, seed: int):
    """n_batches batches of distinct non-overlapping windows, in a seeded random order."""
    n = (len(tokens) - 1) // block
    picks = np.random.default_rng(seed).permutation(n)[:n_batches * batch]
    out = []
    for i in range(0, len(picks), batch):
        s = picks[i:i + batch, None] * block + np.arange(block + 1)
        w = torch.from_numpy(np.ascontiguousarray(tokens[s]))
        out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
    return out


def _select_trainer(args, src: Path, out: Path, names: list[str], targets: dict) -> int:
    from .. import hf  # imports transformers, an optional dependency
    device = resolve_device(args.device)
    model = hf.load_model(src, device)
    optimizer = hf.load_trainer_optimizer(src, model, device)
    block, bs = args.block_size, args.batch_size
    steps = args.budget or args.probe_steps
    train, valid = _hf_tokens(src, args.data, block, steps * args.repeats * bs)
    _feed(steps * bs * block, len(train), "the training text", steps)
    n_train = min(steps * args.repeats, ((len(train) - 1) // block) // bs)
    batches = [(x.to(device), y.to(device)) for x, y in _windows(train, block, bs, n_train, args.seed)]
    evals = [(x.to(device), y.to(device)) for x, y in _windows(valid, block, bs, 4, args.seed)]
    if not evals:
        raise CLIError(f"the validation text has fewer than {block + 1} tokens; give a --block-size below it")
    small = sum(p.numel() for p in model.parameters())
    wide = _grown_params(model, targets, names[0])
    _announce(len(names), args.repeats, steps, bs * block, sum(x.numel() for x, _ in evals), wide,
              _step_seconds(model, batches[0], wide / small))
    print("  (a Trainer's LR schedule is rebuilt by the Trainer, not saved in a form select can run: the "
          "continuations hold the LR at the checkpoint's value)", flush=True)
    sel = select_warm_start(model, optimizer, None, batches=batches, eval_batches=evals, candidates=names,
                            budget=args.budget, probe_steps=args.probe_steps, regime=args.regime,
                            repeats=args.repeats, seed=args.seed, apply=False, progress=_progress, **targets)
    with ckpt_mod.staged_directory(out) as tmp:
        tmp.rmdir()  # grow_saved writes a new directory of its own
        hf.grow_saved(src, tmp, device=device, strategy=sel.best, seed=args.seed, **targets)
        sel.write(tmp)
    print(sel.report())
    print(f"winner {sel.best}: {out}; resume it with a model built from it: AutoModelForCausalLM.from_pretrained"
          f"({str(out)!r}), then trainer.train(resume_from_checkpoint={str(out)!r})")
    return 0


def cmd_select(args) -> int:
    names = _candidates(args.candidates)
    out = Path(args.out)
    _check_out(out)
    if args.budget and args.probe_steps > args.budget:
        raise CLIError(f"--probe-steps {args.probe_steps} is beyond --budget {args.budget}; allowed: 1..{args.budget} "
                       f"(or --budget 0 for the probe only)")
    targets = growth_targets(args.factor, args.d_model, args.d_ff, args.n_head)
    kind = checkpoint_kind(args.ckpt)
    if kind == "growkern":
        return _select_growkern(args, out, names, targets)
    if kind == "trainer":
        return _select_trainer(args, Path(args.ckpt), out, names, targets)
    raise CLIError(f"{args.ckpt} is a Hugging Face model directory without an optimizer state; select compares "
                   f"continuations of a training state: give a Trainer checkpoint (checkpoint-N/) or a growkern "
                   f"checkpoint")


def add_parsers(sub) -> None:
    """`growkern select` on the subparsers of build_parser."""
    s = sub.add_parser("select", formatter_class=_Formatter, help="pick the warm start to grow a checkpoint with",
                       description="Grow CKPT with each candidate warm start (from the same weights, optimizer "
                                   "moments, step and schedule), continue each on the run's data for --budget "
                                   "steps, and rank them by held-out loss. OUT gets ranking.md, ranking.csv, "
                                   "curves.png and the winner as a checkpoint of CKPT's kind: `growkern train "
                                   "--resume OUT` continues a growkern run; for a Trainer checkpoint, build the "
                                   "model from OUT and trainer.train(resume_from_checkpoint=OUT).")
    s.add_argument("ckpt", metavar="CKPT", help="growkern checkpoint or run directory, or Trainer checkpoint")
    s.add_argument("--out", required=True, metavar="DIR", help="new directory for the ranking and the winner")
    s.add_argument("--factor", type=positive_float, help="scale d_model, d_ff and heads (default 2)")
    s.add_argument("--d-model", type=positive_int, help="target d_model")
    s.add_argument("--d-ff", type=positive_int, help="target d_ff")
    s.add_argument("--n-head", type=positive_int, help="target query heads")
    s.add_argument("--candidates", metavar="A,B,...",
                   help=f"strategies to compare (default: {','.join(DEFAULT_CANDIDATES)})")
    s.add_argument("--budget", type=non_negative_int, default=128,
                   help="continuation steps per candidate; 0: rank by the probe only")
    s.add_argument("--probe-steps", type=positive_int, default=16, help="steps to the short-lag probe")
    s.add_argument("--regime", default="deterministic", choices=REGIMES,
                   help="deterministic: dropout off, batches in order; shuffle: batches reordered per repeat; "
                        "stochastic: reordered and dropout on")
    s.add_argument("--repeats", type=positive_int, default=1,
                   help="growth seeds x data windows; 3 or more give intervals on the differences")
    s.add_argument("--seed", type=int, default=0, help="the first repeat's growth seed")
    s.add_argument("--data", metavar="PATH", help="training text (default: the run's; Trainer checkpoints: "
                                                  "--data, $GROWKERN_DATA or the TinyStories sample)")
    s.add_argument("--block-size", type=positive_int, default=128, help="tokens per sequence (Trainer checkpoints)")
    s.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (Trainer checkpoints)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.set_defaults(func=cmd_select)

