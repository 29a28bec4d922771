"""Noisy building masks come out as right-angled outlines close to the clean shapes."""

from __future__ import annotations

import base64

import numpy as np
import pyogrio
import pytest
import shapely
from rasterio.transform import from_origin
from scipy import ndimage as ndi

from crossearth_cli.vector import VectorizeOptions, vectorize_raster
from crossearth_cli.vector.regularize import corner_angles, iou, regularize_polygon
from crossearth_cli.vector.synthetic import (
    building_grid,
    burn,
    noisy_edges,
    rotated_rect,
    write_class_raster,
)

H = W = 400
PIXEL = 0.5


clean_buildings = building_grid


def to_pixels(geoms):
    return shapely.transform(
        geoms, lambda xy: np.column_stack([xy[:, 0] / PIXEL, (H * PIXEL - xy[:, 1]) / PIXEL])
    )


def vectorize(tmp_path, mask, **kw):
    src = write_class_raster(
        tmp_path / "b.tif",
        mask.astype(np.uint8),
        transform=from_origin(0, H * PIXEL, PIXEL, PIXEL),
        names=["background", "building"],
    )
    out = tmp_path / "b.gpkg"
    kw = {"classes": ["building"], "window_size": 128, "overwrite": True, **kw}
    vectorize_raster(src, out, VectorizeOptions(**kw))
    _, _, wkb, fields = pyogrio.raw.read(out, layer="building")
    return to_pixels(shapely.from_wkb(wkb)), fields


@pytest.mark.parametrize("seed", [1, 2])
def test_noisy_buildings_become_right_angled(tmp_path, seed):
    shapes = clean_buildings(seed)
    mask = noisy_edges(burn((H, W), shapes), amplitude=1.0, seed=seed)
    raw, _ = vectorize(tmp_path, mask, min_area=5.0)
    reg, fields = vectorize(tmp_path, mask, min_area=5.0, regularize=True)
    assert len(reg) == len(raw)
    ious, raw_ious = [], []
    for clean in shapes:
        k = int(np.argmax(shapely.area(shapely.intersection(reg, clean))))
        got = reg[k]
        ious.append(iou(got, clean))
        raw_ious.append(max(iou(r, clean) for r in raw))
        angles = corner_angles(got)
        assert np.abs(angles - 90.0).max() <= 5.0, angles
        n_corners = len(clean.exterior.coords) - 1
        assert len(got.exterior.coords) - 1 <= n_corners + 2  # no staircase left
    assert min(ious) >= 0.9, np.round(ious, 3)
    assert np.mean(ious) > np.mean(raw_ious)  # better than the raw outline, not just as good
    # area stays close to what was segmented
    for g in reg[shapely.area(reg) > 200]:
        r = raw[int(np.argmax(shapely.area(shapely.intersection(raw, g))))]
        assert g.area == pytest.approx(r.area, rel=0.05)


def test_only_building_classes_are_regularized(tmp_path):
    """--regularize picks classes named like buildings; others keep their pixel outlines."""
    mask = np.zeros((H, W), dtype=np.uint8)
    shapes = clean_buildings(3)[:6]
    burnt = noisy_edges(burn((H, W), shapes), amplitude=1.0, seed=3)
    mask[burnt] = 1
    mask[300:340, 20:380] = 2  # a road strip
    mask[350:360, 50:57] = 2
    src = write_class_raster(
        tmp_path / "c.tif", mask, transform=from_origin(0, H * PIXEL, PIXEL, PIXEL),
        names=["background", "building", "road"],
    )
    out = tmp_path / "o.gpkg"
    vectorize_raster(src, out, VectorizeOptions(classes=["building", "road"], regularize=True))
    _, _, wkb, _ = pyogrio.raw.read(out, layer="road")
    roads = shapely.from_wkb(wkb)
    # road outlines are exact pixel edges (axis-aligned, integer pixel corners)
    px = shapely.get_coordinates(to_pixels(roads))
    np.testing.assert_array_equal(px, np.round(px))


def test_multipolygon_and_degenerate_inputs():
    a = rotated_rect(10, 10, 12, 8, 20)
    b = rotated_rect(40, 10, 12, 8, 20)
    out = regularize_polygon(shapely.MultiPolygon([a, b]))
    assert out.geom_type == "MultiPolygon" and out.is_valid
    assert iou(out, shapely.MultiPolygon([a, b])) > 0.95
    tiny = shapely.box(0, 0, 1, 1)
    assert regularize_polygon(tiny).equals(tiny)
    assert regularize_polygon(shapely.Polygon()).is_empty


