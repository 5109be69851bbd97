{{/* NATS for every component: the URL (never with credentials), the login from a Secret
(nats.auth) and TLS (nats.tls), as environment variables and read-only mounted files. */}}

{{/* nats.url, refused when it carries a user, password or token: it is a plain value in every
pod spec (and was printed by NOTES). */}}
{{- define "mailbeacon.natsUrl" -}}
{{- range splitList "," .Values.nats.url }}
{{- if (urlParse (trim .)).userinfo }}
{{- fail "nats.url carries credentials, which would be readable in every pod spec: put them in a Secret and set nats.auth.method (userPassword, token, nkey or creds) and nats.auth.existingSecret, and give nats.url without them (nats://nats.nats.svc:4222)" }}
{{- end }}
{{- end }}
{{- $auth := .Values.nats.auth }}
{{- if and (ne $auth.method "none") (not $auth.existingSecret) }}
{{- fail (printf "nats.auth.method=%s needs nats.auth.existingSecret, the Secret holding the credential" $auth.method) }}
{{- end }}
{{- if and $auth.existingSecret (eq $auth.method "none") }}
{{- fail "nats.auth.existingSecret is set but nats.auth.method is none: say which credential it holds (userPassword, token, nkey or creds)" }}
{{- end }}
{{- .Values.nats.url -}}
{{- end -}}

{{- define "mailbeacon.natsSecretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end -}}

{{/* The login and TLS settings, one list entry per line (appended to an env list). */}}
{{- define "mailbeacon.natsEnv" -}}
{{- $auth := .Values.nats.auth }}
{{- if eq $auth.method "userPassword" }}
{{ include "mailbeacon.natsSecretEnv" (dict "name" "MAILBEACON_NATS_USER" "secret" $auth.existingSecret "key" "user") }}
{{ include "mailbeacon.natsSecretEnv" (dict "name" "MAILBEACON_NATS_PASSWORD" "secret" $auth.existingSecret "key" "password") }}
{{- else if eq $auth.method "token" }}
{{ include "mailbeacon.natsSecretEnv" (dict "name" "MAILBEACON_NATS_TOKEN" "secret" $auth.existingSecret "key" "token") }}
{{- else if eq $auth.method "nkey" }}
- name: MAILBEACON_NATS_NKEY_SEED_FILE
  value: /etc/mailbeacon/nats-auth/nkey.seed
{{- else if eq $auth.method "creds" }}
- name: MAILBEACON_NATS_CREDS_FILE
  value: /etc/mailbeacon/nats-auth/user.creds
{{- end }}
{{- if .Values.nats.tls.secretName }}
- name: MAILBEACON_NATS_CA_FILE
  value: /etc/mailbeacon/nats-tls/ca.crt
{{- if .Values.nats.tls.clientCertificate }}
- name: MAILBEACON_NATS_TLS_CERT_FILE
  value: /etc/mailbeacon/nats-tls/tls.crt
- name: MAILBEACON_NATS_TLS_KEY_FILE
  value: /etc/mailbeacon/nats-tls/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/* Volumes of the files above (readable by the pod's group only). */}}
{{- define "mailbeacon.natsVolumes" -}}
{{- $auth := .Values.nats.auth }}
{{- $file := dict "nkey" (dict "key" "nkey-seed" "path" "nkey.seed") "creds" (dict "key" "creds" "path" "user.creds") }}
{{- with index $file $auth.method }}
- name: nats-auth
  secret:
    secretName: {{ $auth.existingSecret }}
    defaultMode: 288
    items:
      - {{ toJson . }}
{{- end }}
{{- with .Values.nats.tls.secretName }}
- name: nats-tls
  secret:
    secretName: {{ . }}
    defaultMode: 288
    items:
      - {key: ca.crt, path: ca.crt}
      {{- if $.Values.nats.tls.clientCertificate }}
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      {{- end }}
{{- end }}
{{- end -}}

{{- define "mailbeacon.natsVolumeMounts" -}}
{{- if has .Values.nats.auth.method (list "nkey" "creds") }}
- name: nats-auth
  mountPath: /etc/mailbeacon/nats-auth
  readOnly: true
{{- end }}
{{- if .Values.nats.tls.secretName }}
- name: nats-tls
  mountPath: /etc/mailbeacon/nats-tls
  readOnly: true
{{- end }}
{{- end -}}
