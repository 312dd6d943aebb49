// The forward jet pass on the CPU (DESIGN.md §2), shared by both methods of
// the mlp_jet CPU kernel and by its backward: forward jets run it with the
// requested mode, reverse-Gram runs it with Mode::None and keeps each layer's
// Jacobian and derivatives, the backward keeps each layer's pre-activation state.
#pragma once

#include "../jet_common.h"
#include "jet_step.h"

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

// The inputs of the stage after Linear l for one sample b, in the layout of
// ForwardPass::state: z (before the bias), T rows [d, n] (W_0^T, shared by all
// samples, at l = 0) and S rows [P, n] (none at l = 0, where S = 0).
template <typename T>
struct StageInput {
  const T* z;
  int64_t z_stride;
  const T* t;
  int64_t t_stride;
  const T* s;         // null when S = 0
  int64_t s_stride;
  const T* bias;      // null without bias

  const T* z_of(int64_t b) const { return z + b * z_stride; }
  const T* t_of(int64_t b) const { return t + b * t_stride; }
  const T* s_of(int64_t b) const { return s ? s + b * s_stride : nullptr; }
};

template <typename T>
StageInput<T> stage_input(const NetSpec& net, Mode mode, int64_t l, const at::Tensor& state,
                          const at::Tensor& w0t, const at::Tensor& bias) {
  const int64_t n = net.widths[l], d = net.d, P = n_pairs(mode, d);
  const int64_t C = 1 + d + P;
  const T* zp = state.data_ptr<T>();
  StageInput<T> in;
  in.z = zp;
  in.z_stride = l == 0 ? n : C * n;
  in.t = l == 0 ? w0t.data_ptr<T>() : zp + n;
  in.t_stride = l == 0 ? 0 : C * n;
  in.s = (l == 0 || P == 0) ? nullptr : zp + (1 + d) * n;
  in.s_stride = C * n;
  in.bias = bias.defined() ? bias.data_ptr<T>() : nullptr;
  return in;
}

// The elementwise functions of the stage after Linear l.
inline Stage stage_of(const NetSpec& net, int64_t l, at::IntArrayRef act_codes,
                      at::ArrayRef<double> act_params) {
  return Stage{act_codes.data() + net.stage_start[l], act_params.data() + 2 * net.stage_start[l],
               net.stage_size[l]};
}

// The bias of Linear l (contiguous), or an undefined tensor.
inline at::Tensor bias_of(const c10::List<std::optional<at::Tensor>>& biases, int64_t l) {
  const std::optional<at::Tensor> b = biases.get(l);
  return (b.has_value() && b->defined()) ? b->contiguous() : at::Tensor();
}

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
