"""The job API: an ArcGIS-compatible MapServer (aiohttp) with exportTiles jobs."""
from tilecrate.server.app import create_app
from tilecrate.server.config import ServerConfig, ServiceConfig, load_config

__all__ = ["ServerConfig", "ServiceConfig", "create_app", "load_config"]
