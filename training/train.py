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

Exit codes say whether a restart can help (a PyTorchJob's restartPolicy ExitCode retries 128-255):

    0    done                                      143  SIGTERM: stopped after writing a checkpoint
    1    an unexpected error (a bug; traceback)    137  SIGKILL (OOM killer, node lost)
    2    bad arguments or launch environment       200  another rank was lost (collective failed)
    3    dataset missing or malformed              201  storage unreachable for PETAL_S3_RETRY_SECONDS
    4    checkpoint incompatible with this run     202  a collective timed out (--collective-timeout)
    5    storage refused (credentials, TLS, host, bucket)
    6    pretrained weights unusable
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from training import STARTED, checkpoint, plots
from training.data import ImageEpochs, SplitStream, continue_epoch, gpu_decode_works, hash_seed
from training.distributed import (
    LaunchError,
    World,
    all_reduce_sum,
    any_rank,
    from_rank_zero,
    is_peer_failure,
    process_group,
    sync_buffers,
)
from training.features import FeatureCache, FeatureEpochs, backbone_of
from training.model import PretrainedWeightsError, build_model, freeze, imagenet_state_dict, set_train_mode
from training.progress import Progress
from training.shards import DatasetError, read_index, split_names
from training.state import IncompatibleCheckpoint, TrainingState, reconcile, run_config
from training.storage import S3Url, Storage, StorageError, parse_url

PERMANENT = {LaunchError: 2, DatasetError: 3, IncompatibleCheckpoint: 4, checkpoint.CheckpointError: 4,
             PretrainedWeightsError: 6}  # fmt: skip
PREEMPTED, PEER_LOST, STORAGE_UNREACHABLE, COLLECTIVE_TIMEOUT = 143, 200, 201, 202

# torch 2.14 renamed DDP's broadcast_buffers; the pinned container base (torch 2.9) knows only the old name.
SYNC_BUFFERS = next(
    name
    for name in ("forward_sync_buffers", "broadcast_buffers")
    if name in inspect.signature(DistributedDataParallel).parameters
)


def log(message: str) -> None:
    print(f"petal: {message}", file=sys.stderr, flush=True)


def autocast_for(device: torch.device, amp: str):
    """The autocast context and whether fp16 needs a GradScaler. `auto` takes bf16 only where the GPU
    computes it natively (compute capability 8.0: A100, H100, L4, ...); `is_bf16_supported()` also
    counts emulation, which makes T4 and V100 slower than fp32."""
    if device.type != "cuda" or amp == "off":
        return nullcontext, False
    native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
    dtype = torch.bfloat16 if amp == "bf16" or (amp == "auto" and native_bf16) else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), dtype == torch.float16


def train_one_epoch(model, loader, optimizer, scaler, autocast, device, after_step) -> torch.Tensor:
    """One pass over this rank's loader; returns its [loss * n, correct, n]. `after_step(step, sums,
    loss)` runs after every optimizer step and returns True to stop the epoch there."""
    set_train_mode(model.module)
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # on the device: no sync per step
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
            sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == labels).sum().double(),
                                 torch.tensor(float(n), device=device, dtype=torch.float64)])  # fmt: skip
            if after_step(step, sums, loss):
                break
    return sums


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
        n = torch.tensor(float(labels.numel()), device=device, dtype=torch.float64)
        loss = F.cross_entropy(logits, labels, reduction="sum").double()
        sums += torch.stack([loss, hit1.sum().double(), hit5.sum().double(), n])
        per_class[0] += torch.bincount(labels[hit1], minlength=num_classes)
        per_class[1] += torch.bincount(labels, minlength=num_classes)
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


def write_results(storage: Storage, output: S3Url, history: list[dict], class_names: list[str]) -> dict:
    best = max(history, key=lambda r: r["val_acc"])
    storage.write_bytes(output.join("curves.png"), plots.curves_png(history), "image/png")
    storage.write_bytes(
        output.join("per_class.png"),
        plots.per_class_png(class_names, best["val_per_class_acc"], best["epoch"]),
        "image/png",
    )
    return best


