#!/usr/bin/env bash
# The newcomer's first run: install, build the sample cache, then the main job: start the demo
# server, run an export job against it over HTTP as an ArcGIS client does, download and check it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
mkdir -p data
.venv/bin/tilecrate sample data/sample --force
.venv/bin/tilecrate inspect data/sample
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/tilecrate serve --demo --data-dir data/server --port "$PORT" --quiet &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
.venv/bin/python scripts/demo_client.py --url "http://127.0.0.1:$PORT" --levels 0-5 --out data/demo-download
.venv/bin/tilecrate export data/sample -o data/sample.tpkx --levels 0-5
