"""plugin.GRPCBroker/StartStream (docs/wire.md), every row of
the table, against Debian's Python grpcio as the peer."""
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest

from brokerutil import (BrokerStream, ConnInfo, Knock, Recorder, closed_port,
                        health_server, knock_close, knock_open)
from conftest import SLOW, write_manifest
from hostutil import wait_until


def make(make_host, tmp_path, **broker):
    cfg = {"broker": broker} if broker else None
    return make_host(write_manifest(tmp_path, config=cfg))


@pytest.fixture
def target():
    server, port = health_server("127.0.0.1:0")
    yield port
    server.stop(None)


def assert_ack(r, sid, knock):
    assert r.service_id == sid
    assert r.knock.ack, r
    assert r.knock.knock == knock
    assert r.knock.error == ""


def assert_error(r, sid, text=None):
    assert r.service_id == sid, r
    assert not r.knock.ack, r
    assert r.knock.error, r
    if text:
        assert text in r.knock.error, r


def test_knock_live_tcp_and_unix(make_host, tmp_path, target):
    host = make(make_host, tmp_path)
    usock = os.path.join(str(tmp_path), "target.sock")
    userver, _ = health_server("unix:" + usock)
    try:
        s = BrokerStream(host.channel())
        s.send(knock_open(1, "tcp", "127.0.0.1:%d" % target))
        assert_ack(s.recv(), 1, knock=True)
        s.send(knock_open(2, "unix", usock))
        assert_ack(s.recv(), 2, knock=True)
        # Re-knock of an open id: acked, no new subchannel.
        s.send(knock_open(1, "tcp", "127.0.0.1:%d" % target))
        assert_ack(s.recv(), 1, knock=True)
        assert host.stats()["broker_subchannels"] == 2
        # The host borrows the subchannel's channel and calls through it.
        assert host.cmd("subhealth 1") == "OK status=0 bytes=2"
        assert host.cmd("subhealth 2") == "OK status=0 bytes=2"
        assert host.cmd("subhealth 3").startswith("ERR RPCPLUGIN_ENOTFOUND")
        # Close, then the id is gone.
        s.send(knock_close(1))
        assert_ack(s.recv(), 1, knock=False)
        s.send(knock_close(1))
        assert_error(s.recv(), 1, "not found")
        assert host.stats()["broker_subchannels"] == 1
        assert s.end() == []
    finally:
        userver.stop(None)


def test_reknock_makes_no_new_connection(make_host, tmp_path, target):
    host = make(make_host, tmp_path)
    rec = Recorder(target=("127.0.0.1", target))
    try:
        s = BrokerStream(host.channel())
        for _ in range(5):
            s.send(knock_open(3, "tcp", "127.0.0.1:%d" % rec.port))
            assert_ack(s.recv(), 3, knock=True)
        assert rec.count == 1
        s.end()
    finally:
        rec.close()


def test_knock_closed_port(make_host, tmp_path):
    host = make(make_host, tmp_path)
    s = BrokerStream(host.channel())
    s.send(knock_open(4, "tcp", "127.0.0.1:%d" % closed_port()))
    r = s.recv()
    assert_error(r, 4, "cannot connect")
    assert not r.knock.knock
    assert host.stats()["broker_subchannels"] == 0
    s.end()


@pytest.mark.parametrize("msg,sid,text", [
    (knock_open(5, "udp", "127.0.0.1:9"), 5, "unsupported network \"udp\""),
    (knock_open(5, "unix", "relative/path.sock"), 5, "absolute path"),
    (knock_open(5, "unix", "/" + "x" * 200), 5, "too long"),
    (knock_open(5, "tcp", "example.invalid:80"), 5, "literal IP"),
    (knock_open(5, "tcp", "127.0.0.1:0"), 5, "bad port"),
    (knock_open(5, "tcp", "127.0.0.1"), 5, "HOST:PORT"),
    (knock_open(0, "tcp", "127.0.0.1:80"), 0, "service_id 0"),
    (ConnInfo(service_id=6), 6, "neither a knock nor an address"),
    (ConnInfo(service_id=6, network="udp", address="x:1"), 6, "unsupported"),
    (b"\xff\xff\xff", 0, "cannot decode"),
    (b"\x0a\x05ab", 0, "cannot decode"),
])
def test_bad_input_then_stream_goes_on(make_host, tmp_path, msg, sid, text):
    host = make(make_host, tmp_path)
    s = BrokerStream(host.channel())
    s.send(msg)
    assert_error(s.recv(), sid, text)
    s.send(knock_close(77))           # the stream still works
    assert_error(s.recv(), 77, "not found")
    assert host.stats()["broker_subchannels"] == 0
    assert s.end() == []


