// The forward jet pass on the CPU (DESIGN.md §2), shared by both methods of
// the mlp_jet CPU kernel: forward jets run it with the requested mode,
// reverse-Gram runs it with Mode::None and keeps each layer's state.
#pragma once

#include "../jet_common.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <vector>

namespace hessmlp {
namespace cpu {

struct ForwardPass {
  at::Tensor out;                 // [B, 1 + d + P, m]  columns after the last stage
  // Only with keep = true, one entry per Linear l:
  std::vector<at::Tensor> jac;    // [B, d, n_l]  dz_l/dx (layer 0: W_0^T expanded over B)
  std::vector<at::Tensor> s1;     // [B, n_l]     stage derivatives at z_l
  std::vector<at::Tensor> s2;     // [B, n_l]
};

ForwardPass forward_pass(const NetSpec& net, Mode mode, const at::Tensor& x,
                         at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& biases,
                         at::IntArrayRef act_codes, at::ArrayRef<double> act_params,
                         bool keep);

// Reverse-Gram full Hessian (DESIGN.md §3): fills value [B, m], jac [B, m, d]
// and hess [B, m, d, d].
void reverse_gram(const NetSpec& net, const at::Tensor& x, at::TensorList weights,
                  const c10::List<std::optional<at::Tensor>>& biases,
                  at::IntArrayRef act_codes, at::ArrayRef<double> act_params,
                  at::Tensor& value, at::Tensor& jac, at::Tensor& hess);

}  // namespace cpu
}  // namespace hessmlp
