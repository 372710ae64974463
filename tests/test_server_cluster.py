"""`[cluster] scheduler = "local"`: the server's export jobs run on a Dask LocalCluster of two worker
processes and give the same package as an export in this process (issue 10, through the job API)."""
from __future__ import annotations

import zipfile

from test_server_support import Server, free_port, write_config

from tilecrate.cache import open_cache
from tilecrate.export import export
from tilecrate.request import ExportRequest


def _entries(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist() if i.filename.endswith(".bundle")}


def test_export_job_on_a_local_cluster_equals_in_process(tmp_path, sample_v2):
    data = tmp_path / "data"
    cfg = tmp_path / "tilecrate.toml"
    write_config(cfg, data, {"World": {"source": sample_v2}})
    cfg.write_text(cfg.read_text() + '\n[cluster]\nscheduler = "local"\nworkers = 2\n')
    srv = Server(cfg, data, free_port())
    try:
        srv.start(timeout=60)
        params = {"levels": "0-5", "tilePackage": "true", "storageFormat": "tpkx"}
        sub = srv.submit("World", "exportTiles", params)
        job = srv.poll("World", "exportTiles", sub["jobId"], timeout=60)
        assert job["jobStatus"] == "esriJobSucceeded", job
        assert any(m["description"].startswith("Running on the Dask cluster at tcp://127.0.0.1:")
                   for m in job["messages"]), job["messages"]
        _, paths = srv.download_all(srv.result("World", "exportTiles", job), tmp_path)
        with open_cache(str(sample_v2)) as cache:
            local = export(cache, ExportRequest.from_params(params), str(tmp_path / "local.tpkx"))
        ours, theirs = _entries(paths[0]), _entries(local.path)
        assert ours and ours == theirs
    finally:
        srv.stop()
