#!/usr/bin/env bash
# MapProxy in its own venv (.venv-mapproxy), for the export benchmark's baseline only.
# MapProxy depends on Pillow, which must never land in .venv (tilecrate uses pillow-simd as PIL).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-mapproxy
if [ ! -x "$VENV/bin/mapproxy-util" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet "MapProxy>=2.0"
fi
"$VENV/bin/mapproxy-util" --version 2>/dev/null || "$VENV/bin/python" -c "import mapproxy, sys; print('MapProxy', mapproxy.__version__ if hasattr(mapproxy, '__version__') else '?')"
