{{/* Names, labels and images, in one place. */}}

{{- define "keyhole.name" -}}keyhole{{- end }}

{{- define "keyhole.fullname" -}}
{{- if contains "keyhole" .Release.Name }}{{ .Release.Name | trunc 53 | trimSuffix "-" }}
{{- else }}{{ printf "%s-keyhole" .Release.Name | trunc 53 | trimSuffix "-" }}{{ end }}
{{- end }}

{{- define "keyhole.operator" -}}{{ include "keyhole.fullname" . }}-operator{{- end }}
{{- define "keyhole.webhookService" -}}{{ include "keyhole.fullname" . }}-webhook{{- end }}
{{- define "keyhole.webhookSecret" -}}{{ include "keyhole.fullname" . }}-webhook-tls{{- end }}
{{- define "keyhole.protectedSecrets" -}}{{ include "keyhole.fullname" . }}-protected-secrets{{- end }}
{{- define "keyhole.masterKeySecret" -}}{{ include "keyhole.fullname" . }}-master-key{{- end }}

{{- define "keyhole.labels" -}}
app.kubernetes.io/name: keyhole
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "keyhole.operatorSelector" -}}
app.kubernetes.io/name: keyhole
app.kubernetes.io/instance: {{ .Release.Name }}
keyhole.dev/component: operator
{{- end }}

{{- define "keyhole.operatorImage" -}}
{{ .Values.operator.image.repository }}:{{ .Values.operator.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "keyhole.sidecarImage" -}}
{{ .Values.sidecar.image.repository }}:{{ .Values.sidecar.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "keyhole.serviceAccount" -}}{{ include "keyhole.operator" . }}{{- end }}

{{/* Namespaces the pod webhook never looks at. */}}
{{- define "keyhole.skippedNamespaces" -}}
{{- $skipped := list "kube-system" .Release.Namespace }}
{{- range .Values.webhook.excludeNamespaces }}{{ $skipped = append $skipped . }}{{ end }}
{{- toJson ($skipped | uniq) }}
{{- end }}

{{- define "keyhole.namespaceSelector" -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values: {{ include "keyhole.skippedNamespaces" . }}
  - key: {{ .Values.webhook.optOutLabel.key }}
    operator: NotIn
    values: [{{ .Values.webhook.optOutLabel.value | quote }}]
{{- end }}
