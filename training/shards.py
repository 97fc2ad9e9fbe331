"""petal's dataset format: tar shards plus one `index.json`, under one s3:// prefix. No torch here.

    s3://BUCKET/PREFIX/index.json
    s3://BUCKET/PREFIX/shards/<split>-<nnnnn>-<sha256[:12]>.tar

Each shard holds, per sample, `<key>.<ext>` (the image bytes as they came: jpg, png, ...) and
`<key>.json` (`{"label": <class index>, "source": <where it came from>}`), WebDataset-style.
Shard names carry their content hash, so a new version of a dataset never overwrites a shard an
older index still names, and the index — written last — switches versions in one atomic put.

index.json:

    {"format": "petal-shards/1",
     "classes": [{"id": "1", "name": "pink primrose"}, ...],     # label i is classes[i]
     "splits": {"train": {"samples": 1020,
                          "shards": [{"name": "shards/train-00000-0123456789ab.tar",
                                      "samples": 64, "bytes": 2621440, "sha256": "..."}, ...]},
                "valid": {...}}}
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from training.storage import S3Url, Storage, StorageError, sha256_file

FORMAT = "petal-shards/1"
INDEX_NAME = "index.json"


class DatasetError(Exception):
    """The dataset is missing, malformed, or lacks what was asked of it (storage itself answered)."""


# What the tools store at: 256 keeps the margin the eval view (resize to 224, centre-crop) and a 20 degree
# rotation use.
DEFAULT_SHORT_SIDE = 256
STORED_QUALITY = 93


def stored_image(data: bytes, short_side: int) -> tuple[bytes, str] | None:
    """The bytes to store for one image file and their extension, from one decode; None where it does
    not decode completely. With a `short_side`, every image is stored as an RGB JPEG that nvJPEG reads
    (--decode gpu decodes a batch in one call; a PNG, WebP, TIFF or CMYK JPEG would send it to PIL
    one image at a time), re-encoded at that short side when larger: training crops --image-size
    pixels (224) from an image scaled to that short side anyway. A plain JPEG small enough is stored
    as it is. Without (0), files are stored as they are. The same input always gives the same bytes,
    so a re-run still finds its shards stored."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt = {"JPEG": "jpg", "MPO": "jpg"}.get(image.format, (image.format or "").lower())
            if not fmt:
                return None
            if not short_side:
                return data, fmt
            small = min(image.size) <= short_side
            if small and fmt == "jpg" and image.mode in ("RGB", "L"):
                return data, fmt
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    if not small:
        scale = short_side / min(rgb.size)
        rgb = rgb.resize(
            (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.LANCZOS
        )
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=STORED_QUALITY)
    return buffer.getvalue(), "jpg"


@dataclass(frozen=True)
class Sample:
    """One image on its way into a shard."""

    key: str
    image: bytes
    ext: str
    label: int
    source: str


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's image lies inside a local shard file."""

    key: str
    label: int
    source: str
    shard: Path
    offset: int
    size: int


def safe_name(name, what: str) -> str:
    """A name read from storage (a shard's name, a tar member, an object key's last part), as a relative
    path that stays inside the directory it is joined to: anything absolute, with a drive, a `..`
    component, a backslash or a NUL is a DatasetError naming it, before it touches the file system."""
    if (not isinstance(name, str) or not name.strip("/.") or "\0" in name or "\\" in name
            or PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive
            or ".." in PurePosixPath(name).parts):  # fmt: skip
        raise DatasetError(f"{what} {name!r} is not a relative name inside its directory (no absolute path, "
                           "drive, '..', backslash or NUL)")  # fmt: skip
    return name


