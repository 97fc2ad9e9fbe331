"""Runs petal's benchmarks; each prints a table and, with --json, writes every figure.

    scripts/testbed.sh minio up && eval "$(scripts/testbed.sh env)"
    python -m benchmarks data --json runs/bench/data.json
    python -m benchmarks all --json runs/bench/all.json

Names: data, feature_cache, ddp, submit, resized_accuracy, checkpoint, all. What each measures and its goal:
benchmarks/data.py, benchmarks/trainer_runs.py, benchmarks/submitter.py, benchmarks/checkpoints.py. Ratios, not
absolute numbers, are what to compare across machines.
"""

import argparse
import json
from pathlib import Path

from benchmarks import checkpoints, data, submitter, trainer_runs

BENCHMARKS = {
    "data": data.run,
    "feature_cache": trainer_runs.feature_cache,
    "ddp": trainer_runs.ddp,
    "submit": submitter.run,
    "resized_accuracy": trainer_runs.resized_accuracy,
    "checkpoint": checkpoints.run,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--workdir", help="scratch directory (default: a new temporary one)")
    parser.add_argument("--rounds", type=int, default=3, help="data, checkpoint: rounds per contender, best kept")
    parser.add_argument("--workers", type=int, default=2, help="data: DataLoader workers for every contender")
    parser.add_argument("--images", type=int, default=462,
                        help="data: images in the set, rounded down to a multiple of its 21 photos")  # fmt: skip
    parser.add_argument("--per-class", type=int, default=60, help="feature_cache, ddp: training images per class")
    parser.add_argument("--epochs", type=int, default=8, help="resized_accuracy: epochs of each run")
    parser.add_argument("--arch", default="resnet152", help="checkpoint: the model whose training state is written")
    parser.add_argument("--seeds", type=int, default=3, help="resized_accuracy: seeds, each run on both contenders")
    args = parser.parse_args()
    if args.name != "all":
        BENCHMARKS[args.name](args)
        return
    combined = {}
    for name, run in BENCHMARKS.items():
        combined[name] = run(argparse.Namespace(**{**vars(args), "json": None}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(combined, indent=1))


main()
