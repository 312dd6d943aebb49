// CUDA kernels of hessmlp::mlp_jet_backward: the adjoint of the stage pass (in
// place) and of the unpacking of the outputs. The GEMMs and the order of the
// sweep are in csrc/jet_driver.cpp.
#include "kernels.cuh"

#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace hessmlp {
namespace cuda {
namespace {

template <typename T>
__global__ void stage_adjoint_kernel(Mode mode, int64_t B, int64_t n, int64_t d, StageDesc stage,
                                     StageInput<T> in, T* g) {
  const int64_t C = 1 + d + n_pairs(mode, d);
  HM_GRID_LOOP(idx, B * n) {
    const int64_t b = idx / n, i = idx - b * n;
    const Derivs<T> f = stage_eval<T>(stage, in.z_at(b, i));
    const T* s = in.s_of(b);
    jet_adjoint_neuron<T>(mode, d, f, in.t_of(b) + i, s ? s + i : nullptr, n, g + b * C * n + i);
  }
}

template <typename T>
__global__ void pack_adjoint_kernel(Mode mode, int64_t B, int64_t m, int64_t d, int64_t C,
                                    int64_t h_per, const T* value, const T* jac, const T* hess,
                                    T* g) {
  HM_GRID_LOOP(r, B * m) {
    const int64_t b = r / m, k = r - b * m;
    pack_output_adjoint<T>(mode, d, value ? value + r : nullptr, jac ? jac + r * d : nullptr,
                           hess ? hess + r * h_per : nullptr, g + b * C * m + k, m);
  }
}

}  // namespace

void stage_adjoint(const StageArgs& a, at::Tensor& g) {
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(a.state.scalar_type(), "mlp_jet_stage_adjoint_cuda", [&] {
    HM_LAUNCH(blocks_for(a.batch * a.n), kThreads, 0, stream, stage_adjoint_kernel<scalar_t>)(
        a.mode, a.batch, a.n, a.d, a.stage, stage_input<scalar_t>(a), g.data_ptr<scalar_t>());
    HM_LAUNCH_CHECK();
  });
}

void pack_adjoint(Mode mode, int64_t d, const at::Tensor& value, const at::Tensor& jac,
                  const at::Tensor& hess, at::Tensor& g) {
  const int64_t B = g.size(0), C = g.size(1), m = g.size(2);
  const int64_t h_per = hess.defined() ? hess.numel() / (B * m) : 0;
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "mlp_jet_pack_adjoint_cuda", [&] {
    HM_LAUNCH(blocks_for(B * m), kThreads, 0, stream, pack_adjoint_kernel<scalar_t>)(
        mode, B, m, d, C, h_per, value.defined() ? value.data_ptr<scalar_t>() : nullptr,
        jac.defined() ? jac.data_ptr<scalar_t>() : nullptr,
        hess.defined() ? hess.data_ptr<scalar_t>() : nullptr, g.data_ptr<scalar_t>());
    HM_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(HESSMLP_LIBRARY, HESSMLP_CUDA_KEY, m) {
  m.impl("mlp_jet_backward", &hessmlp::mlp_jet_backward_op<&hessmlp::cuda::kernels>);
}
