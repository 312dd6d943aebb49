// The CPU's elementwise passes (see Kernels in csrc/jet_driver.h): loops over
// samples in parallel (at::parallel_for) and over neurons, calling the shared
// per-neuron math of csrc/jet_math.h.
#pragma once

#include "../jet_driver.h"
#include "lanes.h"

#include <algorithm>

namespace hessmlp {
namespace cpu {

// Blocks of samples whose columns fill about this much cache go through all layers together.
constexpr int64_t kBlockBytes = 256 << 10;
inline int64_t rows_per_block(int64_t bytes_per_row) {
  return std::max<int64_t>(8, kBlockBytes / std::max<int64_t>(1, bytes_per_row));
}

#define HESSMLP_ROWS_PER_BLOCK &rows_per_block
HESSMLP_DECLARE_KERNELS()
#undef HESSMLP_ROWS_PER_BLOCK

// [4, B, n]: s, s1, s2, s3 of the stage at every neuron of the batch. The
// transcendental functions run as vectorised ATen ops over the whole layer, the
// rest (act_from_prims, compose) in one pass.
at::Tensor stage_derivs_batch(const StageArgs& a);

// The same, taken from (or left in) the StageArgs' cache slot.
inline at::Tensor stage_derivs_cached(const StageArgs& a) {
  if (a.derivs && a.derivs->defined()) return *a.derivs;
  at::Tensor D = stage_derivs_batch(a);
  if (a.derivs) *a.derivs = D;
  return D;
}

// Lanes of the per-neuron math on the CPU: as many neurons as fill 64 bytes.
template <typename T>
constexpr int kLanes = static_cast<int>(64 / sizeof(T));

// Calls body(lane, i) for the neurons of a row of n: packs of kLanes<T> first
// (lane = Pack), then one at a time (lane = scalar).
template <typename T, typename Body>
inline void for_each_lane(int64_t n, Body&& body) {
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
