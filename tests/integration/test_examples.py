"""The example plugins (examples/) driven by go-plugin's own client code
(Debian's go-plugin v1.0.1, tests/go): each example behaves as the Go
plugin of go-plugin's examples does.

kv: `gpkv put/get` (go-plugin's examples/grpc client protocol) against
`rpcplugin-host --magic-cookie BASIC_PLUGIN=hello examples/kv/kv.json`,
each command launching a new plugin process, so values persist in kv_<key>
files; over unix and tcp, with and without AutoMTLS, and side by side with
the Go plugin (gpkvplugin) for the same commands."""
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import BUILD, SLOW
from hostutil import HOST_BIN

GO_BIN = os.environ.get("RP_GO_BIN")
pytestmark = pytest.mark.skipif(
    not GO_BIN, reason="RP_GO_BIN is not set: build tests/go first")

KV_MANIFEST = os.path.join(BUILD, "examples", "kv", "kv.json")
SUFFIX = b"\n\nWritten from plugin-c (rpcplugin)"


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="rp-kv-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def kv_plugin(network="unix"):
    return "%s --magic-cookie BASIC_PLUGIN=hello --network %s %s" % (
        HOST_BIN, network, KV_MANIFEST)


def go_client(prog, workdir, plugin, *args, automtls=False):
    """Run a go-plugin v1.0.1 client of tests/go (gpkv, gpcounter): it
    launches `plugin` with sh -c, in workdir."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PLUGIN_")}
    env["TMPDIR"] = workdir  # the plugins' sockets
    env["PLUGIN_MIN_PORT"] = "10000"
    env["PLUGIN_MAX_PORT"] = "25000"
    argv = [os.path.join(GO_BIN, prog), "--timeout", "%ds" % (10 * SLOW),
            "--plugin", plugin] + (["--automtls"] if automtls else []) + \
        list(args)
    return subprocess.run(argv, cwd=workdir, env=env, capture_output=True,
                          timeout=60 * SLOW)


def gpkv(workdir, plugin, *args, automtls=False):
    return go_client("gpkv", workdir, plugin, *args, automtls=automtls)


@pytest.mark.parametrize("automtls", [False, True], ids=["plain", "automtls"])
@pytest.mark.parametrize("network", ["unix", "tcp"])
def test_kv_put_get(workdir, network, automtls):
    p = kv_plugin(network)
    r = gpkv(workdir, p, "put", "hello", "world", automtls=automtls)
    assert r.returncode == 0, r.stderr
    # The plugin process is gone, the value is in the working directory.
    with open(os.path.join(workdir, "kv_hello"), "rb") as f:
        assert f.read() == b"world" + SUFFIX
    r = gpkv(workdir, p, "get", "hello", automtls=automtls)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"world" + SUFFIX + b"\n"
    # Binary values, and an overwrite.
    val = bytes(range(1, 256)).decode("latin-1")
    r = gpkv(workdir, p, "put", "hello", val, automtls=automtls)
    assert r.returncode == 0, r.stderr
    r = gpkv(workdir, p, "get", "hello", automtls=automtls)
    assert r.stdout == val.encode() + SUFFIX + b"\n"
    # Only the value files are left: no socket folder behind.
    assert sorted(os.listdir(workdir)) == ["kv_hello"]


def test_kv_errors(workdir):
    p = kv_plugin()
    r = gpkv(workdir, p, "get", "missing")
    assert r.returncode == 1
    # The Go plugin's error for the same: code Unknown, "open kv_missing".
    assert b"code = Unknown desc = open kv_missing: No such file" in r.stderr
    r = gpkv(workdir, p, "put", "../escape", "x")
    assert r.returncode == 1
    assert b"code = InvalidArgument" in r.stderr
    assert not os.path.exists(os.path.join(os.path.dirname(workdir),
                                           "escape"))


def test_kv_same_behaviour_as_go_plugin(workdir):
    """The same commands against the Go plugin and the C one: the same
    results, each reading what the other wrote."""
    go = os.path.join(GO_BIN, "gpkvplugin")
    c = kv_plugin()
    assert gpkv(workdir, go, "put", "k1", "from-go").returncode == 0
    assert gpkv(workdir, c, "put", "k2", "from-c").returncode == 0
    r = gpkv(workdir, c, "get", "k1")
    assert r.stdout.startswith(b"from-go\n\nWritten from plugin-go-grpc")
    r = gpkv(workdir, go, "get", "k2")
    assert r.stdout == b"from-c" + SUFFIX + b"\n"
    rgo, rc = gpkv(workdir, go, "get", "nope"), gpkv(workdir, c, "get", "nope")
    assert rgo.returncode == rc.returncode == 1
    assert b"code = Unknown" in rgo.stderr and b"code = Unknown" in rc.stderr


# ------------------------------------------------------- bidirectional

COUNTER_MANIFEST = os.path.join(BUILD, "examples", "bidirectional",
                                "bidirectional.json")


def counter_plugin(network="unix"):
    return "%s --magic-cookie BASIC_PLUGIN=hello --network %s %s" % (
        HOST_BIN, network, COUNTER_MANIFEST)


def gpcounter(workdir, plugin, *args, automtls=False):
    return go_client("gpcounter", workdir, plugin, *args, automtls=automtls)


@pytest.mark.parametrize("automtls", [False, True], ids=["plain", "automtls"])
@pytest.mark.parametrize("network", ["unix", "tcp"])
def test_counter_calls_client_back_through_broker(workdir, network, automtls):
    """Each Put: the plugin dials the client's AddHelper (go-plugin's
    broker, TLS under AutoMTLS) and stores Sum(stored, value)."""
    p = counter_plugin(network)
    for v in (1, 41, -50):
        r = gpcounter(workdir, p, "put", "c", str(v), automtls=automtls)
        assert r.returncode == 0, r.stderr
    with open(os.path.join(workdir, "kv_c")) as f:
        assert f.read() == '{"Value":-8}'
    r = gpcounter(workdir, p, "get", "c", automtls=automtls)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"-8\n"
    assert sorted(os.listdir(workdir)) == ["kv_c"]


def test_counter_same_store_as_go_plugin(workdir):
    go = os.path.join(GO_BIN, "gpcounterplugin")
    c = counter_plugin()
    assert gpcounter(workdir, go, "put", "k", "40").returncode == 0
    assert gpcounter(workdir, c, "put", "k", "2").returncode == 0
    assert gpcounter(workdir, go, "get", "k").stdout == b"42\n"
    r = gpcounter(workdir, c, "get", "missing")
    assert r.returncode == 1
    assert b"code = Unknown desc = open kv_missing" in r.stderr


def test_kv_reflection(hosts):
    """grpc-go's reflection client on a running kv plugin: the application
    service next to the infrastructure, described from kv.proto."""
    h = hosts(manifest=KV_MANIFEST)
    target = h.handshake.target
    r = subprocess.run([os.path.join(GO_BIN, "gpreflect"), target, "list",
                        "describe", "proto.KV"], capture_output=True,
                       text=True, timeout=30 * SLOW)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for svc in ("proto.KV", "plugin.GRPCBroker", "plugin.GRPCStdio",
                "plugin.GRPCController", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"):
        assert svc in out, out
    assert "Get(proto.GetRequest) returns (proto.GetResponse)" in out, out
    assert "Put(proto.PutRequest) returns (proto.Empty)" in out, out
    print(out)
    h.shutdown(h.channel())
    assert h.wait() == 0
