#!/usr/bin/env bash
# Benchmark deltaglider.py against deltaglider==6.2.0 and `aws s3` on a local Swift S3 server.
#   benchmarks/run.sh            # full: botocore series from PyPI, 2 GiB file, 3 repetitions
#   benchmarks/run.sh --small    # CI: tiny synthetic corpus, 1 repetition (~2 min)
#   benchmarks/run.sh --repeat 5 --versions 6 --big-mib 1024
# Results: benchmarks/RESULTS.md (tables) and benchmarks/results.json (raw); --small writes
# them under the cache (~/.cache/deltaglider-bench/results-small/) and leaves those alone.
# Needs python3 (3.8+), xdelta3, sha256sum; installs awscli and deltaglider==6.2.0 into
# venvs under ~/.cache/deltaglider-bench (override with --cache DIR).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
command -v xdelta3 >/dev/null || { echo "run.sh: xdelta3 is required (apt-get install xdelta3)" >&2; exit 3; }
exec "${PYTHON:-python3}" "$here/bench.py" "$@"
