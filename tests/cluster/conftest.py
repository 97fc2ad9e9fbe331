"""The cluster test bed: the test bed's real single-node cluster (`scripts/testbed.sh cluster up`),
used as it is when it already runs (the demo leaves it up) and otherwise started for the session and
stopped after it. Its pods reach the test bed's MinIO at the chart's default endpoint. Waits are on
conditions; a timeout shows what was still missing.

    scripts/testbed.sh install cluster && python -m pytest tests/cluster
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import timeline as measured
import yaml
from support import ROOT, FaultyProxy, TestbedService, testbed
from timeline import Timeline

NODE = "petal-node"
CHART_VALUES = yaml.safe_load((ROOT / "charts" / "petal" / "values.yaml").read_text())
# The namespace `cluster up` publishes MinIO and its Secret in (the kubeconfig's default): the one in
# the chart's default endpoint.
PETAL_NAMESPACE = re.match(r"https?://[^.]+\.([^.]+)\.svc", CHART_VALUES["s3"]["endpoint"])[1]
S3_SECRET = CHART_VALUES["s3"]["existingSecret"]


class Cluster(TestbedService):
    def __init__(self):
        super().__init__("cluster", up_timeout=600)
        self.env = os.environ | self.env
        self.cluster_dir = self.state_dir / "cluster"

    def testbed(self, *args: str, timeout: float = 900) -> str:
        return testbed(*args, timeout=timeout).stdout

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120):
        result = subprocess.run(["kubectl", *args], env=self.env, input=input, capture_output=True, text=True,
                                timeout=timeout)  # fmt: skip
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)} failed:\n{result.stderr}"
        return result

    def petal(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """The `petal` command against this cluster, as a user's shell runs it."""
        result = subprocess.run(["petal", *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 or not check, f"petal {' '.join(args)}: {result.returncode}\n{result.stderr}"
        return result

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def workload_of(self, api: str, name: str) -> dict:
        """The Kueue Workload of a queued job (a PyTorchJob or TrainJob in petal's namespace)."""
        job = self.get("-n", PETAL_NAMESPACE, api, name)
        (workload,) = self.get("-n", PETAL_NAMESPACE, "workloads", "-l",
                               f"kueue.x-k8s.io/job-uid={job['metadata']['uid']}")["items"]  # fmt: skip
        return workload

    @contextmanager
    def queue(self, prefix: str, flavor: str, quota: dict[str, str]):
        """A Kueue ClusterQueue of `quota` on `flavor`, with its LocalQueue in petal's namespace, for the
        block's length; its name (`prefix`-…) is yielded."""
        name = f"{prefix}-{uuid.uuid4().hex[:5]}"
        self.apply(
            {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": name},
             "spec": {"namespaceSelector": {}, "resourceGroups": [{
                 "coveredResources": list(quota), "flavors": [{"name": flavor, "resources": [
                     {"name": resource, "nominalQuota": amount} for resource, amount in quota.items()]}]}]}},
            {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
             "metadata": {"name": name, "namespace": PETAL_NAMESPACE}, "spec": {"clusterQueue": name}},
            namespace=PETAL_NAMESPACE,
        )  # fmt: skip
        try:
            yield name
        finally:
            self.kubectl("-n", PETAL_NAMESPACE, "delete", "localqueue", name, check=False)
            self.kubectl("delete", "clusterqueue", name, check=False)

    def apply(self, *objects: dict, namespace: str) -> None:
        self.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump_all(objects))

    def diagnostics(self, namespace: str) -> str:
        """What a person would look at when something does not come up: node, pods, events, operator log."""
        node = self.kubectl("get", "node", NODE, "-o", "jsonpath={range .status.conditions[*]}{.type}={.status} {end}",
                            check=False).stdout  # fmt: skip
        pods = self.kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False).stdout
        events = self.kubectl("-n", namespace, "get", "events", "--sort-by=.lastTimestamp", check=False).stdout
        operator = self.cluster_dir / "training-operator.log"
        tail = "\n".join(operator.read_text().splitlines()[-15:]) if operator.exists() else "(no operator log)"
        return f"node {NODE}: {node}\npods:\n{pods}\nevents:\n{events[-3000:]}\ntraining-operator log tail:\n{tail}"

    def wait(self, resource: str, condition: str, namespace: str, timeout: float = 300) -> None:
        """`kubectl wait --for=<condition>`; on timeout, fails with the namespace's diagnostics."""
        result = self.kubectl("-n", namespace, "wait", resource, f"--for={condition}", f"--timeout={int(timeout)}s",
                              check=False, timeout=timeout + 30)  # fmt: skip
        if result.returncode != 0:
            pytest.fail(f"{resource} never reached {condition}: {result.stderr.strip()}\n{self.diagnostics(namespace)}")

    def wait_until(self, what: str, probe, namespace: str, timeout: float = 300):
        """Polls probe() until it returns something truthy, which is returned."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = probe()
            if found:
                return found
            time.sleep(0.5)
        pytest.fail(f"still waiting for {what} after {timeout:.0f}s\n{self.diagnostics(namespace)}")

    def logs(self, pod: str, namespace: str, *args: str) -> str:
        return self.kubectl("-n", namespace, "logs", pod, *args, check=False).stdout

    def wait_for_log(self, pod: str, pattern: str, namespace: str, timeout: float = 300) -> re.Match:
        return self.wait_until(f"/{pattern}/ in the log of pod {pod}",
                               lambda: re.search(pattern, self.logs(pod, namespace)), namespace, timeout)  # fmt: skip


@pytest.fixture(scope="session")
def cluster(minio) -> Cluster:
    if os.geteuid() != 0:
        pytest.skip("the test bed cluster runs containerd, the kubelet and iptables as root; tests run as a user")
    server = Cluster()
    yield server
    server.release()


def children_cpu() -> float:
    """CPU seconds of the test's finished child processes (kubectl, helm, petal, host-side torchrun)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="session")
