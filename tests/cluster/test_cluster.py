"""The cluster test bed is a real cluster: a Ready node with this machine's resources, pods from local
images, pod networking and DNS, Secrets, memory-backed /dev/shm, the training-operator running
PyTorchJobs, and the test bed's MinIO reachable from pods."""

from __future__ import annotations

import os
import re
import textwrap
import uuid

from conftest import CHART_VALUES, NODE, PETAL_NAMESPACE, S3_SECRET
from support import BUCKET, s3

from training.storage import parse_url


def pod(name: str, image: str, script: str, **spec) -> dict:
    """A pod running a Python script as the image's non-root user."""
    container = {"name": "main", "image": image, "imagePullPolicy": "Never", "command": ["python", "-c", script]}
    container |= spec.pop("container", {})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"restartPolicy": "Never", "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
                     "containers": [container], **spec}}  # fmt: skip


def test_the_node_is_ready_with_this_machines_cpus_and_memory(cluster):
    node = cluster.get("node", NODE)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    capacity = node["status"]["capacity"]
    assert int(capacity["cpu"]) == os.cpu_count()
    mem_total_kib = int(re.search(r"MemTotal:\s+(\d+) kB", open("/proc/meminfo").read())[1])
    assert capacity["memory"] == f"{mem_total_kib}Ki"


def test_a_pod_from_a_locally_built_image_runs_logs_and_execs(cluster, namespace, probe_image):
    image, token = probe_image
    script = "print('token', open('/probe-token').read(), flush=True); import time; time.sleep(3600)"
    cluster.apply(pod("probe", image, script), namespace=namespace)
    cluster.wait("pod/probe", "condition=Ready", namespace)

    cluster.wait_for_log("probe", f"token {token}", namespace)
    exec_ = cluster.kubectl("-n", namespace, "exec", "probe", "--", "sh", "-c", "id -u; cat /probe-token")
    assert exec_.stdout.split() == ["1000", token]


def test_pods_talk_over_the_pod_network_by_headless_service_name(cluster, namespace, probe_image):
    image, token = probe_image
    # What the PyTorchJob operator does for every replica: hostname + subdomain under a headless Service.
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "peers"},
               "spec": {"clusterIP": "None", "selector": {"app": "server"}, "ports": [{"port": 8080}]}}  # fmt: skip
    serve = "import http.server as h; h.ThreadingHTTPServer(('', 8080), h.SimpleHTTPRequestHandler).serve_forever()"
    server = pod("server", image, serve, hostname="server", subdomain="peers",
                 container={"workingDir": "/", "readinessProbe": {"tcpSocket": {"port": 8080}}})  # fmt: skip
    client_script = textwrap.dedent(f"""
        import socket, urllib.request
        name = "server.peers.{namespace}.svc.cluster.local"
        print("resolved", socket.gethostbyname(name))
        print("fetched", urllib.request.urlopen(f"http://{{name}}:8080/probe-token", timeout=10).read().decode())
    """)
    cluster.apply(service, server, namespace=namespace)
    cluster.wait("pod/server", "condition=Ready", namespace)
    cluster.apply(pod("client", image, client_script), namespace=namespace)
    cluster.wait("pod/client", "jsonpath={.status.phase}=Succeeded", namespace)

    server_ip = cluster.get("-n", namespace, "pod", "server")["status"]["podIP"]
    client_ip = cluster.get("-n", namespace, "pod", "client")["status"]["podIP"]
    assert server_ip != client_ip
    assert cluster.logs("client", namespace).split() == ["resolved", server_ip, "fetched", token]


def test_a_secret_reaches_env_and_dev_shm_is_memory_backed(cluster, namespace, probe_image):
    image, _ = probe_image
    secret_value = uuid.uuid4().hex
    cluster.kubectl("-n", namespace, "create", "secret", "generic", "creds", f"--from-literal=KEY={secret_value}")
    script = textwrap.dedent("""
        import os
        mounts = [line.split() for line in open("/proc/mounts")]
        print("shm", *[m[2] for m in mounts if m[1] == "/dev/shm"])
        stat = os.statvfs("/dev/shm")
        print("size", stat.f_blocks * stat.f_frsize)
        with open("/dev/shm/block", "wb") as f:   # what DataLoader workers do: more than docker's 64 MiB
            f.write(os.urandom(100 << 20))
        print("wrote", os.path.getsize("/dev/shm/block"))
        print("secret", os.environ["FROM_SECRET"])
    """)
    from_secret = {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "KEY"}}}
    shm = {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}}
    mount = {"name": "shm", "mountPath": "/dev/shm"}
    spec = pod("shm", image, script, volumes=[shm], container={"volumeMounts": [mount], "env": [from_secret]})
    cluster.apply(spec, namespace=namespace)
    cluster.wait("pod/shm", "jsonpath={.status.phase}=Succeeded", namespace)

    out = dict(line.split(" ", 1) for line in cluster.logs("shm", namespace).splitlines())
    assert out["shm"] == "tmpfs"
    assert int(out["size"]) == 256 << 20
    assert int(out["wrote"]) == 100 << 20
    assert out["secret"] == secret_value


