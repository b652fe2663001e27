#!/usr/bin/env bash
# Soak (issue 11; a named command, not part of tests/run.sh): rpcplugin-host
# serves all four services (stdio: drop_oldest, as manifests/host.json) with
# a child that writes about 200 lines/s, while a Python grpcio client keeps
# a mixed load on it until the deadline:
#   - Health/Check on a long-lived connection,
#   - one long-lived StreamStdio reader (the child's output, as go-plugin
#     reads it) and short-lived StreamStdio streams that read a few lines
#     and leave,
#   - StartStream streams of knock/close pairs to a live gRPC server on a
#     unix socket (50 pairs a stream, then half-close),
#   - connections opened, used for one Health/Check and closed.
# Every few seconds it samples the host's VmRSS, open descriptors
# (/proc/PID/fd) and threads (/proc/PID/status) into a CSV.  At the end it
# compares the median of the last 10% of the samples with the median of the
# samples taken at 10-20% of the run (after warm-up) and fails (exit 1) if
# RSS grew by more than max(2 MiB, 10%), or descriptors or threads by more
# than 2; any unexpected RPC error fails it too.  It prints one summary line.
#
#   scripts/soak.sh [--seconds N] [--interval S] [--csv PATH]
#                   [--rss-slack-kib K] [--rss-slack-pct P] [--fd-slack N]
#                   [--thread-slack N]
#
# Needs only what scripts/install-deps.sh installs (python3-grpcio,
# python3-protobuf) and the build in $RP_BUILD (default build/; built here
# if rpcplugin-host is missing).  Talks only to unix sockets.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${RP_BUILD:-$ROOT/build}
SECONDS_=600
INTERVAL=3
CSV=
RSS_SLACK_KIB=2048
RSS_SLACK_PCT=10
FD_SLACK=2
THREAD_SLACK=2
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_=$2; shift 2 ;;
    --interval) INTERVAL=$2; shift 2 ;;
    --csv) CSV=$2; shift 2 ;;
    --rss-slack-kib) RSS_SLACK_KIB=$2; shift 2 ;;
    --rss-slack-pct) RSS_SLACK_PCT=$2; shift 2 ;;
    --fd-slack) FD_SLACK=$2; shift 2 ;;
    --thread-slack) THREAD_SLACK=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "soak: unknown option $1 (--help lists them)" >&2; exit 2 ;;
  esac
done
case "$SECONDS_$INTERVAL" in *[!0-9.]*|'') echo "soak: --seconds and --interval take numbers" >&2; exit 2 ;; esac
if [ ! -x "$BUILD/bin/rpcplugin-host" ] || [ ! -f "$BUILD/py/health_pb2.py" ]; then
  echo "soak: building into $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DRPCPLUGIN_BENCH=OFF >/dev/null
  cmake --build "$BUILD" -j"$(nproc)" >/dev/null
fi
if [ -z "$CSV" ]; then
  mkdir -p "$BUILD/soak"
  CSV=$BUILD/soak/soak-$(date +%Y%m%d-%H%M%S).csv
fi
exec /usr/bin/python3 - "$BUILD" "$SECONDS_" "$INTERVAL" "$CSV" \
  "$RSS_SLACK_KIB" "$RSS_SLACK_PCT" "$FD_SLACK" "$THREAD_SLACK" <<'PY'
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

BUILD, SECONDS, INTERVAL, CSV = (sys.argv[1], float(sys.argv[2]),
                                 float(sys.argv[3]), sys.argv[4])
RSS_SLACK_KIB, RSS_SLACK_PCT, FD_SLACK, THREAD_SLACK = (
    int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8]))
sys.path.insert(0, os.path.join(BUILD, "py"))
import grpc  # noqa: E402
from google.protobuf import empty_pb2  # noqa: E402
import grpc_broker_pb2  # noqa: E402
import grpc_controller_pb2  # noqa: E402
import grpc_stdio_pb2  # noqa: E402
import health_pb2  # noqa: E402

ConnInfo = grpc_broker_pb2.ConnInfo
Knock = ConnInfo.Knock
COOKIE = ("RPCPLUGIN_SOAK_COOKIE", "soak")

