#!/usr/bin/env python3
"""Throughput of `deltaglider serve`: aws-cli and boto3 through the gateway vs the back end.

    python benchmarks/gateway/gateway_bench.py [--aws PATH] [--mib 64] [--endpoint-url http://127.0.0.1:19100]

Back end defaults to the SeaweedFS of .ci/run (AWS_* keys of that server). Measures, each
direct and through a gateway on 127.0.0.1 in front of the same server:
  - `aws s3 cp` upload of a first version, a later version (a delta through the gateway),
    and the download of the later version (MiB/s, wall time of the aws process);
  - small objects: 4 KiB PutObject + GetObject from 16 boto3 threads (requests/s).
Prints a Markdown table (benchmarks/gateway/RESULTS.md keeps one run's output).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import boto3
from botocore.config import Config

import deltaglider as dg


def make_versions(folder: str, mib: int) -> tuple[str, str]:
    rng = os.urandom(1024 * 1024)
    base = bytearray(rng * mib)
    v1, v2 = os.path.join(folder, "v1.bin"), os.path.join(folder, "v2.bin")
    with open(v1, "wb") as f:
        f.write(base)
    for at in range(0, len(base), len(base) // 8):
        base[at : at + 64] = os.urandom(64)
    with open(v2, "wb") as f:
        f.write(base)
    return v1, v2


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.monotonic() - t0


def small_ops(url: str, key: str, secret: str, bucket: str, n: int = 400) -> float:
    c = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(max_pool_connections=16, retries={"max_attempts": 1}),
    )
    body = os.urandom(4096)

    def one(i: int) -> None:
        c.put_object(Bucket=bucket, Key="small/%d.txt" % i, Body=body)
        assert c.get_object(Bucket=bucket, Key="small/%d.txt" % i)["Body"].read() == body

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))
    return 2 * n / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--aws", default=os.environ.get("DG_TEST_AWS") or shutil.which("aws"))
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--endpoint-url", default="http://127.0.0.1:19100")
    ap.add_argument("--access-key", default="AKIAIOSFODNN7EXAMPLE")
    ap.add_argument("--secret-key", default="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="dg-gwbench-")
    v1, v2 = make_versions(tmp, args.mib)
    client = dg.create_client(
        endpoint_url=args.endpoint_url,
        aws_access_key_id=args.access_key,
        aws_secret_access_key=args.secret_key,
        region_name="us-east-1",
        cache_dir=os.path.join(tmp, "cache"),
    )
    gateway = dg._Gateway(
        client,
        dg._GatewayAuth(dg._GatewayUsers({"bench": "bench-secret"})),
        state_dir=os.path.join(tmp, "state"),
    )
    server = dg._GatewayServer(("127.0.0.1", 0), gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    targets: dict[str, tuple[str, str, str]] = {
        "direct": (args.endpoint_url, args.access_key, args.secret_key),
        "gateway": (server.url, "bench", "bench-secret"),
    }
    results: dict[str, dict[str, Any]] = {}
    for name, (url, key, secret) in targets.items():
        bucket = "dg-gwbench-" + uuid.uuid4().hex[:8]
        env = dict(
            os.environ,
            AWS_ACCESS_KEY_ID=key,
            AWS_SECRET_ACCESS_KEY=secret,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        )
        aws = [args.aws, "--endpoint-url", url, "s3"]
        timed([*aws, "mb", "s3://" + bucket], env)
        r = results[name] = {}
        r["first upload"] = timed([*aws, "cp", v1, "s3://%s/rel/app-1.bin" % bucket], env)
        r["later upload"] = timed([*aws, "cp", v2, "s3://%s/rel/app-2.bin" % bucket], env)
        out = os.path.join(tmp, "out-" + name)
        r["download"] = timed([*aws, "cp", "s3://%s/rel/app-2.bin" % bucket, out], env)
        with open(out, "rb") as f, open(v2, "rb") as g:
            assert f.read() == g.read(), "download differs"
        r["small"] = small_ops(url, key, secret, bucket)
        timed([*aws, "rb", "--force", "s3://" + bucket], env)
    print("| %d MiB file, aws-cli | direct | gateway | ratio |" % args.mib)
    print("|---|---|---|---|")
    for op in ("first upload", "later upload", "download"):
        d, g = results["direct"][op], results["gateway"][op]
        print(
            "| %s | %.2f s (%.0f MiB/s) | %.2f s (%.0f MiB/s) | %.2fx |"
            % (op, d, args.mib / d, g, args.mib / g, g / d)
        )
    d, g = results["direct"]["small"], results["gateway"]["small"]
    print("| 4 KiB put+get, 16 boto3 threads | %.0f req/s | %.0f req/s | %.2fx |" % (d, g, d / g))
    server.shutdown()
    server.server_close()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
