"""Benchmark the training loop: tokens/s (and MFU on GPU) of growkern.train against a
plain eager PyTorch loop on the same model and batch.

The plain loop is the floor a training loop should not fall below: forward, backward,
unfused per-tensor AdamW, zero_grad, in fp32, no compile, no clipping, no scheduler,
no logging. growkern.train adds what a real run needs (grad clipping, LR schedule,
metrics every step) and uses what makes it fast (fused AdamW; bf16 autocast on CUDA;
torch.compile with --compile). Both run the same model from the same init on one
fixed batch; repeats alternate between the two loops so machine drift hits both.
Rows are appended to bench/results/train.csv with device, versions and git commit.

    python bench/bench_train.py --sizes 64x2,128x2,128x4,256x4 --steps 10 --repeats 5
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import itertools
import platform
import statistics
import time
from pathlib import Path

import torch

from benchenv import device_name, git_commit, sync

from growkern import GPTConfig
from growkern.train.distributed import resolve_device
from growkern.train.loop import (TrainConfig, autocast_dtype, build_optimizer, build_scheduler, flops_per_token,
                                 init_model, peak_flops, train)

RESULTS = Path(__file__).resolve().parent / "results" / "train.csv"
HERE = Path(__file__).resolve().parent








def plain_loop(model, batch, steps, lr):
    """The reference: nothing but forward, backward and an unfused AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            foreach=False, fused=False)
    x, y = batch

    def run(n):
        for _ in range(n):
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # waits for the device
    return run


def our_loop(model, batch, steps, cfg):
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    batches = itertools.repeat(batch)
    done = [0]

    def run(n):
        hist = train(model, opt, sched, batches, cfg, start_step=done[0], end_step=done[0] + n)
        done[0] += n
        return hist[-1]["loss"]
    return run


def quartiles(xs):
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def bench_size(d_model, n_layer, args, device):
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=n_layer,
                    n_head=max(1, d_model // args.head_dim), d_model=d_model)
    total = args.warmup + args.steps * args.repeats
    tcfg = TrainConfig(steps=total, batch_size=args.batch, block_size=args.block, lr=1e-3, min_lr=1e-4,
                       warmup=10, eval_every=0, regime=args.regime, compile=args.compile,
                       device=str(device), progress=False)
    g = torch.Generator().manual_seed(0)
    batch = tuple(t.to(device) for t in torch.randint(0, args.vocab, (2, args.batch, args.block), generator=g))
    base = init_model(cfg, 0, device)
    runs = {"plain": plain_loop(copy.deepcopy(base), batch, args.steps, 1e-3),
            "growkern": our_loop(copy.deepcopy(base), batch, args.steps, tcfg)}
    for run in runs.values():
        run(args.warmup)  # allocator, autotuning, compile
    tokens = args.steps * args.batch * args.block
    rates = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            sync(device)
            t0 = time.perf_counter()
            run(args.steps)
            sync(device)
            rates[name].append(tokens / (time.perf_counter() - t0))
    fpt = flops_per_token(base, args.block)
    peak = args.peak_flops or peak_flops(device, torch.bfloat16)
    rows = []
    for name in runs:
        q1, med, q3 = quartiles(rates[name])
        rows.append({"loop": name, "d_model": d_model, "n_layer": n_layer, "params": base.num_params(),
                     "batch": args.batch, "block": args.block, "steps": args.steps, "repeats": args.repeats,
                     "dtype": str(autocast_dtype(tcfg, device) or "float32") if name == "growkern" else "float32",
                     "tok_s_median": round(med, 1), "tok_s_q25": round(q1, 1), "tok_s_q75": round(q3, 1),
                     "mfu": f"{fpt * med / peak:.4f}" if peak else ""})
    for r in rows:
        r["speedup_vs_plain"] = f"{r['tok_s_median'] / rows[0]['tok_s_median']:.3f}"
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64x2,128x2,128x4,256x4", help="d_model x n_layer, comma separated")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--regime", default="stochastic", choices=["stochastic", "deterministic"],
                   help="deterministic kernels cost speed on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile our loop's model")
    p.add_argument("--device", default="auto")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: table by GPU name)")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()
    device = resolve_device(args.device)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "device": device_name(device), "torch": torch.__version__,
            "python": platform.python_version()}
    print(f"{meta['device']}, torch {meta['torch']}, commit {meta['commit']}")
    print(f"{'size':>8} {'params':>10} {'loop':>9} {'tok/s median':>13} {'IQR':>19} {'MFU':>7} {'vs plain':>8}")
    out = []
    for size in args.sizes.split(","):
        d, l = (int(v) for v in size.lower().split("x"))
        rows = bench_size(d, l, args, device)
        for r in rows:
            print(f"{size:>8} {r['params']:>10,} {r['loop']:>9} {r['tok_s_median']:>13,.0f} "
                  f"{r['tok_s_q25']:>9,.0f}-{r['tok_s_q75']:<9,.0f} {r['mfu'] or '-':>7} {r['speedup_vs_plain']:>8}")
        out += [{**meta, **r} for r in rows]
    if not args.no_csv:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        new = not RESULTS.exists()
        with open(RESULTS, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(out[0]))
            if new:
                w.writeheader()
            w.writerows(out)
        print(f"appended {len(out)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
