"""torchrun, keeping the trainer's exit codes: what a pod with several processes runs.

    python -m training.launch --nproc-per-node 2 -m training --data s3://… --output s3://…

The same launcher (`torch.distributed.run`, same flags, same PET_* environment the Kubeflow
operators set), but where torchrun exits 1 for any failed worker, this exits with the failed
worker's own code (128 + N for a worker killed by signal N) and with 128 + N when the launcher itself
is stopped by signal N. A PyTorchJob's restartPolicy ExitCode then tells a preempted or lost rank
(retried) from a bad argument or a missing dataset (not retried), as it does with one process per pod.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


def main(argv: list[str] | None = None) -> int:
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
    sys.exit(main())
