#!/usr/bin/env bash
# Rate control across network namespaces, with the lab CLI:
#   1. A sender allowed 1 Gbit/s whose three receivers sit behind
#      100 Mbit/s links, in foreground and in background mode: from 3 s
#      after the data's start its mean rate is 80 to 100% of the link; at
#      most 1.15x the file on the wire.
#   2. Three receivers, one behind 50 Mbit/s, the sender allowed 190
#      Mbit/s, --slow-receivers leave: the two fast ones finish within 1.2x
#      their own floor (the file at 190 Mbit/s), the slow one is left
#      behind (it exits saying so), at most 1.3x the file on the wire.
#      With wait (the lab default) all three complete at the slow pace.
#   3. Background mode beside a bulk TCP flow (iperf3) over the same
#      100 Mbit/s link: somcast runs, TCP starts 2 s later for 10 s; while
#      both run, TCP keeps at least 80% of the link (from 1 s after its
#      start); once TCP stops, somcast takes at least 80% of it. (A TCP
#      flow already running when somcast starts is a known limit of delay
#      based yielding: the queue it keeps standing becomes somcast's base
#      delay. See docs/ARCHITECTURE.md, rate control.)
#   4. The agent flow: four agents allowed 190 Mbit/s, one behind 50 Mbit/s.
#      A task to the three fast ones, then one to all four: the slow agent
#      is left behind and completes from peers, the fast receivers take no
#      longer than 1.1x what they took without it, and the representative
#      puts at most 1.3x the package on the wire. Then a task to the fast
#      three paused in the middle of its pass: for 3 s the switch carries
#      no more than announcements toward a receiver; resumed, it completes
#      with the same representative and the origin at 1.0x.
#   5. Unicast in background mode beside a bulk TCP flow (iperf3) over the
#      same 100 Mbit/s link into an agent: first its origin fetch, then its
#      download from a peer (the peer's upload yields). For each, TCP
#      starts 2 s into the transfer for 10 s and keeps at least 80% of the
#      link (from 1 s after its start); once TCP stops, the transfer takes
#      at least 80% of it (the switch port's counter from 3 s after TCP's
#      end to the transfer's; the time it took to get back to 80% is
#      printed: the delay signal of a transfer held to 1 Mbit/s is slow).
#
#   scripts/ns-rate.sh [--only N]
#
# Needs root; installs what it needs (nftables, iproute2, iperf3); always
# cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lab.sh
export LAB_PREFIX=scr

only=""
[ "${1:-}" = "--only" ] && only=${2:?--only N}

command -v iperf3 >/dev/null || {
    echo "ns-rate: installing iperf3" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null ||
        { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null; }
}
lab_session rate
GROUP=239.192.0.1:7400

# port_rate I RATE: the switch sends to host I at RATE at most (a 50 ms
# queue, as lab.sh gives every link).
port_rate() {
    ip netns exec "${LAB_PREFIX}-sw" tc qdisc replace dev "${LAB_PREFIX}p$1" root tbf rate "$2" burst 64kb latency 50ms
}

# receive I [ARGS...]: a receiver on host I in the background; its pid in
# PIDS[I].
declare -A PIDS
receive() {
    local i=$1
    shift
    rm -f "$WORK/out$i"
    lab_exec "$i" "$BIN" recv --iface eth0 --group "$GROUP" --out "$WORK/out$i" --timeout 60s --json "$@" \
        >"$WORK/recv$i.json" 2>"$WORK/recv$i.err" &
    PIDS[$i]=$!
}

# send FILE ARGS...: the sender on host 0, its summary in send.json.
send() {
    local file=$1
    shift
    lab_exec 0 "$BIN" send "$file" --iface eth0 --group "$GROUP" --json "$@" >"$WORK/send.json" 2>"$WORK/send.err" || {
        echo "FAIL: send:"; cat "$WORK/send.err"; return 1
    }
}

