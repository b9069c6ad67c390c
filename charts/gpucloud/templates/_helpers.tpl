{{/* Names. Cluster-scoped objects carry the full name so that releases do not collide. */}}
{{- define "gpucloud.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gpucloud.fullname" -}}
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

{{/* "<fullname>-<component>", e.g. include "gpucloud.component" (list . "agent") */}}
{{- define "gpucloud.component" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "gpucloud.fullname" $root | trunc 50 | trimSuffix "-") (index . 1) -}}
{{- end -}}

{{- define "gpucloud.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "gpucloud.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpucloud
{{- end -}}

{{/* Selector labels of one component: include "gpucloud.selectorLabels" (list . "api") */}}
{{- define "gpucloud.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "gpucloud.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "gpucloud.componentLabels" -}}
{{ include "gpucloud.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* image reference: include "gpucloud.image" (list . .Values.api.image) */}}
{{- define "gpucloud.image" -}}
{{- $root := index . 0 -}}
{{- $img := index . 1 -}}
{{- $registry := $root.Values.global.imageRegistry -}}
{{- $repo := ternary $img.repository (printf "%s/%s" $registry $img.repository) (empty $registry) -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default (default $root.Chart.AppVersion $root.Values.global.imageTag) $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "gpucloud.serviceAccountName" -}}
{{- include "gpucloud.component" . -}}
{{- end -}}

{{/* The agent's Kubernetes username, as the API's TokenReview sees it. */}}
{{- define "gpucloud.agentUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "gpucloud.component" (list . "agent")) -}}
{{- end -}}

{{- define "gpucloud.apiURL" -}}
{{- printf "http://%s.%s.svc:%d" (include "gpucloud.component" (list . "api")) .Release.Namespace (int .Values.api.service.port) -}}
{{- end -}}

{{- define "gpucloud.pricebookName" -}}
{{- .Values.pricebook.name -}}
{{- end -}}

{{- define "gpucloud.ledgerClaim" -}}
{{- default (include "gpucloud.component" (list . "ledger")) .Values.database.sqlite.existingClaim -}}
{{- end -}}

{{/* Env var with the ledger URL, shared by the operator, the API and the gateway. */}}
{{- define "gpucloud.databaseEnv" -}}
{{- $name := index . 1 -}}
{{- $root := index . 0 -}}
{{- $db := $root.Values.database -}}
- name: {{ $name }}
{{- if eq $db.type "sqlite" }}
  value: {{ printf "sqlite:///%s/ledger.db" $db.sqlite.mountPath | quote }}
{{- else if $db.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ $db.existingSecret }}
      key: {{ $db.existingSecretKey }}
{{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ include "gpucloud.component" (list $root "database") }}
      key: url
{{- end }}
{{- end -}}

{{/* With SQLite every process that opens the ledger must share one node (one RWO volume). */}}
{{- define "gpucloud.sqliteAffinity" -}}
{{- if eq .Values.database.type "sqlite" -}}
affinity:
  podAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "gpucloud.selectorLabels" (list . "operator") | nindent 12 }}
{{- end }}
{{- end -}}

{{- define "gpucloud.ledgerVolume" -}}
- name: ledger
  persistentVolumeClaim:
    claimName: {{ include "gpucloud.ledgerClaim" . }}
{{- end -}}

{{- define "gpucloud.ledgerMount" -}}
- name: ledger
  mountPath: {{ .Values.database.sqlite.mountPath }}
{{- end -}}

{{/* Checks across values that a JSON schema cannot express with a clear message. */}}
{{- define "gpucloud.validate" -}}
{{- $db := .Values.database -}}
{{- if and (eq $db.type "sqlite") (gt (int .Values.api.replicas) 1) -}}
{{- fail (printf "api.replicas: %d replicas need database.type=postgresql; SQLite is for a single API replica only" (int .Values.api.replicas)) -}}
{{- end -}}
{{- if and (eq $db.type "sqlite") (gt (int .Values.gateway.replicas) 1) .Values.gateway.billing.enabled -}}
{{- fail (printf "gateway.replicas: %d billing gateway replicas need database.type=postgresql; SQLite is for a single replica only" (int .Values.gateway.replicas)) -}}
{{- end -}}
{{- if eq $db.type "postgresql" -}}
{{- if and (not $db.url) (not $db.existingSecret) -}}
{{- fail "database: type postgresql needs database.url or database.existingSecret" -}}
{{- end -}}
{{- if and $db.url (not (regexMatch "^postgresql(\\+psycopg)?://" $db.url)) -}}
{{- fail (printf "database.url: %q must start with postgresql:// or postgresql+psycopg://" $db.url) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $db.type "sqlite") (or $db.url $db.existingSecret) -}}
{{- fail "database: url/existingSecret are for type postgresql; set database.type=postgresql" -}}
{{- end -}}
{{- if ne (int .Values.operator.replicas) 1 -}}
{{- fail "operator.replicas: must be 1 (Kopf peering keeps a second replica idle; run one)" -}}
{{- end -}}
{{- if and (eq .Values.cloudDisks.storage "nfs") (not .Values.cloudDisks.nfs.server) -}}
{{- fail "cloudDisks.nfs.server: storage nfs needs the NFS server exporting the disks" -}}
{{- end -}}
{{- range $key := list "disk_meter_node" "disk_nfs_server" "disk_nfs_path" -}}
{{- if and $.Values.cloudDisks.storage (hasKey $.Values.operator.config $key) -}}
{{- fail (printf "operator.config.%s: set by cloudDisks when cloudDisks.storage is set; remove it" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Cloud disks' shared root, as the operator and the shared-storage meter mount it at
     <agent.hostPaths.data>/disks (the layout the agent walks). */}}
{{- define "gpucloud.disksRoot" -}}
{{- printf "%s/disks" (trimSuffix "/" .Values.agent.hostPaths.data) -}}
{{- end -}}

{{- define "gpucloud.disksVolume" -}}
{{- with .Values.cloudDisks }}
- name: disks
  {{- if eq .storage "nfs" }}
  nfs:
    server: {{ .nfs.server | quote }}
    path: {{ printf "%s/disks" (trimSuffix "/" (default $.Values.agent.hostPaths.data .nfs.path)) | quote }}
  {{- else }}
  hostPath: {path: {{ include "gpucloud.disksRoot" $ | quote }}, type: Directory}
  {{- end }}
{{- end }}
{{- end -}}

{{/* The shared-storage meter's Kubernetes username: the API maps it to its reporter. */}}
{{- define "gpucloud.storageMeterUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "gpucloud.component" (list . "storage-meter")) -}}
{{- end -}}

{{/* The PriceBook spec; every price is quoted so it stays an exact decimal string. */}}
{{- define "gpucloud.pricebookSpec" -}}
{{- $pb := .Values.pricebook -}}
currency: {{ .Values.currency | quote }}
gpus:
{{- range $pb.gpus }}
  - product: {{ .product | quote }}
    {{- with .kind }}
    kind: {{ . | quote }}
    {{- end }}
    {{- with .resource }}
    resource: {{ . | quote }}
    {{- end }}
    payAsYouGoPerHour: {{ .payAsYouGoPerHour | quote }}
    {{- with .spotPerHour }}
    spotPerHour: {{ . | quote }}
    {{- end }}
    {{- with .packages }}
    packages:
      {{- range $period, $price := . }}
      {{ $period }}: {{ $price | quote }}
      {{- end }}
    {{- end }}
    {{- with .modelOnlinePerHour }}
    modelOnlinePerHour: {{ . | quote }}
    {{- end }}
{{- end }}
storage:
  {{- range $k, $v := $pb.storage }}
  {{ $k }}: {{ $v | quote }}
  {{- end }}
models:
  {{- range $k, $v := $pb.models }}
  {{ $k }}: {{ $v | quote }}
  {{- end }}
{{- end -}}

{{- define "gpucloud.validateGateway" -}}
{{- if and .Values.gateway.enabled .Values.gateway.billing.enabled (not .Values.pricebook.create) -}}
{{- fail "gateway.billing.enabled: needs pricebook.create=true (the gateway rates model usage with it)" -}}
{{- end -}}
{{- end -}}

{{/* A number or string as an env value. Helm reads YAML numbers as float64, which
toString would print as 2.592e+06; whole numbers are printed as integers. */}}
{{- define "gpucloud.envValue" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . | toString | quote -}}
{{- else -}}
{{- toString . | quote -}}
{{- end -}}
{{- end -}}

{{/* Tests and demos: billing time from a file on the node (testing.fileClock). */}}
{{- define "gpucloud.clockEnv" -}}
{{- with .Values.testing.fileClock }}
- name: GPUCLOUD_CLOCK
  value: {{ printf "file:/var/run/gpucloud-clock/%s" (base .) | quote }}
{{- end }}
{{- end -}}

{{- define "gpucloud.clockMount" -}}
{{- if .Values.testing.fileClock }}
- {name: clock, mountPath: /var/run/gpucloud-clock, readOnly: true}
{{- end }}
{{- end -}}

{{- define "gpucloud.clockVolume" -}}
{{- with .Values.testing.fileClock }}
- name: clock
  hostPath: {path: {{ dir . }}, type: DirectoryOrCreate}
{{- end }}
{{- end -}}

{{/* A component's container securityContext: non-root, read-only root, no capabilities,
     with the component's own securityContext value merged over it. */}}
{{- define "gpucloud.containerSecurityContext" -}}
{{- $default := dict "allowPrivilegeEscalation" false "readOnlyRootFilesystem" true "capabilities" (dict "drop" (list "ALL")) -}}
{{- toYaml (mergeOverwrite $default (deepCopy (default dict .))) -}}
{{- end -}}
