"""What the tests share: running petal's commands as a user would, and watching them."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every object a test session writes goes into a bucket of its own, removed at the end: the test bed's
# MinIO is shared with the demo and with earlier sessions, and tests expect to start from nothing.
BUCKET = f"petal-test-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
TESTBED = str(ROOT / "scripts" / "testbed.sh")
# The dataset and run prefix a job has to name, for tests that render or refuse one without training.
BUCKET_VALUES = ["--values", str(ROOT / "tests" / "bucket-values.yaml")]

# Small enough for 2 CPU cores, big enough to learn the synthetic shapes well past 90 %.
SMALL_TRAINING = [
    "--arch",
    "resnet18",
    "--freeze",
    "none",
    "--pretrained",
    "none",
    "--image-size",
    "48",
    "--batch-size",
    "16",
    "--workers",
    "1",
    "--log-every",
    "1",
    "--epochs",
    "4",
]


def s3(path: str) -> str:
    """The session bucket's URL for path."""
    return f"s3://{BUCKET}/{path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Said:
    """What a process printed on stdout, line by line: its JSON records among them."""

    def __init__(self, stdout: list[str]):
        self.stdout = stdout

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout if line.startswith("{")]


class Watched(Said):
    """A child process whose stdout and stderr lines are collected as they come, so a test can
    wait for a line (a condition) instead of sleeping."""

    def __init__(self, argv: list[str], env: dict, cwd: Path = ROOT):
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        super().__init__([])
        self.stderr: list[str] = []
        self._lines: queue.Queue[tuple[str, str]] = queue.Queue()
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            threading.Thread(target=self._pump, args=(name, stream), daemon=True).start()

    def _pump(self, name: str, stream) -> None:
        for line in stream:
            getattr(self, name).append(line.rstrip("\n"))
            self._lines.put((name, line))
        self._lines.put((name, None))

    def wait_for_line(self, pattern: str, timeout: float) -> str:
        regex = re.compile(pattern)
        for line in self.stdout + self.stderr:
            if regex.search(line):
                return line
        deadline = time.monotonic() + timeout
        closed = 0
        while closed < 2:
            try:
                _, line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                closed += 1
            elif regex.search(line):
                return line
        raise AssertionError(
            f"no line matching {pattern!r} within {timeout}s from {self.argv[:4]}…; "
            f"stderr tail:\n" + "\n".join(self.stderr[-25:])
        )

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.argv[:4]}… still running after {timeout}s; stderr tail:\n" + "\n".join(self.stderr[-25:])
            ) from None
        self._drain()
        return code

    def _drain(self) -> None:
        # Both pump threads end once the pipes close; wait for them so no line is missed.
        closed = 0
        while closed < 2:
            if self._lines.get(timeout=30)[1] is None:
                closed += 1

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def children(self) -> list[int]:
        text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [int(pid) for pid in text.split()]

    def rank_pid(self, rank: int) -> int:
        """The pid of torchrun's worker with RANK=rank."""
        for pid in self.children():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return pid
        raise AssertionError(f"no worker with RANK={rank} under torchrun pid {self.proc.pid}")


def wait_ok(proc: Watched, timeout: float = 900) -> None:
    code = proc.wait(timeout)
    assert code == 0, f"exit {code}; stderr tail:\n" + "\n".join(proc.stderr[-30:])


def launcher(nproc: int, *target: str) -> list[str]:
    """`nproc` ranks on this machine as a pod with several processes starts them: torchrun through
    petal's launcher, which exits with the failed rank's own code (torchrun's is always 1)."""
    return [sys.executable, "-m", "training.launch", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), *target]  # fmt: skip


def trainer(env: dict, args: list[str], nproc: int = 2) -> Watched:
    return Watched(launcher(nproc, "-m", "training", *args), env)


