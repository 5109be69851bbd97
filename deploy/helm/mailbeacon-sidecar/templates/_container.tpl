{{/*
The mailbeacon SMTP proxy as a container: the one definition behind the native sidecar
("mailbeacon-sidecar.initContainer"), the mailbeacon chart's shared proxy and its
"mailbeacon.proxySidecar" helper, and the sidecar the injection webhook adds to annotated pods.

Parameters (a dict); only image, natsUrl, siteUrl and secretName are required:
  image               the mailbeacon image, e.g. "ghcr.io/mailbeacon/mailbeacon:0.1.0"
  natsUrl             NATS with JetStream, e.g. "nats://nats.nats.svc:4222"
  siteUrl             the tracker's public URL (links in every mail point there)
  secretName          a Secret in the app's namespace with secret-keys (the tracker's
                      click-signing keys) and upstream-smtp (the relay)
  upstreamSecretName  another Secret for the relay (default: secretName)
  upstreamSecretKey   its key ("upstream-smtp")
  upstreamProvider    generic, sendgrid, mailgun, ses, postmark ("generic")
  defaultCampaign     namespace/name of mail no campaign matches ("", always rendered: untracked)
  name                the container's name ("mailbeacon-proxy")
  listen              SMTP address ("127.0.0.1:2525": only containers of the pod can relay)
  httpPort            health and metrics port (8025)
  tmpVolume, spoolVolume  volume names ("mailbeacon-proxy-tmp", "mailbeacon-proxy-spool"), see
                      "mailbeacon-sidecar.volumes"
  maxConnections (200), authFailureDelaySeconds (1), authMaxFailures (3), anonymizeIp (false),
  honourUnsubscribes (true), logLevel ("INFO"), resources, imagePullPolicy ("IfNotPresent"),
  extraEnv            more env entries ({name, value} or {name, valueFrom}), e.g. MAILBEACON_DKIM_*
  volumeMounts        more read-only mounts (e.g. a DKIM key's Secret added to the pod's volumes)
  preStopSleepSeconds the kubelet's native preStop sleep (Kubernetes 1.30+); unset: none
  startupProbe, livenessProbe, readinessProbe  fields merged over the defaults below (one with
                      its own handler, e.g. exec or tcpSocket, replaces the default httpGet)
  NATS credentials    MAILBEACON_NATS_USER/_PASSWORD/_TOKEN (secretKeyRef) through extraEnv, and
                      _NATS_NKEY_SEED_FILE/_CREDS_FILE/_CA_FILE files through volumeMounts
  restartPolicy       "Always" makes an init container a native sidecar (use the initContainer template)
The startupProbe answers once the proxy listens for SMTP (it connects to NATS first). A stop
lets relays in flight finish for SHUTDOWN_DRAIN_SECONDS (20): the pod's
terminationGracePeriodSeconds (30 by default) must leave that and a few seconds more.
*/}}
{{- define "mailbeacon-sidecar.container" -}}
{{- $listen := .listen | default "127.0.0.1:2525" -}}
{{- $secret := required "mailbeacon-sidecar: secretName is required" .secretName -}}
- name: {{ .name | default "mailbeacon-proxy" }}
  image: {{ required "mailbeacon-sidecar: image is required" .image | quote }}
  imagePullPolicy: {{ .imagePullPolicy | default "IfNotPresent" }}
  {{- with .restartPolicy }}
  restartPolicy: {{ . }}
  {{- end }}
  args: ["proxy"]
  env:
    - name: MAILBEACON_NATS_URL
      value: {{ required "mailbeacon-sidecar: natsUrl is required" .natsUrl | quote }}
    - name: MAILBEACON_SITE_URL
      value: {{ required "mailbeacon-sidecar: siteUrl is required" .siteUrl | quote }}
    - name: MAILBEACON_SMTP_LISTEN
      value: {{ $listen | quote }}
    - name: MAILBEACON_PROXY_HTTP_LISTEN
      value: {{ printf "0.0.0.0:%d" (int (.httpPort | default 8025)) | quote }}
    - name: MAILBEACON_UPSTREAM_PROVIDER
      value: {{ .upstreamProvider | default "generic" | quote }}
    - name: MAILBEACON_DEFAULT_CAMPAIGN
      value: {{ .defaultCampaign | default "" | quote }}
    - name: MAILBEACON_ANONYMIZE_IP
      value: {{ .anonymizeIp | default false | quote }}
    - name: MAILBEACON_HONOUR_UNSUBSCRIBES
      value: {{ ternary "true" "false" (ne .honourUnsubscribes false) | quote }}
    - name: MAILBEACON_LOG_LEVEL
      value: {{ .logLevel | default "INFO" | quote }}
    - name: MAILBEACON_DATA_DIR
      value: /tmp/mailbeacon
    - name: MAILBEACON_SMTP_MAX_CONNECTIONS
      value: {{ int64 (.maxConnections | default 200) | quote }}
    - name: MAILBEACON_SMTP_AUTH_FAILURE_DELAY
      value: {{ ternary .authFailureDelaySeconds 1 (hasKey . "authFailureDelaySeconds") | quote }}
    - name: MAILBEACON_SMTP_AUTH_MAX_FAILURES
      value: {{ int64 (.authMaxFailures | default 3) | quote }}
    - name: MAILBEACON_SECRET_KEYS
      valueFrom:
        secretKeyRef:
          name: {{ $secret }}
          key: secret-keys
    - name: MAILBEACON_UPSTREAM_SMTP
      valueFrom:
        secretKeyRef:
          name: {{ .upstreamSecretName | default $secret }}
          key: {{ .upstreamSecretKey | default "upstream-smtp" }}
    {{- with .extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: smtp
      containerPort: {{ (split ":" $listen)._1 | int }}
      protocol: TCP
    - name: proxy-http
      containerPort: {{ .httpPort | default 8025 | int }}
      protocol: TCP
  startupProbe:
    {{- include "mailbeacon-sidecar.probe" (dict "default" (dict "httpGet" (dict "path" "/healthz" "port" "proxy-http") "periodSeconds" 2 "failureThreshold" 30) "override" .startupProbe) | nindent 4 }}
  livenessProbe:
    {{- include "mailbeacon-sidecar.probe" (dict "default" (dict "httpGet" (dict "path" "/healthz" "port" "proxy-http") "periodSeconds" 10 "timeoutSeconds" 3) "override" .livenessProbe) | nindent 4 }}
  readinessProbe:
    {{- include "mailbeacon-sidecar.probe" (dict "default" (dict "httpGet" (dict "path" "/readyz" "port" "proxy-http") "periodSeconds" 5 "timeoutSeconds" 3) "override" .readinessProbe) | nindent 4 }}
  {{- with .preStopSleepSeconds }}
  lifecycle:
    preStop:
      sleep:
        seconds: {{ int64 . }}
  {{- end }}
  resources:
    {{- toYaml (.resources | default (dict "requests" (dict "cpu" "50m" "memory" "96Mi") "limits" (dict "memory" "256Mi"))) | nindent 4 }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    privileged: false
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: {{ .tmpVolume | default "mailbeacon-proxy-tmp" }}
      mountPath: /tmp
    # DATA_DIR/spool: survives a restart of the container, not the deletion of the pod.
    - name: {{ .spoolVolume | default "mailbeacon-proxy-spool" }}
      mountPath: /tmp/mailbeacon/spool
    {{- with .volumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}


{{/* One probe: the override's fields over the default's; an override with its own handler
(exec, tcpSocket, grpc, httpGet) replaces the default's httpGet. (dict "default" dict "override" dict) */}}
{{- define "mailbeacon-sidecar.probe" -}}
{{- $override := deepCopy (.override | default dict) -}}
{{- $default := deepCopy .default -}}
{{- if or $override.exec $override.tcpSocket $override.grpc $override.httpGet -}}
{{- $_ := unset $default "httpGet" -}}
{{- end -}}
{{- toYaml (merge $override $default) -}}
{{- end -}}
