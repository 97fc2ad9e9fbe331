"""torchrun, keeping the trainer's exit codes: what a pod with several processes runs (every TrainJob
pod, and a PyTorchJob's with nprocPerNode other than 1).

    python -m training.launch --nproc-per-node 2 -m training --data s3://… --output s3://…

The same launcher (`torch.distributed.run`, same flags, same PET_* environment the Kubeflow
operators set), but where torchrun exits 1 for any failed worker, this exits with the failed
worker's own code (128 + N for a worker killed by signal N) and with 128 + N when the launcher itself
is stopped by signal N. A PyTorchJob's restartPolicy ExitCode then tells a preempted or lost rank
(retried) from a bad argument or a missing dataset (not retried), as it does with one process per pod.

After SIGTERM torchrun gives its workers 30 s before it kills them, whatever the pod's grace period:
too short to write a large checkpoint. Given the pod's terminationGracePeriodSeconds in
PETAL_TERMINATION_GRACE_SECONDS (the chart sets it), this gives them that long less GRACE_MARGIN
(through TORCH_ELASTIC_SHUTDOWN_TIMEOUT, which torch 2.12 and later read, unless it is set already).
"""

from __future__ import annotations

import os

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from training.exit_codes import leave

# Seconds of the pod's grace period kept for the launcher itself to see its workers out and exit.
GRACE_MARGIN = 10


def main(argv: list[str] | None = None) -> int:
    grace = os.environ.get("PETAL_TERMINATION_GRACE_SECONDS")
    if grace and grace.isdigit():
        os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(max(int(grace) - GRACE_MARGIN, 1)))
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    leave(main())
