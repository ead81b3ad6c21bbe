"""Benchmark widen_ end to end: time per strategy and step-0 preservation.

A model with AdamW state (param + exp_avg + exp_avg_sq, from real optimizer steps) is
grown by --factor with each strategy, timed over repeats (median and interquartile
spread; each repeat grows a fresh copy, made untimed) against a baseline run in the same
process: copying the same bytes (reading the old state once, writing the new state once)
with plain tensor copies into memory the allocator hands back warm (baseline_copy_s), and
the same into new memory kept until every tensor is written, as a growth keeps it
(baseline_first_touch_s: allocating and first-touching the new state plus reading the old
one), the floor a fused growth aims for. The bytes are counted from
the plan before anything runs. Per strategy, one untimed growth before the timed ones
measures step-0 preservation on a fixed batch (and warms up), and one after them runs
under cProfile for the time spent in the backend's kernels and in building their inputs
(build_group); the median of the reports' own `seconds` is recorded too. The two
meta-device builds of the model class that widen_ makes to check the new config and sync
derived attributes (adapter.build_reference on the old and the new config) are timed on
their own. Rows are appended to bench/results/growth.csv with device, the instruction set of the
CPU kernels' normals and the CPU's vector flags (cpu_isa), versions and git commit.

Models (--model):
  gpt       growkern.GPT of --d-model, --n-layer, --n-head, --vocab, --block after 3 AdamW
            steps; every strategy
  hf-llama  transformers.LlamaForCausalLM of 100,092,672 parameters (HF_LLAMA: hidden 768,
            intermediate 2048, 12 layers, 12 query and 4 key-value heads, vocab 32000, tied
            embeddings) after one AdamW step; exact_copy and perturb (about 2 minutes on
            2 CPU cores with 5 repeats)

    python bench/bench_growth.py --d-model 256 --n-layer 4 --repeats 5
    python bench/bench_growth.py --model hf-llama
    python bench/bench_growth.py --depth 8        # deepen_ 4 -> 8 blocks, every depth strategy

With --depth N, deepen_ is timed instead, per depth strategy, against cloning the added
blocks' parameters and moments (reading and writing those bytes once); rows carry
strategy "depth:<name>" and n_layer_after.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import csv
import datetime
import gc
import os
import platform
import pstats
import statistics
import time
from pathlib import Path

import torch

from benchenv import cpu_isa, device_name, git_commit, release_free_memory, sync

import growkern
from growkern import GPT, GPTConfig
from growkern.growth.adapter import adapter_for
from growkern.kernels.backends import resolve_backend
from growkern.growth.apply import build_group
from growkern.growth.deepen import find_layers
from growkern.growth.depth import DEPTH_STRATEGIES, plan_depth

STRATEGIES = ["exact_copy", "perturb", "asym_reset", "structured", "szp", "scratch"]
HF_STRATEGIES = ["exact_copy", "perturb"]
HF_LLAMA = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                tie_word_embeddings=True)
RESULTS = Path(__file__).resolve().parent / "results" / "growth.csv"


def adamw_steps(model, loss_fn, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def gpt_state(args, device, seed=0):
    """(model, optimizer, token batch, transformers version) for --model gpt."""
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer,
                    n_head=args.n_head, d_model=args.d_model)
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.block_size + 1), generator=g).to(device)
    opt = adamw_steps(model, lambda: model(x[:, :-1], x[:, 1:])[1], steps=3)
    return model, opt, x, ""


def hf_llama_state(args, device, seed=0):
    """(model, optimizer, token batch, transformers version) for --model hf-llama."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_LLAMA)).to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, HF_LLAMA["vocab_size"], (2, 65), generator=g).to(device)
    opt = adamw_steps(model, lambda: model(input_ids=x, labels=x).loss, steps=1)
    return model, opt, x, transformers.__version__


MODELS = {"gpt": (gpt_state, STRATEGIES), "hf-llama": (hf_llama_state, HF_STRATEGIES)}


def fresh_copy(model, opt):
    model = copy.deepcopy(model)
    new_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    new_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    return model, new_opt


