// The Autograd and ADInplaceOrView kernels of qwen::fa_fused, for every device. The op is inference-only
// (it has no backward), and its cache writes are in-place updates that autograd must see.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <utility>

#include "validation.h"

namespace qwen_fused {
namespace {

using FaFusedFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&, double, std::optional<double>);

const c10::TypedOperatorHandle<FaFusedFn>& fa_fused_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qwen::fa_fused", "").typed<FaFusedFn>();
  return op;
}

// With grad mode on, an input that requires grad would get an output whose backward silently leaves its
// gradient None: refuse instead.
at::Tensor fa_fused_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& q_norm_weight, const at::Tensor& k_norm_weight, const at::Tensor& cos,
                             const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                             const at::Tensor& block_table, const at::Tensor& seq_lens,
                             const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& slot_mapping,
                             double eps, std::optional<double> scale) {
  check_no_grad({q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens, positions,
                 slot_mapping});
  at::AutoDispatchBelowAutograd guard;
  return fa_fused_op().call(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
                            positions, slot_mapping, eps, scale);
}

// The caches are updated in place: bump their version counters, as every in-place torch op does, so that
// autograd refuses a tensor it saved before the update instead of using the overwritten values.
at::Tensor fa_fused_inplace_or_view(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& q_norm_weight, const at::Tensor& k_norm_weight,
                                    const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                                    at::Tensor& v_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                                    const std::optional<at::Tensor>& positions,
                                    const std::optional<at::Tensor>& slot_mapping, double eps,
                                    std::optional<double> scale) {
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = fa_fused_op().call(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, block_table, seq_lens,
                             positions, slot_mapping, eps, scale);
  }
  for (const at::Tensor* cache : {&k_cache, &v_cache}) {
    // Inference tensors have no version counter (and the kernel refused them outside inference mode).
    if (!cache->is_inference()) cache->unsafeGetTensorImpl()->bump_version();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen, Autograd, m) { m.impl("fa_fused", &fa_fused_autograd); }

TORCH_LIBRARY_IMPL(qwen, ADInplaceOrView, m) { m.impl("fa_fused", &fa_fused_inplace_or_view); }

}  // namespace qwen_fused
