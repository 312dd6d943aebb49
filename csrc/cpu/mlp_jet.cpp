// CPU kernels of hessmlp::mlp_jet: the stage pass of the forward jet and the unpacking of the
// last layer's columns (reverse-Gram's weighted Gram is in gram.cpp).
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

namespace hessmlp {
namespace cpu {

namespace {

// The ATen op that gives prims a and b of one function over a layer (see act_prims).
std::pair<at::Tensor, at::Tensor> prims_of(int code, double p0, double p1, const at::Tensor& z) {
  switch (code) {
    case ACT_TANH: return {at::tanh(z), {}};
    case ACT_SIGMOID:
    case ACT_SILU: return {at::sigmoid(z), {}};
    case ACT_SOFTPLUS: return {at::sigmoid(z * p0), at::softplus(z, p0, p1)};
    case ACT_GELU: return {at::erf(z * kInvSqrt2), at::exp(z * z * -0.5)};
    case ACT_GELU_TANH: return {at::tanh((z + z * z * z * kGeluK1) * kGeluK0), {}};
    case ACT_ELU: {
      const at::Tensor zn = at::clamp_max(z, 0.0);  // (keeps NaN)
      return {at::expm1(zn), at::exp(zn)};
    }
    case ACT_SIN: {
      const at::Tensor w = z * p0;
      return {at::sin(w), at::cos(w)};
    }
    default: return {};
  }
}

// Calls body with the activation code as a compile-time constant (so that the
// per-element algebra has no switch left in its loop).
template <typename Body>
void with_code(int code, Body&& body) {
  switch (code) {
#define HM_CODE_CASE(c) \
  case c:               \
    return body(std::integral_constant<int, c>());
    HM_CODE_CASE(ACT_IDENTITY) HM_CODE_CASE(ACT_AFFINE) HM_CODE_CASE(ACT_TANH)
    HM_CODE_CASE(ACT_SIGMOID) HM_CODE_CASE(ACT_SOFTPLUS) HM_CODE_CASE(ACT_SILU)
    HM_CODE_CASE(ACT_GELU) HM_CODE_CASE(ACT_GELU_TANH) HM_CODE_CASE(ACT_RELU)
    HM_CODE_CASE(ACT_LEAKY_RELU) HM_CODE_CASE(ACT_ELU) HM_CODE_CASE(ACT_SIN)
    HM_CODE_CASE(ACT_SQUARE)
#undef HM_CODE_CASE
    default: return body(code);
  }
}

}  // namespace

at::Tensor stage_derivs_batch(const StageArgs& a) {
  const at::Tensor z = a.first ? a.state : a.state.select(1, 0);  // [B, n], before the bias
  // A fresh copy: it is overwritten with each function's output below.
  at::Tensor cur = a.bias.defined() ? at::add(z, a.bias) : z.clone(at::MemoryFormat::Contiguous);
  const int64_t N = a.batch * a.n;
  at::Tensor D = at::empty({4, a.batch, a.n}, z.options());
  if (a.stage.n_ops == 0) {
    D[0].copy_(cur);
    D[1].fill_(1);
    D.narrow(0, 2, 2).zero_();
    return D;
  }
  for (int k = 0; k < a.stage.n_ops; ++k) {
    const int code = a.stage.codes[k];
    const double p0 = a.stage.params[2 * k], p1 = a.stage.params[2 * k + 1];
    const auto prims = prims_of(code, p0, p1, cur);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mlp_jet_stage_derivs_cpu", [&] {
      const scalar_t* pa = prims.first.defined() ? prims.first.data_ptr<scalar_t>() : nullptr;
      const scalar_t* pb = prims.second.defined() ? prims.second.data_ptr<scalar_t>() : nullptr;
      scalar_t* cp = cur.data_ptr<scalar_t>();
      scalar_t* dp = D.data_ptr<scalar_t>();
      at::parallel_for(0, N, 4096, [&](int64_t i0, int64_t i1) {
        with_code(code, [&](auto code_c) {
          for (int64_t i = i0; i < i1; ++i) {
            const Prims<scalar_t> pr{pa ? pa[i] : scalar_t(0), pb ? pb[i] : scalar_t(0)};
            const Derivs<scalar_t> g =
                act_from_prims<scalar_t>(code_c, scalar_t(p0), scalar_t(p1), cp[i], pr);
            Derivs<scalar_t> f = g;
            if (k > 0) f = compose(Derivs<scalar_t>{dp[i], dp[N + i], dp[2 * N + i], dp[3 * N + i]}, g);
            dp[i] = f.s;
            dp[N + i] = f.s1;
            dp[2 * N + i] = f.s2;
            dp[3 * N + i] = f.s3;
            cp[i] = g.s;  // the next function's input
          }
        });
      });
    });
  }
  return D;
}

