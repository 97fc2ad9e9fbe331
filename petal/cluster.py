"""Everything petal asks of the Kubernetes API, and the exit codes its answers mean. The kubernetes
client is imported only once a cluster is really needed (a dry run never does), and torch never.

Exit codes shared by every `petal` verb: 0 done; 1 the job failed (or did not succeed in time);
2 bad arguments, or a job the cluster refuses (nothing applied); 3 a cluster precondition is
missing; 4 the job succeeded but its results could not be collected here; 5 no such job.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from petal import installed

PENDING_GRACE_SECONDS = 30
# The chart's labels: what tells petal's jobs from others.
PETAL_SELECTOR = "app.kubernetes.io/name=petal"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE = ("kueue.x-k8s.io", "v1beta2")


def pinned(name: str) -> str:
    return re.search(rf"^{name}=(.*)$", installed("scripts/versions.env").read_text(), flags=re.M)[1]


@dataclass(frozen=True)
class Api:
    """One Kubeflow job API petal submits to: where its objects live and how its pods are found."""

    kind: str
    group: str
    version: str
    plural: str
    container: str  # the training container's name, which the operator requires
    succeeded: str  # the condition that means done
    pod_label: str  # the label holding the job's name on its pods
    rank: Callable[[dict], int]  # a pod's place in the job from its labels: 0 runs the master process
    install: str

    @property
    def crd(self) -> str:
        return f"{self.plural}.{self.group}"

    def pod_selector(self, name: str) -> str:
        """The job's training pods: a TrainJob's runtime may add initializer jobs beside its nodes."""
        return f"{self.pod_label}={name}" + (",jobset.sigs.k8s.io/replicatedjob-name=node" if self is TRAINJOB else "")


PYTORCHJOB = Api(
    "PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", "pytorch", "Succeeded", "training.kubeflow.org/job-name",
    lambda labels: int(labels["training.kubeflow.org/replica-index"])
    + (labels["training.kubeflow.org/replica-type"] != "master"),
    "install the training-operator: kubectl apply --server-side -k "
    f'"github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref={pinned("TRAINING_OPERATOR_VERSION")}"',
)  # fmt: skip
TRAINJOB = Api(
    "TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "node", "Complete", "jobset.sigs.k8s.io/jobset-name",
    lambda labels: int(labels["batch.kubernetes.io/job-completion-index"]),
    "install Kubeflow Trainer v2 (with JobSet): kubectl apply --server-side -k "
    f'"https://github.com/kubeflow/trainer.git/manifests/overlays/manager?ref={pinned("KUBEFLOW_TRAINER_VERSION")}"',
)  # fmt: skip
APIS = {api.kind: api for api in (PYTORCHJOB, TRAINJOB)}
RUNTIME_MANIFEST = "manifests/trainer-runtime.yaml"
INSTALL_KUEUE = (
    "install Kueue: kubectl apply --server-side -f "
    f"https://github.com/kubernetes-sigs/kueue/releases/download/{pinned('KUEUE_VERSION')}/manifests.yaml"
)


def api_of(job: dict) -> Api:
    return APIS[job["kind"]]


def age_seconds(job: dict) -> float:
    created = datetime.fromisoformat(job["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    return (datetime.now(UTC) - created).total_seconds()


class BadArguments(Exception):
    """Exit 2: nothing was applied."""


class Precondition(Exception):
    """Exit 3: the cluster lacks something the job needs."""


class JobFailed(Exception):
    """Exit 1."""


class NotCollected(Exception):
    """Exit 4: the job succeeded, its results could not be fetched here."""


class NotFound(Exception):
    """Exit 5: no such job."""


class Cluster:
    """The Kubernetes API client (jobs of either kind through its generic custom-objects API), imported only
    once a cluster is really needed."""

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

    def check(self, api: Api, docs: list[dict], secret_names: set[str]) -> None:
        """Exit 3 naming what the job needs and the cluster lacks: the API's CRD, the runtime a TrainJob
        runs on, the namespace, the storage Secret, the Kueue LocalQueue."""
        extensions = self.client.ApiextensionsV1Api()
        self._read(f"looking up the {api.kind} CRD", lambda: extensions.read_custom_resource_definition(api.crd),
                   f"the {api.kind} CRD ({api.crd}) is not installed; {api.install}")  # fmt: skip
        job = next(d for d in docs if d["kind"] == api.kind)
        name = job["metadata"]["name"]
        for other in APIS.values():
            if other is not api and self._exists(other, name):
                raise BadArguments(
                    f"a {other.kind} named {name!r} already exists in namespace {self.namespace!r} "
                    "(its pods, outputs and `petal` verbs would be shared); choose another --name, or "
                    f"remove it: kubectl -n {self.namespace} delete {other.kind.lower()} {name}"
                )
        if api is TRAINJOB:
            runtime = job["spec"]["runtimeRef"]["name"]
            self._read("looking up the ClusterTrainingRuntime",
                       lambda: self.custom.get_cluster_custom_object(api.group, api.version, "clustertrainingruntimes",
                                                                     runtime),
                       f"ClusterTrainingRuntime {runtime!r} does not exist; install petal's: kubectl apply "
                       f"--server-side -f {installed(RUNTIME_MANIFEST)}, or set trainJob.runtime")  # fmt: skip
        self._read("looking up the namespace", lambda: self.core.read_namespace(self.namespace),
                   f"namespace {self.namespace!r} does not exist")  # fmt: skip
        for secret in sorted(secret_names):
            self._read("looking up the storage Secret",
                       lambda s=secret: self.core.read_namespaced_secret(s, self.namespace),
                       f"Secret {secret!r} (S3 credentials) does not exist in namespace {self.namespace!r}; create it "
                       f"with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or set s3.existingSecret")  # fmt: skip
        queue = job["metadata"]["labels"].get(QUEUE_LABEL)
        if queue:
            crd = f"localqueues.{KUEUE[0]}"
            self._read("looking up the Kueue CRDs", lambda: extensions.read_custom_resource_definition(crd),
                       f"--queue {queue}: Kueue is not installed (no CRD {crd}); {INSTALL_KUEUE}")  # fmt: skip
            self._read("looking up the LocalQueue",
                       lambda: self.custom.get_namespaced_custom_object(*KUEUE, self.namespace, "localqueues", queue),
                       f"--queue {queue}: no Kueue LocalQueue {queue!r} in namespace {self.namespace!r}; create one "
                       f"that points at a ClusterQueue (docs/kubernetes.md: Kueue)")  # fmt: skip

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

        if doc["kind"] in APIS:
            api = APIS[doc["kind"]]
            self.custom.create_namespaced_custom_object(api.group, api.version, self.namespace, api.plural, doc,
                                                        dry_run=dry_run)  # fmt: skip
            return
        try:
            utils.create_from_dict(self.client.ApiClient(), doc, namespace=self.namespace, dry_run=dry_run)
        except utils.FailToCreateError as err:
            raise err.api_exceptions[0] from None

    def _delete(self, doc: dict) -> None:
        name = doc["metadata"]["name"]
        if doc["kind"] in APIS:
            api = APIS[doc["kind"]]
            self.custom.delete_namespaced_custom_object(api.group, api.version, self.namespace, api.plural, name)
        else:
            _, delete = self._companions()[doc["kind"]]
            delete(name, self.namespace)

    def _companions(self) -> dict:
        """What a release renders beside its job, by kind: (list, delete) calls of the API."""
        networking = self.client.NetworkingV1Api()
        return {
            "Secret": (self.core.list_namespaced_secret, self.core.delete_namespaced_secret),
            "NetworkPolicy": (networking.list_namespaced_network_policy, networking.delete_namespaced_network_policy),
            "ServiceAccount": (
                self.core.list_namespaced_service_account,
                self.core.delete_namespaced_service_account,
            ),  # fmt: skip
        }

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

    def _get(self, api: Api, name: str) -> dict | None:
        """The job of that kind and name; None where there is none, or where this API is not installed
        or not open to us (403): a user may be allowed one kind only."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(api.group, api.version, self.namespace, api.plural, name)
        except ApiException as err:
            if err.status in (403, 404):
                return None
            raise Precondition(f"reading {api.kind} {name}: {err.status} {err.reason}") from None

    def _exists(self, api: Api, name: str) -> bool:
        return self._get(api, name) is not None

    def job(self, name: str) -> dict:
        """The petal job of that name as the API has it, of whichever kind; NotFound if there is none."""
        found = [job for job in (self._get(api, name) for api in APIS.values()) if job]
        if len(found) > 1:
            kinds = " and a ".join(job["kind"] for job in found)
            raise BadArguments(f"both a {kinds} are named {name!r} in namespace {self.namespace!r}; remove one: "
                               f"kubectl -n {self.namespace} delete {found[-1]['kind'].lower()} {name}")  # fmt: skip
        if not found:
            raise NotFound(f"no petal job {name!r} in namespace {self.namespace!r}")
        return found[0]

    def jobs(self, all_namespaces: bool = False) -> list[dict]:
        """petal's jobs of every kind the cluster serves (the chart's labels), in this namespace or all."""
        from kubernetes.client.exceptions import ApiException

        found, refused = [], []
        for api in APIS.values():
            try:
                if all_namespaces:
                    listed = self.custom.list_cluster_custom_object(
                        api.group, api.version, api.plural, label_selector=PETAL_SELECTOR
                    )
                else:
                    listed = self.custom.list_namespaced_custom_object(
                        api.group, api.version, self.namespace, api.plural, label_selector=PETAL_SELECTOR
                    )
            except ApiException as err:
                if err.status in (403, 404):  # this API is not installed, or not open to us
                    refused.append(f"{api.kind}s: {err.status} {err.reason}")
                    continue
                raise Precondition(f"listing {api.kind}s: {err.status} {err.reason}") from None
            found += listed["items"]
        if len(refused) == len(APIS):
            raise Precondition(f"cannot list petal's jobs ({'; '.join(refused)}); is the training-operator or "
                               f"Kubeflow Trainer installed? {PYTORCHJOB.install}")  # fmt: skip
        return sorted(found, key=lambda job: job["metadata"]["creationTimestamp"])

    def pods(self, job: dict) -> list:
        """The job's pods, rank 0 (the master's) first; after a restart, the newest pod of each rank first."""
        api, name = api_of(job), job["metadata"]["name"]
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=api.pod_selector(name)).items
        return sorted(pods, key=lambda p: (api.rank(p.metadata.labels), -p.metadata.creation_timestamp.timestamp()))

    def rank_pod(self, job: dict, rank: int):
        """The newest pod of a rank, or None while it has none."""
        return next((p for p in self.pods(job) if api_of(job).rank(p.metadata.labels) == rank), None)

    def admission(self, job: dict) -> str | None:
        """Why Kueue has not admitted a queued job yet (its Workload's QuotaReserved condition), or None."""
        from kubernetes.client.exceptions import ApiException

        try:
            workloads = self.custom.list_namespaced_custom_object(
                *KUEUE, self.namespace, "workloads", label_selector=f"kueue.x-k8s.io/job-uid={job['metadata']['uid']}"
            )["items"]
        except ApiException as err:
            return f"cannot read its Kueue Workload ({err.status} {err.reason})"
        if not workloads:  # Kueue makes one within moments of the job; long without one, it is not watching
            age = age_seconds(job)
            return None if age < PENDING_GRACE_SECONDS else (
                f"no Kueue Workload for it after {age:.0f}s: is Kueue running with its {job['kind']} integration "
                "enabled (integrations.frameworks in its configuration)?")  # fmt: skip
        conditions = {c["type"]: c for c in workloads[0].get("status", {}).get("conditions", [])}
        reserved = conditions.get("QuotaReserved", {})
        return reserved["message"] if reserved.get("status") == "False" else None

    def delete(self, job: dict) -> list[str]:
        """The job and what its release rendered beside it (Secret, NetworkPolicy, ServiceAccount)."""
        from kubernetes.client.exceptions import ApiException

        api, name = api_of(job), job["metadata"]["name"]
        gone = [f"{api.kind.lower()}/{name}"]
        self.custom.delete_namespaced_custom_object(api.group, api.version, self.namespace, api.plural, name,
                                                    propagation_policy="Foreground")  # fmt: skip
        selector = f"{PETAL_SELECTOR},app.kubernetes.io/instance={name}"
        for kind, (lister, deleter) in self._companions().items():
            for item in lister(self.namespace, label_selector=selector).items:
                try:
                    deleter(item.metadata.name, self.namespace)
                    gone.append(f"{kind.lower()}/{item.metadata.name}")
                except ApiException as err:
                    if err.status != 404:
                        raise
        return gone


