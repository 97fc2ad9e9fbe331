"""Faults on the real test bed: pods deleted (SIGTERM within the grace period), pods lost outright
(SIGKILL), a whole job preempted, MinIO restarting (as the pods see it: their storage endpoint, a
proxy of the test's, goes away and comes back) — under restartPolicy ExitCode and OnFailure, on a
job `helm install` made. Each job ends Succeeded with every pod kept and the fault-free run's result
(the session's reference run: the same recipe on this host's torchrun), every restart resumes at the
newest checkpoint a stopped master logged as saved or a newer one (a kill can catch an upload in
flight), never past the step it had logged, and the chart's `helm test` passes. The `petal` command
looks on, as a user would: list and status while the job runs (its live progress and ETA), its logs
followed across every recreated master to the trainer's last line, the collected TensorBoard events
(every logged step) read back with TensorBoard's own reader, and cancel leaving the outputs in storage.

Each scenario measures its row of the fault table in docs/faults.md, which the run prints at its end
(tests/conftest.py): the steps recomputed are counted from the last step the stopped master logged (its
container's own log, kept by the timeline) back to the step the new one resumed at, across epochs."""

from __future__ import annotations

import json
import re
import subprocess
import uuid

import pytest
from conftest import PETAL_NAMESPACE
from support import ROOT, SMALL_TRAINING, Watched, s3
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training import checkpoint
from training.storage import StorageError, parse_url

CHART = ROOT / "charts" / "petal"
CHECKPOINT_EVERY = 3
STEP = re.compile(r"epoch (\d+)/\d+ step (\d+)/(\d+)")
SAVED = re.compile(r"(checkpoints/epoch-\d+(?:-step-\d+)?\.pt) saved")
RESUMED = re.compile(r'\{"event": "resumed", "epoch": (\d+), "step": (\d+)\}')


def recipe() -> dict[str, str]:
    """SMALL_TRAINING as chart values: the reference run's recipe, so its result is this job's."""
    flags = dict(zip(SMALL_TRAINING[::2], SMALL_TRAINING[1::2], strict=True))
    return {re.sub(r"-(\w)", lambda m: m[1].upper(), flag[2:]): value for flag, value in flags.items()}


