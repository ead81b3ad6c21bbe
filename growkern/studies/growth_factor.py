"""Study 2, `study growth-factor`: which growth factor pays off (docs/studies.md).

For each growth factor g and budget r (tokens per target non-embedding parameter) a
small model of width d_model/g (fixed head_dim) trains on r N_s tokens, is grown to the
target with the preset's strategy (default szp) and continues for r N tokens. One
scratch run of the target, at scratch_factor (2) times the largest grown run's compute,
gives the reference curve; the speedup of (g, r) reads the compute scratch needs to
reach the grown run's final val loss off the part of that curve within 2x the grown
run's own compute. All runs share the data order, AdamW (betas 0.9/0.95) and a
constant-after-warmup LR, so every shorter run is exactly a prefix of a longer one:
the small models of all budgets are one run per g (checkpoints at r N_s tokens), and
the scratch run for a grown run is the prefix of the one long scratch run."""
from __future__ import annotations

import math
import shlex
import shutil
import sys
import time
from pathlib import Path

from .. import checkpoint as ckpt_mod
from .. import metrics
from .. import train as train_mod
from ..model import GPT, GPTConfig
from ..plan import plan_growth
from ..widen import widen_
from .cache import RunStore, atomic_write_json, check_output, config_key
from .heldout import heldout_windows, load_corpus, resolve_device, torch_threads, val_loss
from .presets import default_data, get_preset, preset_dict
from .progress import Progress, fmt_seconds
from .runs import checkpointed_run, existing_checkpoints, fresh_start
from .warmstart import StudyResult

# A constant schedule ignores its horizon; one fixed value keeps all runs' configs, and
# so their cache keys, independent of their lengths.
HORIZON = 10**9
COLUMNS = ("factor", "budget", "strategy", "small_d_model", "small_n_head", "small_d_ff", "params_small",
           "params_target", "small_steps", "grown_steps", "small_tokens", "grown_tokens", "small_flops",
           "total_flops", "loss_small", "loss_after_growth", "final_loss", "scratch_flops_to_match",
           "speedup", "speedup_exact", "speedup_text", "seconds", "key")


def validate(p) -> None:
    def need(cond, msg):
        if not cond:
            raise ValueError(f"growth-factor preset {p.name!r}: {msg}")
    need(len(p.factors) >= 1 and all(g >= 1 for g in p.factors), f"factors must be >= 1, got {p.factors}")
    need(len(p.budgets) >= 1 and all(r > 0 for r in p.budgets), f"budgets must be > 0, got {p.budgets}")
    need(p.scratch_factor >= 1, f"scratch_factor must be >= 1, got {p.scratch_factor}")
    need(p.eval_every >= 1, f"eval_every must be >= 1, got {p.eval_every}")
    for g in p.factors:
        heads = p.n_head / g
        need(abs(heads - round(heads)) < 1e-9 and round(heads) >= 1,
             f"factor {g:g} gives {heads:g} heads for the small model (n_head {p.n_head} / {g:g}); "
             f"allowed: factors dividing n_head (fixed head_dim {p.head_dim})")


def target_config(p, vocab_size: int) -> GPTConfig:
    d = p.d_model
    return GPTConfig(vocab_size=vocab_size, block_size=p.block_size, n_layer=p.n_layer, n_head=p.n_head,
                     d_model=d, d_ff=4 * d, norm="rmsnorm")


def small_config(target: GPTConfig, p, g: float) -> GPTConfig:
    """Width d_model/g at fixed head_dim: heads n_head/g, d_ff 4 d_model/g."""
    heads = round(p.n_head / g)
    d = heads * p.head_dim
    return target.replace(n_head=heads, n_kv_head=heads, d_model=d, d_ff=4 * d)


def train_config(p) -> train_mod.TrainConfig:
    return train_mod.TrainConfig(
        steps=HORIZON, batch_size=p.batch_size, block_size=p.block_size, lr=p.lr, min_lr=p.lr,
        warmup=p.warmup, schedule="constant", weight_decay=p.weight_decay, betas=(0.9, 0.95),
        eval_every=0, regime="deterministic", seed=p.seed, progress=False)


def _sizes(cfg: GPTConfig, block_size: int) -> tuple[int, float]:
    """(non-embedding parameters, training FLOPs per token) of GPT(cfg)."""
    m = GPT(cfg)
    return m.num_params(non_embedding=True), train_mod.flops_per_token(m, block_size)


