// Flash-decoding attention of one work item (row, kv head, KV chunk), written once over a vector
// type V and instantiated per instruction set by kernel_*.cpp. Everything sits in an anonymous
// namespace so that each ISA's copy stays private to its own object file.
//
// Per token tile of kTokenTile tokens, for the G query heads that share one kv head:
//   s[g, j] = q_g . k_j                      (q already carries the softmax scale)
//   m' = max(m, max_j s[g, j]);  alpha = exp(m - m');  p[g, j] = exp(s[g, j] - m')
//   l  = alpha * l + sum_j p[g, j];  acc_g = alpha * acc_g + sum_j p[g, j] * v_j
// Each K and V row is loaded once per tile and used by all G heads. The chunk's (m, l, acc) are
// merged with the other chunks of the row afterwards (fa_fused_cpu.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "decode_attention.h"

namespace qwen_fused {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kPrefetchTilesAhead = 2;
constexpr int64_t kCacheLine = 64;

// scores[g * tile] = q_g . k_row for NG consecutive query heads.
template <class V, class T, int NG>
inline void score_heads(const float* q, int64_t head_dim, const T* k_row, float* scores) {
  typename V::reg acc[NG];
  for (int g = 0; g < NG; ++g) acc[g] = V::zero();
  for (int64_t d = 0; d < head_dim; d += V::kWidth) {
    const auto k = V::load(k_row + d);
    for (int g = 0; g < NG; ++g) acc[g] = V::fmadd(V::load(q + g * head_dim + d), k, acc[g]);
  }
  for (int g = 0; g < NG; ++g) scores[g * kTokenTile] = V::reduce_add(acc[g]);
}

// acc_g = alpha_g * acc_g + sum_j probs[g, j] * v_j for NG heads; acc stays in registers per
// vector-wide slice of head_dim.
template <class V, class T, int NG>
inline void accumulate_values(float* acc, int64_t head_dim, const float* alpha, const float* probs,
                              const T* const* v_rows, int64_t num_tokens) {
  for (int64_t d = 0; d < head_dim; d += V::kWidth) {
    typename V::reg out[NG];
    for (int g = 0; g < NG; ++g) out[g] = V::mul(V::load(acc + g * head_dim + d), V::set1(alpha[g]));
    for (int64_t j = 0; j < num_tokens; ++j) {
      const auto v = V::load(v_rows[j] + d);
      for (int g = 0; g < NG; ++g) out[g] = V::fmadd(V::set1(probs[g * kTokenTile + j]), v, out[g]);
    }
    for (int g = 0; g < NG; ++g) V::store(acc + g * head_dim + d, out[g]);
  }
}

// Runs body.template operator()<NG>(first_head) over the group in slices of at most 8 heads, the
// most that keep their accumulators in registers.
template <class Body>
inline void for_head_slices(int64_t group, Body&& body) {
  for (int64_t g0 = 0; g0 < group; g0 += 8) {
    switch (group - g0 < 8 ? group - g0 : 8) {
      case 1: body.template operator()<1>(g0); break;
      case 2: body.template operator()<2>(g0); break;
      case 3: body.template operator()<3>(g0); break;
      case 4: body.template operator()<4>(g0); break;
      case 5: body.template operator()<5>(g0); break;
      case 6: body.template operator()<6>(g0); break;
      case 7: body.template operator()<7>(g0); break;
      default: body.template operator()<8>(g0); break;
    }
  }
}

// max over the tile, then p = exp(s - m') in place; returns sum(p). Scores past the valid
// tokens are -inf and contribute 0.
template <class V>
inline float max_of_tile(const float* scores) {
  auto m = V::load(scores);
  for (int64_t j = V::kWidth; j < kTokenTile; j += V::kWidth) m = V::max(m, V::load(scores + j));
  return V::reduce_max(m);
}

template <class V>
inline float exp_and_sum(float* scores, float row_max) {
  const auto shift = V::set1(row_max);
  auto sum = V::zero();
  for (int64_t j = 0; j < kTokenTile; j += V::kWidth) {
    const auto p = V::exp(V::sub(V::load(scores + j), shift));
    V::store(scores + j, p);
    sum = V::add(sum, p);
  }
  return V::reduce_add(sum);
}

template <class V, class T>
void attend_item(const AttentionProblem& p, int64_t item, float* scratch) {
  const int64_t group = p.group();
  const int64_t head_dim = p.head_dim;
  const int64_t chunk = item % p.num_chunks;
  const int64_t kv_head = (item / p.num_chunks) % p.num_kv_heads;
  const int64_t row = item / (p.num_chunks * p.num_kv_heads);

  float* running_max = p.partial_max + item * group;
  float* running_sum = p.partial_sum + item * group;
  float* acc = p.partial_out + item * group * head_dim;
  for (int64_t g = 0; g < group; ++g) {
    running_max[g] = kNegInf;
    running_sum[g] = 0.f;
  }
  for (int64_t i = 0; i < group * head_dim; ++i) acc[i] = 0.f;

  const int64_t seq_len = p.seq_lens[row];
  const int64_t begin = chunk * p.chunk_len;
  const int64_t end = begin + p.chunk_len < seq_len ? begin + p.chunk_len : seq_len;
  if (begin >= end) return;

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int32_t* blocks = p.block_table + row * p.max_blocks;
  const int64_t token_stride = p.num_kv_heads * head_dim;
  auto row_offset = [&](int64_t token) {
    const int64_t block = blocks[token / p.block_size];
    return (block * p.block_size + token % p.block_size) * token_stride + kv_head * head_dim;
  };
  const int64_t row_bytes = head_dim * static_cast<int64_t>(sizeof(T));

  const float* q = p.q + (row * p.num_heads + kv_head * group) * head_dim;
  float* scores = scratch;  // [group, kTokenTile]
  float* alpha = scratch + group * kTokenTile;  // [group]
  const T* k_rows[kTokenTile];
  const T* v_rows[kTokenTile];

  for (int64_t tile = begin; tile < end; tile += kTokenTile) {
    const int64_t num_tokens = end - tile < kTokenTile ? end - tile : kTokenTile;
    for (int64_t j = 0; j < num_tokens; ++j) {
      const int64_t offset = row_offset(tile + j);
      k_rows[j] = k_cache + offset;
      v_rows[j] = v_cache + offset;
    }
    // Pages are scattered, so the hardware prefetcher cannot follow a row's blocks: ask for the
    // K/V rows a few tiles ahead ourselves.
    const int64_t ahead = tile + kPrefetchTilesAhead * kTokenTile;
    const int64_t ahead_end = ahead + kTokenTile < end ? ahead + kTokenTile : end;
    for (int64_t token = ahead; token < ahead_end; ++token) {
      const int64_t offset = row_offset(token);
      const char* k_line = reinterpret_cast<const char*>(k_cache + offset);
      const char* v_line = reinterpret_cast<const char*>(v_cache + offset);
      for (int64_t byte = 0; byte < row_bytes; byte += kCacheLine) {
        __builtin_prefetch(k_line + byte);
        __builtin_prefetch(v_line + byte);
      }
    }

    for_head_slices(group, [&]<int NG>(int64_t g0) {
      for (int64_t j = 0; j < num_tokens; ++j)
        score_heads<V, T, NG>(q + g0 * head_dim, head_dim, k_rows[j], scores + g0 * kTokenTile + j);
    });
    for (int64_t g = 0; g < group; ++g) {
      float* tile_scores = scores + g * kTokenTile;
      for (int64_t j = num_tokens; j < kTokenTile; ++j) tile_scores[j] = kNegInf;
      const float tile_max = max_of_tile<V>(tile_scores);
      const float new_max = tile_max > running_max[g] ? tile_max : running_max[g];
      alpha[g] = running_max[g] == kNegInf ? 0.f : std::exp(running_max[g] - new_max);
      running_max[g] = new_max;
      running_sum[g] = running_sum[g] * alpha[g] + exp_and_sum<V>(tile_scores, new_max);
    }
    for_head_slices(group, [&]<int NG>(int64_t g0) {
      accumulate_values<V, T, NG>(acc + g0 * head_dim, head_dim, alpha + g0, scores + g0 * kTokenTile,
                                  v_rows, num_tokens);
    });
  }
}

template <class V>
void attend_items(const AttentionProblem& p, int64_t begin, int64_t end, float* scratch) {
  for (int64_t item = begin; item < end; ++item) {
    switch (p.cache_dtype) {
      case CacheDtype::kFloat: attend_item<V, float>(p, item, scratch); break;
      case CacheDtype::kBFloat16: attend_item<V, BFloat16Bits>(p, item, scratch); break;
      case CacheDtype::kHalf: attend_item<V, HalfBits>(p, item, scratch); break;
    }
  }
}

}  // namespace
}  // namespace qwen_fused
