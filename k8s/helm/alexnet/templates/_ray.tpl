{{/* The Ray cluster: its pods, `ray start` parameters, environment, and the training entrypoint. */}}

{{/* Ray token authentication: every Ray pod and client. KubeRay only injects these when absent. */}}
{{- define "alexnet.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
{{ include "alexnet.envFromSecret" (dict "name" "RAY_AUTH_TOKEN" "secret" .Values.secrets.rayAuth.existingSecret "key" "auth_token") }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- end }}

{{/* Full environment of a Ray container: (dict "root" $ "nccl" true|false); NCCL settings go to the GPU workers only. */}}
{{- define "alexnet.rayEnv" -}}
{{- $root := .root -}}
{{ include "alexnet.rayAuthEnv" $root }}
{{ include "alexnet.s3Env" $root }}
{{ include "alexnet.mlflowClientEnv" $root }}
{{- if .nccl }}
{{- range $name, $value := $root.Values.ray.worker.ncclEnv }}
- name: {{ $name }}
  value: {{ toString $value | quote }}
{{- end }}
{{- end }}
{{- with $root.Values.ray.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* `ray start` parameters: the chart's own (num-cpus, num-gpus, object-store-memory; validated not to be
     overridden) then the group's extra ones: (dict "own" (dict ...) "extra" <rayStartParams>). */}}
{{- define "alexnet.rayStartParams" -}}
{{- range $key, $value := merge (dict) .own .extra }}
{{ $key }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Pod template of a Ray node: (dict "root" $ "component" "ray-head"|"ray-worker" "group" <values> "sizing" <dict>). */}}
{{- define "alexnet.rayPodTemplate" -}}
{{- $root := .root }}
{{- $g := .group -}}
{{- $isWorker := eq .component "ray-worker" -}}
metadata:
  labels:
    {{- include "alexnet.componentLabels" (list $root .component) | nindent 4 }}
spec:
  {{- include "alexnet.podCommon" $root | nindent 2 }}
  securityContext:
    {{- include "alexnet.podSecurityContext" (dict "runAsUser" 1000 "runAsGroup" 100 "fsGroup" 100) | nindent 4 }}
  {{- with include "alexnet.scheduling" $g | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  containers:
    - name: ray
      image: {{ include "alexnet.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- include "alexnet.containerSecurityContext" (dict "addCapabilities" (and $isWorker $g.ipcLock (list "IPC_LOCK"))) | nindent 8 }}
      env:
        {{- include "alexnet.rayEnv" (dict "root" $root "nccl" $isWorker) | nindent 8 }}
      {{- if not $isWorker }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
      {{- end }}
      resources:
        {{- $extra := dict }}
        {{- if $isWorker }}
        {{- $extra = merge (dict $g.gpuResourceName $g.gpusPerPod) $g.extraResources }}
        {{- end }}
        {{- include "alexnet.resources" (dict "cpu" $g.cpu "memory" $g.memory "extra" $extra) | nindent 8 }}
      volumeMounts:
        {{- include "alexnet.volumeMounts" (dict "root" $root "dataReadOnly" true) | nindent 8 }}
  volumes:
    {{- include "alexnet.volumes" (dict "root" $root "shmBytes" .sizing.shmBytes "dataReadOnly" true) | nindent 4 }}
{{- end }}

{{/* spec of a RayCluster (also RayJob.spec.rayClusterSpec). */}}
{{- define "alexnet.rayClusterSpec" -}}
{{- $sizing := fromJson (include "alexnet.sizing" .) -}}
{{- $w := .Values.ray.worker -}}
rayVersion: {{ .Values.ray.version | quote }}
enableInTreeAutoscaling: false
authOptions:
  mode: token
  secretName: {{ .Values.secrets.rayAuth.existingSecret }}
headGroupSpec:
  serviceType: ClusterIP
  rayStartParams:
    {{- /* num-cpus 0: the head runs the driver, GCS and dashboard; Ray never schedules reads, decode or training there. */}}
    {{- $own := dict "dashboard-host" "0.0.0.0" "num-cpus" "0" "num-gpus" "0" "object-store-memory" (int64 $sizing.head.storeBytes) }}
    {{- include "alexnet.rayStartParams" (dict "own" $own "extra" .Values.ray.head.rayStartParams) | trim | nindent 4 }}
  template:
    {{- include "alexnet.rayPodTemplate" (dict "root" . "component" "ray-head" "group" .Values.ray.head "sizing" $sizing.head) | nindent 4 }}
workerGroupSpecs:
  - groupName: {{ $w.groupName }}
    replicas: {{ int64 $sizing.worker.pods }}
    minReplicas: {{ int64 $sizing.worker.pods }}
    maxReplicas: {{ int64 $sizing.worker.pods }}
    rayStartParams:
      {{- $own := dict "num-cpus" (int64 $sizing.worker.rayCpus) "num-gpus" (int $w.gpusPerPod) "object-store-memory" (int64 $sizing.worker.storeBytes) }}
      {{- include "alexnet.rayStartParams" (dict "own" $own "extra" $w.rayStartParams) | trim | nindent 6 }}
    template:
      {{- include "alexnet.rayPodTemplate" (dict "root" . "component" "ray-worker" "group" $w "sizing" $sizing.worker) | nindent 6 }}
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
cluster.cpus_per_worker={{ $t.cpusPerWorker }}
parallel.towers={{ int $t.towers }}
parallel.replicas={{ int $t.replicas }}
parallel.allow_cross_node_towers={{ $t.allowCrossNodeTowers }}
parallel.grad_compression={{ $t.gradCompression }}
train.epochs={{ int $t.epochs }}
train.batch_size={{ int $t.batchSize }}
train.compile={{ if kindIs "bool" $t.compile }}{{ $t.compile }}{{ else }}null{{ end }}
data.root={{ $t.dataRoot }}
data.decode_concurrency={{ int $t.decodeConcurrency }}
{{- with include "alexnet.s3Endpoint" . }}
data.s3_endpoint={{ . }}
{{- end }}
data.s3_region={{ .Values.s3.region }}
data.s3_max_attempts={{ int .Values.s3.maxAttempts }}
storage.path={{ $t.storagePath }}
tracking.uri={{ include "alexnet.trackingUri" . }}
tracking.experiment={{ $t.experimentName }}
run.name={{ include "alexnet.runName" . }}
run.resume={{ $t.resume }}
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
