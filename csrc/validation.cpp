// The argument checks of qwen::fa_fused: see validation.h.
#include "validation.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <unordered_map>
#include <utility>

namespace qwen_fused {
namespace {

constexpr int64_t kMaxHeadDim = 256;

bool is_supported_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// Norm weights and RoPE tables are read value by value (float_at), in any of these.
bool is_table_dtype(at::ScalarType t) { return is_supported_dtype(t) || t == at::kDouble; }

std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

// As Python prints it ("torch.bfloat16").
std::string dtype_name(const at::Tensor& t) {
  return "torch." + std::string(c10::getDtypeNames(t.scalar_type()).first);
}

void check_index_tensor(const char* name, const at::Tensor& t, int64_t batch) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, "fa_fused: ", name, " must have shape [", batch, "], got ",
                    shape_of(t));
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "fa_fused: ", name,
                    " must be int64 (or int32), got ", dtype_name(t));
}

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// Shapes, dtypes and devices: everything that can be checked without reading values.
void check_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_norm_weight,
                  const at::Tensor& k_norm_weight, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
                  const at::Tensor& seq_lens, const std::optional<at::Tensor>& positions,
                  const std::optional<at::Tensor>& slot_mapping) {
  TORCH_CHECK_VALUE(q.dim() == 3, "fa_fused: q must be 3-D [batch, num_heads, head_dim], got ", q.dim(), "-D shape ",
                    shape_of(q));
  TORCH_CHECK_VALUE(is_supported_dtype(q.scalar_type()), "fa_fused: q must be float32, float16 or bfloat16, got ",
                    dtype_name(q));
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK_VALUE(head_dim % 16 == 0 && head_dim > 0 && head_dim <= kMaxHeadDim,
                    "fa_fused: q.shape[2] (head_dim) must be a multiple of 16 in [16, ", kMaxHeadDim, "], got ",
                    head_dim);
  TORCH_CHECK_VALUE(k.dim() == 3, "fa_fused: k must be 3-D [batch, num_kv_heads, head_dim], got ", k.dim(), "-D shape ",
                    shape_of(k));
  const int64_t num_kv_heads = k.size(1);
  TORCH_CHECK_VALUE(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "fa_fused: num_heads (q.shape[1] = ", num_heads,
                    ") must be a multiple of num_kv_heads (k.shape[1] = ", num_kv_heads, ")");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef({batch, num_kv_heads, head_dim}), "fa_fused: ", name,
                      " must have shape [", batch, ", ", num_kv_heads, ", ", head_dim, "], got ", shape_of(t));
    TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), "fa_fused: ", name, " must have q's dtype ", dtype_name(q),
                      ", got ", dtype_name(t));
  }
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"q_norm_weight", q_norm_weight}, {"k_norm_weight", k_norm_weight}}) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == head_dim, "fa_fused: ", name, " must have shape [", head_dim,
                      "], got ", shape_of(t));
    TORCH_CHECK_VALUE(is_table_dtype(t.scalar_type()), "fa_fused: ", name,
                      " must be float32, float16, bfloat16 or float64, got ", dtype_name(t));
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == head_dim, "fa_fused: ", name, " must have shape [max_position, ",
                      head_dim, "], got ", shape_of(t));
    TORCH_CHECK_VALUE(is_table_dtype(t.scalar_type()), "fa_fused: ", name,
                      " must be float32, float16, bfloat16 or float64, got ", dtype_name(t));
  }
  TORCH_CHECK_VALUE(cos.sizes() == sin.sizes(), "fa_fused: sin must have cos's shape ", shape_of(cos), ", got ",
                    shape_of(sin));
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "fa_fused: k_cache must be 4-D [num_blocks, block_size, num_kv_heads, ",
                    "head_dim], got ", k_cache.dim(), "-D shape ", shape_of(k_cache));
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  TORCH_CHECK_VALUE(num_blocks > 0 && block_size > 0,
                    "fa_fused: k_cache must have num_blocks and block_size >= 1, got ", shape_of(k_cache));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k_cache", k_cache}, {"v_cache", v_cache}}) {
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef({num_blocks, block_size, num_kv_heads, head_dim}),
                      "fa_fused: ", name, " must have shape [", num_blocks, ", ", block_size, ", ", num_kv_heads, ", ",
                      head_dim, "], got ", shape_of(t));
    TORCH_CHECK_VALUE(is_supported_dtype(t.scalar_type()), "fa_fused: ", name,
                      " must be float32, float16 or bfloat16, got ", dtype_name(t));
    TORCH_CHECK_VALUE(t.is_contiguous(), "fa_fused: ", name,
                      " must be contiguous (it is written in place), got strides ", t.strides());
  }
  TORCH_CHECK_VALUE(v_cache.scalar_type() == k_cache.scalar_type(), "fa_fused: v_cache must have k_cache's dtype ",
                    dtype_name(k_cache), ", got ", dtype_name(v_cache));
  TORCH_CHECK_VALUE(block_table.dim() == 2 && block_table.size(0) == batch, "fa_fused: block_table must have shape [",
                    batch, ", max_blocks], got ", shape_of(block_table));
  TORCH_CHECK_VALUE(block_table.scalar_type() == at::kInt, "fa_fused: block_table must be int32, got ",
                    dtype_name(block_table));
  TORCH_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.size(0) == batch, "fa_fused: seq_lens must have shape [", batch,
                    "], got ", shape_of(seq_lens));
  TORCH_CHECK_VALUE(seq_lens.scalar_type() == at::kInt, "fa_fused: seq_lens must be int32, got ", dtype_name(seq_lens));
  if (positions) check_index_tensor("positions", *positions, batch);
  if (slot_mapping) check_index_tensor("slot_mapping", *slot_mapping, batch);
  const NamedTensor named[] = {{"k", &k},
                               {"v", &v},
                               {"q_norm_weight", &q_norm_weight},
                               {"k_norm_weight", &k_norm_weight},
                               {"cos", &cos},
                               {"sin", &sin},
                               {"k_cache", &k_cache},
                               {"v_cache", &v_cache},
                               {"block_table", &block_table},
                               {"seq_lens", &seq_lens},
                               {"positions", positions ? &*positions : nullptr},
                               {"slot_mapping", slot_mapping ? &*slot_mapping : nullptr}};
  for (const auto& [name, t] : named) {
    if (t) {
      TORCH_CHECK_VALUE(t->device() == q.device(), "fa_fused: ", name, " must be on q's device ", q.device(), ", got ",
                        t->device());
    }
  }
}

