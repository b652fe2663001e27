"""Faults (issue 11): a client SIGKILLed in the middle of its streams;
Shutdown with 1,000 streams open; a subchannel target that dies after its
knock; the plugin's COMMAND killed; the plugin killed by its client.
The host does not crash, forgets the dead client's streams, and the next
client is served; under the block policy nothing is lost but what the dead
client's own transport had taken."""
import os
import queue
import signal
import subprocess
import sys
import time

import grpc
import pytest
from google.protobuf import empty_pb2

from conftest import BUILD, SLOW, start_stream, stream_stdio, write_manifest
from hostutil import wait_until
import grpc_broker_pb2

# A client in a process of its own: opens StreamStdio and StartStream,
# reads 10 lines, sends one broker message and reads its answer, says
# READY, then waits to be killed.
VICTIM = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
sys.path.insert(0, sys.argv[3])
import grpc
import pytest
from google.protobuf import empty_pb2
from conftest import stream_stdio, start_stream
import grpc_broker_pb2
ch = grpc.insecure_channel(sys.argv[1])
s = stream_stdio(ch)(empty_pb2.Empty(), timeout=60)
for _ in range(10):
    next(s)
def reqs():
    yield grpc_broker_pb2.ConnInfo(service_id=0)
    time.sleep(120)
