#!/usr/bin/env bash
# Sites in network namespaces: two offices behind a core router, each
# behind a WAN link of WAN (tbf, both ways) to the origin (nginx) at the
# core. Office A has three subnets: a1 and a2 (wired) and aw (Wi-Fi, a
# child site of A); office B one subnet, b1. PER agents on each. A signed
# topology (`somcast topology sign`, given with --topology) names the
# sites: A's rendezvous point is a1's first host (with --standby a2's
# first host follows it: it fetches from a1's and takes over if it dies);
# B's is b1's first host.
#
# 1. A task to every agent: all verify; the origin's payload into A and
#    into B (nginx's log, by client subnet) at most 1.05x the package; the
#    bytes on each WAN link printed; no multicast data on the Wi-Fi subnet
#    (a counter on its switch: UDP to any group but the control group).
# 2. Another package, A's (first) rendezvous killed mid-transfer: every
#    other agent of A completes, the payload into A at most 2x. The
#    subnets' representatives learned each other from it (JOIN): the
#    first to join fetches the rest for the office, the others from it.
#
#   scripts/ns-sites.sh [--per-subnet 3] [--size 48M] [--wan 100mbit]
#
# Needs root; installs nginx if missing; always cleans up. Namespaces:
# st-core, st-o, st-ra, st-rb, st-sw{a1,a2,aw,b1}, st-{a1,a2,aw,b1}{1..}.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh

per=3 size=48M wan=100mbit rvp_a=1
while [ $# -gt 0 ]; do
    case "$1" in
    --per-subnet) per=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --wan) wan=$2; shift 2 ;;
    # A second rendezvous point in A (a2's first host), after a1's.
    --standby) rvp_a=2; shift ;;
    *) echo "usage: $0 [--per-subnet N] [--size 48M] [--wan 100mbit] [--standby]" >&2; exit 2 ;;
    esac
done

lab_need
lab_install nginx:nginx-light curl:curl
cargo build --release -q
BIN=$PWD/target/release/somcast
WORK=$(mktemp -d)
chmod 0755 "$WORK"
trap 'disown -a 2>/dev/null; lab_down_matching "^st-"; if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi' EXIT
lab_down_matching "^st-"
"$BIN" key generate "$WORK/publisher" 2>/dev/null
KEY=$WORK/publisher.key PUB=$WORK/publisher.pub
TOKEN=ns-sites-$$
N=10.83
O=$N.9.10
CONTROL=239.192.0.2

# link NS1 IF1 ADDR1 NS2 IF2 ADDR2: a veth pair between two namespaces.
link() {
    ip link add "st-x$$" type veth peer name "st-y$$"
    ip link set "st-x$$" netns "$1"; ip link set "st-y$$" netns "$4"
    ip -n "$1" link set "st-x$$" name "$2"; ip -n "$4" link set "st-y$$" name "$5"
    ip -n "$1" addr add "$3" dev "$2"; ip -n "$4" addr add "$6" dev "$5"
    ip -n "$1" link set "$2" up; ip -n "$4" link set "$5" up
}
router() { # NS
    ip netns add "$1"
    ip -n "$1" link set lo up
    ip netns exec "$1" sysctl -qw net.ipv4.ip_forward=1
}
router st-core
ip netns add st-o
ip -n st-o link set lo up
link st-core eth-o $N.9.1/24 st-o eth0 $O/24
ip -n st-o route add default via $N.9.1
# The offices' WAN links: limited both ways.
for office in a b; do
    n=$([ $office = a ] && echo 100 || echo 101)
    router "st-r$office"
    link st-core "eth-$office" "$N.$n.1/30" "st-r$office" wan "$N.$n.2/30"
    ip netns exec st-core tc qdisc add dev "eth-$office" root tbf rate "$wan" burst 64kb latency 100ms
    ip netns exec "st-r$office" tc qdisc add dev wan root tbf rate "$wan" burst 64kb latency 100ms
    ip -n "st-r$office" route add default via "$N.$n.1"
done
hosts=()
subnet() { # OFFICE NAME THIRD-OCTET
    local office=$1 s=$2 net=$N.$3 i h
    ip netns add "st-sw$s"
    ip -n "st-sw$s" link set lo up
    ip -n "st-sw$s" link add br0 type bridge
    ip -n "st-sw$s" link set br0 type bridge mcast_snooping 0
    ip -n "st-sw$s" link set br0 up
    link "st-r$office" "eth-$s" "$net.1/24" "st-sw$s" up0 0.0.0.0/32
    ip -n "st-sw$s" addr flush dev up0
    ip -n "st-sw$s" link set up0 master br0
    ip -n st-core route add "$net.0/24" via "$N.$([ "$office" = a ] && echo 100 || echo 101).2"
    for ((i = 1; i <= per; i++)); do
        h=st-$s$i
        ip netns add "$h"
        ip -n "$h" link set lo up
        link "$h" eth0 "$net.$((10 + i))/24" "st-sw$s" "p$i" 0.0.0.0/32
        ip -n "st-sw$s" addr flush dev "p$i"
        ip -n "st-sw$s" link set "p$i" master br0
        ip -n "$h" route add default via "$net.1"
        ip netns exec "$h" sysctl -qw net.core.rmem_max=8388608 net.core.wmem_max=8388608 2>/dev/null || true
        hosts+=("$h:$net.$((10 + i))")
    done
}
subnet a a1 1
subnet a a2 2
subnet a aw 3
subnet b b1 11

