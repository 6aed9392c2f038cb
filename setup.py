"""Build script: pure-Python install everywhere, plus the `xkern._C` CUDA extension where CUDA is usable.

The extension is built when torch with CUDA and `nvcc` are both present (install with
`pip install --no-build-isolation .` so the build sees the installed torch). `XKERN_NO_CUDA=1`
skips it. A failing CUDA build fails the install loudly: it is never silently dropped.
"""

import os
import shutil
import sys

from setuptools import setup


def _cuda_extension_kwargs() -> dict:
    if os.environ.get("XKERN_NO_CUDA", "0") == "1":
        print("xkern: XKERN_NO_CUDA=1, skipping the CUDA extension", file=sys.stderr)
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("xkern: torch not importable in the build environment, skipping the CUDA extension "
              "(use --no-build-isolation to build it)", file=sys.stderr)
        return {}
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc") is None:
        print("xkern: no CUDA build of torch or no nvcc, building without xkern._C", file=sys.stderr)
        return {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.join("csrc", f) for f in sorted(os.listdir(os.path.join(here, "csrc")))
               if f.endswith((".cpp", ".cu"))]
    arch_flags = [a for a in os.environ.get("XKERN_CUDA_ARCH", "80;90a").split(";") if a]
    # The kernels (csrc/*.cu) include no torch header and build as C++17; the torch-facing .cpp files
    # get the C++ standard the installed torch asks for (C++20 for recent torch), so no -std for cxx.
    nvcc_flags = ["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"]
    for arch in arch_flags:
        num = arch.rstrip("a")
        nvcc_flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}" if arch.endswith("a")
                       else f"arch=compute_{num},code=sm_{num}"]
    macros = []
    if os.path.join("csrc", "nf4_lora_decode.cu") in sources:
        macros.append(("XKERN_WITH_DECODE_KERNEL", "1"))  # bindings.cpp lists "lora_linear" only then
    ext = CUDAExtension(
        name="xkern._C",
        sources=sources,
        define_macros=macros,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_cuda_extension_kwargs())
