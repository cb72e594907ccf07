// Interface between the CPU op (fa_fused_cpu.cpp, which uses ATen) and the per-ISA attention
// kernels (kernel_*.cpp, compiled for one instruction set each). Plain C++ only: the kernel files
// must not pull ATen headers into code built for wider instructions.
#pragma once

#include <cstdint>

namespace qwen_fused {

// Cache element types, bit-compatible with float, c10::BFloat16 and c10::Half.
struct BFloat16Bits {
  uint16_t bits;
};
struct HalfBits {
  uint16_t bits;
};
enum class CacheDtype { kFloat, kBFloat16, kHalf };

// Tokens scored and accumulated together; a multiple of every vector width used.
constexpr int64_t kTokenTile = 32;

// One call's attention, split into work items over a flat (row, KV chunk) index; each item runs
// every kv head of its row over its chunk and leaves one partial result per (row, kv head, chunk).
struct AttentionProblem {
  const float* q;       // [batch, num_heads, head_dim], normed, roped and multiplied by the scale
  const void* k_cache;  // [num_blocks, block_size, num_kv_heads, head_dim]
  const void* v_cache;
  CacheDtype cache_dtype;
  const int32_t* block_table;  // [batch, >= max blocks of a row]
  const int32_t* seq_lens;     // [batch]
  int64_t batch, num_heads, num_kv_heads, head_dim, block_size;
  int64_t block_table_stride;     // elements from one row of block_table to the next (its columns are contiguous)
  int64_t chunk_len, num_chunks;  // KV split: chunk c of a row covers tokens [c * chunk_len, (c + 1) * chunk_len)
  // Per (row, kv head, chunk) and query head of the group: running max, running sum, unnormalised output.
  float* partial_max;  // [batch, num_kv_heads, num_chunks, group]
  float* partial_sum;  // [batch, num_kv_heads, num_chunks, group]
  float* partial_out;  // [batch, num_kv_heads, num_chunks, group, head_dim]

  int64_t group() const { return num_heads / num_kv_heads; }
  int64_t num_items() const { return batch * num_chunks; }
  int64_t num_partials() const { return batch * num_kv_heads * num_chunks; }
  // fp32 scratch one thread needs: scores and rescale factors of one token tile.
  int64_t scratch_floats() const { return group() * (kTokenTile + 1); }
};

// Attends work items [begin, end); scratch holds scratch_floats() floats owned by the caller's thread.
using AttendFn = void (*)(const AttentionProblem&, int64_t begin, int64_t end, float* scratch);

void attend_generic(const AttentionProblem&, int64_t begin, int64_t end, float* scratch);
void attend_avx2(const AttentionProblem&, int64_t begin, int64_t end, float* scratch);
void attend_avx512(const AttentionProblem&, int64_t begin, int64_t end, float* scratch);

}  // namespace qwen_fused
