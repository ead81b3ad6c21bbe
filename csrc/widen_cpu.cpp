// growkern._C: the torch.library ops and their CPU implementation.
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "widen_core.h"
#include "widen_jobs.h"
#include "widen_op.h"

#ifndef GK_WITH_CUDA
#define GK_WITH_CUDA 0
#endif

namespace growkern {
namespace {

template <typename scalar_t, typename torch_t>
void run_cpu(const WidenPlan& p, const std::vector<int>& idx, at::TensorList srcs,
             std::vector<at::Tensor>& outs, const GroupMaps<typename Traits<scalar_t>::acc_t>& g,
             const std::vector<at::Tensor>& rsc, const std::vector<at::Tensor>& csc,
             at::ArrayRef<double> fresh_values, at::ArrayRef<double> sigmas,
             at::ArrayRef<double> sigma_fresh, at::IntArrayRef streams) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  static_assert(sizeof(scalar_t) == sizeof(torch_t), "storage layout");
  std::vector<Member<scalar_t>> ms;
  for (int i : idx) {
    Member<scalar_t> m;
    m.src = reinterpret_cast<const scalar_t*>(srcs[i].data_ptr<torch_t>());
    m.dst = reinterpret_cast<scalar_t*>(outs[i].data_ptr<torch_t>());
    m.src_stride0 = srcs[i].stride(0);
    m.src_stride1 = p.two_d ? srcs[i].stride(1) : 0;
    m.row_scale = rsc[i].data_ptr<acc_t>();
    m.col_scale = p.two_d ? csc[i].data_ptr<acc_t>() : nullptr;
    m.fresh_value = (acc_t)fresh_values[i];
    m.sigma = (acc_t)sigmas[i];
    m.sigma_fresh = (acc_t)sigma_fresh[i];
    m.stream = (uint32_t)streams[i];
    m.noisy = p.noisy[i];
    ms.push_back(m);
  }
  const int64_t per_row = p.C * (int64_t)ms.size();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_row));
  at::parallel_for(0, p.R, grain, [&](int64_t b, int64_t e) {
    widen_rows<scalar_t>(g, ms.data(), (int)ms.size(), b, e);
  });
}

template <typename acc_t>
at::Tensor as_acc(const at::Tensor& t) {
  const auto dt = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  return t.to(at::kCPU, dt).contiguous();
}

template <typename acc_t>
void run_acc_group(const WidenPlan& p, const std::vector<int>& idx, at::ScalarType st, at::TensorList srcs,
                   std::vector<at::Tensor>& outs, const at::Tensor& row_src,
                   const std::optional<at::Tensor>& col_src, at::TensorList row_scales,
                   at::TensorList col_scales, at::ArrayRef<double> fresh_values, at::ArrayRef<double> sigmas,
                   at::ArrayRef<double> sigma_fresh, const at::Tensor& row_sign,
                   const std::optional<at::Tensor>& col_sign, const std::optional<at::Tensor>& noise_col,
                   int64_t seed, at::IntArrayRef streams) {
  const at::Tensor rs = row_src.to(at::kCPU).contiguous();
  const at::Tensor rsg = as_acc<acc_t>(row_sign);
  at::Tensor cs, csg, nc;
  std::vector<at::Tensor> rsc(srcs.size()), csc(srcs.size());
  for (int i : idx) {
    rsc[i] = as_acc<acc_t>(row_scales[i]);
    if (p.two_d) csc[i] = as_acc<acc_t>(col_scales[i]);
  }
  GroupMaps<acc_t> g;
  g.R = p.R;
  g.C = p.C;
  g.two_d = p.two_d;
  g.row_src = rs.data_ptr<int64_t>();
  g.row_sign = rsg.data_ptr<acc_t>();
  g.seed = (uint32_t)seed;
  if (p.two_d) {
    cs = col_src->to(at::kCPU).contiguous();
    g.col_src = cs.data_ptr<int64_t>();
    if (col_sign.has_value()) {
      csg = as_acc<acc_t>(*col_sign);
      g.col_sign = csg.data_ptr<acc_t>();
    }
    if (noise_col.has_value()) {
      nc = noise_col->to(at::kCPU).contiguous();
      g.noise_col = nc.data_ptr<int64_t>();
    }
  }
  if constexpr (std::is_same<acc_t, double>::value) {
    run_cpu<double, double>(p, idx, srcs, outs, g, rsc, csc, fresh_values, sigmas, sigma_fresh, streams);
  } else if (st == at::kFloat) {
    run_cpu<float, float>(p, idx, srcs, outs, g, rsc, csc, fresh_values, sigmas, sigma_fresh, streams);
  } else if (st == at::kHalf) {
    run_cpu<f16_t, at::Half>(p, idx, srcs, outs, g, rsc, csc, fresh_values, sigmas, sigma_fresh, streams);
  } else {
    run_cpu<bf16_t, at::BFloat16>(p, idx, srcs, outs, g, rsc, csc, fresh_values, sigmas, sigma_fresh,
                                  streams);
  }
}

}  // namespace

