# shellcheck shell=bash
# Kubeflow Trainer v2 (TrainJob, on JobSet) and Kueue on the cluster, as host processes beside the
# training-operator: their CRDs and webhooks from their own Go modules, each controller recorded in
# the cluster's pids (so `cluster down` stops it), a petal ClusterTrainingRuntime that runs our image,
# and Kueue with the PyTorchJob and TrainJob integrations on: a ClusterQueue + LocalQueue on a
# topology-aware ResourceFlavor (Kueue's Topology of a block level, a node label, then the host), so
# queued jobs can ask to share a block or a host. Uses common.sh, tools.sh's programs and cluster.sh
# (kctl, start, host_service).
#
# Webhook certificates: JobSet's and the trainer's cert rotators look for their files in the same
# hard-coded directory the training-operator's uses, so both run with their rotators off and certs
# made here (their webhook configurations get our CA); Kueue's rotator has a directory setting, so it
# runs as the training-operator does (rotator on, its Secret's files copied into its directory).

JOBSET_NAMESPACE=jobset-system
TRAINER_NAMESPACE=kubeflow-system
KUEUE_NAMESPACE=kueue-system
TRAINER_API=trainer.kubeflow.org
PETAL_QUEUE=petal
STATUS_PORT=10443  # the Trainer's status server (TrainJobStatus)
SA_ISSUER_HOST=kubernetes.default.svc.cluster.local  # cluster.sh's --service-account-issuer
# The test bed's topology: its node is the one host of block-1, as a GPU node is one host of a
# cloud's block (GKE: cloud.google.com/gce-topology-block) or NVLink domain.
TOPOLOGY=petal-topology
TOPOLOGY_BLOCK_LABEL=petal.dev/topology-block

pick_manifests() { "$(venv_dir)/bin/python" "$ROOT/scripts/testbed/manifests.py" "$@"; }

# webhook_cert DIR SERVICE NAMESPACE: a CA and a serving certificate for SERVICE.NAMESPACE.svc in DIR.
webhook_cert() {
  local dir=$1 service=$2 namespace=$3
  mkdir -p "$dir"
  (
    cd "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=$service-ca" -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$service.$namespace.svc" -keyout tls.key -out tls.csr 2>/dev/null
    printf 'subjectAltName=DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local\n' "$service" "$namespace" "$service" "$namespace" > san.ext
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -extfile san.ext -out tls.crt 2>/dev/null
  )
}

healthy() { curl -fsS "http://127.0.0.1:$1/readyz" >/dev/null 2>&1; }

jobset_up() {
  local dir; dir=$(cluster_dir)/jobset
  local src; src=$(module_dir "sigs.k8s.io/jobset@$JOBSET_VERSION")
  webhook_cert "$dir/certs" jobset-webhook-service "$JOBSET_NAMESPACE"
  kctl apply --server-side -f "$src/config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml" >/dev/null
  kctl create namespace "$JOBSET_NAMESPACE" >/dev/null
  kctl kustomize "$src/config/default" 2>/dev/null | pick_manifests --namespace "$JOBSET_NAMESPACE" --ca-bundle "$dir/certs/ca.crt" \
    | kctl apply -f - >/dev/null
  host_service "$JOBSET_NAMESPACE" jobset-webhook-service 443:9445 TCP
  cat > "$dir/config.yaml" <<EOF
apiVersion: config.jobset.x-k8s.io/v1alpha1
kind: Configuration
webhook: {port: 9445, certDir: $dir/certs}
metrics: {bindAddress: "0"}
health: {healthProbeBindAddress: "127.0.0.1:18092"}
leaderElection: {leaderElect: false}
internalCertManagement: {enable: false}
EOF
  start jobset "$(jobset_bin)" --config "$dir/config.yaml" --kubeconfig "$(cluster_dir)/kubeconfig" --leader-elect=false
  wait_for "JobSet" 90 "$(cluster_dir)/jobset.log" healthy 18092
}

