// The attention kernel built for AVX-512 F/BW/VL; fa_fused_cpu.cpp calls it only on CPUs that
// have them. Standard headers come before the target pragma so that none of their inline code is
// compiled for AVX-512.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <stdexcept>
#include <type_traits>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include "vec/avx512.h"
#include "attention_kernel.h"

namespace qwen_fused {
void attend_avx512(const AttentionProblem& p, int64_t begin, int64_t end, float* scratch) {
  attend_items<VecAVX512>(p, begin, end, scratch);
}

const AttentionKernel kAvx512Kernel = describe_kernel<VecAVX512>("avx512", attend_avx512, "fp32 FMA, 16 lanes");
}  // namespace qwen_fused
#pragma GCC pop_options
