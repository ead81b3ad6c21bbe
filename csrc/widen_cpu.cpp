// The CPU runners of the growkern ops (widen_ops.h; widen_ops.cpp registers them).
#include <ATen/Parallel.h>

#include "widen_core.h"
#include "widen_jobs.h"
#include "widen_ops.h"

namespace growkern {

// The staged jobs (widen_jobs.h) on the CPU: each job by the row loop, in parallel
// over its rows. (The CUDA launch's per-thread code, widen_vec, is checked against
// the row loop by ctest.)
std::vector<at::Tensor> run_groups_cpu(const std::vector<GroupArgs>& groups) {
  if (groups.empty()) return {};
  TORCH_CHECK(groups[0].srcs[0].device().is_cpu(), "widen_group(s) (CPU): sources must be CPU tensors");
  return widen_groups_impl(groups, at::Device(at::kCPU),
                           [](at::ScalarType dt, const void* jobs, const int64_t*, int64_t njobs, int64_t) {
                             with_storage_type(dt, [&](auto tag) {
                               using scalar_t = decltype(tag);
                               const auto* js = static_cast<const WidenJob<scalar_t>*>(jobs);
                               for (int64_t j = 0; j < njobs; ++j) {
                                 const auto& job = js[j];
                                 const int64_t per_row = job.maps.C * job.n_members;
                                 const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_row));
                                 at::parallel_for(0, job.maps.R, grain, [&](int64_t r0, int64_t r1) {
                                   widen_rows<scalar_t>(job.maps, job.m, job.n_members, r0, r1);
                                 });
                               }
                             });
                           });
}

void philox_words_cpu(const at::Tensor& rows, const at::Tensor& cols, uint32_t seed, uint32_t stream,
                      const at::Tensor& out) {
  const auto r = rows.contiguous();
  const auto c = cols.contiguous();
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t* cp = c.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, r.numel(), 4096, [&](int64_t b, int64_t e) {
    philox_words_batch(seed, stream, rp + b, cp + b, e - b, op + 4 * b);
  });
}

}  // namespace growkern
