{{/* Kubernetes quantities as numbers, and what each Ray pod must hold.
     Every sizing number the chart renders (Ray's num-cpus, object-store-memory, the /dev/shm size)
     and every sizing check in _validate.tpl comes from "alexnet.sizing", so they cannot disagree. */}}

{{/* Integer bytes of a memory quantity: "96Gi", "512M", "1.5Gi" or a plain number of bytes. */}}
{{- define "alexnet.bytes" -}}
{{- if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- int64 . -}}
{{- else -}}
{{- $quantity := toString . -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $quantity -}}
{{- $suffix := trimPrefix $number $quantity -}}
{{- $factors := dict "" 1 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 -}}
{{- if or (not $number) (not (hasKey $factors $suffix)) -}}
{{- fail (printf "%q is not a memory quantity this chart reads: use a number with Ki, Mi, Gi, Ti, k, M, G or T (e.g. 64Gi)" $quantity) -}}
{{- end -}}
{{- mulf (float64 $number) (index $factors $suffix) | floor | int64 -}}
{{- end -}}
{{- end }}

{{/* Integer millicores of a CPU quantity: "16", "500m", "0.5" or a number. */}}
{{- define "alexnet.millicpu" -}}
{{- $quantity := toString . -}}
{{- if hasSuffix "m" $quantity -}}
{{- trimSuffix "m" $quantity | int64 -}}
{{- else -}}
{{- mulf (float64 .) 1000 | floor | int64 -}}
{{- end -}}
{{- end }}

{{/* Bytes as a short Gi figure for messages: (bytes) -> "12.5Gi". */}}
{{- define "alexnet.gib" -}}
{{- printf "%.1fGi" (divf (float64 .) 1073741824) -}}
{{- end }}

{{/* Number of GPU worker pods: replicas × towers / gpusPerPod (validated to divide). */}}
{{- define "alexnet.workerPods" -}}
{{ div (mul (int .Values.training.replicas) (int .Values.training.towers)) (int .Values.ray.worker.gpusPerPod) }}
{{- end }}

{{/* What the head and each worker pod hold, as JSON (read it with fromJson):
       worker.rayCpus        Ray num-cpus: the whole CPUs of ray.worker.cpu
       worker.trainingMilli  gpusPerPod × training.cpusPerWorker, in millicores
       worker.decodeCpus     decode CPUs per pod: training.decodeConcurrency spread over the pods,
                             or with auto (0) every whole CPU left after training
       worker.minDecodeCpus  the fewest decode CPUs the pod must have (explicit share, or
                             minDecodeCpusPerGpu × gpusPerPod with auto)
       <group>.storeBytes, shmBytes (the /dev/shm volume: object store + sharedMemory),
       processBytes (training workers, decode tasks, or the head's driver/GCS), needBytes, memoryBytes. */}}
{{- define "alexnet.sizing" -}}
{{- $gib := 1073741824 -}}
{{- $t := .Values.training -}}
{{- $w := .Values.ray.worker -}}
{{- $h := .Values.ray.head -}}
{{- $gpus := int64 $w.gpusPerPod -}}
{{- $pods := int64 (include "alexnet.workerPods" .) -}}
{{- $rayCpus := div (int64 (include "alexnet.millicpu" $w.cpu)) 1000 -}}
{{- $trainingMilli := mulf (float64 $gpus) (float64 $t.cpusPerWorker) 1000 | floor | int64 -}}
{{- $freeCpus := div (sub (mul $rayCpus 1000) $trainingMilli) 1000 -}}
{{- $concurrency := int64 $t.decodeConcurrency -}}
{{- $decodeCpus := max $freeCpus 0 -}}
{{- $minDecodeCpus := mul $gpus (int64 $w.minDecodeCpusPerGpu) -}}
{{- if and (gt $concurrency 0) (gt $pods 0) -}}
{{- $decodeCpus = divf $concurrency $pods | ceil | int64 -}}
{{- $minDecodeCpus = $decodeCpus -}}
{{- end -}}
{{- $workerStore := int64 (include "alexnet.bytes" $w.objectStoreMemory) -}}
{{- $workerShm := add $workerStore (int64 (include "alexnet.bytes" $w.sharedMemory)) -}}
{{- /* A training worker (CUDA context, pinned prefetch buffers) ~4Gi; a decode task process ~1Gi. */ -}}
{{- $workerProcesses := add (mul $gpus 4 $gib) (mul $decodeCpus $gib) -}}
{{- $headStore := int64 (include "alexnet.bytes" $h.objectStoreMemory) -}}
{{- $headShm := add $headStore (int64 (include "alexnet.bytes" $h.sharedMemory)) -}}
{{- $headProcesses := mul 4 $gib -}}
{{- $worker := dict "pods" $pods "gpus" $gpus "rayCpus" $rayCpus "trainingMilli" $trainingMilli
      "decodeCpus" $decodeCpus "minDecodeCpus" $minDecodeCpus "storeBytes" $workerStore "shmBytes" $workerShm
      "processBytes" $workerProcesses "needBytes" (add $workerShm $workerProcesses)
      "memoryBytes" (int64 (include "alexnet.bytes" $w.memory)) -}}
{{- $head := dict "storeBytes" $headStore "shmBytes" $headShm "processBytes" $headProcesses
      "needBytes" (add $headShm $headProcesses) "memoryBytes" (int64 (include "alexnet.bytes" $h.memory)) -}}
{{- toJson (dict "worker" $worker "head" $head) -}}
{{- end }}
