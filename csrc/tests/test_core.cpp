// Unit test of the libtorch-free core: Philox4x32-10 known-answer vectors
// (Random123's kat_vectors), 16-bit conversions, the lane-parallel normals
// (philox_simd.h) against the per-element code on every instruction set this CPU
// has, and the CPU widen core against
// a naive double loop of the specification (growkern/kernels/spec.py), chunking
// included, and row slices (row_offset) against the whole tensor.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <random>
#include <vector>

#include "philox.h"
#include "philox_simd.h"
#include "widen_core.h"

using namespace growkern;

static int g_failures = 0;
static int g_checks = 0;
#define CHECK(cond, ...)                                  \
  do {                                                    \
    ++g_checks;                                           \
    if (!(cond)) {                                        \
      ++g_failures;                                       \
      printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      printf(__VA_ARGS__);                                \
      printf("\n");                                       \
    }                                                     \
  } while (0)

static void test_kat() {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const auto& k : kats) {
    const Philox4 p = philox4x32(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i)
      CHECK(p.x[i] == k.out[i], "word %d: got %08x want %08x", i, p.x[i], k.out[i]);
  }
  // philox_words_batch is the same stream
  const int64_t rows[2] = {0, 0xffffffffLL}, cols[2] = {0, 0xffffffffLL};
  int64_t out[8];
  philox_words_batch(0, 0, rows, cols, 2, out);
  CHECK(out[0] == 0x6627e8d5 && out[3] == 0x9b00dbd8, "batch words %llx", (long long)out[0]);
}

static void test_conversions() {
  CHECK(float_to_bf16(1.0f).bits == 0x3F80, "bf16(1)");
  CHECK(float_to_bf16(1.0f + 0x1p-8f).bits == 0x3F80, "bf16 tie to even (down)");
  CHECK(float_to_bf16(1.0f + 3 * 0x1p-8f).bits == 0x3F82, "bf16 tie to even (up)");
  CHECK(float_to_bf16(-2.5f).bits == 0xC020, "bf16(-2.5)");
  CHECK(float_to_f16(1.0f).bits == 0x3C00, "f16(1)");
  CHECK(float_to_f16(65520.f).bits == 0x7C00, "f16 overflow to inf");
  CHECK(float_to_f16(0x1p-24f).bits == 0x0001, "f16 smallest subnormal");
  CHECK(f16_to_float(f16_t{0x0001}) == 0x1p-24f, "f16 subnormal to float");
  CHECK(f16_to_float(f16_t{0xC000}) == -2.0f, "f16(-2)");
  CHECK(f16_to_float(f16_t{0x7BFF}) == 65504.f, "f16 max");
  for (uint32_t b = 0; b < 0x7C00; b += 7) {  // round trip of finite halfs
    const f16_t h{(uint16_t)b};
    CHECK(float_to_f16(f16_to_float(h)).bits == b, "f16 round trip %04x", b);
  }
}

