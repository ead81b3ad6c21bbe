"""Every available widen backend against the specification (growkern.ops.reference_widen).

Error bound (float ulp bound). For each entry, with v the specification's value
in float64 (reference_widen(..., out_dtype=float64)), out the backend's value,
base = x * row_scale * col_scale (fresh_value for a fresh entry), coef =
sigma * row_sign * col_sign (sigma_fresh for a fresh entry) and
rho = sqrt(-2 ln u1) >= |z| the Box-Muller radius of the entry's draw:

    |out - v| <= ulp_out(max(|v|, |out|)) + eps * (|base| + |coef| * rho)

ulp_out is the spacing of the output dtype at that magnitude (floored at its
smallest subnormal): one ulp covers the final rounding (a correctly rounded
result is within half an ulp; the other half absorbs double rounding of the
float32 result into float16/bfloat16). eps is the compute precision: 2^-20
(8 float32 ulps) for float32/float16/bfloat16 tensors, which are computed in
float32, and 2^-48 for float64 tensors, computed in double. The noise alone
(fresh entries, sigma_fresh = 1) meets |z - z_ref| <= 2^-21 |z| + 2^-40 rho in
float32: ln u1 = log1p(f) - k ln 2 with k and f read exactly from the integer x0 + 1,
and cos(2 pi u2) an exact integer angle reduction, so z is accurate relative to itself,
also near 0 (docs/growth.md, "The float32 normal"). The C++ and CUDA backends share that
float32 code bit for bit, the CPU's SIMD lanes included (checked by ctest).

The integer stream (the Philox words) is bit-identical to growkern.philox on
every backend, and outputs are bit-identical across thread counts, Triton block
sizes and member groupings.

Triton runs on the CPU through its interpreter (TRITON_INTERPRET=1, set below
before anything imports the Triton kernels); its tests skip when triton is not
installed. Backends that are not built are skipped with the reason.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from growkern.kernels import philox  # noqa: E402
from growkern.kernels.backends import backends, resolve_backend  # noqa: E402
from growkern.kernels.spec import TensorScales, WidenGroup, reference_widen  # noqa: E402

AVAIL = backends()
HAS_TRITON = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EPS = {torch.float32: 2.0**-20, torch.float16: 2.0**-20, torch.bfloat16: 2.0**-20, torch.float64: 2.0**-48}
MANT = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7, torch.float64: 52}
TINY = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133, torch.float64: 2.0**-1074}


def _backend(name):
    if name == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed (or TRITON_INTERPRET was not 1 at import)")
    if AVAIL[name] != "available":
        pytest.skip(f"backend {name}: {AVAIL[name]}")
    fn, _ = resolve_backend(name, torch.device("cuda" if name == "cuda" else "cpu"))
    return fn


CPU_BACKENDS = ["cpu", "triton"]


def _device(name):
    return torch.device("cuda") if name == "cuda" else torch.device("cpu")


# --- groups ------------------------------------------------------------------------

def make_group(old_shape, new_shape, *, seed=12345, gen_seed=0, fresh_frac=0.2, antithetic=True,
               members=None):
    """A random group: maps with fresh (-1) units, antithetic noise-column pairs (two
    columns sharing one counter with opposite signs), and param/moment members."""
    g = torch.Generator().manual_seed(gen_seed)
    R = new_shape[0]
    R0 = old_shape[0]

    def idx(n_new, n_old):
        src = torch.randint(0, n_old, (n_new,), generator=g)
        fresh = torch.rand(n_new, generator=g) < fresh_frac
        return torch.where(fresh, torch.full_like(src, -1), src)

    row_src = idx(R, R0)
    row_sign = torch.randint(-1, 2, (R,), generator=g).double()
    col_src = col_sign = noise_col = None
    if len(new_shape) == 2:
        C, C0 = new_shape[1], old_shape[1]
        col_src = idx(C, C0)
        col_sign = torch.randint(-1, 2, (C,), generator=g).double()
        noise_col = torch.arange(C)
        if antithetic and C >= 2:
            half = C // 2
            noise_col[half:2 * half] = noise_col[:half]  # column half+j shares column j's draw
            col_sign[half:2 * half] = -col_sign[:half]
            col_src[half:2 * half] = col_src[:half]
    grp = WidenGroup(row_src, col_src, row_sign, col_sign, noise_col, seed)
    if members is None:
        members = [dict(fresh_value=0.0, sigma=0.05, sigma_fresh=0.02, stream=3_000_000_000),
                   dict(fresh_value=0.0),
                   dict(fresh_value=1e-3, sigma_fresh=0.5, stream=17)]
    for kw in members:
        rs = torch.rand(R, generator=g, dtype=torch.float64) * 2 - 0.5
        cs = None if col_src is None else torch.rand(len(col_src), generator=g, dtype=torch.float64) * 2 - 0.5
        grp.members.append(TensorScales(rs, cs, **kw))
    return grp


def make_sources(grp, old_shape, dtype, device="cpu", gen_seed=1):
    g = torch.Generator().manual_seed(gen_seed)
    return [(torch.randn(old_shape, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
            for _ in grp.members]


def _rho(grp, stream):
    """sqrt(-2 ln u1) of every entry's draw, float64 numpy of the group's shape."""
    R = grp.row_src.numel()
    rows = np.arange(R, dtype=np.int64) + grp.row_offset
    if grp.col_src is None:
        x0 = philox.philox4x32((rows, np.zeros_like(rows), 0, 0), (grp.seed, stream))[0]
    else:
        cols = grp.noise_col.numpy()
        x0 = philox.philox4x32((rows[:, None], cols[None, :], 0, 0), (grp.seed, stream))[0]
    return np.sqrt(-2 * np.log((x0.astype(np.float64) + 1) * 2.0**-32))


def error_bound(src, grp, m, out_dtype, out):
    """The bound of the module docstring, per entry."""
    quiet = TensorScales(m.row_scale, m.col_scale, m.fresh_value, 0.0, 0.0, m.stream)
    base = reference_widen(src, grp, quiet, torch.float64).abs().numpy()
    v = reference_widen(src, grp, m, torch.float64).numpy()
    if m.sigma or m.sigma_fresh:
        ok = (grp.row_src >= 0).numpy()
        sign = grp.row_sign.numpy()
        if grp.col_src is not None:
            ok = ok[:, None] & (grp.col_src >= 0).numpy()[None, :]
            sign = sign[:, None] * grp.col_sign.numpy()[None, :]
        coef = np.where(ok, np.abs(m.sigma * sign), abs(m.sigma_fresh))
        noise_mag = coef * _rho(grp, m.stream)
    else:
        noise_mag = 0.0
    mag = np.maximum(np.abs(v), np.abs(out))
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
    ulp = np.maximum(np.exp2(e - MANT[out_dtype]), TINY[out_dtype])
    return v, ulp + EPS[out_dtype] * (base + noise_mag)


def assert_matches_spec(outs, srcs, grp):
    assert len(outs) == len(grp.members)
    for out, src, m in zip(outs, srcs, grp.members):
        assert out.dtype == src.dtype and out.device == src.device
        assert tuple(out.shape) == grp.shape
        o = out.detach().cpu().double().numpy()
        v, tol = error_bound(src.cpu(), grp, m, src.dtype, o)
        err = np.abs(o - v)
        bad = err > tol
        assert not bad.any(), (f"{int(bad.sum())} entries over the bound, worst ratio "
                               f"{float((err / tol).max()):.3g}, dtype {src.dtype}")


# --- the backends against the specification ------------------------------------------

SHAPES = [((1, 1), (1, 1)), ((2, 3), (3, 5)), ((5, 64), (7, 129)), ((4,), (1,)), ((6,), (13,)),
          ((1, 1), (3, 5))]


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{s[0]}->{s[1]}")
def test_backend_matches_reference(backend, dtype, shapes):
    fn = _backend(backend)
    old, new = shapes
    grp = make_group(old, new, gen_seed=hash((old, new)) % 1000)
    srcs = make_sources(grp, old, dtype, _device(backend))
    outs = fn(srcs, grp)
    assert_matches_spec(outs, [s.cpu() for s in srcs], grp)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_all_fresh_and_no_noise(backend):
    fn = _backend(backend)
    members = [dict(fresh_value=0.25), dict(fresh_value=-3.0, sigma=0.0, sigma_fresh=0.0)]
    grp = make_group((3, 4), (6, 9), fresh_frac=1.0, members=members)
    srcs = make_sources(grp, (3, 4), torch.float32, _device(backend))
    outs = fn(srcs, grp)
    assert torch.equal(outs[0].cpu(), torch.full((6, 9), 0.25))
    assert torch.equal(outs[1].cpu(), torch.full((6, 9), -3.0))
    # no fresh units, no noise: an exact copy with unit scales
    grp = make_group((5, 7), (5, 7), fresh_frac=0.0, members=[dict()])
    grp.members[0].row_scale = torch.ones(5, dtype=torch.float64)
    grp.members[0].col_scale = torch.ones(7, dtype=torch.float64)
    src = make_sources(grp, (5, 7), torch.float32, _device(backend))
    out = fn(src, grp)[0].cpu()
    assert torch.equal(out, src[0].cpu()[grp.row_src][:, grp.col_src])


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_antithetic_pairs_cancel(backend):
    """Columns that share a noise counter with opposite signs get opposite noise."""
    fn = _backend(backend)
    grp = make_group((4, 6), (4, 12), fresh_frac=0.0,
                     members=[dict(fresh_value=0.0, sigma=1.0, sigma_fresh=0.0, stream=99)])
    grp.row_sign = torch.ones(4, dtype=torch.float64)
    grp.col_sign = torch.cat([torch.ones(6), -torch.ones(6)]).double()
    grp.members[0].row_scale = torch.zeros(4, dtype=torch.float64)  # base 0: pure noise
    src = make_sources(grp, (4, 6), torch.float32, _device(backend))
    out = fn(src, grp)[0].cpu()
    assert torch.equal(out[:, :6], -out[:, 6:])
    assert out.abs().min() > 0


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_noise_values(backend, dtype):
    """z alone (fresh entries, sigma_fresh = 1) against growkern.philox.normal, many counters."""
    fn = _backend(backend)
    R, C = 96, 257
    grp = WidenGroup(torch.full((R,), -1), torch.full((C,), -1), torch.ones(R, dtype=torch.float64),
                     torch.ones(C, dtype=torch.float64), torch.arange(C) * 7919 + 2**31, seed=2**32 - 5)
    grp.members.append(TensorScales(torch.ones(R, dtype=torch.float64), torch.ones(C, dtype=torch.float64),
                                    fresh_value=0.0, sigma=0.0, sigma_fresh=1.0, stream=0xFFFFFFFF))
    src = [torch.zeros(1, 1, dtype=dtype, device=_device(backend))]
    z = fn(src, grp)[0].cpu().double().numpy()
    ref = philox.normal(grp.seed, 0xFFFFFFFF, np.arange(R)[:, None], grp.noise_col.numpy()[None, :])
    rho = _rho(grp, 0xFFFFFFFF)
    if dtype == torch.float32:
        tol = 2.0**-21 * np.abs(ref) + 2.0**-40 * rho
    else:
        tol = 2.0**-48 * rho
    assert (np.abs(z - ref) <= tol).all(), float((np.abs(z - ref) / tol).max())


# --- the integer stream ---------------------------------------------------------------

def _counters(n=4096):
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.int64)
    cols = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.int64)
    rows[:4] = [0, 2**32 - 1, 0, 2**32 - 1]
    cols[:4] = [0, 2**32 - 1, 2**32 - 1, 0]
    return rows, cols


@pytest.mark.parametrize("seed,stream", [(0, 0), (2**32 - 1, 2**32 - 1), (0x243F6A88, 0x85A308D3)])
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_philox_words_bit_identical(backend, seed, stream):
    _backend(backend)
    rows, cols = _counters()
    want = np.stack(philox.philox4x32((rows, cols, 0, 0), (seed, stream)), -1).astype(np.int64)
    dev = _device(backend)
    r, c = torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev)
    if backend == "triton":
        from growkern.kernels import widen_triton
        got = widen_triton.philox_words(r, c, seed, stream)
    else:
        got = torch.ops.growkern.philox_words(r, c, seed, stream)
    np.testing.assert_array_equal(got.cpu().numpy(), want)


KAT = [  # Random123 kat_vectors, philox4x32_10: (counter, key, expected); as tests/test_philox.py
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


_kat_kernel = None
if HAS_TRITON:
    import triton
    import triton.language as tl

    from growkern.kernels.widen_triton import philox4x32_10

    @triton.jit
    def _kat_kernel(ctr_ptr, key_ptr, out_ptr):
        i = tl.arange(0, 4)
        c0 = tl.load(ctr_ptr + 4 * i).to(tl.uint32)
        c1 = tl.load(ctr_ptr + 4 * i + 1).to(tl.uint32)
        c2 = tl.load(ctr_ptr + 4 * i + 2).to(tl.uint32)
        c3 = tl.load(ctr_ptr + 4 * i + 3).to(tl.uint32)
        k0 = tl.load(key_ptr + 2 * i).to(tl.uint32)
        k1 = tl.load(key_ptr + 2 * i + 1).to(tl.uint32)
        x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
        tl.store(out_ptr + 4 * i, x0.to(tl.int64))
        tl.store(out_ptr + 4 * i + 1, x1.to(tl.int64))
        tl.store(out_ptr + 4 * i + 2, x2.to(tl.int64))
        tl.store(out_ptr + 4 * i + 3, x3.to(tl.int64))


def test_triton_philox_known_answer_vectors():
    """The Triton Philox on full 4-word counters (Random123 kat_vectors)."""
    _backend("triton")
    assert _kat_kernel is not None
    kat = KAT + [KAT[0]]  # 4 lanes
    ctr = torch.tensor([list(k[0]) for k in kat], dtype=torch.int64)
    key = torch.tensor([list(k[1]) for k in kat], dtype=torch.int64)
    out = torch.empty(4, 4, dtype=torch.int64)
    _kat_kernel[(1,)](ctr, key, out)
    assert out.tolist() == [list(k[2]) for k in kat]


# --- determinism: threads, blocks, groupings --------------------------------------------

def test_cpu_independent_of_thread_count():
    fn = _backend("cpu")
    grp = make_group((50, 64), (300, 257))
    srcs = make_sources(grp, (50, 64), torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn(srcs, grp)
        torch.set_num_threads(2)
        two = fn(srcs, grp)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_triton_independent_of_block_size(monkeypatch):
    fn = _backend("triton")
    from growkern.kernels import widen_triton
    grp = make_group((9, 20), (17, 45))
    srcs = make_sources(grp, (9, 20), torch.bfloat16)
    outs = {}
    for block in (16, 128, 1024):
        monkeypatch.setattr(widen_triton, "_block", lambda numel, b=block: b)
        outs[block] = fn(srcs, grp)
    for block in (128, 1024):
        for a, b in zip(outs[16], outs[block]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_members_independent_of_grouping(backend):
    """Widening the members together or one at a time gives the same bits, and the
    backends agree bit for bit where they compute alike (all of float32 here)."""
    fn = _backend(backend)
    grp = make_group((6, 10), (11, 23))
    srcs = make_sources(grp, (6, 10), torch.float32, _device(backend))
    together = fn(srcs, grp)
    for i, m in enumerate(grp.members):
        single = WidenGroup(grp.row_src, grp.col_src, grp.row_sign, grp.col_sign, grp.noise_col, grp.seed, [m])
        assert torch.equal(fn([srcs[i]], single)[0], together[i])


def test_mixed_dtypes_and_noncontiguous_sources():
    fn = _backend("cpu")
    grp = make_group((6, 10), (11, 23))
    base = make_sources(grp, (10, 6), torch.float32)
    srcs = [base[0].t(), base[1].t().to(torch.bfloat16), base[2].t().double()]  # transposed views
    assert not srcs[0].is_contiguous()
    outs = fn(srcs, grp)
    assert [o.dtype for o in outs] == [torch.float32, torch.bfloat16, torch.float64]
    assert_matches_spec(outs, srcs, grp)


# --- row and column slices (sharded builds: each rank builds the rows it owns) ---------------

SLICE_SHAPES = [((5, 7), (23, 13)), ((3, 2), (9, 1)), ((1, 1), (1, 5)), ((6,), (17,)), ((2,), (1,))]
SLICE_MEMBERS = [dict(fresh_value=0.0, sigma=0.05, sigma_fresh=0.02, stream=3_000_000_000),
                 dict(fresh_value=1e-3, sigma=0.3, sigma_fresh=0.5, stream=17),
                 dict(fresh_value=0.0),
                 dict(fresh_value=-0.25, sigma=1.0, sigma_fresh=1.0, stream=17)]


def _cuts(n):
    """Partitions of range(n): whole, with empty pieces, uneven, one row at a time."""
    out = [[0, n], [0, 0, n, n], sorted({0, n, n // 3, n // 3, (2 * n) // 3 + 1 if n > 1 else n})]
    out.append(list(range(n + 1)))
    return [[min(c, n) for c in cs] for cs in out]


def _interpreted(backend, dtype):
    """Under the Triton interpreter (CPU) a launch takes a second or more: the slice tests
    take one dtype and skip the row-at-a-time partition there (the counter arithmetic
    does not depend on the dtype; every dtype runs on the compiled backends)."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _slice_backend(name):
    if name == "reference":
        return lambda tensors, group: [reference_widen(t, group, m) for t, m in zip(tensors, group.members)]
    return _backend(name)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shapes", SLICE_SHAPES, ids=lambda s: f"{s[0]}->{s[1]}")
