#!/usr/bin/env python3
"""Submits a petal training run as a PyTorchJob rendered from charts/petal, follows it to the end
and collects its results — the same job `helm install` makes, because it is rendered by helm.

    python scripts/submit.py --replicas 4 --image registry.example/petal:0.1.0 \\
        --dataset s3://petal/datasets/flowers102 --gpus-per-replica 1
    python scripts/submit.py --replicas 2 --values charts/petal/ci/cpu-values.yaml --dry-run

--replicas N is the number of pods: 1 Master + N-1 Workers. The job object is built first (helm
template) and submitted second, so --dry-run prints it and contacts no cluster. Storage
credentials reach the pods only through the Secret named by s3.existingSecret (default petal-s3),
which must exist in the namespace. On success, best.pt, metrics.jsonl, curves.png, per_class.png
and a summary.json land in --collect (default runs/<name>/); that needs S3_ENDPOINT_URL and the
AWS_* variables here as well.

Exit codes: 0 succeeded; 1 the job failed (its failing pod's last log lines and events are shown)
or did not succeed within --timeout (it is left running); 2 bad arguments or a job the cluster
refuses (name taken, rejected by the operator's webhook; nothing applied); 3 a cluster precondition
is missing (no kubeconfig, no PyTorchJob CRD, no namespace or Secret, no permission); 4 the job
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
import threading
import time
from pathlib import Path

import yaml

from training.config import flag, options
from training.storage import StorageError

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "petal"
CRD = "pytorchjobs.kubeflow.org"
OPERATOR_VERSION = re.search(r"^TRAINING_OPERATOR_VERSION=(.*)$", (ROOT / "scripts" / "versions.env").read_text(),
                             flags=re.M)[1]  # fmt: skip
INSTALL_OPERATOR = (
    "kubectl apply --server-side -k "
    f'"github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref={OPERATOR_VERSION}"'
)
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
PENDING_GRACE_SECONDS = 30


class BadArguments(Exception):
    """Exit 2: nothing was applied."""


class Precondition(Exception):
    """Exit 3: the cluster lacks something the job needs."""


class JobFailed(Exception):
    """Exit 1."""


class NotCollected(Exception):
    """Exit 4: the job succeeded, its results could not be fetched here."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"submit: error: {message} (see --help)\n")


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="submit.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=count(1), help="pods in all: 1 Master + N-1 Workers (chart default 2)")
    p.add_argument("--image", help="training image, REPOSITORY[:TAG]")
    p.add_argument("--gpus-per-replica", type=count(0), help="nvidia.com/gpu per pod")
    trainer = p.add_argument_group("trainer options (charts/petal/values.yaml `training`; python -m training --help)")
    for key, action in options().items():
        if key not in training_keys():
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
    p.add_argument("--follow", action="store_true", help="stream the master's log")
    p.add_argument("--collect", type=Path, help="where results go (default runs/<name>/)")
    p.add_argument("--dry-run", action="store_true", help="print the PyTorchJob YAML; contact no cluster")
    return p.parse_args(argv)


def flag_values(args: argparse.Namespace) -> dict:
    """The chart values the command-line flags stand for (flags beat --values files; --set beats both)."""
    values: dict = {}
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
        problem = " ".join(line.strip(" -") for line in result.stderr.splitlines() if line.strip())
        raise BadArguments(problem.removeprefix("Error: "))
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def print_yaml(docs: list[dict]) -> None:
    print(yaml.safe_dump_all(docs, sort_keys=False), end="")


