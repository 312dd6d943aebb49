// The CUDA elementwise passes (see Kernels in csrc/jet_driver.h): one thread
// per (sample, neuron) or (sample, output), calling the shared per-neuron math
// of csrc/jet_math.h. 64-bit indices, grid-stride loops, the current stream.
#pragma once

#include "../jet_driver.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace hessmlp {
namespace cuda {

// The GPU takes the whole batch at once.
#define HESSMLP_ROWS_PER_BLOCK nullptr
HESSMLP_DECLARE_KERNELS()
#undef HESSMLP_ROWS_PER_BLOCK

constexpr int kThreads = 256;

// Blocks for `work` items at kThreads each; the kernels loop over the rest.
inline unsigned int blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20)));
}

#define HM_GRID_LOOP(i, total)                                                          \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (total); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

}  // namespace cuda
}  // namespace hessmlp
