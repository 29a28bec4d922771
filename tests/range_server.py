"""A small HTTP server for the remote-input tests: files under ROOT, with byte ranges (what
GDAL's /vsicurl/ asks for), one JSON line per request in LOG.

    python range_server.py ROOT LOG [LATENCY_MS [MB_PER_S]]   # prints the port, serves

LATENCY_MS delays every answer, as a distant server's round trip does, and MB_PER_S caps each
answer's rate, as one connection to an object store is capped (requests in flight together
wait together: the server answers each in a thread of its own).

Paths under ``/status/CODE/`` answer CODE; under ``/flaky/`` the first request for each file
answers 503 (a busy server), later ones serve the file; under ``/busy-after/N/`` the first N
requests for each file are served and every later one answers 503 (a server that became busy
during a read). A folder answers with a web server's
"Index of" page, or, asked with S3's ``prefix=`` query (``AWS_S3_ENDPOINT`` pointing here,
the folders under ROOT its buckets), with S3's ListObjects XML. It runs in a process of its own, so
that the tests' in-process CLI, holding the GIL in GDAL's reads, cannot starve it.
"""

from __future__ import annotations

import http.server
import json
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote
from xml.sax.saxutils import escape

ROOT = Path(sys.argv[1])
LOG = Path(sys.argv[2])
LATENCY_S = float(sys.argv[3]) / 1000 if len(sys.argv) > 3 else 0.0
BYTES_PER_S = float(sys.argv[4]) * 1e6 if len(sys.argv) > 4 else 0.0
_lock = threading.Lock()
_seen: set[str] = set()
_count: dict[str, int] = {}


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _log(self, status: int, sent: int) -> None:
        with _lock, LOG.open("a") as f:
            f.write(json.dumps({"t": round(time.time(), 4), "method": self.command,
                                "path": self.path, "status": status,
                                "range": self.headers.get("Range"), "bytes": sent}) + "\n")

    def _fail(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self._log(status, 0)

    def do_HEAD(self) -> None:
        self.do_GET(body=False)

    def do_GET(self, body: bool = True) -> None:
        if LATENCY_S:
            time.sleep(LATENCY_S)
        path = asked = self.path.split("?", 1)[0]
        code = re.match(r"/status/(\d{3})/", path)
        if code:
            return self._fail(int(code.group(1)))
        if path.startswith("/flaky/"):
            with _lock:
                first = path not in _seen
                _seen.add(path)
            if first:
                return self._fail(503)
            path = path[len("/flaky"):]
        busy = re.match(r"/busy-after/(\d+)(/.*)", path)
        if busy:
            with _lock:
                _count[path] = seen = _count.get(path, 0) + 1
            if seen > int(busy.group(1)):
                return self._fail(503)
            path = busy.group(2)
        file = ROOT / unquote(path).lstrip("/")
        query = parse_qs(self.path.split("?", 1)[1]) if "?" in self.path else {}
        if file.is_dir() and "prefix" in query:
            return self._send(self._s3_listing(file, query), "application/xml", body)
        if file.is_dir() and path.endswith("/"):
            return self._send(self._index(file, asked), "text/html", body)
        if not file.is_file():
            return self._fail(404)
        size = file.stat().st_size
        start, end, status = 0, size - 1, 200
        ask = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if ask:
            start = int(ask.group(1))
            end = min(int(ask.group(2) or end), end)
            status = 206
        with file.open("rb") as f:  # the range only: scenes in benchmarks are large
            f.seek(start)
            part = f.read(max(end + 1 - start, 0)) if body else b""
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(max(end + 1 - start, 0)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if BYTES_PER_S:
            time.sleep(len(part) / BYTES_PER_S)
        if body:
            self.wfile.write(part)
        self._log(status, len(part))

    def _send(self, text: str, kind: str, body: bool) -> None:
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
        self._log(200, len(data) if body else 0)

    @staticmethod
    def _index(folder: Path, path: str) -> str:
        def row(p: Path) -> str:  # as Apache's and nginx's pages: encoded, date and size
            when = time.strftime("%d-%b-%Y %H:%M", time.gmtime(p.stat().st_mtime))
            slash, size = ("/", "-") if p.is_dir() else ("", str(p.stat().st_size))
            return f'<a href="{quote(p.name)}{slash}">{p.name}{slash}</a>    {when}  {size}\n'

        links = "".join(row(p) for p in sorted(folder.iterdir()))
        return (f"<html><head><title>Index of {path}</title></head><body>"
                f"<h1>Index of {path}</h1><pre>\n{links}</pre></body></html>\n")

    @staticmethod
    def _s3_listing(bucket: Path, query: dict) -> str:
        prefix = query.get("prefix", [""])[0]
        delimiter = query.get("delimiter", [""])[0]
        keys = sorted(p.relative_to(bucket).as_posix() for p in bucket.rglob("*") if p.is_file())
        contents, folders = [], []
        for key in (k for k in keys if k.startswith(prefix)):
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                folder = prefix + rest.split(delimiter, 1)[0] + delimiter
                if folder not in folders:
                    folders.append(folder)
            else:
                size = (bucket / key).stat().st_size
                contents.append(f"<Contents><Key>{escape(key)}</Key><LastModified>"
                                f"2026-01-01T00:00:00.000Z</LastModified><Size>{size}</Size>"
                                "</Contents>")
        prefixes = "".join(f"<CommonPrefixes><Prefix>{escape(f)}</Prefix></CommonPrefixes>"
                           for f in folders)
        return ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult>'
                f"<Name>{bucket.name}</Name><Prefix>{escape(prefix)}</Prefix>"
                f"<IsTruncated>false</IsTruncated>{''.join(contents)}{prefixes}"
                "</ListBucketResult>")


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
