"""transformers and accelerate: Trainer checkpoints and resume, save_pretrained, adapter files.

A tiny Llama built from a config (no downloads), trained on CPU.
"""

import json
import os

import pytest
import torch

import vera_kernels as vk
from vera_kernels.module import decode_extra_state
from helpers import tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

VOCAB = 61
TARGETS = ["q_proj", "v_proj", "down_proj"]
SEED = 2**63 + 11  # above int64: the extra state must still carry it


def _llama():
    return tiny_llama(VOCAB, max_position_embeddings=32)


def _vera_llama():
    return vk.apply_vera(_llama(), TARGETS, r=8, seed=SEED)


class _Data(torch.utils.data.Dataset):
    """Sequences that repeat a random token: something the adapter can learn."""

    def __init__(self, n=64, length=12):
        gen = torch.Generator().manual_seed(5)
        self.items = torch.randint(0, VOCAB, (n, 1), generator=gen).repeat(1, length)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def _args(out, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, learning_rate=5e-2, max_steps=10,
        save_steps=5, logging_steps=5, report_to=[], use_cpu=True, seed=3, data_seed=3,
        dataloader_num_workers=0, disable_tqdm=True, **kw,
    )


def _vectors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "vera_lambda" in n}


def _train(out, resume=None):
    model = _vera_llama()
    trainer = transformers.Trainer(model=model, args=_args(out), train_dataset=_Data(),
                                   callbacks=[vk.VeRATrainerCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return model


@pytest.mark.slow
def test_trainer_checkpoints_resume_and_adapter_files(tmp_path):
    uninterrupted = _train(tmp_path / "a")
    for step in (5, 10):
        checkpoint = tmp_path / "a" / f"checkpoint-{step}"
        assert (checkpoint / "model.safetensors").exists()
        assert (checkpoint / "vera_adapter" / "adapter_model.safetensors").exists()
    resumed = _train(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-5"))
    trained, again = _vectors(uninterrupted), _vectors(resumed)
    assert trained.keys() == again.keys() and trained
    for name in trained:
        torch.testing.assert_close(again[name], trained[name], rtol=1e-6, atol=1e-7, msg=name)
    # Training moved b away from its zero init.
    assert any(v.abs().max() > 0 for n, v in trained.items() if n.endswith("vera_lambda_b"))

    # The checkpoint's adapter files load onto a fresh base model.
    fresh = vk.load_adapter(_llama(), tmp_path / "a" / "checkpoint-10" / "vera_adapter")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    uninterrupted.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, uninterrupted(ids).logits, rtol=0, atol=0)


def test_save_pretrained_writes_safetensors_with_the_seed(tmp_path):
    model = _vera_llama()
    model.save_pretrained(tmp_path)  # crashed on dict extra state before
    from safetensors.torch import load_file

    state = load_file(tmp_path / "model.safetensors")
    extra = [k for k in state if k.endswith("_extra_state")]
    assert len(extra) == 2 * len(TARGETS)
    assert decode_extra_state(state[extra[0]]) == {"seed": SEED, "r": 8, "merged": False,
                                                   "merged_adapter": None}
    fresh = _vera_llama()
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(1.0)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected
    for name, value in _vectors(model).items():
        assert torch.equal(_vectors(fresh)[name], value)


def test_old_dict_extra_state_still_loads():
    layer = vk.VeRALinear(5, 4, r=3, seed=0)
    state = layer.state_dict()
    state["_extra_state"] = {"seed": 2**40 + 1, "r": 3, "merged": False}
    layer.load_state_dict(state)
    assert layer.seed == 2**40 + 1


def test_adapter_files_round_trip_and_size(tmp_path):
    model = _vera_llama()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    vk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "vera_adapter_config.json").read_text())
    assert config["seed"] == SEED and config["r"] == 8 and config["d_initial"] == 0.1
    assert config["target_modules"] == [n for n, _ in vk.model.vera_layers(model)]
    # Vectors only: 2 layers x (q 32 + v 16 + down 32 outputs + 3 x r 8) floats, plus headers.
    assert os.path.getsize(tmp_path / "adapter_model.safetensors") < 4 * 2 * (80 + 24) + 4096

    vk.save_adapter(model, tmp_path / "bf16", dtype=torch.bfloat16)
    half = os.path.getsize(tmp_path / "bf16" / "adapter_model.safetensors")
    assert half < os.path.getsize(tmp_path / "adapter_model.safetensors") - 2 * 2 * (80 + 24) + 64

    fresh = vk.load_adapter(_llama(), tmp_path)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert all(p.requires_grad == ("vera_lambda" in n) for n, p in fresh.named_parameters())
    # A model that already has matching layers takes the vectors too.
    again = vk.load_adapter(_vera_llama(), tmp_path)
    for name, value in _vectors(model).items():
        assert torch.equal(_vectors(again)[name], value)


def test_adapter_that_does_not_fit_is_a_clear_error(tmp_path):
    vk.save_adapter(_vera_llama(), tmp_path)
    other = vk.apply_vera(_llama(), TARGETS, r=4, seed=SEED)
    with pytest.raises(ValueError, match="'r': 8"):
        vk.load_adapter(other, tmp_path)
    config = json.loads((tmp_path / "vera_adapter_config.json").read_text())
    config["target_modules"][0] = "model.layers.0.self_attn.nope"
    (tmp_path / "vera_adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not have"):
        vk.load_adapter(_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="vera_adapter_config.json"):
        vk.load_adapter(_llama(), tmp_path / "missing")


def test_accelerate_save_and_load_state(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = _vera_llama()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    saved = _vectors(model)
    accelerator.save_state(str(tmp_path))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    accelerator.load_state(str(tmp_path))
    for name, value in saved.items():
        assert torch.equal(_vectors(model)[name], value)
