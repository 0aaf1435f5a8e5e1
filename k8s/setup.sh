#!/usr/bin/env bash
# One-shot minikube bring-up of the reminder service.
#   k8s/setup.sh                      the demo overlay (k8s/overlays/demo): its in-cluster fake provider
#   k8s/setup.sh --provider twilio    going live with Twilio (k8s/overlays/twilio)
#   k8s/setup.sh --provider telnyx    going live with Telnyx (k8s/overlays/telnyx)
# minikube with a NetworkPolicy-enforcing CNI (Calico) -> image built in minikube's Docker ->
#   Secrets with random values + etcd's and PostgreSQL's TLS certificates (k8s/etcd-certs.sh,
#   k8s/postgres-certs.sh) -> NetworkPolicies ->
#   etcd (3, TLS) + PostgreSQL -> etcd-auth Job -> migration Job -> the demo's fake provider and 3
#   replicas; with --provider: the provider's Secret, the Ingress, the reminders-check Job, 3
#   replicas, then `reminders check` inside a replica -> how to watch the logs, find the leader.
# Environment: NAMESPACE (default reminders), MINIKUBE_PROFILE (default minikube),
#              MINIKUBE_START_ARGS (default "--cpus=2 --memory=4096 --cni=calico"),
#              IMAGE (default reminders:<version in pyproject.toml>, the tag the manifests pin),
#              DEMO_IMAGE (default reminders-demo:<version>: the fake provider, the Dockerfile's demo target),
#              CERT_DIR (default ~/.local/state/reminders/etcd-certs/<profile>-<namespace>: etcd's CA),
#              PG_CERT_DIR (default ~/.local/state/reminders/postgres-certs/<profile>-<namespace>: PostgreSQL's CA).
# With --provider (README "Going live with Twilio or Telnyx"):
#              PUBLIC_URL (required: https://<host> at which the provider reaches the webhooks; the
#                Ingress serves /telephony/ on that host), TELEPHONY_FROM (required: the caller id,
#                E.164), ALLOWED_COUNTRIES (required: the countries it may call, ISO codes such as
#                US,CA, or * for every country), CALLS_PER_SECOND (default 1: the account's rate);
#              the credentials, read from the environment into the Secret reminders-<provider>,
#                never put on a command line: twilio: TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN;
#                telnyx: TELNYX_API_KEY, TELNYX_CONNECTION_ID, TELNYX_PUBLIC_KEY. On a re-run with
#                none of them set, the existing Secret is kept.
# Existing Secrets are kept (re-running does not change passwords). Tear down with k8s/cleanup.sh.
set -euo pipefail

NAMESPACE=${NAMESPACE:-reminders}
PROFILE=${MINIKUBE_PROFILE:-minikube}
START_ARGS=${MINIKUBE_START_ARGS:---cpus=2 --memory=4096 --cni=calico}
TIMEOUT=${TIMEOUT:-300s}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml")
PINNED=reminders:$VERSION # what the manifests name
IMAGE=${IMAGE:-$PINNED}
DEMO_PINNED=reminders-demo:$VERSION # the fake provider's image (the service's has no fakes)
DEMO_IMAGE=${DEMO_IMAGE:-$DEMO_PINNED}
CERT_DIR=${CERT_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/reminders/etcd-certs/$PROFILE-$NAMESPACE}
PG_CERT_DIR=${PG_CERT_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/reminders/postgres-certs/$PROFILE-$NAMESPACE}
# What DATABASE_URL asks of the connection: TLS, the server's certificate checked against the CA
# the pods mount from the Secret postgres-ca (k8s/base/app.yaml, migrate.yaml).
DB_TLS="ssl=verify-full&sslrootcert=/etc/reminders/postgres-ca/ca.crt"

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'setup.sh: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH ($2)"; }

