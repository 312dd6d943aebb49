// CPU kernel of hessmlp::mlp_jet: the forward jet pass (any mode) and the
// dispatch to reverse-Gram for the full Hessian.
#include "forward_pass.h"
#include "jet_step.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace hessmlp {
namespace cpu {

at::Tensor stage_forward(const NetSpec& net, Mode mode, int64_t l, const at::Tensor& state,
                         const at::Tensor& w0t,
                         const c10::List<std::optional<at::Tensor>>& biases,
                         at::IntArrayRef act_codes, at::ArrayRef<double> act_params,
                         at::Tensor* s1_out, at::Tensor* s2_out) {
  const int64_t B = net.batch, d = net.d, n = net.widths[l];
  const int64_t P = n_pairs(mode, d);
  const int64_t C = 1 + d + P;
  const at::Tensor bias = bias_of(biases, l);
  at::Tensor next = at::empty({B, C, n}, state.options());
  at::Tensor s1 = at::empty({B, n}, state.options());
  at::Tensor s2 = at::empty({B, n}, state.options());
  const Stage st = stage_of(net, l, act_codes, act_params);

  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "mlp_jet_step_cpu", [&] {
    const StageInput<scalar_t> in = stage_input<scalar_t>(net, mode, l, state, w0t, bias);
    scalar_t* op = next.data_ptr<scalar_t>();
    scalar_t* s1p = s1.data_ptr<scalar_t>();
    scalar_t* s2p = s2.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(C * n), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        jet_step_sample<scalar_t>(mode, n, d, st, in.z_of(b), in.bias, in.t_of(b), in.s_of(b),
                                  op + b * C * n, s1p + b * n, s2p + b * n);
      }
    });
  });
  if (s1_out) *s1_out = s1;
  if (s2_out) *s2_out = s2;
  return next;
}

ForwardPass forward_pass(const NetSpec& net, Mode mode, const at::Tensor& x,
                         at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& biases,
                         at::IntArrayRef act_codes, at::ArrayRef<double> act_params,
                         Keep keep) {
  const int64_t B = net.batch, d = net.d, L = net.n_layers();
  const int64_t C = 1 + d + n_pairs(mode, d);
  ForwardPass fp;

  // Layer 0: z_0 = x W_0^T (bias added in the step), T_0 = W_0 for every sample, S_0 = 0.
  const at::Tensor w0t = weights[0].t().contiguous();  // [d, n_0]
  at::Tensor act;                                       // [B, C, n_l] output of the step
  for (int64_t l = 0; l < L; ++l) {
    const int64_t n = net.widths[l];
    const at::Tensor state =
        l == 0 ? at::mm(x, weights[0].t())
               : at::mm(act.view({B * C, net.widths[l - 1]}), weights[l].t()).view({B, C, n});
    at::Tensor s1, s2;
    act = stage_forward(net, mode, l, state, w0t, biases, act_codes, act_params, &s1, &s2);
    if (keep == Keep::Gram) {
      fp.jac.push_back(l == 0 ? w0t.unsqueeze(0).expand({B, d, n}) : state.narrow(1, 1, d));
      fp.s1.push_back(s1);
      fp.s2.push_back(s2);
    } else if (keep == Keep::State) {
      fp.state.push_back(state);
    }
  }
  fp.out = act;
  return fp;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_jet_cpu(
    const at::Tensor& x_in, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef stage_sizes,
    at::IntArrayRef act_codes, at::ArrayRef<double> act_params, c10::string_view mode,
    c10::string_view method, bool save_state) {
  const NetSpec net = check_inputs(x_in, weights, biases, stage_sizes, act_codes, act_params,
                                   mode, method);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = net.batch, d = net.d, m = net.m();
  at::Tensor value = at::empty({B, m}, x.options());
  at::Tensor jac = at::empty({B, m, d}, x.options());
  at::Tensor hess = at::empty(hessian_shape(net), x.options());

  if (net.method == Method::Reverse) {
    // Reverse-Gram has no second-order state to save: the backward recomputes it.
    reverse_gram(net, x, weights, biases, act_codes, act_params, value, jac, hess);
    return {value, jac, hess, {}};
  }

  ForwardPass fp = forward_pass(net, net.mode, x, weights, biases, act_codes, act_params,
                                save_state ? Keep::State : Keep::Nothing);
  const int64_t C = fp.out.size(1);
  const int64_t hess_per_sample = B > 0 ? hess.numel() / B : 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_jet_unpack_cpu", [&] {
    const scalar_t* cp = fp.out.data_ptr<scalar_t>();
    scalar_t* vp = value.data_ptr<scalar_t>();
    scalar_t* jp = jac.data_ptr<scalar_t>();
    scalar_t* hp = hess.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(C * m), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        unpack_sample<scalar_t>(net.mode, m, d, cp + b * C * m, vp + b * m, jp + b * m * d,
                                hess_per_sample ? hp + b * hess_per_sample : nullptr);
      }
    });
  });
  return {value, jac, hess, std::move(fp.state)};
}

}  // namespace

}  // namespace cpu
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(hessmlp, CPU, m) {
  m.impl("mlp_jet", &hessmlp::cpu::mlp_jet_cpu);
}
