"""Builds torch_qwen_fused._C, the C++ op schema and CPU kernel (csrc/).

Build with the installed torch: `pip install --no-build-isolation -e .` (an isolated build would
download another torch). The attention kernel is compiled once per instruction set (kernel_*.cpp
choose theirs with `#pragma GCC target`) and picked at run time, so no -march flag is needed.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
headers = sorted(glob.glob("csrc/**/*.h", recursive=True))
# DEBUG=1: no optimisation, debug symbols and assertions (for gdb / sanitizers); the default is -O3.
debug = os.environ.get("DEBUG") == "1"
optimisation = ["-O0", "-g", "-UNDEBUG"] if debug else ["-O3"]

setup(
    ext_modules=[
        CppExtension(
            "torch_qwen_fused._C",
            sources,
            depends=headers,
            extra_compile_args=optimisation + ["-fopenmp", "-std=c++20", "-fvisibility=hidden"],
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
