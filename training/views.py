"""What the model sees of an image: decoded, its short side resized, rotated (training only),
centre-cropped, normalised. One geometry (`view`) whether PIL runs it in a DataLoader worker or
torchvision on the GPU after nvJPEG (`DecodeOnGpu`, through `views`: a batch's rotations and crops
in one grid_sample).

Workers hand over uint8 pixels — a quarter of float32's bytes through /dev/shm and the host-to-device
copy — and the rank normalises each batch on its device with constants made once (`normalize`).
A training view's rotation is drawn from (seed, epoch or view, sample) by an RNG of its own
(`rotation`), never torch's global one: reseeding that per image would reseed every GPU's generator
too, and which process decodes a sample must not matter.
"""

from __future__ import annotations

import math
import random
from functools import cache
from io import BytesIO

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_ROTATION = 20  # degrees either way: the seed's RandomRotation(20)
# Which version of the decode and views a feature cache was computed with: raise it whenever they
# change what a view's pixels are (2: resize before rotation, JPEG draft decode; 3: rotations from
# their own RNG).
VIEWS_VERSION = 3


def decode_image(data: bytes, draft_side: int | None = None) -> Image.Image:
    """An RGB image. With `draft_side`, a JPEG larger than needed is decoded at a reduced scale (1/2,
    1/4, 1/8: PIL's draft, done in the decoder) while both sides stay at least `draft_side`, which is
    all a view of that size uses."""
    with Image.open(BytesIO(data)) as image:
        if draft_side and image.format == "JPEG":
            image.draft("RGB", (draft_side, draft_side))
        return image.convert("RGB")


def rotation(*seed: object) -> float:
    """The training view's angle for this (seed, epoch or view, sample key): uniform in ±MAX_ROTATION."""
    return random.Random("/".join(map(str, seed))).uniform(-MAX_ROTATION, MAX_ROTATION)


def view(image, image_size: int, angle: float | None):
    """The view of a PIL image or a CHW uint8 tensor: the short side resized to `image_size` (on 8-bit
    pixels, before anything is a float), rotated by `angle` degrees (None: the evaluation view), the
    centre `image_size` square cut out."""
    image = F.resize(image, [image_size], antialias=True)
    if angle is not None:
        image = F.rotate(image, angle)
    return F.center_crop(image, [image_size, image_size])


def views(images: list[torch.Tensor], image_size: int, angles: list[float] | None) -> torch.Tensor:
    """`view` of each CHW uint8 image (all on one device) as one NCHW batch, the training views' rotations
    and centre crops done together: one grid_sample over the resized images on a zero canvas of the
    largest, their geometry sent in one copy. Through `view` one by one, F.rotate makes every image's
    affine matrix on the host and copies it over, with a dozen small kernels each."""
    if angles is None:
        return torch.stack([view(image, image_size, None) for image in images])
    resized = [F.resize(image, [image_size], antialias=True) for image in images]
    canvas = resized[0].new_zeros((len(resized), 3, max(r.shape[-2] for r in resized),
                                   max(r.shape[-1] for r in resized)))  # fmt: skip
    geometry = []
    for i, (image, angle) in enumerate(zip(resized, angles, strict=True)):
        height, width = image.shape[-2:]
        canvas[i, :, :height, :width] = image
        # F.rotate's inverse map (it turns by -angle about the image's centre) and F.center_crop's corner
        turn = math.radians(-angle)
        geometry.append([height, width, round((height - image_size) / 2), round((width - image_size) / 2),
                         math.cos(turn), math.sin(turn)])  # fmt: skip
    height, width, top, left, cos, sin = _on(torch.tensor(geometry), canvas.device).unbind(1)
    steps = _steps(image_size, canvas.device)
    x = (left[:, None] + steps - (width[:, None] - 1) / 2)[:, None, :]  # the crop's pixels about the centre
    y = (top[:, None] + steps - (height[:, None] - 1) / 2)[:, :, None]
    cos, sin = cos[:, None, None], sin[:, None, None]
    source_x = cos * x + sin * y + ((width - 1) / 2)[:, None, None]
    source_y = cos * y - sin * x + ((height - 1) / 2)[:, None, None]
    grid = torch.stack(((2 * source_x + 1) / canvas.shape[-1] - 1, (2 * source_y + 1) / canvas.shape[-2] - 1), -1)
    sampled = torch.nn.functional.grid_sample(canvas.float(), grid, mode="nearest", padding_mode="zeros",
                                              align_corners=False)  # fmt: skip
    return sampled.to(torch.uint8)


