// The growkern_core library: the CPU instantiations of the widen core.
#include "widen_core.h"

namespace growkern {

template void widen_rows<float>(const GroupMaps<float>&, const Member<float>*, int, int64_t, int64_t);
template void widen_rows<double>(const GroupMaps<double>&, const Member<double>*, int, int64_t, int64_t);
template void widen_rows<f16_t>(const GroupMaps<float>&, const Member<f16_t>*, int, int64_t, int64_t);
template void widen_rows<bf16_t>(const GroupMaps<float>&, const Member<bf16_t>*, int, int64_t, int64_t);

void philox_words_batch(uint32_t seed, uint32_t stream, const int64_t* rows, const int64_t* cols,
                        int64_t n, int64_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const Philox4 p = philox4x32((uint32_t)rows[i], (uint32_t)cols[i], 0u, 0u, seed, stream);
    for (int k = 0; k < 4; ++k) out[4 * i + k] = (int64_t)p.x[k];
  }
}

}  // namespace growkern
