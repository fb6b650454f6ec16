#!/usr/bin/env bash
# Static checks of the Helm chart (charts/cilium), no cluster needed:
#   - the chart's CRDs are identical to the generated crds/*.yaml;
#   - the cilium-config ConfigMap holds only options the operator knows
#     (the OPTIONS table of operator/src/config.rs);
#   - helm lint --strict, with the default values and with every optional
#     object enabled (charts/cilium/tests/all-features-values.yaml);
#   - the rendered manifests validate against the Kubernetes 1.30 schemas
#     (kubernetes-validate --strict); a kind without a schema fails unless
#     it is one of the CRD-defined kinds the chart renders on purpose;
#   - every charts/cilium/tests/bad-values/*.yaml is refused by helm template
#     with the error its first line announces (`# expect: <substring>`);
#   - promtool check rules / test rules on the alert and recording rules,
#     and the PrometheusRule the chart renders holds the same rules.
# Prints one line per check; exits non-zero if any check failed.
# Tools: scripts/setup.sh puts helm, kubernetes-validate and promtool in
# .tools/bin.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$here/.tools/bin:$PATH"
chart="$here/charts/cilium"
kube_version=1.35
# Kinds the chart renders that no Kubernetes schema describes: Prometheus
# Operator objects and our own CRDs' kinds.
allowed_unknown_kinds='^(ServiceMonitor|PrometheusRule|CiliumNode|CiliumEndpoint|CiliumIdentity|CiliumNetworkPolicy|CiliumClusterwideNetworkPolicy)$'

for tool in helm kubernetes-validate promtool; do
  command -v "$tool" >/dev/null || {
    echo "FAIL $tool not found: run scripts/setup.sh (it installs into .tools/bin)" >&2
    exit 1
  }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Helm runs offline with throw-away state.
export HELM_CACHE_HOME="$work/helm-cache" HELM_CONFIG_HOME="$work/helm-config" HELM_DATA_HOME="$work/helm-data"

failures=0
pass() { printf 'ok   %s\n' "$1"; }
fail() {
  printf 'FAIL %s\n' "$1"
  [ -z "${2:-}" ] || sed 's/^/     | /' <<<"$2"
  failures=$((failures + 1))
}

all_features="$chart/tests/all-features-values.yaml"
render() { # name out [helm args...]
  local out=$2
  shift 2
  helm template cilium "$chart" --namespace kube-system --include-crds "$@" >"$out" 2>"$out.err"
}

# ------------------------------------------------------------ CRD copies
crd_diff=""
for f in "$here"/crds/*.yaml; do
  c="$chart/crds/$(basename "$f")"
  if [ ! -f "$c" ]; then
    crd_diff+="missing: charts/cilium/crds/$(basename "$f")"$'\n'
  elif ! cmp -s "$f" "$c"; then
    crd_diff+="differs: charts/cilium/crds/$(basename "$f") from crds/$(basename "$f")"$'\n'
  fi
done
for c in "$chart"/crds/*.yaml; do
  [ -f "$here/crds/$(basename "$c")" ] || crd_diff+="extra: charts/cilium/crds/$(basename "$c") (no crds/$(basename "$c"))"$'\n'
done
if [ -z "$crd_diff" ]; then
  pass "chart CRDs identical to crds/*.yaml ($(ls "$here"/crds/*.yaml | wc -l) files)"
else
  fail "chart CRDs differ from crds/*.yaml: cp crds/*.yaml charts/cilium/crds/" "$crd_diff"
fi

# ------------------------------------------------------------ lint
for values in default all-features; do
  args=()
  [ "$values" = default ] || args=(-f "$all_features")
  if out=$(helm lint --strict "$chart" "${args[@]}" 2>&1); then
    pass "helm lint --strict ($values values)"
  else
    fail "helm lint --strict ($values values)" "$out"
  fi
done

# ------------------------------------------------------------ render + validate
# Operator option names, from the OPTIONS table (`opt("name", ...)`).
perl -0777 -ne 'while (/\bopt\(\s*"([a-z0-9-]+)"/g) { print "$1\n" }' "$here/operator/src/config.rs" | sort -u >"$work/options"
[ -s "$work/options" ] || { fail "no option names found in operator/src/config.rs"; exit 1; }

for values in default all-features no-agent; do
  args=()
  case $values in
    all-features) args=(-f "$all_features") ;;
    no-agent) args=(--set agent.enabled=false) ;;
  esac
  out="$work/$values.yaml"
  if ! render "$values" "$out" "${args[@]}"; then
    fail "helm template ($values values)" "$(cat "$out.err")"
    continue
  fi
  pass "helm template ($values values): $(grep -c '^kind:' "$out") objects"

  # The ConfigMap's keys: the lines indented by two under `data:`.
  awk '/^kind: ConfigMap/ {cm=1} /^---/ {cm=0; data=0} cm && /^data:/ {data=1; next}
       data && /^[^ ]/ {data=0} data && /^  [a-z0-9-]+:/ {sub(/^  /, ""); sub(/:.*/, ""); print}' "$out" |
    sort -u >"$work/keys"
  unknown=$(comm -23 "$work/keys" "$work/options")
  if [ -z "$unknown" ]; then
    pass "cilium-config keys are operator options ($values values): $(wc -l <"$work/keys") keys"
  else
    fail "cilium-config holds keys the operator does not know ($values values)" "$unknown"
  fi

  if kv=$(kubernetes-validate --strict --kubernetes-version "$kube_version" "$out" 2>&1); then kv_rc=0; else kv_rc=$?; fi
  missing=$(grep "Couldn't find schema" <<<"$kv" | sed -n 's/.*for kind \([^ ]*\) with api version.*/\1/p' | sort -u |
    grep -Ev "$allowed_unknown_kinds" || true)
  if [ "$kv_rc" -ne 0 ]; then
    fail "kubernetes-validate --strict $kube_version ($values values)" "$(grep -v '^INFO' <<<"$kv")"
  elif [ -n "$missing" ]; then
    fail "kubernetes-validate $kube_version: no schema for kinds ($values values)" "$missing"
  else
    pass "kubernetes-validate --strict $kube_version ($values values): $(grep -c 'passed for resource' <<<"$kv") objects valid"
  fi
