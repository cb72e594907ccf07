// CPU kernel of qwen::fa_fused. Three passes, each an at::parallel_for:
//   1. per row: RMSNorm + RoPE of q (fp32, times the softmax scale) and of k; k and v rounded to
//      the cache dtype and written into the new token's slot;
//   2. per (row, KV chunk): flash-decoding attention over the paged cache for every kv head, by the
//      kernel built for the widest instruction set this CPU has (kernel_*.cpp);
//   3. per (row, head): exact merge of the chunks' partial (max, sum, out) into the output.
// The argument checks (../validation.cpp) all run before the first write.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "../validation.h"
#include "decode_attention.h"

namespace qwen_fused {
namespace {

// A KV chunk is never shorter than this: below it the merge costs more than the split gains.
constexpr int64_t kMinChunkTokens = 256;
// Enough work items per thread to even out ragged rows.
constexpr int64_t kItemsPerThread = 4;
// Below this many values to process, a pass runs on the calling thread.
constexpr int64_t kMinParallelValues = 32768;
constexpr int64_t kFloatsPerCacheLine = 64 / sizeof(float);

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// The attention kernel for this CPU; TORCH_QWEN_FUSED_CPU_ISA=generic|avx2|avx512 forces one
// (tests use it to cover every variant the machine can run).
AttendFn select_attention_kernel() {
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const char* forced = std::getenv("TORCH_QWEN_FUSED_CPU_ISA");
  const std::string isa = forced ? forced : "";
  if (isa == "generic") return attend_generic;
  if (isa == "avx2") {
    TORCH_CHECK(has_avx2, "fa_fused: TORCH_QWEN_FUSED_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
    return attend_avx2;
  }
  if (isa == "avx512") {
    TORCH_CHECK(has_avx512, "fa_fused: TORCH_QWEN_FUSED_CPU_ISA=avx512 but this CPU lacks AVX-512 F/BW/VL/DQ");
    return attend_avx512;
  }
  TORCH_CHECK(isa.empty(), "fa_fused: TORCH_QWEN_FUSED_CPU_ISA must be generic, avx2 or avx512, got '", isa, "'");
  return has_avx512 ? attend_avx512 : has_avx2 ? attend_avx2 : attend_generic;
}

// TORCH_QWEN_FUSED_KV_CHUNK as a positive token count (digits only; more than int64 holds saturates,
// choose_chunk_len clamps it anyway); 0 if unset.
int64_t forced_chunk_tokens() {
  const char* forced = std::getenv("TORCH_QWEN_FUSED_KV_CHUNK");
  if (!forced) return 0;
  const std::string text = forced;
  bool digits = !text.empty();
  for (const char c : text) digits = digits && c >= '0' && c <= '9';
  const int64_t tokens = !digits ? 0 : text.size() > 18 ? std::numeric_limits<int64_t>::max() : std::stoll(text);
  TORCH_CHECK(tokens > 0, "fa_fused: TORCH_QWEN_FUSED_KV_CHUNK must be a positive integer token count, got '", text,
              "'");
  return tokens;
}

// The CPU's features and the environment switches, read at the first call and kept, so that a call
// neither queries cpuid nor reads the environment. qwen::reload_cpu_switches() forgets them (tests that
// change a switch); a bad switch raises at every call until it is fixed and reloaded.
struct CpuSwitches {
  AttendFn attend;
  int64_t forced_chunk_tokens;  // 0: choose per call
};

std::mutex switches_mutex;
std::optional<CpuSwitches> cached_switches;

CpuSwitches cpu_switches() {
  std::lock_guard<std::mutex> lock(switches_mutex);
  if (!cached_switches) cached_switches = CpuSwitches{select_attention_kernel(), forced_chunk_tokens()};
  return *cached_switches;
}

void reload_cpu_switches() {
  std::lock_guard<std::mutex> lock(switches_mutex);
  cached_switches.reset();
}

// Tokens per KV chunk: enough chunks for every thread to get kItemsPerThread (row, chunk) work items,
// each at least kMinChunkTokens long. TORCH_QWEN_FUSED_KV_CHUNK forces a length, clamped to
// [kTokenTile, max_len]: shorter chunks would only grow the partial results (one per chunk, head_dim + 2
// floats for every query head), so the workspace stays below 1/kTokenTile of the K/V it reads.
int64_t choose_chunk_len(int64_t batch, int64_t max_len, int64_t forced) {
  if (forced) return std::clamp(forced, kTokenTile, std::max(max_len, kTokenTile));
  const int64_t target_items = kItemsPerThread * at::get_num_threads();
  const int64_t wanted_chunks = (target_items + batch - 1) / batch;
  const int64_t max_chunks = std::max<int64_t>(1, (max_len + kMinChunkTokens - 1) / kMinChunkTokens);
  const int64_t chunks = std::min(wanted_chunks, max_chunks);
  const int64_t chunk_len = (max_len + chunks - 1) / chunks;
  return (chunk_len + kTokenTile - 1) / kTokenTile * kTokenTile;
}

CacheDtype cache_dtype_of(at::ScalarType t) {
  return t == at::kFloat ? CacheDtype::kFloat : t == at::kBFloat16 ? CacheDtype::kBFloat16 : CacheDtype::kHalf;
}

// The element at `offset` (in elements, from the strides) of a floating tensor, as fp32: norm weights
// and the cos/sin rows of the batch are read in place, whatever the table's dtype and strides.
float float_at(const at::Tensor& t, int64_t offset) {
  const int64_t i = offset;
  switch (t.scalar_type()) {
    case at::kFloat:
      return t.const_data_ptr<float>()[i];
    case at::kBFloat16:
      return static_cast<float>(t.const_data_ptr<c10::BFloat16>()[i]);
    case at::kHalf:
      return static_cast<float>(t.const_data_ptr<c10::Half>()[i]);
    case at::kDouble:
      return static_cast<float>(t.const_data_ptr<double>()[i]);
    default:
      TORCH_CHECK(false, "fa_fused: float_at reached with ", t.scalar_type(), " (validate admits it)");
  }
  return 0.f;
}

// Per-row fp32 copies of what pass 1 reads: norm weights [2, D], cos and sin rows [B, D] each.
struct RopeInputs {
  std::vector<float> q_weight, k_weight, cos, sin;
};

RopeInputs gather_rope_inputs(const at::Tensor& q_norm_weight, const at::Tensor& k_norm_weight, const at::Tensor& cos,
                              const at::Tensor& sin, const std::vector<int64_t>& positions, int64_t head_dim) {
  RopeInputs in;
  in.q_weight.resize(head_dim);
  in.k_weight.resize(head_dim);
  for (int64_t i = 0; i < head_dim; ++i) {
    in.q_weight[i] = float_at(q_norm_weight, i * q_norm_weight.stride(0));
    in.k_weight[i] = float_at(k_norm_weight, i * k_norm_weight.stride(0));
  }
  const int64_t batch = static_cast<int64_t>(positions.size());
  in.cos.resize(batch * head_dim);
  in.sin.resize(batch * head_dim);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < head_dim; ++i) {
      in.cos[b * head_dim + i] = float_at(cos, positions[b] * cos.stride(0) + i * cos.stride(1));
      in.sin[b * head_dim + i] = float_at(sin, positions[b] * sin.stride(0) + i * sin.stride(1));
    }
  }
  return in;
}

// x * rsqrt(mean(x^2) + eps) * w, then rotate-half RoPE, over one head of head_dim values (fp32).
void norm_and_rope(float* x, const float* weight, const float* cos, const float* sin, int64_t head_dim, float eps,
                   float* rotated) {
  float sum_sq = 0.f;
  for (int64_t i = 0; i < head_dim; ++i) sum_sq += x[i] * x[i];
  const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(head_dim) + eps);
  for (int64_t i = 0; i < head_dim; ++i) x[i] = x[i] * inv_rms * weight[i];
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    rotated[i] = x[i] * cos[i] - x[i + half] * sin[i];
    rotated[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
}

// Pass 1. q_out: [batch, num_heads, head_dim] fp32, scaled; k (roped) and v go to their slots.
template <typename scalar_t, typename cache_t>
void prepare_and_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const RopeInputs& rope,
                       const std::vector<int64_t>& slots, float scale, float eps, at::Tensor& k_cache,
                       at::Tensor& v_cache, float* q_out) {
  const int64_t batch = q.size(0), num_heads = q.size(1), num_kv_heads = k.size(1), head_dim = q.size(2);
  const scalar_t* q_in = q.const_data_ptr<scalar_t>();
  const scalar_t* k_in = k.const_data_ptr<scalar_t>();
  const scalar_t* v_in = v.const_data_ptr<scalar_t>();
  cache_t* k_slots = k_cache.data_ptr<cache_t>();
  cache_t* v_slots = v_cache.data_ptr<cache_t>();
  // A few rows are cheaper on the calling thread than a wake-up of the pool.
  const int64_t grain = std::max<int64_t>(1, kMinParallelValues / ((num_heads + num_kv_heads) * head_dim));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(head_dim), rotated(head_dim);
    for (int64_t b = begin; b < end; ++b) {
      const float* c = rope.cos.data() + b * head_dim;
      const float* s = rope.sin.data() + b * head_dim;
      for (int64_t h = 0; h < num_heads; ++h) {
        const scalar_t* src = q_in + (b * num_heads + h) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) x[i] = static_cast<float>(src[i]);
        norm_and_rope(x.data(), rope.q_weight.data(), c, s, head_dim, eps, rotated.data());
        float* dst = q_out + (b * num_heads + h) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) dst[i] = rotated[i] * scale;
      }
      if (slots[b] < 0) continue;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const int64_t src_offset = (b * num_kv_heads + h) * head_dim;
        const int64_t dst_offset = (slots[b] * num_kv_heads + h) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) x[i] = static_cast<float>(k_in[src_offset + i]);
        norm_and_rope(x.data(), rope.k_weight.data(), c, s, head_dim, eps, rotated.data());
        for (int64_t i = 0; i < head_dim; ++i) {
          k_slots[dst_offset + i] = static_cast<cache_t>(rotated[i]);
          v_slots[dst_offset + i] = static_cast<cache_t>(static_cast<float>(v_in[src_offset + i]));
        }
      }
    }
  });
}