// The specification in double: z as growkern/kernels/philox.py computes it.
// rho = sqrt(-2 ln u1) >= |z| is the Box-Muller radius: the error bound is relative to it.
static double naive_normal(uint32_t seed, uint32_t stream, uint32_t row, uint32_t col, double* rho = nullptr) {
  const Philox4 p = philox4x32(row, col, 0, 0, seed, stream);
  const double u1 = ((double)p.x[0] + 1.0) * 0x1p-32;
  const double u2 = (double)p.x[1] * 0x1p-32;
  if (rho) *rho = sqrt(-2.0 * log(u1));
  return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

template <typename S>
double to_double(S x) {
  return (double)Traits<S>::load(x);
}

template <typename S>
double ulp_of(double v);
template <>
double ulp_of<float>(double v) { return v == 0 ? 0x1p-149 : fmax(ldexp(1.0, ilogb(v) - 23), 0x1p-149); }
template <>
double ulp_of<double>(double v) { return v == 0 ? 0x1p-1074 : ldexp(1.0, ilogb(v) - 52); }
template <>
double ulp_of<f16_t>(double v) { return v == 0 ? 0x1p-24 : fmax(ldexp(1.0, ilogb(v) - 10), 0x1p-24); }
template <>
double ulp_of<bf16_t>(double v) { return v == 0 ? 0x1p-133 : fmax(ldexp(1.0, ilogb(v) - 7), 0x1p-133); }

// A random group of M members: maps with fresh (-1) units, signs in {-1, 0, 1},
// shared noise columns, random scales; member m writes into dst[m].
template <typename S>
struct RandomGroup {
  using acc_t = typename Traits<S>::acc_t;
  int64_t R0, C0, R, C;
  bool two_d;
  std::vector<int64_t> row_src, col_src, noise_col;
  std::vector<acc_t> row_sign, col_sign;
  std::vector<std::vector<S>> src, dst;
  std::vector<std::vector<acc_t>> rsc, csc;
  std::vector<double> fresh, sigma, sf;
  GroupMaps<acc_t> g;
  std::vector<Member<S>> ms;

  RandomGroup(int64_t R0_, int64_t C0_, int64_t R_, int64_t C_, bool two_d_, int M, uint64_t seed)
      : R0(R0_), C0(two_d_ ? C0_ : 1), R(R_), C(two_d_ ? C_ : 1), two_d(two_d_) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> uni(-2.0, 2.0);
    row_src.resize(R);
    row_sign.resize(R);
    col_src.resize(C);
    noise_col.resize(C);
    col_sign.resize(C);
    for (int64_t r = 0; r < R; ++r) {
      row_src[r] = (int64_t)(rng() % (R0 + 1)) - 1;
      row_sign[r] = (acc_t)((int)(rng() % 3) - 1);
    }
    for (int64_t c = 0; c < C; ++c) {
      col_src[c] = (int64_t)(rng() % (C0 + 1)) - 1;
      col_sign[c] = (acc_t)((int)(rng() % 3) - 1);
      noise_col[c] = (int64_t)(rng() % C);
    }
    const double fr[3] = {0.25, 0.0, -1.5}, si[3] = {0.5, 0.0, 0.0}, sfr[3] = {0.75, 0.0, 2.0};
    src.assign(M, std::vector<S>(R0 * C0));
    dst.assign(M, std::vector<S>(R * C));
    rsc.assign(M, std::vector<acc_t>(R));
    csc.assign(M, std::vector<acc_t>(C));
    for (int m = 0; m < M; ++m) {
      for (auto& x : src[m]) x = Traits<S>::store((acc_t)uni(rng));
      for (auto& x : rsc[m]) x = (acc_t)uni(rng);
      for (auto& x : csc[m]) x = (acc_t)uni(rng);
      fresh.push_back(fr[m % 3]);
      sigma.push_back(si[m % 3]);
      sf.push_back(sfr[m % 3]);
    }
    g.R = R;
    g.C = C;
    g.two_d = two_d;
    g.row_src = row_src.data();
    g.col_src = two_d ? col_src.data() : nullptr;
    g.noise_col = two_d ? noise_col.data() : nullptr;
    g.row_sign = row_sign.data();
    g.col_sign = two_d ? col_sign.data() : nullptr;
    g.seed = (uint32_t)(seed * 2654435761u);
    for (int m = 0; m < M; ++m) {
      Member<S> mm;
      mm.src = src[m].data();
      mm.dst = dst[m].data();
      mm.src_stride0 = C0;
      mm.src_stride1 = two_d ? 1 : 0;
      mm.row_scale = rsc[m].data();
      mm.col_scale = two_d ? csc[m].data() : nullptr;
      mm.fresh_value = (acc_t)fresh[m];
      mm.sigma = (acc_t)sigma[m];
      mm.sigma_fresh = (acc_t)sf[m];
      mm.stream = 77u + (uint32_t)m;
      mm.noisy = sigma[m] != 0 || sf[m] != 0;
      ms.push_back(mm);
    }
  }
  int M() const { return (int)ms.size(); }
};

