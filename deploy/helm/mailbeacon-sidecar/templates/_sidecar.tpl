{{/*
The proxy as a native sidecar (Kubernetes 1.29+): put it first in the pod's initContainers. The
kubelet starts the app's containers once its startupProbe answers (the proxy listens for SMTP),
keeps it running beside them, and stops it after them, so a Job or CronJob completes when the
app is done and the proxy publishes the events of the last copies on its way out. Takes the
parameters of "mailbeacon-sidecar.container".

  initContainers:
    {{- include "mailbeacon-sidecar.initContainer" $proxy | nindent 4 }}
  containers:
    - name: newsletter
      env:
        {{- include "mailbeacon-sidecar.appEnv" $proxy | nindent 8 }}
  volumes:
    {{- include "mailbeacon-sidecar.volumes" $proxy | nindent 4 }}
*/}}
{{- define "mailbeacon-sidecar.initContainer" -}}
{{- include "mailbeacon-sidecar.container" (merge (dict "restartPolicy" "Always") .) -}}
{{- end -}}

{{/* The volumes the proxy writes to, for the pod's volumes: its /tmp and the spool of events
a stop could not publish while NATS was unreachable (about 1 KiB each, published at the
container's next start; above spoolSizeLimit, "128Mi", the kubelet evicts the pod). Takes
tmpVolume and spoolVolume (names, as given to the container) and spoolSizeLimit. */}}
{{- define "mailbeacon-sidecar.volumes" -}}
- name: {{ .tmpVolume | default "mailbeacon-proxy-tmp" }}
  emptyDir:
    sizeLimit: 64Mi
- name: {{ .spoolVolume | default "mailbeacon-proxy-spool" }}
  emptyDir:
    sizeLimit: {{ .spoolSizeLimit | default "128Mi" }}
{{- end -}}

{{/* Environment for the app's containers: where the proxy answers, as SMTP_HOST and SMTP_PORT
(other names with hostEnv and portEnv, e.g. EMAIL_HOST and EMAIL_PORT for Django). */}}
{{- define "mailbeacon-sidecar.appEnv" -}}
{{- $listen := split ":" (.listen | default "127.0.0.1:2525") -}}
- name: {{ .hostEnv | default "SMTP_HOST" }}
  value: {{ ternary "127.0.0.1" $listen._0 (eq $listen._0 "0.0.0.0") | quote }}
- name: {{ .portEnv | default "SMTP_PORT" }}
  value: {{ $listen._1 | quote }}
{{- end -}}
