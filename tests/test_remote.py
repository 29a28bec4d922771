"""Rasters on a server (``https://``, ``s3://``…): read window by window, same outputs as the
local file. A local HTTP server with byte ranges (``range_server.py``) stands in for the
network, which tests never touch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import random_scene, write_tif
from rasterio.transform import from_origin
from reliability_helpers import (
    assert_nothing_written,
    assert_user_error,
    cli,
    real_env,
    sigterm_when,
    snapshot,
)

from crossearth_cli.raster.remote import (
    RETRY_SETTINGS,
    file_name,
    file_stem,
    gdal_path,
    is_folder,
    is_remote,
    same_object,
)

ORIGIN = from_origin(500000, 5800000, 0.5, 0.5)
OPTS = ["--tile", "48", "--stride", "32", "--batch-size", "1"]


def _small_blocks(path: Path, data: np.ndarray) -> Path:
    """A deflated GeoTIFF of 32² blocks: many block ranges for GDAL to fetch."""
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype, crs="EPSG:32633",
                       transform=ORIGIN, tiled=True, blockxsize=32, blockysize=32,
                       compress="deflate") as ds:
        ds.write(data)
    return path


class Server:
    def __init__(self, root: Path, log: Path):
        self.root, self.log = root, log
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("range_server.py")), root, log],
            stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def requests(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def server(tmp_path):
    """Files under tmp_path/www served over HTTP; GDAL's settings restored afterwards."""
    saved = dict(os.environ)
    os.environ["GDAL_HTTP_RETRY_DELAY"] = "0.1"  # the flaky server's retry, quickly
    (tmp_path / "www").mkdir()
    s = Server(tmp_path / "www", tmp_path / "requests.jsonl")
    yield s
    s.proc.kill()
    s.proc.wait()
    os.environ.clear()
    os.environ.update(saved)


def _public_buckets_here(server: Server, monkeypatch, **more: str | None) -> None:
    """GDAL's S3 client pointed at the test server (its folders under ROOT are the buckets),
    public buckets: unsigned requests. ``more`` sets (or, with None, removes) other
    variables."""
    for key, value in {"AWS_S3_ENDPOINT": server.url.removeprefix("http://"),
                       "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
                       "AWS_NO_SIGN_REQUEST": "YES", **more}.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.transform, ds.crs, ds.nodata


def _same(a: Path, b: Path) -> None:
    got, want = _read(a), _read(b)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1:3] == want[1:3]
    assert got[3] == want[3] or (np.isnan(got[3]) and np.isnan(want[3]))  # NaN: probabilities


def test_remote_paths_are_told_apart_and_given_to_gdal():
    assert is_remote("https://host/a.tif") and is_remote("S3://bucket/a.tif")
    assert is_remote("/vsicurl/https://host/a.tif") and is_remote("/vsis3/bucket/a.tif")
    assert not is_remote("scene.tif") and not is_remote("/data/https/a.tif")
    assert not is_remote("file://x.tif") and not is_remote(Path("https://host/a.tif"))
    assert gdal_path("https://host/a.tif?sig=1") == "/vsicurl/https://host/a.tif?sig=1"
    assert gdal_path("s3://bucket/k/a.tif") == "/vsis3/bucket/k/a.tif"
    assert gdal_path("gs://b/a.tif") == "/vsigs/b/a.tif"
    assert gdal_path("az://c/a.tif") == "/vsiaz/c/a.tif"
    assert gdal_path("/vsis3/bucket/a.tif") == "/vsis3/bucket/a.tif"
    assert file_name("https://host/dir/my%20scene.tif?X-Amz-Signature=abc&b=c") == "my scene.tif"
    assert file_name("/vsicurl?url=https%3A%2F%2Fh%2Fd%2Fa.tif&max_retry=3") == "a.tif"
    assert file_stem("s3://bucket/tiles/S2_T31.tif") == "S2_T31"
    # GDAL's requests told apart by the input they are for (retry notes, busy servers)
    assert same_object("https://b.s3.amazonaws.com/k/a.tif", "s3://b/k/a.tif")
    assert same_object("http://endpoint:9000/b/k/a.tif", "/vsis3/b/k/a.tif")
    assert same_object("https://h/a%20b.tif", "https://h/a b.tif?sig=1")
    assert not same_object("https://b.s3.amazonaws.com/k/b.tif", "s3://b/k/a.tif")
    assert not same_object("https://h/t/a.tif", "https://h/t/")
    assert not same_object("http://endpoint/flaky/b/scene.tif", "s3://bucket/scene.tif")


def test_query_strings_are_hidden_in_text():
    from crossearth_cli.raster.remote import hide_queries

    assert hide_queries("https://h/a.tif?X-Amz-Signature=S: not found (check the URL)") == \
        "https://h/a.tif?…: not found (check the URL)"
    assert hide_queries("(/vsicurl/https://h/a%20b.tif?se=1&sig=S%3D: TIFFRead) 'gs://b/"
                        "k.tif?x=S', https://h/c.tif?S.") == \
        "(/vsicurl/https://h/a%20b.tif?…: TIFFRead) 'gs://b/k.tif?…', https://h/c.tif?…."
    assert hide_queries("/vsicurl?url=https%3A%2F%2Fh%2Fa.tif%3Fsig%3DS&max_retry=3: gone") == \
        "/vsicurl?url=https://h/a.tif&…: gone"
    for plain in ("https://h/a.tif: x", "s3://b/k.tif", "dir/what?.tif: x", "a ? b"):
        assert hide_queries(plain) == plain