template <typename S>
static void test_core_against_naive(bool two_d, const char* name, uint32_t row_offset = 0) {
  using acc_t = typename Traits<S>::acc_t;
  // compute error allowance, relative to |x a b| + |coef| rho (the bound of tests/test_kernels.py)
  const double u_acc = sizeof(acc_t) == 8 ? 0x1p-48 : 0x1p-20;
  RandomGroup<S> t(5, 7, 11, 13, two_d, 3, 1234 + (two_d ? 1 : 0) + sizeof(S));
  t.g.row_offset = row_offset;
  const int M = t.M();
  const int64_t R = t.R, C = t.C;
  widen_rows<S>(t.g, t.ms.data(), M, 0, R);
  // chunked: the same bits whatever the row split
  std::vector<std::vector<S>> once = t.dst;
  widen_rows<S>(t.g, t.ms.data(), M, 0, 1);
  widen_rows<S>(t.g, t.ms.data(), M, 1, 4);
  widen_rows<S>(t.g, t.ms.data(), M, 4, R);
  for (int m = 0; m < M; ++m)
    CHECK(memcmp(once[m].data(), t.dst[m].data(), sizeof(S) * R * C) == 0, "%s: chunking changed bits", name);

  double worst = 0;
  for (int m = 0; m < M; ++m) {
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t rs = t.row_src[r], cs = two_d ? t.col_src[c] : 0;
        const bool ok = rs >= 0 && cs >= 0;
        double base = t.fresh[m], coef = t.sf[m];
        if (ok) {
          base = to_double(t.src[m][rs * t.C0 + cs]) * (double)t.rsc[m][r] * (two_d ? (double)t.csc[m][c] : 1.0);
          coef = t.sigma[m] * (double)t.row_sign[r] * (two_d ? (double)t.col_sign[c] : 1.0);
        }
        double noise = 0, rho = 0;
        if (t.ms[m].noisy)
          noise = coef * naive_normal(t.g.seed, t.ms[m].stream, (uint32_t)((uint64_t)r + row_offset),
                                      two_d ? (uint32_t)t.noise_col[c] : 0u, &rho);
        const double want = base + noise;
        const double got = to_double(t.dst[m][r * C + c]);
        const double tol = ulp_of<S>(fabs(want)) + u_acc * (fabs(base) + fabs(coef) * rho);
        const double err = fabs(got - want);
        if (tol > 0) worst = fmax(worst, err / tol);
        CHECK(err <= tol, "%s m=%d r=%lld c=%lld: got %.17g want %.17g (tol %.3g)", name, m, (long long)r,
              (long long)c, got, want, tol);
      }
    }
  }
  printf("  %-12s worst error / bound = %.3f\n", name, worst);
}

// Chunks [b0, b1) on the host, in order: the CUDA launch (a block per chunk, a
// thread per vector) emulated serially.
template <typename scalar_t>
static void widen_chunks(const WidenJob<scalar_t>* jobs, const int64_t* chunk_begin, int64_t njobs, int64_t b0,
                  int64_t b1) {
  constexpr int VEC = widen_vec_width<scalar_t>();
  for (int64_t b = b0; b < b1; ++b) {
    int64_t j, v0, v1;
    chunk_vectors(jobs, chunk_begin, njobs, b, &j, &v0, &v1);
    for (int64_t v = v0; v < v1; ++v) widen_vec<scalar_t, VEC>(jobs[j], v * VEC);
  }
}

