"""What `petal list` and `petal status` say of a job from its object alone (no storage configured in
the user's shell): a TrainJob's status.trainerStatus, as Kubeflow Trainer's status server stores
what the trainer reported (training/tracking.py), gives its progress, ETA and metrics."""

from __future__ import annotations

from petal.jobs import describe, progress_text, status_text
from training.tracking import trainer_status


def trainjob(reported: dict | None, condition: str | None = None) -> dict:
    """A TrainJob as the apiserver returns it: running (no condition yet) or with `condition` True."""
    status = {"conditions": [{"type": condition, "status": "True", "reason": "", "message": ""}] if condition else []}
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": "flowers", "namespace": "petal", "creationTimestamp": "2026-12-06T10:00:00Z",
                         "labels": {}},
            "spec": {"trainer": {"args": ["--output", "s3://runs/petal/flowers"]}},
            "status": status | ({"trainerStatus": reported} if reported else {})}  # fmt: skip


def test_a_trainjobs_reported_status_is_its_progress_where_storage_is_not_readable():
    record = {"state": "training", "epoch": 2, "epochs": 4, "step": 5, "steps": 10, "loss": 0.5, "images_per_s": 80.0,
              "eta_seconds": 300, "best_val_acc": 0.625, "val_acc": 0.625}  # fmt: skip
    described = describe(None, trainjob(trainer_status(record)), storage=None, in_full=False)
    assert progress_text(described) == "37%"  # 15 of 40 steps
    assert described["eta_seconds"] == 300 and described["best_val_acc"] == 0.625 and described["loss"] == 0.5
    assert described["trainer_status"]["metrics"] == {"epoch": 2.0, "train/loss": 0.5, "train/images_per_s": 80.0,
                                                      "val/accuracy": 0.625, "val/best_accuracy": 0.625}  # fmt: skip

    described |= {"admission": None, "pods": [], "last_epoch": None}
    text = status_text(described)
    assert "progress: 37%, loss 0.5000, 80.0 img/s, ETA 5m" in text
    assert "TrainJob status: epoch 2, train/loss 0.5, train/images_per_s 80, val/accuracy 0.625" in text


def test_a_done_run_reports_100_percent_and_a_job_without_a_report_shows_none():
    done = trainer_status({"state": "done", "epoch": 4, "epochs": 4, "step": 10, "steps": 10, "eta_seconds": 0,
                           "best_val_acc": 0.75, "val_acc": 0.7})  # fmt: skip
    described = describe(None, trainjob(done, "Complete"), storage=None, in_full=False)
    assert progress_text(described) == "100%" and described["best_val_acc"] == 0.75
    assert described["eta_seconds"] is None  # finished: no ETA, whatever was reported
    plain = describe(None, trainjob(None), storage=None, in_full=False)
    assert progress_text(plain) == "-" and plain["trainer_status"] is None and plain["best_val_acc"] is None
