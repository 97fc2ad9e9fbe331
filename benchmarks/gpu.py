"""GPU throughput of petal's training step, prepared for one short run on a lent GPU machine that may
have only PyTorch (no minio, no repo install):

    PYTHONUNBUFFERED=1 python benchmarks/gpu.py --json $OUT/gpu.json
    python benchmarks/gpu.py --smoke --json out.json   # the same code paths on the CPU, tiny sizes

Sections, each on its own: a failing one (nvJPEG missing, out of memory) is recorded with its reason
and the others go on, and the JSON is rewritten after every section, so one failure never loses the
other figures. Without torchvision or PIL, the sections that need them are skipped with the reason.

- train_img_per_s: ResNet-50 and ResNet-152 training steps at 224 px on synthetic tensors in fp32
  (labelled tf32 where cuDNN runs fp32 convolutions in TF32, Ampere and later, its default), bf16
  autocast, bf16 + channels_last, and fp16 + GradScaler + channels_last (what --amp auto picks on
  T4/V100).
- fc_only: the --freeze fc step with and without the feature cache, and the 12-epoch speedup on
  Flowers-102 that implies.
- petal_pipeline: petal's own ImageEpochs and train_one_epoch under DDP on every local GPU, on JPEGs
  stored the way upload_dataset.py stores them, decoded by DataLoader workers (--decode cpu) and by
  nvJPEG (--decode gpu).
- checkpoint_stall: how long a --freeze none ResNet-152 + Adam checkpoint holds the loop, written in
  it (serialize, sha256, local disk) against checkpoint.Writer's copy into host memory (goal:
  ratios.stall_async_vs_sync <= 0.2, as `python -m benchmarks checkpoint` on MinIO), and the copy
  into pinned memory instead, first call and later ones.
- jpeg_decode_img_per_s: JPEG decode of one process: PIL and torchvision on the CPU, nvJPEG batches.

Anchor: NVIDIA's ResNet-50 reference trains ~2,470 img/s on one A100 with AMP (DeepLearningExamples).
Without CUDA it exits 2, unless --smoke.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

A100_RESNET50_AMP = 2470.0
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # petal's own modules, for the sections that run them (no repo install needed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step, batch: int, warmup: int, steps: int, device: torch.device) -> float:
    """Images per second of `step()` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - started)


def fp32_label(device: torch.device) -> str:
    """fp32 convolutions run in TF32 on Ampere and later unless turned off: say which ran."""
    tf32 = (
        device.type == "cuda" and torch.backends.cudnn.allow_tf32 and torch.cuda.get_device_capability(device) >= (8, 0)
    )
    return "tf32" if tf32 else "fp32"


def modes(device: torch.device) -> dict:
    """name → (autocast dtype, channels_last, GradScaler)."""
    return {fp32_label(device): (None, False, False), "amp_bf16": (torch.bfloat16, False, False),
            "amp_bf16_channels_last": (torch.bfloat16, True, False),
            "amp_fp16_gradscaler_channels_last": (torch.float16, True, True)}  # fmt: skip


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def full_training(arch: str, mode: tuple, cfg, device) -> float:
    import torchvision

    dtype, channels_last, scaled = mode
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = torchvision.models.get_model(arch, num_classes=102).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=scaled)
    images = torch.randn(cfg.batch, 3, cfg.size, cfg.size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 102, (cfg.batch,), device=device)

    def step():
        with autocast(device, dtype):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return rate(step, cfg.batch, cfg.warmup, cfg.steps, device)


