"""Many files that tile one mosaic, read as one scene (``segment --mosaic``).

Tiles of an orthomosaic or a gridded product are often delivered as separate files. Segmented
one by one, each file's edge pixels see no context past the file, and each file is blended on
its own: the class map changes along every file edge. Read as one scene, the model's windows
cross the file edges like any other pixel, and the result is the one the whole mosaic would
give as a single file.

The files are put on one grid by a GDAL VRT (see :func:`vrt_xml`): where a file has valid
pixels they are used; gaps between files, and each file's own nodata, read as nodata. Where
files overlap, the later one in input order wins, but only with its valid pixels. Nothing is
resampled: every file must share the CRS, pixel size, grid, bands, pixel type and nodata of
the others (of the most common kind), or it is refused with the fix.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from crossearth_cli.errors import InputError

# tolerance, in pixels, for an origin to count as on the grid (transforms printed in decimal
# degrees or metres carry rounding far below this)
GRID_TOLERANCE_PX = 0.01

GDAL_TYPES = {
    "uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
    "int32": "Int32", "uint64": "UInt64", "int64": "Int64", "float32": "Float32",
    "float64": "Float64",
}


@dataclass(frozen=True)
class TileHeader:
    """What placing a file on the mosaic needs from its header."""

    path: Path | str  # str: a URL (raster.remote)
    crs: object  # rasterio CRS or None
    transform: object  # affine.Affine
    width: int
    height: int
    count: int
    dtype: str
    colorinterp: tuple
    descriptions: tuple
    colormap: dict | None  # band 1's palette, for paletted files
    nodata: tuple | None  # every band's nodata value (repr: NaN equals NaN), or None
    written_by_crossearth: bool = False  # an output of ours (it carries class names)
    georeferenced: bool = True

    @property
    def name(self) -> str:
        """The file's name, for messages."""
        from crossearth_cli.raster.remote import file_name, is_remote

        return file_name(self.path) if is_remote(self.path) else Path(self.path).name

    @property
    def source(self) -> str:
        """What a VRT opens for this file: its absolute path, or GDAL's path for a URL."""
        from crossearth_cli.raster.remote import gdal_path, is_remote

        return gdal_path(self.path) if is_remote(self.path) else str(Path(self.path).resolve())


@dataclass(frozen=True)
class Placement:
    """The mosaic grid: its size, its transform, and each file's pixel offset on it."""

    width: int
    height: int
    transform: object
    offsets: tuple[tuple[int, int], ...]  # (column, row) of each file's top-left pixel
    covered: float  # the files' pixels over the grid's (overlaps counted twice)


def read_header(path: Path | str) -> TileHeader:
    import rasterio
    from rasterio.enums import MaskFlags
    from rasterio.errors import NotGeoreferencedWarning

    from crossearth_cli.raster.reader import _check_real, check_readable, open_raster
    from crossearth_cli.raster.writer import class_names_in

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with open_raster(path) as src:
            _check_real(src, path)
            # a truncated file is named now (as given, a URL too), not as "the mosaic"
            check_readable(src, name=str(path))
            cmap = None
            if src.count and src.colorinterp[0] == rasterio.enums.ColorInterp.palette:
                cmap = src.colormap(1)
            by_value = all(MaskFlags.nodata in f for f in src.mask_flag_enums)
            nodata = tuple(repr(float(v)) for v in src.nodatavals) if by_value else None
            return TileHeader(path, src.crs, src.transform, src.width, src.height, src.count,
                              src.dtypes[0], tuple(src.colorinterp), tuple(src.descriptions),
                              cmap, nodata, class_names_in(src.tags()) is not None,
                              src.crs is not None or not src.transform.is_identity)


