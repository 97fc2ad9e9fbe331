# Sourced by scripts/testbed.sh: a single-node Kubernetes cluster from upstream programs, started on
# this host (what kind runs, without kind's node image): etcd, kube-apiserver, controller-manager,
# scheduler, kubelet + containerd (CRI) + CNI bridge, kube-proxy, CoreDNS, and the Kubeflow
# training-operator with its validating webhook. Every process is recorded in $STATE/cluster/pids.
#
# What this sandbox needs that a normal host does not (found the hard way, see the issue notes):
# - no CAP_SYS_RESOURCE: containerd's CRI must not give pod sandboxes a negative oom_score_adj
#   (restrict_oom_score_adj), or runc fails with "can't get final child's PID from pipe";
# - dockerd sets iptables' FORWARD policy to DROP, so the pod network is accepted explicitly;
# - the operator's cert rotator expects its Secret mounted at /tmp/k8s-webhook-server/serving-certs,
#   so out of cluster we copy it there;
# - images cannot be pulled: pause, the base image and the init image are built here.

POD_CIDR=10.244.0.0/16
POD_GATEWAY=10.244.0.1
SERVICE_CIDR=10.96.0.0/16
DNS_IP=10.96.0.10
NODE_NAME=petal-node
# The kubeconfig's default namespace, where the MinIO Service and the petal-s3 Secret are published.
PETAL_NAMESPACE=petal
WEBHOOK_CERTS=/tmp/k8s-webhook-server/serving-certs
CLUSTER_APT="docker.io containerd runc containernetworking-plugins etcd-server mmdebstrap iptables iproute2 openssl"

