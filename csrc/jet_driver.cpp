// The backend-independent algorithms of mlp_jet and mlp_jet_backward (see
// jet_driver.h): GEMMs through ATen, elementwise passes through Kernels.
#include "jet_driver.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <utility>

namespace hessmlp {

void aten_mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  at::Tensor o = out;
  if (o.dim() == 3) {
    if (accumulate) {
      o.baddbmm_(a, b);
    } else {
      at::bmm_out(o, a, b);
    }
  } else if (accumulate) {
    o.addmm_(a, b);
  } else {
    at::mm_out(o, a, b);
  }
}

namespace {

// a @ b into a new tensor, by the backend's mm.
at::Tensor mm_new(const Kernels& k, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  k.mm(out, a, b, false);
  return out;
}

// Up to this d, reverse-Gram's weighted Gram is a fused kernel over one
// triangle; above it, batched GEMMs.
constexpr int64_t kGramKernelMaxD = 16;

at::Tensor bias_of(const c10::List<std::optional<at::Tensor>>& biases, int64_t l) {
  const std::optional<at::Tensor> b = biases.get(l);
  return (b.has_value() && b->defined()) ? b->contiguous() : at::Tensor();
}

enum class Keep { Nothing, Gram, State };

// A stage of affine functions only (or none): its second derivative is 0.
bool is_linear(const StageDesc& st) {
  for (int k = 0; k < st.n_ops; ++k) {
    if (st.codes[k] != ACT_IDENTITY && st.codes[k] != ACT_AFFINE) return false;
  }
  return true;
}

struct ForwardPass {
  at::Tensor out;                 // [B, 1 + d + P, m]  columns after the last stage
  // Keep::Gram, per Linear l: dz_l/dx [B, d, n_l] (layer 0: W_0^T expanded) and s1, s2 [B, n_l].
  std::vector<at::Tensor> jac, s1, s2;
  // Keep::State, per Linear l: its output before bias and stage (mlp_jet's saved state).
  std::vector<at::Tensor> state;
};

struct Net {
  const NetSpec& spec;
  at::TensorList weights;
  const c10::List<std::optional<at::Tensor>>& biases;
  at::IntArrayRef act_codes;
  at::ArrayRef<double> act_params;
  at::Tensor w0t;  // W_0^T [d, n_0], contiguous: T at layer 0 for every sample

  StageArgs stage(Mode mode, int64_t l, const at::Tensor& state, const at::Tensor& bias,
                  StageCache* cache = nullptr, bool value_only = false) const {
    return StageArgs{mode, state.size(0), spec.widths[l], value_only ? 0 : spec.d, state, w0t,
                     bias, l == 0, stage_desc(spec, l, act_codes, act_params), cache};
  }

