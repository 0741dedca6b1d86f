#!/usr/bin/env python3
"""Throughput of `deltaglider serve`: aws-cli and boto3 through the gateway vs the back end.

    python benchmarks/gateway/gateway_bench.py [--aws PATH] [--mib 32] [--reps 3]
        [--backend seaweedfs|swift] [--endpoint-url URL --access-key K --secret-key S]
        [--against OTHER/deltaglider.py ...]

The gateway runs as users run it, in its own process:
``python deltaglider.py --endpoint-url <backend> serve --listen 127.0.0.1:PORT``.
Each repetition measures, direct to the back end and through the gateway (and through a
gateway of each ``--against``, for an A/B of versions), interleaved so the machine's
load falls on all of them alike:
  - `aws s3 cp` upload of a first version, a later version (a delta through the gateway),
    and the download of the later version (wall time of the aws process, MiB/s);
  - small objects: 4 KiB PutObject + GetObject from 16 boto3 threads (requests/s).
Prints the medians as a Markdown table, with the load average (benchmarks/gateway/RESULTS.md
keeps one run's output).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from typing import Any

import boto3
from botocore.config import Config

HERE = os.path.dirname(os.path.abspath(__file__))
DELTAGLIDER = os.path.join(HERE, "..", "..", "deltaglider.py")
BACKENDS = {
    "seaweedfs": (
        "http://127.0.0.1:19100",
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    "swift": ("http://127.0.0.1:19000", "test:tester", "testing"),
}
OPS = ("first upload", "later upload", "download")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(
    program: str, backend: tuple[str, str, str], tmp: str, name: str
) -> tuple[subprocess.Popen[bytes], str]:
    """``deltaglider serve`` in its own process, its own cache, with the key pair bench."""
    url, key, secret = backend
    port = free_port()
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=key,
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        DG_CACHE_DIR=os.path.join(tmp, "cache-" + name),
        DG_GATEWAY_ACCESS_KEY_ID="bench",
        DG_GATEWAY_SECRET_ACCESS_KEY="bench-secret",
    )
    cmd = [sys.executable, program, "--endpoint-url", url, "serve", "--quiet"]
    log = open(os.path.join(tmp, "gateway-%s.log" % name), "wb")
    proc = subprocess.Popen([*cmd, "--listen", "127.0.0.1:%d" % port], env=env, stderr=log)
    gw = "http://127.0.0.1:%d" % port
    for _ in range(300):
        try:
            urllib.request.urlopen(gw + "/", timeout=1)
        except urllib.error.HTTPError:
            break  # it answers (403: no signature)
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("gateway %s did not start (%s)" % (name, log.name)) from None
            time.sleep(0.1)
    return proc, gw


def one_round(
    aws: str, target: tuple[str, str, str], v1: str, v2: str, tmp: str, rep: int
) -> dict[str, float]:
    url, key, secret = target
    bucket = "dg-gwbench-" + uuid.uuid4().hex[:8]
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=key,
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    cli = [aws, "--endpoint-url", url, "s3"]
    timed([*cli, "mb", "s3://" + bucket], env)
    r = {}
    r["first upload"] = timed([*cli, "cp", v1, "s3://%s/rel/app-1.tar" % bucket], env)
    r["later upload"] = timed([*cli, "cp", v2, "s3://%s/rel/app-2.tar" % bucket], env)
    out = os.path.join(tmp, "out-%d" % rep)
    r["download"] = timed([*cli, "cp", "s3://%s/rel/app-2.tar" % bucket, out], env)
    with open(out, "rb") as f, open(v2, "rb") as g:
        assert f.read() == g.read(), "download differs"
    os.unlink(out)
    r["small"] = small_ops(url, key, secret, bucket)
    timed([*cli, "rb", "--force", "s3://" + bucket], env)
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--aws", default=os.environ.get("DG_TEST_AWS") or shutil.which("aws"))
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", choices=sorted(BACKENDS), default="seaweedfs")
    ap.add_argument("--endpoint-url")
    ap.add_argument("--access-key")
    ap.add_argument("--secret-key")
    ap.add_argument(
        "--against",
        action="append",
        default=[],
        help="another deltaglider.py to serve a gateway of its own beside (A/B); repeatable, "
        "each named by its file name",
    )
    ap.add_argument("--no-direct", action="store_true", help="gateways only (an A/B)")
    args = ap.parse_args()
    url, key, secret = BACKENDS[args.backend]
    backend = (args.endpoint_url or url, args.access_key or key, args.secret_key or secret)
    tmp = tempfile.mkdtemp(prefix="dg-gwbench-")
    v1, v2 = make_versions(tmp, args.mib)
    targets: dict[str, tuple[str, str, str]] = {} if args.no_direct else {"direct": backend}
    procs = []
    programs = {"gateway": DELTAGLIDER}
    for other in args.against:
        programs[os.path.splitext(os.path.basename(other))[0]] = other
    for name, program in programs.items():
        proc, gw = start_gateway(program, backend, tmp, name)
        procs.append(proc)
        targets[name] = (gw, "bench", "bench-secret")
    loads = [os.getloadavg()[0]]
    results: dict[str, dict[str, list[float]]] = {n: {} for n in targets}
    try:
        for rep in range(args.reps):
            order = list(targets) if rep % 2 == 0 else list(reversed(targets))
            for name in order:
                for op, value in one_round(args.aws, targets[name], v1, v2, tmp, rep).items():
                    results[name].setdefault(op, []).append(value)
            loads.append(os.getloadavg()[0])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    med: dict[str, dict[str, Any]] = {
        n: {op: statistics.median(v) for op, v in r.items()} for n, r in results.items()
    }
    base = "direct" if "direct" in med else list(med)[-1]
    others = [n for n in med if n != base]
    print(
        "%s back end, %d MiB file, medians of %d, load average %.1f-%.1f"
        % (args.backend, args.mib, args.reps, min(loads), max(loads))
    )
    print()
    print("| aws-cli | %s | ratio |" % " | ".join([base, *others]))
    print("|---|%s" % ("---|" * (len(others) + 2)))
    for op in OPS:
        cells = [
            "%.2f s (%.1f MiB/s)" % (med[n][op], args.mib / med[n][op]) for n in [base, *others]
        ]
        ratios = "/".join("%.2fx" % (med[n][op] / med[base][op]) for n in others)
        print("| %s | %s | %s |" % (op, " | ".join(cells), ratios))
    cells = ["%.0f req/s" % med[n]["small"] for n in [base, *others]]
    ratios = "/".join("%.2fx" % (med[base]["small"] / med[n]["small"]) for n in others)
    print("| 4 KiB put+get, 16 boto3 threads | %s | %s |" % (" | ".join(cells), ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