kubeflow_trainer_up() {
  local dir; dir=$(cluster_dir)/trainer
  local src; src=$(module_dir "github.com/kubeflow/trainer/v2@$KUBEFLOW_TRAINER_VERSION")
  # Its webhook server reads $TMPDIR/k8s-webhook-server/serving-certs: a TMPDIR of its own.
  webhook_cert "$dir/tmp/k8s-webhook-server/serving-certs" kubeflow-trainer-controller-manager "$TRAINER_NAMESPACE"
  for crd in trainjobs trainingruntimes clustertrainingruntimes; do
    kctl apply --server-side -f "$src/manifests/base/crds/$TRAINER_API"_"$crd.yaml" >/dev/null
  done
  kctl create namespace "$TRAINER_NAMESPACE" >/dev/null
  kctl kustomize "$src/manifests/base/webhook" | pick_manifests --namespace "$TRAINER_NAMESPACE" \
    --ca-bundle "$dir/tmp/k8s-webhook-server/serving-certs/ca.crt" | kctl apply -f - >/dev/null
  host_service "$TRAINER_NAMESPACE" kubeflow-trainer-controller-manager "443:9444 $STATUS_PORT:$STATUS_PORT" TCP
  # Its TrainJobStatus gate: trainer pods get the status server's URL, CA and a projected token, and
  # what they POST becomes the TrainJob's status.trainerStatus. Every TrainJob's CA ConfigMap is copied
  # from the Secret upstream's cert management would make.
  local certs=$dir/tmp/k8s-webhook-server/serving-certs
  kctl -n "$TRAINER_NAMESPACE" create secret generic kubeflow-trainer-webhook-cert --from-file="$certs/ca.crt" \
    --from-file="$certs/tls.crt" --from-file="$certs/tls.key" >/dev/null
  cat > "$dir/config.yaml" <<EOF
apiVersion: config.trainer.kubeflow.org/v1alpha1
kind: Configuration
webhook: {port: 9444}
metrics: {bindAddress: "0"}
health: {healthProbeBindAddress: "127.0.0.1:18091"}
certManagement: {enable: false}
statusServer: {port: $STATUS_PORT}
featureGates: {TrainJobStatus: true}
EOF
  # The status server reads what a pod would have at fixed paths: its TLS pair in
  # /tmp/k8s-webhook-server/serving-certs (the training-operator's, on this host), and a service-account
  # token (only its issuer, whose OIDC discovery it then asks the apiserver for: the issuer's name
  # must resolve). In a mount namespace of its own, ours are there.
  mkdir -p "$dir/serviceaccount" /var/run/secrets/kubernetes.io/serviceaccount
  kctl -n "$TRAINER_NAMESPACE" create serviceaccount kubeflow-trainer-controller-manager >/dev/null
  kctl -n "$TRAINER_NAMESPACE" create token kubeflow-trainer-controller-manager --duration 720h > "$dir/serviceaccount/token"
  echo "$TRAINER_NAMESPACE" > "$dir/serviceaccount/namespace"
  { cat /etc/hosts; echo "$(kctl get service kubernetes -n default -o jsonpath='{.spec.clusterIP}') $SA_ISSUER_HOST"; } > "$dir/hosts"
  # shellcheck disable=SC2016  # expanded by the inner shell
  start trainer-controller-manager unshare --mount sh -c 'mount --bind "$0/tmp/k8s-webhook-server" /tmp/k8s-webhook-server &&
      mount --bind "$0/serviceaccount" /var/run/secrets/kubernetes.io/serviceaccount &&
      mount --bind "$0/hosts" /etc/hosts && exec "$@"' "$dir" env TMPDIR="$dir/tmp" "$(trainer_bin)" \
    --config "$dir/config.yaml" --kubeconfig "$(cluster_dir)/kubeconfig"
  wait_for "the Kubeflow trainer" 90 "$(cluster_dir)/trainer-controller-manager.log" healthy 18091
  # Its status server listens only once its OIDC discovery worked (readyz does not cover it): any answer.
  wait_for "the Kubeflow trainer's TrainJobStatus server" 60 "$(cluster_dir)/trainer-controller-manager.log" \
    curl -sS -o /dev/null --cacert "$certs/ca.crt" \
      --resolve "kubeflow-trainer-controller-manager.$TRAINER_NAMESPACE.svc:$STATUS_PORT:127.0.0.1" \
      "https://kubeflow-trainer-controller-manager.$TRAINER_NAMESPACE.svc:$STATUS_PORT/"
  # What the upstream install makes for the Python SDK (TrainerClient reads the trainer's version from it).
  kctl -n "$TRAINER_NAMESPACE" create configmap kubeflow-trainer-public \
    --from-literal=kubeflow_trainer_version="$KUBEFLOW_TRAINER_VERSION" >/dev/null
  apply_petal_runtime
}

# petal's runtime, as a cluster admin installs it, running our image; again on every `cluster up`, so
# a running cluster has the one in this checkout.
apply_petal_runtime() {
  sed "s|^\( *image:\) petal:.*|\1 $DEV_IMAGE|" "$ROOT/manifests/trainer-runtime.yaml" | kctl apply --server-side -f - >/dev/null
}