def test_sequential_per_stream_never_across(make_host, tmp_path, target):
    """A knock waiting for READY holds back its own stream's later messages
    (replies stay in request order) but never another stream."""
    host = make(make_host, tmp_path, connect_timeout_ms=1000)
    silent = Recorder()  # accepts, never speaks HTTP/2: the knock waits
    try:
        s = BrokerStream(host.channel())
        s.send(knock_open(10, "tcp", "127.0.0.1:%d" % silent.port))
        s.send(knock_close(11))
        s.send(knock_open(12, "tcp", "127.0.0.1:%d" % target))
        s.send(knock_close(12))
        # Another stream is answered while the first one waits.
        s2 = BrokerStream(host.channel())
        s2.send(knock_close(13))
        assert_error(s2.recv(), 13, "not found")
        assert s.replies.empty(), "the slow knock was overtaken"
        assert_error(s.recv(), 10, "not ready within 1000 ms")
        assert_error(s.recv(), 11, "not found")
        assert_ack(s.recv(), 12, knock=True)
        assert_ack(s.recv(), 12, knock=False)   # the close saw the open
        s2.end()
        s.end()
    finally:
        silent.close()


def test_close_behind_a_knock_two_streams_wait_on(make_host, tmp_path,
                                                  target):
    """Two streams knock for one id while it connects; the first pipelines
    a close behind its knock.  When the connect succeeds, the first
    stream's close frees the subchannel while the second stream's reply
    is still to be made (a use-after-free, found by fuzz_broker; the ASan
    stage runs this test).  Both knocks are acknowledged, then the close."""
    host = make(make_host, tmp_path)
    gate = threading.Event()
    proxy = Recorder(target=("127.0.0.1", target), gate=gate)
    try:
        a = BrokerStream(host.channel())
        b = BrokerStream(host.channel())
        addr = "127.0.0.1:%d" % proxy.port
        a.send(knock_open(7, "tcp", addr))
        wait_until(lambda: proxy.count == 1, 10 * SLOW, "the knock's connect")
        b.send(knock_open(7, "tcp", addr))
        a.send(knock_close(7))
        wait_until(lambda: host.stats()["broker_in"] == 3, 10 * SLOW,
                   "the three messages received")
        assert a.replies.empty() and b.replies.empty()
        gate.set()
        assert_ack(a.recv(), 7, knock=True)
        assert_ack(a.recv(), 7, knock=False)
        assert_ack(b.recv(), 7, knock=True)
        assert host.stats()["broker_subchannels"] == 0
        assert a.end() == [] and b.end() == []
    finally:
        gate.set()
        proxy.close()


def test_timed_out_knocks_leave_no_connection(make_host, tmp_path, target):
    """Knocks whose peer answers only after connect_timeout_ms get their
    error replies; the connections they started must not outlive them
    (gRPC 1.51 orphans a connection that completes after its channel was
    destroyed: 4,000 timed-out knocks used to leave 4,000 descriptors)."""
    host = make(make_host, tmp_path, connect_timeout_ms=200)
    pid = host.proc.pid
    nfds = lambda: len(os.listdir("/proc/%d/fd" % pid))  # noqa: E731
    gate = threading.Event()
    proxy = Recorder(target=("127.0.0.1", target), gate=gate)
    try:
        s = BrokerStream(host.channel())
        s.send(knock_close(99))  # the client's own connection is counted
        assert_error(s.recv(), 99, "not found")
        base = nfds()
        for k in range(1, 21):
            s.send(knock_open(k, "tcp", "127.0.0.1:%d" % proxy.port))
            assert_error(s.recv(), k, "not ready within 200 ms")
        wait_until(lambda: proxy.count == 20, 10 * SLOW, "20 connections")
        gate.set()  # the peers answer, late
        assert s.end() == []
        wait_until(lambda: nfds() <= base, 30 * SLOW,
                   "descriptors back to %d" % base)
        assert host.stats()["broker_subchannels"] == 0
    finally:
        gate.set()
        proxy.close()


