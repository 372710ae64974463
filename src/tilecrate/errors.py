"""Exceptions every layer raises; each message is meant to be shown to a user as it is."""


class TilecrateError(Exception):
    """Base of every error tilecrate raises on purpose."""


class CacheError(TilecrateError):
    """A source cache or package cannot be opened or read (missing files, bad metadata)."""


class BundleError(CacheError, ValueError):
    """A bundle's bytes are corrupt or truncated; the message names the file and the problem."""


class RequestError(TilecrateError, ValueError):
    """An export or estimate request is invalid (levels, extent, geometry, format)."""


class ExportError(TilecrateError):
    """An export could not be written (disk full, source vanished, cancelled)."""


class Cancelled(ExportError):
    """An export was cancelled on purpose."""


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGINT or SIGTERM); raised where Ctrl-C would be."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
