// CPU kernel of hessmlp::mlp_jet_backward: the reverse sweep through the
// forward jet (DESIGN.md §4). Per Linear, two GEMMs over all stacked columns
// (weight gradient and the adjoint of its input); per stage, one fused
// in-place pass per sample (jet_adjoint_sample).
#include "forward_pass.h"
#include "jet_step.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

namespace hessmlp {
namespace cpu {
namespace {

const at::Tensor* defined_or_null(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_jet_backward_cpu(
    const std::optional<at::Tensor>& grad_value, const std::optional<at::Tensor>& grad_jacobian,
    const std::optional<at::Tensor>& grad_hessian, const at::Tensor& x_in,
    at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
    at::IntArrayRef stage_sizes, at::IntArrayRef act_codes, at::ArrayRef<double> act_params,
    c10::string_view mode, at::TensorList saved, std::array<bool, 3> output_mask) {
  const NetSpec net = check_inputs(x_in, weights, biases, stage_sizes, act_codes, act_params,
                                   mode, "forward");
  check_backward_inputs(net, x_in, grad_value, grad_jacobian, grad_hessian, saved);
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  const int64_t B = net.batch, d = net.d, m = net.m(), L = net.n_layers();
  const int64_t P = net.pairs();
  const int64_t C = 1 + d + P;
  const at::Tensor x = x_in.contiguous();

  at::Tensor grad_x = need_x ? at::zeros({B, d}, x.options()) : at::empty({0}, x.options());
  std::vector<at::Tensor> grad_w, grad_b;
  for (int64_t l = 0; l < L; ++l) {
    const std::optional<at::Tensor> b = biases.get(l);
    grad_w.push_back(need_w ? at::zeros(weights[l].sizes(), x.options())
                            : at::empty({0}, x.options()));
    grad_b.push_back(need_b && b.has_value() && b->defined()
                         ? at::zeros({net.widths[l]}, x.options()) : at::empty({0}, x.options()));
  }
  const at::Tensor* gv = defined_or_null(grad_value);
  const at::Tensor* gj = defined_or_null(grad_jacobian);
  const at::Tensor* gh = P > 0 ? defined_or_null(grad_hessian) : nullptr;
  if (B == 0 || (!need_x && !need_w && !need_b) || (!gv && !gj && !gh)) {
    return {grad_x, grad_w, grad_b};
  }

  // The state of every layer: saved by the forward, or recomputed here.
  std::vector<at::Tensor> state;
  if (saved.empty()) {
    state = forward_pass(net, net.mode, x, weights, biases, act_codes, act_params, Keep::State).state;
  } else {
    for (const at::Tensor& s : saved) state.push_back(s.contiguous());
  }
  const at::Tensor w0t = weights[0].t().contiguous();  // T_0 = W_0 for every sample

  // Adjoint of the last layer's columns [B, C, m].
  at::Tensor g = at::empty({B, C, m}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_jet_backward_pack_cpu", [&] {
    const at::Tensor v = gv ? gv->contiguous() : at::Tensor();
    const at::Tensor j = gj ? gj->contiguous() : at::Tensor();
    const at::Tensor h = gh ? gh->contiguous() : at::Tensor();
    const int64_t h_per = gh && B > 0 ? h.numel() / B : 0;
    scalar_t* gp = g.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(C * m), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        pack_adjoint_sample<scalar_t>(
            net.mode, m, d, v.defined() ? v.data_ptr<scalar_t>() + b * m : nullptr,
            j.defined() ? j.data_ptr<scalar_t>() + b * m * d : nullptr,
            h.defined() ? h.data_ptr<scalar_t>() + b * h_per : nullptr, gp + b * C * m);
      }
    });
  });

  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t n = net.widths[l];
    const at::Tensor bias = bias_of(biases, l);
    const Stage st = stage_of(net, l, act_codes, act_params);
    // The stage: g becomes the adjoint of this Linear's output (z_bar, T_bar, S_bar).
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_jet_backward_step_cpu", [&] {
      const StageInput<scalar_t> in = stage_input<scalar_t>(net, net.mode, l, state[l], w0t, bias);
      scalar_t* gp = g.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain_for(C * n), [&](int64_t b0, int64_t b1) {
        std::vector<scalar_t> scratch(4 * n);
        for (int64_t b = b0; b < b1; ++b) {
          jet_adjoint_sample<scalar_t>(net.mode, n, d, st, in.z_of(b), in.bias, in.t_of(b),
                                       in.s_of(b), gp + b * C * n, scratch.data());
        }
      });
    });
    const at::Tensor zbar = g.select(1, 0);  // [B, n]
    if (grad_b[l].numel() > 0) grad_b[l].copy_(zbar.sum(0));

    if (l > 0) {
      const int64_t n_prev = net.widths[l - 1];
      const at::Tensor g2 = g.view({B * C, n});
      if (need_w) {
        // This Linear's input: the previous stage applied to the previous state.
        const at::Tensor act = stage_forward(net, net.mode, l - 1, state[l - 1], w0t, biases,
                                             act_codes, act_params);
        at::mm_out(grad_w[l], g2.t(), act.view({B * C, n_prev}));
      }
      g = at::mm(g2, weights[l]).view({B, C, n_prev});
    } else {
      // z_0 = x W_0^T and T_0 = W_0 (S_0 = 0): the x term and the sum of T_bar over the batch.
      if (need_w) {
        at::mm_out(grad_w[0], zbar.t(), x);
        grad_w[0].add_(g.narrow(1, 1, d).sum(0).t());
      }
      if (need_x) at::mm_out(grad_x, zbar, weights[0]);
    }
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace cpu
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(hessmlp, CPU, m) {
  m.impl("mlp_jet_backward", &hessmlp::cpu::mlp_jet_backward_cpu);
}
