// Shared by every backend: the op's argument checks, the network description
// they produce, and the layout of the stacked jet columns.
#pragma once

#include "jet_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/OptionalArrayRef.h>

#include <optional>
#include <string>
#include <vector>

namespace hessmlp {

// How the full Hessian is formed (see docs/design.md §2 and §3).
enum class Method { Forward, Reverse };

Mode parse_mode(c10::string_view mode);
Method parse_method(c10::string_view method);

// The network after the checks: sizes and where each stage's codes start.
struct NetSpec {
  int64_t batch = 0;                 // B
  int64_t d = 0;                     // input features
  std::vector<int64_t> widths;       // out_features of each Linear (widths.back() = m)
  std::vector<int64_t> stage_start;  // first activation code of the stage after Linear l
  std::vector<int64_t> stage_size;   // number of elementwise functions in that stage
  Mode mode = Mode::None;
  Method method = Method::Forward;

  int64_t n_layers() const { return static_cast<int64_t>(widths.size()); }
  int64_t m() const { return widths.back(); }
  int64_t pairs() const { return n_pairs(mode, d); }
  // Columns per sample in the forward pass: value, d first derivatives, pairs.
  int64_t cols() const { return 1 + d + (method == Method::Forward ? pairs() : 0); }
};

// Checks every argument of mlp_jet (names the argument and shows the value on
// failure) and returns the network description. Backend independent.
NetSpec check_inputs(const at::Tensor& x,
                     at::TensorList weights,
                     const c10::List<std::optional<at::Tensor>>& biases,
                     at::IntArrayRef stage_sizes,
                     at::IntArrayRef act_codes,
                     at::ArrayRef<double> act_params,
                     c10::string_view mode,
                     c10::string_view method);

// Output shapes of mlp_jet, shared by the kernels (the Python fake kernel
// follows the same rule): value (B, m), jacobian (B, m, d), and
// hessian (B, m, d, d) | (B, m, d) | (B, m) | (B, m, 0) for full | diag | trace | none.
std::vector<int64_t> hessian_shape(const NetSpec& net);
std::vector<int64_t> hessian_shape(Mode mode, int64_t B, int64_t m, int64_t d);

// The functions of the stage_derivs op as a kernel argument (checks the codes
// and their number).
StageDesc make_stage(at::IntArrayRef act_codes, at::ArrayRef<double> act_params);

// The stage_derivs op's checks and output, shared by its kernels: z contiguous,
// out [4, *z.shape], the stage as a kernel argument.
struct StageDerivsCall {
  at::Tensor z, out;
  StageDesc stage;
};
StageDerivsCall prepare_stage_derivs(const at::Tensor& z, at::IntArrayRef act_codes,
                                     at::ArrayRef<double> act_params);

// The stage after Linear l as a kernel argument.
StageDesc stage_desc(const NetSpec& net, int64_t l, at::IntArrayRef act_codes,
                     at::ArrayRef<double> act_params);

// Checks the arguments of mlp_jet_backward that mlp_jet does not have: each
// upstream gradient (None or the shape of the output it belongs to) and the
// saved state (empty, or one entry per Linear in the layout mlp_jet returns).
void check_backward_inputs(const NetSpec& net, const at::Tensor& x,
                           const std::optional<at::Tensor>& grad_value,
                           const std::optional<at::Tensor>& grad_jacobian,
                           const std::optional<at::Tensor>& grad_hessian,
                           at::TensorList state);

}  // namespace hessmlp
