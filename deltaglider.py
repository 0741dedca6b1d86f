#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""deltaglider: store versioned binary artifacts in any S3 bucket as xdelta3 deltas.

One file, Python standard library only; making or reading a delta needs the ``xdelta3``
binary on PATH. A boto3-compatible client and an ``aws s3``-style CLI::

    import deltaglider
    s3 = deltaglider.create_client(endpoint_url="http://127.0.0.1:9000")
    s3.upload_file("build-1.2.zip", "releases", "v1/build-1.2.zip")   # stored as a delta

    $ python deltaglider.py cp build-1.3.zip s3://releases/v1/
    $ python deltaglider.py --endpoint-url file:///tmp/store ls -r s3://releases
"""

from __future__ import annotations

import argparse
import array
import base64
import collections
import contextlib
import datetime
import fnmatch
import functools
import io
import itertools
import logging
import math
import mmap
import os
import re
import shutil
import stat
import struct
import sys
import threading
import time
import zlib

try:  # POSIX only; on Windows the local store's bucket lock is a threading lock alone
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    Container,
    ContextManager,
    Dict,
    Iterable,
    Iterator,
    Mapping,
    NamedTuple,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    cast,
)

# Imported inside the functions that use them, not here: a command loads only what it
# needs (start-up time, issue 17). Imported here for the type checker alone. For the same
# reason regular expressions are kept as strings, `re.match(_PATTERN, text)`: re compiles
# one when it is first used and caches it.
if TYPE_CHECKING:
    import concurrent.futures
    import http.client
    import http.server
    import pathlib
    import socket
    import socketserver
    import ssl
    import subprocess
    import xml.etree.ElementTree as ET

# 7.x: the successor of the original deltaglider 6.x (same bucket layout, its SDK surface),
# numbered above it so that `pip install -U deltaglider` never takes 6.2.0 for an upgrade.
__version__ = "7.0.0"

__all__ = [
    "BotoCoreError",
    "BucketStats",
    "ClientError",
    "CompressionEstimate",
    "Config",
    "ConnectTimeoutError",
    "DeltaGliderError",
    "EndpointConnectionError",
    "IncompleteReadError",
    "IntegrityError",
    "NoCredentialsError",
    "ObjectInfo",
    "PaginationError",
    "ParamValidationError",
    "ReadTimeoutError",
    "StreamingBody",
    "UploadSummary",
    "VerifyResult",
    "XDelta3Error",
    "__version__",
    "create_client",
    "main",
]

logger = logging.getLogger(__name__)

###############################################################################
# Constants ###################################################################
###############################################################################

_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"
_SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
#: Headers never signed: hop-by-hop ones, and ones a proxy may rewrite (botocore auth.py).
_UNSIGNED_HEADERS = frozenset(
    {
        "authorization",
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "x-amzn-trace-id",
    }
)
_PRESIGN_MAX_EXPIRES = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days (AWS docs).
#: Files and bodies are read, hashed, copied and spooled in pieces of this size.
_IO_CHUNK = 1024 * 1024

#: botocore standard retry mode: transient errors and throttling (retries/standard.py).
_RETRYABLE_STATUS = frozenset({500, 502, 503, 504, 429})
_RETRYABLE_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "EC2ThrottledException",
        "InternalError",
        "ServiceUnavailable",
    }
)
_DEFAULT_MAX_ATTEMPTS = 3
_MAX_BACKOFF = 20.0
#: The longest one response may keep us waiting, whatever its pace (read_timeout only bounds
#: each recv, and a server sending a byte every few seconds never trips it): the status line,
#: the headers and every 1 MiB of body must arrive within this many seconds of the request
#: being sent or of the previous MiB. Generous, because S3 keeps a slow CompleteMultipartUpload
#: or CopyObject alive by sending a space every few seconds (AWS CopyObject docs).
_DEFAULT_REQUEST_TIMEOUT = 600.0
#: The most of one reply read into memory (error XML, a listing, a multipart or delete
#: result, a credential endpoint's JSON). A 1,000-key listing of 1,024-byte keys, url-encoded,
#: is under 5 MiB; anything bigger is a broken or hostile server.
_MAX_REPLY_BYTES = 16 * 1024 * 1024

#: S3 limits (AWS "Amazon S3 multipart upload limits", "Object key naming").
_MAX_KEY_BYTES = 1024
_MAX_METADATA_BYTES = 2048
_MIN_PART_SIZE = 5 * 1024 * 1024
_MAX_PARTS = 10000
_MAX_SINGLE_PUT = 5 * 1024**3
_MULTIPART_THRESHOLD = 64 * 1024 * 1024
_DEFAULT_PART_SIZE = 16 * 1024 * 1024
_T = TypeVar("_T")
#: Ranged GETs of big downloads (aws s3: 8 MiB parts, 10 requests at once).
_GET_PART_SIZE = 8 * 1024 * 1024
_TRANSFER_WORKERS = 8


def _get_hold(workers: int, part_size: int) -> int:
    """The memory a parallel ranged download reserves: twice the parts in flight, as
    measured when each part was read into new memory. Read into reused buffers, as
    _get_into does now, it takes about half (a 300 MiB cold read: 94 MB peak RSS, was
    205 MB)."""
    return 2 * (workers + 1) * part_size


_GET_HOLD = _get_hold(_TRANSFER_WORKERS, _GET_PART_SIZE)
#: Recursive cp/mv/sync: files up to _QUICK_FILE bytes that are stored whole (one PUT,
#: no xdelta3) go _QUICK_WORKERS at once beside the --max-concurrency pool, unless that
#: option is given. A small PUT is mostly waiting for the server (measured on Swift here:
#: 2 PUTs/s one at a time, 9/s at aws's 10, 28/s at 64); each costs a thread, a socket
#: and an open file, so the bound keeps a run within any 1,024-descriptor limit.
_QUICK_FILE = 1024 * 1024
_QUICK_WORKERS = 64
_DELETE_BATCH = 1000

_S3_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
_XML_INVALID = "[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]"
_BUCKET_NAME_RE = r"^[a-zA-Z0-9.\-_]{1,255}$"  # botocore's check
_STRICT_BUCKET_RE = r"^[a-z0-9][a-z0-9\-]{1,61}[a-z0-9]$"
#: Names S3 refuses to create a bucket by, however well formed (bucket naming rules).
_NEW_BUCKET_BAD = (
    r"\.\.|^\d+\.\d+\.\d+\.\d+$|^(xn--|sthree-|amzn-s3-demo-)"
    r"|(-s3alias|--ol-s3|\.mrap|--x-s3|--table-s3)$"
)

#: Environment variables read by deltaglider itself, each parsed as _DG_SETTINGS (Helpers)
#: says; AWS_* ones are read as botocore reads them (Configuration and credentials).
_ENV_MAX_RATIO = "DG_MAX_RATIO"
_ENV_CACHE_DIR = "DG_CACHE_DIR"
_ENV_XDELTA3 = "DG_XDELTA3"
#: Which decoder reads deltas: "auto" (xdelta3 when it is on PATH, else the built-in
#: VCDIFF decoder), "xdelta3" or "python".
_ENV_DECODER = "DG_DECODER"
_ENV_LOG_LEVEL = "DG_LOG_LEVEL"
_ENV_DELTA_EXTENSIONS = "DG_DELTA_EXTENSIONS"
_ENV_DELTA_MODE = "DG_DELTA_MODE"
_ENV_ARCHIVE_AWARE = "DG_ARCHIVE_AWARE"
#: Where references live: "shared" (beside the folders that use them) or "folder" (one
#: reference.bin per folder, what deltaglider_proxy reads).
_ENV_REFERENCES = "DG_REFERENCES"
_REFERENCES_SHARED = "shared"
_REFERENCES_FOLDER = "folder"
_ENV_CACHE_MAX = "DG_CACHE_MAX_SIZE"
_DEFAULT_MAX_RATIO = 0.5
_DEFAULT_CACHE_MAX = 4 * 1024**3
#: The whole process tree (Python and its xdelta3 children) stays under this by default;
#: DG_MEMORY_LIMIT / create_client(memory_limit=) / --memory-limit allow more (or less).
_ENV_MEMORY_LIMIT = "DG_MEMORY_LIMIT"
_DEFAULT_MEMORY_LIMIT = 600 * 1000**2
_MIN_MEMORY_LIMIT = 256 * 1000**2
#: The gateway's own key pair (clients sign with it); never taken from the command line.
_ENV_GATEWAY_ACCESS_KEY = "DG_GATEWAY_ACCESS_KEY_ID"
_ENV_GATEWAY_SECRET_KEY = "DG_GATEWAY_SECRET_ACCESS_KEY"

#: CLI exit codes (aws s3 conventions; see README).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

###############################################################################
# Errors ######################################################################
###############################################################################


class DeltaGliderError(Exception):
    """Base class of every error deltaglider raises on purpose."""


#: Our error class -> the same class that also derives from botocore's namesake.
_BOTOCORE_FLAVOURS: dict[type, type] = {}


def _botocore_flavour(cls: type) -> type:
    """``cls``, or a subclass of it that also derives from botocore's class of that name,
    so that ``except botocore.exceptions.ClientError`` catches our errors (an ``except``
    clause compares real base classes; ``__instancecheck__`` is never consulted).

    Only when the application has imported botocore itself: without it nobody can name
    botocore's classes in an ``except``, and we never import it (start-up stays stdlib)."""
    if "botocore" not in sys.modules:
        return cls
    flavour = _BOTOCORE_FLAVOURS.get(cls)
    if flavour is None:
        try:
            bexc = __import__("botocore.exceptions", fromlist=["ClientError"])
        except Exception:  # pragma: no cover - a broken botocore install
            return cls
        root = bexc.ClientError if issubclass(cls, ClientError) else bexc.BotoCoreError
        theirs = getattr(bexc, cls.__name__, None)
        if not (isinstance(theirs, type) and issubclass(theirs, root)):
            theirs = root
        namespace = {"__module__": cls.__module__, "_dg_class": cls}
        flavour = type(cls.__name__, (cls, theirs), namespace)
        flavour.__qualname__ = cls.__qualname__
        _BOTOCORE_FLAVOURS[cls] = flavour
    return flavour


class _BotocoreShaped(DeltaGliderError):
    """Errors botocore users catch by botocore's class: see :func:`_botocore_flavour`."""

    #: The class of ours that a class is, or flavours (set on every subclass).
    _dg_class: type

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        base = getattr(cls, "_dg_class", cls)
        flavour: Any = _botocore_flavour(base)  # a subclass of cls, which mypy cannot see
        return super(_BotocoreShaped, flavour).__new__(flavour)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_dg_class" not in cls.__dict__:  # a flavour names the class it flavours
            cls._dg_class = cls


_BotocoreShaped._dg_class = _BotocoreShaped


class BotoCoreError(_BotocoreShaped):
    """An error outside the S3 protocol, shaped like botocore's (a ``fmt`` filled by kwargs)."""

    fmt = "An unspecified error occurred"

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        # Exception's own __init__: botocore's, later in a flavour's MRO, takes other arguments.
        Exception.__init__(self, self.fmt.format(**kwargs))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpickle_botocore_error, (type(self)._dg_class, self.kwargs))


def _unpickle_botocore_error(cls: type, kwargs: dict[str, Any]) -> Any:
    return cls(**kwargs)


class NoCredentialsError(BotoCoreError):
    fmt = "Unable to locate credentials"


class PartialCredentialsError(BotoCoreError):
    fmt = "Partial credentials found in {provider}, missing: {cred_var}"


class CredentialRetrievalError(BotoCoreError):
    fmt = "Error when retrieving credentials from {provider}: {error_msg}"


class ProfileNotFound(BotoCoreError):
    fmt = "The config profile ({profile}) could not be found"


class InvalidConfigError(BotoCoreError):
    fmt = "{error_msg}"


class ParamValidationError(BotoCoreError):
    fmt = "Parameter validation failed:\n{report}"


class EndpointConnectionError(BotoCoreError):
    fmt = 'Could not connect to the endpoint URL: "{endpoint_url}"'


class ConnectTimeoutError(EndpointConnectionError):
    fmt = 'Connect timeout on endpoint URL: "{endpoint_url}"'


class ConnectionClosedError(EndpointConnectionError):
    fmt = (
        "Connection was closed before we received a valid response "
        'from endpoint URL: "{endpoint_url}".'
    )


class SSLError(EndpointConnectionError):
    fmt = "SSL validation failed for {endpoint_url} {error}"


class ReadTimeoutError(BotoCoreError):
    fmt = 'Read timeout on endpoint URL: "{endpoint_url}"'


class IncompleteReadError(BotoCoreError):
    fmt = "{actual_bytes} read, but total bytes expected is {expected_bytes}."


class ResponseParserError(BotoCoreError):
    fmt = "Unable to parse the response from {endpoint_url} (HTTP {status}): {reason}"


class PaginationError(BotoCoreError):
    fmt = "Error during pagination: {message}"


class ClientError(_BotocoreShaped):
    """An error the S3 service answered with, exactly as botocore shapes it."""

    MSG_TEMPLATE = (
        "An error occurred ({error_code}) when calling the {operation_name} "
        "operation{retry_info}: {error_message}"
    )

    def __init__(self, error_response: dict[str, Any], operation_name: str) -> None:
        self.response = error_response
        self.operation_name = operation_name
        err = error_response.get("Error", {})
        meta = error_response.get("ResponseMetadata", {})
        retry_info = ""
        if meta.get("MaxAttemptsReached"):
            retry_info = " (reached max retries: %s)" % meta.get("RetryAttempts", "unknown")
        Exception.__init__(
            self,
            self.MSG_TEMPLATE.format(
                error_code=err.get("Code", "Unknown"),
                operation_name=operation_name,
                retry_info=retry_info,
                error_message=err.get("Message", "Unknown"),
            ),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self)._dg_class, (self.response, self.operation_name))


class NoSuchKey(ClientError):
    pass


class NoSuchBucket(ClientError):
    pass


class NoSuchUpload(ClientError):
    pass


class BucketAlreadyExists(ClientError):
    pass


class BucketAlreadyOwnedByYou(ClientError):
    pass


class AccessDenied(ClientError):
    pass


class InvalidObjectState(ClientError):
    pass


class InvalidRequest(ClientError):
    pass


class TooManyParts(ClientError):
    pass


class EncryptionTypeMismatch(ClientError):
    pass


class IdempotencyParameterMismatch(ClientError):
    pass


class InvalidWriteOffset(ClientError):
    pass


class ObjectAlreadyInActiveTierError(ClientError):
    pass


class ObjectNotInActiveTierError(ClientError):
    pass


#: Error codes with a class of their own, as ``client.exceptions`` in boto3.
_MODELED_ERRORS: dict[str, type[ClientError]] = {
    cls.__name__: cls
    for cls in (
        NoSuchKey,
        NoSuchBucket,
        NoSuchUpload,
        BucketAlreadyExists,
        BucketAlreadyOwnedByYou,
        AccessDenied,
        InvalidObjectState,
        InvalidRequest,
        TooManyParts,
        EncryptionTypeMismatch,
        IdempotencyParameterMismatch,
        InvalidWriteOffset,
        ObjectAlreadyInActiveTierError,
        ObjectNotInActiveTierError,
    )
}


def _client_error(response: dict[str, Any], operation: str) -> ClientError:
    """The ClientError subclass botocore would raise for this error response."""
    code = response.get("Error", {}).get("Code", "")
    cls = _MODELED_ERRORS.get(code, ClientError)
    return cls(response, operation)


#: What the body of a HEAD's error would have said, had it had one: S3 answers a bad key
#: pair with SignatureDoesNotMatch or InvalidAccessKeyId, a wrong clock with
#: RequestTimeTooSkewed; a HEAD only gets the status.
_HEAD_403_HINT = (
    "check that the access key and secret key belong together and that this machine's "
    "clock is right"
)


def _as_operation(e: ClientError, operation: str, keep_multipart: bool = True) -> ClientError:
    """``e``, raised by one of the requests a user's operation makes (the HEAD before a
    GET, the reference's HEAD during a PUT), as an error of that operation: botocore names
    the operation the caller called. A HEAD's bare 403 gets the hint its missing body
    would have carried. Multipart steps keep their names, as aws-cli reports them, unless
    ``keep_multipart`` is false (a CopyObject is one call, whatever it takes here)."""
    if e.operation_name == operation or (
        keep_multipart and e.operation_name in _MULTIPART_OPERATIONS
    ):
        return e
    response = dict(e.response)
    error = dict(response.get("Error") or {})
    if error.get("Code") == "403" and e.operation_name.startswith("Head"):
        error["Message"] = "%s (the %s reply gives no reason: %s)" % (
            error.get("Message") or "Forbidden",
            e.operation_name,
            _HEAD_403_HINT,
        )
    response["Error"] = error
    return _client_error(response, operation)


_MULTIPART_OPERATIONS = frozenset(
    {"CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "AbortMultipartUpload"}
)
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _reports_as(operation: str) -> Callable[[_Fn], _Fn]:
    """Decorate an operation made of several requests: their ClientErrors carry its name
    (see _as_operation)."""

    def decorate(fn: _Fn) -> _Fn:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ClientError as e:
                relabelled = _as_operation(e, operation)
                if relabelled is e:
                    raise
                raise relabelled from e

        return cast(_Fn, wrapper)

    return decorate


class IntegrityError(DeltaGliderError):
    """Bytes did not match the SHA-256 recorded when they were stored; nothing was written."""


class _OutputLimitError(IntegrityError):
    """A delta decodes (or an expanded zip rebuilds) to more bytes than recorded for it."""

    def __init__(self, limit: int, what: str = "dg-file-size") -> None:
        self.limit = limit
        self.what = what
        super().__init__(
            "the delta decodes to more than the %d bytes recorded for it (%s); stopped there"
            % (limit, what)
        )


class XDelta3Error(DeltaGliderError):
    """xdelta3 failed: carries the command, its exit code and (truncated) stderr."""

    _CAP = 750

    def __init__(self, cmd: list[str], returncode: int, stderr: str) -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.stderr = stderr
        shown = stderr.strip()
        if len(shown) > self._CAP:
            shown = shown[: self._CAP] + "... (%d more characters)" % (len(shown) - self._CAP)
        super().__init__(
            "xdelta3 failed (exit %d): %s\n%s" % (returncode, " ".join(cmd), shown or "(no stderr)")
        )


class XDelta3NotFoundError(DeltaGliderError):
    """No xdelta3 binary: needed only when a delta is made (reads fall back to the
    built-in decoder unless DG_DECODER=xdelta3)."""

    def __init__(self, name: str = "xdelta3", why: str = "to make deltas") -> None:
        super().__init__(
            "xdelta3 not found on PATH (looked for %r): install it %s "
            "(Debian/Ubuntu: apt-get install xdelta3; Alpine: apk add xdelta3; "
            "macOS: brew install xdelta)" % (name, why)
        )


###############################################################################
# Helpers: text, files, hashing, temp files, settings #########################
###############################################################################

# -- dates and times --


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _iso_utc(dt: datetime.datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ``, the timestamp format of FORMAT.md."""
    return dt.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_timestamp(value: str) -> datetime.datetime:
    """Parse ISO-8601 (with or without ``Z``/fraction, as older writers left them) or an
    RFC 1123 HTTP date into an aware UTC datetime."""
    import email.utils

    text = value.strip()
    if not text:
        raise ValueError("empty timestamp")
    if text[0].isdigit():
        text = text.replace("Z", "+00:00").replace("z", "+00:00")
        if " " in text and "T" not in text:
            text = text.replace(" ", "T", 1)
        # Python 3.8's fromisoformat takes only 0, 3 or 6 fraction digits.
        m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", text)
        if m and m.group(2):
            frac = (m.group(2)[1:] + "000000")[:6]
            text = m.group(1) + "." + frac + m.group(3)
        dt = datetime.datetime.fromisoformat(text)
    else:
        try:
            dt = email.utils.parsedate_to_datetime(text)
        except (TypeError, IndexError, OverflowError) as e:  # < 3.10 raises these on bad input
            raise ValueError("not a date: %r" % value) from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    try:
        return dt.astimezone(datetime.timezone.utc)
    except OverflowError:  # 9999-12-31T23:00-02:00 is past datetime's last day in UTC
        raise ValueError("date out of range: %r" % value) from None


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()


def _warn_once(kind: str, message: str, *args: Any) -> None:
    """A warning about one kind of bad input, once per process: a listing of 10,000 keys
    with broken dates is one warning, not 10,000."""
    with _WARNED_LOCK:
        if kind in _WARNED:
            return
        _WARNED.add(kind)
    logger.warning(message + " (said once; any others are ignored as well)", *args)


def _date_or_absent(value: str | None, what: str, warn: bool = True) -> datetime.datetime | None:
    """A date a server or another writer gave, or None when it is missing, unreadable or
    out of range (a year past 9999, an offset that leaves datetime's range): such a date is
    treated as absent, never a traceback."""
    if not value:
        return None
    try:
        return _parse_timestamp(value)
    except ValueError:
        if warn:
            _warn_once(what, "ignoring an unreadable or out-of-range %s: %r", what, value[:64])
        return None


def _mtime_or_absent(value: str | None) -> float | None:
    """A ``dg-mtime`` (seconds since the epoch, as written at upload), or None when it is
    missing, not a number, or not a time a file can have (nan, inf, 1e30)."""
    if not value:
        return None
    try:
        stamp = float(value)
        datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc)  # finite, in range
    except (ValueError, OverflowError, OSError):
        _warn_once("dg-mtime", "ignoring an unreadable or out-of-range dg-mtime: %r", value[:64])
        return None
    return stamp


def _timestamp_param(value: Any) -> datetime.datetime | None:
    """A timestamp parameter as botocore takes it: a datetime, epoch seconds or ISO 8601."""
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
    if isinstance(value, str):
        try:
            return _parse_timestamp(value)
        except (ValueError, OverflowError):
            try:
                return datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc)
            except (ValueError, OverflowError):
                return None
    return None


_PRECONDITION_MESSAGE = "At least one of the pre-conditions you specified did not hold"


def _delete_conditions_hold(head: Mapping[str, Any], cond: Mapping[str, Any]) -> bool:
    """DeleteObjects' per-object conditions (ETag, LastModifiedTime, Size) against a HEAD."""
    if cond.get("ETag") is not None:
        if str(cond["ETag"]).strip('"') != str(head.get("ETag", "")).strip('"'):
            return False
    if cond.get("LastModifiedTime") is not None:
        when = _timestamp_param(cond["LastModifiedTime"])
        have = head.get("LastModified")
        if when is None or not isinstance(have, datetime.datetime):
            return False
        if int(when.timestamp()) != int(have.timestamp()):
            return False
    if cond.get("Size") is not None and int(cond["Size"]) != int(head.get("ContentLength", -1)):
        return False
    return True


# -- text: HTTP dates, URL quoting, sizes, XML --


def _http_date(dt: datetime.datetime) -> str:
    import email.utils

    return email.utils.format_datetime(dt.astimezone(datetime.timezone.utc), usegmt=True)


def _quote(text: str, safe: str = "-_.~") -> str:
    """Percent-encode as SigV4 wants: everything but unreserved characters (RFC 3986)."""
    import urllib.parse

    return urllib.parse.quote(text, safe=safe)


def _quote_key(key: str) -> str:
    """An object key as a URL path segment: ``/`` kept, ``//`` kept, never normalised.

    S3 paths are encoded once and not normalised (AWS SigV4 docs, "Do not normalize URI
    paths for requests to Amazon S3"; botocore quotes keys with ``safe='/~'``)."""
    import urllib.parse

    return urllib.parse.quote(key, safe="/~")


def _human_size(num: float) -> str:
    """Base-2 sizes as ``aws s3 ls --human-readable`` prints them."""
    if num == 1:
        return "1 Byte"
    if num < 1024:
        return "%d Bytes" % num
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        num /= 1024.0
        if num < 1024 or unit == "EiB":
            return "%.1f %s" % (num, unit)
    raise AssertionError("unreachable")


def _local_metadata(resp: Mapping[str, Any]) -> dict[str, Any]:
    """ResponseMetadata for answers that deltaglider put together itself."""
    meta = dict(resp.get("ResponseMetadata") or {})
    meta.setdefault("HTTPStatusCode", 200)
    meta.setdefault("RetryAttempts", 0)
    meta.setdefault("RequestId", "")
    meta.setdefault("HostId", "")
    meta.setdefault("HTTPHeaders", {})
    return meta


def _xml_parse(data: bytes, strip: bool = True) -> ET.Element:
    """Parse an S3 XML document; refuse DTDs so no entity is ever expanded (XML bombs).
    Tags lose their namespace unless ``strip`` is false (a reader that takes each tag's
    :func:`_local_name` itself, as a listing page's 6,000 elements are read)."""
    # S3 XML is UTF-8; a UTF-16/32 document would hide a DTD from the byte check below.
    import xml.etree.ElementTree as ET

    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data[:4]:
        raise ValueError("XML that is not UTF-8 is refused")
    lowered = data.lower()
    if b"<!doctype" in lowered or b"<!entity" in lowered:
        raise ValueError("XML with a DTD or entity declarations is refused")
    root = ET.fromstring(data)
    if not strip:
        return root
    for el in root.iter():
        if isinstance(el.tag, str) and el.tag.startswith("{"):
            el.tag = el.tag.split("}", 1)[1]
    return root


def _local_name(tag: Any) -> str:
    """An element's tag without its ``{namespace}``; "" for comments and the like."""
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _xml_text(el: ET.Element | None, name: str, default: str | None = None) -> str | None:
    if el is None:
        return default
    child = el.find(name)
    if child is None:
        return default
    return child.text or ""


def _xml_escape(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&apos;")
    )


def _tag_count(tagging: str) -> int:
    """How many tags an ``x-amz-tagging`` header (``k1=v1&k2=v2``, URL-encoded) sets."""
    import urllib.parse

    return len(urllib.parse.parse_qsl(tagging))


# -- files: hashing, spooling, temp files, slices of a file --


def _random_hex() -> str:
    """32 random hex digits (``uuid4().hex``): temp and part names, upload and request ids."""
    import uuid

    return uuid.uuid4().hex


class _Writer(Protocol):
    """Where the codecs write: a binary file, or a wrapper such as _HashingWriter."""

    def write(self, data: bytes | bytearray, /) -> int: ...


class _FileInfo(NamedTuple):
    """What one pass over some bytes gives: hex SHA-256, hex MD5 ("" unless asked for), size."""

    sha256: str
    md5: str
    size: int


class _Hashes:
    """SHA-256 (and MD5, when asked for) and size of bytes taken in order: the one way file
    contents are hashed. ``read(f)`` takes an open file from where it stands to its end in
    1 MiB reads and hands each chunk to ``each`` too (a copy's ``write``, another hash's
    ``update``), so a copy and its digests come from one pass; ``update`` takes bytes as
    they are written elsewhere."""

    def __init__(self, md5: bool = False) -> None:
        import hashlib

        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5() if md5 else None
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._sha256.update(data)
        if self._md5 is not None:
            self._md5.update(data)
        self.size += len(data)

    def updates(self) -> list[Callable[[bytes], Any]]:
        """``update`` split by digest, each to be given all the bytes in order, so that
        threads of their own can take a digest each (hashlib releases the GIL)."""
        sha256 = self._sha256

        def first(data: bytes) -> None:
            sha256.update(data)
            self.size += len(data)

        return [first] if self._md5 is None else [first, self._md5.update]

    def read(
        self, f: IO[bytes] | io.RawIOBase, each: Callable[[bytes], Any] | None = None
    ) -> _Hashes:
        while True:
            chunk = f.read(_IO_CHUNK)
            if not chunk:
                return self
            self.update(chunk)
            if each is not None:
                each(chunk)

    def info(self) -> _FileInfo:
        md5 = self._md5.hexdigest() if self._md5 is not None else ""
        return _FileInfo(self._sha256.hexdigest(), md5, self.size)


def _hash_file(source: str | IO[bytes], md5: bool = False) -> _FileInfo:
    """SHA-256 (and MD5, with ``md5=True``) and size of a file by path, or of what is left
    in an open file (its position restored when it is seekable), in one pass."""
    if isinstance(source, str):
        with open(source, "rb") as f:
            return _Hashes(md5).read(f).info()
    start = source.tell() if source.seekable() else None
    info = _Hashes(md5).read(source).info()
    if start is not None:
        source.seek(start)
    return info


# x-amz-checksum-* of uploads (AWS "Checking object integrity"): the gateway checks them
# as bodies arrive, the client checks them; both store them (dg-checksum-<algo>).


@functools.lru_cache(maxsize=None)
def _crc_table(poly: int, bits: int) -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc & ((1 << bits) - 1))
    return table


class _Crc:
    """A reflected table-driven CRC (CRC32C, CRC64NVME): pure Python, so slow (a few MB/s);
    S3 SDKs default to CRC32, which zlib computes at memory speed."""

    def __init__(self, poly: int, bits: int) -> None:
        self._table = _crc_table(poly, bits)
        self._bits = bits
        self._mask = (1 << bits) - 1
        self._crc = self._mask

    def update(self, data: bytes) -> None:
        crc, table = self._crc, self._table
        for b in data:
            crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
        self._crc = crc

    def digest(self) -> bytes:
        return (self._crc ^ self._mask).to_bytes(self._bits // 8, "big")


class _Crc32:
    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def digest(self) -> bytes:
        return self._crc.to_bytes(4, "big")


def _new_hash(name: str) -> Any:
    """``hashlib.new(name)``, for _CHECKSUMS (a table built at import, hashlib at first use)."""
    import hashlib

    return hashlib.new(name)


#: x-amz-checksum-<name> → a hasher factory (AWS "Checking object integrity").
_CHECKSUMS: dict[str, Callable[[], Any]] = {
    "crc32": _Crc32,
    "crc32c": lambda: _Crc(0x82F63B78, 32),
    "crc64nvme": lambda: _Crc(0x9A6C9329AC4BC9B5, 64),
    "sha1": functools.partial(_new_hash, "sha1"),
    "sha256": functools.partial(_new_hash, "sha256"),
}


def _file_checksum(path: str, algo: str) -> str:
    """The base64 x-amz-checksum-<algo> of a file (the value S3 stores and returns)."""
    hasher = _CHECKSUMS[algo]()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_IO_CHUNK), b""):
            hasher.update(chunk)
    return base64.b64encode(hasher.digest()).decode("ascii")


def _copy_to(src: int, out: int, each: Callable[[bytes], Any] | None = None) -> None:
    """Append what is left of file ``src`` to file ``out`` (descriptors, unbuffered). With
    ``each`` (a hash's ``update``), through 1 MiB reads handed to it; without, by the
    kernel where it can (copy_file_range: the bytes never pass through this process, and
    share extents on reflink file systems), else by reads from where that stopped."""
    if each is None and hasattr(os, "copy_file_range"):
        with contextlib.suppress(OSError):  # not on these file systems: read below
            while os.copy_file_range(src, out, 1 << 30):
                pass
            return
    while True:
        chunk = os.read(src, _IO_CHUNK)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view) :]
        if each is not None:
            each(chunk)


def _spool(body: Any) -> IO[bytes]:
    """Copy a non-seekable stream into an anonymous temporary file (private, removed on
    close; not SpooledTemporaryFile, which has no seekable() before Python 3.11)."""
    import tempfile

    spooled: IO[bytes] = tempfile.TemporaryFile()
    while True:
        chunk = body.read(_IO_CHUNK)
        if not chunk:
            break
        spooled.write(chunk)
    spooled.seek(0)
    return spooled


def _private_tempfile(folder: str, suffix: str = "", prefix: str = ".dg-") -> tuple[int, str]:
    """A new empty file, open for writing: ``(fd, path)``. Every named temporary file is
    made here: private from the start (mkstemp creates it 0600, so nobody reads a secret
    or a spooled body through it), in ``folder``, the folder of what it becomes, so that
    the final os.replace is atomic, and named ``<prefix>XXXXXXXX<suffix>.tmp``, so that a
    sweep can tell a leftover by its name. Files that need no name (a body spooled for
    retries, xdelta3's stderr) are tempfile.TemporaryFile: private, and gone at close."""
    import tempfile

    return tempfile.mkstemp(prefix=prefix, suffix=suffix + ".tmp", dir=folder)


class _Background:
    """A function run in a daemon thread; ``result()`` waits and re-raises its error.
    Used to overlap hashing (hashlib releases the GIL) with xdelta3 and network I/O."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._fn = fn
        self._args = args
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as e:  # handed to the caller of result()
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class _ReadAhead:
    """A file read to its end by a thread of its own, at most ``ahead`` chunks before its
    reader, each chunk handed to ``each`` (a hash's update) in that thread before the
    reader gets it: a comparison reading the file and the hashing of those very bytes
    then run on two cores, over one read. ``read(n)`` gives n bytes but at the end, as a
    file does; ``close`` stops the thread and waits for it, so what ``each`` was given is
    complete once a reader that saw the end closes it."""

    def __init__(
        self, f: IO[bytes] | _ReadAhead, each: Callable[[bytes], Any], ahead: int = 8
    ) -> None:
        self._f = f
        self._each = each
        self._ahead = ahead
        self._chunks: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._ended = False  # the thread is done: at the end of the file, failed or closed
        self._closed = False
        self._error: BaseException | None = None
        self._rest = b""  # of a chunk read in part
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for chunk in iter(lambda: self._f.read(_IO_CHUNK), b""):
                self._each(chunk)
                with self._cond:
                    while len(self._chunks) >= self._ahead and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    self._chunks.append(chunk)
                    self._cond.notify_all()
        except BaseException as e:  # the reader raises it
            self._error = e
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _next(self) -> bytes:
        with self._cond:
            while not self._chunks and not self._ended:
                self._cond.wait()
            if self._chunks:
                self._cond.notify_all()
                return self._chunks.popleft()
        if self._error is not None:
            raise self._error
        return b""

    def read(self, n: int) -> bytes:
        data = self._rest or self._next()
        while 0 < len(data) < n:
            more = self._next()
            if not more:
                break
            data += more
        self._rest = data[n:]
        return data if len(data) <= n else data[:n]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()


class _FileSlice(io.RawIOBase):
    """A read-only window ``[offset, offset+length)`` of a file, rewindable for retries."""

    def __init__(self, f: IO[bytes], offset: int, length: int) -> None:
        super().__init__()
        self._f = f
        self._offset = offset
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        elif whence == 2:
            pos += self._length
        self._pos = max(0, min(pos, self._length))
        return self._pos

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._pos
        if size is None or size < 0 or size > left:
            size = left
        if size <= 0:
            return b""
        self._f.seek(self._offset + self._pos)
        data = self._f.read(size)
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")[: max(0, self._length - self._pos)]
        if not view:
            return 0
        self._f.seek(self._offset + self._pos)
        n: int = self._f.readinto(view)  # type: ignore[attr-defined]
        self._pos += n
        return n

    def __len__(self) -> int:
        return self._length


def _body_length(body: Any) -> int | None:
    """Length of what is left to read in a request body, or None when it cannot be known."""
    if body is None:
        return 0
    if isinstance(body, (bytes, bytearray, memoryview)):
        return len(body)
    if hasattr(body, "__len__") and hasattr(body, "read"):
        return int(len(body) - body.tell())  # _FileSlice, _CallbackReader: total length
    try:
        fileno = body.fileno()
        st = os.fstat(fileno)
        if stat.S_ISREG(st.st_mode):
            return int(st.st_size - body.tell())
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    if hasattr(body, "seekable") and body.seekable():
        pos = body.tell()
        end = body.seek(0, 2)
        body.seek(pos)
        return int(end - pos)
    return None


# -- S3 URLs, bucket names and keys --


class _S3Url(NamedTuple):
    bucket: str
    key: str


def _parse_s3_url(url: str) -> _S3Url:
    """``s3://bucket/key`` → (bucket, key). The key keeps ``//`` and trailing slashes."""
    if not url.startswith("s3://"):
        raise ValueError("not an S3 URL (expected s3://bucket/key): %r" % url)
    rest = url[5:]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError("S3 URL without a bucket name: %r" % url)
    return _S3Url(bucket, key)


def _validate_bucket_name(bucket: str) -> None:
    if not re.match(_BUCKET_NAME_RE, bucket) or ".." in bucket:
        raise ParamValidationError(
            report='Invalid bucket name "%s": Bucket name must match the regex '
            '"^[a-zA-Z0-9.\\-_]{1,255}$"' % bucket
        )


def _validate_key(key: str) -> None:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ParamValidationError(report="Key %r is not valid UTF-8 text" % key) from None
    if not key:
        raise ParamValidationError(
            report="Invalid length for parameter Key, value: 0, valid min length: 1"
        )
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        raise ParamValidationError(
            report="Key is %d bytes long; S3 keys are at most %d bytes in UTF-8"
            % (len(key.encode("utf-8")), _MAX_KEY_BYTES)
        )


# -- settings: one parser per kind --
# Every DG_* variable, numeric AWS_* variable and numeric CLI option goes through one of these,
# so a bad value fails before any work with a message naming the setting and what it accepts.

#: Size suffixes, powers of 1024 as aws s3's multipart_chunksize takes them ("4G", "512MiB").
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_RE = r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$"
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def _bad_setting(name: str, accepted: str, text: str) -> InvalidConfigError:
    return InvalidConfigError(error_msg="%s must be %s, not %r" % (name, accepted, text))


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return " from %s to %s" % (minimum, maximum)
    if minimum is not None:
        return " of at least %s" % minimum
    return " of at most %s" % maximum if maximum is not None else ""


def _parse_int(
    text: str, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    accepted = "a whole number" + _bounds(minimum, maximum)
    try:
        value = int(text.strip())
    except ValueError:
        raise _bad_setting(name, accepted, text) from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _bad_setting(name, accepted, text)
    return value


def _parse_number(
    text: str,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> float:
    accepted = "a number" + (" greater than %s" % above if above is not None else "")
    accepted += _bounds(minimum, maximum)
    try:
        value = float(text.strip())
    except ValueError:
        raise _bad_setting(name, accepted, text) from None
    if (
        not math.isfinite(value)
        or (above is not None and value <= above)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise _bad_setting(name, accepted, text)
    return value


#: The examples a size setting's message gives: only those its minimum allows are shown.
_SIZE_EXAMPLES = (("1048576", 1 << 20), ("512M", 512 << 20), ("4G", 4 << 30))


def _parse_size(text: str, name: str, *, minimum: int = 0) -> int:
    """Bytes: ``1048576``, ``512M``, ``4G``, ``1.5GiB`` (K/M/G/T are powers of 1024)."""
    examples = [text for text, size in _SIZE_EXAMPLES if size >= minimum] or ["%d" % minimum]
    accepted = "a size in bytes such as " + ", ".join(examples[:-1])
    accepted += " or " + examples[-1] if len(examples) > 1 else examples[-1]
    if minimum:
        accepted += " (at least %d)" % minimum
    match = re.match(_SIZE_RE, text)
    if match is None:
        raise _bad_setting(name, accepted, text)
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if value < minimum:
        raise _bad_setting(name, accepted, text)
    return value


def _parse_choice(text: str, name: str, *, choices: Mapping[str, str]) -> str:
    """One of ``choices`` (case-insensitive): a map from each accepted word to its meaning,
    so aliases (``off`` for ``never``) land on one value."""
    value = choices.get(text.strip().lower())
    if value is None:
        names = list(dict.fromkeys(choices.values()))
        accepted = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise _bad_setting(name, accepted, text)
    return value


def _parse_path(text: str, name: str) -> str:
    """A path or a program's name, taken as written."""
    return text


def _parse_text(text: str, name: str) -> str:
    """A word such as an access key, without the spaces around it."""
    return text.strip()


def _parse_list(text: str, name: str) -> tuple[str, ...]:
    """Comma-separated words, each without the spaces around it; empty ones are dropped."""
    return tuple(word.strip() for word in text.split(",") if word.strip())


def _parse_bool(text: str, name: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise _bad_setting(name, "1 or 0 (true/false, yes/no, on/off)", text)


class _Setting(NamedTuple):
    """How one environment variable is read: its parser and its value when unset or empty."""

    parse: Callable[[str, str], Any]
    default: Any


_DELTA_MODES = {
    "auto": "auto",
    "always": "always",
    "on": "always",
    "1": "always",
    "true": "always",
    "never": "never",
    "off": "never",
    "0": "never",
    "false": "never",
}
_DECODERS = {"auto": "auto", "xdelta3": "xdelta3", "python": "python"}
_REFERENCE_MODES = {_REFERENCES_SHARED: _REFERENCES_SHARED, _REFERENCES_FOLDER: _REFERENCES_FOLDER}
_LOG_LEVELS = {n.lower(): n for n in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")}

#: Every DG_* variable deltaglider reads.
_DG_SETTINGS: dict[str, _Setting] = {
    _ENV_MAX_RATIO: _Setting(
        functools.partial(_parse_number, minimum=0.0, maximum=1.0), _DEFAULT_MAX_RATIO
    ),
    _ENV_CACHE_MAX: _Setting(_parse_size, _DEFAULT_CACHE_MAX),
    _ENV_MEMORY_LIMIT: _Setting(
        functools.partial(_parse_size, minimum=_MIN_MEMORY_LIMIT), _DEFAULT_MEMORY_LIMIT
    ),
    _ENV_DELTA_MODE: _Setting(functools.partial(_parse_choice, choices=_DELTA_MODES), "auto"),
    _ENV_ARCHIVE_AWARE: _Setting(_parse_bool, False),
    _ENV_REFERENCES: _Setting(
        functools.partial(_parse_choice, choices=_REFERENCE_MODES), _REFERENCES_SHARED
    ),
    _ENV_DECODER: _Setting(functools.partial(_parse_choice, choices=_DECODERS), "auto"),
    _ENV_LOG_LEVEL: _Setting(functools.partial(_parse_choice, choices=_LOG_LEVELS), None),
    _ENV_DELTA_EXTENSIONS: _Setting(_parse_list, ()),
    _ENV_XDELTA3: _Setting(_parse_path, None),
    _ENV_CACHE_DIR: _Setting(_parse_path, None),
    _ENV_GATEWAY_ACCESS_KEY: _Setting(_parse_text, ""),
    _ENV_GATEWAY_SECRET_KEY: _Setting(_parse_text, ""),
}


def _env_setting(environ: Mapping[str, str], name: str) -> Any:
    """The parsed value of a DG_* variable (its default when unset or empty)."""
    setting = _DG_SETTINGS[name]
    text = environ.get(name, "")
    return setting.parse(text, name) if text.strip() else setting.default


def _check_settings(environ: Mapping[str, str]) -> None:
    """Parse every DG_* variable now, so a bad one stops a run before it starts."""
    for name in _DG_SETTINGS:
        _env_setting(environ, name)


###############################################################################
# Configuration and credentials ###############################################
###############################################################################

# Resolution follows botocore 1.43 (credentials.py, configprovider.py, configloader.py) unless a
# comment says otherwise. Secrets never reach a log line or an exception message: errors name the
# source (env var, profile, host) and never echo file lines, process output or response bodies.

_DEFAULT_REGION = "us-east-1"  # what botocore gives an S3 client with no region configured
_ADDRESSING_STYLES = ("auto", "path", "virtual")
_SIGNATURE_VERSIONS = ("s3v4", "unsigned")
_REGION_RE = r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$"  # botocore's check
_PROFILE_ENV_VARS = ("AWS_DEFAULT_PROFILE", "AWS_PROFILE")  # first one set wins
_SERVICES_S3 = "services.s3"  # profile key holding the `[services NAME]` section's `s3` block
# botocore refresh windows (credentials.py L80-81): try to refresh at 15 min left, must at 10.
_ADVISORY_REFRESH = datetime.timedelta(minutes=15)
_MANDATORY_REFRESH = datetime.timedelta(minutes=10)
_CONTAINER_ENDPOINT = "http://169.254.170.2"  # ECS task role, for the RELATIVE_URI variable
_CONTAINER_FULL_URI_HOSTS = frozenset(
    {"169.254.170.2", "169.254.170.23", "fd00:ec2::23", "localhost"}  # ECS, EKS Pod Identity
)
_CONTAINER_TIMEOUT = 2.0
_CONTAINER_ATTEMPTS = 3
_CONTAINER_RETRY_SLEEP = 1.0
_IMDS_ENDPOINTS = {"ipv4": "http://169.254.169.254", "ipv6": "http://[fd00:ec2::254]"}
_IMDS_TOKEN_PATH = "/latest/api/token"
_IMDS_ROLE_PATH = "/latest/meta-data/iam/security-credentials/"
_IMDS_TOKEN_TTL = "21600"  # seconds; the value botocore requests
_IMDS_NO_TOKEN_STATUSES = (403, 404, 405)  # IMDSv1-only or token-less setups: fall back to v1
_UNSUPPORTED_PROFILE_KEYS = (  # credential sources botocore has and deltaglider does not
    ("sso_session", "sso"),
    ("sso_start_url", "sso"),
    ("role_arn", "assume-role"),
    ("web_identity_token_file", "assume-role-with-web-identity"),
)

_Profile = Dict[str, Union[str, Dict[str, str]]]
# http_request(method, url, headers, timeout) -> (status, body); raises OSError,
# HTTPException, or _ReplyTooLarge.
_HttpRequest = Callable[[str, str, Mapping[str, str], float], Tuple[int, bytes]]
_Run = Callable[..., "subprocess.CompletedProcess[bytes]"]


def _run_process(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """subprocess.run, imported when a process first starts: most commands start none."""
    import subprocess

    return subprocess.run(*args, **kwargs)


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() == "true"  # botocore ensure_boolean


def _profile_str(profile: _Profile, key: str) -> str | None:
    value = profile.get(key)
    return value if isinstance(value, str) and value else None


def _setting(environ: Mapping[str, str], var: str, profile: _Profile, key: str) -> str | None:
    """An environment variable beats the profile key; empty values count as unset."""
    return environ.get(var) or _profile_str(profile, key)


def _is_region(value: object) -> bool:
    # The region becomes part of the host name and the SigV4 scope.
    return isinstance(value, str) and bool(re.match(_REGION_RE, value))


def _check_region(region: str) -> str:
    if not _is_region(region):
        raise InvalidConfigError(error_msg=f"Invalid region name: {region!r}")
    return region


def _check_endpoint(url: str) -> str:
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidConfigError(
            error_msg=f"Invalid endpoint URL {url!r}: expected http(s)://host[:port]"
        )
    return url


def _nonempty(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_seconds(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


# Config option -> (default, check, what the check expects).
_CONFIG_OPTIONS: dict[str, tuple[Any, Callable[[Any], bool], str]] = {
    "region_name": (None, lambda v: v is None or _is_region(v), "a region such as 'eu-west-1'"),
    "connect_timeout": (60.0, _is_seconds, "a positive number of seconds"),
    "read_timeout": (60.0, _is_seconds, "a positive number of seconds"),
    "request_timeout": (_DEFAULT_REQUEST_TIMEOUT, _is_seconds, "a positive number of seconds"),
    "max_attempts": (None, lambda v: v is None or _is_count(v), "an integer >= 1 (total)"),
    "max_pool_connections": (10, _is_count, "an integer >= 1"),
    "addressing_style": (None, lambda v: v in (None, *_ADDRESSING_STYLES), "auto, path or virtual"),
    "verify": (None, lambda v: v is None or isinstance(v, bool) or _nonempty(v), "a bool or path"),
    "proxies": (
        None,
        lambda v: (
            v is None
            or (isinstance(v, dict) and all(_nonempty(k) and _nonempty(u) for k, u in v.items()))
        ),
        "a dict such as {'https': 'http://proxy:3128'}",
    ),
    "payload_signing": (True, lambda v: isinstance(v, bool), "True or False"),
    "user_agent_extra": (
        None,
        lambda v: v is None or (isinstance(v, str) and not re.search(r"[\r\n]", v)),
        "a string without line breaks",
    ),
    "signature_version": ("s3v4", lambda v: v in _SIGNATURE_VERSIONS, "s3v4 or unsigned"),
}


class Config:
    """Client options: a small subset of botocore.config.Config.

    None means "resolve it": region from AWS_REGION/AWS_DEFAULT_REGION/the profile, max_attempts
    (total attempts) from AWS_MAX_ATTEMPTS/the profile/3, verify from AWS_CA_BUNDLE/the profile's
    ca_bundle/True, proxies from HTTP(S)_PROXY/NO_PROXY, addressing_style from the profile's
    `s3 = addressing_style = ...`/'auto'. signature_version='unsigned' sends anonymous requests.
    """

    def __init__(
        self,
        *,
        region_name: str | None = None,
        connect_timeout: float = 60.0,
        read_timeout: float = 60.0,
        request_timeout: float = _DEFAULT_REQUEST_TIMEOUT,
        max_attempts: int | None = None,
        max_pool_connections: int = 10,
        addressing_style: str | None = None,
        verify: bool | str | None = None,
        proxies: dict[str, str] | None = None,
        payload_signing: bool = True,
        user_agent_extra: str | None = None,
        signature_version: str = "s3v4",
    ) -> None:
        self.region_name = region_name
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.request_timeout = request_timeout
        self.max_attempts = max_attempts
        self.max_pool_connections = max_pool_connections
        self.addressing_style = addressing_style
        self.verify = verify
        self.proxies = proxies
        self.payload_signing = payload_signing
        self.user_agent_extra = user_agent_extra
        self.signature_version = signature_version
        for name, (_, valid, expected) in _CONFIG_OPTIONS.items():
            if not valid(getattr(self, name)):
                shown = "(not shown)" if name == "proxies" else repr(getattr(self, name))
                raise InvalidConfigError(
                    error_msg=f"Invalid Config {name}={shown}: expected {expected}"
                )

    def _options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _CONFIG_OPTIONS}

    def merge(self, other: Config) -> Config:
        """A new Config: this one with `other`'s options laid over it (like botocore).

        botocore tracks which options were passed; here an option counts as set when it differs
        from its default.
        """
        options = self._options()
        for name, value in other._options().items():
            if value != _CONFIG_OPTIONS[name][0]:
                options[name] = value
        return Config(**options)

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._options().items() if v != _CONFIG_OPTIONS[k][0]}
        if "proxies" in changed:
            changed["proxies"] = "..."  # may hold user:password
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + ")"


# -- shared config and credentials files --


def _profile_name(explicit: str | None, environ: Mapping[str, str]) -> str:
    if explicit:
        return explicit
    for var in _PROFILE_ENV_VARS:
        if environ.get(var):
            return environ[var]
    return "default"


def _expand_path(path: str, environ: Mapping[str, str]) -> str:
    """expandvars + expanduser against the injected environment, not os.environ."""
    path = re.sub(
        r"\$(\w+)|\$\{([^}]*)\}",
        lambda m: environ.get(m.group(1) or m.group(2), m.group(0)),
        path,
    )
    if path == "~" or path.startswith(("~/", "~" + os.sep)):
        home = environ.get("HOME") or environ.get("USERPROFILE")
        return home + path[1:] if home else os.path.expanduser(path)
    return path


def _parse_nested(value: str, where: str) -> dict[str, str]:
    # `s3 =\n  addressing_style = path`: a value starting with a newline is one nested level
    # (botocore configloader.py L182-198).
    nested: dict[str, str] = {}
    for line in value.splitlines():
        line = line.strip()
        if not line:
            continue
        key, sep, item = line.partition("=")
        if not sep:
            raise InvalidConfigError(
                error_msg=f"Invalid nested value for {where}: expected 'key = value' lines"
            )
        nested[key.strip()] = item.strip()
    return nested


def _read_ini(path: str) -> dict[str, _Profile]:
    # RawConfigParser: no %-interpolation, so secrets containing '%' survive (as in botocore).
    import configparser

    parser = configparser.RawConfigParser()
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:
        raise InvalidConfigError(
            error_msg=f"Unable to read config file {path}: {exc.strerror}"
        ) from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        # configparser's own messages quote the offending line, which may be a secret.
        errors = getattr(exc, "errors", None)  # ParsingError: [(lineno, line), ...]
        lineno = errors[0][0] if errors else getattr(exc, "lineno", None)
        where = f" near line {lineno}" if lineno else ""
        raise InvalidConfigError(error_msg=f"Unable to parse config file {path}{where}") from None
    sections: dict[str, _Profile] = {}
    for section in parser.sections():
        values: _Profile = {}
        for key, value in parser.items(section):
            where = f"{key!r} in [{section}] of {path}"
            values[key] = _parse_nested(value, where) if value.startswith("\n") else value
        sections[section] = values
    return sections


def _load_profile(profile_name: str | None, *, environ: Mapping[str, str] = os.environ) -> _Profile:
    """The named profile's settings from the config and credentials files, merged.

    Config file sections are `[default]`, `[profile NAME]` and `[services NAME]`; credentials
    file sections are bare profile names and their keys win. When the profile says
    `services = NAME`, that section's `s3` block is stored under the key "services.s3".
    """
    name = _profile_name(profile_name, environ)
    config_path = _expand_path(environ.get("AWS_CONFIG_FILE") or "~/.aws/config", environ)
    creds_path = _expand_path(
        environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials", environ
    )
    profile: _Profile | None = None
    services: dict[str, _Profile] = {}
    for section, values in _read_ini(config_path).items():
        kind, _, rest = section.partition(" ")
        rest = rest.strip().strip("\"'")
        if kind == "services" and rest:
            services[rest] = values
        elif (section == "default" and name == "default") or (kind == "profile" and rest == name):
            profile = {**(profile or {}), **values}
    creds_section = _read_ini(creds_path).get(name)
    if creds_section is not None:
        profile = {**(profile or {}), **creds_section}
    if profile is None:
        if name == "default":  # botocore: a missing default profile is simply empty
            return {}
        raise ProfileNotFound(profile=name)
    service_name = _profile_str(profile, "services")
    s3_block = services.get(service_name or "", {}).get("s3")
    if isinstance(s3_block, dict):
        profile[_SERVICES_S3] = s3_block
    return profile


# -- region, endpoint and client settings --


def _resolve_region(explicit: str | None, *, environ: Mapping[str, str], profile: _Profile) -> str:
    # Deliberate deviation: botocore ignores AWS_REGION (boto3 #2574, #3620), but AWS CLI v2 and
    # the JS, Go and Java SDKs honour it first, and users expect that.
    for value in (
        explicit,
        environ.get("AWS_REGION"),
        environ.get("AWS_DEFAULT_REGION"),
        _profile_str(profile, "region"),
    ):
        if value:
            return _check_region(value)
    return _DEFAULT_REGION


def _resolve_endpoint(
    explicit: str | None, *, environ: Mapping[str, str], profile: _Profile
) -> str | None:
    # botocore configprovider.py L945-1081.
    if explicit:
        return _check_endpoint(explicit)
    ignore = _setting(
        environ, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", profile, "ignore_configured_endpoint_urls"
    )
    if _is_true(ignore):
        return None
    s3_block = profile.get(_SERVICES_S3)
    for value in (
        environ.get("AWS_ENDPOINT_URL_S3"),
        environ.get("AWS_ENDPOINT_URL"),
        s3_block.get("endpoint_url") if isinstance(s3_block, dict) else None,
        _profile_str(profile, "endpoint_url"),
    ):
        if value:
            return _check_endpoint(value)
    return None


class _ClientSettings(NamedTuple):
    region: str
    endpoint_url: str | None
    addressing_style: str  # 'auto' | 'path' | 'virtual'
    max_attempts: int  # total attempts
    verify: bool | str  # False, True or a CA bundle path
    connect_timeout: float
    read_timeout: float
    request_timeout: float
    max_pool_connections: int
    proxies: dict[str, str] | None  # None: use the environment, see _proxy_for
    payload_signing: bool
    user_agent_extra: str | None
    unsigned: bool
    profile: _Profile
    profile_name: str
    profile_explicit: bool


def _resolve_client_settings(
    config: Config | None,
    *,
    region_name: str | None = None,
    endpoint_url: str | None = None,
    profile_name: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> _ClientSettings:
    """Everything the client needs except credentials; arguments beat `config`, which beats
    the environment, which beats the profile. Reads the shared files, nothing else."""
    config = config or Config()
    name = _profile_name(profile_name, environ)
    profile = _load_profile(name, environ=environ)
    s3_block = profile.get("s3")
    style = (s3_block.get("addressing_style") if isinstance(s3_block, dict) else None) or "auto"
    style = config.addressing_style or style
    if style not in _ADDRESSING_STYLES:
        raise InvalidConfigError(
            error_msg=f"Invalid s3 addressing_style {style!r} in profile {name!r}: expected "
            + ", ".join(_ADDRESSING_STYLES)
        )
    attempts = config.max_attempts
    if attempts is None:
        raw = _setting(environ, "AWS_MAX_ATTEMPTS", profile, "max_attempts")
        attempts = _parse_int(raw, "max_attempts", minimum=1) if raw else _DEFAULT_MAX_ATTEMPTS
    verify = config.verify
    if verify is None:
        verify = _setting(environ, "AWS_CA_BUNDLE", profile, "ca_bundle") or True
    return _ClientSettings(
        region=_resolve_region(region_name or config.region_name, environ=environ, profile=profile),
        endpoint_url=_resolve_endpoint(endpoint_url, environ=environ, profile=profile),
        addressing_style=style,
        max_attempts=attempts,
        verify=verify,
        connect_timeout=float(config.connect_timeout),
        read_timeout=float(config.read_timeout),
        request_timeout=float(config.request_timeout),
        max_pool_connections=config.max_pool_connections,
        proxies=config.proxies,
        payload_signing=config.payload_signing,
        user_agent_extra=config.user_agent_extra,
        unsigned=config.signature_version == "unsigned",
        profile=profile,
        profile_name=name,
        profile_explicit=profile_name is not None,
    )


# -- proxies --


def _env_proxy_var(environ: Mapping[str, str], name: str) -> str | None:
    # Lowercase wins, as in urllib.request.getproxies_environment. Under CGI, HTTP_PROXY can be
    # set by a request header ("httpoxy"), so it is ignored there.
    if name == "http_proxy" and "REQUEST_METHOD" in environ:
        return environ.get(name) or None
    return environ.get(name) or environ.get(name.upper()) or None


def _no_proxy_matches(host: str, port: int, no_proxy: str) -> bool:
    import ipaddress

    for entry in re.split(r"[,\s]+", no_proxy.strip().lower()):
        if not entry:
            continue
        if entry == "*":
            return True
        entry_host, entry_port = entry, ""
        if entry.startswith("["):  # [v6] or [v6]:port
            entry_host, _, rest = entry[1:].partition("]")
            entry_port = rest[1:] if rest.startswith(":") else ""
        elif entry.count(":") == 1:  # host:port (a bare IPv6 literal has several colons)
            entry_host, entry_port = entry.split(":")
        if entry_port and entry_port != str(port):
            continue
        try:
            network = ipaddress.ip_network(entry_host, strict=False)
        except ValueError:
            domain = entry_host.lstrip("*").lstrip(".")
            if domain and (host == domain or host.endswith("." + domain)):
                return True
            continue
        try:
            if ipaddress.ip_address(host) in network:
                return True
        except ValueError:
            pass
    return False


def _proxy_for(
    url: str, proxies: Mapping[str, str] | None, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The proxy URL to use for `url`, or None to connect directly.

    Explicit `proxies` ({'http': ..., 'https': ...}) are used as given, as botocore does;
    otherwise <scheme>_proxy, then all_proxy, unless no_proxy matches (domains with or without a
    leading dot, `*`, host:port, IP addresses and CIDR blocks).
    """
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return None
    if proxies is not None:
        proxy = proxies.get(scheme) or None
    else:
        proxy = _env_proxy_var(environ, scheme + "_proxy") or _env_proxy_var(environ, "all_proxy")
        host = (parts.hostname or "").lower()
        port = parts.port or (443 if scheme == "https" else 80)
        no_proxy = _env_proxy_var(environ, "no_proxy") or ""
        if proxy and _no_proxy_matches(host, port, no_proxy):
            return None
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy  # as curl and requests do
    return proxy


# -- credentials --


class _Credentials(NamedTuple):
    access_key: str
    secret_key: str
    token: str | None
    expiry: datetime.datetime | None  # aware UTC; None for credentials that never expire

    def __repr__(self) -> str:  # keep secrets out of tracebacks and debug output
        return f"_Credentials(access_key={self.access_key[:4]}..., expiry={self.expiry})"


#: C0 controls, DEL and C1 controls: refused in credentials, percent-encoded in metadata,
#: escaped when printed (one pattern; a second definition later used to rebind this one).
_CONTROL_CHARS = "[\x00-\x1f\x7f-\x9f]"


def _credential_value(value: str, name: str, provider: str, header: bool = True) -> str:
    """A credential as it will be used, from any source. Surrounding whitespace (a stray CR
    or LF from a file, a pasted export or a helper's output) is dropped with a warning; a
    control character inside, or a non-ASCII one in a value sent in a header (the key id,
    the token), is refused. Messages name the variable, never the value."""
    text = value.strip()
    if text != value:
        logger.warning("%s has leading or trailing whitespace (a stray line break?): ignored", name)
    if re.search(_CONTROL_CHARS, text) or (header and not all(ord(c) < 128 for c in text)):
        raise CredentialRetrievalError(
            provider=provider,
            error_msg="%s contains a line break, control or non-ASCII character (the value is "
            "not shown)" % name,
        )
    return text


def _checked_credentials(
    provider: str, names: tuple[str, str, str], key: str, secret: str, token: str | None
) -> tuple[str, str, str | None]:
    """(access key, secret key, token) through _credential_value; ``names`` are the
    variables or fields they came from, for the messages."""
    checked_token = _credential_value(token, names[2], provider) if token else ""
    return (
        _credential_value(key, names[0], provider),
        _credential_value(secret, names[1], provider, header=False),
        checked_token or None,
    )


class _CredentialProvider:
    """Hands out credentials, refreshing expiring ones inside botocore's windows.

    With less than 15 minutes left a refresh is tried and a failure only logged (the current
    credentials still work); with less than 10 minutes left a failed refresh raises.
    """

    def __init__(
        self,
        method: str,
        credentials: _Credentials,
        *,
        refresh: Callable[[], _Credentials] | None = None,
        now: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self.method = method  # e.g. 'env', for --debug
        self._credentials = credentials
        self._refresh = refresh
        self._now = now
        self._lock = threading.Lock()

    def get(self) -> _Credentials:
        if self._refresh is None:
            return self._credentials
        with self._lock:
            current = self._credentials
            if current.expiry is None:
                return current
            remaining = current.expiry - self._now()
            if remaining >= _ADVISORY_REFRESH:
                return current
            try:
                self._credentials = self._refresh()
            except Exception as exc:
                if remaining < _MANDATORY_REFRESH:
                    raise
                # Our refresh functions never put secrets in exception text.
                logger.warning(
                    "Refreshing %s credentials failed, using the current ones (they expire at "
                    "%s): %s",
                    self.method,
                    current.expiry.isoformat(),
                    exc,
                )
            else:
                logger.debug("Refreshed %s credentials", self.method)
            return self._credentials


def _parse_expiry(value: object, provider: str) -> datetime.datetime | None:
    """An Expiration as an aware UTC datetime. One past datetime's range (year 10000, or
    9999-12-31 with a negative offset) is treated as absent: the credentials are used as
    never expiring, with a warning. Anything else that is not a date is an error."""
    text = value.strip() if isinstance(value, str) else ""
    if text[-1:] in ("Z", "z"):  # fromisoformat accepts 'Z' only from Python 3.11
        text = text[:-1] + "+00:00"
    try:
        expiry = datetime.datetime.fromisoformat(text)
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=datetime.timezone.utc)
        return expiry.astimezone(datetime.timezone.utc)
    except OverflowError:
        pass
    except ValueError:
        if not re.match(r"^[+-]?\d{5,}-\d\d-\d\d", text):
            raise CredentialRetrievalError(
                provider=provider, error_msg=f"invalid Expiration {value!r}"
            ) from None
    _warn_once(
        "Expiration",
        "ignoring the out-of-range Expiration %r of %s credentials",
        text[:40],
        provider,
    )
    return None


def _credentials_from_json(body: bytes, provider: str, token_key: str) -> _Credentials:
    """Parse the JSON of credential_process (token_key 'SessionToken') or of the container and
    IMDS endpoints ('Token'). Error messages name fields, never values."""
    import json

    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise CredentialRetrievalError(provider=provider, error_msg="response is not a JSON object")
    if provider == "process" and data.get("Version") != 1:
        raise CredentialRetrievalError(
            provider=provider, error_msg="unsupported Version in output, expected 1"
        )
    missing = [k for k in ("AccessKeyId", "SecretAccessKey") if not _nonempty(data.get(k))]
    if missing:
        raise CredentialRetrievalError(
            provider=provider, error_msg="response is missing " + " and ".join(missing)
        )
    token = data.get(token_key)
    expiry = data.get("Expiration")
    where = "the credential_process output" if provider == "process" else provider + " reply"
    key, secret, checked_token = _checked_credentials(
        provider,
        ("AccessKeyId in " + where, "SecretAccessKey in " + where, token_key + " in " + where),
        str(data["AccessKeyId"]),
        str(data["SecretAccessKey"]),
        str(token) if _nonempty(token) else None,
    )
    return _Credentials(
        access_key=key,
        secret_key=secret,
        token=checked_token,
        expiry=_parse_expiry(expiry, provider) if expiry else None,
    )


def _http_request(
    method: str, url: str, headers: Mapping[str, str], timeout: float
) -> tuple[int, bytes]:
    """One request over http.client (no proxy, no redirects): the credential endpoints are
    link-local or loopback, and must not be reached through a proxy."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    # An explicit port, or http.client would read "[fd00:ec2::254]"'s last group as one.
    port = parts.port or (443 if parts.scheme == "https" else 80)
    conn = cls(parts.hostname or "", port, timeout=timeout)
    # The whole reply within a few timeouts, however slowly it trickles in.
    conn.response_class = _deadline_response_class(timeout, 3 * timeout)
    try:
        conn.request(
            method,
            (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
            headers=dict(headers),
        )
        response = conn.getresponse()
        return response.status, _read_reply(response, "%s://%s" % (parts.scheme, parts.netloc))
    finally:
        conn.close()


def _fetch_process(command: str, profile_name: str, run: _Run) -> _Credentials:
    """Run a profile's credential_process (no shell) and parse its JSON output.

    stderr is not captured, so helpers can prompt (e.g. for MFA) and show their own errors;
    stdout is never echoed because it holds the secret on success and may on failure.
    """
    import shlex
    import subprocess

    where = f"credential_process of profile {profile_name!r}"
    try:
        argv = shlex.split(command)
    except ValueError:
        argv = []
    if not argv:
        raise CredentialRetrievalError(provider="process", error_msg=f"{where} cannot be parsed")
    try:
        result = run(argv, stdout=subprocess.PIPE, check=False)
    except OSError as exc:
        raise CredentialRetrievalError(
            provider="process", error_msg=f"cannot run {where}: {exc.strerror}"
        ) from None
    if result.returncode != 0:
        raise CredentialRetrievalError(
            provider="process", error_msg=f"{where} exited with status {result.returncode}"
        )
    return _credentials_from_json(result.stdout, "process", "SessionToken")


def _container_url(environ: Mapping[str, str]) -> str | None:
    import ipaddress
    import urllib.parse

    relative = environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    if relative:
        return _CONTAINER_ENDPOINT + relative
    full = environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if not full:
        return None
    # Only https or a local host: the endpoint receives the authorization token (utils.py L3066+).
    parts = urllib.parse.urlsplit(full)
    host = (parts.hostname or "").lower()
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme == "https" or loopback or host in _CONTAINER_FULL_URI_HOSTS:
        return full
    raise CredentialRetrievalError(
        provider="container-role",
        error_msg=f"AWS_CONTAINER_CREDENTIALS_FULL_URI host {host!r} is not allowed: use https, "
        "a loopback address or the ECS/EKS agent address",
    )


def _fetch_container(
    url: str,
    environ: Mapping[str, str],
    http_request: _HttpRequest,
    sleep: Callable[[float], None],
) -> _Credentials:
    import http.client
    import urllib.parse

    headers: dict[str, str] = {"Accept": "application/json"}
    token_file = environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    token = environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
    if token_file:  # re-read each time: EKS Pod Identity rotates it
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise CredentialRetrievalError(
                provider="container-role",
                error_msg=f"cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE: {exc.strerror}",
            ) from None
    if token:
        if "\r" in token or "\n" in token:
            raise CredentialRetrievalError(
                provider="container-role",
                error_msg="the container authorization token contains a line break",
            )
        headers["Authorization"] = token
    host = urllib.parse.urlsplit(url).netloc  # the path may be a credential id: not shown
    problem = ""
    for attempt in range(_CONTAINER_ATTEMPTS):
        if attempt:
            sleep(_CONTAINER_RETRY_SLEEP)
        try:
            status, body = http_request("GET", url, headers, _CONTAINER_TIMEOUT)
        except (OSError, http.client.HTTPException, _ReplyTooLarge) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            continue
        if status == 200:
            return _credentials_from_json(body, "container-role", "Token")
        problem = f"HTTP {status}"
    raise CredentialRetrievalError(
        provider="container-role",
        error_msg=f"{host} failed {_CONTAINER_ATTEMPTS} times, last: {problem}",
    )


def _fetch_imds(environ: Mapping[str, str], http_request: _HttpRequest) -> _Credentials | None:
    """EC2 instance role credentials via IMDSv2, falling back to v1 like botocore (utils.py
    IMDSFetcher L395+). None when there is no metadata service or no role."""
    import urllib.parse

    if _is_true(environ.get("AWS_EC2_METADATA_DISABLED")):
        return None
    mode = (environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE") or "ipv4").lower()
    base = environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or _IMDS_ENDPOINTS.get(
        mode, _IMDS_ENDPOINTS["ipv4"]
    )
    base = base.rstrip("/")
    raw = environ.get("AWS_METADATA_SERVICE_TIMEOUT")
    timeout = _parse_number(raw, "AWS_METADATA_SERVICE_TIMEOUT", above=0) if raw else 1.0
    raw = environ.get("AWS_METADATA_SERVICE_NUM_ATTEMPTS")
    attempts = _parse_int(raw, "AWS_METADATA_SERVICE_NUM_ATTEMPTS", minimum=1) if raw else 1
    v1_disabled = _is_true(environ.get("AWS_EC2_METADATA_V1_DISABLED"))

    def call(method: str, path: str, headers: Mapping[str, str]) -> tuple[int, bytes] | None:
        import http.client

        for _ in range(attempts):
            try:
                return http_request(method, base + path, headers, timeout)
            except (OSError, http.client.HTTPException, _ReplyTooLarge) as exc:
                logger.debug("IMDS %s %s failed: %s: %s", method, path, type(exc).__name__, exc)
        return None

    reply = call("PUT", _IMDS_TOKEN_PATH, {"x-aws-ec2-metadata-token-ttl-seconds": _IMDS_TOKEN_TTL})
    headers: dict[str, str] = {}
    if reply is not None and reply[0] == 200:
        headers["x-aws-ec2-metadata-token"] = reply[1].decode("ascii", "replace").strip()
    elif reply is not None and reply[0] not in _IMDS_NO_TOKEN_STATUSES:
        logger.debug("IMDS token request returned HTTP %s", reply[0])
        return None
    elif v1_disabled:
        logger.debug("IMDS gave no token and AWS_EC2_METADATA_V1_DISABLED is set")
        return None
    reply = call("GET", _IMDS_ROLE_PATH, headers)
    if reply is None or reply[0] != 200 or not reply[1].strip():
        logger.debug("IMDS has no instance role (%s)", reply and f"HTTP {reply[0]}")
        return None
    role = reply[1].decode("utf-8", "replace").strip().splitlines()[0]
    reply = call("GET", _IMDS_ROLE_PATH + urllib.parse.quote(role), headers)
    if reply is None or reply[0] != 200:
        logger.debug("IMDS credentials for the instance role unavailable")
        return None
    return _credentials_from_json(reply[1], "iam-role", "Token")


def _explicit_credentials(
    access_key: str | None, secret_key: str | None, session_token: str | None
) -> _Credentials:
    """Keys given as arguments (``aws_access_key_id=...``): both or neither."""
    if not access_key:
        raise PartialCredentialsError(provider="explicit", cred_var="aws_access_key_id")
    if not secret_key:
        raise PartialCredentialsError(provider="explicit", cred_var="aws_secret_access_key")
    names = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
    checked = _checked_credentials("explicit", names, access_key, secret_key, session_token)
    return _Credentials(*checked, None)


def _env_credentials(environ: Mapping[str, str]) -> _Credentials:
    """AWS_ACCESS_KEY_ID (set) with AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, or the
    older AWS_SECURITY_TOKEN, as botocore reads them."""
    secret = environ.get("AWS_SECRET_ACCESS_KEY")
    if not secret:
        raise PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY")
    token_var = "AWS_SESSION_TOKEN" if environ.get("AWS_SESSION_TOKEN") else "AWS_SECURITY_TOKEN"
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", token_var)
    checked = _checked_credentials(
        "env", names, environ["AWS_ACCESS_KEY_ID"], secret, environ.get(token_var)
    )
    return _Credentials(*checked, None)


def _profile_credentials(profile: _Profile, name: str) -> _Credentials | None:
    """The profile's own keys (aws_access_key_id and its secret and token), None without."""
    key = _profile_str(profile, "aws_access_key_id")
    if not key:
        return None
    secret = _profile_str(profile, "aws_secret_access_key")
    if not secret:
        raise PartialCredentialsError(
            provider="shared-credentials-file", cred_var="aws_secret_access_key"
        )
    token_field = (
        "aws_session_token" if _profile_str(profile, "aws_session_token") else "aws_security_token"
    )
    names = (
        "aws_access_key_id of profile %r" % name,
        "aws_secret_access_key of profile %r" % name,
        "%s of profile %r" % (token_field, name),
    )
    checked = _checked_credentials(
        "shared-credentials-file", names, key, secret, _profile_str(profile, token_field)
    )
    return _Credentials(*checked, None)


def _refuse_unsupported_sources(profile: _Profile, name: str, environ: Mapping[str, str]) -> None:
    """A profile or environment that names a source deltaglider does not implement (SSO,
    assume-role, web identity) is an error that says what to do, rather than falling
    through to the container and instance metadata sources."""
    for config_key, source in _UNSUPPORTED_PROFILE_KEYS:
        if config_key in profile:
            raise CredentialRetrievalError(
                provider=source,
                error_msg=f"profile {name!r} uses {config_key}, which deltaglider does not "
                f"support; export keys with `aws configure export-credentials --profile {name} "
                "--format env`, or use a profile with a credential_process",
            )
    if environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") and environ.get("AWS_ROLE_ARN"):
        raise CredentialRetrievalError(
            provider="assume-role-with-web-identity",
            error_msg="AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN are set, but deltaglider "
            "does not support web identity; export keys with `aws configure export-credentials "
            "--format env`",
        )


def _resolve_credentials(
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    session_token: str | None = None,
    profile_name: str | None = None,
    profile_explicit: bool = False,
    profile: _Profile | None = None,
    environ: Mapping[str, str] = os.environ,
    now: Callable[[], datetime.datetime] = _utcnow,
    run: _Run = _run_process,
    http_request: _HttpRequest = _http_request,
    sleep: Callable[[float], None] = time.sleep,
    anonymous: bool = False,
) -> _CredentialProvider | None:
    """The first credential source that has something, in this order: explicit arguments,
    environment (skipped when the profile was given explicitly, as in botocore), the profile's
    keys, its credential_process, container credentials, EC2 instance metadata.

    `profile` is the already loaded profile (from _resolve_client_settings), to avoid reading
    the files twice. Returns None when nothing is found: the caller raises NoCredentialsError.
    """
    if anonymous:
        return None

    def found(
        method: str, creds: _Credentials, refresh: Callable[[], _Credentials] | None = None
    ) -> _CredentialProvider:
        logger.debug("Found credentials: %s", method)
        if creds.expiry is None:
            refresh = None
        return _CredentialProvider(method, creds, refresh=refresh, now=now)

    if access_key is not None or secret_key is not None:
        return found("explicit", _explicit_credentials(access_key, secret_key, session_token))

    if not profile_explicit and environ.get("AWS_ACCESS_KEY_ID"):
        return found("env", _env_credentials(environ))

    name = _profile_name(profile_name, environ)
    if profile is None:
        profile = _load_profile(name, environ=environ)
    static = _profile_credentials(profile, name)
    if static is not None:
        return found("shared-credentials-file", static)

    command = _profile_str(profile, "credential_process")
    if command:
        fetch: Callable[[], _Credentials] = functools.partial(_fetch_process, command, name, run)
        return found("process", fetch(), fetch)

    _refuse_unsupported_sources(profile, name, environ)
    url = _container_url(environ)
    if url:
        fetch = functools.partial(_fetch_container, url, environ, http_request, sleep)
        return found("container-role", fetch(), fetch)

    def fetch_imds() -> _Credentials:
        creds = _fetch_imds(environ, http_request)
        if creds is None:
            raise CredentialRetrievalError(
                provider="iam-role", error_msg="the instance metadata service gave no credentials"
            )
        return creds

    creds = _fetch_imds(environ, http_request)
    return found("iam-role", creds, fetch_imds) if creds else None


###############################################################################
# SigV4 #######################################################################
###############################################################################


class _SigningKeyCache:
    """SigV4 signing keys per (secret, date, region, service); they change once a day."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, str, str, str], bytes] = {}

    def get(self, secret: str, date: str, region: str, service: str) -> bytes:
        import hashlib
        import hmac

        ident = (hashlib.sha256(secret.encode()).hexdigest(), date, region, service)
        with self._lock:
            key = self._keys.get(ident)
        if key is None:
            key = ("AWS4" + secret).encode("utf-8")
            for part in (date, region, service, "aws4_request"):
                key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
            with self._lock:
                if len(self._keys) > 64:
                    self._keys.clear()
                self._keys[ident] = key
        return key


_SIGNING_KEYS = _SigningKeyCache()


def _canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """Query pairs encoded with unreserved characters kept, sorted by (key, value) after
    encoding (botocore auth.py; sorting ``k=v`` strings instead is a known bug)."""
    pairs = sorted((_quote(k), _quote(v)) for k, v in params)
    return "&".join("%s=%s" % kv for kv in pairs)


def _canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    """(canonical headers block, signed headers list) over every signable header."""
    folded: dict[str, list[str]] = {}
    for name, value in headers.items():
        lname = name.lower().strip()
        if lname in _UNSIGNED_HEADERS:
            continue
        folded.setdefault(lname, []).append(" ".join(str(value).split()))
    names = sorted(folded)
    block = "".join("%s:%s\n" % (n, ",".join(folded[n])) for n in names)
    return block, ";".join(names)


def _host_header(scheme: str, netloc: str) -> str:
    """The Host value as signed: lower case, default port dropped (botocore _host_from_url)."""
    import urllib.parse

    parts = urllib.parse.urlsplit("%s://%s" % (scheme, netloc))
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = "[%s]" % host
    port = parts.port
    if port is not None and not (
        (scheme == "http" and port == 80) or (scheme == "https" and port == 443)
    ):
        host = "%s:%d" % (host, port)
    return host


class _SigV4:
    """AWS Signature Version 4 for S3: header auth, presigned URLs and POST policies.

    ``now`` is read once per signature, through a seam, so tests can pin the clock."""

    def __init__(
        self,
        access_key: str,
        secret_key: str,
        token: str | None,
        region: str,
        service: str = "s3",
    ) -> None:
        self._access_key = access_key
        self._secret_key = secret_key
        self._token = token
        self.region = region
        self.service = service

    def _scope(self, date: str) -> str:
        return "%s/%s/%s/aws4_request" % (date, self.region, self.service)

    def _signature(self, string_to_sign: str, date: str) -> str:
        import hashlib
        import hmac

        key = _SIGNING_KEYS.get(self._secret_key, date, self.region, self.service)
        return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()

    def _string_to_sign(self, canonical_request: str, timestamp: str) -> str:
        import hashlib

        return "\n".join(
            (
                _SIGV4_ALGORITHM,
                timestamp,
                self._scope(timestamp[:8]),
                hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
            )
        )

    def sign_headers(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        payload_hash: str,
        now: datetime.datetime,
    ) -> None:
        """Add x-amz-date, x-amz-content-sha256, the token and Authorization to ``headers``.

        ``path`` is the URL path exactly as sent (already percent-encoded, never
        normalised); ``headers`` must hold ``host``. Old auth headers are replaced, so a
        retry can re-sign the same dict (botocore _modify_request_before_signing)."""
        for name in list(headers):
            if name.lower() in ("authorization", "x-amz-date", "x-amz-security-token"):
                del headers[name]
        timestamp = now.astimezone(datetime.timezone.utc).strftime(_SIGV4_TIMESTAMP)
        headers["x-amz-date"] = timestamp
        headers["x-amz-content-sha256"] = payload_hash
        if self._token:
            headers["x-amz-security-token"] = self._token
        block, signed = _canonical_headers(headers)
        canonical = "\n".join((method, path, _canonical_query(query), block, signed, payload_hash))
        sts = self._string_to_sign(canonical, timestamp)
        headers["Authorization"] = "%s Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
            _SIGV4_ALGORITHM,
            self._access_key,
            self._scope(timestamp[:8]),
            signed,
            self._signature(sts, timestamp[:8]),
        )
        if logger.isEnabledFor(logging.DEBUG):  # the token is a secret: never logged
            shown = canonical.replace(self._token, "<redacted>") if self._token else canonical
            logger.debug("SigV4 canonical request:\n%s", shown)

    def presign_query(
        self,
        method: str,
        host: str,
        path: str,
        query: list[tuple[str, str]],
        expires: int,
        now: datetime.datetime,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """The query string of a presigned URL (botocore SigV4QueryAuth order). ``headers``
        are signed as botocore signs an operation's header parameters (``x-amz-acl``,
        ``Content-Type``, ``Range``...): whoever uses the URL must send them. Any expiry
        is signed as given: as botocore does, the server refuses one outside 1 s to 7 days
        (an expired or malformed URL is the server's answer, not a client-side error)."""
        timestamp = now.astimezone(datetime.timezone.utc).strftime(_SIGV4_TIMESTAMP)
        block, signed = _canonical_headers(dict(headers or {}, host=host))
        auth: list[tuple[str, str]] = [
            ("X-Amz-Algorithm", _SIGV4_ALGORITHM),
            ("X-Amz-Credential", "%s/%s" % (self._access_key, self._scope(timestamp[:8]))),
            ("X-Amz-Date", timestamp),
            ("X-Amz-Expires", str(int(expires))),
            ("X-Amz-SignedHeaders", signed),
        ]
        if self._token:
            auth.append(("X-Amz-Security-Token", self._token))
        params = list(query) + auth  # botocore: the operation's parameters come first
        canonical = "\n".join(
            (method, path, _canonical_query(params), block, signed, _UNSIGNED_PAYLOAD)
        )
        signature = self._signature(self._string_to_sign(canonical, timestamp), timestamp[:8])
        encoded = "&".join("%s=%s" % (_quote(k), _quote(v)) for k, v in params)
        return encoded + "&X-Amz-Signature=" + signature

    def presign_post(
        self,
        fields: dict[str, str],
        conditions: list[Any],
        expires: int,
        now: datetime.datetime,
    ) -> dict[str, str]:
        """Fields of a browser POST upload with a signed policy (botocore S3SigV4PostAuth).
        Any expiry is signed as given, as ``presign_query`` signs it."""
        import json

        now = now.astimezone(datetime.timezone.utc)
        timestamp = now.strftime(_SIGV4_TIMESTAMP)
        expiration = (now + datetime.timedelta(seconds=int(expires))).strftime("%Y-%m-%dT%H:%M:%SZ")
        credential = "%s/%s" % (self._access_key, self._scope(timestamp[:8]))
        fields = dict(fields)
        conditions = list(conditions)
        fields["x-amz-algorithm"] = _SIGV4_ALGORITHM
        fields["x-amz-credential"] = credential
        fields["x-amz-date"] = timestamp
        conditions.append({"x-amz-algorithm": _SIGV4_ALGORITHM})
        conditions.append({"x-amz-credential": credential})
        conditions.append({"x-amz-date": timestamp})
        if self._token:
            fields["x-amz-security-token"] = self._token
            conditions.append({"x-amz-security-token": self._token})
        policy = {"expiration": expiration, "conditions": conditions}
        fields["policy"] = base64.b64encode(json.dumps(policy).encode("utf-8")).decode("ascii")
        fields["x-amz-signature"] = self._signature(fields["policy"], timestamp[:8])
        return fields


###############################################################################
# HTTP transport and retries ##################################################
###############################################################################


class StreamingBody(io.IOBase):
    """A response body read on demand, as botocore's: ``read(amt)``, ``iter_chunks``,
    ``iter_lines``, ``close``, context manager. A body shorter than its Content-Length
    raises :class:`IncompleteReadError`; it is never silently accepted."""

    def __init__(
        self,
        raw: Any,
        content_length: int | None,
        *,
        on_close: Callable[[bool], None] | None = None,
        endpoint_url: str = "",
    ) -> None:
        super().__init__()
        self._raw = raw
        self._content_length = content_length
        self._amount_read = 0
        self._on_close = on_close
        self._endpoint_url = endpoint_url
        self._eof = False

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._amount_read

    def read(self, amt: int | None = None) -> bytes:
        if self._eof:
            return b""
        with self._reading():
            if amt is None or amt < 0:
                chunks = []
                while True:
                    chunk = self._raw.read(_IO_CHUNK)
                    if not chunk:
                        break
                    chunks.append(chunk)
                data = b"".join(chunks)
            else:
                data = self._raw.read(amt)
        self._amount_read += len(data)
        if amt is None or amt < 0 or (not data and amt != 0):
            self._finish()
        return data

    def readinto(self, b: Any) -> int:
        """Into ``b`` straight from the connection: no bytes object made on the way. A
        body whose ``read`` does more (checks a SHA-256) or a raw reader with no
        ``readinto`` goes through ``read``."""
        if type(self).read is not StreamingBody.read or not hasattr(self._raw, "readinto"):
            data = self.read(len(b))
            memoryview(b).cast("B")[: len(data)] = data
            return len(data)
        if self._eof or not len(b):
            return 0
        with self._reading():
            n: int = self._raw.readinto(b)
        self._amount_read += n
        if not n:
            self._finish()
        return n

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A read of the raw reply: a timeout or a broken connection as botocore says it."""
        import http.client
        import socket

        try:
            yield
        except socket.timeout as e:
            self._release(False)
            raise ReadTimeoutError(endpoint_url=self._endpoint_url) from e
        except (http.client.IncompleteRead, ConnectionError, OSError) as e:
            self._release(False)
            raise IncompleteReadError(
                actual_bytes=self._amount_read, expected_bytes=self._content_length
            ) from e

    def _finish(self) -> None:
        self._eof = True
        if self._content_length is not None and self._amount_read != self._content_length:
            self._release(False)
            raise IncompleteReadError(
                actual_bytes=self._amount_read, expected_bytes=self._content_length
            )
        self._release(True)

    def _release(self, reusable: bool) -> None:
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback(reusable)
        elif not reusable:
            try:
                self._raw.close()
            except Exception:  # pragma: no cover - best effort
                pass

    def close(self) -> None:
        if not self.closed:
            self._release(self._eof)
            try:
                self._raw.close()
            except Exception:  # pragma: no cover
                pass
        super().close()

    def iter_chunks(self, chunk_size: int = 1024) -> Iterator[bytes]:
        while True:
            chunk = self.read(chunk_size)
            if not chunk:
                break
            yield chunk

    def iter_lines(self, chunk_size: int = 1024, keepends: bool = False) -> Iterator[bytes]:
        pending = b""
        for chunk in self.iter_chunks(chunk_size):
            lines = (pending + chunk).splitlines(True)
            for line in lines[:-1]:
                yield line if keepends else line.splitlines()[0]
            pending = lines[-1]
        if pending:
            yield pending if keepends else pending.splitlines()[0]

    def __iter__(self) -> Iterator[bytes]:
        return self.iter_chunks(1024)

    def __next__(self) -> bytes:
        chunk = self.read(1024)
        if not chunk:
            raise StopIteration
        return chunk

    def __enter__(self) -> StreamingBody:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _DeadlineReader:
    """The socket file of one response, read against a deadline as well as a per-recv
    timeout: a server trickling a byte every few seconds never trips a recv timeout, so
    the status line, the headers and each MiB of body must also arrive within
    ``request_timeout``. Every read is split into single recvs (``read1``, ``peek``), each
    given only the time left; running out raises socket.timeout, as a slow recv does."""

    def __init__(
        self, fp: Any, sock: Any, read_timeout: float | None, request_timeout: float
    ) -> None:
        self._fp = fp
        self._sock = sock
        self._read_timeout = read_timeout
        self._request_timeout = request_timeout
        self._deadline = time.monotonic() + request_timeout
        self._since = 0  # bytes received since the deadline was last set
        #: bytes known to be in ``fp``'s buffer (never more than are): a read from them
        #: makes no recv, so it needs no deadline armed (a header line each, mostly)
        self._buffered = 0

    def _arm(self) -> None:
        import socket

        left = self._deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("no reply within the request timeout")
        self._sock.settimeout(left if self._read_timeout is None else min(left, self._read_timeout))

    def _got(self, n: int) -> None:
        self._since += n
        if self._since >= _IO_CHUNK:
            self._since = 0
            self._deadline = time.monotonic() + self._request_timeout

    def read1(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        self._arm()
        self._buffered = 0
        data: bytes = self._fp.read1(n if n > 0 else _IO_CHUNK)
        self._got(len(data))
        return data

    def readinto1(self, b: Any) -> int:
        if not len(b):
            return 0
        self._arm()
        self._buffered = 0
        n: int = self._fp.readinto1(b)
        self._got(n)
        return n

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        total = 0
        while total < len(view):
            n = self.readinto1(view[total:])
            if not n:
                break
            total += n
        return total

    def read(self, n: int | None = -1) -> bytes:
        chunks = []
        left = -1 if n is None or n < 0 else n
        while left != 0:
            chunk = self.read1(_IO_CHUNK if left < 0 else left)
            if not chunk:
                break
            chunks.append(chunk)
            if left > 0:
                left -= len(chunk)
        return b"".join(chunks)

    def peek(self, n: int = 0) -> bytes:
        if not self._buffered:
            self._arm()
        data: bytes = self._fp.peek(n)  # all that is buffered; a recv only when none is
        self._buffered = len(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        line = bytearray()
        while limit < 0 or len(line) < limit:
            buffered = self.peek(1)  # at most one recv, only when the buffer is empty
            if not buffered:
                break
            if limit >= 0:
                buffered = buffered[: limit - len(line)]
            end = buffered.find(b"\n")
            take = len(buffered) if end < 0 else end + 1
            line += self._fp.read(take)  # already buffered: no recv
            self._buffered -= take
            self._got(take)
            if end >= 0:
                break
        return bytes(line)

    def __getattr__(self, name: str) -> Any:  # close, closed, fileno, flush, ...
        self._buffered = 0  # whatever it does to the buffer, the next read arms again
        return getattr(self._fp, name)


@functools.lru_cache(maxsize=None)
def _deadline_response_class(
    read_timeout: float | None, request_timeout: float
) -> type[http.client.HTTPResponse]:
    """The response class for connections with these timeouts (http.client makes the
    response itself, from ``conn.response_class``): an HTTPResponse whose socket reads keep
    to a deadline (see _DeadlineReader)."""
    import http.client

    class _DeadlineResponse(http.client.HTTPResponse):
        def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(sock, *args, **kwargs)
            reader = _DeadlineReader(self.fp, sock, read_timeout, request_timeout)
            self.fp = cast(Any, reader)

    return _DeadlineResponse


class _ReplyTooLarge(Exception):
    """A reply past _MAX_REPLY_BYTES (callers name it beside http.client's errors)."""

    def __init__(self, what: str, length: int | None) -> None:
        super().__init__(
            "the reply from %s is larger than %d MiB%s, the most deltaglider reads into memory "
            "(a broken or hostile server)"
            % (what, _MAX_REPLY_BYTES >> 20, "" if length is None else " (%d bytes)" % length)
        )


def _read_reply(raw: http.client.HTTPResponse, what: str) -> bytes:
    """A whole reply body read into memory, refused past _MAX_REPLY_BYTES (before reading
    when Content-Length says so). Raises _ReplyTooLarge naming ``what``."""
    length = raw.getheader("content-length", "")
    if length.isdigit() and int(length) > _MAX_REPLY_BYTES:
        raise _ReplyTooLarge(what, int(length))
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = raw.read(_IO_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > _MAX_REPLY_BYTES:
            raise _ReplyTooLarge(what, None)
        chunks.append(chunk)


#: A connection class of _connection_classes: (host, port, proxy_headers=, **http.client's).
_NewConnection = Callable[..., "http.client.HTTPConnection"]


@functools.lru_cache(maxsize=None)
def _connection_classes(read_timeout: float | None) -> tuple[_NewConnection, _NewConnection]:
    """http.client's HTTP and HTTPS connections with separate connect and read timeouts:
    connect with one, then switch the socket to ``read_timeout``. ``proxy_headers`` go
    with each request (plain http through a proxy; see _write_request)."""
    import http.client

    class _HTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args: Any, proxy_headers: dict[str, str], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.dg_proxy_headers = proxy_headers

        def connect(self) -> None:
            super().connect()
            if self.sock is not None:
                self.sock.settimeout(read_timeout)

    class _HTTPSConnection(_HTTPConnection, http.client.HTTPSConnection):
        """The same two steps, around HTTPSConnection's (TLS is set up by its connect)."""

    return _HTTPConnection, _HTTPSConnection


_PoolKey = Tuple[str, str, int]


class _ConnectionPool:
    """Keep-alive ``http.client`` connections, reused across requests and threads.

    A connection is handed to one thread at a time; it comes back only when its response
    was read to the end, so no half-read response is ever reused."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        verify: bool | str,
        max_idle: int,
        proxy_for: Callable[[str], str | None],
        request_timeout: float = _DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._response_class = _deadline_response_class(read_timeout, request_timeout)
        self._verify = verify
        self._max_idle = max(1, max_idle)
        self._proxy_for = proxy_for
        #: the proxy of each (scheme, host, port), looked up once, as botocore does per client
        self._proxies: dict[_PoolKey, str | None] = {}
        self._idle: dict[_PoolKey, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ssl_context: ssl.SSLContext | None = None

    def _context(self) -> ssl.SSLContext:
        import ssl

        if self._ssl_context is None:
            if self._verify is False:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif isinstance(self._verify, str):
                ctx = ssl.create_default_context(cafile=self._verify)
            else:
                ctx = ssl.create_default_context()
            self._ssl_context = ctx
        return self._ssl_context

    def acquire(self, scheme: str, host: str, port: int) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to (scheme, host, port), and whether it talks through an HTTP proxy
        that wants absolute URLs (plain http through a proxy)."""
        key = (scheme, host, port)
        conn = None
        while conn is None:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    break
                conn = idle.pop()
            if _closed_by_server(conn):
                conn.close()
                conn = None
        if key not in self._proxies:
            self._proxies[key] = self._proxy_for("%s://%s:%d/" % (scheme, host, port))
        proxy = self._proxies[key]
        if conn is None:
            conn = self._new(scheme, host, port, proxy)
        return conn, bool(proxy) and scheme == "http"

    def _new(
        self, scheme: str, host: str, port: int, proxy: str | None
    ) -> http.client.HTTPConnection:
        import urllib.parse

        new_http, new_https = _connection_classes(self._read_timeout)
        conn: http.client.HTTPConnection
        tunnel_headers: dict[str, str] = {}
        target_host, target_port = host, port
        if proxy:
            p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
            if p.username is not None:
                cred = "%s:%s" % (
                    urllib.parse.unquote(p.username),
                    urllib.parse.unquote(p.password or ""),
                )
                tunnel_headers["Proxy-Authorization"] = "Basic " + base64.b64encode(
                    cred.encode()
                ).decode("ascii")
            target_host, target_port = (
                p.hostname or "",
                p.port or (443 if p.scheme == "https" else 80),
            )
        if scheme == "https":
            conn = new_https(
                target_host,
                target_port,
                proxy_headers={},
                timeout=self._connect_timeout,
                context=self._context(),
                blocksize=_IO_CHUNK,
            )
            if proxy:
                conn.set_tunnel(host, port, headers=tunnel_headers)
        else:
            conn = new_http(
                target_host,
                target_port,
                proxy_headers=tunnel_headers if proxy else {},
                timeout=self._connect_timeout,
                blocksize=_IO_CHUNK,
            )
        conn.response_class = self._response_class
        return conn

    def release(self, key: _PoolKey, conn: http.client.HTTPConnection, reusable: bool) -> None:
        if reusable:
            with self._lock:
                idle = self._idle.setdefault(key, [])
                if len(idle) < self._max_idle:
                    idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()


def _closed_by_server(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle keep-alive connection was closed by the server meanwhile (Swift
    closes one idle for 60 s; SeaweedFS under load): its socket is readable (the EOF, or
    bytes nobody asked for). Sent on, a request would fail as ConnectionClosedError, one
    retry attempt per dead connection: with the pool's many idle ones, the first request
    after a pause failed outright. urllib3 checks the same before reusing one."""
    import select

    sock = conn.sock
    if sock is None:
        return True
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _header_value_error(name: str) -> ParamValidationError:
    """A header value HTTP cannot carry (a line break, NUL): the error names the header,
    never the value, which may be a secret. Both back ends raise it, so the local store
    refuses what an S3 server could never be sent."""
    return ParamValidationError(
        report="the %s header has a line break or another character HTTP does not allow "
        "(the value is not shown)" % name
    )


def _check_header_value(name: str, value: str) -> None:
    if "\r" in value or "\n" in value or "\0" in value:
        raise _header_value_error(name)


class _BodyReadError(Exception):
    """Reading the request body from the caller's file failed (carries the OSError)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _Response(NamedTuple):
    status: int
    reason: str
    headers: dict[str, str]
    body: Any  # bytes, or a StreamingBody when streamed
    attempts: int


def _response_headers(resp: http.client.HTTPResponse) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in resp.getheaders():
        lname = name.lower()
        headers[lname] = headers[lname] + ", " + value if lname in headers else value
    return headers


# -- one exchange, and when to try again ---------------------------------------


def _send_once(
    pool: _ConnectionPool,
    key: _PoolKey,
    endpoint_url: str,
    method: str,
    url: str,
    headers: dict[str, str],
    body: Any,
    stream: bool,
) -> _Response:
    """One HTTP exchange on a pooled connection to ``key`` (scheme, host, port), its
    failures mapped to botocore's errors: connect and read timeouts, TLS failures, a
    connection closed or refused. A local read error of the body is raised as itself
    (an OSError: not retried as a network one)."""
    import http.client
    import socket
    import ssl

    conn, absolute = pool.acquire(*key)
    target = url
    if absolute:
        target = "%s://%s%s" % (key[0], headers["host"], url)
    try:
        _write_request(conn, method, target, headers, body)
        raw = conn.getresponse()
    except _BodyReadError as e:
        conn.close()
        raise e.error from None  # a local read error: not retried as a network one
    except socket.timeout as e:
        connected = conn.sock is not None
        conn.close()
        if not connected:
            raise ConnectTimeoutError(endpoint_url=endpoint_url) from e
        raise ReadTimeoutError(endpoint_url=endpoint_url) from e
    except ssl.SSLError as e:
        conn.close()
        raise SSLError(endpoint_url=endpoint_url, error=e) from e
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        if isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)):
            raise ConnectionClosedError(endpoint_url=endpoint_url) from e
        raise EndpointConnectionError(endpoint_url=endpoint_url, error=e) from e
    return _read_response(pool, key, conn, raw, method, stream, endpoint_url)


def _write_request(
    conn: http.client.HTTPConnection, method: str, target: str, headers: dict[str, str], body: Any
) -> None:
    """Send the request line, the headers (the proxy's too, for plain http through one) and
    the body: bytes, or a file read in chunks (its read error becomes a _BodyReadError)."""
    conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
    for name, value in headers.items():
        try:
            conn.putheader(name, value)
        except ValueError:  # http.client's message quotes the value: it may be a secret
            conn.close()
            raise _header_value_error(name) from None
    for name, value in getattr(conn, "dg_proxy_headers", {}).items():
        conn.putheader(name, value)
    conn.endheaders()
    if body is None:
        return
    if isinstance(body, (bytes, bytearray, memoryview)):
        conn.send(bytes(body))
        return
    while True:
        try:
            chunk = body.read(_IO_CHUNK)
        except OSError as e:
            raise _BodyReadError(e) from e
        if not chunk:
            break
        conn.send(chunk)


def _read_response(
    pool: _ConnectionPool,
    key: _PoolKey,
    conn: http.client.HTTPConnection,
    raw: http.client.HTTPResponse,
    method: str,
    stream: bool,
    endpoint_url: str,
) -> _Response:
    """The reply as a _Response: no body for HEAD, 204 and 304; a StreamingBody for a
    streamed 2xx reply (it gives the connection back to the pool once read or closed);
    otherwise the whole body, bounded, and checked against its Content-Length. The
    connection is reused only after a complete reply."""
    import http.client
    import socket

    resp_headers = _response_headers(raw)
    status = raw.status
    if method == "HEAD" or status in (204, 304):
        raw.read()
        pool.release(key, conn, not raw.will_close)
        return _Response(status, raw.reason, resp_headers, b"", 1)
    clen_text = resp_headers.get("content-length")
    clen = int(clen_text) if clen_text and clen_text.isdigit() else None
    if stream and status < 300:

        def on_close(reusable: bool) -> None:
            pool.release(key, conn, reusable and not raw.will_close)

        body_out = StreamingBody(raw, clen, on_close=on_close, endpoint_url=endpoint_url)
        return _Response(status, raw.reason, resp_headers, body_out, 1)
    try:
        data = _read_reply(raw, endpoint_url)
    except _ReplyTooLarge as e:
        conn.close()
        raise ResponseParserError(endpoint_url=endpoint_url, status=status, reason=str(e)) from None
    except socket.timeout as e:
        conn.close()
        raise ReadTimeoutError(endpoint_url=endpoint_url) from e
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise ConnectionClosedError(endpoint_url=endpoint_url) from e
    if clen is not None and len(data) != clen:
        conn.close()
        raise ConnectionClosedError(endpoint_url=endpoint_url)
    pool.release(key, conn, not raw.will_close)
    return _Response(status, raw.reason, resp_headers, data, 1)


def _retryable(status: int, code: str) -> bool:
    """Whether an error reply is tried again (botocore's standard mode): HTTP 500, 502,
    503, 504 and 429, and the throttling and transient codes of _RETRYABLE_CODES.
    Connection errors and timeouts are always tried again."""
    return status in _RETRYABLE_STATUS or code in _RETRYABLE_CODES


def _retry_delay(attempt: int, rand: Callable[[], float]) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...): full-jitter
    exponential backoff, ``rand()`` (0 to 1) times 2**(attempt-1) s, at most 20 s."""
    return rand() * min(2.0 ** (attempt - 1), _MAX_BACKOFF)


def _random() -> float:
    """random.random(), imported at the first retry: the jitter of _retry_delay."""
    import random

    return random.random()


###############################################################################
# Storage seam: what both back ends share #####################################
###############################################################################


class _Storage(Protocol):
    """What the engine, the client, the CLI and the gateway may ask of a storage: the S3
    operations both back ends implement (:class:`_S3Storage` over HTTP, :class:`_LocalStorage`
    on a directory), with boto3's response shapes and :class:`ClientError` for service errors.
    Presigning is S3's alone (``is_local`` says which kind this is)."""

    @property
    def is_local(self) -> bool: ...
    @property
    def region(self) -> str: ...
    @property
    def endpoint_url(self) -> str: ...
    def close(self) -> None: ...
    def object_url(self, bucket: str, key: str) -> str: ...
    def supports_conditional_writes(self, bucket: str) -> bool: ...
    def supports_conditional_multipart(self, bucket: str) -> bool: ...

    # -- buckets
    def list_buckets(self) -> dict[str, Any]: ...
    def create_bucket(
        self, bucket: str, *, location: str | None = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any]: ...
    def delete_bucket(self, bucket: str) -> dict[str, Any]: ...
    def head_bucket(self, bucket: str) -> dict[str, Any]: ...
    def get_bucket_location(self, bucket: str) -> dict[str, Any]: ...
    def get_bucket_acl(self, bucket: str) -> dict[str, Any]: ...
    def put_bucket_acl(
        self, bucket: str, *, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> dict[str, Any]: ...

    # -- objects
    def put_object(
        self,
        bucket: str,
        key: str,
        body: Any,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: dict[str, str] | None = None,
        content_sha256: str | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> dict[str, Any]: ...
    def get_object(
        self,
        bucket: str,
        key: str,
        *,
        range: str | None = None,
        headers: dict[str, str] | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]: ...
    def head_object(
        self, bucket: str, key: str, *, headers: dict[str, str] | None = None
    ) -> dict[str, Any]: ...
    def delete_object(self, bucket: str, key: str) -> dict[str, Any]: ...
    def delete_objects(
        self,
        bucket: str,
        keys: list[str],
        *,
        quiet: bool = False,
        conditions: Mapping[str, Mapping[str, Any]] | None = None,
        check_limit: bool = True,
    ) -> dict[str, Any]: ...
    def copy_object(
        self,
        bucket: str,
        key: str,
        source_bucket: str,
        source_key: str,
        *,
        metadata: Mapping[str, str] | None = None,
        metadata_directive: str = "COPY",
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]: ...
    def list_objects_v2(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        max_keys: int = 1000,
        continuation_token: str | None = None,
        start_after: str | None = None,
        fetch_owner: bool = False,
        decode: bool = True,
    ) -> dict[str, Any]: ...

    # -- tags and ACLs of objects
    def get_object_tagging(self, bucket: str, key: str) -> dict[str, Any]: ...
    def put_object_tagging(
        self, bucket: str, key: str, tags: list[dict[str, str]]
    ) -> dict[str, Any]: ...
    def delete_object_tagging(self, bucket: str, key: str) -> dict[str, Any]: ...
    def get_object_acl(self, bucket: str, key: str) -> dict[str, Any]: ...
    def put_object_acl(
        self,
        bucket: str,
        key: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> dict[str, Any]: ...

    # -- multipart uploads
    def create_multipart_upload(
        self,
        bucket: str,
        key: str,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> str: ...
    def upload_part(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        part_number: int,
        body: Any,
        *,
        content_sha256: str | None = None,
    ) -> str: ...
    def complete_multipart_upload(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        parts: list[tuple[int, str]],
        *,
        if_none_match: bool = False,
    ) -> dict[str, Any]: ...
    def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> dict[str, Any]: ...
    def list_parts(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        *,
        part_number_marker: int = 0,
        max_parts: int | None = None,
    ) -> dict[str, Any]: ...
    def list_multipart_uploads(
        self,
        bucket: str,
        *,
        prefix: str = "",
        key_marker: str = "",
        upload_id_marker: str = "",
        max_uploads: int | None = None,
    ) -> dict[str, Any]: ...


#: Response headers of GetObject/HeadObject and the boto3 keys they become.
_OBJECT_RESPONSE_HEADERS: tuple[tuple[str, str, str], ...] = (
    ("accept-ranges", "AcceptRanges", "str"),
    ("last-modified", "LastModified", "date"),
    ("content-length", "ContentLength", "int"),
    ("etag", "ETag", "str"),
    ("version-id", "VersionId", "str"),
    ("cache-control", "CacheControl", "str"),
    ("content-disposition", "ContentDisposition", "str"),
    ("content-encoding", "ContentEncoding", "str"),
    ("content-language", "ContentLanguage", "str"),
    ("content-range", "ContentRange", "str"),
    ("content-type", "ContentType", "str"),
    ("expires", "Expires", "date"),
    ("x-amz-version-id", "VersionId", "str"),
    ("x-amz-server-side-encryption", "ServerSideEncryption", "str"),
    ("x-amz-server-side-encryption-aws-kms-key-id", "SSEKMSKeyId", "str"),
    ("x-amz-storage-class", "StorageClass", "str"),
    ("x-amz-tagging-count", "TagCount", "int"),
    ("x-amz-website-redirect-location", "WebsiteRedirectLocation", "str"),
    ("x-amz-delete-marker", "DeleteMarker", "bool"),
)

#: boto3 PutObject/CopyObject/CreateMultipartUpload parameters sent as plain headers.
_PUT_HEADER_PARAMS: tuple[tuple[str, str], ...] = (
    ("ACL", "x-amz-acl"),
    ("CacheControl", "Cache-Control"),
    ("ContentDisposition", "Content-Disposition"),
    ("ContentEncoding", "Content-Encoding"),
    ("ContentLanguage", "Content-Language"),
    ("ContentType", "Content-Type"),
    ("Expires", "Expires"),
    ("GrantFullControl", "x-amz-grant-full-control"),
    ("GrantRead", "x-amz-grant-read"),
    ("GrantReadACP", "x-amz-grant-read-acp"),
    ("GrantWriteACP", "x-amz-grant-write-acp"),
    ("ServerSideEncryption", "x-amz-server-side-encryption"),
    ("SSEKMSKeyId", "x-amz-server-side-encryption-aws-kms-key-id"),
    ("SSEKMSEncryptionContext", "x-amz-server-side-encryption-context"),
    ("BucketKeyEnabled", "x-amz-server-side-encryption-bucket-key-enabled"),
    ("StorageClass", "x-amz-storage-class"),
    ("Tagging", "x-amz-tagging"),
    ("WebsiteRedirectLocation", "x-amz-website-redirect-location"),
    ("ObjectLockMode", "x-amz-object-lock-mode"),
    ("ObjectLockRetainUntilDate", "x-amz-object-lock-retain-until-date"),
    ("ObjectLockLegalHoldStatus", "x-amz-object-lock-legal-hold"),
    ("ExpectedBucketOwner", "x-amz-expected-bucket-owner"),
    ("RequestPayer", "x-amz-request-payer"),
)


def _object_response(headers: Mapping[str, str]) -> dict[str, Any]:
    """boto3's GetObject/HeadObject keys from response headers (Metadata included)."""
    out: dict[str, Any] = {}
    for header, key, kind in _OBJECT_RESPONSE_HEADERS:
        value = headers.get(header)
        if value is None:
            continue
        if kind == "int":
            out[key] = int(value)
        elif kind == "date":
            # An Expires that is not a date ("0", "-1") is common and harmless: boto3 leaves
            # it out and gives ExpiresString; no warning for it.
            when = _date_or_absent(value, key, warn=header != "expires")
            if when is not None:
                out[key] = when
        elif kind == "bool":
            out[key] = value.lower() == "true"
        else:
            out[key] = value
    if "expires" in headers:
        out["ExpiresString"] = headers["expires"]  # boto3 >= 1.37 gives the raw header too
    out["Metadata"] = {
        name[11:]: value for name, value in headers.items() if name.startswith("x-amz-meta-")
    }
    return out


def _metadata_headers(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """User metadata as ``x-amz-meta-*`` headers; values must be US-ASCII (HTTP headers)."""
    headers: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        value = str(value)
        try:
            (name + value).encode("ascii")
        except UnicodeEncodeError:
            raise ParamValidationError(
                report="Non ascii characters found in S3 metadata for key %r, value: %r. "
                "S3 metadata can only contain ASCII characters." % (name, value)
            ) from None
        if "\r" in value or "\n" in value:
            raise ParamValidationError(report="metadata %r contains a line break" % name)
        headers["x-amz-meta-" + name.lower()] = value
    size = sum(len(k) - 11 + len(v) for k, v in headers.items())
    if size > _MAX_METADATA_BYTES:
        raise ParamValidationError(
            report="user metadata is %d bytes; S3 allows at most %d" % (size, _MAX_METADATA_BYTES)
        )
    return headers


class _RangeNotSatisfiable(ValueError):
    """A Range that S3 answers with 416 InvalidRange: it starts at or past the end of the
    object (every range of an empty object does), or asks for its last 0 bytes."""

    def __init__(self, spec: str, size: int) -> None:
        super().__init__("the range %r of a %d-byte object is not satisfiable" % (spec, size))
        self.spec = spec
        self.size = size

    def client_error(self, operation: str) -> ClientError:
        """The error boto3 raises for S3's 416 reply (AWS names the range and the size)."""
        error = {
            "Code": "InvalidRange",
            "Message": "The requested range is not satisfiable",
            "RangeRequested": self.spec,
            "ActualObjectSize": str(self.size),
        }
        meta = _local_metadata({"ResponseMetadata": {"HTTPStatusCode": 416}})
        return _client_error({"Error": error, "ResponseMetadata": meta}, operation)


def _byte_range(spec: str | None, size: int) -> tuple[int, int] | None:
    """(first, last byte) that a Range header asks of an object of ``size`` bytes, as S3
    reads it: ``bytes=a-b`` (``b`` past the end means the end), ``bytes=a-``, ``bytes=-n``
    (the last ``n`` bytes). None for a header S3 ignores, answering with the whole object:
    none, malformed, another unit, several ranges, or ``b < a`` (RFC 9110 14.1.1).
    Raises :class:`_RangeNotSatisfiable` where S3 answers 416. The one Range parser:
    the local store, and the client for delta-stored and plain objects alike, use it."""
    m = re.match(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", spec or "")
    if not spec or not m or not (m.group(1) or m.group(2)):
        return None
    if not m.group(1):
        suffix = int(m.group(2))
        if not suffix or not size:
            raise _RangeNotSatisfiable(spec, size)
        return max(0, size - suffix), size - 1
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if m.group(2) and last < first:
        return None
    if first >= size:
        raise _RangeNotSatisfiable(spec, size)
    return first, min(last, size - 1)


def _copy_source_range(text: str, size: int | None = None) -> tuple[int, int]:
    """(first, last byte) of UploadPartCopy's CopySourceRange (x-amz-copy-source-range):
    ``bytes=first-last``, both given, ``first <= last``, else S3's 400 InvalidArgument;
    with the source's ``size``, a range past its end is its 416 InvalidRange. The one
    parser of it: the client's upload_part_copy and the gateway's use it."""
    m = re.match(r"^bytes=(\d+)-(\d+)$", text.strip())
    if not m or int(m.group(1)) > int(m.group(2)):
        error = {
            "Code": "InvalidArgument",
            "Message": "The x-amz-copy-source-range value must be of the form bytes=first-last "
            "where first and last are the zero-based offsets of the first and last bytes to copy",
            "ArgumentName": "x-amz-copy-source-range",
            "ArgumentValue": text,
        }
        meta = _local_metadata({"ResponseMetadata": {"HTTPStatusCode": 400}})
        raise _client_error({"Error": error, "ResponseMetadata": meta}, "UploadPartCopy")
    first, last = int(m.group(1)), int(m.group(2))
    if size is not None and last >= size:
        raise _RangeNotSatisfiable(text, size).client_error("UploadPartCopy")
    return first, last


def _range_to_send(spec: str | None, size: int) -> str | None:
    """The Range header that makes any server answer ``spec`` on a stored object of
    ``size`` bytes as :func:`_byte_range` reads it (SeaweedFS refuses ``bytes=5-2``, Swift
    answers several ranges as multipart/byteranges and ``bytes=-3`` of an empty object
    with 200): None for the whole object, and ``bytes=<size>-`` where S3 answers 416,
    which every server refuses so, after its own precondition checks (412 and 304 first)."""
    try:
        span = _byte_range(spec, size)
    except _RangeNotSatisfiable:
        return "bytes=%d-" % size
    return None if span is None else "bytes=%d-%d" % span


def _list_v2_page(
    bucket: str,
    prefix: str,
    max_keys: int,
    contents: list[dict[str, Any]],
    prefixes: list[dict[str, Any]],
    *,
    truncated: bool = False,
    next_token: str | None = None,
    delimiter: str = "",
    start_after: str = "",
    continuation_token: str | None = None,
) -> dict[str, Any]:
    """One ListObjectsV2 page as boto3 parses S3's reply, members in its order: no
    ``Contents``/``CommonPrefixes`` when there are none, ``KeyCount`` counting both,
    ``ContinuationToken`` echoed when given (even empty), ``EncodingType`` url (both back
    ends ask for it). The one builder: the local store's pages and the client's logical
    pages take this shape, and the gateway writes its XML from the client's."""
    out: dict[str, Any] = {"IsTruncated": truncated}
    if contents:
        out["Contents"] = contents
    out["Name"] = bucket
    out["Prefix"] = prefix
    if delimiter:
        out["Delimiter"] = delimiter
    out["MaxKeys"] = max_keys
    if prefixes:
        out["CommonPrefixes"] = prefixes
    out["EncodingType"] = "url"
    out["KeyCount"] = len(contents) + len(prefixes)
    if continuation_token is not None:
        out["ContinuationToken"] = continuation_token
    if next_token:
        out["NextContinuationToken"] = next_token
    if start_after:
        out["StartAfter"] = start_after
    return out


def _pages(
    fetch: Callable[[str | None], dict[str, Any]],
    next_token: Callable[[dict[str, Any]], str | None],
    operation: str,
    token: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Every page of a listing: ``fetch(token)`` gets one page, ``next_token(page)`` names the
    next. The one paging loop of this file, so every listing stops on a broken server: a
    truncated page without a next token, or a token already used (botocore raises "The same
    next token was received twice"; we also catch longer cycles), is a PaginationError.
    ``token``: where to start (a caller's ContinuationToken)."""
    used: set[str] = set()
    while True:
        page = fetch(token)
        yield page
        if not page.get("IsTruncated"):
            return
        token = next_token(page)
        if not token:
            raise PaginationError(
                message="the %s reply says it is truncated but names no next page "
                "(a broken server)" % operation
            )
        if token in used:
            raise PaginationError(
                message="the same next token was received twice in %s (a broken server): %r"
                % (operation, token[:80])
            )
        used.add(token)


def _list_pages(storage: _Storage, bucket: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Every ListObjectsV2 page of ``storage`` (either kind) under the given filters."""

    def fetch(token: str | None) -> dict[str, Any]:
        return storage.list_objects_v2(bucket, continuation_token=token, **kwargs)

    return _pages(fetch, lambda page: page.get("NextContinuationToken"), "ListObjectsV2")


#: Pages one task of a parallel listing reads of its range before it hands them back: what
#: the listing holds is (workers + 1) tasks' pages at most, whatever its length.
_LIST_TASK_PAGES = 2
#: Requests a parallel listing makes at once (the server answers each in turn otherwise).
_LIST_WORKERS = 4
#: Keys a parallel listing asks for in one request (S3 gives at most 1,000).
_LIST_PAGE_KEYS = 1000
#: A parallel listing looks through this many levels of lone folders for folders to split.
_LIST_DESCEND_MAX = 16


class _KeyRange:
    """The keys of a stretch of a listing, as one plain listing: those under ``prefix``
    after ``after`` (S3's StartAfter), from ``first`` on (those before it are dropped) and
    up to the end of the folder ``last`` (a run of folders side by side in a delimiter
    listing: keys sort in UTF-8 byte order, as code points do, so a folder's keys are
    contiguous); with no ``last``, to the end. Read a few pages at a time (take), each time
    on whichever thread is free. ``token``: go on from a page of that plain listing."""

    def __init__(
        self,
        storage: _Storage,
        bucket: str,
        prefix: str,
        after: str | None,
        first: str = "",
        last: str | None = None,
        folders: int = 0,
        token: str | None = None,
    ) -> None:
        self.first, self.last, self.folders = first, last, folders
        self.keys = 0

        def fetch(token: str | None) -> dict[str, Any]:
            return storage.list_objects_v2(
                bucket,
                prefix=prefix,
                max_keys=_LIST_PAGE_KEYS,
                continuation_token=token,
                start_after=None if token else after,
            )

        self._pages = _pages(
            fetch, lambda page: page.get("NextContinuationToken"), "ListObjectsV2", token
        )

    def take(self) -> tuple[list[dict[str, Any]], bool]:
        """The next pages of the range (at most _LIST_TASK_PAGES), and whether more follow."""
        out: list[dict[str, Any]] = []
        last = self.last
        for page in self._pages:
            objects = [o for o in page.get("Contents", []) if o["Key"] >= self.first]
            past = [
                last is not None and o["Key"] > last and not o["Key"].startswith(last)
                for o in objects
            ]
            done = any(past) or not page.get("IsTruncated")
            if any(past):
                objects = objects[: past.index(True)]
            self.keys += len(objects)
            out.append({"Contents": objects})
            if done:
                return out, False
            if len(out) >= _LIST_TASK_PAGES:
                return out, True
        return out, False


def _names_begin(entries: Iterable[str]) -> bool:
    """Whether the name of one of these delimiter-listing entries (a folder's without its
    "/") begins another's, or is the same (``v1.0`` and ``v1.0.1``, a file ``b`` and a
    folder ``b/``): names that SeaweedFS orders otherwise than S3 does. Sorted, such a pair
    lies side by side, or the name between begins the other too."""
    names = sorted(entry.rstrip("/") for entry in entries)
    return any(b.startswith(a) for a, b in zip(names, names[1:]))


def _name_after(unit: str) -> str:
    """A StartAfter past a delimiter listing's entry and nothing else: a key itself, a
    folder ``a/`` as ``a0`` ("0" follows "/"), past every key under it."""
    return unit[:-1] + "0" if unit.endswith("/") else unit


def _ordered_pages(
    storage: _Storage, bucket: str, prefix: str, workers: int
) -> Iterator[dict[str, Any]]:
    """Every stored key under ``prefix`` as pages of a plain listing give them, in order,
    read ``workers`` requests at once where the keys are in folders. A plain listing is a
    chain of requests, each naming the next, so alone it waits on the server page after
    page. Past its first page (all there is, mostly: one request, as before), a delimiter
    listing ("/", looking into a lone folder) names the folders; runs of them are listed
    each on its own (_KeyRange), up to ``workers`` at once, the keys beside them coming
    from the delimiter listing itself. A run takes as many folders as make about
    _LIST_TASK_PAGES pages by the keys per folder seen so far (one folder, until a run is
    done). In memory: three delimiter pages and (workers + 1) tasks' pages.

    Where one name in a delimiter listing begins another (``v1.0`` and ``v1.0.1``; a file
    ``b`` and a folder ``b/``) the rest is one plain listing: the first page's own, or past
    the last entry given. SeaweedFS sorts such names as a file system does (``v1.0/a``
    before ``v1.0.1/a``, where S3 sorts ``v1.0.1/a`` first), and its StartAfter skips a
    folder of that name and keys that sort before it as S3 sorts, so a split there could
    lose keys; past an entry no name begins, S3's order and its agree. Only entries whole
    are started after: the first page's last folder is finished by that page's listing."""
    import concurrent.futures

    opening = storage.list_objects_v2(bucket, prefix=prefix, max_keys=_LIST_PAGE_KEYS)
    given = opening.get("Contents", [])
    yield {"Contents": given}
    if not opening.get("IsTruncated") or not given:
        if opening.get("IsTruncated"):  # a page of nothing that goes on: plainly, then
            yield from _read_ahead(_list_pages(storage, bucket, prefix=prefix))
        return
    token = opening.get("NextContinuationToken")
    name, slash, _ = given[-1]["Key"][len(prefix) :].partition("/")
    entry = prefix + name + slash  # the entry the first page ended in
    # a folder: the rest of it from the first page's own listing, on to its end
    tail = _KeyRange(storage, bucket, prefix, None, last=entry, token=token) if slash else None
    start = _name_after(entry)  # the StartAfter of the runs that follow
    before: str | None = entry
    # the folder's name, not past it: a name it begins ("b0" after "b/") is seen and checked
    look = entry[:-1] if slash else entry
    top = prefix
    for _ in range(_LIST_DESCEND_MAX):
        first = storage.list_objects_v2(
            bucket, prefix=top, delimiter="/", max_keys=_LIST_PAGE_KEYS, start_after=look
        )
        lone = first.get("CommonPrefixes", [])
        if first.get("IsTruncated") or first.get("Contents") or len(lone) != 1:
            break
        if before is not None and _names_begin([before, lone[0]["Prefix"]]):
            break  # the tail's folder, or one SeaweedFS lists within the tail: work() sees
        top, before = lone[0]["Prefix"], None
    held = [first]

    def fetch(token: str | None) -> dict[str, Any]:
        if token is None and held:
            return held.pop()
        return storage.list_objects_v2(
            bucket, prefix=top, delimiter="/", max_keys=_LIST_PAGE_KEYS, continuation_token=token
        )

    seen = [0, 0]  # keys, folders of the runs done

    def run_size() -> int:  # a tenth short of the pages: the next page would be mostly past
        keys, folders = seen
        if not keys:
            return 1
        return max(1, min(1000, _LIST_TASK_PAGES * _LIST_PAGE_KEYS * 9 * folders // (10 * keys)))

    def units_of(page: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
        units: list[tuple[str, dict[str, Any] | None]] = [
            (o["Key"], o) for o in page.get("Contents", [])
        ]
        units += [(p["Prefix"], None) for p in page.get("CommonPrefixes", [])]
        return sorted(units, key=lambda unit: unit[0])

    def work(start: str | None, before: str | None) -> Iterator[Any]:
        levels = _read_ahead(
            _pages(fetch, lambda page: page.get("NextContinuationToken"), "ListObjectsV2")
        )
        units: list[tuple[str, dict[str, Any] | None]] | None = [
            unit
            for unit in units_of(next(levels))
            if unit[0] != before  # the tail's
        ]
        opened = False
        while units is not None:
            following = next(levels, None)
            after_page = units_of(following) if following is not None else None
            # with the next page's first entry: a file "b" ending a page given, its folder
            # "b/" beginning the next, the rest would start after "b", which SeaweedFS's
            # StartAfter takes as the folder too
            near = {before, *(u for u, _ in units), *(u for u, _ in (after_page or [])[:1])}
            if _names_begin([n for n in near if n]):
                if opened:  # past the last entry given, which no name here begins
                    yield _KeyRange(storage, bucket, top, start)
                else:  # nothing given past the first page: its own listing goes on
                    yield _KeyRange(storage, bucket, prefix, None, token=token)
                return
            if not opened and tail is not None:
                yield tail
            opened = True
            for is_folder, group in itertools.groupby(units, key=lambda unit: unit[1] is None):
                entries = list(group)
                if not is_folder:
                    yield {"Contents": [o for _, o in entries]}
                    start = before = entries[-1][0]
                while is_folder and entries:
                    run = [name for name, _ in entries[: run_size()]]
                    common = os.path.commonprefix(run)  # noqa: RUF071 (characters)
                    yield _KeyRange(storage, bucket, common, start, run[0], run[-1], len(run))
                    entries = entries[len(run) :]
                    before = run[-1]
                    start = _name_after(before)
            units = after_page

    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dg-list")
    window: collections.deque[tuple[Any, Any]] = collections.deque()
    items = work(start, before)
    failed: list[Exception] = []
    try:
        while True:
            while len(window) <= workers and not failed:
                try:
                    item = next(items, None)
                except Exception as e:  # raised in its place: after the pages before it
                    failed.append(e)
                    item = e
                if item is None:
                    break
                task = pool.submit(item.take) if isinstance(item, _KeyRange) else None
                window.append((task, item))
            if not window:
                return
            task, item = window.popleft()
            if isinstance(item, Exception):
                raise item
            if task is None:
                pages = [item]
            else:
                pages, more = task.result()
                if more:
                    window.appendleft((pool.submit(item.take), item))
                elif item.folders:
                    seen[0] += item.keys
                    seen[1] += item.folders
            yield from pages
    finally:
        for task, _ in window:
            if task is not None:
                task.cancel()
        pool.shutdown(wait=False)


def _uploads_page(
    bucket: str,
    uploads: list[dict[str, Any]],
    *,
    prefix: str = "",
    key_marker: str = "",
    upload_id_marker: str = "",
    max_uploads: int | None = None,
) -> dict[str, Any]:
    """One ListMultipartUploads page of ``uploads`` (every upload in progress under
    ``prefix``: Key, UploadId, Initiated) as boto3 parses S3's reply: in S3's order (by key,
    then as started), those after the markers (with only ``key_marker``, the later keys;
    with ``upload_id_marker`` too, also that key's uploads after the one it names), at most
    ``max_uploads`` (1,000) of them, and the markers of the next page when there is one.
    The one page builder of the local store and of the client's logical uploads."""
    ordered = sorted(
        uploads, key=lambda u: (u["Key"].encode("utf-8"), u["Initiated"], u["UploadId"])
    )
    if key_marker:
        mark = key_marker.encode("utf-8")
        ids = [u["UploadId"] for u in ordered if u["Key"] == key_marker]
        if upload_id_marker in ids:
            later = set(ids[ids.index(upload_id_marker) + 1 :])
        else:  # gone since: S3's rule, the upload ids that sort after it
            later = {i for i in ids if upload_id_marker and i > upload_id_marker}
        ordered = [u for u in ordered if u["Key"].encode("utf-8") > mark or u["UploadId"] in later]
    limit = 1000 if max_uploads is None else max_uploads
    out: dict[str, Any] = {
        "Bucket": bucket,
        "KeyMarker": key_marker,
        "UploadIdMarker": upload_id_marker,
        "Prefix": prefix,
        "MaxUploads": limit,
        "IsTruncated": len(ordered) > limit,
    }
    if ordered[:limit]:
        out["Uploads"] = ordered[:limit]
    if out["IsTruncated"] and limit > 0:
        out["NextKeyMarker"] = ordered[limit - 1]["Key"]
        out["NextUploadIdMarker"] = ordered[limit - 1]["UploadId"]
    return out


def _parts_page(
    parts: list[dict[str, Any]], *, part_number_marker: int = 0, max_parts: int | None = None
) -> dict[str, Any]:
    """The paging members of one ListParts page of ``parts`` (every part uploaded, in
    order): those after ``part_number_marker``, at most ``max_parts`` (1,000) of them, and
    NextPartNumberMarker when more follow. Of the local store and the client's uploads."""
    after = [p for p in parts if p["PartNumber"] > part_number_marker]
    limit = 1000 if max_parts is None else max_parts
    out: dict[str, Any] = {
        "PartNumberMarker": part_number_marker,
        "MaxParts": limit,
        "IsTruncated": len(after) > limit,
        "Parts": after[:limit],
    }
    if out["IsTruncated"] and limit > 0:
        out["NextPartNumberMarker"] = after[limit - 1]["PartNumber"]
    return out


def _all_uploads(storage: _Storage, bucket: str, prefix: str = "") -> list[dict[str, Any]]:
    """Every multipart upload in progress under ``prefix``, all pages (a server answers
    at most 1,000 at a time): what a cleanup must see, or the uploads it misses keep
    costing storage."""

    def fetch(token: str | None) -> dict[str, Any]:
        import json

        key_marker, upload_id_marker = json.loads(token) if token else ("", "")
        return storage.list_multipart_uploads(
            bucket, prefix=prefix, key_marker=key_marker, upload_id_marker=upload_id_marker
        )

    def next_token(page: dict[str, Any]) -> str | None:
        import json

        markers = [page.get("NextKeyMarker") or "", page.get("NextUploadIdMarker") or ""]
        return json.dumps(markers) if any(markers) else None

    pages = _pages(fetch, next_token, "ListMultipartUploads")
    return [upload for page in pages for upload in page.get("Uploads", [])]


def _all_parts(storage: _Storage, bucket: str, key: str, upload_id: str) -> list[dict[str, Any]]:
    """Every part of an upload in progress, all pages (a server answers at most 1,000 at
    a time)."""

    def fetch(token: str | None) -> dict[str, Any]:
        return storage.list_parts(bucket, key, upload_id, part_number_marker=int(token or 0))

    def next_token(page: dict[str, Any]) -> str | None:
        number = page.get("NextPartNumberMarker")
        return str(number) if number else None

    pages = _pages(fetch, next_token, "ListParts")
    return [part for page in pages for part in page.get("Parts", [])]


###############################################################################
# Storage: S3 over HTTP #######################################################
###############################################################################


def _acl_response(root: ET.Element, resp: _Response) -> dict[str, Any]:
    """GetBucketAcl/GetObjectAcl's AccessControlPolicy as boto3 returns it."""
    owner = root.find("Owner")
    grants = []
    for g in root.iter("Grant"):
        grantee_el = g.find("Grantee")
        grantee: dict[str, Any] = {}
        if grantee_el is not None:
            for child in grantee_el:
                grantee[child.tag] = child.text or ""
            xsi_type = [v for k, v in grantee_el.attrib.items() if k.endswith("type")]
            if xsi_type:
                grantee["Type"] = xsi_type[0]
        grants.append({"Grantee": grantee, "Permission": _xml_text(g, "Permission", "")})
    return {
        "Owner": {
            "DisplayName": _xml_text(owner, "DisplayName", ""),
            "ID": _xml_text(owner, "ID", ""),
        },
        "Grants": grants,
        "ResponseMetadata": _response_metadata(resp),
    }


def _response_metadata(resp: _Response) -> dict[str, Any]:
    return {
        "RequestId": resp.headers.get("x-amz-request-id", ""),
        "HostId": resp.headers.get("x-amz-id-2", ""),
        "HTTPStatusCode": resp.status,
        "HTTPHeaders": dict(resp.headers),
        "RetryAttempts": resp.attempts - 1,
    }


def _parse_error(
    status: int, reason: str, headers: dict[str, str], body: bytes, endpoint: str
) -> dict[str, Any]:
    """The ``response`` dict of a ClientError, from an S3 error reply.

    HEAD errors have no body: the code is the status as a string and the message the
    reason phrase, as botocore does. A body that is not S3 XML (a proxy's HTML page) gives
    a readable message instead of a parser traceback."""
    import http.client
    import xml.etree.ElementTree as ET

    error: dict[str, Any] = {
        "Code": str(status),
        "Message": reason or http.client.responses.get(status, ""),
    }
    meta: dict[str, Any] = {
        "RequestId": headers.get("x-amz-request-id", ""),
        "HostId": headers.get("x-amz-id-2", ""),
        "HTTPStatusCode": status,
        "HTTPHeaders": dict(headers),
    }
    text = body.strip()
    if text:
        try:
            root = _xml_parse(text)
        except (ET.ParseError, ValueError):
            root = None
        if root is not None and root.tag == "Error":
            for child in root:
                if child.tag in ("RequestId", "HostId"):
                    meta[child.tag] = child.text or ""
                elif len(child) == 0:
                    error[child.tag] = child.text or ""
        else:
            kind = headers.get("content-type", "unknown content type").split(";")[0]
            snippet = re.sub(r"<[^>]*>", " ", text[:400].decode("utf-8", "replace"))
            snippet = " ".join(snippet.split())[:160]
            error["Message"] = "%s (the server at %s answered with %s, not S3 XML: %r)" % (
                error["Message"],
                endpoint,
                kind,
                snippet,
            )
    return {"Error": error, "ResponseMetadata": meta}


def _list_v2_response(root: ET.Element, encoded: bool) -> dict[str, Any]:
    """boto3's ListObjectsV2 shape from the XML, keys url-decoded when encoding-type=url.
    One pass over the elements, tags with or without their namespace (the first of a
    name counts, as ``find`` takes it); a page's repeated LastModified is parsed once."""

    def dec(value: str | None) -> str | None:
        import urllib.parse

        if value is None or not encoded:
            return value
        return urllib.parse.unquote_plus(value)

    dates: dict[str, datetime.datetime] = {}
    contents = []
    prefixes = []
    top: dict[str, str] = {}
    for el in root:
        tag = _local_name(el.tag)
        if tag == "Contents":
            fields: dict[str, ET.Element] = {}
            for child in el:
                fields.setdefault(_local_name(child.tag), child)
            stamp = _child_text(fields, "LastModified", "")
            when = dates.get(stamp)
            if when is None:
                when = dates[stamp] = _date_or_absent(stamp, "LastModified") or _EPOCH
            item: dict[str, Any] = {
                "Key": dec(_child_text(fields, "Key", "")),
                "LastModified": when,
                "ETag": _child_text(fields, "ETag", ""),
                "Size": int(_child_text(fields, "Size", "0") or 0),
                "StorageClass": _child_text(fields, "StorageClass", "STANDARD"),
            }
            owner = fields.get("Owner")
            if owner is not None:
                names: dict[str, str] = {}
                for child in owner:
                    names.setdefault(_local_name(child.tag), child.text or "")
                item["Owner"] = {
                    "DisplayName": names.get("DisplayName", ""),
                    "ID": names.get("ID", ""),
                }
            contents.append(item)
        elif tag == "CommonPrefixes":
            first = next((c for c in el if _local_name(c.tag) == "Prefix"), None)
            prefixes.append({"Prefix": dec("" if first is None else first.text or "")})
        elif tag not in top:
            top[tag] = el.text or ""
    out: dict[str, Any] = {
        "IsTruncated": top.get("IsTruncated", "false").lower() == "true",
        "Name": top.get("Name", ""),
        "Prefix": dec(top.get("Prefix", "")),
        "MaxKeys": int(top.get("MaxKeys", "1000") or 1000),
        "KeyCount": int(top.get("KeyCount", str(len(contents))) or 0),
    }
    if contents:
        out["Contents"] = contents
    if prefixes:
        out["CommonPrefixes"] = prefixes
    for tag in ("Delimiter", "StartAfter", "ContinuationToken", "NextContinuationToken"):
        value = top.get(tag)
        if value is not None:
            out[tag] = dec(value) if tag in ("Delimiter", "StartAfter") else value
    if encoded:
        out["EncodingType"] = "url"
    return out


def _child_text(fields: Mapping[str, ET.Element], name: str, default: str) -> str:
    child = fields.get(name)
    return default if child is None else child.text or ""


def _delete_request_xml(
    keys: list[str], quiet: bool, conditions: Mapping[str, Mapping[str, Any]]
) -> bytes:
    """The body of a DeleteObjects request: each key with its ETag, LastModifiedTime and
    Size conditions, for the server to decide."""
    parts = ['<Delete xmlns="%s">' % _S3_XMLNS]
    if quiet:
        parts.append("<Quiet>true</Quiet>")
    for k in keys:
        parts.append("<Object><Key>%s</Key>" % _xml_escape(k))
        cond = conditions.get(k) or {}
        if cond.get("ETag") is not None:
            parts.append("<ETag>%s</ETag>" % _xml_escape(str(cond["ETag"])))
        if cond.get("LastModifiedTime") is not None:
            when = _timestamp_param(cond["LastModifiedTime"])
            assert when is not None
            parts.append("<LastModifiedTime>%s</LastModifiedTime>" % _iso_utc(when))
        if cond.get("Size") is not None:
            parts.append("<Size>%d</Size>" % int(cond["Size"]))
        parts.append("</Object>")
    parts.append("</Delete>")
    return "".join(parts).encode("utf-8")


def _delete_objects_response(root: ET.Element, resp: _Response) -> dict[str, Any]:
    """boto3's DeleteObjects shape (Deleted, Errors, each only when not empty) from the XML."""
    out: dict[str, Any] = {}
    deleted = [{"Key": _xml_text(d, "Key", "")} for d in root.findall("Deleted")]
    errors = [
        {
            "Key": _xml_text(e, "Key", ""),
            "Code": _xml_text(e, "Code", ""),
            "Message": _xml_text(e, "Message", ""),
        }
        for e in root.findall("Error")
    ]
    if deleted:
        out["Deleted"] = deleted
    if errors:
        out["Errors"] = errors
    out["ResponseMetadata"] = _response_metadata(resp)
    return out


class _S3Storage:
    """Raw S3 operations over ``http.client``: SigV4, keep-alive, retries, streaming.

    Every method returns boto3's response shape for that operation and raises
    :class:`ClientError` (or a subclass) for service errors."""

    is_local = False

    def __init__(
        self,
        *,
        endpoint_url: str | None,
        region: str,
        credentials: Callable[[], _Credentials | None],
        addressing_style: str | None = None,
        max_attempts: int = _DEFAULT_MAX_ATTEMPTS,
        connect_timeout: float = 60.0,
        read_timeout: float = 60.0,
        request_timeout: float = _DEFAULT_REQUEST_TIMEOUT,
        verify: bool | str = True,
        max_pool_connections: int = 10,
        proxy_for: Callable[[str], str | None] = lambda url: None,
        payload_signing: bool = True,
        now: Callable[[], datetime.datetime] = _utcnow,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = _random,
    ) -> None:
        import urllib.parse

        self.region = region
        self._credentials = credentials
        self._max_attempts = max(1, int(max_attempts))
        self._payload_signing = payload_signing
        self._now = now
        self._sleep = sleep
        self._rand = rand
        self._bucket_regions: dict[str, str] = {}
        if endpoint_url:
            if "://" not in endpoint_url:
                endpoint_url = "https://" + endpoint_url
            parts = urllib.parse.urlsplit(endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise InvalidConfigError(error_msg="Invalid endpoint: %s" % endpoint_url)
            self._custom_endpoint = True
        else:
            host = "s3.amazonaws.com" if region == "us-east-1" else "s3.%s.amazonaws.com" % region
            parts = urllib.parse.urlsplit("https://" + host)
            self._custom_endpoint = False
        self._scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._base_path = parts.path.rstrip("/")
        self.endpoint_url = "%s://%s" % (parts.scheme, parts.netloc)
        self._addressing = addressing_style or "auto"
        self._pool = _ConnectionPool(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            request_timeout=request_timeout,
            verify=verify,
            max_idle=max_pool_connections,
            proxy_for=proxy_for,
        )
        self._conditional_writes: bool | None = None
        self._conditional_multipart: bool | None = None

    def close(self) -> None:
        self._pool.close()

    # -- request plumbing ---------------------------------------------------

    def _virtual(self, bucket: str) -> bool:
        if not bucket or self._addressing == "path":
            return False
        dns_ok = bool(re.match(_STRICT_BUCKET_RE, bucket)) and "." not in bucket
        if self._addressing == "virtual":
            return True
        # botocore: path style whenever an endpoint is given, virtual on AWS when it can.
        return dns_ok and not self._custom_endpoint

    def _target(self, bucket: str, key: str | None) -> tuple[str, str, str]:
        """(host, netloc for signing, encoded path) of a request."""
        host = self._host
        region = self._bucket_regions.get(bucket)
        if region and not self._custom_endpoint:
            host = "s3.amazonaws.com" if region == "us-east-1" else "s3.%s.amazonaws.com" % region
        path = self._base_path
        if bucket and self._virtual(bucket):
            host = "%s.%s" % (bucket, host)
        elif bucket:
            path += "/" + _quote_key(bucket)
        if key is not None:
            path += "/" + _quote_key(key)
        elif not path:
            path = "/"
        elif bucket and self._virtual(bucket):
            path += "/"
        # As signed: lower case, IPv6 in brackets, the default port left out.
        netloc = _host_header(
            self._scheme, "%s:%d" % ("[%s]" % host if ":" in host else host, self._port)
        )
        return host, netloc, path or "/"

    def object_url(self, bucket: str, key: str) -> str:
        _, netloc, path = self._target(bucket, key)
        return "%s://%s%s" % (self._scheme, netloc, path)

    def _signer(self, bucket: str) -> _SigV4 | None:
        creds = self._credentials()
        if creds is None:
            return None
        region = self._bucket_regions.get(bucket, self.region)
        return _SigV4(creds.access_key, creds.secret_key, creds.token, region)

    def _payload_hash(self, body: Any, given: str | None) -> str:
        import hashlib

        if given:
            return given
        if body is None or body == b"":
            return _EMPTY_SHA256
        if isinstance(body, (bytes, bytearray, memoryview)):
            return hashlib.sha256(body).hexdigest()
        if not self._payload_signing and self._scheme == "https":
            return _UNSIGNED_PAYLOAD
        if hasattr(body, "seekable") and body.seekable():
            return _hash_file(body).sha256
        return _UNSIGNED_PAYLOAD

    def request(
        self,
        operation: str,
        method: str,
        bucket: str = "",
        key: str | None = None,
        *,
        query: list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        body: Any = None,
        content_sha256: str | None = None,
        stream: bool = False,
    ) -> _Response:
        """Send one S3 request with retries; raise ClientError for an error reply.

        Each attempt re-signs (new timestamp) and rewinds the body. What is tried again
        and how long to wait: :func:`_retryable` and :func:`_retry_delay` (botocore's
        standard mode); a reply naming the bucket's region is followed once."""
        query = list(query or [])
        if body is not None and not isinstance(body, (bytes, bytearray, memoryview)):
            if not getattr(body, "seekable", lambda: False)():
                body = _spool(body)  # SigV4 needs the payload's hash, S3 a length, retries a rewind
        start = body.tell() if getattr(body, "seekable", lambda: False)() else None
        length = _body_length(body)
        assert length is not None  # every body left is bytes or seekable: its length is known
        content_length = str(length) if body is not None or method in ("PUT", "POST") else None
        payload_hash = self._payload_hash(body, content_sha256)
        redirected = False
        attempt = 0
        while True:
            attempt += 1
            if start is not None:
                body.seek(start)
            host, url, send_headers = self._signed(
                method, bucket, key, query, headers, content_length, payload_hash
            )
            pool_key = (self._scheme, host, self._port)
            try:
                resp = _send_once(
                    self._pool, pool_key, self.endpoint_url, method, url, send_headers, body, stream
                )
            except (ReadTimeoutError, EndpointConnectionError) as e:
                if attempt >= self._max_attempts:
                    raise
                logger.debug("%s: %s, retrying", operation, e)
            else:
                resp = resp._replace(attempts=attempt)
                if resp.status < 300:
                    return resp
                err = _parse_error(
                    resp.status, resp.reason, resp.headers, resp.body, self.endpoint_url
                )
                err["ResponseMetadata"]["RetryAttempts"] = attempt - 1
                code = err["Error"].get("Code", "")
                new_region = self._redirect_region(resp, err)
                if new_region and not redirected and bucket:
                    redirected = True
                    logger.debug("bucket %s is in %s; redirecting once", bucket, new_region)
                    self._bucket_regions[bucket] = new_region
                    attempt -= 1
                    continue
                retryable = _retryable(resp.status, code)
                if not retryable or attempt >= self._max_attempts:
                    if retryable and attempt >= self._max_attempts > 1:
                        err["ResponseMetadata"]["MaxAttemptsReached"] = True
                    raise _client_error(err, operation)
                logger.debug("%s: %s (HTTP %d), retrying", operation, code, resp.status)
            self._sleep(_retry_delay(attempt, self._rand))

    def _signed(
        self,
        method: str,
        bucket: str,
        key: str | None,
        query: list[tuple[str, str]],
        headers: dict[str, str] | None,
        content_length: str | None,
        payload_hash: str,
    ) -> tuple[str, str, dict[str, str]]:
        """One attempt's host to connect to, request target and headers, signed anew (a new
        timestamp): for the bucket's virtual host, or the regional endpoint a redirect named."""
        host, netloc, path = self._target(bucket, key)
        send_headers = {"host": netloc}
        send_headers.update(headers or {})
        if content_length is not None:
            send_headers["Content-Length"] = content_length
        signer = self._signer(bucket)
        if signer is not None:
            signer.sign_headers(method, path, query, send_headers, payload_hash, self._now())
        url = path
        if query:
            # Sub-resources (``?uploads``, ``?delete``) go bare, as botocore sends them.
            url += "?" + "&".join(_quote(k) + ("=" + _quote(v) if v else "") for k, v in query)
        return host, url, send_headers

    def _redirect_region(self, resp: _Response, err: dict[str, Any]) -> str | None:
        """The bucket's region when S3 says we asked the wrong one (botocore
        S3RegionRedirector: 301 PermanentRedirect, 400 AuthorizationHeaderMalformed)."""
        if self._custom_endpoint:
            return None
        code = err["Error"].get("Code", "")
        if resp.status not in (301, 307, 400) or (
            resp.status == 400
            and code not in ("AuthorizationHeaderMalformed", "IllegalLocationConstraintException")
        ):
            return None
        region = resp.headers.get("x-amz-bucket-region") or err["Error"].get("Region")
        return region if region and region != self.region else None

    def _xml(self, resp: _Response, strip: bool = True) -> ET.Element:
        import xml.etree.ElementTree as ET

        try:
            return _xml_parse(resp.body, strip)
        except (ET.ParseError, ValueError) as e:
            raise ResponseParserError(
                endpoint_url=self.endpoint_url, status=resp.status, reason=str(e)
            ) from None

    def presign_url(
        self,
        method: str,
        bucket: str,
        key: str | None,
        query: list[tuple[str, str]],
        expires: int,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """A SigV4 query-signed URL (``UNSIGNED-PAYLOAD``; ``host`` and ``headers`` signed)."""
        _, netloc, path = self._target(bucket, key)
        base = "%s://%s%s" % (self._scheme, netloc, path)
        signer = self._signer(bucket)
        if signer is None:  # anonymous: a plain URL
            if not query:
                return base
            return base + "?" + "&".join("%s=%s" % (_quote(k), _quote(v)) for k, v in query)
        return (
            base
            + "?"
            + signer.presign_query(method, netloc, path, query, expires, self._now(), headers)
        )

    def presign_post(
        self, bucket: str, fields: dict[str, str], conditions: list[Any], expires: int
    ) -> dict[str, Any]:
        _, netloc, path = self._target(bucket, None)
        signer = self._signer(bucket)
        if signer is None:
            raise NoCredentialsError()
        signed = signer.presign_post(fields, conditions, expires, self._now())
        return {"url": "%s://%s%s" % (self._scheme, netloc, path), "fields": signed}

    # -- buckets ------------------------------------------------------------

    def list_buckets(self) -> dict[str, Any]:
        resp = self.request("ListBuckets", "GET")
        root = self._xml(resp)
        buckets = []
        for b in root.iter("Bucket"):
            created = _xml_text(b, "CreationDate", "") or ""
            buckets.append(
                {
                    "Name": _xml_text(b, "Name", ""),
                    "CreationDate": _date_or_absent(created, "CreationDate"),
                }
            )
        owner = root.find("Owner")
        out: dict[str, Any] = {"Buckets": buckets}
        if owner is not None:
            out["Owner"] = {
                "DisplayName": _xml_text(owner, "DisplayName", ""),
                "ID": _xml_text(owner, "ID", ""),
            }
        out["ResponseMetadata"] = _response_metadata(resp)
        return out

    def create_bucket(
        self, bucket: str, *, location: str | None = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        _validate_bucket_name(bucket)
        body = b""
        if location and location != "us-east-1":
            body = (
                '<CreateBucketConfiguration xmlns="%s"><LocationConstraint>%s'
                "</LocationConstraint></CreateBucketConfiguration>"
                % (_S3_XMLNS, _xml_escape(location))
            ).encode()
        resp = self.request(
            "CreateBucket", "PUT", bucket, headers=dict(headers or {}), body=body or None
        )
        out: dict[str, Any] = {"Location": resp.headers.get("location", "/" + bucket)}
        out["ResponseMetadata"] = _response_metadata(resp)
        return out

    def delete_bucket(self, bucket: str) -> dict[str, Any]:
        resp = self.request("DeleteBucket", "DELETE", bucket)
        return {"ResponseMetadata": _response_metadata(resp)}

    def head_bucket(self, bucket: str) -> dict[str, Any]:
        resp = self.request("HeadBucket", "HEAD", bucket)
        out: dict[str, Any] = {}
        if "x-amz-bucket-region" in resp.headers:
            out["BucketRegion"] = resp.headers["x-amz-bucket-region"]
        out["ResponseMetadata"] = _response_metadata(resp)
        return out

    def get_bucket_location(self, bucket: str) -> dict[str, Any]:
        resp = self.request("GetBucketLocation", "GET", bucket, query=[("location", "")])
        root = self._xml(resp)
        # us-east-1 is an empty LocationConstraint; boto3 returns None for it.
        return {
            "LocationConstraint": root.text or None,
            "ResponseMetadata": _response_metadata(resp),
        }

    def get_bucket_acl(self, bucket: str) -> dict[str, Any]:
        resp = self.request("GetBucketAcl", "GET", bucket, query=[("acl", "")])
        return _acl_response(self._xml(resp), resp)

    def put_bucket_acl(
        self, bucket: str, *, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> dict[str, Any]:
        resp = self.request(
            "PutBucketAcl",
            "PUT",
            bucket,
            query=[("acl", "")],
            headers=dict(headers or {}),
            body=body,
        )
        return {"ResponseMetadata": _response_metadata(resp)}

    # -- objects ------------------------------------------------------------

    def put_object(
        self,
        bucket: str,
        key: str,
        body: Any,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: dict[str, str] | None = None,
        content_sha256: str | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> dict[str, Any]:
        """PUT an object from bytes or a file object (streamed, never read into memory).

        ``if_none_match`` asks for ``If-None-Match: *`` (create only if absent; 412 if it
        exists); ``if_match`` for ``If-Match: <etag>``. Whether the server honours them is
        what :meth:`supports_conditional_writes` finds out."""
        _validate_key(key)
        send = dict(headers or {})
        send.update(_metadata_headers(metadata))
        if not any(name.lower() == "content-type" for name in send):
            send["Content-Type"] = "binary/octet-stream"
        if if_none_match:
            send["If-None-Match"] = "*"
        if if_match:
            send["If-Match"] = if_match
        resp = self.request(
            "PutObject", "PUT", bucket, key, headers=send, body=body, content_sha256=content_sha256
        )
        out: dict[str, Any] = {"ETag": resp.headers.get("etag", "")}
        for header, name in (
            ("x-amz-server-side-encryption", "ServerSideEncryption"),
            ("x-amz-version-id", "VersionId"),
        ):
            if header in resp.headers:
                out[name] = resp.headers[header]
        out["ResponseMetadata"] = _response_metadata(resp)
        return out

    def get_object(
        self,
        bucket: str,
        key: str,
        *,
        range: str | None = None,
        headers: dict[str, str] | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        """GET an object; ``Body`` is a :class:`StreamingBody` the caller must read or close.
        ``query`` carries the ``response-*`` overrides."""
        _validate_key(key)
        send = dict(headers or {})
        if range:
            send["Range"] = range
        resp = self.request(
            "GetObject", "GET", bucket, key, headers=send, query=query or None, stream=True
        )
        out = _object_response(resp.headers)
        out["Body"] = resp.body
        out["ResponseMetadata"] = _response_metadata(resp)
        return out

    def head_object(
        self, bucket: str, key: str, *, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        _validate_key(key)
        resp = self.request("HeadObject", "HEAD", bucket, key, headers=dict(headers or {}))
        out = _object_response(resp.headers)
        out["ResponseMetadata"] = _response_metadata(resp)
        return out

    def delete_object(self, bucket: str, key: str) -> dict[str, Any]:
        resp = self.request("DeleteObject", "DELETE", bucket, key)
        out: dict[str, Any] = {}
        if "x-amz-delete-marker" in resp.headers:
            out["DeleteMarker"] = resp.headers["x-amz-delete-marker"] == "true"
        out["ResponseMetadata"] = _response_metadata(resp)
        return out

    def delete_objects(
        self,
        bucket: str,
        keys: list[str],
        *,
        quiet: bool = False,
        conditions: Mapping[str, Mapping[str, Any]] | None = None,
        check_limit: bool = True,
    ) -> dict[str, Any]:
        """DeleteObjects for up to 1000 keys (S3's limit per request; ``check_limit=False``
        sends more and lets the server answer, as boto3 does). ``conditions`` maps a key to
        its ``ETag``/``LastModifiedTime``/``Size`` conditions, sent for the server to decide."""
        import hashlib

        if check_limit and len(keys) > _DELETE_BATCH:
            raise ParamValidationError(report="DeleteObjects takes at most 1000 keys")
        conditions = conditions or {}
        # XML 1.0 cannot carry most control characters, even escaped: such keys would make
        # the whole batch MalformedXML, so they are deleted one by one.
        odd = [k for k in keys if re.search(_XML_INVALID, k)]
        if odd:
            rest = [k for k in keys if not re.search(_XML_INVALID, k)]
            return self._delete_one_by_one(bucket, odd, rest, quiet, conditions)
        body = _delete_request_xml(keys, quiet, conditions)
        # S3 requires Content-MD5 (or a checksum) on DeleteObjects.
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode("ascii")
        resp = self.request(
            "DeleteObjects",
            "POST",
            bucket,
            query=[("delete", "")],
            headers={"Content-MD5": md5, "Content-Type": "application/xml"},
            body=body,
        )
        return _delete_objects_response(self._xml(resp), resp)

    def _delete_one_by_one(
        self,
        bucket: str,
        odd: list[str],
        rest: list[str],
        quiet: bool,
        conditions: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Any]:
        """DeleteObjects' reply for keys XML cannot carry (``odd``), each deleted with
        DeleteObject (never unconditionally: its conditions are checked first), and the
        others (``rest``) in one batch, merged into one reply."""
        single: dict[str, Any] = {"Deleted": [], "Errors": []}
        for k in odd:
            try:
                if conditions.get(k):  # never unconditionally: check, then delete
                    self._check_delete_conditions(bucket, k, conditions[k])
                self.delete_object(bucket, k)
                single["Deleted"].append({"Key": k})
            except ClientError as e:
                err = e.response["Error"]
                single["Errors"].append(
                    {"Key": k, "Code": err.get("Code"), "Message": err.get("Message")}
                )
        if rest:
            batch = self.delete_objects(bucket, rest, quiet=quiet, conditions=conditions)
            single["Deleted"] += batch.get("Deleted", [])
            single["Errors"] += batch.get("Errors", [])
            single["ResponseMetadata"] = batch["ResponseMetadata"]
        else:
            single["ResponseMetadata"] = _local_metadata({})
        return {k: v for k, v in single.items() if v or k == "ResponseMetadata"}

    def _check_delete_conditions(self, bucket: str, key: str, cond: Mapping[str, Any]) -> None:
        head = self.head_object(bucket, key)
        if not _delete_conditions_hold(head, cond):
            raise _client_error(
                {
                    "Error": {"Code": "PreconditionFailed", "Message": _PRECONDITION_MESSAGE},
                    "ResponseMetadata": _local_metadata({}),
                },
                "DeleteObjects",
            )

    def copy_object(
        self,
        bucket: str,
        key: str,
        source_bucket: str,
        source_key: str,
        *,
        metadata: Mapping[str, str] | None = None,
        metadata_directive: str = "COPY",
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        _validate_key(key)
        send = dict(headers or {})
        send["x-amz-copy-source"] = "/%s/%s" % (_quote_key(source_bucket), _quote_key(source_key))
        send["x-amz-metadata-directive"] = metadata_directive
        if metadata_directive == "REPLACE":
            send.update(_metadata_headers(metadata))
        resp = self.request("CopyObject", "PUT", bucket, key, headers=send)
        root = self._xml(resp)
        if root.tag == "Error":  # S3 may answer 200 and put the error in the body.
            err = _parse_error(500, "Internal Error", resp.headers, resp.body, self.endpoint_url)
            raise _client_error(err, "CopyObject")
        result = {
            "ETag": _xml_text(root, "ETag", ""),
            "LastModified": _date_or_absent(_xml_text(root, "LastModified"), "LastModified")
            or _EPOCH,
        }
        return {"CopyObjectResult": result, "ResponseMetadata": _response_metadata(resp)}

    def list_objects_v2(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        max_keys: int = 1000,
        continuation_token: str | None = None,
        start_after: str | None = None,
        fetch_owner: bool = False,
        decode: bool = True,
    ) -> dict[str, Any]:
        """One page of ListObjectsV2; keys always asked url-encoded so any byte survives
        XML (botocore sends encoding-type=url and decodes). ``decode=False`` leaves them
        as the server encoded them (for a caller that asked EncodingType='url' itself:
        servers differ, "+" or "%20" for a space)."""
        query = [("list-type", "2"), ("encoding-type", "url"), ("max-keys", str(max_keys))]
        if prefix:
            query.append(("prefix", prefix))
        if delimiter:
            query.append(("delimiter", delimiter))
        if continuation_token:
            query.append(("continuation-token", continuation_token))
        if start_after:
            query.append(("start-after", start_after))
        if fetch_owner:
            query.append(("fetch-owner", "true"))
        resp = self.request("ListObjectsV2", "GET", bucket, query=query)
        root = self._xml(resp, strip=False)  # _list_v2_response reads the tags as they are
        kind = next((el.text or "" for el in root if _local_name(el.tag) == "EncodingType"), "")
        encoded = kind.lower() == "url"
        out = _list_v2_response(root, encoded and decode)
        out["ResponseMetadata"] = _response_metadata(resp)
        return out

    # -- object tagging and ACLs ---------------------------------------------

    def get_object_tagging(self, bucket: str, key: str) -> dict[str, Any]:
        resp = self.request("GetObjectTagging", "GET", bucket, key, query=[("tagging", "")])
        root = self._xml(resp)
        tags = [
            {"Key": _xml_text(t, "Key", ""), "Value": _xml_text(t, "Value", "")}
            for t in root.iter("Tag")
        ]
        out: dict[str, Any] = {"TagSet": tags}
        if "x-amz-version-id" in resp.headers:
            out["VersionId"] = resp.headers["x-amz-version-id"]
        out["ResponseMetadata"] = _response_metadata(resp)
        return out

    def put_object_tagging(
        self, bucket: str, key: str, tags: list[dict[str, str]]
    ) -> dict[str, Any]:
        import hashlib

        body = (
            '<Tagging xmlns="%s"><TagSet>%s</TagSet></Tagging>'
            % (
                _S3_XMLNS,
                "".join(
                    "<Tag><Key>%s</Key><Value>%s</Value></Tag>"
                    % (_xml_escape(str(t.get("Key", ""))), _xml_escape(str(t.get("Value", ""))))
                    for t in tags
                ),
            )
        ).encode("utf-8")
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode("ascii")
        resp = self.request(
            "PutObjectTagging",
            "PUT",
            bucket,
            key,
            query=[("tagging", "")],
            headers={"Content-MD5": md5, "Content-Type": "application/xml"},
            body=body,
        )
        return {"ResponseMetadata": _response_metadata(resp)}

    def delete_object_tagging(self, bucket: str, key: str) -> dict[str, Any]:
        resp = self.request("DeleteObjectTagging", "DELETE", bucket, key, query=[("tagging", "")])
        return {"ResponseMetadata": _response_metadata(resp)}

    def get_object_acl(self, bucket: str, key: str) -> dict[str, Any]:
        resp = self.request("GetObjectAcl", "GET", bucket, key, query=[("acl", "")])
        return _acl_response(self._xml(resp), resp)

    def put_object_acl(
        self,
        bucket: str,
        key: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> dict[str, Any]:
        resp = self.request(
            "PutObjectAcl",
            "PUT",
            bucket,
            key,
            query=[("acl", "")],
            headers=dict(headers or {}),
            body=body,
        )
        return {"ResponseMetadata": _response_metadata(resp)}

    # -- multipart ------------------------------------------------------------

    def create_multipart_upload(
        self,
        bucket: str,
        key: str,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        _validate_key(key)
        send = dict(headers or {})
        send.update(_metadata_headers(metadata))
        if not any(name.lower() == "content-type" for name in send):
            send["Content-Type"] = "binary/octet-stream"
        resp = self.request(
            "CreateMultipartUpload", "POST", bucket, key, query=[("uploads", "")], headers=send
        )
        upload_id = _xml_text(self._xml(resp), "UploadId", "")
        if not upload_id:
            raise ResponseParserError(
                endpoint_url=self.endpoint_url, status=resp.status, reason="no UploadId"
            )
        return upload_id

    def upload_part(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        part_number: int,
        body: Any,
        *,
        content_sha256: str | None = None,
    ) -> str:
        resp = self.request(
            "UploadPart",
            "PUT",
            bucket,
            key,
            query=[("partNumber", str(part_number)), ("uploadId", upload_id)],
            body=body,
            content_sha256=content_sha256,
        )
        return resp.headers.get("etag", "")

    def complete_multipart_upload(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        parts: list[tuple[int, str]],
        *,
        if_none_match: bool = False,
    ) -> dict[str, Any]:
        """``if_none_match``: ``If-None-Match: *``, create only if absent (412 otherwise;
        :meth:`supports_conditional_multipart` finds out whether the server honours it)."""
        xml = ['<CompleteMultipartUpload xmlns="%s">' % _S3_XMLNS]
        for number, etag in parts:
            xml.append(
                "<Part><PartNumber>%d</PartNumber><ETag>%s</ETag></Part>"
                % (number, _xml_escape(etag))
            )
        xml.append("</CompleteMultipartUpload>")
        resp = self.request(
            "CompleteMultipartUpload",
            "POST",
            bucket,
            key,
            query=[("uploadId", upload_id)],
            headers={
                "Content-Type": "application/xml",
                **({"If-None-Match": "*"} if if_none_match else {}),
            },
            body="".join(xml).encode(),
        )
        root = self._xml(resp)
        if root.tag == "Error":  # a 200 whose body is an error (AWS docs, CompleteMultipartUpload)
            err = _parse_error(500, "Internal Error", resp.headers, resp.body, self.endpoint_url)
            raise _client_error(err, "CompleteMultipartUpload")
        return {
            "Bucket": bucket,
            "Key": key,
            "ETag": _xml_text(root, "ETag", ""),
            "Location": _xml_text(root, "Location", ""),
            "ResponseMetadata": _response_metadata(resp),
        }

    def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> dict[str, Any]:
        resp = self.request(
            "AbortMultipartUpload", "DELETE", bucket, key, query=[("uploadId", upload_id)]
        )
        return {"ResponseMetadata": _response_metadata(resp)}

    def list_parts(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        *,
        part_number_marker: int = 0,
        max_parts: int | None = None,
    ) -> dict[str, Any]:
        """One page of the parts (the server's 1,000 at most, or ``max_parts``) after
        ``part_number_marker``; ``_all_parts`` reads them all."""
        query = [("uploadId", upload_id)]
        if max_parts is not None:
            query.append(("max-parts", str(max_parts)))
        if part_number_marker:
            query.append(("part-number-marker", str(part_number_marker)))
        resp = self.request("ListParts", "GET", bucket, key, query=query)
        root = self._xml(resp)
        parts = [
            {
                "PartNumber": int(_xml_text(p, "PartNumber", "0") or 0),
                "ETag": _xml_text(p, "ETag", ""),
                "Size": int(_xml_text(p, "Size", "0") or 0),
            }
            for p in root.findall("Part")
        ]
        out: dict[str, Any] = {
            "Bucket": bucket,
            "Key": key,
            "UploadId": upload_id,
            "PartNumberMarker": part_number_marker,
            "MaxParts": int(_xml_text(root, "MaxParts") or (max_parts or 1000)),
            "IsTruncated": (_xml_text(root, "IsTruncated", "false") or "").lower() == "true",
            "Parts": parts,
        }
        if out["IsTruncated"]:  # S3 defines it as the last part shown
            given = _xml_text(root, "NextPartNumberMarker") or ""
            last = parts[-1]["PartNumber"] if parts else 0
            out["NextPartNumberMarker"] = int(given) if given.isdigit() else last
        out["ResponseMetadata"] = _response_metadata(resp)
        return out

    def list_multipart_uploads(
        self,
        bucket: str,
        *,
        prefix: str = "",
        key_marker: str = "",
        upload_id_marker: str = "",
        max_uploads: int | None = None,
    ) -> dict[str, Any]:
        """One page of the uploads in progress (the server's 1,000 at most, or
        ``max_uploads``) after the markers; ``_all_uploads`` reads them all."""
        query = [("uploads", "")]
        for name, value in (
            ("prefix", prefix),
            ("key-marker", key_marker),
            ("upload-id-marker", upload_id_marker),
            ("max-uploads", "" if max_uploads is None else str(max_uploads)),
        ):
            if value:
                query.append((name, value))
        resp = self.request("ListMultipartUploads", "GET", bucket, query=query)
        root = self._xml(resp)
        uploads = [
            {
                "Key": _xml_text(u, "Key", ""),
                "UploadId": _xml_text(u, "UploadId", ""),
                "Initiated": _date_or_absent(_xml_text(u, "Initiated"), "Initiated") or _EPOCH,
            }
            for u in root.findall("Upload")
        ]
        out: dict[str, Any] = {
            "Bucket": bucket,
            "KeyMarker": key_marker,
            "UploadIdMarker": upload_id_marker,
            "Prefix": prefix,
            "MaxUploads": int(_xml_text(root, "MaxUploads") or (max_uploads or 1000)),
            "IsTruncated": (_xml_text(root, "IsTruncated", "false") or "").lower() == "true",
            "Uploads": uploads,
        }
        if out["IsTruncated"]:
            next_key = _xml_text(root, "NextKeyMarker") or ""
            next_id = _xml_text(root, "NextUploadIdMarker") or ""
            if not (next_key or next_id) and uploads:
                # Swift names neither: S3 defines them as the last upload shown. (SeaweedFS
                # names only the upload id, and pages by it alone: kept as it is.)
                next_key, next_id = str(uploads[-1]["Key"]), str(uploads[-1]["UploadId"])
            out["NextKeyMarker"], out["NextUploadIdMarker"] = next_key, next_id
        out["ResponseMetadata"] = _response_metadata(resp)
        return out

    # -- capabilities -----------------------------------------------------------

    def supports_conditional_writes(self, bucket: str) -> bool:
        """Whether the server honours ``If-None-Match: *`` on PUT: write a probe object
        twice; a server that ignores the header lets the second PUT through."""
        if self._conditional_writes is None:
            probe = ".deltaglider/tmp/conditional-probe-%s" % _random_hex()
            self.put_object(bucket, probe, b"1", if_none_match=True)
            try:
                self.put_object(bucket, probe, b"2", if_none_match=True)
                self._conditional_writes = False
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                self._conditional_writes = status == 412
            finally:
                try:
                    self.delete_object(bucket, probe)
                except ClientError:
                    pass
            logger.debug("conditional writes honoured: %s", self._conditional_writes)
        return self._conditional_writes

    def supports_conditional_multipart(self, bucket: str) -> bool:
        """Whether ``If-None-Match: *`` on CompleteMultipartUpload is honoured too (AWS,
        Swift and SeaweedFS do): complete an upload over an existing probe object."""
        if self._conditional_multipart is None:
            self._conditional_multipart = False
            if self.supports_conditional_writes(bucket):
                probe = ".deltaglider/tmp/conditional-probe-%s" % _random_hex()
                self.put_object(bucket, probe, b"1")
                upload_id = self.create_multipart_upload(bucket, probe)
                try:
                    etag = self.upload_part(bucket, probe, upload_id, 1, b"2")
                    self.complete_multipart_upload(
                        bucket, probe, upload_id, [(1, etag)], if_none_match=True
                    )
                except ClientError as e:
                    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    self._conditional_multipart = status == 412
                finally:
                    try:
                        self.abort_multipart_upload(bucket, probe, upload_id)
                    except ClientError:
                        pass  # completed (a server that ignores the header) or gone
                    try:
                        self.delete_object(bucket, probe)
                    except ClientError:
                        pass
            logger.debug("conditional multipart completes: %s", self._conditional_multipart)
        return self._conditional_multipart


###############################################################################
# Storage: a local directory ##################################################
###############################################################################


def _local_root_from_url(url: str) -> str:
    """The directory of a ``file:`` endpoint: ``file:///abs/path``, ``file://localhost/abs``
    or ``file:/abs`` (RFC 8089), percent-decoded; ``file:///C:/dir`` on Windows.

    Relative forms are refused: in ``file://store/x`` the ``store`` is a host name (RFC 8089),
    and silently reading it as a folder would put artifacts somewhere unexpected."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    hint = "use file:///absolute/path (percent-encode '?', '#' and '%' in it)"
    if parts.scheme.lower() != "file":
        raise InvalidConfigError(error_msg=f"Not a file: URL: {url} ({hint})")
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise InvalidConfigError(error_msg=f"Invalid local endpoint: {url} ({hint})")
    path = urllib.parse.unquote(parts.path)
    if re.match(r"^/[A-Za-z]:[/\\]", path) and os.name == "nt":
        path = path[1:]
    if not path or not os.path.isabs(path) or "\x00" in path:
        raise InvalidConfigError(error_msg=f"Invalid local endpoint: {url} ({hint})")
    return os.path.normpath(path)


_LOCAL_ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
_LOCAL_AUTH_USERS = "http://acs.amazonaws.com/groups/global/AuthenticatedUsers"
_LOCAL_LOG_DELIVERY = "http://acs.amazonaws.com/groups/s3/LogDelivery"
#: Canned ACL → extra (group URI, permission) grants besides the owner's FULL_CONTROL.
_LOCAL_CANNED_ACLS: dict[str, tuple[tuple[str, str], ...]] = {
    "private": (),
    "public-read": ((_LOCAL_ALL_USERS, "READ"),),
    "public-read-write": ((_LOCAL_ALL_USERS, "READ"), (_LOCAL_ALL_USERS, "WRITE")),
    "aws-exec-read": (),
    "authenticated-read": ((_LOCAL_AUTH_USERS, "READ"),),
    "bucket-owner-read": (),
    "bucket-owner-full-control": (),
    "log-delivery-write": ((_LOCAL_LOG_DELIVERY, "WRITE"), (_LOCAL_LOG_DELIVERY, "READ_ACP")),
}
_LOCAL_OWNER = {"DisplayName": "local", "ID": "6c6f63616c" + "0" * 54}
#: S3's messages, verbatim (AWS "Error responses" list).
_LOCAL_MESSAGES = {
    "NoSuchBucket": "The specified bucket does not exist",
    "NoSuchKey": "The specified key does not exist.",
    "NoSuchUpload": "The specified upload does not exist. The upload ID may be invalid, "
    "or the upload may have been aborted or completed.",
    "BucketAlreadyOwnedByYou": "Your previous request to create the named bucket "
    "succeeded and you already own it.",
    "BucketNotEmpty": "The bucket you tried to delete is not empty",
    "InvalidBucketName": "The specified bucket is not valid.",
    "PreconditionFailed": "At least one of the pre-conditions you specified did not hold",
    "InvalidRange": "The requested range is not satisfiable",
    "InvalidPart": "One or more of the specified parts could not be found.  The part may "
    "not have been uploaded, or the specified entity tag may not match the part's "
    "entity tag.",
    "InvalidPartOrder": "The list of parts was not in ascending order. Parts must be "
    "ordered by part number.",
    "EntityTooSmall": "Your proposed upload is smaller than the minimum allowed object size.",
    "EntityTooLarge": "Your proposed upload exceeds the maximum allowed size",
    "MalformedXML": "The XML you provided was not well-formed or did not validate against "
    "our published schema",
    "BadDigest": "The Content-MD5 you specified did not match what we received.",
    "InvalidDigest": "The Content-MD5 you specified was invalid.",
    "XAmzContentSHA256Mismatch": "The provided 'x-amz-content-sha256' header does not "
    "match what was computed.",
    "InvalidStorageClass": "The storage class you specified is not valid",
    "InvalidObjectState": "The operation is not valid for the object's storage class",
    "SelfCopy": "This copy request is illegal because it is trying to copy an object to "
    "itself without changing the object's metadata, storage class, website redirect "
    "location or encryption attributes.",
}


#: S3's reason phrases (Python 3.13's http.client says "Range Not Satisfiable", RFC 9110).
_LOCAL_REASONS = {416: "Requested Range Not Satisfiable"}
#: PUT headers kept with an object; all but the last group are given back by GET/HEAD.
_LOCAL_KEPT_HEADERS = frozenset(
    {
        "cache-control",
        "content-disposition",
        "content-encoding",
        "content-language",
        "content-type",
        "expires",
        "x-amz-server-side-encryption",
        "x-amz-server-side-encryption-aws-kms-key-id",
        "x-amz-server-side-encryption-bucket-key-enabled",
        "x-amz-storage-class",
        "x-amz-website-redirect-location",
        "x-amz-tagging",
        "x-amz-acl",
        "x-amz-server-side-encryption-context",
    }
)
_LOCAL_HIDDEN_HEADERS = frozenset(
    {"x-amz-tagging", "x-amz-acl", "x-amz-server-side-encryption-context"}
)
#: Headers a COPY-directive copy takes from the request, not the source (CopyObject docs).
_LOCAL_COPY_OWN_HEADERS = frozenset(
    {
        "x-amz-storage-class",
        "x-amz-server-side-encryption",
        "x-amz-server-side-encryption-aws-kms-key-id",
        "x-amz-server-side-encryption-bucket-key-enabled",
        "x-amz-website-redirect-location",
        "x-amz-acl",
    }
)
_LOCAL_STORAGE_CLASSES = frozenset(
    {
        "STANDARD",
        "REDUCED_REDUNDANCY",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "GLACIER",
        "DEEP_ARCHIVE",
        "OUTPOSTS",
        "GLACIER_IR",
        "SNOW",
        "EXPRESS_ONEZONE",
    }
)
_LOCAL_ARCHIVED = frozenset({"GLACIER", "DEEP_ARCHIVE"})  # GET needs a restore first
#: One threading lock per bucket for this process; ``flock`` covers other processes.
_LOCAL_LOCKS: dict[str, threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()


class _LocalFiles:
    """The files of a local store (:class:`_LocalStorage`, which sets ``root`` and
    ``_now``): bucket folders, the bucket lock, atomic writes, and the indexes of records.

    Keys are arbitrary strings (``..``, ``//``, 1024 bytes), so they are never paths:
    ``<root>/<bucket>/.dg-objects/<xx>/index.json`` maps each key whose SHA-256 starts with
    ``xx`` to its record (size, ETag, headers, data file name), and each version's bytes sit
    in an immutable data file beside it. A write streams to ``.dg-tmp/``, fsyncs, then under
    the bucket lock (``flock`` on ``.dg-lock``; a threading lock where there is no fcntl)
    renames the data in and atomically replaces the index: readers see the old object or
    the new one, never a part. Multipart uploads live in ``.dg-uploads/<upload id>/``."""

    root: str
    _now: Callable[[], datetime.datetime]

    _BUCKET_FILE = ".dg-bucket.json"
    #: Bucket naming rules for CreateBucket (AWS "General purpose bucket naming rules").
    _NEW_BUCKET_RE = r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$"
    _UPLOAD_ID_RE = r"^[0-9a-f]{32}$"

    def _meta(self, status: int, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        # Every S3 reply has a Date; the engine's settle check reads the server's clock
        # from it (a store that ignores If-None-Match, as tests make this one pretend).
        sent = {"date": _http_date(self._now())}
        sent.update(headers or {})
        return {
            "RequestId": _random_hex()[:16].upper(),
            "HostId": "",
            "HTTPStatusCode": status,
            "HTTPHeaders": sent,
            "RetryAttempts": 0,
        }

    def _error(
        self, operation: str, status: int, code: str, *, head: bool = False, **fields: str
    ) -> ClientError:
        """The ClientError :class:`_S3Storage` raises after parsing S3's reply. A HEAD reply
        (and a 304) has no body: botocore then uses the status and reason phrase."""
        import http.client

        if head or status == 304:
            reason = _LOCAL_REASONS.get(status) or http.client.responses.get(status, "")
            error = {"Code": str(status), "Message": reason}
        else:
            error = {"Code": code, "Message": _LOCAL_MESSAGES.get(code, fields.pop("Message", ""))}
            error.update(fields)
        return _client_error({"Error": error, "ResponseMetadata": self._meta(status)}, operation)

    def _bucket(self, operation: str, bucket: str, *, head: bool = False) -> str:
        """The folder of an existing bucket, or NoSuchBucket."""
        _validate_bucket_name(bucket)
        path = os.path.join(self.root, bucket)
        # Only names CreateBucket accepts exist here, which also keeps "Foo" from finding
        # "foo" on a case-insensitive file system.
        if not re.match(self._NEW_BUCKET_RE, bucket) or not os.path.isfile(
            os.path.join(path, self._BUCKET_FILE)
        ):
            raise self._error(operation, 404, "NoSuchBucket", head=head, BucketName=bucket)
        return path

    @contextlib.contextmanager
    def _locked(self, operation: str, bucket: str, bdir: str) -> Iterator[None]:
        """Hold the bucket's lock: a threading lock for this process, plus ``flock`` on
        ``.dg-lock`` for other processes. Raises NoSuchBucket if it went away meanwhile."""
        lock_path = os.path.join(bdir, ".dg-lock")
        ident = os.path.normcase(lock_path)
        with _LOCAL_LOCKS_GUARD:
            tlock = _LOCAL_LOCKS.setdefault(ident, threading.Lock())
        with tlock:
            fd = -1
            while fcntl is not None:
                try:
                    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                except FileNotFoundError:
                    raise self._error(operation, 404, "NoSuchBucket", BucketName=bucket) from None
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    # DeleteBucket renames the folder away under this lock: a waiter then
                    # holds a lock on a file no longer at lock_path.
                    if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
                fd = -1
                if not os.path.isfile(os.path.join(bdir, self._BUCKET_FILE)):
                    raise self._error(operation, 404, "NoSuchBucket", BucketName=bucket)
            try:
                yield
            finally:
                if fd >= 0:
                    os.close(fd)

    @staticmethod
    def _replace(src: str, dst: str) -> None:
        """``os.replace``, retried briefly on Windows where a reader's open handle blocks it."""
        for attempt in range(50):
            try:
                os.replace(src, dst)
                return
            except PermissionError:
                if os.name != "nt" or attempt == 49:
                    raise
                time.sleep(0.01)

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.remove(path)
        except OSError:  # gone already, or held open on Windows: left for DeleteBucket
            pass

    def _mkstemp(self, operation: str, bucket: str, bdir: str, prefix: str) -> tuple[int, str]:
        """A 0600 temp file in the bucket (same file system, so renames are atomic)."""
        try:
            return _private_tempfile(os.path.join(bdir, ".dg-tmp"), prefix=prefix)
        except FileNotFoundError:
            raise self._error(operation, 404, "NoSuchBucket", BucketName=bucket) from None

    def _write_json(self, operation: str, bucket: str, bdir: str, path: str, obj: Any) -> None:
        import json

        fd, tmp = self._mkstemp(operation, bucket, bdir, "j-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(obj, separators=(",", ":")).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            self._replace(tmp, path)
        except BaseException:
            self._unlink(tmp)
            raise

    @staticmethod
    def _read_json(path: str) -> Any:
        import json

        try:
            with open(path, "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def _spool(
        self, operation: str, bucket: str, bdir: str, body: Any, sha256: bool = False
    ) -> tuple[str, int, str, str]:
        """Stream a body into a fsynced temp file: (path, size, MD5 hex, SHA-256 hex or '').
        Whatever the body raises propagates, and the temp file is removed."""
        import hashlib

        fd, tmp = self._mkstemp(operation, bucket, bdir, "d-")
        md5 = hashlib.md5()
        sha = hashlib.sha256() if sha256 else None
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in self._chunks(body):
                    f.write(chunk)
                    md5.update(chunk)
                    if sha is not None:
                        sha.update(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self._unlink(tmp)
            raise
        return tmp, size, md5.hexdigest(), sha.hexdigest() if sha is not None else ""

    @staticmethod
    def _chunks(body: Any) -> Iterator[bytes]:
        if body is None:
            return
        if isinstance(body, str):
            body = body.encode("utf-8")
        if isinstance(body, (bytes, bytearray, memoryview)):
            view = memoryview(body).cast("B")
            for i in range(0, len(view), _IO_CHUNK):
                yield bytes(view[i : i + _IO_CHUNK])
            return
        while True:
            chunk = body.read(_IO_CHUNK)
            if not chunk:
                return
            yield chunk

    @staticmethod
    def _shard(bdir: str, key: str) -> tuple[str, str]:
        """(shard folder, key hash): keys never become paths."""
        import hashlib

        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return os.path.join(bdir, ".dg-objects", digest[:2]), digest

    def _index(self, shard: str) -> dict[str, dict[str, Any]]:
        data = self._read_json(os.path.join(shard, "index.json"))
        return dict(data["objects"]) if data else {}

    def _record(self, bdir: str, key: str) -> dict[str, Any] | None:
        return self._index(self._shard(bdir, key)[0]).get(key)

    def _save_index(
        self, operation: str, bucket: str, bdir: str, shard: str, objects: dict[str, Any]
    ) -> None:
        path = os.path.join(shard, "index.json")
        if objects:
            self._write_json(operation, bucket, bdir, path, {"version": 1, "objects": objects})
        else:
            self._unlink(path)

    def _commit(
        self,
        operation: str,
        bucket: str,
        bdir: str,
        key: str,
        tmp: str | None,
        record: dict[str, Any] | None,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        check: Callable[[], None] | None = None,
    ) -> None:
        """Under the bucket lock: check the preconditions, move ``tmp`` in as the data of
        ``record`` (None: delete the key) and replace the shard index. The replaced data
        file is removed last; an index always names files that exist."""
        shard, digest = self._shard(bdir, key)
        with self._locked(operation, bucket, bdir):
            objects = self._index(shard)
            old = objects.get(key)
            self._check_write(operation, key, old, if_none_match, if_match)
            if check is not None:
                check()
            if record is None:
                if old is None:
                    return
                objects.pop(key)
            else:
                try:
                    os.mkdir(shard, 0o700)
                except FileExistsError:
                    pass
                record["data"] = f"{digest}-{_random_hex()}"
                if tmp is not None:
                    self._replace(tmp, os.path.join(shard, record["data"]))
                objects[key] = record
            self._save_index(operation, bucket, bdir, shard, objects)
        if old is not None:
            self._unlink(os.path.join(shard, old["data"]))

    def _check_write(
        self,
        operation: str,
        key: str,
        old: dict[str, Any] | None,
        none_match: bool,
        match: str | None,
    ) -> None:
        """If-None-Match: * and If-Match on a write (AWS "Conditional writes")."""
        if none_match and old is not None:
            raise self._error(operation, 412, "PreconditionFailed", Condition="If-None-Match")
        if match is not None:
            if old is None:
                raise self._error(operation, 404, "NoSuchKey", Key=key)
            if not self._etag_in(old["etag"], match):
                raise self._error(operation, 412, "PreconditionFailed", Condition="If-Match")

    @staticmethod
    def _etag_in(etag: str, header: str) -> bool:
        wanted = {v.strip().lstrip("W/").strip('"').lower() for v in header.split(",")}
        return "*" in wanted or etag.strip('"').lower() in wanted

    def _clone(self, operation: str, bucket: str, bdir: str, source: str) -> str | None:
        """A temp copy of a data file: a hard link (data files are never modified), else a
        streamed copy. None if the source vanished (overwritten meanwhile)."""
        tmp = os.path.join(bdir, ".dg-tmp", "c-" + _random_hex())
        try:
            os.link(source, tmp)
            return tmp
        except FileNotFoundError:
            if not os.path.isdir(os.path.dirname(tmp)):
                raise self._error(operation, 404, "NoSuchBucket", BucketName=bucket) from None
            return None
        except OSError:  # no hard links here (FAT, some network file systems, other device)
            pass
        try:
            src = open(source, "rb")
        except FileNotFoundError:
            return None
        with src:
            return self._spool(operation, bucket, bdir, src)[0]

    def _new_record(self, kept: dict[str, str], size: int, etag: str) -> dict[str, Any]:
        # Whole seconds: LastModified must compare equal whether it came from a listing
        # (ISO 8601) or a HEAD (an HTTP date has no fraction).
        now = self._now().astimezone(datetime.timezone.utc).replace(microsecond=0)
        return {"size": size, "etag": etag, "modified": _iso_utc(now), "headers": kept}

    def _upload(
        self, operation: str, bucket: str, key: str, upload_id: str
    ) -> tuple[str, str, dict[str, Any]]:
        """(bucket folder, upload folder, upload.json) of an upload of ``key``."""
        bdir = self._bucket(operation, bucket)
        udir = os.path.join(bdir, ".dg-uploads", upload_id)
        info = None
        if re.match(self._UPLOAD_ID_RE, upload_id):  # never a path from the caller
            info = self._read_json(os.path.join(udir, "upload.json"))
        if info is None or info["key"] != key:
            raise self._error(operation, 404, "NoSuchUpload", UploadId=upload_id)
        return bdir, udir, info

    def _discard(self, operation: str, bucket: str, bdir: str, udir: str, upload_id: str) -> str:
        """Move an upload folder out of sight (call under the lock); returns where it went."""
        trash = os.path.join(bdir, ".dg-tmp", "gone-" + _random_hex())
        try:
            os.rename(udir, trash)
        except FileNotFoundError:
            raise self._error(operation, 404, "NoSuchUpload", UploadId=upload_id) from None
        return trash


class _LocalStorage(_LocalFiles):
    """The operations of :class:`_S3Storage` on a local directory (``file:///path``), with
    S3's semantics, response shapes and errors: what ``--endpoint-url file://`` and the fast
    tests use. How it keeps them on disk: :class:`_LocalFiles`."""

    is_local = True

    def __init__(
        self,
        root: str,
        *,
        region: str = "us-east-1",
        now: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self.root = os.path.abspath(root)  # the store's directory: a folder per bucket
        self.region = region
        self._now = now
        path = self.root.replace(os.sep, "/")
        self.endpoint_url = "file://" + ("" if path.startswith("/") else "/") + _quote_key(path)

    def close(self) -> None:
        pass  # nothing is held open between calls

    def object_url(self, bucket: str, key: str) -> str:
        """A logical URL: the bytes live in a content-addressed file, not at this path."""
        return f"{self.endpoint_url}/{_quote_key(bucket)}/{_quote_key(key)}"

    def supports_conditional_writes(self, bucket: str) -> bool:
        return True

    def supports_conditional_multipart(self, bucket: str) -> bool:
        return True

    def _read_condition(
        self, record: dict[str, Any], headers: Mapping[str, str], prefix: str = ""
    ) -> tuple[int, str] | None:
        """(status, condition) when a conditional GET/HEAD/copy source fails (RFC 7232
        order, as S3 documents: If-Match beats If-Unmodified-Since, If-None-Match beats
        If-Modified-Since); a copy answers 412 where a GET answers 304."""
        modified = _parse_timestamp(record["modified"])

        def since(name: str) -> datetime.datetime | None:
            try:
                return _parse_timestamp(headers[prefix + name])
            except (KeyError, ValueError, TypeError):
                return None

        not_modified = 412 if prefix else 304
        if prefix + "if-match" in headers:
            if not self._etag_in(record["etag"], headers[prefix + "if-match"]):
                return 412, "If-Match"
        else:
            limit = since("if-unmodified-since")
            if limit is not None and modified > limit:
                return 412, "If-Unmodified-Since"
        if prefix + "if-none-match" in headers:
            if self._etag_in(record["etag"], headers[prefix + "if-none-match"]):
                return not_modified, "If-None-Match"
        else:
            limit = since("if-modified-since")
            if limit is not None and modified <= limit:
                return not_modified, "If-Modified-Since"
        return None

    def _kept_headers(
        self, operation: str, headers: Mapping[str, str] | None, metadata: Mapping[str, str] | None
    ) -> dict[str, str]:
        """The request headers stored with an object, lower-cased and validated."""

        kept: dict[str, str] = {}
        for name, value in (headers or {}).items():
            lname = name.lower()
            _check_header_value(name, str(value))
            if lname in _LOCAL_KEPT_HEADERS or lname.startswith("x-amz-meta-"):
                kept[lname] = str(value)
        kept.update(_metadata_headers(metadata))
        storage_class = kept.pop("x-amz-storage-class", "STANDARD")
        if storage_class not in _LOCAL_STORAGE_CLASSES:
            raise self._error(
                operation, 400, "InvalidStorageClass", StorageClassRequested=storage_class
            )
        if storage_class != "STANDARD":
            kept["x-amz-storage-class"] = storage_class
        acl = kept.get("x-amz-acl")
        if acl is not None and acl not in _LOCAL_CANNED_ACLS:
            raise self._error(
                operation, 400, "InvalidArgument", Message="", ArgumentName="x-amz-acl"
            )
        if _tag_count(kept.get("x-amz-tagging", "")) > 10:
            raise self._error(
                operation, 400, "BadRequest", Message="Object tags cannot be greater than 10"
            )
        return kept

    def _response_headers(self, record: dict[str, Any]) -> dict[str, str]:
        """The lower-case headers S3 would answer GET/HEAD with, for :func:`_object_response`."""

        out = {
            "accept-ranges": "bytes",
            "last-modified": _http_date(_parse_timestamp(record["modified"])),
            "content-length": str(record["size"]),
            "etag": record["etag"],
        }
        for name, value in record["headers"].items():
            if name not in _LOCAL_HIDDEN_HEADERS:
                out[name] = value
        tags = _tag_count(record["headers"].get("x-amz-tagging", ""))
        if tags:
            out["x-amz-tagging-count"] = str(tags)
        return out

    def _read(
        self, operation: str, bucket: str, key: str, spec: str | None, headers: Mapping[str, str]
    ) -> tuple[dict[str, Any], int, dict[str, str], IO[bytes] | None, int, int]:
        """GET/HEAD: (record, status, response headers, open data file or None, first, length)."""
        _validate_key(key)
        head = operation == "HeadObject"
        bdir = self._bucket(operation, bucket, head=head)
        lower = {k.lower(): v for k, v in headers.items()}
        spec = spec or lower.get("range")
        for _ in range(20):  # a concurrent overwrite may remove the data file we looked up
            record = self._record(bdir, key)
            if record is None:
                raise self._error(operation, 404, "NoSuchKey", head=head, Key=key)
            storage_class = record["headers"].get("x-amz-storage-class", "")
            if not head and storage_class in _LOCAL_ARCHIVED:
                raise self._error(operation, 403, "InvalidObjectState", StorageClass=storage_class)
            failed = self._read_condition(record, lower)
            if failed:
                raise self._error(
                    operation, failed[0], "PreconditionFailed", head=head, Condition=failed[1]
                )
            data_path = os.path.join(self._shard(bdir, key)[0], record["data"])
            try:
                f: IO[bytes] | None = None if head else open(data_path, "rb")
            except FileNotFoundError:
                continue
            break
        else:
            raise self._error(operation, 404, "NoSuchKey", head=head, Key=key)
        size = int(record["size"])
        out = self._response_headers(record)
        first, length, status = 0, size, 200
        try:
            span = _byte_range(spec, size)
        except _RangeNotSatisfiable as e:
            if f is not None:
                f.close()
            raise self._error(
                operation,
                416,
                "InvalidRange",
                head=head,
                RangeRequested=e.spec,
                ActualObjectSize=str(size),
            ) from None
        if span is not None:
            first, length, status = span[0], span[1] - span[0] + 1, 206
            out["content-range"] = f"bytes {span[0]}-{span[1]}/{size}"
            out["content-length"] = str(length)
        return record, status, out, f, first, length

    # -- buckets ------------------------------------------------------------

    def list_buckets(self) -> dict[str, Any]:
        buckets = []
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            names = []
        for name in names:
            info = self._read_json(os.path.join(self.root, name, self._BUCKET_FILE))
            if info and re.match(self._NEW_BUCKET_RE, name):
                buckets.append({"Name": name, "CreationDate": _parse_timestamp(info["created"])})
        return {
            "Buckets": buckets,
            "Owner": dict(_LOCAL_OWNER),
            "ResponseMetadata": self._meta(200),
        }

    def create_bucket(
        self, bucket: str, *, location: str | None = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        import json
        import tempfile

        _validate_bucket_name(bucket)
        if not re.match(self._NEW_BUCKET_RE, bucket) or re.search(_NEW_BUCKET_BAD, bucket):
            raise self._error("CreateBucket", 400, "InvalidBucketName", BucketName=bucket)
        acl = {k.lower(): v for k, v in (headers or {}).items()}.get("x-amz-acl", "private")
        if acl not in _LOCAL_CANNED_ACLS:
            raise self._error(
                "CreateBucket", 400, "InvalidArgument", Message="", ArgumentName="x-amz-acl"
            )
        target = os.path.join(self.root, bucket)
        if not os.path.isdir(self.root):
            os.makedirs(self.root, 0o700, exist_ok=True)
            os.chmod(self.root, 0o700)
        # Built aside, then renamed into place: a bucket folder is complete or absent, and
        # of two racing creators exactly one rename succeeds (the target is never empty).
        staging = tempfile.mkdtemp(dir=self.root, prefix=".dg-new-")
        try:
            for sub in (".dg-objects", ".dg-tmp", ".dg-uploads"):
                os.mkdir(os.path.join(staging, sub), 0o700)
            info = {
                "created": _iso_utc(self._now()),
                "location": location or self.region,
                "acl": acl,
            }
            with open(os.path.join(staging, self._BUCKET_FILE), "w", encoding="utf-8") as f:
                json.dump(info, f)
            os.chmod(os.path.join(staging, self._BUCKET_FILE), 0o600)
            if os.path.exists(target):
                raise FileExistsError(target)
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if os.path.exists(target):
                raise self._error(
                    "CreateBucket", 409, "BucketAlreadyOwnedByYou", BucketName=bucket
                ) from None
            raise
        return {"Location": "/" + bucket, "ResponseMetadata": self._meta(200)}

    def delete_bucket(self, bucket: str) -> dict[str, Any]:
        bdir = self._bucket("DeleteBucket", bucket)
        trash = os.path.join(self.root, ".dg-trash-" + _random_hex())
        with self._locked("DeleteBucket", bucket, bdir):
            objects = os.path.join(bdir, ".dg-objects")
            for shard in os.listdir(objects):
                if self._index(os.path.join(objects, shard)):
                    raise self._error("DeleteBucket", 409, "BucketNotEmpty", BucketName=bucket)
            # Renamed away under the lock, removed after: a writer waiting for the lock
            # then finds no bucket instead of writing into a half-deleted folder.
            os.rename(bdir, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return {"ResponseMetadata": self._meta(204)}

    def head_bucket(self, bucket: str) -> dict[str, Any]:
        bdir = self._bucket("HeadBucket", bucket, head=True)
        info = self._read_json(os.path.join(bdir, self._BUCKET_FILE)) or {}
        region = info.get("location") or self.region
        return {"BucketRegion": region, "ResponseMetadata": self._meta(200)}

    def get_bucket_location(self, bucket: str) -> dict[str, Any]:
        bdir = self._bucket("GetBucketLocation", bucket)
        info = self._read_json(os.path.join(bdir, self._BUCKET_FILE)) or {}
        location = info.get("location") or self.region
        # us-east-1 is an empty LocationConstraint; boto3 returns None for it.
        return {
            "LocationConstraint": None if location == "us-east-1" else location,
            "ResponseMetadata": self._meta(200),
        }

    def get_bucket_acl(self, bucket: str) -> dict[str, Any]:
        bdir = self._bucket("GetBucketAcl", bucket)
        info = self._read_json(os.path.join(bdir, self._BUCKET_FILE)) or {}
        grants: list[dict[str, Any]] = [
            {"Grantee": dict(_LOCAL_OWNER, Type="CanonicalUser"), "Permission": "FULL_CONTROL"}
        ] + [
            {"Grantee": {"URI": uri, "Type": "Group"}, "Permission": permission}
            for uri, permission in _LOCAL_CANNED_ACLS.get(info.get("acl", "private"), ())
        ]
        return {"Owner": dict(_LOCAL_OWNER), "Grants": grants, "ResponseMetadata": self._meta(200)}

    def _not_implemented(self, operation: str, bucket: str, key: str, what: str) -> ClientError:
        self.head_object(bucket, key)  # a missing object or bucket says so first
        return self._error(
            operation,
            501,
            "NotImplemented",
            Message="%s is not supported by the local store" % what,
        )

    def get_object_tagging(self, bucket: str, key: str) -> dict[str, Any]:
        raise self._not_implemented("GetObjectTagging", bucket, key, "Object tagging")

    def put_object_tagging(
        self, bucket: str, key: str, tags: list[dict[str, str]]
    ) -> dict[str, Any]:
        raise self._not_implemented("PutObjectTagging", bucket, key, "Object tagging")

    def delete_object_tagging(self, bucket: str, key: str) -> dict[str, Any]:
        raise self._not_implemented("DeleteObjectTagging", bucket, key, "Object tagging")

    def get_object_acl(self, bucket: str, key: str) -> dict[str, Any]:
        """The owner's FULL_CONTROL: a local folder has one user (as GetBucketAcl)."""
        self.head_object(bucket, key)
        acl = self.get_bucket_acl(bucket)
        acl["Grants"] = acl["Grants"][:1]
        return acl

    def put_object_acl(
        self,
        bucket: str,
        key: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> dict[str, Any]:
        raise self._not_implemented("PutObjectAcl", bucket, key, "Object ACLs")

    def put_bucket_acl(
        self, bucket: str, *, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> dict[str, Any]:
        """A canned ACL (``x-amz-acl``) or an AccessControlPolicy document; stored, not
        enforced (a local folder has one user)."""
        bdir = self._bucket("PutBucketAcl", bucket)
        acl = {k.lower(): v for k, v in (headers or {}).items()}.get("x-amz-acl")
        if body:  # a grant list: kept as a private ACL, the local store has one user
            acl = acl or "private"
        elif acl is None:
            raise self._error(
                "PutBucketAcl",
                400,
                "MissingSecurityHeader",
                Message=("Your request was missing a required header"),
                MissingHeaderName="x-amz-acl",
            )
        elif acl not in _LOCAL_CANNED_ACLS:
            raise self._error(
                "PutBucketAcl", 400, "InvalidArgument", Message="", ArgumentName="x-amz-acl"
            )
        with self._locked("PutBucketAcl", bucket, bdir):
            path = os.path.join(bdir, self._BUCKET_FILE)
            info = self._read_json(path) or {}
            info["acl"] = acl or "private"
            self._write_json("PutBucketAcl", bucket, bdir, path, info)
        return {"ResponseMetadata": self._meta(200)}

    # -- objects ------------------------------------------------------------

    def _check_body(
        self,
        operation: str,
        size: int,
        md5_hex: str,
        sha_hex: str,
        content_md5: str | None,
        content_sha256: str | None,
    ) -> None:
        """What S3 verifies of a received body: Content-MD5, x-amz-content-sha256, size."""
        if content_md5 is not None:
            try:
                digest = base64.b64decode(content_md5, validate=True)
            except (ValueError, TypeError):
                digest = b""
            if len(digest) != 16:
                raise self._error(operation, 400, "InvalidDigest")
            if digest.hex() != md5_hex:
                raise self._error(operation, 400, "BadDigest")
        if content_sha256 and sha_hex and content_sha256.lower() != sha_hex:
            raise self._error(
                operation,
                400,
                "XAmzContentSHA256Mismatch",
                ClientComputedContentSHA256=content_sha256,
                S3ComputedContentSHA256=sha_hex,
            )
        if size > _MAX_SINGLE_PUT:
            raise self._error(
                operation,
                400,
                "EntityTooLarge",
                ProposedSize=str(size),
                MaxSizeAllowed=str(_MAX_SINGLE_PUT),
            )

    @staticmethod
    def _wants_sha256(content_sha256: str | None) -> bool:
        return bool(content_sha256 and re.match(r"^[0-9a-fA-F]{64}$", content_sha256))

    def put_object(
        self,
        bucket: str,
        key: str,
        body: Any,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: dict[str, str] | None = None,
        content_sha256: str | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> dict[str, Any]:
        """PUT from bytes or a file object, streamed; atomic, and ``if_none_match`` /
        ``if_match`` checked under the bucket lock, so exactly one racing writer wins."""
        _validate_key(key)
        kept = self._kept_headers("PutObject", headers, metadata)
        kept.setdefault("content-type", "binary/octet-stream")
        lower = {k.lower(): v for k, v in (headers or {}).items()}
        if_none_match = if_none_match or lower.get("if-none-match", "").strip() == "*"
        if_match = if_match or lower.get("if-match")
        bdir = self._bucket("PutObject", bucket)
        # Fail before streaming a large body for nothing; checked again under the lock.
        self._check_write("PutObject", key, self._record(bdir, key), if_none_match, if_match)
        want_sha = self._wants_sha256(content_sha256)
        tmp, size, md5_hex, sha_hex = self._spool("PutObject", bucket, bdir, body, want_sha)
        try:
            self._check_body(
                "PutObject", size, md5_hex, sha_hex, lower.get("content-md5"), content_sha256
            )
            record = self._new_record(kept, size, f'"{md5_hex}"')
            self._commit(
                "PutObject",
                bucket,
                bdir,
                key,
                tmp,
                record,
                if_none_match=if_none_match,
                if_match=if_match,
            )
        finally:
            self._unlink(tmp)  # gone once committed
        out: dict[str, Any] = {"ETag": record["etag"]}
        if "x-amz-server-side-encryption" in kept:
            out["ServerSideEncryption"] = kept["x-amz-server-side-encryption"]
        out["ResponseMetadata"] = self._meta(200, {"etag": record["etag"]})
        return out

    def get_object(
        self,
        bucket: str,
        key: str,
        *,
        range: str | None = None,
        headers: dict[str, str] | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        """GET an object; ``Body`` is a :class:`StreamingBody` over the open data file (a
        later overwrite does not change what it reads). ``response-*`` overrides in
        ``query`` are applied by the client, which does so for every kind of object."""
        _, status, response_headers, f, first, length = self._read(
            "GetObject", bucket, key, range, headers or {}
        )
        assert f is not None
        data = f
        out = _object_response(response_headers)
        out["Body"] = StreamingBody(
            _FileSlice(data, first, length),
            length,
            on_close=lambda _reusable: data.close(),
            endpoint_url=self.endpoint_url,
        )
        out["ResponseMetadata"] = self._meta(status, response_headers)
        return out

    def head_object(
        self, bucket: str, key: str, *, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        _, status, response_headers, _, _, _ = self._read(
            "HeadObject", bucket, key, None, headers or {}
        )
        out = _object_response(response_headers)
        out["ResponseMetadata"] = self._meta(status, response_headers)
        return out

    def delete_object(self, bucket: str, key: str) -> dict[str, Any]:
        """Deleting a missing key succeeds (204), as on an unversioned S3 bucket."""
        _validate_key(key)
        bdir = self._bucket("DeleteObject", bucket)
        self._commit("DeleteObject", bucket, bdir, key, None, None)
        return {"ResponseMetadata": self._meta(204)}

    def delete_objects(
        self,
        bucket: str,
        keys: list[str],
        *,
        quiet: bool = False,
        conditions: Mapping[str, Mapping[str, Any]] | None = None,
        check_limit: bool = True,
    ) -> dict[str, Any]:
        """DeleteObjects for up to 1000 keys (more is S3's MalformedXML); missing keys are
        reported Deleted, as S3 does; a key whose ``conditions`` (ETag, LastModifiedTime,
        Size) do not hold stays, reported PreconditionFailed."""
        if check_limit and len(keys) > _DELETE_BATCH:
            raise ParamValidationError(report="DeleteObjects takes at most 1000 keys")
        for key in keys:
            _validate_key(key)
        bdir = self._bucket("DeleteObjects", bucket)
        if not keys or len(keys) > _DELETE_BATCH:
            raise self._error("DeleteObjects", 400, "MalformedXML")
        conditions = conditions or {}
        by_shard: dict[str, list[str]] = {}
        for key in keys:
            by_shard.setdefault(self._shard(bdir, key)[0], []).append(key)
        removed: list[str] = []
        refused: list[str] = []
        with self._locked("DeleteObjects", bucket, bdir):
            for shard, shard_keys in by_shard.items():
                objects = self._index(shard)
                gone = []
                for k in shard_keys:
                    if k not in objects:
                        continue
                    record = objects[k]
                    head = {
                        "ETag": record["etag"],
                        "LastModified": _parse_timestamp(record["modified"]),
                        "ContentLength": record["size"],
                    }
                    if conditions.get(k) and not _delete_conditions_hold(head, conditions[k]):
                        refused.append(k)
                        continue
                    gone.append(objects.pop(k))
                if gone:
                    self._save_index("DeleteObjects", bucket, bdir, shard, objects)
                    removed.extend(os.path.join(shard, r["data"]) for r in gone)
        for path in removed:
            self._unlink(path)
        out: dict[str, Any] = {}
        if not quiet:
            out["Deleted"] = [{"Key": k} for k in keys if k not in refused]
        if refused:
            out["Errors"] = [
                {"Key": k, "Code": "PreconditionFailed", "Message": _PRECONDITION_MESSAGE}
                for k in refused
            ]
        out["ResponseMetadata"] = self._meta(200)
        return out

    def copy_object(
        self,
        bucket: str,
        key: str,
        source_bucket: str,
        source_key: str,
        *,
        metadata: Mapping[str, str] | None = None,
        metadata_directive: str = "COPY",
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        op = "CopyObject"
        _validate_key(key)
        _validate_key(source_key)
        if metadata_directive not in ("COPY", "REPLACE"):
            raise self._error(
                op,
                400,
                "InvalidArgument",
                Message="Unknown metadata directive.",
                ArgumentName="x-amz-metadata-directive",
                ArgumentValue=metadata_directive,
            )
        replace = metadata_directive == "REPLACE"
        lower = {k.lower(): v for k, v in (headers or {}).items()}
        requested = self._kept_headers(op, headers, metadata if replace else None)
        dst_dir = self._bucket(op, bucket)
        src_dir = self._bucket(op, source_bucket)
        changes = {"x-amz-storage-class", "x-amz-website-redirect-location"}
        if (
            (bucket, key) == (source_bucket, source_key)
            and not replace
            and not any(k in lower for k in changes)
            and not any(k.startswith("x-amz-server-side-encryption") for k in lower)
        ):
            raise self._error(op, 400, "InvalidRequest", Message=_LOCAL_MESSAGES["SelfCopy"])
        src, tmp = self._copy_source(op, bucket, dst_dir, src_dir, source_key, lower)
        try:
            kept = self._copy_headers(src["headers"], requested, lower, replace)
            etag = src["etag"]
            if "-" in etag:  # a copy is one PUT: its ETag is the MD5 of the bytes
                etag = f'"{_hash_file(tmp, md5=True).md5}"'
            record = self._new_record(kept, src["size"], etag)
            self._commit(op, bucket, dst_dir, key, tmp, record)
        finally:
            self._unlink(tmp)
        result = {"ETag": etag, "LastModified": _parse_timestamp(record["modified"])}
        return {"CopyObjectResult": result, "ResponseMetadata": self._meta(200)}

    def _copy_source(
        self,
        op: str,
        bucket: str,
        dst_dir: str,
        src_dir: str,
        source_key: str,
        lower: Mapping[str, str],
    ) -> tuple[dict[str, Any], str]:
        """(record, temp copy of its data) of a copy source that passes CopyObject's checks:
        not archived, its ``x-amz-copy-source-if-*`` conditions, at most 5 GiB. Looked up
        again when it is overwritten between the lookup and the link."""
        for _ in range(20):
            src = self._record(src_dir, source_key)
            if src is None:
                raise self._error(op, 404, "NoSuchKey", Key=source_key)
            storage_class = src["headers"].get("x-amz-storage-class", "")
            if storage_class in _LOCAL_ARCHIVED:
                raise self._error(op, 403, "InvalidObjectState", StorageClass=storage_class)
            failed = self._read_condition(src, lower, "x-amz-copy-source-")
            if failed:
                condition = "x-amz-copy-source-" + failed[1]
                raise self._error(op, 412, "PreconditionFailed", Condition=condition)
            if src["size"] > _MAX_SINGLE_PUT:
                raise self._error(
                    op,
                    400,
                    "InvalidRequest",
                    Message="The specified copy source is larger than the maximum allowable "
                    f"size for a copy source: {_MAX_SINGLE_PUT}",
                )
            source_path = os.path.join(self._shard(src_dir, source_key)[0], src["data"])
            tmp = self._clone(op, bucket, dst_dir, source_path)
            if tmp is not None:
                return src, tmp
        raise self._error(op, 404, "NoSuchKey", Key=source_key)

    @staticmethod
    def _copy_headers(
        source: Mapping[str, str],
        requested: dict[str, str],
        lower: Mapping[str, str],
        replace: bool,
    ) -> dict[str, str]:
        """The headers a copy is stored with: the request's (REPLACE), or the source's
        content headers and metadata with the request's storage class, encryption and ACL
        (COPY: they default to STANDARD and none, CopyObject docs); the source's tags
        unless ``x-amz-tagging-directive: REPLACE``."""
        if replace:
            kept = requested
            kept.setdefault("content-type", "binary/octet-stream")
        else:
            kept = {k: v for k, v in source.items() if k not in _LOCAL_COPY_OWN_HEADERS}
            kept.update({k: v for k, v in requested.items() if k in _LOCAL_COPY_OWN_HEADERS})
        tags = source.get("x-amz-tagging")
        if lower.get("x-amz-tagging-directive", "COPY").upper() == "REPLACE":
            tags = requested.get("x-amz-tagging")
        kept.pop("x-amz-tagging", None)
        if tags:
            kept["x-amz-tagging"] = tags
        return kept

    @staticmethod
    def _token(kind: str, value: str) -> str:
        return base64.urlsafe_b64encode((kind + value).encode("utf-8")).decode("ascii")

    def list_objects_v2(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str = "",
        max_keys: int = 1000,
        continuation_token: str | None = None,
        start_after: str | None = None,
        fetch_owner: bool = False,
        decode: bool = True,
    ) -> dict[str, Any]:
        """One page of ListObjectsV2, keys in UTF-8 byte order as S3 sorts them. The token
        is the last key (or common prefix) returned, base64: stable under concurrent
        writes, as S3's is. ``decode=False``: keys url-encoded as AWS writes them."""
        out = self._list_objects_v2(
            bucket,
            prefix=prefix,
            delimiter=delimiter,
            max_keys=max_keys,
            continuation_token=continuation_token,
            start_after=start_after,
            fetch_owner=fetch_owner,
        )
        if not decode:

            def enc(value: str) -> str:
                import urllib.parse

                return urllib.parse.quote_plus(value, safe="/")

            for item in out.get("Contents", []):
                item["Key"] = enc(item["Key"])
            for item in out.get("CommonPrefixes", []):
                item["Prefix"] = enc(item["Prefix"])
            for name in ("Prefix", "Delimiter", "StartAfter"):
                if out.get(name):
                    out[name] = enc(out[name])
        return out

    def _list_objects_v2(
        self,
        bucket: str,
        *,
        prefix: str,
        delimiter: str,
        max_keys: int,
        continuation_token: str | None,
        start_after: str | None,
        fetch_owner: bool,
    ) -> dict[str, Any]:
        op = "ListObjectsV2"
        bdir = self._bucket(op, bucket)
        if max_keys < 0:
            raise self._error(
                op,
                400,
                "InvalidArgument",
                Message="Argument maxKeys must be an integer between 0 and 2147483647",
                ArgumentName="maxKeys",
                ArgumentValue=str(max_keys),
            )
        marker, last_prefix = self._list_start(continuation_token, start_after)
        page = min(max_keys, 1000)
        contents: list[dict[str, Any]] = []
        prefixes: list[dict[str, Any]] = []
        last = ""
        truncated = False
        for key, record in self._keys_after(bdir, prefix, marker):
            common = None
            if delimiter:
                at = key.find(delimiter, len(prefix))
                if at >= 0:
                    common = key[: at + len(delimiter)]
                    if common == last_prefix:
                        continue
            if len(contents) + len(prefixes) >= page:
                truncated = page > 0
                break
            if common is not None:
                prefixes.append({"Prefix": common})
                last_prefix = common
                last = self._token("P", common)
            else:
                contents.append(
                    {
                        "Key": key,
                        "LastModified": _parse_timestamp(record["modified"]),
                        "ETag": record["etag"],
                        "Size": record["size"],
                        "StorageClass": record["headers"].get("x-amz-storage-class", "STANDARD"),
                    }
                )
                last = self._token("K", key)
        out = _list_v2_page(
            bucket,
            prefix,
            max_keys,
            contents,
            prefixes,
            truncated=truncated,
            next_token=last if truncated else None,
            delimiter=delimiter,
            start_after=start_after or "",
            continuation_token=continuation_token or None,
        )
        out["ResponseMetadata"] = self._meta(200)
        return out

    def _list_start(
        self, continuation_token: str | None, start_after: str | None
    ) -> tuple[bytes | None, str | None]:
        """Where a page starts: (the UTF-8 key it lists past, the common prefix it
        already gave), from the token of the page before, else from ``start_after``."""
        if not continuation_token:
            return (start_after.encode("utf-8") if start_after else None), None
        try:
            decoded = base64.urlsafe_b64decode(continuation_token.encode("ascii"))
            kind, value = decoded[:1], decoded[1:].decode("utf-8")
            if kind not in (b"K", b"P"):
                raise ValueError(kind)
        except (ValueError, UnicodeError):
            raise self._error(
                "ListObjectsV2",
                400,
                "InvalidArgument",
                Message="The continuation token provided is incorrect",
                ArgumentName="continuation-token",
            ) from None
        return value.encode("utf-8"), (value if kind == b"P" else None)

    def _keys_after(
        self, bdir: str, prefix: str, marker: bytes | None
    ) -> list[tuple[str, dict[str, Any]]]:
        """(key, record) of every key under ``prefix`` past ``marker``, in UTF-8 byte
        order as S3 sorts them."""
        items: list[tuple[bytes, str, dict[str, Any]]] = []
        objects_dir = os.path.join(bdir, ".dg-objects")
        for shard in os.listdir(objects_dir):
            for key, record in self._index(os.path.join(objects_dir, shard)).items():
                if key.startswith(prefix):
                    encoded = key.encode("utf-8")
                    if marker is None or encoded > marker:
                        items.append((encoded, key, record))
        items.sort(key=lambda item: item[0])
        return [(key, record) for _, key, record in items]

    # -- multipart ------------------------------------------------------------

    def create_multipart_upload(
        self,
        bucket: str,
        key: str,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        op = "CreateMultipartUpload"
        _validate_key(key)
        kept = self._kept_headers(op, headers, metadata)
        kept.setdefault("content-type", "binary/octet-stream")
        bdir = self._bucket(op, bucket)
        upload_id = _random_hex()
        udir = os.path.join(bdir, ".dg-uploads", upload_id)
        try:
            os.mkdir(udir, 0o700)
        except FileNotFoundError:
            raise self._error(op, 404, "NoSuchBucket", BucketName=bucket) from None
        info = {"key": key, "headers": kept, "initiated": _iso_utc(self._now())}
        self._write_json(op, bucket, bdir, os.path.join(udir, "upload.json"), info)
        return upload_id

    def upload_part(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        part_number: int,
        body: Any,
        *,
        content_sha256: str | None = None,
    ) -> str:
        op = "UploadPart"
        bdir, udir, _ = self._upload(op, bucket, key, upload_id)
        if not 1 <= part_number <= _MAX_PARTS:
            raise self._error(
                op,
                400,
                "InvalidArgument",
                Message=f"Part number must be an integer between 1 and {_MAX_PARTS}, inclusive",
                ArgumentName="partNumber",
                ArgumentValue=str(part_number),
            )
        want_sha = self._wants_sha256(content_sha256)
        tmp, size, md5_hex, sha_hex = self._spool(op, bucket, bdir, body, want_sha)
        try:
            self._check_body(op, size, md5_hex, sha_hex, None, content_sha256)
            part: dict[str, Any] = {"data": f"{part_number}-{_random_hex()}.part"}
            part["size"] = size
            part["etag"] = f'"{md5_hex}"'
            with self._locked(op, bucket, bdir):
                self._upload(op, bucket, key, upload_id)  # not completed or aborted meanwhile
                part_path = os.path.join(udir, f"{part_number}.json")
                old = self._read_json(part_path)
                self._replace(tmp, os.path.join(udir, part["data"]))
                self._write_json(op, bucket, bdir, part_path, part)
        finally:
            self._unlink(tmp)
        if old:
            self._unlink(os.path.join(udir, old["data"]))
        return str(part["etag"])

    def complete_multipart_upload(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        parts: list[tuple[int, str]],
        *,
        if_none_match: bool = False,
    ) -> dict[str, Any]:
        """Concatenate the parts (streamed) into the object; ETag is the MD5 of the parts'
        MD5s and ``-N``, as S3 computes it. ``if_none_match``: only if the key is absent
        (412 otherwise, and the upload stays, as on S3)."""
        import hashlib

        op = "CompleteMultipartUpload"
        bdir, udir, info = self._upload(op, bucket, key, upload_id)
        chosen = self._chosen_parts(op, udir, upload_id, parts)
        fd, tmp = self._mkstemp(op, bucket, bdir, "d-")
        trash = ""
        try:
            with os.fdopen(fd, "wb") as out:
                for (number, etag), part in zip(parts, chosen):
                    try:
                        src = open(os.path.join(udir, part["data"]), "rb")
                    except FileNotFoundError:  # re-uploaded meanwhile
                        raise self._invalid_part(op, upload_id, number, etag) from None
                    with src:
                        shutil.copyfileobj(src, out, _IO_CHUNK)
                out.flush()
                os.fsync(out.fileno())
            md5s = b"".join(bytes.fromhex(p["etag"].strip('"')) for p in chosen)
            etag = f'"{hashlib.md5(md5s).hexdigest()}-{len(chosen)}"'
            record = self._new_record(info["headers"], sum(p["size"] for p in chosen), etag)

            def take_upload() -> None:
                nonlocal trash
                trash = self._discard(op, bucket, bdir, udir, upload_id)

            self._commit(
                op, bucket, bdir, key, tmp, record, if_none_match=if_none_match, check=take_upload
            )
        finally:
            self._unlink(tmp)
        shutil.rmtree(trash, ignore_errors=True)
        return {
            "Bucket": bucket,
            "Key": key,
            "ETag": etag,
            "Location": self.object_url(bucket, key),
            "ResponseMetadata": self._meta(200),
        }

    def _chosen_parts(
        self, op: str, udir: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> list[dict[str, Any]]:
        """The stored parts (``<n>.json`` records) a CompleteMultipartUpload names, after
        S3's checks: at least one, in ascending order, each uploaded with that ETag, all
        but the last at least 5 MiB."""
        if not parts:
            raise self._error(op, 400, "MalformedXML")
        numbers = [number for number, _ in parts]
        if any(b <= a for a, b in zip(numbers, numbers[1:])):
            raise self._error(op, 400, "InvalidPartOrder", UploadId=upload_id)
        chosen = []
        for number, etag in parts:
            part = None
            if 1 <= number <= _MAX_PARTS:
                part = self._read_json(os.path.join(udir, f"{number}.json"))
            if part is None or part["etag"].strip('"').lower() != etag.strip('"').lower():
                raise self._invalid_part(op, upload_id, number, etag)
            chosen.append(part)
        for (number, etag), part in zip(parts[:-1], chosen):
            if part["size"] < _MIN_PART_SIZE:
                raise self._error(
                    op,
                    400,
                    "EntityTooSmall",
                    ProposedSize=str(part["size"]),
                    MinSizeAllowed=str(_MIN_PART_SIZE),
                    PartNumber=str(number),
                    ETag=etag,
                )
        return chosen

    def _invalid_part(self, op: str, upload_id: str, number: int, etag: str) -> ClientError:
        return self._error(
            op, 400, "InvalidPart", UploadId=upload_id, PartNumber=str(number), ETag=etag
        )

    def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> dict[str, Any]:
        op = "AbortMultipartUpload"
        bdir, udir, _ = self._upload(op, bucket, key, upload_id)
        with self._locked(op, bucket, bdir):
            trash = self._discard(op, bucket, bdir, udir, upload_id)
        shutil.rmtree(trash, ignore_errors=True)
        return {"ResponseMetadata": self._meta(204)}

    def list_parts(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        *,
        part_number_marker: int = 0,
        max_parts: int | None = None,
    ) -> dict[str, Any]:
        _, udir, _ = self._upload("ListParts", bucket, key, upload_id)
        numbers = sorted(
            int(name[:-5]) for name in os.listdir(udir) if re.match(r"^\d+\.json$", name)
        )
        parts = []
        for number in numbers:
            part = self._read_json(os.path.join(udir, f"{number}.json"))
            if part:
                parts.append({"PartNumber": number, "ETag": part["etag"], "Size": part["size"]})
        page = _parts_page(parts, part_number_marker=part_number_marker, max_parts=max_parts)
        return {
            "Bucket": bucket,
            "Key": key,
            "UploadId": upload_id,
            **page,
            "ResponseMetadata": self._meta(200),
        }

    def list_multipart_uploads(
        self,
        bucket: str,
        *,
        prefix: str = "",
        key_marker: str = "",
        upload_id_marker: str = "",
        max_uploads: int | None = None,
    ) -> dict[str, Any]:
        bdir = self._bucket("ListMultipartUploads", bucket)
        uploads_dir = os.path.join(bdir, ".dg-uploads")
        uploads = []
        for upload_id in os.listdir(uploads_dir):
            info = self._read_json(os.path.join(uploads_dir, upload_id, "upload.json"))
            if info and info["key"].startswith(prefix):
                initiated = _parse_timestamp(info["initiated"])
                uploads.append({"Key": info["key"], "UploadId": upload_id, "Initiated": initiated})
        page = _uploads_page(
            bucket,
            uploads,
            prefix=prefix,
            key_marker=key_marker,
            upload_id_marker=upload_id_marker,
            max_uploads=max_uploads,
        )
        page.setdefault("Uploads", [])  # this store's callers have always found the list
        return dict(page, ResponseMetadata=self._meta(200))


###############################################################################
# Multipart and parallel transfers ############################################
###############################################################################


def _part_size(size: int, minimum: int = _DEFAULT_PART_SIZE) -> int:
    """A part size (whole MiB) that fits ``size`` into 10,000 parts: 5 TiB fits."""
    part = max(minimum, _MIN_PART_SIZE)
    needed = -(-size // _MAX_PARTS)
    if needed > part:
        part = -(-needed // (1024 * 1024)) * 1024 * 1024
    return part


def _in_parallel(tasks: Sequence[Callable[[], _T]], workers: int) -> list[_T]:
    """Run ``tasks`` on up to ``workers`` threads; their results in order. The first
    failure cancels what has not started and is raised once the others have finished."""
    import concurrent.futures

    if workers <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    with concurrent.futures.ThreadPoolExecutor(min(workers, len(tasks))) as pool:
        futures = [pool.submit(task) for task in tasks]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _read_ahead(items: Iterator[_T]) -> Iterator[_T]:
    """``items`` in order, each next one made on a thread while the caller handles the one
    before: a listing fetches page N+1 while page N is printed. One item is made ahead at
    most, so memory stays that of two items; an error is raised where its item would
    come. A caller that stops early leaves the item in progress to finish on its own."""
    import concurrent.futures

    end = object()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dg-read-ahead")
    pending = pool.submit(next, items, end)
    try:
        while True:
            item = pending.result()
            if item is end:
                return
            pending = pool.submit(next, items, end)
            yield cast(_T, item)
    finally:
        pending.cancel()
        pool.shutdown(wait=False)


def _fill(body: Any, view: memoryview) -> int:
    """``view`` filled from ``body`` (readinto); fewer bytes only where the body ends."""
    got = 0
    while got < len(view):
        n = body.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _get_into(
    storage: _Storage,
    bucket: str,
    key: str,
    write: Callable[[memoryview], Any],
    *,
    threshold: int = _MULTIPART_THRESHOLD,
    part_size: int = _GET_PART_SIZE,
    workers: int = _TRANSFER_WORKERS,
    hold: Callable[[int], ContextManager[None]] | None = None,
) -> int:
    """Download an object into ``write`` in order, as aws s3 does: a first ranged GET
    tells the size; an object over ``threshold`` comes in ``part_size`` ranges,
    ``workers`` at a time (each pinned to the first reply's ETag with If-Match), at
    most ``workers`` parts held ahead of the writer (``hold`` reserves that memory:
    about 150 MB at 8 x 8 MiB).

    Each part is read into one of ``workers`` buffers, reused part after part: a new
    8 MiB each time is memory the kernel has to fault in and zero again, which was most
    of a big download's system time. So ``write`` is given a view it must not keep.
    Returns the bytes written; the caller checks their SHA-256."""
    import concurrent.futures

    try:
        first = storage.get_object(bucket, key, range="bytes=0-%d" % (part_size - 1))
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") != "InvalidRange":
            raise
        first = storage.get_object(bucket, key)  # an empty object: nothing to range
    total = None
    match = re.match(r"^bytes \d+-\d+/(\d+)$", str(first.get("ContentRange", "")))
    if match:
        total = int(match.group(1))
    # the first reply's own length (a small object's), at least 1: the loop below ends
    # on a short fill; a buffer of part_size is kept for the parts
    length = first.get("ContentLength")
    first_buffer = bytearray(
        max(1, min(part_size, length if isinstance(length, int) else part_size))
    )
    buffers = collections.deque([first_buffer] if len(first_buffer) == part_size else [])
    view = memoryview(first_buffer)
    written = 0
    with first["Body"] as body:
        while True:  # all of the reply: the whole object where the server ignored Range
            n = _fill(body, view)
            if n:
                write(view[:n])
            written += n
            if n < len(view):
                break
    if total is None or written >= total:
        return written  # the whole object came (small, or the server ignored Range)
    etag = first.get("ETag")
    headers = {"If-Match": etag} if etag and total > threshold else {}

    def fetch(start: int) -> memoryview:
        end = min(start + part_size, total) - 1
        try:
            buffer = buffers.pop()
        except IndexError:
            buffer = bytearray(part_size)
        view = memoryview(buffer)[: end - start + 1]
        got = storage.get_object(bucket, key, range="bytes=%d-%d" % (start, end), headers=headers)
        with got["Body"] as part:
            n = _fill(part, view)
            n += len(part.read(1))  # nothing after the range (which ends the reply)
        if n != len(view):
            raise IncompleteReadError(actual_bytes=n, expected_bytes=len(view))
        return view

    def pour(done: concurrent.futures.Future[memoryview]) -> None:
        nonlocal written
        view = done.result()
        write(view)
        written += len(view)
        buffers.append(cast(bytearray, view.obj))

    starts = list(range(written, total, part_size))
    if total <= threshold:
        workers = 1
    with contextlib.ExitStack() as stack:
        if hold is not None and workers > 1:
            stack.enter_context(hold(_get_hold(workers, part_size)))
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(max(1, workers)))
        pending: collections.deque[concurrent.futures.Future[memoryview]] = collections.deque()
        try:
            for start in starts:
                pending.append(pool.submit(fetch, start))
                if len(pending) >= workers:
                    pour(pending.popleft())
            while pending:
                pour(pending.popleft())
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return written


def _put_path(
    storage: _Storage,
    bucket: str,
    key: str,
    path: str,
    *,
    metadata: Mapping[str, str] | None = None,
    headers: dict[str, str] | None = None,
    sha256: str | None = None,
    if_none_match: bool = False,
    threshold: int = _MULTIPART_THRESHOLD,
    part_size: int = _DEFAULT_PART_SIZE,
    on_bytes: Callable[[int], None] | None = None,
    workers: int = _TRANSFER_WORKERS,
) -> dict[str, Any]:
    """Upload a local file, streamed: one PUT up to ``threshold``, multipart above it,
    ``workers`` parts at a time. A conditional create (``if_none_match``) completes with
    ``If-None-Match: *`` where the server honours that, else stays one PUT up to 5 GiB.
    A failed multipart upload is aborted, so no parts linger.

    ``sha256``: what the caller hashed. The bytes sent are held to it, not re-hashed
    from the file after the fact: one PUT is signed with it and hashed as it is sent,
    its last byte withheld on a mismatch (the server refuses other bytes, or never gets
    a whole body); multipart parts are hashed first, in one pass that must give
    ``sha256``, and each is then held to its own hash the same way. A file changed (or
    swapped) since it was hashed is never stored.

    Every metadata value is sent percent-encoded where it is not ASCII (FORMAT.md): a
    file name, a folder in dg-ref-key, a caller's value."""
    import hashlib

    if metadata:
        metadata = {name: _meta_encode(str(value)) for name, value in metadata.items()}
    size = os.path.getsize(path)
    limit = threshold
    if if_none_match and size > threshold:
        probe = getattr(storage, "supports_conditional_multipart", None)
        if probe is None or not probe(bucket):
            limit = _MAX_SINGLE_PUT  # one conditional PUT, as far as a PUT goes
    if size <= limit:
        with open(path, "rb") as f:
            held = _SentHash(f, 0, size, hashlib.sha256(), sha256)
            body: Any = _CallbackReader(held, on_bytes) if on_bytes else held
            try:
                return storage.put_object(
                    bucket,
                    key,
                    body,
                    metadata=metadata,
                    headers=headers,
                    content_sha256=sha256,
                    if_none_match=if_none_match,
                )
            except _ChangedWhileSent as e:
                raise IntegrityError("%s %s; nothing was stored" % (path, e)) from None
    return _put_multipart(
        storage,
        bucket,
        key,
        path,
        size=size,
        part_size=_part_size(size, part_size),
        sha256=sha256,
        metadata=metadata,
        headers=headers,
        if_none_match=if_none_match,
        on_bytes=on_bytes,
        workers=workers,
    )


def _part_hashes(path: str, size: int, part: int, sha256: str) -> dict[int, str]:
    """Each part's SHA-256 by part number, taken in one pass over the file that must give
    ``sha256``, the caller's (the parts go up at once, so what is sent cannot be hashed in
    file order). IntegrityError if the file no longer hashes to it."""
    import hashlib

    expected: dict[int, str] = {}
    whole = hashlib.sha256()
    with open(path, "rb") as f:
        for number, offset in enumerate(range(0, size, part), start=1):
            piece = _FileSlice(f, offset, min(part, size - offset))
            expected[number] = _Hashes().read(piece, each=whole.update).info().sha256
    if whole.hexdigest() != sha256:
        raise IntegrityError(
            "%s changed while it was uploaded (its bytes hash to %s, not %s as they "
            "did before); nothing was stored" % (path, whole.hexdigest(), sha256)
        )
    return expected


def _put_multipart(
    storage: _Storage,
    bucket: str,
    key: str,
    path: str,
    *,
    size: int,
    part_size: int,
    sha256: str | None,
    metadata: Mapping[str, str] | None,
    headers: dict[str, str] | None,
    if_none_match: bool,
    on_bytes: Callable[[int], None] | None,
    workers: int,
) -> dict[str, Any]:
    """:func:`_put_path` above its threshold: a multipart upload of ``part_size`` parts,
    ``workers`` at a time, each held to its SHA-256 (:func:`_part_hashes`) as it is sent.
    On any failure the upload is aborted, and so is one a retried CreateMultipartUpload
    may have started."""
    offsets = list(enumerate(range(0, size, part_size), start=1))
    expected = _part_hashes(path, size, part_size, sha256) if sha256 else {}
    started = _utcnow() - datetime.timedelta(seconds=60)  # a margin for clock skew
    try:
        upload_id = storage.create_multipart_upload(bucket, key, metadata=metadata, headers=headers)
    except BaseException:
        # Interrupted (Ctrl-C) or failed after the server may have created the upload:
        # its UploadId never reached us, so find it by key and abort it.
        _abort_strays(storage, bucket, key, "", started)
        raise
    try:

        def send(number: int, offset: int) -> str:
            # Each part reads its own handle: parts go up at once, as aws s3 sends them.
            import hashlib

            want = expected.get(number)
            with open(path, "rb") as f:
                length = min(part_size, size - offset)
                piece = _SentHash(f, offset, length, hashlib.sha256(), want)
                body = _CallbackReader(piece, on_bytes) if on_bytes else piece
                try:
                    etag = storage.upload_part(
                        bucket, key, upload_id, number, body, content_sha256=want
                    )
                except _ChangedWhileSent as e:
                    raise IntegrityError("%s %s; nothing was stored" % (path, e)) from None
                return str(etag)

        etags = _in_parallel([functools.partial(send, n, off) for n, off in offsets], workers)
        parts = [(number, etag) for (number, _), etag in zip(offsets, etags)]
        result: dict[str, Any] = storage.complete_multipart_upload(
            bucket, key, upload_id, parts, **({"if_none_match": True} if if_none_match else {})
        )
        _abort_strays(storage, bucket, key, upload_id, started)
        return result
    except BaseException:
        _cleanup_tries(
            lambda: storage.abort_multipart_upload(bucket, key, upload_id),
            "could not abort multipart upload %s of %s" % (upload_id, key),
        )
        _abort_strays(storage, bucket, key, upload_id, started)
        raise


#: Cleanup after a failed upload is tried this many times over (each try with the
#: transport's own retries): parts left behind cost storage until someone aborts them.
_CLEANUP_TRIES = 3


def _cleanup_tries(step: Callable[[], Any], what: str) -> None:
    """Run a cleanup step, again after a pause when it fails; warn if it never succeeds
    (the error that made the cleanup necessary matters more than this one)."""
    for attempt in range(_CLEANUP_TRIES):
        try:
            step()
            return
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "NoSuchUpload":
                return  # already gone
            error: Exception = e
        except Exception as e:
            error = e
        if attempt + 1 < _CLEANUP_TRIES:
            time.sleep(0.25 * (attempt + 1))
    logger.warning("%s: %s", what, error)


def _abort_strays(
    storage: _Storage, bucket: str, key: str, ours: str, since: datetime.datetime
) -> None:
    """Abort uploads of this key that a retried CreateMultipartUpload may have started
    (the first reply was lost, so its UploadId never reached us)."""

    def sweep() -> None:
        for up in _all_uploads(storage, bucket, key):
            initiated = up.get("Initiated")
            if up["Key"] != key or up["UploadId"] == ours:
                continue
            if isinstance(initiated, datetime.datetime) and initiated < since:
                continue  # older than us: someone else's
            try:
                storage.abort_multipart_upload(bucket, key, up["UploadId"])
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise

    _cleanup_tries(sweep, "could not check for stray multipart uploads of %s" % key)


class _ChangedWhileSent(OSError):
    """The file being uploaded is not the bytes its caller hashed (an OSError, so the
    transport drops the connection and does not retry: the body is never completed)."""


class _SentHash(_FileSlice):
    """A span of a file being uploaded that hashes what is read from it for sending,
    continuing ``base`` (a hashlib object); a rewind (a retry) starts again from
    ``base``. With ``expected``, the read that would hand over the last byte fails
    instead if the span does not hash to it (nor has ``length`` bytes): the server never
    receives a complete body, so a server that does not check the signed payload hash
    (SeaweedFS) cannot store other bytes either."""

    def __init__(
        self, f: IO[bytes], offset: int, length: int, base: Any, expected: str | None = None
    ) -> None:
        super().__init__(f, offset, length)
        self._base = base
        self._expected = expected
        self.sha256 = base.copy()

    def seek(self, pos: int, whence: int = 0) -> int:
        at = super().seek(pos, whence)
        if at == 0:
            self.sha256 = self._base.copy()
        return at

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.sha256.update(data)
        done = self.tell() >= len(self) or (size != 0 and not data)
        if self._expected and done:
            if self.tell() < len(self):
                raise _ChangedWhileSent("shrank while it was uploaded")
            if self.sha256.hexdigest() != self._expected:
                raise _ChangedWhileSent(
                    "changed while it was uploaded (the bytes sent hash to %s, not %s as "
                    "they did before)" % (self.sha256.hexdigest(), self._expected)
                )
        return data


class _CallbackReader(io.RawIOBase):
    """Reports bytes read from a seekable body (progress), rewinding with it on retries."""

    def __init__(self, f: Any, callback: Callable[[int], None] | None) -> None:
        super().__init__()
        self._f = f
        self._callback = callback

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return bool(self._f.seekable())

    def tell(self) -> int:
        return int(self._f.tell())

    def seek(self, pos: int, whence: int = 0) -> int:
        before = self._f.tell()
        after = int(self._f.seek(pos, whence))
        if self._callback and after < before:
            self._callback(after - before)  # a retry rewound: progress goes back too
        return after

    def fileno(self) -> int:
        return int(self._f.fileno())

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._f.read(size)
        if data and self._callback:
            self._callback(len(data))
        return data

    def __len__(self) -> int:
        return int((_body_length(self._f) or 0) + self._f.tell())


class _Cancelled(DeltaGliderError):
    """Ctrl-C: raised inside transfers so each one cleans up (temp files, multipart)."""


class _Progress:
    """``Completed 6.0 MiB/54.0 MiB (12.1 MiB/s) with 3 file(s) remaining`` on a terminal."""

    def __init__(self, stream: IO[str], enabled: bool, files: int, total: int) -> None:
        self._stream = stream
        self._enabled = enabled
        self._files = files
        self._total = total
        self._done = 0
        self._start = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()
        self.cancel = threading.Event()

    def add(self, n: int) -> None:
        if self.cancel.is_set():
            raise _Cancelled("cancelled")
        with self._lock:
            self._done += n
            self._draw()

    def file_done(self) -> None:
        with self._lock:
            self._files -= 1
            self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        rate = self._done / max(now - self._start, 1e-6)
        line = "Completed %s%s (%s/s) with %d file(s) remaining" % (
            _human_size(self._done),
            "/" + _human_size(self._total) if self._total else "",
            _human_size(rate),
            max(self._files, 0),
        )
        self._stream.write("\r" + line.ljust(79) + "\r")
        self._stream.flush()

    def clear(self) -> None:
        if self._enabled:
            self._stream.write("\r" + " " * 79 + "\r")
            self._stream.flush()


def _run_parallel(
    tasks: list[Callable[[], None]],
    workers: int,
    progress: _Progress,
    quick: Sequence[Callable[[], None]] = (),
    quick_workers: int = 0,
) -> None:
    """Run tasks on a bounded pool, and ``quick`` ones (small, one request each) on a
    second pool of ``quick_workers`` beside it, so neither waits for the other; on Ctrl-C
    tell them to stop, wait briefly, re-raise."""
    import concurrent.futures

    if quick and quick_workers <= 0:
        tasks, quick = list(tasks) + list(quick), ()
    if not quick and (workers <= 1 or len(tasks) <= 1):
        for task in tasks:
            task()
        return
    pools = []
    futures = []
    for work, size in ((tasks, workers), (quick, quick_workers)):
        if work:
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(size, len(work)))
            pools.append(pool)
            futures += [pool.submit(task) for task in work]
    try:
        for f in futures:
            while True:
                try:
                    f.result(timeout=0.2)
                    break
                except concurrent.futures.TimeoutError:
                    continue
    except BaseException:
        progress.cancel.set()
        for f in futures:
            f.cancel()
        concurrent.futures.wait(futures, timeout=1.0)
        for pool in pools:
            pool.shutdown(wait=False)
        raise
    for pool in pools:
        pool.shutdown(wait=True)


###############################################################################
# Bucket layout: names, prefixes and metadata (FORMAT.md) #####################
###############################################################################

#: Error codes that mean "no such object": a HEAD has no body, so only its status
#: (404); a GET or the local store say NoSuchKey; some servers answer NotFound.
_NOT_FOUND_CODES = ("404", "NoSuchKey", "NotFound")


def _is_not_found(error: ClientError) -> bool:
    """Whether a storage error says the object asked for is not there."""
    return error.response["Error"]["Code"] in _NOT_FOUND_CODES


_REFERENCE_NAME = "reference.bin"
#: deltaglider's own objects (rebuilt copies for presigned URLs, stats caches, probes):
#: never shown as user objects.
_INTERNAL_PREFIX = ".deltaglider/"
_DELTA_SUFFIX = ".delta"
#: Shared references (DG_REFERENCES=shared, the default; FORMAT.md in the README): kept as
#: ``<parent>/.deltaglider/refs/<folder>/<name>/<sha256>/reference.bin``, beside the version
#: folders that use them, where deleting one version folder (by any tool) cannot take them.
_REFS_DIR = _INTERNAL_PREFIX + "refs/"
#: Longest shared-reference key: it travels in dg-ref-key (Swift caps a value at 256 bytes).
_MAX_SHARED_REF_KEY = 200
#: Rebuilt copies of delta-stored objects that presigned URLs serve (FORMAT.md).
_PRESIGN_PREFIX = _INTERNAL_PREFIX + "tmp/"
#: Staging keys of the client's multipart uploads (they become one object on completion).
_MULTIPART_PREFIX = _INTERNAL_PREFIX + "multipart/"
#: A reference about to be deleted is first copied here, to be put back if a delta
#: turns out to need it after all.
_ASIDE_PREFIX = _INTERNAL_PREFIX + "deleted/"
#: get_bucket_stats' cache, per mode (FORMAT.md "Other objects").
_STATS_KEY = _INTERNAL_PREFIX + "stats_%s.json"
#: Metadata read aliases, first non-empty wins (FORMAT.md "Reading: accept every alias").
_META_ALIASES: dict[str, tuple[str, ...]] = {
    "tool": ("dg-tool", "dg_tool", "tool"),
    "original_name": (
        "dg-original-name",
        "dg_original_name",
        "original_name",
        "original-name",
        "dg-source-name",
        "source_name",
        "source-name",
    ),
    "file_sha256": ("dg-file-sha256", "dg_file_sha256", "file_sha256", "file-sha256"),
    "file_size": ("dg-file-size", "dg_file_size", "file_size", "file-size"),
    "md5": ("dg-md5", "dg_md5"),
    "created_at": ("dg-created-at", "dg_created_at", "created_at", "created-at"),
    "ref": ("dg-ref-path", "dg-ref-key", "dg_ref_key", "ref_key", "ref-key", "ref-path"),
    "ref_sha256": ("dg-ref-sha256", "dg_ref_sha256", "ref_sha256", "ref-sha256"),
    "delta_size": ("dg-delta-size", "dg_delta_size", "delta_size", "delta-size"),
    "note": ("dg-note", "dg_note", "note"),
    "compression": ("dg-compression", "dg_compression", "compression"),
    "codec": ("dg-codec",),
    "xref_sha256": ("dg-xref-sha256",),
    "expanded_size": ("dg-expanded-size",),
}
_USER_META_PREFIX = "user-"
_CONTENT_TYPE_META = "content-type"
#: Metadata names that are ours, not the caller's (hidden from Metadata on read).
_INTERNAL_META = frozenset(n for names in _META_ALIASES.values() for n in names) | {
    "dg-delta-cmd",
    "dg_delta_cmd",
    "delta_cmd",
    "delta-cmd",
    "dg-mtime",
    _CONTENT_TYPE_META,
}


def _meta_get(metadata: Mapping[str, str], field: str) -> str | None:
    for name in _META_ALIASES[field]:
        value = metadata.get(name)
        if value:
            return _meta_decode(value)
    return None


def _meta_encode(value: str) -> str:
    """A metadata value as printable US-ASCII: non-ASCII text is percent-encoded UTF-8
    (FORMAT.md), and so is a value holding a control character (a file named
    ``\x01a.zip``): servers refuse those in a header (SeaweedFS: 400) or trim them before
    checking the signature (Swift: SignatureDoesNotMatch)."""
    if value.isascii() and value.isprintable():  # no control character (_CONTROL_CHARS)
        return value
    import urllib.parse

    return urllib.parse.quote(value, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _meta_decode(value: str) -> str:
    """The inverse of _meta_encode: a value is decoded only when it decodes to something
    _meta_encode would have encoded (non-ASCII text, a control character), so an ASCII
    value anyone wrote (``100%41``) stays as it is."""
    import urllib.parse

    if "%" not in value:
        return value
    try:
        decoded = urllib.parse.unquote(value, errors="strict")
    except UnicodeDecodeError:
        return value
    encoded = not all(ord(c) < 128 for c in decoded) or re.search(_CONTROL_CHARS, decoded)
    return decoded if encoded else value


class _Kind:
    REFERENCE = "reference"
    DELTA = "delta"
    DIRECT = "direct"
    FOREIGN = "foreign"


def _classify(key: str, metadata: Mapping[str, str]) -> str:
    """What a stored object is, in FORMAT.md's order."""
    note = _meta_get(metadata, "note") or ""
    if note == "reference" or _is_reference(key):
        return _Kind.REFERENCE
    if _meta_get(metadata, "ref") or note == "delta" or note.startswith("zero-diff"):
        return _Kind.DELTA
    if _meta_get(metadata, "compression") == "none" or note == "passthrough":
        return _Kind.DIRECT
    if _meta_get(metadata, "file_sha256") is None:
        return _Kind.FOREIGN
    return _Kind.DIRECT


def _deltaspace(key: str) -> str:
    """``releases/v1/app.zip`` → ``releases/v1``; a root key → ``""``. ``//`` is kept."""
    return key.rpartition("/")[0]


def _reference_key(deltaspace: str) -> str:
    return deltaspace + "/" + _REFERENCE_NAME if deltaspace else _REFERENCE_NAME


def _is_reference(key: str) -> bool:
    """A reference's key (a folder's own or a shared one): every reader hides a key
    named reference.bin, and none is a user's object."""
    return key.rsplit("/", 1)[-1] == _REFERENCE_NAME


def _object_name(key: str) -> str:
    """The file name a logical key stores (its last segment). reference.bin is
    reserved for references, and a key ending in ``/`` names a folder, not a file."""
    name = key.rsplit("/", 1)[-1]
    if name == _REFERENCE_NAME or not name:
        raise ParamValidationError(
            report="Invalid key %r: %r is reserved for deltaglider's reference files"
            % (key, _REFERENCE_NAME)
            if name
            else "Invalid key %r: a key must name a file, not a folder" % key
        )
    return name


def _logical_key(stored: str) -> str | None:
    """The one logical key a stored name belongs to; None for what is never shown as an
    object (a deltaspace's reference.bin, deltaglider's own objects under .deltaglider/).

    The layout rule (README, "Keys ending in .delta"): a stored ``x.delta`` is always the
    delta form of ``x``, as every reader takes it. So a user's key that itself ends in
    ``.delta`` is stored only in delta form, ``x.delta.delta``: stripping one suffix is
    always right, and no user key can be written over another key's stored form."""
    if _is_reference(stored) or _is_internal(stored):
        return None
    return stored[: -len(_DELTA_SUFFIX)] if stored.endswith(_DELTA_SUFFIX) else stored


def _stored_forms(key: str) -> tuple[str, ...]:
    """The names a logical key may be stored under, in the order readers try them: the
    plain object first (FORMAT.md: GET tries ``<key>`` then ``<key>.delta``), then the
    delta. A key ending in ``.delta`` has only its delta form (see _logical_key)."""
    if _delta_only(key) or _is_reference(key):
        return (key + _DELTA_SUFFIX,)  # a plain reference.bin is no user's object
    return (key, key + _DELTA_SUFFIX)


def _delta_only(key: str) -> bool:
    """Keys that cannot be stored plain: their plain name is another key's delta."""
    return key.endswith(_DELTA_SUFFIX)


def _parent_space(space: str) -> str:
    """The folder whose shared references a folder's files use: ``rel/1.0`` → ``rel``; a
    top-level folder and the root → the root."""
    return space.rpartition("/")[0]


def _refs_prefix(parent: str) -> str:
    return parent + "/" + _REFS_DIR if parent else _REFS_DIR


def _shared_ref_key(space: str, name: str, sha256: str) -> str | None:
    """Where a file of ``space`` named ``name`` is kept as a shared reference; None when
    that key would be too long for a metadata value."""
    parent = _parent_space(space)
    folder = space[len(parent) + 1 :] if parent else space
    # The key travels in dg-ref-key, percent-encoded where it is not ASCII (_put_path) and
    # decoded on read, as every metadata value: so the key itself keeps the names as they
    # are (a key already percent-encoded would be decoded into another key on read).
    rel = folder + "/" + name if space else name
    key = "%s%s/%s/%s" % (_refs_prefix(parent), rel, sha256, _REFERENCE_NAME)
    return key if len(_meta_encode(key)) <= _MAX_SHARED_REF_KEY else None


def _is_shared_ref(key: str) -> bool:
    return key.endswith("/" + _REFERENCE_NAME) and (
        key.startswith(_REFS_DIR) or ("/" + _REFS_DIR) in key
    )


def _shared_ref_parent(key: str) -> str:
    return "" if key.startswith(_REFS_DIR) else key[: key.index("/" + _REFS_DIR)]


def _shared_ref_source(key: str) -> str:
    """The logical key of the file a shared reference was made from."""
    parent = _shared_ref_parent(key)
    rel = _meta_decode(key[len(_refs_prefix(parent)) :].rsplit("/", 2)[0])
    return parent + "/" + rel if parent else rel


def _is_internal(key: str) -> bool:
    """deltaglider's own objects (``.deltaglider/`` at the root or in any folder)."""
    return key.startswith(_INTERNAL_PREFIX) or ("/" + _INTERNAL_PREFIX) in key


def _resolve_ref_key(delta_key: str, ref: str) -> str:
    """A delta's reference: a value with ``/`` is a full key; a bare name is relative to
    the delta's own deltaspace (the proxy writes ``reference.bin``)."""
    if "/" in ref:
        return ref
    space = _deltaspace(delta_key)
    return space + "/" + ref if space else ref


def _stored_objects(storage: _Storage, bucket: str, prefix: str = "") -> Iterator[dict[str, Any]]:
    """Every stored object under ``prefix`` (ListObjectsV2 entries), page after page as
    they are read: stored names, references and deltaglider's own objects included (the
    client's listing is what makes them logical)."""
    for page in _list_pages(storage, bucket, prefix=prefix):
        yield from page.get("Contents", [])


#: ``dg-checksum-<algorithm>``: the x-amz-checksum-* its uploader sent (or asked for), of
#: the logical bytes; a multipart upload's composite value ends in ``-<parts>`` as on S3.
_CHECKSUM_META = "dg-checksum-"


def _checksum_param(algo: str) -> str:
    """boto3's name of an x-amz-checksum-<algo> value: ChecksumSHA256, ChecksumCRC64NVME..."""
    return "Checksum" + algo.upper()


def _stored_checksum(metadata: Mapping[str, str]) -> dict[str, str]:
    """HeadObject/GetObject's Checksum<ALGO> and ChecksumType (asked for with ChecksumMode
    ENABLED) from a stored object's metadata; empty when its uploader sent none."""
    for algo in _CHECKSUMS:
        value = metadata.get(_CHECKSUM_META + algo)
        if value:
            kind = "COMPOSITE" if re.search(r"-\d+$", value) else "FULL_OBJECT"
            return {_checksum_param(algo): value, "ChecksumType": kind}
    return {}


#: ``dg-parts``: the part sizes of an object uploaded in parts, run-length encoded
#: (``5242880*5,1048576*1``), for GetObjectAttributes' ObjectParts; left out when long.
_PARTS_META = "dg-parts"
_PARTS_META_MAX = 200


def _parts_meta(sizes: Sequence[int]) -> str | None:
    runs: list[list[int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    text = ",".join("%d*%d" % (size, count) for size, count in runs)
    return text if len(text) <= _PARTS_META_MAX else None


#: ``dg-upload``: which multipart upload completed into this object (_upload_note), so a
#: repeated CompleteMultipartUpload of it is answered as the first was, by any process.
_UPLOAD_META = "dg-upload"


def _upload_note(upload_id: str, parts: Sequence[tuple[int, str]]) -> str:
    """``dg-upload``'s value: a digest of the upload id and the (number, ETag) parts it
    was completed with (bounded, whatever their count; Swift caps a value at 256 bytes)."""
    import hashlib
    import json

    text = json.dumps([upload_id, [[int(n), str(e).strip('"')] for n, e in parts]])
    return hashlib.sha256(text.encode()).hexdigest()


def _part_sizes(metadata: Mapping[str, str]) -> list[int]:
    """The sizes ``dg-parts`` records (empty for an object not uploaded in parts)."""
    sizes: list[int] = []
    for run in (metadata.get(_PARTS_META) or "").split(","):
        size, _, count = run.partition("*")
        if not (size.isdigit() and count.isdigit()) or len(sizes) + int(count) > _MAX_PARTS:
            return []
        sizes += [int(size)] * int(count)
    return sizes


def _user_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """What the caller gave as Metadata: ``user-<name>`` entries without the prefix, plus
    any non-deltaglider key written by another tool."""
    out: dict[str, str] = {}
    for name, value in metadata.items():
        if name.startswith(_USER_META_PREFIX):
            out[name[len(_USER_META_PREFIX) :]] = _meta_decode(value)
        elif name not in _INTERNAL_META and not name.startswith("dg-"):
            out.setdefault(name, value)
    return out


###############################################################################
# VCDIFF decoder: reading deltas without xdelta3 ##############################
###############################################################################

# -- Constants ----------------------------------------------------------------

#: RFC 3284 section 4.1: "V", "C", "D" with the high bit set, then version 0 (xdelta3
#: rejects any other version, xdelta3-decode.h).
_VCD_MAGIC = b"\xd6\xc3\xc4\x00"
#: Header indicator bits (RFC 3284 section 4.1; xdelta3.c VCD_INVHDR rejects the rest).
_VCD_SECONDARY = 0x01
_VCD_CODETABLE = 0x02
_VCD_APPHEADER = 0x04
#: Window indicator bits (RFC 3284 section 4.2). VCD_ADLER32 is xdelta3's extension
#: (xdelta3.c): a big-endian adler32 of the target window follows the section lengths.
_VCD_SOURCE = 0x01
_VCD_TARGET = 0x02
_VCD_ADLER32 = 0x04
#: Delta indicator bits (RFC 3284 section 4.3): which sections are secondary-compressed.
_VCD_DATACOMP = 0x01
_VCD_INSTCOMP = 0x02
_VCD_ADDRCOMP = 0x04
#: Secondary compressor ids written after the header indicator (xdelta3.c VCD_*_ID).
_SEC_DJW = 1
_SEC_LZMA = 2
_SEC_FGK = 16
#: xdelta3.h XD3_HARDMAXWINSIZE: the decoder refuses target windows above 16 MiB, so no
#: genuine delta has one, and a corrupt length cannot make us allocate more.
_MAX_TARGET_WINDOW = 1 << 24
#: xdelta3 sizes are 32-bit (usize_t) and offsets 64-bit (xoff_t), xdelta3.h.
_SIZE_BITS = 32
_OFFSET_BITS = 64
#: External compressor idents xdelta3 records in its application header
#: (xdelta3-main.h extcomp_types): such a delta encodes the *decompressed* data.
_EXTERNAL_COMPRESSORS = {b"B": "bzip2", b"G": "gzip", b"Z": "compress", b"Y": "xz"}
#: Bytes read from the delta stream at a time.
_READ_CHUNK = 1 << 20

# -- Errors -------------------------------------------------------------------


class _VCDiffError(Exception):
    """A delta that is corrupt, truncated or uses a feature this decoder lacks."""


class _VCDiffLimitError(_VCDiffError):
    """A delta whose windows add up to more than the caller's limit."""


# -- Reading the delta --------------------------------------------------------


def _varint(buf: bytes, pos: int, bits: int, what: str) -> tuple[int, int]:
    """RFC 3284 section 2 integer at ``buf[pos:]``: base 128, most significant digit first,
    high bit set on all but the last byte. Returns (value, next position). Values wider than
    ``bits`` are corrupt, as xdelta3's READ_INTEGER_TYPE rules (xdelta3-internal.h)."""
    value = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise _VCDiffError(f"corrupt delta: {what} runs past the end of its section")
        b = buf[pos]
        pos += 1
        value = (value << 7) | (b & 0x7F)
        if value >> bits:
            raise _VCDiffError(f"corrupt delta: {what} overflows {bits} bits")
        if not b & 0x80:
            return value, pos


class _DeltaReader:
    """Sequential reader over the delta stream that keeps its offset for error messages and
    never asks for more than it was given: a truncated delta fails before a large buffer is
    allocated for a length it claims."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._buf = b""
        self._pos = 0
        self._base = 0  # offset in the delta of self._buf[0]

    def offset(self) -> int:
        return self._base + self._pos

    def _fill(self, need: int) -> bool:
        """Makes ``need`` bytes available past the position; False at end of stream."""
        have = len(self._buf) - self._pos
        if have >= need:
            return True
        parts = [self._buf[self._pos :]]
        while have < need:
            chunk = self._f.read(_READ_CHUNK)
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        self._base += self._pos
        self._buf = b"".join(parts)
        self._pos = 0
        return have >= need

    def at_end(self) -> bool:
        return not self._fill(1)

    def byte(self, what: str) -> int:
        if not self._fill(1):
            raise _VCDiffError(f"truncated delta: {what} missing at offset {self.offset()}")
        b = self._buf[self._pos]
        self._pos += 1
        return b

    def integer(self, what: str, bits: int = _SIZE_BITS) -> int:
        start = self.offset()
        value = 0
        while True:
            b = self.byte(what)
            value = (value << 7) | (b & 0x7F)
            if value >> bits:
                raise _VCDiffError(f"corrupt delta: {what} at offset {start} overflows")
            if not b & 0x80:
                return value

    def take(self, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes, read in pieces so a lying length costs no memory."""
        if self._fill(min(n, _READ_CHUNK)) and n <= len(self._buf) - self._pos:
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            return out
        parts: list[bytes] = []
        left = n
        while left:
            if not self._fill(min(left, _READ_CHUNK)):
                raise _VCDiffError(
                    f"truncated delta: {what} needs {n} bytes, "
                    f"{n - left + len(self._buf) - self._pos} left at offset {self.offset()}"
                )
            piece = self._buf[self._pos : self._pos + left]
            self._pos += len(piece)
            left -= len(piece)
            parts.append(piece)
        return b"".join(parts)


# -- Secondary compression: DJW static Huffman --------------------------------
# xdelta3-djw.h: a bzip2-like multi-table Huffman coder. Bits are taken from each byte
# least significant first (xdelta3-second.h xd3_decode_bits); a code's first bit is its
# most significant, and multi-bit header fields are read most significant bit first.

_DJW_MAX_CODELEN = 20  # DJW_MAX_CODELEN
_DJW_TOTAL_CODES = 22  # DJW_TOTAL_CODES: 2 run codes + 20 MTF positions
_DJW_MAX_CLCLEN = 15  # DJW_MAX_CLCLEN: longest code of the code-length code
_DJW_MAX_GBCLEN = 7  # DJW_MAX_GBCLEN: longest code of the group-selector code
_DJW_EXTRA_12OFFSET = 7  # DJW_BASIC_CODES + DJW_RUN_CODES
#: Initial move-to-front list of code lengths (djw_init_clen_mtf_1_2): 0, the "basic"
#: lengths 4..8, then the "extra" ones in djw_encode_12extra order.
_DJW_CLEN_MTF = (0, 4, 5, 6, 7, 8, 9, 10, 3, 11, 2, 12, 13, 1, 14, 15, 16, 17, 18, 19, 20)
#: Bits resolved by one table lookup; longer codes (rare by construction) take a slow path.
_HUFF_FAST_BITS = 10


def _reverse_bits(v: int, n: int) -> int:
    r = 0
    for _ in range(n):
        r = (r << 1) | (v & 1)
        v >>= 1
    return r


class _Huffman:
    """Canonical prefix code from code lengths, as djw_build_decoder assigns it: codes
    ascend with length and, within a length, with symbol value. ``table`` is indexed by
    the next ``fast`` input bits (first bit lowest) and holds ``symbol << 5 | length``,
    -1 for a code longer than ``fast`` bits, 0 for bits that start no code."""

    def __init__(self, clen: Sequence[int], max_len: int) -> None:
        count = [0] * (max_len + 1)
        for n in clen:
            if n > max_len:
                raise _VCDiffError("corrupt delta: DJW code length out of range")
            count[n] += 1
        count[0] = 0
        longest = max((n for n in range(max_len + 1) if count[n]), default=0)
        self.fast = fast = min(longest, _HUFF_FAST_BITS)
        self.longest = longest
        # first[n]: the first code of length n; index[n]: its position in `order`.
        self.first = first = [0] * (longest + 2)
        self.count = count
        self.index = index = [0] * (longest + 2)
        code = 0
        for n in range(1, longest + 1):
            code = (code + count[n - 1]) << 1 if n > 1 else 0
            first[n] = code
            index[n] = index[n - 1] + count[n - 1] if n > 1 else 0
            if code + count[n] > 1 << n:
                raise _VCDiffError("corrupt delta: DJW code lengths oversubscribed")
        self.order = order = sorted((n, s) for s, n in enumerate(clen) if n)
        self.symbols = [s for _, s in order]
        self.table = table = [0] * (1 << fast)
        nxt = first[:]
        for n, s in order:
            rev = _reverse_bits(nxt[n], n)
            nxt[n] += 1
            if n <= fast:
                table[rev :: 1 << n] = [s << 5 | n] * (1 << (fast - n))
            else:
                table[rev & ((1 << fast) - 1)] = -1

    def slow(self, bb: int) -> int:
        """Decodes a code longer than the table from the bit buffer ``bb``."""
        code = 0
        first, count = self.first, self.count
        for n in range(1, self.longest + 1):
            code = (code << 1) | ((bb >> (n - 1)) & 1)
            if 0 <= code - first[n] < count[n]:
                return self.symbols[self.index[n] + code - first[n]] << 5 | n
        raise _VCDiffError("corrupt delta: invalid DJW code")


class _Bits:
    """LSB-first bit reader over a DJW section. The section is unpacked into 32-bit words
    once (two zero words of padding let the last lookups peek past the end); reading
    beyond the padding is an IndexError that the caller turns into a truncation error."""

    def __init__(self, buf: bytes) -> None:
        n = len(buf)
        words = (n + 3) // 4 + 2
        self.words = struct.unpack(f"<{words}I", bytes(buf) + bytes(words * 4 - n))
        self.nbytes = n
        self.wi = 0
        self.bb = 0
        self.nb = 0

    def bits(self, n: int) -> int:
        """An ``n``-bit field, most significant bit first (xd3_decode_bits)."""
        if self.nb < n:
            self.bb |= self.words[self.wi] << self.nb
            self.wi += 1
            self.nb += 32
        v = self.bb & ((1 << n) - 1)
        self.bb >>= n
        self.nb -= n
        return _reverse_bits(v, n)

    def symbol(self, h: _Huffman) -> int:
        if self.nb < _DJW_MAX_CODELEN:
            self.bb |= self.words[self.wi] << self.nb
            self.wi += 1
            self.nb += 32
        e = h.table[self.bb & ((1 << h.fast) - 1)]
        if e <= 0:
            e = h.slow(self.bb)
        self.bb >>= e & 31
        self.nb -= e & 31
        return e >> 5

    def mtf_1_2(self, h: _Huffman, mtf: list[int], count: int, skip: int) -> list[int]:
        """djw_decode_1_2: ``count`` values coded as move-to-front positions, with runs of
        the front value written in bijective base 2 by the RUN_0/RUN_1 symbols. With
        ``skip``, a value whose counterpart ``skip`` places back is 0 is 0 and uses no
        code (code lengths: a symbol absent from group 0 is absent from every group)."""
        values: list[int] = []
        rep = pending = shift = 0
        while len(values) < count:
            n = len(values)
            if skip and n >= skip and values[n - skip] == 0:
                values.append(0)
            elif rep:
                values.append(mtf[0])
                rep -= 1
            elif pending:
                v = mtf.pop(pending)
                mtf.insert(0, v)
                values.append(v)
                pending = 0
            else:
                sym = self.symbol(h)
                if sym <= 1:  # RUN_0 / RUN_1
                    rep = (sym + 1) << shift
                    shift += 1
                elif sym - 1 < len(mtf):
                    pending = sym - 1
                    shift = 0
                else:
                    raise _VCDiffError("corrupt delta: DJW move-to-front index out of range")
        if rep:
            raise _VCDiffError("corrupt delta: DJW repeat runs past the end")
        return values

    def check_end(self) -> None:
        """xdelta3-second.h: the decoder must use the whole section, and no more."""
        used = 32 * self.wi - self.nb
        if used > 8 * self.nbytes:
            raise _VCDiffError("truncated delta: DJW section ends inside a code")
        if (used + 7) // 8 != self.nbytes:
            raise _VCDiffError("corrupt delta: DJW section has unused bytes")


def _djw_decode(buf: bytes, size: int) -> bytes:
    """xd3_decode_huff (xdelta3-djw.h): ``size`` bytes from one DJW-coded section."""
    rd = _Bits(buf)
    try:
        groups = rd.bits(3) + 1
        # One group codes the whole section as one sector; more switch tables per sector.
        sector = (rd.bits(5) + 1) * 5 if groups > 1 else size
        sectors = 1 + (size - 1) // sector
        # The code-length code: 4 bits say how many of its 22 lengths follow (4 bits each).
        cl_clen = [rd.bits(4) for _ in range(rd.bits(4) + _DJW_EXTRA_12OFFSET)]
        cl_code = _Huffman(cl_clen + [0] * (_DJW_TOTAL_CODES - len(cl_clen)), _DJW_MAX_CLCLEN)
        clens = rd.mtf_1_2(cl_code, list(_DJW_CLEN_MTF), 256 * groups, 256)
        codes = [_Huffman(clens[g * 256 : g * 256 + 256], _DJW_MAX_CODELEN) for g in range(groups)]
        if groups > 1:
            sel_clen = [rd.bits(3) for _ in range(groups + 1)]
            sel_code = _Huffman(sel_clen, _DJW_MAX_GBCLEN)
            selectors = rd.mtf_1_2(sel_code, list(range(groups + 1)), sectors, 0)
            if max(selectors) >= groups:
                raise _VCDiffError("corrupt delta: DJW sector selects a missing group")
        else:
            selectors = [0]
        out = bytearray()
        append = out.append
        words = rd.words
        wi, bb, nb = rd.wi, rd.bb, rd.nb
        left = size
        # The hot loop: one table lookup per byte, the bit buffer refilled 32 bits at a time.
        for g in selectors:
            h = codes[g]
            table, mask, n = h.table, (1 << h.fast) - 1, min(sector, left)
            left -= n
            for _ in range(n):
                if nb < _DJW_MAX_CODELEN:
                    bb |= words[wi] << nb
                    wi += 1
                    nb += 32
                e = table[bb & mask]
                if e <= 0:
                    e = h.slow(bb)
                bb >>= e & 31
                nb -= e & 31
                append(e >> 5)
        rd.wi, rd.bb, rd.nb = wi, bb, nb
        rd.check_end()
    except IndexError:
        raise _VCDiffError("truncated delta: DJW section ends early") from None
    return bytes(out)


# -- Secondary compression: FGK adaptive Huffman ------------------------------
# xdelta3-fgk.h: Faller-Gallager-Knuth adaptive Huffman over bytes, one model per section
# type that lives for the whole delta (xdelta3-second.h xd3_get_secondary initialises it
# once). It is ported as it is written: the tree update is what defines the code, so the
# node and block bookkeeping below mirrors the C pointer by pointer (nodes are indices).


class _FGK:
    _NODES = 2 * 256 - 1
    _NIL = _NODES  # a spare node stands for NULL, so corrupt input cannot index wildly

    def __init__(self) -> None:
        nodes, nil = self._NODES + 1, self._NIL
        self.weight = [0] * nodes
        self.parent = [nil] * nodes
        self.lchild = [nil] * nodes  # left_child; for zero-weight leaves: previous zero
        self.rchild = [nil] * nodes  # right_child; for zero-weight leaves: next zero
        self.left = [nil] * nodes  # neighbours in sibling order
        self.right = [nil] * nodes
        self.block = [0] * nodes
        blocks = 2 * self._NODES
        self.leader = [nil] * blocks
        self.freeptr = [*range(1, blocks), -1]
        self.free_block = 0
        for i in range(256):  # fgk_init_node: all symbols start on the zero list
            self.rchild[i] = i + 1 if i < 255 else nil
            self.lchild[i] = i - 1 if i else nil
        self.root = self.zeros = self.ptr = 0
        self.free_node = 256
        self.zero_count = 256 + 2
        self.zero_exp = self.zero_rem = 0
        self._factor_remaining()
        self._factor_remaining()
        self.coded: list[int] = []

    def _factor_remaining(self) -> None:
        self.zero_count -= 1
        i, e = self.zero_count, 0
        while i > 1:
            e += 1
            i >>= 1
        self.zero_exp = e
        self.zero_rem = self.zero_count - (1 << e)

    def _make_block(self, lead: int) -> int:
        b = self.free_block
        if b < 0:
            raise _VCDiffError("corrupt delta: FGK model ran out of blocks")
        self.free_block = self.freeptr[b]
        self.leader[b] = lead
        return b

    def decode(self, buf: bytes, size: int) -> bytes:
        """xd3_decode_fgk: bits least significant first; stops when ``size`` bytes are out,
        ignoring the rest of that byte, and must then have used the whole section."""
        out = bytearray()
        weight, lchild, rchild = self.weight, self.lchild, self.rchild
        nil = self._NIL
        for i, byte in enumerate(buf):
            for k in range(8):
                bit = (byte >> k) & 1
                ptr = self.ptr
                if weight[ptr] == 0:  # inside the zero node: collecting its index bits
                    self.coded.append(bit)
                    need = self.zero_exp + (1 if self.zero_rem else 0)
                    if len(self.coded) < need:
                        continue
                else:
                    ptr = self.ptr = rchild[ptr] if bit else lchild[ptr]
                    if ptr == nil:
                        raise _VCDiffError("corrupt delta: FGK code leaves the tree")
                    if lchild[ptr] != nil or (weight[ptr] == 0 and self.zero_count != 1):
                        continue
                out.append(self._symbol())
                if len(out) == size:
                    if i + 1 != len(buf):
                        raise _VCDiffError("corrupt delta: FGK section has unused bytes")
                    return bytes(out)
        raise _VCDiffError("truncated delta: FGK section ends early")

    def _symbol(self) -> int:
        """fgk_decode_data: the symbol at the decode position, then the model update."""
        elt = self.ptr
        if self.weight[elt] == 0:
            n = 0
            for bit in self.coded or [0]:
                n = n << 1 | bit
            elt = self.zeros  # fgk_nth_zero: the n-th entry of the zero list
            while n and self.rchild[elt] != self._NIL:
                elt = self.rchild[elt]
                n -= 1
        if not 0 <= elt < 256:
            raise _VCDiffError("corrupt delta: FGK code names no symbol")
        self.coded = []
        self._update(elt)
        self.ptr = self.root
        return elt

    def _update(self, n: int) -> None:
        """fgk_update_tree, with fgk_promote and the block free list inlined: this loop
        runs once per tree level per symbol."""
        node = self._increase_zero_weight(n) if self.weight[n] == 0 else n
        weight, block, leader, freeptr = self.weight, self.block, self.leader, self.freeptr
        parent, left, right, lchild = self.parent, self.left, self.right, self.lchild
        root, zeros, free, nil = self.root, self.zeros, self.free_block, self._NIL
        while node != root:
            back = leader[block[node]]
            w = weight[node]
            if node != back and parent[node] != back and w:
                self._move_right(node, back)
            if w:  # fgk_promote: move the node (its block's leader) into the next block
                my_right, my_left, cur = right[node], left[node], block[node]
                lc = lchild[node]
                if my_left == self.rchild[node] and lc != nil and weight[lc] == 0:
                    if w == weight[my_right] - 1 and my_right != root:
                        freeptr[cur], free = free, cur
                        block[node] = block[my_left] = block[my_right]
                elif my_left != zeros:
                    if block[my_left] == cur:
                        leader[cur] = my_left
                    else:
                        freeptr[cur], free = free, cur
                    if w == weight[my_right] - 1 and my_right != root:
                        block[node] = block[my_right]
                    else:
                        if free < 0:
                            raise _VCDiffError("corrupt delta: FGK model ran out of blocks")
                        block[node], free = free, freeptr[free]
                        leader[block[node]] = node
            weight[node] = w + 1
            node = parent[node]
        weight[root] += 1
        self.free_block = free

    def _move_right(self, fwd: int, back: int) -> None:
        """fgk_move_right: swap ``fwd`` with its block's leader ``back``."""
        left, right, parent = self.left, self.right, self.parent
        left[right[back]] = fwd
        if left[fwd] != self._NIL:
            right[left[fwd]] = back
        tmp = right[fwd]
        right[fwd] = right[back]
        if tmp == back:
            right[back] = fwd
        else:
            left[tmp] = back
            right[back] = tmp
        tmp = left[back]
        left[back] = left[fwd]
        if tmp == fwd:
            left[fwd] = back
        else:
            right[tmp] = fwd
            left[fwd] = tmp
        # Swap the two nodes' places under their parents (possibly the same parent).
        pf, pb = parent[fwd], parent[back]
        fslot = self.rchild if self.rchild[pf] == fwd else self.lchild
        bslot = self.rchild if self.rchild[pb] == back else self.lchild
        parent[fwd], parent[back] = pb, pf
        fslot[pf], bslot[pb] = bslot[pb], fslot[pf]
        self.leader[self.block[fwd]] = fwd

    def _increase_zero_weight(self, n: int) -> int:
        nil = self._NIL
        weight, parent, block = self.weight, self.parent, self.block
        lchild, rchild, left, right = self.lchild, self.rchild, self.left, self.right
        if self.zero_count == 1:  # the last unseen symbol
            rchild[n] = nil
            block[n] = block[right[n]] if weight[right[n]] == 1 else self._make_block(n)
            self.zeros = nil
            return n
        zp = self.zeros
        if self.free_node >= self._NODES:
            raise _VCDiffError("corrupt delta: FGK model ran out of nodes")
        new = self.free_node
        self.free_node += 1
        parent[new], right[new], weight[new] = parent[zp], right[zp], 0
        rchild[new] = left[new] = n
        if zp == self.root:  # the first symbol coded
            self.root = new
            block[n] = self._make_block(n)
            block[new] = self._make_block(new)
        else:
            left[right[new]] = new
            if rchild[parent[zp]] == zp:
                rchild[parent[zp]] = new
            else:
                lchild[parent[zp]] = new
            if weight[right[new]] == 1:
                block[new] = block[right[new]]
            else:
                block[new] = self._make_block(new)
            block[n] = block[new]
        # fgk_eliminate_zero: unlink n from the zero list.
        self._factor_remaining()
        if lchild[n] == nil:
            self.zeros = rchild[self.zeros]
            lchild[self.zeros] = nil
        elif rchild[n] == nil:
            rchild[lchild[n]] = nil
        else:
            lchild[rchild[n]] = lchild[n]
            rchild[lchild[n]] = rchild[n]
        zeros = self.zeros
        lchild[new] = zeros
        right[n], left[n], parent[n] = new, zeros, new
        lchild[n] = rchild[n] = nil
        parent[zeros], right[zeros] = new, n
        return n


# -- Secondary compression: LZMA ----------------------------------------------


class _LZMA:
    """xdelta3-lzma.h: one liblzma .xz stream (lzma_stream_decoder; the encoder writes
    LZMA2 with LZMA_CHECK_NONE) per section type for the whole delta. The encoder ends
    each section with LZMA_SYNC_FLUSH and never finishes the stream, so every section
    continues the stream the previous window's section of that type started."""

    def __init__(self) -> None:
        try:
            import lzma
        except ImportError:
            raise _VCDiffError(
                "unsupported delta: it uses LZMA secondary compression and this Python has "
                "no lzma module (built without liblzma); decode it with xdelta3 or a Python "
                "that has lzma"
            ) from None
        self._error: type[Exception] = lzma.LZMAError
        self._dec = lzma.LZMADecompressor(lzma.FORMAT_XZ)

    def decode(self, buf: bytes, size: int) -> bytes:
        try:
            # One byte past `size` tells too much output from exactly enough.
            out: bytes = self._dec.decompress(buf, size + 1)
        except (self._error, EOFError) as e:
            raise _VCDiffError(f"corrupt delta: LZMA section: {e}") from None
        if len(out) != size:
            raise _VCDiffError(f"corrupt delta: LZMA section gave {len(out)} bytes, not {size}")
        if not self._dec.needs_input or self._dec.eof:
            raise _VCDiffError("corrupt delta: LZMA section has unused bytes")
        return out


# -- Instructions: the RFC 3284 code table ------------------------------------

#: Half-instruction kinds: copies are their address mode (0..8), and these two are
#: negative so one comparison tells a copy from the rest.
_ADD = -1
_RUN = -2
#: Address modes (RFC 3284 section 5.3): VCD_SELF (the address as written), VCD_HERE (back
#: from the current position), then the near modes and the same modes.
_VCD_SELF = 0
_VCD_HERE = 1
_NEAR_START = 2
_NEAR_MODES = 4  # RFC 3284 section 5.1: s_near = 4, s_same = 3 for the default table
_SAME_MODES = 3
_SAME_START = _NEAR_START + _NEAR_MODES
_SAME_SIZE = _SAME_MODES * 256
_MIN_MATCH = 4


def _rfc3284_code_table() -> tuple[tuple[tuple[int, int], ...], ...]:
    """The default instruction code table (RFC 3284 section 5.6, built the way
    xdelta3.c xd3_build_code_table does): each opcode maps to one or two
    (kind, size) half-instructions; size 0 means the size follows in the inst section."""
    t: list[tuple[tuple[int, int], ...]] = [((_RUN, 0),), ((_ADD, 0),)]
    t += [((_ADD, s),) for s in range(1, 18)]
    for mode in range(9):
        t += [((mode, 0),)] + [((mode, s),) for s in range(_MIN_MATCH, _MIN_MATCH + 15)]
    for mode in range(9):  # ADD then COPY: add 1..4, copy 4..6 (near) or 4 (same)
        for a in range(1, 5):
            t += [((_ADD, a), (mode, c)) for c in range(4, 7 if mode < _SAME_START else 5)]
    t += [((mode, 4), (_ADD, 1)) for mode in range(9)]  # COPY 4 then ADD 1
    assert len(t) == 256
    return tuple(t)


_CODE_TABLE = _rfc3284_code_table()


class _AddressCache:
    """A window's copy addresses (RFC 3284 sections 5.1-5.3): the address section they
    are read from, and the near and same caches they are coded against."""

    __slots__ = ("addr", "near", "pos", "same", "slot")

    def __init__(self, addr: bytes) -> None:
        self.addr = addr
        self.pos = 0  # the next byte of the address section
        self.near = [0] * _NEAR_MODES
        self.slot = 0  # the near cache's next slot
        self.same = [0] * _SAME_SIZE

    def decode(self, mode: int, here: int) -> int:
        """The address of a COPY in address ``mode``, ``here`` being the address of the
        next byte written; both caches then remember it. A section that ends early
        raises IndexError, which the caller reports."""
        addr = self.addr
        ap = self.pos
        if mode < _SAME_START:
            a = addr[ap]
            ap += 1
            if a & 0x80:  # two-byte addresses inline, longer ones call
                b = addr[ap]
                if b & 0x80:
                    a, ap = _varint(addr, ap - 1, _SIZE_BITS, "copy address")
                else:
                    a = (a & 0x7F) << 7 | b
                    ap += 1
            if mode == _VCD_HERE:
                a = here - a
            elif mode != _VCD_SELF:
                a += self.near[mode - _NEAR_START]
        else:
            a = self.same[(mode - _SAME_START) * 256 + addr[ap]]
            ap += 1
        self.pos = ap
        self.near[self.slot] = a
        self.slot = (self.slot + 1) & 3  # _NEAR_MODES is 4
        self.same[a % _SAME_SIZE] = a
        return a


def _run_window(
    inst: bytes, data: bytes, addr: bytes, seg: Any, cpylen: int, tgtlen: int
) -> bytearray:
    """Executes one window's instructions (RFC 3284 sections 5.3-5.4) and returns the
    target window. Addresses below ``cpylen`` are in ``seg`` (the source or earlier-target
    segment); the rest are in the target window being built. Every size and address is
    checked against what exists before it is used, as xd3_decode_parse_halfinst does."""
    table = _CODE_TABLE
    out = bytearray()
    addresses = _AddressCache(addr)
    ip = dp = 0
    ilen, dlen = len(inst), len(data)
    here = cpylen  # the address of the next byte to write
    end = cpylen + tgtlen
    try:
        while ip < ilen:
            halves = table[inst[ip]]
            ip += 1
            for kind, size in halves:
                if not size:
                    size = inst[ip]
                    ip += 1
                    if size & 0x80:  # two-byte sizes (< 16 KiB) inline, longer ones call
                        b = inst[ip]
                        if b & 0x80:
                            size, ip = _varint(inst, ip - 1, _SIZE_BITS, "instruction size")
                        else:
                            size = (size & 0x7F) << 7 | b
                            ip += 1
                if here + size > end:
                    raise _VCDiffError("corrupt delta: instruction writes past the window")
                if kind >= 0:  # COPY
                    a = addresses.decode(kind, here)
                    if a < cpylen:
                        if a < 0 or a + size > cpylen:
                            raise _VCDiffError("corrupt delta: copy outside the source window")
                        out += seg[a : a + size]
                    else:
                        a -= cpylen
                        have = here - cpylen
                        if a >= have:
                            raise _VCDiffError("corrupt delta: copy from unwritten target")
                        if a + size <= have:
                            out += out[a : a + size]
                        else:  # overlapping: the RFC's way of writing a repeated pattern
                            pattern = out[a:]
                            reps, rest = divmod(size, len(pattern))
                            out += pattern * reps
                            out += pattern[:rest]
                elif kind == _ADD:
                    if dp + size > dlen:
                        raise _VCDiffError("corrupt delta: ADD runs past the data section")
                    out += data[dp : dp + size]
                    dp += size
                else:  # RUN
                    if dp >= dlen:
                        raise _VCDiffError("corrupt delta: RUN runs past the data section")
                    out += data[dp : dp + 1] * size
                    dp += 1
                here += size
    except IndexError:
        raise _VCDiffError("corrupt delta: instruction or address section ends early") from None
    if here != end:
        raise _VCDiffError(f"corrupt delta: window decodes to {here - cpylen} of {tgtlen} bytes")
    if dp != dlen or addresses.pos != len(addr):
        raise _VCDiffError("corrupt delta: unused bytes in the data or address section")
    return out


# -- Windows and the whole delta ----------------------------------------------


class _FileSegment:
    """A source segment read on demand, for files mmap cannot map (empty files, some
    special files, 32-bit address space): each copy is one seek and read."""

    def __init__(self, f: IO[bytes], base: int) -> None:
        self._f = f
        self._base = base

    def __getitem__(self, s: slice) -> bytes:
        self._f.seek(self._base + s.start)
        data = self._f.read(s.stop - s.start)
        if len(data) != s.stop - s.start:
            raise _VCDiffError("source file changed while decoding: it is shorter")
        return data


class _Source:
    """The source file. Each window maps only the segment it copies from and unmaps it
    after the window, so a 2 GiB source costs address space, not resident memory."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")
        self.size = os.fstat(self._f.fileno()).st_size
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None

    def segment(self, off: int, length: int) -> Any:
        self.release()
        if not length:
            return b""
        start = off - off % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be aligned
        try:
            self._map = mmap.mmap(
                self._f.fileno(), off + length - start, access=mmap.ACCESS_READ, offset=start
            )
        except (OSError, ValueError, OverflowError):
            return _FileSegment(self._f, off)
        self._view = memoryview(self._map)[off - start :]
        return self._view

    def release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def close(self) -> None:
        self.release()
        self._f.close()


def _check_appheader(app: bytes) -> None:
    """xdelta3-main.h main_set_appheader writes "target/comp/source/comp" (or
    "target/comp"), comp naming the external compressor xdelta3 ran when it was not given
    -D. Such a delta holds the *decompressed* data: rebuilding the original file would
    need the same compressor to give the same bytes again, which nothing guarantees."""
    fields = app.split(b"/")
    if len(fields) in (2, 4):
        for comp in fields[1::2]:
            if comp in _EXTERNAL_COMPRESSORS:
                raise _VCDiffError(
                    "unsupported delta: xdelta3 made it from "
                    f"{_EXTERNAL_COMPRESSORS[comp]}-decompressed input (it was run without -D), "
                    "so the original bytes cannot be rebuilt from it"
                )


def _secondary(sec_id: int, models: list[Any], k: int, raw: bytes, limit: int) -> bytes:
    """xd3_decode_secondary (xdelta3-second.h): the section starts with its decoded size,
    then the compressor's stream."""
    size, pos = _varint(raw, 0, _SIZE_BITS, "secondary section size")
    if not 0 < size <= limit:
        raise _VCDiffError(f"corrupt delta: secondary section claims {size} bytes")
    body = raw[pos:]
    if sec_id == _SEC_DJW:
        return _djw_decode(body, size)
    if models[k] is None:
        models[k] = _FGK() if sec_id == _SEC_FGK else _LZMA()
    out: bytes = models[k].decode(body, size)
    return out


def _vcdiff_decode(
    source: str | None, delta: IO[bytes], out: _Writer, limit: int | None = None
) -> int:
    """Decode ``delta`` (a binary stream, read sequentially; it need not be seekable)
    against the source file path (or None), writing the target to ``out``; returns bytes
    written. ``limit``: the most bytes the target may have (its recorded size): a window
    that would go beyond it is refused before it is decoded, so a small hostile delta
    costs neither the time nor the disk of the gigabytes it claims. Raises _VCDiffError
    for a corrupt, truncated or unsupported delta (``out`` then holds the windows
    decoded before the error) and OSError from opening or reading
    the source or writing ``out``. A delta cut exactly between two windows is a valid,
    shorter delta: VCDIFF records no total length, so the caller checks size and digest.
    VCD_TARGET windows (which xdelta3 never writes) read earlier output back from ``out``
    when they reach before the last window, and so need it readable and seekable."""
    rd = _DeltaReader(delta)
    try:
        magic = rd.take(len(_VCD_MAGIC), "VCDIFF header")
    except _VCDiffError:
        magic = b""
    if magic[:3] != _VCD_MAGIC[:3]:
        raise _VCDiffError("corrupt delta: not a VCDIFF file (no VCDIFF magic at offset 0)")
    if magic[3:] != _VCD_MAGIC[3:]:
        raise _VCDiffError(f"unsupported delta: VCDIFF version {magic[3]} (only 0 is known)")
    hdr = rd.byte("header indicator")
    if hdr & ~(_VCD_SECONDARY | _VCD_CODETABLE | _VCD_APPHEADER):
        raise _VCDiffError(f"corrupt delta: unknown header indicator bits {hdr:#04x} at offset 4")
    sec_id = 0
    if hdr & _VCD_SECONDARY:
        sec_id = rd.byte("secondary compressor id")
        if sec_id not in (_SEC_DJW, _SEC_LZMA, _SEC_FGK):
            raise _VCDiffError(f"unsupported delta: secondary compressor id {sec_id}")
    if hdr & _VCD_CODETABLE:
        # xdelta3 3.x cannot read these either ("VCD_CODETABLE support was removed").
        raise _VCDiffError("unsupported delta: it carries its own code table (VCD_CODETABLE)")
    if hdr & _VCD_APPHEADER:
        _check_appheader(rd.take(rd.integer("application header length"), "application header"))
    src = _Source(source) if source is not None else None
    models: list[Any] = [None, None, None]  # FGK/LZMA state per section type
    written = 0
    last = bytearray()  # the previous target window, for VCD_TARGET copies
    number = 0
    try:
        while not rd.at_end():
            start = rd.offset()
            try:
                budget = None if limit is None else limit - written
                target = _decode_window(rd, sec_id, models, src, out, written, last, budget)
            except _VCDiffError as e:
                raise type(e)(f"{e} (window {number} at delta offset {start})") from None
            out.write(target)
            written += len(target)
            last = target
            number += 1
    finally:
        if src is not None:
            src.close()
    return written


def _decode_window(
    rd: _DeltaReader,
    sec_id: int,
    models: list[Any],
    src: _Source | None,
    out: _Writer,
    written: int,
    last: bytearray,
    budget: int | None = None,
) -> bytearray:
    """One window (RFC 3284 section 4.2 with xdelta3's checksum, xdelta3-decode.h).
    ``budget``: the bytes the target may still have; the window's declared length is
    checked against it before any of its sections is decompressed or run."""
    win = rd.byte("window indicator")
    if win & ~(_VCD_SOURCE | _VCD_TARGET | _VCD_ADLER32):
        raise _VCDiffError(f"corrupt delta: unknown window indicator bits {win:#04x}")
    if win & _VCD_SOURCE and win & _VCD_TARGET:
        raise _VCDiffError("corrupt delta: window sets both VCD_SOURCE and VCD_TARGET")
    cpylen = cpyoff = 0
    if win & (_VCD_SOURCE | _VCD_TARGET):
        cpylen = rd.integer("copy window length")
        cpyoff = rd.integer("copy window offset", _OFFSET_BITS)
    enclen = rd.integer("delta encoding length")
    enc_start = rd.offset()
    tgtlen = rd.integer("target window length")
    if tgtlen > _MAX_TARGET_WINDOW:
        raise _VCDiffError(
            f"corrupt delta: target window of {tgtlen} bytes (xdelta3's limit is 16 MiB)"
        )
    if budget is not None and tgtlen > budget:
        raise _VCDiffLimitError(
            f"corrupt delta: it decodes to more than the {written + budget} bytes recorded "
            "for the file (dg-file-size)"
        )
    delind = rd.byte("delta indicator")
    if delind & ~(_VCD_DATACOMP | _VCD_INSTCOMP | _VCD_ADDRCOMP):
        raise _VCDiffError(f"corrupt delta: unknown delta indicator bits {delind:#04x}")
    if delind and not sec_id:
        raise _VCDiffError("corrupt delta: compressed sections without a secondary compressor")
    lengths = [rd.integer(f"{name} section length") for name in ("data", "inst", "addr")]
    cksum = rd.take(4, "window checksum") if win & _VCD_ADLER32 else b""
    # RFC 3284 section 4.2: the encoding length counts everything from the target window
    # length to the end of the address section.
    if rd.offset() - enc_start + sum(lengths) != enclen:
        raise _VCDiffError("corrupt delta: window section lengths disagree with its length")
    sections = [rd.take(n, f"{name} section") for n, name in zip(lengths, ("data", "inst", "addr"))]
    for k, bit in enumerate((_VCD_DATACOMP, _VCD_INSTCOMP, _VCD_ADDRCOMP)):
        if delind & bit:
            # An add or run writes at least one byte per data byte, and an instruction or
            # address takes at most 6 bytes per target byte: bounds for a lying size.
            limit = tgtlen if k == 0 else 6 * tgtlen + 16
            sections[k] = _secondary(sec_id, models, k, sections[k], limit)
    data, inst, addr = sections
    seg: Any = b""
    if win & _VCD_SOURCE:
        if src is None:
            raise _VCDiffError("unsupported delta: it copies from a source file and none was given")
        if cpyoff + cpylen > src.size:
            raise _VCDiffError(
                f"corrupt delta: source window {cpyoff}+{cpylen} is beyond the "
                f"{src.size}-byte source file"
            )
        seg = src.segment(cpyoff, cpylen)
    elif win & _VCD_TARGET:
        seg = _earlier_target(out, written, last, cpyoff, cpylen)
    try:
        target = _run_window(inst, data, addr, seg, cpylen, tgtlen)
    finally:
        if src is not None:
            src.release()
    if cksum and zlib.adler32(target) != int.from_bytes(cksum, "big"):
        raise _VCDiffError("corrupt delta: target window checksum (adler32) mismatch")
    return target


def _earlier_target(
    out: _Writer, written: int, last: bytearray, off: int, length: int
) -> bytes | memoryview:
    """A VCD_TARGET copy window (RFC 3284 section 4.2): bytes already written. The last
    window is still in memory; anything older is read back from ``out``."""
    if off + length > written:
        raise _VCDiffError("corrupt delta: VCD_TARGET window reaches past the output so far")
    last_start = written - len(last)
    if off >= last_start:
        return memoryview(last)[off - last_start : off - last_start + length]
    readable, seekable = getattr(out, "readable", None), getattr(out, "seekable", None)
    if not (readable and seekable and readable() and seekable()):
        raise _VCDiffError(
            "unsupported: this delta copies from earlier output (VCD_TARGET), so the output "
            "must be opened readable and seekable (e.g. 'w+b')"
        )
    back = cast(IO[bytes], out)
    back.flush()
    pos = back.tell()
    back.seek(pos - written + off)
    try:
        data = back.read(length)
    finally:
        back.seek(pos)
    if len(data) != length:
        raise _VCDiffError("VCD_TARGET: could not read back the earlier output")
    return data


###############################################################################
# Archive-aware zip codec #####################################################
###############################################################################

# Expanded stream, version 1 (integers are LEB128 varints unless noted):
#   header   b"DGZX" 0x01
#   records  b"R" chunks          raw bytes, copied verbatim
#            b"D" level memlevel strategy chunks
#                                 a member's inflated content: rebuild is its raw deflate
#                                 (wbits -15) with these parameters
#            b"L" varint(n) n bytes
#                                 a local header, its date-time XOR the previous "L" record's
#            b"C" varint(n) n bytes
#                                 a central directory entry, its date-time XOR that of the
#                                 "L" record with its index (0 if none), its local header
#                                 offset minus the previous "C" record's (mod 2**32)
#            b"E" varint(size) crc32[4, big-endian]
#                                 end: the rebuilt file's size and CRC-32
#   chunks   (varint(n) n bytes)* varint(0), every n <= _ZIPX_CHUNK
# Records follow the zip in file-offset order (local header, member, descriptor, next header,
# ..., central directory), so two versions of a zip give streams that line up for xdelta3.
# A build stamps its members with its own time and one member that grows moves the offsets of
# all that follow; "L" and "C" make those fields the same bytes in both versions, unless the
# time changes between neighbours (a build spanning a second boundary) or the member changed.

_ZIPX_MAGIC = b"DGZX"
_ZIPX_VERSION = 1
_ZIPX_RAW = b"R"
_ZIPX_DEFLATE = b"D"
_ZIPX_LOCAL = b"L"
_ZIPX_CENTRAL = b"C"
_ZIPX_END = b"E"
#: Read, inflate and copy in pieces of this size, so memory stays flat for any member size.
_ZIPX_CHUNK = 1024 * 1024
#: A member whose content fits this is inflated once and kept; larger ones are inflated again
#: to be written, because their content is not held in memory.
_ZIPX_KEEP = 8 * 1024 * 1024
#: Content of small members waiting to be deflated and written while rebuilding.
_ZIPX_PENDING = 32 * 1024 * 1024
#: What a queued record costs in memory beyond its bytes (a tuple, a list or a Future):
#: counted against _ZIPX_PENDING, so the queue of a crafted stream stays bounded.
_ZIPX_RECORD_COST = 512
#: An expanded stream is at most this many times the zip it rebuilds (plus its header):
#: deflate's densest output is 1032 bytes of content per byte, and a record costs at most
#: 4 bytes per byte it writes. Bounds what a delta may decode to when the writer recorded
#: no dg-expanded-size.
_ZIPX_EXPANSION = 1040
#: Zip-bomb guard: stop inflating beyond 1000x the compressed size + 1 MiB or 4 GiB; the
#: member then stays compressed (still rebuilt exactly, just not delta-friendly).
_ZIPX_BOMB_RATIO = 1000
_ZIPX_BOMB_MAX = 4 * 1024**3
#: After this many deflated members with no match at all, the zip was written by a deflater
#: other than zlib (7-Zip, Info-ZIP, zopfli, Go, miniz, zlib-ng): stop paying 12 deflates each.
_ZIPX_GIVE_UP = 8
#: (level, memLevel, strategy) tried in this order after the last one that matched. zlib's
#: default (6, 8) is what Python's zipfile, the JDK (jar, Maven, Gradle) and .NET's Optimal
#: write; then "best" (9) and "fastest" (1), the other levels, and memLevel 9. On inputs
#: under ~16 KB memLevel rarely changes the output, so the (level, 8) entries catch those.
_ZIPX_CANDIDATES = (
    (6, 8, 0),
    (9, 8, 0),
    (1, 8, 0),
    (5, 8, 0),
    (4, 8, 0),
    (3, 8, 0),
    (2, 8, 0),
    (7, 8, 0),
    (8, 8, 0),
    (6, 9, 0),
    (9, 9, 0),
    (0, 8, 0),
)

# Signature, then the fields of APPNOTE 4.3.7 (local), 4.3.12 (central), 4.3.16 (end),
# 4.3.15 (zip64 locator) and 4.3.14 (zip64 end), without the variable-length parts.
_ZIP_LOCAL = struct.Struct("<IHHHHHIIIHH")
_ZIP_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_ZIP_EOCD = struct.Struct("<IHHHHIIH")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_ZIP_SIG_LOCAL = 0x04034B50
_ZIP_SIG_CENTRAL = 0x02014B50
_ZIP_SIG_EOCD = 0x06054B50
_ZIP_SIG_64LOC = 0x07064B50
_ZIP_SIG_64EOCD = 0x06064B50
#: The signatures a scan of the bytes looks for ("PK\x01\x02", "PK\x05\x06").
_ZIP_CENTRAL_BYTES = struct.pack("<I", _ZIP_SIG_CENTRAL)
_ZIP_EOCD_BYTES = struct.pack("<I", _ZIP_SIG_EOCD)
#: Indices of the fields read from _ZIP_LOCAL (0 is the signature).
_LH_FLAGS = 2
_LH_METHOD = 3
_LH_NAME_LEN = 9
_LH_EXTRA_LEN = 10
#: Indices of the fields read from _ZIP_CENTRAL.
_CD_FLAGS = 3
_CD_METHOD = 4
_CD_CRC = 7
_CD_CSIZE = 8
_CD_USIZE = 9
_CD_NAME_LEN = 10
_CD_EXTRA_LEN = 11
_CD_COMMENT_LEN = 12
_CD_LOCAL_OFFSET = 16
#: Indices of the fields read from _ZIP64_EOCD.
_Z64_COUNT = 7
_Z64_CD_SIZE = 8
_Z64_CD_OFFSET = 9
#: Byte offsets of the fields the "L" and "C" records transform: the local header's
#: date-time, the central entry's date-time and its local header offset.
_LH_DATETIME_AT = 10
_CD_DATETIME_AT = 12
_CD_LOCAL_OFFSET_AT = 42
#: General purpose flag bit 0: the member is encrypted (APPNOTE 4.4.4).
_ZIP_FLAG_ENCRYPTED = 0x01
#: Compression method 8 (APPNOTE 4.4.5), held as a raw deflate stream: zlib's wbits -15.
_ZIP_DEFLATED = 8
_RAW_DEFLATE_WBITS = -15
#: The zip64 extended information extra field (APPNOTE 4.5.3), and the 32-bit value that
#: says a size or offset is in it.
_ZIP64_EXTRA_TAG = 0x0001
_ZIP64_MARK = 0xFFFFFFFF
#: The end record sits within the last 64 KiB (its comment length is 16 bits); look a little
#: further for zips with trailing bytes after it.
_ZIP_EOCD_SEARCH = _ZIP_EOCD.size + 0xFFFF + 1024


class _ZipCodecError(Exception):
    """The expanded stream is corrupt, truncated, or of an unknown version."""


class _Unreproducible(Exception):
    """This member's deflate stream can't be inflated (or is a bomb): keep it compressed."""


def _zipx_varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _zipx_read(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise _ZipCodecError("expanded zip stream is truncated")
    return data


def _zipx_read_varint(stream: IO[bytes]) -> int:
    n = shift = 0
    while True:
        byte = _zipx_read(stream, 1)[0]
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n
        shift += 7
        if shift > 63:
            raise _ZipCodecError("expanded zip stream has a malformed length")


def _zipx_read_chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while True:
        n = _zipx_read_varint(stream)
        if n == 0:
            return
        # The cap also keeps a corrupt length from allocating gigabytes in read().
        if n > _ZIPX_CHUNK:
            raise _ZipCodecError("expanded zip stream has an oversized chunk")
        yield _zipx_read(stream, n)


def _zipx_copy(src: IO[bytes], start: int, end: int, out: _Writer) -> None:
    """Write src[start:end] to `out` as a raw record."""
    if start >= end:
        return
    out.write(_ZIPX_RAW)
    src.seek(start)
    while start < end:
        data = src.read(min(_ZIPX_CHUNK, end - start))
        if not data:
            raise OSError("zip file shrank while being read")
        out.write(_zipx_varint(len(data)))
        out.write(data)
        start += len(data)
    out.write(b"\0")


# Parsing: where the deflated members are


def _zip_find_cd(f: IO[bytes], size: int) -> tuple[int, int, int] | None:
    """(start, end, shift) of the central directory, `shift` being what to add to its offsets
    (non-zero when data was prepended, e.g. a self-extractor stub). None if not a zip."""
    tail_start = max(0, size - _ZIP_EOCD_SEARCH)
    f.seek(tail_start)
    tail = f.read(size - tail_start)
    at = len(tail)
    # The last signature that parses wins; earlier ones may sit inside a comment or junk.
    while True:
        at = tail.rfind(_ZIP_EOCD_BYTES, 0, at)
        if at < 0:
            return None
        found = _zip_parse_eocd(f, tail, at, tail_start + at)
        if found is not None:
            return found


def _zip_parse_eocd(f: IO[bytes], tail: bytes, at: int, pos: int) -> tuple[int, int, int] | None:
    if at + _ZIP_EOCD.size > len(tail):
        return None
    _, _, _, _, count, cd_size, cd_offset, comment = _ZIP_EOCD.unpack_from(tail, at)
    if at + _ZIP_EOCD.size + comment > len(tail):
        return None
    cd_end = pos
    loc_at = pos - _ZIP64_LOCATOR.size
    if loc_at >= 0:
        f.seek(loc_at)
        loc = f.read(_ZIP64_LOCATOR.size)
        if len(loc) == _ZIP64_LOCATOR.size and _ZIP64_LOCATOR.unpack(loc)[0] == _ZIP_SIG_64LOC:
            # Like zipfile: the zip64 end record is assumed to sit just before its locator
            # (no extensible data), which also holds when data was prepended.
            rec_at = loc_at - _ZIP64_EOCD.size
            f.seek(max(0, rec_at))
            rec = f.read(_ZIP64_EOCD.size)
            if rec_at < 0 or len(rec) != _ZIP64_EOCD.size:
                return None
            fields = _ZIP64_EOCD.unpack(rec)
            if fields[0] != _ZIP_SIG_64EOCD:
                return None
            count, cd_size, cd_offset = (
                fields[_Z64_COUNT],
                fields[_Z64_CD_SIZE],
                fields[_Z64_CD_OFFSET],
            )
            cd_end = rec_at
    cd_start = cd_end - cd_size
    if cd_start < 0 or cd_offset > cd_start:
        return None
    if count:
        f.seek(cd_start)
        if f.read(len(_ZIP_CENTRAL_BYTES)) != _ZIP_CENTRAL_BYTES:
            return None
    return cd_start, cd_end, cd_start - cd_offset


def _zip_layout(f: IO[bytes], size: int) -> list[tuple[int, bytes, int]] | None:
    """(start, kind, end) of the zip's parts in file order:
    _ZIPX_LOCAL headers, _ZIPX_CENTRAL entries, and _ZIPX_DEFLATE member data (where `end` is
    only a bound: the deflate stream itself says where it stops). None if not a zip.

    These are only hints: a member is expanded only if re-deflating its content gives back the
    very bytes at that place, and the header transforms are invertible for any bytes, so a zip
    that lies about itself still rebuilds exactly (just less compactly)."""
    cd = _zip_find_cd(f, size)
    if cd is None:
        return None
    parts = set()
    for at, end, fields, csize, offset in _zip_central(f, cd):
        parts.add((at, _ZIPX_CENTRAL, end))
        parts.update(_zip_member(f, size, offset, cd[2], csize, fields[_CD_FLAGS]))
    return sorted(parts)


def _zip_central(
    f: IO[bytes], cd: tuple[int, int, int]
) -> Iterator[tuple[int, int, tuple[Any, ...], int, int]]:
    """The central directory's entries: (start, end, fields, compressed size, local
    header offset), sizes and offset from the zip64 extra field where it has them. Read
    entry by entry rather than the whole directory at once: it can be larger than memory."""
    at, cd_end, _ = cd
    while at + _ZIP_CENTRAL.size <= cd_end:
        f.seek(at)
        fields = _ZIP_CENTRAL.unpack(f.read(_ZIP_CENTRAL.size))
        nlen, xlen, clen = fields[_CD_NAME_LEN], fields[_CD_EXTRA_LEN], fields[_CD_COMMENT_LEN]
        end = at + _ZIP_CENTRAL.size + nlen + xlen + clen
        if fields[0] != _ZIP_SIG_CENTRAL or end > cd_end:
            return
        f.seek(at + _ZIP_CENTRAL.size + nlen)
        csize, offset = _zip64_sizes(
            f.read(xlen), fields[_CD_USIZE], fields[_CD_CSIZE], fields[_CD_LOCAL_OFFSET]
        )
        yield at, end, fields, csize, offset
        at = end


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int]:
    """The compressed size and header offset, from the zip64 extra field where the central
    directory entry says 0xFFFFFFFF (APPNOTE 4.5.3: only those values are present, in order)."""
    at = 0
    while at + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, at)
        if tag == _ZIP64_EXTRA_TAG:
            values = [usize, csize, offset]
            i = at + 4
            for k, value in enumerate(values):
                if value == _ZIP64_MARK and i + 8 <= min(len(extra), at + 4 + n):
                    values[k] = struct.unpack_from("<Q", extra, i)[0]
                    i += 8
            return values[1], values[2]
        at += 4 + n
    return csize, offset


def _zip_member(
    f: IO[bytes], size: int, offset: int, shift: int, csize: int, flags: int
) -> list[tuple[int, bytes, int]]:
    """The local header of a member and, if deflated, its data, as _zip_layout parts."""
    for header in (offset + shift, offset):
        if header + _ZIP_LOCAL.size > size:
            continue
        f.seek(header)
        fields = _ZIP_LOCAL.unpack(f.read(_ZIP_LOCAL.size))
        if fields[0] != _ZIP_SIG_LOCAL:
            continue
        # The local header, not the central one, says where the data starts: their name and
        # extra lengths often differ (zipalign pads only the local extra field).
        start = header + _ZIP_LOCAL.size + fields[_LH_NAME_LEN] + fields[_LH_EXTRA_LEN]
        if start > size:
            return []
        parts = [(header, _ZIPX_LOCAL, start)]
        encrypted = (fields[_LH_FLAGS] | flags) & _ZIP_FLAG_ENCRYPTED
        if fields[_LH_METHOD] == _ZIP_DEFLATED and not encrypted:
            parts.append((start, _ZIPX_DEFLATE, min(size, start + csize)))
        return parts
    return []


# Expanding


class _Inflate:
    """Iterates over the content of the raw deflate stream at f[start:bound] in pieces of at
    most _ZIPX_CHUNK. If `collect`, `raw` collects the compressed bytes as they are read, for
    the caller to compare with and consume. Once exhausted, `end` is where the deflate stream
    ended and `raw` has lost any bytes read past it. The pieces depend only on the bytes in the
    file, so a second pass yields the same pieces and the deflater is fed as when verified."""

    def __init__(self, f: IO[bytes], start: int, bound: int, collect: bool = True) -> None:
        self.f, self.start, self.bound, self.collect = f, start, bound, collect
        self.raw = bytearray()
        self.end = -1

    def __iter__(self) -> Iterator[bytes]:
        self.f.seek(self.start)
        inflater = zlib.decompressobj(_RAW_DEFLATE_WBITS)
        pos, total = self.start, 0
        limit = min(_ZIPX_BOMB_RATIO * (self.bound - self.start) + _ZIPX_CHUNK, _ZIPX_BOMB_MAX)
        while not inflater.eof:
            data = self.f.read(min(_ZIPX_CHUNK, self.bound - pos))
            if not data:
                raise _Unreproducible("deflate stream runs past its member")
            pos += len(data)
            if self.collect:
                self.raw += data
            while True:
                try:
                    piece = inflater.decompress(data, _ZIPX_CHUNK)
                except zlib.error as e:
                    raise _Unreproducible(str(e)) from None
                data = inflater.unconsumed_tail
                total += len(piece)
                if total > limit:
                    raise _Unreproducible("inflates beyond the zip-bomb limit")
                if piece:
                    yield piece
                # A full piece may leave output pending inside zlib even with no input left.
                if inflater.eof or (not data and len(piece) < _ZIPX_CHUNK):
                    break
        unused = len(inflater.unused_data)
        self.end = pos - unused
        if self.collect:
            del self.raw[len(self.raw) - unused :]


def _zipx_consume(raw: bytearray, out: bytes) -> bool:
    """Whether `out` is the next part of `raw`; consume it if so."""
    if not out:
        return True
    if raw[: len(out)] != out:
        return False
    del raw[: len(out)]
    return True


def _zipx_verify(
    f: IO[bytes], start: int, bound: int, params: tuple[int, int, int]
) -> tuple[int, list[bytes] | None] | None:
    """Inflate the member at f[start:bound] and re-deflate it with `params`, comparing as we
    go and stopping at the first mismatching byte. (end of the stream, its content if small)
    on an exact match, else None."""
    level, mem_level, strategy = params
    deflater = zlib.compressobj(level, zlib.DEFLATED, _RAW_DEFLATE_WBITS, mem_level, strategy)
    source = _Inflate(f, start, bound)
    kept: list[bytes] | None = []
    kept_size = 0
    for piece in source:
        if not _zipx_consume(source.raw, deflater.compress(piece)):
            return None
        kept_size += len(piece)
        if kept is not None and kept_size <= _ZIPX_KEEP:
            kept.append(piece)
        else:
            kept = None
    if not _zipx_consume(source.raw, deflater.flush()) or source.raw:
        return None
    return source.end, kept


def _zipx_inflate(f: IO[bytes], start: int, bound: int) -> tuple[int, list[bytes] | None]:
    """Inflate the member at f[start:bound] without checking how it was deflated: (end of
    the stream, its content if small), as _zipx_verify returns."""
    source = _Inflate(f, start, bound, collect=False)
    kept: list[bytes] | None = []
    kept_size = 0
    for piece in source:
        kept_size += len(piece)
        if kept is not None and kept_size <= _ZIPX_KEEP:
            kept.append(piece)
        else:
            kept = None
    return source.end, kept


class _ZipxHeaders:
    """The "L"/"C" header transform. Expanding applies it and rebuilding undoes it to the same
    records in the same order, so both sides hold the same state, whatever the headers say."""

    def __init__(self, undo: bool) -> None:
        self.undo = undo
        self.local_times = array.array("I")  # every "L" record's real date-time, in order
        self.centrals = 0
        self.offset = 0  # the previous "C" record's real local header offset

    def apply(self, kind: bytes, data: bytes) -> bytes:
        buf = bytearray(data)
        times = self.local_times
        if kind == _ZIPX_LOCAL:
            (field,) = struct.unpack_from("<I", buf, _LH_DATETIME_AT)
            value = field ^ (times[-1] if times else 0)
            struct.pack_into("<I", buf, _LH_DATETIME_AT, value)
            times.append(value if self.undo else field)
            return bytes(buf)
        (field,) = struct.unpack_from("<I", buf, _CD_DATETIME_AT)
        value = field ^ (times[self.centrals] if self.centrals < len(times) else 0)
        struct.pack_into("<I", buf, _CD_DATETIME_AT, value)
        self.centrals += 1
        (field,) = struct.unpack_from("<I", buf, _CD_LOCAL_OFFSET_AT)
        value = (field + self.offset if self.undo else field - self.offset) & 0xFFFFFFFF
        struct.pack_into("<I", buf, _CD_LOCAL_OFFSET_AT, value)
        self.offset = value if self.undo else field
        return bytes(buf)


def _zip_expand(src: str, out: _Writer, assume: tuple[int, int, int] | None = None) -> bool:
    """Write the expanded form of the zip file at `src` to `out`, sequentially. False if
    `src` is not a zip this codec can read (the caller then discards `out`). Members that
    zlib can't reproduce byte for byte, stored members and other methods stay raw bytes.

    `assume`: take every deflated member as made with these parameters, without
    re-deflating to check: inflating only, several times faster. The result is the checked
    form only if every member was made with them, so a reader uses it when its SHA-256 is
    the one the writer recorded, and expands again with checks otherwise."""
    with open(src, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        try:
            layout = _zip_layout(f, size)
        except (struct.error, ValueError, OverflowError):
            layout = None
        if layout is None:
            return False
        out.write(_ZIPX_MAGIC + bytes([_ZIPX_VERSION]))
        headers = _ZipxHeaders(undo=False)
        pos = 0  # everything before pos has been written
        last = _ZIPX_CANDIDATES[0]
        hits = misses = 0
        for start, kind, end in layout:
            if start < pos:
                continue  # overlaps a part already written: it stays inside that one
            if kind != _ZIPX_DEFLATE:
                _zipx_copy(f, pos, start, out)
                f.seek(start)
                data = f.read(end - start)
                if len(data) != end - start:
                    raise OSError("zip file shrank while being read")
                out.write(kind + _zipx_varint(len(data)) + headers.apply(kind, data))
                pos = end
                continue
            if misses >= _ZIPX_GIVE_UP and not hits:
                continue
            found = None
            try:
                if assume is not None:
                    found, last = _zipx_inflate(f, start, end), assume
                # Zips are written with one setting: the last match is almost always next.
                for params in () if assume else (last, *(c for c in _ZIPX_CANDIDATES if c != last)):
                    found = _zipx_verify(f, start, end, params)
                    if found is not None:
                        last = params
                        break
            except _Unreproducible:
                pass
            if found is None:
                misses += 1
                continue
            hits += 1
            stream_end, content = found
            _zipx_copy(f, pos, start, out)
            out.write(_ZIPX_DEFLATE + bytes(last))
            try:
                for piece in content if content is not None else _Inflate(f, start, end, False):
                    out.write(_zipx_varint(len(piece)))
                    out.write(piece)
            except _Unreproducible:
                raise OSError("zip file changed while being read") from None
            out.write(b"\0")
            pos = stream_end
        _zipx_copy(f, pos, size, out)
        # A second read for the checksum keeps the walk above simple; the file is in the page
        # cache by now and CRC-32 runs at GB/s.
        crc = 0
        f.seek(0)
        for data in iter(lambda: f.read(_ZIPX_CHUNK), b""):
            crc = zlib.crc32(data, crc)
        out.write(_ZIPX_END + _zipx_varint(size) + struct.pack(">I", crc))
    return True


# Rebuilding


def _zip_reuse_index(path: str) -> dict[tuple[int, int], tuple[int, int]]:
    """(CRC-32, size) of each deflated member's content -> (offset, length) of its deflate
    stream in the zip at `path`, from the central directory; {} if it is not a zip."""
    index: dict[tuple[int, int], tuple[int, int]] = {}
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        try:
            cd = _zip_find_cd(f, size)
            if cd is None:
                return index
            for _, _, fields, csize, offset in _zip_central(f, cd):
                crc, usize = fields[_CD_CRC], fields[_CD_USIZE]
                if fields[_CD_METHOD] != _ZIP_DEFLATED or usize == _ZIP64_MARK:
                    continue  # not deflated, or a zip64 size this index does not read
                flags = fields[_CD_FLAGS]
                for start, kind, bound in _zip_member(f, size, offset, cd[2], csize, flags):
                    if kind == _ZIPX_DEFLATE and bound - start == csize:
                        index.setdefault((crc, usize), (start, csize))
        except (struct.error, ValueError, OverflowError):
            pass
    return index


class _ZipRebuild:
    """One rebuild in progress: what was written (its size and CRC-32) and the records
    waiting to be written in order, each counted at its bytes plus _ZIPX_RECORD_COST. One
    method per record kind of the expanded stream reads that record and writes or queues
    what it rebuilds to."""

    def __init__(
        self,
        out: _Writer,
        limit: int | None,
        pool: concurrent.futures.Executor,
        reuse: dict[tuple[int, int], tuple[int, int]],
        ref_file: IO[bytes] | None,
    ) -> None:
        self.out = out
        self.limit = limit
        self.pool = pool
        self.reuse = reuse
        self.ref_file = ref_file
        self.headers = _ZipxHeaders(undo=True)
        self.size = self.crc = self.held = 0
        self.queued: collections.deque[tuple[int, Any]] = (
            collections.deque()
        )  # (bytes, job or data)

    def put(self, data: bytes) -> None:
        """Write ``data`` now (callers first emit what waits before it)."""
        if self.limit is not None and self.size + len(data) > self.limit:
            raise _OutputLimitError(self.limit)
        self.out.write(data)
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)

    def emit(self, keep: int) -> None:
        """Write waiting records, oldest first, until at most ``keep`` bytes wait (-1: all)."""
        import concurrent.futures

        while self.queued and self.held > keep:
            weight, item = self.queued.popleft()
            self.held -= weight
            for data in item.result() if isinstance(item, concurrent.futures.Future) else item:
                self.put(data)

    def queue(self, weight: int, item: Any) -> None:
        """Queue a record's bytes (a list, or a Future of one), writing the oldest while
        more than _ZIPX_PENDING wait."""
        self.queued.append((weight, item))
        self.held += weight
        self.emit(_ZIPX_PENDING)

    def raw(self, expanded: IO[bytes]) -> None:
        """An "R" record: bytes copied as they are, after what waits."""
        self.emit(-1)
        for data in _zipx_read_chunks(expanded):
            self.put(data)

    def deflated(self, expanded: IO[bytes]) -> None:
        """A "D" record: the member as copied from the reference when it has it, else
        deflated in a thread when small, else deflated and written as it is read."""
        params = tuple(_zipx_read(expanded, 3))
        level, mem_level, strategy = params
        if level > 9 or not 1 <= mem_level <= 9 or strategy > 4:
            raise _ZipCodecError("expanded zip stream has bad deflate parameters")
        chunks, total = [], 0
        pieces = _zipx_read_chunks(expanded)
        for chunk in pieces:
            chunks.append(chunk)
            total += len(chunk)
            if total > _ZIPX_KEEP:
                break
        if total <= _ZIPX_KEEP and self.ref_file is not None:
            crc32 = 0
            for chunk in chunks:
                crc32 = zlib.crc32(chunk, crc32)
            same = self.reuse.get((crc32, total))
            if same is not None:
                self.ref_file.seek(same[0])
                self.queue(same[1] + _ZIPX_RECORD_COST, [self.ref_file.read(same[1])])
                return
        if total <= _ZIPX_KEEP:
            job = self.pool.submit(_zipx_deflate_all, chunks, params)
            self.queue(total + _ZIPX_RECORD_COST, job)
            return
        self.emit(-1)  # a large member: stream it, in order
        for data in _zipx_deflate(itertools.chain(chunks, pieces), params):
            self.put(data)

    def header(self, tag: bytes, expanded: IO[bytes]) -> None:
        """An "L" or "C" record: the header with its transform undone."""
        n = _zipx_read_varint(expanded)
        if not _ZIP_LOCAL.size <= n <= _ZIPX_CHUNK:
            raise _ZipCodecError("expanded zip stream has a bad header record")
        header = _zipx_read(expanded, n)
        if tag == _ZIPX_CENTRAL and n < _ZIP_CENTRAL.size:
            raise _ZipCodecError("expanded zip stream has a bad header record")
        self.queue(n + _ZIPX_RECORD_COST, [self.headers.apply(tag, header)])

    def end(self, expanded: IO[bytes]) -> int:
        """The "E" record: everything is written; the size and CRC-32 must be its own."""
        self.emit(-1)
        want_size = _zipx_read_varint(expanded)
        (want_crc,) = struct.unpack(">I", _zipx_read(expanded, 4))
        if expanded.read(1):
            raise _ZipCodecError("expanded zip stream has data after its end")
        if (self.size, self.crc) != (want_size, want_crc):
            # Deflate output is not specified, only zlib's habit: zlib-ng (Fedora 40+,
            # .NET 9, CPython 3.14 on Windows) and patched forks compress differently.
            raise _ZipCodecError(
                "rebuilt zip does not match: this machine's zlib %s deflates "
                "differently from the one that expanded it" % zlib.ZLIB_RUNTIME_VERSION
            )
        return self.size


def _zip_rebuild(
    expanded: IO[bytes],
    out: _Writer,
    reference: str | None = None,
    limit: int | None = None,
) -> int:
    """Write the original bytes of an expanded stream to `out`; return how many. Raises
    _ZipCodecError if the stream is corrupt, truncated or of an unknown version, or if this
    machine's zlib deflates differently from the one that expanded it; _OutputLimitError
    as soon as it would write more than `limit` bytes (the size recorded for the zip).
    Memory stays within _ZIPX_PENDING whatever the records (each counts at least
    _ZIPX_RECORD_COST, so a stream of empty records cannot queue millions of them).

    Deflating is most of the time, and zlib releases the GIL: members up to _ZIPX_KEEP are
    deflated in threads and written in order, with at most _ZIPX_PENDING bytes waiting.
    Raw records and larger members are written as they are read, after what waits.

    `reference`: a zip whose members may be the same (the delta's reference). A member
    whose content has the CRC-32 and size of one there is copied from it, not deflated:
    an unchanged member is the same bytes in both builds. If that assumption fails, the
    CRC-32 of the whole file says so (_ZipCodecError); callers then rebuild without it."""
    import concurrent.futures

    reuse = _zip_reuse_index(reference) if reference else {}
    head = expanded.read(len(_ZIPX_MAGIC) + 1)
    magic, version = head[: len(_ZIPX_MAGIC)], head[len(_ZIPX_MAGIC) :]
    if magic != _ZIPX_MAGIC:
        raise _ZipCodecError("not an expanded zip stream")
    if version != bytes([_ZIPX_VERSION]):
        raise _ZipCodecError("expanded zip stream version %r is not supported" % version)
    with contextlib.ExitStack() as stack:
        ref_file = stack.enter_context(open(reference, "rb")) if reference and reuse else None
        pool = stack.enter_context(
            concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1))
        )
        rebuild = _ZipRebuild(out, limit, pool, reuse, ref_file)
        while True:
            tag = _zipx_read(expanded, 1)
            if tag == _ZIPX_END:
                return rebuild.end(expanded)
            if tag == _ZIPX_RAW:
                rebuild.raw(expanded)
            elif tag == _ZIPX_DEFLATE:
                rebuild.deflated(expanded)
            elif tag in (_ZIPX_LOCAL, _ZIPX_CENTRAL):
                rebuild.header(tag, expanded)
            else:
                raise _ZipCodecError("expanded zip stream has an unknown record %r" % tag)


def _zipx_deflate(chunks: Iterable[bytes], params: Sequence[int]) -> Iterator[bytes]:
    """Deflate a member's content with the same calls, chunk for chunk, as when it was
    checked (_zipx_verify): the output is then the same bytes."""
    level, mem_level, strategy = params
    deflater = zlib.compressobj(level, zlib.DEFLATED, _RAW_DEFLATE_WBITS, mem_level, strategy)
    for chunk in chunks:
        yield deflater.compress(chunk)
    yield deflater.flush()


def _zipx_deflate_all(chunks: list[bytes], params: Sequence[int]) -> list[bytes]:
    return list(_zipx_deflate(chunks, params))


###############################################################################
# xdelta3 and the delta engine ################################################
###############################################################################

#: Extensions the original tool stores as deltas (FORMAT.md), plus the proxy's and the
#: archive and image types it misses.
#: Not .gz/.tgz/.bz2/.xz (the original lists them): a compressed stream changes throughout
#: when its content changes a little, so deltas save nothing, and xdelta3 without -D (what
#: the original decodes with) decompresses such a reference, so it could not read them back.
#: They are stored whole, as the proxy does.
_DELTA_EXTENSIONS = (
    ".zip .tar .7z .rar .dmg .iso .pkg .deb .rpm .apk .jar .war .ear "
    ".sql .dump .bak .backup .whl .egg .nupkg .aar .vsix .xpi .ipa .msi .img .qcow2 .vmdk"
).split()

#: Whole-file compressed streams xdelta3 would decompress on its own (see above).
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x1f\x9d", b"\x28\xb5\x2f\xfd")

#: Magic numbers of archives and disk images, for names without a known extension:
#: (offset, bytes).
_DELTA_MAGIC: tuple[tuple[int, bytes], ...] = (
    (0, b"PK\x03\x04"),  # zip, jar, wheel, apk, docx...
    (0, b"PK\x05\x06"),  # empty zip
    (0, b"7z\xbc\xaf\x27\x1c"),  # 7-Zip
    (0, b"Rar!\x1a\x07"),  # RAR
    (0, b"!<arch>\n"),  # ar (.deb)
    (0, b"\xed\xab\xee\xdb"),  # RPM
    (0, b"QFI\xfb"),  # qcow2
    (0, b"KDMV"),  # VMDK sparse
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"),  # OLE2 (.msi)
    (0, b"SQLite format 3\x00"),
    (257, b"ustar"),  # tar
    (32769, b"CD001"),  # ISO 9660
)

#: Media already compressed past what any delta finds (estimate_compression, as 6.x).
_INCOMPRESSIBLE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".mp4", ".mp3", ".avi", ".mov"})
#: A delta above this fraction of the file, against a reference of the same series (the same
#: name, or the same name with its version numbers changed), makes the file a new reference:
#: the versions after it then delta against it (drift, a bad first file). On 25 botocore
#: wheels 0.23 picks the references an exhaustive search picks (benchmarks/RESULTS.md).
_HEAL_RATIO = 0.23
#: A reference is a candidate for a file within this factor of its size.
_SIMILAR_SIZE = 2.0
#: Pages of a parent's shared references an upload reads (1000 each).
_REF_LIST_PAGES = 2
#: Seconds a process reuses a folder's reference lookup (its reference.bin HEAD, its
#: parent's shared-reference listing) for the next files of that folder, adding the
#: references it makes itself. Staleness costs only savings (another process's new
#: reference unseen): a delta is kept only if its reference is still stored after it.
_REF_LOOKUP_TTL = 10.0
#: Requests a delete may spend proving a shared reference unused (``gc`` has no limit).
_REF_SCAN_LIMIT = 200
_VERSION_RE = r"\d+"
_SPLIT_RE = r"(\d+)"
#: dg-codec of a delta made between expanded zips (see _zip_expand); readers that do not
#: know it decode against the plain reference and their SHA-256 check refuses the bytes.
_CODEC_ZIP = "zip-expand-1"
_EXPANDED_SUFFIX = "zx1"
#: xdelta3's source window (-B) is sized to the reference, within these bounds: a window
#: smaller than the reference loses matches further apart than it (FORMAT.md); one
#: larger costs hash-table memory for nothing (194 MB instead of 93 MB for a 12 MB wheel).
_MIN_SOURCE_WINDOW = 1024 * 1024
_MAX_SOURCE_WINDOW = 2 * 1024**3
#: Peak RSS of xdelta3 3.0.11 encoding, measured (README, "xdelta3 settings"): about
#: 48 MB, plus the part of the reference in the window, plus hash tables of FACTOR bytes
#: per byte of the window rounded up to a power of two. Each (LEVEL, FACTOR, SIZE) is for
#: windows up to SIZE, the first that fits wins: time grows with the window far faster
#: than the delta shrinks. Up to 8 MiB, -6: there -9's longer match chains find little
#: more (README: at most 8% on 1 MB zips, under 1% on 4.6 MB wheels) for twice the encode
#: time, and -3 loses up to 8% on those wheels. At 16 MiB, -3: -6 finds 1-3% more on
#: the 12 MB wheels for half again the encode time, which is most of a later upload's.
#: From 32 MiB -9 finds 15-20% more in tars, and is worth its time again.
_XD3_BASE = 48 * 1000**2
_XD3_LEVELS = (
    (6, 1.0, 8 * 1024**2),
    (3, 0.5, 16 * 1024**2),
    (9, 2.0, 128 * 1024**2),
    (6, 1.0, 256 * 1024**2),
    (3, 0.5, 512 * 1024**2),
)
_XD3_FASTEST = (1, 0.125)
#: xdelta3's input window (-W): the file is encoded, and written out, in pieces of this
#: size, and the check decodes each piece while the next is encoded. At xdelta3's 8 MiB a
#: 12 MB file came out in two pieces, the last at the encoder's very end: about 1/16 of the
#: source window instead, within 1-8 MiB (a file of 128 MiB or more keeps xdelta3's 8 MiB).
#: Measured: within 0.6% of the 8 MiB deltas on the corpus (the 4.6 MB wheels 1-2% smaller).
_XD3_INPUT_WINDOW = (1024 * 1024, 8 * 1024 * 1024)
#: Decoding reads a file reference through an LRU cache of -B bytes (xdelta3 allocates
#: min(-B, reference)): any window decodes any delta, a bigger one saves only re-reads.
_DECODE_WINDOW = 64 * 1024 * 1024
_XD3_DECODE_BASE = 16 * 1000**2
#: -B of a decode reading its reference from a pipe as it downloads (_DecodeBeside):
#: xdelta3 then fills that much of it before it writes anything (the decode lags the
#: download by it), and cannot copy from further back (that decode is then made again
#: from the downloaded file). Changes that stay near their place (disk images) need no
#: more than a window.
_STREAM_WINDOW = 16 * 1024 * 1024
#: The upload check's decoder (xdelta3 -d reading the delta as it is made). -W: it reads
#: its input in blocks of this size, waiting for a whole one (8 MiB by default: a small
#: delta would be decoded only once the encoder ended, instead of beside it). -B: it runs
#: beside the encoder, at the tree's peak, so with 16 MiB, not 64 (a smaller window only
#: re-reads the reference, from the page cache): 48 MiB less there, measured (the 300 MiB
#: image's tree peaked at 572 MiB with 64). Its plan still holds _decoder_memory for it.
_CHECK_FLAGS = ("-d", "-D", "-c", "-W", "16384", "-B", str(16 * 1024 * 1024))
#: Our own Python process's share of the limit (about 50 MB measured on 2 GiB transfers).
_PYTHON_RESERVE = 80 * 1000**2
#: Seconds a new reference must have existed before it is used, on servers that ignore
#: If-None-Match (Last-Modified has a resolution of one second).
_REFERENCE_SETTLE = 2.0


def _name_class(name: str, other: str) -> int:
    """How alike two file names are: 3 the same; 2 the same but for version numbers
    (a series); 1 the same extension; 0 unrelated."""
    if name == other:
        return 3
    if re.sub(_VERSION_RE, "#", name) == re.sub(_VERSION_RE, "#", other):
        return 2
    ext = name.rpartition(".")[2].lower() if "." in name else None
    return 1 if ext is not None and "." in other and other.rpartition(".")[2].lower() == ext else 0


def _eligible_by_name(name: str, environ: Mapping[str, str]) -> bool:
    lower = name.lower()
    extra = [e.lower() for e in _env_setting(environ, _ENV_DELTA_EXTENSIONS)]
    return any(lower.endswith(ext) for ext in list(_DELTA_EXTENSIONS) + extra)


def _is_compressed_stream(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return False
    return any(head.startswith(m) for m in _COMPRESSED_MAGIC)


def _eligible_by_content(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(32774)
    except OSError:
        return False
    return any(head[off : off + len(magic)] == magic for off, magic in _DELTA_MAGIC)


def _memory_limit(value: str | int | None, environ: Mapping[str, str]) -> int:
    """The memory limit asked for (argument, else DG_MEMORY_LIMIT, else 600 MB), checked."""
    if value is None:
        return int(_env_setting(environ, _ENV_MEMORY_LIMIT))
    return _parse_size(str(value), "memory_limit", minimum=_MIN_MEMORY_LIMIT)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class _EncodePlan(NamedTuple):
    level: int
    window: int  # -B
    memory: int  # the encoder's expected peak RSS, bytes


def _encoder_memory(factor: float, window: int, source_size: int) -> int:
    window = _pow2_at_least(window)  # what xdelta3 allocates
    return _XD3_BASE + min(window, source_size) + int(factor * window)


def _decoder_memory(source_size: int) -> int:
    return _XD3_DECODE_BASE + min(_DECODE_WINDOW, source_size)


def _encode_plan(source_size: int, budget: int) -> _EncodePlan:
    """The one place xdelta3's level and source window (-B) are chosen, from the
    reference's size and the memory the encoder may use. A window covering the whole
    reference matters most (data moved further than the window is stored again), so the
    first level of _XD3_LEVELS made for that window and affording it wins (-6 up to 8 MiB,
    -3 at 16 MiB, then -9, -6, -3, -1 as windows grow: time). When even -1 cannot hold
    the whole reference, the largest window that fits: changes that stay near their
    place (the usual case) still give the same delta."""
    full = _XDelta3.window(source_size)
    for level, factor, max_window in _XD3_LEVELS:
        if full <= max_window:
            need = _encoder_memory(factor, full, source_size)
            if need <= budget:
                return _EncodePlan(level, full, need)
    level, factor = _XD3_FASTEST
    need = _encoder_memory(factor, full, source_size)
    if need <= budget:
        return _EncodePlan(level, full, need)
    # A window short of the reference: xdelta3 rounds its buffer up to a power of two.
    window = full
    while window > 16 * 1024 * 1024 and _encoder_memory(factor, window, source_size) > budget:
        window //= 2  # 16 MiB at least: a limit that small was refused by _memory_limit
    return _EncodePlan(level, window, _encoder_memory(factor, window, source_size))


class _MemoryBudget:
    """Bytes our xdelta3 children may use at once: each run holds its expected peak, and
    waits while others hold too much (parallel uploads then take turns, not swap)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, amount: int) -> Iterator[None]:
        amount = min(amount, self.total)
        self.take(amount)
        try:
            yield
        finally:
            self.give(amount)

    def take(self, amount: int, wait: bool = True, leave: int = 0) -> bool:
        """Hold ``amount`` (at most the total) until ``give``; without ``wait``, only if
        it is free now, and ``leave`` bytes (at most the total) stay free beside it
        (False: nothing held)."""
        leave = min(leave, self.total)
        with self._cond:
            while self._free < amount + (0 if wait else leave):
                if not wait:
                    return False
                self._cond.wait()
            self._free -= amount
        return True

    def give(self, amount: int) -> None:
        with self._cond:
            self._free += amount
            self._cond.notify_all()


class _XDelta3:
    """The xdelta3 binary, run as a subprocess. Encoding always passes ``-D``: without it
    xdelta3 decompresses gzip/bzip2/xz inputs itself and the bytes that come back differ
    (the original tool cannot return any .tar.gz it stored).

    The program is ``binary``, else $DG_XDELTA3, else ``xdelta3`` on ``environ``'s PATH:
    that is the seam tests use (a fake executable on a PATH of its own)."""

    def __init__(
        self,
        binary: str | None = None,
        *,
        environ: Mapping[str, str] = os.environ,
        decoder: str | None = None,
        memory_limit: str | int | None = None,
    ) -> None:
        self._name = binary or _env_setting(environ, _ENV_XDELTA3) or "xdelta3"
        self.memory_limit = _memory_limit(memory_limit, environ)
        self.memory = _MemoryBudget(self.memory_limit - _PYTHON_RESERVE)
        self._environ = environ
        self._path: str | None = None
        self.decoder: str
        if decoder is None:
            self.decoder = _env_setting(environ, _ENV_DECODER)
        else:
            self.decoder = _parse_choice(decoder, "decoder", choices=_DECODERS)
        # xdelta3 is CPU-bound: more processes than cores only add memory and swapping.
        self.slots = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))

    def path(self) -> str:
        if self._path is None:
            found = shutil.which(self._name, path=self._environ.get("PATH"))
            if found is None:
                raise XDelta3NotFoundError(self._name)
            self._path = found
        return self._path

    @staticmethod
    def window(source_size: int) -> int:
        """-B: the reference size rounded up to a power of two, within 1 MiB..2 GiB."""
        window = _MIN_SOURCE_WINDOW
        while window < source_size and window < _MAX_SOURCE_WINDOW:
            window *= 2
        return window

    @staticmethod
    def encode_args(plan: _EncodePlan, source: str, target: str, out: str) -> list[str]:
        return [
            "-e",
            "-f",
            "-D",
            "-A",
            "-%d" % plan.level,
            "-S",
            "djw",
            "-B",
            str(plan.window),
            "-W",
            str(min(_XD3_INPUT_WINDOW[1], max(_XD3_INPUT_WINDOW[0], plan.window // 16))),
            "-s",
            source,
            target,
            out,
        ]

    def encode_verified(
        self, source: str, target: str, out: str, hashes: _Hashes | None = None
    ) -> int | None:
        """Encode ``target`` against ``source`` into ``out`` and decode the delta as it is
        made: ``xdelta3 -e -c | tee out | xdelta3 -d -c``, whose output is compared byte
        for byte with ``target``, read once beside it. xdelta3 writes each window as soon
        as it is encoded, so the check runs on the second core while the encoder works,
        instead of after it. ``hashes`` takes the bytes of ``target`` as they are read for
        the comparison, in a thread of its own (_ReadAhead: the upload's one pass over
        its file, hashed on one core while compared on the other; its digests are then
        those of the very bytes the delta decodes to). Returns None when the delta
        decodes to exactly those bytes, else the offset of the first byte that differs."""
        import subprocess
        import tempfile

        size = os.path.getsize(source)
        checker = _decoder_memory(size)
        plan = _encode_plan(size, self.memory.total - checker)
        args = self.encode_args(plan, source, target, out)
        enc_cmd = [self.path(), *args[:-2], "-c", target]
        dec_cmd = [self.path(), *_CHECK_FLAGS, "-s", source]
        differs: int | None = None
        with contextlib.ExitStack() as stack:
            enc_err = stack.enter_context(tempfile.TemporaryFile())
            dec_err = stack.enter_context(tempfile.TemporaryFile())
            sink = stack.enter_context(open(out, "wb"))
            original: IO[bytes] | _ReadAhead = stack.enter_context(open(target, "rb"))
            for update in hashes.updates() if hashes is not None else []:
                original = _ReadAhead(original, update)  # a thread per digest
                stack.callback(original.close)
            stack.enter_context(self.slots)
            stack.enter_context(self.memory.hold(plan.memory + checker))
            enc, dec = procs = self._start(
                [(enc_cmd, subprocess.DEVNULL, enc_err), (dec_cmd, subprocess.PIPE, dec_err)]
            )
            assert enc.stdout is not None and dec.stdin is not None and dec.stdout is not None
            feeder = _Background(_tee_delta, enc.stdout, sink, dec.stdin)
            try:
                differs = _compare_stream(dec.stdout, original)
                feeder.result()
            except BaseException:
                for proc in procs:
                    proc.kill()
                raise
            finally:
                codes = [proc.wait() for proc in procs]
            for cmd, code, err in ((enc_cmd, codes[0], enc_err), (dec_cmd, codes[1], dec_err)):
                if code != 0:
                    err.seek(0)
                    raise XDelta3Error(cmd, code, err.read().decode("utf-8", "replace"))
        return differs

    @staticmethod
    def _start(runs: list[tuple[list[str], int, IO[bytes]]]) -> list[subprocess.Popen[bytes]]:
        """Start each (command, stdin, stderr file) with its stdout a pipe: all or none
        (those started are killed if one cannot be)."""
        import subprocess

        procs: list[subprocess.Popen[bytes]] = []
        for cmd, stdin, err in runs:
            try:
                procs.append(subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=err))
            except OSError as e:
                for proc in procs:
                    proc.kill()
                    proc.wait()
                raise XDelta3Error(cmd, -1, str(e)) from e
        return procs

    def decode_sha256(
        self,
        source: str,
        delta: str,
        out: IO[bytes] | None = None,
        *,
        external: bool = False,
        limit: int | None = None,
    ) -> tuple[str, int]:
        """Decode to stdout and hash on the fly, writing to ``out`` if given: checks a
        delta, or rebuilds a file, without reading the result back from disk. With
        ``external`` xdelta3 may recompress (deltas the original tool made of compressed
        files were encoded without -D). ``limit``: the size recorded for the result; a
        delta that decodes to more is stopped there (IntegrityError), having written at
        most ``limit`` bytes: a 1 KB delta can claim a gigabyte."""
        import hashlib
        import subprocess
        import tempfile

        if self._python_decodes():
            return self._decode_in_python(source, delta, out, external, limit)
        try:
            binary = self.path()
        except XDelta3NotFoundError:  # only with DG_DECODER=xdelta3: auto falls back above
            raise XDelta3NotFoundError(
                self._name, "to read deltas with it, or unset %s=xdelta3" % _ENV_DECODER
            ) from None
        flags = ["-d", "-f", "-c"] if external else ["-d", "-f", "-D", "-c"]
        cmd = [binary, *flags, "-B", str(_DECODE_WINDOW), "-s", source, delta]
        h = hashlib.sha256()
        total = 0
        memory = self.memory.hold(_decoder_memory(os.path.getsize(source)))
        with tempfile.TemporaryFile() as errors, self.slots, memory:
            try:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors
                )
            except OSError as e:
                raise XDelta3Error(cmd, -1, str(e)) from e
            assert proc.stdout is not None
            try:
                with proc.stdout:
                    while True:
                        chunk = proc.stdout.read(_IO_CHUNK)
                        if not chunk:
                            break
                        if limit is not None and total + len(chunk) > limit:
                            raise _OutputLimitError(limit)
                        h.update(chunk)
                        total += len(chunk)
                        if out is not None:
                            out.write(chunk)
            except BaseException:
                proc.kill()
                raise
            finally:
                code = proc.wait()
            if code != 0:
                errors.seek(0)
                raise XDelta3Error(cmd, code, errors.read().decode("utf-8", "replace"))
        return h.hexdigest(), total

    def streams(self) -> bool:
        """Whether xdelta3 decodes here and can read a pipe as its source (/dev/fd)."""
        return not self._python_decodes() and os.path.isdir("/dev/fd")

    def _python_decodes(self) -> bool:
        if self.decoder == "auto":
            try:
                self.path()
            except XDelta3NotFoundError:
                return True
            return False
        return self.decoder == "python"

    @staticmethod
    def _decode_in_python(
        source: str, delta: str, out: IO[bytes] | None, external: bool, limit: int | None
    ) -> tuple[str, int]:
        if external:
            # xdelta3 decompressed the input and recompresses on decode with gzip/bzip2/xz
            # programs; the bytes depend on those programs, so only xdelta3 can redo it.
            raise XDelta3NotFoundError(
                "xdelta3",
                "to read this delta (the original tool made it without -D, and only xdelta3 "
                "recompresses as it did)",
            )
        sink = _HashingWriter(out if out is not None else _NullWriter())
        try:
            with open(delta, "rb") as f:
                total = _vcdiff_decode(source, f, sink, limit)
        except _VCDiffLimitError:
            raise _OutputLimitError(limit or 0) from None
        except _VCDiffError as e:
            raise IntegrityError("the delta does not decode (built-in decoder): %s" % e) from None
        return sink.sha256.hexdigest(), total

    def decode(
        self,
        source: str,
        delta: str,
        out: str,
        *,
        external: bool = False,
        limit: int | None = None,
    ) -> str:
        """Decode into the file ``out``; returns the SHA-256 of what was written."""
        with open(out, "wb") as f:
            return self.decode_sha256(source, delta, f, external=external, limit=limit)[0]


class _DecodeBeside:
    """A cold read's decode made while its reference downloads: ``feed`` takes the
    reference's bytes in order as they come (the download's writer) and hands them to
    ``xdelta3 -d`` through a pipe as its source, so decoding runs beside the download
    instead of after it; a zero-diff delta's file is the reference itself, written as it
    comes. ``finish`` gives the SHA-256 written to ``out``, or None when this decode was
    not made: no core or memory free for it now, no delta, a source xdelta3 cannot read
    as a stream (a copy from further back than its window), more than ``limit`` bytes,
    or any failure. The caller checks the SHA-256 as for any decode, and decodes from
    the verified cache file when it is not the one recorded."""

    def __init__(
        self, xdelta: _XDelta3, delta: Callable[[], str] | None, out: str, limit: int
    ) -> None:
        self._xdelta = xdelta
        self._delta = delta  # waits for the delta's download; None: a zero-diff delta
        self._out_path = out
        self._limit = limit
        self._started = False
        self._held = 0
        self._out: IO[bytes] | None = None
        self._hashes = _Hashes()
        self._proc: Any = None  # subprocess.Popen[bytes], started on the first feed
        self._pipe = -1
        self._reader: _Background | None = None
        self._failed = False
        self._fed = False  # the decoder closed its source: read all it needs, or failed

    def _start(self) -> bool:
        """Set up on the first bytes; False when the decode cannot be made now."""
        import subprocess

        self._started = True
        if self._delta is None:
            self._out = open(self._out_path, "wb")
            return True
        if not self._held and not self._reserve():
            return False
        delta = self._delta()  # (its download failing fails the read: the caller says so)
        read, self._pipe = os.pipe()
        cmd = [self._xdelta.path(), "-d", "-f", "-D", "-c", "-B", str(_STREAM_WINDOW)]
        try:
            self._proc = subprocess.Popen(
                [*cmd, "-s", "/dev/fd/%d" % read, delta],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # a failure here is the fallback's to report
                pass_fds=(read,),
            )
        finally:
            os.close(read)
        self._out = open(self._out_path, "wb")
        self._reader = _Background(self._drain, self._proc)
        return True

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        """The decoder's output into ``out``, hashed (its own thread)."""
        assert self._out is not None and proc.stdout is not None
        try:
            with proc.stdout as decoded:
                for chunk in iter(lambda: decoded.read(_IO_CHUNK), b""):
                    if self._hashes.size + len(chunk) > self._limit:
                        raise _OutputLimitError(self._limit)
                    self._hashes.update(chunk)
                    self._out.write(chunk)
        except BaseException:
            proc.kill()  # nobody reads it any more
            raise

    def _reserve(self) -> bool:
        """A decoder slot and its memory, if free now."""
        if not self._xdelta.streams() or not self._xdelta.slots.acquire(blocking=False):
            return False
        amount = _XD3_DECODE_BASE + _STREAM_WINDOW
        # The reference's download holds its parts' memory after this, waiting for it:
        # what this takes must leave that free, or the read would wait on itself.
        if not self._xdelta.memory.take(amount, wait=False, leave=_GET_HOLD):
            self._xdelta.slots.release()
            return False
        self._held = amount
        return True

    def begin(self) -> bool:
        """Reserve what the decode needs before its first bytes come: False when it
        cannot be made now (``feed`` then ignores what it is given)."""
        if self._started or self._failed or self._delta is None or self._held:
            return not self._failed
        try:
            self._failed = not self._reserve()
        except Exception as e:  # (XDelta3NotFoundError...)
            logger.debug("no decode beside the download: %s", e)
            self._failed = True
        return not self._failed

    def feed(self, data: memoryview) -> None:
        if self._failed or self._fed:
            return
        if not self._started:
            try:
                ok = self._start()
            except Exception as e:  # (OSError, XDelta3NotFoundError...)
                logger.debug("no decode beside the download: %s", e)
                ok = False
            if not ok:
                self._failed = True
                return
        if self._delta is None:  # zero-diff: the reference is the file
            assert self._out is not None
            if self._hashes.size + len(data) > self._limit:
                self._failed = True
                return
            self._hashes.update(data)
            self._out.write(data)
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._pipe, view) :]
        except OSError:  # the decoder needs no more (its exit code says if it failed)
            self._fed = True

    def finish(self) -> str | None:
        """Wait for the decode (its source ends here: also when the download failed);
        again, nothing. Never raises but to interrupt: a failed decode is None."""
        proc, self._proc = self._proc, None
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        try:
            if proc is not None:
                try:
                    assert self._reader is not None
                    self._reader.result()
                except Exception as e:
                    logger.debug("decode beside the download failed: %s", e)
                    self._failed = True
                self._failed = proc.wait() != 0 or self._failed
        finally:
            try:
                out, self._out = self._out, None
                if out is not None:
                    out.close()
            except OSError as e:  # its last bytes not written (a full disk): no decode
                logger.debug("decode beside the download failed: %s", e)
                self._failed = True
            finally:
                if self._held:
                    self._xdelta.memory.give(self._held)
                    self._xdelta.slots.release()
                    self._held = 0
        if not self._started or self._failed:
            return None
        return self._hashes.info().sha256


def _default_cache_dir(environ: Mapping[str, str]) -> str:
    folder = _env_setting(environ, _ENV_CACHE_DIR)
    if folder:
        return os.path.expanduser(str(folder))
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deltaglider")


def _private_mkdir(path: str) -> None:
    """Create a folder of the cache (0700), or check an existing one: a directory of this
    user that nobody else can write to. Whoever can write there can swap a spooled upload
    body or a cached reference between our write and our read (a file's own 0600 does
    not stop a rename over it), so anything else is refused, naming DG_CACHE_DIR; a
    chmod that fails is not ignored. POSIX only: Windows has no mode bits to check."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:
        pass  # not a directory: said below
    except OSError as e:
        raise InvalidConfigError(
            error_msg="%s: cannot create the cache folder %s: %s; set %s to a folder of "
            "your own" % (_ENV_CACHE_DIR, path, e.strerror, _ENV_CACHE_DIR)
        ) from None
    if os.name == "nt":  # pragma: no cover - checked on POSIX only
        return
    uid = os.geteuid()
    link = os.lstat(path)
    try:
        st = os.stat(path)
    except OSError:
        st = link  # a dangling symbolic link: not a directory
    problem = ""
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (uid, 0):
        problem = "is a symbolic link owned by uid %d, not by you (uid %d)" % (link.st_uid, uid)
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != uid:
        problem = "is owned by uid %d, not by you (uid %d)" % (st.st_uid, uid)
    elif st.st_mode & 0o022:
        problem = "is writable by group or others (mode %03o)" % stat.S_IMODE(st.st_mode)
    elif st.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError as e:
            problem = "cannot be made private (chmod 700: %s)" % e.strerror
    if problem:
        raise InvalidConfigError(
            error_msg="%s: the cache folder %s %s: another user could change the upload "
            "bodies and references kept there. Set %s to a folder of your own that only "
            "you can write to (mode 700)" % (_ENV_CACHE_DIR, path, problem, _ENV_CACHE_DIR)
        )


_UMASK: list[int] = []


def _new_file_mode(dest: str) -> int:
    """The mode a downloaded file gets: the one it replaces, or 0666 less the umask
    (temp files start private; the finished file is the user's)."""
    try:
        return stat.S_IMODE(os.stat(dest).st_mode)
    except OSError:
        pass
    if not _UMASK:
        mask = os.umask(0o022)  # read it: os.umask can only be read by setting it
        os.umask(mask)
        _UMASK.append(mask)
    return 0o666 & ~_UMASK[0]


class _ReferenceCache:
    """Reference files on disk, content-addressed by SHA-256, shared between runs and
    processes: ``<dir>/refs/ab/<sha256>``. Entries are written to a temp file, checked
    and renamed into place, so two processes filling the same entry at once is safe.
    A download's fetch is not hashed (its output is checked): it is kept apart, as
    ``<sha256>.u``, which reads use as it is and nothing else does, so an entry's name
    only ever holds bytes hashed by whoever put them there (``fill``, ``promote``).
    Each entry is re-hashed on its first use in a process and then trusted while its
    size and mtime are unchanged. Least recently used entries go beyond ``max_size``,
    except those an operation of this process holds (``hold``): an entry larger than the
    limit is kept while it is in use and removed when the operation ends."""

    def __init__(self, folder: str, max_size: int = _DEFAULT_CACHE_MAX) -> None:
        self.folder = folder
        self.max_size = max_size
        self._verified: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self.fetches = 0  # how many references were downloaded (tests count them)
        self._held: collections.Counter[str] = collections.Counter()  # sha256 -> holds
        self._local = threading.local()  # .shas: the entries the current hold uses
        self._over = False  # an eviction left held entries beyond max_size
        self._warned_small = False
        self._wanted: set[str] = set()  # wanted by a read here, where no mark could be made

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Within the block, every entry this thread looks up, fills or derives from stays
        on disk until the block ends, whatever the size limit: evicting the reference (or
        its expanded form) an upload or download is reading makes it fail with ENOENT.
        Nested holds are one hold."""
        if getattr(self._local, "shas", None) is not None:
            yield
            return
        shas: set[str] = set()
        self._local.shas = shas
        try:
            yield
        finally:
            self._local.shas = None
            with self._lock:
                for sha in shas:
                    self._held[sha] -= 1
                    if self._held[sha] <= 0:
                        del self._held[sha]
                over, self._over = self._over, False
            if over:
                self._evict(keep="")

    def _use(self, sha256: str) -> None:
        shas = getattr(self._local, "shas", None)
        if shas is not None and sha256 not in shas:
            shas.add(sha256)
            with self._lock:
                self._held[sha256] += 1

    def _path(self, sha256: str) -> str:
        if not re.match(r"^[0-9a-f]{64}$", sha256):
            raise IntegrityError("not a SHA-256: %r" % sha256)
        return os.path.join(self.folder, "refs", sha256[:2], sha256)

    def lookup(self, sha256: str) -> str | None:
        """The path of a verified entry, or None (a corrupt entry is removed).

        An entry is hashed on its first use in a process, unless another process's stamp
        says it hashed these very bytes: fine for reads, whose output is checked anyway.
        Writers also call ``check``."""
        path = self._path(sha256)
        self._use(sha256)
        try:
            st = os.stat(path)
        except OSError:
            return None
        ident = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hashed = self._verified.get(sha256) == ident  # by this process
        if not hashed and self._read_stamp(path) != _stamp_of(st):
            if not self._rehash(sha256, path):
                return None
            hashed = True
        try:
            os.utime(path, None)  # recency for eviction
            st = os.stat(path)
            self._write_stamp(path, st)
        except OSError:
            pass
        if hashed:
            with self._lock:
                self._verified[sha256] = (st.st_size, st.st_mtime_ns)
        return path

    def check(self, sha256: str) -> bool:
        """Hash an entry unless this process already did: a delta made against silently
        corrupted bytes would be unreadable, so uploads do not trust another process's
        stamp. False (and the entry removed) if it does not match."""
        path = self._path(sha256)
        try:
            st = os.stat(path)
        except OSError:
            return False
        with self._lock:
            if self._verified.get(sha256) == (st.st_size, st.st_mtime_ns):
                return True
        if not self._rehash(sha256, path):
            return False
        with self._lock:
            self._verified[sha256] = (st.st_size, st.st_mtime_ns)
        return True

    def recheck(self, sha256: str) -> bool:
        """Hash an entry and the files made from it, whatever any stamp says: after a
        read failed, this tells a damaged cache (False: the damaged files are removed, to
        be fetched or made again) from a damaged delta (True)."""
        path = self._path(sha256)
        if not self._rehash(sha256, path):
            return False
        good = True
        folder, name = os.path.split(path)
        try:
            names = os.listdir(folder)
        except OSError:
            names = []
        for n in names:
            if not (n.startswith(name + ".") and n.endswith(".sha")):
                continue
            derived = os.path.join(folder, n[: -len(".sha")])
            try:
                with open(derived + ".sha") as f:
                    want = f.read().strip()
                actual = _hash_file(derived).sha256
            except OSError:
                continue  # not made (any more)
            if actual != want:
                logger.warning("cache entry %s is corrupt; removing it", derived)
                for side in ("", ".ok", ".sha"):
                    with contextlib.suppress(OSError):
                        os.unlink(derived + side)
                with self._lock:
                    self._verified.pop(derived, None)
                good = False
        return good

    def _rehash(self, sha256: str, path: str) -> bool:
        try:
            actual = _hash_file(path).sha256
        except OSError:  # gone (another process evicted it): nothing to remove
            with self._lock:
                self._verified.pop(sha256, None)
            return False
        if actual == sha256:
            return True
        logger.warning("cache entry %s is corrupt; removing it", path)
        folder, name = os.path.split(path)
        for p in [path] + [
            os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(name + ".")
        ]:  # its stamp and what was made from it
            with contextlib.suppress(OSError):
                os.unlink(p)
        with self._lock:
            self._verified.pop(sha256, None)
        return False

    @staticmethod
    def _read_stamp(path: str) -> str | None:
        try:
            with open(path + ".ok") as f:
                return f.read().strip()
        except OSError:
            return None

    @staticmethod
    def _write_stamp(path: str, st: os.stat_result) -> None:
        """Remember that this file (size, mtime, inode) was hashed and matched, so other
        processes need not hash it again; any change to the file invalidates it."""
        tmp = ""
        try:
            fd, tmp = _private_tempfile(
                os.path.dirname(path), prefix=os.path.basename(path) + ".ok."
            )
            with os.fdopen(fd, "w") as f:
                f.write(_stamp_of(st))
            os.replace(tmp, path + ".ok")
        except OSError as e:  # only a shortcut for later processes: never fatal
            logger.debug("could not write cache stamp %s.ok: %s", path, e)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def fill(self, sha256: str, write: Callable[[IO[bytes]], None], verify: bool = True) -> str:
        """Create the entry by calling ``write(file)``; raise IntegrityError if the bytes
        written do not hash to ``sha256`` (nothing is kept then). ``verify=False`` (a
        download, whose output is checked) does not hash them: they become the unhashed
        copy (``unhashed``), unless another is there already (that one is returned)."""
        path = self._path(sha256)
        self._use(sha256)
        folder = os.path.dirname(path)
        _private_mkdir(self.folder)
        _private_mkdir(os.path.join(self.folder, "refs"))
        _private_mkdir(folder)
        fd, tmp = _private_tempfile(folder)
        try:
            with os.fdopen(fd, "wb") as f:
                hashing = None if not verify else _HashingWriter(f)
                write(hashing or f)  # type: ignore[arg-type]
            got = hashing.sha256.hexdigest() if hashing is not None else None
            if got is None:
                try:
                    os.link(tmp, path + _UNHASHED)  # never over another copy in use
                except FileExistsError:  # another download's copy: that one is used
                    pass
                except OSError:  # no hard links on this file system: hash it after all
                    got = _hash_file(tmp).sha256
            if got is None:
                os.unlink(tmp)
                self.count_fetch()
                self._evict(keep=path + _UNHASHED)
                return path + _UNHASHED
            if got != sha256:
                raise IntegrityError(
                    "reference bytes do not match dg-ref-sha256: expected %s, got %s"
                    % (sha256, got)
                )
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._trust(sha256, path)
        self.count_fetch()
        self._evict(keep=path)
        return path

    def count_fetch(self) -> None:
        with self._lock:
            self.fetches += 1

    def _trust(self, sha256: str, path: str) -> None:
        """The entry at ``path`` was just hashed by this process as it was put in place:
        trusted here, and stamped for other processes."""
        st = os.stat(path)
        self._write_stamp(path, st)
        with self._lock:
            self._verified[sha256] = (st.st_size, st.st_mtime_ns)

    def unhashed(self, sha256: str) -> str | None:
        """The unhashed copy a download fetched (``fill(verify=False)``), or None: for
        reads only, which check what they make from it."""
        path = self._path(sha256) + _UNHASHED
        self._use(sha256)
        try:
            os.utime(path, None)  # recency for eviction
        except OSError:
            return None
        return path

    def promote(self, sha256: str) -> str | None:
        """Make the unhashed copy the entry, if it hashes to ``sha256``: no download for
        an upload after a download. It is hashed through a link of this process's own, so
        the bytes hashed are the bytes put in place. None when there is no such copy (or
        it does not match: it is removed)."""
        path = self._path(sha256)
        copy = path + _UNHASHED
        self._use(sha256)
        own = os.path.join(os.path.dirname(path), ".dg-%s.tmp" % os.urandom(8).hex())
        try:
            os.link(copy, own)
        except OSError:  # none (or no hard links here: it is fetched again, hashed)
            return None
        try:
            os.utime(own, None)  # (not a stale temp file to another process's _evict)
            if _hash_file(own).sha256 != sha256:
                logger.warning("cache entry %s is corrupt; removing it", copy)
                self.drop_unhashed(sha256, os.stat(own))
                return None
            os.replace(own, path)
        except OSError:  # gone under us (another process's eviction): fetch it, hashed
            return None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(own)
        self._trust(sha256, path)
        with contextlib.suppress(OSError):
            os.unlink(copy)  # (a newer one of another download, if so: fetched again)
        return path

    def drop_unhashed(self, sha256: str, used: os.stat_result) -> None:
        """Remove the unhashed copy ``used`` describes (a read failed with it), unless
        another download has put a newer one in its place. The caller holds it open, so
        its inode number is not reused meanwhile."""
        path = self._path(sha256) + _UNHASHED
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == used.st_ino:
                os.unlink(path)

    def want(self, sha256: str) -> bool:
        """A read is about to fetch this reference, which is not here: True when a read
        wanted it before (the mark ``<sha256>.w``; where none can be made, a read of this
        process), and so it is kept now; False the first time, which is marked. A reference is kept
        from its second read on: a single download writes its file and nothing else
        (the cache would otherwise hold a second copy of the largest bytes it moves)."""
        mark = self._path(sha256) + _WANTED
        try:
            os.utime(mark, None)
            return True
        except OSError:
            pass
        with self._lock:
            if sha256 in self._wanted:
                return True
        try:
            _private_mkdir(self.folder)
            _private_mkdir(os.path.join(self.folder, "refs"))
            _private_mkdir(os.path.dirname(mark))
            os.close(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:  # another process's read marked it just now
            return True
        except OSError as e:  # remembered here instead (a bounded few)
            logger.debug("could not mark %s: %s", mark, e)
            with self._lock:
                if len(self._wanted) >= 1000:
                    self._wanted.clear()
                self._wanted.add(sha256)
        return False

    def add_file(self, sha256: str, source: str) -> str:
        """Copy a local file (already hashed by the caller) into the cache."""
        existing = self.lookup(sha256)
        if existing:
            return existing

        def write(f: IO[bytes]) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, f, _IO_CHUNK)

        path = self.fill(sha256, write)
        with self._lock:
            self.fetches -= 1  # not a download
        return path

    def derived(
        self, ref_sha256: str, suffix: str, make: Callable[[IO[bytes]], bool], strict: bool
    ) -> tuple[str, str] | None:
        """A file computed from a cached reference (its expanded zip form), kept beside it
        with its SHA-256 in ``<path>.sha``: (path, SHA-256), or None if ``make(file)``
        declines. ``strict`` (uploads) hashes it once per process, as ``check`` does."""
        path = self._path(ref_sha256) + "." + suffix
        self._use(ref_sha256)
        try:
            st = os.stat(path)
            with open(path + ".sha") as f:
                sha = f.read().strip()
        except OSError:
            sha = ""
        if sha:
            with self._lock:
                hashed = self._verified.get(path) == (st.st_size, st.st_mtime_ns)
            if hashed or (not strict and self._read_stamp(path) == _stamp_of(st)):
                return path, sha
            if _hash_file(path).sha256 == sha:
                with self._lock:
                    self._verified[path] = (st.st_size, st.st_mtime_ns)
                return path, sha
            logger.warning("cache entry %s is corrupt; making it again", path)
        fd, tmp = _private_tempfile(os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                writer = _HashingWriter(f)
                made = make(writer)  # type: ignore[arg-type]
            if not made:
                os.unlink(tmp)
                return None
            sha = writer.sha256.hexdigest()
            side_fd, side_tmp = _private_tempfile(os.path.dirname(path))
            with os.fdopen(side_fd, "w") as f:
                f.write(sha)
            os.replace(side_tmp, path + ".sha")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        st = os.stat(path)
        self._write_stamp(path, st)
        with self._lock:
            self._verified[path] = (st.st_size, st.st_mtime_ns)
        self._evict(keep=path)
        return path, sha

    def drop_derived(self, ref_sha256: str, suffix: str) -> None:
        path = self._path(ref_sha256) + "." + suffix
        for side in ("", ".ok", ".sha"):
            with contextlib.suppress(OSError):
                os.unlink(path + side)
        with self._lock:
            self._verified.pop(path, None)

    def _evict(self, keep: str) -> None:
        root = os.path.join(self.folder, "refs")
        entries = []
        total = 0
        with self._lock:
            held = set(self._held)
        for dirpath, _, files in os.walk(root):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                if name.endswith((".ok", ".ok.tmp", ".sha")) or ".ok." in name:
                    continue  # stamps and hashes go with their entry
                if name.startswith(".dg-") and time.time() - st.st_mtime > 3600:
                    entries.append((0.0, st.st_size, p))  # stale temp file of a dead process
                elif name.endswith(_WANTED):
                    if time.time() - st.st_mtime > _WANTED_FOR:
                        with contextlib.suppress(OSError):
                            os.unlink(p)
                    continue
                elif not name.startswith(".dg-"):
                    entries.append((st.st_mtime, st.st_size, p))
                total += st.st_size
        entries.sort()
        for _, size, p in entries:
            if total <= self.max_size:
                break
            if p == keep or os.path.basename(p)[:64] in held:
                continue  # in use: evicted when the operation holding it ends
            try:
                os.unlink(p)
                total -= size
            except OSError:
                pass
            for side in (".ok", ".sha"):
                with contextlib.suppress(OSError):
                    os.unlink(p + side)
        if total > self.max_size:
            with self._lock:
                self._over = True
                warn, self._warned_small = not self._warned_small, True
            if warn:
                logger.warning(
                    "%s (%d bytes) is smaller than the references in use (%d bytes): they "
                    "are kept only while in use and fetched again each time",
                    _ENV_CACHE_MAX,
                    self.max_size,
                    total,
                )

    def clear(self) -> None:
        shutil.rmtree(os.path.join(self.folder, "refs"), ignore_errors=True)
        with self._lock:
            self._verified.clear()


#: A download's unhashed copy of a reference, beside its entry (``_ReferenceCache``).
_UNHASHED = ".u"
#: The empty file saying a read wanted a reference that was not kept (``_ReferenceCache``).
_WANTED = ".w"
#: A mark older than this is forgotten (``_ReferenceCache._evict``).
_WANTED_FOR = 30 * 86400


def _stamp_of(st: os.stat_result) -> str:
    return "%d %d %d" % (st.st_size, st.st_mtime_ns, st.st_ino)


class _HashingWriter:
    """A write-through file wrapper that hashes (SHA-256) and counts what passes."""

    def __init__(self, f: Any) -> None:  # a file, or anything with write()
        import hashlib

        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self._f.write(data)
        return len(data)

    def flush(self) -> None:
        if hasattr(self._f, "flush"):
            self._f.flush()


#: xdelta3's default target window (XD3_DEFAULT_WINSIZE, 8 MiB): a zero-diff delta copies
#: the reference in windows of this size, as xdelta3 itself would.
_ZERO_DIFF_WINDOW = 1 << 23


def _vcdiff_int(n: int) -> bytes:
    """RFC 3284 section 2: base-128, most significant digit first, high bit = more."""
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def _zero_diff_delta(size: int) -> bytes:
    """The VCDIFF delta (RFC 3284) of a file against itself, written directly: xdelta3
    would read and match the whole file to find that out, most of a first upload's time.
    Each window (section 4.2) has VCD_SOURCE set, its source segment is the same span of
    the reference, and one COPY of that segment: code 19 of the default code table
    (section 5.6: COPY, size in the instruction section, mode 0 = VCD_SELF) with address
    0. No secondary compression, no checksum: any VCDIFF decoder reads it."""
    parts = [b"\xd6\xc3\xc4\x00\x00"]  # magic "VCD", version 0, Hdr_Indicator 0
    pos = 0
    while pos < size:
        n = min(_ZERO_DIFF_WINDOW, size - pos)
        inst = b"\x13" + _vcdiff_int(n)
        addr = b"\x00"
        body = b"".join(
            (_vcdiff_int(n), b"\x00", b"\x00", _vcdiff_int(len(inst)), b"\x01", inst, addr)
        )  # target size, Delta_Indicator, data/inst/addr section lengths, sections
        parts += [b"\x01", _vcdiff_int(n), _vcdiff_int(pos), _vcdiff_int(len(body)), body]
        pos += n
    return b"".join(parts)


def _is_zip(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _rebuild_zip(
    expanded: str, out: Any, reference: str, want: str, limit: int | None = None
) -> str:
    """Rebuild a zip from its expanded form into ``out`` (a file or a sink), copying
    unchanged members from ``reference``; if that gives other bytes than the SHA-256
    ``want``, again deflating every member. Returns the SHA-256 written ("" if the
    stream does not rebuild). More than ``limit`` bytes: _OutputLimitError."""
    for ref in (reference, None):
        sink = _HashingWriter(out)
        if hasattr(out, "seek"):
            out.seek(0)
            out.truncate()
        try:
            with open(expanded, "rb") as f:
                _zip_rebuild(f, sink, ref, limit)
        except _ZipCodecError:
            continue
        if sink.sha256.hexdigest() == want:
            break
    else:
        return ""
    return sink.sha256.hexdigest()


def _rebuilt_sha256(expanded: str, reference: str, want: str) -> str:
    """The SHA-256 of the file an expanded zip rebuilds to ("" if it does not)."""
    return _rebuild_zip(expanded, _NullWriter(), reference, want)


class _NullWriter:
    def write(self, data: bytes | bytearray) -> int:
        return len(data)


def _copy_hashing(source: str, dest: str) -> str:
    """Copy a file; returns the SHA-256 of the bytes written."""
    with open(source, "rb") as src, open(dest, "wb") as f:
        return _Hashes().read(src, each=f.write).info().sha256


def _tee_delta(delta: IO[bytes], sink: IO[bytes], decoder: IO[bytes]) -> None:
    """Copy an encoder's output into ``sink`` and into the checking decoder as it comes:
    os.read gives what the encoder wrote so far, where a buffered read would wait for a
    full 1 MiB (a whole delta often is less), so the decoder gets each window as it is
    made. A decoder that failed is fed no more (its exit code says why)."""
    feeding = True
    with delta:
        for chunk in iter(lambda: os.read(delta.fileno(), _IO_CHUNK), b""):
            sink.write(chunk)
            if feeding:
                try:
                    decoder.write(chunk)
                    decoder.flush()
                except (BrokenPipeError, ValueError):
                    feeding = False
    try:
        decoder.close()
    except BrokenPipeError:
        pass


def _compare_stream(decoded: IO[bytes], original: IO[bytes] | _ReadAhead) -> int | None:
    """Read ``decoded`` to its end, comparing it byte for byte with ``original`` (read
    in step, once). None when they are the same bytes, else the offset of the first
    difference (``decoded`` is still read to its end, so its writer finishes and its
    exit code tells whether it failed)."""
    pos = 0
    while True:
        chunk = decoded.read(_IO_CHUNK)
        if not chunk:
            break
        piece = original.read(len(chunk))
        if piece != chunk:
            same = min(len(piece), len(chunk))
            same = next((i for i in range(same) if piece[i] != chunk[i]), same)
            for _ in iter(lambda: decoded.read(_IO_CHUNK), b""):
                pass
            return pos + same
        pos += len(chunk)
    return pos if original.read(1) else None


class _Logical(NamedTuple):
    """A logical object as a reader sees it, and how it is stored."""

    bucket: str
    key: str  # the logical name
    stored_key: str  # ``key`` or ``key.delta``
    kind: str
    head: dict[str, Any]  # HeadObject of the stored object
    metadata: dict[str, str]  # its raw user metadata

    @property
    def size(self) -> int:
        if self.kind in (_Kind.DELTA, _Kind.DIRECT):
            value = _meta_get(self.metadata, "file_size")
            if value and value.isdigit():
                return int(value)
        return int(self.head.get("ContentLength", 0))

    @property
    def sha256(self) -> str | None:
        if self.kind == _Kind.FOREIGN:
            return None
        return _meta_get(self.metadata, "file_sha256")

    @property
    def etag(self) -> str:
        """The logical ETag: MD5 of the original bytes, as S3 reports for a single PUT."""
        md5 = _meta_get(self.metadata, "md5")
        if md5:
            return '"%s"' % md5
        if self.kind == _Kind.DELTA:
            sha = self.sha256 or ""
            return '"%s"' % sha[:32]  # older writers kept no MD5; stable, not an MD5
        return str(self.head.get("ETag", ""))

    @property
    def content_type(self) -> str:
        value = self.metadata.get(_CONTENT_TYPE_META)
        if value:
            return _meta_decode(value)
        if self.kind == _Kind.DELTA:
            return "binary/octet-stream"
        return str(self.head.get("ContentType", "binary/octet-stream"))


class _References:
    """Where a bucket's references are, which one a file is encoded against, and when
    one may go (FORMAT.md "Where a reference may live", "Deleting"): the folder's own
    reference.bin, or shared references beside the folders that use them."""

    def __init__(
        self,
        storage: _Storage,
        *,
        cache: _ReferenceCache,
        xdelta: _XDelta3,
        now: Callable[[], datetime.datetime] = _utcnow,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.storage = storage
        self.cache = cache
        self.xdelta = xdelta
        self._now = now
        self._sleep = sleep
        self._tool = "deltaglider/" + __version__
        self._space_locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # (bucket, reference.bin key or shared-references prefix) → (when, what was found)
        self._looked: dict[tuple[str, str], tuple[float, Any]] = {}

    # -- choosing and making references -------------------------------------------

    def local_copy(
        self,
        bucket: str,
        ref_key: str,
        ref_sha256: str,
        on_fetch: Callable[[], None] | None = None,
        tee: Callable[[memoryview], Any] | None = None,
        verify: bool = True,
    ) -> str:
        """A verified local copy of a reference: from the cache, or fetched once (after
        calling ``on_fetch``: work that can use the wait), its bytes given to ``tee`` too
        as they come (unverified until this returns). ``verify=False`` (a download: it
        checks what it makes) may give, or fetch, the cache's unhashed copy instead."""
        path = self.cache.lookup(ref_sha256)
        if path:
            return path
        path = self.cache.unhashed(ref_sha256) if not verify else self.cache.promote(ref_sha256)
        if path:
            return path
        if on_fetch is not None:
            on_fetch()

        def write(f: IO[bytes]) -> None:
            def both(data: memoryview) -> None:
                f.write(data)
                if tee is not None:
                    tee(data)

            _get_into(self.storage, bucket, ref_key, both, hold=self.xdelta.memory.hold)

        try:
            return self.cache.fill(ref_sha256, write, verify)
        except IntegrityError as e:
            raise IntegrityError(
                "reference s3://%s/%s does not match the SHA-256 its deltas were made "
                "against (%s)" % (bucket, ref_key, e)
            ) from None

    def read_copy(
        self, bucket: str, ref_key: str, ref_sha256: str, tee: Callable[[memoryview], Any]
    ) -> str | None:
        """For a read that checks what it makes: the cached copy of a reference, or, when
        none is here, the reference fetched with its bytes given to ``tee``, kept (as
        ``local_copy(verify=False)``) only if a read wanted it before
        (``_ReferenceCache.want``); None when it was not kept."""
        path = self.cache.lookup(ref_sha256) or self.cache.unhashed(ref_sha256)
        if path or self.cache.want(ref_sha256):
            return path or self.local_copy(bucket, ref_key, ref_sha256, tee=tee, verify=False)
        _get_into(self.storage, bucket, ref_key, tee, hold=self.xdelta.memory.hold)
        self.cache.count_fetch()
        return None

    def space_lock(self, bucket: str, space: str) -> threading.Lock:
        """One reference decision at a time per deltaspace within this process; across
        processes and machines the conditional create decides."""
        with self._locks_lock:
            return self._space_locks.setdefault((bucket, space), threading.Lock())

    def current(self, bucket: str, ref_key: str, settle: bool = False) -> str | None:
        """The SHA-256 of the deltaspace's reference, or None when there is none.

        ``settle``: on a server that ignores If-None-Match, racing first writers all PUT
        a reference and the last one stays; so there a reference younger than a few
        seconds (by the server's own Date and Last-Modified) is waited on until that race
        is over. Where the create is conditional, losers learn it from the 412 (or, on a
        server that checks it loosely, from the check after their delta is stored)."""
        while True:
            try:
                head = self.storage.head_object(bucket, ref_key)
            except ClientError as e:
                if _is_not_found(e):
                    return None
                raise
            wait = self._settle_left(head) if settle else 0.0
            # Only a young reference on a server that ignores If-None-Match is waited on;
            # the probe that tells (a few requests, once per bucket) runs only then.
            if wait <= 0 or self.storage.supports_conditional_writes(bucket):
                break
            logger.debug("s3://%s/%s is %.1f s from settled; waiting", bucket, ref_key, wait)
            self._sleep(wait)
        sha = _meta_get(head.get("Metadata", {}), "file_sha256")
        if not sha:
            raise IntegrityError(
                "s3://%s/%s has no dg-file-sha256: it was not written by deltaglider; "
                "move it away to store deltas in this folder" % (bucket, ref_key)
            )
        return sha

    @staticmethod
    def _settle_left(head: Mapping[str, Any]) -> float:
        headers = head.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        modified = head.get("LastModified")
        try:
            server_now = _parse_timestamp(headers["date"])
        except (KeyError, ValueError):
            return 0.0
        if not isinstance(modified, datetime.datetime):
            return 0.0
        age = (server_now - modified).total_seconds()
        return max(0.0, _REFERENCE_SETTLE - age)

    def ensure(
        self,
        path: str,
        bucket: str,
        ref_key: str,
        name: str,
        file_info: Callable[[], _FileInfo],
        on_bytes: Callable[[int], None] | None = None,
    ) -> tuple[str, str, bool]:
        """(reference sha256, local path, created by us) for a deltaspace. A cached
        reference is trusted by its stamp here; the caller checks it with
        ``cache.check`` before storing anything made from it."""
        vanished = False
        for _ in range(5):
            sha = self.current(bucket, ref_key, settle=True)
            if sha is None:
                # Hash first (the file may still be hashing), then look again: the HEAD
                # that finds no reference must come right before the PUT that creates
                # one, or a racer's reference is overwritten (servers that ignore
                # If-None-Match; those that honour it refuse ours instead).
                file_info()
                sha = self.current(bucket, ref_key, settle=True)
            if sha is not None:
                try:
                    return sha, self.local_copy(bucket, ref_key, sha), False
                except IntegrityError:
                    # Replaced between our HEAD and GET (a server without conditional
                    # writes, racing writers): look again; a real corruption raises.
                    if self.current(bucket, ref_key) != sha:
                        continue
                    raise
                except ClientError as e:
                    if not _is_not_found(e):
                        raise
                    # Deleted between our HEAD and GET: the folder's last file was
                    # removed meanwhile, and its reference with it. Look once more (this
                    # file then becomes the new reference).
                    if vanished:
                        raise DeltaGliderError(
                            "s3://%s/%s was deleted twice while this upload was reading it "
                            "(is something removing this folder's files at the same "
                            "time?); nothing was stored" % (bucket, ref_key)
                        ) from None
                    vanished = True
                    logger.info("s3://%s/%s was deleted meanwhile; looking again", bucket, ref_key)
                    continue
            info = file_info()
            conditional = self.storage.supports_conditional_writes(bucket)
            meta = self._reference_metadata(name, info)
            # From the moment the PUT starts (an interrupted PUT may still complete on
            # the server) until the caller stores the first delta, any failure or Ctrl-C
            # removes the reference again: none is left without its first delta.
            try:
                try:
                    _put_path(
                        self.storage,
                        bucket,
                        ref_key,
                        path,
                        metadata=meta,
                        sha256=info.sha256,
                        if_none_match=conditional,
                        on_bytes=on_bytes,
                    )
                except ClientError as e:
                    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if status in (409, 412):  # another writer created it first: use theirs
                        continue
                    raise
                # Verify after write, once the reference has settled: on a server that
                # ignores If-None-Match, or (Swift) checks it without a lock, racing
                # creators all "win" and the last PUT stays; the others use that one.
                sha = self.current(bucket, ref_key, settle=not conditional)
                if sha != info.sha256:
                    continue
                return info.sha256, self.cache.add_file(info.sha256, path), True
            except BaseException:
                self.discard(bucket, ref_key, info.sha256)
                raise
        raise DeltaGliderError("s3://%s/%s keeps changing; giving up" % (bucket, ref_key))

    def _reference_metadata(self, name: str, info: _FileInfo) -> dict[str, str]:
        return {
            "dg-tool": self._tool,
            "dg-source-name": _meta_encode(name),
            "dg-original-name": _meta_encode(name),
            "dg-file-sha256": info.sha256,
            "dg-file-size": str(info.size),
            "dg-md5": info.md5,
            "dg-created-at": _iso_utc(self._now()),
            "dg-note": "reference",
        }

    def pick(self, bucket: str, space: str, name: str, size: int) -> tuple[str, str, bool] | None:
        """The one place a reference is chosen (DG_REFERENCES=shared): (key, sha256, of the
        same series) of the best existing reference for a file, or None when none fits.

        Candidates: the folder's own reference.bin (6.2.0's layout) and the shared
        references of the folder's parent (one listing: the versions in sibling folders,
        and the earlier references of this folder). A candidate must be of a similar size;
        the best has the most alike name (same name, then the same but for version
        numbers, then the same extension; the folder's own reference.bin may be unrelated,
        as it always could), then is the newest, then the closest in size."""
        best: tuple[tuple[Any, ...], str, str, bool] | None = None

        def consider(
            key: str, sha: str, source: str, csize: int, modified: Any, own: bool, rel: str
        ) -> None:
            nonlocal best
            if not sha or csize <= 0 or size <= 0:
                return
            ratio = csize / size
            if not 1.0 / _SIMILAR_SIZE <= ratio <= _SIMILAR_SIZE:
                return
            cls = _name_class(name, source)
            if cls == 0 and not own:
                return
            when = modified.timestamp() if isinstance(modified, datetime.datetime) else 0.0
            # Within a second (Last-Modified's resolution), the highest version by name.
            natural = [
                (0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(_SPLIT_RE, rel)
            ]
            rank = (cls, when, natural, -abs(math.log(ratio)))
            if best is None or rank > best[0]:
                best = (rank, key, sha, cls >= 2)

        own_key = _reference_key(space)
        prefix = _refs_prefix(_parent_space(space))
        head, listed = self._look(bucket, own_key, prefix)
        if head is not None:
            meta = head.get("Metadata", {})
            consider(
                own_key,
                _meta_get(meta, "file_sha256") or "",
                _meta_decode(_meta_get(meta, "original_name") or ""),
                int(head.get("ContentLength", 0)),
                head.get("LastModified"),
                True,
                _meta_decode(_meta_get(meta, "original_name") or ""),
            )
        for key, csize, modified in listed:
            parts = key[len(prefix) :].rsplit("/", 2)
            if len(parts) == 3 and parts[2] == _REFERENCE_NAME and len(parts[1]) == 64:
                source = _meta_decode(parts[0].rsplit("/", 1)[-1])
                consider(key, parts[1], source, csize, modified, False, _meta_decode(parts[0]))
        return None if best is None else best[1:]

    def _look(
        self, bucket: str, own_key: str, prefix: str
    ) -> tuple[dict[str, Any] | None, list[tuple[str, int, Any]]]:
        """pick's two reads: the folder's reference.bin (HEAD, None when there is none) and
        (key, size, Last-Modified) of the parent's shared references, each as this process
        read it less than _REF_LOOKUP_TTL ago, else read now (the two at once)."""
        began = time.monotonic()
        with self._locks_lock:
            own, listed = (self._looked.get((bucket, k)) for k in (own_key, prefix))
        own = own if own is not None and began - own[0] < _REF_LOOKUP_TTL else None
        listed = listed if listed is not None and began - listed[0] < _REF_LOOKUP_TTL else None
        if own is None:
            head = _Background(self._head_or_none, bucket, own_key)  # while the listing runs
        if listed is None:
            pages = _list_pages(self.storage, bucket, prefix=prefix)
            found = [
                (o["Key"], o["Size"], o.get("LastModified"))
                for page in itertools.islice(pages, _REF_LIST_PAGES)
                for o in page.get("Contents", [])
            ]
            listed = (began, found)
            with self._locks_lock:
                self._looked[(bucket, prefix)] = listed
        if own is None:
            own = (began, head.result())
            with self._locks_lock:
                self._looked[(bucket, own_key)] = own
        with self._locks_lock:  # new_shared adds to it
            return own[1], list(listed[1])

    def forget(self, bucket: str) -> None:
        """Look at the bucket's references afresh at the next picks (one went, or was not
        what a lookup said)."""
        with self._locks_lock:
            for k in [k for k in self._looked if k[0] == bucket]:
                del self._looked[k]

    def _head_or_none(self, bucket: str, key: str) -> dict[str, Any] | None:
        try:
            return self.storage.head_object(bucket, key)
        except ClientError as e:
            if _is_not_found(e):
                return None
            raise

    def new_shared(
        self,
        path: str,
        bucket: str,
        ref_key: str,
        name: str,
        info: _FileInfo,
        on_bytes: Callable[[int], None] | None = None,
    ) -> str:
        """Store a file as a shared reference; returns its cached copy. The key holds the
        SHA-256, so racing writers of the same file write the same bytes. The next picks
        of this process see it without listing again (_look)."""
        resp = _put_path(
            self.storage,
            bucket,
            ref_key,
            path,
            metadata=self._reference_metadata(name, info),
            sha256=info.sha256,
            on_bytes=on_bytes,
        )
        try:  # stored now, by the server's clock (as its listing would say)
            stored = _parse_timestamp(resp["ResponseMetadata"]["HTTPHeaders"]["date"])
        except (KeyError, TypeError, ValueError):
            stored = _utcnow()
        with self._locks_lock:
            looked = self._looked.get((bucket, _refs_prefix(_shared_ref_parent(ref_key))))
            if looked is not None:
                looked[1].append((ref_key, info.size, stored))
        return self.cache.add_file(info.sha256, path)

    # -- removing references that nothing needs -----------------------------------

    def discard(self, bucket: str, ref_key: str, sha256: str) -> None:
        try:
            if self.current(bucket, ref_key) == sha256:
                self.drop(bucket, ref_key)
        except (ClientError, DeltaGliderError, OSError) as e:
            logger.warning("could not remove s3://%s/%s: %s", bucket, ref_key, e)

    def drop(self, bucket: str, ref_key: str) -> bool:
        """Delete a reference if no delta needs it (and that is cheap to prove)."""
        if not _is_shared_ref(ref_key):
            return self.drop_unused(bucket, _deltaspace(ref_key))
        parent = _shared_ref_parent(ref_key)
        return bool(self.drop_unused_shared(bucket, parent, {ref_key}, _REF_SCAN_LIMIT))

    def drop_unused_near(self, bucket: str, spaces: Iterable[str]) -> None:
        """After deltas of ``spaces`` went (without reading them first): each one's own
        reference.bin, and the shared references of their parents, if nothing needs them."""
        spaces = sorted(set(spaces))
        for space in spaces:
            self.drop_unused(bucket, space)
        for parent in sorted({_parent_space(space) for space in spaces}):
            refs = {k for k, _ in self.shared_references(bucket, parent)}
            if refs:
                self.drop_unused_shared(bucket, parent, refs, _REF_SCAN_LIMIT)

    def shared_references(self, bucket: str, parent: str, under: str = "") -> list[tuple[str, int]]:
        """(key, size) of ``parent``'s shared references (those made from files whose
        path below ``parent`` starts with ``under``)."""
        out: list[tuple[str, int]] = []
        for o in _stored_objects(self.storage, bucket, _refs_prefix(parent) + under):
            if _is_shared_ref(o["Key"]):
                out.append((o["Key"], o["Size"]))
        return out

    def _shared_ref_users(
        self, bucket: str, parent: str, refs: set[str], limit: int | None
    ) -> set[str] | None:
        """Which of ``refs`` (shared references of ``parent``) a delta still names; None
        when proving it would take more than ``limit`` requests.

        Only the files of ``parent``'s sub-folders (and of the root, for the root's) use
        them: first each reference's own source file is looked at (it needs its reference
        as long as it exists), then, for the rest, every delta in those folders."""
        used: set[str] = set()
        spent = 0

        def spend() -> bool:
            nonlocal spent
            spent += 1
            return limit is None or spent <= limit

        def names(stored: str) -> str | None:
            try:
                meta = self.storage.head_object(bucket, stored).get("Metadata", {})
            except ClientError as e:
                if _is_not_found(e):
                    return None
                raise
            ref = _meta_get(meta, "ref")
            return _resolve_ref_key(stored, ref) if ref else None

        for ref in sorted(refs):
            if not spend():
                return None
            if names(_shared_ref_source(ref) + _DELTA_SUFFIX) == ref:
                used.add(ref)
        if used == refs:
            return used
        folders: list[str] = []
        deltas: list[str] = []
        prefix = parent + "/" if parent else ""
        for top in (True, False):
            queue = [prefix] if top else folders
            for folder in list(queue):
                for page in _list_pages(self.storage, bucket, prefix=folder, delimiter="/"):
                    if not spend():
                        return None
                    if top:
                        folders += [
                            p["Prefix"]
                            for p in page.get("CommonPrefixes", [])
                            if not _is_internal(p["Prefix"])
                        ]
                    if not top or not parent:  # the root's own files use the root's references
                        deltas += [
                            o["Key"]
                            for o in page.get("Contents", [])
                            if o["Key"].endswith(_DELTA_SUFFIX)
                        ]
        for stored in deltas:
            if not spend():
                return None
            named = names(stored)
            if named is not None and named in refs:
                used.add(named)
                if used == refs:
                    break
        return used

    def drop_unused_shared(
        self,
        bucket: str,
        parent: str,
        refs: set[str],
        limit: int | None,
        dry_run: bool = False,
    ) -> list[str]:
        """Delete those of ``refs`` that no delta names; returns them. As for a folder's
        reference: copied aside first, and put back if a delta names it after all (a
        writer that stored one meanwhile; writers also check their reference after)."""
        used = self._shared_ref_users(bucket, parent, refs, limit)
        if used is None:
            return []
        dropped: list[str] = []
        for ref_key in sorted(refs - used):
            if dry_run:
                dropped.append(ref_key)
                continue
            aside = "%s%s.bin" % (_ASIDE_PREFIX, _random_hex())
            try:
                self.storage.copy_object(bucket, aside, bucket, ref_key)
            except ClientError as e:
                if not _is_not_found(e):
                    raise
                continue  # gone already
            try:
                self.forget(bucket)
                self.storage.delete_object(bucket, ref_key)
                if self._shared_ref_users(bucket, parent, {ref_key}, limit) != set():
                    if self.current(bucket, ref_key) is None:
                        self.storage.copy_object(bucket, ref_key, bucket, aside)
                        logger.info("s3://%s/%s is still needed; restored it", bucket, ref_key)
                    continue
                dropped.append(ref_key)
            finally:
                self.storage.delete_object(bucket, aside)
        return dropped

    def _space_has_deltas(self, bucket: str, space: str) -> bool:
        prefix = space + "/" if space else ""
        for page in _list_pages(self.storage, bucket, prefix=prefix, delimiter="/"):
            if any(o["Key"].endswith(_DELTA_SUFFIX) for o in page.get("Contents", [])):
                return True
        return False

    def drop_unused(self, bucket: str, space: str) -> bool:
        """Delete ``space``'s reference.bin if no delta in the deltaspace needs it.

        A writer may store a delta between our listing and the delete; so the reference
        is first copied aside (server side), and put back if a delta shows up after."""
        ref_key = _reference_key(space)
        if _is_shared_ref(ref_key):  # needed by deltas elsewhere: proved another way
            return self.drop(bucket, ref_key)
        if self._space_has_deltas(bucket, space):
            return False
        aside = "%s%s.bin" % (_ASIDE_PREFIX, _random_hex())
        try:
            self.storage.copy_object(bucket, aside, bucket, ref_key)
        except ClientError as e:
            if not _is_not_found(e):
                raise
            return False  # no reference (any more)
        try:
            self.forget(bucket)
            self.storage.delete_object(bucket, ref_key)
            if self._space_has_deltas(bucket, space) and self.current(bucket, ref_key) is None:
                self.storage.copy_object(bucket, ref_key, bucket, aside)
                logger.info(
                    "a delta arrived in %s while its reference was deleted; restored it",
                    space or "/",
                )
                return False
            return True
        finally:
            self.storage.delete_object(bucket, aside)

    def gc(self, bucket: str, prefix: str = "", dry_run: bool = False) -> dict[str, Any]:
        """Remove the references under ``prefix`` (a folder) that no delta needs, proving
        it however many requests that takes; returns what it removed."""
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        sizes: dict[str, int] = {}
        for obj in _stored_objects(self.storage, bucket, prefix):
            if _is_reference(obj["Key"]):
                sizes[obj["Key"]] = obj["Size"]
        if prefix:
            # The folder's own files keep theirs beside it, in its parent.
            space = prefix[:-1]
            parent = _parent_space(space)
            folder = space[len(parent) + 1 :] if parent else space
            sizes.update(self.shared_references(bucket, parent, folder + "/"))
        removed: list[str] = []
        parents: dict[str, set[str]] = {}
        for ref in sorted(sizes):
            if _is_shared_ref(ref):
                parents.setdefault(_shared_ref_parent(ref), set()).add(ref)
            elif not self._space_has_deltas(bucket, _deltaspace(ref)):
                if dry_run or self.drop_unused(bucket, _deltaspace(ref)):
                    removed.append(ref)
        for parent, found in sorted(parents.items()):
            removed += self.drop_unused_shared(bucket, parent, found, None, dry_run)
        removed.sort()
        return {
            "Removed": [{"Key": k, "Size": sizes[k]} for k in removed],
            "Kept": len(sizes) - len(removed),
            "BytesFreed": sum(sizes[k] for k in removed),
            "DryRun": dry_run,
        }


class _Upload(NamedTuple):
    """One file being stored under a logical key (put_file): what each step of a delta
    or a direct upload needs."""

    path: str
    bucket: str
    key: str
    name: str  # the file name (the key's last segment): dg-original-name
    headers: dict[str, str]  # to send with the object, Content-Type apart
    content_type: str | None
    metadata: Mapping[str, str] | None  # the caller's, stored as user-<name>
    mtime: float | None  # the source file's, for sync: dg-mtime
    max_ratio: float  # a larger delta (against the file's size) is stored whole instead
    required: bool  # a delta whatever its size (a key ending in .delta: _delta_only)
    on_bytes: Callable[[int], None] | None  # progress
    hashing: _FileHashing | None  # the file's _FileInfo, taken by one pass
    given: _FileInfo | None  # or the caller's
    create_only: bool  # the stored form goes up with If-None-Match: * (put_file)
    checksum: tuple[str, str] | None = None  # (algo, base64) the caller's x-amz-checksum
    parts: Sequence[int] = ()  # the sizes of the parts it was uploaded in: dg-parts
    upload: str | None = None  # the multipart upload it completes: dg-upload

    def info(self) -> _FileInfo:
        """The file's size, SHA-256 and MD5 (waiting for the hashing if it still runs)."""
        if self.hashing is None:
            assert self.given is not None
            return self.given
        return self.hashing.result()


class _FileHashing:
    """The SHA-256, MD5 and size of an upload's file, from one pass over it: the delta
    check's, which reads the file anyway to compare it with the decoded delta (``take``),
    or else a pass of its own, begun by the first step that needs the digests
    (``result``) or that leaves a core idle meanwhile (``start``: a reference fetched)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._job: _Background | None = None
        self._value: _FileInfo | None = None
        self._taken = False

    def start(self, force: bool = False) -> None:
        with self._lock:
            if self._job is None and self._value is None and (force or not self._taken):
                self._job = _Background(_hash_file, self._path, True)

    def take(self) -> _Hashes | None:
        """Digests for the caller's pass over the file (then ``give``), or None when a
        pass has begun already."""
        with self._lock:
            if self._job is not None or self._value is not None or self._taken:
                return None
            self._taken = True
            return _Hashes(md5=True)

    def give(self, hashes: _Hashes | None) -> None:
        """The taken pass read the whole file into ``hashes``, or stopped short (None:
        a pass of its own is made when the digests are needed)."""
        with self._lock:
            self._taken = False
            if hashes is not None:
                self._value = hashes.info()

    def result(self) -> _FileInfo:
        self.start(force=True)  # (a taken pass gives before its taker asks)
        if self._value is not None:
            return self._value
        assert self._job is not None
        info: _FileInfo = self._job.result()
        return info


def _encode_plain(xdelta: _XDelta3, up: _Upload, ref_path: str, delta_tmp: str) -> tuple[str, int]:
    """xdelta3's delta of the file, checked as it is made: decoded and compared byte for
    byte with the file. That comparison is also the upload's one pass over the file
    for its digests, unless one began already (then the bytes compared are hashed too,
    and held to those digests). Returns the (SHA-256, size) the delta decodes to."""
    taken = up.hashing.take() if up.hashing is not None else None
    hashes = taken or _Hashes()
    whole = False
    try:
        differs = xdelta.encode_verified(ref_path, up.path, delta_tmp, hashes)
        whole = differs is None
    finally:
        if up.hashing is not None and taken is not None:
            up.hashing.give(taken if whole else None)
    if differs is not None:
        return "other bytes (from byte %d on)" % differs, -1
    decoded = hashes.info()
    return decoded.sha256, decoded.size


class _Looks:
    """Whether stored keys exist: HEADs made at once, each on a thread of its own, from
    ``start`` on; a key not started is looked up when asked for."""

    def __init__(self, exists: Callable[[str], bool]) -> None:
        self._exists = exists
        self._jobs: dict[str, _Background] = {}

    def start(self, keys: Sequence[str]) -> None:
        self._jobs = {key: _Background(self._exists, key) for key in keys}

    def __call__(self, key: str) -> bool:
        job = self._jobs.get(key)
        return bool(job.result()) if job is not None else self._exists(key)


class _RefChoice:
    """The reference one attempt of a delta upload encodes against."""

    __slots__ = ("created", "key", "path", "series", "sha256")

    def __init__(self, key: str) -> None:
        self.key = key
        self.sha256 = ""
        self.path = ""  # its local copy (in the cache)
        self.created = False  # stored by this upload: removed again if the upload fails
        self.series = False  # made from a file of the same series (so it may be healed)


class _ArchiveDeltas:
    """Archive-aware mode's two sides (README, "Archive-aware deltas"): on upload, the
    delta between the expanded forms of two zips (_zip_expand), made and checked; on
    download, that delta decoded and the zip's exact bytes rebuilt from it."""

    def __init__(self, cache: _ReferenceCache, xdelta: _XDelta3) -> None:
        self.cache = cache
        self.xdelta = xdelta

    def encode(
        self,
        ref_sha: str,
        ref_path: str,
        ref_check: _Background | None,
        path: str,
        delta_tmp: str,
        tmp_dir: str,
        file_info: Callable[[], _FileInfo],
    ) -> dict[str, str] | None:
        """The delta between the expanded forms of two zips, checked twice before it is stored: it
        decodes to the expanded file, and that rebuilds the original bytes here. Returns
        the metadata that marks it, or None for a plain delta (not zips, or a zip whose
        expanded form does not rebuild it)."""
        if not (_is_zip(path) and _is_zip(ref_path)):
            return None
        if ref_check is not None and not ref_check.result():
            return None  # the caller fetches the reference again
        xref = self.cache.derived(
            ref_sha, _EXPANDED_SUFFIX, lambda f: _zip_expand(ref_path, f), strict=True
        )
        if xref is None:
            return None
        fd, expanded = _private_tempfile(tmp_dir, ".zx")
        try:
            with os.fdopen(fd, "wb") as f:
                writer = _HashingWriter(f)
                if not _zip_expand(path, writer):
                    return None
            rebuilt = _Background(_rebuilt_sha256, expanded, ref_path, file_info().sha256)
            hashes = _Hashes()
            differs = self.xdelta.encode_verified(xref[0], expanded, delta_tmp, hashes)
            decoded = hashes.info()
            expected = (writer.sha256.hexdigest(), writer.size)
            if differs is not None or (decoded.sha256, decoded.size) != expected:
                raise IntegrityError(
                    "%s: the delta xdelta3 made does not decode to the expanded input; "
                    "nothing was stored" % path
                )
            info = file_info()
            if rebuilt.result() != info.sha256:
                logger.warning(
                    "%s: its expanded form does not rebuild it exactly here; storing a plain delta",
                    path,
                )
                return None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(expanded)
        return {
            "dg-codec": _CODEC_ZIP,
            "dg-xref-sha256": xref[1],
            "dg-expanded-size": str(writer.size),
        }

    def rebuild(
        self,
        lg: _Logical,
        codec: str,
        ref_sha: str,
        ref_path: str,
        delta: str,
        out: str,
        limit: int,
        tmp_dir: str,
    ) -> str:
        """A delta between expanded zips (archive-aware mode): decode it against the
        expanded reference, then rebuild the zip's exact bytes. Returns their SHA-256.
        The expanded form is bounded by the size the writer recorded (dg-expanded-size),
        or else by the most a zip of ``limit`` bytes can expand to; the zip by ``limit``."""
        where = "s3://%s/%s" % (lg.bucket, lg.stored_key)
        if codec != _CODEC_ZIP:
            raise IntegrityError(
                "%s: made with codec %r, which this deltaglider (%s) does not know; "
                "upgrade it" % (where, codec, __version__)
            )
        want = _meta_get(lg.metadata, "xref_sha256")
        xref = None
        if want:
            # Most zips are deflated with zlib's defaults throughout: expanding on that
            # assumption skips the re-deflating, and the writer's SHA-256 says if it held.
            xref = self.cache.derived(
                ref_sha,
                _EXPANDED_SUFFIX,
                lambda f: _zip_expand(ref_path, f, assume=_ZIPX_CANDIDATES[0]),
                strict=False,
            )
            if xref is not None and xref[1] != want:
                self.cache.drop_derived(ref_sha, _EXPANDED_SUFFIX)
                xref = None
        if xref is None:
            xref = self.cache.derived(
                ref_sha, _EXPANDED_SUFFIX, lambda f: _zip_expand(ref_path, f), strict=False
            )
        if xref is None or (want and xref[1] != want):
            raise IntegrityError(
                "%s: its reference expands differently here than where the delta was made "
                "(zlib %s); read it where it was written, or store it again without "
                "--archive-aware" % (where, zlib.ZLIB_RUNTIME_VERSION)
            )
        xsize = _meta_get(lg.metadata, "expanded_size") or ""
        if xsize.isdigit():
            xlimit, what = int(xsize), "dg-expanded-size"
        else:  # written before dg-expanded-size was recorded
            xlimit, what = _ZIPX_EXPANSION * limit + 64, "what dg-file-size can expand to"
        fd, expanded = _private_tempfile(tmp_dir, ".zx")
        try:
            with os.fdopen(fd, "wb") as f:
                try:
                    self.xdelta.decode_sha256(xref[0], delta, f, limit=xlimit)
                except _OutputLimitError:
                    raise _OutputLimitError(xlimit, "%s of %s" % (what, where)) from None
            with open(out, "w+b") as dst:
                actual = _rebuild_zip(expanded, dst, ref_path, lg.sha256 or "", limit)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(expanded)
        if not actual:
            raise IntegrityError(
                "%s: the zip does not rebuild here (zlib %s deflates differently from the "
                "writer's?)" % (where, zlib.ZLIB_RUNTIME_VERSION)
            )
        return actual


class _DeltaEngine:
    """Logical objects on top of a storage: writes choose delta or direct as FORMAT.md
    says, reads rebuild and verify, deletes keep references consistent.

    Its public boundary is what the client and the CLI call (everything with a leading
    underscore is the engine's own): the attributes ``storage``, ``cache``,
    ``references``; ``head``, ``get_to_file``, ``rebuild``, ``fetch_plain`` and
    ``exists`` to read; ``put_file`` (``key_lock`` around a conditional one) to write;
    ``delete``, ``delete_prefix``, ``drop_unused_near`` and ``gc`` to remove; ``tmp_dir``
    for scratch files. Which reference a file is encoded against, and when one may go,
    is ``refs`` (_References)."""

    def __init__(
        self,
        storage: _Storage,
        *,
        cache: _ReferenceCache,
        xdelta: _XDelta3,
        max_ratio: float = _DEFAULT_MAX_RATIO,
        environ: Mapping[str, str] = os.environ,
        now: Callable[[], datetime.datetime] = _utcnow,
        sleep: Callable[[float], None] = time.sleep,
        archive_aware: bool = False,
        references: str = _REFERENCES_SHARED,
    ) -> None:
        self.refs = _References(storage, cache=cache, xdelta=xdelta, now=now, sleep=sleep)
        self.references = references
        self.cache = cache
        self.xdelta = xdelta
        self.max_ratio = max_ratio
        self.archive_aware = archive_aware
        self.archives = _ArchiveDeltas(cache, xdelta)
        self._environ = environ
        self._now = now
        self._tool = "deltaglider/" + __version__
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_lock = threading.Lock()

    @property
    def storage(self) -> _Storage:
        """The storage under the logical objects, and under their references: one
        object, so a storage set here (tests wrap it to inject faults) is used by both."""
        return self.refs.storage

    @storage.setter
    def storage(self, storage: _Storage) -> None:
        self.refs.storage = storage

    # -- reading ------------------------------------------------------------------

    def head(
        self,
        bucket: str,
        key: str,
        operation: str = "HeadObject",
        headers: dict[str, str] | None = None,
    ) -> _Logical:
        """Resolve a logical name to its stored form (_stored_forms: ``<key>``, else
        ``<key>.delta``; the plain object wins when another tool wrote both, as in every
        reader). A miss raises what boto3 raises: a 404 ClientError for HeadObject,
        NoSuchKey for GetObject. ``headers`` (SSE-C keys, ExpectedBucketOwner...) go on
        every HEAD."""
        _validate_key(key)
        for stored in _stored_forms(key):
            try:
                head = self.storage.head_object(bucket, stored, headers=headers)
            except ClientError as e:
                if not _is_not_found(e):
                    relabelled = _as_operation(e, operation)
                    if relabelled is e:
                        raise
                    raise relabelled from e
                continue
            metadata = head.get("Metadata", {})
            kind = _classify(stored, metadata)
            if kind == _Kind.REFERENCE:
                continue  # a reference is never a user-visible object
            return _Logical(bucket, key, stored, kind, head, metadata)
        if operation == "HeadObject":
            resp = {
                "Error": {"Code": "404", "Message": "Not Found"},
                "ResponseMetadata": _local_metadata({"ResponseMetadata": {"HTTPStatusCode": 404}}),
            }
            raise ClientError(resp, operation)
        # A HEAD cannot tell a missing key from a missing bucket: a GET can.
        got = self.storage.get_object(bucket, key, headers=headers)
        got["Body"].close()
        resp = {
            "Error": {
                "Code": "NoSuchKey",
                "Message": "The specified key does not exist.",
                "Key": key,
            },
            "ResponseMetadata": _local_metadata({"ResponseMetadata": {"HTTPStatusCode": 404}}),
        }
        raise NoSuchKey(resp, operation)

    @_reports_as("GetObject")
    def get_to_file(
        self, bucket: str, key: str, dest: str, logical: _Logical | None = None
    ) -> _Logical:
        """Write a logical object to ``dest``: into a temp file beside it, verified, then
        renamed. On any failure ``dest`` is neither created nor replaced."""
        lg = logical or self.head(bucket, key, "GetObject")
        folder = os.path.dirname(os.path.abspath(dest))
        fd, tmp = _private_tempfile(folder)
        os.close(fd)
        try:
            if lg.kind == _Kind.DELTA:
                self.rebuild(lg, tmp)
            else:
                self.fetch_plain(lg, tmp)
            os.chmod(tmp, _new_file_mode(dest))
            os.replace(tmp, dest)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return lg

    def fetch_plain(self, lg: _Logical, out: str) -> None:
        """Download a directly stored object into the file ``out``, checking the SHA-256
        its metadata records (when it records one)."""
        with open(out, "wb") as f:
            writer = _HashingWriter(f)
            _get_into(
                self.storage, lg.bucket, lg.stored_key, writer.write, hold=self.xdelta.memory.hold
            )
        expected = lg.sha256
        if expected and writer.sha256.hexdigest() != expected:
            raise IntegrityError(
                "s3://%s/%s: SHA-256 mismatch: expected %s, got %s"
                % (lg.bucket, lg.stored_key, expected, writer.sha256.hexdigest())
            )

    def rebuild(self, lg: _Logical, out: str) -> None:
        """Rebuild a delta-stored object into the file ``out`` and check its SHA-256.

        A failure with a cached reference is not blamed on the delta until the cache is
        ruled out: the entry (and what was made from it) is hashed again, whatever its
        stamp says; a damaged entry is dropped and fetched again, so a cache corrupted in
        place (same size and mtime) costs one more download, not the object."""
        where = "s3://%s/%s" % (lg.bucket, lg.stored_key)
        ref = _meta_get(lg.metadata, "ref") or _REFERENCE_NAME
        ref_key = _resolve_ref_key(lg.stored_key, ref)
        ref_sha = _meta_get(lg.metadata, "ref_sha256")
        expected = lg.sha256
        size = _meta_get(lg.metadata, "file_size") or ""
        if not ref_sha or not expected or not size.isdigit():
            raise IntegrityError(
                "%s: delta without dg-ref-sha256, dg-file-sha256 or dg-file-size; "
                "cannot verify it" % where
            )
        limit = int(size)
        fd, delta_tmp = _private_tempfile(self.tmp_dir(), ".delta")
        os.close(fd)
        fetch = None
        if ref_sha != expected:  # the delta downloads while the reference does
            fetch = _Background(self._download, lg.bucket, lg.stored_key, delta_tmp)
        # A first try may read the reference unhashed (the output is checked): one pass
        # less over the largest bytes of a cold read. Not for a delta between expanded
        # zips: the expanded form made from the reference is kept, trusted by its own hash.
        hash_ref = bool(_meta_get(lg.metadata, "codec"))
        try:
            with self.cache.hold(), contextlib.ExitStack() as stack:
                for attempt in range(2):
                    beside = None if attempt else self._beside(lg, fetch, delta_tmp, out, limit)
                    try:
                        if beside is not None and beside.begin():
                            ref_path = self.refs.read_copy(lg.bucket, ref_key, ref_sha, beside.feed)
                        else:
                            ref_path = self.refs.local_copy(
                                lg.bucket, ref_key, ref_sha, verify=hash_ref or bool(attempt)
                            )
                    finally:
                        made = beside.finish() if beside is not None else None
                        if fetch is not None:
                            done, fetch = fetch, None
                            done.result()
                    if made == expected:
                        return  # decoded beside the reference's download, and it checks
                    if ref_path is None:  # not kept, and the decode beside it failed
                        logger.info("%s: fetching its reference again, to keep", where)
                        continue
                    used = None
                    if ref_path.endswith(_UNHASHED):  # held open: its inode stays its own
                        try:
                            used = os.fstat(stack.enter_context(open(ref_path, "rb")).fileno())
                        except OSError:  # gone (another process): fetched again, hashed
                            continue
                    try:
                        actual = self._decode_into(lg, ref_sha, ref_path, delta_tmp, out, limit)
                        if actual == expected:
                            return
                        failure: DeltaGliderError = IntegrityError(
                            "%s: SHA-256 mismatch after rebuilding: expected %s, got %s"
                            % (where, expected, actual)
                        )
                    except (IntegrityError, XDelta3Error) as e:
                        failure = e
                    except FileNotFoundError as e:  # the cache entry went away under us
                        failure = IntegrityError("%s: %s" % (where, e))
                    if used is not None:  # the reference or the delta: the hashed try tells
                        self.cache.drop_unhashed(ref_sha, used)
                        logger.info(
                            "%s: %s; trying again with its reference hashed", where, failure
                        )
                        continue
                    if self.cache.recheck(ref_sha):
                        ref_url = "s3://%s/%s" % (lg.bucket, ref_key)
                        raise self._delta_damaged(failure, where, ref_url) from None
                    if attempt:
                        raise IntegrityError(
                            "%s: the cached copy of its reference was damaged again after "
                            "being fetched again; check the disk under %s"
                            % (where, self.cache.folder)
                        ) from None
                    logger.warning(
                        "the cached reference of %s was damaged on disk; fetching it again",
                        where,
                    )
        finally:
            if fetch is not None:
                with contextlib.suppress(Exception):
                    fetch.result()
            os.unlink(delta_tmp)

    @staticmethod
    def _delta_damaged(failure: DeltaGliderError, where: str, ref_url: str) -> DeltaGliderError:
        """What a read that failed with a sound reference raises: the stored delta is
        damaged (unless xdelta3 was not started, or was killed: then its own error)."""
        if isinstance(failure, XDelta3Error):
            if failure.returncode <= 0:
                return failure
            failure = IntegrityError(
                "%s: xdelta3 cannot decode it: %s"
                % (where, failure.stderr.strip()[:300] or "exit %d" % failure.returncode)
            )
        return IntegrityError(
            "%s; its reference %s matches dg-ref-sha256, so the stored delta (or its "
            "metadata) is damaged" % (str(failure).rstrip("."), ref_url)
        )

    def _beside(
        self, lg: _Logical, fetch: _Background | None, delta: str, out: str, limit: int
    ) -> _DecodeBeside | None:
        """A decode made while the reference downloads, if it does (_DecodeBeside; a
        zero-diff delta has no delta ``fetch``): not for a delta between expanded zips,
        which decodes against another file."""
        if _meta_get(lg.metadata, "codec"):
            return None
        ready = None if fetch is None else (lambda: (fetch.result(), delta)[1])
        return _DecodeBeside(self.xdelta, ready, out, limit)

    def _decode_into(
        self, lg: _Logical, ref_sha: str, ref_path: str, delta: str, out: str, limit: int
    ) -> str:
        """Write the object a delta rebuilds to ``out``, at most ``limit`` bytes (its
        dg-file-size); returns the SHA-256 written."""
        where = "s3://%s/%s" % (lg.bucket, lg.stored_key)
        if ref_sha == lg.sha256:
            # A zero-diff delta: the file is the reference, whose bytes we check anyway.
            return _copy_hashing(ref_path, out)
        codec = _meta_get(lg.metadata, "codec")
        try:
            if codec:
                return self.archives.rebuild(
                    lg, codec, ref_sha, ref_path, delta, out, limit, self.tmp_dir()
                )
            actual = self.xdelta.decode(ref_path, delta, out, limit=limit)
            if actual != lg.sha256 and _is_compressed_stream(ref_path):
                # Written by the original without -D: let xdelta3 recompress as it did.
                actual = self.xdelta.decode(ref_path, delta, out, external=True, limit=limit)
        except _OutputLimitError as e:
            if e.what != "dg-file-size":
                raise
            raise _OutputLimitError(e.limit, "dg-file-size of %s" % where) from None
        except IntegrityError as e:
            if where in str(e):
                raise
            raise IntegrityError("%s: %s" % (where, e)) from None
        return actual

    def _download(self, bucket: str, key: str, path: str) -> None:
        body = self.storage.get_object(bucket, key)["Body"]
        try:
            with open(path, "wb") as f:
                for chunk in body.iter_chunks(_IO_CHUNK):
                    f.write(chunk)
        finally:
            body.close()

    def tmp_dir(self) -> str:
        """The private folder (made on first use) for scratch files: rebuilt objects,
        deltas being made, spooled bodies. Inside the cache folder, so on its volume."""
        path = os.path.join(self.cache.folder, "tmp")
        _private_mkdir(self.cache.folder)
        _private_mkdir(path)
        return path

    # -- writing ------------------------------------------------------------------

    def eligible(self, key: str, path: str, delta: bool | None) -> bool:
        if delta is not None:
            return delta
        mode = _env_setting(self._environ, _ENV_DELTA_MODE)
        if mode != "auto":
            return bool(mode == "always")
        if _is_compressed_stream(path):
            return False
        name = key.rsplit("/", 1)[-1]
        return _eligible_by_name(name, self._environ) or _eligible_by_content(path)

    def _metadata(self, up: _Upload, info: _FileInfo) -> dict[str, str]:
        """What every object an upload stores records (FORMAT.md "Metadata")."""
        meta = {
            "dg-tool": self._tool,
            "dg-original-name": _meta_encode(up.name),
            "dg-file-sha256": info.sha256,
            "dg-file-size": str(info.size),
            "dg-md5": info.md5,
            "dg-created-at": _iso_utc(self._now()),
        }
        for k, v in (up.metadata or {}).items():
            meta[_USER_META_PREFIX + k.lower()] = _meta_encode(str(v))
        if up.content_type:
            meta[_CONTENT_TYPE_META] = _meta_encode(up.content_type)
        if up.mtime is not None:
            meta["dg-mtime"] = "%.6f" % up.mtime  # the source's mtime, for sync (as rclone)
        if up.checksum is not None:
            meta[_CHECKSUM_META + up.checksum[0]] = up.checksum[1]
        parts = _parts_meta(up.parts) if up.parts else None
        if parts:
            meta[_PARTS_META] = parts
        if up.upload:
            meta[_UPLOAD_META] = up.upload
        return meta

    @_reports_as("PutObject")
    def put_file(
        self,
        path: str,
        bucket: str,
        key: str,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: dict[str, str] | None = None,
        delta: bool | None = None,
        max_ratio: float | None = None,
        info: _FileInfo | None = None,
        on_bytes: Callable[[int], None] | None = None,
        mtime: float | None = None,
        existing: Container[str] | None = None,
        if_none_match: bool = False,
        checksum: tuple[str, str] | None = None,
        parts: Sequence[int] = (),
        upload: str | None = None,
    ) -> dict[str, Any]:
        """Store a local file under a logical key, as a delta when it is eligible and the
        delta is small enough, else directly. Returns a summary (DeltaGliderInfo).

        ``checksum``: the caller's (algorithm, base64 value) of the file, already checked,
        kept as ``dg-checksum-<algorithm>`` (returned by HeadObject/GetObject on request);
        ``parts``: the sizes of the parts it was uploaded in, kept as ``dg-parts``;
        ``upload``: the _upload_note of the multipart upload it completes (``dg-upload``).

        ``existing``: the stored keys a listing just showed, when the caller has one.
        ``if_none_match``: the stored form is created with ``If-None-Match: *`` where the
        server honours it, so a racing writer of that form gets a 412 (the caller checks
        the logical key first, under key_lock: see _put_object_from_file)."""
        _validate_key(key)
        name = _object_name(key)
        # The file is hashed once: as its delta is checked, or when a step needs it.
        hashing = _FileHashing(path) if info is None else None
        headers = dict(headers or {})
        content_type = headers.pop("Content-Type", None)
        size = info.size if info is not None else os.path.getsize(path)
        up = _Upload(
            path=path,
            bucket=bucket,
            key=key,
            name=name,
            headers=headers,
            content_type=content_type,
            metadata=metadata,
            mtime=mtime,
            max_ratio=self.max_ratio if max_ratio is None else max_ratio,
            # A key ending in .delta is stored in delta form whatever its content, size or
            # --no-delta: its plain name is another key's delta (_logical_key).
            required=_delta_only(key),
            on_bytes=on_bytes,
            hashing=hashing,
            given=info,
            create_only=if_none_match and self.storage.supports_conditional_writes(bucket),
            checksum=checksum,
            parts=parts,
            upload=upload,
        )
        if up.required:
            self._refuse_shadowed(bucket, key)
        if up.required or (size > 0 and self.eligible(key, path, delta)):
            summary = self._put_as_delta(up, existing)
            if summary is not None:
                return summary
        return self._put_direct(up, existing)

    def _put_as_delta(self, up: _Upload, existing: Container[str] | None) -> dict[str, Any] | None:
        """put_file's delta attempt, and what follows a stored delta: the key's other
        stored form is removed, and a user's ``x.delta`` keeps ``x`` plain (_unshadow).
        None when the file is to be stored whole after all."""
        # The looks come after the store, never before: two writers of one name each look
        # for the other's form once their own is stored, so the later store always sees
        # the earlier. Independent reads: made at once, beside the reference's check after
        # each store (_put_delta), and acted on once that check passed.
        shadow = up.key if up.required else up.key + _DELTA_SUFFIX + _DELTA_SUFFIX
        plain = [] if up.required or (existing is not None and up.key not in existing) else [up.key]
        looks = _Looks(functools.partial(self.exists, up.bucket))
        with self.cache.hold():  # the reference (and its expanded form) stay while used
            summary = self._put_delta(up, functools.partial(looks.start, [shadow, *plain]))
        if summary is None:
            assert not up.required
            return None
        self._remove_other(up.bucket, up.key, up.key + _DELTA_SUFFIX, existing, looks)
        if up.required:
            self._unshadow(up.bucket, up.key, looks)
            return summary
        if not looks(shadow):
            return summary
        return None  # the user's key.delta exists: this key is kept plain (see _unshadow)

    def _put_direct(self, up: _Upload, existing: Container[str] | None) -> dict[str, Any]:
        """Store the file as it is (FORMAT.md "direct"), then remove its delta form."""
        info = up.info()
        meta = self._metadata(up, info)
        meta["dg-compression"] = "none"
        meta["dg-note"] = "passthrough"
        headers = dict(up.headers)
        headers["Content-Type"] = up.content_type or "binary/octet-stream"
        resp = _put_path(
            self.storage,
            up.bucket,
            up.key,
            up.path,
            metadata=meta,
            headers=headers,
            sha256=info.sha256,
            on_bytes=up.on_bytes,
            if_none_match=up.create_only,
        )
        self._remove_other(up.bucket, up.key, keep=up.key, existing=existing)
        return self._summary("upload_direct", up.key, info, info.size, None, resp)

    def key_lock(self, bucket: str, key: str) -> threading.Lock:
        """One conditional write (its check, then its store) at a time per logical key
        within this process; across processes the stored form's own condition decides."""
        with self._locks_lock:
            return self._key_locks.setdefault((bucket, key), threading.Lock())

    def exists(self, bucket: str, stored: str) -> bool:
        """Whether the stored key ``stored`` (not a logical name) is in the bucket."""
        try:
            self.storage.head_object(bucket, stored)
        except ClientError as e:
            if _is_not_found(e):
                return False
            raise
        return True

    def _refuse_shadowed(self, bucket: str, key: str) -> None:
        """``x.delta.delta`` cannot be stored beside ``x.delta``: its own name is how
        ``x.delta`` is stored, and ``x.delta`` cannot be kept plain (_unshadow)."""
        base = key[: -len(_DELTA_SUFFIX)]
        if _delta_only(base) and self.exists(bucket, key):
            raise ParamValidationError(
                report="Invalid key %r: that name is how %r is stored, and readers of the "
                "original layout would return one for the other; choose another name" % (key, base)
            )

    def _unshadow(self, bucket: str, key: str, exists: Callable[[str], bool]) -> None:
        """After storing a user's ``x.delta`` (as ``x.delta.delta``), make sure no stored
        ``x.delta`` (the delta of ``x``) is left: the original tool, asked for the name
        ``x.delta``, reads that object first and would return ``x``'s bytes, its SHA-256
        check passing. So ``x`` is then kept plain: rebuilt, stored whole, its delta
        removed (uploads of ``x`` check the same, from their side, after storing)."""
        if not exists(key):
            return
        base = key[: -len(_DELTA_SUFFIX)]
        if _delta_only(base):  # stored at once by a racing writer (see _refuse_shadowed)
            logger.warning(
                "s3://%s/%s and s3://%s/%s were stored at the same time; older readers "
                "asked for the first get the second",
                bucket,
                key,
                bucket,
                base,
            )
            return
        lg = self.head(bucket, base)
        if lg.stored_key == base:  # already plain: the delta is a stale second form
            self._remove_other(bucket, base, keep=base)
            return
        logger.info("s3://%s/%s is stored whole from now on, beside %s", bucket, base, key)
        headers = {"Content-Type": lg.content_type}
        for param, header in _PUT_HEADER_PARAMS:
            if param in lg.head and param not in ("ContentType", "ServerSideEncryption"):
                value = lg.head[param]
                headers[header] = (
                    _http_date(value) if isinstance(value, datetime.datetime) else str(value)
                )
        try:
            mtime: float | None = float(lg.metadata.get("dg-mtime") or "")
        except ValueError:
            mtime = None
        fd, tmp = _private_tempfile(self.tmp_dir(), ".plain")
        os.close(fd)
        try:
            self.get_to_file(bucket, base, tmp, logical=lg)
            self.put_file(
                tmp,
                bucket,
                base,
                metadata=_user_metadata(lg.metadata),
                headers=headers,
                delta=False,
                mtime=mtime,
            )
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _summary(
        self,
        operation: str,
        stored_key: str,
        info: _FileInfo,
        stored_size: int,
        delta_size: int | None,
        resp: Mapping[str, Any],
    ) -> dict[str, Any]:
        mib = 1024.0 * 1024.0
        saved = (info.size - stored_size) / info.size * 100.0 if info.size else 0.0
        logger.debug(
            "%s: %s, %d bytes stored for %d (%.1f%% saved)",
            stored_key,
            operation,
            stored_size,
            info.size,
            saved,
        )
        return {
            "Operation": operation,
            "StoredAs": stored_key,
            "OriginalSizeMB": info.size / mib,
            "StoredSizeMB": stored_size / mib,
            "OriginalSize": info.size,
            "StoredSize": stored_size,
            # As deltaglider 6.x: a folder's first file (stored whole as its reference,
            # plus a zero-diff delta) is not "a delta"; only a real difference is.
            "IsDelta": operation == "create_delta",
            "CompressionRatio": (stored_size / info.size) if info.size else 1.0,
            "SavingsPercent": saved,
            "ETag": '"%s"' % info.md5,
            "Response": resp,
        }

    def _put_delta(self, up: _Upload, stored: Callable[[], None]) -> dict[str, Any] | None:
        """Store ``up`` as a delta; None when it is better stored whole (a delta above
        ``max_ratio``, a compressed reference), unless ``up.required`` (_delta_only).
        ``stored`` is called after each store, to start the reads that must follow it.

        Each attempt chooses a reference, encodes against it (the delta checked to decode
        back to the file), may make the file a new reference instead (drift: _heal),
        stores the delta, and is made again when the reference was replaced or deleted
        meanwhile (racing writers, the folder's last file deleted)."""
        space = _deltaspace(up.key)
        tmp_dir = self.tmp_dir()
        shared = (
            self.references == _REFERENCES_SHARED
            and _shared_ref_key(space, up.name, "0" * 64) is not None
        )
        size = os.path.getsize(up.path)
        create_only = up.create_only
        ref = _RefChoice(_reference_key(space))
        for attempt in range(5):
            if attempt:  # whatever made this one fail, the next looks at references afresh
                self.refs.forget(up.bucket)
            fd, delta_tmp = _private_tempfile(tmp_dir, ".delta")
            os.close(fd)
            ref = _RefChoice(_reference_key(space))
            try:
                if not self._choose_reference(up, ref, shared, size):
                    continue  # replaced or deleted since the listing: again
                if not ref.created and not up.required and _is_compressed_stream(ref.path):
                    return None  # a compressed reference (another writer's): _COMPRESSED_MAGIC
                # Uploads hash a cached reference once per process, beside the encoding: a
                # delta made against silently corrupted bytes would be unreadable.
                ref_check = None if ref.created else _Background(self.cache.check, ref.sha256)
                made = self._encode(up, ref, ref_check, delta_tmp, tmp_dir)
                if made is None:
                    continue  # the check removed the entry under xdelta3: see below
                info, decoded, extra = made
                delta_size = os.path.getsize(delta_tmp)
                if ref.series and delta_size > min(_HEAL_RATIO, up.max_ratio) * info.size:
                    if not self._heal(up, ref, ref_check, info, delta_size, delta_tmp):
                        continue  # the cached reference was corrupt: choose again
                    decoded, extra, ref_check = (info.sha256, info.size), None, None
                    delta_size = os.path.getsize(delta_tmp)
                if not ref.created and not up.required and delta_size > up.max_ratio * info.size:
                    logger.info(
                        "%s: delta is %.1f%% of the file, above the %.0f%% limit; storing it whole",
                        up.key,
                        100.0 * delta_size / info.size,
                        100.0 * up.max_ratio,
                    )
                    return None
                if decoded != (info.sha256, info.size):
                    # A delta that does not give the exact bytes back is never stored.
                    raise IntegrityError(
                        "%s: the delta xdelta3 made does not decode to the input (expected %s, "
                        "got %s); nothing was stored" % (up.key, info.sha256, decoded[0])
                    )
                if ref_check is not None and not ref_check.result():
                    logger.warning("cached reference %s was corrupt; fetching it again", ref.sha256)
                    continue
                resp = self._store_delta(up, info, ref, delta_size, extra, delta_tmp, create_only)
                create_only = False  # a retry below replaces our own delta
            except BaseException:
                if ref.created:  # nothing may depend on a reference whose first delta failed
                    self.refs.discard(up.bucket, ref.key, ref.sha256)
                raise
            finally:
                os.unlink(delta_tmp)
            # The reference may have been replaced or deleted while we encoded (a racing
            # writer on a server without conditional writes, or the last delta deleted):
            # then the delta we stored is encoded against the wrong bytes. Redo it.
            stored()
            if self.refs.current(up.bucket, ref.key) == ref.sha256:
                return self._delta_summary(up.key, info, ref, delta_size, resp)
            logger.warning("reference of %s changed while storing a delta; retrying", up.key)
        raise DeltaGliderError("s3://%s/%s keeps changing; giving up" % (up.bucket, ref.key))

    def _choose_reference(self, up: _Upload, ref: _RefChoice, shared: bool, size: int) -> bool:
        """Fill ``ref`` with the reference this attempt encodes against: the folder's own
        reference.bin (made from this file if there is none), or (DG_REFERENCES=shared)
        the best existing shared reference, else this file as a new one. False when the
        chosen reference went or changed since it was listed (choose again)."""
        space = _deltaspace(up.key)
        if not shared:
            with self.refs.space_lock(up.bucket, space):
                ref.sha256, ref.path, ref.created = self.refs.ensure(
                    up.path, up.bucket, ref.key, up.name, up.info, up.on_bytes
                )
            return True
        # One choice at a time per parent folder in this process: parallel first uploads
        # (a recursive upload of a new release tree) then share a reference.
        with self.refs.space_lock(up.bucket, _refs_prefix(_parent_space(space))):
            pick = self.refs.pick(up.bucket, space, up.name, size)
            if pick is None:
                info = up.info()
                ref.key = _shared_ref_key(space, up.name, info.sha256) or ""
                ref.sha256, ref.created = info.sha256, True  # discarded if interrupted
                ref.path = self.refs.new_shared(
                    up.path, up.bucket, ref.key, up.name, info, up.on_bytes
                )
                return True
        ref.key, ref.sha256, ref.series = pick
        hashing = up.hashing
        try:
            ref.path = self.refs.local_copy(
                up.bucket, ref.key, ref.sha256, hashing.start if hashing else None
            )
        except IntegrityError:
            if self.refs.current(up.bucket, ref.key) != ref.sha256:
                return False
            raise
        except ClientError as e:
            if _is_not_found(e):
                return False
            raise
        return True

    def _encode(
        self,
        up: _Upload,
        ref: _RefChoice,
        ref_check: _Background | None,
        delta_tmp: str,
        tmp_dir: str,
    ) -> tuple[_FileInfo, tuple[str, int], dict[str, str] | None] | None:
        """Write the file's delta against ``ref`` into ``delta_tmp``: the zero-diff delta
        when the file is the reference, else xdelta3's (archive-aware, or plain), decoded
        as it is made. Returns the file's info, the (SHA-256, size) the delta decodes to
        and the metadata of an archive-aware delta; None when the reference's cached copy
        was found corrupt while xdelta3 read it (choose again)."""
        if ref.created and up.info().size:
            # The file is the reference: write the zero-diff delta, not xdelta3's search of
            # the whole file for the same bytes. (An empty file, stored as a delta only
            # under a .delta key, takes xdelta3's: VCDIFF without a window is refused by
            # xdelta3.)
            info = up.info()
            with open(delta_tmp, "wb") as f:
                f.write(_zero_diff_delta(info.size))
            return info, (info.sha256, info.size), None
        try:
            extra = None
            if self.archive_aware:
                extra = self.archives.encode(
                    ref.sha256, ref.path, ref_check, up.path, delta_tmp, tmp_dir, up.info
                )
            plain = None
            if extra is None:
                plain = _encode_plain(self.xdelta, up, ref.path, delta_tmp)
        except (XDelta3Error, OSError):
            if ref_check is not None and not ref_check.result():
                return None
            raise
        info = up.info()
        return info, plain or (info.sha256, info.size), extra  # archive: checked there

    def _heal(
        self,
        up: _Upload,
        ref: _RefChoice,
        ref_check: _Background | None,
        info: _FileInfo,
        delta_size: int,
        delta_tmp: str,
    ) -> bool:
        """Drift (a delta above _HEAL_RATIO against a reference of the file's series):
        the versions after this one are better off against it, so the file becomes a new
        shared reference and ``delta_tmp`` its zero-diff delta. False when the cached
        reference turned out corrupt (choose again)."""
        logger.info(
            "%s: delta is %.1f%% of the file against s3://%s/%s; it becomes a new reference",
            up.key,
            100.0 * delta_size / info.size,
            up.bucket,
            ref.key,
        )
        ref.key = _shared_ref_key(_deltaspace(up.key), up.name, info.sha256) or ""
        if ref_check is not None and not ref_check.result():
            return False
        ref.sha256, ref.created = info.sha256, True
        ref.path = self.refs.new_shared(up.path, up.bucket, ref.key, up.name, info)
        with open(delta_tmp, "wb") as f:
            f.write(_zero_diff_delta(info.size))
        return True

    def _store_delta(
        self,
        up: _Upload,
        info: _FileInfo,
        ref: _RefChoice,
        delta_size: int,
        extra: dict[str, str] | None,
        delta_tmp: str,
        create_only: bool,
    ) -> dict[str, Any]:
        """PUT the delta as ``<key>.delta``, with the metadata both older readers need
        (FORMAT.md) and ``extra`` (an archive-aware delta's); ``create_only``: with
        ``If-None-Match: *``."""
        delta_meta = self._metadata(up, info)
        delta_meta.update(
            {
                "dg-ref-key": ref.key,
                # The proxy's name for the folder's own reference; a shared one is named
                # in full (the proxy then refuses it: a SHA-256 mismatch).
                "dg-ref-path": ref.key if _is_shared_ref(ref.key) else _REFERENCE_NAME,
                "dg-ref-sha256": ref.sha256,
                "dg-delta-size": str(delta_size),
                "dg-delta-cmd": self._delta_cmd(up.name),
                "dg-note": "zero-diff (reference identical)"
                if ref.sha256 == info.sha256
                else "delta",
            }
        )
        delta_meta.update(extra or {})
        headers = dict(up.headers)
        headers["Content-Type"] = "binary/octet-stream"
        return _put_path(
            self.storage,
            up.bucket,
            up.key + _DELTA_SUFFIX,
            delta_tmp,
            metadata=delta_meta,
            headers=headers,
            if_none_match=create_only,
        )

    def _delta_summary(
        self,
        key: str,
        info: _FileInfo,
        ref: _RefChoice,
        delta_size: int,
        resp: Mapping[str, Any],
    ) -> dict[str, Any]:
        delta_key = key + _DELTA_SUFFIX
        if ref.created:
            # Stored as a zero-diff delta; the whole file went up as reference.bin.
            summary = self._summary(
                "create_reference", delta_key, info, info.size, delta_size, resp
            )
        else:
            summary = self._summary("create_delta", delta_key, info, delta_size, delta_size, resp)
        summary["ReferenceKey"] = ref.key
        if _is_shared_ref(ref.key):
            summary["ReferenceSource"] = _shared_ref_source(ref.key)
        return summary

    @staticmethod
    def _delta_cmd(name: str) -> str:
        """Informational (FORMAT.md); shortened so it never hits a metadata value limit."""
        safe = _meta_encode(name)
        if len(safe) > 90:
            safe = safe[:40] + "..." + safe[-40:]
        return "xdelta3 -e -9 -s reference.bin %s %s.delta" % (safe, safe)

    def _remove_other(
        self,
        bucket: str,
        key: str,
        keep: str,
        existing: Container[str] | None = None,
        exists: Callable[[str], bool] | None = None,
    ) -> None:
        """After storing ``keep``, remove the other stored form of the same logical name
        (a direct object replaced by a delta or the reverse; never another key's: see
        _stored_forms). ``existing``: the stored keys a listing just showed, when the
        caller has one (saves a HEAD each); ``exists``: the looks made after the store."""
        for other in _stored_forms(key):
            if other == keep or (existing is not None and other not in existing):
                continue
            if not (exists or functools.partial(self.exists, bucket))(other):
                continue
            self.storage.delete_object(bucket, other)
            if other.endswith(_DELTA_SUFFIX):
                self.refs.drop_unused_near(bucket, [_deltaspace(key)])

    # -- deleting -----------------------------------------------------------------

    @_reports_as("DeleteObject")
    def delete(self, bucket: str, key: str) -> dict[str, Any]:
        """Delete a logical name: every stored form of it (another tool may have put a
        plain object beside our delta); the last delta of a deltaspace takes its
        reference."""
        try:
            lg = self.head(bucket, key)
        except ClientError as e:
            if not _is_not_found(e):
                raise
            # Deleting a missing key succeeds on S3; a missing bucket must still say so,
            # and a HEAD cannot tell the two apart.
            self.storage.delete_object(bucket, _stored_forms(key)[-1])
            return {"Deleted": False, "Type": "missing"}
        found = [lg]
        for stored in _stored_forms(key):
            if stored == lg.stored_key:
                continue
            try:
                head = self.storage.head_object(bucket, stored)
            except ClientError as e:
                if not _is_not_found(e):
                    raise
                continue
            metadata = head.get("Metadata", {})
            found.append(_Logical(bucket, key, stored, _classify(stored, metadata), head, metadata))
        for each in found:
            self.storage.delete_object(bucket, each.stored_key)
        info: dict[str, Any] = {"Deleted": True, "Type": lg.kind, "StoredKey": lg.stored_key}
        for each in found:
            if each.kind == _Kind.DELTA:
                ref = _meta_get(each.metadata, "ref") or _REFERENCE_NAME
                ref_key = _resolve_ref_key(each.stored_key, ref)
                info["ReferenceKey"] = ref_key
                info["ReferenceDeleted"] = self.refs.drop(bucket, ref_key)
        return info

    def delete_prefix(self, bucket: str, prefix: str) -> dict[str, Any]:
        """Recursive delete: deltas and direct objects first, then each reference whose
        deltaspace has nothing left that needs it."""
        keys: list[str] = []
        refs: list[str] = []
        for obj in _stored_objects(self.storage, bucket, prefix):
            k = obj["Key"]
            (refs if _is_reference(k) else keys).append(k)
        deleted: list[str] = []
        errors: list[dict[str, Any]] = []
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            resp = self.storage.delete_objects(bucket, batch)
            deleted += [d["Key"] for d in resp.get("Deleted", [])]
            errors += resp.get("Errors", [])
        refs_deleted = 0
        parents: dict[str, set[str]] = {}
        for ref in refs:
            if _is_shared_ref(ref):
                parents.setdefault(_shared_ref_parent(ref), set()).add(ref)
            elif self.refs.drop_unused(bucket, _deltaspace(ref)):
                refs_deleted += 1
        # The deleted deltas' shared references live beside their folders, outside the prefix.
        for k in deleted:
            if k.endswith(_DELTA_SUFFIX):
                parents.setdefault(_parent_space(_deltaspace(k)), set())
        for parent, found in sorted(parents.items()):
            found |= {k for k, _ in self.refs.shared_references(bucket, parent)}
            if found:
                refs_deleted += len(
                    self.refs.drop_unused_shared(bucket, parent, found, _REF_SCAN_LIMIT)
                )
        return {"Deleted": deleted, "Errors": errors, "ReferencesDeleted": refs_deleted}

    def drop_unused_near(self, bucket: str, spaces: Iterable[str]) -> None:
        """After deltas of ``spaces`` went (without reading them first): each one's own
        reference.bin, and the shared references of their parents, if nothing needs them."""
        self.refs.drop_unused_near(bucket, spaces)

    def gc(self, bucket: str, prefix: str = "", dry_run: bool = False) -> dict[str, Any]:
        """Remove the references under ``prefix`` (a folder) that no delta needs, proving
        it however many requests that takes; returns what it removed."""
        return self.refs.gc(bucket, prefix, dry_run)


###############################################################################
# The boto3-compatible client #################################################
###############################################################################

# The client takes boto3's parameters and answers in boto3's shapes; the engine above
# stores and reads the objects. Its pieces, in order (each after a ``# -- name --`` line):
#   parameters          botocore's checks (_params, _check_params, _require: its wording),
#                       and the request headers they become (_put_headers, _header_params)
#   boto3's shapes      _ClientExceptions, _Paginator, _ListResponse; the bodies _TempBody
#                       (a rebuilt file) and _VerifyingBody (SHA-256-checked as read)
#   object operations   _spool_request_body, _put_object_from_file (what the gateway and
#                       the CLI use too), _get_rebuilt/_get_stored, _delete_logical_objects,
#                       _copy_logical_object, _verify_logical
#   logical listing     _logical_page (references hidden, logical names), _fetch_details
#   the client          DeltaGliderClient: boto3's methods and deltaglider's extensions,
#                       most of them a parameter check and a call into the pieces
#   result types        UploadSummary, VerifyResult, BucketStats, ObjectInfo, ...
#   ACLs                _acl_headers, _acl_xml
#   multipart uploads   _MultipartUploads (staged, then stored as put_object stores a file)
#   bucket statistics   _list_for_stats, _compute_bucket_stats, the stats cache
#   presigned URLs      _presigned_url, _rehydrated_copy (what a URL of a delta serves),
#                       _purge_presign_copies, _presigned_post
#   create_client       its settings, _client_storage and _lazy_credentials (on first use)

# -- Parameters: botocore's checks, and the request headers they become ------------

#: put_object/upload_file parameters we honour, beyond Bucket/Key/Body.
_PUT_PARAMS = frozenset(name for name, _ in _PUT_HEADER_PARAMS) | {
    "Metadata",
    "ContentMD5",
    "ContentLength",
    "SSECustomerAlgorithm",
    "SSECustomerKey",
    "SSECustomerKeyMD5",
}


#: Parameter types as botocore's S3 model has them (every other parameter is a string).
_INT_PARAMS = frozenset(
    {"MaxKeys", "MaxParts", "MaxUploads", "PartNumber", "PartNumberMarker", "ContentLength"}
)
_BOOL_PARAMS = frozenset(
    {
        "FetchOwner",
        "FetchMetadata",
        "BucketKeyEnabled",
        "ObjectLockEnabledForBucket",
        "BypassGovernanceRetention",
        "Quiet",
    }
)
_TIME_PARAMS = frozenset(
    {
        "IfModifiedSince",
        "IfUnmodifiedSince",
        "CopySourceIfModifiedSince",
        "CopySourceIfUnmodifiedSince",
        "Expires",
        "ResponseExpires",
        "ObjectLockRetainUntilDate",
        "IfMatchLastModifiedTime",
        "LastModifiedTime",
    }
)
_DICT_PARAMS = frozenset(
    {
        "Metadata",
        "Delete",
        "CreateBucketConfiguration",
        "AccessControlPolicy",
        "MultipartUpload",
        "Tagging",
    }
)
#: Parameters whose type depends on the operation: Tagging is a query string on PutObject.
_STRING_TAGGING_OPS = frozenset({"PutObject", "CopyObject", "CreateMultipartUpload"})
_ANY_PARAMS = frozenset({"Body", "CopySource"})
_LIST_PARAMS = frozenset({"ObjectAttributes"})


def _type_report(name: str, value: Any, valid: str) -> str:
    return "Invalid type for parameter %s, value: %s, type: %s, valid types: %s" % (
        name,
        value,
        type(value),
        valid,
    )


def _param_type_errors(operation: str, given: Mapping[str, Any]) -> list[str]:
    """botocore's type checks, with its wording (``Invalid type for parameter ...``);
    None counts as absent, as the original deltaglider's keyword defaults have it."""
    errors = []
    for name, value in given.items():
        if value is None or name in _ANY_PARAMS:
            continue
        if name in _INT_PARAMS:
            if not isinstance(value, int):
                errors.append(_type_report(name, value, "<class 'int'>"))
        elif name in _BOOL_PARAMS:
            if not isinstance(value, bool):
                errors.append(_type_report(name, value, "<class 'bool'>"))
        elif name in _LIST_PARAMS:
            if not isinstance(value, (list, tuple)):
                errors.append(_type_report(name, value, "<class 'list'>, <class 'tuple'>"))
        elif name in _TIME_PARAMS:
            if not isinstance(value, datetime.datetime) and _timestamp_param(value) is None:
                errors.append(
                    _type_report(name, value, "<class 'datetime.datetime'>, timestamp-string")
                )
        elif name in _DICT_PARAMS and not (name == "Tagging" and operation in _STRING_TAGGING_OPS):
            if not isinstance(value, dict):
                errors.append(_type_report(name, value, "<class 'dict'>"))
            elif name == "Metadata":
                errors += [
                    _type_report("%s.%s" % (name, k), v, "<class 'str'>")
                    for k, v in value.items()
                    if not isinstance(v, str) or not isinstance(k, str)
                ]
        elif not isinstance(value, str):
            errors.append(_type_report(name, value, "<class 'str'>"))
    return errors


def _check_params(operation: str, given: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """A parameter we do not support is an error, never silently dropped; a value of the
    wrong type is botocore's ParamValidationError, never a raw TypeError later."""
    known = sorted(allowed)
    unknown = [name for name in given if name not in set(known)]
    if unknown:  # botocore's wording: one line per parameter, in the order given
        raise ParamValidationError(
            report="\n".join(
                'Unknown parameter in input: "%s", must be one of: %s' % (name, ", ".join(known))
                for name in unknown
            )
        )
    errors = _param_type_errors(operation, given)
    if errors:
        raise ParamValidationError(report="\n".join(errors))


def _put_headers(params: Mapping[str, Any]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, header in _PUT_HEADER_PARAMS:
        if name in params and params[name] is not None:
            value = params[name]
            if name == "ObjectLockRetainUntilDate":
                when = _timestamp_param(value)
                value = _iso_utc(when) if when else value
            elif isinstance(value, datetime.datetime):
                value = _http_date(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            headers[header] = str(value)
    # SSE-C objects are stored as they are (see _put_path): a delta is readable only
    # with its reference, which would not be under the customer's key.
    headers.update(_header_params(params, _SSEC_HEADER_PARAMS))
    return headers


def _params(
    operation: str, given: Mapping[str, Any], allowed: Iterable[str], *required: str
) -> None:
    """Refuse unknown parameters, then missing required ones (botocore's order)."""
    _check_params(operation, given, allowed)
    _require(operation, given, *required)


def _require(operation: str, params: Mapping[str, Any], *names: str) -> None:
    missing = [n for n in names if params.get(n) in (None, "")]
    if missing:
        raise ParamValidationError(
            report="\n".join('Missing required parameter in input: "%s"' % n for n in missing)
            + " (%s)" % operation
        )


#: Request headers a server decides on, as botocore's model names them, by operation kind.
_COMMON_HEADER_PARAMS: tuple[tuple[str, str], ...] = (
    ("ExpectedBucketOwner", "x-amz-expected-bucket-owner"),
    ("RequestPayer", "x-amz-request-payer"),
)
_SSEC_HEADER_PARAMS: tuple[tuple[str, str], ...] = (
    ("SSECustomerAlgorithm", "x-amz-server-side-encryption-customer-algorithm"),
    ("SSECustomerKey", "x-amz-server-side-encryption-customer-key"),
    ("SSECustomerKeyMD5", "x-amz-server-side-encryption-customer-key-MD5"),
)
_COPY_SSEC_HEADER_PARAMS: tuple[tuple[str, str], ...] = tuple(
    ("CopySource" + name, header.replace("x-amz-", "x-amz-copy-source-", 1))
    for name, header in _SSEC_HEADER_PARAMS
)
_READ_HEADER_PARAMS = (
    _COMMON_HEADER_PARAMS + _SSEC_HEADER_PARAMS + (("ChecksumMode", "x-amz-checksum-mode"),)
)
#: GET/HEAD conditions (RFC 7232, as S3 evaluates them).
_CONDITION_PARAMS: tuple[tuple[str, str], ...] = (
    ("IfMatch", "If-Match"),
    ("IfNoneMatch", "If-None-Match"),
    ("IfModifiedSince", "If-Modified-Since"),
    ("IfUnmodifiedSince", "If-Unmodified-Since"),
)
_COPY_CONDITION_PARAMS: tuple[tuple[str, str], ...] = tuple(
    ("CopySource" + name, "x-amz-copy-source-" + header.lower())
    for name, header in _CONDITION_PARAMS
)
#: GetObject's response header overrides: parameter, query name, response key.
_GET_OVERRIDE_PARAMS: tuple[tuple[str, str, str], ...] = (
    ("ResponseCacheControl", "response-cache-control", "CacheControl"),
    ("ResponseContentDisposition", "response-content-disposition", "ContentDisposition"),
    ("ResponseContentEncoding", "response-content-encoding", "ContentEncoding"),
    ("ResponseContentLanguage", "response-content-language", "ContentLanguage"),
    ("ResponseContentType", "response-content-type", "ContentType"),
    ("ResponseExpires", "response-expires", "Expires"),
)


def _header_params(params: Mapping[str, Any], table: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Request headers for the parameters given, encoded as botocore encodes them: dates
    as HTTP dates; an SSE-C key base64-encoded with its MD5 added, when given raw."""
    import hashlib

    out: dict[str, str] = {}
    for name, header in table:
        value = params.get(name)
        if value is None:
            continue
        if name.endswith("SSECustomerKey"):
            raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            out[header] = base64.b64encode(raw).decode("ascii")
            if params.get(name + "MD5") is None:
                md5 = base64.b64encode(hashlib.md5(raw).digest()).decode("ascii")
                out[header + "-MD5"] = md5
        elif isinstance(value, datetime.datetime) or name.endswith("Since"):
            when = _timestamp_param(value)
            out[header] = _http_date(when) if when else str(value)
        elif isinstance(value, bool):
            out[header] = "true" if value else "false"
        else:
            out[header] = str(value)
    return out


def _precondition_failure(
    params: Mapping[str, Any], etag: str, modified: Any, prefix: str = ""
) -> tuple[int, str] | None:
    """S3's verdict on If-* conditions against an object we answer for ourselves (a
    delta's logical ETag is not the stored one): (412 or 304, the condition) or None.
    If-Match passing overrides a failing If-Unmodified-Since; a matching If-None-Match
    decides before If-Modified-Since (RFC 7232 section 6)."""

    def tags(value: str) -> list[str]:
        return [t.strip().strip('"') for t in value.split(",")]

    have = etag.strip('"')
    when = modified if isinstance(modified, datetime.datetime) else None
    if_match, if_none = params.get(prefix + "IfMatch"), params.get(prefix + "IfNoneMatch")
    if if_match is not None:
        if "*" not in tags(if_match) and have not in tags(if_match):
            return 412, "If-Match"
    elif params.get(prefix + "IfUnmodifiedSince") is not None and when is not None:
        limit = _timestamp_param(params[prefix + "IfUnmodifiedSince"])
        if limit is not None and when.replace(microsecond=0) > limit:
            return 412, "If-Unmodified-Since"
    if if_none is not None:
        if "*" in tags(if_none) or have in tags(if_none):
            return 304, "If-None-Match"
    elif params.get(prefix + "IfModifiedSince") is not None and when is not None:
        since = _timestamp_param(params[prefix + "IfModifiedSince"])
        if since is not None and when.replace(microsecond=0) <= since:
            return 304, "If-Modified-Since"
    return None


def _precondition_error(status: int, condition: str, operation: str) -> ClientError:
    """The error botocore raises for a failed condition: a HEAD (and any 304) has no
    body, so only the status and its reason; a GET's 412 carries S3's XML error."""
    import http.client

    if status == 304 or operation == "HeadObject":
        error = {"Code": str(status), "Message": http.client.responses.get(status, "")}
    else:
        error = {"Code": "PreconditionFailed", "Message": _PRECONDITION_MESSAGE}
        error["Condition"] = condition
    meta = _local_metadata({"ResponseMetadata": {"HTTPStatusCode": status}})
    return _client_error({"Error": error, "ResponseMetadata": meta}, operation)


def _delete_entries(spec: Any) -> list[dict[str, Any]]:
    """DeleteObjects' ``Delete`` argument, type-checked as botocore does."""
    errors = []
    objects = spec.get("Objects")
    if not isinstance(objects, (list, tuple)):
        errors.append(_type_report("Delete.Objects", objects, "<class 'list'>, <class 'tuple'>"))
        objects = []
    kinds = {"Key": str, "VersionId": str, "ETag": str, "Size": int}
    for i, entry in enumerate(objects):
        where = "Delete.Objects[%d]" % i
        if not isinstance(entry, dict):
            errors.append(_type_report(where, entry, "<class 'dict'>"))
            continue
        if "Key" not in entry:
            errors.append('Missing required parameter in %s: "Key"' % where)
        for name, value in entry.items():
            if name == "LastModifiedTime":
                if _timestamp_param(value) is None:
                    errors.append(
                        _type_report(
                            where + "." + name,
                            value,
                            "<class 'datetime.datetime'>, timestamp-string",
                        )
                    )
            elif name not in kinds:
                names = ", ".join(sorted([*kinds, "LastModifiedTime"]))
                errors.append(
                    'Unknown parameter in %s: "%s", must be one of: %s' % (where, name, names)
                )
            elif not isinstance(value, kinds[name]):
                errors.append(
                    _type_report(where + "." + name, value, "<class '%s'>" % kinds[name].__name__)
                )
    if errors:
        raise ParamValidationError(report="\n".join(errors))
    return list(objects)


# -- boto3's shapes: exceptions, paginators, listings, bodies ----------------------


class _ClientExceptions:
    """``client.exceptions.NoSuchKey`` and friends, as boto3 exposes them."""

    ClientError = ClientError

    def __init__(self) -> None:
        for name, cls in _MODELED_ERRORS.items():
            setattr(self, name, cls)

    def from_code(self, code: str) -> type:
        """The class botocore raises for an error code (ClientError when not modeled)."""
        return _MODELED_ERRORS.get(code, ClientError)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError("no modeled S3 exception %r" % name)


#: The listings ``get_paginator`` pages over, as botocore's S3 paginators do: the
#: operation, the request members that say where a page starts, the reply members that
#: name the next page (in the same order), the page-size member and the items counted
#: by MaxItems.
_PAGINATED: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str, str]] = {
    "list_objects": ("ListObjects", ("Marker",), ("NextMarker",), "MaxKeys", "Contents"),
    "list_objects_v2": (
        "ListObjectsV2",
        ("ContinuationToken",),
        ("NextContinuationToken",),
        "MaxKeys",
        "Contents",
    ),
    "list_multipart_uploads": (
        "ListMultipartUploads",
        ("KeyMarker", "UploadIdMarker"),
        ("NextKeyMarker", "NextUploadIdMarker"),
        "MaxUploads",
        "Uploads",
    ),
    "list_parts": (
        "ListParts",
        ("PartNumberMarker",),
        ("NextPartNumberMarker",),
        "MaxParts",
        "Parts",
    ),
}


class _Paginator:
    """``get_paginator(name)`` for the listings of ``_PAGINATED``: one page per request,
    as boto3's. ``StartingToken``: the value of the request marker (markers joined by
    ``___`` where there are two, botocore's plain form)."""

    def __init__(self, client: DeltaGliderClient, operation: str) -> None:
        if operation not in _PAGINATED:
            raise ValueError("deltaglider has paginators for %s only" % ", ".join(_PAGINATED))
        self._client = client
        self._operation = operation

    def paginate(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        operation, markers, next_markers, size_member, items = _PAGINATED[self._operation]
        pagination = kwargs.pop("PaginationConfig", None) or {}
        limit = pagination.get("MaxItems")
        page_size = pagination.get("PageSize")
        if page_size:
            kwargs[size_member] = page_size
        if pagination.get("StartingToken"):
            start = str(pagination["StartingToken"])
            kwargs.update(zip(markers, start.split("___") if len(markers) > 1 else [start]))
        seen = 0
        method = getattr(self._client, self._operation)

        def fetch(token: str | None) -> dict[str, Any]:
            import json

            if token is not None:
                kwargs.update(zip(markers, json.loads(token)))
            page: dict[str, Any] = method(**kwargs)
            return page

        def next_token(page: dict[str, Any]) -> str | None:
            import json

            values = [page.get(name) for name in next_markers]
            if self._operation == "list_objects" and not values[0]:  # no NextMarker: last key
                values = [(page.get("Contents") or [{}])[-1].get("Key")]
            return json.dumps(values) if any(values) else None

        for page in _pages(fetch, next_token, operation):
            seen += len(page.get(items, []))
            yield page
            if limit and seen >= limit:
                return


class _ListResponse(Dict[str, Any]):
    """A listing exactly as boto3 shapes it (no ``Contents`` key when nothing matched:
    ``'Contents' in resp`` is False, as s3-tests check), where ``resp['Contents']`` is
    still ``[]`` rather than a KeyError, as the original deltaglider's documentation
    loops over it."""

    def __missing__(self, key: str) -> Any:
        if key == "Contents":
            return []
        raise KeyError(key)


def _visible_prefixes(page: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [p for p in page.get("CommonPrefixes", []) if not _is_internal(p.get("Prefix", ""))]


class _TempBody(StreamingBody):
    """A StreamingBody over part of a rebuilt file (an open handle on it: _Rebuilds keeps
    the file while it is read); ``release`` is called once, when the body is closed."""

    def __init__(self, f: IO[bytes], start: int, length: int, release: Callable[[], None]) -> None:
        f.seek(start)
        super().__init__(_LimitedReader(f, length), length)
        self._file = f
        self._done: Callable[[], None] | None = release

    def close(self) -> None:
        super().close()
        self._file.close()
        done, self._done = self._done, None
        if done is not None:
            done()


class _Rebuilt:
    """One rebuilt, verified file that GETs share (see _Rebuilds)."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.path: str | None = None  # None until built; stays None when the build failed
        self.readers = 0
        self.idle_since = 0.0


class _Rebuilds:
    """Rebuilt delta-stored objects shared by the GETs that want the same one at once.
    aws-cli, s3transfer and rclone read a big object as ranges (8 MiB, several at a
    time): each ranged GET of a delta would otherwise rebuild the whole object again.
    The first GET rebuilds (engine.rebuild checks the SHA-256), the others wait for it
    and read their ranges from the same file. Entries are keyed by that checked SHA-256
    and the size: a file is served only for an object whose metadata, read by this very
    GET, names those bytes, so an object overwritten meanwhile has another key and is
    rebuilt. A file no GET reads is kept LINGER seconds (the next range of the same
    download is usually a moment away), at most KEEP of them, then removed."""

    LINGER = 5.0
    KEEP = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], _Rebuilt] = {}
        self._timer = False  # a timer is due to call expire()

    def open(self, engine: _DeltaEngine, lg: _Logical) -> tuple[IO[bytes], Callable[[], None]]:
        """An open handle on ``lg`` rebuilt and verified, and the function to call when
        done reading it."""
        key = (str(lg.sha256), lg.size)
        while True:
            with self._lock:
                entry = self._entries.get(key)
                build = entry is None
                if entry is None:
                    entry = self._entries[key] = _Rebuilt()
                entry.readers += 1
            if build:
                self._build(engine, lg, key, entry)
            else:
                entry.ready.wait()
            if entry.path is not None:
                try:
                    return open(entry.path, "rb"), functools.partial(self._release, key, entry)
                except BaseException:
                    self._release(key, entry)
                    raise
            self._release(key, entry)  # its build failed (and raised there): build again

    def _build(
        self, engine: _DeltaEngine, lg: _Logical, key: tuple[str, int], entry: _Rebuilt
    ) -> None:
        try:
            fd, tmp = _private_tempfile(engine.tmp_dir(), ".get")
            os.close(fd)
            try:
                engine.rebuild(lg, tmp)
            except BaseException:
                os.unlink(tmp)
                raise
            entry.path = tmp
        except BaseException:
            with self._lock:
                self._entries.pop(key, None)
                entry.readers -= 1
            raise
        finally:
            entry.ready.set()

    def _release(self, key: tuple[str, int], entry: _Rebuilt) -> None:
        with self._lock:
            entry.readers -= 1
            if entry.readers == 0:
                entry.idle_since = time.monotonic()
        self.expire()

    def expire(self) -> None:
        """Remove the files no GET reads that have been idle LINGER seconds, or are beyond
        the KEEP most recently read; while idle files remain, one timer comes back."""
        now = time.monotonic()
        with self._lock:
            idle = sorted(
                (e.idle_since, k) for k, e in self._entries.items() if e.readers == 0 and e.path
            )
            doomed = [
                k
                for i, (since, k) in enumerate(idle)
                if now - since >= self.LINGER or i < len(idle) - self.KEEP
            ]
            paths = [self._entries.pop(k).path for k in doomed]
            again = len(idle) > len(doomed) and not self._timer
            self._timer = self._timer or again
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(str(path))
        if again:
            timer = threading.Timer(self.LINGER, self._timer_expire)
            timer.daemon = True
            timer.start()

    def _timer_expire(self) -> None:
        with self._lock:
            self._timer = False
        self.expire()


class _LimitedReader:
    def __init__(self, f: IO[bytes], length: int) -> None:
        self._f = f
        self._left = length

    def read(self, amt: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        if amt is None or amt < 0 or amt > self._left:
            amt = self._left
        data = self._f.read(amt)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()


class _VerifyingBody(StreamingBody):
    """A direct object's body that checks its SHA-256 when read to the end."""

    def __init__(self, inner: StreamingBody, sha256: str, label: str) -> None:
        import hashlib

        super().__init__(inner, None)
        self._inner = inner
        self._expected = sha256
        self._label = label
        self._hash = hashlib.sha256()

    def read(self, amt: int | None = None) -> bytes:
        data = super().read(amt)
        self._hash.update(data)
        if self._eof and self._hash.hexdigest() != self._expected:
            raise IntegrityError(
                "%s: SHA-256 mismatch: expected %s, got %s"
                % (self._label, self._expected, self._hash.hexdigest())
            )
        return data

    def close(self) -> None:
        self._inner.close()
        super().close()


# -- Object operations: put, delete, get, copy, verify -----------------------------


def _spool_request_body(engine: _DeltaEngine, body: Any) -> tuple[str, _FileInfo]:
    """Write a request body (bytes, str or any file object) to a private temp file;
    returns its path and the digests of the caller's bytes, taken as they are written,
    never read back from the file: whatever is uploaded from it is checked against
    these (signed payload hash, the delta's decode check), so a file changed under us
    fails the upload instead of storing other bytes."""
    fd, path = _private_tempfile(engine.tmp_dir(), ".body")
    hashes = _Hashes(md5=True)

    def write(f: IO[bytes], data: bytes) -> None:
        hashes.update(data)
        f.write(data)

    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(body, str):
                write(f, body.encode("utf-8"))
            elif isinstance(body, (bytes, bytearray, memoryview)):
                write(f, bytes(body))
            elif hasattr(body, "read"):
                while True:
                    chunk = body.read(_IO_CHUNK)
                    if not chunk:
                        break
                    write(f, chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
            else:
                raise ParamValidationError(
                    report=_type_report(
                        "Body", body, "<class 'bytes'>, <class 'bytearray'>, file-like object"
                    )
                )
    except BaseException:
        os.unlink(path)
        raise
    return path, hashes.info()


#: PutObject's checksum parameters (AWS "Checking object integrity").
_CHECKSUM_PARAMS = frozenset({"ChecksumAlgorithm"} | {_checksum_param(a) for a in _CHECKSUMS})


def _bad_digest(message: str, operation: str) -> ClientError:
    return _client_error(
        {
            "Error": {"Code": "BadDigest", "Message": message},
            "ResponseMetadata": _local_metadata({"ResponseMetadata": {"HTTPStatusCode": 400}}),
        },
        operation,
    )


def _upload_checksum(params: Mapping[str, Any], path: str) -> tuple[str, str] | None:
    """The (algorithm, base64 value) checksum an upload keeps: the Checksum<ALGO> given,
    checked against the file (BadDigest when it differs, as S3 answers), or the one
    ``ChecksumAlgorithm`` names, computed (as boto3 computes it); None without either."""
    given = [a for a in _CHECKSUMS if params.get(_checksum_param(a)) is not None]
    algo = given[0] if given else str(params.get("ChecksumAlgorithm") or "").lower()
    if not algo:
        return None
    if algo not in _CHECKSUMS:
        raise ParamValidationError(
            report="Unsupported checksum algorithm: %s (one of %s)"
            % (params.get("ChecksumAlgorithm"), ", ".join(a.upper() for a in _CHECKSUMS))
        )
    value = _file_checksum(path, algo)
    if given and str(params[_checksum_param(algo)]) != value:
        raise _bad_digest(
            "The %s you specified did not match the calculated checksum." % algo.upper(),
            "PutObject",
        )
    return algo, value


def _put_object_from_file(
    engine: _DeltaEngine,
    path: str,
    params: Mapping[str, Any],
    info: _FileInfo | None = None,
    on_bytes: Callable[[int], None] | None = None,
    checksum: tuple[str, str] | None = None,
    parts: Sequence[int] = (),
    upload: str | None = None,
) -> dict[str, Any]:
    """PutObject of a file's bytes (``params`` as put_object's): stored as the engine
    stores a file (a delta where that pays), answered as PutObject, with DeltaGliderInfo.
    ``info`` holds the digests of the caller's bytes when they were spooled, ``checksum``
    an x-amz-checksum the caller already checked (else params' own is: _upload_checksum),
    ``parts`` the sizes of the parts it came in and ``upload`` the _upload_note of the
    multipart upload it completes.
    With ``IfNoneMatch``/``IfMatch``, the logical object is checked first and nothing is
    stored when the condition fails (_check_write_conditions)."""
    checksum = checksum or _upload_checksum(params, path)

    def store(if_none_match: bool = False) -> dict[str, Any]:
        # SSE-C: only the customer's key may read it, so no shared reference.
        delta = False if params.get("SSECustomerKey") is not None else None
        return engine.put_file(
            path,
            params["Bucket"],
            params["Key"],
            metadata=params.get("Metadata"),
            headers=_put_headers(params),
            delta=delta,
            info=info,
            on_bytes=on_bytes,
            if_none_match=if_none_match,
            checksum=checksum,
            parts=parts,
            upload=upload,
        )

    if params.get("IfNoneMatch") is None and params.get("IfMatch") is None:
        summary = store()
    else:
        # One conditional writer of a key at a time here; the check, then the store.
        with engine.key_lock(params["Bucket"], params["Key"]):
            _check_write_conditions(engine, params)
            summary = store(if_none_match=str(params.get("IfNoneMatch")).strip() == "*")
    resp = summary.pop("Response")
    out: dict[str, Any] = {"ETag": summary["ETag"]}
    for name in ("ServerSideEncryption", "VersionId"):
        if name in resp:
            out[name] = resp[name]
    if checksum is not None:
        out.update(_stored_checksum({_CHECKSUM_META + checksum[0]: checksum[1]}))
    out["ResponseMetadata"] = _local_metadata(resp)
    if summary["Operation"]:  # every upload says how it was stored, as 6.x
        out["DeltaGliderInfo"] = {
            k: summary[k]
            for k in (
                "OriginalSizeMB",
                "StoredSizeMB",
                "IsDelta",
                "CompressionRatio",
                "SavingsPercent",
                "StoredAs",
                "Operation",
            )
        }
        # Which reference the delta needs (a sibling folder's, with DG_REFERENCES=shared).
        if summary.get("ReferenceKey"):
            out["DeltaGliderInfo"]["ReferenceKey"] = summary["ReferenceKey"]
    return out


def _check_write_conditions(engine: _DeltaEngine, params: Mapping[str, Any]) -> None:
    """PutObject's ``IfNoneMatch="*"`` (create only) and ``IfMatch`` (replace only that
    version), AWS "Conditional writes", held against the logical object (a delta's ETag
    is its original's): PreconditionFailed (412) when one fails, NoSuchKey for IfMatch on
    a missing key. ``IfNoneMatch`` may also list ETags (as RGW takes it, and ceph
    s3-tests' conditional_write tests expect): it fails when the object has one of them."""
    bucket, key = params["Bucket"], params["Key"]
    if_none, if_match = params.get("IfNoneMatch"), params.get("IfMatch")
    try:  # a GET tells NoSuchKey from NoSuchBucket, when If-Match needs the key
        lg = engine.head(bucket, key, "PutObject" if if_match is not None else "HeadObject")
    except ClientError as e:
        if if_match is not None or not _is_not_found(e):
            raise
        return
    if if_none is not None and _precondition_failure({"IfNoneMatch": str(if_none)}, lg.etag, None):
        raise _precondition_error(412, "If-None-Match", "PutObject")
    if if_match is not None and _precondition_failure({"IfMatch": str(if_match)}, lg.etag, None):
        raise _precondition_error(412, "If-Match", "PutObject")


def _delete_plan(
    engine: _DeltaEngine, bucket: str, objects: list[dict[str, Any]]
) -> tuple[list[str], dict[str, dict[str, Any]], set[str]]:
    """The stored keys DeleteObjects' entries delete, the conditions to send on each,
    and the keys whose conditions do not hold on the logical object (they stay)."""
    stored: list[str] = []
    conditions: dict[str, dict[str, Any]] = {}
    refused: set[str] = set()
    for entry in objects:
        k = entry["Key"]
        cond = {n: entry[n] for n in ("ETag", "LastModifiedTime", "Size") if n in entry}
        if not cond:
            stored += _stored_forms(k)
            continue
        try:
            lg: _Logical | None = engine.head(bucket, k, "DeleteObjects")
        except ClientError as e:
            if not _is_not_found(e):
                raise
            lg = None
        if lg is None:
            stored.append(_stored_forms(k)[-1])  # the server answers for what is not there
            conditions[k] = cond
            continue
        logical = {
            "ETag": lg.etag,
            "LastModified": lg.head.get("LastModified"),
            "ContentLength": lg.size,
        }
        # Checked here first: some servers ignore some conditions (SeaweedFS deletes
        # whatever the Size), and a delta's logical ETag is not its stored one.
        if not _delete_conditions_hold(logical, cond):
            refused.add(k)
            continue
        # Then sent, so that the server refuses too if the object changed meanwhile.
        stored.append(lg.stored_key)
        if lg.kind == _Kind.DELTA:
            conditions[lg.stored_key] = {"ETag": lg.head.get("ETag")}
        else:
            conditions[k] = cond
    return stored, conditions, refused


def _delete_logical_objects(
    engine: _DeltaEngine, bucket: str, objects: list[dict[str, Any]], quiet: bool
) -> dict[str, Any]:
    """DeleteObjects of logical keys (delete_objects, its entries checked): the stored
    forms go in batches, then the references no delta needs any more."""
    keys = [o["Key"] for o in objects]
    storage = engine.storage
    errors: list[dict[str, Any]] = []
    if len(objects) > _DELETE_BATCH:
        # boto3 sends them all and the server says no (MalformedXML on S3): ask it.
        resp = storage.delete_objects(bucket, keys, check_limit=False)
        errors += resp.get("Errors", [])
    stored, conditions, refused = _delete_plan(engine, bucket, objects)
    for i in range(0, len(stored), _DELETE_BATCH):
        batch = stored[i : i + _DELETE_BATCH]
        resp = storage.delete_objects(
            bucket, batch, conditions={k: conditions[k] for k in batch if k in conditions}
        )
        errors += resp.get("Errors", [])
    engine.drop_unused_near(bucket, [_deltaspace(k) for k in keys])
    errors += [
        {"Key": k, "Code": "PreconditionFailed", "Message": _PRECONDITION_MESSAGE}
        for k in sorted(refused)
    ]
    failed = {e["Key"] for e in errors}
    out: dict[str, Any] = {}
    done = [{"Key": k} for k in keys if not failed.intersection(_stored_forms(k))]
    if done and not quiet:
        out["Deleted"] = done
    logical_errors = [dict(e, Key=_logical_key(e["Key"]) or e["Key"]) for e in errors]
    if logical_errors:
        out["Errors"] = logical_errors
    out["ResponseMetadata"] = {
        "HTTPStatusCode": 200,
        "RetryAttempts": 0,
        "RequestId": "",
        "HostId": "",
        "HTTPHeaders": {},
    }
    return out


def _logical_response(lg: _Logical) -> dict[str, Any]:
    """What GetObject and HeadObject say of a logical object, from its HEAD."""
    out: dict[str, Any] = {}
    head = lg.head
    for key in (
        "AcceptRanges",
        "LastModified",
        "CacheControl",
        "ContentDisposition",
        "ContentEncoding",
        "ContentLanguage",
        "Expires",
        "ExpiresString",
        "ServerSideEncryption",
        "SSEKMSKeyId",
        "StorageClass",
        "TagCount",
        "VersionId",
    ):
        if key in head:
            out[key] = head[key]
    out.setdefault("AcceptRanges", "bytes")
    out["ContentLength"] = lg.size
    out["ETag"] = lg.etag
    out["ContentType"] = lg.content_type
    out["Metadata"] = _user_metadata(lg.metadata)
    return out


def _object_attributes(lg: _Logical, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """GetObjectAttributes of a logical object: the ``ObjectAttributes`` asked for, of the
    original bytes (a delta's too); ObjectParts for an object uploaded in parts, paged by
    ``MaxParts`` / ``PartNumberMarker`` as S3 pages it."""
    wanted = set(kwargs["ObjectAttributes"])
    out: dict[str, Any] = {"LastModified": lg.head.get("LastModified")}
    if "ETag" in wanted:
        out["ETag"] = lg.etag.strip('"')
    if "Checksum" in wanted and _stored_checksum(lg.metadata):
        out["Checksum"] = _stored_checksum(lg.metadata)
    sizes = _part_sizes(lg.metadata)
    if "ObjectParts" in wanted and sizes:
        marker, most = int(kwargs.get("PartNumberMarker") or 0), int(kwargs.get("MaxParts", 1000))
        shown = list(enumerate(sizes, 1))[marker : marker + most]
        out["ObjectParts"] = {
            "TotalPartsCount": len(sizes),
            "PartNumberMarker": marker,
            "NextPartNumberMarker": shown[-1][0] if shown else marker,
            "MaxParts": most,
            "IsTruncated": marker + most < len(sizes),
            "Parts": [{"PartNumber": n, "Size": size} for n, size in shown],
        }
    if "StorageClass" in wanted:
        out["StorageClass"] = lg.head.get("StorageClass") or "STANDARD"
    if "ObjectSize" in wanted:
        out["ObjectSize"] = lg.size
    out["ResponseMetadata"] = _local_metadata(lg.head)
    return out


def _get_rebuilt(
    engine: _DeltaEngine,
    rebuilds: _Rebuilds,
    lg: _Logical,
    kwargs: Mapping[str, Any],
    out: dict[str, Any],
) -> tuple[dict[str, Any], int]:
    """GetObject of a delta-stored key into ``out``: conditions and ``Range`` decided here
    on the logical object; the body is the rebuilt, verified file (shared by the GETs of
    the same object at once: _Rebuilds). Returns the response metadata and the status."""
    size = lg.size
    status = 200
    failed = _precondition_failure(kwargs, lg.etag, lg.head.get("LastModified"))
    if failed:
        raise _precondition_error(failed[0], failed[1], "GetObject")
    try:
        span = _byte_range(kwargs.get("Range"), size)
    except _RangeNotSatisfiable as e:
        raise e.client_error("GetObject") from None
    f, release = rebuilds.open(engine, lg)
    start, end = 0, size - 1
    meta = _local_metadata(lg.head)
    headers = dict(meta.get("HTTPHeaders") or {})
    if span is not None:
        start, end = span
        out["ContentRange"] = "bytes %d-%d/%d" % (start, end, size)
        headers["content-range"] = out["ContentRange"]
        status = 206
    out["Body"] = _TempBody(f, start, end - start + 1, release)
    out["ContentLength"] = end - start + 1
    headers["content-length"] = str(end - start + 1)
    headers["etag"] = lg.etag
    meta["HTTPHeaders"] = headers
    return meta, status


def _get_plain_first(
    engine: _DeltaEngine, kwargs: Mapping[str, Any], extra: Mapping[str, str]
) -> tuple[_Logical, dict[str, Any]] | None:
    """GetObject in one round trip for an object stored as it is (most small files): a
    whole, unconditional GET of the plain name, whose headers say what it is as a HEAD's
    would. The logical object and that response; None (the response closed) when there
    is no plain object, or it is a delta or a reference: engine.head resolves the name
    then, as every GET did before. A Range or a condition is decided on the logical
    object, so those GETs resolve it first."""
    bucket, key = kwargs["Bucket"], kwargs["Key"]
    conditional = any(kwargs.get(name) is not None for name, _ in _CONDITION_PARAMS)
    if kwargs.get("Range") or conditional or _stored_forms(key)[0] != key:
        return None
    _validate_key(key)
    try:
        resp = engine.storage.get_object(
            bucket, key, headers=dict(extra), query=_override_query(kwargs)
        )
    except ClientError as e:
        if _is_not_found(e):
            return None
        raise
    metadata = resp.get("Metadata", {})
    kind = _classify(key, metadata)
    if kind not in (_Kind.DIRECT, _Kind.FOREIGN):
        resp["Body"].close()
        return None
    return _Logical(bucket, key, key, kind, resp, metadata), resp


def _override_query(kwargs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The ``response-*`` query of GetObject's ``Response*`` overrides."""
    query = []
    for name, field, _ in _GET_OVERRIDE_PARAMS:
        value = kwargs.get(name)
        if value is not None:
            when = _timestamp_param(value) if name == "ResponseExpires" else None
            query.append((field, _http_date(when) if when else str(value)))
    return query


def _get_stored(
    engine: _DeltaEngine,
    lg: _Logical,
    kwargs: Mapping[str, Any],
    extra: Mapping[str, str],
    out: dict[str, Any],
    resp: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], int]:
    """GetObject of an object stored as it is into ``out``: conditions, ``Range`` and
    overrides are the server's; a whole body is checked against its recorded SHA-256
    as it is read. ``resp``: the server's answer, when _get_plain_first has it. Returns
    the response metadata and the status."""
    bucket, key = kwargs["Bucket"], kwargs["Key"]
    sent_range = _range_to_send(kwargs.get("Range"), int(lg.head.get("ContentLength", 0)))
    if resp is None:
        resp = engine.storage.get_object(
            bucket,
            lg.stored_key,
            range=sent_range,
            headers=dict(extra, **_header_params(kwargs, _CONDITION_PARAMS)),
            query=_override_query(kwargs),
        )
    status = resp["ResponseMetadata"].get("HTTPStatusCode", 200)
    for name in ("ContentLength", "ContentRange", "LastModified"):
        if name in resp:
            out[name] = resp[name]
    body = resp["Body"]
    if sent_range is None and lg.sha256:
        body = _VerifyingBody(body, lg.sha256, "s3://%s/%s" % (bucket, key))
    out["Body"] = body
    meta = _local_metadata(resp)
    return meta, status


def _echo_response_overrides(kwargs: Mapping[str, Any], out: dict[str, Any]) -> None:
    """The ``Response*`` overrides asked for, in the response as S3 answers them."""
    for name, _, field in _GET_OVERRIDE_PARAMS:
        if kwargs.get(name) is not None:
            value = kwargs[name]
            if field == "Expires":
                when = _timestamp_param(value)
                out["ExpiresString"] = _http_date(when) if when else str(value)
                if when:
                    out["Expires"] = when
            else:
                out[field] = value


def _copy_source(src: Any) -> tuple[str, str]:
    """CopyObject's ``CopySource`` (``bucket/key``, URL-quoted, or a dict) as (bucket, key)."""
    import urllib.parse

    if isinstance(src, str):
        text = urllib.parse.unquote(src.lstrip("/"))
        src_bucket, _, src_key = text.partition("/")
        if "?versionId=" in src_key:
            raise ParamValidationError(report="CopySource versionId is not supported")
    elif isinstance(src, dict) and isinstance(src.get("Bucket"), str):
        src_bucket, src_key = src["Bucket"], src.get("Key") or ""
        if not isinstance(src_key, str) or not src_key:
            raise ParamValidationError(
                report=_type_report("CopySource.Key", src_key, "<class 'str'>")
            )
    else:
        raise ParamValidationError(
            report=_type_report("CopySource", src, "<class 'str'>, <class 'dict'>")
        )
    return src_bucket, src_key


def _copy_logical_object(
    engine: _DeltaEngine,
    kwargs: Mapping[str, Any],
    src_bucket: str,
    src_key: str,
    now: Callable[[], datetime.datetime],
) -> dict[str, Any]:
    """CopyObject (copy_object, its source parsed): the source's conditions hold on the
    logical object; it is read whole (rebuilt if a delta) and stored as put_object stores
    a file, with its metadata unless ``MetadataDirective=REPLACE``."""
    source_headers = {
        h.replace("copy-source-", "", 1): v
        for h, v in _header_params(kwargs, _COPY_SSEC_HEADER_PARAMS).items()
    }
    if kwargs.get("ExpectedSourceBucketOwner"):
        source_headers["x-amz-expected-bucket-owner"] = kwargs["ExpectedSourceBucketOwner"]
    lg = engine.head(src_bucket, src_key, "GetObject", headers=source_headers)
    failed = _precondition_failure(
        kwargs, lg.etag, lg.head.get("LastModified"), prefix="CopySource"
    )
    if failed:  # a copy answers 412 for every failed condition (S3 CopyObject docs)
        raise _precondition_error(412, "x-amz-copy-source-" + failed[1].lower(), "CopyObject")
    directive = kwargs.get("MetadataDirective", "COPY")
    params = {k: v for k, v in kwargs.items() if not k.startswith("CopySource")}
    params.pop("ExpectedSourceBucketOwner", None)
    if directive == "COPY":
        params["Metadata"] = _user_metadata(lg.metadata)
        params.setdefault("ContentType", lg.content_type)
        for name in (
            "CacheControl",
            "ContentDisposition",
            "ContentEncoding",
            "ContentLanguage",
            "Expires",
        ):
            if name in lg.head:
                params.setdefault(name, lg.head[name])
    fd, tmp = _private_tempfile(engine.tmp_dir(), ".copy")
    os.close(fd)
    try:
        engine.get_to_file(src_bucket, src_key, tmp, logical=lg)
        result = _put_object_from_file(engine, tmp, params)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    out: dict[str, Any] = {
        "CopyObjectResult": {
            "ETag": result["ETag"],
            "LastModified": now().replace(microsecond=0),
        },
        "ResponseMetadata": result["ResponseMetadata"],
    }
    if "DeltaGliderInfo" in result:
        out["DeltaGliderInfo"] = result["DeltaGliderInfo"]
    return out


# -- Logical listing: references and bookkeeping hidden, logical names -------------


class _PageSpan(NamedTuple):
    """What a listing remembers of the stored page before the current one: its first and
    last stored keys and the plain ones among them (to place a plain ``x`` that sorts
    before its ``x.delta`` without a HEAD)."""

    first: str
    last: str
    plain: frozenset[str]


def _page_span(page: Mapping[str, Any]) -> _PageSpan | None:
    keys = [o["Key"] for o in page.get("Contents", [])]
    if not keys:
        return None
    plain = frozenset(k for k in keys if not k.endswith(_DELTA_SUFFIX))
    return _PageSpan(keys[0], keys[-1], plain)


def _logical_page(
    engine: _DeltaEngine,
    bucket: str,
    page: dict[str, Any],
    after: str | None,
    fetch: bool,
    continued: bool,
    max_workers: int,
    previous: _PageSpan | None = None,
) -> list[dict[str, Any]]:
    """Hide references, show logical names (_logical_key), each once: where another
    tool put a plain ``x`` beside our ``x.delta``, the plain one is listed, as GET
    serves it. ``continued``: earlier pages exist (a plain ``x`` sorts before
    ``x.delta``, so it may have been on one): the page just before (``previous``) tells
    without a request; a HEAD asks only when ``x`` would sort before it. With ``fetch``
    add the logical size and the compression details (HEADs run in parallel,
    ``max_workers`` at once)."""
    objects = page.get("Contents", [])
    plain = {o["Key"] for o in objects if not o["Key"].endswith(_DELTA_SUFFIX)}
    first = objects[0]["Key"] if objects else ""

    def listed_before(logical: str) -> bool:
        if not continued or logical >= first:
            return False
        if previous is not None and logical >= previous.first:
            return logical in previous.plain
        if previous is not None and logical > previous.last:
            return False  # between the two pages: nothing is stored there
        return engine.exists(bucket, logical)

    contents = []
    for obj in objects:
        stored = obj["Key"]
        logical = _logical_key(stored)
        if logical is None or (after is not None and logical <= after):
            continue
        if _stored_forms(logical)[0] != stored:  # a delta whose plain form wins
            if logical in plain or listed_before(logical):
                continue
        item = dict(obj)
        item["Key"] = logical
        if fetch:
            item["_stored"] = stored
        contents.append(item)
    if fetch and contents:
        _fetch_details(engine.storage, bucket, contents, max_workers)
    return contents


def _logical_pages(
    engine: _DeltaEngine,
    bucket: str,
    prefix: str,
    delimiter: str,
    fetch: bool,
    max_workers: int,
    stored: set[str] | None = None,
) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """A whole logical listing as it streams: (objects, common prefixes) for each stored
    page, as :func:`_logical_page` shows it (a page holds fewer than 1,000 where it hides
    references; no request tops it up). The next stored page is fetched while the caller
    handles this one (and while this one's HEADs run, with ``fetch``): two pages in
    memory at most, whatever the listing's length. ``stored`` gets every stored key."""
    storage = engine.storage
    if delimiter or not isinstance(storage, _S3Storage):  # a local store lists fast alone
        pages = _read_ahead(_list_pages(storage, bucket, prefix=prefix, delimiter=delimiter))
    else:
        pages = _ordered_pages(storage, bucket, prefix, min(max_workers, _LIST_WORKERS))
    previous: _PageSpan | None = None
    for n, page in enumerate(pages):
        if stored is not None:
            stored.update(o["Key"] for o in page.get("Contents", []))
        objects = _logical_page(engine, bucket, page, None, fetch, n > 0, max_workers, previous)
        yield objects, _visible_prefixes(page)
        previous = _page_span(page) or previous


def _fetch_details(
    storage: _Storage, bucket: str, contents: list[dict[str, Any]], max_workers: int
) -> None:
    """FetchMetadata: each listed delta's logical size and ETag, and every entry's
    compression details (``deltaglider-*``), from the deltas' metadata."""

    import concurrent.futures

    def one(item: dict[str, Any]) -> None:
        stored = item.pop("_stored")
        is_delta = stored.endswith(_DELTA_SUFFIX)
        meta: dict[str, str] = {}
        if is_delta:
            try:
                meta = storage.head_object(bucket, stored).get("Metadata", {})
            except ClientError:
                meta = {}
        original = _meta_get(meta, "file_size") if is_delta else None
        size = int(original) if original and original.isdigit() else item["Size"]
        stored_size = item["Size"]
        item["Size"] = size
        md5 = _meta_get(meta, "md5") if is_delta else None
        if md5:  # the logical ETag, as head_object reports it (rclone check compares)
            item["ETag"] = '"%s"' % md5
        details = {
            "deltaglider-is-delta": "true" if is_delta else "false",
            "deltaglider-original-size": str(size),
            "deltaglider-stored-size": str(stored_size),
            "deltaglider-compression-ratio": "%.4f" % (stored_size / size if size else 1.0),
        }
        if is_delta:
            ref = _meta_get(meta, "ref") or _REFERENCE_NAME
            details["deltaglider-reference-key"] = _resolve_ref_key(stored, ref)
        item["Metadata"] = details

    deltas = [c for c in contents if c["_stored"].endswith(_DELTA_SUFFIX)]
    for item in contents:
        if not item["_stored"].endswith(_DELTA_SUFFIX):
            one(item)  # no request needed
    if deltas:
        workers = min(max_workers, len(deltas))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, deltas))


def _verify_logical(engine: _DeltaEngine, bucket: str, key: str) -> VerifyResult:
    """verify: the object read back whole into a temp file (a delta rebuilt), with every
    integrity check reading applies; a failed check is the result, not an exception."""
    lg = engine.head(bucket, key, "GetObject")
    fd, path = _private_tempfile(engine.tmp_dir(), ".verify")
    os.close(fd)
    try:
        try:
            if lg.kind == _Kind.DELTA:
                engine.rebuild(lg, path)
            else:
                engine.fetch_plain(lg, path)
            valid, message = True, "Integrity verified"
        except IntegrityError as e:
            valid, message = False, str(e)
        actual = _hash_file(path).sha256 if os.path.getsize(path) or valid else ""
    finally:
        os.unlink(path)
    if lg.kind == _Kind.FOREIGN:
        message = "no SHA-256 recorded (not written by deltaglider); read back completely"
    result = VerifyResult(
        valid=valid,
        kind=lg.kind,
        expected_sha256=lg.sha256,
        actual_sha256=actual,
        message=message,
    )
    if lg.kind == _Kind.DELTA:
        ref = _meta_get(lg.metadata, "ref") or _REFERENCE_NAME
        result["reference_key"] = _resolve_ref_key(lg.stored_key, ref)
    return result


# -- The client --------------------------------------------------------------------


class DeltaGliderClient:
    """A boto3 S3 client look-alike whose objects are stored as deltas where that pays.

    Build it with :func:`create_client`. Methods take boto3's parameters and return
    boto3's response shapes; delta-stored objects read back as the original bytes."""

    def __init__(
        self,
        storage_factory: Callable[[], _Storage],
        *,
        cache_dir: str,
        max_ratio: float,
        archive_aware: bool = False,
        xdelta: _XDelta3,
        environ: Mapping[str, str],
        now: Callable[[], datetime.datetime],
        max_workers: int = 10,
        references: str = _REFERENCES_SHARED,
    ) -> None:
        self._references = references
        self._storage_factory = storage_factory
        self._storage: _Storage | None = None
        self._engine_obj: _DeltaEngine | None = None
        self._lock = threading.Lock()
        self._cache_dir = cache_dir
        self._max_ratio = max_ratio
        self._archive_aware = archive_aware
        self._xdelta = xdelta
        self._environ = environ
        self._now = now
        self._max_workers = max_workers
        self.exceptions = _ClientExceptions()
        self._multipart = _MultipartUploads(lambda: self.engine, now)
        self._rebuilds = _Rebuilds()

    # -- plumbing -----------------------------------------------------------------

    @property
    def engine(self) -> _DeltaEngine:
        """deltaglider's delta engine under this client (made on first use), for the CLI
        and the gateway: not part of boto3's API. Its public methods are its boundary."""
        if self._engine_obj is None:
            with self._lock:
                if self._engine_obj is None:
                    self._storage = self._storage_factory()
                    cache_max = _env_setting(self._environ, _ENV_CACHE_MAX)
                    self._engine_obj = _DeltaEngine(
                        self._storage,
                        cache=_ReferenceCache(self._cache_dir, cache_max),
                        xdelta=self._xdelta,
                        max_ratio=self._max_ratio,
                        environ=self._environ,
                        now=self._now,
                        archive_aware=self._archive_aware,
                        references=self._references,
                    )
        return self._engine_obj

    @property
    def storage(self) -> _Storage:
        """The raw storage (S3 over HTTP, or a local directory) under the deltas."""
        return self.engine.storage

    def close(self) -> None:
        if self._storage is not None:
            self._storage.close()

    def __enter__(self) -> DeltaGliderClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def get_paginator(self, operation_name: str) -> _Paginator:
        return _Paginator(self, operation_name)

    def can_paginate(self, operation_name: str) -> bool:
        return operation_name in _PAGINATED

    # -- objects ------------------------------------------------------------------

    def put_object(self, **kwargs: Any) -> dict[str, Any]:
        """PutObject. ``Body`` may be bytes, str or a file object of any size."""
        allowed = {"Bucket", "Key", "Body", "IfNoneMatch", "IfMatch"} | _PUT_PARAMS
        _params("PutObject", kwargs, allowed | _CHECKSUM_PARAMS, "Bucket", "Key")
        body = kwargs.get("Body", b"")
        path, info = _spool_request_body(self.engine, body if body is not None else b"")
        try:
            if kwargs.get("ContentMD5"):
                given = base64.b64decode(kwargs["ContentMD5"]).hex()
                if given != info.md5:
                    raise _bad_digest(
                        "The Content-MD5 you specified did not match what we received.",
                        "PutObject",
                    )
            return _put_object_from_file(self.engine, path, kwargs, info)
        finally:
            os.unlink(path)

    def head_object(self, **kwargs: Any) -> dict[str, Any]:
        """HeadObject of a logical key. Conditions (``IfMatch``...) hold against the
        logical object; the server decides them for objects stored as they are."""
        allowed = {"Bucket", "Key"} | {n for n, _ in _READ_HEADER_PARAMS + _CONDITION_PARAMS}
        _params("HeadObject", kwargs, allowed, "Bucket", "Key")
        bucket, key = kwargs["Bucket"], kwargs["Key"]
        extra = _header_params(kwargs, _READ_HEADER_PARAMS)
        lg = self.engine.head(bucket, key, "HeadObject", headers=extra)
        head = lg.head
        conditions = _header_params(kwargs, _CONDITION_PARAMS)
        if conditions and lg.kind != _Kind.DELTA:
            head = self.engine.storage.head_object(
                bucket, lg.stored_key, headers=dict(extra, **conditions)
            )
            lg = lg._replace(head=head)
        elif conditions:
            failed = _precondition_failure(kwargs, lg.etag, head.get("LastModified"))
            if failed:
                raise _precondition_error(failed[0], failed[1], "HeadObject")
        out = _logical_response(lg)
        if kwargs.get("ChecksumMode") == "ENABLED":
            out.update(_stored_checksum(lg.metadata))
        out["ResponseMetadata"] = _local_metadata(head)
        return out

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        """GetObject: the original bytes of a delta-stored key, rebuilt and verified first.
        ``Range`` works on every kind of object; conditions and ``Response*`` overrides
        are the server's for objects stored as they are, ours (the same rules) for deltas."""
        allowed = {"Bucket", "Key", "Range"} | {n for n, _, _ in _GET_OVERRIDE_PARAMS}
        allowed |= {n for n, _ in _READ_HEADER_PARAMS + _CONDITION_PARAMS}
        _params("GetObject", kwargs, allowed, "Bucket", "Key")
        bucket, key = kwargs["Bucket"], kwargs["Key"]
        engine = self.engine
        extra = _header_params(kwargs, _READ_HEADER_PARAMS)
        plain = _get_plain_first(engine, kwargs, extra)
        if plain is not None:
            lg, resp = plain
            out = _logical_response(lg)
            meta, status = _get_stored(engine, lg, kwargs, extra, out, resp)
        else:
            lg = engine.head(bucket, key, "GetObject", headers=extra)
            out = _logical_response(lg)
            if lg.kind == _Kind.DELTA:
                meta, status = _get_rebuilt(engine, self._rebuilds, lg, kwargs, out)
            else:
                meta, status = _get_stored(engine, lg, kwargs, extra, out)
        if kwargs.get("ChecksumMode") == "ENABLED" and status == 200:  # of the whole object
            out.update(_stored_checksum(lg.metadata))
        _echo_response_overrides(kwargs, out)
        meta["HTTPStatusCode"] = status
        out["ResponseMetadata"] = meta
        return out

    def get_object_attributes(self, **kwargs: Any) -> dict[str, Any]:
        """GetObjectAttributes of a logical key (_object_attributes)."""
        allowed = {"Bucket", "Key", "ObjectAttributes", "MaxParts", "PartNumberMarker"}
        allowed |= {n for n, _ in _COMMON_HEADER_PARAMS + _SSEC_HEADER_PARAMS}
        _params("GetObjectAttributes", kwargs, allowed, "Bucket", "Key", "ObjectAttributes")
        lg = self.engine.head(kwargs["Bucket"], kwargs["Key"], "GetObjectAttributes")
        return _object_attributes(lg, kwargs)

    def delete_object(self, **kwargs: Any) -> dict[str, Any]:
        _params("DeleteObject", kwargs, {"Bucket", "Key"}, "Bucket", "Key")
        info = self.engine.delete(kwargs["Bucket"], kwargs["Key"])
        out: dict[str, Any] = {
            "ResponseMetadata": {
                "HTTPStatusCode": 204,
                "RetryAttempts": 0,
                "RequestId": "",
                "HostId": "",
                "HTTPHeaders": {},
            }
        }
        if info.get("Type") not in ("missing", _Kind.DIRECT, _Kind.FOREIGN):
            out["DeltaGliderInfo"] = info
        return out

    def delete_objects(self, **kwargs: Any) -> dict[str, Any]:
        """DeleteObjects: each logical key goes (``<key>`` and ``<key>.delta``), then the
        references no delta needs any more. An entry's ``ETag``/``LastModifiedTime``/``Size``
        conditions are checked on the logical object and sent on the stored one: a key
        whose conditions do not hold stays (PreconditionFailed), on every server."""
        _params(
            "DeleteObjects",
            kwargs,
            {"Bucket", "Delete", "ExpectedBucketOwner", "RequestPayer", "MFA"}
            | {"BypassGovernanceRetention", "ChecksumAlgorithm"},
            "Bucket",
            "Delete",
        )
        spec = kwargs["Delete"]
        objects = _delete_entries(spec)
        for entry in objects:
            _validate_key(entry["Key"])
        quiet = bool(spec.get("Quiet"))
        return _delete_logical_objects(self.engine, kwargs["Bucket"], objects, quiet)

    def copy_object(self, **kwargs: Any) -> dict[str, Any]:
        """CopyObject of a logical object: a delta-stored source is rebuilt and stored
        again at the destination (in the destination's deltaspace)."""
        allowed = {"Bucket", "Key", "CopySource", "MetadataDirective", "TaggingDirective"}
        allowed |= _PUT_PARAMS | {n for n, _ in _COPY_CONDITION_PARAMS + _COPY_SSEC_HEADER_PARAMS}
        allowed |= {"ExpectedSourceBucketOwner"}
        _params("CopyObject", kwargs, allowed, "Bucket", "Key", "CopySource")
        src_bucket, src_key = _copy_source(kwargs["CopySource"])
        try:
            return _copy_logical_object(self.engine, kwargs, src_bucket, src_key, self._now)
        except ClientError as e:  # the source's HEAD and GET, the destination's PUT
            if e.operation_name == "CopyObject":
                raise
            raise _as_operation(e, "CopyObject", keep_multipart=False) from None

    # -- listing ------------------------------------------------------------------

    def _list_logical(self, kwargs: Mapping[str, Any], marker: str | None) -> dict[str, Any]:
        """Pages of stored keys until ``MaxKeys`` logical entries (keys and common
        prefixes) are in hand or the listing ends: references and our bookkeeping are
        hidden, so one stored page may hold fewer. Each request asks for no more than is
        still missing, so a page never overshoots and the server's token stays exact."""
        bucket = kwargs["Bucket"]
        max_keys = kwargs.get("MaxKeys")
        max_keys = 1000 if max_keys is None else max_keys
        token = kwargs.get("ContinuationToken") or None
        start_after = kwargs.get("StartAfter") or marker
        after = start_after
        fetch = bool(kwargs.get("FetchMetadata"))
        storage = self.engine.storage
        contents: list[dict[str, Any]] = []
        prefixes: list[dict[str, Any]] = []
        target = min(max_keys, 1000)  # S3 never returns more per page, whatever is asked

        def fetch_page(token: str | None) -> dict[str, Any]:
            want = max(0, target - len(contents) - len(prefixes))
            page: dict[str, Any] = storage.list_objects_v2(
                bucket,
                prefix=kwargs.get("Prefix") or "",
                delimiter=kwargs.get("Delimiter") or "",
                max_keys=min(want, 1000) if max_keys > 0 else max_keys,
                continuation_token=token,
                start_after=None if token else start_after,
                fetch_owner=bool(kwargs.get("FetchOwner")),
                decode=kwargs.get("EncodingType") != "url",
            )
            return page

        # _pages stops a server that repeats a token or truncates without one
        pages = _pages(fetch_page, lambda p: p.get("NextContinuationToken"), "ListObjectsV2", token)
        previous: _PageSpan | None = None
        for n, page in enumerate(pages):
            continued = n > 0 or token is not None
            contents += _logical_page(
                self.engine, bucket, page, after, fetch, continued, self._max_workers, previous
            )
            previous = _page_span(page) or previous
            prefixes += _visible_prefixes(page)
            stored = [c["Key"] for c in page.get("Contents", [])]
            stored += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            last = max(stored) if stored else None
            truncated = bool(page.get("IsTruncated"))
            next_token = page.get("NextContinuationToken")
            if len(contents) + len(prefixes) >= target:
                break
        return {
            "page": page,
            "contents": contents,
            "prefixes": prefixes,
            "truncated": truncated,
            "next_token": next_token if truncated else None,
            "last": last,
            "max_keys": max_keys,
        }

    def _url_encoded(self, kwargs: Mapping[str, Any], value: str) -> str:
        """A key or prefix as S3 returns it when the caller asked EncodingType='url'
        itself (botocore then hands it over encoded; it decodes only what it asked for)."""
        import urllib.parse

        if kwargs.get("EncodingType") == "url":
            return urllib.parse.quote_plus(value, safe="/")  # S3 writes a space as "+"
        return value

    def _list_common(self, kwargs: Mapping[str, Any], got: dict[str, Any]) -> dict[str, Any]:
        # Keys and prefixes come from the server, encoded by it when the caller asked
        # EncodingType='url' (the storage then leaves them so); our echoes are encoded here.
        enc = functools.partial(self._url_encoded, kwargs)
        out: dict[str, Any] = {}
        contents = got["contents"]
        if contents:
            out["Contents"] = contents
        out["Name"] = kwargs["Bucket"]
        out["Prefix"] = enc(kwargs.get("Prefix") or "")
        if kwargs.get("Delimiter"):
            out["Delimiter"] = enc(kwargs["Delimiter"])
        out["MaxKeys"] = got["max_keys"]
        if got["prefixes"]:
            out["CommonPrefixes"] = [{"Prefix": p["Prefix"]} for p in got["prefixes"]]
        out["EncodingType"] = "url"  # asked for and decoded, as botocore does
        return out

    def list_objects_v2(self, **kwargs: Any) -> dict[str, Any]:
        """ListObjectsV2 of logical keys. ``Size`` is what is stored unless
        ``FetchMetadata=True`` (then the logical size and compression details)."""
        allowed = {
            "Bucket",
            "Prefix",
            "Delimiter",
            "MaxKeys",
            "ContinuationToken",
            "StartAfter",
            "EncodingType",
            "FetchOwner",
            "FetchMetadata",
            "ExpectedBucketOwner",
            "RequestPayer",
            "OptionalObjectAttributes",
        }
        _params("ListObjectsV2", kwargs, allowed, "Bucket")
        got = self._list_logical(kwargs, None)
        # Keys and prefixes come from the server, encoded by it when the caller asked
        # EncodingType='url' (the storage then leaves them so); our echoes are encoded here.
        enc = functools.partial(self._url_encoded, kwargs)
        page = _list_v2_page(
            kwargs["Bucket"],
            enc(kwargs.get("Prefix") or ""),
            got["max_keys"],
            got["contents"],
            [{"Prefix": p["Prefix"]} for p in got["prefixes"]],
            truncated=got["truncated"],
            next_token=got["next_token"],
            delimiter=enc(kwargs.get("Delimiter") or ""),
            start_after=enc(kwargs.get("StartAfter") or ""),
            continuation_token=kwargs.get("ContinuationToken"),  # echoed, even ""
        )
        out: dict[str, Any] = _ListResponse(page)
        out["ResponseMetadata"] = _local_metadata(got["page"])
        return out

    def list_objects(self, **kwargs: Any) -> dict[str, Any]:
        """ListObjects (v1) of logical keys, with ``Marker``/``NextMarker`` paging; the
        original deltaglider's ``ContinuationToken``/``StartAfter``/``FetchMetadata`` work
        too, and a truncated page carries ``NextContinuationToken`` for them."""
        allowed = {
            "Bucket",
            "Prefix",
            "Delimiter",
            "MaxKeys",
            "Marker",
            "EncodingType",
            "FetchMetadata",
            "ContinuationToken",
            "StartAfter",
            "ExpectedBucketOwner",
            "RequestPayer",
            "OptionalObjectAttributes",
        }
        _params("ListObjects", kwargs, allowed, "Bucket")
        marker = kwargs.get("Marker") or None
        got = self._list_logical(dict(kwargs, FetchOwner=True), marker)  # v1 lists owners
        out: dict[str, Any] = _ListResponse(
            IsTruncated=got["truncated"],
            Marker=self._url_encoded(kwargs, kwargs.get("Marker") or ""),
        )
        common = self._list_common(kwargs, got)
        if "Contents" in common:
            out["Contents"] = common.pop("Contents")
        if got["truncated"]:
            # The last stored key of the page: logical names sort before their .delta.
            out["NextMarker"] = self._url_encoded(kwargs, got["last"] or marker or "")
            if got["next_token"]:
                out["NextContinuationToken"] = got["next_token"]
        out.update(common)
        if kwargs.get("ContinuationToken") is not None:
            out["ContinuationToken"] = kwargs["ContinuationToken"]
        out["ResponseMetadata"] = _local_metadata(got["page"])
        return out

    # -- files --------------------------------------------------------------------

    def upload_file(
        self,
        Filename: str,
        Bucket: str,
        Key: str,
        ExtraArgs: dict[str, Any] | None = None,
        Callback: Callable[[int], None] | None = None,
        Config: Any = None,
    ) -> None:
        """upload_file as boto3's (returns None); ``Callback`` gets byte counts."""
        self._upload_file(Filename, Bucket, Key, ExtraArgs, Callback, None)

    def _upload_file(
        self,
        Filename: str,
        Bucket: str,
        Key: str,
        ExtraArgs: dict[str, Any] | None,
        Callback: Callable[[int], None] | None,
        info: _FileInfo | None,
    ) -> None:
        """``info``: the digests of a spooled body; a file is hashed as the engine reads it."""
        extra = dict(ExtraArgs or {})
        allowed = (_PUT_PARAMS - {"ContentMD5", "ContentLength"}) | {"ChecksumAlgorithm"}
        _check_params("upload_file ExtraArgs", extra, allowed)
        params = dict(extra, Bucket=Bucket, Key=Key)
        sent = [0]

        def on_bytes(n: int) -> None:
            sent[0] += n
            if Callback:
                Callback(n)

        size = info.size if info is not None else os.path.getsize(Filename)
        _put_object_from_file(self.engine, Filename, params, info, on_bytes=on_bytes)
        if Callback and sent[0] < size:
            Callback(size - sent[0])  # a delta sends less than the file; report it whole

    def download_file(
        self,
        Bucket: str,
        Key: str,
        Filename: str,
        ExtraArgs: dict[str, Any] | None = None,
        Callback: Callable[[int], None] | None = None,
        Config: Any = None,
    ) -> None:
        """download_file as boto3's: written beside ``Filename`` and renamed once verified."""
        _check_params("download_file ExtraArgs", dict(ExtraArgs or {}), set())
        lg = self.engine.get_to_file(Bucket, Key, Filename)
        if Callback:
            Callback(lg.size)

    def upload_fileobj(
        self,
        Fileobj: Any,
        Bucket: str,
        Key: str,
        ExtraArgs: dict[str, Any] | None = None,
        Callback: Callable[[int], None] | None = None,
        Config: Any = None,
    ) -> None:
        path, info = _spool_request_body(self.engine, Fileobj)
        try:
            self._upload_file(path, Bucket, Key, ExtraArgs, Callback, info)
        finally:
            os.unlink(path)

    def download_fileobj(
        self,
        Bucket: str,
        Key: str,
        Fileobj: Any,
        ExtraArgs: dict[str, Any] | None = None,
        Callback: Callable[[int], None] | None = None,
        Config: Any = None,
    ) -> None:
        _check_params("download_fileobj ExtraArgs", dict(ExtraArgs or {}), set())
        resp = self.get_object(Bucket=Bucket, Key=Key)
        with resp["Body"] as body:
            for chunk in body.iter_chunks(_IO_CHUNK):
                Fileobj.write(chunk)
                if Callback:
                    Callback(len(chunk))

    # -- multipart uploads: _MultipartUploads ----------------------------------------

    def create_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        """CreateMultipartUpload; the object's headers and metadata are kept on the
        staging upload and given to the object when the upload completes."""
        return self._multipart.create(kwargs)

    def upload_part(self, **kwargs: Any) -> dict[str, Any]:
        return self._multipart.upload_part(kwargs)

    def upload_part_copy(self, **kwargs: Any) -> dict[str, Any]:
        """UploadPartCopy from a logical object (rebuilt when stored as a delta);
        ``CopySourceRange`` as ``bytes=first-last``."""
        return self._multipart.upload_part_copy(kwargs, self.get_object)

    def complete_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        """CompleteMultipartUpload: the server assembles the parts; the result is then
        stored under ``Key`` as put_object stores a file (a delta where that pays)."""
        return self._multipart.complete(kwargs)

    def abort_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        return self._multipart.abort(kwargs)

    def list_parts(self, **kwargs: Any) -> dict[str, Any]:
        return self._multipart.list_parts(kwargs)

    def list_multipart_uploads(self, **kwargs: Any) -> dict[str, Any]:
        """Uploads in progress, by their logical keys and our upload ids."""
        return self._multipart.list_uploads(kwargs)

    # -- object tagging and ACLs ---------------------------------------------------

    def _stored_key(self, kwargs: Mapping[str, Any]) -> str:
        """The stored form of a logical key (its tags and ACL live there); the caller
        answers a failure as its own operation."""
        lg = self.engine.head(kwargs["Bucket"], kwargs["Key"], "GetObject")
        return lg.stored_key

    def get_object_tagging(self, **kwargs: Any) -> dict[str, Any]:
        """The tags of a logical object (kept on its stored form)."""
        allowed = {"Bucket", "Key", "ExpectedBucketOwner", "RequestPayer"}
        _params("GetObjectTagging", kwargs, allowed, "Bucket", "Key")
        try:
            stored = self._stored_key(kwargs)
            return self.engine.storage.get_object_tagging(kwargs["Bucket"], stored)
        except ClientError as e:
            raise _client_error(e.response, "GetObjectTagging") from None

    def put_object_tagging(self, **kwargs: Any) -> dict[str, Any]:
        allowed = {"Bucket", "Key", "Tagging", "ContentMD5", "ExpectedBucketOwner", "RequestPayer"}
        _params("PutObjectTagging", kwargs, allowed, "Bucket", "Key", "Tagging")
        tags = kwargs["Tagging"].get("TagSet")
        if not isinstance(tags, (list, tuple)):
            raise ParamValidationError(
                report=_type_report("Tagging.TagSet", tags, "<class 'list'>, <class 'tuple'>")
            )
        try:
            stored = self._stored_key(kwargs)
            return self.engine.storage.put_object_tagging(kwargs["Bucket"], stored, list(tags))
        except ClientError as e:
            raise _client_error(e.response, "PutObjectTagging") from None

    def delete_object_tagging(self, **kwargs: Any) -> dict[str, Any]:
        allowed = {"Bucket", "Key", "ExpectedBucketOwner"}
        _params("DeleteObjectTagging", kwargs, allowed, "Bucket", "Key")
        try:
            stored = self._stored_key(kwargs)
            return self.engine.storage.delete_object_tagging(kwargs["Bucket"], stored)
        except ClientError as e:
            raise _client_error(e.response, "DeleteObjectTagging") from None

    def get_object_acl(self, **kwargs: Any) -> dict[str, Any]:
        allowed = {"Bucket", "Key", "ExpectedBucketOwner", "RequestPayer"}
        _params("GetObjectAcl", kwargs, allowed, "Bucket", "Key")
        try:
            stored = self._stored_key(kwargs)
            return self.engine.storage.get_object_acl(kwargs["Bucket"], stored)
        except ClientError as e:
            raise _client_error(e.response, "GetObjectAcl") from None

    def put_object_acl(self, **kwargs: Any) -> dict[str, Any]:
        """PutObjectAcl on the stored form of a logical object (its reference, shared with
        other objects, keeps its own ACL)."""
        import hashlib

        allowed = {"Bucket", "Key", "AccessControlPolicy", "ExpectedBucketOwner", "RequestPayer"}
        allowed |= {n for n, _ in _CANNED_ACL_PARAMS}
        _params("PutObjectAcl", kwargs, allowed, "Bucket", "Key")
        body = (
            _acl_xml(kwargs["AccessControlPolicy"]) if kwargs.get("AccessControlPolicy") else None
        )
        headers = _acl_headers(kwargs)
        if body:
            headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
        try:
            stored = self._stored_key(kwargs)
            return self.engine.storage.put_object_acl(
                kwargs["Bucket"], stored, headers=headers, body=body
            )
        except ClientError as e:
            raise _client_error(e.response, "PutObjectAcl") from None

    def __getattr__(self, name: str) -> Any:
        """A boto3 S3 method we do not have: say so, and what to use instead."""
        if name.startswith("_") or not re.match(r"^[a-z][a-z0-9_]*$", name):
            raise AttributeError(name)
        raise AttributeError(
            "deltaglider's client does not support %r (a boto3 S3 method it does not "
            "implement). Use boto3 directly for it, on the same bucket: objects stored "
            "as they are read the same there; delta-stored ones (a key.delta beside a "
            "reference.bin) need deltaglider's get_object/download_file to be read. "
            "Supported: %s" % (name, ", ".join(_SUPPORTED_METHODS))
        )

    # -- buckets ------------------------------------------------------------------

    def create_bucket(self, **kwargs: Any) -> dict[str, Any]:
        allowed = {
            "Bucket",
            "CreateBucketConfiguration",
            "ACL",
            "GrantFullControl",
            "GrantRead",
            "GrantReadACP",
            "GrantWrite",
            "GrantWriteACP",
            "ObjectLockEnabledForBucket",
            "ObjectOwnership",
        }
        _params("CreateBucket", kwargs, allowed, "Bucket")
        location = (kwargs.get("CreateBucketConfiguration") or {}).get("LocationConstraint")
        headers = _acl_headers(kwargs)
        if kwargs.get("ObjectLockEnabledForBucket"):
            headers["x-amz-bucket-object-lock-enabled"] = "true"
        if kwargs.get("ObjectOwnership"):
            headers["x-amz-object-ownership"] = kwargs["ObjectOwnership"]
        return self.engine.storage.create_bucket(
            kwargs["Bucket"], location=location, headers=headers
        )

    def delete_bucket(self, **kwargs: Any) -> dict[str, Any]:
        _params("DeleteBucket", kwargs, {"Bucket"}, "Bucket")
        return self.engine.storage.delete_bucket(kwargs["Bucket"])

    def list_buckets(self, **kwargs: Any) -> dict[str, Any]:
        _check_params("ListBuckets", kwargs, set())
        return self.engine.storage.list_buckets()

    def head_bucket(self, **kwargs: Any) -> dict[str, Any]:
        _params("HeadBucket", kwargs, {"Bucket"}, "Bucket")
        return self.engine.storage.head_bucket(kwargs["Bucket"])

    def get_bucket_location(self, **kwargs: Any) -> dict[str, Any]:
        _params("GetBucketLocation", kwargs, {"Bucket"}, "Bucket")
        return self.engine.storage.get_bucket_location(kwargs["Bucket"])

    def get_bucket_acl(self, **kwargs: Any) -> dict[str, Any]:
        _params("GetBucketAcl", kwargs, {"Bucket"}, "Bucket")
        return self.engine.storage.get_bucket_acl(kwargs["Bucket"])

    def put_bucket_acl(self, **kwargs: Any) -> dict[str, Any]:
        import hashlib

        allowed = {
            "Bucket",
            "ACL",
            "AccessControlPolicy",
            "GrantFullControl",
            "GrantRead",
            "GrantReadACP",
            "GrantWrite",
            "GrantWriteACP",
        }
        _params("PutBucketAcl", kwargs, allowed, "Bucket")
        body = (
            _acl_xml(kwargs["AccessControlPolicy"]) if kwargs.get("AccessControlPolicy") else None
        )
        headers = _acl_headers(kwargs)
        if body:
            headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
        return self.engine.storage.put_bucket_acl(kwargs["Bucket"], headers=headers, body=body)

    # -- presigning ---------------------------------------------------------------

    def generate_presigned_url(
        self,
        ClientMethod: str,
        Params: dict[str, Any] | None = None,
        ExpiresIn: int = 3600,
        HttpMethod: str | None = None,
    ) -> str:
        """A SigV4 presigned URL. For ``get_object`` of a delta-stored key the URL serves
        a rebuilt copy under ``.deltaglider/tmp/`` that expires with the URL (a purge
        removes it), so whoever follows the link gets the original bytes."""
        params = dict(Params or {})
        method = _presign_method(ClientMethod, params, ExpiresIn)
        http_method = HttpMethod or method
        return _presigned_url(self.engine, ClientMethod, params, ExpiresIn, http_method, self._now)

    def generate_presigned_post(
        self,
        Bucket: str,
        Key: str,
        Fields: dict[str, str] | None = None,
        Conditions: list[Any] | None = None,
        ExpiresIn: int = 3600,
    ) -> dict[str, Any]:
        """A presigned browser-form POST, as boto3's: ``{'url': ..., 'fields': {...}}``."""
        storage = self.engine.storage
        return _presigned_post(storage, Bucket, Key, Fields, Conditions, ExpiresIn)

    # -- deltaglider extensions ---------------------------------------------------

    def upload(
        self,
        file_path: str | os.PathLike[str],
        s3_url: str,
        tags: Mapping[str, str] | None = None,
        max_ratio: float | None = None,
        *,
        delta: bool | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> UploadSummary:
        """Upload a file to ``s3://bucket/key`` (a trailing ``/`` means "into this folder",
        as aws s3 cp); returns what was stored and what it saved. ``tags`` become the
        object's tags; ``max_ratio`` overrides the client's for this file."""
        import urllib.parse

        path = os.fspath(file_path)
        bucket, key = _parse_s3_url(s3_url)
        if not key or key.endswith("/"):
            key += os.path.basename(path)
        headers = {"x-amz-tagging": urllib.parse.urlencode(dict(tags))} if tags else None
        summary = self.engine.put_file(
            path,
            bucket,
            key,
            headers=headers,
            delta=delta,
            max_ratio=max_ratio,
            on_bytes=on_bytes,
        )
        is_delta = summary["Operation"] == "create_delta"
        return _dataclass(_UploadSummary)(
            operation=summary["Operation"],
            bucket=bucket,
            key=key,
            original_size=summary["OriginalSize"],
            stored_size=summary["StoredSize"],
            is_delta=is_delta,
            delta_ratio=summary["CompressionRatio"] if is_delta else 0.0,
            stored_key=summary["StoredAs"],
        )

    def download(self, s3_url: str, output_path: str | os.PathLike[str]) -> str:
        """Download a logical object; returns the path written (verified, then renamed)."""
        bucket, key = _parse_s3_url(s3_url)
        out = os.fspath(output_path)
        if os.path.isdir(out):
            out = os.path.join(out, key.rsplit("/", 1)[-1])
        self.engine.get_to_file(bucket, key, out)
        return out

    def verify(self, s3_url: str) -> VerifyResult:
        """Rebuild a logical object and check it against its recorded SHA-256.

        The result is true only when the object is intact (``if client.verify(url):``, as
        in deltaglider 6.x); its details stay readable: ``valid``, ``kind``,
        ``expected_sha256``, ``actual_sha256``, ``message`` (as keys or attributes)."""
        bucket, key = _parse_s3_url(s3_url)
        return _verify_logical(self.engine, bucket, key)

    def upload_chunked(
        self,
        file_path: str | os.PathLike[str],
        s3_url: str,
        chunk_size: int = 5 * 1024 * 1024,
        progress_callback: Callable[[int, int, int, int], None] | None = None,
        max_ratio: float | None = None,
    ) -> UploadSummary:
        """:meth:`upload` with ``progress_callback(chunk_number, total_chunks, bytes_done,
        total_bytes)`` called as each ``chunk_size`` of the file is processed (read,
        encoded and sent; a delta sends less than the file, and the last call says done)."""
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ParamValidationError(report="chunk_size must be a positive integer")
        total = os.path.getsize(os.fspath(file_path))
        chunks = max(1, -(-total // chunk_size))
        done = [0, 0]  # bytes, chunks reported

        def on_bytes(n: int) -> None:
            done[0] = min(total, done[0] + n)
            reached = done[0] // chunk_size
            if progress_callback and reached > done[1] and reached < chunks:
                done[1] = reached
                progress_callback(reached, chunks, done[0], total)

        summary = self.upload(file_path, s3_url, max_ratio=max_ratio, on_bytes=on_bytes)
        if progress_callback:
            progress_callback(chunks, chunks, total, total)
        return summary

    def upload_batch(
        self,
        files: Sequence[str | os.PathLike[str]],
        s3_prefix: str,
        max_ratio: float | None = None,
        progress_callback: Callable[[str, int, int], None] | None = None,
    ) -> list[UploadSummary]:
        """Upload files into one folder, ``s3_prefix`` (each as ``<prefix>/<file name>``,
        so versions of one artifact share a reference); ``progress_callback(name, n,
        total)`` before each."""
        prefix = s3_prefix.rstrip("/") + "/"
        results = []
        for i, f in enumerate(files):
            name = os.path.basename(os.fspath(f))
            if progress_callback:
                progress_callback(name, i + 1, len(files))
            results.append(self.upload(f, prefix, max_ratio=max_ratio))
        return results

    def download_batch(
        self,
        s3_urls: Sequence[str],
        output_dir: str | os.PathLike[str],
        progress_callback: Callable[[str, int, int], None] | None = None,
    ) -> list[pathlib.Path]:
        """Download objects into ``output_dir`` (created if missing) under their file
        names; returns the paths written."""
        import pathlib

        out_dir = pathlib.Path(output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        results = []
        for i, url in enumerate(s3_urls):
            name = url.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(_DELTA_SUFFIX):  # a stored name given: the logical one
                name = name[: -len(_DELTA_SUFFIX)]
                url = url[: -len(_DELTA_SUFFIX)]
            if progress_callback:
                progress_callback(name, i + 1, len(s3_urls))
            target = out_dir / name
            self.download(url, target)
            results.append(target)
        return results

    def find_similar_files(
        self, bucket: str, prefix: str, filename: str, limit: int = 5
    ) -> list[dict[str, Any]]:
        """Objects under ``prefix`` that look like other versions of ``filename``:
        ``[{'Key', 'Size', 'Similarity', 'LastModified'}]``, best first (0.5 for the same
        extension, 0.3 when one stem contains the other, 0.2 when both carry a version)."""
        base, ext = os.path.splitext(os.path.basename(filename))
        version = re.compile(r"v?\d+[.\d]*")
        similar: list[dict[str, Any]] = []
        for page in self.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                obj_base, obj_ext = os.path.splitext(obj["Key"].rsplit("/", 1)[-1])
                score = 0.5 if ext == obj_ext else 0.0
                if base in obj_base or obj_base in base:
                    score += 0.3
                if version.search(base) and version.search(obj_base):
                    score += 0.2
                if score > 0.5:
                    similar.append(
                        {
                            "Key": obj["Key"],
                            "Size": obj["Size"],
                            "Similarity": round(score, 2),
                            "LastModified": obj["LastModified"],
                        }
                    )
        similar.sort(key=lambda x: x["Similarity"], reverse=True)
        return similar[:limit]

    def estimate_compression(
        self,
        file_path: str | os.PathLike[str],
        bucket: str,
        prefix: str = "",
        sample_size: int = 1024 * 1024,
    ) -> CompressionEstimate:
        """What storing ``file_path`` under ``prefix`` would likely save, before uploading
        (from the file's kind and what the folder holds; nothing is encoded or sent).
        ``estimated_ratio`` is the fraction saved (0.99 = 99% smaller)."""
        path = os.fspath(file_path)
        size = os.path.getsize(path)
        name = os.path.basename(path)
        estimate = _dataclass(_CompressionEstimate)
        if os.path.splitext(name)[1].lower() in _INCOMPRESSIBLE_EXTENSIONS:
            return estimate(size, size, 0.0, 0.95, None, False)
        if not _eligible_by_name(name, self._environ):
            return estimate(size, size, 0.0, 0.5, None, False)
        folder = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        similar = self.find_similar_files(bucket, folder, name)
        if similar:
            return estimate(size, int(size * 0.01), 0.99, 0.9, similar[0]["Key"], True)
        # The first file of a folder becomes its reference: stored whole.
        return estimate(size, size, 0.0, 0.7, None, True)

    def get_object_info(self, s3_url: str) -> ObjectInfo:
        """How one logical object is stored: sizes, ratio, reference (a HEAD or two)."""
        bucket, key = _parse_s3_url(s3_url)
        lg = self.engine.head(bucket, key, "HeadObject")
        stored = int(lg.head.get("ContentLength", 0))
        modified = lg.head.get("LastModified")
        is_delta = lg.kind == _Kind.DELTA
        ref = _meta_get(lg.metadata, "ref") or _REFERENCE_NAME
        return _dataclass(_ObjectInfo)(
            key=key,
            size=stored,
            last_modified=_iso_utc(modified) if isinstance(modified, datetime.datetime) else "",
            etag=lg.etag,
            storage_class=lg.head.get("StorageClass", "STANDARD"),
            original_size=lg.size,
            compressed_size=stored,
            compression_ratio=(stored / lg.size) if lg.size else 1.0,
            is_delta=is_delta,
            reference_key=_resolve_ref_key(lg.stored_key, ref) if is_delta else None,
            delta_chain_length=1 if is_delta else 0,
            stored_key=lg.stored_key,
            kind=lg.kind,
        )

    def delete_objects_recursive(self, Bucket: str, Prefix: str) -> dict[str, Any]:
        """Delete everything under ``Prefix`` (or the one object it names), references
        last and only when nothing needs them; as 6.x's, with counts by kind."""
        engine = self.engine
        single: list[str] = []
        if Prefix and not Prefix.endswith("/"):
            try:
                engine.head(Bucket, Prefix, "HeadObject")
                self.delete_object(Bucket=Bucket, Key=Prefix)
                single.append(Prefix)
            except ClientError as e:
                if not _is_not_found(e):
                    raise
            folder = Prefix + "/"
        else:
            folder = Prefix
        result = engine.delete_prefix(Bucket, folder)
        deleted = result["Deleted"]
        deltas = sum(1 for k in deleted if k.endswith(_DELTA_SUFFIX))
        info: dict[str, Any] = {
            "DeltasDeleted": deltas,
            "ReferencesDeleted": result["ReferencesDeleted"],
            "DirectDeleted": len(deleted) - deltas,
            "OtherDeleted": 0,
        }
        if single:
            info["SingleDeletes"] = single
        out: dict[str, Any] = {
            "ResponseMetadata": _local_metadata({}),
            "DeletedCount": len(deleted) + result["ReferencesDeleted"] + len(single),
            "FailedCount": len(result["Errors"]),
            "DeltaGliderInfo": info,
        }
        if result["Errors"]:
            out["Errors"] = result["Errors"]
        return out

    def clear_cache(self) -> None:
        """Empty this client's reference cache (``cache_dir``); references are fetched
        again when next needed."""
        self.engine.cache.clear()

    def rehydrate_for_download(self, Bucket: str, Key: str, ExpiresIn: int = 3600) -> str | None:
        """Store a rebuilt copy of a delta-stored object under ``.deltaglider/tmp/`` for
        ``ExpiresIn`` seconds (``purge_temp_files`` removes it after); its key, or None
        when the object is stored as it is (nothing to rebuild)."""
        key = Key[: -len(_DELTA_SUFFIX)] if Key.endswith(_DELTA_SUFFIX) else Key
        lg = self.engine.head(Bucket, key, "HeadObject")
        if lg.kind != _Kind.DELTA:
            return None
        return _rehydrated_copy(self.engine, lg, int(ExpiresIn), self._now)

    def generate_presigned_url_with_rehydration(
        self, Bucket: str, Key: str, ExpiresIn: int = 3600
    ) -> str:
        """A presigned GET that serves the original bytes under the original file name
        (``Content-Disposition: attachment``), for any kind of object."""
        key = Key[: -len(_DELTA_SUFFIX)] if Key.endswith(_DELTA_SUFFIX) else Key
        params: dict[str, Any] = {"Bucket": Bucket, "Key": key}
        lg = self.engine.head(Bucket, key, "HeadObject")
        if lg.kind == _Kind.DELTA:
            name = key.rsplit("/", 1)[-1].replace('"', "")
            params["ResponseContentDisposition"] = 'attachment; filename="%s"' % name
        return self.generate_presigned_url("get_object", Params=params, ExpiresIn=ExpiresIn)

    def get_bucket_stats(
        self,
        bucket: str,
        mode: str = "quick",
        use_cache: bool = True,
        refresh_cache: bool = False,
    ) -> BucketStats:
        """What a bucket holds and what deltas save.

        ``quick`` lists only: a delta's original size is taken to be its reference's (the
        versions of one artifact are about the same size); ``sampled`` reads one delta per
        deltaspace and scales; ``detailed`` reads every delta (in parallel). The result is
        cached in ``.deltaglider/stats_<mode>.json``, valid while the bucket's object count
        and stored size are unchanged."""
        if mode not in ("quick", "sampled", "detailed"):
            raise ParamValidationError(report="mode must be quick, sampled or detailed")
        storage = self.engine.storage
        listing = _list_for_stats(storage, bucket)
        if use_cache and not refresh_cache:
            cached = _cached_bucket_stats(storage, bucket, mode, listing.validation())
            if cached is not None:
                return cached
        stats = _compute_bucket_stats(storage, bucket, mode, listing, self._max_workers)
        if use_cache:
            _cache_bucket_stats(storage, bucket, mode, listing.validation(), stats, self._now())
        return stats

    def gc(self, Bucket: str, Prefix: str = "", DryRun: bool = False) -> dict[str, Any]:
        """Delete the references under ``Prefix`` (a folder; the whole bucket by default)
        that no delta needs any more, however many requests proving it takes.

        Returns ``{'Removed': [{'Key', 'Size'}], 'Kept', 'BytesFreed', 'DryRun'}``."""
        _validate_bucket_name(Bucket)
        return self.engine.gc(Bucket, Prefix, dry_run=DryRun)

    def purge_temp_files(self, Bucket: str) -> dict[str, Any]:
        """Delete expired rebuilt copies under ``.deltaglider/tmp/``."""
        return _purge_presign_copies(self.engine.storage, Bucket, self._now)


#: The client's public methods, for the "not supported" message.
_SUPPORTED_METHODS = tuple(
    sorted(
        name
        for name, value in vars(DeltaGliderClient).items()
        if not name.startswith("_") and callable(value)
    )
)


# -- Result types of deltaglider's extensions --------------------------------------
# 6.x's result types are dataclasses, and so are UploadSummary, ObjectInfo and
# CompressionEstimate (isinstance, dataclasses.fields and asdict, repr and == as there), but
# made so on first use: importing dataclasses (it imports inspect) is a sixth of the
# start-up of every command, and only three client methods return one. Their bodies are
# kept under private names; naming one (`deltaglider.ObjectInfo`, `from deltaglider import`:
# the module's __getattr__, PEP 562) or a method returning one (_dataclass) makes it.

if TYPE_CHECKING:
    from dataclasses import dataclass as _first_use_dataclass
else:

    def _first_use_dataclass(body: type[_T]) -> type[_T]:
        return body


@_first_use_dataclass
class _UploadSummary:
    """What :meth:`DeltaGliderClient.upload` stored (deltaglider 6.x's fields first).

    ``is_delta`` is true only when a delta was stored (not for the folder's first file,
    which becomes the reference, nor for a file stored as it is); ``delta_ratio`` is the
    delta's size over the file's then, else 0.0."""

    operation: str
    bucket: str
    key: str
    original_size: int
    stored_size: int
    is_delta: bool
    delta_ratio: float = 0.0
    stored_key: str = ""

    @property
    def original_size_mb(self) -> float:
        return self.original_size / 1048576.0

    @property
    def stored_size_mb(self) -> float:
        return self.stored_size / 1048576.0

    @property
    def savings_percent(self) -> float:
        if not self.original_size:
            return 0.0
        return (self.original_size - self.stored_size) / self.original_size * 100.0


class _AttrDict(Dict[str, Any]):
    """A plain dict (JSON-ready, ``result['valid']``) whose keys read as attributes too
    (``result.valid``), as the dataclasses of deltaglider 6.x."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class VerifyResult(_AttrDict):
    """What :meth:`DeltaGliderClient.verify` found; true only when the object is intact,
    so ``if client.verify(url):`` means what it says (6.x returned a bare bool).
    ``json.dumps`` writes a false dict as ``{}``: dump ``dict(result)``."""

    def __bool__(self) -> bool:
        return bool(self.get("valid"))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, bool):
            return bool(self) is other
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]


class BucketStats(_AttrDict):
    """:meth:`DeltaGliderClient.get_bucket_stats`: 6.x's fields (``bucket``,
    ``object_count``, ``total_size``, ``compressed_size``, ``space_saved``,
    ``average_compression_ratio``, ``delta_objects``, ``direct_objects``,
    ``object_limit_reached``) as attributes and keys, and ``mode``, ``savings_percent``,
    ``reference_objects``, ``estimated``, ``cached``."""


@_first_use_dataclass
class _ObjectInfo:
    """:meth:`DeltaGliderClient.get_object_info`: how one logical object is stored.
    ``size``/``compressed_size`` are the stored bytes, ``original_size`` the object's."""

    key: str
    size: int
    last_modified: str
    etag: str | None = None
    storage_class: str = "STANDARD"
    original_size: int | None = None
    compressed_size: int | None = None
    compression_ratio: float | None = None
    is_delta: bool = False
    reference_key: str | None = None
    delta_chain_length: int = 0
    stored_key: str = ""
    kind: str = ""


@_first_use_dataclass
class _CompressionEstimate:
    """:meth:`DeltaGliderClient.estimate_compression`: ``estimated_ratio`` is the
    fraction of the file expected to be saved."""

    original_size: int
    estimated_compressed_size: int
    estimated_ratio: float
    confidence: float
    recommended_reference: str | None = None
    should_use_delta: bool = True


if TYPE_CHECKING:
    UploadSummary = _UploadSummary
    ObjectInfo = _ObjectInfo
    CompressionEstimate = _CompressionEstimate

_RESULT_TYPES = {
    "UploadSummary": _UploadSummary,
    "ObjectInfo": _ObjectInfo,
    "CompressionEstimate": _CompressionEstimate,
}
_RESULT_TYPES_MADE: set[type] = set()
_RESULT_TYPES_LOCK = threading.Lock()


def _dataclass(body: type[_T]) -> type[_T]:
    """A result type's body made the dataclass it is declared as (once, in place, under
    its public name) and that name bound in the module."""
    if body not in _RESULT_TYPES_MADE:
        import dataclasses

        with _RESULT_TYPES_LOCK:
            if body not in _RESULT_TYPES_MADE:
                name = body.__name__[1:]
                body.__name__ = body.__qualname__ = name
                globals()[name] = dataclasses.dataclass(body)
                _RESULT_TYPES_MADE.add(body)
    return body


def _module_attribute(name: str) -> Any:
    """The module's __getattr__ (PEP 562): a result type, made when first named."""
    if name not in _RESULT_TYPES:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    return _dataclass(_RESULT_TYPES[name])


def _module_names() -> list[str]:
    return sorted({*globals(), *_RESULT_TYPES})


if not TYPE_CHECKING:  # hidden from the type checker, which sees the names above
    __getattr__, __dir__ = _module_attribute, _module_names


# -- ACLs: canned-ACL headers and the AccessControlPolicy XML ----------------------

_CANNED_ACL_PARAMS = (
    ("ACL", "x-amz-acl"),
    ("GrantFullControl", "x-amz-grant-full-control"),
    ("GrantRead", "x-amz-grant-read"),
    ("GrantReadACP", "x-amz-grant-read-acp"),
    ("GrantWrite", "x-amz-grant-write"),
    ("GrantWriteACP", "x-amz-grant-write-acp"),
)


def _acl_headers(params: Mapping[str, Any]) -> dict[str, str]:
    return {header: str(params[name]) for name, header in _CANNED_ACL_PARAMS if params.get(name)}


def _acl_xml(policy: Mapping[str, Any]) -> bytes:
    """An AccessControlPolicy dict (boto3's shape) as S3's XML."""
    xsi = "http://www.w3.org/2001/XMLSchema-instance"
    parts = ['<AccessControlPolicy xmlns="%s">' % _S3_XMLNS]
    owner = policy.get("Owner") or {}
    if owner:
        parts.append("<Owner>")
        for tag in ("ID", "DisplayName"):
            if owner.get(tag):
                parts.append("<%s>%s</%s>" % (tag, _xml_escape(owner[tag]), tag))
        parts.append("</Owner>")
    parts.append("<AccessControlList>")
    for grant in policy.get("Grants", []):
        grantee = grant.get("Grantee", {})
        parts.append(
            '<Grant><Grantee xmlns:xsi="%s" xsi:type="%s">'
            % (xsi, grantee.get("Type", "CanonicalUser"))
        )
        for tag in ("ID", "DisplayName", "EmailAddress", "URI"):
            if grantee.get(tag):
                parts.append("<%s>%s</%s>" % (tag, _xml_escape(grantee[tag]), tag))
        parts.append(
            "</Grantee><Permission>%s</Permission></Grant>"
            % _xml_escape(grant.get("Permission", ""))
        )
    parts.append("</AccessControlList></AccessControlPolicy>")
    return "".join(parts).encode("utf-8")


# -- Multipart uploads: staged under .deltaglider/multipart/, stored when complete ---

_MPU_NONCE = 32


def _completed_upload(engine: _DeltaEngine, bucket: str, key: str, note: str) -> _Logical | None:
    """The logical object that the multipart upload ``note`` (_upload_note: its id and
    parts) completed into at ``key``, if that is what ``key`` holds now: how the client
    and the gateway recognise a repeated CompleteMultipartUpload, from any process."""
    try:
        lg = engine.head(bucket, key)
    except ClientError as e:
        if _is_not_found(e):
            return None
        raise
    return lg if lg.metadata.get(_UPLOAD_META) == note else None


class _MultipartUploads:
    """The client's multipart-upload operations, over the engine's storage.

    Parts go to a real multipart upload of a staging key, .deltaglider/multipart/
    <nonce>/<key>; completing it assembles the staging object on the server, which is
    then stored under <key> as put_object stores a file (a delta where that pays) and
    removed. The UploadId we hand out is the nonce followed by the server's upload id,
    so any client (another process, the gateway) can continue an upload it did not
    start, and two uploads of one key never share a staging object."""

    def __init__(
        self, engine: Callable[[], _DeltaEngine], now: Callable[[], datetime.datetime]
    ) -> None:
        self._engine_getter = engine  # the client's, made on first use
        self._now = now

    @property
    def engine(self) -> _DeltaEngine:
        return self._engine_getter()

    def _mpu(self, kwargs: Mapping[str, Any], operation: str) -> tuple[str, str, str]:
        """(bucket, staging key, the server's upload id) of one of our upload ids."""
        _require(operation, kwargs, "Bucket", "Key", "UploadId")
        upload_id = kwargs["UploadId"]
        nonce, server_id = upload_id[:_MPU_NONCE], upload_id[_MPU_NONCE:]
        if not server_id or not re.match(r"^[0-9a-f]{%d}$" % _MPU_NONCE, nonce):
            raise _client_error(
                {
                    "Error": {
                        "Code": "NoSuchUpload",
                        "Message": "The specified upload does not exist. The upload ID may "
                        "be invalid, or the upload may have been aborted or completed.",
                        "UploadId": upload_id,
                    },
                    "ResponseMetadata": _local_metadata(
                        {"ResponseMetadata": {"HTTPStatusCode": 404}}
                    ),
                },
                operation,
            )
        _validate_key(kwargs["Key"])
        return kwargs["Bucket"], _MULTIPART_PREFIX + nonce + "/" + kwargs["Key"], server_id

    def create(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        allowed = {"Bucket", "Key", "ChecksumAlgorithm"} | (
            _PUT_PARAMS - {"ContentMD5", "ContentLength"}
        )
        _params("CreateMultipartUpload", kwargs, allowed - {"ChecksumAlgorithm"}, "Bucket", "Key")
        _validate_key(kwargs["Key"])
        if kwargs.get("SSECustomerKey") is not None:
            raise ParamValidationError(
                report="SSE-C multipart uploads are not supported: use put_object or upload_file"
            )
        nonce = _random_hex()
        staging = _MULTIPART_PREFIX + nonce + "/" + kwargs["Key"]
        headers = _put_headers(kwargs)
        server_id = self.engine.storage.create_multipart_upload(
            kwargs["Bucket"], staging, metadata=kwargs.get("Metadata"), headers=headers
        )
        return {
            "Bucket": kwargs["Bucket"],
            "Key": kwargs["Key"],
            "UploadId": nonce + server_id,
            "ResponseMetadata": _local_metadata({}),
        }

    def upload_part(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        allowed = {"Bucket", "Key", "UploadId", "PartNumber", "Body", "ContentMD5"}
        allowed |= {"ContentLength", "ExpectedBucketOwner", "RequestPayer"}
        _params("UploadPart", kwargs, allowed, "Bucket", "Key", "UploadId", "PartNumber")
        bucket, staging, server_id = self._mpu(kwargs, "UploadPart")
        body = kwargs.get("Body")
        path, info = _spool_request_body(self.engine, body if body is not None else b"")
        try:
            with open(path, "rb") as f:  # signed with the hash of what the caller gave
                etag = self.engine.storage.upload_part(
                    bucket, staging, server_id, kwargs["PartNumber"], f, content_sha256=info.sha256
                )
        finally:
            os.unlink(path)
        return {"ETag": etag, "ResponseMetadata": _local_metadata({})}

    def upload_part_copy(
        self, kwargs: Mapping[str, Any], get_object: Callable[..., dict[str, Any]]
    ) -> dict[str, Any]:
        import urllib.parse

        allowed = {"Bucket", "Key", "UploadId", "PartNumber", "CopySource", "CopySourceRange"}
        # The source's SSE-C key, to read it with (SSECustomer* on its GetObject).
        source_sse_c = {"CopySource" + n for n in ("SSECustomerAlgorithm", "SSECustomerKey")}
        source_sse_c.add("CopySourceSSECustomerKeyMD5")
        allowed |= {n for n, _ in _COPY_CONDITION_PARAMS} | source_sse_c
        _params(
            "UploadPartCopy",
            kwargs,
            allowed,
            "Bucket",
            "Key",
            "UploadId",
            "PartNumber",
            "CopySource",
        )
        bucket, staging, server_id = self._mpu(kwargs, "UploadPartCopy")
        src = kwargs["CopySource"]
        if isinstance(src, str):
            src_bucket, _, src_key = urllib.parse.unquote(src.lstrip("/")).partition("/")
        elif isinstance(src, dict):
            src_bucket, src_key = src.get("Bucket", ""), src.get("Key", "")
        else:
            raise ParamValidationError(
                report=_type_report("CopySource", src, "<class 'str'>, <class 'dict'>")
            )
        get: dict[str, Any] = {"Bucket": src_bucket, "Key": src_key}
        text = kwargs.get("CopySourceRange")
        span = None
        if text is not None:
            if not isinstance(text, str):
                raise ParamValidationError(
                    report=_type_report("CopySourceRange", text, "<class 'str'>")
                )
            span = _copy_source_range(text)
            get["Range"] = "bytes=%d-%d" % span
        for name in [n for n, _ in _COPY_CONDITION_PARAMS] + sorted(source_sse_c):
            if kwargs.get(name) is not None:
                get[name[len("CopySource") :]] = kwargs[name]
        try:
            resp = get_object(**get)
        except ClientError as e:
            raise _client_error(e.response, "UploadPartCopy") from None
        if span is not None:  # a range the source ends within: the source's size known now
            size = str(resp.get("ContentRange", "")).rpartition("/")[2]
            if size.isdigit() and span[1] >= int(size):
                resp["Body"].close()
                _copy_source_range(str(text), int(size))
        with resp["Body"] as part:
            path, info = _spool_request_body(self.engine, part)
        try:
            with open(path, "rb") as f:
                etag = self.engine.storage.upload_part(
                    bucket, staging, server_id, kwargs["PartNumber"], f, content_sha256=info.sha256
                )
        finally:
            os.unlink(path)
        return {
            "CopyPartResult": {"ETag": etag, "LastModified": self._now().replace(microsecond=0)},
            "ResponseMetadata": _local_metadata({}),
        }

    def complete(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        allowed = {"Bucket", "Key", "UploadId", "MultipartUpload", "ExpectedBucketOwner"}
        allowed |= {"RequestPayer"}
        _params("CompleteMultipartUpload", kwargs, allowed, "Bucket", "Key", "UploadId")
        bucket, staging, server_id = self._mpu(kwargs, "CompleteMultipartUpload")
        parts = (kwargs.get("MultipartUpload") or {}).get("Parts") or []
        if not isinstance(parts, (list, tuple)):
            raise ParamValidationError(
                report=_type_report(
                    "MultipartUpload.Parts", parts, "<class 'list'>, <class 'tuple'>"
                )
            )
        storage = self.engine.storage
        wanted = [(int(p["PartNumber"]), str(p["ETag"])) for p in parts]
        note = _upload_note(kwargs["UploadId"], wanted)
        try:
            storage.complete_multipart_upload(bucket, staging, server_id, wanted)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
            done = _completed_upload(self.engine, bucket, kwargs["Key"], note)
            if done is None:
                raise
            return {  # a retry of a completion whose answer was lost, as S3 answers it
                "Location": storage.object_url(bucket, kwargs["Key"]),
                "Bucket": bucket,
                "Key": kwargs["Key"],
                "ETag": done.etag,
                "ResponseMetadata": _local_metadata({}),
            }
        engine = self.engine
        fd, tmp = _private_tempfile(engine.tmp_dir(), ".mpu")
        os.close(fd)
        try:
            got = storage.get_object(bucket, staging)
            with got["Body"] as body, open(tmp, "wb") as f:
                for chunk in body.iter_chunks(_IO_CHUNK):
                    f.write(chunk)
            params: dict[str, Any] = {"Bucket": bucket, "Key": kwargs["Key"]}
            params["Metadata"] = got.get("Metadata") or {}
            for name in (
                "ContentType",
                "CacheControl",
                "ContentDisposition",
                "ContentEncoding",
                "ContentLanguage",
                "Expires",
                "ServerSideEncryption",
                "SSEKMSKeyId",
                "StorageClass",
            ):
                if got.get(name) is not None:
                    params[name] = got[name]
            result = _put_object_from_file(self.engine, tmp, params, upload=note)
        finally:
            os.unlink(tmp)
        with contextlib.suppress(ClientError):  # left for a purge, never a data loss
            storage.delete_object(bucket, staging)
        out: dict[str, Any] = {
            "Location": storage.object_url(bucket, kwargs["Key"]),
            "Bucket": bucket,
            "Key": kwargs["Key"],
            "ETag": result["ETag"],
        }
        if "DeltaGliderInfo" in result:
            out["DeltaGliderInfo"] = result["DeltaGliderInfo"]
        out["ResponseMetadata"] = result["ResponseMetadata"]
        return out

    def abort(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        allowed = {"Bucket", "Key", "UploadId", "ExpectedBucketOwner", "RequestPayer"}
        _params("AbortMultipartUpload", kwargs, allowed, "Bucket", "Key", "UploadId")
        bucket, staging, server_id = self._mpu(kwargs, "AbortMultipartUpload")
        resp = self.engine.storage.abort_multipart_upload(bucket, staging, server_id)
        return {"ResponseMetadata": _local_metadata(resp)}

    def list_parts(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        allowed = {"Bucket", "Key", "UploadId", "MaxParts", "PartNumberMarker"}
        allowed |= {"ExpectedBucketOwner", "RequestPayer"}
        _params("ListParts", kwargs, allowed, "Bucket", "Key", "UploadId")
        bucket, staging, server_id = self._mpu(kwargs, "ListParts")
        parts = _all_parts(self.engine.storage, bucket, staging, server_id)
        page = _parts_page(
            parts,
            part_number_marker=int(kwargs.get("PartNumberMarker") or 0),
            max_parts=kwargs.get("MaxParts"),
        )
        out: dict[str, Any] = {"Bucket": bucket, "Key": kwargs["Key"]}
        out.update(UploadId=kwargs["UploadId"], **page)
        out["ResponseMetadata"] = _local_metadata({})
        return out

    def list_uploads(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """One page of the uploads in progress, by logical key, as boto3's (with the
        markers of the next; ``get_paginator`` reads them all), from every page the
        storage holds under the staging prefix."""
        allowed = {"Bucket", "Prefix", "Delimiter", "MaxUploads", "KeyMarker", "UploadIdMarker"}
        allowed |= {"EncodingType", "ExpectedBucketOwner", "RequestPayer"}
        _params("ListMultipartUploads", kwargs, allowed, "Bucket")
        bucket = kwargs["Bucket"]
        uploads = []
        for u in _all_uploads(self.engine.storage, bucket, _MULTIPART_PREFIX):
            rest = u["Key"][len(_MULTIPART_PREFIX) :]
            nonce, _, key = rest.partition("/")
            if not u["Key"].startswith(_MULTIPART_PREFIX) or len(nonce) != _MPU_NONCE:
                continue
            if not key.startswith(kwargs.get("Prefix") or ""):
                continue
            uploads.append(dict(u, Key=key, UploadId=nonce + u["UploadId"]))
        out = _uploads_page(
            bucket,
            uploads,
            prefix=kwargs.get("Prefix") or "",
            key_marker=kwargs.get("KeyMarker") or "",
            upload_id_marker=kwargs.get("UploadIdMarker") or "",
            max_uploads=kwargs.get("MaxUploads"),
        )
        out["ResponseMetadata"] = _local_metadata({})
        return out


# -- Bucket statistics: get_bucket_stats's listing, arithmetic and cache -----------


class _StatsListing(NamedTuple):
    """One listing of a bucket, as its statistics count it."""

    objects: list[dict[str, Any]]  # logical objects' stored forms, and references
    copies: list[dict[str, Any]]  # rebuilt copies for presigned URLs

    def validation(self) -> dict[str, Any]:
        """What a cached result was computed from: it holds while these are unchanged."""
        return {
            "object_count": len(self.objects),
            "compressed_size": sum(o["Size"] for o in self.objects),
            "presign_copies": [len(self.copies), sum(o["Size"] for o in self.copies)],
        }


def _list_for_stats(storage: _Storage, bucket: str) -> _StatsListing:
    """Every stored key of the bucket, our bookkeeping left out (shared references kept)."""
    objects: list[dict[str, Any]] = []
    copies: list[dict[str, Any]] = []
    for page in _list_pages(storage, bucket):
        for o in page.get("Contents", []):
            if o["Key"].startswith(_PRESIGN_PREFIX):
                copies.append(o)
            elif not _is_internal(o["Key"]) or _is_shared_ref(o["Key"]):
                objects.append(o)
    return _StatsListing(objects, copies)


def _stats_cache_key(mode: str) -> str:
    return _STATS_KEY % mode


def _cached_bucket_stats(
    storage: _Storage, bucket: str, mode: str, validation: Mapping[str, Any]
) -> BucketStats | None:
    """The cached result of ``mode``, when it was computed from what the bucket holds now."""
    import json

    cache_key = _stats_cache_key(mode)
    try:
        with storage.get_object(bucket, cache_key)["Body"] as stream:
            body = stream.read(_MAX_REPLY_BYTES + 1)
        if len(body) > _MAX_REPLY_BYTES:
            raise ValueError("%s is too large to be a stats cache" % cache_key)
        cached = json.loads(body.decode("utf-8"))
        if cached.get("validation") == validation and isinstance(cached.get("stats"), dict):
            stats = BucketStats(cached["stats"])
            stats.setdefault("object_limit_reached", False)
            stats["cached"] = True
            return stats
    except (ClientError, ValueError, UnicodeDecodeError):
        pass
    return None


def _cache_bucket_stats(
    storage: _Storage,
    bucket: str,
    mode: str,
    validation: Mapping[str, Any],
    stats: BucketStats,
    now: datetime.datetime,
) -> None:
    """Store a result for the next call; read-only credentials only cost the cache."""
    import json

    doc = {
        "version": "1.0",
        "mode": mode,
        "computed_at": _iso_utc(now),
        "validation": validation,
        "stats": stats,
    }
    try:
        storage.put_object(
            bucket,
            _stats_cache_key(mode),
            json.dumps(doc).encode("utf-8"),
            headers={"Content-Type": "application/json"},
        )
    except ClientError as e:  # read-only credentials: the stats still stand
        logger.info("could not cache bucket stats: %s", e)


def _read_original_sizes(
    storage: _Storage, bucket: str, mode: str, deltas: list[dict[str, Any]], max_workers: int
) -> tuple[dict[str, int], dict[str, list[int]]]:
    """The original sizes of deltas, from their metadata (HEADs in parallel): every delta
    (``detailed``) or one per deltaspace, given to its siblings (``sampled``). Returns
    {delta key: size} and {reference key: the sizes of the deltas read that need it}."""
    import concurrent.futures

    if mode == "sampled":
        sample: dict[str, dict[str, Any]] = {}
        for o in deltas:
            sample.setdefault(_deltaspace(o["Key"]), o)
        targets = list(sample.values())
    else:
        targets = deltas

    def size_of(o: dict[str, Any]) -> tuple[str, int | None, str | None]:
        try:
            meta = storage.head_object(bucket, o["Key"]).get("Metadata", {})
        except ClientError:
            return o["Key"], None, None
        value = _meta_get(meta, "file_size")
        ref = _meta_get(meta, "ref")
        return (
            o["Key"],
            int(value) if value and value.isdigit() else None,
            _resolve_ref_key(o["Key"], ref) if ref else None,
        )

    original: dict[str, int] = {}
    ref_users: dict[str, list[int]] = {}
    workers = max(1, min(max_workers, len(targets)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for key, size, ref in pool.map(size_of, targets):
            if size is not None:
                original[key] = size
                if ref is not None:
                    ref_users.setdefault(ref, []).append(size)
    if mode == "sampled":
        per_space = {_deltaspace(k): v for k, v in original.items()}
        original = {
            o["Key"]: per_space[_deltaspace(o["Key"])]
            for o in deltas
            if _deltaspace(o["Key"]) in per_space
        }
    return original, ref_users


def _logical_total(
    objects: list[dict[str, Any]],
    deltas: list[dict[str, Any]],
    direct: list[dict[str, Any]],
    original: Mapping[str, int],
) -> int:
    """What the logical objects hold: a direct object its stored size; a delta its original
    size where read, else its folder's reference's size (the versions of one artifact are
    about the same size), else the average of the shared references beside its folder."""
    ref_sizes: dict[str, int] = {
        _deltaspace(o["Key"]): o["Size"]
        for o in objects
        if _is_reference(o["Key"]) and not _is_shared_ref(o["Key"])
    }
    shared_sizes: dict[str, list[int]] = {}
    for o in objects:
        if _is_shared_ref(o["Key"]):
            shared_sizes.setdefault(_shared_ref_parent(o["Key"]), []).append(o["Size"])
    total: int = sum(o["Size"] for o in direct)
    for o in deltas:
        space = _deltaspace(o["Key"])
        near = shared_sizes.get(_parent_space(space))
        fallback = sum(near) // len(near) if near else o["Size"]
        total += original.get(o["Key"], ref_sizes.get(space, fallback))
    return total


def _compute_bucket_stats(
    storage: _Storage, bucket: str, mode: str, listing: _StatsListing, max_workers: int
) -> BucketStats:
    """The statistics of one listing (``quick``: from it alone; ``sampled``/``detailed``:
    with the original sizes read from deltas' metadata)."""
    objects, copies = listing
    references = {o["Key"]: o["Size"] for o in objects if _is_reference(o["Key"])}
    deltas = [o for o in objects if o["Key"].endswith(_DELTA_SUFFIX)]
    direct = [
        o
        for o in objects
        if not o["Key"].endswith(_DELTA_SUFFIX) and o["Key"].rsplit("/", 1)[-1] != _REFERENCE_NAME
    ]
    original: dict[str, int] = {}
    ref_users: dict[str, list[int]] = {}
    if mode != "quick" and deltas:
        original, ref_users = _read_original_sizes(storage, bucket, mode, deltas, max_workers)
    spaces_in_use = {_deltaspace(o["Key"]) for o in deltas}
    # A folder's own reference.bin with no delta beside it (shared ones take HEADs
    # to prove unused: `gc --dry-run` does that).
    unused_refs = [
        o
        for o in objects
        if _is_reference(o["Key"])
        and not _is_shared_ref(o["Key"])
        and _deltaspace(o["Key"]) not in spaces_in_use
    ]
    stored_total = sum(o["Size"] for o in objects)
    logical_total = _logical_total(objects, deltas, direct, original)
    saved = logical_total - stored_total
    stats = BucketStats(
        bucket=bucket,
        mode=mode,
        object_count=len(deltas) + len(direct),
        total_size=logical_total,
        compressed_size=stored_total,
        space_saved=saved,
        average_compression_ratio=(stored_total / logical_total) if logical_total else 1.0,
        savings_percent=(saved / logical_total * 100.0) if logical_total else 0.0,
        delta_objects=len(deltas),
        direct_objects=len(direct),
        reference_objects=len(references),
        reference_size=sum(references.values()),
        object_limit_reached=False,
        # left by a crash or another tool; `rm --recursive` of the folder removes them
        unused_references=len(unused_refs),
        unused_reference_size=sum(o["Size"] for o in unused_refs),
        # under .deltaglider/tmp/ until they expire and a purge removes them
        presign_copies=len(copies),
        presign_copies_size=sum(o["Size"] for o in copies),
        estimated=mode != "detailed",
        cached=False,
    )
    if mode == "detailed":
        # What each reference costs, and what the deltas that need it hold.
        stats["references"] = [
            {
                "key": k,
                "size": size,
                "source": _shared_ref_source(k) if _is_shared_ref(k) else None,
                "deltas": len(ref_users.get(k, [])),
                "original_size": sum(ref_users.get(k, [])),
            }
            for k, size in sorted(references.items())
        ]
    return stats


# -- Presigned URLs, and the rebuilt copies they serve -----------------------------

_PRESIGN_READ_PARAMS = frozenset(n for n, _ in _READ_HEADER_PARAMS + _CONDITION_PARAMS)
#: The client methods we presign: their HTTP method and the parameters each takes.
_PRESIGN_METHODS: dict[str, tuple[str, frozenset[str]]] = {
    "get_object": (
        "GET",
        frozenset({"Bucket", "Key", "Range"} | {n for n, _, _ in _GET_OVERRIDE_PARAMS})
        | _PRESIGN_READ_PARAMS,
    ),
    "head_object": ("HEAD", frozenset({"Bucket", "Key"}) | _PRESIGN_READ_PARAMS),
    "put_object": ("PUT", frozenset({"Bucket", "Key"}) | _PUT_PARAMS),
    "delete_object": ("DELETE", frozenset({"Bucket", "Key"})),
    "list_objects_v2": (
        "GET",
        frozenset({"Bucket", "Prefix", "Delimiter", "MaxKeys", "StartAfter", "ContinuationToken"}),
    ),
}


def _presign_method(client_method: str, params: Mapping[str, Any], expires: int) -> str:
    """The HTTP method of a presignable call, once its parameters are valid."""
    if client_method not in _PRESIGN_METHODS:
        raise ParamValidationError(
            report="deltaglider presigns %s; not %r"
            % (", ".join(sorted(_PRESIGN_METHODS)), client_method)
        )
    method, allowed = _PRESIGN_METHODS[client_method]
    _check_params(client_method, params, allowed)
    _require(client_method, params, "Bucket")
    int(expires)  # a number, as botocore needs; its range is the server's to judge
    return method


def _presign_headers(
    client_method: str, params: Mapping[str, Any]
) -> tuple[dict[str, str], Mapping[str, Any]]:
    """The headers a URL signs (its user must send them, as botocore signs them), and the
    parameters left for its query: of a read, only the ``Response*`` overrides."""
    headers: dict[str, str] = {}
    if client_method == "put_object":
        headers = _put_headers(params)
        headers.update(_metadata_headers(params.get("Metadata")))
        if params.get("ContentMD5") is not None:
            headers["Content-MD5"] = str(params["ContentMD5"])
        if params.get("ContentLength") is not None:
            headers["Content-Length"] = str(params["ContentLength"])
    elif client_method in ("get_object", "head_object"):
        headers = _header_params(params, _READ_HEADER_PARAMS + _CONDITION_PARAMS)
        if params.get("Range") is not None:
            headers["Range"] = str(params["Range"])
        params = {n: v for n, v in params.items() if n.startswith("Response") and v is not None}
    return headers, params


def _presigned_url(
    engine: _DeltaEngine,
    client_method: str,
    params: dict[str, Any],
    expires: int,
    http_method: str,
    now: Callable[[], datetime.datetime],
) -> str:
    """generate_presigned_url, its parameters checked (_presign_method): a get_object URL
    of a delta-stored key is one of its rebuilt copy (_rehydrated_copy); the ``Response*``
    overrides and list parameters go in the query."""
    storage = engine.storage
    if getattr(storage, "is_local", False):
        raise ParamValidationError(report="presigned URLs need an S3 endpoint, not a local store")
    bucket, key = params.pop("Bucket"), params.pop("Key", None)
    query: list[tuple[str, str]] = []
    headers, rest = _presign_headers(client_method, params)
    if client_method == "get_object" and key is not None:
        try:
            lg: _Logical | None = engine.head(bucket, key, "HeadObject")
        except ClientError as e:
            if not _is_not_found(e):
                raise
            lg = None  # a URL that answers 404, as boto3's would
        if lg is not None and lg.kind == _Kind.DELTA:
            key = _rehydrated_copy(engine, lg, int(expires), now)
        for name, value in sorted(rest.items()):
            snake = re.sub(r"(?<!^)([A-Z])", r"-\1", name[len("Response") :]).lower()
            if isinstance(value, datetime.datetime):
                value = _http_date(value)
            query.append(("response-" + snake, str(value)))
    elif client_method == "list_objects_v2":
        query.append(("list-type", "2"))
        for name, value in rest.items():
            query.append((re.sub(r"(?<!^)([A-Z])", r"-\1", name).lower(), str(value)))
    return cast(_S3Storage, storage).presign_url(
        http_method, bucket, key, query, int(expires), headers
    )


def _rehydrated_copy(
    engine: _DeltaEngine, lg: _Logical, expires: int, now: Callable[[], datetime.datetime]
) -> str:
    """A rebuilt copy of a delta-stored object for a presigned URL to serve (README,
    "Presigned URLs of delta-stored files"). One copy per key, content and content
    type, named after them: a later URL reuses it, and a copy that would expire
    before the new URL is given the later expiry by a server-side copy onto itself
    (re-sent only where the server refuses that)."""
    import hashlib

    name = lg.key.rsplit("/", 1)[-1]
    ident = "\0".join((lg.key, lg.sha256 or lg.etag, lg.content_type))
    tmp_key = "%s%s_%s" % (
        _PRESIGN_PREFIX,
        hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32],
        name,
    )
    storage = engine.storage
    until = now() + datetime.timedelta(seconds=expires)
    meta = {
        "dg-expires-at": _iso_utc(until),
        "dg-original-key": lg.key,
        "dg-rehydrated": "true",
        "dg-created-at": _iso_utc(now()),
        "dg-file-sha256": lg.sha256 or "",
    }
    headers = {"Content-Type": lg.content_type}
    try:
        head: dict[str, Any] | None = storage.head_object(lg.bucket, tmp_key)
    except ClientError as e:
        if not _is_not_found(e):
            raise
        head = None
    if lg.sha256 and head and head.get("Metadata", {}).get("dg-file-sha256") == lg.sha256:
        try:
            lives = _parse_timestamp(head["Metadata"].get("dg-expires-at", ""))
        except ValueError:
            lives = None
        if lives is not None and lives >= until:
            return tmp_key
        try:
            storage.copy_object(
                lg.bucket,
                tmp_key,
                lg.bucket,
                tmp_key,
                metadata={k: _meta_encode(v) for k, v in meta.items()},
                metadata_directive="REPLACE",
                headers=headers,
            )
            return tmp_key
        except ClientError as e:
            logger.info("could not extend %s in place (%s); storing it again", tmp_key, e)
    fd, path = _private_tempfile(engine.tmp_dir(), ".rehydrate")
    os.close(fd)
    try:
        engine.get_to_file(lg.bucket, lg.key, path, logical=lg)
        _put_path(storage, lg.bucket, tmp_key, path, metadata=meta, headers=headers)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return tmp_key


def _purge_presign_copies(
    storage: _Storage, bucket: str, clock: Callable[[], datetime.datetime]
) -> dict[str, Any]:
    """purge_temp_files: the rebuilt copies under ``.deltaglider/tmp/`` whose
    ``dg-expires-at`` has passed are deleted; counts of what was seen and freed."""
    now = clock()
    deleted = expired = errors = freed = 0
    for page in _list_pages(storage, bucket, prefix=_PRESIGN_PREFIX):
        for obj in page.get("Contents", []):
            try:
                meta = storage.head_object(bucket, obj["Key"]).get("Metadata", {})
                when = meta.get("dg-expires-at")
                if when and _parse_timestamp(when) <= now:
                    expired += 1
                    storage.delete_object(bucket, obj["Key"])
                    deleted += 1
                    freed += obj["Size"]
            except (ClientError, ValueError) as e:
                logger.warning("purge: %s: %s", obj["Key"], e)
                errors += 1
    return {
        "bucket": bucket,
        "deleted_count": deleted,
        "expired_count": expired,
        "error_count": errors,
        "total_size_freed": freed,
    }


def _presigned_post(
    storage: _Storage,
    bucket: str,
    key: str,
    given_fields: Mapping[str, str] | None,
    given_conditions: Sequence[Any] | None,
    expires: int,
) -> dict[str, Any]:
    """generate_presigned_post: the policy names the bucket and the key (or, for a key
    ending in ``${filename}``, the key's start)."""
    if getattr(storage, "is_local", False):
        raise ParamValidationError(report="presigned POSTs need an S3 endpoint, not a local store")
    fields = dict(given_fields or {})
    conditions = list(given_conditions or [])
    conditions.append({"bucket": bucket})
    if key.endswith("${filename}"):
        conditions.append(["starts-with", "$key", key[: -len("${filename}")]])
    else:
        conditions.append({"key": key})
    fields["key"] = key
    return cast(_S3Storage, storage).presign_post(bucket, fields, conditions, int(expires))


# -- create_client: settings, then storage and credentials on first use ------------


class _StderrHandler(logging.Handler):
    """The handler ``log_level`` adds: each record to the sys.stderr of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # pragma: no cover - logging must never break the caller
            self.handleError(record)


def _set_log_level(level: str, source: str) -> None:
    """Set this module's log level; with no logging configured by the application (no
    handler on the root logger or ours), also show the records on stderr, since a level
    that prints nothing is not what asking for DEBUG means (Python's last-resort handler
    shows only warnings)."""
    name = str(level).strip().upper()
    if not isinstance(logging.getLevelName(name), int):
        raise InvalidConfigError(
            error_msg="%s must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not %r" % (source, level)
        )
    logger.setLevel(name)
    configured = logging.getLogger().handlers or any(
        not isinstance(h, logging.NullHandler) for h in logger.handlers
    )
    if not configured:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


def _apply_log_level(log_level: str | None, env: Mapping[str, str]) -> None:
    """create_client's ``log_level``, else ``DG_LOG_LEVEL``, set on this module's logger."""
    level = log_level or _env_setting(env, _ENV_LOG_LEVEL)
    if level:
        _set_log_level(level, _ENV_LOG_LEVEL if not log_level else "log_level")


def _with_tool_version(config: Config | None, tool_version: str | None) -> Config | None:
    """``config`` with ``tool_version`` added to its User-Agent extra."""
    if tool_version:
        extra = " ".join(filter(None, [config.user_agent_extra if config else None, tool_version]))
        config = (config or Config()).merge(Config(user_agent_extra=extra))
    return config


def _max_ratio_setting(max_ratio: float | None, env: Mapping[str, str]) -> float:
    """The largest delta worth storing, as a fraction of the file: the argument, else
    ``DG_MAX_RATIO``; between 0 and 1."""
    if max_ratio is None:
        max_ratio = float(_env_setting(env, _ENV_MAX_RATIO))
    if not 0.0 <= max_ratio <= 1.0:
        raise InvalidConfigError(error_msg="max_ratio must be between 0 and 1, got %r" % max_ratio)
    return max_ratio


def _endpoint_setting(
    endpoint_url: str | None, profile_name: str | None, env: Mapping[str, str]
) -> str | None:
    """The endpoint looked at for a ``file:`` store before any settings are read:
    ``endpoint_url``, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` when no profile is
    named (a profile's settings are read with the rest, when the storage is made)."""
    endpoint = endpoint_url
    if endpoint is None and not profile_name:
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    return endpoint


def _lazy_credentials(
    settings: _ClientSettings,
    anonymous: bool,
    access_key: str | None,
    secret_key: str | None,
    session_token: str | None,
    environ: Mapping[str, str],
    now: Callable[[], datetime.datetime],
) -> Callable[[], _Credentials | None]:
    """The credentials create_client's S3 storage signs with: resolved on its first
    request in botocore's order (README), then kept; None for unsigned requests."""
    provider_box: list[_CredentialProvider | None] = []

    def credentials() -> _Credentials | None:
        if anonymous or settings.unsigned:
            return None
        if not provider_box:
            provider = _resolve_credentials(
                access_key=access_key,
                secret_key=secret_key,
                session_token=session_token,
                profile_name=settings.profile_name,
                profile_explicit=settings.profile_explicit,
                profile=settings.profile,
                environ=environ,
                now=now,
            )
            if provider is None:
                raise NoCredentialsError()
            provider_box.append(provider)
        prov = provider_box[0]
        assert prov is not None
        return prov.get()

    return credentials


def _client_storage(
    endpoint: str | None,
    *,
    endpoint_url: str | None,
    config: Config | None,
    region_name: str | None,
    profile_name: str | None,
    anonymous: bool,
    aws_access_key_id: str | None,
    aws_secret_access_key: str | None,
    aws_session_token: str | None,
    environ: Mapping[str, str],
    now: Callable[[], datetime.datetime],
) -> _Storage:
    """create_client's storage, made on the client's first use: a local directory for a
    ``file:`` endpoint, else S3 over HTTP with botocore's settings (README)."""
    if endpoint and endpoint.startswith("file:"):
        return _LocalStorage(_local_root_from_url(endpoint), now=now)
    settings = _resolve_client_settings(
        config,
        region_name=region_name,
        endpoint_url=endpoint_url,
        profile_name=profile_name,
        environ=environ,
    )
    if settings.endpoint_url and settings.endpoint_url.startswith("file:"):
        return _LocalStorage(_local_root_from_url(settings.endpoint_url), now=now)
    return _S3Storage(
        endpoint_url=settings.endpoint_url,
        region=settings.region,
        credentials=_lazy_credentials(
            settings,
            anonymous,
            aws_access_key_id,
            aws_secret_access_key,
            aws_session_token,
            environ,
            now,
        ),
        addressing_style=settings.addressing_style,
        max_attempts=settings.max_attempts,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        request_timeout=settings.request_timeout,
        verify=settings.verify,
        max_pool_connections=settings.max_pool_connections,
        proxy_for=functools.partial(_proxy_for, proxies=settings.proxies, environ=environ),
        payload_signing=settings.payload_signing,
        now=now,
    )


def create_client(
    endpoint_url: str | None = None,
    log_level: str | None = None,
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
    aws_session_token: str | None = None,
    region_name: str | None = None,
    *,
    profile_name: str | None = None,
    config: Config | None = None,
    cache_dir: str | None = None,
    max_ratio: float | None = None,
    tool_version: str | None = None,
    anonymous: bool = False,
    xdelta3_path: str | None = None,
    max_workers: int = 10,
    archive_aware: bool | None = None,
    memory_limit: str | int | None = None,
    environ: Mapping[str, str] | None = None,
    now: Callable[[], datetime.datetime] = _utcnow,
    references: str | None = None,
) -> DeltaGliderClient:
    """A boto3-compatible S3 client that stores versioned artifacts as deltas.

    ``endpoint_url`` may be ``file:///path`` for a local directory store. Credentials,
    region and endpoint follow botocore's order (see README); they are resolved on first
    use. ``max_ratio`` (``DG_MAX_RATIO``, default 0.5) is the largest delta, as a fraction
    of the file, worth storing; ``cache_dir`` (``DG_CACHE_DIR``) holds references.
    ``archive_aware`` (``DG_ARCHIVE_AWARE=1``) makes deltas of zip-family files (wheels,
    jars, apks...) between their inflated forms: kilobytes where plain deltas take
    megabytes (README, "Archive-aware deltas"). ``memory_limit`` (``DG_MEMORY_LIMIT``,
    bytes or a size like ``2GiB``; default 600 MB) bounds the peak memory of the process
    and its xdelta3 children: bigger files get faster, smaller-window deltas within it
    (README, "xdelta3 settings"). ``references`` (``DG_REFERENCES``): ``shared`` (default)
    lets a file delta against a reference in a sibling folder, and makes a new reference
    when versions drift; ``folder`` keeps one reference per folder, the layout
    deltaglider_proxy reads (README, "Where references live").

    The first six parameters are deltaglider 6.x's, in its order. ``log_level``
    (``DG_LOG_LEVEL``) sets this module's logger, and prints its records on stderr when
    the application has configured no logging of its own. ``tool_version`` is added to
    the User-Agent."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    _check_settings(env)
    if references is None:
        references = str(_env_setting(env, _ENV_REFERENCES))
    references = _parse_choice(references, "references", choices=_REFERENCE_MODES)
    if archive_aware is None:
        archive_aware = bool(_env_setting(env, _ENV_ARCHIVE_AWARE))
    _apply_log_level(log_level, env)
    config = _with_tool_version(config, tool_version)
    max_ratio = _max_ratio_setting(max_ratio, env)
    endpoint = _endpoint_setting(endpoint_url, profile_name, env)

    storage_factory = functools.partial(
        _client_storage,
        endpoint,
        endpoint_url=endpoint_url,
        config=config,
        region_name=region_name,
        profile_name=profile_name,
        anonymous=anonymous,
        aws_access_key_id=aws_access_key_id,
        aws_secret_access_key=aws_secret_access_key,
        aws_session_token=aws_session_token,
        environ=env,
        now=now,
    )
    return DeltaGliderClient(
        storage_factory,
        cache_dir=cache_dir or _default_cache_dir(env),
        max_ratio=max_ratio,
        archive_aware=archive_aware,
        xdelta=_XDelta3(xdelta3_path, environ=env, memory_limit=memory_limit),
        environ=env,
        now=now,
        max_workers=max_workers,
        references=references,
    )


###############################################################################
# S3 gateway: `deltaglider serve` #############################################
###############################################################################

# The gateway speaks S3 to its clients and answers through the boto3-compatible client
# above, so every object it stores is stored as deltaglider stores it. Its pieces, in
# order (each after a ``# -- name --`` line):
#   constants, errors   _GATEWAY_* tables; _S3Reply, an S3 error answer; _s3_reply_from
#   checksums           _Crc, _Crc32, _CHECKSUMS: the x-amz-checksum-* of uploads
#   authentication      _GatewayUsers (key pairs), _GatewayAuth (Authorization headers,
#                       presigned URLs, POST policies with _policy_check), _Signed
#   request bodies      _BodyReader (Content-Length or chunked, under a deadline),
#                       _AwsChunked (signed chunks), _BodyDigests, and browser POST forms:
#                       _FormReader, _form_put_params
#   multipart uploads   _completed_parts, _Uploads
#   metrics             _GatewayMetrics
#   XML answers         _xml_* (short ones are written where they are answered), and
#                       _acl_policy (reads a PutBucketAcl body)
#   object requests     _preconditions (If-*), _object_headers, _put_params
#   the gateway         _Gateway (state, routing), _GatewayHandler (one connection: _serve
#                       routes, one method per S3 operation), _Share, _GatewayServer
#                       (sockets, worker slots, deadlines, draining)
# ``deltaglider serve`` itself (_cmd_serve, after the server) builds them from its options.

#: S3 refuses a request whose time is more than 15 minutes off (AWS "Authenticating
#: Requests: Time stamp"), and a presigned URL that lives longer than 7 days.
_GATEWAY_MAX_SKEW = 15 * 60
_GATEWAY_XML_BODY_MAX = 4 * 1024 * 1024  # CompleteMultipartUpload of 10,000 parts fits
_GATEWAY_CHUNK_LINE_MAX = 4096
#: What is left of a body the gateway did not read (a refused request's) is read and
#: dropped, up to this much, to keep the connection; past it the connection closes.
_GATEWAY_DRAIN_MAX = 64 * 1024
#: A browser POST form's bytes before its file (the fields, the policy among them): all
#: of it is read, and the policy checked, before a byte of the file is.
_GATEWAY_FORM_FIELDS_MAX = 256 * 1024
#: Seconds a client has, from its first byte, to send a request line and all its headers.
_GATEWAY_HEADER_TIMEOUT = 10.0
#: Bytes per second a request body may not fall below: its deadline grows with its size
#: (up to --request-timeout), so a few bytes cannot hold a worker for an hour.
_GATEWAY_MIN_BODY_RATE = 16 * 1024
_GATEWAY_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
_STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
_STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
_STREAMING_PAYLOADS = frozenset(
    {_STREAMING_SIGNED, _STREAMING_SIGNED_TRAILER, _STREAMING_UNSIGNED_TRAILER}
)
#: Subresources the gateway does not serve (versioning, lifecycle, policies, ...): they
#: answer NotImplemented rather than being mistaken for a listing or an upload.
_GATEWAY_UNSUPPORTED = frozenset(
    {
        "accelerate",
        "analytics",
        "cors",
        "encryption",
        "intelligent-tiering",
        "inventory",
        "legal-hold",
        "lifecycle",
        "logging",
        "metrics",
        "notification",
        "object-lock",
        "ownershipControls",
        "policy",
        "policyStatus",
        "publicAccessBlock",
        "replication",
        "requestPayment",
        "restore",
        "retention",
        "select",
        "tagging",
        "torrent",
        "versioning",
        "versionId",
        "versions",
        "website",
    }
)
#: Request headers asking for object lock, which needs versioning: NotImplemented.
_GATEWAY_LOCK_HEADERS = (
    "x-amz-object-lock-mode",
    "x-amz-object-lock-retain-until-date",
    "x-amz-object-lock-legal-hold",
)
#: Query parameters a SigV2 signature covers (botocore auth.py HmacV1Auth.QSAOfInterest).
_SIGV2_SUBRESOURCES = frozenset(
    {
        "accelerate",
        "acl",
        "analytics",
        "cors",
        "defaultObjectAcl",
        "delete",
        "inventory",
        "lifecycle",
        "location",
        "logging",
        "metrics",
        "notification",
        "object-lock",
        "partNumber",
        "policy",
        "replication",
        "requestPayment",
        "response-cache-control",
        "response-content-disposition",
        "response-content-encoding",
        "response-content-language",
        "response-content-type",
        "response-expires",
        "restore",
        "select",
        "select-type",
        "storageClass",
        "tagging",
        "torrent",
        "uploadId",
        "uploads",
        "versionId",
        "versioning",
        "versions",
        "website",
    }
)
#: Query parameters that carry a presigned URL's signature (SigV4, and SigV2 as botocore
#: presigns by default): they authenticate a request and never select what it does.
_PRESIGN_PARAMS = frozenset(
    {
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
        "X-Amz-Security-Token",
        "AWSAccessKeyId",
        "Signature",
        "Expires",
    }
)
#: Query parameters never written to the access log.
_LOG_REDACTED = frozenset(
    {"X-Amz-Signature", "X-Amz-Security-Token", "X-Amz-Credential", "Signature"}
)
#: (HTTP status, message) of the errors the gateway itself answers (AWS "Error responses").
_GATEWAY_ERRORS: dict[str, tuple[int, str]] = {
    "AccessDenied": (403, "Access Denied"),
    "AuthorizationHeaderMalformed": (400, "The authorization header is malformed."),
    "AuthorizationQueryParametersError": (400, "Error parsing the X-Amz-Credential parameter."),
    "BadDigest": (400, "The Content-MD5 you specified did not match what we received."),
    "EntityTooLarge": (400, "Your proposed upload exceeds the maximum allowed object size."),
    "EntityTooSmall": (400, "Your proposed upload is smaller than the minimum allowed size"),
    "IncompleteBody": (
        400,
        "You did not provide the number of bytes specified by the Content-Length HTTP header",
    ),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "InvalidAccessKeyId": (
        403,
        "The AWS Access Key Id you provided does not exist in our records.",
    ),
    "InvalidArgument": (400, "Invalid Argument"),
    "InvalidDigest": (400, "The Content-MD5 you specified is not valid."),
    "InvalidPart": (
        400,
        "One or more of the specified parts could not be found. The part may not have been "
        "uploaded, or the specified entity tag may not match the part's entity tag.",
    ),
    "InvalidPartOrder": (
        400,
        "The list of parts was not in ascending order. The parts list must be specified in "
        "order by part number.",
    ),
    "InvalidPolicyDocument": (400, "The content of the form does not meet the conditions."),
    "InvalidRange": (416, "The requested range is not satisfiable"),
    "InvalidRequest": (400, "Invalid Request"),
    "MalformedXML": (
        400,
        "The XML you provided was not well-formed or did not validate against our published "
        "schema.",
    ),
    "MaxPostPreDataLengthExceeded": (
        400,
        "Your POST request fields preceding the upload file were too large.",
    ),
    "MethodNotAllowed": (405, "The specified method is not allowed against this resource."),
    "MissingContentLength": (411, "You must provide the Content-Length HTTP header."),
    "NoSuchBucket": (404, "The specified bucket does not exist"),
    "NoSuchKey": (404, "The specified key does not exist."),
    "NoSuchUpload": (
        404,
        "The specified upload does not exist. The upload ID may be invalid, or the upload "
        "may have been aborted or completed.",
    ),
    "NotImplemented": (501, "A header you provided implies functionality that is not implemented"),
    "PreconditionFailed": (412, "At least one of the pre-conditions you specified did not hold"),
    "RequestTimeTooSkewed": (
        403,
        "The difference between the request time and the current time is too large.",
    ),
    "RequestTimeout": (
        400,
        "Your socket connection to the server was not read from or written to within the "
        "timeout period. Idle connections will be closed.",
    ),
    "SignatureDoesNotMatch": (
        403,
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
    ),
    "SlowDown": (503, "Please reduce your request rate."),
    "XAmzContentSHA256Mismatch": (
        400,
        "The provided 'x-amz-content-sha256' header does not match what was computed.",
    ),
}


class _S3Reply(Exception):
    """An S3 error answer: code, status and message, plus extra XML fields."""

    def __init__(self, code: str, message: str | None = None, **fields: str) -> None:
        status, default = _GATEWAY_ERRORS.get(code, (400, code))
        self.code = code
        self.status = int(fields.pop("status", status))
        self.message = message or default
        self.fields = fields
        super().__init__("%s: %s" % (code, self.message))


def _s3_reply_from(e: BaseException) -> _S3Reply:
    """What a client is told about an error raised by the client layer or the back end."""
    if isinstance(e, _S3Reply):
        return e
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 500)
        code = str(err.get("Code") or "InternalError")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "RequestTimeTooSkewed"):
            # The back end refused *our* credentials: the gateway is misconfigured, not the
            # client; saying so as the client's own auth error would mislead it.
            logger.error("the back end refused the gateway's request: %s", e)
            return _S3Reply("InternalError", "The gateway's back end refused its credentials.")
        if code.isdigit():  # a HEAD answer has no body: botocore keeps the status only
            code = {404: "NoSuchKey", 403: "AccessDenied", 412: "PreconditionFailed"}.get(
                status, "InvalidRequest"
            )
            message = None
        else:
            message = str(err.get("Message") or "") or None
        named = ("BucketName", "Key", "Condition", "ActualObjectSize", "RangeRequested")
        fields = {k: str(v) for k, v in err.items() if k in named}
        return _S3Reply(code, message, status=str(status), **fields)
    if isinstance(e, ParamValidationError):
        return _S3Reply("InvalidArgument", str(e).replace("\n", " "))
    if isinstance(e, (EndpointConnectionError, ReadTimeoutError)):
        logger.error("the back end is unreachable: %s", e)
        return _S3Reply("SlowDown", "The gateway's back end is unreachable; retry later.")
    logger.error("internal error: %s", e, exc_info=e)
    return _S3Reply("InternalError")


# -- authentication: users, SigV4 and SigV2, presigned URLs, POST policies ------------


def _raw_query(query: str) -> list[tuple[str, str]]:
    """Query pairs, percent-decoded but with ``+`` kept: SigV4 clients encode a space as
    %20, so a literal ``+`` is a plus (``parse_qsl`` would turn it into a space)."""
    import urllib.parse

    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((urllib.parse.unquote(name), urllib.parse.unquote(value)))
    return pairs


class _GatewayUsers:
    """Access key id → secret: one pair from the environment, or a file of pairs."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)

    def __len__(self) -> int:
        return len(self._users)

    def secret(self, access_key: str) -> str | None:
        return self._users.get(access_key)

    @classmethod
    def load(cls, path: str | None, environ: Mapping[str, str]) -> _GatewayUsers:
        """``--users FILE`` lines are ``ACCESS_KEY_ID:SECRET_ACCESS_KEY`` (``#`` comments);
        else DG_GATEWAY_ACCESS_KEY_ID / DG_GATEWAY_SECRET_ACCESS_KEY."""
        users: dict[str, str] = {}
        if path:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    key, sep, secret = line.partition(":")
                    if not sep or not key.strip() or not secret.strip():
                        raise InvalidConfigError(
                            error_msg="%s line %d: expected ACCESS_KEY_ID:SECRET_ACCESS_KEY"
                            % (path, n)
                        )
                    if key.strip() in users:
                        raise InvalidConfigError(
                            error_msg="%s line %d: access key %s is listed twice"
                            % (path, n, _printable(key.strip()))
                        )
                    users[key.strip()] = secret.strip()
        else:
            key = _env_setting(environ, _ENV_GATEWAY_ACCESS_KEY)
            secret = _env_setting(environ, _ENV_GATEWAY_SECRET_KEY)
            if key and secret:
                users[key] = secret
        if not users:
            raise InvalidConfigError(
                error_msg="serve: no gateway credentials: set %s and %s, or give --users FILE"
                % (_ENV_GATEWAY_ACCESS_KEY, _ENV_GATEWAY_SECRET_KEY)
            )
        return cls(users)


class _Signed(NamedTuple):
    """A request whose signature checked out: who sent it and how its body is signed."""

    access_key: str
    payload: str  # a hex SHA-256, UNSIGNED-PAYLOAD or a STREAMING-* mode
    signing_key: bytes
    timestamp: str
    scope: str
    seed_signature: str


def _parse_amz_date(value: str) -> datetime.datetime | None:
    """An X-Amz-Date (``YYYYMMDDTHHMMSSZ``, _SIGV4_TIMESTAMP exactly), else None; read
    by slicing, on every request: strptime takes five times as long."""
    digits = value[:8] + value[9:15]
    if len(value) != 16 or value[8] != "T" or value[15] != "Z":
        return None
    if not (digits.isascii() and digits.isdigit()):
        return None
    spans = ((0, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14))
    year, month, day, hour, minute, second = (int(digits[a:b]) for a, b in spans)
    try:
        utc = datetime.timezone.utc
        return datetime.datetime(year, month, day, hour, minute, second, tzinfo=utc)
    except ValueError:  # a month 13, a second 61, ...
        return None


#: A POST policy's expiration: ISO 8601 in UTC ("2030-01-01T12:00:00.000Z"), nothing looser
#: (S3 refuses "2030-01-01 12:00:00+00:00", Python's str() of a datetime).
_POLICY_EXPIRATION_RE = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$"


def _policy_check(
    conditions: list[Any], values: Mapping[str, str]
) -> tuple[set[str], tuple[int, int]]:
    """Every condition of a POST policy holds for the form's ``values`` (lower-cased names);
    returns the names the conditions cover and the file sizes they allow, checked once the
    file is read (AWS "Creating a POST policy": exact matches, ``eq``, ``starts-with``,
    ``content-length-range``)."""
    import json

    covered = {"policy", "x-amz-signature", "file", "awsaccesskeyid", "signature"}
    low, high = 0, sys.maxsize
    for cond in conditions:
        if isinstance(cond, dict):
            if len(cond) != 1:  # {"name": "value"}: an empty one allows nothing known
                raise _S3Reply(
                    "InvalidPolicyDocument",
                    "Invalid Policy: Invalid Simple-Condition: Simple-Conditions must have "
                    "exactly one property specified.",
                )
            for name, want in cond.items():
                name = name.lower()
                covered.add(name)
                if values.get(name) != str(want):
                    raise _S3Reply(
                        "AccessDenied",
                        "Invalid according to Policy: Policy Condition failed: "
                        '["eq", "$%s", "%s"]' % (name, want),
                    )
        elif not isinstance(cond, list) or len(cond) != 3:
            # a condition not understood is refused, never skipped (it would widen
            # what the policy's signer allowed)
            raise _S3Reply(
                "InvalidPolicyDocument",
                "Invalid Policy: Invalid Condition: %s" % json.dumps(cond)[:200],
            )
        else:
            op = str(cond[0]).lower()
            if op == "content-length-range":
                try:
                    low, high = max(low, int(cond[1])), min(high, int(cond[2]))
                except (TypeError, ValueError):
                    raise _S3Reply("InvalidPolicyDocument") from None
                continue
            name = str(cond[1]).lower().lstrip("$")
            covered.add(name)
            have = values.get(name, "")
            ok = have == str(cond[2]) if op == "eq" else have.startswith(str(cond[2]))
            if op not in ("eq", "starts-with") or not ok:
                raise _S3Reply(
                    "AccessDenied",
                    "Invalid according to Policy: Policy Condition failed: %s" % json.dumps(cond),
                )
    return covered, (low, high)


class _GatewayAuth:
    """Checks SigV4 (Authorization header or presigned query) against the gateway's users,
    as S3 does: same canonical request as :class:`_SigV4` builds, same error codes."""

    def __init__(
        self, users: _GatewayUsers, now: Callable[[], datetime.datetime] = _utcnow
    ) -> None:
        self.users = users
        self._now = now

    def _secret(self, access_key: str) -> str:
        secret = self.users.secret(access_key)
        if secret is None:
            raise _S3Reply("InvalidAccessKeyId", AWSAccessKeyId=access_key)
        return secret

    @staticmethod
    def _credential(text: str, code: str) -> tuple[str, str, str, str]:
        parts = text.split("/")
        if len(parts) != 5 or parts[4] != "aws4_request" or not parts[0]:
            raise _S3Reply(code, "Error parsing the Credential parameter: %r" % text)
        if parts[3] != "s3":
            raise _S3Reply(code, "Credential should be scoped to correct service: 's3'.")
        return parts[0], parts[1], parts[2], parts[3]

    def _check_time(self, when: datetime.datetime | None, code: str) -> None:
        if when is None:
            raise _S3Reply(
                code, "X-Amz-Date must be in the ISO8601 Long Format yyyyMMdd'T'HHmmss'Z'"
            )
        skew = abs((self._now() - when).total_seconds())
        if skew > _GATEWAY_MAX_SKEW:
            raise _S3Reply(
                "RequestTimeTooSkewed",
                RequestTime=when.strftime(_SIGV4_TIMESTAMP),
                ServerTime=self._now().strftime(_SIGV4_TIMESTAMP),
                MaxAllowedSkewMilliseconds=str(_GATEWAY_MAX_SKEW * 1000),
            )

    @staticmethod
    def _canonical_uri_candidates(raw_path: str) -> list[str]:
        """The path as sent; then as botocore would have quoted it, for a client that sent
        a different but equivalent encoding than the one it signed (``~``, ``!``...)."""
        import urllib.parse

        requoted = _quote_key(urllib.parse.unquote(raw_path))
        return [raw_path] if requoted == raw_path else [raw_path, requoted]

    def verify(
        self,
        method: str,
        raw_path: str,
        query: list[tuple[str, str]],
        headers: Mapping[str, str],
        v2_resource: str | None = None,
    ) -> _Signed:
        """``headers`` lower-cased (repeated ones joined by ``,``). ``v2_resource`` is the
        ``/bucket/key`` path a SigV2 presigned URL signs. Raises _S3Reply."""
        auth = headers.get("authorization")
        names = {k for k, _ in query}
        if auth is None and "X-Amz-Signature" in names:
            return self._verify_presigned(method, raw_path, query, headers)
        if auth is None and {"AWSAccessKeyId", "Signature", "Expires"} <= names:
            return self._verify_presigned_v2(method, v2_resource or raw_path, query, headers)
        if auth is None:
            raise _S3Reply("AccessDenied", "Anonymous access is not allowed by this gateway.")
        fields = self._authorization_fields(auth)
        credential = self._credential(fields["Credential"], "AuthorizationHeaderMalformed")
        secret = self._secret(credential[0])
        timestamp = self._request_time(headers, credential[1])
        payload = self._payload_mode(headers)
        signed = [h for h in fields["SignedHeaders"].split(";") if h]
        if "host" not in signed:
            raise _S3Reply("AccessDenied", "The host header must be signed.")
        unsigned = sorted(h for h in headers if h.startswith("x-amz-") and h not in signed)
        if unsigned:
            raise _S3Reply(
                "AccessDenied",
                "There were headers present in the request which were not signed",
                HeadersNotSigned=", ".join(unsigned),
            )
        canonical_query = _canonical_query(query)
        return self._match_sigv4(
            method,
            raw_path,
            canonical_query,
            headers,
            signed,
            payload,
            secret=secret,
            credential=credential,
            timestamp=timestamp,
            signature=fields["Signature"],
        )

    @staticmethod
    def _authorization_fields(auth: str) -> dict[str, str]:
        """Credential, SignedHeaders and Signature of an ``AWS4-HMAC-SHA256`` header."""
        if not auth.startswith(_SIGV4_ALGORITHM + " "):
            raise _S3Reply(
                "InvalidRequest",
                "The authorization mechanism you have provided is not supported. Please use "
                "AWS4-HMAC-SHA256.",
            )
        fields: dict[str, str] = {}
        for part in auth[len(_SIGV4_ALGORITHM) + 1 :].split(","):
            name, sep, value = part.strip().partition("=")
            if sep:
                fields[name] = value
        if not {"Credential", "SignedHeaders", "Signature"} <= set(fields):
            raise _S3Reply("AuthorizationHeaderMalformed")
        return fields

    def _request_time(self, headers: Mapping[str, str], date: str) -> str:
        """The signed request's timestamp (X-Amz-Date, else Date), within the allowed skew
        and on the credential's ``date``."""
        timestamp = headers.get("x-amz-date", "")
        when = _parse_amz_date(timestamp)
        if when is None and headers.get("date"):
            try:
                when = _parse_timestamp(headers["date"])
                timestamp = when.strftime(_SIGV4_TIMESTAMP)
            except ValueError:
                when = None
        self._check_time(when, "AccessDenied")
        if timestamp[:8] != date:
            raise _S3Reply(
                "AuthorizationHeaderMalformed",
                "The authorization header is malformed; Invalid credential date. Date is not "
                "the same as X-Amz-Date.",
            )
        return timestamp

    @staticmethod
    def _payload_mode(headers: Mapping[str, str]) -> str:
        """x-amz-content-sha256: a hex SHA-256, UNSIGNED-PAYLOAD or a STREAMING-* mode."""
        payload = headers.get("x-amz-content-sha256")
        if not payload:
            raise _S3Reply(
                "InvalidRequest", "Missing required header for this request: x-amz-content-sha256"
            )
        if payload not in _STREAMING_PAYLOADS and payload != _UNSIGNED_PAYLOAD:
            if not re.match(r"^[0-9a-f]{64}$", payload):
                raise _S3Reply(
                    "InvalidArgument",
                    "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, "
                    "STREAMING-... or a hex SHA-256 of the body",
                )
        return payload

    def _match_sigv4(
        self,
        method: str,
        raw_path: str,
        canonical_query: str,
        headers: Mapping[str, str],
        signed: list[str],
        payload: str,
        *,
        secret: str,
        credential: tuple[str, str, str, str],
        timestamp: str,
        signature: str,
    ) -> _Signed:
        """The request as SigV4 signs it (canonical request, string to sign), for the path
        as sent and as botocore would quote it: the _Signed request if one matches the
        ``signature`` given, else SignatureDoesNotMatch (with what S3 shows of it)."""
        import hashlib
        import hmac

        access_key, date, region, service = credential
        block = "".join("%s:%s\n" % (h, " ".join(headers.get(h, "").split())) for h in signed)
        scope = "%s/%s/%s/aws4_request" % (date, region, service)
        key = _SIGNING_KEYS.get(secret, date, region, service)
        for uri in self._canonical_uri_candidates(raw_path):
            canonical = "\n".join((method, uri, canonical_query, block, ";".join(signed), payload))
            sts = "\n".join(
                (
                    _SIGV4_ALGORITHM,
                    timestamp,
                    scope,
                    hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
                )
            )
            expected = hmac.new(key, sts.encode("utf-8"), hashlib.sha256).hexdigest()
            if hmac.compare_digest(expected, signature):
                return _Signed(access_key, payload, key, timestamp, scope, expected)
        raise _S3Reply(
            "SignatureDoesNotMatch",
            AWSAccessKeyId=access_key,
            StringToSign=sts,
            CanonicalRequest=canonical,
        )

    def verify_policy(
        self, fields: Mapping[str, str], bucket: str, key: str
    ) -> tuple[str, tuple[int, int]]:
        """A POST form's policy: signed by a known key, not expired, and every field it
        carries allowed by a condition (AWS "Creating a POST policy"). Returns the key id
        and the file sizes the policy allows (its content-length-range)."""
        lower = {k.lower(): v for k, v in fields.items() if not k.startswith("\0")}
        if not lower.get("policy"):
            raise _S3Reply("AccessDenied", "Anonymous uploads are not allowed by this gateway.")
        access_key = self._policy_signer(lower)
        conditions = self._policy_conditions(lower["policy"])
        values = dict(lower, bucket=bucket, key=key)
        covered, sizes = _policy_check(conditions, values)
        extra = sorted(n for n in lower if n not in covered and not n.startswith("x-ignore-"))
        if extra:
            raise _S3Reply(
                "AccessDenied",
                "Invalid according to Policy: Extra input fields: %s" % ", ".join(extra),
            )
        return access_key, sizes

    def _policy_signer(self, lower: Mapping[str, str]) -> str:
        """The access key whose signature of the form's policy checks out: SigV2 (boto3's
        default for generate_presigned_post) or SigV4 fields."""
        import hashlib
        import hmac

        policy_b64 = lower["policy"].encode("ascii", "replace")
        if "awsaccesskeyid" in lower:  # SigV2 form: boto3's default for generate_presigned_post
            access_key = lower["awsaccesskeyid"]
            digest = hmac.new(self._secret(access_key).encode(), policy_b64, hashlib.sha1)
            expected = base64.b64encode(digest.digest()).decode("ascii")
            given = lower.get("signature", "")
        elif lower.get("x-amz-algorithm") == _SIGV4_ALGORITHM:
            access_key, date, region, service = self._credential(
                lower.get("x-amz-credential", ""), "InvalidArgument"
            )
            signing_key = _SIGNING_KEYS.get(self._secret(access_key), date, region, service)
            expected = hmac.new(signing_key, policy_b64, hashlib.sha256).hexdigest()
            given = lower.get("x-amz-signature", "")
        else:
            raise _S3Reply("InvalidArgument", "POST uploads need x-amz-algorithm AWS4-HMAC-SHA256")
        if not given:
            raise _S3Reply(
                "InvalidArgument", "Bucket POST must contain a field named 'x-amz-signature'"
            )
        if not hmac.compare_digest(expected, given):
            raise _S3Reply("SignatureDoesNotMatch", AWSAccessKeyId=access_key)
        return access_key

    def _policy_conditions(self, policy_b64: str) -> list[Any]:
        """The conditions of a policy document that has not expired."""
        import json

        try:
            policy = json.loads(base64.b64decode(policy_b64))
            text = str(policy["expiration"])
            if not re.match(_POLICY_EXPIRATION_RE, text):  # ISO 8601 in UTC, as S3 requires
                raise ValueError(text)
            expiration = _parse_timestamp(text)
            conditions = policy["conditions"]
        except (ValueError, KeyError, TypeError):
            raise _S3Reply(
                "InvalidPolicyDocument", "Invalid Policy: no valid expiration or conditions"
            ) from None
        if not isinstance(conditions, list) or not conditions:
            raise _S3Reply("InvalidPolicyDocument", "Invalid Policy: Invalid 'conditions' value")
        if self._now() > expiration:
            raise _S3Reply("AccessDenied", "Invalid according to Policy: Policy expired.")
        return conditions

    def _verify_presigned_v2(
        self,
        method: str,
        resource: str,
        query: list[tuple[str, str]],
        headers: Mapping[str, str],
    ) -> _Signed:
        """A SigV2 query-string URL: what boto3's generate_presigned_url makes unless the
        client is configured for s3v4 (botocore auth.py HmacV1QueryAuth)."""
        import hashlib
        import hmac

        q = dict(reversed(query))
        secret = self._secret(q["AWSAccessKeyId"])
        try:
            expires = int(q["Expires"])
        except ValueError:
            raise _S3Reply("AccessDenied", "Invalid date (should be seconds since epoch)") from None
        if self._now().timestamp() > expires:
            raise _S3Reply("AccessDenied", "Request has expired", Expires=str(expires))
        interesting = sorted((k, v) for k, v in query if k in _SIGV2_SUBRESOURCES)
        subresources = ""
        if interesting:
            subresources = "?" + "&".join(k + ("=" + v if v else "") for k, v in interesting)
        amz = "".join(
            "%s:%s\n" % (k, headers[k].strip()) for k in sorted(headers) if k.startswith("x-amz-")
        )
        head = "\n".join(
            (method, headers.get("content-md5", ""), headers.get("content-type", ""), str(expires))
        )
        # A bucket's own resource is "/bucket/" as botocore signs it (CreateBucket,
        # DeleteBucket, listings), "/bucket" as others may: both name that bucket.
        resources = [resource]
        if resource.count("/") == 1 and len(resource) > 1:
            resources.append(resource + "/")
        for candidate in resources:
            sts = head + "\n" + amz + candidate + subresources
            digest = hmac.new(secret.encode("utf-8"), sts.encode("utf-8"), hashlib.sha1).digest()
            expected = base64.b64encode(digest).decode("ascii")
            if hmac.compare_digest(expected, q["Signature"]):
                break
        else:
            raise _S3Reply(
                "SignatureDoesNotMatch",
                AWSAccessKeyId=q["AWSAccessKeyId"],
                StringToSign=head + "\n" + amz + resource + subresources,
            )
        return _Signed(q["AWSAccessKeyId"], _UNSIGNED_PAYLOAD, b"", "", "", expected)

    def _verify_presigned(
        self,
        method: str,
        raw_path: str,
        query: list[tuple[str, str]],
        headers: Mapping[str, str],
    ) -> _Signed:
        q: dict[str, str] = {}
        for k, v in query:
            q.setdefault(k, v)
        code = "AuthorizationQueryParametersError"
        if q.get("X-Amz-Algorithm") != _SIGV4_ALGORITHM:
            raise _S3Reply(code, 'X-Amz-Algorithm only supports "AWS4-HMAC-SHA256"')
        for name in ("X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders"):
            if not q.get(name):
                raise _S3Reply(
                    code,
                    "Query-string authentication version 4 requires the X-Amz-Algorithm, "
                    "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and "
                    "X-Amz-Expires parameters.",
                )
        access_key, date, region, service = self._credential(q["X-Amz-Credential"], code)
        secret = self._secret(access_key)
        when = _parse_amz_date(q["X-Amz-Date"])
        if when is None or q["X-Amz-Date"][:8] != date:
            raise _S3Reply(code, "Invalid X-Amz-Date or credential date")
        try:
            expires = int(q["X-Amz-Expires"])
        except ValueError:
            raise _S3Reply(code, "X-Amz-Expires should be a number") from None
        if not 0 <= expires <= _PRESIGN_MAX_EXPIRES:
            raise _S3Reply(
                code,
                "X-Amz-Expires must be less than a week (in seconds) that is 604800",
            )
        now = self._now()
        if (when - now).total_seconds() > _GATEWAY_MAX_SKEW:
            raise _S3Reply("AccessDenied", "Request is not valid yet")
        if (now - when).total_seconds() >= expires:  # a URL of 0 s is expired on arrival (S3)
            raise _S3Reply(
                "AccessDenied",
                "Request has expired",
                Expires=(when + datetime.timedelta(seconds=expires)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                ServerTime=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
        signed = [h for h in q["X-Amz-SignedHeaders"].split(";") if h]
        if "host" not in signed:
            raise _S3Reply("AccessDenied", "The host header must be signed.")
        payload = q.get("X-Amz-Content-Sha256") or _UNSIGNED_PAYLOAD
        canonical_query = _canonical_query((k, v) for k, v in query if k != "X-Amz-Signature")
        credential = (access_key, date, region, service)
        return self._match_sigv4(
            method,
            raw_path,
            canonical_query,
            headers,
            signed,
            payload,
            secret=secret,
            credential=credential,
            timestamp=q["X-Amz-Date"],
            signature=q["X-Amz-Signature"],
        )


# -- request bodies: length or chunked, aws-chunked, digests, POST forms --------------


def _framing(headers: Mapping[str, str]) -> tuple[bool, int | None]:
    """How a request's body is framed (RFC 9112 6.3): (chunked, Content-Length or None when
    there is none). Anything else is refused, not guessed: a proxy in front that reads the
    framing another way would see a different body end, and take our body's rest for its
    next request. A transfer coding but chunked (``gzip, chunked`` would be stored still
    compressed), both headers at once, a length but plain ASCII digits (``+5``, ``5,5``,
    non-ASCII digits, all of which int() takes)."""
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if coding.strip().lower() != "chunked":
            raise _S3Reply("NotImplemented", "Transfer-Encoding %r is not supported" % coding[:40])
        if "content-length" in headers:
            raise _S3Reply("InvalidRequest", "Transfer-Encoding and Content-Length together")
        return True, None
    length = headers.get("content-length")
    if length is None:
        return False, None
    length = length.strip(" \t")  # RFC 9110 5.5: not part of the value
    if not (length.isascii() and length.isdigit() and len(length) <= 19):
        raise _S3Reply("InvalidArgument", "Content-Length is not a number")
    return False, int(length)


def _framing_text(line: bytes) -> bytes | None:
    """A line of chunked framing (HTTP or aws-chunked) without its CRLF, or None where it
    does not end in CRLF or holds another CR or LF: every client sends CRLF, and a bare LF
    read as an end of line by one side and not by the other moves the body's end."""
    text = line[:-2]
    if not line.endswith(b"\r\n") or b"\r" in text or b"\n" in text:
        return None
    return text


def _chunk_size(line: bytes) -> int | None:
    """The size on a chunk's header line, HTTP or aws-chunked (RFC 9112 7.1: hex digits,
    then any extensions after ``;``), or None where the line is not one: int(x, 16) alone
    takes ``-1``, ``0x10``, ``1_0`` and spaces."""
    text = _framing_text(line)
    if text is None:
        return None
    size = text.split(b";", 1)[0].rstrip(b" \t")
    if not 0 < len(size) <= 16 or size.strip(b"0123456789abcdefABCDEF"):
        return None
    return int(size, 16)


def _trailer_fields(readline: Callable[[], bytes], what: str) -> list[bytes]:
    """The field lines after a last chunk, up to the empty line (HTTP's trailer section,
    aws-chunked's trailers; the end of an aws-chunked body ends them too), without CRLF:
    at most 20, each ``name:value``. A line of spaces is not the end: a proxy that reads
    it as a folded field line would read on, and take what follows as this body."""
    fields: list[bytes] = []
    while True:
        line = readline()
        if line in (b"", b"\r\n"):
            return fields
        text = _framing_text(line)
        if text is None or b":" not in text or text[:1] in (b" ", b"\t"):
            raise _S3Reply("InvalidRequest", "%s: not a field line" % what)
        fields.append(text)
        if len(fields) > 20:
            raise _S3Reply("InvalidRequest", "too many %s" % what)


class _BodyReader:
    """The bytes of a request body as sent: Content-Length or HTTP chunked, under the
    request deadline; counts what arrived. A short body is IncompleteBody, a chunked
    framing that is not RFC 9112's (a size line, the chunk, its CRLF) InvalidRequest."""

    def __init__(
        self, rfile: io.BufferedReader, length: int | None, chunked: bool, deadline: float
    ) -> None:
        self._f = rfile
        self._left = length
        self._chunked = chunked
        self._chunk_left = 0
        self._done = False
        self._failed = False
        self._deadline = deadline
        self.received = 0

    def _clock(self) -> None:
        if time.monotonic() > self._deadline:
            raise _S3Reply("RequestTimeout")

    def _raw(self, n: int) -> bytes:
        """At most ``n`` bytes, what one receive brings (read1), so the deadline is checked
        however the bytes trickle in (read(n) would wait for all n, each byte resetting
        the socket's timeout)."""
        return self._take(lambda: self._f.read1(n))

    def _take(self, read: Callable[[], bytes]) -> bytes:
        import socket

        self._clock()
        try:
            data = read()
        except (socket.timeout, TimeoutError):
            raise _S3Reply("RequestTimeout") from None
        if not data:
            raise _S3Reply("IncompleteBody")
        self.received += len(data)
        return data

    def _framing_line(self) -> bytes:
        """One line of the chunked framing, up to its LF, at most _GATEWAY_CHUNK_LINE_MAX
        bytes, read as it arrives (peek, then what of it is the line) under the deadline."""
        out = b""
        while not out.endswith(b"\n"):
            room = _GATEWAY_CHUNK_LINE_MAX - len(out)
            if room <= 0:
                raise _S3Reply("InvalidRequest", "chunked encoding: a line is too long")

            def part(room: int = room) -> bytes:
                ahead = self._f.peek(1)[:room]
                end = ahead.find(b"\n")
                return self._f.read(len(ahead) if end < 0 else end + 1) if ahead else b""

            out += self._take(part)
        return out

    def readline(self) -> bytes:
        """One line of an aws-chunked body (bounded)."""
        out = b""
        while not out.endswith(b"\n"):
            c = self.read(1)
            if not c:
                break
            out += c
            if len(out) > _GATEWAY_CHUNK_LINE_MAX:
                self._failed = True
                raise _S3Reply("InvalidRequest", "aws-chunked line too long")
        return out

    def read(self, n: int) -> bytes:
        try:
            return self._read(n)
        except _S3Reply:
            self._failed = True
            raise

    def _read(self, n: int) -> bytes:
        if self._done or n <= 0:
            return b""
        if not self._chunked:
            assert self._left is not None
            if self._left <= 0:
                self._done = True
                return b""
            data = self._raw(min(n, self._left))
            self._left -= len(data)
            return data
        if self._chunk_left == 0:
            size = _chunk_size(self._framing_line())
            if size is None:
                raise _S3Reply("InvalidRequest", "chunked encoding: not a chunk size line")
            if size == 0:
                _trailer_fields(self._framing_line, "HTTP trailers")  # none are used
                self._done = True
                return b""
            self._chunk_left = size
        data = self._raw(min(n, self._chunk_left))
        self._chunk_left -= len(data)
        if self._chunk_left == 0 and self._framing_line() != b"\r\n":
            raise _S3Reply("InvalidRequest", "chunked encoding: a chunk is longer than its size")
        return data

    def left(self) -> int | None:
        """Bytes of the body still to come; None while a chunked body's end is unknown,
        and once a read failed or its time ran out: what is left cannot be read."""
        if self._done or (not self._chunked and self._left == 0):
            return 0  # all read, however long the request took after
        if self._chunked or self._failed or time.monotonic() > self._deadline:
            return None
        return self._left

    def drain(self, limit: int) -> bool:
        """Read and drop what is left, up to ``limit`` bytes; True when it all came."""
        try:
            while True:
                data = self.read(min(_IO_CHUNK, limit + 1))
                if not data:
                    return True
                limit -= len(data)
                if limit < 0:
                    return False
        except _S3Reply:
            return False


class _AwsChunked:
    """The payload inside ``Content-Encoding: aws-chunked``: chunk signatures checked as
    they arrive (AWS "Signature calculations for the Authorization header: transferring
    payload in multiple chunks"), trailing checksums collected."""

    def __init__(self, raw: _BodyReader, signed: _Signed) -> None:
        self._raw = raw
        self._signed = signed
        self._with_sig = signed.payload in (_STREAMING_SIGNED, _STREAMING_SIGNED_TRAILER)
        self._prev = signed.seed_signature
        self._left = 0
        self._chunk_sha: Any = None
        self._chunk_sig = ""
        self._done = False
        self.trailers: dict[str, str] = {}

    def _sts(self, kind: str, last: str) -> str:
        return "\n".join((kind, self._signed.timestamp, self._signed.scope, self._prev, last))

    def _check(self, sts: str, given: str) -> None:
        import hashlib
        import hmac

        expected = hmac.new(self._signed.signing_key, sts.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, given):
            raise _S3Reply("SignatureDoesNotMatch", "The chunk signature does not match.")
        self._prev = expected

    def _header(self) -> bool:
        """Read a chunk's header line; False at the final (empty) chunk."""
        import hashlib

        line = self._raw.readline()
        size = _chunk_size(line)
        if size is None:
            raise _S3Reply("IncompleteBody", "Malformed aws-chunked encoding")
        self._chunk_sig = ""
        if self._with_sig:
            ext = line[:-2].partition(b";")[2]  # the CRLF checked by _chunk_size
            name, _, value = ext.decode("ascii", "replace").partition("=")
            if name.strip() != "chunk-signature" or not value:
                raise _S3Reply("SignatureDoesNotMatch", "A chunk has no chunk-signature.")
            self._chunk_sig = value.strip()
        self._left = size
        self._chunk_sha = hashlib.sha256()
        if size == 0:
            self._finish_chunk()
            self._read_trailers()
            self._done = True
            if self._raw.read(1):  # read to its end: a chunked request's framing too
                raise _S3Reply("InvalidRequest", "bytes after the aws-chunked body")
            return False
        return True

    def _finish_chunk(self) -> None:
        if self._with_sig:
            sts = self._sts(
                "AWS4-HMAC-SHA256-PAYLOAD", _EMPTY_SHA256 + "\n" + self._chunk_sha.hexdigest()
            )
            self._check(sts, self._chunk_sig)

    def _read_trailers(self) -> None:
        import hashlib

        signature = None
        canonical = ""
        for line in _trailer_fields(self._raw.readline, "trailers"):
            text = line.decode("ascii", "replace").strip()
            name, _, value = text.partition(":")
            name = name.strip().lower()
            if name == "x-amz-trailer-signature":
                signature = value.strip()
            else:
                self.trailers[name] = value.strip()
                canonical += "%s:%s\n" % (name, value.strip())
        if self._signed.payload == _STREAMING_SIGNED_TRAILER:
            if signature is None:
                raise _S3Reply("SignatureDoesNotMatch", "The trailer has no signature.")
            sts = self._sts(
                "AWS4-HMAC-SHA256-TRAILER", hashlib.sha256(canonical.encode()).hexdigest()
            )
            self._check(sts, signature)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            data = self._raw.read(n - len(out))
            if not data:
                break
            out += data
        return out

    def read(self, n: int) -> bytes:
        if self._done:
            return b""
        if self._left == 0 and not self._header():
            return b""
        data = self._raw.read(min(n, self._left))
        if not data:
            raise _S3Reply("IncompleteBody")
        self._chunk_sha.update(data)
        self._left -= len(data)
        if self._left == 0:
            if self._exact(2) != b"\r\n":
                raise _S3Reply("IncompleteBody", "Malformed aws-chunked encoding")
            self._finish_chunk()
        return data


class _BodyDigests:
    """Every digest a request body carries, taken as its bytes arrive and checked at its
    end: x-amz-content-sha256 (an aws-chunked body's decoded length instead), Content-MD5
    and one x-amz-checksum-* (a header, or a trailer that x-amz-trailer announces)."""

    def __init__(self, headers: Mapping[str, str], payload: str) -> None:
        self._headers = headers
        self._payload = payload
        self._hashes = _Hashes(md5=True)
        self._algo: str | None = None
        for name in _CHECKSUMS:
            if ("x-amz-checksum-" + name) in headers or headers.get(
                "x-amz-trailer", ""
            ).strip().lower() == ("x-amz-checksum-" + name):
                self._algo = name
        self._checksum = _CHECKSUMS[self._algo]() if self._algo else None
        #: (algorithm, base64 value) of the x-amz-checksum-* the body came with, once checked
        self.checksum: tuple[str, str] | None = None

    @property
    def size(self) -> int:
        return self._hashes.size

    def update(self, data: bytes) -> None:
        self._hashes.update(data)
        if self._checksum is not None:
            self._checksum.update(data)

    def check(self, trailers: Mapping[str, str]) -> _FileInfo:
        """The body's digests once it is all in, each it was sent with checked."""
        h = self._headers
        info = self._hashes.info()
        if self._payload in _STREAMING_PAYLOADS:
            declared = int(h["x-amz-decoded-content-length"])
            if info.size != declared:
                raise _S3Reply("IncompleteBody")
        elif self._payload != _UNSIGNED_PAYLOAD and info.sha256 != self._payload:
            raise _S3Reply(
                "XAmzContentSHA256Mismatch",
                ClientComputedContentSHA256=self._payload,
                S3ComputedContentSHA256=info.sha256,
            )
        if "content-md5" in h:
            try:
                given = base64.b64decode(h["content-md5"], validate=True)
            except ValueError:
                raise _S3Reply("InvalidDigest") from None
            if len(given) != 16:
                raise _S3Reply("InvalidDigest")
            if given != bytes.fromhex(info.md5):
                raise _S3Reply("BadDigest")
        if self._checksum is not None and self._algo is not None:
            algo = self._algo
            name = "x-amz-checksum-" + algo
            given_text = h.get(name) or trailers.get(name) or ""
            value = base64.b64encode(self._checksum.digest()).decode()
            if value != given_text.strip():
                raise _S3Reply(
                    "BadDigest",
                    "The %s you specified did not match the calculated checksum." % algo.upper(),
                )
            self.checksum = (algo, value)
        return info


class _Spooled(NamedTuple):
    path: str
    #: its digests, taken as it arrived; None for a joined multipart upload, which the
    #: engine hashes in the pass its delta check makes over the file anyway
    info: _FileInfo | None
    checksum: tuple[str, str] | None = None  # (algorithm, base64): the x-amz-checksum sent
    parts: Sequence[int] = ()  # the sizes of the parts it was assembled from


class _FormReader:
    """A browser POST's multipart/form-data body, read as it arrives: first the fields
    before the ``file`` part, which S3 requires to come last (each field at most 64 KiB,
    _GATEWAY_FORM_FIELDS_MAX in all), so its policy is checked before any of the file is
    read; then the file, streamed to its closing boundary."""

    def __init__(self, body: _BodyReader | _AwsChunked, boundary: bytes) -> None:
        self._body = body
        self._boundary = boundary
        self._buf = bytearray()
        self._pos = 0  # what of _buf is read
        self._taken = 0  # bytes of the form before the file

    def _fill(self) -> bool:
        data = self._body.read(_IO_CHUNK)
        if not data:
            return False
        del self._buf[: self._pos]
        self._pos = 0
        self._buf += data
        return True

    def _line(self, limit: int) -> bytes:
        """One line and its end, or its first ``limit`` bytes; b"" at the end of the body."""
        while True:
            at = self._buf.find(b"\n", self._pos, self._pos + limit)
            if at >= 0:
                end = at + 1
                break
            if len(self._buf) - self._pos >= limit or not self._fill():
                end = min(len(self._buf), self._pos + limit)
                break
        line = bytes(self._buf[self._pos : end])
        self._pos = end
        self._taken += len(line)
        if self._taken > _GATEWAY_FORM_FIELDS_MAX:
            raise _S3Reply("MaxPostPreDataLengthExceeded")
        return line

    def fields(self) -> dict[str, str]:
        """The fields up to the file part, the file's name under ``"\0filename"``."""
        boundary = self._boundary
        if self._line(1024).rstrip(b"\r\n") != boundary:
            raise _S3Reply("InvalidArgument", "The body is not multipart/form-data")
        fields: dict[str, str] = {}
        while True:
            headers: dict[str, str] = {}
            while True:
                h = self._line(8192)
                if not h:
                    raise _S3Reply("IncompleteBody")
                if h in (b"\r\n", b"\n"):
                    break
                name, _, value = h.decode("utf-8", "replace").partition(":")
                headers[name.strip().lower()] = value.strip()
            disposition = headers.get("content-disposition", "")
            m = re.search(r'\bname="([^"]*)"', disposition)
            name = m.group(1) if m else ""
            if name == "file":
                fm = re.search(r'\bfilename="([^"]*)"', disposition)
                fields["\0filename"] = fm.group(1) if fm else ""
                return fields
            data = b""
            while True:
                chunk = self._line(65536)
                if not chunk:
                    raise _S3Reply("IncompleteBody")
                if chunk.rstrip(b"\r\n") in (boundary, boundary + b"--"):
                    break
                data += chunk
                if len(data) > 65536:
                    raise _S3Reply("InvalidArgument", "A form field is larger than 64 KiB")
            if chunk.rstrip(b"\r\n") == boundary + b"--":
                raise _S3Reply(
                    "InvalidArgument", "POST requires exactly one file upload per request."
                )
            if data.endswith(b"\r\n"):
                data = data[:-2]
            fields[name] = data.decode("utf-8")

    def file(self, out: IO[bytes], sizes: tuple[int, int]) -> _FileInfo:
        """Copy the file part (after fields()) to ``out`` and hash it; EntityTooLarge as soon
        as it is past ``sizes`` (the policy's content-length-range, within the gateway's
        limit), EntityTooSmall when it ends short of it."""
        low, high = sizes
        tail = b"\r\n" + self._boundary + b"--"
        hold = len(tail) + 4  # the closing boundary ends the body (a trailing CRLF is allowed)
        hashes = _Hashes(md5=True)

        def take(n: int) -> None:
            if hashes.size + n > high:
                raise _S3Reply("EntityTooLarge")
            piece = bytes(self._buf[self._pos : self._pos + n])
            self._pos += n
            hashes.update(piece)
            out.write(piece)

        while True:
            if len(self._buf) - self._pos > hold:
                take(len(self._buf) - self._pos - hold)
            if not self._fill():
                break
        at = bytes(self._buf[self._pos :]).rfind(tail)
        if at < 0:
            raise _S3Reply("IncompleteBody", "The form has no closing boundary")
        take(at)
        if hashes.size < low:
            raise _S3Reply("EntityTooSmall")
        return hashes.info()


def _form_put_params(fields: Mapping[str, str], bucket: str, key: str) -> dict[str, Any]:
    """boto3 PutObject parameters from a browser POST form's fields: x-amz-meta-* and the
    fields named like PutObject's headers (Content-Type, Cache-Control, ...)."""
    params: dict[str, Any] = {"Bucket": bucket, "Key": key}
    meta = {}
    for name, value in fields.items():
        lname = name.lower()
        if lname.startswith("x-amz-meta-"):
            meta[lname[len("x-amz-meta-") :]] = value
        for pname, header in _PUT_HEADER_PARAMS:
            if lname == header.lower():
                params[pname] = value
    if meta:
        params["Metadata"] = meta
    return params


# -- multipart uploads: parts on local disk until completed ---------------------------


def _completed_parts(root: ET.Element) -> list[tuple[int, str]]:
    """(part number, ETag unquoted) from a CompleteMultipartUpload body, in ascending
    order of part numbers as S3 requires (MalformedXML, InvalidPartOrder), each once: a
    number listed twice in a row (a part re-sent while its first send still ran, both
    answers kept by the client, as s3-tests' test_multipart_resend_first_finishes_last
    does) counts by its last entry, as RGW and SeaweedFS take it."""
    wanted: list[tuple[int, str]] = []
    for part in root.findall("Part"):
        try:
            number = int(_xml_text(part, "PartNumber") or "")
        except ValueError:
            raise _S3Reply("MalformedXML") from None
        wanted.append((number, (_xml_text(part, "ETag") or "").strip().strip('"')))
    if not wanted:
        raise _S3Reply("MalformedXML", "You must specify at least one part")
    numbers = [n for n, _ in wanted]
    if numbers != sorted(numbers):
        raise _S3Reply("InvalidPartOrder")
    return list(dict(wanted).items())


def _spool_copy_source(
    client: DeltaGliderClient, params: Mapping[str, Any], size: int, folder: str
) -> _Spooled:
    """UploadPartCopy's source bytes (GetObject ``params``, a delta rebuilt and verified by
    the client) in a private temp file in ``folder``; they must be ``size`` bytes."""
    fd, path = _private_tempfile(folder, ".copy")
    try:
        body = client.get_object(**params)["Body"]
        try:
            with os.fdopen(fd, "wb") as out:
                info = _Hashes(md5=True).read(body, each=out.write).info()
        finally:
            body.close()
        if info.size != size:  # the source changed meanwhile
            raise _S3Reply("InternalError")
    except BaseException:
        os.unlink(path)
        raise
    return _Spooled(path, info)


class _Uploads:
    """Multipart uploads held by the gateway until they complete: each part on local disk
    under ``<state>/uploads/<id>/``; CompleteMultipartUpload assembles them into one file
    that the engine stores as a delta, so nothing of an upload is visible before."""

    _ID_RE = r"^[0-9a-f]{32}$"

    def __init__(self, folder: str) -> None:
        self.folder = folder
        _private_mkdir(folder)
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def lock(self, upload_id: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(upload_id, threading.Lock())

    def _dir(self, upload_id: str) -> str:
        if not re.match(self._ID_RE, upload_id):
            raise _S3Reply("NoSuchUpload")
        return os.path.join(self.folder, upload_id)

    def create(self, record: dict[str, Any]) -> str:
        import json

        upload_id = _random_hex()
        tmp = os.path.join(self.folder, ".new-" + upload_id)
        _private_mkdir(tmp)
        with open(os.path.join(tmp, "upload.json"), "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, self._dir(upload_id))
        return upload_id

    def record(self, bucket: str, key: str, upload_id: str) -> dict[str, Any]:
        import json

        try:
            with open(os.path.join(self._dir(upload_id), "upload.json"), encoding="utf-8") as f:
                rec: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            raise _S3Reply("NoSuchUpload", UploadId=upload_id) from None
        if rec.get("Bucket") != bucket or rec.get("Key") != key:
            raise _S3Reply("NoSuchUpload", UploadId=upload_id)
        return rec

    def add_part(self, upload_id: str, number: int, spooled: _Spooled, now: str) -> str:
        """Keep a part, replacing one of the same number: the send that finishes last wins,
        as on S3. Its bytes and its ETag change together, under the upload's lock (a
        completion assembling it meanwhile sees the old part or the new one, whole).
        Returns its ETag."""
        import json

        folder = self._dir(upload_id)
        assert spooled.info is not None
        meta: dict[str, Any] = {
            "ETag": '"%s"' % spooled.info.md5,
            "Size": spooled.info.size,
            "LastModified": now,
        }
        if spooled.checksum is not None:  # checked as it arrived: a composite's part digest
            meta["Checksum"] = list(spooled.checksum)
        base = os.path.join(folder, "part-%05d" % number)
        try:
            fd, tmp = _private_tempfile(folder, ".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(meta, f)
            with self.lock(upload_id):
                os.replace(spooled.path, base)
                os.replace(tmp, base + ".json")
        except FileNotFoundError:  # aborted or completed meanwhile
            raise _S3Reply("NoSuchUpload", UploadId=upload_id) from None
        return str(meta["ETag"])

    def parts(self, upload_id: str) -> dict[int, dict[str, Any]]:
        import json

        folder = self._dir(upload_id)
        out = {}
        try:
            names = os.listdir(folder)
        except OSError:
            raise _S3Reply("NoSuchUpload", UploadId=upload_id) from None
        for name in names:
            m = re.match(r"^part-(\d{5})\.json$", name)
            if not m:
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            meta["path"] = os.path.join(folder, name[: -len(".json")])
            out[int(m.group(1))] = meta
        return out

    def assemble(
        self,
        upload_id: str,
        wanted: list[tuple[int, str]],
        folder: str,
        checksum: tuple[str, str] | None = None,
    ) -> _Spooled:
        """The parts ``wanted`` ((number, ETag) in order) joined into one private temp
        file in ``folder``, once each is checked: uploaded with that ETag, and all but the
        last at least _MIN_PART_SIZE (S3's InvalidPart and EntityTooSmall). ``checksum``:
        the (algorithm, type) the upload was created with: the joined file's checksum is
        taken as the parts are copied, FULL_OBJECT over the whole, or COMPOSITE (S3's: the
        digest of the parts' digests, ``-<parts>`` after it; a part's own, checked as it
        arrived, where it came with one).

        The joined file's SHA-256 and MD5 are not taken here: the engine takes them in
        the pass over the file that checks its delta decodes back to it (or in one of its
        own, for a file stored whole), so the parts are copied by the kernel, unread."""
        have = self.parts(upload_id)
        for i, (number, etag) in enumerate(wanted):
            got = have.get(number)
            if got is None or got["ETag"].strip('"') != etag:
                raise _S3Reply("InvalidPart", PartNumber=str(number), UploadId=upload_id)
            if i < len(wanted) - 1 and got["Size"] < _MIN_PART_SIZE:
                raise _S3Reply(
                    "EntityTooSmall",
                    ProposedSize=str(got["Size"]),
                    MinSizeAllowed=str(_MIN_PART_SIZE),
                    PartNumber=str(number),
                )
        fd, path = _private_tempfile(folder, ".mpu")
        algo, kind = checksum or ("", "")
        whole = _CHECKSUMS[algo]() if algo and kind == "FULL_OBJECT" else None
        digests = []
        try:
            for number, _ in wanted:
                part = have[number]
                known = part.get("Checksum") or ("", "")
                hasher = whole
                if algo and whole is None and known[0] != algo:
                    hasher = _CHECKSUMS[algo]()  # the part came without one
                src = os.open(part["path"], os.O_RDONLY)
                try:
                    _copy_to(src, fd, hasher.update if hasher is not None else None)
                finally:
                    os.close(src)
                if algo and whole is None:
                    digests.append(
                        hasher.digest() if hasher is not None else base64.b64decode(known[1])
                    )
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        value = None
        if whole is not None:
            value = base64.b64encode(whole.digest()).decode()
        elif algo:
            joined = _CHECKSUMS[algo]()
            joined.update(b"".join(digests))
            value = "%s-%d" % (base64.b64encode(joined.digest()).decode(), len(digests))
        sizes = [int(have[number]["Size"]) for number, _ in wanted]
        return _Spooled(path, None, (algo, value) if value else None, sizes)

    def remove(self, upload_id: str) -> None:
        folder = self._dir(upload_id)
        gone = os.path.join(self.folder, ".gone-" + upload_id)
        try:
            os.replace(folder, gone)
        except OSError:
            raise _S3Reply("NoSuchUpload", UploadId=upload_id) from None
        shutil.rmtree(gone, ignore_errors=True)

    def listing(self, bucket: str) -> list[dict[str, Any]]:
        import json

        out = []
        for name in sorted(os.listdir(self.folder)):
            if not re.match(self._ID_RE, name):
                continue
            try:
                with open(os.path.join(self.folder, name, "upload.json"), encoding="utf-8") as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                continue
            if rec.get("Bucket") == bucket:
                rec["UploadId"] = name
                out.append(rec)
        out.sort(key=lambda r: (r["Key"], r["Initiated"]))
        return out


# -- metrics: GET /metrics ------------------------------------------------------------


class _GatewayMetrics:
    """Counters for ``GET /metrics`` (Prometheus text exposition format 0.0.4)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.bytes_saved = 0
        self.in_flight = 0
        self._buckets = [0] * (len(_GATEWAY_LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0

    def observe(
        self, operation: str, status: int, code: str | None, n_in: int, n_out: int, secs: float
    ) -> None:
        with self._lock:
            self.requests[(operation, status)] += 1
            if code:
                self.errors[code] += 1
            self.bytes_in += n_in
            self.bytes_out += n_out
            i = 0
            while i < len(_GATEWAY_LATENCY_BUCKETS) and secs > _GATEWAY_LATENCY_BUCKETS[i]:
                i += 1
            self._buckets[i] += 1
            self._latency_sum += secs
            self._latency_count += 1

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def saved(self, n: int) -> None:
        with self._lock:
            self.bytes_saved += n

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP deltaglider_gateway_requests_total Requests answered, by operation "
                "and HTTP status.",
                "# TYPE deltaglider_gateway_requests_total counter",
            ]
            for (op, status), n in sorted(self.requests.items()):
                lines.append(
                    'deltaglider_gateway_requests_total{operation="%s",status="%d"} %d'
                    % (op, status, n)
                )
            lines += [
                "# HELP deltaglider_gateway_errors_total Error answers, by S3 error code.",
                "# TYPE deltaglider_gateway_errors_total counter",
            ]
            for code, n in sorted(self.errors.items()):
                lines.append('deltaglider_gateway_errors_total{code="%s"} %d' % (code, n))
            for name, value, text in (
                ("bytes_in", self.bytes_in, "Request body bytes received."),
                ("bytes_out", self.bytes_out, "Response body bytes sent."),
                (
                    "bytes_saved",
                    self.bytes_saved,
                    "Bytes not stored thanks to deltas (original minus stored size).",
                ),
            ):
                lines += [
                    "# HELP deltaglider_gateway_%s_total %s" % (name, text),
                    "# TYPE deltaglider_gateway_%s_total counter" % name,
                    "deltaglider_gateway_%s_total %d" % (name, value),
                ]
            lines += [
                "# HELP deltaglider_gateway_in_flight Requests being served now.",
                "# TYPE deltaglider_gateway_in_flight gauge",
                "deltaglider_gateway_in_flight %d" % self.in_flight,
                "# HELP deltaglider_gateway_request_seconds Time to answer a request.",
                "# TYPE deltaglider_gateway_request_seconds histogram",
            ]
            total = 0
            for bound, n in zip(_GATEWAY_LATENCY_BUCKETS, self._buckets):
                total += n
                lines.append(
                    'deltaglider_gateway_request_seconds_bucket{le="%g"} %d' % (bound, total)
                )
            total += self._buckets[-1]
            lines.append('deltaglider_gateway_request_seconds_bucket{le="+Inf"} %d' % total)
            lines.append("deltaglider_gateway_request_seconds_sum %.6f" % self._latency_sum)
            lines.append("deltaglider_gateway_request_seconds_count %d" % self._latency_count)
        return "\n".join(lines) + "\n"


# -- XML answers: errors, listings and the other long S3 documents --------------------


def _iso_ms(dt: Any) -> str:
    if isinstance(dt, datetime.datetime):
        return dt.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return str(dt)


def _xml_doc(root: str, body: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<%s xmlns="%s">%s</%s>'
        % (root, _S3_XMLNS, body, root)
    ).encode("utf-8")


def _el(tag: str, value: Any) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return "<%s>%s</%s>" % (tag, _xml_escape(str(value)), tag)


def _xml_owner(owner: Mapping[str, Any]) -> str:
    return "<Owner>%s%s</Owner>" % (
        _el("ID", owner.get("ID", "")),
        _el("DisplayName", owner.get("DisplayName", "")),
    )


def _xml_listing(
    bucket: str,
    q: Mapping[str, str],
    resp: Mapping[str, Any],
    kind: str,
    max_keys: int,
    owners: bool,
) -> bytes:
    """A ListBucketResult (``kind`` v1 or v2) or ListVersionsResult (``versions``) from
    the client's list response and the request's query ``q``: names URL-encoded under
    ``encoding-type=url``, each object's Owner shown when ``owners``."""
    encode = q.get("encoding-type") == "url"

    def text(value: str) -> str:
        return _quote(value, safe="/") if encode else value

    # ListObjects v1 sends its Prefix as it came whatever the encoding-type (AWS does, and
    # botocore decodes only Delimiter and the markers of a v1 answer).
    prefix = q.get("prefix", "")
    parts = [_el("Name", bucket), _el("Prefix", prefix if kind == "v1" else text(prefix))]
    if kind == "versions":
        parts.append(_el("KeyMarker", text(q.get("key-marker", ""))))
        parts.append(_el("VersionIdMarker", q.get("version-id-marker", "")))
        if resp.get("IsTruncated") and resp.get("Contents"):
            parts.append(_el("NextKeyMarker", text(resp["Contents"][-1]["Key"])))
            parts.append(_el("NextVersionIdMarker", "null"))
    elif kind == "v2":
        if q.get("start-after"):
            parts.append(_el("StartAfter", text(q["start-after"])))
        if "continuation-token" in q:  # echoed even when empty, as S3 does
            parts.append(_el("ContinuationToken", q["continuation-token"]))
        if resp.get("NextContinuationToken"):
            parts.append(_el("NextContinuationToken", resp["NextContinuationToken"]))
        parts.append(_el("KeyCount", resp.get("KeyCount", 0)))
    else:
        parts.append(_el("Marker", text(q.get("marker", ""))))
        if resp.get("IsTruncated") and resp.get("NextMarker"):
            parts.append(_el("NextMarker", text(resp["NextMarker"])))
    parts.append(_el("MaxKeys", max_keys))
    if q.get("delimiter"):
        parts.append(_el("Delimiter", text(q["delimiter"])))
    if encode:
        parts.append(_el("EncodingType", "url"))
    parts.append(_el("IsTruncated", bool(resp.get("IsTruncated"))))
    for obj in resp.get("Contents", []):
        item = [
            _el("Key", text(obj["Key"])),
            _el("LastModified", _iso_ms(obj.get("LastModified"))),
            _el("ETag", obj.get("ETag", "")),
            _el("Size", obj.get("Size", 0)),
        ]
        owner = obj.get("Owner")
        if owner and owners:
            item.append(_xml_owner(owner))
        item.append(_el("StorageClass", obj.get("StorageClass", "STANDARD")))
        if kind == "versions":
            item[1:1] = [_el("VersionId", "null"), _el("IsLatest", True)]
            parts.append("<Version>%s</Version>" % "".join(item))
        else:
            parts.append("<Contents>%s</Contents>" % "".join(item))
    for p in resp.get("CommonPrefixes", []):
        parts.append("<CommonPrefixes>%s</CommonPrefixes>" % _el("Prefix", text(p["Prefix"])))
    root = "ListVersionsResult" if kind == "versions" else "ListBucketResult"
    return _xml_doc(root, "".join(parts))


def _xml_error(reply: _S3Reply, resource: str, request_id: str) -> bytes:
    """An S3 error answer (AWS "Error responses"): no namespace, as S3 sends it."""
    fields = "".join(_el(k, v) for k, v in reply.fields.items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>%s%s%s%s<RequestId>%s</RequestId>'
        "<HostId></HostId></Error>"
        % (
            _el("Code", reply.code),
            _el("Message", reply.message),
            fields,
            _el("Resource", resource),
            request_id,
        )
    ).encode("utf-8")


def _xml_buckets(resp: Mapping[str, Any]) -> bytes:
    """ListAllMyBucketsResult from the client's list_buckets response."""
    owner = resp.get("Owner") or {"ID": "deltaglider", "DisplayName": "deltaglider"}
    items = "".join(
        "<Bucket>%s%s</Bucket>"
        % (_el("Name", b["Name"]), _el("CreationDate", _iso_ms(b.get("CreationDate"))))
        for b in resp.get("Buckets", [])
    )
    body = "%s<Buckets>%s</Buckets>" % (_xml_owner(owner), items)
    return _xml_doc("ListAllMyBucketsResult", body)


def _acl_policy(root: ET.Element) -> dict[str, Any]:
    """A PutBucketAcl body (an AccessControlPolicy document) as boto3's
    AccessControlPolicy parameter: only the fields the document carries."""
    owner = root.find("Owner")
    policy: dict[str, Any] = {"Grants": []}
    if owner is not None:
        policy["Owner"] = {
            t: _xml_text(owner, t) for t in ("ID", "DisplayName") if _xml_text(owner, t)
        }
    for grant in root.iter("Grant"):
        grantee = grant.find("Grantee")
        who: dict[str, Any] = {}
        if grantee is not None:
            for attr, value in grantee.attrib.items():
                if attr.endswith("}type") or attr == "type":
                    who["Type"] = value
            for t in ("ID", "DisplayName", "EmailAddress", "URI"):
                if _xml_text(grantee, t):
                    who[t] = _xml_text(grantee, t)
        policy["Grants"].append(
            {"Grantee": who, "Permission": _xml_text(grant, "Permission") or ""}
        )
    return policy


def _xml_delete_result(resp: Mapping[str, Any], versioned: list[str]) -> bytes:
    """DeleteResult from the client's delete_objects response, plus a NoSuchVersion error
    for each key asked for by a version other than ``null``."""
    parts = []
    for d in resp.get("Deleted", []):
        parts.append("<Deleted>%s</Deleted>" % _el("Key", d["Key"]))
    for k in versioned:
        parts.append(
            "<Error>%s%s%s</Error>"
            % (
                _el("Key", k),
                _el("Code", "NoSuchVersion"),
                _el("Message", "The specified version does not exist."),
            )
        )
    for e in resp.get("Errors", []):
        parts.append(
            "<Error>%s%s%s</Error>"
            % (
                _el("Key", e.get("Key", "")),
                _el("Code", e.get("Code", "")),
                _el("Message", e.get("Message", "")),
            )
        )
    return _xml_doc("DeleteResult", "".join(parts))


def _xml_attributes(resp: Mapping[str, Any]) -> bytes:
    """GetObjectAttributesOutput from the client's GetObjectAttributes answer."""
    body = _el("ETag", resp["ETag"]) if "ETag" in resp else ""
    if resp.get("Checksum"):
        body += "<Checksum>%s</Checksum>" % "".join(_el(k, v) for k, v in resp["Checksum"].items())
    parts = resp.get("ObjectParts")
    if parts:
        items = "".join(
            "<Part>%s%s</Part>" % (_el("PartNumber", p["PartNumber"]), _el("Size", p["Size"]))
            for p in parts["Parts"]
        )
        body += "<ObjectParts>%s%s</ObjectParts>" % (
            # boto3's TotalPartsCount is PartsCount on the wire
            "".join(_el(k.replace("TotalParts", "Parts"), parts[k]) for k in parts if k != "Parts"),
            items,
        )
    for name in ("StorageClass", "ObjectSize"):
        if name in resp:
            body += _el(name, resp[name])
    return _xml_doc("GetObjectAttributesResponse", body)


def _xml_parts(
    bucket: str,
    key: str,
    upload_id: str,
    rec: Mapping[str, Any],
    shown: Mapping[int, Mapping[str, Any]],
    marker: int,
    max_parts: int,
    truncated: bool,
) -> bytes:
    """ListPartsResult: the parts ``shown`` (number → its record, in order) of an upload
    whose record is ``rec``; its initiator is also shown as its owner."""
    items = "".join(
        "<Part>%s%s%s%s</Part>"
        % (
            _el("PartNumber", n),
            _el("LastModified", _iso_ms(_parse_timestamp(part["LastModified"]))),
            _el("ETag", part["ETag"]),
            _el("Size", part["Size"]),
        )
        for n, part in shown.items()
    )
    owner = "<ID>%s</ID><DisplayName>%s</DisplayName>" % (
        _xml_escape(rec.get("Initiator", "")),
        _xml_escape(rec.get("Initiator", "")),
    )
    body = (
        _el("Bucket", bucket)
        + _el("Key", key)
        + _el("UploadId", upload_id)
        + "<Initiator>%s</Initiator><Owner>%s</Owner>" % (owner, owner)
        + _el("StorageClass", rec.get("Params", {}).get("StorageClass", "STANDARD"))
        + _el("PartNumberMarker", marker)
        + _el("NextPartNumberMarker", list(shown)[-1] if shown else marker)
        + _el("MaxParts", max_parts)
        + _el("IsTruncated", truncated)
        + items
    )
    return _xml_doc("ListPartsResult", body)


def _xml_completed(
    host: str, bucket: str, key: str, etag: str, checksum: tuple[str, str] | None
) -> bytes:
    """CompleteMultipartUploadResult of an object whose x-amz-checksum is ``checksum``
    ((algorithm, value): COMPOSITE when the value ends in ``-<parts>``)."""
    body = (
        _el("Location", "http://%s/%s/%s" % (host, bucket, _quote_key(key)))
        + _el("Bucket", bucket)
        + _el("Key", key)
        + _el("ETag", etag)
    )
    meta = {_CHECKSUM_META + checksum[0]: checksum[1]} if checksum else {}
    for name, value in _stored_checksum(meta).items():
        body += _el(name, value)
    return _xml_doc("CompleteMultipartUploadResult", body)


def _meta_checksum(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    """The (algorithm, value) of the x-amz-checksum a stored object keeps (dg-checksum-*)."""
    for algo in _CHECKSUMS:
        if metadata.get(_CHECKSUM_META + algo):
            return algo, metadata[_CHECKSUM_META + algo]
    return None


def _xml_uploads(page: Mapping[str, Any]) -> bytes:
    """ListMultipartUploadsResult from one page of :func:`_uploads_page` (records of
    uploads in progress, with their UploadId and the Params they were started with)."""
    items = "".join(
        "<Upload>%s%s%s%s</Upload>"
        % (
            _el("Key", u["Key"]),
            _el("UploadId", u["UploadId"]),
            _el("StorageClass", u.get("Params", {}).get("StorageClass", "STANDARD")),
            _el("Initiated", _iso_ms(_parse_timestamp(u["Initiated"]))),
        )
        for u in page.get("Uploads", [])
    )
    body = "".join(
        _el(name, page[name])
        for name in ("Bucket", "KeyMarker", "UploadIdMarker", "NextKeyMarker", "NextUploadIdMarker")
        if name in page
    )
    body += _el("Prefix", page["Prefix"]) + _el("MaxUploads", page["MaxUploads"])
    return _xml_doc(
        "ListMultipartUploadsResult", body + _el("IsTruncated", page["IsTruncated"]) + items
    )


# -- object requests: preconditions, answer headers, PutObject parameters -------------


def _etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip() for t in header.split(",")]
    bare = etag.strip('"')
    return any(t == "*" or t.strip('"') == bare for t in tags)


def _http_time(value: str) -> datetime.datetime | None:
    """A conditional request's date, or None for one S3 cannot read (S3 then ignores it)."""
    try:
        return _parse_timestamp(value)
    except ValueError:
        return None


def _preconditions(
    headers: Mapping[str, str], etag: str, modified: Any, prefix: str = ""
) -> str | None:
    """RFC 7232 order, as S3 applies it: 'failed' (412), 'not-modified' (304) or None."""
    mtime = modified.replace(microsecond=0) if isinstance(modified, datetime.datetime) else None
    if_match = headers.get(prefix + "if-match")
    if if_match is not None:
        if not _etag_matches(if_match, etag):
            return "failed"
    else:
        since = _http_time(headers.get(prefix + "if-unmodified-since", ""))
        if since is not None and mtime is not None and mtime > since:
            return "failed"
    if_none = headers.get(prefix + "if-none-match")
    if if_none is not None:
        if _etag_matches(if_none, etag):
            return "failed" if prefix else "not-modified"
    else:
        since = _http_time(headers.get(prefix + "if-modified-since", ""))
        if since is not None and mtime is not None and mtime <= since:
            return "failed" if prefix else "not-modified"
    return None


#: (header, GetObject/HeadObject response key) for object answers.
_GATEWAY_OBJECT_HEADERS = (
    ("Cache-Control", "CacheControl"),
    ("Content-Disposition", "ContentDisposition"),
    ("Content-Encoding", "ContentEncoding"),
    ("Content-Language", "ContentLanguage"),
    ("Content-Range", "ContentRange"),
    ("x-amz-server-side-encryption", "ServerSideEncryption"),
    ("x-amz-storage-class", "StorageClass"),
    ("x-amz-version-id", "VersionId"),
    ("x-amz-checksum-type", "ChecksumType"),
    *(("x-amz-checksum-" + a, _checksum_param(a)) for a in _CHECKSUMS),
)
#: GetObject query parameters that override response headers (presigned downloads).
_RESPONSE_OVERRIDES = (
    ("response-cache-control", "Cache-Control"),
    ("response-content-disposition", "Content-Disposition"),
    ("response-content-encoding", "Content-Encoding"),
    ("response-content-language", "Content-Language"),
    ("response-content-type", "Content-Type"),
    ("response-expires", "Expires"),
)


def _object_headers(resp: Mapping[str, Any], q: Mapping[str, str]) -> dict[str, str]:
    """The headers of an object answer, from a GetObject/HeadObject response and the
    query's response-* overrides."""
    out = {
        "ETag": str(resp.get("ETag", "")),
        "Accept-Ranges": "bytes",
        "Content-Type": str(resp.get("ContentType") or "binary/octet-stream"),
    }
    modified = resp.get("LastModified")
    if isinstance(modified, datetime.datetime):
        out["Last-Modified"] = _http_date(modified)
    for header, name in _GATEWAY_OBJECT_HEADERS:
        if resp.get(name):
            out[header] = str(resp[name])
    expires = resp.get("ExpiresString") or resp.get("Expires")
    if isinstance(expires, datetime.datetime):
        expires = _http_date(expires)
    if expires:
        out["Expires"] = str(expires)
    for k, v in (resp.get("Metadata") or {}).items():
        out["x-amz-meta-" + k] = _meta_encode(str(v))
    for qname, header in _RESPONSE_OVERRIDES:
        if q.get(qname):
            out[header] = q[qname]
    return out


def _attributes_params(h: Mapping[str, str], bucket: str, key: str) -> dict[str, Any]:
    """GetObjectAttributes parameters from its request headers (x-amz-object-attributes,
    x-amz-max-parts, x-amz-part-number-marker)."""
    wanted = [a.strip() for a in h.get("x-amz-object-attributes", "").split(",") if a.strip()]
    if not wanted:
        raise _S3Reply("InvalidArgument", "x-amz-object-attributes header is required")
    params: dict[str, Any] = {"Bucket": bucket, "Key": key, "ObjectAttributes": wanted}
    for name, header in (
        ("MaxParts", "x-amz-max-parts"),
        ("PartNumberMarker", "x-amz-part-number-marker"),
    ):
        text = h.get(header, "").strip()
        if text:
            if not (text.isascii() and text.isdigit()):
                raise _S3Reply("InvalidArgument", "%s must be a whole number" % header)
            params[name] = min(int(text), 1000)
    return params


def _checksum_headers(
    checksum: tuple[str, str] | None, headers: dict[str, str] | None = None
) -> dict[str, str]:
    """``headers`` and the x-amz-checksum-<algorithm> of an upload's answer, if it had one."""
    out = dict(headers or {})
    if checksum is not None:
        out["x-amz-checksum-" + checksum[0]] = checksum[1]
    return out


def _put_params(h: Mapping[str, str], bucket: str, key: str) -> dict[str, Any]:
    """boto3 PutObject parameters from the request headers ``h`` (lower-cased)."""
    params: dict[str, Any] = {"Bucket": bucket, "Key": key}
    for name, header in _PUT_HEADER_PARAMS:
        value = h.get(header.lower())
        if value is None:
            continue
        if header == "Content-Encoding":
            # aws-chunked is the transfer framing, not the object's encoding (S3 docs)
            value = ",".join(
                v.strip() for v in value.split(",") if v.strip().lower() != "aws-chunked"
            )
            if not value:
                continue
        params[name] = value
    meta = {}
    for name, value in h.items():
        if name.startswith("x-amz-meta-"):
            meta[name[len("x-amz-meta-") :]] = _meta_decode(value)
    if meta:
        params["Metadata"] = meta
    return params


def _upload_checksum_kind(h: Mapping[str, str]) -> tuple[str, str] | None:
    """CreateMultipartUpload's x-amz-checksum-algorithm and -type: (algorithm, FULL_OBJECT
    or COMPOSITE) as S3 takes them (CRC64NVME is whole-object only, SHA1/SHA256 composite
    only, CRC32/CRC32C composite unless asked); None without an algorithm."""
    algo = h.get("x-amz-checksum-algorithm", "").strip().lower()
    if not algo:
        return None
    kind = h.get("x-amz-checksum-type", "").strip().upper()
    default = "FULL_OBJECT" if algo == "crc64nvme" else "COMPOSITE"
    allowed = {"crc32": ("COMPOSITE", "FULL_OBJECT"), "crc32c": ("COMPOSITE", "FULL_OBJECT")}
    if algo not in _CHECKSUMS or (kind and kind not in allowed.get(algo, (default,))):
        raise _S3Reply(
            "InvalidRequest", "Checksum algorithm %s with type %s is not supported" % (algo, kind)
        )
    return algo, kind or default


def _checksum_mode(h: Mapping[str, str]) -> bool:
    """Whether a GET/HEAD asks for the object's stored checksum (x-amz-checksum-mode)."""
    return h.get("x-amz-checksum-mode", "").strip().upper() == "ENABLED"


#: The query parameters of a listing an anonymous client may send (ListObjects v1/v2).
_ANONYMOUS_LISTING = frozenset(
    {
        "prefix",
        "delimiter",
        "marker",
        "max-keys",
        "list-type",
        "continuation-token",
        "start-after",
        "encoding-type",
        "fetch-owner",
    }
)
_ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"


def _public_read(client: DeltaGliderClient, bucket: str, key: str | None) -> bool:
    """Whether everyone may read: the object's ACL (on its stored form) grants the AllUsers
    group READ, or for a listing (``key`` None) the bucket's does. Of an object that is
    not there the bucket's ACL decides, so only who may list learns it is missing
    (NoSuchKey), as on S3; a bucket that is not there is NoSuchBucket."""
    if key is not None:
        try:
            acl = client.get_object_acl(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response["Error"]["Code"] not in ("NoSuchKey", "404", "NotFound"):
                raise
            acl = client.get_bucket_acl(Bucket=bucket)
    else:
        acl = client.get_bucket_acl(Bucket=bucket)
    return any(
        (g.get("Grantee") or {}).get("URI") == _ALL_USERS
        and g.get("Permission") in ("READ", "FULL_CONTROL")
        for g in acl.get("Grants") or []
    )


def _write_conditions(h: Mapping[str, str]) -> dict[str, str]:
    """A PUT's or CompleteMultipartUpload's ``If-None-Match`` and ``If-Match`` (AWS
    "Conditional writes") as PutObject parameters (_check_write_conditions)."""
    out = {}
    if "if-none-match" in h:
        out["IfNoneMatch"] = h["if-none-match"]
    if "if-match" in h:
        out["IfMatch"] = h["if-match"]
    return out


# -- the gateway: its state, one connection's handler, the server ---------------------


def _send_body(body: Any, length: int, write: Callable[[bytes], Any]) -> bool:
    """A GET's ``length`` bytes of ``body`` to ``write``; False when the body had fewer or
    more (the caller hangs up). A body checked as it is read (an object stored as it is:
    _VerifyingBody) checks its SHA-256 at its final, empty read, so each chunk goes out
    only once the next read has come back, the last only once that final read has: on a
    mismatch (IntegrityError) the response stays short of its Content-Length, the caller
    drops the connection, and no client takes it for a whole body. (A rebuilt delta was
    checked before the headers went out.)"""
    left = length
    held = b""
    while True:
        chunk = body.read(min(_IO_CHUNK, left) if left > 0 else _IO_CHUNK)
        if held:
            write(held)
            held = b""
        if not chunk or left <= 0:
            return not chunk and left <= 0
        held = chunk
        left -= len(chunk)


class _Gateway:
    """What the gateway does, independent of sockets: S3 requests in, client calls out."""

    def __init__(
        self,
        client: DeltaGliderClient,
        auth: _GatewayAuth,
        *,
        state_dir: str,
        domain: str | None = None,
        max_object_size: int = _MAX_SINGLE_PUT,
        request_timeout: float = 3600.0,
        now: Callable[[], datetime.datetime] = _utcnow,
        log: IO[str] | None = None,
    ) -> None:
        self.client = client
        self.auth = auth
        self.domain = domain.lower().strip(".") if domain else None
        self.max_object_size = max_object_size
        self.request_timeout = request_timeout
        self.metrics = _GatewayMetrics()
        #: the clock of uploads' times and the access log
        self.now = now
        self._log = log
        self._log_lock = threading.Lock()
        self.spool_dir = os.path.join(state_dir, "spool")
        _private_mkdir(state_dir)
        _private_mkdir(self.spool_dir)
        for name in os.listdir(self.spool_dir):  # left by a gateway that was killed
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.spool_dir, name))
        self.uploads = _Uploads(os.path.join(state_dir, "uploads"))

    def virtual_host(self, host: str) -> bool:
        """Whether ``host`` names a bucket under the configured domain."""
        hostname = host.rsplit(":", 1)[0].lower() if not host.startswith("[") else host
        return bool(self.domain) and hostname.endswith("." + str(self.domain))

    def access_line(self, text: str) -> None:
        if self._log is not None:
            with self._log_lock:
                self._log.write(text + "\n")
                self._log.flush()

    def route(self, host: str, raw_path: str) -> tuple[str | None, str | None]:
        """(bucket, key) from a virtual-hosted Host under ``domain``, else from the path."""
        import urllib.parse

        path = urllib.parse.unquote(raw_path)
        if self.domain and self.virtual_host(host):
            hostname = host.rsplit(":", 1)[0].lower()
            bucket = hostname[: -len(self.domain) - 1]
            key = path[1:] if path.startswith("/") else path
            return bucket, key or None
        if not path.startswith("/") or path == "/":
            return None, None
        bucket, _, key = path[1:].partition("/")
        return bucket, key or None


if TYPE_CHECKING:
    _HandlerBase = http.server.BaseHTTPRequestHandler

    class _ServerBase(socketserver.ThreadingMixIn, http.server.HTTPServer):
        pass

else:  # the real bases join when `serve` runs: see _gateway_server_class
    _HandlerBase = _ServerBase = object


class _GatewayHandler(_HandlerBase):
    """One connection: HTTP/1.1 keep-alive, one S3 request at a time. On
    http.server.BaseHTTPRequestHandler once _gateway_server_class has built the server."""

    protocol_version = "HTTP/1.1"
    server_version = "deltaglider/" + __version__

    def version_string(self) -> str:
        return self.server_version

    server: _GatewayServer
    _request_id = ""
    _status = 0
    _sent = False
    _error_code: str | None = None
    _bytes_out = 0
    _operation = "Unknown"
    _access_key = "-"
    _reader: _BodyReader | None = None
    _expect_100 = False
    _raw_path = "/"
    _query: list[tuple[str, str]] = []  # noqa: RUF012 - replaced per request, never mutated
    _q: dict[str, str] = {}  # noqa: RUF012
    _headers: dict[str, str] = {}  # noqa: RUF012

    # -- plumbing -----------------------------------------------------------------

    def setup(self) -> None:
        import socket

        super().setup()
        self.connection.settimeout(self.server.idle_timeout)  # each read, each write
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def finish(self) -> None:
        self.server.untrack(self)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one access line per request is written by _dispatch instead

    def handle_one_request(self) -> None:
        """Wait for a request holding no worker slot: --idle-timeout for its first byte
        (a TLS handshake included), then the header deadline for the request line and
        headers in all; the server closes the connection at either (service_actions)."""
        import socket
        import ssl

        server = self.server
        try:
            if server.stopping:
                self.close_connection = True
                return
            server.waiting(self, server.idle_timeout)
            # rfile is buffered (rbufsize -1): peek waits for the first byte, reads none
            if not cast(io.BufferedReader, self.rfile).peek(1):  # it hung up, or we did
                self.close_connection = True
                return
            server.waiting(self, server.header_timeout)
            super().handle_one_request()
        except (ConnectionError, ssl.SSLError, socket.timeout, TimeoutError):
            self.close_connection = True

    def handle_expect_100(self) -> bool:
        # An upload's body is read only after its headers authenticate: the 100 goes out
        # in _body() then, so a rejected client never sends the bytes (RFC 7231 5.1.1).
        self._expect_100 = True
        return True

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        content_type: str | None = "application/xml",
    ) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("x-amz-request-id", self._request_id)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if content_type and body:
            self.send_header("Content-Type", content_type)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        if not self._body_can_settle():
            self.close_connection = True
        if self.close_connection or self.server.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._sent = True
        if body and self.command != "HEAD":
            self.wfile.write(body)
            self._bytes_out += len(body)

    def _send_error(self, reply: _S3Reply) -> None:
        self._error_code = reply.code
        if self.command == "HEAD" or reply.status == 304:
            self._send(reply.status, headers={"x-amz-error-code": reply.code}, content_type=None)
            return
        self._send(reply.status, _xml_error(reply, self._raw_path, self._request_id))

    # -- dispatch -----------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    def do_PATCH(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        """A request whose headers are all in: served once a worker slot is free."""
        if not self.server.admit(self):
            self.close_connection = True  # stopping: the client retries elsewhere
            return
        try:
            self._handle_request()
        finally:
            self.server.done(self)

    def _handle_request(self) -> None:
        import socket
        import ssl

        gw = self.server.gateway
        start = time.monotonic()
        self._request_id = _random_hex()[:16].upper()
        self._status = 0
        self._sent = False
        self._error_code = None
        self._bytes_out = 0
        self._operation = "Unknown"
        self._access_key = "-"
        self._reader: _BodyReader | None = None
        target = self.path
        if "://" in target.split("?", 1)[0]:  # absolute-form request target (RFC 7230 5.3.2)
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        self._raw_path, _, raw_query = target.partition("?")
        self._query = _raw_query(raw_query)
        self._q = dict(reversed(self._query))
        self._headers = {}
        for name, value in self.headers.items():
            lname = name.lower()
            if lname in self._headers:
                self._headers[lname] += "," + value
            else:
                self._headers[lname] = value
        gw.metrics.enter()
        try:
            try:
                self._serve(gw)
            except (ConnectionError, ssl.SSLError, socket.timeout, TimeoutError):
                raise  # the client went away: nothing to answer, nothing to log as ours
            except Exception as e:
                reply = _s3_reply_from(e)
                if self._sent:  # headers already went out: all we can do is hang up
                    self.close_connection = True
                else:
                    self._send_error(reply)
        except (ConnectionError, ssl.SSLError, socket.timeout, TimeoutError):
            self.close_connection = True
        finally:
            gw.metrics.leave()
            self._settle_body()
            secs = time.monotonic() - start
            received = self._reader.received if self._reader else 0
            gw.metrics.observe(
                self._operation, self._status, self._error_code, received, self._bytes_out, secs
            )
            shown = self._raw_path
            if self._query:
                shown += "?" + "&".join(
                    k + ("=<redacted>" if k in _LOG_REDACTED else ("=" + _quote(v) if v else ""))
                    for k, v in self._query
                )
            # Every field a client chose is shown escaped: it cannot drive the terminal.
            gw.access_line(
                '%s %s [%s] "%s %s" %d %s %s %d %d %.3f'
                % (
                    self.client_address[0],
                    _printable(self._access_key),
                    _iso_utc(gw.now())[:19] + "Z",
                    _printable(str(self.command)),
                    _printable(shown),
                    self._status,
                    self._error_code or "-",
                    self._operation,
                    received,
                    self._bytes_out,
                    secs,
                )
            )

    def _body_left(self) -> int | None:
        """Bytes of this request's body not read yet; None where they cannot be read here:
        a chunked body's end, a client waiting for a 100 that never went out (it may send
        its body or not), one that never authenticated (a worker is not held for it)."""
        if self._reader is not None:
            left = self._reader.left()
        else:
            try:
                chunked, length = _framing(self._headers)
            except _S3Reply:
                return None
            left = None if chunked else length or 0
        if left and (self._access_key == "-" or (self._reader is None and self._expect_100)):
            return None
        return left

    def _body_can_settle(self) -> bool:
        """Whether the connection can take another request after this one: decided before
        the reply goes out, so that its ``Connection: close`` tells the client. A client
        not told reuses the connection until the hang-up reaches it, and botocore then
        answers its next 100-continue request with this reply's status and no body."""
        left = self._body_left()
        return left is not None and left <= _GATEWAY_DRAIN_MAX

    def _settle_body(self) -> None:
        """Whatever part of a body was not read would be taken for the next request: read
        and drop it where _body_can_settle says it can be, else hang up."""
        left = self._body_left()
        if self.close_connection or left == 0:
            pass
        elif left is None or not self._body_can_settle():
            self.close_connection = True
        else:
            if self._reader is None:
                self._reader = _BodyReader(
                    cast(io.BufferedReader, self.rfile),
                    left,
                    False,
                    time.monotonic() + self.server.idle_timeout,
                )
            try:
                if not self._reader.drain(_GATEWAY_DRAIN_MAX):
                    self.close_connection = True
            except (OSError, ValueError):
                self.close_connection = True
        self._expect_100 = False

    def _serve(self, gw: _Gateway) -> None:
        """Route one request: /metrics, a browser POST upload (signed inside its form), or
        an authenticated S3 request on the service, a bucket or an object."""
        method = self.command
        if self.server.metrics_only or (
            method == "GET"
            and self._raw_path == "/metrics"
            and not self._query
            and not gw.virtual_host(self._headers.get("host", ""))
        ):
            # A bucket named "metrics" is still listed: every S3 client sends a query.
            return self._serve_metrics(gw)
        bucket, key = gw.route(self._headers.get("host", ""), self._raw_path)
        if (
            method == "POST"
            and bucket is not None
            and key is None
            and not self._query
            and self._headers.get("content-type", "").startswith("multipart/form-data")
            and "authorization" not in self._headers
        ):
            return self._serve_browser_post(bucket)
        unsigned = "authorization" not in self._headers and not (
            {k for k, _ in self._query} & _PRESIGN_PARAMS
        )
        if unsigned and method in ("GET", "HEAD") and bucket is not None:
            return self._serve_anonymous(gw, bucket, key)
        signed = self._authenticate(gw)
        # What routes the request: not its signature (a presigned URL's parameters), nor the
        # Go SDK's (rclone's) ``x-id``, which names the operation and selects nothing.
        self._q = q = {k: v for k, v in self._q.items() if k not in _PRESIGN_PARAMS and k != "x-id"}
        # Buckets behind the gateway are never versioned: version "null" is the object.
        if q.get("versionId") == "null":
            del q["versionId"]
        elif "versionId" in q:
            raise _S3Reply("InvalidArgument", "Invalid version id specified")
        if bucket is None:
            self._operation = "ListBuckets"
            if method != "GET":
                raise _S3Reply("MethodNotAllowed")
            return self._list_buckets()
        if key is None:
            return self._serve_bucket(gw, bucket, signed)
        return self._serve_object(gw, bucket, key, signed)

    def _serve_anonymous(self, gw: _Gateway, bucket: str, key: str | None) -> None:
        """An unsigned GET or HEAD of an object, or listing of a bucket: served only where
        the ACL stored on the back end grants everyone READ (_public_read), never by
        default; anything else (a subresource, an override) is AccessDenied, as on S3."""
        q = {k for k in self._q if k != "x-id"}
        if (key is None and q - _ANONYMOUS_LISTING) or (key is not None and q):
            raise _S3Reply("AccessDenied", "Anonymous access is not allowed by this gateway.")
        if not _public_read(gw.client, bucket, key):
            raise _S3Reply("AccessDenied")
        if key is None:
            if self.command == "HEAD":
                self._operation = "HeadBucket"
                return self._send(200)
            return self._list_objects(bucket)
        return self._get_object(bucket, key, head=self.command == "HEAD")

    def _serve_metrics(self, gw: _Gateway) -> None:
        """``GET /metrics``: signed like any request, unless on the --metrics-port."""
        self._operation = "Metrics"
        metrics_only = self.server.metrics_only
        if metrics_only and (self.command, self._raw_path) != ("GET", "/metrics"):
            raise _S3Reply("NoSuchKey", status="404")
        if not metrics_only:
            self._authenticate(gw)
        self._send(200, gw.metrics.render().encode(), content_type="text/plain; version=0.0.4")

    def _serve_browser_post(self, bucket: str) -> None:
        """Signed by its policy, inside the form: the body is read before anything
        authenticates it, so only a share of the workers may be doing that at once."""
        if not self.server.anonymous_bodies.take():
            self.close_connection = True
            raise _S3Reply("SlowDown")
        try:
            self._post_object(bucket)
        finally:
            self.server.anonymous_bodies.give_back()

    def _refuse_unsupported(self, kind: str) -> None:
        """NotImplemented for a subresource the gateway does not serve (``kind`` is Bucket
        or Object, for the metrics' operation name)."""
        unsupported = sorted(set(self._q) & _GATEWAY_UNSUPPORTED)
        if unsupported:
            self._operation = kind + ":" + unsupported[0]
            raise _S3Reply("NotImplemented", "?%s is not supported by the gateway" % unsupported[0])
        # Object lock (a bucket created with it, an object's retention or legal hold) needs
        # versioning: never silently dropped.
        locking = sorted(n for n in _GATEWAY_LOCK_HEADERS if n in self._headers)
        if self._headers.get("x-amz-bucket-object-lock-enabled", "").lower() == "true":
            locking.append("x-amz-bucket-object-lock-enabled")
        if locking:
            self._operation = kind + ":object-lock"
            raise _S3Reply("NotImplemented", "%s is not supported by the gateway" % locking[0])

    def _serve_bucket(self, gw: _Gateway, bucket: str, signed: _Signed) -> None:
        """A request on a bucket (no key): listings, location, ACL, create, delete..."""
        method, q = self.command, self._q
        if "acl" in q and method in ("GET", "PUT"):
            return self._acl(bucket, None, signed)
        if method == "GET" and "versioning" in q:
            self._operation = "GetBucketVersioning"
            gw.client.head_bucket(Bucket=bucket)  # never enabled: an empty configuration
            return self._send(200, _xml_doc("VersioningConfiguration", ""))
        if method == "GET" and "versions" in q:
            return self._list_objects(bucket, versions=True)
        self._refuse_unsupported("Bucket")
        if method == "GET" and "location" in q:
            return self._get_bucket_location(bucket)
        if method == "GET" and "uploads" in q:
            return self._list_uploads(bucket)
        if method == "GET":
            return self._list_objects(bucket)
        if method == "HEAD":
            self._operation = "HeadBucket"
            resp = gw.client.head_bucket(Bucket=bucket)
            region = (resp.get("ResponseMetadata", {}).get("HTTPHeaders") or {}).get(
                "x-amz-bucket-region", "us-east-1"
            )
            return self._send(200, headers={"x-amz-bucket-region": region})
        if method == "PUT" and not q:
            return self._create_bucket(bucket, signed)
        if method == "DELETE" and not q:
            self._operation = "DeleteBucket"
            gw.client.delete_bucket(Bucket=bucket)
            return self._send(204)
        if method == "POST" and "delete" in q:
            return self._delete_objects(bucket, signed)
        self._operation = "Bucket:" + method
        raise _S3Reply("NotImplemented", "This bucket operation is not supported by the gateway")

    def _serve_object(self, gw: _Gateway, bucket: str, key: str, signed: _Signed) -> None:
        """A request on an object: get, put, copy, delete, and the multipart operations."""
        method, q = self.command, self._q
        self._refuse_unsupported("Object")
        if "acl" in q and method in ("GET", "PUT"):
            return self._acl(bucket, key, signed)
        if method in ("GET", "HEAD") and "uploadId" in q:
            return self._list_parts(bucket, key)
        if method == "GET" and "attributes" in q:
            return self._object_attributes(bucket, key)
        if method in ("GET", "HEAD"):
            return self._get_object(bucket, key, head=method == "HEAD")
        if method == "PUT" and "uploadId" in q:
            return self._upload_part(bucket, key, signed)
        if method == "PUT" and "x-amz-copy-source" in self._headers:
            return self._copy_object(bucket, key)
        if method == "PUT" and not q:
            return self._put_object(bucket, key, signed)
        if method == "POST" and "uploads" in q:
            return self._create_upload(bucket, key)
        if method == "POST" and "uploadId" in q:
            return self._complete_upload(bucket, key, signed)
        if method == "DELETE" and "uploadId" in q:
            self._operation = "AbortMultipartUpload"
            gw.uploads.record(bucket, key, q["uploadId"])
            gw.uploads.remove(q["uploadId"])
            return self._send(204)
        if method == "DELETE":
            self._operation = "DeleteObject"
            gw.client.delete_object(Bucket=bucket, Key=key)
            return self._send(204)
        self._operation = "Object:" + method
        raise _S3Reply("NotImplemented", "This object operation is not supported by the gateway")

    def _authenticate(self, gw: _Gateway) -> _Signed:
        host = self._headers.get("host", "")
        resource = self._raw_path
        if gw.virtual_host(host):
            resource = "/" + str(gw.route(host, "/")[0]) + resource
        signed = gw.auth.verify(self.command, self._raw_path, self._query, self._headers, resource)
        self._access_key = signed.access_key
        return signed

    # -- bodies -------------------------------------------------------------------

    def _body(self, signed: _Signed, limit: int) -> tuple[_BodyReader | _AwsChunked, _BodyReader]:
        """The payload reader (aws-chunked decoded) and the raw reader, after the 100."""
        h = self._headers
        chunked, length = _framing(h)
        if not chunked and length is None:
            raise _S3Reply("MissingContentLength")
        declared = length
        if signed.payload in _STREAMING_PAYLOADS:
            try:
                declared = int(h.get("x-amz-decoded-content-length", ""))
            except ValueError:
                raise _S3Reply(
                    "MissingContentLength",
                    "aws-chunked uploads need x-amz-decoded-content-length",
                ) from None
        if declared is not None and declared > limit:
            self.close_connection = True
            raise _S3Reply("EntityTooLarge", ProposedSize=str(declared), MaxSizeAllowed=str(limit))
        if self._expect_100:
            self.send_response_only(100)
            self.end_headers()
            self._expect_100 = False
        # However slowly the bytes trickle in, a body has --idle-timeout plus a second per
        # _GATEWAY_MIN_BODY_RATE bytes of its size, and --request-timeout at most.
        allowed = self.server.gateway.request_timeout
        if declared is not None:
            allowed = min(allowed, self.server.idle_timeout + declared / _GATEWAY_MIN_BODY_RATE)
        rfile = cast(io.BufferedReader, self.rfile)
        raw = _BodyReader(rfile, length, chunked, time.monotonic() + allowed)
        self._reader = raw
        if signed.payload in _STREAMING_PAYLOADS:
            return _AwsChunked(raw, signed), raw
        return raw, raw

    def _spool(
        self, signed: _Signed, limit: int, headers: Mapping[str, str] | None = None
    ) -> _Spooled:
        """The request body in a private temp file, every digest it carries checked:
        x-amz-content-sha256, chunk signatures, Content-MD5, x-amz-checksum-* (of
        ``headers``, the request's unless given)."""
        reader, _ = self._body(signed, limit)
        digests = _BodyDigests(self._headers if headers is None else headers, signed.payload)
        fd, path = _private_tempfile(self.server.gateway.spool_dir, ".put")
        try:
            with os.fdopen(fd, "wb") as f:
                while True:
                    data = reader.read(_IO_CHUNK)
                    if not data:
                        break
                    if digests.size + len(data) > limit:
                        self.close_connection = True
                        raise _S3Reply("EntityTooLarge")
                    digests.update(data)
                    f.write(data)
            info = digests.check(reader.trailers if isinstance(reader, _AwsChunked) else {})
        except BaseException:
            os.unlink(path)
            raise
        return _Spooled(path, info, digests.checksum)

    def _small_body(self, signed: _Signed, headers: Mapping[str, str] | None = None) -> bytes:
        spooled = self._spool(signed, _GATEWAY_XML_BODY_MAX, headers)
        try:
            with open(spooled.path, "rb") as f:
                return f.read()
        finally:
            os.unlink(spooled.path)

    def _xml_body(self, signed: _Signed, headers: Mapping[str, str] | None = None) -> ET.Element:
        import xml.etree.ElementTree as ET

        data = self._small_body(signed, headers)
        try:
            return _xml_parse(data)
        except (ValueError, ET.ParseError):
            raise _S3Reply("MalformedXML") from None

    # -- buckets ------------------------------------------------------------------

    def _list_buckets(self) -> None:
        self._send(200, _xml_buckets(self.server.gateway.client.list_buckets()))

    def _get_bucket_location(self, bucket: str) -> None:
        self._operation = "GetBucketLocation"
        resp = self.server.gateway.client.get_bucket_location(Bucket=bucket)
        location = resp.get("LocationConstraint") or ""
        self._send(200, _xml_doc("LocationConstraint", _xml_escape(location)))

    def _create_bucket(self, bucket: str, signed: _Signed) -> None:
        import xml.etree.ElementTree as ET

        self._operation = "CreateBucket"
        gw = self.server.gateway
        data = self._small_body(signed)
        params: dict[str, Any] = {"Bucket": bucket}
        if data.strip():
            try:
                root = _xml_parse(data)
            except (ValueError, ET.ParseError):
                raise _S3Reply("MalformedXML") from None
            location = _xml_text(root, "LocationConstraint")
            if location:
                params["CreateBucketConfiguration"] = {"LocationConstraint": location}
        acl = self._headers.get("x-amz-acl")
        if acl:
            params["ACL"] = acl
        gw.client.create_bucket(**params)
        self._send(200, headers={"Location": "/" + bucket})

    def _acl(self, bucket: str, key: str | None, signed: _Signed) -> None:
        """Get/PutBucketAcl, Get/PutObjectAcl (of the logical object's stored form), passed
        to the back end through the client."""
        import xml.etree.ElementTree as ET

        client = self.server.gateway.client
        of = {"Bucket": bucket} if key is None else {"Bucket": bucket, "Key": key}
        kind = "Bucket" if key is None else "Object"
        if self.command == "GET":
            self._operation = "Get%sAcl" % kind
            get = client.get_bucket_acl if key is None else client.get_object_acl
            resp = get(**of)
            self._send(200, _acl_xml({"Owner": resp.get("Owner"), "Grants": resp.get("Grants")}))
            return
        self._operation = "Put%sAcl" % kind
        params: dict[str, Any] = dict(of)
        for name, header in _CANNED_ACL_PARAMS:
            if self._headers.get(header):
                params[name] = self._headers[header]
        data = self._small_body(signed)
        if data.strip():
            try:
                root = _xml_parse(data)
            except (ValueError, ET.ParseError):
                raise _S3Reply("MalformedXML") from None
            params["AccessControlPolicy"] = _acl_policy(root)
        (client.put_bucket_acl if key is None else client.put_object_acl)(**params)
        self._send(200)

    # -- listings -----------------------------------------------------------------

    def _list_objects(self, bucket: str, versions: bool = False) -> None:
        """ListObjects v1/v2, and ListObjectVersions: in a bucket that is never versioned
        every object is its only version, ``null`` (what S3 answers for such a bucket)."""
        q = self._q
        v2 = q.get("list-type") == "2"
        self._operation = (
            "ListObjectVersions" if versions else "ListObjectsV2" if v2 else "ListObjects"
        )
        max_keys = self._query_limit("max-keys", cap=None)
        if "encoding-type" in q and q["encoding-type"] != "url":
            raise _S3Reply("InvalidArgument", "Invalid Encoding Method specified in Request")
        params: dict[str, Any] = {"Bucket": bucket, "MaxKeys": max_keys, "FetchMetadata": True}
        for qname, pname in (("prefix", "Prefix"), ("delimiter", "Delimiter")):
            if q.get(qname):
                params[pname] = q[qname]
        client = self.server.gateway.client
        if versions:
            if q.get("key-marker"):
                params["StartAfter"] = q["key-marker"]
            resp = client.list_objects_v2(**params)
        elif v2:
            if q.get("continuation-token"):
                params["ContinuationToken"] = q["continuation-token"]
            if q.get("start-after"):
                params["StartAfter"] = q["start-after"]
            if q.get("fetch-owner") == "true":
                params["FetchOwner"] = True
            resp = client.list_objects_v2(**params)
        else:
            if q.get("marker"):
                params["Marker"] = q["marker"]
            resp = client.list_objects(**params)
        kind = "versions" if versions else "v2" if v2 else "v1"
        owners = not v2 or bool(params.get("FetchOwner"))
        self._send(200, _xml_listing(bucket, q, resp, kind, max_keys, owners))

    # -- objects ------------------------------------------------------------------

    def _get_object(self, bucket: str, key: str, head: bool) -> None:
        self._operation = "HeadObject" if head else "GetObject"
        client = self.server.gateway.client
        h = self._headers
        conditional = any(
            n in h
            for n in ("if-match", "if-none-match", "if-modified-since", "if-unmodified-since")
        )
        mode = {"ChecksumMode": "ENABLED"} if _checksum_mode(h) else {}
        if head or conditional:
            info = client.head_object(Bucket=bucket, Key=key, **mode) if head else None
            if info is None:
                try:
                    info = client.head_object(Bucket=bucket, Key=key)
                except ClientError as e:
                    if e.response["Error"]["Code"] in ("404", "NoSuchKey"):
                        client.get_object(Bucket=bucket, Key=key)  # NoSuchKey or NoSuchBucket
                    raise
            verdict = _preconditions(h, info["ETag"], info.get("LastModified"))
            if verdict == "failed":
                raise _S3Reply("PreconditionFailed", Condition="If-Match")
            if verdict == "not-modified":
                headers = _object_headers(info, self._q)
                keep = {"ETag", "Last-Modified", "Cache-Control", "Expires"}
                self._send(
                    304, headers={k: v for k, v in headers.items() if k in keep}, content_type=None
                )
                return
            if head:
                headers = _object_headers(info, self._q)
                rng = h.get("range")
                size = int(info.get("ContentLength", 0))
                try:
                    span = None if "partNumber" in self._q else _byte_range(rng, size)
                except _RangeNotSatisfiable as e:
                    raise e.client_error("HeadObject") from None
                if span is not None:
                    start, end = span
                    headers["Content-Range"] = "bytes %d-%d/%d" % (start, end, size)
                    headers["Content-Length"] = str(end - start + 1)
                    return self._send(206, headers=headers, content_type=None)
                headers["Content-Length"] = str(size)
                return self._send(200, headers=headers, content_type=None)
        params: dict[str, Any] = {"Bucket": bucket, "Key": key, **mode}
        if h.get("range"):
            params["Range"] = h["range"]
        resp = client.get_object(**params)
        body = resp["Body"]
        try:
            headers = _object_headers(resp, self._q)
            headers["Content-Length"] = str(resp["ContentLength"])
            status = 206 if resp.get("ContentRange") else 200
            self._send(status, headers=headers, content_type=None)

            def write(data: bytes) -> None:
                self.wfile.write(data)
                self._bytes_out += len(data)

            if not _send_body(body, int(resp["ContentLength"]), write):
                self.close_connection = True  # the client sees a short body, not a lie
        except IntegrityError:
            self.close_connection = True  # bytes that fail verification end the stream
            raise
        finally:
            body.close()

    def _object_attributes(self, bucket: str, key: str) -> None:
        self._operation = "GetObjectAttributes"
        params = _attributes_params(self._headers, bucket, key)
        resp = self.server.gateway.client.get_object_attributes(**params)
        headers = {}
        if isinstance(resp.get("LastModified"), datetime.datetime):
            headers["Last-Modified"] = _http_date(resp["LastModified"])
        self._send(200, _xml_attributes(resp), headers=headers)

    def _store(
        self, spooled: _Spooled, params: dict[str, Any], upload: str | None = None
    ) -> dict[str, Any]:
        """Hand a verified file to the client layer (which picks delta or direct);
        ``upload``: the _upload_note of the multipart upload it completes."""
        client = self.server.gateway.client
        if params["Key"].endswith("/"):
            # A "folder" marker (S3 consoles, rclone's directory markers): never a file to
            # delta, and the engine takes only file names; it is stored as it came.
            _validate_key(params["Key"])
            digests = spooled.info or _hash_file(spooled.path, md5=True)
            with open(spooled.path, "rb") as f:
                client.storage.put_object(
                    params["Bucket"],
                    params["Key"],
                    f,
                    metadata=params.get("Metadata"),
                    headers=_put_headers(params),
                    content_sha256=digests.sha256,
                    if_none_match=params.get("IfNoneMatch", "").strip() == "*",
                    if_match=params.get("IfMatch"),
                )
            return {"ETag": '"%s"' % digests.md5}
        result = _put_object_from_file(
            client.engine,
            spooled.path,
            params,
            spooled.info,
            checksum=spooled.checksum,
            parts=spooled.parts,
            upload=upload,
        )
        info = result.get("DeltaGliderInfo") or {}
        if info:
            mib = 1024 * 1024
            saved = float(info.get("OriginalSizeMB", 0)) - float(info.get("StoredSizeMB", 0))
            self.server.gateway.metrics.saved(max(0, int(saved * mib)))
        return result

    def _put_object(self, bucket: str, key: str, signed: _Signed) -> None:
        self._operation = "PutObject"
        gw = self.server.gateway
        params = _put_params(self._headers, bucket, key)
        params.update(_write_conditions(self._headers))
        spooled = self._spool(signed, gw.max_object_size)
        try:
            result = self._store(spooled, params)
        finally:
            os.unlink(spooled.path)
        self._send(200, headers=_checksum_headers(spooled.checksum, {"ETag": result["ETag"]}))

    def _copy_source(self) -> tuple[str, str]:
        import urllib.parse

        text = urllib.parse.unquote(self._headers["x-amz-copy-source"])
        if "?versionId=" in text:
            raise _S3Reply("NotImplemented", "Copying a version is not supported by the gateway")
        src_bucket, _, src_key = text.lstrip("/").partition("/")
        if not src_bucket or not src_key:
            raise _S3Reply(
                "InvalidArgument",
                "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
            )
        return src_bucket, src_key

    def _copy_object(self, bucket: str, key: str) -> None:
        self._operation = "CopyObject"
        client = self.server.gateway.client
        src_bucket, src_key = self._copy_source()
        h = self._headers
        if any(n.startswith("x-amz-copy-source-if-") for n in h):
            src = client.head_object(Bucket=src_bucket, Key=src_key)
            if _preconditions(h, src["ETag"], src.get("LastModified"), "x-amz-copy-source-"):
                raise _S3Reply("PreconditionFailed")
        directive = h.get("x-amz-metadata-directive", "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise _S3Reply("InvalidArgument", "Unknown metadata directive.")
        if directive == "COPY" and (src_bucket, src_key) == (bucket, key):
            raise _S3Reply(
                "InvalidRequest",
                "This copy request is illegal because it is trying to copy an object to itself "
                "without changing the object's metadata, storage class, website redirect "
                "location or encryption attributes.",
            )
        params = _put_params(self._headers, bucket, key)
        if directive == "COPY":
            for name in (
                "Metadata",
                "ContentType",
                "CacheControl",
                "ContentDisposition",
                "ContentEncoding",
                "ContentLanguage",
                "Expires",
            ):
                params.pop(name, None)
        params["CopySource"] = {"Bucket": src_bucket, "Key": src_key}
        params["MetadataDirective"] = directive
        result = client.copy_object(**params)
        res = result["CopyObjectResult"]
        body = _el("LastModified", _iso_ms(res.get("LastModified"))) + _el("ETag", res["ETag"])
        self._send(200, _xml_doc("CopyObjectResult", body))

    def _delete_objects(self, bucket: str, signed: _Signed) -> None:
        self._operation = "DeleteObjects"
        root = self._xml_body(signed)
        keys = []
        versioned = []
        for o in root.findall("Object"):
            if (_xml_text(o, "VersionId") or "null") != "null":
                versioned.append(_xml_text(o, "Key") or "")
            else:
                keys.append(_xml_text(o, "Key") or "")
        if len(keys) > _DELETE_BATCH:
            raise _S3Reply("MalformedXML", "A DeleteObjects request takes at most 1000 keys")
        quiet = (_xml_text(root, "Quiet") or "").strip().lower() == "true"
        resp = self.server.gateway.client.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": quiet}
        )
        self._send(200, _xml_delete_result(resp, versioned))

    def _post_object(self, bucket: str) -> None:
        """A browser upload (generate_presigned_post): a multipart/form-data body whose
        fields come first and whose file is last (AWS "Browser-based uploads using POST"),
        authorised by the signed policy in the form."""
        self._operation = "PostObject"
        gw = self.server.gateway
        m = re.search(r'boundary="?([^";]+)"?', self._headers.get("content-type", ""))
        if not m:
            raise _S3Reply("InvalidArgument", "multipart/form-data needs a boundary")
        boundary = b"--" + m.group(1).encode("latin-1")
        unsigned = _Signed("-", _UNSIGNED_PAYLOAD, b"", "", "", "")
        reader, _ = self._body(unsigned, gw.max_object_size + _GATEWAY_FORM_FIELDS_MAX + 1024)
        form = _FormReader(reader, boundary)
        fields = form.fields()
        key = fields.get("key", "")
        if "${filename}" in key:
            key = key.replace("${filename}", fields.get("\0filename", ""))
        # Authorised before the file is read: a forged form costs its fields, not its file.
        self._access_key, (low, high) = gw.auth.verify_policy(fields, bucket, key)
        fd, path = _private_tempfile(gw.spool_dir, ".post")
        try:
            with os.fdopen(fd, "wb") as out:
                info = form.file(out, (low, min(high, gw.max_object_size)))
            result = self._store(_Spooled(path, info), _form_put_params(fields, bucket, key))
        finally:
            os.unlink(path)
        status = fields.get("success_action_status", "204")
        headers = {"ETag": result["ETag"], "Location": "/%s/%s" % (bucket, _quote_key(key))}
        if status == "201":
            body = (
                _el("Location", headers["Location"])
                + _el("Bucket", bucket)
                + _el("Key", key)
                + _el("ETag", result["ETag"])
            )
            self._send(201, _xml_doc("PostResponse", body), headers=headers)
        else:
            self._send(200 if status == "200" else 204, headers=headers)

    # -- multipart ------------------------------------------------------------------

    def _create_upload(self, bucket: str, key: str) -> None:
        self._operation = "CreateMultipartUpload"
        gw = self.server.gateway
        gw.client.head_bucket(Bucket=bucket)
        _validate_key(key)
        params = _put_params(self._headers, bucket, key)
        checksum = _upload_checksum_kind(self._headers)
        record = {
            "Bucket": bucket,
            "Key": key,
            "Params": {k: v for k, v in params.items() if k not in ("Bucket", "Key")},
            "Initiated": _iso_utc(gw.now()),
            "Initiator": self._access_key,
            "Checksum": checksum,
        }
        upload_id = gw.uploads.create(record)
        body = _el("Bucket", bucket) + _el("Key", key) + _el("UploadId", upload_id)
        headers = {}
        if checksum is not None:
            headers = {"x-amz-checksum-algorithm": checksum[0].upper()}
            headers["x-amz-checksum-type"] = checksum[1]
        self._send(200, _xml_doc("InitiateMultipartUploadResult", body), headers=headers)

    def _part_number(self) -> int:
        try:
            n = int(self._q.get("partNumber", ""))
        except ValueError:
            raise _S3Reply(
                "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive"
            ) from None
        if not 1 <= n <= _MAX_PARTS:
            raise _S3Reply(
                "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive"
            )
        return n

    def _upload_part(self, bucket: str, key: str, signed: _Signed) -> None:
        self._operation = "UploadPart"
        gw = self.server.gateway
        upload_id = self._q["uploadId"]
        number = self._part_number()
        gw.uploads.record(bucket, key, upload_id)
        if "x-amz-copy-source" in self._headers:
            return self._upload_part_copy(upload_id, number)
        spooled = self._spool(signed, gw.max_object_size)
        try:
            etag = gw.uploads.add_part(upload_id, number, spooled, _iso_utc(gw.now()))
        finally:
            if os.path.exists(spooled.path):
                os.unlink(spooled.path)
        self._send(200, headers=_checksum_headers(spooled.checksum, {"ETag": etag}))

    def _upload_part_copy(self, upload_id: str, number: int) -> None:
        """UploadPartCopy: the part is (a range of) another logical object, read through
        the client (rebuilt and verified when it is a delta) and kept as an uploaded part."""
        self._operation = "UploadPartCopy"
        gw = self.server.gateway
        src_bucket, src_key = self._copy_source()
        h = self._headers
        src = gw.client.head_object(Bucket=src_bucket, Key=src_key)
        if _preconditions(h, src["ETag"], src.get("LastModified"), "x-amz-copy-source-"):
            raise _S3Reply("PreconditionFailed")
        params: dict[str, Any] = {"Bucket": src_bucket, "Key": src_key}
        size = int(src.get("ContentLength", 0))
        text = h.get("x-amz-copy-source-range")
        if text is not None:
            first, last = _copy_source_range(text, size)
            size = last - first + 1
            params["Range"] = "bytes=%d-%d" % (first, last)
        if size > gw.max_object_size:
            raise _S3Reply("EntityTooLarge", ProposedSize=str(size))
        spooled = _spool_copy_source(gw.client, params, size, gw.spool_dir)
        try:
            now = gw.now()
            etag = gw.uploads.add_part(upload_id, number, spooled, _iso_utc(now))
        finally:
            if os.path.exists(spooled.path):
                os.unlink(spooled.path)
        result = _el("LastModified", _iso_ms(now)) + _el("ETag", etag)
        self._send(200, _xml_doc("CopyPartResult", result))

    def _list_parts(self, bucket: str, key: str) -> None:
        self._operation = "ListParts"
        gw = self.server.gateway
        upload_id = self._q["uploadId"]
        rec = gw.uploads.record(bucket, key, upload_id)
        marker = self._query_limit("part-number-marker", default=0, cap=None)
        max_parts = self._query_limit("max-parts")
        numbers = sorted(n for n in gw.uploads.parts(upload_id) if n > marker)
        parts = gw.uploads.parts(upload_id)
        shown = {n: parts[n] for n in numbers[:max_parts]}
        truncated = len(numbers) > max_parts
        body = _xml_parts(bucket, key, upload_id, rec, shown, marker, max_parts, truncated)
        self._send(200, body)

    def _list_uploads(self, bucket: str) -> None:
        self._operation = "ListMultipartUploads"
        gw = self.server.gateway
        gw.client.head_bucket(Bucket=bucket)
        prefix = self._q.get("prefix", "")
        page = _uploads_page(
            bucket,
            [u for u in gw.uploads.listing(bucket) if u["Key"].startswith(prefix)],
            prefix=prefix,
            key_marker=self._q.get("key-marker", ""),
            upload_id_marker=self._q.get("upload-id-marker", ""),
            max_uploads=self._query_limit("max-uploads"),
        )
        self._send(200, _xml_uploads(page))

    def _query_limit(self, name: str, default: int = 1000, cap: int | None = 1000) -> int:
        """A count from the query (max-keys, max-parts, max-uploads, part-number-marker):
        a whole number from 0, at most ``cap`` (S3 answers no more than 1,000 per page)."""
        text = self._q.get(name) or str(default)
        if not (text.isascii() and text.isdigit()):
            raise _S3Reply("InvalidArgument", "%s must be a whole number from 0" % name)
        return int(text) if cap is None else min(cap, int(text))

    def _complete_upload(self, bucket: str, key: str, signed: _Signed) -> None:
        self._operation = "CompleteMultipartUpload"
        gw = self.server.gateway
        upload_id = self._q["uploadId"]
        # Its x-amz-checksum-* is the whole object's (checked below), not its XML body's.
        plain = {k: v for k, v in self._headers.items() if not k.startswith("x-amz-checksum-")}
        wanted = _completed_parts(self._xml_body(signed, plain))
        note, host = _upload_note(upload_id, wanted), self._headers.get("host", "")
        with gw.uploads.lock(upload_id):
            try:
                rec = gw.uploads.record(bucket, key, upload_id)
            except _S3Reply:
                done = _completed_upload(gw.client.engine, bucket, key, note)
                if done is None:
                    raise
                # a retry of a completion whose answer was lost, answered as the first
                checksum = _meta_checksum(done.metadata)
                body = _xml_completed(host, bucket, key, done.etag, checksum)
                return self._send(200, body)
            kind = rec.get("Checksum")
            spooled = gw.uploads.assemble(upload_id, wanted, gw.spool_dir, kind and tuple(kind))
            try:
                if spooled.checksum is not None:
                    given = self._headers.get("x-amz-checksum-" + spooled.checksum[0])
                    if given is not None and given.strip() != spooled.checksum[1]:
                        raise _S3Reply(
                            "BadDigest",
                            "The %s you specified did not match the calculated checksum."
                            % spooled.checksum[0].upper(),
                        )
                params = dict(rec.get("Params", {}), Bucket=bucket, Key=key)
                params.update(_write_conditions(self._headers))
                result = self._store(spooled, params, upload=note)
            finally:
                os.unlink(spooled.path)
            gw.uploads.remove(upload_id)
        self._send(200, _xml_completed(host, bucket, key, result["ETag"], spooled.checksum))


class _Share:
    """How many requests of one kind are being served, up to ``limit``: taking a place
    never waits (past the limit a request is refused, not queued); ``in_use`` says how
    many places are taken now."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.in_use >= self.limit:
                return False
            self.in_use += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.in_use -= 1


class _GatewayServer(_ServerBase):
    """The listening socket. A connection holds one of the ``workers`` slots only while a
    request it has sent in full (request line and headers) is served: one that is silent,
    or still sending its headers, holds none, so idle or slow clients (slowloris) cannot
    keep anyone else waiting. Those get ``idle_timeout`` seconds for their first byte and
    ``header_timeout`` in all for the rest of the headers, however slowly bytes trickle in;
    beyond ``max_waiting`` of them the one waiting longest is closed for a newcomer.
    Connections beyond that wait in the kernel's accept queue (back-pressure)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    handler_class: type[_GatewayHandler]

    def __init__(
        self,
        address: tuple[str, int],
        gateway: _Gateway,
        *,
        workers: int = 64,
        idle_timeout: float = 60.0,
        header_timeout: float = _GATEWAY_HEADER_TIMEOUT,
        max_waiting: int | None = None,
        tls: ssl.SSLContext | None = None,
        metrics_only: bool = False,
    ) -> None:
        import socket

        self.gateway = gateway
        self.metrics_only = metrics_only
        self.idle_timeout = idle_timeout
        self.header_timeout = min(header_timeout, idle_timeout)
        self.tls = tls
        self.stopping = False
        self._slots = threading.BoundedSemaphore(workers)
        #: Browser POST uploads read their body before their policy authenticates them:
        #: at most a quarter of the workers do that at once.
        self.anonymous_bodies = _Share(max(1, workers // 4))
        self._max_conns = workers + (max_waiting or max(256, 4 * workers))
        self._running = 0  # connection threads running
        #: handler -> busy (serving a request), oldest state change first
        self._conns: dict[_GatewayHandler, bool] = {}
        #: handler -> when its wait for a request (or the rest of its headers) ends
        self._deadlines: dict[_GatewayHandler, float] = {}
        self._conns_lock = threading.Condition()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, self.handler_class)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can wait on DNS.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        if ":" in host:
            host = "[%s]" % host
        return "%s://%s:%d" % ("https" if self.tls else "http", host, port)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:  # the handshake runs in the worker, not the accept loop
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection, up to the cap: past it, the connection waiting longest
        for a request makes room (a client sending nothing has no claim on a thread)."""
        with self._conns_lock:
            while self._running >= self._max_conns:
                if self.stopping:
                    self.shutdown_request(request)
                    return
                waiting = next((h for h, busy in self._conns.items() if not busy), None)
                if waiting is not None:
                    self._hang_up(waiting)
                    self._deadlines.pop(waiting, None)
                    self._conns.pop(waiting)  # its thread untracks it again when it ends
                self._conns_lock.wait(0.5)
            self._running += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._thread_ended()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._thread_ended()

    def _thread_ended(self) -> None:
        with self._conns_lock:
            self._running -= 1
            self._conns_lock.notify_all()

    @staticmethod
    def _hang_up(handler: _GatewayHandler) -> None:
        """Wake the handler's blocked read with end-of-file (the plain socket's shutdown:
        a TLS socket's own would pull its state from under the reading thread)."""
        import socket

        with contextlib.suppress(OSError):
            socket.socket.shutdown(handler.connection, socket.SHUT_RDWR)

    def service_actions(self) -> None:
        """Run by serve_forever between accepts: close what waited past its deadline."""
        now = time.monotonic()
        with self._conns_lock:
            for handler, deadline in list(self._deadlines.items()):
                if now >= deadline:
                    del self._deadlines[handler]
                    self._hang_up(handler)

    def waiting(self, handler: _GatewayHandler, seconds: float) -> None:
        """The handler is waiting for (the rest of) a request: no slot, a deadline."""
        with self._conns_lock:
            self._conns.pop(handler, None)
            self._conns[handler] = False
            self._deadlines[handler] = time.monotonic() + seconds
            if self.stopping:
                handler.close_connection = True
            self._conns_lock.notify_all()

    def admit(self, handler: _GatewayHandler) -> bool:
        """A whole request is in: wait for a worker slot; False when stopping first."""
        with self._conns_lock:
            self._deadlines.pop(handler, None)
            self._conns.pop(handler, None)
            self._conns[handler] = True  # drain() waits for it, eviction spares it
        while not self._slots.acquire(timeout=0.5):
            if self.stopping:
                self.track(handler, busy=False)
                return False
        return True

    def done(self, handler: _GatewayHandler) -> None:
        self._slots.release()
        self.track(handler, busy=False)

    def track(self, handler: _GatewayHandler, busy: bool) -> None:
        with self._conns_lock:
            self._conns.pop(handler, None)
            self._conns[handler] = busy
            if not busy and self.stopping:
                handler.close_connection = True
            self._conns_lock.notify_all()

    def untrack(self, handler: _GatewayHandler) -> None:
        with self._conns_lock:
            self._conns.pop(handler, None)
            self._deadlines.pop(handler, None)
            self._conns_lock.notify_all()

    def drain(self, grace: float) -> int:
        """Stop: idle keep-alive connections are closed now, requests in flight get
        ``grace`` seconds to finish; returns how many were still running."""
        self.stopping = True
        deadline = time.monotonic() + grace
        with self._conns_lock:
            while True:
                for handler, busy in list(self._conns.items()):
                    if not busy:
                        self._hang_up(handler)
                busy_left = sum(1 for b in self._conns.values() if b)
                left = deadline - time.monotonic()
                if not self._conns or left <= 0:
                    return busy_left
                self._conns_lock.wait(min(left, 0.2))


def _listen_address(text: str, option: str) -> tuple[str, int]:
    """(host, port) of a HOST:PORT option (--listen, --metrics-listen); ``[::1]:8333``
    takes IPv6, ``:8333`` means 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidConfigError(
            error_msg="serve: %s takes HOST:PORT, e.g. 127.0.0.1:8333" % option
        )
    return host.strip("[]") or "127.0.0.1", int(port)


@functools.lru_cache(maxsize=None)
def _gateway_server_class() -> type[_GatewayServer]:
    """_GatewayServer, and its _GatewayHandler, on http.server's classes: built the first
    time `serve` runs, so that no other command loads http.server and socketserver."""
    import http.server
    import socketserver

    handler = type("_GatewayHandler", (_GatewayHandler, http.server.BaseHTTPRequestHandler), {})
    bases = (_GatewayServer, socketserver.ThreadingMixIn, http.server.HTTPServer)
    return cast("type[_GatewayServer]", type("_GatewayServer", bases, {"handler_class": handler}))


def _serve_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The HTTPS context of --tls-cert and --tls-key (TLS 1.2 or later); None: plain HTTP."""
    import ssl

    if bool(cert) != bool(key):
        raise InvalidConfigError(error_msg="serve: --tls-cert and --tls-key go together")
    if not cert:
        return None
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.load_cert_chain(cert, key)
    return tls


def _is_loopback(host: str) -> bool:
    """Whether a listening host is only reachable from this machine."""
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _gateway_servers(
    cli: _Cli, users: _GatewayUsers, address: tuple[str, int], tls: ssl.SSLContext | None
) -> list[_GatewayServer]:
    """The gateway in front of this run's client, and its servers: S3 on ``address``,
    then GET /metrics on --metrics-listen, unauthenticated, for a Prometheus scraper."""
    args = cli.args
    state = args.state_dir or os.path.join(_default_cache_dir(cli.environ), "gateway")
    gateway = _Gateway(
        cli.client,
        _GatewayAuth(users),
        state_dir=state,
        domain=args.domain,
        request_timeout=args.request_timeout,
        log=None if args.quiet else cli.err,
    )
    server_class = _gateway_server_class()
    servers = [
        server_class(
            address, gateway, workers=args.workers, idle_timeout=args.idle_timeout, tls=tls
        )
    ]
    if args.metrics_listen:
        servers.append(
            server_class(
                _listen_address(args.metrics_listen, "--metrics-listen"),
                gateway,
                workers=4,
                metrics_only=True,
            )
        )
    return servers


def _serve_until_stopped(
    cli: _Cli, servers: list[_GatewayServer], grace: float, banner: list[str]
) -> None:
    """Serve until SIGTERM or SIGINT (Ctrl-C), once ``banner`` is printed (with --quiet, as
    one line: where it listens is the one thing a caller of port 0 cannot know otherwise);
    then stop taking connections, give requests in flight ``grace`` seconds, and say how
    many were cut off."""
    import signal

    stop = threading.Event()
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    for text in banner:
        cli.error(text)
    if cli.quiet:
        cli.err.write(_printable("; ".join(banner)) + "\n")
        cli.err.flush()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s in servers:
            s.stopping = True
            s.shutdown()
        left = servers[0].drain(grace)
        for s in servers:
            s.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        cli.error(
            "stopped" + (" (%d request(s) cut off after %gs)" % (left, grace) if left else "")
        )


def _cmd_serve(cli: _Cli) -> int:
    """``deltaglider serve``: run the S3 gateway until Ctrl-C or SIGTERM."""
    args = cli.args
    host, port = _listen_address(args.listen, "--listen")
    users = _GatewayUsers.load(args.users, cli.environ)
    if args.users and stat.S_IMODE(os.stat(args.users).st_mode) & 0o077:
        cli.error("warning: %s is readable by other users (chmod 600 it)" % args.users)
    tls = _serve_tls(args.tls_cert, args.tls_key)
    if not _is_loopback(host) and tls is None:
        cli.error(
            "warning: serving on %s without TLS: requests and their data travel "
            "unencrypted (give --tls-cert and --tls-key)" % host
        )
    backend = cli.client.storage.endpoint_url  # resolves the back end now: errors show at start
    servers = _gateway_servers(cli, users, (host, port), tls)
    banner = [
        "deltaglider %s: S3 gateway on %s in front of %s (%d key%s); Ctrl-C stops it"
        % (__version__, servers[0].url, backend, len(users), "" if len(users) == 1 else "s")
    ]
    if len(servers) > 1:
        banner.append("metrics on %s/metrics" % servers[1].url)
    _serve_until_stopped(cli, servers, args.grace, banner)
    return EXIT_OK


###############################################################################
# CLI #########################################################################
###############################################################################
# What is where, in order:
#   local paths         _safe_relative, _leads_outside (downloads stay inside their folder),
#                       _local_files (the one walk of local folders)
#   output              _printable (control characters escaped), _display_path
#   shared by commands  _Filters (--exclude/--include), _cli_client, _put_args,
#                       _saved_note (the delta note of a line), _print_stats,
#                       _should_transfer, _recorded_mtimes and _unchanged (what sync
#                       transfers), _quick_upload (small files on a pool of their own),
#                       _migrate_source and _migrate_plan (what migrate reads)
#   one run             _Cli: output and tallies; transfer_one, the per-file driver of
#                       cp, mv, sync and migrate; cmd_<command>, one method per command
#   refusals            _UsageError, _FatalError, _refuse_onto_itself, _one_line
#   arguments           _add_global_options, _add_<command>_arguments, _COMMANDS (each
#                       command's help, arguments and method), _build_parser
#   main()              parses, checks the DG_* settings, runs the command, returns the code
# ``deltaglider serve`` is _cmd_serve, at the end of the gateway's section.

_UNSAFE_KEY_CHARS = r"[\x00-\x1f\x7f\\]"


def _safe_relative(rel: str) -> str | None:
    """A key's path below a download folder, or None when it could escape it (``..``,
    absolute paths, backslashes, NUL and control characters, empty segments)."""
    if not rel or re.search(_UNSAFE_KEY_CHARS, rel) or rel.startswith("/"):
        return None
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in ("", ".", ".."):
        return None
    if re.match(r"^[A-Za-z]:", rel):
        return None
    return os.path.join(*parts)


def _is_within(path: str, root: str) -> bool:
    """Whether a resolved ``path`` is ``root`` or below it (both from os.path.realpath)."""
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # another drive on Windows
        return False


def _is_dir_entry(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows a symlink
    except OSError:
        return False


def _leads_outside(root: str, path: str) -> bool:
    """Whether writing ``path`` below ``root`` would go through a symlink that leads out of
    ``root``: the deepest folder of ``path`` that exists must resolve inside ``root`` (the
    rest is created as real folders). A link at ``path`` itself is replaced, not written
    through (downloads rename a temporary file over it)."""
    top = os.path.abspath(root)
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder) and folder != top and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if not os.path.lexists(folder):
        return False  # not even the root exists yet: every folder is created for real
    return not _is_within(os.path.realpath(folder), os.path.realpath(root))


def _under_any(rel: str, unread: Sequence[str]) -> bool:
    """Whether ``rel`` is one of ``unread`` or below one of its folders ("sub/")."""
    return any(rel == u or (u.endswith("/") and rel.startswith(u)) or u == "" for u in unread)


def _local_files(
    root: str,
    warn: Callable[[str], None],
    *,
    follow: bool = True,
    confine: bool = False,
    unread: list[str] | None = None,
) -> Iterator[tuple[str, str]]:
    """(path, relative path with '/') of the regular files under ``root``, in key order.

    The one walk of local folders. Symlinks are followed as aws s3 does (not at all
    without ``follow``: --no-follow-symlinks), but a symlinked folder is entered only the
    first time its real folder is met, and never when it is one of its own parents: link
    loops end, and repeated links cost one visit (aws s3 walks them until the path is too
    long).
    With ``confine`` (a destination), symlinked folders are not entered: a delete never
    goes through a link (out of the destination, or onto a file another key maps to);
    a symlinked file is yielded as itself (unlinking it removes only the link).

    What cannot be read (an unreadable folder or file, a special file) is skipped with a
    warning, as aws s3 does, and its relative path ("sub/" for a folder) is added to
    ``unread``: the remote copies of what could not be read are never deleted. Folders
    skipped as already visited are added to ``unread`` without a warning."""
    skipped = unread if unread is not None else []
    visited: set[tuple[int, int]] = set()
    # A stack of (real folder id, its relative path, its entries still to visit).
    stack: list[tuple[tuple[int, int], str, list[os.DirEntry[str]]]] = []

    def enter(path: str, rel: str, via_link: bool) -> None:
        try:
            st = os.stat(path)
            ident = (st.st_dev, st.st_ino)
            if any(ident == parent for parent, _, _ in stack) or (via_link and ident in visited):
                skipped.append(rel)  # a link loop, or a folder already walked via a link
                return
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:
            warn("Skipping file %s%s. File/Directory is not readable." % (path, os.sep))
            skipped.append(rel)
            return
        visited.add(ident)
        # Key order, as aws s3 lists: a folder sorts as its name with a trailing "/".
        entries.sort(key=lambda e: e.name + "/" if _is_dir_entry(e) else e.name, reverse=True)
        stack.append((ident, rel, entries))

    enter(root, "", via_link=False)
    while stack:
        _, rel_dir, entries = stack[-1]
        if not entries:
            stack.pop()
            continue
        entry = entries.pop()
        path, rel = entry.path, rel_dir + entry.name
        link = entry.is_symlink()
        if link and (not follow or (confine and _is_dir_entry(entry))):
            continue
        if _is_dir_entry(entry):
            enter(path, rel + "/", via_link=link)
            continue
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except OSError as e:
            warn("Skipping file %s. %s" % (path, e.strerror))
            skipped.append(rel)
            continue
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISLNK(st.st_mode):
                continue
            warn(
                "Skipping file %s. File is character special device, block special "
                "device, FIFO, or socket." % path
            )
            skipped.append(rel)
            continue
        if not os.access(path, os.R_OK):
            warn("Skipping file %s. File/Directory is not readable." % path)
            skipped.append(rel)
            continue
        yield path, rel


_CONTROL_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _printable(text: str) -> str:
    """A line as the CLI prints it: control characters (C0, DEL, C1) in key and file names
    shown as ``\\t``, ``\\n``, ``\\x1b``..., so a name cannot forge output lines or drive
    the terminal."""
    return re.sub(
        _CONTROL_CHARS,
        lambda m: _CONTROL_ESCAPES.get(m.group(), "\\x%02x" % ord(m.group())),
        text,
    )


def _display_path(path: str) -> str:
    """Local paths as aws s3 prints them: relative to the working directory."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    if not os.path.dirname(rel) and not rel.startswith("."):
        return "./" + rel
    return rel


class _Filters:
    """--exclude/--include in the order given, last match wins (aws s3 filters.py)."""

    def __init__(self, rules: list[tuple[str, str]]) -> None:
        self._rules = rules

    def included(self, rel: str) -> bool:
        keep = True
        for kind, pattern in self._rules:
            if fnmatch.fnmatchcase(rel, pattern):
                keep = kind == "include"
        return keep


class _FilterAction(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        rules = list(getattr(namespace, "filters", None) or [])
        rules.append((self.dest, values))
        namespace.filters = rules


def _print_stats(out: IO[str], bucket: str, mode: str, stats: Mapping[str, Any]) -> None:
    """``deltaglider stats`` as a table: the counts, sizes and savings of a bucket, then
    what needs cleaning up (unused references, presigned copies) and the references."""
    approx = "~" if stats["estimated"] else ""
    rows = [
        ("Total Objects:", str(stats["object_count"])),
        ("  Delta Objects:", str(stats["delta_objects"])),
        ("  Direct Objects:", str(stats["direct_objects"])),
        (
            "Original Size:",
            "%s%s (%d bytes)" % (approx, _human_size(stats["total_size"]), stats["total_size"]),
        ),
        (
            "Stored Size:",
            "%s (%d bytes)" % (_human_size(stats["compressed_size"]), stats["compressed_size"]),
        ),
        (
            "Space Saved:",
            "%s%s (%.1f%%)"
            % (approx, _human_size(max(stats["space_saved"], 0)), stats["savings_percent"]),
        ),
    ]
    if "reference_size" in stats:
        rows.insert(
            3,
            (
                "  References:",
                "%d (%s stored)"
                % (stats["reference_objects"], _human_size(stats["reference_size"])),
            ),
        )
    out.write(
        "Bucket Statistics: %s (%s%s)\n%s\n"
        % (bucket, mode, ", cached" if stats["cached"] else "", "=" * 60)
    )
    if stats.get("unused_references"):
        size = stats["unused_reference_size"]
        rows.append(
            (
                "Unused References:",
                "%d, %s (%d bytes): no object uses them; rm --recursive removes them"
                % (stats["unused_references"], _human_size(size), size),
            )
        )
    if stats.get("presign_copies"):
        size = stats["presign_copies_size"]
        rows.append(
            (
                "Presigned Copies:",
                "%d, %s (%d bytes) under %s; purge removes expired ones"
                % (stats["presign_copies"], _human_size(size), size, _PRESIGN_PREFIX),
            )
        )
    for label, value in rows:
        out.write("%-22s%s\n" % (label, value))
    if stats.get("references"):
        out.write("References (stored size, deltas that need it, their size):\n")
        for ref in stats["references"]:
            out.write(
                "  %10s  %4d deltas %10s  %s\n"
                % (
                    _human_size(ref["size"]),
                    ref["deltas"],
                    _human_size(ref["original_size"]),
                    ref["source"] or ref["key"],
                )
            )
    if stats["estimated"]:
        out.write("(~ estimated: --detailed reads every delta's recorded size)\n")


def _cli_client(
    args: argparse.Namespace, environ: Mapping[str, str], workers: int
) -> DeltaGliderClient:
    """The client of a CLI run, from its global and transfer options (TLS, timeouts,
    attempts, how files are stored) and its environment."""
    verify: bool | str | None = None
    if args.no_verify_ssl:
        verify = False
    elif args.ca_bundle:
        verify = args.ca_bundle
    cfg = Config(
        verify=verify,
        max_attempts=args.max_attempts,
        connect_timeout=args.cli_connect_timeout,
        read_timeout=args.cli_read_timeout,
        request_timeout=args.cli_request_timeout,
        max_pool_connections=max(10, workers),
    )
    max_ratio = getattr(args, "max_ratio", None)
    archive_aware = True if getattr(args, "archive_aware", False) else None
    references = getattr(args, "references", None)
    memory_limit = getattr(args, "memory_limit", None)
    return create_client(
        endpoint_url=args.endpoint_url,
        region_name=args.region,
        profile_name=args.profile,
        config=cfg,
        anonymous=args.no_sign_request,
        max_ratio=max_ratio,
        max_workers=workers,
        archive_aware=archive_aware,
        memory_limit=memory_limit,
        environ=environ,
        references=references,
    )


def _saved_note(summary: Mapping[str, Any]) -> str:
    """What a transfer's line says about how the file was stored: " (delta, 97.1% saved)",
    naming the reference when it came from another folder, or " (reference)"."""
    op = summary.get("Operation")
    if op == "create_delta":
        # Rounded down: a 99.96% saving is not "100.0%".
        saved = int(summary["SavingsPercent"] * 10) / 10.0
        source = summary.get("ReferenceSource")
        folder, _, name = (source or "").rpartition("/")
        key = str(summary.get("StoredAs", ""))[: -len(_DELTA_SUFFIX)]
        if source and folder != _deltaspace(key):
            # A reference made from a file in another folder: name it.
            shown = folder + "/" if name == key.rpartition("/")[2] else source
            return " (delta vs %s, %.1f%% saved)" % (shown, saved)
        return " (delta, %.1f%% saved)" % saved
    if op == "create_reference":
        return " (reference)"
    return ""


def _put_args(args: argparse.Namespace) -> dict[str, Any]:
    """The PutObject parameters of the upload options (--content-type, --acl, ...)."""
    extra: dict[str, Any] = {}
    if getattr(args, "content_type", None):
        extra["ContentType"] = args.content_type
    if getattr(args, "storage_class", None):
        extra["StorageClass"] = args.storage_class
    if getattr(args, "metadata", None):
        extra["Metadata"] = dict(args.metadata)
    if getattr(args, "cache_control", None):
        extra["CacheControl"] = args.cache_control
    if getattr(args, "content_disposition", None):
        extra["ContentDisposition"] = args.content_disposition
    if getattr(args, "acl", None):
        extra["ACL"] = args.acl
    return extra


# put-bucket-acl's options, and the PutBucketAcl parameters they set.
_ACL_OPTIONS = (
    ("acl", "ACL"),
    ("grant_full_control", "GrantFullControl"),
    ("grant_read", "GrantRead"),
    ("grant_read_acp", "GrantReadACP"),
    ("grant_write", "GrantWrite"),
    ("grant_write_acp", "GrantWriteACP"),
)


def _recorded_mtimes(
    storage: _Storage,
    bucket: str,
    prefix: str,
    remote: dict[str, dict[str, Any]],
    workers: int,
) -> dict[str, float]:
    """Source mtimes recorded at upload (dg-mtime, as rclone keeps X-Amz-Meta-Mtime);
    LastModified where none was recorded. HEADs run on the pool."""
    import concurrent.futures

    out: dict[str, float] = {}
    lock = threading.Lock()

    def one(rel: str) -> None:
        obj = remote[rel]
        stored = obj["Metadata"].get("deltaglider-is-delta") == "true"
        stamp = obj["LastModified"].timestamp()
        try:
            head = storage.head_object(bucket, prefix + rel + (_DELTA_SUFFIX if stored else ""))
            recorded = _mtime_or_absent(head.get("Metadata", {}).get("dg-mtime"))
            if recorded is not None:
                stamp = recorded
        except ClientError:
            pass
        with lock:
            out[rel] = stamp

    if remote:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, list(remote)))
    return out


def _should_transfer(
    args: argparse.Namespace,
    src_size: int,
    src_mtime: float,
    dst_size: int,
    dst_mtime: float,
    upload: bool,
) -> bool:
    """aws s3 sync: transfer when sizes differ or the source is newer; --size-only
    looks at sizes; --exact-timestamps (downloads) wants equal times."""
    if src_size != dst_size:
        return True
    if getattr(args, "size_only", False):
        return False
    if not upload and getattr(args, "exact_timestamps", False):
        return int(src_mtime) != int(dst_mtime)
    return int(src_mtime) > int(dst_mtime)


def _unchanged(path: str, size: int, obj: Mapping[str, Any]) -> bool:
    """Whether a small local file holds the bytes of a listed object of its size: its
    MD5 is the listing's ETag (a single PUT's; FetchMetadata gives a delta's recorded
    one). sync then leaves it alone with no HEAD for the recorded mtime; a multipart
    or encrypted ETag never matches, and then the times decide, as in aws s3 sync.
    (An identical file that is only newer is not sent again, as rclone does.)"""
    import hashlib

    etag = str(obj.get("ETag", "")).strip('"').lower()
    if size > _QUICK_FILE or not re.fullmatch("[0-9a-f]{32}", etag):
        return False
    try:
        with open(path, "rb") as f:
            return hashlib.md5(f.read(_QUICK_FILE + 1)).hexdigest() == etag
    except OSError:
        return False  # its transfer reports the error


def _quick_upload(
    engine: _DeltaEngine, args: argparse.Namespace, path: str, key: str, size: int
) -> bool:
    """Whether a file of a recursive upload is small and stored whole (one PUT, no
    xdelta3, no reference): such files run on the quick pool (_Cli.run_tasks)."""
    if size > _QUICK_FILE or _delta_only(key):
        return False
    delta = False if getattr(args, "no_delta", False) else None
    try:
        return not engine.eligible(key, path, delta)
    except OSError:
        return False  # its upload reports the error


def _migrate_source(
    args: argparse.Namespace, environ: Mapping[str, str], client: DeltaGliderClient
) -> DeltaGliderClient:
    """The client migrate reads from: this run's, or another store's with
    --source-endpoint-url / --source-profile."""
    if args.source_endpoint_url or args.source_profile:
        return create_client(
            endpoint_url=args.source_endpoint_url or args.endpoint_url,
            profile_name=args.source_profile or args.profile,
            region_name=args.region,
            environ=environ,
        )
    return client


def _migrate_plan(
    source: DeltaGliderClient, filters: _Filters, sb: str, sprefix: str, dprefix: str
) -> list[tuple[str, str, int]]:
    """(source key, destination key, size) of every object migrate copies: the source's
    logical objects under the prefix, --exclude/--include applied, our own bookkeeping
    left out."""
    todo = []
    for obj in source.get_paginator("list_objects_v2").paginate(
        Bucket=sb, Prefix=sprefix, FetchMetadata=True
    ):
        for item in obj.get("Contents", []):
            rel = item["Key"][len(sprefix) :]
            if _is_internal(item["Key"]) or not filters.included(rel):
                continue
            todo.append((item["Key"], dprefix + rel, int(item["Size"])))
    return todo


class _Cli:
    """One CLI run: parsed arguments, the client, the output streams and the tallies."""

    def __init__(
        self, args: argparse.Namespace, out: IO[str], err: IO[str], environ: Mapping[str, str]
    ) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.environ = environ
        self.failed = 0
        self.warned = 0
        self._print_lock = threading.Lock()
        self._client: DeltaGliderClient | None = None
        quiet = getattr(args, "quiet", False)
        self.quiet = quiet
        self.errors_only = getattr(args, "only_show_errors", False)
        show_progress = not (quiet or self.errors_only or getattr(args, "no_progress", False))
        self.progress_enabled = show_progress and hasattr(err, "isatty") and err.isatty()
        # Transfers run --max-concurrency at once; the gateway serves --workers requests at
        # once, each with its back-end connection: the client's pool keeps that many
        # alive, where a smaller one would close and reopen them under load.
        self.workers: int = (
            getattr(args, "max_concurrency", None) or getattr(args, "workers", None) or 10
        )
        # Small files stored whole get a pool of their own unless an option bounds all.
        bounded = getattr(args, "max_concurrency", None) or getattr(args, "workers", None)
        self.quick_workers = 0 if bounded else _QUICK_WORKERS
        self._single = False  # this run_tasks has one task, run in the main thread
        self._settled = False  # ... and it is stored: Ctrl-C no longer changes the outcome

    @property
    def client(self) -> DeltaGliderClient:
        if self._client is None:
            self._client = _cli_client(self.args, self.environ, self.workers + self.quick_workers)
        return self._client

    def close(self) -> None:
        """Close the client, if this run made one."""
        if self._client is not None:
            self._client.close()

    # -- output -------------------------------------------------------------------

    def line(self, text: str) -> None:
        if self.quiet or self.errors_only:
            return
        with self._print_lock:
            self.out.write(_printable(text) + "\n")
            self.out.flush()

    def error(self, text: str) -> None:
        if self.quiet:
            return
        with self._print_lock:
            self.err.write(_printable(text) + "\n")
            self.err.flush()

    def fail(self, text: str) -> None:
        self.failed += 1
        self.error(text)

    def warn(self, text: str) -> None:
        self.warned += 1
        self.error("warning: " + text)

    def dry(self) -> str:
        return "(dryrun) " if getattr(self.args, "dryrun", False) else ""

    def exit_code(self) -> int:
        if self.failed:
            return EXIT_FAILED
        if self.warned:
            return EXIT_USAGE
        return EXIT_OK

    # -- helpers ------------------------------------------------------------------

    def filters(self) -> _Filters:
        return _Filters(list(getattr(self.args, "filters", None) or []))

    def stored_keys(self, bucket: str, prefix: str) -> set[str]:
        """Every stored key under a prefix (one LIST per 1,000): lets uploads skip a HEAD
        each for the other representation of their name."""
        keys: set[str] = set()
        storage = self.client.engine.storage
        keys.update(o["Key"] for o in _stored_objects(storage, bucket, prefix))
        return keys

    def list_logical(
        self, bucket: str, prefix: str, fetch: bool = False, stored: set[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every logical object under a prefix, one stored page of 1,000 at a time, the next
        read while this one is handled (_logical_pages); ``stored`` gets every stored key."""
        workers = self.workers + self.quick_workers  # a FetchMetadata HEAD is one request
        pages = _logical_pages(self.client.engine, bucket, prefix, "", fetch, workers, stored)
        for objects, _ in pages:
            yield from objects

    def settled(self) -> None:
        """Called once a transfer is stored, before its line is printed. When it is the
        run's only one, a Ctrl-C from here on is ignored (see on_sigint): the line says
        it is done, so the exit code must too. With several, Ctrl-C still cancels the
        rest: those that were done have their lines."""
        if self._single and threading.current_thread() is threading.main_thread():
            self._settled = True

    def on_sigint(self, signum: int, frame: Any) -> None:
        if not self._settled:
            raise KeyboardInterrupt

    def run_tasks(
        self,
        tasks: list[Callable[[], None]],
        total_bytes: int,
        quick: Sequence[Callable[[], None]] = (),
    ) -> None:
        """Run the transfers: ``quick`` ones (see _quick_upload) on their own pool."""
        count = len(tasks) + len(quick)
        self._single, self._settled = count == 1, False
        progress = _Progress(self.err, self.progress_enabled, count, total_bytes)
        self._progress = progress
        try:
            _run_parallel(tasks, self.workers, progress, quick, self.quick_workers)
        finally:
            progress.clear()

    def on_bytes(self, n: int) -> None:
        progress = getattr(self, "_progress", None)
        if progress is not None:
            progress.add(n)

    def file_done(self) -> None:
        progress = getattr(self, "_progress", None)
        if progress is not None:
            progress.file_done()

    def describe_error(self, e: BaseException) -> str:
        return _one_line(e)

    # -- cp / mv ------------------------------------------------------------------

    def transfer_one(
        self, verb: str, src: str, dst: str, work: Callable[[], Mapping[str, Any] | None]
    ) -> None:
        """The one per-file driver of cp, mv, sync and migrate: ``work`` transfers one file
        and returns the engine's summary (for the line's delta note), or None. Prints the
        line once the file is stored, or counts and prints its failure; with --dryrun it
        prints what would happen instead. A cancellation (Ctrl-C) goes on up."""
        if getattr(self.args, "dryrun", False):
            self.line("(dryrun) %s: %s to %s" % (verb, src, dst))
            return
        try:
            summary = work()
            self.settled()
            self.line("%s: %s to %s%s" % (verb, src, dst, _saved_note(summary or {})))
        except _Cancelled:
            raise
        except (DeltaGliderError, OSError) as e:
            self.fail("%s failed: %s to %s %s" % (verb, src, dst, self.describe_error(e)))
        finally:
            self.file_done()

    def upload_one(
        self,
        path: str,
        bucket: str,
        key: str,
        verb: str = "upload",
        existing: Container[str] | None = None,
        quick: bool = False,
    ) -> None:
        """Store a local file at s3://bucket/key; mv then removes the file. ``quick``: it
        was found to be one to store whole (_quick_upload): hashed here, not sniffed again."""

        def work() -> dict[str, Any]:
            extra = _put_args(self.args)
            mtime = os.stat(path).st_mtime
            params = dict(extra, Bucket=bucket, Key=key)
            metadata = dict(params.get("Metadata") or {})
            params["Metadata"] = metadata
            engine = self.client.engine
            delta = False if quick or getattr(self.args, "no_delta", False) else None
            summary = engine.put_file(
                path,
                bucket,
                key,
                metadata=metadata,
                headers=_put_headers(params),
                delta=delta,
                # A small file is hashed faster than a thread to hash it starts; what is
                # sent is held to this hash all the same (_put_path).
                info=_hash_file(path, True) if quick else None,
                on_bytes=self.on_bytes,
                mtime=mtime,
                existing=existing,
            )
            if verb == "move":
                os.unlink(path)
            return summary

        self.transfer_one(verb, _display_path(path), "s3://%s/%s" % (bucket, key), work)

    def download_one(
        self,
        bucket: str,
        key: str,
        path: str,
        verb: str = "download",
        mtime: Any = None,
        root: str | None = None,
    ) -> None:
        """Write s3://bucket/key (rebuilt, verified) to a local path, with its recorded
        mtime; mv then deletes the object. ``root``: the destination folder of a recursive
        download or sync, which nothing may be written outside of, even through a symlink
        inside it."""
        src = "s3://%s/%s" % (bucket, key)
        shown = _display_path(path)
        if root is not None and _leads_outside(root, path):
            self.warn(
                "Skipping %s: %s is reached through a symlink that leads outside %s"
                % (src, shown, _display_path(root))
            )
            self.file_done()
            return

        def work() -> None:
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            lg = self.client.engine.get_to_file(bucket, key, path)
            self.on_bytes(lg.size)
            stamp = _logical_mtime(lg)
            if stamp is not None:
                os.utime(path, (stamp, stamp))
            if verb == "move":
                self.client.engine.delete(bucket, key)

        self.transfer_one(verb, src, shown, work)

    def copy_one(self, sb: str, sk: str, db: str, dk: str, verb: str = "copy") -> None:
        """Copy s3://sb/sk to s3://db/dk through a local temporary file (rebuilt, then
        stored in the destination's layout); mv then deletes the source."""

        def work() -> dict[str, Any]:
            engine = self.client.engine
            with self.fetched(self.client, sb, sk, ".copy") as (tmp, lg):
                params = dict(_put_args(self.args))
                params.setdefault("Metadata", _user_metadata(lg.metadata))
                params.setdefault("ContentType", lg.content_type)
                delta = False if getattr(self.args, "no_delta", False) else None
                summary = engine.put_file(
                    tmp,
                    db,
                    dk,
                    metadata=params["Metadata"],
                    headers=_put_headers(params),
                    delta=delta,
                )
            if verb == "move":
                engine.delete(sb, sk)
            return summary

        self.transfer_one(verb, "s3://%s/%s" % (sb, sk), "s3://%s/%s" % (db, dk), work)

    @contextlib.contextmanager
    def fetched(
        self, source: DeltaGliderClient, bucket: str, key: str, suffix: str
    ) -> Iterator[tuple[str, _Logical]]:
        """An object of ``source`` rebuilt into a private temporary file, with its logical
        head, for copies between buckets or stores; the file is removed afterwards."""
        engine = source.engine
        lg = engine.head(bucket, key, "HeadObject")
        fd, tmp = _private_tempfile(self.client.engine.tmp_dir(), suffix)
        os.close(fd)
        try:
            engine.get_to_file(bucket, key, tmp, logical=lg)
            yield tmp, lg
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def local_files(
        self, root: str, *, confine: bool = False, unread: list[str] | None = None
    ) -> Iterator[tuple[str, str]]:
        """_local_files with this run's --no-follow-symlinks, its warnings counted."""
        follow = not getattr(self.args, "no_follow_symlinks", False)
        return _local_files(root, self.warn, follow=follow, confine=confine, unread=unread)

    def cmd_cp(self, move: bool = False) -> int:
        """cp and mv: one file, or with --recursive a folder or prefix, up to S3, down from
        it or between buckets; ``-`` streams stdin or stdout."""
        src, dst = self.args.source, self.args.dest
        src_s3, dst_s3 = src.startswith("s3://"), dst.startswith("s3://")
        if not src_s3 and not dst_s3:
            raise _UsageError(
                "Error: Invalid argument type (at least one of the paths must be s3://)"
            )
        if src == "-" or dst == "-":
            return self.cp_stream(src, dst)
        if src_s3 and dst_s3:
            self.cp_between(src, dst, move)
        elif dst_s3:
            self.cp_up(src, dst, move)
        else:
            self.cp_down(src, dst, move)
        return self.exit_code()

    def cp_between(self, src: str, dst: str, move: bool) -> None:
        """S3 to S3: a key, or every key under a prefix, copied with copy_one. A copy onto
        itself, or onto a key the same run still has to read, is refused before any work."""
        sb, sk = _parse_s3_url(src)
        db, dk = _parse_s3_url(dst)
        command, verb = ("mv", "move") if move else ("cp", "copy")
        if not getattr(self.args, "recursive", False):
            if not dk or dk.endswith("/"):
                dk += sk.rsplit("/", 1)[-1]
            _refuse_onto_itself(command, sb, db, [(sk, dk)])
            self.copy_one(sb, sk, db, dk, verb)
            return
        prefix = sk if not sk or sk.endswith("/") else sk + "/"
        dprefix = dk if not dk or dk.endswith("/") else dk + "/"
        filters = self.filters()
        pairs = [
            (obj["Key"], dprefix + obj["Key"][len(prefix) :])
            for obj in self.list_logical(sb, prefix)
            if filters.included(obj["Key"][len(prefix) :])
        ]
        _refuse_onto_itself(command, sb, db, pairs)
        tasks: list[Callable[[], None]] = [
            functools.partial(self.copy_one, sb, s_key, db, d_key, verb) for s_key, d_key in pairs
        ]
        self.run_tasks(tasks, 0)

    def cp_up(self, src: str, dst: str, move: bool) -> None:
        """Local to S3: a file, or with --recursive every file under a folder (in key
        order, --exclude/--include applied), each stored with upload_one."""
        bucket, key = _parse_s3_url(dst)
        verb = "move" if move else "upload"
        if os.path.isdir(src):
            if not getattr(self.args, "recursive", False):
                raise _FatalError(
                    "upload failed: %s to %s Need to use --recursive to upload a directory"
                    % (_display_path(src), dst)
                )
            prefix = key if not key or key.endswith("/") else key + "/"
            filters = self.filters()
            tasks: list[Callable[[], None]] = []
            quick: list[Callable[[], None]] = []
            total = 0
            existing = self.stored_keys(bucket, prefix)
            for path, rel in self.local_files(src):
                if filters.included(rel):
                    size = os.path.getsize(path)
                    total += size
                    fast = _quick_upload(self.client.engine, self.args, path, prefix + rel, size)
                    (quick if fast else tasks).append(
                        functools.partial(
                            self.upload_one, path, bucket, prefix + rel, verb, existing, fast
                        )
                    )
            self.run_tasks(tasks, total, quick)
            return
        if not os.path.exists(src):
            raise _FatalError("The user-provided path %s does not exist." % src)
        if not stat.S_ISREG(os.stat(src).st_mode):
            self.warn(
                "Skipping file %s. File is character special device, block special "
                "device, FIFO, or socket." % src
            )
            return
        if not key or key.endswith("/"):
            key += os.path.basename(src)
        task = functools.partial(self.upload_one, src, bucket, key, verb)
        self.run_tasks([task], os.path.getsize(src))

    def cp_down(self, src: str, dst: str, move: bool) -> None:
        """S3 to local: a key, or with --recursive every key under a prefix, each written
        with download_one; a key that would land outside the folder is skipped."""
        bucket, key = _parse_s3_url(src)
        verb = "move" if move else "download"
        if not getattr(self.args, "recursive", False):
            if not key or key.endswith("/"):
                raise _FatalError(
                    "download failed: %s to %s An S3 key is needed (use --recursive for a prefix)"
                    % (src, dst)
                )
            path = dst
            if os.path.isdir(dst) or dst.endswith(("/", os.sep)):
                path = os.path.join(dst, key.rsplit("/", 1)[-1])
            self.run_tasks([functools.partial(self.download_one, bucket, key, path, verb)], 0)
            return
        prefix = key if not key or key.endswith("/") else key + "/"
        filters = self.filters()
        tasks: list[Callable[[], None]] = []
        for obj in self.list_logical(bucket, prefix):
            rel = obj["Key"][len(prefix) :]
            safe = _safe_relative(rel)
            if safe is None:
                self.warn(
                    "Skipping s3://%s/%s: the key would write outside %s"
                    % (bucket, obj["Key"], dst)
                )
                continue
            if filters.included(rel):
                path = os.path.join(dst, safe)
                tasks.append(
                    functools.partial(self.download_one, bucket, obj["Key"], path, verb, root=dst)
                )
        self.run_tasks(tasks, 0)

    def cp_stream(self, src: str, dst: str) -> int:
        """``-`` as source (stdin) or destination (stdout); only errors are printed."""
        engine = self.client.engine
        if src == "-":
            bucket, key = _parse_s3_url(dst)
            if not key or key.endswith("/"):
                raise _FatalError(
                    "upload failed: - to %s a key is needed when uploading from stdin" % dst
                )
            stdin = getattr(sys.stdin, "buffer", sys.stdin)
            path, info = _spool_request_body(engine, stdin)
            try:
                delta = False if getattr(self.args, "no_delta", False) else None
                params = _put_args(self.args)
                engine.put_file(
                    path,
                    bucket,
                    key,
                    metadata=params.get("Metadata"),
                    headers=_put_headers(params),
                    delta=delta,
                    info=info,
                )
            finally:
                os.unlink(path)
            return EXIT_OK
        bucket, key = _parse_s3_url(src)
        resp = self.client.get_object(Bucket=bucket, Key=key)
        stdout = getattr(self.out, "buffer", None) or sys.stdout.buffer
        with resp["Body"] as body:
            for chunk in body.iter_chunks(_IO_CHUNK):
                stdout.write(chunk)
        stdout.flush()
        return EXIT_OK

    # -- ls -----------------------------------------------------------------------

    def cmd_ls(self) -> int:
        path = self.args.path
        human = self.args.human_readable
        fmt_size = _human_size if human else str
        if not path or path == "s3://":
            for b in self.client.list_buckets().get("Buckets", []):
                created = b.get("CreationDate")
                stamp = created.astimezone().strftime("%Y-%m-%d %H:%M:%S") if created else " " * 19
                self.out.write("%s %s\n" % (stamp, b["Name"]))
            return EXIT_OK
        bucket, key = _parse_s3_url(path)
        base = key.rpartition("/")[0] + "/" if "/" in key else ""
        count = total = folders = 0
        stamps: dict[datetime.datetime, str] = {}  # a page's objects share few dates
        pages = _logical_pages(
            self.client.engine,
            bucket,
            key,
            "" if self.args.recursive else "/",
            self.args.original_sizes,
            self.workers,
        )
        for objects, prefixes in pages:  # each page printed as it comes, in one write
            lines = []
            for p in prefixes:
                lines.append("%s %s\n" % ("PRE".rjust(30), _printable(p["Prefix"][len(base) :])))
            folders += len(prefixes)
            for obj in objects:
                count += 1
                total += obj["Size"]
                when = obj["LastModified"]
                stamp = stamps.get(when)
                if stamp is None:
                    stamp = stamps[when] = when.astimezone().strftime("%Y-%m-%d %H:%M:%S")
                name = obj["Key"] if self.args.recursive else obj["Key"][len(base) :]
                lines.append(
                    "%s %s %s\n" % (stamp, fmt_size(obj["Size"]).rjust(10), _printable(name))
                )
            if len(stamps) > 10_000:
                stamps.clear()
            self.out.write("".join(lines))
        if self.args.summarize:
            self.out.write(
                "\n%s%d\n%s%s\n"
                % ("Total Objects: ".rjust(15), count, "Total Size: ".rjust(15), fmt_size(total))
            )
        self.out.flush()
        if count == 0 and folders == 0:
            self.note_unused_references(bucket, key)
        if count == 0 and key and not self._had_prefixes(bucket, key):
            return EXIT_FAILED
        return EXIT_OK

    def note_unused_references(self, bucket: str, prefix: str) -> None:
        """``ls`` shows nothing where only a reference is left (listings hide them):
        say so, and how to remove it."""
        try:
            found = self.client.engine.gc(bucket, prefix, dry_run=True)["Removed"]
        except (DeltaGliderError, OSError):
            return
        unused = [r["Key"] for r in found]
        for ref in unused:
            self.error(
                "note: s3://%s/%s is a deltaglider reference that no object uses (an upload "
                "was interrupted, or another tool left it); 'gc s3://%s/%s' removes it"
                % (bucket, ref, bucket, prefix)
            )

    def _had_prefixes(self, bucket: str, key: str) -> bool:
        page = self.client.list_objects_v2(Bucket=bucket, Prefix=key, Delimiter="/", MaxKeys=1)
        return bool(page.get("CommonPrefixes"))

    # -- rm -----------------------------------------------------------------------

    def cmd_rm(self) -> int:
        bucket, key = _parse_s3_url(self.args.path)
        engine = self.client.engine
        dry = self.dry()
        if not self.args.recursive:
            if not key:
                raise _FatalError(
                    "delete failed: %s: a key is needed (or --recursive)" % self.args.path
                )
            if dry:
                self.line("%sdelete: s3://%s/%s" % (dry, bucket, key))
                return EXIT_OK
            try:
                info = engine.delete(bucket, key)
            except (DeltaGliderError, OSError) as e:
                self.fail("delete failed: s3://%s/%s %s" % (bucket, key, self.describe_error(e)))
                return self.exit_code()
            if info.get("Type") == "missing":
                # S3 deletes of missing keys succeed; aws s3 rm prints the line anyway.
                pass
            self.line("delete: s3://%s/%s" % (bucket, key))
            return self.exit_code()
        prefix = key if not key or key.endswith("/") else key + "/"
        filters = self.filters()
        keys = [
            o["Key"]
            for o in self.list_logical(bucket, prefix)
            if filters.included(o["Key"][len(prefix) :])
        ]
        self.delete_keys(bucket, keys)
        self.delete_unused_references(bucket, prefix)
        return self.exit_code()

    def delete_unused_references(self, bucket: str, prefix: str) -> None:
        """References no delta uses (listings never show them) go with their folder."""
        try:
            found = self.client.engine.gc(bucket, prefix, dry_run=bool(self.dry()))
        except (DeltaGliderError, OSError) as e:
            self.fail("delete failed: s3://%s/%s %s" % (bucket, prefix, self.describe_error(e)))
            return
        for ref in found["Removed"]:
            self.line(
                "%sdelete: s3://%s/%s (a reference no object uses)"
                % (self.dry(), bucket, ref["Key"])
            )

    def delete_keys(self, bucket: str, keys: list[str]) -> None:
        self._settled = False
        dry = self.dry()
        if dry:
            for k in keys:
                self.line("%sdelete: s3://%s/%s" % (dry, bucket, k))
            return
        for i in range(0, len(keys), 500):
            batch = keys[i : i + 500]
            try:
                resp = self.client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch]}
                )
            except (DeltaGliderError, OSError) as e:
                for k in batch:
                    self.fail("delete failed: s3://%s/%s %s" % (bucket, k, self.describe_error(e)))
                continue
            for d in resp.get("Deleted", []):
                self.line("delete: s3://%s/%s" % (bucket, d["Key"]))
            for failure in resp.get("Errors", []):
                self.fail(
                    "delete failed: s3://%s/%s %s"
                    % (bucket, failure["Key"], failure.get("Message", failure.get("Code")))
                )

    # -- sync -----------------------------------------------------------------------

    def cmd_sync(self) -> int:
        src, dst = self.args.source, self.args.dest
        if src.startswith("s3://") and not dst.startswith("s3://"):
            return self.sync_down(src, dst)
        if dst.startswith("s3://") and not src.startswith("s3://"):
            return self.sync_up(src, dst)
        if src.startswith("s3://") and dst.startswith("s3://"):
            return self.sync_between(src, dst)
        raise _UsageError("sync needs at least one s3:// URL (and local folders, not files)")

    def sync_between(self, src: str, dst: str) -> int:
        """s3:// to s3:// as aws s3 sync does it: copy each key missing at the destination,
        of another size, or newer at the source (LastModified); --delete removes the
        destination's keys the source does not have."""
        sb, sk = _parse_s3_url(src)
        db, dk = _parse_s3_url(dst)
        prefix = sk if not sk or sk.endswith("/") else sk + "/"
        dprefix = dk if not dk or dk.endswith("/") else dk + "/"
        filters = self.filters()
        source = {
            rel: obj for rel, obj in self.remote_index(sb, prefix).items() if filters.included(rel)
        }
        _refuse_onto_itself(
            "sync", sb, db, [(prefix + rel, dprefix + rel) for rel in source], (prefix, dprefix)
        )
        dest = self.remote_index(db, dprefix)
        tasks: list[Callable[[], None]] = []
        for rel in sorted(source):
            obj, have = source[rel], dest.get(rel)
            if have is not None and not _should_transfer(
                self.args,
                obj["Size"],
                obj["LastModified"].timestamp(),
                have["Size"],
                have["LastModified"].timestamp(),
                upload=True,
            ):
                continue
            tasks.append(functools.partial(self.copy_one, sb, prefix + rel, db, dprefix + rel))
        self.run_tasks(tasks, 0)
        if self.args.delete:
            gone = [
                dprefix + rel for rel in sorted(dest) if rel not in source and filters.included(rel)
            ]
            self.delete_keys(db, gone)
        return self.exit_code()

    def remote_index(
        self, bucket: str, prefix: str, stored: set[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """rel → {Size (logical), mtime (source mtime if recorded, else LastModified)};
        ``stored`` gets every stored key of the listing."""
        index: dict[str, dict[str, Any]] = {}
        for obj in self.list_logical(bucket, prefix, fetch=True, stored=stored):
            rel = obj["Key"][len(prefix) :]
            index[rel] = obj
        return index

    def sync_up(self, src: str, dst: str) -> int:
        if not os.path.isdir(src):
            _refuse_sync_path(src)
        bucket, key = _parse_s3_url(dst)
        prefix = key if not key or key.endswith("/") else key + "/"
        filters = self.filters()
        unread: list[str] = []

        def walk() -> list[tuple[str, str, os.stat_result]]:
            files = self.local_files(src, unread=unread)
            return [(path, rel, os.stat(path)) for path, rel in files if filters.included(rel)]

        local = _Background(walk)  # while the listing is read, which gives the stored keys too
        stored: set[str] = set()
        remote = self.remote_index(bucket, prefix, stored)
        files = local.result()
        seen = {rel for _, rel, _ in files}
        same = [(p, r, st.st_size) for p, r, st in files if r in remote]
        same = [f for f in same if remote[f[1]]["Size"] == f[2]]
        if getattr(self.args, "size_only", False):
            kept = {rel for _, rel, _ in same}
        else:
            kept = {rel for path, rel, size in same if _unchanged(path, size, remote[rel])}
        wanted = [(path, rel, st) for path, rel, st in files if rel not in kept]
        undecided = {rel: remote[rel] for _, rel, _ in same if rel not in kept}
        storage = self.client.engine.storage
        mtimes = _recorded_mtimes(
            storage, bucket, prefix, undecided, self.workers + self.quick_workers
        )
        tasks: list[Callable[[], None]] = []
        quick: list[Callable[[], None]] = []
        total = 0
        for path, rel, st in wanted:
            obj = remote.get(rel)
            if obj is not None and not _should_transfer(
                self.args, st.st_size, st.st_mtime, obj["Size"], mtimes.get(rel, 0.0), upload=True
            ):
                continue
            total += st.st_size
            fast = _quick_upload(self.client.engine, self.args, path, prefix + rel, st.st_size)
            (quick if fast else tasks).append(
                functools.partial(
                    self.upload_one, path, bucket, prefix + rel, "upload", stored, fast
                )
            )
        self.run_tasks(tasks, total, quick)
        if self.args.delete:
            gone = [
                prefix + rel
                for rel in sorted(remote)
                if rel not in seen and filters.included(rel) and not _under_any(rel, unread)
            ]
            self.delete_keys(bucket, gone)
        return self.exit_code()

    def sync_down(self, src: str, dst: str) -> int:
        if os.path.lexists(dst) and not os.path.isdir(dst):
            _refuse_sync_path(dst)
        bucket, key = _parse_s3_url(src)
        prefix = key if not key or key.endswith("/") else key + "/"
        filters = self.filters()
        remote = self.remote_index(bucket, prefix)
        wanted = set()
        fetch: list[tuple[str, str, os.stat_result | None]] = []
        undecided: dict[str, dict[str, Any]] = {}  # same size, other or unknown bytes
        for rel in sorted(remote):
            if not filters.included(rel):
                continue
            safe = _safe_relative(rel)
            if safe is None:
                self.warn(
                    "Skipping s3://%s/%s%s: the key would write outside %s"
                    % (bucket, prefix, rel, dst)
                )
                continue
            path = os.path.join(dst, safe)
            wanted.add(os.path.normpath(path))
            try:
                st: os.stat_result | None = os.stat(path)
            except OSError:
                st = None
            if st is not None and st.st_size == remote[rel]["Size"]:
                if getattr(self.args, "size_only", False):
                    continue
                exact = getattr(self.args, "exact_timestamps", False)
                if not exact and _unchanged(path, st.st_size, remote[rel]):
                    continue
                undecided[rel] = remote[rel]
            fetch.append((rel, path, st))
        storage = self.client.engine.storage
        mtimes = _recorded_mtimes(
            storage, bucket, prefix, undecided, self.workers + self.quick_workers
        )
        tasks: list[Callable[[], None]] = []
        for rel, path, st in fetch:
            if st is not None and not _should_transfer(
                self.args,
                remote[rel]["Size"],
                mtimes.get(rel, 0.0),
                st.st_size,
                st.st_mtime,
                upload=False,
            ):
                continue
            tasks.append(functools.partial(self.download_one, bucket, prefix + rel, path, root=dst))
        self.run_tasks(tasks, sum(remote[r]["Size"] for r in remote if r in remote))
        if self.args.delete and os.path.isdir(dst):
            for path, rel in list(self.local_files(dst, confine=True)):
                if os.path.normpath(path) not in wanted and filters.included(rel):
                    if self.dry():
                        self.line("(dryrun) delete: %s" % _display_path(path))
                    else:
                        os.unlink(path)
                        self.line("delete: %s" % _display_path(path))
        return self.exit_code()

    # -- buckets and the rest ----------------------------------------------------

    def cmd_mb(self) -> int:
        bucket, _ = _parse_s3_url(self.args.path)
        try:
            cfg = {}
            region = self.args.region
            if region and region != "us-east-1":
                cfg = {"CreateBucketConfiguration": {"LocationConstraint": region}}
            self.client.create_bucket(Bucket=bucket, **cfg)
        except (DeltaGliderError, OSError) as e:
            self.fail("make_bucket failed: s3://%s %s" % (bucket, self.describe_error(e)))
            return self.exit_code()
        self.line("make_bucket: %s" % bucket)
        return EXIT_OK

    def cmd_rb(self) -> int:
        bucket, _ = _parse_s3_url(self.args.path)
        if self.args.force:
            keys = [o["Key"] for o in self.list_logical(bucket, "")]
            self.delete_keys(bucket, keys)
            # anything left (other tools' objects, temp copies, stray references)
            self.client.engine.delete_prefix(bucket, "")
        else:
            # Our own bookkeeping (stats cache, rebuilt presign copies) must not make an
            # otherwise empty bucket "not empty".
            try:
                left = self.stored_keys(bucket, "")
            except ClientError:
                left = set()  # DeleteBucket below says what is wrong
            if left and all(_is_internal(k) or _is_reference(k) for k in left):
                # Our bookkeeping, and references no delta uses (an interrupted upload,
                # another tool): delete_prefix removes only those that nothing needs.
                self.client.engine.delete_prefix(bucket, "")
        try:
            self.client.delete_bucket(Bucket=bucket)
        except (DeltaGliderError, OSError) as e:
            self.fail("remove_bucket failed: s3://%s %s" % (bucket, self.describe_error(e)))
            return self.exit_code()
        self.line("remove_bucket: %s" % bucket)
        return self.exit_code()

    def cmd_verify(self) -> int:
        result = self.client.verify(self.args.path)
        # dict(): json skips a dict that is false, and a VerifyResult is false when it failed.
        self.out.write(_json_text(dict(result)))
        return EXIT_OK if result["valid"] else EXIT_FAILED

    def cmd_presign(self) -> int:
        bucket, key = _parse_s3_url(self.args.path)
        url = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.args.expires_in
        )
        self.out.write(url + "\n")
        return EXIT_OK

    def cmd_purge(self) -> int:
        bucket, _ = _parse_s3_url(
            self.args.path if self.args.path.startswith("s3://") else "s3://" + self.args.path
        )
        result = self.client.purge_temp_files(bucket)
        self.out.write(_json_text(result))
        return EXIT_OK if not result["error_count"] else EXIT_FAILED

    def cmd_gc(self) -> int:
        bucket, prefix = _parse_s3_url(self.args.path)
        result = self.client.gc(Bucket=bucket, Prefix=prefix, DryRun=self.args.dryrun)
        for item in result["Removed"]:
            self.line(
                "%sdelete: s3://%s/%s (%s)"
                % (self.dry(), bucket, item["Key"], _human_size(item["Size"]))
            )
        self.line(
            "%s%d unused reference(s), %s%s; %d kept"
            % (
                self.dry(),
                len(result["Removed"]),
                _human_size(result["BytesFreed"]),
                " would be freed" if self.args.dryrun else " freed",
                result["Kept"],
            )
        )
        return self.exit_code()

    def cmd_stats(self) -> int:
        name = self.args.bucket
        bucket = _parse_s3_url(name).bucket if name.startswith("s3://") else name.strip("/")
        mode = "detailed" if self.args.detailed else "sampled" if self.args.sampled else "quick"
        stats = self.client.get_bucket_stats(
            bucket, mode, use_cache=not self.args.no_cache, refresh_cache=self.args.refresh
        )
        if self.args.json:
            self.out.write(_json_text(stats))
            return EXIT_OK
        _print_stats(self.out, bucket, mode, stats)
        return EXIT_OK

    def cmd_migrate(self) -> int:
        """Copy a bucket or prefix (any S3, any tool's layout) into the delta layout.
        Resumable: keys already at the destination with the same size are skipped."""
        src, dst = self.args.source, self.args.dest
        if not (src.startswith("s3://") and dst.startswith("s3://")):
            raise _UsageError(
                "migrate needs two s3:// URLs: migrate s3://from/prefix/ s3://to/prefix/"
            )
        sb, sk = _parse_s3_url(src)
        db, dk = _parse_s3_url(dst)
        sprefix = sk if not sk or sk.endswith("/") else sk + "/"
        dprefix = dk if not dk or dk.endswith("/") else dk + "/"
        source = _migrate_source(self.args, self.environ, self.client)
        todo = _migrate_plan(source, self.filters(), sb, sprefix, dprefix)
        if _store_identity(source) == _store_identity(self.client):
            pairs = [(t[0], t[1]) for t in todo]
            _refuse_onto_itself("migrate", sb, db, pairs, (sprefix, dprefix))
        if self.dry():
            self.migrate_dry_run(sb, db, todo)
            return EXIT_OK
        present: dict[str, int] = {}
        for item in self.list_logical(db, dprefix, fetch=True):
            present[item["Key"]] = int(item["Size"])
        skipped = [t for t in todo if present.get(t[1]) == t[2]]
        todo = [t for t in todo if present.get(t[1]) != t[2]]
        total = sum(t[2] for t in todo)
        stored: list[int] = []  # each file's stored size (list.append is atomic)
        self.run_tasks(
            [functools.partial(self.migrate_one, source, sb, db, *t, stored) for t in todo], total
        )
        saved = (1 - sum(stored) / total) * 100 if total else 0.0
        self.line(
            "Migrated %d file(s): %s stored as %s (%.1f%% saved); %d already there, %d failed"
            % (
                len(todo) - self.failed,
                _human_size(total),
                _human_size(sum(stored)),
                saved,
                len(skipped),
                self.failed,
            )
        )
        return self.exit_code()

    def migrate_dry_run(self, sb: str, db: str, todo: list[tuple[str, str, int]]) -> None:
        """--dryrun: each file that would be copied, then how many, and how many of them
        would become deltas (all but the first eligible file in each folder)."""
        total = sum(t[2] for t in todo)
        eligible = [t[1] for t in todo if _eligible_by_name(t[1].rsplit("/", 1)[-1], self.environ)]
        spaces = {_deltaspace(key) for key in eligible}
        for s_key, d_key, _ in todo:
            self.line("(dryrun) migrate: s3://%s/%s to s3://%s/%s" % (sb, s_key, db, d_key))
        self.line(
            "Would migrate %d file(s), %s; %d of them delta-eligible in %d folder(s): "
            "all but the first in each folder are stored as deltas"
            % (len(todo), _human_size(total), len(eligible), len(spaces))
        )

    def migrate_one(
        self,
        source: DeltaGliderClient,
        sb: str,
        db: str,
        s_key: str,
        d_key: str,
        size: int,
        stored: list[int],
    ) -> None:
        """Copy one object of ``source`` into the delta layout with its content type, user
        metadata and mtime; its stored size is added to ``stored``."""

        def work() -> dict[str, Any]:
            with self.fetched(source, sb, s_key, ".migrate") as (tmp, lg):
                delta = False if self.args.no_delta else None
                params: dict[str, Any] = {"ContentType": lg.content_type}
                summary = self.client.engine.put_file(
                    tmp,
                    db,
                    d_key,
                    metadata=_user_metadata(lg.metadata),
                    headers=_put_headers(params),
                    delta=delta,
                    mtime=_logical_mtime(lg),
                )
            stored.append(summary["StoredSize"])
            self.on_bytes(size)
            return summary

        self.transfer_one("migrate", "s3://%s/%s" % (sb, s_key), "s3://%s/%s" % (db, d_key), work)

    def cmd_get_bucket_acl(self) -> int:
        bucket = self.args.bucket.replace("s3://", "").strip("/")
        resp = self.client.get_bucket_acl(Bucket=bucket)
        resp.pop("ResponseMetadata", None)
        self.out.write(_json_text(resp))
        return EXIT_OK

    def cmd_put_bucket_acl(self) -> int:
        bucket = self.args.bucket.replace("s3://", "").strip("/")
        params: dict[str, Any] = {"Bucket": bucket}
        for option, name in _ACL_OPTIONS:
            value = getattr(self.args, option, None)
            if value:
                params[name] = value
        if self.args.access_control_policy:
            params["AccessControlPolicy"] = _json_value(self.args.access_control_policy)
        self.client.put_bucket_acl(**params)
        self.line("ACL updated for bucket: %s" % bucket)
        return EXIT_OK


class _UsageError(DeltaGliderError):
    """Bad command-line usage: exit 2."""


class _FatalError(DeltaGliderError):
    """A run that cannot start (missing file, bad URL): one line, exit 1."""


def _refuse_sync_path(path: str) -> None:
    """sync compares folders: a local path that is not one is refused before any work."""
    if os.path.lexists(path):
        raise _FatalError(
            "The user-provided path %s is not a folder: sync takes folders "
            "(cp copies a single file)" % path
        )
    raise _FatalError("The user-provided path %s does not exist." % path)


def _store_identity(client: DeltaGliderClient) -> str:
    """Which store a client talks to (endpoint, or local directory): two clients with the same
    identity see the same bucket under the same name."""
    storage = client.engine.storage
    if isinstance(storage, _LocalStorage):
        return "file:" + os.path.realpath(storage.root)
    return str(storage.endpoint_url).lower()


def _refuse_onto_itself(
    command: str,
    src_bucket: str,
    dst_bucket: str,
    pairs: Sequence[tuple[str, str]],
    prefixes: tuple[str, str] | None = None,
) -> None:
    """The one check for cp, mv, sync and migrate within one store: refuse, before any work,
    a transfer whose destination is its own source (aws s3 mv: "Cannot mv a file onto
    itself"), or that writes a key the same run still has to read (overlapping prefixes:
    the outcome would depend on the order of transfers, and mv would delete what it just
    wrote). ``prefixes`` (source, destination), for sync and migrate: one may not hold the
    other at all, since the destination's listing would take in the source (each run would
    copy into itself again, and sync --delete would remove source keys)."""
    if src_bucket != dst_bucket:
        return
    for s_key, d_key in pairs:
        if s_key == d_key:
            raise _UsageError(
                "Cannot %s a file onto itself: 's3://%s/%s' - 's3://%s/%s'"
                % (command, src_bucket, s_key, dst_bucket, d_key)
            )
    if prefixes is not None and (
        prefixes[0].startswith(prefixes[1]) or prefixes[1].startswith(prefixes[0])
    ):
        raise _UsageError(
            "Cannot %s s3://%s/%s to s3://%s/%s: one prefix holds the other; nothing was changed"
            % (command, src_bucket, prefixes[0], dst_bucket, prefixes[1])
        )
    sources = {s_key for s_key, _ in pairs}
    for s_key, d_key in pairs:
        if d_key in sources:
            raise _UsageError(
                "Cannot %s s3://%s/%s to s3://%s/%s: the destination is also a source of this "
                "%s (the prefixes overlap); nothing was changed"
                % (command, src_bucket, s_key, dst_bucket, d_key, command)
            )


def _one_line(e: BaseException) -> str:
    """An error as one line for the CLI: every line of its text, whitespace folded
    (a ParamValidationError's reason is on its second line)."""
    if isinstance(e, (DeltaGliderError, OSError, ValueError)):
        text = str(e)
        if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
            text += ": %s" % e.filename
    else:
        text = "%s: %s" % (type(e).__name__, e)
    text = " ".join(text.split())
    if isinstance(e, NoCredentialsError):
        text += (
            ". Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, use --profile, "
            "or --no-sign-request for public buckets."
        )
    if isinstance(e, ClientError) and e.response["Error"].get("Code") == "RequestTimeTooSkewed":
        text += " (check this machine's clock: it differs too much from the server's)"
    return text if len(text) <= 1000 else text[:1000] + "..."


def _logical_mtime(lg: _Logical) -> float | None:
    recorded = _mtime_or_absent(lg.metadata.get("dg-mtime"))
    if recorded is not None:
        return recorded
    modified = lg.head.get("LastModified")
    return modified.timestamp() if isinstance(modified, datetime.datetime) else None


def _json_text(obj: Any) -> str:
    """``obj`` as the CLI prints JSON (verify, purge, stats, get-bucket-acl): indented."""
    import json

    return json.dumps(obj, indent=2) + "\n"


def _json_value(text: str) -> Any:
    """A JSON command-line value (--access-control-policy)."""
    import json

    return json.loads(text)


def _metadata_arg(text: str) -> dict[str, str]:
    """``--metadata k=v,k2=v2`` or a JSON object, as aws s3 takes it."""
    import json

    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("--metadata JSON must be an object")
        return {str(k): str(v) for k, v in value.items()}
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError("--metadata takes key=value pairs: %r" % part)
        k, v = part.split("=", 1)
        out[k.strip()] = v
    return out


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() returns the exit code."""

    #: Where --help and --version go: the stream main() was given (the command's parser
    #: gets the main parser's).
    dg_out: IO[str] | None = None

    def error(self, message: str) -> Any:
        raise _UsageError("%s: error: %s" % (self.prog, message))

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        if message:
            raise _UsageError(message.strip())
        raise _ExitNow(status)

    def _print_message(self, message: str, file: Any = None) -> None:
        # --help and --version go to the stream main() was given, not sys.stdout.
        if message:
            (self.dg_out or sys.stdout).write(message)


class _ExitNow(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _option(parse: Callable[..., Any], option: str, **limits: Any) -> Callable[[str], Any]:
    """An argparse ``type`` from a settings parser: a bad value is a usage error that names
    the option and what it accepts (argparse's own "invalid int value" names neither)."""

    def convert(text: str) -> Any:
        try:
            return parse(text, option, **limits)
        except InvalidConfigError as e:
            raise _UsageError("deltaglider: error: %s" % e) from None

    return convert


def _add_global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    d = argparse.SUPPRESS if suppress else None
    g = p.add_argument_group("global options")
    g.add_argument(
        "--endpoint-url", default=d, help="S3 endpoint, or file:///path for a local directory store"
    )
    g.add_argument("--profile", default=d, help="profile from the shared AWS config files")
    g.add_argument("--region", default=d, help="AWS region")
    g.add_argument(
        "--no-verify-ssl",
        action="store_true",
        default=d if suppress else False,
        help="do not verify TLS certificates",
    )
    g.add_argument("--ca-bundle", default=d, help="CA bundle for TLS verification")
    g.add_argument(
        "--no-sign-request",
        action="store_true",
        default=d if suppress else False,
        help="anonymous requests (public buckets)",
    )
    g.add_argument(
        "--debug",
        action="store_true",
        default=d if suppress else False,
        help="log requests (secrets redacted)",
    )
    g.add_argument(
        "--memory-limit",
        type=_option(_parse_size, "--memory-limit", minimum=_MIN_MEMORY_LIMIT),
        default=d,
        metavar="SIZE",
        help="peak memory of deltaglider and its xdelta3 runs, e.g. 2G "
        "(default 600MB; DG_MEMORY_LIMIT)",
    )
    g.add_argument(
        "--max-concurrency",
        type=_option(_parse_int, "--max-concurrency", minimum=1),
        default=d,
        help="parallel transfers (default 10, and 64 more for files up to 1 MiB stored whole)",
    )
    g.add_argument(
        "--max-attempts",
        type=_option(_parse_int, "--max-attempts", minimum=1),
        default=d,
        help="attempts per request (default 3)",
    )
    g.add_argument(
        "--cli-connect-timeout",
        type=_option(_parse_number, "--cli-connect-timeout", above=0),
        default=d if suppress else 60.0,
        help="seconds (default 60)",
    )
    g.add_argument(
        "--cli-read-timeout",
        type=_option(_parse_number, "--cli-read-timeout", above=0),
        default=d if suppress else 60.0,
        help="seconds (default 60)",
    )
    g.add_argument(
        "--cli-request-timeout",
        type=_option(_parse_number, "--cli-request-timeout", above=0),
        default=d if suppress else _DEFAULT_REQUEST_TIMEOUT,
        help="seconds a reply may take to send its headers, or each MiB of its body, however"
        " slowly the bytes trickle in (default %d)" % _DEFAULT_REQUEST_TIMEOUT,
    )


_SERVE_EPILOG = """\
Point S3 clients at it (the gateway's key pair, not the back end's):

  export DG_GATEWAY_ACCESS_KEY_ID=gw-key DG_GATEWAY_SECRET_ACCESS_KEY=gw-secret
  python deltaglider.py --endpoint-url file:///srv/artifacts serve --listen 127.0.0.1:8333

  AWS_ACCESS_KEY_ID=gw-key AWS_SECRET_ACCESS_KEY=gw-secret AWS_DEFAULT_REGION=us-east-1 \\
    aws --endpoint-url http://127.0.0.1:8333 s3 cp build-1.3.zip s3://releases/v1/

  rclone: a remote with type = s3, provider = Other, endpoint = http://127.0.0.1:8333,
  access_key_id = gw-key, secret_access_key = gw-secret, force_path_style = true;
  or on the command line:
  rclone copy ./dist \\
    ":s3,provider=Other,endpoint='http://127.0.0.1:8333',access_key_id=gw-key,secret_access_key=gw-secret,force_path_style=true:releases/v1"

GET /metrics (signed like any request, or on --metrics-listen without auth) is in
Prometheus text format. One access line per request goes to stderr (--quiet: none).
"""


if TYPE_CHECKING:
    _SubParsersAction = argparse._SubParsersAction[_ArgumentParser]
else:
    _SubParsersAction = argparse._SubParsersAction


class _CommandParsers(_SubParsersAction):
    """COMMAND: --help lists the commands from their help lines, and a command's parser is
    made when that command is parsed (argparse takes longer to build 16 parsers with their
    options than Python takes to start, and a run parses one command)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dg_commands: dict[str, _Command] = {}
        # What argparse checks a command name against (its parsers, here their commands).
        self.choices = cast("dict[str, Any]", self.dg_commands)

    def add_command(self, name: str, command: _Command) -> None:
        # The line add_parser(name, help=...) would add to --help, without the parser.
        self._choices_actions.append(self._ChoicesPseudoAction(name, (), command.help))
        self.dg_commands[name] = command

    def command_parser(self, name: str) -> _ArgumentParser:
        """``name``'s parser (made once): the command's options, and the global options
        again (after the command, as aws takes them)."""
        made = self._name_parser_map.get(name)
        if made is None:
            command = self.dg_commands[name]
            # ls takes -h for --human-readable, as aws s3 ls does; --help still works.
            made = _ArgumentParser(
                prog="%s %s" % (self._prog_prefix, name),
                description=command.help,
                add_help=name != "ls",
            )
            if name == "ls":
                made.add_argument("--help", action="help", help="show this help message and exit")
            _add_global_options(made, suppress=True)
            command.arguments(made)
            self._name_parser_map[name] = made
        return made

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if values and values[0] in self.dg_commands:
            self.command_parser(values[0]).dg_out = getattr(parser, "dg_out", None)
        super().__call__(parser, namespace, values, option_string)


def _add_transfer_options(p: argparse.ArgumentParser, recursive: bool = True) -> None:
    """The options every transfer command takes (cp, mv, sync, migrate): filters, output,
    upload headers, how files are stored, symlinks."""
    if recursive:
        p.add_argument(
            "-r",
            "--recursive",
            action="store_true",
            help="all keys under a prefix / files under a folder",
        )
    p.add_argument(
        "--exclude",
        action=_FilterAction,
        dest="exclude",
        metavar="PATTERN",
        help="skip matching paths (repeatable)",
    )
    p.add_argument(
        "--include",
        action=_FilterAction,
        dest="include",
        metavar="PATTERN",
        help="keep matching paths (repeatable; last match wins)",
    )
    p.add_argument("--dryrun", action="store_true", help="show what would happen")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.add_argument("--only-show-errors", action="store_true", help="print errors and warnings only")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--content-type", help="Content-Type for uploads")
    p.add_argument("--cache-control", help="Cache-Control for uploads")
    p.add_argument("--content-disposition", help="Content-Disposition for uploads")
    p.add_argument("--acl", help="canned ACL for uploads")
    p.add_argument("--metadata", type=_metadata_arg, help="user metadata: k=v,k2=v2 or JSON")
    p.add_argument("--storage-class", help="S3 storage class for uploads")
    p.add_argument("--no-delta", action="store_true", help="store files whole, never as deltas")
    p.add_argument(
        "--archive-aware",
        action="store_true",
        help="delta zip-family files (wheel, jar, apk...) member by member, inflated "
        "(DG_ARCHIVE_AWARE=1)",
    )
    p.add_argument(
        "--references",
        choices=(_REFERENCES_SHARED, _REFERENCES_FOLDER),
        help="shared: delta against references in sibling folders too (default); "
        "folder: one reference per folder, as deltaglider_proxy reads (DG_REFERENCES)",
    )
    p.add_argument(
        "--max-ratio",
        type=_option(_parse_number, "--max-ratio", minimum=0.0, maximum=1.0),
        help="largest delta worth storing, as a fraction of the file (default 0.5)",
    )
    p.add_argument(
        "--no-follow-symlinks", action="store_true", help="skip symlinks in local folders"
    )
    p.add_argument(
        "--follow-symlinks",
        dest="no_follow_symlinks",
        action="store_false",
        default=False,
        help="follow symlinks in local folders (the default, as aws s3)",
    )


def _add_cp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a local file or folder, or s3://bucket/key (- for stdin)")
    p.add_argument("dest", help="a local path or s3://bucket/key (- for stdout)")
    _add_transfer_options(p)


def _add_mv_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a local file or folder, or s3://bucket/key")
    p.add_argument("dest", help="a local path or s3://bucket/key")
    _add_transfer_options(p)


def _add_sync_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a local folder or s3://bucket/prefix/")
    p.add_argument("dest", help="a local folder or s3://bucket/prefix/")
    _add_transfer_options(p, recursive=False)
    p.add_argument(
        "--delete", action="store_true", help="delete destination files missing from the source"
    )
    p.add_argument("--size-only", action="store_true", help="compare sizes only")
    p.add_argument(
        "--exact-timestamps", action="store_true", help="downloads: re-fetch unless times are equal"
    )


def _add_ls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default="", help="s3://bucket/prefix (none: the buckets)")
    p.add_argument(
        "-r", "--recursive", action="store_true", help="every key under the prefix, not one level"
    )
    p.add_argument(
        "-h", "--human-readable", action="store_true", help="sizes in KiB, MiB, GiB, ..."
    )
    p.add_argument("--summarize", action="store_true", help="end with the object count and size")
    p.add_argument(
        "--original-sizes",
        action="store_true",
        help="show delta-stored files at their original size (one HEAD per delta, in "
        "parallel), not the bytes stored",
    )


def _add_rm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="s3://bucket/key, or a prefix with --recursive")
    p.add_argument(
        "-r", "--recursive", action="store_true", help="delete every key under the prefix"
    )
    p.add_argument(
        "--exclude",
        action=_FilterAction,
        dest="exclude",
        metavar="PATTERN",
        help="do not delete matching keys (repeatable)",
    )
    p.add_argument(
        "--include",
        action=_FilterAction,
        dest="include",
        metavar="PATTERN",
        help="delete matching keys even if excluded before (repeatable; last match wins)",
    )
    p.add_argument("--dryrun", action="store_true", help="show what would be deleted")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.add_argument("--only-show-errors", action="store_true", help="print errors and warnings only")


def _add_mb_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="s3://bucket")


def _add_rb_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="s3://bucket")
    p.add_argument("--force", action="store_true", help="delete every object first")


def _add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="s3://bucket/key")


def _add_presign_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="s3://bucket/key")
    p.add_argument(
        "--expires-in",
        type=_option(_parse_int, "--expires-in", minimum=1, maximum=604800),
        default=3600,
        help="seconds, 1 to 604800 (default 3600)",
    )


def _add_purge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="BUCKET", help="bucket name or s3://bucket")


def _add_gc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="S3_URL", help="s3://bucket/prefix/")
    p.add_argument("--dryrun", action="store_true", help="show what would be deleted")


def _add_stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bucket", help="bucket name or s3://bucket")
    p.add_argument("--sampled", action="store_true", help="read one delta per folder")
    p.add_argument("--detailed", action="store_true", help="read every delta's size")
    p.add_argument("--refresh", action="store_true", help="recompute, ignoring the cache")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_migrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="s3://bucket/prefix/ to copy from (any tool's layout)")
    p.add_argument("dest", help="s3://bucket/prefix/ to write in the delta layout")
    _add_transfer_options(p, recursive=False)
    p.add_argument("--source-endpoint-url", help="the source's endpoint, when it is another S3")
    p.add_argument("--source-profile", help="profile for the source")


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _SERVE_EPILOG
    p.add_argument(
        "--listen", default="127.0.0.1:8333", help="HOST:PORT to serve on (default %(default)s)"
    )
    p.add_argument(
        "--users",
        metavar="FILE",
        help="ACCESS_KEY_ID:SECRET_ACCESS_KEY lines (default: one key pair from "
        "DG_GATEWAY_ACCESS_KEY_ID and DG_GATEWAY_SECRET_ACCESS_KEY)",
    )
    p.add_argument(
        "--domain", help="also serve virtual-hosted style: BUCKET.DOMAIN is bucket BUCKET"
    )
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate chain")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument(
        "--workers",
        type=_option(_parse_int, "--workers", minimum=1),
        default=64,
        help="requests served at once (default 64); a connection waiting for one holds none",
    )
    p.add_argument(
        "--idle-timeout",
        type=_option(_parse_number, "--idle-timeout", above=0),
        default=60.0,
        help="seconds a connection may stay silent (default 60); from its first byte, a"
        " request line and headers have %g seconds in all" % _GATEWAY_HEADER_TIMEOUT,
    )
    p.add_argument(
        "--request-timeout",
        type=_option(_parse_number, "--request-timeout", above=0),
        default=3600.0,
        help="most seconds a request body may take to arrive (default 3600); a smaller one"
        " gets --idle-timeout plus a second per %d KiB" % (_GATEWAY_MIN_BODY_RATE // 1024),
    )
    p.add_argument(
        "--grace",
        type=_option(_parse_number, "--grace", minimum=0),
        default=30.0,
        help="seconds requests in flight get to finish on Ctrl-C/SIGTERM (default 30)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="also serve GET /metrics there, without authentication (for Prometheus)",
    )
    p.add_argument(
        "--state-dir", help="spooled uploads and multipart parts (default: DG_CACHE_DIR/gateway)"
    )
    p.add_argument(
        "--archive-aware",
        action="store_true",
        help="delta zip-family files member by member (DG_ARCHIVE_AWARE=1)",
    )
    p.add_argument(
        "--max-ratio",
        type=_option(_parse_number, "--max-ratio", minimum=0.0, maximum=1.0),
        help="largest delta worth storing (default 0.5)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no access log on stderr: only the line that says where it listens",
    )


def _add_get_bucket_acl_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bucket", help="bucket name or s3://bucket")


def _add_put_bucket_acl_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bucket", help="bucket name or s3://bucket")
    p.add_argument(
        "--acl", help="canned ACL: private, public-read, public-read-write, authenticated-read"
    )
    grantee = "grantees as type=value pairs, e.g. id=CANONICAL-ID or uri=GROUP-URI"
    p.add_argument("--grant-full-control", metavar="GRANTEES", help="full control: " + grantee)
    p.add_argument("--grant-read", metavar="GRANTEES", help="list the objects: " + grantee)
    p.add_argument("--grant-read-acp", metavar="GRANTEES", help="read the ACL: " + grantee)
    p.add_argument("--grant-write", metavar="GRANTEES", help="write objects: " + grantee)
    p.add_argument("--grant-write-acp", metavar="GRANTEES", help="write the ACL: " + grantee)
    p.add_argument(
        "--access-control-policy", metavar="JSON", help="a whole AccessControlPolicy, as JSON"
    )


class _Command(NamedTuple):
    """A CLI command: its one-line help, what adds its arguments, what runs it."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[_Cli], int]


# The commands, in the order --help lists them.
_COMMANDS: dict[str, _Command] = {
    "cp": _Command("copy files to, from or between S3 locations", _add_cp_arguments, _Cli.cmd_cp),
    "mv": _Command(
        "move files to, from or between S3 locations",
        _add_mv_arguments,
        lambda cli: cli.cmd_cp(move=True),
    ),
    "sync": _Command(
        "make a destination folder or prefix match the source",
        _add_sync_arguments,
        _Cli.cmd_sync,
    ),
    "ls": _Command(
        "list buckets, or objects under a prefix (logical sizes)",
        _add_ls_arguments,
        _Cli.cmd_ls,
    ),
    "rm": _Command(
        "delete objects (references are removed with their last delta)",
        _add_rm_arguments,
        _Cli.cmd_rm,
    ),
    "mb": _Command("make a bucket", _add_mb_arguments, _Cli.cmd_mb),
    "rb": _Command("remove a bucket", _add_rb_arguments, _Cli.cmd_rb),
    "verify": _Command(
        "rebuild an object and check its SHA-256",
        _add_verify_arguments,
        _Cli.cmd_verify,
    ),
    "presign": _Command(
        "a presigned GET URL (delta-stored objects are served rebuilt)",
        _add_presign_arguments,
        _Cli.cmd_presign,
    ),
    "purge": _Command(
        "delete expired rebuilt copies under .deltaglider/tmp/",
        _add_purge_arguments,
        _Cli.cmd_purge,
    ),
    "gc": _Command(
        "delete the references under a prefix that no delta needs any more",
        _add_gc_arguments,
        _Cli.cmd_gc,
    ),
    "stats": _Command(
        "what a bucket holds and what deltas save",
        _add_stats_arguments,
        _Cli.cmd_stats,
    ),
    "migrate": _Command(
        "copy a bucket or prefix into the delta layout (resumable)",
        _add_migrate_arguments,
        _Cli.cmd_migrate,
    ),
    "serve": _Command(
        "run an S3 gateway: any S3 client (aws-cli, rclone, boto3) stores deltas through it",
        _add_serve_arguments,
        _cmd_serve,
    ),
    "get-bucket-acl": _Command(
        "print a bucket's ACL as JSON",
        _add_get_bucket_acl_arguments,
        _Cli.cmd_get_bucket_acl,
    ),
    "put-bucket-acl": _Command(
        "set a bucket's ACL", _add_put_bucket_acl_arguments, _Cli.cmd_put_bucket_acl
    ),
}


def _build_parser() -> _ArgumentParser:
    parser = _ArgumentParser(
        prog="deltaglider",
        description="Store versioned artifacts in S3 as xdelta3 deltas; aws s3 style commands.",
    )
    parser.add_argument("--version", action="version", version="deltaglider %s" % __version__)
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=_CommandParsers)
    for name, command in _COMMANDS.items():
        cast(_CommandParsers, sub).add_command(name, command)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command's parser, made."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, _CommandParsers):
            found.extend(action.command_parser(name) for name in action.dg_commands)
    return found


class _RedactingFilter(logging.Filter):
    """--debug logs requests; signatures, tokens and secrets never reach the log."""

    _PATTERNS = (
        (r"(?i)(Signature=)[0-9a-f]+", r"\1<redacted>"),
        (r"(?i)(X-Amz-Signature=)[0-9a-f]+", r"\1<redacted>"),
        (r"(?i)(x-amz-security-token[:=]\s*)\S+", r"\1<redacted>"),
        (r"(?i)(X-Amz-Security-Token=)[^&\s]+", r"\1<redacted>"),
    )

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s and len(s) >= 4]

    def _redact(self, text: str) -> str:
        for pattern, repl in self._PATTERNS:
            text = re.sub(pattern, repl, text)
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self._redact(record.getMessage()), None
        if record.exc_info:  # the traceback too: the formatter then uses exc_text as is
            record.exc_text = self._redact(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = self._redact(record.stack_info)
        return True


def _debug_log(err: IO[str], env: Mapping[str, str]) -> logging.Handler:
    """--debug: the module's log on ``err``, the secret key and session token redacted;
    main() removes the handler when the command ends."""
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    secrets = [
        env.get(name, "").strip()
        for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
    ]
    handler.addFilter(_RedactingFilter(secrets))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return handler


def main(
    argv: list[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The command line: parses ``argv``, prints to the given streams, returns the exit
    code (0 ok, 1 a transfer or command failed, 2 usage or skipped files, 130 Ctrl-C)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    env = os.environ if environ is None else environ
    parser = _build_parser()
    parser.dg_out = out
    try:
        args = parser.parse_args(argv)
    except _ExitNow as e:
        return e.status
    except _UsageError as e:
        err.write(parser.format_usage())
        err.write(_printable(str(e)) + "\n")
        return EXIT_USAGE
    if not args.command:
        err.write(parser.format_usage())
        err.write("deltaglider: error: a command is needed (cp, ls, rm, sync, ...)\n")
        return EXIT_USAGE
    try:
        _check_settings(env)  # a bad DG_* value stops every command before it starts
    except InvalidConfigError as e:
        err.write("deltaglider: error: %s\n" % e)
        return EXIT_USAGE
    import signal

    handler = _debug_log(err, env) if args.debug else None
    cli = _Cli(args, out, err, env)
    previous: Any = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, cli.on_sigint)
    try:
        return int(_COMMANDS[args.command].run(cli))
    except KeyboardInterrupt:
        err.write("cancelled: ctrl-c received\n")
        return EXIT_INTERRUPTED
    except _Cancelled:
        err.write("cancelled: ctrl-c received\n")
        return EXIT_INTERRUPTED
    except _UsageError as e:
        err.write(_printable(str(e)) + "\n")
        return EXIT_USAGE
    except (DeltaGliderError, OSError, ValueError) as e:
        if args.debug:
            logger.exception("fatal error")
        message = _printable(_one_line(e))
        if isinstance(e, _FatalError):
            err.write(message + "\n")
        else:
            err.write("fatal error: %s\n" % message)
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        cli.close()
        if handler is not None:
            logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
