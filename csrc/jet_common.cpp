#include "jet_common.h"

#include "activations.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

namespace hessmlp {

Mode parse_mode(c10::string_view mode) {
  if (mode == "full") return Mode::Full;
  if (mode == "diag") return Mode::Diag;
  if (mode == "trace") return Mode::Trace;
  if (mode == "none") return Mode::None;
  if (mode == "cross") return Mode::Cross;
  TORCH_CHECK_VALUE(false, "hessmlp: mode must be one of 'full', 'diag', 'trace', 'cross', 'none', "
                    "got '", std::string(mode), "'");
}

Method parse_method(c10::string_view method) {
  if (method == "forward") return Method::Forward;
  if (method == "reverse") return Method::Reverse;
  TORCH_CHECK_VALUE(false, "hessmlp: method must be 'forward' or 'reverse', got '",
                    std::string(method), "'");
}

NetSpec check_inputs(const at::Tensor& x,
                     at::TensorList weights,
                     const c10::List<std::optional<at::Tensor>>& biases,
                     at::IntArrayRef stage_sizes,
                     at::IntArrayRef act_codes,
                     at::ArrayRef<double> act_params,
                     c10::string_view mode,
                     c10::string_view method) {
  NetSpec net;
  net.mode = parse_mode(mode);
  TORCH_CHECK_VALUE(net.mode != Mode::Cross, "hessmlp: mode 'cross' (pairs with a last direction) "
                    "is graph_jet's, with a seed; mlp_jet takes 'full', 'diag', 'trace' or 'none'");
  net.method = parse_method(method);
  TORCH_CHECK_VALUE(x.dim() == 2, "hessmlp: x must have shape [B, d], got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "hessmlp: x must be float32 or float64, got ", x.scalar_type());
  net.batch = x.size(0);
  net.d = x.size(1);

  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(L >= 1, "hessmlp: weights must hold at least one Linear weight");
  TORCH_CHECK_VALUE(static_cast<int64_t>(biases.size()) == L, "hessmlp: biases must have ", L,
                    " entries (one per weight, None for no bias), got ", biases.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(stage_sizes.size()) == L, "hessmlp: stage_sizes must have ",
                    L, " entries (one per weight), got ", stage_sizes.size());

  int64_t in = net.d;
  int64_t start = 0;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == in, "hessmlp: weights[", l,
                      "] must have shape [n, ", in, "], got ", w.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "hessmlp: weights[", l, "] has dtype ",
                     w.scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(w.device() == x.device(), "hessmlp: weights[", l, "] is on ", w.device(),
                      " but x is on ", x.device());
    TORCH_CHECK_VALUE(w.size(0) >= 1, "hessmlp: weights[", l, "] has no output features");
    const std::optional<at::Tensor> b = biases.get(l);
    if (b.has_value() && b->defined()) {
      TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == w.size(0), "hessmlp: biases[", l,
                        "] must have shape [", w.size(0), "], got ", b->sizes());
      TORCH_CHECK_TYPE(b->scalar_type() == x.scalar_type(), "hessmlp: biases[", l,
                       "] has dtype ", b->scalar_type(), " but x has dtype ", x.scalar_type());
      TORCH_CHECK_VALUE(b->device() == x.device(), "hessmlp: biases[", l, "] is on ",
                        b->device(), " but x is on ", x.device());
    }
    TORCH_CHECK_VALUE(stage_sizes[l] >= 0 && stage_sizes[l] <= kMaxStageOps, "hessmlp: stage_sizes[",
                      l, "] must be between 0 and ", kMaxStageOps,
                      " (elementwise functions between two Linear layers), got ", stage_sizes[l]);
    net.widths.push_back(w.size(0));
    net.stage_start.push_back(start);
    net.stage_size.push_back(stage_sizes[l]);
    start += stage_sizes[l];
    in = w.size(0);
  }
  // Autograd sees a list that mixes None and tensors as one opaque value: it would not see
  // that such a bias requires grad, and its gradient would be dropped without a word. (When
  // another input requires grad, autograd runs this kernel with grad mode off and
  // hessmlp/_ops.py's setup_context refuses the list instead.)
  bool some_none = false, bias_grad = false;
  for (int64_t l = 0; l < L; ++l) {
    const std::optional<at::Tensor> b = biases.get(l);
    const bool has = b.has_value() && b->defined();
    some_none = some_none || !has;
    bias_grad = bias_grad || (has && b->requires_grad());
  }
  TORCH_CHECK_VALUE(!(some_none && bias_grad && at::GradMode::is_enabled()),
                    "hessmlp: biases mixes None and tensors and one of them requires grad; "
                    "autograd cannot differentiate such a list. Pass zeros for the missing biases "
                    "(hessmlp.jet and friends do this), or call under torch.no_grad()");
  TORCH_CHECK_VALUE(static_cast<int64_t>(act_codes.size()) == start, "hessmlp: act_codes must have ",
                    start, " entries (the sum of stage_sizes), got ", act_codes.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(act_params.size()) == 2 * start,
                    "hessmlp: act_params must have ", 2 * start,
                    " entries (two per activation code), got ", act_params.size());
  for (int64_t k = 0; k < start; ++k) {
    TORCH_CHECK_VALUE(act_codes[k] >= 0 && act_codes[k] < ACT_NUM_CODES, "hessmlp: act_codes[", k,
                      "] = ", act_codes[k], " is not a known activation code (0..",
                      ACT_NUM_CODES - 1, ")");
  }
  return net;
}

