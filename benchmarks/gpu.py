"""GPU throughput of petal's training step, prepared for one short run (< 5 minutes) on a lent GPU
machine that has only its preinstalled PyTorch + torchvision (no minio, no repo install):

    PYTHONUNBUFFERED=1 python benchmarks/gpu.py --json $OUT/gpu.json
    python benchmarks/gpu.py --smoke          # the same code paths on CPU, tiny sizes (used by the tests)

Measures training images/s at 224 px for ResNet-50 and ResNet-152 in fp32, AMP (bf16) and AMP +
channels_last, on synthetic tensors; the fc-only (`--freeze fc`) step with and without the feature
cache (the seed recomputes the frozen backbone every epoch; the cache runs it once per view, then
trains the head from features) with the 12-epoch speedup that implies; and ResNet-50 AMP +
channels_last fed from decoded JPEGs by DataLoader workers; and JPEG decode images/s on the CPU
(PIL, torchvision) against nvJPEG on the GPU (the trainer's --decode gpu). Anchor: NVIDIA's ResNet-50 reference
trains ~2,470 img/s on one A100 with AMP (DeepLearningExamples).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

A100_RESNET50_AMP = 2470.0
MODES = {"fp32": (None, False), "amp_bf16": (torch.bfloat16, False), "amp_bf16_channels_last": (torch.bfloat16, True)}


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


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def full_training(arch: str, mode: str, cfg, device) -> float:
    dtype, channels_last = MODES[mode]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = torchvision.models.get_model(arch, num_classes=102).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(cfg.batch, 3, cfg.size, cfg.size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 102, (cfg.batch,), device=device)

    def step():
        with autocast(device, dtype):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return rate(step, cfg.batch, cfg.warmup, cfg.steps, device)


def fc_only(arch: str, cfg, device) -> dict:
    """--freeze fc: the seed's step (frozen backbone forward + head) against the cached-feature head step."""
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
    return {
        "recompute_img_per_s": seed_way,
        "cached_head_img_per_s": cached_head,
        "backbone_forward_img_per_s": forward,
        "flowers_12_epoch_speedup": seed_seconds / cache_seconds,
    }


class Jpegs(Dataset):
    def __init__(self, count: int, size: int):
        generator = torch.Generator().manual_seed(0)
        self.blobs = []
        for _ in range(count):
            pixels = torch.randint(0, 256, (3, 12, 16), generator=generator, dtype=torch.uint8)
            image = T.functional.to_pil_image(pixels).resize((500, 375), Image.BICUBIC)  # a flowers-sized photo
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=90)
            self.blobs.append(buffer.getvalue())
        self.transform = T.Compose([T.PILToTensor(), T.RandomRotation(20), T.Resize(size, antialias=True),
                                    T.CenterCrop(size), T.ToDtype(torch.float32, scale=True),
                                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])  # fmt: skip

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        with Image.open(io.BytesIO(self.blobs[i])) as image:
            return self.transform(image.convert("RGB")), i % 102


def decoded_jpegs(cfg, device) -> float:
    model = torchvision.models.resnet50(num_classes=102).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(
        Jpegs(cfg.jpegs, cfg.size),
        batch_size=cfg.batch,
        shuffle=True,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        drop_last=True,
    )
    seen, started = 0, None
    for epoch in range(2):  # the first pass warms workers and cuDNN up; the second is timed
        if epoch == 1:
            synchronize(device)
            started = time.perf_counter()
        for images, labels in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with autocast(device, torch.bfloat16):
                loss = F.cross_entropy(model(images), labels.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels) if epoch == 1 else 0
    synchronize(device)
    return seen / (time.perf_counter() - started)


def decode_rates(cfg, device) -> dict:
    """JPEG decode images/s of one process: PIL and torchvision (libjpeg-turbo) on the CPU, against
    batches decoded by nvJPEG on the GPU (torchvision.io.decode_jpeg(device="cuda")), which is what
    the trainer's --decode gpu does."""
    blobs = Jpegs(cfg.jpegs, cfg.size).blobs
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the code paths only")
    cfg = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.smoke else "cpu")
    sizes = (
        dict(size=32, batch=2, warmup=1, steps=1, jpegs=4, workers=0)
        if cfg.smoke
        else dict(size=224, batch=128, warmup=10, steps=30, jpegs=2048, workers=min(16, os.cpu_count() or 1))
    )
    vars(cfg).update(sizes)
    torch.backends.cudnn.benchmark = True
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "image_size": cfg.size,
        "batch": cfg.batch,
        "train_img_per_s": {},
    }
    for arch in ("resnet50", "resnet152"):
        for mode in MODES:
            results["train_img_per_s"][f"{arch}/{mode}"] = full_training(arch, mode, cfg, device)
            print(f"{arch:10s} {mode:24s} {results['train_img_per_s'][f'{arch}/{mode}']:9.1f} img/s", flush=True)
        results[f"{arch}/fc_only"] = fc_only(arch, cfg, device)
        print(f"{arch:10s} fc-only {json.dumps({k: round(v, 1) for k, v in results[f'{arch}/fc_only'].items()})}")
    results["resnet50/decoded_jpegs_amp_bf16_channels_last"] = decoded_jpegs(cfg, device)
    print(f"resnet50   from decoded JPEGs ({cfg.workers} workers) "
          f"{results['resnet50/decoded_jpegs_amp_bf16_channels_last']:9.1f} img/s")  # fmt: skip
    results["jpeg_decode_img_per_s"] = decode_rates(cfg, device)
    print("JPEG decode img/s (one process): " + json.dumps(
        {k: None if v is None else round(v) for k, v in results["jpeg_decode_img_per_s"].items()}))  # fmt: skip
    best = results["train_img_per_s"]["resnet50/amp_bf16_channels_last"]
    results["resnet50_amp_vs_a100_reference"] = best / A100_RESNET50_AMP
    print(f"resnet50 AMP + channels_last vs NVIDIA's A100 reference: {best / A100_RESNET50_AMP:.2f}x")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
