"""The class raster as a vectorizing source: validation, class names, class selection.

Only metadata is read here; pixels are read window by window by the workers.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossearth_cli.errors import InputError, gdal_words

# rasterio.features.shapes accepts these integer types directly; others are cast to int32.
SHAPES_DTYPES = ("uint8", "uint16", "int16", "int32")


@dataclass
class ClassRaster:
    path: str
    width: int
    height: int
    dtype: str
    nodata: int | None
    crs_wkt: str | None
    transform: object  # affine.Affine
    names: dict[int, str] = field(default_factory=dict)  # from tags; empty for foreign rasters
    block_shape: tuple[int, int] = (256, 256)
    # "ground control points" or "RPCs" when they are its only georeferencing: the vectors
    # are then in pixel coordinates, without a CRS
    sensor_model: str | None = None
    name: str = ""  # as the user gave it (a URL, where ``path`` is GDAL's /vsicurl/... path)

    @property
    def label(self) -> str:
        return self.name or self.path

    def name_of(self, class_id: int) -> str:
        i = int(class_id)  # no name: class_2, and class_minus_2 for -2 (a layer name's "-")
        return self.names.get(i, f"class_{i}" if i >= 0 else f"class_minus_{-i}")

    def describe_classes(self) -> str:
        if not self.names:
            return "this raster has no class names: give ids or class_<id>"
        return "choose from " + ", ".join(f"{i}={n}" for i, n in sorted(self.names.items()))


def _class_names(tags: dict[str, str]) -> dict[int, str]:
    names: dict[int, str] = {}
    raw = tags.get("classes")
    if raw:
        try:
            listed = json.loads(raw)
        except ValueError:
            listed = None
        if isinstance(listed, list):
            names = {i: str(n) for i, n in enumerate(listed)}
        elif isinstance(listed, dict):
            names = {int(k): str(v) for k, v in listed.items() if str(k).lstrip("-").isdigit()}
    if not names:
        for key, value in tags.items():
            m = re.fullmatch(r"class_(\d+)", key)
            if m:
                names[int(m.group(1))] = str(value)
    return names


def open_class_raster(path: str | os.PathLike) -> ClassRaster:
    """Check that ``path`` (a file, or a URL: see ``raster.remote``) is a single-band integer
    raster and read its class names."""
    import rasterio
    from rasterio.errors import RasterioIOError

    from crossearth_cli.raster.remote import gdal_path, is_remote

    if is_remote(path):  # the workers open GDAL's path; messages name the URL as given
        from crossearth_cli.raster.reader import open_raster

        with open_raster(str(path)) as ds:
            return _class_raster(ds, gdal_path(str(path)), str(path))
    p = Path(path)
    if not p.exists():
        raise InputError("class raster not found", path=p, hint="check the path")
    if p.is_dir():
        raise InputError("is a folder, not a class raster", path=p, hint="pass a GeoTIFF file")
    if p.stat().st_size == 0:
        raise InputError("is empty (0 bytes)", path=p, hint="write or copy it again")
    try:
        with rasterio.open(p) as ds:
            return _class_raster(ds, str(p), str(p))
    except RasterioIOError as exc:
        raise InputError(
            f"cannot be read as a raster ({gdal_words(exc, p)})", path=p,
            hint="pass a GeoTIFF class raster"
        ) from None


def _class_raster(ds, path: str, name: str) -> ClassRaster:
    from crossearth_cli.raster.reader import check_readable

    check_readable(ds, name=name)  # a truncated file fails now, before the output is started
    if ds.count != 1:
        raise InputError(
            f"has {ds.count} bands, but a class raster has one band of class ids",
            path=name,
            hint="pass the class raster written by `crossearth segment`",
        )
    dtype = ds.dtypes[0]
    if not np.issubdtype(np.dtype(dtype), np.integer):
        raise InputError(
            f"holds {dtype} values, not integer class ids",
            path=name,
            hint="pass the class raster, not a probability or confidence raster",
        )
    tags = dict(ds.tags())
    tags.update({k: v for k, v in ds.tags(1).items() if k not in tags})
    nodata = ds.nodata
    if nodata is not None:
        nodata = int(nodata) if float(nodata).is_integer() else None
    blocks = ds.block_shapes[0] if ds.block_shapes else (256, 256)
    sensor_model = None
    if ds.transform.is_identity:  # no geotransform
        sensor_model = "ground control points" if ds.gcps[0] else "RPCs" if ds.rpcs else None
    crs = ds.crs if sensor_model is None else None  # an RPC file's CRS is not its grid's
    return ClassRaster(
        path=path,
        width=ds.width,
        height=ds.height,
        dtype=dtype,
        nodata=nodata,
        crs_wkt=crs.to_wkt() if crs else None,
        transform=ds.transform,
        names=_class_names(tags),
        block_shape=(int(blocks[0]), int(blocks[1])),
        sensor_model=sensor_model,
        name=name,
    )


def check_confidence(path: str | os.PathLike, src: ClassRaster) -> str:
    """The confidence raster must sit on exactly the class raster's grid."""
    import rasterio
    from rasterio.errors import RasterioIOError

    from crossearth_cli.raster.remote import gdal_path, is_remote

    if is_remote(path):
        from crossearth_cli.raster.reader import open_raster

        with open_raster(str(path)) as ds:
            _check_same_grid(ds, src, str(path))
        return gdal_path(str(path))
    p = Path(path)
    if not p.exists():
        raise InputError("confidence raster not found", path=p, hint="check --confidence")
    try:
        with rasterio.open(p) as ds:
            _check_same_grid(ds, src, str(p))
    except RasterioIOError as exc:
        raise InputError(f"cannot be read as a raster ({exc})", path=p) from None
    return str(p)


