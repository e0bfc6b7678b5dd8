{{/*
The effective `router` values: `router.*` with the GAIE v1.5 chart's names applied on top
(`inferenceExtension.*` -> router.epp / router.monitoring, `inferencePool.*` ->
router.modelServers / router.inferencePool, top-level `inferenceObjectives`), checked.
Every template reads this (`include "epp.router" . | fromYaml`), never .Values.router directly.
*/}}
{{- define "epp.router" -}}
{{- $r := deepCopy (.Values.router | default dict) -}}
{{- range $k := list "epp" "inferencePool" "modelServers" "monitoring" -}}
{{- if not (kindIs "map" (index $r $k)) }}{{ $_ := set $r $k dict }}{{ end -}}
{{- end -}}
{{- with .Values.inferenceExtension -}}
  {{- $_ := set $r "epp" (mergeOverwrite $r.epp (omit (deepCopy .) "monitoring" "failureMode" "tracing" "latencyPredictor" "sidecar")) -}}
  {{- with .monitoring }}{{ $_ := set $r "monitoring" (mergeOverwrite $r.monitoring (deepCopy .)) }}{{ end -}}
  {{- with .failureMode }}{{ $_ := set $r.inferencePool "failureMode" . }}{{ end -}}
{{- end -}}
{{- with .Values.inferencePool -}}
  {{- $ms := $r.modelServers -}}
  {{- with .targetPorts }}{{ $_ := set $ms "targetPorts" . }}{{ end -}}
  {{- with .targetPortNumber }}{{ $_ := set $ms "targetPorts" (list (dict "number" .)) }}{{ end -}}
  {{- with .modelServerType }}{{ $_ := set $ms "type" . }}{{ end -}}
  {{- with .modelServerProtocol }}{{ $_ := set $ms "protocol" . }}{{ end -}}
  {{- with .modelServers }}{{ with .matchLabels }}{{ $_ := set $ms "matchLabels" . }}{{ end }}{{ end -}}
  {{- with .parser }}{{ $_ := set $r.epp "parser" . }}{{ end -}}
{{- end -}}
{{- with .Values.inferenceObjectives }}{{ $_ := set $r "inferenceObjectives" . }}{{ end -}}
{{- include "epp.validate" $r -}}
{{- toYaml $r -}}
{{- end -}}

{{/* Fails with a message naming the value for anything this chart or this EPP cannot do. */}}
{{- define "epp.validate" -}}
{{- $ms := .modelServers -}}
{{- if not $ms.matchLabels -}}
{{- fail "router.modelServers.matchLabels is required: the labels of the model-server pods (e.g. --set router.modelServers.matchLabels.app=vllm-llama3-8b-instruct)" -}}
{{- end -}}
{{- $type := $ms.type | default "vllm" | toString -}}
{{- if not (has $type (list "vllm" "sglang" "trtllm-serve" "triton-tensorrt-llm")) -}}
{{- fail (printf "router.modelServers.type %q is not supported by this EPP: use vllm, sglang, trtllm-serve or triton-tensorrt-llm" $type) -}}
{{- end -}}
{{- $protocol := $ms.protocol | default "http" | toString -}}
{{- if eq $protocol "grpc" -}}
{{- fail "router.modelServers.protocol grpc needs a gRPC request parser (vllmgrpc-parser), which this EPP does not have: use http" -}}
{{- else if ne $protocol "http" -}}
{{- fail (printf "router.modelServers.protocol %q: use http" $protocol) -}}
{{- end -}}
{{- $ports := $ms.targetPorts | default list -}}
{{- if or (lt (len $ports) 1) (gt (len $ports) 8) -}}
{{- fail (printf "router.modelServers.targetPorts must list 1 to 8 ports, got %d" (len $ports)) -}}
{{- end -}}
{{- $seen := list -}}
{{- range $i, $p := $ports -}}
{{- $n := int (default 0 (and (kindIs "map" $p) $p.number)) -}}
{{- if or (lt $n 1) (gt $n 65535) -}}
{{- fail (printf "router.modelServers.targetPorts[%d].number must be a port number (1-65535)" $i) -}}
{{- end -}}
{{- if has $n $seen -}}
{{- fail (printf "router.modelServers.targetPorts[%d].number %d is listed twice" $i $n) -}}
{{- end -}}
{{- $seen = append $seen $n -}}
{{- end -}}
{{- $mode := .inferencePool.failureMode | default "FailOpen" | toString -}}
{{- if not (has $mode (list "FailOpen" "FailClose" "FailClosed")) -}}
{{- fail (printf "router.inferencePool.failureMode %q: use FailOpen or FailClose" $mode) -}}
{{- end -}}
{{- if and (eq (toString .inferencePool.create) "false") .inferenceObjectives -}}
{{- fail "router.inferenceObjectives need an InferencePool: they cannot be used with router.inferencePool.create=false" -}}
{{- end -}}
{{- $parser := .epp.parser | default "" | toString -}}
{{- if and $parser (ne $parser "openai-parser") -}}
{{- fail (printf "router.epp.parser %q: this EPP has openai-parser (leave it empty for automatic selection)" $parser) -}}
{{- end -}}
{{- if gt (len (.epp.parsers | default list)) 0 -}}
{{- range .epp.parsers }}{{ if ne (toString .) "openai-parser" }}{{ fail (printf "router.epp.parsers: %q is not a parser this EPP has (openai-parser)" (toString .)) }}{{ end }}{{ end -}}
{{- end -}}
{{- end -}}

