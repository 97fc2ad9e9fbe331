#!/usr/bin/env python3
"""Grows a petal dataset with web images found by google_images_download, keeping the junk out.

    python scripts/augment_dataset.py s3://petal/datasets/flowers102 --suffix flower --limit 100
    python scripts/augment_dataset.py s3://petal/datasets/flowers102 --classes "pink primrose,7" \\
        --relevance s3://petal/runs/r1/best.pt --chromedriver /usr/bin/chromedriver --limit 300

For each class (named in the dataset's index.json) it searches for "<class name> <suffix>" and
downloads up to --limit images (above 100 the library needs --chromedriver, e.g. Debian's
chromium-driver). A URL is refused before anything is kept when it is: not-http (it redirects off
http(s)), private-address (it or a redirect resolves to a loopback, link-local, private or multicast
address: the cloud metadata service, localhost, in-cluster services; --allow-network admits a
mirror of yours), too-large (over --max-bytes), too-slow (not done within --download-seconds) or
download-failed. Every file is then checked, and rejected with its reason when it is: empty /
not-an-image / truncated / does-not-decode / decompression-bomb (more pixels than Pillow's limit),
too-small (shorter side < --min-side), extreme-aspect (> --max-aspect), duplicate-url (already in
the dataset), exact-duplicate (same bytes) or near-duplicate (perceptual hash within
--near-distance) of any image already in the dataset — the valid and test splits included, since
leaking them would fake accuracy — or of another download, or, with --relevance CHECKPOINT,
irrelevant (a trained petal model does not put the target class in its top --relevance-top-k).
What survives becomes new shards of the split --split (default augment), stored as
upload_dataset.py stores images (an RGB JPEG that nvJPEG reads, at the dataset's short side); each
sample keeps its source URL. The index is replaced only after every shard is stored, and a per-class report is
printed and stored at <dataset>/reports/. Re-running stores no URL or image twice. Train on it with
`python -m training --train-splits train,augment`.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import ipaddress
import json
import socket
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections import Counter
from contextlib import redirect_stdout, suppress
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from urllib.parse import urlparse

import imagehash
from google_images_download.google_images_download import googleimagesdownload
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from training.shards import (
    DEFAULT_SHORT_SIDE,
    DatasetError,
    Sample,
    build_shard,
    fetch_shard,
    read_image_bytes,
    read_index,
    read_shard_table,
    safe_name,
    shard_count,
    shard_entry,
    stored_image,
    write_index,
)
from training.storage import S3Url, Storage, StorageError, parse_url

# What scripts/upload_dataset.py accepts too, by the format the bytes decode as (not the URL's name).
IMAGE_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) petal-augment"


class AugmentError(Exception):
    pass


@dataclass
class Known:
    """Every image the dataset already holds, by content hash, perceptual hash and source."""

    sha256: dict[str, str] = field(default_factory=dict)  # sha256 → "split/key"
    phashes: list[tuple[imagehash.ImageHash, str]] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)

    def add(self, data: bytes, image: Image.Image, where: str, source: str) -> None:
        self.sha256[hashlib.sha256(data).hexdigest()] = where
        self.phashes.append((imagehash.phash(image), where))
        self.sources.add(source)

    def near(self, image: Image.Image, distance: int) -> tuple[str, int] | None:
        probe = imagehash.phash(image)
        best = min(((probe - h, where) for h, where in self.phashes), default=None)
        return (best[1], best[0]) if best and best[0] <= distance else None


class Refused(Exception):
    """A URL not downloaded, with the reason the report gives."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class NetworkPolicy:
    """Where downloads may connect: public addresses only — a search result or a redirect must not
    reach the metadata service, localhost or in-cluster services — unless a network is allowed."""

    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def check(self, host: str, address: str) -> None:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip in network for network in self.allowed):
            return
        if not ip.is_global or ip.is_multicast:  # loopback, link-local, private, reserved, unspecified, ...
            raise Refused("private-address", f"{host} is {ip}")


