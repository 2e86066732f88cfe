#!/usr/bin/env bash
# Side-by-side benchmark of Porthole against nginx, HAProxy, Squid, tinyproxy
# and socat (issue 7, P1-P6). Installs the peers and wrk from Debian's packages
# when missing, builds Porthole in release, runs everything on 127.0.0.1 and
# writes target/bench/report.md. See benches/README.md.
#
#   benches/run.sh            # the full run (about 12 minutes on 2 cores)
#   benches/run.sh --quick    # 1 repetition, short durations (about 2 minutes)
#   benches/run.sh --only P1,P4 --reps 5
#   benches/run.sh --only U1,U2   # the uplink (outside + inside relay) against rathole (issue 5)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 benches/driver.py "$@"
