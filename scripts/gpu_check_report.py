#!/usr/bin/env python3
"""results.json of a gpu_check.sh run, from its work folder (standard library only).

    python scripts/gpu_check_report.py WORKDIR OUT.json

Reads what the steps left in WORKDIR, whichever of it exists: steps.tsv (each
step's exit code and seconds), env.log, the junit files of the tile sweep and
the GPU tests (totals, the failing tests by name, and pass / fail tallies per
backend and dtype read from the test ids), the driver check's JSON (totals and
the rows that are not ok) and the benchmarks' JSONs (as they are). gpu_check.sh
runs it after every step, so a run cut short still reports what it did.
"""

import json
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

BACKENDS = ("triton", "cuda", "torch")
DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16",
          "float32": "fp32", "fp32": "fp32", "tf32": "tf32", "float64": "fp64", "fp64": "fp64"}
BENCHMARKS = ("bench", "serve", "dora", "decode_generate", "decode_workspace")


def steps(work: Path) -> list:
    path = work / "steps.tsv"
    if not path.exists():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return [{"step": r[0], "rc": r[1], "seconds": r[2] if len(r) > 2 else None} for r in rows]


def _outcome(case) -> str:
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
    return "passed"


def _facet(test_id: str) -> str:
    """'backend/dtype' named in a test id's parameters (either may be '-')."""
    params = test_id[test_id.find("[") + 1:].lower() if "[" in test_id else ""
    words = re.split(r"[^a-z0-9]+", params)
    backend = next((w for w in words if w in BACKENDS), "-")
    dtype = next((DTYPES[w] for w in words if w in DTYPES), "-")
    return f"{backend}/{dtype}"


def junit(path: Path) -> dict:
    """Totals, failing tests with their first message line, tallies per backend / dtype."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as error:
        return {"error": f"{path.name}: {error}"}
    totals, tallies, failing = {}, {}, []
    for case in root.iter("testcase"):
        outcome = _outcome(case)
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        totals[outcome] = totals.get(outcome, 0) + 1
        facet = tallies.setdefault(_facet(case.get("name", "")), {})
        facet[outcome] = facet.get(outcome, 0) + 1
        if outcome in ("failed", "error"):
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            message = (node.get("message") or node.text or "").strip().splitlines()
            failing.append({"test": test_id, "message": message[0][:300] if message else ""})
    return {"totals": totals, "by_backend_dtype": tallies, "failing": failing}


def driver_check(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except (ValueError, OSError) as error:
        return {"error": f"{path.name}: {error}"}
    rows = payload.get("rows", [])
    return {"device": payload.get("device"), "arch": payload.get("arch"),
            "checked": payload.get("checked"), "not_ok": payload.get("not_ok"),
            "chosen": [r for r in rows if r.get("chosen") and r.get("status") != "pruned"],
            "not_ok_rows": [r for r in rows if r.get("status") not in ("ok", "pruned")][:50]}


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    work, out = Path(argv[0]), Path(argv[1])
    result = {"steps": steps(work)}
    if (work / "env.log").exists():
        result["env"] = (work / "env.log").read_text().splitlines()
    for name in ("tile_sweep", "pytest_gpu"):
        if (work / f"{name}.xml").exists():
            result[name] = junit(work / f"{name}.xml")
    if (work / "driver_check.json").exists():
        result["driver_check"] = driver_check(work / "driver_check.json")
    for name in BENCHMARKS:
        path = work / f"{name}.json"
        if path.exists():
            try:
                result[name] = json.loads(path.read_text())
            except ValueError as error:
                result[name] = {"error": f"{path.name}: {error}"}
    out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
