"""Scale-out under ``torchrun``: PyTorch's own process groups, no home-made scheduler.

Ranks exchange only small Python objects (results, failures) over a gloo group, which works
with and without GPUs. Each rank writes its own files; rank 0 reports, merges the row parts of
a scene split across ranks into one GeoTIFF, and writes mosaics.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from crossearth_cli.batch import RankInfo
from crossearth_cli.errors import ConfigError, OutputError
from crossearth_cli.raster.writer import (  # noqa: F401 - part_path: the CLI's
    BLOCK,
    GeoTiffSink,
    RasterSpec,
    compression_threads,
    part_path,
    write_text_atomically,
)


def init(rank: RankInfo) -> None:
    """Join the torchrun process group (gloo: only small objects travel)."""
    if rank.world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")


def shutdown(rank: RankInfo) -> None:
    if rank.world <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather(obj, rank: RankInfo) -> list:
    if rank.world <= 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * rank.world
    dist.all_gather_object(out, obj)
    return out


def device_for(rank: RankInfo, device: str) -> str:
    """Each rank gets its own GPU (``LOCAL_RANK``) when the device is left to us."""
    import torch

    if rank.world > 1 and device.lower().startswith("cuda:"):
        # every rank on one GPU, each sizing its batch from that card's free memory
        raise ConfigError(f"--device {device} under torchrun puts every rank on the same GPU",
                          hint="use --device cuda (or auto): each rank takes the GPU of its "
                               "LOCAL_RANK; CUDA_VISIBLE_DEVICES chooses which GPUs")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{rank.local_rank % torch.cuda.device_count()}"
    return device


def merge_row_parts(parts_of: dict[Path, list[Path]], cog: bool = False,
                    compress: str = "deflate") -> list[Path]:
    """Each final output (class raster first) from its row-band parts, all committed together
    as one process commits a scene's outputs (:meth:`GeoTiffSink.commit_together`): a stop
    or a failure leaves none of them, so the same command runs again. The parts are removed
    once all are in place."""
    sinks: list[GeoTiffSink] = []
    try:
        for final, parts in parts_of.items():
            sinks.append(_merged_sink(parts, final, cog, compress))
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    GeoTiffSink.commit_together(sinks)
    for parts in parts_of.values():
        for p in parts:
            p.unlink(missing_ok=True)
    return list(parts_of)


def _merged_sink(parts: list[Path], final: Path, cog: bool, compress: str) -> GeoTiffSink:
    """Row-band parts (same width, in order) stacked into ``final``'s temporary, not yet
    renamed. Georeferencing, colour table, tags and band descriptions come from the first part,
    whose transform is the scene's (it starts at row 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        heads = [rasterio.open(p) for p in parts]
    try:
        first = heads[0]
        widths = {h.width for h in heads}
        if len(widths) != 1:
            raise OutputError("row parts differ in width; cannot merge", path=final)
        height = sum(h.height for h in heads)
        try:
            cmap = first.colormap(1)
        except ValueError:
            cmap = None
        nbits = first.tags(1, ns="IMAGE_STRUCTURE").get("NBITS")
        spec = RasterSpec(
            path=final, count=first.count, dtype=first.dtypes[0], nodata=first.nodata,
            colormap=cmap, tags=first.tags(), band_descriptions=list(first.descriptions),
            scales=list(first.scales) if any(s != 1 for s in first.scales) else None,
            compress=compress, cog=cog,
            overview_resampling="mode" if cmap else "average",
            nbits=int(nbits) if nbits else None,
            threads=compression_threads(),  # no model beside this merge
        )
        gcps = first.gcps if first.gcps[0] else None
        sink = GeoTiffSink(spec, height, first.width, first.crs, first.transform, gcps,
                           first.rpcs)
        try:
            y = 0
            for h in heads:
                for r in range(0, h.height, BLOCK):
                    n = min(BLOCK, h.height - r)
                    sink.write_rows(y + r, h.read(window=Window(0, r, h.width, n)))
                y += h.height
        except BaseException:
            sink.abort()
            raise
    finally:
        for h in heads:
            h.close()
    return sink


