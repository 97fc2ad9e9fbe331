#!/usr/bin/env python3
"""Draws a small, learnable image set in the seed's layout, for tests and the demo.

    python scripts/make_synthetic_dataset.py /tmp/shapes --classes 6 --per-class 40

Each class is a coloured shape ("red circle", "blue triangle", ...) drawn at a random place, size
and angle on a noisy random background, with some JPEG loss. Writes
OUT/{train,valid,test}/<class-id>/*.jpg and OUT/cat_to_name.json, the seed's layout, which
scripts/upload_dataset.py reads. The same --seed draws the same images.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 30),
    "green": (40, 170, 60),
    "purple": (150, 50, 190),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
MAX_CLASSES = len(COLOURS) * len(SHAPES)


def class_styles(count: int) -> list[tuple[str, str]]:
    """(colour, shape) per class; neighbours differ in both, so even two classes are easy to tell apart."""
    colours = list(COLOURS)
    return [(colours[(i + i // len(SHAPES)) % len(colours)], SHAPES[i % len(SHAPES)]) for i in range(count)]


def polygon(cx: float, cy: float, radius: float, angle: float, points: list[tuple[float, float]]):
    return [(cx + radius * r * math.cos(angle + a), cy + radius * r * math.sin(angle + a)) for a, r in points]


def draw_sample(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(70, 180) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 5)):  # distractor blobs, in no class's colour
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size * 0.03, size * 0.1)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randint(90, 160) for _ in range(3)))
    radius = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
    angle = rng.uniform(0, 2 * math.pi)
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(radius * 0.35)))
    elif shape == "square":
        draw.polygon(polygon(cx, cy, radius, angle, [(k * math.pi / 2, 1.0) for k in range(4)]), fill=fill)
    elif shape == "triangle":
        draw.polygon(polygon(cx, cy, radius, angle, [(k * 2 * math.pi / 3, 1.0) for k in range(3)]), fill=fill)
    elif shape == "star":
        draw.polygon(
            polygon(cx, cy, radius, angle, [(k * math.pi / 5, 1.0 if k % 2 == 0 else 0.45) for k in range(10)]),
            fill=fill,
        )
    elif shape == "cross":
        w = radius * 0.3
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            draw.polygon(
                [
                    (cx + radius * dx - w * dy, cy + radius * dy + w * dx),
                    (cx + radius * dx + w * dy, cy + radius * dy - w * dx),
                    (cx - radius * dx + w * dy, cy - radius * dy - w * dx),
                    (cx - radius * dx - w * dy, cy - radius * dy + w * dx),
                ],
                fill=fill,
            )
    noise = Image.effect_noise((size, size), rng.uniform(10, 30)).convert("RGB")
    return Image.blend(image, noise, 0.12).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def make_dataset(out: Path, classes: int, per_class: dict[str, int], size: int, seed: int) -> dict[str, int]:
    styles = class_styles(classes)
    counts = {}
    for split, n in per_class.items():
        for label, (colour, shape) in enumerate(styles, 1):
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                rng = random.Random(f"{seed}/{split}/{label}/{k}")
                draw_sample(colour, shape, size, rng).save(folder / f"{shape}_{k:05d}.jpg", quality=rng.randint(70, 95))
        counts[split] = n * classes
    names = {str(label): f"{colour} {shape}" for label, (colour, shape) in enumerate(styles, 1)}
    (out / "cat_to_name.json").write_text(json.dumps(names, indent=1))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=5, help=f"2 to {MAX_CLASSES}")
    parser.add_argument("--per-class", type=int, default=40, help="training images per class")
    parser.add_argument(
        "--eval-per-class",
        type=int,
        default=None,
        help="images per class in valid and in test (default: per-class / 2)",
    )
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    eval_n = args.eval_per_class if args.eval_per_class is not None else max(1, args.per_class // 2)
    problems = [
        f"--classes {args.classes} must be 2 to {MAX_CLASSES}" * (not 2 <= args.classes <= MAX_CLASSES),
        f"--per-class {args.per_class} must be at least 1" * (args.per_class < 1),
        f"--eval-per-class {eval_n} must be at least 1" * (eval_n < 1),
        f"--size {args.size} must be at least 16" * (args.size < 16),
    ]
    if any(problems):
        print(f"make_synthetic_dataset: error: {next(p for p in problems if p)}", file=sys.stderr)
        return 2
    counts = make_dataset(
        args.out,
        args.classes,
        {"train": args.per_class, "valid": eval_n, "test": eval_n},
        args.size,
        args.seed,
    )
    print(json.dumps({"event": "synthetic", "out": str(args.out), "classes": args.classes, "splits": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
