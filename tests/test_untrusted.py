"""What comes from storage is data, never a path or a promise: names in a dataset's index, its shards'
members, a run's objects; malformed datasets; checkpoints a cut-short write left behind. Each is one
line and an exit code, with nothing written anywhere it should not be."""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile

import pytest
from support import SMALL_TRAINING, Watched, s3

from training import artifacts, checkpoint
from training.shards import DatasetError, build_shard, read_index, read_shard_table, shard_entry, write_index
from training.storage import parse_url


def tar_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def dataset_with(storage, prefix: str, shard: bytes, name: str | None = None, classes: int = 2) -> str:
    """A dataset of one train and one valid shard (the same bytes), the shard stored under `name`."""
    url = parse_url(s3(prefix))
    entry = shard_entry("train", 0, shard, 1) | ({"name": name} if name else {})
    storage.write_bytes(url.join(entry["name"]), shard)
    index = {"format": "petal-shards/1", "classes": [{"id": str(i), "name": f"c{i}"} for i in range(classes)],
             "splits": {split: {"samples": 1, "shards": [entry]} for split in ("train", "valid")}}  # fmt: skip
    write_index(storage, url, index)
    return str(url)


def trainer_line(s3_env, dataset: str, output: str, cache) -> tuple[int, list[str]]:
    proc = Watched([sys.executable, "-m", "training", "--data", dataset, "--output", output, *SMALL_TRAINING,
                    "--epochs", "1", "--cache-dir", str(cache)], s3_env)  # fmt: skip
    return proc.wait(120), proc.stderr


@pytest.mark.parametrize("escape", ["../../../../../../outside/x.tar", "{tmp}/outside/x.tar"])
def test_a_shard_named_outside_the_cache_is_refused_and_nothing_written(escape, storage, s3_env, run_dir, tmp_path):
    name = escape.format(tmp=tmp_path)
    one = build_shard([])
    url = parse_url(s3("datasets/escaping"))
    entry = shard_entry("train", 0, one, 0) | {"name": name}
    if name.startswith("/"):  # the key an absolute name becomes once joined: it exists, its sha256 matches
        storage.write_bytes(url.join(name), one)
    write_index(storage, url, {"format": "petal-shards/1", "classes": [{"id": "1", "name": "a"}],
                               "splits": {"train": {"samples": 0, "shards": [entry]},
                                          "valid": {"samples": 0, "shards": [entry]}}})  # fmt: skip
    cache = tmp_path / "deep" / "er" / "cache"  # six levels below tmp_path with the bucket and the prefix
    code, stderr = trainer_line(s3_env, str(url), run_dir, cache)
    assert code == 3 and len(stderr) == 1, stderr
    assert f"names shard {name!r} is not a relative name inside its directory" in stderr[0]
    assert not (tmp_path / "outside").exists() and not cache.exists()


@pytest.mark.parametrize(
    ("members", "said"),
    [
        ({"a.jpg": b"x"}, "sample 'a' has an image but no .json"),
        ({"a.json": b'{"label": 0}'}, "sample 'a' has a .json but no image"),
        ({"a.jpg": b"x", "a.json": b'{"label": 7}'}, "sample 'a' has label 7, outside the 2 classes"),
        ({"a.jpg": b"x", "a.json": b"not json"}, "is not a petal shard (JSONDecodeError"),
        ({"../a.jpg": b"x", "../a.json": b'{"label": 0}'}, "has a member named '../a.jpg'"),
    ],
    ids=["image-alone", "json-alone", "label-outside", "json-garbled", "member-escaping"],
)
def test_a_malformed_shard_is_a_dataset_error_naming_it(members, said, storage, tmp_path):
    dataset = dataset_with(storage, f"datasets/malformed-{len(members)}-{abs(hash(said))}", tar_of(members))
    index = read_index(storage, parse_url(dataset))
    shard = index["splits"]["train"]["shards"][0]
    local = tmp_path / "shard.tar"
    storage.download(parse_url(dataset).join(shard["name"]), local)
    with pytest.raises(DatasetError, match=re.escape(f"{dataset}/{shard['name']}") + ".*" + re.escape(said)):
        read_shard_table(local, len(index["classes"]), f"{dataset}/{shard['name']}")


def test_the_trainer_meets_a_malformed_shard_with_exit_3_and_its_one_line(storage, s3_env, tmp_path):
    dataset = dataset_with(storage, "datasets/malformed-label", tar_of({"a.jpg": b"x", "a.json": b'{"label": 7}'}))
    code, stderr = trainer_line(s3_env, dataset, s3("runs/malformed-label"), tmp_path / "cache")
    assert code == 3 and stderr[-1].endswith("sample 'a' has label 7, outside the 2 classes (exit 3)"), stderr
    assert not any("Traceback" in line for line in stderr)  # met as the shard is read, in the rank itself


