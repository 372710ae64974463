#!/usr/bin/env bash
# Install tilecrate and its test tools into ./.venv, with the system packages the build needs.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in gcc libjpeg62-turbo-dev libsqlite3-dev zlib1g-dev libpng-dev libfreetype-dev python3-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "install.sh: missing system packages: ${need[*]} (run as root or apt-get install them)" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e ".[test]"
# An editable install leaves our sources uncompiled, and with PYTHONDONTWRITEBYTECODE set (as in
# many images) every `tilecrate` process would compile them again: write the .pyc files once, as
# pip does for a wheel (stale ones are simply recompiled in memory after an edit).
.venv/bin/python -m compileall -q src/tilecrate >/dev/null
# pillow-simd and Pillow both install the `PIL` folder; if anything pulled Pillow in, put
# pillow-simd back so exactly one owns it.
if .venv/bin/python -m pip show pillow >/dev/null 2>&1; then
  .venv/bin/python -m pip uninstall -q -y pillow
  .venv/bin/python -m pip install -q --force-reinstall --no-deps pillow-simd
fi
# pip names them apart but they share files: fail loudly rather than run on a mix of the two
if .venv/bin/python -m pip show pillow >/dev/null 2>&1 || ! .venv/bin/python -m pip show pillow-simd >/dev/null 2>&1; then
  echo "install.sh: PIL must come from pillow-simd alone (pip show pillow / pillow-simd disagree)" >&2
  exit 1
fi
# MapProxy in its own venv (it brings its own Pillow): tests/test_thirdparty_mapproxy.py reads what it writes
[ -x .venv-mapproxy/bin/python ] || "$PY" -m venv .venv-mapproxy
.venv-mapproxy/bin/python -m pip show MapProxy >/dev/null 2>&1 ||
  .venv-mapproxy/bin/python -m pip install -q "MapProxy==7.0.0"
.venv/bin/tilecrate --version