def steps_for(tokens: float, tokens_per_step: int) -> int:
    return max(1, round(tokens / tokens_per_step))


def compute_curve(curve, start_step: int, start_flops: float, flops_per_step: float):
    """[step, val_loss] -> [flops, val_loss] for the steps from start_step on."""
    return [[start_flops + (s - start_step) * flops_per_step, l] for s, l in curve if s >= start_step]


def speedup_cell(scratch_flops, scratch_losses, grown_flops: float, grown_loss: float,
                 scratch_factor: float = 2.0) -> tuple[float, bool]:
    """speedup(g, r) per docs/studies.md: scratch's curve up to scratch_factor x the grown
    run's compute, the compute at which it first reaches the grown run's final loss,
    divided by the grown run's compute; (lower bound, False) when it never does."""
    limit = scratch_factor * grown_flops * (1 + 1e-12)
    pts = [(f, l) for f, l in zip(scratch_flops, scratch_losses) if f <= limit]
    return metrics.speedup([f for f, _ in pts], [l for _, l in pts], grown_flops, grown_loss)


def speedup_text(value: float, exact: bool) -> str:
    return f"{value:.2f}" if exact else f">{value:.2f}"


def _grow_start(small_ckpt, target: GPTConfig, p, tokens, windows, device):
    """init() of a grown run: the small model's checkpoint grown to the target."""
    def init():
        ck = ckpt_mod.load(small_ckpt, device=device)
        ck.restore_rng()
        model, opt, sched = ck.model, ck.optimizer, ck.scheduler
        plan = plan_growth(model.config, d_model=target.d_model, d_ff=target.d_ff, n_head=target.n_head,
                           strategy=p.strategy, seed=p.seed, **dict(p.strategy_options))
        widen_(model, opt, sched, plan=plan, schedule="continue")
        batches = ck.batches(tokens)  # the data stream goes on where the small model stopped
        return model, opt, sched, batches, ck.train_config, ck.step, [[ck.step, val_loss(model, windows)]]
    return init


def _command(preset_name, out) -> str:
    return shlex.join([Path(sys.executable).name, "-m", "growkern.studies", "growth-factor",
                       "--preset", preset_name, "--out", str(out)])


