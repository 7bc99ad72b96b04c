"""scripts/run.py's setup logic, without creating a real venv or running pip.

The script is imported as a module; venv creation and the commands it runs
are replaced by recorders, and a fake venv is a pyvenv.cfg plus a shell
script standing in for its python.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake venvs are POSIX shell scripts")


@pytest.fixture
def run(monkeypatch, tmp_path):
    """scripts/run.py as a fresh module, on a machine with no CUDA toolkit unless a test adds one."""
    spec = importlib.util.spec_from_file_location("run_script", ROOT / "scripts" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("CUDA_HOME", "VERA_KERNELS_BUILD_CUDA", "VERA_VENV"):
        monkeypatch.setenv(name, "")  # so that the value from before is restored, even "unset"
        monkeypatch.delenv(name)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(module, "DEFAULT_CUDA", tmp_path / "usr-local-cuda")
    return module


def _executable(path: Path, exit_code: int = 0, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    path.chmod(mode)
    return path


def _fake_venv(env: Path, pip_works: bool = True) -> None:
    """What venv.create leaves: pyvenv.cfg and a python that imports pip (exit 0) or not."""
    env.mkdir(parents=True, exist_ok=True)
    (env / "pyvenv.cfg").write_text("home = /usr/bin\n")
    _executable(env / "bin" / "python", 0 if pip_works else 1)


@pytest.fixture
def installs(run, monkeypatch):
    """Records the venvs created and the commands run (with VERA_KERNELS_BUILD_CUDA at the time)."""
    calls = {"created": [], "run": []}

    def fake_run(*cmd, check=True):
        calls["run"].append(([str(c) for c in cmd], os.environ.get("VERA_KERNELS_BUILD_CUDA")))
        return 0

    def fake_create(env, with_pip=False):
        assert with_pip
        calls["created"].append(Path(env))
        _fake_venv(Path(env))

    monkeypatch.setattr(run, "_run", fake_run)
    monkeypatch.setattr(run.venv, "create", fake_create)
    return calls


def _stamp(run, env: Path, extra: str) -> Path:
    return env / f".installed-{extra}-{run._sources_digest()}"


@pytest.mark.parametrize("where", ["CUDA_HOME", "default", "nowhere"])
def test_no_nvcc_turns_the_cuda_build_off(run, monkeypatch, tmp_path, where):
    if where == "CUDA_HOME":  # a toolkit directory with libraries but no compiler
        (tmp_path / "cuda" / "lib64").mkdir(parents=True)
        monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
        expected = f"CUDA_HOME={tmp_path / 'cuda'} has no bin/nvcc"
    elif where == "default":  # a CUDA runtime image
        (run.DEFAULT_CUDA / "lib64").mkdir(parents=True)
        expected = f"{run.DEFAULT_CUDA} has no bin/nvcc"
    else:
        expected = "no CUDA toolkit (nvcc) found"
    assert run._cuda_environment().startswith(expected)
    assert os.environ["VERA_KERNELS_BUILD_CUDA"] == "0"


def test_a_non_executable_nvcc_is_no_toolkit(run, monkeypatch, tmp_path):
    _executable(tmp_path / "cuda" / "bin" / "nvcc", mode=0o644)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert "has no bin/nvcc" in run._cuda_environment()


def test_nvcc_under_cuda_home_keeps_the_build(run, monkeypatch, tmp_path):
    _executable(tmp_path / "cuda" / "bin" / "nvcc")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert run._cuda_environment() is None
    assert "VERA_KERNELS_BUILD_CUDA" not in os.environ
    assert os.environ["CUDA_HOME"] == str(tmp_path / "cuda")


def test_nvcc_in_the_default_toolkit_becomes_cuda_home(run):
    _executable(run.DEFAULT_CUDA / "bin" / "nvcc")
    assert run._cuda_environment() is None
    assert os.environ["CUDA_HOME"] == str(run.DEFAULT_CUDA)
    assert "VERA_KERNELS_BUILD_CUDA" not in os.environ


def test_an_explicit_build_choice_is_left_to_setup_py(run, monkeypatch):
    monkeypatch.setenv("VERA_KERNELS_BUILD_CUDA", "1")
    assert run._cuda_environment() is None
    assert os.environ["VERA_KERNELS_BUILD_CUDA"] == "1"


def test_install_without_toolkit_says_so_and_skips_the_extension(run, installs, monkeypatch, tmp_path,
                                                                  capsys):
    monkeypatch.setenv("VERA_VENV", str(tmp_path / "venv"))
    assert run.main(["test", "-x"]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("CUDA extension skipped")]
    assert len(skipped) == 1 and "no CUDA toolkit (nvcc) found" in skipped[0]
    install = next(flag for cmd, flag in installs["run"] if "--no-build-isolation" in cmd)
    assert install == "0"
    assert installs["run"][-1][0][-3:] == ["-m", "pytest", "-x"]
    assert _stamp(run, tmp_path / "venv", "test").exists()


def test_missing_ensurepip_is_one_line_and_exit_1(run, installs, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ensurepip", None)  # find_spec("ensurepip") -> None
    monkeypatch.setenv("VERA_VENV", str(tmp_path / "venv"))
    assert run.main(["bench"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "no ensurepip module" in err and f"python{sys.version_info.major}." in err
    assert "-venv" in err
    assert installs == {"created": [], "run": []}


@pytest.mark.parametrize("damage", ["no pip", "interrupted install"])
def test_half_built_venv_is_rebuilt(run, installs, tmp_path, capsys, damage):
    env = tmp_path / "venv"
    _fake_venv(env, pip_works=damage != "no pip")
    if damage == "interrupted install":
        (env / run.INSTALLING).touch()
    (env / "left-over").touch()
    assert run.ensure_env(env, "bench") == env / "bin" / "python"
    assert "rebuilding it" in capsys.readouterr().out
    assert installs["created"] == [env] and not (env / "left-over").exists()
    assert _stamp(run, env, "bench").exists() and not (env / run.INSTALLING).exists()


def test_a_directory_that_is_no_venv_is_never_deleted(run, installs, tmp_path):
    env = tmp_path / "mine"
    env.mkdir()
    (env / "keep").touch()
    run.ensure_env(env, "bench")
    assert (env / "keep").exists() and installs["created"] == [env]


def test_new_install_clears_stale_stamps(run, installs, tmp_path):
    env = tmp_path / "venv"
    _fake_venv(env)
    (env / "left-over").touch()
    stale = env / ".installed-test-0123456789abcdef"  # built from other sources (e.g. csrc/ before)
    same_sources = _stamp(run, env, "bench")  # still true of what is installed
    stale.touch()
    same_sources.touch()
    run.ensure_env(env, "test")
    assert not stale.exists() and same_sources.exists() and _stamp(run, env, "test").exists()
    # A healthy venv is reused, not rebuilt.
    assert installs["created"] == [] and (env / "left-over").exists()
    assert [cmd[-1] for cmd, _ in installs["run"]][-1] == ".[test]"


def test_installed_env_is_reused_without_commands(run, installs, tmp_path):
    env = tmp_path / "venv"
    _fake_venv(env)
    _stamp(run, env, "test").touch()
    assert run.ensure_env(env, "test") == env / "bin" / "python"
    assert installs == {"created": [], "run": []}


def test_relative_vera_venv_counts_from_the_current_directory(run, installs, monkeypatch, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("VERA_VENV", "rel/venv")
    assert run.main(["bench", "--quick"]) == 0
    env = work / "rel" / "venv"
    assert installs["created"] == [env]
    # Every command runs in ROOT, so the interpreter must be named absolutely.
    bench_cmd = installs["run"][-1][0]
    assert bench_cmd[0] == str(env / "bin" / "python") and bench_cmd[-1] == "--quick"
    assert not (run.ROOT / "rel").exists()
