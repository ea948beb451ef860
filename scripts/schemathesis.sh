#!/usr/bin/env bash
# Schemathesis against a live `snatgw run` (issue #20): every operation of /openapi.json, every
# check (--checks all), every phase (examples, coverage, fuzzing, stateful).
#
# Needs root: the gateway runs in a network namespace of its own (it creates its two TUNs
# there; its API listens on that namespace's loopback), which this script creates and deletes.
# Nothing outside that namespace is touched: no host interface, route or port.
#
#   scripts/schemathesis.sh                    # builds target/debug/snatgw, then runs
#   SNATGW_BIN=target/debug/snatgw scripts/schemathesis.sh   # an already built binary
#
# Environment:
#   SNATGW_BIN              the snatgw binary (default: `cargo build --locked -p snatgw`, then
#                           target/debug/snatgw)
#   SCHEMATHESIS_SEED       --seed (default 20; printed, so a failing run can be repeated)
#   SCHEMATHESIS_EXAMPLES   --max-examples per operation and phase (default 500: about 2 minutes
#                           on 2 cores)
#   SCHEMATHESIS_WORKERS    --workers (default 2)
#   SCHEMATHESIS_ARGS       more `st run` arguments, word-split (e.g. "--include-path-regex
#                           deployments -v")
#   SNATGW_REQUIRE_ROOT=1   not root is a failure instead of a skip (as CI sets it)
#
# scripts/schemathesis.toml holds the only departures from schemathesis' defaults (each justified
# in docs/API.md, "Testing with schemathesis"): 412 expected for writes with If-Match, and 400
# for schema-valid bodies of the five writes whose bodies carry rules JSON Schema cannot state. The pinned schemathesis and its dependencies live in a venv under
# target/schemathesis-venv (created, or reused when it has exactly these versions). The report
# (JUnit, NDJSON, the gateway's log) is left in target/schemathesis-report/. The last line is
# `schemathesis: N passed, M failed` with N and M counted in API operations (an operation fails
# when any check fails on any of its test cases, in any phase; the stateful phase counts as one
# more "operation", the API's links).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "$(id -u)" != 0 ]; then
  if [ "${SNATGW_REQUIRE_ROOT:-}" = 1 ]; then
    echo "schemathesis: needs root (network namespace) and SNATGW_REQUIRE_ROOT=1: failing" >&2
    exit 1
  fi
  echo "schemathesis: skipped (not root: the gateway needs a network namespace)"
  exit 0
fi

ST_VERSION=4.32.5
# The whole dependency set, pinned (pip's resolution of schemathesis==4.32.5 in December
# 2026); a venv with anything else is rebuilt.
ST_CONSTRAINTS="anyio==4.16.0
certifi==2026.10.19.post1
charset-normalizer==3.5.3
click==8.5.1
graphql-core==3.3.2
harfile==0.6.0
hypothesis==6.170.27
hypothesis-graphql==0.13.5
idna==3.20
iniconfig==2.3.1
jsonschema_rs==0.60.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mdurl==0.1.2
packaging==26.4
pluggy==1.7.0
Pygments==2.21.0
pyrate-limiter==4.6.0
pytest==9.2.0
PyYAML==6.0.4
requests==2.34.2
rich==15.0.0
schemathesis==$ST_VERSION
sortedcontainers==2.4.0
typing_extensions==4.16.0
urllib3==2.8.0
Werkzeug==3.1.9"

SEED=${SCHEMATHESIS_SEED:-20}
EXAMPLES=${SCHEMATHESIS_EXAMPLES:-500}
WORKERS=${SCHEMATHESIS_WORKERS:-2}
PORT=7070   # the namespace's own loopback: free by construction
VENV=$ROOT/target/schemathesis-venv
REPORT=$ROOT/target/schemathesis-report
NS=snatgw-st-$$
TMP=$(mktemp -d /tmp/snatgw-st.XXXXXX)
GW_PID=

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$GW_PID" ] && kill -0 "$GW_PID" 2>/dev/null; then
    kill -TERM "$GW_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
  fi
  if ip netns list 2>/dev/null | grep -qx "$NS\( (id: [0-9]*)\)\?"; then
    ip netns del "$NS" || true
  fi
  if [ -f "$TMP/gateway.log" ] && [ -d "$REPORT" ]; then cp "$TMP/gateway.log" "$REPORT/" || true; fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the venv -------------------------------------------------------------------------------
venv_ok() {
  [ -x "$VENV/bin/st" ] && [ "$("$VENV/bin/pip" freeze --all 2>/dev/null | grep -v -E '^(pip|setuptools|wheel)==' | sort -f)" = "$(sort -f <<<"$ST_CONSTRAINTS")" ]
}
if ! venv_ok; then
  echo "schemathesis: creating $VENV (schemathesis $ST_VERSION, pinned)"
  rm -rf "$VENV"
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    echo "installing: python3 python3-venv"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    python3 -m venv "$VENV"
  fi
  printf '%s\n' "$ST_CONSTRAINTS" >"$TMP/requirements.txt"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$TMP/requirements.txt"
  venv_ok || { echo "schemathesis: the venv does not hold the pinned versions" >&2; exit 1; }
fi

