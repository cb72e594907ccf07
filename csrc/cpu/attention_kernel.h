// Flash-decoding attention of one work item (row, KV chunk, every kv head in turn), written once
// over a vector type V and instantiated per instruction set by kernel_*.cpp. Everything sits in an anonymous
// namespace so that each ISA's copy stays private to its own object file.
//
// Per token tile of kTokenTile tokens, for the G query heads that share one kv head:
//   s[g, j] = q_g . k_j                      (q already carries the softmax scale)
//   m' = max(m, max_j s[g, j]);  alpha = exp(m - m');  p[g, j] = exp(s[g, j] - m')
//   l' = alpha * l + sum_j p[g, j];  acc_g = alpha * acc_g + sum_j p[g, j] * v_j
// acc is kept times a power of two near 1 / l (sum_scale), so that it never overflows where V is finite.
// Each K and V row is loaded once per tile and used by all G heads. The chunk's (m, l, acc) are
// merged with the other chunks of the row afterwards (fa_fused_cpu.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "decode_attention.h"

namespace qwen_fused {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kPrefetchTilesAhead = 2;
constexpr int64_t kCacheLine = 64;

// The helpers below are small and called per token: inlined, they see head_dim as a constant when
// the caller has one (attend_item is instantiated for the common head dims) and unroll over it.
#define QWEN_INLINE inline __attribute__((always_inline))

// Whether V reads 16 elements of T at once into two vectors (V::load_pair): fewer widening instructions per
// element. The two hold elements 0-7 and 8-15, or, for a bf16 cache on a vector with kPairsBFloat16, the even and
// the odd ones (then q and the outputs are in paired order, kPairGroup).
template <class V, class T>
constexpr bool reads_pairs() {
  constexpr bool pairs = requires(const T* p, typename V::reg& a) { V::load_pair(p, a, a); };
  static_assert(!pairs || 2 * V::kWidth == kPairGroup, "pairs are 16 elements: for 8-lane vectors");
  return pairs;
}

// scores[g * kTokenTile + j] = q_g . k_j for NG consecutive query heads and TOKENS consecutive
// tokens: each q slice loaded serves every token, each k slice every head.
template <class V, class T, int NG, int TOKENS>
QWEN_INLINE void score_heads(const float* q, int64_t head_dim, const T* const* k_rows, float* scores) {
  typename V::reg acc[TOKENS][NG];
  for (int t = 0; t < TOKENS; ++t)
    for (int g = 0; g < NG; ++g) acc[t][g] = V::zero();
  if constexpr (reads_pairs<V, T>()) {
    // head_dim is a multiple of 16 (validated): whole pairs only.
#pragma GCC unroll 8
    for (int64_t d = 0; d < head_dim; d += 2 * V::kWidth) {
      typename V::reg k[TOKENS][2];
      for (int t = 0; t < TOKENS; ++t) V::load_pair(k_rows[t] + d, k[t][0], k[t][1]);
      for (int g = 0; g < NG; ++g) {
        for (int half = 0; half < 2; ++half) {
          const auto q_slice = V::load(q + g * head_dim + d + half * V::kWidth);
          for (int t = 0; t < TOKENS; ++t) acc[t][g] = V::fmadd(q_slice, k[t][half], acc[t][g]);
        }
      }
    }
  } else {
    for (int64_t d = 0; d < head_dim; d += V::kWidth) {
      typename V::reg k[TOKENS];
      for (int t = 0; t < TOKENS; ++t) k[t] = V::load(k_rows[t] + d);
      for (int g = 0; g < NG; ++g) {
        const auto q_slice = V::load(q + g * head_dim + d);
        for (int t = 0; t < TOKENS; ++t) acc[t][g] = V::fmadd(q_slice, k[t], acc[t][g]);
      }
    }
  }
  float sums[TOKENS * NG];
  V::reduce_add_many(&acc[0][0], TOKENS * NG, sums);
  for (int t = 0; t < TOKENS; ++t)
    for (int g = 0; g < NG; ++g) scores[g * kTokenTile + t] = sums[t * NG + g];
}

// acc_g = alpha_g * acc_g + sum_j probs[g, j] * v_j for NG heads. SLICES vector-wide slices of
// head_dim stay in registers across the tile, so each broadcast probability serves all of them.
template <class V, class T, int NG, int SLICES>
QWEN_INLINE void accumulate_slices(float* acc, int64_t head_dim, int64_t d, const float* alpha, const float* probs,
                                   const T* const* v_rows, int64_t num_tokens) {
  typename V::reg out[SLICES][NG];
  for (int s = 0; s < SLICES; ++s)
    for (int g = 0; g < NG; ++g) out[s][g] = V::mul(V::load(acc + g * head_dim + d + s * V::kWidth), V::set1(alpha[g]));
#pragma GCC unroll 2
  for (int64_t j = 0; j < num_tokens; ++j) {
    typename V::reg v[SLICES];
    if constexpr (reads_pairs<V, T>() && SLICES == 2) {
      V::load_pair(v_rows[j] + d, v[0], v[1]);
    } else {
      for (int s = 0; s < SLICES; ++s) v[s] = V::load(v_rows[j] + d + s * V::kWidth);
    }
    for (int g = 0; g < NG; ++g) {
      const auto p = V::set1(probs[g * kTokenTile + j]);
      for (int s = 0; s < SLICES; ++s) out[s][g] = V::fmadd(p, v[s], out[s][g]);
    }
  }
  for (int s = 0; s < SLICES; ++s)
    for (int g = 0; g < NG; ++g) V::store(acc + g * head_dim + d + s * V::kWidth, out[s][g]);
}

template <class V, class T, int NG>
QWEN_INLINE void accumulate_values(float* acc, int64_t head_dim, const float* alpha, const float* probs,
                                   const T* const* v_rows, int64_t num_tokens) {
  int64_t d = 0;
  for (; d + 2 * V::kWidth <= head_dim; d += 2 * V::kWidth)
    accumulate_slices<V, T, NG, 2>(acc, head_dim, d, alpha, probs, v_rows, num_tokens);
  if (d < head_dim) accumulate_slices<V, T, NG, 1>(acc, head_dim, d, alpha, probs, v_rows, num_tokens);
}

// Walks a row's tokens through its block table without a division per token.
struct TokenCursor {
  const int32_t* blocks;
  int64_t block_size, block_stride, token_stride;
  int64_t logical_block, offset;

