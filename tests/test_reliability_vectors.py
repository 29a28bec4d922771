"""Class rasters that are hard to vectorize: specks by the hundred thousand, corner-touching
checkerboards (docs/reliability.md)."""

from __future__ import annotations

import time

import numpy as np
import pyogrio
import pytest
import shapely
from reliability_helpers import cli, hidden_leftovers
from scipy import ndimage as ndi

from crossearth_cli.vector.synthetic import write_class_raster

NAMES = ["background", "building", "road"]
PIXEL_M2 = 0.25  # write_class_raster: 0.5 m pixels


def layers(path) -> dict[str, tuple[np.ndarray, dict]]:
    out = {}
    for name, _ in pyogrio.list_layers(path):
        meta, _, wkb, fields = pyogrio.raw.read(path, layer=name)
        out[name] = (shapely.from_wkb(wkb), dict(zip(list(meta["fields"]), fields, strict=True)))
    return out


def components(arr: np.ndarray, connectivity: int) -> int:
    structure = ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    return sum(ndi.label(arr == k, structure=structure)[1] for k in np.unique(arr))


def test_a_huge_number_of_tiny_polygons_with_min_area(tmp_path, capfd):
    """Salt-and-pepper classes: ~90 000 specks. --min-area drops them after the seams are
    merged, so the GeoPackage holds only the real regions and the run stays bounded (the
    polygonizing of every speck is what costs; writing them is avoided)."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 3, (500, 500)).astype(np.uint8)
    arr[100:200, 100:220] = 1  # two real regions among the noise
    arr[300:420, 260:400] = 2
    src = write_class_raster(tmp_path / "noise.tif", arr, names=NAMES)
    n_specks = components(arr, 4)
    assert n_specks > 80_000
    out = tmp_path / "o.gpkg"
    t0 = time.perf_counter()
    code, stdout, err = cli(capfd, "vectorize", src, "-o", out, "--min-area", "3",
                            "--window", "256")
    seconds = time.perf_counter() - t0
    assert code == 0, err
    print(f"{n_specks} specks vectorized in {seconds:.1f} s")
    assert seconds < 90
    got = layers(out)
    total = sum(len(g) for g, _ in got.values())
    assert total < n_specks / 20  # what is left is the few regions bigger than 3 m²
    for geoms, cols in got.values():
        assert (cols["area_m2"] >= 3.0).all()
        assert shapely.is_valid(geoms).all()
    big = {name: cols["area_m2"].max() for name, (_, cols) in got.items() if len(_)}
    assert big["building"] >= 100 * 120 * PIXEL_M2 and big["road"] >= 120 * 140 * PIXEL_M2
    assert not hidden_leftovers(tmp_path)


def test_fill_holes_absorbs_specks_inside_regions(tmp_path, capfd):
    """Specks inside a region are absorbed on the pixels (--fill-holes): the region comes out
    as one polygon without hundreds of holes."""
    rng = np.random.default_rng(1)
    arr = np.zeros((300, 300), np.uint8)
    arr[50:250, 50:250] = 1
    yy, xx = np.mgrid[0:300, 0:300]
    grid = (yy % 3 == 0) & (xx % 3 == 0) & (yy > 52) & (yy < 247) & (xx > 52) & (xx < 247)
    specks = grid & (rng.random((300, 300)) < 0.5)  # ~2000 isolated one-pixel specks
    arr[specks] = 2
    src = write_class_raster(tmp_path / "specks.tif", arr, names=NAMES)
    out = tmp_path / "o.gpkg"
    code, _, err = cli(capfd, "vectorize", src, "-o", out, "--classes", "building")
    assert code == 0, err
    geoms, _ = layers(out)["building"]
    assert shapely.get_num_interior_rings(geoms[0]) == specks.sum()  # without: all the holes
    code, _, err = cli(capfd, "vectorize", src, "-o", out, "--fill-holes", "1",
                       "--classes", "building", "--overwrite")
    assert code == 0, err
    geoms, cols = layers(out)["building"]
    assert len(geoms) == 1 and shapely.is_valid(geoms).all()
    assert shapely.get_num_interior_rings(geoms[0]) == 0
    assert cols["area_m2"][0] == pytest.approx(200 * 200 * PIXEL_M2)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("simplify", ["0", "0.4"])
def test_checkerboards_give_valid_geometries(tmp_path, capfd, connectivity, simplify):
    """Pixels touching only at corners make self-touching rings (invalid in OGC terms) when
    joined with 8-connectivity; they are repaired into valid (Multi)Polygons, and without
    simplification no area is lost or double counted."""
    yy, xx = np.mgrid[0:96, 0:96]
    arr = ((yy // 1 + xx // 1) % 2).astype(np.uint8)  # 1-pixel checkerboard
    arr[48:, :48] = ((yy[48:, :48] // 3 + xx[48:, :48] // 3) % 2)  # 3-pixel squares
    arr[:48, 48:] = np.where(np.abs(yy[:48, 48:] - (xx[:48, 48:] - 48)) % 4 == 0, 2, 0)  # stairs
    src = write_class_raster(tmp_path / "checker.tif", arr, names=NAMES)
    out = tmp_path / "o.gpkg"
    code, _, err = cli(capfd, "vectorize", src, "-o", out, "--connectivity", str(connectivity),
                       "--simplify", simplify, "--window", "40")
    assert code == 0, err
    for name, (geoms, cols) in layers(out).items():
        assert shapely.is_valid(geoms).all(), (name, shapely.is_valid_reason(geoms))
        class_id = NAMES.index(name)
        if simplify == "0" and (arr == class_id).any():
            assert cols["area_m2"].sum() == pytest.approx((arr == class_id).sum() * PIXEL_M2)
            # no overlaps: the union covers exactly the class's pixels
            assert shapely.union_all(geoms).area == pytest.approx(
                (arr == class_id).sum() * PIXEL_M2, rel=1e-9)


def test_vectorize_refuses_its_input_as_output_and_reports_damaged_rasters(tmp_path, capfd):
    """A class raster named .gpkg is not replaced by the GeoPackage; a truncated file, or a
    tile that fails to decode mid-run, is one line and exit 2, not a traceback."""
    from reliability_helpers import assert_user_error, snapshot

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 4, (512, 512), dtype=np.uint8)
    named_gpkg = write_class_raster(tmp_path / "classes.gpkg", arr, names=["a", "b", "c", "d"])
    before = named_gpkg.read_bytes()
    code, _, err = cli(capfd, "vectorize", named_gpkg, "-o", named_gpkg, "--overwrite")
    assert_user_error(code, err, "the vector output is an input raster")
    assert named_gpkg.read_bytes() == before

    good = write_class_raster(tmp_path / "good.tif", arr, names=["a", "b", "c", "d"])
    data = good.read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    damaged = tmp_path / "damaged.tif"  # a tile in the middle overwritten with junk
    mid = len(data) // 2
    damaged.write_bytes(data[:mid] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
                        + data[mid + 4096:])
    for src, workers in ((truncated, "1"), (damaged, "1"), (damaged, "2")):
        before = snapshot(tmp_path)
        code, _, err = cli(capfd, "vectorize", src, "-o", tmp_path / "v.gpkg", "--window", "256",
                           "--workers", workers)
        assert_user_error(code, err, src.name, "cannot be read")
        assert snapshot(tmp_path) == before


def test_a_label_raster_with_thousands_of_ids_asks_for_one_layer(tmp_path, capfd):
    """One layer per id of a 16-bit instance raster would be thousands of layers (minutes, and
    a swamped GIS): refused before any work, and --single-layer does it in one layer."""
    from reliability_helpers import assert_user_error, snapshot

    ids = np.arange(60 * 60, dtype=np.uint16).reshape(60, 60) // 4  # 900 ids
    src = write_class_raster(tmp_path / "labels.tif", ids, nodata=None)
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "vectorize", src, "-o", tmp_path / "v.gpkg")
    assert_user_error(code, err, "labels.tif", "more than 256 distinct class ids",
                      "--single-layer")
    assert snapshot(tmp_path) == before
    code, _, err = cli(capfd, "vectorize", src, "-o", tmp_path / "v.gpkg", "--single-layer")
    assert code == 0, err
    assert pyogrio.read_info(tmp_path / "v.gpkg", layer="polygons")["features"] == 900


def test_bad_vectorize_options_name_the_option(tmp_path, capfd):
    from reliability_helpers import assert_user_error

    src = write_class_raster(tmp_path / "c.tif", np.zeros((32, 32), np.uint8), names=["a"])
    for args, needle in ((("--workers", "-2"), "--workers must be"),
                         (("--window", "0"), "--window must be")):
        code, _, err = cli(capfd, "vectorize", src, "-o", tmp_path / "v.gpkg", *args)
        assert_user_error(code, err, needle)


def test_a_full_disk_while_writing_the_geopackage_says_so(tmp_path, capfd, monkeypatch):
    """SQLite reports a full disk in its own words ("no such table: gpkg_contents" when the
    table could not be created): the folder's free space decides, as for rasters; one line,
    and no temporary GeoPackage left."""
    import os

    import pyogrio.raw
    from reliability_helpers import assert_user_error

    src = write_class_raster(tmp_path / "c.tif", np.eye(64, dtype=np.uint8), names=NAMES)
    out = tmp_path / "out"
    out.mkdir()

    def full(*args, **kwargs):
        raise pyogrio.errors.DataSourceError(
            "sqlite3_exec(INSERT INTO gpkg_contents ...) failed: no such table: gpkg_contents")

    class Full:
        f_bavail, f_frsize = 3, 4096

    real_statvfs = os.statvfs
    monkeypatch.setattr(pyogrio.raw, "write", full)
    monkeypatch.setattr("crossearth_cli.raster.writer.os.statvfs",
                        lambda p: Full() if str(p) == str(out) else real_statvfs(p))
    code, _, err = cli(capfd, "vectorize", src, "-o", out / "v.gpkg")
    assert_user_error(code, err, "v.gpkg", "no space left")
    assert list(out.iterdir()) == []


def test_vectorize_workers_end_with_a_killed_parent(tmp_path):
    """A SIGKILLed `crossearth vectorize` cannot stop its worker processes itself: the
    kernel ends them with it (they idled for good, holding the caller's pipes open)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    rng = np.random.default_rng(0)
    src = write_class_raster(tmp_path / "noise.tif", rng.integers(0, 3, (1500, 1500))
                             .astype(np.uint8), names=NAMES)
    proc = subprocess.Popen([sys.executable, "-m", "crossearth_cli", "vectorize", str(src),
                             "-o", str(tmp_path / "o.gpkg"), "--workers", "2", "--window",
                             "128"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    kids: list[int] = []
    deadline = time.monotonic() + 120
    while len(kids) < 2 and proc.poll() is None and time.monotonic() < deadline:
        kids = [int(k) for k in children.read_text().split()] if children.exists() else []
        time.sleep(0.05)
    assert len(kids) >= 2, "the workers never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
        except (FileNotFoundError, IndexError):
            return False
        return state != "Z"

    deadline = time.monotonic() + 30
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [k for k in kids if alive(k)]
    for k in left:
        os.kill(k, signal.SIGKILL)
    assert not left