@pytest.mark.parametrize("cut", [40, 80, 120])
def test_a_corner_cut_by_nodata_is_not_squared_back_over_it(tmp_path, cut):
    """A building clipped by the scene's diagonal nodata edge keeps its area and stays off the
    nodata: a rectangle fits it with IoU > 0.8, but would cover pixels never segmented."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[50:250, 50:250] = 1
    yy, xx = np.mgrid[0:H, 0:W]
    nodata = (xx + yy) < 100 + cut
    mask[nodata] = 255
    got, _ = vectorize(tmp_path, mask, regularize=True)
    meta, _, _, fields = pyogrio.raw.read(tmp_path / "b.gpkg", layer="building")
    area_m2 = fields[list(meta["fields"]).index("area_m2")]
    assert len(got) == 1
    building_px = float((mask == 1).sum())
    assert got[0].area == pytest.approx(building_px, rel=0.01)
    assert area_m2[0] == pytest.approx(building_px * PIXEL * PIXEL, rel=0.01)
    nodata_px = shapely.Polygon([(0, 0), (100 + cut, 0), (0, 100 + cut)])
    assert got[0].intersection(nodata_px).area < 1.0


def test_a_courtyard_is_kept_as_a_hole():
    """Holes are regularized at their own size: a 16-px courtyard in a 200-px building stays."""
    yard = shapely.box(90, 90, 106, 106)
    building = shapely.Polygon(shapely.box(0, 0, 200, 200).exterior.coords, [yard.exterior.coords])
    noisy = shapely.simplify(building.buffer(0.4, join_style="mitre"), 0.1)
    out = regularize_polygon(noisy, pixel=1.0)
    assert out is not noisy and len(out.interiors) == 1
    assert shapely.Polygon(out.interiors[0]).area == pytest.approx(yard.area, rel=0.25)


def test_buildings_on_the_raster_edge_stay_inside_it(tmp_path):
    """A squared-up edge is placed at the mean of the noisy one; at the raster's border that
    would overshoot the raster, so regularized outlines are clipped to it."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[100:160, 0:70] = 1  # left edge
    mask[0:50, 200:260] = 1  # top edge
    mask[300:400, 330:400] = 1  # bottom-right corner
    mask = noisy_edges(mask.astype(bool), amplitude=1.0, seed=4)
    got, _ = vectorize(tmp_path, mask, regularize=True)
    assert len(got) == 3
    assert all(len(g.exterior.coords) <= 7 for g in got)  # regularized, not pixel stairs
    raster = shapely.box(0, 0, W, H)
    assert max(g.difference(raster).area for g in got) == 0.0


def test_a_long_outline_cannot_hide_one_deep_spill():
    """The noise allowance grows with the outline, but nothing may stray beyond twice the
    shift: a 1 km long block with a cut corner keeps its cut (a rectangle would cover
    111 m² that were never building, within the allowance of a long outline)."""
    poly = shapely.box(0, 0, 1000, 20).difference(shapely.Polygon([(0, 20), (15, 20), (0, 5)]))
    out = regularize_polygon(poly, pixel=0.5)
    assert out.difference(poly).area < 1.0
    assert out.area == pytest.approx(poly.area, rel=0.01)


def overlap_area(geoms) -> float:
    """Total area shared by pairs of features of one layer."""
    pairs = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    return sum(shapely.intersection(geoms[i], geoms[j]).area for i, j in pairs.T if i < j)


def crowded_buildings(seed: int) -> np.ndarray:
    """Noisy buildings, some two pixels apart, with edge pixels flipped at random: the flips
    leave specks at corners (separate features under 4-connectivity) and bumps that squaring
    up spreads into the gaps."""
    rng = np.random.default_rng(seed)
    pair = [shapely.box(150, 300, 175, 340), shapely.box(177, 300, 200, 340)]
    shapes = clean_buildings(seed) + pair
    mask = burn((H, W), shapes).astype(np.uint8)
    edge = (mask != np.roll(mask, 1, 0)) | (mask != np.roll(mask, 1, 1))
    flip = edge & (rng.random(mask.shape) < 0.3)
    mask[flip] = 1 - mask[flip]
    return mask