@pytest.mark.parametrize("outputs", [["--confidence", "auto"],
                                     ["--probabilities", "auto", "--probabilities-dtype",
                                      "float32"]])
def test_a_remote_scene_gives_the_local_files_outputs(tmp_path, capfd, ckpt, server,
                                                      monkeypatch, outputs):
    """Bit for bit the local file's outputs on its grid; named after the URL's file (the
    query string of a signed URL left out), in the current folder."""
    _small_blocks(server.root / "scene.tif", random_scene(150, 230, seed=3))
    code, _, err = cli(capfd, "segment", server.root / "scene.tif", "-o",
                       tmp_path / "local_classes.tif", "-c", ckpt, *OPTS, *outputs)
    assert code == 0, err
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, out, err = cli(capfd, "segment", f"{server.url}/scene.tif?token=ab%2Fc&d=1",
                         "-c", ckpt, *OPTS, *outputs, "--summary", "s.json")
    assert code == 0, err
    assert "mosaic" not in out + err and "vrt" not in (out + err).lower()
    extra = "_confidence" if "--confidence" in outputs else "_probabilities"
    assert sorted(p.name for p in here.iterdir()) == sorted(
        ["scene_classes.tif", f"scene{extra}.tif", "s.json"])
    for name in ("_classes", extra):
        _same(here / f"scene{name}.tif", tmp_path / f"local{name}.tif")
    assert json.loads((here / "s.json").read_text())["inputs"][0].startswith(server.url)
    # nothing was fetched whole: every GET asked for a byte range; and no folder listing or
    # sidecar file (.aux.xml, .msk, .ovr) was asked for
    gets = [r for r in server.requests() if r["method"] == "GET"]
    assert gets and all(r["range"] for r in gets)
    # and no block twice, though the file is opened several times (checks, then the run)
    assert sum(r["bytes"] for r in gets) <= (server.root / "scene.tif").stat().st_size
    assert {r["path"].split("?")[0] for r in server.requests()} == {"/scene.tif"}


def test_only_the_blocks_an_aoi_needs_cross_the_network(tmp_path, capfd, ckpt, server):
    data = random_scene(1024, 1024, seed=4)
    write_tif(server.root / "big.tif", data, transform=ORIGIN)
    size = (server.root / "big.tif").stat().st_size
    x0, y1 = ORIGIN.c, ORIGIN.f
    box = f"{x0 + 10},{y1 - 60},{x0 + 60},{y1 - 10}"  # 100 px square in the top-left corner
    code, _, err = cli(capfd, "segment", f"{server.url}/big.tif", "-o", tmp_path / "c.tif",
                       "-c", ckpt, *OPTS, "--aoi", box)
    assert code == 0, err
    fetched = sum(r["bytes"] for r in server.requests())
    assert fetched < 0.25 * size, (fetched, size)
    with rasterio.open(tmp_path / "c.tif") as ds:
        assert ds.width < 200 and ds.height < 200


def test_remote_tiles_of_one_mosaic_give_the_uncut_scenes_outputs(tmp_path, capfd, ckpt,
                                                                   server):
    data = random_scene(96, 160, seed=8)
    whole = write_tif(tmp_path / "whole.tif", data, transform=ORIGIN)
    write_tif(server.root / "left.tif", data[:, :, :70], transform=ORIGIN)
    write_tif(server.root / "right.tif", data[:, :, 70:],
              transform=ORIGIN * ORIGIN.translation(70, 0))
    code, _, err = cli(capfd, "segment", whole, "-o", tmp_path / "w.tif", "-c", ckpt, *OPTS)
    assert code == 0, err
    code, _, err = cli(capfd, "segment", f"{server.url}/left.tif", f"{server.url}/right.tif",
                       "--mosaic", "-o", tmp_path / "m.tif", "-c", ckpt, *OPTS)
    assert code == 0, err
    _same(tmp_path / "m.tif", tmp_path / "w.tif")
    # a local tile and a remote one, the same
    code, _, err = cli(capfd, "segment", whole.parent / "whole.tif", f"{server.url}/right.tif",
                       "--mosaic", "-o", tmp_path / "mixed.tif", "-c", ckpt, *OPTS)
    assert code == 0, err
    _same(tmp_path / "mixed.tif", tmp_path / "w.tif")


def test_a_busy_server_is_asked_again(tmp_path, capfd, ckpt, server):
    """The first request for the file answers 503; GDAL asks again (our default: up to 4
    times), and a note says so while the run waits, naming the URL without its signature."""
    write_tif(server.root / "scene.tif", random_scene(64, 64, seed=1), transform=ORIGIN)
    # a real process: its stderr is hidden from libtiff while a file opens, GDAL's wait included
    run = subprocess.run([sys.executable, "-m", "crossearth_cli", "segment",
                          f"{server.url}/flaky/scene.tif?X-Amz-Signature=SECRET",
                          "-o", tmp_path / "c.tif", "-c", ckpt, *OPTS],
                         capture_output=True, text=True, env=real_env(), timeout=300)
    code, err = run.returncode, run.stderr
    assert code == 0, err
    assert [r["status"] for r in server.requests()][0] == 503
    notes = [line for line in err.splitlines() if "asking again" in line]
    assert notes == [f"note: {server.url}/flaky/scene.tif: the server answered HTTP 503; asking "
                     "again in 0.1 s (GDAL_HTTP_MAX_RETRY and GDAL_HTTP_RETRY_DELAY set how "
                     "often and how soon)"], err
    assert "SECRET" not in err