# The child: numbered lines, 2 every 10 ms (about 200 lines/s), until the
# host ends it (bounded anyway).
CHILD = r"""
import sys, time
end = time.monotonic() + %d
i = 0
while time.monotonic() < end:
    sys.stdout.write("soak line %%09d ............................................\n" %% i)
    sys.stdout.write("soak line %%09d ............................................\n" %% (i + 1))
    sys.stdout.flush()
    i += 2
    time.sleep(0.01)
""" % int(SECONDS + 120)

tmp = tempfile.mkdtemp(prefix="rp-soak-")
manifest = os.path.join(tmp, "soak.json")
with open(manifest, "w") as f:
    f.write("""{"manifest_version": 1, "name": "soak",
 "module": "rpcplugin_services.so", "abi_version": "1.0",
 "protocol_version": 1,
 "services": ["plugin.GRPCBroker", "plugin.GRPCStdio",
              "plugin.GRPCController", "grpc.health.v1.Health"],
 "config": {"stdio": {"overflow": "drop_oldest", "flush_deadline_ms": 500}}}
""")
os.chmod(manifest, 0o644)
env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGIN_")}
env.update({COOKIE[0]: COOKIE[1], "PLUGIN_PROTOCOL_VERSIONS": "1",
            "PLUGIN_UNIX_SOCKET_DIR": tmp,
            "RPCPLUGIN_MODULE_PATH": os.path.join(BUILD, "lib")})
stderr_path = os.path.join(tmp, "host.stderr")
host = subprocess.Popen(
    [os.path.join(BUILD, "bin", "rpcplugin-host"),
     "--magic-cookie=%s=%s" % COOKIE, manifest, "--",
     sys.executable, "-c", CHILD],
    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
    stderr=open(stderr_path, "w"), env=env, text=True)


def die(msg):
    print("soak: FAIL: " + msg, flush=True)
    if host.poll() is None:
        host.kill()
        host.wait()
    print("soak: host stderr in " + stderr_path, flush=True)
    sys.exit(1)


line = host.stdout.readline().strip()
parts = line.split("|")
if len(parts) < 5 or parts[2] != "unix":
    die("no handshake line from rpcplugin-host: %r" % line)
TARGET = "unix:" + parts[3]
PID = host.pid

# A live gRPC server on a unix socket: the knocks' target.
knock_path = os.path.join(tmp, "target.sock")
target = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
target.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "grpc.health.v1.Health",
    {"Check": grpc.unary_unary_rpc_method_handler(
        lambda req, ctx: health_pb2.HealthCheckResponse(status=1),
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString)}),))
target.add_insecure_port("unix:" + knock_path)
target.start()


def health(ch, timeout=10):
    return ch.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString)(
            health_pb2.HealthCheckRequest(), timeout=timeout).status


def stdio(ch, timeout):
    return ch.unary_stream(
        "/plugin.GRPCStdio/StreamStdio",
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=grpc_stdio_pb2.StdioData.FromString)(
            empty_pb2.Empty(), timeout=timeout)


stop = threading.Event()
deadline = time.monotonic() + SECONDS
lock = threading.Lock()
count = {"health": 0, "stdio_lines": 0, "stdio_streams": 0,
         "knock_pairs": 0, "broker_streams": 0, "connections": 0}
errors = []


def bump(key, n=1):
    with lock:
        count[key] += n


def error(what):
    with lock:
        errors.append("%.1f s: %s" % (SECONDS - (deadline - time.monotonic()),
                                      what))
    stop.set()


def loop_health():
    ch = grpc.insecure_channel(TARGET)
    while not stop.is_set():
        try:
            if health(ch) != health_pb2.HealthCheckResponse.SERVING:
                error("Health not SERVING")
            bump("health")
        except grpc.RpcError as e:
            error("Health: %s" % e.code())
        stop.wait(0.02)
    ch.close()


def loop_stdio_reader():
    """The long-lived reader (go-plugin's): reads the child's output until
    the deadline, then cancels."""
    ch = grpc.insecure_channel(TARGET)
    call = stdio(ch, SECONDS + 60)
    stopper = threading.Thread(target=lambda: (stop.wait(), call.cancel()),
                               daemon=True)
    stopper.start()
    try:
        for m in call:
            bump("stdio_lines", m.data.count(b"\n"))
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED or not stop.is_set():
            error("StreamStdio (long-lived): %s %s" % (e.code(), e.details()))
    else:
        if not stop.is_set():
            error("StreamStdio (long-lived) ended early")
    ch.close()


