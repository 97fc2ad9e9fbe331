"""What a finished run leaves in its --output, and fetching it to a local directory. No torch here,
so the submitter and the `petal` command can use it.

    python scripts/collect_run.py s3://petal/runs/demo runs/demo
"""

from __future__ import annotations

from pathlib import Path

from training import plots
from training.shards import safe_name
from training.storage import S3Url, Storage

RUN_ARTIFACTS = ("best.pt", "metrics.jsonl", "curves.png", "per_class.png")


def collect(storage: Storage, output: S3Url, dest: Path) -> list[Path]:
    """Downloads the run's artifacts into `dest`; a missing one is a StorageError naming it."""
    paths = []
    for name in RUN_ARTIFACTS:
        storage.download(output.join(name), dest / name)
        paths.append(dest / name)
    return paths


def collect_events(storage: Storage, output: S3Url, dest: Path) -> list[Path]:
    """The run's TensorBoard event files (training/progress.py) into `dest`, for `tensorboard --logdir`."""
    urls = list(storage.list(output.join("tensorboard")))
    names = [safe_name(url.key.rsplit("/", 1)[1], f"{output}/tensorboard has an object named") for url in urls]
    paths = []
    for url, name in zip(urls, names, strict=True):  # every name checked before anything is written
        storage.download(url, dest / name)
        paths.append(dest / name)
    return paths


def write_results(storage: Storage, output: S3Url, history: list[dict], class_names: list[str]) -> dict:
    """The run's pictures (curves.png, per_class.png of the best epoch) into --output; the best record."""
    best = max(history, key=lambda r: r["val_acc"])
    storage.write_bytes(output.join("curves.png"), plots.curves_png(history), "image/png")
    storage.write_bytes(
        output.join("per_class.png"),
        plots.per_class_png(class_names, best["val_per_class_acc"], best["epoch"]),
        "image/png",
    )
    return best
