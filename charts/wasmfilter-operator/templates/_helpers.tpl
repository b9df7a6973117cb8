{{- define "wasmfilter.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "wasmfilter.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "wasmfilter.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wasmfilter.serviceAccountName" -}}
{{- default (include "wasmfilter.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The URL proxies fetch modules from: the cache Service of this release. */}}
{{- define "wasmfilter.cacheURL" -}}
{{- printf "http://%s-cache.%s.svc:%d" (include "wasmfilter.fullname" .) .Release.Namespace (int .Values.cache.port) -}}
{{- end -}}

{{/* What the operator does in the watched namespace(s): rules of its Role or ClusterRole. */}}
{{- define "wasmfilter.rules" -}}
# Its own API: read, and write status only (server-side apply).
- apiGroups: [wasmfilter.dev]
  resources: [wasmfilters]
  verbs: [get, list, watch]
- apiGroups: [wasmfilter.dev]
  resources: [wasmfilters/status]
  verbs: [patch]
# The children it writes (server-side apply: patch, and create for a new one; measured, the
# apply fails without it), watches, and deletes when `target` changes.
- apiGroups: [extensions.istio.io]
  resources: [wasmplugins, trafficextensions]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [networking.istio.io]
  resources: [envoyfilters]
  verbs: [get, list, watch, create, patch, delete]
# Pods, to check each selected workload's Envoy; get for a node naming an unknown pod.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# Pull secrets, read one by one by name (spec.module.pullSecret): get only, never list or
# watch, so the operator cannot enumerate the namespace's Secrets.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# Signing keys (spec.module.verify, --require-signature-keys), read one by one by name: get
# only.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get]
# Events on WasmFilters.
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
