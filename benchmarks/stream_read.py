"""The floor's C++ reader: every byte of a tensor read once, as a streaming kernel reads it.

torch's reductions are not always at memory speed (a bf16 ``sum`` converts every element; an int32 ``amax``
is vectorized but its reduction tree is not written for bandwidth), so the floor also times this loop: the
tensor's 64-bit words OR-ed into 8 independent accumulators (no conversion, no dependency chain; the
compiler vectorizes it with the baseline x86-64 SIMD, which outruns DRAM), split over torch's threads with
``at::parallel_for``. Built once with ``torch.utils.cpp_extension.load_inline`` (-O3 -fopenmp; cached by torch
under ~/.cache/torch_extensions), the first time a floor is timed.
"""

import functools
import sys

import torch

__all__ = ["stream_read"]

SOURCE = r"""
#include <ATen/Parallel.h>
#include <torch/extension.h>

// OR of every 64-bit word of t (contiguous, a multiple of 8 bytes), each read once.
int64_t stream_read(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.nbytes() % 64 == 0, "stream_read: a contiguous tensor of 64-byte lines");
  const uint64_t* words = static_cast<const uint64_t*>(t.const_data_ptr());
  const int64_t lines = t.nbytes() / 64;
  std::vector<uint64_t> partial(at::get_num_threads(), 0);
  at::parallel_for(0, lines, 4096, [&](int64_t begin, int64_t end) {
    uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t line = begin; line < end; ++line)
      for (int w = 0; w < 8; ++w) acc[w] |= words[line * 8 + w];
    partial[at::get_thread_num()] |= acc[0] | acc[1] | acc[2] | acc[3] | acc[4] | acc[5] | acc[6] | acc[7];
  });
  uint64_t all = 0;
  for (const uint64_t p : partial) all |= p;
  return static_cast<int64_t>(all);
}
"""


@functools.lru_cache(maxsize=None)
def _module():
    from torch.utils.cpp_extension import load_inline

    print("bench: building the floor's C++ streaming reader (once; cached by torch)", file=sys.stderr, flush=True)
    return load_inline(name="torch_qwen_fused_stream_read", cpp_sources=SOURCE, functions=["stream_read"],
                       extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def stream_read(t: torch.Tensor) -> int:
    """Reads every byte of ``t`` (contiguous, a multiple of 64 bytes) once; returns their OR as 64-bit words."""
    return _module().stream_read(t)
