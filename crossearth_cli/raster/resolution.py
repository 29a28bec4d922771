"""Whether a scene's pixels are near the size the model was trained on.

CrossEarth's models saw one ground sampling distance in training (Potsdam's 5 cm, WHU's 30 cm,
...), varied by the usual random resizing of about 0.5× to 2×. ``segment`` keeps the scene's
own resolution (no resize, unlike the paper's test pipeline for its benchmark images), so a
scene far outside that range is told, with how to resample it.
"""

from __future__ import annotations

import functools
import math

# Training pipelines resize images randomly by 0.5x to 2x: within this factor of the training
# pixel size the model has seen such objects at such sizes.
TRAINED_FACTOR = 2.0
# Beyond this factor coarser, upsampling to the training size is not worth suggesting: the
# objects the model knows are a few pixels wide or less.
UPSAMPLE_FACTOR = 8.0


def pixel_size_m(crs_wkt: str | None, transform, width: int, height: int) -> float | None:
    """The scene's pixel size at its centre in metres on the ellipsoid (geometric mean of
    both axes), or None when it has no CRS or geotransform, or a CRS without an ellipsoid.
    About 0.02 ms a scene once its CRS was seen (a folder of 10,000 tiles in EPSG:4326 must not
    pay a projection set-up each)."""
    if not crs_wkt or transform is None or transform.is_identity:
        return None
    try:
        tools = _to_lonlat(crs_wkt)
    except Exception:  # noqa: BLE001 - a CRS pyproj cannot handle: no note, not an error
        return None
    if tools is None:
        return None
    to_lonlat, geod = tools
    cx, cy = width / 2.0, height / 2.0
    xy = [transform * (cx, cy), transform * (cx + 1.0, cy), transform * (cx, cy + 1.0)]
    lon, lat = to_lonlat.transform([p[0] for p in xy], [p[1] for p in xy])
    _, _, d = geod.inv([lon[0]] * 2, [lat[0]] * 2, list(lon[1:]), list(lat[1:]))
    size = math.sqrt(float(d[0]) * float(d[1]))
    return size if math.isfinite(size) and size > 0 else None


@functools.lru_cache(maxsize=16)
def _to_lonlat(crs_wkt: str):
    """(CRS → its longitude/latitude, the ellipsoid's Geod), or None without an ellipsoid."""
    import pyproj

    crs = pyproj.CRS.from_wkt(crs_wkt)
    geodetic = crs.geodetic_crs
    if geodetic is None:
        return None
    return pyproj.Transformer.from_crs(crs, geodetic, always_xy=True), geodetic.get_geod()


def resolution_note(pixel_m: float | None, gsd_m: float | None, model: str) -> str | None:
    """One line when ``pixel_m`` is more than :data:`TRAINED_FACTOR` from ``gsd_m``."""
    if pixel_m is None or gsd_m is None:
        return None
    ratio = pixel_m / gsd_m
    if 1 / TRAINED_FACTOR <= ratio <= TRAINED_FACTOR:
        return None
    gsd, warp = _metres(gsd_m), f"gdalwarp -tr {gsd_m:g} {gsd_m:g} -r bilinear, in a metric CRS"
    said = f"pixels are {_metres(pixel_m)}, "
    if ratio < 1:
        return (said + f"{1 / ratio:.0f}× finer than the {gsd} imagery {model} was trained on: "
                f"objects look larger to it than in training; resample to about {gsd} first "
                f"for its best classes (and a faster run): e.g. {warp}")
    if ratio <= UPSAMPLE_FACTOR:
        return (said + f"{ratio:.0f}× coarser than the {gsd} imagery {model} was trained on: "
                f"objects look smaller to it than in training; resampling to about {gsd} may "
                f"help (it adds no detail): e.g. {warp}")
    return (said + f"{ratio:.0f}× coarser than the {gsd} imagery {model} was trained on: "
            "far coarser than anything it has seen, so expect unreliable classes")


def _metres(m: float) -> str:
    return f"{m:.3g} m" if m < 1000 else f"{m / 1000:.3g} km"
