# shellcheck shell=bash
# Builds the test bed's programs into the cache, each keyed by its pinned version and skipped when
# already there: the Python environment, MinIO, helm and the chart lint tools, and the cluster's
# programs (Debian packages; Kubernetes, CoreDNS and the training-operator from their Go modules).
# Uses common.sh only.

# Every Go program here is a static binary without a symbol table: no C compiler in the build, and
# less for the linker to write (a cold build is mostly these builds). Flags given on a command line
# still win.
export CGO_ENABLED=0 GOFLAGS="-trimpath -ldflags=-s"

install_python() {
  local venv; venv=$(venv_dir)
  if [ -f "$venv/.complete" ]; then
    say "python env $venv is already installed"
  else
    say "installing python env into $venv (torch is large: minutes on a cold cache)"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet -e "$ROOT[$EXTRAS]"
    touch "$venv/.complete"
  fi
  # The editable install points at one checkout and knows its packages and commands as they were:
  # redo it (without dependencies: seconds) for another checkout (a CI clone) or a changed pyproject.
  local stamp; stamp="$ROOT $(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
  if [ "$(cat "$venv/.editable" 2>/dev/null)" != "$stamp" ]; then
    "$venv/bin/pip" install --quiet --no-deps -e "$ROOT"
    echo "$stamp" > "$venv/.editable"
  fi
}

