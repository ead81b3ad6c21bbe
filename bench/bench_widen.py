"""Benchmark the widen primitive on a ladder of GPT-like training states.

Each rung is a GPT-2-shaped model (d_model d, d_ff 4d, n_layer blocks, vocab
50257, context 1024, biases, LayerNorm) grown by --factor, every parameter with
its AdamW moments (param + exp_avg + exp_avg_sq: one group of three members per
parameter), the parameter with noise (sigma on copied units, antithetic column
pairs) unless --noise 0. Methods, all in one process over the same groups:

  <backend>        the backend as widen_ runs it: parameters in batches of at most
                   the largest group's bytes, one call per batch (for cuda: one
                   staging copy and one kernel launch per batch)
  <backend>/group  the native backends called once per parameter group
  eager            what people write by hand: index_select rows and columns,
                   multiply the scales, torch.where the fresh units, torch.randn
                   noise; one member at a time, in the tensors' dtype
  reference        growkern.ops.reference_widen (float64, numpy Philox): the spec
  alloc            allocate the new tensors and fill them once, a group at a time:
                   the floor of any out-of-place method's arithmetic (later groups
                   reuse the pages earlier ones freed)
  alloc/batch      the same, holding each batch's tensors until the batch is done,
                   as the batched backends do: the floor including their page faults

Bytes counted per pass: every member's old tensor read once plus its new tensor
written once (maps and scales are small and not counted). GB/s is that over the
median time; `frac_copy` is the fraction of a measured device copy (dst.copy_(src)
of 512 MiB, read + write counted), `frac_nominal` of the nominal bandwidth
(--bandwidth, or a table of known GPUs). Peak extra memory is the peak during a
method's first pass (untimed) minus what was in use before it (CPU: VmHWM reset
through /proc/self/clear_refs, less the RSS after malloc_trim; CUDA:
max_memory_allocated less memory_allocated). On the CPU, before every timed pass the C
heap's free pages go back to the OS (malloc_trim), so every method writes fresh pages
each pass, as widen_ in a new process does, and the alloc floor is comparable between
runs. Rows go to bench/results/widen.csv; --plot draws them.

    python bench/bench_widen.py                                 # CPU: d_model 256, 512
    python bench/bench_widen.py --device cuda                   # d_model 256 .. 2048, fp32 + bf16
    python bench/bench_widen.py --sizes 768 --dtypes float32 --methods cpu,eager
    python bench/bench_widen.py --plot bench/results/widen.png  # plot the CSV, no run
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import importlib.util
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from benchenv import device_name, git_commit, release_free_memory, sync  # noqa: E402
from growkern.kernels.backends import backends, resolve_backend  # noqa: E402
from growkern.kernels.spec import TensorScales, WidenGroup, reference_widen  # noqa: E402
from growkern.growth.apply import batch_indices  # noqa: E402
from growkern.growth.checks import free_bytes  # noqa: E402

# nominal memory bandwidth, GB/s (1e9 bytes/s), by device-name substring
KNOWN_BANDWIDTH = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                   "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0}
VOCAB, CTX = 50257, 1024


def model_shapes(d: int, n_layer: int):
    """(name, old shape, (row axis, col axis)) of every parameter; an axis named
    'fixed' does not grow."""
    ff = 4 * d
    out = [("wte.weight", (VOCAB, d), ("fixed", "d")), ("wpe.weight", (CTX, d), ("fixed", "d"))]
    for i in range(n_layer):
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
    """A copy-growth group: grown axes read unit j % old, columns split (scale
    1/factor), noise on the parameter with antithetic column pairs."""
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
    grp.members.append(TensorScales(row_scale, col_scale, 0.0, noise, 0.0, zlib.crc32(name.encode())))
    for k in range(1, n_members):
        p = 2 if k == 2 else 1  # exp_avg_sq takes squared scales
        grp.members.append(TensorScales(row_scale ** p, None if col_scale is None else col_scale ** p))
    return grp


# --- methods: each maps a list of (srcs, group) to new tensors, dropped as made -------------

def eager_widen(srcs, grp, gen):
    """The hand-written way: gathers, broadcast scales, where, randn; one member at a time."""
    dev = srcs[0].device
    rows = grp.row_src.to(dev)
    cols = None if grp.col_src is None else grp.col_src.to(dev)
    ok = rows >= 0 if cols is None else (rows >= 0)[:, None] & (cols >= 0)[None, :]
    outs = []
    for src, m in zip(srcs, grp.members):
        x = src.index_select(0, rows.clamp(min=0))
        scale = m.row_scale.to(dev, src.dtype)
        if cols is not None:
            x = x.index_select(1, cols.clamp(min=0))
            scale = scale[:, None] * m.col_scale.to(dev, src.dtype)[None, :]
        x = torch.where(ok, x * scale, torch.full_like(x, m.fresh_value))
        if m.sigma:
            sign = grp.row_sign.to(dev, src.dtype)
            if cols is not None:
                sign = sign[:, None] * grp.col_sign.to(dev, src.dtype)[None, :]
            x = x + m.sigma * sign * torch.randn(x.shape, generator=gen, device=dev, dtype=src.dtype)
        outs.append(x)
    return outs


def method_runner(method: str, device, work, sizes):
    """fn() doing one full pass of `method` over `work`."""
    if method == "alloc":
        def run():
            for srcs, grp in work:
                [torch.empty(grp.shape, dtype=s.dtype, device=device).fill_(1.0) for s in srcs]  # dropped as made
        return run
    if method == "alloc/batch":
        batches = batch_indices(sizes)

        def run():
            for b in batches:  # a batch's tensors, dropped together
                [torch.empty(work[i][1].shape, dtype=s.dtype, device=device).fill_(1.0) for i in b for s in work[i][0]]
        return run
    if method == "eager":
        gen = torch.Generator(device=device).manual_seed(0)

        def run():
            for srcs, grp in work:
                eager_widen(srcs, grp, gen)  # dropped as made
        return run
    if method == "reference":
        def run():
            for srcs, grp in work:
                [reference_widen(s, grp, m) for s, m in zip(srcs, grp.members)]  # dropped as made
        return run
    name, _, per = method.partition("/")
    if per == "group":
        fn, _ = resolve_backend(name, device)

        def run():
            for srcs, grp in work:
                fn(srcs, grp)  # dropped as made
        return run
    many, _ = resolve_backend(name, device, batch=True)
    batches = batch_indices(sizes)

    def run():
        for b in batches:
            many([work[i] for i in b])  # dropped as made
    return run


# --- measuring ------------------------------------------------------------------------------

def _rss_mb() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak(device) -> float:
    """Resets the peak counter; returns the memory in use now (MiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss_mb() or 0.0


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def copy_bandwidth(device) -> float:
    """GB/s of dst.copy_(src) for 512 MiB, counting read + write: the best of 5."""
    src = torch.ones(128 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / min(times) / 1e9


def measure(run, device, repeats: int, warmup: int):
    # the first pass measures memory (and warms up): peak in use during it, less before it
    if device.type == "cpu":
        release_free_memory()
    before = _reset_peak(device)
    run()
    extra_mb = max(0.0, _peak_mb(device) - before)
    for _ in range(warmup - 1):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cpu":  # every timed pass gets fresh pages, as widen_ in a new process
            gc.collect()
            release_free_memory()
        sync(device)
        t = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t)
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return dict(median=statistics.median(times), p20=qs[1], p80=qs[7], repeats=repeats, extra_mb=extra_mb)


# --- the ladder -------------------------------------------------------------------------------

def run_rung(d, dtype, args, device, methods, env, writer):
    shapes = model_shapes(d, args.layers)
    gen = torch.Generator().manual_seed(0)
    esize = torch.empty(0, dtype=dtype).element_size()
    groups = [(make_group(name, old, axes, args.factor, args.noise, args.members), old) for name, old, axes in shapes]
    old_numel = sum(torch.Size(old).numel() for _, old in groups)
    new_numel = sum(torch.Size(g.shape).numel() for g, _ in groups)
    n_bytes = args.members * esize * (old_numel + new_numel)
    if 1.1 * n_bytes > (free_bytes(device) or 0):
        print(f"# d_model {d} {dtype}: skipped, old + new state ({n_bytes / 2**30:.1f} GiB) does not fit")
        return
    work = [([torch.randn(old, generator=gen).to(device=device, dtype=dtype) for _ in range(args.members)], g)
            for g, old in groups]
    sizes = [args.members * esize * torch.Size(old).numel() for _, old in groups]
    print(f"\n# d_model {d}, {args.layers} layers, x{args.factor}, {dtype}: {len(work)} groups x {args.members} "
          f"members, {old_numel / 1e6:.1f}M -> {new_numel / 1e6:.1f}M parameters, {n_bytes / 1e9:.2f} GB per pass, "
          f"{len(batch_indices(sizes))} batches")
    print(f"{'method':>14} {'median ms':>11} {'p20..p80 ms':>21} {'GB/s':>8} {'%copy':>6} {'%nominal':>8} "
          f"{'extra MiB':>9} {'x eager':>8} {'x ref':>7}")
    # glibc's malloc adapts its mmap threshold to the first large frees; two untimed
    # passes put the allocator in the state every method then sees
    warm = method_runner("alloc", device, work, sizes)
    warm()
    warm()
    results = {}
    for method in methods:
        run = method_runner(method, device, work, sizes)
        slow = method == "reference"
        r = measure(run, device, args.reference_repeats if slow else args.repeats, 1 if slow else args.warmup)
        r["gbps"] = n_bytes / r["median"] / 1e9
        results[method] = r
    for method, r in results.items():
        frac_copy = r["gbps"] / env["copy_gbps"]
        frac_nom = r["gbps"] / env["nominal_gbps"] if env["nominal_gbps"] else None
        x_eager = results["eager"]["median"] / r["median"] if "eager" in results else None
        x_ref = results["reference"]["median"] / r["median"] if "reference" in results else None
        print(f"{method:>14} {1e3 * r['median']:11.2f} {1e3 * r['p20']:10.2f}..{1e3 * r['p80']:<10.2f} "
              f"{r['gbps']:8.2f} {100 * frac_copy:5.1f}% " + (f"{100 * frac_nom:7.1f}%" if frac_nom else f"{'-':>8}")
              + f" {r['extra_mb']:9.0f} " + (f"{x_eager:8.2f}" if x_eager else f"{'-':>8}")
              + (f" {x_ref:7.1f}" if x_ref else f" {'-':>7}"))
        writer(dict(date=env["date"], commit=env["commit"], device=env["device"], torch=torch.__version__,
                    triton=env["triton"], kernel="widen", method=method, d_model=d, n_layer=args.layers,
                    factor=args.factor, dtype=str(dtype).replace("torch.", ""), members=args.members,
                    noise=args.noise, groups=len(work), params_old=old_numel, params_new=new_numel, bytes=n_bytes,
                    repeats=r["repeats"], median_ms=f"{1e3 * r['median']:.3f}", p20_ms=f"{1e3 * r['p20']:.3f}",
                    p80_ms=f"{1e3 * r['p80']:.3f}", gbps=f"{r['gbps']:.3f}", copy_gbps=f"{env['copy_gbps']:.3f}",
                    frac_copy=f"{frac_copy:.4f}", nominal_gbps=env["nominal_gbps"] or "",
                    frac_nominal=f"{frac_nom:.4f}" if frac_nom else "", peak_extra_mb=f"{r['extra_mb']:.1f}",
                    speedup_vs_eager=f"{x_eager:.2f}" if x_eager else "",
                    speedup_vs_reference=f"{x_ref:.2f}" if x_ref else "", threads=torch.get_num_threads()))
    del work


def plot(csv_path: Path, out: Path):
    """GB/s against d_model: a row of panels per device, noise off | on; a colour per
    method, solid float32, dashed bfloat16; the newest row of each point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(csv_path)))
    devices = sorted({r["device"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    colour = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(devices), 2, figsize=(11, 4 * len(devices)), squeeze=False, sharey="row")
    for row, device in zip(axes, devices):
        latest = {}
        for r in rows:
            if r["device"] == device:
                latest[(r["method"], r["dtype"], float(r["noise"]) > 0, int(r["d_model"]))] = r
        for ax, noisy in zip(row, (False, True)):
            for method, dtype in sorted({(k[0], k[1]) for k in latest if k[2] == noisy}):
                pts = sorted((k[3], float(r["gbps"])) for k, r in latest.items() if k[:3] == (method, dtype, noisy))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour[method],
                        ls="-" if dtype == "float32" else "--", label=f"{method} {dtype}")
            copies = [float(r["copy_gbps"]) for k, r in latest.items() if k[2] == noisy]
            if copies:
                ax.axhline(max(copies), color="k", ls=":", lw=1, label="device copy")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("d_model before growth")
            ax.set_title(f"{device}, noise {'on' if noisy else 'off'}", fontsize=9)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        row[0].set_ylabel("GB/s (old state read + new written)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"# wrote {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default=None, help="d_model ladder (default 256,512 on CPU, 256..2048 on CUDA)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--members", type=int, default=3, help="1 = param, 2 = + exp_avg, 3 = + exp_avg_sq")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--noise", type=float, default=1e-3, help="sigma on the parameter (0: no noise)")
    ap.add_argument("--methods", default=None,
                    help="comma list (default: every available native backend batched and per group, eager, "
                         "reference, alloc, alloc/batch)")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes (default 10 cuda, 3 cpu)")
    ap.add_argument("--reference-repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes (>= 1: the first measures memory)")
    ap.add_argument("--bandwidth", type=float, default=None, help="nominal device memory bandwidth, GB/s")
    ap.add_argument("--csv", default=str(HERE / "results" / "widen.csv"))
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--plot", default=None, help="write a PNG of the CSV's rows and exit")
    args = ap.parse_args(argv)
    if args.plot:
        plot(Path(args.csv), Path(args.plot))
        return

    device = torch.device(args.device)
    args.repeats = args.repeats or (10 if device.type == "cuda" else 3)
    sizes = [int(s) for s in (args.sizes or ("256,512,1024,2048" if device.type == "cuda" else "256,512")).split(",")]
    avail = backends()
    for b, why in avail.items():
        if why != "available":
            print(f"# backend {b}: {why}")
    if args.methods:
        methods = args.methods.split(",")
    else:
        native = [b for b in (("cuda", "triton") if device.type == "cuda" else ("cpu",)) if avail[b] == "available"]
        methods = native + [f"{b}/group" for b in native if b != "triton"] + ["eager", "reference", "alloc", "alloc/batch"]
    nominal = args.bandwidth
    if nominal is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        nominal = next((v for k, v in KNOWN_BANDWIDTH.items() if k in name), None)
    triton_v = ""
    if importlib.util.find_spec("triton") is not None:
        import triton
        triton_v = triton.__version__
    env = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), commit=git_commit(),
               device=device_name(device), triton=triton_v, copy_gbps=copy_bandwidth(device), nominal_gbps=nominal)
    print(f"# {env['device']}, torch {torch.__version__}, triton {triton_v or '-'}, commit {env['commit']}; "
          f"copy {env['copy_gbps']:.1f} GB/s" + (f", nominal {nominal:.0f} GB/s" if nominal else ""))

    rows = []
    for d in sizes:
        for dtype in args.dtypes.split(","):
            run_rung(d, getattr(torch, dtype), args, device, methods, env, rows.append)
    if not args.no_csv and rows:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
        print(f"# appended {len(rows)} rows to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
