"""The counter-based noise of growkern.philox: Random123's known-answer vectors,
the spec's input checks, and statistical sanity of the normals it draws.
(The kernels' bit-identity to this reference is in tests/test_kernels.py.)"""
import math

import numpy as np
import pytest

from growkern.kernels import philox

# Random123 kat_vectors, philox4x32_10: (counter, key, expected)
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_known_answer_vectors(ctr, key, want):
    got = philox.philox4x32(ctr, key)
    assert tuple(int(x) for x in got) == want
    assert all(x.dtype == np.uint32 for x in got)


def test_vectorized_matches_scalar():
    rng = np.random.default_rng(0)
    ctr = [rng.integers(0, 2**32, 64, dtype=np.uint64) for _ in range(4)]
    key = (0x12345678, 0x9ABCDEF0)
    vec = philox.philox4x32(ctr, key)
    for i in range(64):
        one = philox.philox4x32([int(c[i]) for c in ctr], key)
        assert tuple(int(v[i]) for v in vec) == tuple(int(x) for x in one)


def test_normal_is_the_documented_transform():
    rows, cols = np.arange(50), np.arange(50)[::-1]
    x0, x1, _, _ = philox.philox4x32((rows, cols, 0, 0), (3, 4))
    u1 = (x0.astype(np.float64) + 1) * 2.0**-32
    u2 = x1.astype(np.float64) * 2.0**-32
    want = np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)
    np.testing.assert_array_equal(philox.normal(3, 4, rows, cols), want)


def test_input_checks():
    with pytest.raises(ValueError):
        philox.normal(-1, 0, [0], [0])
    with pytest.raises(ValueError):
        philox.normal(0, 2**32, [0], [0])
    with pytest.raises(ValueError):
        philox.normal(0, 0, [-1], [0])
    with pytest.raises(ValueError):
        philox.normal(0, 0, [0], [-2])
    assert np.isfinite(philox.normal(2**32 - 1, 2**32 - 1, [2**32 - 1], [2**32 - 1])).all()


def _normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def test_normal_statistics():
    """Deterministic draws, so fixed outcomes; thresholds are ~4-5 sigma of the statistics."""
    n_r, n_c = 400, 500
    z = philox.normal(20240601, 7, np.arange(n_r)[:, None], np.arange(n_c)[None, :]).ravel()
    n = z.size
    assert np.isfinite(z).all()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((np.abs(z) < 1).mean() - 0.682689492) < 5 * math.sqrt(0.2166 / n)
    s = np.sort(z[:20000])
    ks = np.max(np.abs(_normal_cdf(s) - np.arange(1, s.size + 1) / s.size))
    assert ks < 1.95 / math.sqrt(s.size)  # 0.1% critical value of Kolmogorov-Smirnov
    # skewness and kurtosis
    assert abs((z**3).mean()) < 5 * math.sqrt(15 / n)
    assert abs((z**4).mean() - 3) < 5 * math.sqrt(96 / n)


def test_streams_rows_and_columns_are_uncorrelated():
    n = 100000
    rows = np.arange(n)
    a = philox.normal(1, 10, rows, 0)
    b = philox.normal(1, 11, rows, 0)  # neighbouring stream
    c = philox.normal(1, 10, rows, 1)  # neighbouring column
    d = philox.normal(2, 10, rows, 0)  # neighbouring seed
    for other in (b, c, d):
        assert abs(np.corrcoef(a, other)[0, 1]) < 5 / math.sqrt(n)
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 5 / math.sqrt(n)  # neighbouring rows


def test_words_are_uniform():
    n = 1 << 16
    x0, x1, x2, x3 = philox.philox4x32((np.arange(n), 5, 0, 0), (9, 9))
    for w in (x0, x1, x2, x3):
        counts = np.bincount((w >> 24).astype(np.int64), minlength=256)
        chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
        assert chi2 < 255 + 5 * math.sqrt(2 * 255)