def pods(env: dict, args: list[str], envs: list[dict], cache_root: Path) -> list[Watched]:
    """One trainer process per rank, as a PyTorchJob with one process per pod starts them: each its own
    exit code, log and pod-local cache; rank r's environment is env | envs[r]."""
    port, world = free_port(), len(envs)
    return [Watched([sys.executable, "-m", "training", *args, "--cache-dir", str(cache_root / f"pod{rank}")],
                    env | extra | {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            for rank, extra in enumerate(envs)]  # fmt: skip


def without_modules(directory: Path, *names: str) -> dict:
    """Environment variables under which the packages `names` cannot be imported (a sitecustomize on
    PYTHONPATH refuses them), as on a machine that lacks them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        "import sys\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {names!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Absent())\n"
    )
    return {"PYTHONPATH": str(directory)}


def tracked_run(uri: str, experiment: str, run_name: str, records: list[dict]):
    """The one MLflow run of that name in the experiment, checked against what the run's metrics.jsonl
    says (`records`): finished, every epoch's val/accuracy logged once, every artifact uploaded."""
    from mlflow import MlflowClient

    from training.artifacts import RUN_ARTIFACTS

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (run,) = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val/accuracy")
    assert sorted((m.step, m.value) for m in history) == [(r["epoch"], pytest.approx(r["val_acc"])) for r in records]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == sorted(RUN_ARTIFACTS)
    return run


def run_script(env: dict, script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class FaultyProxy:
    """A TCP proxy in front of MinIO that forwards everything until a client request matches `pattern`;
    that request then meets the fault: "stall" holds it (nothing more reaches MinIO on that connection,
    as if the network froze mid-request), "503" answers it with 503 Service Unavailable, ("delay", s)
    passes MinIO's answer to it on `s` seconds late, closing that connection after it as a server does
    whose idle timeout ran out meanwhile (a store slow to take a write: the request flows on, so the
    client waits on a reply, not on a socket that stopped reading). `matched` is set at the
    first match, so a test can act right then (kill the client in the middle of an upload, say);
    `hits` counts the matches.

    `down()` is storage going away — MinIO restarting, say, as its clients see it: every connection
    reset, new ones refused — until `up()`, on the same port, without touching the MinIO that other
    tests (run side by side) share. `host="0.0.0.0"` serves pods too, through the node's address."""

    def __init__(self, upstream_port: int, pattern: bytes | None = None, fault="stall", host: str = "127.0.0.1"):
        self.upstream_port = upstream_port
        self.pattern = re.compile(pattern) if pattern else None
        self.fault = fault
        self.matched = threading.Event()
        self.hits = 0
        self.host, self.port = host, 0
        self.open: set[socket.socket] = set()
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.server = socket.create_server((self.host, self.port))  # SO_REUSEADDR: the same port again
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def down(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way, which holds the port
        self.server.close()
        for connection in list(self.open):
            with contextlib.suppress(OSError):
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
            self._end(connection)

    def _end(self, connection: socket.socket) -> None:
        """Ends a proxied connection as its peer sees it, at once. close() alone frees nothing while the
        other pipe thread waits in recv() on the socket: a client that had sent its whole request would
        wait out its read timeout, never told. shutdown() wakes that recv() and tells the peer."""
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_RDWR)
        connection.close()
        self.open.discard(connection)

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.open |= {client, upstream}
            answer_late = threading.Event()  # set by a delayed request, cleared by its answer
            threading.Thread(target=self._pipe, args=(client, upstream, True, answer_late), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False, answer_late), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, inspect: bool, answer_late: threading.Event) -> None:
        recent = b""
        held = False
        try:
            while data := src.recv(65536):
                if not inspect and answer_late.is_set():
                    answer_late.clear()
                    time.sleep(self.fault[1])  # ("delay", seconds): the slowness itself, not a wait for anything
                    # MinIO has closed the idle connection meanwhile: say so, or the client reuses it.
                    data = data.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)
                if inspect and self.pattern and self.pattern.search(recent + data):  # `recent`: split matches
                    self.hits += 1
                    self.matched.set()
                    if self.fault == "stall":
                        held = True
                        return  # hold the request: nothing more reaches MinIO on this connection
                    if self.fault == "503":
                        src.sendall(UNAVAILABLE)
                        return
                    answer_late.set()
                    recent = b""  # the match is spent: not matched again with the next chunk
                else:
                    recent = data[-1024:] if inspect else b""
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if not held:
                for connection in (src, dst):
                    self._end(connection)

    def close(self) -> None:
        self.down()


def testbed(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """scripts/testbed.sh with the test bed's own state (the one the demo uses); a failure shows its stderr."""
    result = subprocess.run([TESTBED, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 or not check, f"testbed.sh {' '.join(args)} failed:\n{result.stderr[-4000:]}"
    return result


def testbed_exports() -> dict[str, str]:
    """What `eval "$(scripts/testbed.sh env)"` sets, PATH with this process's PATH behind it."""
    exports: dict[str, str] = {}
    for key, value in re.findall(r"^export (\w+)=(.*)$", testbed("env").stdout, flags=re.M):
        exports[key] = value.strip('"').replace("$PATH", exports.get("PATH", os.environ["PATH"]))
    return exports


class TestbedService:
    """One of the test bed's services (minio, cluster) for a test session: used as it is if it already
    runs (the demo leaves both up), else started, and then stopped again at the end."""

    def __init__(self, name: str, up_timeout: float = 120):
        self.name = name
        self.started_here = testbed(name, "status", check=False).returncode != 0
        if self.started_here:
            self.up(up_timeout)
        self.env = testbed_exports()
        self.state_dir = Path(self.env["PETAL_STATE"])

    def up(self, timeout: float = 120) -> None:
        testbed(self.name, "up", timeout=timeout)

    def down(self) -> None:
        testbed(self.name, "down")

    def release(self) -> None:
        if self.started_here:
            self.down()
