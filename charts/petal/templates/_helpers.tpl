{{/* The job's name: the release name, cut to a DNS-1035 label short enough for "<job>-worker-NN" pods. */}}
{{- define "petal.name" -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- end -}}

{{/* The job object's labels: the chart's, and Kueue's LocalQueue where a queue is named (Kueue then
     admits the job whole, or not yet). */}}
{{- define "petal.jobLabels" -}}
{{ include "petal.labels" . }}
{{- with .Values.queue }}
kueue.x-k8s.io/queue-name: {{ . }}
{{- end }}
{{- end -}}

{{- define "petal.labels" -}}
app.kubernetes.io/name: petal
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: training
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* What selects this release's pods (the NetworkPolicy's peers). */}}
{{- define "petal.selectorLabels" -}}
app.kubernetes.io/name: petal
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The image by digest where one is given (what runs is then exactly what was tested), else by tag. */}}
{{- define "petal.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* The Secret the pods take storage credentials from; empty: none, the pods' own identity. */}}
{{- define "petal.secretName" -}}
{{- if .Values.s3.createSecret }}{{ printf "%s-s3" (include "petal.name" .) }}{{ else }}{{ .Values.s3.existingSecret }}{{ end -}}
{{- end -}}

{{/* Processes per pod as the operator's nprocPerNode: as given, else one per GPU (one on CPU). */}}
{{- define "petal.nprocPerNode" -}}
{{- if kindIs "invalid" .Values.nprocPerNode }}{{ max 1 (int .Values.gpusPerReplica) }}{{ else }}{{ .Values.nprocPerNode }}{{ end -}}
{{- end -}}

{{/* How many processes a pod's requests are sized for ("auto"/"cpu"/"gpu" count as one per GPU). */}}
{{- define "petal.processCount" -}}
{{- $nproc := include "petal.nprocPerNode" . -}}
{{- if regexMatch "^[0-9]+$" $nproc }}{{ $nproc }}{{ else }}{{ max 1 (int .Values.gpusPerReplica) }}{{ end -}}
{{- end -}}

{{- define "petal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ .Values.serviceAccount.name | default (include "petal.name" .) }}{{ else }}{{ .Values.serviceAccount.name }}{{ end -}}
{{- end -}}

{{- define "petal.output" -}}
{{- if .Values.training.output }}{{ .Values.training.output }}{{ else -}}
{{- $prefix := required "outputPrefix is required: a bucket of yours for run directories, e.g. s3://my-team-ml/petal/runs (or set training.output)" .Values.outputPrefix -}}
{{- printf "%s/%s" (trimSuffix "/" $prefix) (include "petal.name" .) -}}
{{- end -}}
{{- end -}}

{{/* Every `training` value as the trainer's own flag, quoted (a value holding " #" stays whole):
     camelCase key → --kebab-case=value, true/false → --flag/--no-flag, null → the trainer's default.
     Numbers go through toJson: helm reads them as floats, whose %v would turn 1000000 into 1e+06. */}}
{{- define "petal.trainerArgs" -}}
{{- $data := required "training.data is required: the s3:// prefix of a dataset written by scripts/upload_dataset.py" .Values.training.data -}}
{{- $training := merge (dict "output" (include "petal.output" .)) (omit .Values.training "output") -}}
{{- range $key, $value := $training }}
{{- if kindIs "bool" $value }}
- {{ printf "--%s%s" (ternary "" "no-" $value) (kebabcase $key) | quote }}
{{- else if not (kindIs "invalid" $value) }}
- {{ printf "--%s=%s" (kebabcase $key) (ternary $value (toJson $value) (kindIs "string" $value)) | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The container's environment: storage settings the way every petal tool reads them (credentials
     only by secretKeyRef, or none: the pod's identity), MLflow's the way its client reads them, then
     extraEnv. */}}
{{- define "petal.env" -}}
- name: S3_ENDPOINT_URL
  value: {{ .Values.s3.endpoint | quote }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- with (include "petal.secretName" .) }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_SECRET_ACCESS_KEY
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_SESSION_TOKEN
      optional: true
{{- end }}
{{- if or .Values.s3.caBundle.secret .Values.s3.caBundle.configMap }}
- name: AWS_CA_BUNDLE
  value: {{ printf "/etc/petal/ca/%s" .Values.s3.caBundle.key | quote }}
{{- end }}
{{- with .Values.mlflow.trackingUri }}
- name: MLFLOW_TRACKING_URI
  value: {{ . | quote }}
{{- end }}
{{- with $secret := .Values.mlflow.existingSecret }}
{{- range $key := list "MLFLOW_TRACKING_USERNAME" "MLFLOW_TRACKING_PASSWORD" "MLFLOW_TRACKING_TOKEN" }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes every petal pod mounts besides its own: the CA bundle, then extraVolumes. */}}
{{- define "petal.extraVolumes" -}}
{{- with .Values.s3.caBundle }}
{{- if .secret }}
- name: ca-bundle
  secret:
    secretName: {{ .secret }}
{{- else if .configMap }}
- name: ca-bundle
  configMap:
    name: {{ .configMap }}
{{- end }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "petal.extraVolumeMounts" -}}
{{- if or .Values.s3.caBundle.secret .Values.s3.caBundle.configMap }}
- name: ca-bundle
  mountPath: /etc/petal/ca
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The launcher: torchrun (through training.launch, which keeps the trainer's exit codes) starts the
     pod's processes from the operator's PET_* settings and gives each its own RANK and WORLD_SIZE. */}}
{{- define "petal.launchCommand" -}}
["python", "-m", "training.launch", "-m", "training"]
{{- end -}}

{{- define "petal.podLabels" -}}
{{ include "petal.labels" . }}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* CPU threads per training process: its share of the pod's CPU request (at least one). torch
     otherwise starts a thread per core of the node, and several ranks on a node oversubscribe it. */}}
{{- define "petal.threadsPerProcess" -}}
{{- $processes := int (include "petal.processCount" .) -}}
{{- $cpu := toString (.Values.resources.requests.cpu | default (mul $processes .Values.perProcess.cpu)) -}}
{{- $millicores := hasSuffix "m" $cpu | ternary (trimSuffix "m" $cpu | int) (mulf (float64 $cpu) 1000 | int) -}}
{{- max 1 (div $millicores (mul 1000 $processes)) -}}
{{- end -}}

