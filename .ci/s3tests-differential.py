#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""ceph/s3-tests, run twice against one server: with boto3's client, then with
deltaglider's client in its place; reports the tests that pass with boto3 and fail with
ours (the goal is none).

Only tests that call nothing but the client methods deltaglider claims are compared: the
boto3 run records the client methods each test calls (client.meta, say, which ours has
not); the others are out of scope. s3-tests' set-up through boto3.resource stays boto3's.

    git clone https://github.com/ceph/s3-tests /tmp/s3-tests   # at 8f0ae7b; never committed here
    python .ci/s3tests-differential.py --s3tests /tmp/s3-tests [-k EXPR]

It needs a Python with s3-tests' requirements (boto3, pytest, munch, isodate, pytz,
requests, python-dateutil, httplib2, lxml, gevent, PyYAML): --python, default
~/.cache/deltaglider-ci/venv-s3tests/bin/python. The server defaults to the Swift that
.ci/start-s3-server.sh runs on 127.0.0.1:19000 (one user, so the "alt" user of s3-tests is
the same one: tests about a second user fail for both clients and are not compared).
Results go to .ci/s3tests-results.json (the summary and every compared test's outcome).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONF = """\
[DEFAULT]
host = {host}
port = {port}
is_secure = False
ssl_verify = False

[fixtures]
bucket prefix = dgs3t-{{random}}-

[s3 main]
display_name = tester
user_id = {user}
email = tester@example.com
api_name = default
access_key = {access}
secret_key = {secret}

[s3 alt]
display_name = tester
email = tester@example.com
user_id = {user}
access_key = {access}
secret_key = {secret}

[s3 tenant]
display_name = tester
user_id = {user}
access_key = {access}
secret_key = {secret}
email = tester@example.com
tenant = testx

[iam]
email = s3@example.com
user_id = {user}
access_key = {access}
secret_key = {secret}
display_name = tester

[iam root]
access_key = {access}
secret_key = {secret}
user_id = {user}
email = s3@example.com

[iam alt root]
access_key = {access}
secret_key = {secret}
user_id = {user}
email = s3@example.com
"""

#: Loaded into the s3-tests run with -p: swaps boto3.client("s3") for deltaglider's in
#: "dg" mode, records per test the client methods called and the outcome.
PLUGIN = r'''
import json, os, tempfile
import boto3
import pytest

MODE = os.environ["DG_S3T_MODE"]
RECORD = os.environ["DG_S3T_RECORD"]
_real_client = boto3.client
_calls = set()
_active = [False]


class _Recorder:
    """A client whose attribute reads are noted while a test body runs."""

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name):
        if _active[0] and not name.startswith("_"):
            _calls.add(name)
        return getattr(object.__getattribute__(self, "_inner"), name)


def _dg_client(kwargs):
    import deltaglider
    import botocore

    config = kwargs.get("config")
    unsigned = getattr(config, "signature_version", None) is botocore.UNSIGNED
    return deltaglider.create_client(
        endpoint_url=kwargs.get("endpoint_url"),
        aws_access_key_id=kwargs.get("aws_access_key_id"),
        aws_secret_access_key=kwargs.get("aws_secret_access_key"),
        aws_session_token=kwargs.get("aws_session_token"),
        region_name=kwargs.get("region_name") or "us-east-1",
        anonymous=unsigned,
        cache_dir=os.path.join(tempfile.gettempdir(), "dg-s3t-cache"),
    )


def client(*args, **kwargs):
    service = args[0] if args else kwargs.get("service_name", "s3")
    if service != "s3":
        if _active[0]:
            _calls.add("service:" + service)
        return _real_client(*args, **kwargs)
    if MODE == "dg":
        return _Recorder(_dg_client(kwargs))
    return _Recorder(_real_client(*args, **kwargs))


boto3.client = client
# boto3.resource stays boto3's in both runs: s3-tests use it to set buckets and objects
# up (plain objects, as any tool writes them), then test the client on them.


def pytest_configure(config):
    # Bucket clean-up lists object versions: boto3's own client does it in both runs.
    import s3tests.functional as f

    real_nuke = f.nuke_prefixed_buckets

    def nuke(prefix, client=None):
        return real_nuke(prefix, client=_real_client(
            "s3",
            endpoint_url=f.config.default_endpoint,
            aws_access_key_id=f.config.main_access_key,
            aws_secret_access_key=f.config.main_secret_key,
            region_name="us-east-1",
        ))

    f.nuke_prefixed_buckets = nuke


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _calls.clear()
    _active[0] = True
    try:
        yield
    finally:
        _active[0] = False


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        with open(RECORD, "a") as f:
            f.write(json.dumps({
                "test": report.nodeid,
                "outcome": report.outcome,
                "calls": sorted(_calls),
                "error": (str(report.longrepr).splitlines() or [""])[-1][:300]
                if report.outcome == "failed" else "",
            }) + "\n")
'''


def claimed_methods() -> list[str]:
    sys.path.insert(0, ROOT)
    import deltaglider

    return [*sorted(deltaglider._SUPPORTED_METHODS), "exceptions"]


def run(mode: str, args: argparse.Namespace, workdir: str) -> dict[str, dict]:
    record = os.path.join(workdir, "record-%s.jsonl" % mode)
    env = dict(
        os.environ,
        S3TEST_CONF=os.path.join(workdir, "s3tests.conf"),
        DG_S3T_MODE=mode,
        DG_S3T_RECORD=record,
        PYTHONPATH=os.pathsep.join([workdir, ROOT, args.s3tests]),
    )
    cmd = [args.python, "-m", "pytest", "-q", "-p", "dg_s3t_plugin", "-p", "no:cacheprovider"]
    cmd += ["s3tests/functional/test_s3.py", "-o", "addopts="]
    if args.k:
        cmd += ["-k", args.k]
    started = time.time()
    subprocess.run(cmd, cwd=args.s3tests, env=env, stdout=subprocess.DEVNULL, check=False)
    print("%s run: %.0f s" % (mode, time.time() - started), file=sys.stderr)
    out: dict[str, dict] = {}
    if os.path.exists(record):
        with open(record) as f:
            for line in f:
                entry = json.loads(line)
                out[entry["test"]] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--s3tests", required=True, help="a checkout of github.com/ceph/s3-tests")
    p.add_argument("--endpoint", default="http://127.0.0.1:19000")
    p.add_argument("--access-key", default="test:tester")
    p.add_argument("--secret-key", default="testing")
    p.add_argument(
        "--python",
        default=os.path.expanduser("~/.cache/deltaglider-ci/venv-s3tests/bin/python"),
    )
    p.add_argument("-k", default=None, help="pytest -k expression (a subset)")
    p.add_argument("--out", default=os.path.join(HERE, "s3tests-results.json"))
    args = p.parse_args(argv)
    args.s3tests = os.path.abspath(args.s3tests)
    host, _, port = args.endpoint.split("://", 1)[1].partition(":")
    claimed = set(claimed_methods())
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="dg-s3t-") as workdir:
        with open(os.path.join(workdir, "s3tests.conf"), "w") as f:
            f.write(
                CONF.format(
                    host=host,
                    port=int(port or 80),
                    user=args.access_key.split(":")[0],
                    access=args.access_key,
                    secret=args.secret_key,
                )
            )
        with open(os.path.join(workdir, "dg_s3t_plugin.py"), "w") as f:
            f.write(PLUGIN)
        # The two runs use buckets of their own (s3-tests prefixes each run's at random),
        # so they run side by side: the whole of test_s3.py then takes one run's time.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            boto3_run = pool.submit(run, "boto3", args, workdir)
            ours = run("dg", args, workdir)
            theirs = boto3_run.result()
    in_scope = sorted(t for t, e in theirs.items() if set(e["calls"]) <= claimed)
    differential = [
        t
        for t in in_scope
        if theirs[t]["outcome"] == "passed" and ours.get(t, {}).get("outcome") != "passed"
    ]
    summary = {
        "server": args.endpoint,
        "tests_run": len(theirs),
        "in_scope": len(in_scope),
        "pass_boto3": sum(theirs[t]["outcome"] == "passed" for t in in_scope),
        "pass_deltaglider": sum(ours.get(t, {}).get("outcome") == "passed" for t in in_scope),
        "pass_boto3_fail_deltaglider": len(differential),
        "pass_deltaglider_fail_boto3": sum(
            theirs[t]["outcome"] != "passed" and ours.get(t, {}).get("outcome") == "passed"
            for t in in_scope
        ),
        "seconds": round(time.time() - started),
        "selection": args.k or "all of test_s3.py",
    }
    result = {
        "summary": summary,
        "differential": {t: ours.get(t, {}).get("error", "not run") for t in differential},
        "tests": {
            t: {"boto3": theirs[t]["outcome"], "deltaglider": ours.get(t, {}).get("outcome")}
            for t in in_scope
        },
        "out_of_scope_calls": sorted({c for e in theirs.values() for c in e["calls"]} - claimed),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(summary, indent=1))
    for t in differential:
        print("  pass with boto3, fail with ours: %s\n    %s" % (t, result["differential"][t]))
    return 0 if not differential else 1


if __name__ == "__main__":
    sys.exit(main())
