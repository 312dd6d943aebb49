// CPU kernels of hessmlp::mlp_jet: the stage pass of the forward jet, the
// unpacking of the last layer's columns, and reverse-Gram's weighted Gram.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

namespace hessmlp {
namespace cpu {

namespace {

// The ATen op that gives prims a and b of one function over a layer (see act_prims).
std::pair<at::Tensor, at::Tensor> prims_of(int code, double p0, double p1, const at::Tensor& z) {
  switch (code) {
    case ACT_TANH: return {at::tanh(z), {}};
    case ACT_SIGMOID:
    case ACT_SILU: return {at::sigmoid(z), {}};
    case ACT_SOFTPLUS: return {at::sigmoid(z * p0), at::softplus(z, p0, p1)};
    case ACT_GELU: return {at::erf(z * kInvSqrt2), at::exp(z * z * -0.5)};
    case ACT_GELU_TANH: return {at::tanh((z + z * z * z * kGeluK1) * kGeluK0), {}};
    case ACT_ELU: {
      const at::Tensor zn = at::clamp_max(z, 0.0);  // (keeps NaN)
      return {at::expm1(zn), at::exp(zn)};
    }
    case ACT_SIN: {
      const at::Tensor w = z * p0;
      return {at::sin(w), at::cos(w)};
    }
    default: return {};
  }
}

// Calls body with the activation code as a compile-time constant (so that the
// per-element algebra has no switch left in its loop).
template <typename Body>
void with_code(int code, Body&& body) {
  switch (code) {
#define HM_CODE_CASE(c) \
  case c:               \
    return body(std::integral_constant<int, c>());
    HM_CODE_CASE(ACT_IDENTITY) HM_CODE_CASE(ACT_AFFINE) HM_CODE_CASE(ACT_TANH)
    HM_CODE_CASE(ACT_SIGMOID) HM_CODE_CASE(ACT_SOFTPLUS) HM_CODE_CASE(ACT_SILU)
    HM_CODE_CASE(ACT_GELU) HM_CODE_CASE(ACT_GELU_TANH) HM_CODE_CASE(ACT_RELU)
    HM_CODE_CASE(ACT_LEAKY_RELU) HM_CODE_CASE(ACT_ELU) HM_CODE_CASE(ACT_SIN)
    HM_CODE_CASE(ACT_SQUARE)
#undef HM_CODE_CASE
    default: return body(code);
  }
}

}  // namespace

at::Tensor stage_derivs_batch(const StageArgs& a) {
  const at::Tensor z = a.first ? a.state : a.state.select(1, 0);  // [B, n], before the bias
  // A fresh copy: it is overwritten with each function's output below.
  at::Tensor cur = a.bias.defined() ? at::add(z, a.bias) : z.clone(at::MemoryFormat::Contiguous);
  const int64_t N = a.batch * a.n;
  at::Tensor D = at::empty({4, a.batch, a.n}, z.options());
  if (a.stage.n_ops == 0) {
    D[0].copy_(cur);
    D[1].fill_(1);
    D.narrow(0, 2, 2).zero_();
    return D;
  }
  for (int k = 0; k < a.stage.n_ops; ++k) {
    const int code = a.stage.codes[k];
    const double p0 = a.stage.params[2 * k], p1 = a.stage.params[2 * k + 1];
    const auto prims = prims_of(code, p0, p1, cur);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_jet_stage_derivs_cpu", [&] {
      const scalar_t* pa = prims.first.defined() ? prims.first.data_ptr<scalar_t>() : nullptr;
      const scalar_t* pb = prims.second.defined() ? prims.second.data_ptr<scalar_t>() : nullptr;
      scalar_t* cp = cur.data_ptr<scalar_t>();
      scalar_t* dp = D.data_ptr<scalar_t>();
      at::parallel_for(0, N, 4096, [&](int64_t i0, int64_t i1) {
        with_code(code, [&](auto code_c) {
          for (int64_t i = i0; i < i1; ++i) {
            const Prims<scalar_t> pr{pa ? pa[i] : scalar_t(0), pb ? pb[i] : scalar_t(0)};
            const Derivs<scalar_t> g =
                act_from_prims<scalar_t>(code_c, scalar_t(p0), scalar_t(p1), cp[i], pr);
            Derivs<scalar_t> f = g;
            if (k > 0) f = compose(Derivs<scalar_t>{dp[i], dp[N + i], dp[2 * N + i], dp[3 * N + i]}, g);
            dp[i] = f.s;
            dp[N + i] = f.s1;
            dp[2 * N + i] = f.s2;
            dp[3 * N + i] = f.s3;
            cp[i] = g.s;  // the next function's input
          }
        });
      });
    });
  }
  return D;
}