{{/* The training container's environment: storage, then the node-local cache, the threads per
     process, then the pod's grace period, which the launcher gives its ranks to save after SIGTERM
     (training/launch.py). A queued TrainJob has its runtime's grace period, and the runtime says so itself. */}}
{{- define "petal.containerEnv" -}}
{{ include "petal.env" . | trim }}
- name: PETAL_CACHE_DIR
  value: /cache
- name: OMP_NUM_THREADS
  value: {{ include "petal.threadsPerProcess" . | quote }}
{{- if not (and (eq .Values.api "TrainJob") .Values.queue) }}
- name: PETAL_TERMINATION_GRACE_SECONDS
  value: {{ .Values.terminationGracePeriodSeconds | quote }}
{{- end }}
{{- with .Values.nccl.debug }}
- name: NCCL_DEBUG
  value: {{ . | quote }}
{{- end }}
{{- with .Values.nccl.socketIfname }}
- name: NCCL_SOCKET_IFNAME
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The ResourceClaimTemplate each pod claims its GPUs from, where they come through DRA. */}}
{{- define "petal.gpuClaimTemplate" -}}
{{ include "petal.name" . }}-gpus
{{- end -}}

{{/* The container's securityContext, with IPC_LOCK added where RDMA devices are asked for. */}}
{{- define "petal.securityContext" -}}
{{- $context := deepCopy .Values.securityContext }}
{{- if .Values.nccl.rdmaResources }}
{{- $capabilities := $context.capabilities | default dict }}
{{- $_ := set $capabilities "add" (append ($capabilities.add | default list) "IPC_LOCK" | uniq) }}
{{- $_ := set $context "capabilities" $capabilities }}
{{- end }}
{{- toYaml $context }}
{{- end -}}

{{/* Requests sized for the pod's processes (perProcess), unless resources.requests says otherwise; a
     memory limit equal to the memory request unless resources.limits names one (null: none), so a
     pod out of memory is a clean, retried 137 and not a node under pressure. */}}
{{- define "petal.resources" -}}
{{- $processes := int (include "petal.processCount" .) -}}
{{- $memory := .Values.resources.requests.memory | default (printf "%dGi" (mul $processes .Values.perProcess.memoryGiB)) -}}
requests:
  {{- if .Values.resources.requests }}
  {{- toYaml .Values.resources.requests | nindent 2 }}
  {{- else }}
  cpu: {{ mul $processes .Values.perProcess.cpu | quote }}
  memory: {{ $memory }}
  {{- end }}
  {{- if not (hasKey .Values.resources.requests "ephemeral-storage") }}
  ephemeral-storage: {{ .Values.cacheSize }}
  {{- end }}
{{- $limits := omit .Values.resources.limits "memory" }}
{{- if not (hasKey .Values.resources.limits "memory") }}
{{- $_ := set $limits "memory" $memory }}
{{- else if not (kindIs "invalid" .Values.resources.limits.memory) }}
{{- $_ := set $limits "memory" .Values.resources.limits.memory }}
{{- end }}
{{- if and .Values.gpusPerReplica (not .Values.gpus.deviceClass) }}
{{- $_ := set $limits "nvidia.com/gpu" .Values.gpusPerReplica }}
{{- end }}
{{- range $name, $count := .Values.nccl.rdmaResources }}
{{- $_ := set $limits $name $count }}
{{- end }}
{{- with $limits }}
limits:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .Values.gpus.deviceClass }}
claims:
  - name: gpus
{{- end }}
{{- end -}}

