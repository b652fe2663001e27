"""The call API for application services (rpcplugin_call) through
rpcplugin-host serving an application manifest: tests/fixtures/app_echo.c
("test.Echo", bytes in and out) next to the infrastructure module named by
the manifest's "infrastructure".  Driven by Python grpcio with identity
serializers: unary, server streaming with backpressure, client streaming,
bidi, status codes, an answer from another thread, the deadline seen by the
handler, cancellation seen by the handler, and shutdown with calls open."""
import json
import os
import threading
import time

import grpc
import pytest

from conftest import BUILD, SLOW
from hostutil import PluginHost
import health_pb2

ECHO_SO = os.path.join(BUILD, "tests", "fixtures", "app_echo.so")


def app_manifest(tmp_path, infrastructure="default.json", services=None,
                 module=ECHO_SO):
    doc = {"manifest_version": 1, "name": "echo", "module": module,
           "abi_version": "1.1", "protocol_version": 1,
           "services": services or ["test.Echo"]}
    if infrastructure is not None:
        doc["infrastructure"] = infrastructure
    path = tmp_path / "echo.json"
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.fixture
def echo_host(hosts, tmp_path):
    h = hosts(manifest=app_manifest(tmp_path))
    yield h


def call(ch, method, kind="unary_unary"):
    return getattr(ch, kind)("/test.Echo/" + method)


def test_unary_and_infrastructure_side_by_side(echo_host):
    ch = echo_host.channel()
    assert call(ch, "Unary")(b"hello", timeout=10 * SLOW) == b"hello"
    assert call(ch, "Unary")(b"", timeout=10 * SLOW) == b""
    big = bytes(range(256)) * 4096  # 1 MiB
    assert call(ch, "Unary")(big, timeout=30 * SLOW) == big
    # The infrastructure module serves next to it.
    assert echo_host.health(ch) == health_pb2.HealthCheckResponse.SERVING
    # Methods nobody serves are still UNIMPLEMENTED.
    with pytest.raises(grpc.RpcError) as e:
        call(ch, "Nope")(b"", timeout=10 * SLOW)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    echo_host.shutdown(ch)
    assert echo_host.wait() == 0


@pytest.mark.parametrize("code,name", [(3, "INVALID_ARGUMENT"),
                                       (5, "NOT_FOUND"), (13, "INTERNAL")])
def test_status_codes(echo_host, code, name):
    ch = echo_host.channel()
    with pytest.raises(grpc.RpcError) as e:
        call(ch, "Fail")(b"%d went wrong: %s" % (code, name.encode()),
                         timeout=10 * SLOW)
    assert e.value.code().name == name
    assert e.value.details() == "went wrong: %s" % name


def test_answer_later_from_another_thread(echo_host):
    ch = echo_host.channel()
    t0 = time.monotonic()
    assert call(ch, "Later")(b"200", timeout=10 * SLOW) == b"later"
    assert time.monotonic() - t0 >= 0.2
    # Many at once, each answered by its own thread.
    futs = [call(ch, "Later").future(b"50", timeout=30 * SLOW)
            for _ in range(50)]
    assert [f.result() for f in futs] == [b"later"] * 50


def test_deadline_visible_to_handler(echo_host):
    ch = echo_host.channel()
    left = int(call(ch, "TimeLeft")(b"", timeout=5.0))
    assert 3000 < left <= 5000
    assert int(call(ch, "TimeLeft")(b"")) == -1


def test_server_streaming_with_backpressure(echo_host):
    """64 MiB in 4 KiB messages: far more than the 1 MiB send queue, so the
    handler hits RPCPLUGIN_ELIMIT and resumes from on_writable; every
    message arrives, in order."""
    ch = echo_host.channel()
    n, size = 16384, 4096
    got = 0
    for i, msg in enumerate(call(ch, "Stream", "unary_stream")(
            b"%d %d" % (n, size), timeout=120 * SLOW)):
        assert len(msg) == size
        assert msg[:8] == b"%08d" % i
        got += 1
    assert got == n


def test_slow_reader_does_not_lose_messages(echo_host):
    ch = echo_host.channel()
    it = call(ch, "Stream", "unary_stream")(b"2000 1024", timeout=60 * SLOW)
    seen = []
    for i, msg in enumerate(it):
        if i % 200 == 0:
            time.sleep(0.02)  # a slow consumer, so the queue fills
        seen.append(int(msg[:8]))
    assert seen == list(range(2000))


