"""``--range shared``: the tiles of one mosaic get one stretch, the mosaic's own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import random_scene, write_tif
from rasterio.transform import from_origin
from reliability_helpers import cli

from crossearth_cli.raster import shared_range
from crossearth_cli.raster.reader import SharedScaling, parse_range
from crossearth_cli.raster.shared_range import WeightedQuantiles, shared_scaling


def _mosaic() -> np.ndarray:
    """uint16, 3×96×288: a dark left third, a bright middle, a mid right (unequal stretches)."""
    img = random_scene(96, 288, seed=3).astype(np.uint16)
    scene = img * 4 + 100
    scene[:, :, 96:192] = img[:, :, 96:192] * 12 + 2000
    scene[:, :, 192:] = img[:, :, 192:] * 2 + 900
    return scene


def _cut(folder: Path, scene: np.ndarray, columns=(0, 96, 192, 288)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_tif(folder / f"t{i}.tif", scene[:, :, x0:x1],
                      transform=from_origin(500000 + x0 * 0.5, 5800000, 0.5, 0.5))
            for i, (x0, x1) in enumerate(zip(columns, columns[1:]))]


def _weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cdf = (np.cumsum(w) - w / 2) / w.sum()
    return float(np.interp(q / 100, cdf, v))


def test_inputs_weigh_as_many_pixels_as_they_hold():
    rng = np.random.default_rng(0)
    small, big = rng.uniform(0, 1, 3000), rng.uniform(10, 11, 3000)
    pool = WeightedQuantiles()
    pool.add(small, weight=1000.0)
    pool.add(big, weight=4000.0)  # the same number of samples standing for 4× the pixels
    pooled = np.concatenate([small, np.repeat(big, 4)])
    for q in (2, 10, 30, 50, 98):
        assert pool.percentile(q) == pytest.approx(np.percentile(pooled, q), abs=0.01)
    # weighted by samples instead, the 30 % point would sit in the small input's values
    assert pool.percentile(30) > 10


def test_the_pool_stays_bounded_and_keeps_its_percentiles(monkeypatch):
    monkeypatch.setattr(shared_range, "POINTS_PER_INPUT", 256)
    monkeypatch.setattr(shared_range, "POOL_LIMIT", 2048)
    monkeypatch.setattr(shared_range, "POOL_KEPT", 1024)
    rng = np.random.default_rng(1)
    pool, values, weights = WeightedQuantiles(), [], []
    for i in range(60):
        v = rng.normal(i * 0.3, 1 + i % 5, size=500)
        w = float(rng.integers(1, 50))
        pool.add(v, w)
        assert pool.size <= 2048
        values.append(v)
        weights.append(np.full(v.size, w / v.size))
    values, weights = np.concatenate(values), np.concatenate(weights)
    spread = np.percentile(values, 98) - np.percentile(values, 2)
    for q in (2, 50, 98):
        exact = _weighted_percentile(values, weights, q)
        assert abs(pool.percentile(q) - exact) < 0.01 * spread


def test_shared_scaling_is_the_mosaics_stretch(tmp_path):
    scene = _mosaic()
    tiles = _cut(tmp_path / "tiles", scene, columns=(0, 60, 96, 200, 288))  # unequal sizes
    broken = tmp_path / "tiles" / "broken.tif"
    broken.write_bytes(b"not a tiff")
    paletted = write_tif(tmp_path / "tiles" / "pal.tif", np.zeros((1, 32, 32), np.uint8),
                         photometric="palette")
    with rasterio.open(paletted, "r+") as ds:
        ds.write_colormap(1, {0: (255, 255, 255, 255)})
    skipped = []
    shared = shared_scaling([*tiles, broken, paletted], None, "RGB",
                            skipped=lambda p, why: skipped.append(p))
    assert shared.files == len(tiles) and skipped == [broken]
    for band, s in enumerate(shared.scaling):
        lo, hi = np.percentile(scene[band], (2, 98))
        assert s.low == pytest.approx(lo, abs=0.002 * (hi - lo))
        assert s.high == pytest.approx(hi, abs=0.002 * (hi - lo))
        # each tile alone would have been stretched far from it
        assert max(abs(np.percentile(scene[band][:, :60], 98) - hi),
                   abs(np.percentile(scene[band][:, 200:], 2) - lo)) > 0.2 * (hi - lo)


def test_shared_is_a_range_word():
    assert parse_range("shared", 3) == "shared"
    assert parse_range(" Shared ", 3) == "shared"


def parse_range_floats(text: str) -> list[float]:
    return [v for s in parse_range(text, 3) for v in (s.low, s.high)]


def _assert_same_raster(a: Path, b: Path) -> None:
    with rasterio.open(a) as got, rasterio.open(b) as want:
        np.testing.assert_array_equal(got.read(), want.read())


def _stretch(err: str) -> str:
    return re.search(r"--range (\S+) reuses it", err).group(1)


def _classes(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(folder.glob("*_classes.tif")):
        with rasterio.open(p) as ds:
            out[p.name] = ds.read(1)
    return out


def test_folder_run_applies_one_stretch_to_every_tile(tmp_path, capfd, ckpt):
    scene = _mosaic()
    _cut(tmp_path / "tiles", scene)
    base = ("-c", ckpt, "--batch-size", "1")
    code, _, err = cli(capfd, "segment", tmp_path / "tiles", "-o", tmp_path / "shared",
                       "--range", "shared", *base)
    assert code == 0, err
    assert "one stretch for 3 input(s)" in err
    limits = _stretch(err)
    values = [float(v) for v in limits.split(",")]
    for band in range(3):
        lo, hi = np.percentile(scene[band], (2, 98))
        assert values[2 * band] == pytest.approx(lo, abs=0.002 * (hi - lo))
        assert values[2 * band + 1] == pytest.approx(hi, abs=0.002 * (hi - lo))
    shared = _classes(tmp_path / "shared")
    assert len(shared) == 3

    # what was reported is what every tile got: the same limits given explicitly
    code, _, err = cli(capfd, "segment", tmp_path / "tiles", "-o", tmp_path / "explicit",
                       "--range", limits, *base)
    assert code == 0, err
    explicit = _classes(tmp_path / "explicit")
    for name in shared:
        np.testing.assert_array_equal(shared[name], explicit[name])

    # each tile stretched alone gives other maps
    code, _, err = cli(capfd, "segment", tmp_path / "tiles", "-o", tmp_path / "auto",
                       "--range", "auto", *base)
    assert code == 0, err
    auto = _classes(tmp_path / "auto")
    assert any((auto[n] != shared[n]).mean() > 0.05 for n in shared)


def test_a_new_input_redoes_every_tile(tmp_path, capfd, ckpt):
    tiles = _cut(tmp_path / "tiles", _mosaic())
    args = ("segment", tmp_path / "tiles", "-o", tmp_path / "out", "--range", "shared",
            "-c", ckpt, "--summary", tmp_path / "run.json")

    def run() -> dict:
        code, _, err = cli(capfd, *args)
        assert code == 0, err
        return json.loads((tmp_path / "run.json").read_text())

    first = run()
    assert len(first["done"]) == 3
    assert len(first["shared_range"]) == 3  # MIN,MAX per channel, for the record
    again = run()
    assert (len(again["done"]), len(again["skipped"])) == (0, 3)  # nothing changed
    with rasterio.open(tiles[0]) as ds:  # a fourth tile: the shared stretch moves
        write_tif(tmp_path / "tiles" / "t3.tif", ds.read() // 2 + 50)
    assert len(run()["done"]) == 4


def test_the_reader_applies_a_shared_scaling(tmp_path):
    from crossearth_cli.raster.reader import BandScaling, SceneReader

    path = write_tif(tmp_path / "a.tif", _mosaic()[:, :, :96])
    shared = SharedScaling((BandScaling(0, 5000),) * 3, files=7)
    with SceneReader(path, value_range=shared) as reader:
        assert reader.scaling == list(shared.scaling)
        assert any("7 inputs together" in n for n in reader.notes)


def test_the_printed_limits_read_back_as_the_same_floats(tmp_path, capfd, ckpt):
    """Large values (a float scene offset by 2.5e6): six significant digits would move the
    stretch by ~10 units and change classes; the line must give back the very floats used."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(3):
        write_tif(folder / f"f{i}.tif",
                  (2.5e6 + rng.normal(20 * i, 10, (3, 40, 40))).astype(np.float64))
    code, _, err = cli(capfd, "segment", folder, "-o", tmp_path / "out", "--range", "shared",
                       "-c", ckpt, "--summary", tmp_path / "s.json")
    assert code == 0, err
    printed = [float(v) for v in _stretch(err).split(",")]
    recorded = json.loads((tmp_path / "s.json").read_text())["shared_range"]
    assert printed == [v for pair in recorded for v in pair]


