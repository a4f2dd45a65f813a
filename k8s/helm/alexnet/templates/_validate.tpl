{{/* Cross-field rules values.schema.json cannot express. Each failure names the values and what would fit.
     Single-field rules (allowed towers, enums, patterns) live in values.schema.json only. */}}

{{- define "alexnet.validate" -}}
{{- include "alexnet.validateLayout" . -}}
{{- include "alexnet.validateSizing" . -}}
{{- include "alexnet.validateRayStartParams" . -}}
{{- include "alexnet.validateStorage" . -}}
{{- include "alexnet.validateSecrets" . -}}
{{- end }}

{{/* replicas × towers over worker pods of gpusPerPod GPUs: a replica's towers never span pods. */}}
{{- define "alexnet.validateLayout" -}}
{{- $t := .Values.training -}}
{{- $towers := int $t.towers -}}
{{- $replicas := int $t.replicas -}}
{{- $gpus := int .Values.ray.worker.gpusPerPod -}}
{{- $world := mul $towers $replicas -}}
{{- if mod $gpus $towers }}
{{- fail (printf "ray.worker.gpusPerPod=%d is not a multiple of training.towers=%d: the towers of one replica must share a worker pod (one node, NVLink); use gpusPerPod=%d or a multiple of it (e.g. all GPUs of a node)" $gpus $towers $towers) }}
{{- end }}
{{- if mod $world $gpus }}
{{- fail (printf "world size replicas×towers = %d×%d = %d GPUs does not fill worker pods of ray.worker.gpusPerPod=%d GPUs; make replicas a multiple of %d (gpusPerPod/towers), or use gpusPerPod=%d" $replicas $towers $world $gpus (div $gpus $towers) (ternary $world $towers (lt $world $gpus))) }}
{{- end }}
{{- if mod (int $t.batchSize) $replicas }}
{{- fail (printf "training.batchSize=%d does not divide over training.replicas=%d; use a multiple of %d" (int $t.batchSize) $replicas $replicas) }}
{{- end }}
{{- end }}

{{/* CPU and memory of every Ray pod (numbers from "alexnet.sizing"). */}}
{{- define "alexnet.validateSizing" -}}
{{- $sizing := fromJson (include "alexnet.sizing" .) -}}
{{- $w := $sizing.worker -}}
{{- $v := .Values.ray.worker -}}
{{- $neededMilli := addf $w.trainingMilli (mulf $w.minDecodeCpus 1000) -}}
{{- if lt (mulf $w.rayCpus 1000) $neededMilli }}
{{- $decodeWhy := printf "ray.worker.minDecodeCpusPerGpu=%v × %v GPUs, with training.decodeConcurrency=0 (auto)" $v.minDecodeCpusPerGpu $w.gpus -}}
{{- if gt (int .Values.training.decodeConcurrency) 0 }}
{{- $decodeWhy = printf "training.decodeConcurrency=%v over %v worker pods" .Values.training.decodeConcurrency $w.pods -}}
{{- end }}
{{- fail (printf "ray.worker.cpu=%v is too small: each worker pod needs %v GPUs × training.cpusPerWorker=%v = %v CPUs for the training workers + %v decode CPUs (%s) = %v CPUs; set ray.worker.cpu to at least %v (Ray counts whole CPUs), or lower training.cpusPerWorker or the decode CPUs" $v.cpu $w.gpus .Values.training.cpusPerWorker (divf $w.trainingMilli 1000) $w.minDecodeCpus $decodeWhy (divf $neededMilli 1000) (ceil (divf $neededMilli 1000))) }}
{{- end }}
{{- include "alexnet.validateMemory" (dict "name" "ray.worker" "group" $v "sizing" $w "processes" (printf "%v training workers × 4Gi + %v decode CPUs × 1Gi" $w.gpus $w.decodeCpus)) }}
{{- include "alexnet.validateMemory" (dict "name" "ray.head" "group" .Values.ray.head "sizing" $sizing.head "processes" "4Gi for the driver, GCS and dashboard") }}
{{- end }}

{{/* memory ≥ object store + the rest of /dev/shm + the processes: (dict "name" "ray.worker" "group" <values> "sizing" <dict> "processes" <text>). */}}
{{- define "alexnet.validateMemory" -}}
{{- $s := .sizing -}}
{{- if lt $s.memoryBytes $s.needBytes }}
{{- fail (printf "%s.memory=%v is too small: %s.objectStoreMemory=%v + %s.sharedMemory=%v (together the /dev/shm volume) + %s = %s; set %s.memory to at least %s, or shrink the object store" .name .group.memory .name .group.objectStoreMemory .name .group.sharedMemory .processes (include "alexnet.gib" $s.needBytes) .name (include "alexnet.gib" $s.needBytes)) }}
{{- end }}
{{- end }}

{{/* num-cpus, num-gpus and object-store-memory come from the values, never from rayStartParams. */}}
{{- define "alexnet.validateRayStartParams" -}}
{{- $owned := dict "num-cpus" "cpu (workers) / always 0 (head)" "num-gpus" "gpusPerPod (workers) / always 0 (head)" "object-store-memory" "objectStoreMemory" -}}
{{- range $group := list "head" "worker" }}
{{- range $key, $from := $owned }}
{{- if hasKey (index $.Values.ray $group).rayStartParams $key }}
{{- fail (printf "ray.%s.rayStartParams.%s is set by the chart from ray.%s values (%s); remove it from rayStartParams: the head must never run reads or decode, and the sizing checks rely on these numbers" $group $key $group $from) }}
{{- end }}
{{- end }}
{{- end }}
{{- $gpuName := .Values.ray.worker.gpuResourceName -}}
{{- range $name, $count := .Values.ray.worker.extraResources }}
{{- if has $name (list "cpu" "memory" $gpuName) }}
{{- fail (printf "ray.worker.extraResources.%s: %s comes from ray.worker.cpu / memory / gpusPerPod; extraResources is for other extended resources (e.g. rdma/ib, vpc.amazonaws.com/efa)" $name $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Where shards and checkpoints live. */}}
{{- define "alexnet.validateStorage" -}}
{{- $t := .Values.training -}}
{{- if not (hasPrefix "s3://" $t.storagePath) }}
{{- fail (printf "training.storagePath=%q must be an s3:// URI: checkpoints must outlive the Ray pods" $t.storagePath) }}
{{- end }}
{{- if not $t.dataRoot }}
{{- fail "training.dataRoot is required (the shards root written by the ingest job, e.g. s3://imagenet/shards-root)" }}
{{- end }}
{{- $mount := trimSuffix "/" .Values.dataVolume.mountPath -}}
{{- range $name, $path := dict "training.dataRoot" $t.dataRoot "ingest.dest" .Values.ingest.dest }}
{{- $local := trimPrefix "file://" $path -}}
{{- if and $path (not (hasPrefix "s3://" $path)) }}
{{- if not $.Values.dataVolume.claimName }}
{{- fail (printf "%s=%q is not an s3:// URI, and no shared volume is mounted: set dataVolume.claimName to a ReadOnlyMany/ReadWriteMany PVC (mounted at dataVolume.mountPath=%s), or use s3://" $name $path $mount) }}
{{- end }}
{{- if not (hasPrefix (printf "%s/" $mount) $local) }}
{{- fail (printf "%s=%q is not under dataVolume.mountPath=%s, where the shared volume is mounted; use a path like %s/imagenet-shards" $name $path $mount $mount) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Secrets are referenced by name; the chart refuses to render without them. */}}
{{- define "alexnet.validateSecrets" -}}
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