def read_index(storage: Storage, dataset: S3Url) -> dict:
    """The dataset's index, checked for what petal reads of it: a DatasetError names what is wrong."""
    url = dataset.join(INDEX_NAME)
    try:
        index = json.loads(storage.read_bytes(url))
    except StorageError as err:
        if err.code != "NoSuchKey":
            raise
        raise DatasetError(
            f"no dataset at {dataset}: {url} does not exist (upload one with scripts/upload_dataset.py)"
        ) from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise DatasetError(f"{url} is not JSON ({err})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise DatasetError(f"{url} has format {found!r}; this petal reads {FORMAT!r}")
    check_index(index, str(url))
    return index


def check_index(index: dict, where: str) -> None:
    """Every key petal reads, of the type it reads it as: the first one missing or wrong is named."""

    def need(value, kind, path: str):
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise DatasetError(f"{where}: {path} is missing or not {KIND_NAMES[kind]}")
        return value

    classes = need(index.get("classes"), list, "classes")
    for i, cls in enumerate(classes):
        need(need(cls, dict, f"classes[{i}]").get("name"), str, f"classes[{i}].name")
        need(cls.get("id"), str, f"classes[{i}].id")
    for split, info in need(index.get("splits"), dict, "splits").items():
        need(need(info, dict, f"splits.{split}").get("samples"), int, f"splits.{split}.samples")
        for i, shard in enumerate(need(info.get("shards"), list, f"splits.{split}.shards")):
            path = f"splits.{split}.shards[{i}]"
            need(shard, dict, path)
            safe_name(need(shard.get("name"), str, f"{path}.name"), f"{where} names shard")
            for key, kind in (("samples", int), ("bytes", int), ("sha256", str)):
                need(shard.get(key), kind, f"{path}.{key}")


KIND_NAMES = {list: "a list", dict: "an object", str: "a string", int: "a whole number", bool: "true or false"}


def write_index(storage: Storage, dataset: S3Url, index: dict) -> None:
    payload = json.dumps(index, indent=1, sort_keys=True).encode()
    storage.write_bytes(dataset.join(INDEX_NAME), payload, content_type="application/json")


def split_names(index: dict, wanted: Iterable[str]) -> list[str]:
    names = list(wanted)
    missing = [n for n in names if n not in index["splits"]]
    if missing:
        raise DatasetError(f"split(s) {', '.join(missing)} not in the dataset; it has {', '.join(index['splits'])}")
    return names


def shard_count(total_bytes: int, samples: int, min_shards: int, max_shard_bytes: int) -> int:
    """Enough shards for many ranks x DataLoader workers, none larger than `max_shard_bytes`."""
    return max(1, min(samples, max(min_shards, math.ceil(total_bytes / max_shard_bytes))))


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata makes a shard's bytes, and so its name, a function of its samples alone.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def build_shard(samples: Sequence[Sample]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            _tar_member(tar, f"{s.key}.{s.ext}", s.image)
            _tar_member(tar, f"{s.key}.json", json.dumps({"label": s.label, "source": s.source}).encode())
    return buffer.getvalue()


def shard_entry(split: str, number: int, data: bytes, samples: int) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    return {
        "name": f"shards/{split}-{number:05d}-{digest[:12]}.tar",
        "samples": samples,
        "bytes": len(data),
        "sha256": digest,
    }


def shard_path(dataset: S3Url, shard: dict, cache_dir: Path) -> Path:
    """Where a shard's local copy lives in a cache directory (its name checked: it comes from storage)."""
    return cache_dir / dataset.bucket / dataset.key / safe_name(shard["name"], f"{dataset}/{INDEX_NAME} names shard")


def fetch_shard(storage: Storage, dataset: S3Url, shard: dict, cache_dir: Path) -> Path:
    """The shard as a verified local file, downloaded only when the cache lacks a good copy."""
    path = shard_path(dataset, shard, cache_dir)
    if path.exists() and path.stat().st_size == shard["bytes"] and sha256_file(path) == shard["sha256"]:
        return path
    storage.download(dataset.join(shard["name"]), path)
    actual = sha256_file(path)
    if actual != shard["sha256"]:
        path.unlink()
        raise DatasetError(
            f"{dataset.join(shard['name'])} has sha256 {actual[:12]}…, the index says {shard['sha256'][:12]}…"
        )
    return path


def read_shard_table(path: Path, classes: int | None = None, what: str | None = None) -> list[SampleRef]:
    """The samples of a local shard, in stored order, with the byte range of each image; a shard that
    is not what upload_dataset.py writes (an image without its .json or the reverse, a label outside
    the `classes`, a member that is not a plain file or has an unsafe name) is a DatasetError naming
    the shard (`what`, default its path) and the sample."""
    what = what or str(path)
    images: dict[str, tarfile.TarInfo] = {}
    meta: dict[str, dict] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                safe_name(member.name, f"{what} has a member named")
                if not member.isfile():
                    raise DatasetError(f"{what}: member {member.name!r} is not a plain file")
                key, _, ext = member.name.rpartition(".")
                if ext == "json":
                    meta[key] = json.loads(tar.extractfile(member).read())
                else:
                    images[key] = member
    except (tarfile.TarError, ValueError) as err:  # not a tar; a .json that is not JSON
        raise DatasetError(f"{what} is not a petal shard ({type(err).__name__}: {err})") from None
    for key in sorted(images.keys() ^ meta.keys()):
        raise DatasetError(f"{what}: sample {key!r} has " + ("an image but no .json" if key in images
                                                              else "a .json but no image"))  # fmt: skip
    refs = []
    for key, member in images.items():
        label = meta[key].get("label") if isinstance(meta[key], dict) else None
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < (classes or label + 1):
            limit = f", outside the {classes} classes" if classes is not None and isinstance(label, int) else ""
            raise DatasetError(f"{what}: sample {key!r} has label {label!r}{limit}")
        refs.append(SampleRef(key, label, str(meta[key].get("source", "")), path, member.offset_data, member.size))
    return refs


def read_image_bytes(ref: SampleRef) -> bytes:
    with open(ref.shard, "rb") as f:
        f.seek(ref.offset)
        return f.read(ref.size)
