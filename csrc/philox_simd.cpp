// Lane-parallel float32 normals (philox_simd.h): AVX-512 and AVX2 copies of
// philox_simd_lanes.inc, each compiled for its own instruction set inside a GCC
// target region, and a run-time choice between them and the scalar loop. Only GCC
// on x86-64 builds the SIMD copies; elsewhere the scalar loop (philox.h) runs.
#include "philox_simd.h"

#include <stdlib.h>
#include <initializer_list>
#include <string.h>

#include "philox.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GK_X86_SIMD 1
#include <immintrin.h>
#else
#define GK_X86_SIMD 0
#endif

namespace growkern {

#if GK_X86_SIMD

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct V {
  static constexpr int W = 8;
  using u = __m256i;
  using f = __m256;
  using m = __m256i;  // all-ones lanes
  static u set1(uint32_t x) { return _mm256_set1_epi32((int)x); }
  static f fset1(float x) { return _mm256_set1_ps(x); }
  static u iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static u add(u a, u b) { return _mm256_add_epi32(a, b); }
  static u sub(u a, u b) { return _mm256_sub_epi32(a, b); }
  static u mullo(u a, u b) { return _mm256_mullo_epi32(a, b); }
  static u bxor(u a, u b) { return _mm256_xor_si256(a, b); }
  static u band(u a, u b) { return _mm256_and_si256(a, b); }
  static u bor(u a, u b) { return _mm256_or_si256(a, b); }
  static u srli(u a, int k) { return _mm256_srli_epi32(a, k); }
  static u slli1(u a) { return _mm256_slli_epi32(a, 1); }
  static u sllv(u a, u k) { return _mm256_sllv_epi32(a, k); }
  static m top_bit(u a) { return _mm256_srai_epi32(a, 31); }
  static m bit29(u a) { return _mm256_srai_epi32(_mm256_slli_epi32(a, 2), 31); }
  static m is_zero(u a) { return _mm256_cmpeq_epi32(a, _mm256_setzero_si256()); }
  static m lt_u32(u a, u b) {
    const u flip = set1(0x80000000u);
    return _mm256_cmpgt_epi32(bxor(b, flip), bxor(a, flip));
  }
  static u select(m k, u t, u e) { return _mm256_blendv_epi8(e, t, k); }
  static f fselect(m k, f t, f e) { return _mm256_blendv_ps(e, t, _mm256_castsi256_ps(k)); }
  // lo and hi words of a * b per lane: even lanes from one 32x32->64 multiply,
  // odd lanes from another on the shifted operand
  static void mulhilo(u a, u b, u* lo, u* hi) {
    const u even = _mm256_mul_epu32(a, b);
    const u odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
  static f cvt(u a) { return _mm256_cvtepi32_ps(a); }
  static u bits(f a) { return _mm256_castps_si256(a); }
  static f from_bits(u a) { return _mm256_castsi256_ps(a); }
  static f mul(f a, f b) { return _mm256_mul_ps(a, b); }
  static f fadd(f a, f b) { return _mm256_add_ps(a, b); }
  static f neg(f a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static f fma(f a, f b, f c) { return _mm256_fmadd_ps(a, b, c); }
  static f sqrt(f a) { return _mm256_sqrt_ps(a); }
  static u load_u32(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static u load_cols(const int64_t* p) {  // the low words of 8 int64
    const u idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const u a = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), idx);
    const u b = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4)), idx);
    return _mm256_permute2x128_si256(a, b, 0x20);
  }
  static void store(float* p, f a) { _mm256_storeu_ps(p, a); }
};
#include "philox_simd_lanes.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own avx512fintrin.h
namespace avx512 {
struct V {
  static constexpr int W = 16;
  using u = __m512i;
  using f = __m512;
  using m = __mmask16;
  static u set1(uint32_t x) { return _mm512_set1_epi32((int)x); }
  static f fset1(float x) { return _mm512_set1_ps(x); }
  static u iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static u add(u a, u b) { return _mm512_add_epi32(a, b); }
  static u sub(u a, u b) { return _mm512_sub_epi32(a, b); }
  static u mullo(u a, u b) { return _mm512_mullo_epi32(a, b); }
  static u bxor(u a, u b) { return _mm512_xor_si512(a, b); }
  static u band(u a, u b) { return _mm512_and_si512(a, b); }
  static u bor(u a, u b) { return _mm512_or_si512(a, b); }
  static u srli(u a, int k) { return _mm512_srli_epi32(a, k); }
  static u slli1(u a) { return _mm512_slli_epi32(a, 1); }
  static u sllv(u a, u k) { return _mm512_sllv_epi32(a, k); }
  static m top_bit(u a) { return _mm512_cmplt_epi32_mask(a, _mm512_setzero_si512()); }
  static m bit29(u a) { return _mm512_test_epi32_mask(a, set1(1u << 29)); }
  static m is_zero(u a) { return _mm512_testn_epi32_mask(a, a); }
  static m lt_u32(u a, u b) { return _mm512_cmplt_epu32_mask(a, b); }
  static u select(m k, u t, u e) { return _mm512_mask_blend_epi32(k, e, t); }
  static f fselect(m k, f t, f e) { return _mm512_mask_blend_ps(k, e, t); }
  static void mulhilo(u a, u b, u* lo, u* hi) {
    const u even = _mm512_mul_epu32(a, b);
    const u odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  }
  static f cvt(u a) { return _mm512_cvtepi32_ps(a); }
  static u bits(f a) { return _mm512_castps_si512(a); }
  static f from_bits(u a) { return _mm512_castsi512_ps(a); }
  static f mul(f a, f b) { return _mm512_mul_ps(a, b); }
  static f fadd(f a, f b) { return _mm512_add_ps(a, b); }
  static f neg(f a) { return from_bits(bxor(bits(a), set1(0x80000000u))); }
  static f fma(f a, f b, f c) { return _mm512_fmadd_ps(a, b, c); }
  static f sqrt(f a) { return _mm512_sqrt_ps(a); }
  static u load_u32(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static u load_cols(const int64_t* p) {  // the low words of 16 int64
    const __m256i a = _mm512_cvtepi64_epi32(_mm512_loadu_si512(p));
    const __m256i b = _mm512_cvtepi64_epi32(_mm512_loadu_si512(p + 8));
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
  }
  static void store(float* p, f a) { _mm512_storeu_ps(p, a); }
};
#include "philox_simd_lanes.inc"
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // GK_X86_SIMD

namespace {

void normals_scalar(uint32_t seed, uint32_t stream, uint32_t row0, uint32_t row_step, const int64_t* cols,
                    int64_t n, float* out) {
  uint32_t row = row0;
  for (int64_t i = 0; i < n; ++i, row += row_step)
    out[i] = philox_normal_f32(seed, stream, row, cols ? (uint32_t)cols[i] : 0u);
}

CpuIsa detect() {
  CpuIsa best = CpuIsa::Scalar;
#if GK_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::Avx2;
  if (best == CpuIsa::Avx2 && __builtin_cpu_supports("avx512f")) best = CpuIsa::Avx512;
#endif
  return best;
}

}  // namespace

CpuIsa cpu_isa_max() {
  static const CpuIsa isa = detect();
  return isa;
}

bool cpu_isa_supported(CpuIsa isa) { return (int)isa <= (int)cpu_isa_max(); }

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    default: return "scalar";
  }
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa best = cpu_isa_max();
    const char* cap = getenv("GROWKERN_CPU_ISA");
    if (cap) {
      for (CpuIsa c : {CpuIsa::Scalar, CpuIsa::Avx2, CpuIsa::Avx512})
        if (strcmp(cap, cpu_isa_name(c)) == 0 && (int)c < (int)best) best = c;
    }
    return best;
  }();
  return isa;
}

