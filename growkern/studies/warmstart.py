"""Study 1, `study warmstart`: which warm start to continue from (docs/studies.md).

Base models, one per base seed, are trained (deterministic regime, muP, a decaying LR
schedule) with full-state checkpoints at the preset's steps. From each checkpoint one
candidate per strategy is grown with growkern.widen_ (weights, AdamW moments, step and
schedule carried; szp and scratch start a new run) and continued for the same number of
steps in two regimes; the preserving strategies are also continued with a re-warmed
schedule, and perturb at several noise scales. Each continuation measures preservation
at step 0, the update's escape from the clone subspace at short lags, a probe at the
probe lag, and the val-loss curve."""
from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..train import checkpoint as ckpt_mod
from . import metrics
from ..train import loop as train_mod
from ..models.gpt import GPTConfig
from ..growth.plan import plan_growth
from ..growth.widen import widen_
from .cache import RunStore, atomic_write_json, check_output, config_key
from ..train.distributed import resolve_device
from .heldout import frozen_copy, heldout_kl, param_snapshot, study_data, torch_threads, val_loss
from .pool import default_workers, run_units
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
PAPER_FAMILIES = ("exact_copy", "perturb", "asym_reset", "structured")  # the paper's candidate pool
PRESERVING = ("exact_copy", "perturb", "asym_reset", "structured")  # exact at step 0 (RMSNorm)
NEW_RUN = ("szp", "scratch")  # start a new training run: moments, step and schedule restart
DEFAULT_NOISE = 0.01  # perturb's default relative noise (the main candidates)
SELECTORS = ("pres_kl", "pres_dloss", "escape0", "probe_escape", "probe_kl", "probe_rms", "probe_loss")
COLUMNS = ("checkpoint", "base_seed", "growth_seed", "regime", "candidate", "strategy", "noise", "schedule",
           "group", "pres_kl", "pres_dloss", "escape0", "escape_1", "escape_4", "escape_16", "probe_escape",
           "probe_kl", "probe_rms", "probe_update_rms", "probe_loss", "final_loss", "auc", "loss_small",
           "loss_step0", "params_small", "params_wide", "plan_preserving", "seconds", "key")


@dataclass(frozen=True)
class Candidate:
    """One warm start: a strategy with its options and the schedule it continues with.
    group: "main" (every strategy, its default options), "schedule" (a preserving one
    re-warmed) or "noise" (perturb at another noise scale)."""
    name: str
    strategy: str  # study strategy name (STRATEGY_SPECS)
    options: tuple = ()  # extra growkern options, (key, value) pairs
    schedule: str = "continue"
    group: str = "main"

    def spec(self) -> tuple[str, dict]:
        name, opts = STRATEGY_SPECS[self.strategy]
        return name, {**opts, **dict(self.options)}


def candidates(p) -> list[Candidate]:
    out = [Candidate(s, s, schedule="restart" if s in NEW_RUN else "continue") for s in p.strategies]
    if p.rewarm:
        out += [Candidate(f"{s}+rewarm", s, schedule="rewarm", group="schedule")
                for s in p.strategies if s in PRESERVING]
    for noise in p.noise_scales:
        if noise == DEFAULT_NOISE:
            continue  # the main perturb / perturb_np
        for s in ("perturb", "perturb_np"):
            out.append(Candidate(f"{s}@{noise:g}", s, options=(("noise", noise),), group="noise"))
    return out


