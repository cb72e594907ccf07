// The argument checks of qwen::fa_fused and qwen::fa_fused_varlen: see validation.h.
#include "validation.h"

#include "cache_dtype.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <string>
#include <unordered_map>
#include <tuple>
#include <utility>

namespace qwen_fused {
namespace {

constexpr int64_t kMaxHeadDim = 256;

bool is_supported_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

bool is_cache_dtype(at::ScalarType t) { return cache_dtype_of(t).has_value(); }

// Norm weights and RoPE tables are read value by value (float_at), in any of these.
bool is_table_dtype(at::ScalarType t) { return is_supported_dtype(t) || t == at::kDouble; }

std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

// As Python prints it ("torch.bfloat16").
std::string dtype_name(const at::Tensor& t) {
  return "torch." + std::string(c10::getDtypeNames(t.scalar_type()).first);
}

void check_index_tensor(const char* op, const char* name, const at::Tensor& t, int64_t length) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length, op, ": ", name, " must have shape [", length, "], got ",
                    shape_of(t));
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ", name,
                    " must be int64 (or int32), got ", dtype_name(t));
}

using NamedTensor = std::pair<const char*, const at::Tensor*>;

const at::Tensor* optional_ptr(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

// Every tensor argument in schema order, with its name (nullptr: an optional one not given).
std::array<NamedTensor, 16> named_arguments(const FaFusedArgs& a) {
  return {{{"q", &a.q},
           {"k", &a.k},
           {"v", &a.v},
           {"q_norm_weight", &a.q_norm_weight},
           {"k_norm_weight", &a.k_norm_weight},
           {"cos", &a.cos},
           {"sin", &a.sin},
           {"k_cache", &a.k_cache},
           {"v_cache", &a.v_cache},
           {"block_table", &a.block_table},
           {"seq_lens", &a.seq_lens},
           {"query_start_loc", a.query_start_loc},
           {"positions", optional_ptr(a.positions)},
           {"slot_mapping", optional_ptr(a.slot_mapping)},
           {"k_scale", a.k_scale},
           {"v_scale", a.v_scale}}};
}

// Every tensor on one device. The odd one out is named against the device most arguments are on (q's on a tie),
// so that q on another device is named "q", not "k".
void check_one_device(const FaFusedArgs& a) {
  const auto arguments = named_arguments(a);
  auto count_on = [&](const at::Device& device) {
    return std::count_if(arguments.begin(), arguments.end(),
                         [&](const NamedTensor& named) { return named.second && named.second->device() == device; });
  };
  at::Device common = a.q.device();
  for (const auto& [name, t] : arguments) {
    if (t && count_on(t->device()) > count_on(common)) common = t->device();
  }
  for (const auto& [name, t] : arguments) {
    TORCH_CHECK_VALUE(!t || t->device() == common, a.op(), ": ", name,
                      " must be on the device of the other arguments, ", common, ", got ", t->device());
  }
}

// Shapes, dtypes and devices: everything that can be checked without reading values.
void check_shapes(const FaFusedArgs& a) {
  const char* op = a.op();
  const char* rows = a.query_start_loc ? "num_tokens" : "batch";
  const at::Tensor& q = a.q;
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must be 3-D [", rows, ", num_heads, head_dim], got ", q.dim(), "-D shape ",
                    shape_of(q));
  TORCH_CHECK_VALUE(is_supported_dtype(q.scalar_type()), op, ": q must be float32, float16 or bfloat16, got ",
                    dtype_name(q));
  const int64_t tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK_VALUE(head_dim % 16 == 0 && head_dim > 0 && head_dim <= kMaxHeadDim, op,
                    ": q.shape[2] (head_dim) must be a multiple of 16 in [16, ", kMaxHeadDim, "], got ", head_dim);
  TORCH_CHECK_VALUE(a.k.dim() == 3, op, ": k must be 3-D [", rows, ", num_kv_heads, head_dim], got ", a.k.dim(),
                    "-D shape ", shape_of(a.k));
  const int64_t num_kv_heads = a.k.size(1);
  TORCH_CHECK_VALUE(num_kv_heads > 0 && num_heads % num_kv_heads == 0, op, ": num_heads (q.shape[1] = ", num_heads,
                    ") must be a multiple of num_kv_heads (k.shape[1] = ", num_kv_heads, ")");
  for (const auto& [name, t] : {NamedTensor{"k", &a.k}, {"v", &a.v}}) {
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef({tokens, num_kv_heads, head_dim}), op, ": ", name,
                      " must have shape [", tokens, ", ", num_kv_heads, ", ", head_dim, "], got ", shape_of(*t));
    TORCH_CHECK_VALUE(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", dtype_name(q),
                      ", got ", dtype_name(*t));
  }
  for (const auto& [name, t] : {NamedTensor{"q_norm_weight", &a.q_norm_weight}, {"k_norm_weight", &a.k_norm_weight}}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == head_dim, op, ": ", name, " must have shape [", head_dim,
                      "], got ", shape_of(*t));
    TORCH_CHECK_VALUE(is_table_dtype(t->scalar_type()), op, ": ", name,
                      " must be float32, float16, bfloat16 or float64, got ", dtype_name(*t));
  }
  for (const auto& [name, t] : {NamedTensor{"cos", &a.cos}, {"sin", &a.sin}}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(1) == head_dim, op, ": ", name, " must have shape [max_position, ",
                      head_dim, "], got ", shape_of(*t));
    TORCH_CHECK_VALUE(is_table_dtype(t->scalar_type()), op, ": ", name,
                      " must be float32, float16, bfloat16 or float64, got ", dtype_name(*t));
  }
  TORCH_CHECK_VALUE(a.cos.sizes() == a.sin.sizes(), op, ": sin must have cos's shape ", shape_of(a.cos), ", got ",
                    shape_of(a.sin));
  const at::Tensor& k_cache = a.k_cache;
  TORCH_CHECK_VALUE(k_cache.dim() == 4, op, ": k_cache must be 4-D [num_blocks, block_size, num_kv_heads, ",
                    "head_dim], got ", k_cache.dim(), "-D shape ", shape_of(k_cache));
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  TORCH_CHECK_VALUE(num_blocks > 0 && block_size > 0, op, ": k_cache must have num_blocks and block_size >= 1, got ",
                    shape_of(k_cache));
  for (const auto& [name, t] : {NamedTensor{"k_cache", &a.k_cache}, {"v_cache", &a.v_cache}}) {
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef({num_blocks, block_size, num_kv_heads, head_dim}), op, ": ", name,
                      " must have shape [", num_blocks, ", ", block_size, ", ", num_kv_heads, ", ", head_dim, "], got ",
                      shape_of(*t));
    TORCH_CHECK_VALUE(is_cache_dtype(t->scalar_type()), op, ": ", name, " must be ", cache_dtype_names(), ", got ",
                      dtype_name(*t));
    // Each block contiguous, blocks at least a block apart: stride(0) may exceed the block (one layer's pages
    // in a buffer that interleaves layers, or K and V, as HF's continuous-batching cache does).
    const int64_t block_elements = block_size * num_kv_heads * head_dim;
    TORCH_CHECK_VALUE(t->select(0, 0).is_contiguous() && (num_blocks == 1 || t->stride(0) >= block_elements), op, ": ",
                      name, " must hold each block contiguous ([block_size, num_kv_heads, head_dim] row-major) ",
                      "and its blocks at least ", block_elements, " elements apart (stride(0)), got strides ",
                      t->strides());
  }
  TORCH_CHECK_VALUE(num_blocks == 1 || a.v_cache.stride(0) == k_cache.stride(0), op,
                    ": v_cache must have k_cache's block stride (stride(0)) ", k_cache.stride(0), ", got ",
                    a.v_cache.stride(0));
  TORCH_CHECK_VALUE(a.v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache must have k_cache's dtype ",
                    dtype_name(k_cache), ", got ", dtype_name(a.v_cache));
  // fa_fused: one row per token. fa_fused_varlen: the rows are seq_lens's; query_start_loc splits the tokens.
  const int64_t batch = a.query_start_loc ? a.seq_lens.size(0) : tokens;
  TORCH_CHECK_VALUE(a.seq_lens.dim() == 1 && a.seq_lens.size(0) == batch, op, ": seq_lens must have shape [", batch,
                    "], got ", shape_of(a.seq_lens));
  TORCH_CHECK_VALUE(a.seq_lens.scalar_type() == at::kInt, op, ": seq_lens must be int32, got ", dtype_name(a.seq_lens));
  if (a.query_start_loc) {
    const at::Tensor& starts = *a.query_start_loc;
    TORCH_CHECK_VALUE(starts.dim() == 1 && starts.size(0) == batch + 1, op, ": query_start_loc must have shape [",
                      batch + 1, "] (batch + 1), got ", shape_of(starts));
    TORCH_CHECK_VALUE(starts.scalar_type() == at::kInt, op, ": query_start_loc must be int32, got ",
                      dtype_name(starts));
  }
  TORCH_CHECK_VALUE(a.block_table.dim() == 2 && a.block_table.size(0) == batch, op, ": block_table must have shape [",
                    batch, ", max_blocks], got ", shape_of(a.block_table));
  TORCH_CHECK_VALUE(a.block_table.scalar_type() == at::kInt, op, ": block_table must be int32, got ",
                    dtype_name(a.block_table));
  for (const auto& [name, t] : {NamedTensor{"k_scale", a.k_scale}, {"v_scale", a.v_scale}}) {
    TORCH_CHECK_VALUE(!t || (t->numel() == 1 && t->scalar_type() == at::kFloat), op, ": ", name,
                      " must be a float32 tensor of one element (the layer's scale), got shape ", shape_of(*t), " and ",
                      dtype_name(*t));
  }
  if (a.positions) check_index_tensor(op, "positions", *a.positions, tokens);
  if (a.slot_mapping) check_index_tensor(op, "slot_mapping", *a.slot_mapping, tokens);
  check_one_device(a);
}

