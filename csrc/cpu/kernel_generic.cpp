// The attention kernel for any x86-64 (or other) CPU, built with the baseline flags.
#include "vec/generic.h"
#include "attention_kernel.h"

namespace qwen_fused {
void attend_generic(const AttentionProblem& p, int64_t begin, int64_t end, float* scratch) {
  attend_items<VecGeneric>(p, begin, end, scratch);
}

const AttentionKernel kGenericKernel =
    describe_kernel<VecGeneric>("generic", attend_generic, "fp32 multiply-add, 8 lanes (plain C++)");
}  // namespace qwen_fused
