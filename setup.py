"""Build of the compiled mipnet_kernels extensions.

Two separate shared objects, both on PyTorch's stable ABI (one build serves torch 2.11
through 2.13) and both without a Python module init: mipnet_kernels/_extension.py loads
them with ``torch.ops.load_library``.

* ``mipnet_kernels._C``      -- C++ CPU kernels (csrc/register_cpu.cpp + csrc/cpu/*.cpp),
                                OpenMP; always built.
* ``mipnet_kernels._C_cuda`` -- CUDA kernels (csrc/register_cuda.cpp + csrc/cuda/*.cu);
                                built when torch has CUDA and nvcc is found.  CUDA code is
                                never linked into ``_C`` (that would break import on
                                CPU-only torch).

Environment:
  MIPNET_KERNELS_FORCE_CUDA=1  build ``_C_cuda`` even if the checks say no (e.g. no nvcc
                               on PATH but CUDA_HOME set, or a CPU torch with CUDA headers)
  MIPNET_KERNELS_SKIP_CUDA=1   never build ``_C_cuda``
  TORCH_CUDA_ARCH_LIST         CUDA architectures (default "8.0;9.0": A100, H100/H200)
  MIPNET_KERNELS_DEBUG=1       -O0 -g instead of -O3

Usage: ``pip install --no-build-isolation -e .`` (or ``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")

# Stable-ABI target: torch 2.11 (the GPU box); the same binary loads on 2.12 / 2.13.
TORCH_TARGET_VERSION = "0x020b000000000000"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _rel(paths):
    # setuptools wants source paths relative to setup.py.
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _find_nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
        if os.path.exists(nvcc):
            return nvcc
    return shutil.which("nvcc")


def _want_cuda(torch) -> tuple[bool, str]:
    if _flag("MIPNET_KERNELS_SKIP_CUDA"):
        return False, "MIPNET_KERNELS_SKIP_CUDA is set"
    if _flag("MIPNET_KERNELS_FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError(
                "MIPNET_KERNELS_FORCE_CUDA=1 needs a CUDA build of torch (torch.version.cuda is "
                "None here). To compile-check the CUDA sources without one, use CMake: "
                "cmake -S . -B build-cmake -DMIPNET_CUDA_COMPILE_ONLY=ON && "
                "cmake --build build-cmake"
            )
        return True, "MIPNET_KERNELS_FORCE_CUDA is set"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if _find_nvcc() is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"torch CUDA {torch.version.cuda}, nvcc found"


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = _flag("MIPNET_KERNELS_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    common_defines = [
        f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}",
    ]
    include_dirs = [CSRC]

    cpu_sources = [os.path.join(CSRC, "register_cpu.cpp")] + glob.glob(
        os.path.join(CSRC, "cpu", "*.cpp")
    )
    # -ffp-contract=off: no FMA contraction even under -march flags, so the refinement
    # and affine math round exactly like the reference (decode.h); never -ffast-math
    # (the NaN tracking needs IEEE comparisons).
    cxx_flags = ["-std=c++17", *opt, "-ffp-contract=off", "-fopenmp", "-fvisibility=hidden",
                 *common_defines]
    if sys.platform == "darwin":  # Apple clang: OpenMP via -Xpreprocessor (libomp needed)
        cxx_flags = [f for f in cxx_flags if f != "-fopenmp"] + ["-Xpreprocessor", "-fopenmp"]
        cpu_link = ["-lomp"]
    else:
        cpu_link = ["-fopenmp"]

    exts = [
        CppExtension(
            "mipnet_kernels._C",
            _rel(cpu_sources),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=cpu_link,
            py_limited_api=True,
        )
    ]

    want, why = _want_cuda(torch)
    cuda_sources = glob.glob(os.path.join(CSRC, "cuda", "*.cu"))
    reg = os.path.join(CSRC, "register_cuda.cpp")
    if os.path.exists(reg):
        cuda_sources.insert(0, reg)
    if want and not cuda_sources:
        want, why = False, "no CUDA sources in csrc/cuda"
    print(f"mipnet_kernels: CUDA extension {'ON' if want else 'OFF'} ({why})", file=sys.stderr)
    if want:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        exts.append(
            CUDAExtension(
                "mipnet_kernels._C_cuda",
                _rel(cuda_sources),
                include_dirs=include_dirs,
                extra_compile_args={
                    "cxx": ["-std=c++17", *opt, "-ffp-contract=off", "-fvisibility=hidden",
                            "-DUSE_CUDA", *common_defines],
                    "nvcc": ["-std=c++17", *opt, "-DUSE_CUDA", *common_defines,
                             "-lineinfo", "--expt-relaxed-constexpr"],
                },
                py_limited_api=True,
            )
        )
    return exts


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


setup(
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    # Name the files *.abi3.so: they use no Python C API at all (stable torch ABI only).
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
