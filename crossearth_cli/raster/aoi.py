"""``--aoi``: segment only an area of interest of each raster.

The AOI is a bounding box (``W,S,E,N`` in the raster's CRS, or in ``--aoi-crs``) or the
polygons of a vector file (every layer, each in its own CRS). On one raster it becomes:

- the **output window**: the pixels of the raster's own grid whose centres lie in the bounding
  box of the part of the AOI on the raster. The outputs cover exactly this window (same CRS
  and pixel size, a whole-pixel offset from the input), so they overlay the input and each
  other without resampling;
- the **mask**: pixels whose centres fall outside the AOI's polygons are nodata in every
  output.

The engine runs the whole scene's tiles that reach the polygons, each read in full, with the
whole scene's blending weights (``crossearth_cli.engine``): inside the AOI the outputs are
exactly the whole-scene run's; the other tiles are neither read nor run.

Everything here works in the raster's pixel coordinates (column, row; pixel ``(i, j)`` covers
``[i, i+1) × [j, j+1)``), so masks of neighbouring windows agree pixel for pixel.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
import shapely.affinity
import shapely.geometry
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.transform import Affine

from crossearth_cli.errors import ConfigError, InputError

_NUMBER = r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*"
_BBOX = re.compile(rf"^{_NUMBER}(,{_NUMBER}){{3}}$")
# edges are densified to this many points before a reprojection, so a box stays the area it
# encloses (a straight edge in degrees is a curve in metres)
_DENSIFY = 256


class OutsideAOI(ConfigError):
    """The AOI holds no pixel of this raster (a folder run leaves such inputs out)."""


@dataclass(frozen=True)
class AreaOfInterest:
    """Polygons, each group in its CRS (``None``: the raster's own coordinates)."""

    parts: tuple[tuple[CRS | None, shapely.Geometry], ...]
    label: str  # for messages: the bounding box as given, or the file's name
    notes: tuple[str, ...] = ()  # what reading the file left out or repaired, for the user

    @property
    def fingerprint(self) -> str:
        """Changes whenever the area does (resume decisions)."""
        h = hashlib.sha256()
        for crs, geom in self.parts:
            h.update((crs.to_wkt() if crs else "raster").encode())
            h.update(shapely.to_wkb(shapely.normalize(geom)))
        return h.hexdigest()[:16]


def parse_crs(text: str, what: str = "--aoi-crs") -> CRS:
    try:
        return CRS.from_user_input(text.strip())
    except (CRSError, ValueError):
        raise ConfigError(f"{what} {text!r} is not a CRS GDAL knows",
                          hint="give e.g. EPSG:4326 or EPSG:32631") from None


def parse_aoi(text: str, crs_text: str | None = None) -> AreaOfInterest:
    """``W,S,E,N`` or a vector file; ``crs_text`` is the CRS of a box or of a file that
    has none."""
    crs = parse_crs(crs_text) if crs_text else None
    if _BBOX.match(text):
        w, s, e, n = (float(v) for v in text.split(","))
        if not all(math.isfinite(v) for v in (w, s, e, n)) or not (w < e and s < n):
            raise ConfigError(f"--aoi {text}: a box is W,S,E,N with W < E and S < N")
        return AreaOfInterest(((crs, shapely.box(w, s, e, n)),), text.strip())
    from crossearth_cli.raster.remote import file_name, gdal_path, is_remote

    if is_remote(text):  # a URL: errors and the label name it, GDAL opens its /vsi path
        return read_aoi_file(gdal_path(text), crs, name=text, label=file_name(text))
    if text.startswith("/vsi"):  # GDAL's virtual files, as given (Path would fold "//")
        return read_aoi_file(text, crs)
    path = Path(text)
    if not path.exists():
        raise ConfigError(f"--aoi {text}: no such file, and not a box W,S,E,N",
                          hint="give a vector file (GeoPackage, GeoJSON, Shapefile...) or "
                          "four numbers")
    if path.is_dir():  # GDAL would read its Shapefiles alone, and nothing else in it
        raise ConfigError(f"--aoi {text}: a folder, not a vector file",
                          hint="give the file: a GeoPackage, GeoJSON or Shapefile (.shp)")
    return read_aoi_file(path, crs)


def read_aoi_file(path: Path | str, crs: CRS | None = None, name: str | None = None,
                  label: str | None = None) -> AreaOfInterest:
    """The polygons of every layer of ``path`` (points and lines are not areas: left out);
    errors say ``name`` (the path as the user gave it), progress ``label``."""
    import pyogrio

    name = name or str(path)
    try:
        layers = [str(layer) for layer, _ in pyogrio.list_layers(path)]
        parts: dict[str, tuple[CRS | None, list]] = {}
        for layer in layers:
            meta, _, wkb, _ = pyogrio.raw.read(path, layer=layer, columns=[])
            geoms = shapely.from_wkb(np.asarray([g for g in wkb if g is not None],
                                                dtype=object))
            layer_crs = _layer_crs(name, layer, meta.get("crs"), crs, _beyond_degrees(geoms))
            key = layer_crs.to_wkt() if layer_crs else ""
            parts.setdefault(key, (layer_crs, []))[1].append(geoms)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as exc:
        why = _first_line(exc).replace(str(path), name)
        what, fix = (f"cannot read it as a vector file ({why})",
                     "give a GeoPackage, GeoJSON or Shapefile, or a box W,S,E,N")
        if name != str(path):  # a URL: the server's answer (404, 403...) where it gave one
            from crossearth_cli.raster.remote import explain

            told, how = explain(why)
            if not told.startswith("not a readable raster"):
                what, fix = told, how
        raise InputError(f"--aoi {name}: {what}", hint=fix) from None
    groups = []
    others = invalid = 0
    for layer_crs, arrays in parts.values():
        geoms = np.concatenate(arrays)
        kinds = shapely.get_type_id(geoms)
        others += int(np.isin(kinds, (0, 1, 2, 4, 5)).sum())  # points and lines
        polygonal = geoms[np.isin(kinds, (3, 6))]
        invalid += int((~shapely.is_valid(polygonal)).sum())
        area = _polygons(geoms)
        if not area.is_empty:
            groups.append((layer_crs, area))
    if not groups:
        raise InputError("holds no polygon to use as an area of interest", path=name,
                         hint="draw the area as a polygon")
    notes = []
    if others:
        notes.append(f"--aoi {name}: {others} point or line feature(s) left out (not areas)")
    if invalid:
        notes.append(f"--aoi {name}: {invalid} invalid polygon(s) (self-intersecting, or "
                     "similar) repaired with GEOS's make_valid; check the area if it matters")
    return AreaOfInterest(tuple(groups), label or Path(path).name, tuple(notes))


def _beyond_degrees(geoms: np.ndarray) -> float | None:
    """The coordinate furthest past what longitudes (±180) and latitudes (±90) reach, or
    None when every coordinate could be one."""
    if not len(geoms):
        return None
    w, s, e, n = shapely.total_bounds(geoms)
    if max(abs(w), abs(e)) <= 180 and max(abs(s), abs(n)) <= 90:
        return None
    return float(max(abs(w), abs(e), abs(s), abs(n)))


def _layer_crs(path: Path, layer: str, found: str | None, given: CRS | None,
               beyond: float | None = None) -> CRS | None:
    """The CRS of one layer: its own, else ``given`` (--aoi-crs). A layer said to be in
    degrees (GeoJSON without a "crs" member always is, RFC 7946) whose coordinates cannot be
    degrees (``beyond``) takes ``given``, or is refused."""
    if not found:
        return given
    layer_crs = parse_crs(found, f"{path} (layer {layer}):")
    if beyond is not None and layer_crs.is_geographic:
        if given is not None:
            return given
        raise ConfigError(
            f"--aoi {path}: its coordinates reach {beyond:,.0f}, which no longitude or "
            f"latitude does, yet its CRS is {layer_crs.to_string()} (GeoJSON without a \"crs\" "
            "member is read as longitude/latitude, RFC 7946)",
            hint="give --aoi-crs with the CRS they are in, e.g. --aoi-crs EPSG:32631")
    if given is not None and given != layer_crs:
        raise ConfigError(f"--aoi {path} has its own CRS ({layer_crs.to_string()}): "
                          "--aoi-crs is for a box or a file without one",
                          hint="leave out --aoi-crs")
    return layer_crs


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _polygons(geoms: np.ndarray) -> shapely.Geometry:
    """The union of the polygonal parts of ``geoms``, made valid."""
    geoms = geoms[~shapely.is_missing(geoms)]
    geoms = shapely.make_valid(geoms)
    parts = shapely.get_parts(geoms)
    while True:  # collections nest: flatten until only simple geometries remain
        nested = shapely.get_type_id(parts) == 7
        if not nested.any():
            break
        parts = np.concatenate([parts[~nested], shapely.get_parts(parts[nested])])
    polygons = parts[shapely.get_type_id(parts) == 3]
    return shapely.union_all(polygons) if len(polygons) else shapely.Polygon()


@dataclass(frozen=True)
class PlacedAOI:
    """An AOI on one raster, in the file's pixels."""

    window: tuple[int, int, int, int]  # the outputs': (col_off, row_off, width, height)
    area: shapely.Geometry  # polygons in pixel coordinates, cut to the raster
    rectangle: bool  # the area is a box that covers every output pixel: nothing to mask

    def touches(self, col: int, row: int, width: int, height: int) -> bool:
        """Whether pixels ``col .. col+width``, ``row .. row+height`` reach the area (a tile
        that does not is not run: none of its pixels is output)."""
        return bool(shapely.intersects(self.area, shapely.box(col, row, col + width,
                                                              row + height)))

    def inside(self, col: int, row: int, width: int, height: int) -> np.ndarray:
        """``height × width`` bool: which of those pixels have their centre in the area."""
        if self.rectangle:
            return np.ones((height, width), dtype=bool)
        from rasterio.features import geometry_mask

        part = shapely.clip_by_rect(self.area, col, row, col + width, row + height)
        if part.is_empty:
            return np.zeros((height, width), dtype=bool)
        return geometry_mask([part], out_shape=(height, width),
                             transform=Affine.translation(col, row), invert=True)


def place_aoi(aoi: AreaOfInterest, path: Path | str, crs: CRS | None, transform: Affine,
              width: int, height: int, has_sensor_model: bool = False) -> PlacedAOI:
    """Where ``aoi`` falls on a raster of ``width × height`` pixels."""
    if transform.is_identity and has_sensor_model:
        raise ConfigError("is georeferenced by ground control points or RPCs, not a "
                          "geotransform, so --aoi cannot be placed on it", path=path,
                          hint="warp it to a map grid first (gdalwarp), or leave out --aoi")
    to_pixels = ~transform
    pieces = []
    for part_crs, geom in aoi.parts:
        if part_crs is not None and crs is None:
            raise ConfigError(f"has no CRS, so an area given in {part_crs.to_string()} "
                              "cannot be placed on it", path=path,
                              hint="give the AOI in the raster's own coordinates, without "
                              "a CRS")
        if part_crs is not None and part_crs != crs:
            geom = _near_raster(geom, part_crs, crs, transform, width, height)
            if geom.is_empty:  # nowhere near this raster
                continue
            geom = _reproject(geom, part_crs, crs, path)
        pieces.append(shapely.affinity.affine_transform(
            geom, [to_pixels.a, to_pixels.b, to_pixels.d, to_pixels.e, to_pixels.c,
                   to_pixels.f]))
    # polygons only: a reprojection made valid may leave slivers of lines, which would mark
    # pixels along them as inside
    area = _polygons(np.array([shapely.intersection(shapely.union_all(pieces),
                                                    shapely.box(0, 0, width, height))]))
    if not area.is_empty:
        xmin, ymin, xmax, ymax = area.bounds
        # pixels whose centres (i + 0.5) lie in the bounds
        c0, c1 = math.ceil(xmin - 0.5), math.floor(xmax - 0.5) + 1
        r0, r1 = math.ceil(ymin - 0.5), math.floor(ymax - 0.5) + 1
    if area.is_empty or c1 <= c0 or r1 <= r0:
        raise OutsideAOI(f"the area of interest ({aoi.label}) holds no pixel of it: "
                         f"{_both_extents(aoi, crs, transform, width, height)}",
                         path=path, hint="check the AOI's coordinates and CRS (--aoi-crs)")
    rectangle = bool(shapely.equals(area, shapely.box(*area.bounds)))
    shapely.prepare(area)
    return PlacedAOI((c0, r0, c1 - c0, r1 - r0), area, rectangle)


def _both_extents(aoi: AreaOfInterest, crs: CRS | None, transform: Affine, width: int,
                  height: int) -> str:
    """The AOI's and the raster's extents, side by side in the AOI's CRS (a swapped latitude
    and longitude, or a wrong --aoi-crs, shows at a glance), and the raster's in its own."""
    from rasterio.transform import array_bounds
    from rasterio.warp import transform_bounds

    def text(bounds) -> str:
        return ",".join(f"{v:.10g}" for v in bounds)

    own = array_bounds(height, width, transform)
    where = f"in {crs.to_string()}" if crs else "in its own coordinates"
    alone = f"the raster covers {text(own)} (W,S,E,N) {where}"
    crss = {str(c) for c, _ in aoi.parts}
    if len(crss) > 1:  # parts in several CRSs: no one frame to compare them in
        return alone
    area = text(shapely.total_bounds([g for _, g in aoi.parts]))
    aoi_crs = aoi.parts[0][0]
    if aoi_crs is None or crs is None or aoi_crs == crs:
        return f"the area spans {area} and the raster {text(own)} (W,S,E,N {where})"
    try:
        seen = text(transform_bounds(crs, aoi_crs, *own))
    except Exception:  # noqa: BLE001 - the raster's own extent still helps
        return alone
    return (f"the area spans {area} and the raster {seen} (W,S,E,N in "
            f"{aoi_crs.to_string()}; the raster's {text(own)} {where})")


def _near_raster(geom: shapely.Geometry, src: CRS, dst: CRS, transform: Affine, width: int,
                 height: int) -> shapely.Geometry:
    """``geom`` cut to a generous box around the raster, in ``src``: a continent, or the
    whole world in degrees, cannot be taken to a UTM zone whole (PROJ fails or folds it)."""
    from rasterio.transform import array_bounds
    from rasterio.warp import transform_bounds

    try:
        west, south, east, north = transform_bounds(dst, src, *array_bounds(height, width,
                                                                           transform),
                                                    densify_pts=21)
    except Exception:  # noqa: BLE001 - no footprint to cut to: reproject the whole area
        return geom
    if not all(math.isfinite(v) for v in (west, south, east, north)) or west >= east:
        return geom  # e.g. a footprint across the antimeridian
    grow = 0.5 * max(east - west, north - south)
    return shapely.clip_by_rect(geom, west - grow, south - grow, east + grow, north + grow)


def _reproject(geom: shapely.Geometry, src: CRS, dst: CRS, path) -> shapely.Geometry:
    from rasterio.warp import transform_geom

    xmin, ymin, xmax, ymax = geom.bounds
    step = max(xmax - xmin, ymax - ymin) / _DENSIFY
    if step > 0:
        geom = shapely.segmentize(geom, step)
    try:
        moved = shapely.geometry.shape(transform_geom(src, dst, shapely.geometry.mapping(geom)))
    except Exception as exc:  # noqa: BLE001 - PROJ's failures come in several types
        raise ConfigError(f"the area of interest cannot be moved from {src.to_string()} to "
                          f"the raster's CRS ({_first_line(exc)})", path=path) from None
    return shapely.make_valid(moved)


def place_on_file(aoi: AreaOfInterest, path: Path) -> PlacedAOI:
    """:func:`place_aoi` on the raster at ``path`` (its header only)."""
    from crossearth_cli.raster.reader import open_raster

    with open_raster(path) as src:
        return place_aoi(aoi, path, src.crs, src.transform, src.width, src.height,
                         bool(src.gcps[0]) or bool(src.rpcs))


def overlaps(aoi: AreaOfInterest, path: Path) -> bool:
    """Whether the AOI holds a pixel of the raster at ``path``; True when that cannot be
    told (an unreadable file fails later, with its own reason)."""
    try:
        place_on_file(aoi, path)
    except OutsideAOI:
        return False
    except Exception:  # noqa: BLE001 - reported when the file runs
        return True
    return True


__all__ = ["AreaOfInterest", "OutsideAOI", "PlacedAOI", "overlaps", "parse_aoi",
           "parse_crs", "place_aoi", "place_on_file", "read_aoi_file"]
