// CPU kernels of hessmlp::mlp_jet_backward: the adjoint of the stage pass
// (in place, one pass per layer) and of the unpacking of the outputs. The
// GEMMs and the order of the sweep are in csrc/jet_driver.cpp.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace hessmlp {
namespace cpu {

namespace {

// The stage adjoint of samples b0..b1 in place on g, derivatives from src.
template <typename T>
HM_SIMD_CLONES void adjoint_rows(Mode mode, int64_t d, int64_t n, const StageInput<T>& in,
                                 const DerivSource<T>& src, int code, T* gp, int64_t b0,
                                 int64_t b1) {
  with_smooth_code(code, [&](auto c) HM_INLINE {
    for_stage_lanes<decltype(c)::value, T>(
        mode, d, n, in, src, gp, b0, b1, [&](const auto& f, auto t, auto s, auto g, int64_t) HM_INLINE {
          jet_adjoint_neuron(mode, d, f, t, s, n, g);
        });
  });
}

}  // namespace

void stage_adjoint(const StageArgs& a, at::Tensor& g) {
  const int64_t n = a.n, d = a.d;
  const int64_t C = 1 + d + n_pairs(a.mode, d);
  const bool fused = fused_stage(a.stage);
  const at::Tensor D = fused ? at::Tensor() : stage_derivs_cached(a);
  const StagePrims pr = fused ? stage_prims_cached(a) : StagePrims{};
  AT_DISPATCH_FLOATING_TYPES(a.state.scalar_type(), "mlp_jet_stage_adjoint_cpu", [&] {
    const StageInput<scalar_t> in = stage_input<scalar_t>(a);
    const DerivSource<scalar_t> src = derivs_source<scalar_t>(D, pr, in, a.batch, n);
    scalar_t* gp = g.data_ptr<scalar_t>();
    const int code = fused ? pr.code : ACT_IDENTITY;
    at::parallel_for(0, a.batch, grain_for(C * n), [&](int64_t b0, int64_t b1) {
      adjoint_rows<scalar_t>(a.mode, d, n, in, src, code, gp, b0, b1);
    });
  });
}

void pack_adjoint(Mode mode, int64_t d, const at::Tensor& value, const at::Tensor& jac,
                  const at::Tensor& hess, at::Tensor& g) {
  const int64_t B = g.size(0), C = g.size(1), m = g.size(2);
  const int64_t h_per = hess.defined() ? hess.numel() / (B * m) : 0;  // per (b, k)
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "mlp_jet_pack_adjoint_cpu", [&] {
    const scalar_t* vp = value.defined() ? value.data_ptr<scalar_t>() : nullptr;
    const scalar_t* jp = jac.defined() ? jac.data_ptr<scalar_t>() : nullptr;
    const scalar_t* hp = hess.defined() ? hess.data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = g.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(C * m), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t k = 0; k < m; ++k) {
          const int64_t r = b * m + k;
          pack_output_adjoint<scalar_t>(mode, d, vp ? vp + r : nullptr, jp ? jp + r * d : nullptr,
                                        hp ? hp + r * h_per : nullptr, gp + b * C * m + k, m);
        }
    });
  });
}

}  // namespace cpu
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(hessmlp, CPU, m) {
  m.impl("mlp_jet_backward", &hessmlp::mlp_jet_backward_op<&hessmlp::cpu::kernels>);
}
