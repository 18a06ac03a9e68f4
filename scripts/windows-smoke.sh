#!/usr/bin/env bash
# The Windows build, run under Wine: cross-built with MinGW, then
#   1. --version;
#   2. the lab demo (three multicast endpoints on loopback);
#   3. the agent demo twice in a row (unique directories, read-only cache
#      objects removed);
#   4. two agents and an origin on loopback: a signed task whose command goes
#      through cmd /C and exits 0, then one that exits 3 with output: the
#      agents report the exit code and the output; a long command cancelled
#      while it runs ends with its process tree; `scan --probe` finds both;
#   5. `somcast service install | start | stop | uninstall` with Wine's
#      service manager: the service agent answers its API, stops cleanly
#      (its log says so), and is gone after uninstall.
#
#   scripts/windows-smoke.sh
#
# Installs MinGW and Wine (Debian packages) when missing. Wine 8 lacks
# ProcessPrng, which Rust's std calls; a shim DLL next to the binary
# forwards it to RtlGenRandom (real Windows needs none). Wine stops its
# services when its last ordinary process exits, so a sleeper process keeps
# the prefix up for the service check. Sends only to loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v x86_64-w64-mingw32-gcc >/dev/null || need+=(gcc-mingw-w64-x86-64)
[ -x /usr/lib/wine/wine64 ] || need+=(wine64)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }
fi
rustup target list --installed | grep -q x86_64-pc-windows-gnu || rustup target add x86_64-pc-windows-gnu >/dev/null
echo "-- cross-building somcast.exe"
cargo build --release --target x86_64-pc-windows-gnu --bin somcast -q

WORK=$(mktemp -d /tmp/somcast-win.XXXXXX)
export WINEDEBUG=-all WINEPREFIX=${SOMCAST_WINEPREFIX:-$HOME/.somcast-wine}
WINE=/usr/lib/wine/wine64
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    (cd "$WORK" && timeout 60 $WINE ./somcast.exe service uninstall >/dev/null 2>&1) || true
    timeout 30 wineserver -k 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }

cat >"$WORK/shim.c" <<'C'
#include <windows.h>
BOOLEAN WINAPI SystemFunction036(PVOID buf, ULONG len);
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) { return SystemFunction036(data, (ULONG)len); }
C
cat >"$WORK/sleeper.c" <<'C'
#include <windows.h>
int main(void) { Sleep(INFINITE); return 0; }
C
x86_64-w64-mingw32-gcc -shared -o "$WORK/bcryptprimitives.dll" "$WORK/shim.c" -ladvapi32
x86_64-w64-mingw32-gcc -o "$WORK/sleeper.exe" "$WORK/sleeper.c"
cp target/x86_64-pc-windows-gnu/release/somcast.exe "$WORK/"
cd "$WORK"
# Every Windows run has a deadline, so a hang fails the suite, not CI.
win() { timeout "${WIN_TIMEOUT:-300}" $WINE ./somcast.exe "$@"; }

# A prefix left by an earlier run may still hold the service.
timeout 120 $WINE ./sleeper.exe >/dev/null 2>&1 &
pids+=($!)
win service uninstall >/dev/null 2>&1 || true

echo "-- 1. --version"
want="somcast $(sed -n 's/^version = "\(.*\)"/\1/p' "$OLDPWD/Cargo.toml" | head -1)"
got=$(win --version | tr -d '\r')
[ "$got" = "$want" ] || fail "--version said '$got', not '$want'"

echo "-- 2. lab demo"
win demo --lab --size 3M --receivers 2 >lab-demo.out 2>&1 || { cat lab-demo.out; fail "lab demo"; }

echo "-- 3. agent demo, twice"
for n in 1 2; do
    win demo --size 4M >"demo$n.out" 2>&1 || { cat "demo$n.out"; fail "agent demo run $n"; }
done

echo "-- 4. two agents, an origin, tasks through cmd /C"
TOKEN=smoke-token-$$
win key generate publisher 2>/dev/null || fail "key generate"
mkdir origin
head -c 3000000 /dev/urandom >origin/pkg.bin
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
origin=$(port)
win serve origin --listen "127.0.0.1:$origin" >serve.log 2>&1 &
pids+=($!)
win manifest create origin/pkg.bin --url "http://127.0.0.1:$origin/pkg.bin" -o pkg.json \
    --sign publisher.key 2>/dev/null || fail "manifest create"
group=239.192.$((RANDOM % 200 + 20)).$((RANDOM % 200 + 20)):$((RANDOM % 1000 + 17000))
targets=() apis=()
for i in 1 2; do
    api=$(port)
    win agent --iface 127.0.0.1 --api "127.0.0.1:$api" --cache "cache$i" --token "$TOKEN" \
        --trust publisher.pub --control-group "$group" --presence-interval 300ms >"agent$i.log" 2>&1 &
    pids+=($!)
    targets+=(--agent "http://127.0.0.1:$api")
    apis+=("$api")
done
for api in "${apis[@]}"; do
    for _ in $(seq 100); do
        curl -sf -m 2 -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$api/v1/status" >/dev/null && break
        sleep 0.2
    done
