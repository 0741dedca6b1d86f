#!/usr/bin/env python3
"""Where references live (issue 15): stored bytes of real release layouts.

Uploads botocore 1.35.0-1.35.24 (25 wheels from PyPI, ~12.5 MB each) in three layouts and
reports the bytes each tool stores, with two oracles computed by xdelta3 with our flags:

- ``versions``: one folder per version, ``releases/<version>/botocore.whl``;
- ``one-folder``: all in one folder, ``wheels/botocore-<version>-py3-none-any.whl``;
- ``poisoned``: a 100 KB unrelated zip first, then the first 5 wheels, one folder.

Ours runs against a local directory store (stored bytes do not depend on the server), both
with ``DG_REFERENCES=shared`` (the default) and ``folder``; the original deltaglider 6.2.0
runs against a real S3 server (``--endpoint``, credentials from the environment); ``aws s3``
stores every file unchanged, so its figure is the files' total size. Every file we store is
read back and checked by SHA-256. Stored bytes are deterministic, so the figures hold on a
loaded machine; the request counts are per upload of a later version.

    python3 benchmarks/references.py --wheels DIR [--original-python PY] [--endpoint URL]

Writes the section "Where references live" of benchmarks/RESULTS.md (replacing it).
"""

import argparse
import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import deltaglider as dg  # noqa: E402

VERSIONS = ["1.35.%d" % i for i in range(25)]
SECTION = "## Where references live (issue 15)"
MB = 1e6


def wheels(folder):
    os.makedirs(folder, exist_ok=True)
    out = []
    for v in VERSIONS:
        name = "botocore-%s-py3-none-any.whl" % v
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder,
                 "botocore==%s" % v],
                check=True,
            )
        out.append(path)
    return out


def junk_zip(path):
    """A 100 KB zip of random bytes: unrelated to everything after it."""
    rng = random.Random(15)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("junk.bin", bytes(rng.getrandbits(8) for _ in range(100_000)))
    return path


def layouts(files, junk):
    return {
        "versions": [("releases/%s/botocore.whl" % v, f) for v, f in zip(VERSIONS, files)],
        "one-folder": [("wheels/" + os.path.basename(f), f) for f in files],
        "poisoned": [("poisoned/junk.zip", junk)]
        + [("poisoned/" + os.path.basename(f), f) for f in files[:5]],
    }


def sha(path):
    return dg._sha256_file(path)[0]


class Counting:
    """Counts the storage requests an upload makes."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name in ("head_object", "get_object", "put_object", "list_objects_v2",
                    "copy_object", "delete_object", "create_multipart_upload", "upload_part",
                    "complete_multipart_upload"):
            def call(*a, **k):
                self.calls.append(name)
                return attr(*a, **k)
            return call
        return attr


def ours(items, references, tmp):
    store = os.path.join(tmp, "store-" + references)
    shutil.rmtree(store, ignore_errors=True)
    c = dg.create_client(
        "file://" + store, cache_dir=os.path.join(tmp, "cache-" + references),
        references=references, environ={"PATH": os.environ.get("PATH", "")},
    )
    c.create_bucket(Bucket="bench")
    engine = c.engine
    counting = Counting(engine.storage)
    engine.storage = counting
    notes, requests = [], []
    for key, path in items:
        before = len(counting.calls)
        started = time.perf_counter()
        info = engine.put_file(path, "bench", key)
        took = time.perf_counter() - started
        requests.append(counting.calls[before:])
        notes.append((key, info["Operation"], info["StoredSize"], info.get("ReferenceSource"), took))
    engine.storage = counting.inner
    stored = sum(o["Size"] for o in _list(engine.storage, "bench"))
    engine.cache.clear()
    for key, path in items:
        out = os.path.join(tmp, "out")
        engine.get_to_file("bench", key, out)
        assert sha(out) == sha(path), key
        os.unlink(out)
    refs = [o["Key"] for o in _list(engine.storage, "bench") if o["Key"].endswith("reference.bin")]
    return stored, notes, requests, refs


def _list(storage, bucket):
    out, token = [], None
    while True:
        page = storage.list_objects_v2(bucket, continuation_token=token)
        out += page.get("Contents", [])
        if not page.get("IsTruncated"):
            return out
        token = page.get("NextContinuationToken")


ORIGINAL = r"""
import json, os, sys, pathlib, uuid, warnings
warnings.simplefilter("ignore")
from deltaglider import create_client
items = json.loads(sys.argv[1])
c = create_client(endpoint_url=os.environ["BENCH_ENDPOINT"], log_level="ERROR")
bucket = "dg-bench-" + uuid.uuid4().hex[:10]
c.service.storage.client.create_bucket(Bucket=bucket)
for key, path in items:
    c.put_object(Bucket=bucket, Key=key, Body=pathlib.Path(path))
s3 = c.service.storage.client
total, keys = 0, []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
    for o in page.get("Contents", []):
        total += o["Size"]; keys.append(o["Key"])
