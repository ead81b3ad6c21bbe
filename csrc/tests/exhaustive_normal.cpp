// The float32 normal's two factors against double over every 32-bit word: the
// measurement behind the error figures of csrc/philox.h and docs/growth.md. Not a
// ctest (about 2 minutes on one core):
//   cmake -S . -B BUILD && cmake --build BUILD && BUILD/exhaustive_normal
#include <math.h>
#include <stdio.h>

#include "philox.h"

using namespace growkern;

int main() {
  // sqrt(-2 ln u1), u1 = (x0 + 1) 2^-32; the double reference uses log1p near u1 = 1
  double worst_r = 0;
  uint32_t at_r = 0;
  long zero_bad = 0;
  for (uint64_t w = 0; w <= 0xFFFFFFFFull; ++w) {
    const uint32_t x0 = (uint32_t)w;
    const double want2 = x0 >= 0x80000000u ? -2.0 * log1p(-(double)(0xFFFFFFFFu - x0) * 0x1p-32)
                                           : -2.0 * log(((double)x0 + 1.0) * 0x1p-32);
    const float got = sqrtf(bm_radius2_f32(x0));
    if (want2 == 0) {
      zero_bad += got != 0;
      continue;
    }
    const double want = sqrt(want2), err = fabs(got - want) / want;
    if (err > worst_r) worst_r = err, at_r = x0;
  }
  // cos(2 pi x1 2^-32): the reference reduces the angle exactly as the code does (the
  // reduction is exact integer work) and evaluates sin/cos(pi t) in double
  double worst_c = 0;
  uint32_t at_c = 0;
  for (uint64_t w = 0; w <= 0xFFFFFFFFull; ++w) {
    const uint32_t x1 = (uint32_t)w;
    const uint32_t q = x1 >> 30, f = x1 & 0x3FFFFFFFu;
    const bool fold = f >= 0x20000000u;
    const double t = (double)(fold ? 0x40000000u - f : f) * 0x1p-31;
    double want = (fold != (bool)(q & 1u)) ? sin(M_PI * t) : cos(M_PI * t);
    if (q == 1u || q == 2u) want = -want;
    const float got = bm_cos_f32(x1);
    if (want == 0) {
      zero_bad += got != 0;
      continue;
    }
    const double err = fabs(got - want) / fabs(want);
    if (err > worst_c) worst_c = err, at_c = x1;
  }
  printf("radius sqrt(-2 ln u1): worst relative error %.3g = %.2f x 2^-23 (x0 = %08x)\n", worst_r,
         worst_r * 0x1p23, at_r);
  printf("cos(2 pi u2):          worst relative error %.3g = %.2f x 2^-23 (x1 = %08x)\n", worst_c,
         worst_c * 0x1p23, at_c);
  printf("exact zeros not reproduced: %ld\n", zero_bad);
  return zero_bad || worst_r > 0x1p-22 || worst_c > 0x1p-22;
}