def test_connect_timeout(make_host, tmp_path):
    host = make(make_host, tmp_path, connect_timeout_ms=300)
    silent = Recorder()
    try:
        s = BrokerStream(host.channel())
        s.send(knock_open(20, "tcp", "127.0.0.1:%d" % silent.port))
        assert_error(s.recv(), 20, "not ready within 300 ms")
        s.end()
    finally:
        silent.close()


def test_pipelined_knock_close_pairs_in_order(make_host, tmp_path, target):
    host = make(make_host, tmp_path)
    s = BrokerStream(host.channel())
    n = 1000
    for k in range(1, n + 1):
        s.send(knock_open(k, "tcp", "127.0.0.1:%d" % target))
        s.send(knock_close(k))
    for k in range(1, n + 1):
        assert_ack(s.recv(timeout=60), k, knock=True)
        assert_ack(s.recv(timeout=60), k, knock=False)
    assert host.stats()["broker_subchannels"] == 0
    assert s.end() == []


def test_fifty_concurrent_streams(make_host, tmp_path, target):
    host = make(make_host, tmp_path)
    streams = [BrokerStream(host.channel()) for _ in range(50)]
    for i, s in enumerate(streams):
        for j in range(20):
            s.send(knock_close(1000 + i * 100 + j))
        s.send(knock_open(900000 + i, "tcp", "127.0.0.1:%d" % target))
    for i, s in enumerate(streams):
        for j in range(20):
            assert_error(s.recv(timeout=60), 1000 + i * 100 + j, "not found")
        assert_ack(s.recv(timeout=60), 900000 + i, knock=True)
    assert host.stats()["broker_streams"] == 50
    assert host.stats()["broker_subchannels"] == 50
    for s in streams:
        assert s.end() == []


def test_limits(make_host, tmp_path, target):
    host = make(make_host, tmp_path, max_subchannels=2,
                max_pending_per_stream=3, connect_timeout_ms=500)
    s = BrokerStream(host.channel())
    for k in (1, 2):
        s.send(knock_open(k, "tcp", "127.0.0.1:%d" % target))
        assert_ack(s.recv(), k, knock=True)
    s.send(knock_open(3, "tcp", "127.0.0.1:%d" % target))
    assert_error(s.recv(), 3, "subchannel limit (2) reached")
    s.send(knock_close(1))
    s.send(knock_close(2))
    assert_ack(s.recv(), 1, knock=False)
    assert_ack(s.recv(), 2, knock=False)
    # Pending messages: behind a knock that waits, two more are kept, the
    # next ones are refused in their turn, and at six the stream stops
    # reading until it drains.
    silent = Recorder()
    try:
        s.send(knock_open(11, "tcp", "127.0.0.1:%d" % silent.port))
        for k in range(101, 111):
            s.send(knock_close(k))
        assert_error(s.recv(), 11, "not ready within 500 ms")
        assert_error(s.recv(), 101, "not found")
        assert_error(s.recv(), 102, "not found")
        for k in (103, 104, 105):
            assert_error(s.recv(), k, "too many pending messages")
        for k in range(106, 111):
            assert_error(s.recv(), k, "not found")
    finally:
        silent.close()
    assert s.end() == []


