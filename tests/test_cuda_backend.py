"""The cuda backend without a GPU where possible: csrc/philox.cuh on the host
(projections and dropout masks), the extension built, linked, loaded, its ops
registered and called as their schemas say, and the JIT build. With a GPU
(`gpu` mark) its projection kernel and dropout masks too; values, gradients,
strategies and determinism are in test_function.py, test_fused.py and
test_dropout.py.
"""

import ast
import importlib.util
import os
import re
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
from vera_kernels.backends.contract import NeededGrads, ProjectionSource
from vera_kernels.dropout import DropoutMask, keep_mask, seed_words
from helpers import load_compile_check
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


def _hex_rows(text: str) -> np.ndarray:
    """The host check's float32 bit patterns, one row per line."""
    return np.array([[int(v, 16) for v in line.split()] for line in text.splitlines()],
                    dtype=np.uint32)


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_host_philox_known_answers(host_check, counter, key, expected):
    words = _run(host_check, "kat", *counter, *key).split()
    assert tuple(int(w, 16) for w in words) == expected


@pytest.mark.parametrize("seed", [0, 2**32 + 7, 2**64 - 1])
@pytest.mark.parametrize("matrix,rows,cols", [("A", 5, 13), ("B", 11, 3), ("A", 3, 130), ("B", 9, 1)])
def test_host_projection_bit_exact(host_check, matrix, rows, cols, seed):
    stream = {"A": 0, "B": 1}[matrix]
    bits = _hex_rows(_run(host_check, "matrix", stream, rows, cols, seed))
    expected = vk.projection(matrix, rows, cols, seed).numpy().view(np.uint32)
    np.testing.assert_array_equal(bits, expected)


def _spec_factors(dropout: DropoutMask, rows: int, cols: int) -> np.ndarray:
    """keep · scale by the spec (vera_kernels/dropout.py), as float32 bit patterns."""
    kept = keep_mask(dropout, 0, rows, cols, "cpu")
    factors = torch.where(kept, torch.tensor(dropout.scale), torch.tensor(0.0)).float()
    return factors.numpy().view(np.uint32)


@pytest.mark.parametrize("seed", [0, 2**32 + 7, 2**63 + 17, 2**64 - 1])
@pytest.mark.parametrize("rows,cols,p", [(5, 21, 0.3), (3, 8, 0.5), (70, 9, 0.1), (2, 130, 0.9),
                                         (4, 3, 0.99999), (3, 5, 1e-6)])
def test_host_dropout_mask_bit_exact(host_check, rows, cols, p, seed):
    # philox.cuh's dropout_words / dropout_factor, one call per 8 features as the
    # kernels use them, against the spec; p = 1e-6 rounds to threshold 0 (all kept).
    dropout = DropoutMask(p, seed_words(seed, "cpu"))
    scale_bits = int(np.array(dropout.scale, dtype=np.float32).view(np.uint32))
    bits = _hex_rows(_run(host_check, "dropout", rows, cols, seed, dropout.threshold, scale_bits))
    np.testing.assert_array_equal(bits, _spec_factors(dropout, rows, cols))


def test_dropout_args_are_the_spec_mask():
    dropout = DropoutMask(0.3, seed_words(2**40 + 5, "cpu"))
    threshold, scale, seed = cuda_backend._dropout_args(dropout)
    assert threshold == 19661
    # The seed stays the device tensor of its two key words: the kernels read it.
    assert seed is dropout.seed and seed.dtype == torch.int64 and seed.tolist() == [5, 2**8]
    # The op takes the scale as a double and requires it to be float32-exact.
    assert scale == dropout.scale == float(np.float32(scale))
    assert cuda_backend._dropout_args(None) == (0, 1.0, None)  # threshold 0: no dropout


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
    dropout_args = "int dropout_threshold=0, float dropout_scale=1., Tensor? dropout_seed=None"
    shard_args = "int shard_in_offset=0, int shard_out_offset=0, int shard_in_features=0"
    assert ("Tensor? proj_b=None, bool into_base=False, Tensor? adapter_ids=None, "
            f"{dropout_args}, bool tf32=False, {shard_args}, Tensor? base_scale=None, "
            "Tensor? base_bias=None) -> (Tensor, Tensor)") in schemas["forward"]
    assert (f"Tensor? proj_b=None, Tensor? adapter_ids=None, {dropout_args}, "
            f"Tensor? dx_into=None, bool tf32=False, {shard_args}) -> (Tensor, Tensor, Tensor)"
            ) in schemas["backward"]
    assert schemas["projection"].endswith(
        "Tensor like, int row_offset=0, int col_offset=0, int fan=0) -> Tensor")
    # The reuse factor the benchmark reports is the header's kBlockM.
    header = (ROOT / "csrc" / "vera_kernels.h").read_text()
    assert f"kBlockM = {cuda_backend.BACKEND.reuse_factor};" in header
    assert (str(torch.ops.vera_kernels_cuda.kernel_image_problem.default._schema)
            == "vera_kernels_cuda::kernel_image_problem(int device) -> str")
    # Kernels are registered for CUDA only: CPU tensors find no kernel.
    with pytest.raises(NotImplementedError):
        torch.ops.vera_kernels_cuda.projection(0, 2, 3, 0, 0, torch.empty(0))


