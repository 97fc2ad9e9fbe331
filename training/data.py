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
# Which version of the decode + views below a feature cache was computed with: raise it whenever
# they change what a view's pixels are (2: resize before rotation, JPEG draft decode).
VIEWS_VERSION = 2


def eval_transform(image_size: int) -> T.Compose:
    """Deterministic: resize the short side, centre-crop, normalise (the seed's validation view). The
    geometry is done by PIL, on 8-bit pixels, before anything becomes a float tensor."""
    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size), *_to_normalised_tensor()])


def train_transform(image_size: int) -> T.Compose:
    """The seed's training view: the eval view with a random rotation of up to 20 degrees, done after
    the resize (on image_size² pixels, not on the full image: the same view for a fraction of the work)."""
    return T.Compose([T.Resize(image_size), T.RandomRotation(20), T.CenterCrop(image_size), *_to_normalised_tensor()])


def _to_normalised_tensor() -> list:
    return [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def decode_image(data: bytes, draft_side: int | None = None) -> Image.Image:
    """An RGB image. With `draft_side`, a JPEG larger than needed is decoded at a reduced scale (1/2,
    1/4, 1/8: PIL's draft, done in the decoder) while both sides stay at least `draft_side`, which is
    all a transform to that size uses."""
    with Image.open(BytesIO(data)) as image:
        if draft_side and image.format == "JPEG":
            image.draft("RGB", (draft_side, draft_side))
        return image.convert("RGB")


class SplitSamples(Dataset):
    """Every sample of a split by its number, read from the shards' local copies; items are
    (epoch, number). Augmentation draws from an RNG seeded by (seed, epoch, sample), whichever
    process decodes it, so the worker that happens to get a sample does not matter."""

    def __init__(self, stream: SplitStream, transform: T.Compose | None, *, seed: int, augment: bool,
                 draft_side: int | None = None):  # fmt: skip
        self.paths = [shard_path(stream.dataset, shard, stream.cache_dir) for shard in stream.shards]
        self.starts = list(accumulate(stream.sizes, initial=0))
        self.transform, self.seed, self.augment, self.draft_side = transform, seed, augment, draft_side

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, str]:
        epoch, number = item
        shard = bisect_right(self.starts, number) - 1
        ref = _table(self.paths[shard])[number - self.starts[shard]]
        if self.transform is None:  # --decode gpu: the rank decodes; a worker only reads the bytes
            return torch.frombuffer(bytearray(read_image_bytes(ref)), dtype=torch.uint8), ref.label, ref.key, epoch
        image = decode_image(read_image_bytes(ref), self.draft_side)
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

    def __init__(self, stream: SplitStream, transform: T.Compose | None, *, seed: int, augment: bool, batch_size: int,
                 workers: int, pin_memory: bool, draft_side: int | None = None):  # fmt: skip
        self.stream = stream
        self.sampler = EpochSampler()
        self.loader = DataLoader(
            SplitSamples(stream, transform, seed=seed, augment=augment, draft_side=draft_side),
            collate_fn=None if transform is not None else encoded_batch,
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


def encoded_batch(items: list) -> tuple:
    """A batch of still-encoded images: they differ in length, so they stay a list."""
    blobs, labels, keys, epochs = zip(*items, strict=True)
    return list(blobs), torch.tensor(labels), list(keys), list(epochs)


def gpu_transform(image_size: int, augment: bool) -> T.Compose:
    """The train or eval view on a decoded CUDA tensor (the same steps as on a PIL image, on the GPU)."""
    rotate = [T.RandomRotation(20)] if augment else []
    return T.Compose([T.Resize(image_size, antialias=True), *rotate, T.CenterCrop(image_size),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip


class DecodeOnGpu:
    """--decode gpu: each batch's JPEGs decoded by nvJPEG on the rank's GPU in one call
    (torchvision.io.decode_jpeg), then resized, rotated and cropped there, so that decoding stops
    needing a score of CPU cores per GPU. Augmentation is seeded per (seed, epoch, sample) as on the
    CPU path. Anything that is not a JPEG is decoded on the CPU and moved over."""

    def __init__(self, loader: DataLoader, image_size: int, device: torch.device, *, seed: int, augment: bool):
        self.loader, self.device, self.seed, self.augment = loader, device, seed, augment
        self.transform = gpu_transform(image_size, augment)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from torchvision.io import ImageReadMode, decode_jpeg

        for blobs, labels, keys, epochs in self.loader:
            try:
                images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # a PNG, GIF, ... among them: one by one, those on the CPU
                images = [self._decode_one(blob, decode_jpeg, ImageReadMode.RGB) for blob in blobs]
            views = []
            for image, key, epoch in zip(images, keys, epochs, strict=True):
                if not self.augment:
                    views.append(self.transform(image))
                    continue
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(hash_seed(self.seed, epoch, key))
                    views.append(self.transform(image))
            yield torch.stack(views), labels, keys

    def _decode_one(self, blob: torch.Tensor, decode_jpeg, mode) -> torch.Tensor:
        try:
            return decode_jpeg(blob, mode=mode, device=self.device)
        except RuntimeError:
            pixels = T.functional.pil_to_tensor(decode_image(blob.numpy().tobytes()))
            return pixels.to(self.device, non_blocking=True)


def gpu_decode_works(device: torch.device) -> bool:
    """Whether nvJPEG decodes here: --decode auto's test."""
    if device.type != "cuda":
        return False
    from torchvision.io import decode_jpeg

    buffer = BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG")
    try:
        decode_jpeg(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), device=device)
    except RuntimeError:
        return False
    return True


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
                 world_size: int, batch_size: int, workers: int, pin_memory: bool,
                 decode_on: torch.device | None = None):  # fmt: skip
        self.trained = self.evaluated = model
        self.train, self.val = train, val
        self.samples = train.samples
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.image_size, self.decode_on = image_size, decode_on
        common = dict(seed=seed, batch_size=batch_size, workers=workers, pin_memory=pin_memory, draft_side=image_size)
        on_cpu = decode_on is None
        self.train_batches = SplitLoader(train, train_transform(image_size) if on_cpu else None, augment=True, **common)
        self.val_batches = SplitLoader(val, eval_transform(image_size) if on_cpu else None, augment=False, **common)

    def assignment(self, epoch: int, world_size: int) -> list[list[int]]:
        return self.train.assignment(self.seed, epoch, world_size, shuffle=True)

    def train_loader(self, epoch: int, numbers: list[int]):
        return self._on_device(self.train_batches.for_epoch(epoch, numbers), augment=True)

    def val_loader(self, epoch: int):
        numbers = self.val.assignment(self.seed, epoch, self.world_size, shuffle=False)[self.rank]
        return self._on_device(self.val_batches.for_epoch(epoch, numbers), augment=False)

    def _on_device(self, loader: DataLoader, augment: bool):
        if self.decode_on is None:
            return loader
        return DecodeOnGpu(loader, self.image_size, self.decode_on, seed=self.seed, augment=augment)

    def close(self) -> None:
        self.train_batches.close()
        self.val_batches.close()
