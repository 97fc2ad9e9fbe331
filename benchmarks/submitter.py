"""Submitter start-up: wall time of `python scripts/submit.py --dry-run --replicas 4` for a dataset and
a run prefix (render through the chart with helm, print the job), best of 5. Goal: under 1 s, and no
torch import."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.common import ROOT, report, timed

BUCKET = "s3://bench-bucket"
COMMAND = [sys.executable, str(ROOT / "scripts" / "submit.py"), "--dry-run", "--replicas", "4",
           "--dataset", f"{BUCKET}/datasets/flowers102", "--set", f"outputPrefix={BUCKET}/runs"]  # fmt: skip


def run(args) -> dict:
    times = [timed(lambda: subprocess.run(COMMAND, check=True, capture_output=True)) for _ in range(5)]
    profile = subprocess.run([sys.executable, "-X", "importtime", *COMMAND[1:]], capture_output=True, text=True)
    imports_torch = any(line.split("|")[-1].strip() == "torch" for line in profile.stderr.splitlines())
    seconds = min(times)
    rows = [("submit.py --dry-run (s)", f"{seconds:.3f}  (goal < 1 s{'' if seconds < 1 else ', MISSED'})"),
            ("imports torch", str(imports_torch))]  # fmt: skip
    result = {"seconds": seconds, "all_seconds": times, "imports_torch": imports_torch, "goals": {"seconds": 1.0}}
    return report("submit", rows, result, args.json)
