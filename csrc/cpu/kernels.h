// The CPU's elementwise passes (see Kernels in csrc/jet_driver.h): loops over
// samples in parallel (at::parallel_for) and over neurons, calling the shared
// per-neuron math of csrc/jet_math.h.
#pragma once

#include "../jet_driver.h"

#include <ATen/Parallel.h>
#include "lanes.h"
#include "vmath.h"

#include <algorithm>

namespace hessmlp {
namespace cpu {

// Blocks of samples whose columns fill about this much cache go through all layers together.
constexpr int64_t kBlockBytes = 256 << 10;
// A batch that fits one block is still split among the threads when each gets this many samples.
constexpr int64_t kMinBlockRows = 32;

// Samples per block for a batch: at most what fills kBlockBytes (at least 8), in a number of
// blocks that is a multiple of the threads, of about equal size (the threads finish together).
inline int64_t rows_per_block(int64_t bytes_per_row, int64_t batch) {
  const int64_t most = std::max<int64_t>(8, kBlockBytes / std::max<int64_t>(1, bytes_per_row));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (batch < 2 * kMinBlockRows || threads == 1) return most;
  int64_t blocks = (batch + most - 1) / most;
  blocks = (blocks + threads - 1) / threads * threads;
  blocks = std::min(blocks, std::max<int64_t>((batch + most - 1) / most, batch / kMinBlockRows));
  return (batch + blocks - 1) / blocks;
}

// The products with the weight matrices: hessmlp's own kernels (gemm.h).
void mm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

#define HESSMLP_ROWS_PER_BLOCK &rows_per_block
#define HESSMLP_MM &mm_into
HESSMLP_DECLARE_KERNELS()
#undef HESSMLP_ROWS_PER_BLOCK
#undef HESSMLP_MM

// [4, B, n]: s, s1, s2, s3 of the stage at every neuron of the batch. The
// transcendental functions run as vectorised ATen ops over the whole layer, the
// rest (act_from_prims, compose) in one pass.
at::Tensor stage_derivs_batch(const StageArgs& a);

// A stage of at most one function with branch-free derivatives (is_smooth): its
// derivatives are computed on packs of neurons inside the jet pass from z + bias
// and the function's transcendental values, with no derivative arrays in memory.
inline bool fused_stage(const StageDesc& st) {
  return st.n_ops == 0 || (st.n_ops == 1 && is_smooth(st.codes[0]));
}

// The fused stages whose transcendental values the jet passes compute lane by lane
// (vmath.h) from z + bias: no arrays in memory at all. The others (gelu: erf; sin)
// take them from vectorised ATen ops over the layer.
inline bool lane_prims_code(int code) {
  return code == ACT_IDENTITY || code == ACT_AFFINE || code == ACT_SQUARE || code == ACT_TANH ||
         code == ACT_SIGMOID || code == ACT_SILU || code == ACT_GELU_TANH;
}

// For a fused stage: its code and parameters, and unless lane_prims_code(code),
// z + bias and the prims a, b (undefined when unused), [rows, n].
struct StagePrims {
  at::Tensor z, a, b;
  int code;
  double p0, p1;
};
StagePrims stage_prims(const StageArgs& a);
// The code and parameters of a fused stage, no tensors.
StagePrims stage_prims_of(const StageDesc& st);

// The prims of a lane_prims_code function at z (a lane), as act_prims gives them.
template <int Code, typename L>
inline HM_INLINE Prims<L> lane_prims(const L& z) {
  if constexpr (Code == ACT_TANH) {
    return {lane_tanh(z), L(0)};
  } else if constexpr (Code == ACT_SIGMOID || Code == ACT_SILU) {
    return {lane_sigmoid(z), L(0)};
  } else if constexpr (Code == ACT_GELU_TANH) {
    return {lane_tanh(gelu_tanh_arg(z)), L(0)};
  } else {
    return {L(0), L(0)};
  }
}

// Calls body(std::integral_constant<int, code>) for the code of a fused stage.
template <typename Body>
inline HM_INLINE void with_smooth_code(int code, Body&& body) {
  switch (code) {
    case ACT_AFFINE: return body(std::integral_constant<int, ACT_AFFINE>());
    case ACT_TANH: return body(std::integral_constant<int, ACT_TANH>());
    case ACT_SIGMOID: return body(std::integral_constant<int, ACT_SIGMOID>());
    case ACT_SILU: return body(std::integral_constant<int, ACT_SILU>());
    case ACT_GELU: return body(std::integral_constant<int, ACT_GELU>());
    case ACT_GELU_TANH: return body(std::integral_constant<int, ACT_GELU_TANH>());
    case ACT_SIN: return body(std::integral_constant<int, ACT_SIN>());
    case ACT_SQUARE: return body(std::integral_constant<int, ACT_SQUARE>());
    default: return body(std::integral_constant<int, ACT_IDENTITY>());
  }
}

// Where a lane's derivatives come from: derivative arrays D [4, N] (any stage), or
// for fused stages (Code known at compile time) z + bias and prims arrays, or the
// stage's input rows and bias alone (lane_prims_code: the prims computed here).
template <typename T>
struct DerivSource {
  const T* d;            // D, or null
  int64_t N, n;          // B * n, and n
  const T *z, *pa, *pb;  // z + bias and prims [B, n], or null
  const T* zr;           // else: z before the bias, rows zr_stride apart, and the bias (or null)
  int64_t zr_stride;
  const T* bias;
  T p0, p1;

