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

// mlp_jet.cu
void stage_forward(const StageArgs& a, at::Tensor& out, at::Tensor& s1, at::Tensor& s2);
void unpack(Mode mode, int64_t d, const at::Tensor& cols, at::Tensor& value, at::Tensor& jac,
            at::Tensor& hess);
void gram(const at::Tensor& w, const at::Tensor& t, at::Tensor& packed);
void unpack_packed(int64_t d, const at::Tensor& packed, at::Tensor& hess);
// mlp_jet_backward.cu
void stage_adjoint(const StageArgs& a, at::Tensor& g);
void pack_adjoint(Mode mode, int64_t d, const at::Tensor& value, const at::Tensor& jac,
                  const at::Tensor& hess, at::Tensor& g);

inline const Kernels& kernels() {
  static const Kernels k{&stage_forward, &stage_adjoint, &unpack, &pack_adjoint, &gram,
                         &unpack_packed};
  return k;
}

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
