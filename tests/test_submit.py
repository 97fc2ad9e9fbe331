"""scripts/submit.py and charts/petal without a cluster: rendering, validation, exit codes, drift."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from support import BUCKET_VALUES, ROOT

CHART = ROOT / "charts" / "petal"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """submit.py with BUCKET_VALUES first, so every flag and --values after it still wins."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "submit.py"), *BUCKET_VALUES, *args], cwd=ROOT,
                          env=env or os.environ, capture_output=True, text=True, timeout=60)  # fmt: skip


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["helm", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def job_of(text: str) -> dict:
    (job,) = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "PyTorchJob"]
    return job


def test_replicas_4_is_one_master_and_three_workers_running_the_trainer_as_non_root():
    result = submit("--dry-run", "--replicas", "4", "--name", "flowers-1", "--dataset", "s3://data/flowers",
                    "--arch", "resnet50", "--freeze", "layer4", "--epochs", "7", "--batch-size", "24", "--lr", "0.01",
                    "--image", "registry.example:5000/petal:1.2", "--gpus-per-replica", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = job_of(result.stdout)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["metadata"]["name"] == "flowers-1"
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
    for spec in specs.values():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch" and container["image"] == "registry.example:5000/petal:1.2"
        assert set(container["args"]) >= {
            "--data=s3://data/flowers", "--output=s3://runs-bucket/petal/flowers-1", "--arch=resnet50",
            "--freeze=layer4", "--pretrained=imagenet", "--epochs=7", "--batch-size=24", "--lr=0.01",
            "--image-size=224",
        }  # fmt: skip
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        }
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == VALUES["s3"]["existingSecret"]
        assert "value" not in env["AWS_ACCESS_KEY_ID"] and "value" not in env["AWS_SECRET_ACCESS_KEY"]
        labels = spec["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "petal" and labels["app.kubernetes.io/instance"] == "flowers-1"


def test_eight_gpus_per_pod_are_eight_ranks_with_room_for_them():
    job = job_of(submit("--dry-run", "--replicas", "2", "--gpus-per-replica", "8", "--name", "big").stdout)
    assert job["spec"]["nprocPerNode"] == "8"
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["python", "-m", "training.launch", "-m", "training"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert container["resources"]["requests"] == {"cpu": "32", "memory": "64Gi", "ephemeral-storage": "20Gi"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["sizeLimit"] == "8Gi"


def test_a_cpu_pod_is_one_process_without_a_gpu_toleration():
    job = job_of(submit("--dry-run", "--replicas", "2", "--name", "cpu").stdout)
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert job["spec"]["nprocPerNode"] == "1" and "command" not in pod["containers"][0] and "tolerations" not in pod


def test_api_trainjob_is_a_trainer_v2_trainjob_of_replicas_nodes_with_the_same_pod():
    result = submit("--dry-run", "--api", "trainjob", "--replicas", "4", "--name", "tj", "--gpus-per-replica", "8",
                    "--arch", "resnet50", "--image", "registry.example:5000/petal:1.2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (job,) = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["image"] == "registry.example:5000/petal:1.2"
    assert {"--arch=resnet50", "--output=s3://runs-bucket/petal/tj"} <= set(trainer["args"])
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    # The pod's other settings are the PyTorchJob's, patched into the runtime's.
    pytorchjob = job_of(submit("--dry-run", "--replicas", "4", "--name", "tj", "--gpus-per-replica", "8",
                               "--arch", "resnet50", "--image", "registry.example:5000/petal:1.2").stdout)  # fmt: skip
    reference = pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    (patch,) = job["spec"]["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert pod["metadata"]["labels"] == reference["metadata"]["labels"]
    assert pod["spec"]["volumes"] == reference["spec"]["volumes"]
    assert pod["spec"]["securityContext"] == reference["spec"]["securityContext"]
    assert pod["spec"]["tolerations"] == reference["spec"]["tolerations"]
    (container,) = reference["spec"]["containers"]
    assert pod["spec"]["containers"] == [
        {"name": "node", "securityContext": container["securityContext"], "volumeMounts": container["volumeMounts"]}
    ]
    assert trainer["env"] == container["env"] and trainer["resourcesPerNode"] == container["resources"]
    assert trainer["args"] == container["args"]


def test_a_queue_makes_either_kind_wait_suspended_for_kueue():
    for api, suspend in (("pytorchjob", lambda j: j["spec"]["runPolicy"]["suspend"]),
                         ("trainjob", lambda j: j["spec"]["suspend"])):  # fmt: skip
        result = submit("--dry-run", "--api", api, "--queue", "team-a", "--name", "queued")
        (job,) = [d for d in yaml.safe_load_all(result.stdout) if d]
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and suspend(job) is True


def pod_templates(job: dict) -> list[dict]:
    if job["kind"] == "PyTorchJob":
        return [spec["template"] for spec in job["spec"]["pytorchReplicaSpecs"].values()]
    (patch,) = job["spec"]["runtimePatches"]
    return [
        rj["template"]["spec"]["template"] for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    ]


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize(("topology", "annotation"), [
    ("kubernetes.io/hostname", "kueue.x-k8s.io/podset-required-topology"),
    ("cloud.google.com/gce-topology-block:preferred", "kueue.x-k8s.io/podset-preferred-topology"),
])  # fmt: skip
def test_a_topology_level_reaches_every_pod_template_as_kueues_request(api, topology, annotation):
    result = submit("--dry-run", "--api", api, "--queue", "team-a", "--topology", topology, "--replicas", "3",
                    "--name", "placed", "--set", "podAnnotations.team=vision")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (job,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] in ("PyTorchJob", "TrainJob")]
    templates = pod_templates(job)
    assert templates and all(t["metadata"]["annotations"] == {"team": "vision", annotation: topology.split(":")[0]}
                             for t in templates)  # fmt: skip


def test_the_chart_names_no_bucket_of_its_own():
    plain = subprocess.run([sys.executable, str(ROOT / "scripts" / "submit.py"), "--dry-run"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1
    assert "training.data is required" in plain.stderr or "outputPrefix is required" in plain.stderr


def test_one_replica_is_a_master_alone():
    specs = job_of(submit("--dry-run", "--replicas", "1", "--name", "solo").stdout)["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master"}


def test_the_submitter_renders_exactly_what_helm_renders(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"training": {"epochs": 3}, "nodeSelector": {"pool": "gpu"}}))
    ours = submit("--dry-run", "--name", "same", "--replicas", "3", "--values", str(values), "--set", "shmSize=4Gi")
    theirs = helm("template", "same", str(CHART), "--namespace", "default", "--skip-tests", *BUCKET_VALUES,
                  "--values", str(values),
                  "--set", "replicas=3", "--set", "shmSize=4Gi")  # fmt: skip
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    assert [d for d in yaml.safe_load_all(ours.stdout) if d] == [d for d in yaml.safe_load_all(theirs.stdout) if d]


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_manifests_have_not_drifted_from_the_chart(api):
    script = (ROOT / "scripts" / "render_manifests.sh").read_text()
    placeholders = re.search(r"^PLACEHOLDERS=\((.*)\)$", script, flags=re.M)[1].split()
    rendered = submit("--dry-run", "--name", "petal", "--replicas", "4", "--api", api, *placeholders)
    committed = (ROOT / "manifests" / f"{api}.yaml").read_text()
    assert list(yaml.safe_load_all(committed)) == list(yaml.safe_load_all(rendered.stdout)), (
        f"manifests/{api}.yaml drifted from charts/petal: run scripts/render_manifests.sh"
    )


def test_the_runtimes_pod_defaults_are_the_charts():
    """A TrainJob that patches nothing (one the Kubeflow SDK makes) runs the pod a default chart TrainJob
    patches in: the same security contexts, volumes, mounts and the chart's env (manifests/trainer-runtime.yaml
    repeats them, as a runtime cannot read values.yaml)."""
    runtime = yaml.safe_load((ROOT / "manifests" / "trainer-runtime.yaml").read_text())
    theirs = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    (job,) = [d for d in yaml.safe_load_all(submit("--dry-run", "--api", "trainjob", "--name", "tj").stdout) if d]
    (patch,) = job["spec"]["runtimePatches"]
    ours = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert theirs["securityContext"] == ours["securityContext"] and theirs["volumes"] == ours["volumes"]
    (container,), (node,) = ours["containers"], theirs["containers"]
    assert node["securityContext"] == container["securityContext"] and node["volumeMounts"] == container["volumeMounts"]
    chart_env = {e["name"]: e.get("value") for e in job["spec"]["trainer"]["env"]}
    assert all(chart_env[e["name"]] == e["value"] for e in node["env"]), (node["env"], chart_env)
    assert node["envFrom"] == [{"secretRef": {"name": VALUES["s3"]["existingSecret"], "optional": True}}]


def test_the_dry_run_imports_neither_torch_nor_the_kubernetes_client():
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "scripts" / "submit.py"), "--dry-run",
                             *BUCKET_VALUES],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert "yaml" in imported and not imported & {"torch", "kubernetes", "kubeflow"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--replicas", "0"], "'0' must be at least 1"),
        (["--replicas", "-1"], "'-1' must be at least 1"),
        (["--replicas", "abc"], "'abc' is not a whole number"),
        (["--image", ""], "--image '' names no image"),
        (["--arch", "resnet9"], "argument --arch: invalid choice: 'resnet9'"),
        (["--set", "training.arch=resnet9"], "at '/training/arch'"),
        (["--name", "Flowers_1"], "--name 'Flowers_1' is not a DNS-1035 label"),
        (["--gpus-per-replica", "-1"], "'-1' must be at least 0"),
        (["--set", "traning.epochs=3"], "additional properties 'traning' not allowed"),
        (["--set", "restartPolicy=Always"], "at '/restartPolicy': value must be one of 'OnFailure', 'ExitCode'"),
        (["--dataset", "/data/flowers"], "--data/--dataset: '/data/flowers' is not an object-storage URL"),
        (["--values", "{bad_values}"], "at '/replicas': minimum: got 0, want 1"),
        (["--api", "mpijob"], "argument --api: invalid choice: 'mpijob' (choose from 'pytorchjob', 'trainjob')"),
        (["--queue", "Team_A"], "at '/queue': 'Team_A' does not match pattern"),
        (["--topology", "kubernetes.io/hostname"], "topology kubernetes.io/hostname needs a queue: only Kueue places"),
        (["--queue", "q", "--topology", "rack:soon"], "--topology 'rack:soon': expected LEVEL, LEVEL:required or"),
        (
            ["--queue", "q", "--topology", "rack", "--set", "topology.preferred=block"],
            "topology.required (rack) and topology.preferred (block): set one",
        ),
        (
            ["--api", "trainjob", "--set", "elasticPolicy.minReplicas=2"],
            "elasticPolicy is not supported with api TrainJob: JobSet does not run elastic jobs",
        ),
        (["--gpus-per-replica", "1", "--gpu-device-class", "GPU_A"], "at '/gpus/deviceClass': 'GPU_A' does not match"),
        (["--gpu-device-class", "gpu.example.com"], "gpus.deviceClass gpu.example.com claims gpusPerReplica devices"),
        (
            ["--api", "trainjob", "--gpus-per-replica", "1", "--gpu-device-class", "gpu.example.com"],
            "gpus.deviceClass gpu.example.com is not supported with api TrainJob: Trainer v2.3's runtime patches",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line_before_any_cluster_is_contacted(tmp_path, args, expected):
    bad_values = tmp_path / "bad.yaml"
    bad_values.write_text("replicas: 0\n")
    env = os.environ | {"KUBECONFIG": str(tmp_path / "no-cluster")}  # a cluster contact would exit 3, not 2
    result = submit(*[a.format(bad_values=bad_values) for a in args], env=env)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and result.stderr.strip().count("\n") == 0 and not result.stdout


def test_no_kubeconfig_exits_3_and_says_so(tmp_path):
    env = os.environ | {"KUBECONFIG": str(tmp_path / "absent"), "HOME": str(tmp_path)}
    result = submit("--replicas", "2", env=env)
    assert result.returncode == 3 and "no usable kubeconfig" in result.stderr


@pytest.mark.parametrize("values", [None, *sorted((CHART / "ci").glob("*.yaml"))], ids=lambda v: v and v.name)
def test_the_chart_lints_strictly(values):
    result = helm("lint", "--strict", str(CHART), *BUCKET_VALUES, *(["--values", str(values)] if values else []))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_development_secret_is_rendered_only_when_asked_for():
    plain = submit("--dry-run", "--name", "dev")
    assert "kind: Secret" not in plain.stdout
    made = submit("--dry-run", "--name", "dev", "--set", "s3.createSecret=true", "--set", "s3.accessKey=dev",
                  "--set", "s3.secretKey=devsecret")  # fmt: skip
    secret = next(d for d in yaml.safe_load_all(made.stdout) if d["kind"] == "Secret")
    container = job_of(made.stdout)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert refs == {secret["metadata"]["name"]}


def test_the_helm_unittest_suites_pass():
    result = helm("unittest", str(CHART))
    assert result.returncode == 0 and "Tests:" in result.stdout, result.stdout + result.stderr


def kubeconform(path) -> subprocess.CompletedProcess:
    location = os.environ["PETAL_CRD_SCHEMAS"] + "/{{ .ResourceKind }}-{{ .Group }}-{{ .ResourceAPIVersion }}.json"
    return subprocess.run(["kubeconform", "-strict", "-summary", "-schema-location", location, str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--values", str(CHART / "ci" / "cpu-values.yaml")],
        ["--values", str(CHART / "ci" / "gpu-values.yaml")],
        ["--set", "elasticPolicy.minReplicas=2", "--set", "elasticPolicy.maxReplicas=4",
         "--set", "schedulingPolicy.minAvailable=4", "--set", "runPolicy.activeDeadlineSeconds=3600"],
    ],
    ids=["defaults", "cpu-values", "gpu-values", "elastic-and-gang"],
)  # fmt: skip
def test_the_rendered_job_is_valid_against_the_training_operators_own_crd(args, tmp_path):
    rendered = submit("--dry-run", "--name", "checked", "--replicas", "4", *args)
    assert rendered.returncode == 0, rendered.stderr
    (tmp_path / "job.yaml").write_text(rendered.stdout)
    result = kubeconform(tmp_path / "job.yaml")
    assert result.returncode == 0 and "Valid: 1, Invalid: 0" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--values", str(CHART / "ci" / "gpu-values.yaml")],
        ["--queue", "team-a", "--set", "runPolicy.activeDeadlineSeconds=3600", "--set", "s3.caBundle.configMap=ca"],
    ],
    ids=["defaults", "gpu-values", "queue-deadline-ca"],
)
def test_the_rendered_trainjob_is_valid_against_the_trainers_own_crd(args, tmp_path):
    rendered = submit("--dry-run", "--api", "trainjob", "--name", "checked", "--replicas", "4", *args)
    assert rendered.returncode == 0, rendered.stderr
    assert "numNodes: 4" in rendered.stdout
    (tmp_path / "job.yaml").write_text(rendered.stdout)
    result = kubeconform(tmp_path / "job.yaml")
    assert result.returncode == 0 and "Valid: 1, Invalid: 0" in result.stdout, result.stdout + result.stderr


def test_petals_cluster_training_runtime_is_valid_against_the_trainers_own_crd():
    result = kubeconform(ROOT / "manifests" / "trainer-runtime.yaml")
    assert result.returncode == 0 and "Valid: 1, Invalid: 0" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize(("api", "field"), [("pytorchjob", "  nprocPerNode:"), ("trainjob", "    numProcPerNode:")])
def test_the_crd_check_catches_a_field_the_operator_does_not_know(tmp_path, api, field):
    rendered = submit("--dry-run", "--name", "checked", "--api", api).stdout
    assert field in rendered
    (tmp_path / "job.yaml").write_text(rendered.replace(field, field.replace("Per", "sPer")))
    result = kubeconform(tmp_path / "job.yaml")
    assert result.returncode != 0 and field.strip(" :").replace("Per", "sPer") in result.stdout
