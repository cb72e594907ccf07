// CPU kernel of qwen::fa_fused and qwen::fa_fused_varlen (one kernel; fa_fused is the case of one new token
// per row). Three passes, each an at::parallel_for:
//   1. per new token: RMSNorm + RoPE of q (fp32, times the softmax scale) and of k; k and v rounded to
//      the cache dtype and written into the token's slot (all writes before any read);
//   2. per (row, KV chunk): flash-decoding attention over the paged cache for every kv head and all the row's
//      new tokens (causal among them), by the kernel built for the widest instruction set this CPU has
//      (kernel_*.cpp);
//   3. per (new token, head): exact merge of the chunks' partial (max, sum, out) into the output.
// The argument checks (../validation.cpp) all run before the first write.
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
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
#include <type_traits>
#include <vector>

#include "../cache_dtype.h"
#include "../validation.h"
#include "decode_attention.h"

namespace qwen_fused {
namespace {

// A KV chunk is never shorter than this: below it the merge costs more than the split gains.
constexpr int64_t kMinChunkTokens = 256;
// Nor longer than this: a chunk's softmax sum is an fp32 count of up to this many unit weights, exact below 2^24;
// over 2^25-token chunks it used to stall and pull the output of equal V rows off by a third.
constexpr int64_t kMaxChunkTokens = int64_t{1} << 20;
// Enough work items per thread to even out ragged rows.
constexpr int64_t kItemsPerThread = 4;
// Below this many values to process, a pass runs on the calling thread.
constexpr int64_t kMinParallelValues = 32768;
constexpr int64_t kFloatsPerCacheLine = 64 / sizeof(float);

// The kernels, widest first. A call takes the first one, from the widest this CPU runs (or the one
// TORCH_QWEN_FUSED_CPU_ISA=generic|avx2|avx512 names: tests use it to cover every variant the machine can run),
// that reads its cache dtype: today fp8 caches go from the AVX-512 kernel, which has no fp8 loads, to AVX2's.
constexpr const AttentionKernel* kKernels[] = {&kAvx512Kernel, &kAvx2Kernel, &kGenericKernel};
constexpr int64_t kNumKernels = sizeof(kKernels) / sizeof(kKernels[0]);

// Index in kKernels of the widest kernel a call may take.
int64_t select_widest_kernel() {
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool runs[] = {has_avx512, has_avx2, true};
  const char* forced = std::getenv("TORCH_QWEN_FUSED_CPU_ISA");
  const std::string isa = forced ? forced : "";
  for (int64_t i = 0; i < kNumKernels; ++i) {
    if (isa.empty() ? runs[i] : isa == kKernels[i]->isa) {
      TORCH_CHECK(runs[i], "fa_fused: TORCH_QWEN_FUSED_CPU_ISA=", isa, " but this CPU lacks ",
                  i == 0 ? "AVX-512 F/BW/VL/DQ" : "AVX2/FMA");
      return i;
    }
  }
  TORCH_CHECK(false, "fa_fused: TORCH_QWEN_FUSED_CPU_ISA must be generic, avx2 or avx512, got '", isa, "'");
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
  int64_t widest_kernel;        // index in kKernels
  int64_t forced_chunk_tokens;  // 0: choose per call
};

std::mutex switches_mutex;
std::optional<CpuSwitches> cached_switches;

CpuSwitches cpu_switches() {
  std::lock_guard<std::mutex> lock(switches_mutex);
  if (!cached_switches) cached_switches = CpuSwitches{select_widest_kernel(), forced_chunk_tokens()};
  return *cached_switches;
}

// The kernel that attends over a cache of `dtype`: the widest allowed one that reads it.
const AttentionKernel& kernel_for(const CpuSwitches& switches, CacheDtype dtype) {
  for (int64_t i = switches.widest_kernel; i < kNumKernels; ++i)
    if (kKernels[i]->can_read(dtype)) return *kKernels[i];
  TORCH_CHECK(false, "fa_fused: no CPU attention kernel from ", kKernels[switches.widest_kernel]->isa, " down reads a ",
              cache_dtype_name(dtype), " cache");
}

void reload_cpu_switches() {
  std::lock_guard<std::mutex> lock(switches_mutex);
  cached_switches.reset();
}

// Tokens per KV chunk: enough chunks for every thread to get kItemsPerThread (row, chunk) work items,
// each at least kMinChunkTokens long. TORCH_QWEN_FUSED_KV_CHUNK forces a length, clamped to
// [kTokenTile, max_len]: shorter chunks would only grow the partial results (one per chunk, head_dim + 2
// floats for every query head), so the workspace stays below 1/kTokenTile of the K/V it reads. Either way a
// chunk is at most kMaxChunkTokens long.
int64_t choose_chunk_len(int64_t batch, int64_t max_len, int64_t forced) {
  if (forced) return std::clamp(forced, kTokenTile, std::clamp(max_len, kTokenTile, kMaxChunkTokens));
  const int64_t target_items = kItemsPerThread * at::get_num_threads();
  const int64_t wanted_chunks = (target_items + batch - 1) / batch;
  const int64_t max_chunks = std::max<int64_t>(1, (max_len + kMinChunkTokens - 1) / kMinChunkTokens);
  const int64_t chunks =
      std::max(std::min(wanted_chunks, max_chunks), (max_len + kMaxChunkTokens - 1) / kMaxChunkTokens);
  const int64_t chunk_len = (max_len + chunks - 1) / chunks;
  return (chunk_len + kTokenTile - 1) / kTokenTile * kTokenTile;
}

// x (already divided by the layer's scale) in the cache dtype, rounded to nearest even; fp8 saturates to its
// finite range (overflow never becomes Inf or NaN; a NaN stays NaN).
template <typename cache_t>
cache_t to_cache(float x) {
  if constexpr (std::is_same_v<cache_t, c10::Float8_e4m3fn> || std::is_same_v<cache_t, c10::Float8_e5m2>) {
    const float max = static_cast<float>(std::numeric_limits<cache_t>::max());
    x = x < -max ? -max : x > max ? max : x;
  }
  return static_cast<cache_t>(x);
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

// Where each new token's queries go in the prepared q (AttentionProblem::q): row b's tokens as
// [num_kv_heads][n_b][group][head_dim], so that the queries of one kv head are contiguous.
struct QueryLayout {
  std::vector<int64_t> row_of, index_in_row;  // per token
  const std::vector<int64_t>& query_start;
  int64_t num_heads, group, head_dim;

  QueryLayout(const std::vector<int64_t>& query_start, int64_t num_heads, int64_t group, int64_t head_dim)
      : query_start(query_start), num_heads(num_heads), group(group), head_dim(head_dim) {
    const int64_t batch = static_cast<int64_t>(query_start.size()) - 1;
    row_of.resize(query_start[batch]);
    index_in_row.resize(query_start[batch]);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t t = query_start[b]; t < query_start[b + 1]; ++t) {
        row_of[t] = b;
        index_in_row[t] = t - query_start[b];
      }
    }
  }