PROVIDER=""
while (($#)); do
    case $1 in
        --provider)
            (($# >= 2)) || die "--provider needs twilio or telnyx"
            PROVIDER=$2
            shift 2
            ;;
        --provider=*)
            PROVIDER=${1#*=}
            shift
            ;;
        -h | --help)
            sed -n '2,26p' "${BASH_SOURCE[0]}"
            exit 0
            ;;
        *) die "unknown argument: $1 (--provider twilio|telnyx, or none for the demo)" ;;
    esac
done

# Each provider's Secret (reminders-<provider>): its keys, read from the operator's environment.
TWILIO_KEYS=(TWILIO_ACCOUNT_SID TWILIO_AUTH_TOKEN)
TELNYX_KEYS=(TELNYX_API_KEY TELNYX_CONNECTION_ID TELNYX_PUBLIC_KEY)
case $PROVIDER in
    "") OVERLAY=demo ;;
    twilio) OVERLAY=twilio PROVIDER_KEYS=("${TWILIO_KEYS[@]}") ;;
    telnyx) OVERLAY=telnyx PROVIDER_KEYS=("${TELNYX_KEYS[@]}") ;;
    *) die "--provider must be twilio or telnyx, not '$PROVIDER'" ;;
esac
if [[ -n $PROVIDER ]]; then
    # Checked before anything starts. They go into the ConfigMap and the Ingress: not secrets.
    PUBLIC_URL=${PUBLIC_URL:-}
    PUBLIC_URL=${PUBLIC_URL%/}
    [[ -n $PUBLIC_URL ]] || die "PUBLIC_URL is required with --provider: the https URL at which $PROVIDER reaches the webhooks, e.g. https://reminders.example.com"
    [[ $PUBLIC_URL =~ ^https://(([A-Za-z0-9-]+\.)+[A-Za-z0-9-]+)$ ]] \
        || die "PUBLIC_URL must be https://<host> (no port, no path: the Ingress serves /telephony/ on that host), not $PUBLIC_URL"
    PUBLIC_HOST=${BASH_REMATCH[1]}
    CALLS_PER_SECOND=${CALLS_PER_SECOND:-1}
    [[ $CALLS_PER_SECOND =~ ^[0-9]+(\.[0-9]+)?$ ]] \
        || die "CALLS_PER_SECOND must be a number (the account's calls per second), not $CALLS_PER_SECOND"
    TELEPHONY_FROM=${TELEPHONY_FROM:-}
    [[ $TELEPHONY_FROM =~ ^\+[1-9][0-9]{6,14}$ ]] \
        || die "TELEPHONY_FROM is required with --provider: the caller id, a number of the $PROVIDER account in E.164 (+15551234567)"
    ALLOWED_COUNTRIES=${ALLOWED_COUNTRIES:-}
    [[ $ALLOWED_COUNTRIES =~ ^(\*|[A-Za-z]{2}(,[A-Za-z]{2})*)$ ]] \
        || die "ALLOWED_COUNTRIES is required with --provider: the countries $PROVIDER may call, e.g. US,CA (* for every country)"
fi

need minikube "https://minikube.sigs.k8s.io/docs/start/"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need openssl "random passwords and etcd's certificates"
[[ -n $VERSION ]] || die "no version in $ROOT/pyproject.toml"

kc() { kubectl --context "$PROFILE" --namespace "$NAMESPACE" "$@"; }

say "minikube (profile $PROFILE)"
if minikube status --profile "$PROFILE" >/dev/null 2>&1; then
    echo "already running"
else
    # shellcheck disable=SC2086 # START_ARGS is a list of flags on purpose
    minikube start --profile "$PROFILE" $START_ARGS
fi
if ! kubectl --context "$PROFILE" -n kube-system get pods -l k8s-app=calico-node -o name 2>/dev/null | grep -q .; then
    echo "WARNING: no Calico in this cluster: its NetworkPolicies are not enforced." >&2
    echo "         Recreate it with a policy-enforcing CNI: minikube delete -p $PROFILE; then run this again." >&2
fi

# The demo's fake provider runs the demo image; the provider overlays have no fake.
if [[ -n $PROVIDER ]]; then
    say "building $IMAGE inside minikube's Docker"
else
    say "building $IMAGE and $DEMO_IMAGE inside minikube's Docker"
fi
if command -v docker >/dev/null 2>&1; then
    eval "$(minikube --profile "$PROFILE" docker-env)"
    docker build -t "$IMAGE" "$ROOT"
    [[ -n $PROVIDER ]] || docker build --target demo -t "$DEMO_IMAGE" "$ROOT"
else
    echo "no docker CLI here: using 'minikube image build'"
    minikube --profile "$PROFILE" image build -t "$IMAGE" "$ROOT"
    [[ -n $PROVIDER ]] || minikube --profile "$PROFILE" image build -t "$DEMO_IMAGE" --build-opt=target=demo "$ROOT"
fi
if [[ -n $PROVIDER ]]; then
    # The Ingress (k8s/base/ingress.yaml) needs a controller: minikube's addon is ingress-nginx.
    minikube --profile "$PROFILE" addons enable ingress
fi

say "namespace $NAMESPACE"
kubectl --context "$PROFILE" create namespace "$NAMESPACE" --dry-run=client -o yaml \
    | kubectl --context "$PROFILE" apply -f -

say "secrets (random values; existing ones are kept)"
random() { openssl rand -hex 24; }
has_secret() { kc get secret "$1" >/dev/null 2>&1; }
if ! has_secret reminders-postgres; then
    # The database password goes into both Secrets at once, so they always match.
    db_password=$(random)
    kc create secret generic reminders-postgres --from-literal=POSTGRES_USER=reminders \
        --from-literal=POSTGRES_PASSWORD="$db_password" --from-literal=POSTGRES_DB=reminders
    kc create secret generic reminders-db \
        --from-literal=DATABASE_URL="postgresql+asyncpg://reminders:$db_password@postgres:5432/reminders?$DB_TLS"
fi
has_secret reminders-db || die "Secret reminders-db is missing but reminders-postgres exists: delete reminders-postgres and re-run"
# A DATABASE_URL from before PostgreSQL had TLS gets its query (the service refuses plain text to a
# non-loopback host). Through a pipe: the password is never an argument of a command.
db_url=$(kc get secret reminders-db -o jsonpath='{.data.DATABASE_URL}' | base64 -d)
if [[ $db_url == postgresql* && $db_url != *ssl=verify-full* ]]; then
    printf 'DATABASE_URL=%s?%s\n' "${db_url%%\?*}" "$DB_TLS" \
        | kc create secret generic reminders-db --from-env-file=/dev/stdin --dry-run=client -o yaml | kc apply -f -
fi
unset db_url
has_secret reminders-secrets || kc create secret generic reminders-secrets \
    --from-literal=TELEPHONY_TOKEN="$(random)" --from-literal=API_TOKEN="$(random)"
has_secret reminders-etcd || kc create secret generic reminders-etcd --from-literal=ETCD_PASSWORD="$(random)"
has_secret etcd-root || kc create secret generic etcd-root --from-literal=ETCD_ROOT_PASSWORD="$(random)"
if ! has_secret etcd-tls || ! has_secret etcd-ca; then
    "$HERE/etcd-certs.sh" "$NAMESPACE" "$CERT_DIR"
    kc delete secret etcd-tls etcd-ca --ignore-not-found
    kc create secret generic etcd-tls --from-file="$CERT_DIR/etcd-tls"
    kc create secret generic etcd-ca --from-file="$CERT_DIR/etcd-ca"
    echo "etcd's CA key stays in $CERT_DIR/ca (not in the cluster)"
fi
if ! has_secret postgres-tls || ! has_secret postgres-ca; then
    "$HERE/postgres-certs.sh" "$NAMESPACE" "$PG_CERT_DIR"
    kc delete secret postgres-tls postgres-ca --ignore-not-found
    kc create secret generic postgres-tls --from-file="$PG_CERT_DIR/postgres-tls"
    kc create secret generic postgres-ca --from-file="$PG_CERT_DIR/postgres-ca"
    echo "PostgreSQL's CA key stays in $PG_CERT_DIR/ca (not in the cluster)"
fi

# The provider's credentials: from the operator's environment into the Secret, through a pipe.
# printf is a shell builtin (no process of its own), so no value is ever an argument that `ps` or
# /proc/<pid>/cmdline shows; kubectl reads them from its stdin (--from-env-file=/dev/stdin).
provider_secret() {
    local name=reminders-$PROVIDER key missing=()
    for key in "${PROVIDER_KEYS[@]}"; do
        [[ -n ${!key:-} ]] || missing+=("$key")
    done
    if ((${#missing[@]} == ${#PROVIDER_KEYS[@]})) && has_secret "$name"; then
        echo "Secret $name kept (none of ${PROVIDER_KEYS[*]} is set)"
        return
    fi
    ((${#missing[@]} == 0)) || die "set ${missing[*]} in the environment: the Secret $name holds ${PROVIDER_KEYS[*]}"
    for key in "${PROVIDER_KEYS[@]}"; do
        [[ ${!key} =~ ^[^[:space:]]+$ ]] || die "$key holds spaces or a newline: paste it again without them"
    done
    for key in "${PROVIDER_KEYS[@]}"; do
        printf '%s=%s\n' "$key" "${!key}"
    done | kc create secret generic "$name" --from-env-file=/dev/stdin --dry-run=client -o yaml | kc apply -f -
}
if [[ -n $PROVIDER ]]; then
    provider_secret
fi

# Everything comes from one rendering of the overlay; each step applies a slice of it selected by
# the app.kubernetes.io/component label. The demo overlay's fixed demo Secrets (component
# demo-secrets) are never selected: the random ones above are used.
# --provider: a one-off kustomization over the provider's overlay sets PUBLIC_URL, CALLS_PER_SECOND,
# TELEPHONY_FROM, ALLOWED_COUNTRIES and PUBLIC_URL's host on the Ingress. Until replicas of this provider serve, no
# one answers its webhook route: the check Job then leaves PUBLIC_URL out (--skip public_url) and
# `reminders check` runs again inside a replica once they are up.
render_provider() {
    local skip_public_url=$1 work
    work=$(mktemp -d "$HERE/.setup.XXXXXX")
    {
        printf '%s\n' "apiVersion: kustomize.config.k8s.io/v1beta1" "kind: Kustomization" \
            "resources:" "  - ../overlays/$OVERLAY" "patches:" \
            "  - patch: |-" "      apiVersion: v1" "      kind: ConfigMap" "      metadata:" \
            "        name: reminders-config" "      data:" "        PUBLIC_URL: \"$PUBLIC_URL\"" \
            "        CALLS_PER_SECOND: \"$CALLS_PER_SECOND\"" "        TELEPHONY_FROM: \"$TELEPHONY_FROM\"" \
            "        ALLOWED_COUNTRIES: \"$ALLOWED_COUNTRIES\"" \
            "  - target: {kind: Ingress, name: reminders}" "    patch: |-" \
            "      - {op: replace, path: /spec/rules/0/host, value: \"$PUBLIC_HOST\"}" \
            "      - {op: replace, path: /spec/tls/0/hosts/0, value: \"$PUBLIC_HOST\"}"
        if [[ $skip_public_url == true ]]; then
            printf '%s\n' "  - target: {kind: Job, name: reminders-check}" "    patch: |-" \
                "      - {op: add, path: /spec/template/spec/containers/0/args, value: [--skip, public_url]}"
        fi
    } >"$work/kustomization.yaml"
    kubectl kustomize "$work" || { rm -rf "$work"; return 1; }
    rm -rf "$work"
}
if [[ -n $PROVIDER ]]; then
    # Replicas of this provider already serve (ready, and the live ConfigMap names it): the check
    # reaches them through PUBLIC_URL before they are replaced.
    serving=$(kc get deployment reminders -o jsonpath='{.status.readyReplicas}' 2>/dev/null || true)
    live_provider=$(kc get configmap reminders-config -o jsonpath='{.data.TELEPHONY_PROVIDER}' 2>/dev/null || true)
    FIRST_ROLLOUT=true
    if [[ ${serving:-0} -gt 0 && $live_provider == "$PROVIDER" ]]; then
        FIRST_ROLLOUT=false
    fi
    MANIFESTS=$(render_provider "$FIRST_ROLLOUT")
else
    MANIFESTS=$(kubectl kustomize "$HERE/overlays/demo")
fi
if [[ $IMAGE != "$PINNED" ]]; then
    MANIFESTS=${MANIFESTS//"image: $PINNED"/"image: $IMAGE"}
fi
if [[ $DEMO_IMAGE != "$DEMO_PINNED" ]]; then
    MANIFESTS=${MANIFESTS//"image: $DEMO_PINNED"/"image: $DEMO_IMAGE"}
fi
apply_slice() { printf '%s\n' "$MANIFESTS" | kc apply -f - --selector "app.kubernetes.io/component in ($1)"; }

# Runs a Job afresh (a Job's pod template is immutable and a finished Job does not run again).
run_job() {
    local job=$1 component=$2
    kc delete job "$job" --ignore-not-found --wait=true
    apply_slice "$component"
    local deadline=$((SECONDS + 300)) complete failed
    while :; do
        complete=$(kc get job "$job" -o jsonpath='{.status.conditions[?(@.type=="Complete")].status}')
        failed=$(kc get job "$job" -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}')
        [[ $complete == True ]] && break
        if [[ $failed == True ]] || ((SECONDS > deadline)); then
            kc logs "job/$job" --tail=50 || true
            die "the Job $job did not complete"
        fi
        sleep 2
    done
    kc logs "job/$job" --tail=5 || true
}

say "network policies (default deny), settings, etcd and PostgreSQL"
apply_slice "network-policy,config,etcd,database"
kc rollout status statefulset/etcd --timeout="$TIMEOUT"
kc rollout status statefulset/postgres --timeout="$TIMEOUT"

say "etcd users, role and auth (Job etcd-auth)"
run_job etcd-auth etcd-auth

say "migrating the database (Job reminders-migrate)"
run_job reminders-migrate migration

if [[ -n $PROVIDER ]]; then
    say "the Ingress: https://$PUBLIC_HOST/telephony/ (TLS: Secret reminders-tls)"
    apply_slice "ingress"

    # As the migration Job: before any replica with these settings places a call.
    say "checking before the rollout (Job reminders-check: reminders check)"
    run_job reminders-check check

    say "the service (3 replicas, $PROVIDER)"
    apply_slice "app"
    kc rollout status deployment/reminders --timeout="$TIMEOUT"

    # What the Job could not see before the first rollout, from inside a replica: a POST to
    # PUBLIC_URL's webhook route arrives at a replica and is refused for its missing signature.
    say "checking from inside a replica (reminders check)"
    kc exec deploy/reminders -- reminders check \
        || die "reminders check failed inside a replica (the FAIL line names the setting): fix it and run this again, or roll back (README \"Going live with Twilio or Telnyx\")"
else
    say "fake telephony provider and the service (3 replicas)"
    apply_slice "telephony,app,ingress"
    kc rollout status deployment/fake-provider --timeout="$TIMEOUT"
    kc rollout status deployment/reminders --timeout="$TIMEOUT"
fi

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

A replica's metrics (their own port, 9464, which the Service does not expose):
  kubectl -n $NAMESPACE port-forward deploy/reminders 9464 &
  curl -s localhost:9464/metrics | grep reminders_is_leader

Fail over: delete the leader pod and ask again; another replica leads within moments
(it resigns on SIGTERM), and the Deployment starts a replacement:
  kubectl -n $NAMESPACE delete pod ${leader:-<leader pod>}

Create an appointment with a reminder a minute from now (calls are placed 08:00-21:00 in the
appointment's timezone, CALL_WINDOW); the API token is random, in Secret reminders-secrets:
  API_TOKEN=\$(kubectl -n $NAMESPACE get secret reminders-secrets -o jsonpath='{.data.API_TOKEN}' | base64 -d)
  curl -s -X POST localhost:8080/appointments -H "Authorization: Bearer \$API_TOKEN" \\
    -H 'Content-Type: application/json' \\
    -d '{"customer_name": "Ada", "phone": "+14155550123", "starts_at": "$(date -u -d '+2 hours' +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo 2030-01-01T12:00:00Z)", "remind_at": ["$(date -u -d '+1 minute' +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo 2030-01-01T11:00:00Z)"]}'
EOT
if [[ -n $PROVIDER ]]; then
    cat <<EOT
That call is real ($PROVIDER, from $TELEPHONY_FROM): use a phone of your own. Its reminder's outcome:
  curl -s localhost:8080/appointments/<id> -H "Authorization: Bearer \$API_TOKEN"
Check again at any time, from inside the cluster (one line per check, exit 0 when all pass):
  kubectl -n $NAMESPACE exec deploy/reminders -- reminders check
Go-live checklist (console settings, the first hour, rolling back): README "Going live with Twilio or Telnyx".

Tear down: k8s/cleanup.sh
EOT
else
    cat <<EOT
Calls the leader placed (fake provider):
  kubectl -n $NAMESPACE exec deploy/fake-provider -- python -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8090/v1/calls").read().decode())'

Tear down: k8s/cleanup.sh
EOT
fi
