"""Build entry point; metadata lives in pyproject.toml.

Builds the optional CUDA extension ``vera_kernels._C`` (csrc/) ahead of time:

    VERA_KERNELS_BUILD_CUDA unset  build it when a CUDA toolkit (nvcc) is found; on failure warn and go on
    VERA_KERNELS_BUILD_CUDA=1      build it, and fail loudly if it cannot be built
    VERA_KERNELS_BUILD_CUDA=0      skip it (the cuda backend then JIT-builds on first use)

Architectures: TORCH_CUDA_ARCH_LIST if set, else DEFAULT_CUDA_ARCH_LIST below.
torch must be installed first (``pip install --no-build-isolation``).
"""

import os
import warnings
from pathlib import Path

from setuptools import setup

CSRC = Path(__file__).resolve().parent / "csrc"
# Relative paths: setuptools requires them for sources.
SOURCES = ["csrc/bindings.cpp", "csrc/vera_kernels.cu"]
# Cubins for sm_75 (Turing), sm_80 (Ampere; sm_86 and sm_89 run it too) and
# sm_90 (Hopper), plus sm_90's PTX, which the driver compiles for any newer GPU
# (Blackwell: sm_100, sm_120). The one place the list is kept:
# tests/test_cuda_backend.py reads it from here and checks the built library.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;9.0+PTX"


def cuda_build():
    """(ext_modules, cmdclass) for the CUDA extension, or nothing."""
    mode = os.environ.get("VERA_KERNELS_BUILD_CUDA", "auto")
    if mode == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as error:
        if mode == "1":
            raise RuntimeError("VERA_KERNELS_BUILD_CUDA=1 needs torch installed before the build") from error
        return [], {}
    if CUDA_HOME is None:
        if mode == "1":
            raise RuntimeError("VERA_KERNELS_BUILD_CUDA=1 but no CUDA toolkit found: set CUDA_HOME")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)

    class OptionalBuildExtension(BuildExtension):
        # In auto mode a failed build leaves the package usable (torch and
        # triton backends; the cuda backend can still JIT-build later).
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001  (compiler errors come in many types)
                warnings.warn(f"vera_kernels: CUDA extension not built ({error}); "
                              "set VERA_KERNELS_BUILD_CUDA=1 to make this an error", stacklevel=2)

    ext = CUDAExtension(
        "vera_kernels._C",
        sources=SOURCES,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},  # torch picks -std
    )
    build = BuildExtension if mode == "1" else OptionalBuildExtension
    return [ext], {"build_ext": build.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = cuda_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
