"""go-plugin's gRPC broker multiplexing (PLUGIN_MULTIPLEX_GRPC) in
rpcplugin-host: the handshake's 7th field, one connection, and what a
misbehaving yamux peer gets (docs/multiplexing.md).

The conformance tests with a real yamux (Go, Debian's hashicorp/yamux,
following go-plugin v1.8.0's client muxer) are in test_mux_go.py; these
use tests/integration/yamuxutil.py, a small client that can also break the
protocol on purpose."""
import hashlib
import os
import socket
import threading

import grpc
import pytest

from brokerutil import BrokerStream, ConnInfo, Knock, health_server
from conftest import SLOW, health_check
from hostutil import PluginHost, Stdio, pid_gone, wait_until
import health_pb2
import yamuxutil as ymx

MUX = {"PLUGIN_MULTIPLEX_GRPC": "true"}


def check(ch):
    return health_check(ch)(health_pb2.HealthCheckRequest(service="plugin"),
                            timeout=10 * SLOW).status


class MuxClient:
    """A yamux session on the host's one connection, and a grpcio channel
    whose connections are streams of it."""

    def __init__(self, host):
        hs = host.handshake
        self.session = ymx.Session.connect(hs.network, hs.address)
        self.path = os.path.join(host.tmpdir, "client-%d.sock" % id(self))
        self.listener = self.session.proxy(self.path)
        self.channel = grpc.insecure_channel("unix:" + self.path)

    def close(self):
        self.channel.close()
        self.listener.close()
        self.session.close()


@pytest.fixture
def mux_host():
    hosts = []

    def start(options=(), command=None, env=None):
        e = dict(MUX)
        e.update(env or {})
        h = PluginHost(env=e, options=list(options), command=command)
        hosts.append(h)
        return h
    yield start
    for h in hosts:
        h.close()


@pytest.mark.parametrize("value,field", [
    (None, None), ("true", "true"), ("1", "true"), ("T", "true"),
    ("false", None), ("0", None), ("yes", None)])
def test_handshake_seventh_field(value, field):
    """No variable: 5 fields, as before (older clients split into at most
    6).  A true value (Go's ParseBool): |true and multiplexing.  Otherwise
    no 7th field either, the plain listener, and a note on stderr."""
    h = PluginHost(env={"PLUGIN_MULTIPLEX_GRPC": value})
    try:
        assert h.handshake.mux == field, h.handshake.line
        if field is None:
            assert h.handshake.line.count("|") == 4
            if value is not None:
                assert "serving without multiplexing" in h.stderr()
        else:
            # The 6th field is there, empty without AutoMTLS.
            assert h.handshake.line.split("|")[5] == ""
        if field != "true":
            ch = h.channel()
            assert check(ch) == health_pb2.HealthCheckResponse.SERVING
    finally:
        h.close()


def test_one_connection_serves_everything(mux_host):
    """Health, StreamStdio and Shutdown over one connection; the host
    accepts no second connection, and GO_AWAY comes before the close."""
    h = mux_host(options=["-vv"], command=["sh", "-c", "echo hello-mux; exec sleep 600"])
    c = MuxClient(h)
    assert check(c.channel) == health_pb2.HealthCheckResponse.SERVING
    st = Stdio(c.channel)
    st.wait_contains(1, b"hello-mux")
    # A second connection to the advertised address is refused: the
    # listener closed after the first.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(OSError):
        s.connect(h.handshake.address)
    s.close()
    h.shutdown(c.channel)
    assert c.session.wait_closed(10 * SLOW)
    assert c.session.go_away == 0
    assert h.wait(10) == 0
    st.wait_end()
    log = bytes(st.data[2])
    assert b"multiplexing: connections=1 streams_accepted=" in log, log
    c.close()


def test_garbage_frames_end_the_session(mux_host):
    """A peer that sends bytes that are not yamux: GO_AWAY(protocol error),
    the connection closes, and the host shuts down as after Shutdown (no
    one can reach it any more) and exits 0."""
    h = mux_host()
    c = MuxClient(h)
    assert check(c.channel) == health_pb2.HealthCheckResponse.SERVING
    c.session.send_raw(b"\x07" * 12 + b"GET / HTTP/1.1\r\n\r\n")
    assert c.session.wait_closed(10 * SLOW)
    assert c.session.go_away == 1
    assert h.wait(10) == 0
    c.close()


