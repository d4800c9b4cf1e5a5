#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with a Python >= 3.12 and install the
# package in editable mode with its test extras. Prints the venv's python path on the last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MEGATRON_FP4_VENV:-$root/.venv}"
stamp="$venv/.megatron_fp4_installed"

find_python() {
  # 3.12 first: the version megatron-core 0.19 and this project are tested with
  local candidates=("${PYTHON:-}" python3.12 python3 python3.13)
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -V); do
      candidates+=("$(pyenv root)/versions/$v/bin/python3")
    done
  fi
  for c in "${candidates[@]}"; do
    [ -n "$c" ] || continue
    local exe; exe="$(command -v "$c" 2>/dev/null || true)"
    [ -n "$exe" ] || continue
    if "$exe" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$exe"; return 0
    fi
  done
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  py="$(find_python)" || {
    echo "error: megatron_fp4 needs Python >= 3.12 (megatron-core 0.19 requires it); none found on PATH" \
         "or under pyenv. Install one or set PYTHON=/path/to/python3.12." >&2
    exit 1
  }
  echo "creating $venv with $py ($("$py" --version))" >&2
  "$py" -m venv "$venv"
fi
# Reinstall only when the package metadata changed (editable install: code changes need nothing).
want="$(cat "$root/setup.py" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing megatron_fp4[test,plot] into $venv (first time: torch + megatron-core, a few minutes)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e "$root[test,plot]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
