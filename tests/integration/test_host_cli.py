"""rpcplugin-host, startup as a go-plugin client sees it: the handshake line,
the magic cookie, protocol version negotiation, where it listens, the
private socket directory, usage errors, and the graceful exit after
Shutdown and signals (exit 0, socket directory removed)."""
import os
import signal
import stat
import subprocess

import grpc
import pytest

from conftest import SLOW
from hostutil import (COOKIE_KEY, COOKIE_VALUE, DEFAULT_MANIFEST, HOST_BIN,
                      Stdio, free_port_pair)


def run_host(args, env_extra=None, cookie=True, timeout=20):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PLUGIN_") and k != COOKIE_KEY}
    if cookie:
        env[COOKIE_KEY] = COOKIE_VALUE
    env.update(env_extra or {})
    return subprocess.run([HOST_BIN] + args, env=env, capture_output=True,
                          timeout=timeout * SLOW)


def test_handshake_unix(hosts):
    h = hosts()
    hs = h.handshake
    # 1|APP|unix|/path|grpc, and nothing after it on this line.
    assert h.handshake.line == "1|1|unix|%s|grpc" % hs.address
    assert hs.network == "unix" and hs.cert_b64 is None
    # The socket lives in a fresh private directory under
    # PLUGIN_UNIX_SOCKET_DIR.
    d = os.path.dirname(hs.address)
    assert os.path.dirname(d) == h.sockdir
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(hs.address).st_mode)
    ch = h.channel()
    assert h.health(ch) == 1
    assert h.health(ch, "") == 1
    h.shutdown(ch)
    assert h.wait() == 0
    assert not os.path.exists(d), "socket directory left behind"
    # The handshake was the only line on stdout.
    assert h.next_line() is None


def test_handshake_tcp_port_range(hosts):
    busy, port = free_port_pair()
    try:
        h = hosts(options=["--network", "tcp"],
                  env={"PLUGIN_MIN_PORT": str(port),
                       "PLUGIN_MAX_PORT": str(port + 1)})
        # The first port of the range is taken: the host takes the next.
        assert h.handshake.line == "1|1|tcp|127.0.0.1:%d|grpc" % (port + 1)
        ch = h.channel()
        assert h.health(ch) == 1
        h.signal(signal.SIGTERM)
        assert h.wait() == 0
    finally:
        busy.close()


def test_tcp_port_range_exhausted():
    busy, port = free_port_pair()
    try:
        r = run_host(["--network=tcp", DEFAULT_MANIFEST],
                     {"PLUGIN_MIN_PORT": str(port),
                      "PLUGIN_MAX_PORT": str(port)})
    finally:
        busy.close()
    assert r.returncode == 1
    assert r.stdout == b""
    assert b"cannot bind a tcp listener" in r.stderr


@pytest.mark.parametrize("env", [{}, {COOKIE_KEY: "wrong"}],
                         ids=["missing", "wrong"])
def test_magic_cookie(env):
    r = run_host(["--magic-cookie", "%s=%s" % (COOKIE_KEY, COOKIE_VALUE),
                  DEFAULT_MANIFEST], env, cookie=False)
    assert r.returncode == 1
    assert r.stdout == b""
    assert r.stderr.decode() == (
        "This binary is a plugin. These are not meant to be executed "
        "directly.\nPlease execute the program that consumes these plugins, "
        "which will\nload any plugins automatically\n")


@pytest.mark.parametrize("env,ok", [({}, False), ({COOKIE_KEY: ""}, False),
                                    ({COOKIE_KEY: "any-fresh-value"}, True)],
                         ids=["missing", "empty", "set"])
def test_magic_cookie_key_only(env, ok):
    """--magic-cookie KEY: any non-empty value (CrowdSec's fresh UUIDs)."""
    r = run_host(["--magic-cookie", COOKIE_KEY, "--app-version", "1",
                  DEFAULT_MANIFEST, "--", "/bin/true"], env, cookie=False)
    if ok:
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(b"1|1|unix|")
    else:
        assert r.returncode == 1
        assert b"This binary is a plugin" in r.stderr


