"""Road masks → centerlines on the axis, joined at junctions and seams, without spurs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyogrio
import pytest
import shapely
from rasterio.transform import from_origin

from crossearth_cli.vector import VectorizeOptions, vectorize_raster
from crossearth_cli.vector.centerlines import LineJoiner
from crossearth_cli.vector.synthetic import noisy_edges, road_network, write_class_raster

PIXEL = 0.5
# horizontal road cut by 2 junctions (3 lines) + vertical road cut by 2 (3) + curve + diagonal +
# an isolated arc
EXPECTED_LINES = 9


def centerlines(tmp_path, mask, window):
    h, w = mask.shape
    src = write_class_raster(
        tmp_path / "r.tif",
        mask.astype(np.uint8),
        transform=from_origin(1000.0, 2000.0, PIXEL, PIXEL),
        names=["background", "road"],
    )
    out = tmp_path / "r.gpkg"
    opts = VectorizeOptions(classes=["road"], centerlines=True, window_size=window, overwrite=True)
    summary = vectorize_raster(src, out, opts)
    assert summary.layers["road"] >= 1  # polygons are written as well
    meta, _, wkb, fields = pyogrio.raw.read(out, layer="road_centerlines")
    cols = dict(zip(list(meta["fields"]), fields, strict=True))
    geoms = shapely.from_wkb(wkb)
    assert set(cols["class_name"]) == {"road"}
    np.testing.assert_allclose(cols["length_m"], shapely.length(geoms), rtol=1e-12)
    # back to pixel coordinates
    def to_px(xy):
        return np.column_stack([(xy[:, 0] - 1000.0) / PIXEL, (2000.0 - xy[:, 1]) / PIXEL])

    return shapely.transform(geoms, to_px)


def end_counts(lines):
    ends = np.vstack([shapely.get_coordinates(shapely.get_point(lines, i)) for i in (0, -1)])
    return Counter(map(tuple, np.round(ends, 9)))


@pytest.mark.parametrize("window", [1024, 100, 64])
def test_centerlines_follow_the_axes(tmp_path, window):
    mask, axes, junctions, widths = road_network()
    lines = centerlines(tmp_path, mask, window)
    assert len(lines) == EXPECTED_LINES
    assert shapely.is_valid(lines).all()
    truth = shapely.union_all(axes)
    pts = shapely.points(shapely.get_coordinates(shapely.segmentize(lines, 0.5)))
    assert shapely.distance(pts, truth).max() <= 1.5

    # connected at junctions: all roads meeting there share one end point, on the crossing
    counts = end_counts(lines)
    for (jx, jy), degree in zip(junctions, [4, 3, 3], strict=True):
        near = [(p, c) for p, c in counts.items() if np.hypot(p[0] - jx, p[1] - jy) <= 1.5]
        assert len(near) == 1 and near[0][1] == degree, near

    # no spurs: every end is a junction, the raster edge, or the isolated arc's two dead ends
    h, w = mask.shape
    free = [
        p for p, c in counts.items()
        if c == 1 and not (p[0] in (0.0, w) or p[1] in (0.0, h))
    ]
    assert len(free) == 2
    for p in free:
        line = lines[int(np.argmin(shapely.distance(lines, shapely.Point(p))))]
        assert line.length >= max(widths)


def test_noisy_roads_keep_their_topology(tmp_path):
    """Ragged outlines sprout skeleton spurs; they are pruned and the graph stays the same."""
    mask, axes, junctions, widths = road_network()
    noisy = noisy_edges(mask, amplitude=0.8, seed=3)
    lines = centerlines(tmp_path, noisy, 128)
    assert len(lines) == EXPECTED_LINES
    assert min(shapely.length(lines)) >= max(widths)  # nothing spur-sized survives
    pts = shapely.points(shapely.get_coordinates(shapely.segmentize(lines, 0.5)))
    assert shapely.distance(pts, shapely.union_all(axes)).max() <= 3.0
    counts = end_counts(lines)
    assert sorted(c for c in counts.values() if c > 1) == [3, 3, 4]


def test_joiner_chains_only_at_seams():
    """Pieces meeting on a seam are joined; a junction off the seams never is."""
    joiner = LineJoiner(row_seams=[10], col_seams=[])
    a = shapely.LineString([(5, 0), (5, 10)])  # window row 0, ends on the seam y = 10
    b = shapely.LineString([(5.4, 10), (5, 15)])  # next row, 0.4 px along the seam: snapped
    c = shapely.LineString([(5, 15), (9, 18)])  # a junction at (5, 15) with d and b
    d = shapely.LineString([(5, 15), (1, 18)])
    cls0, done0 = joiner.add_row([(np.array([1]), np.array([a]))], row_bottom=10)
    assert len(done0) == 0 and len(joiner.pending) == 1
    cls1, done1 = joiner.add_row(
        [(np.array([1, 1, 1]), np.array([b, c, d]))], row_bottom=None
    )
    lengths = sorted(round(g.length, 3) for g in done1)
    assert len(done1) == 3
    assert lengths[-1] == pytest.approx(15.0, abs=0.05)  # a + b as one line of ~15 px
    ends = shapely.get_coordinates(done1[np.argmax(shapely.length(done1))])[[0, -1]]
    assert sorted(map(tuple, ends.tolist())) == [(5.0, 0.0), (5.0, 15.0)]


@pytest.mark.parametrize("angle", [15, 30, 60])
@pytest.mark.parametrize("width", [9, 21])
@pytest.mark.parametrize("cut", ["square", "vertical"])
def test_dead_ends_stay_on_the_axis(tmp_path, angle, width, cut):
    """Thinning curls a dead end toward a corner of the road's end, further where the end is
    cut obliquely; the line must still end on the axis, inside the road."""
    yy, xx = np.mgrid[0:300, 0:300] + 0.5  # pixel centres
    t = np.radians(angle)
    d, n = np.array([np.cos(t), np.sin(t)]), np.array([-np.sin(t), np.cos(t)])
    start = np.array([150.0, 150.0]) - 120 * d  # the near end is a dead end too
    along = (xx - start[0]) * d[0] + (yy - start[1]) * d[1]
    across = (xx - start[0]) * n[0] + (yy - start[1]) * n[1]
    mask = (np.abs(across) <= width / 2) & (along >= 0)
    mask &= (along <= 200) if cut == "square" else (xx <= start[0] + 200 * d[0])
    lines = centerlines(tmp_path, mask, 1024)
    assert len(lines) == 1
    pts = np.asarray(lines[0].coords)
    for tip in (pts[0], pts[-1]):
        assert abs(np.dot(tip - start, n)) <= 1.25, (tip, pts)  # on the axis
        assert mask[int(tip[1]), int(tip[0])]  # inside the road


def _cross(size, y0, x0, w, margin):
    mask = np.zeros((size, size), bool)
    mask[y0:y0 + w, margin:size - margin] = True
    mask[margin:size - margin, x0:x0 + w] = True
    return mask


def test_every_arm_of_a_cross_reaches_its_end(tmp_path):
    """A line inside its window is not clipped: GEOS's overlay returned such a line as one
    piece per pixel, and the pieces, each shorter than a finished line's minimum, were dropped
    (the west arm of this cross was a 15 px stub; 11 of 40 random crosses lost an arm)."""
    rng = np.random.default_rng(0)
    cases = [(315, 123, 9, 1000)] + [(*rng.integers(60, 220, 2), int(rng.choice([7, 9, 11])),
                                      300) for _ in range(12)]
    for y0, x0, w, size in cases:
        margin = 30 if size == 1000 else 20
        lines = centerlines(tmp_path, _cross(size, y0, x0, w, margin), 1024)
        cx, cy = x0 + w / 2, y0 + w / 2
        want = sorted([cx - margin - w / 2, size - margin - cx - w / 2,
                       cy - margin - w / 2, size - margin - cy - w / 2])
        got = sorted(shapely.length(lines))
        assert len(lines) == 4, (y0, x0, w, got)
        np.testing.assert_allclose(got, want, atol=2.0, err_msg=str((y0, x0, w)))


@pytest.mark.parametrize("y0, x0", [(59, 124), (60, 123), (59, 120)])
def test_a_junction_beside_a_seam_crossing_keeps_one_end_point(tmp_path, y0, x0):
    """Half a pixel from where two seams cross, the cut ends of several roads lie within the
    snap distance of each other: each is chained to its own partner, closest first, and all
    four roads end on the junction itself (they ended up to 0.5 px apart, unchained)."""
    lines = centerlines(tmp_path, _cross(256, y0, x0, 9, 10), 64)
    assert len(lines) == 4
    counts = end_counts(lines)
    junction = [p for p, c in counts.items() if c > 1]
    assert len(junction) == 1 and counts[junction[0]] == 4, counts
    assert np.hypot(junction[0][0] - (x0 + 4.5), junction[0][1] - (y0 + 4.5)) <= 1.5


def test_small_holes_in_a_road_do_not_split_its_centerline(tmp_path):
    """A few pixels missing inside a road (noise in the segmentation) made the skeleton go
    round them: loops, and the road cut into several lines. A ring road's island stays."""
    from scipy import ndimage

    rng = np.random.default_rng(9)
    for w in (9, 13):
        road = np.zeros((200, 600), bool)
        road[100 - w // 2:100 - w // 2 + w, 20:580] = True
        holes = road.copy()
        holes[100, 200] = holes[99, 400] = False
        holes[99:101, 300:302] = False
        outer = ndimage.binary_dilation(road) & ~road
        inner = road & ~ndimage.binary_erosion(road)
        noisy = np.where((outer | inner) & (rng.random(road.shape) < 0.1), ~road, road)
        axis = shapely.LineString([(20, 100), (580, 100)])
        for mask in (holes, noisy):
            lines = centerlines(tmp_path, mask, 1024)
            assert len(lines) == 1, (w, len(lines))
            pts = shapely.points(shapely.get_coordinates(shapely.segmentize(lines, 1.0)))
            assert shapely.distance(pts, axis).max() <= 1.5
            assert abs(lines[0].length - (560 - w)) <= 8
    ring = np.zeros((300, 300), bool)
    yy, xx = np.mgrid[:300, :300]
    r = np.hypot(yy - 150, xx - 150)
    ring[(r >= 55) & (r <= 66)] = True
    lines = centerlines(tmp_path, ring, 1024)
    assert len(lines) == 1 and lines[0].is_ring  # the island is not a hole to fill


@pytest.mark.parametrize("radius, width", [(60, 9), (100, 15), (200, 15)])
def test_a_curved_dead_end_road_keeps_its_ends(tmp_path, radius, width):
    """A dead end's curl was cut where the skeleton left a straight axis fitted 1.5-4.5
    widths back: on a curve that is most of the road (R 100, 15 px: 55 % of it kept). A
    curve is fitted there instead, and the line follows it to near the road's end."""
    from rasterio.features import rasterize

    t = np.radians(np.linspace(0, 70, 400))
    axis = shapely.LineString(np.column_stack([60 + radius * (1 - np.cos(t)),
                                               60 + radius * np.sin(t)]))
    size = (int(60 + radius * np.sin(np.radians(70)) + 80), int(60 + radius + 80))
    mask = rasterize([(axis.buffer(width / 2, cap_style="flat"), 1)], out_shape=size) == 1
    lines = centerlines(tmp_path, mask, 1024)
    assert len(lines) == 1
    assert lines[0].length >= 0.85 * axis.length, lines[0].length / axis.length
    pts = shapely.points(shapely.get_coordinates(shapely.segmentize(lines, 0.5)))
    assert shapely.distance(pts, axis).max() <= 1.5


def test_only_thin_holes_are_filled():
    """Noise holes (1 px, 2x2, 3 px across) are filled; a block between streets is not, even
    beside a wide road that raises the window's width estimate (it merged streets into blobs),
    and a lone hole is found when the road covers the whole edge of the window."""
    from scipy import ndimage

    from crossearth_cli.vector.centerlines import fill_road_specks

    mask = np.zeros((200, 200), bool)
    mask[:, :80] = True  # a wide road
    for k in range(80, 200, 12):  # streets 4 px wide around 8 px blocks
        mask[:, k:k + 4] = True
        mask[k:k + 4, 80:] = True
    mask[40, 40] = False  # noise in the wide road
    mask[100:102, 20:22] = False
    mask[150:153, 50:53] = False
    mask[60:62, 10:50] = False  # a sliver between two roads that nearly touch: thin but long
    filled = fill_road_specks(mask, ndimage.distance_transform_edt(mask))
    assert filled[40, 40] and filled[100:102, 20:22].all() and filled[150:153, 50:53].all()
    assert not filled[60:62, 10:50].any()
    assert (filled[:, 80:] == mask[:, 80:]).all()  # every block stays
    lone = np.ones((60, 60), bool)
    lone[30, 30] = False
    assert fill_road_specks(lone, ndimage.distance_transform_edt(lone)).all()


@pytest.mark.parametrize("slope", [3 / 7, 0.09])
def test_a_straight_road_at_a_shallow_angle_is_straight_at_every_window(tmp_path, slope):
    """The skeleton of a road at a shallow angle is a staircase of pixel centres up to ~0.9 px
    off its axis; the 0.75-px simplification kept it as a zigzag (at 5°: 126 vertices, 2.3 %
    longer than the road at --window 1024, 0 % at 64). Smoothed, it has a few vertices and one
    length, shorter than the axis by the dead ends' half widths."""
    from rasterio.features import rasterize

    axis = shapely.LineString([(40, 40), (40 + 700, 40 + 700 * slope)])
    size = (int(80 + 700 * slope), 780)
    mask = rasterize([(axis.buffer(4.5, cap_style="flat"), 1)], out_shape=size) == 1
    lengths = []
    for window in (1024, 128, 64):
        (line,) = centerlines(tmp_path, mask, window)
        lengths.append(line.length)
        pts = shapely.points(shapely.get_coordinates(shapely.segmentize(line, 0.5)))
        off = shapely.distance(pts, axis)
        assert off.max() <= 1.5 and off.mean() <= 0.4, (off.max(), off.mean())
        if window == 1024:
            assert shapely.get_num_coordinates(line) <= 20, line  # 126 at 5° before
    assert max(lengths) - min(lengths) <= 0.002 * axis.length, lengths
    assert 0.98 * axis.length <= min(lengths) <= max(lengths) <= axis.length, lengths


@pytest.mark.parametrize("radius,tolerance", [(12, 0.02), (25, 0.01), (60, 0.01)])
def test_a_ring_road_keeps_its_length(tmp_path, radius, tolerance):
    """The stairs' smoothing fits quadratics, so curves keep their curvature: a plain mean of
    the neighbouring vertices pulled a roundabout inward (-2.9 % of its length at 12 px)."""
    from rasterio.features import rasterize

    c = radius + 20
    axis = shapely.Point(c + 0.3, c + 0.7).buffer(radius, quad_segs=128).exterior
    mask = rasterize([(axis.buffer(3.0), 1)], out_shape=(2 * c, 2 * c)) == 1
    length = sum(line.length for line in centerlines(tmp_path, mask, 1024))
    assert abs(length / axis.length - 1) <= tolerance, length / axis.length
