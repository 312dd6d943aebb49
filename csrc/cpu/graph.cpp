// CPU kernels of the graph op (docs/design.md §9): a product node's jets and their
// adjoint, one (sample, feature) at a time with the shared math of csrc/jet_math.h. The
// algorithm is in csrc/graph.cpp.
#include "../graph.h"
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace hessmlp {
namespace cpu {

void product(Mode mode, int64_t d, const at::Tensor& p, const at::Tensor& q, at::Tensor& out) {
  const int64_t B = p.size(0), C = p.size(1), n = p.size(2);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "graph_product_cpu", [&] {
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(C * n), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * C * n;
        for (int64_t i = 0; i < n; ++i) {
          jet_product_neuron<scalar_t>(mode, d, pp + o + i, qp + o + i, n, op + o + i);
        }
      }
    });
  });
}

void product_adjoint(Mode mode, int64_t d, const at::Tensor& p, const at::Tensor& q,
                     const at::Tensor& g, at::Tensor& gp, at::Tensor& gq) {
  const int64_t B = p.size(0), C = p.size(1), n = p.size(2);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "graph_product_adjoint_cpu", [&] {
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* gv = g.data_ptr<scalar_t>();
    scalar_t* gpp = gp.data_ptr<scalar_t>();
    scalar_t* gqp = gq.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_for(C * n), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * C * n;
        for (int64_t i = 0; i < n; ++i) {
          jet_product_adjoint_neuron<scalar_t>(mode, d, pp + o + i, qp + o + i, gv + o + i, n,
                                               gpp + o + i, gqp + o + i);
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace hessmlp

TORCH_LIBRARY_IMPL(hessmlp, CPU, m) {
  m.impl("graph_jet", &hessmlp::graph_jet_op<&hessmlp::cpu::kernels>);
  m.impl("graph_jet_backward", &hessmlp::graph_jet_backward_op<&hessmlp::cpu::kernels>);
}