  // Offset of query head h of token t.
  int64_t offset(int64_t t, int64_t h) const {
    const int64_t b = row_of[t], new_tokens = query_start[b + 1] - query_start[b];
    const int64_t kv_head = h / group, g = h % group;
    return (query_start[b] * num_heads + (kv_head * new_tokens + index_in_row[t]) * group + g) * head_dim;
  }
};

// Pass 1, per new token: its q heads normed, roped and scaled into q_out (laid out by `layout`, head_dim in paired
// order if `paired`); k (roped)
// and v rounded to the cache dtype and written to the token's slot.
template <typename scalar_t, typename cache_t>
void prepare_and_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const RopeInputs& rope,
                       const IndexPlan& plan, const QueryLayout& layout, float scale, float eps, bool paired,
                       at::Tensor& k_cache, at::Tensor& v_cache, float* q_out) {
  const std::vector<int64_t>& slots = plan.slots;
  const int64_t tokens = q.size(0), num_heads = q.size(1), num_kv_heads = k.size(1), head_dim = q.size(2);
  const scalar_t* q_in = q.const_data_ptr<scalar_t>();
  const scalar_t* k_in = k.const_data_ptr<scalar_t>();
  const scalar_t* v_in = v.const_data_ptr<scalar_t>();
  cache_t* k_slots = k_cache.data_ptr<cache_t>();
  cache_t* v_slots = v_cache.data_ptr<cache_t>();
  // Blocks may lie further apart than their size (one layer's pages in a buffer interleaving layers, K and V).
  const int64_t block_size = k_cache.size(1), block_stride = k_cache.stride(0);
  // A few tokens are cheaper on the calling thread than a wake-up of the pool.
  const int64_t grain = std::max<int64_t>(1, kMinParallelValues / ((num_heads + num_kv_heads) * head_dim));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(head_dim), rotated(head_dim);
    for (int64_t t = begin; t < end; ++t) {
      const float* c = rope.cos.data() + t * head_dim;
      const float* s = rope.sin.data() + t * head_dim;
      for (int64_t h = 0; h < num_heads; ++h) {
        const scalar_t* src = q_in + (t * num_heads + h) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) x[i] = static_cast<float>(src[i]);
        norm_and_rope(x.data(), rope.q_weight.data(), c, s, head_dim, eps, rotated.data());
        float* dst = q_out + layout.offset(t, h);
        for (int64_t i = 0; i < head_dim; ++i) dst[paired ? paired_index(i) : i] = rotated[i] * scale;
      }
      if (slots[t] < 0) continue;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const int64_t src_offset = (t * num_kv_heads + h) * head_dim;
        const int64_t dst_offset =
            slots[t] / block_size * block_stride + ((slots[t] % block_size) * num_kv_heads + h) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) x[i] = static_cast<float>(k_in[src_offset + i]);
        norm_and_rope(x.data(), rope.k_weight.data(), c, s, head_dim, eps, rotated.data());
        for (int64_t i = 0; i < head_dim; ++i) {
          k_slots[dst_offset + i] = to_cache<cache_t>(rotated[i] / plan.k_scale);
          v_slots[dst_offset + i] = to_cache<cache_t>(static_cast<float>(v_in[src_offset + i]) / plan.v_scale);
        }
      }
    }
  });
}

