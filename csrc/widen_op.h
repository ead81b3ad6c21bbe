// ATen-level argument checking shared by the CPU and CUDA implementations of
//   growkern::widen_group(Tensor[] srcs, Tensor row_src, Tensor? col_src,
//       Tensor[] row_scales, Tensor[] col_scales, float[] fresh_values,
//       float[] sigmas, float[] sigma_fresh, Tensor row_sign, Tensor? col_sign,
//       Tensor? noise_col, int seed, int[] streams, int row_offset=0) -> Tensor[]
// One call widens a parameter and all its optimizer moments (the members, in
// order) with the group's shared maps, reading each old tensor once. The noise
// of entry (r, c) is N(seed, stream, r + row_offset, noise_col[c]): row_offset > 0
// builds rows [row_offset, row_offset + R) of a larger tensor (growkern/ops.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace growkern {

struct WidenPlan {
  int64_t R = 0;
  int64_t C = 1;
  bool two_d = false;
  int M = 0;
  bool any_noisy = false;
  std::vector<bool> noisy;
};

inline bool widen_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType widen_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_index_vector(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.dim() == 1, "widen_group: ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, "widen_group: ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(n < 0 || t.numel() == n, "widen_group: ", name, " has ", t.numel(), " entries, expected ", n);
}

inline void check_float_vector(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == n, "widen_group: ", name, " must be 1-D with ", n,
              " entries, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "widen_group: ", name, " must be floating point, got ",
              t.scalar_type());
}

// Value checks of the index maps; only where the maps live on the CPU (no device sync).
inline void check_index_values(const at::Tensor& idx, const char* name, int64_t limit) {
  if (!idx.device().is_cpu() || idx.numel() == 0) return;
  const auto c = idx.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK(p[i] >= -1 && p[i] < limit, "widen_group: ", name, "[", i, "] = ", p[i],
                " is out of range [-1, ", limit, ")");
  }
}

inline WidenPlan check_widen_args(at::TensorList srcs, const at::Tensor& row_src,
                                  const std::optional<at::Tensor>& col_src, at::TensorList row_scales,
                                  at::TensorList col_scales, at::ArrayRef<double> fresh_values,
                                  at::ArrayRef<double> sigmas, at::ArrayRef<double> sigma_fresh,
                                  const at::Tensor& row_sign, const std::optional<at::Tensor>& col_sign,
                                  const std::optional<at::Tensor>& noise_col, int64_t seed,
                                  at::IntArrayRef streams, int64_t row_offset) {
  WidenPlan p;
  p.M = (int)srcs.size();
  TORCH_CHECK(p.M >= 1, "widen_group: needs at least one source tensor");
  p.two_d = col_src.has_value();
  const size_t M = srcs.size();
  TORCH_CHECK(row_scales.size() == M && fresh_values.size() == M && sigmas.size() == M &&
                  sigma_fresh.size() == M && streams.size() == M,
              "widen_group: row_scales, fresh_values, sigmas, sigma_fresh and streams need one entry per "
              "source (", M, "), got ", row_scales.size(), ", ", fresh_values.size(), ", ", sigmas.size(),
              ", ", sigma_fresh.size(), ", ", streams.size());
  TORCH_CHECK(col_scales.size() == (p.two_d ? M : 0), "widen_group: col_scales needs ",
              (p.two_d ? M : 0), " entries (one per source for 2-D groups, none for 1-D), got ",
              col_scales.size());
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFLL, "widen_group: seed must be in [0, 2**32), got ", seed);
  TORCH_CHECK(row_offset >= 0 && row_offset <= 0xFFFFFFFFLL, "widen_group: row_offset must be in [0, 2**32), got ",
              row_offset);
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
    TORCH_CHECK(streams[i] >= 0 && streams[i] <= 0xFFFFFFFFLL, "widen_group: streams[", i,
                "] must be in [0, 2**32), got ", streams[i]);
    const bool noisy = sigmas[i] != 0.0 || sigma_fresh[i] != 0.0;
    p.noisy.push_back(noisy);
    p.any_noisy = p.any_noisy || noisy;
  }
  check_index_vector(row_src, "row_src", -1);
  p.R = row_src.numel();
  check_float_vector(row_sign, "row_sign", p.R);
  for (size_t i = 0; i < M; ++i) check_float_vector(row_scales[i], "row_scales[i]", p.R);
  check_index_values(row_src, "row_src", srcs[0].size(0));
  if (p.two_d) {
    check_index_vector(*col_src, "col_src", -1);
    p.C = col_src->numel();
    for (size_t i = 0; i < M; ++i) check_float_vector(col_scales[i], "col_scales[i]", p.C);
    check_index_values(*col_src, "col_src", srcs[0].size(1));
    if (p.any_noisy) {
      TORCH_CHECK(noise_col.has_value() && col_sign.has_value(),
                  "widen_group: a 2-D group with noise needs noise_col and col_sign");
    }
    if (noise_col.has_value()) {
      check_index_vector(*noise_col, "noise_col", p.C);
      if (noise_col->device().is_cpu() && noise_col->numel()) {
        TORCH_CHECK(noise_col->min().item<int64_t>() >= 0, "widen_group: noise_col entries must be >= 0");
      }
    }
    if (col_sign.has_value()) check_float_vector(*col_sign, "col_sign", p.C);
  } else {
    p.C = 1;
  }
  return p;
}

}  // namespace growkern
