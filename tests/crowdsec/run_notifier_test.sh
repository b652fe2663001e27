#!/bin/bash
# tests/crowdsec/run_notifier_test.sh — prove that Debian 12's crowdsec
# (1.4.6, go-plugin v1.0.1) launches a notification plugin, configures it,
# delivers an alert to it, and stops it.
#
# Usage (as root; run tests/crowdsec/setup.sh once before):
#
#   run_notifier_test.sh [OPTIONS] PLUGIN_EXECUTABLE [EXPECTED ...]
#
#   PLUGIN_EXECUTABLE  the plugin: an executable file crowdsec will exec with
#                      no arguments, as user nobody:nogroup. It is COPIED
#                      into a private plugin folder as notification-TYPE
#                      (owner root, mode 0755); anything it needs besides
#                      itself (interpreter, libraries, programs it execs)
#                      must stay where it is and be readable/executable by
#                      nobody. A wrapper script that execs something else
#                      is fine.
#   EXPECTED ...       fixed strings that must all appear in the output file
#                      (default: the decision's IP, 192.0.2.7).
#
# The plugin's contract (what the harness relies on):
#   Configure(Config{bytes config = 2}) receives the notification YAML. Its
#   top-level keys include, one per line:
#       name: <NAME>                 (the notification's name)
#       output_file: <ABSOLUTE PATH> (plain scalar, no quotes needed)
#   plus crowdsec's own keys (type, format, timeout, max_retry, ...) and the
#   lines of --config-extra FILE. Notify(Notification{string text = 1;
#   string name = 2}) must append the alert text (any format that keeps the
#   EXPECTED strings visible) to output_file. The output file's folder is
#   owned by nobody:nogroup; the file does not exist beforehand.
#
# Options:
#   --type TYPE          notification type, [a-z0-9_]+ (no '-': crowdsec takes
#                        the part after the last '-' of the file name)
#                        (default: rpcnotify)
#   --name NAME          notification name (default: TYPE_default)
#   --format TEMPLATE    Go text/template applied by crowdsec to the list of
#                        alerts (default: one line: "<value> <type> <duration>
#                        <scenario>" per decision). Avoid '$': crowdsec runs
#                        os.ExpandEnv on the marshalled YAML.
#   --config-extra FILE  extra top-level YAML lines for the notification
#                        config (plugin-specific keys)
#   --support DIR        copy DIR (recursively) to a folder of the work
#                        directory that nobody can read, and export its path
#                        as CROWDSEC_HARNESS_SUPPORT to crowdsec and so to
#                        the plugin: a wrapper script given as
#                        PLUGIN_EXECUTABLE can then
#                          exec "$CROWDSEC_HARNESS_SUPPORT/bin/prog" ...
#                        (for build trees nobody cannot read, e.g. under
#                        /root). Symlinks are copied as links.
#   --ip ADDR            IP of the manual decision (default 192.0.2.7)
#   --timeout SECONDS    bound on the wait for delivery (default 30)
#   --user U --group G   plugin_config user/group (default nobody/nogroup)
#   --keep               keep the work directory (printed) at the end
#   --quiet              print only the summary and, on failure, the logs
#   -h, --help
#
# Environment: passed through to crowdsec, and from it to the plugin
# (go-plugin appends its own variables to crowdsec's environment), e.g.
# RPCNOTIFY_NETWORK=tcp for py_notifier.py. TMPDIR is set to a private
# folder of the work directory (mode 1777), so unix sockets a plugin creates
# there vanish with it.
#
# Steps, each bounded: private config in a temp dir (local API on a free
# 127.0.0.1 port, sqlite, no online API, no prometheus, daemonize: true for
# crowdsec's SIGTERM handling); `cscli machines add` (offline, writes the
# sqlite DB and the credentials file); `crowdsec -t -no-cs` (config test:
# launches, configures and kills the plugin); `crowdsec -no-cs` in the
# background; wait for the LAPI port; `cscli decisions add --ip ADDR`
# (a profile filtering Alert.GetScope() == "Ip" names the notification);
# wait until the output file holds every EXPECTED string; SIGTERM crowdsec;
# check that it and the plugin process(es) exited and that the logs hold no
# error; print PASS or FAIL with timings; remove the temp dir.
#
# Exit status: 0 PASS, 1 FAIL, 2 usage or environment problem.

set -u
set -o pipefail

