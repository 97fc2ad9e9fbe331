# shellcheck shell=bash
# A real MinIO server on a free port (every interface: the cluster's pods come in through the node's
# address), data and random root credentials in $STATE/minio. Uses common.sh only.

minio_state() { echo "$STATE/minio"; }
minio_running() { pid_alive "$(minio_state)/pid"; }
minio_pid() { cut -d' ' -f1 "$(minio_state)/pid"; }
minio_port() { cat "$(minio_state)/port"; }
minio_access_key() { sed -n 1p "$(minio_state)/credentials"; }
minio_secret_key() { sed -n 2p "$(minio_state)/credentials"; }

minio_up() {
  local dir; dir=$(minio_state)
  mkdir -p "$dir/data"
  [ -x "$(minio_bin)" ] || die "minio is not built: run scripts/testbed.sh install minio"
  if minio_running; then say "minio already running (pid $(minio_pid), port $(minio_port))"; return; fi
  if [ ! -f "$dir/credentials" ]; then
    (umask 077; printf '%s\n%s\n' "petal-$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
      "$(head -c24 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$dir/credentials")
  fi
  local port=${PETAL_MINIO_PORT:-$(cat "$dir/port" 2>/dev/null || free_port)}
  echo "$port" > "$dir/port"
  MINIO_ROOT_USER=$(minio_access_key) MINIO_ROOT_PASSWORD=$(minio_secret_key) \
    MINIO_BROWSER=off nohup "$(minio_bin)" server --quiet --address ":$port" "$dir/data" \
    > "$dir/log" 2>&1 < /dev/null &
  process_id $! > "$dir/pid"
  wait_ready minio 60 "$dir/pid" "$dir/log" "http://127.0.0.1:$port/minio/health/ready"
  say "minio ready on http://127.0.0.1:$port (pid $(minio_pid), data $dir/data)"
}

minio_down() {
  local dir; dir=$(minio_state)
  if minio_running; then
    local pid; pid=$(minio_pid)
    # shellcheck disable=SC2046  # "PID START"
    stop_pid $(cat "$dir/pid")
    say "minio stopped (pid $pid)"
  else
    say "minio is not running"
  fi
  rm -f "$dir/pid"
}

minio_status() {
  if minio_running; then
    echo "minio: running, pid $(minio_pid), http://127.0.0.1:$(minio_port), log $(minio_state)/log"
  else
    echo "minio: stopped"
    return 1
  fi
}

minio_env() {
  [ -f "$(minio_state)/port" ] && [ -f "$(minio_state)/credentials" ] || return 0
  echo "export S3_ENDPOINT_URL=http://127.0.0.1:$(minio_port)"
  echo "export AWS_ACCESS_KEY_ID=$(minio_access_key)"
  echo "export AWS_SECRET_ACCESS_KEY=$(minio_secret_key)"
}
