"""Build script: the Python package, the `xkern._cpu` native CPU extension and, where CUDA is usable,
the `xkern._C` CUDA extension.

Install with `pip install --no-build-isolation .` (or `-e .`) so the build sees the installed torch.

* `xkern._cpu` (sources: csrc/cpu/*.cpp) is built wherever torch is importable and a C++ compiler
  exists; `XKERN_NO_EXT=1` skips it. Its kernels pick the instruction set at run time (scalar, AVX2,
  AVX-512: one source file each, compiled with `#pragma GCC target`), so no -march flag is used.
* `xkern._C` (sources: the top-level csrc/*.cpp and csrc/*.cu) is built when torch with CUDA and
  `nvcc` are both present; `XKERN_NO_CUDA=1` skips it.

A failing build of either fails the install loudly: an extension is never silently dropped.
"""

import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _torch_importable(what: str) -> bool:
    try:
        import torch  # noqa: F401
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError:
        print(f"xkern: torch not importable in the build environment, skipping {what} "
              "(use --no-build-isolation to build it)", file=sys.stderr)
        return False
    return True


def _cpu_extension():
    """`xkern._cpu`, or None when XKERN_NO_EXT=1 or torch is not importable."""
    if os.environ.get("XKERN_NO_EXT", "0") == "1":
        print("xkern: XKERN_NO_EXT=1, skipping the CPU extension", file=sys.stderr)
        return None
    if not _torch_importable("the CPU extension"):
        return None
    from torch.utils.cpp_extension import CppExtension

    cpu_dir = os.path.join("csrc", "cpu")
    sources = [os.path.join(cpu_dir, f) for f in sorted(os.listdir(os.path.join(HERE, cpu_dir))) if f.endswith(".cpp")]
    # -ffp-contract=off: block scales round exactly like the torch reference (no fused multiply-add
    # unless written as one). -fopenmp: at::parallel_for is OpenMP underneath; at run time the
    # libgomp.so.1 torch already loaded serves both. No -march: the ISA is chosen at run time.
    # -g0 overrides the -g of Python's CFLAGS (half the compile time; no debug info in the .so).
    cxx = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wall"]
    extra = os.environ.get("XKERN_CPU_CXXFLAGS", "").split()  # e.g. -fsanitize=address for a test build
    return CppExtension(
        name="xkern._cpu",
        sources=sources,
        include_dirs=[os.path.join(HERE, cpu_dir)],
        depends=[os.path.join(cpu_dir, f) for f in sorted(os.listdir(os.path.join(HERE, cpu_dir)))
                 if f.endswith(".h")],
        extra_compile_args={"cxx": cxx + extra},
        extra_link_args=["-fopenmp", *extra],
    )


def _cuda_extension():
    """`xkern._C`, or None when XKERN_NO_CUDA=1, torch has no CUDA or nvcc is missing."""
    if os.environ.get("XKERN_NO_CUDA", "0") == "1":
        print("xkern: XKERN_NO_CUDA=1, skipping the CUDA extension", file=sys.stderr)
        return None
    if not _torch_importable("the CUDA extension"):
        return None
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc") is None:
        print("xkern: no CUDA build of torch or no nvcc, building without xkern._C", file=sys.stderr)
        return None
    sources = [os.path.join("csrc", f) for f in sorted(os.listdir(os.path.join(HERE, "csrc")))
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
    return CUDAExtension(
        name="xkern._C",
        sources=sources,
        define_macros=macros,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )


def _extension_kwargs() -> dict:
    exts = [e for e in (_cpu_extension(), _cuda_extension()) if e is not None]
    if not exts:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"ext_modules": exts, "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