  template <int Code, typename L>
  inline __attribute__((always_inline)) Derivs<L> at(int64_t b, int64_t i) const {
    const int64_t r = b * n + i;
    if (d) {
      return Derivs<L>{lane_load<L>(d, r), lane_load<L>(d + N, r), lane_load<L>(d + 2 * N, r),
                       lane_load<L>(d + 3 * N, r)};
    }
    if (z) {
      const Prims<L> pr{pa ? lane_load<L>(pa, r) : L(0), pb ? lane_load<L>(pb, r) : L(0)};
      return smooth_from_prims<Code, L>(L(p0), L(p1), lane_load<L>(z, r), pr);
    }
    L zb = lane_load<L>(zr + b * zr_stride, i);
    if (bias) zb = zb + lane_load<L>(bias, i);
    return smooth_from_prims<Code, L>(L(p0), L(p1), zb, lane_prims<Code, L>(zb));
  }
};

template <typename T>
DerivSource<T> derivs_source(const at::Tensor& D, const StagePrims& p, const StageInput<T>& in,
                             int64_t batch, int64_t n) {
  DerivSource<T> src{};
  src.N = batch * n;
  src.n = n;
  if (D.defined()) {
    src.d = D.data_ptr<T>();
    return src;
  }
  src.p0 = static_cast<T>(p.p0);
  src.p1 = static_cast<T>(p.p1);
  if (p.z.defined()) {
    src.z = p.z.data_ptr<T>();
    src.pa = p.a.defined() ? p.a.data_ptr<T>() : nullptr;
    src.pb = p.b.defined() ? p.b.data_ptr<T>() : nullptr;
  } else {
    src.zr = in.z;
    src.zr_stride = in.z_stride;
    src.bias = in.bias;
  }
  return src;
}

// Calls fn(f, t, s, g, r) for every lane of samples b0..b1 of a stage: f its derivatives
// (from src, Code as in with_smooth_code), t / s its first- and second-order input
// rows, g its rows of the [B, C, n] columns at `cols`, r its first entry in a [B, n]
// array. The jet pass and its adjoint differ only in fn.
template <int Code, typename T, typename Fn>
inline __attribute__((always_inline)) void for_stage_lanes(
    Mode mode, int64_t d, int64_t n, const StageInput<T>& in, const DerivSource<T>& src,
    T* cols, int64_t b0, int64_t b1, Fn&& fn) {
  const int64_t C = 1 + d + n_pairs(mode, d);
  for (int64_t b = b0; b < b1; ++b) {
    const T* t = in.t_of(b);
    const T* s = in.s_of(b);
    T* g = cols + b * C * n;
    for_each_lane<T>(n, [&](auto lane, int64_t i) HM_INLINE {
      using L = decltype(lane);
      fn(src.template at<Code, L>(b, i), lane_ptr<L>(t, i), lane_ptr<L>(s, i), lane_ptr<L>(g, i),
         b * n + i);
    });
  }
}

// stage_derivs_batch and stage_prims, taken from (or left in) the StageArgs' cache.
inline at::Tensor stage_derivs_cached(const StageArgs& a) {
  if (a.cache && a.cache->t[0].defined()) return a.cache->t[0];
  at::Tensor D = stage_derivs_batch(a);
  if (a.cache) a.cache->t[0] = D;
  return D;
}

inline StagePrims stage_prims_cached(const StageArgs& a) {
  StagePrims p = stage_prims_of(a.stage);
  if (lane_prims_code(p.code)) return p;  // nothing to compute or keep
  if (a.cache && a.cache->t[0].defined()) {
    p.z = a.cache->t[0];
    p.a = a.cache->t[1];
    p.b = a.cache->t[2];
    return p;
  }
  p = stage_prims(a);
  if (a.cache) *a.cache = StageCache{{p.z, p.a, p.b}};
  return p;
}

// Lanes of the per-neuron math on the CPU: as many neurons as fill 64 bytes.
template <typename T>
constexpr int kLanes = static_cast<int>(64 / sizeof(T));

// Calls body(lane, i) for the neurons of a row of n: packs of kLanes<T> first
// (lane = Pack), then one at a time (lane = scalar).
template <typename T, typename Body>
inline HM_INLINE void for_each_lane(int64_t n, Body&& body) {
  int64_t i = 0;
  for (; i + kLanes<T> <= n; i += kLanes<T>) body(Pack<T, kLanes<T>>(), i);
  for (; i < n; ++i) body(T(), i);
}

// Samples per parallel task for a given amount of work per sample.
inline int64_t grain_for(int64_t work_per_sample) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_sample));
}

}  // namespace cpu
}  // namespace hessmlp