def _check_same_grid(ds, src: ClassRaster, name: str) -> None:
    if (ds.width, ds.height) == (src.width, src.height) and ds.transform.almost_equals(
            src.transform):
        return
    raise InputError(f"is on another grid than the class raster: {_grid_difference(ds, src)}",
                     path=name, hint="pass the confidence raster written with this class raster")


def _grid_difference(ds, src: ClassRaster) -> str:
    """What differs between two grids, in words a user can check."""
    size = (f"{ds.width}x{ds.height} px against {src.width}x{src.height}"
            if (ds.width, ds.height) != (src.width, src.height) else "")
    a, b = ds.transform, src.transform
    if not all(math.isclose(u, v, rel_tol=1e-9)
               for u, v in zip((a.a, a.b, a.d, a.e), (b.a, b.b, b.d, b.e))):
        how = f"pixels of {abs(a.a):g}x{abs(a.e):g} against {abs(b.a):g}x{abs(b.e):g}"
    elif not a.almost_equals(b):
        col, row = ~b * (a.c, a.f)  # where its corner lies on the class raster's grid
        how = f"its corner is at column {col:.4g}, row {row:.4g} of the class raster"
    else:
        how = ""
    return "; ".join(p for p in (size, how) if p)


def _dtype_range(dtype: str) -> tuple[int, int]:
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def resolve_classes(src: ClassRaster, spec) -> list[int] | None:
    """Turn ``--classes`` (names or ids, comma-separated or repeated) into class ids.

    ``None`` means every value except nodata. Unknown names and ids outside the raster's class
    list are user errors that name the classes there are.
    """
    if spec is None:
        return None
    tokens: list[str] = []
    items = [spec] if isinstance(spec, (str, int)) else list(spec)
    for item in items:
        tokens.extend(t.strip() for t in str(item).split(",") if t.strip())
    if not tokens:
        return None
    by_name = {n.lower(): i for i, n in src.names.items()}
    lo, hi = _dtype_range(src.dtype)
    ids: list[int] = []
    for tok in tokens:
        if re.fullmatch(r"-?\d+", tok):
            cid = int(tok)
            if src.names and cid not in src.names:
                raise InputError(
                    f"class id {cid} is not one of this raster's classes",
                    path=src.path,
                    hint=src.describe_classes(),
                )
            if not lo <= cid <= hi:
                raise InputError(
                    f"class id {cid} cannot occur in a {src.dtype} raster",
                    path=src.path,
                    hint="check --classes",
                )
        elif tok.lower() in by_name:
            cid = by_name[tok.lower()]
        elif re.fullmatch(r"class_(\d+)", tok.lower()) and not src.names:
            cid = int(tok.lower()[6:])
        else:
            raise InputError(
                f"unknown class {tok!r} in --classes", path=src.path, hint=src.describe_classes()
            )
        if src.nodata is not None and cid == src.nodata:
            raise InputError(
                f"class {tok!r} is the raster's nodata value {src.nodata}",
                path=src.path,
                hint="choose a real class in --classes",
            )
        if cid not in ids:
            ids.append(cid)
    return ids


def pick_by_name(src: ClassRaster, ids: list[int], word: str) -> list[int]:
    """Selected classes whose name contains ``word``; all selected ones when none does."""
    named = [i for i in ids if word in src.name_of(i).lower()]
    return named or list(ids)
