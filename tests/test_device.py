"""Device logic for GPU pods, checked on the CPU with torch.cuda's answers patched in (no GPU here): which
GPU a rank takes, NCCL or gloo, bf16 or fp16 by compute capability, SyncBatchNorm where it helps."""

from __future__ import annotations

import os

import pytest
import torch

from training.distributed import World, precision_for, sync_batchnorm
from training.exit_codes import LaunchError


@pytest.fixture()
def gpus(monkeypatch):
    """Pretends this process sees `count` GPUs of a compute capability: what torch.cuda would answer."""

    def see(count: int, capability: tuple[int, int] = (8, 0)) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return see


def rendezvous(monkeypatch, rank: int, world_size: int, local_rank: int) -> None:
    for name, value in {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": local_rank,
                        "MASTER_ADDR": "master-0"}.items():  # fmt: skip
        monkeypatch.setenv(name, str(value))


def test_each_local_rank_takes_its_own_gpu_and_nccl(monkeypatch, gpus):
    gpus(8)
    rendezvous(monkeypatch, rank=13, world_size=16, local_rank=5)
    world = World.from_env()
    assert (world.rank, world.world_size, world.local_rank) == (13, 16, 5)
    assert world.device == torch.device("cuda", 5) and world.backend == "nccl" and not world.is_main


def test_more_processes_than_gpus_is_refused_naming_both(monkeypatch, gpus):
    gpus(2)
    rendezvous(monkeypatch, rank=2, world_size=4, local_rank=2)
    with pytest.raises(LaunchError, match=r"LOCAL_RANK=2 but this pod sees 2 GPU\(s\)"):
        World.from_env()


def test_without_gpus_a_rank_runs_gloo_on_the_cpu(monkeypatch, gpus):
    gpus(0)
    rendezvous(monkeypatch, rank=1, world_size=2, local_rank=1)
    world = World.from_env()
    assert world.device == torch.device("cpu") and world.backend == "gloo"


def test_a_rank_names_its_gpu_and_the_device_variables_its_container_got(monkeypatch, gpus):
    """What each rank logs at start: the GPU it took, by name and UUID, and the device variables a device
    plugin or DRA driver set (CDI), not the driver's other variables."""
    gpus(2)
    rendezvous(monkeypatch, rank=3, world_size=4, local_rank=1)
    uuid = "8f0c6e1a-0000-4000-8000-000000000001"
    properties = type("Properties", (), {"name": "NVIDIA H100 80GB HBM3", "uuid": uuid})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    for name in [name for name in os.environ if "VISIBLE_DEVICES" in name or name.startswith("GPU_DEVICE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", f"GPU-{uuid}")
    monkeypatch.setenv("GPU_DEVICE_1", "gpu-1")
    monkeypatch.setenv("GPU_DEVICE_1_RESOURCE_CLAIM", "4b5e")
    said = World.from_env().describe()
    assert said == (f"rank 3 of 4 on cuda:1 (NVIDIA H100 80GB HBM3, GPU-{uuid}); device variables: GPU_DEVICE_1=gpu-1 "
                    f"NVIDIA_VISIBLE_DEVICES=GPU-{uuid}")  # fmt: skip
    gpus(0)
    for name in ("NVIDIA_VISIBLE_DEVICES", "GPU_DEVICE_1"):
        monkeypatch.delenv(name)
    assert World.from_env().describe() == "rank 3 of 4 on cpu; device variables: none"


@pytest.mark.parametrize(
    ("capability", "amp", "dtype", "scaled"),
    [
        ((8, 0), "auto", torch.bfloat16, False),  # A100
        ((9, 0), "auto", torch.bfloat16, False),  # H100
        ((8, 9), "auto", torch.bfloat16, False),  # L4
        ((7, 5), "auto", torch.float16, True),  # T4: bf16 only emulated
        ((7, 0), "auto", torch.float16, True),  # V100
        ((7, 5), "bf16", torch.bfloat16, False),  # asked for: given, emulation and all
        ((8, 0), "fp16", torch.float16, True),
        ((8, 0), "off", None, False),
    ],
)
def test_mixed_precision_follows_the_gpus_compute_capability(gpus, capability, amp, dtype, scaled):
    gpus(1, capability)
    precision = precision_for(torch.device("cuda", 0), amp)
    assert (precision.dtype, precision.scaled) == (dtype, scaled)
    assert precision.name == {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


def test_the_cpu_computes_in_fp32_whatever_amp_says():
    for amp in ("auto", "bf16", "fp16"):
        precision = precision_for(torch.device("cpu"), amp)
        assert precision.dtype is None and not precision.scaled and precision.name == "fp32"


def world(size: int, device: str) -> World:
    return World(rank=0, world_size=size, local_rank=0, device=torch.device(device))


@pytest.mark.parametrize(
    ("choice", "trains_batchnorm", "size", "device", "synced"),
    [
        ("auto", True, 16, "cuda", True),  # --freeze none on 16 GPUs
        ("auto", False, 16, "cuda", False),  # --freeze fc: BatchNorm frozen, nothing to sync
        ("auto", True, 1, "cuda", False),  # one rank: its batch is the global one
        ("auto", True, 4, "cpu", False),  # SyncBatchNorm runs on CUDA only
        ("off", True, 16, "cuda", False),
        ("on", False, 2, "cuda", True),
    ],
)
def test_syncbatchnorm_where_batchnorm_trains_on_several_gpus(choice, trains_batchnorm, size, device, synced):
    assert sync_batchnorm(choice, trains_batchnorm, world(size, device)) is synced


def test_syncbatchnorm_asked_for_on_the_cpu_is_refused():
    with pytest.raises(LaunchError, match="--sync-batchnorm on needs GPUs"):
        sync_batchnorm("on", True, world(2, "cpu"))


@pytest.mark.parametrize("preset", [None, "0"])
def test_an_nccl_rank_binds_its_gpu_lets_the_watchdog_end_it_and_keeps_a_gloo_group_for_control(
    monkeypatch, gpus, preset
):
    """NCCL joined on the rank's own GPU (device_id: eager communicators), NCCL's async error handling on
    unless the user set it (a failed collective ends the process: exit 134, retried), and a gloo group
    beside it for the host-side agreements. (torch.distributed's entry points recorded: no GPU here.)"""
    import torch.distributed as dist

    from training import distributed

    gpus(4)
    rendezvous(monkeypatch, rank=3, world_size=8, local_rank=3)
    if preset is None:
        monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    else:
        monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", preset)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw["device_id"]))
    )
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: calls.append(("group", backend)) or "control")
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    with distributed.process_group(World.from_env()):
        assert distributed._control == "control"
    assert calls == [("set_device", torch.device("cuda", 3)), ("init", "nccl", torch.device("cuda", 3)),
                     ("group", "gloo"), ("destroy",)]  # fmt: skip
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == (preset or "1")
