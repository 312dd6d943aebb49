// The per-neuron math of the forward jet and its adjoint (docs/design.md §2, §4),
// shared by the CPU and CUDA kernels: one neuron of one sample at a time, its
// rows reached with a stride, so that a CPU loop and a CUDA thread run the same
// code. Plain C++ (no ATen) so that nvcc and the host compiler both take it.
#pragma once

#include "activations.h"

#include <cstdint>

namespace hessmlp {

// What the second-order part S of the jet holds, for its d directions u_0 .. u_{d-1}: every
// pair u_a^T H u_b, a <= b (full), u_a^T H u_a (diag), their sum (trace), or the pairs with
// the last direction u_a^T H u_{d-1} (cross: with u = [e_0 .. e_{n-1}, v], H v and v^T H v;
// docs/design.md §10).
enum class Mode { None, Full, Diag, Trace, Cross };

// Number of second-order columns per sample: d(d+1)/2, d, 1, d or 0.
HM_HD int64_t n_pairs(Mode mode, int64_t d) {
  switch (mode) {
    case Mode::Full: return d * (d + 1) / 2;
    case Mode::Diag: return d;
    case Mode::Trace: return 1;
    case Mode::Cross: return d;
    default: return 0;
  }
}

// The elementwise functions between two Linear layers, by value (a CUDA kernel
// argument as it is).
constexpr int kMaxStageOps = 8;
struct StageDesc {
  int n_ops = 0;
  int codes[kMaxStageOps] = {};
  double params[2 * kMaxStageOps] = {};
};

template <typename T>
HM_HD Derivs<T> stage_eval(const StageDesc& st, T z) {
  return stage_eval<T>(st.codes, st.params, st.n_ops, z);
}

// Where the input of one stage lives for every sample b, in the layout of the
// saved state: z (before the bias) [n], T rows [d, n] (at layer 0 W_0^T, shared
// by all samples: t_stride = 0) and S rows [P, n] (null at layer 0, where S = 0).
// Every row has n entries, so one neuron's entries are n apart.
template <typename T>
struct StageInput {
  const T* z;
  int64_t z_stride;
  const T* t;
  int64_t t_stride;
  const T* s;  // null when S = 0
  int64_t s_stride;
  const T* bias;  // null without bias