@pytest.mark.parametrize("bad", [
    ymx.frame(ymx.DATA, ymx.SYN, 2, 0),          # server's parity
    ymx.frame(ymx.PING, ymx.SYN, 5, 1),          # ping on a stream
    ymx.frame(9, 0, 0, 0),                        # unknown type
    ymx.HDR.pack(1, 0, ymx.SYN, 1, 0),            # version 1
])
def test_protocol_errors_end_the_session(mux_host, bad):
    h = mux_host()
    s = ymx.Session.connect(h.handshake.network, h.handshake.address)
    s.send_raw(bad)
    assert s.wait_closed(10 * SLOW)
    assert s.go_away == 1
    assert h.wait(10) == 0
    s.close()


def test_data_beyond_the_window_is_a_protocol_error(mux_host):
    h = mux_host()
    s = ymx.Session.connect(h.handshake.network, h.handshake.address)
    st = s.open()
    # 256 KiB is the window; one byte more in one frame breaks it (the
    # host may close before it read the whole frame).
    try:
        s.send_raw(ymx.frame(ymx.DATA, 0, st.sid, ymx.WINDOW + 1,
                             b"\0" * (ymx.WINDOW + 1)))
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert s.wait_closed(10 * SLOW)
    assert s.go_away == 1
    h.wait(10)
    s.close()


def test_ping_is_answered(mux_host):
    h = mux_host()
    s = ymx.Session.connect(h.handshake.network, h.handshake.address)
    for i in range(5):
        assert s.ping(1000 + i)
    s.close()


def test_keepalive_pings_and_ends_a_silent_peer(mux_host):
    """--mux-keepalive 200: the host pings; a peer that answers keeps the
    session; one that stops answering loses it (the host exits)."""
    h = mux_host(options=["--mux-keepalive", "200"])
    c = MuxClient(h)
    wait_until(lambda: c.session.pings_seen >= 3, 10, "three pings")
    assert check(c.channel) == health_pb2.HealthCheckResponse.SERVING
    c.close()
    h2 = mux_host(options=["--mux-keepalive", "200"])
    # A raw socket that never reads nor answers.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(h2.handshake.address)
    assert h2.wait(10) == 0
    raw.close()


def _knock(broker, sid):
    broker.send(ConnInfo(service_id=sid, knock=Knock(knock=True)))
    return broker.recv()


def _knocked(h, sid):
    """A client of host h with its broker stream, which knocked for sid and
    got a plain ack: (client, broker)."""
    c = MuxClient(h)
    broker = BrokerStream(c.channel)
    broker.wait_open()
    r = _knock(broker, sid)
    assert r.service_id == sid and r.knock.knock and r.knock.ack
    assert r.knock.error == ""
    return c, broker


def test_knock_routes_the_next_stream(mux_host, tmp_path):
    """go-plugin's Dial of a service the plugin brokered (--broker-accept):
    knock, ack, then the client's next stream reaches that service; a knock
    for an id without a listener gets an ack with go-plugin's error."""
    side = str(tmp_path / "side.sock")
    srv, _ = health_server("unix:" + side)
    h = mux_host(options=["--broker-accept", "7:unix:" + side])
    c, broker = _knocked(h, 7)
    r = _knock(broker, 8)
    assert r.knock.ack and r.knock.error == "no listener for id 8"
    # The stream after the knock: a channel of its own, to id 7's server.
    path = str(tmp_path / "dial7.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)

    def one():
        conn, _ = lsock.accept()
        ymx.bridge(conn, c.session.open())
    t = threading.Thread(target=one, daemon=True)
    t.start()
    ch7 = grpc.insecure_channel("unix:" + path)
    assert check(ch7) == health_pb2.HealthCheckResponse.SERVING
    # The main server is still reached by the channel of the first stream.
    assert check(c.channel) == health_pb2.HealthCheckResponse.SERVING
    ch7.close()
    lsock.close()
    broker.cancel()
    c.close()
    srv.stop(None)


def _read_to_fin(st):
    """Everything stream st delivers until the peer's FIN."""
    got = bytearray()
    while True:
        data = st.recv(timeout=30)
        if not data:
            return bytes(got)
        got += data


def _sink_server(path, payload):
    """A unix server that writes payload to its one connection, then
    closes; returns (thread, result dict)."""
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)
    res = {}

    def run():
        conn, _ = ls.accept()
        try:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            res["rest"] = conn.recv(1 << 20)
        except OSError as e:
            res["error"] = e
        conn.close()
        ls.close()
        res["done"] = True
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, res


