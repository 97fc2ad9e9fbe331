#!/usr/bin/env bash
# One small CPU training run through Kubernetes, against whatever cluster the current kubeconfig
# points at and whatever object storage S3_ENDPOINT_URL (+ AWS_* credentials) points at from here:
# synthetic images → upload → scripts/submit.py (a PyTorchJob, or a TrainJob; gloo) → succeeded →
# collected run in runs/<name>/ → held-out images classified with its best.pt at >= 90 %.
#
#   PETAL_IMAGE=petal:dev scripts/smoke.sh
#   PETAL_API=trainjob PETAL_REPLICAS=4 PETAL_IMAGE=petal:dev scripts/smoke.sh
#
# PETAL_API             pytorchjob (default) or trainjob (Kubeflow Trainer v2)
# PETAL_IMAGE           training image the cluster can run (required)
# PETAL_NAMESPACE       namespace holding the petal-s3 Secret (default petal)
# PETAL_POD_S3_ENDPOINT storage endpoint as pods reach it (default: the chart's, minio.petal.svc.cluster.local:9000)
# PETAL_QUEUE           Kueue LocalQueue to submit to (default: none)
# PETAL_TOPOLOGY        Kueue topology level for --topology LEVEL[:preferred] (needs PETAL_QUEUE)
# PETAL_GPUS            GPUs per pod (nvidia.com/gpu), one process each, NCCL (default: none, CPU and gloo);
#                       each pod then asks for 6 GiB of memory per GPU: CUDA's host side outgrows the CPU run's
# PETAL_DEVICE_CLASS    with PETAL_GPUS, claim them through Dynamic Resource Allocation from this DeviceClass
#                       (e.g. gpu.nvidia.com) instead of the nvidia.com/gpu limit (PyTorchJob only)
# PETAL_MLFLOW_URI      MLflow tracking server as pods reach it: the run is logged to experiment "smoke"
# PETAL_REPLICAS        pods (default 2)
# PETAL_RUN_NAME        job and run name (default smoke-<date>-<time>)
# PETAL_RUNS_DIR        where the run's <name>/ directory goes (default: the repo's runs/)
# PETAL_S3_PREFIX       s3://BUCKET[/PREFIX] for the dataset and the run directory (default s3://petal)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
: "${PETAL_IMAGE:?set PETAL_IMAGE to a training image the cluster can run}"
: "${S3_ENDPOINT_URL:?set S3_ENDPOINT_URL and the AWS_* credentials for the object storage}"
namespace=${PETAL_NAMESPACE:-petal}
name=${PETAL_RUN_NAME:-smoke-$(date +%Y%m%d-%H%M%S)}
work="${PETAL_RUNS_DIR:-$ROOT/runs}/$name"
prefix=${PETAL_S3_PREFIX:-s3://petal}
dataset="$prefix/datasets/smoke-shapes"

python scripts/make_synthetic_dataset.py "$work/data" --classes 4 --per-class 50 --eval-per-class 20 >/dev/null
python scripts/upload_dataset.py "$work/data" "$dataset" | tail -n 1
python scripts/submit.py --name "$name" --namespace "$namespace" --replicas "${PETAL_REPLICAS:-2}" \
  --api "${PETAL_API:-pytorchjob}" --image "$PETAL_IMAGE" --values charts/petal/ci/cpu-values.yaml --dataset "$dataset" --epochs 5 \
  --set "outputPrefix=$prefix/runs" \
  ${PETAL_POD_S3_ENDPOINT:+--set "s3.endpoint=$PETAL_POD_S3_ENDPOINT"} \
  ${PETAL_QUEUE:+--queue "$PETAL_QUEUE"} ${PETAL_TOPOLOGY:+--topology "$PETAL_TOPOLOGY"} \
  ${PETAL_GPUS:+--gpus-per-replica "$PETAL_GPUS" --set nprocPerNode=null --set "resources.requests.memory=$((6 * PETAL_GPUS))Gi"} \
  ${PETAL_DEVICE_CLASS:+--gpu-device-class "$PETAL_DEVICE_CLASS"} \
  ${PETAL_MLFLOW_URI:+--set "mlflow.trackingUri=$PETAL_MLFLOW_URI" --set training.mlflowExperiment=smoke} \
  --collect "$work" --timeout 1800 --follow

python scripts/predict.py "$work/best.pt" "$work"/data/test/*/*.jpg --top-k 1 --json > "$work/predictions.jsonl"
python - "$work" <<'PY'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
names = json.loads((work / "data" / "cat_to_name.json").read_text())
rows = [json.loads(line) for line in (work / "predictions.jsonl").read_text().splitlines()]
right = sum(r["top"][0]["class"] == names[pathlib.Path(r["image"]).parent.name] for r in rows)
print(f"smoke: {right}/{len(rows)} held-out images right ({right / len(rows):.1%})")
sys.exit(0 if right / len(rows) >= 0.9 else 1)
PY
echo "smoke: passed; the run is in $work"
