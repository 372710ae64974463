"""A job record: kind, esriJob* state, messages, progress and result, stored as JSON in LMDB.

The stored record is the small, hot part (read and rewritten on every state change); the request's
parameters (which may hold a large area of interest) are stored apart and read only when the job
starts or its inputs are asked for. The Esri job JSON is stored ready-made next to the record.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field

SUBMITTED = "esriJobSubmitted"
EXECUTING = "esriJobExecuting"
SUCCEEDED = "esriJobSucceeded"
FAILED = "esriJobFailed"
CANCELLING = "esriJobCancelling"
CANCELLED = "esriJobCancelled"
STATES = (SUBMITTED, EXECUTING, SUCCEEDED, FAILED, CANCELLING, CANCELLED)
# jobs that still hold a worker or wait for one: what maximumOutstandingJobs counts
OUTSTANDING = (SUBMITTED, EXECUTING, CANCELLING)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)

EXPORT = "exportTiles"
ESTIMATE = "estimateExportTilesSize"
KINDS = (EXPORT, ESTIMATE)

INFO = "esriJobMessageTypeInformative"
WARNING = "esriJobMessageTypeWarning"
ERROR = "esriJobMessageTypeError"

# the Export Cache GP task's parameter names (FORMATS.md §3.2) and the REST parameter each comes from
INPUTS = {
    "service_url": ("GPString", None),
    "storage_format_type": ("GPString", "storageFormatType"),
    "tile_package": ("GPBoolean", "tilePackage"),
    "export_extent": ("GPString", "exportExtent"),
    "export_by": ("GPString", "exportBy"),
    "levels": ("GPString", "levels"),
    "area_of_interest": ("GPFeatureRecordSetLayer", "areaOfInterest"),
    "optimize_tiles_for_size": ("GPBoolean", "optimizeTilesForSize"),
    "compression_quality": ("GPLong", "compressionQuality"),
}


_JOB_ID = re.compile(r"j[0-9a-f]{32}_et")


def new_job_id() -> str:
    """`j` + 32 hex digits + `_et`, as ArcGIS names export jobs."""
    return "j" + os.urandom(16).hex() + "_et"


def is_job_id(text: str) -> bool:
    """Whether text has the shape of a job id (checked before any store lookup)."""
    return _JOB_ID.fullmatch(text) is not None


def esri_time(t: float) -> str:
    """ArcGIS's message time format: 'Tuesday, February 19, 2019 2:23:39 PM' (server local time)."""
    lt = time.localtime(t)
    hour = lt.tm_hour % 12 or 12
    return time.strftime(f"%A, %B {lt.tm_mday}, %Y {hour}:%M:%S %p", lt)


@dataclass
class Job:
    """One exportTiles or estimateExportTilesSize job."""

    id: str
    kind: str
    service: str
    params: dict[str, str]
    status: str = SUBMITTED
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    messages: list[dict] = field(default_factory=list)
    progress: dict | None = None
    result: dict | None = None
    client: str = ""  # who submitted it (address or user): the per-client quotas count by this
    driver: str | None = None  # "pid:start time" of the process whose worker pool holds the job
    version: int = 0  # bumped on every stored change

    def add_message(self, description: str, kind: str = INFO) -> None:
        """Append a job message (type is one of the esriJobMessageType* names)."""
        self.messages.append({"type": kind, "description": description})

    def to_bytes(self) -> bytes:
        """The stored hot record: everything but the parameters (stored apart, see params_bytes)."""
        d = asdict(self)
        d.pop("params")
        return json.dumps(d, separators=(",", ":")).encode()

    def params_bytes(self) -> bytes:
        """The stored form of the parameters."""
        return json.dumps(self.params, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, params: dict[str, str] | None = None) -> "Job":
        """Read the stored form (records written before parameters were stored apart carry them)."""
        d = json.loads(data)
        d.setdefault("params", {})
        if params is not None:
            d["params"] = params
        return cls(**{k: v for k, v in d.items() if k in _FIELDS})

    def public_bytes(self) -> bytes:
        """The Esri job JSON, compact, as answered to f=json."""
        return json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False).encode()

    def input_value(self, name: str) -> tuple[str, object] | None:
        """(dataType, value) of a job input by GP name or REST parameter name, or None."""
        low = name.lower()
        for gp, (dtype, rest) in INPUTS.items():
            if low in (gp, (rest or "").lower()):
                if gp == "service_url":
                    return dtype, f"{self.service}:MapServer"
                value = _param(self.params, rest)
                if gp == "area_of_interest" and value is None:
                    value = _param(self.params, "polygon")
                if gp == "storage_format_type" and value is None:
                    value = _param(self.params, "storageFormat") or _param(self.params, "esriMapCacheStorageMode")
                return dtype, value
        return None

    def to_json(self) -> dict:
        """The Esri job JSON (FORMATS.md §3.2): results and inputs once finished, progress while executing."""
        out: dict = {"jobId": self.id, "jobStatus": self.status}
        if self.status == EXECUTING and self.progress:
            out["progress"] = self.progress
        if self.status == SUCCEEDED:
            out["results"] = {"out_service_url": {"paramUrl": "results/out_service_url"}}
        if self.status in TERMINAL:
            out["inputs"] = {name: {"paramUrl": f"inputs/{name}"} for name in INPUTS}
        out["messages"] = list(self.messages)
        return out


_FIELDS = frozenset(Job.__dataclass_fields__)


def _param(params: dict, name: str | None) -> object:
    if not name:
        return None
    for k, v in params.items():
        if k.lower() == name.lower():
            return v
    return None
