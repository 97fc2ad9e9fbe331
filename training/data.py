"""Streams a split of a petal dataset (see training/shards.py) to one rank, exactly once per epoch,
resumable at any step on any number of ranks.

Samples are numbered across the split's shards in index order (no download needed: the index has
every shard's sample count). How an epoch is cut across ranks: the shards are put in an order that
is a function of (seed, epoch) — the index order for evaluation — and the concatenated samples are
cut into `world_size` contiguous ranges whose lengths differ by at most one; each rank shuffles its
own range with (seed, epoch, rank). Every sample is seen exactly once per epoch across ranks, with no
repeated sample; a rank one batch short takes its last step on an empty batch (train_one_epoch).

A resume in the middle of an epoch (`continue_epoch`) continues that cut: with the same world size
every rank keeps exactly the samples it had left, in order, so the run is the uninterrupted one;
with another world size, the samples nobody trained yet are cut afresh across the new ranks, still
each exactly once. Augmentation randomness is a function of (seed, epoch, sample), so it does not
depend on which rank or DataLoader worker decodes a sample, or on where a resume starts.

A rank downloads only the shards its samples lie in, cached in a pod-local directory and verified
against the index's sha256.
"""

from __future__ import annotations

import hashlib
import random
import signal
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from itertools import accumulate
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from training.shards import SampleRef, fetch_shard, read_image_bytes, read_shard_table, shard_path
from training.storage import S3Url, Storage
from training.views import DecodeOnGpu, OnDevice, decode_image, encoded_batch, pixels, rotation, view


class SplitSamples(Dataset):
    """Every sample of a split by its number, read from the shards' local copies; items are
    (epoch, number), answered with the sample's view as uint8 pixels (training.views) — or, with
    `encoded` (--decode gpu: the rank decodes), with its bytes as stored."""

    def __init__(self, stream: SplitStream, image_size: int, *, seed: int, augment: bool, encoded: bool = False):
        self.tables = stream.tables
        self.image_size, self.seed, self.augment, self.encoded = image_size, seed, augment, encoded

    def __len__(self) -> int:
        return self.tables.starts[-1]

    def __getitem__(self, item: tuple[int, int]) -> tuple:
        epoch, number = item
        ref = self.tables.ref(number)
        if self.encoded:
            return read_image_bytes(ref), ref.label, ref.key, epoch
        angle = rotation(self.seed, epoch, ref.key) if self.augment else None
        image = decode_image(read_image_bytes(ref), self.image_size)
        return pixels(view(image, self.image_size, angle)), ref.label, ref.key


class EpochSampler(Sampler):
    """The (epoch, number) items of one epoch of one rank; set anew each epoch."""

    def __init__(self):
        self.epoch, self.numbers = 0, []

    def __iter__(self):
        return ((self.epoch, number) for number in self.numbers)

    def __len__(self) -> int:
        return len(self.numbers)


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, near-equal (±1) ranges that partition range(total)."""
    return total * rank // world_size, total * (rank + 1) // world_size


def cut(ids: list[int], world_size: int) -> list[list[int]]:
    return [ids[slice(*rank_range(len(ids), rank, world_size))] for rank in range(world_size)]


def epoch_assignment(sizes: list[int], seed: int, epoch: int, world_size: int, *, shuffle: bool,
                     cut_epoch: int | None = None) -> list[list[int]]:  # fmt: skip
    """Every rank's sample numbers for one epoch begun by `world_size` ranks, in training order.
    `cut_epoch` (default: the epoch) picks the shard order of the cut: the feature cache keeps one
    cut for every epoch, so each rank computes the features of its own samples only."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    order = list(range(len(sizes)))
    if shuffle:
        random.Random(f"{seed}/{epoch if cut_epoch is None else cut_epoch}").shuffle(order)
    ranks = cut([starts[i] + j for i in order for j in range(sizes[i])], world_size)
    if shuffle:
        for rank, ids in enumerate(ranks):
            random.Random(f"{seed}/{epoch}/{rank}").shuffle(ids)
    return ranks


