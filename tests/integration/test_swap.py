"""Live swap (rpcplugin_module_swap, rpcplugin-host SIGHUP): a client keeps
a StreamStdio stream, a GRPCBroker stream, health checks and calls to the kv
example going while the host swaps implementations, each SIGHUP both the
application module (kv.so <-> kv-atomic.so) and the infrastructure module
(rpcplugin_services.so <-> rpcplugin_recorder.so).  Asserted: no call
fails, every stdio line arrives exactly once and in order, the same broker
stream still answers, the values written before a swap are read after it,
and the old files are unmapped (dlclosed) once swapped out.  A failed swap
(a manifest that does not parse, a module of another ABI major) keeps the
old implementation serving and says why."""
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest

from conftest import BUILD, SLOW, start_stream
from hostutil import PluginHost, Stdio, HOST_MANIFEST, wait_until
import grpc_broker_pb2

KV_DIR = os.path.join(BUILD, "examples", "kv")
KV = os.path.join(KV_DIR, "kv.json")
KV_ATOMIC = os.path.join(KV_DIR, "kv-atomic.json")
SWAPS = int(os.environ.get("RP_SWAPS", "100"))

# The child prints numbered lines until the file STOP appears (at most
# 120 s), then "done N" with the count.
CHILD = r"""
import os, sys, time
stop, i, t0 = sys.argv[1], 0, time.monotonic()
while not os.path.exists(stop) and time.monotonic() - t0 < 120:
    sys.stdout.write("line %d\n" % i)
    sys.stdout.flush()
    i += 1
    time.sleep(0.001)
sys.stdout.write("done %d\n" % i)
sys.stdout.flush()
"""


def pb_string(field, data):
    """A length-delimited protobuf field (short values only)."""
    assert len(data) < 128
    return bytes([field << 3 | 2, len(data)]) + data


def kv_put(ch, key, value):
    return ch.unary_unary("/proto.KV/Put")(
        pb_string(1, key) + pb_string(2, value), timeout=10 * SLOW)


def kv_get(ch, key):
    resp = ch.unary_unary("/proto.KV/Get")(pb_string(1, key),
                                            timeout=10 * SLOW)
    assert resp[0] == 0x0a
    return resp[2:2 + resp[1]]


def mapped(pid):
    with open("/proc/%d/maps" % pid) as f:
        return f.read()


def shutdown_cleanly(host, ch, stdio):
    """Shutdown through the controller: the stdio stream ends OK and the
    host exits 0."""
    assert host.shutdown(ch) is not None
    assert stdio.wait_end(timeout=30) == grpc.StatusCode.OK
    assert host.wait(30) == 0


