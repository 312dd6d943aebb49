// The op graph_jet (docs/design.md §9): forward jets over a graph network, node by node,
// for every backend. Each node's jets are columns [B, C, n] (value, d first-order rows, the
// mode's second-order rows), as a chain's layers have: linear nodes are GEMMs over them,
// stages and products the backend's elementwise passes, affine, add, concat and select
// ATen operations.
#include "graph.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <utility>

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
                      at::ArrayRef<double> consts, c10::string_view mode,
                      const std::optional<at::Tensor>& seed) {
  GraphSpec spec;
  spec.mode = parse_mode(mode);
  TORCH_CHECK_VALUE(x.dim() == 2, "hessmlp: graph_jet: x must have shape [B, d], got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "hessmlp: graph_jet: x must be float32 or float64, got ", x.scalar_type());
  spec.batch = x.size(0);
  spec.d = x.size(1);
  spec.k = spec.d;
  if (seed.has_value() && seed->defined()) {
    const at::Tensor& u = *seed;
    TORCH_CHECK_VALUE(
        (u.dim() == 2 || (u.dim() == 3 && u.size(0) == spec.batch)) && u.size(-1) == spec.d &&
            u.size(-2) >= 1,
        "hessmlp: graph_jet: seed must have shape [k, d] or [B, k, d] with k >= 1 (B = ", spec.batch,
        ", d = ", spec.d, "), got ", u.sizes());
    TORCH_CHECK_TYPE(u.scalar_type() == x.scalar_type(), "hessmlp: graph_jet: seed is ",
                     u.scalar_type(), " but x is ", x.scalar_type());
    TORCH_CHECK_VALUE(u.device() == x.device(), "hessmlp: graph_jet: seed is on ", u.device(),
                      " but x is on ", x.device());
    spec.k = u.size(-2);
  }
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

// Work space of one task: buffers of the block's largest columns [rows, C, n_max], taken and
// given back as nodes' columns and adjoints come and go, and reused by the task's next block
// (fresh allocations of this size would each be new pages from the system).
class Pool {
 public:
  Pool(int64_t elems, const at::TensorOptions& opt) : elems_(elems), opt_(opt) {}

  // A [B, C, n] tensor of a free buffer (uninitialised).
  at::Tensor take(at::IntArrayRef shape) {
    int64_t numel = 1;
    for (int64_t s : shape) numel *= s;
    if (numel > elems_) return at::empty(shape, opt_);  // (not pooled)
    if (free_.empty()) {
      bufs_.push_back(at::empty({elems_}, opt_));
      free_.push_back(bufs_.size() - 1);
    }
    const size_t i = free_.back();
    free_.pop_back();
    return bufs_[i].narrow(0, 0, numel).view(shape);
  }
  at::Tensor zeros(at::IntArrayRef shape) { return take(shape).zero_(); }
  // t's buffer is free again (t from take; others are left to ATen).
  void give(const at::Tensor& t) {
    for (size_t i = 0; i < bufs_.size(); ++i) {
      if (bufs_[i].data_ptr() == t.data_ptr()) {
        free_.push_back(i);
        return;
      }
    }
  }
  // Every buffer free (a new block).
  void reset() {
    free_.clear();
    for (size_t i = bufs_.size(); i-- > 0;) free_.push_back(i);
  }

 private:
  int64_t elems_;
  at::TensorOptions opt_;
  std::vector<at::Tensor> bufs_;
  std::vector<size_t> free_;
};

int64_t widest(const GraphSpec& spec) {
  int64_t n_max = 1;
  for (const GraphNode& node : spec.nodes) n_max = std::max(n_max, node.width);
  return n_max;
}

// W^T, contiguous, of every Linear node's weight (at its index in tensors; the others
// undefined): made once per call, not once per block.
std::vector<at::Tensor> transposed_weights(const GraphSpec& spec, at::TensorList tensors) {
  std::vector<at::Tensor> wt(tensors.size());
  for (const GraphNode& node : spec.nodes) {
    if (node.kind == NodeKind::Linear && !wt[node.refs[0]].defined()) {
      wt[node.refs[0]] = tensors[node.refs[0]].t().contiguous();
    }
  }
  return wt;
}

// Every node's jets for the samples of x, [B, C, width] each, contiguous (B > 0), in buffers
// of pool. keep_all: all of them (the backward's), else each goes back to the pool once its
// last consumer has run (only the output is left). wt: transposed_weights.
std::vector<at::Tensor> forward_columns(const Kernels& k, const GraphSpec& spec, const at::Tensor& x,
                                        const at::Tensor& seed, at::TensorList tensors,
                                        const std::vector<at::Tensor>& wt, bool keep_all,
                                        Pool& pool) {
  const Mode mode = spec.mode;
  const int64_t B = x.size(0), d = spec.k, C = spec.cols();  // (d: the directions)
  const at::TensorOptions opt = x.options();
  const int64_t n_nodes = static_cast<int64_t>(spec.nodes.size());
  std::vector<int64_t> last_use(n_nodes, n_nodes - 1);
  for (int64_t i = 0; i < n_nodes; ++i) {
    for (int64_t in : spec.nodes[i].inputs) last_use[in] = i;
  }
  std::vector<at::Tensor> cols(n_nodes);
  // The input: value x, T the directions (the seed's rows; without one the identity), S = 0.
  cols[0] = pool.zeros({B, C, spec.d});
  cols[0].select(1, 0).copy_(x);
  if (!seed.defined()) {
    cols[0].narrow(1, 1, d).copy_(at::eye(d, opt).expand({B, d, d}));
  } else {
    cols[0].narrow(1, 1, d).copy_(seed.dim() == 2 ? seed.expand({B, d, spec.d}) : seed);
  }
  const at::Tensor none;
  for (int64_t i = 1; i < n_nodes; ++i) {
    const GraphNode& node = spec.nodes[i];
    const int64_t n = node.width;
    const at::Tensor& in = cols[node.inputs[0]];
    at::Tensor out = pool.take({B, C, n});
    switch (node.kind) {
      case NodeKind::Linear: {
        k.mm(out.view({B * C, n}), in.view({B * C, in.size(2)}), wt[node.refs[0]], false);
        if (node.refs[1] >= 0) out.select(1, 0).add_(tensors[node.refs[1]]);
        break;
      }
      case NodeKind::Stage: {
        at::Tensor no_s1, no_s2;
        k.stage_forward(StageArgs{mode, B, n, d, in, none, none, false, node.stage, nullptr}, out,
                        no_s1, no_s2);
        break;
      }
      case NodeKind::Affine: {
        at::mul_out(out, in, affine_scale(node, tensors, opt));
        if (node.refs[1] >= 0) {
          out.select(1, 0).add_(tensors[node.refs[1]].reshape({1, -1}));
        } else if (node.consts[1] != 0.0) {
          out.select(1, 0).add_(node.consts[1]);
        }
        break;
      }
      case NodeKind::Add:
        at::add_out(out, in, cols[node.inputs[1]]);
        for (size_t j = 2; j < node.inputs.size(); ++j) out.add_(cols[node.inputs[j]]);
        break;
      case NodeKind::Concat: {
        int64_t off = 0;
        for (int64_t j : node.inputs) {
          const int64_t w = spec.nodes[j].width;
          out.narrow(2, off, w).copy_(cols[j]);
          off += w;
        }
        break;
      }
      case NodeKind::Select:
        at::index_select_out(out, in, 2, at::tensor(node.extra, opt.dtype(at::kLong)));
        break;
      case NodeKind::Mul:
        k.product(mode, d, in, cols[node.inputs[1]], out);
        break;
      case NodeKind::Input:
        break;
    }
    cols[i] = out;
    if (keep_all) continue;
    for (int64_t j : node.inputs) {
      if (last_use[j] == i && cols[j].defined()) {
        pool.give(cols[j]);
        cols[j] = at::Tensor();
      }
    }
  }
  return cols;
}

// Samples per block: on a backend that goes block by block (the CPU, Kernels::rows_per_block)
// as many as keep one node's columns at the widest node in cache, as a chain's; else B.
int64_t block_rows(const Kernels& k, const GraphSpec& spec, const at::Tensor& x) {
  if (!k.rows_per_block) return spec.batch;
  return std::min(spec.batch, k.rows_per_block(spec.cols() * widest(spec) * x.element_size(), spec.batch));
}

// The backward sweep (docs/design.md §9) for the samples of x: adds the gradients w.r.t. the
// tensors to grad_t (entries not needed are left alone) and writes those w.r.t. x into
// grad_x when defined. gv, gj, gh: the gradients of the block's outputs (undefined: zero).
void backward_block(const Kernels& k, const GraphSpec& spec, const at::Tensor& x,
                    const at::Tensor& seed, at::TensorList tensors,
                    const std::vector<at::Tensor>& wt, const at::Tensor& gv,
                    const at::Tensor& gj, const at::Tensor& gh, const std::vector<bool>& needs,
                    std::vector<at::Tensor>& grad_t, at::Tensor grad_x, at::Tensor& grad_seed,
                    Pool& pool) {
  const Mode mode = spec.mode;
  const int64_t B = x.size(0), d = spec.k, m = spec.m(), C = spec.cols();  // (d: the directions)
  const at::TensorOptions opt = x.options();
  auto need = [&](int64_t ref) { return ref >= 0 && needs[1 + ref]; };
  const std::vector<at::Tensor> cols = forward_columns(k, spec, x, seed, tensors, wt, true, pool);
  const int64_t n_nodes = static_cast<int64_t>(spec.nodes.size());
  // adj[i]: the adjoint of node i's jets [B, C, width], summed over its consumers; a buffer
  // of its own (the adjoints are changed in place), undefined while zero.
  std::vector<at::Tensor> adj(n_nodes);
  // Adds t to node j's adjoint. owned: t is a pool buffer the sweep no longer needs (it
  // becomes the adjoint, or goes back to the pool); else t is copied.
  auto send = [&](int64_t j, const at::Tensor& t, bool owned) {
    if (!adj[j].defined()) {
      if (owned) {
        adj[j] = t;
      } else {
        adj[j] = pool.take(t.sizes());
        adj[j].copy_(t);
      }
    } else {
      adj[j].add_(t);
      if (owned) pool.give(t);
    }
  };
  auto zeros_at = [&](int64_t j) -> at::Tensor& {
    if (!adj[j].defined()) adj[j] = pool.zeros({B, C, spec.nodes[j].width});
    return adj[j];
  };
  adj[n_nodes - 1] = pool.take({B, C, m});
  k.pack_adjoint(mode, d, gv, gj, gh, adj[n_nodes - 1]);
  const at::Tensor none;
  for (int64_t i = n_nodes - 1; i >= 1; --i) {
    if (!adj[i].defined()) continue;  // (no path from here to the outputs)
    at::Tensor g = std::move(adj[i]);
    adj[i] = at::Tensor();
    bool g_sent = false;  // g itself became (or went into) an input's adjoint
    const GraphNode& node = spec.nodes[i];
    const int64_t n = node.width, h = node.inputs[0];
    const at::Tensor& in = cols[h];
    switch (node.kind) {
      case NodeKind::Linear: {
        const at::Tensor& W = tensors[node.refs[0]];
        const at::Tensor g2 = g.view({B * C, n});
        if (need(node.refs[0])) k.mm(grad_t[node.refs[0]], g2.t(), in.view({B * C, in.size(2)}), true);
        if (need(node.refs[1])) grad_t[node.refs[1]].add_(g.select(1, 0).sum(0));
        at::Tensor back = pool.take({B, C, in.size(2)});
        k.mm(back.view({B * C, in.size(2)}), g2, W, false);
        send(h, back, true);
        break;
      }
      case NodeKind::Stage:
        k.stage_adjoint(StageArgs{mode, B, n, d, in, none, none, false, node.stage, nullptr}, g);
        send(h, g, true);
        g_sent = true;
        break;
      case NodeKind::Affine: {
        for (int part = 0; part < 2; ++part) {
          const int64_t r = node.refs[part];
          if (!need(r)) continue;
          // d/da: all the columns (v, T, S scale); d/dc: the value row only.
          at::Tensor per_feature;
          if (part == 0) {
            at::Tensor prod = pool.take(g.sizes());
            at::mul_out(prod, g, in);
            per_feature = prod.sum({0, 1});
            pool.give(prod);
          } else {
            per_feature = g.select(1, 0).sum(0);
          }
          grad_t[r].add_(tensors[r].numel() == 1 ? per_feature.sum().reshape(tensors[r].sizes())
                                                 : per_feature.reshape(tensors[r].sizes()));
        }
        send(h, g.mul_(affine_scale(node, tensors, opt)), true);
        g_sent = true;
        break;
      }
      case NodeKind::Add:
        for (size_t j = 0; j < node.inputs.size(); ++j) {
          // (The last input may take g itself when it has no adjoint yet and appears once.)
          const int64_t in_j = node.inputs[j];
          const bool take_g = j + 1 == node.inputs.size() && !adj[in_j].defined() &&
                              std::count(node.inputs.begin(), node.inputs.end(), in_j) == 1;
          send(in_j, g, take_g);
          g_sent = g_sent || take_g;
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
        at::Tensor back = pool.zeros({B, C, in.size(2)});
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
    if (!g_sent) pool.give(g);
  }
  // The input's jets are (x, the seed, 0): the value row's adjoint is x's, the directions'
  // the seed's (summed over the samples for a shared seed).
  if (grad_x.defined()) {
    if (adj[0].defined()) {
      grad_x.copy_(adj[0].select(1, 0));
    } else {
      grad_x.zero_();
    }
  }
  if (grad_seed.defined() && adj[0].defined()) {
    const at::Tensor g = adj[0].narrow(1, 1, d);
    if (grad_seed.dim() == 2) {
      grad_seed.add_(g.sum(0));
    } else {
      grad_seed.copy_(g);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_jet_run(
    const Kernels& k, const at::Tensor& x_in, at::TensorList tensors,
    const std::vector<std::string>& kinds, at::IntArrayRef program, at::ArrayRef<double> consts,
    c10::string_view mode_name, const std::optional<at::Tensor>& seed_in) {
  const GraphSpec spec = check_graph(x_in, tensors, kinds, program, consts, mode_name, seed_in);
  // (hessmlp computes in the dtype of x and the tensors: see mlp_jet_run.)
  const OpScope scope(x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor seed = seed_in.has_value() && seed_in->defined() ? seed_in->contiguous() : at::Tensor();
  const int64_t B = spec.batch, kd = spec.k, m = spec.m();
  const at::TensorOptions opt = x.options();
  at::Tensor value = at::empty({B, m}, opt), jac = at::empty({B, m, kd}, opt);
  at::Tensor hess = at::empty(hessian_shape(spec.mode, B, m, kd), opt);
  if (B == 0) return {value, jac, hess};
  const int64_t rows = block_rows(k, spec, x);
  // (A backend without blocks, CUDA, allocates each tensor at its size, from its caching
  // allocator: no pool.)
  const int64_t elems = k.rows_per_block ? rows * spec.cols() * widest(spec) : 0;
  const std::vector<at::Tensor> wt = transposed_weights(spec, tensors);
  auto block = [&](int64_t b0, int64_t nb, Pool& pool) {
    pool.reset();
    const at::Tensor seed_b = seed.defined() && seed.dim() == 3 ? seed.narrow(0, b0, nb) : seed;
    const std::vector<at::Tensor> cols =
        forward_columns(k, spec, x.narrow(0, b0, nb), seed_b, tensors, wt, false, pool);
    at::Tensor v = value.narrow(0, b0, nb), j = jac.narrow(0, b0, nb), h = hess.narrow(0, b0, nb);
    k.unpack(spec.mode, kd, cols.back(), v, j, h);
  };
  if (rows >= B) {
    Pool pool(elems, opt);
    block(0, B, pool);
  } else {
    parallel_blocks((B + rows - 1) / rows, [&](int64_t c0, int64_t c1) {
      Pool pool(elems, opt);  // (one per task, reused by its blocks)
      for (int64_t c = c0; c < c1; ++c) block(c * rows, std::min(rows, B - c * rows), pool);
    });
  }
  return {value, jac, hess};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> graph_jet_backward_run(
    const Kernels& k, const std::optional<at::Tensor>& grad_value,
    const std::optional<at::Tensor>& grad_jacobian, const std::optional<at::Tensor>& grad_hessian,
    const at::Tensor& x_in, at::TensorList tensors, const std::vector<std::string>& kinds,
    at::IntArrayRef program, at::ArrayRef<double> consts, c10::string_view mode_name,
    const std::optional<at::Tensor>& seed_in, const std::vector<bool>& needs) {
  const GraphSpec spec = check_graph(x_in, tensors, kinds, program, consts, mode_name, seed_in);
  const int64_t n_tensors = static_cast<int64_t>(tensors.size());
  const at::Tensor seed = seed_in.has_value() && seed_in->defined() ? seed_in->contiguous() : at::Tensor();
  const int64_t n_needs = 1 + n_tensors + (seed.defined() ? 1 : 0);
  TORCH_CHECK_VALUE(static_cast<int64_t>(needs.size()) == n_needs,
                    "hessmlp: graph_jet_backward: needs must have 1 + len(tensors)", seed.defined() ? " + 1" : "",
                    " = ", n_needs, " entries, got ", needs.size());
  const bool need_seed = seed.defined() && needs[1 + n_tensors];
  const Mode mode = spec.mode;
  const int64_t B = spec.batch, d = spec.d, kd = spec.k, m = spec.m();
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
  const at::Tensor gj = grad(grad_jacobian, {B, m, kd}, "grad_jacobian");
  const at::Tensor gh =
      mode == Mode::None ? at::Tensor() : grad(grad_hessian, hessian_shape(mode, B, m, kd), "grad_hessian");
  const OpScope scope(x_in);
  const at::Tensor x = x_in.contiguous();
  const at::TensorOptions opt = x.options();
  at::Tensor grad_x = needs[0] ? at::zeros({B, d}, opt) : at::empty({0}, opt);
  at::Tensor grad_seed = need_seed ? at::zeros(seed.sizes(), opt) : at::empty({0}, opt);
  const bool shared_seed = need_seed && seed.dim() == 2;
  // The gradients summed over the samples: the tensors', then a shared seed's.
  auto zero_grads = [&]() {
    std::vector<at::Tensor> out;
    for (int64_t t = 0; t < n_tensors; ++t) {
      out.push_back(needs[1 + t] ? at::zeros_like(tensors[t], at::MemoryFormat::Contiguous)
                                 : at::empty({0}, opt));
    }
    out.push_back(shared_seed ? at::zeros(seed.sizes(), opt) : at::Tensor());
    return out;
  };
  std::vector<at::Tensor> grad_t = zero_grads();
  auto result = [&]() {
    if (shared_seed) grad_seed.copy_(grad_t.back());
    grad_t.pop_back();
    return std::make_tuple(grad_x, grad_t, grad_seed);
  };
  if (B == 0 || (!gv.defined() && !gj.defined() && !gh.defined())) return result();
  auto rows_of = [](const at::Tensor& t, int64_t b0, int64_t nb) {
    return t.defined() && t.dim() >= 3 ? t.narrow(0, b0, nb) : t;
  };
  auto batch_rows = [](const at::Tensor& t, int64_t b0, int64_t nb) {
    return t.defined() ? t.narrow(0, b0, nb) : at::Tensor();
  };
  const int64_t rows = block_rows(k, spec, x);
  // (A backend without blocks, CUDA, allocates each tensor at its size, from its caching
  // allocator: no pool.)
  const int64_t elems = k.rows_per_block ? rows * spec.cols() * widest(spec) : 0;
  const std::vector<at::Tensor> wt = transposed_weights(spec, tensors);
  // One block: its seed rows (a per-sample seed) or the shared seed, and where its seed
  // gradient goes (a per-sample seed's rows, or the task's sum).
  auto run_block = [&](int64_t b0, int64_t nb, std::vector<at::Tensor>& sums, Pool& pool) {
    pool.reset();
    at::Tensor g_seed = !need_seed ? at::Tensor() : shared_seed ? sums.back() : grad_seed.narrow(0, b0, nb);
    std::vector<at::Tensor> g_t(sums.begin(), sums.end() - 1);
    backward_block(k, spec, x.narrow(0, b0, nb), rows_of(seed, b0, nb), tensors, wt, batch_rows(gv, b0, nb),
                   batch_rows(gj, b0, nb), batch_rows(gh, b0, nb), needs, g_t,
                   needs[0] ? grad_x.narrow(0, b0, nb) : at::Tensor(), g_seed, pool);
  };
  if (rows >= B) {
    Pool pool(elems, opt);
    run_block(0, B, grad_t, pool);
    return result();
  }
  // Blocks in parallel: each task sums its blocks' gradients, then the tasks' sums are added
  // up in task order (the same result for a given split of the blocks).
  const int64_t blocks = (B + rows - 1) / rows;
  std::vector<std::pair<int64_t, std::vector<at::Tensor>>> partial;
  std::mutex lock;
  parallel_blocks(blocks, [&](int64_t c0, int64_t c1) {
    std::vector<at::Tensor> mine = zero_grads();
    Pool pool(elems, opt);  // (one per task, reused by its blocks)
    for (int64_t c = c0; c < c1; ++c) run_block(c * rows, std::min(rows, B - c * rows), mine, pool);
    const std::lock_guard<std::mutex> guard(lock);
    partial.emplace_back(c0, std::move(mine));
  });
  std::sort(partial.begin(), partial.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  for (const auto& [c0, mine] : partial) {
    for (size_t t = 0; t < grad_t.size(); ++t) {
      if (grad_t[t].defined() && grad_t[t].numel() > 0 && mine[t].defined()) grad_t[t].add_(mine[t]);
    }
  }
  return result();
}

}  // namespace hessmlp
