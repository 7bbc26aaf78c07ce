"""Build for harmonizer_fast: pure-Python package plus the optional extension harmonizer_fast._C.

The extension holds the C++ CPU kernels always and the CUDA kernels when torch has CUDA and nvcc is
found. Building it needs torch importable at build time, so install with
``pip install --no-build-isolation .`` into an environment that already has torch (the Makefile does).
``HARMONIZER_FAST_NO_EXT=1`` skips the extension; the package then runs on its Triton and reference
backends. ``FORCE_CUDA=1`` builds the CUDA kernels even when no GPU is visible (e.g. in a build container).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension_build() -> tuple[list, dict]:
    if os.environ.get("HARMONIZER_FAST_NO_EXT") == "1":
        print("harmonizer_fast: HARMONIZER_FAST_NO_EXT=1, not building harmonizer_fast._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        # Build isolation hides the environment's torch; we refuse to pull a (multi-GB) torch into the
        # build environment, so the package installs without its C++ kernels and says so.
        print(
            f"harmonizer_fast: WARNING: torch is not importable at build time ({exc}); installing without "
            "the C++/CUDA extension. Reinstall with `pip install --no-build-isolation .` to build it.",
            file=sys.stderr,
        )
        return [], {}

    # ops.cpp (registration), the torch-side <op>_op.cpp files and the CPU kernels.
    sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++17 or C++20).
    cxx = ["-O3", "-fopenmp"]  # -fopenmp: at::parallel_for is inlined OpenMP in the headers
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1")
    )
    kwargs: dict = {
        "include_dirs": [os.path.join(ROOT, "csrc", "include")],
        "extra_link_args": ["-fopenmp"],
    }
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["define_macros"] = [("WITH_CUDA", None)]
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3"]}
        ext = CUDAExtension("harmonizer_fast._C", sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = CppExtension("harmonizer_fast._C", sources, **kwargs)
    print(f"harmonizer_fast: building harmonizer_fast._C (CUDA kernels: {with_cuda})", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
