#!/usr/bin/env bash
# The whole test suite: lint, types, then pytest (which starts its own Postgres).
# Installs the Python dependencies into .venv first; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'

.venv/bin/ruff check app tests migrations bench
.venv/bin/ruff format --check app tests migrations bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
