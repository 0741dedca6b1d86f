#!/usr/bin/env bash
# benchmarks/gateway/s3-tests.sh - run ceph/s3-tests (the RGW team's S3 conformance suite) against
# `deltaglider serve`, and against the gateway's back end directly, then compare: every
# test that passes against the back end should pass through the gateway, except the
# features the gateway declares out of scope (they answer 501 NotImplemented).
#
#   bash benchmarks/gateway/s3-tests.sh [seaweedfs|swift|local] [extra pytest args...]
#
# Environment:
#   S3TESTS_DIR   a checkout of ceph/s3-tests (default: cloned into $CACHE/s3-tests at
#                 S3TESTS_COMMIT; its code is never copied into this repository)
#   DG_CI_CACHE   where the venv and the clone live (default ~/.cache/deltaglider-ci)
# Writes benchmarks/gateway/s3-tests-<target>.txt (the summary) and the junit XML beside it in $CACHE.
# Not part of .ci/run: one run takes minutes.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
CACHE=${DG_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deltaglider-ci}
TARGET=${1:-seaweedfs}; shift || true
S3TESTS_COMMIT=8f0ae7b
S3TESTS_DIR=${S3TESTS_DIR:-$CACHE/s3-tests}
PY=${PYTHON:-python3}
OUT=$CACHE/s3-tests-out; mkdir -p "$OUT"

case $TARGET in
  seaweedfs) BACKEND=http://127.0.0.1:19100 BK_AK=AKIAIOSFODNN7EXAMPLE BK_SK=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY ;;
  swift) BACKEND=http://127.0.0.1:19000 BK_AK=test:tester BK_SK=testing ;;
  local) BACKEND=file://$OUT/local-store BK_AK= BK_SK= ; rm -rf "$OUT/local-store" ;;
  *) echo "usage: $0 [seaweedfs|swift|local] [pytest args]" >&2; exit 2 ;;
esac

if [[ ! -f $S3TESTS_DIR/s3tests/functional/test_s3.py ]]; then
  git clone -q https://github.com/ceph/s3-tests "$S3TESTS_DIR"
  git -C "$S3TESTS_DIR" checkout -q "$S3TESTS_COMMIT"
fi
VENV=$CACHE/venv-s3tests
if [[ ! -x $VENV/bin/pytest ]]; then
  "$PY" -m venv "$VENV"
  grep -v '^tox' "$S3TESTS_DIR/requirements.txt" | "$VENV/bin/pip" install -q -r /dev/stdin
fi

# Out of scope for the gateway (README, "S3 gateway"): answered 501 NotImplemented.
OUT_OF_SCOPE="versioning or lifecycle or lifecycle_expiration or lifecycle_transition or bucket_policy or user_policy or group_policy or role_policy or session_policy or bucket_encryption or encryption or sse_s3 or tagging or object_lock or s3select or s3website or bucket_logging or appendobject or cloud_transition or cloud_restore or sns or iam_account or iam_cross_account or iam_role or iam_tenant or iam_user or test_of_sts or webidentity_test or abac_test or object_ownership or delete_marker or storage_class or fails_on_aws or fails_on_s3"
SELECT=(-m "not ($OUT_OF_SCOPE)")

conf() {  # host port ak sk -> a config where every user is the one key pair given
  cat <<CONF
[DEFAULT]
host = $1
port = $2
is_secure = False
ssl_verify = False
[fixtures]
bucket prefix = dgs3t-{random}-
iam name prefix = s3-tests-
iam path prefix = /s3-tests/
[s3 main]
display_name = main
user_id = main
email = main@example.com
api_name = us-east-1
access_key = $3
secret_key = $4
[s3 alt]
display_name = alt
user_id = alt
email = alt@example.com
access_key = ${5:-$3}
secret_key = ${6:-$4}
[s3 tenant]
display_name = tenant
user_id = tenant
email = tenant@example.com
tenant = t
access_key = ${5:-$3}
secret_key = ${6:-$4}
[iam]
email = iam@example.com
user_id = iam
access_key = $3
secret_key = $4
display_name = iam
[iam root]
access_key = $3
secret_key = $4
user_id = root
email = root@example.com
[iam alt root]
access_key = $3
secret_key = $4
user_id = altroot
email = altroot@example.com
CONF
}

