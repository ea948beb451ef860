#!/usr/bin/env bash
# Profile of the kernel fast path (docs/PERFORMANCE.md): 64-byte UDP from vm-as1 of the
# reference lab through `snatgw run --fast-path tc` into a discard sink, with `perf record -g`
# on the sender (trafgen), in whose context the whole path runs on veth. Needs root, perf
# (linux-perf), trafgen (netsniff-ng); builds nothing (run scripts/main.sh or
# `cargo build --release -p snatgw` first). Removes its lab (prefix sgp-) at the end.
set -euo pipefail
P=sgp-
SNATGW_FAST_PATH=tc ./target/release/snatgw lab up --prefix $P > /tmp/labup.txt 2>&1 &
sleep 8
NS=${P}i-vm-as1
SRC=$(ip netns exec $NS cat /sys/class/net/eth0/address)
DST=$(ip netns exec ${P}gw cat /sys/class/net/br-priv/address)
mb() { echo "$1" | sed 's/^/0x/; s/:/, 0x/g'; }
cat > /tmp/tg.cfg <<CFG
{
  $(mb $DST),
  $(mb $SRC),
  0x08, 0x00,
  0x45, 0x00, const16(46), 0x00, 0x00, 0x40, 0x00, 64, 17, csumip(14, 33),
  10, 0, 3, 10, 203, 0, 113, 100,
  const16(4000), const16(9), const16(26), csumudp(14, 34),
  fill(0x00, 18),
}
CFG
# A discard sink on 203.0.113.100:9 that never reads (as in `snatgw race`).
ip netns exec ${P}inet python3 -c 'import socket,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.setsockopt(socket.SOL_SOCKET,socket.SO_RCVBUF,4096); s.bind(("203.0.113.100",9)); time.sleep(12)' &
sleep 0.5
ip netns exec $NS trafgen -o eth0 -i /tmp/tg.cfg -n 10 -q --no-sock-mem >/dev/null
sleep 0.5
ip netns exec $NS timeout -s INT 6 trafgen -o eth0 -i /tmp/tg.cfg -q -P 1 --no-sock-mem >/dev/null 2>&1 &
sleep 1
perf record -g -p "$(pgrep -n trafgen)" -o /tmp/perf.data -- sleep 3 2>/dev/null >/dev/null
sleep 3
./target/release/snatgw lab down --prefix $P >/dev/null 2>&1 || true
kill %1 2>/dev/null || true
perf report -i /tmp/perf.data --no-children --sort symbol --stdio -g none 2>/dev/null | grep -E "^ +[0-9]" | cut -c1-110 | head -40
