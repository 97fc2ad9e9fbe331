"""The epoch loop: one epoch of optimizer steps on one rank (`train_one_epoch`), the evaluation
(`evaluate`), and the per-step learning rate, all nothing but torch, so they run (and are measured:
benchmarks/gpu.py) without storage or a run around them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import World, all_reduce_sum
from training.exit_codes import LaunchError
from training.model import set_train_mode


def train_one_epoch(model, batches, steps: int, sample_shape: tuple[int, ...], optimizer, scaler, autocast, device,
                    after_step) -> tuple[torch.Tensor, int]:  # fmt: skip
    """`steps` optimizer steps over this rank's batches; returns its [loss * n, correct] (on the device)
    and n. Every rank takes the same number of steps: one whose samples run out first trains on empty
    batches (no loss, zero gradients, BatchNorm untouched), so every rank meets every collective — the
    gradient all-reduce, the stop check — and every GradScaler updates alike, with no Join. Nothing in
    the step waits for the device. `after_step(step, sums, n, loss)` runs after every optimizer step and
    returns True to stop the epoch there."""
    set_train_mode(model.module)
    sums = torch.zeros(2, device=device, dtype=torch.float64)
    seen = 0
    batches = iter(batches)
    empty = (torch.empty(0, *sample_shape), torch.empty(0, dtype=torch.long), [])
    for step in range(1, steps + 1):
        images, labels, _ = next(batches, empty)
        images, labels = to_device(images, device), labels.to(device, non_blocking=True)
        n = labels.numel()  # from the shape: known on the host
        with autocast():
            logits = model(images)
            loss = F.cross_entropy(logits, labels, reduction="sum") / max(n, 1)  # the batch mean; 0 when empty
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sums[0] += loss.detach().double() * n
        sums[1] += (logits.argmax(1) == labels).sum()
        seen += n
        if after_step(step, sums, seen, loss):
            break
    return sums, seen


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, autocast, device) -> dict:
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss * n, top-1 correct, top-5 correct, n
    per_class = torch.zeros(2, num_classes, device=device, dtype=torch.float64)  # correct, seen
    for images, labels, _ in loader:
        images, labels = to_device(images, device), labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images).float()
        top = logits.topk(min(5, num_classes), dim=1).indices
        hit1 = top[:, 0] == labels
        hit5 = (top == labels[:, None]).any(dim=1)
        # Nothing here waits for the device: no tensor made from host values, no boolean mask, no
        # bincount (CUDA's reads its input's maximum back to size the output).
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += hit1.sum()
        sums[2] += hit5.sum()
        sums[3] += labels.numel()
        per_class[0].index_add_(0, labels, hit1.double())
        per_class[1].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    sums, per_class = all_reduce_sum(sums, device), all_reduce_sum(per_class, device)
    n = max(sums[3].item(), 1)
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


def learning_rate(args, epoch: int, done: float = 1.0) -> float:
    """The rate for a step of an epoch (1-based) after which `done` of the epoch's samples are trained:
    a function of where training stands alone, the same on every rank, so a resume needs no scheduler
    state. The schedule is per epoch; the warmup, per step."""
    rate = args.lr
    if args.lr_schedule == "cosine":
        rate *= 0.5 * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))
    if args.warmup_epochs:
        rate *= min(1.0, (epoch - 1 + done) / args.warmup_epochs)
    return rate


def rank_batch_size(args, world: World) -> int:
    """Per-rank batch: --batch-size, or this rank's share of --global-batch-size."""
    if not args.global_batch_size:
        return args.batch_size
    if args.global_batch_size % world.world_size:
        raise LaunchError(f"--global-batch-size {args.global_batch_size} does not divide evenly over "
                          f"{world.world_size} ranks")  # fmt: skip
    return args.global_batch_size // world.world_size
