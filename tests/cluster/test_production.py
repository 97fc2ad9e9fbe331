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


@pytest.fixture()
def device_class_without_devices(cluster):
    """A DeviceClass of a DRA driver no node runs: a claim on it can never be allocated."""
    name = f"absent-{uuid.uuid4().hex[:4]}.gpu.example.com"
    device_class = {"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": name},
                    "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{name}"'}}]}}  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(device_class))
    try:
        yield name
    finally:
        cluster.kubectl("delete", "deviceclass", name, "--ignore-not-found", check=False)


def test_gpus_no_driver_offers_leave_the_job_pending_with_the_schedulers_reason(
    cluster, petal_image, device_class_without_devices
):
    """--gpu-device-class: each pod gets a ResourceClaim of its own from the release's template (the
    1.34 API server takes both at face value); with no device of the class the scheduler places none,
    `petal status` says why, and `petal cancel` takes the template away with the job."""
    name = f"dra-{uuid.uuid4().hex[:6]}"
    argv = ["petal", "submit", *BUCKET_VALUES, "--name", name, "--namespace", PETAL_NAMESPACE, "--replicas", "2",
            "--image", petal_image, "--gpus-per-replica", "1", "--gpu-device-class", device_class_without_devices,
            "--values", str(CPU_VALUES), "--timeout", "20"]  # fmt: skip
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
            assert got["spec"]["devices"]["requests"][0]["exactly"]["deviceClassName"] == device_class_without_devices
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
