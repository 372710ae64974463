"""`tilecrate serve` configuration: a TOML file naming the services, or one cache from the command line.

```toml
[server]
host = "127.0.0.1"
port = 8000
data_dir = "tilecrate-data"          # job store and arcgisoutput live here (relative to this file)
max_file_age = 600                   # seconds before outputs and finished jobs are removed
maximum_outstanding_jobs = 8         # -1 or omitted: unlimited; 0: refuse every job
workers = 2                          # jobs run at once (per front-end process)
processes = 1                        # front-end processes sharing the port and the job store
token = "change-me"                  # optional: required on every request when set
public_url = "https://maps.example.com"  # optional: the URL clients reach us at (else the Host
host_names = ["maps.example.com:8000"]   # header is used only when it names us: these names, the
                                     # bound address or localhost; otherwise the bound address)

[limits]                             # all optional; the defaults are shown (README: "Limits")
max_body_bytes = 2097152             # request body (and a GET's request line) at most 2 MiB
max_input_bytes = 262144             # a job's stored parameters (its area of interest) at most 256 KiB
max_jobs_per_client = 500            # jobs one client (address) may have stored, finished ones included
max_outstanding_per_client = 16      # jobs one client may have submitted or executing
max_input_bytes_per_client = 33554432  # stored parameters of one client's jobs together
job_seconds = 3600                   # a job running longer fails ("0": no limit)
job_memory_mb = 1024                 # a job whose memory growth passes this fails ("0": no limit)
tile_read_threads = 8                # tile and tilemap reads run on their own threads ...
tile_read_timeout = 10               # ... and a read not done in this many seconds is answered 503
body_seconds = 60                    # a request body not received within this many seconds is answered 408
max_connections = 8192               # open connections per front-end process (default: half the
                                     # descriptor limit); more are answered 503 and closed
max_connections_per_client = 256     # open connections from one address per process (slowloris)
max_vertices = 1000000               # what an area of interest may cost (tilecrate.geometry.GeometryLimits;
max_rings = 100000                   # absent: that module's defaults)
max_line_crossings = 20000
max_json_depth = 32

[cluster]                            # optional: run export jobs on a Dask cluster (issue 10)
scheduler = "tcp://10.0.0.5:8786"    # or "local": a LocalCluster of worker processes this server starts
workers = 2                          # LocalCluster workers ("local" only)
export_tiles_using_local_temp_folder = false  # true: a job's package is built on one worker's local
                                     # temp folder, then moved into arcgisoutput

[auth]                               # optional, with [users.NAME] (README: "Running a secured site")
token_expiration = 60                # minutes a token lasts when the client asks for none
max_token_expiration = 1440          # the most a client may ask for
max_failed_signins = 5               # failed sign-ins per user name and per address ...
signin_window = 300                  # ... within this many seconds, before sign-ins are refused

[users.alice]                        # `tilecrate passwd` prints the password_hash line
password_hash = "scrypt$14$8$1$..."
role = "user"                        # user | publisher | administrator

[services.World]
source = "caches/world"              # cache folder, .tpk, .tpkx or .vtpk
type = "MapServer"                   # optional: VectorTileServer for .vtpk, ImageServer for LERC (the defaults)
export_tiles_allowed = true
max_export_tiles_count = 100000
view = ["*"]                         # with users: who may read it ("*" anyone, user names, "role:NAME");
export = ["role:publisher", "alice"] # who may export; absent: any signed-in user (administrators always)
```
Keys may also be written as ArcGIS names them (exportTilesAllowed, maxExportTilesCount,
maximumOutstandingJobs, maxFileAge).
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

from tilecrate.errors import TilecrateError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,119}$")


class ConfigError(TilecrateError):
    """The configuration file is missing, malformed or names something that does not exist."""


@dataclass
class ServiceConfig:
    """One MapServer: a source cache and its export settings."""

    name: str
    source: str
    export_tiles_allowed: bool = True
    max_export_tiles_count: int = 100000
    description: str = ""
    copyright: str = ""              # copyrightText in the service JSON (the credits a licence asks for)
    summary: str = ""
    tags: list | None = None
    type: str = ""                   # MapServer, VectorTileServer or ImageServer; "": from the source
    view: list | None = None         # with users: who may read it (None: any signed-in user)
    export: list | None = None       # with users: who may export (None: any signed-in user)


@dataclass
class Limits:
    """Bounds on what clients may make the server store and run (see the module doc)."""

    max_body_bytes: int = 2 << 20
    max_input_bytes: int = 256 << 10
    max_jobs_per_client: int = 500
    max_outstanding_per_client: int = 16
    max_input_bytes_per_client: int = 32 << 20
    job_seconds: float = 3600.0
    job_memory_mb: int = 1024
    tile_read_threads: int = 8
    tile_read_timeout: float = 10.0
    body_seconds: float = 60.0
    max_connections: int | None = None       # None: half the descriptor limit (server.connections)
    max_connections_per_client: int = 256
    # an area's cost (tilecrate.geometry.GeometryLimits); None: the geometry module's defaults
    max_vertices: int | None = None
    max_rings: int | None = None
    max_line_crossings: int | None = None
    max_json_depth: int | None = None

    def geometry(self) -> dict[str, int]:
        """The geometry limits that are set, for GeometryLimits.from_config."""
        return {k: v for k in GEOMETRY_KEYS if (v := getattr(self, k)) is not None}


@dataclass
class ClusterConfig:
    """Where export jobs run: in this process (no scheduler) or on a Dask cluster."""

    scheduler: str | None = None
    workers: int | None = None
    export_tiles_using_local_temp_folder: bool = False


@dataclass
class AuthConfig:
    """Tokens and sign-in limits ([auth]); they apply when [users.NAME] are configured."""

    token_expiration: int = 60
    max_token_expiration: int = 1440
    max_failed_signins: int = 5
    signin_window: float = 300.0


@dataclass
class ServerConfig:
    """Everything `tilecrate serve` needs."""

    services: dict[str, ServiceConfig] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str = "tilecrate-data"
    max_file_age: float = 600.0
    maximum_outstanding_jobs: int | None = None
    workers: int = 2
    processes: int = 1
    export_threads: int | None = None
    token: str | None = None
    public_url: str | None = None
    host_names: list = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    users: dict = field(default_factory=dict)  # name -> tilecrate.admin.users.User

    @property
    def output_dir(self) -> str:
        """Where job outputs are written (served as /arcgis/rest/directories/arcgisoutput)."""
        return os.path.join(self.data_dir, "arcgisoutput")

    @property
    def store_dir(self) -> str:
        """The LMDB environment of the job store."""
        return os.path.join(self.data_dir, "jobs.lmdb")


def _norm(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower().replace("-", "_")


def _pick(table: dict, where: str, spec: dict[str, type]) -> dict:
    out = {}
    for key, value in table.items():
        name = _norm(str(key))
        if name not in spec:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(spec))})")
        want = spec[name]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is list and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{where}: {key} must be a list of strings, not {value!r}")
        if want is int and isinstance(value, bool) or not isinstance(value, want):
            raise ConfigError(f"{where}: {key} must be {want.__name__}, not {value!r}")
        out[name] = value
    return out


_SERVER_KEYS = {"host": str, "port": int, "data_dir": str, "max_file_age": float,
                "maximum_outstanding_jobs": int, "workers": int, "processes": int, "export_threads": int,
                "token": str, "public_url": str, "host_names": list}
_CLUSTER_KEYS = {"scheduler": str, "workers": int, "export_tiles_using_local_temp_folder": bool}
GEOMETRY_KEYS = ("max_vertices", "max_rings", "max_line_crossings", "max_json_depth")
_LIMIT_KEYS = {**{k: int for k in GEOMETRY_KEYS},"max_body_bytes": int, "max_input_bytes": int, "max_jobs_per_client": int,
               "max_outstanding_per_client": int, "max_input_bytes_per_client": int, "job_seconds": float,
               "job_memory_mb": int, "tile_read_threads": int, "tile_read_timeout": float,
               "body_seconds": float, "max_connections": int, "max_connections_per_client": int}
_SERVICE_KEYS = {"source": str, "export_tiles_allowed": bool, "max_export_tiles_count": int,
                 "description": str, "copyright": str, "summary": str, "tags": list, "type": str,
                 "view": list, "export": list}
_AUTH_KEYS = {"token_expiration": int, "max_token_expiration": int, "max_failed_signins": int,
              "signin_window": float}
_USER_KEYS = {"password_hash": str, "role": str}
_USER_RE = re.compile(r"^[^\s:/\\\x00-\x1f\x7f]{1,120}$")
SERVICE_TYPES = ("MapServer", "VectorTileServer", "ImageServer")


def check_name(name: str) -> str:
    """A service name usable in URLs and folder names, or ConfigError."""
    if not _NAME_RE.match(name):
        raise ConfigError(f"service name {name!r}: use letters, digits, '_', '.' and '-' (no spaces or slashes)")
    return name


def load_config(path: str) -> ServerConfig:
    """Read a TOML configuration; relative paths are taken from the file's folder."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(raw) - {"server", "services", "limits", "cluster", "auth", "users"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; "
                          f"use [server], [limits], [cluster], [auth], [users.NAME] and [services.NAME]")
    server = raw.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError(f"{path}: [server] must be a table")
    cfg = ServerConfig(**_pick(server, f"{path} [server]", _SERVER_KEYS))
    cfg.data_dir = os.path.normpath(os.path.join(base, cfg.data_dir))
    limits = raw.get("limits", {})
    if not isinstance(limits, dict):
        raise ConfigError(f"{path}: [limits] must be a table")
    cfg.limits = Limits(**_pick(limits, f"{path} [limits]", _LIMIT_KEYS))
    cluster = raw.get("cluster", {})
    if not isinstance(cluster, dict):
        raise ConfigError(f"{path}: [cluster] must be a table")
    cfg.cluster = ClusterConfig(**_pick(cluster, f"{path} [cluster]", _CLUSTER_KEYS))
    auth = raw.get("auth", {})
    if not isinstance(auth, dict):
        raise ConfigError(f"{path}: [auth] must be a table")
    cfg.auth = AuthConfig(**_pick(auth, f"{path} [auth]", _AUTH_KEYS))
    cfg.users = _users(raw.get("users", {}), path)
    services = raw.get("services", {})
    if not isinstance(services, dict) or not services:
        raise ConfigError(f"{path}: no services: add a [services.NAME] table with source = \"path/to/cache\"")
    for name, table in services.items():
        where = f"{path} [services.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        # ArcGIS names the field copyrightText; both spellings set the same thing
        table = {("copyright" if _norm(str(k)) == "copyright_text" else k): v for k, v in table.items()}
        values = _pick(table, where, _SERVICE_KEYS)
        if "source" not in values:
            raise ConfigError(f"{where}: source = \"path/to/cache\" is required")
        values["source"] = os.path.normpath(os.path.join(base, values["source"]))
        cfg.services[check_name(name)] = ServiceConfig(name=name, **values)
    validate(cfg)
    return cfg