def _rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_window_exhaustion_with_a_slow_reader(mux_host, tmp_path):
    """A brokered service writes 8 MiB to a stream whose client does not
    read: the host holds at most the 256 KiB window for it (its RSS stays
    bounded, the service's writes block), then the client reads it all:
    nothing lost, in order."""
    payload = os.urandom(8 << 20)
    side = str(tmp_path / "sink.sock")
    t, res = _sink_server(side, payload)
    h = mux_host(options=["--broker-accept", "9:unix:" + side])
    c, broker = _knocked(h, 9)
    st = c.session.open()
    # The host forwards exactly one window, then waits.
    wait_until(lambda: st.received >= ymx.WINDOW, 10, "the first window")
    rss_before = _rss_kib(h.proc.pid)
    # Whatever the host sent before answering this ping has arrived.
    assert c.session.ping(99)
    assert st.received == ymx.WINDOW
    assert "done" not in res  # the service is blocked in its write
    got = _read_to_fin(st)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert len(got) == len(payload)
    assert _rss_kib(h.proc.pid) - rss_before < 4096
    st.close()
    t.join(10)
    assert res.get("done")
    broker.cancel()
    c.close()


def test_stream_reset_mid_message(mux_host, tmp_path):
    """The client resets a stream in the middle of a gRPC message and of a
    brokered byte stream: the local side sees the connection end, the host
    and the session go on."""
    side = str(tmp_path / "rst.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(side)
    ls.listen(1)
    h = mux_host(options=["--broker-accept", "11:unix:" + side])
    c, broker = _knocked(h, 11)
    st = c.session.open()
    conn, _ = ls.accept()
    st.send(b"half a message")
    assert conn.recv(100) == b"half a message"
    st.rst()
    conn.settimeout(10 * SLOW)
    try:
        assert conn.recv(100) == b""
    except ConnectionResetError:
        pass
    conn.close()
    ls.close()
    # A raw stream to the main server: the HTTP/2 preface and half a frame,
    # then RST.
    raw = c.session.open()
    raw.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00")
    raw.rst()
    assert check(c.channel) == health_pb2.HealthCheckResponse.SERVING
    assert c.session.ping(4242)
    broker.cancel()
    c.close()


def _cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_local_side_gone_while_the_window_is_full(mux_host, tmp_path):
    """A brokered service writes more than a window and closes at once;
    the client reads nothing for a while.  The host holds the rest in the
    local socket and does not spin on the hung-up socket meanwhile (its
    CPU time stays flat over half a second); then every byte arrives, and
    the stream ends with FIN."""
    payload = os.urandom(ymx.WINDOW + 100000)
    side = str(tmp_path / "gone.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(side)
    ls.listen(1)
    h = mux_host(options=["--broker-accept", "12:unix:" + side])
    c, broker = _knocked(h, 12)
    st = c.session.open()
    conn, _ = ls.accept()
    conn.sendall(payload)  # fits: the host read a window, the socket the rest
    conn.close()
    ls.close()
    wait_until(lambda: st.received >= ymx.WINDOW, 10, "the first window")
    cpu0 = _cpu_seconds(h.proc.pid)
    threading.Event().wait(0.5)  # the measuring window, not a race
    spent = _cpu_seconds(h.proc.pid) - cpu0
    assert spent < 0.2 * SLOW, "host used %.2f s of CPU while idle" % spent
    got = _read_to_fin(st)
    assert got == payload
    broker.cancel()
    c.close()


def test_plugin_dial_waits_for_the_broker_stream(tmp_path):
    """The plugin dials (Counter.Put of examples/bidirectional) before the
    client opened StartStream: its knock waits for the stream, as
    go-plugin's send does, instead of failing at once.  The client then
    answers the knock with go-plugin's "no listener" error, and Put fails
    with UNAVAILABLE."""
    from conftest import BUILD
    man = os.path.join(BUILD, "examples", "bidirectional",
                       "bidirectional.json")
    h = PluginHost(manifest=man, env=MUX)
    try:
        c = MuxClient(h)
        put = c.channel.unary_unary("/proto.Counter/Put")
        # PutRequest{add_server: 1, key: "k", value: 1}
        fut = put.future(b"\x08\x01\x12\x01k\x18\x01", timeout=20 * SLOW)
        # The plugin's dial has begun once its dial socket exists (the
        # mux folder is the host's only rpcplugin-mux-* in its TMPDIR).
        def dial_socket():
            for d in os.listdir(h.tmpdir):
                if d.startswith("rpcplugin-mux-") and os.path.exists(
                        os.path.join(h.tmpdir, d, "d1")):
                    return True
            return False
        wait_until(dial_socket, 10, "the plugin's dial of id 1")
        # No stream yet: the knock must wait, not fail.  Open it now.
        broker = BrokerStream(c.channel)
        broker.wait_open()
        r = broker.recv()
        assert r.service_id == 1 and r.knock.knock and not r.knock.ack, r
        broker.send(ConnInfo(service_id=1, knock=Knock(
            knock=True, ack=True, error="no listener for id 1")))
        with pytest.raises(grpc.RpcError) as e:
            fut.result()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        broker.cancel()
        c.close()
    finally:
        h.close()
