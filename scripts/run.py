#!/usr/bin/env python3
"""Set up ``.venv`` (first run only) and run one of the project's jobs in it.

    python3 scripts/run.py bench [vera-bench args...]   # the microbenchmark
    python3 scripts/run.py test  [pytest args...]       # the test suite

Needs only Python >= 3.9 with pip and ensurepip (Debian/Ubuntu: python3-venv).
The package is reinstalled when pyproject.toml, setup.py or csrc/ change, and
the environment is rebuilt when it is broken (no pip, or an interrupted
install). VERA_VENV chooses another location; a relative one counts from the
directory the command is run from. The optional CUDA extension is built only
when a CUDA toolkit (nvcc) is found: CUDA_HOME, /usr/local/cuda or PATH.
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = {"bench": "bench", "test": "test"}
DEFAULT_CUDA = Path("/usr/local/cuda")
BUILD_CUDA = "VERA_KERNELS_BUILD_CUDA"
# Exists while an install runs: found at startup, it means one was interrupted.
INSTALLING = ".installing"


class SetupError(Exception):
    """A problem the user has to fix, explained in one line."""


def venv_dir() -> Path:
    """VERA_VENV, relative to the current directory, else ROOT/.venv; absolute.

    Absolute because every command runs with ROOT as its working directory.
    """
    return Path(os.environ.get("VERA_VENV") or ROOT / ".venv").absolute()


def _python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _has_nvcc(cuda_home: Path) -> bool:
    return shutil.which("nvcc", path=str(cuda_home / "bin")) is not None


def _toolkit_problem() -> Optional[str]:
    """Why there is no CUDA toolkit to build with, or None (then CUDA_HOME may be set)."""
    home = os.environ.get("CUDA_HOME")
    if home:
        return None if _has_nvcc(Path(home)) else f"CUDA_HOME={home} has no bin/nvcc"
    if _has_nvcc(DEFAULT_CUDA):
        # torch derives CUDA_HOME from `which nvcc`, which can be a wrapper outside
        # the toolkit; point it at the toolkit so setup.py can build the extension.
        os.environ["CUDA_HOME"] = str(DEFAULT_CUDA)
        return None
    if shutil.which("nvcc"):
        return None  # torch finds this toolkit itself
    if DEFAULT_CUDA.exists():
        return f"{DEFAULT_CUDA} has no bin/nvcc (a CUDA runtime image?)"
    return "no CUDA toolkit (nvcc) found"


def _cuda_environment() -> Optional[str]:
    """Prepare the environment for the optional CUDA extension; why it will be skipped, or None.

    torch's cpp_extension fails the whole install when the toolkit it guesses
    (CUDA_HOME, else nvcc on PATH, else /usr/local/cuda if it exists) has no
    nvcc, as on CUDA runtime images; without a toolkit the build is switched off
    instead (setup.py honours VERA_KERNELS_BUILD_CUDA=0). An explicit
    VERA_KERNELS_BUILD_CUDA is the user's choice and left to setup.py.
    """
    problem = _toolkit_problem()
    if problem is None or BUILD_CUDA in os.environ:
        return None
    os.environ[BUILD_CUDA] = "0"
    return problem


def _run(*cmd, check: bool = True) -> int:
    """Echo ``cmd`` and run it in the repository root; its exit status."""
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, check=check).returncode


def _sources_digest() -> str:
    digest = hashlib.sha256()
    # setup.py builds the CUDA extension from csrc/, so its sources count too.
    for path in [ROOT / "pyproject.toml", ROOT / "setup.py", *sorted((ROOT / "csrc").glob("*"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _broken(env: Path) -> bool:
    """Whether ``env`` is a venv left unusable: no pip (creation cut short) or an interrupted install."""
    if not (env / "pyvenv.cfg").exists():
        return False  # not a venv: nothing this script would delete
    if (env / INSTALLING).exists():
        return True
    py = _python(env)
    return not py.exists() or subprocess.call(
        [str(py), "-c", "import pip"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) != 0


def _create(env: Path) -> None:
    # venv needs ensurepip to install pip, and Debian / Ubuntu ship it separately.
    if importlib.util.find_spec("ensurepip") is None:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise SetupError(f"{sys.executable} has no ensurepip module, needed to create {env}: "
                         f"install python{version}-venv (Debian/Ubuntu: apt install python{version}-venv)")
    print(f"creating {env}", flush=True)
    venv.create(env, with_pip=True)


def ensure_env(env: Path, extra: str, cuda_problem: Optional[str] = None) -> Path:
    """Create the venv and install the package with ``extra`` unless already done; the venv's python.

    ``cuda_problem`` is why the CUDA extension will not be built (announced when installing).
    """
    digest = _sources_digest()
    stamp = env / f".installed-{extra}-{digest}"
    if stamp.exists():
        return _python(env)
    if _broken(env):
        print(f"{env} is incomplete (no pip, or an interrupted install): rebuilding it", flush=True)
        shutil.rmtree(env)
    if not _python(env).exists():
        _create(env)
    (env / INSTALLING).touch()
    # Stamps for other sources vouch for a build being replaced now: without
    # them, reverting csrc/ to an earlier state rebuilds.
    for old in env.glob(".installed-*"):
        if not old.name.endswith(digest):
            old.unlink()
    if cuda_problem:
        print(f"CUDA extension skipped: {cuda_problem}; the torch and triton backends do not need it "
              "(set CUDA_HOME to a toolkit to build it)", flush=True)
    py = _python(env)
    _run(py, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools>=77", "wheel")
    # torch first: setup.py imports it to build the optional CUDA extension,
    # so the package is installed without build isolation.
    _run(py, "-m", "pip", "install", "-q", "torch>=2.6")
    _run(py, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", f".[{extra}]")
    # Marker off before the stamp: cut between the two, the next run reinstalls
    # (cheap) rather than rebuilding the venv.
    (env / INSTALLING).unlink()
    stamp.touch()
    return py


def main(argv: list) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__, file=sys.stderr)
        return 2
    job, args = argv[0], argv[1:]
    env = venv_dir()
    cuda_problem = _cuda_environment()
    try:
        py = ensure_env(env, EXTRAS[job], cuda_problem)
    except (SetupError, subprocess.CalledProcessError) as error:
        print(f"run.py: {error}", file=sys.stderr)
        return 1
    if job == "bench":
        return _run(py, "-m", "vera_kernels.bench", *args, check=False)
    return _run(py, "-m", "pytest", *(args or ["-q"]), check=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