def candidate_regimes(p, cand: Candidate) -> tuple:
    """The noise sweep runs in the deterministic regime only (where noise is the only
    difference between candidates); the others in every regime."""
    return tuple(r for r in p.regimes if cand.group != "noise" or r == "deterministic")


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
    need(p.growth_factor > 1, f"growth_factor must be > 1, got {p.growth_factor}")
    need(len(p.checkpoints) >= 1 and all(isinstance(s, int) and s >= 1 for s in p.checkpoints),
         f"checkpoints must be positive ints, got {p.checkpoints}")
    need(len(p.base_seeds) >= 1 and len(set(p.base_seeds)) == len(p.base_seeds),
         f"base_seeds must be distinct, got {p.base_seeds}")
    need(p.sweep_seed_count is None or (isinstance(p.sweep_seed_count, int) and p.sweep_seed_count >= 0),
         f"sweep_seed_count must be None (every base seed) or an int >= 0, got {p.sweep_seed_count!r}")
    need(0 < p.probe_lag <= p.continuation, f"probe_lag must be in [1, continuation={p.continuation}], "
                                              f"got {p.probe_lag}")
    need(all(0 < lag <= p.continuation for lag in p.escape_lags),
         f"escape_lags must be in [1, continuation={p.continuation}], got {p.escape_lags}")
    need(p.eval_every >= 1, f"eval_every must be >= 1, got {p.eval_every}")
    bad = [s for s in p.strategies if s not in STRATEGY_SPECS]
    need(not bad, f"unknown strategies {bad}; allowed: {', '.join(WARMSTART_STRATEGIES)}")
    need(all(r in REGIMES for r in p.regimes), f"regimes must be among {REGIMES}, got {p.regimes}")
    need(0 < p.dropout < 1 or "stochastic" not in p.regimes, "stochastic regime needs dropout in (0, 1)")
    need(p.schedule in ("constant", "cosine", "wsd"), f"schedule must be constant, cosine or wsd, got {p.schedule!r}")
    need(p.parameterization in ("sp", "mup"), f"parameterization must be sp or mup, got {p.parameterization!r}")
    need(all(0 < n <= 1 for n in p.noise_scales), f"noise_scales must be in (0, 1], got {p.noise_scales}")


def base_configs(p, vocab_size: int, base_seed: int) -> tuple[GPTConfig, train_mod.TrainConfig]:
    mup = dict(parameterization="mup", mup_base_width=p.d_model) if p.parameterization == "mup" else {}
    gcfg = GPTConfig(vocab_size=vocab_size, block_size=p.block_size, n_layer=p.n_layer, n_head=p.n_head,
                     d_model=p.d_model, d_ff=4 * p.d_model, norm="rmsnorm", **mup)
    # the schedule spans the last checkpoint plus a continuation, so every candidate
    # continues on the base run's own schedule
    tcfg = train_mod.TrainConfig(
        steps=p.horizon, batch_size=p.batch_size, block_size=p.block_size, lr=p.lr,
        min_lr=p.lr * (p.min_lr_ratio if p.schedule != "constant" else 1.0), warmup=p.warmup,
        schedule=p.schedule, weight_decay=p.weight_decay, eval_every=0, regime="deterministic",
        seed=base_seed, progress=False)
    return gcfg, tcfg


def continuation_config(base: train_mod.TrainConfig, p, regime: str, base_seed: int) -> train_mod.TrainConfig:
    """Deterministic: the base run's own config (dropout 0, the checkpoint's data order,
    the same for every candidate). Stochastic: dropout and an order reshuffled per base seed."""
    if regime == "deterministic":
        return base.replace(progress=False)
    return base.replace(regime="stochastic", dropout=p.dropout, salt=1 + base_seed, progress=False)


