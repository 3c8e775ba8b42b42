"""Download a CSV manifest of image URLs into a dataset: ``handlens import-urls`` (also a job kind).

The manifest has a header row ``url,label[,labelset][,group][,license][,attribution]``. Each URL is
downloaded on a pool of threads, at most ``per_host`` at a time per host, into ``<dest>/<key>.part``;
failures back off exponentially with full jitter and honour ``Retry-After``; a cut-short body resumes with
``Range`` on the next attempt (or the next run). A complete file is validated as ``import`` validates it
(:func:`handlens.data.imaging.probe_image`), renamed to a content-addressed name
(``<sha256[:16]>.<ext of its format>``), deduplicated by SHA-256 against the dataset's images, and imported
through :func:`handlens.data.importer.import_entries`, so labels and groups are recorded as ``import``
records them.

Every manifest URL has a row in the catalog's ``url_items`` ledger (status, attempts, last error, HTTP code,
bytes, SHA-256, file): a rerun requests only what is still pending, ``retry_failed`` also what failed, and
nothing that was refused (not an image, a redirect that leaves the original host's address class, over the
size limit; refusals by the licence filter or by ``public_only`` are decided again each run, as those settings
may change). ``<dest>/ATTRIBUTION.csv`` lists file, URL, licence and attribution of every downloaded image.

Addresses (server-side request forgery): a redirect is followed only when every address of its host is in the
one address class all of the original host's addresses share (:func:`address_class`; ``0.0.0.0/8`` and ``::``
count as loopback, IPv6 forms that embed an IPv4 address take its class). With ``public_only`` (jobs submitted
over the API) every hop, the first included, is refused unless every address its host resolves to is public.

Slow servers: ``timeout`` bounds the connect and each socket read, and ``attempt_deadline`` bounds a whole
attempt (redirects, headers and body), so a server that trickles bytes cannot hold a download for ever; a cancel
cuts the connections in flight at once. Both keep the ``.part`` for a ``Range`` resume.

Only the standard library speaks HTTP here (``http.client`` on ``concurrent.futures`` threads). Proxies
from the environment are not used, and a connection goes to the address that was checked, never to a
second DNS answer.
"""

from __future__ import annotations

import contextlib
import csv
import email.utils
import errno
import hashlib
import http.client
import io
import ipaddress
import os
import random
import re
import socket
import ssl
import threading
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import insert, select, update

from handlens.core.errors import DiskFullError, HandlensError, InputError
from handlens.core.workspace import Workspace
from handlens.data.catalog import Catalog, Dataset, Image, UrlItem, open_catalog
from handlens.data.catalog.schema import utcnow
from handlens.data.imaging import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, Reason, probe_image
from handlens.data.importer import (
    DEFAULT_LABELSET,
    MAX_NAME_LENGTH,
    Entry,
    Skipped,
    _class_counts,
    _csv_rows,
    _manifest_text,
    import_entries,
)

PENDING, DOWNLOADED, DUPLICATE, FAILED, REFUSED = "pending", "downloaded", "duplicate", "failed", "refused"
URL_STATUSES = (PENDING, DOWNLOADED, DUPLICATE, FAILED, REFUSED)
#: a worker's outcomes that are not ledger statuses: a valid file not yet in the catalog, a stopped download
_VALIDATED, _STOPPED = "validated", "stopped"

MAX_REDIRECTS = 5
#: the longest exponential backoff between two attempts, seconds (before jitter)
BACKOFF_CAP = 30.0
CHUNK = 1 << 16
DEFAULT_MAX_BYTES = 100_000_000
ATTRIBUTION_FILE = "ATTRIBUTION.csv"
#: ``last_error`` of a row the licence filter refused: re-decided on every run (the filter may change)
LICENCE_PREFIX = "licence filter: "
#: ``last_error`` of a row refused by ``public_only``: re-decided on every run (an operator may allow private ones)
PUBLIC_ONLY_PREFIX = "public_only: "
PUBLIC_ONLY_HINT = ("jobs submitted over the API fetch public addresses only; an operator can allow private ones with "
                    "`handlens serve --allow-private-urls`")
#: files imported into the catalog per call of the importer, and the longest wait before one
IMPORT_BATCH, IMPORT_SECONDS = 100, 5.0
#: ledger rows written per transaction, and the longest wait before one
LEDGER_BATCH, LEDGER_SECONDS = 50, 1.0
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
#: answers worth another attempt: a timeout, too many requests, the server's own trouble
RETRY_CODES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: file extension per format as Pillow names it from the content
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp", "WEBP": "webp",
              "GIF": "gif", "PPM": "ppm"}
