"""Running the warmstart study: the base models (trained once, checkpointed, reused), one
grown and continued candidate per (base seed, checkpoint, candidate, regime) as a unit
that reads everything from disk (so it runs in a worker process, pool.run_units), the
small_equal_compute reference (the base model continued ungrown for a grown candidate's
FLOPs), and run_warmstart, which caches every run under `out`/runs and writes the report."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ...growth.plan import plan_growth
from ...growth.probe import kl_divergence
from ...growth.widen import widen_
from ...train import checkpoint as ckpt_mod
from ...train import loop as train_mod
from ...train.data import default_data
from ...train.distributed import resolve_device
from .. import metrics
from ..cache import RunStore, atomic_write_json, check_output, config_key, read_json
from ..heldout import frozen_copy, param_snapshot, study_data, torch_threads, val_loss
from ..pool import default_workers, run_units
from ..presets import get_preset, preset_dict
from ..progress import Progress, fmt_seconds
from ..result import StudyResult, default_command, default_out
from ..runs import checkpointed_run, fresh_start
from .design import (PROTOCOL, Candidate, base_configs, continuation_config, equal_compute_steps, planned_runs,
                     validate)
from .report import write_report


@torch.no_grad()
def heldout_pass(model, windows, ref=None) -> tuple[float, float, float]:
    """(val loss of model, val loss of ref, KL(ref || model)) from one forward of each model
    per held-out batch: the numbers heldout.val_loss and heldout.heldout_kl give with a
    forward per number (nan for ref's two without ref). Evaluation was a third of a
    continuation's time."""
    models = [m for m in (model, ref) if m is not None]
    states = [m.training for m in models]
    for m in models:
        m.eval()
    loss = loss_ref = kl = 0.0
    rows = positions = 0
    try:
        dev = next(model.parameters()).device
        for x, y in windows:
            logits, batch_loss = model(x.to(dev), y.to(dev))
            loss += float(batch_loss) * x.shape[0]
            if ref is not None:
                dev_ref = next(ref.parameters()).device
                logits_ref, batch_loss = ref(x.to(dev_ref), y.to(dev_ref))
                loss_ref += float(batch_loss) * x.shape[0]
                kl += kl_divergence(logits_ref, logits.to(logits_ref.device)) * x.numel()
            rows += x.shape[0]
            positions += x.numel()
    finally:
        for m, state in zip(models, states):
            m.train(state)
    if ref is None:
        return loss / rows, float("nan"), float("nan")
    return loss / rows, loss_ref / rows, kl / positions


def run_candidate(ckpt_path, p, cand: Candidate, regime: str, base_seed: int, data, cache_dir,
                  device) -> dict:
    """Grow one candidate from a base checkpoint, continue it, and measure it (the
    small_equal_compute reference: run_small_equal_compute). Reads everything from disk,
    so it runs in a worker process as well as here."""
    if not cand.grown:
        return run_small_equal_compute(ckpt_path, p, cand, regime, base_seed, data, cache_dir, device)
    t0 = time.perf_counter()
    corpus, windows = study_data(p, data, cache_dir)
    ck = ckpt_mod.load(ckpt_path, device=resolve_device(device))
    model, opt, sched, s = ck.model, ck.optimizer, ck.scheduler, ck.step
    small = frozen_copy(model)
    params_small = model.num_params()

    name, options = cand.spec()
    plan = plan_growth(model, factor=p.growth_factor, strategy=name, seed=p.growth_seed, **options)
    widen_(model, opt, sched, plan=plan, schedule=cand.schedule,
           rewarm_steps=p.rewarm_steps if cand.schedule == "rewarm" else None)
    loss0, loss_small, pres_kl = heldout_pass(model, windows, ref=small)
    del small
    wide0, theta0 = frozen_copy(model), param_snapshot(model)
    escape0 = metrics.escape_fraction(theta0, plan)
    curve, probe, escape = [[0, loss0]], {}, {}

    cfg = continuation_config(ck.train_config, p, regime, base_seed)
    batches = ck.batches(corpus.train, cfg)
    train_mod.seed_everything(1_000_003 * (base_seed + 1) + s)  # dropout masks

    def on_step(rec):
        rel = rec["step"] - s
        if rel in p.escape_lags or rel == p.probe_lag:
            now = param_snapshot(model)
            escape[rel] = metrics.update_escape(theta0, now, plan)
        if rel == p.probe_lag:  # the probe's loss and KL from one forward
            loss, _, probe["probe_kl"] = heldout_pass(model, windows, ref=wide0)
            curve.append([rel, loss])
            probe["probe_rms"] = metrics.relative_update_rms(theta0, now)
            probe["probe_update_rms"] = metrics.update_rms(theta0, now)
            probe["probe_escape"] = escape[rel]
            probe["probe_loss"] = loss
        elif rel % p.eval_every == 0 or rel == p.continuation:
            curve.append([rel, val_loss(model, windows)])

    train_mod.train(model, opt, sched, batches, cfg, start_step=s, end_step=s + p.continuation,
                    on_step=on_step)
    steps, losses = [c[0] for c in curve], [c[1] for c in curve]
    return {
        "checkpoint": s, "base_seed": base_seed, "growth_seed": p.growth_seed, "regime": regime,
        "candidate": cand.name, "strategy": cand.strategy, "noise": dict(cand.options).get("noise"),
        "schedule": cand.schedule, "group": cand.group,
        "pres_kl": pres_kl, "pres_dloss": loss0 - loss_small, "escape0": escape0,
        **{f"escape_{lag}": escape.get(lag) for lag in (1, 4, 16)}, **probe,
        "final_loss": losses[-1], "auc": metrics.area_under_curve(steps, losses),
        "loss_small": loss_small, "loss_step0": loss0,
        "params_small": params_small, "params_wide": model.num_params(),
        "plan_preserving": plan.exact, "steps": p.continuation,
        "flops": train_mod.flops_per_token(model, p.block_size) * p.batch_size * p.block_size * p.continuation,
        "seconds": time.perf_counter() - t0, "curve": curve, "train_steps": p.continuation,
    }


class StretchedSchedule:
    """The base run's LR schedule from step `start`, stretched so that `steps` steps of
    the small model cover what `continuation` steps of a grown candidate do: the same LR
    at the same fraction of the compute."""

    def __init__(self, base, start: int, continuation: int, steps: int):
        self.base, self.start, self.rate = base, start, continuation / steps

    def __call__(self, i: int) -> float:
        return self.base(self.start + i * self.rate)


def run_small_equal_compute(ckpt_path, p, cand: Candidate, regime: str, base_seed: int, data, cache_dir,
                            device) -> dict:
    """The small_equal_compute reference: the base model, not grown, continued from the
    checkpoint with its own optimizer state, data stream and batch for the FLOPs a grown
    candidate's continuation spends (design.equal_compute_steps), on the base schedule
    stretched over those steps. Its curve and probe are read at the grown candidates'
    compute: x = steps x (small FLOPs / wide FLOPs), the probe at the probe lag's compute.
    Growth metrics (preservation, escape) do not apply: left empty."""
    t0 = time.perf_counter()
    corpus, windows = study_data(p, data, cache_dir)
    ck = ckpt_mod.load(ckpt_path, device=resolve_device(device))
    model, opt, s = ck.model, ck.optimizer, ck.step
    n = equal_compute_steps(p, model.config)
    per_step = p.continuation / n  # grown-candidate steps of compute per small-model step
    probe_at = max(1, round(p.probe_lag / per_step))
    evals = {round(k / per_step) for k in range(p.eval_every, p.continuation + 1, p.eval_every)} | {n}
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [StretchedSchedule(f, s, p.continuation, n) for f in ck.scheduler.lr_lambdas])
    small0, theta0 = frozen_copy(model), param_snapshot(model)
    loss0 = val_loss(model, windows)
    curve, probe = [[0, loss0]], {}
    cfg = continuation_config(ck.train_config, p, regime, base_seed)
    batches = ck.batches(corpus.train, cfg)
    train_mod.seed_everything(1_000_003 * (base_seed + 1) + s)  # dropout masks

    def on_step(rec):
        i = rec["step"] - s
        if i == probe_at:
            loss, _, probe["probe_kl"] = heldout_pass(model, windows, ref=small0)
            now = param_snapshot(model)
            probe["probe_rms"] = metrics.relative_update_rms(theta0, now)
            probe["probe_update_rms"] = metrics.update_rms(theta0, now)
            probe["probe_loss"] = loss
            curve.append([i * per_step, loss])
        elif i in evals:
            curve.append([i * per_step, val_loss(model, windows)])

    train_mod.train(model, opt, sched, batches, cfg, start_step=s, end_step=s + n, on_step=on_step)
    steps, losses = [c[0] for c in curve], [c[1] for c in curve]
    return {
        "checkpoint": s, "base_seed": base_seed, "growth_seed": p.growth_seed, "regime": regime,
        "candidate": cand.name, "strategy": cand.strategy, "noise": None, "schedule": "stretched",
        "group": cand.group, "pres_kl": None, "pres_dloss": None, "escape0": None,
        **{f"escape_{lag}": None for lag in (1, 4, 16)}, "probe_escape": None, **probe,
        "final_loss": losses[-1], "auc": metrics.area_under_curve(steps, losses),
        "loss_small": loss0, "loss_step0": loss0, "params_small": model.num_params(),
        "params_wide": model.num_params(), "plan_preserving": None, "steps": n,
        "flops": train_mod.flops_per_token(model, p.block_size) * p.batch_size * p.block_size * n,
        "seconds": time.perf_counter() - t0, "curve": curve, "train_steps": n,
    }


