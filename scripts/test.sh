#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite; arguments go to pytest.
#
#   bash scripts/test.sh                       # everything
#   bash scripts/test.sh tests/test_images.py -x
#
# The browser test needs /usr/bin/chromium (Debian's package); it is installed here when we may, and
# the test skips itself when it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh test

install_chromium() {  # "$@": how to run as root (nothing, or sudo -n)
  "$@" apt-get update -qq >/dev/null &&
    "$@" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
}
if [ ! -x /usr/bin/chromium ]; then
  echo "test: /usr/bin/chromium is missing; installing it for the browser test"
  if ! command -v apt-get >/dev/null; then
    echo "warning: no apt-get here; the browser test will be skipped" >&2
  elif [ "$(id -u)" = 0 ]; then
    install_chromium || echo "warning: installing chromium failed; the browser test will be skipped" >&2
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    install_chromium sudo -n || echo "warning: installing chromium failed; the browser test will be skipped" >&2
  else
    echo "warning: chromium needs root to install (apt-get install chromium); the browser test will be skipped" >&2
  fi
fi

# one worker per core (pytest-xdist; tests/conftest.py gives each its share of the threads); `-n 0` runs in one process
exec .venv/bin/python -m pytest -q -n auto --dist loadgroup --durations=15 "$@"
