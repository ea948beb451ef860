#!/usr/bin/env bash
# Policy routing for `snatgw run` (docs/RUNNING.md, "Deploying `snatgw run`").
#
#   gateway-routing.sh up|down --private-if P --public-if U --tun-private T1 --tun-public T2
#                      --vnet PREFIX[,PREFIX...] [--netns NS] [--table-private 100]
#                      [--table-public 101] [--wait SECS] [--tun-mtu N]
#                      [--public-ip ADDR[,ADDR...]] [--keep-forwarding]
#
# `up` installs, in network namespace NS (or in the current one without --netns):
#   - tables T_PRIV and T_PUB: `blackhole default metric 4294967295` (fallback: with the TUNs
#     gone, traffic from P and U is dropped, never forwarded untranslated)
#   - rules: pref 1000 `iif P to PREFIX lookup main` (one per VNet prefix, R1.7),
#            pref 1001 `iif P lookup T_PRIV`, pref 1002 `iif U lookup T_PUB`
#   - net.ipv4.conf.all.rp_filter=0, then net.ipv4.ip_forward=1
#   - waits (at most --wait seconds, default 10) for the TUNs T1 and T2, then: link up,
#     net.ipv4.conf.<tun>.rp_filter=0, with --tun-mtu N the TUNs' MTU, `default dev T1 table
#     T_PRIV`, `default dev T2 table T_PUB`
# in that order, so forwarding is never on without the rules and the fallback in place. It
# warns when a TUN's MTU is larger than P's or U's (path MTU discovery would then fail for
# the sizes in between: see docs/RUNNING.md).
# Running it again changes nothing (no duplicate rules). Rerun it after every start of the
# gateway: its TUNs, and the routes through them, disappear when it exits.
#
# `down` removes exactly that (same arguments): net.ipv4.ip_forward=0 first (unless
# --keep-forwarding), then the TUN routes, the rules and the blackhole fallbacks. rp_filter
# values are left as they are.
#
# Every command that changes something is printed (`+ ...`) before it runs. With --netns,
# every command is `ip -n NS ...` or `ip netns exec NS ...`: nothing outside NS is touched.
# Exit status: 0 done, 1 failed (missing interface, TUN not there in time, ...), 2 usage.
set -euo pipefail

prog=${0##*/}

usage() {
    cat <<EOF
usage: $prog up|down --private-if P --public-if U --tun-private T1 --tun-public T2
                     --vnet PREFIX[,PREFIX...] [--netns NS] [--table-private 100]
                     [--table-public 101] [--wait SECS] [--tun-mtu N]
                     [--public-ip ADDR[,ADDR...]] [--keep-forwarding]

  up      install the routing for snatgw run (waits for the TUNs T1 and T2 to exist)
  down    remove it again (same arguments)

  --private-if P       interface facing the instances (VNet side)
  --public-if U        interface facing the upstream router (internet side)
  --tun-private T1     snatgw run --tun-private (packets from P not for the VNet go there)
  --tun-public T2      snatgw run --tun-public (packets from U go there)
  --vnet PREFIXES      VNet prefixes, comma separated (e.g. 10.0.0.0/16): not translated (R1.7)
  --netns NS           act inside network namespace NS (default: the current namespace)
  --table-private N    routing table for traffic from P (default 100)
  --table-public N     routing table for traffic from U (default 101)
  --wait SECS          up: how long to wait for the TUNs (default 10)
  --tun-mtu N          up: set both TUNs' MTU to N (68-1500; at most the MTU of P and of U)
  --public-ip ADDRS    up: fail if one of these gateway public IPs is assigned to an interface
  --keep-forwarding    down: leave net.ipv4.ip_forward on (traffic from P is then routed
                       by the main table, untranslated)
EOF
}

die_usage() {
    echo "$prog: $*" >&2
    echo >&2
    usage >&2
    exit 2
}

die() {
    echo "$prog: error: $*" >&2
    exit 1
}

action=""
netns=""
priv_if=""
pub_if=""
tun_priv=""
tun_pub=""
vnet_arg=""
table_priv=100
table_pub=101
wait_secs=10
tun_mtu=""
public_ip_arg=""
keep_forwarding=0

while (($# > 0)); do
    case "$1" in
        up | down)
            [[ -z "$action" ]] || die_usage "more than one action ($action, $1)"
            action=$1
            shift
            ;;
        --netns | --private-if | --public-if | --tun-private | --tun-public | --vnet | \
            --table-private | --table-public | --wait | --tun-mtu | --public-ip)
            if (($# < 2)) || [[ -z "$2" || "$2" == --* ]]; then
                die_usage "$1 needs a value"
            fi
            case "$1" in
                --netns) netns=$2 ;;
                --private-if) priv_if=$2 ;;
                --public-if) pub_if=$2 ;;
                --tun-private) tun_priv=$2 ;;
                --tun-public) tun_pub=$2 ;;
                --vnet) vnet_arg=$2 ;;
                --table-private) table_priv=$2 ;;
                --table-public) table_pub=$2 ;;
                --wait) wait_secs=$2 ;;
                --tun-mtu) tun_mtu=$2 ;;
                --public-ip) public_ip_arg=$2 ;;
            esac
            shift 2
            ;;
        --keep-forwarding)
            keep_forwarding=1
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die_usage "unknown argument: $1" ;;
    esac