run_suite() {  # name config
  echo "== s3-tests against $1" >&2
  (cd "$S3TESTS_DIR" && S3TEST_CONF=$2 timeout 3600 "$VENV/bin/pytest" -q -p no:cacheprovider \
     --junitxml="$OUT/$1.xml" "${SELECT[@]}" s3tests/functional/test_s3.py "${EXTRA[@]}" \
     > "$OUT/$1.log" 2>&1) || true
  tail -n 1 "$OUT/$1.log" >&2
}
EXTRA=("$@")

if [[ $TARGET != local ]]; then
  conf 127.0.0.1 "${BACKEND##*:}" "$BK_AK" "$BK_SK" > "$OUT/direct-$TARGET.conf"
  run_suite "direct-$TARGET" "$OUT/direct-$TARGET.conf"
fi

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
umask 077
printf '%s\n' "s3tmain:s3tmainsecret" "s3talt:s3taltsecret" > "$OUT/users"
AWS_ACCESS_KEY_ID=$BK_AK AWS_SECRET_ACCESS_KEY=$BK_SK AWS_DEFAULT_REGION=us-east-1 \
DG_CACHE_DIR=$OUT/cache "$PY" "$ROOT/deltaglider.py" --endpoint-url "$BACKEND" \
  serve --listen 127.0.0.1:"$PORT" --users "$OUT/users" --quiet 2> "$OUT/gateway.log" &
GW=$!
trap 'kill $GW 2>/dev/null || true' EXIT
for _ in $(seq 50); do "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null && break; sleep 0.2; done
conf 127.0.0.1 "$PORT" s3tmain s3tmainsecret s3talt s3taltsecret > "$OUT/gateway-$TARGET.conf"
run_suite "gateway-$TARGET" "$OUT/gateway-$TARGET.conf"
kill -TERM $GW; wait $GW || true

"$PY" - "$OUT" "$TARGET" "$ROOT/benchmarks/gateway/s3-tests-$TARGET.txt" "$S3TESTS_COMMIT" <<'PYEOF'
import sys, os, xml.etree.ElementTree as ET
out, target, dest, commit = sys.argv[1:5]
def results(name):
    path = os.path.join(out, name + ".xml")
    if not os.path.exists(path):
        return None
    res = {}
    for case in ET.parse(path).iter("testcase"):
        kids = {c.tag for c in case}
        res[case.get("name")] = ("failed" if kids & {"failure", "error"} else
                                 "skipped" if "skipped" in kids else "passed")
    return res
gw = results("gateway-" + target) or {}
direct = results("direct-" + target)
def count(r, what): return sum(1 for v in r.values() if v == what)
lines = ["ceph/s3-tests %s, s3tests/functional/test_s3.py, out-of-scope markers deselected" % commit,
         "(see benchmarks/gateway/s3-tests.sh); back end: %s" % target, ""]
lines.append("through the gateway: %d passed, %d failed, %d skipped"
             % (count(gw, "passed"), count(gw, "failed"), count(gw, "skipped")))
if direct is not None:
    lines.append("back end directly:   %d passed, %d failed, %d skipped"
                 % (count(direct, "passed"), count(direct, "failed"), count(direct, "skipped")))
    lost = sorted(n for n, v in direct.items() if v == "passed" and gw.get(n) != "passed")
    won = sorted(n for n, v in gw.items() if v == "passed" and direct.get(n) != "passed")
    lines += ["", "pass directly but not through the gateway (%d):" % len(lost)] + ["  " + n for n in lost]
    lines += ["", "pass through the gateway but not directly (%d):" % len(won)] + ["  " + n for n in won]
else:
    lines += ["", "failing through the gateway:"] + sorted("  " + n for n, v in gw.items() if v == "failed")
open(dest, "w").write("\n".join(lines) + "\n")
print("\n".join(lines[:6]))
PYEOF
