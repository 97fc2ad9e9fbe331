"""Streams a split of a petal dataset (see training/shards.py) to one rank, exactly once per epoch.

How an epoch is cut across ranks: the split's shards are put in an order that is a function of
(seed, epoch) — the index order for evaluation — and the concatenated sample sequence is cut into
`world_size` contiguous ranges whose lengths differ by at most one. A rank downloads only the shards
its range touches (cached in a pod-local directory and verified against the index's sha256), then
shuffles its own samples with (seed, epoch, rank). So over an epoch every sample is seen exactly
once across ranks, with no padding; the one-sample difference between ranks is absorbed by DDP's
`Join` in the training loop, so uneven shard counts never hang it.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from io import BytesIO
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from training.shards import SampleRef, fetch_shard, read_image_bytes, read_shard_table
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


class ShardSamples(Dataset):
    """Map-style view of a rank's samples; DataLoader workers decode them in parallel."""

    def __init__(self, refs: list[SampleRef], transform: T.Compose):
        self.refs = refs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        ref = self.refs[i]
        return self.transform(decode_image(read_image_bytes(ref))), ref.label, ref.key


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, near-equal (±1) ranges that partition range(total)."""
    return total * rank // world_size, total * (rank + 1) // world_size


def rank_share(shards: list[dict], seed: int, epoch: int, rank: int, world_size: int, shuffle: bool):
    """[(shard, first, stop)] — the slices of shards that make up this rank's part of the epoch."""
    order = list(range(len(shards)))
    if shuffle:
        random.Random(f"{seed}/{epoch}").shuffle(order)
    start, stop = rank_range(sum(s["samples"] for s in shards), rank, world_size)
    share, position = [], 0
    for i in order:
        n = shards[i]["samples"]
        first, last = max(start, position), min(stop, position + n)
        if first < last:
            share.append((shards[i], first - position, last - position))
        position += n
    return share


@cache
def _table(path: Path) -> list[SampleRef]:
    return read_shard_table(path)


class SplitStream:
    """One split of one dataset as seen from one rank: which samples each epoch, and their loader."""

    def __init__(self, storage: Storage, dataset: S3Url, index: dict, splits: list[str], cache_dir: Path):
        self.storage = storage
        self.dataset = dataset
        self.cache_dir = cache_dir
        self._verified: dict[str, Path] = {}  # shard name → local copy already checked against its sha256
        # Several splits (train + augment) stream as one: their shards are simply pooled.
        self.shards = [shard for name in splits for shard in index["splits"][name]["shards"]]
        self.samples = sum(index["splits"][name]["samples"] for name in splits)

    def epoch_refs(self, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool) -> list[SampleRef]:
        share = rank_share(self.shards, seed, epoch, rank, world_size, shuffle)
        with ThreadPoolExecutor(max_workers=8) as pool:
            paths = list(pool.map(lambda s: self._local(s[0]), share))
        refs = [ref for path, (_, first, last) in zip(paths, share, strict=True) for ref in _table(path)[first:last]]
        if shuffle:
            random.Random(f"{seed}/{epoch}/{rank}").shuffle(refs)
        return refs

    def _local(self, shard: dict) -> Path:
        """The shard's verified local copy; hashing it once per process, not once per epoch."""
        if shard["name"] not in self._verified:
            self._verified[shard["name"]] = fetch_shard(self.storage, self.dataset, shard, self.cache_dir)
        return self._verified[shard["name"]]

    def loader(
        self,
        transform: T.Compose,
        *,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        shuffle: bool,
        batch_size: int,
        workers: int,
        pin_memory: bool,
    ) -> DataLoader:
        refs = self.epoch_refs(seed, epoch, rank, world_size, shuffle)
        # Augmentation randomness in every worker derives from this generator: a function of
        # (seed, epoch, rank), so a resumed run draws exactly what the uninterrupted one drew.
        generator = torch.Generator().manual_seed(hash_seed(seed, epoch, rank))
        return DataLoader(
            ShardSamples(refs, transform),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            pin_memory=pin_memory,
            generator=generator,
        )


def hash_seed(*parts: int) -> int:
    return random.Random("/".join(map(str, parts))).getrandbits(63)


class ImageEpochs:
    """Each epoch decodes and transforms its images afresh: the whole model runs on every batch."""

    def __init__(self, model, train: SplitStream, val: SplitStream, *, image_size: int, seed: int, rank: int,
                 world_size: int, batch_size: int, workers: int, pin_memory: bool):  # fmt: skip
        self.trained = self.evaluated = model
        self.train, self.val = train, val
        self.image_size = image_size
        self.common = dict(seed=seed, rank=rank, world_size=world_size, batch_size=batch_size, workers=workers,
                           pin_memory=pin_memory)  # fmt: skip

    def train_loader(self, epoch: int) -> DataLoader:
        return self.train.loader(train_transform(self.image_size), epoch=epoch, shuffle=True, **self.common)

    def val_loader(self, epoch: int) -> DataLoader:
        return self.val.loader(eval_transform(self.image_size), epoch=epoch, shuffle=False, **self.common)
