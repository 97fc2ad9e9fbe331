"""Where rank 0 tells others how the run goes, each from a thread of its own (`Background`): a slow or
failing call there never holds the other ranks at the next all-reduce and never ends the run.

    TrainerStatus   Kubeflow Trainer's TrainJob status (`kubectl get trainjob`, the Kubeflow SDK): with
                    its TrainJobStatus feature gate on, the controller gives each trainer pod
                    KUBEFLOW_TRAINER_SERVER_URL, _CA_CERT and _TOKEN (file paths), and a POST there fills
                    the TrainJob's status.trainerStatus. Nothing happens where they are absent.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any


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
        with self.changed:
            self.closing = True
            self.changed.notify()
        self.thread.join(timeout)
        if self.thread.is_alive():
            print(f"petal: the last {self.name} did not finish within {timeout:.0f}s", file=sys.stderr, flush=True)


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

    def close(self, timeout: float) -> None:
        self.sender.close(timeout)


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
