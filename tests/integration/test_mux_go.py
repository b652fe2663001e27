"""rpcplugin-host with go-plugin's gRPC broker multiplexing (go-plugin >= 1.6,
GRPCBrokerMultiplex), driven by tests/go's `gpmux`: a client that follows
go-plugin v1.8.0's client muxer (PLUGIN_MULTIPLEX_GRPC=true in the
environment, a 7-field handshake line ending in `true`, ONE connection with
a yamux session on it carrying the main gRPC connection, the broker's
knocks and every brokered connection).  gpmux starts the host itself
(--plugin, with sh -c) and prints one `OK <step> ...` line per step.

Covered, each with and without AutoMTLS: Health, StreamStdio and Shutdown
over the one connection; the bidirectional example (Counter.Put makes the
plugin knock and open a stream back to the client's AddHelper); and
`stats` (one net.Dial for everything).  Also: a knock for an id the client
does not serve (its ack carries an error), and a deliberately slow stdio
reader (windows exhausted) while Health keeps answering.

Environment: RP_GO_BIN (tests/go/build.sh OUTDIR puts gpmux in OUTDIR/bin),
RP_BUILD.  The tests skip when RP_GO_BIN is unset.
"""
import os
import re
import shlex
import shutil
import subprocess
import tempfile

import pytest

from conftest import BUILD, SLOW
from hostutil import HOST_BIN, HOST_MANIFEST

GO_BIN = os.environ.get("RP_GO_BIN")
pytestmark = pytest.mark.skipif(
    not GO_BIN,
    reason="RP_GO_BIN is not set: build the Go programs with "
           "tests/go/build.sh OUTDIR and set RP_GO_BIN=OUTDIR/bin")

COUNTER_MANIFEST = os.path.join(BUILD, "examples", "bidirectional",
                                "bidirectional.json")
COOKIE = "BASIC_PLUGIN=hello"  # gpmux's default, the examples' handshake
NOT_READY = "client requested gRPC broker multiplexing but plugin does not"


def gpmux():
    for d in (GO_BIN, os.path.join(GO_BIN or "", "bin")):
        p = os.path.join(d, "gpmux")
        if os.access(p, os.X_OK):
            return p
    raise AssertionError("RP_GO_BIN=%s has no gpmux (run tests/go/build.sh)"
                         % GO_BIN)


def clean_env(tmpdir):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PLUGIN_") and k != "BASIC_PLUGIN"}
    env["TMPDIR"] = tmpdir  # the host's socket folder goes here
    env["RPCPLUGIN_MODULE_PATH"] = os.path.join(BUILD, "lib")
    return env


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="rp-mux-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def host_cmd(manifest, command=None, options=()):
    argv = [HOST_BIN, "--magic-cookie", COOKIE] + list(options) + [manifest]
    if command:
        argv += ["--"] + list(command)
    return " ".join(shlex.quote(a) for a in argv)


def lines_child(n, then="exec sleep 60"):
    """A COMMAND that prints "line 1".."line n" on stdout, then `then`."""
    return ["/bin/sh", "-c",
            'i=1; while [ $i -le %d ]; do echo "line $i"; i=$((i+1)); done; %s'
            % (n, then)]


class Run:
    """One gpmux run: rc, its OK lines by step, stdout and stderr."""

    def __init__(self, workdir, plugin, steps, automtls=False, timeout=20):
        argv = [gpmux(), "--timeout", "%ds" % int(timeout * SLOW),
                "--plugin", plugin] + (["--automtls"] if automtls else []) + \
            [str(s) for s in steps]
        r = subprocess.run(argv, cwd=workdir, env=clean_env(workdir),
                           stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=180 * SLOW)
        self.rc = r.returncode
        self.out = r.stdout.decode(errors="replace")
        self.err = r.stderr.decode(errors="replace")
        assert NOT_READY not in self.err, self.err
        self.ok = [l.split(" ", 2)[1:] for l in self.out.splitlines()
                   if l.startswith("OK ")]

    def check(self):
        assert self.rc == 0, "gpmux failed (rc %d)\nstdout:\n%s\nstderr:\n%s" \
            % (self.rc, self.out, self.err[-6000:])
        return self

    def steps(self, name):
        """The detail strings of every OK line of step name, in order."""
        return [l[1] if len(l) > 1 else "" for l in self.ok if l[0] == name]

    def kv(self, name, i=0):
        return dict(re.findall(r"(\w+)=(\S+)", self.steps(name)[i]))


