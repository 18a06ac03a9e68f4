#!/usr/bin/env bash
# Two branch subnets behind a router, the origin on a third, each branch's
# WAN link rate-limited at the router. One somcast task to every agent,
# then the same package fetched by every host over plain HTTP (curl), side
# by side: per-subnet WAN bytes (the router's counters) and completion time.
#
#   scripts/lab-fleet.sh [--per-subnet 4] [--size 32M] [--wan 50mbit] [--loss 0.01]
#
# Needs root; installs what it needs; always cleans up. Namespaces: lf-rt
# (router), lf-o (origin), lf-swa/lf-swb (switches), lf-a1.., lf-b1.. .
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh

per=4 size=32M wan=50mbit loss=0.01
while [ $# -gt 0 ]; do
    case "$1" in
    --per-subnet) per=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --wan) wan=$2; shift 2 ;;
    --loss) loss=$2; shift 2 ;;
    *) echo "usage: $0 [--per-subnet N] [--size 32M] [--wan 50mbit] [--loss P]" >&2; exit 2 ;;
    esac
done

for tool in ip:iproute2 nft:nftables curl:curl bc:bc; do
    command -v "${tool%%:*}" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool##*:}" >/dev/null
done
cargo build --release -q
BIN=$PWD/target/release/somcast
WORK=$(mktemp -d)
"$BIN" key generate "$WORK/publisher" 2>/dev/null
KEY=$WORK/publisher.key PUB=$WORK/publisher.pub

trap 'lab_down_matching "^lf-"; rm -rf "$WORK"' EXIT
lab_down_matching "^lf-"

lab_routed lf 10.81 "$wan" "$per" a b
hosts=("${LAB_ROUTED[@]}")
for hv in "${hosts[@]}"; do lab_ns_loss "${hv%%:*}" "$loss"; done

mkdir -p "$WORK/origin"
bytes=$(numfmt --from=iec "$size")
head -c "$bytes" /dev/urandom >"$WORK/origin/pkg.bin"
ip netns exec lf-o "$BIN" serve "$WORK/origin" --listen 10.81.9.10:8080 2>"$WORK/serve.log" &
"$BIN" manifest create "$WORK/origin/pkg.bin" --url http://10.81.9.10:8080/pkg.bin -o "$WORK/pkg.json" --sign "$KEY" 2>/dev/null
content=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d=json.loads(d["document"]) if "document" in d else d; print(d["content_id"])' "$WORK/pkg.json")
sleep 0.5

wan_tx() { ip netns exec lf-rt cat "/sys/class/net/eth-$1/statistics/tx_bytes"; }

TOKEN=lab-fleet-$$
targets=()
for hv in "${hosts[@]}"; do
    h=${hv%%:*} addr=${hv##*:}
    ip netns exec "$h" "$BIN" agent --iface eth0 --cache "$WORK/cache-$h" --api "$addr:7480" \
        --token "$TOKEN" --trust "$PUB" --rate 200M >"$WORK/agent-$h.log" 2>&1 &
    targets+=(--agent "http://$addr:7480")
done
sleep 1.5

a0=$(wan_tx a) b0=$(wan_tx b)
t0=$(date +%s.%N)
ip netns exec lf-o "$BIN" task start "${targets[@]}" --token "$TOKEN" --manifest "$WORK/pkg.json" --sign "$KEY" \
    --delay 3s --wait --timeout 600s >"$WORK/task.out" 2>"$WORK/task.err" || { cat "$WORK/task.out" "$WORK/task.err"; exit 1; }
t1=$(date +%s.%N)
a1=$(wan_tx a) b1=$(wan_tx b)
for hv in "${hosts[@]}"; do
    h=${hv%%:*}
    cmp -s "$WORK/origin/pkg.bin" "$WORK/cache-$h/objects/$content" || { echo "FAIL: $h"; exit 1; }
done
# Per-subnet completion: the slowest agent's seconds in that subnet.
sub_secs() {
    grep "10.81.$1\." "$WORK/task.out" | awk '{print $(NF)}' | sort -n | tail -1
}
sa=$(sub_secs 1) sb=$(sub_secs 2)

# Plain HTTP: every host downloads the package at once.
for hv in "${hosts[@]}"; do ip netns pids "${hv%%:*}" | xargs -r kill 2>/dev/null || true; done
sleep 0.5
a2=$(wan_tx a) b2=$(wan_tx b)
declare -A done_at
h0=$(date +%s.%N)
pids=()
for hv in "${hosts[@]}"; do
    h=${hv%%:*}
    ( ip netns exec "$h" curl -s -o "$WORK/http-$h.bin" http://10.81.9.10:8080/pkg.bin; date +%s.%N >"$WORK/http-$h.t" ) &
    pids+=($!)
done
wait "${pids[@]}"
a3=$(wan_tx a) b3=$(wan_tx b)
http_secs() {
    local s=$1 max=0 h t
    for hv in "${hosts[@]}"; do
        h=${hv%%:*}
        [[ $h == lf-$s* ]] || continue
        cmp -s "$WORK/origin/pkg.bin" "$WORK/http-$h.bin" || { echo "FAIL: http $h" >&2; exit 1; }
        t=$(echo "$(cat "$WORK/http-$h.t") - $h0" | bc)
        max=$(echo "if ($t > $max) $t else $max" | bc)
    done
    printf '%.1f' "$max"
}
ha=$(http_secs a) hb=$(http_secs b)
mib() { python3 -c "print(f'{$1 / 1048576:.1f}')"; }
echo
echo "lab-fleet: 2 subnets x $per agents, $size package, WAN $wan per subnet, $(python3 -c "print($loss * 100)")% UDP loss at every agent"
printf '%-8s %-22s %-22s %-16s %-16s\n' subnet "somcast WAN MiB" "plain HTTP WAN MiB" "somcast s" "plain HTTP s"
printf '%-8s %-22s %-22s %-16s %-16s\n' A "$(mib $((a1 - a0)))" "$(mib $((a3 - a2)))" "$sa" "$ha"
printf '%-8s %-22s %-22s %-16s %-16s\n' B "$(mib $((b1 - b0)))" "$(mib $((b3 - b2)))" "$sb" "$hb"
printf 'package %s MiB; somcast wall time for the whole task %.1f s (election, %s startup delay included)\n' \
    "$(mib "$bytes")" "$(echo "$t1 - $t0" | bc)" 3s