// Pass 3: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c over the row's non-empty chunks.
template <typename scalar_t>
void merge_chunks(const AttentionProblem& p, at::Tensor& out) {
  const int64_t group = p.group(), head_dim = p.head_dim;
  scalar_t* dst = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kMinParallelValues / (head_dim * p.num_chunks));
  at::parallel_for(0, p.batch * p.num_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(head_dim);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.num_heads, h = bh % p.num_heads;
      const int64_t kv_head = h / group, g = h % group;
      const int64_t chunks = (p.seq_lens[b] + p.chunk_len - 1) / p.chunk_len;
      const int64_t first_partial = (b * p.num_kv_heads + kv_head) * p.num_chunks;
      float global_max = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c)
        global_max = std::max(global_max, p.partial_max[(first_partial + c) * group + g]);
      float denominator = 0.f;
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t partial = first_partial + c;
        const float weight = std::exp(p.partial_max[partial * group + g] - global_max);
        denominator += weight * p.partial_sum[partial * group + g];
        const float* acc = p.partial_out + (partial * group + g) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) merged[i] += weight * acc[i];
      }
      for (int64_t i = 0; i < head_dim; ++i) dst[bh * head_dim + i] = static_cast<scalar_t>(merged[i] / denominator);
    }
  });
}

at::Tensor fa_fused_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_norm_weight,
                        const at::Tensor& k_norm_weight, const at::Tensor& cos, const at::Tensor& sin,
                        at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& block_table,
                        const at::Tensor& seq_lens, const std::optional<at::Tensor>& positions,
                        const std::optional<at::Tensor>& slot_mapping, double eps, std::optional<double> scale) {
  const IndexPlan plan = validate({q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table,
                                   seq_lens, positions, slot_mapping});
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k.size(1), block_size = k_cache.size(1);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  if (batch == 0) return out;
  const CpuSwitches switches = cpu_switches();
  const at::Tensor lens = seq_lens.contiguous();
  // The kernel walks a row's blocks with unit stride. A table with another column stride (a transposed
  // view) is compacted to the columns the rows use, never copied whole.
  const int64_t used_columns = (plan.max_len + block_size - 1) / block_size;
  const at::Tensor table =
      block_table.stride(1) == 1 ? block_table : block_table.narrow(1, 0, used_columns).contiguous();

  AttentionProblem problem{};
  problem.batch = batch;
  problem.num_heads = num_heads;
  problem.num_kv_heads = num_kv_heads;
  problem.head_dim = head_dim;
  problem.block_size = block_size;
  problem.block_table_stride = table.stride(0);
  problem.chunk_len = choose_chunk_len(batch, plan.max_len, switches.forced_chunk_tokens);
  problem.num_chunks = (plan.max_len + problem.chunk_len - 1) / problem.chunk_len;
  const int64_t group = problem.group();
  const int64_t items = problem.num_items();
  const int64_t partials = problem.num_partials() * group;
  const int64_t threads = at::get_num_threads();

  // One fp32 buffer for the prepared q, the chunks' partial results and the threads' scratch. Each
  // thread's scratch starts on a cache line of its own (no false sharing between the threads' writes).
  const int64_t q_floats = batch * num_heads * head_dim;
  const int64_t scratch_begin = round_up(q_floats + partials * (head_dim + 2), kFloatsPerCacheLine);
  const int64_t scratch_stride = round_up(problem.scratch_floats(), kFloatsPerCacheLine);
  at::Tensor workspace =
      at::empty({scratch_begin + threads * scratch_stride + kFloatsPerCacheLine}, q.options().dtype(at::kFloat));
  // at::empty aligns to 64 bytes on the CPU; align again in case an allocator does not.
  float* base = workspace.data_ptr<float>();
  base += (kFloatsPerCacheLine - reinterpret_cast<uintptr_t>(base) / sizeof(float) % kFloatsPerCacheLine) %
          kFloatsPerCacheLine;
  float* q_prepared = base;
  problem.partial_out = q_prepared + q_floats;
  problem.partial_max = problem.partial_out + partials * head_dim;
  problem.partial_sum = problem.partial_max + partials;
  float* thread_scratch = base + scratch_begin;

  const float softmax_scale = scale ? static_cast<float>(*scale) : 1.f / std::sqrt(static_cast<float>(head_dim));
  const RopeInputs rope = gather_rope_inputs(q_norm_weight, k_norm_weight, cos, sin, plan.positions, head_dim);
  const at::Tensor q_in = q.contiguous(), k_in = k.contiguous(), v_in = v.contiguous();
  // Everything is checked: from here on the caches get written.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fa_fused_prepare", [&] {
    using q_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "fa_fused_write", [&] {
      prepare_and_write<q_t, scalar_t>(q_in, k_in, v_in, rope, plan.slots, softmax_scale, static_cast<float>(eps),
                                       k_cache, v_cache, q_prepared);
    });
  });

  problem.q = q_prepared;
  problem.k_cache = k_cache.const_data_ptr();
  problem.v_cache = v_cache.const_data_ptr();
  problem.cache_dtype = cache_dtype_of(k_cache.scalar_type());
  problem.block_table = table.const_data_ptr<int32_t>();
  problem.seq_lens = lens.const_data_ptr<int32_t>();
  // Short contexts: all items on the calling thread (waking the pool costs more than it saves).
  const int64_t grain = plan.total_len * num_kv_heads * head_dim < kMinParallelValues * 16 ? items : 1;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    switches.attend(problem, begin, end, thread_scratch + at::get_thread_num() * scratch_stride);
  });

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fa_fused_merge",
                                  [&] { merge_chunks<scalar_t>(problem, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen, CPU, m) { m.impl("fa_fused", &fa_fused_cpu); }

TORCH_LIBRARY_FRAGMENT(qwen, m) {
  // Forgets the CPU kernel's switches (TORCH_QWEN_FUSED_CPU_ISA, TORCH_QWEN_FUSED_KV_CHUNK): the next call
  // reads them again.
  m.def("reload_cpu_switches() -> ()", &reload_cpu_switches);
}

}  // namespace qwen_fused
