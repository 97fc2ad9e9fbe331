"""Streams a split of a petal dataset (see training/shards.py) to one rank, exactly once per epoch,
resumable at any step on any number of ranks.

Samples are numbered across the split's shards in index order (no download needed: the index has
every shard's sample count). How an epoch is cut across ranks: the shards are put in an order that
is a function of (seed, epoch) — the index order for evaluation — and the concatenated samples are
cut into `world_size` contiguous ranges whose lengths differ by at most one; each rank shuffles its
own range with (seed, epoch, rank). Every sample is seen exactly once per epoch across ranks, with no
padding; the one-sample difference is absorbed by DDP's `Join` in the training loop.

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
from functools import cache
from io import BytesIO
from itertools import accumulate
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2 as T

from training.shards import SampleRef, fetch_shard, read_image_bytes, read_shard_table, shard_path
from training.storage import S3Url, Storage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(image_size: int) -> T.Compose:
    """Deterministic: resize the short side, centre-crop, normalise (the seed's validation view)."""
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(image_size, antialias=True),
            T.CenterCrop(image_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def train_transform(image_size: int) -> T.Compose:
    """The seed's training view: a random rotation of up to 20 degrees before the eval view."""
    return T.Compose([T.PILToTensor(), T.RandomRotation(20), *eval_transform(image_size).transforms[1:]])


def decode_image(data: bytes) -> Image.Image:
    with Image.open(BytesIO(data)) as image:
        return image.convert("RGB")


class SplitSamples(Dataset):
    """Every sample of a split by its number, read from the shards' local copies; items are
    (epoch, number). Augmentation draws from an RNG seeded by (seed, epoch, sample), whichever
    process decodes it, so the worker that happens to get a sample does not matter."""

    def __init__(self, stream: SplitStream, transform: T.Compose, *, seed: int, augment: bool):
        self.paths = [shard_path(stream.dataset, shard, stream.cache_dir) for shard in stream.shards]
        self.starts = list(accumulate(stream.sizes, initial=0))
        self.transform, self.seed, self.augment = transform, seed, augment

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, str]:
        epoch, number = item
        shard = bisect_right(self.starts, number) - 1
        ref = _table(self.paths[shard])[number - self.starts[shard]]
        image = decode_image(read_image_bytes(ref))
        if not self.augment:
            return self.transform(image), ref.label, ref.key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash_seed(self.seed, epoch, ref.key))
            return self.transform(image), ref.label, ref.key


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
def _table(path: Path) -> list[SampleRef]:
    return read_shard_table(path)


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

    def assignment(self, seed: int, epoch: int, world_size: int, *, shuffle: bool, cut_epoch: int | None = None):
        return epoch_assignment(self.sizes, seed, epoch, world_size, shuffle=shuffle, cut_epoch=cut_epoch)

    def refs(self, numbers: list[int]) -> list[SampleRef]:
        """Where each numbered sample lies, downloading (and verifying) the shards it needs."""
        starts = list(accumulate(self.sizes, initial=0))
        located = [(bisect_right(starts, n) - 1, n) for n in numbers]
        needed = sorted({shard for shard, _ in located})
        with ThreadPoolExecutor(max_workers=8) as pool:
            paths = dict(zip(needed, pool.map(lambda i: self._local(self.shards[i]), needed), strict=True))
        return [_table(paths[shard])[n - starts[shard]] for shard, n in located]

    def epoch_refs(self, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool) -> list[SampleRef]:
        """This rank's samples of an epoch begun and finished by `world_size` ranks."""
        return self.refs(self.assignment(seed, epoch, world_size, shuffle=shuffle)[rank])

    def _local(self, shard: dict) -> Path:
        """The shard's verified local copy; hashing it once per process, not once per epoch."""
        path = self._verified.get(shard["name"])
        if path is None or not path.exists():  # a cache directory can be cleared under a running process
            path = self._verified[shard["name"]] = fetch_shard(self.storage, self.dataset, shard, self.cache_dir)
        return path


class SplitLoader:
    """A DataLoader over one split whose workers live for the whole run (starting them is not free:
    imports, forks, prefetch); each epoch only says which samples, in which order (`for_epoch`)."""

    def __init__(self, stream: SplitStream, transform: T.Compose, *, seed: int, augment: bool, batch_size: int,
                 workers: int, pin_memory: bool):  # fmt: skip
        self.stream = stream
        self.sampler = EpochSampler()
        self.loader = DataLoader(
            SplitSamples(stream, transform, seed=seed, augment=augment),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
            pin_memory=pin_memory,
            worker_init_fn=ignore_sigterm,
        )

    def for_epoch(self, epoch: int, numbers: list[int]) -> DataLoader:
        self.stream.refs(numbers)  # their shards downloaded and verified before any worker reads them
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
    """Each epoch decodes and transforms its images afresh: the whole model runs on every batch."""

    def __init__(self, model, train: SplitStream, val: SplitStream, *, image_size: int, seed: int, rank: int,
                 world_size: int, batch_size: int, workers: int, pin_memory: bool):  # fmt: skip
        self.trained = self.evaluated = model
        self.train, self.val = train, val
        self.samples = train.samples
        self.seed, self.rank, self.world_size = seed, rank, world_size
        common = dict(seed=seed, batch_size=batch_size, workers=workers, pin_memory=pin_memory)
        self.train_batches = SplitLoader(train, train_transform(image_size), augment=True, **common)
        self.val_batches = SplitLoader(val, eval_transform(image_size), augment=False, **common)

    def assignment(self, epoch: int, world_size: int) -> list[list[int]]:
        return self.train.assignment(self.seed, epoch, world_size, shuffle=True)

    def train_loader(self, epoch: int, numbers: list[int]) -> DataLoader:
        return self.train_batches.for_epoch(epoch, numbers)

    def val_loader(self, epoch: int) -> DataLoader:
        numbers = self.val.assignment(self.seed, epoch, self.world_size, shuffle=False)[self.rank]
        return self.val_batches.for_epoch(epoch, numbers)

    def close(self) -> None:
        self.train_batches.close()
        self.val_batches.close()