def run_candidate(ckpt_path, p, cand: Candidate, regime: str, base_seed: int, data, cache_dir,
                  device) -> dict:
    """Grow one candidate from a base checkpoint, continue it, and measure it. Reads
    everything from disk, so it runs in a worker process as well as here."""
    t0 = time.perf_counter()
    corpus, windows = study_data(p, data, cache_dir)
    ck = ckpt_mod.load(ckpt_path, device=resolve_device(device))
    model, opt, sched, s = ck.model, ck.optimizer, ck.scheduler, ck.step
    small = frozen_copy(model)
    loss_small = val_loss(small, windows)
    params_small = model.num_params()

    name, options = cand.spec()
    plan = plan_growth(model, factor=p.growth_factor, strategy=name, seed=p.growth_seed, **options)
    widen_(model, opt, sched, plan=plan, schedule=cand.schedule,
           rewarm_steps=p.rewarm_steps if cand.schedule == "rewarm" else None)
    pres_kl = heldout_kl(small, model, windows)
    del small
    wide0, theta0 = frozen_copy(model), param_snapshot(model)
    escape0 = metrics.escape_fraction(theta0, plan)
    loss0 = val_loss(model, windows)
    curve, probe, escape = [[0, loss0]], {}, {}

    cfg = continuation_config(ck.train_config, p, regime, base_seed)
    batches = ck.batches(corpus.train, cfg)
    train_mod.seed_everything(1_000_003 * (base_seed + 1) + s)  # dropout masks

    def on_step(rec):
        rel = rec["step"] - s
        if rel in p.escape_lags or rel == p.probe_lag:
            now = param_snapshot(model)
            escape[rel] = metrics.update_escape(theta0, now, plan)
        if rel % p.eval_every == 0 or rel in (p.probe_lag, p.continuation):
            curve.append([rel, val_loss(model, windows)])
        if rel == p.probe_lag:
            probe["probe_kl"] = heldout_kl(wide0, model, windows)
            probe["probe_rms"] = metrics.relative_update_rms(theta0, now)
            probe["probe_update_rms"] = metrics.update_rms(theta0, now)
            probe["probe_escape"] = escape[rel]
            probe["probe_loss"] = curve[-1][1]

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
        "plan_preserving": plan.exact, "seconds": time.perf_counter() - t0,
        "curve": curve, "train_steps": p.continuation,
    }


def train_base(p, base_seed: int, base_root, data, cache_dir, device, tokenizer) -> dict:
    """The base model of one seed: checkpoints at the preset's steps under base_root
    (trained once, reused). Returns the checkpoint paths by step and the steps trained."""
    corpus, windows = study_data(p, data, cache_dir)
    dev = resolve_device(device)
    gcfg, tcfg = base_configs(p, corpus.vocab_size, base_seed)
    counter = {"steps": 0}
    ckpts = checkpointed_run(
        base_root, init=lambda: fresh_start(gcfg, tcfg, corpus.train, windows, dev, base_seed),
        tokens=corpus.train, windows=windows, save_steps=p.checkpoints,
        eval_every=max(1, max(p.checkpoints) // 20), device=dev, tokenizer=tokenizer, counter=counter)
    return {"paths": {step: str(info["path"]) for step, info in ckpts.items()}, "steps": counter["steps"]}


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
        for base_seed in p.base_seeds:
            for step in p.checkpoints:
                for cand in candidates(p):
                    if cand.group != "main" and not p.sweeps(base_seed):
                        continue
                    for regime in candidate_regimes(p, cand):
                        cfg = {"kind": "warmstart-candidate", "base": bases[base_seed], "checkpoint": step,
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
        need = sorted({r[5] for r in todo})
        if need:
            t_base = time.perf_counter()
            prog.log(f"base models (seeds {', '.join(map(str, need))}): checkpoints at steps "
                     f"{', '.join(map(str, p.checkpoints))}")
            tokref = ckpt_mod.tokenizer_ref(corpus)

            def base_done(seed, res):
                ckpts[seed] = {int(k): v for k, v in res["paths"].items()}
                counter["steps"] += res["steps"]

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
        meta = {"command": command or _default_command(p.name, out), "wall_seconds": wall,
                "computed": store.computed, "cached": store.hits, "device": str(dev),
                "threads": threads or p.threads, "data": str(default_data(data) or "downloaded"),
                "corpus_key": corpus.key,
                "train_tokens": len(corpus.train), "valid_tokens": len(corpus.valid),
                "vocab_size": corpus.vocab_size, "base_keys": bases, "workers": workers,
                "compute_seconds": sum(r["seconds"] for r in rows)}
        files = write_report(out, p, rows, meta)
        atomic_write_json(out / "study.json", {"study": "warmstart", "preset": preset_dict(p), **meta})
    prog.log(f"done in {fmt_seconds(time.perf_counter() - t0)}: {store.computed} computed, "
             f"{store.hits} cached; {out / 'report.md'}")
    return StudyResult(out=out, rows=rows, computed=store.computed, cached=store.hits,
                       train_steps=counter["steps"], seconds=time.perf_counter() - t0, files=files)
