#!/usr/bin/env bash
# The long soak: 200 verified migrations, one after another, through one
# listener in one process, with open files, threads and RSS checked flat
# (the test command runs the same test with 20). Usage: scripts/soak.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh all
SOAK_MIGRATIONS=${1:-200} cargo test --release --locked -p transport-tcp --test soak -- --nocapture
