#!/usr/bin/env bash
# A subnet of N hosts in network namespaces on one bridge, for real
# multicast with a per-host link rate (tc tbf) and receive loss (nft
# numgen). Needs root. Touches nothing outside the namespaces it makes.
#
#   scripts/lab.sh up N [--rate 200mbit] [--loss 0.05]   build sc-h0 .. sc-h(N-1)
#   scripts/lab.sh exec I CMD...                          run CMD on host I
#   scripts/lab.sh down                                   remove everything
#
# Host I has address 10.77.0.(I+1)/24 on eth0. The bridge lives in a
# namespace of its own (sc-sw), with IGMP snooping off so that it floods
# multicast as a plain switch without a querier would. Loss is applied to
# UDP arriving at hosts 1..N-1 (the receivers); host 0 is the sender.
#
# Sourced (`. scripts/lab.sh`), it defines lab_up, lab_exec and lab_down.

LAB_PREFIX=${LAB_PREFIX:-sc}
LAB_NET=${LAB_NET:-10.77.0}

lab_need() {
    local missing=()
    command -v ip >/dev/null || missing+=(iproute2)
    command -v nft >/dev/null || missing+=(nftables)
    command -v tc >/dev/null || missing+=(iproute2)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "lab: installing ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
            { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
    fi
}

# lab_install CMD:PACKAGE...: installs each Debian PACKAGE whose CMD is
# missing.
lab_install() {
    local need=() cp
    for cp in "$@"; do command -v "${cp%%:*}" >/dev/null || need+=("${cp##*:}"); done
    [ ${#need[@]} -eq 0 ] && return 0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
        { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
}

lab_exec() {
    local i=$1
    shift
    ip netns exec "${LAB_PREFIX}-h${i}" "$@"
}

lab_hosts() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -c "^${LAB_PREFIX}-h[0-9]*$" || true
}

lab_down() {
    lab_down_matching "^${LAB_PREFIX}-\(h[0-9]*\|sw\)$"
}

# lab_down_matching REGEX: kills what runs in, and removes, every namespace
# whose name matches REGEX (grep basic syntax).
lab_down_matching() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "$1"); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
}

# lab_session TAG: builds somcast, sets BIN, WORK (removed on exit unless
# KEEP is set, with the
# lab), TOKEN, and a publisher key pair KEY / PUB (agents get --trust "$PUB",
# the console --sign "$KEY"), and installs curl for talking to agents' APIs.
lab_session() {
    cargo build --release -q
    BIN=$PWD/target/release/somcast
    WORK=$(mktemp -d)
    # KEEP=1 keeps the work directory (logs, summaries) for a look after.
    trap 'lab_down; if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi' EXIT
    TOKEN=$1-token-$$
    "$BIN" key generate "$WORK/publisher" 2>/dev/null
    KEY=$WORK/publisher.key PUB=$WORK/publisher.pub
    command -v curl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
}

# lab_loss_on I LOSS [DADDR]: host I drops that share of the UDP it
# receives (only of that sent to DADDR, if given).
lab_loss_on() {
    lab_loss_off "$1"
    lab_ns_loss "${LAB_PREFIX}-h$1" "$2" "${3:-}"
}

# lab_ns_loss NS LOSS [DADDR]: namespace NS drops that share of the UDP it
# receives (only of that sent to DADDR, if given).
lab_ns_loss() {
    local ns=$1 loss=$2 to=${3:+ip daddr $3} per10k
    [ "$loss" = "0" ] && return 0
    per10k=$(awk -v l="$loss" 'BEGIN { printf "%d", l * 10000 + 0.5 }')
    ip netns exec "$ns" nft -f - <<NFT
table inet lab {
    chain input {
        type filter hook input priority 0; policy accept;
        $to meta l4proto udp numgen random mod 10000 < $per10k drop
    }
}
NFT
}

lab_loss_off() {
    ip netns exec "${LAB_PREFIX}-h$1" nft delete table inet lab 2>/dev/null || true
}

# lab_origin_link RATE: host 0 (the origin) behind RATE both ways.
lab_origin_link() {
    ip netns exec "${LAB_PREFIX}-h0" tc qdisc replace dev eth0 root tbf rate "$1" burst 64kb latency 50ms
    ip netns exec "${LAB_PREFIX}-sw" tc qdisc replace dev "${LAB_PREFIX}p0" root tbf rate "$1" burst 64kb latency 50ms
}

# lab_up N RATE LOSS
lab_up() {
    local n=$1 rate=${2:-200mbit} loss=${3:-0}
    lab_need
    lab_down
    local sw="${LAB_PREFIX}-sw"
    ip netns add "$sw"
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 type bridge mcast_snooping 0
    ip -n "$sw" link set br0 up
    ip -n "$sw" link set lo up
    local i ns
    for ((i = 0; i < n; i++)); do
        ns="${LAB_PREFIX}-h${i}"
        ip netns add "$ns"
        ip link add "${LAB_PREFIX}v${i}" type veth peer name "${LAB_PREFIX}p${i}"
        ip link set "${LAB_PREFIX}v${i}" netns "$ns"
        ip link set "${LAB_PREFIX}p${i}" netns "$sw"
        ip -n "$ns" link set "${LAB_PREFIX}v${i}" name eth0
        ip -n "$ns" addr add "${LAB_NET}.$((i + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        # Multicast leaves by eth0 without an explicit interface too.
        ip -n "$ns" route add 224.0.0.0/4 dev eth0
        # Limited broadcast (udpcast finds its peers so) needs a route; the
        # switch namespace has no uplink, so nothing leaves the lab.
        ip -n "$ns" route add default dev eth0
        ip -n "$sw" link set "${LAB_PREFIX}p${i}" master br0
        ip -n "$sw" link set "${LAB_PREFIX}p${i}" up
        if [ "$rate" != "0" ] && [ -n "$rate" ]; then
            # The host's uplink and its downlink from the switch.
            ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst 64kb latency 50ms
            ip netns exec "$sw" tc qdisc add dev "${LAB_PREFIX}p${i}" root tbf rate "$rate" burst 64kb latency 50ms
        fi
        if [ "$i" -gt 0 ]; then
            lab_loss_on "$i" "$loss"
        fi
        # Bigger socket buffers, as a tuned lab host would have.
        ip netns exec "$ns" sysctl -qw net.core.rmem_max=8388608 net.core.wmem_max=8388608 2>/dev/null || true
    done
}

# lab_routed P NET WAN PER S...: several subnets behind a router, as a
# company's offices or floors: router P-rt; an origin host P-o at NET.9.10
# on a subnet of its own; for each S (the n-th one NET.n.0/24) a bridge
# P-swS and PER hosts P-S1.. at NET.n.11.., the router's leg into the subnet
# limited to WAN (tbf). Sets LAB_ROUTED to the hosts as "namespace:address".
lab_routed() {
    local p=$1 net=$2 wan=$3 per=$4 n=0 s i h
    shift 4
    ip netns add "$p-rt"
    ip netns exec "$p-rt" sysctl -qw net.ipv4.ip_forward=1
    ip -n "$p-rt" link set lo up
    ip netns add "$p-o"
    ip link add "$p-ro" type veth peer name "$p-or"
    ip link set "$p-ro" netns "$p-rt"; ip link set "$p-or" netns "$p-o"
    ip -n "$p-rt" link set "$p-ro" name eth-o; ip -n "$p-o" link set "$p-or" name eth0
    ip -n "$p-rt" addr add "$net.9.1/24" dev eth-o; ip -n "$p-o" addr add "$net.9.10/24" dev eth0
    ip -n "$p-rt" link set eth-o up; ip -n "$p-o" link set eth0 up; ip -n "$p-o" link set lo up
    ip -n "$p-o" route add default via "$net.9.1"
    LAB_ROUTED=()
    for s in "$@"; do
        n=$((n + 1))
        ip netns add "$p-sw$s"
        ip -n "$p-sw$s" link add br0 type bridge
        ip -n "$p-sw$s" link set br0 type bridge mcast_snooping 0
        ip -n "$p-sw$s" link set br0 up
        ip link add "$p-r$s" type veth peer name "$p-p$s"
        ip link set "$p-r$s" netns "$p-rt"; ip link set "$p-p$s" netns "$p-sw$s"
        ip -n "$p-rt" link set "$p-r$s" name "eth-$s"
        ip -n "$p-rt" addr add "$net.$n.1/24" dev "eth-$s"; ip -n "$p-rt" link set "eth-$s" up
        ip -n "$p-sw$s" link set "$p-p$s" master br0; ip -n "$p-sw$s" link set "$p-p$s" up
        ip netns exec "$p-rt" tc qdisc add dev "eth-$s" root tbf rate "$wan" burst 64kb latency 100ms
        for ((i = 1; i <= per; i++)); do
            h="$p-$s$i"
            ip netns add "$h"
            ip link add "$p-v$s$i" type veth peer name "$p-q$s$i"
            ip link set "$p-v$s$i" netns "$h"; ip link set "$p-q$s$i" netns "$p-sw$s"
            ip -n "$h" link set "$p-v$s$i" name eth0
            ip -n "$h" addr add "$net.$n.$((i + 10))/24" dev eth0
            ip -n "$h" link set eth0 up; ip -n "$h" link set lo up
            ip -n "$h" route add default via "$net.$n.1"
            ip -n "$p-sw$s" link set "$p-q$s$i" master br0; ip -n "$p-sw$s" link set "$p-q$s$i" up
            ip netns exec "$h" sysctl -qw net.core.rmem_max=8388608 2>/dev/null || true
            LAB_ROUTED+=("$h:$net.$n.$((i + 10))")
        done
    done
}

# lab_nginx_conf CONF DIR LISTEN ROOT: an nginx config in CONF that serves
# ROOT on LISTEN (static files, ETag), keeping its pid, logs and temporary
# files under DIR; access log DIR/access.log.
lab_nginx_conf() {
    local conf=$1 dir=$2 listen=$3 root=$4 user=
    [ "$(id -u)" = 0 ] && user="user root;"
    mkdir -p "$dir"
    cat >"$conf" <<EOF
daemon off;
$user
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log;
events { worker_connections 8192; }
http {
    access_log $dir/access.log;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    types { application/json json; }
    default_type application/octet-stream;
    server { listen $listen; root $root; }
}
EOF
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    cmd=${1:-}
    shift || true
    case "$cmd" in
    up)
        n=${1:?usage: lab.sh up N [--rate R] [--loss P]}
        shift
        rate=200mbit loss=0
        while [ $# -gt 0 ]; do
            case "$1" in
            --rate) rate=$2; shift 2 ;;
            --loss) loss=$2; shift 2 ;;
            *) echo "unknown option $1" >&2; exit 2 ;;
            esac
        done
        lab_up "$n" "$rate" "$loss"
        echo "lab: $n hosts ${LAB_NET}.1..${LAB_NET}.$n, rate $rate, receive loss $loss"
        ;;
    exec) lab_exec "$@" ;;
    down) lab_down ;;
    *) echo "usage: lab.sh up N [--rate R] [--loss P] | exec I CMD... | down" >&2; exit 2 ;;
    esac
fi
