// The attention kernel built for AVX2 + FMA + F16C; fa_fused_cpu.cpp calls it only on CPUs that
// have them. Standard headers come before the target pragma so that none of their inline code is
// compiled for AVX2.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <stdexcept>
#include <type_traits>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "vec/avx2.h"
#include "attention_kernel.h"

namespace qwen_fused {
void attend_avx2(const AttentionProblem& p, int64_t begin, int64_t end, float* scratch) {
  attend_items<VecAVX2>(p, begin, end, scratch);
}

const AttentionKernel kAvx2Kernel = describe_kernel<VecAVX2>("avx2", attend_avx2, "fp32 FMA, 8 lanes");
}  // namespace qwen_fused
#pragma GCC pop_options
