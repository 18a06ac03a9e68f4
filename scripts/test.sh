#!/usr/bin/env bash
# The project's tests: unit, simulated-subnet and loopback multicast tests
# for the whole workspace. Needs no root and no network.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --workspace --release "$@"
