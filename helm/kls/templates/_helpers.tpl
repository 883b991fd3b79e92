{{/* Names, labels, images, addresses and the cross-value checks of the kls chart. */}}

{{- define "kls.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-kls, or the release name alone when it already contains the chart name. */}}
{{- define "kls.fullname" -}}
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

{{/* Component names (40 + 7 characters leave room for StatefulSet pod and PVC suffixes). */}}
{{- define "kls.router.fullname" -}}{{ include "kls.fullname" . }}-router{{- end -}}
{{- define "kls.worker.fullname" -}}{{ include "kls.fullname" . }}-worker{{- end -}}
{{- define "kls.store.fullname" -}}{{ include "kls.fullname" . }}-store{{- end -}}

{{- define "kls.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kls.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kls.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kls.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kls
{{- end -}}

{{/* Selector labels of one component: include "kls.selectorLabels" (list . "worker") */}}
{{- define "kls.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "kls.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "kls.componentLabels" -}}
{{ include "kls.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* repository[:tag|@digest] of an image block; `fallback` supplies an empty tag. */}}
{{- define "kls.imageRef" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "kls.image" -}}{{ include "kls.imageRef" (list .Values.image .) }}{{- end -}}

{{/* The worker's image: the CUDA image when one is configured, else the CPU image. */}}
{{- define "kls.worker.image" -}}
{{- if .Values.worker.image.repository -}}
{{- include "kls.imageRef" (list .Values.worker.image .) -}}
{{- else -}}
{{- include "kls.image" . -}}
{{- end -}}
{{- end -}}

{{- define "kls.worker.pullPolicy" -}}
{{- if .Values.worker.image.repository -}}
{{- .Values.worker.image.pullPolicy -}}
{{- else -}}
{{- .Values.image.pullPolicy -}}
{{- end -}}
{{- end -}}

{{/* "<listenAddress>:<port>" */}}
{{- define "kls.listen" -}}
{{- printf "%s:%d" (index . 0).Values.listenAddress (int (index . 1)) -}}
{{- end -}}

{{/* The store shards' addresses, comma-separated: their stable per-pod DNS names. */}}
{{- define "kls.store.targets" -}}
{{- $sts := include "kls.store.fullname" . -}}
{{- $targets := list -}}
{{- range $i := until (int .Values.store.replicas) -}}
{{- $targets = append $targets (printf "%s-%d.%s.%s.svc.%s:%d" $sts $i $sts $.Release.Namespace $.Values.clusterDomain (int $.Values.store.grpcPort)) -}}
{{- end -}}
{{- join "," $targets -}}
{{- end -}}

{{/* The router's --workers: the workers' headless Service, re-resolved by the router. */}}
{{- define "kls.worker.target" -}}
{{- printf "dns:///%s.%s.svc.%s:%d" (include "kls.worker.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.worker.grpcPort) -}}
{{- end -}}

{{/* The worker's grace period: the value, or the drain plus 30 s. */}}
{{- define "kls.worker.gracePeriod" -}}
{{- if kindIs "invalid" .Values.worker.terminationGracePeriodSeconds -}}
{{- add (int .Values.worker.drainTimeoutSeconds) 30 -}}
{{- else -}}
{{- int .Values.worker.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* topologySpreadConstraints of a component: (list . "worker" .Values.worker.topologySpread) */}}
{{- define "kls.topologySpread" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $spread := index . 2 -}}
{{- if $spread.enabled -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: {{ $spread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "kls.selectorLabels" (list $root $component) | nindent 8 }}
  {{- if $spread.zones }}
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "kls.selectorLabels" (list $root $component) | nindent 8 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by every component: (list . .Values.worker) */}}
{{- define "kls.podCommon" -}}
{{- $root := index . 0 -}}
{{- $c := index . 1 -}}
serviceAccountName: {{ include "kls.serviceAccountName" $root }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Environment shared by every container: (list . .Values.worker.extraEnv) */}}
{{- define "kls.env" -}}
- name: KLS_LOG_LEVEL
  value: {{ (index . 0).Values.logLevel | quote }}
{{- with (index . 1) }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A native gRPC probe on grpc.health.v1: (list port service) */}}
{{- define "kls.grpcProbe" -}}
grpc:
  port: {{ int (index . 0) }}
  service: {{ index . 1 | quote }}
{{- end -}}

{{/*
Cross-value checks that a JSON schema cannot express. Each failure names the values involved.
*/}}
{{- define "kls.validate" -}}
{{- $w := .Values.worker -}}
{{- $s := .Values.store -}}
{{- $m := .Values.model -}}
{{- /* The worker's backend, GPUs and image. */ -}}
{{- if and (eq $w.backend "cuda") (lt (int $w.gpus) 1) -}}
{{- fail (printf "worker.backend=cuda needs worker.gpus >= 1 (got worker.gpus=%d)" (int $w.gpus)) -}}
{{- end -}}
{{- if and (eq $w.backend "cpu") (gt (int $w.gpus) 0) -}}
{{- fail (printf "worker.gpus=%d needs worker.backend=cuda (got worker.backend=cpu): the CPU backend uses no GPU" (int $w.gpus)) -}}
{{- end -}}
{{- if and (gt (int $w.gpus) 0) (not $w.image.repository) -}}
{{- fail (printf "worker.gpus=%d needs worker.image.repository: a CUDA worker image (deploy/docker target kls-cuda); the CPU image has no CUDA runtime" (int $w.gpus)) -}}
{{- end -}}
{{- range $section := list "limits" "requests" -}}
{{- if hasKey (default dict (get $w.resources $section)) "nvidia.com/gpu" -}}
{{- fail (printf "worker.resources.%s.nvidia.com/gpu is set; set worker.gpus (with worker.backend=cuda) instead: the chart sets the GPU limit from it" $section) -}}
{{- end -}}
{{- end -}}
{{- /* Every running turn holds its session and a checkpoint in the GPU's KDA slots. */ -}}
{{- if and (eq $w.backend "cuda") (gt (int $w.maxRunningTurns) (int $w.gpuMaxSessions)) -}}
{{- fail (printf "worker.maxRunningTurns=%d exceeds worker.gpuMaxSessions=%d: the GPU could not hold the sessions of the turns it runs at once" (int $w.maxRunningTurns) (int $w.gpuMaxSessions)) -}}
{{- end -}}
{{- /* The drain must fit in the grace period. */ -}}
{{- $grace := int (include "kls.worker.gracePeriod" .) -}}
{{- if lt $grace (add (int $w.drainTimeoutSeconds) 10) -}}
{{- fail (printf "worker.terminationGracePeriodSeconds=%d must be at least worker.drainTimeoutSeconds=%d + 10: Kubernetes would kill workers before their drain (and up to 7 s of server shutdown) ends" $grace (int $w.drainTimeoutSeconds)) -}}
{{- end -}}
{{- /* One autoscaler. */ -}}
{{- if and $w.autoscaling.enabled $w.keda.enabled -}}
{{- fail "worker.autoscaling.enabled and worker.keda.enabled are both true: a KEDA ScaledObject creates its own HPA, so enable one of them" -}}
{{- end -}}
{{- if and $w.autoscaling.enabled (gt (int $w.autoscaling.minReplicas) (int $w.autoscaling.maxReplicas)) -}}
{{- fail (printf "worker.autoscaling.minReplicas=%d is above worker.autoscaling.maxReplicas=%d" (int $w.autoscaling.minReplicas) (int $w.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if and $w.keda.enabled (gt (int $w.keda.minReplicas) (int $w.keda.maxReplicas)) -}}
{{- fail (printf "worker.keda.minReplicas=%d is above worker.keda.maxReplicas=%d" (int $w.keda.minReplicas) (int $w.keda.maxReplicas)) -}}
{{- end -}}
{{- if and $w.autoscaling.enabled (eq $w.autoscaling.metric.type "Pods") (not (empty $w.autoscaling.metric.selector)) -}}
{{- fail "worker.autoscaling.metric.selector is only used with worker.autoscaling.metric.type=External" -}}
{{- end -}}
{{- if and (eq (int $w.rollingUpdate.maxSurge) 0) (eq (int $w.rollingUpdate.maxUnavailable) 0) -}}
{{- fail "worker.rollingUpdate.maxSurge=0 and worker.rollingUpdate.maxUnavailable=0: a rolling update could never start; allow one of them" -}}
{{- end -}}
{{- if and $w.keda.enabled (not $w.keda.query) (not .Values.serviceMonitor.enabled) -}}
{{- fail "worker.keda.enabled with the default worker.keda.query needs serviceMonitor.enabled: the query selects the workers by the service label that scraping through the ServiceMonitor adds; enable it or set worker.keda.query for how your Prometheus labels the workers" -}}
{{- end -}}
{{- $r := .Values.router -}}
{{- /* After the preStop sleep: up to 10 s for HTTP requests, then up to 5 s for gRPC calls. */ -}}
{{- if lt (int $r.terminationGracePeriodSeconds) (add (int $r.preStopSleepSeconds) 15) -}}
{{- fail (printf "router.terminationGracePeriodSeconds=%d must be at least router.preStopSleepSeconds=%d + 15: after the sleep a router takes up to 10 s to end HTTP requests and 5 s more for gRPC calls, and Kubernetes would kill it mid-way" (int $r.terminationGracePeriodSeconds) (int $r.preStopSleepSeconds)) -}}
{{- end -}}
{{- if and $r.autoscaling.enabled (gt (int $r.autoscaling.minReplicas) (int $r.autoscaling.maxReplicas)) -}}
{{- fail (printf "router.autoscaling.minReplicas=%d is above router.autoscaling.maxReplicas=%d" (int $r.autoscaling.minReplicas) (int $r.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if and $r.autoscaling.enabled (not (get (default dict $r.resources.requests) "cpu")) -}}
{{- fail "router.autoscaling.enabled targets CPU utilization and needs router.resources.requests.cpu" -}}
{{- end -}}
{{- if eq (int $r.grpcPort) (int $r.httpPort) -}}
{{- fail (printf "router.grpcPort and router.httpPort are both %d" (int $r.grpcPort)) -}}
{{- end -}}
{{- if eq (int $w.grpcPort) (int $w.metricsPort) -}}
{{- fail (printf "worker.grpcPort and worker.metricsPort are both %d" (int $w.grpcPort)) -}}
{{- end -}}
{{- /* The store: R copies need R shards, and a PDB must leave one copy of every key up. */ -}}
{{- if gt (int $s.replication) (int $s.replicas) -}}
{{- fail (printf "store.replication=%d exceeds store.replicas=%d: every key needs that many distinct shards" (int $s.replication) (int $s.replicas)) -}}
{{- end -}}
{{- if and $s.pdb.enabled (ge (int $s.replication) 2) (ge (int $s.pdb.maxUnavailable) (int $s.replication)) -}}
{{- fail (printf "store.pdb.maxUnavailable=%d must be below store.replication=%d, or a voluntary disruption may take every copy of a key down" (int $s.pdb.maxUnavailable) (int $s.replication)) -}}
{{- end -}}
{{- /* The model source. */ -}}
{{- if and (eq $m.source "pvc") (not $m.pvc.claimName) -}}
{{- fail "model.source=pvc needs model.pvc.claimName: an existing ReadOnlyMany claim that holds the model" -}}
{{- end -}}
{{- if eq $m.source "image" -}}
{{- if not $m.image.reference -}}
{{- fail "model.source=image needs model.image.reference: the OCI image or artifact that holds the model" -}}
{{- end -}}
{{- if not (semverCompare ">=1.31.0-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "model.source=image needs Kubernetes >= 1.31 (image volumes); this cluster is %s" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- /* 1.31-1.34: behind the ImageVolume gate, off by default; an API server without it drops
       the volume's image field and rejects the pod. */ -}}
{{- if and (not (semverCompare ">=1.35.0-0" .Capabilities.KubeVersion.Version)) (not $m.image.featureGateEnabled) -}}
{{- fail (printf "model.source=image on Kubernetes %s needs the ImageVolume feature gate (on by default only from 1.35): enable it on the API server and every kubelet, then set model.image.featureGateEnabled=true; or use model.source=pvc" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- end -}}
{{- /* Rescaling the store moves keys away from their data: refuse it on upgrade. lookup is empty
       under `helm template` and `--dry-run=client`, so this runs against a real cluster only. */ -}}
{{- $existing := lookup "apps/v1" "StatefulSet" .Release.Namespace (include "kls.store.fullname" .) -}}
{{- if and $existing (not $s.allowReshard) -}}
{{- $current := int (default 0 $existing.spec.replicas) -}}
{{- if ne $current (int $s.replicas) -}}
{{- fail (printf "store.replicas=%d differs from the running store's %d: sessions are placed by shard name, so rescaling hides existing sessions; see docs/kubernetes.md, then set store.allowReshard=true if that is intended" (int $s.replicas) $current) -}}
{{- end -}}
{{- end -}}
{{- end -}}