  // Reverse-Gram's layout, for both of its Gram paths. Mode none (the Jacobian alone, by
  // backpropagation): every stage gives the value alone. Otherwise, with a linear last
  // stage (L >= 2), whose Gram term is 0, the last two stages do. Where either holds the
  // Jacobian comes from the backward pass (dy/dx = dy/dz_0 W_0).
  const bool linear_top = spec.n_layers() >= 2 &&
                          is_linear(stage_desc(spec, spec.n_layers() - 1, act_codes, act_params));
  bool jac_from_backward() const { return spec.mode == Mode::None || linear_top; }
  bool value_only_stage(int64_t l) const {
    return spec.mode == Mode::None || (linear_top && l >= spec.n_layers() - 2);
  }
  bool has_gram(int64_t l) const {
    return spec.mode != Mode::None && !(linear_top && l == spec.n_layers() - 1);
  }
  // Columns per sample of stage l's output, and of Linear l's state (l > 0).
  int64_t out_cols(int64_t l) const { return value_only_stage(l) ? 1 : 1 + spec.d; }
  int64_t state_cols(int64_t l) const { return out_cols(l - 1); }
};

// The stage after Linear l applied to that layer's state (any batch: the rows of
// `state`), written into out [rows, C, n]; its derivatives s1, s2 [rows, n] too where defined.
void stage_forward_into(const Kernels& k, const Net& net, Mode mode, int64_t l,
                        const at::Tensor& state, at::Tensor& out, at::Tensor s1 = {},
                        at::Tensor s2 = {}, StageCache* cache = nullptr, bool value_only = false) {
  const at::Tensor bias = bias_of(net.biases, l);
  if (state.size(0) > 0) {
    k.stage_forward(net.stage(mode, l, state, bias, cache, value_only), out, s1, s2);
  }
}

at::Tensor stage_forward(const Kernels& k, const Net& net, Mode mode, int64_t l,
                         const at::Tensor& state, StageCache* cache = nullptr) {
  const int64_t C = 1 + net.spec.d + n_pairs(mode, net.spec.d);
  at::Tensor out = at::empty({state.size(0), C, net.spec.widths[l]}, state.options());
  stage_forward_into(k, net, mode, l, state, out, {}, {}, cache);
  return out;
}

// The forward jet for a block of samples at a time, each block through all the
// layers while its columns are in cache, blocks in parallel (the CPU's way: see
// Kernels::rows_per_block). Same results as the whole-batch pass.
ForwardPass forward_blocked(const Kernels& k, const Net& net, Mode mode, const at::Tensor& x,
                            bool keep_state, int64_t rows) {
  const NetSpec& spec = net.spec;
  const int64_t B = spec.batch, d = spec.d, L = spec.n_layers();
  const int64_t C = 1 + d + n_pairs(mode, d);
  const int64_t n_max = *std::max_element(spec.widths.begin(), spec.widths.end());
  ForwardPass fp;
  fp.out = at::empty({B, C, spec.m()}, x.options());
  if (keep_state) {
    for (int64_t l = 0; l < L; ++l) {
      fp.state.push_back(l == 0 ? at::empty({B, spec.widths[0]}, x.options())
                                : at::empty({B, C, spec.widths[l]}, x.options()));
    }
  }
  std::vector<at::Tensor> wt;  // W_l^T
  for (int64_t l = 0; l < L; ++l) wt.push_back(net.weights[l].t().contiguous());
  const int64_t blocks = (B + rows - 1) / rows;
  parallel_blocks(blocks, [&](int64_t c0, int64_t c1) {
    // Work space reused by every block and layer of this task.
    at::Tensor buf[3] = {at::empty({rows * C * n_max}, x.options()),
                         at::empty({rows * C * n_max}, x.options()),
                         at::empty({rows * C * n_max}, x.options())};
    // Views of it for a block of nb samples, made once per block size: per layer its
    // state (unless kept) and its output columns (but the last layer's), also as rows.
    int64_t views_nb = -1;
    std::vector<at::Tensor> st_v, out_v, out_rows;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = c * rows, nb = std::min(rows, B - b0);
      if (views_nb != nb) {
        views_nb = nb;
        st_v.clear();
        out_v.clear();
        out_rows.clear();
        for (int64_t l = 0; l < L; ++l) {
          const int64_t n = spec.widths[l];
          st_v.push_back(l == 0 ? buf[2].narrow(0, 0, nb * n).view({nb, n})
                                : buf[2].narrow(0, 0, nb * C * n).view({nb, C, n}));
          out_v.push_back(buf[l % 2].narrow(0, 0, nb * C * n).view({nb, C, n}));
          out_rows.push_back(out_v[l].view({nb * C, n}));
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        const int64_t n = spec.widths[l];
        at::Tensor st = keep_state ? fp.state[l].narrow(0, b0, nb) : st_v[l];
        if (l == 0) {
          k.mm(st, x.narrow(0, b0, nb), wt[0], false);
        } else {
          k.mm(st.view({nb * C, n}), out_rows[l - 1], wt[l], false);
        }
        at::Tensor out = l == L - 1 ? fp.out.narrow(0, b0, nb) : out_v[l];
        stage_forward_into(k, net, mode, l, st, out);
      }
    }
  });
  return fp;
}

ForwardPass forward_pass(const Kernels& k, const Net& net, Mode mode, const at::Tensor& x,
                         Keep keep) {
  const NetSpec& spec = net.spec;
  const int64_t B = spec.batch, d = spec.d;
  const int64_t C = 1 + d + n_pairs(mode, d);
  if (keep != Keep::Gram && k.rows_per_block) {
    const int64_t n_max = *std::max_element(spec.widths.begin(), spec.widths.end());
    const int64_t rows = k.rows_per_block(C * n_max * x.element_size(), B);
    if (rows < B) return forward_blocked(k, net, mode, x, keep == Keep::State, rows);
  }
  ForwardPass fp;
  at::Tensor act;  // [B, C, n_l]: the columns after stage l
  for (int64_t l = 0; l < spec.n_layers(); ++l) {
    const int64_t n = spec.widths[l];
    // Layer 0: z_0 = x W_0^T (the bias is added in the stage), T_0 = W_0, S_0 = 0.
    const at::Tensor state =
        l == 0 ? mm_new(k, x, net.weights[0].t())
               : mm_new(k, act.view({B * act.size(1), spec.widths[l - 1]}), net.weights[l].t())
                     .view({B, act.size(1), n});
    if (keep == Keep::Gram) {  // (reverse-Gram's layout: Net::value_only_stage)
      const at::Tensor s1 = at::empty({B, n}, x.options()), s2 = at::empty({B, n}, x.options());
      act = at::empty({B, net.out_cols(l), n}, x.options());
      stage_forward_into(k, net, mode, l, state, act, s1, s2, nullptr, net.value_only_stage(l));
      fp.jac.push_back(!net.has_gram(l) ? at::Tensor()
                       : l == 0         ? net.w0t.unsqueeze(0).expand({B, d, n})
                                        : state.narrow(1, 1, d));
      fp.s1.push_back(s1);
      fp.s2.push_back(s2);
    } else {
      act = stage_forward(k, net, mode, l, state);
      if (keep == Keep::State) fp.state.push_back(state);
    }
  }
  fp.out = act;
  return fp;
}

// Reverse-Gram for large d with batched GEMMs over the upper triangle of blocks of
// the Hessian (symmetric: about 5/8 of the full product with 4 blocks a side). Each
// block sums its layers inside the GEMMs (beta = 1) and is written to hess once:
// hess[b, k, I, J] = sum_l T_l,I^T diag(w_l[b, k]) T_l,J for blocks I <= J.
// terms: per layer, T ([d, n] shared by all samples at layer 0, else [B, d, n]) and
// w [B, m, n].
constexpr int64_t kGramBlocks = 4;

void gram_blocks(const Kernels& k, const std::vector<std::pair<at::Tensor, at::Tensor>>& terms,
                 at::Tensor& hess) {
  const int64_t B = hess.size(0), m = hess.size(1), d = hess.size(-1);
  const int64_t bs = (d + kGramBlocks - 1) / kGramBlocks;
  for (int64_t i0 = 0; i0 < d; i0 += bs) {
    const int64_t ni = std::min(bs, d - i0), nj = d - i0;
    at::Tensor acc = at::empty({B, m, ni, nj}, hess.options());
    bool first = true;
    for (const auto& [t, w] : terms) {
      const int64_t n = w.size(2);
      const bool shared = t.dim() == 2;
      const at::Tensor tb = shared ? t.unsqueeze(0).unsqueeze(0) : t.unsqueeze(1);  // [B|1, 1, d, n]
      // Rows I of T scaled by w: [B, m, |I|, n], then one GEMM (shared T) or one GEMM per
      // sample against the rows J >= I of T, with no copy of T per output.
      const at::Tensor a = (tb.narrow(2, i0, ni) * w.unsqueeze(2)).contiguous();
      if (shared) {
        k.mm(acc.view({B * m * ni, nj}), a.view({B * m * ni, n}), t.narrow(0, i0, nj).t(), !first);
      } else {
        const at::Tensor acc3 = acc.view({B, m * ni, nj});
        const at::Tensor a3 = a.view({B, m * ni, n});
        const at::Tensor rhs = t.narrow(1, i0, nj).transpose(1, 2);
        k.mm(acc3, a3, rhs, !first);
      }
      first = false;
    }
    hess.narrow(2, i0, ni).narrow(3, i0, nj).copy_(acc);
  }
}

// Copies the upper triangle of blocks (gram_blocks) to the lower one.
void mirror_blocks(at::Tensor& hess) {
  const int64_t d = hess.size(-1), bs = (d + kGramBlocks - 1) / kGramBlocks;
  for (int64_t i0 = 0; i0 < d; i0 += bs) {
    const int64_t ni = std::min(bs, d - i0);
    if (i0 + ni >= d) break;
    at::Tensor lower = hess.narrow(2, i0 + ni, d - i0 - ni).narrow(3, i0, ni);
    lower.copy_(hess.narrow(2, i0, ni).narrow(3, i0 + ni, d - i0 - ni).transpose(2, 3));
  }
}

// Reverse-Gram (docs/design.md §3) with the Gram kernel, block by block (on the CPU, as
// forward_blocked; blocks in parallel): each block of samples goes forward through all
// layers keeping T, s1 and s2 of each, then back with an ordinary backward pass of m
// columns, adding each layer's Gram term to packed [B, m, Q]. value [B, m] and jac
// [B, m, d] come from the forward.
void reverse_gram_blocked(const Kernels& k, const Net& net, const at::Tensor& x, int64_t rows,
                          at::Tensor& value, at::Tensor& jac, const at::Tensor& packed) {
  const NetSpec& spec = net.spec;
  const int64_t B = spec.batch, d = spec.d, m = spec.m(), L = spec.n_layers(), C = 1 + d;
  const int64_t n_max = *std::max_element(spec.widths.begin(), spec.widths.end());
  const at::TensorOptions opt = x.options();
  std::vector<at::Tensor> wt;  // W_l^T
  for (int64_t l = 0; l < L; ++l) wt.push_back(net.weights[l].t().contiguous());
  const bool top = net.jac_from_backward();  // (and the last stage gives the value alone)
  const int64_t blocks = (B + rows - 1) / rows;
  packed.zero_();  // (the Gram kernel adds to it)
  const at::Tensor eye = at::eye(m, opt).unsqueeze(0).expand({rows, m, m});
  parallel_blocks(blocks, [&](int64_t c0, int64_t c1) {
    // Work space reused by every block of this task: each layer's state and derivatives,
    // two buffers of columns and two of backward rows.
    std::vector<at::Tensor> st, s1, s2;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t n = spec.widths[l];
      st.push_back(l == 0 ? at::empty({rows, n}, opt) : at::empty({rows, net.state_cols(l), n}, opt));
      s1.push_back(at::empty({rows, n}, opt));
      s2.push_back(at::empty({rows, n}, opt));
    }
    at::Tensor cols[2] = {at::empty({rows * C * n_max}, opt), at::empty({rows * C * n_max}, opt)};
    at::Tensor back[2] = {at::empty({rows * m * std::max(m, n_max)}, opt),
                          at::empty({rows * m * std::max(m, n_max)}, opt)};
    // The views of the work space for a block of nb samples, made once per block size (a
    // view costs about as much as a small kernel): per layer l its state z (and as rows
    // for the GEMM), its output columns, s1, s2, T, and g_l = dy/da_l [nb, m, n_l] (and as
    // rows), which lives in back[(L - 1 - l) % 2].
    struct Views {
      int64_t nb = -1;
      std::vector<at::Tensor> z, z2, out, d1, d2, t, g, g2;
      at::Tensor eye;  // [nb, m, m]: dy_k/da_{L-1} for every output k
    } v;
    auto views_for = [&](int64_t nb) {
      if (v.nb == nb) return;
      v = Views{};
      v.nb = nb;
      v.eye = eye.narrow(0, 0, nb);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t n = spec.widths[l];
        v.z.push_back(st[l].narrow(0, 0, nb));
        v.z2.push_back(l == 0 ? v.z[l] : v.z[l].view({nb * net.state_cols(l), n}));
        v.out.push_back(
            cols[l % 2].narrow(0, 0, nb * net.out_cols(l) * n).view({nb, net.out_cols(l), n}));
        v.d1.push_back(s1[l].narrow(0, 0, nb));
        v.d2.push_back(s2[l].narrow(0, 0, nb));
        v.t.push_back(!net.has_gram(l)      ? at::Tensor()
                      : l == 0               ? net.w0t
                                             : v.z[l].narrow(1, 1, d));
        v.g.push_back(back[(L - 1 - l) % 2].narrow(0, 0, nb * m * n).view({nb, m, n}));
        v.g2.push_back(v.g[l].view({nb * m, n}));
      }
    };
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = c * rows, nb = std::min(rows, B - b0);
      views_for(nb);
      at::Tensor val = value.narrow(0, b0, nb), jb = jac.narrow(0, b0, nb);
      for (int64_t l = 0; l < L; ++l) {
        if (l == 0) {
          k.mm(v.z2[0], x.narrow(0, b0, nb), wt[0], false);
        } else {
          k.mm(v.z2[l], v.out[l - 1].view({nb * net.out_cols(l - 1), spec.widths[l - 1]}),
               wt[l], false);
        }
        // (With the value alone at the top, the last stage writes it into value itself.)
        at::Tensor out = top && l == L - 1 ? val.view({nb, 1, m}) : v.out[l];
        stage_forward_into(k, net, Mode::None, l, v.z[l], out, v.d1[l], v.d2[l], nullptr,
                           net.value_only_stage(l));
      }
      if (!top) {
        at::Tensor no_hess;
        k.unpack(Mode::None, d, v.out[L - 1], val, jb, no_hess);
      }
      at::Tensor p = packed.narrow(0, b0, nb);
      for (int64_t l = L - 1; l >= 0; --l) {
        if (!net.has_gram(l)) {
          // dy_k/dz_l = dy_k/da_l * s1 (at the top: the identity times s1); no Gram term.
          if (l == L - 1) {
            at::mul_out(v.g[l], v.eye, v.d1[l].unsqueeze(1));
          } else {
            v.g[l].mul_(v.d1[l].unsqueeze(1));
          }
        } else {
          if (l == L - 1) v.g[l].copy_(v.eye);  // dy_k/da_{L-1}: the identity
          k.gram(spec.mode, v.g[l], v.d1[l], v.d2[l], v.t[l], p);
        }
        if (l > 0) k.mm(v.g2[l - 1], v.g2[l], net.weights[l], false);
      }
      if (top) {  // dy/dx = dy/dz_0 W_0
        k.mm(jb.view({nb * m, d}), v.g2[0], net.weights[0], false);
      }
    }
  });
}

