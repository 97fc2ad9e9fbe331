"""Everything petal asks of the Kubernetes API, and the exit codes its answers mean. The kubernetes
client is imported only once a cluster is really needed (a dry run never does), and torch never.

Exit codes shared by every `petal` verb: 0 done; 1 the job failed (or did not succeed in time);
2 bad arguments, or a job the cluster refuses (nothing applied); 3 a cluster precondition is
missing; 4 the job succeeded but its results could not be collected here; 5 no such job.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

from petal.kinds import KINDS, Kind, install_kueue_hint, kind_of

PENDING_GRACE_SECONDS = 30
# The chart's labels: what tells petal's jobs from others.
PETAL_SELECTOR = "app.kubernetes.io/name=petal"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE = ("kueue.x-k8s.io", "v1beta2")


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
        self.kinds_found: dict[str, Kind] = {}  # job name: its kind, once looked up

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

    def check(self, kind: Kind, docs: list[dict], secret_names: set[str]) -> None:
        """Exit 3 naming what the job needs and the cluster lacks: the kind's CRD and what else it needs (a
        TrainJob's runtime), the namespace, the storage Secret, the Kueue LocalQueue, the DeviceClass its
        GPUs are claimed from."""
        extensions = self.client.ApiextensionsV1Api()
        self._read(f"looking up the {kind.name} CRD", lambda: extensions.read_custom_resource_definition(kind.crd),
                   f"the {kind.name} CRD ({kind.crd}) is not installed; {kind.install_hint()}")  # fmt: skip
        job = next(d for d in docs if d["kind"] == kind.name)
        name = job["metadata"]["name"]
        for other in KINDS.values():
            if other is not kind and self._get(other, name) is not None:
                raise BadArguments(
                    f"a {other.name} named {name!r} already exists in namespace {self.namespace!r} "
                    "(its pods, outputs and `petal` verbs would be shared); choose another --name, or "
                    f"remove it: kubectl -n {self.namespace} delete {other.name.lower()} {name}"
                )
        for plural, needed, missing in kind.needs(job):
            self._read(f"looking up {plural}/{needed}",
                       lambda p=plural, n=needed: self.custom.get_cluster_custom_object(kind.group, kind.version, p, n),
                       missing)  # fmt: skip
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
                       f"--queue {queue}: Kueue is not installed (no CRD {crd}); {install_kueue_hint()}")  # fmt: skip
            self._read("looking up the LocalQueue",
                       lambda: self.custom.get_namespaced_custom_object(*KUEUE, self.namespace, "localqueues", queue),
                       f"--queue {queue}: no Kueue LocalQueue {queue!r} in namespace {self.namespace!r}; create one "
                       f"that points at a ClusterQueue (docs/kubernetes.md: Kueue)")  # fmt: skip
        device_classes = sorted({request["exactly"]["deviceClassName"] for doc in docs
                                 if doc["kind"] == "ResourceClaimTemplate"
                                 for request in doc["spec"]["spec"]["devices"]["requests"]})  # fmt: skip
        resource = self.client.ResourceV1Api()
        for device_class in device_classes:
            self._read("looking up the DeviceClass", lambda c=device_class: resource.read_device_class(c),
                       f"DeviceClass {device_class!r} does not exist (or the cluster serves no "
                       "resource.k8s.io/v1: Kubernetes 1.34+); install the DRA driver that publishes it, or set "
                       "gpus.deviceClass")  # fmt: skip

    def apply(self, docs: list[dict]) -> None:
        """Creates the job's objects: all of them first as a server-side dry run (schema, admission
        webhooks, names already taken), so that a refusal leaves nothing behind; then for real."""
        # The job last: its pods must not meet a claim template (or Secret) that is not there yet
        docs = sorted(docs, key=lambda doc: doc["kind"] in KINDS)
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

        if doc["kind"] in KINDS:
            kind = KINDS[doc["kind"]]
            self.custom.create_namespaced_custom_object(kind.group, kind.version, self.namespace, kind.plural, doc,
                                                        dry_run=dry_run)  # fmt: skip
            return
        try:
            utils.create_from_dict(self.client.ApiClient(), doc, namespace=self.namespace, dry_run=dry_run)
        except utils.FailToCreateError as err:
            raise err.api_exceptions[0] from None

    def _delete(self, doc: dict) -> None:
        name = doc["metadata"]["name"]
        if doc["kind"] in KINDS:
            kind = KINDS[doc["kind"]]
            self.custom.delete_namespaced_custom_object(kind.group, kind.version, self.namespace, kind.plural, name)
        else:
            _, delete = self._companions()[doc["kind"]]
            delete(name, self.namespace)

    def _companions(self) -> dict:
        """What a release renders beside its job, by kind: (list, delete) calls of the API."""
        networking, resource = self.client.NetworkingV1Api(), self.client.ResourceV1Api()
        return {
            "Secret": (self.core.list_namespaced_secret, self.core.delete_namespaced_secret),
            "NetworkPolicy": (networking.list_namespaced_network_policy, networking.delete_namespaced_network_policy),
            "ServiceAccount": (
                self.core.list_namespaced_service_account,
                self.core.delete_namespaced_service_account,
            ),
            "ResourceClaimTemplate": (
                resource.list_namespaced_resource_claim_template,
                resource.delete_namespaced_resource_claim_template,
            ),
        }  # fmt: skip

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

    def _get(self, kind: Kind, name: str) -> dict | None:
        """The job of that kind and name; None where there is none, or where this API is not installed
        or not open to us (403): a user may be allowed one kind only."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(kind.group, kind.version, self.namespace, kind.plural,
                                                            name)  # fmt: skip
        except ApiException as err:
            if err.status in (403, 404):
                return None
            raise Precondition(f"reading {kind.name} {name}: {err.status} {err.reason}") from None

    def job(self, name: str) -> dict:
        """The petal job of that name as the API has it, of whichever kind; NotFound if there is none.
        Once a name's kind is known, one GET."""
        known = self.kinds_found.get(name)
        job = self._get(known, name) if known else None
        if job:
            return job
        found = [job for job in (self._get(kind, name) for kind in KINDS.values()) if job]
        if len(found) > 1:
            kinds = " and a ".join(job["kind"] for job in found)
            raise BadArguments(f"both a {kinds} are named {name!r} in namespace {self.namespace!r}; remove one: "
                               f"kubectl -n {self.namespace} delete {found[-1]['kind'].lower()} {name}")  # fmt: skip
        if not found:
            raise NotFound(f"no petal job {name!r} in namespace {self.namespace!r}")
        self.kinds_found[name] = kind_of(found[0])
        return found[0]

    def jobs(self, all_namespaces: bool = False) -> list[dict]:
        """petal's jobs of every kind the cluster serves (the chart's labels), in this namespace or all."""
        from kubernetes.client.exceptions import ApiException

        found, refused = [], []
        for kind in KINDS.values():
            try:
                if all_namespaces:
                    listed = self.custom.list_cluster_custom_object(
                        kind.group, kind.version, kind.plural, label_selector=PETAL_SELECTOR
                    )
                else:
                    listed = self.custom.list_namespaced_custom_object(
                        kind.group, kind.version, self.namespace, kind.plural, label_selector=PETAL_SELECTOR
                    )
            except ApiException as err:
                if err.status in (403, 404):  # this API is not installed, or not open to us
                    refused.append(f"{kind.name}s: {err.status} {err.reason}")
                    continue
                raise Precondition(f"listing {kind.name}s: {err.status} {err.reason}") from None
            found += listed["items"]
        if len(refused) == len(KINDS):
            hints = "; or ".join(kind.install_hint() for kind in KINDS.values())
            raise Precondition(f"cannot list petal's jobs ({'; '.join(refused)}); {hints}")
        return sorted(found, key=lambda job: job["metadata"]["creationTimestamp"])

    def pods(self, job: dict) -> list:
        """The job's pods, rank 0 (the master's) first; after a restart, the newest pod of each rank first."""
        kind, name = kind_of(job), job["metadata"]["name"]
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=kind.pod_selector(name)).items
        return sorted(pods, key=lambda p: (kind.rank_of(p.metadata.labels), -p.metadata.creation_timestamp.timestamp()))

    def rank_pod(self, job: dict, rank: int):
        """The newest pod of a rank, or None while it has none."""
        return next((p for p in self.pods(job) if kind_of(job).rank_of(p.metadata.labels) == rank), None)

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
        """The job and what its release rendered beside it (Secret, NetworkPolicy, ServiceAccount,
        ResourceClaimTemplate)."""
        from kubernetes.client.exceptions import ApiException

        kind, name = kind_of(job), job["metadata"]["name"]
        gone = [f"{kind.name.lower()}/{name}"]
        self.custom.delete_namespaced_custom_object(kind.group, kind.version, self.namespace, kind.plural, name,
                                                    propagation_policy="Foreground")  # fmt: skip
        selector = f"{PETAL_SELECTOR},app.kubernetes.io/instance={name}"
        for kind, (lister, deleter) in self._companions().items():
            try:
                items = lister(self.namespace, label_selector=selector).items
            except ApiException as err:
                # 404: a cluster that does not serve the API (DRA before 1.34) has none; 403: not ours to list
                if err.status not in (403, 404):
                    raise
                continue
            for item in items:
                try:
                    deleter(item.metadata.name, self.namespace)
                    gone.append(f"{kind.lower()}/{item.metadata.name}")
                except ApiException as err:
                    if err.status != 404:
                        raise
        return gone