MANIFEST_COLUMNS = "url,label[,labelset][,group][,license][,attribution]"
#: a labelset name: a letter or digit first, then letters, digits, spaces and ``_ . - + ( )``
_LABELSET_NAME = re.compile(r"\w[\w .+()-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: held around every probe of a run (the workers' and the importer's): ``probe_image`` sets Pillow's pixel limit
#: and the warning filters for the duration of a decode, process-wide state that two threads would corrupt
_PROBE_LOCK = threading.Lock()
ProgressCallback = Callable[[int, int], None]
StopCheck = Callable[[], str | None]


class UrlReason:
    """Why a manifest row was not downloaded this run. Stable strings: they appear in ``--json`` reports."""

    BAD_ROW = Reason.BAD_ROW
    REPEATED_URL = "repeated_url"
    CAPPED = "max_per_class"
    LICENCE = "licence_filtered"
    DUPLICATE = "duplicate"
    REDIRECT = "redirect_refused"
    NOT_PUBLIC = "not_public"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    TOO_LARGE = "too_large"
    HTTP = "http_error"
    NETWORK = "network_error"
    LOCAL = "local_error"


def labelset_problem(name: str) -> str | None:
    """Why ``name`` cannot be a labelset name, or None."""
    if len(name) > MAX_NAME_LENGTH:
        return f"labelset name is {len(name):,} characters long; at most {MAX_NAME_LENGTH} are allowed"
    if not _LABELSET_NAME.fullmatch(name) or name != name.strip():
        return (f"labelset name {name!r} is not allowed: use letters, digits, spaces and _ . - + ( ), starting "
                "with a letter or digit (e.g. 'dunham')")
    return None


class UrlImportConfig(BaseModel):
    """What ``handlens import-urls`` (or an ``import-urls`` job) downloads, where, and how politely."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(description=f"CSV manifest: {MANIFEST_COLUMNS}; a relative path is read from the "
                                      "current directory")
    dataset: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, description="dataset (created if new)")
    labelset: str = Field(DEFAULT_LABELSET, description="labelset of rows without a labelset column")
    concurrency: int = Field(8, ge=1, le=64, description="downloads at once, all hosts together")
    per_host: int = Field(2, ge=1, le=64, description="downloads at once from one host")
    retry_failed: bool = Field(False, description="also try again the URLs that failed in an earlier run")
    min_per_class: int | None = Field(None, ge=1, description="warn about classes with fewer images after the run")
    max_per_class: int | None = Field(None, ge=1, description="download at most this many images per class, "
                                                              "in manifest order")
    license_filter: str | None = Field(None, description="regular expression the licence column must match "
                                                         "(searched); other rows are refused")
    dest: str | None = Field(None, description="folder for the files (default <workspace>/downloads/<dataset>); "
                                               "a relative path lies in the workspace")
    timeout: float = Field(30.0, gt=0, le=600, description="seconds to connect, and for each read")
    attempt_deadline: float = Field(600.0, gt=0, le=86_400,
                                    description="seconds one attempt may take in all (redirects, headers, body): a "
                                                "server that trickles bytes fails the attempt there; it is retried "
                                                "and resumes the bytes received with Range")
    public_only: bool = Field(False, description="refuse every URL and redirect whose host resolves to any "
                                                 "non-public address: loopback, private, link-local, unspecified, "
                                                 "multicast, reserved, and IPv6 forms embedding such an IPv4")
    retries: int = Field(5, ge=1, le=20, description="attempts per URL per run")
    backoff: float = Field(0.5, ge=0, le=60, description="base of the exponential backoff, seconds")
    retry_after_cap: float = Field(60.0, ge=0, le=3600, description="longest Retry-After honoured, seconds")
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="largest file downloaded, bytes")
    min_side: int = Field(DEFAULT_MIN_SIDE, ge=1, description="refuse images whose shorter side is below this")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="refuse images above this many pixels")

    @field_validator("license_filter")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"--license-filter {value!r} is not a valid regular expression ({exc}); "
                                 "e.g. '^CC' or 'CC-BY|CC0'") from None
        return value

    @field_validator("labelset")
    @classmethod
    def _valid_labelset(cls, value: str) -> str:
        problem = labelset_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _min_below_max(self) -> UrlImportConfig:
        if self.min_per_class is not None and self.max_per_class is not None and \
                self.min_per_class > self.max_per_class:
            raise ValueError(f"--min-per-class {self.min_per_class} exceeds --max-per-class {self.max_per_class}; "
                             "no class could reach it")
        return self


def make_config(**values: Any) -> UrlImportConfig:
    """A :class:`UrlImportConfig` from keyword values (None means the default); a bad value is an InputError."""
    try:
        return UrlImportConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                             for err in exc.errors()[:8])
        raise InputError(f"bad import-urls settings: {problems}") from None


@dataclass
class UrlImportReport:
    """What one run did. ``counts``: ledger status of every manifest URL after the run."""

    dataset: str
    manifest: str
    dest: str
    attribution: str = ""
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    #: URLs requested this run, validated files imported, images the catalog gained, relabelled images
    attempted: int = 0
    downloaded: int = 0
    added: int = 0
    relabelled: int = 0
    bytes: int = 0
    #: failed in an earlier run and left alone (pass retry_failed to try them again)
    failed_earlier: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    #: images in the dataset per labelset and class of the manifest (whatever their source)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    below_min: dict[str, dict[str, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    stop_reason: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.downloaded / self.seconds if self.seconds > 0 else 0.0

    @property
    def nothing_new(self) -> bool:
        return self.downloaded == 0 and self.added == 0 and self.relabelled == 0

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["images_per_second"] = round(self.images_per_second, 2)
        data["skipped_by_reason"] = self.skipped_by_reason()
        data["nothing_new"] = self.nothing_new
        return data


class ImportUrlsInterrupted(HandlensError):
    """A download run stopped (a cancel, Ctrl-C); the ledger keeps what was done, so a rerun continues."""

    exit_code = 130  # the shell's code for an interrupted command

    def __init__(self, message: str, *, report: UrlImportReport) -> None:
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class UrlRow:
    """One manifest row."""

    line: int
    url: str
    label: str
    labelset: str
    group: str | None = None
    license: str | None = None
    attribution: str | None = None


def read_url_manifest(manifest: Path, default_labelset: str = DEFAULT_LABELSET) -> tuple[list[UrlRow], list[Skipped]]:
    """The rows of a URL manifest, and the rows skipped with a reason (never an error for one bad row).

    A bad row: too many fields, no url or label, a scheme other than http/https, a bad labelset name, an
    overlong field, or a URL given again (the first row is kept). Only a manifest that cannot be read at
    all (not UTF-8 text, no header with url and label) raises :class:`InputError`.
    """
    reader = csv.reader(io.StringIO(_manifest_text(manifest), newline=""))
    skipped: list[Skipped] = []
    rows_iter = _csv_rows(reader, manifest, skipped)
    columns = _url_columns(manifest, next(rows_iter, None), skipped)
    rows: list[UrlRow] = []
    seen: dict[str, UrlRow] = {}
    for line_no, fields in rows_iter:
        row, problem = _url_row(line_no, fields, columns, manifest=manifest, default_labelset=default_labelset)
        if row is not None and row.url in seen:
            first = seen[row.url]
            other = "" if (first.labelset, first.label) == (row.labelset, row.label) else \
                f" with label {row.label!r} (row {first.line} gave {first.label!r})"
            problem = Skipped(row.url, UrlReason.REPEATED_URL,
                              f"row {line_no} repeats the URL of row {first.line}{other}; kept the first")
        if problem is not None:
            skipped.append(problem)
            continue
        assert row is not None
        seen[row.url] = row
        rows.append(row)
    return rows, skipped


def _url_columns(manifest: Path, header: tuple[int, list[str]] | None, skipped: list[Skipped]) -> list[str]:
    expected = f"expected a header row: {MANIFEST_COLUMNS}"
    if skipped:
        raise InputError(f"the header of manifest {manifest} cannot be read ({skipped[0].detail}); {expected}")
    if header is None:
        raise InputError(f"manifest {manifest} is empty; {expected}, then one row per image")
    columns = [c.strip().lower() for c in header[1]]
    missing = {"url", "label"} - set(columns)
    if missing:
        raise InputError(f"manifest {manifest} lacks column(s) {', '.join(sorted(missing))}; {expected}")
    return columns


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be downloaded (not http/https, no host, a bad port, spaces), or None."""
    if _CONTROL.search(url) or " " in url:
        return "it holds spaces or control characters; percent-encode them (%20)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        return f"it cannot be parsed ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return f"its scheme is {parts.scheme or '(none)'!r}; only http:// and https:// URLs are downloaded"
    if not parts.hostname:
        return "it names no host"
    return None


def _url_row(line_no: int, fields: list[str], columns: list[str], *, manifest: Path,
             default_labelset: str) -> tuple[UrlRow | None, Skipped | None]:
    """One manifest row, or why it is skipped."""
    where = f"{manifest}:{line_no}"
    if len(fields) > len(columns):
        return None, Skipped(where, UrlReason.BAD_ROW, f"row {line_no} has {len(fields)} fields but the header has "
                                                       f"{len(columns)}; quote a field that holds a comma")
    row = dict(zip(columns, (f.strip() for f in fields), strict=False))
    url, label = row.get("url", ""), row.get("label", "")
    labelset = row.get("labelset") or default_labelset
    if not url or not label:
        return None, Skipped(url or where, UrlReason.BAD_ROW, f"row {line_no} needs both url and label")
    problem = url_problem(url)
    if problem is None:
        problem = labelset_problem(labelset)
    for name in ("label", "group"):
        value = row.get(name, "")
        if problem is None and (len(value) > MAX_NAME_LENGTH or _CONTROL.search(value)):
            problem = f"its {name} is longer than {MAX_NAME_LENGTH} characters or holds control characters"
    if problem is not None:
        return None, Skipped(url, UrlReason.BAD_ROW, f"row {line_no}: {problem}")
    return UrlRow(line_no, url, label, labelset, row.get("group") or None, row.get("license") or None,
                  row.get("attribution") or None), None


# --------------------------------------------------------------------------- addresses and connections


#: IPv6 prefixes whose last 32 bits are the IPv4 address a packet reaches: IPv4-mapped, IPv4-translated (SIIT),
#: the well-known NAT64 prefix
_EMBEDDING_96 = tuple(ipaddress.IPv6Network(net) for net in ("::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96"))
#: IPv4-compatible ``::a.b.c.d`` (deprecated, still routed by some stacks); ``::`` and ``::1`` are not embeddings
_COMPATIBLE = ipaddress.IPv6Network("::/96")
#: local-use NAT64 (RFC 8215): where the IPv4 address sits depends on the operator's prefix, so never public
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
#: "this network": 0.0.0.0 connects to the host itself
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
#: the redirect rule's class of each non-public kind that is not itself a class
_CLASS_OF_KIND = {"unspecified": "loopback", "multicast": "private", "reserved": "private"}


def effective_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a connection to ``address`` reaches: the IPv4 address an IPv6 form embeds (IPv4-mapped
    ``::ffff:a.b.c.d``, IPv4-translated, IPv4-compatible ``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4
    ``2002::/16``), else the address itself (an IPv6 zone ``%eth0`` dropped)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not isinstance(ip, ipaddress.IPv6Address):
        return ip
    if any(ip in net for net in _EMBEDDING_96) or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip.sixtofour or ip


def address_kind(address: str) -> str:
    """``public``, or which kind of non-public address ``address`` reaches (embedded IPv4 forms unwrapped, see
    :func:`effective_address`): unspecified (``0.0.0.0/8``, ``::``), loopback, link-local, multicast, reserved or
    private (also documentation, shared and other ranges not globally reachable)."""
    ip = effective_address(address)
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip in _LOCAL_NAT64:
        return "private"
    if ip.is_reserved:
        return "reserved"
    return "public" if ip.is_global else "private"


def address_class(address: str) -> str:
    """loopback (also unspecified: ``0.0.0.0`` and ``::`` connect to this host), link-local, private (also
    multicast, reserved and documentation ranges) or public; an IPv6 form embedding an IPv4 address has its class."""
    kind = address_kind(address)
    return _CLASS_OF_KIND.get(kind, kind)


def resolve(host: str, port: int) -> tuple[str, ...]:
    """The addresses of ``host``: itself when an IP literal (no DNS), else what the resolver answers."""
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class _Target:
    url: str
    https: bool
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]

    @property
    def classes(self) -> frozenset[str]:
        return frozenset(address_class(a) for a in self.addresses)

    def not_public(self) -> str | None:
        """Why this host is not public (its first address that is not, and what that address is), or None."""
        for address in self.addresses:
            kind = address_kind(address)
            if kind != "public":
                where = self.host if _is_literal(self.host) else f"{self.host} resolves to {address}, which"
                return f"{where} is {kind}"
        return None


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _target(url: str) -> _Target:
    """Where ``url`` points, its host resolved (OSError when it cannot be); ``_Refuse`` for a non-HTTP URL."""
    problem = url_problem(url)
    if problem is not None:
        raise _Refuse(f"cannot follow {url}: {problem}", reason=UrlReason.REDIRECT)
    parts = urlsplit(url)
    https = parts.scheme.lower() == "https"
    port = parts.port or (443 if https else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname or ""
    return _Target(url, https, host, port, path, resolve(host, port))


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to one checked address (the Host header still names the host)."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to one checked address; the certificate is checked against the host name."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def _user_agent() -> str:
    from importlib import metadata

    try:
        version = metadata.version("handlens")
    except metadata.PackageNotFoundError:
        version = "dev"
    return f"handlens-import-urls/{version} (+https://github.com/handlens)"


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (delta-seconds or an HTTP date), or None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


# --------------------------------------------------------------------------- downloading one URL


class _Retry(Exception):
    """This attempt failed in a way another attempt may not (a timeout, a 503, a cut-short body)."""

    def __init__(self, message: str, *, http_status: int | None = None, retry_after: float | None = None,
                 reason: str = UrlReason.NETWORK) -> None:
        super().__init__(message)
        self.http_status, self.retry_after, self.reason = http_status, retry_after, reason


class _Fail(Exception):
    """A failure another attempt now would repeat (404, too many redirects): failed, not retried this run."""

    def __init__(self, message: str, *, http_status: int | None = None, reason: str = UrlReason.HTTP) -> None:
        super().__init__(message)
        self.http_status, self.reason = http_status, reason


class _Refuse(_Fail):
    """Never to be downloaded (a redirect off the host's address class, too large): refused."""


class _Stopped(Exception):
    """The run is stopping: the download ends here, its ``.part`` kept for the next run."""


@dataclass
class _Item:
    """One URL to download this run, with what the ledger knew of it."""

    id: int
    url: str
    label: str
    labelset: str
    group: str | None
    attempts: int = 0
    path: str | None = None
    sha256: str | None = None
    bytes: int | None = None

    @property
    def key(self) -> str:
        return hashlib.sha256(self.url.encode("utf-8")).hexdigest()[:16]

    @property
    def host(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{parts.port or ''}"

    @property
    def label_key(self) -> tuple[str, str]:
        return self.labelset, self.label


@dataclass
class _Outcome:
    """What a worker made of one item: a status, the attempts it took, and the file when there is one."""

    item: _Item
    status: str
    attempts: int = 0
    http_status: int | None = None
    error: str | None = None
    reason: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    path: str | None = None
    image_id: int | None = None


class _Downloader:
    """Downloads, validates and deduplicates one item at a time; safe to call from many threads."""

    def __init__(self, config: UrlImportConfig, dest: Path, *, stop: threading.Event,
                 known: dict[str, tuple[int | None, str]]) -> None:
        self.config, self.dest, self.stop = config, dest, stop
        self.known = known  # sha256 -> (image id or None while not imported, path)
        self.lock = threading.Lock()
        #: the sockets of the attempts in flight, with their deadlines: id -> (socket, deadline)
        self.sockets: dict[int, tuple[socket.socket, float]] = {}
        self.user_agent = _user_agent()

    def run(self, item: _Item) -> _Outcome:
        """Up to ``config.retries`` attempts, then the validated file (or why there is none)."""
        part = self.dest / f"{item.key}.part"
        outcome = _Outcome(item, FAILED)
        for attempt in range(1, self.config.retries + 1):
            if self.stop.is_set():
                outcome.status = _STOPPED
                return outcome
            outcome.attempts = attempt
            try:
                outcome.http_status = self._fetch(item.url, part)
            except _Retry as exc:
                outcome.http_status, outcome.error, outcome.reason = exc.http_status, str(exc), exc.reason
                if attempt == self.config.retries:
                    outcome.error = f"{exc} (gave up after {attempt} attempts)"
                    return outcome
                if self.stop.wait(self._delay(attempt, exc.retry_after)):
                    outcome.status = _STOPPED
                    return outcome
                continue
            except _Fail as exc:
                outcome.status = REFUSED if isinstance(exc, _Refuse) else FAILED
                outcome.http_status, outcome.error, outcome.reason = exc.http_status, str(exc), exc.reason
                if outcome.status == REFUSED:
                    _remove(part)
                return outcome
            except _Stopped:
                outcome.status = _STOPPED
                return outcome
            try:
                return self._validate(outcome, part)
            except _Fail as exc:  # the file could not be renamed
                outcome.status, outcome.error, outcome.reason = FAILED, str(exc), exc.reason
                return outcome
        return outcome

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Retry-After when the server gave one (capped), else full jitter over an exponential backoff."""
        if retry_after is not None:
            return min(retry_after, self.config.retry_after_cap)
        return random.uniform(0, min(BACKOFF_CAP, self.config.backoff * 2 ** (attempt - 1)))

    def _fetch(self, url: str, part: Path) -> int:
        """Download ``url`` into ``part`` (resuming it) within one ``attempt_deadline``, following redirects whose
        host's every address is in the original host's one address class; the final HTTP status. With
        ``public_only`` every hop, the first included, must resolve to public addresses only."""
        deadline = time.monotonic() + self.config.attempt_deadline
        try:
            origin = _target(url)
        except OSError as exc:
            raise _Retry(f"cannot resolve the host of {url}: {exc}") from None
        self._check_public(origin, status=None, redirected_from=None)
        # the class every address of the origin shares; none when they differ (a public name that also resolves
        # to 127.0.0.1 must not open the way to loopback)
        allowed = origin.classes if len(origin.classes) == 1 else frozenset()
        target = origin
        for _hop in range(MAX_REDIRECTS + 1):
            status, location = self._request(target, part, deadline=deadline)
            if location is None:
                return status
            next_url = urljoin(target.url, location)
            try:
                target = _target(next_url)
            except OSError as exc:
                raise _Retry(f"cannot resolve the host of {next_url} (redirected from {url}): {exc}",
                             http_status=status) from None
            self._check_public(target, status=status, redirected_from=url)
            if not target.classes <= allowed:
                origin_classes, target_classes = ", ".join(sorted(origin.classes)), ", ".join(sorted(target.classes))
                why = ("every address of a redirect's host must be in the original host's address class" if allowed
                       else f"{origin.host}'s addresses are of more than one class, so no redirect from it is followed")
                raise _Refuse(f"redirect from {origin.host} ({origin_classes}) to {target.host} ({target_classes}) "
                              f"refused: {why}; it was not requested", http_status=status, reason=UrlReason.REDIRECT)
        raise _Fail(f"more than {MAX_REDIRECTS} redirects from {url}", reason=UrlReason.TOO_MANY_REDIRECTS)

    def _check_public(self, target: _Target, *, status: int | None, redirected_from: str | None) -> None:
        """With ``public_only``: refuse ``target`` (nothing is sent to it) unless all of its addresses are public."""
        if not self.config.public_only:
            return
        problem = target.not_public()
        if problem is None:
            return
        hop = f"the redirect from {redirected_from} to {target.url} was refused: " if redirected_from else ""
        raise _Refuse(f"{PUBLIC_ONLY_PREFIX}{hop}{problem}; {PUBLIC_ONLY_HINT}; it was not requested",
                      http_status=status, reason=UrlReason.REDIRECT if redirected_from else UrlReason.NOT_PUBLIC)

    def _remaining(self, deadline: float, *, status: int | None = None) -> float:
        """Seconds left before ``deadline``; a retryable failure once it has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._late(status)
        return left

    def _late(self, status: int | None) -> _Retry:
        return _Retry(f"the attempt took longer than attempt_deadline ({self.config.attempt_deadline:g} s): the "
                      "server is too slow; the next attempt resumes from the bytes received", http_status=status)

    def _track(self, sock: socket.socket | None, deadline: float) -> None:
        """Register the socket of an attempt, so that :meth:`reap` can cut it; stop at once if the run stops."""
        if sock is None:
            return
        with self.lock:
            self.sockets[id(sock)] = (sock, deadline)
        if self.stop.is_set():
            raise _Stopped

    def _untrack(self, sock: socket.socket | None) -> None:
        if sock is not None:
            with self.lock:
                self.sockets.pop(id(sock), None)

    def reap(self) -> None:
        """Cut the connections of attempts past their deadline, or all of them once the run stops: a read blocked
        on a silent or trickling server (headers or body) ends now, and its worker sees the stop or the deadline.
        Called by the scheduler's thread, a few times a second."""
        now, stopping = time.monotonic(), self.stop.is_set()
        with self.lock:
            doomed = [sock for sock, deadline in self.sockets.values() if stopping or now >= deadline]
        for sock in doomed:
            with contextlib.suppress(OSError):  # the base method: SSLSocket.shutdown would also drop its TLS state
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _request(self, target: _Target, part: Path, *, deadline: float) -> tuple[int, str | None]:
        """One GET before ``deadline``: (status, redirect location or None); the body is appended to ``part`` on a
        206."""
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": self.user_agent, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
        validator = _read_validator(part) if offset else None
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                headers["If-Range"] = validator
        kind = _PinnedHTTPS if target.https else _PinnedHTTP
        conn = kind(target.host, target.port, address=target.addresses[0],
                    timeout=min(self.config.timeout, self._remaining(deadline)))
        sock: socket.socket | None = None
        try:
            conn.connect()
            sock = conn.sock
            self._track(sock, deadline)
            conn.request("GET", target.path, headers=headers)
            response = conn.getresponse()
            if response.status in REDIRECT_CODES:
                location = response.getheader("Location")
                if not location:
                    raise _Fail(f"HTTP {response.status} redirect without a Location", http_status=response.status)
                return response.status, location
            self._body(response, part, offset, sock=sock, deadline=deadline)
            return response.status, None
        except (OSError, http.client.HTTPException) as exc:
            if self.stop.is_set():  # the connection was cut because the run stops
                raise _Stopped from None
            if time.monotonic() >= deadline:
                raise self._late(None) from None
            raise _Retry(f"{type(exc).__name__}: {exc or 'connection problem'}") from None
        finally:
            self._untrack(sock)
            conn.close()

    def _body(self, response: http.client.HTTPResponse, part: Path, offset: int, *, sock: socket.socket | None,
              deadline: float) -> None:
        """Check the answer's status and size, then stream its body into ``part``."""
        status = response.status
        _check_status(response, part, offset)
        append = status == 206
        if append and _range_start(response.getheader("Content-Range")) != offset:
            _remove(part)
            raise _Retry("the server resumed at another offset than asked; starting again", http_status=status,
                         retry_after=0)
        length = _content_length(response)
        start = offset if append else 0
        if length is not None and start + length > self.config.max_bytes:
            raise _Refuse(f"{start + length:,} bytes exceeds the limit of {self.config.max_bytes:,} (max_bytes)",
                          http_status=status, reason=UrlReason.TOO_LARGE)
        if not append:
            _write_validator(part, response)
        received = self._stream(response, part, append=append, start=start, status=status, sock=sock,
                                deadline=deadline)
        if length is not None and received < length:
            raise _Retry(f"the body was cut short: {received:,} of {length:,} bytes (the next attempt resumes)",
                         http_status=status)

    def _stream(self, response: http.client.HTTPResponse, part: Path, *, append: bool, start: int,
                status: int, sock: socket.socket | None, deadline: float) -> int:
        """Append the body to ``part`` (or write it anew); the bytes received. Each read returns what has arrived
        (``read1``), so the stop and the deadline are checked between reads even when a server trickles bytes; no
        read waits past the deadline. A read's OSError (a timeout) is the caller's to retry; a write's is this
        item's failure (:func:`_local`)."""
        received = 0
        with _local(part):
            handle = part.open("ab" if append else "wb")
        with handle:
            while True:
                if self.stop.is_set():
                    raise _Stopped
                left = self._remaining(deadline, status=status)
                if sock is not None:
                    sock.settimeout(min(self.config.timeout, left))
                try:
                    chunk = response.read1(CHUNK)
                except http.client.IncompleteRead as exc:
                    with _local(part):
                        handle.write(exc.partial)
                    raise _Retry(f"the body was cut short after {received + len(exc.partial):,} bytes (the next "
                                 "attempt resumes)", http_status=status) from None
                if not chunk:  # the end of the body, or a connection that reap() cut: not a complete file then
                    if self.stop.is_set():
                        raise _Stopped
                    self._remaining(deadline, status=status)
                    return received
                received += len(chunk)
                if start + received > self.config.max_bytes:
                    raise _Refuse(f"more than {self.config.max_bytes:,} bytes (max_bytes)", http_status=status,
                                  reason=UrlReason.TOO_LARGE)
                with _local(part):
                    handle.write(chunk)

    def _validate(self, outcome: _Outcome, part: Path) -> _Outcome:
        """Probe the complete file as ``import`` does, then name it by its content, or find it a duplicate."""
        with _PROBE_LOCK:
            probe = probe_image(str(part), self.config.min_side, self.config.max_pixels)
        outcome.bytes, outcome.sha256 = probe.bytes or None, probe.sha256 or None
        outcome.error = outcome.reason = None
        if not probe.ok:
            _remove(part)
            outcome.status, outcome.reason = REFUSED, probe.reason
            outcome.error = f"not a usable image ({probe.reason}): {probe.detail}"
            return outcome
        final = self.dest / f"{probe.sha256[:16]}.{EXTENSIONS.get(probe.format, 'img')}"
        with self.lock:
            held = self.known.get(probe.sha256)
            if held is None:
                self.known[probe.sha256] = (None, str(final))
        if held is not None:
            _remove(part)
            outcome.status, outcome.reason, outcome.image_id, outcome.path = DUPLICATE, UrlReason.DUPLICATE, *held
            outcome.error = f"same content (SHA-256) as {held[1]}, already in the dataset"
            return outcome
        with _local(final):
            os.replace(part, final)
        _remove(_validator_path(part))
        outcome.status, outcome.path = _VALIDATED, str(final)
        return outcome


def _check_status(response: http.client.HTTPResponse, part: Path, offset: int) -> None:
    """Raise for an answer that is not a body to keep: retryable (429, 5xx, 416 on a resume) or not (4xx)."""
    status = response.status
    if status in (200, 206):
        return
    if status == 416 and offset:
        _remove(part)
        raise _Retry("the server cannot resume this file (416); starting again", http_status=status, retry_after=0)
    if status in RETRY_CODES:
        raise _Retry(f"HTTP {status} {response.reason}", http_status=status, reason=UrlReason.HTTP,
                     retry_after=retry_after_seconds(response.getheader("Retry-After")))
    raise _Fail(f"HTTP {status} {response.reason}", http_status=status)


def _content_length(response: http.client.HTTPResponse) -> int | None:
    try:
        value = int(response.getheader("Content-Length") or "")
    except ValueError:
        return None
    return value if value >= 0 else None


def _range_start(content_range: str | None) -> int | None:
    """The first byte of ``Content-Range: bytes START-END/TOTAL``, or None."""
    match = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", content_range or "")
    return int(match.group(1)) if match else None


def _validator_path(part: Path) -> Path:
    return part.with_name(part.name + ".validator")


def _read_validator(part: Path) -> str | None:
    """The ETag (strong) or Last-Modified saved when ``part`` was started: sent as If-Range on a resume."""
    try:
        return _validator_path(part).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _write_validator(part: Path, response: http.client.HTTPResponse) -> None:
    etag = response.getheader("ETag") or ""
    value = etag if etag and not etag.startswith("W/") else response.getheader("Last-Modified") or ""
    with _local(part):
        if value:
            _validator_path(part).write_text(value, encoding="utf-8")
        else:
            _remove(_validator_path(part))


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


@contextlib.contextmanager
def _local(path: Path, *, worker: bool = True) -> Iterator[None]:
    """Turn a failed write of ``path`` into the item's failure (``worker``) or an InputError; a full disk is a
    :class:`DiskFullError` either way (it stops the whole run)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"the disk holding {path.parent} is full; free some space and run the same "
                                "command again (it resumes)") from exc
        if not worker:
            raise InputError(f"cannot write {path}: {exc}; check the folder's permissions, or choose another "
                             "with --dest") from None
        raise _Fail(f"cannot write {path}: {exc}", reason=UrlReason.LOCAL) from None


# --------------------------------------------------------------------------- the ledger


@dataclass
class _State:
    """A ledger row as read at the start of a run."""

    id: int
    url: str
    status: str
    attempts: int
    last_error: str | None
    path: str | None
    sha256: str | None
    bytes: int | None
    relabel: bool = False


_ROW_FIELDS = ("label", "labelset", "group", "license", "attribution")


class _Ledger:
    """The dataset's ``url_items`` rows: created from the manifest, updated in short transactions."""

    def __init__(self, catalog: Catalog, dataset: str, *, source: str) -> None:
        self.catalog = catalog
        with catalog.write_session() as session:
            row = session.scalars(select(Dataset).where(Dataset.name == dataset)).first()
            if row is None:  # the ledger's rows need the dataset before its first image
                row = Dataset(name=dataset, description=f"downloaded from {source}")
                session.add(row)
                session.flush()
            self.dataset_id: int = row.id

    def sync(self, rows: list[UrlRow]) -> dict[str, _State]:
        """Insert the manifest's new URLs as pending, update the others' label, group, licence and attribution;
        url -> state. A downloaded URL whose label or group changed is marked for relabelling."""
        with self.catalog.write_session() as session:
            existing = {item.url: item for item in
                        session.scalars(select(UrlItem).where(UrlItem.dataset_id == self.dataset_id))}
            new, relabel = [], set()
            for row in rows:
                values = {name: getattr(row, name) for name in _ROW_FIELDS}
                item = existing.get(row.url)
                if item is None:
                    new.append({"dataset_id": self.dataset_id, "url": row.url, "status": PENDING, "attempts": 0,
                                "updated_at": utcnow(), **values})
                    continue
                if item.status == DOWNLOADED and (item.label, item.labelset, item.group) != \
                        (row.label, row.labelset, row.group):
                    relabel.add(row.url)
                for name, value in values.items():
                    if getattr(item, name) != value:
                        setattr(item, name, value)
            for part in _chunks(new):
                session.execute(insert(UrlItem), part)
            session.flush()
            urls = {row.url for row in rows}
            states = {item.url: _State(item.id, item.url, item.status, item.attempts, item.last_error, item.path,
                                       item.sha256, item.bytes, relabel=item.url in relabel)
                      for item in session.scalars(select(UrlItem).where(UrlItem.dataset_id == self.dataset_id))
                      if item.url in urls}
        return states

    def write(self, changes: dict[int, dict[str, Any]]) -> None:
        """Apply ``changes`` (row id -> column values) in one transaction."""
        if not changes:
            return
        by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
        now = utcnow()
        for row_id, values in changes.items():
            by_columns[tuple(sorted(values))].append({"id": row_id, "updated_at": now, **values})
        with self.catalog.write_session() as session:
            for group in by_columns.values():
                session.execute(update(UrlItem), group)

    def images(self) -> dict[str, tuple[int | None, str]]:
        """sha256 -> (image id, path) of the dataset's images: what a download must not duplicate."""
        with self.catalog.session() as session:
            rows = session.execute(select(Image.sha256, Image.id, Image.path)
                                   .where(Image.dataset_id == self.dataset_id).order_by(Image.id))
            known: dict[str, tuple[int | None, str]] = {}
            for sha, image_id, path in rows:
                known.setdefault(sha, (image_id, path))
        return known

    def image_ids(self, paths: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        with self.catalog.session() as session:
            for part in _chunks(paths):
                rows = session.execute(select(Image.path, Image.id).where(
                    Image.dataset_id == self.dataset_id, Image.path.in_(part)))
                found.update((path, image_id) for path, image_id in rows)
        return found

    def counts(self, urls: set[str]) -> dict[str, int]:
        with self.catalog.session() as session:
            rows = session.execute(select(UrlItem.url, UrlItem.status).where(UrlItem.dataset_id == self.dataset_id))
            counts = Counter(status for url, status in rows if url in urls)
        return {status: counts.get(status, 0) for status in URL_STATUSES}

    def downloaded(self) -> list[UrlItem]:
        with self.catalog.session() as session:
            return list(session.scalars(select(UrlItem).where(UrlItem.dataset_id == self.dataset_id,
                                                              UrlItem.status == DOWNLOADED).order_by(UrlItem.id)))

    def class_counts(self) -> dict[str, dict[str, int]]:
        with self.catalog.session() as session:
            return _class_counts(session, self.dataset_id)


def _chunks(values: list[Any], size: int = 500) -> list[list[Any]]:
    return [values[start:start + size] for start in range(0, len(values), size)]


# --------------------------------------------------------------------------- what to do this run


@dataclass
class _Plan:
    fetch: list[_Item] = field(default_factory=list)
    #: valid files of an earlier run that stopped before they reached the catalog
    recovered: list[_Outcome] = field(default_factory=list)
    relabel: list[Entry] = field(default_factory=list)
    changes: dict[int, dict[str, Any]] = field(default_factory=dict)
    done_per_class: Counter[tuple[str, str]] = field(default_factory=Counter)


def _plan(rows: list[UrlRow], states: dict[str, _State], config: UrlImportConfig, report: UrlImportReport) -> _Plan:
    """Which rows to download now: pending ones, failed ones with ``retry_failed``; never the refused (except by
    the licence filter or ``public_only``, decided again each run), downloaded or duplicate ones."""
    licence = re.compile(config.license_filter) if config.license_filter else None
    plan = _Plan()
    for row in rows:
        state = states[row.url]
        status = state.status
        redecided = status == REFUSED and (state.last_error or "").startswith((LICENCE_PREFIX, PUBLIC_ONLY_PREFIX))
        if status == DOWNLOADED:
            plan.done_per_class[(row.labelset, row.label)] += 1
            if state.relabel and state.path:
                plan.relabel.append(Entry(state.path, {row.labelset: row.label}, row.group))
            continue
        if status in (DUPLICATE, REFUSED) and not redecided:
            continue
        if status == FAILED and not config.retry_failed:
            report.failed_earlier += 1
            continue
        if licence is not None and not licence.search(row.license or ""):
            detail = f"{LICENCE_PREFIX}licence {row.license or '(none)'!r} does not match {config.license_filter!r}"
            plan.changes[state.id] = {"status": REFUSED, "last_error": detail}
            report.skipped.append(Skipped(row.url, UrlReason.LICENCE, detail))
            continue
        if redecided:
            plan.changes[state.id] = {"status": PENDING, "last_error": None}
        item = _Item(state.id, row.url, row.label, row.labelset, row.group, state.attempts, state.path, state.sha256,
                     state.bytes)
        if state.path and state.sha256 and _has_size(state.path, state.bytes):
            plan.recovered.append(_Outcome(item, _VALIDATED, http_status=None, bytes=state.bytes,
                                           sha256=state.sha256, path=state.path))
            plan.done_per_class[item.label_key] += 1
            continue
        plan.fetch.append(item)
    return plan


def _has_size(path: str, size: int | None) -> bool:
    try:
        return size is not None and os.stat(path).st_size == size
    except OSError:
        return False


def _dest(config: UrlImportConfig, workspace: Workspace) -> Path:
    if config.dest:
        dest = Path(config.dest).expanduser()
        return dest.resolve() if dest.is_absolute() else workspace.inside(dest)
    name = re.sub(r"[^\w.-]+", "_", config.dataset).strip("._") or "dataset"
    if name != config.dataset:  # two names that clean up alike still get their own folders
        name = f"{name}-{hashlib.sha256(config.dataset.encode('utf-8')).hexdigest()[:8]}"
    return workspace.root / "downloads" / name


# --------------------------------------------------------------------------- running the downloads


class _Run:
    """The scheduler: at most ``concurrency`` downloads at once and ``per_host`` per host, a class's cap kept,
    outcomes written to the ledger and valid files to the catalog in batches, from this thread only."""

    def __init__(self, config: UrlImportConfig, catalog: Catalog, ledger: _Ledger, *, dest: Path, source: str,
                 report: UrlImportReport, plan: _Plan) -> None:
        self.config, self.catalog, self.ledger, self.dest, self.source = config, catalog, ledger, dest, source
        self.report, self.plan = report, plan
        self.stop = threading.Event()
        known = ledger.images()
        for outcome in plan.recovered:  # not in the catalog yet, but a download of the same bytes is a duplicate
            known.setdefault(outcome.sha256 or "", (None, outcome.path or ""))
        self.downloader = _Downloader(config, dest, stop=self.stop, known=known)
        self.changes: dict[int, dict[str, Any]] = dict(plan.changes)
        self.to_import: list[_Outcome] = list(plan.recovered)
        self.relabel = list(plan.relabel)
        self.unresolved: list[_Outcome] = []  # duplicates of a file not yet in the catalog
        self.done_per_class = Counter(plan.done_per_class)
        self.inflight_per_class: Counter[tuple[str, str]] = Counter()
        self.per_host: Counter[str] = Counter()
        self.queues: OrderedDict[str, deque[_Item]] = OrderedDict()
        for item in plan.fetch:
            self.queues.setdefault(item.host, deque()).append(item)
        self.total, self.done = len(plan.fetch), 0
        self.last_ledger = self.last_import = time.monotonic()

    def execute(self, progress: ProgressCallback | None, should_stop: StopCheck | None) -> str | None:
        """Download everything planned; the reason the run stopped early, or None."""
        inflight: dict[Future[_Outcome], _Item] = {}
        reason: str | None = None
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="import-urls") as pool:
            try:
                while self.queues or inflight:
                    reason = reason or (should_stop() if should_stop else None)
                    if reason:
                        self.stop.set()
                    else:
                        self._fill(pool, inflight, progress)
                    if not inflight:
                        break
                    done, _ = wait(inflight, timeout=0.25, return_when=FIRST_COMPLETED)
                    self.downloader.reap()
                    self._collect(done, inflight, progress)
                    self._flush(force=False)
            except KeyboardInterrupt:
                reason = "interrupted (Ctrl-C or SIGTERM)"
                self._drain(inflight, progress)
            except BaseException:
                self._drain(inflight, progress)
                with contextlib.suppress(Exception):  # keep what was done; the first error is the one to see
                    self._flush(force=True)
                raise
        self._flush(force=True)
        return reason

    def _drain(self, inflight: dict[Future[_Outcome], _Item], progress: ProgressCallback | None) -> None:
        """Stop the downloads in flight (each ends at its next read or backoff) and keep their outcomes."""
        self.stop.set()
        while inflight:
            self.downloader.reap()
            done, _ = wait(inflight, timeout=1.0)
            with contextlib.suppress(Exception):
                self._collect(done, inflight, progress)

    def _fill(self, pool: ThreadPoolExecutor, inflight: dict[Future[_Outcome], _Item],
              progress: ProgressCallback | None) -> None:
        """Start downloads while slots are free: hosts in turn, each in manifest order, a class's cap kept."""
        for host in list(self.queues):
            queue = self.queues[host]
            started = False
            while queue and len(inflight) < self.config.concurrency and self.per_host[host] < self.config.per_host:
                item = queue[0]
                room = self._class_room(item)
                if room == "blocked":  # its class may fill up with the downloads in flight: wait for them
                    break
                queue.popleft()
                if room == "full":
                    self.report.skipped.append(Skipped(item.url, UrlReason.CAPPED, f"class {item.label!r} already "
                                                       f"has {self.config.max_per_class} downloaded images "
                                                       "(max_per_class); left pending"))
                    self._progress(progress)
                    continue
                inflight[pool.submit(self.downloader.run, item)] = item
                self.per_host[host] += 1
                self.inflight_per_class[item.label_key] += 1
                self.report.attempted += 1
                started = True
            if not queue:
                del self.queues[host]
            elif started:
                self.queues.move_to_end(host)
            if len(inflight) >= self.config.concurrency:
                return

    def _class_room(self, item: _Item) -> str:
        cap = self.config.max_per_class
        if cap is None:
            return "ok"
        done = self.done_per_class[item.label_key]
        if done >= cap:
            return "full"
        return "blocked" if done + self.inflight_per_class[item.label_key] >= cap else "ok"

    def _collect(self, done: set[Future[_Outcome]], inflight: dict[Future[_Outcome], _Item],
                 progress: ProgressCallback | None) -> None:
        error: BaseException | None = None
        for future in done:
            item = inflight.pop(future)
            self.per_host[item.host] -= 1
            self.inflight_per_class[item.label_key] -= 1
            try:
                self._record(future.result())
            except Exception as exc:  # a full disk, a bug: recorded, then raised once the batch is counted
                error = error or exc
            self._progress(progress)
        if error is not None:
            raise error

    def _progress(self, progress: ProgressCallback | None) -> None:
        self.done += 1
        if progress is not None:
            progress(self.done, self.total)

    def _record(self, outcome: _Outcome) -> None:
        item = outcome.item
        attempts = item.attempts + outcome.attempts
        if outcome.status == _STOPPED:
            self.changes[item.id] = {"status": PENDING, "attempts": attempts}
            return
        self.changes[item.id] = {"status": PENDING if outcome.status == _VALIDATED else outcome.status,
                                 "attempts": attempts, "http_status": outcome.http_status,
                                 "last_error": outcome.error, "bytes": outcome.bytes, "sha256": outcome.sha256,
                                 "path": outcome.path, "image_id": outcome.image_id}
        if outcome.status == _VALIDATED:
            self.to_import.append(outcome)
            self.done_per_class[item.label_key] += 1
            self.report.bytes += outcome.bytes or 0
            return
        if outcome.status == DUPLICATE and outcome.image_id is None:
            self.unresolved.append(outcome)
        self.report.skipped.append(Skipped(item.url, outcome.reason or UrlReason.HTTP, outcome.error or ""))

    def _flush(self, *, force: bool) -> None:
        """Import the valid files, then write the ledger: each when its batch is full, its time is up, or at the
        end (``force``)."""
        now = time.monotonic()
        if (self.to_import or self.relabel) and (force or len(self.to_import) >= IMPORT_BATCH
                                                 or now - self.last_import >= IMPORT_SECONDS):
            self._import()
            self.last_import = now
        if self.unresolved and (force or not self.to_import):
            self._resolve_duplicates()
        if self.changes and (force or len(self.changes) >= LEDGER_BATCH or now - self.last_ledger >= LEDGER_SECONDS):
            self.ledger.write(self.changes)
            self.changes = {}
            self.last_ledger = now

    def _import(self) -> None:
        """Hand the valid files to the importer (labels, groups, its own checks); mark them downloaded."""
        batch, self.to_import = self.to_import, []
        relabel, self.relabel = self.relabel, []
        entries = [Entry(o.path or "", {o.item.labelset: o.item.label}, o.item.group) for o in batch] + relabel
        with _PROBE_LOCK:  # the importer probes again, in this thread
            result = import_entries(self.catalog, self.report.dataset, self.source, entries, workers=1,
                                    min_side=self.config.min_side, max_pixels=self.config.max_pixels,
                                    root=str(self.dest))
        self.report.added += result.added
        self.report.relabelled += result.relabelled
        ids = self.ledger.image_ids([o.path or "" for o in batch])
        refusals = {s.path: s for s in result.skipped}
        for outcome in batch:
            item, image_id = outcome.item, ids.get(outcome.path or "")
            change = self.changes.setdefault(item.id, {})
            if image_id is None:
                why = refusals.get(outcome.path or "")
                detail = f"the importer skipped it ({why.reason}): {why.detail}" if why else "the importer skipped it"
                change.update(status=FAILED, last_error=detail)
                self.done_per_class[item.label_key] -= 1
                self.report.skipped.append(Skipped(item.url, why.reason if why else UrlReason.LOCAL, detail))
                continue
            change.update(status=DOWNLOADED, image_id=image_id, path=outcome.path, sha256=outcome.sha256,
                          bytes=outcome.bytes, last_error=None)
            with self.downloader.lock:
                self.downloader.known[outcome.sha256 or ""] = (image_id, outcome.path or "")
            self.report.downloaded += 1

    def _resolve_duplicates(self) -> None:
        """A duplicate of a file downloaded this run learns that file's image id once it is in the catalog."""
        pending, self.unresolved = self.unresolved, []
        ids = self.ledger.image_ids([o.path or "" for o in pending])
        for outcome in pending:
            image_id = ids.get(outcome.path or "")
            if image_id is not None:
                self.changes.setdefault(outcome.item.id, {})["image_id"] = image_id


# --------------------------------------------------------------------------- the whole command


def import_urls(config: UrlImportConfig, workspace: Workspace, *, progress: ProgressCallback | None = None,
                should_stop: StopCheck | None = None) -> UrlImportReport:
    """Download ``config.manifest``'s URLs into ``config.dataset``; the report of this run.

    ``progress(done, total)`` is called as each planned URL finishes; ``should_stop()`` is polled between
    them: when it returns a reason no download starts any more, those in flight stop at their next read
    (their ``.part`` kept), the ledger is written, and :class:`ImportUrlsInterrupted` is raised; the same
    call again continues. Ctrl-C does the same.
    """
    started = time.perf_counter()
    manifest = Path(config.manifest).expanduser()
    rows, skipped = read_url_manifest(manifest, config.labelset)
    if not rows and not skipped:
        raise InputError(f"the manifest {manifest} has a header but no rows; add one row per image: "
                         f"{MANIFEST_COLUMNS}")
    dest = _dest(config, workspace)
    with _local(dest, worker=False):
        dest.mkdir(parents=True, exist_ok=True)
    source = str(manifest.resolve())
    report = UrlImportReport(dataset=config.dataset, manifest=source, dest=str(dest),
                             rows=len(rows) + len(skipped), skipped=list(skipped))
    catalog = open_catalog(workspace.db_url)
    try:
        ledger = _Ledger(catalog, config.dataset, source=source)
        plan = _plan(rows, ledger.sync(rows), config, report)
        run = _Run(config, catalog, ledger, dest=dest, source=source, report=report, plan=plan)
        reason = run.execute(progress, should_stop)
        _finish(report, ledger, rows, config, dest=dest)
    finally:
        catalog.close()
    report.seconds = time.perf_counter() - started
    if reason:
        report.interrupted, report.stop_reason = True, reason
        left = report.counts.get(PENDING, 0)
        raise ImportUrlsInterrupted(f"import-urls into dataset '{config.dataset}' stopped ({reason}): "
                                    f"{report.downloaded:,} downloaded this run, {left:,} URLs still pending; run "
                                    "the same command again to continue (nothing done is downloaded again)",
                                    report=report)
    return report


def _finish(report: UrlImportReport, ledger: _Ledger, rows: list[UrlRow], config: UrlImportConfig, *,
            dest: Path) -> None:
    """Counts per status and class, the min-per-class warnings, and the attribution file."""
    report.counts = ledger.counts({row.url for row in rows})
    in_dataset = ledger.class_counts()
    classes: dict[str, dict[str, int]] = defaultdict(dict)
    for row in rows:
        classes[row.labelset][row.label] = in_dataset.get(row.labelset, {}).get(row.label, 0)
    report.class_counts = {name: dict(sorted(counts.items())) for name, counts in sorted(classes.items())}
    if config.min_per_class is not None:
        for labelset, counts in report.class_counts.items():
            below = {label: n for label, n in counts.items() if n < config.min_per_class}
            if below:
                report.below_min[labelset] = below
                report.warnings.extend(f"class {label!r} of labelset {labelset!r} has {n} image(s), below "
                                       f"--min-per-class {config.min_per_class}" for label, n in below.items())
    if report.failed_earlier:
        report.warnings.append(f"{report.failed_earlier} URL(s) failed in an earlier run and were not tried again; "
                               "pass --retry-failed to try them")
    report.attribution = str(write_attribution(dest / ATTRIBUTION_FILE, ledger.downloaded(), dest))


def write_attribution(path: Path, items: list[UrlItem], dest: Path) -> Path:
    """Write ``path`` (CSV: file, url, license, attribution, label, labelset, sha256), one row per downloaded
    image, ``file`` relative to ``dest`` when inside it; replaced whole, never left half-written."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "url", "license", "attribution", "label", "labelset", "sha256"])
    for item in items:
        file = Path(item.path or "")
        with contextlib.suppress(ValueError):
            file = file.relative_to(dest)
        writer.writerow([str(file), item.url, item.license or "", item.attribution or "", item.label,
                         item.labelset, item.sha256 or ""])
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with _local(path, worker=False):
        temporary.write_text(buffer.getvalue(), encoding="utf-8")
        os.replace(temporary, path)
    return path