done

# ------------------------------------------------------------ bad values
n_bad=0
for f in "$chart"/tests/bad-values/*.yaml; do
  name="bad-values/$(basename "$f")"
  expect=$(sed -n '1s/^# expect: //p' "$f")
  if [ -z "$expect" ]; then
    fail "$name: first line must be '# expect: <substring of the error>'"
    continue
  fi
  n_bad=$((n_bad + 1))
  if helm template cilium "$chart" --namespace kube-system -f "$f" >/dev/null 2>"$work/bad.err"; then
    fail "$name: helm template accepted it (expected: $expect)"
  elif grep -qF -- "$expect" "$work/bad.err"; then
    pass "$name refused: $expect"
  else
    fail "$name refused, but without \"$expect\"" "$(cat "$work/bad.err")"
  fi
done
[ "$n_bad" -gt 0 ] || fail "no bad-values files in charts/cilium/tests/bad-values"

# ------------------------------------------------------------ Grafana dashboard
# The dashboard renders (all-features values) and its JSON parses with every
# panel querying something; that each metric exists is checked against real
# scrapes in e2e (datapath::star_wars_policy_with_real_packets).
if helm template cilium "$chart" --namespace kube-system -f "$all_features" \
  --show-only templates/dashboards.yaml >"$work/dash.yaml" 2>"$work/dash.err"; then
  if panels=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in d["panels"] for t in p["targets"] if t.get("expr")]
assert len(exprs) >= len(d["panels"]) > 0, "a panel without a query"
print(len(d["panels"]))' "$chart/files/grafana-dashboard.json" 2>&1); then
    pass "Grafana dashboard: $panels panels, rendered in a ConfigMap"
  else
    fail "files/grafana-dashboard.json" "$panels"
  fi
else
  fail "helm template --show-only templates/dashboards.yaml" "$(cat "$work/dash.err")"
fi

# ------------------------------------------------------------ kubeVersion floor
# The floor is the Kubernetes the floor test tier runs on (1.33,
# scripts/build-kube.sh --floor): helm takes it and refuses the release
# below it.
if ! helm template cilium "$chart" --namespace kube-system --kube-version 1.33.0 >/dev/null 2>"$work/kv.err"; then
  fail "helm template --kube-version 1.33.0 refused" "$(cat "$work/kv.err")"
elif helm template cilium "$chart" --namespace kube-system --kube-version 1.32.9 >/dev/null 2>"$work/kv.err"; then
  fail "helm template --kube-version 1.32.9 accepted: the chart's kubeVersion floor is not 1.33"
else
  pass "kubeVersion: 1.33.0 accepted, 1.32.9 refused"
fi

# ------------------------------------------------------------ Prometheus rules
rules="$chart/files/prometheus-rules.yaml"
if out=$(promtool check rules "$rules" 2>&1); then
  pass "promtool check rules files/prometheus-rules.yaml: $(sed -n 's/.*SUCCESS: \([0-9]*\) rules found.*/\1/p' <<<"$out") rules"
else
  fail "promtool check rules files/prometheus-rules.yaml" "$out"
fi
if out=$(cd "$chart/tests" && promtool test rules rules_test.yaml 2>&1); then
  pass "promtool test rules tests/rules_test.yaml: $(grep -c '^  - name:' "$chart/tests/rules_test.yaml") test groups"
else
  fail "promtool test rules tests/rules_test.yaml" "$out"
fi
# The PrometheusRule the chart renders, turned back into a rule file.
if helm template cilium "$chart" --namespace kube-system -f "$all_features" \
  --show-only templates/operator/prometheusrule.yaml >"$work/pr.yaml" 2>"$work/pr.err"; then
  sed -n '/^spec:/,$p' "$work/pr.yaml" | tail -n +2 | sed 's/^  //' >"$work/pr-rules.yaml"
  want=$(promtool check rules "$rules" 2>&1 | sed -n 's/.*SUCCESS: \([0-9]*\) rules found.*/\1/p')
  if got=$(promtool check rules "$work/pr-rules.yaml" 2>&1) &&
    [ "$(sed -n 's/.*SUCCESS: \([0-9]*\) rules found.*/\1/p' <<<"$got")" = "$want" ]; then
    pass "PrometheusRule embeds the $want rules of files/prometheus-rules.yaml"
  else
    fail "PrometheusRule does not hold the rules of files/prometheus-rules.yaml ($want expected)" "$got"
  fi
else
  fail "helm template --show-only templates/operator/prometheusrule.yaml" "$(cat "$work/pr.err")"
fi

if [ "$failures" -gt 0 ]; then
  echo "chart-check: $failures check(s) FAILED" >&2
  exit 1
fi
echo "chart-check: all checks passed"