// Whether the bytes two tensors can reach intersect (conservative for strided tensors: their whole span).
bool spans_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* begin = static_cast<const char*>(t.const_data_ptr());
    return std::pair(begin, begin + (last + 1) * t.element_size());
  };
  const auto [a_begin, a_end] = span(a);
  const auto [b_begin, b_end] = span(b);
  return a_begin < b_end && b_begin < a_end;
}

// The caches are written in place: a call whose result would depend on the order of the writes and reads,
// or that torch would not let write them, is refused.
void check_writes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_norm_weight,
                  const at::Tensor& k_norm_weight, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
                  const at::Tensor& seq_lens, const std::optional<at::Tensor>& positions,
                  const std::optional<at::Tensor>& slot_mapping) {
  const NamedTensor caches[] = {{"k_cache", &k_cache}, {"v_cache", &v_cache}};
  for (const auto& [name, cache] : caches) {
    TORCH_CHECK_VALUE(c10::InferenceMode::is_enabled() || !cache->is_inference(), "fa_fused: ", name,
                      " is an inference tensor (created under torch.inference_mode()) and is written in place: call "
                      "fa_fused inside torch.inference_mode() too, or create the cache outside it");
  }
  TORCH_CHECK_VALUE(
      !spans_overlap(k_cache, v_cache),
      "fa_fused: v_cache shares memory with k_cache; both are written in place, so they must not overlap");
  const NamedTensor inputs[] = {{"q", &q},
                                {"k", &k},
                                {"v", &v},
                                {"q_norm_weight", &q_norm_weight},
                                {"k_norm_weight", &k_norm_weight},
                                {"cos", &cos},
                                {"sin", &sin},
                                {"block_table", &block_table},
                                {"seq_lens", &seq_lens},
                                {"positions", positions ? &*positions : nullptr},
                                {"slot_mapping", slot_mapping ? &*slot_mapping : nullptr}};
  for (const auto& [name, t] : inputs) {
    for (const auto& [cache_name, cache] : caches) {
      TORCH_CHECK_VALUE(!t || !spans_overlap(*t, *cache), "fa_fused: ", name, " overlaps ", cache_name,
                        ", which is written in place; pass a copy");
    }
  }
}

