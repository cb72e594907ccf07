// The argument checks of qwen::fa_fused and qwen::fa_fused_varlen (the contract's "bad input" rules,
// docs/contract.md): the one copy every backend runs. The CPU kernels call validate() themselves; the Python
// backends (eager, pypto replay, NPU) call it through the qwen::fa_fused_check / fa_fused_varlen_check ops; the
// Autograd kernel calls check_no_grad().
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace qwen_fused {

// The tensor arguments of one call, in schema order. fa_fused_varlen has query_start_loc; fa_fused is the
// case of one new token per row.
struct FaFusedArgs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const at::Tensor& q_norm_weight;
  const at::Tensor& k_norm_weight;
  const at::Tensor& cos;
  const at::Tensor& sin;
  const at::Tensor& k_cache;
  const at::Tensor& v_cache;
  const at::Tensor& block_table;
  const at::Tensor& seq_lens;
  const std::optional<at::Tensor>& positions;
  const std::optional<at::Tensor>& slot_mapping;
  const at::Tensor* query_start_loc = nullptr;
  const at::Tensor* k_scale = nullptr;  // fp32, one element (None: 1)
  const at::Tensor* v_scale = nullptr;

  // The op's name, as messages say it.
  const char* op() const { return query_start_loc ? "fa_fused_varlen" : "fa_fused"; }
};

// What the kernels need from the index tensors, read once on the host while checking them.
struct IndexPlan {
  std::vector<int64_t> query_start;  // [batch + 1]: row b's new tokens are [query_start[b], query_start[b + 1])
  std::vector<int64_t> positions;    // [tokens]: RoPE position of each new token
  std::vector<int64_t> slots;        // [tokens]: its cache slot, -1: not written
  int64_t max_len = 0;
  int64_t total_len = 0;               // sum of seq_lens: how much attention work the call has
  int64_t max_queries = 0;             // the most new tokens of one row
  float k_scale = 1.f, v_scale = 1.f;  // the cache stores x / scale and is read as stored * scale
};

// With grad mode on, a tensor that requires grad is refused (RuntimeError naming `name`): the ops are
// inference-only.
void check_no_grad(const char* op, const char* name, const at::Tensor& t);

// Every other check, in this order: shapes, dtypes and devices; the in-place writes (shared memory,
// inference-tensor caches); then the index values (lengths, block ids, query_start_loc, positions, slots,
// duplicate slots). Raises ValueError naming the argument; nothing is written. Index tensors on another device
// are read through a host copy. Returns the plan with positions and slots defaulted (empty for no rows).
IndexPlan validate(const FaFusedArgs& args);

}  // namespace qwen_fused
