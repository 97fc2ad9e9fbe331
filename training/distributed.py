"""Everything distributed, in one place: who am I, which device, the process group, collectives.

`World.from_env` is the only code in petal that reads the rendezvous environment — what
torchrun and the Kubeflow PyTorchJob operator set:

    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT

Without them (plain `python -m training`) the run is a world of one, still with a process group
(an in-memory store), so the training code has a single path. NCCL with one GPU per local rank
when CUDA is available, gloo on CPU. Beside it, a gloo group carries the run's small control
messages (who resumes from where, whether any rank was asked to stop) on the CPU, so checking them
every step never waits for the GPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from training.exit_codes import LaunchError

# What a node tells a container of the devices it was given: NVIDIA's container toolkit and DRA driver
# (NVIDIA_VISIBLE_DEVICES), a scheduler pinning devices (CUDA_VISIBLE_DEVICES), the DRA example driver
# of the test bed (GPU_DEVICE_<n>=gpu-<n>, through CDI).
DEVICE_VARIABLES = re.compile(r"NVIDIA_VISIBLE_DEVICES|CUDA_VISIBLE_DEVICES|GPU_DEVICE_\d+")


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def describe(self) -> str:
        """This rank and the device it got, for its log: a GPU's name and UUID, and the device variables
        the container was started with (set by a device plugin, a DRA driver or the image)."""
        device = str(self.device)
        if self.device.type == "cuda":
            properties = torch.cuda.get_device_properties(self.device)
            device += f" ({properties.name}, GPU-{properties.uuid})"
        named = [f"{name}={value}" for name, value in sorted(os.environ.items()) if DEVICE_VARIABLES.fullmatch(name)]
        return f"rank {self.rank} of {self.world_size} on {device}; device variables: {' '.join(named) or 'none'}"

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        rank = int(env.get("RANK", "0"))
        world_size = int(env.get("WORLD_SIZE", "1"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        if not 0 <= rank < world_size:
            raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
        if world_size > 1 and not env.get("MASTER_ADDR"):
            raise LaunchError(f"WORLD_SIZE={world_size} but MASTER_ADDR is unset; start with torchrun or a PyTorchJob")
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise LaunchError(
                    f"LOCAL_RANK={local_rank} but this pod sees {torch.cuda.device_count()} GPU(s): start at most "
                    "one process per GPU (nprocPerNode) or ask for more (gpusPerReplica)"
                )
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        return cls(rank, world_size, local_rank, device)


@dataclass(frozen=True)
class Precision:
    """What a rank computes in: `dtype` under autocast on CUDA, or None for fp32 (whose convolutions
    cuDNN runs in TF32 on Ampere and later by default); a GradScaler only for fp16."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    @property
    def scaled(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else nullcontext()


def sync_batchnorm(choice: str, trains_batchnorm: bool, world: World) -> bool:
    """--sync-batchnorm: whether BatchNorm statistics are computed over every rank's batch at once.
    `auto`: where BatchNorm trains (--freeze layer4 or none), on more than one rank, on GPUs — a rank's
    own batch is then a sliver of the global one. SyncBatchNorm runs on CUDA only."""
    if choice == "off":
        return False
    if choice == "on" and world.device.type != "cuda":
        raise LaunchError(f"--sync-batchnorm on needs GPUs (SyncBatchNorm runs on CUDA); this rank runs on "
                          f"{world.device.type}")  # fmt: skip
    return choice == "on" or (trains_batchnorm and world.world_size > 1 and world.device.type == "cuda")


def precision_for(device: torch.device, amp: str) -> Precision:
    """--amp on this device. `auto` takes bf16 only where the GPU computes it natively (compute
    capability 8.0: A100, H100, L4, ...) and fp16 elsewhere on CUDA; `is_bf16_supported()` also counts
    emulation, which makes T4 and V100 slower than fp32. On the CPU: fp32."""
    if device.type != "cuda" or amp == "off":
        return Precision(device.type, None)
    native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
    return Precision("cuda", torch.bfloat16 if amp == "bf16" or (amp == "auto" and native_bf16) else torch.float16)


_control: dist.ProcessGroup | None = None


@contextmanager
def process_group(world: World, timeout: timedelta = timedelta(minutes=30)) -> Iterator[World]:
    """Joins the process group for the duration of the block and always leaves it."""
    global _control
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    if world.backend == "nccl":
        # A collective that fails or outlives the timeout: NCCL's watchdog aborts the communicators, then
        # the process (SIGABRT: exit 134, or 139 as a container's PID 1; restartPolicy ExitCode retries
        # both), rather than leaving it hung.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if world.world_size == 1:
        dist.init_process_group(world.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(
            world.backend,
            init_method="env://",
            rank=world.rank,
            world_size=world.world_size,
            timeout=timeout,
            device_id=world.device if world.device.type == "cuda" else None,
        )
    try:
        _control = dist.new_group(backend="gloo", timeout=timeout) if world.backend != "gloo" else dist.group.WORLD
        yield world
    finally:
        _control = None
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The element-wise sum over ranks (moved through `device`, as NCCL needs)."""
    reduced = tensor.to(device, dtype=torch.float64, copy=True)  # never the caller's tensor, reduced in place
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def sync_buffers(module: torch.nn.Module, world: World) -> None:
    """Every rank gets rank 0's buffers (BatchNorm statistics): what DDP's next forward does (it
    broadcasts them from rank 0), done first, so that a checkpoint and the evaluation hold the buffers
    the run goes on with, whichever rank writes it."""
    with torch.no_grad():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (on the CPU control group)."""
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control)
    return bool(value.item())


def from_rank_zero(value):
    """Rank 0's `value`, on every rank (any picklable object)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def barrier() -> None:
    dist.barrier(group=_control)
