"""The widen primitive (growkern.ops) as a Triton kernel, with its own Philox.

Semantics are those of `growkern.ops.reference_widen` (the noise of entry
(r, c) is N(seed, stream, r + row_offset, noise_col[c]), counters mod 2**32);
the noise integer stream is Philox4x32-10 written here with uint32 ops
(bit-identical to growkern.philox; tl.randn is not used: its counter layout
differs). Math is float32 (float64 for float64 tensors), rounded once to the
output dtype; bfloat16 is rounded to nearest-even explicitly (Triton's
interpreter truncates float32 -> bfloat16).

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (set before
triton is imported), which is how the tests exercise it.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .spec import check_row_offset

try:  # precise log1p / sinpi / cospi / sqrt on the GPU
    from triton.language.extra import libdevice
except Exception:  # pragma: no cover - old Triton
    libdevice = None

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mulhilo(a: tl.constexpr, b):
    """(hi, lo) of the 64-bit product of a uint32 constant and a uint32 tensor."""
    p = b.to(tl.uint64) * a
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (Random123's layout, as growkern.philox)."""
    for i in tl.static_range(10):
        if i > 0:
            k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
            k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
    return c0, c1, c2, c3


@triton.jit
def _log1p(y, INTERPRET: tl.constexpr):
    if INTERPRET:
        # Goldberg: log(w) * y / (w - 1) with w = 1 + y is accurate to a few ulps
        w = 1.0 + y
        wm1 = w - 1.0
        safe = tl.where(wm1 == 0.0, 1.0, wm1)
        return tl.where(wm1 == 0.0, y, tl.log(w) * (y / safe))
    else:
        return libdevice.log1p(y)


@triton.jit
def philox_normal(seed, stream, row, col, F64: tl.constexpr, INTERPRET: tl.constexpr):
    """N(seed, stream, row, col) of growkern.philox (uint32 inputs), float32 or float64.
    ln u1 via log1p for u1 > 1/2; cos(2 pi u2) with exact integer angle reduction."""
    zero = tl.zeros_like(row)
    x0, x1, _, _ = philox4x32_10(row, col, zero, zero, seed + zero, stream + zero)
    if F64:
        ft = tl.float64
    else:
        ft = tl.float32
    two_m32 = 2.3283064365386963e-10  # 2^-32, exact in float32 and float64
    hi = x0 >= 0x80000000
    d = (0xFFFFFFFF - x0).to(ft)  # 1 - u1 = d 2^-32, d exact
    lo_arg = tl.where(hi, 1, x0 + 1).to(ft) * two_m32  # u1 when x0 < 2^31 (x0 + 1 cannot wrap)
    if INTERPRET:
        ln_lo = tl.log(lo_arg.to(ft))
    else:
        ln_lo = libdevice.log(lo_arg.to(ft))
    ln_hi = _log1p((-d * two_m32).to(ft), INTERPRET)
    rad2 = -2.0 * tl.where(hi, ln_hi, ln_lo)
    q = x1 >> 30
    f = x1 & 0x3FFFFFFF
    fold = f >= 0x20000000
    g = tl.where(fold, 0x40000000 - f, f)
    t = (g.to(ft) * 4.656612873077393e-10).to(ft)  # g 2^-31 = angle / pi in [0, 1/4], exact scaling
    if INTERPRET:
        a = t * tl.full(t.shape, 3.141592653589793, ft)  # a float64 constant in float64 mode
        s = tl.sin(a.to(ft))
        c = tl.cos(a.to(ft))
        rad = tl.sqrt(rad2)
    else:
        s = libdevice.sinpi(t)
        c = libdevice.cospi(t)
        if F64:
            rad = tl.sqrt(rad2)  # float64 sqrt is IEEE-rounded
        else:
            rad = tl.sqrt_rn(rad2)
    ca = tl.where(fold, s, c)
    sa = tl.where(fold, c, s)
    cosv = tl.where(q == 0, ca, tl.where(q == 1, -sa, tl.where(q == 2, -ca, sa)))
    return (rad * cosv).to(ft)


