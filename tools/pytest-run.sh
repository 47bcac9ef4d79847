#!/usr/bin/env bash
# Run pytest; "no tests collected" (exit 5) is a failure: every suite named here has tests,
# so collecting none means the suite is broken (a bad path, an import error hidden by a skip).
set -uo pipefail
py=$1; shift
"$py" -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests in: $* -- treating as a failure" >&2
  exit 1
fi
exit $rc
