// Graph networks (docs/design.md §9): the op graph_jet's program, its checks, and its
// algorithm once for every backend, with the elementwise passes of a Kernels table.
#pragma once

#include "jet_driver.h"

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>

#include <string>
#include <tuple>
#include <vector>

namespace hessmlp {

// The node kinds of hessmlp/_graph.py, by name in the op's arguments.
enum class NodeKind { Input, Linear, Stage, Affine, Add, Concat, Select, Mul };

struct GraphNode {
  NodeKind kind = NodeKind::Input;
  std::string name;              // its kind, for messages
  int64_t width = 0;
  std::vector<int64_t> inputs;   // earlier nodes
  std::vector<int64_t> refs;     // indices into tensors, -1: none
  std::vector<int64_t> extra;    // select: the indices
  StageDesc stage;               // stage
  double consts[2] = {0.0, 0.0};  // affine: scale, shift where refs are -1
};

struct GraphSpec {
  int64_t batch = 0;
  int64_t d = 0;  // x's features (the input node's width)
  int64_t k = 0;  // directions of the jets: the seed's rows (d without a seed)
  Mode mode = Mode::None;
  std::vector<GraphNode> nodes;  // nodes[0] the input; the output is the last

  int64_t m() const { return nodes.back().width; }
  int64_t cols() const { return 1 + k + n_pairs(mode, k); }
};

// The op's program, checked against x and the tensors (names the node and what is wrong).
//   kinds[i]   node i's kind: input (i = 0 only), linear, stage, affine, add, concat, select, mul
//   program    per node: width, n_inputs, inputs..., n_refs, refs..., n_extra, extra...
//              (linear: refs W, b | -1; affine: refs scale | -1, shift | -1; stage: extra =
//              activation codes; select: extra = the indices)
//   consts     in node order: a stage's two parameters per function, an affine node's
//              scale and shift
// seed: the directions (see the schema in csrc/ops.cpp), checked here too.
GraphSpec check_graph(const at::Tensor& x, at::TensorList tensors,
                      const std::vector<std::string>& kinds, at::IntArrayRef program,
                      at::ArrayRef<double> consts, c10::string_view mode,
                      const std::optional<at::Tensor>& seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_jet_run(
    const Kernels& k, const at::Tensor& x, at::TensorList tensors,
    const std::vector<std::string>& kinds, at::IntArrayRef program, at::ArrayRef<double> consts,
    c10::string_view mode, const std::optional<at::Tensor>& seed);

// The adjoint of graph_jet (docs/design.md §9): gradients of a loss w.r.t. x, every tensor
// and the seed, given its gradients w.r.t. graph_jet's value, jacobian and hessian (None:
// zero). needs: [x, tensors..., seed (with a seed)]; an entry not needed is an empty tensor
// [0]. The forward jets are recomputed.
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> graph_jet_backward_run(
    const Kernels& k, const std::optional<at::Tensor>& grad_value,
    const std::optional<at::Tensor>& grad_jacobian, const std::optional<at::Tensor>& grad_hessian,
    const at::Tensor& x, at::TensorList tensors, const std::vector<std::string>& kinds,
    at::IntArrayRef program, at::ArrayRef<double> consts, c10::string_view mode,
    const std::optional<at::Tensor>& seed, const std::vector<bool>& needs);

// A backend's registrations: graph_jet_op<&backend::kernels>, graph_jet_backward_op<...>.
template <const Kernels& (*K)()>
std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_jet_op(
    const at::Tensor& x, at::TensorList tensors, std::vector<std::string> kinds,
    at::IntArrayRef program, at::ArrayRef<double> consts, c10::string_view mode,
    const std::optional<at::Tensor>& seed) {
  return graph_jet_run(K(), x, tensors, kinds, program, consts, mode, seed);
}

template <const Kernels& (*K)()>
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> graph_jet_backward_op(
    const std::optional<at::Tensor>& grad_value, const std::optional<at::Tensor>& grad_jacobian,
    const std::optional<at::Tensor>& grad_hessian, const at::Tensor& x, at::TensorList tensors,
    std::vector<std::string> kinds, at::IntArrayRef program, at::ArrayRef<double> consts,
    c10::string_view mode, const std::optional<at::Tensor>& seed, const c10::List<bool>& needs) {
  const std::vector<bool> flags(needs.begin(), needs.end());
  return graph_jet_backward_run(K(), grad_value, grad_jacobian, grad_hessian, x, tensors, kinds,
                                program, consts, mode, seed, flags);
}

}  // namespace hessmlp
