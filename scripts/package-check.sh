#!/usr/bin/env bash
# The package-install test: builds the Debian packages (cpack -G DEB) in a
# scratch build folder, makes a brand-new Debian 12 root
# (debootstrap --variant=minbase bookworm), installs them there with
# `apt-get install ./*.deb` (their declared dependencies come from the
# Debian mirror), and proves inside it that
#   - rpcplugin-host --version/--help run, nothing is missing (ldd),
#     the dev package pulled pkg-config, libgrpc-dev and libcjson-dev;
#   - the installed rpcplugin-host serves: the handshake line, Health/Check
#     "plugin" and "" SERVING (the reply bytes 08 01), NOT_FOUND for another
#     name, GRPCController/Shutdown, exit 0, socket folder removed (client:
#     Debian's python3-grpcio with hand-made request bytes);
#   - tests/test_host.c builds with `pkg-config --cflags --libs rpcplugin`
#     and with a CMake project using find_package(rpcplugin)
#     (tests/consumer), and each serves /usr/share/rpcplugin/manifests/
#     default.json (stats, shutdown: "OK ...", "EXIT 0");
#   - the man page is installed (gzip'ed) and renders (zcat, man).
# Prints PASS/FAIL per check with timings, and exits 0 only when all pass.
#
#   scripts/package-check.sh [--keep] [--build-dir DIR] [--mirror URL]
#                            [--cache-dir DIR]
#   --keep           keep the work folder (root, build, logs) at the end
#   --build-dir DIR  build in DIR (kept; reused when it exists) instead of a
#                    scratch folder
#   --mirror URL     Debian mirror (default http://deb.debian.org/debian)
#   --cache-dir DIR  debootstrap's .deb cache (absolute), to rerun faster
#
# Runs as root (through sudo otherwise); needs the Debian mirror only.
# Everything lives in /var/tmp/rpcplugin-package-check.XXXXXX; /proc is
# mounted in the root for the test and unmounted on exit.
set -euo pipefail
umask 022

if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E -- "$0" "$@"
fi

cd "$(dirname "$0")/.."
SRC=$PWD
KEEP=0
BUILD=
MIRROR=http://deb.debian.org/debian
SECURITY_MIRROR=http://deb.debian.org/debian-security
CACHE=
SUITE=bookworm
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --build-dir) BUILD=$(realpath -m "$2"); shift ;;
    --mirror) MIRROR=$2; shift ;;
    --cache-dir) CACHE=$(realpath -m "$2"); shift ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "package-check: unknown argument \"$1\" (try --help)" >&2; exit 2 ;;
  esac
  shift
done

WORK=$(mktemp -d /var/tmp/rpcplugin-package-check.XXXXXX)
chmod 0755 "$WORK"
ROOT=$WORK/root
LOGS=$WORK/logs
mkdir -p "$LOGS"
[ -n "$BUILD" ] || BUILD=$WORK/build
IN=/tmp/rpcplugin-check   # the test's folder inside the root
T0=$(date +%s.%N)
RESULTS=()
FAILED=0

