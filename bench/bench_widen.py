"""Benchmark the widen primitive's backends on a model-sized list of tensors.

Default: GPT-2 small (d_model 768, d_ff 3072, 12 layers, vocab 50257, context
1024, biases, LayerNorm, tied embeddings) grown by factor 2, each parameter with
its AdamW moments (param + exp_avg + exp_avg_sq = one group per parameter), the
parameter with noise (sigma on copied units, antithetic column pairs). Every
available backend and the reference run in the same process over the same groups;
outputs are dropped as they are made, as in widen_.

Bytes counted per group: every member's old tensor read once plus its new
tensor written once (maps, scales and signs are small and not counted). GB/s
is that over the median wall time of a full pass; the fraction is of the
device's memory bandwidth: --bandwidth GB/s, else a known table for GPUs, and
always of a measured copy (dst.copy_(src) of 256 MiB, counting read + write).
Peak memory: CPU peak RSS (VmHWM, reset per backend through
/proc/self/clear_refs) or torch.cuda.max_memory_allocated. Rows are appended
to bench/results/widen.csv.

    python bench/bench_widen.py                       # all backends for the tensors' device
    python bench/bench_widen.py --device cuda --repeats 20
    python bench/bench_widen.py --layers 2 --backends cpu,reference
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from growkern.backends import backends, resolve_backend  # noqa: E402
from growkern.ops import TensorScales, WidenGroup  # noqa: E402

# nominal memory bandwidth, GB/s (1e9 bytes/s), by device-name substring
KNOWN_BANDWIDTH = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                   "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0,
                   "L40S": 864.0, "A10G": 600.0, "RTX 4090": 1008.0}

MODELS = {
    "gpt2-small": dict(d_model=768, d_ff=3072, n_layer=12, vocab=50257, ctx=1024),
    "gpt2-medium": dict(d_model=1024, d_ff=4096, n_layer=24, vocab=50257, ctx=1024),
    "tiny": dict(d_model=64, d_ff=256, n_layer=2, vocab=512, ctx=64),
}


def model_shapes(name: str, layers: int | None):
    """(name, old shape, new shape, (row axis grows?, col axis grows?)) of every parameter."""
    m = MODELS[name]
    d, ff, L = m["d_model"], m["d_ff"], m["n_layer"] if layers is None else layers
    out = [("wte.weight", (m["vocab"], d), ("fixed", "d")), ("wpe.weight", (m["ctx"], d), ("fixed", "d"))]
    for i in range(L):
        b = f"h.{i}"
        out += [(f"{b}.ln_1.weight", (d,), ("d",)), (f"{b}.ln_1.bias", (d,), ("d",))]
        for p in ("q", "k", "v", "o"):
            out += [(f"{b}.attn.{p}.weight", (d, d), ("d", "d")), (f"{b}.attn.{p}.bias", (d,), ("d",))]
        out += [(f"{b}.ln_2.weight", (d,), ("d",)), (f"{b}.ln_2.bias", (d,), ("d",)),
                (f"{b}.mlp.up.weight", (ff, d), ("ff", "d")), (f"{b}.mlp.up.bias", (ff,), ("ff",)),
                (f"{b}.mlp.down.weight", (d, ff), ("d", "ff")), (f"{b}.mlp.down.bias", (d,), ("d",))]
    out += [("ln_f.weight", (d,), ("d",)), ("ln_f.bias", (d,), ("d",))]
    return out


def make_group(name, old_shape, axes, factor, noise: float, n_members: int) -> WidenGroup:
    """A copy-growth group: grown axes read unit j % old, consume-side copies split
    (scale 1/factor), noise on the parameter with antithetic column pairs."""
    def axis(n_old, grows):
        n_new = n_old * factor if grows else n_old
        idx = torch.arange(n_new)
        src = idx % n_old
        sign = torch.where(idx < n_old, 1.0, -1.0).double() if grows else torch.ones(n_new).double()
        return n_new, src, sign, src.clone()

    rows = axis(old_shape[0], axes[0] != "fixed")
    cols = axis(old_shape[1], axes[1] != "fixed") if len(old_shape) == 2 else None
    grp = WidenGroup(rows[1], None if cols is None else cols[1], rows[2],
                     None if cols is None else cols[2], None if cols is None else cols[3], seed=1234)
    row_scale = torch.ones(rows[0], dtype=torch.float64)
    col_scale = None if cols is None else torch.full((cols[0],), 1.0 / factor, dtype=torch.float64)
    stream = zlib.crc32(name.encode())
    grp.members.append(TensorScales(row_scale, col_scale, 0.0, noise, 0.0, stream))
    for k in range(1, n_members):
        p = 2 if k == 2 else 1  # exp_avg_sq takes squared scales
        grp.members.append(TensorScales(row_scale ** p, None if col_scale is None else col_scale ** p))
    return grp


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def copy_bandwidth(device) -> float:
    """GB/s of dst.copy_(src) for 256 MiB, counting read + write."""
    n = 64 * 2**20
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / min(times) / 1e9


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() or "none"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty and commit != "none" else "")
    except Exception:
        return "unknown"


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=None, help="only the first N blocks (default: all)")
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--members", type=int, default=3, help="1 = param, 2 = + exp_avg, 3 = + exp_avg_sq")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--noise", type=float, default=1e-3, help="sigma on the parameter (0: no noise)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default=None, help="comma list (default: every available one + reference)")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes (default 10 cuda, 3 cpu)")
    ap.add_argument("--reference-repeats", type=int, default=1, help="timed passes of the reference")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes (the reference: none)")
    ap.add_argument("--bandwidth", type=float, default=None, help="device memory bandwidth, GB/s")
    ap.add_argument("--csv", default=str(ROOT / "bench" / "results" / "widen.csv"))
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    avail = backends()
    if args.backends:
        names = args.backends.split(",")
    else:
        cands = ("cuda", "triton") if device.type == "cuda" else ("cpu", "triton")
        names = [b for b in cands if avail[b] == "available"] + ["reference"]
        if device.type == "cpu" and "triton" in names:
            names.remove("triton")  # the interpreter is a correctness tool, not a CPU backend
    for b, why in avail.items():
        if why != "available":
            print(f"# backend {b}: {why}")

    shapes = model_shapes(args.model, args.layers)
    gen = torch.Generator().manual_seed(0)
    work = []
    n_bytes = 0
    esize = torch.tensor([], dtype=dtype).element_size()
    for name, old_shape, axes in shapes:
        grp = make_group(name, old_shape, axes, args.factor, args.noise, args.members)
        srcs = [torch.randn(old_shape, generator=gen).to(device=device, dtype=dtype) for _ in range(args.members)]
        new_numel = grp.row_src.numel() * (1 if grp.col_src is None else grp.col_src.numel())
        n_bytes += args.members * esize * (srcs[0].numel() + new_numel)
        work.append((grp, srcs))
    n_new = sum(g.row_src.numel() * (1 if g.col_src is None else g.col_src.numel()) for g, _ in work)
    bw_nominal = args.bandwidth
    if bw_nominal is None and device.type == "cuda":
        dn = torch.cuda.get_device_name(device)
        bw_nominal = next((v for k, v in KNOWN_BANDWIDTH.items() if k in dn), None)
    bw_copy = copy_bandwidth(device)
    dev_name = device_name(device)
    print(f"# {args.model} x{args.factor}, {len(work)} groups x {args.members} members, {args.dtype}, "
          f"{n_new / 1e6:.1f}M new entries per member, {n_bytes / 1e9:.3f} GB moved per pass")
    print(f"# device {dev_name}; copy bandwidth {bw_copy:.1f} GB/s"
          + (f"; nominal {bw_nominal:.0f} GB/s" if bw_nominal else ""))

    # the floor of any out-of-place kernel: allocate the new tensors and write them once
    alloc_times = []
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        for grp, srcs in work:
            shape = (grp.row_src.numel(),) if grp.col_src is None else (grp.row_src.numel(), grp.col_src.numel())
            outs = [torch.empty(shape, dtype=dtype, device=device).fill_(1.0) for _ in srcs]
            del outs
        sync(device)
        alloc_times.append(time.perf_counter() - t)
    print(f"# allocating + filling the new tensors alone: {min(alloc_times):.4f} s")

    rows = []
    for b in names:
        fn, resolved = resolve_backend(b, device)
        reps = args.reference_repeats if b == "reference" else repeats
        reset_peak(device)
        times = []
        warmup = 0 if b == "reference" else args.warmup
        for it in range(warmup + reps):
            sync(device)
            t = time.perf_counter()
            for grp, srcs in work:
                outs = fn(srcs, grp)
                del outs
            sync(device)
            if it >= warmup:
                times.append(time.perf_counter() - t)
        med = statistics.median(times)
        rows.append(dict(backend=resolved, median_s=med, min_s=min(times), max_s=max(times), repeats=reps,
                         gbps=n_bytes / med / 1e9, peak_mb=peak_mb(device)))
    ref = next((r["median_s"] for r in rows if r["backend"] == "reference"), None)
    print(f"{'backend':>10} {'median s':>10} {'min..max s':>17} {'GB/s':>8} {'%copy':>6} {'%nominal':>8} "
          f"{'peak MiB':>9} {'x ref':>7}")
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()
    out_rows = []
    for r in rows:
        frac_copy = r["gbps"] / bw_copy
        frac_nom = r["gbps"] / bw_nominal if bw_nominal else None
        speedup = ref / r["median_s"] if ref else None
        print(f"{r['backend']:>10} {r['median_s']:10.4f} {r['min_s']:8.4f}..{r['max_s']:<8.4f} {r['gbps']:8.2f} "
              f"{100 * frac_copy:5.1f}% " + (f"{100 * frac_nom:7.1f}%" if frac_nom else f"{'-':>8}")
              + f" {r['peak_mb']:9.0f} " + (f"{speedup:7.1f}" if speedup else f"{'-':>7}"))
        out_rows.append(dict(date=stamp, commit=commit, device=dev_name, torch=torch.__version__,
                             backend=r["backend"], model=args.model, layers=args.layers or "all",
                             factor=args.factor, groups=len(work), members=args.members, dtype=args.dtype,
                             noise=args.noise, new_entries=n_new, bytes=n_bytes, repeats=r["repeats"],
                             median_s=f"{r['median_s']:.6f}", min_s=f"{r['min_s']:.6f}",
                             max_s=f"{r['max_s']:.6f}", gbps=f"{r['gbps']:.3f}",
                             copy_gbps=f"{bw_copy:.3f}", frac_copy=f"{frac_copy:.4f}",
                             nominal_gbps=bw_nominal or "", frac_nominal=f"{frac_nom:.4f}" if frac_nom else "",
                             peak_mem_mb=f"{r['peak_mb']:.1f}", speedup_vs_reference=f"{speedup:.2f}" if speedup else "",
                             threads=torch.get_num_threads()))
    if not args.no_csv and out_rows:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(out_rows[0]))
            if new:
                w.writeheader()
            w.writerows(out_rows)
        print(f"# appended {len(out_rows)} rows to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
