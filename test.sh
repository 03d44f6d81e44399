#!/usr/bin/env bash
# Runs the test suite (installing first, like setup.sh, when needed).  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
SETUP_NO_DEMO=1 bash setup.sh
"${VENV:-.venv}/bin/ruff" check dsconv_tvm
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
