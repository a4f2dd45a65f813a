{{/* Pod building blocks shared by every workload of the release. */}}

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

{{/* Container-level security context of every container: (dict) or (dict "addCapabilities" (list "IPC_LOCK")).
     Every capability stays dropped except the ones a caller adds explicitly. */}}
{{- define "alexnet.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
capabilities:
  drop:
    - ALL
  {{- with .addCapabilities }}
  add:
    {{- toYaml . | nindent 4 }}
  {{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Equal requests and limits: (dict "cpu" .. "memory" .. "extra" (dict "<resource>" n ...)). */}}
{{- define "alexnet.resources" -}}
{{- $r := dict "cpu" (toString .cpu) "memory" (toString .memory) }}
{{- range $name, $count := .extra }}
{{- $_ := set $r $name (toString $count) }}
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

{{/* S3 client environment (keys from the Secret, endpoint/region as plain values). boto3 reads AWS_ENDPOINT_URL;
     pyarrow's S3FileSystem does not (apache/arrow#49643), so the training entrypoint and the ingest
     command also carry the endpoint explicitly (data.s3_endpoint / s3_endpoint). */}}
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

{{/* Pod spec fields shared by every pod of the release. */}}
{{- define "alexnet.podCommon" -}}
serviceAccountName: {{ include "alexnet.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Scheduling fields of a pod: (values with nodeSelector, tolerations, affinity). */}}
{{- define "alexnet.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* volumeMounts entries: /dev/shm, scratch at /tmp/ray, and the shared data volume when one is set:
     (dict "root" $ "dataReadOnly" true|false). */}}
{{- define "alexnet.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: ray-tmp
  mountPath: /tmp/ray
{{- if .root.Values.dataVolume.claimName }}
- name: data
  mountPath: {{ .root.Values.dataVolume.mountPath }}
  readOnly: {{ .dataReadOnly }}
{{- end }}
{{- end }}

{{/* volumes entries matching "alexnet.volumeMounts": (dict "root" $ "shmBytes" <size or 0 = unlimited> "dataReadOnly" bool). */}}
{{- define "alexnet.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .shmBytes }}
    sizeLimit: {{ int64 . | quote }}
    {{- end }}
- name: ray-tmp
  emptyDir: {}
{{- with .root.Values.dataVolume.claimName }}
- name: data
  persistentVolumeClaim:
    claimName: {{ . }}
    readOnly: {{ $.dataReadOnly }}
{{- end }}
{{- end }}