PROG=${0##*/}

TYPE=rpcnotify
NAME=
FORMAT='{{range .}}{{range .Decisions}}{{.Value}} {{.Type}} {{.Duration}} {{.Scenario}};{{end}}{{end}}'
CONFIG_EXTRA=
SUPPORT=
IP=192.0.2.7
TIMEOUT=30
PUSER=nobody
PGROUP=nogroup
KEEP=0
QUIET=0

usage() { sed -n '2,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//'; }
die_usage() { echo "$PROG: $*" >&2; echo "try: $PROG --help" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case $1 in
        --type) TYPE=${2-}; shift 2 || die_usage "--type needs a value" ;;
        --name) NAME=${2-}; shift 2 || die_usage "--name needs a value" ;;
        --format) FORMAT=${2-}; shift 2 || die_usage "--format needs a value" ;;
        --config-extra) CONFIG_EXTRA=${2-}; shift 2 || die_usage "--config-extra needs a value" ;;
        --support) SUPPORT=${2-}; shift 2 || die_usage "--support needs a value" ;;
        --ip) IP=${2-}; shift 2 || die_usage "--ip needs a value" ;;
        --timeout) TIMEOUT=${2-}; shift 2 || die_usage "--timeout needs a value" ;;
        --user) PUSER=${2-}; shift 2 || die_usage "--user needs a value" ;;
        --group) PGROUP=${2-}; shift 2 || die_usage "--group needs a value" ;;
        --keep) KEEP=1; shift ;;
        --quiet) QUIET=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die_usage "unknown option $1" ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || die_usage "missing PLUGIN_EXECUTABLE"
PLUGIN_SRC=$1; shift
case $PLUGIN_SRC in /*) ;; *) PLUGIN_SRC=$PWD/$PLUGIN_SRC ;; esac
if [ $# -gt 0 ]; then EXPECTED=("$@"); else EXPECTED=("$IP"); fi
[ -n "$NAME" ] || NAME=${TYPE}_default

[[ $TYPE =~ ^[a-z0-9_]+$ ]] || die_usage "--type must match [a-z0-9_]+ (got '$TYPE')"
[[ $NAME =~ ^[A-Za-z0-9_.]+$ ]] || die_usage "--name must match [A-Za-z0-9_.]+ (got '$NAME')"
[[ $TIMEOUT =~ ^[0-9]+$ ]] && [ "$TIMEOUT" -ge 1 ] || die_usage "--timeout must be a positive integer"
[[ $FORMAT != *'$'* ]] || die_usage "--format must not contain '\$' (crowdsec expands environment variables)"
[ -f "$PLUGIN_SRC" ] && [ -x "$PLUGIN_SRC" ] || die_usage "$PLUGIN_SRC: not an executable file"
[ -z "$CONFIG_EXTRA" ] || [ -r "$CONFIG_EXTRA" ] || die_usage "$CONFIG_EXTRA: cannot read"
case $CONFIG_EXTRA in ''|/*) ;; *) CONFIG_EXTRA=$PWD/$CONFIG_EXTRA ;; esac
[ -z "$SUPPORT" ] || [ -d "$SUPPORT" ] || die_usage "$SUPPORT: not a directory"

[ "$(id -u)" = 0 ] || { echo "$PROG: must run as root (crowdsec switches the plugin to $PUSER:$PGROUP)" >&2; exit 2; }
for t in crowdsec cscli timeout setpriv; do
    command -v "$t" >/dev/null 2>&1 || { echo "$PROG: '$t' not found (run tests/crowdsec/setup.sh)" >&2; exit 2; }
done
PUID=$(id -u "$PUSER" 2>/dev/null) || { echo "$PROG: no user $PUSER" >&2; exit 2; }
PGID=$(getent group "$PGROUP" | cut -d: -f3) && [ -n "$PGID" ] || { echo "$PROG: no group $PGROUP" >&2; exit 2; }

# ---------------------------------------------------------------- helpers
T0=$EPOCHREALTIME
now() { echo "$EPOCHREALTIME"; }
ms_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%d", (b - a) * 1000 }'; }
say() { [ "$QUIET" = 1 ] || printf '[%6d ms] %s\n' "$(ms_since "$T0")" "$*"; }
FAILS=()
fail() { FAILS+=("$*"); printf '[%6d ms] FAIL: %s\n' "$(ms_since "$T0")" "$*" >&2; }
TIMINGS=()
timing() { TIMINGS+=("$1=$2ms"); }

# Poll COMMAND every 0.1 s for at most SECONDS; 0 when it succeeded.
wait_for() {
    local secs=$1; shift
    local deadline
    deadline=$(awk -v n="$EPOCHREALTIME" -v s="$secs" 'BEGIN { printf "%.3f", n + s }')
    while :; do
        "$@" && return 0
        awk -v n="$EPOCHREALTIME" -v d="$deadline" 'BEGIN { exit !(n >= d) }' && return 1
        sleep 0.1
    done
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Alive = exists and is not a zombie (an orphan's zombie may wait a while
# for pid 1 to reap it).
alive() {
    [ -n "${1-}" ] || return 1
    local st
    st=$(sed 's/^.*) \([A-Za-z]\).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
any_alive() { local p; for p in "$@"; do alive "$p" && return 0; done; return 1; }
none_alive() { ! any_alive "$@"; }
# Direct children of a pid (the plugins crowdsec launched).
children() {
    if command -v ps >/dev/null 2>&1; then ps -o pid= --ppid "$1" | tr -d ' '; return; fi
    local p; for p in /proc/[0-9]*; do
        [ "$(sed 's/^.*) [A-Za-z] \([0-9]*\) .*/\1/' "$p/stat" 2>/dev/null)" = "$1" ] && echo "${p#/proc/}"; done
}
free_port() {
    if [ -x /usr/bin/python3 ]; then
        /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    else
        local p
        for _ in $(seq 1 50); do
            p=$((20000 + RANDOM % 40000))
            port_open "$p" || { echo "$p"; return 0; }
        done
        return 1
    fi
}
as_plugin_user() { setpriv --reuid="$PUID" --regid="$PGID" --clear-groups "$@"; }