def continue_epoch(assignment: list[list[int]], stretches: list[dict], world_size: int) -> list[list[int]]:
    """What each of `world_size` ranks still has to train of an epoch of which `stretches` are done:
    one {"world_size", "batch_size", "steps"} per run of it since it began (a resume starts a new
    stretch). Same world size as the stretch before: every rank keeps its own remaining samples in
    order. Another: the remaining samples, in rank order, are cut afresh into near-equal ranges."""
    for i, stretch in enumerate(stretches):
        if len(assignment) != stretch["world_size"]:
            raise ValueError(f"stretch {i} of the epoch ran on {stretch['world_size']} ranks, not {len(assignment)}")
        done = stretch["steps"] * stretch["batch_size"]
        left = [ids[done:] for ids in assignment]
        next_world = stretches[i + 1]["world_size"] if i + 1 < len(stretches) else world_size
        assignment = left if next_world == len(left) else cut([n for ids in left for n in ids], next_world)
    return assignment


@cache
def _table(path: Path, classes: int, what: str) -> list[SampleRef]:
    return read_shard_table(path, classes, what)


@dataclass(frozen=True)
class ShardTables:
    """Where each numbered sample of a split lies once its shard's local copy exists: numbers run across
    the shards in index order. Small and picklable, so DataLoader workers get it with the dataset."""

    paths: tuple[Path, ...]
    urls: tuple[str, ...]  # the shards' own names, for a DatasetError about one of them
    starts: tuple[int, ...]  # the first number of each shard, then the total
    classes: int

    def locate(self, number: int) -> tuple[int, int]:
        """(shard, place in it) of a sample number."""
        shard = bisect_right(self.starts, number) - 1
        return shard, number - self.starts[shard]

    def ref(self, number: int) -> SampleRef:
        shard, place = self.locate(number)
        return _table(self.paths[shard], self.classes, self.urls[shard])[place]


class SplitStream:
    """One or more splits of one dataset as seen from one rank: sample numbers, their bytes, loaders."""

    def __init__(self, storage: Storage, dataset: S3Url, index: dict, splits: list[str], cache_dir: Path):
        self.storage = storage
        self.dataset = dataset
        self.cache_dir = cache_dir
        self._verified: dict[str, Path] = {}  # shard name → local copy already checked against its sha256
        # Several splits (train + augment) stream as one: their shards are simply pooled.
        self.shards = [shard for name in splits for shard in index["splits"][name]["shards"]]
        self.sizes = [shard["samples"] for shard in self.shards]
        self.samples = sum(self.sizes)
        # Sample numbers mean the same only while the shards are the same: checkpoints record this.
        self.fingerprint = hashlib.sha256("\n".join(s["sha256"] for s in self.shards).encode()).hexdigest()[:16]
        self.tables = ShardTables(tuple(shard_path(dataset, shard, cache_dir) for shard in self.shards),
                                  tuple(str(dataset.join(shard["name"])) for shard in self.shards),
                                  tuple(accumulate(self.sizes, initial=0)), len(index["classes"]))  # fmt: skip

    def assignment(self, seed: int, epoch: int, world_size: int, *, shuffle: bool, cut_epoch: int | None = None):
        return epoch_assignment(self.sizes, seed, epoch, world_size, shuffle=shuffle, cut_epoch=cut_epoch)

    def fetch(self, numbers: list[int]) -> None:
        """Downloads (and verifies) the shards these numbered samples lie in."""
        needed = sorted({self.tables.locate(n)[0] for n in numbers})
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda i: self._local(self.shards[i]), needed))

    def refs(self, numbers: list[int]) -> list[SampleRef]:
        """Where each numbered sample lies, its shard downloaded and verified."""
        self.fetch(numbers)
        return [self.tables.ref(n) for n in numbers]

    def epoch_refs(self, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool) -> list[SampleRef]:
        """This rank's samples of an epoch begun and finished by `world_size` ranks."""
        return self.refs(self.assignment(seed, epoch, world_size, shuffle=shuffle)[rank])

    def _local(self, shard: dict) -> Path:
        """The shard's verified local copy, its table read (a malformed shard is a DatasetError here, in
        the rank, before a DataLoader worker meets it); hashing it once per process, not once per epoch."""
        path = self._verified.get(shard["name"])
        if path is None or not path.exists():  # a cache directory can be cleared under a running process
            path = fetch_shard(self.storage, self.dataset, shard, self.cache_dir)
            _table(path, self.tables.classes, str(self.dataset.join(shard["name"])))
            self._verified[shard["name"]] = path
        return path


