"""The kernels of ``qwen::fa_fused`` written in Python (the CPU kernel is C++, in csrc/cpu/):

* ``eager``: plain PyTorch; every device without a kernel of its own, and ``backend="eager"``;
* ``pypto``: the pypto kernel (``pypto.kernel``), replayed on the CPU by pypto's interpreter
  (``pypto.replay``, ``backend="pypto"``), with the pinned pypto 0.2.0 workarounds (``pypto.compat``);
* ``npu``: the same pypto kernel launched on an Ascend NPU (the ``PrivateUse1`` dispatch key).

All of them run the op's one set of argument checks (``torch.ops.qwen.fa_fused_check``, C++) first.
"""