def loop_stdio_churn():
    """Short-lived streams: open, read up to 5 messages, leave."""
    while not stop.is_set():
        ch = grpc.insecure_channel(TARGET)
        call = stdio(ch, 10)
        try:
            for k, m in enumerate(call):
                bump("stdio_lines", m.data.count(b"\n"))
                if k == 4:
                    break
            bump("stdio_streams")
        except grpc.RpcError as e:
            error("StreamStdio (short): %s %s" % (e.code(), e.details()))
        call.cancel()
        ch.close()
        stop.wait(0.5)


class Requests:
    _END = object()

    def __init__(self):
        self.q = queue.Queue()

    def __iter__(self):
        while True:
            item = self.q.get()
            if item is self._END:
                return
            yield item


def loop_broker():
    """StartStream: 50 knock/close pairs (each waits for its ack), then
    half-close and expect OK; a new stream each time, one connection."""
    ch = grpc.insecure_channel(TARGET)
    method = ch.stream_stream(
        "/plugin.GRPCBroker/StartStream",
        request_serializer=ConnInfo.SerializeToString,
        response_deserializer=ConnInfo.FromString)
    sid = 0
    while not stop.is_set():
        reqs = Requests()
        call = method(iter(reqs), timeout=120)
        replies = iter(call)
        try:
            for _ in range(50):
                if stop.is_set():
                    break
                sid = sid % 1000000 + 1
                reqs.q.put(ConnInfo(service_id=sid, network="unix",
                                    address=knock_path,
                                    knock=Knock(knock=True)))
                r = next(replies)
                if not (r.service_id == sid and r.knock.ack and
                        r.knock.knock and not r.knock.error):
                    error("knock %d: %s" % (sid, r))
                    break
                reqs.q.put(ConnInfo(service_id=sid, knock=Knock(knock=False)))
                r = next(replies)
                if not (r.service_id == sid and r.knock.ack and
                        not r.knock.knock and not r.knock.error):
                    error("close %d: %s" % (sid, r))
                    break
                bump("knock_pairs")
                stop.wait(0.01)
            reqs.q.put(Requests._END)
            rest = list(replies)
            if rest:
                error("broker: unexpected replies %r" % rest)
            if call.code() != grpc.StatusCode.OK:
                error("broker stream ended %s" % call.code())
            bump("broker_streams")
        except (grpc.RpcError, StopIteration) as e:
            reqs.q.put(Requests._END)
            error("broker stream: %r" % (e,))
    ch.close()


def loop_connections():
    while not stop.is_set():
        ch = grpc.insecure_channel(TARGET)
        try:
            if health(ch) != health_pb2.HealthCheckResponse.SERVING:
                error("Health (new connection) not SERVING")
            bump("connections")
        except grpc.RpcError as e:
            error("Health (new connection): %s" % e.code())
        ch.close()
        stop.wait(0.1)


def proc_status():
    out = {}
    with open("/proc/%d/status" % PID) as f:
        for ln in f:
            k, _, v = ln.partition(":")
            if k in ("VmRSS", "Threads"):
                out[k] = int(v.split()[0])
    out["fds"] = len(os.listdir("/proc/%d/fd" % PID))
    return out


samples = []   # (t, rss_kib, fds, threads)
t0 = time.monotonic()
csvf = open(CSV, "w")
csvf.write("t_s,rss_kib,fds,threads,health,stdio_lines,stdio_streams,"
           "knock_pairs,broker_streams,connections\n")


def sample():
    st = proc_status()
    t = time.monotonic() - t0
    with lock:
        c = dict(count)
    samples.append((t, st["VmRSS"], st["fds"], st["Threads"]))
    csvf.write("%.1f,%d,%d,%d,%d,%d,%d,%d,%d,%d\n" % (
        t, st["VmRSS"], st["fds"], st["Threads"], c["health"],
        c["stdio_lines"], c["stdio_streams"], c["knock_pairs"],
        c["broker_streams"], c["connections"]))
    csvf.flush()


