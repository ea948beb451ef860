#!/usr/bin/env bash
# The main job: `snatgw lab demo`. It builds the reference lab in network namespaces (an ILPIP VM,
# VMs behind a load balancer with two frontends, an availability set on default SNAT, a Classic
# web/worker role, a gateway and an internet namespace), starts the gateway, drives real
# connections from every instance, prints what the internet saw, shows ports shared across
# destinations and an exhaustion happening and clearing, makes live changes through the API
# (an ILPIP; an inbound rule with an HTTP health probe spread over two members, then an NSG
# that blocks one member's probe so it goes down and gets no new flows), then removes everything.
# Needs root (network namespaces). Without root it prints `snatgw show` for the same config.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
  need=()
  for pkg_cmd in iproute2:ip nftables:nft ethtool:ethtool procps:sysctl clang:clang; do
    command -v "${pkg_cmd#*:}" >/dev/null 2>&1 || need+=("${pkg_cmd%%:*}")
  done
  # clang -target bpf and libbpf's headers build the kernel fast path (issue #9).
  [ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
if [ "$(id -u)" = 0 ]; then
  # Two binaries (issue #16): the gateway `snatgw`, and the lab tools `snatgw-lab`, which
  # `snatgw lab ...` execs from the same directory.
  cargo build --release --locked -p snatgw -p snatgw-lab
  exec ./target/release/snatgw lab demo "$@"
fi
cargo build --release --locked -p snatgw
echo "not root: network namespaces need root; showing the lab configuration instead" >&2
exec ./target/release/snatgw show --config examples/lab.toml