# ---------------------------------------------------------------- cleanup
WORK=
CS_PID=
PLUGIN_PIDS=()
cleanup() {
    local p
    if alive "$CS_PID"; then kill -KILL "$CS_PID" 2>/dev/null; wait "$CS_PID" 2>/dev/null; fi
    for p in "${PLUGIN_PIDS[@]}"; do alive "$p" && kill -KILL "$p" 2>/dev/null; done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$KEEP" = 1 ]; then echo "kept work directory: $WORK"; else rm -rf "$WORK"; fi
    fi
}
trap cleanup EXIT
trap 'echo "$PROG: interrupted" >&2; exit 1' INT TERM HUP

# ---------------------------------------------------------------- layout
WORK=$(mktemp -d /tmp/crowdsec-notifier-test.XXXXXX) || exit 2
chmod 0755 "$WORK"     # nobody must traverse it (plugin, output folder)
ETC=$WORK/etc; PLUGINS=$WORK/plugins; NOTIF=$WORK/etc/notifications
DATA=$WORK/data; LOGS=$WORK/log; OUT=$WORK/out; HUB=$WORK/hub; TMPD=$WORK/tmp
mkdir -p "$ETC" "$NOTIF" "$PLUGINS" "$DATA" "$LOGS" "$OUT" "$HUB" "$TMPD"
chmod 0755 "$PLUGINS"
chmod 0700 "$ETC" "$DATA"
chown "$PUID:$PGID" "$OUT"; chmod 0755 "$OUT"
chmod 1777 "$TMPD"
OUTFILE=$OUT/notifications.log
PLUGIN=$PLUGINS/notification-$TYPE
install -o root -g root -m 0755 "$PLUGIN_SRC" "$PLUGIN"
if [ -n "$SUPPORT" ]; then
    mkdir -p "$WORK/support" && cp -a "$SUPPORT/." "$WORK/support/" || exit 2
    chown -R -h root:root "$WORK/support"
    chmod -R u+rwX,go+rX,go-w "$WORK/support"
    export CROWDSEC_HARNESS_SUPPORT=$WORK/support
fi

PORT=$(free_port) || { echo "$PROG: no free port" >&2; exit 2; }
CONFIG=$ETC/config.yaml

cat >"$CONFIG" <<EOF
common:
  daemonize: true
  log_media: file
  log_level: info
  log_dir: $LOGS/
  working_dir: .
config_paths:
  config_dir: $ETC/
  data_dir: $DATA/
  simulation_path: $ETC/simulation.yaml
  hub_dir: $HUB/
  index_path: $HUB/.index.json
  notification_dir: $NOTIF/
  plugin_dir: $PLUGINS/
