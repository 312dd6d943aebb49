// The forward jet pass on the CPU (DESIGN.md §2), shared by both methods of
// the mlp_jet CPU kernel and by its backward: forward jets run it with the
// requested mode, reverse-Gram runs it with Mode::None and keeps each layer's
// Jacobian and derivatives, the backward keeps each layer's pre-activation state.
#pragma once

#include "../jet_common.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <vector>

namespace hessmlp {
namespace cpu {

// What forward_pass keeps besides the last layer's columns.
enum class Keep { Nothing, Gram, State };

struct ForwardPass {
  at::Tensor out;                 // [B, 1 + d + P, m]  columns after the last stage
  // Keep::Gram, one entry per Linear l:
  std::vector<at::Tensor> jac;    // [B, d, n_l]  dz_l/dx (layer 0: W_0^T expanded over B)
  std::vector<at::Tensor> s1;     // [B, n_l]     stage derivatives at z_l
  std::vector<at::Tensor> s2;     // [B, n_l]
  // Keep::State, one entry per Linear l: its output before the bias and the stage,
  // the saved state of the backward (see mlp_jet in csrc/ops.cpp).
  std::vector<at::Tensor> state;  // l = 0: [B, n_0] (x W_0^T);  l > 0: [B, 1 + d + P, n_l]
};

ForwardPass forward_pass(const NetSpec& net, Mode mode, const at::Tensor& x,
                         at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& biases,
                         at::IntArrayRef act_codes, at::ArrayRef<double> act_params,
                         Keep keep);

// The stage after Linear l applied to that layer's saved state (as in
// ForwardPass::state): the stacked columns u, U, V [B, 1 + d + P, n_l] that
// feed Linear l + 1. w0t = W_0^T [d, n_0] contiguous (only read for l = 0).
at::Tensor stage_forward(const NetSpec& net, Mode mode, int64_t l, const at::Tensor& state,
                         const at::Tensor& w0t,
                         const c10::List<std::optional<at::Tensor>>& biases,
                         at::IntArrayRef act_codes, at::ArrayRef<double> act_params,
                         at::Tensor* s1 = nullptr, at::Tensor* s2 = nullptr);

// Samples per parallel task for a given amount of work per sample.
inline int64_t grain_for(int64_t work_per_sample) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_sample));
}

// Reverse-Gram full Hessian (DESIGN.md §3): fills value [B, m], jac [B, m, d]
// and hess [B, m, d, d].
void reverse_gram(const NetSpec& net, const at::Tensor& x, at::TensorList weights,
                  const c10::List<std::optional<at::Tensor>>& biases,
                  at::IntArrayRef act_codes, at::ArrayRef<double> act_params,
                  at::Tensor& value, at::Tensor& jac, at::Tensor& hess);

}  // namespace cpu
}  // namespace hessmlp