def _without_notes(err: str) -> str:
    return "\n".join(line for line in err.splitlines() if not line.startswith("note: "))


def test_a_server_that_stays_busy_is_told_not_a_damaged_file(tmp_path, capfd, ckpt, server,
                                                             monkeypatch):
    """A server that starts answering 503 after N requests, for every N a run makes: the
    open, the up-front check of the last block, or a read in the middle of the run fails.
    GDAL's read error does not carry the status; its retries just before it do, so the line
    says the server stayed busy, never that the file is truncated or corrupt."""
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "1")
    monkeypatch.setenv("CPL_VSIL_CURL_NON_CACHED", f"/vsicurl/{server.url}/")
    _small_blocks(server.root / "scene.tif", random_scene(160, 160, seed=2))
    code, _, err = cli(capfd, "segment", f"{server.url}/scene.tif", "-o", tmp_path / "ok.tif",
                       "-c", ckpt, *OPTS)
    assert code == 0, err
    asked = len(server.requests())
    assert asked >= 4, asked  # the open, the check, and reads while the run goes on
    for n in range(1, asked):
        url = f"{server.url}/busy-after/{n}/scene.tif"
        code, _, err = cli(capfd, "segment", f"{url}?sig=SECRET", "-o", tmp_path / f"{n}.tif",
                           "-c", ckpt, *OPTS)
        line = assert_user_error(code, _without_notes(err), f"{url}?…: ",
                                 "the server answered HTTP 503 and still did after",
                                 "try again later; GDAL_HTTP_MAX_RETRY")
        assert "corrupt" not in line and "SECRET" not in err, (n, err)
        assert not (tmp_path / f"{n}.tif").exists()
    # a folder whose listing stays busy says so too; one busy once is listed, with a note
    (server.root / "tiles").mkdir()
    write_tif(server.root / "tiles" / "a.tif", random_scene(64, 64, seed=3), transform=ORIGIN)
    code, _, err = cli(capfd, "segment", f"{server.url}/status/503/tiles/", "-o",
                       tmp_path / "out", "-c", ckpt, *OPTS)
    assert_user_error(code, _without_notes(err), f"{server.url}/status/503/tiles/: cannot be "
                      "listed: the "
                      "server answered HTTP 503 and still did after 1 retry (try again later")
    code, out, err = cli(capfd, "segment", f"{server.url}/flaky/tiles/", "-o", tmp_path / "out",
                         "-c", ckpt, *OPTS, "--summary", tmp_path / "s.json")
    assert code == 0, err
    assert json.loads((tmp_path / "s.json").read_text())["done"] == ["a.tif"]
    assert f"note: {server.url}/flaky/tiles/: the server answered HTTP 503; asking again" in err


def test_a_busy_buckets_note_names_the_path_as_typed(tmp_path, capfd, ckpt, server,
                                                     monkeypatch):
    """GDAL asks S3's endpoint (here http://127.0.0.1:PORT/flaky/b/scene.tif for the bucket
    "flaky"); the note names s3://flaky/b/scene.tif, as typed."""
    (server.root / "b").mkdir()
    write_tif(server.root / "b" / "scene.tif", random_scene(64, 64, seed=2), transform=ORIGIN)
    _public_buckets_here(server, monkeypatch)
    code, _, err = cli(capfd, "segment", "s3://flaky/b/scene.tif", "-o", tmp_path / "c.tif",
                       "-c", ckpt, *OPTS)
    assert code == 0, err
    assert [r["status"] for r in server.requests()][0] == 503
    notes = [line for line in err.splitlines() if "asking again" in line]
    assert notes == [f"note: s3://flaky/b/scene.tif: the server answered HTTP 503; asking "
                     f"again in 0.1 s ({RETRY_SETTINGS})"], err


def test_retry_notes_one_per_url_and_a_limit():
    import logging

    from crossearth_cli.raster.remote import RetryNotes, retry_note

    assert retry_note("CPLE_AppDefined in HTTP error code: 502 - https://b.s3.amazonaws.com/"
                      "k/a.tif?X-Amz-Signature=x. Retrying again in 2.5 secs")[0] == \
        "https://b.s3.amazonaws.com/k/a.tif"
    assert retry_note("CPLE_AppDefined in HTTP error code: 404 - https://h/a.tif") is None
    shown = []
    with RetryNotes(shown.append):
        log = logging.getLogger(RetryNotes.LOGGERS[0])
        reads = logging.getLogger("rasterio._err")  # where retries during reads arrive
        for n in [1, 1, 2, 3, 4, 5, 6, 7, 1]:
            (reads if n % 2 else log).warning(
                f"HTTP error code: 503 - http://h/{n}.tif. Retrying again in 1.0 secs")
        log.warning("some other GDAL warning")
    assert len(shown) == 6 and shown[0].startswith("http://h/1.tif: the server answered"), shown
    assert shown[-1].startswith("more files are being asked again"), shown
    logging.getLogger(RetryNotes.LOGGERS[0]).warning(
        "HTTP error code: 503 - http://h/9.tif. Retrying again in 1.0 secs")
    assert len(shown) == 6  # removed on exit