elapsed() { # elapsed START -> seconds with one decimal
  awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

# ---------------------------------------------------------------- cleanup

mounted_under_root() {
  awk -v r="$ROOT/" '{ gsub(/\\040/, " ", $5); if (index($5 "/", r) == 1) print $5 }' \
    /proc/self/mountinfo
}

cleanup() {
  local rc=$? pid m
  set +e
  if [ -d "$ROOT" ]; then
    # Processes started inside the root (a host left running by a failed
    # check): ended by their id.
    for pid in /proc/[0-9]*; do
      pid=${pid#/proc/}
      if [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$ROOT" ]; then
        kill -KILL "$pid" 2>/dev/null
      fi
    done
    # Deepest first.
    for m in $(mounted_under_root | sort -r); do
      umount "$m" 2>/dev/null || umount -l "$m"
    done
  fi
  if [ "$KEEP" -eq 1 ]; then
    echo "package-check: kept $WORK (root: $ROOT, build: $BUILD, logs: $LOGS)"
  elif [ -n "$(mounted_under_root)" ]; then
    echo "package-check: something is still mounted under $ROOT; not removing $WORK" >&2
  else
    rm -rf --one-file-system "$ROOT"
    [ "$BUILD" = "$WORK/build" ] && rm -rf --one-file-system "$BUILD"
    if [ "$FAILED" -eq 0 ] && [ "$rc" -eq 0 ]; then
      rm -rf --one-file-system "$WORK"
    else
      echo "package-check: logs kept in $LOGS"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- checks

# check NAME FUNCTION [ARGS...]: runs FUNCTION in a subshell with errexit
# (its output in $LOGS/NN-name.log), records PASS/FAIL and the time, sets
# LAST to its status and returns 0.  Never call it as a condition (if, ||):
# bash would then ignore errexit inside the subshell too.
NCHECK=0
LAST=0
check() {
  local name=$1 rc=0 t log
  shift
  NCHECK=$((NCHECK + 1))
  log=$LOGS/$(printf '%02d' "$NCHECK")-$(tr -c 'a-zA-Z0-9\n' '-' <<<"$name" | tr -s '-').log
  t=$(date +%s.%N)
  printf '=== %s\n' "$name"
  # Not in a condition: errexit holds inside the subshell.
  ( set -euo pipefail; "$@" ) >"$log" 2>&1 &
  wait $! || rc=$?
  local dur
  dur=$(elapsed "$t")
  if [ "$rc" -eq 0 ]; then
    RESULTS+=("$(printf 'PASS  %-68s %7s s' "$name" "$dur")")
    # The lines a check marks as its findings.
    grep -E '^(>|OK |EXIT |READY )' "$log" | cut -c1-150 | sed 's/^/    /' || true
  else
    FAILED=$((FAILED + 1))
    RESULTS+=("$(printf 'FAIL  %-68s %7s s' "$name" "$dur")")
    echo "--- FAIL ($rc): last lines of $log"
    tail -n 40 "$log" | sed 's/^/    /'
  fi
  LAST=$rc
  return 0
}

summary() {
  local line
  echo
  echo "=== package-check summary ($SUITE, $(dpkg --print-architecture))"
  for line in "${RESULTS[@]}"; do echo "$line"; done
  if [ "$FAILED" -eq 0 ]; then
    printf 'PASS: all %d checks passed, %s s in all\n' "${#RESULTS[@]}" "$(elapsed "$T0")"
  else
    printf 'FAIL: %d of %d checks failed, %s s in all\n' "$FAILED" \
      "${#RESULTS[@]}" "$(elapsed "$T0")"
  fi
}

# need NAME FUNCTION [ARGS...]: a check that later ones need; stop if it
# fails.
need() {
  check "$@"
  if [ "$LAST" -ne 0 ]; then
    summary
    echo "(stopped there: the remaining checks need that one)"
    exit 1
  fi
}

in_root() { # in_root COMMAND...: run in the root, clean environment
  chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive TMPDIR=/tmp "$@"
}

host_tools() {
  scripts/install-deps.sh package
}

build_debs() {
  cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DRPCPLUGIN_BENCH=OFF -DRPCPLUGIN_TESTS=OFF -DCMAKE_INSTALL_PREFIX=/usr
  cmake --build "$BUILD" -j"$(nproc 2>/dev/null || echo 2)"
  rm -f "$BUILD"/*.deb
  (cd "$BUILD" && cpack -G DEB)
  echo "> in $BUILD"
  local f n=0
  for f in "$BUILD"/*.deb; do
    echo "> $(basename "$f"): $(dpkg-deb -f "$f" Depends)"
    n=$((n + 1))
  done
  [ "$n" -eq 3 ]
}

make_root() {
  mkdir -m 0755 "$ROOT"
  local args=(--variant=minbase)
  if [ -n "$CACHE" ]; then
    mkdir -p "$CACHE"
    args+=(--cache-dir="$CACHE")
  fi
  debootstrap "${args[@]}" "$SUITE" "$ROOT" "$MIRROR"
  # A Debian 12 system as installed: updates and security too.
  cat > "$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
  # No service starts inside the root.
  printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
  chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
  mount -t proc proc "$ROOT/proc"
  echo "> $(cat "$ROOT/etc/debian_version"), $(du -sh "$ROOT" | cut -f1)"
}

copy_in() {
  mkdir -p "$ROOT$IN/debs" "$ROOT$IN/src/consumer"
  cp "$BUILD"/*.deb "$ROOT$IN/debs/"
  cp tests/test_host.c "$ROOT$IN/src/"
  cp tests/consumer/CMakeLists.txt "$ROOT$IN/src/consumer/"
  write_inside > "$ROOT$IN/inside.sh"
  chmod -R a+rX "$ROOT$IN"
}

inside() { in_root bash "$IN/inside.sh" "$@"; }

# The checks that run inside the root, one subcommand each.
write_inside() {
  cat <<'INSIDE'
#!/bin/bash
set -euo pipefail
IN=/tmp/rpcplugin-check
MANIFEST=/usr/share/rpcplugin/manifests/default.json

# drive_test_host BINARY: stats and shutdown against the default manifest.
drive_test_host() {
  local out
  rm -f /tmp/th.sock
  out=$(printf 'stats\nshutdown\n' | timeout 60 "$1" "$MANIFEST" unix:/tmp/th.sock)
  echo "$out"
  grep -q '^OK queued_chunks=0' <<<"$out"
  grep -q '^EXIT 0$' <<<"$out"
}

case "$1" in
  install)
    apt-get update -q
    cd "$IN/debs"
    apt-get install -y -q --no-install-recommends ./*.deb
    for p in librpcplugin0 librpcplugin-dev rpcplugin-host; do
      echo "> $(dpkg-query -W -f='${Package} ${Version}: ${Status}' "$p")"
      dpkg-query -W -f='${Status}' "$p" | grep -q 'install ok installed'
    done
    ;;
  runtime)
    echo "> $(rpcplugin-host --version)"
    grep -q -- '--magic-cookie' <<<"$(rpcplugin-host --help)"
    # The multiarch libdir, from the package's own file list.
    lib=$(dpkg -L librpcplugin0 | grep '/librpcplugin\.so\.0$')
    libdir=$(dirname "$lib")
    echo "> libdir $libdir"
    [[ "$libdir" =~ ^/usr/lib/[a-z0-9_]+-linux-gnu[a-z0-9_]*$ ]]
    for f in /usr/bin/rpcplugin-host "$lib" \
             "$libdir/rpcplugin/rpcplugin_services.so"; do
      test -f "$f"
      ldd "$f" > /tmp/ldd.out
      cat /tmp/ldd.out
      if grep -q 'not found' /tmp/ldd.out; then
        echo "$f: a library is missing"
        exit 1
      fi
    done
    # What the dev package's Depends pulled in.
    for p in libgrpc-dev libcjson-dev; do dpkg-query -W -f='${Status}' "$p" | grep -q 'install ok installed'; done
    command -v pkg-config
    echo "> pkg-config rpcplugin $(pkg-config --modversion rpcplugin), moduledir $(pkg-config --variable=moduledir rpcplugin)"
    test -f "$(pkg-config --variable=moduledir rpcplugin)/rpcplugin_services.so"
    test -f "$libdir/cmake/rpcplugin/rpcpluginConfig.cmake"
    test -f "$libdir/cmake/rpcplugin/rpcpluginConfigVersion.cmake"
    test -L "$libdir/librpcplugin.so"
    test -f /usr/include/rpcplugin/host.h
    test -f /usr/include/rpcplugin/rpcplugin.h
    test -f "$MANIFEST"
    ;;
  tools)
    apt-get install -y -q --no-install-recommends gcc libc6-dev make cmake \
      pkg-config python3 python3-grpcio man-db
    ;;
  serve)
    # The installed rpcplugin-host, a Python grpcio client with identity
    # serializers: HealthCheckRequest{service: "plugin"} is 0a 06 "plugin",
    # HealthCheckResponse{status: SERVING} is 08 01.
    cat > /tmp/client.py <<'PY'
import sys
import grpc
ch = grpc.insecure_channel(sys.argv[1])
grpc.channel_ready_future(ch).result(timeout=15)
raw = dict(request_serializer=None, response_deserializer=None)
check = ch.unary_unary("/grpc.health.v1.Health/Check", **raw)
for name, req in (("plugin", b"\x0a\x06plugin"), ("", b"")):
    rep = check(req, timeout=10)
    if rep != b"\x08\x01":
        sys.exit("Health/Check %r: expected 08 01 (SERVING), got %s" % (name, rep.hex()))
    print("> Health/Check %r: SERVING (%s)" % (name, rep.hex(" ")))
try:
    check(b"\x0a\x05other", timeout=10)
    sys.exit('Health/Check "other": expected NOT_FOUND, got an answer')
except grpc.RpcError as e:
    if e.code() != grpc.StatusCode.NOT_FOUND:
        sys.exit('Health/Check "other": expected NOT_FOUND, got %s' % e.code())
    print("> Health/Check 'other': NOT_FOUND")
rep = ch.unary_unary("/plugin.GRPCController/Shutdown", **raw)(b"", timeout=10)
print("> GRPCController/Shutdown: replied (%d bytes)" % len(rep))
ch.close()
PY
    rm -f /tmp/hs.out /tmp/host.err
    rpcplugin-host /usr/share/rpcplugin/manifests/host.json >/tmp/hs.out 2>/tmp/host.err &
    pid=$!
    trap 'kill -KILL $pid 2>/dev/null || true' EXIT
    for _ in $(seq 100); do
      [ -s /tmp/hs.out ] && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    line=$(head -n 1 /tmp/hs.out)
    echo "> handshake: $line"
    cat /tmp/host.err
    [[ "$line" =~ ^1\|1\|unix\|(/tmp/rpcplugin-[^|]+/plugin\.sock)\|grpc$ ]]
    sock=${BASH_REMATCH[1]}
    test -S "$sock"
    python3 /tmp/client.py "unix:$sock"
    # Shutdown: the host exits 0 by itself and removes its socket folder.
    rc=0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    wait "$pid" || rc=$?
    trap - EXIT
    echo "> rpcplugin-host exit status $rc"
    [ "$rc" -eq 0 ]
    if test -e "$(dirname "$sock")"; then
      echo "the socket folder $(dirname "$sock") is still there"
      exit 1
    fi
    ;;
  pkgconfig)
    flags=$(pkg-config --cflags --libs rpcplugin)
    echo "> cc test_host.c \$(pkg-config --cflags --libs rpcplugin): $(wc -w <<<"$flags") flags, $(grep -o -- '-lrpcplugin -lgrpc' <<<"$flags")"
    # shellcheck disable=SC2086
    cc -O2 -o /tmp/test_host_pc "$IN/src/test_host.c" $flags -lpthread
    drive_test_host /tmp/test_host_pc
    ;;
  cmake)
    rm -rf /tmp/consumer-build
    cmake -S "$IN/src/consumer" -B /tmp/consumer-build \
      -DTEST_HOST_C="$IN/src/test_host.c"
    cmake --build /tmp/consumer-build
    echo "> $(grep -h 'rpcplugin_DIR:PATH' /tmp/consumer-build/CMakeCache.txt)"
    drive_test_host /tmp/consumer-build/test_host
    ;;
  man)
    page=/usr/share/man/man1/rpcplugin-host.1.gz
    test -f "$page"
    src=$(zcat "$page")
    echo "> $page: $(grep -m1 '^\.TH' <<<"$src")"
    grep -q '^\.SH "\{0,1\}EXIT STATUS' <<<"$src"
    out=$(MANPAGER=cat MANWIDTH=80 man rpcplugin-host 2>&1)
    grep -q 'PLUGIN_UNIX_SOCKET_GROUP' <<<"$out"
    grep -q '^SIGNALS' <<<"$out"
    echo "> man rpcplugin-host: $(wc -l <<<"$out") lines"
    warn=$(MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null)
    [ -z "$warn" ] || { echo "$warn"; exit 1; }
    ;;
  *) echo "inside.sh: unknown check $1" >&2; exit 2 ;;
esac
INSIDE
}

echo "package-check: work folder $WORK"
need "host tools (debootstrap, dpkg-dev, build dependencies)" host_tools
need "build the .deb files (cmake, cpack -G DEB)" build_debs
need "fresh Debian root: debootstrap --variant=minbase $SUITE" make_root
need "copy the packages and the test sources into the root" copy_in
need "apt-get install ./*.deb (dependencies from the mirror)" inside install
check "installed files, libraries resolved, rpcplugin-host --version" inside runtime
need "test tools: gcc, cmake, make, pkg-config, python3-grpcio, man-db" inside tools
check "rpcplugin-host serves: Health/Check \"plugin\" SERVING, Shutdown" inside serve
check "test_host.c built with pkg-config serves default.json" inside pkgconfig
check "test_host.c built with find_package(rpcplugin) serves default.json" inside cmake
check "man page installed and renders (zcat, man)" inside man
summary
[ "$FAILED" -eq 0 ]