std::vector<at::Tensor> widen_group_cpu(at::TensorList srcs, const at::Tensor& row_src,
                                        const std::optional<at::Tensor>& col_src, at::TensorList row_scales,
                                        at::TensorList col_scales, at::ArrayRef<double> fresh_values,
                                        at::ArrayRef<double> sigmas, at::ArrayRef<double> sigma_fresh,
                                        const at::Tensor& row_sign, const std::optional<at::Tensor>& col_sign,
                                        const std::optional<at::Tensor>& noise_col, int64_t seed,
                                        at::IntArrayRef streams) {
  const WidenPlan p = check_widen_args(srcs, row_src, col_src, row_scales, col_scales, fresh_values, sigmas,
                                       sigma_fresh, row_sign, col_sign, noise_col, seed, streams);
  TORCH_CHECK(srcs[0].device().is_cpu(), "widen_group (CPU): sources must be CPU tensors");
  std::vector<at::Tensor> outs;
  for (const auto& s : srcs) {
    outs.push_back(p.two_d ? at::empty({p.R, p.C}, s.options()) : at::empty({p.R}, s.options()));
  }
  if (p.R == 0 || p.C == 0) return outs;
  // Members of one dtype go through the core together; float64 in double math.
  for (auto st : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
    std::vector<int> idx;
    for (int i = 0; i < p.M; ++i)
      if (srcs[i].scalar_type() == st) idx.push_back(i);
    if (idx.empty()) continue;
    if (st == at::kDouble) {
      run_acc_group<double>(p, idx, st, srcs, outs, row_src, col_src, row_scales, col_scales, fresh_values,
                            sigmas, sigma_fresh, row_sign, col_sign, noise_col, seed, streams);
    } else {
      run_acc_group<float>(p, idx, st, srcs, outs, row_src, col_src, row_scales, col_scales, fresh_values,
                           sigmas, sigma_fresh, row_sign, col_sign, noise_col, seed, streams);
    }
  }
  return outs;
}

// The multi-group op on the CPU: the staged jobs of the CUDA path (widen_jobs.h),
// each run by the row loop in parallel over its rows. (The CUDA launch's
// per-thread code, widen_vec, is checked against the row loop by ctest.)
std::vector<at::Tensor> widen_groups_cpu(at::TensorList srcs, at::IntArrayRef group_sizes, at::TensorList row_src,
                                         const OptTensorList& col_src, at::TensorList row_sign,
                                         const OptTensorList& col_sign, const OptTensorList& noise_col,
                                         at::IntArrayRef seeds, at::TensorList row_scales,
                                         const OptTensorList& col_scales, at::ArrayRef<double> fresh_values,
                                         at::ArrayRef<double> sigmas, at::ArrayRef<double> sigma_fresh,
                                         at::IntArrayRef streams) {
  const auto groups = split_groups(srcs, group_sizes, row_src, col_src, row_sign, col_sign, noise_col, seeds,
                                   row_scales, col_scales, fresh_values, sigmas, sigma_fresh, streams);
  if (groups.empty()) return {};
  TORCH_CHECK(groups[0].srcs[0].device().is_cpu(), "widen_groups (CPU): sources must be CPU tensors");
  return widen_groups_impl(groups, at::Device(at::kCPU),
                           [](at::ScalarType dt, const void* jobs, const int64_t*, int64_t njobs, int64_t) {
                             auto loop = [&](auto tag) {
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
                             };
                             if (dt == at::kFloat) loop(float());
                             else if (dt == at::kDouble) loop(double());
                             else if (dt == at::kHalf) loop(f16_t());
                             else loop(bf16_t());
                           });
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
      "Tensor row_sign, Tensor? col_sign, Tensor? noise_col, int seed, int[] streams) -> Tensor[]");
  m.def(
      "widen_groups(Tensor[] srcs, int[] group_sizes, Tensor[] row_src, Tensor?[] col_src, "
      "Tensor[] row_sign, Tensor?[] col_sign, Tensor?[] noise_col, int[] seeds, Tensor[] row_scales, "
      "Tensor?[] col_scales, float[] fresh_values, float[] sigmas, float[] sigma_fresh, int[] streams) "
      "-> Tensor[]");
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