@needs_toolkit
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_ops_take_adapter_ids_then_dropout_then_tf32_then_the_shard(op):  # then DVoRA's
    # CudaBackend passes these positionally, last; an old prebuilt _C.so lacks them.
    cuda_backend.load()
    arguments = getattr(torch.ops.vera_kernels_cuda, op).default._schema.arguments
    tail = [(a.name, str(a.type), a.has_default_value(), a.default_value) for a in arguments]
    start = [a.name for a in arguments].index("adapter_ids")
    assert tail[start:start + 4] == [
        ("adapter_ids", "Optional[Tensor]", True, None),
        ("dropout_threshold", "int", True, 0), ("dropout_scale", "float", True, 1.0),
        ("dropout_seed", "Optional[Tensor]", True, None)]
    # backward then takes dx_into: the base layer's dx, which the adapter's is added into;
    # both take tf32 (fp32 at TF32 precision on tensor cores), off by default, and end
    # with a tensor-parallel shard's place in the full layer (zeros: the whole layer).
    assert tail[start + 4:] == ([] if op == "forward"
                                else [("dx_into", "Optional[Tensor]", True, None)]) + [
        ("tf32", "bool", True, False), ("shard_in_offset", "int", True, 0),
        ("shard_out_offset", "int", True, 0), ("shard_in_features", "int", True, 0)] + (
        # forward last takes DVoRA's base scale and bias (the epilogue's affine base)
        [("base_scale", "Optional[Tensor]", True, None),
         ("base_bias", "Optional[Tensor]", True, None)] if op == "forward" else [])
    assert len(arguments) == {"forward": 20, "backward": 22}[op]


class _RecordingOps:
    """Stands in for torch.ops.vera_kernels_cuda: records each call's positional arguments."""

    def __init__(self):
        self.calls = {}

    def block_m(self):
        return 64

    def forward(self, *args):
        self.calls["forward"] = args
        return args[0], args[0]

    def backward(self, *args):
        self.calls["backward"] = args
        return args[0], args[0], args[0]


@needs_toolkit
def test_backend_passes_the_dropout_mask_as_the_schemas_name_it(monkeypatch):
    # No GPU needed: CudaBackend's calls are bound to the registered schemas by name.
    cuda_backend.load()
    schemas = {op: getattr(torch.ops.vera_kernels_cuda, op).default._schema
               for op in ("forward", "backward")}
    recorder = _RecordingOps()
    monkeypatch.setattr(torch.ops, "vera_kernels_cuda", recorder)
    dropout = DropoutMask(0.25, seed_words(2**33 + 3, "cpu"))
    x, d, b = torch.ones(3, 4), torch.ones(2), torch.ones(5)
    source = ProjectionSource.from_seed(7)
    cuda_backend.BACKEND.forward(x, d, b, source, None, dropout=dropout)
    cuda_backend.BACKEND.backward(torch.ones(3, 5), torch.ones(3, 2), d, b, source, 4,
                                  NeededGrads(True, False, False), dropout=dropout)
    expected = {"dropout_threshold": dropout.threshold, "dropout_scale": dropout.scale,
                "key0": 7, "key1": 0}
    for op, schema in schemas.items():
        args = recorder.calls[op]
        assert len(args) == len(schema.arguments)
        named = {a.name: v for a, v in zip(schema.arguments, args)}
        assert {k: named[k] for k in expected} == expected
        assert named["dropout_seed"] is dropout.seed  # the tensor itself, never read on the host
        assert named["adapter_ids"] is None
    dx_into = torch.zeros(3, 4)
    cuda_backend.BACKEND.backward(torch.ones(3, 5), torch.ones(3, 2), d, b, source, 4,
                                  NeededGrads(True, False, False), dx_into=dx_into)
    named = dict(zip([a.name for a in schemas["backward"].arguments], recorder.calls["backward"]))
    assert named["dx_into"] is dx_into


