"""Kubeflow Trainer v2 (TrainJob, on JobSet) and Kueue on the real test bed: a TrainJob one of whose
nodes aborts (exit 134) is restarted whole by JobSet and resumes from its checkpoint, one that exits
with a permanent code fails at once; under a queue whose quota fits one job, three jobs of both kinds
run one after the other, each one's pods made only once the one before has finished (gang admission),
each asking for one host of the test bed's Kueue Topology and admitted with a topology assignment
naming the node; one that no host can hold waits, saying why; what the cluster lacks for them exits
3 naming it. (The 4-node TrainJob through scripts/smoke.sh is in test_delivery.py.)"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import PETAL_NAMESPACE
from mlflow import MlflowClient
from support import BUCKET_VALUES, ROOT, s3, tracked_run

from training.storage import parse_url

CPU_VALUES = ROOT / "charts" / "petal" / "ci" / "cpu-values.yaml"
TOPOLOGY_QUEUE = "petal"  # the test bed's LocalQueue, on its topology-aware flavor (scripts/testbed/trainer.sh)
CHECKPOINT_EVERY = 3
STEP = re.compile(r"epoch (\d+)/\d+ step (\d+)/")
RESUMED = re.compile(r'\{"event": "resumed", "epoch": (\d+), "step": (\d+)\}')


def petal_submit(cluster, name: str, dataset: str, runs: Path, *args: str) -> subprocess.Popen:
    """`petal submit` of a small CPU job, running while the test looks on."""
    argv = ["petal", "submit", *BUCKET_VALUES, "--name", name, "--namespace", PETAL_NAMESPACE, "--replicas", "2",
            "--values", str(CPU_VALUES), "--dataset", dataset, "--set", f"outputPrefix={s3('runs')}",
            "--collect", str(runs / name), "--timeout", "1200", *args]  # fmt: skip
    return subprocess.Popen(argv, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(submit: subprocess.Popen) -> tuple[int, str]:
    _, stderr = submit.communicate(timeout=1500)
    return submit.returncode, stderr


def while_submitting(submit: subprocess.Popen, probe):
    """probe, failing the test at once with submit's output if `petal submit` has already exited."""

    def probed():
        if submit.poll() is not None:
            pytest.fail(f"petal submit exited {submit.returncode} early:\n{submit.stderr.read()[-4000:]}")
        return probe()

    return probed


def newest(cluster, name: str, rank: int) -> dict | None:
    """The newest pod of a TrainJob's node `rank` (JobSet's labels), or None."""
    selector = f"jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index={rank}"
    pods = cluster.get("-n", PETAL_NAMESPACE, "pods", "-l", selector)["items"]
    return max(pods, key=lambda p: p["metadata"]["creationTimestamp"], default=None)


# Run in a node's container: SIGABRT to its trainer process (not the launcher), the way NCCL's watchdog
# ends a rank whose collective failed or hung.
ABORT_TRAINER = """import os, signal
for pid in filter(str.isdigit, os.listdir("/proc")):
    command = open(f"/proc/{pid}/cmdline", "rb").read()
    if b"-m\\0training\\0" in command and b"training.launch" not in command:
        os.kill(int(pid), signal.SIGABRT)
        print(pid)
"""