@pytest.mark.parametrize("where, needles", [
    ("/missing.tif", ["missing.tif", "HTTP 404", "check the URL"]),
    ("/tiles", ["tiles", "HTTP 404", "a folder's URL ends with /"]),
    ("/status/403/scene.tif", ["scene.tif", "HTTP 403", "AWS_NO_SIGN_REQUEST"]),
    ("/status/500/scene.tif", ["scene.tif", "HTTP 500"]),
    ("/notes.txt", ["notes.txt", "not a readable raster"]),
    ("/cut.tif", ["cut.tif", "cannot be read to the end"]),
])
def test_remote_errors_are_one_line_and_write_nothing(tmp_path, capfd, ckpt, server, where,
                                                      needles, monkeypatch):
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")  # a 500 is not asked again here
    (server.root / "notes.txt").write_text("not a raster\n" * 100)
    whole = _small_blocks(tmp_path / "whole.tif", random_scene(96, 96, seed=1))
    (server.root / "cut.tif").write_bytes(whole.read_bytes()[:-2000])  # its last blocks gone
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(out)
    code, _, err = cli(capfd, "segment", f"{server.url}{where}", "-o", out / "c.tif", "-c",
                       ckpt, *OPTS)
    line = assert_user_error(code, err, server.url + where, *needles)
    assert line.startswith(f"crossearth: error: {server.url}{where}: "), line
    assert line.count(where) == 1, line  # named once, not again inside GDAL's words
    assert "/vsicurl/" not in line  # the URL as given, not GDAL's path
    assert_nothing_written(out, before)


def test_an_unreachable_server(tmp_path, capfd, ckpt, server):
    server.proc.kill()
    server.proc.wait()  # nothing listens on its port now
    code, _, err = cli(capfd, "segment", f"{server.url}/a.tif", "-o", tmp_path / "c.tif",
                       "-c", ckpt)
    assert_user_error(code, err, f"{server.url}/a.tif", "cannot reach the server")
    assert not (tmp_path / "c.tif").exists()


def _folder_run(capfd, ckpt, out: Path, *inputs) -> tuple[int, str, dict]:
    summary = out.parent / f"{out.name}.json"
    code, stdout, err = cli(capfd, "segment", *inputs, "-o", out, "-c", ckpt, *OPTS,
                            "--confidence", "auto", "--summary", summary)
    return code, stdout + err, json.loads(summary.read_text())


def test_a_remote_folder_runs_as_a_folder_and_a_rerun_resumes(tmp_path, capfd, ckpt, server,
                                                              monkeypatch):
    """A URL ending in / is listed (a web server's "Index of" pages here) and run as a local
    folder is: one model, outputs bit for bit a local folder run's, sub-folders mirrored. URLs
    given one by one (and local files) join it, named by their file names. A rerun skips what
    is done, fetching a few blocks per URL, not the scenes; a file replaced on the server is
    redone, and only it; a missing one fails alone, named."""
    # GDAL's block cache lives as long as the process: each CLI run is a process of its own,
    # the in-process runs here are not, so nothing under the server is cached
    monkeypatch.setenv("CPL_VSIL_CURL_NON_CACHED", f"/vsicurl/{server.url}/")
    tiles = server.root / "tiles"
    for year, seed in (("2024", 1), ("2025", 2)):
        (tiles / year).mkdir(parents=True)
        _small_blocks(tiles / year / "x.tif", random_scene(192, 256, seed=seed))
    (tiles / "notes.txt").write_text("not a raster")  # not listed: no raster suffix
    (server.root / "single").mkdir()
    write_tif(server.root / "single" / "y.tif", random_scene(64, 64, seed=3), transform=ORIGIN)
    write_tif(server.root / "single" / "my tile.tif", random_scene(32, 32, seed=6),
              transform=ORIGIN)
    own = write_tif(tmp_path / "own.tif", random_scene(64, 64, seed=4), transform=ORIGIN)
    code, _, err = cli(capfd, "segment", tiles, "-o", tmp_path / "local", "-c", ckpt, *OPTS,
                       "--confidence", "auto")
    assert code == 0, err
    # a signed URL's query, glob characters and all, is not a pattern; one object signed
    # twice runs once; a space typed as it is, is sent encoded
    inputs = [f"{server.url}/tiles/", f"{server.url}/single/y.tif?sig=a*b[1]",
              f"{server.url}/single/y.tif?sig=other", f"{server.url}/single/my tile.tif", own]

    out = tmp_path / "out"
    code, text, first = _folder_run(capfd, ckpt, out, *inputs)
    assert code == 0, text
    assert sorted(first["done"]) == ["2024/x.tif", "2025/x.tif", "my tile.tif", "own.tif",
                                     "y.tif"]
    for rel in ("2024/x", "2025/x"):
        for kind in ("classes", "confidence"):
            _same(out / f"{rel}_{kind}.tif", tmp_path / "local" / f"{rel}_{kind}.tif")
    assert (out / "y_classes.tif").exists() and (out / "own_classes.tif").exists()
    served = sum((tiles / y / "x.tif").stat().st_size for y in ("2024", "2025"))

    server.log.write_text("")
    code, text, again = _folder_run(capfd, ckpt, out, *inputs)
    assert code == 0, text
    assert again["files_skipped"] == 5 and again["files_done"] == 0, again
    fetched = sum(r["bytes"] for r in server.requests() if "/tiles/" in r["path"])
    assert 0 < fetched < 0.3 * served, (fetched, served)

    # the 2025 file replaced by another of the same size, grid and blocks: redone, alone
    _small_blocks(tiles / "2025" / "x.tif", random_scene(192, 256, seed=5))
    code, text, third = _folder_run(capfd, ckpt, out, *inputs)
    assert code == 0, text
    assert third["done"] == ["2025/x.tif"] and third["files_skipped"] == 4, third

    # a missing file fails alone, named by its URL; the others stay done
    code, text, fourth = _folder_run(capfd, ckpt, out, *inputs, f"{server.url}/gone.tif")
    assert code == 1 and fourth["files_skipped"] == 5, text
    [failed] = fourth["failed"]
    assert failed["input"] == "gone.tif" and "HTTP 404" in failed["reason"], failed
    assert f"{server.url}/gone.tif" in text
    assert "/vsicurl/" not in text and "Traceback" not in text