StagePrims stage_prims_of(const StageDesc& st) {
  StagePrims p;
  p.code = st.n_ops == 0 ? ACT_IDENTITY : st.codes[0];
  p.p0 = st.n_ops == 0 ? 0.0 : st.params[0];
  p.p1 = st.n_ops == 0 ? 0.0 : st.params[1];
  return p;
}

StagePrims stage_prims(const StageArgs& a) {
  const at::Tensor z = a.first ? a.state : a.state.select(1, 0);
  StagePrims p = stage_prims_of(a.stage);
  p.z = a.bias.defined() ? at::add(z, a.bias) : z.contiguous();
  std::tie(p.a, p.b) = prims_of(p.code, p.p0, p.p1, p.z);
  return p;
}

namespace {

// The jet step of samples b0..b1 (all their neurons), derivatives from src; the
// stage's first and second derivatives also into s1, s2 [B, n] where not null.
template <typename T>
HM_SIMD_CLONES void step_rows(Mode mode, int64_t d, int64_t n, const StageInput<T>& in,
                              const DerivSource<T>& src, int code, T* op, T* s1, T* s2,
                              int64_t b0, int64_t b1) {
  with_smooth_code(code, [&](auto c) HM_INLINE {
    auto rows = [&](Mode md, int64_t dd) HM_INLINE {
      for_stage_lanes<decltype(c)::value, T>(
          md, dd, n, in, src, op, b0, b1, [&](const auto& f, auto t, auto s, auto out, int64_t r) HM_INLINE {
            using L = std::decay_t<decltype(f.s)>;
            if (s1) lane_ptr<L>(s1, r)[0] = f.s1;
            if (s2) lane_ptr<L>(s2, r)[0] = f.s2;
            jet_step_neuron(md, dd, f, t, s, n, out);
          });
    };
    // Reverse-Gram's forward (mode none) at small d: d a constant, its loops unrolled.
    if (mode == Mode::None) {
      switch (d) {
        case 0: return rows(Mode::None, 0);
        case 1: return rows(Mode::None, 1);
        case 2: return rows(Mode::None, 2);
        case 3: return rows(Mode::None, 3);
        case 4: return rows(Mode::None, 4);
        default: break;
      }
    }
    rows(mode, d);
  });
}

}  // namespace

void stage_forward(const StageArgs& a, at::Tensor& out, at::Tensor& s1, at::Tensor& s2) {
  const int64_t n = a.n, d = a.d;
  const int64_t C = 1 + d + n_pairs(a.mode, d);
  const bool fused = fused_stage(a.stage);
  const at::Tensor D = fused ? at::Tensor() : stage_derivs_cached(a);
  const StagePrims pr = fused ? stage_prims_cached(a) : StagePrims{};
  if (!fused && s1.defined()) s1.copy_(D[1]);
  if (!fused && s2.defined()) s2.copy_(D[2]);
  AT_DISPATCH_FLOATING_TYPES(a.state.scalar_type(), "mlp_jet_stage_cpu", [&] {
    const StageInput<scalar_t> in = stage_input<scalar_t>(a);
    const DerivSource<scalar_t> src = derivs_source<scalar_t>(D, pr, in, a.batch, n);
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* s1p = fused && s1.defined() ? s1.data_ptr<scalar_t>() : nullptr;
    scalar_t* s2p = fused && s2.defined() ? s2.data_ptr<scalar_t>() : nullptr;
    const int code = fused ? pr.code : ACT_IDENTITY;  // with D, the code is not used
    at::parallel_for(0, a.batch, grain_for(C * n), [&](int64_t b0, int64_t b1) {
      step_rows<scalar_t>(a.mode, d, n, in, src, code, op, s1p, s2p, b0, b1);
    });
  });
}

