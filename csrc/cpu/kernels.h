// The CPU's elementwise passes (see Kernels in csrc/jet_driver.h): loops over
// samples in parallel (at::parallel_for) and over neurons, calling the shared
// per-neuron math of csrc/jet_math.h.
#pragma once

#include "../jet_driver.h"

#include <algorithm>

namespace hessmlp {
namespace cpu {

HESSMLP_DECLARE_KERNELS()

// Samples per parallel task for a given amount of work per sample.
inline int64_t grain_for(int64_t work_per_sample) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_sample));
}

}  // namespace cpu
}  // namespace hessmlp