def state_bytes(model, opt, plan):
    """Bytes of the old and of the new parameters + optimizer moments."""
    old = new = 0
    for name, p in model.named_parameters():
        size = sum(t.element_size() for t in (p, *opt.state[p].values()) if t.dim() > 0)
        old += p.numel() * size
        new += torch.Size(plan.tensors[name].new_shape).numel() * size
    return old, new


def copy_baseline(model, opt, plan, device, keep=False):
    """The floor: read every old tensor once, write a new tensor of the new size (the old
    tensor's bytes, then zeros). Each new tensor is dropped at once, so the allocator
    hands the next one warm memory; with keep=True all are held until every one is
    written, as a growth holds its new state: allocating and first-touching it."""
    def run():
        outs = []
        for name, p in model.named_parameters():
            new_shape = plan.tensors[name].new_shape
            for t in (p.data, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]):
                out = torch.empty(new_shape, dtype=t.dtype, device=device)
                out.view(-1)[: t.numel()].copy_(t.view(-1))
                out.view(-1)[t.numel():].zero_()
                if keep:
                    outs.append(out)
        return len(outs)
    return run


def time_it(make_run, repeats, device):
    """Median, q25 and q75 seconds of run() over repeats, each run made (untimed) by
    make_run(); and what the runs returned."""
    times, results = [], []
    for _ in range(repeats):
        run = make_run()
        gc.collect()
        release_free_memory()
        sync(device)
        t0 = time.perf_counter()
        results.append(run())
        sync(device)
        times.append(time.perf_counter() - t0)
        del run
        gc.collect()  # the grown copy goes before the next one is made
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[0], q[2], results


def profiled(run, parts):
    """run() under cProfile: what it returned, and the cumulative seconds spent in each
    function of `parts` (name -> function). Python-heavy parts read high under the profiler."""
    prof = cProfile.Profile()
    out = prof.runcall(run)
    stats = pstats.Stats(prof).stats
    seconds = {}
    for name, fn in parts.items():
        code = fn.__code__
        seconds[name] = stats.get((code.co_filename, code.co_firstlineno, code.co_name), (0, 0, 0, 0.0))[3]
    return out, seconds