@pytest.mark.parametrize("row_offset", [0, 2**32 - 7])
def test_row_slices_concatenate_to_the_whole(backend, dtype, shapes, row_offset):
    """group.rows(lo, hi) over a partition of the rows (empty and uneven pieces
    included) gives the whole output bit for bit; a base row_offset near 2**32
    checks that counters wrap as in the reference."""
    if _interpreted(backend, dtype) and dtype != torch.float32:
        pytest.skip("interpreted Triton: float32 only (see _interpreted)")
    fn = _slice_backend(backend)
    old, new = shapes
    grp = make_group(old, new, gen_seed=7, members=SLICE_MEMBERS)
    grp.row_offset = row_offset
    srcs = make_sources(grp, old, dtype, _device(backend))
    whole = fn(srcs, grp)
    if backend != "reference":
        assert_matches_spec(whole, [s.cpu() for s in srcs], grp)
    R = new[0]
    for cuts in _cuts(R)[:3] if _interpreted(backend, dtype) else _cuts(R):
        pieces = [fn(srcs, grp.rows(lo, hi)) for lo, hi in zip(cuts[:-1], cuts[1:])]
        for i, w in enumerate(whole):
            got = torch.cat([p[i] for p in pieces], dim=0)
            assert torch.equal(got, w), (cuts, i)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shapes", [s for s in SLICE_SHAPES if len(s[1]) == 2], ids=lambda s: f"{s[0]}->{s[1]}")
