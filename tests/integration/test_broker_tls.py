"""The broker over TLS (go-plugin's AutoMTLS): subchannels a knock opens,
and the channel an application module dials to the client's advertisement,
present the plugin's certificate, trust only the client's and expect the
name localhost.  A plaintext peer, or one with another certificate, is
refused with an error reply and nothing is served.  Without AutoMTLS
nothing changes.

Three drivers: tests/test_host with TEST_HOST_TLS_* (the module alone, and
Health/Check over the subchannel with `subhealth`), rpcplugin-host with
PLUGIN_CLIENT_CERT (Python grpcio as the client), and go-plugin v1.0.1's
own client (`gpclient launch --automtls --broker-accept 1`) against
rpcplugin-host serving tests/fixtures/app_echo.so, whose dial-back thread
(APP_ECHO_DIAL_BACK) dials the client's broker listener and calls
Health/Check on it.  go-plugin's tests need RP_GO_BIN (tests/go/build.sh).
"""
import json
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent import futures

import grpc
import pytest

from brokerutil import BrokerStream, ConnInfo, knock_close, knock_open
from conftest import BUILD, SLOW, write_manifest
from hostutil import HOST_BIN, Stdio, make_cert
import health_pb2

ECHO_SO = os.path.join(BUILD, "tests", "fixtures", "app_echo.so")
GO_BIN = os.environ.get("RP_GO_BIN")
GO_COOKIE = "--magic-cookie=RPCPLUGIN_INTEROP_COOKIE=rpcplugin-interop"


class Target:
    """A gRPC server answering Health/Check, counting the calls it
    served: plaintext, or TLS presenting cert_key and (with trust) requiring
    and verifying a client certificate against trust."""

    def __init__(self, address, cert_key=None, trust=None):
        self.calls = 0
        self._lock = threading.Lock()

        def check(req, ctx):
            with self._lock:
                self.calls += 1
            return health_pb2.HealthCheckResponse(status=1)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {"Check": grpc.unary_unary_rpc_method_handler(
                check,
                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString)}),))
        if cert_key is None:
            self.port = self.server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials(
                [(cert_key[1], cert_key[0])], root_certificates=trust,
                require_client_auth=trust is not None)
            self.port = self.server.add_secure_port(address, creds)
        self.server.start()

    def stop(self):
        self.server.stop(None)


@pytest.fixture(scope="module")
def certs():
    """The plugin's and the client's certificates, and a stranger's."""
    return {"plugin": make_cert(), "client": make_cert(),
            "other": make_cert()}