class FaultyJob:
    """A helm-installed petal job of 2 pods, with the faults a test inflicts on it and what it said."""

    def __init__(self, cluster, timeline, image: str, dataset: str, restart_policy: str, storage: str | None = None):
        self.cluster, self.timeline = cluster, timeline
        self.release = f"fault-{restart_policy.lower()}-{uuid.uuid4().hex[:5]}"
        self.output = s3(f"runs/{self.release}")
        self.epochs = int(recipe()["epochs"])
        repository, tag = image.split(":")
        training = [arg for key, value in recipe().items() for arg in ("--set", f"training.{key}={value}")]
        self.values = ["--values", str(CHART / "ci" / "cpu-values.yaml"), "--set", "replicas=2",
                       "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
                       "--set", f"restartPolicy={restart_policy}", "--set", f"training.data={dataset}", *training,
                       "--set", f"training.checkpointEvery={CHECKPOINT_EVERY}",
                       "--set", f"outputPrefix={s3('runs')}", "--set", "terminationGracePeriodSeconds=60",
                       *(["--set", f"s3.endpoint={storage}"] if storage else [])]  # fmt: skip
        self.rows: list[tuple[str, str, str, int]] = []

    def helm(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["helm", *args, "--namespace", PETAL_NAMESPACE], env=self.cluster.env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    def install(self) -> None:
        result = self.helm("install", self.release, str(CHART), *self.values)
        assert result.returncode == 0, result.stderr

    @property
    def master(self) -> str:
        return f"{self.release}-master-0"

    @property
    def worker(self) -> str:
        return f"{self.release}-worker-0"

    def runs(self):
        return self.timeline.runs(PETAL_NAMESPACE, self.master)

    def position(self) -> tuple[tuple[int, int], int]:
        """((epoch, step) the newest master instance last logged, how many instances there were)."""
        runs = self.runs()
        found = [STEP.search(line) for line in (runs[-1][1].lines if runs else [])]
        found = [m for m in found if m]
        return ((int(found[-1][1]), int(found[-1][2])) if found else (0, 0)), len(runs)

    def wait_for_step(self, epoch: int, step: int) -> int:
        """Until the master logs (epoch, step) or later; returns its instance count then."""

        def reached():
            now, instances = self.position()
            return instances if now >= (epoch, step) else None

        return self.timeline.wait_for(f"{self.master} at epoch {epoch} step {step}", reached, timeout=900)

    def resumed_after(self, fault: str, policy: str, before: int) -> None:
        """Waits for a new master instance to say where it resumed; records the steps it recomputed,
        measured from the last step the instance before it logged."""

        def resumed():
            runs = self.runs()
            if len(runs) <= before:
                return None
            match = next((RESUMED.search(line) for line in runs[-1][1].lines if RESUMED.search(line)), None)
            return (runs, (int(match[1]), int(match[2]))) if match else None

        runs, (epoch, step) = self.timeline.wait_for(f"{self.master} resuming after: {fault}", resumed, timeout=900)
        logged = [m for _, run in runs[:-1] for line in run.lines if (m := STEP.search(line))]
        per_epoch = int(logged[-1][3])
        last = max((int(m[1]), int(m[2])) for m in logged)
        assert (epoch, step) <= last or (epoch, step) == (last[0] + 1, 0), (fault, last, (epoch, step))
        # Checkpoints upload in the background: a kill can catch one in flight, never one that landed.
        saved = max((checkpoint.position(m[1]) for _, run in runs[:-1] for line in run.lines
                     if (m := SAVED.search(line))), default=(1, 0))  # fmt: skip
        assert (epoch, step) >= saved, f"{fault}: resumed at {(epoch, step)}, before the checkpoint saved at {saved}"
        lost = (last[0] - epoch) * per_epoch + last[1] - step
        assert lost >= 0, f"{fault}: resumed past the last step logged"
        self.rows.append((fault, policy, f"last logged epoch {last[0]} step {last[1]}, resumed at epoch {epoch} "
                                         f"step {step}", lost))  # fmt: skip

    def delete(self, *pods: str, force: bool = False) -> None:
        grace = ["--grace-period=0", "--force"] if force else []
        self.cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "pod", *pods, "--wait=false", *grace)

    def finish(self, storage) -> list[dict]:
        """Succeeded, every pod kept and ended on its own, the chart's helm test passing: the records."""
        self.cluster.wait(f"pytorchjob/{self.release}", "condition=Succeeded", PETAL_NAMESPACE, timeout=1500)

        def all_succeeded():
            pods = self.cluster.get(
                "-n", PETAL_NAMESPACE, "pods", "-l", f"training.kubeflow.org/job-name={self.release}"
            )
            return pods["items"] if {p["status"]["phase"] for p in pods["items"]} == {"Succeeded"} else None

        pods = self.cluster.wait_until(f"every pod of {self.release} Succeeded", all_succeeded, PETAL_NAMESPACE)
        assert sorted(p["metadata"]["name"] for p in pods) == [self.master, self.worker]
        test = self.helm("test", self.release, "--logs")  # from inside the cluster: storage answers, data there
        assert test.returncode == 0 and "Phase:          Succeeded" in test.stdout, f"{test.stdout}\n{test.stderr}"
        text = storage.read_bytes(parse_url(self.output).join("metrics.jsonl")).decode()
        return [json.loads(line) for line in text.splitlines()]

    def uninstall(self) -> None:
        self.helm("uninstall", self.release)

    def status(self) -> dict:
        return json.loads(self.cluster.petal("status", self.release, "--json").stdout)

    def shown_while_running(self, storage) -> None:
        """`petal status` and `petal list` show the run's live progress record, ETA included."""

        def estimated() -> dict | None:
            try:
                record = json.loads(storage.read_bytes(parse_url(f"{self.output}/progress.json")))
            except StorageError:
                return None
            return record if record.get("eta_seconds") is not None else None

        record = self.cluster.wait_until("a progress record with an ETA", estimated, PETAL_NAMESPACE, timeout=600)
        first = self.status()
        assert first["state"] == "Running" and first["epochs"] == self.epochs and first["output"] == self.output
        assert (first["epoch"], first["step"]) >= (record["epoch"], record["step"]) and first["eta_seconds"] is not None
        assert [p["name"] for p in first["pods"]] == [self.master, self.worker]
        listed = {j["name"]: j for j in json.loads(self.cluster.petal("list", "--json").stdout)}
        assert listed[self.release]["state"] == "Running" and listed[self.release]["eta_seconds"] is not None
        assert self.release in self.cluster.petal("list").stdout

    def shown_when_done(self, follower: Watched, storage, collected) -> None:
        """The follower ended with the job on the last master's last line; status, list, the collected
        TensorBoard events and cancel say what the run did."""
        assert follower.wait(300) == 0
        assert any('"event": "resumed"' in line for line in follower.stdout)  # a recreated master's log, same stream
        last = next(line for line in reversed(follower.stdout) if '{"event": "done"' in line)
        trainer_said = json.loads(last[last.index("{") :])
        done = self.status()
        assert done["state"] == "Succeeded" and done["epoch"] == done["epochs"] == self.epochs
        assert done["best_val_acc"] == trainer_said["best_val_acc"]
        row = next(line for line in self.cluster.petal("list").stdout.splitlines() if line.startswith(self.release))
        said = [line for line in self.runs()[-1][1].lines if not STEP.search(line)]  # the last master, steps aside
        assert "Succeeded" in row and f"{done['best_val_acc']:.4f}" in row, "\n".join([row, *said])

        self.cluster.petal("collect", self.release, str(collected))
        events = EventAccumulator(str(collected / "tensorboard"))
        events.Reload()
        tags = events.Tags()["scalars"]
        assert {"train/loss", "train/lr", "train/images_per_s", "val/loss", "val/accuracy"} <= set(tags)
        assert sorted({e.step for e in events.Scalars("val/accuracy")}) == list(range(1, self.epochs + 1))
        # Every step was logged (--log-every 1), by a master that was stopped or by the one that resumed.
        assert sorted({e.step for e in events.Scalars("train/loss")}) == list(range(1, self.epochs * done["steps"] + 1))
        assert "val/per_class_accuracy" in events.Tags()["images"]

        cancelled = self.cluster.petal("cancel", self.release)
        assert f"its outputs stay in {self.output}" in cancelled.stderr
        assert self.cluster.petal("status", self.release, check=False).returncode == 5
        assert storage.exists(parse_url(f"{self.output}/best.pt"))


