#!/usr/bin/env bash
# Set up (first run only) and start the app at http://localhost:8501.
#
#   bash scripts/app.sh                        # extra arguments go to streamlit, e.g. --server.port 8600
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh runtime
exec .venv/bin/streamlit run app.py "$@"
