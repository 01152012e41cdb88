// Small math for the CPU kernels' elementwise loops, written so that the loops vectorize.
// sparseroute.kernels.extension rebuilds the kernels when this file (or any other under csrc/)
// changes.

#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sparseroute {

// The elementwise loops below are compiled twice, for AVX-512 machines (x86-64-v4) and for the
// baseline, and the loader picks one: the build itself stays portable.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSEROUTE_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define SPARSEROUTE_VECTOR_CLONES
#endif

// The helpers below are always inlined: a call left in a loop (GCC's inliner gives up on them
// when a translation unit grows) keeps the loop scalar.
#if defined(__GNUC__)
#define SPARSEROUTE_INLINE inline __attribute__((always_inline))
#else
#define SPARSEROUTE_INLINE inline
#endif

// exp(x) in float as plain arithmetic, so that the loops that call it vectorize: Cody-Waite
// reduction by ln 2 and Cephes' degree-6 polynomial, within 2 ulp of expf for x in [-87, 88].
// Above 88 it returns e^88 (callers only ever divide by 1 + e^x there, where that is already 1
// in float's precision, or 0 from 1 / (1 + e^x)); below -87, where expf leaves the normal floats,
// it returns 0. NaN passes through.
SPARSEROUTE_INLINE float exp_float(float x) {
  float xc = x < -87.0f ? -87.0f : x;  // in range for the 2^n below
  xc = xc > 88.0f ? 88.0f : xc;
  // n = round(x / ln 2): adding and subtracting 1.5 * 2^23 rounds to an integer (to nearest)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  const float e = (p * r * r + r + 1.0f) * two_n;
  return x < -87.0f ? 0.0f : e;
}

// exp in the accumulation type: exp_float for float (also what bfloat16 and half compute in),
// std::exp for double (the gradchecks run in double).
template <typename acc_t>
SPARSEROUTE_INLINE acc_t exp_of(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>)
    return exp_float(x);
  else
    return std::exp(x);
}

// sigmoid(x) = 1 / (1 + e^-x).
template <typename acc_t>
SPARSEROUTE_INLINE acc_t sigmoid_of(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_of<acc_t>(-x));
}

// bfloat16 <-> float as integer arithmetic, with the same bits as c10::BFloat16's conversions
// (round to nearest even; NaN to 0x7FC0), but without their branch and calls, so that loops
// over bfloat16 vectorize (c10's conversions leave the SwiGLU loops scalar).
SPARSEROUTE_INLINE float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

SPARSEROUTE_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t rounded = static_cast<uint16_t>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16);
  return f != f ? UINT16_C(0x7FC0) : rounded;
}

// p[i] in the accumulation type, and v stored as p[i]: for bfloat16 through the integer
// conversions above, else static_cast.
template <typename acc_t, typename scalar_t>
SPARSEROUTE_INLINE acc_t load_as(const scalar_t* p, int64_t i) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>)
    return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
  else
    return static_cast<acc_t>(p[i]);
}

template <typename scalar_t, typename acc_t>
SPARSEROUTE_INLINE void store_as(scalar_t* p, int64_t i, acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>)
    reinterpret_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v);
  else
    p[i] = static_cast<scalar_t>(v);
}

}  // namespace sparseroute
