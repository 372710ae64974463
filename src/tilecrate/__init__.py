"""tilecrate: a fast open-source implementation of ArcGIS MapServer exportTiles."""
from tilecrate.cache import BundleRef, Cache, open_cache
from tilecrate.errors import BundleError, CacheError, ExportError, RequestError, TilecrateError
from tilecrate.estimate import estimate
from tilecrate.export import export
from tilecrate.request import ExportRequest

__version__ = "0.1.0"

__all__ = [
    "BundleError", "BundleRef", "Cache", "CacheError", "ExportError", "RequestError",
    "TilecrateError", "open_cache", "__version__", "ExportRequest", "estimate", "export",
]
