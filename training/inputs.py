"""What a run reads from storage before it trains, checked before torch loads: `python -m training`
with a dataset that is not there, a malformed index, an unknown split, refused credentials or a
missing output bucket exits with its one line in about a second, not after importing torch (and a
pod with a permanent fault fails as fast). No torch here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from training.shards import read_index, split_names
from training.storage import S3Url, Storage, parse_url
from training.tracking import tracking_uri


@dataclass(frozen=True)
class RunInputs:
    storage: Storage
    data: S3Url
    output: S3Url
    index: dict
    train_splits: list[str]
    val_split: str
    tracking_uri: str | None  # an MLflow tracking server's (MLFLOW_TRACKING_URI)

    @classmethod
    def open(cls, args: argparse.Namespace) -> RunInputs:
        """The dataset's index and splits, the output's bucket and the MLflow tracking server; a
        DatasetError, StorageError or LaunchError if any of them is not as the run needs it."""
        uri = tracking_uri()
        storage = Storage.from_env()
        data, output = parse_url(args.data), parse_url(args.output)
        index = read_index(storage, data)
        train_splits = split_names(index, args.train_splits.split(","))
        (val_split,) = split_names(index, [args.val_split])
        storage.require_bucket(output)
        return cls(storage, data, output, index, train_splits, val_split, uri)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.index["classes"]]

    def stored_below(self, image_size: int) -> list[tuple[str, int]]:
        """(split, stored short side) of the splits whose images were stored smaller than image_size."""
        sides = ((split, self.index["splits"][split].get("short_side")) for split in (*self.train_splits,
                                                                                      self.val_split))  # fmt: skip
        return [(split, side) for split, side in sides if side and side < image_size]
