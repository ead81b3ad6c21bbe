// The per-element core of growkern's widen primitive (growkern/kernels/spec.py),
// on raw pointers, shared by the CPU kernel (widen_core.cpp), the CUDA kernel
// (widen_cuda.cu) and the CMake unit test. No ATen dependency.
//
// For the new tensor's entry (r, c) and one member m of a group:
//     ok    = row_src[r] >= 0 && col_src[c] >= 0
//     base  = ok ? src[row_src[r], col_src[c]] * row_scale[r] * col_scale[c] : fresh_value
//     coef  = ok ? sigma * row_sign[r] * col_sign[c] : sigma_fresh
//     dst   = noisy ? base + coef * N(seed, stream, r + row_offset, noise_col[c]) : base
// with noisy = (sigma != 0 || sigma_fresh != 0), all in acc_t (float for
// float32/float16/bfloat16 tensors, double for float64), rounded once to the
// tensor's dtype. A 1-D tensor is the case C = 1 with no column maps and noise
// column 0. row_offset (0 for a whole tensor) is the row of the full new tensor
// that row 0 of these maps is, so rows [lo, hi) built alone (maps, scales and dst
// of those rows, row_offset = lo) get the full build's noise; counters are uint32
// (mod 2^32).
#pragma once

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "philox.h"
#include "philox_simd.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace growkern {

// ---- storage types and their conversions -------------------------------------

// 16-bit storage, layout-compatible with c10::Half / c10::BFloat16.
struct alignas(2) f16_t {
  uint16_t bits;
};
struct alignas(2) bf16_t {
  uint16_t bits;
};

// IEEE half <-> float, round to nearest even (the algorithm of c10/util/Half.h).
GK_HD float f16_to_float(f16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  const uint32_t w = (uint32_t)h.bits << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float normalized = u32_as_f32((two_w >> 4) + exp_offset) * 0x1p-112f;
  const uint32_t magic_mask = 126u << 23;
  const float denormalized = u32_as_f32((two_w >> 17) | magic_mask) - 0.5f;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? f32_as_u32(denormalized) : f32_as_u32(normalized));
  return u32_as_f32(result);
#endif
}

