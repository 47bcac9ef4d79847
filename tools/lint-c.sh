#!/usr/bin/env bash
# Lint the native executor (make lint-c): formatting, extra compiler warnings, clang-tidy and
# cppcheck. The checkers' settings live here and in .clang-format / .clang-tidy.
# Needs the Debian packages gcc, clang-format, clang-tidy and cppcheck (make deps).
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=sandbox_kernel/runtime/native/sk-runtime.c
read -r -a CFLAGS < sandbox_kernel/runtime/native/cflags
# the compile-only part of the build flags (no -pie / -Wl,...: nothing is linked here)
COMPILE=()
for f in "${CFLAGS[@]}"; do
  case "$f" in -pie | -Wl,*) ;; *) COMPILE+=("$f") ;; esac
done

# Warnings beyond the build's -Wall -Wextra. They stay out of cflags so that a user's
# build with another compiler (version) never fails on them; here they are errors, and
# gcc is named because some are gcc-only.
WARNINGS=(
  -Wshadow -Wconversion -Wformat=2 -Wcast-qual -Wpointer-arith -Wundef -Wwrite-strings
  -Wstrict-prototypes -Wmissing-prototypes -Wnull-dereference -Wimplicit-fallthrough
  -Wlogical-op -Wduplicated-cond -Wduplicated-branches
  -Werror
)

# cppcheck: every check but the informational ones, for the build's configuration
# (_GNU_SOURCE, glibc's library model); a finding is suppressed inline with
# `// cppcheck-suppress ID` and a reason.
CPPCHECK=(
  --enable=warning,style,performance,portability --inconclusive
  --std=c11 -D_GNU_SOURCE --library=posix --library=gnu
  --inline-suppr --error-exitcode=1 --quiet
)

echo "lint-c: clang-format"
clang-format --dry-run -Werror "$SRC"
echo "lint-c: gcc warnings"
gcc "${COMPILE[@]}" "${WARNINGS[@]}" -c -o /dev/null "$SRC"
echo "lint-c: clang-tidy"
# without _FORTIFY_SOURCE: its wrapper macros hide libc calls (snprintf, ...) from the checks
clang-tidy --quiet "$SRC" -- "${COMPILE[@]}" -U_FORTIFY_SOURCE
echo "lint-c: cppcheck"
cppcheck "${CPPCHECK[@]}" "$SRC"
echo "lint-c: clean"