def test_signed_urls_keep_their_signatures_out_of_messages_and_files(tmp_path, capfd, ckpt,
                                                                    server, monkeypatch):
    """A signed URL's query string is a password for a while: error lines, notes, failed
    reasons, the manifest and --summary show it as ``?…``."""
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    monkeypatch.chdir(tmp_path)
    whole = _small_blocks(tmp_path / "whole.tif", random_scene(96, 96, seed=1))
    (server.root / "tiles").mkdir()
    write_tif(server.root / "tiles" / "good.tif", random_scene(64, 64, seed=2), transform=ORIGIN)
    (server.root / "tiles" / "cut.tif").write_bytes(whole.read_bytes()[:-2000])
    shown = []
    for where, needle in (("/missing.tif", "not found on the server (HTTP 404)"),
                          ("/tiles/cut.tif", "cannot be read to the end")):
        code, _, err = cli(capfd, "segment", f"{server.url}{where}?X-Amz-Signature=SECRET",
                           "-o", tmp_path / "c.tif", "-c", ckpt, *OPTS)
        assert_user_error(code, err, f"{server.url}{where}?…", needle)
        shown.append(err)
    code, _, err = cli(capfd, "vectorize", f"{server.url}/missing.tif?sig=SECRET", "-o",
                       tmp_path / "v.gpkg")
    assert_user_error(code, err, f"{server.url}/missing.tif?…", "HTTP 404")
    shown.append(err)

    out = tmp_path / "out"
    code, stdout, err = cli(capfd, "segment", f"{server.url}/tiles/?se=2030&sig=SECRET",
                            f"{server.url}/gone.tif?sig=SECRET", "-o", out, "-c", ckpt, *OPTS,
                            "--summary", tmp_path / "s.json")
    assert code == 1, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["done"] == ["good.tif"]
    reasons = {f["input"]: f["reason"] for f in summary["failed"]}
    assert f"{server.url}/tiles/cut.tif?…" in reasons["cut.tif"], reasons
    assert f"{server.url}/gone.tif?…" in reasons["gone.tif"], reasons
    shown += [stdout, err, (tmp_path / "s.json").read_text(),
              (out / "crossearth-manifest.jsonl").read_text()]
    # one scene's --summary names its input
    code, _, err = cli(capfd, "segment", f"{server.url}/tiles/good.tif?sig=SECRET", "-c", ckpt,
                       *OPTS, "--summary", tmp_path / "one.json")
    assert code == 0, err
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["inputs"] == [f"{server.url}/tiles/good.tif?…"], one
    shown.append((tmp_path / "one.json").read_text())
    assert not [text for text in shown if "SECRET" in text], shown


def test_output_names_that_would_collide_are_refused(tmp_path, capfd, ckpt, server):
    """Before any work, naming both inputs; for two URLs, the hint is their folder."""
    for name in ("a", "b"):
        (server.root / name).mkdir()
        write_tif(server.root / name / "x.tif", random_scene(32, 32, seed=1), transform=ORIGIN)
    own = write_tif(tmp_path / "x.tif", random_scene(32, 32, seed=2), transform=ORIGIN)
    code, _, err = cli(capfd, "segment", f"{server.url}/a/x.tif", own, "-o", tmp_path / "out",
                       "-c", ckpt)
    assert_user_error(code, err, "x.tif", "would both write", "rename one")
    code, _, err = cli(capfd, "segment", f"{server.url}/a/x.tif", f"{server.url}/b/x.tif",
                       "-o", tmp_path / "out", "-c", ckpt)
    assert_user_error(code, err, f"{server.url}/b/x.tif", "would both write",
                      f"give the folder they share, {server.url}/ ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("folder, needles", [
    ("/empty/", ["lists no rasters", "Index of"]),
    ("/nowhere/", ["not found on the server"]),
])
def test_a_remote_folder_without_rasters_is_refused(tmp_path, capfd, ckpt, server, folder,
                                                    needles):
    (server.root / "empty" / ".hidden").mkdir(parents=True)
    (server.root / "empty" / "notes.txt").write_text("no raster here")
    write_tif(server.root / "empty" / ".hidden" / "a.tif", random_scene(32, 32),
              transform=ORIGIN)  # hidden folders are left out, as local ones are
    code, _, err = cli(capfd, "segment", f"{server.url}{folder}", "-o", tmp_path / "out",
                       "-c", ckpt)
    assert_user_error(code, err, f"{server.url}{folder}", *needles)
    assert not (tmp_path / "out").exists()


