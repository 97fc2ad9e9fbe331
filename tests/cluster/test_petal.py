"""The `petal` command on a real job on the test bed: list and status while it runs (its live progress
and ETA), logs followed across a deleted master pod to the trainer's last line, the collected
TensorBoard events (every logged step) read back with TensorBoard's own reader, cancel leaving the
outputs in storage."""

from __future__ import annotations

import json
import subprocess
import uuid

from conftest import PETAL_NAMESPACE
from support import ROOT, Watched, s3
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training.storage import StorageError, parse_url

CPU_VALUES = ROOT / "charts" / "petal" / "ci" / "cpu-values.yaml"
EPOCHS = 3


def petal(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["petal", *args], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 or not check, f"petal {' '.join(args)}: {result.returncode}\n{result.stderr}"
    return result


def status(cluster, name: str) -> dict:
    """`petal status --json`; {} while the job does not exist yet."""
    shown = petal(cluster, "status", name, "--json", check=False)
    assert shown.returncode in (0, 5), shown.stderr
    return json.loads(shown.stdout) if shown.returncode == 0 else {}


def test_petal_lists_watches_follows_collects_and_cancels_a_job(cluster, petal_image, synthetic_dataset, storage,
                                                                tmp_path):  # fmt: skip
    name = f"petal-{uuid.uuid4().hex[:6]}"
    output, collected = s3(f"runs/{name}"), tmp_path / name
    submit = Watched(["petal", "submit", "--name", name, "--replicas", "2", "--image", petal_image, "--values",
                      str(CPU_VALUES), "--dataset", synthetic_dataset, "--epochs", str(EPOCHS), "--batch-size", "8",
                      "--set", "training.logEvery=1", "--set", f"outputPrefix={s3('runs')}", "--collect",
                      str(collected), "--timeout", "1200", "--follow"], cluster.env)  # fmt: skip
    try:

        def estimated() -> dict | None:
            """The run's progress record once it holds an ETA (read here, not through a petal per poll)."""
            try:
                record = json.loads(storage.read_bytes(parse_url(f"{output}/progress.json")))
            except StorageError:
                return None
            return record if record.get("eta_seconds") is not None else None

        record = cluster.wait_until("a progress record with an ETA", estimated, PETAL_NAMESPACE, timeout=600)
        first = status(cluster, name)  # petal status shows that record, live
        assert first["state"] == "Running" and first["epochs"] == EPOCHS and first["output"] == output
        assert (first["epoch"], first["step"]) >= (record["epoch"], record["step"]) and first["eta_seconds"] is not None
        assert [p["name"] for p in first["pods"]] == [f"{name}-master-0", f"{name}-worker-0"]
        listed = {j["name"]: j for j in json.loads(petal(cluster, "list", "--json").stdout)}
        assert listed[name]["state"] == "Running" and listed[name]["eta_seconds"] is not None
        assert name in petal(cluster, "list").stdout

        follower = Watched(["petal", "logs", name, "-f"], cluster.env)
        follower.wait_for_line(rf"epoch \d+/{EPOCHS} step", timeout=300)
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "pod", f"{name}-master-0", "--wait=false")
        follower.wait_for_line(r'"event": "resumed"', timeout=600)  # the new master's log, same stream

        assert submit.wait(1500) == 0, "\n".join(submit.stderr[-30:])
        assert follower.wait(300) == 0  # it ends with the job, with the new master's last line
    finally:
        submit.kill()

    last = next(line for line in reversed(follower.stdout) if '{"event": "done"' in line)
    trainer_said = json.loads(last[last.index("{") :])
    done = status(cluster, name)
    assert done["state"] == "Succeeded" and done["epoch"] == done["epochs"] == EPOCHS
    assert done["best_val_acc"] == trainer_said["best_val_acc"]
    row = next(line for line in petal(cluster, "list").stdout.splitlines() if line.startswith(name))
    assert "Succeeded" in row and f"{done['best_val_acc']:.4f}" in row

    events = EventAccumulator(str(collected / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/images_per_s", "val/loss", "val/accuracy"} <= set(tags)
    assert sorted({e.step for e in events.Scalars("val/accuracy")}) == list(range(1, EPOCHS + 1))
    # Every step was logged (--log-every 1), by the deleted master or by the one that resumed.
    assert sorted({e.step for e in events.Scalars("train/loss")}) == list(range(1, EPOCHS * done["steps"] + 1))
    assert "val/per_class_accuracy" in events.Tags()["images"]

    cancelled = petal(cluster, "cancel", name)
    assert f"its outputs stay in {output}" in cancelled.stderr
    assert petal(cluster, "status", name, check=False).returncode == 5
    assert storage.exists(parse_url(f"{output}/best.pt"))


def test_petal_says_one_line_for_a_job_that_is_not_there(cluster):
    for verb in (["status", "no-such-job"], ["logs", "no-such-job"], ["cancel", "no-such-job"],
                 ["collect", "no-such-job"]):  # fmt: skip
        result = petal(cluster, *verb, check=False)
        assert result.returncode == 5 and result.stderr.strip() == (
            f"petal: error: no petal job 'no-such-job' in namespace '{PETAL_NAMESPACE}'"
        )