def test_col_slices_concatenate_to_the_whole(backend, dtype, shapes):
    """group.cols(lo, hi) over a partition of the columns gives the whole output bit for
    bit (antithetic partners may land in different pieces: noise_col carries the
    counter), and so do blocks rows(...).cols(...)."""
    if _interpreted(backend, dtype) and dtype != torch.float32:
        pytest.skip("interpreted Triton: float32 only (see _interpreted)")
    fn = _slice_backend(backend)
    old, new = shapes
    grp = make_group(old, new, gen_seed=8, members=SLICE_MEMBERS)
    srcs = make_sources(grp, old, dtype, _device(backend))
    whole = fn(srcs, grp)
    R, C = new
    for cuts in _cuts(C)[:3] if _interpreted(backend, dtype) else _cuts(C):
        pieces = [fn(srcs, grp.cols(lo, hi)) for lo, hi in zip(cuts[:-1], cuts[1:])]
        for i, w in enumerate(whole):
            assert torch.equal(torch.cat([p[i] for p in pieces], dim=1), w), (cuts, i)
    rc, cc = _cuts(R)[2], _cuts(C)[2]  # a grid of blocks, each built alone
    blocks = [[fn(srcs, grp.rows(r0, r1).cols(c0, c1)) for c0, c1 in zip(cc[:-1], cc[1:])]
              for r0, r1 in zip(rc[:-1], rc[1:])]
    for i, w in enumerate(whole):
        got = torch.cat([torch.cat([b[i] for b in row], dim=1) for row in blocks], dim=0)
        assert torch.equal(got, w)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_batch_with_row_offsets(backend):
    """The batch op takes one row_offset per group: the row slices of several groups in
    one widen_groups call equal the whole groups' rows, and the default (no
    row_offsets) is all 0."""
    many = _batch_backend(backend)
    items = make_batch(_device(backend))
    whole = many(items)
    sliced = []
    for srcs, grp in items:
        R = grp.row_src.numel()
        lo, hi = min(R, 1), max(min(R, 1), R - R // 3)
        sliced.append((srcs, grp.rows(lo, hi), lo, hi))
    got = many([(srcs, g) for srcs, g, _, _ in sliced])
    for (_, _, lo, hi), outs, want in zip(sliced, got, whole):
        for a, b in zip(outs, want):
            assert torch.equal(a, b[lo:hi])
    from growkern.kernels.ext import groups_args
    args = groups_args(items)
    assert args[-1] == [0] * len(items)
    default = torch.ops.growkern.widen_groups(*args[:-1])
    for a, b in zip(default, [t for outs in whole for t in outs]):
        assert torch.equal(a, b)


def test_slices_share_and_check():
    """rows()/cols() slice views and share the rest; bad ranges and offsets are rejected,
    and row_offset is keyword-only (members still follows seed positionally)."""
    grp = make_group((4, 5), (10, 8), members=SLICE_MEMBERS[:2])
    grp.row_offset = 3
    sub = grp.rows(2, 7)
    assert sub.row_offset == 5 and sub.shape == (5, 8) and sub.seed == grp.seed
    assert sub.col_src is grp.col_src and sub.noise_col is grp.noise_col and sub.col_sign is grp.col_sign
    assert sub.row_src.data_ptr() == grp.row_src[2:].data_ptr()
    for m, n in zip(sub.members, grp.members):
        assert torch.equal(m.row_scale, n.row_scale[2:7]) and m.col_scale is n.col_scale
        assert (m.fresh_value, m.sigma, m.sigma_fresh, m.stream) == (n.fresh_value, n.sigma, n.sigma_fresh,
                                                                      n.stream)
    sub = grp.cols(1, 4)
    assert sub.row_offset == 3 and sub.shape == (10, 3) and sub.row_src is grp.row_src
    assert torch.equal(sub.noise_col, grp.noise_col[1:4])
    assert all(torch.equal(m.col_scale, n.col_scale[1:4]) for m, n in zip(sub.members, grp.members))
    for lo, hi in ((-1, 2), (3, 2), (0, 11)):
        with pytest.raises(ValueError):
            grp.rows(lo, hi)
    with pytest.raises(ValueError):
        grp.cols(0, 9)
    with pytest.raises(ValueError, match="1-D"):
        make_group((4,), (6,)).cols(0, 1)
    positional = WidenGroup(grp.row_src, grp.col_src, grp.row_sign, grp.col_sign, grp.noise_col, 1, [])
    assert positional.members == [] and positional.row_offset == 0
    src = make_sources(grp, (4, 5), torch.float32)
    for bad in (-1, 2**32):
        grp.row_offset = bad
        with pytest.raises(ValueError, match="row_offset"):
            reference_widen(src[0], grp, grp.members[0])
        if AVAIL["cpu"] == "available":
            with pytest.raises(RuntimeError, match="row_offset"):
                resolve_backend("cpu", torch.device("cpu"))[0](src, grp)


# --- many groups in one call (the batch form; one CUDA launch per dtype) -------------------

def _batch_backend(name):
    _backend(name)
    fn, _ = resolve_backend(name, _device(name), batch=True)
    return fn


def make_batch(device="cpu", dtype=torch.float32):
    """Groups of odd shapes in one batch: 2-D and 1-D, smaller than a vector, over several
    chunks (70 x 129), six members (two jobs of at most four), an empty new tensor, a
    transposed source, and a group whose members mix bfloat16, float32 and float64."""
    six = [dict(fresh_value=0.1 * i, sigma=0.05 * (i % 2), sigma_fresh=0.02, stream=100 + i) for i in range(6)]
    specs = [((3, 4), (5, 7), None), ((9,), (17,), None), ((37, 61), (70, 129), six), ((3,), (1,), None),
             ((3, 4), (0, 7), None), ((8, 8), (16, 24), None)]
    items = []
    for k, (old, new, members) in enumerate(specs):
        grp = make_group(old, new, seed=1000 + k, gen_seed=k, members=members)
        srcs = make_sources(grp, old, dtype, device, gen_seed=k)
        items.append((srcs, grp))
    base = make_sources(items[-1][1], (8, 8), dtype, device, gen_seed=99)
    items[-1] = ([base[0].t(), base[1].t().to(torch.bfloat16), base[2].t().double()], items[-1][1])
    return items


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_matches_reference_and_each_group_alone(backend, dtype):
    """Each group's result meets the bound and is bit-identical to the same group
    widened alone: what a group is batched with does not change it."""
    many = _batch_backend(backend)
    items = make_batch(_device(backend), dtype)
    results = many(items)
    assert len(results) == len(items)
    for (srcs, grp), outs in zip(items, results):
        assert_matches_spec(outs, [s.cpu() for s in srcs], grp)
        alone = many([(srcs, grp)])[0]
        for a, b in zip(outs, alone):
            assert torch.equal(a, b)
    assert many([]) == []


def test_batch_independent_of_thread_count():
    many = _batch_backend("cpu")
    items = make_batch()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = many(items)
        torch.set_num_threads(2)
        two = many(items)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_batch_op_rejects_bad_arguments():
    _backend("cpu")
    from growkern.kernels.ext import groups_args
    items = make_batch()[:3]
    args = list(groups_args(items))
    bad = list(args)
    bad[1] = [args[1][0] + 1] + list(args[1][1:])  # group_sizes no longer adds up
    with pytest.raises(RuntimeError, match="one entry per member"):
        torch.ops.growkern.widen_groups(*bad)
    bad = list(args)
    bad[1] = [0] + list(args[1][1:])
    with pytest.raises(RuntimeError, match=r"group_sizes\[0\] = 0"):
        torch.ops.growkern.widen_groups(*bad)
    bad = list(args)
    bad[9] = [None] + list(args[9][1:])  # group 0 is 2-D but its first member has no col_scales
    with pytest.raises(RuntimeError, match="group 0 is 2-D"):
        torch.ops.growkern.widen_groups(*bad)
    bad = list(args)
    bad[7] = list(args[7][:-1])  # seeds: one too few
    with pytest.raises(RuntimeError, match="one entry per group"):
        torch.ops.growkern.widen_groups(*bad)
    bad = list(args)
    row_src = [t.clone() for t in args[2]]
    row_src[1][0] = 9  # out of range for group 1's 9 old rows
    bad[2] = row_src
    with pytest.raises(RuntimeError, match="group 1: .*out of range"):
        torch.ops.growkern.widen_groups(*bad)


def test_batch_op_fake_tensors():
    _backend("cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from growkern.kernels.ext import groups_args
    items = make_batch()
    real = groups_args(items)
    with FakeTensorMode() as mode:
        args = [[mode.from_tensor(t) if torch.is_tensor(t) else t for t in a] if isinstance(a, list) else a
                for a in real]
        outs = torch.ops.growkern.widen_groups(*args)
    want = [(tuple(g.shape), s.dtype) for srcs, g in items for s in srcs]
    assert [(tuple(o.shape), o.dtype) for o in outs] == want


# --- the op: torch.library, checks, fake tensors, torch.compile -----------------------------

def _op_args(srcs, grp):
    from growkern.kernels.ext import op_args
    return op_args(srcs, grp)


def test_op_is_registered_and_callable():
    _backend("cpu")
    grp = make_group((3, 4), (5, 7))
    srcs = make_sources(grp, (3, 4), torch.float32)
    outs = torch.ops.growkern.widen_group(*_op_args(srcs, grp))
    assert isinstance(outs, (list, tuple)) and len(outs) == 3
    assert_matches_spec(list(outs), srcs, grp)
    # empty new tensor
    grp0 = make_group((3, 4), (0, 7))
    outs = torch.ops.growkern.widen_group(*_op_args(make_sources(grp0, (3, 4), torch.float32), grp0))
    assert all(tuple(o.shape) == (0, 7) for o in outs)


def test_op_rejects_bad_arguments():
    _backend("cpu")
    grp = make_group((3, 4), (5, 7))
    srcs = make_sources(grp, (3, 4), torch.float32)
    bad = make_group((3, 4), (5, 7))
    bad.row_src = bad.row_src.clone()
    bad.row_src[0] = 3  # out of range for 3 old rows
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.growkern.widen_group(*_op_args(srcs, bad))
    bad = make_group((3, 4), (5, 7))
    bad.noise_col = bad.noise_col.clone()
    bad.noise_col[1] = -1
    with pytest.raises(RuntimeError, match="noise_col"):
        torch.ops.growkern.widen_group(*_op_args(srcs, bad))
    args = list(_op_args(srcs, grp))
    args[5] = args[5][:2]  # fresh_values: one too few
    with pytest.raises(RuntimeError, match="one entry per"):
        torch.ops.growkern.widen_group(*args)
    args = list(_op_args(srcs, grp))
    args[11] = 2**32  # seed
    with pytest.raises(RuntimeError, match="seed"):
        torch.ops.growkern.widen_group(*args)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.growkern.widen_group(*_op_args([s[0] for s in srcs], grp))


def test_op_fake_tensor_and_compile():
    _backend("cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode
    grp = make_group((3, 4), (5, 7))
    srcs = make_sources(grp, (3, 4), torch.bfloat16)
    with FakeTensorMode() as mode:
        fake_args = list(_op_args([mode.from_tensor(s) for s in srcs], grp))
        for i in (1, 2, 8, 9, 10):
            fake_args[i] = mode.from_tensor(fake_args[i])
        fake_args[3] = [mode.from_tensor(t) for t in fake_args[3]]
        fake_args[4] = [mode.from_tensor(t) for t in fake_args[4]]
        outs = torch.ops.growkern.widen_group(*fake_args)
        assert [tuple(o.shape) for o in outs] == [(5, 7)] * 3
        assert all(o.dtype == torch.bfloat16 for o in outs)

    args = _op_args(srcs, grp)

    def f(a, b, c):
        outs = torch.ops.growkern.widen_group([a, b, c], *args[1:])
        return outs[0] * 2, outs[1], outs[2]

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(*srcs)
    want = f(*srcs)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_auto_resolution():
    _, name = resolve_backend("auto", torch.device("cpu"))
    assert name == ("cpu" if AVAIL["cpu"] == "available" else "reference")
    with pytest.raises(ValueError):
        resolve_backend("nope", torch.device("cpu"))
    for k, v in backends().items():
        assert v == "available" or len(v) > 10, (k, v)


# --- widen_ end to end, and the fallback when the extension is absent --------------------------

def _grown_state(backend, device, strategy):
    from growkern import GPT, GPTConfig, widen_
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=37, block_size=8, n_layer=2, n_head=2, d_model=12, d_ff=20)).to(device)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(1)).to(device)
    _, loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    rep = widen_(m, opt, factor=2, strategy=strategy, seed=5, backend=backend)
    state = {n: p.detach().cpu().clone() for n, p in m.named_parameters()}
    for n, p in m.named_parameters():
        for k, v in opt.state[p].items():
            if k != "step":
                state[f"{n}.{k}"] = v.cpu().clone()
    # the grown model trains on
    _, loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    return rep, state


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("strategy", ["exact_copy", "perturb"])
def test_widen_end_to_end_matches_reference_backend(backend, strategy):
    """A whole growth (every parameter and AdamW moment, noise included) with each
    backend equals the reference backend's to float32 rounding: within 2^-20 of each
    tensor's largest entry (the bound above, where noise nearly cancels the base)."""
    _backend(backend)
    rep, got = _grown_state(backend, _device(backend), strategy)
    assert rep.backend == backend
    _, want = _grown_state("reference", torch.device("cpu"), strategy)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2.0**-20, atol=2.0**-20 * float(want[k].abs().max()),
                                   msg=k)


