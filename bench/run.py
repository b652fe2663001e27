#!/usr/bin/python3
"""Run every benchmark of docs/benchmarks.md with its anchors in the same run.

    run.py [--quick] [--reps N] [--only W1,W4,...] BUILD_DIR

bench/run.sh builds BUILD_DIR and calls this.  Prints one table and writes
the raw figures to BUILD_DIR/bench/results.json (and ratios.png when
Debian's python3-matplotlib is installed).  Every figure comes from this
run; cases of one workload are interleaved repetition by repetition, so
slow phases of a shared machine hit every server alike, and each ratio is
computed per repetition (paired) as well as from the medians.

--quick runs reduced sizes (CI smoke, well under two minutes) and asserts
nothing about speed.
"""
import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


# ----------------------------------------------------------- processes

class Proc:
    """A child speaking the line protocol; every read has a timeout."""

    def __init__(self, argv, name, logdir, env=None, stdin=True):
        self.name = name
        self.argv = argv
        self.err_path = os.path.join(logdir, name + ".stderr")
        self.err = open(self.err_path, "w")
        self.p = subprocess.Popen(
            argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=self.err, text=True, bufsize=1,
            env=env)
        self.lines = queue.Queue()
        self.t_spawn = time.monotonic_ns()
        self.last_t = None
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.put((time.monotonic_ns(), line.rstrip("\n")))
        self.lines.put((time.monotonic_ns(), None))

    def send(self, text):
        try:
            self.p.stdin.write(text + "\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def expect(self, prefix, timeout):
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise BenchError("%s: no %r within %ss" % (self.name, prefix,
                                                          timeout))
            try:
                self.last_t, line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise BenchError("%s exited before %r (see %s)" % (
                    self.name, prefix, self.err_path))
            if line.startswith("ERR") or line.startswith("FAIL "):
                raise BenchError("%s: %s" % (self.name, line))
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def json(self, prefix, timeout):
        return json.loads(self.expect(prefix, timeout))

    def finish(self, timeout=20):
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.err.close()
        return self.p.returncode

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        if not self.err.closed:
            self.err.close()


class BenchError(Exception):
    pass


class Server(Proc):
    def __init__(self, argv, name, logdir, env=None):
        Proc.__init__(self, argv, name, logdir, env)
        words = self.expect("LISTEN", 30).split()
        self.addr, self.pid = words[0], int(words[1])

    def stats(self):
        self.send("STATS")
        return self.json("STATS", 30)

    def stop(self, timeout=30):
        self.send("STOP")
        bye = self.json("BYE", timeout)
        self.finish()
        return bye


# ------------------------------------------------------ W8's client

# W8's child: numbered lines on stdout, about one per millisecond, until
# the file argv[1] exists (at most 900 s), then "done N".
W8_CHILD = r"""
import os, sys, time
stop, i, t0 = sys.argv[1], 0, time.monotonic()
while not os.path.exists(stop) and time.monotonic() - t0 < 900:
    sys.stdout.write("line %d\n" % i)
    sys.stdout.flush()
    i += 1
    time.sleep(0.001)
sys.stdout.write("done %d\n" % i)
sys.stdout.flush()
"""

W8_SWAP_OK = re.compile(
    r"swap (\d+) to (.+?): ok in ([0-9.]+) ms \(load ([0-9.]+) ms, "
    r"switch ([0-9.]+) ms, retire ([0-9.]+) ms(.*)\)")
W8_SWAP_FAILED = re.compile(r"swap to .* failed after")


def pb_varint(buf, i):
    v = shift = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7f) << shift
        if b < 0x80:
            return v, i
        shift += 7


def pb_fields(buf):
    """(field number, value) of a protobuf message's varint and
    length-delimited fields: enough for StdioData and
    HealthCheckResponse, without generated classes."""
    i = 0
    while i < len(buf):
        key, i = pb_varint(buf, i)
        if key & 7 == 0:
            v, i = pb_varint(buf, i)
        elif key & 7 == 2:
            n, i = pb_varint(buf, i)
            v, i = buf[i:i + n], i + n
        else:
            raise ValueError("wire type %d" % (key & 7))
        yield key >> 3, v


class W8Stdio:
    """StreamStdio read by a thread: stdout bytes, the host's swap lines
    from stderr (with the time each arrived), the final status."""

    def __init__(self):
        self.out = bytearray()
        self.err = bytearray()
        self.swaps = []
        self.failed_swaps = []
        self.other = []
        self.status = None
        self.cv = threading.Condition()
        self.call = None

    def start(self, method):
        self.call = method(b"", timeout=1800)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        status = "OK"
        try:
            for msg in self.call:
                chan, data = 0, b""
                for f, v in pb_fields(msg):
                    if f == 1:
                        chan = v
                    elif f == 2:
                        data = v
                with self.cv:
                    if chan == 1:
                        self.out.extend(data)
                    else:
                        self._stderr(data)
                    self.cv.notify_all()
        except Exception as e:  # grpc.RpcError, or a message we misread
            status = "%s" % (e.code() if hasattr(e, "code") else repr(e))
        with self.cv:
            self.status = status
            self.cv.notify_all()

    def _stderr(self, data):
        self.err.extend(data)
        while True:
            k = self.err.find(b"\n")
            if k < 0:
                return
            line = self.err[:k].decode(errors="replace")
            del self.err[:k + 1]
            m = W8_SWAP_OK.search(line)
            if m:
                self.swaps.append({
                    "n": int(m.group(1)), "ms": float(m.group(3)),
                    "load_ms": float(m.group(4)),
                    "switch_ms": float(m.group(5)),
                    "retire_ms": float(m.group(6)),
                    "handed_over": "streams handed over" in m.group(7),
                    "t_seen": time.monotonic_ns(), "line": line})
            elif W8_SWAP_FAILED.search(line):
                self.failed_swaps.append(line)
            elif len(self.other) < 100:
                self.other.append(line)

    def wait(self, pred, timeout, what):
        end = time.monotonic() + timeout
        with self.cv:
            while not pred():
                left = end - time.monotonic()
                if left <= 0 or self.status is not None:
                    raise BenchError("W8: %s not seen within %ss (stdio "
                                     "stream: %s; host said: %s)" % (
                                         what, timeout,
                                         self.status or "open",
                                         " | ".join(self.other[-3:])))
                self.cv.wait(left)


class W8Calls(threading.Thread):
    """Health/Check in a tight loop on one channel: the start and end of
    every call (CLOCK_MONOTONIC, ns), failures counted."""

    REQUEST = b"\x0a\x06plugin"  # HealthCheckRequest{service: "plugin"}

    def __init__(self, method):
        threading.Thread.__init__(self, daemon=True)
        self.method = method
        self.t0, self.t1 = [], []
        self.failures = 0
        self.errors = []
        self.failed_at = []  # indices of the failed calls
        self.stop = threading.Event()
        self.want = 1 << 62
        self.reached = threading.Event()

    def run(self):
        try:
            while not self.stop.is_set():
                t0 = time.monotonic_ns()
                try:
                    resp = self.method(self.REQUEST, timeout=10)
                    ok = dict(pb_fields(resp)).get(1) == 1  # SERVING
                    err = None if ok else "status %r" % resp
                except Exception as e:  # a failed call is a figure
                    ok = False
                    if hasattr(e, "code") and hasattr(e, "details"):
                        err = "%s: %s" % (e.code(), e.details())
                    else:
                        err = repr(e)[:300]
                t1 = time.monotonic_ns()
                self.t0.append(t0)
                self.t1.append(t1)
                if not ok:
                    self.failures += 1
                    self.failed_at.append(len(self.t1) - 1)
                    if len(self.errors) < 20:
                        self.errors.append(err)
                if len(self.t1) >= self.want:
                    self.reached.set()
        finally:
            self.reached.set()

    def wait_calls(self, n, timeout):
        """Until n calls have ended."""
        end = time.monotonic() + timeout
        while len(self.t1) < n:
            self.reached.clear()
            self.want = n
            if len(self.t1) >= n:
                break
            left = end - time.monotonic()
            if left <= 0 or not self.is_alive():
                raise BenchError("W8: %d of %d calls after %ss" % (
                    len(self.t1), n, timeout))
            self.reached.wait(left)


# ------------------------------------------------------------- helpers

def med(xs):
    return statistics.median(xs) if xs else None


def spread(xs):
    return (min(xs), max(xs)) if xs else (None, None)


