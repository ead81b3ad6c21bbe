// growkern._C: the torch.library ops (schemas documented in widen_ops.h), their
// entry points and the Python module. The entry points check the arguments and
// pack them once into GroupArgs; they are templates over the runner, so one
// definition serves every dispatch key, and the TORCH_LIBRARY_IMPL blocks at the
// end pick each key's runner.
#include <Python.h>

#include <torch/library.h>

#include "philox_simd.h"
#include "widen_ops.h"

#ifndef GK_WITH_CUDA
#define GK_WITH_CUDA 0
#endif

namespace growkern {
namespace {

using OptTensorList = c10::List<std::optional<at::Tensor>>;

// ---- argument checks -------------------------------------------------------------

inline bool widen_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_index_vector(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.dim() == 1, "widen_group: ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, "widen_group: ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(n < 0 || t.numel() == n, "widen_group: ", name, " has ", t.numel(), " entries, expected ", n);
}

void check_float_vector(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == n, "widen_group: ", name, " must be 1-D with ", n,
              " entries, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "widen_group: ", name, " must be floating point, got ",
              t.scalar_type());
}

// Value checks of the index maps; only where the maps live on the CPU (no device sync).
void check_index_values(const at::Tensor& idx, const char* name, int64_t limit) {
  if (!idx.device().is_cpu() || idx.numel() == 0) return;
  const auto c = idx.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK(p[i] >= -1 && p[i] < limit, "widen_group: ", name, "[", i, "] = ", p[i],
                " is out of range [-1, ", limit, ")");
  }
}

// Checks one group's arguments; returns their plan.
WidenPlan check_widen_args(const GroupArgs& a) {
  const auto& srcs = a.srcs;
  WidenPlan p;
  p.M = (int)srcs.size();
  TORCH_CHECK(p.M >= 1, "widen_group: needs at least one source tensor");
  p.two_d = a.col_src.has_value();
  const size_t M = srcs.size();
  TORCH_CHECK(a.row_scales.size() == M && a.fresh_values.size() == M && a.sigmas.size() == M &&
                  a.sigma_fresh.size() == M && a.streams.size() == M,
              "widen_group: row_scales, fresh_values, sigmas, sigma_fresh and streams need one entry per "
              "source (", M, "), got ", a.row_scales.size(), ", ", a.fresh_values.size(), ", ", a.sigmas.size(),
              ", ", a.sigma_fresh.size(), ", ", a.streams.size());
  TORCH_CHECK(a.col_scales.size() == (p.two_d ? M : 0), "widen_group: col_scales needs ",
              (p.two_d ? M : 0), " entries (one per source for 2-D groups, none for 1-D), got ",
              a.col_scales.size());
  TORCH_CHECK(a.seed >= 0 && a.seed <= 0xFFFFFFFFLL, "widen_group: seed must be in [0, 2**32), got ", a.seed);
  TORCH_CHECK(a.row_offset >= 0 && a.row_offset <= 0xFFFFFFFFLL,
              "widen_group: row_offset must be in [0, 2**32), got ", a.row_offset);
  const auto dev = srcs[0].device();
  for (size_t i = 0; i < M; ++i) {
    const auto& s = srcs[i];
    TORCH_CHECK(s.device() == dev, "widen_group: all sources must be on one device; source ", i, " is on ",
                s.device(), ", source 0 on ", dev);
    TORCH_CHECK(s.dim() == (p.two_d ? 2 : 1), "widen_group: source ", i, " must be ", (p.two_d ? 2 : 1),
                "-D (", (p.two_d ? "col_src given" : "no col_src"), "), got shape ", s.sizes());
    TORCH_CHECK(widen_dtype_ok(s.scalar_type()), "widen_group: source ", i,
                " has unsupported dtype ", s.scalar_type(), " (float32, float64, float16, bfloat16)");
    TORCH_CHECK(s.sizes() == srcs[0].sizes(), "widen_group: the members of a group share a shape; source ",
                i, " has ", s.sizes(), ", source 0 ", srcs[0].sizes());
    TORCH_CHECK(a.streams[i] >= 0 && a.streams[i] <= 0xFFFFFFFFLL, "widen_group: streams[", i,
                "] must be in [0, 2**32), got ", a.streams[i]);
    const bool noisy = a.sigmas[i] != 0.0 || a.sigma_fresh[i] != 0.0;
    p.noisy.push_back(noisy);
    p.any_noisy = p.any_noisy || noisy;
  }
  check_index_vector(a.row_src, "row_src", -1);
  p.R = a.row_src.numel();
  check_float_vector(a.row_sign, "row_sign", p.R);
  for (size_t i = 0; i < M; ++i) check_float_vector(a.row_scales[i], "row_scales[i]", p.R);
  check_index_values(a.row_src, "row_src", srcs[0].size(0));
  if (p.two_d) {
    check_index_vector(*a.col_src, "col_src", -1);
    p.C = a.col_src->numel();
    for (size_t i = 0; i < M; ++i) check_float_vector(a.col_scales[i], "col_scales[i]", p.C);
    check_index_values(*a.col_src, "col_src", srcs[0].size(1));
    if (p.any_noisy) {
      TORCH_CHECK(a.noise_col.has_value() && a.col_sign.has_value(),
                  "widen_group: a 2-D group with noise needs noise_col and col_sign");
    }
    if (a.noise_col.has_value()) {
      check_index_vector(*a.noise_col, "noise_col", p.C);
      if (a.noise_col->device().is_cpu() && a.noise_col->numel()) {
        TORCH_CHECK(a.noise_col->min().item<int64_t>() >= 0, "widen_group: noise_col entries must be >= 0");
      }
    }
    if (a.col_sign.has_value()) check_float_vector(*a.col_sign, "col_sign", p.C);
  } else {
    p.C = 1;
  }
  return p;
}