class SplitLoader:
    """A DataLoader over one split whose workers live for the whole run (starting them is not free:
    imports, forks, prefetch); each epoch only says which samples, in which order (`for_epoch`)."""

    def __init__(self, stream: SplitStream, image_size: int, *, seed: int, augment: bool, batch_size: int,
                 workers: int, pin_memory: bool, encoded: bool = False):  # fmt: skip
        self.stream = stream
        self.sampler = EpochSampler()
        self.loader = DataLoader(
            SplitSamples(stream, image_size, seed=seed, augment=augment, encoded=encoded),
            collate_fn=encoded_batch if encoded else None,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
            pin_memory=pin_memory,
            worker_init_fn=ignore_sigterm,
        )

    def for_epoch(self, epoch: int, numbers: list[int]) -> DataLoader:
        self.stream.fetch(numbers)  # their shards downloaded and verified before any worker reads them
        self.sampler.epoch, self.sampler.numbers = epoch, numbers
        return self.loader

    def close(self) -> None:
        """Ends the workers the way an exhausted DataLoader does. They ignore SIGTERM (ignore_sigterm),
        so left to Python's exit, which terminates child processes with it, they would never end."""
        iterator, self.loader._iterator = self.loader._iterator, None
        if iterator is not None:
            iterator._shutdown_workers()


def ignore_sigterm(_worker_id: int) -> None:
    """DataLoader workers leave stopping to their rank: a SIGTERM sent to the whole process group
    (torchrun stopping its workers) must not kill them while the rank finishes its step and writes a
    checkpoint. The rank ends them as it always does, and they exit on their own if it dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def hash_seed(*parts: int) -> int:
    return random.Random("/".join(map(str, parts))).getrandbits(63)


class ImageEpochs:
    """Each epoch decodes and views its images afresh: the whole model runs on every batch. Batches
    come out on `device`, normalised; with `decode_on_device` (--decode gpu) the workers only read
    the bytes and nvJPEG decodes them there."""

    def __init__(self, model, train: SplitStream, val: SplitStream, *, image_size: int, seed: int, rank: int,
                 world_size: int, batch_size: int, workers: int, device: torch.device,
                 decode_on_device: bool = False):  # fmt: skip
        self.trained = self.evaluated = model
        self.sample_shape = (3, image_size, image_size)  # of one image as the model takes it
        self.train, self.val = train, val
        self.samples = train.samples
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.image_size, self.device, self.decode_on_device = image_size, device, decode_on_device
        common = dict(seed=seed, batch_size=batch_size, workers=workers, pin_memory=device.type == "cuda",
                      encoded=decode_on_device)  # fmt: skip
        self.train_batches = SplitLoader(train, image_size, augment=True, **common)
        self.val_batches = SplitLoader(val, image_size, augment=False, **common)

    def assignment(self, epoch: int, world_size: int) -> list[list[int]]:
        return self.train.assignment(self.seed, epoch, world_size, shuffle=True)

    def train_loader(self, epoch: int, numbers: list[int]):
        return self._on_device(self.train_batches.for_epoch(epoch, numbers), augment=True)

    def val_loader(self, epoch: int):
        numbers = self.val.assignment(self.seed, epoch, self.world_size, shuffle=False)[self.rank]
        return self._on_device(self.val_batches.for_epoch(epoch, numbers), augment=False)

    def _on_device(self, loader: DataLoader, augment: bool):
        if self.decode_on_device:
            return DecodeOnGpu(loader, self.image_size, self.device, seed=self.seed, augment=augment)
        return OnDevice(loader, self.device)

    def close(self) -> None:
        self.train_batches.close()
        self.val_batches.close()