kueue_up() {
  local dir; dir=$(cluster_dir)/kueue
  local src; src=$(module_dir "sigs.k8s.io/kueue@$KUEUE_VERSION")
  mkdir -p "$dir/certs"
  kctl create namespace "$KUEUE_NAMESPACE" >/dev/null
  kctl -n "$KUEUE_NAMESPACE" create secret generic kueue-webhook-server-cert >/dev/null
  # Its CRDs with their conversion webhooks (its rotator waits to inject its CA into them), and of its
  # webhooks only those for what petal uses: the full set also guards every Pod, Job and Deployment.
  kctl kustomize "$src/config/default" 2>/dev/null \
    | pick_manifests --kinds CustomResourceDefinition --namespace "$KUEUE_NAMESPACE" \
        --webhooks mclusterqueue.kb.io,mresourceflavor.kb.io,mworkload.kb.io,mpytorchjob.kb.io,mtrainjob.kb.io,vclusterqueue.kb.io,vcohort.kb.io,vresourceflavor.kb.io,vworkload.kb.io,vpytorchjob.kb.io,vtrainjob.kb.io,vlocalqueue.kb.io,mlocalqueue.kb.io \
    | kctl apply --server-side -f - >/dev/null
  host_service "$KUEUE_NAMESPACE" kueue-webhook-service 443:9446 TCP
  cat > "$dir/config.yaml" <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: $KUEUE_NAMESPACE
manageJobsWithoutQueueName: false
health: {healthProbeBindAddress: "127.0.0.1:18093"}
metrics: {bindAddress: "0"}
webhook: {port: 9446, certDir: $dir/certs}
leaderElection: {leaderElect: false}
internalCertManagement: {enable: true, webhookServiceName: kueue-webhook-service, webhookSecretName: kueue-webhook-server-cert}
integrations:
  frameworks: [kubeflow.org/pytorchjob, trainer.kubeflow.org/trainjob]
featureGates: {VisibilityOnDemand: false}
# Kueue's DRA support (beta, on since v0.18) counts a claimed DeviceClass against the quota resource it
# is mapped to here; a queued job claiming an unmapped class is inadmissible ("DeviceClass … is not
# mapped in DRA configuration").
resources:
  deviceClassMappings:
    - {name: $DRA_QUOTA_RESOURCE, deviceClassNames: [$DRA_DEVICE_CLASS]}
EOF
  start kueue "$(kueue_bin)" --config "$dir/config.yaml" --kubeconfig "$(cluster_dir)/kubeconfig"
  # As in a pod the Secret would be mounted: its files copied where the rotator and server look.
  wait_for "Kueue's webhook certificate" 90 "$(cluster_dir)/kueue.log" \
    sh -c "$(kbin kubectl) --kubeconfig $(cluster_dir)/kubeconfig -n $KUEUE_NAMESPACE get secret kueue-webhook-server-cert -o jsonpath='{.data.tls\\.crt}' | grep -q ."
  for file in ca.crt tls.crt tls.key; do
    kctl -n "$KUEUE_NAMESPACE" get secret kueue-webhook-server-cert -o jsonpath="{.data.${file//./\\.}}" | base64 -d > "$dir/certs/$file"
  done
  wait_for "Kueue" 120 "$(cluster_dir)/kueue.log" healthy 18093
  kctl label node "$NODE_NAME" --overwrite "$TOPOLOGY_BLOCK_LABEL=block-1" >/dev/null
  # The queue's quota is a cluster's (more than the one node holds): with a topology-aware flavor,
  # Kueue admits a job only where one domain's free capacity — the node's, here — holds its pods.
  kctl apply -f - >/dev/null <<EOF
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {name: default-flavor}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: Topology
metadata: {name: $TOPOLOGY}
spec:
  levels:
    - nodeLabel: $TOPOLOGY_BLOCK_LABEL
    - nodeLabel: kubernetes.io/hostname
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {name: topology-flavor}
spec:
  nodeLabels: {$TOPOLOGY_BLOCK_LABEL: block-1}
  topologyName: $TOPOLOGY
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {name: $PETAL_QUEUE}
spec:
  namespaceSelector: {}
  resourceGroups:
    - coveredResources: [cpu, memory, ephemeral-storage, nvidia.com/gpu]
      flavors:
        - name: topology-flavor
          resources:
            - {name: cpu, nominalQuota: "64"}
            - {name: memory, nominalQuota: 256Gi}
            - {name: ephemeral-storage, nominalQuota: 1Ti}
            - {name: nvidia.com/gpu, nominalQuota: 0}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: LocalQueue
metadata: {name: $PETAL_QUEUE, namespace: $(chart_endpoint_part namespace)}
spec: {clusterQueue: $PETAL_QUEUE}
EOF
}

trainer_running() { healthy 18091 && healthy 18092 && healthy 18093; }

# The three, in the order their webhooks need each other: JobSet, the trainer (its JobSets go through
# JobSet's webhook), Kueue (it watches TrainJobs and JobSets).
trainer_up() {
  jobset_up
  kubeflow_trainer_up
  kueue_up
  say "Kubeflow Trainer $KUBEFLOW_TRAINER_VERSION (ClusterTrainingRuntime petal), JobSet $JOBSET_VERSION and Kueue $KUEUE_VERSION (LocalQueue $(chart_endpoint_part namespace)/$PETAL_QUEUE) running"
}
