// How the runners (widen_ops.h) widen a list of checked groups, shared by the
// CPU and CUDA implementations.
//
// The call becomes a list of jobs (widen_core.h) per dtype. Everything the
// kernels read besides the old tensors (maps, signs and scales in the compute
// dtype, the job descriptors, the chunk tables) is packed into one host buffer
// and, for CUDA, moved in one copy; then one launch (CUDA) or one parallel loop
// (CPU) per dtype widens every member of every group.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <utility>
#include <vector>

#include "widen_core.h"
#include "widen_ops.h"

namespace growkern {

// f(tag) with a value of the storage type of dtype t (float, double, f16_t or
// bf16_t: layout-compatible with the tensor's elements); t is one of the four
// dtypes check_widen_args accepts.
static_assert(sizeof(f16_t) == sizeof(at::Half) && sizeof(bf16_t) == sizeof(at::BFloat16), "storage layout");

template <typename F>
void with_storage_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float()); break;
    case at::kDouble: f(double()); break;
    case at::kHalf: f(f16_t()); break;
    default: f(bf16_t()); break;
  }
}

// The compute dtype of a storage dtype: float32, float64 for float64 tensors.
inline at::ScalarType widen_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The bytes a call stages: CPU copies of the small tensors in their compute dtype
// (deduplicated), then the job descriptors and chunk tables. On CUDA the host
// side is pinned and moved with one asynchronous copy.
class Staging {
 public:
  explicit Staging(at::Device dev) : dev_(dev) {}

  size_t add(const at::Tensor& t, at::ScalarType dt) {
    const auto key = std::make_pair(t.unsafeGetTensorImpl(), dt);
    auto it = seen_.find(key);
    if (it != seen_.end()) return it->second;
    at::Tensor c = t.to(at::kCPU, dt).contiguous();
    const size_t off = reserve(c.nbytes());
    parts_.emplace_back(off, c);
    seen_.emplace(key, off);
    return off;
  }
  size_t reserve(size_t bytes) {
    const size_t off = size_;
    size_ += (bytes + 15) / 16 * 16;
    return off;
  }
  // Allocates both sides and fills the host side with the added tensors.
  void allocate() {
    const int64_t n = std::max<int64_t>(16, (int64_t)size_);
    host_ = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(dev_.is_cuda()));
    device_ = dev_.is_cpu() ? host_ : at::empty({n}, at::TensorOptions().dtype(at::kByte).device(dev_));
    for (const auto& p : parts_)
      if (p.second.nbytes()) std::memcpy(host_.data_ptr<uint8_t>() + p.first, p.second.data_ptr(), p.second.nbytes());
  }
  template <typename T>
  T* host(size_t off) {
    return reinterpret_cast<T*>(host_.data_ptr<uint8_t>() + off);
  }
  template <typename T>
  const T* device(size_t off) const {
    return reinterpret_cast<const T*>(device_.data_ptr<uint8_t>() + off);
  }
  void upload() {
    if (!dev_.is_cpu()) device_.copy_(host_, /*non_blocking=*/true);
  }

 private:
  at::Device dev_;
  size_t size_ = 0;
  std::vector<std::pair<size_t, at::Tensor>> parts_;
  std::map<std::pair<c10::TensorImpl*, at::ScalarType>, size_t> seen_;
  at::Tensor host_, device_;
};

// Where one member's and one group's staged vectors are (byte offsets).
struct MemberAux {
  size_t row_scale = 0, col_scale = 0;
};
struct MapsAux {
  size_t row_src = 0, col_src = 0, noise_col = 0, row_sign = 0, col_sign = 0;
};

// The jobs of one dtype: (group, up to kJobMembers of its members).
struct DtypeJobs {
  at::ScalarType dtype;
  std::vector<std::pair<int, std::vector<int>>> jobs;
  size_t jobs_off = 0, begin_off = 0;
  int64_t nchunks = 0;
};