done

# ---- arguments ---------------------------------------------------------------------------

[[ -n "$action" ]] || die_usage "missing action: up or down"
missing=()
[[ -n "$priv_if" ]] || missing+=(--private-if)
[[ -n "$pub_if" ]] || missing+=(--public-if)
[[ -n "$tun_priv" ]] || missing+=(--tun-private)
[[ -n "$tun_pub" ]] || missing+=(--tun-public)
[[ -n "$vnet_arg" ]] || missing+=(--vnet)
((${#missing[@]} == 0)) || die_usage "missing argument(s): ${missing[*]}"

for name in "$priv_if" "$pub_if" "$tun_priv" "$tun_pub"; do
    [[ "$name" =~ ^[A-Za-z0-9_.-]{1,15}$ ]] ||
        die_usage "bad interface name '$name' (1 to 15 of A-Z a-z 0-9 _ . -)"
done
declare -A seen_if=()
for name in "$priv_if" "$pub_if" "$tun_priv" "$tun_pub"; do
    [[ -z "${seen_if[$name]:-}" ]] ||
        die_usage "interface '$name' is named twice: P, U, T1 and T2 must be four different interfaces"
    seen_if[$name]=1
done

if [[ -n "$netns" && ! "$netns" =~ ^[A-Za-z0-9_.-]+$ ]]; then
    die_usage "bad namespace name '$netns'"
fi

is_uint() { [[ "$1" =~ ^[0-9]+$ ]] && ((${#1} <= 10)); }

for t in "$table_priv" "$table_pub"; do
    if ! is_uint "$t" || ((t < 1 || t > 4294967295)); then
        die_usage "bad table '$t' (a number from 1 to 4294967295)"
    fi
    ((t < 253 || t > 255)) || die_usage "table $t is reserved (253 default, 254 main, 255 local)"
done
((table_priv != table_pub)) || die_usage "--table-private and --table-public must differ"
is_uint "$wait_secs" || die_usage "bad --wait '$wait_secs' (whole seconds)"
if [[ -n "$tun_mtu" ]] && { ! is_uint "$tun_mtu" || ((tun_mtu < 68 || tun_mtu > 1500)); }; then
    die_usage "bad --tun-mtu '$tun_mtu' (68 to 1500: snatgw run creates its TUNs with MTU 1500)"
fi

# ADDR -> 32-bit number on stdout; fails on anything but a dotted quad.
ip_to_int() {
    local a b c d
    [[ "$1" =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || return 1
    a=${BASH_REMATCH[1]} b=${BASH_REMATCH[2]} c=${BASH_REMATCH[3]} d=${BASH_REMATCH[4]}
    ((10#$a <= 255 && 10#$b <= 255 && 10#$c <= 255 && 10#$d <= 255)) || return 1
    echo $(((10#$a << 24) | (10#$b << 16) | (10#$c << 8) | 10#$d))
}

int_to_ip() { echo "$((($1 >> 24) & 255)).$((($1 >> 16) & 255)).$((($1 >> 8) & 255)).$(($1 & 255))"; }

vnets=()
IFS=',' read -r -a vnet_list <<<"$vnet_arg"
for p in "${vnet_list[@]}"; do
    [[ "$p" =~ ^([0-9.]+)/([0-9]{1,2})$ ]] || die_usage "bad --vnet prefix '$p' (like 10.0.0.0/16)"
    addr=${BASH_REMATCH[1]}
    len=$((10#${BASH_REMATCH[2]}))
    n=$(ip_to_int "$addr") || die_usage "bad --vnet prefix '$p' (like 10.0.0.0/16)"
    ((len <= 32)) || die_usage "bad --vnet prefix '$p': length over 32"
    mask=$(((0xffffffff << (32 - len)) & 0xffffffff))
    ((len > 0)) || mask=0
    if (((n & mask) != n)); then
        die_usage "--vnet $p has host bits set; did you mean $(int_to_ip $((n & mask)))/$len?"
    fi
    vnets+=("$p")
done
((${#vnets[@]} > 0)) || die_usage "--vnet needs at least one prefix"

public_ips=()
if [[ -n "$public_ip_arg" ]]; then
    IFS=',' read -r -a public_list <<<"$public_ip_arg"
    for a in "${public_list[@]}"; do
        ip_to_int "$a" >/dev/null || die_usage "bad --public-ip address '$a'"
        public_ips+=("$a")
    done
fi

# ---- where the commands run --------------------------------------------------------------

if [[ -n "$netns" ]]; then
    # (Captured, not piped into grep -q: with pipefail an early exit of grep could fail ip.)
    namespaces=$(ip netns list | awk '{print $1}')
    grep -Fxq -- "$netns" <<<"$namespaces" ||
        die "network namespace '$netns' not found (ip netns list)"
    IP=(ip -n "$netns")
    where="namespace $netns"
else
    IP=(ip)
    where="the current network namespace"
fi

# Runs "$@" inside the target namespace (for sysctl).
in_ns() {
    if [[ -n "$netns" ]]; then
        ip netns exec "$netns" "$@"
    else
        "$@"
    fi
}

# Prints a changing command, then runs it.
run() {
    echo "+ $*"
    "$@"
}

sysctl_set() {
    if [[ -n "$netns" ]]; then
        run ip netns exec "$netns" sysctl -q -w "$1"
    else
        run sysctl -q -w "$1"
    fi
}

mtu_of() {
    local out
    out=$("${IP[@]}" -o link show dev "$1")
    [[ "$out" =~ \ mtu\ ([0-9]+) ]] && echo "${BASH_REMATCH[1]}"
}

link_exists() { "${IP[@]}" link show dev "$1" >/dev/null 2>&1; }
is_tun() {
    local out
    out=$("${IP[@]}" -d -o link show dev "$1" 2>/dev/null) || return 1
    grep -q ' tun type tun ' <<<"$out"
}

# The routes of table $1 (nothing when the table does not exist yet).
table_routes() { "${IP[@]}" route show table "$1" 2>/dev/null || true; }

# rule_exists PREF SELECTOR...: whether a rule with exactly this selector exists.
rule_exists() {
    local pref=$1
    shift
    [[ -n "$("${IP[@]}" rule show pref "$pref" "$@")" ]]
}

rule_add() {
    local pref=$1
    shift
    if rule_exists "$pref" "$@"; then
        echo "  (rule $pref $* already present)"
    else
        run "${IP[@]}" rule add pref "$pref" "$@"
    fi
}

rule_del() {
    local pref=$1 n=0
    shift
    while rule_exists "$pref" "$@"; do
        run "${IP[@]}" rule del pref "$pref" "$@"
        n=$((n + 1))
        ((n < 100)) || die "rule $pref $* keeps coming back"
    done
}

has_blackhole() {
    local routes
    routes=$(table_routes "$1")
    grep -q '^blackhole default metric 4294967295' <<<"$routes"
}

# Rules at PREF other than the COUNT this script manages there: warn.
check_pref() {
    local pref=$1 expect=$2 lines
    lines=$("${IP[@]}" rule show pref "$pref")
    if (($(grep -c . <<<"$lines") > expect)); then
        echo "$prog: warning: other rules at pref $pref in $where (not installed by this call):" >&2
        echo "$lines" >&2
    fi
}

show_state() {
    echo "--- ip rule (prefs 1000-1002)"
    for pref in 1000 1001 1002; do "${IP[@]}" rule show pref "$pref"; done
    local t
    for t in "$table_priv" "$table_pub"; do
        echo "--- ip route show table $t"
        table_routes "$t"
    done
    echo "--- net.ipv4.ip_forward = $(in_ns sysctl -n net.ipv4.ip_forward)"
}

# ---- up ----------------------------------------------------------------------------------

do_up() {
    echo "$prog: up in $where: private side $priv_if -> $tun_priv (table $table_priv)," \
        "public side $pub_if -> $tun_pub (table $table_pub), VNet ${vnets[*]}"
    local i
    for i in "$priv_if" "$pub_if"; do
        link_exists "$i" || die "interface '$i' not found in $where"
    done
    for i in "$tun_priv" "$tun_pub"; do
        if link_exists "$i" && ! is_tun "$i"; then
            die "'$i' exists in $where but is not a TUN device"
        fi
    done
    local a local_routes
    for a in "${public_ips[@]}"; do
        # An address on any interface (or a `local` route covering it) puts it in the local
        # table, which rule 0 consults before every rule here.
        local_routes=$("${IP[@]}" route show table local match "$a" 2>/dev/null | grep '^local ' || true)
        [[ -z "$local_routes" ]] ||
            die "public IP $a is local in $where ($(head -n1 <<<"$local_routes" | sed 's/ *$//')): the local table would deliver it to this host's own stack; remove the address (the upstream network routes it to the gateway's address on $pub_if)"
    done

    # 1. Fallback first: once the rules point at the tables, they are never empty.
    local t
    for t in "$table_priv" "$table_pub"; do
        if has_blackhole "$t"; then
            echo "  (blackhole fallback in table $t already present)"
        else
            run "${IP[@]}" route replace blackhole default table "$t" metric 4294967295
        fi
    done
    # 2. Rules: VNet traffic stays in the main table, the rest of P goes to T1, all of U to T2.
    local p
    for p in "${vnets[@]}"; do
        rule_add 1000 iif "$priv_if" to "$p" lookup main
    done
    rule_add 1001 iif "$priv_if" lookup "$table_priv"
    rule_add 1002 iif "$pub_if" lookup "$table_pub"
    check_pref 1000 "${#vnets[@]}"
    check_pref 1001 1
    check_pref 1002 1
    # 3. rp_filter: the effective value is max(all, interface); 0 on `all` leaves P and U to
    #    their own setting. Then forwarding, now that nothing can leave untranslated.
    sysctl_set net.ipv4.conf.all.rp_filter=0
    sysctl_set net.ipv4.ip_forward=1

    # 4. The TUNs (created by snatgw run).
    local tries=$((wait_secs * 5)) announced=0
    while ! link_exists "$tun_priv" || ! link_exists "$tun_pub"; do
        if ((tries-- <= 0)); then
            local absent=()
            link_exists "$tun_priv" || absent+=("$tun_priv")
            link_exists "$tun_pub" || absent+=("$tun_pub")
            die "TUN device(s) ${absent[*]} not found in $where after ${wait_secs} s (is snatgw run --tun-private $tun_priv --tun-public $tun_pub running there?); rules and blackhole fallbacks are in place, so traffic from $priv_if and $pub_if is dropped until this script runs again"
        fi
        if ((announced == 0)); then
            echo "  waiting up to ${wait_secs} s for $tun_priv and $tun_pub ..."
            announced=1
        fi
        sleep 0.2
    done
    for i in "$tun_priv" "$tun_pub"; do
        is_tun "$i" || die "'$i' exists in $where but is not a TUN device"
        run "${IP[@]}" link set dev "$i" up
        sysctl_set "net.ipv4.conf.$i.rp_filter=0"
        [[ -z "$tun_mtu" ]] || run "${IP[@]}" link set dev "$i" mtu "$tun_mtu"
    done
    # The gateway's kernel forwards every packet twice (P or U into a TUN, then the TUN's
    # output out of the other side). A packet too big only for the second hop gets a
    # "fragmentation needed" about the translated packet, which never reaches the sender.
    local side_mtu m
    side_mtu=$(mtu_of "$priv_if")
    m=$(mtu_of "$pub_if")
    ((m >= side_mtu)) || side_mtu=$m
    for i in "$tun_priv" "$tun_pub"; do
        m=$(mtu_of "$i")
        if ((m > side_mtu)); then
            echo "$prog: warning: $i has MTU $m, more than the smaller MTU of $priv_if and $pub_if ($side_mtu): path MTU discovery through the gateway fails for packets of $((side_mtu + 1))-$m bytes; pass --tun-mtu $side_mtu" >&2
        fi
    done
    run "${IP[@]}" route replace default dev "$tun_priv" table "$table_priv"
    run "${IP[@]}" route replace default dev "$tun_pub" table "$table_pub"
    show_state
    echo "$prog: up done"
}

# ---- down --------------------------------------------------------------------------------

do_down() {
    echo "$prog: down in $where"
    if ((keep_forwarding)); then
        echo "$prog: warning: --keep-forwarding: with the rules gone, traffic from $priv_if is routed by the main table, untranslated" >&2
    else
        sysctl_set net.ipv4.ip_forward=0
    fi
    local pair tun t
    for pair in "$tun_priv:$table_priv" "$tun_pub:$table_pub"; do
        tun=${pair%%:*}
        t=${pair##*:}
        if link_exists "$tun" &&
            [[ -n "$("${IP[@]}" route show table "$t" default dev "$tun" 2>/dev/null)" ]]; then
            run "${IP[@]}" route del default dev "$tun" table "$t"
        fi
    done
    rule_del 1002 iif "$pub_if" lookup "$table_pub"
    rule_del 1001 iif "$priv_if" lookup "$table_priv"
    local p
    for p in "${vnets[@]}"; do
        rule_del 1000 iif "$priv_if" to "$p" lookup main
    done
    for t in "$table_priv" "$table_pub"; do
        while has_blackhole "$t"; do
            run "${IP[@]}" route del blackhole default table "$t" metric 4294967295
        done
        if [[ -n "$(table_routes "$t")" ]]; then
            echo "$prog: warning: table $t still has routes this script did not install:" >&2
            table_routes "$t" >&2
        fi
    done
    echo "  (rp_filter values left as they are)"
    show_state
    echo "$prog: down done"
}

case "$action" in
    up) do_up ;;
    down) do_down ;;
esac
