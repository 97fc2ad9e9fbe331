"""A set of realistic photographs without the internet: crops of every photograph scikit-image ships
(`skimage.data`, the grey ones as RGB) and scikit-learn's two sample images, at their native
resolution: downscaled where the short side is above 500 px (Flowers-102's), never upscaled, which
would smooth them. Saved as JPEGs of camera quality. Decode cost follows the images' entropy, which
flat synthetic shapes and upscaled photos lack; `jpeg_density` measures it.

    python -m benchmarks.photos OUT --classes 21 --per-class 20
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

# The first seven are colour photos, the classes of the `halves` set (benchmarks/trainer_runs.py).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "china.jpg", "flower.jpg", "brick", "camera", "cell", "clock", "coins", "grass",
          "gravel", "microaneurysms", "moon", "page", "text")  # fmt: skip


def photo(name: str) -> Image.Image:
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        pixels = load_sample_image(name)
    else:
        import skimage.data

        pixels = getattr(skimage.data, name)()
        pixels = pixels[0] if name == "stereo_motorcycle" else pixels  # (left, right, disparity): the left view
    return Image.fromarray(np.asarray(pixels)).convert("RGB")


def make_photos(out: Path, classes: int, per_class: int, short_side: int = 500, upscale: bool = False, seed: int = 0,
                halves: bool = False) -> Path:  # fmt: skip
    """OUT/<class>/*.jpg and OUT/cat_to_name.json (made once; kept for later runs). A class is one photo,
    or with `halves` one half (left, right) of one: then only detail tells neighbouring classes apart.
    Each crop's short side is scaled down to `short_side` where above it, and with `upscale` up to it
    as well (to compare stored sizes below it with originals above)."""
    if (out / "cat_to_name.json").exists():
        return out
    rng = random.Random(seed)
    used = [PHOTOS[(c // 2 if halves else c) % len(PHOTOS)] for c in range(classes)]
    sources = {name: photo(name) for name in set(used)}
    names = {}
    for c, source in enumerate(used):
        name = source.removesuffix(".jpg")
        names[str(c + 1)] = f"{name} {'left right'.split()[c % 2]}" if halves else name
        folder = out / str(c + 1)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = sources[source]
            if halves:
                half = image.width // 2
                image = image.crop((0, 0, half, image.height) if c % 2 == 0 else (half, 0, image.width, image.height))
            width, height = image.size
            scale = rng.uniform(0.55, 1.0)
            w, h = int(width * scale), int(height * scale * rng.choice((0.75, 1.0, 1.33)))
            w, h = min(w, width), min(h, height)
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            crop = image.crop((left, top, left + w, top + h))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            ratio = short_side / min(crop.size)
            if ratio < 1 or upscale:
                crop = crop.resize((round(crop.width * ratio), round(crop.height * ratio)), Image.Resampling.BICUBIC)
            crop.save(folder / f"{name}_{i:04d}.jpg", quality=90)
    (out / "cat_to_name.json").write_text(json.dumps(names))
    return out


def megapixels(image_file) -> float:
    """An image's size in megapixels, from its header alone: a path or a file object."""
    with Image.open(image_file) as image:
        return image.width * image.height / 1e6


def jpeg_density(files: list[Path]) -> dict[str, float]:
    """The set's compressed bytes per pixel (more entropy, more bytes, more decoding) and its mean
    megapixels per image (Flowers-102's: about 0.25 to 0.5)."""
    total = sum(map(megapixels, files))
    return {"jpeg_bytes_per_pixel": sum(file.stat().st_size for file in files) / (total * 1e6),
            "megapixels_per_image": total / len(files)}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=len(PHOTOS))
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args()
    print(make_photos(args.out, args.classes, args.per_class))