class PendingReporter:
    """Says why a job waits: Kueue not admitting it (its Workload's reason), or pods staying Pending
    (the scheduler's reasons from their events at once, the kubelet's after PENDING_GRACE_SECONDS).
    Each reason once."""

    def __init__(self, cluster: Cluster, name: str):
        self.cluster, self.name = cluster, name
        self.said: set[str] = set()

    def say(self, line: str) -> None:
        if line not in self.said:
            self.said.add(line)
            print(f"petal: {line}", file=sys.stderr)

    def __call__(self, _=None) -> None:
        job = self.cluster.job(self.name)
        now = time.time()
        if job["metadata"]["labels"].get(QUEUE_LABEL) and suspended(job):
            reason = self.cluster.admission(job)
            if reason:
                self.say(f"{self.name} waiting for Kueue admission: {reason}")
            return
        for pod in self.cluster.pods(job):
            created = pod.metadata.creation_timestamp.timestamp()
            if pod.status.phase != "Pending":
                continue
            # The scheduler's refusal is said at once; other warnings (a slow image pull, say) after a grace.
            for reason in pod_event_lines(self.cluster, pod.metadata.name, warnings_only=True):
                if reason.startswith("FailedScheduling:") or now - created >= PENDING_GRACE_SECONDS:
                    self.say(f"{pod.metadata.name} Pending for {now - created:.0f}s: {reason}")


