#!/bin/bash
# tests/crowdsec/selftest.sh — validate the crowdsec harness itself.
#
#   selftest.sh [--no-setup] [--runs N]
#
# Runs setup.sh (unless --no-setup), then run_notifier_test.sh:
#   - N times (default 3) with the Python reference notifier py_notifier.py
#     (unix socket), once more with RPCNOTIFY_NETWORK=tcp;
#   - once with Debian's own Go notifier /usr/lib/crowdsec/plugins/dummy
#     (built on go-plugin v1.0.1; it also appends the text to output_file),
#     the control that shows what a real go-plugin plugin does.
# Ends with the line "N passed, N failed"; exit 0 only when nothing failed.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
SETUP=1
RUNS=3
while [ $# -gt 0 ]; do
    case $1 in
        --no-setup) SETUP=0; shift ;;
        --runs) RUNS=${2-}; shift 2 || { echo "--runs needs a value" >&2; exit 2; } ;;
        *) echo "usage: $0 [--no-setup] [--runs N]" >&2; exit 2 ;;
    esac
done
if [ "$SETUP" = 1 ]; then
    "$HERE/setup.sh" || { echo "selftest: setup.sh failed"; echo "0 passed, 1 failed"; exit 1; }
fi

pass=0; fail=0
run() {
    local label=$1; shift
    echo "=== $label"
    if "$@"; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "selftest: $label FAILED"; fi
}
for i in $(seq 1 "$RUNS"); do
    run "py_notifier unix #$i" timeout 180 "$HERE/run_notifier_test.sh" --quiet "$HERE/py_notifier.py"
done
run "py_notifier tcp" env RPCNOTIFY_NETWORK=tcp timeout 180 "$HERE/run_notifier_test.sh" --quiet "$HERE/py_notifier.py"
if [ -x /usr/lib/crowdsec/plugins/dummy ]; then
    run "Debian dummy plugin (control)" timeout 180 "$HERE/run_notifier_test.sh" --quiet --type dummy /usr/lib/crowdsec/plugins/dummy
fi
echo "selftest: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
