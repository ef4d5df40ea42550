// Bit-level conversions between float and the 16-bit float types, shared by the CPU kernels:
// plain integer operations that GCC vectorizes (c10's scalar conversions stop it). Internal to
// moefuse._C: everything lives in an anonymous namespace of each translation unit.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace moefuse {
namespace {

inline float float_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t bits_of(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// float -> bfloat16 bits, rounding to nearest even and NaN -> 0x7FC0, exactly as c10::BFloat16.
inline uint16_t round_to_bf16(float f) {
  const uint32_t bits = bits_of(f);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return (bits & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// Per-dtype conversions: the value as float, the delta rounded to the input dtype with its
// magnitude key (the bit pattern of |delta| in that dtype), and the float -> dtype cast.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static inline float value(float x) { return x; }
  static inline float delta(float x, float b, int32_t* key) {
    const float d = x - b;
    *key = static_cast<int32_t>(bits_of(d) & 0x7FFFFFFFu);
    return d;
  }
  static inline float cast(float v) { return v; }
};

template <>
struct Elem<c10::BFloat16> {
  static inline float value(c10::BFloat16 x) { return float_from_bits(uint32_t(x.x) << 16); }
  static inline float delta(c10::BFloat16 x, c10::BFloat16 b, int32_t* key) {
    const uint16_t d = round_to_bf16(value(x) - value(b));
    *key = d & 0x7FFF;
    return float_from_bits(uint32_t(d) << 16);
  }
  static inline c10::BFloat16 cast(float v) { return c10::BFloat16(round_to_bf16(v), c10::BFloat16::from_bits()); }
};

template <>
struct Elem<c10::Half> {
  static inline float value(c10::Half x) { return static_cast<float>(x); }
  static inline float delta(c10::Half x, c10::Half b, int32_t* key) {
    const c10::Half d(static_cast<float>(x) - static_cast<float>(b));
    *key = d.x & 0x7FFF;
    return static_cast<float>(d);
  }
  static inline c10::Half cast(float v) { return c10::Half(v); }
};

}  // namespace
}  // namespace moefuse

// Dispatch over float32, bfloat16 and float16 only (the dtypes Elem<> knows).
#define MOEFUSE_DISPATCH_FLOAT(TYPE, NAME, ...)                                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)             \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)      \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
