"""ABI compatibility matrix (docs/abi.md), with built variants:

- test_host links librpcplugin of this ABI (1.3); test_host_abi11 links the
  same sources built as an ABI 1.1 host (its host API ends before the 1.2
  relays, struct_size smaller).
- rpcplugin_services.so is this ABI's module; rpcplugin_services_older.so
  is the same module as ABI 1.1 shipped it (its vtable ends before the 1.2
  handover entries); rpcplugin_services_newer.so a hypothetical 1.4 (a
  longer vtable with entries no host knows yet).
- fake_major2.so declares ABI 2.0: refused, both versions named.

Every pairing serves the whole scenario of test_services.py; swaps between
them keep serving, and streams are handed over only when both sides have
the 1.2 entries (otherwise they end as documented)."""
import os

import grpc
import pytest
from google.protobuf import empty_pb2

from conftest import (BUILD, SLOW, health_check, manifest_path,
                      manifest_services, stream_stdio)
from hostutil import wait_until
from test_services import run_scenario, with_module
import health_pb2

FIXTURES = os.path.join(BUILD, "tests", "fixtures")
CURRENT = "rpcplugin_services.so"
OLDER = os.path.join(FIXTURES, "rpcplugin_services_older.so")
NEWER = os.path.join(FIXTURES, "rpcplugin_services_newer.so")
DEFAULT = manifest_path("default.json")

# (host program, module, what `abi` reports)
MATRIX = [
    ("test_host", OLDER, "1.1 struct_size=%d handover=no"),
    ("test_host", CURRENT, "1.3 struct_size=%d handover=yes"),
    ("test_host", NEWER, "1.4 struct_size=%d handover=yes"),
    ("test_host_abi11", OLDER, "1.1 struct_size=%d handover=no"),
    ("test_host_abi11", CURRENT, "1.3 struct_size=%d handover=yes"),
    ("test_host_abi11", NEWER, "1.4 struct_size=%d handover=yes"),
]


def module_id(m):
    return os.path.basename(m).replace("rpcplugin_", "").replace(".so", "")


def manifest_for(tmp_path, module, sub="m"):
    d = tmp_path / sub
    d.mkdir(exist_ok=True)
    return with_module(DEFAULT, module, d)


def abi_of(host):
    r = host.cmd("abi")
    assert r.startswith("OK "), r
    return r.split(None, 2)[2]


@pytest.mark.parametrize("program,module,abi", MATRIX,
                         ids=["%s-%s" % (p, module_id(m)) for p, m, _ in MATRIX])
def test_pairing_serves(make_host, tmp_path, program, module, abi):
    host = make_host(manifest_for(tmp_path, module), program=program)
    got = abi_of(host)
    minor, size = got.split()[0], int(got.split()[1].split("=")[1])
    assert got == abi % size, got
    # Smaller and larger vtables than the host's, each as declared.
    if minor == "1.1":
        assert "handover=no" in got
    run_scenario(host, manifest_services(DEFAULT))


def open_stdio(ch):
    call = stream_stdio(ch)(empty_pb2.Empty(), timeout=60 * SLOW)
    call.initial_metadata()
    return call


def lines_until(call, last):
    got = []
    for m in call:
        got.append(m.data)
        if m.data == last:
            break
    return got


def cancel_last_stream(host, call):
    """Cancel the only call open on host and wait until its module saw it
    end.  Until then the stream is idle and takes the next line put (a
    write the C core completes, to a client that is gone: lost), so the
    scenario's stream that follows would wait for it in vain."""
    call.cancel()
    wait_until(lambda: host.stats()["calls_active"] == 0, 10,
               "the module to see the cancelled stream end")


def healthy(ch):
    r = health_check(ch)(health_pb2.HealthCheckRequest(), timeout=10 * SLOW)
    return r.status == health_pb2.HealthCheckResponse.SERVING


