"""Running the growth-factor study: the units (a small model per (g, seed), a grown run
per (g, r, seed), a scratch run per seed, each a top-level function that reads its
inputs from disk, so it runs in a worker process, pool.run_units, as well as here) and
run_growth_factor, which plans them, caches every run under `out`/runs and rewrites the
report after each budget."""
from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from ...growth.deepen import deepen_
from ...growth.plan import plan_growth
from ...growth.widen import widen_
from ...models.gpt import GPT, GPTConfig
from ...train import checkpoint as ckpt_mod
from ...train import loop as train_mod
from ...train.data import default_data
from ...train.distributed import resolve_device
from .. import metrics
from ..cache import RunStore, atomic_write_json, check_output, config_key
from ..heldout import study_data, torch_threads, val_loss
from ..pool import default_workers, run_units
from ..presets import get_preset, preset_dict
from ..progress import Progress, fmt_seconds
from ..result import StudyResult, default_command, default_out
from ..runs import checkpointed_run, existing_checkpoints, fresh_start
from .design import (BOTH, PROTOCOL, best_so_far, depth_runs, compute_curve, epochs, grown_strategies, growth_options,
                     scratch_flops_read, small_config, speedup_cell, speedup_text, steps_for, target_config,
                     train_config, validate)
from .report import write_report


def _sizes(cfg: GPTConfig, block_size: int) -> tuple[int, float]:
    """(non-embedding parameters, training FLOPs per token) of GPT(cfg)."""
    m = GPT(cfg)
    return m.num_params(non_embedding=True), train_mod.flops_per_token(m, block_size)


# --- the units: top-level functions that read their inputs from disk, so they run in ---
# --- worker processes (pool.run_units) as well as here ----------------------------------

def _logger(label: str | None):
    if not label:
        return None
    # runs.checkpointed_run's messages come with or without leading blanks ("resuming ...",
    # "  step ..."): one separator here, whatever they bring
    return lambda msg: print(f"[growth-factor] {label}: {msg.strip()}", file=sys.stderr, flush=True)


def _run(p, root, init, save_steps, corpus, windows, device, tokenizer, label, counter, eval_every=None):
    return checkpointed_run(root, init=init, tokens=corpus.train, windows=windows, save_steps=save_steps,
                            eval_every=eval_every or p.eval_every, keep_every=p.keep_every, device=device,
                            tokenizer=tokenizer, log=_logger(label), counter=counter)


def train_small(p, g: float, seed: int, root, save_steps, data, cache_dir, device, tokenizer, label=None,
                k: int = 1) -> dict:
    """The small model of (g, k, seed) (width / g, n_layer / k): checkpoints at every budget's
    r N_s tokens (trains only the missing ones). Returns {"ckpts": {step: {"path", "curve"}},
    "steps", "seconds"}."""
    t0 = time.perf_counter()
    corpus, windows = study_data(p, data, cache_dir)
    dev = resolve_device(device)
    scfg = small_config(target_config(p, corpus.vocab_size), p, g, k)
    tcfg = train_config(p, seed)
    counter = {"steps": 0}
    done = _run(p, Path(root), lambda: fresh_start(scfg, tcfg, corpus.train, windows, dev, seed), save_steps,
                corpus, windows, dev, tokenizer, label, counter)
    return {"ckpts": {s: {"path": str(i["path"]), "curve": i["curve"]} for s, i in done.items()},
            "steps": counter["steps"], "seconds": time.perf_counter() - t0}


