{{/* <release>-school, or just the release name when it already says school. */}}
{{- define "school.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
<fullname>-<suffix>, the fullname shortened so that the whole stays within max characters
(63, a DNS label; 52 for a StatefulSet, whose pods get a controller-revision-hash label of
<name>-<10 characters>). Call with (dict "root" $ "suffix" "query-api" ["max" 52]).
*/}}
{{- define "school.componentName" -}}
{{- $max := int (.max | default 63) -}}
{{- $room := sub $max (add1 (len .suffix)) | int -}}
{{- printf "%s-%s" (include "school.fullname" .root | trunc $room | trimSuffix "-") .suffix -}}
{{- end -}}

{{/* Labels that never change between chart versions (the database pod templates carry only
these: a chart bump must not restart a single-node database). */}}
{{- define "school.stableLabels" -}}
app.kubernetes.io/part-of: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "school.labels" -}}
{{ include "school.stableLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* Selector of one component: call with (dict "root" $ "name" "query-api"). */}}
{{- define "school.selectorLabels" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/name: {{ .name }}
{{- end -}}

{{- define "school.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "school.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
A generated secret value (base64) that survives upgrades: the value already in the cluster
when there is one, a fresh random one at the first install (40 random letters and digits,
or "value" when given). Call with (dict "root" $ "name" SECRET "key" KEY ["value" NEW]).
Every template that calls it calls school.assertClusterReadable first.
*/}}
{{- define "school.generatedSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else if .value -}}
{{- .value | b64enc -}}
{{- else -}}
{{- randAlphaNum 40 | b64enc -}}
{{- end -}}
{{- end -}}

{{/*
The Secrets the chart generates with these values: one line each, "<Secret> (<keys>): set
<value> to a Secret of your own".
*/}}
{{- define "school.generatedSecrets" -}}
{{- if not .Values.apiKeys.existingWriteSecret }}
- Secret {{ include "school.writeKeySecret" . }} (key: key): or set apiKeys.existingWriteSecret
{{- end }}
{{- if not .Values.apiKeys.existingReadSecret }}
- Secret {{ include "school.readKeySecret" . }} (key: key): or set apiKeys.existingReadSecret
{{- end }}
{{- if not .Values.apiKeys.existingEraseSecret }}
- Secret {{ include "school.eraseKeySecret" . }} (key: key): or set apiKeys.existingEraseSecret
{{- end }}
{{- if not .Values.kek.existingSecret }}
- Secret {{ include "school.kekSecret" . }} (key: kek, lines <id>:<64 hex digits>): or set kek.existingSecret
{{- end }}
{{- if and .Values.postgresql.enabled (not .Values.postgresql.auth.existingSecret) }}
- Secret {{ include "school.postgresql.fullname" . }} (keys: POSTGRES_PASSWORD, QUERY_PASSWORD, PROJECTOR_PASSWORD): or set postgresql.auth.existingSecret
{{- end }}
{{- if and .Values.mongodb.enabled (not .Values.mongodb.auth.existingSecret) }}
- Secret {{ include "school.mongodb.fullname" . }} (keys: MONGO_INITDB_ROOT_PASSWORD, QUERY_PASSWORD, PROJECTOR_PASSWORD): or set mongodb.auth.existingSecret
{{- end }}
{{- if and .Values.redis.enabled (not .Values.redis.auth.existingSecret) }}
- Secret {{ include "school.redis.fullname" . }} (key: REDIS_PASSWORD): or set redis.auth.existingSecret
{{- end }}
{{- end -}}

{{/*
Generated Secrets are kept across upgrades by reading them back with `lookup`. A render that
cannot read the cluster (helm template, Argo CD, helm install --dry-run=client, helm lint)
gets nothing back and would make new random values on every render: passwords and API keys
rotated silently, and a new KEK that opens none of the students' data keys. Such a render is told apart from a real install by two objects every
namespace has (the ConfigMap kube-root-ca.crt and the ServiceAccount default, made by the
control plane), and it fails, naming the Secrets to create instead.
*/}}
{{- define "school.assertClusterReadable" -}}
{{- $namespace := .Release.Namespace -}}
{{- $rootCa := lookup "v1" "ConfigMap" $namespace "kube-root-ca.crt" -}}
{{- $account := lookup "v1" "ServiceAccount" $namespace "default" -}}
{{- if not (or $rootCa $account) -}}
{{- fail (printf "\n\nThis render cannot read the cluster (lookup finds neither ConfigMap kube-root-ca.crt nor ServiceAccount default in namespace %s: helm template, Argo CD, helm install --dry-run=client and helm lint cannot look up; neither can helm install --create-namespace into a namespace that does not exist yet). It would generate new random passwords, API keys and KEK on every render and so rotate them (a new KEK leaves every student name unreadable). Create these Secrets yourself (sealed, external, kubectl create secret ...) and name them in the values, or install with helm into an existing namespace, where they are generated once and kept:\n%s\n" $namespace (include "school.generatedSecrets" . | trim)) -}}
{{- end -}}
{{- end -}}

{{/*
Custom resources are rendered only when the cluster serves their kind; otherwise the render
fails naming the option and the missing API (helm template: pass --api-versions).
Call with (dict "root" $ "option" "kong.enabled" "apis" (list "group/version/Kind") "what" "…").
A kind counts as served when its group/version/Kind is listed, or its group/version: Helm
lists both from the cluster, but Argo CD passes helm template only the group/versions
(argoproj/argo-cd#6268), and these groups come with their CRDs.
*/}}
{{- define "school.requireApis" -}}
{{- $missing := list -}}
{{- range .apis -}}
{{- $groupVersion := regexReplaceAll "/[^/]+$" . "" -}}
{{- if not (or ($.root.Capabilities.APIVersions.Has .) ($.root.Capabilities.APIVersions.Has $groupVersion)) }}{{ $missing = append $missing . }}{{ end -}}
{{- end -}}
{{- with $missing -}}
{{- fail (printf "\n\n%s is true, but the cluster serves no %s (the CRDs of %s). Install those CRDs first, or set %s=false. (helm template without a cluster: pass --api-versions %s.)\n" $.option (join ", " .) $.what $.option (join " --api-versions " .)) -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- NATS */}}

{{/* The NATS URL: jetstream.url, or the Service of the in-chart NATS (named as that chart names it). */}}
{{- define "school.natsUrl" -}}
{{- if .Values.jetstream.url -}}
{{- .Values.jetstream.url -}}
{{- else if .Values.nats.enabled -}}
{{- $name := default "nats" .Values.nats.nameOverride -}}
{{- $fullname := printf "%s-%s" .Release.Name $name -}}
{{- if contains $name .Release.Name }}{{ $fullname = .Release.Name }}{{ end -}}
{{- $fullname = default $fullname .Values.nats.fullnameOverride | trunc 63 | trimSuffix "-" -}}
nats://{{ $fullname }}.{{ .Release.Namespace }}.svc:4222
{{- else -}}
{{- fail "jetstream.url is required when nats.enabled is false" -}}
{{- end -}}
{{- end -}}

{{/* NATS connection settings of every container (services and stream-admin). */}}
{{- define "school.natsEnv" -}}
- name: NATS_URL
  value: {{ include "school.natsUrl" . | quote }}
- name: STREAM_PREFIX
  value: {{ .Values.jetstream.streamPrefix | quote }}
{{- with .Values.jetstream.auth }}
{{- if .existingSecret }}
{{- if and .credsKey .nkeyKey }}{{ fail "jetstream.auth: set credsKey or nkeyKey, not both" }}{{ end }}
{{- if not (or .credsKey .nkeyKey) }}{{ fail "jetstream.auth.existingSecret needs credsKey or nkeyKey" }}{{ end }}
{{- if .credsKey }}
- name: NATS_CREDS_FILE
  value: /etc/school/nats-auth/{{ .credsKey }}
{{- else }}
- name: NATS_NKEY_FILE
  value: /etc/school/nats-auth/{{ .nkeyKey }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.jetstream.tls }}
{{- if .enabled }}
- name: NATS_TLS_CA_FILE
  value: /etc/school/nats-tls/ca.crt
- name: NATS_REQUIRE_TLS
  value: "true"
{{- if .clientCertificate }}
- name: NATS_TLS_CERT_FILE
  value: /etc/school/nats-tls/tls.crt
- name: NATS_TLS_KEY_FILE
  value: /etc/school/nats-tls/tls.key
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "school.natsVolumeMounts" -}}
{{- if .Values.jetstream.auth.existingSecret }}
- name: nats-auth
  mountPath: /etc/school/nats-auth
  readOnly: true
{{- end }}
{{- if .Values.jetstream.tls.enabled }}
- name: nats-tls
  mountPath: /etc/school/nats-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "school.natsVolumes" -}}
{{- if .Values.jetstream.auth.existingSecret }}
- name: nats-auth
  secret:
    secretName: {{ .Values.jetstream.auth.existingSecret }}
{{- end }}
{{- if .Values.jetstream.tls.enabled }}
- name: nats-tls
  secret:
    secretName: {{ required "jetstream.tls.existingSecret is required when jetstream.tls.enabled" .Values.jetstream.tls.existingSecret }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------- secrets and URLs */}}