done
task_field() { # api id python-expression-on-t
    curl -sf -m 5 -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$1/v1/tasks/$2" |
        python3 -c "import json,sys; t=json.load(sys.stdin); print($3)"
}
ok_run='if exist "%SOMCAST_FILE%" (exit 0) else (exit 9)'
win task start --manifest pkg.json --sign publisher.key --run "$ok_run" --delay 2s \
    "${targets[@]}" --token "$TOKEN" --wait --timeout 120s >task1.out 2>task1.err ||
    { cat task1.out task1.err agent1.log; fail "the task that exits 0 did not succeed on both agents"; }
id1=$(head -1 task1.out | tr -d '\r')
bad_run='echo smoke-output %SOMCAST_TASK% & exit 3'
win task start --manifest pkg.json --sign publisher.key --run "$bad_run" --delay 2s \
    "${targets[@]}" --token "$TOKEN" --wait --timeout 120s >task2.out 2>task2.err &&
    fail "the task whose command exits 3 was reported a success"
id2=$(head -1 task2.out | tr -d '\r')
[ -n "$id2" ] || { cat task2.err; fail "no id for the second task"; }
for api in "${apis[@]}"; do
    code=$(task_field "$api" "$id2" 't["install"]["exit_code"]')
    [ "$code" = 3 ] || fail "agent on $api reported exit code '$code', not 3"
    out=$(task_field "$api" "$id2" 't["install"]["output_tail"]')
    [[ "$out" == *"smoke-output $id2"* ]] || fail "agent on $api reported output '$out'"
    [ "$(task_field "$api" "$id1" 't["state"]')" = done ] || fail "first task not done on $api"
done
echo "   exit codes 0 and 3 reported by both agents (tasks $id1, $id2)"
# A command that would run for two minutes, cancelled while it runs: the
# task ends within seconds and its process tree with it.
long_run='ping -n 120 127.0.0.1 >nul'
win task start --manifest pkg.json --sign publisher.key --run "$long_run" --delay 2s \
    "${targets[@]}" >task3.out 2>task3.err || { cat task3.err; fail "the long task was not taken"; }
id3=$(head -1 task3.out | tr -d '\r')
for _ in $(seq 150); do
    [ "$(task_field "${apis[0]}" "$id3" 't["state"]')" = installing ] &&
        [ "$(task_field "${apis[1]}" "$id3" 't["state"]')" = installing ] && break
    sleep 0.2
done
pgrep -f 'ping -n 120 127.0.0.1' >/dev/null || fail "the long command is not running"
win task cancel "$id3" --sign publisher.key "${targets[@]}" >cancel.out 2>&1 || { cat cancel.out; fail "task cancel"; }
for _ in $(seq 50); do
    [ "$(task_field "${apis[0]}" "$id3" 't["state"]')" = cancelled ] &&
        [ "$(task_field "${apis[1]}" "$id3" 't["state"]')" = cancelled ] && break
    sleep 0.2
done
for api in "${apis[@]}"; do
    state=$(task_field "$api" "$id3" 't["state"]')
    [ "$state" = cancelled ] || fail "the cancelled task is '$state' on $api after 10 s"
done
for _ in $(seq 25); do pgrep -f 'ping -n 120 127.0.0.1' >/dev/null || break; sleep 0.2; done
pgrep -f 'ping -n 120 127.0.0.1' >/dev/null && fail "the cancelled command's process tree still runs"
echo "   a running command cancelled: task cancelled, its processes ended"
win scan --iface 127.0.0.1 --probe --control-group "$group" --json >scan.json 2>scan.err ||
    { cat scan.err; fail "scan --probe"; }
found=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["probe"]["agents"]))' scan.json)
[ "$found" = 2 ] || fail "scan --probe found $found agents, not 2"
echo "   scan --probe found both agents"

echo "-- 5. the agent as a Windows service"
svc_api=$(port)
# Paths in the config are taken from the service's working directory, not
# this one: absolute, on Wine's Z: drive (which is /).
cat >svc.toml <<EOF
iface = "127.0.0.1"
api = "127.0.0.1:$svc_api"
token = "$TOKEN"
cache = 'Z:$PWD/svc-cache'
control_group = "$group"
trusted_keys = ['Z:$PWD/publisher.pub']
EOF
win service install --config "Z:$PWD/svc.toml" >svc-install.out 2>&1 ||
    { cat svc-install.out; fail "service install"; }
log=$WINEPREFIX/drive_c/ProgramData/somcast/logs/agent.log
before=$(stat -c %s "$log" 2>/dev/null || echo 0)
win service start >svc-start.out 2>&1 || { cat svc-start.out; fail "service start"; }
for _ in $(seq 100); do
    curl -sf -m 2 -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$svc_api/v1/status" >svc-status.json && break
    sleep 0.3
done
[ -s svc-status.json ] || fail "the service's agent never answered on its API"
peers=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["peers"]))' svc-status.json)
echo "   service agent answers; it sees $peers peers"
win service stop >svc-stop.out 2>&1 || { cat svc-stop.out; fail "service stop"; }
curl -sf -m 2 "http://127.0.0.1:$svc_api/v1/status" >/dev/null 2>&1 && fail "the API still answers after service stop"
newlog=$(tail -c +$((before + 1)) "$log")
[[ "$newlog" == *"service somcast running"*"stopping"* ]] ||
    { echo "$newlog"; fail "the service log does not show a clean stop"; }
win service uninstall >svc-uninstall.out 2>&1 || { cat svc-uninstall.out; fail "service uninstall"; }
win service start >/dev/null 2>&1 && fail "the service still starts after uninstall"
echo "   install, start, stop (clean), uninstall"
echo "PASS: Windows smoke suite under Wine"