cluster_dir() { echo "$STATE/cluster"; }
kbin() { echo "$(kube_dir)/bin/$1"; }
coredns_bin() { echo "$CACHE/coredns-$COREDNS_VERSION/bin/coredns"; }
operator_bin() { echo "$CACHE/training-operator-$TRAINING_OPERATOR_VERSION/bin/training-operator.v1"; }
node_ip() { ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p'; }
kctl() { "$(kbin kubectl)" --kubeconfig "$(cluster_dir)/kubeconfig" "$@"; }
operator_src() { go mod download -json "github.com/kubeflow/training-operator@$TRAINING_OPERATOR_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'; }

install_cluster() {
  local missing=""
  for package in $CLUSTER_APT; do dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"; done
  if [ -n "$missing" ]; then
    say "installing Debian packages:$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    say "Debian packages for the cluster are already installed"
  fi
  install_kube
  if [ -x "$(coredns_bin)" ]; then say "coredns $COREDNS_VERSION is already built"; else
    say "building coredns $COREDNS_VERSION"
    GOBIN="$(dirname "$(coredns_bin)")" go install "github.com/coredns/coredns@$COREDNS_VERSION"
  fi
  if [ -x "$(operator_bin)" ]; then say "training-operator $TRAINING_OPERATOR_VERSION is already built"; else
    say "building training-operator $TRAINING_OPERATOR_VERSION"
    GOBIN="$(dirname "$(operator_bin)")" go install "github.com/kubeflow/training-operator/cmd/training-operator.v1@$TRAINING_OPERATOR_VERSION"
  fi
  docker_up
  build_images
}

# start NAME COMMAND...: runs a cluster process in the background, logging to $dir/NAME.log.
start() {
  local name=$1 dir; dir=$(cluster_dir); shift
  nohup "$@" > "$dir/$name.log" 2>&1 < /dev/null &
  echo "$! $name" >> "$dir/pids"
}

# wait_for WHAT SECONDS LOG COMMAND...: polls COMMAND until it succeeds; on timeout shows LOG's tail.
wait_for() {
  local what=$1 seconds=$2 log=$3 deadline; shift 3
  deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      [ -f "$log" ] && tail -n 25 "$log" >&2
      die "$what not ready after ${seconds}s (log: $log)"
    fi
    sleep 0.5
  done
}

# dockerd serves every state dir and outlives clusters (its images are a cache), so it is recorded
# beside the cache rather than in a cluster's state, and `cluster down` leaves it running.
docker_up() {
  docker info >/dev/null 2>&1 && return
  local dir="$CACHE/dockerd"
  mkdir -p "$dir"
  nohup dockerd --storage-driver=overlay2 > "$dir/log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  wait_for "dockerd" 60 "$dir/log" docker info
}

# The project Dockerfile on the local base image: what the cluster's PyTorchJobs run. Loaded into the
# cluster when one is up. The image it replaces (6 GB of CUDA wheels) is removed once untagged.
build_image() {
  local image=$1 previous
  docker_up
  build_images
  previous=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
  say "building $image from $ROOT/Dockerfile on $BASE_IMAGE"
  docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$image" "$ROOT" >&2
  if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$image")" ]; then
    docker rmi "$previous" >/dev/null 2>&1 || true
  fi
  if cluster_running; then load_image "$image"; fi
}

# Images the cluster needs and cannot pull: pause (from the kubernetes module's pause.c), a Debian
# base with Python in /opt/venv (the project Dockerfile builds on it), and the operator's init image
# (it runs nslookup until the master resolves).
build_images() {
  local work="$CACHE/image-build"
  mkdir -p "$work"
  if docker image inspect "registry.k8s.io/pause:$PAUSE_VERSION" "$BASE_IMAGE" "$INIT_IMAGE" >/dev/null 2>&1; then
    say "images pause:$PAUSE_VERSION, $BASE_IMAGE and $INIT_IMAGE are already built"
    return
  fi
  if ! docker image inspect "registry.k8s.io/pause:$PAUSE_VERSION" >/dev/null 2>&1; then
    mkdir -p "$work/pause"
    gcc -Os -static -DVERSION="$PAUSE_VERSION" -o "$work/pause/pause" "$(kube_src_dir)/build/pause/linux/pause.c"
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > "$work/pause/Dockerfile"
    docker build -q -t "registry.k8s.io/pause:$PAUSE_VERSION" "$work/pause" >/dev/null
  fi
  if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "making $BASE_IMAGE with mmdebstrap"
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

kube_src_dir() { go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p'; }

load_image() {
  local image=$1
  [ -S "$(cluster_dir)/containerd/containerd.sock" ] || die "the cluster is not up (scripts/testbed.sh cluster up)"
  docker image inspect "$image" >/dev/null 2>&1 || die "no local Docker image $image"
  say "loading $image into the cluster's containerd"
  docker save "$image" | ctr -a "$(cluster_dir)/containerd/containerd.sock" -n k8s.io images import - >/dev/null
}

make_certs() {
  local pki; pki=$(cluster_dir)/pki
  [ -f "$pki/admin.crt" ] && return
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=petal-cluster-ca -keyout ca.key -out ca.crt 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:%s,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n' "$(node_ip)" > san.ext
    openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout apiserver.key -out apiserver.csr 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -extfile san.ext -out apiserver.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=petal-admin" -keyout admin.key -out admin.csr 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -out admin.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

write_configs() {
  local dir; dir=$(cluster_dir)
  mkdir -p "$dir/containerd" "$dir/cni" "$dir/kubelet"
  cat > "$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: petal, cluster: {server: "https://127.0.0.1:6443", certificate-authority: $dir/pki/ca.crt}}]
users: [{name: admin, user: {client-certificate: $dir/pki/admin.crt, client-key: $dir/pki/admin.key}}]
contexts: [{name: petal, context: {cluster: petal, user: admin, namespace: $PETAL_NAMESPACE}}]
current-context: petal
EOF
  cat > "$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$dir/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:$PAUSE_VERSION"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni"
EOF
  cat > "$dir/cni/10-petal.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "petal", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24", "gateway": "$POD_GATEWAY"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback"}]}
EOF
  cat > "$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication: {anonymous: {enabled: false}, webhook: {enabled: false}, x509: {clientCAFile: $dir/pki/ca.crt}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
failSwapOn: false
clusterDNS: [$DNS_IP]
clusterDomain: cluster.local
containerRuntimeEndpoint: unix://$dir/containerd/containerd.sock
tlsCertFile: $dir/pki/apiserver.crt
tlsPrivateKeyFile: $dir/pki/apiserver.key
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
EOF
  cat > "$dir/Corefile" <<EOF
.:53 {
    bind $(node_ip)
    errors
    health 127.0.0.1:18053
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $dir/kubeconfig petal
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
EOF
}

# The pod network (the CNI bridge plugin makes cni0 with the first pod) accepted past dockerd's DROP.
pod_network_up() {
  for flag in -s -d; do
    iptables -C FORWARD "$flag" "$POD_CIDR" -j ACCEPT 2>/dev/null || iptables -I FORWARD 1 "$flag" "$POD_CIDR" -j ACCEPT
  done
}

host_service() {  # host_service NAMESPACE NAME PORT TARGET_PORT PROTOCOLS [CLUSTER_IP]: a Service backed by this host
  local namespace=$1 name=$2 port=$3 target=$4 protocols=$5 ip=${6:-} ports="" endpoint_ports="" protocol
  for protocol in $protocols; do
    ports="$ports{name: p-${protocol,,}, port: $port, targetPort: $target, protocol: $protocol},"
    endpoint_ports="$endpoint_ports{name: p-${protocol,,}, port: $target, protocol: $protocol},"
  done
  kctl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: $name, namespace: $namespace}
spec: {${ip:+clusterIP: $ip, }ports: [${ports%,}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: $name-host, namespace: $namespace, labels: {kubernetes.io/service-name: $name}}
addressType: IPv4
ports: [${endpoint_ports%,}]
endpoints: [{addresses: [$(node_ip)]}]
EOF
}

cluster_running() { [ -f "$(cluster_dir)/kubeconfig" ] && kctl get --raw /readyz >/dev/null 2>&1; }

# Pods reach the test bed's MinIO as http://minio.petal.svc.cluster.local:9000 (the chart's default
# endpoint, and the name manifests/minio-dev.yaml gives it on a real cluster) through a Service backed
# by this host, and get its credentials from the Secret petal-s3 (the chart's default existingSecret).
# Called by `minio up` and `cluster up`, whichever comes second.
publish_minio() {
  local minio="$STATE/minio"
  cluster_running && pid_alive "$minio/pid" || return 0
  kctl create namespace "$PETAL_NAMESPACE" --dry-run=client -o yaml | kctl apply -f - >/dev/null
  host_service "$PETAL_NAMESPACE" minio 9000 "$(cat "$minio/port")" TCP
  kctl -n "$PETAL_NAMESPACE" create secret generic petal-s3 --dry-run=client -o yaml \
    --from-env-file=<(printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$(sed -n 1p "$minio/credentials")" "$(sed -n 2p "$minio/credentials")") \
    | kctl apply -f - >/dev/null
  say "pods reach this MinIO at http://minio.$PETAL_NAMESPACE.svc.cluster.local:9000 (Secret $PETAL_NAMESPACE/petal-s3)"
}

cluster_up() {
  local dir; dir=$(cluster_dir)
  [ -x "$(operator_bin)" ] || die "the cluster is not built: run scripts/testbed.sh install cluster"
  if [ -f "$dir/pids" ]; then
    if cluster_running; then say "cluster already up (kubeconfig $dir/kubeconfig)"; publish_minio; return; fi
    say "cleaning up a previous cluster first"
    cluster_down
  fi
  mkdir -p "$dir"
  docker_up
  build_images
  make_certs
  write_configs
  pod_network_up
  start containerd containerd --config "$dir/containerd/config.toml"
  wait_for "containerd" 30 "$dir/containerd.log" test -S "$dir/containerd/containerd.sock"
  load_image "registry.k8s.io/pause:$PAUSE_VERSION"
  load_image "$INIT_IMAGE"

  start etcd etcd --data-dir "$dir/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380
  start kube-apiserver "$(kbin kube-apiserver)" --etcd-servers=http://127.0.0.1:2379 \
    --service-cluster-ip-range="$SERVICE_CIDR" --advertise-address="$(node_ip)" --secure-port=6443 \
    --client-ca-file="$dir/pki/ca.crt" --tls-cert-file="$dir/pki/apiserver.crt" --tls-private-key-file="$dir/pki/apiserver.key" \
    --service-account-key-file="$dir/pki/sa.pub" --service-account-signing-key-file="$dir/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local --authorization-mode=Node,RBAC \
    --kubelet-client-certificate="$dir/pki/admin.crt" --kubelet-client-key="$dir/pki/admin.key" \
    --kubelet-preferred-address-types=InternalIP --allow-privileged=true
  wait_for "kube-apiserver" 90 "$dir/kube-apiserver.log" kctl get --raw /readyz
  start kube-controller-manager "$(kbin kube-controller-manager)" --kubeconfig "$dir/kubeconfig" \
    --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
    --cluster-signing-cert-file "$dir/pki/ca.crt" --cluster-signing-key-file "$dir/pki/ca.key" \
    --controllers '*,-nodeipam' --leader-elect=false
  start kube-scheduler "$(kbin kube-scheduler)" --kubeconfig "$dir/kubeconfig" --leader-elect=false
  start kube-proxy "$(kbin kube-proxy)" --kubeconfig "$dir/kubeconfig" --cluster-cidr "$POD_CIDR" \
    --hostname-override "$NODE_NAME" --proxy-mode iptables
  start kubelet "$(kbin kubelet)" --config "$dir/kubelet.yaml" --kubeconfig "$dir/kubeconfig" \
    --hostname-override "$NODE_NAME" --root-dir "$dir/kubelet" --node-ip "$(node_ip)"
  wait_for "node $NODE_NAME" 90 "$dir/kubelet.log" kctl wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s

  start coredns "$(coredns_bin)" -conf "$dir/Corefile"
  host_service kube-system kube-dns 53 53 "UDP TCP" "$DNS_IP"
  wait_for "CoreDNS" 30 "$dir/coredns.log" curl -fsS http://127.0.0.1:18053/health

  local operator; operator=$(operator_src)
  kctl apply --server-side -f "$operator/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" >/dev/null
  wait_for "the PyTorchJob CRD" 30 "$dir/kube-apiserver.log" kctl wait --for=condition=Established crd/pytorchjobs.kubeflow.org --timeout=1s
  kctl create namespace kubeflow >/dev/null
  kctl -n kubeflow create secret generic training-operator-webhook-cert >/dev/null
  kctl kustomize "$operator/manifests/overlays/standalone" \
    | "$(venv_dir)/bin/python" -c 'import sys, yaml; yaml.safe_dump_all([d for d in yaml.safe_load_all(sys.stdin) if d and d["kind"] == "ValidatingWebhookConfiguration"], sys.stdout)' \
    | kctl apply -f - >/dev/null
  host_service kubeflow training-operator 443 9443 TCP
  start training-operator env MY_POD_NAMESPACE=kubeflow "$(operator_bin)" --kubeconfig "$dir/kubeconfig" \
    --enable-scheme pytorchjob --leader-elect=false --metrics-bind-address 127.0.0.1:18080 \
    --health-probe-bind-address 127.0.0.1:18081 --pytorch-init-container-image "$INIT_IMAGE"
  # In a pod the Secret is mounted where the rotator looks; here we put its files there ourselves.
  wait_for "the webhook certificate" 60 "$dir/training-operator.log" \
    sh -c "$(kbin kubectl) --kubeconfig $dir/kubeconfig -n kubeflow get secret training-operator-webhook-cert -o jsonpath='{.data.ca\\.crt}' | grep -q ."
  mkdir -p "$WEBHOOK_CERTS"
  for file in ca.crt tls.crt tls.key; do
    kctl -n kubeflow get secret training-operator-webhook-cert -o jsonpath="{.data.${file//./\\.}}" | base64 -d > "$WEBHOOK_CERTS/$file"
  done
  wait_for "the training-operator" 60 "$dir/training-operator.log" grep -q '"controller": "pytorchjob-controller", "worker count"' "$dir/training-operator.log"
  publish_minio
  say "cluster up: node $NODE_NAME Ready, DNS at $DNS_IP, training-operator $TRAINING_OPERATOR_VERSION running"
  say "use it: eval \"\$(scripts/testbed.sh env)\"; kubectl get nodes   (logs: $dir/*.log)"
}

cluster_down() {
  local dir; dir=$(cluster_dir)
  if [ -f "$dir/pids" ]; then
    # Reverse start order; dockerd (if we started it) last.
    tac "$dir/pids" | while read -r pid name; do
      if kill -0 "$pid" 2>/dev/null; then kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done; fi
    done
  fi
  # Containers outlive containerd's shims only until their shim is told; kill what is left of the pods.
  pgrep -f "containerd-shim-runc-v2 -namespace k8s.io -id" >/dev/null && pkill -f "containerd-shim-runc-v2 -namespace k8s.io -id" || true
  if [ -d "$dir" ]; then
    grep -o " $dir/[^ ]*" /proc/mounts | sort -r | while read -r mount; do umount -l "$mount" 2>/dev/null || true; done
  fi
  for flag in -s -d; do iptables -D FORWARD "$flag" "$POD_CIDR" -j ACCEPT 2>/dev/null || true; done
  ip link del cni0 2>/dev/null || true
  rm -rf "$dir" "$WEBHOOK_CERTS"
  say "cluster down"
}

cluster_status() {
  local dir; dir=$(cluster_dir)
  [ -f "$dir/pids" ] || { echo "cluster: down"; return; }
  while read -r pid name; do
    printf '%-24s %s (pid %s, log %s)\n' "$name" "$(kill -0 "$pid" 2>/dev/null && echo running || echo STOPPED)" "$pid" "$dir/$name.log"
  done < "$dir/pids"
  echo "kube-apiserver https://127.0.0.1:6443, DNS $DNS_IP, pods $POD_CIDR (gateway $POD_GATEWAY), kubeconfig $dir/kubeconfig"
  echo "namespace $PETAL_NAMESPACE: MinIO as http://minio.$PETAL_NAMESPACE.svc.cluster.local:9000 when \`minio up\` runs with this state dir"
}
