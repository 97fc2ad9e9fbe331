# shellcheck shell=bash
# Dynamic Resource Allocation on the cluster: the upstream DRA example driver publishing mock GPUs
# (DeviceClass gpu.example.com, DRA_DEVICES of them on the node) — its kubelet plugin (tools.sh builds
# it) in an image on the test bed's Debian base, deployed by the Helm chart its module ships, pointed
# at the test bed's kubelet --root-dir. Kubernetes 1.34 serves resource.k8s.io/v1 and allocates claims
# with no feature gate. The driver tells a container its device through CDI (GPU_DEVICE_<n>=gpu-<n>),
# which the test bed's containerd 2 applies. Uses common.sh, images.sh and cluster.sh.

DRA_NAMESPACE=dra-example-driver
DRA_DEVICES=4
dra_image() { echo "petal-dra-example-driver:$DRA_EXAMPLE_DRIVER_VERSION"; }

dra_driver_up() {
  local image work chart
  image=$(dra_image)
  if ! docker image inspect "$image" >/dev/null 2>&1; then
    work="$CACHE/image-build/dra-example-driver"
    mkdir -p "$work"
    cp "$(dra_driver_bin)" "$work/"
    printf 'FROM %s\nCOPY dra-example-kubeletplugin /usr/bin/dra-example-kubeletplugin\n' "$BASE_IMAGE" > "$work/Dockerfile"
    docker build -q -t "$image" "$work" >/dev/null
  fi
  load_image "$image"
  chart="$(module_dir "sigs.k8s.io/dra-example-driver@$DRA_EXAMPLE_DRIVER_VERSION")/deployments/helm/dra-example-driver"
  "$(helm_bin)" upgrade --install dra-example-driver "$chart" --kubeconfig "$(cluster_dir)/kubeconfig" \
    --namespace "$DRA_NAMESPACE" --create-namespace --set image.repository="${image%:*}" --set image.tag="${image##*:}" \
    --set kubeletPlugin.kubeletRegistrarDirectoryPath="$(cluster_dir)/kubelet/plugins_registry" \
    --set kubeletPlugin.kubeletPluginsDirectoryPath="$(cluster_dir)/kubelet/plugins" \
    --set kubeletPlugin.numDevices="$DRA_DEVICES" >/dev/null
  wait_for "the DRA example driver's devices" 120 "$(cluster_dir)/kubelet.log" \
    sh -c "$(kbin kubectl) --kubeconfig $(cluster_dir)/kubeconfig get resourceslices -o name | grep -q ."
  say "DRA example driver $DRA_EXAMPLE_DRIVER_VERSION running: $DRA_DEVICES mock GPUs of DeviceClass $DRA_DEVICE_CLASS"
}
