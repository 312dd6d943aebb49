// The schemas of every hessmlp op, and nothing else. Kernels register
// themselves per backend in csrc/cpu/*.cpp and csrc/cuda/*.cu.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import hessmlp._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hessmlp, m) {
  // Value, Jacobian and second-order part of a fully-connected network at x.
  //   x           [B, d]
  //   weights[l]  [n_l, n_{l-1}]          (n_{-1} = d, n_{L-1} = m)
  //   biases[l]   [n_l] or None
  //   stage_sizes [L]    number of elementwise functions after Linear l
  //   act_codes   [sum(stage_sizes)]      see csrc/activations.h
  //   act_params  [2 * sum(stage_sizes)]  two parameters per function
  //   mode        'full' | 'diag' | 'trace' | 'none'
  //   method      'forward' (jets, any mode) | 'reverse' (reverse-Gram, full only)
  // returns value [B, m], jacobian [B, m, d], hessian [B, m, d, d] | [B, m, d] | [B, m] | [B, m, 0]
  m.def(
      "mlp_jet(Tensor x, Tensor[] weights, Tensor?[] biases, int[] stage_sizes, "
      "int[] act_codes, float[] act_params, str mode, str method) -> (Tensor, Tensor, Tensor)");

  // One stage of elementwise functions and its first three derivatives at z,
  // exactly as the jet kernels evaluate them (for tests of the shared math).
  //   z [*], act_codes [k], act_params [2k]  ->  [4, *]: s, s1, s2, s3
  m.def("stage_derivs(Tensor z, int[] act_codes, float[] act_params) -> Tensor");
}