// Element i of a 1-D int32 or int64 tensor of any stride.
int64_t index_at(const at::Tensor& t, int64_t i) {
  const int64_t offset = i * t.stride(0);
  return t.scalar_type() == at::kLong ? t.const_data_ptr<int64_t>()[offset] : t.const_data_ptr<int32_t>()[offset];
}

// block_table[b, j] of a table of any strides.
int32_t table_at(const at::Tensor& table, int64_t b, int64_t j) {
  return table.const_data_ptr<int32_t>()[b * table.stride(0) + j * table.stride(1)];
}

// Index ranges read from the tensors, then the defaults of positions and slot_mapping. Inputs are CPU
// tensors of checked shapes, any strides.
IndexPlan check_values(const at::Tensor& block_table, const at::Tensor& seq_lens,
                       const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& slot_mapping,
                       int64_t num_blocks, int64_t block_size, int64_t max_position) {
  const int64_t batch = seq_lens.size(0), max_blocks = block_table.size(1);
  std::vector<int64_t> lens(batch);
  for (int64_t b = 0; b < batch; ++b) lens[b] = index_at(seq_lens, b);
  IndexPlan plan;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 1, "fa_fused: seq_lens[", b, "] must be >= 1 (it counts the new token), got ",
                      lens[b]);
    plan.max_len = std::max<int64_t>(plan.max_len, lens[b]);
    plan.total_len += lens[b];
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t needed = (lens[b] + block_size - 1) / block_size;
    TORCH_CHECK_VALUE(needed <= max_blocks, "fa_fused: seq_lens[", b, "] = ", lens[b], " needs ", needed, " blocks of ",
                      block_size, ", but block_table has ", max_blocks, " columns");
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t needed = (lens[b] + block_size - 1) / block_size;
    for (int64_t j = 0; j < needed; ++j) {
      const int32_t block = table_at(block_table, b, j);
      TORCH_CHECK_VALUE(block >= 0 && block < num_blocks, "fa_fused: block_table[", b, ", ", j, "] = ", block,
                        " is outside the cache's blocks [0, ", num_blocks, ")");
    }
  }
  plan.positions.resize(batch);
  for (int64_t b = 0; b < batch; ++b) {
    if (positions) {
      plan.positions[b] = index_at(*positions, b);
      TORCH_CHECK_VALUE(plan.positions[b] >= 0 && plan.positions[b] < max_position, "fa_fused: positions[", b,
                        "] = ", plan.positions[b], " is outside the cos/sin table [0, ", max_position, ")");
    } else {
      plan.positions[b] = lens[b] - 1;
      TORCH_CHECK_VALUE(plan.positions[b] < max_position, "fa_fused: default position seq_lens[", b,
                        "] - 1 = ", plan.positions[b], " is outside the cos/sin table [0, ", max_position, ")");
    }
  }
  plan.slots.resize(batch);
  for (int64_t b = 0; b < batch; ++b) {
    if (slot_mapping) {
      plan.slots[b] = index_at(*slot_mapping, b);
      TORCH_CHECK_VALUE(plan.slots[b] >= -1 && plan.slots[b] < num_blocks * block_size, "fa_fused: slot_mapping[", b,
                        "] = ", plan.slots[b], " is outside the cache's slots [0, ", num_blocks * block_size,
                        ") (or -1 to skip the write)");
    } else {
      const int64_t last = lens[b] - 1;
      plan.slots[b] = table_at(block_table, b, last / block_size) * block_size + last % block_size;
    }
  }
  // Two rows writing one slot: which value stays would depend on the kernel's order.
  std::unordered_map<int64_t, int64_t> writer_of_slot;
  for (int64_t b = 0; b < batch; ++b) {
    if (plan.slots[b] < 0) continue;
    const auto [earlier, inserted] = writer_of_slot.emplace(plan.slots[b], b);
    if (inserted) continue;
    if (slot_mapping) {
      TORCH_CHECK_VALUE(false, "fa_fused: slot_mapping[", b, "] = ", plan.slots[b], " is also the slot of row ",
                        earlier->second, "; two rows cannot write the same cache slot");
    }
    TORCH_CHECK_VALUE(false, "fa_fused: the default slot of row ", b, " (token seq_lens[", b,
                      "] - 1 through block_table) = ", plan.slots[b], " is also the slot of row ", earlier->second,
                      "; two rows cannot write the same cache slot");
  }
  return plan;
}

}  // namespace

