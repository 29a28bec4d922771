"""``--tta``: each tile also seen mirrored (and turned); the scores, turned back, averaged."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from helpers import PerPixelModel, per_pixel_spec, random_scene, write_tif
from reliability_helpers import assert_user_error, cli

from crossearth_cli.engine import Predictor
from crossearth_cli.tta import averaged_scores, views


def _square_symmetries(a: np.ndarray, mode: str) -> list[np.ndarray]:
    """The views written out with numpy's own turns and mirrors (last two axes)."""
    turns = [np.rot90(a, k, axes=(-2, -1)) for k in range(4)]
    if mode == "flip":
        return [a, a[..., ::-1], a[..., ::-1, :], a[..., ::-1, ::-1]]
    return turns + [np.rot90(a[..., ::-1], k, axes=(-2, -1)) for k in range(4)]


@pytest.mark.parametrize("mode", ["flip", "d4"])
def test_the_views_are_the_symmetries_of_the_square_and_each_turns_back(mode):
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    got = [forward(x) for forward, _ in views(mode)]
    want = _square_symmetries(x.numpy(), mode)
    assert len(got) == len(want) == {"flip": 4, "d4": 8}[mode]
    for g in got:  # each view is one of the symmetries, and no two views are the same
        assert sum(np.array_equal(g.numpy(), w) for w in want) == 1
    assert len({g.numpy().tobytes() for g in got}) == len(got)
    for forward, back in views(mode):
        assert torch.equal(back(forward(x)), x)


class Oriented(torch.nn.Module):
    """Scores that depend on neighbours in a lopsided way: a turned view gives other scores."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))

    def forward(self, x):
        return torch.nn.functional.softplus(self.conv(x))


@pytest.mark.parametrize("mode", ["flip", "d4"])
def test_scores_are_the_mean_of_the_views_turned_back(mode):
    net = Oriented().eval()
    x = torch.randn(2, 3, 24, 40)  # oblong: turned views have the other shape
    with torch.inference_mode():
        got = averaged_scores(net, x, mode).numpy()
        want = []
        xs = _square_symmetries(x.numpy(), mode)
        for i, xv in enumerate(xs):
            s = net(torch.from_numpy(xv.copy())).numpy()
            # undo with numpy: turns first (back), then the mirror
            if mode == "flip":
                s = [s, s[..., ::-1], s[..., ::-1, :], s[..., ::-1, ::-1]][i]
            else:
                s = np.rot90(s, -(i % 4), axes=(-2, -1))
                s = s[..., ::-1] if i >= 4 else s
            want.append(s)
        plain = net(x).numpy()
    np.testing.assert_allclose(got, np.mean(want, axis=0), rtol=1e-5, atol=1e-5)
    assert np.abs(got - plain).max() > 0.1  # the views differ for this model


@pytest.mark.parametrize("mode", ["none", "flip", "d4"])
def test_a_per_pixel_model_is_unchanged(mode):
    """A model that looks at one pixel sees the same pixel in every view: TTA changes
    nothing, unless a view is turned back wrongly."""
    net = PerPixelModel(num_classes=4)
    x = torch.randn(3, 3, 16, 28)
    with torch.inference_mode():
        torch.testing.assert_close(averaged_scores(net, x, mode), net(x), rtol=1e-5, atol=1e-5)


class FailsAbove(torch.nn.Module):
    def __init__(self, inner, limit: int):
        super().__init__()
        self.inner, self.limit, self.sizes = inner, limit, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_out_of_memory_halves_the_batch_with_every_view(tmp_path):
    spec = per_pixel_spec()
    oriented = Oriented().eval()
    failing = FailsAbove(oriented, limit=2)
    predictor = Predictor(spec, torch.device("cpu"), "fp32", 4, failing, tta="d4")
    plain = Predictor(spec, torch.device("cpu"), "fp32", 2, oriented, tta="d4")
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    valid = torch.ones(5, 16, 16, dtype=torch.bool)
    torch.testing.assert_close(predictor(images, valid), plain(images, valid))
    assert predictor.batch_size == 2 and predictor.halvings == 1
    assert failing.sizes == [4] + [2] * 8 + [2] * 8 + [1] * 8  # every view, every tile


def test_segment_tta_writes_the_averaged_map_and_says_so(tmp_path, capfd, ckpt):
    src = write_tif(tmp_path / "scene.tif", random_scene(80, 96, seed=5))
    maps = {}
    for mode in ("none", "flip", "d4"):
        out = tmp_path / f"{mode}.tif"
        code, _, err = cli(capfd, "segment", src, "-o", out, "-c", ckpt, "--tta", mode)
        assert code == 0, err
        with rasterio.open(out) as ds:
            maps[mode] = ds.read(1)
            assert ds.tags().get("tta") == (None if mode == "none" else mode)
    assert (maps["none"] != maps["flip"]).any()

    code, _, err = cli(capfd, "segment", src, "-o", tmp_path / "x.tif", "-c", ckpt,
                       "--tta", "rotate")
    assert_user_error(code, err, "--tta 'rotate'", "none, flip, d4")
    assert not (tmp_path / "x.tif").exists()


def test_a_folder_rerun_with_another_tta_redoes_the_files(tmp_path, capfd, ckpt):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(2):
        write_tif(tiles / f"t{i}.tif", random_scene(48, 48, seed=i))
    import json

    def run(*extra) -> dict:
        code, _, err = cli(capfd, "segment", tiles, "-o", tmp_path / "out", "-c", ckpt,
                           "--summary", tmp_path / "s.json", *extra)
        assert code == 0, err
        return json.loads((tmp_path / "s.json").read_text())

    assert len(run()["done"]) == 2
    assert len(run("--tta", "none")["skipped"]) == 2  # none is the default, the same key
    assert len(run("--tta", "flip")["done"]) == 2
    assert len(run("--tta", "flip")["skipped"]) == 2


def test_the_library_runs_the_views_the_settings_ask_for(tmp_path):
    """engine.segment (what scripts and the benchmarks call) takes tta from the settings; a
    session refuses a scene asking for other views, and an unknown mode up front."""
    from crossearth_cli.engine import SegmentSettings, Session, segment
    from crossearth_cli.errors import ConfigError

    spec = per_pixel_spec()
    spec.module = Oriented().eval()
    src = write_tif(tmp_path / "s.tif", random_scene(40, 56, seed=4))
    probs = {}
    for mode in ("none", "d4"):
        settings = SegmentSettings(input=src, output=tmp_path / f"{mode}.tif", device="cpu",
                                   tta=mode, probabilities=tmp_path / f"{mode}_p.tif",
                                   probabilities_dtype="float32")
        result = segment(settings, spec)
        assert result.tta == mode
        with rasterio.open(tmp_path / f"{mode}_p.tif") as ds:
            probs[mode] = ds.read()
            assert ds.tags().get("tta") == (None if mode == "none" else mode)
    assert np.abs(probs["d4"] - probs["none"]).max() > 0.01

    with Session(spec, "cpu", tta="flip") as session:
        with pytest.raises(ConfigError, match="--tta none but the session runs --tta flip"):
            session.prepare(SegmentSettings(input=src, output=tmp_path / "x.tif"))
    with pytest.raises(ConfigError, match="--tta 'D4'"):
        Session(spec, "cpu", tta="D4")
