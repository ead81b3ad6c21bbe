"""Benchmark widen_ end to end: time per strategy and step-0 preservation.

For a GPT with AdamW state (param + exp_avg + exp_avg_sq), each strategy is timed
over repeats (median and interquartile spread) against a baseline run in the same
process: copying the same bytes (reading the old state once, writing the new state
once) with plain tensor copies, the floor a fused growth aims for. Preservation is
measured on a fixed batch. Rows are appended to bench/results/growth.csv with device,
versions and git commit.

    python bench/bench_growth.py --d-model 256 --n-layer 4 --repeats 5
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchenv import device_name, git_commit, sync

import growkern
from growkern import GPT, GPTConfig

STRATEGIES = ["exact_copy", "perturb", "asym_reset", "structured", "szp", "scratch"]
RESULTS = Path(__file__).resolve().parent / "results" / "growth.csv"






def trained_state(cfg: GPTConfig, device, steps=3, seed=0):
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.block_size + 1), generator=g).to(device)
    for _ in range(steps):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, x




def time_it(fn, repeats, device):
    times = []
    for _ in range(repeats):
        setup = fn()
        sync(device)
        t0 = time.perf_counter()
        setup()
        sync(device)
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[0], q[2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--strategies", nargs="*", default=STRATEGIES)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer,
                    n_head=args.n_head, d_model=args.d_model)
    base_model, base_opt, x = trained_state(cfg, device)
    plan0 = growkern.plan_growth(cfg, factor=args.factor)
    old_bytes = 3 * sum(p.numel() * p.element_size() for p in base_model.parameters())
    new_elems = sum(torch.Size(tp.new_shape).numel() for tp in plan0.tensors.values())
    new_bytes = 3 * new_elems * 4
    moved = old_bytes + new_bytes

    def baseline():
        olds = [t for p in base_model.parameters() for t in (p.data, *base_opt.state[p].values())
                if t.dim() > 0]
        def run():
            # the floor: read every old tensor once, write a new tensor of the new size
            for tp, p in zip(plan0.tensors.values(), base_model.parameters()):
                for t in (p.data, base_opt.state[p]["exp_avg"], base_opt.state[p]["exp_avg_sq"]):
                    out = torch.empty(tp.new_shape, dtype=t.dtype, device=device)
                    out.view(-1)[: t.numel()].copy_(t.view(-1))
                    out.view(-1)[t.numel():].zero_()
        assert olds
        return run

    base_t, base_lo, base_hi = time_it(baseline, args.repeats, device)
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for strategy in args.strategies:
        def setup():
            model, opt = copy.deepcopy(base_model), None
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            opt.load_state_dict(copy.deepcopy(base_opt.state_dict()))
            return lambda: growkern.widen_(model, opt, factor=args.factor, strategy=strategy, seed=0)
        med, lo, hi = time_it(setup, args.repeats, device)
        model = copy.deepcopy(base_model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt.load_state_dict(copy.deepcopy(base_opt.state_dict()))
        rep = growkern.widen_(model, opt, factor=args.factor, strategy=strategy, seed=0,
                              probe_batch=(x[:, :-1], x[:, 1:]))
        p = rep.preservation
        row = {
            "date": stamp, "commit": git_commit(), "device": device_name(device),
            "torch": torch.__version__, "python": platform.python_version(),
            "backend": rep.backend, "strategy": strategy, "factor": args.factor,
            "d_model": args.d_model, "n_layer": args.n_layer, "params_before": rep.params_before,
            "params_after": rep.params_after, "bytes_moved": moved,
            "median_s": f"{med:.6f}", "q25_s": f"{lo:.6f}", "q75_s": f"{hi:.6f}",
            "baseline_copy_s": f"{base_t:.6f}", "ratio_vs_copy": f"{med / base_t:.2f}",
            "GBps": f"{moved / med / 1e9:.3f}", "baseline_GBps": f"{moved / base_t / 1e9:.3f}",
            "max_abs_dlogits": f"{p['max_abs_dlogits']:.3e}", "kl_small_wide": f"{p['kl_small_wide']:.3e}",
            "dloss": f"{p['dloss']:+.4f}", "exact": rep.exact,
        }
        rows.append(row)
        print(f"{strategy:11s} {rep.backend:9s} {med * 1e3:8.1f} ms [{lo * 1e3:.1f}, {hi * 1e3:.1f}]  "
              f"x{med / base_t:5.1f} of copy ({moved / med / 1e9:.2f} GB/s)  "
              f"max|dlogits| {p['max_abs_dlogits']:.2e}  KL {p['kl_small_wide']:.2e}  dloss {p['dloss']:+.4f}")
    print(f"baseline copy {base_t * 1e3:.1f} ms ({moved / base_t / 1e9:.2f} GB/s), {moved / 2**20:.0f} MiB moved")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists()
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new_file:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
