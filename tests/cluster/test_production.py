"""What a managed GPU cluster needs, on the test bed: GPU nodes (advertised and tainted the way GPU
node pools are, with no real device), credentials without a Secret (a mounted credentials file), and
a TLS MinIO signed by a private CA (s3.caBundle)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import uuid

import pytest
import yaml
from conftest import NODE, PETAL_NAMESPACE
from support import BUCKET_VALUES, ROOT, s3

CHART = ROOT / "charts" / "petal"
CPU_VALUES = CHART / "ci" / "cpu-values.yaml"
GPU = "nvidia.com/gpu"


def storage_check(cluster, namespace: str, *values: str) -> tuple[str, str]:
    """The chart's `helm test` pod with these values, run in namespace: (its phase, its log)."""
    name = f"check-{uuid.uuid4().hex[:5]}"
    image = ["--set", "image.repository=petal", "--set", "image.tag=dev"]  # what the test bed built (petal_image)
    helm = ["helm", "template", name, str(CHART), "--show-only", "templates/tests/test-storage.yaml"]
    rendered = subprocess.run([*helm, *BUCKET_VALUES, *image, *values], env=cluster.env, capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    pod = yaml.safe_load(rendered.stdout)
    pod["spec"]["containers"][0]["imagePullPolicy"] = "Never"
    cluster.apply(pod, namespace=namespace)

    def finished() -> str | None:
        phase = cluster.get("-n", namespace, "pod", pod["metadata"]["name"])["status"].get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = cluster.wait_until(f"pod {pod['metadata']['name']} to finish", finished, namespace, timeout=300)
    return phase, cluster.logs(pod["metadata"]["name"], namespace)


@pytest.fixture()
def gpu_node(cluster):
    """The node as a GPU node pool's: 4 nvidia.com/gpu advertised (a status patch, as a device plugin
    would), tainted nvidia.com/gpu:NoSchedule. Both taken back afterwards."""
    patch = {"status": {"capacity": {GPU: "4"}, "allocatable": {GPU: "4"}}}
    cluster.kubectl("patch", "node", NODE, "--subresource=status", "--type=merge", "-p", json.dumps(patch))
    cluster.kubectl("taint", "node", NODE, f"{GPU}=present:NoSchedule")
    try:
        yield NODE
    finally:
        cluster.kubectl("taint", "node", NODE, f"{GPU}-", check=False)
        gone = [{"op": "remove", "path": f"/status/{part}/nvidia.com~1gpu"} for part in ("capacity", "allocatable")]
        cluster.kubectl("patch", "node", NODE, "--subresource=status", "--type=json", "-p", json.dumps(gone))


def test_a_two_gpu_job_is_scheduled_through_the_gpu_taint_with_a_process_per_gpu(
    cluster, gpu_node, petal_image, synthetic_dataset, tmp_path
):
    """2 pods of 2 GPUs are a world of 4 processes: the operator's WORLD_SIZE counts pods, torchrun (one
    process per GPU) fixes it."""
    name = f"gpus-{uuid.uuid4().hex[:6]}"
    repository, tag = petal_image.split(":")
    submit = subprocess.run(
        ["python", str(ROOT / "scripts" / "submit.py"), "--name", name, "--replicas", "2", "--gpus-per-replica", "2",
         "--image", petal_image, "--values", str(CPU_VALUES), "--set", "nprocPerNode=null",
         "--dataset", synthetic_dataset, "--epochs", "1", "--set", f"outputPrefix={s3('runs')}",
         "--collect", str(tmp_path / name), "--timeout", "900"],
        env=cluster.env, capture_output=True, text=True, timeout=1000,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr[-4000:]  # Succeeded: scheduled through the taint, on "GPUs"
    job = cluster.get("-n", PETAL_NAMESPACE, "pytorchjob", name)
    assert job["spec"]["nprocPerNode"] == "2"
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"][GPU] == 2
    master_log = cluster.logs(f"{name}-master-0", PETAL_NAMESPACE)
    assert "petal: 4 process(es), gloo on cpu" in master_log, master_log[-2000:]  # no CUDA in the pods: CPU
    assert json.loads((tmp_path / name / "summary.json").read_text())["epochs"] == 1


def test_credentials_from_a_mounted_file_with_no_secret(cluster, petal_image, namespace, synthetic_dataset, minio):
    credentials = f"[default]\naws_access_key_id = {minio.env['AWS_ACCESS_KEY_ID']}\n" \
                  f"aws_secret_access_key = {minio.env['AWS_SECRET_ACCESS_KEY']}\n"  # fmt: skip
    cluster.kubectl("-n", namespace, "create", "secret", "generic", "aws-file", "--from-file=credentials=/dev/stdin",
                    input=credentials)  # fmt: skip
    values = ["--set", "s3.existingSecret=", "--set", f"training.data={synthetic_dataset}",
              "--set", "extraVolumes[0].name=aws", "--set", "extraVolumes[0].secret.secretName=aws-file",
              "--set", "extraVolumeMounts[0].name=aws", "--set", "extraVolumeMounts[0].mountPath=/etc/aws",
              "--set", "extraEnv[0].name=AWS_SHARED_CREDENTIALS_FILE",
              "--set", "extraEnv[0].value=/etc/aws/credentials"]  # fmt: skip
    phase, log = storage_check(cluster, namespace, *values)
    assert phase == "Succeeded" and f"{synthetic_dataset}: 5 classes" in log, log

    phase, log = storage_check(cluster, namespace, *values[:4])  # the same pod without the file: refused
    assert phase == "Failed" and "no storage credentials" in log, log


@pytest.fixture()
def tls_minio(cluster, namespace, tmp_path, synthetic_dir):
    """A second MinIO speaking only TLS, its certificate signed by a CA made here, published in the
    namespace as a Service; a dataset uploaded to it from this host, which trusts the CA too."""
    service = f"minio-tls.{namespace}.svc.cluster.local"
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    certs = tmp_path / "certs"
    certs.mkdir()

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=certs, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=petal test CA",
            "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=minio-tls", "-keyout", "private.key", "-out", "req.csr"
    )
    (certs / "san.ext").write_text(f"subjectAltName=DNS:{service},IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "req.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", "san.ext", "-out", "public.crt")  # fmt: skip
    user, secret = "tls-user", uuid.uuid4().hex
    env = os.environ | {"MINIO_ROOT_USER": user, "MINIO_ROOT_PASSWORD": secret, "MINIO_BROWSER": "off"}
    server = subprocess.Popen(["minio", "server", "--quiet", "--address", f":{port}",
                               "--certs-dir", str(certs), str(tmp_path / "data")], env=cluster.env | env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        node_ip = cluster.get("node", NODE)["status"]["addresses"][0]["address"]
        cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "minio-tls"},
                       "spec": {"ports": [{"port": port, "targetPort": port}]}},
                      {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": "minio-tls-host", "labels": {"kubernetes.io/service-name": "minio-tls"}},
                       "addressType": "IPv4", "ports": [{"port": port}], "endpoints": [{"addresses": [node_ip]}]},
                      namespace=namespace)  # fmt: skip
        host = {k: v for k, v in cluster.env.items() if not k.startswith("AWS_")} | {
            "S3_ENDPOINT_URL": f"https://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": user, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_CA_BUNDLE": str(certs / "ca.crt"), "PETAL_S3_RETRY_SECONDS": "60"}  # fmt: skip
        upload = ["python", str(ROOT / "scripts" / "upload_dataset.py"), str(synthetic_dir), "s3://tls-bucket/data"]
        uploaded = subprocess.run(upload, env=host, capture_output=True, text=True)
        assert uploaded.returncode == 0, uploaded.stderr[-3000:]
        cluster.kubectl("-n", namespace, "create", "configmap", "minio-ca", f"--from-file=ca.crt={certs / 'ca.crt'}")
        keys = f"AWS_ACCESS_KEY_ID={user}\nAWS_SECRET_ACCESS_KEY={secret}\n"
        cluster.kubectl("-n", namespace, "create", "secret", "generic", "minio-tls-keys", "--from-env-file=/dev/stdin",
                        input=keys)  # fmt: skip
        yield f"https://{service}:{port}"
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_a_tls_minio_with_a_private_ca_is_reached_through_the_ca_bundle(cluster, petal_image, namespace, tls_minio):
    values = ["--set", f"s3.endpoint={tls_minio}", "--set", "s3.existingSecret=minio-tls-keys",
              "--set", "training.data=s3://tls-bucket/data"]  # fmt: skip
    phase, log = storage_check(cluster, namespace, *values, "--set", "s3.caBundle.configMap=minio-ca")
    assert phase == "Succeeded" and "s3://tls-bucket/data: 5 classes" in log, log

    phase, log = storage_check(cluster, namespace, *values)  # without the CA, the certificate does not verify
    assert phase == "Failed" and "CERTIFICATE_VERIFY_FAILED" in log, log


DRA_CLASS = "gpu.example.com"  # the test bed's DRA example driver's mock GPUs (scripts/testbed/dra.sh)
DRA_QUOTA = "example.com/gpu"  # what the test bed's Kueue counts them as (scripts/testbed/trainer.sh)


def mock_gpus(cluster) -> list[str]:
    slices = cluster.get("resourceslices")["items"]
    return [device["name"] for piece in slices if piece["spec"]["driver"] == DRA_CLASS
            for device in piece["spec"]["devices"]]  # fmt: skip


def allocated_devices(cluster, job: str) -> dict[str, list[str]] | None:
    """Each of the job's pods: the devices its ResourceClaim was allocated; None until every pod has them."""
    pods = cluster.get("-n", PETAL_NAMESPACE, "pods", "-l", f"training.kubeflow.org/job-name={job}")["items"]
    held = {}
    for pod in pods:
        statuses = pod["status"].get("resourceClaimStatuses", [])
        claims = [status["resourceClaimName"] for status in statuses if "resourceClaimName" in status]
        results = [result for claim in claims
                   for result in cluster.get("-n", PETAL_NAMESPACE, "resourceclaim", claim)
                   .get("status", {}).get("allocation", {}).get("devices", {}).get("results", [])]  # fmt: skip
        held[pod["metadata"]["name"]] = [f"{r['driver']}/{r['device']}" for r in results]
    return held if len(held) == 2 and all(held.values()) else None


@pytest.fixture()
def gpu_queue(cluster):
    """A Kueue ClusterQueue whose quota holds 2 of the mock GPUs (Kueue counts their DeviceClass as
    DRA_QUOTA), on a flavor without topology, with its LocalQueue in petal's namespace."""
    quota = {"cpu": "64", "memory": "256Gi", "ephemeral-storage": "1Ti", DRA_QUOTA: "2"}
    with cluster.queue("gpus", "default-flavor", quota) as name:
        yield name


def test_a_job_of_two_pods_gets_a_gpu_each_through_dynamic_resource_allocation(cluster, petal_image, synthetic_dataset,
                                                                               gpu_queue):  # fmt: skip
    """--gpu-device-class: each pod gets a ResourceClaim of its own from the release's template; queued,
    Kueue admits the job counting its claimed devices against the queue's quota; the scheduler allocates
    each pod a different device of the class (the upstream DRA example driver's mock GPUs, prepared on
    the node by its kubelet plugin), the driver tells each container its device through CDI and its
    rank logs it, and the job trains to the end."""
    assert len(mock_gpus(cluster)) >= 2, "the test bed's DRA example driver publishes no devices"
    name = f"dra-{uuid.uuid4().hex[:6]}"
    argv = ["petal", "submit", "--name", name, "--namespace", PETAL_NAMESPACE, "--replicas", "2", "--image",
            petal_image, "--gpus-per-replica", "1", "--gpu-device-class", DRA_CLASS, "--values", str(CPU_VALUES),
            "--queue", gpu_queue, "--dataset", synthetic_dataset, "--epochs", "1", "--set",
            f"outputPrefix={s3('runs')}", "--timeout", "600"]  # fmt: skip
    submit = subprocess.Popen(argv, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        held = cluster.wait_until("both pods' claims to be allocated", lambda: allocated_devices(cluster, name),
                                  PETAL_NAMESPACE, timeout=300)  # fmt: skip
        out, err = submit.communicate(timeout=600)
        assert submit.returncode == 0, err[-4000:]
        devices = [device for pod_devices in held.values() for device in pod_devices]
        assert len(devices) == 2 and len(set(devices)) == 2, held  # one each, not the same one
        assert all(device.startswith(f"{DRA_CLASS}/gpu-") for device in devices), held
        for pod, (device,) in held.items():  # the driver told each container its device (CDI); the rank said so
            gpu = device.removeprefix(f"{DRA_CLASS}/")
            said = re.findall(r"; device variables: (.*)", cluster.logs(pod, PETAL_NAMESPACE))
            assert said and f"GPU_DEVICE_{gpu.removeprefix('gpu-')}={gpu}" in said[0].split(), (pod, device, said)
        job = cluster.get("-n", PETAL_NAMESPACE, "pytorchjob", name)
        container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
        assert container["resources"]["claims"] == [{"name": "gpus"}]
        assert GPU not in container["resources"].get("limits", {})
        assignments = cluster.workload_of("pytorchjob", name)["status"]["admission"]["podSetAssignments"]
        assert sum(int(a["resourceUsage"].get(DRA_QUOTA, 0)) for a in assignments) == 2, assignments
    finally:
        submit.kill()
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "pytorchjob", name, "--ignore-not-found", check=False)
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "resourceclaimtemplate", f"{name}-gpus", "--ignore-not-found",
                        check=False)  # fmt: skip


