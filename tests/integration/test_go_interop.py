"""Interop with a real go-plugin client: Debian's go-plugin v1.0.1 (GOPATH
mode), through tests/go's gpclient, against the test host and the default
manifest.  Also checks gpclient/gpserver against each other, since gpserver
is the go-plugin anchor of the benchmarks.

Environment: RP_GO_BIN, the directory holding gpclient and gpserver
(tests/go/build.sh OUTDIR puts them in OUTDIR/bin); the tests are skipped
only when it is unset.

Synchronisation: gpclient prints one line per step and the test answers on
the test host's stdin when it sees the line it waits for (every wait has a
timeout).  go-plugin's broker.Dial waits a fixed 5 s for the peer's
ConnInfo, so the test host's "advertise" is sent as soon as gpclient says
"DIALING".
"""
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import SLOW, manifest_path, write_manifest

GO_BIN = os.environ.get("RP_GO_BIN")
pytestmark = pytest.mark.skipif(
    not GO_BIN,
    reason="RP_GO_BIN is not set: build the Go programs with "
           "tests/go/build.sh OUTDIR and set RP_GO_BIN=OUTDIR/bin")

DEFAULT = manifest_path("default.json")
HEALTH = "/grpc.health.v1.Health/Check"


def go_program(name):
    for d in (GO_BIN, os.path.join(GO_BIN, "bin")):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    raise AssertionError("RP_GO_BIN=%s has no executable %s "
                         "(run tests/go/build.sh)" % (GO_BIN, name))


class GoProc:
    """A running gpclient: its stdout lines are read by a thread; expect()
    waits for the next line with a prefix, failing on FAIL, EOF or timeout."""

    def __init__(self, args, tmpdir, stdin=True):
        env = dict(os.environ)
        # go-plugin v1.0.1 puts its unix sockets in TMPDIR, and a plugin's
        # AcceptAndServe sockets are never removed (see tests/go/README.md).
        env["TMPDIR"] = tmpdir
        self.stderr_path = os.path.join(tmpdir, "gpclient.stderr")
        self._stderr = open(self.stderr_path, "w")
        self.cmd = [go_program("gpclient")] + args
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=self._stderr, env=env, text=True,
            bufsize=1)
        self.lines = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _explain(self, why):
        self._stderr.flush()
        with open(self.stderr_path) as f:
            err = f.read()[-4000:]
        return "%s\ncommand: %s\nstdout so far:\n  %s\nstderr (tail):\n%s" % (
            why, " ".join(self.cmd), "\n  ".join(self.seen), err)

    def expect(self, prefix, timeout=20):
        """The next line starting with prefix (other lines are skipped)."""
        deadline = time.monotonic() + timeout * SLOW
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(self._explain("no line %r" % prefix))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                raise AssertionError(self._explain("no line %r" % prefix))
            if line is None:
                raise AssertionError(self._explain(
                    "gpclient ended before %r" % prefix))
            self.seen.append(line)
            if line.startswith(prefix):
                return line
            if line.startswith("FAIL"):
                raise AssertionError(self._explain(line))

    def until(self, prefix, timeout=30):
        """All lines up to and including the first starting with prefix,
        for steps whose lines may interleave."""
        start = len(self.seen)
        self.expect(prefix, timeout)
        return self.seen[start:]

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout=20):
        rc = self.proc.wait(timeout=timeout * SLOW)
        assert rc == 0, self._explain("gpclient exited %d" % rc)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