def check_compatible(ref: TileHeader, other: TileHeader, bands_given: bool) -> None:
    """Refuse a file that cannot go on ``ref``'s grid without resampling or converting."""
    t0, t = ref.transform, other.transform
    fix = f"bring it onto {ref.name}'s grid, e.g. gdalwarp -t_srs, -tr and -tap"
    if other.crs != ref.crs:
        raise InputError(f"its CRS ({other.crs}) differs from {ref.name}'s "
                         f"({ref.crs}); a mosaic needs one CRS", path=other.path, hint=fix)
    if t.b or t.d or t0.b or t0.d:
        raise InputError("has a rotated grid; a mosaic needs north-up tiles", path=other.path
                         if (t.b or t.d) else ref.path, hint=fix)
    if (t.a > 0) != (t0.a > 0) or (t.e > 0) != (t0.e > 0):
        raise InputError(f"its grid is flipped against {ref.name}'s (its rows or columns "
                         "run the other way, e.g. south-up among north-up tiles)",
                         path=other.path, hint="bring it onto the others' grid, e.g. gdalwarp "
                         "-tap -tr")
    widest = max(other.width, other.height, ref.width, ref.height)
    for size, size0 in ((t.a, t0.a), (t.e, t0.e)):
        # the same pixel size: over a tile, the difference stays under the tolerance
        if abs(size - size0) * widest > GRID_TOLERANCE_PX * abs(size0):
            raise InputError(f"its pixel size ({abs(t.a):g} x {abs(t.e):g}) differs from "
                             f"{ref.name}'s ({abs(t0.a):g} x {abs(t0.e):g})",
                             path=other.path, hint=fix)
    for origin, origin0, size in ((t.c, t0.c, t0.a), (t.f, t0.f, t0.e)):
        shift = (origin - origin0) / size
        if abs(shift - round(shift)) > GRID_TOLERANCE_PX:
            raise InputError(f"is not on {ref.name}'s pixel grid (its origin is "
                             f"{abs(shift - round(shift)):.2f} px off)", path=other.path,
                             hint=fix)
    if other.count != ref.count or other.dtype != ref.dtype:
        raise InputError(f"has {other.count} band(s) of {other.dtype} where "
                         f"{ref.name} has {ref.count} of {ref.dtype}; the tiles of "
                         "a mosaic share their bands and pixel type", path=other.path,
                         hint="convert it with gdal_translate (-b, -ot)")
    if other.colormap != ref.colormap:
        raise InputError(f"its palette differs from {ref.name}'s", path=other.path,
                         hint="expand paletted tiles to RGB with gdal_translate -expand rgb")
    if other.nodata != ref.nodata and (other.nodata or ref.nodata):
        def says(h: TileHeader) -> str:
            if not h.nodata:
                return "no nodata value"
            return f"nodata {', '.join(dict.fromkeys(h.nodata))}"  # one value: once

        raise InputError(f"has {says(other)} where {ref.name} has {says(ref)}",
                         path=other.path, hint="give the tiles one nodata value, e.g. "
                         "gdal_translate -a_nodata")
    if not bands_given and other.colorinterp != ref.colorinterp:
        names = ", ".join(c.name for c in other.colorinterp)
        names0 = ", ".join(c.name for c in ref.colorinterp)
        raise InputError(f"its bands are ({names}) where {ref.name}'s are ({names0})",
                         path=other.path, hint="choose the bands with --bands")


def reference(headers: list[TileHeader]) -> TileHeader:
    """The file the others are checked against: the first of the most common kind (CRS, pixel
    size, bands, pixel type, nodata), so that one odd file among many is the one named; in a
    tie, the first file's kind."""
    def kind(h: TileHeader):
        t = h.transform
        return (str(h.crs), round(t.a, 9), round(t.e, 9), t.b, t.d, h.count, h.dtype,
                h.colorinterp, h.nodata)

    common = Counter(kind(h) for h in headers).most_common(1)[0][0]
    return next(h for h in headers if kind(h) == common)


def place(headers: list[TileHeader], ref: TileHeader | None = None) -> Placement:
    """The smallest grid, aligned with ``ref``'s (the first file's by default), that holds
    every file."""
    t0 = (ref or headers[0]).transform
    # column and row of each file's corner on the first file's grid
    cols = [round((h.transform.c - t0.c) / t0.a) for h in headers]
    rows = [round((h.transform.f - t0.f) / t0.e) for h in headers]
    left, top = min(cols), min(rows)
    width = max(c + h.width for c, h in zip(cols, headers)) - left
    height = max(r + h.height for r, h in zip(rows, headers)) - top
    transform = t0 * t0.translation(left, top)
    offsets = tuple((c - left, r - top) for c, r in zip(cols, rows))
    covered = sum(h.width * h.height for h in headers) / (width * height)
    return Placement(width, height, transform, offsets, covered)


