#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine of this kind (run as root for the lab tests).
# Installs what it needs, then runs every test of the workspace. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg_cmd in iproute2:ip nftables:nft ethtool:ethtool procps:sysctl hping3:hping3 clang:clang nmap:nmap; do
  command -v "${pkg_cmd#*:}" >/dev/null 2>&1 || need+=("${pkg_cmd%%:*}")
done
# The fast path's eBPF program is compiled by snatgw-io's build script: clang -target bpf and
# libbpf's headers (issue #9).
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
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
