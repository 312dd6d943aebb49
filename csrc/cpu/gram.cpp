// CPU kernels of reverse-Gram's weighted Gram (Kernels::gram) and the unpacking of its packed
// triangle, in a translation unit of their own (the build compiles it beside mlp_jet.cpp).
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>
#include <vector>

namespace hessmlp {
namespace cpu {
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
