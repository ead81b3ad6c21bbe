// Philox4x32-10 and the Box-Muller normal of growkern.philox, for host C++ and CUDA.
//
// The specification is growkern/kernels/philox.py:
//     key     = (seed, stream)          counter = (row, col, 0, 0)
//     x0, x1, _, _ = Philox4x32-10(counter, key)
//     u1 = (x0 + 1) * 2^-32             u2 = x1 * 2^-32
//     z  = sqrt(-2 ln u1) * cos(2 pi u2)
// The integer words are bit-identical to the reference on every backend. The
// float32 normal is one sequence of IEEE operations (exact integer reductions,
// fused multiply-adds, a correctly rounded sqrt), so the host loop, its SIMD lanes
// (philox_simd.h) and CUDA give the same bits, and z keeps a small *relative*
// error everywhere:
//   * ln u1 = log1p(f) - k ln 2 with u1 = 2^-k (1 + f), k and f read exactly from
//     the integer x0 + 1, so z near 0 (u1 near 1) is accurate;
//   * cos(2 pi u2): the angle is reduced exactly in integers (quadrant = top two
//     bits of x1, octant fold by 2^30 - f), leaving an argument in [0, pi/4]
//     whose cos or sin is a short polynomial, so z near a zero of the cosine is
//     accurate too.
// Over all 2^32 words the radius is within 1.00 x 2^-23 and the cosine within
// 1.44 x 2^-23 of exact (relative). The float64 normal (for float64 tensors) uses
// the C library's log/log1p/sin/cos (CUDA: log1p, sincospi).
// No ATen dependency: the CMake unit test builds it with a plain C++ compiler.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GK_HD __host__ __device__ __forceinline__
#else
#define GK_HD inline
#endif

namespace growkern {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t x[4];
};

GK_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(p >> 32);
  return (uint32_t)p;
#endif
}