// Reverse-Gram (docs/design.md §3):  H[k] = sum_l T_l^T diag(g_l^k * s2_l) T_l, with
// g_l^k = dy_k/da_l from an ordinary backward pass of m columns; in mode diag or
// trace only the diagonal or its sum of each term.
void reverse_gram(const Kernels& k, const Net& net, const at::Tensor& x, at::Tensor& value,
                  at::Tensor& jac, at::Tensor& hess) {
  const NetSpec& spec = net.spec;
  const int64_t B = spec.batch, d = spec.d, m = spec.m(), Q = spec.pairs();
  const Mode mode = spec.mode;
  if (B == 0) return;
  if (mode != Mode::Full || d <= kGramKernelMaxD) {
    // The Gram kernel, summing into the packed triangle (full) or into hess itself. Blocks
    // sized as the forward jet's (one sample's z and T at the widest layer) on the CPU; a
    // backend without blocks takes the whole batch as one.
    const at::Tensor packed =
        mode == Mode::Full ? at::empty({B, m, Q}, x.options()) : hess.view({B, m, Q});
    const int64_t n_max = *std::max_element(spec.widths.begin(), spec.widths.end());
    const int64_t rows =
        k.rows_per_block ? std::min(B, k.rows_per_block((1 + d) * n_max * x.element_size(), B)) : B;
    reverse_gram_blocked(k, net, x, rows, value, jac, packed);
    if (mode == Mode::Full) k.unpack_packed(d, packed.view({B * m, Q}), hess);
    return;
  }
  // Large d, full Hessian: the whole batch, its Gram terms by batched GEMMs.
  const ForwardPass fp = forward_pass(k, net, Mode::None, x, Keep::Gram);
  const bool top = net.jac_from_backward();
  value.copy_(fp.out.select(1, 0));
  if (!top) jac.copy_(fp.out.narrow(1, 1, d).transpose(1, 2));
  std::vector<std::pair<at::Tensor, at::Tensor>> terms;  // (T_l, w_l)
  // g = dy_k/da_l for every output k: the identity at the top.
  at::Tensor g = at::eye(m, x.options()).unsqueeze(0).expand({B, m, m}).contiguous();
  for (int64_t l = spec.n_layers() - 1; l >= 0; --l) {
    const int64_t n = spec.widths[l];
    if (net.has_gram(l)) {
      terms.emplace_back(l == 0 ? net.w0t : fp.jac[l], (g * fp.s2[l].unsqueeze(1)).contiguous());
    }
    g.mul_(fp.s1[l].unsqueeze(1));
    if (l > 0) g = mm_new(k, g.view({B * m, n}), net.weights[l]).view({B, m, spec.widths[l - 1]});
  }
  if (top) {  // dy/dx = dy/dz_0 W_0
    k.mm(jac.view({B * m, d}), g.view({B * m, spec.widths[0]}), net.weights[0], false);
  }
  gram_blocks(k, terms, hess);
  mirror_blocks(hess);
}