// Pass 3, per (new token, query head): out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c over the row's
// chunks (those past the token's own context index hold m = -inf, l = 0 and weigh 0). acc_c comes times
// sum_scale(l_c); each chunk's factor is computed first, so that no partial sum exceeds the largest V. The partial
// outputs are in paired order if `paired`.
template <typename scalar_t>
void merge_chunks(const AttentionProblem& p, const QueryLayout& layout, float v_scale, bool paired, at::Tensor& out) {
  const int64_t group = p.group(), head_dim = p.head_dim, tokens = p.query_start[p.batch];
  scalar_t* dst = out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kMinParallelValues / (head_dim * p.num_chunks));
  at::parallel_for(0, tokens * p.num_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(head_dim), chunk_weights(p.num_chunks);
    for (int64_t th = begin; th < end; ++th) {
      const int64_t t = th / p.num_heads, h = th % p.num_heads;
      const int64_t b = layout.row_of[t];
      const int64_t query = layout.index_in_row[t] * group + h % group;
      const int64_t chunks = (p.seq_lens[b] + p.chunk_len - 1) / p.chunk_len;
      float global_max = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c)
        global_max = std::max(global_max, p.partial_max[p.partial_index(b, h / group, c) + query]);
      float denominator = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t partial = p.partial_index(b, h / group, c) + query;
        chunk_weights[c] = std::exp(p.partial_max[partial] - global_max);
        denominator += chunk_weights[c] * p.partial_sum[partial];
      }
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t partial = p.partial_index(b, h / group, c) + query;
        const float weight = chunk_weights[c] / denominator / sum_scale(p.partial_sum[partial]);
        const float* acc = p.partial_out + partial * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) merged[i] += weight * acc[i];
      }
      // The V read is stored * v_scale: scale the weighted mean once instead of every V element.
      for (int64_t i = 0; i < head_dim; ++i)
        dst[th * head_dim + i] = static_cast<scalar_t>(merged[paired ? paired_index(i) : i] * v_scale);
    }
  });
}