def test_more_gpus_than_the_driver_offers_leave_the_job_pending_with_the_schedulers_reason(cluster, petal_image):
    """Each pod asks for one device more than the node has: the scheduler places neither, `petal
    status` says why, and `petal cancel` takes the claim template away with the job."""
    name = f"dra-big-{uuid.uuid4().hex[:6]}"
    too_many = len(mock_gpus(cluster)) + 1
    argv = ["petal", "submit", *BUCKET_VALUES, "--name", name, "--namespace", PETAL_NAMESPACE, "--replicas", "2",
            "--image", petal_image, "--gpus-per-replica", str(too_many), "--gpu-device-class", DRA_CLASS,
            "--values", str(CPU_VALUES), "--set", "nprocPerNode=1", "--timeout", "20"]  # fmt: skip
    try:
        submit = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=180)
        assert submit.returncode == 1 and "did not succeed within --timeout 20s" in submit.stderr, submit.stderr
        assert f"created ResourceClaimTemplate {PETAL_NAMESPACE}/{name}-gpus" in submit.stderr, submit.stderr
        assert "FailedScheduling" in submit.stderr, submit.stderr  # said while it waited

        def unschedulable_on_claims() -> str | None:
            status = subprocess.run(["petal", "status", name, "--namespace", PETAL_NAMESPACE], env=cluster.env,
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
            reasons = re.findall(r"not scheduled: (.*)", status.stdout)
            waiting = len(reasons) == 2 and all("cannot allocate all claims" in reason for reason in reasons)
            return status.stdout if waiting else None

        said = cluster.wait_until("petal status to give the scheduler's reason for both pods", unschedulable_on_claims,
                                  PETAL_NAMESPACE, timeout=120)  # fmt: skip
        assert "Pending" in said, said
        pods = cluster.get("-n", PETAL_NAMESPACE, "pods", "-l", f"training.kubeflow.org/job-name={name}")["items"]
        claims = [status["resourceClaimName"] for pod in pods for status in pod["status"]["resourceClaimStatuses"]]
        assert len(set(claims)) == 2, claims  # a claim of its own for each pod
        for claim in claims:
            got = cluster.get("-n", PETAL_NAMESPACE, "resourceclaim", claim)
            assert got["spec"]["devices"]["requests"][0]["exactly"] == {
                "deviceClassName": DRA_CLASS, "allocationMode": "ExactCount", "count": too_many}  # fmt: skip
            assert "allocation" not in got.get("status", {}), got["status"]
        cancel = subprocess.run(["petal", "cancel", name, "--namespace", PETAL_NAMESPACE], env=cluster.env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert cancel.returncode == 0 and f"resourceclaimtemplate/{name}-gpus" in cancel.stdout + cancel.stderr, cancel
        assert not cluster.get("-n", PETAL_NAMESPACE, "resourceclaimtemplates", "-l",
                               f"app.kubernetes.io/instance={name}")["items"]  # fmt: skip
    finally:
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "pytorchjob", name, "--ignore-not-found", check=False)
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "resourceclaimtemplate", f"{name}-gpus", "--ignore-not-found",
                        check=False)  # fmt: skip