// Whether the bytes two tensors can reach intersect (conservative for strided tensors: their whole span). Meta
// tensors have no bytes.
bool spans_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.is_meta() || b.is_meta()) return false;
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

// Whether a block of `a` and a block of `b` share a byte: the call reads and writes the caches' blocks only, so
// two caches interleaved in one buffer (HF's K and V pages, a page apart) do not overlap although their spans do.
// Both have the same shape, dtype and block stride (checked before). Block i of a starts at i * stride, block j of b
// at d + j * stride (d: b's start minus a's); they overlap iff |d + m * stride| < extent for m = j - i in
// [-(n - 1), n - 1]. That distance is convex in m, so the m nearest -d / stride (clamped) decide.
bool blocks_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_meta() || b.is_meta()) return false;  // no bytes
  const int64_t n = a.size(0);
  const int64_t stride = a.stride(0) * a.element_size();
  const int64_t extent = a.select(0, 0).numel() * a.element_size();
  const int64_t d = static_cast<const char*>(b.const_data_ptr()) - static_cast<const char*>(a.const_data_ptr());
  if (n == 1) return std::llabs(d) < extent;
  const int64_t below = d >= 0 ? -((d + stride - 1) / stride) : (-d) / stride;  // floor(-d / stride)
  for (const int64_t m : {below, below + 1}) {
    if (std::llabs(d + std::clamp<int64_t>(m, -(n - 1), n - 1) * stride) < extent) return true;
  }
  return false;
}

