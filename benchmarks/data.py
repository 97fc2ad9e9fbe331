"""Images per second delivered to the training loop (decode + the 224 px training transform, same
DataLoader worker count), on realistic photographs (benchmarks/photos.py: crops of every photo scikit-image and
scikit-learn ship, at native resolution, short side at most 500 px like Flowers-102), from:

  shards          petal's way: upload_dataset.py's shards (images stored at short side 256, the
                  default), streamed from MinIO with a cold local cache, JPEGs decoded at reduced
                  size where larger than needed (PIL's draft)
  imagefolder     the seed's way: torchvision ImageFolder + DataLoader over the original files, with
                  the seed's training view (the 20 degree rotation on the full image, then the resize)
  imagefolder_best  the same files as a user who knows the tricks would read them: JPEGs decoded at
                  reduced size where larger than needed (PIL's draft), resized before the rotation —
                  petal's own decode and view, from local disk
  per_object_get  one GET per image from MinIO (the same stored images as the shards)
  webdataset, streaming, litdata
                  the real loading libraries (benchmarks/peers.py, run in their own venv): WebDataset
                  1.0.2, MosaicML Streaming 0.13.0 and LitData 0.2.76, each on its own writer's shards
                  of the same stored images, as many shards as petal's, streamed from the same MinIO
                  (into a cold local cache, Streaming and LitData) with petal's decode and view
  decode_limit    decode + transform of the stored images already in memory: no I/O at all
  *_at_5ms        every contender that reads MinIO again, through Toxiproxy adding 5 ms each way per
                  request (benchmarks/network.py), the latency of a cross-node request with TLS

Every contender's clock starts before its first byte is fetched (for the shards and the peers: before
their index is read and their cache opened) and stops at its last batch; each reports the MB/s it read
beside its images/s. All have the same batch size, DataLoader workers and prefetch depth. Goals: shards
>= 3x imagefolder, >= 1x imagefolder_best (which reads no network at all), >= 1x every peer on
loopback and at 5 ms, >= 3x per_object_get at 5 ms, >= 0.8x decode_limit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from io import BytesIO
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2 as T

from benchmarks.common import ROOT, in_workdir, report, run_script, storage_from_env, timed
from benchmarks.network import Latency
from benchmarks.peers import BATCH_SIZE, IMAGE_SIZE, PEERS, PREFETCH, training_view
from benchmarks.photos import PHOTOS, jpeg_density, make_photos, megapixels
from training.data import SplitLoader, SplitStream
from training.shards import read_image_bytes, read_index
from training.storage import S3Url, Storage, parse_url
from training.views import IMAGENET_MEAN, IMAGENET_STD, decode_image, normalize

PEER_SECONDS = 600  # a peer's preparation or epoch; one that hangs ends the benchmark


def drafted(path: str):
    """ImageFolder's loader, best practice: a JPEG decoded no larger than the view needs."""
    with open(path, "rb") as file:
        return decode_image(file.read(), IMAGE_SIZE)


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


class Rate(NamedTuple):
    images_per_s: float
    mb_per_s: float
    read_mb: float


def delivered(open_loader: Callable[[], Iterable], count: int, read_bytes: int) -> Rate:
    """Images/s and MB/s of a loader from the moment it is opened (whatever it fetches before its first
    batch is on the clock) to its last batch, each batch as the model takes it: uint8 batches (petal's)
    are normalised here, as OnDevice does before the model; the seed's come normalised from the
    workers."""

    def drain() -> None:
        for images, *_ in open_loader():
            if images.dtype == torch.uint8:
                normalize(images)

    seconds = timed(drain)
    return Rate(count / seconds, read_bytes / 1e6 / seconds, read_bytes / 1e6)


def stored_images(stream: SplitStream) -> tuple[list[bytes], list[int]]:
    refs = stream.epoch_refs(seed=0, epoch=0, rank=0, world_size=1, shuffle=False)
    return [read_image_bytes(ref) for ref in refs], [ref.label for ref in refs]


def peers_python() -> str:
    python = os.environ.get("PETAL_PEERS_PYTHON", "")
    if not os.access(python, os.X_OK):
        raise SystemExit(f"benchmarks: error: PETAL_PEERS_PYTHON {python!r} is not the peers' venv's python; run "
                         '`scripts/testbed.sh install peers; eval "$(scripts/testbed.sh env)"` first')  # fmt: skip
    return python