// Both ops: fa_fused is the case of one new token per row.
at::Tensor attend_cpu(const FaFusedArgs& args, at::Tensor& k_cache, at::Tensor& v_cache, double eps,
                      std::optional<double> scale) {
  const IndexPlan plan = validate(args);
  const at::Tensor &q = args.q, &k = args.k, &v = args.v;
  const int64_t tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t batch = args.seq_lens.size(0), num_kv_heads = k.size(1), block_size = k_cache.size(1);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  if (tokens == 0) return out;
  const CpuSwitches switches = cpu_switches();
  const at::Tensor lens = args.seq_lens.contiguous();
  // The kernel walks a row's blocks with unit stride. A table with another column stride (a transposed
  // view) is compacted to the columns the rows use, never copied whole.
  const int64_t used_columns = (plan.max_len + block_size - 1) / block_size;
  const at::Tensor& block_table = args.block_table;
  const at::Tensor table =
      block_table.stride(1) == 1 ? block_table : block_table.narrow(1, 0, used_columns).contiguous();

  AttentionProblem problem{};
  problem.batch = batch;
  problem.num_heads = num_heads;
  problem.num_kv_heads = num_kv_heads;
  problem.head_dim = head_dim;
  problem.block_size = block_size;
  problem.block_stride = k_cache.stride(0);
  problem.block_table_stride = table.stride(0);
  problem.query_start = plan.query_start.data();
  problem.max_queries = plan.max_queries;
  problem.chunk_len = choose_chunk_len(batch, plan.max_len, switches.forced_chunk_tokens);
  problem.num_chunks = (plan.max_len + problem.chunk_len - 1) / problem.chunk_len;
  const int64_t items = problem.num_items();
  const int64_t partials = problem.num_partials();
  const QueryLayout layout(plan.query_start, num_heads, problem.group(), head_dim);

  // One fp32 buffer for the prepared q and the chunks' partial results.
  const int64_t q_floats = tokens * num_heads * head_dim;
  at::Tensor workspace =
      at::empty({q_floats + partials * (head_dim + 2) + kFloatsPerCacheLine}, q.options().dtype(at::kFloat));
  // at::empty aligns to 64 bytes on the CPU; align again in case an allocator does not.
  float* base = workspace.data_ptr<float>();
  base += (kFloatsPerCacheLine - reinterpret_cast<uintptr_t>(base) / sizeof(float) % kFloatsPerCacheLine) %
          kFloatsPerCacheLine;
  float* q_prepared = base;
  problem.partial_out = q_prepared + q_floats;
  problem.partial_max = problem.partial_out + partials * head_dim;
  problem.partial_sum = problem.partial_max + partials;

  // The K read is stored * k_scale: fold it into q's pre-scale instead of every K element.
  const float softmax_scale =
      (scale ? static_cast<float>(*scale) : 1.f / std::sqrt(static_cast<float>(head_dim))) * plan.k_scale;
  const RopeInputs rope =
      gather_rope_inputs(args.q_norm_weight, args.k_norm_weight, args.cos, args.sin, plan.positions, head_dim);
  const at::Tensor q_in = q.contiguous(), k_in = k.contiguous(), v_in = v.contiguous();
  const CacheDtype cache_dtype = *cache_dtype_of(k_cache.scalar_type());  // validated
  const AttentionKernel& kernel = kernel_for(switches, cache_dtype);
  const bool paired = kernel.pairs(cache_dtype);
  // Everything is checked: from here on the caches get written.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fa_fused_prepare", [&] {
    using q_t = scalar_t;
    AT_DISPATCH_V2(k_cache.scalar_type(), "fa_fused_write", AT_WRAP([&] {
                     prepare_and_write<q_t, scalar_t>(q_in, k_in, v_in, rope, plan, layout, softmax_scale,
                                                      static_cast<float>(eps), paired, k_cache, v_cache, q_prepared);
                   }),
                   at::kFloat, at::kHalf, at::kBFloat16, at::kFloat8_e4m3fn, at::kFloat8_e5m2);
  });

  problem.q = q_prepared;
  problem.k_cache = k_cache.const_data_ptr();
  problem.v_cache = v_cache.const_data_ptr();
  problem.cache_dtype = cache_dtype;
  problem.block_table = table.const_data_ptr<int32_t>();
  problem.seq_lens = lens.const_data_ptr<int32_t>();
  // Short contexts: all items on the calling thread (waking the pool costs more than it saves).
  const int64_t work = plan.total_len * num_kv_heads * head_dim * std::max<int64_t>(1, plan.max_queries);
  const int64_t grain = work < kMinParallelValues * 16 ? items : 1;
  // Each task allocates its own scratch: a buffer sized from one thread count and indexed by thread ids read
  // later breaks when another thread changes torch's thread count in between (heap corruption).
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(problem.scratch_floats());
    kernel.attend(problem, begin, end, scratch.data());
  });

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fa_fused_merge",
                                  [&] { merge_chunks<scalar_t>(problem, layout, plan.v_scale, paired, out); });
  return out;
}