# --- the gateway ----------------------------------------------------------------------------
if [ -z "${SNATGW_BIN:-}" ]; then
  cargo build --locked -p snatgw
  SNATGW_BIN=$ROOT/target/debug/snatgw
fi
[ -x "$SNATGW_BIN" ] || { echo "schemathesis: no snatgw binary at $SNATGW_BIN" >&2; exit 1; }
SNATGW_BIN=$(realpath "$SNATGW_BIN")

rm -rf "$REPORT"
mkdir -p "$REPORT" "$TMP/state" "$TMP/work"
# A token always: the API then checks it on every route (401 documented in the schema).
"$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$TMP/token"
chmod 600 "$TMP/token"
TOKEN=$(cat "$TMP/token")

# The reference topology (examples/reference.toml) plus an NSG, so every kind of resource has
# one to read, change and delete. The OpenAPI document's examples (its `{name}`s and request
# bodies, which the examples phase sends) name these resources, nsg-alone included.
{
  cat "$ROOT/examples/reference.toml"
  cat <<'TOML'

[[nsg]]
name = "nsg-alone"
nics = ["vm-alone"]
[[nsg.rules]]
name = "deny-smtp"
priority = 100
direction = "outbound"
access = "deny"
protocol = "tcp"
destination_ports = ["25"]
TOML
} >"$TMP/gateway.toml"

ip netns add "$NS"
ip -n "$NS" link set lo up
ip netns exec "$NS" "$SNATGW_BIN" run --config "$TMP/gateway.toml" \
  --tun-private st-priv --tun-public st-pub --queues 1 --fast-path off \
  --state-dir "$TMP/state" --api "127.0.0.1:$PORT" --token-file "$TMP/token" \
  --stats-file "$TMP/stats.json" >"$TMP/gateway.out" 2>"$TMP/gateway.log" &
GW_PID=$!

health() {
  ip netns exec "$NS" "$VENV/bin/python" - "$PORT" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=1) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}
for i in $(seq 200); do
  if ! kill -0 "$GW_PID" 2>/dev/null; then
    echo "schemathesis: snatgw run exited before it was healthy; its log:" >&2
    tail -n 30 "$TMP/gateway.log" >&2
    exit 1
  fi
  health && break
  [ "$i" = 200 ] && { echo "schemathesis: /healthz not ready after 20 s" >&2; tail -n 30 "$TMP/gateway.log" >&2; exit 1; }
  sleep 0.1
done
# The schema under test, kept with the report.
ip netns exec "$NS" "$VENV/bin/python" - "$PORT" "$TMP/token" "$REPORT/openapi.json" <<'EOF' || true
import sys, urllib.request
port, token_file, out = sys.argv[1:4]
req = urllib.request.Request(f"http://127.0.0.1:{port}/openapi.json",
                             headers={"Authorization": "Bearer " + open(token_file).read().strip()})
with urllib.request.urlopen(req, timeout=5) as r, open(out, "wb") as f:
    f.write(r.read())
EOF
echo "schemathesis: snatgw run (pid $GW_PID) healthy in namespace $NS; seed $SEED, $EXAMPLES examples, $WORKERS workers"

# --- schemathesis ---------------------------------------------------------------------------
config_args=()
[ -f "$ROOT/scripts/schemathesis.toml" ] && config_args=(--config-file "$ROOT/scripts/schemathesis.toml")
set +e
# shellcheck disable=SC2086 # SCHEMATHESIS_ARGS is word-split on purpose
(cd "$TMP/work" && ip netns exec "$NS" env NO_COLOR=1 COLUMNS=120 "$VENV/bin/st" "${config_args[@]}" run \
  "http://127.0.0.1:$PORT/openapi.json" \
  --header "Authorization: Bearer $TOKEN" \
  --checks all \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "$EXAMPLES" \
  --seed "$SEED" \
  --workers "$WORKERS" \
  --generation-database none \
  --request-timeout 40 \
  --no-color \
  --continue-on-failure \
  --report junit,ndjson --report-dir "$REPORT" \
  --report-junit-path "$REPORT/junit.xml" --report-ndjson-path "$REPORT/events.ndjson" \
  ${SCHEMATHESIS_ARGS:-})
st_rc=$?
set -e
if [ "$st_rc" -gt 128 ]; then
  echo "schemathesis: interrupted" >&2
  exit "$st_rc"
fi

if ! kill -0 "$GW_PID" 2>/dev/null; then
  echo "schemathesis: snatgw run died during the run; its log ends:" >&2
  tail -n 30 "$TMP/gateway.log" >&2
  st_rc=1
fi

# Operations passed / failed, from the JUnit report (one testcase per operation, plus one for
# the stateful phase).
read -r passed failed < <("$VENV/bin/python" - "$REPORT/junit.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print(0, 1)
    sys.exit()
p = f = 0
for tc in root.iter("testcase"):
    if tc.find("failure") is not None or tc.find("error") is not None:
        f += 1
    elif tc.find("skipped") is None:
        p += 1
print(p, f)
EOF
)
if [ "$st_rc" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi
echo "schemathesis: report in $REPORT (seed $SEED)"
echo "schemathesis: $passed passed, $failed failed"
exit "$st_rc"