@needs_toolkit
@pytest.mark.parametrize("precision,dtype,tf32", [
    ("highest", torch.float32, False), ("high", torch.float32, True),
    ("medium", torch.float32, True), ("high", torch.float16, False),
    ("high", torch.float64, False)])
def test_backend_asks_for_tf32_as_torch_matmul_precision_allows(precision, dtype, tf32,
                                                                monkeypatch):
    # fp32 only, below "highest" (as torch.mm and the Triton backend); the setting restored.
    cuda_backend.load()
    schemas = {op: getattr(torch.ops.vera_kernels_cuda, op).default._schema
               for op in ("forward", "backward")}
    recorder = _RecordingOps()
    monkeypatch.setattr(torch.ops, "vera_kernels_cuda", recorder)
    x, d, b = torch.ones(3, 4, dtype=dtype), torch.ones(2), torch.ones(5)
    source = ProjectionSource.from_seed(7)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        cuda_backend.BACKEND.forward(x, d, b, source, None)
        cuda_backend.BACKEND.backward(torch.ones(3, 5, dtype=dtype), torch.ones(3, 2, dtype=dtype),
                                      d, b, source, 4, NeededGrads(True, True, True))
    finally:
        torch.set_float32_matmul_precision(previous)
    for op, schema in schemas.items():
        named = dict(zip([a.name for a in schema.arguments], recorder.calls[op]))
        assert named["tf32"] is tf32


def _default_arch_list() -> str:
    """setup.py's DEFAULT_CUDA_ARCH_LIST, read without running setup.py."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "DEFAULT_CUDA_ARCH_LIST" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no DEFAULT_CUDA_ARCH_LIST")


def _build_arch_list() -> str:
    """The architectures a build here uses: TORCH_CUDA_ARCH_LIST if set, else setup.py's default."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or _default_arch_list()


def _images(arch_list: str) -> tuple[set, set]:
    """(cubin archs, PTX archs) a TORCH_CUDA_ARCH_LIST value asks for; 75 is sm_75."""
    entries = [(int(e.removesuffix("+PTX").replace(".", "")), e.endswith("+PTX"))
               for e in re.split(r"[;\s]+", arch_list) if e]
    return {arch for arch, _ in entries}, {arch for arch, ptx in entries if ptx}


def test_default_arch_list_embeds_ptx_for_newer_gpus():
    # sm_100 / sm_120 have no cubin: the driver JIT-compiles the newest arch's PTX for them.
    cubins, ptx = _images(_default_arch_list())
    assert ptx == {max(cubins)}


