#!/usr/bin/env bash
# The web client's CI: install, build, unit tests in Node, then the
# behaviour tests in the system's headless Chromium against a real
# `pgrelay serve` (PGRELAY_BIN, default the workspace's release build) and
# the PostgreSQL in PGRELAY_TEST_DATABASE_URL. Nothing downloads a browser.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x "${CHROMIUM_BIN:-/usr/bin/chromium}" ]; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
export PGRELAY_BIN="${PGRELAY_BIN:-$(cd ../.. && pwd)/target/release/pgrelay}"
[ -x "$PGRELAY_BIN" ] || (cd ../.. && cargo build --release -p pgrelay)
npm ci --no-audit --no-fund
npm run build
node --test test/unit/
node --test --test-concurrency=1 test/browser/
