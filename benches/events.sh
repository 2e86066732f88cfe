#!/usr/bin/env bash
# Runs the long-poll benchmark (benches/EVENTS.md): raises the open-file limit
# (10,000 client sockets here, 10,000 in the relay), builds the release relay,
# runs benches/events_longpoll.rs. POLLERS=N changes the count.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "open files: $(ulimit -n)"
cargo build --release --bins -p porthole-relay
cargo bench --bench events_longpoll
