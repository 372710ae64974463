"""A real site (issue 10): `dask scheduler`, two `dask worker` processes and `tilecrate serve --processes 2`
with `[cluster] scheduler = "tcp://127.0.0.1:PORT"`, all started here as a person would from the README.
ArcGIS-style exportTiles jobs over HTTP, in shared-folder mode and in local-temp-folder mode, give
the packages (.tpkx, .tpk) and cache folders an in-process export gives, bundle for bundle, and
read tile for tile by the independent reader of test_fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_fixtures import reference_tiles
from test_site_support import bundle_files, job_output, site, site_server  # noqa: F401  (site: the module's fixture)

from tilecrate.export import export
from tilecrate.request import ExportRequest

CASES = [
    ("tpkx", {"tilePackage": "true", "storageFormat": "tpkx"}),
    ("tpk", {"tilePackage": "true", "storageFormat": "tpk"}),
    ("folder", {"tilePackage": "false"}),
    ("tpkx-optimized", {"tilePackage": "true", "storageFormat": "tpkx", "optimizeTilesForSize": "true",
                        "compressionQuality": "40"}),
    ("tpk-optimized", {"tilePackage": "true", "storageFormat": "tpk", "optimizeTilesForSize": "true",
                       "compressionQuality": "40"}),
    ("folder-optimized", {"tilePackage": "false", "optimizeTilesForSize": "true", "compressionQuality": "40"}),
]


@pytest.fixture(scope="module", params=[False, True], ids=["shared", "localtemp"])
def front(request, site, sample_v1, sample_v2, tmp_path_factory):
    srv = site_server(tmp_path_factory.mktemp("front"), "site", site,
                      {"V1": {"source": sample_v1}, "V2": {"source": sample_v2}}, local_temp=request.param)
    try:
        yield srv.start(timeout=60)
    finally:
        srv.stop()
    assert "Traceback" not in srv.log.read_text()


@pytest.mark.parametrize("name,params", CASES, ids=[c[0] for c in CASES])
def test_site_export_equals_in_process(front, site, sample_v1, sample_v2, tmp_path, name, params):
    local_temp = "exportTilesUsingLocalTempFolder = true" in front.config.read_text()
    for service, source in (("V1", sample_v1), ("V2", sample_v2)):
        job_params = {"levels": "0-5", **params}
        sub = front.submit(service, "exportTiles", job_params)
        job = front.poll(service, "exportTiles", sub["jobId"], timeout=60)
        assert job["jobStatus"] == "esriJobSucceeded", job
        notes = [m["description"] for m in job["messages"]]
        assert any(n.startswith(f"Running on the Dask cluster at {site.address}") for n in notes), notes
        assert any("local temp folder" in n for n in notes) == local_temp, notes
        got = job_output(front, service, job, tmp_path)
        here = export(str(source), ExportRequest.from_params(job_params), str(tmp_path / f"here-{service}"))
        assert bundle_files(got) and bundle_files(got) == bundle_files(here.path)
        tiles = reference_tiles(got)
        assert tiles and tiles == reference_tiles(Path(here.path))
    assert site.staging() == []


def test_examples_load_with_every_commented_setting(tmp_path):
    """examples/site.toml and examples/tilecrate.toml (its commented settings switched on) are valid configs."""
    import re

    from tilecrate.server.config import load_config

    examples = Path(__file__).resolve().parents[1] / "examples"
    site = load_config(str(examples / "site.toml"))
    assert site.cluster.scheduler == "tcp://10.0.0.5:8786" and site.processes == 2
    assert site.maximum_outstanding_jobs == 32 and not site.cluster.export_tiles_using_local_temp_folder
    text = (examples / "tilecrate.toml").read_text()
    on = re.sub(r"(?m)^# (?=\[[\w.]+\]|\w+ = )", "", text)
    assert on != text
    (tmp_path / "all.toml").write_text(on)
    cfg = load_config(str(tmp_path / "all.toml"))
    assert cfg.cluster.scheduler == "local" and cfg.cluster.workers == 2 and cfg.limits.job_seconds == 3600
    assert set(cfg.services) == {"SampleWorld", "Usa"} and cfg.maximum_outstanding_jobs == 8