void check_no_grad(const FaFusedArgs& a) {
  if (!c10::GradMode::is_enabled()) return;
  const NamedTensor differentiable[] = {{"q", &a.q},
                                        {"k", &a.k},
                                        {"v", &a.v},
                                        {"q_norm_weight", &a.q_norm_weight},
                                        {"k_norm_weight", &a.k_norm_weight},
                                        {"cos", &a.cos},
                                        {"sin", &a.sin},
                                        {"k_cache", &a.k_cache},
                                        {"v_cache", &a.v_cache}};
  for (const auto& [name, t] : differentiable) {
    TORCH_CHECK(!t->requires_grad(), "fa_fused: ", name,
                " requires grad, but fa_fused is inference-only (it has no backward): call it under "
                "torch.no_grad() or torch.inference_mode(), or pass detached tensors");
  }
}

IndexPlan validate(const FaFusedArgs& a) {
  check_shapes(a.q, a.k, a.v, a.q_norm_weight, a.k_norm_weight, a.cos, a.sin, a.k_cache, a.v_cache, a.block_table,
               a.seq_lens, a.positions, a.slot_mapping);
  check_writes(a.q, a.k, a.v, a.q_norm_weight, a.k_norm_weight, a.cos, a.sin, a.k_cache, a.v_cache, a.block_table,
               a.seq_lens, a.positions, a.slot_mapping);
  if (a.q.size(0) == 0) return {};
  auto on_host = [](const at::Tensor& t) { return t.device().is_cpu() ? t : t.to(at::kCPU); };
  auto optional_on_host = [&](const std::optional<at::Tensor>& t) {
    return t ? std::optional<at::Tensor>(on_host(*t)) : std::nullopt;
  };
  return check_values(on_host(a.block_table), on_host(a.seq_lens), optional_on_host(a.positions),
                      optional_on_host(a.slot_mapping), a.k_cache.size(0), a.k_cache.size(1), a.cos.size(0));
}

namespace {

// qwen::fa_fused_check: validate() for the backends written in Python, on any device.
void fa_fused_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_norm_weight,
                    const at::Tensor& k_norm_weight, const at::Tensor& cos, const at::Tensor& sin,
                    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
                    const at::Tensor& seq_lens, const std::optional<at::Tensor>& positions,
                    const std::optional<at::Tensor>& slot_mapping) {
  const FaFusedArgs args{q,       k,       v,           q_norm_weight, k_norm_weight, cos,         sin,
                         k_cache, v_cache, block_table, seq_lens,      positions,     slot_mapping};
  check_no_grad(args);
  validate(args);
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen, CompositeExplicitAutograd, m) { m.impl("fa_fused_check", &fa_fused_check); }

}  // namespace qwen_fused
