#!/usr/bin/env bash
# The bundled PostgreSQL's TLS material for one namespace, with openssl (k8s/setup.sh and
# tests/test_k8s.py run it), as k8s/etcd-certs.sh makes etcd's:
#   k8s/postgres-certs.sh NAMESPACE OUTDIR
# writes, one directory per Kubernetes Secret (file name = Secret key):
#   OUTDIR/postgres-tls/{tls.crt,tls.key}  the server (StatefulSet postgres, ssl=on)
#   OUTDIR/postgres-ca/ca.crt              clients (the app, the migration and check Jobs): the CA only,
#                                          DATABASE_URL's sslrootcert (ssl=verify-full)
#   OUTDIR/ca/ca.key                       the CA's key: keep it out of the cluster
# A CA of its own, not etcd's: etcd trusts its CA's certificates as peers. The server certificate
# names every way the database is reached: the Service `postgres` (short, namespaced, FQDN) and
# localhost / 127.0.0.1 (inside the pod). An existing OUTDIR/ca is reused (re-issue only).
set -euo pipefail

[[ $# -eq 2 ]] || { echo "usage: $0 NAMESPACE OUTDIR" >&2; exit 2; }
NAMESPACE=$1
OUT=$2
DAYS=${DAYS:-825}
command -v openssl >/dev/null 2>&1 || { echo "postgres-certs.sh: openssl not found on PATH" >&2; exit 1; }

umask 077
mkdir -p "$OUT/ca" "$OUT/postgres-tls" "$OUT/postgres-ca"

if [[ ! -s $OUT/ca/ca.key ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$DAYS" \
        -subj "/CN=reminders-postgres-ca/O=reminders" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$OUT/ca/ca.key" -out "$OUT/ca/ca.crt" 2>/dev/null
fi

sans="DNS:postgres,DNS:postgres.$NAMESPACE,DNS:postgres.$NAMESPACE.svc,DNS:postgres.$NAMESPACE.svc.cluster.local"
sans+=",DNS:localhost,IP:127.0.0.1"

ext=$(mktemp)
trap 'rm -f "$ext" "$OUT/postgres-tls/tls.csr"' EXIT
cat >"$ext" <<EOT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans
EOT

openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=postgres/O=reminders" \
    -keyout "$OUT/postgres-tls/tls.key" -out "$OUT/postgres-tls/tls.csr" 2>/dev/null
openssl x509 -req -sha256 -days "$DAYS" -in "$OUT/postgres-tls/tls.csr" \
    -CA "$OUT/ca/ca.crt" -CAkey "$OUT/ca/ca.key" -CAcreateserial -extfile "$ext" \
    -out "$OUT/postgres-tls/tls.crt" 2>/dev/null
cp "$OUT/ca/ca.crt" "$OUT/postgres-ca/ca.crt"
# Public certificates may be read by anyone; keys stay 0600.
chmod 0644 "$OUT/postgres-tls/tls.crt" "$OUT/postgres-ca/ca.crt" "$OUT/ca/ca.crt"
rm -f "$OUT/ca/ca.srl"
echo "postgres-certs.sh: certificates for namespace $NAMESPACE in $OUT"
