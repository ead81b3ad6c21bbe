"""Study 1, `study warmstart`: which warm start to continue from (docs/studies.md).

A base model is trained (deterministic regime) with full-state checkpoints at the
preset's steps; from each checkpoint one candidate per strategy is grown with
growkern.widen_ (weights, AdamW moments, step and schedule carried) and continued for
the same number of steps in two regimes and two seeds, measuring preservation at step
0, short-lag probes and the continuation's val loss."""
from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt_mod
from .. import metrics
from .. import train as train_mod
from ..model import GPTConfig
from ..plan import plan_growth
from ..widen import widen_
from .cache import RunStore, atomic_write_json, check_output, config_key
from .heldout import (frozen_copy, heldout_kl, heldout_windows, load_corpus, param_snapshot,
                      resolve_device, torch_threads, val_loss)
from .presets import REGIMES, WARMSTART_STRATEGIES, default_data, get_preset, preset_dict
from .progress import Progress, fmt_seconds
from .runs import checkpointed_run, fresh_start

# study strategy name -> (growkern strategy, options)
STRATEGY_SPECS = {
    "exact_copy": ("exact_copy", {}),
    "perturb": ("perturb", {"preserving": True}),
    "perturb_np": ("perturb", {"preserving": False}),
    "asym_reset": ("asym_reset", {}),
    "structured": ("structured", {}),
    "szp": ("szp", {}),
    "scratch": ("scratch", {}),
}
PRESERVING = ("exact_copy", "perturb", "asym_reset", "structured")  # exact at step 0 (RMSNorm)
SELECTORS = ("pres_kl", "pres_dloss", "probe_kl", "probe_rms", "probe_escape", "probe_loss")
COLUMNS = ("checkpoint", "strategy", "regime", "seed", "pres_kl", "pres_dloss", "probe_kl", "probe_rms",
           "probe_escape", "probe_loss", "final_loss", "auc", "loss_small", "loss_step0",
           "params_small", "params_wide", "plan_preserving", "seconds", "key")


@dataclass
class StudyResult:
    out: Path
    rows: list
    computed: int  # runs trained in this call
    cached: int  # runs read from the cache
    train_steps: int  # optimizer steps trained in this call (base + continuations)
    seconds: float
    files: list = field(default_factory=list)


def validate(p) -> None:
    def need(cond, msg):
        if not cond:
            raise ValueError(f"warmstart preset {p.name!r}: {msg}")
    need(p.growth_factor >= 1, f"growth_factor must be >= 1, got {p.growth_factor}")
    need(len(p.checkpoints) >= 1 and all(isinstance(s, int) and s >= 1 for s in p.checkpoints),
         f"checkpoints must be positive ints, got {p.checkpoints}")
    need(0 < p.probe_lag <= p.continuation, f"probe_lag must be in [1, continuation={p.continuation}], "
                                              f"got {p.probe_lag}")
    need(p.eval_every >= 1, f"eval_every must be >= 1, got {p.eval_every}")
    bad = [s for s in p.strategies if s not in STRATEGY_SPECS]
    need(not bad, f"unknown strategies {bad}; allowed: {', '.join(WARMSTART_STRATEGIES)}")
    need(all(r in REGIMES for r in p.regimes), f"regimes must be among {REGIMES}, got {p.regimes}")
    need(0 < p.dropout < 1 or "stochastic" not in p.regimes, f"stochastic regime needs dropout in (0, 1)")


def base_configs(p, vocab_size: int) -> tuple[GPTConfig, train_mod.TrainConfig]:
    gcfg = GPTConfig(vocab_size=vocab_size, block_size=p.block_size, n_layer=p.n_layer, n_head=p.n_head,
                     d_model=p.d_model, d_ff=4 * p.d_model, norm="rmsnorm")
    # constant LR after warmup: the horizon (steps) does not change the schedule
    tcfg = train_mod.TrainConfig(
        steps=max(p.checkpoints) + p.continuation, batch_size=p.batch_size, block_size=p.block_size,
        lr=p.lr, min_lr=p.lr, warmup=p.warmup, schedule="constant", weight_decay=p.weight_decay,
        eval_every=0, regime="deterministic", seed=p.base_seed, progress=False)
    return gcfg, tcfg


