"""rpcplugin-host follows the conventions of go-plugin's own plugins
(go-plugin's server.go): SIGINT is ignored, PLUGIN_UNIX_SOCKET_GROUP shares
the socket with one group, PLUGIN_MULTIPLEX_GRPC never adds a field the host
cannot honour; and it loses nothing at its end: a child's output is kept
until a client read it (or the flush deadline passed), a stopping server
answers UNAVAILABLE (never UNIMPLEMENTED), and Shutdown's reply reaches its
caller before the server goes down."""
import grp
import os
import pwd
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest

from conftest import SLOW, health_check, stream_stdio
from hostutil import (COOKIE_KEY, COOKIE_VALUE, DEFAULT_MANIFEST,
                      HOST_BIN, HOST_MANIFEST, Stdio)
import health_pb2
from google.protobuf import empty_pb2


def sh(script):
    return ["/bin/sh", "-c", script]


# ------------------------------------------------------------------ SIGINT

def test_sigint_is_ignored_by_default(hosts, tmp_path):
    """1 s after SIGINT the host still serves and the child's output still
    streams; Shutdown then exits 0."""
    tick = tmp_path / "tick"
    h = hosts(options=["-v"], command=sh(
        'echo started; while :; do if [ -e %s ]; then echo tock; rm %s; fi; '
        'sleep 0.01; done' % (tick, tick)))
    ch = h.channel()
    out = Stdio(ch)
    out.wait_contains(1, b"started\n")
    h.signal(signal.SIGINT)
    # -v: the host says it saw the signal and ignored it.
    out.wait_contains(2, b"ignoring SIGINT")
    time.sleep(1.0)  # the property under test is "still serving 1 s later"
    assert h.proc.poll() is None
    assert h.health(ch) == health_pb2.HealthCheckResponse.SERVING
    tick.touch()
    out.wait_contains(1, b"tock\n")
    h.shutdown(ch)
    assert out.wait_end() == grpc.StatusCode.OK
    assert h.wait() == 0


def test_exit_on_sigint(hosts):
    h = hosts(options=["--exit-on-sigint"])
    ch = h.channel()
    assert h.health(ch) == health_pb2.HealthCheckResponse.SERVING
    d = os.path.dirname(h.handshake.address)
    t0 = time.monotonic()
    h.signal(signal.SIGINT)
    assert h.wait(timeout=2) == 0
    assert time.monotonic() - t0 < 2 * SLOW
    assert not os.path.exists(d)


def test_ignore_sigint_option_still_accepted(hosts):
    h = hosts(options=["--ignore-sigint", "-v"])
    ch = h.channel()
    out = Stdio(ch)
    h.signal(signal.SIGINT)
    out.wait_contains(2, b"ignoring SIGINT")
    assert h.health(ch) == health_pb2.HealthCheckResponse.SERVING
    h.signal(signal.SIGTERM)
    assert out.wait_end() == grpc.StatusCode.OK
    assert h.wait() == 0


# ------------------------------------------------- PLUGIN_UNIX_SOCKET_GROUP

# A health check run as another user, with Debian's grpcio and no generated
# code: HealthCheckRequest{service: "plugin"} is 0a 06 "plugin", SERVING is
# 08 01.  Prints SERVING, or the gRPC status code name.
NOBODY_CLIENT = r"""
import sys, grpc
ch = grpc.insecure_channel("unix:" + sys.argv[1])
try:
    r = ch.unary_unary("/grpc.health.v1.Health/Check")(
        b"\x0a\x06plugin", timeout=float(sys.argv[2]))
    print("SERVING" if r == b"\x08\x01" else "REPLY " + r.hex())
except grpc.RpcError as e:
    print(e.code().name)
"""


