#!/usr/bin/env bash
# The whole test suite, from nothing: installs the test bed into the cache (the cluster needs root),
# lints, runs pytest. Tests start their own MinIO and cluster (through scripts/testbed.sh); extra
# arguments go to pytest. PETAL_SKIP_CLUSTER=1 leaves out the cluster and tests/cluster (for CI
# without root, where a kind cluster stands in: see .github/workflows/ci.yml).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ "${PETAL_SKIP_CLUSTER:-0}" = 1 ]; then
  scripts/testbed.sh install all
  set -- --ignore=tests/cluster "$@"
else
  # The cluster's builds are mostly CPU (Go), the Python env and the image mostly downloads: side by side.
  (scripts/testbed.sh install cluster && scripts/testbed.sh build-image petal:dev) &
  cluster_build=$!
  scripts/testbed.sh install all
  wait "$cluster_build"
fi
eval "$(scripts/testbed.sh env)"
ruff check .
ruff format --check .
hadolint Dockerfile
actionlint
exec python -m pytest "$@"
