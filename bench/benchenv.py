"""What every benchmark row records about where it ran: git commit and device."""
from __future__ import annotations

import ctypes
import platform
import subprocess
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def git_commit() -> str:
    """Short HEAD hash, '+dirty' when tracked files are modified."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=HERE)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "asimd", "sve")


def cpu_isa(device: torch.device) -> str:
    """The instruction set growkern's CPU kernels draw normals with, and the CPU's vector
    flags: "avx512 (cpu: avx2 fma avx512f ...)"; empty for a GPU device."""
    if device.type != "cpu":
        return ""
    from growkern.kernels.ext import cpu_isa as used
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
        flags = set(line.split(":", 1)[-1].split())
    except OSError:
        pass
    isa = used()[0] or "no extension"
    return f"{isa} (cpu: {' '.join(f for f in SIMD_FLAGS if f in flags) or 'none listed'})"


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc malloc_trim): RSS is then the
    live set, and the next allocations get fresh pages, as in a new process, instead of
    pages an earlier run left warm. Benchmarks call it before every timed CPU run so
    every run starts from the same allocator state."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