# Mean rate (Mbit/s) of the sender's trace between FROM and TO seconds
# after the data's start (TO negative: that long before the data's end;
# with a third argument "abs", FROM is seconds since the sender started).
mean_rate() {
    python3 - "$WORK/send.json" "$1" "$2" "${3:-}" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
trace = s["rate_trace"]
start = next(t for t, r, _ in trace if r > 0)
end = start + s["data_seconds"]
lo = float(sys.argv[2]) if sys.argv[4] == "abs" else start + float(sys.argv[2])
hi = end + float(sys.argv[3]) if float(sys.argv[3]) <= 0 else start + float(sys.argv[3])
total = 0.0
for i, (t, r, _) in enumerate(trace):
    a = max(t, lo)
    b = min(trace[i + 1][0] if i + 1 < len(trace) else hi, hi)
    if b > a:
        total += r * (b - a)
print(round(total / (hi - lo), 1))
PY
}
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
check() { # python boolean expression, message
    python3 -c "import sys; sys.exit(0 if $1 else 1)" || {
        echo "FAIL: $2"
        [ -f "$WORK/send.json" ] && python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print("sender rate trace (s, Mbit/s, why):", [(round(t, 2), round(r), w) for t, r, w in s["rate_trace"]])' "$WORK/send.json"
        exit 1
    }
}

case1() {
    lab_up 4 0 0
    for i in 1 2 3; do port_rate "$i" 100mbit; done
    head -c 48M /dev/urandom >"$WORK/src"
    local mode
    for mode in foreground background; do
        case1_mode "$mode"
    done
}

case1_mode() {
    local mode=$1
    for i in 1 2 3; do receive "$i"; done
    sleep 0.3
    send "$WORK/src" --rate 1G --mode "$mode" --min-receivers 3 --join-timeout 20s
    for i in 1 2 3; do
        wait "${PIDS[$i]}" || { echo "FAIL: receiver $i:"; cat "$WORK/recv$i.err"; exit 1; }
        cmp -s "$WORK/src" "$WORK/out$i" || { echo "FAIL: out$i differs"; exit 1; }
    done
    local settled ratio secs
    settled=$(mean_rate 3 -0.2)
    ratio=$(field "$WORK/send.json" wire_ratio)
    secs=$(field "$WORK/send.json" data_seconds)
    # The trace is the rate the sender paces at, sampled every 100 ms; it
    # probes a little above the link between congestion signals, so 2%
    # over the link still counts as settled at it.
    check "80 <= $settled <= 102" "$mode: 1 Gbit/s sender to 100 Mbit/s links: mean rate $settled Mbit/s from 3 s in"
    check "$ratio <= 1.15" "$mode: wire ratio $ratio"
    echo "ok: $mode: 1 Gbit/s allowed, 100 Mbit/s links: settled at $settled Mbit/s (3 s in to the end), $(printf %.2f "$secs") s for 48 MiB, wire ratio $(printf %.3f "$ratio")"
}

case2() {
    lab_up 4 200mbit 0
    port_rate 3 50mbit
    head -c 64M /dev/urandom >"$WORK/src"
    local bytes floor i
    bytes=$(stat -c %s "$WORK/src")
    # The file at 190 Mbit/s on the wire (1400-byte symbols, 70 bytes of
    # headers and framing).
    floor=$(python3 -c "print($bytes * 1470 / 1400 * 8 / 190e6)")
    for i in 1 2 3; do receive "$i"; done
    sleep 0.3
    send "$WORK/src" --rate 190M --min-receivers 3 --join-timeout 20s --slow-receivers leave
    for i in 1 2; do
        wait "${PIDS[$i]}" || { echo "FAIL: fast receiver $i:"; cat "$WORK/recv$i.err"; exit 1; }
        cmp -s "$WORK/src" "$WORK/out$i" || { echo "FAIL: out$i differs"; exit 1; }
        local took
        took=$(field "$WORK/recv$i.json" seconds)
        check "$took <= 1.2 * $floor" "fast receiver $i took $took s, floor $floor s"
    done
    if wait "${PIDS[3]}"; then
        echo "FAIL: the slow receiver was not left behind"; exit 1
    fi
    grep -q "left this receiver behind" "$WORK/recv3.err" ||
        { echo "FAIL: slow receiver:"; cat "$WORK/recv3.err"; exit 1; }
    local ratio left
    ratio=$(field "$WORK/send.json" wire_ratio)
    left=$(field "$WORK/send.json" receivers_left_behind)
    check "$ratio <= 1.3" "leave: wire ratio $ratio"
    check "$left == 1" "leave: $left receivers left behind"
    echo "ok: leave: fast receivers in $(field "$WORK/recv1.json" seconds) and $(field "$WORK/recv2.json" seconds) s (floor $(printf %.2f "$floor") s), the 50 Mbit/s one left behind, wire ratio $(printf %.3f "$ratio")"

    for i in 1 2 3; do receive "$i"; done
    sleep 0.3
    send "$WORK/src" --rate 190M --min-receivers 3 --join-timeout 20s
    for i in 1 2 3; do
        wait "${PIDS[$i]}" || { echo "FAIL: wait: receiver $i:"; cat "$WORK/recv$i.err"; exit 1; }
        cmp -s "$WORK/src" "$WORK/out$i" || { echo "FAIL: wait: out$i differs"; exit 1; }
    done
    ratio=$(field "$WORK/send.json" wire_ratio)
    check "$ratio <= 1.3" "wait: wire ratio $ratio"
    echo "ok: wait: all three in $(printf %.2f "$(field "$WORK/send.json" data_seconds)") s at the slow pace (mean $(mean_rate 2 -0.2) Mbit/s), wire ratio $(printf %.3f "$ratio")"
}

