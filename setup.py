"""Build for harmonizer_fast: the Python package plus the extension harmonizer_fast._C.

The extension holds the C++ CPU kernels always and the CUDA kernels when torch has CUDA and nvcc is
found. It is compiled against the torch of the environment it is built in (torch's C++ ABI changes with
every release), so build without isolation, in an environment that already has the torch you will run:

    pip install --no-build-isolation .

An isolated build (plain ``pip install .`` or ``python -m build``) cannot see that torch: building the
wheel then stops with a message that says so, rather than installing a package without its kernels.
Building the sdist needs no torch. ``HARMONIZER_FAST_NO_EXT=1`` builds the pure-Python package on purpose
(it then runs on its Triton and reference backends). ``FORCE_CUDA=1`` builds the CUDA kernels even when no
GPU is visible (e.g. in a build container).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
NAME = "harmonizer_fast._C"
NO_EXT = os.environ.get("HARMONIZER_FAST_NO_EXT") == "1"

NO_TORCH = """harmonizer_fast: torch is not importable in this build environment ({error}).
The C++/CUDA extension harmonizer_fast._C is compiled against the torch you will run, so build without
build isolation, in an environment that has torch:
    pip install torch==<the version you use>
    pip install --no-build-isolation harmonizer-fast        (or: pip install --no-build-isolation .)
    python -m build --no-isolation                          (for a wheel)
To build the pure-Python package without the kernels on purpose, set HARMONIZER_FAST_NO_EXT=1."""


def _sources() -> list[str]:
    # ops.cpp (registration), the torch-side <op>_op.cpp files and the CPU kernels; paths relative to setup.py,
    # as setuptools requires.
    return [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]


def _torch_extension() -> Extension:
    """The extension as torch.utils.cpp_extension describes it (include and library paths of this torch)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    # -fopenmp: at::parallel_for is inlined OpenMP in the headers. -g0: Python's CFLAGS ask for debug info, which
    # made _C 16.8 MB of a 17.5 MB wheel.
    cxx = ["-O3", "-fopenmp", "-g0"]
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++17 or C++20).
    kwargs: dict = {"include_dirs": [os.path.join(ROOT, "csrc", "include")], "extra_link_args": ["-fopenmp"]}
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1")
    )
    print(f"harmonizer_fast: building {NAME} against torch {torch.__version__} (CUDA kernels: {with_cuda})",
          file=sys.stderr)  # fmt: skip
    if with_cuda:
        kwargs.update(define_macros=[("WITH_CUDA", None)], extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]})
        return CUDAExtension(NAME, [*_sources(), *sorted(glob.glob("csrc/cuda/*.cu"))], **kwargs)
    return CppExtension(NAME, _sources(), extra_compile_args={"cxx": cxx}, **kwargs)


try:  # present in a build without isolation, in the environment whose torch the extension is built for
    from torch.utils.cpp_extension import BuildExtension
except ImportError as exc:
    BuildExtension, TORCH_MISSING = None, f"{type(exc).__name__}: {exc}"

if BuildExtension is not None:

    class TorchBuildExt(BuildExtension):
        """torch's build_ext (ninja, nvcc, the ABI flags), with the extension described by this torch at build
        time: the placeholder below is filled in place, so the state setuptools attached to it survives."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, use_ninja=True, **kwargs)

        def run(self) -> None:
            described = _torch_extension()
            for ext in self.extensions:
                ext.__dict__.update({k: v for k, v in vars(described).items() if not k.startswith("_")})
            super().run()

else:

    class TorchBuildExt(build_ext):
        """Without torch, building the extension stops with NO_TORCH (sdist and metadata need no torch)."""

        def run(self) -> None:
            sys.exit(NO_TORCH.format(error=TORCH_MISSING))


if NO_EXT:
    print(f"harmonizer_fast: HARMONIZER_FAST_NO_EXT=1, not building {NAME}", file=sys.stderr)
# A placeholder until build_ext runs: it makes the wheel platform-specific and names the sources for the sdist.
ext_modules = [] if NO_EXT else [Extension(NAME, _sources())]
setup(ext_modules=ext_modules, cmdclass={} if NO_EXT else {"build_ext": TorchBuildExt})