def test_client_streaming(echo_host):
    ch = echo_host.channel()
    msgs = [bytes([i % 256]) * (i * 10) for i in range(300)]
    out = call(ch, "Collect", "stream_unary")(iter(msgs), timeout=30 * SLOW)
    assert out == b"%d %d" % (len(msgs), sum(map(len, msgs)))
    assert call(ch, "Collect", "stream_unary")(iter([]),
                                               timeout=10 * SLOW) == b"0 0"


def test_bidi(echo_host):
    ch = echo_host.channel()
    msgs = [b"m%d" % i * (i + 1) for i in range(500)]
    out = list(call(ch, "Bidi", "stream_stream")(iter(msgs),
                                                 timeout=30 * SLOW))
    assert out == msgs


def test_cancel_seen_by_handler(echo_host):
    ch = echo_host.channel()
    assert call(ch, "Cancels")(b"", timeout=10 * SLOW) == b"0"
    fut = call(ch, "Hang").future(b"", timeout=30 * SLOW)
    time.sleep(0.1)  # the call reached the handler (no event to wait on)
    fut.cancel()
    deadline = time.monotonic() + 10 * SLOW
    while call(ch, "Cancels")(b"", timeout=10 * SLOW) != b"1":
        assert time.monotonic() < deadline, "on_cancel never ran"
        time.sleep(0.01)
    # A deadline that passes cancels too.
    with pytest.raises(grpc.RpcError) as e:
        call(ch, "Hang")(b"", timeout=0.2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    while call(ch, "Cancels")(b"", timeout=10 * SLOW) != b"2":
        assert time.monotonic() < deadline, "deadline not seen"
        time.sleep(0.01)


def test_shutdown_with_calls_open(echo_host):
    """Hanging calls, a stream in progress and a Later call when Shutdown
    comes: the hanging calls end UNAVAILABLE, the host exits 0."""
    ch = echo_host.channel()
    hang = [call(ch, "Hang").future(b"", timeout=60 * SLOW) for _ in range(5)]
    later = call(ch, "Later").future(b"300", timeout=60 * SLOW)
    time.sleep(0.1)
    echo_host.shutdown(ch)
    for f in hang:
        with pytest.raises(grpc.RpcError) as e:
            f.result()
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.CANCELLED)
    try:
        later.result()
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.CANCELLED)
    assert echo_host.wait(timeout=20) == 0


def test_many_concurrent_unary(echo_host):
    ch = echo_host.channel()
    futs = [call(ch, "Unary").future(b"%d" % i, timeout=30 * SLOW)
            for i in range(2000)]
    assert [f.result() for f in futs] == [b"%d" % i for i in range(2000)]


def test_manifest_errors_name_file_and_field(hosts, tmp_path):
    # An infrastructure manifest nobody has.
    m = app_manifest(tmp_path, infrastructure="no-such.json")
    h = hosts(manifest=m, wait_handshake=False)
    assert h.wait() == 1
    assert ('%s: field "infrastructure": no manifest "no-such.json"' % m
            in h.stderr()), h.stderr()
    # A service the module does not serve.
    m = app_manifest(tmp_path, services=["test.Other"])
    h = hosts(manifest=m, wait_handshake=False)
    assert h.wait() == 1
    assert "cannot register its services" in h.stderr()
    assert 'unknown service "test.Other"' in h.stderr()
    # Mixed infrastructure and application services.
    m = app_manifest(tmp_path, services=["test.Echo", "plugin.GRPCStdio"])
    h = hosts(manifest=m, wait_handshake=False)
    assert h.wait() == 1
    assert 'field "services[1]": a manifest names either' in h.stderr()


def test_stream_of_messages_larger_than_half_the_queue(echo_host):
    """700 KiB messages: each is refused while another waits, and
    on_writable must wait until it fits (not fire at half the queue and
    refuse it again forever)."""
    ch = echo_host.channel(options=[("grpc.max_receive_message_length",
                                     8 << 20)])
    n, size = 12, 700 * 1024
    got = [len(m) for m in call(ch, "Stream", "unary_stream")(
        b"%d %d" % (n, size), timeout=60 * SLOW)]
    assert got == [size] * n