case3() {
    lab_up 2 0 0
    port_rate 1 100mbit
    head -c 96M /dev/urandom >"$WORK/src"
    lab_exec 1 iperf3 -s -1 -B "$LAB_NET.2" >/dev/null 2>&1 &
    receive 1
    sleep 0.3
    local t_tcp t_send
    t_send=$(date +%s.%N)
    send "$WORK/src" --rate 1G --mode background --min-receivers 1 --join-timeout 20s &
    local sender=$!
    sleep 2
    t_tcp=$(date +%s.%N)
    lab_exec 0 iperf3 -c "$LAB_NET.2" -t 10 -J >"$WORK/iperf.json" 2>&1 ||
        { echo "FAIL: iperf3:"; cat "$WORK/iperf.json"; exit 1; }
    wait "$sender" || exit 1
    wait "${PIDS[1]}" || { echo "FAIL: receiver:"; cat "$WORK/recv1.err"; exit 1; }
    cmp -s "$WORK/src" "$WORK/out1" || { echo "FAIL: out1 differs"; exit 1; }
    local tcp after
    # TCP's mean from 1 s after its start (somcast's time to yield) to
    # its end.
    tcp=$(python3 - "$WORK/iperf.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
iv = [i["sum"] for i in j["intervals"] if i["sum"]["start"] >= 1.0]
print(round(sum(i["bits_per_second"] * i["seconds"] for i in iv) / sum(i["seconds"] for i in iv) / 1e6, 1))
PY
)
    # somcast from 1 s after TCP ended (10 s after it started) to the end.
    local tcp_end_in_send
    tcp_end_in_send=$(python3 -c "print($t_tcp + 10 + 1 - $t_send)")
    after=$(mean_rate "$tcp_end_in_send" -0.2 abs)
    check "$tcp >= 80" "TCP kept $tcp Mbit/s of 100 beside somcast in background mode"
    check "$after >= 80" "somcast took $after Mbit/s of 100 once TCP stopped"
    echo "ok: background beside TCP: TCP kept $tcp Mbit/s; after it, somcast ran at $after Mbit/s; wire ratio $(printf %.3f "$(field "$WORK/send.json" wire_ratio)")"
}

