// A pack of W neighbouring neurons as one "lane" of the shared per-neuron math
// (csrc/jet_math.h): arithmetic on packs is a fixed-length loop that the
// compiler turns into SIMD instructions, and PackPtr reads and writes W
// contiguous entries of a row. CPU only.
#pragma once

#include <cstdint>
#include <type_traits>

// The row loops are compiled for AVX-512 and AVX2 as well as the baseline, and
// the best one for the running CPU is picked when the library loads.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define HM_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HM_SIMD_CLONES
#endif

// Everything a row loop calls must be inlined into it to be compiled for the clone's
// target: the lambdas and helpers of the loops carry this.
#if defined(__GNUC__)
#define HM_INLINE __attribute__((always_inline))
#else
#define HM_INLINE
#endif

namespace hessmlp {
namespace cpu {

template <typename T, int W>
struct Pack {
  T v[W];

  Pack() = default;
  template <typename U, typename = std::enable_if_t<std::is_arithmetic<U>::value>>
  HM_INLINE Pack(U x) {  // NOLINT: a broadcast constant, as T(2) is for a scalar lane
    for (int k = 0; k < W; ++k) v[k] = static_cast<T>(x);
  }
  HM_INLINE static Pack load(const T* p) {
    Pack r;
    for (int k = 0; k < W; ++k) r.v[k] = p[k];
    return r;
  }
  HM_INLINE void store(T* p) const {
    for (int k = 0; k < W; ++k) p[k] = v[k];
  }
  HM_INLINE friend Pack operator+(const Pack& a, const Pack& b) {
    Pack r;
    for (int k = 0; k < W; ++k) r.v[k] = a.v[k] + b.v[k];
    return r;
  }
  HM_INLINE friend Pack operator-(const Pack& a, const Pack& b) {
    Pack r;
    for (int k = 0; k < W; ++k) r.v[k] = a.v[k] - b.v[k];
    return r;
  }
  HM_INLINE friend Pack operator*(const Pack& a, const Pack& b) {
    Pack r;
    for (int k = 0; k < W; ++k) r.v[k] = a.v[k] * b.v[k];
    return r;
  }
};

// Entry k of a row for W neighbouring neurons: reads convert to a Pack, and a
// Pack can be assigned to it.
template <typename T, int W>
struct PackRef {
  T* p;
  HM_INLINE operator Pack<std::remove_const_t<T>, W>() const {  // NOLINT
    return Pack<std::remove_const_t<T>, W>::load(p);
  }
  HM_INLINE PackRef& operator=(const Pack<std::remove_const_t<T>, W>& x) {
    x.store(p);
    return *this;
  }
};

template <typename T, int W>
struct PackPtr {
  T* p;
  HM_INLINE PackRef<T, W> operator[](int64_t k) const { return {p + k}; }
  explicit operator bool() const { return p != nullptr; }
};

// Lane L's view of the neurons from i on: a pointer for a scalar lane, a PackPtr for a pack.
template <typename L, typename T>
inline HM_INLINE auto lane_ptr(T* p, int64_t i) {
  if constexpr (std::is_arithmetic<L>::value) {
    return p ? p + i : nullptr;
  } else {
    return PackPtr<T, sizeof(L) / sizeof(T)>{p ? p + i : nullptr};
  }
}

template <typename L, typename T>
inline HM_INLINE L lane_load(const T* p, int64_t i) {
  if constexpr (std::is_arithmetic<L>::value) {
    return p[i];
  } else {
    return L::load(p + i);
  }
}

}  // namespace cpu
}  // namespace hessmlp
