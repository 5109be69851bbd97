{{/* Graceful stops of the tracker, the aggregator and the shared proxy (docs/kubernetes.md "Zero-drop rollouts"). A terminating pod keeps serving for shutdown.delaySeconds while the endpoints
drop it: by default in the process (MAILBEACON_SHUTDOWN_DELAY_SECONDS, /readyz answering 503
meanwhile), with shutdown.preStopSleep in the kubelet's preStop sleep instead, never both. */}}

{{/* The process's own delay: 0 when the kubelet sleeps it. */}}
{{- define "mailbeacon.shutdownDelay" -}}
{{- ternary 0 (int .Values.shutdown.delaySeconds) .Values.shutdown.preStopSleep -}}
{{- end -}}

{{/* The preStop sleep's seconds, or nothing. */}}
{{- define "mailbeacon.preStopSleep" -}}
{{- if .Values.shutdown.preStopSleep }}{{ int .Values.shutdown.delaySeconds }}{{ end -}}
{{- end -}}

{{- define "mailbeacon.shutdownEnv" -}}
- name: MAILBEACON_SHUTDOWN_DELAY_SECONDS
  value: {{ include "mailbeacon.shutdownDelay" . | quote }}
{{- end -}}

{{- define "mailbeacon.shutdownLifecycle" -}}
{{- with include "mailbeacon.preStopSleep" . | int }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ . }}
{{- end }}
{{- end -}}

{{/* terminationGracePeriodSeconds: the delay (wherever it is spent), then the component's own
stop: (dict "root" $ "stop" 60) */}}
{{- define "mailbeacon.gracePeriod" -}}
{{- add (int .root.Values.shutdown.delaySeconds) .stop -}}
{{- end -}}
