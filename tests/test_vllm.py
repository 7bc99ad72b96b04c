"""vLLM integration: the plugin's switches here (no vLLM needed), and scripts/vllm_check.py,
which serves adapters with vLLM's CPU build both ways and checks every greedy token, when
VERA_KERNELS_VLLM=1 (its venv is 3.5 GB: too slow to build in every CI run)."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vera_kernels.integrations import vllm as plugin

ROOT = Path(__file__).resolve().parent.parent


def test_the_entry_point_is_declared():
    # vLLM runs every vllm.general_plugins entry point in each of its processes.
    points = importlib.metadata.entry_points(group="vllm.general_plugins")
    (point,) = [p for p in points if p.name == "vera_kernels"]
    assert point.load() is plugin.register


def test_off_without_the_engine_settings(monkeypatch):
    monkeypatch.delenv(plugin.ENV_R, raising=False)
    monkeypatch.delenv(plugin.ENV_SEED, raising=False)
    assert plugin.engine_settings() is None
    modules = set(sys.modules)
    plugin.register()  # installed beside LoRA engines: changes nothing, imports nothing
    assert not plugin._registered
    assert not {m for m in set(sys.modules) - modules if m.startswith("vllm")}


@pytest.mark.parametrize("r,seed,match", [
    ("16", None, "VERA_KERNELS_VLLM_SEED is not"),
    ("0", "7", "positive"),
    ("x", "7", "expected a positive int"),
    ("16", str(2**64), "expected a positive int and an int in"),
])
def test_bad_engine_settings_are_refused(monkeypatch, r, seed, match):
    monkeypatch.setenv(plugin.ENV_R, r)
    if seed is None:
        monkeypatch.delenv(plugin.ENV_SEED, raising=False)
    else:
        monkeypatch.setenv(plugin.ENV_SEED, seed)
    with pytest.raises(ValueError, match=match):
        plugin.engine_settings()


def test_engine_settings(monkeypatch):
    monkeypatch.setenv(plugin.ENV_R, "256")
    monkeypatch.setenv(plugin.ENV_SEED, str(2**64 - 1))
    assert plugin.engine_settings() == (256, 2**64 - 1)


def test_untested_vllm_releases_are_refused():
    plugin.check_vllm_version("0.32.0")
    plugin.check_vllm_version("0.32.4.dev3+cpu")
    for version in ("0.31.9", "0.33.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=f"vLLM {version} is installed"):
            plugin.check_vllm_version(version)
    with pytest.raises(RuntimeError, match="cannot read"):
        plugin.check_vllm_version("nightly")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VERA_KERNELS_VLLM") != "1",
                    reason="serves with vLLM's CPU build in a 3.5 GB venv of its own: set "
                           "VERA_KERNELS_VLLM=1 (first run ~5 min to install, then ~4 min)")
def test_vllm_serves_every_token_both_ways(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "vllm_check.py"),
                           "--json", str(report)], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    checks = json.loads(report.read_text())["checks"]
    assert len(checks) >= 5 and all(not c["mismatches"] for c in checks.values())
    assert all(c["equal"] + c["ties"] == c["rows"] for c in checks.values())
