#!/usr/bin/env bash
# One file from host 0 to N-1 receivers with somcast, udpcast and uftp, in
# the same run and the same namespace lab, each tool paced at 95% of the
# link rate. Prints a Markdown table: wall time (sender start to sender
# exit; each of the three senders exits only once every receiver has
# confirmed the file), bytes host 0 put on its link (eth0 tx
# counter, all headers included), receivers with a byte-identical file,
# the ratio to the line-rate floor size*8/rate/(1-loss), and the CPU time
# the whole machine spent meanwhile (all hosts share its cores, so this is
# what the transfer cost: /proc/stat busy time, in core-seconds).
#
#   scripts/bench-peers.sh [--hosts 9] [--size 64M] [--rate 200] [--loss 0.05] [--runs 1]
#                          [--tools "somcast udpcast uftp"] [--somcast-args "--block-size 1M"]
#
# Tool "somcast-key" is somcast with a fleet key on sender and receivers
# (every datagram sealed and checked), "somcast-encrypt" the same with the
# sender's --encrypt: --tools "somcast somcast-key somcast-encrypt" measures
# what the seal and the encryption cost, side by side in one run.
#
# --rate is the link rate in Mbit/s. A sender still running after 60 s
# (udpcast) or 120 s is killed: its row then shows how many receivers had
# the file by then (udpcast can stall when a receiver's handshake is lost). Needs root; installs udpcast, uftp,
# nftables and iproute2 if missing; always removes its namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh
export LAB_PREFIX=scb

HOSTS=9 SIZE=64M RATE=200 LOSS=0.05 RUNS=1 TOOLS="somcast udpcast uftp" SOMCAST_ARGS=""
while [ $# -gt 0 ]; do
    case "$1" in
    --hosts) HOSTS=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --loss) LOSS=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --tools) TOOLS=$2; shift 2 ;;
    --somcast-args) SOMCAST_ARGS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

need=()
command -v udp-sender >/dev/null || need+=(udpcast)
command -v uftp >/dev/null || need+=(uftp)
command -v bc >/dev/null || need+=(bc)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -q
BIN=${SOMCAST_BIN:-$PWD/target/release/somcast}
WORK=$(mktemp -d)
trap 'lab_down; rm -rf "$WORK"' EXIT

lab_up "$HOSTS" "${RATE}mbit" "$LOSS"
head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom >"$WORK/src"
BYTES=$(stat -c %s "$WORK/src")
PACE=$((RATE * 95 / 100))
RECEIVERS=$((HOSTS - 1))
FLOOR=$(echo "scale=4; $BYTES * 8 / ($RATE * 1000000) / (1 - $LOSS)" | bc)

now() { date +%s.%N; }
# Busy jiffies of all cores (user, nice, system, irq, softirq).
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
cpu_since() { echo "scale=2; ($(busy) - $1) / $(getconf CLK_TCK)" | bc; }

# Waits up to 10 s for receivers that should be finishing, then kills them.
reap() {
    local p deadline=$((SECONDS + 10))
    for p in "$@"; do
        while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}
# Bytes host 0 put on the wire, Ethernet, IP and UDP headers included. The
# tbf qdisc's counter counts each datagram of a segmented send (UDP GSO)
# with its own headers, as the wire carries them; the interface's tx_bytes
# counts such a send once, with one set of headers, and so would undercount.
tx_bytes() {
    local sent
    sent=$(lab_exec 0 tc -s qdisc show dev eth0 | awk '/^qdisc tbf/ { t = 1 } t && /Sent/ { print $2; exit }')
    if [ -n "$sent" ]; then echo "$sent"; else lab_exec 0 cat /sys/class/net/eth0/statistics/tx_bytes; fi
}

verify() { # dir-pattern: prints how many receivers hold an identical file
    local ok=0 i
    for ((i = 1; i < HOSTS; i++)); do
        cmp -s "$WORK/src" "$(printf "$1" "$i")" && ok=$((ok + 1))
    done
    echo "$ok"
}

# Before each run: remove the outputs of the run before and write every
# dirty page to disk, so that no tool pays for another's writeback. Without
# this somcast, which fsyncs its output before the rename, waited on the
# journal for up to 1 GB of udpcast's and uftp's unwritten outputs: 3.41-3.43
# s when it ran after them, 3.27-3.35 s when it ran alone.
settle() {
    local i
    for ((i = 1; i < HOSTS; i++)); do
        rm -rf "$WORK/som$i" "$WORK/udp$i" "$WORK/uftp$i"
    done
    sync
}

SOM_KEY="" SOM_ENCRYPT=""
run_somcast-key() {
    [ -f "$WORK/lan.fleet" ] || "$BIN" key generate --fleet "$WORK/lan" 2>/dev/null
    SOM_KEY=$WORK/lan.fleet run_somcast
}
run_somcast-encrypt() {
    [ -f "$WORK/lan.fleet" ] || "$BIN" key generate --fleet "$WORK/lan" 2>/dev/null
    SOM_KEY=$WORK/lan.fleet SOM_ENCRYPT=--encrypt run_somcast
}

