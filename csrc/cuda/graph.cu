// CUDA kernels of the graph op (docs/design.md §9): a product node's jets and their
// adjoint, one thread per (sample, feature), with the shared math of csrc/jet_math.h.
// The algorithm is in csrc/graph.cpp.
#include "../graph.h"
#include "kernels.cuh"

#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace hessmlp {
namespace cuda {
namespace {

template <typename T>
__global__ void product_kernel(Mode mode, int64_t B, int64_t C, int64_t n, int64_t d, const T* p,
                               const T* q, T* out) {
  HM_GRID_LOOP(idx, B * n) {
    const int64_t b = idx / n, i = idx - b * n;
    const int64_t o = b * C * n + i;
    jet_product_neuron<T>(mode, d, p + o, q + o, n, out + o);
  }
}

template <typename T>
__global__ void product_adjoint_kernel(Mode mode, int64_t B, int64_t C, int64_t n, int64_t d,
                                       const T* p, const T* q, const T* g, T* gp, T* gq) {
  HM_GRID_LOOP(idx, B * n) {
    const int64_t b = idx / n, i = idx - b * n;
    const int64_t o = b * C * n + i;
    jet_product_adjoint_neuron<T>(mode, d, p + o, q + o, g + o, n, gp + o, gq + o);
  }
}

}  // namespace

void product(Mode mode, int64_t d, const at::Tensor& p, const at::Tensor& q, at::Tensor& out) {
  const int64_t B = p.size(0), C = p.size(1), n = p.size(2);
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "graph_product_cuda", [&] {
    HM_LAUNCH(blocks_for(B * n), kThreads, 0, stream, product_kernel<scalar_t>)(
        mode, B, C, n, d, p.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    HM_LAUNCH_CHECK();
  });
}

void product_adjoint(Mode mode, int64_t d, const at::Tensor& p, const at::Tensor& q,
                     const at::Tensor& g, at::Tensor& gp, at::Tensor& gq) {
  const int64_t B = p.size(0), C = p.size(1), n = p.size(2);
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "graph_product_adjoint_cuda", [&] {
    HM_LAUNCH(blocks_for(B * n), kThreads, 0, stream, product_adjoint_kernel<scalar_t>)(
        mode, B, C, n, d, p.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
        gp.data_ptr<scalar_t>(), gq.data_ptr<scalar_t>());
    HM_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(HESSMLP_LIBRARY, HESSMLP_CUDA_KEY, m) {
  m.impl("graph_jet", &hessmlp::graph_jet_op<&hessmlp::cuda::kernels>);
  m.impl("graph_jet_backward", &hessmlp::graph_jet_backward_op<&hessmlp::cuda::kernels>);
}
