"""Benchmark widen_ of an FSDP2-sharded model against a single-process widen_.

A growkern.GPT of about 30M parameters (d_model 512, 8 layers, vocab 8192, AdamW state
from one real step) is grown by --factor on N ranks (gloo on the CPU, NCCL on CUDA),
each rank building only its rows of every new tensor (growkern.distributed), and, as the
baseline in the same invocation, by one process holding the whole model. Each repeat
grows a fresh model (built untimed, the same seed everywhere); the time is from a
barrier before widen_ to a barrier after it, on rank 0. Memory: the peak resident set
of each rank during widen_ above its resident set just before (Linux VmHWM, reset with
/proc/self/clear_refs), next to the bytes the new state takes on that rank and the
largest old parameter group it gathers. Rows are appended to bench/results/distributed.csv
with device, versions and the git commit.

    python bench/bench_distributed.py                       # 2 ranks, gloo, CPU
    python bench/bench_distributed.py --device cuda --ranks 2
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench_growth import append_rows
from benchenv import device_name, git_commit

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.csv"


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                got[line.split(":")[0]] = int(line.split()[1]) * 1024
    return got["VmRSS"], got["VmHWM"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _model(args, device):
    from growkern import GPTConfig
    from growkern.train.loop import TrainConfig, build_optimizer, build_scheduler, init_model
    cfg = GPTConfig(vocab_size=args.vocab, block_size=64, n_layer=args.n_layer, n_head=args.d_model // 64,
                    d_model=args.d_model)
    model = init_model(cfg, 0, device)
    tcfg = TrainConfig(steps=10, batch_size=2, block_size=64, lr=1e-3, warmup=1, progress=False)
    opt = build_optimizer(model, tcfg)
    x = torch.randint(0, args.vocab, (2, 64), device=device, generator=torch.Generator(device).manual_seed(0))
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, build_scheduler(opt, tcfg)


def _rank(rank, world, port, args, queue):
    import torch.distributed as dist
    import growkern
    from growkern.train import distributed as D
    from growkern.growth.checks import new_state_bytes
    torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    rows = []
    for _ in range(args.repeats):
        model, opt, sched = _model(args, device)
        old_params = sum(p.numel() for p in model.parameters())
        old_group = max(p.nbytes * 3 for p in model.parameters())  # a parameter and its two moments
        if world > 1:
            model = D.shard_model(model, opt, D.Context(rank, world, rank, "fsdp"))
        plan = growkern.plan_growth(model, factor=args.factor, strategy=args.strategy, seed=0)
        new_bytes = new_state_bytes(model, opt, plan) // world
        dist.barrier()
        _reset_peak()
        rss0, _ = _rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        growkern.widen_(model, opt, sched, plan=plan)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        seconds = time.perf_counter() - t0
        _, hwm = _rss()
        peak = (torch.cuda.max_memory_allocated(device) - before) if device.type == "cuda" else hwm - rss0
        rows.append({"seconds": seconds, "peak_extra": peak, "new_bytes": new_bytes, "old_group": old_group,
                     "params_before": old_params, "params_after": sum(p.numel() for p in model.parameters())})
        del model, opt, sched
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        queue.put(gathered)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args) -> list:
    """Every rank's rows, from `world` spawned processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=args.timeout)
    for p in procs:
        p.join(60)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--factor", type=float, default=2)
    ap.add_argument("--strategy", default="perturb")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (and for the baseline)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    results = {}
    for world in (1, args.ranks):  # the single-process baseline first
        results[world] = run(world, args)
    base = statistics.median(r["seconds"] for r in results[1][0])
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for world, per_rank in results.items():
        for rank, reps in enumerate(per_rank):
            secs = sorted(r["seconds"] for r in reps)
            peaks = sorted(r["peak_extra"] for r in reps)
            first = reps[0]
            rows.append({
                "time": now, "commit": git_commit(), "device": device_name(torch.device(args.device)),
                "torch": torch.__version__, "python": platform.python_version(),
                "ranks": world, "rank": rank, "backend": "nccl" if args.device == "cuda" else "gloo",
                "threads_per_rank": args.threads, "strategy": args.strategy, "factor": args.factor,
                "d_model": args.d_model, "n_layer": args.n_layer, "vocab": args.vocab,
                "params_before": first["params_before"], "params_after": first["params_after"],
                "repeats": len(reps), "median_s": statistics.median(secs), "min_s": secs[0], "max_s": secs[-1],
                "vs_single_process": statistics.median(secs) / base,
                "peak_extra_mib": statistics.median(peaks) / 2**20,
                "new_state_mib_this_rank": first["new_bytes"] / 2**20,
                "largest_old_group_mib": first["old_group"] / 2**20,
            })
    append_rows(args.out, rows)
    for r in rows:
        print(f"ranks {r['ranks']} rank {r['rank']}: widen_ {r['median_s']:.2f} s "
              f"[{r['min_s']:.2f}, {r['max_s']:.2f}] ({r['vs_single_process']:.2f}x single process), "
              f"peak extra {r['peak_extra_mib']:.0f} MiB (new state on this rank {r['new_state_mib_this_rank']:.0f} "
              f"MiB, largest old group {r['largest_old_group_mib']:.0f} MiB)")
    print(f"rows appended to {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