@pytest.fixture
def short_dir():
    d = tempfile.mkdtemp(prefix="rpbt-")  # unix paths stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def targets():
    made = []

    def make(*a, **kw):
        t = Target(*a, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


def assert_ack(r, sid):
    assert r.service_id == sid and r.knock.ack and r.knock.knock, r
    assert r.knock.error == "", r


def assert_refused(r, sid, *texts):
    assert r.service_id == sid, r
    assert not r.knock.ack and not r.knock.knock, r
    for t in texts:
        assert t in r.knock.error, r


def addr(network, d, name):
    """(listen address for grpc, knock network, knock address)."""
    if network == "unix":
        p = os.path.join(d, name + ".sock")
        return "unix:" + p, "unix", p
    return "127.0.0.1:0", "tcp", None


def knock_addr(network, kaddr, target):
    return kaddr if network == "unix" else "127.0.0.1:%d" % target.port


# ------------------------------------------------------------ test_host

def tls_host(make_host, tmp_path, certs, connect_timeout_ms=None):
    files = {}
    for var, data in (("TEST_HOST_TLS_CERT", certs["plugin"][0]),
                      ("TEST_HOST_TLS_KEY", certs["plugin"][1]),
                      ("TEST_HOST_TLS_PEER", certs["client"][0])):
        p = tmp_path / var.lower()
        p.write_bytes(data)
        files[var] = str(p)
    cfg = None
    if connect_timeout_ms:
        cfg = {"broker": {"connect_timeout_ms": connect_timeout_ms}}
    return make_host(write_manifest(tmp_path, config=cfg), env=files)


@pytest.mark.parametrize("network", ["tcp", "unix"])
def test_module_knock_tls_peer_served(make_host, tmp_path, short_dir, certs,
                                      targets, network):
    """The client's listener presents the client's certificate and accepts
    only the plugin's: the knock is acked and Health/Check goes over the
    subchannel."""
    host = tls_host(make_host, tmp_path, certs)
    listen, net, kaddr = addr(network, short_dir, "good")
    t = targets(listen, certs["client"], trust=certs["plugin"][0])
    s = BrokerStream(host.channel())
    s.send(knock_open(1, net, knock_addr(network, kaddr, t)))
    assert_ack(s.recv(), 1)
    assert host.cmd("subhealth 1") == "OK status=0 bytes=2"
    assert t.calls == 1
    s.send(knock_close(1))
    r = s.recv()
    assert r.knock.ack and not r.knock.knock, r
    s.end()


@pytest.mark.parametrize("peer", ["plaintext", "other-cert", "wants-other-client"])
@pytest.mark.parametrize("network", ["tcp", "unix"])
def test_module_knock_wrong_peer_refused(make_host, tmp_path, short_dir,
                                         certs, targets, network, peer):
    """A plaintext server, a TLS server with another certificate, and a TLS
    server that presents the client's certificate but trusts another
    client: the knock gets an error reply naming TLS, no subchannel stays,
    nothing is served, and the stream goes on."""
    host = tls_host(make_host, tmp_path, certs)
    listen, net, kaddr = addr(network, short_dir, peer)
    if peer == "plaintext":
        t = targets(listen)
    elif peer == "other-cert":
        t = targets(listen, certs["other"], trust=certs["plugin"][0])
    else:
        t = targets(listen, certs["client"], trust=certs["other"][0])
    s = BrokerStream(host.channel())
    s.send(knock_open(2, net, knock_addr(network, kaddr, t)))
    r = s.recv(timeout=15)
    assert_refused(r, 2, "subchannel 2", "TLS")
    assert host.stats()["broker_subchannels"] == 0
    assert host.cmd("subhealth 2").startswith("ERR")
    assert t.calls == 0
    s.send(knock_close(2))  # the stream still answers
    assert_refused(s.recv(), 2, "not found")
    s.end()


def test_module_without_tls_unchanged(make_host, tmp_path, certs, targets):
    """No TLS material: plaintext subchannels as before; a TLS server is
    simply not reachable (the plain error text, no TLS in it)."""
    host = make_host(write_manifest(tmp_path))
    plain = targets("127.0.0.1:0")
    tls = targets("127.0.0.1:0", certs["client"])
    s = BrokerStream(host.channel())
    s.send(knock_open(3, "tcp", "127.0.0.1:%d" % plain.port))
    assert_ack(s.recv(), 3)
    assert host.cmd("subhealth 3") == "OK status=0 bytes=2"
    s.send(knock_open(4, "tcp", "127.0.0.1:%d" % tls.port))
    r = s.recv(timeout=15)
    assert_refused(r, 4, "subchannel 4")
    assert "TLS" not in r.knock.error, r
    assert tls.calls == 0
    s.end()


def test_runtime_partial_tls_material_is_none(make_host, tmp_path, certs,
                                              targets):
    """The runtime passes all three PEMs or none: given only the peer's,
    it passes none, and subchannels stay plaintext."""
    p = tmp_path / "peer.pem"
    p.write_bytes(certs["client"][0])
    host = make_host(write_manifest(tmp_path),
                     env={"TEST_HOST_TLS_PEER": str(p)})
    plain = targets("127.0.0.1:0")
    s = BrokerStream(host.channel())
    s.send(knock_open(5, "tcp", "127.0.0.1:%d" % plain.port))
    assert_ack(s.recv(), 5)
    s.end()


# ------------------------------------------------------- rpcplugin-host

def channel_creds(server_pem, cert_key):
    return grpc.ssl_channel_credentials(root_certificates=server_pem,
                                        private_key=cert_key[1],
                                        certificate_chain=cert_key[0])


@pytest.mark.parametrize("network", ["tcp", "unix"])
def test_host_automtls_knock(hosts, short_dir, certs, targets, network):
    """rpcplugin-host under AutoMTLS: a knock to the client's TLS listener
    (the client's certificate, requiring the plugin's) is acked; to a
    plaintext one, or one with another certificate, refused."""
    client = certs["client"]
    h = hosts(env={"PLUGIN_CLIENT_CERT": client[0].decode()})
    plugin_pem = h.handshake.server_cert_pem()
    ch = h.channel(channel_creds(plugin_pem, client))
    assert h.health(ch) == 1
    s = BrokerStream(ch)
    good_l, net, good_a = addr(network, short_dir, "good")
    good = targets(good_l, client, trust=plugin_pem)
    plain_l, _, plain_a = addr(network, short_dir, "plain")
    plain = targets(plain_l)
    other_l, _, other_a = addr(network, short_dir, "other")
    other = targets(other_l, certs["other"], trust=plugin_pem)

    s.send(knock_open(11, net, knock_addr(network, good_a, good)))
    assert_ack(s.recv(), 11)
    s.send(knock_open(12, net, knock_addr(network, plain_a, plain)))
    assert_refused(s.recv(timeout=15), 12, "subchannel 12", "TLS")
    s.send(knock_open(13, net, knock_addr(network, other_a, other)))
    assert_refused(s.recv(timeout=15), 13, "subchannel 13", "TLS")
    assert plain.calls == 0 and other.calls == 0
    s.send(knock_close(11))
    r = s.recv()
    assert r.service_id == 11 and r.knock.ack and not r.knock.knock, r
    s.end()
    h.shutdown(ch)
    assert h.wait() == 0


def test_host_plain_knock_unchanged(hosts, certs, targets):
    """Without AutoMTLS rpcplugin-host's subchannels stay plaintext."""
    h = hosts()
    ch = h.channel()
    s = BrokerStream(ch)
    plain = targets("127.0.0.1:0")
    tls = targets("127.0.0.1:0", certs["client"])
    s.send(knock_open(21, "tcp", "127.0.0.1:%d" % plain.port))
    assert_ack(s.recv(), 21)
    s.send(knock_open(22, "tcp", "127.0.0.1:%d" % tls.port))
    r = s.recv(timeout=15)
    assert_refused(r, 22, "subchannel 22")
    assert "TLS" not in r.knock.error
    s.end()
    h.shutdown(ch)
    assert h.wait() == 0


@pytest.mark.parametrize("peer", ["good", "plaintext", "other-cert"])
def test_host_automtls_dial_back(hosts, short_dir, certs, targets, peer):
    """The channel to the client's advertisement (host API broker_dial, as
    an application module uses it) under rpcplugin-host's AutoMTLS: TLS
    with the plugin's certificate, the client's as the only root; a
    plaintext listener or another certificate fails, nothing is served."""
    client = certs["client"]
    h = hosts(manifest=echo_manifest(short_dir), options=["-v"],
              env={"PLUGIN_CLIENT_CERT": client[0].decode(),
                   "APP_ECHO_DIAL_BACK": "101"})
    plugin_pem = h.handshake.server_cert_pem()
    ch = h.channel(channel_creds(plugin_pem, client))
    out = Stdio(ch)  # host messages (-v) go to StreamStdio's stderr
    if peer == "good":
        t = targets("127.0.0.1:0", client, trust=plugin_pem)
    elif peer == "plaintext":
        t = targets("127.0.0.1:0")
    else:
        t = targets("127.0.0.1:0", certs["other"], trust=plugin_pem)
    s = BrokerStream(ch)
    s.send(ConnInfo(service_id=101, network="tcp",
                    address="127.0.0.1:%d" % t.port))
    if peer == "good":
        out.wait_contains(2, b"app_echo: dial-back 101: SERVING", timeout=20)
        assert t.calls == 1
    else:
        out.wait_contains(2, b"app_echo: dial-back 101: failed", timeout=20)
        assert t.calls == 0
    s.end()
    h.shutdown(ch)
    assert h.wait() == 0


# ------------------------------------------------------ go-plugin v1.0.1

def gpclient():
    for d in (GO_BIN, os.path.join(GO_BIN, "bin")):
        p = os.path.join(d, "gpclient")
        if os.access(p, os.X_OK):
            return p
    raise AssertionError("RP_GO_BIN=%s has no gpclient" % GO_BIN)


def echo_manifest(d):
    doc = {"manifest_version": 1, "name": "echo", "module": ECHO_SO,
           "abi_version": "1.1", "protocol_version": 1,
           "services": ["test.Echo"], "infrastructure": "default.json"}
    path = os.path.join(d, "echo.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


@pytest.mark.skipif(not GO_BIN, reason="RP_GO_BIN is not set (tests/go/"
                    "build.sh OUTDIR; RP_GO_BIN=OUTDIR/bin)")
@pytest.mark.parametrize("automtls", [True, False], ids=["automtls", "plain"])
@pytest.mark.parametrize("network", ["unix", "tcp"])
def test_go_client_accept_plugin_dials(short_dir, automtls, network):
    """go-plugin v1.0.1's AcceptAndServe(101) (served with the client's
    certificate under AutoMTLS, no client certificate asked): the plugin's
    dial to the advertisement verifies it against PLUGIN_CLIENT_CERT as
    localhost, and Health/Check goes through.  (The module's log line goes
    to StreamStdio, which v1.0.1 does not read: see
    test_host_automtls_dial_back for the failures.)"""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PLUGIN_")}
    env["TMPDIR"] = short_dir
    env["RPCPLUGIN_MODULE_PATH"] = os.path.join(BUILD, "lib")
    env["APP_ECHO_DIAL_BACK"] = "101"
    argv = ([gpclient(), "launch", "--timeout=%ds" % int(10 * SLOW)] +
            (["--automtls"] if automtls else []) +
            ["--broker-accept", "1", "--", HOST_BIN, GO_COOKIE,
             "--network", network, echo_manifest(short_dir)])
    r = subprocess.run(argv, env=env, capture_output=True,
                       timeout=60 * SLOW)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, out + r.stderr.decode(errors="replace")
    assert "tls=%s" % ("true" if automtls else "false") in out
    # The client's own evidence: the plugin's call came in over the
    # brokered listener (TLS only, under AutoMTLS).
    assert "ACCEPT_SERVED 101 /grpc.health.v1.Health/Check" in out, out
    assert "graceful=true" in out, out