def train_base(p, base_seed: int, base_root, data, cache_dir, device, tokenizer) -> dict:
    """The base model of one seed: checkpoints at the preset's steps under base_root
    (trained once, reused). Returns the checkpoint paths by step, the steps trained and
    the seconds it took."""
    t0 = time.perf_counter()
    corpus, windows = study_data(p, data, cache_dir)
    dev = resolve_device(device)
    gcfg, tcfg = base_configs(p, corpus.vocab_size, base_seed)
    counter = {"steps": 0}
    ckpts = checkpointed_run(
        base_root, init=lambda: fresh_start(gcfg, tcfg, corpus.train, windows, dev, base_seed),
        tokens=corpus.train, windows=windows, save_steps=p.checkpoints,
        eval_every=max(1, max(p.checkpoints) // 20), device=dev, tokenizer=tokenizer, counter=counter)
    return {"paths": {step: str(info["path"]) for step, info in ckpts.items()}, "steps": counter["steps"],
            "seconds": time.perf_counter() - t0}


def run_warmstart(preset="smoke", out=None, data=None, *, device="auto", threads=None,
                  progress: bool = True, command: str | None = None, force: bool = False,
                  workers: int | None = None, **overrides) -> StudyResult:
    """Run (or finish, or re-report) the warmstart study into `out`: results.csv,
    report.md and PNG plots. Finished runs are read from `out`/runs; base checkpoints
    from `out`/cache/base. `overrides` replace preset fields (e.g. continuation=64)."""
    p = get_preset("warmstart", preset, **overrides)
    validate(p)
    out = Path(out) if out is not None else default_out("warmstart", p.name)
    check_output(out, "warmstart", preset_dict(p), force=force)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    workers = workers or default_workers(dev)
    cache_dir = out / "cache" / "corpus"
    with torch_threads(threads or p.threads):
        corpus, windows = study_data(p, data, cache_dir)
        check_output(out, "warmstart", preset_dict(p), corpus.key, force=force)
        bases = {}
        for base_seed in p.base_seeds:
            gcfg, tcfg = base_configs(p, corpus.vocab_size, base_seed)
            bases[base_seed] = config_key({
                "kind": "warmstart-base", "gpt": gcfg.to_dict(), "data": corpus.key,
                "train": {k: v for k, v in tcfg.to_dict().items() if k != "progress"}})
        store = RunStore(out / "runs")

        runs = []  # (what, key, config, candidate, regime, base_seed, checkpoint)
        for base_seed, step, cand, regime in planned_runs(p):
            cfg = {"kind": "warmstart-candidate", "protocol": PROTOCOL, "base": bases[base_seed], "checkpoint": step,
                   "strategy": cand.spec(), "schedule": cand.schedule,
                   "rewarm_steps": p.rewarm_steps if cand.schedule == "rewarm" else None,
                   "growth_factor": p.growth_factor, "growth_seed": p.growth_seed,
                   "regime": regime, "continuation": p.continuation, "probe_lag": p.probe_lag,
                   "escape_lags": p.escape_lags, "eval_every": p.eval_every,
                   "dropout": p.dropout if regime == "stochastic" else 0.0,
                   "heldout": [p.eval_batch_size, p.eval_batches]}
            what = f"base {base_seed} ckpt {step} {regime:13s} {cand.name}"
            runs.append((what, config_key(cfg), cfg, cand, regime, base_seed, step))
        todo = [r for r in runs if not store.has(r[1])]
        prog = Progress("warmstart", len(runs), len(todo), enabled=progress)
        prog.log(f"preset {p.name}: {len(runs)} continuations, {len(runs) - len(todo)} cached, "
                 f"{len(todo)} to compute with {workers} worker(s); output {out}")
        counter = {"steps": 0}
        ckpts = {}
        # the base models' own training times, by base key: measured when trained here,
        # else as the study.json of the call that trained them recorded them
        held = read_json(out / "study.json") or {}
        base_seconds = {k: v for k, v in (held.get("base_seconds") or {}).items() if k in bases.values()}
        need = sorted({r[5] for r in todo})
        if need:
            t_base = time.perf_counter()
            prog.log(f"base models (seeds {', '.join(map(str, need))}): checkpoints at steps "
                     f"{', '.join(map(str, p.checkpoints))}")
            tokref = ckpt_mod.tokenizer_ref(corpus)

            def base_done(seed, res):
                ckpts[seed] = {int(k): v for k, v in res["paths"].items()}
                counter["steps"] += res["steps"]
                if res["steps"]:  # trained now, not read from its checkpoints
                    base_seconds[bases[seed]] = res["seconds"]

            run_units([(seed, (p, seed, out / "cache" / "base" / bases[seed], data, cache_dir, str(dev), tokref))
                       for seed in need], train_base, workers=workers, on_result=base_done)
            prog.log(f"base models ready ({counter['steps']} steps trained, "
                     f"{fmt_seconds(time.perf_counter() - t_base)})")

        by_key = {r[1]: r for r in runs}

        def done(key, res):
            what, _, cfg, *_ = by_key[key]
            store.put(key, cfg, res)
            counter["steps"] += res["train_steps"]
            prog.finish(what, res["seconds"], f"final {res['final_loss']:.4f}")

        run_units([(key, (ckpts[seed][step], p, cand, regime, seed, data, cache_dir, str(dev)))
                   for _, key, _, cand, regime, seed, step in todo],
                  run_candidate, workers=workers, on_result=done)
        computed = {r[1] for r in todo}
        rows = []
        for what, key, *_ in runs:
            res = store.get(key, count=key not in computed)
            if key not in computed:
                prog.finish(what, None, f"final {res['final_loss']:.4f}")
            rows.append({**res, "key": key})

        wall = time.perf_counter() - t0
        meta = {"command": command or default_command("warmstart", p.name, out), "wall_seconds": wall,
                "computed": store.computed, "cached": store.hits, "device": str(dev),
                "threads": threads or p.threads, "data": str(default_data(data) or "downloaded"),
                "corpus_key": corpus.key,
                "train_tokens": len(corpus.train), "valid_tokens": len(corpus.valid),
                "vocab_size": corpus.vocab_size, "base_keys": bases, "workers": workers,
                "compute_seconds": sum(r["seconds"] for r in rows),
                "computed_seconds": sum(r["seconds"] for r, (_, key, *_) in zip(rows, runs) if key in computed),
                "base_seconds": base_seconds}
        files = write_report(out, p, rows, meta)
        atomic_write_json(out / "study.json", {"study": "warmstart", "preset": preset_dict(p), **meta})
    prog.log(f"done in {fmt_seconds(time.perf_counter() - t0)}: {store.computed} computed, "
             f"{store.hits} cached; {out / 'report.md'}")
    return StudyResult(out=out, rows=rows, computed=store.computed, cached=store.hits,
                       train_steps=counter["steps"], seconds=time.perf_counter() - t0, files=files)
