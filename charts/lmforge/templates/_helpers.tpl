{{/* Names ------------------------------------------------------------------------------------ */}}

{{- define "lmforge.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lmforge.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lmforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lmforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lmforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "lmforge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "lmforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lmforge
{{- end -}}

{{- define "lmforge.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "lmforge.runtimeImage" -}}
{{- printf "%s:%s" .Values.runtimeImage.repository (.Values.runtimeImage.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* RBAC ------------------------------------------------------------------------------------------
Every rule below is a call the operator makes; the chart README ("RBAC") has the table.
kopf lists and watches what it indexes or handles, patches finalizers/annotations on the main
resource and `status` through the status subresource, and posts core/v1 Events.

"lmforge.namespacedRules": what the controllers do inside a namespace. Cluster-wide it goes into the
ClusterRole; with watchNamespaces into one Role per namespace. */}}
{{- define "lmforge.namespacedRules" -}}
# The three kinds: a kopf daemon + index each (list/watch, finalizer and state annotations:
# patch); a status write that meets a 409 re-reads the object (get). TrainJob deletes itself at
# ttlSecondsAfterFinished (delete); QuantizeJob's serveAfter server-side applies an
# InferenceService (patch, and create when it does not exist).
- apiGroups: ["lmforge.dev"]
  resources: ["trainjobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["lmforge.dev"]
  resources: ["inferenceservices"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["lmforge.dev"]
  resources: ["quantizejobs"]
  verbs: ["get", "list", "watch", "patch"]
# Status of every kind: written with PUT + resourceVersion (optimistic concurrency).
- apiGroups: ["lmforge.dev"]
  resources: ["trainjobs/status", "inferenceservices/status", "quantizejobs/status"]
  verbs: ["update"]
# QuantizeJob's Job: indexed (list/watch) and created; the garbage collector deletes it with its owner.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create"]
# Worker pods (TrainJob), server pods (InferenceService) and the QuantizeJob pod are watched through kopf indexes;
# TrainJob creates its gang, deletes single pods (restart, suspend, stuck) and the whole gang by
# label (deletecollection).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete", "deletecollection"]
# TrainJob's headless Service (create/delete); InferenceService's Service (server-side apply =
# patch, and create when the object does not exist yet).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "patch", "delete"]
# TrainJob's config (train.json) per job: server-side applied (patch; create when it is missing).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "patch", "delete"]
# InferenceService's Deployment: indexed (list/watch: its size comes from there), server-side applied.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch"]
# The autoscaler (and spec.replicas) resize through the scale subresource.
- apiGroups: ["apps"]
  resources: ["deployments/scale"]
  verbs: ["patch"]
# InferenceService's PodDisruptionBudget: applied, or deleted when at most one replica can exist.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "patch", "delete"]
# kopf.event() and kopf's own handler logs as Events on the custom resources.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* Peering with watchNamespaces: a KopfPeering per namespace, read and created by the operator at
start and patched by kopf's keep-alive (only the one named peering.name). */}}
{{- define "lmforge.namespacedPeeringRules" -}}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "create"]
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  resourceNames: [{{ .Values.peering.name | quote }}]
  verbs: ["get", "patch"]
{{- end -}}

{{/* kopf's discovery: it watches CRDs to notice resources appearing/changing after start. */}}
{{- define "lmforge.discoveryRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end -}}
