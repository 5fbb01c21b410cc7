#!/usr/bin/env bash
# Screenshot a scan's report.html with headless Chromium (Debian: apt-get install -y chromium).
#   benchmarks/screenshot_report.sh OUT_DIR PNG [WIDTH,HEIGHT]
# Writes OUT_DIR/report.html first when it is missing (python -m scanner.report --out OUT_DIR).
# Networking is switched off as far as Chromium allows: the report must render from the file alone.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR PNG [WIDTH,HEIGHT]   (default 1200,3000)" >&2
  exit 2
fi
out_dir=$(cd "$1" && pwd)
png=$2
size=${3:-1200,3000}
chromium=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  echo "$0: no Chromium at $chromium (apt-get install -y chromium, or set CHROMIUM=...)" >&2
  exit 2
fi
if [ ! -f "$out_dir/report.html" ]; then
  python -m scanner.report --out "$out_dir"
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
mkdir -p "$(dirname "$png")"
png=$(cd "$(dirname "$png")" && pwd)/$(basename "$png")
"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size="$size" --screenshot="$png" "file://$out_dir/report.html" 2>/dev/null
echo "$png"
