#!/usr/bin/env bash
# Install the project into ./.venv. `--test` adds the test extras, headless Chromium (Debian's
# package, for the browser check of the HTML report), and openssh-server + rsync (tests/test_ray_up.py
# brings a cluster up over SSH on loopback). Safe to rerun: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# The torch/torchvision pair that installs from the build machines' local wheels; constraints.txt
# pins the rest of the tested set so pip does not spend minutes backtracking over botocore releases.
.venv/bin/pip install -q -c constraints.txt "torch==2.14.1" "torchvision==0.29.1" -e ".${extras}"
# Debian packages the tests need: `command -v` name, then package name.
missing=()
if [ -n "$extras" ]; then
  for pair in chromium:chromium sshd:openssh-server rsync:rsync; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair#*:}")
  done
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "install.sh: could not install ${missing[*]}; the report browser test / ray up test will fail" >&2
  else
    echo "install.sh: ${missing[*]} missing; run: sudo apt-get install -y ${missing[*]}" >&2
  fi
fi
