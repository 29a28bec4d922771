"""Settings for vectorizing a class raster, shared by ``crossearth vectorize`` and ``segment``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from crossearth_cli.errors import ConfigError


@dataclass(frozen=True)
class VectorizeOptions:
    """Every ``crossearth vectorize`` option, as a library value.

    Class lists accept names (from the raster's tags) or ids, as strings or ints. ``None`` for
    ``classes`` means every value except nodata. For ``regularize`` and ``centerlines``,
    ``True`` means "the selected classes whose name contains *building* / *road*, or all
    selected classes if none does"; a sequence names the classes explicitly.
    """

    classes: Sequence[str | int] | None = None
    min_area: float = 0.0  # m²: polygons smaller than this are dropped (after seam merge)
    fill_holes: float = 0.0  # m²: enclosed regions smaller than this take the enclosing class
    simplify: float = 0.0  # metres: coverage simplification tolerance (0 = exact pixel edges)
    connectivity: int = 4
    regularize: bool | Sequence[str | int] = False
    centerlines: bool | Sequence[str | int] = False
    layer_per_class: bool = True
    layer_name: str = "polygons"  # single-layer mode: polygon layer name
    overwrite: bool = False
    window_size: int = 1024  # pixels per window side (memory ∝ width × window_size)
    centerline_halo: int = 128  # pixels of context around each window for skeletons
    workers: int = 0  # processes; 0 = up to 4, never more than the CPUs or the windows

    def __post_init__(self) -> None:
        if self.connectivity not in (4, 8):
            raise ConfigError(f"--connectivity must be 4 or 8, not {self.connectivity}")
        for name in ("min_area", "fill_holes", "simplify"):
            value = getattr(self, name)
            if value is None or not value >= 0 or not math.isfinite(value):
                shown = f"{value:.6g}" if isinstance(value, float) else f"{value}"
                raise ConfigError(f"--{name.replace('_', '-')} must be a number ≥ 0, not {shown}")
        if self.window_size < 16:
            raise ConfigError(f"--window must be at least 16 pixels, not {self.window_size}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be ≥ 0 (0 = automatic), not {self.workers}")
        if self.centerline_halo < 0:
            raise ConfigError(f"centerline_halo must be ≥ 0, not {self.centerline_halo}")

    @classmethod
    def preset(cls, class_names: Sequence[str], **overrides) -> VectorizeOptions:
        """The defaults ``crossearth segment --vector`` uses for a preset's classes.

        Building classes are regularized; road classes get centerlines (their polygons are
        written too). Classes with neither word are polygonized as they are.
        """
        names = [str(n) for n in class_names]
        buildings = [n for n in names if "building" in n.lower()]
        roads = [n for n in names if "road" in n.lower()]
        base = cls(
            regularize=tuple(buildings) if buildings else False,
            centerlines=tuple(roads) if roads else False,
        )
        return replace(base, **overrides)


@dataclass
class VectorizeSummary:
    """What was written, for the CLI to report."""

    out_path: str
    layers: dict[str, int] = field(default_factory=dict)  # layer name → feature count
    polygons: int = 0
    lines: int = 0
    classes: dict[int, str] = field(default_factory=dict)  # classes that produced features
    windows: int = 0
    workers: int = 1
    seconds: float = 0.0
    crs: str | None = None
    area_mode: str = "planar"  # how area_m2 was measured: planar | geodesic | unknown
    warnings: list[str] = field(default_factory=list)
