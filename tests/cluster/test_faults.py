"""Faults on the real test bed: pods deleted (SIGTERM within the grace period), pods lost outright
(SIGKILL), a whole job preempted, MinIO restarting — under restartPolicy ExitCode and OnFailure. Each
job ends Succeeded, every restart resumes from a checkpoint at most --checkpoint-every steps behind
where training was (read from the `resumed` events), and the result is the fault-free run's.

Each scenario prints a row of the README's fault table (`pytest -s` shows them)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid

import pytest
import yaml
from conftest import PETAL_NAMESPACE
from support import ROOT, TORCHRUN, free_port, s3

from training.storage import parse_url

CHART = ROOT / "charts" / "petal"
CHECKPOINT_EVERY = 3
EPOCHS = 4
STEP = re.compile(r"epoch (\d+)/\d+ step (\d+)/")


class FaultyJob:
    """A helm-installed petal job of 2 pods, with the faults a test inflicts on it and what it said."""

    def __init__(self, cluster, image: str, dataset: str, restart_policy: str):
        self.cluster = cluster
        self.release = f"fault-{restart_policy.lower()}-{uuid.uuid4().hex[:5]}"
        self.output = s3(f"runs/{self.release}")
        repository, tag = image.split(":")
        self.values = ["--values", str(CHART / "ci" / "cpu-values.yaml"), "--set", "replicas=2",
                       "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
                       "--set", f"restartPolicy={restart_policy}", "--set", f"training.data={dataset}",
                       "--set", f"training.epochs={EPOCHS}", "--set", "training.batchSize=8",
                       "--set", f"training.checkpointEvery={CHECKPOINT_EVERY}", "--set", "training.logEvery=1",
                       "--set", f"outputPrefix={s3('runs')}", "--set", "terminationGracePeriodSeconds=60"]  # fmt: skip
        self.rows: list[tuple[str, str, str, int]] = []

    def helm(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["helm", *args, "--namespace", PETAL_NAMESPACE], env=self.cluster.env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    def install(self) -> None:
        result = self.helm("install", self.release, str(CHART), *self.values)
        assert result.returncode == 0, result.stderr

    def trainer_args(self) -> list[str]:
        rendered = self.helm("template", self.release, str(CHART), *self.values).stdout
        (job,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "PyTorchJob"]
        return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]

    @property
    def master(self) -> str:
        return f"{self.release}-master-0"

    def pods(self) -> list[str]:
        return [f"{self.release}-master-0", f"{self.release}-worker-0"]

    def position(self) -> tuple[int, int]:
        """(epoch, step) the master last logged: how far training had come."""
        found = STEP.findall(self.cluster.logs(self.master, PETAL_NAMESPACE))
        return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)

    def wait_for_step(self, epoch: int, step: int) -> tuple[int, int]:
        def reached():
            now = self.position()
            return now if now >= (epoch, step) else None

        return self.cluster.wait_until(f"{self.master} at epoch {epoch} step {step}", reached, PETAL_NAMESPACE, 900)

    def resumed_after(self, fault: str, policy: str, reached: tuple[int, int], uid: str) -> None:
        """Waits for a new master container to say where it resumed; records the steps lost."""

        def resumed():
            pod = self.cluster.get("-n", PETAL_NAMESPACE, "pod", self.master) if self.exists(self.master) else None
            if pod is None:
                return None
            restarted = pod["metadata"]["uid"] != uid or any(
                s["restartCount"] for s in pod["status"].get("containerStatuses", [])
            )
            match = re.search(r'\{"event": "resumed", "epoch": (\d+), "step": (\d+)\}',
                              self.cluster.logs(self.master, PETAL_NAMESPACE))  # fmt: skip
            return (int(match[1]), int(match[2])) if restarted and match else None

        epoch, step = self.cluster.wait_until(f"{self.master} resuming after: {fault}", resumed, PETAL_NAMESPACE, 900)
        assert epoch == reached[0] or (epoch == reached[0] + 1 and step == 0), (fault, reached, (epoch, step))
        lost = max(0, reached[1] - step) if epoch == reached[0] else 0
        assert lost <= CHECKPOINT_EVERY, f"{fault}: {lost} steps recomputed, more than --checkpoint-every"
        self.rows.append((fault, policy, f"resumed at epoch {epoch} step {step}", lost))

    def exists(self, pod: str) -> bool:
        return self.cluster.kubectl("-n", PETAL_NAMESPACE, "get", "pod", pod, check=False).returncode == 0

    def uid(self) -> str:
        return self.cluster.get("-n", PETAL_NAMESPACE, "pod", self.master)["metadata"]["uid"]

    def delete(self, *pods: str, force: bool = False) -> None:
        grace = ["--grace-period=0", "--force"] if force else []
        self.cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "pod", *pods, "--wait=false", *grace)

    def finish(self, storage) -> list[dict]:
        self.cluster.wait(f"pytorchjob/{self.release}", "condition=Succeeded", PETAL_NAMESPACE, timeout=1500)
        text = storage.read_bytes(parse_url(self.output).join("metrics.jsonl")).decode()
        return [json.loads(line) for line in text.splitlines()]

    def uninstall(self) -> None:
        self.helm("uninstall", self.release)


def fault_free_accuracy(job: FaultyJob, s3_env: dict) -> float:
    """The same trainer arguments, uninterrupted, on this host's torchrun with the same world size."""
    args = [a for a in job.trainer_args() if not a.startswith("--output=")] + [f"--output={job.output}-reference"]
    argv = [TORCHRUN, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "training", *args]
    result = subprocess.run(argv, cwd=ROOT, env=s3_env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])["best_val_acc"]


