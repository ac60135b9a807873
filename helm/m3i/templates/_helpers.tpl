{{/*
Names, labels and the shared pod/container policy of the m3i chart.
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "m3i.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of object names: fullnameOverride, else the release name (plus the chart name
unless the release name already contains it). Truncated to leave room for suffixes
such as -pushgateway within 63 characters.
*/}}
{{- define "m3i.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* helm.sh/chart label value. */}}
{{- define "m3i.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of one component: include "m3i.selectorLabels" (dict "ctx" $ "component" "minio")
*/}}
{{- define "m3i.selectorLabels" -}}
app.kubernetes.io/name: {{ include "m3i.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Standard labels of one component: include "m3i.labels" (dict "ctx" $ "component" "minio")
*/}}
{{- define "m3i.labels" -}}
helm.sh/chart: {{ include "m3i.chart" .ctx }}
{{ include "m3i.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: m3i
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The namespace of training jobs: launch.namespace or the release namespace. */}}
{{- define "m3i.trainNamespace" -}}
{{- default .Release.Namespace .Values.launch.namespace }}
{{- end }}

{{/* Bytes of a memory quantity (digits, an optional fraction, an optional suffix), as a float;
the schema has checked its form (definitions.podMemory). */}}
{{- define "m3i.quantityBytes" -}}
{{- $q := toString . }}
{{- $digits := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- $units := dict "" 1.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 }}
{{- mulf (float64 $digits) (get $units (trimPrefix $digits $q)) }}
{{- end }}

{{/* Whether the bundled MinIO runs ("true" or ""). */}}
{{- define "m3i.minio" -}}
{{- if not .Values.storage.external.endpoint }}true{{ end }}
{{- end }}

{{/* In-cluster URL of the bundled MinIO. */}}
{{- define "m3i.minioURL" -}}
{{- printf "http://%s-minio.%s.svc:%d" (include "m3i.fullname" .) .Release.Namespace (int .Values.storage.minio.port) }}
{{- end }}

{{/* The S3 endpoint m3i uses: the external one or the bundled MinIO. */}}
{{- define "m3i.s3Endpoint" -}}
{{- default (include "m3i.minioURL" .) .Values.storage.external.endpoint }}
{{- end }}

{{/* In-cluster URL of the Pushgateway. */}}
{{- define "m3i.pushgatewayURL" -}}
{{- printf "http://%s-pushgateway.%s.svc:%d" (include "m3i.fullname" .) .Release.Namespace (int .Values.pushgateway.port) }}
{{- end }}

{{/* PriorityClass of training pods ("" for none). */}}
{{- define "m3i.priorityClassName" -}}
{{- if .Values.launch.priorityClassName }}
{{- .Values.launch.priorityClassName }}
{{- else if .Values.priorityClass.create }}
{{- .Values.priorityClass.name }}
{{- end }}
{{- end }}

{{/* ServiceAccount of the pipeline hook. */}}
{{- define "m3i.hookServiceAccount" -}}
{{- default (printf "%s-pipeline-hook" (include "m3i.fullname" .)) .Values.pipeline.hook.serviceAccount.name }}
{{- end }}

{{/*
An image reference: include "m3i.image" (dict "image" .Values.x.image "default" "tag")
repository@digest when a digest is set, else repository:tag (tag defaults to "default").
*/}}
{{- define "m3i.image" -}}
{{- $tag := default .default .image.tag }}
{{- if eq $tag "latest" }}
{{- fail (printf "image %s: the moving tag 'latest' is not allowed; pin a version or a digest" .image.repository) }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* The m3i CPU image (hook, bucket job, tests). */}}
{{- define "m3i.m3iImage" -}}
{{- include "m3i.image" (dict "image" .Values.image "default" .Chart.AppVersion) }}
{{- end }}

{{/* Pod-level securityContext for a UID: include "m3i.podSecurityContext" 1000 */}}
{{- define "m3i.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container securityContext (restricted Pod Security Standard) for a UID. */}}
{{- define "m3i.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Env vars of the S3 Secret, by reference (never a value). */}}
{{- define "m3i.s3Env" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.storage.existingSecret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.storage.existingSecret }}
      key: AWS_SECRET_ACCESS_KEY
- name: AWS_ENDPOINT_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.storage.existingSecret }}
      key: AWS_ENDPOINT_URL
- name: AWS_REGION
  valueFrom:
    secretKeyRef:
      name: {{ .Values.storage.existingSecret }}
      key: AWS_REGION
      optional: true
{{- end }}

{{/* Pod spec fields shared by the chart's own short-lived m3i pods (jobs and tests). */}}
{{- define "m3i.jobPodSpec" -}}
restartPolicy: Never
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- include "m3i.podSecurityContext" (int .Values.image.runAsUser) | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* imagePullSecrets of a long-running pod. */}}
{{- define "m3i.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Checks across values that the schema cannot express. */}}
{{- define "m3i.validate" -}}
{{- if and .Values.storage.generateSecret .Values.storage.external.endpoint }}
{{- fail "storage.generateSecret only works with the bundled MinIO; with storage.external.endpoint create the Secret yourself" }}
{{- end }}
{{- if and (eq .Values.launch.kind "trainjob") (ne (int .Values.launch.rdzvPort) 29500) }}
{{- fail (printf "launch.rdzvPort=%v cannot apply with launch.kind=trainjob: Kubeflow Trainer always uses port 29500" .Values.launch.rdzvPort) }}
{{- end }}
{{- with .Values.launch }}
{{- if and (kindIs "invalid" .nprocPerNode) (not (kindIs "invalid" .gpusPerNode)) (gt (int .gpusPerNode) 8) }}
{{- fail (printf "launch.gpusPerNode=%v runs one rank per GPU, more than the 8 whose metrics ports the chart's runtime and monitors cover; set launch.nprocPerNode (at most 8)" .gpusPerNode) }}
{{- end }}
{{- if and .rdmaResource (not $.Values.namespace.allowPrivileged) }}
{{- fail (printf "launch.rdmaResource=%s adds capability IPC_LOCK, which only a namespace enforcing Pod Security \"privileged\" admits: set namespace.allowPrivileged=true to say you mean it (with namespace.podSecurity=privileged when the chart creates the namespace, or label the training namespace yourself)" .rdmaResource) }}
{{- end }}
{{- if and .rdmaResource $.Values.namespace.create (ne $.Values.namespace.podSecurity "privileged") (eq (include "m3i.trainNamespace" $) $.Release.Namespace) }}
{{- fail (printf "launch.rdmaResource=%s adds capability IPC_LOCK, which Pod Security %q refuses: set namespace.podSecurity=privileged, or train in a namespace (launch.namespace) that enforces privileged" .rdmaResource $.Values.namespace.podSecurity) }}
{{- end }}
{{- $memory := include "m3i.quantityBytes" (default "16Gi" .memory) | float64 }}
{{- $shm := include "m3i.quantityBytes" (default "4Gi" .shmSize) | float64 }}
{{- if ge $shm $memory }}
{{- fail (printf "launch.shmSize=%s must be below launch.memory=%s: /dev/shm counts against the pod's memory (null is m3i's default: memory 16Gi, shmSize 4Gi)" (default "null" .shmSize) (default "null" .memory)) }}
{{- end }}
{{- end }}
{{- if and (eq .Values.namespace.podSecurity "privileged") (not .Values.namespace.allowPrivileged) }}
{{- fail "namespace.podSecurity=privileged lets every pod of the namespace run privileged (host namespaces, any capability, host paths): set namespace.allowPrivileged=true to say you mean it (launch.rdmaResource needs it), or keep restricted" }}
{{- end }}
{{- range $what, $ns := dict "the release namespace (helm -n)" .Release.Namespace "the training namespace (launch.namespace, or the release namespace)" (include "m3i.trainNamespace" .) }}
{{- if and (hasPrefix "kube-" $ns) (not $.Values.namespace.allowSystem) }}
{{- fail (printf "%s is %s, a Kubernetes system namespace (kube-*): pick a namespace of your own, or set namespace.allowSystem=true to say you mean it" $what $ns) }}
{{- end }}
{{- end }}
{{- with .Values.kueue.localQueue }}
{{- if and $.Values.kueue.enabled .create .name (ne .name $.Values.launch.queue) }}
{{- fail (printf "kueue.localQueue.name=%s differs from launch.queue=%s, the queue the jobs' kueue.x-k8s.io/queue-name label names" .name $.Values.launch.queue) }}
{{- end }}
{{- end }}
{{- end }}
