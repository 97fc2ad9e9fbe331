# shellcheck shell=bash
# The test bed's bottom layer (sourced first by scripts/testbed.sh; every file above may use it, it
# uses none of them): where things live, pinned versions, messages, and processes by recorded PID.
#
# PETAL_CACHE (default ~/.cache/petal) holds builds, keyed by version; PETAL_STATE (default
# $PETAL_CACHE/state) holds running services' data, PIDs, logs and generated credentials.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../versions.env
source "$ROOT/scripts/versions.env"
CACHE=${PETAL_CACHE:-$HOME/.cache/petal}
STATE=${PETAL_STATE:-$CACHE/state}
PYTHON=${PYTHON:-python3}
EXTRAS="train,dataset,submit,augment,dev"
# The image build-image makes by default and the test bed's ClusterTrainingRuntime runs.
DEV_IMAGE=petal:dev
# The DRA example driver's DeviceClass (its chart makes it, dra.sh), and the quota resource Kueue counts
# its devices as (trainer.sh's Kueue configuration maps one to the other).
DRA_DEVICE_CLASS=gpu.example.com
DRA_QUOTA_RESOURCE=example.com/gpu

say() { printf 'testbed %(%T)T: %s\n' -1 "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Keyed by the interpreter and the declared dependencies, not by the rest of pyproject.toml.
python_key() {
  "$PYTHON" - "$ROOT/pyproject.toml" "$EXTRAS" <<'PY' | sha256sum | cut -c1-12
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(sys.version, sys.argv[2], project["dependencies"], project["optional-dependencies"])
PY
}
venv_dir() { echo "$CACHE/venv-$(python_key)"; }
minio_bin() { echo "$CACHE/minio-$MINIO_VERSION/bin/minio"; }
helm_bin() { echo "$CACHE/helm-$HELM_VERSION/bin/helm"; }
helm_plugins() { echo "$CACHE/helm-plugins-$HELM_UNITTEST_VERSION"; }
kubeconform_bin() { echo "$CACHE/kubeconform-$KUBECONFORM_VERSION/bin/kubeconform"; }
actionlint_bin() { echo "$CACHE/actionlint-$ACTIONLINT_VERSION/bin/actionlint"; }
helm_docs_bin() { echo "$CACHE/helm-docs-$HELM_DOCS_VERSION/bin/helm-docs"; }
toxiproxy_bin() { echo "$CACHE/toxiproxy-$TOXIPROXY_VERSION/bin/toxiproxy-server"; }
registry_bin() { echo /usr/bin/docker-registry; }  # Debian's docker-registry package
schema_dir() { echo "$CACHE/schemas-training-operator-$TRAINING_OPERATOR_VERSION-trainer-$KUBEFLOW_TRAINER_VERSION"; }
kube_dir() { echo "$CACHE/kubernetes-$KUBERNETES_VERSION"; }
kbin() { echo "$(kube_dir)/bin/$1"; }
# CoreDNS with only the plugins cluster.sh's Corefile uses: the full set compiles in three clouds'
# SDKs, 1.6x the CPU of this one on a cold build.
COREDNS_PLUGINS="bind cache errors health kubernetes"
coredns_bin() { echo "$CACHE/coredns-$COREDNS_VERSION-${COREDNS_PLUGINS// /-}/bin/coredns"; }
operator_bin() { echo "$CACHE/training-operator-$TRAINING_OPERATOR_VERSION/bin/training-operator.v1"; }
trainer_bin() { echo "$CACHE/trainer-$KUBEFLOW_TRAINER_VERSION/bin/trainer-controller-manager"; }
jobset_bin() { echo "$CACHE/jobset-$JOBSET_VERSION/bin/jobset"; }
dra_driver_bin() { echo "$CACHE/dra-example-driver-$DRA_EXAMPLE_DRIVER_VERSION/bin/dra-example-kubeletplugin"; }
kueue_bin() { echo "$CACHE/kueue-$KUEUE_VERSION/bin/kueue"; }
cluster_dir() { echo "$STATE/cluster"; }
containerd_bin() { echo "$CACHE/containerd-$CONTAINERD_VERSION/bin/$1"; }
# The cluster's containerd, CRI's namespace; without the cgroup v1 deprecation notice on every call.
ctr_k8s() { CONTAINERD_SUPPRESS_DEPRECATION_WARNINGS=1 "$(containerd_bin ctr)" -a "$(containerd_socket)" -n k8s.io "$@"; }
containerd_socket() { echo "$(cluster_dir)/containerd/containerd.sock"; }
# containerd's image store outlives clusters (`cluster down` keeps it), so a 6 GB image is imported
# once per digest, not once per cluster.
image_store() { echo "$CACHE/containerd-store"; }
# The Go toolchain with its collector at GOGC=400: a cold build is a fifth faster (helm: 133 s to
# 109 s) for under 1 GB more per compile. Only the toolchain: the services keep Go's default.
go() { GOGC=400 command go "$@"; }
module_dir() { go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'; }

# A chart default (charts/petal/values.yaml), e.g. `chart_default s3.existingSecret`: the one place
# the Secret name and the in-cluster MinIO endpoint are defined.
chart_default() {
  "$(venv_dir)/bin/python" - "$ROOT/charts/petal/values.yaml" "$1" <<'PY'
import sys, yaml
value = yaml.safe_load(open(sys.argv[1]))
for key in sys.argv[2].split("."):
    value = value[key]
print(value)
PY
}

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

# A process is recorded as "PID START": its start time (clock ticks after boot, /proc/PID/stat's 22nd
# field) tells it from a later process that was given the same PID, so nothing else is ever signalled.
# A zombie (state Z) has ended: the test bed's daemons are reparented to an init that may reap them
# seconds later, and waiting on that made every stop take seconds.
start_time() { [ -r "/proc/$1/stat" ] && awk '{ sub(/^.*\) /, ""); if ($1 != "Z") print $20 }' "/proc/$1/stat" 2>/dev/null; }
process_id() { echo "$1 $(start_time "$1")"; }
same_process() { [ -n "$1" ] && [ -n "${2:-}" ] && [ "$(start_time "$1")" = "$2" ]; }
pid_alive() { [ -f "$1" ] && same_process $(cat "$1"); }

# stop_pid PID START [GRACE]: SIGTERM, then waits until it is gone (SIGKILL after GRACE seconds,
# default 30); a PID whose process is no longer the one recorded (it ended, and the PID went to
# another) is left alone.
stop_pid() {
  local pid=$1 started=${2:-} grace=${3:-30} waited=0
  same_process "$pid" "$started" || return 0
  kill "$pid" 2>/dev/null || return 0
  while same_process "$pid" "$started"; do
    if [ $waited -ge $((grace * 10)) ]; then kill -9 "$pid" 2>/dev/null || true; fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

# wait_ready WHAT SECONDS PIDFILE LOG URL: until URL answers; at once, with LOG's tail, if the process
# PIDFILE records has ended (a port taken, a bad flag), not after SECONDS.
wait_ready() {
  local what=$1 seconds=$2 pidfile=$3 log=$4 url=$5 deadline=$((SECONDS + $2))
  until curl -fsS "$url" >/dev/null 2>&1; do
    if ! pid_alive "$pidfile"; then tail -n 20 "$log" >&2; die "$what exited during start-up (log: $log)"; fi
    if [ $SECONDS -ge "$deadline" ]; then tail -n 20 "$log" >&2; die "$what not ready after ${seconds}s (log: $log)"; fi
    sleep 0.2
  done
}

# wait_for WHAT SECONDS LOG COMMAND...: polls COMMAND until it succeeds; on timeout shows LOG's tail.
wait_for() {
  local what=$1 seconds=$2 log=$3 deadline; shift 3
  deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      [ -f "$log" ] && tail -n 25 "$log" >&2
      die "$what not ready after ${seconds}s (log: $log)"
    fi
    sleep 0.5
  done
}