// ---- entry points ----------------------------------------------------------------

// widen_group: one group, checked.
template <RunGroups run>
std::vector<at::Tensor> widen_group_op(at::TensorList srcs, const at::Tensor& row_src,
                                       const std::optional<at::Tensor>& col_src, at::TensorList row_scales,
                                       at::TensorList col_scales, at::ArrayRef<double> fresh_values,
                                       at::ArrayRef<double> sigmas, at::ArrayRef<double> sigma_fresh,
                                       const at::Tensor& row_sign, const std::optional<at::Tensor>& col_sign,
                                       const std::optional<at::Tensor>& noise_col, int64_t seed,
                                       at::IntArrayRef streams, int64_t row_offset) {
  GroupArgs a{srcs.vec(), row_src, col_src, row_scales.vec(), col_scales.vec(), fresh_values.vec(),
              sigmas.vec(), sigma_fresh.vec(), row_sign, col_sign, noise_col, seed, streams.vec(), row_offset,
              /*plan=*/{}};
  a.plan = check_widen_args(a);
  return run({std::move(a)});
}

// Splits the flat lists into groups, each checked as widen_group checks its arguments.
template <RunGroups run>
std::vector<at::Tensor> widen_groups_op(at::TensorList srcs, at::IntArrayRef group_sizes, at::TensorList row_src,
                                        const OptTensorList& col_src, at::TensorList row_sign,
                                        const OptTensorList& col_sign, const OptTensorList& noise_col,
                                        at::IntArrayRef seeds, at::TensorList row_scales,
                                        const OptTensorList& col_scales, at::ArrayRef<double> fresh_values,
                                        at::ArrayRef<double> sigmas, at::ArrayRef<double> sigma_fresh,
                                        at::IntArrayRef streams, at::IntArrayRef row_offsets) {
  const size_t G = group_sizes.size();
  TORCH_CHECK(row_offsets.empty() || row_offsets.size() == G,
              "widen_groups: row_offsets needs one entry per group (", G, ") or none (all 0), got ",
              row_offsets.size());
  TORCH_CHECK(row_src.size() == G && col_src.size() == G && row_sign.size() == G && col_sign.size() == G &&
                  noise_col.size() == G && seeds.size() == G,
              "widen_groups: row_src, col_src, row_sign, col_sign, noise_col and seeds need one entry per "
              "group (", G, "), got ", row_src.size(), ", ", col_src.size(), ", ", row_sign.size(), ", ",
              col_sign.size(), ", ", noise_col.size(), ", ", seeds.size());
  int64_t M = 0;
  for (size_t g = 0; g < G; ++g) {
    TORCH_CHECK(group_sizes[g] >= 1, "widen_groups: group_sizes[", g, "] = ", group_sizes[g], " (must be >= 1)");
    M += group_sizes[g];
  }
  TORCH_CHECK((int64_t)srcs.size() == M && (int64_t)row_scales.size() == M && (int64_t)col_scales.size() == M &&
                  (int64_t)fresh_values.size() == M && (int64_t)sigmas.size() == M &&
                  (int64_t)sigma_fresh.size() == M && (int64_t)streams.size() == M,
              "widen_groups: srcs, row_scales, col_scales, fresh_values, sigmas, sigma_fresh and streams need "
              "one entry per member (sum of group_sizes = ", M, "), got ", srcs.size(), ", ", row_scales.size(),
              ", ", col_scales.size(), ", ", fresh_values.size(), ", ", sigmas.size(), ", ", sigma_fresh.size(),
              ", ", streams.size());
  std::vector<GroupArgs> groups;
  groups.reserve(G);
  int64_t m0 = 0;
  for (size_t g = 0; g < G; ++g) {
    const int64_t n = group_sizes[g];
    const std::optional<at::Tensor> cs = col_src.get(g);
    std::vector<at::Tensor> csc;
    for (int64_t i = m0; i < m0 + n; ++i) {
      const std::optional<at::Tensor> c = col_scales.get(i);
      TORCH_CHECK(c.has_value() == cs.has_value(), "widen_groups: group ", g, " is ",
                  cs.has_value() ? "2-D (col_src given) but col_scales[" : "1-D (no col_src) but col_scales[",
                  i, "] is ", c.has_value() ? "given" : "None");
      if (c.has_value()) csc.push_back(*c);
    }
    groups.push_back(GroupArgs{srcs.slice(m0, n).vec(), row_src[g], cs, row_scales.slice(m0, n).vec(),
                               std::move(csc), fresh_values.slice(m0, n).vec(), sigmas.slice(m0, n).vec(),
                               sigma_fresh.slice(m0, n).vec(), row_sign[g], col_sign.get(g), noise_col.get(g),
                               seeds[g], streams.slice(m0, n).vec(), row_offsets.empty() ? 0 : row_offsets[g],
                               /*plan=*/{}});
    try {
      groups.back().plan = check_widen_args(groups.back());
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "widen_groups: group ", g, ": ", e.what_without_backtrace());
    }
    m0 += n;
  }
  if (!groups.empty()) {
    const auto dev = groups[0].srcs[0].device();
    for (size_t g = 1; g < G; ++g)
      TORCH_CHECK(groups[g].srcs[0].device() == dev, "widen_groups: all sources must be on one device; group ",
                  g, " is on ", groups[g].srcs[0].device(), ", group 0 on ", dev);
  }
  return run(groups);
}

