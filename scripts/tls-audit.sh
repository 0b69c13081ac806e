#!/usr/bin/env bash
# Audits ringway's TLS listener with testssl.sh (the Debian package `testssl.sh`): a local
# ringway with an ECDSA P-256 and an RSA-2048 certificate from a private CA (which testssl is
# told to trust), and fails on any finding rated HIGH or CRITICAL. Bounded: testssl runs once,
# against 127.0.0.1 only, and ringway is stopped at the end.
#
# Usage: scripts/tls-audit.sh [path/to/ringway]   (default: builds target/release/ringway)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v testssl >/dev/null; then
    apt-get install -y testssl.sh >/dev/null
fi
bin=${1:-}
if [ -z "$bin" ]; then
    cargo build --release --quiet
    bin=target/release/ringway
fi

dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
cd "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -subj "/CN=audit CA" -keyout ca.key -out ca.pem 2>/dev/null
san="subjectAltName=DNS:localhost,IP:127.0.0.1"
# Where a public CA's certificate says revocation is published (testssl rates its absence HIGH;
# it is a property of the certificate, not of the server).
crl="crlDistributionPoints=URI:http://ca.invalid/audit.crl"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout ec.key -out ec.csr 2>/dev/null
openssl x509 -req -in ec.csr -CA ca.pem -CAkey ca.key -days 365 -out ec.pem \
    -extfile <(printf "%s\n%s\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth" "$san" "$crl") 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=rsa.localhost" -keyout rsa.key -out rsa.csr 2>/dev/null
openssl x509 -req -in rsa.csr -CA ca.pem -CAkey ca.key -days 365 -out rsa.pem \
    -extfile <(printf "subjectAltName=DNS:rsa.localhost\n%s\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth" "$crl") 2>/dev/null
port=$((20000 + RANDOM % 20000))
cat > ringway.toml <<TOML
[runtime]
workers = 1
pin_cores = false

[[listeners]]
name = "tls"
address = "127.0.0.1:$port"
[listeners.tls]
certificates = [
  { cert = "ec.pem", key = "ec.key" },
  { cert = "rsa.pem", key = "rsa.key" },
]

[[routes]]
name = "ok"
listener = "tls"
respond = { status = 200, body = "ok" }
TOML
"$OLDPWD/$bin" --config ringway.toml 2>ringway.log &
pid=$!
for _ in $(seq 100); do
    grep -q " ready " ringway.log && break
    sleep 0.1
done
grep -q " ready " ringway.log || { cat ringway.log; exit 1; }

status=0
for host in localhost rsa.localhost; do
    echo "== testssl against $host (127.0.0.1:$port)"
    rm -f "out-$host.json"
    testssl --quiet --color 0 --warnings off --add-ca ca.pem --ip 127.0.0.1 \
        --jsonfile "out-$host.json" "https://$host:$port/" >"testssl-$host.txt" 2>&1 || true
    grep -E "Testing protocols" -A12 "testssl-$host.txt" | sed -n '1,12p'
    python3 - "out-$host.json" <<'PY' || status=1
import json, sys
findings = json.load(open(sys.argv[1]))
bad = [f for f in findings if f.get("severity") in ("HIGH", "CRITICAL")]
counts = {}
for f in findings:
    counts[f.get("severity")] = counts.get(f.get("severity"), 0) + 1
print("severities:", dict(sorted(counts.items())))
for f in findings:
    if f.get("severity") in ("LOW", "MEDIUM", "HIGH", "CRITICAL"):
        print(f"  {f['severity']}: {f['id']}: {f['finding']}")
sys.exit(1 if bad else 0)
PY
done
if [ $status -eq 0 ]; then
    echo "tls-audit: no HIGH or CRITICAL finding"
else
    echo "tls-audit: FAILED"
fi
exit $status