@triton.jit
def _store_rounded(ptr, val, mask):
    """Store float32/float64 `val` into ptr's dtype, rounding to nearest even."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = val.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(nan, (u >> 16) | 0x40, rounded).to(tl.uint16)
        tl.store(ptr, bits.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _widen_member_kernel(src_ptr, dst_ptr, row_src_ptr, col_src_ptr, noise_col_ptr,
                         row_sign_ptr, col_sign_ptr, row_scale_ptr, col_scale_ptr,
                         fpar_ptr, key_ptr, numel, C, s0, s1,
                         TWO_D: tl.constexpr, NOISY: tl.constexpr, F64: tl.constexpr,
                         INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    if F64:
        ft = tl.float64
    else:
        ft = tl.float32
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    r = offs // C
    c = offs - r * C
    rs = tl.load(row_src_ptr + r, mask=mask, other=-1)
    if TWO_D:
        cs = tl.load(col_src_ptr + c, mask=mask, other=-1)
    else:
        cs = tl.zeros_like(rs)
    ok = (rs >= 0) & (cs >= 0)
    fresh = tl.load(fpar_ptr).to(ft)
    x = tl.load(src_ptr + rs * s0 + cs * s1, mask=mask & ok, other=0.0).to(ft)
    base = x * tl.load(row_scale_ptr + r, mask=mask, other=0.0).to(ft)
    if TWO_D:
        base = base * tl.load(col_scale_ptr + c, mask=mask, other=0.0).to(ft)
    val = tl.where(ok, base, fresh)
    if NOISY:
        sigma = tl.load(fpar_ptr + 1).to(ft)
        sigma_fresh = tl.load(fpar_ptr + 2).to(ft)
        seed = tl.load(key_ptr).to(tl.uint32)
        stream = tl.load(key_ptr + 1).to(tl.uint32)
        row_offset = tl.load(key_ptr + 2)  # int64 in [0, 2**32): r + row_offset cannot overflow
        coef = sigma * tl.load(row_sign_ptr + r, mask=mask, other=0.0).to(ft)
        if TWO_D:
            ncol = tl.load(noise_col_ptr + c, mask=mask, other=0).to(tl.uint32)
            coef = coef * tl.load(col_sign_ptr + c, mask=mask, other=0.0).to(ft)
        else:
            ncol = tl.zeros_like(r).to(tl.uint32)
        nrow = (r + row_offset).to(tl.uint32)  # the counter row, mod 2**32 as the reference
        z = philox_normal(seed, stream, nrow, ncol, F64, INTERPRET)
        coef = tl.where(ok, coef, sigma_fresh)
        val = val + coef * z
    _store_rounded(dst_ptr + offs, val, mask)


@triton.jit
def _philox_words_kernel(rows_ptr, cols_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    r = tl.load(rows_ptr + offs, mask=mask, other=0).to(tl.uint32)
    c = tl.load(cols_ptr + offs, mask=mask, other=0).to(tl.uint32)
    zero = tl.zeros_like(r)
    seed = tl.load(key_ptr).to(tl.uint32)
    stream = tl.load(key_ptr + 1).to(tl.uint32)
    x0, x1, x2, x3 = philox4x32_10(r, c, zero, zero, seed + zero, stream + zero)
    tl.store(out_ptr + 4 * offs, x0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 1, x1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 2, x2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 3, x3.to(tl.int64), mask=mask)


def _block(numel: int) -> int:
    if interpreting():  # one numpy pass per program: fewer, larger programs
        return max(16, min(1 << 14, triton.next_power_of_2(max(numel, 1))))
    return 1024


def philox_words(rows: torch.Tensor, cols: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """Philox4x32-10((rows, cols, 0, 0), (seed, stream)) words as int64 [..., 4]."""
    rows = rows.to(torch.int64).contiguous()
    cols = cols.to(device=rows.device, dtype=torch.int64).contiguous()
    out = torch.empty((*rows.shape, 4), dtype=torch.int64, device=rows.device)
    n = rows.numel()
    if n:
        key = torch.tensor([seed, stream], dtype=torch.int64, device=rows.device)
        block = _block(n)
        _philox_words_kernel[(triton.cdiv(n, block),)](rows, cols, key, out, n, BLOCK=block)
    return out


def _pack(device, dtype, parts):
    """Concatenate 1-D CPU tensors (None allowed) into one device tensor; return the views."""
    present = [p for p in parts if p is not None]
    if not present:
        return [None] * len(parts)
    flat = torch.cat([p.detach().reshape(-1).to("cpu", dtype) for p in present]).to(device)
    out, pos = [], 0
    for p in parts:
        if p is None:
            out.append(None)
        else:
            out.append(flat[pos:pos + p.numel()])
            pos += p.numel()
    return out


def _check_maps(group, src, two_d, noisy):
    """The checks the C++ op makes, on the (CPU) maps, before anything is launched."""
    def check(idx, name, limit):
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise ValueError(f"widen: {name} must be a 1-D int64 tensor")
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= limit):
            raise ValueError(f"widen: {name} has entries outside [-1, {limit})")
    check(group.row_src, "row_src", src.shape[0])
    if two_d:
        check(group.col_src, "col_src", src.shape[1])
        if noisy:
            if group.noise_col is None or group.col_sign is None:
                raise ValueError("widen: a 2-D group with noise needs noise_col and col_sign")
            if group.noise_col.numel() and int(group.noise_col.min()) < 0:
                raise ValueError("noise counters (row, column) must be >= 0")


def widen_triton(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """The backend function: tensors[i] rebuilt with group.members[i]."""
    if len(tensors) != len(group.members):
        raise ValueError(f"widen: {len(tensors)} tensors for {len(group.members)} members")
    dev = tensors[0].device
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")
    two_d = group.col_src is not None
    R = group.row_src.numel()
    C = group.col_src.numel() if two_d else 1
    numel = R * C
    noisy = [m.sigma != 0.0 or m.sigma_fresh != 0.0 for m in group.members]
    for t in tensors:
        if t.dim() != (2 if two_d else 1):
            raise ValueError(f"widen: a {'2' if two_d else '1'}-D group got a tensor of shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"widen (triton): unsupported dtype {t.dtype}")
    _check_maps(group, tensors[0], two_d, any(noisy))
    for m in group.members:
        for name, v in (("seed", group.seed), ("stream", m.stream)):
            if not 0 <= int(v) < 2 ** 32:
                raise ValueError(f"{name} must be an int in [0, 2**32), got {v!r}")
    row_offset = check_row_offset(group.row_offset)
    ints = _pack(dev, torch.int64, [group.row_src, group.col_src if two_d else None,
                                    group.noise_col if two_d and any(noisy) else None])
    row_src, col_src, noise_col = ints
    by_acc = {}
    for i, t in enumerate(tensors):
        by_acc.setdefault(torch.float64 if t.dtype == torch.float64 else torch.float32, []).append(i)
    results = [None] * len(tensors)
    for acc, idx in by_acc.items():
        parts = [group.row_sign, group.col_sign if two_d else None]
        for i in idx:
            parts += [group.members[i].row_scale, group.members[i].col_scale if two_d else None]
        views = _pack(dev, acc, parts)
        row_sign, col_sign = views[0], views[1]
        for j, i in enumerate(idx):
            t, m = tensors[i], group.members[i]
            out = torch.empty((R, C) if two_d else (R,), dtype=t.dtype, device=dev)
            results[i] = out
            if numel == 0:
                continue
            rsc, csc = views[2 + 2 * j], views[3 + 2 * j]
            fpar = torch.tensor([m.fresh_value, m.sigma, m.sigma_fresh], dtype=torch.float64, device=dev)
            key = torch.tensor([group.seed, m.stream, row_offset], dtype=torch.int64, device=dev)
            block = _block(numel)
            dummy = row_src
            _widen_member_kernel[(triton.cdiv(numel, block),)](
                t.detach(), out, row_src, col_src if two_d else dummy,
                noise_col if noise_col is not None else dummy,
                row_sign, col_sign if two_d else row_sign, rsc, csc if two_d else rsc,
                fpar, key, numel, C, t.stride(0), t.stride(1) if two_d else 0,
                TWO_D=two_d, NOISY=noisy[i], F64=acc == torch.float64,
                INTERPRET=interpreting(), BLOCK=block)
    return results
