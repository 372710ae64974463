#!/usr/bin/env bash
# Install, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
scripts/install-browser.sh   # chromium + the @arcgis/core page of tests/test_server_vector_browser.py
exec .venv/bin/python -m pytest "$@"