# Multicast data on the Wi-Fi subnet's switch: UDP to any group but the
# control group.
ip netns exec st-swaw nft -f - <<NFT
table bridge sites {
    chain forward {
        type filter hook forward priority 0; policy accept;
        ip daddr 224.0.0.0/4 ip daddr != $CONTROL ip protocol udp counter
    }
}
NFT
wifi_multicast() {
    ip netns exec st-swaw nft list table bridge sites | sed -n 's/.*counter packets \([0-9]*\).*/\1/p'
}

rvp_list="[\"$N.1.11\", \"$N.2.11\"]"
[ "$rvp_a" = 1 ] && rvp_list="[\"$N.1.11\"]"
cat >"$WORK/sites.json" <<EOF
{"sites": [
  {"name": "office-a", "subnets": ["$N.1.0/24", "$N.2.0/24"], "rendezvous": $rvp_list},
  {"name": "office-a-wifi", "subnets": ["$N.3.0/24"], "parent": "office-a", "type": "wifi"},
  {"name": "office-b", "subnets": ["$N.11.0/24"], "rendezvous": ["$N.11.11"]}
]}
EOF
"$BIN" topology sign "$WORK/sites.json" --sign "$KEY" -o "$WORK/topology.json" 2>/dev/null
"$BIN" topology show "$WORK/topology.json" --trust "$PUB" --addr $N.3.12 | sed 's/^/   /'

www=$WORK/www
mkdir -p "$www"
lab_nginx_conf "$WORK/nginx.conf" "$WORK/nginx" "$O:8080" "$www"
ip netns exec st-o nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" &

start_agent() { # HOST ADDR
    ip netns exec "$1" "$BIN" agent --iface eth0 --api "$2:7480" --token "$TOKEN" --trust "$PUB" \
        --topology "$WORK/topology.json" --cache "$WORK/cache-$1" --presence-interval 1s >>"$WORK/agent-$1.log" 2>&1 &
}
for hv in "${hosts[@]}"; do start_agent "${hv%%:*}" "${hv##*:}"; done
sleep 3

package() { # NAME: www/NAME.bin of SIZE and its signed manifest WORK/NAME.json
    head -c "$(numfmt --from=iec "$size")" /dev/urandom >"$www/$1.bin"
    "$BIN" manifest create "$www/$1.bin" --url "http://$O:8080/$1.bin" -o "$WORK/$1.json" --sign "$KEY" 2>/dev/null
}
content() { python3 -c 'import json,sys; print(json.loads(json.load(open(sys.argv[1]))["document"])["content_id"])' "$WORK/$1.json"; }
# Payload nginx sent for FILE to clients whose address starts with each
# of the given prefixes.
payload() { # FILE PREFIX...
    python3 - "$WORK/nginx/access.log" "$@" <<'PY'
import sys
log, file, prefixes = sys.argv[1], sys.argv[2], sys.argv[3:]
total = 0
for line in open(log):
    f = line.split()
    if len(f) > 9 and f[6] == "/" + file and any(f[0].startswith(p) for p in prefixes):
        total += int(f[9]) if f[9].isdigit() else 0
print(total)
PY
}
wan_tx() { ip netns exec st-core cat "/sys/class/net/eth-$1/statistics/tx_bytes"; }
api() { ip netns exec "$1" curl -s -m 5 -H "Authorization: Bearer $TOKEN" "http://$2:7480$3"; }
agents_of() { # PATTERN: the agent URLs of hosts matching it
    for hv in "${hosts[@]}"; do [[ ${hv%%:*} =~ $1 ]] && printf -- '--agent http://%s:7480 ' "${hv##*:}"; done
}
bytes=$(numfmt --from=iec "$size")
ratio() { python3 -c "print(f'{$1 / $2:.3f}')"; }
# 1. One task to every agent.
package pkg
declare -A tx0
for o in a b; do tx0[$o]=$(wan_tx $o); done
mc0=$(wifi_multicast)
t0=$(date +%s.%N)
# shellcheck disable=SC2046
if ! ip netns exec st-o "$BIN" task start $(agents_of .) --token "$TOKEN" --manifest "$WORK/pkg.json" --sign "$KEY" \
    --delay 3s --wait --timeout 300s >"$WORK/task1.out" 2>"$WORK/task1.err"; then
    echo "FAIL: the task did not complete on every agent"; cat "$WORK/task1.out" "$WORK/task1.err"; exit 1
fi
secs=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
sed 's/^/   /' "$WORK/task1.out" | tail -n 6
for hv in "${hosts[@]}"; do
    h=${hv%%:*}
    cmp -s "$www/pkg.bin" "$WORK/cache-$h/objects/$(content pkg)" || { echo "FAIL: $h does not hold the verified package"; exit 1; }
