"""The data benchmark's peers: WebDataset, MosaicML Streaming and LitData, each reading its own
writer's format from MinIO, with petal's decode and training view. Their pins are not petal's
(Streaming wants numpy < 2.2 and three clouds' SDKs), so they live in a venv of their own layered on
the dev venv's torch (`scripts/testbed.sh install peers`, which `env` then names in
PETAL_PEERS_PYTHON); benchmarks/data.py runs this module there, from the repository root:

    $PETAL_PEERS_PYTHON -m benchmarks.peers prepare webdataset STORED s3://petal/bench/peers/webdataset --shards 4
    $PETAL_PEERS_PYTHON -m benchmarks.peers read webdataset s3://petal/bench/peers/webdataset --endpoint URL \
        --cache DIR --workers 2

`prepare` writes STORED's images (NNNNN.jpg, labels in labels.json: the bytes petal's shards hold) with
the peer's own writer into as many shards as petal's, and uploads them. `read` delivers one shuffled
epoch through the peer's loader with DataLoader workers, from a cold cache in DIR (WebDataset keeps
none: it streams), and prints {"images", "seconds", "bytes"} as JSON: its clock starts, the library
imported, before the peer's first request (its index too) and stops at the last batch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch.utils.data import default_collate

from training.storage import Storage, parse_url
from training.views import MAX_ROTATION, decode_image, normalize, pixels, view

IMAGE_SIZE = 224
BATCH_SIZE = 32
PREFETCH = 4


def training_view(image) -> torch.Tensor:
    """petal's training view, uint8 (normalised per batch, as OnDevice does): what every contender of
    the data benchmark but the seed's delivers."""
    return pixels(view(image, IMAGE_SIZE, random.uniform(-MAX_ROTATION, MAX_ROTATION)))


def sample(data: bytes, label: int) -> tuple[torch.Tensor, int]:
    return training_view(decode_image(data, IMAGE_SIZE)), label


class Peer(ABC):
    """One library: its writer, its loader, and what it needs set up before the clock and cleaned up
    after it (nothing, by default)."""

    @abstractmethod
    def write(self, images: list[bytes], labels: list[int], out: Path, shards: int) -> None: ...

    def before_clock(self, storage: Storage, workers: int) -> None:
        return None

    @abstractmethod
    def loader(self, url: str, storage: Storage, workers: int, cache: Path): ...

    def clean_up(self, loader) -> None:
        return None


class WebDataset(Peer):
    """WebDataset as its docs read an object store over HTTP: curl on presigned URLs, shards split
    among the workers and shuffled, samples shuffled in a buffer. It keeps no cache: it streams."""

    def write(self, images, labels, out, shards):
        import webdataset as wds

        with wds.ShardWriter(str(out / "shard-%05d.tar"), maxcount=math.ceil(len(images) / shards),
                             verbose=0) as sink:  # fmt: skip
            for i, (data, label) in enumerate(zip(images, labels, strict=True)):
                sink.write({"__key__": f"{i:05d}", "jpg": data, "cls": str(label).encode()})

    def loader(self, url, storage, workers, cache):
        import webdataset as wds

        urls = [storage.client.presigned_get_object(shard.bucket, shard.key) for shard in storage.list(parse_url(url))]
        dataset = (wds.WebDataset(urls, shardshuffle=len(urls), workersplitter=wds.split_by_worker, empty_check=False)
                   .shuffle(1000).to_tuple("jpg", "cls").map(lambda s: sample(s[0], int(s[1])))
                   .batched(BATCH_SIZE, collation_fn=default_collate))  # fmt: skip
        return wds.WebLoader(dataset, batch_size=None, num_workers=workers,
                             prefetch_factor=PREFETCH if workers else None)  # fmt: skip


class TrainingViews(torch.utils.data.IterableDataset):
    """An iterable dataset of records ({"jpg", "cls"}) as (training view, label) samples."""

    def __init__(self, records):
        self.records = records

    def __iter__(self):
        for record in self.records:
            yield sample(record["jpg"], record["cls"])


