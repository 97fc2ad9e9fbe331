#!/usr/bin/env bash
# The whole petal flow on this machine, from nothing, through a real local Kubernetes cluster: the
# test bed (Python env, MinIO, a one-node cluster with the Kubeflow training-operator — built into
# the cache on first use, tens of minutes cold), the image from the Dockerfile, then scripts/smoke.sh:
# a synthetic image set uploaded to MinIO, `scripts/submit.py --replicas 4` (1 Master + 3 Workers,
# DDP over gloo), tracked in the test bed's MLflow server, Succeeded, results collected into
# runs/<name>/, held-out images classified.
#
#   scripts/demo.sh            # PETAL_REPLICAS (default 4) and PETAL_CACHE change the defaults
#
# Needs root (containerd, kubelet, iptables). The cluster, MinIO and MLflow stay up afterwards:
#   scripts/testbed.sh cluster down; scripts/testbed.sh mlflow down; scripts/testbed.sh minio down
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

scripts/testbed.sh install all
scripts/testbed.sh install cluster
scripts/testbed.sh minio up
scripts/testbed.sh mlflow up
scripts/testbed.sh cluster up
scripts/testbed.sh build-image petal:dev
eval "$(scripts/testbed.sh env)"

name="demo-$(date +%Y%m%d-%H%M%S)"
PETAL_IMAGE=petal:dev PETAL_REPLICAS=${PETAL_REPLICAS:-4} PETAL_RUN_NAME=$name PETAL_MLFLOW_URI=$PETAL_MLFLOW_POD_URI \
  scripts/smoke.sh
work="$ROOT/runs/$name"
echo
echo "Held-out images, classified with the best checkpoint:"
python scripts/predict.py "$work/best.pt" "$work"/data/test/{1,2,3}/*_00000.jpg --top-k 2
echo
echo "Results:   $work/{best.pt,metrics.jsonl,curves.png,per_class.png,summary.json}"
echo "MLflow:    $MLFLOW_TRACKING_URI, experiment smoke, run $name"
echo "Cluster:   eval \"\$(scripts/testbed.sh env)\"; kubectl get pytorchjobs   (scripts/testbed.sh cluster down)"