def epoch_source(args, model, train: SplitStream, val: SplitStream, world: World, autocast):
    """Where each epoch's batches come from: decoded images, or cached backbone features."""
    if args.freeze == "fc" and args.feature_cache:
        cache = FeatureCache(backbone_of(model), world.device, args.image_size, args.seed,
                             batch_size=args.batch_size, workers=args.workers, autocast=autocast,
                             width=model.fc.in_features, directory=args.feature_cache_dir,
                             dataset=f"{train.fingerprint}/{val.fingerprint}")  # fmt: skip
        return FeatureEpochs(model, train, val, cache=cache, views=args.cache_views, seed=args.seed,
                             rank=world.rank, world_size=world.world_size, batch_size=args.batch_size)  # fmt: skip
    on_gpu = args.decode == "gpu" or (args.decode == "auto" and gpu_decode_works(world.device))
    return ImageEpochs(model, train, val, image_size=args.image_size, seed=args.seed, rank=world.rank,
                       world_size=world.world_size, batch_size=args.batch_size, workers=args.workers,
                       pin_memory=world.device.type == "cuda", decode_on=world.device if on_gpu else None)  # fmt: skip


class Preempted(Exception):
    """SIGTERM was received: the ranks wrote a checkpoint together and stop."""


class Preemption:
    """SIGTERM (a pod deleted or preempted, torchrun stopping its workers). Outside the epoch loop it
    ends the process at once; inside, it is only noted, and at the next step (or epoch end) every
    rank learns of it, a checkpoint is written and all stop, so a restart loses no step."""

    def __init__(self):
        self.requested = False
        self.deferring = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        if not self.deferring:
            raise Preempted("before training began, so nothing needed saving")

    @contextmanager
    def deferred(self):
        self.deferring = True
        try:
            if self.requested:
                raise Preempted("before training began, so nothing needed saving")
            yield
        finally:
            self.deferring = False


def on_node_leader_first(world: World, what: str, fn):
    """fn() on each node's local rank 0 first (it downloads into the pod-local cache), then on the
    node's other ranks, which find its files: one download per node. A failure anywhere stops all."""
    error = None
    if world.local_rank == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after every rank has heard of it
            error = err
    if any_rank(error is not None):
        if error is not None:
            raise error
        raise PeerFailed(f"another rank failed while {what}")
    return fn() if world.local_rank != 0 else result


class PeerFailed(Exception):
    """Another rank failed; its own log says why."""


def resume_point(storage: Storage, output: S3Url, args, config: dict, classes: list[str], data: str, world: World):
    """The checkpoint every rank resumes from, as rank 0 decided it (None for a fresh run); each node
    downloads it once and verifies it. Rank 0's refusal is every rank's."""
    decision = None
    if world.is_main:
        try:
            chosen = checkpoint.choose(storage, output, args.cache_dir / "checkpoints", log)
            if chosen is not None:
                saved = checkpoint.load(None, str(checkpoint.local_path(chosen, args.cache_dir / "checkpoints")))
                reconcile(saved, config, classes, data, str(output), log)
            decision = ("resume", chosen)
        except (IncompatibleCheckpoint, checkpoint.CheckpointError, StorageError) as err:
            decision = ("refused", type(err).__name__, str(err))
    decision = from_rank_zero(decision)
    if decision[0] == "refused":
        kind = {"IncompatibleCheckpoint": IncompatibleCheckpoint, "StorageError": StorageError}
        raise kind.get(decision[1], checkpoint.CheckpointError)(decision[2])
    chosen = decision[1]
    if chosen is None:
        return None

    def fetch() -> dict:
        directory = args.cache_dir / "checkpoints"
        if not checkpoint.fetch(storage, output, chosen, directory):
            raise StorageError(f"{output.join(chosen['checkpoint'])} vanished or changed while the ranks resumed")
        return checkpoint.load(None, str(checkpoint.local_path(chosen, directory)))

    return on_node_leader_first(world, "downloading the checkpoint", fetch)


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


