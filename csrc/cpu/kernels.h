// The CPU's elementwise passes (see Kernels in csrc/jet_driver.h): loops over
// samples in parallel (at::parallel_for) and over neurons, calling the shared
// per-neuron math of csrc/jet_math.h.
#pragma once

#include "../jet_driver.h"

#include <algorithm>

namespace hessmlp {
namespace cpu {

// mlp_jet.cpp
void stage_forward(const StageArgs& a, at::Tensor& out, at::Tensor& s1, at::Tensor& s2);
void unpack(Mode mode, int64_t d, const at::Tensor& cols, at::Tensor& value, at::Tensor& jac,
            at::Tensor& hess);
void gram(const at::Tensor& w, const at::Tensor& t, at::Tensor& packed);
void unpack_packed(int64_t d, const at::Tensor& packed, at::Tensor& hess);
// mlp_jet_backward.cpp
void stage_adjoint(const StageArgs& a, at::Tensor& g);
void pack_adjoint(Mode mode, int64_t d, const at::Tensor& value, const at::Tensor& jac,
                  const at::Tensor& hess, at::Tensor& g);

inline const Kernels& kernels() {
  static const Kernels k{&stage_forward, &stage_adjoint, &unpack, &pack_adjoint, &gram,
                         &unpack_packed};
  return k;
}

// Samples per parallel task for a given amount of work per sample.
inline int64_t grain_for(int64_t work_per_sample) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_sample));
}

}  // namespace cpu
}  // namespace hessmlp