def test_8bit_and_paletted_inputs_are_used_as_they_are(tmp_path, capfd, ckpt):
    """A mixed folder: the 16-bit tiles share a stretch; an 8-bit tile and a paletted one
    (even read as indices with --bands) are neither pooled nor stretched."""
    scene = _mosaic()
    folder = tmp_path / "tiles"
    _cut(folder, scene)
    write_tif(folder / "rgb8.tif", random_scene(64, 64, seed=9))
    pal = write_tif(folder / "pal.tif", np.arange(64 * 64, dtype=np.uint8).reshape(1, 64, 64)
                    % 4, photometric="palette")
    with rasterio.open(pal, "r+") as ds:
        ds.write_colormap(1, {i: (60 * i, 255 - 60 * i, 30 * i, 255) for i in range(4)})
    for extra in ((), ("--bands", "1,1,1")):
        out = tmp_path / ("out" + "".join(extra).replace(",", ""))
        code, _, err = cli(capfd, "segment", folder, "-o", out, "--range", "shared", "-c",
                           ckpt, "--batch-size", "1", *extra)
        assert code == 0, err
        assert "one stretch for 3 input(s)" in err  # the three 16-bit tiles only
        limits = _stretch(err)
        for band, lo in enumerate(parse_range_floats(limits)[::2]):
            src_band = 0 if extra else band  # --bands 1,1,1: band 1 in every channel
            assert lo == pytest.approx(np.percentile(scene[src_band], 2),
                                       abs=0.002 * np.ptp(scene))
    # the 8-bit tile as the default leaves it: its own run without --range
    code, _, err = cli(capfd, "segment", folder / "rgb8.tif", "-o", tmp_path / "alone.tif",
                       "-c", ckpt, "--batch-size", "1")
    assert code == 0, err
    _assert_same_raster(tmp_path / "out" / "rgb8_classes.tif", tmp_path / "alone.tif")