def run_peer(*args: str) -> str:
    """benchmarks/peers.py in the peers' venv, from the repository root; its stdout. Its failure ends the
    benchmark with its error, presigned URLs' signatures (WebDataset's curl prints them) cut out."""
    try:
        result = subprocess.run([peers_python(), "-m", "benchmarks.peers", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=PEER_SECONDS)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise SystemExit(f"benchmarks: peers {args[0]} {args[1]} did not finish in {PEER_SECONDS} s") from None
    if result.returncode != 0:
        error = re.sub(r"X-Amz-(Credential|Signature|Security-Token)=[^&\s]+", r"X-Amz-\1=…", result.stderr.strip())
        raise SystemExit(f"benchmarks: peers {args[0]} {args[1]} failed: {error[-2000:]}")
    return result.stdout


@in_workdir("petal-bench-data-")
def run(args, work: Path) -> dict:
    storage = storage_from_env()
    peers_python()  # refused before any work
    images = make_photos(work / "photos-v3", classes=len(PHOTOS), per_class=max(1, args.images // len(PHOTOS)))
    dataset = parse_url("s3://petal/bench/photo-shards")
    run_script("upload_dataset.py", str(images), str(dataset), "--min-shards", str(2 * args.workers))
    index = read_index(storage, dataset)
    stream = SplitStream(storage, dataset, index, ["train"], work / "index-cache")
    stored, labels = stored_images(stream)
    files = sorted(images.glob("*/*.jpg"))
    objects = [parse_url(f"s3://petal/bench/photo-objects/{i:05d}.jpg") for i in range(len(stored))]
    for url, data in zip(objects, stored, strict=True):
        if storage.size(url) != len(data):
            storage.write_bytes(url, data, "image/jpeg")
    shard_count = len(index["splits"]["train"]["shards"])
    # Each peer's writer gets the bytes petal's shards hold, and makes as many shards of them.
    (work / "stored").mkdir(exist_ok=True)
    for i, data in enumerate(stored):
        (work / "stored" / f"{i:05d}.jpg").write_bytes(data)
    (work / "stored" / "labels.json").write_text(json.dumps(labels))
    peer_urls = {peer: f"s3://petal/bench/peers/{peer}" for peer in PEERS}
    for peer, url in peer_urls.items():
        run_peer("prepare", peer, str(work / "stored"), url, "--shards", str(shard_count))

    seed_transform = T.Compose([T.PILToTensor(), T.RandomRotation(20), T.Resize(IMAGE_SIZE, antialias=True),
                                T.CenterCrop(IMAGE_SIZE), T.ToDtype(torch.float32, scale=True),
                                T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # fmt: skip
    common = dict(batch_size=BATCH_SIZE, num_workers=args.workers, prefetch_factor=PREFETCH if args.workers else None)
    stored_bytes, file_bytes = sum(map(len, stored)), sum(f.stat().st_size for f in files)
    shard_bytes = sum(shard["bytes"] for shard in index["splits"]["train"]["shards"])

    def shards(through: Storage) -> Callable[[], Rate]:
        def measure() -> Rate:
            shutil.rmtree(work / "cache", ignore_errors=True)  # cold: fetching the shards is part of the cost
            opened = []

            def open_epoch():  # the index read, and for_epoch's download and check of the shards: on the clock
                cold = SplitStream(through, dataset, read_index(through, dataset), ["train"], work / "cache")
                opened.append(SplitLoader(cold, IMAGE_SIZE, seed=0, augment=True, batch_size=BATCH_SIZE,
                                          workers=args.workers, pin_memory=False))  # fmt: skip
                return opened[0].for_epoch(1, cold.assignment(0, 1, 1, shuffle=True)[0])

            try:
                return delivered(open_epoch, len(stored), shard_bytes)
            finally:
                for batches in opened:
                    batches.close()

        return measure

    def peer(name: str, through: Storage) -> Callable[[], Rate]:
        def measure() -> Rate:
            # A new directory each time: Streaming keys its shared memory by the cache's path
            cache = Path(tempfile.mkdtemp(prefix=f"cache-{name}-", dir=work))
            try:
                read = json.loads(run_peer("read", name, peer_urls[name], "--endpoint", through.endpoint_url,
                                           "--cache", str(cache), "--workers", str(args.workers)))  # fmt: skip
            finally:
                shutil.rmtree(cache)
            if read["images"] != len(stored):
                raise SystemExit(f"benchmarks: {name} delivered {read['images']} of {len(stored)} images")
            return Rate(read["images"] / read["seconds"], read["bytes"] / 1e6 / read["seconds"], read["bytes"] / 1e6)

        return measure

    def per_object(through: Storage) -> Callable[[], Rate]:
        return lambda: delivered(
            lambda: DataLoader(ObjectPerImage(through, objects, labels, training_view), shuffle=True, **common),
            len(stored), stored_bytes,
        )  # fmt: skip

    with Latency(storage.endpoint_url, milliseconds=5) as slow_endpoint:
        slow = Storage(slow_endpoint, credentials=storage.credentials)
        contenders = {
            "shards": shards(storage),
            "imagefolder": lambda: delivered(
                lambda: DataLoader(ImageFolder(str(images), transform=seed_transform), shuffle=True, **common),
                len(files),
                file_bytes,
            ),
            "imagefolder_best": lambda: delivered(
                lambda: DataLoader(
                    ImageFolder(str(images), transform=training_view, loader=drafted), shuffle=True, **common
                ),  # fmt: skip
                len(files),
                file_bytes,
            ),
            "per_object_get": per_object(storage),
            "decode_limit": lambda: delivered(
                lambda: DataLoader(InMemory(stored, labels, training_view), shuffle=True, **common),
                len(stored),
                0,
            ),
            **{name: peer(name, storage) for name in PEERS},
            "shards_at_5ms": shards(slow),
            "per_object_get_at_5ms": per_object(slow),
            **{f"{name}_at_5ms": peer(name, slow) for name in PEERS},
        }
        contenders["decode_limit"]()  # warm-up, untimed: imports, page cache and worker start-up hit nobody
        # Rounds interleave the contenders, so a slow spell of the machine is shared out, not pinned on one.
        best = {name: Rate(0.0, 0.0, 0.0) for name in contenders}
        for _ in range(args.rounds):
            for name, measure in contenders.items():
                best[name] = max(best[name], measure())
        rate = {name: measured.images_per_s for name, measured in best.items()}
        mb_per_s = {name: measured.mb_per_s for name, measured in best.items()}
        read_mb = {name: measured.read_mb for name, measured in best.items()}
        get_ms = {name: 1000 * statistics.median(timed(lambda url=url, s=s: s.read_bytes(url)) for url in objects[:30])
                  for name, s in (("loopback", storage), ("at_5ms", slow))}  # fmt: skip
    # What decoding costs a core, the originals against what upload_dataset.py stored.
    # One of each in turn, medians: a slow spell of the machine falls on both kinds, not on one of them.
    decode_s = {"original": [], "stored": []}
    for file, data in zip(files[:60], stored[:60], strict=False):  # as many of each as both have
        decode_s["original"].append(timed(lambda f=file: decode_image(f.read_bytes())))
        decode_s["stored"].append(timed(lambda d=data: decode_image(d, IMAGE_SIZE)))
    decode_ms = {kind: 1000 * statistics.median(seconds) for kind, seconds in decode_s.items()}
    ratios = {
        "shards_vs_imagefolder": rate["shards"] / rate["imagefolder"],
        "shards_vs_imagefolder_best": rate["shards"] / rate["imagefolder_best"],
        "shards_vs_per_object_get": rate["shards"] / rate["per_object_get"],
        "shards_vs_per_object_get_at_5ms": rate["shards_at_5ms"] / rate["per_object_get_at_5ms"],
        "shards_vs_decode_limit": rate["shards"] / rate["decode_limit"],
        **{f"shards_vs_{name}": rate["shards"] / rate[name] for name in PEERS},
        **{f"shards_vs_{name}_at_5ms": rate["shards_at_5ms"] / rate[f"{name}_at_5ms"] for name in PEERS},
    }
    goals = {"shards_vs_imagefolder": 3.0, "shards_vs_imagefolder_best": 1.0, "shards_vs_per_object_get": None,
             "shards_vs_per_object_get_at_5ms": 3.0, "shards_vs_decode_limit": 0.8}  # fmt: skip
    goals |= {name: 1.0 for name in ratios if name.removeprefix("shards_vs_").removesuffix("_at_5ms") in PEERS}
    rows = [(f"{name} images/s (MB/s read)", f"{value:8.1f} ({mb_per_s[name]:.1f})") for name, value in rate.items()]
    rows += [(f"one GET, {where} (ms, median)", f"{ms:8.2f}") for where, ms in get_ms.items()]
    rows += [(f"decode one {kind} image (ms)", f"{ms:8.2f}") for kind, ms in decode_ms.items()]
    density = jpeg_density(files)
    rows += [(f"originals: {name.replace('_', ' ')}", f"{value:8.3f}") for name, value in density.items()]
    rows += [(name, f"{value:8.2f}x" + ("" if goals[name] is None else
                                        f"  (goal >= {goals[name]}x{'' if value >= goals[name] else ', MISSED'})"))
             for name, value in ratios.items()]  # fmt: skip
    setup = {"images": len(stored), "workers": args.workers, "rounds": args.rounds,
             "stored_short_side": index["splits"]["train"].get("short_side")}  # fmt: skip
    setup |= {
        "stored_mb": stored_bytes / 1e6,
        "shards_mb": shard_bytes / 1e6,
        "original_mb": file_bytes / 1e6,
        **{f"original_{name}": value for name, value in density.items()},
        "stored_megapixels_per_image": statistics.mean(megapixels(BytesIO(data)) for data in stored),
    }
    figures = {"setup": setup, "images_per_s": rate, "mb_per_s": mb_per_s, "read_mb": read_mb, "get_ms": get_ms,
               "decode_ms_per_image": decode_ms}  # fmt: skip
    return report("data", rows, figures | {"ratios": ratios, "goals": goals}, args.json)
