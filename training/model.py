"""The classifier: a torchvision ResNet whose `fc` is replaced for the dataset's classes.

`--freeze` picks what trains (the rest keeps its pretrained weights *and* stays in eval mode, so
frozen BatchNorm statistics do not drift as they did under the seed's `model.train()`):

    fc      only the new head (the seed's recipe)
    layer4  the last residual stage and the head
    none    everything
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from training.config import ARCHS, FREEZE_CHOICES
from training.exit_codes import PretrainedWeightsError
from training.storage import Storage, parse_url

TRAINABLE_PREFIXES = {"fc": ("fc.",), "layer4": ("layer4.", "fc."), "none": ("",)}


def imagenet_state_dict(arch: str, pretrained: str, storage: Storage, cache_dir: Path | None = None):
    """The backbone weights `--pretrained` names: torchvision's ImageNet set (through torch hub's
    cache), an s3:// state_dict (downloaded once into `cache_dir`), or none."""
    if pretrained == "none":
        return None
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            return weights.get_state_dict(progress=False)
        except (URLError, OSError, RuntimeError) as err:
            raise PretrainedWeightsError(
                f"cannot fetch ImageNet weights for {arch} from {weights.url} ({err}); "
                "on an air-gapped cluster keep them in object storage and pass --pretrained s3://…"
            ) from None
    try:
        url = parse_url(pretrained)
    except ValueError:
        raise PretrainedWeightsError(
            f"--pretrained {pretrained!r} is not one of imagenet, none, s3://BUCKET/KEY"
        ) from None
    size = storage.size(url)
    if size is None:
        raise PretrainedWeightsError(f"--pretrained {url} does not exist")
    local = (cache_dir or Path(tempfile.gettempdir())) / "pretrained" / url.bucket / url.key
    if not (local.exists() and local.stat().st_size == size):
        storage.download(url, local)
    try:
        state = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as err:  # foreign bytes raise RuntimeError, pickle errors, EOFError, …
        raise PretrainedWeightsError(f"--pretrained {url} is not a torch state_dict ({type(err).__name__})") from None
    state = state.get("model", state) if isinstance(state, dict) else None
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"--pretrained {url} is not a torch state_dict (no tensors by name)")
    return state


def build_model(arch: str, num_classes: int, backbone: dict[str, torch.Tensor] | None) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    model = torchvision.models.get_model(arch, weights=None)
    if backbone is not None:
        # Whatever head the weights came with (ImageNet's 1000 classes, say) is replaced below.
        backbone = {k: v for k, v in backbone.items() if not k.startswith("fc.")}
        expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")}
        misfits = sorted(
            k for k in expected.keys() | backbone.keys() if expected.get(k) != getattr(backbone.get(k), "shape", None)
        )
        if misfits:
            raise PretrainedWeightsError(
                f"the pretrained weights do not fit {arch}: {len(misfits)} tensors missing or of another shape, "
                f"e.g. {misfits[0]}"
            )
        model.load_state_dict(backbone, strict=False)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def freeze(model: nn.Module, what: str) -> list[nn.Parameter]:
    """Turns gradients off outside the trainable part; returns the parameters that still train."""
    if what not in FREEZE_CHOICES:
        raise ValueError(f"unknown freeze {what!r}; choose one of {', '.join(FREEZE_CHOICES)}")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(TRAINABLE_PREFIXES[what])
        if param.requires_grad:
            trainable.append(param)
    return trainable


def set_train_mode(model: nn.Module) -> None:
    """Training mode for the trainable part only; frozen modules keep eval-mode BatchNorm."""
    model.train()
    for module in model.modules():
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()


def load_checkpoint_model(state: dict) -> nn.Module:
    """A model rebuilt from a petal checkpoint, weights loaded, in eval mode (for prediction)."""
    config = state["config"]
    model = build_model(config["arch"], len(state["classes"]), None)
    model.load_state_dict(state["model"])
    return model.eval()