{{- define "school.writeKeySecret" -}}
{{- .Values.apiKeys.existingWriteSecret | default (include "school.componentName" (dict "root" . "suffix" "write-key")) -}}
{{- end -}}

{{- define "school.readKeySecret" -}}
{{- .Values.apiKeys.existingReadSecret | default (include "school.componentName" (dict "root" . "suffix" "read-key")) -}}
{{- end -}}

{{- define "school.eraseKeySecret" -}}
{{- .Values.apiKeys.existingEraseSecret | default (include "school.componentName" (dict "root" . "suffix" "erase-key")) -}}
{{- end -}}

{{/* API_KEYS from the three key Secrets (Kubernetes expands $(VAR) from earlier entries). */}}
{{- define "school.apiKeysEnv" -}}
- name: SCHOOL_WRITE_KEY
  valueFrom:
    secretKeyRef: { name: {{ include "school.writeKeySecret" . }}, key: key }
- name: SCHOOL_READ_KEY
  valueFrom:
    secretKeyRef: { name: {{ include "school.readKeySecret" . }}, key: key }
- name: SCHOOL_ERASE_KEY
  valueFrom:
    secretKeyRef: { name: {{ include "school.eraseKeySecret" . }}, key: key }
- name: API_KEYS
  value: "write:$(SCHOOL_WRITE_KEY),read:$(SCHOOL_READ_KEY),erase:$(SCHOOL_ERASE_KEY)"
{{- end -}}