StagePrims stage_prims_of(const StageDesc& st) {
  StagePrims p;
  p.code = st.n_ops == 0 ? ACT_IDENTITY : st.codes[0];
  p.p0 = st.n_ops == 0 ? 0.0 : st.params[0];
  p.p1 = st.n_ops == 0 ? 0.0 : st.params[1];
  return p;
}

StagePrims stage_prims(const StageArgs& a) {
  const at::Tensor z = a.first ? a.state : a.state.select(1, 0);
  StagePrims p = stage_prims_of(a.stage);
  p.z = a.bias.defined() ? at::add(z, a.bias) : z.contiguous();
  std::tie(p.a, p.b) = prims_of(p.code, p.p0, p.p1, p.z);
  return p;
}

namespace {

// The jet step of samples b0..b1 (all their neurons), derivatives from src; the
// stage's first and second derivatives also into s1, s2 [B, n] where not null.
template <typename T>
HM_SIMD_CLONES void step_rows(Mode mode, int64_t d, int64_t n, const StageInput<T>& in,
                              const DerivSource<T>& src, int code, T* op, T* s1, T* s2,
                              int64_t b0, int64_t b1) {
  with_smooth_code(code, [&](auto c) HM_INLINE {
    auto rows = [&](Mode md, int64_t dd) HM_INLINE {
      for_stage_lanes<decltype(c)::value, T>(
          md, dd, n, in, src, op, b0, b1, [&](const auto& f, auto t, auto s, auto out, int64_t r) HM_INLINE {
            using L = std::decay_t<decltype(f.s)>;
            if (s1) lane_ptr<L>(s1, r)[0] = f.s1;
            if (s2) lane_ptr<L>(s2, r)[0] = f.s2;
            jet_step_neuron(md, dd, f, t, s, n, out);
          });
    };
    // Reverse-Gram's forward (mode none) at small d: d a constant, its loops unrolled.
    if (mode == Mode::None) {
      switch (d) {
        case 0: return rows(Mode::None, 0);
        case 1: return rows(Mode::None, 1);
        case 2: return rows(Mode::None, 2);
        case 3: return rows(Mode::None, 3);
        case 4: return rows(Mode::None, 4);
        default: break;
      }
    }
    rows(mode, d);
  });
}

}  // namespace

void stage_forward(const StageArgs& a, at::Tensor& out, at::Tensor& s1, at::Tensor& s2) {
  const int64_t n = a.n, d = a.d;
  const int64_t C = 1 + d + n_pairs(a.mode, d);
  const bool fused = fused_stage(a.stage);
  const at::Tensor D = fused ? at::Tensor() : stage_derivs_cached(a);
  const StagePrims pr = fused ? stage_prims_cached(a) : StagePrims{};
  if (!fused && s1.defined()) s1.copy_(D[1]);
  if (!fused && s2.defined()) s2.copy_(D[2]);
  AT_DISPATCH_FLOATING_TYPES(a.state.scalar_type(), "mlp_jet_stage_cpu", [&] {
    const StageInput<scalar_t> in = stage_input<scalar_t>(a);
    const DerivSource<scalar_t> src = derivs_source<scalar_t>(D, pr, in, a.batch, n);
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* s1p = fused && s1.defined() ? s1.data_ptr<scalar_t>() : nullptr;
    scalar_t* s2p = fused && s2.defined() ? s2.data_ptr<scalar_t>() : nullptr;
    const int code = fused ? pr.code : ACT_IDENTITY;  // with D, the code is not used
    at::parallel_for(0, a.batch, grain_for(C * n), [&](int64_t b0, int64_t b1) {
      step_rows<scalar_t>(a.mode, d, n, in, src, code, op, s1p, s2p, b0, b1);
    });
  });
}

void unpack(Mode mode, int64_t d, const at::Tensor& cols, at::Tensor& value, at::Tensor& jac,
            at::Tensor& hess) {
  const int64_t B = cols.size(0), C = cols.size(1), m = cols.size(2);
  const int64_t h_per = mode == Mode::None ? 0 : hess.numel() / (B * m);  // per (b, k)
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "mlp_jet_unpack_cpu", [&] {
    const scalar_t* cp = cols.data_ptr<scalar_t>();
    scalar_t* vp = value.data_ptr<scalar_t>();
    scalar_t* jp = jac.data_ptr<scalar_t>();
    scalar_t* hp = h_per ? hess.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, grain_for(C * m), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t k = 0; k < m; ++k) {
          const int64_t r = b * m + k;
          unpack_output<scalar_t>(mode, d, cp + b * C * m + k, m, vp + r, jp + r * d,
                                  hp ? hp + r * h_per : nullptr);
        }
    });
  });
}

}  // namespace cpu
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(hessmlp, CPU, m) {
  m.impl("mlp_jet", &hessmlp::mlp_jet_op<&hessmlp::cpu::kernels>);
}
