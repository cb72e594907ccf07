// 8-lane fp32 vector on AVX2 + FMA + F16C. Include only under `#pragma GCC target("avx2,fma,f16c")`.
#pragma once

#include <immintrin.h>

#include <limits>

#include "../decode_attention.h"
#include "exp.h"

namespace qwen_fused {
namespace {

struct VecAVX2 {
  // Query heads per register-resident slice (two tokens' or two slices' accumulators each).
  static constexpr int kMaxHeads = 6;
  static constexpr int64_t kWidth = 8;
  static constexpr bool kLoadsFloat8 = true;
  // bf16 is read 16 at a time as their even and odd elements (load_pair): see kPairGroup.
  static constexpr bool kPairsBFloat16 = true;
  using reg = __m256;

  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  // bf16 is the upper half of an fp32: widen the 16-bit lanes and shift them up.
  static reg load(const BFloat16Bits* p) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  // 16 bf16, as fp32: even = elements 0, 2, .., 14 and odd = 1, 3, .., 15. Each 32-bit lane holds an
  // (even, odd) pair, and bf16 is the upper half of an fp32: one shift and one mask, no widening shuffle.
  static void load_pair(const BFloat16Bits* p, reg& even, reg& odd) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  static reg load(const HalfBits* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // fp8 E5M2 is the upper byte of a binary16: widen the bytes to 16 bits, shift them up, convert.
  static reg load(const Float8E5M2Bits* p) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(bytes), 8));
  }
  // fp8 E4M3fn: the magnitude bits shifted into a binary16 read as the value / 256 (vec/generic.h says why);
  // S.1111.111 is NaN.
  static reg load(const Float8E4M3Bits* p) {
    const __m128i bytes = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i magnitude = _mm_and_si128(bytes, _mm_set1_epi16(0x7f));
    const __m128i sign = _mm_slli_epi16(_mm_and_si128(bytes, _mm_set1_epi16(0x80)), 8);
    const __m128i half = _mm_or_si128(_mm_slli_epi16(magnitude, 7), sign);
    const __m256 value = _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.f));
    const __m256i nan = _mm256_cvtepi16_epi32(_mm_cmpeq_epi16(magnitude, _mm_set1_epi16(0x7f)));
    return _mm256_blendv_ps(value, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), _mm256_castsi256_ps(nan));
  }
  // 16 fp8 at once (elements 0-7, then 8-15): widened to 16 bits in one register, made binary16 and converted
  // half by half. E5M2 is the upper byte of a binary16.
  static void load_pair(const Float8E5M2Bits* p, reg& low, reg& high) {
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i half = _mm256_slli_epi16(bytes, 8);
    low = _mm256_cvtph_ps(_mm256_castsi256_si128(half));
    high = _mm256_cvtph_ps(_mm256_extracti128_si256(half, 1));
  }
  // E4M3fn S.EEEE.MMM as the binary16 S.0EEEE.MMM0000000, the value / 256 as in load() (the byte shifted to the top
  // and back by one keeps the sign on top, a mask clears its copy); S.1111.111 (NaN) as all ones, a NaN.
  static void load_pair(const Float8E4M3Bits* p, reg& low, reg& high) {
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i shifted = _mm256_srai_epi16(_mm256_slli_epi16(bytes, 8), 1);
    const __m256i magnitude_bits = _mm256_set1_epi16(0x7f);
    const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(bytes, magnitude_bits), magnitude_bits);
    const __m256i half = _mm256_or_si256(_mm256_and_si256(shifted, _mm256_set1_epi16(static_cast<short>(0xbf80))), nan);
    const __m256 unscale = _mm256_set1_ps(256.f);
    low = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(half)), unscale);
    high = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(half, 1)), unscale);
  }
  static void store(float* p, reg a) { _mm256_storeu_ps(p, a); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg floor(reg a) { return _mm256_floor_ps(a); }
  static reg pow2(reg n) {
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  }
  static reg exp(reg a) { return exp_cephes<VecAVX2>(a); }
  static float reduce_add(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[i] = sum of the lanes of a[i], i < n: eight at a time by a horizontal-add tree.
  __attribute__((always_inline)) static void reduce_add_many(const reg* a, int n, float* out) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 ab = _mm256_hadd_ps(a[i], a[i + 1]), cd = _mm256_hadd_ps(a[i + 2], a[i + 3]);
      const __m256 ef = _mm256_hadd_ps(a[i + 4], a[i + 5]), gh = _mm256_hadd_ps(a[i + 6], a[i + 7]);
      const __m256 abcd = _mm256_hadd_ps(ab, cd), efgh = _mm256_hadd_ps(ef, gh);
      const __m256 low = _mm256_permute2f128_ps(abcd, efgh, 0x20), high = _mm256_permute2f128_ps(abcd, efgh, 0x31);
      _mm256_storeu_ps(out + i, _mm256_add_ps(low, high));
    }
    for (; i + 4 <= n; i += 4) {
      const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a[i], a[i + 1]), _mm256_hadd_ps(a[i + 2], a[i + 3]));
      _mm_storeu_ps(out + i, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
    }
    for (; i < n; ++i) out[i] = reduce_add(a[i]);
  }
  static float reduce_max(reg a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

}  // namespace
}  // namespace qwen_fused
