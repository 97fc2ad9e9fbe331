# shellcheck shell=bash
# A single-node Kubernetes cluster from upstream programs, started on this host (what kind runs,
# without kind's node image): etcd, kube-apiserver, controller-manager, scheduler, kubelet +
# containerd (CRI) + CNI bridge, kube-proxy, CoreDNS, and the Kubeflow training-operator with its
# validating webhook. Every process it starts is recorded in $STATE/cluster/pids and stopped by that
# PID; the pods' shims by the PIDs containerd recorded for them. Uses common.sh, tools.sh's programs
# and images.sh (the cluster's own images, loading into its containerd).
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
WEBHOOK_CERTS=/tmp/k8s-webhook-server/serving-certs

node_ip() { ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p'; }
kctl() { "$(kbin kubectl)" --kubeconfig "$(cluster_dir)/kubeconfig" "$@"; }
# The namespace and name pods reach MinIO by, from the chart's default endpoint
# (http://<service>.<namespace>.svc.cluster.local:<port>); the kubeconfig's default namespace.
chart_endpoint_part() {  # chart_endpoint_part service|namespace|port
  local endpoint; endpoint=$(chart_default s3.endpoint)
  [[ "$endpoint" =~ ^https?://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:([0-9]+)/?$ ]] \
    || die "the chart's s3.endpoint $endpoint is not http://SERVICE.NAMESPACE.svc.cluster.local:PORT"
  case $1 in service) echo "${BASH_REMATCH[1]}" ;; namespace) echo "${BASH_REMATCH[2]}" ;; port) echo "${BASH_REMATCH[3]}" ;; esac
}