class Traffic(threading.Thread):
    """Health checks and kv Put/Get in a loop, every failure recorded, with
    the longest call seen."""

    def __init__(self, host, ch):
        super().__init__(daemon=True)
        self.host, self.ch = host, ch
        self.stop = threading.Event()
        self.failures = []
        self.calls = 0
        self.longest = 0.0

    def run(self):
        i = 0
        while not self.stop.is_set():
            key = b"k%d" % (i % 8)
            val = b"v%d" % i
            t0 = time.monotonic()
            try:
                assert self.host.health(self.ch) == 1  # SERVING
                kv_put(self.ch, key, val)
                got = kv_get(self.ch, key)
                if not got.startswith(val):
                    self.failures.append("get %r: %r" % (key, got))
            except Exception as e:  # any failure is a test failure
                self.failures.append(repr(e))
            self.longest = max(self.longest, time.monotonic() - t0)
            self.calls += 1
            i += 1


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="rp-swap-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_swaps_under_traffic(workdir):
    stop = os.path.join(workdir, "STOP")
    host = PluginHost(
        manifest=KV, cwd=workdir,
        options=["--swap-to", KV_ATOMIC, "--no-exit-with-child"],
        command=["/usr/bin/python3", "-c", CHILD, stop])
    try:
        ch = host.channel()
        stdio = Stdio(ch, timeout=600)
        stdio.wait_contains(1, b"line 10\n", timeout=30)
        # The broker stream: a message it must answer (service_id 0 is an
        # error reply), before, during and after the swaps.
        sendq = queue.Queue()
        replies = queue.Queue()
        bcall = start_stream(ch)(iter(sendq.get, None), timeout=600 * SLOW)

        def read_broker():
            try:
                for m in bcall:
                    replies.put(m)
            except grpc.RpcError as e:
                replies.put(e)
        threading.Thread(target=read_broker, daemon=True).start()

        def broker_answers():
            sendq.put(grpc_broker_pb2.ConnInfo(service_id=0))
            r = replies.get(timeout=10 * SLOW)
            assert isinstance(r, grpc_broker_pb2.ConnInfo), r
            assert "not valid" in r.knock.error, r

        broker_answers()
        kv_put(ch, b"before", b"swap")
        traffic = Traffic(host, ch)
        traffic.start()
        pid = host.proc.pid
        for i in range(1, SWAPS + 1):
            host.signal(signal.SIGHUP)
            # Host messages go to the client as the plugin's stderr.
            stdio.wait_contains(2, b"swap %d to " % i, timeout=30)
            text = bytes(stdio.data[2]).decode()
            line = [ln for ln in text.splitlines()
                    if "swap %d to " % i in ln][-1]
            assert ": ok in " in line and "streams handed over" in line, line
            if i % 10 == 0:
                broker_answers()
            # Calls between every two swaps: wait for the next loop.
            seen = traffic.calls
            wait_until(lambda: traffic.calls > seen or traffic.failures, 10,
                       "a call loop after swap %d" % i)
        maps = mapped(pid)
        traffic.stop.set()
        traffic.join(30 * SLOW)
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.calls >= SWAPS, traffic.calls
        assert kv_get(ch, b"before").startswith(b"swap")
        broker_answers()
        # After an even number of swaps kv.so and rpcplugin_services.so
        # serve; the other two are unmapped.
        if SWAPS % 2 == 0:
            assert "kv-atomic.so" not in maps and "rpcplugin_recorder.so" \
                not in maps, maps
        # Every line exactly once, in order.
        open(stop, "w").close()
        stdio.wait_for(lambda s: re.search(rb"done \d+\n", s.data[1]),
                       timeout=60, what="the child's last line")
        out = bytes(stdio.data[1]).decode()
        n = int(re.search(r"done (\d+)\n", out).group(1))
        assert out == "".join("line %d\n" % j for j in range(n)) + \
            "done %d\n" % n, "lines lost, duplicated or reordered"
        assert n > SWAPS
        sendq.put(None)
        shutdown_cleanly(host, ch, stdio)
        text = bytes(stdio.data[2]).decode()
        times = [float(x) for x in re.findall(r": ok in ([0-9.]+) ms", text)]
        assert len(times) == SWAPS
        times.sort()
        sys.stderr.write("swaps: %d, p50 %.3f ms, p99 %.3f ms; longest "
                         "call loop %.1f ms over %d loops\n" % (
                             SWAPS, times[len(times) // 2],
                             times[int(len(times) * 0.99) - 1],
                             traffic.longest * 1e3, traffic.calls))
    finally:
        host.close()


def test_failed_swap_keeps_serving(workdir):
    bad = os.path.join(workdir, "bad.json")
    with open(bad, "w") as f:
        f.write('{"manifest_version": 1, "name": "x"')  # cut short
    host = PluginHost(manifest=HOST_MANIFEST, options=["--swap-to", bad],
                      wait_handshake=False)
    try:
        # A --swap-to that does not parse is refused at start.
        assert host.wait(10) == 1
        assert "--swap-to" in host.stderr() and "bad.json" in host.stderr()
    finally:
        host.close()
    good = os.path.join(workdir, "good.json")
    shutil.copy(HOST_MANIFEST.replace("host.json", "host-recorder.json"),
                good)
    with open(good) as f:
        text = f.read()
    host = PluginHost(manifest=HOST_MANIFEST, options=["--swap-to", good])
    try:
        ch = host.channel()
        stdio = Stdio(ch, timeout=120)
        # Now break it on disk: the next SIGHUP reads it again and fails.
        with open(good, "w") as f:
            f.write(text.replace('"abi_version": "1.0"',
                                 '"abi_version": "2.0"'))
        host.signal(signal.SIGHUP)
        stdio.wait_contains(2, b"failed after", timeout=30)
        err = bytes(stdio.data[2]).decode()
        assert "good.json" in err and "abi_version" in err, err
        assert "still serving" in err and "rpcplugin_services.so" in err
        assert host.health(ch) == 1
        assert stdio.status is None  # the stream is still open
        # Fixed again: the swap goes through, the stream stays.
        with open(good, "w") as f:
            f.write(text)
        host.signal(signal.SIGHUP)
        stdio.wait_contains(2, b"swap 1 to", timeout=30)
        assert "ok in" in bytes(stdio.data[2]).decode()
        assert host.health(ch) == 1
        assert "rpcplugin_recorder.so" in mapped(host.proc.pid)
        assert stdio.status is None
        shutdown_cleanly(host, ch, stdio)
    finally:
        host.close()


def test_reload_picks_up_a_rebuilt_module(workdir):
    """SIGHUP without --swap-to reloads MANIFEST: the same file again is
    loaded from a private copy (glibc would hand back the loaded one), and
    a module rebuilt at the same path (a new file renamed over it, as a
    linker does) is the one that serves after the swap."""
    lib = os.path.join(BUILD, "lib")
    mod = os.path.join(workdir, "m.so")
    shutil.copy(os.path.join(lib, "rpcplugin_services.so"), mod)
    with open(HOST_MANIFEST) as f:
        text = f.read().replace('"rpcplugin_services.so"', '"m.so"')
    man = os.path.join(workdir, "m.json")
    with open(man, "w") as f:
        f.write(text)
    host = PluginHost(manifest=man, options=["-v"])
    try:
        ch = host.channel()
        stdio = Stdio(ch, timeout=120)
        host.signal(signal.SIGHUP)
        stdio.wait_contains(2, b"swap 1 to", timeout=30)
        assert "ok in" in bytes(stdio.data[2]).decode()
        assert "memfd:rpcplugin-module" in mapped(host.proc.pid)
        assert host.health(ch) == 1
        assert b"rpcplugin-recorder: call" not in stdio.data[2]
        # "Rebuilt": the recorder build, renamed over m.so.
        shutil.copy(os.path.join(lib, "rpcplugin_recorder.so"), mod + ".new")
        os.rename(mod + ".new", mod)
        host.signal(signal.SIGHUP)
        stdio.wait_contains(2, b"swap 2 to", timeout=30)
        assert host.health(ch) == 1
        stdio.wait_contains(
            2, b"rpcplugin-recorder: call /grpc.health.v1.Health/Check",
            timeout=10)
        assert stdio.status is None
        shutdown_cleanly(host, ch, stdio)
    finally:
        host.close()


GO_BIN = os.environ.get("RP_GO_BIN")


def children(pid):
    """PIDs whose parent is pid."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


@pytest.mark.skipif(not GO_BIN, reason="RP_GO_BIN is not set: build tests/go")
def test_swaps_under_go_plugin_client(workdir):
    """go-plugin v1.0.1's own client (gpkv bench: Put calls from two
    goroutines on one dispensed client) while the plugin swaps kv.so <->
    kv-atomic.so and the infrastructure module with each SIGHUP: no call
    fails, and the value is read back at the end."""
    from hostutil import HOST_BIN
    stop = os.path.join(workdir, "STOP")
    plugin = "exec %s --magic-cookie BASIC_PLUGIN=hello --swap-to %s %s" % (
        HOST_BIN, KV_ATOMIC, KV)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGIN_")}
    env["TMPDIR"] = workdir
    argv = [os.path.join(GO_BIN, "gpkv"), "--timeout", "%ds" % (10 * SLOW),
            "--plugin", plugin, "bench", "--n", "10000000",
            "--concurrency", "2", "--size", "16", "--stop-file", stop]
    gp = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    try:
        kids = []
        wait_until(lambda: kids.extend(children(gp.pid)) or kids, 30,
                   "the plugin process")
        pid = kids[0]
        # Each Put rewrites kv_bench<goroutine> in workdir: a new
        # modification time is a call served.
        value = os.path.join(workdir, "kv_bench0")

        def stamp():
            try:
                return os.stat(value).st_mtime_ns
            except FileNotFoundError:
                return None

        wait_until(lambda: stamp() is not None, 30, "the first Put")
        swaps = int(os.environ.get("RP_GO_SWAPS", "50"))
        for i in range(1, swaps + 1):
            assert gp.poll() is None, gp.communicate()
            os.kill(pid, signal.SIGHUP)
            want, gone = ("kv-atomic.so", "/kv.so") if i % 2 else \
                ("/kv.so", "kv-atomic.so")
            wait_until(lambda: want in mapped(pid) and
                       gone not in mapped(pid), 30,
                       "swap %d: %s in, %s out" % (i, want, gone))
            # A call served by the new implementation before the next swap.
            seen = stamp()
            wait_until(lambda: stamp() != seen, 30,
                       "a Put after swap %d" % i)
        open(stop, "w").close()
        out, err = gp.communicate(timeout=60 * SLOW)
        assert gp.returncode == 0, err.decode()
        res = json.loads(out.decode().strip().splitlines()[-1])
        assert res["n"] > swaps, res
        sys.stderr.write("go client during %d swaps: %d Put calls, p50 %.0f "
                         "us, p99 %.0f us, max %.0f us\n" % (
                             swaps, res["n"], res["p50_us"], res["p99_us"],
                             res["max_us"]))
    finally:
        if gp.poll() is None:
            gp.kill()
            gp.wait()
