// Host stand-in for CUDA's cuda_fp16.h under the CPU emulation (PYATTN_CUDA_EMULATION): the
// 16-bit float storage type and the exact round-to-nearest-even conversions the kernels use.
// No __half arithmetic: the kernels only convert, and computing in float is what they do.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __half {
  uint16_t __x;
};

struct alignas(4) __half2 {
  __half x, y;
};

namespace pyattn_emu {

inline uint32_t float_bits(float f) { return __float_as_uint(f); }
inline float bits_float(uint32_t u) { return __uint_as_float(u); }

// IEEE binary32 -> binary16, round to nearest even (overflow to inf, NaN stays NaN).
inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7fffu : 0x7c00u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {
    // Below 2^-14: a multiple of 2^-24 (subnormal; 1024 * 2^-24 is the smallest normal).
    // Scaling by 2^24 is exact and rintf rounds half to even in the default rounding mode.
    const float q = rintf(bits_float(ax) * 16777216.0f);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(q));
  }
  uint32_t h = ((((ax >> 23) - 127 + 15) << 10) | ((ax & 0x7fffffu) >> 13));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
  return static_cast<uint16_t>(sign | h);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);  // exact
    return sign ? -v : v;
  }
  return bits_float(sign | ((e - 15 + 127) << 23) | (m << 13));
}

}  // namespace pyattn_emu

inline __half __float2half_rn(float f) { return __half{pyattn_emu::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return pyattn_emu::half_bits_to_float(h.__x); }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
