"""The Kubeflow job kinds petal runs as, each in one entry: where its objects live, how its pods are
found and ranked, where its trainer's arguments sit, and how its status reads as one word. Every
`petal` verb asks the entry of the job at hand and never branches on the kind itself.

Adding a kind (an MPIJob, a bare JobSet) is one `Kind` here plus one template in
charts/petal/templates/ that renders `petal.podSpec` for its pods (docs/layout.md).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from petal import installed


@functools.cache
def versions() -> dict[str, str]:
    """scripts/versions.env, the test bed's pins, which the install hints name."""
    text = installed("scripts/versions.env").read_text()
    return dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", text, flags=re.M))


def true_conditions(job: dict) -> list[str]:
    return [c["type"] for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"]


@dataclass(frozen=True)
class Kind:
    """One Kubeflow job API. The callables take the job as the API returns it (a dict)."""

    name: str
    group: str
    version: str
    plural: str
    container: str  # the training container's name, which the operator requires
    succeeded: str  # the condition that means done
    pod_label: str  # the label holding the job's name on its pods
    pod_selector_extra: str  # more of the selector where the job runs other pods beside its ranks
    rank_of: Callable[[dict], int]  # a pod's rank from its labels: 0 runs the master process
    rank_names: str  # what --rank i names, for messages
    ranks: Callable[[dict], int]  # how many pods the job runs
    trainer: Callable[[dict], dict]  # where the training container's args and env are
    run_policy: Callable[[dict], dict]  # the part of the spec that holds `suspend`
    conditions: Callable[[dict], list[str]]  # its true conditions, in petal's words (see state)
    install_hint: Callable[[], str]
    # Cluster-scoped objects of the kind's API group the job needs: (plural, name, what to do if missing).
    needs: Callable[[dict], list[tuple[str, str, str]]]

    @property
    def crd(self) -> str:
        return f"{self.plural}.{self.group}"

    def pod_selector(self, name: str) -> str:
        return f"{self.pod_label}={name}{self.pod_selector_extra}"

    def output(self, job: dict) -> str | None:
        """The run directory the job trains into: its trainer's --output, or else its PETAL_OUTPUT (a
        TrainJob the Kubeflow SDK made passes options as variables)."""
        trainer = self.trainer(job)
        args = trainer.get("args") or []
        for i, arg in enumerate(args):
            if arg.startswith("--output="):
                return arg.split("=", 1)[1]
            if arg == "--output" and i + 1 < len(args):
                return args[i + 1]
        return next((v.get("value") for v in trainer.get("env") or [] if v["name"] == "PETAL_OUTPUT"), None)

    def suspended(self, job: dict) -> bool:
        return bool(self.run_policy(job).get("suspend"))

    def state(self, job: dict) -> str:
        """One word for every kind: Queued (suspended: waiting for Kueue, or for whoever suspended it),
        Pending, Created, Running, Restarting, Succeeded or Failed."""
        held = self.conditions(job)
        if not held and self.suspended(job):
            return "Queued"
        latest = held[-1] if held else "Pending"
        return "Queued" if latest == "Suspended" else latest


def _trainjob_conditions(job: dict) -> list[str]:
    # A TrainJob's conditions are only Suspended, Complete and Failed; its Jobs say whether it runs.
    held = [{"Complete": "Succeeded"}.get(c, c) for c in true_conditions(job)]
    running = any(j.get("active") for j in job.get("status", {}).get("jobsStatus", []))
    return held or (["Running"] if running else [])


def _trainjob_runtime(job: dict) -> list[tuple[str, str, str]]:
    runtime = job["spec"]["runtimeRef"]["name"]
    return [("clustertrainingruntimes", runtime,
             f"ClusterTrainingRuntime {runtime!r} does not exist; install petal's: kubectl apply --server-side -f "
             f"{installed('manifests/trainer-runtime.yaml')}, or set trainJob.runtime")]  # fmt: skip


PYTORCHJOB = Kind(
    name="PyTorchJob", group="kubeflow.org", version="v1", plural="pytorchjobs", container="pytorch",
    succeeded="Succeeded", pod_label="training.kubeflow.org/job-name", pod_selector_extra="",
    rank_of=lambda labels: int(labels["training.kubeflow.org/replica-index"])
    + (labels["training.kubeflow.org/replica-type"] != "master"),
    rank_names="0 is the master, i is worker i-1",
    ranks=lambda job: 1 + job["spec"]["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0),
    trainer=lambda job: job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0],
    run_policy=lambda job: job["spec"].get("runPolicy", {}),
    conditions=true_conditions,
    install_hint=lambda: "install the training-operator: kubectl apply --server-side -k "
    '"github.com/kubeflow/training-operator.git/manifests/overlays/standalone'
    f'?ref={versions()["TRAINING_OPERATOR_VERSION"]}"',
    needs=lambda job: [],
)  # fmt: skip
TRAINJOB = Kind(
    name="TrainJob", group="trainer.kubeflow.org", version="v1alpha1", plural="trainjobs", container="node",
    succeeded="Complete", pod_label="jobset.sigs.k8s.io/jobset-name",
    # A TrainJob's runtime may run initializer Jobs beside its nodes.
    pod_selector_extra=",jobset.sigs.k8s.io/replicatedjob-name=node",
    rank_of=lambda labels: int(labels["batch.kubernetes.io/job-completion-index"]),
    rank_names="i is node i (0 runs the master process)",
    ranks=lambda job: job["spec"]["trainer"]["numNodes"],
    trainer=lambda job: job["spec"].get("trainer", {}),
    run_policy=lambda job: job["spec"],
    conditions=_trainjob_conditions,
    install_hint=lambda: "install Kubeflow Trainer v2 (with JobSet): kubectl apply --server-side -k "
    '"https://github.com/kubeflow/trainer.git/manifests/overlays/manager'
    f'?ref={versions()["KUBEFLOW_TRAINER_VERSION"]}"',
    needs=_trainjob_runtime,
)  # fmt: skip
KINDS = {kind.name: kind for kind in (PYTORCHJOB, TRAINJOB)}


def kind_of(job: dict) -> Kind:
    return KINDS[job["kind"]]


def install_kueue_hint() -> str:
    return ("install Kueue: kubectl apply --server-side -f https://github.com/kubernetes-sigs/kueue/releases/"
            f"download/{versions()['KUEUE_VERSION']}/manifests.yaml")  # fmt: skip
