"""Fixtures: the test bed's real MinIO (through scripts/testbed.sh, as a user would: the one the demo
uses, started only if it is not running) and a synthetic dataset in it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import timeline as measured
from filelock import FileLock
from minio.deleteobjects import DeleteObject
from support import SMALL_TRAINING, Said, TestbedService, run_script, s3, trainer, wait_ok

from training.storage import Storage, StorageError, parse_url

# One CPU thread per torch process, here and in every trainer a test starts (none has imported torch
# yet), as the chart and torchrun give processes that share a node's cores: the suite runs two pytest
# workers on two cores, and a trainer on torch's default of a thread per core spins its threads
# against the other worker's (a single-process run beside a busy worker took 2.5x the CPU time and
# 1.7x the wall time).
os.environ.setdefault("OMP_NUM_THREADS", "1")


class MinioServer(TestbedService):
    def __init__(self):
        super().__init__("minio")
        self.env = {k: v for k, v in self.env.items() if k.startswith(("S3_", "AWS_"))}
        self.port = int(self.env["S3_ENDPOINT_URL"].rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def minio() -> MinioServer:
    server = MinioServer()
    yield server
    server.release()


class MlflowServer(TestbedService):
    def __init__(self):
        super().__init__("mlflow")
        self.uri, self.pod_uri = self.env["MLFLOW_TRACKING_URI"], self.env["PETAL_MLFLOW_POD_URI"]
        self.port = int(self.uri.rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def mlflow_server(minio) -> MlflowServer:
    """The test bed's MLflow tracking server (it keeps artifacts in MinIO, so after it)."""
    server = MlflowServer()
    yield server
    server.release()


@pytest.fixture(scope="session")
def s3_env(minio, storage) -> dict:
    """The environment a user's shell has after `eval "$(scripts/testbed.sh env)"`, MLflow tracking off:
    the MLflow tests turn it on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "MLFLOW_"))}
    return env | minio.env | {"PETAL_S3_RETRY_SECONDS": "120"}


@pytest.fixture(scope="session")
def storage(minio) -> Storage:
    store = Storage(minio.env["S3_ENDPOINT_URL"], minio.env["AWS_ACCESS_KEY_ID"], minio.env["AWS_SECRET_ACCESS_KEY"])
    store.ensure_bucket(parse_url(s3("")))
    yield store
    bucket = parse_url(s3("")).bucket
    names = [o.object_name for o in store.client.list_objects(bucket, recursive=True)]
    errors = list(store.client.remove_objects(bucket, (DeleteObject(name) for name in names)))
    assert not errors, errors
    store.client.remove_bucket(bucket)


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
    url = s3("datasets/synthetic")
    result = run_script(s3_env, "upload_dataset.py", str(synthetic_dir), url)
    assert result.returncode == 0, result.stderr
    return url


@pytest.fixture()
def run_dir(storage, request) -> str:
    """A fresh run directory (output prefix) per test, removed after it: a run's checkpoints are a
    hundred MB or more each, and MinIO refuses every write once its drive is 99 % full."""
    url = s3(f"runs/{re.sub(r'[^A-Za-z0-9._-]+', '-', request.node.name)[:100]}")
    storage.ensure_bucket(parse_url(url))
    for obj in storage.list(parse_url(url)):
        storage.delete(obj)
    yield url
    for obj in storage.list(parse_url(url)):
        storage.delete(obj)


def shared_reference(tmp_path_factory) -> tuple[Path, FileLock]:
    """Where the reference run's record goes for the other pytest-xdist workers of this test run (their
    shared directory), and the lock held while one is made."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    return shared / "reference.json", FileLock(shared / "reference.lock", timeout=1800)


