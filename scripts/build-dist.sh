#!/usr/bin/env bash
# Builds the release binary and a stripped copy in dist/ (125 MB -> ~12 MB) to carry to a
# GPU machine, which runs it against its own torch 2.11 (scripts/gpu-check.sh sets
# LD_LIBRARY_PATH to that torch's lib directory).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
mkdir -p dist
strip -o dist/moxin-train target/release/moxin-train
ls -lh dist/moxin-train
