#!/usr/bin/env bash
# Checks the operations files of issue #21: the Prometheus alerting rules
# (deploy/prometheus/snatgw-alerts.yml) with `promtool check rules`, their unit tests
# (deploy/prometheus/snatgw-alerts.test.yml) with `promtool test rules`, and the Grafana
# dashboard (deploy/grafana/snatgw-dashboard.json): valid JSON, a DS_PROMETHEUS input, every
# panel on that datasource with a query and a description, unique panel ids, an `instance`
# variable, and every query parsed by promtool. Called by scripts/test-all.sh (so by .ci/run).
#
# That every metric and label the rules and the dashboard use is really exported is checked
# by `cargo test -p snatgw-control --test ops_metrics` (it scrapes a live /metrics), which
# the workspace's tests run; not repeated here.
#
# promtool: used from PATH; when missing and root, Debian's `prometheus` package (which ships
# /usr/bin/promtool) is installed without recommends and without starting its daemon
# (policy-rc.d answering 101 during the install, RUNLEVEL=1; a daemon started anyway is stopped
# by its pid and disabled). Not root and no promtool: the promtool checks are skipped (exit 0),
# or fail when SNATGW_REQUIRE_ROOT=1 (as CI sets it).
#
# Environment: PROMTOOL (default `promtool`) the promtool to use; OPS_VERBOSE=1 prints every
# check's output; SNATGW_REQUIRE_ROOT=1 as above.
#
# Last line: `ops: N passed, M failed` (one per check).
set -euo pipefail
cd "$(dirname "$0")/.."

RULES=deploy/prometheus/snatgw-alerts.yml
TESTS=deploy/prometheus/snatgw-alerts.test.yml
DASH=deploy/grafana/snatgw-dashboard.json
PROMTOOL=${PROMTOOL:-promtool}
start=$(date +%s%N)
passed=0
failed=0

check() { # name, command...
  local name=$1
  shift
  local out
  if out=$("$@" 2>&1); then
    passed=$((passed + 1))
    echo "ops: ok   $name"
    [ -z "${OPS_VERBOSE:-}" ] || printf '%s\n' "$out"
  else
    failed=$((failed + 1))
    echo "ops: FAIL $name"
    printf '%s\n' "$out" | sed 's/^/    /'
  fi
}

prometheus_pids() { pgrep -x prometheus 2>/dev/null | sort || true; }

install_promtool() {
  apt-get -o DPkg::Lock::Timeout=600 update -qq || return 1
  local policy
  policy=$(apt-cache policy prometheus 2>/dev/null || true)
  case $policy in
    *"Candidate: (none)"* | "") echo "ops: no apt candidate for the Debian package prometheus" >&2; return 1 ;;
  esac
  local before guard=""
  before=$(prometheus_pids)
  # Keep the package's maintainer scripts from starting a daemon (invoke-rc.d and
  # deb-systemd-invoke both honour policy-rc.d); containers usually have one already.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    guard=/usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # even when interrupted
    printf '#!/bin/sh\nexit 101\n' >"$guard"
    chmod 755 "$guard"
  fi
  echo "ops: installing promtool (Debian package prometheus, no recommends, daemon not started)"
  local rc=0
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    prometheus >/dev/null || rc=$?
  if [ -n "$guard" ]; then
    rm -f "$guard"
    trap - EXIT
  fi
  # Should a daemon have started anyway, stop exactly the processes that were not there before.
  local pid
  for pid in $(comm -13 <(printf '%s\n' "$before") <(prometheus_pids)); do
    echo "ops: stopping the prometheus daemon the install started (pid $pid)"
    kill "$pid" 2>/dev/null || true
  done
  if [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  elif command -v update-rc.d >/dev/null 2>&1; then
    update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
  return $rc
}

