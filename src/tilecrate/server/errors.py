"""Esri error JSON and the HTTP status each error travels with.

ArcGIS Server answers REST errors with HTTP 200 and the code in the body ({"error": {"code",
"message", "details"}}); every client of FORMATS.md §11 reads the body. We do the same for JSON
operations, so a client shows the server's message rather than a bare HTTP failure. Resources that
are bytes rather than JSON (tiles, downloads) use real statuses (404, 416, 401). Nothing is ever
answered with a 5xx except the 503 of admission: the ArcGIS API for Python resends a request five
more times on any 5xx.
"""
from __future__ import annotations

MESSAGES = {
    400: "Unable to complete operation.",
    403: "You do not have permissions to access this resource or perform this operation.",
    404: "Not Found",
    498: "Invalid Token",
    499: "Token Required",
    503: "Service Unavailable",
}
_BINARY_STATUS = {400: 400, 403: 403, 404: 404, 416: 416, 498: 401, 499: 401}


class EsriError(Exception):
    """An error answered as Esri error JSON."""

    def __init__(self, code: int, details: str | list[str] | None = None, message: str | None = None,
                 headers: dict[str, str] | None = None, http_status: int | None = None):
        self.code = code
        self.message = message or MESSAGES.get(code, "Unable to complete operation.")
        if details is None:
            details = []
        self.details = [details] if isinstance(details, str) else list(details)
        self.headers = headers or {}
        self._http_status = http_status
        super().__init__(f"{self.code} {self.message}: {'; '.join(self.details)}")

    def http_status(self, binary: bool = False) -> int:
        """200 for JSON operations (as ArcGIS), a real 4xx for byte resources; 503 only for admission."""
        if self._http_status is not None:
            return self._http_status
        if self.code == 503:
            return 503
        return _BINARY_STATUS.get(self.code, 400) if binary else 200

    def to_json(self) -> dict:
        """{"error": {"code", "message", "details"}}."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}
