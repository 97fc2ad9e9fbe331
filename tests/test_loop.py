"""The training loop itself (training/loop.py's train_one_epoch and evaluate), under real DDP over gloo:
every rank takes the same steps whatever its share, so the fp16 GradScalers of the ranks stay one
scaler, and neither a step nor an evaluation batch makes the host wait for the device."""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.overrides import TorchFunctionMode

from training.loop import evaluate, train_one_epoch

LOOP_PY = str(Path(__file__).resolve().parents[1] / "training" / "loop.py")


def batches(samples: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, list]]:
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = torch.randn(samples, 4, generator=generator), torch.randint(0, 3, (samples,), generator=generator)
    return [(inputs[i : i + batch_size], labels[i : i + batch_size], []) for i in range(0, samples, batch_size)]


def uneven_rank(rank: int, world_size: int, store: str, results) -> None:
    """Rank 0 has 5 samples (3 batches of 2), rank 1 has 3 (2 batches); the scaler grows every step."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1, enabled=True)
    steps_seen = []
    sums, seen = train_one_epoch(model, batches(5 if rank == 0 else 3, 2, seed=rank), 3, (4,), optimizer, scaler,
                                 nullcontext, torch.device("cpu"),
                                 lambda step, *_: steps_seen.append(step) or False)  # fmt: skip
    state = {
        "steps": steps_seen,
        "seen": seen,
        "scaler": scaler.state_dict(),
        "adam": [{k: v.clone() for k, v in s.items()} for s in optimizer.state_dict()["state"].values()],
        "weights": [p.detach().clone() for p in model.parameters()],
    }
    results[rank] = state
    dist.destroy_process_group()


def test_ranks_with_uneven_shares_take_the_same_steps_and_keep_one_grad_scaler(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(uneven_rank, args=(2, str(tmp_path / "store"), results), nprocs=2)
        first, second = results[0], results[1]
    assert first["steps"] == second["steps"] == [1, 2, 3]  # the short rank's last step is on an empty batch
    assert (first["seen"], second["seen"]) == (5, 3)
    assert first["scaler"] == second["scaler"] and first["scaler"]["scale"] == 2.0**7  # grown at every step
    for mine, theirs in zip(first["adam"] + first["weights"], second["adam"] + second["weights"], strict=True):
        if isinstance(mine, dict):
            for key in mine:
                torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0, msg=key)
        else:
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


class NoWaitingInTheStep(TorchFunctionMode):
    """Records what in training/loop.py's per-batch code would make the host wait for a GPU: reading a
    value back (.item(), .cpu(), .tolist(); a boolean mask or bincount, whose output size CUDA must read
    back) or making a tensor on a device (a host-to-device copy)."""

    READS = {torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.bincount,
             torch.Tensor.bincount, torch.nonzero, torch.Tensor.nonzero, torch.masked_select}  # fmt: skip
    FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.as_tensor}

    def __init__(self):
        super().__init__()
        self.in_loop = False
        self.waits: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1)
        from_petal = caller.f_code.co_filename == LOOP_PY
        masked = func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        made_on_device = func in self.FACTORIES and "device" in kwargs
        if self.in_loop and from_petal and (func in self.READS or masked or made_on_device):
            self.waits.append(f"{getattr(func, '__name__', func)} at loop.py:{caller.f_lineno}")
        return func(*args, **kwargs)


def test_a_step_never_waits_for_the_device(tmp_path):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16 and fp32: no scaler (fp16's must read back)
        mode = NoWaitingInTheStep()

        def watched():
            mode.in_loop = True
            yield from batches(7, 2, seed=0)

        with mode:
            sums, seen = train_one_epoch(model, watched(), 5, (4,), optimizer, scaler, nullcontext,
                                         torch.device("cpu"), lambda *_: False)  # fmt: skip
    finally:
        dist.destroy_process_group()
    assert mode.waits == [], mode.waits
    assert seen == 7 and sums.shape == (2,)


def test_an_evaluation_batch_never_waits_for_the_device_and_counts_right():
    """Only the totals after the last batch are read back; per-class accuracy is counted per label."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Linear(4, 3)
        mode = NoWaitingInTheStep()
        data = batches(9, 4, seed=1)

        def watched():
            mode.in_loop = True
            yield from data
            mode.in_loop = False

        with mode:
            result = evaluate(model, watched(), 3, nullcontext, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert mode.waits == [], mode.waits
    inputs, labels = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    with torch.no_grad():
        hits = model(inputs).argmax(1) == labels
    assert result["val_samples"] == 9 and result["val_acc"] == pytest.approx(hits.double().mean().item())
    assert result["val_per_class_acc"] == pytest.approx([hits[labels == c].double().mean().nan_to_num(0).item()
                                                         for c in range(3)])  # fmt: skip


def test_global_batch_size_is_shared_out_over_the_ranks_or_refused():
    from argparse import Namespace

    from training.distributed import World
    from training.exit_codes import LaunchError
    from training.loop import rank_batch_size

    def world(size: int) -> World:
        return World(rank=0, world_size=size, local_rank=0, device=torch.device("cpu"))

    assert rank_batch_size(Namespace(batch_size=32, global_batch_size=0), world(4)) == 32  # per rank, unshared
    assert [rank_batch_size(Namespace(batch_size=32, global_batch_size=128), world(n)) for n in (1, 2, 16)] == [
        128, 64, 8]  # fmt: skip
    with pytest.raises(LaunchError, match="--global-batch-size 128 does not divide evenly over 3 ranks"):
        rank_batch_size(Namespace(batch_size=32, global_batch_size=128), world(3))


def test_warmup_raises_the_rate_step_by_step_then_follows_the_schedule():
    from argparse import Namespace

    from training.loop import learning_rate

    args = Namespace(lr=0.1, lr_schedule="cosine", epochs=4, warmup_epochs=1.5)
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / 4)) for epoch in (1, 2, 3, 4)]
    assert learning_rate(args, 1, 0.0) == 0.0
    assert learning_rate(args, 1, 0.3) == pytest.approx(cosine[0] * 0.3 / 1.5)
    assert learning_rate(args, 2, 0.25) == pytest.approx(cosine[1] * 1.25 / 1.5)  # still warming up, mid-epoch 2
    assert learning_rate(args, 2, 0.5) == pytest.approx(cosine[1])  # warm at 1.5 epochs
    assert [learning_rate(args, e, 1.0) for e in (3, 4)] == pytest.approx(cosine[2:])
    assert learning_rate(Namespace(lr=0.1, lr_schedule="constant", epochs=4, warmup_epochs=0), 3, 0.2) == 0.1
