#!/usr/bin/env bash
# Development secrets for deploy/compose/tls.yml: a throw-away CA, a server certificate for the
# names compose clients dial, and random API and admin keys. For production, bring certificates
# from your own CA and keys from your secret store (same file names, MEDPCLIP_SECRETS=dir).
#
#   deploy/compose/make-dev-secrets.sh [DIR]     (default: deploy/compose/secrets)
set -euo pipefail

dir=${1:-"$(dirname "$0")/secrets"}
mkdir -p "$dir"
cd "$dir"
# never overwrite: clients may already trust this CA and hold these keys
for f in ca.crt tls.crt tls.key api-key admin-key; do
  if [[ -e $f ]]; then echo "$dir/$f exists; remove the old files first" >&2; exit 1; fi
done

umask 077  # private keys and API keys readable by their owner only (root in the container)
openssl req -x509 -newkey rsa:3072 -nodes -days 365 -subj "/CN=medp-clip dev CA" \
  -keyout ca.key -out ca.crt 2>/dev/null
# the names clients use: the compose services, and the published ports on this machine
openssl req -newkey rsa:3072 -nodes -subj "/CN=triton" -keyout tls.key -out tls.csr 2>/dev/null
printf 'subjectAltName=DNS:triton,DNS:triton-cpu,DNS:localhost,IP:127.0.0.1\n' > san.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
  -extfile san.ext -out tls.crt 2>/dev/null
openssl rand -hex 32 > api-key
openssl rand -hex 32 > admin-key
# the CA key is only needed to sign; certificates are public
rm -f ca.key ca.srl tls.csr san.ext
chmod 644 ca.crt tls.crt
echo "wrote $dir: ca.crt tls.crt tls.key api-key admin-key"
