// growkern._C: the torch.library ops and their CPU implementation.
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "widen_core.h"
#include "widen_jobs.h"
#include "widen_op.h"

#ifndef GK_WITH_CUDA
#define GK_WITH_CUDA 0
#endif

namespace growkern {
namespace {

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

}  // namespace

std::vector<at::Tensor> widen_group_cpu(at::TensorList srcs, const at::Tensor& row_src,
                                        const std::optional<at::Tensor>& col_src, at::TensorList row_scales,
                                        at::TensorList col_scales, at::ArrayRef<double> fresh_values,
                                        at::ArrayRef<double> sigmas, at::ArrayRef<double> sigma_fresh,
                                        const at::Tensor& row_sign, const std::optional<at::Tensor>& col_sign,
                                        const std::optional<at::Tensor>& noise_col, int64_t seed,
                                        at::IntArrayRef streams, int64_t row_offset) {
  return run_groups_cpu({make_group_args(srcs, row_src, col_src, row_scales, col_scales, fresh_values, sigmas,
                                         sigma_fresh, row_sign, col_sign, noise_col, seed, streams, row_offset)});
}

std::vector<at::Tensor> widen_groups_cpu(at::TensorList srcs, at::IntArrayRef group_sizes, at::TensorList row_src,
                                         const OptTensorList& col_src, at::TensorList row_sign,
                                         const OptTensorList& col_sign, const OptTensorList& noise_col,
                                         at::IntArrayRef seeds, at::TensorList row_scales,
                                         const OptTensorList& col_scales, at::ArrayRef<double> fresh_values,
                                         at::ArrayRef<double> sigmas, at::ArrayRef<double> sigma_fresh,
                                         at::IntArrayRef streams, at::IntArrayRef row_offsets) {
  return run_groups_cpu(split_groups(srcs, group_sizes, row_src, col_src, row_sign, col_sign, noise_col, seeds,
                                     row_scales, col_scales, fresh_values, sigmas, sigma_fresh, streams,
                                     row_offsets));
}

at::Tensor philox_words_cpu(const at::Tensor& rows, const at::Tensor& cols, int64_t seed, int64_t stream) {
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong,
              "philox_words: rows and cols must be int64");
  TORCH_CHECK(rows.sizes() == cols.sizes(), "philox_words: rows and cols must have one shape");
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFLL && stream >= 0 && stream <= 0xFFFFFFFFLL,
              "philox_words: seed and stream must be in [0, 2**32)");
  const auto r = rows.contiguous();
  const auto c = cols.contiguous();
  auto sizes = rows.sizes().vec();
  sizes.push_back(4);
  auto out = at::empty(sizes, rows.options());
  const int64_t n = r.numel();
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t* cp = c.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    philox_words_batch((uint32_t)seed, (uint32_t)stream, rp + b, cp + b, e - b, op + 4 * b);
  });
  return out;
}

}  // namespace growkern

TORCH_LIBRARY(growkern, m) {
  // the fake (meta) implementations live in Python; torch imports this module when it needs them
  m.set_python_module("growkern.kernels.ext");
  m.def(
      "widen_group(Tensor[] srcs, Tensor row_src, Tensor? col_src, Tensor[] row_scales, "
      "Tensor[] col_scales, float[] fresh_values, float[] sigmas, float[] sigma_fresh, "
      "Tensor row_sign, Tensor? col_sign, Tensor? noise_col, int seed, int[] streams, int row_offset=0) "
      "-> Tensor[]");
  m.def(
      "widen_groups(Tensor[] srcs, int[] group_sizes, Tensor[] row_src, Tensor?[] col_src, "
      "Tensor[] row_sign, Tensor?[] col_sign, Tensor?[] noise_col, int[] seeds, Tensor[] row_scales, "
      "Tensor?[] col_scales, float[] fresh_values, float[] sigmas, float[] sigma_fresh, int[] streams, "
      "int[] row_offsets=[]) -> Tensor[]");
  m.def("philox_words(Tensor rows, Tensor cols, int seed, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(growkern, CPU, m) {
  m.impl("widen_group", &growkern::widen_group_cpu);
  m.impl("widen_groups", &growkern::widen_groups_cpu);
  m.impl("philox_words", &growkern::philox_words_cpu);
}

// A plain extension module: importing it (after torch) registers the ops above.
static struct PyModuleDef gk_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "growkern native kernels (ops under torch.ops.growkern)", -1,
                                       nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&gk_module);
  if (mod == nullptr) return nullptr;
  PyModule_AddIntConstant(mod, "WITH_CUDA", GK_WITH_CUDA);
  return mod;
}
