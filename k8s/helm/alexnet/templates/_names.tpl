{{/* Names, labels and the addresses of the release's services. */}}

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

{{- define "alexnet.runName" -}}
{{ default .Release.Name .Values.training.runName }}
{{- end }}

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
