"""petal delivered the way users run it, on the real test bed cluster: the image built from the
Dockerfile, `scripts/smoke.sh` (= submit.py --replicas 4 → Succeeded → collected → predict), and what
submit does with a cluster that lacks something or refuses the job. (`helm install` surviving lost
pods, with `helm test`, is tests/cluster/test_faults.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import PETAL_NAMESPACE, S3_SECRET
from support import BUCKET_VALUES, ROOT, s3, tracked_run

CHART = ROOT / "charts" / "petal"
CPU_VALUES = CHART / "ci" / "cpu-values.yaml"


def submit_here(cluster, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """submit.py against the test bed, BUCKET_VALUES first so that every flag given still wins."""
    return subprocess.run(["python", str(ROOT / "scripts" / "submit.py"), *BUCKET_VALUES, *args],
                          env=env or cluster.env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(("api", "done"), [("pytorchjob", "Succeeded"), ("trainjob", "Complete")])
def test_smoke_submits_four_replicas_collects_and_predicts(cluster, petal_image, storage, mlflow_server, tmp_path, api,
                                                           done):  # fmt: skip
    env = cluster.env | {"PETAL_IMAGE": petal_image, "PETAL_REPLICAS": "4", "PETAL_RUNS_DIR": str(tmp_path),
                         "PETAL_S3_PREFIX": s3("smoke"), "PETAL_API": api,
                         "PETAL_MLFLOW_URI": mlflow_server.pod_uri}  # fmt: skip
    smoke = subprocess.run([str(ROOT / "scripts" / "smoke.sh")], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=1800)  # fmt: skip
    assert smoke.returncode == 0, f"{smoke.stdout[-3000:]}\n{smoke.stderr[-5000:]}"

    right, total = map(int, re.search(r"smoke: (\d+)/(\d+) held-out images right", smoke.stdout).groups())
    assert total >= 40 and right / total >= 0.9
    work = Path(re.search(r"the run is in (\S+)", smoke.stdout)[1])
    assert work.parent == tmp_path
    summary = json.loads((work / "summary.json").read_text())
    assert summary["artifacts"] == ["best.pt", "curves.png", "metrics.jsonl", "per_class.png"]
    assert summary["epochs"] == 5 and summary["conditions"][-1] == done
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    run = tracked_run(mlflow_server.uri, "smoke", work.name, records)  # PETAL_MLFLOW_URI, through the Service
    assert run.data.params["epochs"] == "5"

    petal = ["petal", "-n", PETAL_NAMESPACE]
    listed = subprocess.run([petal[0], "list", *petal[1:], "--json"], env=env, capture_output=True, text=True)
    (row,) = [j for j in json.loads(listed.stdout) if j["name"] == work.name]
    assert row["state"] == "Succeeded" and row["best_val_acc"] == summary["best_val_acc"]
    shown = subprocess.run([petal[0], "status", work.name, *petal[1:], "--json"], env=env, capture_output=True,
                           text=True)  # fmt: skip
    assert json.loads(shown.stdout)["epoch"] == json.loads(shown.stdout)["epochs"] == 5

    job = cluster.get("-n", PETAL_NAMESPACE, api, work.name)
    if api == "trainjob":
        assert job["spec"]["trainer"]["numNodes"] == 4
        pods = cluster.get("-n", PETAL_NAMESPACE, "pods", "-l", f"jobset.sigs.k8s.io/jobset-name={work.name}")
        assert len(pods["items"]) == 4 and {p["status"]["phase"] for p in pods["items"]} == {"Succeeded"}
        # The Trainer's TrainJobStatus gate: rank 0's progress in the TrainJob's status, through a projected
        # token of the status server's audience; the default API token stays unmounted.
        reported = job["status"]["trainerStatus"]
        metrics = {m["name"]: float(m["value"]) for m in reported["metrics"]}
        assert reported["progressPercentage"] == 100 and metrics["epoch"] == 5
        assert metrics["val/best_accuracy"] == pytest.approx(summary["best_val_acc"], abs=1e-5)
        assert "progress: epoch 5/5 (100%)" in subprocess.run([petal[0], "status", work.name, *petal[1:]], env=env,
                                                               capture_output=True, text=True).stdout  # fmt: skip
        for pod in pods["items"]:
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            (token,) = [
                s for s in volumes["kubeflow-trainer-token"]["projected"]["sources"] if "serviceAccountToken" in s
            ]
            assert token["serviceAccountToken"]["audience"].endswith(f"/trainjobs/{work.name}/status")
            assert not any(name.startswith("kube-api-access") for name in volumes)
    else:
        assert job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
        assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3


@pytest.mark.parametrize("missing", ["namespace", "Secret"])
def test_a_missing_namespace_or_secret_exits_3_and_applies_nothing(cluster, namespace, missing):
    target = f"{namespace}-absent" if missing == "namespace" else namespace  # the fixture's has no Secret
    name = f"pre-{uuid.uuid4().hex[:6]}"
    submit = submit_here(cluster, "--name", name, "--replicas", "2", "--image", "petal:dev", "--namespace", target)
    assert submit.returncode == 3, submit.stderr
    said = (
        f"namespace {target!r} does not exist" if missing == "namespace" else f"Secret {S3_SECRET!r} (S3 credentials)"
    )
    assert said in submit.stderr
    assert name not in cluster.kubectl("get", "pytorchjobs", "-A", "-o", "name").stdout


def test_pods_that_cannot_be_scheduled_are_explained_while_pending(cluster):
    name = f"pending-{uuid.uuid4().hex[:6]}"
    submit = submit_here(cluster, "--name", name, "--replicas", "1", "--image", "petal:dev", "--set",
                         "resources.requests.cpu=64", "--timeout", "15")  # fmt: skip
    try:
        assert submit.returncode == 1, submit.stderr
        assert re.search(rf"{name}-master-0 Pending for \d+s: FailedScheduling: .*Insufficient cpu", submit.stderr)
        assert f"{name} did not succeed within --timeout 15s; it is still in the cluster" in submit.stderr
    finally:
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "pytorchjob", name, check=False)


@pytest.mark.parametrize(
    ("api", "said"),
    [
        ("pytorchjob", "PyTorchJob CRD (pytorchjobs.kubeflow.org) is not installed; install the training-operator"),
        ("trainjob", "TrainJob CRD (trainjobs.trainer.kubeflow.org) is not installed; install Kubeflow Trainer v2"),
    ],
)
def test_a_cluster_without_the_jobs_crd_exits_3_and_says_how_to_install_it(apiserver_without_crds, api, said):
    submit = submit_here(None, "--replicas", "2", "--image", "petal:dev", "--api", api, env=apiserver_without_crds)
    assert submit.returncode == 3 and submit.stderr.count("\n") == 1, submit.stderr
    assert said in submit.stderr
    crd = subprocess.run(["kubectl", "get", "crd", said.split("(")[1].split(")")[0]], env=apiserver_without_crds,
                         capture_output=True, text=True)  # fmt: skip
    assert crd.returncode != 0 and "NotFound" in crd.stderr


def test_a_job_the_cluster_refuses_exits_2_with_its_reason_and_leaves_nothing(cluster, namespace):
    taken = f"taken-{uuid.uuid4().hex[:6]}"
    first = submit_here(cluster, "--name", taken, "--replicas", "1", "--image", "petal:dev", "--namespace", namespace,
                        "--set", "s3.createSecret=true", "--set", "s3.accessKey=a", "--set", "s3.secretKey=b",
                        "--set", "resources.requests.cpu=64", "--timeout", "1")  # fmt: skip
    assert first.returncode == 1 and f"{taken} did not succeed within --timeout 1s" in first.stderr, first.stderr
    again = submit_here(cluster, "--name", taken, "--replicas", "1", "--image", "petal:dev", "--namespace",
                        namespace, "--set", "s3.createSecret=true", "--set", "s3.accessKey=a", "--set",
                        "s3.secretKey=b")  # fmt: skip
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert f"Secret {namespace}/{taken}-s3 already exists; choose another --name" in again.stderr

    # The operator's webhook: an elastic policy needs Worker replicas. The dry run hears it first.
    refused = f"refused-{uuid.uuid4().hex[:6]}"
    webhook = submit_here(cluster, "--name", refused, "--replicas", "1", "--image", "petal:dev", "--namespace",
                          namespace, "--set", "s3.createSecret=true", "--set", "s3.accessKey=a", "--set",
                          "s3.secretKey=b", "--set", "elasticPolicy.minReplicas=1", "--set",
                          "elasticPolicy.maxReplicas=2")  # fmt: skip
    assert webhook.returncode == 2 and webhook.stderr.count("\n") == 1, webhook.stderr
    assert (
        "the cluster refused PyTorchJob" in webhook.stderr and "must be configured if elastic policy" in webhook.stderr
    )
    left = cluster.kubectl("-n", namespace, "get", "pytorchjobs,secrets", "-o", "name").stdout
    assert refused not in left, left


def test_a_job_refused_after_its_dry_run_takes_back_everything_it_created(cluster, namespace):
    """The dry run passes and the real create of the job is refused (an admission policy that lets only
    dry runs through, as a policy that changed in between would): the ServiceAccount, NetworkPolicy,
    Secret and GPU claim template created before it are deleted, so the same submit succeeds once the
    policy is gone."""
    name = f"rollback-{uuid.uuid4().hex[:5]}"
    rules = [
        {"apiGroups": ["kubeflow.org"], "apiVersions": ["*"], "operations": ["CREATE"], "resources": ["pytorchjobs"]}
    ]
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": rules},
            "validations": [{"expression": "request.dryRun == true", "message": "only dry runs today"}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
        },
    }
    cluster.apply(policy, binding, namespace=namespace)
    probe = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "probe"},
             "spec": {"runPolicy": {"suspend": True}, "pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": {
                 "spec": {"containers": [{"name": "pytorch", "image": "petal:dev"}]}}}}}}  # fmt: skip

    def policy_in_force() -> bool:
        created = cluster.kubectl("-n", namespace, "create", "-f", "-", input=yaml.safe_dump(probe), check=False)
        if created.returncode == 0:  # not yet: take the probe back and ask again
            cluster.kubectl("-n", namespace, "delete", "pytorchjob", "probe", "--wait=true")
            return False
        return "only dry runs today" in created.stderr

    everything = ["--name", name, "--replicas", "2", "--image", "petal:dev", "--namespace", namespace,
                  "--set", "serviceAccount.create=true", "--set", "networkPolicy.enabled=true",
                  "--set", "s3.createSecret=true", "--set", "s3.accessKey=a", "--set", "s3.secretKey=b",
                  "--set", "resources.requests.cpu=64", "--gpus-per-replica", "1",
                  "--gpu-device-class", "gpu.example.com"]  # fmt: skip
    try:
        cluster.wait_until("the admission policy to be in force", policy_in_force, namespace, timeout=120)
        refused = submit_here(cluster, *everything)
        assert refused.returncode == 2, refused.stderr
        assert f"the cluster refused PyTorchJob {namespace}/{name}" in refused.stderr
        assert "only dry runs today" in refused.stderr
        left = cluster.kubectl("-n", namespace, "get",
                               "pytorchjobs,secrets,serviceaccounts,networkpolicies,resourceclaimtemplates", "-o",
                               "name").stdout  # fmt: skip
        assert name not in left, left
    finally:
        cluster.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name, check=False)
    cluster.wait_until("the admission policy to be gone", lambda: not policy_in_force(), namespace, timeout=120)
    cluster.kubectl("-n", namespace, "delete", "pytorchjob", "probe", "--ignore-not-found", "--wait=true")
    again = submit_here(cluster, *everything, "--timeout", "1")  # created in full this time; pods stay Pending
    assert again.returncode == 1 and f"{name} did not succeed within --timeout 1s" in again.stderr, again.stderr
    cluster.kubectl("-n", namespace, "delete", "pytorchjob", name, check=False)


def test_a_job_that_succeeded_but_cannot_be_collected_exits_4_with_the_retry(
    cluster, petal_image, synthetic_dataset, tmp_path
):
    name = f"uncollected-{uuid.uuid4().hex[:6]}"
    unreachable = cluster.env | {"S3_ENDPOINT_URL": "http://127.0.0.1:9", "PETAL_S3_RETRY_SECONDS": "1"}
    result = submit_here(cluster, "--name", name, "--replicas", "1", "--image", petal_image, "--values",
                         str(CPU_VALUES), "--dataset", synthetic_dataset, "--epochs", "1", "--set",
                         f"outputPrefix={s3('runs')}", "--collect", str(tmp_path / name), "--timeout", "600",
                         env=unreachable, timeout=700)  # fmt: skip
    assert result.returncode == 4, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert f"{name} succeeded but its results could not be collected" in line
    retry = re.search(r": (petal collect \S+ \S+)$", line)[1].split()
    fetched = subprocess.run(retry, cwd=ROOT, env=cluster.env, capture_output=True, text=True)
    assert fetched.returncode == 0 and (tmp_path / name / "best.pt").exists(), fetched.stderr
    assert json.loads((tmp_path / name / "summary.json").read_text())["tensorboard_files"] >= 1


def test_the_chart_with_its_options_on_is_accepted_by_the_apiserver(cluster, namespace):
    rendered = submit_here(cluster, "--dry-run", "--name", "everything", "--replicas", "3", "--namespace", namespace,
                           "--set", "networkPolicy.enabled=true", "--set", "serviceAccount.create=true",
                           "--set", "s3.createSecret=true", "--set", "s3.accessKey=a", "--set", "s3.secretKey=b",
                           "--set", "nprocPerNode=2", "--set", "gpusPerReplica=1")  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    applied = cluster.kubectl("-n", namespace, "apply", "--dry-run=server", "-f", "-", input=rendered.stdout)
    kinds = re.findall(r"^(\w+)\.?[\w.]*/everything\S* created \(server dry run\)", applied.stdout, flags=re.M)
    assert sorted(kinds) == ["networkpolicy", "pytorchjob", "secret", "serviceaccount"], applied.stdout