// The backward sweep (docs/design.md §4) for samples b0 .. b0 + nb: adds their weight
// and bias gradients to gw, gb (empty entries are not asked for) and writes their
// rows of grad_x (when need_x).
void backward_sweep(const Kernels& k, const Net& net, const at::Tensor& x,
                    const std::vector<at::Tensor>& state, const at::Tensor& gv,
                    const at::Tensor& gj, const at::Tensor& gh, int64_t b0, int64_t nb,
                    bool need_x, bool need_w, at::Tensor& grad_x, std::vector<at::Tensor>& gw,
                    std::vector<at::Tensor>& gb) {
  const NetSpec& spec = net.spec;
  const int64_t d = spec.d, L = spec.n_layers();
  const int64_t C = 1 + d + spec.pairs();
  auto rows = [&](const at::Tensor& t) { return t.defined() ? t.narrow(0, b0, nb) : t; };
  // The adjoint of the last layer's columns [nb, C, m].
  at::Tensor g = at::empty({nb, C, spec.m()}, x.options());
  k.pack_adjoint(spec.mode, d, rows(gv), rows(gj), rows(gh), g);
  StageCache cache;  // what the recomputation below kept of the current stage
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t n = spec.widths[l];
    // The stage: g becomes the adjoint of this Linear's output (z_bar, T_bar, S_bar).
    k.stage_adjoint(net.stage(spec.mode, l, rows(state[l]), bias_of(net.biases, l), &cache), g);
    cache = StageCache{};
    const at::Tensor zbar = g.select(1, 0);  // [nb, n]
    if (gb[l].numel() > 0) gb[l].add_(zbar.sum(0));
    if (l > 0) {
      const int64_t n_prev = spec.widths[l - 1];
      const at::Tensor g2 = g.view({nb * C, n});
      if (need_w) {
        // This Linear's input: the previous stage applied to the previous state.
        const at::Tensor act =
            stage_forward(k, net, spec.mode, l - 1, rows(state[l - 1]), &cache);
        k.mm(gw[l], g2.t(), act.view({nb * C, n_prev}), true);
      }
      g = mm_new(k, g2, net.weights[l]).view({nb, C, n_prev});
    } else {
      // z_0 = x W_0^T and T_0 = W_0 (S_0 = 0): the x term and the sum of T_bar over the batch.
      if (need_w) {
        k.mm(gw[0], zbar.t(), rows(x), true);
        gw[0].add_(g.narrow(1, 1, d).sum(0).t());
      }
      if (need_x) {
        k.mm(grad_x.narrow(0, b0, nb), zbar, net.weights[0], false);
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_jet_run(
    const Kernels& k, const at::Tensor& x_in, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef stage_sizes,
    at::IntArrayRef act_codes, at::ArrayRef<double> act_params, c10::string_view mode,
    c10::string_view method, bool save_state) {
  NetSpec spec = check_inputs(x_in, weights, biases, stage_sizes, act_codes, act_params, mode,
                              method);
  // d = 0: no derivatives to form; forward jets give the value alone (reverse-Gram's layout
  // assumes d >= 1).
  if (spec.d == 0) spec.method = Method::Forward;
  const OpScope scope(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = spec.batch, d = spec.d, m = spec.m();
  at::Tensor value = at::empty({B, m}, x.options());
  at::Tensor jac = at::empty({B, m, d}, x.options());
  at::Tensor hess = at::empty(hessian_shape(spec), x.options());
  const Net net{spec, weights, biases, act_codes, act_params, weights[0].t().contiguous()};

  if (spec.method == Method::Reverse) {
    // Reverse-Gram has no second-order state to save: the backward recomputes it.
    reverse_gram(k, net, x, value, jac, hess);
    return {value, jac, hess, {}};
  }
  ForwardPass fp = forward_pass(k, net, spec.mode, x, save_state ? Keep::State : Keep::Nothing);
  if (B > 0) k.unpack(spec.mode, d, fp.out, value, jac, hess);
  return {value, jac, hess, std::move(fp.state)};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_jet_backward_run(
    const Kernels& k, const std::optional<at::Tensor>& grad_value,
    const std::optional<at::Tensor>& grad_jacobian, const std::optional<at::Tensor>& grad_hessian,
    const at::Tensor& x_in, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef stage_sizes,
    at::IntArrayRef act_codes, at::ArrayRef<double> act_params, c10::string_view mode,
    at::TensorList saved, std::array<bool, 3> output_mask) {
  const NetSpec spec = check_inputs(x_in, weights, biases, stage_sizes, act_codes, act_params,
                                    mode, "forward");
  check_backward_inputs(spec, x_in, grad_value, grad_jacobian, grad_hessian, saved);
  const OpScope scope(x_in);
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  const int64_t B = spec.batch, d = spec.d, L = spec.n_layers();
  const int64_t P = spec.pairs();
  const int64_t C = 1 + d + P;
  const at::Tensor x = x_in.contiguous();
  const at::TensorOptions opt = x.options();

  at::Tensor grad_x = need_x ? at::zeros({B, d}, opt) : at::empty({0}, opt);
  std::vector<at::Tensor> grad_w, grad_b;
  for (int64_t l = 0; l < L; ++l) {
    grad_w.push_back(need_w ? at::zeros(weights[l].sizes(), opt) : at::empty({0}, opt));
    grad_b.push_back(need_b && bias_of(biases, l).defined() ? at::zeros({spec.widths[l]}, opt)
                                                             : at::empty({0}, opt));
  }
  auto defined = [](const std::optional<at::Tensor>& t) {
    return (t.has_value() && t->defined()) ? t->contiguous() : at::Tensor();
  };
  const at::Tensor gv = defined(grad_value), gj = defined(grad_jacobian);
  const at::Tensor gh = P > 0 ? defined(grad_hessian) : at::Tensor();
  if (B == 0 || (!need_x && !need_w && !need_b) || (!gv.defined() && !gj.defined() && !gh.defined())) {
    return {grad_x, grad_w, grad_b};
  }
  const Net net{spec, weights, biases, act_codes, act_params, weights[0].t().contiguous()};

  // The state of every layer: saved by the forward, or recomputed here.
  std::vector<at::Tensor> state;
  if (saved.empty()) {
    state = forward_pass(k, net, spec.mode, x, Keep::State).state;
  } else {
    for (const at::Tensor& s : saved) state.push_back(s.contiguous());
  }

  const int64_t n_max = *std::max_element(spec.widths.begin(), spec.widths.end());
  const int64_t rows = k.rows_per_block ? k.rows_per_block(C * n_max * x.element_size(), B) : B;
  if (rows >= B) {
    backward_sweep(k, net, x, state, gv, gj, gh, 0, B, need_x, need_w, grad_x, grad_w, grad_b);
    return {grad_x, grad_w, grad_b};
  }
  // Blocks of samples in parallel; each task sums its weight and bias gradients apart,
  // and the tasks' sums are added in the order of their blocks (the same bits every run).
  const int64_t blocks = (B + rows - 1) / rows;
  std::vector<std::vector<at::Tensor>> task_gw(blocks), task_gb(blocks);
  parallel_blocks(blocks, [&](int64_t c0, int64_t c1) {
    std::vector<at::Tensor>& gw = task_gw[c0];
    std::vector<at::Tensor>& gb = task_gb[c0];
    for (int64_t l = 0; l < L; ++l) {
      gw.push_back(grad_w[l].numel() ? at::zeros_like(grad_w[l]) : grad_w[l]);
      gb.push_back(grad_b[l].numel() ? at::zeros_like(grad_b[l]) : grad_b[l]);
    }
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = c * rows;
      backward_sweep(k, net, x, state, gv, gj, gh, b0, std::min(rows, B - b0), need_x, need_w,
                     grad_x, gw, gb);
    }
  });
  for (int64_t c = 0; c < blocks; ++c) {
    for (size_t l = 0; l < task_gw[c].size(); ++l) {
      if (grad_w[l].numel()) grad_w[l].add_(task_gw[c][l]);
      if (grad_b[l].numel()) grad_b[l].add_(task_gb[c][l]);
    }
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace hessmlp