cscli:
  output: human
  color: no
db_config:
  log_level: info
  type: sqlite
  db_path: $DATA/crowdsec.db
  use_wal: false
  flush:
    max_items: 5000
    max_age: 7d
plugin_config:
  user: $PUSER
  group: $PGROUP
api:
  client:
    insecure_skip_verify: false
    credentials_path: $ETC/local_api_credentials.yaml
  server:
    log_level: info
    listen_uri: 127.0.0.1:$PORT
    profiles_path: $ETC/profiles.yaml
    console_path: $ETC/console.yaml
    trusted_ips:
      - 127.0.0.1
      - ::1
prometheus:
  enabled: false
  level: full
  listen_addr: 127.0.0.1
  listen_port: 0
EOF

cat >"$ETC/simulation.yaml" <<'EOF'
simulation: off
EOF

cat >"$ETC/profiles.yaml" <<EOF
name: harness_ip_notify
filters:
 - Alert.GetScope() == "Ip"
decisions:
 - type: ban
   duration: 4h
notifications:
 - $NAME
on_success: break
EOF

{
    echo "type: $TYPE"
    echo "name: $NAME"
    echo "log_level: info"
    echo "format: |"
    printf '  %s\n' "$FORMAT"
    echo "output_file: $OUTFILE"
    [ -z "$CONFIG_EXTRA" ] || cat "$CONFIG_EXTRA"
} >"$NOTIF/$TYPE.yaml"

say "work dir $WORK, LAPI 127.0.0.1:$PORT, plugin $PLUGIN (from $PLUGIN_SRC), output $OUTFILE"

# ---------------------------------------------------------------- pre-flight
# What crowdsec itself checks (pkg/csplugin pluginIsValid): owner = the user
# crowdsec runs as, not group/world writable, no setgid. What the exec needs:
# nobody can execute it and whatever it loads.
preflight_ok=1
if ! as_plugin_user test -x "$PLUGIN"; then
    fail "preflight: $PUSER cannot execute $PLUGIN"; preflight_ok=0
fi
if [ "$(head -c 4 "$PLUGIN" | od -An -c | tr -d ' ')" = '177ELF' ]; then
    if missing=$(as_plugin_user ldd "$PLUGIN" 2>&1 | grep -E 'not found|cannot|denied'); then
        fail "preflight: as $PUSER, ldd $PLUGIN reports: $missing"; preflight_ok=0
    fi
elif [ "$(head -c 2 "$PLUGIN")" = '#!' ]; then
    interp=$(head -n 1 "$PLUGIN" | sed 's/^#![[:space:]]*//; s/[[:space:]].*//')
    if ! as_plugin_user test -x "$interp"; then
        fail "preflight: interpreter '$interp' of $PLUGIN not executable by $PUSER"; preflight_ok=0
    fi
fi
[ "$preflight_ok" = 1 ] && say "preflight: $PUSER can execute the plugin"

# ---------------------------------------------------------------- machine
t=$(now)
if ! out=$(timeout 60 cscli -c "$CONFIG" machines add harness --auto \
        -f "$ETC/local_api_credentials.yaml" 2>&1); then
    fail "cscli machines add failed: $out"
fi
timing machines_add "$(ms_since "$t")"
say "cscli machines add: done ($(ms_since "$t") ms)"

export TMPDIR=$TMPD

