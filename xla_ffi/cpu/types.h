// Storage types of the CPU kernels and their conversions to and from the accumulation type:
// 16-bit floats converted by hand (round to nearest even, NaN kept quiet, subnormals exact).
#ifndef SAPA_JAX_XLA_FFI_CPU_TYPES_H_
#define SAPA_JAX_XLA_FFI_CPU_TYPES_H_

#include <cstdint>
#include <cstring>

namespace sapa::cpu {

struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

inline float float_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float to_acc(BF16 x) { return float_from_bits(uint32_t(x.bits) << 16); }
inline float to_acc(F16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1f) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
  const float magnitude = float(mantissa) * 0x1p-24f;  // subnormal or zero, exact
  return sign ? -magnitude : magnitude;
}

template <typename T> struct From;
template <> struct From<float> { static float of(float a) { return a; } };
template <> struct From<double> { static double of(double a) { return a; } };
template <> struct From<BF16> {
  static BF16 of(float a) {
    uint32_t u = bits_of(a);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);  // carries into the exponent (and to inf) as it should
    return {uint16_t(u >> 16)};
  }
};
template <> struct From<F16> {
  static F16 of(float a) {
    const uint32_t u = bits_of(a);
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    const uint32_t mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return {uint16_t(sign | 0x7e00u | ((mag >> 13) & 0x3ffu))};
    if (mag >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
    if (mag >= 0x38800000u) {  // normal half: round at bit 13, then rebias 127 -> 15
      const uint32_t rounded = mag + 0xfffu + ((mag >> 13) & 1u) - (112u << 23);
      return {uint16_t(sign | (rounded >> 13))};
    }
    // Subnormal half: adding 0.5 leaves an ulp of 2^-24, so the FPU's round-to-nearest-even
    // produces the half mantissa in the low bits.
    const float shifted = float_from_bits(mag) + 0.5f;
    return {uint16_t(sign | (bits_of(shifted) - 0x3f000000u))};
  }
};

// The accumulation type of a storage type: double for double, float for the rest.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using Acc = typename AccOf<T>::type;

}  // namespace sapa::cpu

#endif  // SAPA_JAX_XLA_FFI_CPU_TYPES_H_
