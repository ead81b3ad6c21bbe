// CUDA implementation of growkern::widen_group and growkern::philox_words.
//
// One launch widens up to kMaxMembers tensors of one dtype (a parameter and its
// moments) with the group's shared maps: each thread owns VEC consecutive
// output elements (16 bytes of every member's new tensor), computes the noise
// of a (row, noise column) once per distinct stream and writes every member
// with one 16-byte store where the tail allows. Math in float32 (float64 for
// float64 tensors); the per-element core (philox.h, widen_core.h) is the CPU's.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE
// headers that a bare toolkit (or torch's pip wheels) may not provide.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "philox.h"
#include "widen_core.h"
#include "widen_op.h"

namespace growkern {
namespace {

constexpr int kMaxMembers = 4;
constexpr int kThreads = 256;

template <typename scalar_t>
struct CudaMember {
  using acc_t = typename Traits<scalar_t>::acc_t;
  const scalar_t* src;
  scalar_t* dst;
  int64_t s0, s1;
  const acc_t* row_scale;
  const acc_t* col_scale;
  acc_t fresh, sigma, sigma_fresh;
  uint32_t stream;
  int noisy;
};

template <typename scalar_t>
struct CudaArgs {
  using acc_t = typename Traits<scalar_t>::acc_t;
  const int64_t* row_src;
  const int64_t* col_src;    // 2-D only
  const int64_t* noise_col;  // 2-D and noisy only
  const acc_t* row_sign;
  const acc_t* col_sign;     // 2-D and noisy only
  int64_t R, C, numel;
  uint32_t seed;
  int two_d;
  int n;
  CudaMember<scalar_t> m[kMaxMembers];
};

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) VecT {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    widen_group_kernel(const CudaArgs<scalar_t> a) {
  using T = Traits<scalar_t>;
  using acc_t = typename Traits<scalar_t>::acc_t;
  const int64_t nvec = (a.numel + VEC - 1) / VEC;
  const acc_t tag = 0;
  for (int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; v < nvec;
       v += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e0 = v * VEC;
    int64_t r = e0 / a.C;
    int64_t c = e0 - r * a.C;
    VecT<scalar_t, VEC> out[kMaxMembers];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (e0 + k < a.numel) {
        const int64_t rs = __ldg(a.row_src + r);
        const int64_t cs = a.two_d ? __ldg(a.col_src + c) : 0;
        const bool ok = rs >= 0 && cs >= 0;
        acc_t zz = 0;
        uint32_t z_stream = 0;
        bool have_z = false;
#pragma unroll
        for (int mi = 0; mi < kMaxMembers; ++mi) {
          if (mi < a.n) {
            const CudaMember<scalar_t>& m = a.m[mi];
            acc_t val;
            if (ok) {
              const acc_t x = T::load(m.src[rs * m.s0 + cs * m.s1]);
              val = x * __ldg(m.row_scale + r);
              if (a.two_d) val *= __ldg(m.col_scale + c);
            } else {
              val = m.fresh;
            }
            if (m.noisy) {
              // members that share a stream share the draw (computed once)
              if (!have_z || z_stream != m.stream) {
                const uint32_t ncol = a.two_d ? (uint32_t)__ldg(a.noise_col + c) : 0u;
                zz = philox_normal(a.seed, m.stream, (uint32_t)r, ncol, tag);
                z_stream = m.stream;
                have_z = true;
              }
              acc_t coef;
              if (ok) {
                coef = m.sigma * __ldg(a.row_sign + r);
                if (a.two_d) coef *= __ldg(a.col_sign + c);
              } else {
                coef = m.sigma_fresh;
              }
              val += coef * zz;
            }
            out[mi].v[k] = T::store(val);
          }
        }
      }
      if (++c == a.C) {
        c = 0;
        ++r;
      }
    }
    const bool full = e0 + VEC <= a.numel;
#pragma unroll
    for (int mi = 0; mi < kMaxMembers; ++mi) {
      if (mi < a.n) {
        scalar_t* dst = a.m[mi].dst + e0;
        if (full) {
          *reinterpret_cast<VecT<scalar_t, VEC>*>(dst) = out[mi];
        } else {
          for (int k = 0; k < VEC && e0 + k < a.numel; ++k) dst[k] = out[mi].v[k];
        }
      }
    }
  }
}

int sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms > 0 ? sms : 1;
}