def timeline(cluster) -> Timeline:
    watching = Timeline(cluster.env["KUBECONFIG"])
    yield watching
    watching.close()


@pytest.fixture(autouse=True)
def phases(timeline, request):
    """Every cluster test's wall time split into phases (tests/timeline.py), for the table at the end."""
    start, cpu = time.time(), children_cpu()
    yield
    end = time.time()
    phases = timeline.breakdown(start, end) | {"test CPU": children_cpu() - cpu}
    measured.TIMINGS.append((request.node.name, end - start, phases))
    measured.STARTUPS.extend(timeline.startups(start, end))


@pytest.fixture()
def namespace(cluster, request) -> str:
    """A namespace of its own for each test, removed afterwards."""
    name = f"t-{re.sub(r'[^a-z0-9]+', '-', request.node.name.lower())[:40].strip('-')}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def probe_image(cluster, tmp_path_factory) -> tuple[str, str]:
    """A small image built here on the test bed's base, with a token that only this build has."""
    token = uuid.uuid4().hex
    context = tmp_path_factory.mktemp("probe-image")
    (context / "token").write_text(token)
    base = re.search(r"^BASE_IMAGE=(.*)$", (ROOT / "scripts" / "versions.env").read_text(), flags=re.M)[1]
    (context / "Dockerfile").write_text(f"FROM {base}\nCOPY token /probe-token\nUSER 1000:1000\n")
    image = f"petal-probe:{token[:12]}"
    build = subprocess.run(["docker", "build", "-q", "-t", image, str(context)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    cluster.testbed("load-image", image)
    yield image, token
    subprocess.run(["docker", "rmi", image], capture_output=True)


@pytest.fixture(scope="session")
def petal_image(cluster) -> str:
    """The project's Dockerfile built on the test bed's base (torch inside) and loaded into the cluster."""
    cluster.testbed("build-image", "petal:dev", timeout=1800)
    return "petal:dev"


@pytest.fixture()
def apiserver_without_crds(cluster, tmp_path) -> dict:
    """A second, real kube-apiserver of the same cluster (same flags, same etcd) whose objects live under
    another etcd prefix: a cluster where the training-operator was never installed. Returns the env
    that points kubectl and submit.py at it."""
    pid = next(line.split()[0] for line in (cluster.cluster_dir / "pids").read_text().splitlines()
               if line.split()[1] == "kube-apiserver")  # fmt: skip
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefix = f"/crdless-{uuid.uuid4().hex[:8]}"  # a cluster of its own, from nothing, every time
    argv = [a for a in argv if not a.startswith("--secure-port=")] + [
        f"--secure-port={port}",
        f"--etcd-prefix={prefix}",
    ]
    log = (tmp_path / "apiserver.log").open("w")
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text((cluster.cluster_dir / "kubeconfig").read_text().replace(":6443", f":{port}"))
    env = cluster.env | {"KUBECONFIG": str(kubeconfig)}
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(["kubectl", "get", "--raw", "/readyz"], env=env, capture_output=True).returncode != 0:
            up = server.poll() is None and time.monotonic() < deadline
            assert up, f"the second kube-apiserver did not come up:\n{(tmp_path / 'apiserver.log').read_text()[-3000:]}"
            time.sleep(0.5)
        subprocess.run(["kubectl", "create", "namespace", PETAL_NAMESPACE], env=env, check=True, capture_output=True)
        yield env
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


@pytest.fixture()
def storage_outage(cluster, minio):
    """The test bed's MinIO behind a proxy of this test's own, published to pods as a Service (as the
    test bed publishes MinIO): (the proxy, its endpoint for pods). The proxy's down() is MinIO going
    away as the pods see it, while the MinIO other tests share stays up."""
    proxy = FaultyProxy(minio.port, host="0.0.0.0")
    name = f"storage-{uuid.uuid4().hex[:6]}"
    node_ip = cluster.get("node", NODE)["status"]["addresses"][0]["address"]
    cluster.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                   "spec": {"ports": [{"port": proxy.port, "targetPort": proxy.port}]}},
                  {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": f"{name}-host", "labels": {"kubernetes.io/service-name": name}},
                   "addressType": "IPv4", "ports": [{"port": proxy.port}], "endpoints": [{"addresses": [node_ip]}]},
                  namespace=PETAL_NAMESPACE)  # fmt: skip
    yield proxy, f"http://{name}.{PETAL_NAMESPACE}.svc.cluster.local:{proxy.port}"
    proxy.close()
    cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "service", name, check=False)
    cluster.kubectl("-n", PETAL_NAMESPACE, "delete", "endpointslice", f"{name}-host", check=False)
