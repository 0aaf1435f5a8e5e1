#!/usr/bin/env bash
# Tear-down of k8s/setup.sh: deletes the namespace (pods, Services, PVCs with etcd's and
# PostgreSQL's data). `k8s/cleanup.sh --all` also deletes the minikube cluster (profile).
# Environment: NAMESPACE (default reminders), MINIKUBE_PROFILE (default minikube).
set -euo pipefail

NAMESPACE=${NAMESPACE:-reminders}
PROFILE=${MINIKUBE_PROFILE:-minikube}
DELETE_CLUSTER=false

for arg in "$@"; do
    case $arg in
        --all) DELETE_CLUSTER=true ;;
        -h | --help)
            sed -n '2,4p' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *)
            echo "cleanup.sh: unknown argument: $arg (use --all to delete the minikube cluster too)" >&2
            exit 2
            ;;
    esac
done

die() { printf 'cleanup.sh: %s\n' "$*" >&2; exit 1; }
command -v minikube >/dev/null 2>&1 || die "minikube not found on PATH"
command -v kubectl >/dev/null 2>&1 || die "kubectl not found on PATH"

if ! minikube status --profile "$PROFILE" >/dev/null 2>&1; then
    echo "minikube profile $PROFILE is not running: nothing to delete in it"
else
    echo "==> deleting namespace $NAMESPACE (workloads, Services, Secrets, PVCs)"
    kubectl --context "$PROFILE" delete namespace "$NAMESPACE" --ignore-not-found --wait=true --timeout=180s
fi

if [[ $DELETE_CLUSTER == true ]]; then
    echo "==> deleting minikube profile $PROFILE"
    minikube delete --profile "$PROFILE"
fi
echo "done"
