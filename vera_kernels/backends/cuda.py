"""The ``cuda`` backend: the CUDA C++ extension (csrc/) and its loader.

The extension is ``vera_kernels/_C.so`` when setup.py built it ahead of time;
otherwise it is JIT-built from csrc/ on first use (torch.utils.cpp_extension,
cached under TORCH_EXTENSIONS_DIR), which needs a source checkout and nvcc.
Its ops live in the ``vera_kernels_cuda`` torch library (see csrc/bindings.cpp).

A library runs on the GPUs it holds a cubin for and, through the driver's JIT,
on newer ones when it holds PTX (setup.py's DEFAULT_CUDA_ARCH_LIST): before
the backend is chosen for a device, the library is asked whether it has an
image that device can run (``kernel_image_problem``).

With ``VERA_KERNELS_CUDA_EMULATE=1`` the backend also takes CPU tensors: the
same kernel sources, compiled for the CPU by the host C++ compiler against
csrc/cuda_emulation.h (the CUDA programming model: blocks in turn, a block's
threads as fibers), run through the ``vera_kernels_cuda_emu`` library that
bindings.cpp becomes when compiled with VERA_CUDA_EMULATION. It is JIT-built
on first use and needs the CUDA toolkit's headers (not a GPU); it is slow, a
way to test the kernels' logic without a GPU (docs/design.md §7).
"""

import functools
import os
from pathlib import Path
from typing import Optional

import torch

from ..dropout import DropoutMask
from .banks import per_adapter_sum
from .contract import Grads, tf32_allowed
from .strategy import RegeneratingBackend

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CSRC = PACKAGE_DIR.parent / "csrc"
SOURCES = [CSRC / "bindings.cpp", CSRC / "vera_kernels.cu"]
EMULATION_SOURCES = [CSRC / "bindings.cpp", CSRC / "vera_kernels_emulated.cpp"]
EMULATE_ENV_VAR = "VERA_KERNELS_CUDA_EMULATE"

_load_error: Optional[str] = None
_loaded = False
# device index -> why the loaded library cannot run there (None: it can).
_image_problems: dict[int, Optional[str]] = {}
_emulation_error: Optional[str] = None
_emulation_loaded = False


def emulating() -> bool:
    """Whether CPU tensors run the CUDA kernels emulated (``VERA_KERNELS_CUDA_EMULATE=1``)."""
    return os.environ.get(EMULATE_ENV_VAR) == "1"


@functools.lru_cache(maxsize=1)
def prebuilt_library() -> Optional[Path]:
    """The extension setup.py built, if any (looked up once: backend choice runs per call)."""
    found = sorted(PACKAGE_DIR.glob("_C*.so")) + sorted(PACKAGE_DIR.glob("_C*.pyd"))
    return found[0] if found else None


def _jit_build_possible() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no prebuilt extension and no CUDA toolkit (nvcc) to JIT-build one: set CUDA_HOME"
    if not all(path.exists() for path in SOURCES):
        return f"no prebuilt extension and no sources at {CSRC} to JIT-build one"
    return None


def load() -> None:
    """Make ``torch.ops.vera_kernels_cuda`` available (prebuilt, else JIT-built); idempotent."""
    global _loaded, _load_error
    if _loaded:
        return
    if _load_error is not None:
        raise RuntimeError(_load_error)
    library = prebuilt_library()
    try:
        if library is not None:
            torch.ops.load_library(str(library))
        else:
            reason = _jit_build_possible()
            if reason is not None:
                raise RuntimeError(reason)
            from torch.utils.cpp_extension import load as jit_load

            jit_load(
                name="vera_kernels_cuda",
                sources=[str(p) for p in SOURCES],
                extra_include_paths=[str(CSRC)],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3"],
                is_python_module=False,
            )
    except Exception as error:
        _load_error = f"the CUDA extension could not be loaded: {error}"
        raise RuntimeError(_load_error) from error
    _loaded = True


def _emulation_build_possible() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return ("the CUDA emulation needs the CUDA toolkit's headers (cuda_fp16.h, cuda_bf16.h, "
                "host versions of the kernels' types): set CUDA_HOME")
    if not all(path.exists() for path in EMULATION_SOURCES):
        return f"no sources at {CSRC} to build the CUDA emulation from"
    return None


def load_emulation() -> None:
    """Make ``torch.ops.vera_kernels_cuda_emu`` available (JIT-built on first use); idempotent."""
    global _emulation_loaded, _emulation_error
    if _emulation_loaded:
        return
    if _emulation_error is None:
        _emulation_error = _emulation_build_possible()
    if _emulation_error is not None:
        raise RuntimeError(_emulation_error)
    from torch.utils.cpp_extension import CUDA_HOME, load as jit_load

    try:
        jit_load(
            name="vera_kernels_cuda_emu",
            sources=[str(p) for p in EMULATION_SOURCES],
            extra_include_paths=[str(CSRC), os.path.join(CUDA_HOME, "include")],
            # No FMA contraction: the spec's projection multiply must round on its own.
            extra_cflags=["-O2", "-DVERA_CUDA_EMULATION", "-ffp-contract=off",
                          "-Wno-unknown-pragmas"],
            is_python_module=False,
        )
    except Exception as error:  # noqa: BLE001  (a compiler's failure comes in many types)
        _emulation_error = f"the CUDA emulation could not be built: {error}"
        raise RuntimeError(_emulation_error) from error
    _emulation_loaded = True


