#!/usr/bin/env bash
# #17: a file over 5 GiB end to end. A 6 GiB sparse file (five 1 MiB random stretches), then a
# second version with four 64 KiB regions changed: upload both, download the second with an
# empty reference cache, compare bytes; prints seconds and the process tree's peak RSS (summed).
#   benchmarks/over5g.sh file:///tmp/dg-store          # local store
#   AWS_ACCESS_KEY_ID=test:tester AWS_SECRET_ACCESS_KEY=testing \
#     benchmarks/over5g.sh http://127.0.0.1:19000      # Swift from .ci/start-s3-server.sh
# Needs ~20 GB free under ${WORK:-/tmp/dg-over5g} for a local store (it stores data unsparse).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
EP=$1; D=${WORK:-/tmp/dg-over5g}; PY=${PYTHON:-python3}; mkdir -p "$D"
if [ ! -f "$D/v2.img" ]; then
  truncate -s 6G "$D/v1.img"
  for off in 1 1500 3000 4500 6000; do
    head -c 1048576 /dev/urandom | dd of="$D/v1.img" bs=1M seek=$off conv=notrunc status=none
  done
  cp --sparse=always "$D/v1.img" "$D/v2.img"
  for off in 700 2100 5200 6100; do
    head -c 65536 /dev/urandom | dd of="$D/v2.img" bs=64K seek=$((off * 16)) conv=notrunc status=none
  done
fi
export DG_CACHE_DIR="$D/cache"; rm -rf "$DG_CACHE_DIR"
DG=("$PY" "$here/../deltaglider.py" --endpoint-url "$EP")
measure() {  # run a command; print wall seconds and the summed RSS peak of its process tree
  "$PY" - "$@" <<'PYEOF'
import os, subprocess, sys, threading, time
def tree(pid):
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open("/proc/%d/statm" % p) as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for t in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, t)) as f:
                    todo += [int(x) for x in f.read().split()]
        except (OSError, ValueError, IndexError):
            pass
    return total
t0 = time.time(); p = subprocess.Popen(sys.argv[1:]); peak = 0
while p.poll() is None:
    peak = max(peak, tree(p.pid)); time.sleep(0.01)
print("rc=%d %.1f s, tree peak %.0f MB" % (p.returncode, time.time() - t0, peak / 1e6))
sys.exit(p.returncode)
PYEOF
}
B=over5g-$$; "${DG[@]}" mb "s3://$B" >/dev/null
echo "first version:  $(measure "${DG[@]}" cp --no-progress "$D/v1.img" "s3://$B/img/")"
echo "second version: $(measure "${DG[@]}" cp --no-progress "$D/v2.img" "s3://$B/img/")"
rm -rf "$DG_CACHE_DIR"
echo "cold download:  $(measure "${DG[@]}" cp --no-progress "s3://$B/img/v2.img" "$D/out.img")"
cmp "$D/out.img" "$D/v2.img" && echo "second version: bytes exact"
rm -f "$D/out.img"; "${DG[@]}" ls -r "s3://$B"
"${DG[@]}" rm -r --quiet "s3://$B/" >/dev/null; "${DG[@]}" rb "s3://$B" >/dev/null || true