// The caches are written in place: a call whose result would depend on the order of the writes and reads,
// or that torch would not let write them, is refused.
void check_writes(const FaFusedArgs& a) {
  const char* op = a.op();
  const NamedTensor caches[] = {{"k_cache", &a.k_cache}, {"v_cache", &a.v_cache}};
  for (const auto& [name, cache] : caches) {
    TORCH_CHECK_VALUE(c10::InferenceMode::is_enabled() || !cache->is_inference(), op, ": ", name,
                      " is an inference tensor (created under torch.inference_mode()) and is written in place: call ",
                      op, " inside torch.inference_mode() too, or create the cache outside it");
  }
  TORCH_CHECK_VALUE(!blocks_overlap(a.k_cache, a.v_cache), op,
                    ": v_cache shares memory with k_cache; both are written in place, so their blocks must not "
                    "overlap");
  for (const auto& [name, t] : named_arguments(a)) {
    if (t == &a.k_cache || t == &a.v_cache) continue;
    for (const auto& [cache_name, cache] : caches) {
      TORCH_CHECK_VALUE(!t || !spans_overlap(*t, *cache), op, ": ", name, " overlaps ", cache_name,
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

// Index tensors of a call, read on the host (CPU tensors of checked shapes, any strides).
struct HostIndices {
  at::Tensor block_table, seq_lens;
  std::optional<at::Tensor> query_start_loc, positions, slot_mapping;
};

// Index ranges read from the tensors, then the defaults of positions and slot_mapping.
IndexPlan check_values(const char* op, const HostIndices& in, int64_t tokens, int64_t num_blocks, int64_t block_size,
                       int64_t max_position) {
  const int64_t batch = in.seq_lens.size(0), max_blocks = in.block_table.size(1);
  std::vector<int64_t> lens(batch);
  for (int64_t b = 0; b < batch; ++b) lens[b] = index_at(in.seq_lens, b);
  IndexPlan plan;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 1, op, ": seq_lens[", b, "] must be >= 1 (it counts the new token), got ", lens[b]);
    plan.max_len = std::max<int64_t>(plan.max_len, lens[b]);
    plan.total_len += lens[b];
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t needed = (lens[b] + block_size - 1) / block_size;
    TORCH_CHECK_VALUE(needed <= max_blocks, op, ": seq_lens[", b, "] = ", lens[b], " needs ", needed, " blocks of ",
                      block_size, ", but block_table has ", max_blocks, " columns");
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t needed = (lens[b] + block_size - 1) / block_size;
    for (int64_t j = 0; j < needed; ++j) {
      const int32_t block = table_at(in.block_table, b, j);
      TORCH_CHECK_VALUE(block >= 0 && block < num_blocks, op, ": block_table[", b, ", ", j, "] = ", block,
                        " is outside the cache's blocks [0, ", num_blocks, ")");
    }
  }
  // Row b's new tokens are tokens [query_start[b], query_start[b + 1]), the last ones of its context.
  plan.query_start.resize(batch + 1);
  for (int64_t b = 0; b <= batch; ++b) plan.query_start[b] = in.query_start_loc ? index_at(*in.query_start_loc, b) : b;
  if (in.query_start_loc) {
    TORCH_CHECK_VALUE(plan.query_start[0] == 0, op, ": query_start_loc[0] must be 0, got ", plan.query_start[0]);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t count = plan.query_start[b + 1] - plan.query_start[b];
      TORCH_CHECK_VALUE(count >= 0, op, ": query_start_loc must be non-decreasing, but query_start_loc[", b + 1,
                        "] = ", plan.query_start[b + 1], " < query_start_loc[", b, "] = ", plan.query_start[b]);
      TORCH_CHECK_VALUE(count <= lens[b], op, ": row ", b, " has ", count, " new tokens (query_start_loc[", b + 1,
                        "] - query_start_loc[", b, "]) but seq_lens[", b, "] = ", lens[b],
                        " (the new tokens are the last of its context)");
    }
    TORCH_CHECK_VALUE(plan.query_start[batch] == tokens, op, ": query_start_loc[", batch,
                      "] = ", plan.query_start[batch], " must equal the number of tokens q.shape[0] = ", tokens);
  }
  for (int64_t b = 0; b < batch; ++b) {
    plan.max_queries = std::max(plan.max_queries, plan.query_start[b + 1] - plan.query_start[b]);
  }
  // The context index of token t (row b, i-th new token): seq_lens[b] - n_b + i.
  std::vector<int64_t> context_index(tokens), row_of(tokens);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t first = plan.query_start[b], count = plan.query_start[b + 1] - first;
    for (int64_t i = 0; i < count; ++i) {
      context_index[first + i] = lens[b] - count + i;
      row_of[first + i] = b;
    }
  }
  const char* unit = in.query_start_loc ? "token" : "row";
  plan.positions.resize(tokens);
  for (int64_t t = 0; t < tokens; ++t) {
    if (in.positions) {
      plan.positions[t] = index_at(*in.positions, t);
      TORCH_CHECK_VALUE(plan.positions[t] >= 0 && plan.positions[t] < max_position, op, ": positions[", t,
                        "] = ", plan.positions[t], " is outside the cos/sin table [0, ", max_position, ")");
    } else {
      plan.positions[t] = context_index[t];
      TORCH_CHECK_VALUE(plan.positions[t] < max_position, op, ": the default position of ", unit, " ", t,
                        " (its context index) = ", plan.positions[t], " is outside the cos/sin table [0, ",
                        max_position, ")");
    }
  }
  plan.slots.resize(tokens);
  for (int64_t t = 0; t < tokens; ++t) {
    if (in.slot_mapping) {
      plan.slots[t] = index_at(*in.slot_mapping, t);
      TORCH_CHECK_VALUE(plan.slots[t] >= -1 && plan.slots[t] < num_blocks * block_size, op, ": slot_mapping[", t,
                        "] = ", plan.slots[t], " is outside the cache's slots [0, ", num_blocks * block_size,
                        ") (or -1 to skip the write)");
    } else {
      const int64_t c = context_index[t];
      plan.slots[t] = table_at(in.block_table, row_of[t], c / block_size) * block_size + c % block_size;
    }
  }
  // Two tokens writing one slot: which value stays would depend on the kernel's order.
  std::unordered_map<int64_t, int64_t> writer_of_slot;
  for (int64_t t = 0; t < tokens; ++t) {
    if (plan.slots[t] < 0) continue;
    const auto [earlier, inserted] = writer_of_slot.emplace(plan.slots[t], t);
    if (inserted) continue;
    if (in.slot_mapping) {
      TORCH_CHECK_VALUE(false, op, ": slot_mapping[", t, "] = ", plan.slots[t], " is also the slot of ", unit, " ",
                        earlier->second, "; two ", unit, "s cannot write the same cache slot");
    }
    TORCH_CHECK_VALUE(false, op, ": the default slot of ", unit, " ", t,
                      " (its context index through block_table) = ", plan.slots[t], " is also the slot of ", unit, " ",
                      earlier->second, "; two ", unit, "s cannot write the same cache slot");
  }
  return plan;
}

}  // namespace

