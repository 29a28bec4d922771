"""Road centerlines: skeleton → graph → pruned, merged LineStrings.

Per window (with a halo, so the skeleton near the window's edge is the one the whole raster
would give):

1. ``skimage.morphology.skeletonize`` thins the road mask to one-pixel lines; the Euclidean
   distance transform gives the road's half-width under every skeleton pixel.
2. Skeleton pixels with three or more neighbours form *junction clusters* (one node each, at the
   cluster's centre); the remaining pixels form simple chains (edges).
3. Spurs — an edge from a junction to a free end that is shorter than the road is wide there —
   are pruned (thinning grows them from every bump of a road's outline); junctions closer to
   each other than the road width are merged into one node; nodes left with two edges are
   dissolved so a road between two junctions is one line.
4. Thinning bends the skeleton toward a junction and curls it at a dead end: each junction moves
   to the least-squares intersection of its roads' axes (fitted one to three widths away), and
   dead ends are put back on their road's axis.
5. Lines are clipped to the window's core. Pieces that end on a seam are joined with their
   continuation from the neighbouring window (:class:`LineJoiner`), streaming row by row.

A mask touching the raster's own edge is mirrored beyond it, so a road leaving the scene keeps
its centerline all the way to the border — ending where its axis crosses the border — instead of
shrinking back from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import shapely
from scipy import ndimage as ndi

_EIGHT = np.ones((3, 3), dtype=bool)
_OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


@dataclass
class _Node:
    pos: np.ndarray  # (x, y) in ext-array pixel-centre coordinates
    width: float  # road width at the node, pixels
    edges: set = field(default_factory=set)
    free: bool = False  # a free end of the skeleton (not a junction)
    on_border: bool = False  # a free end cut by the array border: not a real road end


@dataclass
class _Edge:
    a: int | None
    b: int | None
    pts: np.ndarray  # (n, 2) x, y

    @property
    def length(self) -> float:
        if len(self.pts) < 2:
            return 0.0
        d = np.diff(self.pts, axis=0)
        return float(np.hypot(d[:, 0], d[:, 1]).sum())


def _neighbour_count(skel: np.ndarray) -> np.ndarray:
    n = ndi.convolve(skel.astype(np.uint8), _EIGHT.astype(np.uint8), mode="constant")
    return np.where(skel, n.astype(np.int16) - 1, 0)


def _unique(seq):
    out = []
    for v in seq:
        if v not in out:
            out.append(v)
    return out


# the widest hole filled in a road: its pixels at most this far from the road (3 px across)
NOISE_HOLE_INSET = 2.0
# ...and its area at most this many pixels: a sliver between two roads that nearly touch is
# thin too, but long
NOISE_HOLE_AREA = 16


def fill_road_specks(mask: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """``mask`` with its specks of holes filled.

    A hole of a few pixels in a road (noise in the segmentation) makes the skeleton go round
    it: a loop, and the road split into several lines. Only specks of holes are filled (at
    most 3 px across and 15 px in all, :data:`NOISE_HOLE_INSET`, :data:`NOISE_HOLE_AREA`): a
    block between streets, a sliver between roads that nearly touch, a roundabout's island
    stay. The width is four times the median distance to the road's edge
    over its pixels (uniform across a road's section: half of its half width); below 5 px
    nothing is filled. Holes touching the array's edge are not known to be holes and are
    kept."""
    if not mask.any():
        return mask
    width = 4.0 * float(np.median(dist[mask]))
    if width < 5.0:  # specks, a checkerboard, roads of 3 px: no road to find holes in
        return mask
    holes, n = ndi.label(~mask)
    if n == 0:
        return mask
    size = np.bincount(holes.ravel(), minlength=n + 1)
    small = size < min(width * width, NOISE_HOLE_AREA)
    small[0] = False
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    small[edge] = False
    if not small.any():
        return mask
    # ...and thin: at most 3 px across (a block between streets is wider, however small, and
    # the width above is the window's, which a wide road in it raises for every hole)
    inset = ndi.maximum(ndi.distance_transform_edt(~mask), holes, np.arange(n + 1))
    small &= np.asarray(inset) <= NOISE_HOLE_INSET
    return mask | small[holes] if small.any() else mask


def skeleton_graph(mask: np.ndarray):
    """Nodes and edges of the skeleton of ``mask`` (coordinates are pixel centres), once its
    small holes are filled (:func:`fill_road_specks`)."""
    from skimage.morphology import skeletonize

    dist = ndi.distance_transform_edt(mask)
    filled = fill_road_specks(mask, dist)
    if filled is not mask:
        mask, dist = filled, ndi.distance_transform_edt(filled)
    skel = skeletonize(mask)
    nb = _neighbour_count(skel)
    junction = skel & (nb >= 3)
    chain = skel & ~junction
    h, w = mask.shape

    nodes: dict[int, _Node] = {}
    jlab, nj = ndi.label(junction, structure=_EIGHT)
    if nj:
        # statistics over the (few) junction pixels only, not the whole window
        jy, jx = np.nonzero(junction)
        lab = jlab[jy, jx]
        count = np.bincount(lab, minlength=nj + 1)
        cy = np.bincount(lab, weights=jy, minlength=nj + 1) / np.maximum(count, 1)
        cx = np.bincount(lab, weights=jx, minlength=nj + 1) / np.maximum(count, 1)
        wmax = np.zeros(nj + 1)
        np.maximum.at(wmax, lab, dist[jy, jx])
        for k in range(1, nj + 1):
            nodes[k] = _Node(pos=np.array([cx[k] + 0.5, cy[k] + 0.5]), width=2.0 * wmax[k])
    next_id = nj + 1

    edges: list[_Edge] = []
    clab, nc = ndi.label(chain, structure=_EIGHT)
    if nc == 0:
        return nodes, edges, dist
    ys, xs = np.nonzero(chain)
    order = np.argsort(clab[ys, xs], kind="stable")
    ys, xs = ys[order], xs[order]
    labs = clab[ys, xs]
    starts = np.searchsorted(labs, np.arange(1, nc + 1))
    stops = np.append(starts[1:], len(labs))

    def around(y, x, grid):
        for dy, dx in _OFFSETS:
            yy, xx = y + dy, x + dx
            if 0 <= yy < h and 0 <= xx < w and grid[yy, xx]:
                yield yy, xx

    def free_node(p) -> int:
        nonlocal next_id
        nodes[next_id] = _Node(
            pos=np.array([p[1] + 0.5, p[0] + 0.5]),
            width=2.0 * float(dist[p]),
            free=True,
            on_border=p[0] in (0, h - 1) or p[1] in (0, w - 1),
        )
        next_id += 1
        return next_id - 1

    for c in range(nc):
        pix = list(zip(ys[starts[c] : stops[c]].tolist(), xs[starts[c] : stops[c]].tolist()))
        pset = set(pix)
        if len(pix) == 1:
            path, loop = pix, False
        else:
            deg = {p: sum(1 for _ in around(*p, chain)) for p in pix}
            tips = [p for p in pix if deg[p] <= 1]
            loop = not tips
            cur = tips[0] if tips else pix[0]
            path, seen = [cur], {cur}
            while True:
                nxt = [q for q in around(*cur, chain) if q in pset and q not in seen]
                if not nxt:
                    break
                # a 4-neighbour first, so a staircase corner is walked in order
                nxt.sort(key=lambda q, cur=cur: abs(q[0] - cur[0]) + abs(q[1] - cur[1]))
                cur = nxt[0]
                seen.add(cur)
                path.append(cur)
        pts = np.array([(x + 0.5, y + 0.5) for y, x in path], dtype=np.float64)
        if loop:  # an isolated ring: no junction can touch it (it would have 3 neighbours)
            edges.append(_Edge(None, None, np.vstack([pts, pts[:1]])))
            continue
        j_first = _unique(int(jlab[q]) for q in around(*path[0], jlab))
        j_last = _unique(int(jlab[q]) for q in around(*path[-1], jlab))
        if len(path) == 1:
            js = j_first
            a = js[0] if js else free_node(path[0])
            b = js[1] if len(js) > 1 else free_node(path[0])
        else:
            a = j_first[0] if j_first else free_node(path[0])
            b = j_last[0] if j_last else free_node(path[-1])
        line = pts
        if not nodes[a].free:
            line = np.vstack([nodes[a].pos, line])
        if not nodes[b].free:
            line = np.vstack([line, nodes[b].pos])
        edges.append(_Edge(a, b, line))

    for k, e in enumerate(edges):
        if e.a is not None:
            nodes[e.a].edges.add(k)
            nodes[e.b].edges.add(k)
    return nodes, edges, dist


def _remove_edge(nodes, edges, k):
    e = edges[k]
    if e is None:
        return
    for n in (e.a, e.b):
        if n is not None and n in nodes:
            nodes[n].edges.discard(k)
    edges[k] = None


def _prune(nodes, edges, min_spur: float) -> bool:
    changed = False
    for k, e in enumerate(edges):
        if e is None or e.a is None:
            continue
        na, nb = nodes[e.a], nodes[e.b]
        for free, other in ((na, nb), (nb, na)):
            if (
                free.free
                and not free.on_border
                and not other.free
                and _degree(nodes, edges, e.b if free is na else e.a) >= 3
            ):
                if e.length < max(other.width, min_spur):
                    _remove_edge(nodes, edges, k)
                    changed = True
                break
    return changed


def _merge_close_junctions(nodes, edges) -> bool:
    changed = False
    for k, e in enumerate(edges):
        if e is None or e.a is None or e.a == e.b:
            continue
        na, nb = nodes[e.a], nodes[e.b]
        if na.free or nb.free:
            continue
        if e.length < min(na.width, nb.width):
            # Contract: b folds into a, placed at the edge's middle.
            mid = e.pts[len(e.pts) // 2]
            _remove_edge(nodes, edges, k)
            na.pos = mid.copy()
            na.width = max(na.width, nb.width)
            for j in list(nb.edges):
                f = edges[j]
                if f.a == e.b:
                    f.a = e.a
                if f.b == e.b:
                    f.b = e.a
                na.edges.add(j)
            del nodes[e.b]
            # move the ends of every line at this node onto its new position
            for j in na.edges:
                f = edges[j]
                if f.a == e.a:
                    f.pts = np.vstack([na.pos, f.pts[1:]])
                if f.b == e.a:
                    f.pts = np.vstack([f.pts[:-1], na.pos])
            changed = True
    return changed


def _dissolve_degree_two(nodes, edges) -> None:
    for nid in list(nodes):
        node = nodes.get(nid)
        if node is None or node.free or _degree(nodes, edges, nid) != 2:
            continue
        if len(node.edges) != 2:  # a lone loop through the node: nothing to join
            continue
        k1, k2 = sorted(node.edges)
        e1, e2 = edges[k1], edges[k2]
        if e1 is None or e2 is None or k1 == k2:
            continue
        p1 = e1.pts if e1.b == nid else e1.pts[::-1]
        s1 = e1.a if e1.b == nid else e1.b
        p2 = e2.pts if e2.a == nid else e2.pts[::-1]
        s2 = e2.b if e2.a == nid else e2.a
        if s1 == nid or s2 == nid:  # a loop through this node: leave it
            continue
        merged = _Edge(s1, s2, np.vstack([p1, p2[1:]]))
        _remove_edge(nodes, edges, k1)
        _remove_edge(nodes, edges, k2)
        edges.append(merged)
        k = len(edges) - 1
        nodes[s1].edges.add(k)
        nodes[s2].edges.add(k)
        del nodes[nid]


def _arc_positions(pts: np.ndarray) -> np.ndarray:
    d = np.hypot(*np.diff(pts, axis=0).T)
    return np.concatenate([[0.0], np.cumsum(d)])


def _degree(nodes, edges, nid) -> int:
    """Edge ends at a node (a loop counts twice)."""
    return sum((edges[k].a == nid) + (edges[k].b == nid) for k in nodes[nid].edges)


def _incidences(nodes, edges, nid):
    """(edge index, at_start) for every edge end at the node."""
    out = []
    for k in sorted(nodes[nid].edges):
        e = edges[k]
        if e.a == nid:
            out.append((k, True))
        if e.b == nid:
            out.append((k, False))
    return out


def _refine_junctions(nodes, edges) -> None:
    """Move each junction to where its roads' axes meet.

    Thinning bends the skeleton toward a junction over about one road width, so the branch point
    of an oblique or T junction sits off the true crossing. Each road's direction is fitted on
    the stretch one to three widths away from the junction, the junction goes to the
    least-squares intersection of those axes, and the bent stretch is replaced by a straight
    run into it.
    """
    for nid, node in nodes.items():
        if node.free or _degree(nodes, edges, nid) < 3:
            continue
        r1 = max(node.width, 2.0)
        r2 = r1 + max(2.0 * node.width, 6.0)
        A = np.zeros((2, 2))
        b = np.zeros(2)
        used = 0
        inc = _incidences(nodes, edges, nid)
        for k, at_start in inc:
            pts = edges[k].pts if at_start else edges[k].pts[::-1]
            s = _arc_positions(pts)
            sel = (s >= r1) & (s <= r2)
            if sel.sum() < 3:
                continue
            q = pts[sel]
            c = q.mean(axis=0)
            d = np.linalg.svd(q - c)[2][0]
            P = np.eye(2) - np.outer(d, d)
            A += P
            b += P @ c
            used += 1
        if used < 2 or np.linalg.cond(A) > 1e6:
            continue
        target = np.linalg.solve(A, b)
        if np.hypot(*(target - node.pos)) > node.width:
            continue  # the fit disagrees with the skeleton too much: keep the skeleton
        node.pos = target
        for k, at_start in inc:
            e = edges[k]
            pts = e.pts if at_start else e.pts[::-1]
            s = _arc_positions(pts)
            if s[-1] > 2.5 * r1:
                pts = np.vstack([target, pts[s > r1]])
            else:
                pts = np.vstack([target, pts[1:]])
            e.pts = pts if at_start else pts[::-1]


def _fit_axis(pts: np.ndarray, s: np.ndarray, lo: float, hi: float):
    """Centre and direction of the points whose arc position lies in [lo, hi]."""
    sel = (s >= lo) & (s <= hi)
    if sel.sum() < 3:
        return None
    q = pts[sel]
    c = q.mean(axis=0)
    return c, np.linalg.svd(q - c)[2][0]


def _typical_width(pts: np.ndarray, dist: np.ndarray) -> float:
    """The road's width along a chain of skeleton points: twice the median distance to its edge."""
    h, w = dist.shape
    rows = np.clip(pts[:, 1].astype(np.int64), 0, h - 1)
    cols = np.clip(pts[:, 0].astype(np.int64), 0, w - 1)
    return 2.0 * float(np.median(dist[rows, cols]))


# how far back from a dead end thinning's curl toward a corner can reach, in road widths (an
# end cut at 60° to the road: ~1.7)
CURL_WIDTHS = 2.5
# farther than this from a straight axis, the stretch it was fitted on is a curve (pixels)
CURVED_PX = 0.8


def _straighten_tip(pts: np.ndarray, width: float, dist: np.ndarray) -> np.ndarray:
    """A dead end: thinning curls the tip toward a corner of the road's end (over a width or
    more where the end is cut obliquely). Put it back on the road's axis, fitted a little way
    back, and end it half a width inside the road as a square-cut end does."""
    rev = pts[::-1]
    s = _arc_positions(rev)
    lo = max(1.5 * width, 3.0)
    fit = _fit_axis(rev, s, lo, lo + max(3.0 * width, 6.0))
    if fit is None:  # a short road: the stretch just behind the curl
        lo = max(width / 2.0, 1.5)
        fit = _fit_axis(rev, s, lo, lo + max(2.0 * width, 6.0))
    if fit is None:
        return pts
    c, d = fit
    if np.dot(pts[-1] - c, d) < 0:
        d = -d  # point toward the tip
    off = np.abs((rev - c) @ np.array([-d[1], d[0]]))
    fitted = (s >= lo) & (s <= lo + max(3.0 * width, 6.0))
    if off[fitted].max() > CURVED_PX:
        coef = _quadratic(rev, s, fitted)
        if coef is not None and _residual(rev, s, fitted, coef) < 0.5 * off[fitted].max():
            # the road curves where the axis was fitted (a quadratic follows it at least
            # twice as closely; a noisy outline's wiggles it fits no better): a straight axis
            # would leave it (a curved road's end was cut 2-4 widths short)
            return _follow_curve_to_tip(pts, s, coef, width, dist)
    # the curl is the last stretch, a width or two: nothing further back is cut
    on_axis = np.nonzero((off <= 1.0) & (s <= CURL_WIDTHS * width + 1.0))[0]
    if len(on_axis) == 0:
        return pts
    last = len(pts) - 1 - on_axis[0]  # last skeleton point kept
    body = pts[: max(last, 0) + 1]
    t0 = float(np.dot(body[-1] - c, d))
    t = max(float(np.dot(pts[-1] - c, d)), t0)
    # ...but not past where the axis comes within half a width of the road's edge
    limit = _end_limit(c + t0 * d, width, dist)
    for step in np.arange(t0, t + 0.5, 0.5):
        if not _in_road(c + step * d, limit, dist):
            t = max(step - 0.5, t0)
            break
    tip = c + t * d
    if t <= t0 + 1e-9:
        return body if len(body) >= 2 else pts
    return np.vstack([body, tip])


def _quadratic(rev, s, fitted) -> np.ndarray | None:
    """x and y as quadratics of the arc position, fitted on the ``fitted`` points (3×2)."""
    if fitted.sum() < 5:
        return None
    return np.linalg.lstsq(np.vander(s[fitted], 3), rev[fitted], rcond=None)[0]


def _on_curve(v, coef: np.ndarray) -> np.ndarray:
    return np.vander(np.atleast_1d(np.asarray(v, dtype=np.float64)), 3) @ coef


def _residual(rev, s, fitted, coef) -> float:
    return float(np.hypot(*(rev[fitted] - _on_curve(s[fitted], coef)).T).max())


def _in_road(xy: np.ndarray, limit: float, dist: np.ndarray) -> bool:
    """Whether ``xy`` lies in the array and at least ``limit`` from the road's edge."""
    h, w = dist.shape
    x, y = xy
    return bool(0 <= x < w and 0 <= y < h and dist[int(y), int(x)] >= limit)


def _end_limit(start: np.ndarray, width: float, dist: np.ndarray) -> float:
    """How close to the road's edge a dead end's line may go: half a width, or less where the
    road is narrower at the line's start (the width is a median, the line a pixel off
    centre): it stopped at once there, cutting the road's end short."""
    h, w = dist.shape
    x, y = int(min(max(start[0], 0), w - 1)), int(min(max(start[1], 0), h - 1))
    return min(width / 2.0, float(dist[y, x]) - 0.5)


def _follow_curve_to_tip(pts: np.ndarray, s: np.ndarray, coef: np.ndarray, width: float,
                         dist: np.ndarray) -> np.ndarray:
    """:func:`_straighten_tip` on a curving road: ``coef``, x and y as quadratics of the arc
    position (from the tip), fitted where the axis was; the curl is cut where the skeleton
    leaves that curve, which is followed on to half a width inside the road's end."""
    rev = pts[::-1]

    def curve(v):
        return _on_curve(v, coef)

    off = np.hypot(*(rev - curve(s)).T)
    on = np.nonzero((off <= 1.0) & (s <= CURL_WIDTHS * width + 1.0))[0]
    if len(on) == 0:
        return pts
    k = int(on[0])
    body = pts[: len(pts) - k]
    reached = s[k]
    limit = _end_limit(curve(s[k])[0], width, dist)
    for v in np.arange(s[k] - 0.5, -0.25, -0.5):  # toward the skeleton's tip, s = 0
        if not _in_road(curve(v)[0], limit, dist):
            break
        reached = v
    if reached >= s[k] - 1e-9:
        return body if len(body) >= 2 else pts
    steps = np.append(np.arange(s[k] - 2.0, reached, -2.0), reached)
    return np.vstack([body, curve(steps)])


def _cut_at_border(pts: np.ndarray, axis: int, value: float, inside: int, dist: np.ndarray):
    """Parts of a line inside the raster, each ending exactly where the road's axis crosses.

    Beyond a raster edge the mask is mirrored, so the skeleton bends there; the crossing is
    taken from the axis fitted on the stretch inside, one to three road widths from the edge.
    """
    side = (pts[:, axis] - value) * inside >= 0
    if side.all():
        return [pts]
    if not side.any():
        return []
    parts = []
    idx = np.nonzero(side)[0]
    runs = np.split(idx, np.nonzero(np.diff(idx) > 1)[0] + 1)
    h, w = dist.shape
    for run in runs:
        seg = pts[run]
        for at_start in (True, False):
            k = run[0] if at_start else run[-1]
            if (k == 0 and at_start) or (k == len(pts) - 1 and not at_start):
                continue  # this end does not cross the border
            q = seg if at_start else seg[::-1]
            y, x = int(min(max(q[0, 1], 0), h - 1)), int(min(max(q[0, 0], 0), w - 1))
            width = max(2.0 * float(dist[y, x]), 2.0)
            s = _arc_positions(q)
            fit = _fit_axis(q, s, width, width + max(2.0 * width, 6.0))
            if fit is not None and abs(fit[1][axis]) > 0.35:  # not running along the edge
                c, d = fit
                t = (value - c[axis]) / d[axis]
                cross = c + t * d
                if np.hypot(*(cross - q[0])) < 3.0 * width:
                    q = np.vstack([cross, q[s > width]])
            else:  # no reliable axis: cut where the skeleton crosses
                p0 = pts[k - 1] if at_start else pts[k + 1]
                f = (value - p0[axis]) / (q[0, axis] - p0[axis])
                q = np.vstack([p0 + f * (q[0] - p0), q])
            seg = q if at_start else q[::-1]
        if len(seg) >= 2:
            parts.append(seg)
    return parts


def centerlines_from_mask(mask: np.ndarray, min_spur: float = 0.0, borders=()):
    """Centerlines of one (padded) mask as shapely LineStrings in array pixel coordinates.

    ``borders``: (axis, value, inside) for each raster edge inside the array beyond which the
    mask is mirrored padding (axis 0 = x, 1 = y; inside = +1 or -1 says which side is the
    raster). Lines are cut there, ending on the road's axis.
    """
    if not mask.any():
        return np.empty(0, dtype=object)
    nodes, edges, dist = skeleton_graph(mask)
    for _ in range(8):
        a = _prune(nodes, edges, min_spur)
        _dissolve_degree_two(nodes, edges)
        b = _merge_close_junctions(nodes, edges)
        _dissolve_degree_two(nodes, edges)
        if not (a or b):
            break
    _refine_junctions(nodes, edges)
    lines = []
    for e in edges:
        if e is None or len(e.pts) < 2:
            continue
        na = nodes.get(e.a) if e.a is not None else None
        nb = nodes.get(e.b) if e.b is not None else None
        isolated = (na is None or na.free) and (nb is None or nb.free)
        if isolated and e.a is not None:
            w = max(na.width, nb.width)
            touches_border = na.on_border or nb.on_border
            if e.length < w and not touches_border:
                continue  # a blob, not a road
        pts = e.pts
        # A dead end's own width is the curl's, near zero at a corner: use the road's.
        road_width = _typical_width(pts, dist)
        if nb is not None and nb.free and not nb.on_border:
            pts = _straighten_tip(pts, max(nb.width, road_width), dist)
        if na is not None and na.free and not na.on_border:
            pts = _straighten_tip(pts[::-1], max(na.width, road_width), dist)[::-1]
        parts = [pts]
        for axis, value, inside in borders:
            parts = [q for p in parts for q in _cut_at_border(p, axis, value, inside, dist)]
        lines.extend(_smooth_stairs(p) for p in parts if len(p) >= 2)
    if not lines:
        return np.empty(0, dtype=object)
    return np.array([shapely.LineString(p) for p in lines], dtype=object)


# Savitzky–Golay weights (a quadratic fitted by least squares, its value at the centre) over
# 7 and 5 vertices: they average a skeleton's stairs out but keep a curve's curvature, where a
# plain mean pulled tight curves inward (a ring of 8 px radius lost 7 % of its length)
_SG7 = np.array([-2.0, 3.0, 6.0, 7.0, 6.0, 3.0, -2.0]) / 21.0
_SG5 = np.array([-3.0, 12.0, 17.0, 12.0, -3.0]) / 35.0


def _smooth_stairs(pts: np.ndarray) -> np.ndarray:
    """A chain of skeleton pixels with its stairs smoothed out: each vertex becomes the value
    at it of a quadratic fitted to the 3 vertices each side (2, then none, near the ends, which
    stay where they are: junctions, dead ends and seam cuts). A road at a shallow angle is a
    staircase of pixel centres up to ~0.9 px off its axis, which the line simplification kept
    as a zigzag (+1.5-2.5 % of length, changing with --window); smoothed, it is near its axis."""
    n = len(pts)
    if n < 5:
        return pts
    pts = np.asarray(pts, dtype=float)
    out = pts.copy()
    # only over runs of neighbouring pixels: the fits are by vertex index, and a junction or
    # a straightened tip can lie many pixels from the next vertex
    gaps = np.concatenate([[0], np.cumsum(np.hypot(*np.diff(pts, axis=0).T) > 1.5)])
    for weights in (_SG5, _SG7):  # the 7-vertex fit wherever it fits, else the 5-vertex one
        k = len(weights) // 2
        if n > 2 * k:
            i = np.arange(k, n - k)
            ok = gaps[i + k] == gaps[i - k]
            fitted = np.stack([np.convolve(pts[:, d], weights, mode="valid")
                               for d in range(pts.shape[1])], axis=1)
            out[i[ok]] = fitted[ok]
    return out


def _on_grid(v: np.ndarray, lines: np.ndarray) -> np.ndarray:
    if len(lines) == 0:
        return np.zeros(len(v), dtype=bool)
    k = np.clip(np.searchsorted(lines, v), 1, len(lines)) - 1
    near = np.minimum(np.abs(v - lines[k]), np.abs(v - lines[np.minimum(k + 1, len(lines) - 1)]))
    return near < 1e-6


class LineJoiner:
    """Joins centerline pieces cut at window seams, streaming rows like the polygon merge.

    Only pieces with an end on a seam come here. Two piece ends from different windows that meet
    on a seam (within ``snap`` pixels: the two windows' skeletons agree there up to rounding) are
    moved onto one point and their pieces chained into one line. Ends anywhere else — junctions
    above all — are never joined here: a junction keeps its roads as separate lines. A line
    that still ends on the current row's bottom seam waits for the next row.
    """

    def __init__(self, row_seams, col_seams, snap: float = 1.5):
        self.row_seams = np.asarray(sorted(row_seams), dtype=np.float64)
        self.col_seams = np.asarray(sorted(col_seams), dtype=np.float64)
        self.snap = snap
        self.pending: list[tuple[int, np.ndarray]] = []

    def on_seam(self, xy: np.ndarray) -> np.ndarray:
        return _on_grid(xy[:, 0], self.col_seams) | _on_grid(xy[:, 1], self.row_seams)

    def add_row(self, pieces, row_bottom: float | None):
        """``pieces``: per window of the row, (class ids, lines). Returns finished lines."""
        from scipy.spatial import cKDTree

        cls_l: list[int] = []
        pts_l: list[np.ndarray] = []
        src_l: list[int] = []
        for c, xy in self.pending:
            cls_l.append(c)
            pts_l.append(xy)
            src_l.append(-1)
        for wi, (cids, lines) in enumerate(pieces):
            for c, g in zip(cids, lines, strict=True):
                cls_l.append(int(c))
                pts_l.append(shapely.get_coordinates(g))
                src_l.append(wi)
        self.pending = []
        n = len(pts_l)
        if n == 0:
            return np.empty(0, np.int64), np.empty(0, dtype=object)
        ends = np.array([xy[0] for xy in pts_l] + [xy[-1] for xy in pts_l])
        on = self.on_seam(ends)
        cand = np.nonzero(on)[0]
        link: dict[int, int] = {}  # end id (piece, or n + piece for the last point) → other end
        if len(cand) > 1:
            # Ends on a seam are where a line was cut (nodes lie off the integer seams).
            # Pair them across windows, closest first: near a junction beside a seam crossing
            # several cut ends lie within the snap distance, and each has its own partner.
            found = cKDTree(ends[cand]).query_pairs(self.snap, output_type="ndarray")
            dist = np.hypot(*(ends[cand[found[:, 0]]] - ends[cand[found[:, 1]]]).T) \
                if len(found) else np.empty(0)
            matched: set[int] = set()
            for k in np.argsort(dist, kind="stable"):
                a, b = int(cand[found[k, 0]]), int(cand[found[k, 1]])
                pa, pb = a % n, b % n
                if (a in matched or b in matched or pa == pb or src_l[pa] == src_l[pb]
                        or cls_l[pa] != cls_l[pb]):
                    continue
                matched.update((a, b))
                mid = (ends[a] + ends[b]) / 2.0
                for e in (a, b):
                    p = e % n
                    if e < n:
                        pts_l[p] = np.vstack([mid, pts_l[p][1:]])
                    else:
                        pts_l[p] = np.vstack([pts_l[p][:-1], mid])
                link[a], link[b] = b, a
        done_c, done_g = [], []
        seen = [False] * n
        for start in range(n):
            if seen[start]:
                continue
            chain_xy = self._chain(start, pts_l, link, n, seen)
            done = True
            if row_bottom is not None:
                ys = chain_xy[[0, -1], 1]
                done = not np.any(np.abs(ys - row_bottom) < 1e-6)
            if done:
                done_c.append(cls_l[start])
                done_g.append(shapely.LineString(chain_xy))
            else:
                self.pending.append((cls_l[start], chain_xy))
        return np.asarray(done_c, dtype=np.int64), np.asarray(done_g, dtype=object)

    @staticmethod
    def _chain(start, pts_l, link, n, seen):
        """The whole chain of linked pieces through ``start``, as one coordinate array."""
        # Walk backwards to the piece at one end of the chain (or once round a loop) ...
        visited = {start}
        free_end = start  # end id: piece p's first point is p, its last point is n + p
        while True:
            other = link.get(free_end)
            if other is None:
                break
            q = other % n
            if q in visited:
                break  # a closed loop: start anywhere
            visited.add(q)
            free_end = q + n if other < n else q  # leave q by its opposite end
        # ... then forwards from that free end, concatenating.
        xy_parts = []
        q = free_end % n
        forward = free_end < n
        while True:
            seen[q] = True
            xy = pts_l[q] if forward else pts_l[q][::-1]
            xy_parts.append(xy if not xy_parts else xy[1:])
            exit_end = q + n if forward else q
            other = link.get(exit_end)
            if other is None:
                break
            r = other % n
            if seen[r]:
                break
            q = r
            forward = other < n
        return np.vstack(xy_parts)

    def close(self):
        cls = np.array([c for c, _ in self.pending], dtype=np.int64)
        geoms = np.array([shapely.LineString(xy) for _, xy in self.pending], dtype=object)
        self.pending = []
        return cls, geoms


def clip_to_core(lines: np.ndarray, box) -> np.ndarray:
    """Clip lines to the window core, keeping only line parts (joined where they touch).

    Lines inside the core are kept as they are. GEOS's overlay returns a clipped line as its
    noded edges, which for a line with collinear vertices can be one piece per pixel: each
    clipped line's pieces are merged back (pieces shorter than a finished line's minimum were
    then dropped, cutting roads short)."""
    if len(lines) == 0:
        return lines
    lines = np.asarray(lines, dtype=object)
    inside = shapely.covered_by(lines, box)
    out = list(lines[inside])
    rest = lines[~inside]
    if len(rest):
        parts, of = shapely.get_parts(shapely.intersection(rest, box), return_index=True)
        keep = shapely.get_type_id(parts) == 1
        parts, of = parts[keep], of[keep]
        for i in np.unique(of):
            merged = shapely.line_merge(shapely.multilinestrings(parts[of == i]))
            out.extend(shapely.get_parts(merged))
    out = np.asarray(out, dtype=object)
    return out[shapely.length(out) > 0] if len(out) else out
