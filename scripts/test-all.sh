#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine of this kind (run as root for the lab tests).
# Installs what it needs, then runs every test of the workspace. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg_cmd in iproute2:ip nftables:nft ethtool:ethtool procps:sysctl hping3:hping3 clang:clang nmap:nmap stun-client:stun stun-server:stund coturn:turnserver python3:python3; do
  command -v "${pkg_cmd#*:}" >/dev/null 2>&1 || need+=("${pkg_cmd%%:*}")
done
# The fast path's eBPF program is compiled by snatgw-io's build script: clang -target bpf and
# libbpf's headers (issue #9).
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
command -v protoc >/dev/null && [ -d /usr/include/google/protobuf ] && command -v etcd >/dev/null || need+=(protobuf-compiler libprotobuf-dev etcd-server)  # issue #19: etcd-client builds with protoc; fleet tests run a real etcd
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "note: not root; lab tests will be skipped and ${need[*]} not installed"
  fi
fi

export CARGO_TERM_COLOR=never
# Compile every target once, in the test profile (benches and examples too, so they cannot rot),
# then run the tests. Lab tests use per-test namespace prefixes and clean up after themselves.
# This also builds the lab tool, target/debug/snatgw-lab (crate snatgw-lab, a package with
# integration tests, so cargo builds its binaries for them); the lab tests of crates/snatgw run
# the lab's servers and clients with it, found beside target/debug/snatgw (issue #16).
cargo test --workspace --all-targets --locked --no-run
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"

# The network-lab tests once more with the kernel fast path on (issue #9: every lab rule test
# with the fast path on and off). lab_fastpath forces it on anyway and already ran.
if [ "$(id -u)" = 0 ]; then
  lab_tests=()
  for t in crates/snatgw/tests/lab_*.rs; do
    name=$(basename "$t" .rs)
    [ "$name" = lab_fastpath ] || lab_tests+=(--test "$name")
  done
  echo "lab tests again with SNATGW_FAST_PATH=tc: ${lab_tests[*]}"
  # --workspace (not -p snatgw): the same feature set as the first run, so nothing is rebuilt.
  SNATGW_FAST_PATH=tc cargo test --workspace --locked "${lab_tests[@]}" -- --test-threads="${TEST_THREADS:-2}"
fi

./scripts/check-ops.sh  # alert rules, their promtool tests, the Grafana dashboard (issue #21)
# Schemathesis against a live `snatgw run` (issue #20): every operation, check and phase, with the
# binary built above. Root only (a network namespace of its own): not root, it says it skipped,
# and fails instead when SNATGW_REQUIRE_ROOT=1.
SNATGW_BIN="${CARGO_TARGET_DIR:-target}/debug/snatgw" ./scripts/schemathesis.sh
