"""A set of realistic photographs without the internet: crops of the real photos scikit-image ships
(`skimage.data`), each scaled so that its short side is 500 px, as in Flowers-102, and saved as a
JPEG of camera quality. Decode cost follows the images' entropy, which flat synthetic shapes lack.

    python -m benchmarks.photos OUT --classes 8 --per-class 60
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(np.asarray(getattr(skimage.data, name)())[..., :3])


def make_photos(out: Path, classes: int, per_class: int, short_side: int = 500, seed: int = 0,
                halves: bool = False) -> Path:  # fmt: skip
    """OUT/<class>/*.jpg and OUT/cat_to_name.json (made once; kept for later runs). A class is one photo,
    or with `halves` one half (left, right) of one: then only detail tells neighbouring classes apart."""
    if (out / "cat_to_name.json").exists():
        return out
    rng = random.Random(seed)
    sources = {name: photo(name) for name in PHOTOS}
    names = {}
    for c in range(classes):
        source = PHOTOS[(c // 2 if halves else c) % len(PHOTOS)]
        names[str(c + 1)] = f"{source} {'left right'.split()[c % 2]}" if halves else source
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
            crop = crop.resize((round(crop.width * ratio), round(crop.height * ratio)), Image.Resampling.BICUBIC)
            crop.save(folder / f"{source}_{i:04d}.jpg", quality=90)
    (out / "cat_to_name.json").write_text(json.dumps(names))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=60)
    args = parser.parse_args()
    print(make_photos(args.out, args.classes, args.per_class))
