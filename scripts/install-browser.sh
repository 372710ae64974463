#!/usr/bin/env bash
# The browser check's tools (tests/test_server_vector_browser.py): Debian's chromium, and npm's
# @arcgis/core + esbuild (versions locked in tests/browser/package-lock.json), bundled into
# tests/browser/dist with the SDK's assets next to it, so the page loads nothing from the internet.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "install-browser.sh: missing system packages: ${need[*]} (run as root or apt-get install them)" >&2
    exit 1
  fi
fi

cd tests/browser
# npm ci only when the lock file changed (~1-2 min), the bundle only when the page changed (~30 s)
lock=$(sha256sum package-lock.json | cut -c1-16)
if [ ! -f node_modules/.tc-stamp ] || [ "$(cat node_modules/.tc-stamp)" != "$lock" ]; then
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock" > node_modules/.tc-stamp
  rm -rf dist
fi
page=$(cat package-lock.json build.mjs src/* | sha256sum | cut -c1-16)
if [ ! -f dist/.stamp ] || [ "$(cat dist/.stamp)" != "$page" ]; then
  node build.mjs
  echo "$page" > dist/.stamp
fi