done
into_a=$(payload pkg.bin $N.1. $N.2. $N.3.)
into_b=$(payload pkg.bin $N.11.)
wire_a=$(($(wan_tx a) - ${tx0[a]})) wire_b=$(($(wan_tx b) - ${tx0[b]}))
mc=$(($(wifi_multicast) - mc0))
echo "ok: ${#hosts[@]} agents in 4 subnets, 2 offices, verified in ${secs}s"
echo "    office A: origin payload $(ratio "$into_a" "$bytes")x the package, WAN link $(ratio "$wire_a" "$bytes")x with headers"
echo "    office B: origin payload $(ratio "$into_b" "$bytes")x the package, WAN link $(ratio "$wire_b" "$bytes")x with headers"
echo "    Wi-Fi subnet: $mc multicast data datagrams"
python3 -c "import sys; sys.exit(not ($into_a <= 1.05 * $bytes))" || { echo "FAIL: office A took $(ratio "$into_a" "$bytes")x the package from the origin"; exit 1; }
python3 -c "import sys; sys.exit(not ($into_b <= 1.05 * $bytes))" || { echo "FAIL: office B took $(ratio "$into_b" "$bytes")x the package from the origin"; exit 1; }
[ "$mc" = 0 ] || { echo "FAIL: $mc multicast data datagrams on the Wi-Fi subnet"; exit 1; }
# Each Wi-Fi agent but its fetcher took the package from peers.
id=$(head -1 "$WORK/task1.out")
for ((i = 1; i <= per; i++)); do
    api "st-aw$i" "$N.3.$((10 + i))" "/v1/tasks/$id" >"$WORK/aw$i.json"
done
python3 - "$WORK" "$per" "$bytes" <<'PY' || exit 1
import json, sys
work, per, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from_peers = 0
for i in range(1, per + 1):
    t = json.load(open(f"{work}/aw{i}.json"))
    assert t["bytes"]["multicast"] == 0, t
    assert t.get("site") == "office-a-wifi", t
    if t["bytes"]["peers"] >= size:
        from_peers += 1
print(f"    Wi-Fi: {from_peers} of {per} agents took the package from peers over TCP")
if from_peers != per - 1:
    print("FAIL: all but one Wi-Fi agent should take it from peers")
    sys.exit(1)
PY

# 2. A's first rendezvous killed mid-transfer.
package pkg2
for o in a b; do tx0[$o]=$(wan_tx $o); done
rvp=st-a11
others=$(agents_of '^st-(a1[2-9]|a2|aw|b1)')
# shellcheck disable=SC2086
ip netns exec st-o "$BIN" task start $others --agent "http://$N.1.11:7480" --token "$TOKEN" --manifest "$WORK/pkg2.json" \
    --sign "$KEY" --delay 3s >"$WORK/task2.out" 2>"$WORK/task2.err" || { cat "$WORK/task2.err"; exit 1; }
id=$(head -1 "$WORK/task2.out")
killed=
for _ in $(seq 600); do
    done_blocks=$(api $rvp $N.1.11 "/v1/tasks/$id" | python3 -c 'import json,sys; t=json.load(sys.stdin); print(t["blocks_done"] * 100 // max(t["block_count"], 1))' 2>/dev/null || echo 0)
    if [ "$done_blocks" -ge 30 ]; then
        ip netns pids $rvp | xargs -r kill -9
        killed=$done_blocks
        break
    fi
    sleep 0.1
done
[ -n "$killed" ] || { echo "FAIL: the rendezvous never got 30% of the package"; exit 1; }
complete=
for _ in $(seq 300); do
    # shellcheck disable=SC2086
    if ip netns exec st-o "$BIN" task status "$id" $others --token "$TOKEN" >"$WORK/task2.status" 2>&1; then
        complete=1
        break
    fi
    grep -q failed "$WORK/task2.status" && break
    sleep 1
done
[ -n "$complete" ] || { echo "FAIL: office A did not complete without its rendezvous"; cat "$WORK/task2.status"; exit 1; }
into_a=$(payload pkg2.bin $N.1. $N.2. $N.3.)
wire_a=$(($(wan_tx a) - ${tx0[a]}))
for hv in "${hosts[@]}"; do
    h=${hv%%:*}
    [ "$h" = $rvp ] && continue
    cmp -s "$www/pkg2.bin" "$WORK/cache-$h/objects/$(content pkg2)" || { echo "FAIL: $h does not hold the second package"; exit 1; }
done
echo "ok: A's (first) rendezvous killed at ${killed}% of its download: the rest of A completed;" \
    "origin payload into A $(ratio "$into_a" "$bytes")x the package, WAN link $(ratio "$wire_a" "$bytes")x"
python3 -c "import sys; sys.exit(not ($into_a <= 2 * $bytes))" || { echo "FAIL: office A took more than 2x the package"; exit 1; }
sed 's/^/   /' "$WORK/task2.status" | tail -n 4