class Cluster:
    """The kubernetes and kubeflow-training clients, imported only once a cluster is really needed."""

    def __init__(self, namespace: str | None):
        from kubernetes import client, config

        try:
            config.load_kube_config()
            _, context = config.list_kube_config_contexts()
        except (config.ConfigException, FileNotFoundError, TypeError) as err:
            raise Precondition(f"no usable kubeconfig ({err}); set KUBECONFIG or ~/.kube/config") from None
        self.client = client
        self.namespace = namespace or context.get("context", {}).get("namespace") or "default"
        self.core = client.CoreV1Api()
        self.custom = client.CustomObjectsApi()
        self.host = client.Configuration.get_default_copy().host

    def _read(self, what: str, read, missing: str):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return read()
        except ApiException as err:
            if err.status == 404:
                raise Precondition(missing) from None
            raise Precondition(f"{what}: {err.status} {err.reason}") from None
        except HTTPError as err:
            raise Precondition(f"cannot reach the cluster at {self.host} ({type(err).__name__})") from None

    def check(self, secret_names: set[str]) -> None:
        self._read(
            "looking up the PyTorchJob CRD",
            lambda: self.client.ApiextensionsV1Api().read_custom_resource_definition(CRD),
            f"the PyTorchJob CRD ({CRD}) is not installed; install the training-operator: {INSTALL_OPERATOR}",
        )
        self._read("looking up the namespace", lambda: self.core.read_namespace(self.namespace),
                   f"namespace {self.namespace!r} does not exist")  # fmt: skip
        for secret in sorted(secret_names):
            self._read("looking up the storage Secret",
                       lambda s=secret: self.core.read_namespaced_secret(s, self.namespace),
                       f"Secret {secret!r} (S3 credentials) does not exist in namespace {self.namespace!r}; create it "
                       f"with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or set s3.existingSecret")  # fmt: skip

    def apply(self, docs: list[dict]) -> None:
        """Creates the job's objects: all of them first as a server-side dry run (schema, admission
        webhooks, names already taken), so that a refusal leaves nothing behind; then for real."""
        for dry_run in ("All", None):
            created = []
            for doc in docs:
                try:
                    self._create(doc, dry_run)
                except self.client.exceptions.ApiException as err:
                    for done in reversed(created):  # refused after the dry run passed: take back the rest
                        self._delete(done)
                    raise self._refusal(doc, err) from None
                if not dry_run:
                    created.append(doc)
                    print(f"submit: created {doc['kind']} {self.namespace}/{doc['metadata']['name']}", file=sys.stderr)

    def _create(self, doc: dict, dry_run: str | None) -> None:
        from kubernetes import utils

        if doc["kind"] == "PyTorchJob":
            group, version = doc["apiVersion"].split("/")
            self.custom.create_namespaced_custom_object(group, version, self.namespace, "pytorchjobs", doc,
                                                        dry_run=dry_run)  # fmt: skip
            return
        try:
            utils.create_from_dict(self.client.ApiClient(), doc, namespace=self.namespace, dry_run=dry_run)
        except utils.FailToCreateError as err:
            raise err.api_exceptions[0] from None

    def _delete(self, doc: dict) -> None:
        name = doc["metadata"]["name"]
        if doc["kind"] == "PyTorchJob":
            group, version = doc["apiVersion"].split("/")
            self.custom.delete_namespaced_custom_object(group, version, self.namespace, "pytorchjobs", name)
        elif doc["kind"] == "Secret":
            self.core.delete_namespaced_secret(name, self.namespace)

    def _refusal(self, doc: dict, err) -> Exception:
        """The API's refusal as one line with the exit code it deserves."""
        try:
            message = json.loads(err.body)["message"]
        except (TypeError, ValueError, KeyError):
            message = err.reason
        kind, name = doc["kind"], doc["metadata"]["name"]
        what = f"{kind} {self.namespace}/{name}"
        if err.status == 409:
            return BadArguments(f"{what} already exists; choose another --name, or remove it: "
                                f"kubectl -n {self.namespace} delete {kind.lower()} {name}")  # fmt: skip
        # An admission webhook's denial comes back as 403 too: it is about the job, not permissions.
        if err.status in (400, 422) or "admission webhook" in message:
            return BadArguments(f"the cluster refused {what}: {message}")
        if err.status in (401, 403):
            return Precondition(f"not allowed to create {what}: {message}")
        return Precondition(f"creating {what} failed: {err.status} {err.reason}: {message}")


def secrets_needed(docs: list[dict]) -> set[str]:
    """Secrets the pods read that the render does not create itself."""
    made = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    text = json.dumps(docs)
    return set(re.findall(r'"secretKeyRef": \{"name": "([^"]+)"', text)) - made


class PendingReporter:
    """Says why pods stay Pending: the scheduler's (or kubelet's) reasons from their events."""

    def __init__(self, cluster: Cluster, training, name: str):
        self.cluster, self.training, self.name = cluster, training, name
        self.said: set[str] = set()

    def __call__(self, job) -> None:
        now = time.time()
        for pod in self.training.get_job_pods(self.name, self.cluster.namespace):
            created = pod.metadata.creation_timestamp.timestamp()
            if pod.status.phase != "Pending" or now - created < PENDING_GRACE_SECONDS:
                continue
            for reason in pod_event_lines(self.cluster, pod.metadata.name, warnings_only=True):
                if reason not in self.said:
                    self.said.add(reason)
                    print(f"submit: {pod.metadata.name} Pending for {now - created:.0f}s: {reason}", file=sys.stderr)


def pod_event_lines(cluster: Cluster, pod: str, warnings_only: bool = False) -> list[str]:
    events = cluster.core.list_namespaced_event(cluster.namespace, field_selector=f"involvedObject.name={pod}").items
    return [f"{e.reason}: {e.message}" for e in events if not warnings_only or e.type == "Warning"]