void check_no_grad(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(!(c10::GradMode::is_enabled() && t.requires_grad()), op, ": ", name, " requires grad, but ", op,
              " is inference-only (it has no backward): call it under torch.no_grad() or torch.inference_mode(), "
              "or pass detached tensors");
}

IndexPlan validate(const FaFusedArgs& a) {
  check_shapes(a);
  check_writes(a);
  // The devices agree (check_shapes): one check covers every index tensor.
  TORCH_CHECK_VALUE(!a.seq_lens.is_meta(), a.op(),
                    ": the tensors are on the meta device, which holds no values, but the checks read the index "
                    "tensors' values (lengths, block ids, positions, slots); torch.ops.qwen.",
                    a.op(), " on meta tensors gives the output's shape");
  auto on_host = [](const at::Tensor& t) { return t.device().is_cpu() ? t : t.to(at::kCPU); };
  auto optional_on_host = [&](const at::Tensor* t) {
    return t ? std::optional<at::Tensor>(on_host(*t)) : std::nullopt;
  };
  const HostIndices host{on_host(a.block_table), on_host(a.seq_lens), optional_on_host(a.query_start_loc),
                         optional_on_host(optional_ptr(a.positions)), optional_on_host(optional_ptr(a.slot_mapping))};
  IndexPlan plan = check_values(a.op(), host, a.q.size(0), a.k_cache.size(0), a.k_cache.size(1), a.cos.size(0));
  for (const auto& [name, t, value] :
       {std::tuple{"k_scale", a.k_scale, &plan.k_scale}, std::tuple{"v_scale", a.v_scale, &plan.v_scale}}) {
    if (!t) continue;
    *value = on_host(*t).item<float>();
    TORCH_CHECK_VALUE(std::isfinite(*value) && *value > 0.f, a.op(), ": ", name, " must be finite and > 0, got ",
                      *value);
  }
  return plan;
}

