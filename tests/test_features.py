"""The frozen-backbone feature cache is exact: it changes how often the backbone runs, not what the head learns."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from support import SMALL_TRAINING, run_script, s3, trainer, wait_ok
from torch import nn

from training import checkpoint
from training.data import ImageEpochs, SplitStream
from training.features import FeatureCache, ViewSamples, backbone_of, view_for
from training.model import build_model, freeze
from training.shards import read_index
from training.storage import parse_url
from training.views import normalize

IMAGE_SIZE = 48


@pytest.fixture()
def model_and_refs(storage, synthetic_dataset, tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 5, None).eval()
    freeze(model, "fc")
    url = parse_url(synthetic_dataset)
    stream = SplitStream(storage, url, read_index(storage, url), ["train"], tmp_path / "shards")
    return model, stream.epoch_refs(seed=0, epoch=1, rank=0, world_size=1, shuffle=True)[:40]


def make_cache(
    backbone: nn.Module, directory=None, dataset: str = "synthetic", precision: str = "fp32"
) -> FeatureCache:
    return FeatureCache(backbone, torch.device("cpu"), IMAGE_SIZE, seed=3, batch_size=8, workers=0,
                        autocast=nullcontext, width=512, directory=directory, dataset=dataset,
                        precision=precision)  # fmt: skip


def counted(backbone: nn.Module) -> nn.Module:
    """The same module (same state_dict keys), counting the images it is run on."""
    backbone.images_seen = 0

    def count(module, args):
        module.images_seen += len(args[0])

    backbone.register_forward_pre_hook(count)
    return backbone


def test_cached_features_are_what_the_full_model_computes_for_that_view(model_and_refs):
    model, refs = model_and_refs
    items = [(ref, view) for ref in refs[:6] for view in (0, 1, 2)]
    features = make_cache(backbone_of(model)).features(items)
    views = ViewSamples(items, IMAGE_SIZE, seed=3)
    images = normalize(torch.stack([views[i] for i in range(len(items))]))
    with torch.no_grad():
        torch.testing.assert_close(model.fc(features), model(images), atol=1e-5, rtol=1e-4)
    assert not torch.equal(views[0], views[1]), "an augmented view differs from the eval view"
    assert torch.equal(views[1], ViewSamples(items, IMAGE_SIZE, seed=3)[1]), "a view is the same image every time"


def test_the_cache_serves_what_the_no_feature_cache_path_feeds_the_model(storage, synthetic_dataset, tmp_path):
    """The eval view's cached features against the backbone run on the batches of the trainer's own
    --no-feature-cache path (ImageEpochs: its loader, decode and transforms), sample for sample."""
    torch.manual_seed(0)
    model = build_model("resnet18", 5, None).eval()
    url = parse_url(synthetic_dataset)
    index = read_index(storage, url)
    train, val = (SplitStream(storage, url, index, [split], tmp_path / "shards") for split in ("train", "valid"))
    recompute = ImageEpochs(model, train, val, image_size=IMAGE_SIZE, seed=3, rank=0, world_size=1, batch_size=8,
                            workers=0, device=torch.device("cpu"))  # fmt: skip
    try:
        images, labels, keys = next(iter(recompute.val_loader(epoch=1)))
    finally:
        recompute.close()
    refs = {ref.key: ref for ref in val.epoch_refs(seed=3, epoch=0, rank=0, world_size=1, shuffle=False)}
    features = make_cache(backbone_of(model)).features([(refs[key], 0) for key in keys])
    assert labels.tolist() == [refs[key].label for key in keys]
    with torch.no_grad():
        torch.testing.assert_close(model.fc(features), model(images), atol=1e-5, rtol=1e-4)


def test_head_trained_from_cached_features_equals_head_trained_from_recomputed_ones(model_and_refs):
    model, refs = model_and_refs
    views = 3

    def train_head(reuse_cache: bool) -> tuple[dict, int]:
        head = copy.deepcopy(model.fc).train()
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
        backbone = counted(backbone_of(model))
        cache = make_cache(backbone)
        for epoch in range(1, 5):
            if not reuse_cache:
                cache = make_cache(backbone)  # nothing kept: every epoch recomputes its views
            order = refs[epoch:] + refs[:epoch]
            loader = cache.loader(order, [view_for(0, epoch, ref.key, views) for ref in order], batch_size=8)
            for features, labels, _ in loader:
                optimizer.zero_grad()
                F.cross_entropy(head(features), labels).backward()
                optimizer.step()
        return head.state_dict(), backbone.images_seen

    cached, cached_images = train_head(reuse_cache=True)
    recomputed, recomputed_images = train_head(reuse_cache=False)
    for name, tensor in recomputed.items():
        torch.testing.assert_close(cached[name], tensor, atol=1e-6, rtol=0)
    assert recomputed_images == 4 * len(refs)
    assert cached_images <= views * len(refs) and cached_images < recomputed_images


def test_a_feature_cache_directory_is_reused_without_running_the_backbone(model_and_refs, tmp_path):
    model, refs = model_and_refs
    items = [(ref, 1) for ref in refs[:10]]
    first = make_cache(backbone_of(model), tmp_path / "features").features(items)

    same_weights = copy.deepcopy(backbone_of(model))
    same_weights.forward = must_not_run
    again = make_cache(same_weights, tmp_path / "features").features(items)
    assert torch.equal(first, again)


def must_not_run(images):
    raise AssertionError("the backbone ran although every feature was on disk")


def test_a_reused_directory_never_serves_features_of_other_weights_or_data(model_and_refs, tmp_path):
    model, refs = model_and_refs
    items = [(ref, 1) for ref in refs[:6]]
    make_cache(backbone_of(model), tmp_path / "features").features(items)

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.layer4[1].conv2.weight.mul_(-1)
    counting = counted(backbone_of(other))
    fresh = make_cache(counting, tmp_path / "features").features(items)
    assert counting.images_seen == len(items), "features of other weights must be computed, not read back"
    assert torch.allclose(fresh, make_cache(backbone_of(other)).features(items))

    counting = counted(backbone_of(model))
    make_cache(counting, tmp_path / "features", dataset="another dataset").features(items)
    assert counting.images_seen == len(items)
    counting = counted(backbone_of(model))
    make_cache(counting, tmp_path / "features", precision="bf16").features(items)
    assert counting.images_seen == len(items), "features computed in bf16 are not fp32's"
    counting = counted(backbone_of(model))
    make_cache(counting, tmp_path / "features").features(items)
    assert counting.images_seen == 0, "the same weights, data and precision: read back"


def test_a_rank_with_no_samples_gets_an_empty_loader(model_and_refs):
    model, _ = model_and_refs
    assert list(make_cache(backbone_of(model)).loader([], [], batch_size=8)) == []


@pytest.mark.slow
def test_two_ranks_transfer_learn_a_head_from_cached_features_of_a_frozen_backbone(
    s3_env, synthetic_dataset, reference_run, run_dir, storage
):
    # The backbone comes from the reference run's checkpoint, as ImageNet weights would from MinIO.
    reference_output, _ = reference_run
    pretrained = f"{reference_output}/best.pt"
    args = ["--data", synthetic_dataset, "--output", run_dir, *SMALL_TRAINING, "--freeze", "fc", "--epochs", "3",
            "--pretrained", pretrained]  # fmt: skip
    proc = trainer(s3_env, args)
    wait_ok(proc)
    epochs = [r for r in proc.json_lines() if r["event"] == "epoch"]
    assert [r["train_samples"] for r in epochs] == [200, 200, 200]
    assert max(r["val_acc"] for r in epochs) >= 0.9

    source = checkpoint.deserialize(storage.read_bytes(parse_url(pretrained)))["model"]
    best = checkpoint.deserialize(storage.read_bytes(parse_url(run_dir).join("best.pt")))["model"]
    for name, tensor in source.items():
        if not name.startswith("fc."):
            assert torch.equal(best[name], tensor), f"{name} is frozen (BatchNorm statistics included)"
    assert best["fc.weight"].shape == source["fc.weight"].shape and not torch.equal(
        best["fc.weight"], source["fc.weight"]
    )


@pytest.mark.slow
def test_ranks_without_samples_train_along_from_cached_features(s3_env, storage, run_dir, tmp_path):
    made = run_script(s3_env, "make_synthetic_dataset.py", str(tmp_path), "--classes", "2", "--per-class", "1",
                      "--eval-per-class", "1")  # fmt: skip
    assert made.returncode == 0, made.stderr
    dataset = s3("datasets/two-images")
    assert run_script(s3_env, "upload_dataset.py", str(tmp_path), dataset).returncode == 0
    args = ["--data", dataset, "--output", run_dir, *SMALL_TRAINING, "--freeze", "fc", "--epochs", "2"]
    proc = trainer(s3_env, args, nproc=3)  # 2 training and 2 validation images over 3 ranks
    wait_ok(proc, timeout=600)
    assert [(r["train_samples"], r["val_samples"]) for r in proc.json_lines() if r["event"] == "epoch"] == [(2, 2)] * 2
