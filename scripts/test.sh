#!/usr/bin/env bash
# The whole test suite, from nothing: installs the test bed into the cache (the cluster needs root),
# lints, runs pytest. Tests use the test bed's MinIO and cluster (scripts/testbed.sh): as they are if
# already up (the demo leaves them up), else started for the run and stopped after it. Extra
# arguments go to pytest.
#
#   scripts/test.sh            everything: CI's command and the README's
#   scripts/test.sh --quick    lint and the tests that need no cluster and train for seconds, not
#                              minutes (after each edit; under 2 minutes warm)
#
# PETAL_SKIP_CLUSTER=1 leaves out the cluster and tests/cluster (for CI without root, where a kind
# cluster stands in: see .github/workflows/ci.yml). The tests run on PETAL_TEST_WORKERS pytest-xdist
# workers (default 2): the cluster tests one after the other on one of them, the rest beside them.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
quick=0
if [ "${1:-}" = --quick ]; then quick=1; shift; fi
services=(minio)  # in this order: MLflow keeps its artifacts in MinIO
[ $quick = 1 ] || services+=(mlflow)  # the MLflow tests are slow ones
if [ $quick = 1 ] || [ "${PETAL_SKIP_CLUSTER:-0}" = 1 ]; then
  scripts/testbed.sh install all
  set -- --ignore=tests/cluster "$@"
  [ $quick = 0 ] || set -- -m "not slow" "$@"
else
  services+=(cluster)
  # The cluster's programs are mostly CPU (Go builds); the Python env, the base image and petal's
  # image mostly downloads: side by side, once Debian's packages (Docker among them) are in.
  scripts/testbed.sh install packages
  scripts/testbed.sh install programs &
  programs=$!
  scripts/testbed.sh install all
  scripts/testbed.sh build-image petal:dev
  wait "$programs"
fi
eval "$(scripts/testbed.sh env)"
ruff check .
ruff format --check .
hadolint Dockerfile
actionlint

# The services up before the workers start (they would race to start them), down after only if this
# run started them: the demo's stay as they are.
started=()
stop_started() {
  for service in "${started[@]}"; do scripts/testbed.sh "$service" down; done
}
trap stop_started EXIT
for service in "${services[@]}"; do
  if ! scripts/testbed.sh "$service" status >/dev/null 2>&1; then
    scripts/testbed.sh "$service" up
    started+=("$service")
  fi
done
eval "$(scripts/testbed.sh env)"
python -m pytest -n "${PETAL_TEST_WORKERS:-2}" "$@"
