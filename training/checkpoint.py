"""Checkpoints in the run directory, written so that a kill at any moment leaves a resumable run.

    <output>/checkpoints/epoch-0003.pt   one per epoch, the newest --keep-checkpoints kept
    <output>/best.pt                     the checkpoint with the best validation accuracy so far
    <output>/latest                      {"checkpoint": "checkpoints/epoch-0003.pt", "sha256": ..., "bytes": ...}

An S3 object becomes visible only when all of its bytes are stored, and `latest` is written only
after the checkpoint it names, with that checkpoint's sha256: `latest` never names a torn object,
and a resume checks the hash anyway.
"""

from __future__ import annotations

import hashlib
import io
import json

import torch

from training.storage import S3Url, Storage, StorageError, parse_url

LATEST = "latest"
BEST = "best.pt"


def checkpoint_name(epoch: int) -> str:
    return f"checkpoints/epoch-{epoch:04d}.pt"


def serialize(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def deserialize(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def save(storage: Storage, output: S3Url, state: dict, epoch: int, is_best: bool, keep: int) -> None:
    data = serialize(state)
    name = checkpoint_name(epoch)
    storage.write_bytes(output.join(name), data)
    if is_best:
        storage.write_bytes(output.join(BEST), data)
    pointer = {
        "checkpoint": name,
        "epoch": epoch,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    storage.write_bytes(output.join(LATEST), json.dumps(pointer).encode(), content_type="application/json")
    for old in sorted(storage.list(output.join("checkpoints")), key=str)[:-keep]:
        storage.delete(old)


def load_latest(storage: Storage, output: S3Url) -> dict | None:
    """The checkpoint `latest` names, verified, or None for a fresh run directory."""
    pointer_url = output.join(LATEST)
    if not storage.exists(pointer_url):
        return None
    pointer = json.loads(storage.read_bytes(pointer_url))
    data = storage.read_bytes(output.join(pointer["checkpoint"]))
    if hashlib.sha256(data).hexdigest() != pointer["sha256"]:
        raise StorageError(f"{output.join(pointer['checkpoint'])} does not match the sha256 in {pointer_url}")
    return deserialize(data)


def load(storage: Storage, location: str) -> dict:
    """A checkpoint from a local path or an s3:// URL."""
    if location.startswith("s3://"):
        return deserialize(storage.read_bytes(parse_url(location)))
    with open(location, "rb") as f:
        return deserialize(f.read())
