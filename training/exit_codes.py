"""What a run's end means for a restart: the exit codes (a PyTorchJob's restartPolicy ExitCode retries
128-255; petal's TrainJob runtime the same) and SIGTERM's handling.

    0    done                                      134  SIGABRT: NCCL's watchdog, a collective failed
    1    an unexpected error (a bug; traceback)    137  SIGKILL (OOM killer, node lost)
    2    bad arguments or launch environment       139  SIGSEGV: a crash, or 134 as PID 1 (below)
    3    dataset missing or malformed              143  SIGTERM: stopped after writing a checkpoint
    4    checkpoint incompatible with this run     200  another rank was lost (collective failed)
    5    storage refused (credentials, TLS, host,  201  storage unreachable for PETAL_S3_RETRY_SECONDS
         bucket)                                   202  a collective timed out (--collective-timeout)
    6    pretrained weights unusable

A PyTorchJob's pod of one process runs the trainer as its container's PID 1, from which the kernel
drops every signal it has no handler for, the SIGABRT of abort() among them: glibc's abort() then
ends it with a SIGSEGV (139). Retried all the same.

The failures are declared here, not beside the torch code that raises them, so that this module loads
no torch: a failure found before torch is imported (a missing dataset, refused credentials:
training/inputs.py) gets its one line and its code in a fraction of a second.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

from training.shards import DatasetError
from training.storage import StorageError


class LaunchError(ValueError):
    """The launch does not fit the run: an inconsistent rendezvous environment (RANK outside WORLD_SIZE),
    a GPU option on a CPU rank, a global batch that does not divide over the ranks."""


class CheckpointError(Exception):
    """A file that is not a petal checkpoint (or a torch state_dict, where one is expected)."""


class IncompatibleCheckpoint(Exception):
    """The run directory holds a checkpoint this run must not continue."""


class PretrainedWeightsError(Exception):
    """--pretrained weights that cannot be had or do not fit the model."""


PERMANENT = {LaunchError: 2, DatasetError: 3, IncompatibleCheckpoint: 4, CheckpointError: 4,
             PretrainedWeightsError: 6}  # fmt: skip
PREEMPTED, PEER_LOST, STORAGE_UNREACHABLE, COLLECTIVE_TIMEOUT = 143, 200, 201, 202


class Preempted(Exception):
    """SIGTERM was received: the ranks wrote a checkpoint together and stop."""


class Preemption:
    """SIGTERM (a pod deleted or preempted, torchrun stopping its workers). Before the epoch loop it
    ends the process at once; from the loop on (`defer`), it is only noted: at the next step (or epoch
    end) every rank learns of it, a checkpoint is written and all stop, so a restart loses no step. A
    SIGTERM after that (a second one, or one as the run ends) is noted too, never interrupting the wait
    for the checkpoint upload in flight: that checkpoint is what the restart resumes from."""

    def __init__(self):
        self.requested = False
        self.deferring = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        if not self.deferring:
            raise Preempted("before training began, so nothing needed saving")

    def defer(self) -> None:
        """From here to the process's end, SIGTERM is only noted (`requested`)."""
        self.deferring = True
        if self.requested:
            raise Preempted("before training began, so nothing needed saving")


class PeerFailed(Exception):
    """Another rank failed; its own log says why."""


def exit_code(err: BaseException) -> int:
    """What a failure means for a restart (see the table at the top)."""
    for kind, code in PERMANENT.items():
        if isinstance(err, kind):
            return code
    if isinstance(err, StorageError):
        return STORAGE_UNREACHABLE if err.transient else 5
    if isinstance(err, Preempted):
        return PREEMPTED
    if isinstance(err, PeerFailed) or is_peer_failure(err):
        return COLLECTIVE_TIMEOUT if "timed out" in str(err).lower() else PEER_LOST
    return 1


def is_peer_failure(err: BaseException) -> bool:
    """Whether an error is another rank gone (killed, its pod deleted, its node lost) rather than a
    fault of this process: c10d's own error types (only a process that loaded torch.distributed can
    have raised one, so it is not imported here), and gloo's transport errors, which it raises as plain
    RuntimeErrors naming its transport."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and "gloo/transport" in str(err)


def failed(err: Exception) -> int:
    """The one line a failure gets on stderr, and its exit code; an unexpected error (code 1) is a bug,
    re-raised, its traceback being what a person needs."""
    code = exit_code(err)
    if code == 1:
        raise err
    print(f"petal: error: {str(err).splitlines()[0] if str(err) else type(err).__name__} (exit {code})",
          file=sys.stderr, flush=True)  # fmt: skip
    return code


def leave(code: int) -> NoReturn:
    """Ends a process that has closed what it opened (data loaders, uploads, the process group) with
    `code`, skipping the interpreter's teardown: that would garbage-collect the ~350,000 objects torch's
    compiler stack leaves (torchvision imports torch._dynamo, and it triton) several times over, about
    a second per rank, and a second more before a pod ends and its job moves on."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone (`predict.py … | head -1`) or the stream closed
            pass
    os._exit(code)
