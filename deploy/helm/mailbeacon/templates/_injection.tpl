{{/* Sidecar injection by annotation (docs/kubernetes.md "Injection by annotation"): the operator serves a
mutating admission webhook that adds the proxy, as the library chart mailbeacon-sidecar renders
it, to pods annotated mailbeacon.io/inject: "true". */}}

{{- define "mailbeacon.injection.on" -}}
{{- if and .Values.operator.enabled .Values.operator.injection.enabled -}}true{{- end -}}
{{- end -}}

{{- define "mailbeacon.injection.name" -}}
{{- printf "%s-injection" (include "mailbeacon.fullname" .) -}}
{{- end -}}

{{- define "mailbeacon.injection.service" -}}
{{- printf "%s-operator-webhook" (include "mailbeacon.fullname" .) -}}
{{- end -}}

{{- define "mailbeacon.injection.dnsNames" -}}
{{- $service := include "mailbeacon.injection.service" . -}}
{{- $ns := .Release.Namespace -}}
{{- toJson (list $service (printf "%s.%s" $service $ns) (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.cluster.local" $service $ns)) -}}
{{- end -}}

{{/* The sidecar the webhook adds, from the library chart's templates: the parameters an app
chart would give "mailbeacon-sidecar.initContainer", taken from this release's values. */}}
{{- define "mailbeacon.injection.sidecar" -}}
{{- $i := .Values.operator.injection -}}
{{- $stream := list
      (dict "name" "MAILBEACON_STREAM_REPLICAS" "value" (toString (int64 .Values.nats.streamReplicas)))
      (dict "name" "MAILBEACON_STREAM_MAX_AGE_DAYS" "value" (toString .Values.nats.streamMaxAgeDays))
      (dict "name" "MAILBEACON_STREAM_FAST_BATCHES" "value" (toString .Values.nats.fastBatches)) -}}
{{- $params := dict
      "image" (include "mailbeacon.image" .)
      "imagePullPolicy" .Values.image.pullPolicy
      "natsUrl" .Values.nats.url
      "siteUrl" .Values.siteUrl
      "secretName" $i.secretName
      "upstreamProvider" $i.upstreamProvider
      "defaultCampaign" $i.defaultCampaign
      "anonymizeIp" .Values.config.anonymizeIp
      "logLevel" .Values.config.logLevel
      "resources" $i.resources
      "spoolSizeLimit" $i.spoolSizeLimit
      "extraEnv" $stream -}}
{{- toJson (dict
      "initContainer" (include "mailbeacon-sidecar.initContainer" $params | fromYamlArray | first)
      "volumes" (include "mailbeacon-sidecar.volumes" $params | fromYamlArray)
      "appEnv" (include "mailbeacon-sidecar.appEnv" $params | fromYamlArray)) -}}
{{- end -}}

{{/* The operator container's environment for the webhook. */}}
{{- define "mailbeacon.injection.env" -}}
{{- if include "mailbeacon.injection.on" . }}
- name: MAILBEACON_INJECTION_LISTEN
  value: "0.0.0.0:9443"
- name: MAILBEACON_INJECTION_TEMPLATE
  value: {{ include "mailbeacon.injection.sidecar" . | quote }}
{{- if .Values.operator.injection.certManager.enabled }}
- name: MAILBEACON_INJECTION_CERT_FILE
  value: /etc/mailbeacon/webhook-tls/tls.crt
- name: MAILBEACON_INJECTION_KEY_FILE
  value: /etc/mailbeacon/webhook-tls/tls.key
{{- else }}
- name: MAILBEACON_INJECTION_DNS_NAMES
  value: {{ include "mailbeacon.injection.dnsNames" . | fromJsonArray | join "," | quote }}
- name: MAILBEACON_INJECTION_WEBHOOK_CONFIGURATION
  value: {{ include "mailbeacon.injection.name" . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "mailbeacon.injection.port" -}}
{{- if include "mailbeacon.injection.on" . }}
- name: webhook
  containerPort: 9443
  protocol: TCP
{{- end }}
{{- end -}}

{{/* cert-manager's Secret, mounted into the operator (kopf re-reads it when renewed). */}}
{{- define "mailbeacon.injection.volumes" -}}
{{- if and (include "mailbeacon.injection.on" .) .Values.operator.injection.certManager.enabled -}}
{{- toJson (list (dict "name" "webhook-tls" "secret" (dict "secretName" (printf "%s-tls" (include "mailbeacon.injection.name" .)) "defaultMode" 288))) -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{- define "mailbeacon.injection.mounts" -}}
{{- if and (include "mailbeacon.injection.on" .) .Values.operator.injection.certManager.enabled }}
- name: webhook-tls
  mountPath: /etc/mailbeacon/webhook-tls
  readOnly: true
{{- end }}
{{- end -}}