def run(args: argparse.Namespace, preemption: Preemption) -> None:
    startup = Stopwatch()
    startup.lap("imports")
    world = World.from_env()
    if args.decode == "gpu" and world.device.type != "cuda":
        raise LaunchError(f"--decode gpu needs a GPU; this rank runs on {world.device.type} (use auto or cpu)")
    storage = Storage.from_env()
    data, output = parse_url(args.data), parse_url(args.output)
    index = read_index(storage, data)
    train_splits = split_names(index, args.train_splits.split(","))
    (val_split,) = split_names(index, [args.val_split])
    for split in (*train_splits, val_split):
        stored = index["splits"][split].get("short_side")
        if stored and stored < args.image_size and world.is_main:
            log(f"{split}'s images are stored at short side {stored}, below --image-size {args.image_size}: "
                "they are upscaled; re-upload with scripts/upload_dataset.py --short-side 0 (or larger) for "
                "the detail")  # fmt: skip
    class_names = [c["name"] for c in index["classes"]]
    config = run_config(args)
    storage.require_bucket(output)
    args = argparse.Namespace(**vars(args) | {"batch_size": rank_batch_size(args, world)})
    if world.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels

    startup.lap("dataset")
    with process_group(world, timeout=timedelta(minutes=args.collective_timeout)):
        startup.lap("rendezvous")
        device = world.device
        train = SplitStream(storage, data, index, train_splits, args.cache_dir)
        val = SplitStream(storage, data, index, [val_split], args.cache_dir)
        saved = resume_point(storage, output, args, config, class_names, train.fingerprint, world)
        startup.lap("resume")
        # Backbone weights are only needed for a fresh run; a resumed one has them in its checkpoint.
        backbone = None
        if saved is None:
            backbone = on_node_leader_first(world, "loading the pretrained weights",
                                            lambda: imagenet_state_dict(args.arch, args.pretrained, storage,
                                                                        args.cache_dir))  # fmt: skip
        torch.manual_seed(args.seed)
        model = build_model(args.arch, len(class_names), backbone).to(device, memory_format=memory_format(device))
        optimizer = make_optimizer(args, freeze(model, args.freeze))
        autocast, needs_scaler = autocast_for(device, args.amp)
        state = TrainingState(model, optimizer, torch.amp.GradScaler(device.type, enabled=needs_scaler), config,
                              class_names, train.fingerprint)  # fmt: skip
        if saved is not None:
            state.load_state_dict(saved)
            if world.is_main:
                log(f"resuming {output} at epoch {state.epoch}, step {state.steps_done} "
                    f"(best val_acc {state.best_val_acc:.4f})")  # fmt: skip
                print(json.dumps({"event": "resumed", "epoch": state.epoch, "step": state.steps_done}), flush=True)
        epochs = epoch_source(args, model, train, val, world, autocast)
        # Frozen BatchNorm statistics are identical everywhere, so only broadcast buffers that train.
        ddp = DistributedDataParallel(
            epochs.trained,
            device_ids=[device] if device.type == "cuda" else None,
            **{SYNC_BUFFERS: args.freeze != "fc"},
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: one copy fewer per step
        )

        progress = None
        if world.is_main:
            events = args.cache_dir / "tensorboard" / hashlib.sha256(str(output).encode()).hexdigest()[:16]
            progress = Progress(storage, output, args.epochs, world.world_size * args.batch_size, events)
            startup.lap("model")
            batch = f"global batch {world.world_size * args.batch_size} ({args.batch_size} per rank)"
            log(f"{world.world_size} process(es), {world.backend} on {device.type}, {batch}; training {args.data} "
                f"into {output}")  # fmt: skip
            log(str(startup))
        try:
            with preemption.deferred():
                while state.epoch <= args.epochs:
                    run_epoch(args, state, ddp, epochs, world, autocast, storage, output, preemption, progress)
        finally:
            epochs.close()

        if world.is_main:
            progress.close()
            best = write_results(storage, output, state.history, class_names)
            done = {"event": "done", "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
                    "epochs": args.epochs, "checkpoint": str(output.join(checkpoint.BEST))}  # fmt: skip
            print(json.dumps(done), flush=True)


