#!/usr/bin/env bash
# The whole test suite, from nothing: installs the test bed into the cache, lints, runs pytest.
# Tests start their own MinIO (through scripts/testbed.sh); extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
scripts/testbed.sh install all
eval "$(scripts/testbed.sh env)"
ruff check .
ruff format --check .
hadolint Dockerfile
actionlint
exec python -m pytest "$@"
