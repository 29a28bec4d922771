"""Rasters read over the network: ``https://``, ``s3://``, ``gs://``, ``az://`` and GDAL's
``/vsicurl/``-style paths.

Cloud-optimized GeoTIFFs are read window by window through GDAL's network file systems, so
only the blocks a window needs cross the network and nothing is downloaded whole. A remote
input is kept as the text the user gave (a ``Path`` would fold ``https://`` into
``https:/``); :func:`gdal_path` is what GDAL opens.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import warnings
from urllib.parse import quote, unquote, urlsplit, urlunsplit

# URL schemes and the GDAL virtual file system that reads each
SCHEMES = {"http": "/vsicurl/", "https": "/vsicurl/", "ftp": "/vsicurl/", "s3": "/vsis3/",
           "gs": "/vsigs/", "az": "/vsiaz/"}
# GDAL's network file systems, given as they are
VSI_NETWORK = ("/vsicurl/", "/vsicurl?", "/vsis3/", "/vsigs/", "/vsiaz/", "/vsiadls/",
               "/vsioss/", "/vsiswift/", "/vsiwebhdfs/")

# GDAL settings for reading over the network, unless the user set them:
# - no directory listing on open (an S3 LIST or an HTML index per file, for sidecar files
#   COGs do not have);
# - block ranges fetched one request after another (our reader threads run in parallel):
#   GDAL's default fetches them in parallel requests whose bytes bypass its block cache, so
#   each open of the file (header checks, then the run) fetched the same blocks again; a whole
#   scene cost 1.99x its bytes in an audit, 1.00x this way;
# - retries with back-off on HTTP 429/500/502/503/504 (about 20 s in all), so a night's run
#   survives a busy server and a dead one is reported soon.
NETWORK_DEFAULTS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MULTIRANGE": "SERIAL",
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "CPL_VSIL_CURL_CACHE_SIZE": str(128 * 1024 * 1024),  # bytes of blocks kept, all files
}

CREDENTIALS = ("for a public bucket set AWS_NO_SIGN_REQUEST=YES (GS_NO_SIGN_REQUEST=YES for "
               "gs://); otherwise set the credentials GDAL reads (AWS_ACCESS_KEY_ID..., "
               "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_...), or give a signed URL")


def is_remote(text: str | os.PathLike) -> bool:
    """Whether ``text`` names a raster on a server rather than on a local disk."""
    if not isinstance(text, str):
        return False
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", text)
    return (scheme is not None and scheme.group(1).lower() in SCHEMES) or text.startswith(
        VSI_NETWORK)


def gdal_path(text: str) -> str:
    """The path GDAL opens for a remote input (``https://h/a.tif`` → ``/vsicurl/https://…``)."""
    if text.startswith(VSI_NETWORK):
        return text
    scheme, rest = text.split("://", 1)
    prefix = SCHEMES[scheme.lower()]
    return prefix + (_escaped(text) if prefix == "/vsicurl/" else rest)


def _escaped(url: str) -> str:
    """A web URL with the spaces and non-ASCII letters of its path percent-encoded, as a
    browser sends them (curl refuses them raw); what is encoded already stays as it is."""
    parts = urlsplit(url)
    if not re.search(r"[\s\x80-\U0010ffff]", parts.path):
        return url
    return urlunsplit(parts._replace(path=quote(parts.path, safe="/%:@!$&'()*+,;=~")))


def _plain(text: str) -> str:
    """The URL inside GDAL's ``/vsicurl?url=…&options`` form; other texts as they are."""
    if text.startswith("/vsicurl?"):  # /vsicurl?url=https%3A%2F%2F...&other=options
        url = dict(p.split("=", 1) for p in text[len("/vsicurl?"):].split("&") if "=" in p)
        return unquote(url.get("url", ""))
    return text


def _segments(text: str) -> list[str]:
    """Where a remote raster is, as names: ``https://h/a/b.tif?sig`` → ``["https", "h", "a",
    "b.tif"]``; ``/vsis3/bucket/b.tif`` → ``["vsis3", "bucket", "b.tif"]``. No query string,
    and no name that could leave a folder (``..``, or a slash decoded from ``%2F``)."""
    text = _plain(text)
    if "://" in text:
        url = urlsplit(text)
        names = [url.scheme.lower(), url.netloc, *url.path.split("/")]
    else:
        names = text.split("?", 1)[0].split("/")
    return [n for n in _decoded(names) if n not in ("", ".", "..")]


def _decoded(names: list[str]) -> list[str]:
    """Percent-decoded names with no slash in them (``%2F`` would make a folder of a name)."""
    return [unquote(n).replace("/", "_").replace("\\", "_") for n in names]


def _has_path(names: list[str], text: str) -> bool:
    """Whether ``names`` go on past the server (scheme and host) or the GDAL file system."""
    return len(names) > (2 if "://" in _plain(text) else 1)


def file_name(text: str) -> str:
    """The file's name in a remote path, without a query string (signed URLs carry one)."""
    names = _segments(text)
    return names[-1] if _has_path(names, text) else "remote"


def is_folder(text: str) -> bool:
    """Whether a remote path names a folder (a bucket's prefix): it ends with ``/``."""
    return is_remote(text) and _plain(text).split("?", 1)[0].endswith("/")


def list_folder(text: str, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(URL, path below the folder) of every file under the remote folder ``text`` whose
    name ends with one of ``suffixes``, sorted. S3, GCS and Azure list through their APIs; a
    web server through its "Index of" pages. Raises ``InputError`` when nothing is listed."""
    import pyogrio  # GDAL's folder listing; rasterio offers none

    from crossearth_cli.errors import InputError

    folder = gdal_path(text.split("?", 1)[0])
    query = "?" + text.split("?", 1)[1] if "?" in text else ""
    RETRIES.remember(text)
    try:
        with warnings.catch_warnings():  # GDAL's retries of a busy server, as notes
            warnings.simplefilter("always", RuntimeWarning)
            warnings.showwarning = _log_gdal_warning
            listed = pyogrio.vsi_listtree(folder)
    except FileNotFoundError:  # GDAL says no more (a 404, a 403 or no server at all)
        busy = busy_error(text, "cannot be listed")
        if busy is not None:
            raise busy from None
        raise InputError("not found on the server, or it cannot be listed", path=text,
                         hint="check the URL" + ("" if folder.startswith("/vsicurl") else
                                                 f"; {CREDENTIALS}")) from None
    except Exception as exc:  # noqa: BLE001 - GDAL's words, explained
        what, fix = explain(str(exc).replace(folder, text))
        raise InputError(what, path=text, hint=fix) from None
    web = folder.startswith("/vsicurl")
    found = []
    for path in sorted(listed):
        rel = path[len(folder):] if path.startswith(folder) else path.rsplit("/", 1)[-1]
        # a web page's links are percent-encoded; a bucket's keys are the names themselves
        names = _decoded(rel.split("/")) if web else [
            n.replace("\\", "_") for n in rel.split("/")]
        if not names[-1].lower().endswith(suffixes):
            continue
        if any(n in ("", ".", "..") or n.startswith(".") for n in names):
            continue  # hidden, as in a local folder, or a key that would leave -o
        found.append((text.split("?", 1)[0] + rel + query, "/".join(names)))
    if not found:
        raise InputError(f"lists no rasters ({', '.join(suffixes)}) on the server", path=text,
                         hint="check the URL" + ("; the server must give an 'Index of' page "
                                                 "for the folder" if web else
                                                 f"; {CREDENTIALS}"))
    return found


def file_stem(text: str) -> str:
    """The name without its extension, for output names derived from a remote input."""
    name = file_name(text)
    return name.rsplit(".", 1)[0] if "." in name.strip(".") else name


def use_network_defaults() -> None:
    """Set :data:`NETWORK_DEFAULTS` in the environment (GDAL reads its settings there), each
    one only where the user has not set it."""
    for key, value in NETWORK_DEFAULTS.items():
        os.environ.setdefault(key, value)


# a URL's query string in running text: up to a space or a quote; punctuation that ends a
# sentence or a bracket after it ("…?sig=x: not found", "(…?sig=x)") is left outside
_QUERY = re.compile(r"""(?P<url>[A-Za-z][A-Za-z0-9+.-]*://[^\s?'"<>]*)\?[^\s'"<>]*?"""
                    r"""(?P<end>[:,.;)\]]*(?:[\s'"<>]|$))""")
_VSICURL_OPTIONS = re.compile(r"""/vsicurl\?[^\s'"<>]*?(?P<end>[:,.;)\]]*(?:[\s'"<>]|$))""")


def hide_queries(text: str) -> str:
    """``text`` with the query string of every URL in it shown as ``?…``: a signed URL's
    signature (``X-Amz-Signature=…``, an Azure SAS token) is a password for a while, and
    error lines, notes and ``--summary`` files end up in logs. GDAL's ``/vsicurl?url=…&…``
    form keeps only its URL's path."""
    def options(found: re.Match) -> str:
        url = _plain(found.group(0)[: len(found.group(0)) - len(found.group("end"))])
        return f"/vsicurl?url={url.split('?', 1)[0]}&…{found.group('end')}"

    text = _VSICURL_OPTIONS.sub(options, text)
    return _QUERY.sub(lambda m: f"{m.group('url')}?…{m.group('end')}", text)


# pyogrio gives GDAL's warnings as Python warnings; during a folder listing they are logged
# here, where RetryNotes listens (with nothing else listening, they are dropped)
GDAL_WARNINGS = "crossearth_cli.gdal"
logging.getLogger(GDAL_WARNINGS).addHandler(logging.NullHandler())
logging.getLogger(GDAL_WARNINGS).propagate = False


def _log_gdal_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger(GDAL_WARNINGS).warning(str(message))


# GDAL's warning each time it asks a request again (one wording for /vsicurl/ and the clouds)
_RETRY = re.compile(r"HTTP error code: (\d{3}) - (\S+)\. Retrying again in ([\d.]+) secs")


RETRY_SETTINGS = "GDAL_HTTP_MAX_RETRY and GDAL_HTTP_RETRY_DELAY set how often and how soon"


def _retry(message: str) -> tuple[int, str, float] | None:
    """GDAL's warning that it asks a request again → (HTTP status, URL without its query,
    seconds until it asks), or None for any other message."""
    found = _RETRY.search(message)
    if found is None:
        return None
    code, url, delay = found.groups()
    return int(code), url.split("?", 1)[0], float(delay)


def retry_note(message: str) -> tuple[str, str] | None:
    """GDAL's warning that it asks a request again → (the input, our note), or None for any
    other message. The input is named as typed where it was (``s3://bucket/key``, not the
    service's endpoint URL GDAL asked), and without its query string: a signed URL's
    signature stays out of logs."""
    found = _retry(message)
    if found is None:
        return None
    code, url, delay = found
    name = RETRIES.typed(url)
    return name, (f"{name}: the server answered HTTP {code}; asking again in {delay:g} s "
                  f"({RETRY_SETTINGS})")


class RetryLog:
    """The retries GDAL made lately, by URL: a read or a listing that fails right after them
    failed because the server stayed busy, not because the file is damaged (GDAL's read
    error does not carry the HTTP status)."""

    RECENT_S = 60.0  # GDAL's retries with our defaults take about 20 s in all

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[int, int, float]] = {}  # URL -> (status, count, when)
        # remote inputs as typed, without their queries (a dict: ordered, and a folder run
        # over thousands of URLs adds each in constant time)
        self._inputs: dict[str, None] = {}

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
            self._inputs.clear()

    def remember(self, text: str) -> None:
        """``text`` (a remote input as typed) names GDAL's requests for it in notes."""
        text = hide_queries(text).removesuffix("?…")
        with self._lock:
            self._inputs.setdefault(text, None)

    def typed(self, url: str) -> str:
        """The input GDAL's request ``url`` is for, as typed; ``url`` itself if none is
        known. A folder's own listing matches the folder, a file in it the file."""
        url = url.split("?", 1)[0]
        with self._lock:
            if url in self._inputs:  # a web URL, as typed
                return url
            inputs = list(self._inputs)
        return next((text for text in inputs if same_object(url, text)), url)

    def add(self, url: str, code: int) -> None:
        with self._lock:
            _, count, _ = self._seen.get(url, (code, 0, 0.0))
            self._seen[url] = (code, count + 1, time.monotonic())

    def busy(self, text: str) -> str | None:
        """What GDAL's retries for the input ``text`` (as typed) within the last
        :attr:`RECENT_S` seconds say ("the server answered HTTP 503 and still did after 4
        retries"), or None."""
        now = time.monotonic()
        with self._lock:
            found = [(when, code, count) for url, (code, count, when) in self._seen.items()
                     if now - when <= self.RECENT_S and same_object(url, text)]
        if not found:
            return None
        _, code, count = max(found)
        return (f"the server answered HTTP {code} and still did after {count} "
                f"retr{'y' if count == 1 else 'ies'}")


RETRIES = RetryLog()


def busy_error(text: str, what: str | None = None):
    """The error for ``text`` (a remote input as typed) failing right after GDAL asked its
    server again and again: the server stayed busy (GDAL's own error does not say so; its
    retries did). ``what`` failed ("cannot be listed", "read failed at rows ..."). None when
    ``text`` had no recent retries."""
    from crossearth_cli.errors import InputError

    busy = RETRIES.busy(text)
    if busy is None:
        return None
    return InputError(f"{what}: {busy}" if what else busy, path=text,
                      hint=f"try again later; {RETRY_SETTINGS}")


def same_object(url: str, text: str) -> bool:
    """Whether GDAL's request ``url`` is for the input ``text`` (a URL as typed, an
    ``s3://``-style path or a GDAL path): a web URL is the same URL; a bucket's object is asked
    for at its service's endpoint, whose path ends with the object's key."""
    url = url.split("?", 1)[0]
    plain = _plain(text).split("?", 1)[0]
    plain = plain[len("/vsicurl/"):] if plain.startswith("/vsicurl/") else plain
    if re.match(r"(?i)(https?|ftp)://", plain):
        return url in (plain, _escaped(plain))
    names = _segments(text)  # scheme (or file system), bucket, key...
    if len(names) < 3:
        return False
    bucket, key = names[1], "/".join(names[2:])
    parts = urlsplit(url)
    path = unquote(parts.path).rstrip("/")
    return path.endswith(f"/{bucket}/{key}") or (  # path style, or the bucket's own host
        parts.netloc.startswith(bucket + ".") and path == "/" + key)


class RetryNotes(logging.Handler):
    """Shows GDAL's retries of network requests as notes (rasterio logs them at WARNING, and
    nothing showed them: a run waiting on a busy server looked hung). One note per URL, and
    after :attr:`LIMIT` URLs one line saying that more are not shown."""

    LIMIT = 5
    # where rasterio logs GDAL's warnings: on open (_env), and during reads (_err); and
    # where we log those pyogrio gives as Python warnings (folder listings)
    LOGGERS = ("rasterio._env", "rasterio._err", GDAL_WARNINGS)

    def __init__(self, show) -> None:
        super().__init__(logging.WARNING)
        self.show = show
        self.urls: set[str] = set()
        self._lock = threading.Lock()  # GDAL's reader threads log too

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            parsed = _retry(message)
        except Exception:  # noqa: BLE001 - a log record we cannot read is not our business
            return
        if parsed is None:
            return
        RETRIES.add(parsed[1], parsed[0])
        url, text = retry_note(message)
        with self._lock:
            if url in self.urls:
                return
            self.urls.add(url)
            count = len(self.urls)
        if count <= self.LIMIT:
            self.show(text)
        elif count == self.LIMIT + 1:
            self.show(f"more files are being asked again after server errors; not shown "
                      f"after the first {self.LIMIT}")

    def __enter__(self) -> RetryNotes:
        RETRIES.clear()  # a new run: earlier runs' retries (library use, tests) say nothing
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


def explain(message: str) -> tuple[str, str]:
    """GDAL's error for a remote file → (what went wrong, the fix). HTTP servers give a status
    code; GDAL's S3, GCS and Azure clients give the service's words."""
    first = message.strip().splitlines()[0].rstrip(".") if message.strip() else "unreadable"
    code = re.search(r"HTTP (?:response )?(?:code|error)?:?\s*(\d{3})", message)
    status = int(code.group(1)) if code else None
    lower = message.lower()
    if status == 404 or (status is None and any(
            w in lower for w in ("not found", "nosuchkey", "nosuchbucket", "does not exist"))):
        return f"not found on the server ({f'HTTP {status}' if status else first})", \
            "check the URL"
    if status in (401, 403) or (status is None and any(
            w in lower for w in ("access denied", "accessdenied", "forbidden",
                                 "permission denied", "unauthorized"))):
        return f"access denied ({f'HTTP {status}' if status else first})", CREDENTIALS
    if "configuration options not defined" in lower or "credentials not filled" in lower:
        return "no credentials for this bucket", CREDENTIALS
    if "could not resolve" in lower or "could not connect" in lower or "timed out" in lower:
        return f"cannot reach the server ({first})", "check the URL and the network"
    if status is not None:
        return f"the server answered HTTP {status}", "try again later, or check the URL"
    if "range downloading not supported" in lower:
        return (f"not readable in windows ({first})",
                "the server must answer HTTP range requests; download the file instead")
    return (f"not a readable raster ({first})",
            "is it a GeoTIFF? a server must answer HTTP range requests for windowed reads")
