"""The test bed's own promises: scripts/testbed.sh stops only what it started, and the tests' storage
outage (support.FaultyProxy) is one as its clients see it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess

from support import TESTBED, FaultyProxy


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


def test_a_stopped_service_its_parent_has_not_reaped_yet_counts_as_stopped(tmp_path):
    """The test bed's daemons outlive the shell that started them, and this machine's init reaps them
    seconds after they end: `minio down` must take the zombie as stopped, not wait on it (it used to
    wait out its SIGKILL deadline, then forever). Here pytest is the parent that has not reaped yet."""
    service = subprocess.Popen(["sleep", "600"])
    try:
        started = open(f"/proc/{service.pid}/stat").read().rsplit(") ", 1)[1].split()[19]
        (tmp_path / "minio").mkdir()
        (tmp_path / "minio" / "pid").write_text(f"{service.pid} {started}\n")
        env = os.environ | {"PETAL_STATE": str(tmp_path)}
        down = subprocess.run([TESTBED, "minio", "down"], env=env, capture_output=True, text=True, timeout=20)
        assert down.returncode == 0 and f"minio stopped (pid {service.pid})" in down.stderr, down.stderr
        assert open(f"/proc/{service.pid}/stat").read().rsplit(") ", 1)[1][0] == "Z"  # ended, still unreaped
    finally:
        service.kill()
        service.wait()


def test_storage_going_down_tells_a_client_waiting_on_its_answer_at_once():
    """As when MinIO restarts: a client that sent its whole request and waits on the answer learns at
    once that the connection is gone (then retries), instead of waiting out its read timeout."""
    silent = socket.create_server(("127.0.0.1", 0))  # a store that takes the request and never answers
    proxy = FaultyProxy(silent.getsockname()[1])
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    try:
        client.sendall(b"PUT /bucket/progress.json HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        upstream, _ = silent.accept()
        assert upstream.recv(100).startswith(b"PUT /bucket/progress.json")  # the request reached the store
        proxy.down()
        with contextlib.suppress(ConnectionResetError):  # reset, or else closed:
            assert client.recv(100) == b""
    finally:
        proxy.close()
        client.close()
        silent.close()
