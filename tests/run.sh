#!/usr/bin/env bash
# The project's test command (README): installs what is missing, then runs
# every test: unit (ctest), integration and interop (Python grpcio, Go
# go-plugin v1.0.1, Node grpc-js), the same suite under ASan+UBSan, the
# stdio queue and the concurrent integration suites (stdio, broker,
# services, application calls, live swaps) under TSan, one integration
# case and 20 cold cycles under valgrind memcheck, libFuzzer runs of the
# parsers, the queue and the broker's message handling (with every input
# that once crashed, tests/fuzz/regress/), and a smoke run of the benchmark.
#
#   tests/run.sh            everything
#   RP_STAGES="unit py" tests/run.sh    a subset (unit py go node asan tsan valgrind fuzz bench)
#   RP_FUZZ_SECONDS=20                   time per fuzz target
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAGES=${RP_STAGES:-"unit py go node asan tsan valgrind fuzz bench"}
PY=/usr/bin/python3
JOBS=$(nproc 2>/dev/null || echo 2)
T0=$(date +%s)

stage() { printf '\n=== %s (%ss)\n' "$*" "$(( $(date +%s) - T0 ))"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

build() { # build DIR [cmake args...]
  local dir=$1; shift
  cmake -S "$ROOT" -B "$dir" -DRPCPLUGIN_BENCH=OFF "$@" >/dev/null
  cmake --build "$dir" -j"$JOBS" >/dev/null
}

pytest_run() { # pytest_run BUILD_DIR [pytest args...]
  local dir=$1; shift
  (cd "$ROOT/tests/integration" && RP_BUILD="$dir" \
     $PY -m pytest -q -p no:cacheprovider "$@")
}

stage "dependencies"
scripts/install-deps.sh test
# Debian's crowdsec, a real go-plugin host, for examples/crowdsec-notifier
# (installed offline-safely: see tests/crowdsec/README.md).
tests/crowdsec/setup.sh
# Tests run a client as user nobody (PLUGIN_UNIX_SOCKET_GROUP), which must
# be able to search / to reach anything; a root made by debootstrap in a
# `mktemp -d` folder has / at mode 0700.
if [ $(( 0$(stat -c %a /) & 1 )) -eq 0 ]; then
  echo "making / searchable by others (mode $(stat -c %a /)), as on an installed system"
  chmod o+x /
fi

stage "build (RelWithDebInfo)"
build "$ROOT/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo

if has unit; then
  stage "unit tests (ctest)"
  (cd build && ctest --output-on-failure -j"$JOBS")
  stage "exported symbols"
  n=$(nm -D --defined-only build/lib/rpcplugin_services.so | awk '$2 ~ /[TtWw]/' | wc -l)
  nm -D --defined-only build/lib/rpcplugin_services.so
  [ "$n" -eq 1 ] || { echo "module exports $n functions, expected 1"; exit 1; }
  stage "install to a scratch prefix; a host built from the installed pkg-config file"
  inst=$(mktemp -d)
  cmake --install build --prefix "$inst" >/dev/null
  export PKG_CONFIG_PATH="$inst/lib/pkgconfig"
  # shellcheck disable=SC2046
  cc -O2 -o "$inst/test_host" tests/test_host.c \
    $(pkg-config --cflags --libs rpcplugin) -lpthread
  unset PKG_CONFIG_PATH
  # The module is found next to the installed library, by no configuration.
  out=$(printf 'stats\nshutdown\n' | env -u RPCPLUGIN_MODULE_PATH \
    LD_LIBRARY_PATH="$inst/lib" timeout 60 "$inst/test_host" \
    "$inst/share/rpcplugin/manifests/default.json" "unix:$inst/s.sock")
  echo "$out"
  grep -q '^OK queued_chunks=0' <<<"$out" && grep -q '^EXIT 0' <<<"$out" \
    || { echo "installed host failed"; exit 1; }
  "$inst/bin/rpcplugin-host" --version
  rm -rf "$inst"
  stage "Debian packages (cpack -G DEB in build-pkg): contents, dependencies; find_package(rpcplugin) against a scratch prefix"
  # The installation in a fresh Debian root is scripts/package-check.sh.
  # build-pkg is configured as a Debian package build (prefix /usr,
  # multiarch libdir) and reused, so this is incremental after its first run.
  cmake -S "$ROOT" -B "$ROOT/build-pkg" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DRPCPLUGIN_BENCH=OFF -DRPCPLUGIN_TESTS=OFF -DCMAKE_INSTALL_PREFIX=/usr \
    >/dev/null
  cmake --build "$ROOT/build-pkg" -j"$JOBS" >/dev/null
  rm -f build-pkg/*.deb
  (cd build-pkg && cpack -G DEB >/dev/null)
  deb_file() { local f; f=$(echo build-pkg/"$1"_*.deb); [ -f "$f" ] && echo "$f"; }
  deb_has() { # deb_has PACKAGE PATH-REGEX...: files the package must hold
    local f list re
    f=$(deb_file "$1") || { echo "no package $1 in build-pkg"; return 1; }
    shift
    list=$(dpkg-deb -c "$f" | awk '{ print $6 }')
    for re in "$@"; do
      grep -Eq "$re" <<<"$list" || { echo "$f: no file matches $re"; return 1; }
    done
  }
  deb_dep() { # deb_dep PACKAGE DEPENDS-REGEX...: dependencies it declares
    local f dep re
    f=$(deb_file "$1") || { echo "no package $1 in build-pkg"; return 1; }
    shift
    dep=$(dpkg-deb -f "$f" Depends)
    echo "$(basename "$f"): Depends: $dep"
    for re in "$@"; do
      grep -Eq "$re" <<<"$dep" || { echo "$f: no dependency matches $re"; return 1; }
    done
  }
  ma='\./usr/lib/[a-z0-9_]+-linux-gnu[a-z0-9_]*'
  debver=$(dpkg-deb -f "$(deb_file librpcplugin0)" Version)
  deb_has librpcplugin0 "^$ma/librpcplugin\.so\.0$" \
    "^$ma/librpcplugin\.so\.0\.[0-9.]+$" "^$ma/rpcplugin/rpcplugin_services\.so$" \
    '^\./usr/share/rpcplugin/manifests/default\.json$' \
    '^\./usr/share/rpcplugin/manifests/host\.json$'
  deb_has librpcplugin-dev '^\./usr/include/rpcplugin/host\.h$' \
    '^\./usr/include/rpcplugin/rpcplugin\.h$' "^$ma/librpcplugin\.so$" \
    "^$ma/pkgconfig/rpcplugin\.pc$" \
    "^$ma/cmake/rpcplugin/rpcpluginConfig\.cmake$" \
    "^$ma/cmake/rpcplugin/rpcpluginConfigVersion\.cmake$" \
    "^$ma/cmake/rpcplugin/rpcpluginTargets\.cmake$"
  deb_has rpcplugin-host '^\./usr/bin/rpcplugin-host$' \
    '^\./usr/share/man/man1/rpcplugin-host\.1\.gz$'
  # Each file in one package only: no dev link or header in the library's.
  if grep -Eq '/librpcplugin\.so$|\.h$|\.pc$|\.cmake$' \
       <<<"$(dpkg-deb -c "$(deb_file librpcplugin0)" | awk '{ print $6 }')"; then
    echo "librpcplugin0 holds development files"; exit 1
  fi
  deb_dep librpcplugin0 '(^|, )libc6( |,|$)' '(^|, )libgrpc[0-9]+ ' \
    '(^|, )libcjson1( |,|$)' '(^|, )libprotobuf-c1( |,|$)'
  deb_dep librpcplugin-dev "(^|, )librpcplugin0 \(= ${debver//./\\.}\)" \
    '(^|, )libgrpc-dev(,|$)' '(^|, )libcjson-dev(,|$)' '(^|, )pkg-config'
  deb_dep rpcplugin-host "(^|, )librpcplugin0 \(= ${debver//./\\.}\)" \
    '(^|, )libgrpc[0-9]+ ' '(^|, )libssl3( |,|$)'
  grep -q '^librpcplugin 0 librpcplugin0 ' \
    <<<"$(dpkg-deb -I "$(deb_file librpcplugin0)" shlibs)" \
    || { echo "librpcplugin0: no shlibs entry"; exit 1; }
  ver=$(build/bin/rpcplugin-host --version | awk '{ print $2 }')
  grep -q "^\.TH RPCPLUGIN-HOST 1 .* \"rpcplugin $ver\"" docs/rpcplugin-host.1 \
    || { echo "docs/rpcplugin-host.1: .TH does not name rpcplugin $ver"; exit 1; }
  man_warnings=$(zcat build-pkg/man/rpcplugin-host.1.gz | groff -man -Tutf8 -ww -z 2>&1)
  [ -z "$man_warnings" ] || { echo "rpcplugin-host.1: $man_warnings"; exit 1; }
  # find_package(rpcplugin) + rpcplugin::rpcplugin from a scratch prefix.
  inst=$(mktemp -d)
  cmake --install build --prefix "$inst" >/dev/null
  cmake -S tests/consumer -B "$inst/consumer" -DCMAKE_PREFIX_PATH="$inst" \
    >/dev/null
  cmake --build "$inst/consumer" >/dev/null
  out=$(printf 'stats\nshutdown\n' | env -u RPCPLUGIN_MODULE_PATH \
    timeout 60 "$inst/consumer/test_host" \
    "$inst/share/rpcplugin/manifests/default.json" "unix:$inst/s.sock")
  grep -q '^OK queued_chunks=0' <<<"$out" && grep -q '^EXIT 0' <<<"$out" \
    || { echo "$out"; echo "host built with find_package(rpcplugin) failed"; exit 1; }
  echo "find_package(rpcplugin): test_host built and served ($(grep -c '^OK' <<<"$out") OK replies, EXIT 0)"
  rm -rf "$inst"
fi

if has go && [ -x tests/go/build.sh ]; then
  stage "Go interop programs (go-plugin v1.0.1, GOPATH mode)"
  tests/go/build.sh "$ROOT/build/go"
  export RP_GO_BIN="$ROOT/build/go/bin"
fi

if has node && [ -f tests/node/package.json ]; then
  stage "Node grpc-js client (npm)"
  (cd tests/node && npm install --no-audit --no-fund --loglevel=error)
  export RP_NODE_DIR="$ROOT/tests/node"
fi

if has py; then
  stage "integration and interop tests"
  pytest_run "$ROOT/build"
fi

if has asan; then
  stage "build with AddressSanitizer + UndefinedBehaviorSanitizer"
  build "$ROOT/build-asan" -DCMAKE_BUILD_TYPE=Debug -DRPCPLUGIN_SANITIZE=ON
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  export LSAN_OPTIONS=suppressions=$ROOT/tests/lsan.supp:print_suppressions=0
  stage "unit tests under ASan+UBSan"
  (cd build-asan && ctest --output-on-failure -j"$JOBS")
  stage "integration tests under ASan+UBSan"
  RP_SLOW=3 pytest_run "$ROOT/build-asan" -m "not slow"
  unset ASAN_OPTIONS UBSAN_OPTIONS LSAN_OPTIONS
fi

if has tsan; then
  stage "stdio queue under ThreadSanitizer"
  build "$ROOT/build-tsan" -DCMAKE_BUILD_TYPE=Debug -DRPCPLUGIN_TSAN=ON
  TSAN_OPTIONS=halt_on_error=1 build-tsan/tests/test_squeue
  stage "integration under ThreadSanitizer: stdio, broker, services, application calls, live swaps, swaps across ABI versions, faults, multiplexing (suppressions: tests/tsan.supp)"
  # Every report of every process goes to a file of its own there (and
  # makes that process exit 66): any file is a failure.
  tsanlog=$(mktemp -d)
  TSAN_OPTIONS="suppressions=$ROOT/tests/tsan.supp exitcode=66 log_path=$tsanlog/report" \
  RP_SLOW=5 RP_SWAPS=30 RP_GO_SWAPS=10 pytest_run "$ROOT/build-tsan" \
    -m "not slow" test_stdio.py test_broker.py test_services.py \
    test_app_calls.py test_swap.py test_abi_matrix.py test_faults.py \
    test_mux.py test_mux_go.py || { cat "$tsanlog"/* 2>/dev/null; exit 1; }
  if [ -n "$(ls -A "$tsanlog")" ]; then cat "$tsanlog"/*; exit 1; fi
  rm -rf "$tsanlog"
fi

if has valgrind; then
  stage "valgrind memcheck: one integration case"
  RP_SLOW=10 RP_WRAPPER="valgrind -q --leak-check=full \
--errors-for-leak-kinds=definite --error-exitcode=99 \
--suppressions=$ROOT/tests/valgrind.supp --log-file=$ROOT/build/valgrind-%p.log" \
    pytest_run "$ROOT/build" -k "test_manifest_services and default" \
      test_services.py || { cat build/valgrind-*.log; exit 1; }
  if grep -l "definitely lost" build/valgrind-*.log 2>/dev/null; then
    cat build/valgrind-*.log; exit 1
  fi
  rm -f build/valgrind-*.log
  stage "valgrind memcheck: 20 cold cycles (load, serve, shutdown, dlclose)"
  RP_CYCLES_NO_RSS=1 valgrind -q --leak-check=full \
    --errors-for-leak-kinds=definite --error-exitcode=99 \
    --suppressions="$ROOT/tests/valgrind.supp" \
    build/tests/test_cycles build/lib manifests/default.json 20
fi

if has fuzz; then
  stage "libFuzzer (clang, ASan+UBSan): broker messages, manifest, config, codec, stdio queue, yamux"
  CC=clang cmake -S "$ROOT" -B "$ROOT/build-fuzz" -DRPCPLUGIN_BENCH=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DRPCPLUGIN_FUZZ=ON >/dev/null
  cmake --build "$ROOT/build-fuzz" -j"$JOBS" --target fuzz_broker \
    fuzz_manifest fuzz_config fuzz_codec fuzz_squeue fuzz_yamux >/dev/null
  corpus=$(mktemp -d)
  mkdir -p "$corpus/manifest"
  cp manifests/*.json examples/*/*.json "$corpus/manifest/"
  for t in broker manifest config codec squeue yamux; do
    mkdir -p "$corpus/$t"
    # Every input that once crashed (tests/fuzz/regress/), then the seed
    # corpus (tests/fuzz/corpus/) and what the run finds.
    if [ -d "tests/fuzz/regress/$t" ]; then
      "$ROOT/build-fuzz/tests/fuzz_$t" -runs=1 tests/fuzz/regress/"$t"/* \
        > "$corpus/$t-regress.log" 2>&1 || {
        tail -n 60 "$corpus/$t-regress.log"
        echo "fuzz_$t fails on an input of tests/fuzz/regress/$t"; exit 1; }
      echo "fuzz_$t: $(ls tests/fuzz/regress/"$t" | wc -l) regression inputs pass"
    fi
    [ -d "tests/fuzz/corpus/$t" ] && cp tests/fuzz/corpus/"$t"/* "$corpus/$t/"
    if ! "$ROOT/build-fuzz/tests/fuzz_$t" \
         -max_total_time="${RP_FUZZ_SECONDS:-20}" -rss_limit_mb=2048 \
         -timeout=20 -print_final_stats=1 \
         -artifact_prefix="$ROOT/build-fuzz/fuzz_$t-" \
         "$corpus/$t" > "$corpus/$t.log" 2>&1; then
      tail -n 60 "$corpus/$t.log"
      echo "fuzz_$t failed; the input is in $ROOT/build-fuzz/"
      exit 1
    fi
    echo "fuzz_$t: $(sed -n 's/^stat::number_of_executed_units: *//p' "$corpus/$t.log") executions, $(grep -Eo 'cov: [0-9]+' "$corpus/$t.log" | tail -1)"
  done
  rm -rf "$corpus"
fi

if has bench; then
  # Not a performance test (nothing about speed is asserted): proves that
  # every benchmark program still builds and runs to its end.
  stage "benchmark smoke run (bench/run.sh --quick)"
  scripts/install-deps.sh bench
  bench/run.sh --quick "$ROOT/build-bench" >/dev/null
  echo "bench smoke: ok ($ROOT/build-bench/bench/results-quick.txt)"
fi

stage "all tests passed"