def test_swap_newer_host_older_module(make_host, tmp_path):
    """A 1.2 host swaps a 1.1 module for a 1.2 one and back: the old side
    has no handover, so its stream is flushed and ends with OK at its
    shutdown; the next stream reaches the new module; nothing queued is
    lost."""
    older = manifest_for(tmp_path, OLDER, "old")
    current = manifest_for(tmp_path, CURRENT, "cur")
    host = make_host(older)
    ch = host.channel()
    a = open_stdio(ch)
    assert host.cmd("put 1 " + b"one\n".hex()) == "OK put"
    assert next(a).data == b"one\n"
    assert host.cmd("swap " + current) == "OK swap handover=no"
    assert list(a) == [] and a.code() == grpc.StatusCode.OK
    assert abi_of(host).startswith("1.3 ")
    assert healthy(ch)
    b = open_stdio(ch)
    assert host.cmd("put 1 " + b"two\n".hex()) == "OK put"
    assert next(b).data == b"two\n"
    # Back to the older one: the new side lacks handover_in.
    assert host.cmd("swap " + older) == "OK swap handover=no"
    assert list(b) == [] and b.code() == grpc.StatusCode.OK
    assert abi_of(host).startswith("1.1 ")
    c = open_stdio(ch)
    assert host.cmd("put 1 " + b"three\n".hex()) == "OK put"
    assert next(c).data == b"three\n"
    cancel_last_stream(host, c)
    run_scenario(host, manifest_services(DEFAULT))


def test_swap_older_host_current_modules(make_host, tmp_path):
    """A 1.1 host has no relays: a stream cannot move, so the old module
    ends it UNAVAILABLE "plugin swapped" (a client reopens it); output
    still queued moves to the new module and reaches the next stream
    first, in order."""
    current = manifest_for(tmp_path, CURRENT, "cur")
    recorder = manifest_for(tmp_path, "rpcplugin_recorder.so", "rec")
    host = make_host(current, program="test_host_abi11")
    ch = host.channel()
    a = open_stdio(ch)
    assert host.cmd("put 1 " + b"first\n".hex()) == "OK put"
    assert next(a).data == b"first\n"
    assert host.cmd("swap " + recorder) == "OK swap handover=yes"
    with pytest.raises(grpc.RpcError) as e:
        list(a)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "plugin swapped" in e.value.details()
    assert abi_of(host).startswith("1.3 ")
    # Queued while no stream is open, then swapped: it comes over.
    for i in range(5):
        assert host.cmd("put 1 " + (b"q%d\n" % i).hex()) == "OK put"
    assert host.cmd("swap " + current) == "OK swap handover=yes"
    b = open_stdio(ch)
    assert host.cmd("put 1 " + b"after\n".hex()) == "OK put"
    assert lines_until(b, b"after\n") == [b"q%d\n" % i for i in range(5)] + \
        [b"after\n"]
    cancel_last_stream(host, b)
    run_scenario(host, manifest_services(DEFAULT))


@pytest.mark.parametrize("program", ["test_host", "test_host_abi11"])
def test_swap_to_other_major_refused(make_host, tmp_path, program):
    """A module of ABI 2.0: the swap fails naming the file and both
    versions; the old module keeps serving its open stream."""
    host = make_host(manifest_for(tmp_path, CURRENT), program=program)
    ch = host.channel()
    a = open_stdio(ch)
    bad = manifest_for(tmp_path, os.path.join(FIXTURES, "fake_major2.so"),
                       "bad")
    r = host.cmd("swap " + bad)
    host_abi = "1.1" if program == "test_host_abi11" else "1.3"
    assert r.startswith("ERR RPCPLUGIN_EABI "), r
    assert "fake_major2.so" in r
    assert "ABI major mismatch (host ABI %s, module ABI 2.0)" % host_abi in r
    assert healthy(ch)
    assert host.cmd("put 1 " + b"still\n".hex()) == "OK put"
    assert next(a).data == b"still\n"
    cancel_last_stream(host, a)
    run_scenario(host, manifest_services(DEFAULT))