def the_reference_result(records: list[dict], reference_result: dict) -> None:
    """Every epoch trained all 200 samples, and the result is the uninterrupted run's."""
    assert [(r["epoch"], r["train_samples"]) for r in records] == [(e, 200) for e in range(1, len(records) + 1)]
    best = reference_result["best_val_acc"]
    assert round(abs(max(r["val_acc"] for r in records) - best), 6) <= 0.01, (records, best)  # one sample of 100


def report(rows: list[tuple[str, str, str, int]], record_property) -> None:
    """The measured rows, for the fault table printed at the end of the run."""
    for fault, policy, outcome, lost in rows:
        record_property("fault table row", f"| {fault} | {policy} | {outcome}; Succeeded | {lost} |")


@pytest.fixture()
def faulty(cluster, timeline, petal_image, synthetic_dataset, storage_outage, request):
    _, storage = storage_outage
    job = FaultyJob(cluster, timeline, petal_image, synthetic_dataset, request.param, storage)
    job.install()
    yield job
    job.uninstall()


@pytest.mark.parametrize("faulty", ["ExitCode"], indirect=True)
def test_pods_deleted_lost_and_storage_restarted_under_exitcode_as_petal_shows_it(
    faulty, storage_outage, storage, reference_result, record_property, tmp_path
):
    job, policy, (outage, _) = faulty, "ExitCode", storage_outage
    job.shown_while_running(storage)
    follower = Watched(["petal", "logs", job.release, "-f"], job.cluster.env)
    try:
        before = job.wait_for_step(1, 4)
        job.delete(job.worker)  # SIGTERM: the ranks agree on a step, checkpoint, exit 143
        job.resumed_after("worker pod deleted (SIGTERM)", policy, before)

        before = job.wait_for_step(2, 5)
        job.delete(job.master)
        job.resumed_after("master pod deleted (SIGTERM)", policy, before)

        before = job.wait_for_step(3, 5)
        job.delete(job.worker, force=True)  # SIGKILL: back to the last periodic checkpoint
        job.resumed_after("worker pod lost (SIGKILL)", policy, before)

        instances = job.wait_for_step(4, 2)
        outage.down()  # storage gone, as when MinIO restarts
        try:
            retrying = lambda: any("retrying in" in line for line in job.runs()[-1][1].lines)  # noqa: E731
            job.timeline.wait_for("the master retrying storage", retrying, timeout=300)
        finally:
            outage.up()
        records = job.finish(storage)
        assert job.position()[1] == instances, "storage came back: no restart"
        job.rows.append(("MinIO restarted mid-job", policy, "storage calls retried, no restart", 0))
        the_reference_result(records, reference_result)
        report(job.rows, record_property)
        job.shown_when_done(follower, storage, tmp_path / job.release)
    finally:
        follower.kill()


@pytest.mark.parametrize("faulty", ["OnFailure"], indirect=True)
def test_preemption_and_a_lost_master_under_onfailure(faulty, storage, reference_result, record_property):
    job, policy = faulty, "OnFailure"
    before = job.wait_for_step(1, 6)
    job.delete(job.master, job.worker)  # preemption: every pod gets SIGTERM and its grace period
    job.resumed_after("all pods preempted (SIGTERM)", policy, before)

    before = job.wait_for_step(3, 4)
    job.delete(job.master, force=True)
    job.resumed_after("master pod lost (SIGKILL)", policy, before)

    the_reference_result(job.finish(storage), reference_result)
    report(job.rows, record_property)
