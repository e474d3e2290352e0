{{/*
Stop the rendering with a message. `helm install`/`template` stop at `fail`; `helm lint` turns
`fail` into an INFO line and carries on, so the include of a template that cannot exist stops it
too, with the same message in its error. Call with the message: (include "switchyard.fail" "...").
*/}}
{{- define "switchyard.fail" -}}
{{- fail . }}
{{- include (printf "ERROR: %s" .) dict }}
{{- end }}

{{/*
The chart name, or nameOverride.
*/}}
{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: fullnameOverride, else <release>-<name> (just <release> when it
already contains the name).
*/}}
{{- define "switchyard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
<fullname>-<component>. Service names are DNS labels, so a name over 63 characters fails the
rendering instead of being cut (a cut name could collide with another component's).
Call with (dict "root" $ "component" "edge").
*/}}
{{- define "switchyard.componentName" -}}
{{- $name := printf "%s-%s" (include "switchyard.fullname" .root) .component }}
{{- if gt (len $name) 63 }}
{{- include "switchyard.fail" (printf "the resource name %q is longer than 63 characters: choose a shorter release name or fullnameOverride" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "switchyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of one component. Call with (dict "root" $ "component" "edge").
*/}}
{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
All labels of one component. Call with (dict "root" $ "component" "edge").
*/}}
{{- define "switchyard.labels" -}}
helm.sh/chart: {{ include "switchyard.chart" .root }}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: switchyard
{{- end }}

{{/*
Labels every pod of this release carries, and so what "a pod of this release" matches.
*/}}
{{- define "switchyard.releasePodSelector" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: switchyard
{{- end }}

{{/*
The image of every Switchyard container (Envoy's too).
*/}}
{{- define "switchyard.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
The catalog text: catalog.content, else the chart's copy of the default catalog.
*/}}
{{- define "switchyard.catalog" -}}
{{- if .Values.catalog.content }}
{{- .Values.catalog.content }}
{{- else }}
{{- .Files.Get "files/catalog.yaml" }}
{{- end }}
{{- end }}

{{/*
Fixed container ports of the services and of each vendor's adapter.
*/}}
{{- define "switchyard.ports" -}}
edge: 50051
edgeHttp: 8000
router: 50052
ledger: 50053
health: 50054
cache: 50055
adapter:
  openai: 50061
  anthropic: 50062
  gemini: 50063
  mistral: 50064
  cohere: 50065
  openai_compatible: 50066
{{- end }}

{{/*
The adapters with adapterDefaults filled in, as YAML {adapters: [...]}, each item with its
Kubernetes name part (`component`, `adapter-<vendor with _ as ->`) and port. A vendor listed twice
fails the rendering.
*/}}
{{- define "switchyard.adapters" -}}
{{- $ports := include "switchyard.ports" . | fromYaml }}
{{- $seen := dict }}
{{- $out := list }}
{{- range $i, $item := .Values.adapters }}
{{- if hasKey $seen $item.vendor }}
{{- include "switchyard.fail" (printf "adapters[%d].vendor: %q is listed twice; each vendor may have one adapter entry" $i $item.vendor) }}
{{- end }}
{{- $_ := set $seen $item.vendor true }}
{{- $merged := mergeOverwrite (deepCopy $.Values.adapterDefaults) (deepCopy $item) }}
{{- $_ = set $merged "component" (printf "adapter-%s" (replace "_" "-" $item.vendor)) }}
{{- $_ = set $merged "port" (get $ports.adapter $item.vendor) }}
{{- $out = append $out $merged }}
{{- end }}
{{- toYaml (dict "adapters" $out) }}
{{- end }}

{{/*
The OTLP endpoint the services and Envoy export to: tracing.otlpEndpoint, else the embedded
Jaeger when enabled, else empty (tracing off).
*/}}
{{- define "switchyard.otlpEndpoint" -}}
{{- if .Values.tracing.otlpEndpoint }}
{{- .Values.tracing.otlpEndpoint }}
{{- else if .Values.jaeger.enabled }}
{{- printf "http://%s:4317" (include "switchyard.componentName" (dict "root" . "component" "jaeger")) }}
{{- end }}
{{- end }}

{{/*
Tracing env (a YAML list body), for the services and Envoy.
*/}}
{{- define "switchyard.tracingEnv" -}}
{{- $endpoint := include "switchyard.otlpEndpoint" . }}
{{- if $endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $endpoint | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .Values.tracing.sampleRatio | quote }}
{{- end }}
{{- end }}

{{/*
A URL from a Secret (when secret.name is set) or a literal, as one env entry; nothing when neither.
Call with (dict "name" "DATABASE_URL" "values" "database" "secret" .Values.database.existingSecret
"value" "...").
*/}}
{{- define "switchyard.urlEnv" -}}
{{- if .secret.name }}
{{- if not .secret.key }}
{{- include "switchyard.fail" (printf "%s.existingSecret.key: name the key of Secret %q that holds %s" .values .secret.name .name) }}
{{- end }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret.name | quote }}
      key: {{ .secret.key | quote }}
{{- else if .value }}
- name: {{ .name }}
  value: {{ .value | quote }}
{{- end }}
{{- end }}

{{/*
Env every Switchyard service container shares (a YAML list body): logging, state, catalog, peers
through Envoy's mesh listener, Redis, the database and tracing.
*/}}
{{- define "switchyard.sharedEnv" -}}
{{- $mesh := printf "%s:%d" (include "switchyard.componentName" (dict "root" . "component" "mesh")) (int .Values.envoy.meshPort) }}
- name: SWITCHYARD_HOST
  value: "0.0.0.0"
- name: SWITCHYARD_LOG_FORMAT
  value: json
- name: SWITCHYARD_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: SWITCHYARD_STATE_DIR
  value: /var/lib/switchyard
- name: SWITCHYARD_CATALOG
  value: /etc/switchyard/catalog.yaml
{{- range $peer := list "router" "ledger" "health" "cache" }}
- name: SWITCHYARD_{{ upper $peer }}_TARGET
  value: {{ $mesh | quote }}
{{- end }}
{{- range $adapter := (include "switchyard.adapters" . | fromYaml).adapters }}
- name: SWITCHYARD_ADAPTER_{{ upper $adapter.vendor }}_TARGET
  value: {{ printf "%s@%s" $adapter.component $mesh | quote }}
{{- end }}
{{- $redisUrl := .Values.redis.url }}
{{- if and (not $redisUrl) .Values.redis.embedded.enabled }}
{{- $redisUrl = printf "redis://%s:6379/0" (include "switchyard.componentName" (dict "root" . "component" "redis")) }}
{{- end }}
{{- include "switchyard.urlEnv" (dict "name" "REDIS_URL" "values" "redis" "secret" .Values.redis.existingSecret "value" $redisUrl) }}
{{- include "switchyard.urlEnv" (dict "name" "DATABASE_URL" "values" "database" "secret" .Values.database.existingSecret "value" (include "switchyard.databaseUrl" .)) }}
{{- include "switchyard.tracingEnv" . }}
{{- end }}

{{/*
Pod-level settings every pod of the release shares (service account, security, scheduling).
*/}}
{{- define "switchyard.podSpecCommon" -}}
serviceAccountName: {{ include "switchyard.fullname" . }}
automountServiceAccountToken: false
enableServiceLinks: false
terminationGracePeriodSeconds: 30
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The security context of every container.
*/}}
{{- define "switchyard.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
{{- end }}

{{/*
Pod template annotations: the catalog's checksum (a catalog change rolls the pods) and podAnnotations.
*/}}
{{- define "switchyard.podAnnotations" -}}
checksum/catalog: {{ include "switchyard.catalog" . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
An HPA (autoscaling/v2, when cfg.autoscaling.enabled) and a PDB (policy/v1, when cfg.pdb.enabled)
for one Deployment. Call with (dict "root" $ "component" "edge" "cfg" .Values.edge "key" "edge").
*/}}
{{- define "switchyard.scaling" -}}
{{- $name := include "switchyard.componentName" . }}
{{- if .cfg.autoscaling.enabled }}
{{- if gt (int .cfg.autoscaling.minReplicas) (int .cfg.autoscaling.maxReplicas) }}
{{- include "switchyard.fail" (printf "%s.autoscaling: minReplicas (%d) is above maxReplicas (%d)" .key (int .cfg.autoscaling.minReplicas) (int .cfg.autoscaling.maxReplicas)) }}
{{- end }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  labels:
    {{- include "switchyard.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ .cfg.autoscaling.minReplicas }}
  maxReplicas: {{ .cfg.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .cfg.autoscaling.targetCPUUtilizationPercentage }}
{{- end }}
{{- if .cfg.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $name }}
  labels:
    {{- include "switchyard.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .cfg.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "switchyard.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/*
One Switchyard service: Deployment, headless Service, HPA and PDB. Call with (dict "root" $
"component" "edge" "key" "edge" "cfg" .Values.edge "args" (list "serve" "edge") "port" 50051
"httpPort" 8000 (edge only) "env" (list (dict "name" ... "value" ...)) (this service's own settings)
"providerKeys" true (adapters only)).
*/}}
{{- define "switchyard.service" -}}
{{- $root := .root }}
{{- $name := include "switchyard.componentName" . }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "switchyard.labels" . | nindent 4 }}
spec:
  {{- if not .cfg.autoscaling.enabled }}
  replicas: {{ .cfg.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "switchyard.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "switchyard.labels" . | nindent 8 }}
      annotations:
        {{- include "switchyard.podAnnotations" $root | nindent 8 }}
    spec:
      {{- include "switchyard.podSpecCommon" $root | nindent 6 }}
      containers:
        - name: {{ .component }}
          image: {{ include "switchyard.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            {{- toYaml .args | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ int .port }}
              protocol: TCP
            {{- if .httpPort }}
            - name: http
              containerPort: {{ .httpPort }}
              protocol: TCP
            {{- end }}
          env:
            - name: SWITCHYARD_PORT
              value: {{ int .port | quote }}
            {{- if .httpPort }}
            - name: SWITCHYARD_HTTP_PORT
              value: {{ .httpPort | quote }}
            {{- end }}
            {{- range .env }}
            - name: {{ .name }}
              value: {{ .value | quote }}
            {{- end }}
            {{- include "switchyard.sharedEnv" $root | trim | nindent 12 }}
            {{- with $root.Values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with .cfg.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- if and .providerKeys $root.Values.providerKeys.existingSecret }}
          envFrom:
            - secretRef:
                name: {{ $root.Values.providerKeys.existingSecret | quote }}
          {{- end }}
          startupProbe:
            grpc:
              port: {{ int .port }}
            periodSeconds: 2
            failureThreshold: 30
          livenessProbe:
            grpc:
              port: {{ int .port }}
            periodSeconds: 10
            failureThreshold: 3
          readinessProbe:
            grpc:
              port: {{ int .port }}
            periodSeconds: 5
          resources:
            {{- toYaml .cfg.resources | nindent 12 }}
          securityContext:
            {{- include "switchyard.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            - name: catalog
              mountPath: /etc/switchyard
              readOnly: true
            - name: state
              mountPath: /var/lib/switchyard
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: catalog
          configMap:
            name: {{ include "switchyard.componentName" (dict "root" $root "component" "catalog") }}
        - name: state
          emptyDir: {}
        - name: tmp
          emptyDir: {}
---
# Headless: Envoy resolves it with STRICT_DNS and balances HTTP/2 requests across the pods.
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "switchyard.labels" . | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "switchyard.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ int .port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- if .httpPort }}
    - name: http
      port: {{ .httpPort }}
      targetPort: http
      protocol: TCP
      appProtocol: http
    {{- end }}
{{ include "switchyard.scaling" . }}
{{- end }}

{{/*
The database URL from values: database.url, else the embedded PostgreSQL's when it is enabled
(and no Secret is named), else empty.
*/}}
{{- define "switchyard.databaseUrl" -}}
{{- if .Values.database.url }}
{{- .Values.database.url }}
{{- else if include "switchyard.embeddedDatabase" . }}
{{- printf "postgresql://switchyard@%s:5432/switchyard" (include "switchyard.componentName" (dict "root" . "component" "postgresql")) }}
{{- end }}
{{- end }}

{{/*
"true" when the embedded PostgreSQL is rendered: enabled, and no other database is configured.
*/}}
{{- define "switchyard.embeddedDatabase" -}}
{{- if and .Values.database.embedded.enabled (not .Values.database.url) (not .Values.database.existingSecret.name) }}true{{- end }}
{{- end }}