// Philox4x32 with `rounds` rounds (10 for Philox4x32-10), Random123's layout.
GK_HD Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                         uint32_t k0, uint32_t k1, int rounds = 10) {
  for (int i = 0; i < rounds; ++i) {
    if (i) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Philox4 r;
  r.x[0] = c0;
  r.x[1] = c1;
  r.x[2] = c2;
  r.x[3] = c3;
  return r;
}

// The two words the normal uses: x0, x1 of Philox4x32-10((row, col, 0, 0), (seed, stream)).
GK_HD void philox_words2(uint32_t seed, uint32_t stream, uint32_t row, uint32_t col,
                         uint32_t* x0, uint32_t* x1) {
  const Philox4 p = philox4x32(row, col, 0u, 0u, seed, stream);
  *x0 = p.x[0];
  *x1 = p.x[1];
}

// ---- Box-Muller, float32 ----------------------------------------------------

// float <-> its bits (also used by the 16-bit conversions of widen_core.h)
GK_HD uint32_t f32_as_u32(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}
GK_HD float u32_as_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// -2 ln u1, u1 = (x0 + 1) 2^-32, in float32 with fused multiply-adds only, so the
// host, its SIMD lanes (philox_simd.cpp) and CUDA compute the same bits.
// u1 = 2^-k (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)): k and f come exactly from
// integers (s = n << k read as int32 is (1 + f) 2^32 - 2^32 for n = x0 + 1), so f
// carries one rounding and ln u1 = log1p(f) - k ln 2 is accurate relative to itself
// also near u1 = 1; log1p is Cephes' logf polynomial on that interval.
// Every multiply-add is an explicit fmaf and no product feeds a plain add: compilers
// fuse such pairs (GCC's default -ffp-contract=fast, nvcc's --fmad) only where the
// target has FMA, which would make the SIMD lanes, CUDA and the scalar loop differ.
constexpr uint32_t kBmSqrtHalf32 = 0xB504F334u;  // ceil(2^32 / sqrt(2))

GK_HD float bm_radius2_f32(uint32_t x0) {
  const uint32_t n = x0 + 1u;  // 0 for u1 = 1
  // k0 = 31 - floor(log2 n) (0 when the top bit is set), from the exponent of
  // float(n | 1); a rounding up to the next power of two makes k0 one short, which
  // the test against 2^32 / sqrt(2) then adds, so k is exact either way.
  const uint32_t e = f32_as_u32((float)(int32_t)(n | 1u)) >> 23;
  const uint32_t k0 = (n >> 31) ? 0u : 158u - e;
  const uint32_t s0 = n << k0;
  const bool lt = s0 < kBmSqrtHalf32;
  const uint32_t k = lt ? k0 + 1u : k0;
  const uint32_t s = lt ? s0 << 1 : s0;          // (1 + f) 2^32 mod 2^32
  const float f = (float)(int32_t)s * 0x1p-32f;  // in [-0.2929, 0.4142]
  const float ek = -(float)k;
  float p = 7.0376836292e-2f;
  p = fmaf(p, f, -1.1514610310e-1f);
  p = fmaf(p, f, 1.1676998740e-1f);
  p = fmaf(p, f, -1.2420140846e-1f);
  p = fmaf(p, f, 1.4249322787e-1f);
  p = fmaf(p, f, -1.6668057665e-1f);
  p = fmaf(p, f, 2.0000714765e-1f);
  p = fmaf(p, f, -2.4999993993e-1f);
  p = fmaf(p, f, 3.3333331174e-1f);
  const float z = f * f;
  float y = (p * f) * z;
  y = fmaf(ek, -2.12194440e-4f, y);  // ln 2 = 0.693359375 - 2.12194440e-4
  y = fmaf(-0.5f, z, y);
  float r = f + y;
  r = fmaf(ek, 0.693359375f, r);
  return n == 0u ? 0.0f : -2.0f * r;
}

// cos(2 pi x1 2^-32) with exact integer reduction: angle = (q + f 2^-30) pi/2,
// folded to phi = t pi with t in [0, 1/4], and Taylor polynomials of cos(pi t)
// and sin(pi t) there (the next terms are below 2^-32), both evaluated and one
// picked without a branch (the choice is random, a branch mispredicts).
GK_HD float bm_cos_f32(uint32_t x1) {
  const uint32_t f = x1 & 0x3FFFFFFFu;  // 30 bits
  const bool fold = (x1 >> 29) & 1u;    // past pi/4 within the quadrant
  const uint32_t g = fold ? 0x40000000u - f : f;  // in [0, 2^29]
  const float t = (float)(int32_t)g * 0x1p-31f;   // angle/pi in [0, 1/4]
  const bool use_sin = ((x1 >> 29) ^ (x1 >> 30)) & 1u;
  const uint32_t neg = (x1 ^ (x1 << 1)) & 0x80000000u;  // quadrants 1 and 2
  const float t2 = t * t;
  float ps = fmaf(t2, -0.00737043094f, 0.0821458867f);
  ps = fmaf(t2, ps, -0.599264529f);
  ps = fmaf(t2, ps, 2.55016404f);
  ps = fmaf(t2, ps, -5.16771278f);
  ps = fmaf(t2, ps, 3.14159265f);
  const float s = t * ps;
  float pc = fmaf(t2, -0.0258068914f, 0.235330630f);
  pc = fmaf(t2, pc, -1.33526277f);
  pc = fmaf(t2, pc, 4.05871213f);
  pc = fmaf(t2, pc, -4.93480220f);
  const float c = fmaf(t2, pc, 1.0f);
  const float v = use_sin ? s : c;
  return u32_as_f32(f32_as_u32(v) ^ neg);
}

GK_HD float philox_normal_f32(uint32_t seed, uint32_t stream, uint32_t row, uint32_t col) {
  uint32_t x0, x1;
  philox_words2(seed, stream, row, col, &x0, &x1);
  return sqrtf(bm_radius2_f32(x0)) * bm_cos_f32(x1);
}

// ---- Box-Muller, float64 (for float64 tensors) --------------------------------

GK_HD double bm_radius2_f64(uint32_t x0) {
  if (x0 >= 0x80000000u) {
    const uint32_t d = 0xFFFFFFFFu - x0;
    return -2.0 * log1p(-(double)d * 0x1p-32);
  }
  return -2.0 * log(((double)x0 + 1.0) * 0x1p-32);
}

GK_HD double bm_cos_f64(uint32_t x1) {
  const uint32_t q = x1 >> 30;
  const uint32_t f = x1 & 0x3FFFFFFFu;
  const bool fold = f >= 0x20000000u;
  const uint32_t g = fold ? 0x40000000u - f : f;
  const double t = (double)g * 0x1p-31;  // exact
  const bool use_sin = fold != (bool)(q & 1u);
  const bool neg = (q == 1u) || (q == 2u);
#if defined(__CUDA_ARCH__)
  double s, c;
  sincospi(t, &s, &c);
  const double v = use_sin ? s : c;
#else
  const double a = t * 3.141592653589793238462643383279502884;
  const double v = use_sin ? sin(a) : cos(a);
#endif
  return neg ? -v : v;
}

GK_HD double philox_normal_f64(uint32_t seed, uint32_t stream, uint32_t row, uint32_t col) {
  uint32_t x0, x1;
  philox_words2(seed, stream, row, col, &x0, &x1);
  return sqrt(bm_radius2_f64(x0)) * bm_cos_f64(x1);
}

// Overloads picked by the accumulate type of a kernel.
GK_HD float philox_normal(uint32_t seed, uint32_t stream, uint32_t row, uint32_t col, float) {
  return philox_normal_f32(seed, stream, row, col);
}
GK_HD double philox_normal(uint32_t seed, uint32_t stream, uint32_t row, uint32_t col, double) {
  return philox_normal_f64(seed, stream, row, col);
}

}  // namespace growkern
