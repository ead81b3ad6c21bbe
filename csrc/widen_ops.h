// The widen ops' arguments, and the per-device runners that their entry points
// (widen_ops.cpp) hand them to.
//
//   growkern::widen_group(Tensor[] srcs, Tensor row_src, Tensor? col_src,
//       Tensor[] row_scales, Tensor[] col_scales, float[] fresh_values,
//       float[] sigmas, float[] sigma_fresh, Tensor row_sign, Tensor? col_sign,
//       Tensor? noise_col, int seed, int[] streams, int row_offset=0) -> Tensor[]
// One call widens a parameter and all its optimizer moments (the members, in
// order) with the group's shared maps, reading each old tensor once. The noise
// of entry (r, c) is N(seed, stream, r + row_offset, noise_col[c]): row_offset > 0
// builds rows [row_offset, row_offset + R) of a larger tensor
// (growkern/kernels/spec.py).
//
//   growkern::widen_groups(Tensor[] srcs, int[] group_sizes, Tensor[] row_src,
//       Tensor?[] col_src, Tensor[] row_sign, Tensor?[] col_sign, Tensor?[] noise_col,
//       int[] seeds, Tensor[] row_scales, Tensor?[] col_scales, float[] fresh_values,
//       float[] sigmas, float[] sigma_fresh, int[] streams, int[] row_offsets=[]) -> Tensor[]
// The multi-group form: group g has group_sizes[g] members; the per-member lists
// (srcs, row_scales, col_scales, fresh_values, sigmas, sigma_fresh, streams) hold
// the members of group 0, then of group 1, ...; the per-group lists hold one
// entry per group (row_offsets: one per group, or empty for all 0).
//
// Either op's entry point unpacks its arguments once into one GroupArgs per
// group, checks each (check_widen_args) and calls the runner of the dispatch key
// it is registered for. widen_group is the one-group case of widen_groups: both
// end in the same runner, which never sees the flat argument lists. A device is
// a runner (run_groups_cpu in widen_cpu.cpp, run_groups_cuda in widen_cuda.cu,
// both by widen_jobs.h's staged jobs) plus a TORCH_LIBRARY_IMPL block in
// widen_ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace growkern {

// What check_widen_args derives from one group's arguments.
struct WidenPlan {
  int64_t R = 0;       // rows of the new tensors (row_src's length)
  int64_t C = 1;       // their columns (col_src's length; 1 for a 1-D group)
  bool two_d = false;  // col_src given
  int M = 0;           // members
  bool any_noisy = false;
  std::vector<bool> noisy;  // per member: sigma != 0 || sigma_fresh != 0
};

// One group's arguments, fields in widen_group's schema order (the entry points
// fill them by aggregate initialization in that order), and their plan, which
// check_widen_args sets. col_scales is empty for a 1-D group.
struct GroupArgs {
  std::vector<at::Tensor> srcs;
  at::Tensor row_src;
  std::optional<at::Tensor> col_src;
  std::vector<at::Tensor> row_scales, col_scales;
  std::vector<double> fresh_values, sigmas, sigma_fresh;
  at::Tensor row_sign;
  std::optional<at::Tensor> col_sign, noise_col;
  int64_t seed = 0;
  std::vector<int64_t> streams;
  int64_t row_offset = 0;
  WidenPlan plan;
};

// A widen runner: checked groups, sources on the runner's device (a runner checks
// the device of groups[0]; the entry points have checked that all sources share
// it). Returns the new tensors, flat, in member order (no groups: none).
using RunGroups = std::vector<at::Tensor> (*)(const std::vector<GroupArgs>& groups);
std::vector<at::Tensor> run_groups_cpu(const std::vector<GroupArgs>& groups);
std::vector<at::Tensor> run_groups_cuda(const std::vector<GroupArgs>& groups);  // GK_WITH_CUDA builds

// A philox_words runner: fills out (int64, contiguous, rows.shape + [4], on rows'
// device, at least one row) from checked rows and cols (int64, one shape).
using RunPhilox = void (*)(const at::Tensor& rows, const at::Tensor& cols, uint32_t seed, uint32_t stream,
                           const at::Tensor& out);
void philox_words_cpu(const at::Tensor& rows, const at::Tensor& cols, uint32_t seed, uint32_t stream,
                      const at::Tensor& out);
void philox_words_cuda(const at::Tensor& rows, const at::Tensor& cols, uint32_t seed, uint32_t stream,
                       const at::Tensor& out);  // GK_WITH_CUDA builds

}  // namespace growkern