def test_one_input_gets_exactly_its_auto_stretch(tmp_path, capfd, ckpt):
    folder = tmp_path / "one"
    folder.mkdir()
    write_tif(folder / "a.tif", _mosaic()[:, :, :160])
    code, _, err = cli(capfd, "segment", folder, "-o", tmp_path / "shared", "--range",
                       "shared", "-c", ckpt, "--batch-size", "1")
    assert code == 0, err
    code, _, err = cli(capfd, "segment", folder / "a.tif", "-o", tmp_path / "auto.tif",
                       "--range", "auto", "-c", ckpt, "--batch-size", "1")
    assert code == 0, err
    _assert_same_raster(tmp_path / "shared" / "a_classes.tif", tmp_path / "auto.tif")


def test_no_input_to_pool_is_said_plainly(tmp_path, capfd, ckpt):
    folder = tmp_path / "rgb"
    folder.mkdir()
    for i in range(2):
        write_tif(folder / f"t{i}.tif", random_scene(48, 48, seed=i))
    code, _, err = cli(capfd, "segment", folder, "-o", tmp_path / "out", "--range", "shared",
                       "-c", ckpt)
    assert code == 0, err
    assert "no input to take a stretch from" in err


def test_a_constant_scene_of_huge_values_still_gets_a_stretch(tmp_path):
    from crossearth_cli.raster.reader import percentile_scaling, stretch

    for lo in (0.0, -5.0, 1e17, -1e300):
        s = stretch(lo, lo)
        assert s.high > s.low == lo
    assert percentile_scaling(np.full(100, 1e17)).high > 1e17
    pool = WeightedQuantiles()
    pool.add(np.full(50, 1e17), 10.0)
    assert pool.scaling().high > 1e17