def check_shutdown(run):
    s = run.kv("shutdown")
    assert s["rpc"] == "OK", s
    assert s.get("exit") == "0", s
    assert s["session_closed"] == "true", s
    return s


@pytest.mark.parametrize("automtls", [False, True], ids=["plain", "automtls"])
def test_health_stdio_shutdown_one_connection(workdir, automtls):
    """Health, StreamStdio (lines written before and after the client
    connected) and Shutdown, all as streams of the one yamux session."""
    plugin = host_cmd(HOST_MANIFEST, lines_child(100))
    r = Run(workdir, plugin, ["health", "stdio", "line 3", "stdiocount", 97,
                              "health", "stats", "shutdown", "stats"],
            automtls=automtls).check()
    hs = r.kv("handshake")
    assert hs["fields"] == "7" and hs["mux"] == "true", hs
    assert hs["tls"] == ("true" if automtls else "false"), hs
    assert r.steps("health") == ["SERVING", "SERVING"]
    assert r.steps("stdiocount")[0].startswith("97 lines=4..100 "), r.out
    st = r.kv("stats")
    # One connection; one stream for the main gRPC connection carrying
    # Health, StreamStdio, StartStream and Shutdown.
    assert st["dials"] == "1", st
    assert st["streams_opened"] == "1", st
    assert st["streams_accepted"] == "0" and st["stray"] == "0", st
    s = check_shutdown(r)
    assert s["stdio_end"] == "OK", s  # the host ends StreamStdio with OK
    assert r.kv("stats", 1)["dials"] == "1"
    # The host removed its socket folder.
    assert not [n for n in os.listdir(workdir) if n.startswith("rpcplugin-")]


@pytest.mark.parametrize("automtls", [False, True], ids=["plain", "automtls"])
def test_counter_calls_back_through_knock(workdir, automtls):
    """examples/bidirectional over one connection: each Put makes the
    plugin knock for add_server, wait for the client's ack, open a yamux
    stream and call AddHelper.Sum over it (TLS both ways under AutoMTLS)."""
    plugin = host_cmd(COUNTER_MANIFEST)
    r = Run(workdir, plugin, ["put", "c", 1, "put", "c", 41, "put", "c", -50,
                              "get", "c", "stats", "shutdown"],
            automtls=automtls).check()
    puts = r.steps("put")
    assert len(puts) == 3, r.out
    for p in puts:
        assert "sums=1" in p, puts  # the plugin called back once per Put
    assert r.steps("get") == ["c -8"], r.out
    st = r.kv("stats")
    assert st["dials"] == "1", st
    assert st["streams_accepted"] == "3", st  # one stream per callback
    assert st["knocks_in"] == "3" and st["ack_errors_out"] == "0", st
    assert st["stray"] == "0", st
    check_shutdown(r)
    with open(os.path.join(workdir, "kv_c")) as f:
        assert f.read() == '{"Value":-8}'
    # A new plugin process reads the stored value back.
    r = Run(workdir, plugin, ["get", "c", "shutdown"],
            automtls=automtls).check()
    assert r.steps("get") == ["c -8"]


def test_tcp_network(workdir):
    """--network tcp: the one connection is a tcp one on 127.0.0.1."""
    plugin = host_cmd(COUNTER_MANIFEST, options=["--network", "tcp"])
    r = Run(workdir, plugin, ["health", "put", "t", 2, "get", "t", "stats",
                              "shutdown"]).check()
    assert r.kv("handshake")["network"] == "tcp"
    assert r.steps("get") == ["t 2"], r.out
    assert r.kv("stats")["dials"] == "1"
    check_shutdown(r)


