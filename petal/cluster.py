"""Everything petal asks of the Kubernetes API, and the exit codes its answers mean. The kubernetes
client is imported only once a cluster is really needed (a dry run never does), and torch never.

Exit codes shared by every `petal` verb: 0 done; 1 the job failed (or did not succeed in time);
2 bad arguments, or a job the cluster refuses (nothing applied); 3 a cluster precondition is
missing; 4 the job succeeded but its results could not be collected here; 5 no such job.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable

CRD = "pytorchjobs.kubeflow.org"
GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
PENDING_GRACE_SECONDS = 30
# The chart's labels: what tells petal's jobs from others.
PETAL_SELECTOR = "app.kubernetes.io/name=petal"


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

    def check(self, secret_names: set[str], install_operator: str) -> None:
        self._read(
            "looking up the PyTorchJob CRD",
            lambda: self.client.ApiextensionsV1Api().read_custom_resource_definition(CRD),
            f"the PyTorchJob CRD ({CRD}) is not installed; install the training-operator: {install_operator}",
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

    def job(self, name: str) -> dict:
        """The PyTorchJob as the API has it; NotFound if there is none."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                raise NotFound(f"no petal job {name!r} in namespace {self.namespace!r}") from None
            raise Precondition(f"reading job {name}: {err.status} {err.reason}") from None

    def jobs(self, all_namespaces: bool = False) -> list[dict]:
        """petal's PyTorchJobs (the chart's labels), in this namespace or all."""
        read = self._read_all if all_namespaces else self._read_namespaced
        return self._read("listing jobs", read, f"the PyTorchJob CRD ({CRD}) is not installed")["items"]

    def _read_all(self) -> dict:
        return self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, label_selector=PETAL_SELECTOR)

    def _read_namespaced(self) -> dict:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                         label_selector=PETAL_SELECTOR)  # fmt: skip

    def pods(self, name: str) -> list:
        """The job's pods (the operator labels them with the job's name), master first."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"training.kubeflow.org/job-name={name}")
        return sorted(pods.items, key=lambda p: (not p.metadata.name.endswith("-master-0"), p.metadata.name))

    def delete(self, name: str) -> list[str]:
        """The job and what its release rendered beside it (Secret, NetworkPolicy, ServiceAccount)."""
        from kubernetes.client.exceptions import ApiException

        self.job(name)
        gone = [f"pytorchjob/{name}"]
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                    propagation_policy="Foreground")  # fmt: skip
        selector = f"{PETAL_SELECTOR},app.kubernetes.io/instance={name}"
        networking = self.client.NetworkingV1Api()
        for kind, lister, deleter in (
            ("secret", self.core.list_namespaced_secret, self.core.delete_namespaced_secret),
            ("networkpolicy", networking.list_namespaced_network_policy, networking.delete_namespaced_network_policy),
            ("serviceaccount", self.core.list_namespaced_service_account, self.core.delete_namespaced_service_account),
        ):
            for item in lister(self.namespace, label_selector=selector).items:
                try:
                    deleter(item.metadata.name, self.namespace)
                    gone.append(f"{kind}/{item.metadata.name}")
                except ApiException as err:
                    if err.status != 404:
                        raise
        return gone


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
                    print(f"petal: {pod.metadata.name} Pending for {now - created:.0f}s: {reason}", file=sys.stderr)


def pod_event_lines(cluster: Cluster, pod: str, warnings_only: bool = False) -> list[str]:
    events = cluster.core.list_namespaced_event(cluster.namespace, field_selector=f"involvedObject.name={pod}").items
    return [f"{e.reason}: {e.message}" for e in events if not warnings_only or e.type == "Warning"]


def follow_log(cluster: Cluster, pod: str, write: Callable[[str], None], done: Callable[[], bool]) -> None:
    """Streams a pod's `pytorch` container log through `write` once it runs, and again for every new
    instance of it — a container restarted in place, or the pod deleted and made anew under the same
    name — until `done()` says the job is over and the last instance's log has ended."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    streamed = None  # (pod uid, restart count) of the instance last streamed
    while True:
        try:
            found = cluster.core.read_namespaced_pod(pod, cluster.namespace)
            statuses = [s for s in found.status.container_statuses or [] if s.name == "pytorch"]
            instance = (found.metadata.uid, statuses[0].restart_count) if statuses else None
            started = statuses and (statuses[0].state.running or statuses[0].state.terminated)
            if started and instance != streamed:
                streamed = instance
                response = cluster.core.read_namespaced_pod_log(pod, cluster.namespace, container="pytorch",
                                                                follow=True, _preload_content=False)  # fmt: skip
                for line in response.stream():
                    write(line.decode(errors="replace"))
                continue
        except (ApiException, HTTPError) as err:
            # Not created (yet, or again), or the kubelet cannot serve logs: keep polling.
            if getattr(err, "status", None) != 404:
                reason = getattr(err, "reason", None) or type(err).__name__
                print(f"petal: cannot follow {pod} yet ({reason})", file=sys.stderr)
        if done():
            return
        time.sleep(2)


def follow_in_background(cluster: Cluster, pod: str) -> None:
    """submit --follow=logs: the master's log on stderr while the wait goes on."""
    threading.Thread(target=follow_log, args=(cluster, pod, sys.stderr.write, lambda: False), daemon=True).start()


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
