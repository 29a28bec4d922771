"""``crossearth vectorize`` as a user runs it: results on success, one clear line on mistakes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyogrio
import pytest

from crossearth_cli.vector.synthetic import blobs, write_class_raster

NAMES = ["background", "building", "road", "tree"]


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "crossearth_cli", "vectorize", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def assert_user_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("crossearth: error: ")
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def no_gpkg_left(folder):
    return not [p for p in folder.rglob("*") if ".gpkg" in p.name]


@pytest.fixture
def raster(tmp_path):
    return write_class_raster(tmp_path / "classes.tif", blobs(60, 70, 4, 1.5, seed=2), names=NAMES)


def test_vectorize_writes_layers(tmp_path, raster):
    out = tmp_path / "out.gpkg"
    proc = cli(raster, "-o", out, "--classes", "building,road", "--centerlines", "--simplify",
               "0.5", "--min-area", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert dict(pyogrio.list_layers(out)) == {
        "building": "Polygon", "road": "Polygon", "road_centerlines": "LineString"
    }
    _, _, _, fields = pyogrio.raw.read(out, layer="building")
    assert (fields[2] >= 1.0).all()  # --min-area applied, in m²


def test_a_missing_output_folder_is_made(tmp_path, raster):
    out = tmp_path / "new" / "folder" / "out.gpkg"
    proc = cli(raster, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and pyogrio.list_layers(out).size

def test_float_raster_is_refused(tmp_path):
    src = write_class_raster(tmp_path / "prob.tif", np.random.rand(32, 32).astype("float32"),
                             nodata=None)
    proc = cli(src, "-o", tmp_path / "out.gpkg")
    assert_user_error(proc, "prob.tif", "float32", "not integer class ids")
    assert no_gpkg_left(tmp_path)


def test_unknown_class_name(tmp_path, raster):
    proc = cli(raster, "-o", tmp_path / "out.gpkg", "--classes", "building,bulding")
    assert_user_error(proc, "unknown class 'bulding'", "1=building")
    assert no_gpkg_left(tmp_path)


def test_existing_output_needs_overwrite(tmp_path, raster):
    out = tmp_path / "out.gpkg"
    out.write_bytes(b"not yours to replace")
    proc = cli(raster, "-o", out)
    assert_user_error(proc, "out.gpkg", "exists", "--overwrite")
    assert out.read_bytes() == b"not yours to replace"
    assert [p.name for p in tmp_path.iterdir() if ".gpkg" in p.name] == ["out.gpkg"]
    assert cli(raster, "-o", out, "--overwrite").returncode == 0
    assert len(pyogrio.list_layers(out)) == 4


@pytest.mark.parametrize("kind", ["under-a-file", "file-in-the-path", "read-only-folder"])
def test_unwritable_folder(tmp_path, raster, kind):
    if kind == "under-a-file":
        blocker = tmp_path / "notafolder"
        blocker.write_text("x")
        out = blocker / "out.gpkg"
        words = ["is not a folder"]
    elif kind == "file-in-the-path":
        (tmp_path / "no").write_text("x")
        out = tmp_path / "no" / "such" / "out.gpkg"
        words = ["part of its path is a file"]
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write into read-only folders")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "out.gpkg"
        words = ["not writable"]
    proc = cli(raster, "-o", out)
    assert_user_error(proc, "out.gpkg", *words)
    assert not out.exists() and no_gpkg_left(tmp_path)


def test_bad_options_are_one_line(tmp_path, raster):
    assert_user_error(cli(raster, "-o", tmp_path / "o.gpkg", "--connectivity", "6"), "4 or 8")
    assert_user_error(cli(raster, "-o", tmp_path / "o.gpkg", "--min-area", "-1"), "--min-area")
    long_name = tmp_path / "long" / ("a" * 225 + ".gpkg")  # its temporary fits in 255 bytes
    assert cli(raster, "-o", long_name).returncode == 0 and long_name.exists()
    long_name.unlink()
    from crossearth_cli.errors import ConfigError
    from crossearth_cli.vector import VectorizeOptions

    with pytest.raises(ConfigError, match="--min-area must be a number ≥ 0, not -1"):
        VectorizeOptions(min_area=-1)  # an int from the library, as the CLI's floats
    for option in ("--fill-holes", "--min-area", "--simplify"):  # inf crashed --fill-holes
        for value in ("inf", "nan"):
            assert_user_error(cli(raster, "-o", tmp_path / "o.gpkg", option, value),
                              f"{option} must be a number ≥ 0, not {value}")
    assert_user_error(cli(raster, "-o", tmp_path / "o.shp"), "GeoPackage")
    assert_user_error(cli(tmp_path / "missing.tif", "-o", tmp_path / "o.gpkg"), "not found")
    (tmp_path / "notes.tif").write_text("not a raster\n" * 20)
    proc = cli(tmp_path / "notes.tif", "-o", tmp_path / "o.gpkg")
    assert_user_error(proc, f"error: {tmp_path / 'notes.tif'}: cannot be read as a raster (not "
                      "recognized as being in a supported file format)")
    assert no_gpkg_left(tmp_path)


def test_help_lists_the_options():
    proc = subprocess.run(
        [sys.executable, "-m", "crossearth_cli", "vectorize", "--help"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0
    for opt in ("--classes", "--min-area", "--fill-holes", "--simplify", "--connectivity",
                "--regularize", "--centerlines", "--layer-per-class", "--single-layer",
                "--overwrite", "--confidence"):
        assert opt in proc.stdout


def test_negative_class_ids_get_their_own_layers(tmp_path):
    """A class raster from elsewhere (int16) with ids -2 and 2 and no names: two layers, named
    so that they read apart (-2's was class__2)."""
    arr = np.zeros((40, 40), dtype=np.int16)
    arr[5:15, 5:15], arr[20:30, 20:30] = -2, 2
    src = write_class_raster(tmp_path / "ids.tif", arr)
    out = tmp_path / "ids.gpkg"
    proc = cli(src, "-o", out)
    assert proc.returncode == 0, proc.stderr
    layers = dict(pyogrio.list_layers(out))
    assert "class_minus_2" in layers and "class_2" in layers, layers
