#!/usr/bin/env bash
# petal's local test bed: a Python environment, a real MinIO server and a real one-node Kubernetes
# cluster with the Kubeflow training-operator, built into a cache outside the repo and keyed by
# version (scripts/versions.env), so a warm machine reuses them. The README's demo and test
# commands share it: `up` leaves what already runs alone, `down` stops exactly what `up` started.
#
#   scripts/testbed.sh install [python|peers|minio|mlflow|helm|lint-tools|toxiproxy|all]   build what is missing
#                                                   (idempotent); peers: the data benchmark's loading libraries
#   scripts/testbed.sh install cluster              Debian packages (the image registry among them); Kubernetes,
#                                                   CoreDNS, training-operator, Kubeflow Trainer v2, JobSet, Kueue,
#                                                   the DRA example driver;
#                                                   base images (root)
#   scripts/testbed.sh install packages|programs    of those, the Debian packages alone, or the Go-built programs alone
#   scripts/testbed.sh cluster up|down|status       a one-node cluster from those programs
#   scripts/testbed.sh build-image [IMAGE]          the Dockerfile on the local base (default petal:dev), pushed to the
#                                                   registry once that is installed, loaded if a cluster is up
#   scripts/testbed.sh load-image IMAGE             a local Docker image into the cluster (skipped if already there),
#                                                   through the test bed's registry: only changed layers travel
#   scripts/testbed.sh minio up|down|status         a MinIO on a free port, data in the state dir; a running
#                                                   cluster's pods reach it at the chart's s3.endpoint
#   scripts/testbed.sh mlflow up|down|status        an MLflow tracking server on a free port (MinIO up first),
#                                                   runs in the state dir, artifacts in MinIO; pods reach it at
#                                                   http://mlflow.<MinIO's namespace>.svc.cluster.local:5000
#   scripts/testbed.sh status                       what runs, on which ports, where the logs are
#   eval "$(scripts/testbed.sh env)"                endpoint, credentials, KUBECONFIG, PATH (and, while MLflow
#                                                   runs, MLFLOW_TRACKING_URI) for this shell
#
# `status` commands exit 0 when the service runs, 1 when not. PETAL_CACHE (default ~/.cache/petal)
# holds builds; PETAL_STATE (default $PETAL_CACHE/state) holds running services' data, PIDs, logs and
# generated credentials. PETAL_MINIO_PORT pins the port.
#
# Layers, each sourced file using only those before it: testbed/common.sh (paths, versions, PIDs) →
# tools.sh (builds) → minio.sh → mlflow.sh → images.sh (Docker, containerd imports) → cluster.sh → trainer.sh
# (Kubeflow Trainer v2, JobSet, Kueue) → dra.sh (the DRA example driver) → this file, the only one that
# combines them (e.g. publishing MinIO to the cluster when both run).
set -euo pipefail

LIB="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/testbed"
for layer in common tools minio mlflow images cluster trainer dra; do
  # shellcheck source=/dev/null
  source "$LIB/$layer.sh"
done

# Pods reach MinIO at the chart's endpoint once both run: called by `minio up` and `cluster up`.
publish_minio_when_both_run() {
  if minio_running && cluster_running; then publish_minio "$(minio_port)" "$(minio_access_key)" "$(minio_secret_key)"; fi
}

# The MLflow server's name for pods, in MinIO's namespace: what its Host-header check must accept.
mlflow_pod_host() { echo "$MLFLOW_SERVICE.$(chart_endpoint_part namespace).svc.cluster.local:$MLFLOW_SERVICE_PORT"; }
publish_mlflow_when_both_run() {
  if mlflow_running && cluster_running; then
    host_service "$(chart_endpoint_part namespace)" "$MLFLOW_SERVICE" "$MLFLOW_SERVICE_PORT:$(mlflow_port)" TCP
    say "pods reach this MLflow at http://$(mlflow_pod_host)"
  fi
}

print_env() {
  echo "export PATH=\"$(venv_dir)/bin:$(dirname "$(minio_bin)"):$(dirname "$(helm_bin)"):$(dirname "$(kubeconform_bin)"):$(dirname "$(actionlint_bin)"):$(dirname "$(helm_docs_bin)"):$(dirname "$(toxiproxy_bin)"):\$PATH\""
  echo "export HELM_PLUGINS=\"$(helm_plugins)\""
  echo "export PETAL_CRD_SCHEMAS=\"$(schema_dir)\""
  echo "export PETAL_STATE=\"$STATE\""
  if [ -f "$(peers_venv)/.complete" ]; then echo "export PETAL_PEERS_PYTHON=\"$(peers_venv)/bin/python\""; fi
  cluster_env
  minio_env
  mlflow_env
  if mlflow_running; then echo "export PETAL_MLFLOW_POD_URI=http://$(mlflow_pod_host)"; fi
}

status() {
  local code=0
  minio_status || code=1
  mlflow_status || true  # optional: only the MLflow tests need it
  echo "python env: $(venv_dir) $([ -f "$(venv_dir)/.complete" ] && echo installed || echo missing)"
  docker_status
  registry_status
  cluster_status || code=1
  return $code
}

case "${1:-}" in
  install)
    case "${2:-all}" in
      python) install_python ;;
      minio) install_minio ;;
      kube) install_kube ;;
      helm) install_helm ;;
      lint-tools) install_lint_tools ;;
      cluster) install_cluster_packages; install_cluster_programs; docker_up; build_base_images ;;
      packages) install_cluster_packages ;;
      programs) install_cluster_programs ;;
      toxiproxy) install_toxiproxy ;;
      mlflow) install_mlflow ;;
      peers) install_peers ;;
      all) install_python; install_peers; install_minio; install_mlflow; install_helm; install_lint_tools; install_toxiproxy ;;
      *) die "unknown install target '${2}'; choose python, peers, minio, mlflow, helm, lint-tools, toxiproxy, kube, packages, programs, cluster or all" ;;
    esac ;;
  minio)
    case "${2:-}" in
      up) minio_up; publish_minio_when_both_run ;;
      down) minio_down ;;
      status) minio_status ;;
      *) die "usage: scripts/testbed.sh minio up|down|status" ;;
    esac ;;
  mlflow)
    case "${2:-}" in
      up) pod_host=$(mlflow_pod_host) || exit 1; mlflow_up "$pod_host"; publish_mlflow_when_both_run ;;
      down) mlflow_down ;;
      status) mlflow_status ;;
      *) die "usage: scripts/testbed.sh mlflow up|down|status" ;;
    esac ;;
  cluster)
    case "${2:-}" in
      up) if ! cluster_running; then cluster_up; trainer_up; dra_driver_up
          elif trainer_running; then apply_petal_runtime; dra_driver_up; say "cluster already up (kubeconfig $(cluster_dir)/kubeconfig)"
          else die "the running cluster has no Kubeflow Trainer v2, JobSet or Kueue (an older testbed.sh started it, or their start failed): scripts/testbed.sh cluster down, then up"
          fi
          publish_minio_when_both_run; publish_mlflow_when_both_run ;;
      down) cluster_down ;;
      status) cluster_status ;;
      *) die "usage: scripts/testbed.sh cluster up|down|status" ;;
    esac ;;
  build-image) build_image "${2:-$DEV_IMAGE}"; if cluster_running; then load_image "${2:-$DEV_IMAGE}"; fi ;;
  load-image) [ -n "${2:-}" ] || die "usage: scripts/testbed.sh load-image IMAGE"; load_image "$2" ;;
  env) print_env ;;
  status) status ;;
  *) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; [ -z "${1:-}" ] || die "unknown command '$1'"; exit 2 ;;
esac
