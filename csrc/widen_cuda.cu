// CUDA implementation of growkern::widen_group, growkern::widen_groups and
// growkern::philox_words.
//
// Both widen ops become a list of jobs per dtype (csrc/widen_jobs.h): one
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
#include <torch/library.h>

#include <vector>

#include "philox.h"
#include "widen_core.h"
#include "widen_jobs.h"
#include "widen_op.h"

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

__global__ void philox_words_kernel(const int64_t* rows, const int64_t* cols, int64_t n, uint32_t seed,
                                    uint32_t stream, int64_t* out) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const Philox4 p = philox4x32((uint32_t)rows[i], (uint32_t)cols[i], 0u, 0u, seed, stream);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[4 * i + k] = (int64_t)p.x[k];
  }
}

}  // namespace

std::vector<at::Tensor> widen_group_cuda(at::TensorList srcs, const at::Tensor& row_src,
                                         const std::optional<at::Tensor>& col_src, at::TensorList row_scales,
                                         at::TensorList col_scales, at::ArrayRef<double> fresh_values,
                                         at::ArrayRef<double> sigmas, at::ArrayRef<double> sigma_fresh,
                                         const at::Tensor& row_sign, const std::optional<at::Tensor>& col_sign,
                                         const std::optional<at::Tensor>& noise_col, int64_t seed,
                                         at::IntArrayRef streams, int64_t row_offset) {
  return run_groups_cuda({make_group_args(srcs, row_src, col_src, row_scales, col_scales, fresh_values, sigmas,
                                          sigma_fresh, row_sign, col_sign, noise_col, seed, streams, row_offset)});
}

std::vector<at::Tensor> widen_groups_cuda(at::TensorList srcs, at::IntArrayRef group_sizes, at::TensorList row_src,
                                          const OptTensorList& col_src, at::TensorList row_sign,
                                          const OptTensorList& col_sign, const OptTensorList& noise_col,
                                          at::IntArrayRef seeds, at::TensorList row_scales,
                                          const OptTensorList& col_scales, at::ArrayRef<double> fresh_values,
                                          at::ArrayRef<double> sigmas, at::ArrayRef<double> sigma_fresh,
                                          at::IntArrayRef streams, at::IntArrayRef row_offsets) {
  return run_groups_cuda(split_groups(srcs, group_sizes, row_src, col_src, row_sign, col_sign, noise_col, seeds,
                                      row_scales, col_scales, fresh_values, sigmas, sigma_fresh, streams,
                                      row_offsets));
}

at::Tensor philox_words_cuda(const at::Tensor& rows, const at::Tensor& cols, int64_t seed, int64_t stream) {
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong,
              "philox_words: rows and cols must be int64");
  TORCH_CHECK(rows.sizes() == cols.sizes(), "philox_words: rows and cols must have one shape");
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFLL && stream >= 0 && stream <= 0xFFFFFFFFLL,
              "philox_words: seed and stream must be in [0, 2**32)");
  c10::cuda::CUDAGuard guard(rows.device());
  const auto r = rows.contiguous();
  const auto c = cols.to(rows.device()).contiguous();
  auto sizes = rows.sizes().vec();
  sizes.push_back(4);
  auto out = at::empty(sizes, rows.options());
  const int64_t n = r.numel();
  if (n == 0) return out;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535);
  philox_words_kernel<<<(unsigned)blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      r.data_ptr<int64_t>(), c.data_ptr<int64_t>(), n, (uint32_t)seed, (uint32_t)stream,
      out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace growkern

TORCH_LIBRARY_IMPL(growkern, CUDA, m) {
  m.impl("widen_group", &growkern::widen_group_cuda);
  m.impl("widen_groups", &growkern::widen_groups_cuda);
  m.impl("philox_words", &growkern::philox_words_cuda);
}
