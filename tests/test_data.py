"""How an epoch is cut across ranks: exactly once, disjoint, reproducible, cached and verified."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest
from support import BUCKET, ROOT, launcher

from training.data import SplitStream, continue_epoch, epoch_assignment
from training.shards import DatasetError, fetch_shard, read_index, read_shard_table
from training.storage import parse_url


def all_keys(storage, dataset: str, split: str, cache_dir) -> list[str]:
    url = parse_url(dataset)
    index = read_index(storage, url)
    return [
        ref.key
        for shard in index["splits"][split]["shards"]
        for ref in read_shard_table(fetch_shard(storage, url, shard, cache_dir))
    ]


def epoch_keys(s3_env, dataset: str, nproc: int, cache_dir, out_dir) -> list[dict]:
    out_dir.mkdir()
    argv = launcher(nproc, str(ROOT / "tests" / "epoch_keys.py"), dataset, str(cache_dir), str(out_dir))
    result = subprocess.run(argv, cwd=ROOT, env=s3_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("nproc", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_every_sample_is_seen_exactly_once_per_epoch_across_ranks(nproc, s3_env, storage, synthetic_dataset, tmp_path):
    expected = all_keys(storage, synthetic_dataset, "train", tmp_path / "verify")
    assert len(expected) == 200
    first = epoch_keys(s3_env, synthetic_dataset, nproc, tmp_path / "cache", tmp_path / "run1")
    for epoch in ("1", "2"):
        per_rank = [ranks[epoch] for ranks in first]
        union = Counter(key for keys in per_rank for key in keys)
        assert set(union) == set(expected) and max(union.values()) == 1, f"epoch {epoch}: duplicates or gaps"
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    assert [r["1"] for r in first] != [r["2"] for r in first], "the order should change with the epoch"

    again = epoch_keys(s3_env, synthetic_dataset, nproc, tmp_path / "cache", tmp_path / "run2")
    assert again == first, "the order is a function of (seed, epoch)"


@pytest.mark.parametrize("counts", [[5, 5, 5], [7, 1, 3, 9], [1], [2, 2]])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_shares_partition_the_epoch(counts, world_size):
    for shuffle in (False, True):
        ranks = epoch_assignment(counts, seed=3, epoch=2, world_size=world_size, shuffle=shuffle)
        assert sorted(n for ids in ranks for n in ids) == list(range(sum(counts)))
        assert max(map(len, ranks)) - min(map(len, ranks)) <= 1


def test_a_corrupted_cached_shard_is_fetched_again_and_a_bad_download_refused(storage, synthetic_dataset, tmp_path):
    url = parse_url(synthetic_dataset)
    shard = read_index(storage, url)["splits"]["train"]["shards"][0]
    path = fetch_shard(storage, url, shard, tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert fetch_shard(storage, url, shard, tmp_path).read_bytes() == good

    lying = shard | {"sha256": "0" * 64}
    with pytest.raises(DatasetError, match="has sha256"):
        fetch_shard(storage, url, lying, tmp_path / "other")
    assert not list((tmp_path / "other").rglob("*.tar")), "a shard that fails its checksum must not stay cached"


def test_storage_used_in_forked_dataloader_workers_returns_each_object_whole(storage):
    from torch.utils.data import DataLoader, Dataset

    from training.storage import S3Url

    objects = {S3Url(BUCKET, f"fork-test/{i}.bin"): bytes([i]) * (200_000 + i) for i in range(120)}
    storage.ensure_bucket(next(iter(objects)))
    for url, data in objects.items():
        storage.write_bytes(url, data)
    urls = list(objects)

    class Objects(Dataset):
        def __len__(self):
            return len(urls)

        def __getitem__(self, i):
            return storage.read_bytes(urls[i]) == objects[urls[i]]

    for _ in range(3):  # sharing a socket garbles responses only when requests overlap: give them chances
        storage.read_bytes(urls[0])  # the parent's pool now holds a live connection the workers inherit
        intact = [ok for batch in DataLoader(Objects(), batch_size=4, num_workers=4) for ok in batch.tolist()]
        assert intact == [True] * len(urls)


@pytest.mark.parametrize(
    "stretches",
    [
        [(2, 4, 3)],  # 2 ranks, batch 4, 3 steps done; resumed on 2
        [(2, 4, 3), (3, 2, 5)],  # … then 5 steps on 3 ranks at batch 2; resumed on 2
        [(3, 5, 1), (1, 7, 4), (4, 3, 2)],
        [(2, 4, 0)],
    ],
)
@pytest.mark.parametrize("resumed_on", [1, 2, 3, 5])
def test_a_resume_trains_each_sample_of_the_interrupted_epoch_exactly_once(stretches, resumed_on):
    sizes = [13, 7, 20, 9]
    done = [{"world_size": w, "batch_size": b, "steps": s} for w, b, s in stretches]
    first = epoch_assignment(sizes, seed=1, epoch=3, world_size=done[0]["world_size"], shuffle=True)
    trained = []
    for i in range(len(done)):
        ranks = continue_epoch(first, done[:i], done[i]["world_size"])
        trained += [n for ids in ranks for n in ids[: done[i]["steps"] * done[i]["batch_size"]]]
    left = continue_epoch(first, done, resumed_on)
    assert len(left) == resumed_on and max(map(len, left)) - min(map(len, left)) <= 1
    assert sorted(trained + [n for ids in left for n in ids]) == list(range(sum(sizes)))
    if done[-1]["world_size"] == resumed_on:  # the same ranks: each goes on exactly where it stopped
        before = continue_epoch(first, done[:-1], resumed_on)
        skipped = done[-1]["steps"] * done[-1]["batch_size"]
        assert left == [ids[skipped:] for ids in before]


def encoded_image(image, fmt: str) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_batches_decoded_by_the_gpu_path_are_the_views_of_their_samples():
    """--decode gpu's batch pipeline, run on the CPU device (nvJPEG itself needs a GPU): a batch is one
    buffer; JPEGs decoded in one call, anything else one by one; the eval view equals the CPU path's
    up to resampling."""
    import torch
    from PIL import Image

    from training.views import DecodeOnGpu, decode_image, encoded_batch, normalize, pixels, view

    blobs = [encoded_image(Image.new("RGB", (300, 240), (200, 30, 30)), "JPEG"),
             encoded_image(Image.new("RGB", (300, 240), (30, 200, 30)), "PNG")]  # fmt: skip
    batch = encoded_batch([(b, i, f"key{i}", 3) for i, b in enumerate(blobs)])
    (buffer, ends), *_ = batch
    assert buffer.dtype == torch.uint8 and buffer.numel() == sum(map(len, blobs)) and ends.tolist()[-1] == len(buffer)
    ((images, labels, keys),) = list(DecodeOnGpu([batch], 64, torch.device("cpu"), seed=0, augment=False))
    assert images.shape == (2, 3, 64, 64) and labels.tolist() == [0, 1] and keys == ["key0", "key1"]
    on_cpu = normalize(torch.stack([pixels(view(decode_image(b), 64, None)) for b in blobs]))
    torch.testing.assert_close(images, on_cpu, atol=0.05, rtol=0)  # flat colours: resamplers agree
    augmented = list(DecodeOnGpu([batch], 64, torch.device("cpu"), seed=0, augment=True))[0][0]
    again = list(DecodeOnGpu([batch], 64, torch.device("cpu"), seed=0, augment=True))[0][0]
    assert torch.equal(augmented, again), "augmentation is drawn per (seed, epoch, sample)"
    next_epoch = encoded_batch([(b, i, f"key{i}", 4) for i, b in enumerate(blobs)])
    other = list(DecodeOnGpu([next_epoch], 64, torch.device("cpu"), seed=0, augment=True))[0][0]
    assert not torch.equal(augmented, other), "another epoch draws other rotations"


def test_the_gpu_path_makes_the_cpu_paths_training_view_of_an_asymmetric_image():
    """The same (seed, epoch, key) through both paths — PIL in a DataLoader worker, torchvision on a
    decoded tensor (on the CPU device here) — gives the same rotated, cropped view; the opposite
    rotation, or none, would be far from it."""
    import numpy as np
    import torch
    from PIL import Image

    from training.views import DecodeOnGpu, decode_image, encoded_batch, normalize, pixels, rotation, view

    y, x = np.mgrid[0:240, 0:360]
    asymmetric = np.stack([x * 255 // 360, y * 255 // 240, ((x > 250) & (y < 80)) * 255], axis=-1).astype(np.uint8)
    jpeg = encoded_image(Image.fromarray(asymmetric), "JPEG")
    angle = rotation(5, 2, "key0")
    assert abs(angle) > 5, "a rotation worth telling apart"
    ((gpu_path, _, _),) = list(DecodeOnGpu([encoded_batch([(jpeg, 0, "key0", 2)])], 64, torch.device("cpu"),
                                           seed=5, augment=True))  # fmt: skip

    def cpu_path(angle):
        return normalize(pixels(view(decode_image(jpeg, 64), 64, angle))[None])

    distance = (gpu_path - cpu_path(angle)).abs().mean()
    assert distance < 0.1, distance
    assert (gpu_path - cpu_path(-angle)).abs().mean() > 3 * distance
    assert (gpu_path - cpu_path(None)).abs().mean() > 3 * distance


def test_the_gpu_paths_training_views_are_made_together_and_their_geometry_crosses_over_once():
    """The training views of a batch are rotated and cropped in one grid_sample: pixel for pixel what
    `view` makes one image at a time (torchvision's F.rotate and F.center_crop), but with one copy to the
    device per batch where F.rotate makes each image's affine matrix on the host and copies it over.
    (On the CPU device; a TorchFunctionMode counts tensors made with a device and moves to one.)"""
    import torch
    from PIL import Image
    from torch.overrides import TorchFunctionMode

    from training.views import DecodeOnGpu, decode_image, encoded_batch, normalize, pixels, rotation, view, views

    sizes = [(240, 360), (300, 200), (97, 131), (64, 64), (500, 120)]
    images = [torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i, size in enumerate(sizes)]  # fmt: skip
    angles = [rotation(7, 1, f"key{i}") for i in range(len(images))]
    together = views(images, 48, angles)
    one_by_one = torch.stack([view(image, 48, angle) for image, angle in zip(images, angles, strict=True)])
    assert together.dtype == torch.uint8 and torch.equal(together, one_by_one)
    assert torch.equal(views(images, 48, None), torch.stack([view(image, 48, None) for image in images]))

    class Transfers(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "device" in kwargs or (func is torch.Tensor.to and any(isinstance(a, torch.device) for a in args)):
                self.count += 1
            return func(*args, **kwargs)

    def transfers(size: int) -> int:
        blobs = [encoded_image(Image.new("RGB", (90 + 7 * i, 60), (9 * i, 99, 199)), "JPEG") for i in range(size)]
        batch = encoded_batch([(blob, 0, f"key{i}", 1) for i, blob in enumerate(blobs)])
        with Transfers() as mode:
            ((made, _, _),) = DecodeOnGpu([batch], 32, torch.device("cpu"), seed=0, augment=True)
        first = pixels(view(decode_image(blobs[0]), 32, rotation(0, 1, "key0")))
        assert made.shape == (size, 3, 32, 32) and torch.equal(made[0], normalize(first[None])[0])
        return mode.count

    transfers(1)  # what is made once per device (the normalising constants, the crop's pixel steps)
    assert transfers(8) == transfers(1) <= 2


def test_the_gpu_path_decodes_ahead_on_a_side_stream_it_drains_first_and_never_takes_oom_for_a_format(monkeypatch):
    """nvJPEG writes on a stream of its own into memory allocated on the caller's, without waiting for it
    (vision#9606): each batch is decoded on a side stream that is drained first, one batch ahead of
    the model, and handed to the current stream by an event it waits on (the host does not) with its
    memory kept until the current stream is done with it. Running out of GPU memory is raised, not
    answered by decoding image by image. (torch.cuda patched: no GPU here; the decode runs on the CPU.)"""
    from contextlib import contextmanager

    import torch
    import torchvision.io
    from PIL import Image

    from training.views import DecodeOnGpu, encoded_batch

    calls = []

    class Stream:
        def __init__(self, name):
            self.name, self.events = name, 0

        def synchronize(self):
            calls.append(f"{self.name} drained")

        def record_event(self):
            self.events += 1
            calls.append(f"{self.name} event {self.events}")
            return self.events

        def wait_event(self, event):
            calls.append(f"{self.name} waits for event {event}")

    active = [Stream("current")]

    @contextmanager
    def on(stream):
        active.append(stream)
        yield
        active.pop()

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream("side"))
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: active[-1])
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: calls.append(f"kept for {stream.name}"))
    cpu_decode = torchvision.io.decode_jpeg

    def decode(blobs, mode, device):
        calls.append(f"decode on {device} in {active[-1].name}")
        return cpu_decode(blobs, mode=mode)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode)
    batch = encoded_batch([(encoded_image(Image.new("RGB", (80, 60), (9, 99, 199)), "JPEG"), 0, "k", 1)])
    batches = iter(DecodeOnGpu([batch, batch], 32, torch.device("cuda", 0), seed=0, augment=False))
    images, _, _ = next(batches)
    assert calls == ["side drained", "decode on cuda:0 in side", "side event 1",
                     "side drained", "decode on cuda:0 in side", "side event 2",
                     "current waits for event 1", "kept for current"]  # fmt: skip
    assert images.shape == (1, 3, 32, 32)
    calls.clear()
    assert next(batches)[0].shape == (1, 3, 32, 32) and calls == ["current waits for event 2", "kept for current"]

    def out_of_memory(blobs, mode, device):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        list(DecodeOnGpu([batch], 32, torch.device("cuda", 0), seed=0, augment=False))


def test_the_gpu_paths_batches_pass_through_dataloader_workers(storage, synthetic_dataset, tmp_path):
    """--decode gpu with 2 DataLoader workers (on the CPU device): each batch one buffer of bytes from a
    worker, decoded, viewed and normalised by the rank; every sample of the rank's share comes once."""
    import torch
    from torchvision.models import resnet18

    from training.data import ImageEpochs

    url = parse_url(synthetic_dataset)
    index = read_index(storage, url)
    train, val = (SplitStream(storage, url, index, [split], tmp_path) for split in ("train", "valid"))
    epochs = ImageEpochs(resnet18(num_classes=5), train, val, image_size=32, seed=0, rank=1, world_size=2,
                         batch_size=16, workers=2, device=torch.device("cpu"), decode_on_device=True)  # fmt: skip
    try:
        numbers = epochs.assignment(1, 2)[1]
        batches = list(epochs.train_loader(1, numbers))
    finally:
        epochs.close()
    assert sum(len(labels) for _, labels, _ in batches) == len(numbers) == 100
    assert all(images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32) for images, _, _ in batches)
    assert abs(float(torch.cat([images for images, _, _ in batches]).mean())) < 1.5  # normalised, not raw bytes


def test_views_leave_torchs_random_generators_alone(monkeypatch, storage, synthetic_dataset, tmp_path):
    """A view's rotation comes from an RNG of its own: torch's global generator (and, on a GPU machine,
    every GPU's) is neither drawn from nor reseeded by decoding a sample."""
    import torch

    from training.data import SplitSamples

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    url = parse_url(synthetic_dataset)
    stream = SplitStream(storage, url, read_index(storage, url), ["train"], tmp_path)
    stream.fetch(list(range(10)))
    samples = SplitSamples(stream, 32, seed=3, augment=True)
    before = torch.random.get_rng_state()
    first = [samples[(1, n)][0] for n in range(10)]
    assert torch.equal(torch.random.get_rng_state(), before) and not reseeded
    assert all(torch.equal(a, samples[(1, n)][0]) for n, a in enumerate(first))  # the same view every time
    assert any(not torch.equal(a, samples[(2, n)][0]) for n, a in enumerate(first))  # another epoch: others