std::vector<int64_t> hessian_shape(Mode mode, int64_t B, int64_t m, int64_t d) {
  switch (mode) {
    case Mode::Full: return {B, m, d, d};
    case Mode::Diag: return {B, m, d};
    case Mode::Cross: return {B, m, d};
    case Mode::Trace: return {B, m};
    default: return {B, m, 0};
  }
}

std::vector<int64_t> hessian_shape(const NetSpec& net) {
  return hessian_shape(net.mode, net.batch, net.m(), net.d);
}

StageDesc make_stage(at::IntArrayRef act_codes, at::ArrayRef<double> act_params) {
  const int64_t k = static_cast<int64_t>(act_codes.size());
  TORCH_CHECK_VALUE(k <= kMaxStageOps, "hessmlp: at most ", kMaxStageOps,
                    " activation codes per stage, got ", k);
  TORCH_CHECK_VALUE(static_cast<int64_t>(act_params.size()) == 2 * k, "hessmlp: act_params must have ",
                    2 * k, " entries (two per activation code), got ", act_params.size());
  StageDesc st;
  st.n_ops = static_cast<int>(k);
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK_VALUE(act_codes[i] >= 0 && act_codes[i] < ACT_NUM_CODES, "hessmlp: act_codes[", i,
                      "] = ", act_codes[i], " is not a known activation code (0..",
                      ACT_NUM_CODES - 1, ")");
    st.codes[i] = static_cast<int>(act_codes[i]);
    st.params[2 * i] = act_params[2 * i];
    st.params[2 * i + 1] = act_params[2 * i + 1];
  }
  return st;
}

StageDerivsCall prepare_stage_derivs(const at::Tensor& z, at::IntArrayRef act_codes,
                                     at::ArrayRef<double> act_params) {
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
                   "hessmlp: z must be float32 or float64, got ", z.scalar_type());
  StageDerivsCall call;
  call.stage = make_stage(act_codes, act_params);
  call.z = z.contiguous();
  std::vector<int64_t> shape{4};
  shape.insert(shape.end(), z.sizes().begin(), z.sizes().end());
  call.out = at::empty(shape, z.options());
  return call;
}

StageDesc stage_desc(const NetSpec& net, int64_t l, at::IntArrayRef act_codes,
                     at::ArrayRef<double> act_params) {
  StageDesc st;
  st.n_ops = static_cast<int>(net.stage_size[l]);
  for (int k = 0; k < st.n_ops; ++k) {
    st.codes[k] = static_cast<int>(act_codes[net.stage_start[l] + k]);
    st.params[2 * k] = act_params[2 * (net.stage_start[l] + k)];
    st.params[2 * k + 1] = act_params[2 * (net.stage_start[l] + k) + 1];
  }
  return st;
}

namespace {

void check_like(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape,
                const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(t->sizes() == shape, "hessmlp: ", name, " must have shape ", shape, ", got ",
                    t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "hessmlp: ", name, " has dtype ",
                   t->scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(t->device() == x.device(), "hessmlp: ", name, " is on ", t->device(),
                    " but x is on ", x.device());
}

}  // namespace

void check_backward_inputs(const NetSpec& net, const at::Tensor& x,
                           const std::optional<at::Tensor>& grad_value,
                           const std::optional<at::Tensor>& grad_jacobian,
                           const std::optional<at::Tensor>& grad_hessian,
                           at::TensorList state) {
  const int64_t B = net.batch, d = net.d, m = net.m();
  check_like(grad_value, "grad_value", {B, m}, x);
  check_like(grad_jacobian, "grad_jacobian", {B, m, d}, x);
  check_like(grad_hessian, "grad_hessian", hessian_shape(net), x);
  if (state.empty()) return;
  const int64_t L = net.n_layers();
  TORCH_CHECK_VALUE(static_cast<int64_t>(state.size()) == L, "hessmlp: state must be empty or have ",
                    L, " entries (one per weight, as mlp_jet returns it), got ", state.size());
  const int64_t C = 1 + d + net.pairs();
  for (int64_t l = 0; l < L; ++l) {
    std::vector<int64_t> shape{B, net.widths[l]};
    if (l > 0) shape = {B, C, net.widths[l]};
    const std::string name = "state[" + std::to_string(l) + "]";
    check_like(state[l], name.c_str(), shape, x);
  }
}

}  // namespace hessmlp