{{- define "petal.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: cache
  mountPath: /cache
- name: tmp
  mountPath: /tmp
{{- with (include "petal.extraVolumeMounts" . | trim) }}
{{ . }}
{{- end }}
{{- end -}}

{{- define "petal.volumes" -}}
{{- $processes := int (include "petal.processCount" .) -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize | default (printf "%dGi" (mul $processes .Values.perProcess.shmGiB)) }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cacheSize }}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- with (include "petal.extraVolumes" . | trim) }}
{{ . }}
{{- end }}
{{- end -}}

{{/* tolerations plus, for GPU pods, the nvidia.com/gpu taint's (gpuToleration). */}}
{{- define "petal.tolerations" -}}
{{- $tolerations := .Values.tolerations }}
{{- if and .Values.gpusPerReplica .Values.gpuToleration }}
{{- $tolerations = append $tolerations (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") }}
{{- end }}
{{- with $tolerations }}{{ toYaml . }}{{ end }}
{{- end -}}

{{/* The pod's metadata, for both kinds: Kueue reads a pod set's topology request from its template. */}}
{{- define "petal.podMetadata" -}}
{{- $annotations := deepCopy (.Values.podAnnotations | default dict) }}
{{- with .Values.topology }}
{{- if and .required .preferred }}
{{- fail (printf "topology.required (%s) and topology.preferred (%s): set one" .required .preferred) }}
{{- end }}
{{- if and (or .required .preferred) (not $.Values.queue) }}
{{- fail (printf "topology %s needs a queue: only Kueue places pods by topology" (.required | default .preferred)) }}
{{- end }}
{{- with .required }}{{ $_ := set $annotations "kueue.x-k8s.io/podset-required-topology" . }}{{ end }}
{{- with .preferred }}{{ $_ := set $annotations "kueue.x-k8s.io/podset-preferred-topology" . }}{{ end }}
{{- end }}
labels:
  {{- include "petal.podLabels" . | nindent 2 }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Every pod setting but the containers, the same for both kinds (a PyTorchJob's pod template, a
     TrainJob's runtime patch): a setting added here reaches both. Trainer v2.3's runtime patches
     carry a subset of a pod spec; what they lack is the runtime's (petal's sets no API token) or
     refused for a TrainJob with the reason (trainjob.yaml). petal's pods never call the Kubernetes
     API, so no API token is mounted, whichever ServiceAccount they run as (IRSA's and Pod
     Identity's tokens are mounted apart). A queued TrainJob keeps its runtime's grace period: Kueue
     (v0.19) rewrites it through Trainer v2.2's API, which lacks the field. */}}
{{- define "petal.podSpec" -}}
{{- $pytorchjob := eq .Values.api "PyTorchJob" -}}
{{- if not (and (not $pytorchjob) .Values.queue) }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- with (include "petal.serviceAccountName" .) }}
serviceAccountName: {{ . }}
{{- end }}
{{- if $pytorchjob }}
automountServiceAccountToken: false
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- if .Values.nccl.hostNetwork }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- if .Values.gpus.deviceClass }}
resourceClaims:
  - name: gpus
    resourceClaimTemplateName: {{ include "petal.gpuClaimTemplate" . }}
{{- end }}
volumes:
  {{- include "petal.volumes" . | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (include "petal.tolerations" .) }}
tolerations:
  {{- . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The training container's settings that live in the pod spec for both kinds (a TrainJob takes its
     image, command, arguments, environment and resources in spec.trainer). */}}
{{- define "petal.containerSpec" -}}
securityContext:
  {{- include "petal.securityContext" . | nindent 2 }}
volumeMounts:
  {{- include "petal.volumeMounts" . | nindent 2 }}
{{- end -}}

{{- define "petal.podTemplate" -}}
metadata:
  {{- include "petal.podMetadata" . | nindent 2 }}
spec:
  {{- include "petal.podSpec" . | nindent 2 }}
  containers:
    - name: pytorch  # the name the operator requires
      image: {{ include "petal.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      {{- /* The operator's own RANK counts pods, not processes: several per pod need the launcher. */}}
      {{- if or (ne (include "petal.nprocPerNode" .) "1") .Values.elasticPolicy }}
      command: {{ include "petal.launchCommand" . }}
      {{- end }}
      args:
        {{- include "petal.trainerArgs" . | trim | nindent 8 }}
      env:
        {{- include "petal.containerEnv" . | nindent 8 }}
      {{- with .Values.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- include "petal.resources" . | nindent 8 }}
      {{- include "petal.containerSpec" . | nindent 6 }}
{{- end -}}
