#!/usr/bin/env bash
# `make test`: every test, in two pytest sessions at once. The kind tier (tests/kind, a
# real cluster in Docker) and the rest (unit, property, the kwok test bed's e2e) share
# nothing but the machine, and both mostly wait on controllers and clocks (a full run
# used ~12 CPU-minutes in 31 wall-minutes), so running them side by side saves the
# kind tier's whole wall time. The kind tier's output is printed when both are done;
# the exit status fails if either session failed.
#
#   hack/run-tests.sh [pytest args...]   (PYTEST_ARGS of make test)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=${PYTEST:-.venv/bin/pytest}
mkdir -p build
kind_log=build/test-kind.log
# Own temp roots: two sessions must not prune each other's numbered temp folders (short
# paths under /tmp: tests put unix sockets there).
base=$(mktemp -d /tmp/gpucloud-test.XXXXXX)
"$PYTEST" tests/kind -m kind --basetemp="$base/kind" "$@" >"$kind_log" 2>&1 &
kind_pid=$!
trap 'kill "$kind_pid" 2>/dev/null' INT TERM
"$PYTEST" -m "not kind" --basetemp="$base/main" "$@"
main_rc=$?
wait "$kind_pid"
kind_rc=$?
echo
echo "=================== the kind tier (tests/kind, $kind_log) ==================="
cat "$kind_log"
echo "make test: unit/property/e2e exit $main_rc, kind tier exit $kind_rc"
rm -rf "$base"
((main_rc == 0 && kind_rc == 0))