def continuation_config(base: train_mod.TrainConfig, p, regime: str, seed: int) -> train_mod.TrainConfig:
    """Deterministic: the base run's own config (dropout 0, the checkpoint's data order,
    the same for every candidate). Stochastic: dropout and an order reshuffled by the seed."""
    if regime == "deterministic":
        return base.replace(progress=False)
    return base.replace(regime="stochastic", dropout=p.dropout, salt=1 + seed, progress=False)


def run_candidate(ckpt_path, p, strategy: str, regime: str, seed: int, tokens, windows, device) -> dict:
    """Grow one candidate from a base checkpoint, continue it, and measure it."""
    t0 = time.perf_counter()
    ck = ckpt_mod.load(ckpt_path, device=device)
    model, opt, sched, s = ck.model, ck.optimizer, ck.scheduler, ck.step
    small = frozen_copy(model)
    loss_small = val_loss(small, windows)
    params_small = model.num_params()

    name, options = STRATEGY_SPECS[strategy]
    plan = plan_growth(model.config, factor=p.growth_factor, strategy=name, seed=seed, **options)
    widen_(model, opt, sched, plan=plan, schedule="continue")
    pres_kl = heldout_kl(small, model, windows)
    del small
    wide0, theta0 = frozen_copy(model), param_snapshot(model)
    loss0 = val_loss(model, windows)
    curve, probe = [[0, loss0]], {}

    cfg = continuation_config(ck.train_config, p, regime, seed)
    batches = ck.batches(tokens, cfg)
    train_mod.seed_everything(1_000_003 * seed + s)  # dropout masks

    def on_step(rec):
        rel = rec["step"] - s
        if rel % p.eval_every == 0 or rel in (p.probe_lag, p.continuation):
            curve.append([rel, val_loss(model, windows)])
        if rel == p.probe_lag:
            probe["probe_kl"] = heldout_kl(wide0, model, windows)
            probe["probe_rms"] = metrics.update_rms(theta0, param_snapshot(model))
            probe["probe_escape"] = metrics.escape_fraction(dict(model.named_parameters()), plan)
            probe["probe_loss"] = curve[-1][1]

    train_mod.train(model, opt, sched, batches, cfg, start_step=s, end_step=s + p.continuation,
                    on_step=on_step)
    steps, losses = [c[0] for c in curve], [c[1] for c in curve]
    return {
        "checkpoint": s, "strategy": strategy, "regime": regime, "seed": seed,
        "pres_kl": pres_kl, "pres_dloss": loss0 - loss_small, **probe,
        "final_loss": losses[-1], "auc": metrics.area_under_curve(steps, losses),
        "loss_small": loss_small, "loss_step0": loss0,
        "params_small": params_small, "params_wide": model.num_params(),
        "plan_preserving": plan.exact, "seconds": time.perf_counter() - t0,
        "curve": curve, "train_steps": p.continuation,
    }


def _default_command(preset_name, out) -> str:
    return shlex.join([Path(sys.executable).name, "-m", "growkern.studies", "warmstart",
                       "--preset", preset_name, "--out", str(out)])