// The multi-tensor form (jobs, chunks, widen_vec: the CUDA kernel's per-thread
// code) writes the same bits as the row loop, for jobs of odd sizes that end
// mid-vector and mid-chunk, 1-D and 2-D mixed, members split across jobs.
template <typename S>
static void test_chunks_against_rows(const char* name) {
  constexpr int VEC = widen_vec_width<S>();
  std::vector<RandomGroup<S>> groups;
  groups.emplace_back(5, 7, 11, 13, true, 3, 11);        // smaller than one vector row
  groups.emplace_back(9, 1, 17, 1, false, 2, 12);        // 1-D
  groups.emplace_back(37, 61, 70, 129, true, 6, 13);     // > 1 chunk, 6 members -> 2 jobs
  groups.emplace_back(3, 1, 1, 1, false, 1, 14);         // one element
  groups.emplace_back(40, 50, 64, 128, true, 1, 15);     // whole chunks
  std::vector<WidenJob<S>> jobs;
  for (auto& t : groups) {
    for (int m0 = 0; m0 < t.M(); m0 += kJobMembers) {
      WidenJob<S> j;
      j.maps = t.g;
      j.numel = t.R * t.C;
      j.n_members = std::min(kJobMembers, t.M() - m0);
      for (int k = 0; k < j.n_members; ++k) j.m[k] = t.ms[m0 + k];
      jobs.push_back(j);
    }
  }
  std::vector<int64_t> begin(jobs.size() + 1);
  const int64_t nchunks = plan_chunks(jobs.data(), (int64_t)jobs.size(), begin.data());
  // every vector of every job is covered exactly once
  int64_t want_chunks = 0;
  for (const auto& j : jobs) want_chunks += ((j.numel + VEC - 1) / VEC + kChunkVecs - 1) / kChunkVecs;
  CHECK(nchunks == want_chunks, "%s: %lld chunks, want %lld", name, (long long)nchunks, (long long)want_chunks);
  // chunks in reverse order and one at a time: the order must not matter
  for (int64_t b = nchunks - 1; b >= 0; --b) widen_chunks(jobs.data(), begin.data(), (int64_t)jobs.size(), b, b + 1);
  for (auto& t : groups) {
    std::vector<std::vector<S>> chunked = t.dst;
    for (auto& d : t.dst) std::fill(d.begin(), d.end(), Traits<S>::store((typename Traits<S>::acc_t)7));
    widen_rows<S>(t.g, t.ms.data(), t.M(), 0, t.R);
    for (int m = 0; m < t.M(); ++m)
      CHECK(memcmp(chunked[m].data(), t.dst[m].data(), sizeof(S) * t.R * t.C) == 0,
            "%s: group %lldx%lld member %d differs from the row loop", name, (long long)t.R, (long long)t.C, m);
  }
  // find_job on chunk boundaries
  for (size_t j = 0; j < jobs.size(); ++j)
    if (begin[j] < begin[j + 1])
      CHECK(find_job(begin.data(), (int64_t)jobs.size(), begin[j]) == (int64_t)j &&
                find_job(begin.data(), (int64_t)jobs.size(), begin[j + 1] - 1) == (int64_t)j,
            "%s: find_job at the edges of job %zu", name, j);
  printf("  %-12s chunked == rows over %zu jobs, %lld chunks\n", name, jobs.size(), (long long)nchunks);
}

// Rows [lo, hi) built alone (maps, scales and dst of those rows, row_offset + lo)
// are bit-identical to those rows of the whole build, by the row loop and by the
// chunked path (widen_vec, the CUDA kernel's per-thread code), over a partition
// with empty and uneven pieces; a base offset near 2^32 checks the wrap.
template <typename S>
static void test_row_slices(bool two_d, const char* name) {
  constexpr int VEC = widen_vec_width<S>();
  const uint32_t bases[2] = {0u, 0xFFFFFFF0u};
  for (uint32_t base : bases) {
    RandomGroup<S> t(9, 11, 37, two_d ? 29 : 1, two_d, 3, 4321 + (two_d ? 1 : 0) + sizeof(S));
    t.g.row_offset = base;
    const int M = t.M();
    const int64_t R = t.R, C = t.C;
    widen_rows<S>(t.g, t.ms.data(), M, 0, R);
    const int64_t cuts[] = {0, 0, 1, 6, 6, 19, 20, 37};
    for (size_t k = 0; k + 1 < sizeof(cuts) / sizeof(cuts[0]); ++k) {
      const int64_t lo = cuts[k], hi = cuts[k + 1], n = hi - lo;
      GroupMaps<typename Traits<S>::acc_t> sub = t.g;
      sub.R = n;
      sub.row_src += lo;
      sub.row_sign += lo;
      sub.row_offset = base + (uint32_t)lo;
      for (int path = 0; path < 2; ++path) {
        std::vector<std::vector<S>> piece(M, std::vector<S>(n * C + 1));
        WidenJob<S> job;
        job.maps = sub;
        job.numel = n * C;
        job.n_members = M;
        for (int m = 0; m < M; ++m) {
          job.m[m] = t.ms[m];
          job.m[m].row_scale += lo;
          job.m[m].dst = piece[m].data();
        }
        if (path == 0) {
          widen_rows<S>(sub, job.m, M, 0, n);
        } else {
          for (int64_t v = 0; v * VEC < job.numel; ++v) widen_vec<S, VEC>(job, v * VEC);
        }
        for (int m = 0; m < M; ++m)
          CHECK(n == 0 || memcmp(piece[m].data(), t.dst[m].data() + lo * C, sizeof(S) * n * C) == 0,
                "%s: rows [%lld, %lld) (base %u, %s) member %d differ from the whole build", name,
                (long long)lo, (long long)hi, base, path ? "chunked" : "row loop", m);
      }
    }
  }
  printf("  %-12s row slices == whole\n", name);
}