case4() {
    lab_up 5 200mbit 0
    port_rate 4 50mbit
    local size=48M bytes i f
    bytes=$(numfmt --from=iec "$size")
    mkdir -p "$WORK/origin"
    for f in fast all paused; do
        head -c "$bytes" /dev/urandom >"$WORK/origin/$f.bin"
    done
    lab_exec 0 "$BIN" serve "$WORK/origin" --listen "$LAB_NET.1:8080" 2>/dev/null &
    for f in fast all paused; do
        "$BIN" manifest create "$WORK/origin/$f.bin" --url "http://$LAB_NET.1:8080/$f.bin" -o "$WORK/$f.json" --sign "$KEY" 2>/dev/null
    done
    for i in 1 2 3 4; do
        # Agent 1 wins every election: the representative is a fast host.
        lab_exec "$i" "$BIN" agent --iface eth0 --cache "$WORK/cache$i" --api "$LAB_NET.$((i + 1)):7480" \
            --token "$TOKEN" --trust "$PUB" --rate 190M --preference $((i == 1 ? 200 : 0)) \
            >"$WORK/agent$i.log" 2>&1 &
    done
    sleep 1.5
    local id alone slow rep
    id=$(agent_task "$WORK/fast.json" 1 2 3)
    alone=$(api 1 "/v1/tasks/$id")
    id=$(agent_task "$WORK/all.json" 1 2 3 4)
    slow=$(api 4 "/v1/tasks/$id")
    rep=$(api 1 "/v1/tasks/$id")
    python3 - "$slow" "$rep" "$bytes" "$alone" <<'PY' || exit 1
import json, sys
slow, rep, alone = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[4])
size = int(sys.argv[3])
m = rep.get("multicast") or {}
# The representative's session from its first DATA to its end: once the
# fast receivers are done (the slow one is not waited for).
with_slow, alone = m.get("data_seconds", 0), alone["multicast"]["data_seconds"]
# The package at 190 Mbit/s on the wire (1400-byte symbols, 70 bytes of
# headers and framing each).
floor = size * 1470 / 1400 * 8 / 190e6
fail = []
if rep["role"] != "representative":
    fail.append(f"agent 1 is {rep['role']}, not the representative")
if m.get("receivers_left") != 1:
    fail.append(f"representative left {m.get('receivers_left')} receivers behind, want 1")
if m.get("wire_bytes", 0) > 1.3 * size:
    fail.append(f"multicast wire bytes {m.get('wire_bytes')} for {size}")
if slow["bytes"]["peers"] == 0:
    fail.append(f"the slow agent took nothing from peers: {slow['bytes']}")
if slow["bytes"]["origin"] > 0:
    fail.append(f"the slow agent went to the origin: {slow['bytes']}")
if with_slow > 1.1 * alone:
    fail.append(f"the multicast took {with_slow:.2f} s with the slow one, {alone:.2f} s without")
if with_slow > 1.2 * floor:
    fail.append(f"the multicast took {with_slow:.2f} s, floor {floor:.2f} s")
if fail:
    sys.exit("FAIL: agent flow: " + "; ".join(fail))
print(f"ok: agent flow: the 50 Mbit/s agent was left behind and completed from peers "
      f"({slow['bytes']['multicast']} B multicast, {slow['bytes']['peers']} B peers, {slow['seconds']:.1f} s); "
      f"multicast to the fast ones {with_slow:.2f} s with it, {alone:.2f} s without (floor {floor:.2f} s); "
      f"multicast {m['wire_bytes'] / size:.3f}x the package on the wire")
PY
    pause_case "$bytes"
}

