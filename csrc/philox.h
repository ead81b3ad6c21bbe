// Philox4x32-10 and the Box-Muller normal of growkern.philox, for host C++ and CUDA.
//
// The specification is growkern/kernels/philox.py:
//     key     = (seed, stream)          counter = (row, col, 0, 0)
//     x0, x1, _, _ = Philox4x32-10(counter, key)
//     u1 = (x0 + 1) * 2^-32             u2 = x1 * 2^-32
//     z  = sqrt(-2 ln u1) * cos(2 pi u2)
// The integer words are bit-identical to the reference on every backend. The
// float part is evaluated so that z keeps a small *relative* error everywhere:
//   * ln u1: on CUDA, for x0 >= 2^31 (u1 > 1/2) it is log1p(-d * 2^-32) with the
//     exact integer d = 2^32 - 1 - x0; on the host, double log of the exact u1.
//     Either way z near 0 (u1 near 1) is accurate;
//   * cos(2 pi u2): the angle is reduced exactly in integers (quadrant = top two
//     bits of x1, octant fold by 2^30 - f), leaving an argument in [0, pi/4]
//     whose cos/sin is evaluated with sinpi/cospi (CUDA) or a short polynomial
//     (host), so z near a zero of the cosine is accurate too.
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

// -2 ln u1, u1 = (x0 + 1) 2^-32, accurate to a few float32 ulps relative.
GK_HD float bm_radius2_f32(uint32_t x0) {
#if !defined(__CUDA_ARCH__)
  // Host: u1 is exact in double and double log is accurate relative to ln u1 even
  // near u1 = 1, so one call covers both branches below, at half of logf's cost.
  return (float)(-2.0 * log(((double)x0 + 1.0) * 0x1p-32));
#else
  if (x0 >= 0x80000000u) {
    // u1 = 1 - d 2^-32 > 1/2, d exact; d = 0 gives u1 = 1, radius 0 (as the reference).
    const uint32_t d = 0xFFFFFFFFu - x0;
    return -2.0f * log1pf(-(float)d * 0x1p-32f);
  }
  // u1 <= 1/2: x0 + 1 fits in 32 bits; ln u1 <= -ln 2 is far from 0.
  return -2.0f * logf((float)(x0 + 1u) * 0x1p-32f);
#endif
}

// cos(2 pi x1 2^-32) with exact integer reduction.
GK_HD float bm_cos_f32(uint32_t x1) {
  const uint32_t q = x1 >> 30;          // quadrant: angle = (q + f 2^-30) pi/2
  const uint32_t f = x1 & 0x3FFFFFFFu;  // 30 bits
  const bool fold = f >= 0x20000000u;   // past pi/4 within the quadrant
  const uint32_t g = fold ? 0x40000000u - f : f;  // in [0, 2^29], exact
  const float t = (float)g * 0x1p-31f;  // g 2^-31: angle/pi in [0, 1/4], exact scaling
  // cos(angle) = +-cos(phi) or +-sin(phi), phi = t pi: only one of them is needed
  const bool use_sin = fold != (bool)(q & 1u);
  const bool neg = (q == 1u) || (q == 2u);
#if defined(__CUDA_ARCH__)
  float s, c;
  sincospif(t, &s, &c);
  const float v = use_sin ? s : c;
  return neg ? -v : v;
#else
  // Host: Taylor polynomials in t of cos(pi t) and sin(pi t) on [0, 1/4] (the
  // next terms are below 2^-32), within 3 float32 ulps; both are evaluated and
  // one is picked without a branch (the choice is random, a branch mispredicts):
  // ten times faster than cosf/sinf, whose range reduction is not needed here.
  const float t2 = t * t;
  const float s = t * (3.14159265f + t2 * (-5.16771278f + t2 * (2.55016404f + t2 * (-0.599264529f +
                                                                   t2 * (0.0821458867f - t2 * 0.00737043094f)))));
  const float c = 1.0f + t2 * (-4.93480220f + t2 * (4.05871213f + t2 * (-1.33526277f +
                                                                   t2 * (0.235330630f - t2 * 0.0258068914f))));
  const float v = use_sin ? s : c;
  return u32_as_f32(f32_as_u32(v) ^ ((uint32_t)neg << 31));
#endif
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