class Streaming(Peer):
    """MosaicML Streaming: MDS shards read from s3:// into its local cache, its endpoint from the
    environment (the only place it looks)."""

    def write(self, images, labels, out, shards):
        from streaming import MDSWriter

        # MDS closes a shard at size_limit bytes: a share of the images' bytes, plus each sample's own overhead.
        limit = math.ceil(sum(map(len, images)) / shards) + 64 * math.ceil(len(images) / shards) + max(map(len, images))
        with MDSWriter(out=str(out), columns={"jpg": "bytes", "cls": "int"}, size_limit=limit) as sink:
            for data, label in zip(images, labels, strict=True):
                sink.write({"jpg": data, "cls": label})

    def before_clock(self, storage, workers):
        """Its DataLoader workers come from a fork server: forked from the DataLoader's process, they read
        a wrong sample now and then (garbage bytes, or "Relative sample index N is not present": about 1
        epoch in 8 on this set with 2 workers); from a fork server never. Started once per process with
        torch and Streaming imported, as a training job would before its first epoch: off the clock (one
        process through it, waited for, so its imports are done)."""
        os.environ["S3_ENDPOINT_URL"] = storage.endpoint_url
        if workers:
            import multiprocessing

            multiprocessing.set_forkserver_preload(["benchmarks.peers", "streaming"])
            first = multiprocessing.get_context("forkserver").Process(target=int)
            first.start()
            first.join()

    def loader(self, url, storage, workers, cache):
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        dataset = TrainingViews(StreamingDataset(remote=url, local=str(cache), shuffle=True, batch_size=BATCH_SIZE))
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=workers,
                                           prefetch_factor=PREFETCH if workers else None,
                                           multiprocessing_context="forkserver" if workers else None)  # fmt: skip

    def clean_up(self, loader):
        """Streaming leaves its two lock files in the temporary directory, named by the dataset's shared
        memory prefix: removed, as they would pile up there one pair per run."""
        from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK
        from streaming.base.shared.prefix import _get_path

        dataset = loader.dataset.records
        for lock in (BARRIER_FILELOCK, CACHE_FILELOCK):
            Path(tempfile.gettempdir(), _get_path(dataset._shm_prefix_int, lock)).unlink(missing_ok=True)


class LitData(Peer):
    """LitData: `optimize` chunks read from s3:// into its local cache."""

    def write(self, images, labels, out, shards):
        import litdata

        # Its working folders, else made in the temporary directory and left there
        os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = str(out.parent / "chunks")
        os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = str(out.parent / "data")
        litdata.optimize(fn=lambda i: {"jpg": images[i], "cls": labels[i]}, inputs=list(range(len(images))),
                         output_dir=str(out), chunk_size=math.ceil(len(images) / shards), num_workers=1,
                         start_method="fork", verbose=False)  # fmt: skip

    def loader(self, url, storage, workers, cache):
        import litdata
        from litdata.streaming import downloader

        # LitData fetches chunks with obstore, whose client it builds without allow_http: against a
        # plain-http endpoint (MinIO in a cluster, as here) every GET fails "BadScheme". Allowed, as its
        # user would patch it.
        downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"
        # boto3 (and obstore, from boto3's session) take the credentials from the environment
        options = {"endpoint_url": storage.endpoint_url}
        dataset = litdata.StreamingDataset(url, cache_dir=str(cache), shuffle=True, storage_options=options,
                                           transform=lambda record: sample(record["jpg"], record["cls"]))  # fmt: skip
        return litdata.StreamingDataLoader(dataset, batch_size=BATCH_SIZE, num_workers=workers,
                                           prefetch_factor=PREFETCH if workers else None)  # fmt: skip


PEERS = {"webdataset": WebDataset(), "streaming": Streaming(), "litdata": LitData()}  # by their modules' names


def prepare(name: str, stored: Path, url: str, shards: int, storage: Storage) -> None:
    labels = json.loads((stored / "labels.json").read_text())
    images = [(stored / f"{i:05d}.jpg").read_bytes() for i in range(len(labels))]
    with tempfile.TemporaryDirectory(prefix=f"petal-peer-{name}-") as scratch:
        out = Path(scratch, "shards")
        out.mkdir()
        PEERS[name].write(images, labels, out, shards)
        destination = parse_url(url)
        for stale in storage.list(destination):
            storage.delete(stale)
        for file in sorted(out.rglob("*")):
            if file.is_file():
                storage.upload(file, destination.join(str(file.relative_to(out))))


def read(name: str, url: str, storage: Storage, workers: int, cache: Path) -> dict:
    """One epoch through the peer's loader; the library imported, and what it sets up once per process
    done, before the clock starts, as petal's are."""
    peer = PEERS[name]
    importlib.import_module(name)
    peer.before_clock(storage, workers)
    objects = sum(storage.size(object_url) or 0 for object_url in storage.list(parse_url(url)))
    images = 0
    started = time.perf_counter()
    loader = peer.loader(url, storage, workers, cache)
    for batch, _labels in loader:
        normalize(batch)
        images += len(batch)
    seconds = time.perf_counter() - started
    peer.clean_up(loader)
    return {"images": images, "seconds": seconds, "bytes": objects}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="write and upload a peer's shards")
    prepare_parser.add_argument("peer", choices=PEERS)
    prepare_parser.add_argument("stored", type=Path, help="NNNNN.jpg and labels.json")
    prepare_parser.add_argument("url", help="s3://bucket/prefix the shards go to")
    prepare_parser.add_argument("--shards", type=int, required=True)
    read_parser = commands.add_parser("read", help="one epoch through a peer's loader, timed")
    read_parser.add_argument("peer", choices=PEERS)
    read_parser.add_argument("url")
    read_parser.add_argument("--endpoint", required=True, help="MinIO, or a proxy in front of it")
    read_parser.add_argument("--cache", type=Path, required=True, help="an empty local cache directory")
    read_parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    storage = Storage.from_env()
    if args.command == "prepare":
        prepare(args.peer, args.stored, args.url, args.shards, storage)
        return
    through = Storage(args.endpoint, credentials=storage.credentials)
    json.dump(read(args.peer, args.url, through, args.workers, args.cache), sys.stdout)


if __name__ == "__main__":
    main()
