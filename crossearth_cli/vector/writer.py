"""GeoPackage output through pyogrio, written atomically.

Everything goes to a temporary file next to the target (same folder, so the final rename is
atomic on one filesystem) and is renamed onto the target only when every layer is complete.
On any error or Ctrl-C the temporary file and SQLite's side files are removed: a file named like
the output is either absent or complete.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossearth_cli.errors import OutputError
from crossearth_cli.raster.writer import _track, _untrack, remove_stale_temps, temp_path_for

# GeoPackage 1.2: read by every GDAL ≥ 2.2 and QGIS 3 without version warnings.
_DATASET_OPTIONS = {"VERSION": "1.2"}
_CHUNK = 20_000


def check_suffix(path: Path) -> None:
    if Path(path).suffix.lower() != ".gpkg":
        raise OutputError(
            "vector output must be a GeoPackage", path=path, hint="give a path ending in .gpkg"
        )


def check_output(path: str | os.PathLike, overwrite: bool, make_folder: bool = False) -> Path:
    """Fail early, before any work, on an output that cannot be written. A missing folder is
    made (as segment makes its output folders) with ``make_folder``, when writing starts;
    before that, the nearest folder that exists must be one we can write in."""
    p = Path(path)
    check_suffix(p)
    if p.is_dir():
        raise OutputError("output is a folder", path=p, hint="give a .gpkg file path")
    if p.exists() and not overwrite:
        raise OutputError("output exists", path=p, hint="pass --overwrite to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        above = next((a for a in parent.parents if a.exists()), Path("."))
        if not above.is_dir():
            raise OutputError(f"cannot create the folder {parent}: part of its path is a file",
                              path=p, hint="choose another path")
        if not make_folder:
            parent = above  # checked below: the folder it will be made in
        else:
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create the folder {parent} ({exc.strerror or exc})",
                                  path=p, hint="choose another path") from None
    if not parent.is_dir():
        raise OutputError(f"{parent} is not a folder", path=p, hint="choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"folder {parent} is not writable", path=p, hint="choose a folder you can write to"
        )
    return p


@dataclass
class _Layer:
    name: str
    geometry_type: str
    fields: list[tuple[str, str]]  # (name, numpy dtype string); "object" = text
    created: bool = False
    count: int = 0
    buf_geom: list = field(default_factory=list)
    buf_cols: dict = field(default_factory=dict)
    buffered: int = 0


class GpkgWriter:
    """Layers are declared up front (so empty ones still get their schema) or on first use."""

    def __init__(self, path: str | os.PathLike, crs_wkt: str | None, overwrite: bool = False):
        self.path = check_output(path, overwrite, make_folder=True)
        self.crs = crs_wkt
        # named as the rasters' temporaries (with the writer's pid), so a killed run's is
        # removed by the next run that writes this file
        remove_stale_temps(self.path)
        self.tmp = _track(temp_path_for(self.path, ".gpkg"))
        self.layers: dict[str, _Layer] = {}
        self._created = False
        self._closed = False

    # ------------------------------------------------------------------ context
    def __enter__(self) -> GpkgWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    # ------------------------------------------------------------------ layers
    def declare(self, name: str, geometry_type: str, fields: list[tuple[str, str]]) -> None:
        if name not in self.layers:
            self.layers[name] = _Layer(name, geometry_type, list(fields))

    def write(self, name: str, wkb: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        """Queue features: geometries as WKB (see ``shapely.to_wkb``), one array per field."""
        layer = self.layers[name]
        n = len(wkb)
        if n == 0:
            return
        layer.buf_geom.append(np.asarray(wkb, dtype=object))
        for fname, _ in layer.fields:
            layer.buf_cols.setdefault(fname, []).append(np.asarray(columns[fname]))
        layer.buffered += n
        if layer.buffered >= _CHUNK:
            self._flush(layer)

    def _flush(self, layer: _Layer) -> None:
        from pyogrio.raw import write

        if layer.buffered == 0 and layer.created:
            return
        if layer.buf_geom:
            wkb = np.concatenate(layer.buf_geom)
        else:
            wkb = np.empty(0, dtype=object)
        data = []
        for fname, dtype in layer.fields:
            parts = layer.buf_cols.get(fname, [])
            col = np.concatenate(parts) if parts else np.empty(0)
            data.append(col.astype(dtype))
        try:
            with warnings.catch_warnings():
                # a raster without a CRS: the caller already says so, once
                warnings.filterwarnings("ignore", message=".*'crs' was not provided")
                self._write(write, wkb, data, layer)
        except Exception as exc:  # disk full, permissions changed under us, ...
            from crossearth_cli.raster.writer import raise_if_disk_full

            # SQLite's own words for a full disk vary ("no such table" for one): the free space
            # of the folder decides, as for rasters
            raise_if_disk_full(exc, self.path, failed_write=True)
            raise OutputError(f"cannot write the GeoPackage ({exc})", path=self.path) from exc
        self._created = True
        layer.created = True
        layer.count += layer.buffered
        layer.buf_geom, layer.buf_cols, layer.buffered = [], {}, 0

    def _write(self, write, wkb, data, layer: _Layer) -> None:
        write(
            str(self.tmp),
            wkb,
            data,
            [f for f, _ in layer.fields],
            layer=layer.name,
            driver="GPKG",
            geometry_type=layer.geometry_type,
            crs=self.crs,
            append=layer.created,
            promote_to_multi=layer.geometry_type.startswith("Multi"),
            dataset_options=_DATASET_OPTIONS if not self._created else None,
            layer_options={"SPATIAL_INDEX": "YES"},
        )

    # ------------------------------------------------------------------ finish
    def commit(self) -> dict[str, int]:
        if self._closed:
            return {}
        try:
            if not self.layers:
                raise RuntimeError("no layer declared")
            for layer in self.layers.values():
                self._flush(layer)
            counts = {layer.name: layer.count for layer in self.layers.values()}
            os.replace(self.tmp, self.path)
            _untrack(self.tmp)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return counts

    def abort(self) -> None:
        self._closed = True
        for suffix in ("", "-journal", "-wal", "-shm"):
            try:
                os.unlink(f"{self.tmp}{suffix}")
            except FileNotFoundError:
                pass
            except OSError:
                pass
        _untrack(self.tmp)
