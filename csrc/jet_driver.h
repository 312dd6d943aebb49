// The ops' algorithms, written once for every backend: the sequence of GEMMs
// (through ATen, so cuBLAS on CUDA) and elementwise passes of the forward jet,
// reverse-Gram and the backward sweep. Each backend supplies the elementwise
// passes (csrc/cpu/kernels.h, csrc/cuda/kernels.cuh), all built on the
// per-neuron math of csrc/jet_math.h.
#pragma once

#include "jet_common.h"

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>
#include <vector>

namespace hessmlp {

// The setup of every op call: a device guard, and no autocast inside (hessmlp computes in the
// dtype of x and the parameters: autocast must not reach the GEMMs, which would hand the
// kernels bfloat16 or float16 columns).
struct OpScope {
  c10::DeviceGuard guard;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  explicit OpScope(const at::Tensor& x) : guard(x.device()) {}
};

// body(c0, c1) over the blocks 0 .. blocks - 1, split among threads. The ATen ops the body
// calls dispatch as on the calling thread (below autograd, as in the ops' kernels).
template <typename Body>
void parallel_blocks(int64_t blocks, const Body& body) {
  const at::ThreadLocalState tls;
  at::parallel_for(0, blocks, 1, [&](int64_t c0, int64_t c1) {
    const at::ThreadLocalStateGuard guard(tls);
    body(c0, c1);
  });
}

// What a backend keeps of one stage between its recomputation and its adjoint in the
// backward sweep (the CPU: the derivative arrays, or z + bias and the prims).
struct StageCache {
  at::Tensor t[3];
};

// One stage's pass over a batch: its input in the saved-state layout, the bias
// of the Linear before it and its functions.
struct StageArgs {
  Mode mode;
  int64_t batch, n, d;
  const at::Tensor& state;  // l = 0: [B, n] (z only); l > 0: [B, 1 + d + P, n] (P = 0 for mode
                            // none, where d may also be 0 with a wider state: the value alone)
  const at::Tensor& w0t;    // [d, n]: T at layer 0 (W_0^T), read only when first
  const at::Tensor& bias;   // [n] or undefined
  bool first;               // layer 0: T = w0t for every sample, S = 0
  StageDesc stage;
  // Optional cache for backends that keep values of the stage: used when filled, filled
  // when not. The backward sweep passes the same one to the recomputed stage and then to
  // its adjoint.
  StageCache* cache = nullptr;
};

// Where the input of a stage lives, as the kernels read it.
template <typename T>
StageInput<T> stage_input(const StageArgs& a) {
  // Columns per sample of the state (the stage may use fewer: d = 0 for the value alone).
  const int64_t C = a.first ? 1 : a.state.size(1);
  const T* zp = a.state.data_ptr<T>();
  StageInput<T> in;
  in.z = zp;
  in.z_stride = a.first ? a.n : C * a.n;
  in.t = a.first ? a.w0t.data_ptr<T>() : zp + a.n;
  in.t_stride = a.first ? 0 : C * a.n;
  in.s = (a.first || a.mode == Mode::None) ? nullptr : zp + (1 + a.d) * a.n;
  in.s_stride = C * a.n;
  in.bias = a.bias.defined() ? a.bias.data_ptr<T>() : nullptr;
  return in;
}

// The elementwise passes a backend provides. Tensors are contiguous.
struct Kernels {
  // out [B, C, n] = the stage applied to its input; s1, s2 [B, n] when defined.
  void (*stage_forward)(const StageArgs& a, at::Tensor& out, at::Tensor& s1, at::Tensor& s2);
  // In place on g [B, C, n]: the adjoint of the stage's output becomes that of its input.
  void (*stage_adjoint)(const StageArgs& a, at::Tensor& g);
  // cols [B, C, m] -> value [B, m], jac [B, m, d], hess (mode shape; ignored for mode none).
  void (*unpack)(Mode mode, int64_t d, const at::Tensor& cols, at::Tensor& value, at::Tensor& jac,
                 at::Tensor& hess);
  // The adjoint of unpack into g [B, C, m]; undefined gradients are zero.
  void (*pack_adjoint)(Mode mode, int64_t d, const at::Tensor& value, const at::Tensor& jac,
                       const at::Tensor& hess, at::Tensor& g);
  // Reverse-Gram at one stage, for the mode's Q = n_pairs(mode, d) entries (see gram_term):
  // packed [B, m, Q] += sum_i g[b, k, i] s2[b, i] T[b, a, i] T[b, c, i], then g *= s1 in
  // place (dy/da becomes dy/dz). g [B, m, n], s1 and s2 [B, n] contiguous; T [B, d, n] or
  // [d, n] (shared by every sample: layer 0) with neurons contiguous; packed's rows
  // contiguous.
  void (*gram)(Mode mode, at::Tensor& g, const at::Tensor& s1, const at::Tensor& s2,
               const at::Tensor& t, at::Tensor& packed);
  // packed [R, P] -> full symmetric [R, d, d].
  void (*unpack_packed)(int64_t d, const at::Tensor& packed, at::Tensor& hess);
  // A product node of a graph (docs/design.md §9): out [B, C, n] = the jets of p * q, from
  // p, q [B, C, n].
  void (*product)(Mode mode, int64_t d, const at::Tensor& p, const at::Tensor& q, at::Tensor& out);
  // Its adjoint: adds the adjoints of p's and q's jets to gp and gq [B, C, n] (which may be
  // one tensor), given g, the adjoint of the product's.
  void (*product_adjoint)(Mode mode, int64_t d, const at::Tensor& p, const at::Tensor& q,
                          const at::Tensor& g, at::Tensor& gp, at::Tensor& gq);
  // out [M, N] = a [M, K] @ b [K, N] (+= when accumulate): the products with the weight
  // matrices; or batched, [B, M, N] from [B, M, K] and [B, K, N]. a and b may be transposed
  // views; out's rows are contiguous.
  void (*mm)(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);
  // Samples per block when the forward jet should go block by block through all the
  // layers (bytes_per_row: one sample's columns at the widest layer; batch: the samples of
  // the call); at least batch: the whole batch at once. null: always the whole batch.
  int64_t (*rows_per_block)(int64_t bytes_per_row, int64_t batch);
};

// The products through ATen (cuBLAS on CUDA; batched: one bmm): a backend's mm unless it has
// its own.
void aten_mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// The op entries: checks, a device guard, then the algorithm with k's passes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_jet_run(
    const Kernels& k, const at::Tensor& x, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef stage_sizes,
    at::IntArrayRef act_codes, at::ArrayRef<double> act_params, c10::string_view mode,
    c10::string_view method, bool save_state);

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_jet_backward_run(
    const Kernels& k, const std::optional<at::Tensor>& grad_value,
    const std::optional<at::Tensor>& grad_jacobian, const std::optional<at::Tensor>& grad_hessian,
    const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
    at::IntArrayRef stage_sizes, at::IntArrayRef act_codes, at::ArrayRef<double> act_params,
    c10::string_view mode, at::TensorList state, std::array<bool, 3> output_mask);

