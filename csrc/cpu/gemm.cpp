// hessmlp's CPU matrix product (gemm.h): the kernels of gemm_kernels.inc compiled for AVX-512
// and for AVX2 + FMA, and the choice between them and ATen.
#include "gemm.h"

#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define HM_GEMM_X86 1
#include <immintrin.h>
#endif

namespace hessmlp {
namespace cpu {

#if HM_GEMM_X86

#define HM_T512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#define HM_T256 __attribute__((target("avx2,fma")))

// Vector traits: the register type R of W entries of T, a column mask M, and the tile of
// MR rows x NV vectors whose accumulators (MR * NV of them) leave registers for the operands
// (AVX-512: 32 registers, 24 accumulators; AVX2: 16 registers, 12 accumulators).
struct V512F {
  using T = float;
  using R = __m512;
  using M = __mmask16;
  static constexpr int W = 16, MR = 12, NV = 2;
  HM_T512 static inline R zero() { return _mm512_setzero_ps(); }
  HM_T512 static inline R load(const T* p) { return _mm512_loadu_ps(p); }
  HM_T512 static inline R loadm(const T* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  HM_T512 static inline void store(T* p, R v) { _mm512_storeu_ps(p, v); }
  HM_T512 static inline void storem(T* p, R v, M m) { _mm512_mask_storeu_ps(p, m, v); }
  HM_T512 static inline R set1(T x) { return _mm512_set1_ps(x); }
  HM_T512 static inline R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static inline M mask(int n) { return static_cast<M>((1u << n) - 1u); }
};

struct V512D {
  using T = double;
  using R = __m512d;
  using M = __mmask8;
  static constexpr int W = 8, MR = 12, NV = 2;
  HM_T512 static inline R zero() { return _mm512_setzero_pd(); }
  HM_T512 static inline R load(const T* p) { return _mm512_loadu_pd(p); }
  HM_T512 static inline R loadm(const T* p, M m) { return _mm512_maskz_loadu_pd(m, p); }
  HM_T512 static inline void store(T* p, R v) { _mm512_storeu_pd(p, v); }
  HM_T512 static inline void storem(T* p, R v, M m) { _mm512_mask_storeu_pd(p, m, v); }
  HM_T512 static inline R set1(T x) { return _mm512_set1_pd(x); }
  HM_T512 static inline R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static inline M mask(int n) { return static_cast<M>((1u << n) - 1u); }
};

// AVX2's masks are vectors whose lanes have the sign bit set where they apply.
struct V256F {
  using T = float;
  using R = __m256;
  using M = __m256i;
  static constexpr int W = 8, MR = 6, NV = 2;
  HM_T256 static inline R zero() { return _mm256_setzero_ps(); }
  HM_T256 static inline R load(const T* p) { return _mm256_loadu_ps(p); }
  HM_T256 static inline R loadm(const T* p, M m) { return _mm256_maskload_ps(p, m); }
  HM_T256 static inline void store(T* p, R v) { _mm256_storeu_ps(p, v); }
  HM_T256 static inline void storem(T* p, R v, M m) { _mm256_maskstore_ps(p, m, v); }
  HM_T256 static inline R set1(T x) { return _mm256_set1_ps(x); }
  HM_T256 static inline R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  HM_T256 static inline M mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};

struct V256D {
  using T = double;
  using R = __m256d;
  using M = __m256i;
  static constexpr int W = 4, MR = 6, NV = 2;
  HM_T256 static inline R zero() { return _mm256_setzero_pd(); }
  HM_T256 static inline R load(const T* p) { return _mm256_loadu_pd(p); }
  HM_T256 static inline R loadm(const T* p, M m) { return _mm256_maskload_pd(p, m); }
  HM_T256 static inline void store(T* p, R v) { _mm256_storeu_pd(p, v); }
  HM_T256 static inline void storem(T* p, R v, M m) { _mm256_maskstore_pd(p, m, v); }
  HM_T256 static inline R set1(T x) { return _mm256_set1_pd(x); }
  HM_T256 static inline R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  HM_T256 static inline M mask(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
};

#define HM_ISA_TARGET HM_T512
#define HM_ISA_NS avx512
#define V_F V512F
#define V_D V512D
#include "gemm_kernels.inc"
#undef HM_ISA_TARGET
#undef HM_ISA_NS
#undef V_F
#undef V_D

#define HM_ISA_TARGET HM_T256
#define HM_ISA_NS avx2
#define V_F V256F
#define V_D V256D
#include "gemm_kernels.inc"
#undef HM_ISA_TARGET
#undef HM_ISA_NS
#undef V_F
#undef V_D

#endif  // HM_GEMM_X86

namespace {

// Products whose b is larger than this copy its slices into contiguous panels first.
constexpr int64_t kPackBytes = 128 << 10;

Isa isa_from_env(Isa best) {
  const char* env = std::getenv("HESSMLP_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa want = best;
  if (std::strcmp(env, "aten") == 0) want = Isa::Aten;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::Avx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::Avx512;
  else TORCH_WARN("hessmlp: HESSMLP_CPU_ISA=", env, " is not one of aten, avx2, avx512; ignored");
  return static_cast<int>(want) <= static_cast<int>(best) ? want : best;
}

// Rows per task when the product is split among threads: whole tiles, and enough work each
// (about 2^21 multiply-adds: below that, waking the threads costs more than they save).
int64_t grain_rows(int64_t N, int64_t K) {
  const int64_t per_row = std::max<int64_t>(1, N * K);
  return std::max<int64_t>(24, ((int64_t(1) << 21) / per_row + 23) / 24 * 24);
}

}  // namespace

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::Aten: return true;
#if HM_GEMM_X86
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") && isa_supported(Isa::Avx2);
#endif
    default: return false;
  }
}

Isa active_isa() {
  static const Isa isa = [] {
    Isa best = Isa::Aten;
    if (isa_supported(Isa::Avx512)) best = Isa::Avx512;
    else if (isa_supported(Isa::Avx2)) best = Isa::Avx2;
    return isa_from_env(best);
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    default: return "aten";
  }
}

void mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b_in, bool accumulate,
        Isa isa) {
  const int64_t M = a.size(0), K = a.size(1), N = b_in.size(1);
  const auto st = a.scalar_type();
  const bool own = isa != Isa::Aten && isa_supported(isa) &&
                   (st == at::kFloat || st == at::kDouble) && b_in.scalar_type() == st &&
                   out.scalar_type() == st && a.device().is_cpu() &&
                   (N <= 1 || out.stride(1) == 1) && out.stride(0) >= N;
  if (!own) {
    at::Tensor o = out;
    if (accumulate) {
      o.addmm_(a, b_in);
    } else {
      at::mm_out(o, a, b_in);
    }
    return;
  }
#if HM_GEMM_X86
  if (M == 0 || N == 0) return;
  const int64_t rs = a.stride(0), cs = a.stride(1);
  const int64_t ldc = M <= 1 ? N : out.stride(0);
  // b's rows must be contiguous (the kernels load vectors of a row): else (W^T) copied into
  // this thread's scratch (no ATen call: on small products its overhead would dominate).
  const bool b_rows = N <= 1 || b_in.stride(1) == 1;
  thread_local std::vector<char> scratch;
  AT_DISPATCH_FLOATING_TYPES(st, "hessmlp_cpu_mm", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b_in.data_ptr<scalar_t>();
    int64_t ldb = K <= 1 ? N : b_in.stride(0);
    if (!b_rows) {
      const int64_t s0 = b_in.stride(0), s1 = b_in.stride(1);
      scratch.resize(static_cast<size_t>(K * N) * sizeof(scalar_t));
      scalar_t* packed = reinterpret_cast<scalar_t*>(scratch.data());
      for (int64_t j = 0; j < N; ++j)
        for (int64_t k = 0; k < K; ++k) packed[k * N + j] = bp[k * s0 + j * s1];
      bp = packed;
      ldb = N;
    }
    scalar_t* cp = out.data_ptr<scalar_t>();
    // b packed into panels when larger than the L1 and L2 sets its rows would fall into.
    const bool pack = K * N * static_cast<int64_t>(sizeof(scalar_t)) > kPackBytes;
    auto run = [&](int64_t i0, int64_t i1) {
      if (isa == Isa::Avx512) {
        avx512::gemm_rows(i0, i1, N, K, ap, rs, cs, bp, ldb, cp, ldc, accumulate, pack);
      } else {
        avx2::gemm_rows(i0, i1, N, K, ap, rs, cs, bp, ldb, cp, ldc, accumulate, pack);
      }
    };
    const int64_t grain = grain_rows(N, K);
    if (at::in_parallel_region() || M <= grain || at::get_num_threads() <= 1) {
      run(0, M);
    } else {
      at::parallel_for(0, M, grain, run);
    }
  });
#endif
}

namespace {

Isa isa_of_name(c10::string_view name) {
  if (name.empty()) return active_isa();
  for (Isa isa : {Isa::Aten, Isa::Avx2, Isa::Avx512}) {
    if (name == isa_name(isa)) {
      TORCH_CHECK_VALUE(isa_supported(isa), "hessmlp: this CPU cannot run the '", isa_name(isa),
                        "' kernels");
      return isa;
    }
  }
  TORCH_CHECK_VALUE(false, "hessmlp: isa must be 'avx512', 'avx2', 'aten' or '', got '", name, "'");
}

at::Tensor cpu_mm_op(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c,
                     c10::string_view isa_name_) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0),
                    "hessmlp: _cpu_mm: a [M, K] and b [K, N] expected, got ", a.sizes(), " and ",
                    b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "hessmlp: _cpu_mm: a and b differ in dtype");
  const Isa isa = isa_of_name(isa_name_);
  const bool acc = c.has_value() && c->defined();
  at::Tensor out = acc ? c->to(a.scalar_type()).clone(at::MemoryFormat::Contiguous)
                         : at::empty({a.size(0), b.size(1)}, a.options());
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef({a.size(0), b.size(1)}), "hessmlp: _cpu_mm: c must be [M, N]");
  mm(out, a, b, acc, isa);
  return out;
}

