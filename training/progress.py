"""What a running job says about itself, written by rank 0 into its run directory as it trains:

    <output>/progress.json      at most every PROGRESS_SECONDS (and once the first ETA is known), and at
                                every epoch's end:
        {"state": "training" | "done", "epoch": E, "epochs": N, "step": S, "steps": T, "loss": ...,
         "images_per_s": ..., "eta_seconds": ..., "val_acc": <last epoch's>, "best_val_acc": ...,
         "updated": <unix time>}
    <output>/tensorboard/       TensorBoard event files: train/loss per logged step; train/lr,
                                train/images_per_s, val/loss, val/accuracy per epoch; the per-class
                                accuracy as a figure. Uploaded every EVENTS_SECONDS and each epoch.

`petal status`, `petal list` and `submit --follow` read progress.json; `petal collect` fetches the
event files, so `tensorboard --logdir runs` shows every collected run. In a TrainJob whose Kubeflow
Trainer gives it a status endpoint, each record also becomes the TrainJob's status.trainerStatus
(tracking.py's TrainerStatus); where MLFLOW_TRACKING_URI names a tracking server, every TensorBoard
scalar is also an MLflow metric of the same name (tracking.py's MlflowRun).

Both go up from a thread of their own (`Uploads`, on tracking.py's `Background`): a slow or failing
storage call there never holds the other ranks at the next all-reduce, and never ends the run — it
is logged, and the next upload tries again. Every way out (done, SIGTERM, a failure) flushes them,
so progress.json ends in the run's real final state ("done", "stopped" or "failed") with every
TensorBoard scalar uploaded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from training import plots
from training.storage import S3Url, Storage
from training.tracking import Background, MlflowRun, TrainerStatus

PROGRESS_SECONDS = 10.0
EVENTS_SECONDS = 60.0
# How long the last uploads may take on the way out: within a pod's grace period after SIGTERM.
FLUSH_SECONDS = 30.0
STATUS_FLUSH_SECONDS = 10.0
# A finished run's artifacts (best.pt among them) into MLflow: the pod is done, nothing else waits.
MLFLOW_ARTIFACT_SECONDS = 120.0


class Uploads:
    """The latest progress record and, when due, the event files, uploaded from a thread of its own."""

    def __init__(self, storage: Storage, output: S3Url, events_dir: Path):
        self.storage, self.output, self.events_dir = storage, output, events_dir
        self.sender = Background("progress upload", self._upload,
                                 merge=lambda older, newer: (newer[0], older[1] or newer[1]))  # fmt: skip

    def submit(self, record: bytes, events: bool) -> None:
        self.sender.submit((record, events))

    def _upload(self, work: tuple[bytes, bool]) -> None:
        record, events = work
        self.storage.write_bytes(self.output.join("progress.json"), record, "application/json")
        if events:
            for path in sorted(self.events_dir.iterdir()):
                self.storage.upload(path, self.output.join("tensorboard", path.name))


class Progress:
    def __init__(self, storage: Storage, output: S3Url, epochs: int, global_batch: int, events_dir: Path,
                 mlflow: MlflowRun | None = None):  # fmt: skip
        from torch.utils.tensorboard import SummaryWriter  # only rank 0 writes: only it needs tensorboard

        self.storage, self.output, self.epochs, self.global_batch = storage, output, epochs, global_batch
        self.events_dir = events_dir
        self.writer = SummaryWriter(log_dir=str(events_dir))
        self.uploads = Uploads(storage, output, events_dir)
        self.trainer_status = TrainerStatus.from_environment()
        self.mlflow = mlflow
        self.last_write = self.last_upload = 0.0
        self.last_step_time, self.last_step = time.monotonic(), None
        self.seconds_per_step: float | None = None
        self.eval_seconds = 0.0
        self.record: dict = {}

    def step(self, epoch: int, step: int, steps: int, loss: float | None, best_val_acc: float,
             global_step: int) -> None:  # fmt: skip
        """After optimizer step `step` of the epoch's `steps`, the run's `global_step`-th (`loss` where it was
        read anyway, for the log): the rate, the ETA."""
        now = time.monotonic()
        first_estimate = False
        if self.last_step is not None and step > self.last_step:
            per_step = (now - self.last_step_time) / (step - self.last_step)
            first_estimate = self.seconds_per_step is None
            self.seconds_per_step = per_step if first_estimate else 0.8 * self.seconds_per_step + 0.2 * per_step
        self.last_step_time, self.last_step = now, step
        if loss is not None:
            self.scalar("train/loss", loss, global_step)
        eta = None
        if self.seconds_per_step is not None:
            steps_left = (steps - step) + (self.epochs - epoch) * steps
            eta = round(steps_left * self.seconds_per_step + (self.epochs - epoch + 1) * self.eval_seconds)
        # Kept at every step, so that the record a run ends with says where it stopped.
        self.record = {"state": "training", "epoch": epoch, "epochs": self.epochs, "step": step, "steps": steps,
                       "loss": loss if loss is not None else self.record.get("loss"),
                       "images_per_s": round(self.global_batch / self.seconds_per_step, 1)
                       if self.seconds_per_step else None,
                       "eta_seconds": eta, "best_val_acc": best_val_acc if best_val_acc >= 0 else None,
                       "val_acc": self.record.get("val_acc")}  # fmt: skip
        # The first ETA is worth publishing at once: a user who just submitted is looking for it.
        if first_estimate or now - self.last_write >= PROGRESS_SECONDS:
            self.publish(now)

    def epoch_end(self, record: dict, best_val_acc: float, eval_seconds: float, classes: list[str]) -> None:
        epoch = record["epoch"]
        self.eval_seconds = eval_seconds
        self.scalar("train/lr", record["lr"], epoch)
        self.scalar("train/images_per_s", record["train_samples"] / max(record["train_seconds"], 1e-9), epoch)
        self.scalar("val/loss", record["val_loss"], epoch)
        self.scalar("val/accuracy", record["val_acc"], epoch)
        self.writer.add_figure("val/per_class_accuracy", plots.per_class_figure(classes, record["val_per_class_acc"],
                                                                                  epoch), epoch)  # fmt: skip
        left = self.epochs - epoch
        per_epoch = record["seconds"]
        self.record = {"state": "training" if left else "done", "epoch": min(epoch + 1, self.epochs) if left else epoch,
                       "epochs": self.epochs, "step": 0 if left else self.record.get("steps"),
                       "steps": self.record.get("steps"), "loss": record["train_loss"],
                       "images_per_s": round(record["train_samples"] / max(record["train_seconds"], 1e-9), 1),
                       "eta_seconds": round(left * per_epoch), "best_val_acc": best_val_acc,
                       "val_acc": record["val_acc"]}  # fmt: skip
        self.last_upload = 0.0  # the epoch's scalars go up now
        self.publish(time.monotonic())

    def scalar(self, name: str, value: float, step: int) -> None:
        """A TensorBoard scalar, and the MLflow metric of the same name."""
        self.writer.add_scalar(name, value, step)
        if self.mlflow:
            self.mlflow.metric(name, value, step)

    def publish(self, now: float) -> None:
        events = now - self.last_upload >= EVENTS_SECONDS
        if events:
            self.writer.flush()  # to the local file, which the upload thread then sends
            self.last_upload = now
        self.uploads.submit(json.dumps(self.record | {"updated": time.time()}).encode(), events)
        if self.trainer_status:
            self.trainer_status.submit(self.record)
        self.last_write = now

    def close(self, outcome: str) -> None:
        """The run's end — "done", "stopped" (SIGTERM) or "failed" — recorded, and everything uploaded (a
        done run's artifacts already in --output), each sender finishing beside the others."""
        self.record = self.record | {"state": outcome, "eta_seconds": None if outcome != "done" else 0}
        self.writer.close()
        self.last_upload = 0.0
        self.publish(time.monotonic())
        if self.mlflow:
            self.mlflow.finish(outcome)
        senders = [(self.uploads.sender, FLUSH_SECONDS)]
        if self.trainer_status:
            senders.append((self.trainer_status.sender, STATUS_FLUSH_SECONDS))
        if self.mlflow:
            senders.append((self.mlflow.sender, MLFLOW_ARTIFACT_SECONDS if outcome == "done" else FLUSH_SECONDS))
        started = time.monotonic()
        for sender, _ in senders:
            sender.begin_close()
        for sender, seconds in senders:
            sender.join(started + seconds - time.monotonic())
