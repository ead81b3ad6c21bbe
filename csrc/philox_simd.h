// Float32 normals of growkern.philox for runs of counters, many lanes at a time.
//
// philox_normals_f32 writes out[i] = philox_normal_f32(seed, stream, row0 + i * row_step,
// cols ? cols[i] : 0) for i < n (counters mod 2^32): the same bits as the per-element
// code of philox.h, which the CUDA kernel runs, because every lane performs the same
// IEEE operations in the same order (integer Philox words, exact conversions, fused
// multiply-adds, a correctly rounded sqrt). The instruction set is chosen once at run
// time: AVX-512 (16 lanes), AVX2 with FMA (8 lanes), or the scalar loop; the
// environment variable GROWKERN_CPU_ISA=scalar|avx2|avx512 caps it (for tests and
// benchmarks; a set the CPU lacks is not used). No ATen dependency.
#pragma once

#include <stdint.h>

namespace growkern {

enum class CpuIsa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The best set this CPU and build support, capped by GROWKERN_CPU_ISA (read once).
CpuIsa cpu_isa();
// The best set this CPU and build support.
CpuIsa cpu_isa_max();
// Whether the CPU and this build support `isa` (Scalar always).
bool cpu_isa_supported(CpuIsa isa);
const char* cpu_isa_name(CpuIsa isa);

// out[i] = N(seed, stream, row0 + i * row_step, cols ? cols[i] : 0), i < n, with the
// given instruction set (which must be supported) or cpu_isa().
void philox_normals_f32(CpuIsa isa, uint32_t seed, uint32_t stream, uint32_t row0, uint32_t row_step,
                        const int64_t* cols, int64_t n, float* out);
void philox_normals_f32(uint32_t seed, uint32_t stream, uint32_t row0, uint32_t row_step, const int64_t* cols,
                        int64_t n, float* out);

// The Box-Muller half alone: out[i] = sqrt(bm_radius2_f32(x0[i])) * bm_cos_f32(x1[i]),
// for tests of chosen words (the edges of the log and angle reductions).
void box_muller_f32(CpuIsa isa, const uint32_t* x0, const uint32_t* x1, int64_t n, float* out);

}  // namespace growkern
