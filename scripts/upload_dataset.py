#!/usr/bin/env python3
"""Turns a local image dataset into petal's tar shards + index.json in object storage.

    python scripts/upload_dataset.py flower_data s3://petal/datasets/flowers102
    python scripts/upload_dataset.py ~/data/flowers-102 s3://petal/datasets/flowers102-official

Layouts it understands (class names from an optional SRC/cat_to_name.json, else the class ids):
  seed         SRC/{train,valid[,test]}/<class-id>/*.jpg
  flowers-102  SRC/jpg/*.jpg + SRC/imagelabels.mat + SRC/setid.mat (torchvision's Flowers102 files):
               its train / valid / test splits
  imagefolder  SRC/<class>/*.jpg: a deterministic --valid-fraction of each class becomes `valid`

Images whose shorter side is over --short-side (default 256) are stored re-encoded as JPEG at that
short side (what training at the default 224 px needs; decoding a 500 px original costs about four
times as much), and every image is stored as an RGB JPEG that nvJPEG reads (--decode gpu); the index
records the short side per split. --short-side 0 stores the files as they are. The local files are never changed.
Images that do not decode are reported (count and paths) and left out. Re-running uploads nothing
already stored (shard names carry their content hash); index.json is written last, so an
interrupted upload never leaves a dataset that looks complete. Storage settings come from the
environment (see training/storage.py). Last stdout line:
  {"event": "uploaded", "splits": {"train": N, ...}, "classes": K, "rejected": M, ...}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from training.shards import (
    DEFAULT_SHORT_SIDE,
    FORMAT,
    Sample,
    build_shard,
    shard_count,
    shard_entry,
    stored_image,
    write_index,
)
from training.storage import S3Url, Storage, StorageError, parse_url

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SEED_SPLITS = ("train", "valid", "test")


class DatasetError(Exception):
    pass


@dataclass(frozen=True)
class LocalImage:
    path: Path
    class_id: str


def natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def class_folders(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name))


def scan_folders(root: Path) -> list[LocalImage]:
    return [LocalImage(p, d.name) for d in class_folders(root) for p in images_in(d)]


def read_seed_layout(src: Path) -> dict[str, list[LocalImage]]:
    return {split: scan_folders(src / split) for split in SEED_SPLITS if (src / split).is_dir()}


def read_flowers102(src: Path) -> dict[str, list[LocalImage]]:
    from scipy.io import loadmat

    labels = loadmat(src / "imagelabels.mat")["labels"][0]
    setid = loadmat(src / "setid.mat")
    splits = {}
    for split, key in (("train", "trnid"), ("valid", "valid"), ("test", "tstid")):
        ids = sorted(int(i) for i in setid[key][0])
        splits[split] = [LocalImage(src / "jpg" / f"image_{i:05d}.jpg", str(int(labels[i - 1]))) for i in ids]
    return splits


def read_imagefolder(src: Path, valid_fraction: float) -> dict[str, list[LocalImage]]:
    def is_valid(image: LocalImage) -> bool:
        # A hash of the relative path, so the split does not move when other files come or go.
        digest = hashlib.sha256(str(image.path.relative_to(src)).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < valid_fraction

    images = scan_folders(src)
    return {"train": [i for i in images if not is_valid(i)], "valid": [i for i in images if is_valid(i)]}


def read_layout(src: Path, valid_fraction: float) -> tuple[str, dict[str, list[LocalImage]]]:
    if (src / "flowers-102").is_dir():  # torchvision's download root
        src = src / "flowers-102"
    if (src / "imagelabels.mat").is_file() and (src / "setid.mat").is_file() and (src / "jpg").is_dir():
        return "flowers-102", read_flowers102(src)
    if (src / "train").is_dir():
        return "seed", read_seed_layout(src)
    return "imagefolder", read_imagefolder(src, valid_fraction)


def class_names(src: Path, class_ids: list[str]) -> list[dict]:
    names_file = src / "cat_to_name.json"
    names = json.loads(names_file.read_text()) if names_file.is_file() else {}
    return [{"id": c, "name": names.get(c, c)} for c in class_ids]


def upload(
    src: Path,
    dest: S3Url,
    storage: Storage,
    *,
    valid_fraction: float,
    min_shards: int,
    max_shard_mb: int,
    short_side: int = 0,
) -> dict:
    if not src.is_dir():
        raise DatasetError(f"{src} is not a directory")
    layout, splits = read_layout(src, valid_fraction)
    class_ids = sorted({i.class_id for images in splits.values() for i in images}, key=natural_key)
    if not class_ids:
        raise DatasetError(
            f"no images found under {src} (expected {', '.join(SEED_SPLITS)}/<class>/*.jpg, "
            "Flowers-102's jpg/ + .mat files, or <class>/*.jpg)"
        )
    label_of = {c: i for i, c in enumerate(class_ids)}
    print(
        f"{src}: {layout} layout, {len(class_ids)} classes, " + ", ".join(f"{s} {len(v)}" for s, v in splits.items()),
        file=sys.stderr,
    )
    storage.ensure_bucket(dest)

    index = {"format": FORMAT, "classes": class_names(src, class_ids), "splits": {}}
    uploaded = skipped = 0
    rejected: list[str] = []
    for split, images in splits.items():
        # Each image decoded once, what is stored kept aside, so shards are sized by what they hold.
        with tempfile.TemporaryDirectory(prefix="petal-upload-") as spool, ThreadPoolExecutor(max_workers=8) as pool:
            ready = tqdm(pool.map(lambda i: stored_image(i.path.read_bytes(), short_side), images), total=len(images),
                         desc=f"preparing {split}", unit="img")  # fmt: skip
            good: list[tuple[LocalImage, Path, str]] = []
            for n, (image, result) in enumerate(zip(images, ready, strict=True)):
                if result is None:
                    rejected.append(str(image.path))
                    continue
                stored = Path(spool) / f"{n:08d}"
                stored.write_bytes(result[0])
                good.append((image, stored, result[1]))
            random.Random(f"petal/{split}").shuffle(good)  # mixes classes inside shards, the same every run
            total_bytes = sum(stored.stat().st_size for _, stored, _ in good)
            count = shard_count(total_bytes, len(good), min_shards, max_shard_mb << 20)
            entries = []
            for number in tqdm(range(count), desc=f"uploading {split}", unit="shard"):
                first, end = len(good) * number // count, len(good) * (number + 1) // count
                samples = [Sample(f"{split}-{first + j:06d}", stored.read_bytes(), fmt, label_of[image.class_id],
                                  str(image.path.relative_to(src)))
                           for j, (image, stored, fmt) in enumerate(good[first:end])]  # fmt: skip
                data = build_shard(samples)
                entry = shard_entry(split, number, data, len(samples))
                url = dest.join(entry["name"])
                if storage.size(url) == entry["bytes"]:
                    skipped += 1
                else:
                    storage.write_bytes(url, data, "application/x-tar")
                    uploaded += 1
                entries.append(entry)
        index["splits"][split] = {"samples": len(good), "shards": entries,
                                  **({"short_side": short_side} if short_side else {})}  # fmt: skip
    write_index(storage, dest, index)
    if rejected:
        print(f"rejected {len(rejected)} image(s) that do not decode:", *rejected, sep="\n  ", file=sys.stderr)
    return {
        "event": "uploaded",
        "dataset": str(dest),
        "layout": layout,
        "splits": {s: v["samples"] for s, v in index["splits"].items()},
        "classes": len(class_ids),
        "rejected": len(rejected),
        "shards_uploaded": uploaded,
        "shards_already_there": skipped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("src", type=Path, help="local dataset directory")
    parser.add_argument("dest", help="s3://BUCKET/PREFIX to write the dataset to (bucket created if missing)")
    parser.add_argument("--valid-fraction", type=float, default=0.2, help="imagefolder layout only")
    parser.add_argument(
        "--min-shards",
        type=int,
        default=16,
        help="per split, so that many ranks x DataLoader workers all get shards",
    )
    parser.add_argument("--max-shard-mb", type=int, default=64)
    parser.add_argument(
        "--short-side",
        type=int,
        default=DEFAULT_SHORT_SIDE,
        help="store images whose shorter side is larger re-encoded (JPEG) at this short side, which training "
        "at --image-size up to it needs no more of; 0 stores the files as they are (the originals are never changed)",
    )
    args = parser.parse_args(argv)
    try:
        if not 0 < args.valid_fraction < 1:
            raise DatasetError(f"--valid-fraction {args.valid_fraction} must be between 0 and 1")
        if args.min_shards < 1 or args.max_shard_mb < 1:
            raise DatasetError("--min-shards and --max-shard-mb must be at least 1")
        if args.short_side < 0:
            raise DatasetError(f"--short-side {args.short_side} must be 0 (as they are) or a size in pixels")
        dest = parse_url(args.dest)
        if not dest.key:
            raise DatasetError(f"{args.dest!r} names no prefix; expected s3://BUCKET/PREFIX")
        summary = upload(
            args.src,
            dest,
            Storage.from_env(),
            valid_fraction=args.valid_fraction,
            min_shards=args.min_shards,
            max_shard_mb=args.max_shard_mb,
            short_side=args.short_side,
        )
    except (DatasetError, StorageError, ValueError) as err:
        print(f"upload_dataset: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (DatasetError, ValueError)) else 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
