#!/usr/bin/env bash
# Proxies a 100 MB streamed upload through a real gateway and prints its peak RSS growth.
# Usage: loadtest/upload-rss.sh [MEGABYTES]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin tollgate --example upload_rss
exec target/release/measure/upload_rss "${1:-100}"