void unpack(Mode mode, int64_t d, const at::Tensor& cols, at::Tensor& value, at::Tensor& jac,
            at::Tensor& hess) {
  const int64_t B = cols.size(0), C = cols.size(1), m = cols.size(2);
  const int64_t h_per = mode == Mode::None ? 0 : hess.numel() / (B * m);  // per (b, k)
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "mlp_jet_unpack_cpu", [&] {
    const scalar_t* cp = cols.data_ptr<scalar_t>();
    scalar_t* vp = value.data_ptr<scalar_t>();
    scalar_t* jp = jac.data_ptr<scalar_t>();
    scalar_t* hp = h_per ? hess.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, grain_for(C * m), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t k = 0; k < m; ++k) {
          const int64_t r = b * m + k;
          unpack_output<scalar_t>(mode, d, cp + b * C * m + k, m, vp + r, jp + r * d,
                                  hp ? hp + r * h_per : nullptr);
        }
    });
  });
}

namespace {

template <typename T, typename L>
inline T lane_sum(const L& v) {
  if constexpr (std::is_arithmetic<L>::value) {
    return v;
  } else {
    T s = T(0);
    for (const T e : v.v) s += e;
    return s;
  }
}

// Reverse-Gram at one stage for samples b0..b1 (see Kernels::gram); w: n entries of work space.
template <typename T>
HM_SIMD_CLONES void gram_rows(Mode mode, int64_t d, int64_t m, int64_t n, T* g, const T* s1,
                              const T* s2, const T* t, int64_t tb_stride, int64_t tr_stride,
                              T* packed, int64_t pb_stride, T* w, int64_t b0, int64_t b1) {
  const int64_t Q = n_pairs(mode, d), J = gram_terms(mode, d);
  for (int64_t b = b0; b < b1; ++b) {
    const T* tb = t + b * tb_stride;
    for (int64_t k = 0; k < m; ++k) {
      T* gk = g + (b * m + k) * n;
      for_each_lane<T>(n, [&](auto lane, int64_t i) HM_INLINE {
        using L = decltype(lane);
        lane_ptr<L>(w, i)[0] = L(lane_ptr<L>(gk, i)[0]) * L(lane_ptr<L>(s2 + b * n, i)[0]);
      });
      T* pk = packed + b * pb_stride + k * Q;
      for (int64_t q = 0; q < Q; ++q) {
        T total = T(0);
        for (int64_t j = 0; j < J; ++j) {
          int64_t a, c;
          gram_term(mode, d, q, j, &a, &c);
          const T* ta = tb + a * tr_stride;
          const T* tc = tb + c * tr_stride;
          // Two partial sums of packs (half the chain of dependent adds), then the tail.
          using P = Pack<T, kLanes<T>>;
          constexpr int64_t K = kLanes<T>;
          P acc0(0), acc1(0);
          int64_t i = 0;
          for (; i + 2 * K <= n; i += 2 * K) {
            acc0 = acc0 + P::load(w + i) * P::load(ta + i) * P::load(tc + i);
            acc1 = acc1 + P::load(w + i + K) * P::load(ta + i + K) * P::load(tc + i + K);
          }
          if (i + K <= n) {
            acc0 = acc0 + P::load(w + i) * P::load(ta + i) * P::load(tc + i);
            i += K;
          }
          T tail = T(0);
          for (; i < n; ++i) tail += w[i] * ta[i] * tc[i];
          total += lane_sum<T>(acc0 + acc1) + tail;
        }
        pk[q] += total;
      }
      for_each_lane<T>(n, [&](auto lane, int64_t i) HM_INLINE {
        using L = decltype(lane);
        lane_ptr<L>(gk, i)[0] = L(lane_ptr<L>(gk, i)[0]) * L(lane_ptr<L>(s1 + b * n, i)[0]);
      });
    }
  }
}

// A GCC vector of N bytes of T.
template <typename T, int N>
struct Vec {
  typedef T type __attribute__((vector_size(N)));
};

// The sum of a vector's entries: halves added down to 16 bytes, then those entries.
template <typename T, int N>
inline HM_INLINE T vec_sum(const typename Vec<T, N>::type& v) {
  if constexpr (N <= 16) {
    T s = v[0];
    for (int e = 1; e < static_cast<int>(N / sizeof(T)); ++e) s += v[e];
    return s;
  } else {
    typename Vec<T, N / 2>::type lo, hi;
    std::memcpy(&lo, &v, N / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + N / 2, N / 2);
    return vec_sum<T, N / 2>(lo + hi);
  }
}

// The same for d = D <= kGramSmallD, with the mode M fixed too: one pass over the
// neurons with every entry's partial sums in registers (and g *= s1 in that pass).
constexpr int64_t kGramSmallD = 4;

template <typename T, int D, Mode M>
HM_SIMD_CLONES void gram_rows_small(int64_t m, int64_t n, T* g, const T* s1, const T* s2,
                                    const T* t, int64_t tb_stride, int64_t tr_stride, T* packed,
                                    int64_t pb_stride, int64_t b0, int64_t b1) {
  constexpr int Q = M == Mode::Full ? D * (D + 1) / 2 : M == Mode::Diag ? D : 1;
  // A GCC vector of 64 bytes: zmm, two ymm or four xmm registers by the clone's target
  // (arrays of Packs here would live on the stack).
  using V = typename Vec<T, 64>::type;
  constexpr int64_t K = 64 / sizeof(T);
  auto load = [](const T* p) HM_INLINE {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  };
  // Entry q of one neuron (or pack): its weight w times the mode's product of T's rows, in
  // gram_term's order, unrolled here by hand (calling gram_term leaves its pair search and
  // the row array to run time: the vectors spill to the stack).
  auto terms = [](auto w, const auto* ta, auto* term) HM_INLINE {
    if constexpr (M == Mode::Full) {
      int q = 0;
      for (int a = 0; a < D; ++a) {
        const auto wa = w * ta[a];
        for (int c = a; c < D; ++c) term[q++] = wa * ta[c];
      }
    } else if constexpr (M == Mode::Diag) {
      for (int a = 0; a < D; ++a) term[a] = w * ta[a] * ta[a];
    } else {
      auto sq = ta[0] * ta[0];
      for (int a = 1; a < D; ++a) sq = sq + ta[a] * ta[a];
      term[0] = w * sq;
    }
  };
  for (int64_t b = b0; b < b1; ++b) {
    const T* tb = t + b * tb_stride;
    const T* s1b = s1 + b * n;
    const T* s2b = s2 + b * n;
    for (int64_t k = 0; k < m; ++k) {
      T* gk = g + (b * m + k) * n;
      V acc[Q];
      for (int q = 0; q < Q; ++q) acc[q] = V{} ;
      int64_t i = 0;
      for (; i + K <= n; i += K) {
        const V gi = load(gk + i);
        const V w = gi * load(s2b + i);
        const V gs = gi * load(s1b + i);
        std::memcpy(gk + i, &gs, sizeof(V));
        V ta[D], term[Q];
        for (int a = 0; a < D; ++a) ta[a] = load(tb + a * tr_stride + i);
        terms(w, ta, term);
        for (int q = 0; q < Q; ++q) acc[q] += term[q];
      }
      T tail[Q] = {};
      for (; i < n; ++i) {
        const T w = gk[i] * s2b[i];
        gk[i] *= s1b[i];
        T ta[D], term[Q];
        for (int a = 0; a < D; ++a) ta[a] = tb[a * tr_stride + i];
        terms(w, ta, term);
        for (int q = 0; q < Q; ++q) tail[q] += term[q];
      }
      T* pk = packed + b * pb_stride + k * Q;
      for (int q = 0; q < Q; ++q) pk[q] += tail[q] + vec_sum<T, sizeof(V)>(acc[q]);
    }
  }
}

template <typename T, Mode M>
void gram_small(int64_t d, int64_t m, int64_t n, T* g, const T* s1, const T* s2, const T* t,
                int64_t tb, int64_t tr, T* packed, int64_t pb, int64_t b0, int64_t b1) {
  switch (d) {
    case 1: return gram_rows_small<T, 1, M>(m, n, g, s1, s2, t, tb, tr, packed, pb, b0, b1);
    case 2: return gram_rows_small<T, 2, M>(m, n, g, s1, s2, t, tb, tr, packed, pb, b0, b1);
    case 3: return gram_rows_small<T, 3, M>(m, n, g, s1, s2, t, tb, tr, packed, pb, b0, b1);
    default: return gram_rows_small<T, 4, M>(m, n, g, s1, s2, t, tb, tr, packed, pb, b0, b1);
  }
}

}  // namespace