def test_a_queued_job_claiming_a_device_class_kueue_does_not_count_waits_with_kueues_reason(cluster, petal_image):
    """Kueue (its DRA support on, as by default since v0.18) admits a claimed DeviceClass only where its
    configuration maps it to a quota resource: a class of the same driver without a mapping leaves the
    job queued, never started, and `petal submit` and `petal status` give Kueue's reason."""
    name = f"dra-unmapped-{uuid.uuid4().hex[:4]}"
    unmapped = f"{name}.example.com"
    cluster.apply({"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": unmapped},
                   "spec": {"selectors": [{"cel": {"expression": f"device.driver == '{DRA_CLASS}'"}}]}},
                  namespace=PETAL_NAMESPACE)  # fmt: skip
    argv = ["petal", "submit", *BUCKET_VALUES, "--name", name, "--namespace", PETAL_NAMESPACE, "--replicas", "2",
            "--image", petal_image, "--gpus-per-replica", "1", "--gpu-device-class", unmapped, "--queue", "petal",
            "--values", str(CPU_VALUES), "--set", "nprocPerNode=1", "--timeout", "15"]  # fmt: skip
    reason = f"DeviceClass {unmapped} is not mapped in DRA configuration"
    try:
        submit = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=180)
        assert submit.returncode == 1 and "did not succeed within --timeout 15s" in submit.stderr, submit.stderr
        assert "waiting for Kueue admission: " in submit.stderr and reason in submit.stderr, submit.stderr
        status = cluster.petal("status", name, "--namespace", PETAL_NAMESPACE)
        assert "Queued" in status.stdout and reason in status.stdout and "pods: none" in status.stdout, status.stdout
    finally:
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "pytorchjob", name, "--ignore-not-found", check=False)
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "resourceclaimtemplate", f"{name}-gpus", "--ignore-not-found",
                        check=False)  # fmt: skip
        cluster.kubectl("delete", "deviceclass", unmapped, "--ignore-not-found", check=False)