@pytest.fixture
def gpclient():
    procs, dirs = [], []

    def start(args, **kw):
        d = tempfile.mkdtemp(prefix="rpgo-")
        dirs.append(d)
        p = GoProc(args, d, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def reattach_args(host, *extra):
    if host.address.startswith("unix:"):
        net, addr = "unix", host.sock
    else:
        net, addr = "tcp", host.target
    return (["reattach", "--pid", str(host.proc.pid),
             "--timeout", "%ds" % int(15 * SLOW)] + list(extra) + [net, addr])


def wait_stat(host, key, want, timeout=10, at_least=False):
    """Bounded wait for a host counter to reach a value (state, not an event:
    the host has no line to wait on; counters of sends move when the send
    completes, after the command that queued it answered)."""
    deadline = time.monotonic() + timeout * SLOW
    while True:
        s = host.stats()
        if s[key] == want or (at_least and s[key] >= want):
            return s
        if time.monotonic() > deadline:
            raise AssertionError("%s=%d, expected %s%d: %r" % (
                key, s[key], ">= " if at_least else "", want, s))
        time.sleep(0.02)


def expect_clean_shutdown(host, go):
    """gpclient's GRPCClient.Close sent Controller/Shutdown: the host runs
    its shutdown callback and exits 0."""
    go.expect("CLOSE OK")
    go.expect("DONE")
    go.finish()
    assert host.wait_event("SHUTDOWN_REQUESTED") == "SHUTDOWN_REQUESTED"
    assert host.wait_event("EXIT") == "EXIT 0"
    assert host.wait() == 0


@pytest.mark.parametrize("address", ["unix", "127.0.0.1:0"])
def test_reattach_ping(make_host, gpclient, address):
    """go-plugin's Client.Ping (Health/Check of "plugin") over a reattached
    connection, unix and tcp."""
    host = make_host(DEFAULT, address=None if address == "unix" else address)
    go = gpclient(reattach_args(host, "--hold"))
    line = go.expect("CONNECTED")
    if address == "unix":
        assert line == "CONNECTED unix " + host.sock
    else:
        assert line == "CONNECTED tcp " + host.target
    go.expect("PING OK")
    go.expect("DISPENSED interop")
    go.expect("HOLDING")
    s = host.stats()
    assert s["calls_total"] >= 1, s
    go.send("")
    expect_clean_shutdown(host, go)


def test_broker_stream_comes_up(make_host, gpclient):
    """Client() starts go-plugin's StartStream; the host sees the stream
    open and can send on it, and sees it end when the client goes away."""
    host = make_host(DEFAULT)
    assert host.stats()["broker_streams"] == 0
    go = gpclient(reattach_args(host, "--hold", "--exit", "none"))
    go.expect("DISPENSED interop")
    go.expect("HOLDING")
    wait_stat(host, "broker_streams", 1)
    # an advertisement reaches a stream (ENOTFOUND if none were open)
    assert host.cmd("advertise 77 unix /nonexistent/77") == "OK advertise"
    s = wait_stat(host, "broker_out", 1, at_least=True)
    assert s["broker_errors"] == 0, s
    go.send("")
    go.expect("DONE")
    go.finish()
    wait_stat(host, "broker_streams", 0)
    # the host is still serving after the client left
    assert host.cmd("stats").startswith("OK ")


def test_broker_go_accepts_host_dials(make_host, gpclient):
    """go-plugin's broker.AcceptAndServe(1) sends ConnInfo{1, unix, path}
    on the stream; the host waits for it (broker_wait_advertised), dials it
    and calls Health/Check on the Go health server behind it."""
    host = make_host(DEFAULT)
    go = gpclient(reattach_args(host, "--accept-id", "1", "--hold"))
    go.expect("ACCEPTING 1")
    r = host.cmd("dialadv 1 %d" % int(10000 * SLOW))
    # status 0 (OK) and a 2-byte HealthCheckResponse: {status: SERVING}
    assert r == "OK status=0 bytes=2", r
    go.expect("ACCEPT_SERVED 1 " + HEALTH)
    go.expect("HOLDING")
    s = host.stats()
    assert s["broker_in"] >= 1 and s["broker_errors"] == 0, s
    go.send("")
    expect_clean_shutdown(host, go)


def test_broker_host_advertises_go_dials(make_host, gpclient, tmp_path):
    """The host serves health on a second server and advertises it as id 2
    (broker_advertise); go-plugin's broker.Dial(2) connects to it and its
    Health/Check answers SERVING."""
    host = make_host(DEFAULT)
    sub_manifest = write_manifest(tmp_path, services=["grpc.health.v1.Health"],
                                  name="sub-health")
    sub_sock = os.path.join(os.path.dirname(host.sock), "sub.sock")
    assert host.cmd("subserve %s %s" % (sub_sock, sub_manifest)) == \
        "OK subserve"
    go = gpclient(reattach_args(host, "--dial-id", "2", "--hold"))
    go.expect("DISPENSED interop")
    go.expect("DIALING 2")
    # go-plugin's Dial waits 5 s (fixed) from here for the ConnInfo
    assert host.cmd("advertise 2 unix " + sub_sock) == "OK advertise"
    line = go.expect("DIAL_HEALTH 2")
    assert line.split()[2] == "SERVING", line
    go.expect("HOLDING")
    s = wait_stat(host, "broker_out", 1, at_least=True)
    assert s["broker_errors"] == 0, s
    go.send("")
    expect_clean_shutdown(host, go)


def test_broker_both_ways_one_stream(make_host, gpclient, tmp_path):
    """Both directions on the same broker stream, in one client session."""
    host = make_host(DEFAULT)
    sub_manifest = write_manifest(tmp_path, services=["grpc.health.v1.Health"],
                                  name="sub-health")
    sub_sock = os.path.join(os.path.dirname(host.sock), "sub.sock")
    assert host.cmd("subserve %s %s" % (sub_sock, sub_manifest)) == \
        "OK subserve"
    go = gpclient(reattach_args(host, "--accept-id", "11", "--dial-id", "12"))
    go.expect("PING OK")
    go.expect("ACCEPTING 11")
    assert host.cmd("dialadv 11 %d" % int(10000 * SLOW)) == \
        "OK status=0 bytes=2"
    go.expect("ACCEPT_SERVED 11 " + HEALTH)
    go.expect("DIALING 12")
    assert host.cmd("advertise 12 unix " + sub_sock) == "OK advertise"
    assert go.expect("DIAL_HEALTH 12").split()[2] == "SERVING"
    expect_clean_shutdown(host, go)


# ------------------------------------------------- gpclient launch/gpserver

def parse_kv(line):
    return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)


