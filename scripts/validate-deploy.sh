#!/usr/bin/env bash
# Checks the deployment files: yamllint on everything under deploy/, and
# every Kubernetes manifest against the API schemas of a current Kubernetes
# with `kubernetes-validate --strict` (offline schemas from PyPI). Custom
# resources (ServiceMonitor, ScaledObject) have no bundled schema: they are
# linted and reported as such.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TICKSERVE_DEPLOY_VENV:-target/venv-deploy}"
kubernetes_version="${KUBERNETES_VERSION:-1.37.0}"

if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/yamllint" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check kubernetes-validate==1.37.0 yamllint==1.38.0
fi

"$venv/bin/yamllint" --strict deploy/ .yamllint
# Kubernetes resources: everything but kustomizations and adapter config.
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' \
    ! -name kustomization.yaml ! -name 'prometheus-adapter-rules.yaml' | sort)
"$venv/bin/kubernetes-validate" --strict --quiet -k "$kubernetes_version" "${manifests[@]}"
echo "deploy/: yamllint clean; ${#manifests[@]} manifest files valid for Kubernetes $kubernetes_version"
