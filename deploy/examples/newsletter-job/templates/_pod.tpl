{{/* The pod: the app in containers, the mailbeacon proxy first in initContainers (a native
sidecar: the app starts once the proxy answers; the proxy stops after the app, so the Job
completes). */}}
{{- define "newsletter.pod" -}}
metadata:
  labels:
    app.kubernetes.io/name: newsletter
    app.kubernetes.io/instance: {{ .Release.Name }}
    # The mailbeacon chart's PodMonitor (metrics.podMonitor.enabled) scrapes the sidecar.
    mailbeacon.io/proxy: sidecar
spec:
  restartPolicy: Never
  # The proxy publishes the last copies' events after the app ends (SHUTDOWN_DRAIN_SECONDS, 20).
  terminationGracePeriodSeconds: 30
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    seccompProfile: {type: RuntimeDefault}
  initContainers:
    {{- include "mailbeacon-sidecar.initContainer" .Values.mailbeacon | nindent 4 }}
  containers:
    - name: newsletter
      image: {{ .Values.image | quote }}
      args: {{ toJson .Values.args }}
      env:
        {{- include "mailbeacon-sidecar.appEnv" .Values.mailbeacon | nindent 8 }}
      resources:
        requests: {cpu: 50m, memory: 64Mi}
        limits: {memory: 256Mi}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {drop: ["ALL"]}
  volumes:
    {{- include "mailbeacon-sidecar.volumes" .Values.mailbeacon | nindent 4 }}
{{- end -}}
