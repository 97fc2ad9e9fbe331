#!/usr/bin/env bash
# The whole test suite, from nothing: installs the test bed into the cache (the cluster needs root),
# lints, runs pytest. Tests start their own MinIO and cluster (through scripts/testbed.sh); extra
# arguments go to pytest. PETAL_SKIP_CLUSTER=1 leaves out the cluster and tests/cluster (for CI
# without root, where a kind cluster stands in: see .github/workflows/ci.yml).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
scripts/testbed.sh install all
if [ "${PETAL_SKIP_CLUSTER:-0}" = 1 ]; then set -- --ignore=tests/cluster "$@"; else scripts/testbed.sh install cluster; fi
eval "$(scripts/testbed.sh env)"
ruff check .
ruff format --check .
hadolint Dockerfile
actionlint
exec python -m pytest "$@"
