{{/* ---------- names and labels ---------- */}}

{{/* Chart name, overridable. */}}
{{- define "alexnet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every resource: <release>-<chart> (or the release name if it already contains the chart name). */}}
{{- define "alexnet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels that select the release's pods (NetworkPolicies use these). */}}
{{- define "alexnet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "alexnet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels of every object. */}}
{{- define "alexnet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "alexnet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: alexnet
{{- end }}

{{/* Labels of one component: (list $ "component"). */}}
{{- define "alexnet.componentLabels" -}}
{{- $root := index . 0 -}}
{{ include "alexnet.labels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Selector labels of one component: (list $ "component"). */}}
{{- define "alexnet.componentSelector" -}}
{{- $root := index . 0 -}}
{{ include "alexnet.selectorLabels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "alexnet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "alexnet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "alexnet.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}

{{- define "alexnet.mlflowServiceName" -}}
{{ include "alexnet.fullname" . }}-mlflow
{{- end }}

{{- define "alexnet.minioServiceName" -}}
{{ include "alexnet.fullname" . }}-minio
{{- end }}

{{- define "alexnet.postgresServiceName" -}}
{{ include "alexnet.fullname" . }}-postgres
{{- end }}

{{/* ---------- derived settings ---------- */}}

{{/* Tracking URI the training pods use: the in-chart MLflow service or the external one. */}}
{{- define "alexnet.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
http://{{ include "alexnet.mlflowServiceName" . }}.{{ .Release.Namespace }}.svc:{{ .Values.mlflow.port }}
{{- else -}}
{{ .Values.tracking.externalUri }}
{{- end }}
{{- end }}

{{/* S3 endpoint of the release's clients: the bundled MinIO, else s3.endpoint (may be empty = AWS). */}}
{{- define "alexnet.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
http://{{ include "alexnet.minioServiceName" . }}.{{ .Release.Namespace }}.svc:{{ .Values.minio.port }}
{{- else -}}
{{ .Values.s3.endpoint }}
{{- end }}
{{- end }}

{{- define "alexnet.runName" -}}
{{ default .Release.Name .Values.training.runName }}
{{- end }}

{{/* Number of GPU worker pods: replicas × towers / gpusPerPod (validated to divide). */}}
{{- define "alexnet.workerPods" -}}
{{ div (mul (int .Values.training.replicas) (int .Values.training.towers)) (int .Values.ray.worker.gpusPerPod) }}
{{- end }}

{{/* The Hydra overrides of `python -m service.train`, one per line. */}}
{{- define "alexnet.trainOverrides" -}}
{{- $t := .Values.training -}}
{{- if $t.experiment }}
experiment={{ $t.experiment }}
{{- end }}
model={{ $t.model }}
recipe={{ $t.recipe }}
cluster={{ $t.cluster }}
parallel.towers={{ int $t.towers }}
parallel.replicas={{ int $t.replicas }}
train.epochs={{ int $t.epochs }}
train.batch_size={{ int $t.batchSize }}
data.root={{ $t.dataRoot }}
{{- with include "alexnet.s3Endpoint" . }}
data.s3_endpoint={{ . }}
{{- end }}
data.s3_region={{ .Values.s3.region }}
storage.path={{ $t.storagePath }}
tracking.uri={{ include "alexnet.trackingUri" . }}
tracking.experiment={{ $t.experimentName }}
run.name={{ include "alexnet.runName" . }}
{{- range $t.extraOverrides }}
{{ . }}
{{- end }}
{{- end }}

{{/* The RayJob entrypoint: every override single-quoted for the shell Ray runs it in. */}}
{{- define "alexnet.entrypoint" -}}
{{- $args := list -}}
{{- range splitList "\n" (include "alexnet.trainOverrides" . | trim) -}}
{{- $args = append $args (squote .) -}}
{{- end -}}
python -m service.train {{ join " " $args }}
{{- end }}

{{/* ---------- validation (cross-field rules the JSON schema cannot express) ---------- */}}

{{- define "alexnet.validate" -}}
{{- $t := .Values.training -}}
{{- $towers := int $t.towers -}}
{{- $replicas := int $t.replicas -}}
{{- $gpus := int .Values.ray.worker.gpusPerPod -}}
{{- $world := mul $towers $replicas -}}
{{- if lt $replicas 1 }}
{{- fail (printf "training.replicas=%d: need at least 1 replica" $replicas) }}
{{- end }}
{{- if not (has $towers (list 1 2 4 8)) }}
{{- fail (printf "training.towers=%d: choose 1, 2, 4 or 8" $towers) }}
{{- end }}
{{- if lt $gpus 1 }}
{{- fail (printf "ray.worker.gpusPerPod=%d: need at least 1 GPU per worker pod" $gpus) }}
{{- end }}
{{- if mod $gpus $towers }}
{{- fail (printf "ray.worker.gpusPerPod=%d is not a multiple of training.towers=%d: the towers of one replica must share a worker pod (one node, NVLink); use gpusPerPod=%d or a multiple of it" $gpus $towers $towers) }}
{{- end }}
{{- if mod $world $gpus }}
{{- fail (printf "world size replicas×towers = %d×%d = %d GPUs does not fill worker pods of ray.worker.gpusPerPod=%d GPUs; use gpusPerPod=%d or make replicas a multiple of %d" $replicas $towers $world $gpus $towers (div $gpus $towers)) }}
{{- end }}
{{- if mod (int $t.batchSize) $replicas }}
{{- fail (printf "training.batchSize=%d does not divide over training.replicas=%d" (int $t.batchSize) $replicas) }}
{{- end }}
{{- if not (hasPrefix "s3://" $t.storagePath) }}
{{- fail (printf "training.storagePath=%q must be an s3:// URI: checkpoints must outlive the Ray pods" $t.storagePath) }}
{{- end }}
{{- if not $t.dataRoot }}
{{- fail "training.dataRoot is required (the shards root written by the ingest job, e.g. s3://imagenet/shards-root)" }}
{{- end }}
{{- if not .Values.secrets.s3.existingSecret }}
{{- fail "secrets.s3.existingSecret is required: the name of a Secret with the S3 keys (see docs/kubernetes.md)" }}
{{- end }}
{{- if not .Values.secrets.rayAuth.existingSecret }}
{{- fail "secrets.rayAuth.existingSecret is required: the name of a Secret with the Ray auth token under key auth_token" }}
{{- end }}
{{- if .Values.mlflow.enabled }}
{{- if not .Values.mlflow.auth.existingSecret }}
{{- fail "mlflow.auth.existingSecret is required: the name of a Secret with the MLflow admin password and Flask secret key" }}
{{- end }}
{{- if not .Values.mlflow.artifactsDestination }}
{{- fail "mlflow.artifactsDestination is required: an s3:// URI for MLflow artifacts" }}
{{- end }}
{{- if and (not .Values.postgresql.enabled) (not .Values.mlflow.database.existingSecret) }}
{{- fail "mlflow.database.existingSecret is required (a Secret with the Postgres DSN), or set postgresql.enabled=true" }}
{{- end }}
{{- else if not .Values.tracking.externalUri }}
{{- fail "tracking.externalUri is required when mlflow.enabled is false" }}
{{- end }}
{{- if and .Values.postgresql.enabled (not .Values.postgresql.auth.existingSecret) }}
{{- fail "postgresql.auth.existingSecret is required when postgresql.enabled is true" }}
{{- end }}
{{- if and .Values.ingest.enabled (not .Values.ingest.source) }}
{{- fail "ingest.source is required when ingest.enabled is true" }}
{{- end }}
{{- end }}

{{/* ---------- pod building blocks ---------- */}}

{{/* Pod-level security context of every pod: non-root, RuntimeDefault seccomp. */}}
{{- define "alexnet.podSecurityContext" -}}
runAsNonRoot: true
{{- with .runAsUser }}
runAsUser: {{ . }}
runAsGroup: {{ $.runAsGroup | default . }}
fsGroup: {{ $.fsGroup | default . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context of every container. */}}
{{- define "alexnet.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Equal requests and limits: (dict "cpu" .. "memory" .. "gpu" n "gpuName" ..). */}}
{{- define "alexnet.resources" -}}
{{- $r := dict "cpu" (toString .cpu) "memory" (toString .memory) }}
{{- if .gpu }}
{{- $_ := set $r .gpuName (toString .gpu) }}
{{- end -}}
requests:
  {{- toYaml $r | nindent 2 }}
limits:
  {{- toYaml $r | nindent 2 }}
{{- end }}

{{- define "alexnet.envFromSecret" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end }}

{{/* S3 client environment (keys from the Secret, endpoint/region as plain values). */}}
{{- define "alexnet.s3Env" -}}
{{ include "alexnet.envFromSecret" (dict "name" "AWS_ACCESS_KEY_ID" "secret" .Values.secrets.s3.existingSecret "key" .Values.secrets.s3.accessKeyIdKey) }}
{{ include "alexnet.envFromSecret" (dict "name" "AWS_SECRET_ACCESS_KEY" "secret" .Values.secrets.s3.existingSecret "key" .Values.secrets.s3.secretAccessKeyKey) }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
{{- with include "alexnet.s3Endpoint" . }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* MLflow client environment of the training pods. */}}
{{- define "alexnet.mlflowClientEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "alexnet.trackingUri" . | quote }}
{{- if .Values.tracking.credentials.existingSecret }}
{{ include "alexnet.envFromSecret" (dict "name" "MLFLOW_TRACKING_USERNAME" "secret" .Values.tracking.credentials.existingSecret "key" .Values.tracking.credentials.usernameKey) }}
{{ include "alexnet.envFromSecret" (dict "name" "MLFLOW_TRACKING_PASSWORD" "secret" .Values.tracking.credentials.existingSecret "key" .Values.tracking.credentials.passwordKey) }}
{{- else if .Values.mlflow.enabled }}
- name: MLFLOW_TRACKING_USERNAME
  value: {{ .Values.mlflow.auth.adminUsername | quote }}
{{ include "alexnet.envFromSecret" (dict "name" "MLFLOW_TRACKING_PASSWORD" "secret" .Values.mlflow.auth.existingSecret "key" .Values.mlflow.auth.adminPasswordKey) }}
{{- end }}
- name: MLFLOW_DISABLE_TELEMETRY
  value: "true"
{{- end }}

{{/* Ray token authentication: every Ray pod and client. KubeRay only injects these when absent. */}}
{{- define "alexnet.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
{{ include "alexnet.envFromSecret" (dict "name" "RAY_AUTH_TOKEN" "secret" .Values.secrets.rayAuth.existingSecret "key" "auth_token") }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- end }}

{{/* Full environment of the Ray head and worker containers. */}}
{{- define "alexnet.rayEnv" -}}
{{ include "alexnet.rayAuthEnv" . }}
{{ include "alexnet.s3Env" . }}
{{ include "alexnet.mlflowClientEnv" . }}
{{- with .Values.ray.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod spec fields shared by every pod of the release. */}}
{{- define "alexnet.podCommon" -}}
serviceAccountName: {{ include "alexnet.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod template of a Ray node: (dict "root" $ "component" "ray-head"|"ray-worker" "group" <values> "gpu" n). */}}
{{- define "alexnet.rayPodTemplate" -}}
{{- $root := .root }}
{{- $g := .group -}}
metadata:
  labels:
    {{- include "alexnet.componentLabels" (list $root .component) | nindent 4 }}
spec:
  {{- include "alexnet.podCommon" $root | nindent 2 }}
  securityContext:
    {{- include "alexnet.podSecurityContext" (dict "runAsUser" 1000 "runAsGroup" 100 "fsGroup" 100) | nindent 4 }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray
      image: {{ include "alexnet.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- include "alexnet.containerSecurityContext" $root | nindent 8 }}
      env:
        {{- include "alexnet.rayEnv" $root | nindent 8 }}
      {{- if eq .component "ray-head" }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
      {{- end }}
      resources:
        {{- include "alexnet.resources" (dict "cpu" $g.cpu "memory" $g.memory "gpu" .gpu "gpuName" $root.Values.ray.worker.gpuResourceName) | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: ray-logs
          mountPath: /tmp/ray
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        {{- with $g.sharedMemory }}
        sizeLimit: {{ . }}
        {{- end }}
    - name: ray-logs
      emptyDir: {}
{{- end }}

{{/* spec of a RayCluster (also RayJob.spec.rayClusterSpec). */}}
{{- define "alexnet.rayClusterSpec" -}}
rayVersion: {{ .Values.ray.version | quote }}
enableInTreeAutoscaling: false
authOptions:
  mode: token
  secretName: {{ .Values.secrets.rayAuth.existingSecret }}
headGroupSpec:
  serviceType: ClusterIP
  rayStartParams:
    dashboard-host: "0.0.0.0"
    {{- range $k, $v := .Values.ray.head.rayStartParams }}
    {{ $k }}: {{ $v | toString | quote }}
    {{- end }}
  template:
    {{- include "alexnet.rayPodTemplate" (dict "root" . "component" "ray-head" "group" .Values.ray.head "gpu" 0) | nindent 4 }}
workerGroupSpecs:
  - groupName: {{ .Values.ray.worker.groupName }}
    replicas: {{ include "alexnet.workerPods" . }}
    minReplicas: {{ include "alexnet.workerPods" . }}
    maxReplicas: {{ include "alexnet.workerPods" . }}
    rayStartParams:
      {{- range $k, $v := .Values.ray.worker.rayStartParams }}
      {{ $k }}: {{ $v | toString | quote }}
      {{- else }}
      {}
      {{- end }}
    template:
      {{- include "alexnet.rayPodTemplate" (dict "root" . "component" "ray-worker" "group" .Values.ray.worker "gpu" (int .Values.ray.worker.gpusPerPod)) | nindent 6 }}
{{- end }}