def _ops(device: torch.device):
    """The op library for tensors on ``device``, loaded: the emulation's for CPU tensors
    under ``VERA_KERNELS_CUDA_EMULATE=1``, else the CUDA extension's."""
    if device.type == "cpu" and emulating():
        load_emulation()
        return torch.ops.vera_kernels_cuda_emu
    load()
    return torch.ops.vera_kernels_cuda


def kernel_image_problem(index: int) -> Optional[str]:
    """Why the loaded extension has no kernel image CUDA device ``index`` can run, or None.

    Asked once per device (backend choice runs per call); ``load()`` first.
    """
    if index not in _image_problems:
        _image_problems[index] = _describe_image_problem(
            index, torch.ops.vera_kernels_cuda.kernel_image_problem(index))
    return _image_problems[index]


def _describe_image_problem(index: int, error: str) -> Optional[str]:
    if not error:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    archs = ", ".join(f"sm_{arch // 10}"
                      for arch in sorted(torch.ops.vera_kernels_cuda.compiled_archs()))
    return (f"the CUDA extension was compiled for {archs} and has no kernel image this device "
            f"({torch.cuda.get_device_name(index)}, sm_{major}{minor}) can run ({error}): "
            f"rebuild it with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" set, or use another backend")


class CudaBackend(RegeneratingBackend):
    name = "cuda"
    priority = 20
    auto_devices = ("cuda",)

    def unavailable_on(self, device: torch.device) -> Optional[str]:
        if device.type == "cpu" and emulating():
            # Not built before its first launch, as the JIT-built extension.
            return _emulation_error if _emulation_error is not None else _emulation_build_possible()
        if device.type != "cuda":
            return (f"the cuda backend runs on CUDA tensors only (CPU tensors under "
                    f"{EMULATE_ENV_VAR}=1)")
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if _load_error is not None:
            return _load_error
        if not _loaded:
            if prebuilt_library() is None:
                # Not built before its first launch; the JIT build targets the current GPU.
                return _jit_build_possible()
            try:
                load()  # a prebuilt library loads quickly: ask it now, not at its first launch
            except RuntimeError as error:
                return str(error)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return kernel_image_problem(index)

    @functools.cached_property
    def reuse_factor(self) -> int:
        # Asked on every launch (the strategy choice): read from a library once, the
        # emulation's when that is what runs (both compile the same kBlockM).
        device = torch.device("cpu" if emulating() else "cuda")
        return _ops(device).block_m()  # kBlockM in csrc/vera_kernels.h

    def forward(self, x, lambda_d, lambda_b, source, base, *, into_base=False, adapter_ids=None,
                dropout=None, base_scale=None, base_bias=None):
        # The extension takes the vectors in the compute dtype (float32 ones
        # under half activations are rounded here; Triton scales in float32).
        lambda_d, lambda_b = lambda_d.to(x.dtype), lambda_b.to(x.dtype)
        if base_scale is not None:  # the scale in float32 (float64): it stays near 1
            base_scale = base_scale.to(torch.promote_types(x.dtype, torch.float32))
            base_bias = base_bias.to(x.dtype) if base_bias is not None else None
        return _ops(x.device).forward(
            x, lambda_d, lambda_b, *source.key_words(), base, self.generates(x.shape[0]),
            source.a, source.b, into_base, adapter_ids, *_dropout_args(dropout),
            tf32_allowed(x.dtype), *source.shard.op_args(), base_scale, base_bias,
        )

    def backward(self, grad, h, lambda_d, lambda_b, source, in_features, needed, adapter_ids=None,
                 dropout=None, dx_into=None):
        dtypes = lambda_d.dtype, lambda_b.dtype  # the gradients' (the vectors may be wider)
        lambda_d, lambda_b = lambda_d.to(h.dtype), lambda_b.to(h.dtype)
        dx, dd, db = _ops(h.device).backward(
            grad, h, lambda_d, lambda_b, *source.key_words(), in_features,
            self.generates(h.shape[0]), needed.x, needed.lambda_d, needed.lambda_b,
            source.a, source.b, adapter_ids, *_dropout_args(dropout), dx_into,
            tf32_allowed(h.dtype), *source.shard.op_args(),
        )
        if adapter_ids is not None:
            # Banked, the op returns dd and db per token row (u ⊙ h, g ⊙ z): summed
            # per adapter here, in the fixed order every backend shares.
            if needed.lambda_d:
                dd = per_adapter_sum(dd, adapter_ids, lambda_d.shape[0])
            if needed.lambda_b:
                db = per_adapter_sum(db, adapter_ids, lambda_b.shape[0])
        return Grads(dx if needed.x else None,
                     dd.to(dtypes[0]) if needed.lambda_d else None,
                     db.to(dtypes[1]) if needed.lambda_b else None)


BACKEND = CudaBackend()


def _dropout_args(dropout: Optional[DropoutMask]) -> tuple:
    """The ops' trailing ``(dropout_threshold, dropout_scale, dropout_seed)``.

    The mask's threshold and float32 scale as the spec rounds them, so the
    kernels need not repeat that rounding; threshold 0 is no dropout. The
    seed stays a device tensor (two int64 key words) that the kernels read.
    """
    if dropout is None:
        return (0, 1.0, None)
    return (dropout.threshold, dropout.scale, dropout.seed)