# pause_case BYTES: case 4's agents; a task paused in its pass and resumed.
pause_case() {
    local bytes=$1 id a served0 tx0 tx1
    served0=$(lab_exec 0 curl -s "http://$LAB_NET.1:8080/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_served"])')
    id=$(agent_task "$WORK/paused.json" 1 2 3 nowait)
    # Agent 2 receives: pause once it holds a block.
    local t0=$SECONDS
    until [ "$(api 2 "/v1/tasks/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("blocks_done", 0) >= 1)' 2>/dev/null)" = True ]; do
        [ $((SECONDS - t0)) -gt 60 ] && { echo "FAIL: pause: no block arrived"; exit 1; }
        sleep 0.1
    done
    lab_exec 0 "$BIN" task pause "$id" $(for a in 1 2 3; do echo --agent "http://$LAB_NET.$((a + 1)):7480"; done) \
        --token "$TOKEN" --sign "$KEY" >/dev/null
    sleep 0.5
    local held
    held=$(api 2 "/v1/tasks/$id" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["blocks_done"], s["block_count"], s["paused"])')
    tx0=$(ip netns exec "${LAB_PREFIX}-sw" tc -s qdisc show dev "${LAB_PREFIX}p2" | awk '/Sent/ { print $2; exit }')
    sleep 3
    tx1=$(ip netns exec "${LAB_PREFIX}-sw" tc -s qdisc show dev "${LAB_PREFIX}p2" | awk '/Sent/ { print $2; exit }')
    lab_exec 0 "$BIN" task resume "$id" $(for a in 1 2 3; do echo --agent "http://$LAB_NET.$((a + 1)):7480"; done) \
        --token "$TOKEN" --sign "$KEY" >/dev/null
    agent_task_wait "$id" 1 2 3
    local served
    served=$(( $(lab_exec 0 curl -s "http://$LAB_NET.1:8080/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_served"])') - served0 ))
    python3 - "$held" "$((tx1 - tx0))" "$served" "$bytes" "$(api 1 "/v1/tasks/$id")" "$(api 2 "/v1/tasks/$id")" <<'PY' || exit 1
import json, sys
done_at_pause, count, paused = sys.argv[1].split()
toward, served, size = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rep, rx = json.loads(sys.argv[5]), json.loads(sys.argv[6])
fail = []
if paused != "True":
    fail.append("the receiver's status did not say paused")
if int(done_at_pause) >= int(count):
    fail.append(f"the pass was over before the pause ({done_at_pause}/{count} blocks)")
# 3 s at 190 Mbit/s would be 71 MB; announcements and presence are a few
# hundred kB at most.
if toward > 500_000:
    fail.append(f"{toward} bytes went to a receiver in 3 s of pause")
if served > 1.05 * size:
    fail.append(f"the origin sent {served} for {size}: something was fetched again")
if rep.get("role") != "representative" or rx.get("role") != "receiver":
    fail.append(f"roles changed: {rep.get('role')}, {rx.get('role')}")
if fail:
    sys.exit("FAIL: pause: " + "; ".join(fail))
print(f"ok: pause: paused at {done_at_pause}/{count} blocks; {toward} bytes toward a receiver in 3 s of pause; "
      f"resumed and completed, same representative, origin {served / size:.3f}x")
PY
}

api() { lab_exec 0 curl -s -H "Authorization: Bearer $TOKEN" "http://$LAB_NET.$(($1 + 1)):7480$2"; }

# agent_task MANIFEST AGENT... [nowait]: a task to those agents; waits until
# each is done (unless the last word is nowait); prints its id.
agent_task() {
    local m=$1 targets=() a id wait=yes
    shift
    [ "${*: -1}" = nowait ] && { wait=no; set -- "${@:1:$(($# - 1))}"; }
    for a in "$@"; do targets+=(--agent "http://$LAB_NET.$((a + 1)):7480"); done
    lab_exec 0 "$BIN" task start "${targets[@]}" --token "$TOKEN" --manifest "$m" --sign "$KEY" --delay 2s >"$WORK/id.out"
    id=$(head -1 "$WORK/id.out")
    [ "$wait" = yes ] && agent_task_wait "$id" "$@"
    echo "$id"
}

# agent_task_wait ID AGENT...: until each agent has task ID done.
agent_task_wait() {
    local id=$1 a t0=$SECONDS
    shift
    for a in "$@"; do
        until [ "$(api "$a" "/v1/tasks/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("state"))' 2>/dev/null)" = done ]; do
            [ $((SECONDS - t0)) -gt 120 ] && { echo "FAIL: agent $a task $id: $(api "$a" "/v1/tasks/$id")" >&2; exit 1; }
            sleep 0.3
        done
    done
}


case5() {
    lab_up 3 0 0
    port_rate 2 100mbit
    mkdir -p "$WORK/origin"
    local f
    for f in fetch repair; do
        head -c 128M /dev/urandom >"$WORK/origin/$f.bin"
    done
    lab_exec 0 "$BIN" serve "$WORK/origin" --listen "$LAB_NET.1:8080" 2>/dev/null &
    for f in fetch repair; do
        "$BIN" manifest create "$WORK/origin/$f.bin" --url "http://$LAB_NET.1:8080/$f.bin" -o "$WORK/$f.json" --sign "$KEY" 2>/dev/null
    done
    for i in 1 2; do
        lab_exec "$i" "$BIN" agent --iface eth0 --cache "$WORK/cache$i" --api "$LAB_NET.$((i + 1)):7480" \
            --token "$TOKEN" --trust "$PUB" >"$WORK/agent$i.log" 2>&1 &
    done
    sleep 1.5
    unicast_beside_tcp origin "$WORK/fetch.json"
    # Agent 1 holds the second package; agent 2 then takes it from agent 1.
    agent_task "$WORK/repair.json" 1 >/dev/null
    sleep 6 # presence carries agent 1's HAVE to agent 2
    unicast_beside_tcp peers "$WORK/repair.json"
}

