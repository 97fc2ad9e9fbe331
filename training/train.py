"""Transfer-learns a torchvision ResNet on a petal dataset in object storage, under DDP.

One process per rank; rank 0 alone writes to --output. Runnable as it is:

    python -m training --data s3://petal/datasets/flowers102 --output s3://petal/runs/flowers-1
    torchrun --nproc-per-node 2 -m training --arch resnet18 --freeze none --pretrained none \\
        --image-size 64 --epochs 4 --data s3://petal/datasets/synthetic --output s3://petal/runs/synthetic-1

If --output already holds a checkpoint, the run resumes from it (same command, same result).
stdout carries one JSON record per epoch and, last, {"event": "done", ...}; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import inspect
import json
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from training import checkpoint, plots
from training.config import parse_args
from training.data import ImageEpochs, SplitStream, hash_seed
from training.distributed import World, all_reduce_sum, process_group
from training.features import FeatureCache, FeatureEpochs, backbone_of
from training.model import PretrainedWeightsError, build_model, freeze, imagenet_state_dict, set_train_mode
from training.shards import DatasetError, read_index, split_names
from training.state import IncompatibleCheckpoint, TrainingState, check_resumable, run_config
from training.storage import S3Url, Storage, StorageError, parse_url

# torch 2.14 renamed DDP's broadcast_buffers; the pinned container base (torch 2.9) knows only the old name.
SYNC_BUFFERS = next(
    name
    for name in ("forward_sync_buffers", "broadcast_buffers")
    if name in inspect.signature(DistributedDataParallel).parameters
)


def log(message: str) -> None:
    print(f"petal: {message}", file=sys.stderr, flush=True)


def autocast_for(device: torch.device, amp: str):
    """The autocast context and whether fp16 needs a GradScaler."""
    if device.type != "cuda" or amp == "off":
        return nullcontext, False
    dtype = torch.float16 if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()) else torch.bfloat16
    return (lambda: torch.autocast("cuda", dtype=dtype)), dtype == torch.float16


def train_one_epoch(model, loader, optimizer, scaler, autocast, device, epoch, epochs, log_every, is_main) -> dict:
    set_train_mode(model.module)
    started = time.monotonic()
    sums = torch.zeros(3)  # loss * n, correct, n
    steps = len(loader)
    # Join lets a rank with one batch fewer finish without leaving the others in an all-reduce.
    with Join([model]):
        for step, (images, labels, _) in enumerate(loader, 1):
            images, labels = to_device(images, device), labels.to(device, non_blocking=True)
            with autocast():
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n = labels.numel()
            sums += torch.tensor([loss.item() * n, (logits.argmax(1) == labels).sum().item(), n])
            if is_main and (step % log_every == 0 or step == steps):
                log(f"epoch {epoch}/{epochs} step {step}/{steps} loss {loss.item():.4f}")
    total = all_reduce_sum(sums, device)
    return {
        "train_loss": total[0].item() / total[2].item(),
        "train_acc": total[1].item() / total[2].item(),
        "train_samples": int(total[2].item()),
        "train_seconds": round(time.monotonic() - started, 3),
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, autocast, device) -> dict:
    model.eval()
    sums = torch.zeros(4)  # loss * n, top-1 correct, top-5 correct, n
    per_class = torch.zeros(2, num_classes)  # correct, seen
    for images, labels, _ in loader:
        images, labels = to_device(images, device), labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images).float()
        top = logits.topk(min(5, num_classes), dim=1).indices
        hit1 = top[:, 0] == labels
        hit5 = (top == labels[:, None]).any(dim=1)
        n = labels.numel()
        sums += torch.tensor(
            [F.cross_entropy(logits, labels, reduction="sum").item(), hit1.sum().item(), hit5.sum().item(), n]
        )
        per_class[0] += torch.bincount(labels[hit1].cpu(), minlength=num_classes)
        per_class[1] += torch.bincount(labels.cpu(), minlength=num_classes)
    sums, per_class = all_reduce_sum(sums, device), all_reduce_sum(per_class, device)
    n = sums[3].item()
    return {
        "val_loss": sums[0].item() / n,
        "val_acc": sums[1].item() / n,
        "val_top5": sums[2].item() / n,
        "val_samples": int(n),
        "val_per_class_acc": (per_class[0] / per_class[1].clamp(min=1)).tolist(),
    }


def memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def to_device(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images go channels_last on CUDA; cached feature vectors have no channels to reorder."""
    inputs = inputs.to(device, non_blocking=True)
    return inputs.contiguous(memory_format=memory_format(device)) if inputs.dim() == 4 else inputs


def make_optimizer(args, params):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)


def make_scheduler(args, optimizer):
    if args.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def write_results(storage: Storage, output: S3Url, history: list[dict], class_names: list[str]) -> dict:
    best = max(history, key=lambda r: r["val_acc"])
    storage.write_bytes(output.join("curves.png"), plots.curves_png(history), "image/png")
    storage.write_bytes(
        output.join("per_class.png"),
        plots.per_class_png(class_names, best["val_per_class_acc"], best["epoch"]),
        "image/png",
    )
    return best