def test_pods_reach_the_test_beds_minio_with_the_published_secret(cluster, petal_image, storage):
    """The chart's defaults (its s3.endpoint and s3.existingSecret) work as they are."""
    marker = uuid.uuid4().hex
    storage.ensure_bucket(parse_url(s3("probe")))
    storage.write_bytes(parse_url(s3(f"probe/{marker}")), marker.encode())
    script = textwrap.dedent(f"""
        from training.storage import Storage, parse_url
        print("read", Storage.from_env().read_bytes(parse_url("s3://{BUCKET}/probe/{marker}")).decode())
    """)
    env = [{"name": "S3_ENDPOINT_URL", "value": CHART_VALUES["s3"]["endpoint"]}]
    name = f"minio-probe-{marker[:6]}"
    spec = pod(name, petal_image, script, container={"env": env, "envFrom": [{"secretRef": {"name": S3_SECRET}}]})
    cluster.apply(spec, namespace=PETAL_NAMESPACE)
    try:
        cluster.wait(f"pod/{name}", "jsonpath={.status.phase}=Succeeded", PETAL_NAMESPACE)
        assert cluster.logs(name, PETAL_NAMESPACE).split() == ["read", marker]
    finally:
        cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "pod", name, "--wait=false", check=False)


def pytorchjob(name: str, image: str, script: str) -> dict:
    """1 Master + 1 Worker running a Python script under the operator's env (MASTER_ADDR, RANK, ...)."""
    replica = {"replicas": 1, "restartPolicy": "OnFailure",
               "template": {"spec": {"containers": [{"name": "pytorch", "image": image, "imagePullPolicy": "Never",
                                                     "command": ["python", "-c", script]}]}}}  # fmt: skip
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name},
            "spec": {"pytorchReplicaSpecs": {"Master": replica, "Worker": replica}}}  # fmt: skip


ALL_REDUCE = textwrap.dedent("""
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    total = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(total)
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: sum {total.item():g}", flush=True)
""")
# Left to the interpreter's exit, gloo's threads abort the process (exit 134): leave the group first.
LEAVE = "\ndist.destroy_process_group()\n"


def test_a_minimal_pytorchjob_all_reduces_over_gloo_and_succeeds(cluster, namespace, petal_image):
    cluster.apply(pytorchjob("allreduce", petal_image, ALL_REDUCE + LEAVE), namespace=namespace)
    cluster.wait("pytorchjob/allreduce", "condition=Succeeded", namespace, timeout=400)

    assert "rank 0 of 2: sum 3" in cluster.logs("allreduce-master-0", namespace)
    assert "rank 1 of 2: sum 3" in cluster.logs("allreduce-worker-0", namespace)


def test_the_operator_recreates_a_deleted_worker_pod(cluster, namespace, petal_image):
    # Both ranks all-reduce once, then hold until released, so the worker can be deleted mid-run. As the
    # container's PID 1 the script would ignore SIGTERM, and each deletion would wait out the grace period.
    release = textwrap.dedent("""
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        while not os.path.exists("/tmp/release"):
            time.sleep(0.2)
    """)
    hold = ALL_REDUCE + release + LEAVE
    cluster.apply(pytorchjob("hold", petal_image, hold), namespace=namespace)
    cluster.wait_for_log("hold-worker-0", r"rank 1 of 2: sum 3", namespace, timeout=400)
    first_uid = cluster.get("-n", namespace, "pod", "hold-worker-0")["metadata"]["uid"]

    cluster.kubectl("-n", namespace, "delete", "pod", "hold-worker-0", "--wait=true")

    def recreated_and_running():
        found = cluster.kubectl("-n", namespace, "get", "pod", "hold-worker-0", "-o",
                                "jsonpath={.metadata.uid} {.status.phase}", check=False).stdout.split()  # fmt: skip
        return len(found) == 2 and found[0] != first_uid and found[1] == "Running"

    cluster.wait_until("a new hold-worker-0 pod, Running", recreated_and_running, namespace)
    cluster.kubectl("-n", namespace, "exec", "hold-master-0", "--", "touch", "/tmp/release")
    cluster.wait("pytorchjob/hold", "condition=Succeeded", namespace)