def test_a_listing_keeps_every_output_inside_the_output_folder(monkeypatch):
    """What GDAL lists, as a hostile or odd server could make it: web links are decoded
    without slashes, hidden names and ``..`` are left out, a bucket's keys stay as written."""
    import pyogrio

    from crossearth_cli.batch import RASTER_SUFFIXES
    from crossearth_cli.raster.remote import list_folder

    listed = {
        "/vsicurl/http://h/t/": ["a%2F..%2F..%2Fx/e.tif", "%2E%2E/f.tif", "..%2Fy/g.tif",
                                 ".git/a.tif", ".b.tif", "a%20b.tif", "sub/c.TIF",
                                 "notes.txt"],
        "/vsis3/bkt/t/": ["pct%41.tif", "../g.tif", "d/./h.tif", "k.tif"],
    }
    monkeypatch.setattr(pyogrio, "vsi_listtree",
                        lambda folder: [folder + rel for rel in listed[folder]])
    assert list_folder("http://h/t/", RASTER_SUFFIXES) == [
        ("http://h/t/a%20b.tif", "a b.tif"),
        ("http://h/t/a%2F..%2F..%2Fx/e.tif", "a_.._.._x/e.tif"),
        ("http://h/t/sub/c.TIF", "sub/c.TIF")]
    assert list_folder("s3://bkt/t/", RASTER_SUFFIXES) == [
        ("s3://bkt/t/k.tif", "k.tif"), ("s3://bkt/t/pct%41.tif", "pct%41.tif")]


def test_remote_file_names_stay_inside_the_output_folder():
    assert file_name("https://h/d/..%2F..%2Fetc%2Fp.tif?x=1") == ".._.._etc_p.tif"
    assert file_name("https://h/") == "remote" and file_name("/vsis3/b/k/a.tif") == "a.tif"
    assert is_folder("s3://b/tiles/") and is_folder("https://h/t/?sig=1")
    assert not is_folder("s3://b/tiles/a.tif") and not is_folder("tiles/")


def test_an_s3_url_reads_through_gdals_s3_client(tmp_path, capfd, ckpt, server, monkeypatch):
    """s3://bucket/key, with the endpoint pointed at the local server (a public bucket:
    unsigned requests)."""
    (server.root / "bucket").mkdir()
    data = random_scene(64, 80, seed=2)
    write_tif(server.root / "bucket" / "scene.tif", data, transform=ORIGIN)
    _public_buckets_here(server, monkeypatch)
    code, _, err = cli(capfd, "segment", "s3://bucket/scene.tif", "-o", tmp_path / "s3.tif",
                       "-c", ckpt, *OPTS)
    assert code == 0, err
    code, _, err = cli(capfd, "segment", server.root / "bucket" / "scene.tif", "-o",
                       tmp_path / "local.tif", "-c", ckpt, *OPTS)
    assert code == 0, err
    _same(tmp_path / "s3.tif", tmp_path / "local.tif")
    assert {r["path"] for r in server.requests()} == {"/bucket/scene.tif"}
    # a prefix, listed with S3's ListObjects; its sub-folders mirrored
    (server.root / "bucket" / "tiles" / "b").mkdir(parents=True)
    for rel in ("a.tif", "b/c.TIF", "pct%41.tif"):
        write_tif(server.root / "bucket" / "tiles" / rel, data[:, :32], transform=ORIGIN)
    code, _, err = cli(capfd, "segment", "s3://bucket/tiles/", "-o", tmp_path / "out", "-c",
                       ckpt, *OPTS)
    assert code == 0, err
    out = tmp_path / "out"
    _same(out / "a_classes.tif", out / "b" / "c_classes.tif")
    # a bucket's keys are the names themselves, not percent-encoded ones: as written
    assert (out / "pct%41_classes.tif").exists()
    assert any("prefix=tiles" in r["path"] for r in server.requests())


def test_a_remote_folder_of_tiles_as_one_mosaic(tmp_path, capfd, ckpt, server):
    data = random_scene(96, 160, seed=8)
    whole = write_tif(tmp_path / "whole.tif", data, transform=ORIGIN)
    (server.root / "parts").mkdir()
    write_tif(server.root / "parts" / "left.tif", data[:, :, :70], transform=ORIGIN)
    write_tif(server.root / "parts" / "right.tif", data[:, :, 70:],
              transform=ORIGIN * ORIGIN.translation(70, 0))
    code, _, err = cli(capfd, "segment", whole, "-o", tmp_path / "w.tif", "-c", ckpt, *OPTS)
    assert code == 0, err
    code, _, err = cli(capfd, "segment", f"{server.url}/parts/", "--mosaic", "-o",
                       tmp_path / "m.tif", "-c", ckpt, *OPTS)
    assert code == 0, err
    _same(tmp_path / "m.tif", tmp_path / "w.tif")


@pytest.mark.parametrize("key, env, needles", [
    ("missing.tif", {}, ["not found", "check the URL"]),
    ("status/403/scene.tif", {}, ["access denied", "AWS_NO_SIGN_REQUEST"]),
    ("scene.tif", {"AWS_NO_SIGN_REQUEST": "NO", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                   "AWS_CONFIG_FILE": "/nonexistent", "AWS_ACCESS_KEY_ID": None,
                   "AWS_SECRET_ACCESS_KEY": None, "AWS_PROFILE": None, "HOME": "/nonexistent"},
     ["no credentials", "AWS_NO_SIGN_REQUEST"]),
])
def test_s3_errors_say_what_to_set(tmp_path, capfd, ckpt, server, monkeypatch, key, env,
                                   needles):
    """GDAL's S3 client reports the service's words, not an HTTP code: they are read too."""
    (server.root / "bucket").mkdir()
    write_tif(server.root / "bucket" / "scene.tif", random_scene(64, 64, seed=2))
    _public_buckets_here(server, monkeypatch, GDAL_HTTP_MAX_RETRY="0", **env)
    url = f"s3://{'' if key.startswith('status') else 'bucket/'}{key}"
    code, _, err = cli(capfd, "segment", url, "-o", tmp_path / "c.tif", "-c", ckpt)
    line = assert_user_error(code, err, url, *needles)
    assert "readable raster" not in line and not (tmp_path / "c.tif").exists()


