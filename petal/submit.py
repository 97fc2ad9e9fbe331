"""petal submit: a training run as a Kubeflow job rendered from charts/petal, followed to the end
and collected — the same job `helm install` makes, because it is rendered by helm.

    petal submit --replicas 4 --image registry.example/petal:0.1.0 --gpus-per-replica 1 \\
        --dataset s3://my-team-ml/petal/datasets/flowers102 --set outputPrefix=s3://my-team-ml/petal/runs
    petal submit --api trainjob --queue team-a --replicas 4 --dataset s3://… --set outputPrefix=s3://…
    petal submit --replicas 2 --values charts/petal/ci/cpu-values.yaml --dataset s3://… --dry-run

(`python scripts/submit.py …` is the same command.) --replicas N is the number of pods: a PyTorchJob
(the default) of 1 Master + N-1 Workers, or with --api trainjob a Kubeflow Trainer v2 TrainJob of N
nodes. --queue NAME submits it to a Kueue LocalQueue: it waits, suspended, until all of its pods fit
the queue's quota, and then starts them together; --topology LEVEL also has Kueue place them all
within one domain of that level of its Topology (a rack, a block, a host). The job object is built
first (helm template) and submitted second, so --dry-run prints it and contacts no cluster. Storage
credentials reach the pods through the Secret named by s3.existingSecret (default petal-s3), which
must then exist in the namespace, or through the pods' own identity (s3.existingSecret="").
--follow shows a progress bar (epoch, step, loss, ETA) read from the run's progress record;
--follow=logs streams the master's log instead. On success, best.pt, metrics.jsonl, curves.png,
per_class.png, the TensorBoard events and a summary.json land in --collect (default runs/<name>/);
that needs S3_ENDPOINT_URL and credentials here as well.

Exit codes: 0 succeeded; 1 the job failed (its failing pod's last log lines and events are shown)
or did not succeed within --timeout (it is left running); 2 bad arguments or a job the cluster
refuses (name taken, rejected by an admission webhook; nothing applied); 3 a cluster precondition
is missing (no kubeconfig; no PyTorchJob or TrainJob CRD, ClusterTrainingRuntime, namespace, Secret
or LocalQueue; no permission — the message says how to install what is missing); 4 the job
succeeded but its results could not be collected here (the command that retries it is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from petal import installed
from petal.cluster import BadArguments, Cluster, JobFailed, Precondition
from petal.jobs import collect_job, job_output, read_json, state, storage_or_none
from petal.kinds import KINDS
from petal.pods import PendingReporter, explain_failure, follow_in_background
from training.config import flag, options

CHART = installed("charts/petal")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def count(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {low}")
        return value

    return parse


def training_keys() -> list[str]:
    """The trainer options the chart lists in values.yaml: each is also a flag of this script."""
    return list(yaml.safe_load((CHART / "values.yaml").read_text())["training"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", type=str.lower, choices=[kind.lower() for kind in KINDS],
                   help="the Kubeflow API: pytorchjob (training-operator v1; chart default) or trainjob (Kubeflow "
                        "Trainer v2, on petal's ClusterTrainingRuntime: manifests/trainer-runtime.yaml)")  # fmt: skip
    p.add_argument("--replicas", type=count(1), help="pods in all: 1 Master + N-1 Workers, or N TrainJob nodes "
                                                     "(chart default 2)")  # fmt: skip
    p.add_argument("--queue", metavar="NAME", help="Kueue LocalQueue: the job starts whole once its quota admits it")
    p.add_argument("--topology", metavar="LEVEL[:preferred]",
                   help="Kueue topology-aware placement (needs --queue): every pod within one domain of LEVEL, a "
                        "node label of the cluster's Kueue Topology (e.g. kubernetes.io/hostname); ':preferred' "
                        "packs them as tightly as fits instead of waiting for one domain")  # fmt: skip
    p.add_argument("--image", help="training image, REPOSITORY[:TAG]")
    p.add_argument("--gpus-per-replica", type=count(0), help="GPUs per pod: the nvidia.com/gpu limit, or devices of "
                                                             "--gpu-device-class")  # fmt: skip
    p.add_argument("--gpu-device-class", metavar="CLASS",
                   help="claim each pod's GPUs through Dynamic Resource Allocation from this DeviceClass (e.g. "
                        "gpu.nvidia.com), not as the nvidia.com/gpu limit (PyTorchJob only)")  # fmt: skip
    trainer = p.add_argument_group("trainer options (charts/petal/values.yaml `training`; python -m training --help)")
    chart_keys = set(training_keys())
    for key, action in options().items():
        if key not in chart_keys:
            continue
        # The trainer's own flag, type, choices and help; only what is given becomes a chart value.
        names = [flag(action), *(["--dataset"] if key == "data" else [])]
        extra = {"type": action.type, "metavar": None if action.choices else action.dest.upper()}
        if isinstance(action, argparse.BooleanOptionalAction):
            extra = {"action": argparse.BooleanOptionalAction}
        trainer.add_argument(*names, dest=f"training_{key}", choices=action.choices, help=action.help,
                             default=None, **extra)  # fmt: skip
    p.add_argument("--name", help="job name, a DNS-1035 label of at most 45 characters (default: unique)")
    p.add_argument("--namespace", help="default: the kubeconfig context's, else 'default'")
    p.add_argument("--values", action="append", default=[], type=Path, help="chart values file (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="chart value (repeatable)")
    p.add_argument(
        "--timeout",
        type=count(1),
        default=24 * 3600,
        help="seconds to wait for the job to succeed (default a day); the job outlives the wait",
    )
    p.add_argument("--follow", nargs="?", const="progress", choices=("progress", "logs"),
                   help="show progress (epoch, step, loss, ETA) until the job ends; --follow=logs: the "
                        "master's log")  # fmt: skip
    p.add_argument("--collect", type=Path, help="where results go (default runs/<name>/)")
    p.add_argument("--dry-run", action="store_true", help="print the job's YAML; contact no cluster")


def flag_values(args: argparse.Namespace) -> dict:
    """The chart values the command-line flags stand for (flags beat --values files; --set beats both)."""
    values: dict = {}
    if args.api is not None:
        values["api"] = next(kind for kind in KINDS if kind.lower() == args.api)
    if args.queue is not None:
        values["queue"] = args.queue
    if args.topology is not None:
        level, _, mode = args.topology.partition(":")
        if not level or mode not in ("", "required", "preferred"):
            raise BadArguments(f"--topology {args.topology!r}: expected LEVEL, LEVEL:required or LEVEL:preferred")
        values["topology"] = {mode or "required": level}
    if args.replicas is not None:
        values["replicas"] = args.replicas
    if args.image is not None:
        # A ':' after the last '/' starts the tag; one before it belongs to a registry's port.
        repository, tag = args.image.rsplit(":", 1) if ":" in args.image.rsplit("/", 1)[-1] else (args.image, "")
        if not repository.strip():
            raise BadArguments(f"--image {args.image!r} names no image; expected REPOSITORY[:TAG]")
        values["image"] = {"repository": repository, **({"tag": tag} if tag else {})}
    if args.gpus_per_replica is not None:
        values["gpusPerReplica"] = args.gpus_per_replica
    if args.gpu_device_class is not None:
        values["gpus"] = {"deviceClass": args.gpu_device_class}
    training = {
        key.removeprefix("training_"): value
        for key, value in vars(args).items()
        if key.startswith("training_") and value is not None
    }
    if training:
        values["training"] = training
    return values


def job_name(args: argparse.Namespace) -> str:
    name = args.name or f"petal-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    if len(name) > 45 or not DNS_1035.match(name):
        raise BadArguments(
            f"--name {name!r} is not a DNS-1035 label of at most 45 characters (lower-case letters, digits, '-', "
            "starting with a letter)"
        )
    return name


def render(name: str, namespace: str, args: argparse.Namespace) -> list[dict]:
    """The job's objects, rendered by `helm template` from charts/petal; a values problem is BadArguments."""
    helm = shutil.which(os.environ.get("HELM", "helm"))
    if helm is None:
        raise Precondition("helm is not on PATH (scripts/testbed.sh install helm, or set HELM)")
    for path in args.values:
        if not path.is_file():
            raise BadArguments(f"--values {path} does not exist")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as flags:
        json.dump(flag_values(args), flags)
        flags.flush()
        command = [helm, "template", name, str(CHART), "--namespace", namespace, "--skip-tests"]
        command += [arg for path in args.values for arg in ("--values", str(path))]
        command += ["--values", flags.name, *[arg for item in args.set for arg in ("--set", item)]]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip(" -") for line in result.stderr.splitlines() if line.strip() and "--debug" not in line]
        # A template's own refusal (`fail`) is the whole message; where helm found it is noise here.
        raise BadArguments(re.sub(r"^Error: (execution error at \([^)]*\): )?", "", " ".join(lines)))
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def print_yaml(docs: list[dict]) -> None:
    print(yaml.safe_dump_all(docs, sort_keys=False), end="")


