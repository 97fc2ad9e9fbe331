"""What a finished run leaves in its --output, and fetching it to a local directory. No torch here,
so the submitter and the `petal` command can use it.

    python scripts/collect_run.py s3://petal/runs/demo runs/demo
"""

from __future__ import annotations

from pathlib import Path

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
    paths = []
    for url in storage.list(output.join("tensorboard")):
        path = dest / url.key.rsplit("/", 1)[1]
        storage.download(url, path)
        paths.append(path)
    return paths