class Download:
    """One URL's fetch: every connection it opens (redirects included) goes only to addresses the
    policy allows, checked on the resolved address it then connects to, and the whole of it — connect,
    headers, body — ends at `deadline` (a server sending a byte a second is cut off there)."""

    def __init__(self, policy: NetworkPolicy, seconds: float):
        self.policy, self.deadline = policy, time.monotonic() + seconds
        self.sockets: list[socket.socket] = []
        self.timer = threading.Timer(seconds, self._cut_off)
        self.timer.daemon = True

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Refused("too-slow", "past --download-seconds")
        return left

    def _cut_off(self) -> None:
        for sock in self.sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def connect(self, address: tuple[str, int], timeout=None, source_address=None) -> socket.socket:
        """What http.client calls to open a connection: resolve, refuse any address not allowed, connect."""
        host, port = address
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        for *_, sockaddr in found:
            self.policy.check(host, sockaddr[0])
        error: OSError = OSError(f"{host} has no address")
        for family, kind, proto, _, sockaddr in found:
            sock = socket.socket(family, kind, proto)
            self.sockets.append(sock)
            sock.settimeout(self.remaining())
            try:
                sock.connect(sockaddr)
                return sock
            except OSError as err:
                error = err
                sock.close()
        raise error

    def handlers(self) -> list[urllib.request.BaseHandler]:
        connect = self.connect

        def guarded(base):
            class Guarded(base):
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    self._create_connection = connect

            return Guarded

        class Http(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(guarded(http.client.HTTPConnection), req)

        class Https(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(guarded(http.client.HTTPSConnection), req, context=self._context)

        return [Http(), Https(), HttpOnlyRedirects()]

    def fetch(self, url: str, max_bytes: int) -> bytes:
        self.timer.start()
        try:
            opener = urllib.request.build_opener(*self.handlers())
            with opener.open(urllib.request.Request(url, headers={"User-Agent": USER_AGENT}),
                             timeout=self.remaining()) as response:  # fmt: skip
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise Refused("too-large", f"{declared} bytes")
                data = bytearray()
                while len(data) <= max_bytes and (chunk := response.read1(65536)):
                    data += chunk
                    self.remaining()
                self.remaining()  # an end of data that was the deadline cutting the connection
        except (OSError, http.client.HTTPException):
            self.remaining()  # cut off at the deadline: too-slow, not a failed download
            raise
        finally:
            self.timer.cancel()
        if len(data) > max_bytes:
            raise Refused("too-large", f"over {max_bytes} bytes")
        return bytes(data)


class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; a web image has no business there."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlparse(newurl).scheme not in ("http", "https"):
            raise Refused("not-http", newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, max_bytes: int, policy: NetworkPolicy, seconds: float) -> bytes:
    """The bytes at an http(s) URL, redirects included, refusing anything over max_bytes, any address
    the policy does not allow and anything not done within `seconds`."""
    if urlparse(url).scheme not in ("http", "https"):
        raise Refused("not-http", url)
    return Download(policy, seconds).fetch(url, max_bytes)


class RecordingDownloader(googleimagesdownload):
    """The library's search and result parsing; the download itself is petal's (`fetch`): http(s) only,
    public addresses only, at most `max_bytes` within `seconds`, remembering where each saved file came
    from and why any URL was not saved."""

    def __init__(self, max_bytes: int, policy: NetworkPolicy, seconds: float):
        super().__init__()
        self.max_bytes, self.policy, self.seconds = max_bytes, policy, seconds
        self.sources: dict[str, str] = {}  # saved file → URL
        self.refused: dict[str, str] = {}  # URL → reason

    def download_image(self, image_url, image_format, main_directory, dir_name, count, *rest):
        try:
            data = fetch(image_url, self.max_bytes, self.policy, self.seconds)
        except Refused as err:
            reason = err.reason
        except (OSError, ValueError, http.client.HTTPException):  # URLError is an OSError
            reason = "download-failed"
        else:
            path = Path(main_directory, dir_name, f"{count:05d}-{hashlib.sha256(image_url.encode()).hexdigest()[:12]}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            self.sources[str(path)] = image_url
            return "success", "saved", path.name, str(path)
        self.refused[image_url] = reason
        return "fail", reason, None, None


def decode(data: bytes) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) or (None, reason it is unusable)."""
    if not data:
        return None, "empty"
    # Pillow only warns about images over its pixel limit (and refuses those over twice that): a few
    # kilobytes can ask for gigabytes, so a warning is a rejection here.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(BytesIO(data))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            return None, "decompression-bomb"
        except (UnidentifiedImageError, OSError):
            return None, "not-an-image"
        try:
            image.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            return None, "decompression-bomb"
        except OSError as err:
            return None, "truncated" if "truncated" in str(err) else "does-not-decode"
        except (SyntaxError, ValueError):
            return None, "does-not-decode"
    if image.format not in IMAGE_FORMATS:
        return None, "not-an-image"
    return image, None


def load_known(storage: Storage, dataset: S3Url, index: dict, cache_dir: Path) -> Known:
    known = Known()
    shards = [(split, shard) for split, info in index["splits"].items() for shard in info["shards"]]
    for split, shard in tqdm(shards, desc="hashing the dataset's images", unit="shard"):
        local = fetch_shard(storage, dataset, shard, cache_dir)
        for ref in read_shard_table(local, len(index["classes"]), str(dataset.join(shard["name"]))):
            data = read_image_bytes(ref)
            image, _ = decode(data)
            known.add(data, image.convert("RGB"), f"{split}/{ref.key}", ref.source)
    return known


def search_and_download(classes: list[dict], args, workdir: Path) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """class id → ({downloaded file: source URL}, {refused URL: reason}), through google_images_download."""
    found = {}
    for cls in tqdm(classes, desc="searching", unit="class"):
        downloader = RecordingDownloader(args.max_bytes, NetworkPolicy(tuple(args.allow_network)),
                                         args.download_seconds)  # fmt: skip
        with redirect_stdout(sys.stderr):  # the library talks on stdout; ours ends with the JSON summary
            downloader.download(
                {
                    "keywords": cls["name"],
                    "suffix_keywords": args.suffix or None,
                    "limit": args.limit,
                    "output_directory": str(workdir),
                    "image_directory": cls["id"],
                    "chromedriver": args.chromedriver,
                    "silent_mode": True,
                }
            )
        found[cls["id"]] = downloader.sources, downloader.refused
    return found


class RelevanceCheck:
    """Whether a trained petal model puts the target class in its top k (imports torch only when asked)."""

    def __init__(self, storage: Storage, location: str, class_names: list[str], top_k: int):
        from training import checkpoint
        from training.model import load_checkpoint_model

        state = checkpoint.load(storage, location)
        if state["classes"] != class_names:
            raise AugmentError(f"--relevance {location} was trained on other classes than this dataset")
        self.model = load_checkpoint_model(state)
        self.image_size = state["config"]["image_size"]
        self.top_k = top_k

    def rank_ok(self, image: Image.Image, label: int) -> bool:
        import torch

        from training.views import model_input

        with torch.no_grad():
            logits = self.model(model_input(image, self.image_size))[0]
        return label in logits.topk(min(self.top_k, len(logits))).indices.tolist()


def stored_short_side(index: dict, split: str) -> int:
    """The short side kept images are stored at, as upload_dataset.py stores: the split's own, else the
    largest the dataset's other splits were stored at, else upload's default."""
    sides = [entry["short_side"] for entry in index["splits"].values() if entry.get("short_side")]
    return index["splits"].get(split, {}).get("short_side") or max(sides, default=DEFAULT_SHORT_SIDE)


def vet(downloads: dict, labels: list[int], index: dict, known: Known, relevance, args, short_side: int):
    """Each class's downloads kept (as samples of the new split, stored as upload_dataset.py stores:
    an RGB JPEG at most `short_side` on its shorter side) or rejected with the reason."""
    existing = index["splits"].get(args.split, {"samples": 0, "shards": []})
    kept: list[Sample] = []
    report, rejected = {}, []
    for label in labels:
        cls = index["classes"][label]
        counts = Counter()
        saved, refused = downloads[cls["id"]]
        for url, reason in sorted(refused.items()):
            counts[reason] += 1
            rejected.append({"class": cls["name"], "url": url, "reason": reason, "detail": ""})
        for path, url in tqdm(sorted(saved.items()), desc=f"checking {cls['name']}", leave=False):
            counts["downloaded"] += 1
            data = Path(path).read_bytes()
            reason, detail = None, ""
            if url in known.sources:
                reason = "duplicate-url"
            else:
                image, reason = decode(data)
            if reason is None:
                width, height = image.size
                rgb = image.convert("RGB")
                if min(width, height) < args.min_side:
                    reason, detail = "too-small", f"{width}x{height}"
                elif max(width, height) / min(width, height) > args.max_aspect:
                    reason, detail = "extreme-aspect", f"{width}x{height}"
                elif (twin := known.sha256.get(hashlib.sha256(data).hexdigest())) is not None:
                    reason, detail = "exact-duplicate", twin
                elif (near := known.near(rgb, args.near_distance)) is not None:
                    reason, detail = "near-duplicate", f"{near[0]} (distance {near[1]})"
                elif relevance and not relevance.rank_ok(rgb, label):
                    reason = "irrelevant"
            if reason:
                counts[reason] += 1
                rejected.append({"class": cls["name"], "url": url, "reason": reason, "detail": detail})
                continue
            key = f"{args.split}-{existing['samples'] + len(kept):06d}"
            known.add(data, rgb, f"{args.split}/{key}", url)  # later downloads must not duplicate it either
            kept.append(Sample(key, *stored_image(data, short_side), label, url))
            counts["kept"] += 1
        report[cls["name"]] = dict(counts)
    return kept, report, rejected


def augment(storage: Storage, dataset: S3Url, args) -> dict:
    index = read_index(storage, dataset)
    by_name = {c["name"]: i for i, c in enumerate(index["classes"])}
    by_id = {c["id"]: i for i, c in enumerate(index["classes"])}
    if args.classes:
        wanted = [c.strip() for c in args.classes.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in by_name and c not in by_id]
        if unknown:
            raise AugmentError(f"--classes {', '.join(unknown)}: not in the dataset (names or ids from index.json)")
        labels = sorted({by_name.get(c, by_id.get(c)) for c in wanted})
    else:
        labels = list(range(len(index["classes"])))
    relevance = (
        RelevanceCheck(storage, args.relevance, [c["name"] for c in index["classes"]], args.relevance_top_k)
        if args.relevance
        else None
    )

    for i in labels:  # each class's downloads go into a directory named by its id
        safe_name(index["classes"][i]["id"], f"{dataset}/index.json names class id")
    known = load_known(storage, dataset, index, args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="petal-augment-") as workdir:
        downloads = search_and_download([index["classes"][i] for i in labels], args, Path(workdir))
        short_side = stored_short_side(index, args.split)
        kept, report, rejected = vet(downloads, labels, index, known, relevance, args, short_side)
    existing = index["splits"].get(args.split, {"samples": 0, "shards": []})

    new_shards = []
    if kept:
        count = shard_count(sum(len(s.image) for s in kept), len(kept), args.min_shards, 64 << 20)
        first = len(existing["shards"])
        for number in tqdm(range(count), desc=f"uploading {args.split}", unit="shard"):
            chunk = kept[len(kept) * number // count : len(kept) * (number + 1) // count]
            data = build_shard(chunk)
            entry = shard_entry(args.split, first + number, data, len(chunk))
            storage.write_bytes(dataset.join(entry["name"]), data, "application/x-tar")
            new_shards.append(entry)
        index["splits"][args.split] = {
            "samples": existing["samples"] + len(kept),
            "shards": existing["shards"] + new_shards,
            # The split's promise to the trainer (no view larger than it): only where all of it keeps it.
            **({"short_side": short_side} if not existing["samples"] or "short_side" in existing else {}),
        }
        write_index(storage, dataset, index)  # only now does the dataset show the new samples

    summary = {
        "event": "augmented",
        "dataset": str(dataset),
        "split": args.split,
        "kept": len(kept),
        "rejected": len(rejected),
        "classes": report,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    storage.write_bytes(
        dataset.join(f"reports/augment-{stamp}.json"),
        json.dumps(summary | {"rejections": rejected}, indent=1).encode(),
        "application/json",
    )
    return summary


def print_report(summary: dict) -> None:
    reasons = sorted({r for counts in summary["classes"].values() for r in counts} - {"downloaded", "kept"})
    header = ["class", "downloaded", "kept", *reasons]
    rows = [[name, *(str(c.get(h, 0)) for h in header[1:])] for name, c in summary["classes"].items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)), file=sys.stderr)


def network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a network like 10.1.0.0/16 or 192.0.2.7") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("dataset", help="s3://BUCKET/PREFIX of a petal dataset")
    parser.add_argument("--classes", help="comma-separated class names or ids (default: every class)")
    parser.add_argument("--suffix", default="", help='added to each search, e.g. "flower"')
    parser.add_argument("--limit", type=int, default=100, help="images per class (over 100 needs --chromedriver)")
    parser.add_argument("--chromedriver", help="path to chromedriver, e.g. /usr/bin/chromedriver")
    parser.add_argument("--split", default="augment", help="the split the kept images are added to")
    parser.add_argument("--min-side", type=int, default=64, help="shorter side in pixels, at least")
    parser.add_argument("--max-bytes", type=int, default=20 << 20, help="larger downloads are refused (too-large)")
    parser.add_argument("--download-seconds", type=float, default=60,
                        help="each download, redirects included, is given up after this long (too-slow)")  # fmt: skip
    parser.add_argument("--allow-network", action="append", default=[], type=network, metavar="CIDR",
                        help="also download from this private network (a mirror of yours; repeatable); by default "
                             "only public addresses are fetched: never loopback, link-local (the cloud metadata "
                             "service), private or multicast ones (private-address)")  # fmt: skip
    parser.add_argument("--max-aspect", type=float, default=3.0, help="longer side / shorter side, at most")
    parser.add_argument("--near-distance", type=int, default=6, help="perceptual-hash Hamming distance")
    parser.add_argument("--relevance", metavar="CHECKPOINT", help="petal checkpoint (path or s3://) to vet relevance")
    parser.add_argument("--relevance-top-k", type=int, default=5)
    parser.add_argument("--min-shards", type=int, default=4)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "petal-cache")
    args = parser.parse_args(argv)
    try:
        problems = [
            (args.limit < 1, f"--limit {args.limit} must be at least 1"),
            (args.limit > 100 and not args.chromedriver, f"--limit {args.limit} above 100 needs --chromedriver"),
            (args.max_aspect < 1, f"--max-aspect {args.max_aspect} must be at least 1"),
            (args.max_bytes < 1, f"--max-bytes {args.max_bytes} must be at least 1"),
            (not args.download_seconds > 0, f"--download-seconds {args.download_seconds} must be above 0"),
            (args.split in ("train", "valid", "test"), f"--split {args.split} would change an original split"),
        ]
        for bad, message in problems:
            if bad:
                raise AugmentError(message)
        summary = augment(Storage.from_env(), parse_url(args.dataset), args)
    except (AugmentError, DatasetError, StorageError, ValueError) as err:
        print(f"augment_dataset: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (AugmentError, DatasetError, ValueError)) else 1
    print_report(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
