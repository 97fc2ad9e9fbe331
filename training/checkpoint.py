"""Checkpoints in the run directory, written so that a kill at any moment leaves a resumable run.

    <output>/checkpoints/epoch-0003.pt              after epoch 3 (epoch 4 starts from it)
    <output>/checkpoints/epoch-0004-step-000040.pt  40 optimizer steps into epoch 4
    <output>/checkpoints/<name>.sha256              its sha256, written after it
    <output>/best.pt                                the checkpoint with the best validation accuracy so far
    <output>/latest                                 {"checkpoint": "checkpoints/…", "sha256": ..., "bytes": ...}

An S3 object becomes visible only when all of its bytes are stored, and `latest` is written only
after the checkpoint it names, with that checkpoint's sha256. A resume still trusts nothing: if
`latest` is missing, unreadable, or names a checkpoint that is gone or fails its sha256, it falls
back to the newest kept checkpoint whose own .sha256 matches, and says so.

Rank 0 writes them off the training path (`Writer`): the loop stalls only to copy the state into host
memory, and the upload runs in a thread of its own, one at a time — a checkpoint due while the one
before is still uploading waits for it (and says so: --checkpoint-every is then shorter than an
upload). Each says "<name> saved" once it and its .sha256 have landed and `latest` names it. The
run's every way out (done, SIGTERM, a failure) waits for the upload in flight, and an upload that
fails ends the run at the next checkpoint or at its end, as a failed write in the loop would.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from training.exit_codes import CheckpointError
from training.storage import S3Url, Storage, StorageError, parse_url, sha256_file

LATEST = "latest"
BEST = "best.pt"
NAME = re.compile(r"^checkpoints/epoch-(\d{4,})(?:-step-(\d{6,}))?\.pt$")


def checkpoint_name(epoch: int, step: int = 0) -> str:
    """After epoch `epoch` when step is 0, else `step` optimizer steps into epoch `epoch`."""
    return f"checkpoints/epoch-{epoch:04d}.pt" if not step else f"checkpoints/epoch-{epoch:04d}-step-{step:06d}.pt"


def position(name: str) -> tuple[int, int]:
    """(epoch in progress, steps of it done) of a checkpoint name, for ordering them."""
    epoch, step = NAME.match(name).groups()
    return (int(epoch), int(step)) if step else (int(epoch) + 1, 0)


def serialize(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def deserialize(data: bytes, what: str = "checkpoint") -> dict:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError … for foreign bytes
        raise CheckpointError(f"{what} is not a torch checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} holds a {type(state).__name__}, not a checkpoint")
    return state


def save(storage: Storage, output: S3Url, state: dict, name: str, is_best: bool, keep: int) -> int:
    """Writes the checkpoint, its .sha256, best.pt if it is the best, then `latest`; its size in bytes."""
    data = serialize(state)
    digest = hashlib.sha256(data).hexdigest()
    storage.write_bytes(output.join(name), data)
    storage.write_bytes(output.join(sidecar(name)), digest.encode(), "text/plain")
    if is_best:
        storage.copy(output.join(name), output.join(BEST))
    pointer = {"checkpoint": name, "sha256": digest, "bytes": len(data)}
    storage.write_bytes(output.join(LATEST), json.dumps(pointer).encode(), content_type="application/json")
    prune(storage, output, keep, name)
    return len(data)


def to_host(value):
    """A copy of a state dict that training can no longer change: every tensor copied to host memory,
    every list and dict copied (the loop goes on appending to the history, updating the stretch).
    Pageable memory, allocated per checkpoint and freed after its upload: pinned memory would copy
    from a GPU faster, but PyTorch keeps pinned blocks cached for the life of the process, each rounded
    up to a power of two (up to twice the state, locked, inside rank 0's memory limit), and the first
    checkpoint pays for pinning every tensor (benchmarks/gpu.py measures both ways)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: to_host(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_host(item) for item in value)
    return value


class Writer:
    """Rank 0's checkpoint writes, one at a time, from a thread of their own."""

    def __init__(self, storage: Storage, output: S3Url, keep: int, log: Callable[[str], None]):
        self.storage, self.output, self.keep, self.log = storage, output, keep, log
        self.uploading: threading.Thread | None = None
        self.failure: Exception | None = None

    def save(self, state: dict, name: str, is_best: bool) -> None:
        """Starts writing `state` as `name`; returns once it is copied to host memory."""
        waited = self.wait()
        if waited >= 1.0:
            self.log(f"{name} waited {waited:.1f} s for the checkpoint before it to upload: --checkpoint-every "
                     "is shorter than an upload takes")  # fmt: skip
        snapshot = to_host(state)
        self.uploading = threading.Thread(target=self._write, args=(snapshot, name, is_best),
                                          name="petal-checkpoint", daemon=True)  # fmt: skip
        self.uploading.start()

    def _write(self, snapshot: dict, name: str, is_best: bool) -> None:
        started = time.monotonic()
        try:
            size = save(self.storage, self.output, snapshot, name, is_best, self.keep)
        except Exception as err:  # handed to the training thread, which raises it
            self.failure = err
            return
        self.log(f"{name} saved ({size / 1e6:.1f} MB, {time.monotonic() - started:.1f} s in the background)")

    def wait(self) -> float:
        """Until the upload in flight, if any, has landed; the seconds waited. Raises what it failed with."""
        started = time.monotonic()
        if self.uploading is not None:
            self.uploading.join()
            self.uploading = None
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        return time.monotonic() - started

    def close(self) -> None:
        """On a failure's way out: waits for the upload in flight (a checkpoint a restart can use), and
        says if it failed too instead of hiding the failure that ended the run."""
        try:
            self.wait()
        except Exception as err:
            self.log(f"the checkpoint upload in flight failed too: {type(err).__name__}: {err}")


def sidecar(name: str) -> str:
    return f"{name[:-3]}.sha256"


def prune(storage: Storage, output: S3Url, keep: int, current: str) -> None:
    """Keeps `current` (what `latest` names) and the newest intact checkpoints before it, `keep` in all.
    Removes the rest: older ones, those past `current` (a timeline abandoned when the run resumed from
    an earlier one), and the debris of writes cut short (a .pt without its .sha256, or the reverse)."""
    prefix = len(output.key) + 1 if output.key else 0
    listed = {url.key[prefix:] for url in storage.list(output.join("checkpoints"))}
    intact = sorted((n for n in listed if NAME.match(n) and sidecar(n) in listed), key=position)
    before = [name for name in intact if position(name) < position(current)]
    kept = {current, *before[max(0, len(before) - (keep - 1)) :]}
    for name in sorted(listed):
        owner = name if NAME.match(name) else name.removesuffix(".sha256") + ".pt"  # a .sha256 goes with its .pt
        if NAME.match(owner) and owner not in kept:
            storage.delete(output.join(name))


def kept_checkpoints(storage: Storage, output: S3Url) -> list[str]:
    prefix = len(output.key) + 1 if output.key else 0
    names = (url.key[prefix:] for url in storage.list(output.join("checkpoints")))
    return [name for name in names if NAME.match(name)]


def held_results(storage: Storage, output: S3Url) -> list[str]:
    """What of a run's results the run directory holds: a fresh one, or one whose only checkpoint write
    was cut short, holds none."""
    found = [name for name in (LATEST, BEST, "metrics.jsonl") if storage.exists(output.join(name))]
    listed = set(kept_checkpoints(storage, output))
    complete = [name for name in listed if storage.exists(output.join(sidecar(name)))]
    return found + ([f"{len(complete)} checkpoint(s)"] if complete else [])


def choose(storage: Storage, output: S3Url, directory: Path, log: Callable[[str], None],
           overwrite_unresumable: bool = False) -> dict | None:  # fmt: skip
    """The checkpoint to resume from — {"checkpoint": name, "sha256": ...}, already downloaded and
    verified into `directory` — or None for a fresh run directory. A run directory that holds a run's
    results but no intact checkpoint is a CheckpointError (its results would be overwritten by a run
    from scratch) unless `overwrite_unresumable`."""
    problem = None
    try:
        pointer = json.loads(storage.read_bytes(output.join(LATEST)))
        chosen = {"checkpoint": pointer["checkpoint"], "sha256": pointer["sha256"]}
        if not NAME.match(chosen["checkpoint"]):
            raise ValueError(f"it names {chosen['checkpoint']!r}")
        if fetch(storage, output, chosen, directory):
            return chosen
        problem = f"{output.join(LATEST)} names {chosen['checkpoint']}, which is missing or fails its sha256"
    except StorageError as err:
        if err.code != "NoSuchKey":
            raise
        problem = f"{output.join(LATEST)} is missing" if kept_checkpoints(storage, output) else None
    except (ValueError, KeyError, TypeError) as err:
        problem = f"{output.join(LATEST)} is unreadable ({type(err).__name__}: {err})"
    for name in sorted(kept_checkpoints(storage, output), key=position, reverse=True):
        digest_url = output.join(sidecar(name))
        digest = storage.read_bytes(digest_url).decode().strip() if storage.exists(digest_url) else ""
        chosen = {"checkpoint": name, "sha256": digest}
        if digest and fetch(storage, output, chosen, directory):
            log(f"{problem}; resuming from the newest intact checkpoint, {name}")
            return chosen
        log(f"{name} has no .sha256 or fails it; skipped")
    results = held_results(storage, output)
    if results and not overwrite_unresumable:
        raise CheckpointError(f"{output} holds a run ({', '.join(results)}) but no intact checkpoint to resume "
                              f"from{f' ({problem})' if problem else ''}; --overwrite-unresumable trains afresh "
                              "there, replacing its results, or use a new --output")  # fmt: skip
    if problem or results:
        log(f"{problem or f'{output} holds no intact checkpoint'}; starting afresh")
    return None


def local_path(chosen: dict, directory: Path) -> Path:
    return directory / chosen["sha256"][:16] / Path(chosen["checkpoint"]).name


def fetch(storage: Storage, output: S3Url, chosen: dict, directory: Path) -> bool:
    """The chosen checkpoint as a verified local file (kept for the node's other ranks: one download per
    node); False if it is missing from storage or fails its sha256. It is the only checkpoint the
    directory keeps: a container restarted in place keeps its pod's cache, and a checkpoint left there
    per restart would outgrow the cache's size limit (the kubelet then evicts the pod)."""
    path = local_path(chosen, directory)
    if path.exists() and sha256_file(path) == chosen["sha256"]:
        return True
    for cached in directory.iterdir() if directory.is_dir() else ():
        if cached != path.parent:
            shutil.rmtree(cached, ignore_errors=True)
    if not storage.exists(output.join(chosen["checkpoint"])):
        return False
    storage.download(output.join(chosen["checkpoint"]), path)
    if sha256_file(path) != chosen["sha256"]:
        path.unlink()
        return False
    return True


def load(storage: Storage | None, location: str) -> dict:
    """A checkpoint from a local path or an s3:// URL; anything else is a one-line CheckpointError."""
    if location.startswith("s3://"):
        return deserialize(storage.read_bytes(parse_url(location)), location)
    with open(location, "rb") as f:
        return deserialize(f.read(), location)
