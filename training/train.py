"""Transfer-learns a torchvision ResNet on a petal dataset in object storage, under DDP.

One process per rank; rank 0 alone writes to --output. Runnable as it is:

    python -m training --data s3://petal/datasets/flowers102 --output s3://petal/runs/flowers-1
    torchrun --nproc-per-node 2 -m training --arch resnet18 --freeze none --pretrained none \\
        --image-size 64 --epochs 4 --data s3://petal/datasets/synthetic --output s3://petal/runs/synthetic-1

If --output already holds a checkpoint, the same command resumes from it: rank 0 picks the newest
intact checkpoint and every rank continues from it, from the exact sample where it was written
(every --checkpoint-every steps, at each epoch's end, and on SIGTERM), on any number of ranks.
stdout carries {"event": "resumed", "epoch": E, "step": S} after a resume, one JSON record per
epoch and, last, {"event": "done", ...}; progress goes to stderr.

The exit code says whether a restart can help (training/exit_codes.py). Homes of the parts: the epoch
loop in training/loop.py, the resume decision in training/resume.py, everything distributed in
training/distributed.py; this file runs them in order: start-up, epochs (checkpoints and SIGTERM
on the way), results.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import time
from datetime import timedelta

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training import STARTED, checkpoint, log
from training.artifacts import write_results
from training.data import ImageEpochs, SplitStream, continue_epoch, hash_seed
from training.distributed import (
    Precision,
    World,
    all_reduce_sum,
    any_rank,
    precision_for,
    process_group,
    sync_batchnorm,
    sync_buffers,
)
from training.exit_codes import PREEMPTED, LaunchError, Preempted, Preemption, failed
from training.features import FeatureCache, FeatureEpochs, backbone_of
from training.inputs import RunInputs
from training.loop import evaluate, learning_rate, make_optimizer, memory_format, rank_batch_size, train_one_epoch
from training.model import build_model, freeze, imagenet_state_dict
from training.progress import Progress
from training.resume import on_node_leader_first, resume_point
from training.state import TrainingState, run_config
from training.storage import S3Url, Storage
from training.tracking import MlflowRun
from training.views import gpu_decode_works

# torch 2.14 renamed DDP's broadcast_buffers; the Dockerfile's pinned base (torch 2.13) knows only the old name.
SYNC_BUFFERS = next(
    name
    for name in ("forward_sync_buffers", "broadcast_buffers")
    if name in inspect.signature(DistributedDataParallel).parameters
)


def epoch_source(args, model, train: SplitStream, val: SplitStream, world: World, precision: Precision):
    """Where each epoch's batches come from: decoded images, or cached backbone features."""
    if args.freeze == "fc" and args.feature_cache:
        cache = FeatureCache(backbone_of(model), world.device, args.image_size, args.seed,
                             batch_size=args.batch_size, workers=args.workers, autocast=precision.autocast,
                             width=model.fc.in_features, directory=args.feature_cache_dir,
                             dataset=f"{train.fingerprint}/{val.fingerprint}", precision=precision.name)  # fmt: skip
        return FeatureEpochs(model, train, val, cache=cache, views=args.cache_views, seed=args.seed,
                             rank=world.rank, world_size=world.world_size, batch_size=args.batch_size)  # fmt: skip
    on_gpu = args.decode == "gpu" or (args.decode == "auto" and gpu_decode_works(world.device))
    return ImageEpochs(model, train, val, image_size=args.image_size, seed=args.seed, rank=world.rank,
                       world_size=world.world_size, batch_size=args.batch_size, workers=args.workers,
                       device=world.device, decode_on_device=on_gpu)  # fmt: skip


class Stopwatch:
    """Where a rank's start-up time goes, from the process's first import to its first step."""

    def __init__(self):
        self.last, self.laps = STARTED, {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.laps.items())
        return f"ready in {self.last - STARTED:.1f} s ({parts})"


