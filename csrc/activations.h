// Per-element math shared by the CPU and CUDA kernels: each elementwise
// function of the chain with its first three derivatives, and the chain rule
// that composes several of them into one "stage" between two Linear layers.
//
// The codes below are the contract with hessmlp/_spec.py (ACT_CODES); every
// function takes two parameters p0, p1 (unused ones are 0).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HM_HD __host__ __device__ __forceinline__
#else
#define HM_HD inline __attribute__((always_inline))
#endif

#if defined(__CUDA_ARCH__)
#define HM_MATH(fn) ::fn
#else
#define HM_MATH(fn) std::fn
#endif

namespace hessmlp {

enum ActCode : int {
  ACT_IDENTITY = 0,
  ACT_AFFINE = 1,      // a*z + c            (p0 = a, p1 = c)
  ACT_TANH = 2,
  ACT_SIGMOID = 3,
  ACT_SOFTPLUS = 4,    // PyTorch Softplus   (p0 = beta, p1 = threshold)
  ACT_SILU = 5,
  ACT_GELU = 6,        // exact, erf based
  ACT_GELU_TANH = 7,   // approximate='tanh'
  ACT_RELU = 8,
  ACT_LEAKY_RELU = 9,  // p0 = negative_slope
  ACT_ELU = 10,        // p0 = alpha
  ACT_SIN = 11,        // sin(w0*z)          (p0 = w0)
  ACT_SQUARE = 12,     // z*z
  ACT_NUM_CODES = 13
};

// Value and derivatives of a scalar function at one point.
template <typename T>
struct Derivs {
  T s, s1, s2, s3;
};

template <typename T>
HM_HD T hm_sigmoid(T z) {
  // Stable on both sides: never exp of a large positive number.
  if (z >= T(0)) {
    return T(1) / (T(1) + HM_MATH(exp)(-z));
  }
  T e = HM_MATH(exp)(z);
  return e / (T(1) + e);
}

// The transcendental values a function needs at z (unused ones are 0). The GPU
// computes them per thread here. The CPU's jet passes compute those of tanh and the
// sigmoid family lane by lane (csrc/cpu/vmath.h, kernels.h), and the others for a
// whole layer with vectorised ATen ops (csrc/cpu/mlp_jet.cpp, prims_of); act_from_prims
// does the rest.
//   tanh: a = tanh z                  sigmoid, silu: a = sigmoid z
//   softplus: a = sigmoid(beta z), b = softplus z      gelu: a = erf(z/sqrt 2), b = exp(-z^2/2)
//   gelu_tanh: a = tanh(k0 (z + k1 z^3))
//   elu: a = expm1(min(z, 0)), b = exp(min(z, 0))   sin: a = sin(w0 z), b = cos(w0 z)
template <typename T>
struct Prims {
  T a, b;
};

constexpr double kGeluK0 = 0.79788456080286535587989211986876373695171726232986;  // sqrt(2/pi)
constexpr double kGeluK1 = 0.044715;
constexpr double kInvSqrt2 = 0.70710678118654752440084436210484903928483593768847;
constexpr double kInvSqrt2Pi = 0.39894228040143267793994605993438186847585863116493;

// The argument of tanh in the tanh approximation of GELU: k0 (z + k1 z^3).
template <typename T>
HM_HD T gelu_tanh_arg(T z) {
  return T(kGeluK0) * (z + T(kGeluK1) * z * z * z);
}

template <typename T>
HM_HD Prims<T> act_prims(int code, T p0, T p1, T z) {
  Prims<T> r{T(0), T(0)};
  switch (code) {
    case ACT_TANH: r.a = HM_MATH(tanh)(z); break;
    case ACT_SIGMOID:
    case ACT_SILU: r.a = hm_sigmoid(z); break;
    case ACT_SOFTPLUS: {
      // PyTorch: z*beta > threshold ? z : log1p(exp(z*beta)) / beta
      const T bz = z * p0;
      r.a = hm_sigmoid(bz);
      r.b = bz > p1 ? z : HM_MATH(log1p)(HM_MATH(exp)(bz)) / p0;
      break;
    }
    case ACT_GELU:
      r.a = HM_MATH(erf)(z * T(kInvSqrt2));
      r.b = HM_MATH(exp)(T(-0.5) * z * z);
      break;
    case ACT_GELU_TANH: r.a = HM_MATH(tanh)(gelu_tanh_arg(z)); break;
    case ACT_ELU: {
      // expm1: alpha (e^z - 1) keeps its precision just below 0; NaN (not > 0) stays NaN.
      const T zn = z > T(0) ? T(0) : z;
      r.a = HM_MATH(expm1)(zn);
      r.b = HM_MATH(exp)(zn);
      break;
    }
    case ACT_SIN:
      r.a = HM_MATH(sin)(p0 * z);
      r.b = HM_MATH(cos)(p0 * z);
      break;
    default: break;
  }
  return r;
}

// The functions whose derivatives follow from their prims with arithmetic alone
// (no branch on z), so that a lane may hold several neurons at once.
HM_HD bool is_smooth(int code) {
  return code == ACT_IDENTITY || code == ACT_AFFINE || code == ACT_TANH || code == ACT_SIGMOID ||
         code == ACT_SILU || code == ACT_GELU || code == ACT_GELU_TANH || code == ACT_SIN ||
         code == ACT_SQUARE;
}

template <int Code, typename T>
HM_HD Derivs<T> smooth_from_prims(T p0, T p1, T z, const Prims<T>& pr) {
  Derivs<T> r{z, T(1), T(0), T(0)};
  if constexpr (Code == ACT_AFFINE) {
    r.s = p0 * z + p1;
    r.s1 = p0;
  } else if constexpr (Code == ACT_TANH) {
    const T t = pr.a;
    const T d1 = T(1) - t * t;
    r.s = t;
    r.s1 = d1;
    r.s2 = T(-2) * t * d1;
    r.s3 = T(2) * d1 * (T(3) * t * t - T(1));
  } else if constexpr (Code == ACT_SIGMOID) {
    const T sg = pr.a;
    const T q = sg * (T(1) - sg);
    r.s = sg;
    r.s1 = q;
    r.s2 = q * (T(1) - T(2) * sg);
    r.s3 = q * (T(1) - T(6) * q);
  } else if constexpr (Code == ACT_SILU) {
    const T sg = pr.a;
    const T q = sg * (T(1) - sg);
    const T a = T(1) - T(2) * sg;
    r.s = z * sg;
    r.s1 = sg + z * q;
    r.s2 = q * (T(2) + z * a);
    r.s3 = q * (a * (T(3) + z * a) - T(2) * z * q);
  } else if constexpr (Code == ACT_GELU) {
    const T cdf = T(0.5) * (T(1) + pr.a);
    const T pdf = T(kInvSqrt2Pi) * pr.b;
    r.s = z * cdf;
    r.s1 = cdf + z * pdf;
    r.s2 = pdf * (T(2) - z * z);
    r.s3 = pdf * z * (z * z - T(4));
  } else if constexpr (Code == ACT_GELU_TANH) {
    const T k0 = T(kGeluK0), k1 = T(kGeluK1);
    const T z2 = z * z;
    const T u1 = k0 * (T(1) + T(3) * k1 * z2);  // du/dz
    const T u2 = T(6) * k0 * k1 * z;            // d2u/dz2
    const T u3 = T(6) * k0 * k1;                // d3u/dz3
    const T t = pr.a;
    const T h = T(1) - t * t;
    const T t1 = h * u1;
    const T t2 = h * (u2 - T(2) * t * u1 * u1);
    const T t3 = h * (u3 - T(6) * t * u1 * u2 + (T(4) * t * t - T(2) * h) * u1 * u1 * u1);
    r.s = T(0.5) * z * (T(1) + t);
    r.s1 = T(0.5) * (T(1) + t) + T(0.5) * z * t1;
    r.s2 = t1 + T(0.5) * z * t2;
    r.s3 = T(1.5) * t2 + T(0.5) * z * t3;
  } else if constexpr (Code == ACT_SIN) {
    const T sn = pr.a, cs = pr.b;
    const T w2 = p0 * p0;
    r.s = sn;
    r.s1 = p0 * cs;
    r.s2 = T(0) - w2 * sn;
    r.s3 = T(0) - w2 * p0 * cs;
  } else if constexpr (Code == ACT_SQUARE) {
    r.s = z * z;
    r.s1 = T(2) * z;
    r.s2 = T(2);
  }
  return r;
}

// Value and first three derivatives of one elementwise function at z, from its
// transcendental values (act_prims).
template <typename T>
HM_HD Derivs<T> act_from_prims(int code, T p0, T p1, T z, const Prims<T>& pr) {
  Derivs<T> r{z, T(1), T(0), T(0)};
  switch (code) {
    case ACT_AFFINE: return smooth_from_prims<ACT_AFFINE, T>(p0, p1, z, pr);
    case ACT_TANH: return smooth_from_prims<ACT_TANH, T>(p0, p1, z, pr);
    case ACT_SIGMOID: return smooth_from_prims<ACT_SIGMOID, T>(p0, p1, z, pr);
    case ACT_SILU: return smooth_from_prims<ACT_SILU, T>(p0, p1, z, pr);
    case ACT_GELU: return smooth_from_prims<ACT_GELU, T>(p0, p1, z, pr);
    case ACT_GELU_TANH: return smooth_from_prims<ACT_GELU_TANH, T>(p0, p1, z, pr);
    case ACT_SIN: return smooth_from_prims<ACT_SIN, T>(p0, p1, z, pr);
    case ACT_SQUARE: return smooth_from_prims<ACT_SQUARE, T>(p0, p1, z, pr);
    case ACT_SOFTPLUS: {
      // The second derivative (softplus_double_backward) is nonzero only for
      // z*beta < threshold, so exactly at the threshold s1 is smooth and s2 = s3 = 0.
      const T bz = z * p0;
      r.s = pr.b;
      if (!(bz > p1)) {
        const T sg = pr.a;
        r.s1 = sg;
        if (bz < p1) {
          const T q = sg * (T(1) - sg);
          r.s2 = p0 * q;
          r.s3 = p0 * p0 * q * (T(1) - T(2) * sg);
        }
      }
      break;
    }
    case ACT_RELU:
      // PyTorch's derivative at 0 is 0; NaN stays NaN (as in torch.relu), its derivatives 0.
      if (z > T(0)) {
        r.s = z;
      } else {
        r.s = z != z ? z : T(0);
        r.s1 = T(0);
      }
      break;
    case ACT_LEAKY_RELU:
      if (z > T(0)) {
        r.s = z;
      } else {
        r.s = z * p0;
        r.s1 = p0;
      }
      break;
    case ACT_ELU:
      // PyTorch: the exponential branch for z <= 0 in the value and first
      // derivative, for z < 0 only in the second (elu double backward).
      // The value alpha expm1(z), its derivatives alpha e^z (each to its own precision).
      if (z > T(0)) {
        r.s = z;
      } else {
        const T e = p0 * pr.b;
        r.s = p0 * pr.a;
        r.s1 = e;
        if (z < T(0)) {
          r.s2 = e;
          r.s3 = e;
        }
      }
      break;
    default:  // ACT_IDENTITY
      break;
  }
  return r;
}

// Value and first three derivatives of one elementwise function at z.
template <typename T>
HM_HD Derivs<T> act_eval(int code, T p0, T p1, T z) {
  return act_from_prims<T>(code, p0, p1, z, act_prims<T>(code, p0, p1, z));
}

// f = g(h(z)): given h's derivatives at z and g's derivatives at h(z).
template <typename T>
HM_HD Derivs<T> compose(const Derivs<T>& h, const Derivs<T>& g) {
  T h1sq = h.s1 * h.s1;
  Derivs<T> f;
  f.s = g.s;
  f.s1 = g.s1 * h.s1;
  f.s2 = g.s2 * h1sq + g.s1 * h.s2;
  f.s3 = g.s3 * h1sq * h.s1 + T(3) * g.s2 * h.s1 * h.s2 + g.s1 * h.s3;
  return f;
}

// A whole stage (n_ops elementwise functions applied in order) at one point.
// An empty stage is the identity.
template <typename T, typename CodeT>
HM_HD Derivs<T> stage_eval(const CodeT* codes, const double* params, int64_t n_ops, T z) {
  Derivs<T> f{z, T(1), T(0), T(0)};
  for (int64_t k = 0; k < n_ops; ++k) {
    Derivs<T> g = act_eval<T>(static_cast<int>(codes[k]), T(params[2 * k]), T(params[2 * k + 1]), f.s);
    f = (k == 0) ? g : compose(f, g);
  }
  return f;
}

}  // namespace hessmlp
