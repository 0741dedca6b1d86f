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
#   DG_TEST_SEAWEEDFS_ENDPOINT, DG_TEST_SWIFT_ENDPOINT (and their _ACCESS_KEY, _SECRET_KEY):
#                 the back end, as the test suite takes it (default 127.0.0.1:19100 / :19000)
#   S3TESTS_PARALLEL=1  run the direct suite and the gateway's at the same time
# Writes benchmarks/gateway/s3-tests-<target>.txt (the summary: each test that passes directly
# but not through the gateway, with the gateway's error) and, in $CACHE/s3-tests-out, the
# junit XML, the pytest logs and the gateway's access log (gateway-<target>.access.log).
# Not part of .ci/run: one run takes minutes (SeaweedFS) to an hour (Swift).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
CACHE=${DG_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deltaglider-ci}
TARGET=${1:-seaweedfs}; shift || true
S3TESTS_COMMIT=8f0ae7b
S3TESTS_DIR=${S3TESTS_DIR:-$CACHE/s3-tests}
PY=${PYTHON:-python3}
OUT=$CACHE/s3-tests-out; mkdir -p "$OUT"

case $TARGET in
  seaweedfs) BACKEND=${DG_TEST_SEAWEEDFS_ENDPOINT:-http://127.0.0.1:19100}
    BK_AK=${DG_TEST_SEAWEEDFS_ACCESS_KEY:-AKIAIOSFODNN7EXAMPLE}
    BK_SK=${DG_TEST_SEAWEEDFS_SECRET_KEY:-wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY} ;;
  swift) BACKEND=${DG_TEST_SWIFT_ENDPOINT:-http://127.0.0.1:19000}
    BK_AK=${DG_TEST_SWIFT_ACCESS_KEY:-test:tester} BK_SK=${DG_TEST_SWIFT_SECRET_KEY:-testing} ;;
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
  rm -f "$OUT/$1.xml"  # a run that dies leaves no earlier run's results to be taken for its own
  (cd "$S3TESTS_DIR" && S3TEST_CONF=$2 timeout 3600 "$VENV/bin/pytest" -q -p no:cacheprovider \
     --junitxml="$OUT/$1.xml" "${SELECT[@]}" s3tests/functional/test_s3.py "${EXTRA[@]}" \
     > "$OUT/$1.log" 2>&1) || true
  tail -n 1 "$OUT/$1.log" >&2
}
EXTRA=("$@")

DIRECT=
if [[ $TARGET != local ]]; then
  conf 127.0.0.1 "${BACKEND##*:}" "$BK_AK" "$BK_SK" > "$OUT/direct-$TARGET.conf"
  if [[ ${S3TESTS_PARALLEL:-} == 1 ]]; then
    run_suite "direct-$TARGET" "$OUT/direct-$TARGET.conf" & DIRECT=$!
  else
    run_suite "direct-$TARGET" "$OUT/direct-$TARGET.conf"
  fi
fi

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
umask 077
printf '%s\n' "s3tmain:s3tmainsecret" "s3talt:s3taltsecret" > "$OUT/users"
rm -rf "$OUT/state-$TARGET"
AWS_ACCESS_KEY_ID=$BK_AK AWS_SECRET_ACCESS_KEY=$BK_SK AWS_DEFAULT_REGION=us-east-1 \
DG_CACHE_DIR=$OUT/cache-$TARGET "$PY" "$ROOT/deltaglider.py" --endpoint-url "$BACKEND" \
  serve --listen 127.0.0.1:"$PORT" --users "$OUT/users" --state-dir "$OUT/state-$TARGET" \
  2> "$OUT/gateway-$TARGET.access.log" &
GW=$!
trap 'kill $GW 2>/dev/null || true' EXIT
for _ in $(seq 50); do "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null && break; sleep 0.2; done
conf 127.0.0.1 "$PORT" s3tmain s3tmainsecret s3talt s3taltsecret > "$OUT/gateway-$TARGET.conf"
run_suite "gateway-$TARGET" "$OUT/gateway-$TARGET.conf"
kill -TERM $GW; wait $GW || true
[[ -z $DIRECT ]] || wait $DIRECT || true

"$PY" - "$OUT" "$TARGET" "$ROOT/benchmarks/gateway/s3-tests-$TARGET.txt" "$S3TESTS_COMMIT" <<'PYEOF'
import os, re, sys, xml.etree.ElementTree as ET
out, target, dest, commit = sys.argv[1:5]
def results(name):
    """test name -> (passed|failed|skipped, the first line of its failure)"""
    path = os.path.join(out, name + ".xml")
    if not os.path.exists(path):
        return None
    res = {}
    for case in ET.parse(path).iter("testcase"):
        bad = [c for c in case if c.tag in ("failure", "error")]
        why = ""
        if bad:
            why = (bad[0].get("message") or "").strip().splitlines()[0] if bad[0].get("message") else ""
            why = re.sub(r"^botocore\.\w+\.\w+: ", "", why)
        kind = "failed" if bad else "skipped" if any(c.tag == "skipped" for c in case) else "passed"
        res[case.get("name")] = (kind, why[:150])
    return res
def count(r, what): return sum(1 for v, _ in r.values() if v == what)
def unimplemented(why): return "(NotImplemented)" in why or re.search(r"\b501\b", why) is not None
gw = results("gateway-" + target) or {}
direct = results("direct-" + target)
lines = ["ceph/s3-tests %s, s3tests/functional/test_s3.py, out-of-scope markers deselected" % commit,
         "(see benchmarks/gateway/s3-tests.sh); back end: %s" % target, ""]
lines.append("through the gateway: %d passed, %d failed, %d skipped"
             % (count(gw, "passed"), count(gw, "failed"), count(gw, "skipped")))
if direct is not None:
    lines.append("back end directly:   %d passed, %d failed, %d skipped"
                 % (count(direct, "passed"), count(direct, "failed"), count(direct, "skipped")))
    lost = sorted(n for n, (v, _) in direct.items() if v == "passed" and gw.get(n, ("",))[0] != "passed")
    won = sorted(n for n, (v, _) in gw.items() if v == "passed" and direct.get(n, ("",))[0] != "passed")
    out_of_scope = [n for n in lost if unimplemented(gw.get(n, ("", ""))[1])]
    rest = [n for n in lost if n not in out_of_scope]
    lines += ["", "pass directly but not through the gateway (%d): %d answered 501 NotImplemented"
              " (out of scope, README \"S3 gateway\"), %d otherwise:" % (len(lost), len(out_of_scope), len(rest))]
    lines += ["  %s  [%s]" % (n, gw.get(n, ("", "not run"))[1] or "failed") for n in rest]
    lines += ["", "  501 NotImplemented (out of scope):"] + ["    %s  [%s]" % (n, gw[n][1]) for n in out_of_scope]
    lines += ["", "pass through the gateway but not directly (%d):" % len(won)] + ["  " + n for n in won]
else:
    lines += ["", "failing through the gateway:"] + ["  %s  [%s]" % (n, w) for n, (v, w) in sorted(gw.items()) if v == "failed"]
open(dest, "w").write("\n".join(lines) + "\n")
print("\n".join(lines[:7]))
PYEOF