@pytest.fixture(scope="session")
def reference_run(s3_env, synthetic_dataset, storage, tmp_path_factory) -> tuple[str, Said]:
    """One uninterrupted 2-rank run on the synthetic set, which several tests use or compare against:
    (its output, what its trainer printed). Made once per test run: a worker after the first copies the
    first one's output into its own bucket (server-side; the same seeded dataset and recipe give the
    same run) and takes what it printed with the output's URL moved along, or trains its own if that
    bucket has gone with its worker."""
    record, lock = shared_reference(tmp_path_factory)
    output = parse_url(s3("runs/reference"))
    with lock:
        for obj in storage.list(output):
            storage.delete(obj)
        if record.exists():
            made = json.loads(record.read_text())
            source = parse_url(made["output"])
            try:
                for obj in storage.list(source):
                    storage.copy(obj, output.join(obj.key[len(source.key) + 1 :]))
                return str(output), Said([line.replace(made["output"], str(output)) for line in made["stdout"]])
            except StorageError:
                for obj in storage.list(output):
                    storage.delete(obj)
        proc = trainer(s3_env, ["--data", synthetic_dataset, "--output", str(output), *SMALL_TRAINING])
        wait_ok(proc)
        record.write_text(json.dumps({"output": str(output), "stdout": proc.stdout}))
    return str(output), Said(proc.stdout)


@pytest.fixture(scope="session")
def reference_result(request, tmp_path_factory) -> dict:
    """What the reference run's trainer said at its end (best_val_acc, ...), for tests that need no more
    of it: another worker's, if one has made it (waiting while one is made), else this worker's own."""
    record, lock = shared_reference(tmp_path_factory)
    with lock:
        if record.exists():
            return json.loads(json.loads(record.read_text())["stdout"][-1])
    _, said = request.getfixturevalue("reference_run")
    return json.loads(said.stdout[-1])


def pytest_collection_modifyitems(items):
    """The longest work is handed out first: the cluster tests (one worker's, below), then the slow
    ones, so that the quick tests fill both workers' last minutes and the two end together, not one
    idle while the other runs its last long test."""
    items.sort(key=lambda item: (not item.nodeid.startswith("tests/cluster/"), not item.get_closest_marker("slow")))


def pytest_xdist_make_scheduler(config, log):
    """The cluster tests run one after the other, on one pytest-xdist worker (they share one node, whose
    taints and capacity some of them change); the others spread over the remaining workers beside them.
    (pytest-xdist's own `--dist loadgroup` groups nothing under pytest 9.2, whose node ids it can no
    longer suffix, so the grouping is done here, by path.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ClusterTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "cluster" if nodeid.startswith("tests/cluster/") else nodeid

    return ClusterTestsTogether(config, log)


def pytest_testnodedown(node, error):
    """A pytest-xdist worker's cluster timings (tests/timeline.py), for the report at the end."""
    if "timings" in getattr(node, "workeroutput", {}):
        reported = json.loads(node.workeroutput["timings"])
        measured.TIMINGS.extend(tuple(row) for row in reported["timings"])
        measured.STARTUPS.extend(reported["startups"])


def pytest_terminal_summary(terminalreporter):
    lines = measured.summary()
    if lines:
        terminalreporter.write_sep("=", "cluster tests: wall seconds by phase (tests/timeline.py)")
        for line in lines:
            terminalreporter.write_line(line)
    rows = [value for report in terminalreporter.stats.get("passed", []) for name, value in report.user_properties
            if name == "fault table row"]  # fmt: skip
    if rows:
        terminalreporter.write_sep("=", "the fault table, measured (docs/faults.md)")
        for row in ["| fault | restartPolicy | outcome | steps recomputed |", "|---|---|---|---|", *rows]:
            terminalreporter.write_line(row)


def pytest_sessionfinish(session, exitstatus):
    """Under CI, a skipped test fails the run: whatever a test needs is built here, so a skip means
    something is missing that should not be."""
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: its measurements go to the controller
        session.config.workeroutput["timings"] = json.dumps({"timings": measured.TIMINGS,
                                                             "startups": measured.STARTUPS})  # fmt: skip
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("CI") and exitstatus == 0 and reporter and reporter.stats.get("skipped"):
        reporter.write_line("CI: skipped tests are failures here (see the skip reasons above)", red=True)
        session.exitstatus = 1
