"""What every benchmark shares: the storage it needs, a scratch dataset, timing and the report."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from training.storage import Storage

ROOT = Path(__file__).resolve().parents[1]


def storage_from_env() -> Storage:
    if "S3_ENDPOINT_URL" not in os.environ:
        raise SystemExit(
            "benchmarks: error: S3_ENDPOINT_URL is unset; run "
            '`scripts/testbed.sh minio up; eval "$(scripts/testbed.sh env)"` first'
        )
    return Storage.from_env()


def in_workdir(prefix: str):
    """A benchmark `fn(args, work)` run as `fn(args)`: in --workdir, kept, or else in a temporary
    directory removed afterwards, whatever the benchmark's end."""

    def wrap(fn: Callable[..., dict]) -> Callable[..., dict]:
        @functools.wraps(fn)
        def run(args) -> dict:
            if args.workdir:
                return fn(args, Path(args.workdir))
            with tempfile.TemporaryDirectory(prefix=prefix) as work:
                return fn(args, Path(work))

        return run

    return wrap


def run_script(script: str, *args: str) -> str:
    """A repo script's stdout; its failure ends the benchmark with the script's own error."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"benchmarks: {script} failed: {result.stderr.strip().splitlines()[-1]}")
    return result.stdout


def make_images(out: Path, classes: int, per_class: int, size: int) -> Path:
    if not (out / "cat_to_name.json").exists():
        run_script("make_synthetic_dataset.py", str(out), "--classes", str(classes), "--per-class", str(per_class),
                   "--size", str(size))  # fmt: skip
    return out


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def report(name: str, rows: list[tuple[str, str]], result: dict, json_path: Path | None) -> dict:
    result = {"benchmark": name, "machine": machine(), **result}
    width = max(len(label) for label, _ in rows)
    print(f"\n{name}")
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
    return result