// The lane-parallel normals of every instruction set this CPU has are the per-element
// code's bits: chosen words at the edges of the log and angle reductions, and runs of
// counters of every length up to a few vectors (tails included), along a row with
// arbitrary columns and down the rows (1-D), near the 2^32 wrap.
static void test_simd_normals() {
  std::vector<uint32_t> x0, x1;
  const uint32_t edges[] = {0u, 1u, 2u, 3u, 0x7FFFFFFEu, 0x7FFFFFFFu, 0x80000000u, 0x80000001u,
                            kBmSqrtHalf32 - 2u, kBmSqrtHalf32 - 1u, kBmSqrtHalf32, kBmSqrtHalf32 + 1u,
                            0x00FFFFFFu, 0x01000000u, 0x01FFFFFEu, 0x01FFFFFFu, 0x3FFFFFFFu, 0x40000000u,
                            0x1FFFFFFFu, 0x20000000u, 0x5FFFFFFFu, 0x60000000u, 0xBFFFFFFFu, 0xC0000000u,
                            0xDFFFFFFFu, 0xE0000000u, 0xFFFFFFFEu, 0xFFFFFFFFu};
  for (uint32_t a : edges)
    for (uint32_t b : edges) {
      x0.push_back(a);
      x1.push_back(b);
    }
  for (int k = 0; k < 32; ++k) {  // every power of two and its neighbours: the exponent trick's cases
    for (int d = -2; d <= 2; ++d) {
      x0.push_back((1u << k) + (uint32_t)d - 1u);  // n = x0 + 1 = 2^k + d
      x1.push_back((1u << k) + (uint32_t)d);
    }
  }
  std::mt19937 rng(99);
  for (int i = 0; i < 100000; ++i) {
    x0.push_back(rng());
    x1.push_back(rng());
  }
  const int64_t n = (int64_t)x0.size();
  std::vector<float> want(n), got(n);
  for (int64_t i = 0; i < n; ++i) want[i] = sqrtf(bm_radius2_f32(x0[i])) * bm_cos_f32(x1[i]);
  CHECK(bm_radius2_f32(0xFFFFFFFFu) == 0.0f, "u1 = 1 (x0 = 0xFFFFFFFF) must give radius 0");
  for (CpuIsa isa : {CpuIsa::Scalar, CpuIsa::Avx2, CpuIsa::Avx512}) {
    if (!cpu_isa_supported(isa)) {
      printf("  simd %-7s not on this CPU\n", cpu_isa_name(isa));
      continue;
    }
    box_muller_f32(isa, x0.data(), x1.data(), n, got.data());
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad += memcmp(&want[i], &got[i], 4) != 0;
    CHECK(bad == 0, "%s: Box-Muller differs from philox.h on %lld of %lld word pairs", cpu_isa_name(isa),
          (long long)bad, (long long)n);
    int64_t runs = 0;
    for (int64_t len = 0; len <= 70; ++len) {
      std::vector<int64_t> cols(len);
      for (auto& c : cols) c = (int64_t)(rng() % 5000);
      for (uint32_t row0 : {3u, 0xFFFFFFF0u}) {
        std::vector<float> out(len + 1, 7.0f), ref(len);
        philox_normals_f32(isa, 11u, 0xFEEDu, row0, 0u, cols.data(), len, out.data());
        for (int64_t i = 0; i < len; ++i) ref[i] = philox_normal_f32(11u, 0xFEEDu, row0, (uint32_t)cols[i]);
        CHECK(len == 0 || memcmp(out.data(), ref.data(), 4 * len) == 0, "%s: row run of %lld differs",
              cpu_isa_name(isa), (long long)len);
        CHECK(out[len] == 7.0f, "%s: row run of %lld wrote past its end", cpu_isa_name(isa), (long long)len);
        philox_normals_f32(isa, 5u, 6u, row0, 1u, nullptr, len, out.data());
        for (int64_t i = 0; i < len; ++i) ref[i] = philox_normal_f32(5u, 6u, row0 + (uint32_t)i, 0u);
        CHECK(len == 0 || memcmp(out.data(), ref.data(), 4 * len) == 0, "%s: column run of %lld differs",
              cpu_isa_name(isa), (long long)len);
        CHECK(out[len] == 7.0f, "%s: column run of %lld wrote past its end", cpu_isa_name(isa), (long long)len);
        ++runs;
      }
    }
    printf("  simd %-7s == per-element code on %lld word pairs and %lld runs\n", cpu_isa_name(isa), (long long)n,
           (long long)runs);
  }
}