template <RunPhilox run>
at::Tensor philox_words_op(const at::Tensor& rows, const at::Tensor& cols, int64_t seed, int64_t stream) {
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong,
              "philox_words: rows and cols must be int64");
  TORCH_CHECK(rows.sizes() == cols.sizes(), "philox_words: rows and cols must have one shape");
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFLL && stream >= 0 && stream <= 0xFFFFFFFFLL,
              "philox_words: seed and stream must be in [0, 2**32)");
  auto sizes = rows.sizes().vec();
  sizes.push_back(4);
  auto out = at::empty(sizes, rows.options());
  if (rows.numel()) run(rows, cols, (uint32_t)seed, (uint32_t)stream, out);
  return out;
}

}  // namespace
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
  using namespace growkern;
  m.impl("widen_group", &widen_group_op<run_groups_cpu>);
  m.impl("widen_groups", &widen_groups_op<run_groups_cpu>);
  m.impl("philox_words", &philox_words_op<philox_words_cpu>);
}

#if GK_WITH_CUDA
TORCH_LIBRARY_IMPL(growkern, CUDA, m) {
  using namespace growkern;
  m.impl("widen_group", &widen_group_op<run_groups_cuda>);
  m.impl("widen_groups", &widen_groups_op<run_groups_cuda>);
  m.impl("philox_words", &philox_words_op<philox_words_cuda>);
}
#endif

// A plain extension module: importing it (after torch) registers the ops above.
static struct PyModuleDef gk_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "growkern native kernels (ops under torch.ops.growkern)", -1,
                                       nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&gk_module);
  if (mod == nullptr) return nullptr;
  PyModule_AddIntConstant(mod, "WITH_CUDA", GK_WITH_CUDA);
  // the instruction set of the CPU kernels' normals (GROWKERN_CPU_ISA caps it) and the CPU's best
  PyModule_AddStringConstant(mod, "CPU_ISA", growkern::cpu_isa_name(growkern::cpu_isa()));
  PyModule_AddStringConstant(mod, "CPU_ISA_MAX", growkern::cpu_isa_name(growkern::cpu_isa_max()));
  return mod;
}
