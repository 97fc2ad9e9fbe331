"""MLflow tracking (training/tracking.py's MlflowRun) against the test bed's real tracking server
(scripts/testbed.sh mlflow: SQLite runs, artifacts in MinIO), read back through MLflow's own client: a
run killed mid-epoch and resumed is one MLflow run with every option, every step once and the run's
artifacts, a fresh start over an earlier run a new one; a tracking server that goes away mid-run gets
what it missed once it is back, and one that never answers fails no run. (Cluster runs log to it
through a Service: tests/cluster/test_trainer_v2.py, test_delivery.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from support import SMALL_TRAINING, FaultyProxy, free_port, tracked_run, trainer, wait_ok

from training.config import build_parser
from training.storage import parse_url
from training.tracking import EPOCH_SCALARS, MlflowRun

pytestmark = pytest.mark.slow

EPOCHS = 2
STEPS_PER_EPOCH = 7  # 200 synthetic training images, 2 ranks of 16


def options(epochs: int = EPOCHS, **overrides) -> list[str]:
    args = SMALL_TRAINING[: SMALL_TRAINING.index("--epochs")] + ["--epochs", str(epochs)]
    return args + [item for key, value in overrides.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def steps(client: MlflowClient, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def test_a_run_killed_mid_epoch_and_resumed_is_one_mlflow_run_with_every_step_once(
    mlflow_server, s3_env, synthetic_dataset, run_dir, storage
):
    experiment = f"kill-{uuid.uuid4().hex[:6]}"
    env = s3_env | {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    args = ["--data", synthetic_dataset, "--output", run_dir,
            *options(checkpoint_every=3, mlflow_experiment=experiment)]  # fmt: skip
    first = trainer(env, args)
    first.wait_for_line(r"epoch 2/2 step 5/", timeout=600)
    os.kill(first.rank_pid(1), signal.SIGKILL)
    assert first.wait(120) != 0
    second = trainer(env, args)
    wait_ok(second)
    assert any(r["event"] == "resumed" for r in second.json_lines())

    output = parse_url(run_dir)
    history = [json.loads(line) for line in storage.read_bytes(output.join("metrics.jsonl")).splitlines()]
    run = tracked_run(mlflow_server.uri, experiment, run_dir.rsplit("/", 1)[1], history)
    assert run.data.tags["petal.output"] == run_dir
    client = MlflowClient(mlflow_server.uri)
    assert json.loads(storage.read_bytes(output.join("mlflow.json")))["run_id"] == run.info.run_id
    parser_options = {a.dest for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    assert set(run.data.params) == parser_options
    assert run.data.params["epochs"] == str(EPOCHS) and run.data.params["data"] == synthetic_dataset
    # Steps the killed run logged past its checkpoint were trained again, and logged once.
    assert steps(client, run.info.run_id, "train/loss") == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    for name in EPOCH_SCALARS:
        assert steps(client, run.info.run_id, name) == list(range(1, EPOCHS + 1)), name
    with tempfile.TemporaryDirectory() as directory:
        best = Path(client.download_artifacts(run.info.run_id, "best.pt", directory)).read_bytes()
    assert hashlib.sha256(best).digest() == hashlib.sha256(storage.read_bytes(output.join("best.pt"))).digest()


def test_a_server_that_goes_away_mid_run_gets_every_step_it_missed_once_it_is_back(
    mlflow_server, s3_env, synthetic_dataset, run_dir
):
    experiment = f"outage-{uuid.uuid4().hex[:6]}"
    epochs = 3
    proxy = FaultyProxy(mlflow_server.port)
    try:
        env = s3_env | {"MLFLOW_TRACKING_URI": proxy.endpoint}
        args = ["--data", synthetic_dataset, "--output", run_dir, *options(epochs, mlflow_experiment=experiment)]
        proc = trainer(env, args)
        proc.wait_for_line(r"petal: MLflow run ", timeout=300)
        proc.wait_for_line(r"epoch 1/3 step 2/", timeout=300)  # the run, its params and first steps sent
        proxy.down()  # every connection reset, new ones refused: a server restarting
        said = proc.wait_for_line(r"MLflow tracking failed", timeout=300)
        assert "training goes on" in said and "onnection" in said, said
        proxy.up()
        wait_ok(proc)
    finally:
        proxy.close()

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "train/loss") == list(range(1, epochs * STEPS_PER_EPOCH + 1))
    assert steps(client, run.info.run_id, "val/accuracy") == list(range(1, epochs + 1))


def test_a_run_whose_tracking_server_never_answers_succeeds_and_says_why(s3_env, synthetic_dataset, run_dir):
    env = s3_env | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}  # nothing listens: refused
    proc = trainer(env, ["--data", synthetic_dataset, "--output", run_dir, *options(1)], nproc=1)
    wait_ok(proc)
    assert [r["event"] for r in proc.json_lines()][-1] == "done"
    said = "\n".join(proc.stderr)
    assert "petal: MLflow tracking failed (" in said and "training goes on" in said


def test_a_fresh_start_over_an_earlier_mlflow_run_is_a_new_run_and_a_resume_goes_on_in_it(
    mlflow_server, storage, run_dir, tmp_path
):
    """No checkpoint to resume (the first attempt died before one, --overwrite-unresumable): a new
    training, so a new MLflow run from step 1; a resume goes on in the run mlflow.json names, each step
    logged once."""
    experiment = f"fresh-{uuid.uuid4().hex[:6]}"
    output = parse_url(run_dir)

    def attempt(resumed: bool, steps_trained: range) -> str:
        run = MlflowRun(mlflow_server.uri, experiment, storage, output, tmp_path, resumed=resumed)
        run.params({"epochs": 1})
        for step in steps_trained:
            run.metric("train/loss", 1.0 / step, step)
        run.finish("stopped")
        run.sender.close(60)
        return json.loads(storage.read_bytes(output.join("mlflow.json")))["run_id"]

    first = attempt(resumed=False, steps_trained=range(1, 4))
    second = attempt(resumed=False, steps_trained=range(1, 3))
    resumed = attempt(resumed=True, steps_trained=range(2, 6))  # from a checkpoint at step 1
    client = MlflowClient(mlflow_server.uri)
    assert second != first and resumed == second
    assert steps(client, first, "train/loss") == [1, 2, 3]
    assert steps(client, second, "train/loss") == [1, 2, 3, 4, 5]
