#!/usr/bin/env bash
# The web client's CI: install, build, unit tests in Node, then the
# behaviour tests in the system's headless Chromium against a real
# `pgrelay serve` (PGRELAY_BIN, default the workspace's release build) and
# the PostgreSQL in PGRELAY_TEST_DATABASE_URL. Nothing downloads a browser:
# Debian's chromium package is installed when /usr/bin/chromium is missing.
set -euo pipefail
cd "$(dirname "$0")"
: "${PGRELAY_TEST_DATABASE_URL:?set PGRELAY_TEST_DATABASE_URL to a PostgreSQL with wal_level=logical}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -x "${CHROMIUM_BIN:-/usr/bin/chromium}" ]; then
  as_root apt-get update -qq && as_root apt-get install -y -qq chromium >/dev/null
fi
if ! command -v npm >/dev/null || [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  echo "the web client's tests need Node.js 20 or later with npm" >&2
  exit 1
fi

TARGET_DIR="${CARGO_TARGET_DIR:-$(cd ../.. && pwd)/target}"
export PGRELAY_BIN="${PGRELAY_BIN:-$TARGET_DIR/release/pgrelay}"
[ -x "$PGRELAY_BIN" ] || (cd ../.. && cargo build --release -p pgrelay)

npm ci --no-audit --no-fund
npm run build
node --test test/unit/
node --test --test-concurrency=1 test/browser/
