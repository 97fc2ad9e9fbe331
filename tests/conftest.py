"""Fixtures: a real MinIO (started through scripts/testbed.sh, as a user would) and a synthetic dataset in it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from support import SMALL_TRAINING, run_script, testbed, testbed_exports, trainer, wait_ok

from training.storage import Storage, parse_url


class MinioServer:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.up()

    def up(self) -> None:
        testbed(self.state_dir, "minio", "up")
        self.env = {k: v for k, v in testbed_exports(self.state_dir).items() if k != "PATH"}
        self.port = int(self.env["S3_ENDPOINT_URL"].rsplit(":", 1)[1])

    def down(self) -> None:
        testbed(self.state_dir, "minio", "down")

    def restart(self) -> None:
        """Same port, same data: what a pod restart of MinIO looks like to its clients."""
        self.down()
        self.up()


@pytest.fixture(scope="session")
def minio(tmp_path_factory) -> MinioServer:
    server = MinioServer(tmp_path_factory.mktemp("testbed"))
    yield server
    server.down()


@pytest.fixture(scope="session")
def s3_env(minio) -> dict:
    """The environment a user's shell has after `eval "$(scripts/testbed.sh env)"`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    return env | minio.env | {"PETAL_S3_RETRY_SECONDS": "120"}


@pytest.fixture(scope="session")
def storage(minio) -> Storage:
    return Storage(minio.env["S3_ENDPOINT_URL"], minio.env["AWS_ACCESS_KEY_ID"], minio.env["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    result = run_script(
        os.environ.copy(),
        "make_synthetic_dataset.py",
        str(out),
        "--classes",
        "5",
        "--per-class",
        "40",
        "--eval-per-class",
        "20",
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def synthetic_dataset(s3_env, synthetic_dir) -> str:
    url = "s3://petal/datasets/synthetic"
    result = run_script(s3_env, "upload_dataset.py", str(synthetic_dir), url)
    assert result.returncode == 0, result.stderr
    return url


@pytest.fixture()
def run_dir(storage, request) -> str:
    """A fresh run directory (output prefix) per test."""
    url = f"s3://petal/runs/{re.sub(r'[^A-Za-z0-9._-]+', '-', request.node.name)[:100]}"
    storage.ensure_bucket(parse_url(url))
    for obj in storage.list(parse_url(url)):
        storage.delete(obj)
    return url


@pytest.fixture(scope="session")
def reference_run(s3_env, synthetic_dataset, storage):
    """One uninterrupted 2-rank run on the synthetic set, which several tests use or compare against."""
    output = "s3://petal/runs/reference"
    for obj in storage.list(parse_url(output)):
        storage.delete(obj)
    proc = trainer(s3_env, ["--data", synthetic_dataset, "--output", output, *SMALL_TRAINING])
    wait_ok(proc)
    return output, proc


def pytest_sessionfinish(session, exitstatus):
    """Under CI, a skipped test fails the run: whatever a test needs is built here, so a skip means
    something is missing that should not be."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("CI") and exitstatus == 0 and reporter and reporter.stats.get("skipped"):
        reporter.write_line("CI: skipped tests are failures here (see the skip reasons above)", red=True)
        session.exitstatus = 1
