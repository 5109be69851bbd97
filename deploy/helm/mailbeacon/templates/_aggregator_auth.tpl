{{/* Who may use the aggregator's API and pages (values: aggregator.auth, secrets.apiTokens,
secrets.apiReadTokens). The aggregator listens beyond loopback in a pod, so it needs
credentials; the chart refuses to render without them rather than generate a token, which
every render (helm template, Argo CD) would replace. */}}

{{/* True (non-empty) when the aggregator or the operator can find a token: given as values, or
possibly in the existing Secret (whose keys the chart cannot see). */}}
{{- define "mailbeacon.hasApiTokens" -}}
{{- if or .Values.secrets.apiTokens .Values.secrets.apiReadTokens .Values.secrets.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* Refuse values that would leave the aggregator open or unusable: called by its Deployment. */}}
{{- define "mailbeacon.requireAggregatorAuth" -}}
{{- $auth := .Values.aggregator.auth -}}
{{- $sec := .Values.secrets -}}
{{- if eq $auth.mode "none" -}}
{{- if or $sec.apiTokens $sec.apiReadTokens $auth.proxyHeader -}}
{{- fail "aggregator.auth.mode=none serves the aggregator to anyone, which contradicts secrets.apiTokens, secrets.apiReadTokens and aggregator.auth.proxyHeader: unset one or the other" -}}
{{- end -}}
{{- else -}}
{{- if and $auth.proxyHeader (not $auth.trustedProxies) -}}
{{- fail "aggregator.auth.proxyHeader is believed only from aggregator.auth.trustedProxies: set the auth proxy's addresses (127.0.0.1/32 for a sidecar)" -}}
{{- end -}}
{{- if not (or (include "mailbeacon.hasApiTokens" .) $auth.proxyHeader) -}}
{{- fail "the aggregator's API and pages show recipients' addresses, IPs and user agents and need credentials: set secrets.apiTokens (and/or secrets.apiReadTokens; e.g. `openssl rand -hex 32`, 24 characters at least), or keys api-tokens / api-read-tokens in secrets.existingSecret, or aggregator.auth.proxyHeader with aggregator.auth.trustedProxies behind an authenticating proxy; or accept the risk with aggregator.auth.mode=none" -}}
{{- end -}}
{{- if and .Values.operator.enabled (not (include "mailbeacon.hasApiTokens" .)) -}}
{{- fail "the operator reads statistics from the aggregator, which then requires a token besides aggregator.auth.proxyHeader: set secrets.apiReadTokens (or an api-read-tokens key in secrets.existingSecret)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* One token list from the Secret: optional in an existing Secret, required when given as
values, absent otherwise. (dict "root" $ "name" "MAILBEACON_API_TOKENS" "key" "api-tokens" "given" list) */}}
{{- define "mailbeacon.apiTokenEnv" -}}
{{- if .root.Values.secrets.existingSecret }}
{{ include "mailbeacon.secretEnv" (dict "root" .root "name" .name "key" .key "optional" true) }}
{{- else if .given }}
{{ include "mailbeacon.secretEnv" (dict "root" .root "name" .name "key" .key "optional" false) }}
{{- end }}
{{- end -}}

{{/* The aggregator's authentication settings. */}}
{{- define "mailbeacon.aggregatorAuthEnv" -}}
{{- $auth := .Values.aggregator.auth -}}
{{- if eq $auth.mode "none" }}
- name: MAILBEACON_API_AUTH
  value: "none"
{{- else }}
{{- include "mailbeacon.apiTokenEnv" (dict "root" . "name" "MAILBEACON_API_TOKENS" "key" "api-tokens" "given" .Values.secrets.apiTokens) }}
{{- include "mailbeacon.apiTokenEnv" (dict "root" . "name" "MAILBEACON_API_READ_TOKENS" "key" "api-read-tokens" "given" .Values.secrets.apiReadTokens) }}
{{- with $auth.proxyHeader }}
- name: MAILBEACON_AUTH_PROXY_HEADER
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with $auth.trustedProxies }}
- name: MAILBEACON_TRUSTED_PROXIES
  value: {{ join "," . | quote }}
{{- end }}
{{- end -}}

{{/* The operator's token for the aggregator: a read-only one when given (it only reads). */}}
{{- define "mailbeacon.operatorTokenEnv" -}}
{{- $sec := .Values.secrets -}}
{{- if ne .Values.aggregator.auth.mode "none" }}
{{- if $sec.existingSecret }}
{{- include "mailbeacon.apiTokenEnv" (dict "root" . "name" "MAILBEACON_API_READ_TOKENS" "key" "api-read-tokens" "given" list) }}
{{- include "mailbeacon.apiTokenEnv" (dict "root" . "name" "MAILBEACON_API_TOKENS" "key" "api-tokens" "given" list) }}
{{- else if $sec.apiReadTokens }}
{{- include "mailbeacon.apiTokenEnv" (dict "root" . "name" "MAILBEACON_API_READ_TOKENS" "key" "api-read-tokens" "given" $sec.apiReadTokens) }}
{{- else }}
{{- include "mailbeacon.apiTokenEnv" (dict "root" . "name" "MAILBEACON_API_TOKENS" "key" "api-tokens" "given" $sec.apiTokens) }}
{{- end }}
{{- end }}
{{- end -}}