def follow_master_log(cluster: Cluster, name: str) -> None:
    """Streams the master's log to stderr once its container runs, and again after each restart."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    pod = f"{name}-master-0"

    def stream():
        streamed_restarts = -1
        while True:
            try:
                status = cluster.core.read_namespaced_pod(pod, cluster.namespace).status
                statuses = status.container_statuses or []
                running = [s for s in statuses if s.name == "pytorch" and (s.state.running or s.state.terminated)]
                if running and running[0].restart_count != streamed_restarts:
                    streamed_restarts = running[0].restart_count
                    response = cluster.core.read_namespaced_pod_log(pod, cluster.namespace, container="pytorch",
                                                                    follow=True, _preload_content=False)  # fmt: skip
                    for line in response.stream():
                        sys.stderr.write(line.decode(errors="replace"))
            except (ApiException, HTTPError) as err:
                # Not created yet (quietly), or the kubelet cannot serve logs: keep polling, the wait goes on.
                if getattr(err, "status", None) != 404:
                    reason = getattr(err, "reason", None) or type(err).__name__
                    print(f"submit: cannot follow {pod} yet ({reason})", file=sys.stderr)
            time.sleep(2)

    threading.Thread(target=stream, daemon=True).start()


def explain_failure(cluster: Cluster, training, name: str) -> None:
    for pod in training.get_job_pods(name, cluster.namespace):
        statuses = pod.status.container_statuses or []
        failed = pod.status.phase == "Failed" or any(
            (s.state.terminated and s.state.terminated.exit_code) or (s.last_state and s.last_state.terminated)
            for s in statuses
        )
        if not failed:
            continue
        # A container that failed and was restarted holds its failure in the previous instance's log.
        restarted = any(s.name == "pytorch" and s.restart_count and not s.state.terminated for s in statuses)
        which = "previous container's" if restarted else "last"
        print(f"--- {pod.metadata.name} ({pod.status.phase}): {which} log lines", file=sys.stderr)
        try:
            log = cluster.core.read_namespaced_pod_log(pod.metadata.name, cluster.namespace, container="pytorch",
                                                       tail_lines=30, previous=restarted)  # fmt: skip
        except cluster.client.exceptions.ApiException as err:
            log = f"(no log: {err.reason})"
        print(log.rstrip(), file=sys.stderr)
        print(f"--- {pod.metadata.name}: events", file=sys.stderr)
        for line in pod_event_lines(cluster, pod.metadata.name):
            print(f"  {line}", file=sys.stderr)


def job_output(docs: list[dict]) -> str:
    """The run directory the rendered job trains into (its --output)."""
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    args = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    return next(a.split("=", 1)[1] for a in args if a.startswith("--output="))


def collect(docs: list[dict], dest: Path, job) -> dict:
    from training.artifacts import collect as download
    from training.storage import Storage, parse_url

    output = job_output(docs)
    collected = download(Storage.from_env(), parse_url(output), dest)
    records = [json.loads(line) for line in (dest / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: r["val_acc"])
    summary = {
        "job": job.metadata.name,
        "namespace": job.metadata.namespace,
        "output": output,
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
        "epochs": len(records),
        "conditions": [c.type for c in job.status.conditions or []],
        "artifacts": sorted(p.name for p in collected),
    }
    (dest / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        name = job_name(args)
        docs = render(name, args.namespace or "default", args)
        if args.dry_run:
            print_yaml(docs)
            return 0
        cluster = Cluster(args.namespace)
        if cluster.namespace != (args.namespace or "default"):
            docs = render(name, cluster.namespace, args)
        cluster.check(secrets_needed(docs))
        from kubeflow.training import TrainingClient

        training = TrainingClient(job_kind="PyTorchJob", namespace=cluster.namespace)
        cluster.apply(docs)
        if args.follow:
            follow_master_log(cluster, name)
        try:
            job = training.wait_for_job_conditions(name, cluster.namespace, expected_conditions={"Succeeded"},
                                                   wait_timeout=args.timeout, polling_interval=5,
                                                   callback=PendingReporter(cluster, training, name))  # fmt: skip
        except TimeoutError:
            explain_failure(cluster, training, name)
            raise JobFailed(
                f"{name} did not succeed within --timeout {args.timeout}s; it is still in the cluster "
                f"(kubectl -n {cluster.namespace} delete pytorchjob {name} removes it)"
            ) from None
        except RuntimeError as err:
            explain_failure(cluster, training, name)
            raise JobFailed(str(err).splitlines()[0]) from None
        dest = args.collect or ROOT / "runs" / name
        try:
            summary = collect(docs, dest, job)
        except (StorageError, OSError, ValueError, KeyError) as err:  # the job's work is safe in storage either way
            output = job_output(docs)
            raise NotCollected(
                f"{name} succeeded but its results could not be collected ({err}); "
                f"they are in {output}: python scripts/collect_run.py {output} {dest}"
            ) from None
        print(json.dumps({"event": "succeeded", **summary}))
        print(f"submit: {name} succeeded; best validation accuracy {summary['best_val_acc']:.4f}", file=sys.stderr)
        return 0
    except BadArguments as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 2
    except Precondition as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 3
    except JobFailed as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 1
    except NotCollected as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
