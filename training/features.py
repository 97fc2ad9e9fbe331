"""The frozen-backbone feature cache: with `--freeze fc` only the head trains, so the backbone's
output for a given image view never changes — compute it once, train the head from it every epoch.

Views: view 0 is the deterministic evaluation view; views 1..K-1 are training augmentations
(the seed's random rotation) drawn from an RNG seeded by (seed, sample, view), so a view is the same
image whoever computes it and whenever. Each epoch, every training sample uses one of its K views,
chosen by (seed, epoch, sample); validation always uses view 0. The cache lives per rank, in memory
or, with `--feature-cache-dir`, in a local directory that survives a restart of the process.
Because the cached features are exactly what the backbone computes for those views, the head
trains exactly as it would from recomputed features (tests/test_features.py checks this). On disk
the cache is keyed by what the features depend on (`cache_key`), so a reused directory is safe.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from training.data import SplitStream, ignore_sigterm
from training.shards import SampleRef, read_image_bytes
from training.views import VIEWS_VERSION, decode_image, normalize, pixels, rotation
from training.views import view as view_of


def backbone_of(model: nn.Module) -> nn.Module:
    """Everything before a torchvision ResNet's `fc`: image → pooled feature vector."""
    return nn.Sequential(*(m for name, m in model.named_children() if name != "fc"), nn.Flatten(1))


class ViewSamples(Dataset):
    """(sample, view) pairs, each as that exact view's uint8 pixels: view 0 the evaluation view, view v
    rotated by the angle (seed, sample, v) draws."""

    def __init__(self, items: list[tuple[SampleRef, int]], image_size: int, seed: int):
        self.items = items
        self.seed, self.image_size = seed, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        ref, number = self.items[i]
        image = decode_image(read_image_bytes(ref), self.image_size)
        return pixels(view_of(image, self.image_size, rotation(self.seed, ref.key, number) if number else None))


def cache_key(backbone: nn.Module, **depends_on) -> str:
    """A digest of the backbone's weights and whatever else cached features depend on."""
    digest = hashlib.sha256(json.dumps(depends_on, sort_keys=True).encode())
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def view_for(seed: int, epoch: int, key: str, views: int) -> int:
    return random.Random(f"{seed}/{epoch}/{key}").randrange(views)


class FeatureCache:
    """Backbone features by (sample key, view), in memory and optionally in a directory. On disk they
    live under a subdirectory named by a digest of everything they depend on — the dataset's shards,
    the backbone's weights (so its architecture too), the image size, the seed the views are drawn
    with, and the device and precision they are computed in (bf16 features are not fp32's) — so a
    reused directory never serves features of something else."""

    def __init__(self, backbone: nn.Module, device: torch.device, image_size: int, seed: int, *,
                 batch_size: int, workers: int, autocast, width: int, directory: Path | None = None,
                 dataset: str = "", precision: str = "fp32") -> None:  # fmt: skip
        self.backbone = backbone.eval()
        self.device = device
        self.image_size = image_size
        self.seed = seed
        self.batch_size = batch_size
        self.workers = workers
        self.autocast = autocast
        self.width = width
        self.directory = directory and directory / cache_key(
            backbone,
            dataset=dataset,
            image_size=image_size,
            seed=seed,
            views=VIEWS_VERSION,
            computed=f"{device.type}/{precision}",
        )
        self.memory: dict[tuple[str, int], torch.Tensor] = {}

    def _path(self, key: str, view: int) -> Path:
        return self.directory / f"{key}.view{view}.pt"

    def _load(self, key: str, view: int) -> torch.Tensor | None:
        if (key, view) not in self.memory and self.directory is not None and self._path(key, view).exists():
            self.memory[key, view] = torch.load(self._path(key, view), weights_only=True)
        return self.memory.get((key, view))

    @torch.no_grad()
    def _compute(self, items: list[tuple[SampleRef, int]]) -> None:
        loader = DataLoader(ViewSamples(items, self.image_size, self.seed), batch_size=self.batch_size,
                            num_workers=self.workers, prefetch_factor=4 if self.workers else None,
                            worker_init_fn=ignore_sigterm)  # fmt: skip
        done = 0
        for images in loader:
            images = normalize(images.to(self.device, non_blocking=True))
            if self.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                features = self.backbone(images).float().cpu()
            for (ref, view), feature in zip(items[done : done + len(features)], features, strict=True):
                self.memory[ref.key, view] = feature.clone()
                if self.directory is not None:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    partial = self._path(ref.key, view).with_suffix(".partial")
                    torch.save(feature.clone(), partial)
                    partial.replace(self._path(ref.key, view))
            done += len(features)

    def features(self, items: list[tuple[SampleRef, int]]) -> torch.Tensor:
        """The backbone features of each (sample, view), computing only what is not cached yet."""
        missing = [(ref, view) for ref, view in items if self._load(ref.key, view) is None]
        if missing:
            self._compute(missing)
        if not items:  # a rank whose share of a tiny split is empty
            return torch.empty(0, self.width)
        return torch.stack([self.memory[ref.key, view] for ref, view in items])

    def loader(self, refs: list[SampleRef], views_of: list[int], batch_size: int) -> DataLoader:
        """Batches of (features, label, index) in the order of `refs`, for train_one_epoch / evaluate."""
        features = self.features(list(zip(refs, views_of, strict=True)))
        labels = torch.tensor([ref.label for ref in refs], dtype=torch.long)
        return DataLoader(TensorDataset(features, labels, torch.arange(len(refs))), batch_size=batch_size)


class FeatureEpochs:
    """`--freeze fc` with the cache: the head trains from cached backbone features of K views.

    Every epoch is cut across ranks the same way (the shard order of epoch 0), so a rank computes
    features for its own part only; the order within the rank and the view of each sample change
    with the epoch. A resume on another world size recomputes only what a rank lacks."""

    def __init__(self, model, train: SplitStream, val: SplitStream, *, cache: FeatureCache, views: int, seed: int,
                 rank: int, world_size: int, batch_size: int):  # fmt: skip
        self.trained = self.evaluated = model.fc
        self.sample_shape = (model.fc.in_features,)  # of one cached feature vector
        self.train, self.cache, self.views = train, cache, views
        self.samples = train.samples
        self.seed, self.batch_size = seed, batch_size
        self.val_refs = val.epoch_refs(seed, 0, rank, world_size, shuffle=False)

    def assignment(self, epoch: int, world_size: int) -> list[list[int]]:
        return self.train.assignment(self.seed, epoch, world_size, shuffle=True, cut_epoch=0)

    def train_loader(self, epoch: int, numbers: list[int]) -> DataLoader:
        refs = self.train.refs(numbers)
        views = [view_for(self.seed, epoch, ref.key, self.views) for ref in refs]
        return self.cache.loader(refs, views, self.batch_size)

    def val_loader(self, epoch: int) -> DataLoader:
        return self.cache.loader(self.val_refs, [0] * len(self.val_refs), self.batch_size)

    def close(self) -> None:
        """Nothing to end: feature loaders run in the process, and the backbone's DataLoaders end with each pass."""