b = start_stream(ch)(reqs(), timeout=60)
next(b)
print("READY", flush=True)
time.sleep(120)
"""


def seq_of(data):
    return int(data[:8])


def test_client_sigkilled_mid_stream(make_host, tmp_path):
    host = make_host(write_manifest(tmp_path, config={
        "stdio": {"flush_deadline_ms": 20000}}))
    # More than the dead client's flow-control window can take (at most 4
    # MiB): the rest must reach the next client.
    n, size = 40000, 256
    assert host.cmd("bg putseq 1 %d %d" % (n, size)) == "OK bg"
    here = os.path.dirname(os.path.abspath(__file__))
    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, host.target, here,
         os.path.join(BUILD, "py")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = victim.stdout.readline()
        assert line.strip() == "READY", (line, victim.stderr.read())
        assert host.stats()["broker_streams"] == 1
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    wait_until(lambda: host.stats()["calls_active"] == 0, 30 * SLOW,
               "the dead client's streams to be gone")
    assert host.stats()["broker_streams"] == 0
    # The next client: the broker answers, and stdio delivers the rest in
    # order, without a line twice, to the very last one.
    ch = host.channel()
    b = start_stream(ch)(iter([grpc_broker_pb2.ConnInfo(service_id=0)]),
                         timeout=30 * SLOW)
    assert "not valid" in next(b).knock.error
    s = stream_stdio(ch)(empty_pb2.Empty(), timeout=120 * SLOW)
    got = []
    for m in s:
        got.append(seq_of(m.data))
        if got[-1] == n - 1:
            break
    assert got == list(range(got[0], n)), "lost, repeated or reordered"
    assert got[0] >= 10
    s.cancel()
    assert host.wait_event("BGDONE", timeout=60) == "BGDONE OK putseq %d" % n
    assert host.cmd("shutdown") == "OK shutdown"
    assert host.wait_event("EXIT") == "EXIT 0"


@pytest.mark.slow
def test_shutdown_with_1000_streams_open(make_host, tmp_path):
    """Shutdown while 1,000 StartStream streams are open: every stream ends
    (OK, after its last reply) and the host exits 0."""
    import time
    from brokerutil import BrokerStream, knock_close
    from conftest import controller_shutdown
    import grpc_controller_pb2
    host = make_host(write_manifest(tmp_path))
    chs = [host.channel() for _ in range(10)]
    # A deadline far past the setup: opening 1,000 streams from Python took
    # over 120 s on a slow fresh machine, and the first ones expired.
    streams = [BrokerStream(chs[i % 10], timeout=1200) for i in range(1000)]
    for s in streams:
        s.send(knock_close(7))
    # One deadline for all replies (not one per stream): on a slow machine
    # the last requests leave the Python client long after the first.
    deadline = time.monotonic() + 300 * SLOW
    for i, s in enumerate(streams):
        left = max(1.0, deadline - time.monotonic()) / SLOW
        try:
            r = s.recv(timeout=left)
        except queue.Empty:
            raise AssertionError(
                "stream %d of 1000 got no reply in 300 s; %d replies queued "
                "on the others; host %s" % (
                    i, sum(t.replies.qsize() for t in streams),
                    host.stats())) from None
        assert "not found" in r.knock.error
    assert host.stats()["broker_streams"] == 1000
    t0 = time.monotonic()
    controller_shutdown(host.channel())(grpc_controller_pb2.Empty(),
                                        timeout=30 * SLOW)
    assert host.wait_event("EXIT", timeout=60) == "EXIT 0"
    took = time.monotonic() - t0
    for s in streams:
        assert s.replies.get(timeout=30 * SLOW) is None  # ended
        assert s.error is None, s.error  # status OK
    assert took < 20 * SLOW, took


def test_subchannel_target_dies_after_its_knock(make_host, tmp_path):
    """A knocked subchannel whose target dies: a knock for it again does
    not acknowledge a dead connection; it waits for READY like a first
    knock, fails, and the subchannel is closed.  When the target is back a
    knock connects again.  The stream and the host go on throughout."""
    from brokerutil import BrokerStream, health_server, knock_open
    host = make_host(write_manifest(tmp_path, config={
        "broker": {"connect_timeout_ms": 3000}}))
    sock = str(tmp_path / "target.sock")
    server, _ = health_server("unix:" + sock)
    s = BrokerStream(host.channel())
    s.send(knock_open(5, "unix", sock))
    r = s.recv()
    assert r.knock.ack and not r.knock.error, r
    assert host.stats()["broker_subchannels"] == 1
    server.stop(None).wait(10)
    # The connection's end reaches the channel asynchronously: until it
    # does, a knock may still see it READY.  Knock until one is refused.
    deadline = time.monotonic() + 20 * SLOW
    while True:
        s.send(knock_open(5, "unix", sock))
        r = s.recv(timeout=30)
        if r.knock.error:
            break
        assert r.knock.ack, r
        assert time.monotonic() < deadline, "a dead target kept being acked"
    assert r.service_id == 5
    assert ("cannot connect" in r.knock.error or
            "not ready within" in r.knock.error), r
    assert host.stats()["broker_subchannels"] == 0
    # Back again: a knock reconnects.
    server2, _ = health_server("unix:" + sock)
    try:
        s.send(knock_open(5, "unix", sock))
        r = s.recv()
        assert r.knock.ack and not r.knock.error, r
        assert host.stats()["broker_subchannels"] == 1
        assert s.end() == []
    finally:
        server2.stop(None)


def sh(script):
    return ["/bin/sh", "-c", script]


def test_child_sigkilled(hosts, tmp_path):
    """rpcplugin-host's COMMAND killed with SIGKILL: everything it wrote
    before reaches the client, its end is reported, the stream ends OK and
    the host exits 0 (--exit-with-child, the default)."""
    from hostutil import Stdio, pid_gone
    pidfile = tmp_path / "pid"
    h = hosts(command=sh(
        'echo $$ > %s; i=0; while [ $i -lt 500 ]; do echo line$i; '
        'i=$((i+1)); done; echo ready; exec sleep 60' % pidfile))
    out = Stdio(h.channel())
    out.wait_contains(1, b"ready\n")
    child = int(pidfile.read_text())
    os.kill(child, signal.SIGKILL)
    assert out.wait_end() == grpc.StatusCode.OK, out.error
    assert h.wait() == 0
    expected = b"".join(b"line%d\n" % i for i in range(500)) + b"ready\n"
    assert bytes(out.data[1]) == expected
    assert b"was killed by signal 9" in out.data[2]
    assert pid_gone(child)


def test_child_sigkilled_host_keeps_serving(hosts, tmp_path):
    from hostutil import Stdio
    pidfile = tmp_path / "pid"
    h = hosts(command=sh('echo $$ > %s; echo ready; exec sleep 60' % pidfile),
              options=["--no-exit-with-child"])
    ch = h.channel()
    out = Stdio(ch)
    out.wait_contains(1, b"ready\n")
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    out.wait_contains(2, b"was killed by signal 9")
    assert h.health(ch) == 1
    assert out.status is None  # the stream stays open
    h.shutdown(ch)
    assert out.wait_end() == grpc.StatusCode.OK, out.error
    assert h.wait() == 0


def test_plugin_sigkilled_by_its_client(hosts, tmp_path):
    """The client kills the plugin (go-plugin's Kill after its grace
    period): the client's open streams fail UNAVAILABLE instead of
    hanging, and the plugin's COMMAND does not outlive it (its parent-death
    signal)."""
    from hostutil import Stdio, pid_gone
    from brokerutil import BrokerStream
    pidfile = tmp_path / "pid"
    h = hosts(command=sh('echo $$ > %s; echo ready; exec sleep 60' % pidfile))
    ch = h.channel()
    out = Stdio(ch)
    b = BrokerStream(ch)
    out.wait_contains(1, b"ready\n")
    b.wait_open()
    child = int(pidfile.read_text())
    h.proc.kill()
    assert out.wait_end() == grpc.StatusCode.UNAVAILABLE, out.error
    assert b.replies.get(timeout=10 * SLOW) is None
    assert b.error.code() == grpc.StatusCode.UNAVAILABLE
    wait_until(lambda: pid_gone(child), 10 * SLOW, "the child to end")


def test_shutdown_and_unload_under_mixed_load(make_host, tmp_path):
    """Shutdown arrives while Health calls, broker streams full of
    messages, host threads in put_line and a reading stdio stream are all
    in flight; the test host then destroys the runtime, which dlcloses the
    module (the ASan and valgrind stages run this too).  Every call ends
    with OK or UNAVAILABLE/CANCELLED (none hangs), the stdio stream ends OK
    with each producer's chunks once and in order, and the host exits 0."""
    import threading
    from brokerutil import BrokerStream, knock_close
    from conftest import controller_shutdown, health_check
    import grpc_controller_pb2
    import health_pb2
    host = make_host(write_manifest(tmp_path, config={
        "stdio": {"flush_deadline_ms": 20000}}))
    chs = [host.channel() for _ in range(4)]
    for size in (64, 65):
        assert host.cmd("bg putseq 1 100000 %d" % size) == "OK bg"
    out = stream_stdio(chs[0])(empty_pb2.Empty(), timeout=120 * SLOW)
    got = []
    first = threading.Event()

    def read():
        try:
            for m in out:
                got.append(m.data)
                first.set()
        except grpc.RpcError as e:
            got.append(e)
        first.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    streams = [BrokerStream(chs[i % 4], timeout=120) for i in range(20)]
    for s in streams:
        for k in range(50):
            s.send(knock_close(1000 + k))
    codes, stop = [], threading.Event()

    def health_loop(ch):
        check = health_check(ch)
        while not stop.is_set():
            try:
                check(health_pb2.HealthCheckRequest(), timeout=30 * SLOW)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
                if e.code() != grpc.StatusCode.OK:
                    return
    loops = [threading.Thread(target=health_loop, args=(ch,), daemon=True)
             for ch in chs]
    for t in loops:
        t.start()
    assert first.wait(30 * SLOW)
    wait_until(lambda: len(codes) >= 50, 30 * SLOW, "Health calls flowing")
    try:
        controller_shutdown(host.channel())(grpc_controller_pb2.Empty(),
                                            timeout=30 * SLOW)
    except grpc.RpcError as e:  # the reply may lose the race with the end
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
    assert host.wait_event("EXIT", timeout=90) == "EXIT 0"
    stop.set()
    for t in loops:
        t.join(30 * SLOW)
        assert not t.is_alive(), "a Health call hung"
    reader.join(30 * SLOW)
    assert not reader.is_alive(), "the stdio stream hung"
    ends = {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED}
    assert set(codes) <= ends, set(codes)
    for s in streams:
        while s.replies.get(timeout=30 * SLOW) is not None:
            pass
        assert s.error is None or s.error.code() in ends, s.error
    assert not isinstance(got[-1], grpc.RpcError), got[-1]  # ended OK
    seqs = {64: [], 65: []}
    for d in got:
        seqs[len(d)].append(seq_of(d))
    for size, v in seqs.items():
        assert v == list(range(len(v))), size  # once each, in order