def test_a_trainjob_whose_node_aborts_is_restarted_whole_and_resumes(cluster, timeline, petal_image, synthetic_dataset,
                                                                       storage, mlflow_server, tmp_path):  # fmt: skip
    """Exit 134 (SIGABRT, NCCL's watchdog on GPUs) is retryable: JobSet restarts every node, which resume
    from the last checkpoint, and go on in the run's one MLflow run."""
    name = f"tj-fault-{uuid.uuid4().hex[:5]}"
    epochs = 2
    submit = petal_submit(cluster, name, synthetic_dataset, tmp_path, "--api", "trainjob", "--epochs", str(epochs),
                          "--batch-size", "8", "--set", f"training.checkpointEvery={CHECKPOINT_EVERY}",
                          "--set", "training.logEvery=1", "--set", f"mlflow.trackingUri={mlflow_server.pod_uri}",
                          "--set", f"training.mlflowExperiment={name}")  # fmt: skip
    try:

        def position(lines: list[str]) -> tuple[int, int] | None:
            found = [m for m in map(STEP.search, lines) if m]
            return (int(found[-1][1]), int(found[-1][2])) if found else None

        def past_a_checkpoint():
            runs = timeline.job_runs(PETAL_NAMESPACE, name, rank_zero=True)
            reached = position(runs[-1][1].lines) if runs else None
            return (runs[-1][0].uid, reached) if reached and reached >= (1, CHECKPOINT_EVERY + 2) else None

        first_master, reached = timeline.wait_for(f"{name} past its first checkpoint",
                                                  while_submitting(submit, past_a_checkpoint), timeout=900)  # fmt: skip
        aborted = cluster.kubectl("-n", PETAL_NAMESPACE, "exec", newest(cluster, name, 1)["metadata"]["name"], "-c",
                                  "node", "--", "python", "-c", ABORT_TRAINER)  # fmt: skip
        assert aborted.stdout.strip().isdigit(), aborted.stdout

        def resumed():
            runs = timeline.job_runs(PETAL_NAMESPACE, name, rank_zero=True)
            pod, run = runs[-1]
            match = next((m for m in map(RESUMED.search, run.lines) if m), None)
            return (int(match[1]), int(match[2])) if pod.uid != first_master and match else None

        epoch, step = timeline.wait_for(f"{name}'s nodes restarted by JobSet and resumed",
                                        while_submitting(submit, resumed), timeout=900)  # fmt: skip
        assert epoch == reached[0] or (epoch == reached[0] + 1 and step == 0), (reached, (epoch, step))
        assert epoch > reached[0] or reached[1] - step <= CHECKPOINT_EVERY, (reached, (epoch, step))
        code, stderr = finished(submit)
        assert code == 0, stderr[-4000:]
        jobset = cluster.get("-n", PETAL_NAMESPACE, "jobset", name)
        assert jobset["status"]["restarts"] >= 1 and jobset["status"]["terminalState"] == "Completed"
        ended = [(pod.name, run.exit_code) for pod, run in timeline.job_runs(PETAL_NAMESPACE, name)]
        assert sum(code == 134 for _, code in ended) == 1, ended  # the aborted node's, seen before JobSet removed it
        text = storage.read_bytes(parse_url(s3(f"runs/{name}")).join("metrics.jsonl")).decode()
        records = [json.loads(line) for line in text.splitlines()]
        assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
        assert {r["train_samples"] for r in records} == {records[0]["train_samples"]}  # each epoch trained whole
        # The restarted nodes went on in the first ones' MLflow run, which the pods reach through a Service.
        run = tracked_run(mlflow_server.uri, name, name, records)
        history = MlflowClient(mlflow_server.uri).get_metric_history(run.info.run_id, "train/loss")
        per_epoch = math.ceil(records[0]["train_samples"] / 2 / 8)  # 2 nodes of batch 8
        assert sorted(m.step for m in history) == list(range(1, epochs * per_epoch + 1))  # each step once

        def petal(*args: str) -> subprocess.CompletedProcess:
            return cluster.petal(*args, name, "-n", PETAL_NAMESPACE)

        status = json.loads(petal("status", "--json").stdout)
        assert status["kind"] == "TrainJob" and status["state"] == "Succeeded"
        assert status["last_epoch"]["epoch"] == epochs
        assert len({p["name"] for p in status["pods"]}) >= 2  # both nodes' pods, those of before the restart too
        for rank in (0, 1):  # each node's pod after the restart, not the aborted one; only node 0 prints progress
            logged = petal("logs", "--rank", str(rank))
            assert logged.stdout == cluster.logs(newest(cluster, name, rank)["metadata"]["name"], PETAL_NAMESPACE)
        assert STEP.search(petal("logs").stdout)  # rank 0 by default

        cancelled = petal("cancel")
        assert f"deleted trainjob/{name}" in cancelled.stderr, cancelled.stderr
    finally:
        submit.kill()
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "trainjob", name, "--ignore-not-found", check=False)