def test_client_dials_a_service_the_host_brokered(workdir):
    """go-plugin's Dial of a service the plugin brokered (here
    --broker-accept 5:unix:PATH, a grpcio Health server): knock, ack, a
    stream, Health/Check over it; a knock for an id the host does not
    serve gets go-plugin's "no listener for id N" and the dial fails."""
    from brokerutil import health_server
    side = os.path.join(workdir, "side.sock")
    srv, _ = health_server("unix:" + side)
    try:
        plugin = host_cmd(HOST_MANIFEST,
                          options=["--broker-accept", "5:unix:" + side])
        r = Run(workdir, plugin, ["dial", 5, "health", "dial", 5,
                                  "dialfail", 6, "stats",
                                  "shutdown"]).check()
        assert [d.split(" ms=")[0] for d in r.steps("dial")] == \
            ["5 SERVING", "5 SERVING"], r.out
        assert "no listener for id 6" in r.steps("dialfail")[0], r.out
        st = r.kv("stats")
        assert st["dials"] == "1", st
        assert st["streams_opened"] == "3", st  # main, two dials
        check_shutdown(r)
    finally:
        srv.stop(None)


def test_stats_one_dial_for_everything(workdir):
    """The counter plugin with a COMMAND: Health, StreamStdio, the broker
    stream, a callback stream and Shutdown, and still one net.Dial."""
    plugin = host_cmd(COUNTER_MANIFEST, lines_child(10))
    r = Run(workdir, plugin, ["health", "stdiocount", 10, "put", "k", 5,
                              "get", "k", "health", "stats", "shutdown",
                              "stats"]).check()
    st = r.kv("stats")
    assert st["dials"] == "1", st
    assert st["streams_opened"] == "1", st
    assert st["streams_accepted"] == "1", st
    assert r.steps("get") == ["k 5"]
    check_shutdown(r)
    assert r.kv("stats", 1)["dials"] == "1"


def test_knock_for_unserved_id(workdir):
    """Put with an add_server id the client does not serve: the client acks
    the plugin's knock with "no listener for id N"; the plugin must fail the
    call (not hang, not open a stream), and the next Put still works."""
    plugin = host_cmd(COUNTER_MANIFEST)
    r = Run(workdir, plugin, ["putfail", "u", 1, "put", "u", 2, "get", "u",
                              "stats", "shutdown"]).check()
    pf = r.kv("putfail")
    assert pf["ack_errors_out"] == "1", r.steps("putfail")
    assert r.steps("get") == ["u 2"]
    st = r.kv("stats")
    assert st["streams_accepted"] == "1" and st["knocks_in"] == "2", st
    check_shutdown(r)


@pytest.mark.parametrize("automtls", [False, True], ids=["plain", "automtls"])
def test_slow_stdio_reader(workdir, automtls):
    """About 540 KB of output (seq writes it in large blocks, so the host
    sends ~15-35 KB messages) read slowly, 100 ms after each message: more
    than yamux's 256 KiB stream window plus HTTP/2's stays queued for
    seconds.  Every line arrives once, in order, and Health keeps answering
    on the same session meanwhile (gpmux probes it every 100 ms during the
    read; none may fail).  The child keeps running, so that Shutdown is not
    racing the host's exit-with-child path (which answers UNAVAILABLE)."""
    n = 50000
    child = ["/bin/sh", "-c", "seq -f 'line %%.0f' 1 %d; exec sleep 60" % n]
    plugin = host_cmd(HOST_MANIFEST, child)
    r = Run(workdir, plugin, ["slowstdio", n, 100, "health", "stats",
                              "shutdown"], automtls=automtls,
            timeout=60).check()
    s = r.kv("slowstdio")
    assert s["lines"] == "1..%d" % n, s
    assert int(s["probes"]) >= 1, s
    assert r.kv("stats")["dials"] == "1"
    s = check_shutdown(r)
    assert s["stdio_end"] == "OK", s
