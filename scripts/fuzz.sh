#!/usr/bin/env bash
# Fuzz every libFuzzer target (ASan+UBSan, clang) until each has run at
# least --runs executions (default 10,000,000), starting from the seed
# corpora in tests/fuzz/corpus/ and the regression inputs in
# tests/fuzz/regress/; then the manifest differential ("schema": as many
# seeded mutations given to the JSON Schema and to the C readers, built
# with ASan, scripts/manifest-diff.py).  Not part of the test command (it
# takes hours on two cores); tests/run.sh runs the libFuzzer targets for
# RP_FUZZ_SECONDS each and 9,000 differential mutations.
#
#   scripts/fuzz.sh                      all targets, 10M executions each
#   scripts/fuzz.sh --runs 1000000 broker codec
#   scripts/fuzz.sh --merge              also fold what was found into
#                                        tests/fuzz/corpus/ (minimised)
#
# A crash, leak or timeout stops the run with the input saved as
# build-fuzz/fuzz_<target>-crash-*; copy it to tests/fuzz/regress/<target>/
# once fixed, and tests/run.sh replays it on every run.  The summary (one
# line per target: executions, seconds, corpus files and bytes, coverage)
# goes to build-fuzz/fuzz-summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=10000000
MERGE=0
TARGETS=()
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --merge) MERGE=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(broker manifest config codec squeue schema)

command -v clang >/dev/null || { echo "clang is needed" >&2; exit 1; }
scripts/install-deps.sh test >/dev/null
CC=clang cmake -S "$ROOT" -B "$ROOT/build-fuzz" -DRPCPLUGIN_BENCH=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DRPCPLUGIN_FUZZ=ON >/dev/null
libfuzz=()
for t in "${TARGETS[@]}"; do
  if [ "$t" = schema ]; then libfuzz+=(--target manifest_check --target pystubs)
  else libfuzz+=(--target "fuzz_$t"); fi
done
cmake --build "$ROOT/build-fuzz" -j"$(nproc)" "${libfuzz[@]}" >/dev/null

work="$ROOT/build-fuzz/long"
mkdir -p "$work"
summary="$ROOT/build-fuzz/fuzz-summary.txt"
: > "$summary"
for t in "${TARGETS[@]}"; do
  if [ "$t" = schema ]; then
    echo "== manifest differential: $RUNS documents"
    t0=$(date +%s)
    /usr/bin/python3 scripts/manifest-diff.py --runs "$RUNS" \
      --build "$ROOT/build-fuzz" | tee "$work/schema.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "the schema and the readers disagree"; exit 1; }
    echo "schema: $(tail -n 1 "$work/schema.log")" >> "$summary"
    continue
  fi
  bin="$ROOT/build-fuzz/tests/fuzz_$t"
  corpus="$work/$t"
  mkdir -p "$corpus"
  seeds=()
  [ -d "tests/fuzz/corpus/$t" ] && seeds+=("tests/fuzz/corpus/$t")
  if [ "$t" = manifest ]; then
    mkdir -p "$work/manifest-seed"
    cp manifests/*.json examples/*/*.json "$work/manifest-seed/"
    seeds+=("$work/manifest-seed")
  fi
  if [ -d "tests/fuzz/regress/$t" ]; then
    echo "== fuzz_$t: regression inputs"
    "$bin" -runs=1 tests/fuzz/regress/"$t"/* >/dev/null 2>&1 || {
      echo "fuzz_$t fails on a regression input"; exit 1; }
  fi
  echo "== fuzz_$t: $RUNS executions"
  t0=$(date +%s)
  if ! "$bin" -runs="$RUNS" -timeout=20 -rss_limit_mb=3072 -max_len=4096 \
       -print_final_stats=1 -artifact_prefix="$ROOT/build-fuzz/fuzz_$t-" \
       "$corpus" "${seeds[@]}" > "$work/$t.log" 2>&1; then
    tail -n 60 "$work/$t.log"
    echo "fuzz_$t failed; the input is in $ROOT/build-fuzz/"
    exit 1
  fi
  secs=$(( $(date +%s) - t0 ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
  cov=$(grep -Eo 'cov: [0-9]+' "$work/$t.log" | tail -1)
  files=$(find "$corpus" -type f | wc -l)
  bytes=$(find "$corpus" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
  line="fuzz_$t: $execs executions in ${secs}s, corpus $files files / $bytes bytes, $cov"
  echo "$line" | tee -a "$summary"
  if [ "$MERGE" = 1 ]; then
    mkdir -p "tests/fuzz/corpus/$t"
    "$bin" -merge=1 "tests/fuzz/corpus/$t" "$corpus" >/dev/null 2>&1
  fi
done
echo "summary: $summary"
