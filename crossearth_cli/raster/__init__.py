"""Raster I/O: window grids, windowed reads, the row-band accumulator and atomic writers."""

import os

# GDAL's block cache defaults to 5% of RAM, which makes memory grow with the scene until the
# cap. 64 MB holds a tile row of decompressed blocks for scenes up to ~20k px wide; users can
# still set GDAL_CACHEMAX themselves. Must be set before GDAL first touches its cache.
os.environ.setdefault("GDAL_CACHEMAX", "64")
