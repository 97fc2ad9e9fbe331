# shellcheck shell=bash
# Container images, made here because none can be pulled: dockerd, the cluster's own images (pause
# from the kubernetes module's pause.c, a Debian base with Python in /opt/venv, the operator's init
# image with nslookup), the project's Dockerfile on that base, and loading an image into the
# cluster's containerd only when its digest changed. Uses common.sh only.

# dockerd serves every state dir and outlives clusters (its images are a cache), so it is recorded
# beside the cache rather than in a cluster's state, and `cluster down` leaves it running.
docker_up() {
  docker info >/dev/null 2>&1 && return
  local dir="$CACHE/dockerd"
  mkdir -p "$dir"
  nohup dockerd --storage-driver=overlay2 > "$dir/log" 2>&1 < /dev/null &
  process_id $! > "$dir/pid"
  wait_for "dockerd" 60 "$dir/log" docker info
}

docker_status() {
  if docker info >/dev/null 2>&1; then
    echo "dockerd: running$(pid_alive "$CACHE/dockerd/pid" && echo ", started by the test bed, log $CACHE/dockerd/log")"
  else
    echo "dockerd: stopped"
  fi
}

build_base_images() {
  local work="$CACHE/image-build"
  mkdir -p "$work"
  if docker image inspect "registry.k8s.io/pause:$PAUSE_VERSION" "$BASE_IMAGE" "$INIT_IMAGE" >/dev/null 2>&1; then
    say "images pause:$PAUSE_VERSION, $BASE_IMAGE and $INIT_IMAGE are already built"
    return
  fi
  if ! docker image inspect "registry.k8s.io/pause:$PAUSE_VERSION" >/dev/null 2>&1; then
    mkdir -p "$work/pause"
    gcc -Os -static -DVERSION="$PAUSE_VERSION" -o "$work/pause/pause" "$(module_dir "k8s.io/kubernetes@$KUBERNETES_VERSION")/build/pause/linux/pause.c"
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > "$work/pause/Dockerfile"
    docker build -q -t "registry.k8s.io/pause:$PAUSE_VERSION" "$work/pause" >/dev/null
  fi
  if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "making $BASE_IMAGE with mmdebstrap"
    # shellcheck disable=SC2016  # the hooks' $1 is mmdebstrap's, not ours
    mmdebstrap --quiet --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,passwd \
      --customize-hook='cp /etc/ssl/certs/ca-certificates.crt "$1/usr/local/share/host-ca.crt"' \
      --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
      bookworm "$work/base.tar" http://deb.debian.org/debian
    docker import --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV PIP_CERT=/usr/local/share/host-ca.crt' "$work/base.tar" "$BASE_IMAGE" >/dev/null
    rm -f "$work/base.tar"
  fi
  if ! docker image inspect "$INIT_IMAGE" >/dev/null 2>&1; then
    mkdir -p "$work/init"
    printf 'FROM %s\nRUN apt-get update && apt-get install -y --no-install-recommends bind9-dnsutils && rm -rf /var/lib/apt/lists/*\n' \
      "$BASE_IMAGE" > "$work/init/Dockerfile"
    docker build -q --network host -t "$INIT_IMAGE" "$work/init" >/dev/null
  fi
}

# The project Dockerfile on the local base image: what the cluster's jobs run. The image it replaces
# (6 GB of CUDA wheels) is removed once untagged.
build_image() {
  local image=$1 previous
  docker_up
  build_base_images
  previous=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
  say "building $image from $ROOT/Dockerfile on $BASE_IMAGE"
  docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$image" "$ROOT" >&2
  if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$image")" ]; then
    docker rmi "$previous" >/dev/null 2>&1 || true
  fi
  # Pushed now if the registry is installed, cluster or not: the push compresses every new layer (4 minutes
  # for a fresh 6 GB image), and a cold setup does it here, beside the Go builds, not when the first
  # cluster test waits for the image.
  if [ -x "$(registry_bin)" ]; then push_image "$image" >/dev/null; fi
}