void gram(Mode mode, at::Tensor& g, const at::Tensor& s1, const at::Tensor& s2,
          const at::Tensor& t, at::Tensor& packed) {
  const int64_t B = g.size(0), m = g.size(1), n = g.size(2), d = t.size(-2);
  const bool shared = t.dim() == 2;
  const int64_t Q = packed.size(-1);
  // (The strides of dimensions of size 1 are arbitrary.)
  TORCH_INTERNAL_ASSERT((n == 1 || t.stride(-1) == 1) && (Q == 1 || packed.stride(-1) == 1) &&
                        (m == 1 || packed.stride(-2) == Q));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "mlp_jet_gram_cpu", [&] {
    scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* s1p = s1.data_ptr<scalar_t>();
    const scalar_t* s2p = s2.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* pp = packed.data_ptr<scalar_t>();
    const int64_t tb = shared ? 0 : t.stride(0), tr = t.stride(-2), pb = packed.stride(0);
    at::parallel_for(0, B, grain_for(m * n * (1 + n_pairs(mode, d))), [&](int64_t b0, int64_t b1) {
      if (d <= kGramSmallD && mode == Mode::Full) {
        gram_small<scalar_t, Mode::Full>(d, m, n, gp, s1p, s2p, tp, tb, tr, pp, pb, b0, b1);
      } else if (d <= kGramSmallD && mode == Mode::Diag) {
        gram_small<scalar_t, Mode::Diag>(d, m, n, gp, s1p, s2p, tp, tb, tr, pp, pb, b0, b1);
      } else if (d <= kGramSmallD && mode == Mode::Trace) {
        gram_small<scalar_t, Mode::Trace>(d, m, n, gp, s1p, s2p, tp, tb, tr, pp, pb, b0, b1);
      } else {
        std::vector<scalar_t> w(n);
        gram_rows<scalar_t>(mode, d, m, n, gp, s1p, s2p, tp, tb, tr, pp, pb, w.data(), b0, b1);
      }
    });
  });
}

void unpack_packed(int64_t d, const at::Tensor& packed, at::Tensor& hess) {
  const int64_t rows = packed.size(0), P = packed.size(1);
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "mlp_jet_unpack_packed_cpu", [&] {
    const scalar_t* pp = packed.data_ptr<scalar_t>();
    scalar_t* hp = hess.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* h = pp + r * P;
        scalar_t* o = hp + r * d * d;
        int64_t p = 0;
        for (int64_t a = 0; a < d; ++a)
          for (int64_t c = a; c < d; ++c, ++p) o[a * d + c] = o[c * d + a] = h[p];
      }
    });
  });
}

}  // namespace cpu
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(hessmlp, CPU, m) {
  m.impl("mlp_jet", &hessmlp::mlp_jet_op<&hessmlp::cpu::kernels>);
}