GK_HD f16_t float_to_f16(float f) {
  f16_t h;
#if defined(__CUDA_ARCH__)
  h.bits = __half_as_ushort(__float2half_rn(f));
#else
  float base = (fabsf(f) * 0x1p+112f) * 0x1p-110f;
  const uint32_t w = f32_as_u32(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = u32_as_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_as_u32(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  h.bits = (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
  return h;
}

GK_HD float bf16_to_float(bf16_t b) { return u32_as_f32((uint32_t)b.bits << 16); }

GK_HD bf16_t float_to_bf16(float f) {
  bf16_t b;
#if defined(__CUDA_ARCH__)
  b.bits = __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  // a select, not a branch, so loops of it vectorize
  const uint32_t u = f32_as_u32(f);
  const uint32_t nan = (u >> 16) | 0x0040u;                      // quiet NaN, sign kept
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  b.bits = (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
#endif
  return b;
}

template <typename scalar_t>
struct Traits;
template <>
struct Traits<float> {
  using acc_t = float;
  static GK_HD float load(float x) { return x; }
  static GK_HD float store(float x) { return x; }
};
template <>
struct Traits<double> {
  using acc_t = double;
  static GK_HD double load(double x) { return x; }
  static GK_HD double store(double x) { return x; }
};
template <>
struct Traits<f16_t> {
  using acc_t = float;
  static GK_HD float load(f16_t x) { return f16_to_float(x); }
  static GK_HD f16_t store(float x) { return float_to_f16(x); }
};
template <>
struct Traits<bf16_t> {
  using acc_t = float;
  static GK_HD float load(bf16_t x) { return bf16_to_float(x); }
  static GK_HD bf16_t store(float x) { return float_to_bf16(x); }
};

// ---- the arguments -----------------------------------------------------------

// What the members of a group share. Index maps are int64; the noise counter of
// entry (r, c) is (r + row_offset, noise_col[c]), both taken mod 2^32 (noise_col
// validated >= 0, row_offset in [0, 2^32) by the caller).
template <typename acc_t>
struct GroupMaps {
  int64_t R = 0;
  int64_t C = 1;        // 1 for a 1-D tensor
  bool two_d = false;   // col_* are used only when true
  const int64_t* row_src = nullptr;
  const int64_t* col_src = nullptr;
  const int64_t* noise_col = nullptr;
  const acc_t* row_sign = nullptr;
  const acc_t* col_sign = nullptr;
  uint32_t seed = 0;
  uint32_t row_offset = 0;  // the noise counter row of row 0
};

// One member (the parameter or a moment): its old tensor, its new tensor
// (contiguous, R x C) and what differs between members.
template <typename scalar_t>
struct Member {
  using acc_t = typename Traits<scalar_t>::acc_t;
  const scalar_t* src = nullptr;
  scalar_t* dst = nullptr;
  int64_t src_stride0 = 0;  // elements
  int64_t src_stride1 = 0;  // elements (2-D only)
  const acc_t* row_scale = nullptr;
  const acc_t* col_scale = nullptr;  // 2-D only
  acc_t fresh_value = 0;
  acc_t sigma = 0;
  acc_t sigma_fresh = 0;
  uint32_t stream = 0;
  bool noisy = false;  // sigma != 0 || sigma_fresh != 0
};

// ---- the CPU row loop ----------------------------------------------------------

// The noise of a run of n entries: out[i] = N(seed, stream, row0 + i * row_step,
// cols ? cols[i] : 0). float32 runs go through the lane-parallel generator
// (philox_simd.h: the same bits as philox_normal_f32); float64 draws one at a time.
inline void fill_normals(uint32_t seed, uint32_t stream, uint32_t row0, uint32_t row_step, const int64_t* cols,
                         int64_t n, float* out) {
  philox_normals_f32(seed, stream, row0, row_step, cols, n, out);
}
inline void fill_normals(uint32_t seed, uint32_t stream, uint32_t row0, uint32_t row_step, const int64_t* cols,
                         int64_t n, double* out) {
  uint32_t row = row0;
  for (int64_t i = 0; i < n; ++i, row += row_step)
    out[i] = philox_normal_f64(seed, stream, row, cols ? (uint32_t)cols[i] : 0u);
}

constexpr int64_t kNoiseRun = 512;  // normals drawn per run: 2 KiB of float32, in L1

// Rows [r0, r1) of every member (same dtype). Deterministic per element: the
// result does not depend on how rows are split between threads. Noise is drawn
// in runs of kNoiseRun entries along a row (along the rows for a 1-D tensor),
// then combined with the mapped values.
template <typename scalar_t>
void widen_rows(const GroupMaps<typename Traits<scalar_t>::acc_t>& g,
                const Member<scalar_t>* members, int n_members, int64_t r0, int64_t r1) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  using T = Traits<scalar_t>;
  acc_t z[kNoiseRun];
  if (!g.two_d) {
    for (int mi = 0; mi < n_members; ++mi) {
      const Member<scalar_t>& m = members[mi];
      for (int64_t rb = r0; rb < r1; rb += kNoiseRun) {
        const int64_t nb = r1 - rb < kNoiseRun ? r1 - rb : kNoiseRun;
        if (m.noisy) fill_normals(g.seed, m.stream, (uint32_t)rb + g.row_offset, 1u, nullptr, nb, z);
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t r = rb + i;
          const int64_t rs = g.row_src[r];
          acc_t v;
          if (rs >= 0) {
            v = T::load(m.src[rs * m.src_stride0]) * m.row_scale[r];
            if (m.noisy) v += (m.sigma * g.row_sign[r]) * z[i];
          } else {
            v = m.fresh_value;
            if (m.noisy) v += m.sigma_fresh * z[i];
          }
          m.dst[r] = T::store(v);
        }
      }
    }
    return;
  }
  // Values are computed in acc_t a run at a time and rounded to the storage type in a
  // separate contiguous loop, which the compiler vectorizes (the gathers above it
  // cannot be); float and double tensors are written directly.
  constexpr bool direct = std::is_same<scalar_t, acc_t>::value;
  acc_t staged[direct ? 1 : kNoiseRun];
  const int64_t C = g.C;
  // Antithetic partners share a noise column: each row then draws every distinct
  // counter once (row_draws), and the columns read their draw through draw_of.
  std::vector<int64_t> distinct, draw_of;
  std::vector<acc_t> row_draws;
  bool any_noisy = false;
  for (int mi = 0; mi < n_members; ++mi) any_noisy = any_noisy || members[mi].noisy;
  if (any_noisy && r1 > r0) {
    distinct.assign(g.noise_col, g.noise_col + C);
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    if ((int64_t)distinct.size() * 4 <= C * 3) {  // worth it: a quarter or more are shared
      draw_of.resize(C);
      for (int64_t c = 0; c < C; ++c)
        draw_of[c] = std::lower_bound(distinct.begin(), distinct.end(), g.noise_col[c]) - distinct.begin();
      row_draws.resize(distinct.size());
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t rs = g.row_src[r];
    const uint32_t nrow = (uint32_t)r + g.row_offset;  // wraps mod 2^32, as the reference
    for (int mi = 0; mi < n_members; ++mi) {
      const Member<scalar_t>& m = members[mi];
      scalar_t* out = m.dst + r * C;
      const acc_t fresh = m.fresh_value;
      const acc_t sf = m.sigma_fresh;
      if (!m.noisy && rs < 0) {  // a fresh row
        const scalar_t f = T::store(fresh);
        for (int64_t c = 0; c < C; ++c) out[c] = f;
        continue;
      }
      const scalar_t* srow = rs >= 0 ? m.src + rs * m.src_stride0 : nullptr;
      const int64_t s1 = m.src_stride1;
      const acc_t a = rs >= 0 ? m.row_scale[r] : acc_t(0);
      const acc_t sr = rs >= 0 ? m.sigma * g.row_sign[r] : acc_t(0);
      if (m.noisy && !draw_of.empty())
        fill_normals(g.seed, m.stream, nrow, 0u, distinct.data(), (int64_t)distinct.size(), row_draws.data());
      for (int64_t cb = 0; cb < C; cb += kNoiseRun) {
        const int64_t nb = C - cb < kNoiseRun ? C - cb : kNoiseRun;
        const int64_t* csrc = g.col_src + cb;
        const acc_t* cscale = m.col_scale + cb;
        acc_t* v = direct ? reinterpret_cast<acc_t*>(out + cb) : staged;
        if (!m.noisy) {
          if (s1 == 1) {
            for (int64_t i = 0; i < nb; ++i) v[i] = csrc[i] >= 0 ? T::load(srow[csrc[i]]) * a * cscale[i] : fresh;
          } else {
            for (int64_t i = 0; i < nb; ++i)
              v[i] = csrc[i] >= 0 ? T::load(srow[csrc[i] * s1]) * a * cscale[i] : fresh;
          }
        } else {
          if (draw_of.empty()) {
            fill_normals(g.seed, m.stream, nrow, 0u, g.noise_col + cb, nb, z);
          } else {
            for (int64_t i = 0; i < nb; ++i) z[i] = row_draws[draw_of[cb + i]];
          }
          if (rs < 0) {
            for (int64_t i = 0; i < nb; ++i) v[i] = fresh + sf * z[i];
          } else {
            const acc_t* csign = g.col_sign + cb;
            for (int64_t i = 0; i < nb; ++i) {
              const int64_t cs = csrc[i];
              v[i] = cs >= 0 ? T::load(srow[cs * s1]) * a * cscale[i] + (sr * csign[i]) * z[i] : fresh + sf * z[i];
            }
          }
        }
        if (!direct)
          for (int64_t i = 0; i < nb; ++i) out[cb + i] = T::store(staged[i]);
      }
    }
  }
}

// ---- the multi-tensor form: jobs cut into chunks -------------------------------
//
// One launch (CUDA) or one parallel loop (CPU) widens a list of jobs. A job is
// up to kJobMembers members of one dtype that share a group's maps, so a whole
// model (every parameter and its moments) goes through a handful of launches, as
// apex's multi_tensor_apply does. Each job's R*C elements are cut into vectors
// of VEC elements (16 bytes of every member) and the vectors into chunks of
// kChunkVecs; chunk b belongs to the job j with chunk_begin[j] <= b <
// chunk_begin[j + 1]. A CUDA block takes a chunk, its threads the vectors.
// The CPU runs the same jobs with the row loop above; the unit test
// (csrc/tests/test_core.cpp) runs widen_vec over the chunks on the host and
// checks it bit for bit against the row loop.

constexpr int kJobMembers = 4;
constexpr int64_t kChunkVecs = 1024;  // 4 vectors per thread of a 256-thread block

template <typename scalar_t>
struct WidenJob {
  using acc_t = typename Traits<scalar_t>::acc_t;
  GroupMaps<acc_t> maps;
  int64_t numel = 0;  // R * C
  int n_members = 0;
  Member<scalar_t> m[kJobMembers];
};

template <typename scalar_t>
constexpr int widen_vec_width() {
  return (int)(16 / sizeof(scalar_t));
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) VecT {
  scalar_t v[VEC];
};

#if defined(__CUDA_ARCH__)
#define GK_LDG(p) __ldg(p)
#define GK_UNROLL _Pragma("unroll")
#else
#define GK_LDG(p) (*(p))
#define GK_UNROLL
#endif

// The job that chunk b belongs to: the largest j with chunk_begin[j] <= b.
GK_HD int64_t find_job(const int64_t* chunk_begin, int64_t njobs, int64_t b) {
  int64_t lo = 0, hi = njobs - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (chunk_begin[mid] <= b)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Elements [e0, e0 + VEC) of every member of the job (fewer at the tail), one
// 16-byte store per member when the vector is whole. e0 is a multiple of VEC and
// the new tensors are 16-byte aligned, so whole vectors are aligned.
template <typename scalar_t, int VEC>
GK_HD void widen_vec(const WidenJob<scalar_t>& job, int64_t e0) {
  using T = Traits<scalar_t>;
  using acc_t = typename Traits<scalar_t>::acc_t;
  const GroupMaps<acc_t>& g = job.maps;
  const acc_t tag = 0;
  const int64_t left = job.numel - e0;
  const int n = left < VEC ? (int)left : VEC;
  int64_t r = e0 / g.C;
  int64_t c = e0 - r * g.C;
  VecT<scalar_t, VEC> out[kJobMembers];
GK_UNROLL
  for (int k = 0; k < VEC; ++k) {
    if (k < n) {
      const int64_t rs = GK_LDG(g.row_src + r);
      const int64_t cs = g.two_d ? GK_LDG(g.col_src + c) : 0;
      const bool ok = rs >= 0 && cs >= 0;
      acc_t z = 0;
      uint32_t z_stream = 0;
      bool have_z = false;
GK_UNROLL
      for (int mi = 0; mi < kJobMembers; ++mi) {
        if (mi < job.n_members) {
          const Member<scalar_t>& m = job.m[mi];
          acc_t val;
          if (ok) {
            val = T::load(m.src[rs * m.src_stride0 + cs * m.src_stride1]) * GK_LDG(m.row_scale + r);
            if (g.two_d) val = val * GK_LDG(m.col_scale + c);
          } else {
            val = m.fresh_value;
          }
          if (m.noisy) {
            if (!have_z || z_stream != m.stream) {  // members of one stream share the draw
              const uint32_t ncol = g.two_d ? (uint32_t)GK_LDG(g.noise_col + c) : 0u;
              z = philox_normal(g.seed, m.stream, (uint32_t)r + g.row_offset, ncol, tag);
              z_stream = m.stream;
              have_z = true;
            }
            acc_t coef;
            if (ok) {
              coef = m.sigma * GK_LDG(g.row_sign + r);
              if (g.two_d) coef = coef * GK_LDG(g.col_sign + c);
            } else {
              coef = m.sigma_fresh;
            }
            val = val + coef * z;
          }
          out[mi].v[k] = T::store(val);
        }
      }
    }
    if (++c == g.C) {
      c = 0;
      ++r;
    }
  }
GK_UNROLL
  for (int mi = 0; mi < kJobMembers; ++mi) {
    if (mi < job.n_members) {
      scalar_t* dst = job.m[mi].dst + e0;
      if (n == VEC) {
#if defined(__CUDA_ARCH__)
        *reinterpret_cast<VecT<scalar_t, VEC>*>(dst) = out[mi];
#else
        memcpy(dst, &out[mi], sizeof(out[mi]));
#endif
      } else {
        for (int k = 0; k < n; ++k) dst[k] = out[mi].v[k];
      }
    }
  }
}

// The vectors [v0, v1) of chunk b: what one CUDA block or one CPU task does.
template <typename scalar_t>
GK_HD void chunk_vectors(const WidenJob<scalar_t>* jobs, const int64_t* chunk_begin, int64_t njobs, int64_t b,
                         int64_t* job, int64_t* v0, int64_t* v1) {
  constexpr int VEC = widen_vec_width<scalar_t>();
  const int64_t j = find_job(chunk_begin, njobs, b);
  const int64_t nvec = (jobs[j].numel + VEC - 1) / VEC;
  const int64_t first = (b - chunk_begin[j]) * kChunkVecs;
  *job = j;
  *v0 = first;
  *v1 = first + kChunkVecs < nvec ? first + kChunkVecs : nvec;
}

// chunk_begin (njobs + 1 entries) for the given jobs; returns the number of chunks.
template <typename scalar_t>
int64_t plan_chunks(const WidenJob<scalar_t>* jobs, int64_t njobs, int64_t* chunk_begin) {
  constexpr int VEC = widen_vec_width<scalar_t>();
  int64_t total = 0;
  for (int64_t j = 0; j < njobs; ++j) {
    chunk_begin[j] = total;
    const int64_t nvec = (jobs[j].numel + VEC - 1) / VEC;
    total += (nvec + kChunkVecs - 1) / kChunkVecs;
  }
  chunk_begin[njobs] = total;
  return total;
}

// Instantiated in widen_core.cpp (the growkern_core library).
extern template void widen_rows<float>(const GroupMaps<float>&, const Member<float>*, int, int64_t, int64_t);
extern template void widen_rows<double>(const GroupMaps<double>&, const Member<double>*, int, int64_t, int64_t);
extern template void widen_rows<f16_t>(const GroupMaps<float>&, const Member<f16_t>*, int, int64_t, int64_t);
extern template void widen_rows<bf16_t>(const GroupMaps<float>&, const Member<bf16_t>*, int, int64_t, int64_t);

// x0..x3 of Philox4x32-10((rows[i], cols[i], 0, 0), (seed, stream)) into out[4 i + k]
// (as int64 in [0, 2^32)). For tests of the integer stream.
void philox_words_batch(uint32_t seed, uint32_t stream, const int64_t* rows, const int64_t* cols,
                        int64_t n, int64_t* out);

}  // namespace growkern
