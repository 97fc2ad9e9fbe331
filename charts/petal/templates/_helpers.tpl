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

{{- define "petal.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
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
     only by secretKeyRef, or none: the pod's identity), then extraEnv. */}}
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

{{/* The training container's environment: storage, then the node-local cache. */}}
{{- define "petal.containerEnv" -}}
{{ include "petal.env" . | trim }}
- name: PETAL_CACHE_DIR
  value: /cache
{{- end -}}

{{/* Requests sized for the pod's processes (perProcess), unless resources.requests says otherwise. */}}
{{- define "petal.resources" -}}
{{- $processes := int (include "petal.processCount" .) -}}
requests:
  {{- if .Values.resources.requests }}
  {{- toYaml .Values.resources.requests | nindent 2 }}
  {{- else }}
  cpu: {{ mul $processes .Values.perProcess.cpu | quote }}
  memory: {{ printf "%dGi" (mul $processes .Values.perProcess.memoryGiB) }}
  {{- end }}
  {{- if not (hasKey .Values.resources.requests "ephemeral-storage") }}
  ephemeral-storage: {{ .Values.cacheSize }}
  {{- end }}
{{- if or .Values.resources.limits .Values.gpusPerReplica }}
limits:
  {{- with .Values.resources.limits }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- if .Values.gpusPerReplica }}
  nvidia.com/gpu: {{ .Values.gpusPerReplica }}
  {{- end }}
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

{{- define "petal.podTemplate" -}}
metadata:
  labels:
    {{- include "petal.podLabels" . | nindent 4 }}
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  {{- with (include "petal.serviceAccountName" .) }}
  serviceAccountName: {{ . }}
  {{- else }}
  automountServiceAccountToken: false
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
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
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "petal.volumeMounts" . | nindent 8 }}
  volumes:
    {{- include "petal.volumes" . | nindent 4 }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (include "petal.tolerations" .) }}
  tolerations:
    {{- . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
