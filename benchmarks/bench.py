#!/usr/bin/env python3
"""deltaglider benchmark: ours vs deltaglider==6.2.0 vs `aws s3` on a real S3 server.

Stdlib only (Python 3.8+). See benchmarks/README section in the top-level README and
`python3 benchmarks/bench.py --help`. Writes benchmarks/RESULTS.md and benchmarks/results.json
(--small, the CI run: CACHE/results-small/, leaving the tracked files alone).

Exit status: non-zero only if OUR tool crashed or returned wrong bytes (or the harness itself
could not run). Slow figures and missed targets are reported, never fatal.
"""
import argparse
import concurrent.futures
import copy
import datetime
import gzip
import hashlib
import hmac
import http.client
import io
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OURS = os.path.join(REPO, "deltaglider.py")
MiB = 1024 * 1024

AK, SK, REGION = "test:tester", "testing", "us-east-1"
#: Series of zip-family files, where the archive-aware mode (ours-aa) also runs.
ARCHIVE_SERIES = ("whl", "zip", "awscli", "jar")
#: Series where ours also runs as `python -m deltaglider` (ours-m: bytecode cached, as the
#: installed console script runs it, and as the original always runs).
MODULE_SERIES = ("zip",)


def log(msg):
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


# --------------------------------------------------------------------------- raw S3 (SigV4)
class RawS3:
    """Just enough S3 to create buckets, list raw keys with sizes, and delete; independent
    of every tool under test."""

    def __init__(self, endpoint, ak=AK, sk=SK):
        u = urllib.parse.urlsplit(endpoint)
        self.host, self.port = u.hostname, u.port or 80
        self.netloc = u.netloc
        self.ak, self.sk = ak, sk
        self._local = threading.local()

    def request(self, method, path, query=(), body=b"", headers=None, keep=False):
        """One signed request; ``headers`` are sent and signed; ``keep``: reuse this
        thread's connection (many small requests)."""
        t = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        payload = hashlib.sha256(body).hexdigest()
        h = {"host": self.netloc, "x-amz-content-sha256": payload, "x-amz-date": t}
        h.update({k.lower(): v for k, v in (headers or {}).items()})
        q = "&".join(
            "%s=%s" % (urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~"))
            for k, v in sorted(query)
        )
        cpath = urllib.parse.quote(path, safe="/-_.~")
        names = sorted(h)
        creq = "\n".join([method, cpath, q, "".join("%s:%s\n" % (k, h[k]) for k in names),
                          ";".join(names), payload])
        scope = "%s/%s/s3/aws4_request" % (t[:8], REGION)
        sts = "\n".join(["AWS4-HMAC-SHA256", t, scope, hashlib.sha256(creq.encode()).hexdigest()])
        k = ("AWS4" + self.sk).encode()
        for part in (t[:8], REGION, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
        h["authorization"] = "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
            self.ak, scope, ";".join(names), sig)
        c = getattr(self._local, "conn", None) if keep else None
        if c is None:
            c = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            c.request(method, cpath + ("?" + q if q else ""), body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            if keep and not r.will_close:
                self._local.conn, c = c, None
            return r.status, data
        finally:
            if c is not None:
                c.close()
                if keep:
                    self._local.conn = None

    def make_bucket(self, bucket):
        st, data = self.request("PUT", "/" + bucket)
        if st not in (200, 409):
            raise RuntimeError("create bucket %s: %s %s" % (bucket, st, data[:300]))

    def list(self, bucket, prefix=""):
        out, token = [], None
        while True:
            q = [("list-type", "2"), ("prefix", prefix)]
            if token:
                q.append(("continuation-token", token))
            st, data = self.request("GET", "/" + bucket, q)
            if st != 200:
                raise RuntimeError("list %s: %s %s" % (bucket, st, data[:300]))
            root = ET.fromstring(data)
            ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
            for c in root.findall(ns + "Contents"):
                out.append((c.find(ns + "Key").text, int(c.find(ns + "Size").text)))
            if (root.findtext(ns + "IsTruncated") or "false") != "true":
                return out
            token = root.findtext(ns + "NextContinuationToken")

    def delete_prefix(self, bucket, prefix):
        for key, _ in self.list(bucket, prefix):
            self.request("DELETE", "/%s/%s" % (bucket, key))


# --------------------------------------------------------------------------- process runner
def _vmhwm(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_rss(pid):
    """Summed RSS of a process and all its descendants, now (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open("/proc/%d/statm" % p) as f:
                total += int(f.read().split()[1]) * PAGE
            for tid in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, tid)) as f:
                    todo += [int(x) for x in f.read().split()]
        except (OSError, ValueError, IndexError):
            pass
    return total


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Result:
    def __init__(self, rc, secs, py_rss, tree_rss, out, err):
        self.rc, self.secs, self.py_rss, self.tree_rss, self.out, self.err = rc, secs, py_rss, tree_rss, out, err


def run(cmd, env, cwd=None, timeout=3600):
    """Run one command; return wall seconds, the process's own peak RSS (VmHWM polled from
    /proc, children such as xdelta3 excluded) and the tree's: the peak of the RSS summed
    over the process and all its descendants (polled every 10 ms; at least the process's
    own VmHWM)."""
    fo, fe = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
    peak = [0]
    tree = [0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _vmhwm(p.pid))
            tree[0] = max(tree[0], _tree_rss(p.pid))
            done.wait(0.01)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    deadline = time.time() + timeout
    while True:
        # peek without reaping so the final VmHWM can still be read from the zombie-to-be
        try:
            info = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            info = None
        if info is not None and info.si_pid:
            break
        if time.time() > deadline:
            p.kill()
        time.sleep(0.002)
    secs = time.perf_counter() - t0
    done.set()
    th.join()
    peak[0] = max(peak[0], _vmhwm(p.pid))
    _, status, _ = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else (  # novermin
        -(status & 0x7F) if status & 0x7F else status >> 8)
    fo.seek(0), fe.seek(0)
    out, err = fo.read().decode("utf-8", "replace"), fe.read().decode("utf-8", "replace")
    fo.close(), fe.close()
    # Not wait4's ru_maxrss: a child started by vfork (subprocess's way on Linux) has it
    # counted from the parent's memory at exec, so every tool would read at least this
    # script's own peak RSS (160 MiB once the big files have been hashed).
    return Result(p.returncode, secs, peak[0], max(tree[0], peak[0]), out, err)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(4 * MiB), b""):
            h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------- corpus
def _fetch_pypi(project, version, kind, dest_dir, seed_dirs):
    """One file of project==version: 'wheel' or 'sdist'. Reused from the cache or a seed
    folder when present, else `pip download --no-deps` (falls back to PyPI's JSON API)."""
    os.makedirs(dest_dir, exist_ok=True)
    suffix = "-py3-none-any.whl" if kind == "wheel" else ".tar.gz"
    name = "%s-%s%s" % (project, version, suffix)
    dest = os.path.join(dest_dir, name)
    if os.path.exists(dest):
        return dest
    for sd in seed_dirs:
        for root, _, files in os.walk(sd):
            if name in files:
                shutil.copyfile(os.path.join(root, name), dest + ".part")
                os.replace(dest + ".part", dest)
                return dest
    with tempfile.TemporaryDirectory(dir=dest_dir) as td:
        flag = ["--only-binary", ":all:"] if kind == "wheel" else ["--no-binary", ":all:"]
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *flag,
                            "-d", td, "%s==%s" % (project, version)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        got = [f for f in os.listdir(td) if f.endswith(".whl" if kind == "wheel" else suffix)]
        if r.returncode == 0 and got:
            os.replace(os.path.join(td, got[0]), dest)
            return dest
        log("pip download %s==%s failed (%s); trying PyPI JSON" % (project, version,
                                                                   r.stdout.decode()[-200:]))
        meta = json.load(urllib.request.urlopen("https://pypi.org/pypi/%s/%s/json" % (project, version)))
        for u in meta["urls"]:
            if u["filename"] == name:
                urllib.request.urlretrieve(u["url"], dest + ".part")
                os.replace(dest + ".part", dest)
                return dest
    raise RuntimeError("could not fetch %s" % name)


def _py4j_jar(version, dest_dir, seeds):
    """py4j's jar for one version, taken out of its wheel from PyPI."""
    path = os.path.join(dest_dir, "py4j-%s.jar" % version)
    if not os.path.exists(path):
        wheel = _fetch_pypi("py4j", version, "wheel", os.path.join(dest_dir, "wheels"), seeds)
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(".jar"))
            with open(path + ".part", "wb") as f:
                f.write(z.read(name))
        os.replace(path + ".part", path)
    return path


def _gunzip(src, dest):
    if not os.path.exists(dest):
        with gzip.open(src, "rb") as fi, open(dest + ".part", "wb") as fo:
            shutil.copyfileobj(fi, fo, 4 * MiB)
        os.replace(dest + ".part", dest)
    return dest


def _synthetic_big(folder, size, rnd_seed=7):
    """v1: pseudo-random bytes; v2: v1 with scattered 4 KiB overwrites, some small inserts and
    deletes (so offsets shift), and 1 MiB appended."""
    os.makedirs(folder, exist_ok=True)
    tag = "%dM" % (size // MiB)
    v1 = os.path.join(folder, "big-%s-v1.img" % tag)
    v2 = os.path.join(folder, "big-%s-v2.img" % tag)
    if os.path.exists(v1) and os.path.exists(v2):
        return [v1, v2]
    rng = random.Random(rnd_seed)
    chunk = 16 * MiB
    with open(v1 + ".part", "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
    os.replace(v1 + ".part", v1)
    edits = sorted(rng.randrange(0, size - 8192) for _ in range(max(8, size // (32 * MiB))))
    with open(v1, "rb") as fi, open(v2 + ".part", "wb") as fo:
        pos = 0
        for i, off in enumerate(edits):
            if off < pos:
                continue
            while pos < off:
                n = min(chunk, off - pos)
                fo.write(fi.read(n))
                pos += n
            kind = i % 3
            if kind == 0:      # overwrite 4 KiB
                fo.write(os.urandom(4096)); fi.seek(4096, 1); pos += 4096
            elif kind == 1:    # insert 100 bytes
                fo.write(os.urandom(100))
            else:              # delete 100 bytes
                fi.seek(100, 1); pos += 100
        shutil.copyfileobj(fi, fo, chunk)
        fo.write(os.urandom(MiB))
    os.replace(v2 + ".part", v2)
    return [v1, v2]


def _noise(seed, n):
    """n deterministic pseudo-random bytes (the same on every machine and Python)."""
    return hashlib.shake_256(b"deltaglider-bench %s" % str(seed).encode()).digest(n)


def _synthetic_image(folder, size, rnd_seed=5):
    """#17's pair, generated deterministically: a disk-image-like v1 (random, zero and
    text stretches) and v2 with five 64 KiB regions overwritten in place."""
    os.makedirs(folder, exist_ok=True)
    tag = "%dM" % (size // MiB)
    v1 = os.path.join(folder, "image-%s-v1.img" % tag)
    v2 = os.path.join(folder, "image-%s-v2.img" % tag)
    if os.path.exists(v1) and os.path.exists(v2):
        return [v1, v2]
    rng = random.Random(rnd_seed)
    with open(v1 + ".part", "wb") as f:
        left, i = size, 0
        while left:
            text = ((b"line of text %d\n" % i) * (MiB // 10))[:MiB]
            block = _noise((rnd_seed, i), 2 * MiB) + bytes(MiB) + text
            f.write(block[:left])
            left -= min(left, len(block))
            i += 1
    os.replace(v1 + ".part", v1)
    shutil.copyfile(v1, v2 + ".part")
    with open(v2 + ".part", "r+b") as f:
        for n, off in enumerate(sorted(rng.randrange(0, size - 65536) for _ in range(5))):
            f.seek(off)
            f.write(_noise((rnd_seed, "edit", n), 65536))
    os.replace(v2 + ".part", v2)
    return [v1, v2]


def _small_files(folder, count):
    if os.path.isdir(folder) and sum(len(f) for _, _, f in os.walk(folder)) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = random.Random(11)
    words = [("w%d" % i).encode() for i in range(500)]
    for i in range(count):
        sub = os.path.join(folder, "d%d" % (i % 5))
        os.makedirs(sub, exist_ok=True)
        size = rng.choice([200, 1000, 4000, 16000, 60000])
        ext = [".txt", ".json", ".py", ".md"][i % 4]
        with open(os.path.join(sub, "f%03d%s" % (i, ext)), "wb") as f:
            f.write(b" ".join(rng.choice(words) for _ in range(size // 4))[:size])
    return folder


def _site_tree(folder, count):
    """#17's many-files tree: a web-site build of ``count`` files, .js/.css/.json/.txt/.html/.map
    of 1-50 KB (most near 6 KB) in 13 folders, plus count/100 (at least 3) small
    .zip/.jar/.whl releases of one package (delta-eligible: each changes one module)."""
    stamp = folder.rstrip("/") + ".complete"  # beside the tree, not in it
    if os.path.exists(stamp):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = random.Random(17)
    words = ["function", "return", "const", "var", "let", "class", "export", "import", "div", "span",
             "color", "margin", "padding", "true", "false", "null", "value", "items", "data", "name"]
    words += ["w%d" % i for i in range(300)]

    def text(size):
        out, n = [], 0
        while n < size:
            w = rng.choice(words)
            out.append(w + ("\n" if rng.random() < 0.08 else ""))
            n += len(w) + 1
        return " ".join(out)[:size].encode()

    dirs = ["", "assets/js/", "assets/css/", "assets/img/", "docs/", "docs/api/", "docs/guide/",
            "static/", "static/vendor/", "data/", "i18n/", "blog/2024/", "blog/2025/"]
    exts = [".js", ".css", ".json", ".txt", ".html", ".html", ".js", ".map"]
    n_arch = max(3, count // 100)
    for i in range(count - n_arch):
        d = os.path.join(folder, rng.choice(dirs))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%04d%s" % (i, rng.choice(exts))), "wb") as f:
            f.write(text(int(rng.triangular(1024, 50 * 1024, 6 * 1024))))
    d = os.path.join(folder, "downloads")
    os.makedirs(d, exist_ok=True)
    members = [text(rng.randint(2000, 30000)) for _ in range(8)]
    for j in range(n_arch):
        members[j % 8] = text(rng.randint(2000, 30000))  # each release changes one module
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for m, data in enumerate(members):
                z.writestr(zipfile.ZipInfo("pkg/mod%d.py" % m, date_time=(2026, 1, 1, 0, 0, 0)), data)
        with open(os.path.join(d, "pkg-1.%d%s" % (j, [".zip", ".jar", ".whl"][j % 3])), "wb") as f:
            f.write(buf.getvalue())
    open(stamp, "w").close()
    return folder


def _synthetic_zips(folder, n, size, deflated=False, ext=".zip"):
    """n consecutive 'releases': zips of the same text/binary members with small changes
    (stored, or deflated as jars and wheels are)."""
    method = zipfile.ZIP_DEFLATED if deflated else zipfile.ZIP_STORED
    os.makedirs(folder, exist_ok=True)
    out = []
    rng = random.Random(3)
    members = [(("pkg/m%03d.py" % i), os.urandom(size // 80) if i % 4 == 0 else
                b"\n".join(b"def f%d_%d(): return %d" % (i, j, rng.randrange(10**6))
                           for j in range(size // 80 // 30))) for i in range(40)]
    for v in range(n):
        path = os.path.join(folder, "app-1.0.%d%s" % (v, ext))
        out.append(path)
        if os.path.exists(path):
            continue
        rng2 = random.Random(100 + v)
        with zipfile.ZipFile(path + ".part", "w", zipfile.ZIP_DEFLATED) as z:
            for i, (name, data) in enumerate(members):
                if v and rng2.random() < 0.15:
                    data = data + b"\n# changed in v%d\n" % v
                    members[i] = (name, data)
                z.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), data, compress_type=method)
            z.writestr(zipfile.ZipInfo("VERSION", (2024, 1, 1, 0, 0, 0)), b"1.0.%d\n" % v,
                       compress_type=method)
        os.replace(path + ".part", path)
    return out


def build_corpus(args):
    base = os.path.join(args.cache, "corpus-small" if args.small else "corpus")
    seeds = [s for s in (args.seed_corpus or []) if os.path.isdir(s)]
    series = {}
    if args.small:
        zips = _synthetic_zips(os.path.join(base, "zip"), 3, 2 * MiB)
        series["zip"] = zips
        tdir = os.path.join(base, "tar")
        os.makedirs(tdir, exist_ok=True)
        tars = []
        for z in zips:  # tar of the zip's members, uncompressed
            t = os.path.join(tdir, os.path.basename(z)[:-4] + ".tar")
            if not os.path.exists(t):
                import tarfile
                with zipfile.ZipFile(z) as zf, tarfile.open(t + ".part", "w", format=tarfile.GNU_FORMAT) as tf:
                    for zi in zf.infolist():
                        ti = tarfile.TarInfo(zi.filename)
                        data = zf.read(zi)
                        ti.size, ti.mtime = len(data), 1704067200
                        import io as _io
                        tf.addfile(ti, _io.BytesIO(data))
                os.replace(t + ".part", t)
            tars.append(t)
        series["tar"] = tars
        series["jar"] = _synthetic_zips(os.path.join(base, "jar"), 3, 2 * MiB, True, ".jar")
    else:
        vers = ["%s%d" % (args.botocore_prefix, i) for i in range(args.versions)]
        log("corpus: botocore %s .. %s (wheels + sdists)" % (vers[0], vers[-1]))
        whls = [_fetch_pypi("botocore", v, "wheel", os.path.join(base, "whl"), seeds) for v in vers]
        sdists = [_fetch_pypi("botocore", v, "sdist", os.path.join(base, "tgz"), seeds) for v in vers]
        zdir = os.path.join(base, "zip")
        os.makedirs(zdir, exist_ok=True)
        zips = []
        for w, v in zip(whls, vers):
            z = os.path.join(zdir, "botocore-%s.zip" % v)
            if not os.path.exists(z):
                shutil.copyfile(w, z)
            zips.append(z)
        tdir = os.path.join(base, "tar")
        os.makedirs(tdir, exist_ok=True)
        tars = [_gunzip(s, os.path.join(tdir, os.path.basename(s)[:-3])) for s in sdists]
        series.update({"whl": whls, "zip": zips, "tgz": sdists, "tar": tars})
        # Zip-family series for archive-aware mode (#9): awscli wheels (members deflated by
        # zlib, small changes), and py4j's jar, shipped inside its wheels on PyPI.
        log("corpus: awscli %s, py4j %s" % (", ".join(args.awscli), ", ".join(args.py4j)))
        series["awscli"] = [_fetch_pypi("awscli", v, "wheel", os.path.join(base, "awscli"), seeds)
                            for v in args.awscli]
        series["jar"] = [_py4j_jar(v, os.path.join(base, "jar"), seeds) for v in args.py4j]
    series["img"] = _synthetic_image(os.path.join(base, "img"), args.image_mib * MiB)
    series["big"] = _synthetic_big(os.path.join(base, "big"), args.big_mib * MiB)
    small = _small_files(os.path.join(base, "small"), args.small_files)
    args.tree_dir = _site_tree(os.path.join(base, "tree%d" % args.tree_files), args.tree_files)
    return series, small


# --------------------------------------------------------------------------- tools
class Tool:
    def __init__(self, name, argv, env, label, cp_extra=()):
        self.name, self.argv, self.env, self.label = name, argv, env, label
        self.cp = ["cp", *cp_extra]

    def up(self, path, bucket, prefix):
        return self.argv + self.cp + [path, "s3://%s/%s%s" % (bucket, prefix, os.path.basename(path))]

    def down(self, bucket, prefix, name, dest):
        return self.argv + self.cp + ["s3://%s/%s%s" % (bucket, prefix, name), dest]

    def up_r(self, folder, bucket, prefix):
        return self.argv + ["cp", "--recursive", folder, "s3://%s/%s" % (bucket, prefix)]

    def ls_r(self, bucket, prefix):
        return self.argv + ["ls", "--recursive", "s3://%s/%s" % (bucket, prefix)]

    def sync_up(self, folder, bucket, prefix):
        return self.argv + ["sync", folder, "s3://%s/%s" % (bucket, prefix)]

    def version(self):
        return self.argv + ["--version"]


def make_tools(args, endpoint, tmp):
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DG_", "PYTHON"))}
    base_env.update({"AWS_ACCESS_KEY_ID": AK, "AWS_SECRET_ACCESS_KEY": SK, "AWS_DEFAULT_REGION": REGION,
                     "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
                     "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
    tools, notes = [], []
    env = dict(base_env, DG_CACHE_DIR=os.path.join(tmp, "dg-cache-ours"))
    py = ours_python(args)
    tools.append(Tool("ours", [py, OURS, "--endpoint-url", endpoint], env,
                      "deltaglider.py (this repo)", ["--no-progress"]))
    env = dict(base_env, DG_CACHE_DIR=os.path.join(tmp, "dg-cache-ours-aa"), DG_ARCHIVE_AWARE="1")
    tools.append(Tool("ours-aa", [py, OURS, "--endpoint-url", endpoint], env,
                      "deltaglider.py with DG_ARCHIVE_AWARE=1 (zip-family series only)", ["--no-progress"]))
    # `python deltaglider.py` compiles the whole script on every run (a script gets no cached
    # bytecode); an installed `deltaglider` command, like the original's, imports it cached.
    env = dict(base_env, DG_CACHE_DIR=os.path.join(tmp, "dg-cache-ours-m"), PYTHONPATH=REPO)
    tools.append(Tool("ours-m", [py, "-m", "deltaglider", "--endpoint-url", endpoint], env,
                      "`python -m deltaglider` (bytecode cached, as the installed command runs it; "
                      "%s series only)" % "/".join(MODULE_SERIES), ["--no-progress"]))
    if "original" not in args.skip:
        venv = args.original_venv or os.path.join(args.cache, "venv-dg620")
        exe = os.path.join(venv, "bin", "deltaglider")
        if not os.path.exists(exe):
            exe = _install_venv(venv, "deltaglider==6.2.0", "deltaglider", notes)
        if exe:
            env = dict(base_env, DG_SUPPRESS_DEPRECATION="1", DG_DISABLE_EC2_DETECTION="1",
                       DG_LOG_LEVEL="WARNING", DG_METRICS="noop")
            tools.append(Tool("original", [exe], env, "deltaglider 6.2.0"))
    if "awscli" not in args.skip:
        venv = args.awscli_venv or os.path.join(args.cache, "venv-awscli")
        exe = os.path.join(venv, "bin", "aws")
        if not os.path.exists(exe):
            exe = _install_venv(venv, "awscli", "aws", notes)
        if exe:
            env = dict(base_env, AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
                       AWS_RESPONSE_CHECKSUM_VALIDATION="when_required")
            tools.append(Tool("awscli", [exe, "s3", "--endpoint-url", endpoint], env,
                              "aws s3 (awscli, plain storage)", ["--no-progress"]))
            tools[-1].version = lambda exe=exe: [exe, "--version"]
            tools[-1].up_r = lambda folder, b, p, exe=exe: [exe, "s3", "--endpoint-url", endpoint, "cp",
                                                           "--recursive", "--only-show-errors", folder,
                                                           "s3://%s/%s" % (b, p)]
            tools[-1].ls_r = lambda b, p, exe=exe: [exe, "s3", "--endpoint-url", endpoint, "ls",
                                                   "--recursive", "s3://%s/%s" % (b, p)]
            tools[-1].sync_up = lambda folder, b, p, exe=exe: [exe, "s3", "--endpoint-url", endpoint, "sync",
                                                              "--only-show-errors", folder,
                                                              "s3://%s/%s" % (b, p)]
    for t in tools:
        if t.name.startswith("ours"):
            t.up_r = (lambda folder, b, p, t=t: t.argv + ["cp", "-r", "--only-show-errors", folder,
                                                        "s3://%s/%s" % (b, p)])
            t.ls_r = lambda b, p, t=t: t.argv + ["ls", "-r", "s3://%s/%s" % (b, p)]
            t.sync_up = (lambda folder, b, p, t=t: t.argv + ["sync", "--only-show-errors", folder,
                                                           "s3://%s/%s" % (b, p)])
            t.version = lambda t=t: [t.argv[0], OURS, "--version"]
        if t.name == "original":
            t.up_r = lambda folder, b, p, t=t: t.argv + ["cp", "-r", "-q", folder.rstrip("/") + "/",
                                                        "s3://%s/%s" % (b, p)]
            t.sync_up = lambda folder, b, p, t=t: t.argv + ["sync", "-q", folder.rstrip("/") + "/",
                                                           "s3://%s/%s" % (b, p)]
    return tools, notes


def ours_python(args):
    """A bare venv (no packages, no site-packages .pth hooks) of this interpreter: what a user
    running `python3 deltaglider.py` has, without the host's site customisations."""
    venv = os.path.join(args.cache, "venv-ours")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r.returncode != 0:
            return sys.executable
    return py


def _install_venv(venv, spec, exe_name, notes):
    exe = os.path.join(venv, "bin", exe_name)
    log("installing %s into %s" % (spec, venv))
    try:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", spec],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        notes.append("could not install %s (%s): its columns are missing" % (spec, str(e)[:200]))
        log(notes[-1])
        return None
    return exe if os.path.exists(exe) else None


# --------------------------------------------------------------------------- the listing bucket
#: Stored keys per folder of the listing bucket; folders cycle through LISTING_KINDS.
LISTING_FOLDER = 100
#: #17's big pairs: every download starts from an empty reference cache, so a later version's
#: is cold too (the reference and the delta both come from the server), as #17 measures it.
COLD_SERIES = ("img", "big")
#: The floor's SHA-256 of a file: hashlib, 1 MiB reads, as the tools hash.
HASH_FILE = ("import hashlib, sys\nh = hashlib.sha256()\nwith open(sys.argv[1], 'rb') as f:\n"
             "    for c in iter(lambda: f.read(1 << 20), b''):\n        h.update(c)\nprint(h.hexdigest())")
#: The many-files floor's raw PUTs at once (ours sends small files 64 at once).
FLOOR_PUTS_AT_ONCE = 64
#: plain: 100 direct objects; delta: reference.bin + 99 deltas; mixed: 50 plain, a reference, 49 deltas.
LISTING_KINDS = ("plain", "delta", "plain", "mixed")


def listing_layout(n, kinds=LISTING_KINDS):
    """The stored keys of the n-key listing bucket, in folders of LISTING_FOLDER, each
    (key, metadata or None): plain objects, and the delta layout of FORMAT.md (each
    folder's ``reference.bin`` and ``<name>.zip.delta`` files whose metadata records the
    logical size), so a listing maps stored keys to logical ones and hides references.
    The bodies are a few bytes: the listing never reads them (they are not real deltas,
    so the bucket is for listing only)."""
    out = []
    for f in range((n + LISTING_FOLDER - 1) // LISTING_FOLDER):
        folder = "f%05d/" % f
        kind = kinds[f % len(kinds)]
        count = min(LISTING_FOLDER, n - f * LISTING_FOLDER)
        plain = count if kind == "plain" else (0 if kind == "delta" else count // 2)
        for j in range(plain):
            out.append((folder + "file-%03d.txt" % j, None))
        if plain < count:
            ref = folder + "reference.bin"
            out.append((ref, {"dg-tool": "deltaglider/bench", "dg-note": "reference",
                              "dg-source-name": "app-000.zip", "dg-file-size": "1048576"}))
            for j in range(count - plain - 1):
                name = "app-%03d.zip" % j
                size = 1048576 + 4096 * j
                out.append((folder + name + ".delta", {
                    "dg-tool": "deltaglider/bench", "dg-original-name": name,
                    "dg-file-sha256": hashlib.sha256(name.encode()).hexdigest(),
                    "dg-file-size": str(size), "dg-md5": hashlib.md5(name.encode()).hexdigest(),
                    "dg-created-at": "2026-01-01T00:00:00.000000Z", "dg-ref-key": ref,
                    "dg-ref-path": "reference.bin", "dg-ref-sha256": "0" * 64, "dg-delta-size": "16",
                    "dg-note": "delta"}))
    return out


def listing_logical(layout):
    """How many logical objects a listing of the layout shows (references hidden)."""
    return sum(1 for k, _ in layout if not k.endswith("/reference.bin"))


def populate_listing(s3, bucket, n, kinds=LISTING_KINDS, workers=16):
    """Make ``bucket`` hold exactly listing_layout(n), once: keys already there are kept,
    missing ones are PUT in parallel (keep-alive connections), extra ones deleted. Returns
    the layout."""
    import concurrent.futures
    layout = listing_layout(n, kinds)
    s3.make_bucket(bucket)
    have = {k for k, _ in s3.list(bucket)}
    want = {k for k, _ in layout}
    todo = [(k, m) for k, m in layout if k not in have]
    extra = sorted(have - want)
    if not todo and not extra:
        return layout
    log("listing bucket %s: %d keys to PUT, %d to delete (of %d)" % (bucket, len(todo), len(extra), n))

    def put(item):
        key, meta = item
        headers = {"x-amz-meta-" + k: v for k, v in (meta or {}).items()}
        body = b"d" * 16 if meta else key.encode()
        for attempt in range(5):
            try:
                st, data = s3.request("PUT", "/%s/%s" % (bucket, key), body=body, headers=headers, keep=True)
                if st == 200:
                    return
                err = "%s %s" % (st, data[:200])
            except (OSError, http.client.HTTPException) as e:
                err = str(e)
            time.sleep(0.2 * (attempt + 1))
        raise RuntimeError("PUT %s/%s failed: %s" % (bucket, key, err))

    def delete(key):
        s3.request("DELETE", "/%s/%s" % (bucket, key), keep=True)

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, todo, chunksize=64))
        list(pool.map(delete, extra, chunksize=64))
    log("listing bucket %s ready in %.0fs" % (bucket, time.time() - t0))
    return layout


# --------------------------------------------------------------------------- workloads
class Bench:
    def __init__(self, args, endpoint):
        self.args, self.endpoint = args, endpoint
        self.s3 = RawS3(endpoint)
        self.errors = []        # problems with OUR tool -> non-zero exit
        self.notes = []         # problems with the others
        self.data = {"series": {}, "version": {}, "ls": {}, "ls_tenth": {}, "small": {}, "tree": {},
                     "floor": {},
                     "baseline_rss": 0}

    def fail(self, tool, msg):
        (self.errors if tool.name.startswith("ours") else self.notes).append("%s: %s" % (tool.name, msg))
        log("%s: %s" % (tool.name, msg))

    def series(self, tools, name, files, reps, tmp):
        """Interleaved: each step (upload of file i, download of file i) runs for every tool
        before the next step, so load on a shared machine hits all tools alike."""
        hashes = [sha256(f) for f in files]
        res = self.data["series"].setdefault(name, {
            "files": [os.path.basename(f) for f in files], "sizes": [os.path.getsize(f) for f in files]})
        trs = {}
        for tool in tools:
            trs[tool.name] = res.setdefault(tool.name, {
                "up": [[] for _ in files], "down": [[] for _ in files], "up_rss": 0, "down_rss": 0,
                "up_tree_rss": 0, "down_tree_rss": 0, "stored": None, "ok": True})
        for rep in range(reps):
            prefix = "%s/r%d/" % (name, rep)
            # Where ours keeps the folder's shared reference (FORMAT.md: the parent folder's
            # .deltaglider/refs/<folder>/): outside the prefix, but part of what it stores.
            # All of the series' references go: an earlier repetition's would be shared by
            # this one (its r0/ reference is the best match for r1/), and not counted.
            refs = "%s/.deltaglider/refs/" % name
            for tool in tools:
                self.s3.make_bucket("bench-" + tool.name)
                self.s3.delete_prefix("bench-" + tool.name, prefix)
                self.s3.delete_prefix("bench-" + tool.name, refs)
                if tool.name.startswith("ours"):
                    shutil.rmtree(tool.env["DG_CACHE_DIR"], ignore_errors=True)
            for i, f in enumerate(files):
                for tool in tools:
                    tr = trs[tool.name]
                    r = run(tool.up(f, "bench-" + tool.name, prefix), tool.env)
                    if r.rc != 0:
                        self.fail(tool, "upload %s failed rc=%d: %s" % (f, r.rc, (r.err or r.out)[-400:]))
                        tr["ok"] = False
                    tr["up"][i].append(r.secs)
                    tr["up_rss"] = max(tr["up_rss"], r.py_rss)
                    tr["up_tree_rss"] = max(tr["up_tree_rss"], r.tree_rss)
                    log("%-8s %-4s up   %-40s %7.2fs rss %4dM tree %4dM" % (
                        tool.name, name, os.path.basename(f), r.secs, r.py_rss // MiB, r.tree_rss // MiB))
            for tool in tools:
                trs[tool.name]["stored"] = sum(s for where in (prefix, refs)
                                               for _, s in self.s3.list("bench-" + tool.name, where))
                if tool.name.startswith("ours"):  # downloads start from an empty reference cache
                    shutil.rmtree(tool.env["DG_CACHE_DIR"], ignore_errors=True)
            outdir = tempfile.mkdtemp(dir=tmp, prefix="dl-")
            for i, f in enumerate(files):
                for tool in tools:
                    tr = trs[tool.name]
                    if name in COLD_SERIES and tool.name.startswith("ours"):
                        shutil.rmtree(tool.env["DG_CACHE_DIR"], ignore_errors=True)
                    dest = os.path.join(outdir, os.path.basename(f))
                    r = run(tool.down("bench-" + tool.name, prefix, os.path.basename(f), dest), tool.env)
                    tr["down"][i].append(r.secs)
                    tr["down_rss"] = max(tr["down_rss"], r.py_rss)
                    tr["down_tree_rss"] = max(tr["down_tree_rss"], r.tree_rss)
                    good = r.rc == 0 and os.path.exists(dest) and sha256(dest) == hashes[i]
                    if not good:
                        tr["ok"] = False
                        self.fail(tool, "download %s: %s (rc=%d) %s" % (
                            os.path.basename(f), "WRONG BYTES" if r.rc == 0 and os.path.exists(dest)
                            else "failed", r.rc, (r.err or r.out)[-300:]))
                    log("%-8s %-4s down %-40s %7.2fs rss %4dM tree %4dM %s" % (
                        tool.name, name, os.path.basename(f), r.secs, r.py_rss // MiB, r.tree_rss // MiB,
                        "ok" if good else "BAD"))
                    if os.path.exists(dest):
                        os.remove(dest)
            shutil.rmtree(outdir, ignore_errors=True)
            if not self.args.keep_objects:
                for tool in tools:
                    self.s3.delete_prefix("bench-" + tool.name, prefix)

    def floor(self, name, files, reps, tmp):
        """xdelta3 alone (our flags) + a SHA-256 alone, on the same files: encode v_i against
        v_0 and hash v_i (upload floor); decode and hash (download floor). The hash is
        Python's hashlib (OpenSSL), as the tools hash: coreutils' sha256sum takes 2.5x as
        long on a CPU with SHA extensions, which made the floor look higher than it is."""
        xd = shutil.which("xdelta3")
        if not xd:
            self.notes.append("xdelta3 not found: no raw floor")
            return
        sys.path.insert(0, REPO)
        try:
            import deltaglider as dg  # only for the exact encode/decode flags
            x = dg._XDelta3(xd)

            def enc(s, t, o):  # the plan a default upload gets (#17: level and window by size)
                size = os.path.getsize(s)
                checker = dg._decoder_memory(size)
                return x.encode_args(dg._encode_plan(size, x.memory.total - checker), s, t, o)

            dec = lambda s, d, o: ["-d", "-f", "-D", "-B", str(dg._DECODE_WINDOW), "-s", s, d, o]
        except Exception:
            dg = None
            enc = lambda s, t, o: ["-e", "-f", "-D", "-9", "-s", s, t, o]
            dec = lambda s, d, o: ["-d", "-f", "-D", "-s", s, d, o]
        env = dict(os.environ)
        fl = self.data["floor"].setdefault(name, {"up": [[] for _ in files], "down": [[] for _ in files],
                                                  "xd_dec": [[] for _ in files], "py_dec": [[] for _ in files]})
        ref = files[0]
        for rep in range(reps):
            for i, f in enumerate(files):
                delta = os.path.join(tmp, "floor.delta")
                out = os.path.join(tmp, "floor.out")
                sh = run([sys.executable, "-c", HASH_FILE, f], env).secs
                if i == 0:
                    fl["up"][i].append(sh)
                    fl["down"][i].append(sh)
                    continue
                e = run([xd, *enc(ref, f, delta)], env)
                d = run([xd, *dec(ref, delta, out)], env)
                sh2 = run([sys.executable, "-c", HASH_FILE, out], env).secs
                py = self._python_decode(dg, ref, delta, out, sha256(out)) if dg else None
                if py is not None:
                    fl["xd_dec"][i].append(d.secs)
                    fl["py_dec"][i].append(py)
                fl["up"][i].append(e.secs + sh)
                fl["down"][i].append(d.secs + sh2)
                for p in (delta, out):
                    if os.path.exists(p):
                        os.remove(p)

    def _python_decode(self, dg, ref, delta, out, want):
        """#8: the built-in VCDIFF decoder on the delta xdelta3 just decoded: seconds, in
        this process (xdelta3's time includes its process start; ours an import)."""
        t = time.perf_counter()
        try:
            with open(delta, "rb") as d, open(out, "wb") as o:
                dg._vcdiff_decode(ref, d, o)
        except Exception as e:  # reported, never fatal to the run
            self.errors.append("ours: built-in decoder failed on %s: %s" % (os.path.basename(delta), e))
            return None
        secs = time.perf_counter() - t
        if sha256(out) != want:
            self.errors.append("ours: built-in decoder gave WRONG BYTES for %s" % os.path.basename(delta))
            return None
        return secs

    def version(self, tools, reps):
        runs = [(t.name, t.version(), t) for t in tools]
        ours = [t for t in tools if t.name == "ours"]
        if ours:  # same, but bytecode-cached (`python -m` / installed entry point)
            runs.append(("ours -m", [ours[0].argv[0], "-m", "deltaglider", "--version"], ours[0]))
        times = {name: [] for name, _, _ in runs}
        for _ in range(reps):  # interleaved, hyperfine-style repeated runs
            for name, argv, tool in runs:
                r = run(argv, tool.env, cwd=REPO)
                if r.rc != 0:
                    self.fail(tool, "--version rc=%d %s" % (r.rc, r.err[-200:]))
                times[name].append(r.secs)
        for name, _, _ in runs:
            self.data["version"][name] = times[name]
            log("%-8s --version median %.3fs" % (name, statistics.median(times[name])))

    def ls(self, tools, reps):
        """#17 item 5: `ls -r` of the listing bucket (listing_layout: plain objects beside
        the delta layout, references hidden, `.delta` names mapped), interleaved, at a
        tenth of the keys and at all of them: the peak RSS of the two shows whether a
        tool's memory grows with the object count. The buckets are made once (raw
        parallel PUTs) and reused by later runs."""
        n = self.args.list_objects
        tools = list(tools)
        for t in list(tools):  # ours also as `ls -r --original-sizes`: a HEAD per delta
            if t.name == "ours":
                sized = copy.copy(t)
                sized.name = "ours-original-sizes"
                sized.ls_r = lambda b, p, t=t: t.ls_r(b, p) + ["--original-sizes"]
                tools.insert(tools.index(t) + 1, sized)
        for where, count in (("ls_tenth", max(1, n // 10)), ("ls", n)):
            bucket = "bench-list%d" % count
            layout = populate_listing(self.s3, bucket, count, workers=32)
            logical = listing_logical(layout)
            got = {t.name: {"times": [], "lines": 0, "objects": count, "logical": logical, "rss": 0}
                   for t in tools}
            for _ in range(reps):  # interleaved
                for tool in tools:
                    r = run(tool.ls_r(bucket, ""), tool.env)
                    if r.rc != 0:
                        self.fail(tool, "ls -r rc=%d %s" % (r.rc, r.err[-200:]))
                    got[tool.name]["times"].append(r.secs)
                    got[tool.name]["rss"] = max(got[tool.name]["rss"], r.tree_rss)
                    got[tool.name]["lines"] = len([ln for ln in r.out.splitlines() if ln.strip()])
            for tool in tools:
                g = got[tool.name]
                self.data[where][tool.name] = g
                want = count if tool.name == "awscli" else logical  # aws shows references too
                if g["lines"] != want:
                    self.fail(tool, "ls -r of %d keys printed %d lines, not %d" % (count, g["lines"], want))
                log("%-8s ls -r %d keys median %.3fs (%d lines, tree RSS %s)" % (
                    tool.name, count, statistics.median(g["times"]), g["lines"], fmt_b(g["rss"])))

    def _bucket_exists(self, bucket):
        st, _ = self.s3.request("HEAD", "/" + bucket)
        return st == 200

    def small(self, tools, folder, reps):
        n = sum(len(f) for _, _, f in os.walk(folder))
        times = {t.name: [] for t in tools}
        for rep in range(reps):  # interleaved
            for tool in tools:
                bucket, prefix = "bench-" + tool.name, "small/r%d/" % rep
                self.s3.make_bucket(bucket)
                self.s3.delete_prefix(bucket, prefix)
                r = run(tool.up_r(folder, bucket, prefix), tool.env)
                got = len(self.s3.list(bucket, prefix))
                if r.rc != 0 or got < n:
                    self.fail(tool, "cp -r small: rc=%d, %d/%d objects %s" % (r.rc, got, n, r.err[-300:]))
                times[tool.name].append(r.secs)
                self.s3.delete_prefix(bucket, prefix)
        for tool in tools:
            self.data["small"][tool.name] = times[tool.name]
            log("%-8s cp -r %d small files median %.2fs" % (tool.name, n, statistics.median(times[tool.name])))


    def put_floor(self, folder, bucket, prefix):
        """The server's own floor for many files: every file one raw signed PUT (keep-alive,
        FLOOR_PUTS_AT_ONCE at once), no tool; seconds. Where it is near the tools' times the
        server, not the client, is the bound."""
        files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
        self.s3.make_bucket(bucket)
        self.s3.delete_prefix(bucket, prefix)

        def put(path):
            with open(path, "rb") as f:
                body = f.read()
            key = "/%s/%s%s" % (bucket, prefix, os.path.relpath(path, folder).replace(os.sep, "/"))
            st, data = self.s3.request("PUT", key, body=body, keep=True)
            if st != 200:
                raise RuntimeError("floor PUT %s: %s %s" % (key, st, data[:200]))

        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(FLOOR_PUTS_AT_ONCE) as pool:
            list(pool.map(put, files))
        secs = time.perf_counter() - t
        self.s3.delete_prefix(bucket, prefix)
        return secs

    def tree(self, tools, folder, reps):
        """#17's many-files workload, interleaved per repetition: `cp -r` of the site tree to
        an empty prefix, `sync` of it to another, then the same `sync` again with nothing
        changed (which must send nothing). Each run's stored objects are counted raw."""
        n = sum(len(f) for _, _, f in os.walk(folder))
        tools = list(tools)
        ours = [t for t in tools if t.name == "ours"]
        if ours:  # the same CLI, bytecode cached: `python -m deltaglider`, as the console script
            o = ours[0]
            m = Tool("ours -m", o.argv, dict(o.env, PYTHONPATH=REPO, DG_CACHE_DIR=o.env["DG_CACHE_DIR"] + "-m"),
                     "deltaglider.py as `python -m deltaglider`")

            def as_module(argv):
                return [argv[0], "-m", "deltaglider", *argv[2:]]

            m.up_r = lambda f, b, p, o=o: as_module(o.up_r(f, b, p))
            m.sync_up = lambda f, b, p, o=o: as_module(o.sync_up(f, b, p))
            tools.insert(tools.index(o) + 1, m)
        times = {t.name: {"cp": [], "sync": [], "sync2": []} for t in tools}
        floor = []
        for rep in range(reps):
            floor.append(self.put_floor(folder, "bench-floor", "tree/r%d/" % rep))
            for tool in tools:
                bucket = "bench-" + tool.name.replace(" ", "")
                self.s3.make_bucket(bucket)
                for step, prefix, argv in (
                    ("cp", "tree-cp/r%d/" % rep, tool.up_r),
                    ("sync", "tree-sync/r%d/" % rep, tool.sync_up),
                    ("sync2", "tree-sync/r%d/" % rep, tool.sync_up),
                ):
                    if step != "sync2":
                        self.s3.delete_prefix(bucket, prefix)
                    r = run(argv(folder, bucket, prefix), tool.env)
                    keys = [k for k, _ in self.s3.list(bucket, prefix)]
                    logical = {k[: -len(".delta")] if k.endswith(".delta") else k for k in keys
                               if not k.endswith("/reference.bin")}
                    if r.rc != 0 or len(logical) < n:
                        self.fail(tool, "%s of the %d-file tree: rc=%d, %d objects %s"
                                  % (step, n, r.rc, len(logical), r.err[-300:]))
                    if step == "sync2" and r.out.strip():
                        self.fail(tool, "second sync sent %d lines: %s" % (len(r.out.splitlines()),
                                                                           r.out[:200]))
                    times[tool.name][step].append(r.secs)
                for prefix in ("tree-cp/r%d/" % rep, "tree-sync/r%d/" % rep):
                    self.s3.delete_prefix(bucket, prefix)
        self.data["tree_floor"] = floor
        log("floor    %d-file tree: one raw PUT per file, %d at once, median %.2fs"
            % (n, FLOOR_PUTS_AT_ONCE, statistics.median(floor)))
        for tool in tools:
            self.data["tree"][tool.name] = dict(times[tool.name], files=n)
            log("%-8s %d-file tree: cp -r %.2fs, sync %.2fs, sync again %.2fs (medians)"
                % (tool.name, n, *(statistics.median(times[tool.name][k]) for k in ("cp", "sync", "sync2"))))


# --------------------------------------------------------------------------- report
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_s(x):
    return "—" if x is None else ("%.3f" % x if x < 10 else "%.1f" % x)


def fmt_b(n):
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0


def summarize(data):
    """Per series and tool: median first-upload, median later-upload (median over reps of
    each file, then median over files), same for downloads; stored, savings."""
    out = {}
    for name, s in data["series"].items():
        total = sum(s["sizes"])
        for tool, tr in s.items():
            if not isinstance(tr, dict) or "up" not in tr:
                continue
            ups = [med(x) for x in tr["up"]]
            downs = [med(x) for x in tr["down"]]
            out[(name, tool)] = {
                "first_up": ups[0], "later_up": med(ups[1:]) if len(ups) > 1 else ups[0],
                "all_down": med(downs), "later_down": med(downs[1:]) if len(downs) > 1 else downs[0],
                "stored": tr["stored"], "total": total,
                "savings": None if tr["stored"] is None else 100.0 * (1 - tr["stored"] / total),
                "up_rss": tr["up_rss"], "down_rss": tr["down_rss"], "up_tree_rss": tr["up_tree_rss"],
                "down_tree_rss": tr["down_tree_rss"], "ok": tr["ok"]}
        if name in data["floor"]:
            fl = data["floor"][name]
            ups = [med(x) for x in fl["up"]]
            downs = [med(x) for x in fl["down"]]
            out[(name, "floor")] = {"later_up": med(ups[1:]), "later_down": med(downs[1:]),
                                    "first_up": ups[0], "all_down": med(downs)}
            xs = [med(x) for x in fl.get("xd_dec", [])[1:]]
            ps = [med(x) for x in fl.get("py_dec", [])[1:]]
            if xs and all(x is not None for x in xs + ps):
                out[(name, "decoder")] = {"xdelta3": med(xs), "python": med(ps)}
    return out


def targets(data, summ, args):
    rows = []

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    def add(target, value, ok, how):
        rows.append({"target": target, "measured": value, "pass": ok, "how": how})

    base = data["baseline_rss"]
    for name in ("zip", "tar"):
        o, g = summ.get((name, "ours")), summ.get((name, "original"))
        if o and g:
            r = ratio(o["stored"], g["stored"])
            add("stored bytes, %s series ≤ 1.01 × original" % name, "%.4f×" % r, r <= 1.01,
                "%s vs %s" % (fmt_b(o["stored"]), fmt_b(g["stored"])))
    o, g = summ.get(("whl", "ours")), summ.get(("whl", "original"))
    if o and g:
        r = ratio(o["stored"], g["stored"])
        add("stored bytes, whl series far below original (≤ 0.5×)", "%.3f×" % r, r <= 0.5,
            "%s vs %s" % (fmt_b(o["stored"]), fmt_b(g["stored"])))
    for name in ("zip", "tar"):
        o, g = summ.get((name, "ours")), summ.get((name, "original"))
        if o and g:
            r = ratio(g["later_up"], o["later_up"])
            add("upload of later versions, %s: ≥ 3× original's speed" % name, "%.2f×" % r, r >= 3,
                "median %ss vs %ss" % (fmt_s(o["later_up"]), fmt_s(g["later_up"])))
    for name in ("zip", "tar"):
        o, g = summ.get((name, "ours")), summ.get((name, "original"))
        if o and g:
            r = ratio(g["all_down"], o["all_down"])
            add("download, %s: ≥ 2× original's speed" % name, "%.2f×" % r, r >= 2,
                "median %ss vs %ss" % (fmt_s(o["all_down"]), fmt_s(g["all_down"])))
    v = data["version"]
    if "ours" in v and "original" in v:
        r = ratio(med(v["ours"]), med(v["original"]))
        add("CLI start-up (`--version`) ≤ 1/5 of original's", "%.3f" % r, r <= 0.2,
            "`python deltaglider.py`: %ss vs %ss" % (fmt_s(med(v["ours"])), fmt_s(med(v["original"]))))
        if "ours -m" in v:
            r = ratio(med(v["ours -m"]), med(v["original"]))
            add("(info) start-up as `python -m deltaglider` ≤ 1/5", "%.3f" % r, r <= 0.2,
                "%ss vs %ss" % (fmt_s(med(v["ours -m"])), fmt_s(med(v["original"]))))
    ls = data["ls"]
    if "ours" in ls and "original" in ls:
        r = ratio(med(ls["ours"]["times"]), med(ls["original"]["times"]))
        add("`ls -r` over %d objects ≤ 1/3 of original's" % ls["ours"]["objects"], "%.3f" % r, r <= 1 / 3.0,
            "%ss vs %ss (original printed %d lines)" % (fmt_s(med(ls["ours"]["times"])),
                                                       fmt_s(med(ls["original"]["times"])),
                                                       ls["original"]["lines"]))
    sm = data["small"]
    if "ours" in sm and "awscli" in sm:
        r = ratio(med(sm["ours"]), med(sm["awscli"]))
        add("recursive upload of %d small files ≤ `aws s3 cp --recursive`" % args.small_files, "%.2f×" % r,
            r <= 1.0, "%ss vs %ss" % (fmt_s(med(sm["ours"])), fmt_s(med(sm["awscli"]))))
    for name in ("whl", "tar") if not args.small else ("zip", "tar"):
        o, f = summ.get((name, "ours")), summ.get((name, "floor"))
        if o and f:
            for phase, key in (("upload (later versions)", "later_up"), ("download (later versions)", "later_down")):
                r = ratio(o[key], f[key]) - 1
                add("time above xdelta3+sha256 floor, %s %s ≤ 15%%" % (name, phase), "%+.1f%%" % (100 * r),
                    r <= 0.15, "%ss vs floor %ss" % (fmt_s(o[key]), fmt_s(f[key])))
    for name in ("whl", "zip", "tar", "awscli", "jar"):
        d = summ.get((name, "decoder"))
        if d:
            r = ratio(d["python"], d["xdelta3"])
            add("(#8) built-in VCDIFF decoder vs `xdelta3 -d`, %s (aim ≤ 3×)" % name, "%.2f×" % r, r <= 3,
                "median %ss vs %ss per later version" % (fmt_s(d["python"]), fmt_s(d["xdelta3"])))
    for name in ("awscli", "whl", "jar"):
        a, o = summ.get((name, "ours-aa")), summ.get((name, "ours"))
        s = data["series"].get(name)
        if not (a and o and s):
            continue
        first = s["sizes"][0]  # the reference, stored whole by both
        da, do = a["stored"] - first, o["stored"] - first
        r = ratio(do, da)
        goal = name == "awscli"
        add("(#9) archive-aware deltas vs plain, %s%s" % (name, ": ≥ 100× smaller" if goal else " (info)"),
            "%.1f× smaller" % r, r >= 100 if goal else True,
            "deltas of %d later versions: %s vs %s" % (len(s["sizes"]) - 1, fmt_b(da), fmt_b(do)))
        r = ratio(a["later_down"], o["later_down"])
        add("(#9) archive-aware download vs plain, %s%s" % (name, ": ≤ 3×" if goal else " (info)"),
            "%.2f×" % r, r <= 3 if goal else True,
            "median %ss vs %ss; upload %ss vs %ss" % (fmt_s(a["later_down"]), fmt_s(o["later_down"]),
                                                      fmt_s(a["later_up"]), fmt_s(o["later_up"])))
    # #17: big files at the limit, many files, listing at scale, start-up, memory.
    for name in ("img", "big"):
        o, a, f = summ.get((name, "ours")), summ.get((name, "awscli")), summ.get((name, "floor"))
        if o and a:
            floor = " (floor %ss)" % fmt_s(f["later_up"]) if f else ""
            r = ratio(o["later_up"], a["later_up"])
            add("(#17) %s later-version upload ≤ 0.75× `aws s3 cp` of the whole file" % name, "%.2f×" % r,
                r <= 0.75, "median %ss vs %ss%s" % (fmt_s(o["later_up"]), fmt_s(a["later_up"]), floor))
            floor = " (floor %ss)" % fmt_s(f["later_down"]) if f else ""
            r = ratio(o["later_down"], a["later_down"])
            add("(#17) %s cold download ≤ 1.0× aws's" % name, "%.2f×" % r, r <= 1.0,
                "median %ss vs %ss%s" % (fmt_s(o["later_down"]), fmt_s(a["later_down"]), floor))
        if o:
            for phase, key in (("upload", "up_tree_rss"), ("download", "down_tree_rss")):
                add("(#17) %s %s, whole process tree ≤ 600 MB" % (name, phase), fmt_b(o[key]),
                    o[key] <= 600e6, "RSS summed over Python and xdelta3, polled")
    tr = data.get("tree", {})
    for name, form in (("ours", "`python deltaglider.py`"), ("ours -m", "`python -m deltaglider`")):
        if name not in tr or "awscli" not in tr:
            continue
        o, a, g = tr[name], tr["awscli"], tr.get("original", {})
        for step, what, goal in (("cp", "`cp -r`", 0.5), ("sync", "`sync` (first)", 0.5),
                                 ("sync2", "`sync` again, nothing changed,", 1.0)):
            r = ratio(med(o[step]), med(a[step]))
            if r is None:
                continue
            floor = med(data.get("tree_floor", [])) if step != "sync2" else None
            add("(#17) %s of the %d-file tree ≤ %s× aws's (ours as %s)" % (what, o["files"], goal, form),
                "%.2f×" % r, r <= goal, "%ss vs %ss (original 6.2.0: %ss)%s" % (
                    fmt_s(med(o[step])), fmt_s(med(a[step])), fmt_s(med(g.get(step, []))),
                    "; server floor %ss: raw PUTs %d at once" % (fmt_s(floor), FLOOR_PUTS_AT_ONCE)
                    if floor else ""))
    for name, how in (("ours", "`ls -r`"), ("ours-original-sizes", "(info: a HEAD per delta) `ls -r --original-sizes`")):
        if name in ls and "awscli" in ls:
            r = ratio(med(ls[name]["times"]), med(ls["awscli"]["times"]))
            add("(#17) %s over %d objects ≤ 0.5× `aws s3 ls --recursive`" % (how, ls[name]["objects"]),
                "%.2f×" % r, r <= 0.5, "%ss vs %ss; tree RSS %s vs %s" % (
                    fmt_s(med(ls[name]["times"])), fmt_s(med(ls["awscli"]["times"])),
                    fmt_b(ls[name].get("rss", 0)), fmt_b(ls["awscli"].get("rss", 0))))
    tenth = data.get("ls_tenth", {})
    if "ours" in ls and "ours" in tenth:
        a, b = tenth["ours"]["rss"], ls["ours"]["rss"]
        add("(#17) `ls -r` memory does not grow with the object count (peak ≤ +10 MB from %d to %d keys)"
            % (tenth["ours"]["objects"], ls["ours"]["objects"]), "%+.1f MB" % ((b - a) / 1e6),
            b - a <= 10e6, "tree RSS %s at %d keys, %s at %d" % (fmt_b(a), tenth["ours"]["objects"], fmt_b(b),
                                                                 ls["ours"]["objects"]))
    if "ours -m" in v and "original" in v:
        r = ratio(med(v["ours -m"]), med(v["original"]))
        add("(#17) `python -m deltaglider --version` ≤ 0.25× original's", "%.3f" % r, r <= 0.25,
            "%ss vs %ss" % (fmt_s(med(v["ours -m"])), fmt_s(med(v["original"]))))
    o, g = summ.get(("zip", "ours")), summ.get(("zip", "original"))
    if o and g:
        r = ratio(g["later_up"], o["later_up"])
        add("(#17) later-version upload, 12 MB zip: ≥ 3× original's speed", "%.2f×" % r, r >= 3,
            "median %ss vs %ss" % (fmt_s(o["later_up"]), fmt_s(g["later_up"])))
    m = summ.get(("zip", "ours-m"))
    if m and g:
        r = ratio(g["later_up"], m["later_up"])
        add("(info) the same, ours run as `python -m deltaglider` (bytecode cached, as installed)",
            "%.2f×" % r, r >= 3, "median %ss vs %ss" % (fmt_s(m["later_up"]), fmt_s(g["later_up"])))
    o = summ.get(("big", "ours"))
    if o:
        for phase, key in (("upload", "up_rss"), ("download", "down_rss")):
            extra = o[key] - base
            add("peak RSS, %d MiB %s ≤ baseline + 100 MB" % (args.big_mib, phase), "+%.1f MB" % (extra / 1e6),
                extra <= 100e6, "python VmHWM %s, interpreter baseline %s (xdelta3 child excluded)"
                % (fmt_b(o[key]), fmt_b(base)))
    return rows


def _collapse(msgs):
    """Repeated messages (same text once digests, versions and numbers are blanked) as
    (first example, count), each on one line and cut to a readable length."""
    import re
    seen = {}
    for m in msgs:
        one = " ".join(m.split())
        one = one if len(one) <= 240 else one[:237] + "..."
        key = re.sub(r"[0-9a-f]{16,}|\d+", "#", one)
        if key in seen:
            seen[key][1] += 1
        else:
            seen[key] = [one, 1]
    return list(seen.values())


def write_report(args, data, tools, notes, errors, started, path_md, path_json):
    summ = summarize(data)
    trows = targets(data, summ, args)
    L = []
    L.append("# deltaglider benchmark results\n")
    L.append("Generated by `benchmarks/run.sh%s` on %s (%s, Python %s, %d CPUs), %s. Server: OpenStack "
             "Swift + s3api on 127.0.0.1. Repetitions: %d (big file: 1). Tools: %s. Load average "
             "(1 min) at the start / when written: %s; workloads are interleaved, so ratios hold "
             "better than times on a loaded machine.\n" % (
                 " --small" if args.small else "", started, platform.platform(), platform.python_version(),
                 os.cpu_count() or 0, "small mode" if args.small else "full mode", args.repeat,
                 ", ".join("**%s** = %s" % (t.name, t.label) for t in tools),
                 "%s / %.1f" % (data.get("load", "?"), os.getloadavg()[0])))
    L.append("Times are wall seconds of one CLI invocation per file (median over repetitions, then over "
             "files); *first* = the first version of a series (stored whole by the delta tools), *later* = "
             "every other version. Downloads start with an empty local cache (img and big: every "
             "download, so a later version fetches its reference too) and are checked by SHA-256. "
             "*Stored* = raw bytes under the prefix after uploading the series, with the shared reference ours keeps beside it (listed directly from S3). "
             "*Peak RSS* = the CLI's Python process alone (VmHWM); *tree* = RSS summed over the whole process tree, xdelta3 included. "
             "*floor* = `xdelta3` (our flags, encode v_i against v_1 / decode) + a SHA-256 of the file (Python's hashlib, as the tools hash), no S3.\n")
    L.append("## Targets\n")
    L.append("| target | measured | pass | detail |\n|---|---|---|---|")
    for r in trows:
        L.append("| %s | %s | %s | %s |" % (r["target"], r["measured"], "✅ pass" if r["pass"] else "❌ FAIL",
                                           r["how"]))
    L.append("")
    L.append("## Series (upload each version in order into one prefix, download all back)\n")
    L.append("| series | files | tool | first up s | later up s | download s | stored | savings | peak RSS up / down (tree) | bytes ok |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in data["series"].items():
        desc = "%d × %s" % (len(s["files"]), fmt_b(sum(s["sizes"]) / len(s["files"])))
        for tool in [t.name for t in tools] + ["floor"]:
            x = summ.get((name, tool))
            if not x:
                continue
            if tool == "floor":
                L.append("| %s | %s | floor | %s | %s | %s | | | | |" % (
                    name, desc, fmt_s(x["first_up"]), fmt_s(x["later_up"]), fmt_s(x["all_down"])))
                continue
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s (%s / %s) | %s |" % (
                name, desc, tool, fmt_s(x["first_up"]), fmt_s(x["later_up"]), fmt_s(x["all_down"]),
                fmt_b(x["stored"]), "%.1f%%" % x["savings"], fmt_b(x["up_rss"]), fmt_b(x["down_rss"]),
                fmt_b(x["up_tree_rss"]), fmt_b(x["down_tree_rss"]), "yes" if x["ok"] else "**NO**"))
    L.append("")
    L.append("## Other workloads\n")
    tools = [t for t in tools if t.name not in ("ours-aa", "ours-m")]
    L.append("| workload | %s |" % " | ".join(t.name for t in tools))
    L.append("|---|%s" % ("---|" * len(tools)))
    L.append("| `--version` (median s) | %s |" % " | ".join(fmt_s(med(data["version"].get(t.name, []))) for t in tools))
    L.append("| `--version` as `python -m deltaglider` (bytecode cached) | %s |" % " | ".join(
        fmt_s(med(data["version"].get("ours -m", []))) if t.name == "ours" else "" for t in tools))
    for where in ("ls_tenth", "ls"):
        ls = data.get(where, {})
        if not ls:
            continue
        L.append("| `ls -r` over %s keys (median s, lines, peak tree RSS) | %s |" % (
            next(iter(ls.values()))["objects"],
            " | ".join("%s (%d lines, %s)" % (fmt_s(med(ls[t.name]["times"])), ls[t.name]["lines"],
                                              fmt_b(ls[t.name].get("rss"))) if t.name in ls
                       else "—" for t in tools)))
    L.append("| `cp -r` of %d small files (median s) | %s |" % (
        args.small_files, " | ".join(fmt_s(med(data["small"].get(t.name, []))) for t in tools)))
    tr = data.get("tree", {})
    for step, what in (("cp", "`cp -r`"), ("sync", "`sync` to an empty prefix"),
                       ("sync2", "the same `sync` again (nothing changed)")):
        L.append("| %s of the %s-file site tree (median s) | %s |" % (
            what, next(iter(tr.values()))["files"] if tr else "?",
            " | ".join(fmt_s(med(tr[t.name][step])) if t.name in tr else "—" for t in tools)))
        if "ours -m" in tr:
            L.append("| … the same, ours as `python -m deltaglider` (bytecode cached) | %s |" % " | ".join(
                fmt_s(med(tr["ours -m"][step])) if t.name == "ours" else "" for t in tools))
        if step != "sync2" and data.get("tree_floor"):
            L.append("| … the server's floor: one raw PUT per file, %d at once, no tool | %s |" % (
                FLOOR_PUTS_AT_ONCE, " | ".join(fmt_s(med(data["tree_floor"])) if t.name == "ours" else ""
                                               for t in tools)))
    L.append("| interpreter baseline RSS (`python3 -c pass`) | %s |" % fmt_b(data["baseline_rss"]))
    L.append("")
    if data.get("ls"):
        L.append("The `ls -r` buckets (made once by raw parallel PUTs, reused): folders of %d keys, in turn "
                 "plain objects, the delta layout (`reference.bin` and `.delta` files whose metadata records the "
                 "original size), plain again, and half of each; deltaglider lists the logical names (references "
                 "hidden), aws s3 every stored key. deltaglider 6.2.0 lists one request's 1,000 keys.\n"
                 % LISTING_FOLDER)
    if notes or errors:
        L.append("## Notes\n")
        for prefix, group in (("**ours**: ", errors), ("", notes)):
            for n, count in _collapse(group):
                L.append("- %s%s%s" % (prefix, n, " (×%d)" % count if count > 1 else ""))
        L.append("")
    with open(path_md, "w") as f:
        f.write("\n".join(L))
    with open(path_json, "w") as f:
        json.dump({"args": vars(args), "started": started, "data": data, "targets": trows,
                   "notes": notes, "errors": errors}, f, indent=1, default=str)
    return trows


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CI mode: tiny synthetic corpus, 1 repetition")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions (default 3; --small: 1)")
    ap.add_argument("--versions", type=int, default=4, help="botocore versions per series (default 4)")
    ap.add_argument("--botocore-prefix", default="1.35.", help="versions are PREFIX0..PREFIX{n-1}")
    ap.add_argument("--awscli", nargs="+", default=["1.45.60", "1.45.61", "1.45.62", "1.45.63", "1.45.64"],
                    help="awscli wheel versions (archive-aware series)")
    ap.add_argument("--py4j", nargs="+", default=["0.10.9.5", "0.10.9.6", "0.10.9.7", "0.10.9.8", "0.10.9.9"],
                    help="py4j versions whose jar makes the jar series")
    ap.add_argument("--big-mib", type=int, default=None, help="synthetic big file size (default 2048; --small: 64)")
    ap.add_argument("--image-mib", type=int, default=None,
                    help="#17's image pair, five 64 KiB regions changed (default 300; --small: 32)")
    ap.add_argument("--small-files", type=int, default=None, help="default 1000 (--small: 20)")
    ap.add_argument("--tree-files", type=int, default=None,
                    help="files in #17's site tree for cp -r and sync (default 1000; --small: 50)")
    ap.add_argument("--list-objects", type=int, default=None,
                    help="keys of the ls -r bucket, and a tenth of it (default 100000; --small: 2000)")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "deltaglider-bench"))
    ap.add_argument("--seed-corpus", action="append", help="folder searched for already-downloaded files")
    ap.add_argument("--endpoint", help="use this S3 endpoint (keys test:tester/testing) instead of starting one")
    ap.add_argument("--port", type=int, default=19200)
    ap.add_argument("--original-venv", help="venv holding deltaglider==6.2.0 (default: CACHE/venv-dg620)")
    ap.add_argument("--awscli-venv", help="venv holding awscli (default: CACHE/venv-awscli)")
    ap.add_argument("--skip", action="append", default=[], choices=["original", "awscli"])
    ap.add_argument("--only", action="append", default=[], help="run only these workloads (series names, version, ls, small, tree)")
    ap.add_argument("--big-tools", default="ours,original,awscli", help="tools run on the big file")
    ap.add_argument("--keep-objects", action="store_true")
    ap.add_argument("--out", help="where RESULTS.md and results.json go (default: benchmarks/; "
                    "--small: CACHE/results-small, so CI never rewrites the tracked files)")
    ap.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(args.cache, "results-small") if args.small else HERE
    return args


def main():
    args = parse_args()
    if args.report_only:
        with open(os.path.join(args.out, "results.json")) as f:
            saved = json.load(f)
        for k, v in saved["args"].items():
            if k not in ("report_only", "out"):
                setattr(args, k, v)
        names = [n for n in ("ours", "ours-aa", "ours-m", "original", "awscli")
                 if n in saved["data"]["version"] or n in ("ours-aa", "ours-m")]
        labels = {"ours": "deltaglider.py (this repo)", "original": "deltaglider 6.2.0",
                  "ours-aa": "deltaglider.py with DG_ARCHIVE_AWARE=1 (zip-family series only)",
                  "ours-m": "`python -m deltaglider` (bytecode cached, as the installed command runs it)",
                  "awscli": "aws s3 (awscli, plain storage)"}
        tools = [Tool(n, [], {}, labels[n]) for n in names]
        write_report(args, saved["data"], tools, saved["notes"], saved["errors"], saved["started"],
                     os.path.join(args.out, "RESULTS.md"), os.path.join(args.out, "results.json"))
        return 1 if saved["errors"] else 0
    if args.repeat is None:
        args.repeat = 1 if args.small else 3
    if args.big_mib is None:
        args.big_mib = 64 if args.small else 2048
    if args.image_mib is None:
        args.image_mib = 32 if args.small else 300
    if args.small_files is None:
        args.small_files = 20 if args.small else 1000
    if args.tree_files is None:
        args.tree_files = 50 if args.small else 1000
    if args.list_objects is None:
        args.list_objects = 2000 if args.small else 100000
    os.makedirs(args.cache, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.time()

    series, small = build_corpus(args)
    log("corpus ready: %s" % ", ".join("%s=%d files" % (k, len(v)) for k, v in series.items()))

    server_started = False
    endpoint = args.endpoint
    if not endpoint:
        script = os.path.join(REPO, ".ci", "start-s3-server.sh")
        r = subprocess.run(["bash", script, "start", str(args.port), AK, SK], stdout=subprocess.PIPE,
                           env=dict(os.environ))
        if r.returncode != 0:
            log("could not start the S3 server")
            return 3
        server_started = True
        endpoint = "http://127.0.0.1:%d" % args.port
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="dg-bench-")
    try:
        tools, notes = make_tools(args, endpoint, tmp)
        b = Bench(args, endpoint)
        b.notes.extend(notes)
        b.data["load"] = "%.1f" % os.getloadavg()[0]
        b.data["baseline_rss"] = run([tools[0].argv[0], "-c", "pass"], dict(os.environ)).py_rss
        want = lambda w: not args.only or w in args.only
        plain_tools = [t for t in tools if t.name not in ("ours-aa", "ours-m")]  # same CLI as ours here
        if want("version"):
            b.version(plain_tools, 10 if not args.small else 3)
        if want("ls"):
            b.ls(plain_tools, max(3, args.repeat) if not args.small else 1)
        if want("small"):
            b.small(plain_tools, small, args.repeat)
        if want("tree"):
            b.tree(plain_tools, args.tree_dir, args.repeat)
        for name, files in series.items():
            if not want(name):
                continue
            if name == "big":
                bt = [t for t in tools if t.name in args.big_tools.split(",") and t.name != "ours-aa"]
                b.series(bt, name, files, 1, tmp)
                b.floor(name, files, 1, tmp)
            else:
                st = [t for t in tools if (t.name != "ours-aa" or name in ARCHIVE_SERIES)
                      and (t.name != "ours-m" or name in MODULE_SERIES)]
                b.series(st, name, files, args.repeat, tmp)
                b.floor(name, files, args.repeat, tmp)
            write_report(args, b.data, tools, b.notes, b.errors, started,
                         os.path.join(args.out, "RESULTS.md"), os.path.join(args.out, "results.json"))
        trows = write_report(args, b.data, tools, b.notes, b.errors, started,
                             os.path.join(args.out, "RESULTS.md"), os.path.join(args.out, "results.json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if server_started:
            subprocess.run(["bash", os.path.join(REPO, ".ci", "start-s3-server.sh"), "stop", str(args.port)],
                           env=dict(os.environ),
                           stdout=subprocess.DEVNULL)
    log("done in %.0fs; %d/%d targets pass; see %s" % (time.time() - t_start, sum(r["pass"] for r in trows),
                                                       len(trows), os.path.join(args.out, "RESULTS.md")))
    for e in b.errors:
        log("OUR TOOL FAILED: " + e)
    return 1 if b.errors else 0


if __name__ == "__main__":
    sys.exit(main())
