"""How long a checkpoint holds the training loop: rank 0 writing it in the loop (serialize, sha256,
upload, `latest`: what petal did before, `sync`) against training/checkpoint.py's Writer, which holds
the loop only to copy the state to host memory and uploads from a thread of its own (`async`).

    scripts/testbed.sh minio up && eval "$(scripts/testbed.sh env)"
    python -m benchmarks checkpoint --arch resnet152 --json runs/bench/checkpoint.json

The state is a torchvision model of --arch trained with --freeze none and Adam (its weights and two
moments per weight: about 700 MB for resnet152), written to the test bed's MinIO; --rounds rounds of
each, the best kept. JSON: `stall_seconds.{sync,async}`, `landed_seconds.async` (until `latest`
names the checkpoint: it should stay near the sync stall), `peak_host_mb.{sync,async}` (the most
resident memory the process held above what it held before the write: the kernel's high-water
mark), and `ratios.stall_async_vs_sync`. Goal: <= 0.2. benchmarks/gpu.py measures the same stall on
CUDA.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from benchmarks.common import report, storage_from_env
from training import checkpoint
from training.storage import parse_url

OUTPUT = "s3://petal/bench/checkpoints"
GOAL = 0.2  # the async stall at most this share of the sync one


def training_state(arch: str, device: str | torch.device = "cpu") -> dict:
    """A model after one Adam step, its optimizer's moments filled: what a --freeze none checkpoint holds."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=102).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(2, 3, 64, 64, device=device)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (kB there)."""
    with open("/proc/self/status") as status:
        (line,) = [line for line in status if line.startswith(f"{field}:")]
    return int(line.split()[1]) * 1024


def peak_resident(fn: Callable[[], object]) -> int:
    """The most resident memory `fn` added to the process while it ran: the kernel's high-water mark,
    reset to the current size first (writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = status_bytes("VmRSS")
    fn()
    return status_bytes("VmHWM") - before


def run(args) -> dict:
    storage = storage_from_env()
    output = parse_url(OUTPUT)
    storage.ensure_bucket(output)
    state = training_state(args.arch)
    writer = checkpoint.Writer(storage, output, keep=2, log=lambda line: None)
    stall = {"sync": [], "async": []}
    landed, peak, size = [], {"sync": 0, "async": 0}, 0

    def in_loop(name: str) -> None:
        nonlocal size
        started = time.perf_counter()
        size = checkpoint.save(storage, output, state, name, False, keep=2)
        stall["sync"].append(time.perf_counter() - started)

    def in_background(name: str) -> None:
        started = time.perf_counter()
        writer.save(state, name, is_best=False)
        stall["async"].append(time.perf_counter() - started)
        writer.wait()
        landed.append(time.perf_counter() - started)

    for round_ in range(1, args.rounds + 1):
        for way, write, step in (("sync", in_loop, 1), ("async", in_background, 2)):
            name = checkpoint.checkpoint_name(round_, step)
            peak[way] = max(peak[way], peak_resident(lambda write=write, name=name: write(name)))
    for url in storage.list(output):
        storage.delete(url)
    best = {way: min(seconds) for way, seconds in stall.items()}
    ratio = best["async"] / best["sync"]
    rows = [
        ("checkpoint", f"{args.arch}, Adam: {size / 1e6:.0f} MB"),
        ("sync: loop held (s)", f"{best['sync']:7.2f}"),
        ("async: loop held (s)", f"{best['async']:7.2f}"),
        ("async: landed (s)", f"{min(landed):7.2f}"),
        *((f"{way}: peak host memory added (MB)", f"{peak[way] / 1e6:7.0f}") for way in peak),
        ("stall_async_vs_sync", f"{ratio:7.3f}x  (goal <= {GOAL}x{'' if ratio <= GOAL else ', MISSED'})"),
    ]
    result = {"arch": args.arch, "bytes": size, "per_round": {"stall_seconds": stall, "landed_seconds": landed},
              "stall_seconds": best, "landed_seconds": {"async": min(landed)},
              "peak_host_mb": {way: added / 1e6 for way, added in peak.items()},
              "ratios": {"stall_async_vs_sync": ratio}, "goals": {"stall_async_vs_sync": GOAL}}  # fmt: skip
    return report("checkpoint", rows, result, args.json)