def test_stream_limit(make_host, tmp_path):
    """config.broker.max_streams: a stream beyond it ends at once with
    RESOURCE_EXHAUSTED naming the setting; those open go on answering; once
    one ends, a new one is accepted."""
    host = make(make_host, tmp_path, max_streams=2)
    a, b = BrokerStream(host.channel()), BrokerStream(host.channel())
    for s in (a, b):
        s.send(knock_close(5))
        assert_error(s.recv(), 5, "not found")
    c = BrokerStream(host.channel())
    assert c.replies.get(timeout=20 * SLOW) is None  # ended, nothing sent
    assert c.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "config.broker.max_streams" in c.error.details()
    a.send(knock_close(6))
    assert_error(a.recv(), 6, "not found")
    assert a.end() == []
    wait_until(lambda: host.stats()["broker_streams"] == 1, 10,
               "the first stream to be gone")
    d = BrokerStream(host.channel())
    d.send(knock_close(7))
    assert_error(d.recv(), 7, "not found")
    assert b.end() == [] and d.end() == []


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("RP_WRAPPER")), reason="RSS of a wrapper")
def test_memory_back_after_a_flood(make_host, tmp_path):
    """500 StartStream streams, 20 messages each, then the client leaves:
    once the streams are gone the process gives the memory back (without
    it, every KiB of the flood stayed: 12.7 -> 21.9 -> 21.8 MiB)."""
    from test_stdio import rss_kib
    host = make(make_host, tmp_path)
    pid = host.proc.pid
    base = rss_kib(pid)
    chs = [host.channel() for _ in range(10)]
    streams = [BrokerStream(chs[i % 10]) for i in range(500)]
    for s in streams:
        for k in range(20):
            s.send(knock_close(1000 + k))
    for s in streams:
        for k in range(20):
            assert_error(s.recv(timeout=60), 1000 + k, "not found")
    peak = rss_kib(pid)
    assert host.stats()["broker_streams"] == 500
    for s in streams:
        s.cancel()
    wait_until(lambda: host.stats()["broker_streams"] == 0, 30,
               "the streams to be gone")
    grown = peak - base
    assert grown > 2048, "the flood did not grow the process (%d KiB)" % grown
    wait_until(lambda: rss_kib(pid) - base < grown // 2, 10,
               "RSS back near %d KiB (peak %d, now %d)" % (base, peak,
                                                         rss_kib(pid)))


def test_client_cancels_mid_stream(make_host, tmp_path, target):
    host = make(make_host, tmp_path)
    silent = Recorder()
    try:
        s = BrokerStream(host.channel())
        s.send(knock_open(1, "tcp", "127.0.0.1:%d" % silent.port))
        for k in range(100):
            s.send(knock_close(100 + k))
        # Cancel once the knock is being served (it waits for READY).
        deadline = time.monotonic() + 20 * SLOW
        while host.stats()["broker_subchannels"] != 1:
            assert time.monotonic() < deadline
        s.cancel()
        # The broker keeps working for the next stream.
        s2 = BrokerStream(host.channel())
        s2.send(knock_open(2, "tcp", "127.0.0.1:%d" % target))
        assert_ack(s2.recv(), 2, knock=True)
        s2.send(knock_close(1))     # subchannels belong to the broker
        assert_ack(s2.recv(), 1, knock=False)
        s2.end()
        st = host.stats()
        assert st["broker_subchannels"] == 1
    finally:
        silent.close()


def test_host_api_advertise_wait_and_knock(make_host, tmp_path):
    host = make(make_host, tmp_path)
    assert host.cmd("advertise 9 unix /tmp/none.sock").startswith(
        "ERR RPCPLUGIN_ENOTFOUND")           # no stream open yet
    s = BrokerStream(host.channel())
    s.wait_open()
    # advertise: ConnInfo without knock reaches the peer.
    assert host.cmd("advertise 9 unix /tmp/svc.sock") == "OK advertise"
    r = s.recv()
    assert (r.service_id, r.network, r.address) == (9, "unix", "/tmp/svc.sock")
    assert not r.HasField("knock")
    # The peer's advertisement is recorded and never answered.
    assert host.cmd("waitadv 5 100") == "ERR RPCPLUGIN_ETIMEDOUT waitadv"
    s.send(ConnInfo(service_id=5, network="tcp", address="127.0.0.1:1234"))
    assert host.cmd("waitadv 5 5000") == "OK tcp 127.0.0.1:1234"
    # knock: the peer acks or refuses; its answer is never answered back.
    assert host.cmd("bg knock 7 unix /tmp/k.sock 10000") == "OK bg"
    r = s.recv()
    assert r.service_id == 7 and r.knock.knock and not r.knock.ack
    assert (r.network, r.address) == ("unix", "/tmp/k.sock")
    s.send(ConnInfo(service_id=7, knock=Knock(knock=True, ack=True)))
    assert host.wait_event("BGDONE", timeout=20) == "BGDONE OK knock"
    assert host.cmd("bg knock 8 unix /tmp/k.sock 10000") == "OK bg"
    assert s.recv().service_id == 8
    s.send(ConnInfo(service_id=8, knock=Knock(ack=False, error="no listener")))
    assert host.wait_event("BGDONE", timeout=20) == \
        "BGDONE ERR RPCPLUGIN_EREFUSED no listener"
    assert host.cmd("knock 9 unix /tmp/k.sock 200") == \
        "ERR RPCPLUGIN_ETIMEDOUT "
    assert s.recv().service_id == 9   # the knock that nobody answered
    assert s.end() == []      # no replies to answers or advertisements


