#!/usr/bin/env bash
# Real multicast across network namespaces: host 0 sends, the others
# receive with nft-injected loss, and every output must be byte-identical.
#
#   scripts/ns-smoke.sh            3 hosts, 5% loss, 10 MiB + 123 bytes (CI)
#   scripts/ns-smoke.sh --matrix   sizes 0, 1, 10 MiB + 123 at 0%, 5%, 20% loss
#
# Needs root; installs nftables and iproute2 if missing; always cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh
export LAB_PREFIX=scs

cargo build --release -q
BIN=$PWD/target/release/somcast
WORK=$(mktemp -d)
trap 'lab_down; rm -rf "$WORK"' EXIT

run_case() {
    local hosts=$1 loss=$2 size=$3
    lab_up "$hosts" 200mbit "$loss"
    head -c "$size" /dev/urandom >"$WORK/src"
    local pids=() i
    for ((i = 1; i < hosts; i++)); do
        rm -f "$WORK/out$i"
        lab_exec "$i" "$BIN" recv --iface eth0 --group 239.192.0.1:7400 --out "$WORK/out$i" \
            --timeout 30s --json >"$WORK/recv$i.json" 2>"$WORK/recv$i.err" &
        pids+=($!)
    done
    sleep 0.3
    local start end
    start=$(date +%s.%N)
    if ! lab_exec 0 "$BIN" send "$WORK/src" --iface eth0 --group 239.192.0.1:7400 --rate 190M \
        --min-receivers $((hosts - 1)) --join-timeout 20s --json >"$WORK/send.json" 2>"$WORK/send.err"; then
        echo "FAIL: send (loss $loss, size $size):"; cat "$WORK/send.err"; return 1
    fi
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then
            echo "FAIL: receiver $((i + 1)) (loss $loss, size $size):"; cat "$WORK/recv$((i + 1)).err"; return 1
        fi
    done
    end=$(date +%s.%N)
    for ((i = 1; i < hosts; i++)); do
        cmp -s "$WORK/src" "$WORK/out$i" || { echo "FAIL: out$i differs (loss $loss, size $size)"; return 1; }
    done
    printf 'ok: %d receivers, %s bytes, %s%% loss, %.2f s, wire ratio %s\n' "$((hosts - 1))" "$size" \
        "$(awk -v l="$loss" 'BEGIN{print l*100}')" "$(echo "$end - $start" | bc)" \
        "$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["wire_ratio"],3))' "$WORK/send.json")"
}

command -v bc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bc >/dev/null
if [ "${1:-}" = "--matrix" ]; then
    for loss in 0 0.05 0.2; do
        for size in 0 1 $((10 * 1024 * 1024 + 123)); do
            run_case 3 "$loss" "$size"
        done
    done
else
    run_case 3 0.05 $((10 * 1024 * 1024 + 123))
fi
