#!/usr/bin/env bash
# Regenerates manifests/pytorchjob.yaml from charts/petal (4 replicas), through scripts/submit.py --dry-run,
# so the plain manifest is exactly what the submitter and `helm install` make. Its bucket is a
# placeholder to replace with yours (the chart never guesses one).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
{
  echo "# Rendered from charts/petal with 4 replicas by scripts/render_manifests.sh; do not edit by hand."
  echo "# Replace your-bucket with a bucket of yours (dataset and run directory) before applying."
  python "$ROOT/scripts/submit.py" --dry-run --name petal --replicas 4 \
    --dataset s3://your-bucket/petal/datasets/flowers102 --set outputPrefix=s3://your-bucket/petal/runs
} > "$ROOT/manifests/pytorchjob.yaml"
