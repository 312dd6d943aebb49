// CPU building blocks of the forward jet: the fused per-sample jet step
// through one stage of elementwise functions, and the unpacking of the last
// layer's columns into the op's outputs.
#pragma once

#include "../activations.h"
#include "../jet_common.h"

#include <cstdint>

namespace hessmlp {
namespace cpu {

struct Stage {
  const int64_t* codes;   // act codes of this stage
  const double* params;   // 2 per code
  int64_t n_ops;
};

// One sample through one stage (DESIGN.md §2):
//   u = s(z + bias),  U = s1 * T,  V = s2 * Phi(T) + s1 * S
// inputs   z [n], bias [n] or null, Tin [d, n], Sin [P, n] or null (S = 0)
// outputs  out [1 + d + P, n] (u, U, V rows), s1 [n], s2 [n]
template <typename T>
void jet_step_sample(Mode mode, int64_t n, int64_t d, const Stage& st,
                     const T* z, const T* bias, const T* Tin, const T* Sin,
                     T* out, T* s1, T* s2) {
  for (int64_t i = 0; i < n; ++i) {
    const T zi = bias ? z[i] + bias[i] : z[i];
    const Derivs<T> f = stage_eval<T>(st.codes, st.params, st.n_ops, zi);
    out[i] = f.s;
    s1[i] = f.s1;
    s2[i] = f.s2;
  }
  T* U = out + n;
  for (int64_t j = 0; j < d; ++j) {
    const T* t = Tin + j * n;
    T* u = U + j * n;
    for (int64_t i = 0; i < n; ++i) u[i] = s1[i] * t[i];
  }
  T* V = U + d * n;
  switch (mode) {
    case Mode::Full: {
      int64_t p = 0;
      for (int64_t a = 0; a < d; ++a) {
        const T* ta = Tin + a * n;
        for (int64_t b = a; b < d; ++b, ++p) {
          const T* tb = Tin + b * n;
          T* v = V + p * n;
          if (Sin) {
            const T* s = Sin + p * n;
            for (int64_t i = 0; i < n; ++i) v[i] = s2[i] * ta[i] * tb[i] + s1[i] * s[i];
          } else {
            for (int64_t i = 0; i < n; ++i) v[i] = s2[i] * ta[i] * tb[i];
          }
        }
      }
      break;
    }
    case Mode::Diag:
      for (int64_t a = 0; a < d; ++a) {
        const T* ta = Tin + a * n;
        T* v = V + a * n;
        if (Sin) {
          const T* s = Sin + a * n;
          for (int64_t i = 0; i < n; ++i) v[i] = s2[i] * ta[i] * ta[i] + s1[i] * s[i];
        } else {
          for (int64_t i = 0; i < n; ++i) v[i] = s2[i] * ta[i] * ta[i];
        }
      }
      break;
    case Mode::Trace:
      for (int64_t i = 0; i < n; ++i) V[i] = T(0);
      for (int64_t a = 0; a < d; ++a) {
        const T* ta = Tin + a * n;
        for (int64_t i = 0; i < n; ++i) V[i] += ta[i] * ta[i];
      }
      if (Sin) {
        for (int64_t i = 0; i < n; ++i) V[i] = s2[i] * V[i] + s1[i] * Sin[i];
      } else {
        for (int64_t i = 0; i < n; ++i) V[i] = s2[i] * V[i];
      }
      break;
    default:
      break;
  }
}

// Last layer's columns of one sample [1 + d + P, m] -> value [m], jacobian [m, d],
// and (when mode != None and hess is not null) the hessian in the mode's shape.
template <typename T>
void unpack_sample(Mode mode, int64_t m, int64_t d, const T* cols,
                   T* value, T* jac, T* hess) {
  for (int64_t k = 0; k < m; ++k) value[k] = cols[k];
  for (int64_t j = 0; j < d; ++j)
    for (int64_t k = 0; k < m; ++k) jac[k * d + j] = cols[(1 + j) * m + k];
  if (!hess) return;
  const T* V = cols + (1 + d) * m;
  switch (mode) {
    case Mode::Full: {
      int64_t p = 0;
      for (int64_t a = 0; a < d; ++a)
        for (int64_t b = a; b < d; ++b, ++p)
          for (int64_t k = 0; k < m; ++k) {
            hess[(k * d + a) * d + b] = V[p * m + k];
            hess[(k * d + b) * d + a] = V[p * m + k];
          }
      break;
    }
    case Mode::Diag:
      for (int64_t a = 0; a < d; ++a)
        for (int64_t k = 0; k < m; ++k) hess[k * d + a] = V[a * m + k];
      break;
    case Mode::Trace:
      for (int64_t k = 0; k < m; ++k) hess[k] = V[k];
      break;
    default:
      break;
  }
}

}  // namespace cpu
}  // namespace hessmlp
