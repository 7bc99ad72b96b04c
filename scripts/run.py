#!/usr/bin/env python3
"""Set up ``.venv`` (first run only) and run one of the project's jobs in it.

    python3 scripts/run.py bench [vera-bench args...]   # the microbenchmark
    python3 scripts/run.py test  [pytest args...]       # the test suite

Needs only Python >= 3.9 with pip. The environment is rebuilt when
pyproject.toml, setup.py or csrc/ change; VERA_VENV chooses another location.
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("VERA_VENV", ROOT / ".venv"))
EXTRAS = {"bench": "bench", "test": "test"}


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _cuda_environment() -> None:
    # torch derives CUDA_HOME from `which nvcc`, which can be a wrapper outside
    # the toolkit; point it at the toolkit so setup.py can build the extension.
    default = Path("/usr/local/cuda")
    if "CUDA_HOME" not in os.environ and (default / "include" / "cuda_runtime_api.h").exists():
        os.environ["CUDA_HOME"] = str(default)


def _run(*cmd) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.check_call([str(c) for c in cmd], cwd=ROOT)


def ensure_env(extra: str) -> Path:
    """Create the venv and install the package with ``extra`` unless already done."""
    digest = hashlib.sha256()
    # setup.py builds the CUDA extension from csrc/, so its sources count too.
    for path in [ROOT / "pyproject.toml", ROOT / "setup.py", *sorted((ROOT / "csrc").glob("*"))]:
        digest.update(path.read_bytes())
    stamp = VENV / f".installed-{extra}-{digest.hexdigest()[:16]}"
    if stamp.exists():
        return _python()
    if not _python().exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    py = _python()
    _run(py, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools>=77", "wheel")
    # torch first: setup.py imports it to build the optional CUDA extension,
    # so the package is installed without build isolation.
    _run(py, "-m", "pip", "install", "-q", "torch>=2.6")
    _run(py, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", f".[{extra}]")
    stamp.touch()
    return py


def main(argv: list) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__, file=sys.stderr)
        return 2
    job, args = argv[0], argv[1:]
    _cuda_environment()
    py = ensure_env(EXTRAS[job])
    if job == "bench":
        cmd = [py, "-m", "vera_kernels.bench", *args]
    else:
        cmd = [py, "-m", "pytest", *(args or ["-q"])]
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