std::vector<std::string> cpu_isa_op(const at::Tensor&) {
  std::vector<std::string> names{isa_name(active_isa())};
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Aten}) {
    if (isa_supported(isa)) names.emplace_back(isa_name(isa));
  }
  return names;
}

at::Tensor fma_peak_op(const at::Tensor& like, int64_t iterations) {
  TORCH_CHECK_VALUE(iterations > 0, "hessmlp: _fma_peak: iterations must be positive");
  const Isa isa = active_isa();
  const bool dbl = like.scalar_type() == at::kDouble;
  const int threads = at::get_num_threads();
  std::vector<double> sink(threads, 0.0);
  double lanes_per_step = 0;
#if HM_GEMM_X86
  if (isa == Isa::Avx512) lanes_per_step = dbl ? V512D::MR * V512D::NV * V512D::W : V512F::MR * V512F::NV * V512F::W;
  if (isa == Isa::Avx2) lanes_per_step = dbl ? V256D::MR * V256D::NV * V256D::W : V256F::MR * V256F::NV * V256F::W;
#endif
  TORCH_CHECK(lanes_per_step > 0, "hessmlp: _fma_peak needs the AVX2 or AVX-512 kernels (x86-64)");
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t t0_, int64_t t1_) {
    for (int64_t t = t0_; t < t1_; ++t) {
#if HM_GEMM_X86
      if (isa == Isa::Avx512) sink[t] = dbl ? avx512::fma_double(iterations) : avx512::fma_float(iterations);
      else sink[t] = dbl ? avx2::fma_double(iterations) : avx2::fma_float(iterations);
#endif
    }
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double s = 0;
  for (double v : sink) s += v;
  TORCH_CHECK(s == s, "hessmlp: _fma_peak: not a number");  // (keeps the chains' results)
  return at::tensor({secs, 2.0 * lanes_per_step * double(iterations) * threads},
                    at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

void mm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (out.dim() == 3) {  // batched: one product per entry, each split among the threads
    for (int64_t i = 0; i < out.size(0); ++i) mm(out[i], a[i], b[i], accumulate);
    return;
  }
  mm(out, a, b, accumulate);
}

}  // namespace cpu
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(hessmlp, CPU, m) {
  m.impl("_cpu_mm", &hessmlp::cpu::cpu_mm_op);
  m.impl("_cpu_isa", &hessmlp::cpu::cpu_isa_op);
  m.impl("_fma_peak", &hessmlp::cpu::fma_peak_op);
}
