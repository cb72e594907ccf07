// 16-lane fp32 vector on AVX-512 F/BW/VL (+F16C). Include only under a matching
// `#pragma GCC target`.
#pragma once

#include <immintrin.h>

#include "../decode_attention.h"
#include "exp.h"

namespace qwen_fused {
namespace {

struct VecAVX512 {
  // Query heads per register-resident slice (two tokens' or two slices' accumulators each).
  static constexpr int kMaxHeads = 8;
  static constexpr int64_t kWidth = 16;
  // No fp8 loads yet (this session's machines could not run them): fp8 caches take the AVX2 kernel.
  static constexpr bool kLoadsFloat8 = false;
  static constexpr bool kPairsBFloat16 = false;
  using reg = __m512;

  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  // bf16 is the upper half of an fp32: widen the 16-bit lanes and shift them up.
  static reg load(const BFloat16Bits* p) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  static reg load(const HalfBits* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(float* p, reg a) { _mm512_storeu_ps(p, a); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg floor(reg a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static reg pow2(reg n) {
    const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  }
  static reg exp(reg a) { return exp_cephes<VecAVX512>(a); }
  static float reduce_add(reg a) { return _mm512_reduce_add_ps(a); }
  __attribute__((always_inline)) static void reduce_add_many(const reg* a, int n, float* out) {
    for (int i = 0; i < n; ++i) out[i] = reduce_add(a[i]);
  }
  static float reduce_max(reg a) { return _mm512_reduce_max_ps(a); }
};

}  // namespace
}  // namespace qwen_fused
