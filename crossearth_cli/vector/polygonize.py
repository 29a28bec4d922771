"""Windowed polygonize with seams merged.

Each window is polygonized on its own with ``rasterio.features.shapes`` (GDAL's polygonizer)
in *pixel* coordinates, so every vertex is an exact integer. A polygon that touches a window
seam is a *piece*; pieces of one class that are connected across a seam (a shared edge of
positive length under 4-connectivity, any shared point under 8-connectivity — exactly the pixel
adjacency GDAL uses) are unioned. With integer vertices the union is exact, so the result equals
polygonizing the whole raster at once.

Windows are processed in row-major order and the merge streams: after each row of windows only
the groups still touching the row's bottom seam stay in memory. Memory is bounded by one row of
windows (scene width × window height), never by scene height.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import shapely
from rasterio.transform import Affine

# --------------------------------------------------------------------------- pixels → shapes


def shapes_px(values: np.ndarray, mask, connectivity: int, row_off: int, col_off: int):
    """Polygons of ``values`` in global pixel coordinates, with their values.

    Vertices stay exact integers (a pure translation is applied). Under 8-connectivity GDAL
    emits rings that touch themselves at a pixel corner, which OGC calls invalid; those are
    rebuilt from their ring structure (shell minus holes), which is the same pixel set.
    """
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.features import shapes

    transform = Affine.translation(col_off, row_off)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        found = list(shapes(values, mask=mask, connectivity=connectivity, transform=transform))
    if not found:
        return np.empty(0, dtype=object), np.empty(0, dtype=np.int64)
    geoms = _to_polygons([g for g, _ in found])
    vals = np.fromiter((v for _, v in found), dtype=np.float64, count=len(found)).astype(np.int64)
    if connectivity == 8:
        bad = ~shapely.is_valid(geoms)
        if bad.any():
            geoms[bad] = shapely.make_valid(geoms[bad], method="structure", keep_collapsed=False)
    return geoms, vals


def _to_polygons(mappings) -> np.ndarray:
    """GeoJSON-like polygons → shapely array, built in one vectorized call."""
    lengths, owner = [], []
    for i, g in enumerate(mappings):
        for r in g["coordinates"]:
            lengths.append(len(r))
            owner.append(i)
    flat = np.fromiter(
        chain.from_iterable(chain.from_iterable(chain.from_iterable(
            g["coordinates"] for g in mappings
        ))),
        dtype=np.float64,
        count=2 * sum(lengths),
    ).reshape(-1, 2)
    ring_ids = np.repeat(np.arange(len(lengths)), lengths)
    rings = shapely.linearrings(flat, indices=ring_ids)
    return shapely.polygons(rings, indices=np.asarray(owner, dtype=np.int64))


def seam_flags(geoms: np.ndarray, window, height: int, width: int) -> np.ndarray:
    """(n, 4) booleans: touches the top, bottom, left, right seam of its window.

    A window edge on the raster's own border is not a seam.
    """
    r0, c0, h, w = window
    b = shapely.bounds(geoms).reshape(-1, 4)
    flags = np.zeros((len(geoms), 4), dtype=bool)
    if r0 > 0:
        flags[:, 0] = b[:, 1] <= r0
    if r0 + h < height:
        flags[:, 1] = b[:, 3] >= r0 + h
    if c0 > 0:
        flags[:, 2] = b[:, 0] <= c0
    if c0 + w < width:
        flags[:, 3] = b[:, 2] >= c0 + w
    return flags


# --------------------------------------------------------------------------- seam merge


@dataclass
class Pieces:
    """Polygons of one window that touch a seam, waiting for their neighbours."""

    class_id: np.ndarray  # int64
    exact: np.ndarray  # shapely polygons, pixel coordinates (integer vertices)
    out: np.ndarray | None  # simplified versions (same order), or None when not simplifying
    conf_sum: np.ndarray
    conf_n: np.ndarray
    flags: np.ndarray  # (n, 4) top, bottom, left, right

    @classmethod
    def empty(cls, simplified: bool) -> Pieces:
        e = np.empty(0, dtype=object)
        return cls(
            np.empty(0, np.int64),
            e,
            e.copy() if simplified else None,
            np.empty(0),
            np.empty(0),
            np.zeros((0, 4), dtype=bool),
        )


@dataclass
class Group:
    class_id: int
    exact: list = field(default_factory=list)
    out: list = field(default_factory=list)
    conf_sum: float = 0.0
    conf_n: float = 0.0
    seam: list = field(default_factory=list)  # exact pieces touching the current bottom seam


@dataclass
class MergedGroups:
    class_id: np.ndarray
    exact: np.ndarray
    out: np.ndarray | None
    conf_sum: np.ndarray
    conf_n: np.ndarray

    def __len__(self) -> int:
        return len(self.class_id)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def connected_pairs(geoms, class_id, source, connectivity: int) -> np.ndarray:
    """Index pairs (i, j) of pieces from different sources that are pixel-adjacent."""
    if len(geoms) < 2:
        return np.zeros((2, 0), dtype=np.int64)
    tree = shapely.STRtree(geoms)
    i, j = tree.query(geoms, predicate="intersects")
    keep = (i < j) & (source[i] != source[j]) & (class_id[i] == class_id[j])
    i, j = i[keep], j[keep]
    if connectivity == 4 and len(i):
        shared = shapely.intersection(geoms[i], geoms[j])
        pos = shapely.length(shared) > 0
        i, j = i[pos], j[pos]
    return np.vstack([i, j])


class SeamMerger:
    """Streams rows of windows; returns groups as soon as no later window can extend them."""

    def __init__(self, connectivity: int, simplified: bool):
        self.connectivity = connectivity
        self.simplified = simplified
        self.pending: list[Group] = []

    def add_row(self, row: list[Pieces]) -> MergedGroups:
        groups: list[Group] = list(self.pending)
        node_geom, node_group, node_source, node_class = [], [], [], []
        for gi, g in enumerate(groups):
            for geom in g.seam:
                node_geom.append(geom)
                node_group.append(gi)
                node_source.append(-1)
                node_class.append(g.class_id)
            g.seam = []
        bottom: list[bool] = [False] * len(groups)
        for wi, pcs in enumerate(row):
            for k in range(len(pcs.class_id)):
                gi = len(groups)
                g = Group(
                    class_id=int(pcs.class_id[k]),
                    exact=[pcs.exact[k]],
                    out=[pcs.out[k]] if pcs.out is not None else [],
                    conf_sum=float(pcs.conf_sum[k]),
                    conf_n=float(pcs.conf_n[k]),
                )
                f = pcs.flags[k]
                if f[1]:
                    g.seam.append(pcs.exact[k])
                groups.append(g)
                bottom.append(bool(f[1]))
                if f[0] or f[2] or f[3]:
                    node_geom.append(pcs.exact[k])
                    node_group.append(gi)
                    node_source.append(wi)
                    node_class.append(g.class_id)
        uf = _UnionFind(len(groups))
        if node_geom:
            ng = np.asarray(node_group)
            pairs = connected_pairs(
                np.asarray(node_geom, dtype=object),
                np.asarray(node_class),
                np.asarray(node_source),
                self.connectivity,
            )
            for a, b in pairs.T:
                uf.union(int(ng[a]), int(ng[b]))
        merged: dict[int, Group] = {}
        open_root: dict[int, bool] = {}
        for gi, g in enumerate(groups):
            root = uf.find(gi)
            if root not in merged:
                merged[root] = Group(class_id=g.class_id)
                open_root[root] = False
            m = merged[root]
            m.exact.extend(g.exact)
            m.out.extend(g.out)
            m.conf_sum += g.conf_sum
            m.conf_n += g.conf_n
            m.seam.extend(g.seam)
            open_root[root] = open_root[root] or bottom[gi]
        self.pending = [m for r, m in merged.items() if open_root[r]]
        return self._finish([m for r, m in merged.items() if not open_root[r]])

    def close(self) -> MergedGroups:
        done, self.pending = self.pending, []
        for g in done:
            g.seam = []
        return self._finish(done)

    def _finish(self, done: list[Group]) -> MergedGroups:
        n = len(done)
        exact = np.empty(n, dtype=object)
        out = np.empty(n, dtype=object) if self.simplified else None
        for k, g in enumerate(done):
            exact[k] = _union(g.exact, self.connectivity)
            if out is not None:
                out[k] = _union(g.out, self.connectivity)
        # a union keeps a vertex where each seam crossed a straight edge; GDAL's polygonizer
        # makes none there (tolerance 0 drops exactly those: points on their neighbours' line)
        exact = _without_seam_vertices(exact)
        out = None if out is None else _without_seam_vertices(out)
        return MergedGroups(
            class_id=np.fromiter((g.class_id for g in done), dtype=np.int64, count=n),
            exact=exact,
            out=out,
            conf_sum=np.fromiter((g.conf_sum for g in done), dtype=np.float64, count=n),
            conf_n=np.fromiter((g.conf_n for g in done), dtype=np.float64, count=n),
        )


def _without_seam_vertices(geoms: np.ndarray) -> np.ndarray:
    return np.asarray(shapely.simplify(geoms, 0.0), dtype=object) if len(geoms) else geoms


def _union(parts: list, connectivity: int = 4):
    """Union of one polygon's pieces from several windows.

    Under 4-connectivity a piece's holes lie strictly inside its window (pixels of the piece
    enclose them) and hold nothing of the same polygon, so the union cannot touch them: only the
    outer rings are unioned — far less work for a piece with thousands of holes, like a
    background class — and the holes are put back afterwards. (Under 8-connectivity a hole may
    hold an island of the same polygon, joined at a corner; there the plain union is used.)
    """
    if len(parts) == 1:
        return parts[0]
    arr = np.asarray(parts, dtype=object)
    if connectivity != 4:
        return shapely.union_all(arr)
    polys = shapely.get_parts(arr)
    n_holes = shapely.get_num_interior_rings(polys)
    merged = shapely.union_all(shapely.polygons(shapely.get_exterior_ring(polys)))
    if n_holes.sum() == 0:
        return merged
    if merged.geom_type != "Polygon":  # not expected for 4-connected pieces: be safe
        return shapely.union_all(arr)
    holes = [polys[k].interiors[i] for k in np.nonzero(n_holes)[0] for i in range(n_holes[k])]
    return shapely.Polygon(merged.exterior, [*merged.interiors, *holes])
