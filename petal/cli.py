"""The `petal` command: submit a run, then follow, inspect, cancel and collect it.

    petal submit --replicas 4 --image registry.example/petal:0.1.0 --dataset s3://… --set outputPrefix=s3://…
    petal list [-A]                    petal's jobs: state, progress, best accuracy, age, ETA
    petal status NAME [--watch]        conditions, pods and restarts, live progress, last epoch
    petal logs NAME [-f] [--rank N]    the master's (or rank N's) log, across pod restarts
    petal cancel NAME                  delete the job (its outputs stay in storage)
    petal collect NAME [DIR]           fetch a finished run's results (again)
    petal tensorboard NAME             TensorBoard on the run's events, synced as it trains

Exit codes: 0 done; 1 the job failed (or did not succeed in time); 2 bad arguments or a job the
cluster refuses; 3 a cluster precondition is missing; 4 succeeded but not collected here; 5 no such job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from petal.cluster import BadArguments, JobFailed, NotCollected, NotFound, Precondition
from petal.kinds import KINDS
from training.storage import StorageError

EXIT_CODES = {JobFailed: 1, BadArguments: 2, ValueError: 2, Precondition: 3, NotCollected: 4, NotFound: 5,
              StorageError: 3}  # fmt: skip


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad value gets one line (the usage block is what --help is for)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser() -> OneLineParser:
    from petal import submit

    summary, details = __doc__.split("\n\n", 1)
    p = OneLineParser(prog="petal", description=summary, epilog=details,
                      formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=OneLineParser)
    submit.add_arguments(verbs.add_parser("submit", help="submit a training run (see petal submit --help)",
                                          description=submit.__doc__.split("\n\n")[0]))  # fmt: skip

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help, description=help)
        sub.add_argument("-n", "--namespace", help="default: the kubeconfig context's, else 'default'")
        return sub

    listing = verb("list", "petal's jobs in the namespace: state, progress, best val acc, age, ETA")
    listing.add_argument("-A", "--all-namespaces", action="store_true")
    listing.add_argument("--json", action="store_true")
    status = verb("status", "a job's conditions, pods with restarts, live progress, last epoch, output")
    status.add_argument("name")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="redraw every 5 s until the job ends")
    logs = verb("logs", "a job's log: the master's, or rank N's pod")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="follow it, across pod restarts, to the job's end")
    logs.add_argument("--rank", type=int, default=0,
                      help="; ".join(f"{kind.name}: {kind.rank_names}" for kind in KINDS.values()))  # fmt: skip
    cancel = verb("cancel", "delete a job (its outputs stay in storage)")
    cancel.add_argument("name")
    collect = verb("collect", "a finished job's results into DIR (default runs/NAME/)")
    collect.add_argument("name")
    collect.add_argument("dir", nargs="?", type=Path)
    board = verb("tensorboard", "TensorBoard on a job's events, synced into runs/NAME/tensorboard as it trains")
    board.add_argument("name")
    board.add_argument("--port", type=int, default=6006)
    return p


def run(args: argparse.Namespace) -> int:
    from petal import jobs, submit
    from petal.cluster import Cluster

    if args.verb == "submit":
        return submit.submit(args)
    cluster = Cluster(args.namespace)
    if args.verb == "list":
        return jobs.list_jobs(cluster, args.all_namespaces, args.json)
    if args.verb == "status":
        return jobs.status(cluster, args.name, args.json, args.watch)
    if args.verb == "logs":
        return jobs.logs(cluster, args.name, args.follow, args.rank)
    if args.verb == "cancel":
        return jobs.cancel(cluster, args.name)
    if args.verb == "collect":
        summary = jobs.collect_job(cluster, args.name, args.dir)
        where = args.dir or jobs.RUNS / args.name
        print(f"petal: collected {args.name} into {where}: best validation accuracy {summary['best_val_acc']:.4f}, "
              f"{summary['tensorboard_files']} TensorBoard file(s)", file=sys.stderr)  # fmt: skip
        return 0
    return jobs.tensorboard(cluster, args.name, args.port)


def exit_code(err: BaseException) -> int | None:
    return next((code for kind, code in EXIT_CODES.items() if isinstance(err, kind)), None)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise
        print(f"{'submit' if args.verb == 'submit' else 'petal'}: error: {err}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
