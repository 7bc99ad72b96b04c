"""The examples run, short, as the README shows them."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_tiny_llama_short(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # the example is given no output path: it must write nothing here
    result = _load("finetune_tiny_llama").main(["--steps", "40", "--device", "cpu", "--log-every", "20"])
    assert list(tmp_path.iterdir()) == []
    assert isinstance(result["mean_step_ms"], float) and result["mean_step_ms"] > 0
    assert f"mean time per step: {result['mean_step_ms']:.1f} ms" in capsys.readouterr().out
    losses = result["losses"]
    # ln(64) = 4.16 at the start; 40 steps of VeRA alone bring it down clearly.
    assert losses[0] > 4.0 and min(losses[-5:]) < losses[0] - 0.3
    assert result["reload_diff"] == 0.0
    assert result["checkpointing_loss_diff"] < 1e-5 and result["checkpointing_vector_diff"] < 1e-6
    # Per decoder layer: 7 lambda_d of r = 64, and one lambda_b per output
    # (q 128, k 64, v 64, o 128, gate 256, up 256, down 128); 2 layers.
    assert result["trainable"] == 2 * (7 * 64 + (128 + 64 + 64 + 128 + 256 + 256 + 128))


def test_train_ddp_without_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "argv", ["train_ddp.py"])
    with pytest.raises(SystemExit) as exit_info:
        _load("train_ddp").main()
    assert "torchrun --nproc_per_node 2 examples/train_ddp.py" in str(exit_info.value.code)


def test_train_ddp_two_processes(tmp_path):
    out = tmp_path / "adapter.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLES / "train_ddp.py"), "--steps", "20", "--width", "64", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks on cpu" in proc.stdout
    assert "max output difference 0.00e+00" in proc.stdout
    assert out.exists()
