// CPU kernels of hessmlp::mlp_jet: the stage pass of the forward jet, the
// unpacking of the last layer's columns, and reverse-Gram's weighted Gram.
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
    case ACT_ELU: return {at::exp(at::clamp_max(z, 0.0)), {}};
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

StagePrims stage_prims(const StageArgs& a) {
  const at::Tensor z = a.first ? a.state : a.state.select(1, 0);
  StagePrims p;
  p.z = a.bias.defined() ? at::add(z, a.bias) : z.contiguous();
  p.code = a.stage.n_ops == 0 ? ACT_IDENTITY : a.stage.codes[0];
  p.p0 = a.stage.n_ops == 0 ? 0.0 : a.stage.params[0];
  p.p1 = a.stage.n_ops == 0 ? 0.0 : a.stage.params[1];
  std::tie(p.a, p.b) = prims_of(p.code, p.p0, p.p1, p.z);
  return p;
}

namespace {

// The jet step of samples b0..b1 (all their neurons), derivatives from src.
template <typename T>
HM_SIMD_CLONES void step_rows(Mode mode, int64_t d, int64_t n, const StageInput<T>& in,
                              const DerivSource<T>& src, int code, T* op, int64_t b0, int64_t b1) {
  with_smooth_code(code, [&](auto c) {
    for_stage_lanes<decltype(c)::value, T>(
        mode, d, n, in, src, op, b0, b1, [&](const auto& f, auto t, auto s, auto out) {
          jet_step_neuron(mode, d, f, t, s, n, out);
        });
  });
}

}  // namespace

void stage_forward(const StageArgs& a, at::Tensor& out, at::Tensor& s1, at::Tensor& s2) {
  const int64_t n = a.n, d = a.d;
  const int64_t C = 1 + d + n_pairs(a.mode, d);
  const bool fused = fused_stage(a.stage) && !s1.defined() && !s2.defined();
  const at::Tensor D = fused ? at::Tensor() : stage_derivs_cached(a);
  const StagePrims pr = fused ? stage_prims(a) : StagePrims{};
  if (s1.defined()) s1.copy_(D[1]);
  if (s2.defined()) s2.copy_(D[2]);
  AT_DISPATCH_FLOATING_TYPES(a.state.scalar_type(), "mlp_jet_stage_cpu", [&] {
    const StageInput<scalar_t> in = stage_input<scalar_t>(a);
    const DerivSource<scalar_t> src = derivs_source<scalar_t>(D, pr, a.batch * n);
    scalar_t* op = out.data_ptr<scalar_t>();
    const int code = fused ? pr.code : ACT_IDENTITY;  // with D, the code is not used
    at::parallel_for(0, a.batch, grain_for(C * n), [&](int64_t b0, int64_t b1) {
      step_rows<scalar_t>(a.mode, d, n, in, src, code, op, b0, b1);
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

// packed[b, k, p] += sum_i w[b, k, i] T[b, p1, i] T[b, p2, i] over the pairs p1 <= p2.
void gram(const at::Tensor& w, const at::Tensor& t, at::Tensor& packed) {
  const int64_t B = w.size(0), m = w.size(1), n = w.size(2), d = t.size(1);
  const int64_t P = d * (d + 1) / 2;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "mlp_jet_gram_cpu", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* hp = packed.data_ptr<scalar_t>();
    const int64_t tb_stride = t.stride(0), tr_stride = t.stride(1), ti_stride = t.stride(2);
    at::parallel_for(0, B, std::max<int64_t>(1, 8192 / (m * P * n / 8 + 1)), [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> wt(n);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* tb = tp + b * tb_stride;
        for (int64_t k = 0; k < m; ++k) {
          const scalar_t* wk = wp + (b * m + k) * n;
          scalar_t* h = hp + (b * m + k) * P;
          int64_t p = 0;
          for (int64_t a = 0; a < d; ++a) {
            const scalar_t* ta = tb + a * tr_stride;
            for (int64_t i = 0; i < n; ++i) wt[i] = wk[i] * ta[i * ti_stride];
            for (int64_t c = a; c < d; ++c, ++p) {
              const scalar_t* tc = tb + c * tr_stride;
              scalar_t acc = scalar_t(0);
              for (int64_t i = 0; i < n; ++i) acc += wt[i] * tc[i * ti_stride];
              h[p] += acc;
            }
          }
        }
      }
    });
  });
}

void unpack_packed(int64_t d, const at::Tensor& packed, at::Tensor& hess) {
  const int64_t rows = packed.size(0), P = packed.size(1);
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "mlp_jet_unpack_packed_cpu", [&] {
    const scalar_t* pp = packed.data_ptr<scalar_t>();
    scalar_t* hp = hess.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* h = pp + r * P;
        scalar_t* o = hp + r * d * d;
        int64_t p = 0;
        for (int64_t a = 0; a < d; ++a)
          for (int64_t c = a; c < d; ++c, ++p) o[a * d + c] = o[c * d + a] = h[p];
      }
    });
  });
}

}  // namespace cpu
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(hessmlp, CPU, m) {
  m.impl("mlp_jet", &hessmlp::mlp_jet_op<&hessmlp::cpu::kernels>);
}