def test_shutdown_ends_streams_and_closes_subchannels(make_host, tmp_path, target):
    host = make(make_host, tmp_path)
    s = BrokerStream(host.channel())
    s.send(knock_open(1, "tcp", "127.0.0.1:%d" % target))
    assert_ack(s.recv(), 1, knock=True)
    host.terminate()
    assert s.replies.get(timeout=20 * SLOW) is None
    assert s.call.code() == grpc.StatusCode.OK
    assert host.wait_event("EXIT") == "EXIT 0"


NETNS_SCRIPT = r"""
set -e
ip link set lo up
ip addr add 10.123.0.1/32 dev lo
{py} {rec} 10.123.0.1 {port} {countfile} &
while [ ! -s {countfile} ]; do sleep 0.01; done
exec "$@"
"""

RECORDER = r"""
import ctypes, socket, sys, threading
# PR_SET_PDEATHSIG: SIGTERM when the parent (the shell, which execs the
# host) ends, so the recorder and its namespace do not outlive the test.
ctypes.CDLL(None).prctl(1, 15)
host, port, countfile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(16)
n = 0
open(countfile, "w").write("0\n")
while True:
    c, _ = s.accept()
    n += 1
    open(countfile, "w").write("%d\n" % n)
"""


def unshare_available():
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("allow", [False, True])
def test_non_loopback_refused_without_connecting(make_host, tmp_path, allow):
    """In a private network namespace, 10.123.0.1 is a local address with a
    recording listener: a refused knock makes no connection at all; with
    allow_non_loopback the same knock does connect (the listener works).
    A security test: on the target platform (Debian 12, root, iproute2
    installed by the test command) it fails rather than skip."""
    assert unshare_available(), (
        "this test needs `unshare -n` (root or user namespaces) and `ip` "
        "(iproute2, installed by scripts/install-deps.sh)")
    d = tempfile.mkdtemp(prefix="rp-ns-")
    rec = os.path.join(d, "rec.py")
    with open(rec, "w") as f:
        f.write(RECORDER)
    countfile = os.path.join(d, "count")
    script = os.path.join(d, "ns.sh")
    with open(script, "w") as f:
        f.write(NETNS_SCRIPT.format(py=sys.executable, rec=rec, port=4567,
                                    countfile=countfile))
    manifest = write_manifest(tmp_path, config={"broker": {
        "allow_non_loopback": allow, "connect_timeout_ms": 2000}})
    # The host runs inside the namespace; its unix socket is reachable from
    # here because unix sockets live in the file system.
    host = make_host(manifest, wrapper="unshare -n sh %s" % script)
    s = BrokerStream(host.channel())
    s.send(knock_open(1, "tcp", "10.123.0.1:4567"))
    r = s.recv()
    if allow:
        # The listener accepts but speaks no HTTP/2: not ready in time, but
        # it was reached.
        assert_error(r, 1)
        assert int(open(countfile).read()) >= 1
    else:
        assert_error(r, 1, "is not loopback")
        assert int(open(countfile).read()) == 0
    s.end()
    host.terminate()
    assert host.wait_event("EXIT") == "EXIT 0"
    shutil.rmtree(d, ignore_errors=True)