// Device pointers of the aux vectors (maps, signs, scales) in the wanted dtypes.
// When all of them are CPU tensors (as growkern's groups are) they are packed
// into one pinned buffer and moved with a single host-to-device copy.
std::vector<const void*> stage_aux(const std::vector<at::Tensor>& ts, const std::vector<at::ScalarType>& dts,
                                   at::Device dev, std::vector<at::Tensor>& keep) {
  std::vector<const void*> ptrs(ts.size(), nullptr);
  bool all_cpu = true;
  for (const auto& t : ts)
    if (t.defined() && !t.device().is_cpu()) all_cpu = false;
  if (!all_cpu) {
    for (size_t i = 0; i < ts.size(); ++i) {
      if (!ts[i].defined()) continue;
      auto d = ts[i].to(dev, dts[i]).contiguous();
      keep.push_back(d);
      ptrs[i] = d.data_ptr();
    }
    return ptrs;
  }
  std::vector<at::Tensor> conv(ts.size());
  std::vector<size_t> off(ts.size(), 0);
  size_t total = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (!ts[i].defined()) continue;
    conv[i] = ts[i].to(dts[i]).contiguous();
    off[i] = total;
    total += (conv[i].nbytes() + 15) / 16 * 16;
  }
  if (total == 0) return ptrs;
  auto host = at::empty({(int64_t)total}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* hp = host.data_ptr<uint8_t>();
  for (size_t i = 0; i < ts.size(); ++i)
    if (conv[i].defined() && conv[i].nbytes()) std::memcpy(hp + off[i], conv[i].data_ptr(), conv[i].nbytes());
  auto devbuf = host.to(dev, /*non_blocking=*/true);  // the host allocator records the stream
  keep.push_back(devbuf);
  const uint8_t* dp = devbuf.data_ptr<uint8_t>();
  for (size_t i = 0; i < ts.size(); ++i)
    if (conv[i].defined()) ptrs[i] = dp + off[i];
  return ptrs;
}