  HM_HD T z_at(int64_t b, int64_t i) const {
    return bias ? z[b * z_stride + i] + bias[i] : z[b * z_stride + i];
  }
  HM_HD const T* t_of(int64_t b) const { return t + b * t_stride; }
  HM_HD const T* s_of(int64_t b) const { return s ? s + b * s_stride : nullptr; }
};

// The functions below are written for a "lane" type T: a scalar (one neuron, as
// every CUDA thread and the CPU's scalar tail use it) or a small pack of
// neurons (csrc/cpu/lanes.h, W neighbouring neurons at once on the CPU). In and
// Out are pointer-like: p[k] reads (or is assigned) the entry k of the lane's
// row, and they are false when null. Every read goes into a local first.

// One neuron through a stage with derivatives f (docs/design.md §2):
//   u = s(z),  U = s1 T,  V = s2 Phi(T) + s1 S
// t: its d first-derivative entries, s: its P second-order entries or null,
// out: its 1 + d + P output entries; all `stride` apart.
template <typename T, typename In, typename Out>
HM_HD void jet_step_neuron(Mode mode, int64_t d, const Derivs<T>& f, In t, In s, int64_t stride,
                           Out out) {
  out[0] = f.s;
  for (int64_t j = 0; j < d; ++j) {
    const T tj = t[j * stride];
    out[(1 + j) * stride] = f.s1 * tj;
  }
  const int64_t v0 = (1 + d) * stride;
  switch (mode) {
    case Mode::Full: {
      int64_t p = 0;
      for (int64_t a = 0; a < d; ++a) {
        const T ta = t[a * stride];
        const T sta = f.s2 * ta;
        for (int64_t b = a; b < d; ++b, ++p) {
          const T tb = t[b * stride];
          T v = sta * tb;
          if (s) {
            const T sp = s[p * stride];
            v = v + f.s1 * sp;
          }
          out[v0 + p * stride] = v;
        }
      }
      break;
    }
    case Mode::Diag:
      for (int64_t a = 0; a < d; ++a) {
        const T ta = t[a * stride];
        T v = f.s2 * ta * ta;
        if (s) {
          const T sa = s[a * stride];
          v = v + f.s1 * sa;
        }
        out[v0 + a * stride] = v;
      }
      break;
    case Mode::Trace: {
      T acc = T(0);
      for (int64_t a = 0; a < d; ++a) {
        const T ta = t[a * stride];
        acc = acc + ta * ta;
      }
      T v = f.s2 * acc;
      if (s) {
        const T s0 = s[0];
        v = v + f.s1 * s0;
      }
      out[v0] = v;
      break;
    }
    case Mode::Cross: {
      const T tl = t[(d - 1) * stride];
      const T stl = f.s2 * tl;
      for (int64_t a = 0; a < d; ++a) {
        const T ta = t[a * stride];
        T v = stl * ta;
        if (s) {
          const T sa = s[a * stride];
          v = v + f.s1 * sa;
        }
        out[v0 + a * stride] = v;
      }
      break;
    }
    default:
      break;
  }
}

// Adjoint of jet_step_neuron (docs/design.md §4), in place: on entry g holds the
// adjoint of the output (u_bar, U_bar, V_bar), on return the adjoint of the
// input (z_bar, T_bar, S_bar):
//   z_bar = s1 u_bar + s2 <U_bar, T> + <V_bar, s3 Phi(T) + s2 S>
//   T_bar = s1 U_bar + adjoint of Phi applied to s2 V_bar
//   S_bar = s1 V_bar
template <typename T, typename In, typename Out>
HM_HD void jet_adjoint_neuron(Mode mode, int64_t d, const Derivs<T>& f, In t, In s, int64_t stride,
                              Out g) {
  const int64_t u0 = stride, v0 = (1 + d) * stride;
  T acc = T(0);
  for (int64_t j = 0; j < d; ++j) {
    const T ub = g[u0 + j * stride];
    const T tj = t[j * stride];
    acc = acc + ub * tj;
    g[u0 + j * stride] = f.s1 * ub;
  }
  const T g0 = g[0];
  T zb = f.s1 * g0 + f.s2 * acc;
  switch (mode) {
    case Mode::Full: {
      int64_t p = 0;
      for (int64_t a = 0; a < d; ++a) {
        const T ta = t[a * stride];
        for (int64_t b = a; b < d; ++b, ++p) {
          const T tb = t[b * stride];
          const T v = g[v0 + p * stride];
          const T w = f.s2 * v;  // the adjoint of Phi
          T c = f.s3 * ta * tb;
          if (s) {
            const T sp = s[p * stride];
            c = c + f.s2 * sp;
          }
          zb = zb + v * c;
          const T uba = g[u0 + a * stride];
          g[u0 + a * stride] = uba + w * tb;
          const T ubb = g[u0 + b * stride];
          g[u0 + b * stride] = ubb + w * ta;
          g[v0 + p * stride] = f.s1 * v;
        }
      }
      break;
    }
    case Mode::Diag:
      for (int64_t a = 0; a < d; ++a) {
        const T ta = t[a * stride];
        const T v = g[v0 + a * stride];
        T c = f.s3 * ta * ta;
        if (s) {
          const T sa = s[a * stride];
          c = c + f.s2 * sa;
        }
        zb = zb + v * c;
        const T uba = g[u0 + a * stride];
        g[u0 + a * stride] = uba + T(2) * f.s2 * v * ta;
        g[v0 + a * stride] = f.s1 * v;
      }
      break;
    case Mode::Trace: {
      T phi = T(0);
      for (int64_t a = 0; a < d; ++a) {
        const T ta = t[a * stride];
        phi = phi + ta * ta;
      }
      const T v = g[v0];
      T c = f.s3 * phi;
      if (s) {
        const T s0 = s[0];
        c = c + f.s2 * s0;
      }
      zb = zb + v * c;
      const T w2 = T(2) * f.s2 * v;
      for (int64_t a = 0; a < d; ++a) {
        const T ta = t[a * stride];
        const T uba = g[u0 + a * stride];
        g[u0 + a * stride] = uba + w2 * ta;
      }
      g[v0] = f.s1 * v;
      break;
    }
    case Mode::Cross: {
      // Pair (a, l), l = d - 1: s2 T_a T_l; its adjoint goes to T_a and to T_l (twice for a = l).
      const T tl = t[(d - 1) * stride];
      T to_l = T(0);
      for (int64_t a = 0; a < d; ++a) {
        const T ta = t[a * stride];
        const T v = g[v0 + a * stride];
        const T w = f.s2 * v;
        T c = f.s3 * ta * tl;
        if (s) {
          const T sa = s[a * stride];
          c = c + f.s2 * sa;
        }
        zb = zb + v * c;
        const T uba = g[u0 + a * stride];
        g[u0 + a * stride] = uba + w * tl;
        to_l = to_l + w * ta;
        g[v0 + a * stride] = f.s1 * v;
      }
      const T ubl = g[u0 + (d - 1) * stride];
      g[u0 + (d - 1) * stride] = ubl + to_l;
      break;
    }
    default:
      break;
  }
  g[0] = zb;
}

// One feature of a product node w = p * q (docs/design.md §9): p, q and out hold the
// 1 + d + P entries of the two inputs' and the output's jets, `stride` apart:
//   v = v_p v_q,  T = v_q T_p + v_p T_q,  S = v_q S_p + v_p S_q + Psi(T_p, T_q)
// with Psi the pair (a, c) term T_p,a T_q,c + T_p,c T_q,a (full), 2 T_p,a T_q,a (diag),
// 2 <T_p, T_q> (trace).
template <typename T, typename In, typename Out>
HM_HD void jet_product_neuron(Mode mode, int64_t d, In p, In q, int64_t stride, Out out) {
  const T vp = p[0], vq = q[0];
  out[0] = vp * vq;
  for (int64_t j = 0; j < d; ++j) {
    const T pj = p[(1 + j) * stride], qj = q[(1 + j) * stride];
    out[(1 + j) * stride] = vq * pj + vp * qj;
  }
  const int64_t t0 = stride, v0 = (1 + d) * stride;
  switch (mode) {
    case Mode::Full: {
      int64_t k = 0;
      for (int64_t a = 0; a < d; ++a) {
        const T pa = p[t0 + a * stride], qa = q[t0 + a * stride];
        for (int64_t c = a; c < d; ++c, ++k) {
          const T pc = p[t0 + c * stride], qc = q[t0 + c * stride];
          const T sp = p[v0 + k * stride], sq = q[v0 + k * stride];
          out[v0 + k * stride] = vq * sp + vp * sq + pa * qc + pc * qa;
        }
      }
      break;
    }
    case Mode::Diag:
      for (int64_t a = 0; a < d; ++a) {
        const T pa = p[t0 + a * stride], qa = q[t0 + a * stride];
        const T sp = p[v0 + a * stride], sq = q[v0 + a * stride];
        out[v0 + a * stride] = vq * sp + vp * sq + T(2) * pa * qa;
      }
      break;
    case Mode::Trace: {
      T acc = T(0);
      for (int64_t a = 0; a < d; ++a) {
        const T pa = p[t0 + a * stride], qa = q[t0 + a * stride];
        acc = acc + pa * qa;
      }
      const T sp = p[v0], sq = q[v0];
      out[v0] = vq * sp + vp * sq + T(2) * acc;
      break;
    }
    case Mode::Cross: {
      const T pl = p[t0 + (d - 1) * stride], ql = q[t0 + (d - 1) * stride];
      for (int64_t a = 0; a < d; ++a) {
        const T pa = p[t0 + a * stride], qa = q[t0 + a * stride];
        const T sp = p[v0 + a * stride], sq = q[v0 + a * stride];
        out[v0 + a * stride] = vq * sp + vp * sq + pa * ql + pl * qa;
      }
      break;
    }
    default:
      break;
  }
}

// Adjoint of jet_product_neuron: g holds the adjoint of the output's jet; the adjoints
// of the inputs' jets are added to gp and gq (which may be the same place: w = h * h).
template <typename T, typename In, typename Out>
HM_HD void jet_product_adjoint_neuron(Mode mode, int64_t d, In p, In q, In g, int64_t stride, Out gp,
                                      Out gq) {
  const T vp = p[0], vq = q[0], gv = g[0];
  T gvp = vq * gv, gvq = vp * gv;
  const int64_t t0 = stride, v0 = (1 + d) * stride;
  for (int64_t j = 0; j < d; ++j) {
    const T gt = g[t0 + j * stride];
    const T pj = p[t0 + j * stride], qj = q[t0 + j * stride];
    gvp = gvp + gt * qj;
    gvq = gvq + gt * pj;
    const T a0 = gp[t0 + j * stride];
    gp[t0 + j * stride] = a0 + vq * gt;
    const T b0 = gq[t0 + j * stride];
    gq[t0 + j * stride] = b0 + vp * gt;
  }
  // The second-order rows: their S parts, and Psi's adjoint on the first-order rows.
  const int64_t P = n_pairs(mode, d);
  for (int64_t k = 0; k < P; ++k) {
    const T gs = g[v0 + k * stride];
    const T sp = p[v0 + k * stride], sq = q[v0 + k * stride];
    gvp = gvp + gs * sq;
    gvq = gvq + gs * sp;
    const T a0 = gp[v0 + k * stride];
    gp[v0 + k * stride] = a0 + vq * gs;
    const T b0 = gq[v0 + k * stride];
    gq[v0 + k * stride] = b0 + vp * gs;
  }
  // The pair (a, c) term T_p,a T_q,c + T_p,c T_q,a with adjoint gs: d/dT_p,a = gs T_q,c,
  // d/dT_p,c = gs T_q,a; likewise for q.
  auto pair_adjoint = [&](int64_t a, int64_t c, T gs) {
    const T pa = p[t0 + a * stride], qa = q[t0 + a * stride];
    const T pc = p[t0 + c * stride], qc = q[t0 + c * stride];
    T u = gp[t0 + a * stride];
    gp[t0 + a * stride] = u + gs * qc;
    u = gp[t0 + c * stride];
    gp[t0 + c * stride] = u + gs * qa;
    u = gq[t0 + c * stride];
    gq[t0 + c * stride] = u + gs * pa;
    u = gq[t0 + a * stride];
    gq[t0 + a * stride] = u + gs * pc;
  };
  switch (mode) {
    case Mode::Full: {
      int64_t k = 0;
      for (int64_t a = 0; a < d; ++a) {
        for (int64_t c = a; c < d; ++c, ++k) pair_adjoint(a, c, g[v0 + k * stride]);
      }
      break;
    }
    case Mode::Diag:
    case Mode::Trace:
      for (int64_t a = 0; a < d; ++a) {
        const T gs = g[v0 + (mode == Mode::Diag ? a : 0) * stride];
        const T pa = p[t0 + a * stride], qa = q[t0 + a * stride];
        T u = gp[t0 + a * stride];
        gp[t0 + a * stride] = u + T(2) * gs * qa;
        u = gq[t0 + a * stride];
        gq[t0 + a * stride] = u + T(2) * gs * pa;
      }
      break;
    case Mode::Cross:
      for (int64_t a = 0; a < d; ++a) pair_adjoint(a, d - 1, g[v0 + a * stride]);
      break;
    default:
      break;
  }
  const T a0 = gp[0];
  gp[0] = a0 + gvp;
  const T b0 = gq[0];
  gq[0] = b0 + gvq;
}

// The last layer's columns of one sample and one output k, `stride` (= m)
// apart, into value, jacobian [d] and the hessian in the mode's shape for that
// k ([d, d] | [d] | [1]; null for mode none).
template <typename T>
HM_HD void unpack_output(Mode mode, int64_t d, const T* col, int64_t stride, T* value, T* jac,
                         T* hess) {
  *value = col[0];
  for (int64_t j = 0; j < d; ++j) jac[j] = col[(1 + j) * stride];
  if (!hess) return;
  const T* V = col + (1 + d) * stride;
  switch (mode) {
    case Mode::Full: {
      int64_t p = 0;
      for (int64_t a = 0; a < d; ++a)
        for (int64_t b = a; b < d; ++b, ++p) hess[a * d + b] = hess[b * d + a] = V[p * stride];
      break;
    }
    case Mode::Diag:
    case Mode::Cross:
      for (int64_t a = 0; a < d; ++a) hess[a] = V[a * stride];
      break;
    case Mode::Trace:
      hess[0] = V[0];
      break;
    default:
      break;
  }
}

// Adjoint of unpack_output: gradients of one sample's and one output's value,
// jacobian and hessian (any null for zero) into the adjoint of its column. A
// full Hessian's pair (a, b), a < b, stands for both H[a, b] and H[b, a].
template <typename T>
HM_HD void pack_output_adjoint(Mode mode, int64_t d, const T* value, const T* jac, const T* hess,
                               T* col, int64_t stride) {
  col[0] = value ? *value : T(0);
  for (int64_t j = 0; j < d; ++j) col[(1 + j) * stride] = jac ? jac[j] : T(0);
  T* V = col + (1 + d) * stride;
  int64_t p = 0;
  switch (mode) {
    case Mode::Full:
      for (int64_t a = 0; a < d; ++a)
        for (int64_t b = a; b < d; ++b, ++p)
          V[p * stride] = !hess ? T(0) : a == b ? hess[a * d + a] : hess[a * d + b] + hess[b * d + a];
      break;
    case Mode::Diag:
    case Mode::Cross:
      for (int64_t a = 0; a < d; ++a) V[a * stride] = hess ? hess[a] : T(0);
      break;
    case Mode::Trace:
      V[0] = hess ? hess[0] : T(0);
      break;
    default:
      break;
  }
}

// Packed pair p of a full Hessian -> (a, b), a <= b, row by row.
HM_HD void pair_of(int64_t d, int64_t p, int64_t* a, int64_t* b) {
  int64_t row = 0;
  while (p >= d - row) {
    p -= d - row;
    ++row;
  }
  *a = row;
  *b = row + p;
}

// Reverse-Gram (docs/design.md §3) in a Hessian mode: output entry q of an output k sums
// w_i T[a, i] T[c, i] over the neurons i and over the row pairs (a, c) of the terms
// j < gram_terms(mode, d) given by gram_term: full, the pair q of the upper triangle;
// diag, (q, q); trace (q = 0), (j, j) for every row j.
HM_HD int64_t gram_terms(Mode mode, int64_t d) { return mode == Mode::Trace ? d : 1; }

HM_HD void gram_term(Mode mode, int64_t d, int64_t q, int64_t j, int64_t* a, int64_t* c) {
  if (mode == Mode::Full) {
    pair_of(d, q, a, c);
  } else {
    *a = *c = mode == Mode::Trace ? j : q;
  }
}

}  // namespace hessmlp