def test_a_shared_stretch_over_a_remote_folder_follows_every_file(tmp_path, capfd, ckpt,
                                                                  server, monkeypatch):
    """--range shared takes one stretch from all inputs: the local folder's, printed alike; a
    rerun skips all; a file replaced on the server changes the stretch, so all are redone."""
    monkeypatch.setenv("CPL_VSIL_CURL_NON_CACHED", f"/vsicurl/{server.url}/")
    (server.root / "u16").mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        write_tif(server.root / "u16" / f"{name}.tif",
                  random_scene(48, 64, seed=seed).astype(np.uint16) * 40, transform=ORIGIN)

    def run(*inputs, out):
        code, text, summary = _folder_run(capfd, ckpt, tmp_path / out, *inputs, "--range",
                                          "shared")
        assert code == 0, text
        stretch = text[text.find("--range shared"):].split("\n")[0]  # only when it ran
        return stretch, summary

    local, _ = run(server.root / "u16", out="local")
    remote, first = run(f"{server.url}/u16/", out="out")
    assert remote == local and "one stretch" in remote and first["files_done"] == 2
    for name in ("a", "b"):
        _same(tmp_path / "out" / f"{name}_classes.tif", tmp_path / "local" / f"{name}_classes.tif")
    _, again = run(f"{server.url}/u16/", out="out")
    assert again["files_skipped"] == 2, again
    write_tif(server.root / "u16" / "b.tif",
              random_scene(48, 64, seed=2).astype(np.uint16) * 60, transform=ORIGIN)
    _, third = run(f"{server.url}/u16/", out="out")
    assert third["files_done"] == 2, third


def test_an_aoi_file_on_a_server(tmp_path, capfd, ckpt, server):
    """--aoi URL reads the vector file over the network: the local file's outputs; a missing
    one is one line naming the URL."""
    import shapely

    scene = write_tif(tmp_path / "scene.tif", random_scene(96, 96, seed=1), crs="EPSG:32633",
                      transform=ORIGIN)
    x0, y1 = ORIGIN.c, ORIGIN.f
    area = shapely.Polygon([(x0 + 5, y1 - 5), (x0 + 40, y1 - 8), (x0 + 20, y1 - 40)])
    feature = {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(area)}
    text = json.dumps({"type": "FeatureCollection", "features": [feature],
                       "crs": {"type": "name", "properties": {"name": "EPSG:32633"}}})
    (server.root / "area.geojson").write_text(text)
    (tmp_path / "area.geojson").write_text(text)
    for aoi, out in ((tmp_path / "area.geojson", "local.tif"),
                     (f"{server.url}/area.geojson", "remote.tif")):
        code, _, err = cli(capfd, "segment", scene, "-o", tmp_path / out, "-c", ckpt, *OPTS,
                           "--aoi", aoi)
        assert code == 0, err
    _same(tmp_path / "remote.tif", tmp_path / "local.tif")
    (server.root / "notes.txt").write_text("no polygons here\n" * 50)
    for name, needle in (("gone.geojson", "not found"), ("notes.txt", "as a vector file")):
        code, _, err = cli(capfd, "segment", scene, "-o", tmp_path / "gone.tif", "-c", ckpt,
                           "--aoi", f"{server.url}/{name}")
        line = assert_user_error(code, err, f"--aoi {server.url}/{name}", needle)
        assert "/vsicurl/" not in line and not (tmp_path / "gone.tif").exists()


def test_files_on_a_slow_server_are_opened_side_by_side(tmp_path, capfd, ckpt):
    """A folder on a server 0.2 s away: the files' first requests are in flight together
    (they would come 0.2 s apart, one file after another, if each waited for the last)."""
    (tmp_path / "www" / "tiles").mkdir(parents=True)
    for i in range(6):
        write_tif(tmp_path / "www" / "tiles" / f"t{i}.tif", random_scene(32, 32, seed=i),
                  transform=ORIGIN)
    log = tmp_path / "requests.jsonl"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("range_server.py")),
                             tmp_path / "www", log, "200"], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        code, _, err = cli(capfd, "segment", f"{url}/tiles/", "-o", tmp_path / "out", "-c",
                           ckpt, *OPTS)
    finally:
        proc.kill()
        proc.wait()
    assert code == 0, err
    first: dict[str, float] = {}  # each file's first ranged GET (its header), when answered
    for r in map(json.loads, log.read_text().splitlines()):
        if r["method"] == "GET" and r["range"] and r["path"].endswith(".tif"):
            first.setdefault(r["path"], r["t"])
    assert len(first) == 6
    assert max(first.values()) - min(first.values()) < 0.5, first  # not 5 × 0.2 s


