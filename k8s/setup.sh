#!/usr/bin/env bash
# One-shot minikube bring-up of the reminder service:
#   minikube -> image built in minikube's Docker -> etcd (3) + PostgreSQL -> migration Job ->
#   fake provider + 3 replicas -> how to watch the logs, find the leader and kill it.
# Environment: NAMESPACE (default reminders), MINIKUBE_PROFILE (default minikube),
#              MINIKUBE_START_ARGS (default "--cpus=2 --memory=4096"), IMAGE (default reminders:latest).
# Tear down with k8s/cleanup.sh.
set -euo pipefail

NAMESPACE=${NAMESPACE:-reminders}
PROFILE=${MINIKUBE_PROFILE:-minikube}
START_ARGS=${MINIKUBE_START_ARGS:---cpus=2 --memory=4096}
IMAGE=${IMAGE:-reminders:latest}
TIMEOUT=${TIMEOUT:-300s}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'setup.sh: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH ($2)"; }

need minikube "https://minikube.sigs.k8s.io/docs/start/"
need kubectl "https://kubernetes.io/docs/tasks/tools/"

kc() { kubectl --context "$PROFILE" --namespace "$NAMESPACE" "$@"; }

say "minikube (profile $PROFILE)"
if minikube status --profile "$PROFILE" >/dev/null 2>&1; then
    echo "already running"
else
    # shellcheck disable=SC2086 # START_ARGS is a list of flags on purpose
    minikube start --profile "$PROFILE" $START_ARGS
fi

say "building $IMAGE inside minikube's Docker"
if command -v docker >/dev/null 2>&1; then
    eval "$(minikube --profile "$PROFILE" docker-env)"
    docker build -t "$IMAGE" "$ROOT"
else
    echo "no docker CLI here: using 'minikube image build'"
    minikube --profile "$PROFILE" image build -t "$IMAGE" "$ROOT"
fi

say "namespace $NAMESPACE"
kubectl --context "$PROFILE" create namespace "$NAMESPACE" --dry-run=client -o yaml \
    | kubectl --context "$PROFILE" apply -f -

# Everything comes from one rendering of the kustomization; each step applies a slice of it
# selected by the app.kubernetes.io/component label.
MANIFESTS=$(kubectl kustomize "$HERE")
apply_slice() { printf '%s\n' "$MANIFESTS" | kc apply -f - --selector "app.kubernetes.io/component in ($1)"; }

say "settings, secrets, etcd and PostgreSQL"
apply_slice "config,etcd,database"
kc rollout status statefulset/etcd --timeout="$TIMEOUT"
kc rollout status statefulset/postgres --timeout="$TIMEOUT"

say "migrating the database (Job reminders-migrate)"
# A Job's pod template is immutable and a finished Job does not run again: start afresh.
kc delete job reminders-migrate --ignore-not-found --wait=true
apply_slice "migration"
deadline=$((SECONDS + 300))
while :; do
    complete=$(kc get job reminders-migrate -o jsonpath='{.status.conditions[?(@.type=="Complete")].status}')
    failed=$(kc get job reminders-migrate -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}')
    if [[ $complete == True ]]; then
        break
    fi
    if [[ $failed == True ]] || ((SECONDS > deadline)); then
        kc logs job/reminders-migrate --tail=50 || true
        die "the migration Job did not complete"
    fi
    sleep 2
done
kc logs job/reminders-migrate --tail=5 || true

say "fake telephony provider and the service (3 replicas)"
apply_slice "telephony,app"
kc rollout status deployment/fake-provider --timeout="$TIMEOUT"
kc rollout status deployment/reminders --timeout="$TIMEOUT"

# Who leads? Ask every replica's /leader (the image has python, not curl).
ASK_LEADER='import json, urllib.request; print(json.load(urllib.request.urlopen("http://127.0.0.1:8080/leader", timeout=3))["leader"] or "")'
leader=""
for _ in $(seq 30); do
    pod=$(kc get pods -l app.kubernetes.io/name=reminders,app.kubernetes.io/component=app \
        --field-selector=status.phase=Running -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
    if [[ -n $pod ]]; then
        leader=$(kc exec "$pod" -- python -c "$ASK_LEADER" 2>/dev/null || true)
    fi
    [[ -n $leader ]] && break
    sleep 1
done

say "up"
kc get pods -o wide
cat <<EOT

Leader now: ${leader:-<none yet>}

Watch the replicas' logs (JSON, one object per line):
  kubectl -n $NAMESPACE logs -f -l app.kubernetes.io/name=reminders,app.kubernetes.io/component=app --prefix --max-log-requests=10

Ask a replica who leads:
  kubectl -n $NAMESPACE exec deploy/reminders -- python -c '$ASK_LEADER'
or through the Service:
  kubectl -n $NAMESPACE port-forward svc/reminders 8080:80 &
  curl -s localhost:8080/leader

Fail over: delete the leader pod and ask again; another replica leads within moments
(it resigns on SIGTERM), and the Deployment starts a replacement:
  kubectl -n $NAMESPACE delete pod ${leader:-<leader pod>}

Create an appointment with a reminder a minute from now (API_TOKEN is demo-api-token, see
k8s/secrets.yaml; calls are placed 08:00-21:00 in the appointment's timezone, CALL_WINDOW):
  curl -s -X POST localhost:8080/appointments -H 'Authorization: Bearer demo-api-token' \\
    -H 'Content-Type: application/json' \\
    -d '{"customer_name": "Ada", "phone": "+14155550123", "starts_at": "$(date -u -d '+2 hours' +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo 2030-01-01T12:00:00Z)", "remind_at": ["$(date -u -d '+1 minute' +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo 2030-01-01T11:00:00Z)"]}'
Calls the leader placed (fake provider):
  kubectl -n $NAMESPACE exec deploy/fake-provider -- python -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8090/v1/calls").read().decode())'

Tear down: k8s/cleanup.sh
EOT
