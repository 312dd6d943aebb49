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

// Adjoint of jet_step_sample for one sample (DESIGN.md §4), in place: on entry
// g [1 + d + P, n] holds the adjoint of the step's output (u_bar, U_bar, V_bar),
// on return the adjoint of its input (z_bar, T_bar, S_bar):
//   z_bar = s1 u_bar + s2 <U_bar, T> + <V_bar, s3 Phi(T) + s2 S>
//   T_bar = s1 U_bar + adjoint of Phi applied to s2 V_bar
//   S_bar = s1 V_bar
// inputs z [n] (before the bias), bias [n] or null, Tin [d, n], Sin [P, n] or
// null (S = 0); scratch [4 n].
template <typename T>
void jet_adjoint_sample(Mode mode, int64_t n, int64_t d, const Stage& st, const T* z,
                        const T* bias, const T* Tin, const T* Sin, T* g, T* scratch) {
  T* s1 = scratch;
  T* s2 = scratch + n;
  T* s3 = scratch + 2 * n;
  T* acc = scratch + 3 * n;
  for (int64_t i = 0; i < n; ++i) {
    const T zi = bias ? z[i] + bias[i] : z[i];
    const Derivs<T> f = stage_eval<T>(st.codes, st.params, st.n_ops, zi);
    s1[i] = f.s1;
    s2[i] = f.s2;
    s3[i] = f.s3;
    acc[i] = T(0);
  }
  T* zb = g;
  T* Ub = g + n;
  T* Vb = Ub + d * n;
  for (int64_t j = 0; j < d; ++j) {
    const T* t = Tin + j * n;
    const T* ub = Ub + j * n;
    for (int64_t i = 0; i < n; ++i) acc[i] += ub[i] * t[i];
  }
  for (int64_t i = 0; i < n; ++i) zb[i] = s1[i] * zb[i] + s2[i] * acc[i];
  for (int64_t j = 0; j < d; ++j) {
    T* ub = Ub + j * n;
    for (int64_t i = 0; i < n; ++i) ub[i] *= s1[i];
  }
  switch (mode) {
    case Mode::Full: {
      int64_t p = 0;
      for (int64_t a = 0; a < d; ++a) {
        const T* ta = Tin + a * n;
        T* uba = Ub + a * n;
        for (int64_t b = a; b < d; ++b, ++p) {
          const T* tb = Tin + b * n;
          T* ubb = Ub + b * n;
          T* vb = Vb + p * n;
          const T* s = Sin ? Sin + p * n : nullptr;
          for (int64_t i = 0; i < n; ++i) {
            const T v = vb[i];
            const T w = s2[i] * v;  // adjoint of Phi
            zb[i] += v * (s3[i] * ta[i] * tb[i] + (s ? s2[i] * s[i] : T(0)));
            uba[i] += w * tb[i];
            ubb[i] += w * ta[i];
            vb[i] = s1[i] * v;
          }
        }
      }
      break;
    }
    case Mode::Diag:
      for (int64_t a = 0; a < d; ++a) {
        const T* ta = Tin + a * n;
        T* uba = Ub + a * n;
        T* vb = Vb + a * n;
        const T* s = Sin ? Sin + a * n : nullptr;
        for (int64_t i = 0; i < n; ++i) {
          const T v = vb[i];
          zb[i] += v * (s3[i] * ta[i] * ta[i] + (s ? s2[i] * s[i] : T(0)));
          uba[i] += T(2) * s2[i] * v * ta[i];
          vb[i] = s1[i] * v;
        }
      }
      break;
    case Mode::Trace: {
      // acc <- Phi(T) = |T|^2 per neuron
      for (int64_t i = 0; i < n; ++i) acc[i] = T(0);
      for (int64_t a = 0; a < d; ++a) {
        const T* ta = Tin + a * n;
        for (int64_t i = 0; i < n; ++i) acc[i] += ta[i] * ta[i];
      }
      for (int64_t i = 0; i < n; ++i) {
        zb[i] += Vb[i] * (s3[i] * acc[i] + (Sin ? s2[i] * Sin[i] : T(0)));
      }
      for (int64_t a = 0; a < d; ++a) {
        const T* ta = Tin + a * n;
        T* uba = Ub + a * n;
        for (int64_t i = 0; i < n; ++i) uba[i] += T(2) * s2[i] * Vb[i] * ta[i];
      }
      for (int64_t i = 0; i < n; ++i) Vb[i] *= s1[i];
      break;
    }
    default:
      break;
  }
}

// Adjoint of unpack_sample: the gradients of one sample's value [m], jacobian
// [m, d] and hessian (the mode's shape), any of them null for zero, into the
// adjoint of the last layer's columns [1 + d + P, m]. A full Hessian's pair
// (a, b), a < b, stands for both H[a, b] and H[b, a].
template <typename T>
void pack_adjoint_sample(Mode mode, int64_t m, int64_t d, const T* value, const T* jac,
                         const T* hess, T* cols) {
  for (int64_t k = 0; k < m; ++k) cols[k] = value ? value[k] : T(0);
  for (int64_t j = 0; j < d; ++j)
    for (int64_t k = 0; k < m; ++k) cols[(1 + j) * m + k] = jac ? jac[k * d + j] : T(0);
  T* V = cols + (1 + d) * m;
  const int64_t P = n_pairs(mode, d);
  if (!hess) {
    for (int64_t r = 0; r < P * m; ++r) V[r] = T(0);
    return;
  }
  switch (mode) {
    case Mode::Full: {
      int64_t p = 0;
      for (int64_t a = 0; a < d; ++a)
        for (int64_t b = a; b < d; ++b, ++p)
          for (int64_t k = 0; k < m; ++k) {
            const T* h = hess + k * d * d;
            V[p * m + k] = a == b ? h[a * d + a] : h[a * d + b] + h[b * d + a];
          }
      break;
    }
    case Mode::Diag:
      for (int64_t a = 0; a < d; ++a)
        for (int64_t k = 0; k < m; ++k) V[a * m + k] = hess[k * d + a];
      break;
    case Mode::Trace:
      for (int64_t k = 0; k < m; ++k) V[k] = hess[k];
      break;
    default:
      break;
  }
}

}  // namespace cpu
}  // namespace hessmlp