def report(rows: list[tuple[str, str, str, int]]) -> None:
    for fault, policy, outcome, lost in rows:
        print(f"| {fault} | {policy} | {outcome}; Succeeded | {lost} |", file=sys.stderr)


@pytest.fixture()
def faulty(cluster, petal_image, synthetic_dataset, request):
    job = FaultyJob(cluster, petal_image, synthetic_dataset, request.param)
    job.install()
    yield job
    job.uninstall()


@pytest.mark.parametrize("faulty", ["ExitCode"], indirect=True)
def test_pods_deleted_lost_and_storage_restarted_under_exitcode(faulty, minio, storage, s3_env):
    job, policy = faulty, "ExitCode"
    reached = job.wait_for_step(1, 5)
    uid, reached = job.uid(), max(reached, job.position())
    job.delete(f"{job.release}-worker-0")  # SIGTERM: the ranks agree on a step, checkpoint, exit 143
    job.resumed_after("worker pod deleted (SIGTERM)", policy, reached, uid)

    reached = job.wait_for_step(2, 4)
    uid, reached = job.uid(), max(reached, job.position())
    job.delete(job.master)
    job.resumed_after("master pod deleted (SIGTERM)", policy, reached, uid)

    reached = job.wait_for_step(3, 7)
    uid, reached = job.uid(), max(reached, job.position())
    job.delete(f"{job.release}-worker-0", force=True)  # SIGKILL: back to the last periodic checkpoint
    job.resumed_after("worker pod lost (SIGKILL)", policy, reached, uid)

    reached = job.wait_for_step(4, 2)
    minio.down()
    try:
        job.cluster.wait_for_log(job.master, r"retrying in", PETAL_NAMESPACE, timeout=300)
    finally:
        minio.up()
    records = job.finish(storage)
    assert not re.search(r'"event": "resumed", "epoch": 4', job.cluster.logs(job.master, PETAL_NAMESPACE))
    job.rows.append(("MinIO restarted mid-job", policy, "storage calls retried, no restart", 0))

    assert [(r["epoch"], r["train_samples"]) for r in records] == [(e, 200) for e in range(1, EPOCHS + 1)]
    assert abs(max(r["val_acc"] for r in records) - fault_free_accuracy(job, s3_env)) <= 0.01
    report(job.rows)


@pytest.mark.parametrize("faulty", ["OnFailure"], indirect=True)
def test_preemption_and_a_lost_master_under_onfailure(faulty, storage, s3_env):
    job, policy = faulty, "OnFailure"
    reached = job.wait_for_step(1, 7)
    uid, reached = job.uid(), max(reached, job.position())
    job.delete(*job.pods())  # preemption: every pod gets SIGTERM and its grace period
    job.resumed_after("all pods preempted (SIGTERM)", policy, reached, uid)

    reached = job.wait_for_step(3, 5)
    uid, reached = job.uid(), max(reached, job.position())
    job.delete(job.master, force=True)
    job.resumed_after("master pod lost (SIGKILL)", policy, reached, uid)

    records = job.finish(storage)
    assert [(r["epoch"], r["train_samples"]) for r in records] == [(e, 200) for e in range(1, EPOCHS + 1)]
    assert abs(max(r["val_acc"] for r in records) - fault_free_accuracy(job, s3_env)) <= 0.01
    report(job.rows)
