#!/bin/sh
# Build what the benchmarks need and run them all (docs/benchmarks.md).
#
#   bench/run.sh [--quick] [--reps N] [--only W1,W4,...] [BUILD_DIR]
#   bench/run.sh --profile [BUILD_DIR]     callgrind profiles of the module
#
# BUILD_DIR defaults to build-bench/ in the source tree (a Release build of
# its own, so a developer's build/ is never reconfigured); pass build to
# use that one.  The table goes to stdout, the raw figures to
# BUILD_DIR/bench/results.{json,txt}, a plot to BUILD_DIR/bench/ratios.png when
# python3-matplotlib is installed, and the programs' stderr to
# BUILD_DIR/bench/logs/.  --quick: reduced sizes, one repetition, for CI
# (asserts nothing about speed; writes results-quick.{json,txt}).
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARGS=""
BUILD=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick|--profile) ARGS="$ARGS $1" ;;
    --reps|--only) ARGS="$ARGS $1 $2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) BUILD=$1 ;;
  esac
  shift
done
[ -n "$BUILD" ] || BUILD="$ROOT/build-bench"
"$ROOT/scripts/install-deps.sh" bench >&2
case "$BUILD" in /*) ;; *) BUILD="$(pwd)/$BUILD" ;; esac

if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DRPCPLUGIN_BENCH=ON >/dev/null
elif ! grep -q '^RPCPLUGIN_BENCH:BOOL=ON' "$BUILD/CMakeCache.txt"; then
  cmake "$BUILD" -DRPCPLUGIN_BENCH=ON >/dev/null
fi
TYPE=$(sed -n 's/^CMAKE_BUILD_TYPE:STRING=//p' "$BUILD/CMakeCache.txt")
if [ "$TYPE" != "Release" ]; then
  echo "run.sh: warning: $BUILD is a '$TYPE' build, not Release;" \
       "figures will not be representative" >&2
fi
if grep -q '^RPCPLUGIN_\(SANITIZE\|TSAN\):BOOL=ON' "$BUILD/CMakeCache.txt"; then
  echo "run.sh: warning: $BUILD has sanitizers on" >&2
fi

JOBS=${JOBS:-2}
cmake "$BUILD" >/dev/null  # pick up new targets before naming them below
cmake --build "$BUILD" -j"$JOBS" --target rpcplugin_services rpcplugin \
  rpb_server rpb_client rpb_cycles rpb_lines rpb_shutdown_rtt
# Optional pieces: their absence only skips (and says so in the table).
for t in rpb_pystubs rpb_server_cxx rpcplugin-host kv; do
  cmake --build "$BUILD" -j"$JOBS" --target "$t" >/dev/null 2>&1 ||
    echo "run.sh: note: target $t not built; what needs it is skipped" >&2
done

PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
exec "$PY" "$ROOT/bench/run.py" $ARGS "$BUILD"
