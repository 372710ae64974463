#!/usr/bin/env bash
# Install tilecrate and its test tools into ./.venv, with the system packages the build needs.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in gcc libjpeg62-turbo-dev zlib1g-dev libpng-dev libfreetype-dev python3-dev; do
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
# Third-party test suites and tools in their own venvs (their pins conflict with ours):
# tpkutils 0.8.2's CLI imports pkg_resources (gone from setuptools >= 81); MapProxy brings its own Pillow.
[ -x .venv-tpkutils/bin/python ] || "$PY" -m venv .venv-tpkutils
.venv-tpkutils/bin/python -m pip show tpkutils >/dev/null 2>&1 ||
  .venv-tpkutils/bin/python -m pip install -q "tpkutils==0.8.2" "setuptools<81" "pytest>=8"
[ -x .venv-mapproxy/bin/python ] || "$PY" -m venv .venv-mapproxy
.venv-mapproxy/bin/python -m pip show MapProxy >/dev/null 2>&1 ||
  .venv-mapproxy/bin/python -m pip install -q "MapProxy==7.0.0"
# tpkutils' tests/ are not in its sdist: take them from the repository at the commit
# ../shared/fixtures/real/PROVENANCE.md names (tests/test_tpkutils_suite.py checks the fixtures' sha256)
TPKUTILS_COMMIT=0e8460fd7175cc31a4e898e863f3df9c36472236
if [ ! -f .venv/tpkutils-tests/tests/test_tpk.py ]; then
  mkdir -p .venv/tpkutils-tests
  if ! curl -fsSL "https://codeload.github.com/consbio/tpkutils/tar.gz/$TPKUTILS_COMMIT" |
      tar xz -C .venv/tpkutils-tests --strip-components=1 "tpkutils-$TPKUTILS_COMMIT/tests"; then
    echo "install.sh: could not fetch tpkutils' tests at $TPKUTILS_COMMIT (tests/test_tpkutils_suite.py will fail)" >&2
  fi
fi
.venv/bin/tilecrate --version