{{/* <release>-epp: the Deployment, Service, ServiceAccount and ConfigMap (as upstream). */}}
{{- define "epp.name" -}}
{{- printf "%s-epp" (.Release.Name | lower | trim | trunc 40) -}}
{{- end -}}

{{- define "epp.standalone" -}}
{{- if eq (toString .inferencePool.create) "false" }}true{{ end -}}
{{- end -}}

{{/* Selector labels as upstream's chart, so `helm upgrade` from it keeps the Deployment selector. */}}
{{- define "epp.selectorLabels" -}}
{{- $r := include "epp.router" . | fromYaml -}}
{{- if include "epp.standalone" $r -}}
llm-d-router-standalone: {{ include "epp.name" . }}
{{- else -}}
llm-d-router-gateway: {{ include "epp.name" . }}
{{- end -}}
{{- end -}}

{{- define "epp.labels" -}}
app.kubernetes.io/name: epp
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* "true" when the replicas elect a leader: replicas > 1 unless the flag is set to false, or the flag set to true. */}}
{{- define "epp.leaderElection" -}}
{{- $flags := .epp.flags | default dict -}}
{{- if hasKey $flags "ha-enable-leader-election" -}}
{{- if eq (toString (index $flags "ha-enable-leader-election")) "true" }}true{{ end -}}
{{- else if gt (int .epp.replicas) 1 -}}
true
{{- end -}}
{{- end -}}

{{- define "epp.image" -}}
{{- $img := .epp.image -}}
{{- if kindIs "string" $img -}}
{{- $img -}}
{{- else -}}
{{- $img = $img | default dict -}}
{{- $ref := printf "%s:%s" ($img.repository | default "epp") (toString ($img.tag | default "local")) -}}
{{- if $img.registry }}{{ printf "%s/%s" $img.registry $ref }}{{ else }}{{ $ref }}{{ end -}}
{{- end -}}
{{- end -}}

{{- define "epp.imagePullPolicy" -}}
{{- if kindIs "map" .epp.image }}{{ .epp.image.pullPolicy | default "IfNotPresent" }}{{ else }}IfNotPresent{{ end -}}
{{- end -}}

{{/* The pool's failureMode in the CRD's spelling (upstream's chart documents "FailClosed"). */}}
{{- define "epp.failureMode" -}}
{{- $mode := .inferencePool.failureMode | default "FailOpen" | toString -}}
{{- if eq $mode "FailClosed" }}FailClose{{ else }}{{ $mode }}{{ end -}}
{{- end -}}

{{/* The ConfigMap's files: default-plugins.yaml, then pluginsConfig, then pluginsCustomConfig. */}}
{{- define "epp.configFiles" -}}
{{- $epp := .epp -}}
{{- $files := dict "default-plugins.yaml" (include "epp.defaultPlugins" .) -}}
{{- $file := $epp.pluginsConfigFile | default "default-plugins.yaml" -}}
{{- $custom := $epp.pluginsCustomConfig | default dict -}}
{{- if $epp.pluginsConfig -}}
{{- if hasKey $custom $file -}}
{{- fail (printf "router.epp.pluginsConfig and router.epp.pluginsCustomConfig both define %q" $file) -}}
{{- end -}}
{{- $_ := set $files $file (toYaml $epp.pluginsConfig) -}}
{{- end -}}
{{- range $name, $text := $custom }}{{ $_ := set $files $name (toString $text) }}{{ end -}}
{{- if not (hasKey $files $file) -}}
{{- fail (printf "router.epp.pluginsConfigFile %q is not in the ConfigMap: add it to router.epp.pluginsCustomConfig (or set router.epp.pluginsConfig)" $file) -}}
{{- end -}}
{{- toYaml $files -}}
{{- end -}}

{{/* Upstream's default profile; deploy/kubernetes/base/default-plugins.yaml is the same file. */}}
{{- define "epp.defaultPlugins" -}}
{{- $src := .epp.metricsDataSource | default dict -}}
{{- $type := .modelServers.type | default "vllm" -}}
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
  parameters:
    scheme: {{ $src.scheme | default "http" }}
    path: {{ $src.path | default "/metrics" }}
    insecureSkipVerify: {{ ternary true $src.insecureSkipVerify (not (hasKey $src "insecureSkipVerify")) }}
- type: core-metrics-extractor
{{- if ne $type "vllm" }}
  parameters:
    defaultEngine: {{ $type }}
{{- end }}
{{- if .epp.parser }}
- type: {{ .epp.parser }}
{{- end }}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
{{- if .epp.parser }}
parser:
  pluginRef: {{ .epp.parser }}
{{- end }}
{{- end -}}
