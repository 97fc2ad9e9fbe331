#!/usr/bin/env bash
# Regenerates manifests/pytorchjob.yaml from charts/petal (4 replicas), through scripts/submit.py --dry-run,
# so the plain manifest is exactly what the submitter and `helm install` make.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
{
  echo "# Rendered from charts/petal with 4 replicas by scripts/render_manifests.sh; do not edit by hand."
  python "$ROOT/scripts/submit.py" --dry-run --name petal --replicas 4
} > "$ROOT/manifests/pytorchjob.yaml"
