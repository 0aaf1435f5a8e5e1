#!/usr/bin/env bash
# etcd's TLS material for one namespace, with openssl (k8s/setup.sh and tests/test_k8s.py run it):
#   k8s/etcd-certs.sh NAMESPACE OUTDIR
# writes, one directory per Kubernetes Secret (file name = Secret key):
#   OUTDIR/etcd-tls/{ca.crt,tls.crt,tls.key}  etcd members: server and peer certificate
#   OUTDIR/etcd-ca/ca.crt                     clients (the app, the auth Job): the CA only
#   OUTDIR/ca/ca.key                          the CA's key: keep it out of the cluster
# The member certificate names every way the members are reached: the client Service `etcd`
# (short, namespaced, FQDN), each member under the headless Service, localhost / 127.0.0.1
# (probes, etcdctl inside a pod, the tests). An existing OUTDIR/ca is reused (re-issue only).
set -euo pipefail

[[ $# -eq 2 ]] || { echo "usage: $0 NAMESPACE OUTDIR" >&2; exit 2; }
NAMESPACE=$1
OUT=$2
DAYS=${DAYS:-825}
command -v openssl >/dev/null 2>&1 || { echo "etcd-certs.sh: openssl not found on PATH" >&2; exit 1; }

umask 077
mkdir -p "$OUT/ca" "$OUT/etcd-tls" "$OUT/etcd-ca"

if [[ ! -s $OUT/ca/ca.key ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$DAYS" \
        -subj "/CN=reminders-etcd-ca/O=reminders" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$OUT/ca/ca.key" -out "$OUT/ca/ca.crt" 2>/dev/null
fi

sans="DNS:etcd,DNS:etcd.$NAMESPACE,DNS:etcd.$NAMESPACE.svc,DNS:etcd.$NAMESPACE.svc.cluster.local"
sans+=",DNS:*.etcd-headless.$NAMESPACE.svc,DNS:*.etcd-headless.$NAMESPACE.svc.cluster.local"
sans+=",DNS:etcd-headless.$NAMESPACE.svc,DNS:localhost,IP:127.0.0.1"

ext=$(mktemp)
trap 'rm -f "$ext" "$OUT/etcd-tls/tls.csr"' EXIT
cat >"$ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$sans
EOF

openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=etcd/O=reminders" \
    -keyout "$OUT/etcd-tls/tls.key" -out "$OUT/etcd-tls/tls.csr" 2>/dev/null
openssl x509 -req -sha256 -days "$DAYS" -in "$OUT/etcd-tls/tls.csr" \
    -CA "$OUT/ca/ca.crt" -CAkey "$OUT/ca/ca.key" -CAcreateserial -extfile "$ext" \
    -out "$OUT/etcd-tls/tls.crt" 2>/dev/null
cp "$OUT/ca/ca.crt" "$OUT/etcd-tls/ca.crt"
cp "$OUT/ca/ca.crt" "$OUT/etcd-ca/ca.crt"
# Public certificates may be read by anyone; keys stay 0600.
chmod 0644 "$OUT/etcd-tls/ca.crt" "$OUT/etcd-tls/tls.crt" "$OUT/etcd-ca/ca.crt" "$OUT/ca/ca.crt"
rm -f "$OUT/ca/ca.srl"
echo "etcd-certs.sh: certificates for namespace $NAMESPACE in $OUT"
