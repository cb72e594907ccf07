// Schema of the qwen ops and the Python module entry point. Importing torch_qwen_fused._C only
// runs the static registrations below and in the kernel files.
#include <Python.h>
#include <torch/library.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(qwen, m) {
  // One decode step of Qwen3 attention: qk RMSNorm, RoPE, paged KV-cache write, GQA attention.
  // The caches are written in place (the new token's slot) and not returned. k_scale / v_scale: fp32, one
  // element each (vLLM's per-layer scales; None = 1): the cache stores saturate(x / scale), attention reads
  // stored * scale (docs/contract.md, section 7; what fp8 caches need).
  m.def(
      "fa_fused(Tensor q, Tensor k, Tensor v, Tensor q_norm_weight, Tensor k_norm_weight, "
      "Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_table, "
      "Tensor seq_lens, Tensor? positions=None, Tensor? slot_mapping=None, float eps=1e-6, "
      "float? scale=None, Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor");
  // Several new tokens per row (speculative decoding's verification, chunked prefill): row b's new tokens are
  // tokens [query_start_loc[b], query_start_loc[b + 1]) of q/k/v, the last of its seq_lens[b]-token context;
  // each attends causally (up to its own context index). With query_start_loc = arange(B + 1) it is fa_fused.
  m.def(
      "fa_fused_varlen(Tensor q, Tensor k, Tensor v, Tensor q_norm_weight, Tensor k_norm_weight, Tensor cos, "
      "Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor query_start_loc, Tensor? positions=None, Tensor? slot_mapping=None, float eps=1e-6, "
      "float? scale=None, Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor");
  // The ops' argument checks alone (every rule of the contract; raises before anything is written), for
  // the backends written in Python: the eager fallback, the pypto replay, the NPU launch.
  m.def(
      "fa_fused_check(Tensor q, Tensor k, Tensor v, Tensor q_norm_weight, Tensor k_norm_weight, Tensor cos, "
      "Tensor sin, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, Tensor? positions=None, "
      "Tensor? slot_mapping=None, Tensor? k_scale=None, Tensor? v_scale=None) -> ()");
  m.def(
      "fa_fused_varlen_check(Tensor q, Tensor k, Tensor v, Tensor q_norm_weight, Tensor k_norm_weight, Tensor cos, "
      "Tensor sin, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, Tensor query_start_loc, "
      "Tensor? positions=None, Tensor? slot_mapping=None, Tensor? k_scale=None, Tensor? v_scale=None) -> ()");
}