def test_fallback_when_the_extension_is_absent(monkeypatch):
    """No growkern._C: backends() says why, 'auto' falls back to the reference with one
    warning, asking for 'cpu' is a clear error, and widen_ still works."""
    import importlib
    B = importlib.import_module("growkern.kernels.backends")
    from growkern.kernels import ext
    monkeypatch.setattr(ext, "_state", {"mod": None, "err": "growkern._C is not importable: simulated"})
    monkeypatch.setattr(B, "_cache", {})
    monkeypatch.setattr(B, "_warned", set())
    why = B.backends()
    assert why["reference"] == "available" and "simulated" in why["cpu"] and "simulated" in why["cuda"]
    with pytest.warns(RuntimeWarning, match="using the reference"):
        _, name = B.resolve_backend("auto", torch.device("cpu"))
    assert name == "reference"
    with pytest.raises(ValueError, match="backend 'cpu' is not available: .*simulated"):
        B.resolve_backend("cpu", torch.device("cpu"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already
        rep, _ = _grown_state("auto", torch.device("cpu"), "exact_copy")
    assert rep.backend == "reference"


_GPU_COMPILE = r'''
import os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from growkern.kernels import widen_triton as wt
for dt, two_d in (("bf16", True), ("fp64", False)):
    acc = "fp64" if dt == "fp64" else "fp32"
    sig = {"src_ptr": f"*{dt}", "dst_ptr": f"*{dt}", "row_src_ptr": "*i64", "col_src_ptr": "*i64",
           "noise_col_ptr": "*i64", "row_sign_ptr": f"*{acc}", "col_sign_ptr": f"*{acc}",
           "row_scale_ptr": f"*{acc}", "col_scale_ptr": f"*{acc}", "fpar_ptr": "*fp64", "key_ptr": "*i64",
           "numel": "i64", "C": "i64", "s0": "i64", "s1": "i64", "TWO_D": "constexpr", "NOISY": "constexpr",
           "F64": "constexpr", "INTERPRET": "constexpr", "BLOCK": "constexpr"}
    const = {"TWO_D": two_d, "NOISY": True, "F64": dt == "fp64", "INTERPRET": False, "BLOCK": 1024}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(13)}
    k = triton.compile(ASTSource(wt._widen_member_kernel, sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32))
    stores = re.findall(r"st\.global(?:\.\w+)*", k.asm["ptx"])
    assert any(".v4" in s or ".v2" in s for s in stores), stores  # 16-byte stores
print("ok")
'''


def test_triton_kernel_compiles_for_gpu():
    """The GPU path (libdevice log1p/sinpi/cospi, sqrt_rn, uint32 Philox) compiles to
    sm_90 PTX with vectorized stores; no GPU needed. Runs in a subprocess because this
    module interprets Triton."""
    _backend("triton")
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _GPU_COMPILE], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("triton has no ptxas here")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


_ISA_RUN = r"""
import hashlib, sys, torch, growkern
from growkern.kernels import ext
torch.manual_seed(0)
digests = []
for dtype in (torch.float32, torch.bfloat16):
    m = growkern.GPT(growkern.GPTConfig(d_model=20, n_head=2, n_layer=1, d_ff=36, vocab_size=37,
                                        block_size=8)).to(dtype)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randint(0, 37, (2, 9))
    m(x[:, :-1], x[:, 1:])[1].backward()
    opt.step()
    growkern.widen_(m, opt, factor=2.5, strategy="perturb", seed=7, backend="cpu")
    h = hashlib.sha256()
    for name, p in sorted(m.named_parameters()):
        h.update(p.detach().view(-1).view(torch.uint8).numpy().tobytes())
    digests.append(h.hexdigest())
print(ext.cpu_isa()[0], ext.cpu_isa()[1], *digests)
"""


def test_cpu_instruction_sets_give_the_same_bits():
    """widen_ on the cpu backend grows to the same bits whichever instruction set draws the
    normals (GROWKERN_CPU_ISA caps it; tensor widths 50 and 90 leave tails of every vector
    width), float32 and bfloat16; the cap is honoured and a bad value is one clear error."""
    import subprocess
    import sys
    if backends()["cpu"] != "available":
        pytest.skip(backends()["cpu"])
    runs = {}
    for cap in ("scalar", "avx2", "avx512"):
        env = {**os.environ, "GROWKERN_CPU_ISA": cap}
        proc = subprocess.run([sys.executable, "-c", _ISA_RUN], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        used, best, *digests = proc.stdout.split()
        order = ["scalar", "avx2", "avx512"]
        assert used == order[min(order.index(cap), order.index(best))]
        runs[used] = digests
    assert len(set(map(tuple, runs.values()))) == 1, runs
    env = {**os.environ, "GROWKERN_CPU_ISA": "sse9"}
    proc = subprocess.run([sys.executable, "-c", _ISA_RUN], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "GROWKERN_CPU_ISA must be one of scalar, avx2, avx512" in proc.stderr