def train_grown(p, g: float, r: float, seed: int, strategy: str, small_path, small_curve, small_steps: int,
                grown_steps: int, root, data, cache_dir, device, tokenizer, label=None) -> dict:
    """Grow the small model's checkpoint to the target with `strategy` and continue it for
    grown_steps."""
    t0 = time.perf_counter()
    corpus, windows = study_data(p, data, cache_dir)
    dev = resolve_device(device)
    target = target_config(p, corpus.vocab_size)
    options, schedule = growth_options(p, strategy)

    def init():
        ck = ckpt_mod.load(small_path, device=dev)
        ck.restore_rng()
        model, opt, sched = ck.model, ck.optimizer, ck.scheduler
        if strategy.startswith("depth:"):  # the depth axis: the methods' own way, the run goes on
            deepen_(model, opt, sched, n_layer=target.n_layer, strategy=strategy[len("depth:"):],
                    seed=p.growth_seed)
        else:
            width = p.strategy if strategy == BOTH else strategy
            plan = plan_growth(model.config, d_model=target.d_model, d_ff=target.d_ff, n_head=target.n_head,
                               strategy=width, seed=p.growth_seed, **options)
            widen_(model, opt, sched, plan=plan, schedule=schedule)
            if strategy == BOTH:  # then deeper, function preserving, in the same step
                deepen_(model, opt, sched, n_layer=target.n_layer, strategy="identity", seed=p.growth_seed)
        batches = ck.batches(corpus.train)  # the data stream goes on where the small model stopped
        return model, opt, sched, batches, ck.train_config, ck.step, [[ck.step, val_loss(model, windows)]]

    counter = {"steps": 0}
    end = small_steps + grown_steps
    root = Path(root)
    done = _run(p, root, init, [end], corpus, windows, dev, tokenizer, label, counter)
    res = {"factor": g, "budget": r, "seed": seed, "growth_seed": p.growth_seed, "strategy": strategy,
           "small_curve": small_curve,
           "grown_curve": [c for c in done[end]["curve"] if c[0] >= small_steps],
           "train_steps": counter["steps"], "seconds": time.perf_counter() - t0}
    shutil.rmtree(root, ignore_errors=True)  # the result is all a later call needs
    return res


def train_scratch(p, seed: int, steps: int, root, data, cache_dir, device, tokenizer, label=None) -> dict:
    """The target from scratch for `steps` steps (a longer run's prefix when there is one)."""
    t0 = time.perf_counter()
    corpus, windows = study_data(p, data, cache_dir)
    dev = resolve_device(device)
    root = Path(root)
    counter = {"steps": 0}
    longer = {s: c for s, c in existing_checkpoints(root).items() if s >= steps}
    if longer:  # a longer scratch run is there: its prefix is this one
        curve = [c for c in longer[min(longer)] if c[0] <= steps]
    else:
        target, tcfg = target_config(p, corpus.vocab_size), train_config(p, seed)
        done = _run(p, root, lambda: fresh_start(target, tcfg, corpus.train, windows, dev, seed), [steps],
                    corpus, windows, dev, tokenizer, label, counter, eval_every=p.scratch_every)
        curve = done[steps]["curve"]
    return {"seed": seed, "curve": curve, "steps": steps, "train_steps": counter["steps"],
            "seconds": time.perf_counter() - t0}


