"""Raster I/O: window grids, windowed reads, the row-band accumulator and atomic writers."""

import os

# GDAL's block cache defaults to 5% of RAM, which makes memory grow with the scene until the
# cap. Strips read each block row once, so the cache only has to hold the block row that two
# strips share: 32 MB is enough for 8-bit RGB scenes up to ~20k px wide (each column stripe of
# a wider scene is at most ~9k). Users can still set GDAL_CACHEMAX themselves. Must be set
# before GDAL first touches its cache.
os.environ.setdefault("GDAL_CACHEMAX", "32")