@pytest.mark.parametrize("client,served,expect", [
    ("1", "1", 1),
    ("1,2,3", "2,4", 2),      # the highest common version
    ("4,2", "1,2,3,4", 4),
    (None, "3,2", 2),         # no list from the client: the lowest
])
def test_version_negotiation(hosts, client, served, expect):
    h = hosts(options=["--app-version", served], versions=client)
    assert h.handshake.app_version == expect
    h.signal()
    assert h.wait() == 0
    assert "warning" not in h.stderr()


def test_no_common_version(hosts):
    # As go-plugin: announce our lowest version and let the client refuse
    # it with its own message; say so on stderr.
    h = hosts(options=["--app-version=3,2"], versions="5,x,6")
    assert h.handshake.line.startswith("1|2|unix|")
    err = h.stderr_until("no common app protocol version")
    assert "ignoring invalid version \"x\"" in err
    assert "client accepts 5,x,6, this plugin serves 3,2; announcing 2" in err
    h.signal()
    assert h.wait() == 0


def test_usage_and_version():
    r = run_host(["--help"])
    assert r.returncode == 0 and b"Usage: rpcplugin-host" in r.stdout
    r = run_host(["--version"])
    assert r.returncode == 0
    assert r.stdout.startswith(b"rpcplugin-host ")
    assert b"ABI 1." in r.stdout
    for args, text in [
        ([], b"missing MANIFEST"),
        (["--network=udp", DEFAULT_MANIFEST], b"--network"),
        (["--bogus", DEFAULT_MANIFEST], b"unknown"),
        (["--magic-cookie", "=novalue", DEFAULT_MANIFEST], b"KEY=VALUE"),
        (["--app-version", "a", DEFAULT_MANIFEST], b"--app-version"),
        ([DEFAULT_MANIFEST, "extra"], b"after MANIFEST"),
        ([DEFAULT_MANIFEST, "--"], b"COMMAND"),
    ]:
        r = run_host(args)
        assert r.returncode == 2, (args, r)
        assert r.stdout == b""
        assert text in r.stderr, (args, r.stderr)


def test_bad_manifest(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"manifest_version": 1, "name": "x"}')
    r = run_host([str(bad)])
    assert r.returncode == 1
    assert r.stdout == b""
    assert str(bad).encode() in r.stderr


def test_bad_port_env():
    r = run_host(["--network", "tcp", DEFAULT_MANIFEST],
                 {"PLUGIN_MIN_PORT": "10", "PLUGIN_MAX_PORT": "nope"})
    assert r.returncode == 1 and b"PLUGIN_MAX_PORT" in r.stderr
    r = run_host(["--network", "tcp", DEFAULT_MANIFEST],
                 {"PLUGIN_MIN_PORT": "2000", "PLUGIN_MAX_PORT": "1000"})
    assert r.returncode == 1 and b"greater than PLUGIN_MAX_PORT" in r.stderr


# SIGINT is ignored by default: test_host_conventions.py; SIGHUP swaps:
# test_swap.py.
@pytest.mark.parametrize("sig", [signal.SIGTERM],
                         ids=lambda s: s.name)
def test_signals_exit_gracefully(hosts, sig):
    h = hosts()
    d = os.path.dirname(h.handshake.address)
    ch = h.channel()
    assert h.health(ch) == 1
    h.signal(sig)
    assert h.wait() == 0
    assert not os.path.exists(d)
    # Nothing but the handshake ever reached stdout.
    assert h.next_line() is None


def test_unimplemented_and_shutdown_twice(hosts):
    h = hosts()
    ch = h.channel()
    with pytest.raises(grpc.RpcError) as e:
        ch.unary_unary("/no.Such/Method")(b"", timeout=10 * SLOW)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    h.shutdown(ch)
    try:
        h.shutdown(ch, timeout=5)
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.CANCELLED)
    assert h.wait() == 0