# ---------------------------------------------------------------- config test
# `crowdsec -t` launches the plugin, configures it, then calls go-plugin's
# Client.Kill() and waits for it: GRPCController/Shutdown, then up to 2 s for
# the process to exit ("plugin exited"), else SIGKILL ("plugin failed to exit
# gracefully"). This is where crowdsec reliably exercises Kill.
t=$(now)
if [ ${#FAILS[@]} -eq 0 ]; then
    (cd / && exec timeout 60 crowdsec -c "$CONFIG" -no-cs -t) </dev/null >"$LOGS/config_test.stdout" 2>&1
    rc=$?
    timing config_test "$(ms_since "$t")"
    # Keep the config test's log apart from the run's.
    [ -f "$LOGS/crowdsec.log" ] && mv "$LOGS/crowdsec.log" "$LOGS/config_test.log"
    CT_LOG=$LOGS/config_test.log
    ct_pid=$(sed -n 's/.*msg="plugin started".* pid=\([0-9]*\).*/\1/p' "$CT_LOG" 2>/dev/null | head -n 1)
    if [ $rc -ne 0 ]; then
        fail "crowdsec -t (config test: launches, configures, kills the plugin) exited $rc"
    elif ! grep -q "registered plugin $NAME\"" "$CT_LOG" 2>/dev/null; then
        fail "crowdsec -t: no 'registered plugin $NAME' in its log (Configure failed?)"
    elif grep -q 'plugin failed to exit gracefully' "$CT_LOG"; then
        fail "crowdsec -t: the plugin did not exit within 2 s of GRPCController/Shutdown (go-plugin killed it)"
    elif ! grep -q 'msg="plugin exited"' "$CT_LOG"; then
        fail "crowdsec -t: go-plugin never logged 'plugin exited' after Kill()"
    elif alive "$ct_pid"; then
        fail "crowdsec -t: plugin pid $ct_pid still running after crowdsec -t returned"
    else
        say "crowdsec -t: plugin pid ${ct_pid:-?} launched, configured ('registered plugin $NAME'), Kill() -> Shutdown -> 'plugin exited' ($(ms_since "$t") ms)"
    fi
fi

# ---------------------------------------------------------------- run
if [ ${#FAILS[@]} -eq 0 ]; then
    t=$(now)
    # From / with stdin on /dev/null, as systemd runs it: the plugin inherits
    # crowdsec's cwd, stdin and environment.
    (cd / && exec crowdsec -c "$CONFIG" -no-cs) </dev/null >"$LOGS/crowdsec.stdout" 2>&1 &
    CS_PID=$!
    say "crowdsec -no-cs started, pid $CS_PID"
    if wait_for 30 port_open "$PORT"; then
        timing lapi_up "$(ms_since "$t")"
        say "LAPI listening on 127.0.0.1:$PORT ($(ms_since "$t") ms)"
    elif alive "$CS_PID"; then
        fail "LAPI not listening on 127.0.0.1:$PORT after 30 s"
    else
        wait "$CS_PID"; fail "crowdsec exited (status $?) before its LAPI listened"
    fi
fi

if [ ${#FAILS[@]} -eq 0 ]; then
    mapfile -t PLUGIN_PIDS < <(children "$CS_PID")
    if [ ${#PLUGIN_PIDS[@]} -eq 0 ]; then
        fail "crowdsec has no child process: the plugin is not running"
    else
        for p in "${PLUGIN_PIDS[@]}"; do
            st=$(awk '/^Uid:/ {u=$2} /^Gid:/ {g=$2} END {print u":"g}' "/proc/$p/status" 2>/dev/null)
            say "plugin process pid $p uid:gid $st exe $(readlink "/proc/$p/exe" 2>/dev/null)"
            [ "$st" = "$PUID:$PGID" ] || fail "plugin pid $p runs as $st, expected $PUID:$PGID"
        done
    fi
fi

if [ ${#FAILS[@]} -eq 0 ]; then
    t=$(now)
    if ! out=$(timeout 30 cscli -c "$CONFIG" decisions add --ip "$IP" \
            --duration 1h --reason "rpcplugin harness" 2>&1); then
        fail "cscli decisions add failed: $out"
    else
        timing decision_add "$(ms_since "$t")"
        say "cscli decisions add --ip $IP: $(echo "$out" | tail -n 1 | sed 's/.*msg=//') ($(ms_since "$t") ms)"
        t=$(now)
    fi
fi

has_all() {
    local e
    [ -f "$OUTFILE" ] || return 1
    for e in "${EXPECTED[@]}"; do grep -qF -- "$e" "$OUTFILE" || return 1; done
}
if [ ${#FAILS[@]} -eq 0 ]; then
    if wait_for "$TIMEOUT" has_all; then
        timing delivery "$(ms_since "$t")"
        say "delivered: output file holds ${EXPECTED[*]} ($(ms_since "$t") ms after cscli decisions add returned)"
    else
        fail "no delivery within ${TIMEOUT} s: $OUTFILE $( [ -f "$OUTFILE" ] && echo "lacks some of: ${EXPECTED[*]}" || echo "was never created")"
    fi
fi

# ---------------------------------------------------------------- stop
# On SIGTERM crowdsec 1.4.6 kills its plugin tomb but returns from main as
# soon as the API server is down, without waiting for the broker's Kill():
# depending on the race, the plugin gets GRPCController/Shutdown ("killing
# all plugins") or is orphaned. An orphan must then go away by itself (it
# notices its parent is gone) or on SIGTERM, which is what systemd's
# KillMode=control-group sends it when the crowdsec unit stops.
PLUGIN_END=
if alive "$CS_PID"; then
    [ ${#PLUGIN_PIDS[@]} -gt 0 ] || mapfile -t PLUGIN_PIDS < <(children "$CS_PID")
    t=$(now)
    kill -TERM "$CS_PID"
    if wait_for 20 none_alive "$CS_PID"; then
        wait "$CS_PID"; rc=$?
        timing crowdsec_stop "$(ms_since "$t")"
        say "crowdsec exited with status $rc after SIGTERM ($(ms_since "$t") ms)"
        [ $rc -eq 0 ] || fail "crowdsec exited with status $rc after SIGTERM"
    else
        fail "crowdsec still running 20 s after SIGTERM"
        kill -KILL "$CS_PID" 2>/dev/null; wait "$CS_PID" 2>/dev/null
    fi
    if [ ${#PLUGIN_PIDS[@]} -gt 0 ]; then
        killed_by_cs=0
        grep -q 'msg="killing all plugins"' "$LOGS/crowdsec.log" 2>/dev/null && killed_by_cs=1
        if wait_for 5 none_alive "${PLUGIN_PIDS[@]}"; then
            timing plugin_gone "$(ms_since "$t")"
            if [ $killed_by_cs = 1 ]; then PLUGIN_END=killing-all-plugins; else PLUGIN_END=orphan-exited-by-itself; fi
            say "plugin process(es) ${PLUGIN_PIDS[*]} gone ($(ms_since "$t") ms after SIGTERM; $( [ $killed_by_cs = 1 ] \
                && echo "crowdsec logged 'killing all plugins'" || echo "orphaned by crowdsec, exited by itself"))"
        else
            left=$(for p in "${PLUGIN_PIDS[@]}"; do alive "$p" && echo -n "$p "; done)
            say "plugin process(es) $left outlived crowdsec by 5 s (crowdsec 1.4.6 exits without waiting for its plugin broker); sending SIGTERM as systemd would"
            t2=$(now)
            # shellcheck disable=SC2086
            kill -TERM $left 2>/dev/null
            if wait_for 5 none_alive $left; then
                PLUGIN_END=sigterm
                timing plugin_sigterm "$(ms_since "$t2")"
                say "plugin process(es) exited on SIGTERM ($(ms_since "$t2") ms)"
            else
                fail "plugin process(es) $left still running 5 s after SIGTERM"
            fi
        fi
    fi
fi

# ---------------------------------------------------------------- logs
# Lines at level error/fatal/panic are failures, except crowdsec's own
# complaint that no systemd is there to notify (daemonize: true).
ALLOW='Failed to notify\(sent: false\)'
for f in "$LOGS/config_test.log" "$LOGS/crowdsec.log" "$LOGS"/crowdsec_api.log "$LOGS/crowdsec.stdout" "$LOGS/config_test.stdout"; do
    [ -f "$f" ] || continue
    bad=$(grep -E 'level=(error|fatal|panic)|^panic:|plugin failed to exit gracefully' "$f" | grep -Ev "$ALLOW")
    [ -z "$bad" ] || fail "errors in ${f##*/}: $(echo "$bad" | head -n 5)"
done

# ---------------------------------------------------------------- verdict
TOTAL=$(ms_since "$T0")
if [ ${#FAILS[@]} -eq 0 ]; then
    [ "$QUIET" = 1 ] || { echo "--- output file ($OUTFILE):"; cat "$OUTFILE"; }
    echo "PASS: crowdsec $(crowdsec -version 2>&1 | sed -n 's/.*version: //p' | head -n 1) delivered an alert to $(basename "$PLUGIN_SRC") as notification-$TYPE; run's plugin ended by ${PLUGIN_END:-?} [${TIMINGS[*]} total=${TOTAL}ms]"
    exit 0
fi
echo "--- last lines of the logs in $LOGS:"
for f in "$LOGS"/*; do
    [ -f "$f" ] || continue
    echo "==> ${f##*/}"; tail -n 40 "$f"
done
[ -f "$OUTFILE" ] && { echo "==> output file"; tail -n 20 "$OUTFILE"; }
echo "FAIL: ${#FAILS[@]} problem(s): ${FAILS[0]} [${TIMINGS[*]} total=${TOTAL}ms]"
exit 1