def run_warmstart(preset="smoke", out=None, data=None, *, device="auto", threads=None,
                  progress: bool = True, command: str | None = None, force: bool = False,
                  workers: int | None = None, **overrides) -> StudyResult:
    """Run (or finish, or re-report) the warmstart study into `out`: results.csv,
    report.md and PNG plots. Finished runs are read from `out`/runs; base checkpoints
    from `out`/cache/base. `overrides` replace preset fields (e.g. continuation=64)."""
    from .warmstart_report import write_report

    p = get_preset("warmstart", preset, **overrides)
    validate(p)
    out = Path(out) if out is not None else Path("results") / f"warmstart-{p.name}"
    check_output(out, "warmstart", preset_dict(p), force=force)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    with torch_threads(threads or p.threads):
        corpus = load_corpus(data, p.vocab_size, out / "cache" / "corpus")
        check_output(out, "warmstart", preset_dict(p), corpus.key, force=force)
        windows = heldout_windows(corpus, p.block_size, p.eval_batch_size, p.eval_batches)
        gcfg, tcfg = base_configs(p, corpus.vocab_size)
        base_cfg = {"kind": "warmstart-base", "gpt": gcfg.to_dict(),
                    "train": {k: v for k, v in tcfg.to_dict().items() if k not in ("steps", "progress")},
                    "data": corpus.key}
        base_key = config_key(base_cfg)
        store = RunStore(out / "runs")

        runs = []
        for step in p.checkpoints:
            for regime in p.regimes:
                for seed in p.seeds:
                    for strategy in p.strategies:
                        cfg = {"kind": "warmstart-candidate", "base": base_key, "checkpoint": step,
                               "strategy": STRATEGY_SPECS[strategy], "growth_factor": p.growth_factor,
                               "regime": regime, "seed": seed, "continuation": p.continuation,
                               "probe_lag": p.probe_lag, "eval_every": p.eval_every,
                               "dropout": p.dropout if regime == "stochastic" else 0.0,
                               "heldout": [p.eval_batch_size, p.eval_batches]}
                        runs.append((step, regime, seed, strategy, cfg, config_key(cfg)))
        todo = [r for r in runs if not store.has(r[-1])]
        prog = Progress("warmstart", len(runs), len(todo), enabled=progress)
        prog.log(f"preset {p.name}: {len(runs)} continuations, {len(runs) - len(todo)} cached, "
                 f"{len(todo)} to compute; output {out}")
        counter = {"steps": 0}
        ckpts = {}
        if todo:
            t_base = time.perf_counter()
            prog.log(f"base model: checkpoints at steps {', '.join(map(str, p.checkpoints))}")
            ckpts = checkpointed_run(
                out / "cache" / "base" / base_key,
                init=lambda: fresh_start(gcfg, tcfg, corpus.train, windows, dev, p.base_seed),
                tokens=corpus.train, windows=windows, save_steps=p.checkpoints,
                eval_every=max(1, max(p.checkpoints) // 20), device=dev,
                tokenizer=ckpt_mod.tokenizer_ref(corpus), log=prog.log, counter=counter)
            base_steps = counter["steps"]
            prog.log(f"base model ready ({base_steps} steps trained, "
                     f"{fmt_seconds(time.perf_counter() - t_base)})")

        rows = []
        for step, regime, seed, strategy, cfg, key in runs:
            what = f"ckpt {step} {regime:13s} seed {seed} {strategy:10s}"
            res = store.get(key)
            if res is None:
                res = run_candidate(ckpts[step]["path"], p, strategy, regime, seed, corpus.train, windows, dev)
                store.put(key, cfg, res)
                counter["steps"] += res["train_steps"]
                prog.finish(what, res["seconds"], f"final {res['final_loss']:.4f}")
            else:
                prog.finish(what, None, f"final {res['final_loss']:.4f}")
            rows.append({**res, "key": key})

        wall = time.perf_counter() - t0
        meta = {"command": command or _default_command(p.name, out), "wall_seconds": wall,
                "computed": store.computed, "cached": store.hits, "device": str(dev),
                "threads": threads or p.threads, "data": str(default_data(data) or "downloaded"),
                "corpus_key": corpus.key,
                "train_tokens": len(corpus.train), "valid_tokens": len(corpus.valid),
                "vocab_size": corpus.vocab_size, "base_key": base_key,
                "compute_seconds": sum(r["seconds"] for r in rows)}
        files = write_report(out, p, rows, meta)
        atomic_write_json(out / "study.json", {"study": "warmstart", "preset": preset_dict(p), **meta})
    prog.log(f"done in {fmt_seconds(time.perf_counter() - t0)}: {store.computed} computed, "
             f"{store.hits} cached; {out / 'report.md'}")
    return StudyResult(out=out, rows=rows, computed=store.computed, cached=store.hits,
                       train_steps=counter["steps"], seconds=time.perf_counter() - t0, files=files)
