// The Autograd and ADInplaceOrView kernels of qwen::fa_fused and qwen::fa_fused_varlen, for every device, as
// boxed kernels that read the schema: the ops are inference-only (they have no backward), and their cache writes
// are in-place updates that autograd must see.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "validation.h"

namespace qwen_fused {
namespace {

// With grad mode on, an input that requires grad would get an output whose backward silently leaves its
// gradient None: refuse instead.
void refuse_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  const std::string name = op.schema().name().substr(std::string("qwen::").size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::IValue& value = (*stack)[first + i];
    if (value.isTensor()) check_no_grad(name.c_str(), arguments[i].name().c_str(), value.toTensor());
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

// The caches (the schema's Tensor(a!) arguments) are updated in place: bump their version counters, as every
// in-place torch op does, so that autograd refuses a tensor it saved before the update instead of using the
// overwritten values.
void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias && alias->isWrite()) written.push_back((*stack)[first + i].toTensor());
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const at::Tensor& cache : written) {
    // Inference tensors have no version counter (and the kernels refuse them outside inference mode).
    if (!cache.is_inference()) cache.unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(qwen, Autograd, m) {
  m.impl("fa_fused", torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
  m.impl("fa_fused_varlen", torch::CppFunction::makeFromBoxedFunction<&refuse_grad>());
}

TORCH_LIBRARY_IMPL(qwen, ADInplaceOrView, m) {
  m.impl("fa_fused", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("fa_fused_varlen", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
}

}  // namespace qwen_fused
