#!/usr/bin/env bash
# What `make run` runs: the whole pipeline with real NBD clients, live, then a verdict.
# Options pass through: make run ARGS="--duration 60 --rate 50"
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/lowmark demo "$@"
