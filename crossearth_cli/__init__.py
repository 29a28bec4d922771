"""crossearth: run the CrossEarth remote-sensing foundation model over GeoTIFFs of any size."""

__version__ = "0.1.0"
