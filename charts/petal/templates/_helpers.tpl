{{/* The job's name: the release name, cut to a DNS-1035 label short enough for "<job>-worker-NN" pods. */}}
{{- define "petal.name" -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
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

{{- define "petal.secretName" -}}
{{- if .Values.s3.createSecret }}{{ printf "%s-s3" (include "petal.name" .) }}{{ else }}{{ .Values.s3.existingSecret }}{{ end -}}
{{- end -}}

{{- define "petal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ .Values.serviceAccount.name | default (include "petal.name" .) }}{{ else }}{{ .Values.serviceAccount.name }}{{ end -}}
{{- end -}}

{{- define "petal.output" -}}
{{- .Values.training.output | default (printf "%s/%s" (trimSuffix "/" .Values.outputPrefix) (include "petal.name" .)) -}}
{{- end -}}

{{/* Every `training` value as the trainer's own flag, quoted (a value holding " #" stays whole):
     camelCase key → --kebab-case=value, true/false → --flag/--no-flag, null → the trainer's default.
     Numbers go through toJson: helm reads them as floats, whose %v would turn 1000000 into 1e+06. */}}
{{- define "petal.trainerArgs" -}}
{{- $training := merge (dict "output" (include "petal.output" .)) (omit .Values.training "output") -}}
{{- range $key, $value := $training }}
{{- if kindIs "bool" $value }}
- {{ printf "--%s%s" (ternary "" "no-" $value) (kebabcase $key) | quote }}
{{- else if not (kindIs "invalid" $value) }}
- {{ printf "--%s=%s" (kebabcase $key) (ternary $value (toJson $value) (kindIs "string" $value)) | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Storage settings, the way the trainer and every petal tool read them; credentials only by secretKeyRef. */}}
{{- define "petal.s3Env" -}}
- name: S3_ENDPOINT_URL
  value: {{ .Values.s3.endpoint | quote }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "petal.secretName" . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "petal.secretName" . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end -}}

{{- define "petal.podTemplate" -}}
metadata:
  labels:
    {{- include "petal.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
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
    - name: pytorch  # the name the PyTorchJob operator requires
      image: {{ include "petal.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      {{- /* torchrun (through training.launch, which keeps the trainer's exit codes) starts the pod's
             processes from the operator's PET_* settings and gives each its own RANK and WORLD_SIZE;
             the operator's own RANK counts pods, not processes. */}}
      {{- if or (ne (toString .Values.nprocPerNode) "1") .Values.elasticPolicy }}
      command: ["python", "-m", "training.launch", "-m", "training"]
      {{- end }}
      args:
        {{- include "petal.trainerArgs" . | nindent 8 }}
      env:
        {{- include "petal.s3Env" . | nindent 8 }}
        - name: PETAL_CACHE_DIR
          value: /cache
      resources:
        requests:
          {{- toYaml .Values.resources.requests | nindent 10 }}
        {{- if or .Values.resources.limits .Values.gpusPerReplica }}
        limits:
          {{- with .Values.resources.limits }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
          {{- if .Values.gpusPerReplica }}
          nvidia.com/gpu: {{ .Values.gpusPerReplica }}
          {{- end }}
        {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: cache
          mountPath: /cache
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.shmSize }}
    - name: cache
      emptyDir:
        sizeLimit: {{ .Values.cacheSize }}
    - name: tmp
      emptyDir:
        sizeLimit: 1Gi
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