def vrt_xml(headers: list[TileHeader], grid: Placement) -> str:
    """A VRT holding every file at its offset; what is not a file's valid pixel is nodata.

    Files with nodata values (the same in every file) give the VRT those values: a file's
    nodata pixels are not copied over another file's data, and the gaps hold the values, so
    the reader decides validity as in each file (nodata only where every band holds it).
    Otherwise (masks, alpha bands, or no nodata at all) the VRT gets a mask made of the
    files' masks, 0 in the gaps, and only the valid pixels of each file are copied."""
    first = headers[0]  # bands, palette, CRS and nodata: the same in every file
    nodata = first.nodata

    def source(h: TileHeader, offset: tuple[int, int], band: str, extra: str) -> str:
        col, row = offset
        return (
            f'<ComplexSource><SourceFilename relativeToVRT="0">'
            f"{escape(h.source)}</SourceFilename><SourceBand>{band}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{h.width}" ySize="{h.height}"/>'
            f'<DstRect xOff="{col}" yOff="{row}" xSize="{h.width}" ySize="{h.height}"/>'
            f"{extra}</ComplexSource>"
        )

    bands = []
    for b in range(1, first.count + 1):
        interp = first.colorinterp[b - 1].name.capitalize()
        desc = first.descriptions[b - 1]
        palette = color_table_xml(first.colormap) if b == 1 else ""
        value = _gdal_number(nodata[b - 1]) if nodata else None
        skip = f"<NODATA>{value}</NODATA>" if nodata else "<UseMaskBand>true</UseMaskBand>"
        sources = "".join(source(h, o, str(b), skip) for h, o in zip(headers, grid.offsets))
        bands.append(
            f'<VRTRasterBand dataType="{GDAL_TYPES[first.dtype]}" band="{b}">'
            + (f"<Description>{escape(desc)}</Description>" if desc else "")
            + (f"<NoDataValue>{value}</NoDataValue>" if nodata else "")
            + f"<ColorInterp>{interp}</ColorInterp>{palette}{sources}</VRTRasterBand>"
        )
    mask = ""
    if not nodata:  # a 0 (masked) never overwrites a 255 laid down by another file
        mask_sources = "".join(source(h, o, "mask,1", "<NODATA>0</NODATA>")
                               for h, o in zip(headers, grid.offsets))
        mask = (f'<MaskBand><VRTRasterBand dataType="Byte">{mask_sources}</VRTRasterBand>'
                "</MaskBand>")
    srs = f"<SRS>{escape(first.crs.to_wkt())}</SRS>" if first.crs else ""
    t = grid.transform
    gt = ", ".join(repr(float(v)) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
    gt = f"<GeoTransform>{gt}</GeoTransform>" if first.georeferenced else ""
    return (f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">{srs}'
            f"{gt}{''.join(bands)}{mask}</VRTDataset>\n")


def color_table_xml(colormap: dict | None) -> str:
    """A VRT band's ``<ColorTable>`` for a rasterio colormap ({index: (r, g, b, a)}); "" for
    none."""
    if not colormap:
        return ""
    return "<ColorTable>" + "".join(f'<Entry c1="{c[0]}" c2="{c[1]}" c3="{c[2]}" c4="{c[3]}"/>'
                                    for _, c in sorted(colormap.items())) + "</ColorTable>"


def _gdal_number(text: str) -> str:
    """A nodata value as GDAL's VRT reads it (``nan``, ``inf``, ``-inf`` or digits)."""
    value = float(text)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def write_input_vrt(headers: list[TileHeader], vrt: Path, bands_given: bool) -> Placement:
    """Check that the files tile one grid and write the VRT that reads them as one scene."""
    unplaced = [h for h in headers if not h.georeferenced]
    if unplaced and len(headers) > 1:  # one file alone needs no place
        raise InputError(
            "has no georeferencing, so its place in the mosaic is unknown",
            path=unplaced[0].path, hint="give each tile a CRS and geotransform, or segment "
            "the files without --mosaic")
    ref = reference(headers)
    for h in headers:
        if h is not ref:
            check_compatible(ref, h, bands_given)
    grid = place(headers, ref)
    if not math.prod((grid.width, grid.height)):
        raise InputError("the mosaic has no pixels", path=headers[0].path)
    vrt.write_text(vrt_xml(headers, grid))
    return grid
