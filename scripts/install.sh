#!/usr/bin/env bash
# Install the project into ./.venv. `--test` adds the test extras and headless Chromium (Debian's
# package, for the browser check of the HTML report). Safe to rerun: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# The torch/torchvision pair that installs from the build machines' local wheels; constraints.txt
# pins the rest of the tested set so pip does not spend minutes backtracking over botocore releases.
.venv/bin/pip install -q -c constraints.txt "torch==2.14.1" "torchvision==0.29.1" -e ".${extras}"
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "install.sh: could not install chromium; the report browser test will fail" >&2
  else
    echo "install.sh: chromium is missing; run: sudo apt-get install -y chromium" >&2
  fi
fi