def fc_only(arch: str, cfg, device) -> dict:
    """--freeze fc: the seed's step (frozen backbone forward + head) against the cached-feature head step."""
    import torchvision

    model = torchvision.models.get_model(arch, num_classes=102).to(device, memory_format=torch.channels_last).eval()
    head = model.fc.train()
    backbone = torch.nn.Sequential(*(m for n, m in model.named_children() if n != "fc"), torch.nn.Flatten(1))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    images = torch.randn(cfg.batch, 3, cfg.size, cfg.size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 102, (cfg.batch,), device=device)
    with torch.no_grad(), autocast(device, torch.bfloat16):
        features = backbone(images).float()

    def head_step(inputs):
        loss = F.cross_entropy(head(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def recompute_step():
        with torch.no_grad(), autocast(device, torch.bfloat16):
            inputs = backbone(images).float()
        head_step(inputs)

    def backbone_only():
        with torch.no_grad(), autocast(device, torch.bfloat16):
            backbone(images)

    seed_way = rate(recompute_step, cfg.batch, cfg.warmup, cfg.steps, device)
    cached_head = rate(lambda: head_step(features), cfg.batch, cfg.warmup, cfg.steps * 10, device)
    forward = rate(backbone_only, cfg.batch, cfg.warmup, cfg.steps, device)
    # Flowers-102: 1,020 train + 1,020 valid images, 12 epochs, --cache-views 2.
    train, valid, epochs, views = 1020, 1020, 12, 2
    seed_seconds = epochs * (train / seed_way + valid / forward)
    cache_seconds = (views * train + valid) / forward + epochs * train / cached_head
    return {"recompute_img_per_s": seed_way, "cached_head_img_per_s": cached_head,
            "backbone_forward_img_per_s": forward,
            "flowers_12_epoch_speedup": seed_seconds / cache_seconds}  # fmt: skip


def checkpoint_stall(cfg, device) -> dict:
    """What a checkpoint of --freeze none ResNet-152 + Adam holds the loop for, on this device: written in
    the loop (serialize from the device, sha256, to local disk: no object store here, so the sync stall
    is if anything understated) against checkpoint.Writer's stall, training.checkpoint.to_host's copy
    into pageable host memory; and the copy into pinned memory it could use instead, its first call
    (pinning every tensor) apart from the best of the ones after it (PyTorch caches pinned blocks)."""
    import hashlib

    from benchmarks.checkpoints import training_state
    from training.checkpoint import serialize, to_host

    state = training_state("resnet18" if cfg.smoke else "resnet152", device)

    def sync(path: Path) -> None:
        data = serialize(state)
        hashlib.sha256(data).hexdigest()
        path.write_bytes(data)

    def pinned():
        copied = tree_map(lambda value: torch.empty_like(value, device="cpu", pin_memory=True).copy_(
            value, non_blocking=True) if torch.is_tensor(value) and value.is_cuda else value, state)  # fmt: skip
        synchronize(device)
        return copied

    def seconds(fn) -> float:
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - started

    def best(fn) -> float:
        return min(seconds(fn) for _ in range(1 if cfg.smoke else 3))

    with tempfile.TemporaryDirectory(prefix="petal-gpu-checkpoint-") as scratch:
        stall = {"sync": best(lambda: sync(Path(scratch, "checkpoint.pt"))), "async": best(lambda: to_host(state))}
    if device.type == "cuda":
        stall["pinned_first"] = seconds(pinned)
        stall["pinned"] = best(pinned)
    size = sum(value.numel() * value.element_size() for value in tree_flatten(state)[0] if torch.is_tensor(value))
    ratios = {"stall_async_vs_sync": stall["async"] / stall["sync"]}
    if "pinned" in stall:
        ratios["pinned_vs_to_host"] = stall["pinned"] / stall["async"]
    return {"tensor_bytes": size, "stall_seconds": stall, "ratios": ratios}


def jpegs(count: int) -> list[bytes]:
    """Photo-sized JPEGs stored the way upload_dataset.py stores them: short side 256, quality 93."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    blobs = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (12, 16, 3), generator=generator, dtype=torch.uint8).numpy()
        image = Image.fromarray(pixels).resize((341, 256), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=93)
        blobs.append(buffer.getvalue())
    return blobs


def decode_rates(cfg, device) -> dict:
    """JPEG decode images/s of one process: PIL and torchvision (libjpeg-turbo) on the CPU, against
    batches decoded by nvJPEG on the GPU (torchvision.io.decode_jpeg(device="cuda")), which is what
    the trainer's --decode gpu does."""
    import torchvision
    from PIL import Image

    blobs = jpegs(cfg.jpegs)
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

    def timed(fn, repeats: int = 3) -> float:
        fn()  # warm-up: nvJPEG handles, page cache
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        return repeats * len(blobs) / (time.perf_counter() - started)

    rates = {
        "cpu_pil": timed(lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]),
        "cpu_torchvision": timed(lambda: [torchvision.io.decode_jpeg(t) for t in tensors]),
        "gpu_nvjpeg": None,
    }
    if device.type == "cuda":
        batch = cfg.batch
        rates["gpu_nvjpeg"] = timed(lambda: [torchvision.io.decode_jpeg(tensors[i : i + batch], device=device)
                                             for i in range(0, len(tensors), batch)])  # fmt: skip
    return rates


def local_dataset(directory: Path, count: int, classes: int = 102):
    """A petal dataset of `count` JPEGs whose shards already lie, verified, in `directory` (the cache):
    SplitStream reads them without a storage server."""
    from training.shards import Sample, build_shard, shard_entry, shard_path
    from training.storage import S3Url

    dataset = S3Url("bench", "photos")
    samples = [Sample(f"s{i:06d}", blob, "jpg", i % classes, "bench") for i, blob in enumerate(jpegs(count))]
    shards = []
    for number in range(8):
        chunk = samples[number::8]
        data = build_shard(chunk)
        entry = shard_entry("train", number, data, len(chunk))
        path = shard_path(dataset, entry, directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        shards.append(entry)
    split = {"samples": count, "shards": shards}
    index = {"classes": [{"id": str(i), "name": str(i)} for i in range(classes)], "splits": {"train": split}}
    return dataset, index


def pipeline_rank(rank: int, world_size: int, port: int, cfg, directory: str, dataset, index: dict,
                  decode_on_device: bool, results):  # fmt: skip
    """One rank of petal's own pipeline: ImageEpochs' batches through train_one_epoch under DDP."""
    import torchvision
    from torch.nn.parallel import DistributedDataParallel

    from training.data import ImageEpochs, SplitStream
    from training.distributed import World, precision_for, process_group
    from training.loop import train_one_epoch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and not cfg.smoke
    world = World(rank, world_size, rank, torch.device("cuda", rank) if cuda else torch.device("cpu"))
    with process_group(world):
        stream = SplitStream(None, dataset, index, ["train"], Path(directory))
        model = torchvision.models.resnet50(num_classes=102).to(world.device, memory_format=torch.channels_last)
        epochs = ImageEpochs(model, stream, stream, image_size=cfg.size, seed=0, rank=rank, world_size=world_size,
                             batch_size=cfg.batch, workers=cfg.workers, device=world.device,
                             decode_on_device=decode_on_device)  # fmt: skip
        ddp = DistributedDataParallel(model, device_ids=[world.device] if cuda else None)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        precision = precision_for(world.device, "auto")
        scaler = torch.amp.GradScaler(world.device.type, enabled=precision.scaled)
        seconds = []
        for epoch in (1, 2):  # the first warms workers, cuDNN and nvJPEG up; the second is timed
            ranks = epochs.assignment(epoch, world_size)
            steps = max(-(-len(ids) // cfg.batch) for ids in ranks)
            synchronize(world.device)
            started = time.perf_counter()
            train_one_epoch(ddp, epochs.train_loader(epoch, ranks[rank]), steps, epochs.sample_shape, optimizer,
                            scaler, precision.autocast, world.device, lambda *_: False)  # fmt: skip
            synchronize(world.device)
            seconds.append(time.perf_counter() - started)
        epochs.close()
    if rank == 0:
        results["img_per_s"] = cfg.pipeline_images / seconds[-1]
        results["precision"] = precision.name


def petal_pipeline(cfg, device) -> dict:
    import socket

    import torch.multiprocessing as mp

    figures = {}
    world_size = torch.cuda.device_count() if device.type == "cuda" else 1
    with tempfile.TemporaryDirectory(prefix="petal-gpu-bench-") as directory:
        dataset, index = local_dataset(Path(directory), cfg.pipeline_images)
        for decode in ("cpu", "gpu") if device.type == "cuda" else ("cpu",):
            with mp.Manager() as manager:
                results = manager.dict()
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                mp.spawn(pipeline_rank, args=(world_size, port, cfg, directory, dataset, index, decode == "gpu",
                                              results), nprocs=world_size)  # fmt: skip
                figures[f"decode_{decode}"] = dict(results) | {"ranks": world_size, "workers_per_rank": cfg.workers}
    return figures


def needs(*modules: str) -> str | None:
    """The modules a section imports: one that cannot be imported skips the section, saying so."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return f"skipped: {', '.join(missing)} cannot be imported" if missing else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every figure here (rewritten after each section)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the code paths only")
    parser.add_argument("--fail", action="append", default=[], help=argparse.SUPPRESS)  # a section made to fail
    cfg = parser.parse_args()
    if not cfg.smoke and not torch.cuda.is_available():
        print("gpu.py: error: no CUDA device here; run it on a GPU machine, or --smoke for the code paths on the CPU",
              file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cuda" if not cfg.smoke else "cpu")
    sizes = (dict(size=16, batch=2, warmup=0, steps=1, jpegs=4, workers=0, pipeline_images=8) if cfg.smoke else
             dict(size=224, batch=128, warmup=10, steps=30, jpegs=2048, pipeline_images=4096,
                  workers=max(1, min(8, (os.cpu_count() or 1) // max(torch.cuda.device_count(), 1)))))  # fmt: skip
    vars(cfg).update(sizes)
    torch.backends.cudnn.benchmark = True
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "image_size": cfg.size,
        "batch": cfg.batch,
    }

    def write() -> None:
        if cfg.json:
            partial = Path(f"{cfg.json}.partial")
            partial.write_text(json.dumps(results, indent=1))
            partial.replace(cfg.json)

    def section(name: str, fn, *modules: str) -> None:
        skipped = needs(*modules)
        if skipped:
            results[name] = {"error": skipped}
        else:
            try:
                if name in cfg.fail:
                    raise RuntimeError("made to fail (--fail)")
                results[name] = fn()
            except Exception as err:  # noqa: BLE001 — recorded with its reason; the other sections go on
                results[name] = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
                traceback.print_exc()
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        write()

    for arch in ("resnet50", "resnet152"):
        for mode, spec in modes(device).items():
            section(f"train_img_per_s/{arch}/{mode}", lambda a=arch, s=spec: full_training(a, s, cfg, device),
                    "torchvision")  # fmt: skip
        section(f"fc_only/{arch}", lambda a=arch: fc_only(a, cfg, device), "torchvision")
    section("checkpoint_stall", lambda: checkpoint_stall(cfg, device), "torchvision")
    section("petal_pipeline", lambda: petal_pipeline(cfg, device), "torchvision", "PIL")
    section("jpeg_decode_img_per_s", lambda: decode_rates(cfg, device), "torchvision", "PIL")
    best = results.get("train_img_per_s/resnet50/amp_bf16_channels_last")
    if isinstance(best, float):
        results["resnet50_amp_vs_a100_reference"] = best / A100_RESNET50_AMP
        write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