at::Tensor fa_fused_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_norm_weight,
                        const at::Tensor& k_norm_weight, const at::Tensor& cos, const at::Tensor& sin,
                        at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& block_table,
                        const at::Tensor& seq_lens, const std::optional<at::Tensor>& positions,
                        const std::optional<at::Tensor>& slot_mapping, double eps, std::optional<double> scale,
                        const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  return attend_cpu({q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
                     positions, slot_mapping, nullptr, k_scale ? &*k_scale : nullptr, v_scale ? &*v_scale : nullptr},
                    k_cache, v_cache, eps, scale);
}

at::Tensor fa_fused_varlen_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& q_norm_weight, const at::Tensor& k_norm_weight, const at::Tensor& cos,
                               const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens,
                               const at::Tensor& query_start_loc, const std::optional<at::Tensor>& positions,
                               const std::optional<at::Tensor>& slot_mapping, double eps, std::optional<double> scale,
                               const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  return attend_cpu(
      {q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens, positions,
       slot_mapping, &query_start_loc, k_scale ? &*k_scale : nullptr, v_scale ? &*v_scale : nullptr},
      k_cache, v_cache, eps, scale);
}

// Which kernel a call over a cache of `dtype` takes on this CPU, and how it computes (benchmarks report it).
std::string cpu_attention_path(at::ScalarType dtype) {
  const std::optional<CacheDtype> cache_dtype = cache_dtype_of(dtype);
  TORCH_CHECK_VALUE(cache_dtype, "cpu_attention_path: cache_dtype must be ", cache_dtype_names(), ", got ", dtype);
  const AttentionKernel& kernel = kernel_for(cpu_switches(), *cache_dtype);
  return std::string(kernel.isa) + ": " + kernel.arithmetic +
         (kernel.pairs(*cache_dtype) ? ", bf16 widened in even/odd pairs" : "");
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen, CPU, m) {
  m.impl("fa_fused", &fa_fused_cpu);
  m.impl("fa_fused_varlen", &fa_fused_varlen_cpu);
}

TORCH_LIBRARY_FRAGMENT(qwen, m) {
  // Forgets the CPU kernel's switches (TORCH_QWEN_FUSED_CPU_ISA, TORCH_QWEN_FUSED_KV_CHUNK): the next call
  // reads them again.
  m.def("reload_cpu_switches() -> ()", &reload_cpu_switches);
  m.def("cpu_attention_path(ScalarType cache_dtype) -> str", &cpu_attention_path);
}

}  // namespace qwen_fused
