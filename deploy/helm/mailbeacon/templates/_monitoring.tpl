{{/*
The label matchers that pick one component's series of this release, as the chart's
ServiceMonitor and PodMonitor label them (dict "root" . "component" "tracker"):
  tracker, aggregator, operator  namespace = the release's, job = the component's Service
                                 (the Prometheus Operator names a ServiceMonitor's jobs so)
  proxy                          the shared proxy's Service, or the PodMonitor's job for
                                 sidecars ("<namespace>/<name>"), which run in apps' namespaces
Scraped by another Prometheus setup, name the jobs the same (and add namespace).
*/}}
{{- define "mailbeacon.scrapeSelector" -}}
{{- $fullname := include "mailbeacon.fullname" .root -}}
{{- if eq .component "proxy" -}}
job=~"{{ $fullname }}-proxy|{{ .root.Release.Namespace }}/{{ $fullname }}-proxy-sidecars"
{{- else -}}
namespace="{{ .root.Release.Namespace }}",job="{{ $fullname }}-{{ .component }}"
{{- end -}}
{{- end -}}

{{/* An alert's runbook_url: its section of the runbook (dict "root" . "alert" NAME). */}}
{{- define "mailbeacon.runbookUrl" -}}
{{- printf "%s#%s" .root.Values.metrics.prometheusRule.runbookUrl (lower .alert) | quote -}}
{{- end -}}
