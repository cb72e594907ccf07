// The argument checks of qwen::fa_fused (the contract's "bad input" rules, docs/contract.md): the one copy
// every backend runs. The CPU kernel calls validate() itself; the Python backends (eager fallback, pypto
// replay, NPU) call it through the qwen::fa_fused_check op; the Autograd kernel calls check_no_grad().
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace qwen_fused {

// The tensor arguments of one fa_fused call, in schema order.
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
};

// What the kernels need from the index tensors, read once on the host while checking them.
struct IndexPlan {
  std::vector<int64_t> positions;  // RoPE position of each row's new token
  std::vector<int64_t> slots;      // its cache slot, -1: not written
  int64_t max_len = 0;
  int64_t total_len = 0;  // sum of seq_lens: how much attention work the call has
};

// With grad mode on, an input that requires grad is refused (RuntimeError): the op is inference-only.
void check_no_grad(const FaFusedArgs& args);

// Every other check, in this order: shapes, dtypes and devices; the in-place writes (shared memory,
// inference-tensor caches); then the index values (lengths, block ids, positions, slots, duplicate slots).
// Raises ValueError naming the argument; nothing is written. Index tensors on another device are read
// through a host copy. Returns the plan with positions and slots defaulted (empty for B = 0).
IndexPlan validate(const FaFusedArgs& args);

}  // namespace qwen_fused
