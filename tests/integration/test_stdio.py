"""plugin.GRPCStdio/StreamStdio and put_line (docs/wire.md),
against Debian's Python grpcio as the client."""
import os
import threading
import time

import grpc
import pytest
from google.protobuf import empty_pb2

from conftest import SLOW, controller_shutdown, stream_stdio, write_manifest
from hostutil import wait_until
import grpc_controller_pb2

STDOUT, STDERR = 1, 2
SEQ_SIZE = 64


def seq_of(data):
    """putseq chunks start with an 8-digit sequence number."""
    try:
        return int(data[:8])
    except ValueError:
        raise AssertionError("not a putseq chunk: %r" % (data,))


def expected_chunk(i, size):
    body = bytes(ord("a") + (k % 26) for k in range(8, size - 1))
    return b"%08d" % i + body + b"\n"


def open_stream(host, ch=None):
    """Open StreamStdio and wait until the server has it (headers back)."""
    call = stream_stdio(ch or host.channel())(empty_pb2.Empty(),
                                              timeout=120 * SLOW)
    call.initial_metadata()
    return call


def make(make_host, tmp_path, **stdio):
    cfg = {"stdio": stdio} if stdio else None
    return make_host(write_manifest(tmp_path, config=cfg))


def shutdown_and_collect(host, call, before=None):
    """Read the stream; once `before` (if any) returned, shut down through
    the controller: the stream must deliver everything queued and then end
    with OK."""
    got = []
    done = threading.Event()
    err = []

    def reader():
        try:
            for m in call:
                got.append(m)
        except grpc.RpcError as e:
            err.append(e)
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    if before:
        before()
    controller_shutdown(host.channel())(grpc_controller_pb2.Empty(),
                                        timeout=30 * SLOW)
    assert done.wait(60 * SLOW), "stream did not end"
    assert not err, err
    assert call.code() == grpc.StatusCode.OK
    return got


def test_order_and_exact_bytes(make_host, tmp_path):
    host = make(make_host, tmp_path)
    call = open_stream(host)
    assert host.cmd("putseq 1 1000 64") == "OK putseq 1000"
    for i in range(1000):
        m = next(call)
        assert m.channel == STDOUT
        assert m.data == expected_chunk(i, 64)
    call.cancel()


def test_lines_before_connect_and_channels(make_host, tmp_path):
    host = make(make_host, tmp_path)
    assert host.cmd("put 1 6f75740a") == "OK put"     # "out\n"
    assert host.cmd("put 2 6572720a") == "OK put"     # "err\n"
    assert host.cmd("put 1 6e6f206e65776c696e65") == "OK put"  # no newline
    call = open_stream(host)
    got = [next(call) for _ in range(3)]
    assert [(m.channel, m.data) for m in got] == [
        (STDOUT, b"out\n"), (STDERR, b"err\n"), (STDOUT, b"no newline")]
    call.cancel()


def test_all_byte_values(make_host, tmp_path):
    host = make(make_host, tmp_path)
    data = bytes(range(256)) + b"\x00\xff\xfe"
    assert host.cmd("put 2 " + data.hex()) == "OK put"
    call = open_stream(host)
    m = next(call)
    assert m.channel == STDERR and m.data == data
    call.cancel()