def epoch_source(args, model, storage, data, index, train_splits, val_split, world, autocast):
    """Where each epoch's batches come from: decoded images, or cached backbone features."""
    device = world.device
    train = SplitStream(storage, data, index, train_splits, args.cache_dir)
    val = SplitStream(storage, data, index, [val_split], args.cache_dir)
    if args.freeze == "fc" and args.feature_cache:
        cache = FeatureCache(backbone_of(model), device, args.image_size, args.seed, batch_size=args.batch_size,
                             workers=args.workers, autocast=autocast, directory=args.feature_cache_dir)  # fmt: skip
        return FeatureEpochs(model, train, val, cache=cache, views=args.cache_views, seed=args.seed,
                             rank=world.rank, world_size=world.world_size, batch_size=args.batch_size)  # fmt: skip
    return ImageEpochs(model, train, val, image_size=args.image_size, seed=args.seed, rank=world.rank,
                       world_size=world.world_size, batch_size=args.batch_size, workers=args.workers,
                       pin_memory=device.type == "cuda")  # fmt: skip


def run(args: argparse.Namespace) -> None:
    world = World.from_env()
    storage = Storage.from_env()
    data, output = parse_url(args.data), parse_url(args.output)
    index = read_index(storage, data)
    train_splits = split_names(index, args.train_splits.split(","))
    (val_split,) = split_names(index, [args.val_split])
    class_names = [c["name"] for c in index["classes"]]
    config = run_config(args)
    storage.require_bucket(output)
    saved = checkpoint.load_latest(storage, output)
    if saved is not None:
        check_resumable(saved, config, class_names, str(output))
    # Backbone weights are only needed for a fresh run; a resumed one has them in its checkpoint.
    backbone = None if saved else imagenet_state_dict(args.arch, args.pretrained, storage)

    with process_group(world):
        device = world.device
        if world.is_main:
            log(f"{world.world_size} process(es), {world.backend} on {device.type}; training {args.data} into {output}")
        torch.manual_seed(args.seed)
        model = build_model(args.arch, len(class_names), backbone).to(device, memory_format=memory_format(device))
        optimizer = make_optimizer(args, freeze(model, args.freeze))
        autocast, needs_scaler = autocast_for(device, args.amp)
        state = TrainingState(model, optimizer, make_scheduler(args, optimizer),
                              torch.amp.GradScaler(device.type, enabled=needs_scaler), config, class_names)  # fmt: skip
        if saved is not None:
            state.load_state_dict(saved)
            if world.is_main:
                log(f"resuming {output} after epoch {state.epoch} (best val_acc {state.best_val_acc:.4f})")
        epochs = epoch_source(args, model, storage, data, index, train_splits, val_split, world, autocast)
        # Frozen BatchNorm statistics are identical everywhere, so only broadcast buffers that train.
        ddp = DistributedDataParallel(
            epochs.trained,
            device_ids=[device] if device.type == "cuda" else None,
            **{SYNC_BUFFERS: args.freeze != "fc"},
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: one copy fewer per step
        )

        for epoch in range(state.epoch + 1, args.epochs + 1):
            started = time.monotonic()
            torch.manual_seed(hash_seed(args.seed, epoch, world.rank))
            stats = train_one_epoch(ddp, epochs.train_loader(epoch), optimizer, state.scaler, autocast, device, epoch,
                                    args.epochs, args.log_every, world.is_main)  # fmt: skip
            stats |= evaluate(epochs.evaluated, epochs.val_loader(epoch), len(class_names), autocast, device)
            record = {"event": "epoch", "epoch": epoch, "lr": state.scheduler.get_last_lr()[0], **stats,
                      "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
            is_best = state.finish_epoch(record)
            if world.is_main:
                checkpoint.save(storage, output, state.state_dict(), epoch, is_best, args.keep_checkpoints)
                metrics = "".join(json.dumps(r) + "\n" for r in state.history)
                storage.write_bytes(output.join("metrics.jsonl"), metrics.encode(), "application/x-ndjson")
                print(json.dumps({k: v for k, v in record.items() if k != "val_per_class_acc"}), flush=True)

        if world.is_main:
            best = write_results(storage, output, state.history, class_names)
            done = {"event": "done", "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
                    "epochs": args.epochs, "checkpoint": str(output.join(checkpoint.BEST))}  # fmt: skip
            print(json.dumps(done), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (pod deletion, torchrun stopping a failed world) unwinds like an exception, so the process
    # group is left cleanly; 143 tells a PyTorchJob with restartPolicy ExitCode to retry.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        run(args)
    except (StorageError, DatasetError, IncompatibleCheckpoint, PretrainedWeightsError, ValueError) as err:
        print(f"petal: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0
