// The op graph_jet (docs/design.md §9): forward jets over a graph network, node by node,
// for every backend. Each node's jets are columns [B, C, n] (value, d first-order rows, the
// mode's second-order rows), as a chain's layers have: linear nodes are GEMMs over them,
// stages and products the backend's elementwise passes, affine, add, concat and select
// ATen operations.
#include "graph.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cstdint>

namespace hessmlp {
namespace {

NodeKind parse_kind(const std::string& kind, int64_t i) {
  static const std::pair<const char*, NodeKind> table[] = {
      {"input", NodeKind::Input}, {"linear", NodeKind::Linear}, {"stage", NodeKind::Stage},
      {"affine", NodeKind::Affine}, {"add", NodeKind::Add},     {"concat", NodeKind::Concat},
      {"select", NodeKind::Select}, {"mul", NodeKind::Mul}};
  for (const auto& [name, k] : table) {
    if (kind == name) return k;
  }
  TORCH_CHECK_VALUE(false, "hessmlp: graph_jet: kinds[", i, "] = '", kind,
                    "' is not a node kind (input, linear, stage, affine, add, concat, select, mul)");
}

}  // namespace

GraphSpec check_graph(const at::Tensor& x, at::TensorList tensors,
                      const std::vector<std::string>& kinds, at::IntArrayRef program,
                      at::ArrayRef<double> consts, c10::string_view mode) {
  GraphSpec spec;
  spec.mode = parse_mode(mode);
  TORCH_CHECK_VALUE(x.dim() == 2, "hessmlp: graph_jet: x must have shape [B, d], got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "hessmlp: graph_jet: x must be float32 or float64, got ", x.scalar_type());
  spec.batch = x.size(0);
  spec.d = x.size(1);
  for (size_t t = 0; t < tensors.size(); ++t) {
    TORCH_CHECK_TYPE(tensors[t].scalar_type() == x.scalar_type(), "hessmlp: graph_jet: tensors[", t,
                     "] is ", tensors[t].scalar_type(), " but x is ", x.scalar_type());
    TORCH_CHECK_VALUE(tensors[t].device() == x.device(), "hessmlp: graph_jet: tensors[", t,
                      "] is on ", tensors[t].device(), " but x is on ", x.device());
  }
  TORCH_CHECK_VALUE(!kinds.empty() && kinds[0] == "input",
                    "hessmlp: graph_jet: the first node must be the input");
  size_t pos = 0, cpos = 0;
  const int64_t n_nodes = static_cast<int64_t>(kinds.size());
  for (int64_t i = 0; i < n_nodes; ++i) {
    GraphNode node;
    node.kind = parse_kind(kinds[i], i);
    node.name = kinds[i];
    auto next = [&]() {
      TORCH_CHECK_VALUE(pos < program.size(), "hessmlp: graph_jet: the program ends inside node ",
                        i, " (", kinds[i], ")");
      return program[pos++];
    };
    auto list = [&]() {
      const int64_t len = next();
      TORCH_CHECK_VALUE(len >= 0, "hessmlp: graph_jet: node ", i, " has a negative length");
      std::vector<int64_t> out;
      for (int64_t j = 0; j < len; ++j) out.push_back(next());
      return out;
    };
    node.width = next();
    node.inputs = list();
    node.refs = list();
    node.extra = list();
    const auto where = [&]() { return "hessmlp: graph_jet: node " + std::to_string(i) + " (" + kinds[i] + "): "; };
    TORCH_CHECK_VALUE(node.width >= (i == 0 ? 0 : 1), where(), "width ", node.width);
    for (int64_t in : node.inputs) {
      TORCH_CHECK_VALUE(in >= 0 && in < i, where(), "input ", in, " is not an earlier node");
    }
    for (int64_t r : node.refs) {
      TORCH_CHECK_VALUE(r >= -1 && r < static_cast<int64_t>(tensors.size()), where(), "tensor ", r,
                        " out of range (", tensors.size(), " tensors)");
    }
    auto in_width = [&](size_t j) { return spec.nodes[node.inputs[j]].width; };
    auto arity = [&](size_t lo, size_t hi) {
      TORCH_CHECK_VALUE(node.inputs.size() >= lo && node.inputs.size() <= hi, where(), "takes ",
                        lo == hi ? std::to_string(lo) : std::to_string(lo) + " or more",
                        " inputs, got ", node.inputs.size());
    };
    auto refs = [&](size_t n) {
      TORCH_CHECK_VALUE(node.refs.size() == n, where(), "refers to ", n, " tensors, got ", node.refs.size());
    };
    auto same_width = [&]() {
      for (size_t j = 0; j < node.inputs.size(); ++j) {
        TORCH_CHECK_VALUE(in_width(j) == node.width, where(), "input ", node.inputs[j], " has width ",
                          in_width(j), ", the node ", node.width);
      }
    };
    switch (node.kind) {
      case NodeKind::Input:
        TORCH_CHECK_VALUE(i == 0 && node.inputs.empty() && node.width == spec.d, where(),
                          "the input must be node 0, of width d = ", spec.d);
        break;
      case NodeKind::Linear: {
        arity(1, 1);
        refs(2);
        TORCH_CHECK_VALUE(node.refs[0] >= 0, where(), "has no weight");
        const at::Tensor& W = tensors[node.refs[0]];
        TORCH_CHECK_VALUE(W.dim() == 2 && W.size(0) == node.width && W.size(1) == in_width(0), where(),
                          "weight ", W.sizes(), " should be [", node.width, ", ", in_width(0), "]");
        if (node.refs[1] >= 0) {
          const at::Tensor& b = tensors[node.refs[1]];
          TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == node.width, where(), "bias ", b.sizes(),
                            " should be [", node.width, "]");
        }
        break;
      }
      case NodeKind::Stage: {
        arity(1, 1);
        same_width();
        const size_t k = node.extra.size();
        TORCH_CHECK_VALUE(cpos + 2 * k <= consts.size(), where(), "consts end inside its parameters");
        node.stage = make_stage(node.extra, consts.slice(cpos, 2 * k));
        cpos += 2 * k;
        break;
      }
      case NodeKind::Affine:
        arity(1, 1);
        same_width();
        refs(2);
        for (int64_t r : node.refs) {
          if (r < 0) continue;
          const at::Tensor& t = tensors[r];
          TORCH_CHECK_VALUE(t.dim() <= 1 && (t.numel() == 1 || t.numel() == node.width), where(),
                            "scale or shift ", t.sizes(), " is neither one value nor one per feature (",
                            node.width, ")");
        }
        TORCH_CHECK_VALUE(cpos + 2 <= consts.size(), where(), "consts end inside its scale and shift");
        node.consts[0] = consts[cpos];
        node.consts[1] = consts[cpos + 1];
        cpos += 2;
        break;
      case NodeKind::Add:
        arity(2, SIZE_MAX);
        same_width();
        break;
      case NodeKind::Concat: {
        arity(1, SIZE_MAX);
        int64_t sum = 0;
        for (size_t j = 0; j < node.inputs.size(); ++j) sum += in_width(j);
        TORCH_CHECK_VALUE(sum == node.width, where(), "its inputs have ", sum, " features, the node ",
                          node.width);
        break;
      }
      case NodeKind::Select:
        arity(1, 1);
        TORCH_CHECK_VALUE(static_cast<int64_t>(node.extra.size()) == node.width, where(), "has ",
                          node.extra.size(), " indices for width ", node.width);
        for (int64_t e : node.extra) {
          TORCH_CHECK_VALUE(e >= 0 && e < in_width(0), where(), "index ", e, " out of range for ",
                            in_width(0), " features");
        }
        break;
      case NodeKind::Mul:
        arity(2, 2);
        same_width();
        break;
    }
    spec.nodes.push_back(std::move(node));
  }
  TORCH_CHECK_VALUE(pos == program.size(), "hessmlp: graph_jet: ", program.size() - pos,
                    " program entries after the last node");
  TORCH_CHECK_VALUE(cpos == consts.size(), "hessmlp: graph_jet: ", consts.size() - cpos,
                    " consts after the last node");
  TORCH_CHECK_VALUE(spec.nodes.size() >= 2, "hessmlp: graph_jet: the graph has no node after the input");
  return spec;
}

namespace {

// An affine node's scale as a factor of its columns [B, C, n].
at::Tensor affine_scale(const GraphNode& node, at::TensorList tensors, const at::TensorOptions& opt) {
  return node.refs[0] >= 0 ? tensors[node.refs[0]].reshape({1, 1, -1})
                           : at::scalar_tensor(node.consts[0], opt);
}

// Every node's jets, [B, C, width] each, contiguous (B > 0). keep_all: all of them (the
// backward's), else each goes once its last consumer has run (only the output is left).
std::vector<at::Tensor> forward_columns(const Kernels& k, const GraphSpec& spec, const at::Tensor& x,
                                        at::TensorList tensors, bool keep_all) {
  const Mode mode = spec.mode;
  const int64_t B = spec.batch, d = spec.d, C = spec.cols();
  const at::TensorOptions opt = x.options();
  const int64_t n_nodes = static_cast<int64_t>(spec.nodes.size());
  std::vector<int64_t> last_use(n_nodes, n_nodes - 1);
  for (int64_t i = 0; i < n_nodes; ++i) {
    for (int64_t in : spec.nodes[i].inputs) last_use[in] = i;
  }
  std::vector<at::Tensor> cols(n_nodes);
  // The input: value x, T the identity, S = 0.
  cols[0] = at::zeros({B, C, d}, opt);
  cols[0].select(1, 0).copy_(x);
  cols[0].narrow(1, 1, d).copy_(at::eye(d, opt).expand({B, d, d}));
  const at::Tensor none;
  for (int64_t i = 1; i < n_nodes; ++i) {
    const GraphNode& node = spec.nodes[i];
    const int64_t n = node.width;
    const at::Tensor& in = cols[node.inputs[0]];
    at::Tensor out;
    switch (node.kind) {
      case NodeKind::Linear: {
        const at::Tensor& W = tensors[node.refs[0]];
        out = at::mm(in.view({B * C, in.size(2)}), W.t()).view({B, C, n});
        if (node.refs[1] >= 0) out.select(1, 0).add_(tensors[node.refs[1]]);
        break;
      }
      case NodeKind::Stage: {
        out = at::empty({B, C, n}, opt);
        at::Tensor no_s1, no_s2;
        k.stage_forward(StageArgs{mode, B, n, d, in, none, none, false, node.stage, nullptr}, out,
                        no_s1, no_s2);
        break;
      }
      case NodeKind::Affine: {
        out = in * affine_scale(node, tensors, opt);
        if (node.refs[1] >= 0) {
          out.select(1, 0).add_(tensors[node.refs[1]].reshape({1, -1}));
        } else if (node.consts[1] != 0.0) {
          out.select(1, 0).add_(node.consts[1]);
        }
        break;
      }
      case NodeKind::Add:
        out = in + cols[node.inputs[1]];
        for (size_t j = 2; j < node.inputs.size(); ++j) out.add_(cols[node.inputs[j]]);
        break;
      case NodeKind::Concat: {
        std::vector<at::Tensor> parts;
        for (int64_t j : node.inputs) parts.push_back(cols[j]);
        out = at::cat(parts, 2);
        break;
      }
      case NodeKind::Select:
        out = in.index_select(2, at::tensor(node.extra, opt.dtype(at::kLong)));
        break;
      case NodeKind::Mul:
        out = at::empty({B, C, n}, opt);
        k.product(mode, d, in, cols[node.inputs[1]], out);
        break;
      case NodeKind::Input:
        break;
    }
    cols[i] = out;
    if (keep_all) continue;
    for (int64_t j : node.inputs) {
      if (last_use[j] == i) cols[j] = at::Tensor();  // (its memory goes back)
    }
  }
  return cols;
}

// The hessmlp setup of every graph op call: device guard, no autocast inside.
struct Scope {
  c10::DeviceGuard guard;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  explicit Scope(const at::Tensor& x) : guard(x.device()) {}
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_jet_run(
    const Kernels& k, const at::Tensor& x_in, at::TensorList tensors,
    const std::vector<std::string>& kinds, at::IntArrayRef program, at::ArrayRef<double> consts,
    c10::string_view mode_name) {
  const GraphSpec spec = check_graph(x_in, tensors, kinds, program, consts, mode_name);
  // (hessmlp computes in the dtype of x and the tensors: see mlp_jet_run.)
  const Scope scope(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = spec.batch, d = spec.d, m = spec.m();
  const at::TensorOptions opt = x.options();
  at::Tensor value = at::empty({B, m}, opt), jac = at::empty({B, m, d}, opt);
  at::Tensor hess = at::empty(hessian_shape(spec.mode, B, m, d), opt);
  if (B == 0) return {value, jac, hess};
  const std::vector<at::Tensor> cols = forward_columns(k, spec, x, tensors, false);
  k.unpack(spec.mode, d, cols.back(), value, jac, hess);
  return {value, jac, hess};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> graph_jet_backward_run(
    const Kernels& k, const std::optional<at::Tensor>& grad_value,
    const std::optional<at::Tensor>& grad_jacobian, const std::optional<at::Tensor>& grad_hessian,
    const at::Tensor& x_in, at::TensorList tensors, const std::vector<std::string>& kinds,
    at::IntArrayRef program, at::ArrayRef<double> consts, c10::string_view mode_name,
    const std::vector<bool>& needs) {
  const GraphSpec spec = check_graph(x_in, tensors, kinds, program, consts, mode_name);
  const int64_t n_tensors = static_cast<int64_t>(tensors.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(needs.size()) == 1 + n_tensors,
                    "hessmlp: graph_jet_backward: needs must have 1 + len(tensors) = ", 1 + n_tensors,
                    " entries, got ", needs.size());
  const Mode mode = spec.mode;
  const int64_t B = spec.batch, d = spec.d, m = spec.m(), C = spec.cols();
  auto grad = [&](const std::optional<at::Tensor>& g, at::IntArrayRef shape, const char* name) {
    if (!g.has_value() || !g->defined()) return at::Tensor();
    TORCH_CHECK_VALUE(g->sizes() == shape, "hessmlp: graph_jet_backward: ", name, " has shape ",
                      g->sizes(), ", expected ", shape);
    TORCH_CHECK_TYPE(g->scalar_type() == x_in.scalar_type() && g->device() == x_in.device(),
                     "hessmlp: graph_jet_backward: ", name, " must be ", x_in.scalar_type(), " on ",
                     x_in.device());
    return g->contiguous();
  };
  const at::Tensor gv = grad(grad_value, {B, m}, "grad_value");
  const at::Tensor gj = grad(grad_jacobian, {B, m, d}, "grad_jacobian");
  const at::Tensor gh =
      mode == Mode::None ? at::Tensor() : grad(grad_hessian, hessian_shape(mode, B, m, d), "grad_hessian");
  const Scope scope(x_in);
  const at::Tensor x = x_in.contiguous();
  const at::TensorOptions opt = x.options();
  at::Tensor grad_x = needs[0] ? at::zeros({B, d}, opt) : at::empty({0}, opt);
  std::vector<at::Tensor> grad_t;
  for (int64_t t = 0; t < n_tensors; ++t) {
    grad_t.push_back(needs[1 + t] ? at::zeros_like(tensors[t], at::MemoryFormat::Contiguous)
                                  : at::empty({0}, opt));
  }
  if (B == 0 || (!gv.defined() && !gj.defined() && !gh.defined())) return {grad_x, grad_t};
  auto need = [&](int64_t ref) { return ref >= 0 && needs[1 + ref]; };

  const std::vector<at::Tensor> cols = forward_columns(k, spec, x, tensors, true);
  const int64_t n_nodes = static_cast<int64_t>(spec.nodes.size());
  // adj[i]: the adjoint of node i's jets [B, C, width], summed over its consumers; a tensor
  // of its own (the adjoints are changed in place), undefined while zero.
  std::vector<at::Tensor> adj(n_nodes);
  auto send = [&](int64_t j, const at::Tensor& t, bool owned) {
    if (!adj[j].defined()) {
      adj[j] = owned ? t : t.clone(at::MemoryFormat::Contiguous);
    } else {
      adj[j].add_(t);
    }
  };
  auto zeros_at = [&](int64_t j) -> at::Tensor& {
    if (!adj[j].defined()) adj[j] = at::zeros({B, C, spec.nodes[j].width}, opt);
    return adj[j];
  };
  adj[n_nodes - 1] = at::empty({B, C, m}, opt);
  k.pack_adjoint(mode, d, gv, gj, gh, adj[n_nodes - 1]);
  const at::Tensor none;
  for (int64_t i = n_nodes - 1; i >= 1; --i) {
    if (!adj[i].defined()) continue;  // (no path from here to the outputs)
    at::Tensor g = std::move(adj[i]);
    adj[i] = at::Tensor();
    const GraphNode& node = spec.nodes[i];
    const int64_t n = node.width, h = node.inputs[0];
    const at::Tensor& in = cols[h];
    switch (node.kind) {
      case NodeKind::Linear: {
        const at::Tensor& W = tensors[node.refs[0]];
        const at::Tensor g2 = g.view({B * C, n});
        if (need(node.refs[0])) grad_t[node.refs[0]].addmm_(g2.t(), in.view({B * C, in.size(2)}));
        if (need(node.refs[1])) grad_t[node.refs[1]].add_(g.select(1, 0).sum(0));
        send(h, at::mm(g2, W).view({B, C, in.size(2)}), true);
        break;
      }
      case NodeKind::Stage:
        k.stage_adjoint(StageArgs{mode, B, n, d, in, none, none, false, node.stage, nullptr}, g);
        send(h, g, true);
        break;
      case NodeKind::Affine: {
        for (int part = 0; part < 2; ++part) {
          const int64_t r = node.refs[part];
          if (!need(r)) continue;
          // d/da: all the columns (v, T, S scale); d/dc: the value row only.
          const at::Tensor per_feature = part == 0 ? (g * in).sum({0, 1}) : g.select(1, 0).sum(0);
          grad_t[r].add_(tensors[r].numel() == 1 ? per_feature.sum().reshape(tensors[r].sizes())
                                                 : per_feature.reshape(tensors[r].sizes()));
        }
        send(h, g.mul_(affine_scale(node, tensors, opt)), true);
        break;
      }
      case NodeKind::Add:
        for (size_t j = 0; j < node.inputs.size(); ++j) {
          // (The last input may take g itself: no other reads it.)
          send(node.inputs[j], g, j + 1 == node.inputs.size() && !adj[node.inputs[j]].defined() &&
                                      std::count(node.inputs.begin(), node.inputs.end(), node.inputs[j]) == 1);
        }
        break;
      case NodeKind::Concat: {
        int64_t off = 0;
        for (int64_t j : node.inputs) {
          const int64_t w = spec.nodes[j].width;
          send(j, g.narrow(2, off, w), false);
          off += w;
        }
        break;
      }
      case NodeKind::Select: {
        at::Tensor back = at::zeros({B, C, in.size(2)}, opt);
        back.index_add_(2, at::tensor(node.extra, opt.dtype(at::kLong)), g);
        send(h, back, true);
        break;
      }
      case NodeKind::Mul: {
        const int64_t q = node.inputs[1];
        at::Tensor& gp = zeros_at(h);
        at::Tensor& gq = zeros_at(q);
        k.product_adjoint(mode, d, in, cols[q], g, gp, gq);
        break;
      }
      case NodeKind::Input:
        break;
    }
  }
  // The input's jets are (x, I, 0): only the value depends on x.
  if (needs[0] && adj[0].defined()) grad_x.copy_(adj[0].select(1, 0));
  return {grad_x, grad_t};
}

}  // namespace hessmlp