# start NAME COMMAND...: runs a cluster process in the background, logging to $dir/NAME.log.
start() {
  local name=$1 dir; dir=$(cluster_dir); shift
  nohup "$@" > "$dir/$name.log" 2>&1 < /dev/null &
  echo "$! $name $(start_time $!)" >> "$dir/pids"
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
contexts: [{name: petal, context: {cluster: petal, user: admin, namespace: $(chart_endpoint_part namespace)}}]
current-context: petal
EOF
  # CDI is always on in containerd 2, reading /etc/cdi and /var/run/cdi (where DRA drivers write their
  # specs). cgroup v1, what these machines have, is deprecated there but supported: not a condition of
  # the runtime's status.
  cat > "$dir/containerd/config.toml" <<EOF
version = 3
root = "$(image_store)/root"
state = "$dir/containerd/state"
[grpc]
  address = "$(containerd_socket)"
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "registry.k8s.io/pause:$PAUSE_VERSION"
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  ignore_deprecation_warnings = ["io.containerd.deprecation/cgroup-v1"]
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
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
  # No image GC and eviction only on a nearly full disk: its images cannot be pulled again, and a
  # shared disk's free space swings by gigabytes while images build.
  cat > "$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication: {anonymous: {enabled: false}, webhook: {enabled: false}, x509: {clientCAFile: $dir/pki/ca.crt}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
failSwapOn: false
clusterDNS: [$DNS_IP]
clusterDomain: cluster.local
containerRuntimeEndpoint: unix://$(containerd_socket)
tlsCertFile: $dir/pki/apiserver.crt
tlsPrivateKeyFile: $dir/pki/apiserver.key
evictionHard: {memory.available: "100Mi", nodefs.available: "200Mi", imagefs.available: "200Mi"}
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

host_service() {  # host_service NAMESPACE NAME "PORT:TARGET_PORT ..." PROTOCOLS [CLUSTER_IP]: a Service backed by this host
  local namespace=$1 name=$2 pairs=$3 protocols=$4 ip=${5:-} ports="" endpoint_ports="" protocol pair
  for protocol in $protocols; do
    for pair in $pairs; do
      ports="$ports{name: p-${protocol,,}-${pair%%:*}, port: ${pair%%:*}, targetPort: ${pair##*:}, protocol: $protocol},"
      endpoint_ports="$endpoint_ports{name: p-${protocol,,}-${pair%%:*}, port: ${pair##*:}, protocol: $protocol},"
    done
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

# publish_minio PORT ACCESS_KEY SECRET_KEY: pods reach a MinIO on this host at the chart's default
# endpoint (in the namespace cluster_up makes) through a Service backed by the host, and get its
# credentials from the Secret the chart reads by default (made from an env file on a pipe, never on a
# command line).
publish_minio() {
  local port=$1 access_key=$2 secret_key=$3 namespace service secret
  namespace=$(chart_endpoint_part namespace)
  service=$(chart_endpoint_part service)
  secret=$(chart_default s3.existingSecret)
  host_service "$namespace" "$service" "$(chart_endpoint_part port):$port" TCP
  kctl -n "$namespace" create secret generic "$secret" --dry-run=client -o yaml \
    --from-env-file=<(printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$access_key" "$secret_key") \
    | kctl apply -f - >/dev/null
  say "pods reach this MinIO at $(chart_default s3.endpoint) (Secret $namespace/$secret)"
}

cluster_up() {
  local dir; dir=$(cluster_dir)
  for program in "$(containerd_bin containerd)" "$(containerd_bin containerd-shim-runc-v2)" "$(operator_bin)" \
    "$(trainer_bin)" "$(jobset_bin)" "$(kueue_bin)" "$(dra_driver_bin)"; do
    [ -x "$program" ] || die "the cluster is not built ($program is missing): run scripts/testbed.sh install cluster"
  done
  if [ -f "$dir/pids" ]; then
    if cluster_running; then say "cluster already up (kubeconfig $dir/kubeconfig)"; return; fi
    say "cleaning up a previous cluster first"
    cluster_down
  fi
  if (exec 3<>/dev/tcp/127.0.0.1/6443) 2>/dev/null; then
    die "port 6443 is taken by a cluster this test bed did not start (state $STATE); stop it first"
  fi
  mkdir -p "$dir" "$(image_store)"
  docker_up
  build_base_images
  make_certs
  write_configs
  pod_network_up
  # On PATH first: containerd finds its runc shim there.
  start containerd env PATH="$(dirname "$(containerd_bin containerd)"):$PATH" "$(containerd_bin containerd)" \
    --config "$dir/containerd/config.toml"
  wait_for "containerd" 30 "$dir/containerd.log" test -S "$(containerd_socket)"
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
  host_service kube-system kube-dns 53:53 "UDP TCP" "$DNS_IP"
  wait_for "CoreDNS" 30 "$dir/coredns.log" curl -fsS http://127.0.0.1:18053/health

  local operator; operator=$(module_dir "github.com/kubeflow/training-operator@$TRAINING_OPERATOR_VERSION")
  kctl apply --server-side -f "$operator/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" >/dev/null
  wait_for "the PyTorchJob CRD" 30 "$dir/kube-apiserver.log" kctl wait --for=condition=Established crd/pytorchjobs.kubeflow.org --timeout=1s
  kctl create namespace kubeflow >/dev/null
  kctl -n kubeflow create secret generic training-operator-webhook-cert >/dev/null
  kctl kustomize "$operator/manifests/overlays/standalone" \
    | "$(venv_dir)/bin/python" -c 'import sys, yaml; yaml.safe_dump_all([d for d in yaml.safe_load_all(sys.stdin) if d and d["kind"] == "ValidatingWebhookConfiguration"], sys.stdout)' \
    | kctl apply -f - >/dev/null
  host_service kubeflow training-operator 443:9443 TCP
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
  kctl create namespace "$(chart_endpoint_part namespace)" --dry-run=client -o yaml | kctl apply -f - >/dev/null
  say "cluster up: node $NODE_NAME Ready, DNS at $DNS_IP, training-operator $TRAINING_OPERATOR_VERSION running"
  say "use it: eval \"\$(scripts/testbed.sh env)\"; kubectl get nodes   (logs: $dir/*.log)"
}

# The pods' containers, through containerd itself: every task killed and deleted (its shim exits with
# its last task), every container record removed, and any shim still alive stopped by the PID
# containerd recorded for it in this cluster's state. The image store stays.
stop_pods() {
  if [ -S "$(containerd_socket)" ]; then
    local task
    for task in $(ctr_k8s tasks ls -q 2>/dev/null); do
      ctr_k8s tasks kill -a -s SIGKILL "$task" >/dev/null 2>&1 || true
    done
    for task in $(ctr_k8s tasks ls -q 2>/dev/null); do
      ctr_k8s tasks rm -f "$task" >/dev/null 2>&1 || true
    done
    local containers; containers=$(ctr_k8s containers ls -q 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$containers" ] || ctr_k8s containers rm $containers >/dev/null 2>&1 || true
  fi
  local shim_pid pid
  for shim_pid in "$(cluster_dir)"/containerd/state/io.containerd.runtime.v2.task/*/*/shim.pid; do
    [ -f "$shim_pid" ] || continue
    pid=$(cat "$shim_pid")
    # containerd records no start time: a shim is known by its name (what a recycled PID is not)
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == containerd-shim* ]] && stop_pid "$pid" "$(start_time "$pid")"
  done
  # The CRI plugin's per-sandbox files (hostname, resolv.conf) belong to this cluster's pods only.
  rm -rf "$(image_store)/root/io.containerd.grpc.v1.cri/sandboxes" "$(image_store)/root/io.containerd.grpc.v1.cri/containers"
}

cluster_down() {
  local dir; dir=$(cluster_dir)
  if [ -f "$dir/pids" ]; then
    # Reverse start order; containerd (started first) goes last, once it has stopped the pods. Two
    # seconds' grace: the cluster's state is deleted next, so a graceful shutdown saves nothing, and
    # Trainer's controller takes all of 30 s to end on SIGTERM (a minute of every CI run's teardown).
    tac "$dir/pids" | while read -r pid name start; do
      [ "$name" = containerd ] && same_process "$pid" "$start" && stop_pods
      stop_pid "$pid" "$start" 2
    done
  fi
  if [ -d "$dir" ]; then
    grep -o " $dir/[^ ]*" /proc/mounts | sort -r | while read -r mount; do umount -l "$mount" 2>/dev/null || true; done
  fi
  for flag in -s -d; do iptables -D FORWARD "$flag" "$POD_CIDR" -j ACCEPT 2>/dev/null || true; done
  ip link del cni0 2>/dev/null || true
  rm -rf "$dir" "$WEBHOOK_CERTS"
  # The mount point trainer.sh made for the Trainer's token (its own mount namespace held the rest).
  rmdir /var/run/secrets/kubernetes.io/serviceaccount /var/run/secrets/kubernetes.io 2>/dev/null || true
  say "cluster down"
}

cluster_status() {
  local dir; dir=$(cluster_dir)
  [ -f "$dir/pids" ] || { echo "cluster: down"; return 1; }
  while read -r pid name start; do
    printf '%-28s %s (pid %s, log %s)\n' "$name" "$(same_process "$pid" "$start" && echo running || echo STOPPED)" "$pid" "$dir/$name.log"
  done < "$dir/pids"
  echo "kube-apiserver https://127.0.0.1:6443, DNS $DNS_IP, pods $POD_CIDR (gateway $POD_GATEWAY), kubeconfig $dir/kubeconfig"
  echo "pods reach the test bed's MinIO (when it runs) at $(chart_default s3.endpoint) with Secret $(chart_endpoint_part namespace)/$(chart_default s3.existingSecret)"
  cluster_running || { echo "cluster: NOT answering (scripts/testbed.sh cluster down cleans up)"; return 1; }
}

cluster_env() {
  [ -f "$(cluster_dir)/kubeconfig" ] || return 0
  echo "export KUBECONFIG=\"$(cluster_dir)/kubeconfig\""
  echo "export PATH=\"$(kube_dir)/bin:\$PATH\""
}
