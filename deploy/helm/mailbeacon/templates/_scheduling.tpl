{{/* Where a component's pods run: its own affinity and topologySpreadConstraints when given,
else the presets (podAntiAffinityPreset, topologySpreadPreset), as Bitnami's charts do.
(dict "root" $ "component" "tracker" "values" .Values.tracker) */}}
{{- define "mailbeacon.scheduling" -}}
{{- $v := .values -}}
{{- $selector := include "mailbeacon.selectorLabels" . | fromYaml -}}
{{- $term := dict "labelSelector" (dict "matchLabels" $selector) "topologyKey" "kubernetes.io/hostname" -}}
{{- if $v.affinity }}
affinity:
  {{- toYaml $v.affinity | nindent 2 }}
{{- else if eq ($v.podAntiAffinityPreset | default "none") "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      {{- toYaml (list $term) | nindent 6 }}
{{- else if eq ($v.podAntiAffinityPreset | default "none") "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      {{- toYaml (list (dict "weight" 100 "podAffinityTerm" $term)) | nindent 6 }}
{{- end }}
{{- if $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml $v.topologySpreadConstraints | nindent 2 }}
{{- else if eq ($v.topologySpreadPreset | default "none") "soft" }}
topologySpreadConstraints:
  {{- range list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
  - maxSkew: 1
    topologyKey: {{ . }}
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- toYaml $selector | nindent 8 }}
  {{- end }}
{{- end }}
{{- end -}}