{{/* ---------------------------------------------------------------- the KEK */}}

{{/* The Secret holding the key-encryption keys: kek.existingSecret, or the generated one. */}}
{{- define "school.kekSecret" -}}
{{- .Values.kek.existingSecret | default (include "school.componentName" (dict "root" . "suffix" "kek")) -}}
{{- end -}}

{{/* The key of that Secret holding the KEK file (the generated Secret always uses kek). */}}
{{- define "school.kekSecretKey" -}}
{{- if .Values.kek.existingSecret }}{{ required "kek.secretKey is required with kek.existingSecret" .Values.kek.secretKey }}{{ else }}kek{{ end -}}
{{- end -}}

{{/*
A new KEK file for the generated Secret: one line "kek-<year>-<month>:<64 hex digits>", the
hex 32 random bytes (crypto/rand). Rendered only at the first install; later renders keep
the one in the cluster.
*/}}
{{- define "school.newKek" -}}
{{- printf "kek-%s:%x\n" (now | date "2006-01") (randBytes 32 | b64dec) -}}
{{- end -}}

{{/*
The KEK as a read-only file for command-gateway and projectors (stream-admin run in the
projectors' pod has it too): mode 0440, owned by root and the pod's fsGroup (10001), so the
non-root user of the image can read it and nothing else in the pod can write it.
*/}}
{{- define "school.kekEnv" -}}
- name: KEK_FILE
  value: /etc/school/kek/kek
{{- end -}}

{{- define "school.kekVolumeMount" -}}
- name: kek
  mountPath: /etc/school/kek
  readOnly: true
{{- end -}}

{{- define "school.kekVolume" -}}
- name: kek
  secret:
    secretName: {{ include "school.kekSecret" . }}
    defaultMode: 0440
    items:
      - { key: {{ include "school.kekSecretKey" . }}, path: kek }
{{- end -}}

