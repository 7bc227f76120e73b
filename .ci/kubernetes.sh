#!/usr/bin/env bash
# Checks config/kubernetes/: renders every kustomization (the base, each overlay, and each
# overlay with each component added) with `kubectl kustomize`, and validates every rendered
# document with `kubernetes-validate --strict` against Kubernetes 1.29 and the newest release the
# installed kubernetes-validate knows, plus the checks no schema makes (.ci/kubernetes_check.py
# says which, and how the Prometheus Operator's custom resources are checked). Also checks that
# the generated PrometheusRule is current with config/observability/token-sidecar-alerts.yml.
#
# Installs kubernetes-validate from PyPI into a venv under target/ the first time (a few seconds
# after that: it only checks the installed version). Needs kubectl and Python 3. Starts nothing,
# talks to no cluster. Exits non-zero on any failure. Usage: bash .ci/kubernetes.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# The schemas come with the package: raise this to validate against newer Kubernetes releases.
validate_version=1.37.0
out=target/kubernetes
venv=$out/venv

step() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS"; }
now_ms() { date +%s%3N; }

require() { command -v "$1" >/dev/null || { echo "$1 is not on PATH: $2"; exit 1; }; }
require kubectl "its kustomize command renders the manifests"
require python3 "it runs kubernetes-validate and the checks"

step "kubernetes-validate $validate_version"
installed=$("$venv/bin/kubernetes-validate" --version 2>/dev/null || true)
if [ "$installed" != "$validate_version" ]; then
  echo "installing kubernetes-validate==$validate_version into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$validate_version"
fi
"$venv/bin/kubernetes-validate" --version
kubectl version --client 2>&1 | grep -i kustomize || true

step "generated PrometheusRule"
python3 scripts/prometheusrule.py --check

step "render"
rm -rf "$out/rendered" "$out/with"
mkdir -p "$out/rendered"
# Every kustomization except components, which render only as part of one.
mapfile -t dirs < <(find config/kubernetes -name kustomization.yaml -printf '%h\n' | sort)
kustomizations=()
components=()
for dir in "${dirs[@]}"; do
  if grep -q '^kind: Component' "$dir/kustomization.yaml"; then
    components+=("$dir")
  else
    kustomizations+=("$dir")
  fi
done
# Each overlay with each component: a throwaway kustomization under target/ that adds it.
for overlay in config/kubernetes/overlays/*/; do
  overlay=${overlay%/}
  for component in "${components[@]}"; do
    with="$out/with/$(basename "$component")/$(basename "$overlay")"
    mkdir -p "$with"
    up=$(realpath --relative-to="$with" .)
    cat >"$with/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $up/$overlay
components:
  - $up/$component
EOF
    kustomizations+=("$with")
  done
done
rendered=()
for dir in "${kustomizations[@]}"; do
  case $dir in
    "$out"/with/*) rest=${dir#"$out"/with/}; name="overlays-${rest#*/}+${rest%%/*}" ;;
    *) rest=${dir#config/kubernetes/}; name=${rest//\//-} ;;
  esac
  file="$out/rendered/$name.yaml"
  start=$(now_ms)
  kubectl kustomize "$dir" >"$file"
  documents=$(grep -c '^kind:' "$file")
  printf '%-40s %4d ms  %2d documents\n' "$name" $(($(now_ms) - start)) "$documents"
  rendered+=("$file")
done

step "validate"
start=$(now_ms)
"$venv/bin/python" .ci/kubernetes_check.py "${rendered[@]}"
echo "validated in $(($(now_ms) - start)) ms"

step "done"
echo "kubernetes manifests: ${#rendered[@]} renders checked"
