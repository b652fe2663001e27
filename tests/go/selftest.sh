#!/bin/sh
# Self-test of the go-plugin example programs: gpkv against gpkvplugin and
# gpcounter against gpcounterplugin, over unix sockets with and without
# AutoMTLS.  All four are go-plugin v1.0.1, so this checks the hand-written
# protocol code before it is pointed at a C plugin.  Builds first (with
# build.sh, into OUTDIR), runs everything in a temporary directory (also
# TMPDIR, where go-plugin puts its sockets), bounds every command with
# timeout(1), prints PASS/FAIL per check and exits 1 if any failed.
#
#   tests/go/selftest.sh OUTDIR
set -u

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
"$HERE/build.sh" "$1" >/dev/null || { echo "FAIL build"; exit 1; }
B=$(cd "$1" && pwd)/bin

W=$(mktemp -d "${TMPDIR:-/tmp}/gpselftest.XXXXXX")
trap 'rm -rf "$W"' EXIT
mkdir "$W/tmp"
cd "$W" || exit 1
export TMPDIR="$W/tmp"
unset KV_PLUGIN COUNTER_PLUGIN

T=${SELFTEST_TIMEOUT:-30}
npass=0
nfail=0
pass() { npass=$((npass + 1)); echo "PASS $*"; }
fail() { nfail=$((nfail + 1)); echo "FAIL $*"; }

# run CMD...: runs it bounded, sets $rc, $out (stdout) and $err (stderr).
run() {
  timeout -k 5 "$T" "$@" >"$W/out" 2>"$W/err"
  rc=$?
  out=$(cat "$W/out"; echo x)   # keep trailing newlines
  out=${out%x}
  err=$(cat "$W/err")
}

# expect NAME RC STDOUT: the last run exited RC and printed exactly STDOUT.
expect() {
  if [ "$rc" -eq "$2" ] && [ "$out" = "$3" ]; then
    pass "$1"
  else
    fail "$1: rc=$rc stdout=$(printf %s "$out" | od -An -c | tr -s ' \n' ' ') stderr=$err"
  fi
}

# expect_fail NAME STEP TEXT: exit 1, nothing on stdout, and stderr has
# "FAIL STEP:" with TEXT.
expect_fail() {
  if [ "$rc" -eq 1 ] && [ -z "$out" ] && printf %s "$err" | grep -q "^FAIL $2: .*$3"; then
    pass "$1 ($(printf %s "$err" | grep "^FAIL $2:" | head -1))"
  else
    fail "$1: rc=$rc stdout=$out stderr=$err"
  fi
}

# expect_file NAME FILE CONTENT
expect_file() {
  got=$(cat "$2" 2>/dev/null; echo x)
  if [ "${got%x}" = "$3" ]; then
    pass "$1"
  else
    fail "$1: $2 holds $(printf %s "${got%x}" | od -An -c | tr -s ' \n' ' ')"
  fi
}

NL='
'
TRAILER="${NL}${NL}Written from plugin-go-grpc"
KVP="$B/gpkvplugin"
CP="$B/gpcounterplugin"

# ---- KV: gpkv against gpkvplugin
for mode in unix automtls; do
  flags=
  [ $mode = automtls ] && flags=--automtls
  run "$B/gpkv" $flags --plugin "$KVP" put hello world
  expect "kv $mode put" 0 ""
  expect_file "kv $mode put wrote kv_hello" kv_hello "world$TRAILER"
  run "$B/gpkv" $flags --plugin "$KVP" get hello
  expect "kv $mode get" 0 "world$TRAILER$NL"
  run "$B/gpkv" $flags --plugin "$KVP" get missing
  expect_fail "kv $mode get missing key" get "no such file or directory"
done
run env KV_PLUGIN="$KVP --suffix=" "$B/gpkv" put raw "a b${NL}ü"
expect "kv put via \$KV_PLUGIN, --suffix=''" 0 ""
run env KV_PLUGIN="$KVP --suffix=" "$B/gpkv" --automtls get raw
expect "kv get exact bytes" 0 "a b${NL}ü${NL}"
run "$B/gpkv" --plugin "$KVP" put empty ""
run "$B/gpkv" --plugin "$KVP --suffix=" get empty
expect "kv empty value" 0 "$TRAILER$NL"
run "$B/gpkv" get hello
expect_fail "kv without a plugin command" flags "KV_PLUGIN"
run "$B/gpkv" --plugin "exit 3" get hello
expect_fail "kv plugin that exits at once" start ""

for mode in unix automtls; do
  flags=
  [ $mode = automtls ] && flags=--automtls
  run "$B/gpkv" $flags --plugin "$KVP" bench --n 300 --concurrency 4 --size 64
  if [ $rc -eq 0 ] && printf %s "$out" | grep -q '^{"program":"gpkv","op":"put","n":300,"concurrency":4,"size":64,.*"calls_per_s":[0-9.]*,"p50_us":[0-9.]*,"p99_us":[0-9.]*' &&
     [ "$(printf %s "$out" | wc -l)" -eq 1 ]; then
    pass "kv $mode bench: $(printf %s "$out" | head -1)"
  else
    fail "kv $mode bench: rc=$rc stdout=$out stderr=$err"
  fi
done

# ---- Counter: gpcounter against gpcounterplugin (AddHelper over the broker)
rm -f kv_*
run "$B/gpcounter" --plugin "$CP" put c 1
expect "counter unix put (new key)" 0 ""
run env COUNTER_PLUGIN="$CP" "$B/gpcounter" put c 41
expect "counter unix put (sum through the broker)" 0 ""
expect_file "counter unix file" kv_c '{"Value":42}'
run "$B/gpcounter" --plugin "$CP" get c
expect "counter unix get" 0 "42$NL"
run "$B/gpcounter" --plugin "$CP" put c -50
run "$B/gpcounter" --plugin "$CP" get c
expect "counter unix negative value" 0 "-8$NL"
run "$B/gpcounter" --plugin "$CP" get missing
expect_fail "counter get missing key" get "no such file or directory"
run "$B/gpcounter" --plugin "$CP" put c x
expect_fail "counter put non-number" flags "invalid syntax"

run "$B/gpcounter" --automtls --plugin "$CP" get c
expect "counter automtls get" 0 "-8$NL"
# go-plugin v1.0.1: the plugin's broker.Dial under AutoMTLS verifies the
# host with no RootCAs and ServerName "unused" (fixed in v1.4.4, #193).
run "$B/gpcounter" --automtls --plugin "$CP" put c 1
expect_fail "counter automtls put, v1.0.1 plugin: expected broker TLS failure" put \
  "certificate is valid for localhost, not unused"
run "$B/gpcounter" --automtls --plugin "$CP --fix-broker-tls" put c 10
expect "counter automtls put, plugin with v1.4.4's broker TLS fix" 0 ""
run "$B/gpcounter" --automtls --plugin "$CP" get c
expect "counter automtls get after put" 0 "2$NL"

# ---- nothing left behind
left=$(ls "$TMPDIR")
if [ -z "$left" ]; then
  pass "no sockets left in TMPDIR"
else
  fail "left in TMPDIR: $left"
fi

echo "selftest: $npass passed, $nfail failed"
[ "$nfail" -eq 0 ]