template <typename scalar_t, typename torch_t>
void launch_members(const WidenPlan& p, const std::vector<int>& idx, at::TensorList srcs,
                    std::vector<at::Tensor>& outs, const std::vector<const void*>& ptr, int64_t seed,
                    at::ArrayRef<double> fresh_values, at::ArrayRef<double> sigmas,
                    at::ArrayRef<double> sigma_fresh, at::IntArrayRef streams, int aux_member_base) {
  using acc_t = typename Traits<scalar_t>::acc_t;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int64_t numel = p.R * p.C;
  const int64_t nvec = (numel + VEC - 1) / VEC;
  const int sms = sm_count();
  const int64_t blocks = std::min<int64_t>((nvec + kThreads - 1) / kThreads, (int64_t)sms * 16);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t start = 0; start < idx.size(); start += kMaxMembers) {
    CudaArgs<scalar_t> a;
    std::memset(&a, 0, sizeof(a));
    a.row_src = static_cast<const int64_t*>(ptr[0]);
    a.col_src = static_cast<const int64_t*>(ptr[1]);
    a.noise_col = static_cast<const int64_t*>(ptr[2]);
    a.row_sign = static_cast<const acc_t*>(ptr[3]);
    a.col_sign = static_cast<const acc_t*>(ptr[4]);
    a.R = p.R;
    a.C = p.C;
    a.numel = numel;
    a.seed = (uint32_t)seed;
    a.two_d = p.two_d;
    a.n = (int)std::min<size_t>(kMaxMembers, idx.size() - start);
    for (int j = 0; j < a.n; ++j) {
      const int i = idx[start + j];
      auto& m = a.m[j];
      m.src = reinterpret_cast<const scalar_t*>(srcs[i].data_ptr<torch_t>());
      m.dst = reinterpret_cast<scalar_t*>(outs[i].data_ptr<torch_t>());
      m.s0 = srcs[i].stride(0);
      m.s1 = p.two_d ? srcs[i].stride(1) : 0;
      m.row_scale = static_cast<const acc_t*>(ptr[aux_member_base + 2 * i]);
      m.col_scale = static_cast<const acc_t*>(ptr[aux_member_base + 2 * i + 1]);
      m.fresh = (acc_t)fresh_values[i];
      m.sigma = (acc_t)sigmas[i];
      m.sigma_fresh = (acc_t)sigma_fresh[i];
      m.stream = (uint32_t)streams[i];
      m.noisy = p.noisy[i] ? 1 : 0;
    }
    widen_group_kernel<scalar_t, VEC><<<(unsigned)blocks, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
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
                                         at::IntArrayRef streams) {
  const WidenPlan p = check_widen_args(srcs, row_src, col_src, row_scales, col_scales, fresh_values, sigmas,
                                       sigma_fresh, row_sign, col_sign, noise_col, seed, streams);
  const auto dev = srcs[0].device();
  TORCH_CHECK(dev.is_cuda(), "widen_group (CUDA): sources must be CUDA tensors, got ", dev);
  c10::cuda::CUDAGuard guard(dev);
  std::vector<at::Tensor> outs;
  for (const auto& s : srcs)
    outs.push_back(p.two_d ? at::empty({p.R, p.C}, s.options()) : at::empty({p.R}, s.options()));
  if (p.R == 0 || p.C == 0) return outs;

  // float64 members need double aux vectors, the others float32; stage what is used.
  for (auto acc : {at::kFloat, at::kDouble}) {
    std::vector<int> members_of_acc;
    for (int i = 0; i < p.M; ++i)
      if (widen_acc_type(srcs[i].scalar_type()) == acc) members_of_acc.push_back(i);
    if (members_of_acc.empty()) continue;
    bool noisy = false;
    for (int i : members_of_acc) noisy = noisy || p.noisy[i];
    // aux layout: row_src, col_src, noise_col, row_sign, col_sign, then (row_scale, col_scale) per member
    std::vector<at::Tensor> ts(5 + 2 * p.M);
    std::vector<at::ScalarType> dts(5 + 2 * p.M, acc);
    ts[0] = row_src;
    dts[0] = dts[1] = dts[2] = at::kLong;
    if (p.two_d) ts[1] = *col_src;
    if (p.two_d && noisy) ts[2] = *noise_col;
    if (noisy) ts[3] = row_sign;
    if (p.two_d && noisy) ts[4] = *col_sign;
    for (int i : members_of_acc) {
      ts[5 + 2 * i] = row_scales[i];
      if (p.two_d) ts[5 + 2 * i + 1] = col_scales[i];
    }
    std::vector<at::Tensor> keep;
    const auto ptr = stage_aux(ts, dts, dev, keep);
    for (auto st : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
      if (widen_acc_type(st) != acc) continue;
      std::vector<int> idx;
      for (int i : members_of_acc)
        if (srcs[i].scalar_type() == st) idx.push_back(i);
      if (idx.empty()) continue;
      if (st == at::kFloat)
        launch_members<float, float>(p, idx, srcs, outs, ptr, seed, fresh_values, sigmas, sigma_fresh, streams, 5);
      else if (st == at::kHalf)
        launch_members<f16_t, at::Half>(p, idx, srcs, outs, ptr, seed, fresh_values, sigmas, sigma_fresh,
                                        streams, 5);
      else if (st == at::kBFloat16)
        launch_members<bf16_t, at::BFloat16>(p, idx, srcs, outs, ptr, seed, fresh_values, sigmas, sigma_fresh,
                                             streams, 5);
      else
        launch_members<double, double>(p, idx, srcs, outs, ptr, seed, fresh_values, sigmas, sigma_fresh,
                                       streams, 5);
    }
  }
  return outs;
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
  m.impl("philox_words", &growkern::philox_words_cuda);
}
