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

// The stage adjoint of samples b0..b1 in place on g, derivatives D [4, N].
template <typename T>
inline __attribute__((always_inline)) void adjoint_rows_impl(
    Mode mode, int64_t d, int64_t n, int64_t N, const StageInput<T>& in, const T* dp, T* gp,
    int64_t b0, int64_t b1) {
  const int64_t C = 1 + d + n_pairs(mode, d);
  for (int64_t b = b0; b < b1; ++b) {
    const T* t = in.t_of(b);
    const T* s = in.s_of(b);
    const T* db = dp + b * n;
    T* gb = gp + b * C * n;
    for_each_lane<T>(n, [&](auto lane, int64_t i) {
      using L = decltype(lane);
      const Derivs<L> f{lane_load<L>(db, i), lane_load<L>(db + N, i), lane_load<L>(db + 2 * N, i),
                        lane_load<L>(db + 3 * N, i)};
      jet_adjoint_neuron<L>(mode, d, f, lane_ptr<L>(t, i), lane_ptr<L>(s, i), n, lane_ptr<L>(gb, i));
    });
  }
}

HM_SIMD_CLONES void adjoint_rows(Mode mode, int64_t d, int64_t n, int64_t N,
                                 const StageInput<float>& in, const float* dp, float* gp,
                                 int64_t b0, int64_t b1) {
  adjoint_rows_impl<float>(mode, d, n, N, in, dp, gp, b0, b1);
}

HM_SIMD_CLONES void adjoint_rows(Mode mode, int64_t d, int64_t n, int64_t N,
                                 const StageInput<double>& in, const double* dp, double* gp,
                                 int64_t b0, int64_t b1) {
  adjoint_rows_impl<double>(mode, d, n, N, in, dp, gp, b0, b1);
}

}  // namespace

void stage_adjoint(const StageArgs& a, at::Tensor& g) {
  const int64_t n = a.n, d = a.d, N = a.batch * a.n;
  const int64_t C = 1 + d + n_pairs(a.mode, d);
  const at::Tensor D = stage_derivs_cached(a);
  AT_DISPATCH_FLOATING_TYPES(a.state.scalar_type(), "mlp_jet_stage_adjoint_cpu", [&] {
    const StageInput<scalar_t> in = stage_input<scalar_t>(a);
    const scalar_t* dp = D.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    at::parallel_for(0, a.batch, grain_for(C * n), [&](int64_t b0, int64_t b1) {
      adjoint_rows(a.mode, d, n, N, in, dp, gp, b0, b1);
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
