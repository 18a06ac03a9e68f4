#!/usr/bin/env bash
# The soak test (tests/soak.rs): one agent and two helpers on loopback,
# without a fleet key, complete TASKS real signed tasks (default 20) one
# after another under a stream of hostile input the whole time: forged
# claims, offers and presence, a slow peer that announces everything and
# serves a byte every 3 s, connection floods on the repair and API ports,
# random API calls. It fails unless every task is done on every agent with
# the right bytes, each install ran exactly once, the API's p99 stays under
# a second and the agent's peak RSS under 300 MiB; it prints peak RSS, API
# latency percentiles and the agent's drops by reason.
#
#   scripts/soak.sh [TASKS]        about 15 s a task on 2 cores
#
# Sends only to loopback. Linux (reads /proc for memory).
set -euo pipefail
cd "$(dirname "$0")/.."
export SOMCAST_SOAK_TASKS=${1:-20}
exec cargo test --release --test soak -- --ignored --nocapture
