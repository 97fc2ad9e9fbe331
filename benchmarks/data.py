"""Images per second delivered to the training loop (decode + the 224 px training transform, same
DataLoader worker count, same images), from:

  shards          petal's tar shards streamed from MinIO (cold local cache: the download is counted)
  imagefolder     the seed's way: torchvision ImageFolder + DataLoader over local files
  per_object_get  one GET per image from MinIO
  decode_limit    PIL decode + transform of bytes already in memory: no I/O at all

Goals: shards >= 1.0x imagefolder, >= 3x per_object_get, >= 0.8x decode_limit.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from benchmarks.common import make_images, report, run_script, storage_from_env, timed
from training.data import SplitStream, decode_image, train_transform
from training.shards import read_index
from training.storage import S3Url, Storage, parse_url

IMAGE_SIZE = 224


class ObjectPerImage(Dataset):
    def __init__(self, storage: Storage, urls: list[S3Url], labels: list[int], transform):
        self.storage, self.urls, self.labels, self.transform = storage, urls, labels, transform

    def __len__(self):
        return len(self.urls)

    def __getitem__(self, i):
        return self.transform(decode_image(self.storage.read_bytes(self.urls[i]))), self.labels[i]


class InMemory(Dataset):
    def __init__(self, images: list[bytes], labels: list[int], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(decode_image(self.images[i])), self.labels[i]


def images_per_second(loader: DataLoader, count: int) -> float:
    return count / timed(lambda: sum(1 for _ in loader))


def run(args) -> dict:
    storage = storage_from_env()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="petal-bench-data-"))
    images = make_images(work / "images", classes=8, per_class=args.images // 8, size=args.image_side)
    dataset = parse_url("s3://petal/bench/data-shards")
    run_script("upload_dataset.py", str(images), str(dataset), "--min-shards", str(2 * args.workers))
    stream = SplitStream(storage, dataset, read_index(storage, dataset), ["train"], work / "cache")
    files = sorted((images / "train").glob("*/*.jpg"))
    labels = [int(f.parent.name) - 1 for f in files]
    objects = [parse_url(f"s3://petal/bench/data-objects/{f.parent.name}/{f.name}") for f in files]
    for path, url in zip(files, objects, strict=True):
        if storage.size(url) != path.stat().st_size:
            storage.write_bytes(url, path.read_bytes(), "image/jpeg")
    transform = train_transform(IMAGE_SIZE)
    common = dict(batch_size=32, num_workers=args.workers, prefetch_factor=4 if args.workers else None)

    def shards() -> float:
        shutil.rmtree(work / "cache", ignore_errors=True)  # cold: fetching the shards is part of the cost
        refs = stream.epoch_refs(seed=0, epoch=1, rank=0, world_size=1, shuffle=True)
        loader = stream.loader(refs, transform, seed=0, epoch=1, augment=True, batch_size=32, workers=args.workers,
                               pin_memory=False)  # fmt: skip
        return images_per_second(loader, len(files))

    contenders = {
        "shards": shards,
        "imagefolder": lambda: images_per_second(
            DataLoader(ImageFolder(str(images / "train"), transform=transform), shuffle=True, **common), len(files)
        ),
        "per_object_get": lambda: images_per_second(
            DataLoader(ObjectPerImage(storage, objects, labels, transform), shuffle=True, **common), len(files)
        ),
        "decode_limit": lambda: images_per_second(
            DataLoader(InMemory([f.read_bytes() for f in files], labels, transform), shuffle=True, **common),
            len(files),
        ),
    }
    contenders["decode_limit"]()  # warm-up, untimed: imports, page cache and worker start-up hit nobody
    # Rounds interleave the contenders, so a slow spell of the machine is shared out, not pinned on one.
    rate = {name: 0.0 for name in contenders}
    for _ in range(args.rounds):
        for name, measure in contenders.items():
            rate[name] = max(rate[name], measure())
    # What one GET costs on this machine's path to MinIO, next to what decoding one image costs a core:
    # the per-object contender's handicap is the first, so its ratio tracks the network it runs over.
    get_ms = 1000 * statistics.median(timed(lambda url=url: storage.read_bytes(url)) for url in objects[:50])
    decode_ms = 1000 * args.workers / rate["decode_limit"]
    ratios = {
        "shards_vs_imagefolder": rate["shards"] / rate["imagefolder"],
        "shards_vs_per_object_get": rate["shards"] / rate["per_object_get"],
        "shards_vs_decode_limit": rate["shards"] / rate["decode_limit"],
    }
    goals = {"shards_vs_imagefolder": 1.0, "shards_vs_per_object_get": 3.0, "shards_vs_decode_limit": 0.8}
    rows = [(f"{name} images/s", f"{value:8.1f}") for name, value in rate.items()]
    rows += [("one GET (ms, median)", f"{get_ms:8.2f}"), ("decode + transform (ms/image/worker)", f"{decode_ms:8.2f}")]
    rows += [(name, f"{value:8.2f}x  (goal >= {goals[name]}x{'' if value >= goals[name] else ', MISSED'})")
             for name, value in ratios.items()]  # fmt: skip
    setup = {"images": len(files), "image_side": args.image_side, "workers": args.workers, "rounds": args.rounds}
    figures = {"setup": setup, "images_per_s": rate, "get_ms": get_ms, "decode_ms_per_image": decode_ms}
    return report("data", rows, figures | {"ratios": ratios, "goals": goals}, args.json)
