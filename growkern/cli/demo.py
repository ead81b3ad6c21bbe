"""`growkern demo`: the README's main job in one command.

Train the tiny preset up to half-way, grow it 2x from its checkpoint with its optimizer
state and schedule (grow_checkpoint, as `growkern grow` does), keep training it, and
compare it with the small model continued and a wide model trained from scratch on the
same data and schedule, by validation loss and training FLOPs. Each run's checkpoint and
metrics go to OUT/<run>/, the comparison to OUT/summary.json.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..growth.strategies import strategies
from ..models.gpt import GPTConfig
from ..train import checkpoint as ckpt_mod
from ..train.distributed import resolve_device
from ..train.loop import (TrainConfig, build_optimizer, build_scheduler, evaluate, flops_per_token, init_model,
                          make_batches, seed_everything, train)
from ..train.staging import atomic_open
from .common import PRESETS, CLIError, _Formatter, positive_int, prepare_corpus, val_batches
from .grow import grow_checkpoint


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
    with atomic_open(out / "summary.json", "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    print(f"\ndone in {result['seconds_total']:.0f} s; checkpoints, metrics.jsonl and summary.json in {out}")
    print(f"next: growkern sample {out / 'wide'}   |   growkern eval {out / 'wide'}")
    return 0


# --- parser ---------------------------------------------------------------------

def add_parsers(sub) -> None:
    """`growkern demo` on the subparsers of build_parser."""
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
