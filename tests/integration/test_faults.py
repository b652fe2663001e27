"""Faults (issue 11): a client SIGKILLed in the middle of its streams.
The host does not crash, forgets the dead client's streams, and the next
client is served; under the block policy nothing is lost but what the dead
client's own transport had taken."""
import os
import queue
import signal
import subprocess
import sys

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