# The data benchmark's peers (benchmarks/peers.py): a venv whose own packages (MosaicML Streaming's
# numpy < 2.2 among them) come first, and the dev venv's (torch, torchvision, Pillow) after them, through
# a .pth file: a gigabyte less than a torch of its own, and the same torch as petal's contenders.
peers_venv() { echo "$(venv_dir)-peers-$(echo "$WEBDATASET_VERSION $MOSAICML_STREAMING_VERSION $LITDATA_VERSION $BOTO3_VERSION" | sha256sum | cut -c1-8)"; }
install_peers() {
  local venv dev site dev_site; venv=$(peers_venv) dev=$(venv_dir)
  if [ -f "$venv/.complete" ]; then say "the data benchmark's peers are already installed"; return; fi
  [ -f "$dev/.complete" ] || die "the peers' venv is layered on the python env: run scripts/testbed.sh install python first"
  say "installing WebDataset $WEBDATASET_VERSION, MosaicML Streaming $MOSAICML_STREAMING_VERSION and LitData $LITDATA_VERSION into $venv"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  dev_site=$("$dev/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  echo "import site; site.addsitedir('$dev_site')" > "$site/zz-petal-dev-venv.pth"
  "$venv/bin/pip" install --quiet "webdataset==$WEBDATASET_VERSION" "mosaicml-streaming==$MOSAICML_STREAMING_VERSION" \
    "litdata==$LITDATA_VERSION" "boto3==$BOTO3_VERSION"
  touch "$venv/.complete"
}

install_minio() {
  if [ -x "$(minio_bin)" ]; then say "minio $MINIO_VERSION is already built"; return; fi
  say "building minio $MINIO_VERSION with go install (a few minutes on a cold cache)"
  GOBIN="$(dirname "$(minio_bin)")" go install "$MINIO_MODULE@$MINIO_VERSION"
}

install_helm() {
  if [ -x "$(helm_bin)" ]; then say "helm $HELM_VERSION is already built"; return; fi
  say "building helm $HELM_VERSION with go install"
  GOBIN="$(dirname "$(helm_bin)")" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

# Lint tools: the helm-unittest plugin, kubeconform with the JSON schemas made from the PyTorchJob
# CRD of the training-operator and the TrainJob/ClusterTrainingRuntime CRDs of Kubeflow Trainer v2,
# helm-docs for the chart's README, and actionlint for the GitHub workflow.
install_lint_tools() {
  local plugin; plugin="$(helm_plugins)/unittest"
  if [ -x "$plugin/untt" ]; then
    say "helm-unittest $HELM_UNITTEST_VERSION is already built"
  else
    say "building helm-unittest $HELM_UNITTEST_VERSION"
    local src; src=$(module_dir "github.com/helm-unittest/helm-unittest@$HELM_UNITTEST_VERSION")
    mkdir -p "$plugin"
    # Its go.mod has replace directives, so it is built inside its module rather than go-installed.
    (cd "$src" && go build -o "$plugin/untt" ./cmd/helm-unittest)
    printf 'name: unittest\nversion: "%s"\nusage: unittest for helm charts\ndescription: helm-unittest, built from source\ncommand: "$HELM_PLUGIN_DIR/untt"\n' \
      "${HELM_UNITTEST_VERSION#v}" > "$plugin/plugin.yaml"
  fi
  if [ -x "$(kubeconform_bin)" ]; then
    say "kubeconform $KUBECONFORM_VERSION is already built"
  else
    say "building kubeconform $KUBECONFORM_VERSION"
    GOBIN="$(dirname "$(kubeconform_bin)")" go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
  fi
  if [ -f "$(schema_dir)/clustertrainingruntime-trainer.kubeflow.org-v1alpha1.json" ]; then
    say "the PyTorchJob, TrainJob and ClusterTrainingRuntime schemas are already made"
  else
    local operator trainer
    operator=$(module_dir "github.com/kubeflow/training-operator@$TRAINING_OPERATOR_VERSION")
    trainer=$(module_dir "github.com/kubeflow/trainer/v2@$KUBEFLOW_TRAINER_VERSION")
    for crd in "$operator/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" \
      "$trainer/manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml" \
      "$trainer/manifests/base/crds/trainer.kubeflow.org_clustertrainingruntimes.yaml"; do
      "$(venv_dir)/bin/python" "$ROOT/scripts/crd_to_jsonschema.py" "$crd" "$(schema_dir)"
    done
  fi
  if [ -x "$(helm_docs_bin)" ]; then
    say "helm-docs $HELM_DOCS_VERSION is already built"
  else
    say "building helm-docs $HELM_DOCS_VERSION"
    GOBIN="$(dirname "$(helm_docs_bin)")" go install "github.com/norwoodj/helm-docs/cmd/helm-docs@$HELM_DOCS_VERSION"
  fi
  if [ -x "$(actionlint_bin)" ]; then
    say "actionlint $ACTIONLINT_VERSION is already built"
  else
    say "building actionlint $ACTIONLINT_VERSION"
    GOBIN="$(dirname "$(actionlint_bin)")" go install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
  fi
}

install_toxiproxy() {
  if [ -x "$(toxiproxy_bin)" ]; then say "toxiproxy $TOXIPROXY_VERSION is already built"; return; fi
  say "building toxiproxy $TOXIPROXY_VERSION"
  local bin; bin=$(dirname "$(toxiproxy_bin)")
  GOBIN="$bin" go install "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION"
  mv "$bin/server" "$(toxiproxy_bin)"
}

KUBE_COMMANDS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"
# docker-registry is the CNCF distribution registry (2.8) as Debian packages it: installed in seconds
# with the rest, where building v3 from its Go module held up every Go build behind it for 2.5 minutes.
CLUSTER_APT="docker.io containerd runc containernetworking-plugins etcd-server mmdebstrap iptables iproute2 openssl docker-registry"

install_kube() {
  local dir; dir=$(kube_dir)
  if [ -f "$dir/.complete" ]; then say "kubernetes $KUBERNETES_VERSION is already built"; return; fi
  say "building kubernetes $KUBERNETES_VERSION ($KUBE_COMMANDS) with go build: tens of minutes on a cold cache"
  local src="$dir/src" staging_version="v0${KUBERNETES_VERSION#v1}"
  mkdir -p "$src" "$dir/bin"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 through local replaces, which a module
  # download does not carry; this wrapper module replaces each with its published release instead.
  (
    cd "$src"
    local kube_mod; kube_mod=$(go mod download -json k8s.io/kubernetes@"$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    {
      echo "module petal.local/kubernetes-build"
      echo "go 1.24.0"
      echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
      echo "replace ("
      sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1 => \1 '"$staging_version"'#p' "$kube_mod"
      echo ")"
    } > go.mod
    local packages=""
    for command in $KUBE_COMMANDS; do packages="$packages k8s.io/kubernetes/cmd/$command"; done
    # shellcheck disable=SC2086
    go get $(for p in $packages; do echo "$p@$KUBERNETES_VERSION"; done)
    # shellcheck disable=SC2086
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION" -o "$dir/bin/" $packages
  )
  touch "$dir/.complete"
}

# Kubeflow Trainer v2, JobSet and Kueue. JobSet is built inside its module: the proxy refuses its
# version list, which `go install module@version` asks for.
install_trainer_programs() {
  if [ -x "$(jobset_bin)" ]; then say "jobset $JOBSET_VERSION is already built"; else
    say "building jobset $JOBSET_VERSION"
    local src; src=$(module_dir "sigs.k8s.io/jobset@$JOBSET_VERSION")
    (cd "$src" && GOFLAGS=-mod=mod go build -o "$(jobset_bin)" .)
  fi
  if [ -x "$(trainer_bin)" ]; then say "kubeflow trainer $KUBEFLOW_TRAINER_VERSION is already built"; else
    say "building the kubeflow trainer $KUBEFLOW_TRAINER_VERSION"
    GOBIN="$(dirname "$(trainer_bin)")" go install "github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager@$KUBEFLOW_TRAINER_VERSION"
  fi
  if [ -x "$(kueue_bin)" ]; then say "kueue $KUEUE_VERSION is already built"; else
    say "building kueue $KUEUE_VERSION (a large build: minutes on a cold cache)"
    GOBIN="$(dirname "$(kueue_bin)")" go install "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
  fi
  # Built inside its module: `go install …@version` asks the proxy for the module's version list,
  # which it refuses (403) for this module.
  if [ -x "$(dra_driver_bin)" ]; then say "dra-example-driver $DRA_EXAMPLE_DRIVER_VERSION is already built"; else
    say "building the dra-example-driver $DRA_EXAMPLE_DRIVER_VERSION kubelet plugin"
    local driver; driver=$(module_dir "sigs.k8s.io/dra-example-driver@$DRA_EXAMPLE_DRIVER_VERSION")
    (cd "$driver" && go build -o "$(dra_driver_bin)" ./cmd/dra-example-kubeletplugin)
  fi
}

# CoreDNS's own main package with the plugins of COREDNS_PLUGINS, in a module of its own that
# requires CoreDNS's release (its dependencies at the versions CoreDNS's go.mod selects).
install_coredns() {
  if [ -x "$(coredns_bin)" ]; then say "coredns $COREDNS_VERSION is already built"; return; fi
  say "building coredns $COREDNS_VERSION with the plugins $COREDNS_PLUGINS"
  local src; src="$(dirname "$(dirname "$(coredns_bin)")")/src"
  mkdir -p "$src"
  (
    cd "$src"
    printf 'module petal.local/coredns-build\n\ngo 1.24.0\n\nrequire github.com/coredns/coredns %s\n' "$COREDNS_VERSION" > go.mod
    {
      echo "package main"
      echo 'import ('
      echo '	"github.com/coredns/coredns/coremain"'
      for plugin in $COREDNS_PLUGINS; do echo "	_ \"github.com/coredns/coredns/plugin/$plugin\""; done
      echo ')'
      echo 'func main() { coremain.Run() }'
    } > main.go
    go mod tidy
    go build -o "$(coredns_bin)" .
  )
}

# Everything the cluster runs as host programs: Debian's runc, etcd, CNI plugins and image registry
# (install_cluster_packages; its containerd is Docker's); containerd, Kubernetes, CoreDNS, the
# training-operator, Trainer v2, JobSet and Kueue built from their Go modules (install_cluster_programs).
install_cluster_packages() {
  local missing=""
  for package in $CLUSTER_APT; do dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"; done
  if [ -n "$missing" ]; then
    say "installing Debian packages:$missing"
    # shellcheck disable=SC2086
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    say "Debian packages for the cluster are already installed"
  fi
}

# Built with one `go install`: the shim must be containerd 2's own (Debian's 1.6 shim fails to start
# its tasks), and ctr speaks to it without version warnings.
# Into a fresh directory, moved into place whole: an interrupted build leaves no binary behind (a missing
# shim would have containerd start Debian's from PATH).
install_containerd() {
  local bin; bin=$(dirname "$(containerd_bin containerd)")
  if [ -d "$bin" ]; then say "containerd $CONTAINERD_VERSION is already built"; return; fi
  say "building containerd $CONTAINERD_VERSION (containerd, containerd-shim-runc-v2, ctr)"
  local module=github.com/containerd/containerd/v2 building="$bin.building"
  rm -rf "$building"
  GOBIN="$building" CGO_ENABLED=0 go install -trimpath \
    -tags "urfave_cli_no_docs no_btrfs no_devmapper" -ldflags "-s -w -X $module/version.Version=$CONTAINERD_VERSION" \
    "$module/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" "$module/cmd/ctr@$CONTAINERD_VERSION" \
    "$module/cmd/containerd@$CONTAINERD_VERSION"
  mv "$building" "$bin"
}

install_cluster_programs() {
  install_containerd
  install_kube
  install_coredns
  install_trainer_programs
  if [ -x "$(operator_bin)" ]; then say "training-operator $TRAINING_OPERATOR_VERSION is already built"; else
    say "building training-operator $TRAINING_OPERATOR_VERSION"
    GOBIN="$(dirname "$(operator_bin)")" go install "github.com/kubeflow/training-operator/cmd/training-operator.v1@$TRAINING_OPERATOR_VERSION"
  fi
}
