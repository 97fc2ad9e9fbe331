"""Benchmarks that time the trainer itself: the feature cache against the seed's recomputation, and
DDP scaling on CPU. Each contender is a real `python -m training` (or torchrun) process on the same
dataset in MinIO, run one after the other on the same machine.

  feature_cache  12 epochs of --freeze fc: recomputing the backbone every epoch (--no-feature-cache,
                 the seed's way) against the feature cache; both from the same pretrained backbone.
                 speedup = ratio of the 12 epochs' wall time; acc_delta = cache - recompute (points
                 of best validation accuracy). Goal: speedup >= 5, |acc_delta| <= 1 point.
  ddp            training throughput (images/s of train_one_epoch, median of epochs after the first)
                 of 2 ranks x 1 thread against 1 rank x 1 thread: resnet18, 96 px, batch 32 per rank,
                 gloo. Goal >= 1.7x.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, median, stdev

from benchmarks.common import ROOT, in_workdir, make_images, report, run_script, storage_from_env
from benchmarks.photos import make_photos
from training.storage import parse_url

DATASET = "s3://petal/bench/trainer-shapes"


def prepare_dataset(workdir: Path, per_class: int) -> str:
    images = make_images(workdir / "images", classes=8, per_class=per_class, size=128)
    run_script("upload_dataset.py", str(images), DATASET)
    return DATASET


def clear(output: str) -> None:
    storage = storage_from_env()
    for url in storage.list(parse_url(output)):
        storage.delete(url)


def train(output: str, args: list[str], nproc: int = 1, threads: int | None = None,
          data: str = DATASET) -> tuple[list[dict], float]:  # fmt: skip
    """Runs the trainer to completion in a fresh --output; returns its epoch records and wall time."""
    clear(output)
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        if nproc > 1
        else [sys.executable]
    )
    argv = [*launcher, "-m", "training", "--data", data, "--output", output, "--arch", "resnet18", *args]
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"benchmarks: trainer failed:\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return [r for r in records if r["event"] == "epoch"], wall


@in_workdir("petal-bench-fc-")
def feature_cache(args, work: Path) -> dict:
    prepare_dataset(work, per_class=args.per_class)
    common = ["--image-size", "160", "--batch-size", "32", "--workers", "1", "--epochs", "12", "--freeze", "fc"]
    # A backbone that has learnt something, as ImageNet weights would have: a short full training.
    backbone = "s3://petal/bench/fc-backbone"
    train(backbone, ["--image-size", "160", "--batch-size", "32", "--workers", "1", "--epochs", "3",
                     "--freeze", "none", "--pretrained", "none"])  # fmt: skip
    pretrained = ["--pretrained", f"{backbone}/best.pt", "--lr", "0.01"]
    runs = {
        "recompute": train("s3://petal/bench/fc-recompute", [*common, *pretrained, "--no-feature-cache"]),
        "feature_cache": train("s3://petal/bench/fc-cache", [*common, *pretrained]),
    }
    epoch_seconds = {name: sum(r["seconds"] for r in records) for name, (records, _) in runs.items()}
    best = {name: max(r["val_acc"] for r in records) for name, (records, _) in runs.items()}
    speedup = epoch_seconds["recompute"] / epoch_seconds["feature_cache"]
    acc_delta = 100 * (best["feature_cache"] - best["recompute"])
    rows = [(f"{name} 12 epochs (s)", f"{epoch_seconds[name]:7.1f}   best val_acc {best[name]:.3f}   "
             f"process wall {runs[name][1]:.1f}s") for name in runs]  # fmt: skip
    rows += [("speedup", f"{speedup:7.2f}x  (goal >= 5x{'' if speedup >= 5 else ', MISSED'})"),
             ("acc_delta", f"{acc_delta:+7.2f} points  (goal within +-1)")]  # fmt: skip
    result = {
        "epoch_seconds": epoch_seconds,
        "process_wall_seconds": {name: wall for name, (_, wall) in runs.items()},
        "best_val_acc": best,
        "speedup": speedup,
        "acc_delta": acc_delta,
        "goals": {"speedup": 5.0, "acc_delta_abs": 1.0},
    }
    return report("feature_cache", rows, result, args.json)


@in_workdir("petal-bench-ddp-")
def ddp(args, work: Path) -> dict:
    prepare_dataset(work, per_class=args.per_class)
    common = ["--image-size", "96", "--batch-size", "32", "--workers", "0", "--epochs", "3", "--freeze", "none",
              "--pretrained", "none"]  # fmt: skip

    def throughput(records: list[dict]) -> float:
        return median([r["train_samples"] / r["train_seconds"] for r in records[1:]])

    one, _ = train("s3://petal/bench/ddp-1", common, nproc=1, threads=1)
    two, _ = train("s3://petal/bench/ddp-2", common, nproc=2, threads=1)
    rate = {"1_rank": throughput(one), "2_ranks": throughput(two)}
    scaling = rate["2_ranks"] / rate["1_rank"]
    rows = [(f"{name} x 1 thread images/s", f"{value:7.1f}") for name, value in rate.items()]
    rows.append(("scaling", f"{scaling:7.2f}x  (goal >= 1.7x{'' if scaling >= 1.7 else ', MISSED'})"))
    return report("ddp", rows, {"images_per_s": rate, "scaling": scaling, "goals": {"scaling": 1.7}}, args.json)


@in_workdir("petal-bench-resized-")
def resized_accuracy(args, work: Path) -> dict:
    """Accuracy of the same training on the stored-resized images (upload_dataset.py's default,
    short side 256) and on the originals (--short-side 0): same epochs and 224 px, paired by seed over
    --seeds seeds, since training from scratch on a few hundred images moves by points from one seed
    (or one byte of input) to the next. The task is realistic photographs, each class one half of one
    of them, so fine detail counts. Goal: the mean paired difference within 0.5 points."""
    images = make_photos(work / "halves", classes=14, per_class=40, upscale=True, halves=True)
    datasets = {"stored_256": "s3://petal/bench/halves-256", "original": "s3://petal/bench/halves-original"}
    run_script("upload_dataset.py", str(images), datasets["stored_256"], "--valid-fraction", "0.25")
    run_script("upload_dataset.py", str(images), datasets["original"], "--valid-fraction", "0.25", "--short-side", "0")
    common = ["--image-size", "224", "--batch-size", "32", "--workers", "1", "--epochs", str(args.epochs),
              "--freeze", "none", "--pretrained", "none", "--lr", "0.002"]  # fmt: skip
    best = {name: [] for name in datasets}
    seconds = {name: [] for name in datasets}
    for seed in range(args.seeds):
        for name, url in datasets.items():
            records, _ = train(f"s3://petal/bench/resized-{name}", [*common, "--seed", str(seed)], nproc=2, data=url)
            best[name].append(max(r["val_acc"] for r in records))
            seconds[name].append(sum(r["train_seconds"] for r in records))
    deltas = [100 * (stored - original) for stored, original in zip(best["stored_256"], best["original"], strict=True)]
    delta = mean(deltas)
    stderr = stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else float("nan")
    rows = [
        (f"{name}: best val_acc", f"mean {mean(accs):.4f}, per seed {' '.join(f'{a:.3f}' for a in accs)}; "
         f"{mean(seconds[name]):.0f}s per run")
        for name, accs in best.items()
    ]  # fmt: skip
    verdict = "" if abs(delta) <= 0.5 else ", MISSED"
    rows.append(("stored - original", f"{delta:+.2f} points, standard error {stderr:.2f} over {len(deltas)} seeds  "
                 f"(goal within +-0.5{verdict})"))  # fmt: skip
    result = {"best_val_acc": best, "train_seconds": seconds, "delta_points_per_seed": deltas, "delta_points": delta,
              "delta_stderr": stderr, "epochs": args.epochs, "goals": {"delta_points_abs": 0.5}}  # fmt: skip
    return report("resized_accuracy", rows, result, args.json)
