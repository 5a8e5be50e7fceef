{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "cxr-screen.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cxr-screen.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cxr-screen.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cxr-screen.isvcName" -}}
{{- default (include "cxr-screen.fullname" .) .Values.inferenceService.name -}}
{{- end -}}

{{- define "cxr-screen.mlflow.name" -}}
{{- printf "%s-mlflow" (include "cxr-screen.fullname" .) -}}
{{- end -}}

{{- define "cxr-screen.postgresql.name" -}}
{{- printf "%s-postgresql" (include "cxr-screen.fullname" .) -}}
{{- end -}}

{{- define "cxr-screen.drift.name" -}}
{{- printf "%s-drift" (include "cxr-screen.fullname" .) -}}
{{- end -}}

{{- define "cxr-screen.sweep.name" -}}
{{- printf "%s-sweep" (include "cxr-screen.fullname" .) -}}
{{- end -}}

{{/* Labels ------------------------------------------------------------------------------ */}}

{{- define "cxr-screen.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cxr-screen.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Call with (dict "root" $ "component" "mlflow"). */}}
{{- define "cxr-screen.labels" -}}
helm.sh/chart: {{ include "cxr-screen.chart" .root }}
{{ include "cxr-screen.selectorLabels" . }}
app.kubernetes.io/part-of: cxr-screen
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The label NetworkPolicies use to let a pod reach MLflow: the chart's jobs carry it. */}}
{{- define "cxr-screen.mlflowClientLabel" -}}
cxr-screen/mlflow-client: "true"
{{- end -}}

{{/* Images ------------------------------------------------------------------------------ */}}

{{/* Call with (dict "root" $ "image" .Values.images.jobs). */}}
{{- define "cxr-screen.image" -}}
{{- $registry := .root.Values.global.imageRegistry | default .image.registry -}}
{{- $ref := .image.repository -}}
{{- if $registry -}}
{{- $ref = printf "%s/%s" (trimSuffix "/" $registry) .image.repository -}}
{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $ref .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Empty when there are no pull secrets; use as {{- with include ... }}{{ . | nindent N }}{{- end }}. */}}
{{- define "cxr-screen.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets -}}
imagePullSecrets:
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{/* Endpoints --------------------------------------------------------------------------- */}}

{{/* The chart's MLflow Service, else mlflow.externalTrackingUri (may be empty: no tracking). */}}
{{- define "cxr-screen.mlflowTrackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s.%s.svc:%d" (include "cxr-screen.mlflow.name" .) .Release.Namespace (int .Values.mlflow.port) -}}
{{- else -}}
{{- .Values.mlflow.externalTrackingUri -}}
{{- end -}}
{{- end -}}

{{- define "cxr-screen.apiKeys.secretName" -}}
{{- .Values.inferenceService.apiKey.existingSecret | default (printf "%s-api-keys" (include "cxr-screen.fullname" .)) -}}
{{- end -}}

{{- define "cxr-screen.postgresql.secretName" -}}
{{- .Values.postgresql.auth.existingSecret | default (include "cxr-screen.postgresql.name" .) -}}
{{- end -}}

{{- define "cxr-screen.postgresql.enabled" -}}
{{- if and .Values.mlflow.enabled .Values.postgresql.enabled -}}true{{- end -}}
{{- end -}}

{{/* The audit-log claim the predictor writes and the drift job reads; empty: none. */}}
{{- define "cxr-screen.auditLog.claim" -}}
{{- if .Values.auditLog.existingClaim -}}
{{- .Values.auditLog.existingClaim -}}
{{- else if .Values.auditLog.create -}}
{{- printf "%s-audit-log" (include "cxr-screen.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "cxr-screen.sweep.sharedClaim" -}}
{{- .Values.sweep.sharedStorage.existingClaim | default (printf "%s-ray-results" (include "cxr-screen.fullname" .)) -}}
{{- end -}}

{{/* The RayJob template is needed when the sweep runs now or the drift job may start one. */}}
{{- define "cxr-screen.rayjob.needed" -}}
{{- if or .Values.sweep.enabled (and .Values.drift.enabled .Values.drift.retrain.enabled) -}}true{{- end -}}
{{- end -}}

{{/* Resources with an optional GPU count: (dict "resources" ... "gpu" N). */}}
{{- define "cxr-screen.resources" -}}
{{- $res := deepCopy (.resources | default dict) -}}
{{- if gt (int .gpu) 0 -}}
{{- $limits := get $res "limits" | default dict -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpu) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* TorchServe workers of the predictor: inferenceService.serving.workers, else the CPU request
     ("2", "1500m", 3) divided by threadsPerWorker, rounded down, at least 1. */}}
{{- define "cxr-screen.serving.workers" -}}
{{- $isvc := .Values.inferenceService -}}
{{- $threads := int ($isvc.serving.threadsPerWorker | default 1) -}}
{{- if $isvc.serving.workers -}}
{{- int $isvc.serving.workers -}}
{{- else -}}
{{- $cpu := toString (dig "requests" "cpu" "1" ($isvc.resources | default dict)) -}}
{{- $milli := 0 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $milli = int (trimSuffix "m" $cpu) -}}
{{- else -}}
{{- $milli = int (mulf (float64 $cpu) 1000) -}}
{{- end -}}
{{- max 1 (div $milli (mul 1000 $threads)) -}}
{{- end -}}
{{- end -}}

{{/* RayJob ------------------------------------------------------------------------------ */}}

{{/* One Ray pod template (head or worker): (dict "root" $ "role" "head"|"worker" "spec" .Values.sweep.head). */}}
{{- define "cxr-screen.sweep.podTemplate" -}}
{{- $root := .root -}}
{{- $sweep := $root.Values.sweep -}}
metadata:
  labels:
    {{- include "cxr-screen.labels" (dict "root" $root "component" "sweep") | nindent 4 }}
    {{- include "cxr-screen.mlflowClientLabel" . | nindent 4 }}
    cxr-screen/ray-node: {{ .role }}
spec:
  {{- with $sweep.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  automountServiceAccountToken: false
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with include "cxr-screen.imagePullSecrets" $root }}{{ . | nindent 2 }}{{- end }}
  {{- with .spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .role }}
      image: {{ include "cxr-screen.image" (dict "root" $root "image" $root.Values.images.jobs) }}
      imagePullPolicy: {{ $root.Values.images.jobs.pullPolicy }}
      securityContext:
        {{- /* Ray writes its session folders, logs and spill files under /tmp and $HOME */}}
        {{- $security := deepCopy $root.Values.containerSecurityContext }}
        {{- $_ := set $security "readOnlyRootFilesystem" false }}
        {{- toYaml $security | nindent 8 }}
      {{- if eq .role "head" }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
      {{- end }}
      env:
        {{- with include "cxr-screen.mlflowTrackingUri" $root }}
        - name: MLFLOW_TRACKING_URI
          value: {{ . | quote }}
        {{- end }}
        - name: CXR_DATA_DIR
          value: {{ $sweep.dataDir | quote }}
        - name: CXR_RAY_STORAGE_PATH
          value: {{ $sweep.storagePath | quote }}
        {{- with $sweep.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- include "cxr-screen.resources" (dict "resources" .spec.resources "gpu" (.spec.gpu | default 0)) | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: {{ $sweep.data.mountPath }}
          readOnly: true
        - name: shared
          mountPath: {{ $sweep.sharedStorage.mountPath }}
        - name: dshm
          mountPath: /dev/shm
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: {{ $sweep.data.existingClaim }}
        readOnly: true
    - name: shared
      persistentVolumeClaim:
        claimName: {{ include "cxr-screen.sweep.sharedClaim" $root }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: 2Gi
{{- end -}}

{{/*
The whole RayJob, rendered both as the sweep object and into the drift job's template ConfigMap:
(dict "root" $ "retrain" true|false). The retrain copy has generateName instead of name.
*/}}
{{- define "cxr-screen.sweep.rayjob" -}}
{{- $root := .root -}}
{{- $sweep := $root.Values.sweep -}}
{{- $entrypoint := list "python" "-m" "training.sweep" "--budget" $sweep.budget "--data-dir" $sweep.dataDir "--storage-path" $sweep.storagePath -}}
{{- $entrypoint = concat $entrypoint $sweep.extraArgs -}}
apiVersion: ray.io/v1
kind: RayJob
metadata:
  {{- if .retrain }}
  generateName: {{ printf "%s-retrain-" (include "cxr-screen.fullname" $root) }}
  {{- else }}
  name: {{ include "cxr-screen.sweep.name" $root }}
  {{- end }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "cxr-screen.labels" (dict "root" $root "component" "sweep") | nindent 4 }}
    {{- if .retrain }}
    cxr-screen/trigger: drift
    {{- end }}
spec:
  entrypoint: {{ join " " $entrypoint | quote }}
  {{- if not .retrain }}
  suspend: {{ $sweep.suspend }}
  {{- end }}
  shutdownAfterJobFinishes: {{ $sweep.shutdownAfterJobFinishes }}
  ttlSecondsAfterFinished: {{ int $sweep.ttlSecondsAfterFinished }}
  {{- if $sweep.activeDeadlineSeconds }}
  activeDeadlineSeconds: {{ int $sweep.activeDeadlineSeconds }}
  {{- end }}
  backoffLimit: 0
  submissionMode: K8sJobMode
  {{- with include "cxr-screen.mlflowTrackingUri" $root }}
  runtimeEnvYAML: |
    env_vars:
      MLFLOW_TRACKING_URI: {{ . | quote }}
  {{- end }}
  rayClusterSpec:
    rayVersion: {{ $sweep.rayVersion | quote }}
    headGroupSpec:
      rayStartParams:
        dashboard-host: "0.0.0.0"
        num-cpus: "0"
      template:
        {{- include "cxr-screen.sweep.podTemplate" (dict "root" $root "role" "head" "spec" $sweep.head) | nindent 8 }}
    workerGroupSpecs:
      - groupName: {{ $sweep.workers.groupName }}
        replicas: {{ int $sweep.workers.replicas }}
        minReplicas: {{ int $sweep.workers.minReplicas }}
        maxReplicas: {{ int $sweep.workers.maxReplicas }}
        rayStartParams:
          {{- if gt (int $sweep.workers.gpu) 0 }}
          num-gpus: {{ $sweep.workers.gpu | quote }}
          {{- else }}
          {}
          {{- end }}
        template:
          {{- include "cxr-screen.sweep.podTemplate" (dict "root" $root "role" "worker" "spec" $sweep.workers) | nindent 10 }}
{{- end -}}

{{- define "cxr-screen.review.name" -}}
{{- printf "%s-review" (include "cxr-screen.fullname" .) -}}
{{- end -}}