def _cuobjdump():
    """cuobjdump from PATH, the CUDA toolkit or Triton's bundled copy; None without one."""
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [shutil.which("cuobjdump")]
    if CUDA_HOME is not None:
        candidates.append(os.path.join(CUDA_HOME, "bin", "cuobjdump"))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin is not None:
        candidates.append(os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin",
                                       "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _listed_archs(tool: str, option: str, library: Path, suffix: str) -> set:
    """The archs of the images ``cuobjdump <option>`` lists (``_C.1.sm_80.cubin``: 80)."""
    listing = subprocess.run([tool, option, str(library)], capture_output=True, text=True,
                             timeout=120).stdout
    return {int(arch) for arch in re.findall(rf"\.sm_(\d+)\.{suffix}\b", listing)}


@needs_toolkit
def test_prebuilt_extension_holds_the_build_architectures():
    library = cuda_backend.prebuilt_library()
    assert library is not None, "setup.py did not build vera_kernels/_C.so"
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (on PATH, in $CUDA_HOME/bin or Triton's) to list the images")
    arch_list = _build_arch_list()
    cubins = _listed_archs(tool, "-lelf", library, "cubin")
    ptx = _listed_archs(tool, "-lptx", library, "ptx")
    assert (cubins, ptx) == _images(arch_list), (
        f"{library} holds cubins {sorted(cubins)} and PTX {sorted(ptx)}, not what "
        f"TORCH_CUDA_ARCH_LIST={arch_list!r} builds (rebuild it: pip install -e .)")
    # What the extension reports (the reason's "compiled for") is what it holds.
    cuda_backend.load()
    assert sorted(torch.ops.vera_kernels_cuda.compiled_archs()) == sorted(
        10 * arch for arch in cubins | ptx)


@needs_toolkit
@pytest.mark.parametrize("arch", [75, 80, 90])
def test_gemm_kernels_run_the_tensor_core_types_on_tensor_cores(arch):
    # From the SASS (scripts/compile_check.py): fp16 on HMMA from sm_75, bf16 and fp32 at
    # TF32 precision from sm_80 (sm_75 has neither MMA: SIMT there), fp32 at IEEE precision
    # and fp64 on FMAs; no spills, static shared memory within a block's 48 KiB.
    check = load_compile_check()
    if check._tool("cuobjdump") is None:
        pytest.skip("no cuobjdump to read the SASS with")
    gemms = [r for r in check.compile_cuda(arch) if r["launch"].startswith("cuda:gemm_kernel")]
    assert len(gemms) == 5 * 2 * 3, "dtypes (fp32 twice) x (one adapter, banks) x dropout modes"
    tensor_cores = {r["dtype"]: set() for r in gemms}
    for r in gemms:
        tensor_cores[r["dtype"]].add(r["tensor_cores"])
    expected = {"fp16": {True}, "bf16": {arch >= 80}, "tf32": {arch >= 80}, "fp32": {False},
                "fp64": {False}}
    assert tensor_cores == expected
    assert not [r["launch"] for r in gemms if r["spill_bytes"] or r["local_bytes"]]
    assert not [r["launch"] for r in gemms if r["shared_bytes"] > 48 * 1024]


class _ImageQuery:
    """Stands in for torch.ops.vera_kernels_cuda's image query on two GPUs: an H100, whose
    sm_90 the library holds, and an RTX 5090 (sm_120), with no image it can run."""

    NO_IMAGE = ("cudaErrorNoKernelImageForDevice: no kernel image is available for execution "
                "on the device")

    def __init__(self):
        self.asked = []

    def kernel_image_problem(self, device):
        self.asked.append(device)
        return self.NO_IMAGE if device == 1 else ""

    def compiled_archs(self):
        return [900, 750, 800]


def test_no_kernel_image_for_the_device_makes_cuda_unavailable(monkeypatch):
    # No GPU needed: the devices, the library and its query are stand-ins.
    query = _ImageQuery()
    loads = []

    def load():
        loads.append(cuda_backend.prebuilt_library())
        monkeypatch.setattr(cuda_backend, "_loaded", True)

    monkeypatch.setattr(torch.ops, "vera_kernels_cuda", query)
    monkeypatch.setattr(cuda_backend, "_loaded", False)
    monkeypatch.setattr(cuda_backend, "_load_error", None)
    monkeypatch.setattr(cuda_backend, "_image_problems", {})
    monkeypatch.setattr(cuda_backend, "prebuilt_library", lambda: ROOT / "vera_kernels" / "_C.so")
    monkeypatch.setattr(cuda_backend, "load", load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: {0: (9, 0), 1: (12, 0)}[i])
    monkeypatch.setattr(torch.cuda, "get_device_name",
                        lambda i: {0: "NVIDIA H100", 1: "NVIDIA GeForce RTX 5090"}[i])

    assert "cuda" not in vk.available_backends()  # the current device, 1
    assert loads == [ROOT / "vera_kernels" / "_C.so"], "the prebuilt library is loaded to be asked"
    assert "cuda" in vk.available_backends("cuda:0")
    assert "cuda" not in vk.available_backends("cuda:1")
    expected = ("backend 'cuda' cannot run on cuda: the CUDA extension was compiled for sm_75, "
                "sm_80, sm_90 and has no kernel image this device (NVIDIA GeForce RTX 5090, "
                f"sm_120) can run ({query.NO_IMAGE}): rebuild it with "
                'TORCH_CUDA_ARCH_LIST="12.0" set, or use another backend')
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        ops.resolve_backend("cuda", torch.device("cuda"))
    assert query.asked == [1, 0], "asked once per device"


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
    # Without a GPU to query, the build needs the architectures named: setup.py's.
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path),
           "TORCH_CUDA_ARCH_LIST": _build_arch_list()}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vera_kernels_cuda::forward(" in proc.stdout
    assert ("Tensor? dropout_seed=None, bool tf32=False, int shard_in_offset=0, "
            "int shard_out_offset=0, int shard_in_features=0, Tensor? base_scale=None, "
            "Tensor? base_bias=None) -> (Tensor, Tensor)") in proc.stdout
    assert list(tmp_path.rglob("vera_kernels_cuda*.so")), "no JIT-built library in the cache"


@pytest.mark.parametrize("emulate", [None, "0", "1"])
def test_cuda_backend_takes_cpu_tensors_only_emulated(emulate, monkeypatch):
    # Without VERA_KERNELS_CUDA_EMULATE=1, CPU tensors are refused (and never auto-picked);
    # with it they run the kernels on the CPU (tests/test_cuda_emulation.py checks them).
    if emulate is None:
        monkeypatch.delenv(cuda_backend.EMULATE_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(cuda_backend.EMULATE_ENV_VAR, emulate)
    x = torch.randn(3, 4, dtype=torch.float64)
    d, b = torch.ones(2, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    assert ops.resolve_backend(None, torch.device("cpu")) != "cuda"
    if emulate != "1":
        with pytest.raises(RuntimeError, match=(
                "backend 'cuda' cannot run on cpu: .*CUDA tensors only "
                r"\(CPU tensors under VERA_KERNELS_CUDA_EMULATE=1\)")):
            vk.vera_linear(x, d, b, 0, backend="cuda")
        return
    if _toolkit_reason() is not None:
        with pytest.raises(RuntimeError, match="the CUDA emulation needs the CUDA toolkit"):
            vk.vera_linear(x, d, b, 0, backend="cuda")
        return
    torch.testing.assert_close(vk.vera_linear(x, d, b, 0, backend="cuda"),
                               vk.vera_linear(x, d, b, 0, backend="torch"))


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("tokens,features", [(70, 21), (129, 130), (5, 8)])
def test_cuda_dropout_masks_bit_exact(tokens, features, dtype):
    # With identity projections (r = in = out) and unit vectors, h = dropout(x) and
    # dx = dropout(grad) exactly: each is one product with one nonzero term.
    cuda_backend.load()
    dropout = DropoutMask(0.3, seed_words(2**40 + 9, "cuda"))
    eye = torch.eye(features, dtype=dtype, device="cuda")
    ones = torch.ones(features, dtype=dtype, device="cuda")
    x = torch.randn(tokens, features, dtype=dtype, device="cuda")
    grad = torch.randn(tokens, features, dtype=dtype, device="cuda")
    args = cuda_backend._dropout_args(dropout)
    expected = keep_mask(dropout, 0, tokens, features, "cuda").float() * dropout.scale
    acc = torch.promote_types(dtype, torch.float32)
    _, h = torch.ops.vera_kernels_cuda.forward(x, ones, ones, 0, 0, None, False, eye, eye, False,
                                               None, *args)
    assert torch.equal(h, (x.to(acc) * expected.to(acc)).to(dtype))
    dx, _, _ = torch.ops.vera_kernels_cuda.backward(grad, h, ones, ones, 0, 0, features, False,
                                                    True, False, False, eye, eye, None, *args)
    assert torch.equal(dx, (grad.to(acc) * expected.to(acc)).to(dtype))


@pytest.mark.gpu
def test_extension_has_a_kernel_image_for_this_gpu():
    cuda_backend.load()
    index = torch.cuda.current_device()
    assert torch.ops.vera_kernels_cuda.kernel_image_problem(index) == ""
    assert cuda_backend.kernel_image_problem(index) is None


@pytest.mark.gpu
def test_cuda_is_listed_with_a_gpu():
    assert "cuda" in vk.available_backends("cuda")