def append_rows(path: Path, rows):
    """Append rows to the CSV at `path`. Columns it lacks go at the end: the header line is
    rewritten and earlier rows, shorter, read as empty there."""
    fields = list(rows[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with open(path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
        header = next(csv.reader(lines[:1]))
        if fields[:len(header)] != header:
            raise SystemExit(f"{path} has columns {header}, not a prefix of {fields}; give another --out")
        if fields != header:
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(fields)
                f.writelines(lines[1:])
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if f.tell() == 0:
            w.writeheader()
        w.writerows(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="gpt")
    ap.add_argument("--d-model", type=int, default=256, help="gpt only")
    ap.add_argument("--n-layer", type=int, default=4, help="gpt only")
    ap.add_argument("--n-head", type=int, default=4, help="gpt only")
    ap.add_argument("--vocab", type=int, default=4096, help="gpt only")
    ap.add_argument("--block", type=int, default=128, help="gpt only")
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--strategies", nargs="*", default=None,
                    help=f"default all (gpt), {' '.join(HF_STRATEGIES)} (hf-llama)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--depth", type=int, metavar="N",
                    help="benchmark deepen_ to N blocks instead (strategies default to every depth strategy)")
    args = ap.parse_args(argv)
    make_state, default_strategies = MODELS[args.model]
    strategies = args.strategies or (list(DEPTH_STRATEGIES) if args.depth else default_strategies)

    device = torch.device(args.device)
    base_model, base_opt, x, transformers_version = make_state(args, device)
    probe = (x[:, :-1], x[:, 1:])
    if args.depth:
        return bench_depth(args, strategies, device, base_model, base_opt, probe, transformers_version)
    plan0 = growkern.plan_growth(base_model, factor=args.factor)
    old_bytes, new_bytes = state_bytes(base_model, base_opt, plan0)
    moved = old_bytes + new_bytes
    print(f"# {args.model}: {sum(p.numel() for p in base_model.parameters()):,} parameters, "
          f"{old_bytes / 1e9:.2f} GB of parameters + AdamW moments -> {new_bytes / 1e9:.2f} GB, "
          f"{moved / 1e9:.2f} GB moved per growth; {args.repeats} repeats")

    adapter = adapter_for(base_model)
    new_config = adapter.new_config(base_model.config, plan0.new)

    def build_references():
        adapter.build_reference(base_model.config, like=base_model)
        adapter.build_reference(new_config, like=base_model)
    build_ref_t = time_it(lambda: build_references, args.repeats, device)[0]

    baseline = copy_baseline(base_model, base_opt, plan0, device)
    baseline()  # untimed: puts the allocator in the state the timed passes see
    base_t = time_it(lambda: baseline, args.repeats, device)[0]
    touch = copy_baseline(base_model, base_opt, plan0, device, keep=True)
    touch_t = time_it(lambda: touch, args.repeats, device)[0]
    parts = {"kernels_s": resolve_backend("auto", device, batch=True)[0], "groups_s": build_group}

    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for strategy in strategies:
        def grow(probe_batch=None):
            model, opt = fresh_copy(base_model, base_opt)
            return lambda: growkern.widen_(model, opt, factor=args.factor, strategy=strategy, seed=0,
                                           probe_batch=probe_batch)
        rep = grow(probe)()  # untimed: preservation, and a warm-up
        gc.collect()
        med, lo, hi, reports = time_it(grow, args.repeats, device)
        report_t = statistics.median(r.seconds for r in reports)
        _, prof = profiled(grow(), parts)
        gc.collect()
        p = rep.preservation
        row = {
            "date": stamp, "commit": git_commit(), "device": device_name(device),
            "torch": torch.__version__, "python": platform.python_version(),
            "backend": rep.backend, "strategy": strategy, "factor": args.factor,
            "d_model": plan0.old.d_model, "n_layer": plan0.old.n_layer, "params_before": rep.params_before,
            "params_after": rep.params_after, "bytes_moved": moved,
            "median_s": f"{med:.6f}", "q25_s": f"{lo:.6f}", "q75_s": f"{hi:.6f}",
            "baseline_copy_s": f"{base_t:.6f}", "ratio_vs_copy": f"{med / base_t:.2f}",
            "GBps": f"{moved / med / 1e9:.3f}", "baseline_GBps": f"{moved / base_t / 1e9:.3f}",
            "max_abs_dlogits": f"{p['max_abs_dlogits']:.3e}", "kl_small_wide": f"{p['kl_small_wide']:.3e}",
            "dloss": f"{p['dloss']:+.4f}", "exact": rep.exact,
            "model": args.model, "transformers": transformers_version, "repeats": args.repeats,
            "report_s": f"{report_t:.6f}", "kernels_s": f"{prof['kernels_s']:.6f}",
            "groups_s": f"{prof['groups_s']:.6f}", "build_reference_s": f"{build_ref_t:.6f}",
            "n_layer_after": plan0.new.n_layer,  # the --depth rows' column; width keeps the depth
            "baseline_first_touch_s": f"{touch_t:.6f}", "ratio_vs_first_touch": f"{med / touch_t:.2f}",
            "cpu_isa": cpu_isa(device),
        }
        rows.append(row)
        print(f"{strategy:11s} {rep.backend:9s} {med * 1e3:8.1f} ms [{lo * 1e3:.1f}, {hi * 1e3:.1f}]  "
              f"x{med / base_t:5.1f} of copy, x{med / touch_t:4.2f} of first touch ({moved / med / 1e9:.2f} GB/s)  "
              f"max|dlogits| {p['max_abs_dlogits']:.2e}  KL {p['kl_small_wide']:.2e}  dloss {p['dloss']:+.4f}")
        print(f"{'':11s} report.seconds {report_t * 1e3:.1f} ms; profiled: kernels {prof['kernels_s'] * 1e3:.1f} ms, "
              f"build_group {prof['groups_s'] * 1e3:.1f} ms")
    print(f"baseline copy {base_t * 1e3:.1f} ms ({moved / base_t / 1e9:.2f} GB/s), first touch "
          f"{touch_t * 1e3:.1f} ms, {moved / 2**20:.0f} MiB moved; build_reference old + new config "
          f"{build_ref_t * 1e3:.1f} ms; normals: {cpu_isa(device) or device.type}")
    append_rows(args.out, rows)
    print(f"appended {len(rows)} rows to {os.path.relpath(args.out)}")


def depth_bytes(model, opt, plan):
    """Bytes of the blocks deepen_ adds (parameters + AdamW moments, as the copies hold
    them): the copy baseline reads them once and writes them once."""
    layers = find_layers(model, adapter_for(model))[1]
    return sum(p.numel() * sum(t.element_size() for t in (p, *opt.state[p].values()) if t.dim() > 0)
               for j in plan.added for p in layers[plan.sources[j]].parameters())


def depth_copy_baseline(model, opt, plan):
    """The floor: clone each added block's source parameters and moments once."""
    layers = find_layers(model, adapter_for(model))[1]
    sources = [layers[plan.sources[j]] for j in plan.added]

    def run():
        return [[t.clone() for p in block.parameters() for t in (p.data, *opt.state[p].values()) if t.dim() > 0]
                for block in sources]
    return run


def bench_depth(args, strategies, device, base_model, base_opt, probe, transformers_version):
    """deepen_ to --depth blocks per strategy against cloning the added blocks' state."""
    n_old = len(find_layers(base_model, adapter_for(base_model))[1])
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for strategy in strategies:
        plan = plan_depth(n_old, n_layer=args.depth, strategy=strategy)
        added = depth_bytes(base_model, base_opt, plan)
        moved = 2 * added

        def grow(probe_batch=None):
            model, opt = fresh_copy(base_model, base_opt)
            return lambda: growkern.deepen_(model, opt, n_layer=args.depth, strategy=strategy,
                                            probe_batch=probe_batch)
        rep = grow(probe)()  # untimed: preservation, and a warm-up of the allocator for both timings
        gc.collect()
        baseline = depth_copy_baseline(base_model, base_opt, plan)
        baseline()
        base_t = time_it(lambda: baseline, args.repeats, device)[0]
        med, lo, hi, reports = time_it(grow, args.repeats, device)
        report_t = statistics.median(r.seconds for r in reports)
        p = rep.preservation
        rows.append({
            "date": stamp, "commit": git_commit(), "device": device_name(device),
            "torch": torch.__version__, "python": platform.python_version(),
            "backend": rep.backend, "strategy": f"depth:{strategy}", "factor": f"{args.depth / n_old:g}",
            "d_model": getattr(base_model.config, "d_model", getattr(base_model.config, "hidden_size", "")),
            "n_layer": n_old, "params_before": rep.params_before, "params_after": rep.params_after,
            "bytes_moved": moved, "median_s": f"{med:.6f}", "q25_s": f"{lo:.6f}", "q75_s": f"{hi:.6f}",
            "baseline_copy_s": f"{base_t:.6f}", "ratio_vs_copy": f"{med / base_t:.2f}",
            "GBps": f"{moved / med / 1e9:.3f}", "baseline_GBps": f"{moved / base_t / 1e9:.3f}",
            "max_abs_dlogits": f"{p['max_abs_dlogits']:.3e}", "kl_small_wide": f"{p['kl_small_wide']:.3e}",
            "dloss": f"{p['dloss']:+.4f}", "exact": rep.exact,
            "model": args.model, "transformers": transformers_version, "repeats": args.repeats,
            "report_s": f"{report_t:.6f}", "kernels_s": "", "groups_s": "", "build_reference_s": "",
            "n_layer_after": args.depth, "baseline_first_touch_s": "", "ratio_vs_first_touch": "",
            "cpu_isa": cpu_isa(device),
        })
        print(f"depth {strategy:10s} {med * 1e3:8.1f} ms [{lo * 1e3:.1f}, {hi * 1e3:.1f}]  x{med / base_t:5.1f} of "
              f"cloning the {added / 2**20:.0f} MiB added ({base_t * 1e3:.1f} ms)  max|dlogits| "
              f"{p['max_abs_dlogits']:.2e}  dloss {p['dloss']:+.4f}")
    append_rows(args.out, rows)
    print(f"appended {len(rows)} rows to {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
