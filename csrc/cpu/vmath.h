// tanh and the logistic sigmoid on lanes of neurons (a scalar or a Pack), branch
// free, so that the CPU's jet passes compute a stage's transcendental values in
// their own loop instead of in separate ATen passes over arrays (kernels.h,
// DerivSource). CPU only; the GPU calls the device's tanhf/expf per thread.
//
// exp and expm1 by the textbook reduction: x = k ln2 + r with |r| <= ln2 / 2
// (Cody and Waite's split of ln2 into a high part whose products with k are
// exact and a low part), expm1(r) by its Taylor series (8 terms for float,
// 13 for double: the remainder is below 2e-8 and 2e-17 of |r|), and 2^k built
// in the exponent bits. Inputs are clamped to the range where 2^k is a normal
// number; tanh and the sigmoid are exactly 1 (or 0, or within one float of it)
// beyond it. NaN stays NaN.
#pragma once

#include "lanes.h"

#include <bit>
#include <cstdint>
#include <type_traits>

namespace hessmlp {
namespace cpu {

template <typename T>
struct ExpConst;

template <>
struct ExpConst<float> {
  using Bits = uint32_t;
  static constexpr int kTerms = 8, kShift = 23;
  static constexpr float kRound = 12582912.0f + 127.0f;  // 1.5 * 2^23 plus the exponent bias
  static constexpr float kLo = -87.0f, kHi = 88.0f;
  static constexpr float kLog2e = 1.44269504088896340736f;
  static constexpr float kLn2Hi = 0.693359375f;            // 9 significant bits
  static constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln 2 - kLn2Hi
};

template <>
struct ExpConst<double> {
  using Bits = uint64_t;
  static constexpr int kTerms = 13, kShift = 52;
  static constexpr double kRound = 6755399441055744.0 + 1023.0;  // 1.5 * 2^52 plus the bias
  static constexpr double kLo = -708.0, kHi = 709.0;
  static constexpr double kLog2e = 1.44269504088896340736;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01;  // 32 trailing zero bits
  static constexpr double kLn2Lo = 1.90821492927058770002e-10;  // ln 2 - kLn2Hi
};

// v[j - 1] = 1 / j!, j = 1 .. N.
template <typename T, int N>
struct InvFactorials {
  T v[N];
  constexpr InvFactorials() : v() {
    T f = T(1);
    for (int j = 1; j <= N; ++j) {
      f = f / T(j);
      v[j - 1] = f;
    }
  }
};

// exp(x) = p2 * (1 + e) and expm1(x) = p2 * e + (p2 - 1), with p2 = 2^k and e = expm1(r).
template <typename T>
struct ExpParts {
  T p2, e;
};

template <typename T>
inline HM_INLINE ExpParts<T> exp_parts(T x) {
  using C = ExpConst<T>;
  x = x < C::kLo ? C::kLo : x;  // (comparisons with NaN are false: it passes)
  x = x > C::kHi ? C::kHi : x;
  // Adding kRound rounds x log2 e to the integer k in the low bits of t (k + bias).
  const T t = x * C::kLog2e + C::kRound;
  const T k = t - C::kRound;
  const T p2 = std::bit_cast<T>(static_cast<typename C::Bits>(std::bit_cast<typename C::Bits>(t)
                                                              << C::kShift));
  const T r = (x - k * C::kLn2Hi) - k * C::kLn2Lo;
  // expm1(r) = r (1 + r/2! + r^2/3! + ... + r^(n-1)/n!), Horner from the last term.
  constexpr InvFactorials<T, C::kTerms> c{};
  T q = c.v[C::kTerms - 1];
  for (int j = C::kTerms - 2; j >= 0; --j) q = q * r + c.v[j];
  return {p2, r * q};
}

// One element: tanh(|z|) = -e / (2 + e) with e = expm1(-2|z|) for |z| < 0.55 (tanh below
// 1/2: no cancellation), else 1 - 2E / (1 + E) with E = exp(-2|z|) (the correction to 1
// carries its own relative accuracy); the sign of z restored.
template <typename T>
inline HM_INLINE T tanh_elem(T z) {
  const T a = z < T(0) ? -z : z;
  const ExpParts<T> x = exp_parts<T>(T(-2) * a);
  const bool small = a < T(0.55);
  const T e = x.p2 * x.e + (x.p2 - T(1));  // expm1(-2a)
  const T E = x.p2 + x.p2 * x.e;           // exp(-2a)
  const T q = small ? -e / (T(2) + e) : (T(2) * E) / (T(1) + E);
  const T t = small ? q : T(1) - q;
  return z < T(0) ? -t : t;
}

// One element: 1 / (1 + exp(-z)), as e^z / (1 + e^z) for z < 0 (exp of -|z| only). Below
// exp's clamp e^-|z| is 0, so that silu(z) = z sigmoid(z) is -0 there as in PyTorch, not z
// times exp of the clamp.
template <typename T>
inline HM_INLINE T sigmoid_elem(T z) {
  const T nz = z < T(0) ? z : -z;
  const ExpParts<T> x = exp_parts<T>(nz);
  const T e = nz < ExpConst<T>::kLo ? T(0) : x.p2 + x.p2 * x.e;
  const T s = T(1) / (T(1) + e);
  return z < T(0) ? e * s : s;
}

// f on a lane: a scalar, or each neuron of a Pack (a loop the compiler vectorises).
template <typename L, typename F>
inline HM_INLINE L lane_map(const L& z, F&& f) {
  if constexpr (std::is_arithmetic<L>::value) {
    return f(z);
  } else {
    L r;
    for (int k = 0; k < static_cast<int>(sizeof(L::v) / sizeof(L::v[0])); ++k) r.v[k] = f(z.v[k]);
    return r;
  }
}

template <typename L>
inline HM_INLINE L lane_tanh(const L& z) {
  return lane_map(z, [](auto e) HM_INLINE { return tanh_elem(e); });
}

template <typename L>
inline HM_INLINE L lane_sigmoid(const L& z) {
  return lane_map(z, [](auto e) HM_INLINE { return sigmoid_elem(e); });
}

}  // namespace cpu
}  // namespace hessmlp