dashboard_ok() {
  python3 -m json.tool "$DASH" >/dev/null || return 1
  python3 - "$DASH" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
errs = []
inputs = [i for i in d.get("__inputs", []) if i.get("name") == "DS_PROMETHEUS"]
if not inputs or inputs[0].get("pluginId") != "prometheus":
    errs.append("no __inputs entry DS_PROMETHEUS of plugin prometheus")
panels = []
def walk(ps):
    for p in ps:
        panels.append(p)
        walk(p.get("panels", []))
walk(d.get("panels", []))
ids = [p.get("id") for p in panels]
if len(ids) != len(set(ids)):
    errs.append(f"duplicate panel ids: {ids}")
for p in panels:
    if p.get("type") in ("row", "text"):
        continue
    t = p.get("title", "?")
    if (p.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
        errs.append(f"panel {t!r}: datasource is not ${{DS_PROMETHEUS}}")
    ts = p.get("targets") or []
    if not ts or not all(x.get("expr") for x in ts):
        errs.append(f"panel {t!r}: no query, or a target without expr")
    if not p.get("description"):
        errs.append(f"panel {t!r}: no description")
names = [v.get("name") for v in d.get("templating", {}).get("list", [])]
if "instance" not in names:
    errs.append(f"no templating variable instance (have {names})")
for e in errs:
    print(e)
print(f"{len(panels)} panels")
sys.exit(1 if errs else 0)
EOF
}

# The dashboard's PromQL, parsed by promtool: every query (Grafana variables replaced by
# values, label_values(X, l) by X) becomes a recording rule of a throwaway rules file.
dashboard_queries_parse() {
  local tmp rc=0
  tmp=$(mktemp -d)
  python3 - "$DASH" >"$tmp/dashboard-queries.yml" <<'EOF' || rc=$?
import json, re, sys
d = json.load(open(sys.argv[1]))
exprs = []
def walk(v):
    if isinstance(v, dict):
        for k, x in v.items():
            if k == "expr" and isinstance(x, str):
                exprs.append(x)
            else:
                walk(x)
    elif isinstance(v, list):
        for x in v:
            walk(x)
walk(d.get("panels", []))
for var in d.get("templating", {}).get("list", []):
    q = var.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", q or "")
    exprs.append(m.group(1) if m else q)
subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
         "$job": "snatgw", "$instance": ".*"}
print("groups:\n  - name: dashboard-queries\n    rules:")
for i, e in enumerate(exprs):
    for k, v in subst.items():
        e = e.replace(k, v)
    if "$" in e:
        sys.exit(f"unknown Grafana variable in {e!r}")
    print(f"      - record: dashboard_query_{i}\n        expr: {json.dumps(e)}")
EOF
  [ "$rc" != 0 ] || "$PROMTOOL" check rules "$tmp/dashboard-queries.yml" || rc=$?
  rm -rf "$tmp"
  return $rc
}

have_promtool=1
if ! command -v "$PROMTOOL" >/dev/null 2>&1; then
  have_promtool=0
  if [ "$(id -u)" = 0 ]; then
    if [ "$PROMTOOL" = promtool ]; then
      install_promtool || true
      ! command -v promtool >/dev/null 2>&1 || have_promtool=1
    fi
  elif [ "${SNATGW_REQUIRE_ROOT:-}" = 1 ]; then
    echo "ops: $PROMTOOL missing, not root (cannot install it) and SNATGW_REQUIRE_ROOT=1: failing" >&2
    exit 1
  fi
fi

check "dashboard $DASH (JSON, DS_PROMETHEUS, panels)" dashboard_ok
if [ "$have_promtool" = 1 ]; then
  echo "ops: $("$PROMTOOL" --version 2>&1 | head -n1)"
  check "promtool check rules $RULES" "$PROMTOOL" check rules "$RULES"
  check "promtool test rules $TESTS" "$PROMTOOL" test rules "$TESTS"
  check "dashboard queries parse (promtool check rules)" dashboard_queries_parse
elif [ "$(id -u)" = 0 ]; then
  echo "ops: FAIL $PROMTOOL not found and could not be installed"
  failed=$((failed + 1))
else
  echo "ops: promtool checks skipped ($PROMTOOL missing and not root: cannot install it)"
fi

ms=$((($(date +%s%N) - start) / 1000000))
echo "ops: took $((ms / 1000)).$(printf '%03d' $((ms % 1000))) s"
echo "ops: $passed passed, $failed failed"
[ "$failed" = 0 ]
