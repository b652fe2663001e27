"""rpcplugin-host launched by HashiCorp's own client: Debian's go-plugin
v1.0.1, through tests/go's `gpclient launch` (exec with the magic cookie
and PLUGIN_PROTOCOL_VERSIONS, handshake line from stdout, Client(), Ping(),
broker stream, Dispense, Kill()).  Over unix and tcp, with and without
AutoMTLS, with and without a child command; Kill() must end gracefully
(exit 0, no SIGKILL) well inside go-plugin's 2 s grace period.

Environment: RP_GO_BIN, the directory holding gpclient (tests/go/build.sh
OUTDIR puts it in OUTDIR/bin); the tests are skipped only when it is
unset.  A go-plugin client whose certificate is not the one the host was
told to trust fails (the plugin is started through env(1) with another
PLUGIN_CLIENT_CERT); more certificate cases are in test_host_tls.py.
"""
import ast
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from conftest import BUILD, SLOW
from hostutil import HOST_BIN, HOST_MANIFEST, make_cert

GO_BIN = os.environ.get("RP_GO_BIN")
pytestmark = pytest.mark.skipif(
    not GO_BIN,
    reason="RP_GO_BIN is not set: build the Go programs with "
           "tests/go/build.sh OUTDIR and set RP_GO_BIN=OUTDIR/bin")

# gpclient's default handshake cookie.
COOKIE = "--magic-cookie=RPCPLUGIN_INTEROP_COOKIE=rpcplugin-interop"
KILL_BOUND_MS = 1000  # go-plugin's Kill() waits 2000 ms, then SIGKILLs


def gpclient():
    for d in (GO_BIN, os.path.join(GO_BIN, "bin")):
        p = os.path.join(d, "gpclient")
        if os.access(p, os.X_OK):
            return p
    raise AssertionError("RP_GO_BIN=%s has no gpclient (run tests/go/"
                         "build.sh)" % GO_BIN)


@pytest.fixture
def tmpdir_clean():
    d = tempfile.mkdtemp(prefix="rph-go-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def launch(tmpdir, client_args, host_args, command=None, timeout=60,
           wrapper=(), env_extra=None):
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("PLUGIN_"):
            del env[k]
    env.update(env_extra or {})
    env["TMPDIR"] = tmpdir  # the host's socket directory goes here
    env["RPCPLUGIN_MODULE_PATH"] = os.path.join(BUILD, "lib")
    argv = ([gpclient(), "launch", "--timeout=%ds" % int(10 * SLOW)] +
            client_args + ["--"] + list(wrapper) + [HOST_BIN] + host_args +
            [HOST_MANIFEST])
    if command:
        argv += ["--"] + command
    r = subprocess.run(argv, env=env, capture_output=True,
                       timeout=timeout * SLOW)
    out = r.stdout.decode(errors="replace")
    return r.returncode, out.splitlines(), r.stderr.decode(errors="replace")


def field(lines, prefix):
    for line in lines:
        if line.startswith(prefix):
            return line
    raise AssertionError("no %r line in:\n%s" % (prefix, "\n".join(lines)))


def stdio_text(lines, channel):
    """The concatenated data of gpclient's `STDIO <CHANNEL> "<Go-quoted>"`
    lines."""
    prefix = "STDIO %s " % channel
    return "".join(ast.literal_eval(l[len(prefix):]) for l in lines
                   if l.startswith(prefix))


def kv(line):
    return dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line))


@pytest.mark.parametrize("mux", [False, True], ids=["", "mux-false"])
@pytest.mark.parametrize("automtls", [False, True], ids=["plain", "automtls"])
@pytest.mark.parametrize("network", ["unix", "tcp"])
def test_go_plugin_client(tmpdir_clean, network, automtls, mux):
    """With PLUGIN_MULTIPLEX_GRPC set to a false value (a stray variable:
    go-plugin clients set only "true", see test_mux_go.py), the line keeps
    its 5 or 6 fields: a v1.0.1 client, which splits it into at most 6,
    still works."""
    client = ["--automtls"] if automtls else []
    rc, lines, err = launch(tmpdir_clean, client,
                            [COOKIE, "-vv", "--network", network],
                            env_extra={"PLUGIN_MULTIPLEX_GRPC": "false"}
                            if mux else None)
    assert rc == 0, "\n".join(lines) + err
    hs = kv(field(lines, "HANDSHAKE"))
    assert hs["network"] == network and hs["protocol"] == "grpc"
    assert hs["version"] == "1"
    assert hs["tls"] == ("true" if automtls else "false")
    assert field(lines, "PING OK")
    assert field(lines, "DISPENSED interop")
    assert field(lines, "BROKER_STREAM started")
    k = kv(field(lines, "KILL"))
    assert k["graceful"] == "true" and k["exit_code"] == "0"
    assert k["signal"] == '"none"' and k["exited"] == "true"
    assert float(k["elapsed_ms"]) < KILL_BOUND_MS * SLOW, k
    assert lines[-1] == "DONE"
    notes = [l for l in lines if "serving without multiplexing" in l]
    assert len(notes) == (1 if mux else 0), lines
    # The host's socket directory is gone with it.
    assert not [n for n in os.listdir(tmpdir_clean)
                if n.startswith("rpcplugin-")]


