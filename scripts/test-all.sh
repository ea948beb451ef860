#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine of this kind (run as root for the lab tests).
# Installs what it needs, then runs every test of the workspace. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg_cmd in iproute2:ip nftables:nft ethtool:ethtool procps:sysctl hping3:hping3 nmap:nmap; do
  command -v "${pkg_cmd#*:}" >/dev/null 2>&1 || need+=("${pkg_cmd%%:*}")
done
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
