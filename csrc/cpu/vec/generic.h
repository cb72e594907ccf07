// Portable 8-lane fp32 "vector" in plain C++: the baseline kernel for CPUs without AVX2, and the
// path tests force to check the wider ones against. -O3 turns the lane loops into SSE.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../decode_attention.h"

namespace qwen_fused {
namespace {

inline float bits_to_float(uint32_t bits) {
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// IEEE binary16 -> binary32, exact (normal, subnormal, inf and NaN inputs).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// OCP fp8 E5M2 is the upper byte of an IEEE binary16.
inline float float8_e5m2_to_float(uint8_t bits) { return half_to_float(static_cast<uint16_t>(bits << 8)); }

// OCP fp8 E4M3 "fn" (no infinities; S.1111.111 is NaN). Its magnitude bits, shifted into a binary16's exponent
// and mantissa fields, read as the value times 2^-8 (exponent biases 7 and 15), subnormals included.
inline float float8_e4m3_to_float(uint8_t bits) {
  if ((bits & 0x7fu) == 0x7fu) return std::numeric_limits<float>::quiet_NaN();
  const float magnitude = half_to_float(static_cast<uint16_t>((bits & 0x7fu) << 7)) * 256.f;
  return (bits & 0x80u) ? -magnitude : magnitude;
}

struct VecGeneric {
  // Query heads per register-resident slice (two tokens' or two slices' accumulators each).
  static constexpr int kMaxHeads = 6;
  static constexpr int64_t kWidth = 8;
  static constexpr bool kLoadsFloat8 = true;
  static constexpr bool kPairsBFloat16 = false;
  struct reg {
    float lane[kWidth];
  };

  static reg zero() { return set1(0.f); }
  static reg set1(float x) {
    reg r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = x;
    return r;
  }
  static reg load(const float* p) {
    reg r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = p[i];
    return r;
  }
  static reg load(const BFloat16Bits* p) {
    reg r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = bits_to_float(static_cast<uint32_t>(p[i].bits) << 16);
    return r;
  }
  static reg load(const HalfBits* p) {
    reg r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = half_to_float(p[i].bits);
    return r;
  }
  static reg load(const Float8E4M3Bits* p) {
    reg r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = float8_e4m3_to_float(p[i].bits);
    return r;
  }
  static reg load(const Float8E5M2Bits* p) {
    reg r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = float8_e5m2_to_float(p[i].bits);
    return r;
  }
  static void store(float* p, reg a) {
    for (int i = 0; i < kWidth; ++i) p[i] = a.lane[i];
  }
  static reg add(reg a, reg b) {
    for (int i = 0; i < kWidth; ++i) a.lane[i] += b.lane[i];
    return a;
  }
  static reg sub(reg a, reg b) {
    for (int i = 0; i < kWidth; ++i) a.lane[i] -= b.lane[i];
    return a;
  }
  static reg mul(reg a, reg b) {
    for (int i = 0; i < kWidth; ++i) a.lane[i] *= b.lane[i];
    return a;
  }
  static reg max(reg a, reg b) {
    for (int i = 0; i < kWidth; ++i) a.lane[i] = a.lane[i] > b.lane[i] ? a.lane[i] : b.lane[i];
    return a;
  }
  static reg fmadd(reg a, reg b, reg c) {
    for (int i = 0; i < kWidth; ++i) c.lane[i] += a.lane[i] * b.lane[i];
    return c;
  }
  static reg exp(reg a) {
    for (int i = 0; i < kWidth; ++i) a.lane[i] = std::exp(a.lane[i]);
    return a;
  }
  static float reduce_add(reg a) {
    float sum = 0.f;
    for (int i = 0; i < kWidth; ++i) sum += a.lane[i];
    return sum;
  }
  static void reduce_add_many(const reg* a, int n, float* out) {
    for (int i = 0; i < n; ++i) out[i] = reduce_add(a[i]);
  }
  static float reduce_max(reg a) {
    float m = a.lane[0];
    for (int i = 1; i < kWidth; ++i) m = a.lane[i] > m ? a.lane[i] : m;
    return m;
  }
};

}  // namespace
}  // namespace qwen_fused
