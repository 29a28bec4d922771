"""True metres for areas and lengths, whatever the raster's CRS.

Polygons are built in pixel coordinates (column, row) and only mapped to the raster's CRS at the
end, so the attributes are computed here from either frame:

* **planar**: a projected CRS whose scale is close to 1 at the scene (UTM, state planes, national
  grids). Area is the planar area in the CRS times the squared unit factor (feet → metres), so an
  unsimplified polygon's ``area_m2`` is exactly pixel count × pixel area, matching what a GIS
  reports for the layer.
* **geodesic**: a geographic CRS (EPSG:4326) or a projection that distorts areas by more than
  1 % at the scene centre (Web Mercator). Areas are computed in a Lambert azimuthal equal-area
  projection centred on the scene (equal-area, hence exact on the ellipsoid); perimeters and
  lengths are geodesic distances along each segment (pyproj.Geod).
* **unknown**: no CRS. Units are taken as metres; the caller warns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from rasterio.transform import Affine

# Above this relative areal distortion at the scene centre a projected CRS is treated like a
# geographic one (planar areas would be wrong by more than a rounding error).
_MAX_PLANAR_AREAL_DISTORTION = 0.01


def affine(geoms, a, b, c, d, e, f):
    """x' = a·x + b·y + c, y' = d·x + e·y + f on every vertex (vectorized)."""

    def fn(xy):
        x, y = xy[:, 0], xy[:, 1]
        return np.column_stack([a * x + b * y + c, d * x + e * y + f])

    return shapely.transform(geoms, fn)


@dataclass
class MetricFrame:
    """Maps pixel-space geometries to CRS coordinates and measures them in metres.

    Picklable (it is sent to worker processes): the pyproj objects are rebuilt lazily.
    """

    transform: Affine
    crs_wkt: str | None
    width: int
    height: int
    mode: str = "unknown"  # "planar" | "geodesic" | "unknown"
    unit_factor: float = 1.0  # CRS linear unit → metre (planar mode)
    laea_proj: str | None = None
    pixel_size_m: tuple[float, float] = (1.0, 1.0)  # (along columns, along rows) at the centre

    # ----------------------------------------------------------------- construction
    @classmethod
    def build(cls, crs_wkt: str | None, transform: Affine, width: int, height: int) -> MetricFrame:
        frame = cls(transform=transform, crs_wkt=crs_wkt, width=width, height=height)
        if crs_wkt:
            frame._classify()
        frame.pixel_size_m = frame._pixel_size()
        return frame

    def _classify(self) -> None:
        import pyproj

        crs = pyproj.CRS.from_wkt(self.crs_wkt)
        if crs.is_geographic:
            self.mode = "geodesic"
        elif crs.is_projected:
            factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
            self.unit_factor = float(factor or 1.0)
            self.mode = "planar"
            lon, lat = self._centre_lonlat(crs)
            try:
                areal = pyproj.Proj(crs).get_factors(lon, lat).areal_scale
            except Exception:  # a projection without factors: trust it as planar
                areal = 1.0
            if np.isfinite(areal) and abs(areal - 1.0) > _MAX_PLANAR_AREAL_DISTORTION:
                self.mode = "geodesic"
        else:  # engineering / unknown kinds: keep the numbers as they are
            self.mode = "unknown"
            return
        if self.mode == "geodesic":
            lon, lat = self._centre_lonlat(crs)
            geod = crs.get_geod()
            self.laea_proj = (
                f"+proj=laea +lat_0={lat:.10f} +lon_0={lon:.10f} +x_0=0 +y_0=0 "
                f"+a={geod.a!r} +b={geod.b!r} +units=m +no_defs"
            )

    def _centre_lonlat(self, crs) -> tuple[float, float]:
        import pyproj

        x, y = self.transform * (self.width / 2.0, self.height / 2.0)
        if crs.is_geographic:
            tr = pyproj.Transformer.from_crs(crs, crs.geodetic_crs or crs, always_xy=True)
        else:
            tr = pyproj.Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)
        lon, lat = tr.transform(x, y)
        return float(lon), float(lat)

    # ----------------------------------------------------------------- pyproj helpers
    def _lonlat_transformer(self):
        cache = self.__dict__.setdefault("_cache", {})
        if "ll" not in cache:
            import pyproj

            crs = pyproj.CRS.from_wkt(self.crs_wkt)
            cache["ll"] = pyproj.Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)
            cache["geod"] = crs.get_geod()
            cache["laea"] = pyproj.Transformer.from_crs(
                crs, pyproj.CRS.from_proj4(self.laea_proj), always_xy=True
            )
        return cache

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_cache", None)
        return state

    # ----------------------------------------------------------------- frames
    def to_crs(self, geoms_px):
        """Pixel (col, row) → CRS coordinates, exactly as rasterio's transform does."""
        t = self.transform
        return affine(geoms_px, t.a, t.b, t.c, t.d, t.e, t.f)

    def to_metric_px(self, geoms_px):
        """Pixel space scaled to metres per axis: right angles and widths are meaningful here."""
        sx, sy = self.pixel_size_m
        return affine(geoms_px, sx, 0.0, 0.0, 0.0, sy, 0.0)

    def from_metric_px(self, geoms_m):
        sx, sy = self.pixel_size_m
        return affine(geoms_m, 1.0 / sx, 0.0, 0.0, 0.0, 1.0 / sy, 0.0)

    def _pixel_size(self) -> tuple[float, float]:
        cx, cy = self.width / 2.0, self.height / 2.0
        pts = shapely.points([(cx, cy), (cx + 1.0, cy), (cx, cy + 1.0)])
        if self.mode == "geodesic":
            cache = self._lonlat_transformer()
            ll = self._apply(cache["ll"], self.to_crs(pts))
            xy = shapely.get_coordinates(ll)
            _, _, d = cache["geod"].inv(xy[[0, 0], 0], xy[[0, 0], 1], xy[1:, 0], xy[1:, 1])
            return float(d[0]), float(d[1])
        xy = shapely.get_coordinates(self.to_crs(pts)) * self.unit_factor
        return (
            float(np.hypot(*(xy[1] - xy[0]))),
            float(np.hypot(*(xy[2] - xy[0]))),
        )

    @staticmethod
    def _apply(transformer, geoms):
        def fn(coords):
            x, y = transformer.transform(coords[:, 0], coords[:, 1])
            return np.column_stack([x, y])

        return shapely.transform(geoms, fn)

    # ----------------------------------------------------------------- measures
    def area_m2(self, geoms_px, geoms_crs=None) -> np.ndarray:
        geoms_px = np.asarray(geoms_px, dtype=object)
        if self.mode == "geodesic":
            if geoms_crs is None:
                geoms_crs = self.to_crs(geoms_px)
            laea = self._apply(self._lonlat_transformer()["laea"], geoms_crs)
            return shapely.area(laea)
        # Pixel space keeps integer vertices, so the area is exact: pixels × |det| × unit².
        t = self.transform
        det = abs(t.a * t.e - t.b * t.d)
        return shapely.area(geoms_px) * det * self.unit_factor**2

    def length_m(self, geoms_crs) -> np.ndarray:
        """Length of lines, or perimeter of polygons, in metres."""
        geoms_crs = np.asarray(geoms_crs, dtype=object)
        if self.mode != "geodesic":
            return shapely.length(geoms_crs) * self.unit_factor
        out = np.zeros(len(geoms_crs), dtype=np.float64)
        if len(geoms_crs) == 0:
            return out
        lines = geoms_crs
        if shapely.get_dimensions(geoms_crs).max(initial=0) == 2:
            lines = shapely.boundary(geoms_crs)
        parts, owner = shapely.get_parts(lines, return_index=True)
        cache = self._lonlat_transformer()
        xy, idx = shapely.get_coordinates(parts, return_index=True)
        if len(xy) < 2:
            return out
        lon, lat = cache["ll"].transform(xy[:, 0], xy[:, 1])
        same = idx[1:] == idx[:-1]
        _, _, d = cache["geod"].inv(lon[:-1][same], lat[:-1][same], lon[1:][same], lat[1:][same])
        per_part = np.bincount(idx[:-1][same], weights=d, minlength=len(parts))
        np.add.at(out, owner, per_part)
        return out