run_somcast() {
    local pids=() i
    for ((i = 1; i < HOSTS; i++)); do
        rm -f "$WORK/som$i"
        lab_exec "$i" "$BIN" recv --iface eth0 --group 239.192.0.1:7400 --out "$WORK/som$i" \
            ${SOM_KEY:+--key "$SOM_KEY"} --timeout 60s >/dev/null 2>"$WORK/som$i.err" &
        pids+=($!)
    done
    sleep 1
    local tx0 t0 t1 c0 cpu
    tx0=$(tx_bytes)
    c0=$(busy)
    t0=$(now)
    timeout -s KILL 120 ip netns exec "${LAB_PREFIX}-h0" "$BIN" send "$WORK/src" --iface eth0 --group 239.192.0.1:7400 --rate "${PACE}M" \
        --min-receivers "$RECEIVERS" ${SOM_KEY:+--key "$SOM_KEY"} $SOM_ENCRYPT $SOMCAST_ARGS --json >"$WORK/som-send.json" 2>"$WORK/som-send.err" || true
    t1=$(now)
    cpu=$(cpu_since "$c0")
    reap "${pids[@]}"
    echo "$(echo "$t1 - $t0" | bc) $(($(tx_bytes) - tx0)) $(verify "$WORK/som%d") $cpu"
}

# udpcast never repeats a lost connect request, so with loss on every UDP
# datagram it stalls at rendezvous in some runs. Its receivers therefore
# drop their share only of what is sent to its data group: the data, and
# the sender's acknowledgement requests, which go to the same group. Its
# rendezvous (HELLO to another group, connect replies by unicast) runs
# without loss: this favours udpcast. Its clock runs from launch to exit,
# as the other tools' do, and it gets its fastest start: by default
# udp-sender starts the data 2 s after launch even when every receiver is
# waiting (its HELLO interval), with --rexmit-hello-interval 100 about
# 0.12 s after. The time from launch to its "Starting transfer" is printed
# under the table.
UDP_DATA_GROUP=239.192.1.10
run_udpcast() {
    local pids=() i
    for ((i = 1; i < HOSTS; i++)); do
        rm -f "$WORK/udp$i"
        lab_loss_on "$i" "$LOSS" "$UDP_DATA_GROUP"
        lab_exec "$i" udp-receiver --interface eth0 --file "$WORK/udp$i" --nokbd \
            --portbase 9000 --mcast-rdv-address 239.192.1.9 >/dev/null 2>"$WORK/udp$i.err" &
        pids+=($!)
    done
    sleep 1
    local tx0 t0 t1 spid c0 cpu
    rm -f "$WORK/udp-start"
    tx0=$(tx_bytes)
    c0=$(busy)
    t0=$(now)
    timeout -s KILL 60 ip netns exec "${LAB_PREFIX}-h0" udp-sender --interface eth0 --file "$WORK/src" \
        --nokbd --portbase 9000 --mcast-rdv-address 239.192.1.9 --mcast-data-address "$UDP_DATA_GROUP" \
        --min-receivers "$RECEIVERS" --rexmit-hello-interval 100 --max-bitrate "${PACE}m" \
        >/dev/null 2>"$WORK/udp-send.err" &
    spid=$!
    while ! grep -q 'Starting transfer' "$WORK/udp-send.err" 2>/dev/null &&
        kill -0 "$spid" 2>/dev/null; do sleep 0.005; done
    printf '%.3f' "$(echo "$(now) - $t0" | bc)" >"$WORK/udp-start"
    wait "$spid" || true
    t1=$(now)
    cpu=$(cpu_since "$c0")
    reap "${pids[@]}"
    for ((i = 1; i < HOSTS; i++)); do lab_loss_on "$i" "$LOSS"; done
    echo "$(echo "$t1 - $t0" | bc) $(($(tx_bytes) - tx0)) $(verify "$WORK/udp%d") $cpu"
}

run_uftp() {
    local i
    for ((i = 1; i < HOSTS; i++)); do
        rm -rf "$WORK/uftp$i"
        mkdir -p "$WORK/uftp$i"
        lab_exec "$i" uftpd -I eth0 -D "$WORK/uftp$i" -L "$WORK/uftpd$i.log" -P "$WORK/uftpd$i.pid"
    done
    sleep 1
    local tx0 t0 t1 c0 cpu
    tx0=$(tx_bytes)
    c0=$(busy)
    t0=$(now)
    timeout -s KILL 120 ip netns exec "${LAB_PREFIX}-h0" uftp -I eth0 -R "$((PACE * 1000))" -L "$WORK/uftp.log" "$WORK/src" >/dev/null 2>&1 || true
    t1=$(now)
    cpu=$(cpu_since "$c0")
    for ((i = 1; i < HOSTS; i++)); do
        kill "$(cat "$WORK/uftpd$i.pid")" 2>/dev/null || true
    done
    echo "$(echo "$t1 - $t0" | bc) $(($(tx_bytes) - tx0)) $(verify "$WORK/uftp%d/src") $cpu"
}

printf '%s receivers, %s (%d bytes), %s Mbit/s links, %s receive loss, tools paced at %s Mbit/s; floor %.2f s\n\n' \
    "$RECEIVERS" "$SIZE" "$BYTES" "$RATE" "$LOSS" "$PACE" "$FLOOR"
echo "| tool | run | wall s | sender wire bytes | x file size | receivers identical | x floor | CPU core-s |"
echo "|---|---|---|---|---|---|---|---|"
udp_starts=()
for ((run = 1; run <= RUNS; run++)); do
    for tool in $TOOLS; do
        settle
        read -r secs wire ok cpu < <("run_$tool")
        printf '| %s | %d | %.2f | %d | %.3f | %d/%d | %.2f | %.1f |\n' "$tool" "$run" "$secs" "$wire" \
            "$(echo "scale=4; $wire / $BYTES" | bc)" "$ok" "$RECEIVERS" "$(echo "scale=4; $secs / $FLOOR" | bc)" "$cpu"
        if [ "$tool" = udpcast ]; then udp_starts+=("$(cat "$WORK/udp-start" 2>/dev/null || echo '?')"); fi
    done
done
if [ ${#udp_starts[@]} -gt 0 ]; then
    echo
    echo "udpcast's data started this long after its launch (s), run by run: ${udp_starts[*]}"
fi