@pytest.mark.parametrize("automtls", [False, True], ids=["plain", "automtls"])
def test_launch_gpserver(gpclient, automtls):
    """The go-plugin anchor: gpclient launch starts gpserver the go-plugin
    way (magic cookie, handshake line), pings, brokers (client dials ids the
    plugin serves; without AutoMTLS also the plugin dialing back), and
    Kill ends it gracefully (Shutdown, exit 0) well inside the 2 s grace."""
    srv = go_program("gpserver")
    args = ["launch", "--timeout", "%ds" % int(15 * SLOW),
            "--broker-dial", "2"]
    srv_args = ["--broker-serve", "2"]
    if automtls:
        args.append("--automtls")
    else:
        # go-plugin v1.0.1 cannot dial plugin -> host under AutoMTLS (its
        # server-side broker TLS config has no ServerName): plain only.
        args += ["--broker-accept", "1"]
        srv_args += ["--broker-dial-back", "1"]
    go = gpclient(args + ["--", srv] + srv_args, stdin=False)
    hs = parse_kv(go.expect("HANDSHAKE"))
    assert hs["network"] == "unix" and hs["protocol"] == "grpc", hs
    assert hs["version"] == "1" and hs["tls"] == str(automtls).lower(), hs
    lines = go.until("DONE")
    assert any(l.startswith("PING OK") for l in lines), lines
    assert "BROKER_STREAM started" in lines
    for i in (1, 2):
        dial = [l for l in lines if l.startswith("DIAL_HEALTH %d " % i)]
        assert len(dial) == 1 and dial[0].split()[2] == "SERVING", lines
    if not automtls:
        # The plugin's call over the brokered connection reached the client.
        # (gpserver's own report of it comes on its stderr, which go-plugin
        # relays with no ordering against these lines: not asserted.)
        assert "ACCEPT_SERVED 101 " + HEALTH in lines, lines
    kill = parse_kv([l for l in lines if l.startswith("KILL ")][0])
    assert kill["graceful"] == "true" and kill["exit_code"] == "0", kill
    assert float(kill["elapsed_ms"]) < 2000, kill
    go.finish()


def test_launch_stdio_and_kill(make_host, gpclient, tmp_path):
    """gpclient launch against a plugin whose gRPC server is the test host:
    the plugin process is a script that prints the handshake line for the
    host's socket and never exits.  Lines put before the client connects
    arrive over StreamStdio in order; Kill's Controller/Shutdown reaches the
    host (which exits 0 and ends the stdio stream with OK); the script
    itself ignores it, so go-plugin kills it after its fixed 2 s grace."""
    host = make_host(DEFAULT)
    assert host.cmd("putseq 1 5 64") == "OK putseq 5"
    assert host.cmd("put 2 0065720a") == "OK put"      # "\0er\n"
    script = tmp_path / "plugin.sh"
    script.write_text("#!/bin/sh\necho '1|1|unix|%s|grpc'\nexec sleep 60\n"
                      % host.sock)
    script.chmod(0o755)
    go = gpclient(["launch", "--timeout", "%ds" % int(15 * SLOW), "--stdio",
                   "--stdio-print", "--stdio-expect-lines", "6", "--",
                   str(script)], stdin=False)
    lines = go.until("DONE")
    hs = parse_kv([l for l in lines if l.startswith("HANDSHAKE ")][0])
    assert hs["network"] == "unix" and hs["address"] == host.sock, hs
    stdio = [l for l in lines if l.startswith("STDIO STD")]
    want = ['STDIO STDOUT "%08d%s\\n"' % (i, "".join(
        chr(ord("a") + k % 26) for k in range(8, 63))) for i in range(5)]
    want.append('STDIO STDERR "\\x00er\\n"')
    assert stdio == want, lines
    assert "STDIO_LINES 6" in lines, lines
    kill = parse_kv([l for l in lines if l.startswith("KILL ")][0])
    assert kill["graceful"] == "false" and kill["signal"] == '"killed"', kill
    assert float(kill["elapsed_ms"]) >= 1900, kill     # v1.0.1's 2 s grace
    end = parse_kv([l for l in lines if l.startswith("STDIO_END ")][0])
    assert end == {"messages": "6", "bytes": str(5 * 64 + 4), "lines": "6",
                   "status": "OK"}, end
    go.finish()
    assert host.wait_event("SHUTDOWN_REQUESTED") == "SHUTDOWN_REQUESTED"
    assert host.wait_event("EXIT") == "EXIT 0"
