"""scripts/upload_dataset.py against a real MinIO: layouts, rejects, re-runs, interruptions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from support import BUCKET, ROOT, FaultyProxy, Watched, run_script, s3

from training.shards import fetch_shard, read_index, read_shard_table
from training.storage import parse_url


def uploaded(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def labels_by_source(storage, dataset: str, split: str, cache) -> dict[str, int]:
    """source path → label, read back from the stored shards."""
    url = parse_url(dataset)
    shards = read_index(storage, url)["splits"][split]["shards"]
    refs = [ref for shard in shards for ref in read_shard_table(fetch_shard(storage, url, shard, cache))]
    assert len(refs) == sum(s["samples"] for s in shards)
    return {ref.source: ref.label for ref in refs}


def test_seed_layout_with_broken_images_is_uploaded_without_them(s3_env, storage, synthetic_dir, tmp_path):
    src = tmp_path / "flower_data"
    shutil.copytree(synthetic_dir, src)
    (src / "train" / "2" / "truncated.jpg").write_bytes((src / "train" / "2" / "square_00000.jpg").read_bytes()[:300])
    (src / "valid" / "1" / "page.jpg").write_text("<html>not an image</html>")
    (src / "train" / "1" / "notes.txt").write_text("not an image, not reported either")

    summary = uploaded(run_script(s3_env, "upload_dataset.py", str(src), s3("datasets/seed-layout")))
    assert summary["splits"] == {"train": 200, "valid": 100, "test": 100}
    assert summary["classes"] == 5 and summary["rejected"] == 2
    index = read_index(storage, parse_url(s3("datasets/seed-layout")))
    assert [c["name"] for c in index["classes"]][:2] == ["red circle", "blue square"]
    assert all(s["samples"] == sum(x["samples"] for x in s["shards"]) for s in index["splits"].values())

    labels = labels_by_source(storage, s3("datasets/seed-layout"), "train", tmp_path / "cache")
    assert labels["train/3/triangle_00007.jpg"] == 2 and "train/2/truncated.jpg" not in labels


def test_broken_images_are_reported_by_path(s3_env, synthetic_dir, tmp_path):
    src = tmp_path / "data"
    shutil.copytree(synthetic_dir, src)
    (src / "valid" / "4" / "empty.jpg").write_bytes(b"")
    result = run_script(s3_env, "upload_dataset.py", str(src), s3("datasets/reported"))
    assert uploaded(result)["rejected"] == 1
    assert str(src / "valid" / "4" / "empty.jpg") in result.stderr


def test_a_rerun_uploads_nothing_already_there(s3_env, synthetic_dir):
    first = uploaded(run_script(s3_env, "upload_dataset.py", str(synthetic_dir), s3("datasets/rerun")))
    again = uploaded(run_script(s3_env, "upload_dataset.py", str(synthetic_dir), s3("datasets/rerun")))
    assert first["shards_uploaded"] == 48 and again["shards_uploaded"] == 0 and again["shards_already_there"] == 48


def test_torchvision_flowers102_files_keep_their_official_splits(s3_env, storage, tmp_path):
    root = tmp_path / "flowers-102"
    (root / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.array([1 + i % 3 for i in range(12)])  # 12 images, classes 1..3
    for i in range(1, 13):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / "jpg" / f"image_{i:05d}.jpg")
    savemat(root / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(
        root / "setid.mat",
        {
            "trnid": np.array([[1, 2, 3, 4, 5, 6]]),
            "valid": np.array([[7, 8, 9]]),
            "tstid": np.array([[10, 11, 12]]),
        },
    )
    (tmp_path / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "2": "globe thistle"}))

    summary = uploaded(run_script(s3_env, "upload_dataset.py", str(tmp_path), s3("datasets/f102")))
    assert summary["layout"] == "flowers-102" and summary["splits"] == {"train": 6, "valid": 3, "test": 3}
    index = read_index(storage, parse_url(s3("datasets/f102")))
    assert [c["name"] for c in index["classes"]] == ["pink primrose", "globe thistle", "3"]
    found = labels_by_source(storage, s3("datasets/f102"), "valid", tmp_path / "cache")
    assert found == {f"flowers-102/jpg/image_{i:05d}.jpg": int(labels[i - 1]) - 1 for i in (7, 8, 9)}


def test_an_imagefolder_tree_gets_a_stable_validation_split(s3_env, synthetic_dir, tmp_path):
    src = tmp_path / "folder"
    shutil.copytree(synthetic_dir / "train", src)
    first = uploaded(
        run_script(s3_env, "upload_dataset.py", str(src), s3("datasets/folder"), "--valid-fraction", "0.25")
    )
    assert first["layout"] == "imagefolder" and sum(first["splits"].values()) == 200
    assert 30 <= first["splits"]["valid"] <= 70
    again = uploaded(
        run_script(s3_env, "upload_dataset.py", str(src), s3("datasets/folder"), "--valid-fraction", "0.25")
    )
    assert again["splits"] == first["splits"] and again["shards_uploaded"] == 0


def test_an_interrupted_upload_leaves_no_index_and_a_rerun_completes_it(minio, s3_env, storage, synthetic_dir):
    proxy = FaultyProxy(minio.port, f"PUT /{BUCKET}/datasets/interrupted/shards/valid-".encode())
    argv = [
        sys.executable,
        str(ROOT / "scripts" / "upload_dataset.py"),
        str(synthetic_dir),
        s3("datasets/interrupted"),
    ]
    proc = Watched(argv, s3_env | {"S3_ENDPOINT_URL": proxy.endpoint})
    assert proxy.matched.wait(120), "\n".join(proc.stderr[-10:])
    os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.wait(30)
    proxy.close()
    dataset = parse_url(s3("datasets/interrupted"))
    assert not storage.exists(dataset.join("index.json"))
    stored = sorted(str(u).rsplit("/", 1)[1] for u in storage.list(dataset.join("shards")))
    assert len(stored) == 16 and all(n.startswith("train-") for n in stored), stored

    summary = uploaded(run_script(s3_env, "upload_dataset.py", str(synthetic_dir), s3("datasets/interrupted")))
    assert summary["shards_already_there"] == 16 and summary["shards_uploaded"] == 32
    assert read_index(storage, dataset)["splits"]["valid"]["samples"] == 100


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["{src}", "/tmp/not-s3"], "'/tmp/not-s3' is not an object-storage URL"),
        (["{src}", f"s3://{BUCKET}"], "names no prefix"),
        (["/no/such/dir", s3("x")], "/no/such/dir is not a directory"),
        (
            ["{src}", s3("x"), "--valid-fraction", "1.5"],
            "--valid-fraction 1.5 must be between 0 and 1",
        ),
    ],
)
def test_bad_arguments_get_one_line_and_write_nothing(s3_env, storage, synthetic_dir, args, expected):
    result = run_script(s3_env, "upload_dataset.py", *[a.format(src=synthetic_dir) for a in args])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and expected in result.stderr
    assert not storage.exists(parse_url(s3("x/index.json")))


def test_every_image_is_stored_as_a_jpeg_nvjpeg_reads_and_shards_are_sized_by_what_they_hold(s3_env, storage,
                                                                                             tmp_path):  # fmt: skip
    """PNG, WebP, TIFF and CMYK JPEG become RGB JPEGs (--decode gpu decodes a batch at once), a small plain
    JPEG stays byte for byte; 10 noisy 1 MB originals stored at 256 px fill one 1 MB shard, not eleven."""
    import torchvision

    rng = np.random.default_rng(3)
    src = tmp_path / "mixed" / "train"  # the seed layout: every image trains
    for label, (name, fmt, mode, size) in enumerate([("a.png", "PNG", "RGBA", (300, 200)), ("b.webp", "WEBP", "RGB",
            (200, 300)), ("c.tiff", "TIFF", "RGB", (120, 90)), ("d.jpg", "JPEG", "CMYK", (100, 100)),
            ("e.jpg", "JPEG", "RGB", (90, 120))]):  # fmt: skip
        (src / str(label % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(
            src / str(label % 2) / name, fmt
        )
    for n in range(10):  # ~1 MB each as PNG
        noise = rng.integers(0, 255, (600, 600, 3), dtype=np.uint8)
        Image.fromarray(noise).save(src / str(n % 2) / f"noise-{n:02d}.png", "PNG")
    originals = {str(p.relative_to(src.parent)): p.read_bytes() for p in src.rglob("*.*")}
    assert sum(len(b) for b in originals.values()) > 10 << 20

    result = run_script(s3_env, "upload_dataset.py", str(src.parent), s3("datasets/mixed"), "--min-shards", "1",
                        "--max-shard-mb", "1")  # fmt: skip
    summary = uploaded(result)
    url = parse_url(s3("datasets/mixed"))
    shards = read_index(storage, url)["splits"]["train"]["shards"]
    assert summary["splits"]["train"] == 15 and len(shards) == 1, shards
    refs = [ref for shard in shards for ref in read_shard_table(fetch_shard(storage, url, shard, tmp_path / "c"))]
    for ref in refs:
        data = ref.shard.read_bytes()[ref.offset : ref.offset + ref.size]
        pixels = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # nvJPEG's format
        assert pixels.shape[0] == 3 and min(pixels.shape[1:]) <= 256, ref.source
        if ref.source.endswith("e.jpg"):
            assert data == originals[ref.source]  # a plain small JPEG is stored as it is