loops = [threading.Thread(target=f, daemon=True) for f in (
    loop_health, loop_stdio_reader, loop_stdio_churn, loop_broker,
    loop_connections)]
for t in loops:
    t.start()
print("soak: %d s against pid %d (%s), sampling every %g s into %s" % (
    SECONDS, PID, TARGET, INTERVAL, CSV), flush=True)
while True:
    if host.poll() is not None:
        error("rpcplugin-host exited with %s" % host.returncode)
        break
    sample()
    left = deadline - time.monotonic()
    if left <= 0 or stop.is_set():
        break
    stop.wait(min(INTERVAL, left))
stop.set()
for t in loops:
    t.join(60)
    if t.is_alive():
        errors.append("a load loop did not stop: %s" % t.name)
lines_read = count["stdio_lines"]
# The host still serves after the soak: Health, then Shutdown, exit 0.
if host.poll() is None:
    ch = grpc.insecure_channel(TARGET)
    try:
        if health(ch) != health_pb2.HealthCheckResponse.SERVING:
            errors.append("Health after the soak not SERVING")
        ch.unary_unary(
            "/plugin.GRPCController/Shutdown",
            request_serializer=grpc_controller_pb2.Empty.SerializeToString,
            response_deserializer=grpc_controller_pb2.Empty.FromString)(
                grpc_controller_pb2.Empty(), timeout=30)
    except grpc.RpcError as e:
        errors.append("after the soak: %s %s" % (e.code(), e.details()))
    ch.close()
    try:
        rc = host.wait(30)
        if rc != 0:
            errors.append("rpcplugin-host exited %d after Shutdown" % rc)
    except subprocess.TimeoutExpired:
        errors.append("rpcplugin-host still running 30 s after Shutdown")
target.stop(None)
csvf.close()

if errors:
    die("; ".join(errors[:5]))
n = len(samples)
warm = [s for s in samples if 0.1 * SECONDS <= s[0] < 0.2 * SECONDS]
end = [s for s in samples if s[0] >= 0.9 * SECONDS]
if len(warm) < 2 or len(end) < 2:
    die("too few samples (%d warm, %d at the end): a longer --seconds or "
        "a shorter --interval" % (len(warm), len(end)))


def med(rows, k):
    return statistics.median(r[k] for r in rows)


rss_w, rss_e = med(warm, 1), med(end, 1)
fds_w, fds_e = med(warm, 2), med(end, 2)
thr_w, thr_e = med(warm, 3), med(end, 3)
rss_allow = max(RSS_SLACK_KIB, rss_w * RSS_SLACK_PCT / 100.0)
problems = []
if rss_e - rss_w > rss_allow:
    problems.append("RSS grew %d KiB (%d -> %d KiB; allowed %d)" % (
        rss_e - rss_w, rss_w, rss_e, rss_allow))
if fds_e - fds_w > FD_SLACK:
    problems.append("descriptors grew %g -> %g (allowed +%d)" % (
        fds_w, fds_e, FD_SLACK))
if thr_e - thr_w > THREAD_SLACK:
    problems.append("threads grew %g -> %g (allowed +%d)" % (
        thr_w, thr_e, THREAD_SLACK))
requests = (count["health"] + count["stdio_streams"] + 1 +
            count["knock_pairs"] * 2 + count["connections"])
summary = ("%.0f s, %d samples; served %d requests (health %d, "
           "new connections %d, knock/close pairs %d on %d broker streams, "
           "stdio lines %d on %d streams); RSS first %d, warm %d, end %d KiB "
           "(peak sampled %d); fds warm %g end %g; threads warm %g end %g; "
           "csv %s" % (
               samples[-1][0], n, requests, count["health"],
               count["connections"], count["knock_pairs"],
               count["broker_streams"], lines_read,
               count["stdio_streams"] + 1, samples[0][1], rss_w, rss_e,
               max(s[1] for s in samples), fds_w, fds_e, thr_w, thr_e, CSV))
shutil.rmtree(tmp, ignore_errors=True)
if problems:
    print("soak: FAIL: " + "; ".join(problems) + " -- " + summary)
    sys.exit(1)
print("soak: PASS " + summary)
PY