template <typename scalar_t>
void write_jobs(DtypeJobs& d, const std::vector<GroupArgs>& groups, const std::vector<std::vector<at::Tensor>>& outs,
                const std::vector<std::map<at::ScalarType, MapsAux>>& maps_aux,
                const std::vector<std::vector<MemberAux>>& member_aux, Staging& st) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  const at::ScalarType acc = widen_acc_type(d.dtype);
  WidenJob<scalar_t>* jobs = st.host<WidenJob<scalar_t>>(d.jobs_off);
  for (size_t j = 0; j < d.jobs.size(); ++j) {
    const int g = d.jobs[j].first;
    const GroupArgs& a = groups[g];
    const MapsAux& x = maps_aux[g].at(acc);
    WidenJob<scalar_t> job;
    job.maps.R = a.plan.R;
    job.maps.C = a.plan.C;
    job.maps.two_d = a.plan.two_d;
    job.maps.seed = (uint32_t)a.seed;
    job.maps.row_offset = (uint32_t)a.row_offset;
    job.maps.row_src = st.device<int64_t>(x.row_src);
    job.maps.row_sign = st.device<acc_t>(x.row_sign);
    if (a.plan.two_d) {
      job.maps.col_src = st.device<int64_t>(x.col_src);
      if (a.noise_col.has_value()) job.maps.noise_col = st.device<int64_t>(x.noise_col);
      if (a.col_sign.has_value()) job.maps.col_sign = st.device<acc_t>(x.col_sign);
    }
    job.numel = a.plan.R * a.plan.C;
    job.n_members = (int)d.jobs[j].second.size();
    for (int k = 0; k < job.n_members; ++k) {
      const int i = d.jobs[j].second[k];
      Member<scalar_t>& m = job.m[k];
      const at::Tensor& src = a.srcs[i];
      const at::Tensor& dst = outs[g][i];
      m.src = static_cast<const scalar_t*>(src.const_data_ptr());
      m.dst = static_cast<scalar_t*>(dst.data_ptr());
      TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(m.dst) % 16 == 0, "widen_groups: unaligned output");
      m.src_stride0 = src.stride(0);
      m.src_stride1 = a.plan.two_d ? src.stride(1) : 0;
      m.row_scale = st.device<acc_t>(member_aux[g][i].row_scale);
      m.col_scale = a.plan.two_d ? st.device<acc_t>(member_aux[g][i].col_scale) : nullptr;
      m.fresh_value = (acc_t)a.fresh_values[i];
      m.sigma = (acc_t)a.sigmas[i];
      m.sigma_fresh = (acc_t)a.sigma_fresh[i];
      m.stream = (uint32_t)a.streams[i];
      m.noisy = a.plan.noisy[i];
    }
    std::memcpy(static_cast<void*>(jobs + j), &job, sizeof(job));
  }
  d.nchunks = plan_chunks(jobs, (int64_t)d.jobs.size(), st.host<int64_t>(d.begin_off));
}

inline size_t job_bytes(at::ScalarType t) {
  size_t n = 0;
  with_storage_type(t, [&](auto tag) { n = sizeof(WidenJob<decltype(tag)>); });
  return n;
}

// Runs the groups: run(dtype, jobs (device), chunk_begin (device), njobs, nchunks)
// does the launch or the loop for one dtype. Returns the new tensors, flat, in
// member order.
template <typename Run>
std::vector<at::Tensor> widen_groups_impl(const std::vector<GroupArgs>& groups, at::Device dev, Run run) {
  std::vector<std::vector<at::Tensor>> outs(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    const WidenPlan& p = groups[g].plan;
    for (const auto& s : groups[g].srcs)
      outs[g].push_back(p.two_d ? at::empty({p.R, p.C}, s.options()) : at::empty({p.R}, s.options()));
  }

  Staging st(dev);
  std::vector<std::map<at::ScalarType, MapsAux>> maps_aux(groups.size());
  std::vector<std::vector<MemberAux>> member_aux(groups.size());
  std::vector<DtypeJobs> per_dtype;
  for (auto dt : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
    DtypeJobs d;
    d.dtype = dt;
    const at::ScalarType acc = widen_acc_type(dt);
    for (size_t g = 0; g < groups.size(); ++g) {
      const GroupArgs& a = groups[g];
      if (a.plan.R == 0 || a.plan.C == 0) continue;
      std::vector<int> idx;
      for (int i = 0; i < a.plan.M; ++i)
        if (a.srcs[i].scalar_type() == dt) idx.push_back(i);
      if (idx.empty()) continue;
      if (!maps_aux[g].count(acc)) {
        MapsAux x;
        x.row_src = st.add(a.row_src, at::kLong);
        x.row_sign = st.add(a.row_sign, acc);
        if (a.plan.two_d) x.col_src = st.add(*a.col_src, at::kLong);
        if (a.plan.two_d && a.noise_col.has_value()) x.noise_col = st.add(*a.noise_col, at::kLong);
        if (a.plan.two_d && a.col_sign.has_value()) x.col_sign = st.add(*a.col_sign, acc);
        maps_aux[g][acc] = x;
      }
      member_aux[g].resize(a.plan.M);
      for (int i : idx) {
        member_aux[g][i].row_scale = st.add(a.row_scales[i], acc);
        if (a.plan.two_d) member_aux[g][i].col_scale = st.add(a.col_scales[i], acc);
      }
      for (size_t k = 0; k < idx.size(); k += kJobMembers)
        d.jobs.emplace_back((int)g, std::vector<int>(idx.begin() + k, idx.begin() + std::min(idx.size(), k + kJobMembers)));
    }
    if (d.jobs.empty()) continue;
    d.jobs_off = st.reserve(job_bytes(dt) * d.jobs.size());
    d.begin_off = st.reserve(sizeof(int64_t) * (d.jobs.size() + 1));
    per_dtype.push_back(d);
  }
  if (!per_dtype.empty()) {
    st.allocate();
    for (auto& d : per_dtype)
      with_storage_type(d.dtype, [&](auto tag) {
        write_jobs<decltype(tag)>(d, groups, outs, maps_aux, member_aux, st);
      });
    st.upload();
    for (const auto& d : per_dtype)
      if (d.nchunks) run(d.dtype, st.device<void>(d.jobs_off), st.device<int64_t>(d.begin_off),
                         (int64_t)d.jobs.size(), d.nchunks);
  }
  std::vector<at::Tensor> flat;
  for (auto& o : outs)
    for (auto& t : o) flat.push_back(std::move(t));
  return flat;
}

}  // namespace growkern