namespace {

// As the Autograd kernel (inference_only.cpp) checks every tensor argument of the op.
void check_no_grad_of(const FaFusedArgs& a) {
  for (const auto& [name, t] : named_arguments(a)) {
    if (t) check_no_grad(a.op(), name, *t);
  }
}

// qwen::fa_fused_check and qwen::fa_fused_varlen_check: validate() for the backends written in Python, on any
// device.
void fa_fused_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_norm_weight,
                    const at::Tensor& k_norm_weight, const at::Tensor& cos, const at::Tensor& sin,
                    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_table,
                    const at::Tensor& seq_lens, const std::optional<at::Tensor>& positions,
                    const std::optional<at::Tensor>& slot_mapping, const std::optional<at::Tensor>& k_scale,
                    const std::optional<at::Tensor>& v_scale) {
  const FaFusedArgs args{q,
                         k,
                         v,
                         q_norm_weight,
                         k_norm_weight,
                         cos,
                         sin,
                         k_cache,
                         v_cache,
                         block_table,
                         seq_lens,
                         positions,
                         slot_mapping,
                         nullptr,
                         optional_ptr(k_scale),
                         optional_ptr(v_scale)};
  check_no_grad_of(args);
  validate(args);
}

void fa_fused_varlen_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& q_norm_weight, const at::Tensor& k_norm_weight, const at::Tensor& cos,
                           const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                           const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& slot_mapping,
                           const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  const FaFusedArgs args{q,
                         k,
                         v,
                         q_norm_weight,
                         k_norm_weight,
                         cos,
                         sin,
                         k_cache,
                         v_cache,
                         block_table,
                         seq_lens,
                         positions,
                         slot_mapping,
                         &query_start_loc,
                         optional_ptr(k_scale),
                         optional_ptr(v_scale)};
  check_no_grad_of(args);
  validate(args);
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen, CompositeExplicitAutograd, m) {
  m.impl("fa_fused_check", &fa_fused_check);
  m.impl("fa_fused_varlen_check", &fa_fused_varlen_check);
}

}  // namespace qwen_fused