# port_sent I: bytes the switch has sent toward host I.
port_sent() {
    ip netns exec "${LAB_PREFIX}-sw" tc -s qdisc show dev "${LAB_PREFIX}p$1" | awk '/Sent/ { print $2; exit }'
}

# unicast_beside_tcp SOURCE MANIFEST: a task to agent 2 that it takes from
# SOURCE (origin or peers) over TCP, with iperf3 into host 2 beside it.
unicast_beside_tcp() {
    local source=$1 m=$2 id tcp
    lab_exec 2 iperf3 -s -1 -B "$LAB_NET.3" >/dev/null 2>&1 &
    id=$(agent_task "$m" 2 nowait)
    sleep 4 # the task's 2 s delay, then 2 s of the transfer alone
    lab_exec 0 iperf3 -c "$LAB_NET.3" -t 10 -J >"$WORK/iperf.json" 2>&1 ||
        { echo "FAIL: iperf3:"; cat "$WORK/iperf.json"; exit 1; }
    # From TCP's end to the transfer's (every block held: a
    # representative's task is done only after its multicast), the switch
    # port's byte count every 0.2 s.
    local t0 log="$WORK/port-$source.txt"
    t0=$(date +%s.%N)
    : >"$log"
    until [ "$(api 2 "/v1/tasks/$id" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["blocks_done"] == s["block_count"])' 2>/dev/null)" = True ]; do
        echo "$(date +%s.%N) $(port_sent 2)" >>"$log"
        [ "$(python3 -c "print($(date +%s.%N) - $t0 > 90)")" = True ] && { echo "FAIL: $source transfer: $(api 2 "/v1/tasks/$id")"; exit 1; }
        sleep 0.2
    done
    echo "$(date +%s.%N) $(port_sent 2)" >>"$log"
    agent_task_wait "$id" 2
    tcp=$(python3 - "$WORK/iperf.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
iv = [i["sum"] for i in j["intervals"] if i["sum"]["start"] >= 1.0]
print(round(sum(i["bits_per_second"] * i["seconds"] for i in iv) / sum(i["seconds"] for i in iv) / 1e6, 1))
PY
)
    python3 - "$source" "$(api 2 "/v1/tasks/$id")" "$tcp" "$log" <<'PY' || exit 1
import json, sys
source, s, tcp = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
samples = [tuple(map(float, l.split())) for l in open(sys.argv[4]) if len(l.split()) == 2]
t0 = samples[0][0]
def mbps(a, b):
    return (b[1] - a[1]) * 8 / (b[0] - a[0]) / 1e6
# Steady: from 3 s after TCP's end to the transfer's end.
steady = [p for p in samples if p[0] >= t0 + 3]
after = mbps(steady[0], steady[-1]) if len(steady) >= 5 else 0.0
# Recovery: the first 1 s window after TCP's end at 80% of the link.
def second_after(i):
    return next((b for b in samples[i + 1:] if b[0] - samples[i][0] >= 1.0), None)
recovered = next((a[0] - t0 for i, a in enumerate(samples)
                  if second_after(i) and mbps(a, second_after(i)) >= 80), None)
b = s["bytes"]
fail = []
if b[source] < 0.95 * s["size"]:
    fail.append(f"the package did not come from {source}: {b}")
if tcp < 80:
    fail.append(f"TCP kept {tcp} Mbit/s of 100 beside the {source} transfer")
if after < 80:
    fail.append(f"the {source} transfer took {after:.1f} Mbit/s of 100 from 3 s after TCP stopped")
if fail:
    sys.exit("FAIL: unicast beside TCP: " + "; ".join(fail))
rec = f"{recovered:.1f} s" if recovered is not None else "never in a 1 s window"
print(f"ok: background {source} transfer beside TCP: TCP kept {tcp} Mbit/s; after it, the transfer ran at {after:.1f} Mbit/s "
      f"(80% of the link again {rec} after TCP's end; {s['seconds']:.1f} s for {s['size'] >> 20} MiB)")
PY
}

for c in 1 2 3 4 5; do
    if [ -z "$only" ] || [ "$only" = "$c" ]; then
        "case$c"
    fi
done