// z alone (fresh entries, sigma_fresh = 1) against the double formula, over many counters.
static void test_normal_accuracy() {
  double worst32 = 0, worst64 = 0;
  for (uint32_t i = 0; i < 200000; ++i) {
    double rho;
    const double want = naive_normal(7, 11, i, i * 2654435761u, &rho);
    const double z32 = philox_normal_f32(7, 11, i, i * 2654435761u);
    const double z64 = philox_normal_f64(7, 11, i, i * 2654435761u);
    // float32: relative to |z| itself (exact angle reduction, log1p near u1 = 1);
    // float64: relative to rho, since the reference's own 2 pi u2 rounds (2^-50 in the angle)
    worst32 = fmax(worst32, fabs(z32 - want) / (fabs(want) * 0x1p-21 + rho * 0x1p-40));
    worst64 = fmax(worst64, fabs(z64 - want) / (rho * 0x1p-48));
  }
  printf("  normal: worst float32 error / (2^-21 |z|) = %.3f, float64 / (2^-48 rho) = %.3f\n", worst32,
         worst64);
  CHECK(worst32 <= 1.0, "float32 normal error %.3f of bound", worst32);
  CHECK(worst64 <= 1.0, "float64 normal error %.3f of bound", worst64);
}

int main() {
  printf("  the row loop draws normals with %s (GROWKERN_CPU_ISA caps it)\n", cpu_isa_name(cpu_isa()));
  test_kat();
  test_conversions();
  test_normal_accuracy();
  test_simd_normals();
  test_core_against_naive<float>(true, "float32 2-D");
  test_core_against_naive<float>(false, "float32 1-D");
  test_core_against_naive<double>(true, "float64 2-D");
  test_core_against_naive<double>(false, "float64 1-D");
  test_core_against_naive<f16_t>(true, "float16 2-D");
  test_core_against_naive<f16_t>(false, "float16 1-D");
  test_core_against_naive<bf16_t>(true, "bfloat16 2-D");
  test_core_against_naive<bf16_t>(false, "bfloat16 1-D");
  test_core_against_naive<float>(true, "float32 2-D off", 0xFFFFFFFAu);  // rows wrap mod 2^32
  test_core_against_naive<double>(false, "float64 1-D off", 0xFFFFFFFAu);
  test_row_slices<float>(true, "float32 2-D");
  test_row_slices<float>(false, "float32 1-D");
  test_row_slices<double>(true, "float64 2-D");
  test_row_slices<bf16_t>(true, "bfloat16 2-D");
  test_row_slices<f16_t>(false, "float16 1-D");
  test_chunks_against_rows<float>("float32");
  test_chunks_against_rows<double>("float64");
  test_chunks_against_rows<f16_t>("float16");
  test_chunks_against_rows<bf16_t>("bfloat16");
  printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures ? 1 : 0;
}
