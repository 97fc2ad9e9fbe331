"""What trains, what stays frozen, and where backbone weights come from."""

from __future__ import annotations

import io
from urllib.error import URLError

import pytest
import torch
import torchvision
from support import s3

from training.config import parse_args
from training.exit_codes import PretrainedWeightsError
from training.loop import make_optimizer
from training.model import build_model, freeze, imagenet_state_dict, set_train_mode
from training.storage import parse_url


@pytest.mark.parametrize(
    ("what", "trainable_prefixes"),
    [
        ("fc", {"fc"}),
        ("layer4", {"layer4", "fc"}),
        ("none", {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}),
    ],
)
def test_freeze_leaves_exactly_the_chosen_part_trainable_and_the_optimizer_sees_only_it(what, trainable_prefixes):
    model = build_model("resnet18", 7, None)
    trainable = freeze(model, what)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in names} == trainable_prefixes
    optimizer = make_optimizer(
        parse_args(["--data", "s3://any-bucket/d", "--output", "s3://any-bucket/o", "--optimizer", "sgd"]), trainable
    )
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in trainable}
    assert model.fc.out_features == 7


@pytest.mark.parametrize("what", ["fc", "layer4"])
def test_frozen_batchnorm_statistics_do_not_drift_while_training(what):
    model = build_model("resnet18", 3, None)
    freeze(model, what)
    before = {n: b.clone() for n, b in model.named_buffers()}
    set_train_mode(model)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    changed = {n.rsplit(".", 1)[0] for n, b in model.named_buffers() if not torch.equal(b, before[n])}
    if what == "fc":
        assert not changed
    else:
        assert changed and all(n.startswith("layer4.") for n in changed)


def test_backbone_weights_from_object_storage_are_loaded_and_the_head_replaced(storage):
    reference = torchvision.models.resnet18(num_classes=1000)
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    url = parse_url(s3("weights/resnet18-test.pt"))
    storage.ensure_bucket(url)
    storage.write_bytes(url, buffer.getvalue())

    model = build_model("resnet18", 4, imagenet_state_dict("resnet18", str(url), storage))
    assert torch.equal(model.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert model.fc.out_features == 4

    with pytest.raises(PretrainedWeightsError, match="do not fit resnet50"):
        build_model("resnet50", 4, imagenet_state_dict("resnet50", str(url), storage))


def test_unreachable_imagenet_weights_are_a_clear_error(storage, tmp_path, monkeypatch):
    def no_internet(url, *args, **kwargs):
        raise URLError(f"cannot reach {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy: the download must be tried
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_internet)  # the outside internet, faked
    with pytest.raises(PretrainedWeightsError, match="cannot fetch ImageNet weights for resnet18"):
        imagenet_state_dict("resnet18", "imagenet", storage)