def run_epoch(args, state: TrainingState, ddp, epochs, world: World, autocast, storage: Storage, output: S3Url,
              preemption: Preemption, progress: Progress | None) -> None:  # fmt: skip
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
    # Every rank takes part in the checkpoint and stop collectives only while every rank still trains.
    together = min(math.ceil(len(ids) / args.batch_size) for ids in ranks)
    stretch = {"world_size": world.world_size, "batch_size": args.batch_size, "steps": 0}
    loader = epochs.train_loader(epoch, ranks[world.rank])
    steps_before, steps_total = state.steps_done, state.steps_done + len(loader)
    trained_before = sum(s["world_size"] * s["batch_size"] * s["steps"] for s in state.stretches)

    def set_rate(step: int) -> None:
        done = min(1.0, (trained_before + step * world.world_size * args.batch_size) / max(epochs.samples, 1))
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate(args, epoch, done)

    set_rate(1)

    def save_progress(sums: torch.Tensor) -> str:
        sync_buffers(ddp.module, world)
        total = all_reduce_sum(sums, device) + torch.tensor(state.train_sums, dtype=torch.float64)
        name = checkpoint.checkpoint_name(epoch, steps_before + stretch["steps"])
        if world.is_main:
            snapshot = state.state_dict() | {
                "stretches": [*state.stretches, dict(stretch)],
                "train_sums": total.tolist(),
            }
            checkpoint.save(storage, output, snapshot, name, False, args.keep_checkpoints)
        return name

    def after_step(step: int, sums: torch.Tensor, loss: torch.Tensor) -> bool:
        stretch["steps"] = step
        if args.warmup_epochs:
            set_rate(step + 1)
        done = steps_before + step
        if world.is_main:
            logged = step % args.log_every == 0 or step == len(loader)
            value = loss.item() if logged else None  # one GPU sync per --log-every steps, not per step
            if logged:
                log(f"epoch {epoch}/{args.epochs} step {done}/{steps_total} loss {value:.4f}")
            progress.step(epoch, done, steps_total, value, state.best_val_acc)
        if step >= together:  # the next step may leave some ranks joined: checkpoint only before it
            return False
        stop = any_rank(preemption.requested)
        if stop or (args.checkpoint_every and done % args.checkpoint_every == 0):
            name = save_progress(sums)
        if stop:
            raise Preempted(f"{name} was written")
        return False

    sums = train_one_epoch(ddp, loader, state.optimizer, state.scaler, autocast, device, after_step)
    sync_buffers(ddp.module, world)  # what the next epoch's first forward would do: evaluate and save those
    total = all_reduce_sum(sums, device) + torch.tensor(state.train_sums, dtype=torch.float64)
    seen = max(total[2].item(), 1)
    stats = {"train_loss": total[0].item() / seen, "train_acc": total[1].item() / seen,
             "train_samples": int(total[2].item()), "train_seconds": round(time.monotonic() - started, 3)}  # fmt: skip
    evaluating = time.monotonic()
    stats |= evaluate(epochs.evaluated, epochs.val_loader(epoch), len(state.classes), autocast, device)
    eval_seconds = time.monotonic() - evaluating
    record = {"event": "epoch", "epoch": epoch, "lr": learning_rate(args, epoch, 1.0), **stats,
              "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
    is_best = state.finish_epoch(record)
    if world.is_main:
        checkpoint.save(storage, output, state.state_dict(), checkpoint.checkpoint_name(epoch), is_best,
                        args.keep_checkpoints)  # fmt: skip
        metrics = "".join(json.dumps(r) + "\n" for r in state.history)
        storage.write_bytes(output.join("metrics.jsonl"), metrics.encode(), "application/x-ndjson")
        print(json.dumps({k: v for k, v in record.items() if k != "val_per_class_acc"}), flush=True)
        progress.epoch_end(record, state.best_val_acc, eval_seconds, state.classes)
    if any_rank(preemption.requested):
        raise Preempted(f"{checkpoint.checkpoint_name(epoch)} was written")


def exit_code(err: BaseException) -> int:
    """What a failure means for a restart (see the table at the top)."""
    for kind, code in PERMANENT.items():
        if isinstance(err, kind):
            return code
    if isinstance(err, StorageError):
        return STORAGE_UNREACHABLE if err.transient else 5
    if isinstance(err, Preempted):
        return PREEMPTED
    if isinstance(err, PeerFailed) or is_peer_failure(err):
        return COLLECTIVE_TIMEOUT if "timed out" in str(err).lower() else PEER_LOST
    return 1


def main(args: argparse.Namespace) -> int:
    preemption = Preemption()
    try:
        run(args, preemption)
    except Preempted as stopped:
        log(f"stopped by SIGTERM ({stopped}); a restart goes on from the newest checkpoint (exit {PREEMPTED})")
        return PREEMPTED
    except Exception as err:
        code = exit_code(err)
        if code == 1:
            raise  # a bug: the traceback is what a person needs
        print(f"petal: error: {str(err).splitlines()[0] if str(err) else type(err).__name__} (exit {code})",
              file=sys.stderr, flush=True)  # fmt: skip
        return code
    return 0