def _users(table: object, path: str) -> dict:
    from tilecrate.admin.passwords import PasswordHashError, parse_hash
    from tilecrate.admin.users import ROLES, User

    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [users] must hold [users.NAME] tables")
    users = {}
    for name, entry in table.items():
        where = f"{path} [users.{name}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        if not _USER_RE.match(name):
            raise ConfigError(f"{where}: a user name has no spaces, ':', '/', '\\' or control characters")
        values = _pick(entry, where, _USER_KEYS)
        if "password_hash" not in values:
            raise ConfigError(f"{where}: password_hash is required (make one with `tilecrate passwd`)")
        try:
            parse_hash(values["password_hash"])
        except PasswordHashError as e:
            raise ConfigError(f"{where}: {e}") from None
        role = values.get("role", "user")
        if role not in ROLES:
            raise ConfigError(f"{where}: role must be one of {', '.join(ROLES)}, not {role!r}")
        users[name] = User(name, role, values["password_hash"])
    return users


def validate(cfg: ServerConfig) -> ServerConfig:
    """Check ranges: ports, limits, ages."""
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port {cfg.port} is not a TCP port")
    if not cfg.max_file_age > 0:  # also NaN; inf keeps outputs for ever
        raise ConfigError("max_file_age must be a positive number of seconds")
    if cfg.maximum_outstanding_jobs is not None and cfg.maximum_outstanding_jobs < -1:
        raise ConfigError("maximum_outstanding_jobs is -1 (unlimited, as when omitted), 0 (refuse every job) "
                          "or the most jobs submitted or executing at once")
    if cfg.maximum_outstanding_jobs == -1:   # ArcGIS's spelling of unlimited
        cfg.maximum_outstanding_jobs = None
    if cfg.workers < 1:
        raise ConfigError("workers must be at least 1")
    if not 1 <= cfg.processes <= 64:
        raise ConfigError("processes must be between 1 and 64")
    lim = cfg.limits
    for name in ("max_body_bytes", "max_input_bytes", "max_jobs_per_client", "max_outstanding_per_client",
                 "max_input_bytes_per_client", "tile_read_threads", "max_connections", "max_connections_per_client",
                 *GEOMETRY_KEYS):
        if getattr(lim, name) is not None and getattr(lim, name) < 1:
            raise ConfigError(f"[limits] {name} must be at least 1")
    for name in ("job_seconds", "job_memory_mb", "tile_read_timeout", "body_seconds"):
        value = getattr(lim, name)
        if not value >= 0 or value == float("inf"):  # also NaN
            raise ConfigError(f"[limits] {name} must be a finite number, 0 or more")
    cl = cfg.cluster
    if cl.scheduler is not None and not (cl.scheduler == "local" or "://" in cl.scheduler):
        raise ConfigError(f"[cluster] scheduler must be \"local\" or an address such as tcp://host:8786, "
                          f"not {cl.scheduler!r}")
    if cl.workers is not None and (cl.workers < 1 or cl.scheduler != "local"):
        raise ConfigError("[cluster] workers must be at least 1, and only goes with scheduler = \"local\"")
    if cl.export_tiles_using_local_temp_folder and cl.scheduler is None:
        raise ConfigError("[cluster] export_tiles_using_local_temp_folder needs a scheduler")
    if lim.tile_read_timeout == 0:
        raise ConfigError("[limits] tile_read_timeout must be more than 0")
    if lim.body_seconds == 0:
        raise ConfigError("[limits] body_seconds must be more than 0")
    if cfg.token is not None and not cfg.token.strip():
        raise ConfigError("token must not be empty (omit it to serve without tokens)")
    for svc in cfg.services.values():
        if svc.type and svc.type not in SERVICE_TYPES:
            raise ConfigError(f"service {svc.name}: type must be one of {', '.join(SERVICE_TYPES)}, not {svc.type!r}")
        if svc.max_export_tiles_count < 0:
            raise ConfigError(f"service {svc.name}: max_export_tiles_count must not be negative")
        for what in ("view", "export"):
            entries = getattr(svc, what)
            if entries is not None:
                from tilecrate.admin.users import check_entries

                try:
                    check_entries(entries, cfg.users, f"service {svc.name}: {what}")
                except ValueError as e:
                    raise ConfigError(str(e)) from None
    a = cfg.auth
    if not 1 <= a.token_expiration <= a.max_token_expiration <= 525600:
        raise ConfigError("[auth] needs 1 <= token_expiration <= max_token_expiration <= 525600 (minutes)")
    if a.max_failed_signins < 1 or not 1 <= a.signin_window <= 86400:
        raise ConfigError("[auth] max_failed_signins must be at least 1 and signin_window 1 to 86400 seconds")
    return cfg
