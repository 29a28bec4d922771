"""Class rasters → GeoPackage layers, at any scale.

Windowed polygonize with seams merged (bounded memory), true-metre areas, topology-safe
simplification, building regularization and road centerlines. The one entry point is
:func:`vectorize_raster`; ``crossearth vectorize`` and ``crossearth segment --vector`` both call it.
"""

from crossearth_cli.vector.api import vectorize_raster
from crossearth_cli.vector.options import VectorizeOptions, VectorizeSummary

__all__ = ["VectorizeOptions", "VectorizeSummary", "vectorize_raster"]
