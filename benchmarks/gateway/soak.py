#!/usr/bin/env python3
"""Soak `deltaglider serve`: N boto3 clients doing mixed uploads and downloads for S seconds.

    python benchmarks/gateway/soak.py [--clients 32] [--seconds 60] [--endpoint-url file:///tmp/x | http://...]

Starts a gateway (in this process, on 127.0.0.1) in front of the back end, then each client
thread loops: upload a new version of one of its own artifacts (a zip-like file with a small
change, so most uploads become deltas), download it back and compare SHA-256, download a
shared artifact written at the start and compare, list its prefix. Every mismatch, every
error and the final state of every key are reported; exit 1 if anything was lost or corrupt.
Not a CI test (it runs for a minute); the figures go into the benchmark notes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import boto3
from botocore.config import Config

import deltaglider as dg


def artifact(seed: int, version: int, size: int) -> bytes:
    rng = random.Random(seed)
    base = bytearray(rng.getrandbits(8) for _ in range(4096)) * (size // 4096)
    at = (version * 7919) % (len(base) - 16)
    base[at : at + 8] = b"v%07d" % version
    return bytes(base)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", type=int, default=256 * 1024)
    ap.add_argument("--endpoint-url", default=None, help="back end (default: a temp folder)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="dg-soak-")
    endpoint = args.endpoint_url or "file://" + os.path.join(tmp, "store")
    client = dg.create_client(endpoint_url=endpoint, cache_dir=os.path.join(tmp, "cache"))
    users = dg._GatewayUsers({"soak": "soak-secret"})
    gateway = dg._Gateway(client, dg._GatewayAuth(users), state_dir=os.path.join(tmp, "state"))
    server = dg._GatewayServer(("127.0.0.1", 0), gateway, workers=64)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def s3() -> Any:
        return boto3.client(
            "s3",
            endpoint_url=server.url,
            aws_access_key_id="soak",
            aws_secret_access_key="soak-secret",
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, max_pool_connections=4),
        )

    bucket = "dg-soak-" + os.urandom(4).hex()
    setup = s3()
    setup.create_bucket(Bucket=bucket)
    shared = artifact(1, 0, args.size)
    setup.put_object(Bucket=bucket, Key="shared/base.bin", Body=shared)
    shared_sha = hashlib.sha256(shared).hexdigest()

    lock = threading.Lock()
    stats = {"put": 0, "get": 0, "list": 0, "bytes_in": 0, "bytes_out": 0}
    problems: list[str] = []
    final: dict[str, str] = {}
    deadline = time.monotonic() + args.seconds

    def worker(n: int) -> None:
        c = s3()
        version = 0
        key = "c%02d/app.bin" % n
        while time.monotonic() < deadline:
            version += 1
            data = artifact(100 + n, version, args.size)
            want = hashlib.sha256(data).hexdigest()
            try:
                c.put_object(Bucket=bucket, Key=key, Body=data)
                got = c.get_object(Bucket=bucket, Key=key)["Body"].read()
                if hashlib.sha256(got).hexdigest() != want:
                    with lock:
                        problems.append("%s v%d: read back other bytes" % (key, version))
                other = c.get_object(Bucket=bucket, Key="shared/base.bin")["Body"].read()
                if hashlib.sha256(other).hexdigest() != shared_sha:
                    with lock:
                        problems.append("shared/base.bin corrupt on read by client %d" % n)
                c.list_objects_v2(Bucket=bucket, Prefix="c%02d/" % n)
                with lock:
                    stats["put"] += 1
                    stats["get"] += 2
                    stats["list"] += 1
                    stats["bytes_in"] += len(data)
                    stats["bytes_out"] += len(got) + len(other)
                    final[key] = want
            except Exception as e:  # counted, never hidden
                with lock:
                    problems.append("%s v%d: %s" % (key, version, e))

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    check = s3()
    for key, want in sorted(final.items()):
        got = check.get_object(Bucket=bucket, Key=key)["Body"].read()
        if hashlib.sha256(got).hexdigest() != want:
            problems.append("%s: final content is not the last version written" % key)
    stored = client.storage.list_objects_v2(bucket).get("Contents", [])
    stored_bytes = sum(o["Size"] for o in stored)
    ops = stats["put"] + stats["get"] + stats["list"]
    print(
        "%d clients, %.0f s: %d uploads, %d downloads, %d listings (%.1f requests/s); "
        "%.1f MiB in, %.1f MiB out (%.1f MiB/s); %d objects stored in %.1f MiB; %d problems"
        % (
            args.clients,
            elapsed,
            stats["put"],
            stats["get"],
            stats["list"],
            ops / elapsed,
            stats["bytes_in"] / 2**20,
            stats["bytes_out"] / 2**20,
            (stats["bytes_in"] + stats["bytes_out"]) / 2**20 / elapsed,
            len(stored),
            stored_bytes / 2**20,
            len(problems),
        )
    )
    for p in problems[:20]:
        print("  " + p)
    server.shutdown()
    server.drain(10)
    server.server_close()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
