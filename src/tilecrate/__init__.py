"""tilecrate: a fast open-source implementation of ArcGIS MapServer exportTiles."""
import sys

from tilecrate.errors import BundleError, CacheError, ExportError, RequestError, TilecrateError

__version__ = "0.1.0"

# imported on first use: `import tilecrate` (and `tilecrate --version`) must not pay for numpy,
# pyproj and the compiled core that only reading and exporting need
_LAZY = {
    "BundleRef": "tilecrate.cache",
    "Cache": "tilecrate.cache",
    "open_cache": "tilecrate.cache",
    "estimate": "tilecrate.estimate",
    "export": "tilecrate.export",
    "ExportRequest": "tilecrate.request",
}

__all__ = [
    "BundleError", "BundleRef", "Cache", "CacheError", "ExportError", "RequestError",
    "TilecrateError", "open_cache", "__version__", "ExportRequest", "estimate", "export",
]


def __getattr__(name: str):
    """Import the public name's module on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tilecrate' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    if name not in _SHADOWED:
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Every public name, loaded or not."""
    return sorted(set(globals()) | set(_LAZY))


# `tilecrate.export` and `tilecrate.estimate` are functions that share their name with their
# modules; importing a submodule sets it as an attribute of the package, which would hide the
# function from then on. These two names therefore always resolve to the function.
_SHADOWED = ("estimate", "export")


def _shadowed(name: str) -> property:
    def get(module):
        return __getattr__(name)

    def set_(module, value) -> None:
        pass          # the import system recording the submodule: it stays in sys.modules

    return property(get, set_, doc=f"tilecrate.{name}.{name}")


class _Package(type(sys)):
    estimate = _shadowed("estimate")
    export = _shadowed("export")


sys.modules[__name__].__class__ = _Package
