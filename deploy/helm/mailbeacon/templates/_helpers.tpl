{{/* Names, labels and the pieces every component shares. */}}

{{- define "mailbeacon.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mailbeacon.fullname" -}}
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

{{- define "mailbeacon.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "tracker") */}}
{{- define "mailbeacon.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailbeacon.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mailbeacon.labels" -}}
helm.sh/chart: {{ include "mailbeacon.chart" .root }}
{{ include "mailbeacon.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: mailbeacon
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "mailbeacon.image" -}}
{{- $repository := .Values.image.repository -}}
{{- with .Values.image.registry }}{{ $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}{{ end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "mailbeacon.secretName" -}}
{{- default (include "mailbeacon.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "mailbeacon.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "mailbeacon.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* True (non-empty) when the aggregator has PostgreSQL rather than the SQLite fallback. */}}
{{- define "mailbeacon.hasDatabase" -}}
{{- if or .Values.secrets.existingSecret .Values.database.url -}}true{{- end -}}
{{- end -}}

{{/* True (non-empty) when the tracker's Ingress puts the webhooks on the internet and the
operator has not accepted unauthenticated ones: their credentials are then mandatory. */}}
{{- define "mailbeacon.webhooksMustAuthenticate" -}}
{{- if and .Values.tracker.enabled .Values.tracker.ingress.enabled (not .Values.tracker.webhooks.allowUnauthenticated) -}}true{{- end -}}
{{- end -}}

{{/* True (non-empty) when Postmark's webhook is in use: asked for, its credential given, or
the shared proxy relays through Postmark. Only then does the Ingress route it. */}}
{{- define "mailbeacon.postmarkWebhook" -}}
{{- $v := .Values -}}
{{- if or $v.tracker.webhooks.postmark.enabled $v.secrets.postmarkBasicAuth (and $v.proxy.enabled (eq $v.proxy.upstreamProvider "postmark")) -}}true{{- end -}}
{{- end -}}

{{/* Refuse to expose webhooks anyone could forge: called by the Ingress template. */}}
{{- define "mailbeacon.requireWebhookAuth" -}}
{{- if include "mailbeacon.webhooksMustAuthenticate" . -}}
{{- if not (or .Values.secrets.webhookToken .Values.secrets.existingSecret) -}}
{{- fail "tracker.ingress.enabled puts the generic webhooks (/track/bounce/, /track/delivery/, /track/complaint/) on the internet, where anyone could forge bounces and complaints (and trip the campaigns' auto-pause): set secrets.webhookToken (or a webhook-token key in secrets.existingSecret), or accept the risk with tracker.webhooks.allowUnauthenticated=true" -}}
{{- end -}}
{{- if and (include "mailbeacon.postmarkWebhook" .) (not (or .Values.secrets.postmarkBasicAuth .Values.secrets.existingSecret)) -}}
{{- fail "tracker.ingress.enabled routes Postmark's webhook (/webhooks/postmark) to the internet, where anyone could forge bounces and complaints: set secrets.postmarkBasicAuth (\"user:password\", or a postmark-basic-auth key in secrets.existingSecret), or accept the risk with tracker.webhooks.allowUnauthenticated=true" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* One environment variable from the Secret: (dict "root" $ "name" "X" "key" "k" "optional" true) */}}
{{- define "mailbeacon.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "mailbeacon.secretName" .root }}
      key: {{ .key }}
      optional: {{ .optional }}
{{- end -}}

{{/* Environment every component gets. */}}
{{- define "mailbeacon.commonEnv" -}}
- name: MAILBEACON_NATS_URL
  value: {{ include "mailbeacon.natsUrl" . | quote }}
{{- include "mailbeacon.natsEnv" . }}
- name: MAILBEACON_STREAM_REPLICAS
  value: {{ .Values.nats.streamReplicas | quote }}
- name: MAILBEACON_STREAM_MAX_AGE_DAYS
  value: {{ .Values.nats.streamMaxAgeDays | quote }}
- name: MAILBEACON_STREAM_FAST_BATCHES
  value: {{ .Values.nats.fastBatches | quote }}
- name: MAILBEACON_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: MAILBEACON_DATA_DIR
  value: /tmp/mailbeacon
- name: MAILBEACON_SITE_URL
  value: {{ .Values.siteUrl | quote }}
- name: MAILBEACON_ANONYMIZE_IP
  value: {{ .Values.config.anonymizeIp | quote }}
{{- end -}}

{{/* The operator's own environment last, so it wins: config.extraEnv, then the component's
extraEnv. (dict "root" $ "values" .Values.tracker) */}}
{{- define "mailbeacon.extraEnv" -}}
{{- with concat .root.Values.config.extraEnv .values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod-level settings every component shares: (dict "root" $ "component" "tracker" "values" .Values.tracker) */}}
{{- define "mailbeacon.podSpec" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
automountServiceAccountToken: {{ eq .component "operator" }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- include "mailbeacon.scheduling" . }}
volumes:
  # The root filesystem is read-only; Python and the components write only here.
  - name: tmp
    emptyDir:
      sizeLimit: 256Mi
{{- with .extraVolumes }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "mailbeacon.natsVolumes" .root | nindent 2 }}
{{- with .values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A pod template's labels: the component's, plus its podLabels (the chart's win on a clash). */}}
{{- define "mailbeacon.podLabels" -}}
{{- toYaml (merge (include "mailbeacon.labels" . | fromYaml) (.values.podLabels | default dict)) }}
{{- end -}}

{{/* A container's volume mounts besides /tmp: NATS credentials and TLS, then extraVolumeMounts.
(dict "root" $ "values" .Values.tracker) */}}
{{- define "mailbeacon.extraMounts" -}}
{{- include "mailbeacon.natsVolumeMounts" .root }}
{{- with .values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Probes on the component's health endpoints, with the component's overrides (its
livenessProbe, readinessProbe, startupProbe values): (dict "port" "http" "values" .Values.tracker) */}}
{{- define "mailbeacon.probes" -}}
{{- $v := .values | default dict -}}
startupProbe:
  {{- include "mailbeacon.probe" (dict "default" (dict "httpGet" (dict "path" "/healthz" "port" .port) "periodSeconds" 2 "failureThreshold" 30) "override" $v.startupProbe) | nindent 2 }}
livenessProbe:
  {{- include "mailbeacon.probe" (dict "default" (dict "httpGet" (dict "path" "/healthz" "port" .port) "periodSeconds" 10 "timeoutSeconds" 3 "failureThreshold" 3) "override" $v.livenessProbe) | nindent 2 }}
readinessProbe:
  {{- include "mailbeacon.probe" (dict "default" (dict "httpGet" (dict "path" "/readyz" "port" .port) "periodSeconds" 5 "timeoutSeconds" 3 "failureThreshold" 2) "override" $v.readinessProbe) | nindent 2 }}
{{- end -}}

{{/* One probe: the override's fields over the default's (the library chart's one definition). */}}
{{- define "mailbeacon.probe" -}}
{{- include "mailbeacon-sidecar.probe" . -}}
{{- end -}}

{{/* The SMTP proxy as a container, for an app's pod (a plain sidecar) or the shared proxy
Deployment: the library chart mailbeacon-sidecar's "mailbeacon-sidecar.container", whose
parameters it takes (image, natsUrl, siteUrl, secretName; see its templates/_container.tpl).
Kept for app charts that depend on this chart; new ones depend on mailbeacon-sidecar alone and
run the proxy as a native sidecar (docs/kubernetes.md "A Job with the native sidecar"). */}}
{{- define "mailbeacon.proxySidecar" -}}
{{- include "mailbeacon-sidecar.container" . -}}
{{- end -}}

{{/* The sidecar's /tmp and spool volumes: "mailbeacon-sidecar.volumes". */}}
{{- define "mailbeacon.proxySidecarVolume" -}}
{{- include "mailbeacon-sidecar.volumes" . -}}
{{- end -}}

{{/*
The PromQL pieces of one reputation guardrail, as YAML (dict "guardrail" "complaint"|"bounce"
"rule" .Values.metrics.prometheusRule "aggregator" and "operator": their series' label
matchers, mailbeacon.scrapeSelector):
  rate       the campaign's rate in percent, computed from the counts (not the rounded rate)
  threshold  the campaign's threshold from the operator, else the chart's default
  volume     the campaign has enough copies (sent for bounces, delivered for complaints)
*/}}
{{- define "mailbeacon.guardrailQuery" -}}
{{- $complaint := eq .guardrail "complaint" -}}
{{- $count := ternary "complained" "bounced" $complaint -}}
{{- $base := ternary "delivered" "sent" $complaint -}}
{{- $default := ternary .rule.complaintRatePercent .rule.bounceRatePercent $complaint -}}
{{- $messages := printf "max by (namespace, campaign) (mailbeacon_campaign_messages{%s,state=%%q})" .aggregator -}}
{{- $volume := printf $messages $base -}}
rate: {{ printf "(100 * %s / %s)" (printf $messages $count) $volume | quote }}
threshold: {{ printf "(max by (namespace, campaign) (mailbeacon_campaign_guardrail_threshold_percent{%s,guardrail=\"%s_rate\"}) or on (namespace, campaign) 0 * %s + %v)" .operator .guardrail $volume $default | quote }}
volume: {{ printf "%s >= (max by (namespace, campaign) (mailbeacon_campaign_guardrail_min_volume{%s}) or on (namespace, campaign) 0 * %s + %v)" $volume .operator $volume .rule.minVolume | quote }}
critical: {{ ternary "Recipients mark this campaign's mail as spam at or above its threshold (0.3 % is the large mailbox providers' limit for bulk senders): they start filtering the sender. The Campaign's ComplaintRateHigh condition and Events say more; with guardrails.autoPause the operator has paused it." "Too many of this campaign's copies bounce: the list needs cleaning before providers throttle the sender. The Campaign's BounceRateHigh condition and Events say more; with guardrails.autoPause the operator has paused it." $complaint | quote }}
warning: {{ ternary "The complaint rate approaches the campaign's guardrail; review the list and the content before it trips." "The bounce rate approaches the campaign's guardrail; clean the list before it trips." $complaint | quote }}
{{- end -}}
