#!/usr/bin/env python3
"""Classifies images with a petal checkpoint (a local file or an s3:// object).

    python scripts/predict.py runs/demo/best.pt rose.jpg tulip.jpg --top-k 5
    python scripts/predict.py s3://petal/runs/demo/best.pt rose.jpg --json

Prints, per image, the top-k class names with their probabilities; --json gives one JSON object
per image instead: {"image": PATH, "top": [{"class": NAME, "probability": P}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import UnidentifiedImageError

from training import checkpoint
from training.exit_codes import leave
from training.model import load_checkpoint_model
from training.storage import Storage, StorageError
from training.views import decode_image, model_input


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="best.pt: local path or s3://BUCKET/KEY")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    args = parser.parse_args(argv)
    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k {args.top_k} must be at least 1")
        if not args.checkpoint.startswith("s3://") and not Path(args.checkpoint).is_file():
            raise ValueError(f"checkpoint {args.checkpoint} does not exist")
        storage = Storage.from_env() if args.checkpoint.startswith("s3://") else None
        state = checkpoint.load(storage, args.checkpoint)
        if not {"model", "config", "classes"} <= set(state):
            raise checkpoint.CheckpointError(f"{args.checkpoint} is a torch file but not a petal checkpoint")
        model = load_checkpoint_model(state)
        classes = state["classes"]
        k = min(args.top_k, len(classes))
        for path in args.images:
            try:
                size = state["config"]["image_size"]
                batch = model_input(decode_image(path.read_bytes(), size), size)
            except (OSError, UnidentifiedImageError) as err:
                raise ValueError(f"{path} is not a readable image ({err})") from None
            with torch.no_grad():
                probabilities = model(batch).softmax(1)[0]
            top = [
                {"class": classes[i], "probability": round(p, 4)}
                for p, i in zip(*(t.tolist() for t in probabilities.topk(k)), strict=True)
            ]
            if args.json:
                print(json.dumps({"image": str(path), "top": top}))
            else:
                print(f"{path}: " + ", ".join(f"{t['class']} {t['probability']:.1%}" for t in top))
    except (ValueError, StorageError, checkpoint.CheckpointError) as err:
        print(f"predict: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    leave(main())
