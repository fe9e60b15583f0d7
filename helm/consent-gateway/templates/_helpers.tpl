{{/* Chart name, overridable. */}}
{{- define "consent-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: "<release>-<chart>", or the release name when it already contains the chart name. */}}
{{- define "consent-gateway.fullname" -}}
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

{{- define "consent-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "consent-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "consent-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "consent-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Stops rendering with one line when values contradict what the chart wires itself: the ports
and the audit path must match the probes, the Service and the volume, so they are not
settable inside `config`.
*/}}
{{- define "consent-gateway.validate" -}}
{{- if not (has .Values.mode (list "standalone" "sidecar")) }}
{{- fail (printf "mode must be standalone or sidecar, got %q" (toString .Values.mode)) }}
{{- end }}
{{- if not (has .Values.workload (list "statefulset" "deployment")) }}
{{- fail (printf "workload must be statefulset or deployment, got %q" (toString .Values.workload)) }}
{{- end }}
{{- if le (int .Values.terminationGracePeriodSeconds) (add (int .Values.preStopSleepSeconds) 10) }}
{{- fail (printf "terminationGracePeriodSeconds %d must exceed preStopSleepSeconds %d plus the gateway's 10 s shutdown" (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSleepSeconds)) }}
{{- end }}
{{- if hasKey .Values.config "listen" }}
{{- fail "config.listen is set by the chart: use ports.proxy and workers" }}
{{- end }}
{{- if hasKey .Values.config "admin" }}
{{- fail "config.admin is set by the chart: use ports.admin" }}
{{- end }}
{{- if hasKey (.Values.config.audit | default dict) "path" }}
{{- fail "config.audit.path is set by the chart: the audit log lives on the persistence volume" }}
{{- end }}
{{- if and (eq .Values.mode "standalone") (not (.Values.config.upstream | default dict).url) }}
{{- fail "config.upstream.url is required in standalone mode" }}
{{- end }}
{{- if and (eq .Values.mode "sidecar") (has (int .Values.sidecar.fhirPort) (list (int .Values.ports.proxy) (int .Values.ports.admin))) }}
{{- fail (printf "sidecar.fhirPort %d collides with ports.proxy or ports.admin in the shared pod network" (int .Values.sidecar.fhirPort)) }}
{{- end }}
{{- end }}

{{/* gateway.yaml: the user's config plus the listeners the pod wiring depends on. */}}
{{- define "consent-gateway.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $upstream := deepCopy (.Values.config.upstream | default dict) }}
{{- if eq .Values.mode "sidecar" }}
{{- $_ := set $upstream "url" (printf "http://127.0.0.1:%d%s" (int .Values.sidecar.fhirPort) .Values.sidecar.fhirBasePath) }}
{{- end }}
{{- $_ := set $config "upstream" $upstream }}
{{- /* 0.0.0.0: kubelet probes and Prometheus connect to the pod IP, not to loopback. */}}
{{- $_ := set $config "listen" (dict "host" "0.0.0.0" "port" (int .Values.ports.proxy) "workers" (int .Values.workers)) }}
{{- /* The officer's pages list who saw which sensitive records: not for monitoring's peers. */}}
{{- $_ := set $config "admin" (dict "host" "0.0.0.0" "port" (int .Values.ports.admin) "officer_from" .Values.officerFrom) }}
{{- toYaml $config }}
{{- end }}

{{- define "consent-gateway.envSecretName" -}}
{{- if .Values.secret.existingEnvSecret }}
{{- .Values.secret.existingEnvSecret }}
{{- else if .Values.secret.env }}
{{- printf "%s-env" (include "consent-gateway.fullname" .) }}
{{- end }}
{{- end }}

{{- define "consent-gateway.filesSecretName" -}}
{{- if .Values.secret.existingFilesSecret }}
{{- .Values.secret.existingFilesSecret }}
{{- else if .Values.secret.files }}
{{- printf "%s-files" (include "consent-gateway.fullname" .) }}
{{- end }}
{{- end }}

{{- define "consent-gateway.pagingKeySecretName" -}}
{{- default (printf "%s-paging-key" (include "consent-gateway.fullname" .)) .Values.pagingKey.existingSecret }}
{{- end }}

{{- define "consent-gateway.auditClaimName" -}}
{{- default (printf "%s-audit" (include "consent-gateway.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* Restart pods when the config or the chart-made secrets change. */}}
{{- define "consent-gateway.checksums" -}}
checksum/config: {{ include "consent-gateway.config" . | sha256sum }}
checksum/secret: {{ toYaml .Values.secret | sha256sum }}
{{- end }}

{{/*
The gateway container. The standalone Deployment and the sidecar snippet both render this one
definition, so the snippet is exactly what the chart runs.
*/}}
{{- define "consent-gateway.container" -}}
- name: consent-gateway
  image: {{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["serve", "--config", "/etc/consent-gateway/gateway.yaml"]
  ports:
    - name: gateway
      containerPort: {{ int .Values.ports.proxy }}
      protocol: TCP
    - name: gateway-admin
      containerPort: {{ int .Values.ports.admin }}
      protocol: TCP
  env:
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    # One audit file per pod: replicas sharing the volume never interleave their lines.
    - name: GATEWAY_AUDIT__PATH
      value: /var/lib/consent-gateway/audit-$(POD_NAME).jsonl
    # One paging key for every pod: a link one pod handed out opens at any other.
    - name: GATEWAY_ENFORCEMENT__PAGING_KEY_FILE
      value: /var/run/secrets/consent-gateway-paging/paging.key
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with include "consent-gateway.envSecretName" . }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: gateway-admin
    {{- toYaml .Values.livenessProbe | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: gateway-admin
    {{- toYaml .Values.readinessProbe | nindent 4 }}
  {{- if .Values.preStopSleepSeconds }}
  lifecycle:
    # Keep serving while the endpoint removal reaches every kube-proxy and ingress; only then
    # does SIGTERM start the gateway's own drain (new connections refused, 503s at the bound).
    preStop:
      exec:
        command: ["sleep", "{{ int .Values.preStopSleepSeconds }}"]
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: consent-gateway-config
      mountPath: /etc/consent-gateway
      readOnly: true
    - name: consent-gateway-audit
      mountPath: /var/lib/consent-gateway
    - name: consent-gateway-tmp
      mountPath: /tmp
    - name: consent-gateway-paging-key
      mountPath: /var/run/secrets/consent-gateway-paging
      readOnly: true
    {{- if include "consent-gateway.filesSecretName" . }}
    - name: consent-gateway-secrets
      mountPath: /var/run/secrets/consent-gateway
      readOnly: true
    {{- end }}
{{- end }}

{{/* The volumes the container mounts. */}}
{{- define "consent-gateway.volumes" -}}
- name: consent-gateway-config
  configMap:
    name: {{ include "consent-gateway.fullname" . }}-config
{{- if not (include "consent-gateway.perPodClaim" .) }}
- name: consent-gateway-audit
  {{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "consent-gateway.auditClaimName" . }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end }}
- name: consent-gateway-tmp
  emptyDir: {}
- name: consent-gateway-paging-key
  secret:
    secretName: {{ include "consent-gateway.pagingKeySecretName" . }}
    items:
      - key: paging.key
        path: paging.key
{{- with include "consent-gateway.filesSecretName" . }}
- name: consent-gateway-secrets
  secret:
    secretName: {{ . }}
{{- end }}
{{- end }}

{{/* The pod spec both standalone workloads run (Deployment and StatefulSet). */}}
{{- define "consent-gateway.podSpecRest" -}}
# Service links would inject <SERVICE>_PORT-style variables; a Service whose name starts
# with "gateway" would then set GATEWAY_* keys the config loader rejects at start-up.
enableServiceLinks: false
# The gateway never calls the Kubernetes API.
automountServiceAccountToken: false
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
containers:
  {{- include "consent-gateway.container" . | nindent 2 }}
volumes:
  {{- include "consent-gateway.volumes" . | nindent 2 }}
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
{{- with .Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* True (non-empty) when each pod gets its own audit claim from the StatefulSet's template. */}}
{{- define "consent-gateway.perPodClaim" -}}
{{- if and (eq .Values.mode "standalone") (eq .Values.workload "statefulset") .Values.persistence.enabled (not .Values.persistence.existingClaim) }}true{{ end }}
{{- end }}

{{/* The workload kind the autoscaler and the notes name. */}}
{{- define "consent-gateway.workloadKind" -}}
{{- if eq .Values.workload "statefulset" }}StatefulSet{{ else }}Deployment{{ end }}
{{- end }}