def _on(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without the host waiting for the copy (pinned first on a GPU)."""
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


@cache
def _steps(size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(size, dtype=torch.float32, device=device)


def pixels(image: Image.Image) -> torch.Tensor:
    return F.pil_to_tensor(image)


@cache
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, 3, 1, 1)
    return (torch.tensor(IMAGENET_MEAN, device=device).view(shape),
            torch.tensor(IMAGENET_STD, device=device).view(shape))  # fmt: skip


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """A uint8 NCHW batch as the model takes it: float, scaled to [0, 1], normalised by ImageNet's
    statistics, on the batch's device (its constants made there once)."""
    mean, std = _constants(batch.device)
    return batch.float().div_(255).sub_(mean).div_(std)


def model_input(image: Image.Image, image_size: int) -> torch.Tensor:
    """One image's evaluation view as a batch of one (predict.py, augment's relevance check)."""
    return normalize(pixels(view(image, image_size, None))[None])


class OnDevice:
    """A DataLoader's uint8 batches moved to `device` and normalised there."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, keys in self.loader:
            yield normalize(images.to(self.device, non_blocking=True)), labels, keys


def encoded_batch(items: list) -> tuple:
    """A batch of still-encoded images as one uint8 buffer with each image's end offset (one shared-
    memory segment and one pinned copy per batch, not one per image)."""
    blobs, labels, keys, epochs = zip(*items, strict=True)
    buffer = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if any(blobs) else torch.empty(0)
    ends = torch.tensor([len(blob) for blob in blobs]).cumsum(0)
    return (buffer, ends), torch.tensor(labels), list(keys), list(epochs)


def split_encoded(buffer: torch.Tensor, ends: torch.Tensor) -> list[torch.Tensor]:
    starts = [0, *ends.tolist()[:-1]]
    return [buffer[start:end] for start, end in zip(starts, ends.tolist(), strict=True)]


class DecodeOnGpu:
    """--decode gpu: each batch's JPEGs decoded by nvJPEG on the rank's GPU in one call
    (torchvision.io.decode_jpeg), then viewed and normalised there, so that decoding stops needing a
    score of CPU cores per GPU. Augmentation is drawn per (seed, epoch, sample) as on the CPU path.
    An image nvJPEG cannot read (PNG, WebP, CMYK JPEG, …) is decoded by PIL and moved over; running
    out of GPU memory is never taken for that.

    On a GPU the next batch is decoded on a side stream while the model runs on the current one; each
    batch is handed over with an event the current stream waits on (the host never does)."""

    def __init__(self, loader, image_size: int, device: torch.device, *, seed: int, augment: bool):
        self.loader, self.image_size, self.device = loader, image_size, device
        self.seed, self.augment = seed, augment

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.device.type != "cuda":
            for encoded in self.loader:
                yield self._prepare(*encoded)
            return
        side = torch.cuda.Stream(self.device)
        pending = None
        for encoded in self.loader:
            with torch.cuda.stream(side):
                # nvJPEG writes on a stream of its own into memory allocated on `side`, without waiting
                # for `side`: what `side` still has queued (the last batch's views) must be done, or
                # memory it reads could be written under it (vision#9606). The current stream, where the
                # model runs, is not waited for: its memory is never handed to `side`.
                side.synchronize()
                batch = self._prepare(*encoded)
                decoded = side.record_event()
            if pending is not None:
                yield self._hand_over(*pending)
            pending = batch, decoded
        if pending is not None:
            yield self._hand_over(*pending)

    def _hand_over(self, batch: tuple, decoded) -> tuple:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(decoded)
        batch[0].record_stream(current)  # freed only once the model's use of it is done
        return batch

    def _prepare(self, encoded: tuple, labels: torch.Tensor, keys: list, epochs: list) -> tuple:
        from torchvision.io import ImageReadMode, decode_jpeg

        blobs = split_encoded(*encoded)
        try:
            images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # a PNG, GIF, CMYK JPEG, ... among them: one by one, those by PIL
            images = [self._decode_one(blob, decode_jpeg, ImageReadMode.RGB) for blob in blobs]
        angles = [rotation(self.seed, epoch, key) for key, epoch in zip(keys, epochs, strict=True)]
        return normalize(views(images, self.image_size, angles if self.augment else None)), labels, keys

    def _decode_one(self, blob: torch.Tensor, decode_jpeg, mode) -> torch.Tensor:
        try:
            return decode_jpeg(blob, mode=mode, device=self.device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            return pixels(decode_image(blob.numpy().tobytes())).to(self.device, non_blocking=True)


def gpu_decode_works(device: torch.device) -> bool:
    """Whether nvJPEG decodes here: --decode auto's test."""
    if device.type != "cuda":
        return False
    from torchvision.io import decode_jpeg

    buffer = BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG")
    try:
        decode_jpeg(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), device=device)
    except RuntimeError:
        return False
    return True