def pct(xs, q):
    """Nearest-rank percentile of sorted xs."""
    if not xs:
        return None
    return xs[max(0, min(len(xs) - 1, -int(-q * len(xs) // 1) - 1))]


def summary(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": med(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "values": xs}


def write_manifest(path, module, services, config):
    with open(path, "w") as f:
        json.dump({"manifest_version": 1, "name": "bench",
                   "module": module, "abi_version": "1.0",
                   "protocol_version": 1, "services": services,
                   "config": config}, f, indent=1)
    return path


def default_manifest(path, module, broker_extra=None):
    """manifests/default.json with the module path of this build."""
    with open(os.path.join(ROOT, "manifests", "default.json")) as f:
        m = json.load(f)
    m.pop("$schema", None)
    m["module"] = module
    if broker_extra:
        m.setdefault("config", {}).setdefault("broker", {}).update(
            broker_extra)
    with open(path, "w") as f:
        json.dump(m, f, indent=1)
    return path


def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a >= 1e6:
        s = "%.2fM" % (v / 1e6)
    elif a >= 1e4:
        s = "%.0fk" % (v / 1e3)
    elif a >= 100:
        s = "%.0f" % v
    elif a >= 10:
        s = "%.1f" % v
    else:
        s = "%.2f" % v
    return s + unit


# ------------------------------------------------------------- the bench

class Bench:
    def __init__(self, build, quick, reps, only):
        self.build = os.path.abspath(build)
        self.bin = os.path.join(self.build, "bench")
        self.module = os.path.join(self.build, "lib", "rpcplugin_services.so")
        self.quick = quick
        self.reps = reps
        self.only = only
        self.tmp = tempfile.mkdtemp(prefix="rpb-")
        self.logdir = os.path.join(self.bin, "logs")
        os.makedirs(self.logdir, exist_ok=True)
        self.rows = []      # the printed table
        self.results = {}   # the JSON
        self.ratios = []    # for the plot: (label, value, target, higher_ok)
        self.seq = 0

    def x(self, name):
        return os.path.join(self.bin, name)

    def sock(self, name):
        self.seq += 1
        p = os.path.join(self.tmp, "%s%d.sock" % (name, self.seq))
        if os.path.exists(p):
            os.unlink(p)
        return p

    def row(self, wl, case, figure, value, spread_=None, anchor=None,
            ratio=None, target=None, unit=""):
        self.rows.append((wl, case, figure, value, spread_, anchor, ratio,
                          target, unit))

    def wants(self, w):
        return not self.only or w in self.only

    def log(self, msg):
        sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
        sys.stderr.flush()

    # ------------------------------------------------------------ W1

    def w1_server(self, kind, manifest=None):
        addr = "unix:" + self.sock("w1")
        if kind == "module":
            argv = [self.x("rpb_server"), "module", manifest, addr]
        elif kind == "transport":
            argv = [self.x("rpb_server"), "transport", addr]
        elif kind == "cxx":
            argv = [self.x("rpb_server_cxx"), addr, str(64 << 20)]
        elif kind == "seed":
            argv = [PY, os.path.join(HERE, "seed_server.py"),
                    os.path.join(self.bin, "gen", "py"), addr]
        else:
            raise ValueError(kind)
        return Server(argv, "w1-" + kind, self.logdir)

    def w1_once(self, kind, n, size, manifest=None):
        srv = self.w1_server(kind, manifest)
        cli = None
        try:
            cli = Proc([self.x("rpb_client"), "stdio", srv.addr,
                        str(n * size)], "w1-client", self.logdir)
            cli.expect("READY", 30)
            s0 = srv.stats()
            srv.send("GO %d %d" % (n, size))
            limit = 60 + n * size / 2e6 + (n / 2000.0 if kind == "seed"
                                           else 0)
            done = cli.json("DONE", limit)
            prod = srv.expect("PRODUCED", 60).split()
            s1 = srv.stats()
            cli.finish()
            srv.stop()
        finally:
            if cli:
                cli.kill()
            srv.kill()
        if not done["complete"] or done["bad"]:
            raise BenchError("W1 %s: client got %d of %d bytes (bad %d)" % (
                kind, done["bytes"], n * size, done["bad"]))
        t0 = int(prod[0])
        secs = (done["t_end"] - t0) / 1e9
        return {
            "n": n, "size": size, "seconds": secs,
            "chunks_per_s": n / secs, "mb_per_s": n * size / secs / 1e6,
            "messages": done["messages"],
            "server_cpu_s": (s1["cpu_user"] + s1["cpu_sys"]) -
                            (s0["cpu_user"] + s0["cpu_sys"]),
            "client_cpu_s": done["cpu_user"] + done["cpu_sys"],
            "server_peak_rss_kb": s1["maxrss_kb"],
            "server_rss_idle_kb": s0["rss_kb"],
            "put_seconds": (int(prod[1]) - t0) / 1e9,
            "server_ctxsw": (s1["ctxsw_vol"] + s1["ctxsw_invol"]) -
                            (s0["ctxsw_vol"] + s0["ctxsw_invol"]),
            "blocked_puts": s1.get("blocked_puts"),
        }

    def w1(self):
        q = self.quick
        n = 20000 if q else 1000000
        n_seed = 5000 if q else 100000
        coalesce = 16384
        cases = []  # (key, kind, n, size, manifest)
        mdir = self.tmp
        for size in (64, 1024):
            for co in (0, coalesce):
                man = write_manifest(
                    os.path.join(mdir, "w1-%d.json" % co), self.module,
                    ["plugin.GRPCStdio"],
                    {"stdio": {"queue_bytes": 64 << 20, "overflow": "block",
                               "coalesce_bytes": co}})
                cases.append(("module/%d/co%d" % (size, co), "module", n,
                              size, man))
            cases.append(("transport/%d" % size, "transport", n, size, None))
            # The byte ceiling for coalesced output: the same bytes as
            # coalesce_bytes-sized messages.
            cases.append(("transport/%d/as%d" % (size, coalesce),
                          "transport", max(1, n * size // coalesce),
                          coalesce, None))
            if os.path.exists(self.x("rpb_server_cxx")):
                cases.append(("cxx/%d" % size, "cxx", n, size, None))
            cases.append(("seed/%d" % size, "seed", n_seed, size, None))
        runs = {c[0]: [] for c in cases}
        errors = {}
        for rep in range(self.reps):
            for key, kind, nn, size, man in cases:
                if key in errors:
                    continue
                self.log("W1 rep %d/%d %s n=%d" % (rep + 1, self.reps, key,
                                                   nn))
                try:
                    runs[key].append(self.w1_once(kind, nn, size, man))
                except BenchError as e:
                    errors[key] = str(e)
                    self.log("W1 %s failed: %s" % (key, e))
        self.results["W1"] = {"runs": runs, "errors": errors,
                              "coalesce_bytes": coalesce,
                              "n": n, "n_seed": n_seed}

        def fig(key, f):
            return summary([r[f] for r in runs.get(key, [])])

        def paired(a, b, f):
            ra, rb = runs.get(a, []), runs.get(b, [])
            return summary([x[f] / y[f] for x, y in zip(ra, rb) if y[f]])

        for size in (64, 1024):
            tr = "transport/%d" % size
            tb = "transport/%d/as%d" % (size, coalesce)
            for key, label in (("module/%d/co0" % size, "module"),
                               ("module/%d/co%d" % (size, coalesce),
                                "module+coalesce%dK" % (coalesce >> 10)),
                               (tr, "transport limit"),
                               (tb, "transport, %d KiB msgs" %
                                (coalesce >> 10)),
                               ("cxx/%d" % size, "gRPC C++ callback"),
                               ("seed/%d" % size, "seed (py grpc.aio)")):
                if key in errors:
                    self.row("W1", "%s %dB" % (label, size), "error",
                             errors[key])
                    continue
                if not runs.get(key):
                    continue
                c = fig(key, "chunks_per_s")
                mb = fig(key, "mb_per_s")
                cpu = fig(key, "server_cpu_s")
                ccpu = fig(key, "client_cpu_s")
                rss = fig(key, "server_peak_rss_kb")
                msgs = fig(key, "messages")
                nn = runs[key][0]["n"]
                if key == tb:
                    case = "%s (%d x %d KiB)" % (label, nn, coalesce >> 10)
                else:
                    case = "%s %dB x%d" % (label, size, nn)
                if key != tb:
                    self.row("W1", case, "chunks/s", c["median"],
                             (c["min"], c["max"]))
                self.row("W1", case, "MB/s", mb["median"],
                         (mb["min"], mb["max"]))
                self.row("W1", case, "CPU s, server", cpu["median"],
                         (cpu["min"], cpu["max"]), unit=" s")
                self.row("W1", case, "CPU s, client", ccpu["median"],
                         (ccpu["min"], ccpu["max"]), unit=" s")
                if key != tb:
                    self.row("W1", case, "server CPU per chunk",
                             cpu["median"] * 1e6 / nn, unit=" us")
                cs = fig(key, "server_ctxsw")
                self.row("W1", case, "server context switches", cs["median"],
                         (cs["min"], cs["max"]))
                bp = [r["blocked_puts"] for r in runs[key]
                      if r.get("blocked_puts") is not None]
                if bp:
                    self.row("W1", case, "put_line calls that waited",
                             med(bp))
                self.row("W1", case, "peak RSS (server)",
                         rss["median"] / 1024.0, (rss["min"] / 1024.0,
                                                  rss["max"] / 1024.0),
                         unit=" MiB")
                if msgs["median"] != nn and key != tb:
                    self.row("W1", case, "messages on the wire",
                             msgs["median"])
            # ratios, per message and per byte
            mod = "module/%d/co0" % size
            modc = "module/%d/co%d" % (size, coalesce)
            for a, b, lab, tgt, f in (
                    (mod, tr, "module / transport limit", 0.70,
                     "chunks_per_s"),
                    (modc, tr, "module+coalesce / transport limit (chunks/s)",
                     None, "chunks_per_s"),
                    (modc, tb, "module+coalesce / transport %dK msgs (MB/s)" %
                     (coalesce >> 10), None, "mb_per_s"),
                    (mod, "cxx/%d" % size, "module / gRPC C++", None,
                     "chunks_per_s"),
                    (mod, "seed/%d" % size, "module / seed", 30.0,
                     "chunks_per_s"),
                    (mod, tr, "server CPU per chunk, module / transport",
                     None, "cpu_per_chunk")):
                if f == "cpu_per_chunk":
                    ra, rb = runs.get(a, []), runs.get(b, [])
                    pr = summary([(x["server_cpu_s"] / x["n"]) /
                                  (y["server_cpu_s"] / y["n"])
                                  for x, y in zip(ra, rb)
                                  if y["server_cpu_s"] > 0])
                else:
                    pr = paired(a, b, f)
                if pr is None:
                    continue
                self.row("W1", "%dB: %s" % (size, lab), "ratio",
                         pr["median"], (pr["min"], pr["max"]),
                         ratio=True, target=(">= %.2f" % tgt) if tgt else None)
                if tgt:
                    self.ratios.append(("W1 %dB %s" % (size, lab),
                                        pr["median"], tgt, True))

    # ------------------------------------------------------------ W4

    def w4(self):
        q = self.quick
        rtt, opn, pipe, streams = ((1000, 100, 10000, 200) if q
                                   else (10000, 1000, 100000, 1000))
        man = default_manifest(os.path.join(self.tmp, "w4-default.json"),
                               self.module)
        runs = []
        errors = []
        for rep in range(self.reps):
            self.log("W4 rep %d/%d module + echo anchor, alternating" % (
                rep + 1, self.reps))
            addr = "unix:" + self.sock("w4")
            eaddr = "unix:" + self.sock("w4echo")
            srv = Server([self.x("rpb_server"), "module", man, addr],
                         "w4-module", self.logdir)
            echo = None
            try:
                echo = Server([self.x("rpb_server"), "echo", eaddr],
                              "w4-echo", self.logdir)
                idle = srv.stats()
                cli = Proc([self.x("rpb_client"), "broker", addr,
                            "--server-pid", str(srv.pid), "--anchor", eaddr,
                            "--anchor-pid", str(echo.pid), "--live",
                            self.sock("live"), "--rtt", str(rtt), "--open",
                            str(opn), "--pipeline", str(pipe), "--streams",
                            str(streams)], "w4-client", self.logdir)
                try:
                    res = cli.json("RESULT", 900)
                    cli.finish()
                finally:
                    cli.kill()
                res["server_idle_rss_kb"] = idle["rss_kb"]
                res["server_after"] = srv.stats()
                srv.stop()
                echo.stop()
                runs.append(res)
            except BenchError as e:
                errors.append(str(e))
                self.log("W4 failed: %s" % e)
            finally:
                srv.kill()
                if echo:
                    echo.kill()
        self.results["W4"] = {"runs": runs, "errors": errors,
                              "sizes": {"rtt": rtt, "open": opn,
                                        "pipeline": pipe,
                                        "streams": streams}}
        for e in errors:
            self.row("W4", "-", "error", e)
        if not runs:
            return

        def dist(name, q_):
            return summary([r[name][q_] for r in runs if name in r])

        for name, what in (
                ("reknock", "module: re-knock open id, RTT"),
                ("anchor_reknock", "echo anchor: the same message, RTT"),
                ("close_unknown", "module: close unknown id, RTT"),
                ("anchor_close_unknown", "echo anchor: the same message, "
                                         "RTT"),
                ("knock_open", "module: knock-open new id"),
                ("bare_connect", "anchor: bare C-core connect-to-READY"),
                ("close_open", "module: close open id, RTT")):
            for q_ in ("p50_us", "p99_us"):
                s_ = dist(name, q_)
                if s_:
                    self.row("W4", "%s x%d" % (what, runs[0][name]["n"]),
                             q_.replace("_us", ""), s_["median"],
                             (s_["min"], s_["max"]), unit=" us")
        for name, lab in (("pipelined", "module"),
                          ("anchor_pipelined", "echo anchor")):
            s_ = summary([r[name]["msgs_per_s"] for r in runs if name in r])
            if s_:
                self.row("W4", "%s: pipelined x%d" % (lab, pipe), "msgs/s",
                         s_["median"], (s_["min"], s_["max"]))
        for name, lab in (("streams", "module"),
                          ("anchor_streams", "echo anchor")):
            rs = [r[name] for r in runs if name in r]
            if not rs:
                continue
            case = "%s: %d concurrent streams" % (lab, streams)
            s_ = summary([(x["server_rss_open_kb"] -
                           x["server_rss_before_kb"]) / x["n"] for x in rs])
            self.row("W4", case, "server RSS per stream", s_["median"],
                     (s_["min"], s_["max"]), unit=" KiB")
            s_ = summary([x["server_rss_open_kb"] / 1024.0 for x in rs])
            self.row("W4", case, "server RSS, all open", s_["median"],
                     (s_["min"], s_["max"]), unit=" MiB")
            s_ = summary([x["open_seconds"] * 1e3 for x in rs])
            self.row("W4", case, "open + 1 round trip each", s_["median"],
                     (s_["min"], s_["max"]), unit=" ms")
            self.row("W4", case, "replies (min over reps)",
                     min(x["replies"] for x in rs))
        bad = [r.get("bad_replies", 0) for r in runs]
        if any(bad):
            self.row("W4", "module", "WRONG replies", max(bad))
        for a_, b_, lab, tgt, hi in (
                ("reknock", "anchor_reknock", "re-knock p50 / echo p50",
                 1.3, False),
                ("close_unknown", "anchor_close_unknown",
                 "close-unknown p50 / echo p50", 1.3, False),
                ("knock_open", "bare_connect",
                 "knock-open p50 / bare connect p50", 1.5, False)):
            r_ = summary([r[a_]["p50_us"] / r[b_]["p50_us"] for r in runs
                          if a_ in r and b_ in r])
            if r_:
                self.row("W4", lab, "ratio", r_["median"],
                         (r_["min"], r_["max"]), ratio=True,
                         target="<= %.2f" % tgt)
                self.ratios.append(("W4 " + lab, r_["median"], tgt, hi))
        r_ = summary([r["pipelined"]["msgs_per_s"] /
                      r["anchor_pipelined"]["msgs_per_s"] for r in runs
                      if "anchor_pipelined" in r])
        if r_:
            self.row("W4", "pipelined module / echo", "ratio", r_["median"],
                     (r_["min"], r_["max"]), ratio=True, target=">= 0.80")
            self.ratios.append(("W4 pipelined / echo", r_["median"], 0.8,
                                True))

    # ------------------------------------------------------------ W5

    def shutdown_rtt(self):
        """Steady-state Shutdown round trip: N calls on one channel to the
        module in process (the host's callback only counts), Health/Check
        on the same path as the anchor."""
        n = 100 if self.quick else 1000
        lib = os.path.dirname(self.module)
        p50s, h50s, p99s = [], [], []
        for rep in range(self.reps):
            self.log("W3 Shutdown RTT rep %d/%d x%d" % (rep + 1, self.reps, n))
            p = Proc([self.x("rpb_shutdown_rtt"), lib, str(n)],
                     "w3-shutdown-rtt", self.logdir, stdin=False)
            try:
                r = p.json("RESULT", 120)
                p.finish()
            finally:
                p.kill()
            p50s.append(r["shutdown_p50_us"])
            p99s.append(r["shutdown_p99_us"])
            h50s.append(r["health_p50_us"])
        self.results.setdefault("W3", {})["shutdown_rtt"] = {
            "n": n, "shutdown_p50_us": p50s, "shutdown_p99_us": p99s,
            "health_p50_us": h50s}
        case = "module in process, one channel, Shutdown x%d" % n
        self.row("W3", case, "round trip p50", med(p50s), spread(p50s),
                 unit=" us")
        self.row("W3", case, "round trip p99", med(p99s), spread(p99s),
                 unit=" us")
        self.row("W3", "same, Health/Check x%d (anchor)" % n,
                 "round trip p50", med(h50s), spread(h50s), unit=" us")

    def w5(self):
        n = 50 if self.quick else 1000
        man = default_manifest(os.path.join(self.tmp, "w5-default.json"),
                               self.module)
        res = {}
        for mode in ("module", "full", "runtime", "server"):
            self.log("W5 %s x%d" % (mode, n))
            d = tempfile.mkdtemp(prefix="c", dir=self.tmp)
            p = Proc([self.x("rpb_cycles"), mode, man, str(n), d],
                     "w5-" + mode, self.logdir, stdin=False)
            try:
                res[mode] = p.json("RESULT", 600)
                p.finish()
            except BenchError as e:
                res[mode] = {"error": str(e)}
                self.row("W5", mode, "error", str(e))
            finally:
                p.kill()
        self.results["W5"] = res
        labels = {
            "module": "module cycle on a live server (load..dlclose)",
            "full": "full cycle incl. fresh grpc_server + runtime",
            "runtime": "grpc_server + runtime, no module",
            "server": "bare grpc_server create..destroy"}
        for mode in ("module", "full", "runtime", "server"):
            r = res.get(mode)
            if not r or "error" in r:
                continue
            case = "%s x%d" % (labels[mode], r["n"])
            self.row("W5", case, "us/cycle p50", r["p50_us"], unit=" us",
                     target="< 1000" if mode == "module" else None)
            self.row("W5", case, "us/cycle p99", r["p99_us"], unit=" us")
            self.row("W5", case, "us/cycle mean", r["mean_us"], unit=" us")
            self.row("W5", case, "first cycle", r["first_us"], unit=" us")
            self.row("W5", case, "RSS after 1 / 10 / 100 / last",
                     "%d / %d / %d / %d KiB" % tuple(r["rss_kb"]))
            self.row("W5", case, "fds after 1 / 10 / 100 / last",
                     "%d / %d / %d / %d" % tuple(r["fds"]))
        if "p50_us" in res.get("full", {}) and "p50_us" in res.get(
                "runtime", {}):
            self.row("W5", "module's share of a full cycle (full - runtime)",
                     "us p50", res["full"]["p50_us"] - res["runtime"]["p50_us"],
                     unit=" us")

    # ------------------------------------------------------------ W6

    def w6(self):
        q = self.quick
        res = {}
        # Idle RSS: the bench host with the default manifest, against a
        # bare C-core server (the floor); the reference host if built.
        man = default_manifest(os.path.join(self.tmp, "w6-default.json"),
                               self.module, {"max_subchannels": 1100})
        for kind in ("module", "echo"):
            addr = "unix:" + self.sock("w6")
            argv = ([self.x("rpb_server"), "module", man, addr]
                    if kind == "module"
                    else [self.x("rpb_server"), "echo", addr])
            srv = Server(argv, "w6-idle-" + kind, self.logdir)
            try:
                time.sleep(0.5)
                res["idle_" + kind] = srv.stats()
                srv.stop()
            finally:
                srv.kill()
        host = self.find_host()
        if host:
            try:
                res["idle_reference_host"] = self.idle_reference_host(host)
            except BenchError as e:
                res["idle_reference_host"] = {"error": str(e)}
        self.row("W6", "idle: bench host, default manifest (4 services)",
                 "RSS", res["idle_module"]["rss_kb"] / 1024.0, unit=" MiB")
        self.row("W6", "idle: bare C-core server (floor)", "RSS",
                 res["idle_echo"]["rss_kb"] / 1024.0, unit=" MiB")
        ih = res.get("idle_reference_host")
        if ih and "rss_kb" in ih:
            self.row("W6", "idle: rpcplugin-host (reference host)", "RSS",
                     ih["rss_kb"] / 1024.0, unit=" MiB")
        elif ih:
            self.row("W6", "idle: rpcplugin-host", "error", ih["error"])
        else:
            self.row("W6", "idle: rpcplugin-host", "skipped",
                     "skipped: rpcplugin-host not built")

        # 1,000 open subchannels.
        nsub = 100 if q else 1000
        addr = "unix:" + self.sock("w6")
        srv = Server([self.x("rpb_server"), "module", man, addr],
                     "w6-subchannels", self.logdir)
        try:
            cli = Proc([self.x("rpb_client"), "broker", addr, "--server-pid",
                        str(srv.pid), "--live", self.sock("live"),
                        "--subchannels", str(nsub)], "w6-client",
                       self.logdir)
            try:
                r = cli.json("RESULT", 600)["subchannels"]
                cli.finish()
            finally:
                cli.kill()
            srv.stop()
            res["subchannels"] = r
            self.row("W6", "%d open subchannels" % nsub, "server RSS",
                     "%.1f -> %.1f MiB (%.1f KiB each)" % (
                         r["server_rss_before_kb"] / 1024.0,
                         r["server_rss_open_kb"] / 1024.0,
                         (r["server_rss_open_kb"] -
                          r["server_rss_before_kb"]) / nsub))
            self.row("W6", "%d open subchannels" % nsub,
                     "RSS closed / reopened+closed",
                     "%.1f / %.1f MiB" % (
                         r["server_rss_closed_kb"] / 1024.0,
                         r["server_rss_closed_again_kb"] / 1024.0))
            self.row("W6", "%d open subchannels" % nsub, "server fds",
                     "%d -> %d, closed: %d" % (r["server_fds_before"],
                                               r["server_fds_open"],
                                               r["server_fds_closed"]))
            self.row("W6", "%d open subchannels" % nsub, "open time",
                     r["open_seconds"] * 1e3, unit=" ms")
        except BenchError as e:
            self.row("W6", "subchannels", "error", str(e))
        finally:
            srv.kill()

        # A stalled client while 1 GiB is put with drop_oldest.
        qbytes = (8 << 20) if q else (64 << 20)
        total = (64 << 20) if q else (1 << 30)
        size = 1024
        man2 = write_manifest(os.path.join(self.tmp, "w6-drop.json"),
                              self.module, ["plugin.GRPCStdio"],
                              {"stdio": {"queue_bytes": qbytes,
                                         "overflow": "drop_oldest"}})
        addr = "unix:" + self.sock("w6")
        srv = Server([self.x("rpb_server"), "module", man2, addr],
                     "w6-stall", self.logdir)
        cli = None
        try:
            cli = Proc([self.x("rpb_client"), "stall", addr], "w6-stall-cli",
                       self.logdir)
            cli.expect("READY", 30)
            s0 = srv.stats()
            srv.send("FLOOD %d %d" % (total // size, size))
            fl = srv.json("FLOODED", 600)
            s1 = srv.stats()
            cli.send("done")
            cli.finish()
            srv.stop()
            growth = (max(fl["rss_peak_sampled_kb"], s1["maxrss_kb"]) -
                      s0["rss_kb"]) * 1024
            res["stalled"] = {"flood": fl, "before": s0, "after": s1,
                              "queue_bytes": qbytes, "total_bytes": total,
                              "rss_growth_bytes": growth}
            case = "stalled client, %d MiB put, drop_oldest, queue %d MiB" % (
                total >> 20, qbytes >> 20)
            self.row("W6", case, "server RSS idle -> peak",
                     "%.1f -> %.1f MiB" % (s0["rss_kb"] / 1024.0,
                                           max(fl["rss_peak_sampled_kb"],
                                               s1["maxrss_kb"]) / 1024.0))
            self.row("W6", case, "RSS growth / queue bound", growth / qbytes,
                     ratio=True, target="<= ~1 (+ transport buffers)")
            self.row("W6", case, "dropped chunks",
                     "%d of %d" % (fl["module_dropped_chunks"],
                                   total // size))
            self.row("W6", case, "put rate", (total // size) /
                     ((fl["t1"] - fl["t0"]) / 1e9), unit=" chunks/s")
        except BenchError as e:
            self.row("W6", "stalled client", "error", str(e))
        finally:
            if cli:
                cli.kill()
            srv.kill()
        self.results["W6"] = res

    # ------------------------------------------------------- W2 / W3

    def find_host(self):
        env = os.environ.get("RP_HOST_BIN")
        if env and os.access(env, os.X_OK):
            return env
        for cand in (os.path.join(self.build, "host-api", "rpcplugin-host"),
                     os.path.join(self.build, "rpcplugin-host"),
                     os.path.join(self.build, "bin", "rpcplugin-host")):
            if os.access(cand, os.X_OK):
                return cand
        for dp, dn, fn in os.walk(self.build):
            dn[:] = [d for d in dn if not d.startswith("CMakeFiles")]
            if "rpcplugin-host" in fn:
                p = os.path.join(dp, "rpcplugin-host")
                if os.access(p, os.X_OK):
                    return p
        return None

    def go_bins(self):
        """(gpserver, gpclient, why-not): $RP_GO_BIN, else built by
        tests/go/build.sh into BUILD_DIR/go (bin/ below it)."""
        d = os.environ.get("RP_GO_BIN")
        if not d:
            out = os.path.join(self.build, "go")
            d = os.path.join(out, "bin")
            script = os.path.join(ROOT, "tests", "go", "build.sh")
            if not os.path.exists(script):
                return None, None, "tests/go/build.sh not found and " \
                    "RP_GO_BIN not set"
            if not getattr(self, "_go_built", False):
                self._go_built = True
                self.log("building the go-plugin programs: %s %s" % (script,
                                                                     out))
                try:
                    with open(os.path.join(self.logdir, "go-build.log"),
                              "w") as log:
                        subprocess.run(["sh", script, out], check=True,
                                       timeout=600, stdout=log, stderr=log)
                except (subprocess.SubprocessError, OSError) as e:
                    self._go_err = "tests/go/build.sh failed (%s; see " \
                        "%s/go-build.log)" % (e, self.logdir)
            if getattr(self, "_go_err", None):
                return None, None, self._go_err
        s = os.path.join(d, "gpserver")
        c = os.path.join(d, "gpclient")
        return (s if os.access(s, os.X_OK) else None,
                c if os.access(c, os.X_OK) else None,
                "no gpserver/gpclient in %s" % d)

    def cookie(self):
        """The magic cookie: $RP_MAGIC_COOKIE, else the default of the Go
        interop programs (tests/go), so one value serves every plugin."""
        env = os.environ.get("RP_MAGIC_COOKIE")
        if env and "=" in env:
            return env.split("=", 1)
        return ["RPCPLUGIN_INTEROP_COOKIE", "rpcplugin-interop"]

    def plugin_env(self):
        k, v = self.cookie()
        env = dict(os.environ)
        env[k] = v
        env["PLUGIN_PROTOCOL_VERSIONS"] = "1"
        env["PLUGIN_MIN_PORT"] = "10000"
        env["PLUGIN_MAX_PORT"] = "25000"
        return env, "%s=%s" % (k, v)

    def idle_reference_host(self, host):
        env, cookie = self.plugin_env()
        man = default_manifest(os.path.join(self.tmp, "w6-host.json"),
                               self.module)
        p = subprocess.Popen([host, "--magic-cookie", cookie,
                              "--app-version", "1", man],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, env=env, text=True)
        try:
            line = p.stdout.readline()
            if not line.startswith("1|"):
                raise BenchError("rpcplugin-host printed %r" % line)
            time.sleep(0.5)
            with open("/proc/%d/status" % p.pid) as f:
                st = dict(l.split(":", 1) for l in f if ":" in l)
            return {"rss_kb": int(st["VmRSS"].split()[0]),
                    "handshake": line.strip()}
        finally:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def host_argv(self, host, cookie, man, child=None):
        argv = [host, "--magic-cookie", cookie, "--app-version", "1"]
        if child:
            argv += ["--no-exit-with-child", man, "--"] + child
        else:
            argv += [man]
        return argv

    def gpclient_launch(self, gpc, cookie, argv, extra, name, env, timeout):
        """One `gpclient launch`; returns {handshake_ms, kill_ms, t_*}."""
        p = Proc([gpc, "launch", "--magic-cookie", cookie, "--timeout",
                  "%ds" % timeout] + extra + ["--"] + argv, name,
                 self.logdir, env=env, stdin=False)
        try:
            hs = p.expect("HANDSHAKE", timeout + 20)
            t_hs = p.last_t
            r = {"t_spawn": p.t_spawn, "t_handshake": t_hs,
                 "handshake_ms": float(re.search(r"elapsed_ms=([0-9.]+)",
                                                 hs).group(1))}
            if "--stdio-expect-lines" in extra:
                r["lines"] = int(p.expect("STDIO_LINES", timeout + 20))
                r["t_lines"] = p.last_t
            k = p.expect("KILL", timeout + 20)
            r["kill_ms"] = float(re.search(r"elapsed_ms=([0-9.]+)",
                                           k).group(1))
            r["graceful"] = "graceful=true" in k
            p.expect("DONE", timeout + 20)
            p.finish()
            return r
        finally:
            p.kill()

    def w3(self):
        host = self.find_host()
        gps, gpc, why = self.go_bins()
        n = 20 if self.quick else 200
        env, cookie = self.plugin_env()
        man = default_manifest(os.path.join(self.tmp, "w3.json"),
                               self.module)
        targets = []
        if host:
            targets.append(("rpcplugin-host",
                            self.host_argv(host, cookie, man)))
        else:
            self.row("W3", "rpcplugin-host", "skipped",
                     "skipped: rpcplugin-host not built")
        # The least a C-core plugin does (rpb_server plugin): grpc_init, a
        # server, the handshake line, Shutdown answered, exit.
        targets.append(("C-core floor",
                        [self.x("rpb_server"), "plugin"]))
        if gps:
            targets.append(("go-plugin gpserver",
                            [gps, "--magic-cookie", cookie]))
        else:
            self.row("W3", "go-plugin gpserver", "skipped", "skipped: " + why)
        if not targets:
            self.results["W3"] = {"skipped": True}
            return
        runs = {t[0]: [] for t in targets}
        goruns = {t[0]: [] for t in targets if t[0] != "C-core floor"}
        errors = {}
        counts = [n // self.reps + (1 if i < n % self.reps else 0)
                  for i in range(self.reps)]
        for rep in range(self.reps):
            per = max(1, counts[rep])
            for name, argv in targets:
                if name in errors:
                    continue
                self.log("W3 rep %d/%d %s x%d (C-core client)" % (
                    rep + 1, self.reps, name, per))
                p = Proc([self.x("rpb_client"), "lifecycle", str(per), "--"]
                         + argv, "w3-" + name.split()[-1], self.logdir,
                         env=env, stdin=False)
                try:
                    runs[name].append(p.json("RESULT", 600))
                    p.finish()
                except BenchError as e:
                    errors[name] = str(e)
                finally:
                    p.kill()
            if not gpc:
                continue
            for name, argv in targets:
                key = name + " (gpclient)"
                if key in errors or name == "C-core floor":
                    continue  # the floor serves no health for Ping
                    continue
                self.log("W3 rep %d/%d %s x%d (go-plugin client)" % (
                    rep + 1, self.reps, name, per))
                try:
                    for _ in range(per):
                        goruns[name].append(self.gpclient_launch(
                            gpc, cookie, argv, [], "w3-gpclient", env, 10))
                except BenchError as e:
                    errors[key] = str(e)
        floors = {}
        for lab, argv in (("/bin/true", ["/bin/true"]),
                          ("rpb_server noop (linked with libgrpc)",
                           [self.x("rpb_server"), "noop"])):
            if not os.path.exists(argv[0]):
                continue
            p = Proc([self.x("rpb_client"), "exectime", str(n), "--"] + argv,
                     "w3-exectime", self.logdir, stdin=False)
            try:
                floors[lab] = p.json("RESULT", 300)
                p.finish()
            except BenchError as e:
                errors[lab] = str(e)
            finally:
                p.kill()
        self.results["W3"] = {"runs": runs, "gpclient_runs": goruns,
                              "exec_floors": floors, "errors": errors,
                              "cookie": cookie}
        for lab, r in floors.items():
            case = "floor: exec -> exit of %s x%d" % (lab, r["n"])
            self.row("W3", case, "p50", r["exec_to_exit"]["p50_us"] / 1e3,
                     unit=" ms")
            self.row("W3", case, "p99", r["exec_to_exit"]["p99_us"] / 1e3,
                     unit=" ms")
        for name, e in errors.items():
            self.row("W3", name, "error", e)
        for name, _ in targets:
            if not runs[name]:
                continue
            total = sum(r["n"] for r in runs[name])
            for fig_, lab in (("exec_to_handshake", "exec -> handshake line"),
                              ("exec_to_ready", "exec -> channel READY"),
                              ("shutdown_rtt", "Shutdown round trip"),
                              ("shutdown_to_exit",
                               "Shutdown -> process exit")):
                p50 = summary([r[fig_]["p50_us"] for r in runs[name]])
                p99 = summary([r[fig_]["p99_us"] for r in runs[name]])
                case = "%s x%d, C-core client: %s" % (name, total, lab)
                self.row("W3", case, "p50", p50["median"] / 1e3,
                         (p50["min"] / 1e3, p50["max"] / 1e3), unit=" ms")
                self.row("W3", case, "p99", p99["median"] / 1e3,
                         (p99["min"] / 1e3, p99["max"] / 1e3), unit=" ms")
            fails = sum(r["failures"] + r["nonzero_exit"]
                        for r in runs[name])
            if fails:
                self.row("W3", name, "failed lifetimes", fails)
            nok = sum(r.get("shutdown_not_ok", 0) for r in runs[name])
            if nok:
                self.row("W3", "%s x%d, C-core client" % (name, total),
                         "Shutdown replies not OK",
                         "%d (gRPC status %d)" % (
                             nok, runs[name][-1]["shutdown_last_status"]))
        for name, _ in targets:
            g = goruns.get(name)
            if not g:
                continue
            for fig_, lab in (("handshake_ms",
                               "exec -> Start() returned (handshake)"),
                              ("kill_ms", "Kill()")):
                xs = sorted(r[fig_] for r in g)
                case = "%s x%d, go-plugin client: %s" % (name, len(g), lab)
                self.row("W3", case, "p50", statistics.median(xs),
                         unit=" ms")
                self.row("W3", case, "p99", xs[min(len(xs) - 1,
                                                   int(0.99 * len(xs)))],
                         unit=" ms")
            ng = sum(1 for r in g if not r["graceful"])
            if ng:
                self.row("W3", name + " (gpclient)", "Kill not graceful", ng)
        H, F, G = ("rpcplugin-host", "C-core floor",
                   "go-plugin gpserver")
        for other, oname, tgt in ((G, "gpserver", "<= 0.50"),
                                  (F, "C-core floor", None)):
            if not (runs.get(H) and runs.get(other)):
                continue
            for fig_, lab in (("exec_to_handshake", "exec->handshake"),
                              ("shutdown_to_exit", "Shutdown->exit")):
                r = summary([x[fig_]["p50_us"] / y[fig_]["p50_us"]
                             for x, y in zip(runs[H], runs[other])])
                self.row("W3", "%s p50: rpcplugin-host / %s "
                         "(C-core client)" % (lab, oname), "ratio",
                         r["median"], (r["min"], r["max"]), ratio=True,
                         target=tgt)
                if tgt:
                    self.ratios.append(("W3 %s host/go-plugin" % lab,
                                        r["median"], 0.5, False))
        if goruns.get(H) and goruns.get(G):
            for fig_, lab in (("handshake_ms", "Start()"),
                              ("kill_ms", "Kill()")):
                ra = statistics.median([r[fig_] for r in goruns[H]])
                rb = statistics.median([r[fig_] for r in goruns[G]])
                self.row("W3", "%s p50: rpcplugin-host / gpserver "
                         "(go-plugin client)" % lab, "ratio", ra / rb,
                         ratio=True, target="<= 0.50")

    def w2(self):
        host = self.find_host()
        gps, gpc, why = self.go_bins()
        if not host:
            self.row("W2", "rpcplugin-host -- rpb_lines", "skipped",
                     "skipped: rpcplugin-host not built")
            self.results["W2"] = {"skipped": "rpcplugin-host not built"}
            return
        env, cookie = self.plugin_env()
        lines = 100000 if self.quick else 1000000
        size = 64
        child = [self.x("rpb_lines"), str(lines), str(size)]
        runs = {}
        errors = {}
        variants = [("coalesce off", 0), ("coalesce 16K", 16384)]
        clients = ["C-core client (rpb_client)"]
        if gpc:
            clients.append("go-plugin client (gpclient)")
        for rep in range(self.reps):
            for label, co in variants:
                cfg = {"stdio": {"queue_bytes": 64 << 20, "overflow": "block",
                                 "coalesce_bytes": co}}
                man = write_manifest(
                    os.path.join(self.tmp, "w2-%d.json" % co), self.module,
                    ["plugin.GRPCBroker", "plugin.GRPCStdio",
                     "plugin.GRPCController", "grpc.health.v1.Health"], cfg)
                argv = self.host_argv(host, cookie, man, child)
                for cl in clients:
                    key = "%s, %s" % (cl, label)
                    if key in errors:
                        continue
                    self.log("W2 rep %d/%d %s" % (rep + 1, self.reps, key))
                    try:
                        if cl.startswith("C-core"):
                            p = Proc([self.x("rpb_client"), "w2", str(lines),
                                      str(size), "--"] + argv, "w2",
                                     self.logdir, env=env, stdin=False)
                            try:
                                r = p.json("RESULT", 600)
                                p.finish()
                            finally:
                                p.kill()
                            if not r["complete"]:
                                raise BenchError("incomplete: %s" % r)
                            secs = r["exec_to_all_s"]
                        else:
                            r = self.gpclient_launch(
                                gpc, cookie, argv,
                                ["--stdio", "--stdio-expect-lines",
                                 str(lines)], "w2-gpclient", env, 300)
                            if r["lines"] < lines:
                                raise BenchError("gpclient got %d lines" %
                                                 r["lines"])
                            secs = (r["t_lines"] - r["t_spawn"]) / 1e9
                        r["seconds"] = secs
                        r["lines_per_s"] = lines / secs
                        runs.setdefault(key, []).append(r)
                    except BenchError as e:
                        errors[key] = str(e)
                        self.log("W2 %s failed: %s" % (key, e))
        self.results["W2"] = {"runs": runs, "errors": errors,
                              "lines": lines, "size": size}
        for k, e in errors.items():
            self.row("W2", k, "error", e)
        for key, rs in runs.items():
            s = summary([r["lines_per_s"] for r in rs])
            t = summary([r["seconds"] for r in rs])
            case = "rpcplugin-host -- rpb_lines %d x %dB; %s" % (lines, size,
                                                                 key)
            self.row("W2", case, "lines/s, exec -> all held", s["median"],
                     (s["min"], s["max"]), target=">= 8M (3x go-plugin)")
            self.row("W2", case, "seconds", t["median"], (t["min"], t["max"]),
                     unit=" s")
            if "messages" in rs[0]:
                self.row("W2", case, "StdioData messages",
                         med([r["messages"] for r in rs]))
        self.row("W2", "go-plugin's own stdio (anchor)", "skipped",
                 "skipped: Debian's go-plugin is v1.0.1, which has no "
                 "GRPCStdio (added in v1.3); no go-plugin figure to compare")
        if not gpc:
            self.row("W2", "go-plugin client (gpclient)", "skipped",
                     "skipped: " + why)

    # ------------------------------------------------------------ report

    def profile(self):
        """Callgrind profiles of the module under reduced W1 and W4 runs
        (perf cannot count instructions on this machine's kernel)."""
        if not shutil.which("valgrind"):
            print("profile: valgrind is not installed")
            return
        outdir = os.path.join(self.bin, "profile")
        os.makedirs(outdir, exist_ok=True)
        n = 20000 if self.quick else 200000
        jobs = []
        man = write_manifest(os.path.join(self.tmp, "prof-w1.json"),
                             self.module, ["plugin.GRPCStdio"],
                             {"stdio": {"queue_bytes": 64 << 20,
                                        "overflow": "block",
                                        "coalesce_bytes": 0}})
        out1 = os.path.join(outdir, "w1-module-64B.callgrind")
        addr = "unix:" + self.sock("prof")
        self.log("profile: W1 module 64B x%d under callgrind" % n)
        srv = Server(["valgrind", "--tool=callgrind", "--separate-threads=no",
                      "--callgrind-out-file=" + out1, self.x("rpb_server"),
                      "module", man, addr], "prof-w1", self.logdir)
        try:
            cli = Proc([self.x("rpb_client"), "stdio", addr, str(n * 64)],
                       "prof-w1-client", self.logdir)
            cli.expect("READY", 60)
            srv.send("GO %d 64" % n)
            cli.json("DONE", 900)
            srv.expect("PRODUCED", 60)
            cli.finish()
            srv.stop(120)
            jobs.append(out1)
        finally:
            srv.kill()
        out4 = os.path.join(outdir, "w4-module.callgrind")
        man4 = default_manifest(os.path.join(self.tmp, "prof-w4.json"),
                                self.module)
        addr = "unix:" + self.sock("prof")
        self.log("profile: W4 module under callgrind")
        srv = Server(["valgrind", "--tool=callgrind", "--separate-threads=no",
                      "--callgrind-out-file=" + out4, self.x("rpb_server"),
                      "module", man4, addr], "prof-w4", self.logdir)
        try:
            cli = Proc([self.x("rpb_client"), "broker", addr, "--live",
                        self.sock("live"), "--rtt", str(n // 100),
                        "--pipeline", str(n // 10)], "prof-w4-client",
                       self.logdir)
            cli.json("RESULT", 900)
            cli.finish()
            srv.stop(120)
            jobs.append(out4)
        finally:
            srv.kill()
        for f in jobs:
            txt = subprocess.run(["callgrind_annotate", "--inclusive=no",
                                  "--threshold=99", f], capture_output=True,
                                 text=True).stdout
            with open(f + ".txt", "w") as o:
                o.write(txt)
            print("\n== %s (self cost, top 30)" % os.path.basename(f))
            lines = [l for l in txt.splitlines() if re.match(r"\s*[0-9,]+ ", l)]
            for l in lines[:31]:
                print(l[:150])
            mine = [l for l in lines if "rpcplugin_services" in l or
                    "librpcplugin" in l]
            print("-- the module's and the loader's own functions, self cost")
            for l in mine[:15]:
                print(l[:150])
            txt = subprocess.run(["callgrind_annotate", "--inclusive=yes",
                                  "--threshold=99", f], capture_output=True,
                                 text=True).stdout
            with open(f + ".inclusive.txt", "w") as o:
                o.write(txt)
            lines = [l for l in txt.splitlines()
                     if re.match(r"\s*[0-9,]+ ", l) and
                     ("rpcplugin_services" in l or "librpcplugin" in l)]
            print("-- the same, inclusive (callees counted)")
            for l in lines[:15]:
                print(l[:150])
        print("\nprofiles: %s (callgrind_annotate FILE)" % outdir)

    # ------------------------------------------------------------ W7

    def w7(self):
        """An application's unary call: go-plugin's KV example, Put of 64
        bytes, driven by a go-plugin v1.0.1 client (gpkv bench) against
        rpcplugin-host serving examples/kv and against the Go plugin
        (gpkvplugin, go-plugin's own server; both write kv_<key> files),
        interleaved, one and eight concurrent callers."""
        host = self.find_host()
        _, gpc, why = self.go_bins()
        gpkv = os.path.join(os.path.dirname(gpc), "gpkv") if gpc else None
        kvman = os.path.join(self.build, "examples", "kv", "kv.json")
        if not (host and gpkv and os.access(gpkv, os.X_OK) and
                os.path.exists(kvman)):
            self.row("W7", "kv Put", "skipped",
                     "skipped: needs rpcplugin-host, examples/kv and gpkv (%s)"
                     % why)
            return
        plugins = (("rpcplugin-host + examples/kv",
                    "%s --magic-cookie BASIC_PLUGIN=hello %s" % (host, kvman)),
                   ("go-plugin plugin (gpkvplugin)",
                    os.path.join(os.path.dirname(gpkv), "gpkvplugin")))
        n = 500 if self.quick else 5000
        work = tempfile.mkdtemp(prefix="w7-", dir=self.tmp)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PLUGIN_")}
        env["TMPDIR"] = work
        runs = {(lab, c): [] for lab, _ in plugins for c in (1, 8)}
        for rep in range(self.reps):
            for conc in (1, 8):
                for lab, cmd in plugins:
                    self.log("W7 rep %d/%d %s, %d callers" % (
                        rep + 1, self.reps, lab, conc))
                    p = subprocess.run(
                        [gpkv, "--timeout", "120s", "--plugin", cmd, "bench",
                         "--n", str(n), "--concurrency", str(conc),
                         "--size", "64"], cwd=work, env=env,
                        capture_output=True, text=True, timeout=600)
                    if p.returncode != 0:
                        raise BenchError("gpkv bench against %s: %s" % (
                            lab, p.stderr.strip()[-300:]))
                    runs[(lab, conc)].append(json.loads(
                        p.stdout.strip().splitlines()[-1]))
        self.results["W7"] = {"runs": {"%s c=%d" % k: v
                                       for k, v in runs.items()}}
        for conc in (1, 8):
            for lab, _ in plugins:
                rs = runs[(lab, conc)]
                case = "%s, Put 64 B x%d, %d caller%s" % (
                    lab, n, conc, "s" if conc > 1 else "")
                for fig_, key, unit in (("p50", "p50_us", " us"),
                                        ("p99", "p99_us", " us"),
                                        ("calls/s", "calls_per_s", "")):
                    v = [r[key] for r in rs]
                    self.row("W7", case, fig_, med(v), spread(v), unit=unit)
        H, G = plugins[0][0], plugins[1][0]
        for conc in (1, 8):
            lat = summary([a["p50_us"] / b["p50_us"] for a, b in
                           zip(runs[(H, conc)], runs[(G, conc)])])
            thr = summary([a["calls_per_s"] / b["calls_per_s"] for a, b in
                           zip(runs[(H, conc)], runs[(G, conc)])])
            self.row("W7", "p50 latency, %d caller(s): rpcplugin / go-plugin"
                     % conc, "ratio", lat["median"], (lat["min"], lat["max"]),
                     ratio=True, target="<= 1.00")
            self.ratios.append(("W7 p50 latency c=%d rpcplugin/go" % conc,
                                lat["median"], 1.0, False))
            self.row("W7", "calls/s, %d caller(s): rpcplugin / go-plugin"
                     % conc, "ratio", thr["median"], (thr["min"], thr["max"]),
                     ratio=True, target=">= 1.00" if conc == 8 else None)
            if conc == 8:
                self.ratios.append(("W7 calls/s c=8 rpcplugin/go",
                                    thr["median"], 1.0, True))

    # ------------------------------------------------------------ W9

    def w9(self):
        """What go-plugin's gRPC broker multiplexing costs: the same Go
        client (gpmuxbench, go-plugin v1.8.0's client muxer on Debian's
        yamux), the same rpcplugin-host, once over a plain connection and
        once multiplexed (PLUGIN_MULTIPLEX_GRPC=true: one connection, each
        gRPC connection a yamux stream that the host bridges to its
        server), interleaved, without and with AutoMTLS.  Workloads: the
        child's stdout as 64-byte StdioData messages (max_message_bytes
        64: one message per 64 bytes), and go-plugin's KV example Put of
        64 bytes from one caller."""
        host = self.find_host()
        _, gpc, why = self.go_bins()
        mb = os.path.join(os.path.dirname(gpc), "gpmuxbench") if gpc else None
        kvman = os.path.join(self.build, "examples", "kv", "kv.json")
        if not (host and mb and os.access(mb, os.X_OK) and
                os.path.exists(kvman)):
            self.row("W9", "multiplexing", "skipped",
                     "skipped: needs rpcplugin-host, examples/kv and "
                     "gpmuxbench (%s)" % why)
            return
        lines = 20000 if self.quick else 200000
        calls = 500 if self.quick else 5000
        man = write_manifest(
            os.path.join(self.tmp, "w9.json"), self.module,
            ["plugin.GRPCBroker", "plugin.GRPCStdio",
             "plugin.GRPCController", "grpc.health.v1.Health"],
            {"stdio": {"queue_bytes": 64 << 20, "overflow": "block",
                       "max_message_bytes": 64,
                       "flush_deadline_ms": 120000}})
        work = tempfile.mkdtemp(prefix="w9-", dir=self.tmp)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PLUGIN_")}
        env["TMPDIR"] = work
        gomux = os.path.join(os.path.dirname(mb), "gpmuxplugin")
        cases = (("stdio", "%s --magic-cookie BASIC_PLUGIN=hello %s -- %s %d 64"
                  % (host, man, self.x("rpb_lines"), lines),
                  ["--bytes", str(lines * 64)]),
                 ("unary", "%s --magic-cookie BASIC_PLUGIN=hello %s"
                  % (host, kvman), ["--calls", str(calls)]),
                 ("health", "%s --magic-cookie BASIC_PLUGIN=hello %s"
                  % (host, man), ["--calls", str(calls)]),
                 # The anchor: a Go plugin on grpc-go and hashicorp/yamux,
                 # muxed as go-plugin v1.8.0's server does (no bridge).
                 ("health-go", gomux, ["--calls", str(calls)]))
        runs = {}
        for rep in range(self.reps):
            for tls in (False, True):
                for wl, cmd, extra in cases:
                    for mux in (False, True):
                        key = (wl, tls, mux)
                        self.log("W9 rep %d/%d %s%s%s" % (
                            rep + 1, self.reps, wl,
                            ", AutoMTLS" if tls else "",
                            ", multiplexed" if mux else ", plain"))
                        argv = [mb, wl.replace("-go", ""), "--plugin",
                                cmd] + extra
                        if mux:
                            argv.append("--mux")
                        if tls:
                            argv.append("--automtls")
                        p = subprocess.run(argv, cwd=work, env=env,
                                           capture_output=True, text=True,
                                           timeout=600)
                        if p.returncode != 0:
                            raise BenchError("gpmuxbench %s: %s" % (
                                " ".join(argv[1:2] + argv[4:]),
                                p.stderr.strip()[-300:]))
                        runs.setdefault(key, []).append(json.loads(
                            p.stdout.strip().splitlines()[-1]))
        self.results["W9"] = {"runs": {"%s tls=%s mux=%s" % k: v
                                       for k, v in runs.items()}}
        for tls in (False, True):
            t = ", AutoMTLS" if tls else ""
            for mux in (False, True):
                m = "multiplexed" if mux else "plain"
                rs = runs[("stdio", tls, mux)]
                case = "stdio, %d x 64 B messages, %s%s" % (lines, m, t)
                v = [r["msgs_per_s"] for r in rs]
                self.row("W9", case, "msgs/s", med(v), spread(v))
                rs = runs[("unary", tls, mux)]
                case = "kv Put 64 B x%d, 1 caller, %s%s" % (calls, m, t)
                for fig_, key, unit in (("p50", "p50_us", " us"),
                                        ("p99", "p99_us", " us"),
                                        ("calls/s", "calls_per_s", "")):
                    v = [r[key] for r in rs]
                    self.row("W9", case, fig_, med(v), spread(v), unit=unit)
            sd = summary([a["msgs_per_s"] / b["msgs_per_s"] for a, b in
                          zip(runs[("stdio", tls, False)],
                              runs[("stdio", tls, True)])])
            self.row("W9", "stdio msgs/s%s: plain / multiplexed" % t,
                     "ratio", sd["median"], (sd["min"], sd["max"]),
                     ratio=True, target="<= 1.30")
            self.ratios.append(("W9 stdio plain/mux%s" % t, sd["median"],
                                1.3, False))
            lat = summary([b["p50_us"] / a["p50_us"] for a, b in
                           zip(runs[("unary", tls, False)],
                               runs[("unary", tls, True)])])
            thr = summary([a["calls_per_s"] / b["calls_per_s"] for a, b in
                           zip(runs[("unary", tls, False)],
                               runs[("unary", tls, True)])])
            self.row("W9", "kv Put p50%s: multiplexed / plain" % t, "ratio",
                     lat["median"], (lat["min"], lat["max"]), ratio=True,
                     target="<= 1.30")
            self.row("W9", "kv Put calls/s%s: plain / multiplexed" % t,
                     "ratio", thr["median"], (thr["min"], thr["max"]),
                     ratio=True, target="<= 1.30")
            self.ratios.append(("W9 unary p50 mux/plain%s" % t,
                                lat["median"], 1.3, False))
            for wl, lab in (("health", "rpcplugin-host"),
                            ("health-go", "Go plugin (yamux, no bridge)")):
                for mux in (False, True):
                    v = [r["p50_us"] for r in runs[(wl, tls, mux)]]
                    self.row("W9", "Health/Check x%d, 1 caller, %s, %s%s" % (
                        calls, lab, "multiplexed" if mux else "plain", t),
                        "p50", med(v), spread(v), unit=" us")
            hl = summary([b["p50_us"] / a["p50_us"] for a, b in
                          zip(runs[("health", tls, False)],
                              runs[("health", tls, True)])])
            gl = summary([b["p50_us"] / a["p50_us"] for a, b in
                          zip(runs[("health-go", tls, False)],
                              runs[("health-go", tls, True)])])
            hg = summary([a["p50_us"] / b["p50_us"] for a, b in
                          zip(runs[("health", tls, True)],
                              runs[("health-go", tls, True)])])
            self.row("W9", "Health/Check p50%s: multiplexed / plain, "
                     "rpcplugin-host" % t, "ratio", hl["median"],
                     (hl["min"], hl["max"]), ratio=True, target="<= 1.30")
            self.row("W9", "Health/Check p50%s: multiplexed / plain, Go "
                     "plugin (anchor: yamux's own cost)" % t, "ratio",
                     gl["median"], (gl["min"], gl["max"]), ratio=True)
            self.row("W9", "Health/Check p50%s, multiplexed: rpcplugin-host "
                     "/ Go plugin" % t, "ratio", hg["median"],
                     (hg["min"], hg["max"]), ratio=True)
            self.ratios.append(("W9 health p50 mux/plain%s" % t,
                                hl["median"], 1.3, False))

    # ------------------------------------------------------------ W8

    def w8_modules(self):
        """(services manifest, recorder manifest): manifests/host.json and
        manifests/host-recorder.json with the modules of this build.  The
        recorder target is built here (bench/run.sh builds only what the
        other workloads need), from the same sources as the module."""
        lib = os.path.dirname(self.module)
        rec = os.path.join(lib, "rpcplugin_recorder.so")
        self.log("W8: building rpcplugin_recorder in %s" % self.build)
        try:
            with open(os.path.join(self.logdir, "w8-build.log"), "w") as log:
                subprocess.run(["cmake", "--build", self.build, "-j",
                                os.environ.get("JOBS", "2"), "--target",
                                "rpcplugin_recorder"], check=True,
                               timeout=900, stdout=log, stderr=log)
        except (subprocess.SubprocessError, OSError) as e:
            return None, None, "target rpcplugin_recorder not built (%s; " \
                "see %s/w8-build.log)" % (e, self.logdir)
        if not os.path.exists(rec):
            return None, None, "no %s" % rec
        out = []
        for name, module in (("host.json", self.module),
                             ("host-recorder.json", rec)):
            with open(os.path.join(ROOT, "manifests", name)) as f:
                m = json.load(f)
            m.pop("$schema", None)
            m["module"] = module
            path = os.path.join(self.tmp, "w8-" + name)
            with open(path, "w") as f:
                json.dump(m, f, indent=1)
            out.append(path)
        return out[0], out[1], None

    def w8_once(self, host, man, man2, nswaps, ncalls, nwarm):
        """One host lifetime: warm-up, phase 1 (ncalls Health/Check with no
        swap), phase 2 (nswaps SIGHUPs, each waited for on the host's log
        line, with the same call loop running), then the stdio check and
        Shutdown."""
        import grpc  # Debian's python3-grpcio; only W8 needs it
        work = tempfile.mkdtemp(prefix="w8-", dir=self.tmp)
        stop = os.path.join(work, "STOP")
        env, cookie = self.plugin_env()
        env["PLUGIN_UNIX_SOCKET_DIR"] = work
        env["TMPDIR"] = work
        argv = [host, "--magic-cookie", cookie, "--app-version", "1",
                "--no-exit-with-child", "--swap-to", man2, man, "--",
                PY, "-c", W8_CHILD, stop]
        p = Proc(argv, "w8-host", self.logdir, env=env, stdin=False)
        st = W8Stdio()
        loop = None
        ch = None
        try:
            hs = ("1|" + p.expect("1|", 30)).split("|")
            if len(hs) < 5 or hs[4] != "grpc":
                raise BenchError("rpcplugin-host handshake %r" % "|".join(hs))
            target = ("unix:" + hs[3]) if hs[2] == "unix" else hs[3]
            ch = grpc.insecure_channel(target)
            st.start(ch.unary_stream("/plugin.GRPCStdio/StreamStdio"))
            st.wait(lambda: b"line 10\n" in st.out, 30, "the child's lines")
            loop = W8Calls(ch.unary_unary("/grpc.health.v1.Health/Check"))
            loop.start()
            # Warm-up, then phase 1: the same loop, stdio streaming, no
            # swap.
            loop.wait_calls(nwarm, 60)
            i1 = len(loop.t1)
            loop.wait_calls(i1 + ncalls, 120 + ncalls / 100.0)
            i2 = len(loop.t1)
            # Phase 2: the swaps.
            windows = []
            for i in range(1, nswaps + 1):
                t_sig = time.monotonic_ns()
                os.kill(p.p.pid, signal.SIGHUP)
                st.wait(lambda: len(st.swaps) >= i or st.failed_swaps, 30,
                        "the log line of swap %d" % i)
                if st.failed_swaps:
                    raise BenchError("swap %d: %s" % (i, st.failed_swaps[0]))
                sw = st.swaps[i - 1]
                if sw["n"] != i:
                    raise BenchError("swap %d logged as %r" % (i, sw["line"]))
                windows.append((t_sig, sw["t_seen"]))
                # A call that started after this swap's line, before the
                # next swap (the one in flight finishes, the next one too).
                loop.wait_calls(len(loop.t1) + 2, 30)
            i3 = len(loop.t1)
            loop.stop.set()
            loop.join(30)
            if loop.is_alive():
                raise BenchError("the Health loop did not end")
            # Every stdout line exactly once and in order.
            with open(stop, "w"):
                pass
            st.wait(lambda: re.search(rb"done \d+\n", st.out), 60,
                    "the child's last line")
            out = bytes(st.out).decode()
            nlines = int(re.search(r"done (\d+)\n", out).group(1))
            lines_ok = out == "".join("line %d\n" % j
                                      for j in range(nlines)) + \
                "done %d\n" % nlines
            lost = nlines - len(re.findall(r"^line \d+$", out, re.M))
            shut_err = None
            try:
                ch.unary_unary("/plugin.GRPCController/Shutdown")(
                    b"", timeout=30)
            except grpc.RpcError as e:  # the reply may lose the race
                shut_err = "%s" % e.code()
            st.wait(lambda: st.status is not None, 30, "the end of stdio")
            rc = p.finish(30)
        finally:
            if loop is not None:
                loop.stop.set()
            if ch is not None:
                ch.close()
            p.kill()
            shutil.rmtree(work, ignore_errors=True)
        t0, t1 = loop.t0, loop.t1
        normal = sorted((t1[k] - t0[k]) / 1e6 for k in range(i1, i2))
        during = sorted((t1[k] - t0[k]) / 1e6 for k in range(i2, i3))
        # Calls that overlapped a swap: started before its log line
        # arrived, ended after its SIGHUP.
        overlap = 0.0
        k = i2
        for ws, we in windows:
            while k < i3 and t1[k] < ws:
                k += 1
            j = k
            while j < i3 and t0[j] < we:
                overlap = max(overlap, (t1[j] - t0[j]) / 1e6)
                j += 1
        # Where the failed calls were: phase, and the swaps they overlapped
        # (swap n goes to the recorder when odd, back when even).
        where = []
        for k in loop.failed_at:
            if k < i1:
                where.append({"call": k, "phase": "warm-up"})
            elif k < i2:
                where.append({"call": k, "phase": 1})
            elif k < i3:
                over = [n + 1 for n, (ws, we) in enumerate(windows)
                        if t0[k] < we and t1[k] > ws]
                where.append({"call": k, "phase": 2, "swaps": over,
                              "ms": (t1[k] - t0[k]) / 1e6})
            else:
                where.append({"call": k, "phase": "after"})
        swaps = sorted(s["ms"] for s in st.swaps[:nswaps])
        switch = sorted(s["switch_ms"] for s in st.swaps[:nswaps])
        return {
            "swaps": nswaps, "swap_ms": [s["ms"] for s in st.swaps],
            "swap_p50_ms": med(swaps), "swap_p99_ms": pct(swaps, 0.99),
            "swap_max_ms": swaps[-1],
            "switch_p50_ms": med(switch), "switch_p99_ms": pct(switch, 0.99),
            "handed_over": sum(1 for s in st.swaps if s["handed_over"]),
            "normal_calls": len(normal), "normal_p50_ms": med(normal),
            "normal_p99_ms": pct(normal, 0.99), "normal_max_ms": normal[-1],
            "swap_phase_calls": len(during),
            "swap_phase_p50_ms": med(during),
            "swap_phase_p99_ms": pct(during, 0.99),
            "longest_ms": during[-1], "longest_overlapping_ms": overlap,
            "longest_calls_ms": during[-10:][::-1],
            "stall_beyond_p99_ms": during[-1] - pct(normal, 0.99),
            "stall_ratio": during[-1] / pct(normal, 0.99),
            "swap_phase_s": (t1[i3 - 1] - t0[i2]) / 1e9,
            "failed_calls": loop.failures, "failures": loop.errors[:5],
            "failed_where": where,
            "calls_total": len(t1), "stdio_lines": nlines,
            "stdio_lines_in_order": lines_ok, "stdio_lines_lost": lost,
            "stdio_status": str(st.status), "shutdown_error": shut_err,
            "host_exit": rc, "host_messages": st.other[:20]}

    def w8(self):
        """Live swap under traffic: rpcplugin-host serving the services
        module (manifests/host.json) with --swap-to the recorder
        (host-recorder.json), a child printing numbered lines; one grpcio
        client streams stdio and calls Health/Check in a loop.  Phase 1:
        the call's normal latency; phase 2: SIGHUP swaps, each waited for
        on its log line (the host's stderr, i.e. stdio channel 2)."""
        host = self.find_host()
        try:
            import grpc  # noqa: F401
            why = None
        except ImportError:
            why = "python3-grpcio is not installed"
        if not host:
            why = "rpcplugin-host not built"
        if not why:
            man, man2, why = self.w8_modules()
        if why:
            self.row("W8", "live swap", "skipped", "skipped: " + why)
            self.results["W8"] = {"skipped": why}
            return
        nswaps = 20 if self.quick else 200
        ncalls = 1000 if self.quick else 10000
        nwarm = 100 if self.quick else 500
        runs, errors = [], []
        for rep in range(self.reps):
            self.log("W8 rep %d/%d: %d calls, then %d swaps under calls" % (
                rep + 1, self.reps, ncalls, nswaps))
            try:
                runs.append(self.w8_once(host, man, man2, nswaps, ncalls,
                                         nwarm))
            except BenchError as e:
                errors.append(str(e))
                self.log("W8 failed: %s" % e)
        self.results["W8"] = {"runs": runs, "errors": errors,
                              "swaps": nswaps, "normal_calls": ncalls,
                              "manifests": [man, man2]}
        for e in errors:
            self.row("W8", "-", "error", e)
        if not runs:
            return

        def fig(case, figure, key, unit=" ms", target=None):
            v = [r[key] for r in runs]
            self.row("W8", case, figure, med(v), spread(v), unit=unit,
                     target=target)

        sw = "%d swaps services <-> recorder (SIGHUP)" % nswaps
        fig(sw, "swap p50", "swap_p50_ms")
        fig(sw, "swap p99", "swap_p99_ms", target="< 5 ms")
        fig(sw, "swap max", "swap_max_ms")
        fig(sw, "switch p99 (in the swap)", "switch_p99_ms")
        nc = "Health/Check, no swaps (phase 1) x%d" % ncalls
        fig(nc, "normal call p50", "normal_p50_ms")
        fig(nc, "normal call p99", "normal_p99_ms")
        fig(nc, "normal call max", "normal_max_ms")
        dc = "Health/Check during the swaps (phase 2)"
        fig(dc, "calls", "swap_phase_calls", unit="")
        fig(dc, "call p99", "swap_phase_p99_ms")
        fig(dc, "longest call", "longest_ms")
        fig(dc, "longest call overlapping a swap", "longest_overlapping_ms")
        v = [r["stall_beyond_p99_ms"] for r in runs]
        self.row("W8", "longest call during swaps - normal p99",
                 "stall beyond normal p99", med(v), spread(v), unit=" ms",
                 target="<= 1 ms")
        v = [r["stall_ratio"] for r in runs]
        self.row("W8", "longest call during swaps / normal p99", "ratio",
                 med(v), spread(v), ratio=True)
        self.ratios.append(("W8 swap p99 / 5 ms",
                            med([r["swap_p99_ms"] for r in runs]), 5.0,
                            False))
        self.ratios.append(("W8 longest call / (normal p99 + 1 ms)",
                            med([r["longest_ms"] for r in runs]),
                            med([r["normal_p99_ms"] + 1.0 for r in runs]),
                            False))
        failed = sum(r["failed_calls"] for r in runs)
        total = sum(r["calls_total"] for r in runs)
        self.row("W8", "all calls, all reps", "failed calls",
                 "%d of %d" % (failed, total))
        bad = [r for r in runs if not r["stdio_lines_in_order"]]
        self.row("W8", "stdio: the child's numbered lines",
                 "arrived", "all, once, in order (%s lines)" % "/".join(
                     str(r["stdio_lines"]) for r in runs) if not bad else
                 "NOT ALL: lost %s" % "/".join(
                     str(r["stdio_lines_lost"]) for r in runs))
        ho = [r["handed_over"] for r in runs]
        if any(h != nswaps for h in ho):
            self.row("W8", sw, "streams handed over", "/".join(map(str, ho)))
        if failed:
            kinds = sorted(set(e for r in runs for e in r["failures"]))
            phases = [w["phase"] for r in runs for w in r["failed_where"]]
            over = [w.get("swaps") for r in runs for w in r["failed_where"]
                    if w["phase"] == 2]
            self.row("W8", "-", "error",
                     "%d calls failed (%s); phase of each: %s; swaps each "
                     "phase-2 failure overlapped: %s" % (
                         failed, "; ".join(kinds), phases, over))
        if bad:
            self.row("W8", "-", "error", "stdio lines lost or reordered")
        odd = [(r["stdio_status"], r["host_exit"]) for r in runs
               if r["stdio_status"] != "OK" or r["host_exit"] != 0]
        if odd:
            self.row("W8", "-", "error", "after Shutdown: stdio status / "
                     "host exit code %s" % odd)

    def run(self):
        started = datetime.datetime.now().astimezone()
        self.results["meta"] = {
            "date": started.isoformat(timespec="seconds"),
            "host": platform.node(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "quick": self.quick, "reps": self.reps,
            "loadavg_start": os.getloadavg(),
            "grpc_core": subprocess.run(
                ["pkg-config", "--modversion", "grpc"], capture_output=True,
                text=True).stdout.strip(),
            "git_head": self.git("rev-parse", "--short", "HEAD"),
            "git_dirty": self.git("status", "--porcelain", "--", "module",
                                  "host-api", "common", "CMakeLists.txt"
                                  ).splitlines()}
        t0 = time.monotonic()
        for w, fn in (("W1", self.w1), ("W4", self.w4), ("W5", self.w5),
                      ("W6", self.w6), ("W2", self.w2), ("W3", self.w3),
                      ("W3", self.shutdown_rtt), ("W7", self.w7),
                      ("W8", self.w8), ("W9", self.w9)):
            if not self.wants(w):
                continue
            try:
                fn()
            except BenchError as e:
                self.row(w, "-", "error", str(e))
                self.log("%s failed: %s" % (w, e))
        self.results["meta"]["seconds"] = time.monotonic() - t0
        self.results["meta"]["loadavg_end"] = os.getloadavg()
        self.results["table"] = [
            {"workload": r[0], "case": r[1], "figure": r[2], "value": r[3],
             "spread": r[4], "ratio": bool(r[6]), "target": r[7],
             "unit": r[8]} for r in self.rows]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            self.print_table()
        sys.stdout.write(buf.getvalue())
        # A --quick smoke run never overwrites the figures of a full run.
        stem = "results-quick" if self.quick else "results"
        if self.only:  # a partial run never overwrites a full one either
            stem += "-only-" + "-".join(sorted(self.only))
        with open(os.path.join(self.bin, stem + ".txt"), "w") as f:
            f.write(buf.getvalue())
        out = os.path.join(self.bin, stem + ".json")
        with open(out, "w") as f:
            json.dump(self.results, f, indent=1)
        print("\nraw figures: %s" % out)
        png = self.plot(stem)
        if png:
            print("plot: %s" % png)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def git(self, *args):
        try:
            return subprocess.run(["git", "-C", ROOT] + list(args),
                                  capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    def print_table(self):
        m = self.results["meta"]
        print("\nsource: git %s%s" % (
            m["git_head"] or "?",
            ", with uncommitted changes in: " + " ".join(
                sorted(set(l.split(None, 1)[-1] for l in m["git_dirty"])))
            if m["git_dirty"] else ""))
        print("\nrpcplugin benchmarks, %s, %s, %d CPUs, gRPC core %s, "
              "load %.2f -> %.2f%s, %d reps (median [min-max])" % (
                  m["date"], m["kernel"], m["cpus"], m["grpc_core"],
                  m["loadavg_start"][0], m["loadavg_end"][0],
                  ", QUICK" if self.quick else "", self.reps))
        rows = []
        for wl, case, figure, value, sp, _, ratio, target, unit in self.rows:
            if isinstance(value, str):
                v = value
            elif ratio:
                v = "%.2fx" % value
            else:
                v = fmt(value, unit)
            if sp and sp[0] is not None and not isinstance(value, str):
                s = ("[%.2f-%.2f]" % sp) if ratio else "[%s-%s]" % (
                    fmt(sp[0]), fmt(sp[1]))
            else:
                s = ""
            rows.append((wl, case, figure, v, s, target or ""))
        w = [3, 66, 30, 12, 17, 0]
        hdr = ("wl", "case", "figure", "value", "spread", "target")
        line = "  ".join(h.ljust(w[i]) for i, h in enumerate(hdr)).rstrip()
        print(line)
        print("-" * max(len(line), 140))
        last = None
        for r in rows:
            if last and r[0] != last:
                print()
            last = r[0]
            if len(r[3]) > w[3]:  # a sentence: the rest of the line
                print("  ".join([r[0].ljust(w[0]), r[1].ljust(w[1]),
                                 r[2].ljust(w[2]), r[3]]))
                continue
            print("  ".join([r[0].ljust(w[0]), r[1].ljust(w[1]),
                             r[2].ljust(w[2]), r[3].rjust(w[3]),
                             r[4].ljust(w[4]), r[5]]).rstrip())

    def plot(self, stem):
        if not self.ratios:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(no plot: python3-matplotlib is not installed)")
            return None
        labels = [r[0] for r in self.ratios]
        vals = [r[1] / r[2] if r[3] else r[2] / r[1] for r in self.ratios]
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(labels) + 1.2))
        ax.barh(labels, vals, color=["tab:green" if v >= 1 else "tab:red"
                                     for v in vals])
        ax.axvline(1.0, color="k", lw=1)
        ax.set_xlabel("figure / target (>= 1 meets the target)")
        ax.set_title("rpcplugin: main ratios, %s" %
                     self.results["meta"]["date"])
        fig.tight_layout()
        out = os.path.join(self.bin, stem.replace("results", "ratios", 1) +
                           ".png")
        fig.savefig(out, dpi=90)
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", default="")
    ap.add_argument("--profile", action="store_true",
                    help="callgrind profiles of the module instead")
    ap.add_argument("build")
    a = ap.parse_args()
    reps = a.reps or (1 if a.quick else 3)
    only = set(x.strip().upper() for x in a.only.split(",") if x.strip())
    b = Bench(a.build, a.quick, reps, only)
    try:
        if a.profile:
            b.profile()
        else:
            b.run()
    finally:
        shutil.rmtree(b.tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
