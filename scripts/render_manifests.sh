#!/usr/bin/env bash
# Regenerates manifests/pytorchjob.yaml and manifests/trainjob.yaml from charts/petal (4 replicas),
# through scripts/submit.py --dry-run, so the plain manifests are exactly what the submitter and
# `helm install` make. Their bucket is a placeholder to replace with yours (the chart never guesses one).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PLACEHOLDERS=(--dataset s3://your-bucket/petal/datasets/flowers102 --set outputPrefix=s3://your-bucket/petal/runs)
for api in pytorchjob trainjob; do
  {
    echo "# Rendered from charts/petal (--api $api) with 4 replicas by scripts/render_manifests.sh; do not edit by hand."
    echo "# Replace your-bucket with a bucket of yours (dataset and run directory) before applying."
    python "$ROOT/scripts/submit.py" --dry-run --name petal --replicas 4 --api "$api" "${PLACEHOLDERS[@]}"
  } > "$ROOT/manifests/$api.yaml"
done
