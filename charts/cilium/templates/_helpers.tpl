{{/*
Labels every object of the release carries.
*/}}
{{- define "cilium.labels" -}}
app.kubernetes.io/part-of: cilium
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/*
Selector labels of the operator pods (upstream's).
*/}}
{{- define "cilium.operator.selectorLabels" -}}
io.cilium/app: operator
name: cilium-operator
{{- end }}

{{/*
Selector labels of the agent pods (upstream's).
*/}}
{{- define "cilium.agent.selectorLabels" -}}
k8s-app: cilium
{{- end }}

{{/*
An image reference: (dict "image" <values image object> "Chart" .Chart).
The tag defaults to the chart's appVersion.
*/}}
{{- define "cilium.image" -}}
{{- $tag := .image.tag | default .Chart.AppVersion -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end }}

{{/*
Where both binaries read the cilium-config ConfigMap (--config-dir).
*/}}
{{- define "cilium.configDir" -}}
/tmp/cilium/config-map
{{- end }}

{{/*
Health port of the operator (/healthz): the operator's own default port.
*/}}
{{- define "cilium.operator.healthPort" -}}
9234
{{- end }}

{{/*
A ServiceMonitor spec body shared by the operator and the agent:
(dict "sm" <serviceMonitor values> "selector" <labels yaml> "ns" <namespace>).
*/}}
{{- define "cilium.serviceMonitorEndpoints" -}}
endpoints:
  - port: metrics
    path: /metrics
    interval: {{ .sm.interval | quote }}
    {{- with .sm.scrapeTimeout }}
    scrapeTimeout: {{ . | quote }}
    {{- end }}
    honorLabels: true
    {{- with .sm.relabelings }}
    relabelings:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .sm.metricRelabelings }}
    metricRelabelings:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}

{{/*
KUBERNETES_SERVICE_HOST/PORT from k8sServiceHost/k8sServicePort (upstream's
values), for pods on the host network before Services work.
*/}}
{{- define "cilium.k8sServiceEnv" -}}
{{- if .Values.k8sServiceHost }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.k8sServiceHost | quote }}
{{- end }}
{{- if .Values.k8sServicePort }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.k8sServicePort | quote }}
{{- end }}
{{- end }}