@pytest.mark.parametrize("connectivity", [4, 8])
def test_regularized_buildings_overlap_no_feature_of_their_layer(tmp_path, connectivity):
    """A squared-up outline spills past its pixels; it must not spill onto another feature of
    its layer (a speck at its corner, a neighbour across a gap), wherever the seams fall."""
    mask = crowded_buildings(6)
    for window in (128, 1024):
        got, _ = vectorize(tmp_path, mask, regularize=True, connectivity=connectivity,
                           window_size=window)
        assert shapely.is_valid(got).all()
        assert overlap_area(got) < 1e-6, window
    # with the specks dropped, nothing is left to dent the squared-up outlines
    got, _ = vectorize(tmp_path, mask, regularize=True, connectivity=connectivity, min_area=1.0)
    assert overlap_area(got) < 1e-6
    if connectivity == 4:
        big = got[shapely.area(got) > 200]
        assert np.median(shapely.get_num_coordinates(big)) == 5  # rectangles



@pytest.mark.parametrize("options", [
    {"simplify": 1.0},  # simplified outlines leave their pixels
    {"simplify": 2.5, "min_area": 2.0},
    {"fill_holes": 0.3, "min_area": 2.1},  # a 3×3 ring: 2.0 m² as segmented, 2.25 m² filled
])
def test_no_overlap_with_simplify_or_filled_holes(tmp_path, options):
    mask = crowded_buildings(6)
    rng = np.random.default_rng(8)
    building = mask == 1
    zone = ndi.binary_dilation(building, iterations=3) & ~ndi.binary_dilation(building)
    ys, xs = np.nonzero(zone[3:-3, 3:-3])
    for k in rng.permutation(len(ys))[: len(ys) // 6]:  # 3×3 rings two pixels from buildings
        y, x = ys[k] + 3, xs[k] + 3
        if not mask[y - 2 : y + 3, x - 2 : x + 3].any():
            mask[y - 1 : y + 2, x - 1 : x + 2] = 1
            mask[y, x] = 0
    got, _ = vectorize(tmp_path, mask, regularize=True, **options)
    assert shapely.is_valid(got).all()
    assert overlap_area(got) < 1e-6


def test_a_speck_dropped_by_min_area_does_not_dent_its_neighbour(tmp_path):
    """Only features of the layer push a regularized outline back: a corner speck that
    --min-area drops leaves the building as if it had never been segmented."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[100:160, 100:180] = 1
    mask[99, 101:180:2] = 1  # a ragged top edge, squared up half a pixel above the body
    alone, _ = vectorize(tmp_path, mask, regularize=True, min_area=1.0)
    mask[99, 99] = 1  # touches the building at a corner only: its own 0.25 m² feature
    with_speck, _ = vectorize(tmp_path, mask, regularize=True, min_area=1.0)
    kept, _ = vectorize(tmp_path, mask, regularize=True)
    assert len(alone) == len(with_speck) == 1 and with_speck[0].equals(alone[0])
    assert len(kept) == 2 and overlap_area(kept) < 1e-6


def test_regularized_outlines_do_not_depend_on_the_window_size(tmp_path):
    """Polygons merged across seams keep extra vertices there; regularization must see the
    same outline whatever the windows were."""
    shapes = clean_buildings(7)
    mask = noisy_edges(burn((H, W), shapes), amplitude=1.0, seed=7)
    small, _ = vectorize(tmp_path, mask, regularize=True, min_area=5.0, window_size=128)
    large, _ = vectorize(tmp_path, mask, regularize=True, min_area=5.0, window_size=1024)
    assert len(small) == len(large)
    order = [np.lexsort(shapely.get_coordinates(shapely.centroid(g)).T) for g in (small, large)]
    for a, b in zip(small[order[0]], large[order[1]], strict=True):
        assert shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), tolerance=1e-6)


def test_cells_split_a_gap_and_read_wider_when_an_outline_strays():
    """A pixel as near to two features is neither's; an outline straying farther than the
    first patch reaches gets the same cut from a wider read."""
    from crossearth_cli.vector.cells import Features, keep_to_cells, owned_pixels

    own = np.zeros((1, 5), dtype=bool)
    other = own.copy()
    own[0, 0], other[0, 4] = True, True
    np.testing.assert_array_equal(owned_pixels(own, other), [[True, True, False, False, False]])

    values = np.zeros((40, 40), dtype=np.uint8)
    values[10:30, 10:20] = 1
    values[10:30, 22:30] = 1  # a neighbour two pixels to the right
    exact = shapely.box(10, 10, 20, 30)
    moved = shapely.box(9.5, 9.5, 23.5, 30.5)  # reaches into the gap and the neighbour
    reads = []

    def read(r, c, h, w):
        reads.append((h, w))
        return values[r : r + h, c : c + w]

    cuts = [
        keep_to_cells(np.array([moved]), np.array([exact]), np.array([1]), read,
                      Features(size=values.shape), margin=m, max_area_change=0.5)[0]
        for m in (1, 8)
    ]
    assert len(reads) == 3  # margin 1: read again wider; margin 8: once
    assert cuts[0].equals(cuts[1])
    assert cuts[0].equals(shapely.box(9.5, 9.5, 21, 30.5))  # the gap split: 20 ours, 21 theirs


# 80×70 crop of an audit's noisy scene (0.5 m pixels) where a simplified building overlapped a
# one-pixel speck at its corner (0.0625 m²): rows of the mask, 1 = building, as packed bits
SPECK_BESIDE_A_SIMPLIFIED_BUILDING = (
    "/4//gB///H///j/+AH//8f/3+P/4AP//x///5//gB///j/9/3/+AH//8f//+f/4Af//x///5//wAgeCFAT/j"
    "/+AAAAAAAAQAA4AAAAAAAAAYAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAOAAAAAAAAAAC+AAAAAAAAAF/wAAAAAAAAB//AAAAAAAAwn//AAAAAAAAT//8AAAEAAAP///oAA"
    "AAAXB///+AAA5tKAP///8AAH//71f///wAAf///9//7/wAB//////+H/AAH/////+u/4AAf/////S5/4AB//"
    "///3fj/AAH////Z//f+AB////8//9/4AA///////5/gAD///////v+AA///////+/8AD///////5/wAf////"
    "///3/AA////////f8AD///////+/4AH/////////wA////////v+AD///////+P+AP/////////wA///////"
    "/3/AD////////n+AP////f//+/4A//////////gB////z//+j/gH///////Df+A////+//5v/4D////9/1//"
    "/wP////3+P//+Af///+N3///4D////sD////AJAEAf3////gAAAABj////wAAAAAAP///6AAAAAAA///8AAA"
    "AAAAD//8gAAAAAAAP//AAAAAAAAA//gAAAAAAAAB/swAAAAAAAAH8AAAAAAAAAA9DAAAAAAAAAAAOAAAAAAA"
    "AAAB+AAAAAAAAAAf4AAAAAAAAAD/gAAAAAAAAAf/AAAAAAAAAD/+AAAAAAAAAf/8AAAAAAAAF/P8AAAAAAAA"
    "/+/wAAAAAAAB/b/gACCAAAEP77/AAAAAQAA/f3+AA/v/vfxz/v+AD//8//+P/f4AP//z//T/4/gA///P/8P/"
    "y+AD//8//w=="
)


def test_no_overlap_between_a_simplified_building_and_a_speck(tmp_path):
    bits = np.frombuffer(base64.b64decode(SPECK_BESIDE_A_SIMPLIFIED_BUILDING), dtype=np.uint8)
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[:80, :70] = np.unpackbits(bits)[: 80 * 70].reshape(80, 70)
    got, _ = vectorize(tmp_path, mask, regularize=True, simplify=1.0)
    assert shapely.is_valid(got).all()
    assert overlap_area(got) < 1e-6


@pytest.mark.parametrize("radius", [6, 10, 25])
def test_round_buildings_are_not_squared_off(radius):
    """A tank or a silo: regularizing squared it off (IoU with the true circle 0.83, down
    from 0.92-0.98 for the pixel outline). Round outlines are kept as they are."""
    from rasterio.features import shapes

    from crossearth_cli.vector.regularize import is_round

    yy, xx = np.mgrid[:100, :100]
    mask = ((yy - 49.5) ** 2 + (xx - 49.5) ** 2 <= radius**2).astype(np.uint8)
    outline = next(shapely.geometry.shape(g) for g, v in shapes(mask) if v == 1)
    metric = shapely.affinity.scale(outline, PIXEL, PIXEL, origin=(0, 0))
    assert is_round(metric, PIXEL)
    assert regularize_polygon(metric, PIXEL) is metric
    square = shapely.box(0, 0, 2 * radius * PIXEL, 2 * radius * PIXEL)
    assert not is_round(square, PIXEL)


def test_specks_are_kept_as_they_are():
    """Outlines under a 3×3 block stay pixel outlines (already right-angled on the grid):
    regularizing them changed nothing and took most of a speckled map's time."""
    for cells in ([(0, 0)], [(0, 0), (1, 0), (1, 1)], [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2)],
                  [(x, y) for x in range(2) for y in range(4)]):
        speck = shapely.union_all([shapely.box(x * 0.5, y * 0.5, x * 0.5 + 0.5, y * 0.5 + 0.5)
                                   for x, y in cells])
        assert regularize_polygon(speck, pixel=0.5) is speck
    block = shapely.box(0, 0, 1.5, 1.5)  # 3×3 pixels of 0.5 m: regularized as before
    assert regularize_polygon(block, pixel=0.5).equals(block)
