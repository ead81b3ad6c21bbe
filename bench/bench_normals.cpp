// Nanoseconds per float32 normal per core of growkern's CPU generator (csrc/philox_simd.h)
// on each instruction set this CPU has, over runs of 512 counters along a row as the
// row loop draws them. Single thread; the median of 7 passes over 2^24 normals.
//   cmake -S . -B BUILD && cmake --build BUILD && BUILD/bench_normals
#include <stdio.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "philox_simd.h"

using namespace growkern;

int main() {
  const int64_t kRun = 512, kTotal = int64_t(1) << 24;
  std::vector<int64_t> cols(kRun);
  for (int64_t i = 0; i < kRun; ++i) cols[i] = i;
  std::vector<float> out(kRun);
  for (CpuIsa isa : {CpuIsa::Scalar, CpuIsa::Avx2, CpuIsa::Avx512}) {
    if (!cpu_isa_supported(isa)) {
      printf("%-7s not on this CPU\n", cpu_isa_name(isa));
      continue;
    }
    std::vector<double> ns;
    float sink = 0;
    for (int pass = 0; pass < 7; ++pass) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t r = 0; r < kTotal / kRun; ++r) {
        philox_normals_f32(isa, 1u, 2u, (uint32_t)r, 0u, cols.data(), kRun, out.data());
        sink += out[r % kRun];
      }
      ns.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / kTotal * 1e9);
    }
    std::sort(ns.begin(), ns.end());
    printf("%-7s %.2f ns per normal (min %.2f, max %.2f)  [%g]\n", cpu_isa_name(isa), ns[3], ns[0], ns[6], sink);
  }
}