def run(args: argparse.Namespace, inputs: RunInputs, preemption: Preemption) -> None:
    startup = Stopwatch()
    startup.lap("imports")
    world = World.from_env()
    if args.decode == "gpu" and world.device.type != "cuda":
        raise LaunchError(f"--decode gpu needs a GPU; this rank runs on {world.device.type} (use auto or cpu)")
    storage, data, output, class_names = inputs.storage, inputs.data, inputs.output, inputs.class_names
    for split, stored in inputs.stored_below(args.image_size) if world.is_main else ():
        log(f"{split}'s images are stored at short side {stored}, below --image-size {args.image_size}: "
            "they are upscaled; re-upload with scripts/upload_dataset.py --short-side 0 (or larger) for "
            "the detail")  # fmt: skip
    config = run_config(args)
    args = argparse.Namespace(**vars(args) | {"batch_size": rank_batch_size(args, world)})
    if world.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels

    startup.lap("dataset")
    with process_group(world, timeout=timedelta(minutes=args.collective_timeout)):
        startup.lap("rendezvous")
        device = world.device
        train = SplitStream(storage, data, inputs.index, inputs.train_splits, args.cache_dir)
        val = SplitStream(storage, data, inputs.index, [inputs.val_split], args.cache_dir)
        saved = resume_point(storage, output, args, config, class_names, train.fingerprint, world)
        startup.lap("resume")
        # Backbone weights are only needed for a fresh run; a resumed one has them in its checkpoint.
        backbone = None
        if saved is None:
            backbone = on_node_leader_first(world, "loading the pretrained weights",
                                            lambda: imagenet_state_dict(args.arch, args.pretrained, storage,
                                                                        args.cache_dir))  # fmt: skip
        torch.manual_seed(args.seed)
        model = build_model(args.arch, len(class_names), backbone)
        if sync_batchnorm(args.sync_batchnorm, args.freeze != "fc", world):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device, memory_format=memory_format(device))
        optimizer = make_optimizer(args, freeze(model, args.freeze))
        precision = precision_for(device, args.amp)
        autocast = precision.autocast
        state = TrainingState(model, optimizer, torch.amp.GradScaler(device.type, enabled=precision.scaled), config,
                              class_names, train.fingerprint)  # fmt: skip
        if saved is not None:
            state.load_state_dict(saved)
            if world.is_main:
                log(f"resuming {output} at epoch {state.epoch}, step {state.steps_done} "
                    f"(best val_acc {state.best_val_acc:.4f})")  # fmt: skip
                print(json.dumps({"event": "resumed", "epoch": state.epoch, "step": state.steps_done}), flush=True)
        epochs = epoch_source(args, model, train, val, world, precision)
        # Frozen BatchNorm statistics are identical everywhere, so only broadcast buffers that train.
        ddp = DistributedDataParallel(
            epochs.trained,
            device_ids=[device] if device.type == "cuda" else None,
            **{SYNC_BUFFERS: args.freeze != "fc"},
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: one copy fewer per step
        )

        log(world.describe())  # every rank, once its model is built: the bad input a run can meet is behind it
        progress = writer = None
        if world.is_main:
            writer = checkpoint.Writer(storage, output, args.keep_checkpoints, log)
            events = args.cache_dir / "tensorboard" / hashlib.sha256(str(output).encode()).hexdigest()[:16]
            mlflow = inputs.tracking_uri and MlflowRun(inputs.tracking_uri, args.mlflow_experiment, storage, output,
                                                       args.cache_dir, resumed=saved is not None)  # fmt: skip
            progress = Progress(storage, output, args.epochs, world.world_size * args.batch_size, events, mlflow)
            if mlflow:  # once Progress has imported tensorboard: the sender imports mlflow, both protobuf
                mlflow.params(config)
            startup.lap("model")
            batch = f"global batch {world.world_size * args.batch_size} ({args.batch_size} per rank)"
            log(f"{world.world_size} process(es), {world.backend} on {device.type}, {batch}; training {args.data} "
                f"into {output}")  # fmt: skip
            log(str(startup))
        outcome = "failed"
        try:
            preemption.defer()
            while state.epoch <= args.epochs:
                run_epoch(args, state, ddp, epochs, world, autocast, storage, output, preemption, progress,
                          writer)  # fmt: skip
            if writer is not None:
                writer.wait()  # the last epoch's checkpoint (and best.pt) has landed before the run is done
            if world.is_main:
                best = write_results(storage, output, state.history, class_names)
            outcome = "done"
        except Preempted:
            if writer is not None:
                if writer.uploading is not None:
                    log("SIGTERM: the checkpoint lands before this rank exits (more SIGTERMs are noted, not obeyed)")
                writer.wait()  # the checkpoint SIGTERM asked for lands before the exit that says it did
            outcome = "stopped"
            raise
        finally:
            epochs.close()
            if writer is not None:
                writer.close()
            if progress is not None:
                progress.close(outcome)

        if world.is_main:
            done = {"event": "done", "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
                    "epochs": args.epochs, "checkpoint": str(output.join(checkpoint.BEST))}  # fmt: skip
            print(json.dumps(done), flush=True)