@pytest.mark.parametrize("automtls", [False, True], ids=["plain", "automtls"])
def test_go_client_stdio_and_child(tmpdir_clean, automtls):
    # A child that writes before the client connects and then keeps
    # running; Kill() must still be graceful (the host terminates the
    # child's group), and the StreamStdio call (gpclient's own connection,
    # with the AutoMTLS configuration go-plugin generated) ends with OK.
    # Without -v the child's two lines are the only ones before Kill.
    client = ["--stdio", "--stdio-print", "--stdio-expect-lines", "2"]
    if automtls:
        client.append("--automtls")
    rc, lines, err = launch(
        tmpdir_clean, client, [COOKIE],
        command=["/bin/sh", "-c",
                 "echo early-out; echo early-err >&2; exec sleep 60"])
    assert rc == 0, "\n".join(lines) + err
    # The host hands whole lines over in chunks, so one StdioData may hold
    # several lines (the child's and the host's own): compare the streams.
    out, errs = stdio_text(lines, "STDOUT"), stdio_text(lines, "STDERR")
    assert out == "early-out\n", out
    assert errs.startswith("early-err\n"), errs
    assert "(/bin/sh) was killed by signal 15" in errs
    k = kv(field(lines, "KILL"))
    assert k["graceful"] == "true" and k["exit_code"] == "0", k
    assert float(k["elapsed_ms"]) < (KILL_BOUND_MS + 500) * SLOW, k
    end = kv(field(lines, "STDIO_END"))
    assert end["status"] == "OK", end


def test_go_client_broker_stream_reached_host(tmpdir_clean):
    # gpclient's "BROKER_STREAM started" is the client's view; -vv makes
    # the host print its module's counters when the graceful path begins,
    # and they arrive over StreamStdio: the calls it served were
    # StreamStdio, Health/Check (Ping), StartStream and Shutdown.
    rc, lines, err = launch(tmpdir_clean, ["--stdio", "--stdio-print"],
                            [COOKIE, "-vv"])
    assert rc == 0, "\n".join(lines) + err
    assert field(lines, "BROKER_STREAM started")
    errs = stdio_text(lines, "STDERR")
    stats = [l for l in errs.splitlines() if "module stats:" in l]
    assert stats, errs
    assert int(kv(stats[0])["calls_total"]) >= 4, stats
    assert kv(field(lines, "STDIO_END"))["status"] == "OK"


def test_go_client_version_mismatch(tmpdir_clean):
    # The client speaks 2 only, the host serves 1: as a go-plugin plugin,
    # the host announces 1 and the client refuses with its own message.
    rc, lines, err = launch(tmpdir_clean, ["--app-version", "2"],
                            [COOKIE, "--app-version", "1"])
    assert rc == 1
    fail = field(lines, "FAIL start")
    assert "Incompatible API version with plugin" in fail, fail
    assert any("no common app protocol version" in l for l in lines)


def test_go_client_wrong_cookie(tmpdir_clean):
    rc, lines, err = launch(tmpdir_clean, [],
                            ["--magic-cookie=RPCPLUGIN_INTEROP_COOKIE=other"])
    # The host exits 1 before the handshake (its message goes to stderr,
    # which gpclient may or may not print before it gives up); go-plugin
    # reports either an empty first line or the early exit.
    assert rc == 1
    fail = field(lines, "FAIL start")
    assert ("Unrecognized remote plugin message" in fail or
            "plugin exited before we could connect" in fail), fail
    assert not [l for l in lines if l.startswith("HANDSHAKE")]


@pytest.mark.parametrize("network", ["unix", "tcp"])
def test_go_client_with_another_certificate_is_refused(tmpdir_clean, network):
    """go-plugin's AutoMTLS client presents its own certificate, but the
    host was told (PLUGIN_CLIENT_CERT) to trust another one: the TLS
    handshake fails and the client gets no working connection."""
    other_pem, _ = make_cert()
    rc, lines, err = launch(
        tmpdir_clean, ["--automtls", "--kill-timeout=5s"],
        [COOKIE, "--network", network],
        wrapper=["env", "PLUGIN_CLIENT_CERT=" + other_pem.decode()])
    assert rc == 1, lines
    hs = field(lines, "HANDSHAKE")
    assert "tls=true" in hs, hs
    fail = [l for l in lines if l.startswith("FAIL")]
    assert fail and fail[0].startswith(("FAIL ping", "FAIL start",
                                        "FAIL dispense")), lines
    assert not [l for l in lines if l.startswith("PING OK")]