def run_growth_factor(preset="smoke", out=None, data=None, *, device="auto", threads=None,
                      progress: bool = True, command: str | None = None, force: bool = False,
                      workers: int | None = None, **overrides) -> StudyResult:
    """Run (or finish, or re-report) the growth-factor study into `out` (default
    result.default_out: results/growth-factor-<preset>, the smoke preset's outside the
    repository): results.csv (one row per (g, r, seed, strategy)), summary.csv (per
    (strategy, g, r): mean speedup over seeds and its CI), scratch_curve.csv, report.md
    (with the Holm-adjusted verdicts on the paper's findings) and PNG plots. `overrides`
    replace preset fields (e.g. strategy="exact_copy", budgets=(5, 10)). `workers`:
    processes for independent runs (default pool.default_workers: every core on a CPU,
    one on a GPU); results do not depend on it."""
    p = get_preset("growth-factor", preset, **overrides)
    validate(p)
    out = Path(out) if out is not None else default_out("growth-factor", p.name)
    check_output(out, "growth-factor", preset_dict(p), force=force)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    workers = workers or default_workers(dev)
    n_threads = threads or p.threads
    cache_dir = out / "cache" / "corpus"
    with torch_threads(n_threads):
        corpus, windows = study_data(p, data, cache_dir)
        check_output(out, "growth-factor", preset_dict(p), corpus.key, force=force)
        tokref = ckpt_mod.tokenizer_ref(corpus)
        target = target_config(p, corpus.vocab_size)
        tps = p.batch_size * p.block_size
        n_target, fpt_target = _sizes(target, p.block_size)
        heldout = [p.eval_batch_size, p.eval_batches]
        store = RunStore(out / "runs")

        def common(seed):
            tcfg = train_config(p, seed)
            return {"protocol": PROTOCOL, "train": {k: v for k, v in tcfg.to_dict().items() if k != "progress"},
                    "data": corpus.key, "heldout": heldout, "eval_every": p.eval_every}

        # --- the plan: small runs per (g, seed), grown runs per (g, r, seed, strategy: the
        # --- preset's everywhere, the comparison strategies at compare_factors), scratch per seed
        smalls, grown = {}, []
        # (g, k, strategies, budgets): the width axis, then the depth axis (design.depth_runs)
        axes = [(g, 1, grown_strategies(p, g), p.budgets) for g in p.factors]
        for g, k, strategy in depth_runs(p):
            axes.append((g, k, (strategy,), p.depth_budgets))
        for g, k, strategies_here, budgets_here in axes:
            sid = (g, k)
            scfg = small_config(target, p, g, k)
            n_small, fpt_small = _sizes(scfg, p.block_size)
            steps = {r: steps_for(r * n_small, tps) for r in p.budgets if r in budgets_here}
            for seed in p.seeds:
                key = config_key({"kind": "gf-small", "gpt": scfg.to_dict(), **common(seed)})
                if (sid, seed) in smalls:  # another depth strategy from the same small model
                    smalls[(sid, seed)]["steps"].update(steps)
                else:
                    smalls[(sid, seed)] = {"g": g, "k": k, "sid": sid, "seed": seed, "cfg": scfg,
                                           "params": n_small, "fpt": fpt_small, "key": key, "steps": dict(steps),
                                           "root": out / "cache" / "small" / key}
                for r in budgets_here:
                    s_steps, c_steps = steps[r], steps_for(r * n_target, tps)
                    small_flops = float(s_steps * tps * fpt_small)
                    total = small_flops + float(c_steps * tps * fpt_target)
                    for strategy in strategies_here:
                        options, schedule = growth_options(p, strategy)
                        cfg = {"kind": "gf-grown", "small": key, "small_steps": s_steps,
                               "target": target.to_dict(), "strategy": strategy, "strategy_options": options,
                               "growth_schedule": schedule, "growth_seed": p.growth_seed,
                               "grown_steps": c_steps, **common(seed)}
                        grown.append({"g": g, "k": k, "sid": sid, "r": r, "seed": seed, "strategy": strategy,
                                      "cfg": cfg, "key": config_key(cfg), "small_steps": s_steps,
                                      "grown_steps": c_steps, "small_flops": small_flops, "total_flops": total,
                                      "work": total - small_flops})
        # scratch per seed, extended budget by budget: for budgets up to r it needs
        # scratch_factor x the largest grown run's compute among them (one run; each segment
        # resumes from the previous one's checkpoint)
        budgets = sorted(p.budgets)
        width_runs = [x for x in grown if x["k"] == 1]  # the scratch runs (and their keys) follow the width axis
        seg_steps = {r: math.ceil(p.scratch_factor * max(x["total_flops"] for x in width_runs if x["r"] <= r)
                                  / (tps * fpt_target)) for r in budgets}
        scratch_steps = seg_steps[budgets[-1]]
        scratch = {}
        for seed in p.seeds:
            root_key = config_key({"kind": "gf-scratch", "gpt": target.to_dict(), **common(seed),
                                   "eval_every": p.scratch_every})
            scratch[seed] = {"root": out / "cache" / "scratch" / root_key, "segs": {}}
            for r in budgets:
                cfg = {"kind": "gf-scratch-result", "run": root_key, "steps": seg_steps[r]}
                scratch[seed]["segs"][r] = {"key": config_key(cfg), "cfg": cfg, "steps": seg_steps[r]}
        prev = {r: ([0] + [seg_steps[b] for b in budgets])[i] for i, r in enumerate(budgets)}
        seg_work = {r: max(0, seg_steps[r] - prev[r]) * tps * fpt_target for r in budgets}

        todo = [x for x in grown if not store.has(x["key"])]
        small_todo = [s for k, s in smalls.items()
                      if any((x["sid"], x["seed"]) == k for x in todo)
                      and not set(s["steps"].values()) <= set(existing_checkpoints(s["root"]))]
        scratch_todo = [(seed, r) for seed in p.seeds for r in budgets
                        if not store.has(scratch[seed]["segs"][r]["key"])]
        small_work = {(s["sid"], s["seed"]): max(s["steps"].values()) * tps * s["fpt"] for s in smalls.values()}
        work = (sum(small_work[(s["sid"], s["seed"])] for s in small_todo) + sum(x["work"] for x in todo)
                + sum(seg_work[r] for _, r in scratch_todo))
        n_units = len(smalls) + len(grown) + len(p.seeds) * len(budgets)
        prog = Progress("growth-factor", n_units, len(small_todo) + len(todo) + len(scratch_todo),
                        enabled=progress, work=work)
        prog.log(f"preset {p.name}: target d_model {target.d_model}, {n_target:,} non-embedding parameters, "
                 f"{p.parameterization} (base width {p.base_width}); {len(p.factors)} factors x "
                 f"{len(p.budgets)} budgets x {len(p.seeds)} seeds, strategy {p.strategy}"
                 + "".join(f" (+{', '.join(p.compared(g))} at g={g:g})" for g in p.factors if p.compared(g))
                 + "; "
                 f"{len(todo)} of {len(grown)} grown runs, {len(small_todo)} small and {len(scratch_todo)} "
                 f"scratch segments (to {scratch_steps} steps) to compute with {workers} worker(s); output {out}")
        counter = {"steps": 0}
        label = (lambda what: what) if progress else (lambda what: None)
        args = (data, cache_dir, str(dev), tokref)

        # --- 1. small models (every checkpoint a grown run still needs) ---------------------
        s_what = {(s["sid"], s["seed"]): f"small g={s['g']:g}{f' k={s[chr(107)]}' if s['k'] > 1 else ''} seed "
                                         f"{s['seed']} (d_model {s['cfg'].d_model}, {s['cfg'].n_layer} layers, "
                                         f"{s['params']:,} params, {max(s['steps'].values())} steps)"
                  for s in smalls.values()}

        small_seconds = {}  # compute time of the small models trained in this call

        def small_done(k, res):
            counter["steps"] += res["steps"]
            small_seconds[k] = res["seconds"]
            prog.finish(s_what[k], res["seconds"], work=small_work[k])

        small_todo.sort(key=lambda s: -small_work[(s["sid"], s["seed"])])
        run_units([((s["sid"], s["seed"]), (p, s["g"], s["seed"], s["root"], sorted(s["steps"].values()), *args,
                                            label(s_what[(s["sid"], s["seed"])]), s["k"]))
                   for s in small_todo], train_small, workers=workers, threads=n_threads or 1,
                  on_start=lambda k: prog.start(s_what[k]), on_result=small_done)
        for k in smalls:
            if smalls[k] not in small_todo:
                prog.finish(s_what[k], None)

        def self_rows(done, scratch_res):
            """results.csv rows for the budgets done: each grown run against its seed's scratch,
            both read as best-so-far envelopes, with the epochs of data each run saw."""
            curves = {seed: compute_curve(scratch_res[seed]["curve"], 0, 0.0, tps * fpt_target)
                      for seed in p.seeds}
            n_train = len(corpus.train)
            rows = []
            for x in (x for x in grown if x["r"] in done):
                g, r, seed, res = x["g"], x["r"], x["seed"], results[x["key"]]
                s = smalls[(x["sid"], seed)]
                sc = curves[seed]
                s_flops, s_loss = [f for f, _ in sc], [l for _, l in sc]
                final = res["grown_curve"][-1][1]
                best = min(l for _, l in res["grown_curve"])  # the grown run's envelope at its end
                value, exact = speedup_cell(s_flops, s_loss, x["total_flops"], best, p.scratch_factor)
                need = metrics.compute_to_reach(s_flops, best_so_far(s_loss), best)
                read = scratch_flops_read(s_flops, s_loss, x["total_flops"], best, p.scratch_factor)
                # the grown model continues its small model's data stream: its lineage sees both
                small_tokens, grown_tokens = x["small_steps"] * tps, x["grown_steps"] * tps
                run_epochs = {"small_epochs": epochs(small_tokens, n_train),
                              "grown_epochs": epochs(small_tokens + grown_tokens, n_train),
                              "scratch_epochs": epochs(read / fpt_target, n_train)}
                most = max(run_epochs["grown_epochs"], run_epochs["scratch_epochs"])
                curve = (compute_curve(res["small_curve"], 0, 0.0, tps * s["fpt"])
                         + compute_curve(res["grown_curve"], x["small_steps"], x["small_flops"], tps * fpt_target))
                rows.append({
                    "factor": g, "param_ratio": n_target / s["params"], "budget": r, "seed": seed,
                    "growth_seed": p.growth_seed, "strategy": x["strategy"], "parameterization": p.parameterization,
                    "mup_base_width": p.base_width if p.parameterization == "mup" else None,
                    "small_d_model": s["cfg"].d_model, "small_n_head": s["cfg"].n_head,
                    "small_d_ff": s["cfg"].d_ff, "params_small": s["params"], "params_target": n_target,
                    "small_steps": x["small_steps"], "grown_steps": x["grown_steps"],
                    "small_tokens": x["small_steps"] * tps, "grown_tokens": x["grown_steps"] * tps,
                    "small_flops": x["small_flops"], "total_flops": x["total_flops"],
                    "loss_small": res["small_curve"][-1][1], "loss_after_growth": res["grown_curve"][0][1],
                    "final_loss": final, "best_loss": best, "scratch_flops_to_match": need, "speedup": value,
                    "speedup_exact": exact, "speedup_text": speedup_text(value, exact), **run_epochs,
                    "epochs": most, "repeats": most > p.max_epochs,
                    "seconds": res["seconds"], "depth_ratio": x["k"], "small_n_layer": s["cfg"].n_layer,
                    "key": x["key"], "curve": curve})
            return rows, curves

        def report(rows, curves, done, steps):
            wall = time.perf_counter() - t0
            scratch_seconds = sum(store.get(scratch[sd]["segs"][b]["key"], count=False)["seconds"]
                                  for sd in p.seeds for b in done)
            meta = {"command": command or default_command("growth-factor", p.name, out), "wall_seconds": wall,
                    "computed": store.computed, "cached": store.hits, "device": str(dev), "workers": workers,
                    "threads": n_threads, "data": str(default_data(data) or "downloaded"),
                    "corpus_key": corpus.key, "train_tokens": len(corpus.train), "valid_tokens": len(corpus.valid),
                    "heldout_tokens": sum(x.numel() for x, _ in windows),
                    "vocab_size": corpus.vocab_size, "params_target": n_target,
                    "flops_per_token_target": fpt_target, "tokens_per_step": tps, "scratch_steps": steps,
                    "scratch_seconds": scratch_seconds,
                    "compute_seconds": sum(r["seconds"] for r in rows) + scratch_seconds
                    + sum(small_seconds.values()),
                    "budgets_done": list(done), "budgets_missing": [b for b in budgets if b not in done],
                    "smalls": {f"{s['g']:g}": {"d_model": s["cfg"].d_model, "n_head": s["cfg"].n_head,
                                               "d_ff": s["cfg"].d_ff, "params": s["params"],
                                               "flops_per_token": s["fpt"]} for (_, seed), s in smalls.items()
                               if seed == p.seeds[0] and s["k"] == 1}}
            pd = replace(p, budgets=tuple(b for b in p.budgets if b in done))
            files = write_report(out, pd, rows, curves, meta)
            atomic_write_json(out / "study.json", {"study": "growth-factor", "preset": preset_dict(p), **meta})
            return files

        # --- 2. per budget, smallest first: the scratch segments and the grown runs, longest
        # --- first; the report is rewritten after each budget, so it holds every finished one
        results, scratch_res, files = {}, {}, []
        for i, r in enumerate(budgets):
            units, what, unit_work, cfgs = [], {}, {}, {}
            for seed in p.seeds:
                seg = scratch[seed]["segs"][r]
                if (seed, r) in scratch_todo:
                    k = ("scratch", seed, r)
                    what[k] = f"scratch seed {seed} to step {seg['steps']} (budgets <= {r:g})"
                    unit_work[k], cfgs[k] = seg_work[r], (seg["key"], seg["cfg"])
                    units.append((k, (p, seed, seg["steps"], scratch[seed]["root"], *args, label(what[k]))))
            for x in (x for x in todo if x["r"] == r):
                k = ("grown", x["key"])
                s = smalls[(x["sid"], x["seed"])]
                have = existing_checkpoints(s["root"])
                what[k] = (f"grown g={x['g']:g}{f' k={x[chr(107)]}' if x['k'] > 1 else ''} r={x['r']:g} seed "
                           f"{x['seed']} {x['strategy']} ({x['grown_steps']} steps)")
                unit_work[k], cfgs[k] = x["work"], (x["key"], x["cfg"])
                units.append((k, (p, x["g"], x["r"], x["seed"], x["strategy"],
                                  str(s["root"] / f"step-{x['small_steps']}"),
                                  have[x["small_steps"]], x["small_steps"], x["grown_steps"],
                                  out / "cache" / "grown" / x["key"], *args, label(what[k]))))
            units.sort(key=lambda u: -unit_work[u[0]])

            def unit_done(k, res):
                key, cfg = cfgs[k]
                store.put(key, cfg, res)
                counter["steps"] += res["train_steps"]
                loss = res["curve" if k[0] == "scratch" else "grown_curve"][-1][1]
                prog.finish(what[k], res["seconds"], f"final {loss:.4f}", work=unit_work[k])

            run_units([(k, (k[0], *a)) for k, a in units], _unit, workers=workers, threads=n_threads or 1,
                      on_start=lambda k: prog.start(what[k]), on_result=unit_done)
            computed = {cfgs[k][0] for k, _ in units}
            for seed in p.seeds:
                key = scratch[seed]["segs"][r]["key"]
                scratch_res[seed] = store.get(key, count=key not in computed)
                if key not in computed:
                    prog.finish(f"scratch seed {seed} to step {seg_steps[r]}", None,
                                f"final {scratch_res[seed]['curve'][-1][1]:.4f}")
            for x in (x for x in grown if x["r"] == r):
                res = store.get(x["key"], count=x["key"] not in computed)
                if x["key"] not in computed:
                    prog.finish(f"grown g={x['g']:g}{f' k={x[chr(107)]}' if x['k'] > 1 else ''} r={x['r']:g} "
                                f"seed {x['seed']} {x['strategy']}", None,
                                f"final {res['grown_curve'][-1][1]:.4f}")
                results[x["key"]] = res
            done = budgets[:i + 1]
            rows, curves = self_rows(done, scratch_res)
            files = report(rows, curves, done, seg_steps[r])
            if i + 1 < len(budgets):
                prog.log(f"budgets {', '.join(f'{b:g}' for b in done)} done: report written "
                         f"(budgets {', '.join(f'{b:g}' for b in budgets[i + 1:])} to come)")

    prog.log(f"done in {fmt_seconds(time.perf_counter() - t0)}: {store.computed} computed, "
             f"{store.hits} cached; {out / 'report.md'}")
    return StudyResult(out=out, rows=rows, computed=store.computed, cached=store.hits,
                       train_steps=counter["steps"], seconds=time.perf_counter() - t0, files=files)


def _unit(kind, *args):
    """A phase-2 unit for pool.run_units: a scratch or a grown run."""
    return (train_scratch if kind == "scratch" else train_grown)(*args)