for k in keys:
    s3.delete_object(Bucket=bucket, Key=k)
s3.delete_bucket(Bucket=bucket)
print(json.dumps({"stored": total}))
"""


def original(items, python, endpoint, tmp):
    env = dict(os.environ, BENCH_ENDPOINT=endpoint, DG_SUPPRESS_DEPRECATION="1")
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    proc = subprocess.run(
        [python, "-c", ORIGINAL, json.dumps(items)], env=env, cwd=tmp,
        capture_output=True, text=True,
    )
    if proc.returncode:
        return None, proc.stderr.strip().splitlines()[-1:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["stored"], None


def oracles(files, tmp):
    x = dg._XDelta3(None)
    out = os.path.join(tmp, "o.delta")

    def d(a, b):
        x.encode(a, b, out)
        return os.path.getsize(out)

    first = os.path.getsize(files[0])
    prev = first + sum(d(files[i - 1], files[i]) for i in range(1, len(files)))
    against_first = first + sum(d(files[0], files[i]) for i in range(1, len(files)))
    return prev, against_first


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheels", default=os.path.expanduser("~/.cache/deltaglider-bench/botocore"))
    ap.add_argument("--original-python",
                    default=os.path.expanduser("~/.cache/deltaglider-ci/venv-dg620/bin/python"))
    ap.add_argument("--endpoint", default="http://127.0.0.1:19000")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = ap.parse_args()
    files = wheels(args.wheels)
    tmp = tempfile.mkdtemp(prefix="dg-refs-bench-")
    try:
        junk = junk_zip(os.path.join(tmp, "junk.zip"))
        report = {}
        for name, items in layouts(files, junk).items():
            plain = sum(os.path.getsize(p) for _, p in items)
            shared = ours(items, "shared", tmp)
            folder = ours(items, "folder", tmp)
            orig, why = (None, ["skipped"])
            if os.path.exists(args.original_python):
                orig, why = original(items, args.original_python, args.endpoint, tmp)
            report[name] = {"plain": plain, "shared": shared, "folder": folder,
                            "original": orig, "why": why}
            print(name, plain / MB, shared[0] / MB, folder[0] / MB,
                  orig / MB if orig else why, flush=True)
        prev, first = oracles(files, tmp)
        write(args.results, report, prev, first)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mb(n):
    return "%.1f MB" % (n / MB) if n is not None else "n/a"


def write(path, report, prev, first):
    goals = {"versions": 65e6, "one-folder": 65e6, "poisoned": 25e6}
    rows = [
        "| layout | aws s3 | deltaglider 6.2.0 | ours, `DG_REFERENCES=folder` | ours (default, "
        "shared) | goal |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report.items():
        ok = "met" if r["shared"][0] <= goals[name] else "MISSED"
        rows.append("| %s | %s | %s | %s | **%s** | ≤ %s (%s) |" % (
            name, mb(r["plain"]), mb(r["original"]), mb(r["folder"][0]),
            mb(r["shared"][0]), mb(goals[name]), ok))
    lines = [SECTION, "", "Measured by `python3 benchmarks/references.py` (stored bytes are "
             "deterministic; every file read back and checked by SHA-256). botocore "
             "1.35.0-1.35.24, 25 wheels, %s in all." % mb(report["versions"]["plain"]), "",
             *rows, "",
             "Oracles (xdelta3 with our flags, the 25 wheels): each version against the "
             "previous one %s; each against the first %s." % (mb(prev), mb(first)), ""]
    for name, r in report.items():
        refs = r["shared"][3]
        lines.append("- %s: %d reference(s): %s" % (
            name, len(refs), ", ".join("`%s`" % dg._shared_ref_source(k)
                                       if dg._is_shared_ref(k) else "`%s`" % k for k in refs)))
    req = report["versions"]["shared"][2][-1]
    req_folder = report["one-folder"]["folder"][2][-1]
    lines += ["", "Requests for the upload of the last version (reference cached): shared "
              "(one folder per version) %d (%s); folder layout, one folder, %d (%s)." % (
                  len(req), ", ".join(req), len(req_folder), ", ".join(req_folder)), ""]
    late_shared = report["one-folder"]["shared"][1][-1][4]
    late_folder = report["one-folder"]["folder"][1][-1][4]
    lines += ["Time of the last version's upload, one folder (a loaded 2-core machine; the "
              "stored bytes above are what this run is for): shared %.2f s, folder %.2f s."
              % (late_shared, late_folder), ""]
    note = [n for n in report["versions"]["shared"][1]][1]
    lines += ["Upload of 1.35.1 into its own folder: %s, %s stored, against `%s`." % (
        note[1], mb(note[2]), note[3]), ""]
    text = open(path).read() if os.path.exists(path) else ""
    text = re.sub(r"\n%s\n.*?(?=\n## |\Z)" % re.escape(SECTION), "", text, flags=re.S)
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
