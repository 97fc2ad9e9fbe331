#!/usr/bin/env bash
# petal's local test bed: a Python environment, a real MinIO server and a real one-node Kubernetes
# cluster with the Kubeflow training-operator, built into a cache outside the repo and keyed by
# version (scripts/versions.env), so a warm machine reuses them.
#
#   scripts/testbed.sh install [python|minio|helm|lint-tools|all]   build what is missing (idempotent)
#   scripts/testbed.sh install cluster              Debian packages, Kubernetes, CoreDNS, training-operator, base images (root)
#   scripts/testbed.sh cluster up|down|status       a one-node cluster from those programs (scripts/cluster.sh)
#   scripts/testbed.sh build-image [IMAGE]          the Dockerfile on the local base (default petal:dev), loaded if a cluster is up
#   scripts/testbed.sh load-image IMAGE             a local Docker image into the cluster's containerd
#   scripts/testbed.sh minio up|down|status         a MinIO on a free port, data in the state dir; a running
#                                                   cluster's pods reach it as http://minio.petal.svc.cluster.local:9000
#   scripts/testbed.sh status                       what runs, on which ports, where the logs are
#   eval "$(scripts/testbed.sh env)"                endpoint, credentials, KUBECONFIG and PATH for this shell
#
# PETAL_CACHE (default ~/.cache/petal) holds builds; PETAL_STATE (default $PETAL_CACHE/state) holds
# running services' data, PIDs, logs and generated credentials. PETAL_MINIO_PORT pins the port.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$ROOT/scripts/versions.env"
CACHE=${PETAL_CACHE:-$HOME/.cache/petal}
STATE=${PETAL_STATE:-$CACHE/state}
PYTHON=${PYTHON:-python3}
EXTRAS="train,dataset,submit,augment,dev"

say() { printf 'testbed: %s\n' "$*" >&2; }
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
schema_dir() { echo "$CACHE/schemas-training-operator-$TRAINING_OPERATOR_VERSION"; }

install_python() {
  local venv; venv=$(venv_dir)
  if [ -f "$venv/.complete" ]; then
    say "python env $venv is already installed"
  else
    say "installing python env into $venv (torch is large: minutes on a cold cache)"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet -e "$ROOT[$EXTRAS]"
    touch "$venv/.complete"
  fi
  # The editable install points at one checkout; re-point it when this is another (a CI clone).
  if [ "$("$venv/bin/python" -c 'import training, os; print(os.path.dirname(os.path.dirname(training.__file__)))')" != "$ROOT" ]; then
    "$venv/bin/pip" install --quiet --no-deps -e "$ROOT"
  fi
}

install_minio() {
  if [ -x "$(minio_bin)" ]; then say "minio $MINIO_VERSION is already built"; return; fi
  say "building minio $MINIO_VERSION with go install (a few minutes on a cold cache)"
  GOBIN="$(dirname "$(minio_bin)")" go install "$MINIO_MODULE@$MINIO_VERSION"
}

kube_dir() { echo "$CACHE/kubernetes-$KUBERNETES_VERSION"; }
KUBE_COMMANDS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"

install_kube() {
  local dir; dir=$(kube_dir)
  if [ -f "$dir/.complete" ]; then say "kubernetes $KUBERNETES_VERSION is already built"; return; fi
  say "building kubernetes $KUBERNETES_VERSION ($KUBE_COMMANDS) with go build: tens of minutes on a cold cache"
  local src="$dir/src" staging_version="v0${KUBERNETES_VERSION#v1}"
  mkdir -p "$src" "$dir/bin"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 through local replaces, which a module
  # download does not carry; this wrapper module replaces each with its published release instead.
  (
    cd "$src"
    go mod download k8s.io/kubernetes@"$KUBERNETES_VERSION"
    local kube_mod; kube_mod=$(go mod download -json k8s.io/kubernetes@"$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    {
      echo "module petal.local/kubernetes-build"
      echo "go 1.24.0"
      echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
      echo "replace ("
      sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1 => \1 '"$staging_version"'#p' "$kube_mod"
      echo ")"
    } > go.mod
    local packages=""
    for command in $KUBE_COMMANDS; do packages="$packages k8s.io/kubernetes/cmd/$command"; done
    # shellcheck disable=SC2086
    go get $(for p in $packages; do echo "$p@$KUBERNETES_VERSION"; done)
    # shellcheck disable=SC2086
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION" -o "$dir/bin/" $packages
  )
  touch "$dir/.complete"
}

