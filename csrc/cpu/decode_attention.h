// Interface between the CPU op (fa_fused_cpu.cpp, which uses ATen) and the per-ISA attention
// kernels (kernel_*.cpp, compiled for one instruction set each). Plain C++ only: the kernel files
// must not pull ATen headers into code built for wider instructions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace qwen_fused {

// Cache element types, bit-compatible with float, c10::BFloat16, c10::Half, c10::Float8_e4m3fn and
// c10::Float8_e5m2.
struct BFloat16Bits {
  uint16_t bits;
};
struct HalfBits {
  uint16_t bits;
};
struct Float8E4M3Bits {
  uint8_t bits;
};
struct Float8E5M2Bits {
  uint8_t bits;
};
enum class CacheDtype { kFloat, kBFloat16, kHalf, kFloat8E4M3, kFloat8E5M2 };

// Tokens scored and accumulated together; a multiple of every vector width used. 16, not 32: the V rows of
// one kv head over a tile are re-read once per pair of head_dim slices, and rows one token apart map to
// the same L1 sets every 4 KB; 16 of them still fit the 8 ways (measured: ~10-15% faster than 32 on AVX2).
constexpr int64_t kTokenTile = 16;

// The order of head_dim in the prepared q and in the partial outputs. Natural, but for the AVX2 kernel over a
// bf16 cache (AttentionKernel::pairs): there each group of kPairGroup elements holds its 8 even elements, then its 8
// odd ones, the order in which that kernel widens 16 bf16 of one 256-bit load (VecAVX2::load_pair). A dot
// product and a weighted sum of V rows do not care about the order, as long as q, K, V and the output agree.
constexpr int64_t kPairGroup = 16;
inline int64_t paired_index(int64_t d) {
  const int64_t i = d % kPairGroup;
  return d - i + (i % 2) * (kPairGroup / 2) + i / 2;
}

// The partial output of a chunk is sum_j p_j v_j times sum_scale(l), l = sum_j p_j: a power of two 2^-e with
// l < 2^e <= 2 l, so that it stays within the largest |v_j| (finite wherever V is) while every rescaling is exact
// (the precision of the plain sum). 1 while l = 0 (no weight yet); NaN stays NaN. Internal linkage: each kernel
// file compiles its own copy for its instruction set, and the linker must not hand one ISA's copy to another.
namespace {
inline float sum_scale(float sum) {
  if (!(sum > 0.f)) return sum == 0.f ? 1.f : sum;
  // A normal l = 1.m * 2^(E - 127) gives 2^(126 - E), biased 253 - E: read off the bits. The kernels call this
  // per query head and tile, where libm's ldexp and ilogb were 8% of the instructions.
  uint32_t bits;
  std::memcpy(&bits, &sum, sizeof(bits));
  const uint32_t exponent = bits >> 23;
  if (exponent >= 1 && exponent <= 252) {
    const uint32_t scale_bits = (253 - exponent) << 23;
    float scale;
    std::memcpy(&scale, &scale_bits, sizeof(scale));
    return scale;
  }
  return std::ldexp(1.f, -(std::ilogb(sum) + 1));
}
}  // namespace

// One call's attention, split into work items over a flat (row, KV chunk) index; each item runs every kv head
// of its row over its chunk, for all of the row's new tokens and query heads at once (each K/V row is read once
// for all of them), and leaves one partial result per (new token, query head, chunk).
//
// Row b has n_b = query_start[b + 1] - query_start[b] new tokens, the last of its seq_lens[b]-token context:
// new token i (context index seq_lens[b] - n_b + i) attends to context indices 0..seq_lens[b] - n_b + i.
// fa_fused is the case n_b = 1.
struct AttentionProblem {
  // Normed, roped, scaled queries. Row b's start at query_start[b] * num_heads * head_dim and are laid out
  // [num_kv_heads][n_b][group][head_dim]: the n_b * group queries of one kv head are contiguous.
  const float* q;
  const void* k_cache;   // [num_blocks, block_size, num_kv_heads, head_dim], a block's tokens contiguous
  const void* v_cache;   // the same layout and strides as k_cache
  int64_t block_stride;  // elements from one block to the next (>= block_size * num_kv_heads * head_dim)
  CacheDtype cache_dtype;
  const int32_t* block_table;  // [batch, >= max blocks of a row]
  int64_t block_table_stride;  // elements from one row of block_table to the next (its columns are contiguous)
  const int32_t* seq_lens;     // [batch]
  const int64_t* query_start;  // [batch + 1]
  int64_t batch, num_heads, num_kv_heads, head_dim, block_size;
  int64_t chunk_len, num_chunks;  // KV split: chunk c of a row covers tokens [c * chunk_len, (c + 1) * chunk_len)
  int64_t max_queries;            // the most new tokens of one row
  // Per (row, kv head, chunk) and query (i, g) of the row (i * group + g): running max, running sum and the
  // unnormalised output times sum_scale(sum), at partial_index(b, h, c) + i * group + g.
  float* partial_max;
  float* partial_sum;
  float* partial_out;  // times head_dim

  int64_t group() const { return num_heads / num_kv_heads; }
  int64_t queries(int64_t row) const { return query_start[row + 1] - query_start[row]; }
  int64_t partial_index(int64_t row, int64_t kv_head, int64_t chunk) const {
    const int64_t row_queries = queries(row) * group();
    return (query_start[row] * num_heads + kv_head * row_queries) * num_chunks + chunk * row_queries;
  }
  int64_t num_items() const { return batch * num_chunks; }
  int64_t num_partials() const { return query_start[batch] * num_heads * num_chunks; }
  // fp32 scratch one thread needs: scores and rescale factors of one token tile for a row's queries.
  int64_t scratch_floats() const { return max_queries * group() * (kTokenTile + 1); }
};

// Attends work items [begin, end); scratch holds scratch_floats() floats owned by the caller's thread.
using AttendFn = void (*)(const AttentionProblem&, int64_t begin, int64_t end, float* scratch);

constexpr uint32_t dtype_bit(CacheDtype dtype) { return uint32_t{1} << static_cast<int>(dtype); }

// A per-ISA kernel and what it does, exported by its own file (kernel_*.cpp, from its vector type, see
// describe_kernel): the host picks a kernel for a call from these facts, not from copies of them.
struct AttentionKernel {
  const char* isa;  // "generic", "avx2", "avx512"
  AttendFn attend;
  uint32_t reads;          // dtype_bit of every cache dtype it reads
  uint32_t reads_paired;   // of those, the ones it reads in paired order: q and the partial outputs in kPairGroup order
  const char* arithmetic;  // how it computes q.k and p.v, as benchmarks report it

  bool can_read(CacheDtype dtype) const { return reads & dtype_bit(dtype); }
  bool pairs(CacheDtype dtype) const { return reads_paired & dtype_bit(dtype); }
};

extern const AttentionKernel kGenericKernel;
extern const AttentionKernel kAvx2Kernel;
extern const AttentionKernel kAvx512Kernel;

}  // namespace qwen_fused
