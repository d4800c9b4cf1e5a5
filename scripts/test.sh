#!/usr/bin/env bash
# The README's test command: set up (or reuse) .venv, then run the default test suite.
# Extra arguments go to pytest (e.g. `-m slow` for the slow tests, `-k rng`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup_env.sh" | tail -n 1)"
cd "$root"
exec "$py" -m pytest -q "$@"
