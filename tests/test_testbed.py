"""The test bed's own promises (scripts/testbed.sh): it stops only what it started."""

from __future__ import annotations

import os
import subprocess

from support import TESTBED


def test_a_recorded_pid_now_held_by_another_process_is_left_alone(tmp_path):
    """A MinIO that ended long ago, its PID since given to an unrelated process: `minio down` must not
    signal that process (the record names a process by PID and start time; this one's differ)."""
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        (tmp_path / "minio").mkdir()
        for record in (f"{bystander.pid}", f"{bystander.pid} 1"):  # no start time; another start time
            (tmp_path / "minio" / "pid").write_text(record + "\n")
            env = os.environ | {"PETAL_STATE": str(tmp_path)}
            down = subprocess.run([TESTBED, "minio", "down"], env=env, capture_output=True, text=True, timeout=60)
            assert down.returncode == 0, down.stderr
            assert "minio is not running" in down.stderr
            assert bystander.poll() is None, f"the bystander was signalled for the record {record!r}"
    finally:
        bystander.kill()
        bystander.wait()
