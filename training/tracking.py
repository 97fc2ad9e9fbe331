"""Where rank 0 tells others how the run goes, each from a thread of its own (`Background`): a slow or
failing call there never holds the other ranks at the next all-reduce and never ends the run.

    TrainerStatus   Kubeflow Trainer's TrainJob status (`kubectl get trainjob`, the Kubeflow SDK): with
                    its TrainJobStatus feature gate on, the controller gives each trainer pod
                    KUBEFLOW_TRAINER_SERVER_URL, _CA_CERT and _TOKEN (file paths), and a POST there fills
                    the TrainJob's status.trainerStatus. Nothing happens where they are absent.
    MlflowRun       an MLflow tracking server's run, where MLFLOW_TRACKING_URI names one (MLflow's own
                    variable, read by its client with MLFLOW_TRACKING_USERNAME/_PASSWORD or _TOKEN):
                    every trainer option as a param, the TensorBoard scalars as metrics under the same
                    names, the run's artifacts at its end. <output>/mlflow.json keeps the run's id, so
                    a resumed run goes on in the same MLflow run without logging a step twice.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from training.exit_codes import LaunchError
from training.storage import S3Url, Storage


class Background:
    """Sends what is handed to `submit` from a thread of its own. Work handed over while a send is under
    way is merged (`merge(older, newer)`) and sent next. A send that raises is said once (until one
    works again) and its work kept, merged with what comes next, for the next try — whatever it
    raised: a thread that died of an unforeseen error would leave the run silently unreported; `close`
    sends what is left, waiting at most its timeout."""

    def __init__(self, name: str, send: Callable[[Any], None], merge: Callable[[Any, Any], Any],
                 min_interval: float = 0.0):  # fmt: skip
        self.name, self.send, self.merge = name, send, merge
        self.min_interval = min_interval  # seconds between sends, except the last one
        self.pending: Any = None
        self.fresh = False  # work handed over since the last send
        self.closing = False
        self.failing: str | None = None
        self.last_send = float("-inf")
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f"petal-{name}", daemon=True)
        self.thread.start()

    def submit(self, work: Any) -> None:
        with self.changed:
            self.pending = work if self.pending is None else self.merge(self.pending, work)
            self.fresh = True
            self.changed.notify()

    def _run(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.fresh or self.closing)
                # Sends are spaced by min_interval, except when closing; work arriving meanwhile merges in.
                self.changed.wait_for(lambda: self.closing, self.last_send + self.min_interval - time.monotonic())
                work, self.pending, self.fresh = self.pending, None, False
                if work is None:
                    return
                last_try = self.closing  # what is sent once closing is asked for is all there is
            self.last_send = time.monotonic()
            try:
                self.send(work)
                self.failing = None
            except Exception as err:
                said = f"{type(err).__name__}: {err}"
                if self.failing != said:
                    self.failing = said
                    print(f"petal: {self.name} failed ({said}); training goes on", file=sys.stderr, flush=True)
                with self.changed:
                    if last_try:
                        return  # one try on the way out
                    # A send under way when closing was asked for gets one more try, with the work after it.
                    self.pending = work if self.pending is None else self.merge(work, self.pending)

    def close(self, timeout: float) -> None:
        self.begin_close()
        self.join(timeout)

    def begin_close(self) -> None:
        """Sends what is left without waiting for it: several senders then finish side by side (`join`)."""
        with self.changed:
            self.closing = True
            self.changed.notify()

    def join(self, timeout: float) -> None:
        """Waits for the last send at most `timeout` seconds (none left: not at all)."""
        self.thread.join(max(timeout, 0))
        if self.thread.is_alive():
            print(f"petal: the last {self.name} did not finish in time; the process ends without it", file=sys.stderr,
                  flush=True)  # fmt: skip


# The controller's status server takes 5 writes a second in all; every 5 s is plenty for a person.
STATUS_SECONDS = 5.0


class TrainerStatus:
    """The run's progress, ETA and metrics in its TrainJob's status.trainerStatus."""

    def __init__(self, url: str, ca_file: str, token_file: str):
        import urllib3

        self.url, self.token_file = url, token_file
        self.http = urllib3.PoolManager(ca_certs=ca_file, timeout=urllib3.Timeout(total=5), retries=False)
        self.sender = Background("TrainJob status update", self._post, lambda older, newer: newer,
                                 STATUS_SECONDS)  # fmt: skip

    @classmethod
    def from_environment(cls, environ: dict[str, str] = os.environ) -> TrainerStatus | None:
        names = ("KUBEFLOW_TRAINER_SERVER_URL", "KUBEFLOW_TRAINER_SERVER_CA_CERT", "KUBEFLOW_TRAINER_SERVER_TOKEN")
        values = [environ.get(name) for name in names]
        return cls(*values) if all(values) else None

    def submit(self, record: dict) -> None:
        """A progress record (progress.py's) as the TrainJob's status."""
        self.sender.submit(trainer_status(record))

    def _post(self, status: dict) -> None:
        with open(self.token_file) as token:  # read each time: the kubelet rotates it
            bearer = token.read().strip()
        body = {"trainerStatus": status | {"lastUpdatedTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}}
        headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"}
        answer = self.http.request("POST", self.url, body=json.dumps(body).encode(), headers=headers)
        if answer.status != 200:
            message = answer.data.decode(errors="replace")[:200]
            raise RuntimeError(f"the trainer's status server answered {answer.status}: {message}")


# A progress record's figures under the names its TensorBoard scalars have.
STATUS_METRICS = {"epoch": "epoch", "loss": "train/loss", "images_per_s": "train/images_per_s",
                  "val_acc": "val/accuracy", "best_val_acc": "val/best_accuracy"}  # fmt: skip


def trainer_status(record: dict) -> dict:
    """Kubeflow Trainer's TrainerStatus of a progress record: percent of the run's steps done (100 once
    done), the ETA, the metrics as strings."""
    steps, epochs = record.get("steps") or 0, record["epochs"]
    done = (record["epoch"] - 1) * steps + (record.get("step") or 0)
    percent = 100 if record["state"] == "done" else min(99, 100 * done // max(epochs * steps, 1))
    status: dict = {"progressPercentage": percent}
    if record.get("eta_seconds") is not None:
        status["estimatedRemainingSeconds"] = max(0, int(record["eta_seconds"]))
    status["metrics"] = [{"name": name, "value": f"{record[key]:.6g}"}
                         for key, name in STATUS_METRICS.items() if record.get(key) is not None]  # fmt: skip
    return status


# MLflow's client retries a failed call 7 times over minutes by default: a tracking server that is down
# would hold every send that long. Fewer, shorter tries; each failure is said and retried with the next.
MLFLOW_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                          "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
MLFLOW_RECORD = "mlflow.json"
# MLflow's limits per log_batch call.
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000


def tracking_uri(environ: dict[str, str] = os.environ) -> str | None:
    """MLFLOW_TRACKING_URI, refused (one line, the URI not in it) where it carries credentials: they
    would be in every log line and error that names the server."""
    uri = environ.get("MLFLOW_TRACKING_URI") or None
    if uri and (urlsplit(uri).username or urlsplit(uri).password):
        raise LaunchError("MLFLOW_TRACKING_URI carries credentials (user:password@): give them as "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN (the "
                          "chart's mlflow.existingSecret)")  # fmt: skip
    return uri


class MlflowRun:
    """Rank 0's run in an MLflow tracking server. What is handed over (`params` once, `metric`s as they
    come, `finish` last) is sent from a thread of its own, in order; each part leaves the queue only once
    the server has it, so a failed send loses nothing. The run is made at the first send, or, when the
    trainer resumed from a checkpoint, found again in <output>/mlflow.json: a fresh start in the same
    output (before a first checkpoint, --overwrite-unresumable) is a new training, and a new run."""

    def __init__(self, uri: str, experiment: str, storage: Storage, output: S3Url, scratch: Path, resumed: bool):
        for name, value in MLFLOW_CLIENT_DEFAULTS.items():  # here, before any thread reads the environment
            os.environ.setdefault(name, value)
        # Never the run's URL on stdout, which carries the trainer's JSON records: the log line says it.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.uri, self.experiment, self.storage, self.output = uri, experiment, storage, output
        self.scratch = scratch  # where the artifacts are fetched to on their way: the pod's cache, not a small /tmp
        self.resumed = resumed
        self.client = self.run_id = None
        self.recorded = False  # mlflow.json names the run
        self.logged: dict[str, int] = {}  # metric: the last step the run has, when it was resumed
        self.sender = Background("MLflow tracking", self._send, lambda older, newer: older + newer)

    def params(self, options: dict) -> None:
        self.sender.submit([("params", {key: str(value) for key, value in options.items()})])

    def metric(self, name: str, value: float, step: int) -> None:
        self.sender.submit([("metric", (name, float(value), step, int(time.time() * 1000)))])

    def finish(self, outcome: str) -> None:
        """The run's end; "done" also uploads its artifacts (artifacts.RUN_ARTIFACTS, from --output). The
        status goes first: an upload that fails or outlasts the process leaves the run ended, not RUNNING."""
        status = {"done": "FINISHED", "stopped": "KILLED"}.get(outcome, "FAILED")
        self.sender.submit([("status", status), *([("artifacts", None)] if outcome == "done" else [])])

    def _send(self, work: list) -> None:
        """Sends `work` from its front, removing each part once it is stored."""
        if self.run_id is None:
            self._start()
        if not self.recorded:
            record = {"tracking_uri": self.uri, "run_id": self.run_id}
            self.storage.write_bytes(self.output.join(MLFLOW_RECORD), json.dumps(record).encode(), "application/json")
            self.recorded = True
        while work:
            kind, payload = work[0]
            if kind == "metric":
                count = next((i for i, (k, _) in enumerate(work[:METRICS_PER_BATCH]) if k != "metric"),
                             min(len(work), METRICS_PER_BATCH))  # fmt: skip
                self._log_metrics([metric for _, metric in work[:count]])
                del work[:count]
                continue
            if kind == "params":
                self._log_params(payload)
            elif kind == "artifacts":
                self._log_artifacts()
            else:
                self.client.set_terminated(self.run_id, payload)
            del work[0]

    def _start(self) -> None:
        from mlflow import MlflowClient  # rank 0 alone, in this thread: training never waits for it

        client = MlflowClient(self.uri)
        record = self.output.join(MLFLOW_RECORD)
        earlier = json.loads(self.storage.read_bytes(record)) if self.resumed and self.storage.exists(record) else {}
        if earlier.get("tracking_uri") == self.uri and self._still_there(client, earlier["run_id"]):
            run_id = earlier["run_id"]
            client.update_run(run_id, status="RUNNING")
            for name in ("train/loss", *EPOCH_SCALARS):
                self.logged[name] = max((m.step for m in client.get_metric_history(run_id, name)), default=-1)
            self.recorded = True
        else:
            experiment = client.get_experiment_by_name(self.experiment)
            experiment_id = experiment.experiment_id if experiment else self._create_experiment(client)
            run_name = self.output.key.rstrip("/").rsplit("/", 1)[-1]
            run_id = client.create_run(experiment_id, run_name=run_name,
                                       tags={"petal.output": str(self.output)}).info.run_id  # fmt: skip
        self.client, self.run_id = client, run_id  # made once: a failure after this retries the rest, not this
        run = client.get_run(run_id).info
        experiment_name = client.get_experiment(run.experiment_id).name
        print(f"petal: MLflow run {run.run_name} ({run_id}) in experiment {experiment_name}: "
              f"{self.uri.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run_id}", file=sys.stderr,
              flush=True)  # fmt: skip

    def _create_experiment(self, client) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return client.create_experiment(self.experiment)
        except MlflowException:  # another run made it meanwhile
            return client.get_experiment_by_name(self.experiment).experiment_id

    @staticmethod
    def _still_there(client, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def _log_params(self, options: dict[str, str]) -> None:
        """Options as params; a resumed run keeps the values it began with and tags what changed."""
        from mlflow.entities import Param, RunTag

        before = self.client.get_run(self.run_id).data.params
        params = [Param(key, value) for key, value in options.items() if key not in before]
        tags = [RunTag(f"petal.changed_on_resume.{key}", value)
                for key, value in options.items() if key in before and before[key] != value]  # fmt: skip
        for start in range(0, max(len(params), len(tags)), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + PARAMS_PER_BATCH],
                                  tags=tags[start : start + PARAMS_PER_BATCH])  # fmt: skip

    def _log_metrics(self, metrics: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        fresh = [Metric(name, value, timestamp, step) for name, value, step, timestamp in metrics
                 if step > self.logged.get(name, -1)]  # fmt: skip
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    def _log_artifacts(self) -> None:
        from training.artifacts import collect

        self.scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mlflow-", dir=self.scratch) as directory:
            collect(self.storage, self.output, Path(directory))
            self.client.log_artifacts(self.run_id, directory)


# What progress.py's TensorBoard writes once per epoch (train/loss is written per logged step).
EPOCH_SCALARS = ("train/lr", "train/images_per_s", "val/loss", "val/accuracy")