def test_a_trainjob_fails_at_once_on_a_permanent_exit_code(cluster, petal_image, tmp_path):
    """The runtime's podFailurePolicy: a missing dataset (exit 3) is not retried, unlike exit 134 above."""
    name = f"tj-perm-{uuid.uuid4().hex[:5]}"
    submit = petal_submit(cluster, name, s3("datasets/absent"), tmp_path, "--api", "trainjob", "--epochs", "1")
    try:
        code, stderr = finished(submit)
        assert code == 1, stderr[-4000:]
        assert "datasets/absent" in stderr, stderr[-4000:]  # the failing pod's log tail names it
        jobset = cluster.get("-n", PETAL_NAMESPACE, "jobset", name)
        assert jobset["status"].get("restarts", 0) == 0 and jobset["status"]["terminalState"] == "Failed"
    finally:
        submit.kill()
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "trainjob", name, "--ignore-not-found", check=False)


def test_the_kubeflow_sdk_starts_a_petal_run_follows_it_and_petal_collects_it(cluster, petal_image, synthetic_dataset,
                                                                              tmp_path):  # fmt: skip
    """A notebook's way in: Kubeflow's own SDK (TrainerClient) lists petal's runtime and starts a 2-node
    run on it with nothing but an image and PETAL_* options in the environment (the runtime runs the
    trainer with no arguments, as non-root, with the Secret's credentials); the SDK's logs, job and
    status say what the cluster says, and `petal collect` fetches the run's results. (Not list_jobs: SDK
    0.5 raises on any TrainJob whose containers limit memory alone, as petal's CPU jobs do — kubeflow/sdk#516.)"""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import CustomTrainerContainer, TrainerClient

    client = TrainerClient(KubernetesBackendConfig(namespace=PETAL_NAMESPACE, config_file=cluster.env["KUBECONFIG"]))
    assert "petal" in [runtime.name for runtime in client.list_runtimes()]
    output = s3(f"runs/sdk-{uuid.uuid4().hex[:6]}")
    options = {"PETAL_DATA": synthetic_dataset, "PETAL_OUTPUT": output, "PETAL_EPOCHS": "1", "PETAL_ARCH": "resnet18",
               "PETAL_FREEZE": "none", "PETAL_PRETRAINED": "none", "PETAL_IMAGE_SIZE": "48", "PETAL_BATCH_SIZE": "16",
               "PETAL_WORKERS": "0"}  # fmt: skip
    name = client.train(runtime="petal", trainer=CustomTrainerContainer(image=petal_image, num_nodes=2, env=options))
    try:
        client.wait_for_job_status(name, status={"Running", "Complete"}, timeout=300, polling_interval=1)
        logs = list(client.get_job_logs(name, follow=True))  # node 0's, to its end
        job = client.wait_for_job_status(name, status={"Complete"}, timeout=600, polling_interval=1)
        assert job.status == "Complete" and job.num_nodes == 2 and job.runtime.name == "petal"
        assert sorted(step.name for step in job.steps if step.name.startswith("node")) == ["node-0", "node-1"]
        assert client.get_job(name).status == "Complete"
        said = json.loads(next(line for line in reversed(logs) if line.startswith('{"event": "done"')))
        assert said["epochs"] == 1, said  # the options reached the trainer from the environment

        pods = cluster.get("-n", PETAL_NAMESPACE, "pods", "-l", f"jobset.sigs.k8s.io/jobset-name={name}")["items"]
        assert len(pods) == 2 and all(p["spec"]["securityContext"]["runAsNonRoot"] for p in pods)
        assert all("args" not in p["spec"]["containers"][0] for p in pods)  # the options came from the environment

        dest = tmp_path / name
        collected = subprocess.run(["petal", "collect", name, str(dest), "--namespace", PETAL_NAMESPACE],
                                   env=cluster.env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert collected.returncode == 0, collected.stderr
        summary = json.loads((dest / "summary.json").read_text())
        assert summary["output"] == output and summary["epochs"] == 1
        assert summary["best_val_acc"] == said["best_val_acc"] and "best.pt" in summary["artifacts"]
    finally:
        client.delete_job(name)


@pytest.fixture()
def one_job_queue(cluster):
    """A Kueue ClusterQueue whose quota fits one 2-pod CPU job (100m CPU, 2Gi memory and a 1Gi cache
    each) and not two, on the test bed's topology-aware flavor, with its LocalQueue in petal's
    namespace."""
    with cluster.queue("gang", "topology-flavor", {"cpu": "300m", "memory": "6Gi", "ephemeral-storage": "3Gi"}) as name:
        yield name


def timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


POD_LABEL = {"pytorchjob": "training.kubeflow.org/job-name", "trainjob": "jobset.sigs.k8s.io/jobset-name"}
DONE = {"pytorchjob": "Succeeded", "trainjob": "Complete"}


def test_a_queue_that_fits_one_job_runs_three_one_after_the_other_each_on_the_host_it_asked_for(
    cluster, petal_image, synthetic_dataset, one_job_queue, tmp_path
):
    """Kueue admits whole jobs, one at a time when only one fits, and places each on the topology level
    it asked for (`--topology kubernetes.io/hostname`): its Workload's topologyAssignment names the node.
    Each job is submitted once the one before it runs, so a TrainJob waits for a PyTorchJob and a
    PyTorchJob for a TrainJob: each kind is held back, its pods made only once the job before ended."""
    apis = ["pytorchjob", "trainjob", "pytorchjob"]
    names = [f"gang-{api[:5]}-{i}-{uuid.uuid4().hex[:4]}" for i, api in enumerate(apis)]
    node = cluster.get("nodes")["items"][0]["metadata"]["name"]

    def pods_of(api: str, name: str) -> list[dict]:
        return cluster.get("-n", PETAL_NAMESPACE, "pods", "-l", f"{POD_LABEL[api]}={name}")["items"]

    submits = []
    try:
        for api, name in zip(apis, names, strict=True):
            queued = ["--api", api, "--queue", one_job_queue, "--topology", "kubernetes.io/hostname", "--epochs", "1"]
            submits.append(petal_submit(cluster, name, synthetic_dataset, tmp_path, *queued))
            made = functools.partial(pods_of, api, name)
            cluster.wait_until(f"{name} admitted (its pods made)", while_submitting(submits[-1], made), PETAL_NAMESPACE,
                               timeout=600)  # fmt: skip
        results = [finished(submit) for submit in submits]
        for code, stderr in results:
            assert code == 0, stderr[-4000:]
        waited = ["waiting for Kueue admission: " in stderr for _, stderr in results]
        assert waited == [False, True, True], [stderr[-2000:] for _, stderr in results]
        assert all("insufficient unused quota" in stderr for _, stderr in results[1:])

        ended, created = [], []
        for api, name in zip(apis, names, strict=True):
            job = cluster.get("-n", PETAL_NAMESPACE, api, name)
            (condition,) = [c for c in job["status"]["conditions"] if c["type"] == DONE[api]]
            ended.append(timestamp(condition["lastTransitionTime"]))
            pods = pods_of(api, name)
            assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
            created.append(min(timestamp(p["metadata"]["creationTimestamp"]) for p in pods))
            assignments = cluster.workload_of(api, name)["status"]["admission"]["podSetAssignments"]
            assert assignments and all(a["count"] > 0 for a in assignments)
            for assignment in assignments:
                placed = assignment["topologyAssignment"]
                assert placed["levels"] == ["kubernetes.io/hostname"] and node in json.dumps(placed["slices"]), placed
        for before, after in ((0, 1), (1, 2)):
            assert created[after] >= ended[before], f"{names[after]}'s pods were made before {names[before]} ended"
    finally:
        for submit in submits:
            submit.kill()
        for api, name in zip(apis, names, strict=True):
            cluster.kubectl("-n", PETAL_NAMESPACE, "delete", api, name, "--ignore-not-found", check=False)


def test_a_job_no_host_can_hold_waits_and_petal_status_says_why(cluster, petal_image):
    """Two pods of 60 % of the node's CPUs each: the queue's quota admits them, one host cannot."""
    name = f"tas-big-{uuid.uuid4().hex[:4]}"
    cpus = cluster.get("nodes")["items"][0]["status"]["allocatable"]["cpu"]
    share = f"{int(cpus.removesuffix('m')) * (1 if cpus.endswith('m') else 1000) * 6 // 10}m"
    argv = ["petal", "submit", *BUCKET_VALUES, "--name", name, "--namespace", PETAL_NAMESPACE, "--replicas", "2",
            "--image", petal_image, "--queue", TOPOLOGY_QUEUE, "--topology", "kubernetes.io/hostname",
            "--set", f"resources.requests.cpu={share}", "--timeout", "20"]  # fmt: skip
    try:
        submit = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=180)
        assert submit.returncode == 1 and "did not succeed within --timeout 20s" in submit.stderr, submit.stderr
        reason = re.search(r"waiting for Kueue admission: (.*)", submit.stderr)
        assert reason and "topology" in reason[1], submit.stderr
        status = subprocess.run(["petal", "status", name, "--namespace", PETAL_NAMESPACE], env=cluster.env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        said = re.search(r"waiting for Kueue admission: (.*)", status.stdout)
        assert status.returncode == 0 and said and "topology" in said[1], status
        assert not cluster.get("-n", PETAL_NAMESPACE, "pods", "-l", f"training.kubeflow.org/job-name={name}")["items"]
    finally:
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "pytorchjob", name, "--ignore-not-found", check=False)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--api", "trainjob", "--set", "trainJob.runtime=absent"],
         "ClusterTrainingRuntime 'absent' does not exist; install petal's: kubectl apply --server-side -f "
         f"{ROOT / 'manifests' / 'trainer-runtime.yaml'}, or set trainJob.runtime"),
        (["--queue", "absent"], f"--queue absent: no Kueue LocalQueue 'absent' in namespace '{PETAL_NAMESPACE}'"),
        (["--gpus-per-replica", "1", "--gpu-device-class", "absent.example.com"],
         "DeviceClass 'absent.example.com' does not exist (or the cluster serves no resource.k8s.io/v1"),
    ],
    ids=["runtime", "queue", "device-class"],
)  # fmt: skip
def test_a_missing_runtime_queue_or_device_class_exits_3_and_applies_nothing(cluster, args, said):
    name = f"pre-{uuid.uuid4().hex[:6]}"
    result = subprocess.run(["petal", "submit", *BUCKET_VALUES, "--name", name, "--namespace", PETAL_NAMESPACE,
                             *args], env=cluster.env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 3 and result.stderr.count("\n") == 1, result.stderr
    assert said in result.stderr
    left = cluster.kubectl("-n", PETAL_NAMESPACE, "get", "pytorchjobs,trainjobs,resourceclaimtemplates", "-o",
                           "name").stdout  # fmt: skip
    assert name not in left


def test_a_name_taken_by_the_other_kind_is_refused_and_nothing_applied(cluster):
    """Both kinds under one name would share pods' names, the run directory and every `petal` verb."""
    name = f"twin-{uuid.uuid4().hex[:6]}"
    submit = ["petal", "submit", *BUCKET_VALUES, "--name", name, "--namespace", PETAL_NAMESPACE]
    rendered = subprocess.run([*submit, "--dry-run"], env=cluster.env, capture_output=True, text=True, check=True)
    job = next(doc for doc in yaml.safe_load_all(rendered.stdout) if doc and doc["kind"] == "PyTorchJob")
    job["spec"]["runPolicy"]["suspend"] = True  # no pods: only its name matters here
    cluster.apply(job, namespace=PETAL_NAMESPACE)
    try:
        result = subprocess.run([*submit, "--api", "trainjob"], env=cluster.env, capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"a PyTorchJob named '{name}' already exists" in result.stderr
        assert cluster.kubectl("-n", PETAL_NAMESPACE, "get", "trainjob", name, check=False).returncode != 0
    finally:
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "pytorchjob", name, "--ignore-not-found", check=False)
