"""The cuda backend without a GPU where possible: csrc/philox.cuh on the host,
the extension built, linked, loaded, its ops registered, and the JIT build.
With a GPU (`gpu` mark) its projection kernel too; values, gradients,
strategies and determinism are in test_function.py and test_fused.py.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vera_kernels as vk
from vera_kernels.backends import cuda as cuda_backend
from vera_kernels import backends as ops
from philox_model import KNOWN_ANSWERS

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CXX = shutil.which("c++") or shutil.which("g++")


@pytest.fixture(scope="module")
def host_check(tmp_path_factory):
    """csrc/philox_host_check.cpp built with the host C++ compiler."""
    if CXX is None:
        pytest.skip("no C++ compiler on this machine")
    binary = tmp_path_factory.mktemp("philox") / "philox_host_check"
    subprocess.run(
        [CXX, "-O2", "-std=c++17", "-ffp-contract=off", "-Wall", "-Werror", f"-I{CSRC}",
         str(CSRC / "philox_host_check.cpp"), "-o", str(binary)],
        check=True, timeout=120,
    )
    return binary


def _run(binary, *args) -> str:
    return subprocess.run([str(binary), *map(str, args)], check=True, capture_output=True,
                          text=True, timeout=60).stdout


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_host_philox_known_answers(host_check, counter, key, expected):
    words = _run(host_check, "kat", *counter, *key).split()
    assert tuple(int(w, 16) for w in words) == expected


@pytest.mark.parametrize("seed", [0, 2**32 + 7, 2**64 - 1])
@pytest.mark.parametrize("matrix,rows,cols", [("A", 5, 13), ("B", 11, 3), ("A", 3, 130), ("B", 9, 1)])
def test_host_projection_bit_exact(host_check, matrix, rows, cols, seed):
    stream = {"A": 0, "B": 1}[matrix]
    text = _run(host_check, "matrix", stream, rows, cols, seed)
    bits = np.array([[int(v, 16) for v in line.split()] for line in text.splitlines()], dtype=np.uint32)
    expected = vk.projection(matrix, rows, cols, seed).numpy().view(np.uint32)
    np.testing.assert_array_equal(bits, expected)


def _toolkit_reason():
    from torch.utils.cpp_extension import CUDA_HOME

    return None if CUDA_HOME is not None else "no CUDA toolkit (nvcc) on this machine"


needs_toolkit = pytest.mark.skipif(_toolkit_reason() is not None, reason=str(_toolkit_reason()))


@needs_toolkit
def test_prebuilt_extension_loads_and_registers_ops():
    # setup.py builds it whenever a toolkit is present (the README commands install with it).
    library = cuda_backend.prebuilt_library()
    assert library is not None, "setup.py did not build vera_kernels/_C.so"
    cuda_backend.load()
    schemas = {name: str(getattr(torch.ops.vera_kernels_cuda, name).default._schema)
               for name in ("forward", "backward", "projection")}
    assert ("Tensor? proj_b=None, bool into_base=False, Tensor? adapter_ids=None) "
            "-> (Tensor, Tensor)") in schemas["forward"]
    assert ("Tensor? proj_b=None, Tensor? adapter_ids=None) -> (Tensor, Tensor, Tensor)"
            in schemas["backward"])
    # The reuse factor the benchmark reports is the header's kBlockM.
    header = (ROOT / "csrc" / "vera_kernels.h").read_text()
    assert f"kBlockM = {cuda_backend.BACKEND.reuse_factor};" in header
    # Kernels are registered for CUDA only: CPU tensors find no kernel.
    with pytest.raises(NotImplementedError):
        torch.ops.vera_kernels_cuda.projection(0, 2, 3, 0, 0, torch.empty(0))


@needs_toolkit
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_ops_take_adapter_ids_last(op):
    # CudaBackend passes adapter_ids positionally, last; an old prebuilt _C.so lacks it.
    cuda_backend.load()
    arguments = getattr(torch.ops.vera_kernels_cuda, op).default._schema.arguments
    last = arguments[-1]
    assert (last.name, str(last.type), last.has_default_value(), last.default_value) == (
        "adapter_ids", "Optional[Tensor]", True, None)
    assert len(arguments) == {"forward": 11, "backward": 14}[op]


@needs_toolkit
def test_jit_build_without_prebuilt_extension(tmp_path):
    # In a fresh process (one library per process), with the prebuilt one hidden.
    script = (
        "import torch\n"
        "from vera_kernels.backends import cuda\n"
        "cuda.prebuilt_library = lambda: None\n"
        "cuda.load()\n"
        "print(torch.ops.vera_kernels_cuda.forward.default._schema)\n"
    )
    # Without a GPU to query, the build needs the architectures named.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vera_kernels_cuda::forward(" in proc.stdout
    assert "Tensor? adapter_ids=None) -> (Tensor, Tensor)" in proc.stdout
    assert list(tmp_path.rglob("vera_kernels_cuda*.so")), "no JIT-built library in the cache"


def test_cuda_backend_refuses_cpu_tensors():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cpu: .*CUDA tensors only"):
        vk.vera_linear(x, torch.ones(2), torch.ones(5), 0, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_not_listed_without_a_gpu():
    assert "cuda" not in vk.available_backends()
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        ops.resolve_backend("cuda", torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("matrix,rows,cols", [("A", 37, 131), ("B", 515, 19)])
def test_cuda_projection_kernel_bit_exact(matrix, rows, cols, dtype):
    cuda_backend.load()
    like = torch.empty(0, dtype=dtype, device="cuda")
    seed = 2**40 + 9
    got = torch.ops.vera_kernels_cuda.projection(
        {"A": 0, "B": 1}[matrix], rows, cols, seed & 0xFFFFFFFF, seed >> 32, like
    )
    assert torch.equal(got, vk.projection(matrix, rows, cols, seed, dtype=dtype, device="cuda"))


@pytest.mark.gpu
def test_cuda_is_listed_with_a_gpu():
    assert "cuda" in vk.available_backends("cuda")
