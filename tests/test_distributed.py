"""VeRA layers under DDP and FSDP2: 2 CPU processes with gloo on loopback.

Only the vectors travel between ranks (A and B follow from the seed), so
training must give every rank the same vectors, equal to single-process
training on the concatenated batches, and the adapter checkpoint must load
into a plain model. Rendezvous through a file; gloo on loopback only.
"""

import importlib.util
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vera_kernels as vk
from distributed_worker import TARGETS, WORLD, batches, build_model, run, train

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")

TIMEOUT_S = 180


def _run_ranks(mode: str, out_dir) -> list:
    ctx = mp.start_processes(
        run, args=(mode, str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{mode} ranks did not finish within {TIMEOUT_S} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def _single_process(use_dora: bool = False):
    model = build_model(use_dora)
    x, y, x_eval = batches()
    train(model, x, y)
    return model, x_eval


def _zero3(mode: str = "zero3"):
    # DeepSpeed on a machine without a GPU: its CPU accelerator, chosen before import.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return pytest.param(mode, marks=pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"))


# "+dora": DVoRA layers, whose vectors FSDP2 and ZeRO-3 change in place without a version
# bump (the norms must follow them).
@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp1", _zero3(), "fsdp2+dora",
                                  _zero3("zero3+dora")])
def test_two_ranks_match_single_process(mode, tmp_path):
    dora = mode.endswith("+dora")
    results = _run_ranks(mode, tmp_path)
    reference, x_eval = _single_process(dora)
    expected = vk.vera_state_dict(reference)
    states = [r["state"] for r in results]
    vector_keys = [k for k in expected if k != "vera_config"]
    assert len(vector_keys) == (3 if dora else 2) * len(TARGETS)
    for key in vector_keys:
        # identical on both ranks (they were synchronized, not just similar) ...
        assert torch.equal(states[0][key], states[1][key]), key
        # ... and what one process computes on the whole batch
        torch.testing.assert_close(states[0][key], expected[key], rtol=1e-5, atol=1e-6)
    assert states[0]["vera_config"] == expected["vera_config"]
    # Training moved the vectors: the comparison above is not of initial values.
    assert not torch.allclose(expected[vector_keys[1]],
                              build_model(dora).state_dict()[vector_keys[1]])

    # The checkpoint from the ranks loads into a plain single-process model, and so does
    # the adapter file they wrote: whole vectors under the model's own names.
    fresh = build_model(dora)
    vk.load_vera_state_dict(fresh, states[0])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x_eval), results[0]["out"], rtol=1e-5, atol=1e-6)
    plain = vk.load_adapter(build_model(dora).requires_grad_(False), tmp_path / "adapter")
    for key in vector_keys:
        torch.testing.assert_close(vk.vera_state_dict(plain)[key], expected[key],
                                   rtol=1e-5, atol=1e-6)
    # The LoRA export too: whole factors, equal to the single process's.
    from safetensors.torch import load_file
    lora = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    vk.save_lora_adapter(reference, tmp_path / "reference_lora")
    for key, value in load_file(tmp_path / "reference_lora" / "adapter_model.safetensors").items():
        torch.testing.assert_close(lora[key], value, rtol=1e-5, atol=1e-6)


def test_ddp_syncs_only_the_vectors():
    # What DDP all-reduces is what requires grad: the vectors, nothing else.
    model = build_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.vera_lambda_{v}" for t in TARGETS for v in "db"}
    assert list(model.buffers()) == []  # no projection buffers to broadcast


def test_ddp_trains_the_active_adapter_of_several(tmp_path):
    # Two adapters, the second active: only its vectors require grad, so DDP with
    # its default find_unused_parameters=False runs every step (it failed on the
    # second one while the inactive adapter's vectors required grad too).
    results = _run_ranks("ddp_second_adapter", tmp_path)
    reference = build_model()
    vk.add_adapter(reference, "fr")
    vk.set_adapter(reference, "fr")
    x, y, _ = batches()
    train(reference, x, y)
    expected = vk.vera_state_dict(reference, adapter="fr")
    for key in (k for k in expected if k != "vera_config"):
        assert torch.equal(results[0]["state"][key], results[1]["state"][key]), key
        torch.testing.assert_close(results[0]["state"][key], expected[key], rtol=1e-5, atol=1e-6)
    untouched = vk.vera_state_dict(build_model())
    trained_default = vk.vera_state_dict(reference)
    assert all(torch.equal(trained_default[k], untouched[k]) for k in untouched if k != "vera_config")
