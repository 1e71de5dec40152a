#!/usr/bin/env bash
# The whole test suite: lint, types, then pytest (which starts its own Postgres).
# Installs the Python dependencies into .venv and the Node test harness first;
# extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'

# The real JS clients the tests drive (versions pinned by the lock files).
if [ ! -d tests/node/genkit/node_modules/genkit ]; then
  (cd tests/node/genkit && npm ci --omit=optional --no-audit --no-fund --loglevel=error)
fi
# The Durable Streams suite and client: `npm install` follows the lockfile here, `npm ci`
# refuses it (see tests/node/durable-streams/README.md); optional deps are needed.
if [ ! -d tests/node/durable-streams/node_modules/@durable-streams ]; then
  (cd tests/node/durable-streams && npm install --no-audit --no-fund --loglevel=error)
fi

.venv/bin/ruff check app tests migrations bench
# README.md: its Python examples, formatted like the code.
.venv/bin/ruff format --check app tests migrations bench README.md
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