def run_as_nobody(socket_path):
    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrnam("nogroup")
    assert nobody.pw_uid != 0
    r = subprocess.run(
        ["setpriv", "--reuid=%d" % nobody.pw_uid,
         "--regid=%d" % nogroup.gr_gid, "--clear-groups",
         sys.executable, "-c", NOBODY_CLIENT, socket_path, str(5 * SLOW)],
        capture_output=True, timeout=30 * SLOW, cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


@pytest.fixture
def shared_tmp():
    """A base folder that user nobody may traverse, with the socket folder
    base made as a go-plugin client makes it for a group (0770, group
    nogroup)."""
    if os.geteuid() != 0:
        pytest.fail("this test runs as root (it switches to user nobody)")
    if not os.stat("/").st_mode & 0o001:
        pytest.fail("/ is not searchable by others: user nobody can run "
                    "nothing (tests/run.sh makes it o+x)")
    d = tempfile.mkdtemp(prefix="rph-grp-")
    os.chmod(d, 0o711)
    socks = os.path.join(d, "sockets")
    os.mkdir(socks)
    os.chown(socks, -1, grp.getgrnam("nogroup").gr_gid)
    os.chmod(socks, 0o770)
    yield d
    subprocess.run(["rm", "-rf", d])


@pytest.mark.parametrize("group", ["nogroup", "gid"])
def test_socket_group_lets_that_group_in(hosts, shared_tmp, group):
    gid = grp.getgrnam("nogroup").gr_gid
    value = "nogroup" if group == "nogroup" else str(gid)
    h = hosts(tmpdir=shared_tmp, env={"PLUGIN_UNIX_SOCKET_GROUP": value})
    sock = h.handshake.address
    d = os.path.dirname(sock)
    st_sock, st_dir = os.stat(sock), os.stat(d)
    assert st_sock.st_gid == gid and st_dir.st_gid == gid
    assert stat.S_IMODE(st_sock.st_mode) == 0o660
    assert stat.S_IMODE(st_dir.st_mode) == 0o710
    assert run_as_nobody(sock) == "SERVING"
    h.shutdown(h.channel())
    assert h.wait() == 0
    assert not os.path.exists(d)


def test_without_socket_group_nobody_cannot_connect(hosts, shared_tmp):
    h = hosts(tmpdir=shared_tmp)
    sock = h.handshake.address
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
    assert run_as_nobody(sock) == "UNAVAILABLE"
    # ...while the owner can.
    assert h.health(h.channel()) == health_pb2.HealthCheckResponse.SERVING


def test_unknown_socket_group_fails_before_handshake(hosts):
    h = hosts(env={"PLUGIN_UNIX_SOCKET_GROUP": "no-such-group-rp"},
              wait_handshake=False)
    assert h.wait() == 1
    assert h.next_line() is None  # no handshake line
    err = h.stderr()
    assert 'PLUGIN_UNIX_SOCKET_GROUP: no group named "no-such-group-rp"' \
        in err, err
    assert os.listdir(h.sockdir) == []


# ---------------------------------------------------- PLUGIN_MULTIPLEX_GRPC

@pytest.mark.parametrize("value", ["false", "0", "maybe"])
def test_multiplex_not_true_keeps_five_fields(hosts, value):
    """A value that is not true: no multiplexing, no 7th field, one note.
    (A true value: test_mux.py and test_mux_go.py.)"""
    h = hosts(env={"PLUGIN_MULTIPLEX_GRPC": value})
    assert len(h.handshake.line.split("|")) == 5, h.handshake.line
    err = h.stderr_until("serving without multiplexing")
    assert err.count("multiplexing") == 1, err
    ch = h.channel()
    assert h.health(ch) == health_pb2.HealthCheckResponse.SERVING
    h.shutdown(ch)
    assert h.wait() == 0


def test_no_multiplex_note_without_the_variable(hosts):
    h = hosts()
    h.shutdown(h.channel())
    assert h.wait() == 0
    h.wait_stderr_eof()
    assert "multiplex" not in h.stderr()


# ------------------------------------------------------------ sun_path

def test_socket_path_too_long(hosts):
    base = tempfile.mkdtemp(prefix="rph-long-")
    try:
        deep = os.path.join(base, "d" * 100)
        os.mkdir(deep)
        h = hosts(env={"PLUGIN_UNIX_SOCKET_DIR": deep}, wait_handshake=False)
        assert h.wait() == 1
        assert h.next_line() is None
        err = h.stderr()
        assert "is longer than a unix socket allows (107)" in err, err
        assert "PLUGIN_UNIX_SOCKET_DIR" in err
        # The private folder it made is gone again.
        assert os.listdir(deep) == []
    finally:
        subprocess.run(["rm", "-rf", base])


# ------------------------------------------------------- a child's exit

@pytest.mark.parametrize("manifest", [HOST_MANIFEST, DEFAULT_MANIFEST],
                         ids=["host.json", "default.json"])
def test_child_exit_loses_nothing(hosts, manifest):
    """A child prints 10,000 lines and exits at once; a client that opens
    StreamStdio 100 ms after the handshake still gets every line, then the
    stream ends OK and the host exits 0."""
    n = 10000
    # seq writes them all within a millisecond or two, long before the
    # client comes.
    h = hosts(manifest=manifest,
              command=["seq", "-f", "line %.0f", "0", str(n - 1)])
    t_hs = time.monotonic()
    ch = h.channel()
    time.sleep(max(0.0, 0.1 - (time.monotonic() - t_hs)))  # the scenario
    out = Stdio(ch)
    assert out.wait_end(timeout=20) == grpc.StatusCode.OK, out.error
    lines = bytes(out.data[1]).decode().splitlines()
    assert lines == ["line %d" % i for i in range(n)]
    assert h.wait() == 0


def test_child_exit_without_reader_waits_for_flush_deadline(hosts, tmp_path):
    """Nobody reads: the host serves for flush_deadline_ms after the
    child's exit (500 ms in host.json), then exits 0."""
    mark = tmp_path / "exited"
    h = hosts(command=sh('echo unread; touch %s' % mark))
    ch = h.channel()
    deadline = time.monotonic() + 10 * SLOW
    while not mark.exists():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    t_exit = time.monotonic()
    # Still serving within the deadline...
    assert h.health(ch) == health_pb2.HealthCheckResponse.SERVING
    assert h.wait(timeout=10) == 0
    waited = time.monotonic() - t_exit
    # ...and gone after it (not much later).
    assert 0.3 < waited < 3 * SLOW, waited


def test_child_exit_then_shutdown_ends_wait(hosts, tmp_path):
    mark = tmp_path / "exited"
    h = hosts(manifest=DEFAULT_MANIFEST,
              command=sh('echo unread; touch %s' % mark))
    ch = h.channel()
    deadline = time.monotonic() + 10 * SLOW
    while not mark.exists():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    h.shutdown(ch)
    assert h.wait() == 0


# ------------------------------------------------- stopping and Shutdown

def hammer(ch, stop, codes, lock):
    """Health checks and StreamStdio calls until stop is set; every status
    code seen goes into codes."""
    check = health_check(ch)
    streams = stream_stdio(ch)
    while not stop.is_set():
        for call in (lambda: check(health_pb2.HealthCheckRequest(
                         service="plugin"), timeout=5 * SLOW),
                     lambda: list(streams(empty_pb2.Empty(),
                                          timeout=0.05 * SLOW))):
            try:
                call()
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            with lock:
                codes.append(code)
            if code == grpc.StatusCode.UNAVAILABLE:
                return


@pytest.mark.parametrize("run", range(8))
def test_stopping_server_never_answers_unimplemented(hosts, run):
    h = hosts(manifest=DEFAULT_MANIFEST)
    chans = [h.channel() for _ in range(4)]
    assert h.health(chans[0]) == health_pb2.HealthCheckResponse.SERVING
    stop, lock, codes = threading.Event(), threading.Lock(), []
    ts = [threading.Thread(target=hammer, args=(c, stop, codes, lock))
          for c in chans for _ in range(2)]
    for t in ts:
        t.start()
    # Let the hammering reach the server, then stop it under load.
    deadline = time.monotonic() + 10 * SLOW
    while True:
        with lock:
            if len(codes) >= 20:
                break
        assert time.monotonic() < deadline
        time.sleep(0.002)
    if run % 2:
        h.signal(signal.SIGTERM)
    else:
        h.shutdown(h.channel())
    assert h.wait() == 0
    stop.set()
    for t in ts:
        t.join(30 * SLOW)
    assert grpc.StatusCode.UNIMPLEMENTED not in codes, set(codes)


@pytest.mark.parametrize("run", range(12))
def test_concurrent_shutdowns_one_reply_first(hosts, run):
    """Two clients call Shutdown at once: at least one gets its reply.  (Seen
    failing with both UNAVAILABLE "Broken pipe" about once in 60 lifetimes
    with both CPUs busy, when the server cut connections right after the
    modules stopped: the client wrote to the closed connection before it
    read the reply.)"""
    h = hosts(manifest=DEFAULT_MANIFEST)
    chans = [h.channel() for _ in range(2)]
    for c in chans:
        assert h.health(c) == health_pb2.HealthCheckResponse.SERVING
    results, go = [], threading.Barrier(2)

    def call(c):
        go.wait()
        try:
            h.shutdown(c)
            results.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            results.append(e.code())
            details.append(e.details())
    details = []
    ts = [threading.Thread(target=call, args=(c,)) for c in chans]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30 * SLOW)
    assert h.wait() == 0
    assert grpc.StatusCode.OK in results, (results, details)
