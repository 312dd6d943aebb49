// The schemas of every hessmlp op, and nothing else. Kernels register
// themselves per backend in csrc/cpu/*.cpp and csrc/cuda/*.cu (and, in the test-only
// emulated build, the same schemas define the library hessmlp_emulated: csrc/library.h).
#include "library.h"

#include <Python.h>
#include <torch/library.h>

#if !defined(HESSMLP_EMULATE_CUDA)
PyMethodDef* hessmlp_python_methods();  // csrc/fingerprint.cpp

extern "C" {
// `import hessmlp._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          hessmlp_python_methods()};
  return PyModule_Create(&module_def);
}
}
#endif

HESSMLP_TORCH_LIBRARY(HESSMLP_LIBRARY, m) {
  // Value, Jacobian and second-order part of a fully-connected network at x.
  //   x           [B, d]
  //   weights[l]  [n_l, n_{l-1}]          (n_{-1} = d, n_{L-1} = m)
  //   biases[l]   [n_l] or None
  //   stage_sizes [L]    number of elementwise functions after Linear l
  //   act_codes   [sum(stage_sizes)]      see csrc/activations.h
  //   act_params  [2 * sum(stage_sizes)]  two parameters per function
  //   mode        'full' | 'diag' | 'trace' | 'none'
  //   method      'forward' (jets, any mode) | 'reverse' (reverse-Gram, full only)
  //   save_state  keep what mlp_jet_backward needs (forward method only)
  // returns value [B, m], jacobian [B, m, d], hessian [B, m, d, d] | [B, m, d] | [B, m] | [B, m, 0],
  // and the saved state: empty unless save_state and method 'forward', else one entry
  // per Linear l, its output before bias and stage: [B, n_0] for l = 0 (x W_0^T),
  // [B, 1 + d + P, n_l] for l > 0 (value, d first-derivative and P second-order rows;
  // P = d(d+1)/2 | d | 1 | 0 for full | diag | trace | none).
  m.def(
      "mlp_jet(Tensor x, Tensor[] weights, Tensor?[] biases, int[] stage_sizes, "
      "int[] act_codes, float[] act_params, str mode, str method, bool save_state=False) "
      "-> (Tensor, Tensor, Tensor, Tensor[])");

  // The adjoint of mlp_jet (docs/design.md §4): gradients of a loss w.r.t. x, the
  // weights and the biases, given its gradients w.r.t. mlp_jet's value,
  // jacobian and hessian (None = zero). The forward-jet adjoint serves both methods.
  //   state        mlp_jet's saved state, or [] to recompute it
  //   output_mask  which of (x, weights, biases) to compute
  // returns grad_x [B, d], grad_weights[l] like weights[l], grad_biases[l] [n_l];
  // an entry that is not asked for (or a bias that is None) is an empty tensor [0].
  m.def(
      "mlp_jet_backward(Tensor? grad_value, Tensor? grad_jacobian, Tensor? grad_hessian, "
      "Tensor x, Tensor[] weights, Tensor?[] biases, int[] stage_sizes, int[] act_codes, "
      "float[] act_params, str mode, Tensor[] state, bool[3] output_mask) "
      "-> (Tensor, Tensor[], Tensor[])");

  // Value, Jacobian and second-order part of a graph network at x (docs/design.md §9;
  // hessmlp/_graph.py): forward jets node by node.
  //   x        [B, d]
  //   tensors  the weights, biases, affine scales and shifts the nodes refer to
  //   kinds    each node's kind: input (node 0), linear, stage, affine, add, concat,
  //            select, mul
  //   program  per node: width, n_inputs, inputs..., n_refs, refs..., n_extra, extra...
  //            (see csrc/graph.h)
  //   consts   the stages' parameters and the affine nodes' constant scale and shift
  //   mode     'full' | 'diag' | 'trace' | 'none'
  //   seed     the k directions the derivatives are taken along: [k, d] (every sample's) or
  //            [B, k, d] (one set per sample), k >= 1; None: the d unit vectors (k = d)
  // returns value [B, m], jacobian [B, m, k] (J u_i), hessian as mlp_jet's for k inputs
  // (u_i^T H u_j).
  m.def(
      "graph_jet(Tensor x, Tensor[] tensors, str[] kinds, int[] program, float[] consts, str mode, "
      "Tensor? seed=None) -> (Tensor, Tensor, Tensor)");

  // The adjoint of graph_jet (docs/design.md §9): gradients of a loss w.r.t. x, every
  // tensor and the seed, given its gradients w.r.t. graph_jet's value, jacobian and hessian
  // (None = zero); the forward jets are recomputed.
  //   needs  [x, tensors..., seed]: which gradients to compute (the seed's entry only with
  //          a seed)
  // returns grad_x [B, d], grad_tensors[t] like tensors[t], grad_seed like seed; one not
  // asked for is empty [0].
  m.def(
      "graph_jet_backward(Tensor? grad_value, Tensor? grad_jacobian, Tensor? grad_hessian, "
      "Tensor x, Tensor[] tensors, str[] kinds, int[] program, float[] consts, str mode, "
      "Tensor? seed, bool[] needs) -> (Tensor, Tensor[], Tensor)");

  // One stage of elementwise functions and its first three derivatives at z,
  // exactly as the jet kernels evaluate them (for tests of the shared math).
  //   z [*], act_codes [k], act_params [2k]  ->  [4, *]: s, s1, s2, s3
  m.def("stage_derivs(Tensor z, int[] act_codes, float[] act_params) -> Tensor");

  // The CPU's own matrix product (csrc/cpu/gemm.h), for tests and benchmarks: a [M, K] @ b
  // [K, N] (+ c [M, N] when given) with the kernels of one instruction set: 'avx512',
  // 'avx2', 'aten' (at::mm), or '' (the one the ops use). An ISA the CPU lacks is refused.
  m.def("_cpu_mm(Tensor a, Tensor b, Tensor? c, str isa) -> Tensor");

  // The CPU's instruction sets for the products: [the one the ops use, then every one the
  // CPU supports]; like: any CPU tensor.
  m.def("_cpu_isa(Tensor like) -> str[]");

  // The machine's FMA rate, measured: independent chains of fused multiply-adds on the
  // widest vectors of the ops' ISA, in like's dtype, on every thread torch uses, each
  // running `iterations` steps. Returns float64 [seconds, floating-point operations].
  m.def("_fma_peak(Tensor like, int iterations) -> Tensor");
}
