#!/usr/bin/env bash
# The newcomer's first run: install, build the sample cache, and run the main job on it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
mkdir -p data
.venv/bin/tilecrate sample data/sample --force
.venv/bin/tilecrate inspect data/sample
