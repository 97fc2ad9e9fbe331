"""A network the benchmark can be honest about: Toxiproxy (a real TCP proxy, built by the test bed)
in front of MinIO, adding a fixed latency each way — this kernel has no netem to do it.

    with Latency(minio_endpoint, milliseconds=5) as endpoint:
        Storage(endpoint, ...)        # every request now pays the round trip a cross-node one does
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from urllib.parse import urlparse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Latency:
    """toxiproxy-server with one proxy to `upstream` and a latency toxic on each direction."""

    def __init__(self, upstream: str, milliseconds: int):
        self.upstream = urlparse(upstream).netloc
        self.milliseconds = milliseconds

    def __enter__(self) -> str:
        server = shutil.which("toxiproxy-server")
        if server is None:
            raise SystemExit("benchmarks: error: toxiproxy-server is not on PATH (scripts/testbed.sh install all)")
        self.api, listen = free_port(), free_port()
        self.process = subprocess.Popen([server, "-host", "127.0.0.1", "-port", str(self.api)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            return self._configure(listen)
        except BaseException:  # a with-block whose __enter__ fails gets no __exit__: stop the server here
            self.__exit__()
            raise

    def _configure(self, listen: int) -> str:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.call("GET", "/version")
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit("benchmarks: error: toxiproxy-server did not start") from None
                time.sleep(0.1)
        self.call("POST", "/proxies", {"name": "minio", "listen": f"127.0.0.1:{listen}", "upstream": self.upstream})
        for stream in ("upstream", "downstream"):
            toxic = {"name": f"latency_{stream}", "type": "latency", "stream": stream,
                     "attributes": {"latency": self.milliseconds}}  # fmt: skip
            self.call("POST", "/proxies/minio/toxics", toxic)
        return f"http://127.0.0.1:{listen}"

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.api}{path}", method=method,
                                         data=json.dumps(body).encode() if body else None)  # fmt: skip
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"{}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