def secrets_needed(docs: list[dict]) -> set[str]:
    """Secrets the pods read that the render does not create itself."""
    made = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    text = json.dumps(docs)
    return set(re.findall(r'"secretKeyRef": \{"name": "([^"]+)"', text)) - made


class ProgressBar:
    """submit --follow: one bar over the run's optimizer steps, fed by its progress record."""

    def __init__(self, name: str):
        from tqdm import tqdm

        self.storage = storage_or_none()
        self.bar = tqdm(desc=name, unit="step", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, job: dict) -> None:
        record = read_json(self.storage, f"{job_output(job)}/progress.json")
        if not record or not record.get("steps"):
            return
        self.bar.total = record["steps"] * record["epochs"]
        self.bar.n = (record["epoch"] - 1) * record["steps"] + (record["step"] or 0)
        eta, loss = record.get("eta_seconds"), record.get("loss")
        self.bar.set_postfix_str(f"epoch {record['epoch']}/{record['epochs']}"
                                 + (f", loss {loss:.4f}" if loss is not None else "")
                                 + (f", ETA {eta // 60}m{eta % 60:02d}s" if eta is not None else ""))  # fmt: skip

    def close(self) -> None:
        self.bar.close()


def submit(args: argparse.Namespace) -> int:
    name = job_name(args)
    docs = render(name, args.namespace or "default", args)
    if args.dry_run:
        print_yaml(docs)
        return 0
    cluster = Cluster(args.namespace)
    if cluster.namespace != (args.namespace or "default"):
        docs = render(name, cluster.namespace, args)
    kind = next(KINDS[d["kind"]] for d in docs if d["kind"] in KINDS)
    cluster.check(kind, docs, secrets_needed(docs))
    cluster.apply(docs)
    callbacks = [PendingReporter(cluster)]
    if args.follow == "logs":
        follow_in_background(cluster, cluster.job(name))
    elif args.follow == "progress":
        callbacks.append(ProgressBar(name))
    try:
        failure = wait(cluster, name, args.timeout, callbacks)
    except TimeoutError:
        failure = (f"{name} did not succeed within --timeout {args.timeout}s; it is still in the cluster "
                   f"(petal cancel {name} -n {cluster.namespace} removes it)")  # fmt: skip
    finally:
        for callback in callbacks:
            getattr(callback, "close", lambda: None)()
    if failure is not None:
        explain_failure(cluster, name)
        raise JobFailed(failure)
    summary = collect_job(cluster, name, args.collect)
    print(json.dumps({"event": "succeeded", **summary}))
    print(f"submit: {name} succeeded; best validation accuracy {summary['best_val_acc']:.4f}", file=sys.stderr)
    return 0


# How often the wait asks after the job (and the progress bar and the pending reporter are fed).
POLL_SECONDS = 2


def wait(cluster: Cluster, name: str, timeout: int, callbacks: list) -> str | None:
    """Until the job succeeds (None) or fails (its Failed condition's message); TimeoutError once timeout
    seconds pass with the job still going. Every poll, the callbacks are handed the job as one GET finds it.

    petal reads the job's own conditions rather than waiting through the Kubeflow SDKs: the Trainer
    SDK's wait (kubeflow 0.5) builds every pod's step and fails on a container whose limits name memory
    but no CPU, which is what petal's CPU pods have."""
    deadline = time.monotonic() + timeout
    while True:
        job = cluster.job(name)
        for callback in callbacks:
            callback(job)
        word = state(job)
        if word == "Succeeded":
            return None
        if word == "Failed":
            failed = [c for c in job["status"]["conditions"] if c["type"] == "Failed"]
            why = (failed[-1].get("message") or failed[-1].get("reason")) if failed else None
            return f"{job['kind']} {name} failed: {why or 'no reason given'}"
        if time.monotonic() >= deadline:
            raise TimeoutError(name)
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
