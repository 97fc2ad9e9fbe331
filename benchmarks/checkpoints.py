"""How long a checkpoint holds the training loop: rank 0 writing it in the loop (serialize, sha256,
upload, `latest`: what petal did before) against training/checkpoint.py's Writer, which holds the
loop only to copy the state to host memory and uploads from a thread of its own.

    scripts/testbed.sh minio up && eval "$(scripts/testbed.sh env)"
    python -m benchmarks checkpoint --arch resnet152

The state is a torchvision model of --arch trained with --freeze none and Adam (its weights and two
moments per weight: about 700 MB for resnet152), written to the test bed's MinIO; --rounds rounds of
each, the best kept. stall_ratio = in-loop stall / Writer stall. Goal: >= 10x. `landed` is the
Writer's time until `latest` names the checkpoint, which should stay near the in-loop time.
"""

from __future__ import annotations

import time

import torch
import torchvision

from benchmarks.common import report, storage_from_env
from training import checkpoint
from training.storage import parse_url

OUTPUT = "s3://petal/bench/checkpoints"
GOAL = 10.0


def training_state(arch: str) -> dict:
    """A model after one Adam step, its optimizer's moments filled: what a --freeze none checkpoint holds."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=102)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}


def run(args) -> dict:
    storage = storage_from_env()
    output = parse_url(OUTPUT)
    storage.ensure_bucket(output)
    state = training_state(args.arch)
    size = len(checkpoint.serialize(state))
    writer = checkpoint.Writer(storage, output, keep=2, log=lambda line: None)
    in_loop, stall, landed = [], [], []
    for round_ in range(1, args.rounds + 1):
        started = time.perf_counter()
        checkpoint.save(storage, output, state, checkpoint.checkpoint_name(round_, 1), False, keep=2)
        in_loop.append(time.perf_counter() - started)
        started = time.perf_counter()
        writer.save(state, checkpoint.checkpoint_name(round_, 2), is_best=False)
        stall.append(time.perf_counter() - started)
        writer.wait()
        landed.append(time.perf_counter() - started)
    for url in storage.list(output):
        storage.delete(url)
    ratio = min(in_loop) / min(stall)
    rows = [("checkpoint", f"{args.arch}, Adam: {size / 1e6:.0f} MB"),
            ("in the loop (s)", f"{min(in_loop):7.2f}"),
            ("Writer: loop held (s)", f"{min(stall):7.2f}"),
            ("Writer: landed (s)", f"{min(landed):7.2f}"),
            ("stall_ratio", f"{ratio:7.1f}x  (goal >= {GOAL:.0f}x{'' if ratio >= GOAL else ', MISSED'})")]  # fmt: skip
    result = {"arch": args.arch, "bytes": size, "in_loop_seconds": in_loop, "writer_stall_seconds": stall,
              "writer_landed_seconds": landed, "stall_ratio": ratio, "goals": {"stall_ratio": GOAL}}  # fmt: skip
    return report("checkpoint", rows, result, args.json)