void philox_normals_f32(CpuIsa isa, uint32_t seed, uint32_t stream, uint32_t row0, uint32_t row_step,
                        const int64_t* cols, int64_t n, float* out) {
  if (n <= 0) return;
#if GK_X86_SIMD
  if (isa == CpuIsa::Avx512 && cpu_isa_supported(isa)) return avx512::normals(seed, stream, row0, row_step, cols, n, out);
  if (isa == CpuIsa::Avx2 && cpu_isa_supported(isa)) return avx2::normals(seed, stream, row0, row_step, cols, n, out);
#endif
  (void)isa;
  normals_scalar(seed, stream, row0, row_step, cols, n, out);
}

void philox_normals_f32(uint32_t seed, uint32_t stream, uint32_t row0, uint32_t row_step, const int64_t* cols,
                        int64_t n, float* out) {
  philox_normals_f32(cpu_isa(), seed, stream, row0, row_step, cols, n, out);
}

void box_muller_f32(CpuIsa isa, const uint32_t* x0, const uint32_t* x1, int64_t n, float* out) {
#if GK_X86_SIMD
  if (isa == CpuIsa::Avx512 && cpu_isa_supported(isa)) return avx512::box_muller_words(x0, x1, n, out);
  if (isa == CpuIsa::Avx2 && cpu_isa_supported(isa)) return avx2::box_muller_words(x0, x1, n, out);
#endif
  (void)isa;
  for (int64_t i = 0; i < n; ++i) out[i] = sqrtf(bm_radius2_f32(x0[i])) * bm_cos_f32(x1[i]);
}

}  // namespace growkern
