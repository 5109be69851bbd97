{{/* The chart's Secret (when secrets.existingSecret is not set) and the checksum that restarts
the pods when what they read from Secrets changes. */}}

{{/* The click-signing keys, base64: secrets.secretKeys, else those of the release's Secret as an
earlier install made it (an online `helm upgrade` sees it). Never generated: `helm template`,
Argo CD, Flux and helm-diff see no cluster (lookup returns nothing), so a key made here would be
replaced on every render, and every link already in an inbox would stop verifying. */}}
{{- define "mailbeacon.signingKeys" -}}
{{- if .Values.secrets.secretKeys -}}
{{- join "," .Values.secrets.secretKeys | b64enc -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "mailbeacon.fullname" .) | default dict -}}
{{- $keys := index ($existing.data | default dict) "secret-keys" | default "" -}}
{{- if not $keys -}}
{{- fail "set the click-signing key: secrets.secretKeys (e.g. --set secrets.secretKeys[0]=\"$(openssl rand -base64 48 | tr -d '\\n')\", at least 32 characters; keep it: links already sent are signed with it), or secrets.existingSecret naming a Secret with a secret-keys key (managed by Sealed Secrets, External Secrets or SOPS for GitOps). The chart does not generate one: helm template, Argo CD, Flux and helm-diff cannot see the cluster and would make a new key on every render" -}}
{{- end -}}
{{- $keys -}}
{{- end -}}
{{- end -}}

{{/* The data of the chart's Secret (key: base64 value), as YAML. */}}
{{- define "mailbeacon.secretData" -}}
secret-keys: {{ include "mailbeacon.signingKeys" . | quote }}
{{- with .Values.database.url }}
database-url: {{ . | b64enc | quote }}
{{- end }}
{{- with .Values.secrets.upstreamSmtp }}
upstream-smtp: {{ . | b64enc | quote }}
{{- end }}
{{- with .Values.secrets.webhookToken }}
webhook-token: {{ . | b64enc | quote }}
{{- end }}
{{- with .Values.secrets.apiTokens }}
api-tokens: {{ join "," . | b64enc | quote }}
{{- end }}
{{- with .Values.secrets.apiReadTokens }}
api-read-tokens: {{ join "," . | b64enc | quote }}
{{- end }}
{{- with .Values.secrets.sendgridPublicKey }}
sendgrid-public-key: {{ . | b64enc | quote }}
{{- end }}
{{- with .Values.secrets.mailgunSigningKey }}
mailgun-signing-key: {{ . | b64enc | quote }}
{{- end }}
{{- with .Values.secrets.postmarkBasicAuth }}
postmark-basic-auth: {{ . | b64enc | quote }}
{{- end }}
{{- end -}}

{{/* checksum/secrets of the pod templates: over what the chart's Secret holds (also a key kept
from the cluster), or the names of the Secrets the pods read (the chart cannot see into an
existing Secret: restart the pods, or use a reloader, when you change one). */}}
{{- define "mailbeacon.secretsChecksum" -}}
{{- $data := "" -}}
{{- if not .Values.secrets.existingSecret -}}
{{- $data = include "mailbeacon.secretData" . -}}
{{- end -}}
{{- toJson (list $data .Values.secrets.existingSecret .Values.nats.auth .Values.nats.tls) | sha256sum -}}
{{- end -}}
