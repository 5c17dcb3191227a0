{{- define "katcp-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "katcp-bridge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "katcp-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "katcp-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "katcp-bridge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "katcp-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "katcp-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "katcp-bridge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "katcp-bridge.devicesConfigMap" -}}
{{- default (printf "%s-devices" (include "katcp-bridge.fullname" .)) .Values.existingDevicesConfigMap -}}
{{- end -}}

{{- define "katcp-bridge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "katcp-bridge.devicesFile" -}}
{{- dict "devices" .Values.devices | toYaml -}}
{{- end -}}

{{- define "katcp-bridge.testDevice" -}}
{{- if .Values.tests.device -}}
{{- .Values.tests.device -}}
{{- else if .Values.devices -}}
{{- (first .Values.devices).name -}}
{{- else -}}
demo
{{- end -}}
{{- end -}}
