// The CUDA runners of the growkern ops (widen_ops.h; widen_ops.cpp registers
// them for the CUDA dispatch key).
//
// A widen call becomes a list of jobs per dtype (csrc/widen_jobs.h): one
// asynchronous host-to-device copy stages the maps, scales, job descriptors and
// chunk tables, then one launch per dtype widens every member of every group,
// as apex's multi_tensor_apply does. A block takes a chunk of kChunkVecs
// vectors; each thread computes one vector (16 bytes of every member of the
// job, one 16-byte store each) with widen_vec, which the CMake unit test runs on
// the host against the CPU's row loop. Math in float32 (float64 for float64 tensors).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE
// headers that a bare toolkit (or torch's pip wheels) may not provide.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <vector>

#include "philox.h"
#include "widen_core.h"
#include "widen_jobs.h"
#include "widen_ops.h"

namespace growkern {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    widen_jobs_kernel(const WidenJob<scalar_t>* __restrict__ jobs, const int64_t* __restrict__ chunk_begin,
                      int64_t njobs, int64_t nchunks) {
  constexpr int VEC = widen_vec_width<scalar_t>();
  for (int64_t b = blockIdx.x; b < nchunks; b += gridDim.x) {
    int64_t j, v0, v1;
    chunk_vectors(jobs, chunk_begin, njobs, b, &j, &v0, &v1);
    for (int64_t v = v0 + threadIdx.x; v < v1; v += blockDim.x) widen_vec<scalar_t, VEC>(jobs[j], v * VEC);
  }
}

template <typename scalar_t>
void launch_jobs(const void* jobs, const int64_t* chunk_begin, int64_t njobs, int64_t nchunks) {
  const int64_t blocks = std::min<int64_t>(nchunks, 0x7FFFFFFF);
  widen_jobs_kernel<scalar_t><<<(unsigned)blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const WidenJob<scalar_t>*>(jobs), chunk_begin, njobs, nchunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

__global__ void philox_words_kernel(const int64_t* rows, const int64_t* cols, int64_t n, uint32_t seed,
                                    uint32_t stream, int64_t* out) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const Philox4 p = philox4x32((uint32_t)rows[i], (uint32_t)cols[i], 0u, 0u, seed, stream);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[4 * i + k] = (int64_t)p.x[k];
  }
}

}  // namespace

std::vector<at::Tensor> run_groups_cuda(const std::vector<GroupArgs>& groups) {
  if (groups.empty()) return {};
  const auto dev = groups[0].srcs[0].device();
  TORCH_CHECK(dev.is_cuda(), "widen_group(s) (CUDA): sources must be CUDA tensors, got ", dev);
  c10::cuda::CUDAGuard guard(dev);
  return widen_groups_impl(groups, dev,
                           [](at::ScalarType dt, const void* jobs, const int64_t* begin, int64_t njobs,
                              int64_t nchunks) {
                             with_storage_type(dt, [&](auto tag) {
                               launch_jobs<decltype(tag)>(jobs, begin, njobs, nchunks);
                             });
                           });
}

void philox_words_cuda(const at::Tensor& rows, const at::Tensor& cols, uint32_t seed, uint32_t stream,
                       const at::Tensor& out) {
  c10::cuda::CUDAGuard guard(rows.device());
  const auto r = rows.contiguous();
  const auto c = cols.to(rows.device()).contiguous();
  const int64_t n = r.numel();
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535);
  philox_words_kernel<<<(unsigned)blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      r.data_ptr<int64_t>(), c.data_ptr<int64_t>(), n, seed, stream, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace growkern