def write_mosaic_vrt(paths: list[Path], vrt: Path) -> tuple[Path, list[str]]:
    """One VRT over many class rasters (same CRS, north-up). Returns the VRT and notes."""
    from crossearth_cli.raster.mosaic import color_table_xml
    from crossearth_cli.raster.writer import class_names_in, class_tags

    notes: list[str] = []
    infos = []
    tags: dict[str, str] = {}
    for p in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(p) as ds:
                infos.append((p, ds.crs, ds.transform, ds.width, ds.height, ds.colormap(1)
                              if ds.count else None))
                if len(infos) == 1:  # the first output's tags: its class names
                    tags = ds.tags()
    if not infos:
        raise ConfigError("no outputs to put in the mosaic")
    crs0 = infos[0][1]
    usable = []
    for info in infos:
        p, crs, t, w, h, _ = info
        if crs != crs0:
            notes.append(f"{p.name}: left out of the mosaic (CRS {crs} differs from {crs0})")
        elif t.b or t.d:
            notes.append(f"{p.name}: left out of the mosaic (rotated grid)")
        else:
            usable.append(info)
    # a VRT places sources without flipping them: grids whose rows (south-up) or columns run
    # the other way than most are left out (their DstRect would have a negative size)
    axes = Counter((t.a > 0, t.e > 0) for _, _, t, _, _, _ in usable)
    main_axes = axes.most_common(1)[0][0] if axes else None
    for info in [i for i in usable if (i[2].a > 0, i[2].e > 0) != main_axes]:
        usable.remove(info)
        notes.append(f"{info[0].name}: left out of the mosaic (its grid is flipped against "
                     "the others': rows or columns run the other way)")
    if not usable:
        raise ConfigError("no outputs to put in the mosaic")
    t0 = usable[0][2]
    res_x, res_y = t0.a, t0.e
    left = min(t.c for _, _, t, _, _, _ in usable)
    top = max(t.f for _, _, t, _, _, _ in usable) if res_y < 0 else min(
        t.f for _, _, t, _, _, _ in usable)
    right = max(t.c + w * t.a for _, _, t, w, _, _ in usable)
    bottom = min(t.f + h * t.e for _, _, t, _, h, _ in usable) if res_y < 0 else max(
        t.f + h * t.e for _, _, t, _, h, _ in usable)
    width = int(round((right - left) / res_x))
    height = int(round((bottom - top) / res_y))
    cmap = infos[0][5]
    colors = f"<ColorInterp>Palette</ColorInterp>{color_table_xml(cmap)}" if cmap else ""
    sources = []
    for p, _, t, w, h, _ in usable:
        x_off = (t.c - left) / res_x
        y_off = (t.f - top) / res_y
        dst_w = w * t.a / res_x
        dst_h = h * t.e / res_y
        src = escape(os.path.relpath(p.resolve(), vrt.parent.resolve()))
        sources.append(
            f'<ComplexSource><SourceFilename relativeToVRT="1">{src}</SourceFilename>'
            f"<SourceBand>1</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
            f'<DstRect xOff="{x_off:.6f}" yOff="{y_off:.6f}" xSize="{dst_w:.6f}" '
            f'ySize="{dst_h:.6f}"/><NODATA>255</NODATA></ComplexSource>'
        )
    srs = f"<SRS>{escape(crs0.to_wkt())}</SRS>" if crs0 else ""
    names = class_names_in(tags)  # the mosaic carries them too: it reads as ours
    metadata = "".join(f'<MDI key="{escape(k)}">{escape(v)}</MDI>'
                       for k, v in class_tags(names).items()) if names else ""
    srs += f"<Metadata>{metadata}</Metadata>" if metadata else ""
    gt = ", ".join(repr(float(v)) for v in (left, res_x, 0.0, top, 0.0, res_y))
    xml = (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">{srs}'
        f"<GeoTransform>{gt}</GeoTransform>"
        f'<VRTRasterBand dataType="Byte" band="1"><NoDataValue>255</NoDataValue>{colors}'
        f"{''.join(sources)}</VRTRasterBand></VRTDataset>\n"
    )
    vrt.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(vrt, xml)
    return vrt, notes


SUMMARY_MARK = "crossearth_summary"


def summary_json(path: Path, data: dict) -> None:
    """``--summary``: ``data`` as JSON, every URL in it without its query string (a signed
    URL's signature would stay in the file)."""
    from crossearth_cli import __version__

    path.parent.mkdir(parents=True, exist_ok=True)
    data = _without_queries({SUMMARY_MARK: __version__, **data})
    write_text_atomically(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _without_queries(value):
    from crossearth_cli.raster.remote import hide_queries

    if isinstance(value, str):
        return hide_queries(value)
    if isinstance(value, dict):
        return {_without_queries(k): _without_queries(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_queries(v) for v in value]
    return value


def _is_our_summary(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return SUMMARY_MARK in json.loads(f.read(1 << 20) or b"null")
    except (OSError, ValueError, TypeError):
        return False


def _is_a_vrt(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip().startswith(b"<VRTDataset")
    except OSError:
        return False


def check_report_path(path: Path, what: str, overwrite: bool, taken) -> None:
    """Refuse a --summary or --vrt path that is an input or another output, a folder, or an
    existing file crossearth did not write (a rerun refreshes its own reports, so resuming a
    folder needs no --overwrite); then prove its folder is writable, before any work."""
    from crossearth_cli.raster.writer import ensure_writable_folder, same_path

    option = "--summary" if what == "summary" else "--vrt"
    for other in taken:
        if same_path(path, Path(other)):
            raise OutputError(
                f"{option} names a file this run reads or writes", path=path,
                hint=f"give {option} its own file name",
            )
    if path.is_dir():
        raise OutputError(f"{option} is a folder", path=path, hint="give a file name")
    ours = _is_our_summary if what == "summary" else _is_a_vrt
    if path.exists() and not overwrite and not ours(path):
        raise OutputError(
            f"exists and is not a crossearth {what}", path=path,
            hint="pass --overwrite to replace it, or choose another name",
        )
    ensure_writable_folder(path, f"the folder of {option}")


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)