  TokenCursor(const int32_t* blocks, int64_t block_size, int64_t block_stride, int64_t token_stride, int64_t token)
      : blocks(blocks),
        block_size(block_size),
        block_stride(block_stride),
        token_stride(token_stride),
        logical_block(token / block_size),
        offset(token % block_size) {}

  // Element offset of the current token's K/V row (all kv heads); then steps to the next token.
  int64_t next() {
    const int64_t row = blocks[logical_block] * block_stride + offset * token_stride;
    if (++offset == block_size) {
      offset = 0;
      ++logical_block;
    }
    return row;
  }
};

// Asks for one kv head's K or V row of a token into L2, a few lines at a time: spread over the scoring of the
// tile before it, the misses overlap the arithmetic; a tile's rows asked for in one burst (a thousand
// prefetches) stall it until the misses drain (measured on Zen 1: ~290 -> ~195 ns per token and kv head, bf16,
// cold cache).
QWEN_INLINE void prefetch_head_row(const void* row, int64_t bytes) {
  const char* line = static_cast<const char*>(row);
  for (int64_t byte = 0; byte < bytes; byte += kCacheLine) __builtin_prefetch(line + byte, 0, 2);
}

// Runs body.template operator()<NG>(first_head) over the group in slices of at most
// V::kMaxHeads heads, the most whose accumulators fit in registers.
template <class V, class Body>
inline void for_head_slices(int64_t group, Body&& body) {
  static_assert(V::kMaxHeads <= 8, "add cases below");
  for (int64_t g0 = 0; g0 < group; g0 += V::kMaxHeads) {
    switch (group - g0 < V::kMaxHeads ? group - g0 : V::kMaxHeads) {
      case 1:
        body.template operator()<1>(g0);
        break;
      case 2:
        body.template operator()<2>(g0);
        break;
      case 3:
        body.template operator()<3>(g0);
        break;
      case 4:
        body.template operator()<4>(g0);
        break;
      case 5:
        body.template operator()<5>(g0);
        break;
      case 6:
        body.template operator()<6>(g0);
        break;
      case 7:
        body.template operator()<7>(g0);
        break;
      case 8:
        body.template operator()<8>(g0);
        break;
    }
  }
}

// max over the tile, then p = exp(s - m') in place; returns sum(p). Scores past the valid
// tokens are -inf and contribute 0.
template <class V>
QWEN_INLINE float max_of_tile(const float* scores) {
  auto m = V::load(scores);
  for (int64_t j = V::kWidth; j < kTokenTile; j += V::kWidth) m = V::max(m, V::load(scores + j));
  return V::reduce_max(m);
}

template <class V>
QWEN_INLINE float exp_and_sum(float* scores, float row_max) {
  const auto shift = V::set1(row_max);
  auto sum = V::zero();
  for (int64_t j = 0; j < kTokenTile; j += V::kWidth) {
    const auto p = V::exp(V::sub(V::load(scores + j), shift));
    V::store(scores + j, p);
    sum = V::add(sum, p);
  }
  return V::reduce_add(sum);
}

template <class V>
QWEN_INLINE void scale_tile(float* probs, float factor) {
  const auto f = V::set1(factor);
  for (int64_t j = 0; j < kTokenTile; j += V::kWidth) V::store(probs + j, V::mul(V::load(probs + j), f));
}

// One work item: the tokens of KV chunk `chunk` of one row, for every kv head in turn and all the row's
// queries (new token i, query head g: query i * group + g of the kv head). Walking the chunk token by token
// reads each token's K and V rows (all kv heads, contiguous in the NHD layout) once for all of them, as one
// stream, which the prefetch below keeps ahead of the arithmetic.
// kHeadDim: head_dim known at compile time, or 0 to read it from p.
template <class V, class T, int kHeadDim>
void attend_item(const AttentionProblem& p, int64_t item, float* scratch) {
  const int64_t group = p.group();
  const int64_t head_dim = kHeadDim ? kHeadDim : p.head_dim;
  const int64_t num_kv_heads = p.num_kv_heads;
  const int64_t chunk = item % p.num_chunks;
  const int64_t row = item / p.num_chunks;
  const int64_t new_tokens = p.queries(row);
  const int64_t queries = new_tokens * group;
  if (queries == 0) return;
  // Partial results of (row, kv head, chunk), laid out for the merge pass.
  auto partial = [&](int64_t kv_head) { return p.partial_index(row, kv_head, chunk); };
  for (int64_t h = 0; h < num_kv_heads; ++h) {
    for (int64_t v = 0; v < queries; ++v) {
      p.partial_max[partial(h) + v] = kNegInf;
      p.partial_sum[partial(h) + v] = 0.f;
    }
    float* acc = p.partial_out + partial(h) * head_dim;
    for (int64_t i = 0; i < queries * head_dim; ++i) acc[i] = 0.f;
  }

  const int64_t seq_len = p.seq_lens[row];
  // Causal: new token i sees context indices < first_hidden + i, so only tiles that reach first_hidden
  // (the row's new tokens) hide anything; with one new token per row (fa_fused) none does.
  const int64_t first_hidden = seq_len - new_tokens + 1;
  const int64_t begin = chunk * p.chunk_len;
  const int64_t end = begin + p.chunk_len < seq_len ? begin + p.chunk_len : seq_len;
  if (begin >= end) return;

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int32_t* blocks = p.block_table + row * p.block_table_stride;
  const int64_t token_stride = num_kv_heads * head_dim;
  const int64_t head_bytes = head_dim * static_cast<int64_t>(sizeof(T));
  TokenCursor cursor(blocks, p.block_size, p.block_stride, token_stride, begin);
  const int64_t prefetch_begin = begin + kPrefetchTilesAhead * kTokenTile;
  TokenCursor prefetch_cursor(blocks, p.block_size, p.block_stride, token_stride,
                              prefetch_begin < end ? prefetch_begin : begin);

  float* scores = scratch;                        // [queries, kTokenTile]
  float* alpha = scratch + queries * kTokenTile;  // [queries]
  int64_t token_offsets[kTokenTile], ahead_offsets[kTokenTile];
  const T* k_rows[kTokenTile];
  const T* v_rows[kTokenTile];

  for (int64_t tile = begin; tile < end; tile += kTokenTile) {
    const int64_t num_tokens = end - tile < kTokenTile ? end - tile : kTokenTile;
    for (int64_t j = 0; j < num_tokens; ++j) token_offsets[j] = cursor.next();
    // The K/V rows of the tile kPrefetchTilesAhead ahead, prefetched kv head by kv head while this tile is
    // scored (prefetch_head_row). Blocks are scattered and a kv head's rows are a token stride apart, which the
    // hardware prefetchers do not follow.
    const int64_t ahead = tile + kPrefetchTilesAhead * kTokenTile;
    const int64_t ahead_count = ahead < end ? (end - ahead < kTokenTile ? end - ahead : kTokenTile) : 0;
    for (int64_t j = 0; j < ahead_count; ++j) ahead_offsets[j] = prefetch_cursor.next();
    const bool causal_tile = tile + num_tokens > first_hidden;
    // Tokens of this tile query v may see.
    auto visible = [&](int64_t v) {
      const int64_t limit = first_hidden + v / group - tile;
      return limit < 0 ? 0 : limit < num_tokens ? limit : num_tokens;
    };
    for (int64_t kv_head = 0; kv_head < num_kv_heads; ++kv_head) {
      for (int64_t j = 0; j < num_tokens; ++j) {
        k_rows[j] = k_cache + token_offsets[j] + kv_head * head_dim;
        v_rows[j] = v_cache + token_offsets[j] + kv_head * head_dim;
      }
      const float* q = p.q + (p.query_start[row] * p.num_heads + kv_head * queries) * head_dim;
      float* running_max = p.partial_max + partial(kv_head);
      float* running_sum = p.partial_sum + partial(kv_head);
      float* acc = p.partial_out + partial(kv_head) * head_dim;

      for_head_slices<V>(queries, [&]<int NG>(int64_t g0) {
        int64_t j = 0;
        for (; j + 2 <= num_tokens; j += 2) {
          if (g0 == 0) {
            for (int64_t t = j; t < j + 2 && t < ahead_count; ++t) {
              prefetch_head_row(k_cache + ahead_offsets[t] + kv_head * head_dim, head_bytes);
              prefetch_head_row(v_cache + ahead_offsets[t] + kv_head * head_dim, head_bytes);
            }
          }
          score_heads<V, T, NG, 2>(q + g0 * head_dim, head_dim, k_rows + j, scores + g0 * kTokenTile + j);
        }
        if (j < num_tokens)
          score_heads<V, T, NG, 1>(q + g0 * head_dim, head_dim, k_rows + j, scores + g0 * kTokenTile + j);
      });
      for (int64_t g = 0; g < queries; ++g) {
        float* tile_scores = scores + g * kTokenTile;
        // Hidden tokens (later new tokens, past the tile) weigh 0 whatever their score, NaN included.
        for (int64_t j = causal_tile ? visible(g) : num_tokens; j < kTokenTile; ++j) tile_scores[j] = kNegInf;
        const float tile_max = max_of_tile<V>(tile_scores);
        const float new_max = tile_max > running_max[g] ? tile_max : running_max[g];
        alpha[g] = running_max[g] == kNegInf ? 0.f : std::exp(running_max[g] - new_max);
        running_max[g] = new_max;
        // Scores that are all -inf so far (an -inf key or weight) weigh 0, as they do in a softmax whose
        // max comes from another chunk: shift by 0, not by -inf (-inf - -inf would be NaN).
        const float shift = new_max == kNegInf ? 0.f : new_max;
        const float sum = running_sum[g] * alpha[g] + exp_and_sum<V>(tile_scores, shift);
        const float new_scale = sum_scale(sum);
        alpha[g] *= new_scale / sum_scale(running_sum[g]);
        running_sum[g] = sum;
        scale_tile<V>(tile_scores, new_scale);
      }
      if (!causal_tile) {
        for_head_slices<V>(queries, [&]<int NG>(int64_t g0) {
          accumulate_values<V, T, NG>(acc + g0 * head_dim, head_dim, alpha + g0, scores + g0 * kTokenTile, v_rows,
                                      num_tokens);
        });
      } else {
        // Query by query, over its visible tokens only: a hidden token's V is never read (0 * Inf is NaN).
        for (int64_t g = 0; g < queries; ++g) {
          accumulate_values<V, T, 1>(acc + g * head_dim, head_dim, alpha + g, scores + g * kTokenTile, v_rows,
                                     visible(g));
        }
      }
    }
  }
}

template <class V, class T>
void attend_items_of(const AttentionProblem& p, int64_t begin, int64_t end, float* scratch) {
  for (int64_t item = begin; item < end; ++item) {
    switch (p.head_dim) {
      case 128:
        attend_item<V, T, 128>(p, item, scratch);
        break;
      case 64:
        attend_item<V, T, 64>(p, item, scratch);
        break;
      default:
        attend_item<V, T, 0>(p, item, scratch);
        break;
    }
  }
}

template <class V>
void attend_items(const AttentionProblem& p, int64_t begin, int64_t end, float* scratch) {
  switch (p.cache_dtype) {
    case CacheDtype::kFloat:
      attend_items_of<V, float>(p, begin, end, scratch);
      break;
    case CacheDtype::kBFloat16:
      attend_items_of<V, BFloat16Bits>(p, begin, end, scratch);
      break;
    case CacheDtype::kHalf:
      attend_items_of<V, HalfBits>(p, begin, end, scratch);
      break;
    case CacheDtype::kFloat8E4M3:
    case CacheDtype::kFloat8E5M2:
      if constexpr (V::kLoadsFloat8) {
        if (p.cache_dtype == CacheDtype::kFloat8E4M3) {
          attend_items_of<V, Float8E4M3Bits>(p, begin, end, scratch);
        } else {
          attend_items_of<V, Float8E5M2Bits>(p, begin, end, scratch);
        }
      } else {
        // The host asks AttentionKernel::can_read first: unreachable from the op.
        throw std::invalid_argument("attention kernel: a cache dtype this vector type cannot read");
      }
      break;
  }
}

// The facts the host needs about the kernel built over V.
template <class V>
constexpr AttentionKernel describe_kernel(const char* isa, AttendFn attend, const char* arithmetic) {
  const uint32_t wide = dtype_bit(CacheDtype::kFloat) | dtype_bit(CacheDtype::kBFloat16) | dtype_bit(CacheDtype::kHalf);
  const uint32_t float8 = dtype_bit(CacheDtype::kFloat8E4M3) | dtype_bit(CacheDtype::kFloat8E5M2);
  return {isa, attend, wide | (V::kLoadsFloat8 ? float8 : 0u),
          V::kPairsBFloat16 ? dtype_bit(CacheDtype::kBFloat16) : 0u, arithmetic};
}

}  // namespace
}  // namespace qwen_fused