install_helm() {
  if [ -x "$(helm_bin)" ]; then say "helm $HELM_VERSION is already built"; return; fi
  say "building helm $HELM_VERSION with go install"
  GOBIN="$(dirname "$(helm_bin)")" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

# Lint tools: the helm-unittest plugin, kubeconform with the PyTorchJob JSON schema made from the
# training-operator's own CRD, and actionlint for the GitHub workflow.
install_lint_tools() {
  local plugin; plugin="$(helm_plugins)/unittest"
  if [ -x "$plugin/untt" ]; then
    say "helm-unittest $HELM_UNITTEST_VERSION is already built"
  else
    say "building helm-unittest $HELM_UNITTEST_VERSION"
    local src; src=$(go mod download -json "github.com/helm-unittest/helm-unittest@$HELM_UNITTEST_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    mkdir -p "$plugin"
    # Its go.mod has replace directives, so it is built inside its module rather than go-installed.
    (cd "$src" && go build -o "$plugin/untt" ./cmd/helm-unittest)
    printf 'name: unittest\nversion: "%s"\nusage: unittest for helm charts\ndescription: helm-unittest, built from source\ncommand: "$HELM_PLUGIN_DIR/untt"\n' \
      "${HELM_UNITTEST_VERSION#v}" > "$plugin/plugin.yaml"
  fi
  if [ -x "$(kubeconform_bin)" ]; then
    say "kubeconform $KUBECONFORM_VERSION is already built"
  else
    say "building kubeconform $KUBECONFORM_VERSION"
    GOBIN="$(dirname "$(kubeconform_bin)")" go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
  fi
  if [ -f "$(schema_dir)/pytorchjob-kubeflow.org-v1.json" ]; then
    say "the PyTorchJob schema of training-operator $TRAINING_OPERATOR_VERSION is already made"
  else
    local operator; operator=$(go mod download -json "github.com/kubeflow/training-operator@$TRAINING_OPERATOR_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    "$(venv_dir)/bin/python" "$ROOT/scripts/crd_to_jsonschema.py" "$operator/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "$(schema_dir)"
  fi
  if [ -x "$(actionlint_bin)" ]; then
    say "actionlint $ACTIONLINT_VERSION is already built"
  else
    say "building actionlint $ACTIONLINT_VERSION"
    GOBIN="$(dirname "$(actionlint_bin)")" go install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
  fi
}

# shellcheck source=cluster.sh
source "$ROOT/scripts/cluster.sh"

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

minio_up() {
  local dir="$STATE/minio"
  mkdir -p "$dir/data"
  [ -x "$(minio_bin)" ] || die "minio is not built: run scripts/testbed.sh install minio"
  if pid_alive "$dir/pid"; then say "minio already running (pid $(cat "$dir/pid"), port $(cat "$dir/port"))"; return; fi
  if [ ! -f "$dir/credentials" ]; then
    (umask 077; printf '%s\n%s\n' "petal-$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
      "$(head -c24 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$dir/credentials")
  fi
  local port=${PETAL_MINIO_PORT:-$(cat "$dir/port" 2>/dev/null || free_port)}
  echo "$port" > "$dir/port"
  # Every interface, not just loopback: the cluster's pods come in through the node's address.
  MINIO_ROOT_USER=$(sed -n 1p "$dir/credentials") MINIO_ROOT_PASSWORD=$(sed -n 2p "$dir/credentials") \
    MINIO_BROWSER=off nohup "$(minio_bin)" server --quiet --address ":$port" "$dir/data" \
    > "$dir/log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  local deadline=$((SECONDS + 60))
  until curl -fsS "http://127.0.0.1:$port/minio/health/ready" >/dev/null 2>&1; do
    if ! pid_alive "$dir/pid"; then tail -n 20 "$dir/log" >&2; die "minio exited during start-up (log: $dir/log)"; fi
    if [ $SECONDS -ge $deadline ]; then tail -n 20 "$dir/log" >&2; die "minio not ready after 60s (log: $dir/log)"; fi
    sleep 0.2
  done
  say "minio ready on http://127.0.0.1:$port (pid $(cat "$dir/pid"), data $dir/data)"
  publish_minio
}

minio_down() {
  local dir="$STATE/minio"
  if pid_alive "$dir/pid"; then
    local pid; pid=$(cat "$dir/pid")
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    say "minio stopped (pid $pid)"
  else
    say "minio is not running"
  fi
  rm -f "$dir/pid"
}

print_env() {
  local dir="$STATE/minio" venv; venv=$(venv_dir)
  echo "export PATH=\"$venv/bin:$(dirname "$(minio_bin)"):$(dirname "$(helm_bin)"):$(dirname "$(kubeconform_bin)"):$(dirname "$(actionlint_bin)"):\$PATH\""
  echo "export HELM_PLUGINS=\"$(helm_plugins)\""
  echo "export PETAL_PYTORCHJOB_SCHEMAS=\"$(schema_dir)\""
  if [ -f "$(cluster_dir)/kubeconfig" ]; then
    echo "export KUBECONFIG=\"$(cluster_dir)/kubeconfig\""
    echo "export PATH=\"$(kube_dir)/bin:\$PATH\""
  fi
  if [ -f "$dir/port" ] && [ -f "$dir/credentials" ]; then
    echo "export S3_ENDPOINT_URL=http://127.0.0.1:$(cat "$dir/port")"
    echo "export AWS_ACCESS_KEY_ID=$(sed -n 1p "$dir/credentials")"
    echo "export AWS_SECRET_ACCESS_KEY=$(sed -n 2p "$dir/credentials")"
  fi
}

status() {
  local dir="$STATE/minio"
  if pid_alive "$dir/pid"; then
    echo "minio: running, pid $(cat "$dir/pid"), http://127.0.0.1:$(cat "$dir/port"), log $dir/log"
  else
    echo "minio: stopped"
  fi
  echo "python env: $(venv_dir) $([ -f "$(venv_dir)/.complete" ] && echo installed || echo missing)"
  if docker info >/dev/null 2>&1; then echo "dockerd: running$(pid_alive "$CACHE/dockerd/pid" && echo ", started by the test bed, log $CACHE/dockerd/log")"; else echo "dockerd: stopped"; fi
  cluster_status
}

case "${1:-}" in
  install)
    case "${2:-all}" in
      python) install_python ;;
      minio) install_minio ;;
      kube) install_kube ;;
      helm) install_helm ;;
      lint-tools) install_lint_tools ;;
      cluster) install_cluster ;;
      all) install_python; install_minio; install_helm; install_lint_tools ;;
      *) die "unknown install target '${2}'; choose python, minio, helm, lint-tools, kube, cluster or all" ;;
    esac ;;
  minio)
    case "${2:-}" in
      up) minio_up ;;
      down) minio_down ;;
      status) status ;;
      *) die "usage: scripts/testbed.sh minio up|down|status" ;;
    esac ;;
  cluster)
    case "${2:-}" in
      up) cluster_up ;;
      down) cluster_down ;;
      status) cluster_status ;;
      *) die "usage: scripts/testbed.sh cluster up|down|status" ;;
    esac ;;
  build-image) build_image "${2:-petal:dev}" ;;
  load-image) [ -n "${2:-}" ] || die "usage: scripts/testbed.sh load-image IMAGE"; load_image "$2" ;;
  env) print_env ;;
  status) status ;;
  *) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; [ -z "${1:-}" ] || die "unknown command '$1'"; exit 2 ;;
esac