// A backend's kernel registrations: mlp_jet_op<&backend::kernels> and
// mlp_jet_backward_op<&backend::kernels> have the ops' schemas.
template <const Kernels& (*K)()>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_jet_op(
    const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
    at::IntArrayRef stage_sizes, at::IntArrayRef act_codes, at::ArrayRef<double> act_params,
    c10::string_view mode, c10::string_view method, bool save_state) {
  return mlp_jet_run(K(), x, weights, biases, stage_sizes, act_codes, act_params, mode, method,
                     save_state);
}

template <const Kernels& (*K)()>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_jet_backward_op(
    const std::optional<at::Tensor>& grad_value, const std::optional<at::Tensor>& grad_jacobian,
    const std::optional<at::Tensor>& grad_hessian, const at::Tensor& x, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef stage_sizes,
    at::IntArrayRef act_codes, at::ArrayRef<double> act_params, c10::string_view mode,
    at::TensorList state, std::array<bool, 3> output_mask) {
  return mlp_jet_backward_run(K(), grad_value, grad_jacobian, grad_hessian, x, weights, biases,
                              stage_sizes, act_codes, act_params, mode, state, output_mask);
}

// Declares a backend's elementwise passes (defined in its mlp_jet, mlp_jet_backward and
// graph files) and kernels(), the Kernels made of them.
#define HESSMLP_DECLARE_KERNELS()                                                              \
  void stage_forward(const StageArgs& a, at::Tensor& out, at::Tensor& s1, at::Tensor& s2);     \
  void unpack(Mode mode, int64_t d, const at::Tensor& cols, at::Tensor& value, at::Tensor& jac, \
              at::Tensor& hess);                                                               \
  void gram(Mode mode, at::Tensor& g, const at::Tensor& s1, const at::Tensor& s2,               \
            const at::Tensor& t, at::Tensor& packed);                                          \
  void unpack_packed(int64_t d, const at::Tensor& packed, at::Tensor& hess);                   \
  void product(Mode mode, int64_t d, const at::Tensor& p, const at::Tensor& q, at::Tensor& out); \
  void product_adjoint(Mode mode, int64_t d, const at::Tensor& p, const at::Tensor& q,          \
                       const at::Tensor& g, at::Tensor& gp, at::Tensor& gq);                   \
  void stage_adjoint(const StageArgs& a, at::Tensor& g);                                       \
  void pack_adjoint(Mode mode, int64_t d, const at::Tensor& value, const at::Tensor& jac,      \
                    const at::Tensor& hess, at::Tensor& g);                                    \
  inline const Kernels& kernels() {                                                            \
    static const Kernels k{&stage_forward, &stage_adjoint, &unpack,  &pack_adjoint,            \
                           &gram,          &unpack_packed, &product, &product_adjoint,         \
                           HESSMLP_MM,     HESSMLP_ROWS_PER_BLOCK};                                            \
    return k;                                                                                  \
  }

}  // namespace hessmlp