{{- define "school.postgresql.fullname" -}}
{{- include "school.componentName" (dict "root" . "suffix" "postgresql" "max" 52) -}}
{{- end -}}
{{- define "school.postgresql.secret" -}}
{{- .Values.postgresql.auth.existingSecret | default (include "school.postgresql.fullname" .) -}}
{{- end -}}

{{- define "school.mongodb.fullname" -}}
{{- include "school.componentName" (dict "root" . "suffix" "mongodb" "max" 52) -}}
{{- end -}}
{{- define "school.mongodb.secret" -}}
{{- .Values.mongodb.auth.existingSecret | default (include "school.mongodb.fullname" .) -}}
{{- end -}}

{{- define "school.redis.fullname" -}}
{{- include "school.componentName" (dict "root" . "suffix" "redis" "max" 52) -}}
{{- end -}}
{{- define "school.redis.secret" -}}
{{- .Values.redis.auth.existingSecret | default (include "school.redis.fullname" .) -}}
{{- end -}}

{{/*
DATABASE_URL, COURSES_STORE_URL and REDIS_URL (dict "root" $ "reader" <bool>; reader: the
read-only database login of query-api, otherwise the projectors' login, which owns the read
models and may do nothing else): built from the in-chart databases' Secrets
(the password stays in one Secret; Kubernetes expands $(VAR)), or taken from
externalDatabases.existingSecret. An unset COURSES_STORE_URL puts courses in Postgres; an
unset REDIS_URL turns the cache off.
*/}}
{{- define "school.readModelsEnv" -}}
{{- $reader := .reader -}}
{{- with .root -}}
{{- $external := .Values.externalDatabases.existingSecret -}}
{{- if .Values.postgresql.enabled }}
{{- /* query-api logs in as school_query, a member of school_reader (read-only); the
projectors as school_projector (no superuser; creates and owns the read models' tables). */}}
- name: SCHOOL_POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef: { name: {{ include "school.postgresql.secret" . }}, key: {{ ternary "QUERY_PASSWORD" "PROJECTOR_PASSWORD" $reader }} }
- name: DATABASE_URL
  value: "postgres://{{ ternary "school_query" "school_projector" $reader }}:$(SCHOOL_POSTGRES_PASSWORD)@{{ include "school.postgresql.fullname" . }}:5432/{{ .Values.postgresql.database }}"
{{- else }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef: { name: {{ required "externalDatabases.existingSecret (with DATABASE_URL) is required when postgresql.enabled is false" $external }}, key: {{ ternary .Values.externalDatabases.queryDatabaseUrlKey .Values.externalDatabases.projectorDatabaseUrlKey $reader }} }
{{- end }}
{{- if .Values.mongodb.enabled }}
{{- /* query-api logs in as school_query (read), the projectors as school_projector
(readWrite), both on the school database only, where the init script made them. */}}
- name: SCHOOL_MONGODB_PASSWORD
  valueFrom:
    secretKeyRef: { name: {{ include "school.mongodb.secret" . }}, key: {{ ternary "QUERY_PASSWORD" "PROJECTOR_PASSWORD" $reader }} }
- name: COURSES_STORE_URL
  value: "mongodb://{{ ternary "school_query" "school_projector" $reader }}:$(SCHOOL_MONGODB_PASSWORD)@{{ include "school.mongodb.fullname" . }}:27017/{{ .Values.mongodb.database }}?authSource={{ .Values.mongodb.database }}"
{{- else if $external }}
- name: COURSES_STORE_URL
  valueFrom:
    secretKeyRef: { name: {{ $external }}, key: {{ ternary .Values.externalDatabases.queryCoursesStoreUrlKey .Values.externalDatabases.projectorCoursesStoreUrlKey $reader }}, optional: true }
{{- end }}
{{- if .Values.redis.enabled }}
- name: SCHOOL_REDIS_PASSWORD
  valueFrom:
    secretKeyRef: { name: {{ include "school.redis.secret" . }}, key: REDIS_PASSWORD }
- name: REDIS_URL
  value: "redis://:$(SCHOOL_REDIS_PASSWORD)@{{ include "school.redis.fullname" . }}:6379"
{{- else if $external }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef: { name: {{ $external }}, key: REDIS_URL, optional: true }
{{- end }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by every pod of the chart's own image. */}}
{{- define "school.podSettings" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- include "school.imagePullSecrets" . }}
{{- end -}}
