"""The `petal` command on a real job on the test bed: list and status while it runs (a growing step
and an ETA), logs followed across a deleted master pod, the collected TensorBoard events read back
with TensorBoard's own reader, cancel leaving the outputs in storage."""

from __future__ import annotations

import json
import subprocess
import uuid

from conftest import PETAL_NAMESPACE
from support import ROOT, Watched, s3
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training.storage import parse_url

CPU_VALUES = ROOT / "charts" / "petal" / "ci" / "cpu-values.yaml"
EPOCHS = 4


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
    collected = tmp_path / name
    submit = Watched(["petal", "submit", "--name", name, "--replicas", "2", "--image", petal_image, "--values",
                      str(CPU_VALUES), "--dataset", synthetic_dataset, "--epochs", str(EPOCHS), "--batch-size", "8",
                      "--set", "training.logEvery=1", "--set", f"outputPrefix={s3('runs')}", "--collect",
                      str(collected), "--timeout", "1200", "--follow"], cluster.env)  # fmt: skip
    try:

        def estimated() -> dict | None:
            shown = status(cluster, name)
            return shown if shown.get("step") and shown["eta_seconds"] is not None else None

        first = cluster.wait_until("a progress record with an ETA", estimated, PETAL_NAMESPACE, timeout=600)
        assert first["state"] == "Running" and first["epochs"] == EPOCHS and first["output"] == s3(f"runs/{name}")
        assert [p["name"] for p in first["pods"]] == [f"{name}-master-0", f"{name}-worker-0"]
        cluster.wait_until("the step to grow", lambda: (status(cluster, name)["epoch"], status(cluster, name)["step"])
                           > (first["epoch"], first["step"]), PETAL_NAMESPACE, timeout=300)  # fmt: skip
        listed = {j["name"]: j for j in json.loads(petal(cluster, "list", "--json").stdout)}
        assert listed[name]["state"] == "Running" and listed[name]["eta_seconds"] is not None
        assert name in petal(cluster, "list").stdout

        follower = Watched(["petal", "logs", name, "-f"], cluster.env)
        follower.wait_for_line(r"epoch \d+/4 step", timeout=300)
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "pod", f"{name}-master-0", "--wait=false")
        follower.wait_for_line(r'"event": "resumed"', timeout=600)  # the new master's log, same stream

        assert submit.wait(1500) == 0, "\n".join(submit.stderr[-30:])
        assert follower.wait(300) == 0  # it ends with the job
    finally:
        submit.kill()

    done = status(cluster, name)
    assert done["state"] == "Succeeded" and done["epoch"] == done["epochs"] == EPOCHS
    assert done["best_val_acc"] == max(r["val_acc"] for r in map(json.loads, (collected / "metrics.jsonl")
                                                                  .read_text().splitlines()))  # fmt: skip
    row = next(line for line in petal(cluster, "list").stdout.splitlines() if line.startswith(name))
    assert "Succeeded" in row and f"{done['best_val_acc']:.4f}" in row

    events = EventAccumulator(str(collected / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/images_per_s", "val/loss", "val/accuracy"} <= set(tags)
    assert sorted({e.step for e in events.Scalars("val/accuracy")}) == list(range(1, EPOCHS + 1))
    assert len({e.step for e in events.Scalars("train/loss")}) >= EPOCHS * 12  # one per logged step
    assert "val/per_class_accuracy" in events.Tags()["images"]

    cancelled = petal(cluster, "cancel", name)
    assert f"its outputs stay in {s3(f'runs/{name}')}" in cancelled.stderr
    assert petal(cluster, "status", name, check=False).returncode == 5
    assert storage.exists(parse_url(s3(f"runs/{name}/best.pt")))


def test_petal_says_one_line_for_a_job_that_is_not_there(cluster):
    for verb in (["status", "no-such-job"], ["logs", "no-such-job"], ["cancel", "no-such-job"],
                 ["collect", "no-such-job"]):  # fmt: skip
        result = petal(cluster, *verb, check=False)
        assert result.returncode == 5 and result.stderr.strip() == (
            f"petal: error: no petal job 'no-such-job' in namespace '{PETAL_NAMESPACE}'"
        )
