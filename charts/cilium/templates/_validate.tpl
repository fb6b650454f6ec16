{{/*
Checks across values that values.schema.json cannot explain in plain words.
Each failure names the values to change. Included by configmap.yaml, so
every render runs it.
*/}}
{{- define "cilium.validate" -}}
{{- $v := .Values -}}
{{- if and (ne $v.identityAllocationMode "crd") (not $v.etcd.enabled) -}}
{{- fail (printf "identityAllocationMode=%s keeps identities in the kvstore: set etcd.enabled=true and etcd.endpoints (or use identityAllocationMode=crd)" $v.identityAllocationMode) -}}
{{- end -}}
{{- if and $v.etcd.enabled (empty $v.etcd.endpoints) -}}
{{- fail "etcd.enabled=true needs at least one etcd.endpoints entry (http:// or https:// URL)" -}}
{{- end -}}
{{- if not (or $v.ipv4.enabled $v.ipv6.enabled) -}}
{{- fail "ipv4.enabled and ipv6.enabled are both false: enable at least one address family" -}}
{{- end -}}
{{- if and $v.ipv4.enabled (empty $v.ipam.operator.clusterPoolIPv4PodCIDRList) -}}
{{- fail "ipv4.enabled=true needs at least one CIDR in ipam.operator.clusterPoolIPv4PodCIDRList" -}}
{{- end -}}
{{- if and $v.ipv6.enabled (empty $v.ipam.operator.clusterPoolIPv6PodCIDRList) -}}
{{- fail "ipv6.enabled=true needs at least one CIDR in ipam.operator.clusterPoolIPv6PodCIDRList" -}}
{{- end -}}
{{- range $cidr := $v.ipam.operator.clusterPoolIPv4PodCIDRList -}}
{{- range $octet := splitList "." (first (splitList "/" $cidr)) -}}
{{- if gt (int $octet) 255 -}}
{{- fail (printf "ipam.operator.clusterPoolIPv4PodCIDRList: %s is not an IPv4 CIDR (%s is above 255)" $cidr $octet) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $fam := list "IPv4" "IPv6" -}}
{{- if (index $v (lower $fam)).enabled -}}
{{- $mask := int (index $v.ipam.operator (printf "clusterPool%sMaskSize" $fam)) -}}
{{- range $cidr := index $v.ipam.operator (printf "clusterPool%sPodCIDRList" $fam) -}}
{{- $prefix := int (last (splitList "/" $cidr)) -}}
{{- if lt $mask $prefix -}}
{{- fail (printf "ipam.operator.clusterPool%sMaskSize=%d is shorter than the prefix of pool %s: a node's pod CIDR must fit inside its pool" $fam $mask $cidr) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if gt (int $v.cluster.id) (int $v.clustermesh.maxConnectedClusters) -}}
{{- fail (printf "cluster.id=%d is above clustermesh.maxConnectedClusters=%d: IDs above 255 need maxConnectedClusters 511" (int $v.cluster.id) (int $v.clustermesh.maxConnectedClusters)) -}}
{{- end -}}
{{- end -}}