@pytest.mark.parametrize(
    ("index", "said"),
    [
        (b"{not json", "is not JSON"),
        (json.dumps({"format": "petal-shards/1", "splits": {}}).encode(), "classes is missing or not a list"),
        (
            json.dumps(
                {"format": "petal-shards/1", "classes": [], "splits": {"train": {"samples": 1, "shards": [{}]}}}
            ).encode(),
            "splits.train.shards[0].name is missing or not a string",
        ),  # fmt: skip
    ],
    ids=["not-json", "no-classes", "shard-without-name"],
)
def test_a_malformed_index_is_a_dataset_error_naming_what_is_wrong(index, said, storage):
    url = parse_url(s3(f"datasets/bad-index-{abs(hash(said))}"))
    storage.write_bytes(url.join("index.json"), index)
    with pytest.raises(DatasetError, match=re.escape(said)):
        read_index(storage, url)


def test_a_run_object_named_to_escape_is_not_collected(storage, tmp_path):
    out = parse_url(s3("runs/escaping-events"))
    storage.write_bytes(out.join("tensorboard", "events.out.tfevents.1"), b"fine")
    storage.write_bytes(out.join("tensorboard", "C:\\evil"), b"evil")  # a path on Windows
    with pytest.raises(DatasetError, match=r"tensorboard has an object named 'C:"):
        artifacts.collect_events(storage, out, tmp_path / "events")
    assert not (tmp_path / "events").exists()  # every name is checked before anything is written


def put(storage, output, name: str, data: bytes = b"x") -> None:
    storage.write_bytes(output.join(name), data)


def test_pruning_keeps_what_latest_names_and_clears_the_debris_of_cut_writes(storage):
    out = parse_url(s3("runs/pruning"))
    put(storage, out, "checkpoints/epoch-0009-step-000001.pt")  # a .pt whose .sha256 never came: debris
    put(storage, out, "checkpoints/epoch-0001.sha256")  # a .sha256 whose .pt is gone
    checkpoint.save(storage, out, {"epoch": 2}, checkpoint.checkpoint_name(1, 3), False, keep=2)
    checkpoint.save(storage, out, {"epoch": 2}, checkpoint.checkpoint_name(1), False, keep=2)
    checkpoint.save(storage, out, {"epoch": 3}, checkpoint.checkpoint_name(2), False, keep=1)
    left = sorted(u.key.rsplit("/", 1)[1] for u in storage.list(out.join("checkpoints")))
    assert left == ["epoch-0002.pt", "epoch-0002.sha256"], left
    assert json.loads(storage.read_bytes(out.join("latest")))["checkpoint"] == "checkpoints/epoch-0002.pt"


def test_the_pod_cache_keeps_only_the_checkpoint_it_resumes_from(storage, tmp_path):
    """A container restarted in place keeps its pod's cache: each resume's download replaces the last."""
    out = parse_url(s3("runs/cached-checkpoints"))
    cache = tmp_path / "checkpoints"
    for epoch in (1, 2):
        checkpoint.save(storage, out, {"epoch": epoch}, checkpoint.checkpoint_name(epoch), False, keep=3)
        chosen = checkpoint.choose(storage, out, cache, print)
        assert checkpoint.load(None, str(checkpoint.local_path(chosen, cache))) == {"epoch": epoch}
        assert [path.relative_to(cache) for path in cache.rglob("*.pt")] == [
            checkpoint.local_path(chosen, cache).relative_to(cache)
        ]


def test_a_run_with_results_and_no_intact_checkpoint_is_not_overwritten(storage, tmp_path):
    out = parse_url(s3("runs/unresumable"))
    put(storage, out, "metrics.jsonl", b'{"epoch": 1}\n')
    put(storage, out, "best.pt")
    put(storage, out, "checkpoints/epoch-0001.pt", b"torn")
    put(storage, out, "checkpoints/epoch-0001.sha256", b"0" * 64)

    def log(line: str) -> None:
        said.append(line)

    said: list[str] = []
    with pytest.raises(checkpoint.CheckpointError, match=r"holds a run \(best\.pt, metrics\.jsonl, 1 checkpoint"):
        checkpoint.choose(storage, out, tmp_path, log)
    assert checkpoint.choose(storage, out, tmp_path, log, overwrite_unresumable=True) is None
    assert "starting afresh" in said[-1]

    debris = parse_url(s3("runs/first-checkpoint-cut"))  # only a .pt whose .sha256 never came: a fresh run
    put(storage, debris, "checkpoints/epoch-0001-step-000005.pt")
    put(storage, debris, "progress.json", b"{}")
    assert checkpoint.choose(storage, debris, tmp_path, log) is None
