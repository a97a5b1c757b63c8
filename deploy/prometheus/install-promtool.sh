#!/usr/bin/env bash
# promtool, Prometheus' own rule checker, for the alert-rule tests (tests/app/test_alert_rules.py,
# tests/system/test_alerts_fire.py): built once from the Go module proxy into the cache that
# also holds Kafka's jars. There is no Debian package of Prometheus 3; a release tarball
# would come from GitHub, which this kind of machine cannot reach.
set -euo pipefail
VERSION=v0.316.0  # the Go module version of Prometheus 3.16 (keep in tests/alert_check.py)
DEST="${LOWMARK_CACHE:-$HOME/.cache/lowmark}/promtool/$VERSION"
if [ -x "$DEST/promtool" ]; then
  echo "promtool $VERSION: $DEST/promtool"
  exit 0
fi
if ! command -v go >/dev/null; then
  echo "promtool: Go is not installed, so the alert-rule tests skip. Install Go >= 1.24" \
       "(https://go.dev/doc/install) and run make deps again." >&2
  exit 0
fi
echo "promtool $VERSION: building from the Go module proxy (once; a few minutes on 2 cores)"
mkdir -p "$DEST.tmp"
GOBIN="$DEST.tmp" GOFLAGS=-trimpath go install "github.com/prometheus/prometheus/cmd/promtool@$VERSION"
mv "$DEST.tmp/promtool" "$DEST.tmp/promtool.new" && mkdir -p "$DEST" \
  && mv "$DEST.tmp/promtool.new" "$DEST/promtool" && rmdir "$DEST.tmp"
"$DEST/promtool" --version | head -1
