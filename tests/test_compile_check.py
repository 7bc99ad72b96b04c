"""Every kernel specialization the launchers use compiles for sm_80 / sm_90 within budget (no GPU).

``scripts/compile_check.py --quick``, then tf32 on sm_90, then the sm_90 bf16
dropout and adapter-bank launches, run once per module in subprocesses,
without TRITON_INTERPRET, and their records are checked: no spills, shared
memory within the arch's opt-in limit, tensor cores for the 16-bit and tf32
GEMMs, and on sm_90 the instruction and waits of kernels.tiles_for (generated
tiles on mma.sync; loaded operands on wgmma loops that never wait; a masked
or per-row-scaled x on either, with a tile that does not wait). Every config
the autotuner can pick is checked; pruned ones are compiled and reported only.

The numbers below were measured with Triton 3.8.0 (its bundled ptxas 12.9);
Triton 3.6.0 (ptxas 12.8) agrees except where noted.

Cost: ~4 (warm cache) to ~9 (cold) minutes on a 2-core machine; Triton's
cache (~/.triton/cache or TRITON_CACHE_DIR) keeps reruns short.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import load_compile_check

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "compile_check.py"
GEMM_LAUNCHES = ("h", "y", "u+dd", "dx", "db")
ALL_GEMMS = GEMM_LAUNCHES + ("u", "z")  # adapter banks store u and z, reduce in torch
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _nvcc():
    candidate = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def _why_not_runnable():
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed: there is nothing to compile the Triton kernels with"
    if _nvcc() is None:
        return ("nvcc not found (neither $CUDA_HOME/bin/nvcc, CUDA_HOME defaulting to "
                "/usr/local/cuda, nor on PATH): the CUDA C++ kernels cannot be compiled")
    return None


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    """The JSON outputs of the module's compile_check runs."""
    reason = _why_not_runnable()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("compile_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    found = []
    # --quick: sm_90 bf16 / fp32 / fp16 and sm_80 bf16 (+ nvcc on both); then tf32 on sm_90,
    # and the launches of dropout and adapter banks (x computed in the loop) and of DVoRA's
    # scaled base (the epilogue) in sm_90 bf16.
    for name, extra in (("quick", []), ("tf32", ["--arch", "90", "--dtypes", "tf32", "--no-cuda"]),
                        ("variants", ["--arch", "90", "--dtypes", "bf16", "--variants", "dropout",
                                      "banked", "dora", "--no-cuda"])):
        path = out / f"{name}.json"
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--quick", *extra, "--json", str(path)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False)
        # 1: some compile failed (the records say which: test_every_launch_compiles)
        assert proc.returncode in (0, 1) and path.exists(), (
            f"compile_check.py {name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        found.append(json.loads(path.read_text()))
    return found


@pytest.fixture(scope="module")
def records(payloads):
    found = [r for payload in payloads for r in payload["records"]]
    triton = [r for r in found if not r["launch"].startswith("cuda:")]
    if triton and all(r.get("spill_bytes") is None for r in triton if not r.get("error")):
        pytest.skip("cuobjdump (Triton's bundled copy or $CUDA_HOME/bin) is missing: no SASS, "
                    "so spills and wgmma waits cannot be read")
    return found


def _select(records, arch=None, dtypes=None, launches=None, strategy=None, triton_only=False):
    out = []
    for r in records:
        base_launch = r["launch"].split("[")[0]
        if arch is not None and r["arch"] != arch:
            continue
        if dtypes is not None and r["dtype"] not in dtypes:
            continue
        if launches is not None and base_launch not in launches:
            continue
        if strategy is not None and r["strategy"] != strategy:
            continue
        if triton_only and r["launch"].startswith("cuda:"):
            continue
        out.append(r)
    return out


def _describe(r) -> str:
    c = r.get("config") or {}
    cfg = ",".join(f"{k}={v}" for k, v in c.items() if k != "num_ctas")
    return f"sm_{r['arch']} {r['dtype']} {r['strategy']} {r['launch']} [{cfg}]"


def _launchable(r) -> bool:
    return r.get("pruned") is not True  # None (pruning not evaluable here) counts as launchable


# ----------------------------------------------------------------------------
# Parsers (fast, no Triton or nvcc needed)
# ----------------------------------------------------------------------------

SASS_PIPELINED = """
        Function : k
        /*0100*/                   MOV R1, c[0x0][0x28] ;  /* 0x0 */
        /*0110*/                   STL.64 [R1+0x8], R2 ;  /* 0x0 */
        /*0120*/                   WARPGROUP.ARRIVE ;  /* 0x0 */
        /*0130*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;  /* 0x0 */
        /*0140*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;  /* 0x0 */
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;  /* 0x0 */
        /*0160*/               @P0 BRA 0x120 ;  /* 0x0 */
        /*0170*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;  /* 0x0 */
        /*0180*/                   LDL R4, [R1+0x8] ;  /* 0x0 */
        /*0190*/                   EXIT ;  /* 0x0 */
"""


def test_sass_reading_pipelined_loop():
    cc = load_compile_check()
    facts = cc.sass_facts(SASS_PIPELINED)
    assert facts["spill_bytes"] == 8 and facts["spill_load_bytes"] == 4
    assert facts["serialized_sass"] is False  # the wait for 0 is after the loop
    assert facts["loop_hgmma"] == 2 and facts["sass_mma"] == ["HGMMA"]


def test_sass_reading_serialized_loops():
    cc = load_compile_check()
    by_triton = SASS_PIPELINED.replace("gsb0, 0x1", "gsb0, 0x0")
    facts = cc.sass_facts(by_triton)
    assert facts["serialized_sass"] is True and facts["serialized_by"] == "triton"
    by_ptxas = SASS_PIPELINED.replace(
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;",
        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;\n"
        "        /*0138*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;").replace(
        "gsb0, 0x1", "gsb0, 0x0")
    assert cc.sass_facts(by_ptxas)["serialized_by"] == "ptxas"


def test_ptx_reading():
    cc = load_compile_check()
    ptx = """
$L__BB0_2:
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, %p1, 1, 1, 0, 0;
	wgmma.commit_group.sync.aligned;
	wgmma.wait_group.sync.aligned 1;
	@%p2 bra 	$L__BB0_2;
	wgmma.wait_group.sync.aligned 0;
"""
    assert cc.ptx_facts(ptx) == {"mma": "wgmma", "serialized_ptx": False}
    serial = ptx.replace("aligned 1;", "aligned 0;")
    assert cc.ptx_facts(serial)["serialized_ptx"] is True
    assert cc.ptx_facts("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")["mma"] == "mma.sync"


# The old kernel's x tile address (``offs_k[None, :] * stride_xk`` in i32), as
# Triton's first TTIR spells it, and the same with the index widened first.
TTIR_NARROW = """
  tt.func public @k(%x_ptr: !tt.ptr<bf16> loc("x_ptr"(#loc)), %stride_xk: i32 loc("stride_xk"(#loc))) {
      %offs_k = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32> loc(#loc1)
      %x_78 = tt.expand_dims %offs_k {axis = 0 : i32} : tensor<64xi32> -> tensor<1x64xi32> loc(#loc2)
      %x_79 = tt.splat %stride_xk : i32 -> tensor<1x64xi32> loc(#loc2)
      %x_90 = arith.muli %x_78, %x_79 : tensor<1x64xi32> loc(#loc2)
      %c = arith.constant dense<3> : tensor<1x64xi32> loc(#loc3)
      %x_91 = arith.muli %x_78, %c : tensor<1x64xi32> loc(#loc3)
"""
TTIR_WIDE = TTIR_NARROW.replace(
    "%x_90 = arith.muli %x_78, %x_79 : tensor<1x64xi32>",
    "%x_80 = arith.extsi %x_78 : tensor<1x64xi32> to tensor<1x64xi64>\n"
    "      %x_81 = arith.extsi %stride_xk : i32 to i64\n"
    "      %x_82 = tt.splat %x_81 : i64 -> tensor<1x64xi64>\n"
    "      %x_90 = arith.muli %x_80, %x_82 : tensor<1x64xi64>")


def test_ttir_reading_finds_32_bit_index_times_argument():
    cc = load_compile_check()
    (line,) = cc.narrow_index_products(TTIR_NARROW)  # not the product with a constant
    assert line.startswith("%x_90 = arith.muli %x_78, %x_79")
    assert cc.narrow_index_products(TTIR_WIDE) == []


@pytest.mark.slow
def test_no_32_bit_index_products(payloads):
    # Every launch of every run, with its strides runtime values: an index
    # that meets a stride is 64-bit, so (cols - 1) * stride may pass 2^31.
    for payload in payloads:
        assert "narrow_offsets" in payload and payload["narrow_offsets"] == []


def test_ptxas_log_reading():
    cc = load_compile_check()
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4kernPf' for 'sm_90'
ptxas info    : Function properties for _Z4kernPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 12288 bytes smem, 400 bytes cmem[0]
"""
    assert cc.parse_ptxas_log(log) == {"_Z4kernPf": {
        "local_bytes": 16, "spill_bytes": 8, "spill_load_bytes": 12, "registers": 64,
        "shared_bytes": 12288}}


# ----------------------------------------------------------------------------
# The compiled kernels (slow: one --quick run per module)
# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_every_launch_compiles(records):
    errors = [f"{_describe(r)}: {r['error'].splitlines()[0]}" for r in records if r.get("error")]
    assert not errors, "\n".join(errors)
    for arch in (80, 90):
        for strategy in ("generate", "workspace"):
            found = {r["launch"] for r in _select(records, arch=arch, dtypes=("bf16",),
                                                   strategy=strategy)}
            expected = set(GEMM_LAUNCHES) | (
                {"workspace_A", "workspace_B"} if strategy == "workspace" else set())
            assert expected <= found, f"sm_{arch} {strategy}: recorded {sorted(found)}"
        cuda = [r for r in records if r["arch"] == arch and r["launch"].startswith("cuda:")]
        assert cuda, f"no CUDA C++ kernel records for sm_{arch}"
    configs = {json.dumps(r["config"], sort_keys=True)
               for r in _select(records, arch=90, dtypes=("bf16",), launches=("y",))}
    assert len(configs) >= 2, "expected every autotune config of the GEMM to be compiled"


# What the autotuner no longer picks because it spilled (its configs are still
# compiled and reported, marked pruned): fp32 at IEEE precision in every
# generate-strategy config of the tensor-core tiles (440-10972 B per thread;
# FMA dots now have kernels.FMA_TILES); on sm_80 three tiles that ptxas spills
# by 8-112 B in some launch (kernels.SM80_SPILLING_TILES).
SPILL_GROUPS = [(80, "bf16"), (80, "fp16"), (80, "fp32"), (90, "bf16"), (90, "fp16"),
                (90, "fp32"), (90, "tf32")]


@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype", [
    pytest.param(a, d, id=f"sm_{a}-{d}") for a, d in SPILL_GROUPS])
def test_no_spills(records, arch, dtype):
    group = [r for r in _select(records, arch=arch, dtypes=(dtype,)) if _launchable(r)]
    if not group:
        pytest.skip(f"--quick compiles nothing for sm_{arch} {dtype}")
    spilling = [f"{_describe(r)}: {r['spill_bytes']} B spill stores, {r['local_bytes']} B local, "
                f"{r['registers']} registers"
                for r in group if r.get("spill_bytes") or r.get("local_bytes")]
    assert not spilling, "\n".join(spilling)


@pytest.mark.slow
def test_shared_memory_within_the_arch_limit(records):
    over = [f"{_describe(r)}: {r['shared_bytes']} B > {SMEM_LIMIT[r['arch']]} B"
            for r in records if _launchable(r) and r.get("shared_bytes") is not None
            and r["shared_bytes"] > SMEM_LIMIT[r["arch"]]]
    assert not over, "configs the autotuner can pick that cannot launch:\n" + "\n".join(over)


ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4, "fp64": 8}


@pytest.mark.slow
def test_the_pruning_estimates_shared_memory_as_compiled(records):
    # kernels.shared_bytes decides what fits sm_8x (163 KB; 99 KB on sm_86 / sm_89):
    # never below what the compiled kernel asks for, and where the pipeline's
    # buffers dominate a loaded projection's launch, within its scratch of that.
    from vera_kernels.backends.triton import kernels
    close = 0
    for r in _select(records, arch=80, triton_only=True):
        c = r.get("config") or {}
        if "BLOCK_M" not in c or r.get("shared_bytes") is None:
            continue
        m, n, k, stages = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"]
        element = ELEMENT_BYTES[r["dtype"]]
        estimate = kernels.shared_bytes((m, n, k, c["num_warps"], stages), element)
        assert estimate >= r["shared_bytes"], f"{_describe(r)}: estimated {estimate} B"
        pipeline = (stages - 1) * (m * k + k * n) * element
        if r["strategy"] == "workspace" and pipeline >= m * n * 4:
            assert estimate - r["shared_bytes"] <= kernels.SHARED_SCRATCH, (
                f"{_describe(r)}: estimated {estimate} B")
            close += 1
    assert close  # the sm_80 bf16 records of --quick


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "tf32"])
def test_tensor_cores(records, dtype):
    gemms = _select(records, dtypes=(dtype,), launches=ALL_GEMMS, triton_only=True)
    if not gemms:
        pytest.skip(f"nothing compiled for {dtype}")
    simt = [_describe(r) for r in gemms if not r["tensor_cores"]]
    assert not simt, "main loop without mma.sync / wgmma:\n" + "\n".join(simt)
    # sm_90 (kernels.tiles_for): generated tiles on mma.sync (2-warp tiles),
    # plain loaded operands on wgmma, a masked / per-row-scaled x on either.
    sm90 = [r for r in gemms if r["arch"] == 90 and _launchable(r)]
    expected = {"generate": {"mma.sync"}, "computed": {"mma.sync", "wgmma"}, "plain": {"wgmma"}}
    found = {}
    for r in sm90:
        found.setdefault((_kind(r), r["launch"]), set()).add(r.get("mma"))
    wrong = [f"sm_90 {dtype} {kind} {launch}: {sorted(mmas)}, expected {sorted(expected[kind])}"
             for (kind, launch), mmas in found.items() if mmas != expected[kind]]
    assert not wrong, "sm_90 GEMMs on the wrong instruction:\n" + "\n".join(wrong)
    assert {kind for kind, _ in found} >= {"generate", "plain"}


def _kind(r) -> str:
    """generate (a generated tile), computed (x masked / scaled per row in the loop) or plain."""
    if r["strategy"] == "generate":
        return "generate"
    return "computed" if r["computed_operand"] else "plain"


@pytest.mark.slow
@pytest.mark.parametrize("launch", ALL_GEMMS)
def test_sm90_wgmma_main_loop_is_pipelined(records, launch):
    """No main loop on sm_90 (bf16 / fp16) the autotuner can pick waits for its wgmma,
    except where x is computed in the loop and the autotuner times a waiting wgmma
    tile against mma.sync ones.

    Loaded projections keep a wgmma in flight since the vector scales moved onto
    the projection operand (with Triton 3.6's ptxas 12.8, ptxas itself still
    serializes a few tiles: bf16 h at BLOCK_N=256 BLOCK_K=32, and tf32 at
    BLOCK_N=128, so this test fails under Triton 3.6); generated tiles run
    on mma.sync, with nothing to wait for (Triton would wait for every wgmma).
    """
    group = [r for r in _select(records, arch=90, dtypes=("bf16", "fp16"), launches=(launch,))
             if _launchable(r)]
    assert group, f"no sm_90 {launch} records"
    serialized = [f"{_describe(r)}: serialized by {r.get('serialized_by')} "
                  f"({r.get('loop_waits0')} waits for 0 around {r.get('loop_hgmma')} HGMMA)"
                  for r in group if r["serialized_mma"] and _kind(r) != "computed"]
    assert not serialized, "\n".join(serialized)
    computed = {r["launch"] for r in group if _kind(r) == "computed"}
    unpipelined = [name for name in sorted(computed) if not any(
        r["launch"] == name and _kind(r) == "computed" and not r["serialized_mma"] for r in group)]
    assert not unpipelined, f"no tile that does not wait for its wgmma: {unpipelined}"