def run_growth_factor(preset="smoke", out=None, data=None, *, device="auto", threads=None,
                      progress: bool = True, command: str | None = None, force: bool = False,
                  workers: int | None = None, **overrides) -> StudyResult:
    """Run (or finish, or re-report) the growth-factor study into `out`: results.csv,
    scratch_curve.csv, report.md and PNG plots. `overrides` replace preset fields
    (e.g. strategy="exact_copy", budgets=(5, 10))."""
    from .growth_factor_report import write_report

    p = get_preset("growth-factor", preset, **overrides)
    validate(p)
    out = Path(out) if out is not None else Path("results") / f"growth-factor-{p.name}"
    check_output(out, "growth-factor", preset_dict(p), force=force)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    with torch_threads(threads or p.threads):
        corpus = load_corpus(data, p.vocab_size, out / "cache" / "corpus")
        check_output(out, "growth-factor", preset_dict(p), corpus.key, force=force)
        windows = heldout_windows(corpus, p.block_size, p.eval_batch_size, p.eval_batches)
        tokref = ckpt_mod.tokenizer_ref(corpus)
        target = target_config(p, corpus.vocab_size)
        tcfg = train_config(p)
        tps = p.batch_size * p.block_size
        n_target, fpt_target = _sizes(target, p.block_size)
        heldout = [p.eval_batch_size, p.eval_batches]
        common = {"train": {k: v for k, v in tcfg.to_dict().items() if k != "progress"},
                  "data": corpus.key, "heldout": heldout, "eval_every": p.eval_every}
        store = RunStore(out / "runs")

        # --- the plan: small runs per g, grown runs per (g, r), one scratch run ---------
        smalls, grown = {}, []
        for g in p.factors:
            scfg = small_config(target, p, g)
            n_small, fpt_small = _sizes(scfg, p.block_size)
            key = config_key({"kind": "gf-small", "gpt": scfg.to_dict(), **common})
            smalls[g] = {"cfg": scfg, "params": n_small, "fpt": fpt_small, "key": key,
                         "steps": {r: steps_for(r * n_small, tps) for r in p.budgets}}
            for r in p.budgets:
                s_steps, c_steps = smalls[g]["steps"][r], steps_for(r * n_target, tps)
                cfg = {"kind": "gf-grown", "small": key, "small_steps": s_steps, "target": target.to_dict(),
                       "strategy": p.strategy, "strategy_options": dict(p.strategy_options),
                       "grown_steps": c_steps, **common}
                small_flops = float(s_steps * tps * fpt_small)
                total = small_flops + float(c_steps * tps * fpt_target)
                grown.append({"g": g, "r": r, "cfg": cfg, "key": config_key(cfg), "small_steps": s_steps,
                              "grown_steps": c_steps, "small_flops": small_flops, "total_flops": total})
        max_total = max(x["total_flops"] for x in grown)
        scratch_steps = math.ceil(p.scratch_factor * max_total / (tps * fpt_target))
        scratch_root_key = config_key({"kind": "gf-scratch", "gpt": target.to_dict(), **common})
        scratch_cfg = {"kind": "gf-scratch-result", "run": scratch_root_key, "steps": scratch_steps}
        scratch_key = config_key(scratch_cfg)

        def small_missing(s):
            return not set(s["steps"].values()) <= set(existing_checkpoints(out / "cache" / "small" / s["key"]))
        small_todo = {g for g, s in smalls.items()
                      if any(x["g"] == g and not store.has(x["key"]) for x in grown) and small_missing(s)}
        todo = [x for x in grown if not store.has(x["key"])]
        # ETA weights: the training FLOPs of each unit still to compute
        small_work = {g: max(s["steps"].values()) * tps * s["fpt"] for g, s in smalls.items()}
        grown_work = {x["key"]: x["total_flops"] - x["small_flops"] for x in grown}
        scratch_work = scratch_steps * tps * fpt_target
        work = (sum(small_work[g] for g in small_todo) + sum(grown_work[x["key"]] for x in todo)
                + (0 if store.has(scratch_key) else scratch_work))
        n_units = len(smalls) + len(grown) + 1
        prog = Progress("growth-factor", n_units, len(small_todo) + len(todo) + (not store.has(scratch_key)),
                        enabled=progress, work=work)
        prog.log(f"preset {p.name}: target d_model {target.d_model}, {n_target:,} non-embedding parameters; "
                 f"{len(p.factors)} factors x {len(p.budgets)} budgets, strategy {p.strategy}; "
                 f"{len(todo)} of {len(grown)} grown runs to compute; scratch {scratch_steps} steps; output {out}")
        counter = {"steps": 0}

        # --- small models, then the grown runs from their checkpoints ------------------
        def run(root, init, save_steps):
            return checkpointed_run(root, init=init, tokens=corpus.train, windows=windows, save_steps=save_steps,
                                    eval_every=p.eval_every, keep_every=p.keep_every, device=dev,
                                    tokenizer=tokref, log=prog.log, counter=counter)

        def small_run(s):  # trains only the checkpoints that are missing
            return run(out / "cache" / "small" / s["key"],
                       lambda: fresh_start(s["cfg"], tcfg, corpus.train, windows, dev, p.seed),
                       s["steps"].values())

        results = {}
        for g in p.factors:
            s = smalls[g]
            what = f"small model g={g:g} (d_model {s['cfg'].d_model}, {s['params']:,} params)"
            ckpts = None
            if g in small_todo:
                t = time.perf_counter()
                prog.start(f"{what}: {max(s['steps'].values())} steps")
                ckpts = small_run(s)
                prog.finish(what, time.perf_counter() - t, work=small_work[g])
            else:
                prog.finish(what, None)
            for x in (x for x in grown if x["g"] == g):
                what = f"grown g={g:g} r={x['r']:g}"
                res = store.get(x["key"])
                if res is None:
                    t = time.perf_counter()
                    small = (ckpts or small_run(s))[x["small_steps"]]
                    prog.start(f"{what}: {x['grown_steps']} steps")
                    root = out / "cache" / "grown" / x["key"]
                    end = x["small_steps"] + x["grown_steps"]
                    done = run(root, _grow_start(small["path"], target, p, corpus.train, windows, dev), [end])
                    res = {"factor": g, "budget": x["r"], "strategy": p.strategy,
                           "small_curve": small["curve"],
                           "grown_curve": [c for c in done[end]["curve"] if c[0] >= x["small_steps"]],
                           "seconds": time.perf_counter() - t}
                    store.put(x["key"], x["cfg"], res)
                    shutil.rmtree(root, ignore_errors=True)  # the result is all a later call needs
                    prog.finish(what, res["seconds"], f"final {res['grown_curve'][-1][1]:.4f}",
                                work=grown_work[x["key"]])
                else:
                    prog.finish(what, None, f"final {res['grown_curve'][-1][1]:.4f}")
                results[(g, x["r"])] = res

        # --- the scratch reference ------------------------------------------------------
        what = f"scratch target ({scratch_steps} steps)"
        scratch = store.get(scratch_key)
        if scratch is None:
            t = time.perf_counter()
            prog.start(what)
            root = out / "cache" / "scratch" / scratch_root_key
            longer = {s: c for s, c in existing_checkpoints(root).items() if s >= scratch_steps}
            if longer:  # a longer scratch run is there: its prefix is this one
                curve = [c for c in longer[min(longer)] if c[0] <= scratch_steps]
            else:
                done = run(root, lambda: fresh_start(target, tcfg, corpus.train, windows, dev, p.seed),
                           [scratch_steps])
                curve = done[scratch_steps]["curve"]
            scratch = {"curve": curve, "steps": scratch_steps, "seconds": time.perf_counter() - t}
            store.put(scratch_key, scratch_cfg, scratch)
            prog.finish(what, scratch["seconds"], f"final {curve[-1][1]:.4f}", work=scratch_work)
        else:
            prog.finish(what, None, f"final {scratch['curve'][-1][1]:.4f}")

        # --- speedups -------------------------------------------------------------------
        sc = compute_curve(scratch["curve"], 0, 0.0, tps * fpt_target)
        s_flops, s_loss = [f for f, _ in sc], [l for _, l in sc]
        rows = []
        for x in grown:
            g, r, res = x["g"], x["r"], results[(x["g"], x["r"])]
            s = smalls[g]
            final = res["grown_curve"][-1][1]
            value, exact = speedup_cell(s_flops, s_loss, x["total_flops"], final, p.scratch_factor)
            need = metrics.compute_to_reach(s_flops, s_loss, final)
            curve = (compute_curve(res["small_curve"], 0, 0.0, tps * s["fpt"])
                     + compute_curve(res["grown_curve"], x["small_steps"], x["small_flops"], tps * fpt_target))
            rows.append({
                "factor": g, "budget": r, "strategy": p.strategy, "small_d_model": s["cfg"].d_model,
                "small_n_head": s["cfg"].n_head, "small_d_ff": s["cfg"].d_ff, "params_small": s["params"],
                "params_target": n_target, "small_steps": x["small_steps"], "grown_steps": x["grown_steps"],
                "small_tokens": x["small_steps"] * tps, "grown_tokens": x["grown_steps"] * tps,
                "small_flops": x["small_flops"], "total_flops": x["total_flops"],
                "loss_small": res["small_curve"][-1][1], "loss_after_growth": res["grown_curve"][0][1],
                "final_loss": final, "scratch_flops_to_match": need, "speedup": value, "speedup_exact": exact,
                "speedup_text": speedup_text(value, exact), "seconds": res["seconds"], "key": x["key"],
                "curve": curve})

        wall = time.perf_counter() - t0
        meta = {"command": command or _command(p.name, out), "wall_seconds": wall,
                "computed": store.computed, "cached": store.hits, "device": str(dev),
                "threads": threads or p.threads, "data": str(default_data(data) or "downloaded"),
                "corpus_key": corpus.key, "train_tokens": len(corpus.train), "valid_tokens": len(corpus.valid),
                "vocab_size": corpus.vocab_size, "params_target": n_target, "flops_per_token_target": fpt_target,
                "tokens_per_step": tps, "scratch_steps": scratch_steps, "scratch_seconds": scratch["seconds"],
                "compute_seconds": sum(r["seconds"] for r in rows) + scratch["seconds"],
                "smalls": {f"{g:g}": {"d_model": s["cfg"].d_model, "n_head": s["cfg"].n_head,
                                      "d_ff": s["cfg"].d_ff, "params": s["params"],
                                      "flops_per_token": s["fpt"]} for g, s in smalls.items()}}
        files = write_report(out, p, rows, sc, meta)
        atomic_write_json(out / "study.json", {"study": "growth-factor", "preset": preset_dict(p), **meta})
    prog.log(f"done in {fmt_seconds(time.perf_counter() - t0)}: {store.computed} computed, "
             f"{store.hits} cached; {out / 'report.md'}")
    return StudyResult(out=out, rows=rows, computed=store.computed, cached=store.hits,
                       train_steps=counter["steps"], seconds=time.perf_counter() - t0, files=files)
