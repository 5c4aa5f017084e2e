#!/usr/bin/env bash
# Create .venv (python3) when missing and install the pinned requirements into it; a no-op when done already.
#
#   bash scripts/setup.sh          # runtime: requirements.txt
#   bash scripts/setup.sh test     # tests too: requirements-test.txt
#
# A stamp in .venv holds the hash of the requirement files last installed; pip runs only when it differs.
# PYTHON=python3.12 bash scripts/setup.sh picks the interpreter used to create .venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

kind="${1:-runtime}"
case "$kind" in
  runtime) req=requirements.txt ;;
  test) req=requirements-test.txt ;;
  *) echo "usage: bash scripts/setup.sh [runtime|test]" >&2; exit 2 ;;
esac
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$python" --version 2>&1)"
  if ! "$python" -m venv .venv; then
    rm -rf .venv
    echo "setup: '$python -m venv' failed; on Debian/Ubuntu install it with: apt-get install python3-venv" >&2
    exit 1
  fi
fi

digest() { cat "$@" | sha256sum | cut -d' ' -f1; }
runtime_hash=$(digest requirements.txt)
test_hash=$(digest requirements.txt requirements-test.txt)
stamp_runtime=.venv/.setup-runtime.sha256
stamp_test=.venv/.setup-test.sha256
current() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

if [ "$kind" = test ]; then
  current "$stamp_test" "$test_hash" && exit 0
else
  # the test requirements include the runtime ones
  { current "$stamp_runtime" "$runtime_hash" || current "$stamp_test" "$test_hash"; } && exit 0
fi

echo "setup: installing $req into .venv (first run: several minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req"
if [ "$kind" = test ]; then
  echo "$test_hash" > "$stamp_test"
fi
echo "$runtime_hash" > "$stamp_runtime"