@pytest.mark.parametrize("max_message", [4 << 20, 65536])
def test_one_mib_chunk(make_host, tmp_path, max_message):
    """A 1 MiB chunk arrives intact; over the message limit it is split into
    consecutive messages of one channel."""
    host = make(make_host, tmp_path, max_message_bytes=max_message)
    call = open_stream(host)
    assert host.cmd("putbig 2 1048576") == "OK putbig"
    want = bytes(i % 251 for i in range(1 << 20))
    buf = bytearray()
    n = 0
    while len(buf) < len(want):
        m = next(call)
        assert m.channel == STDERR
        assert len(m.SerializeToString()) <= max_message
        buf += m.data
        n += 1
    assert bytes(buf) == want
    assert n == (1 if max_message > (1 << 20) + 16 else -(-(1 << 20) // (max_message - 16)))
    call.cancel()


def test_hundred_thousand_chunks(make_host, tmp_path):
    host = make(make_host, tmp_path)
    call = open_stream(host)
    assert host.cmd("bg putseq 1 100000 64") == "OK bg"
    for i in range(100000):
        m = next(call)
        if seq_of(m.data) != i:
            pytest.fail("chunk %d arrived as %r" % (i, m.data[:8]))
    assert host.wait_event("BGDONE", timeout=60) == "BGDONE OK putseq 100000"
    s = host.stats()
    assert s["sent_chunks"] == s["queued_chunks"] == 100000
    assert s["dropped_chunks"] == 0
    call.cancel()


def test_exactly_once_across_two_streams(make_host, tmp_path):
    host = make(make_host, tmp_path)
    ch = host.channel()
    calls = [open_stream(host, ch), open_stream(host, host.channel())]
    n = 20000
    seen = [[], []]
    lock = threading.Lock()
    total = [0]
    all_in = threading.Event()

    def reader(k):
        try:
            for m in calls[k]:
                seen[k].append(seq_of(m.data))
                with lock:
                    total[0] += 1
                    if total[0] == n:
                        all_in.set()
        except grpc.RpcError:
            pass

    threads = [threading.Thread(target=reader, args=(k,), daemon=True)
               for k in (0, 1)]
    for t in threads:
        t.start()
    assert host.cmd("putseq 1 %d 32" % n) == "OK putseq %d" % n
    assert all_in.wait(60 * SLOW), "only %d of %d arrived" % (total[0], n)
    for c in calls:
        c.cancel()
    both = seen[0] + seen[1]
    assert sorted(both) == list(range(n))          # each exactly once
    for s in seen:
        assert s == sorted(s)                      # in order on each stream
    assert seen[0] and seen[1], "one stream got nothing"


def test_flush_then_ok_on_shutdown(make_host, tmp_path):
    host = make(make_host, tmp_path, flush_deadline_ms=20000)
    call = open_stream(host)
    # More than the transport window: most of it is still queued when the
    # client asks to shut down, and nothing is read until then.
    assert host.cmd("putseq 1 5000 200") == "OK putseq 5000"
    got = shutdown_and_collect(host, call)
    assert [seq_of(m.data) for m in got] == list(range(5000))
    assert host.wait_event("EXIT") == "EXIT 0"


def test_stream_limit(make_host, tmp_path):
    """config.stdio.max_streams: streams beyond it end at once with
    RESOURCE_EXHAUSTED naming the setting, and take nothing.  The streams
    open share the output (each line goes to one of them: a stream that
    does not read takes what its flow-control window holds), and all of it
    arrives, exactly once, in order on each."""
    host = make(make_host, tmp_path, max_streams=4, flush_deadline_ms=20000)
    streams = [open_stream(host) for _ in range(4)]  # one reads, 3 do not
    for _ in range(20):  # a flood
        extra = stream_stdio(host.channel())(empty_pb2.Empty(),
                                             timeout=10 * SLOW)
        with pytest.raises(grpc.RpcError) as e:
            next(extra)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "config.stdio.max_streams" in e.value.details()
    assert host.stats()["calls_active"] == 4
    n = 2000
    assert host.cmd("putseq 1 %d 64" % n) == "OK putseq %d" % n
    first = [seq_of(next(streams[0]).data) for _ in range(10)]
    seen = [[] for _ in streams]
    done = []

    def read(k):
        try:
            for m in streams[k]:
                seen[k].append(seq_of(m.data))
        except grpc.RpcError as e:
            seen[k].append(e)
        done.append(k)

    threads = [threading.Thread(target=read, args=(k,), daemon=True)
               for k in range(1, 4)]
    for t in threads:
        t.start()
    rest = shutdown_and_collect(host, streams[0])
    for t in threads:
        t.join(30 * SLOW)
    assert sorted(done) == [1, 2, 3]
    seen[0] = first + [seq_of(m.data) for m in rest]
    allseqs = [x for v in seen for x in v]
    assert sorted(allseqs) == list(range(n))  # exactly once, all of it
    for v in seen:
        assert v == sorted(v)
    assert host.wait_event("EXIT") == "EXIT 0"


def test_put_line_from_8_threads_during_shutdown(make_host, tmp_path):
    """Eight host threads put_line while the client reads and then calls
    Shutdown: every producer returns (RPCPLUGIN_ESHUTDOWN once the queue
    closed, never stuck), and each producer's chunks that put_line accepted
    reach the client, exactly once and in order, before the stream ends
    OK: the block policy loses nothing it accepted."""
    host = make(make_host, tmp_path, flush_deadline_ms=30000)
    call = open_stream(host)
    n, sizes = 200000, [64 + k for k in range(8)]
    for size in sizes:  # the size tells the producers apart
        assert host.cmd("bg putseq 1 %d %d" % (n, size)) == "OK bg"
    seen = {size: [] for size in sizes}
    got = threading.Event()

    def before():
        assert got.wait(60 * SLOW)

    # Read a while, then shut down mid-flow.
    msgs = []
    for m in call:
        msgs.append(m)
        if len(msgs) >= 2000:
            break
    got.set()
    rest = shutdown_and_collect(host, call, before=before)
    done = [host.wait_event("BGDONE", timeout=60) for _ in sizes]
    for d in done:
        # "BGDONE OK putseq N" (all put) or "BGDONE ERR putseq N" (the
        # queue closed after N were accepted)
        parts = d.split()
        assert parts[1] in ("OK", "ERR") and parts[2] == "putseq", d
    for m in msgs + rest:
        assert len(m.data) in seen, len(m.data)
        seen[len(m.data)].append(seq_of(m.data))
    counts = sorted(len(v) for v in seen.values())
    assert sorted(int(d.split()[3]) for d in done) == counts, (done, counts)
    for size, seqs in seen.items():
        assert seqs == list(range(len(seqs))), size  # in order, once each
    assert sum(counts) < 8 * n, "the producers all finished before Shutdown"
    assert host.wait_event("EXIT") == "EXIT 0"


def test_cancel_mid_stream_then_next_stream_gets_rest(make_host, tmp_path):
    host = make(make_host, tmp_path, flush_deadline_ms=20000)
    a = open_stream(host)
    # More than the first client's flow-control window (at most 4 MiB; a
    # client that stops reading takes about 3.5 MiB): however late the
    # server sees the cancel, the rest cannot all have gone to the first.
    n, size = 40000, 256
    assert host.cmd("bg putseq 1 %d %d" % (n, size)) == "OK bg"
    first = [seq_of(next(a).data) for _ in range(100)]
    assert first == list(range(100))
    a.cancel()
    b = open_stream(host)
    assert host.wait_event("BGDONE", timeout=60) == "BGDONE OK putseq %d" % n
    got = [seq_of(m.data) for m in shutdown_and_collect(host, b)]
    assert got, "the second stream received nothing"
    # Nothing twice; the second stream has everything from its first chunk
    # on, in order, to the very last one.
    assert got[0] >= 100
    assert got == list(range(got[0], n))
    # What neither client read was written to the first client's transport
    # before it cancelled, never more than its flow-control window holds.
    assert got[0] - 100 <= (4 << 20) // size


def test_write_in_flight_when_client_leaves_goes_to_next_stream(make_host,
                                                               tmp_path):
    """A client that stops reading ends up with a write of ours in flight
    (its transport takes no more, the queue fills, the producer blocks).
    When it cancels, that write fails; its message is put back, intact, and
    is the first the next stream gets, then the rest in order.  (If the
    write completes just before the cancel lands, it was handed to the
    leaving client and nothing is put back: then try again, a few times.)"""
    n, size = 4096, 16384           # 64 MiB, far more than any window
    for attempt in range(6):
        (tmp_path / str(attempt)).mkdir()
        host = make(make_host, tmp_path / str(attempt),
                    flush_deadline_ms=20000)
        a = open_stream(host)       # never read
        assert host.cmd("bg putseq 1 %d %d" % (n, size)) == "OK bg"
        # Counters are the only view of these server-side events: poll.
        wait_until(lambda: host.stats()["blocked_puts"] >= 1, 30,
                   "a full queue")
        a.cancel()
        wait_until(lambda: host.stats()["calls_active"] == 0, 30,
                   "the server to see the cancel")
        if host.stats()["resent_messages"] >= 1:
            break
        host.close()
    else:
        pytest.fail("no write was in flight at the cancel in 6 attempts")
    b = open_stream(host)

    def all_put():
        assert host.wait_event("BGDONE", timeout=60) == \
            "BGDONE OK putseq %d" % n

    got = shutdown_and_collect(host, b, before=all_put)
    bad = [m for m in got if len(m.data) != size or m.channel != STDOUT]
    assert got and not bad, bad[:1]
    seqs = [seq_of(m.data) for m in got]
    assert seqs == list(range(seqs[0], n))
    assert all(m.data == expected_chunk(seq_of(m.data), size) for m in got[:3])


def stalled_host(make_host, tmp_path, **stdio):
    host = make(make_host, tmp_path, **stdio)
    call = open_stream(host)  # never read until the test says so
    return host, call


def test_block_blocks_and_resumes(make_host, tmp_path):
    host, call = stalled_host(make_host, tmp_path, queue_bytes=65536,
                              overflow="block", flush_deadline_ms=20000)
    n = 20000
    assert host.cmd("bg putseq 1 %d 64" % n) == "OK bg"
    # The producer must end up waiting: the queue is full and the client's
    # flow-control window too.
    deadline = time.monotonic() + 30 * SLOW
    while True:
        s = host.stats()
        if s["blocked_puts"] >= 1:
            break
        assert time.monotonic() < deadline, s
    assert s["queue_bytes"] <= 65536
    assert host.events.empty(), "put_line returned although nobody read"
    got = []
    for m in call:  # reading lets it resume
        got.append(seq_of(m.data))
        if len(got) == n:
            break
    assert got == list(range(n))
    assert host.wait_event("BGDONE", timeout=60) == "BGDONE OK putseq %d" % n
    assert host.stats()["dropped_chunks"] == 0
    call.cancel()


def test_block_timeout(make_host, tmp_path):
    host, call = stalled_host(make_host, tmp_path, queue_bytes=65536,
                              overflow="block", block_timeout_ms=200)
    r = host.cmd("putseq 1 100000 64", timeout=60)
    assert r.startswith("ERR putseq"), r
    s = host.stats()
    assert s["timed_out_puts"] == 1 and s["blocked_puts"] >= 1
    call.cancel()


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_drop_policies_count_exactly(make_host, tmp_path, policy):
    host, call = stalled_host(make_host, tmp_path, queue_bytes=65536,
                              overflow=policy, flush_deadline_ms=20000)
    n = 50000
    r = host.cmd("putseq 1 %d 64" % n)
    accepted = int(r.split()[-1])
    s = host.stats()
    assert s["dropped_chunks"] > 0
    if policy == "drop_newest":
        assert accepted == s["queued_chunks"] == n - s["dropped_chunks"]
    else:
        assert accepted == s["queued_chunks"] == n
    assert s["dropped_bytes"] == 64 * s["dropped_chunks"]
    got = [seq_of(m.data) for m in shutdown_and_collect(host, call)]
    # Everything not counted as dropped arrives, once, in order.
    assert len(got) == n - s["dropped_chunks"]
    assert got == sorted(set(got))
    if policy == "drop_oldest":
        assert got[-1] == n - 1   # the newest survive


def rss_kib(pid, field="VmRSS"):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("RP_WRAPPER")), reason="RSS of a wrapper")
@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest", "block"])
def test_memory_stays_bounded(make_host, tmp_path, policy):
    """A stalled client while 256 MiB are put: RSS stays near the bound."""
    bound = 1 << 20
    host, call = stalled_host(make_host, tmp_path, queue_bytes=bound,
                              overflow=policy, block_timeout_ms=100)
    before = rss_kib(host.proc.pid)
    # 256 MiB in 1 KiB chunks, in 8 commands so block's timeout can fire.
    for _ in range(8):
        host.cmd("putseq 1 32768 1024", timeout=120)
    grown = rss_kib(host.proc.pid, "VmHWM") - before
    # Queue bound + what the transport holds for one stalled stream
    # (flow-control window and buffers) + allocator slack.
    assert grown < 3 * bound // 1024 + 16 * 1024, "grew %d KiB" % grown
    s = host.stats()
    assert s["queue_bytes"] <= bound
    call.cancel()