def test_a_stop_while_checking_a_remote_folder_is_told(tmp_path, capfd, ckpt):
    """A rerun over URLs on a server 0.3 s away spends its first seconds fetching their
    fingerprints; SIGTERM then says so and writes --summary (all under not_run), and the next
    rerun skips them all."""
    (tmp_path / "www").mkdir()
    for i in range(4):
        write_tif(tmp_path / "www" / f"t{i}.tif", random_scene(32, 32, seed=i), transform=ORIGIN)
    log = tmp_path / "requests.jsonl"
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("range_server.py")),
                               tmp_path / "www", log, "300"], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(server.stdout.readline())}"
        summary = tmp_path / "s.json"
        args = ["segment", *(f"{url}/t{i}.tif" for i in range(4)), "-o", tmp_path / "out",
                "-c", ckpt, *OPTS, "--summary", summary]
        code, _, err = cli(capfd, *args)
        assert code == 0, err
        asked = len(log.read_text().splitlines())
        proc = subprocess.Popen([sys.executable, "-m", "crossearth_cli", *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=real_env())
        # stopped at its first fingerprint request
        err = sigterm_when(proc, lambda: len(log.read_text().splitlines()) > asked)
        assert proc.returncode == 143 and "Traceback" not in err, err
        assert (f"note: stopped (SIGTERM) while checking which of 4 file(s) an earlier run "
                f"finished: none was run; the same command again does the work (--summary "
                f"{summary} lists the files not run under not_run)") in err, err
        data = json.loads(summary.read_text())
        assert data["interrupted"] == "SIGTERM" and data["done"] == [], data
        assert data["not_run"] == [f"t{i}.tif" for i in range(4)], data
        code, _, err = cli(capfd, *args)
        assert code == 0, err
        assert json.loads(summary.read_text())["files_skipped"] == 4
    finally:
        server.kill()
        server.wait()


def test_torchrun_over_a_remote_folder_and_a_remote_scene(tmp_path, capfd, ckpt, server):
    """Two ranks share a remote folder's files (each file once, in one rank's manifest) and
    split a remote scene into row bands: the outputs of one process on the local files."""
    from test_batch import _torchrun

    tiles = server.root / "tiles"
    (tiles / "sub").mkdir(parents=True)
    for i, rel in enumerate(("a.tif", "b.tif", "sub/c.tif", "sub/d.tif")):
        write_tif(tiles / rel, random_scene(64 + 16 * i, 80, seed=i), transform=ORIGIN)
    _small_blocks(server.root / "scene.tif", random_scene(150, 120, seed=9))
    for source, one, two in ((tiles, "one", f"{server.url}/tiles/"),
                             (server.root / "scene.tif", "one.tif", f"{server.url}/scene.tif")):
        code, _, err = cli(capfd, "segment", source, "-o", tmp_path / one, "-c", ckpt, *OPTS)
        assert code == 0, err
        proc = _torchrun("segment", two, "-o", tmp_path / f"two{Path(one).suffix}", "-c", ckpt,
                         *OPTS)
        assert proc.returncode == 0, proc.stderr + proc.stdout
    for rel in ("a", "b", "sub/c", "sub/d"):
        _same(tmp_path / "two" / f"{rel}_classes.tif", tmp_path / "one" / f"{rel}_classes.tif")
    manifests = sorted((tmp_path / "two").glob("crossearth-*.jsonl"))
    records = [[json.loads(line)["input"] for line in m.read_text().splitlines()]
               for m in manifests]
    assert len(manifests) == 2 and all(len(r) == 2 for r in records), records
    assert sorted(sum(records, [])) == ["a.tif", "b.tif", "sub/c.tif", "sub/d.tif"]
    _same(tmp_path / "two.tif", tmp_path / "one.tif")


def test_vectorize_reads_a_class_raster_on_a_server(tmp_path, capfd, server):
    """`crossearth vectorize URL` (and --confidence URL), in worker processes and windows:
    the local file's layers, feature for feature; a missing URL is one line naming it."""
    import pyogrio
    import shapely

    from crossearth_cli.vector.synthetic import blobs, write_class_raster

    names = ["background", "building", "road", "tree"]
    labels = blobs(300, 260, 4, 1.5, seed=5)
    for folder in (tmp_path, server.root):
        write_class_raster(folder / "classes.tif", labels, names=names)
        write_tif(folder / "conf.tif", random_scene(300, 260, seed=6)[:1], nodata=None)
    opts = ["--window", "128", "--workers", "2", "--simplify", "0.5", "--centerlines"]
    code, _, err = cli(capfd, "vectorize", tmp_path / "classes.tif", "-o", tmp_path / "l.gpkg",
                       "--confidence", tmp_path / "conf.tif", *opts)
    assert code == 0, err
    code, out, err = cli(capfd, "vectorize", f"{server.url}/classes.tif?sig=1",
                         "-o", tmp_path / "r.gpkg", "--confidence", f"{server.url}/conf.tif",
                         *opts)
    assert code == 0, err
    layers = pyogrio.list_layers(tmp_path / "l.gpkg").tolist()
    assert layers == pyogrio.list_layers(tmp_path / "r.gpkg").tolist() and len(layers) > 3
    for name, _ in layers:
        want = pyogrio.raw.read(tmp_path / "l.gpkg", layer=name)
        got = pyogrio.raw.read(tmp_path / "r.gpkg", layer=name)
        assert len(got[2]) == len(want[2]) > 0, name
        assert shapely.equals_exact(shapely.from_wkb(got[2]), shapely.from_wkb(want[2]),
                                    0).all(), name
        for a, b in zip(got[3], want[3]):
            np.testing.assert_array_equal(a, b)
    gets = [r for r in server.requests() if r["method"] == "GET"]
    assert gets and all(r["range"] for r in gets)
    code, _, err = cli(capfd, "vectorize", f"{server.url}/gone.tif", "-o", tmp_path / "g.gpkg")
    line = assert_user_error(code, err, f"{server.url}/gone.tif", "HTTP 404")
    assert "/vsicurl/" not in line and not (tmp_path / "g.gpkg").exists()
