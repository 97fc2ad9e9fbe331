# shellcheck shell=bash
# A real MLflow tracking server on a free port (every interface: pods come in through the node's
# address): `mlflow server` from a venv of its own (its pins are not petal's), runs and metrics in
# SQLite in $STATE/mlflow, artifacts proxied by the server into a bucket of the test bed's MinIO (the
# trainer needs no storage credentials for them). Uses common.sh and minio.sh.

MLFLOW_BUCKET=petal-mlflow
# How pods reach it once the cluster runs: a Service of this name, in the namespace MinIO's is in.
MLFLOW_SERVICE=mlflow
MLFLOW_SERVICE_PORT=5000

mlflow_venv() { echo "$CACHE/mlflow-$MLFLOW_VERSION-boto3-$BOTO3_VERSION"; }
mlflow_state() { echo "$STATE/mlflow"; }
mlflow_running() { pid_alive "$(mlflow_state)/pid"; }
mlflow_port() { cat "$(mlflow_state)/port"; }

install_mlflow() {
  local venv; venv=$(mlflow_venv)
  if [ -f "$venv/.complete" ]; then say "mlflow $MLFLOW_VERSION is already installed"; return; fi
  say "installing the mlflow $MLFLOW_VERSION server (and boto3 for its S3 artifacts) into $venv"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet "mlflow==$MLFLOW_VERSION" "boto3==$BOTO3_VERSION"
  touch "$venv/.complete"
}

# mlflow_up IN_CLUSTER_HOST: the server, accepting requests addressed to loopback (on any port: a proxy
# in front of it too) and, from pods, to IN_CLUSTER_HOST (its security middleware refuses any other
# Host header).
mlflow_up() {
  local in_cluster_host=$1 dir venv port
  dir=$(mlflow_state)
  venv=$(mlflow_venv)
  [ -f "$venv/.complete" ] || die "mlflow is not installed: run scripts/testbed.sh install mlflow"
  minio_running || die "mlflow keeps its artifacts in the test bed's MinIO: run scripts/testbed.sh minio up first"
  if mlflow_running; then say "mlflow already running (port $(mlflow_port))"; return; fi
  mkdir -p "$dir"
  port=$(cat "$dir/port" 2>/dev/null || free_port)
  echo "$port" > "$dir/port"
  # Credentials through the environment only, never on a command line.
  export MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$(minio_port)" AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
  AWS_ACCESS_KEY_ID=$(minio_access_key)
  AWS_SECRET_ACCESS_KEY=$(minio_secret_key)
  "$venv/bin/python" -c 'import boto3, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
if sys.argv[2] not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
    s3.create_bucket(Bucket=sys.argv[2])' "$MLFLOW_S3_ENDPOINT_URL" "$MLFLOW_BUCKET"
  # No job runner (a second server process, for GenAI jobs petal has none of).
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup "$venv/bin/mlflow" server --host 0.0.0.0 --port "$port" --workers 1 \
    --backend-store-uri "sqlite:///$dir/mlflow.db" --artifacts-destination "s3://$MLFLOW_BUCKET/artifacts" \
    --allowed-hosts "localhost:*,127.0.0.1:*,$in_cluster_host" > "$dir/log" 2>&1 < /dev/null &
  process_id $! > "$dir/pid"
  unset MLFLOW_S3_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
  wait_ready mlflow 120 "$dir/pid" "$dir/log" "http://127.0.0.1:$port/health"
  say "mlflow ready on http://127.0.0.1:$port (runs in $dir/mlflow.db, artifacts in s3://$MLFLOW_BUCKET)"
}

mlflow_down() {
  if mlflow_running; then
    # shellcheck disable=SC2046  # "PID START"
    stop_pid $(cat "$(mlflow_state)/pid")
    say "mlflow stopped"
  else
    say "mlflow is not running"
  fi
  rm -f "$(mlflow_state)/pid"
}

mlflow_status() {
  if mlflow_running; then
    echo "mlflow: running, http://127.0.0.1:$(mlflow_port), log $(mlflow_state)/log"
  else
    echo "mlflow: stopped"
    return 1
  fi
}

# Only while it runs: a shell pointed at a stopped server would have every run say its tracking failed.
mlflow_env() {
  mlflow_running || return 0
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$(mlflow_port)"
}