# containerd's name for a Docker reference: petal:dev is docker.io/library/petal:dev.
containerd_name() {
  local image=$1 first=${1%%/*}
  if [ "$first" = "$image" ]; then echo "docker.io/library/$image"
  elif [[ "$first" == *.* || "$first" == *:* || "$first" == localhost ]]; then echo "$image"
  else echo "docker.io/$image"
  fi
}

# The registry the cluster's containerd pulls the test bed's images from, on loopback (Docker treats
# 127.0.0.0/8 as an insecure registry by default). Like dockerd, it serves every state dir and
# outlives clusters: its store is a cache of layers already sent.
registry_dir() { echo "$CACHE/registry"; }
registry_port() { cat "$(registry_dir)/port"; }
registry_up() {
  local dir; dir=$(registry_dir)
  if pid_alive "$dir/pid" && curl -fsS "http://127.0.0.1:$(registry_port)/v2/" >/dev/null 2>&1; then return; fi
  [ -x "$(registry_bin)" ] || die "the registry is not installed: run scripts/testbed.sh install packages"
  mkdir -p "$dir/store"
  local port; port=$(cat "$dir/port" 2>/dev/null || free_port)
  echo "$port" > "$dir/port"
  printf 'version: 0.1\nlog: {level: warn, accesslog: {disabled: true}}\nstorage: {filesystem: {rootdirectory: %s}, delete: {enabled: true}}\nhttp: {addr: "127.0.0.1:%s"}\n' \
    "$dir/store" "$port" > "$dir/config.yml"
  nohup "$(registry_bin)" serve "$dir/config.yml" > "$dir/log" 2>&1 < /dev/null &
  process_id $! > "$dir/pid"
  wait_for "the image registry" 30 "$dir/log" curl -fsS "http://127.0.0.1:$port/v2/"
}

registry_status() {
  if pid_alive "$(registry_dir)/pid"; then
    echo "image registry: running, http://127.0.0.1:$(registry_port), log $(registry_dir)/log"
  else
    echo "image registry: stopped (started by the next load-image)"
  fi
}

# push_image IMAGE: into the test bed's registry (only the layers it lacks travel); prints its ref there.
push_image() {
  local image=$1 ref
  registry_up
  ref="127.0.0.1:$(registry_port)/$(containerd_name "$image" | cut -d/ -f2-)"
  say "pushing $image to $ref"
  docker tag "$image" "$ref"
  docker push -q "$ref" >/dev/null
  docker rmi "$ref" >/dev/null  # the tag only: the image stays
  echo "$ref"
}

# load_image IMAGE: into the running cluster's containerd, unless that exact image (Docker image ID)
# is already there. Through the registry: docker push sends only the layers it has not sent before,
# and containerd pulls only the layers it lacks, so a code change ships one small layer.
load_image() {
  local image=$1 id marker ref
  [ -S "$(containerd_socket)" ] || die "the cluster is not up (scripts/testbed.sh cluster up)"
  id=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null) || die "no local Docker image $image"
  marker="$(image_store)/loaded/$(echo "$image" | tr '/:' '__')"
  if [ "$(cat "$marker" 2>/dev/null)" = "$id" ] \
    && ctr_k8s images ls -q | grep -qxF "$(containerd_name "$image")"; then
    say "$image ($id) is already in the cluster's image store"
    return
  fi
  ref=$(push_image "$image")
  say "loading $image into the cluster's containerd from $ref"
  ctr_k8s images pull --plain-http "$ref" >/dev/null
  ctr_k8s images tag --force "$ref" "$(containerd_name "$image")" >/dev/null
  mkdir -p "$(dirname "$marker")"
  echo "$id" > "$marker"
  prune_replaced_images
}

# The kubelet runs without image GC (cluster.sh), so an image a new load replaced would stay for good:
# CRI keeps it under its ID (sha256:...) after its names have moved on, 3 GB per petal image.
prune_replaced_images() {
  local orphans
  # REF TYPE DIGEST ...: an image known only by its ID whose digest no name points at any more
  orphans=$(ctr_k8s images ls | awk 'NR > 1 {
      if ($1 ~ /^sha256:/) by_id[$1] = $3; else named[$3] = 1 }
    END { for (ref in by_id) if (!(by_id[ref] in named)) print ref }')
  # shellcheck disable=SC2086
  [ -z "$orphans" ] || ctr_k8s images rm --sync $orphans >/dev/null
}