def run_epoch(args, state: TrainingState, ddp, epochs, world: World, autocast, storage: Storage, output: S3Url,
              preemption: Preemption, progress: Progress | None, writer: checkpoint.Writer | None) -> None:  # fmt: skip
    """Trains and evaluates the epoch in progress from where it stands, checkpointing on the way."""
    device, epoch, started = world.device, state.epoch, time.monotonic()
    torch.manual_seed(hash_seed(args.seed, epoch, world.rank))
    first_world = state.stretches[0]["world_size"] if state.stretches else world.world_size
    ranks = continue_epoch(epochs.assignment(epoch, first_world), state.stretches, world.world_size)
    if state.stretches and state.stretches[-1]["world_size"] != world.world_size and world.is_main:
        before = state.stretches[-1]
        batch, batch_before = world.world_size * args.batch_size, before["world_size"] * before["batch_size"]
        log(f"epoch {epoch} goes on with {world.world_size} ranks instead of {before['world_size']}: its "
            f"{sum(map(len, ranks))} untrained samples are split across them, and the global batch is "
            f"{batch} instead of {batch_before}")  # fmt: skip
    # Every rank takes as many steps as the rank with most samples (train_one_epoch pads the others).
    steps = max(math.ceil(len(ids) / args.batch_size) for ids in ranks)
    stretch = {"world_size": world.world_size, "batch_size": args.batch_size, "steps": 0}
    loader = epochs.train_loader(epoch, ranks[world.rank])
    steps_before, steps_total = state.steps_done, state.steps_done + steps
    # The run's optimizer steps before this epoch, counted as each epoch took them (a resume on another
    # number of ranks changes the count per epoch), so that the metrics' step only grows. A record from
    # a checkpoint older than the count takes this epoch's: the numbering those runs had.
    steps_earlier = sum(r.get("steps", steps_total) for r in state.history)
    trained_before = sum(s["world_size"] * s["batch_size"] * s["steps"] for s in state.stretches)

    def set_rate(step: int) -> None:
        done = min(1.0, (trained_before + step * world.world_size * args.batch_size) / max(epochs.samples, 1))
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate(args, epoch, done)

    set_rate(1)

    def totals(sums: torch.Tensor, seen: int) -> torch.Tensor:
        """[loss * n, correct, n] of the epoch so far, over every rank and every stretch of it."""
        mine = torch.cat([sums.cpu(), torch.tensor([float(seen)], dtype=torch.float64)])
        return all_reduce_sum(mine, device) + torch.tensor(state.train_sums, dtype=torch.float64)

    def save_progress(sums: torch.Tensor, seen: int) -> str:
        sync_buffers(ddp.module, world)
        total = totals(sums, seen)
        name = checkpoint.checkpoint_name(epoch, steps_before + stretch["steps"])
        if world.is_main:
            snapshot = state.state_dict() | {
                "stretches": [*state.stretches, dict(stretch)],
                "train_sums": total.tolist(),
            }
            writer.save(snapshot, name, is_best=False)
        return name

    def after_step(step: int, sums: torch.Tensor, seen: int, loss: torch.Tensor) -> bool:
        stretch["steps"] = step
        if args.warmup_epochs:
            set_rate(step + 1)
        done = steps_before + step
        if world.is_main:
            logged = step % args.log_every == 0 or step == steps
            value = loss.item() if logged else None  # one GPU sync per --log-every steps, not per step
            if logged:
                log(f"epoch {epoch}/{args.epochs} step {done}/{steps_total} loss {value:.4f}")
            progress.step(epoch, done, steps_total, value, state.best_val_acc, steps_earlier + done)
        stop = any_rank(preemption.requested)  # every rank, every step: on the CPU, never waiting for the GPU
        if stop or (args.checkpoint_every and done % args.checkpoint_every == 0):
            name = save_progress(sums, seen)
        if stop:
            raise Preempted(f"{name} was written" if world.is_main else f"rank 0 writes {name}")  # not waited for
        return False

    sums, seen = train_one_epoch(ddp, loader, steps, epochs.sample_shape, state.optimizer, state.scaler, autocast,
                                 device, after_step)  # fmt: skip
    sync_buffers(ddp.module, world)  # what the next epoch's first forward would do: evaluate and save those
    total = totals(sums, seen)
    count = max(total[2].item(), 1)
    stats = {"train_loss": total[0].item() / count, "train_acc": total[1].item() / count,
             "train_samples": int(total[2].item()), "train_seconds": round(time.monotonic() - started, 3)}  # fmt: skip
    evaluating = time.monotonic()
    stats |= evaluate(epochs.evaluated, epochs.val_loader(epoch), len(state.classes), autocast, device)
    eval_seconds = time.monotonic() - evaluating
    record = {"event": "epoch", "epoch": epoch, "lr": learning_rate(args, epoch, 1.0), **stats, "steps": steps_total,
              "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
    is_best = state.finish_epoch(record)
    if world.is_main:
        writer.save(state.state_dict(), checkpoint.checkpoint_name(epoch), is_best)
        metrics = "".join(json.dumps(r) + "\n" for r in state.history)
        storage.write_bytes(output.join("metrics.jsonl"), metrics.encode(), "application/x-ndjson")
        print(json.dumps({k: v for k, v in record.items() if k != "val_per_class_acc"}), flush=True)
        progress.epoch_end(record, state.best_val_acc, eval_seconds, state.classes)
    if any_rank(preemption.requested):
        raise Preempted(f"{checkpoint.checkpoint_name(epoch)} was written")


def main(args: argparse.Namespace, inputs: RunInputs) -> int:
    preemption = Preemption()
    try:
        run(args, inputs, preemption)
    except Preempted as stopped:
        log(f"stopped by SIGTERM ({stopped}); a restart goes on from the newest checkpoint (exit {PREEMPTED})")
        return PREEMPTED
    except Exception as err:
        return failed(err)
    return 0