def suspended(job: dict) -> bool:
    spec = job["spec"].get("runPolicy", job["spec"])  # a PyTorchJob's is in its runPolicy
    return bool(spec.get("suspend"))


def pod_event_lines(cluster: Cluster, pod: str, warnings_only: bool = False) -> list[str]:
    events = cluster.core.list_namespaced_event(cluster.namespace, field_selector=f"involvedObject.name={pod}").items
    return [f"{e.reason}: {e.message}" for e in events if not warnings_only or e.type == "Warning"]


def follow_log(cluster: Cluster, job: dict, rank: int, write: Callable[[str], None], done: Callable[[], bool]) -> None:
    """Streams the training container's log of a rank's pod through `write` once it runs, and again
    for every new instance of it — a container restarted in place, or a pod made anew for the rank
    (under the same name or another) — until `done()` says the job is over and the last instance's
    log has ended."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    container = api_of(job).container
    streamed = None  # (pod uid, restart count) of the instance last streamed
    while True:
        try:
            found = cluster.rank_pod(job, rank)
            statuses = [s for s in (found.status.container_statuses if found else None) or [] if s.name == container]
            instance = (found.metadata.uid, statuses[0].restart_count) if statuses else None
            started = statuses and (statuses[0].state.running or statuses[0].state.terminated)
            if started and instance != streamed:
                streamed = instance
                response = cluster.core.read_namespaced_pod_log(found.metadata.name, cluster.namespace,
                                                                container=container, follow=True,
                                                                _preload_content=False)  # fmt: skip
                for line in response.stream():
                    write(line.decode(errors="replace"))
                continue
        except (ApiException, HTTPError) as err:
            # Not created (yet, or again), or the kubelet cannot serve logs: keep polling.
            if getattr(err, "status", None) != 404:
                reason = getattr(err, "reason", None) or type(err).__name__
                print(f"petal: cannot follow rank {rank} of {job['metadata']['name']} yet ({reason})", file=sys.stderr)
        if done():
            return
        time.sleep(2)


def follow_in_background(cluster: Cluster, job: dict) -> None:
    """submit --follow=logs: the master's log on stderr while the wait goes on."""
    threading.Thread(target=follow_log, args=(cluster, job, 0, sys.stderr.write, lambda: False), daemon=True).start()


def explain_failure(cluster: Cluster, name: str) -> None:
    job = cluster.job(name)
    container = api_of(job).container
    for pod in cluster.pods(job):
        statuses = pod.status.container_statuses or []
        failed = pod.status.phase == "Failed" or any(
            (s.state.terminated and s.state.terminated.exit_code) or (s.last_state and s.last_state.terminated)
            for s in statuses
        )
        if not failed:
            continue
        # A container that failed and was restarted holds its failure in the previous instance's log.
        restarted = any(s.name == container and s.restart_count and not s.state.terminated for s in statuses)
        which = "previous container's" if restarted else "last"
        print(f"--- {pod.metadata.name} ({pod.status.phase}): {which} log lines", file=sys.stderr)
        try:
            log = cluster.core.read_namespaced_pod_log(pod.metadata.name, cluster.namespace, container=container,
                                                       tail_lines=30, previous=restarted)  # fmt: skip
        except cluster.client.exceptions.ApiException as err:
            log = f"(no log: {err.reason})"
        print(log.rstrip(), file=sys.stderr)
        print(f"--- {pod.metadata.name}: events", file=sys.stderr)
        for line in pod_event_lines(cluster, pod.metadata.name):
            print(f"  {line}", file=sys.stderr)
