#!/usr/bin/env bash
# Run the unit tests on the oldest and newest supported Python (3.10 and 3.13).
# Interpreters are found on PATH (python3.10, python3.13) or under pyenv's versions dir.
# A missing interpreter is an error under CI=true, and a notice otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
for ver in 3.10 3.13; do
  py=$(command -v "python$ver" 2>/dev/null || true)
  if [ -z "$py" ] || ! "$py" -c 'import venv' 2>/dev/null; then
    py=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$ver".*/bin/python3 2>/dev/null | sort -V | tail -n1)
  fi
  if [ -z "$py" ]; then
    if [ "${CI:-}" = "true" ]; then echo "Python $ver not found" >&2; status=1; else echo "notice: Python $ver not found; skipped"; fi
    continue
  fi
  venv=".venv-$ver"
  if [ ! -x "$venv/bin/python" ]; then "$py" -m venv "$venv" || { status=1; continue; }; fi
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q -e '.[test]' || { status=1; continue; }
  echo "== unit tests on $("$venv/bin/python" -V)"
  bash tools/pytest-run.sh "$venv/bin/python" tests/unit -q -p no:cacheprovider || status=1
done
exit $status
