"""gRPC server reflection (grpc.reflection.v1alpha) served by rpcplugin-host
(rpcplugin_runtime_enable_reflection, on by default, --no-reflection turns
it off): the services listed are those routed, files come from the
descriptor sets the modules embed (the infrastructure protos and
reflection.proto; tests/fixtures/echo.proto for the application module
app_echo), with their imports.

The client is tests/go's gpreflect (grpc-go's own v1alpha client stubs,
descriptors rebuilt with protodesc: what grpcurl-style tools do); those
tests are skipped without RP_GO_BIN.  Python grpcio with hand-encoded
messages checks what gpreflect cannot: pipelined requests answered in
order, malformed requests, and a stream left open at Shutdown."""
import os
import queue
import subprocess

import grpc
import pytest
from google.protobuf import descriptor_pb2

from conftest import SLOW, manifest_path
from hostutil import HOST_BIN, make_cert
from test_app_calls import app_manifest

GO_BIN = os.environ.get("RP_GO_BIN")
needs_go = pytest.mark.skipif(
    not GO_BIN,
    reason="RP_GO_BIN is not set: build the Go programs with "
           "tests/go/build.sh OUTDIR and set RP_GO_BIN=OUTDIR/bin")

METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
INFRA = ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
         "plugin.GRPCBroker", "plugin.GRPCController", "plugin.GRPCStdio"]


def gpreflect(target, *args, cert_dir=None, timeout=20):
    """Run gpreflect against target; returns (exit code, stdout lines)."""
    prog = os.path.join(GO_BIN, "gpreflect")
    assert os.access(prog, os.X_OK), \
        "RP_GO_BIN=%s has no gpreflect (run tests/go/build.sh)" % GO_BIN
    cmd = [prog, "--timeout", "%ds" % (timeout * SLOW)]
    if cert_dir:
        cmd += ["--automtls-cert-dir", str(cert_dir)]
    p = subprocess.run(cmd + [target] + list(args), capture_output=True,
                       text=True, timeout=(timeout + 10) * SLOW)
    return p.returncode, p.stdout.splitlines()


# ------------------------------------------------------------ gpreflect

@needs_go
@pytest.mark.parametrize("network", ["unix", "tcp"])
def test_list_default(hosts, network):
    h = hosts(manifest=manifest_path("default.json"),
              options=["--network", network])
    target = h.handshake.target
    rc, out = gpreflect(target, "list")
    assert rc == 0, out
    assert out == INFRA


@needs_go
def test_describe_services(hosts):
    h = hosts(manifest=manifest_path("default.json"))
    rc, out = gpreflect(h.handshake.target, "describe", "plugin.GRPCStdio")
    assert rc == 0, out
    assert out == ["FILE grpc_stdio.proto", "SERVICE plugin.GRPCStdio",
                   "  rpc StreamStdio(google.protobuf.Empty) returns "
                   "(stream plugin.StdioData)"]
    # Every service listed resolves, with its imports, on one stream.
    args = []
    for svc in INFRA:
        args += ["describe", svc]
    rc, out = gpreflect(h.handshake.target, *args)
    assert rc == 0, out
    assert "SERVICE grpc.health.v1.Health" in out
    assert ("  rpc Check(grpc.health.v1.HealthCheckRequest) returns "
            "(grpc.health.v1.HealthCheckResponse)") in out
    assert ("  rpc StartStream(stream plugin.ConnInfo) returns "
            "(stream plugin.ConnInfo)") in out
    assert "  rpc Shutdown(plugin.Empty) returns (plugin.Empty)" in out
    assert ("  rpc ServerReflectionInfo(stream grpc.reflection.v1alpha."
            "ServerReflectionRequest) returns (stream grpc.reflection."
            "v1alpha.ServerReflectionResponse)") in out
    # Methods, messages, nested enums.
    rc, out = gpreflect(h.handshake.target,
                        "describe", "plugin.GRPCStdio.StreamStdio",
                        "describe", "plugin.StdioData",
                        "describe", "plugin.StdioData.Channel")
    assert rc == 0, out
    assert out == [
        "FILE grpc_stdio.proto", "METHOD plugin.GRPCStdio.StreamStdio",
        "  rpc StreamStdio(google.protobuf.Empty) returns "
        "(stream plugin.StdioData)",
        "FILE grpc_stdio.proto", "MESSAGE plugin.StdioData",
        "  field plugin.StdioData.Channel channel = 1",
        "  field bytes data = 2",
        "FILE grpc_stdio.proto", "ENUM plugin.StdioData.Channel",
        "  value INVALID = 0", "  value STDOUT = 1", "  value STDERR = 2"]


@needs_go
def test_files_come_with_imports_once(hosts):
    h = hosts(manifest=manifest_path("default.json"))
    rc, out = gpreflect(h.handshake.target, "file", "grpc_stdio.proto",
                        "file", "grpc_stdio.proto",
                        "symbol", "google.protobuf.Empty",
                        "file", "health.proto")
    assert rc == 0, out
    # grpc-go's rule: the file asked for always, its imports only when
    # not sent yet on this stream.
    assert out == ["FILE grpc_stdio.proto",
                   "FILE google/protobuf/empty.proto",
                   "FILE grpc_stdio.proto",
                   "FILE google/protobuf/empty.proto",
                   "FILE health.proto"]


@needs_go
def test_subset_lists_only_routed_services(hosts):
    h = hosts(manifest=manifest_path("stdio-broker.json"))
    rc, out = gpreflect(h.handshake.target, "list")
    assert rc == 0, out
    assert out == ["grpc.reflection.v1alpha.ServerReflection",
                   "plugin.GRPCBroker", "plugin.GRPCStdio"]
    # Calls to services not served are still UNIMPLEMENTED.
    with pytest.raises(grpc.RpcError) as e:
        h.health(h.channel(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


@needs_go
def test_unknown_symbol_and_file_not_found(hosts):
    h = hosts(manifest=manifest_path("default.json"))
    rc, out = gpreflect(h.handshake.target, "describe", "no.such.Service",
                        "file", "no/such.proto", "list")
    # The stream goes on after an error_response.
    assert rc == 1, out
    assert out == ["ERROR 5 NOT_FOUND: unknown symbol: no.such.Service",
                   "ERROR 5 NOT_FOUND: unknown file: no/such.proto"] + INFRA


@needs_go
def test_no_reflection_is_unimplemented(hosts):
    h = hosts(manifest=manifest_path("default.json"),
              options=["--no-reflection"])
    rc, out = gpreflect(h.handshake.target, "list")
    assert rc == 1
    assert len(out) == 1 and out[0].startswith("RPC_ERROR Unimplemented:"), out
    assert h.health(h.channel()) == 1
    usage = subprocess.run([HOST_BIN, "--help"], capture_output=True,
                           text=True).stdout
    assert "--no-reflection" in usage


@needs_go
def test_application_service_listed_and_described(hosts, tmp_path):
    h = hosts(manifest=app_manifest(tmp_path))
    rc, out = gpreflect(h.handshake.target, "list",
                        "describe", "test.Echo", "describe", "test.Blob")
    assert rc == 0, out
    assert out[:6] == sorted(INFRA + ["test.Echo"])
    rest = out[6:]
    assert rest[:2] == ["FILE echo.proto", "SERVICE test.Echo"]
    assert "  rpc Unary(test.Blob) returns (test.Blob)" in rest
    assert "  rpc Stream(test.Text) returns (stream test.Blob)" in rest
    assert "  rpc Collect(stream test.Blob) returns (test.Text)" in rest
    assert "  rpc Bidi(stream test.Blob) returns (stream test.Blob)" in rest
    assert "  rpc Hang(google.protobuf.Empty) returns " \
           "(google.protobuf.Empty)" in rest
    assert rest[-3:] == ["FILE echo.proto", "MESSAGE test.Blob",
                         "  field bytes data = 1"]
    # The service itself still answers.
    ch = h.channel()
    assert ch.unary_unary("/test.Echo/Unary")(b"hi", timeout=10 * SLOW) == \
        b"hi"


@needs_go
def test_automtls(hosts, tmp_path):
    cert, key = make_cert()
    h = hosts(manifest=manifest_path("default.json"),
              env={"PLUGIN_CLIENT_CERT": cert.decode()})
    (tmp_path / "client.pem").write_bytes(cert)
    (tmp_path / "client-key.pem").write_bytes(key)
    (tmp_path / "server.pem").write_bytes(h.handshake.server_cert_pem())
    rc, out = gpreflect(h.handshake.target, "list", cert_dir=tmp_path)
    assert rc == 0, out
    assert out == INFRA


# ------------------------------------------------- raw requests (grpcio)

def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def request(field, text, host=""):
    """A ServerReflectionRequest: host (1) and one string field of the
    oneof (3 file_by_filename, 4 file_containing_symbol, 6
    all_extension_numbers_of_type, 7 list_services)."""
    out = b""
    for f, v in ((1, host), (field, text)):
        if v or f == field:
            v = v.encode()
            out += _varint(f << 3 | 2) + _varint(len(v)) + v
    return out


def fields(buf):
    """Decode one message level: {field: [value, ...]} (bytes or ints)."""
    out, i = {}, 0
    while i < len(buf):
        key, shift = 0, 0
        while True:
            b = buf[i]
            i += 1
            key |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, shift = 0, 0
            while True:
                b = buf[i]
                i += 1
                v |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
        elif wt == 2:
            n, shift = 0, 0
            while True:
                b = buf[i]
                i += 1
                n |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            v = bytes(buf[i:i + n])
            i += n
        else:
            raise AssertionError("unexpected wire type %d" % wt)
        out.setdefault(f, []).append(v)
    return out


def answer(resp):
    """(kind, value): ("files", [names]), ("services", [names]),
    ("extensions", (type, [numbers])), ("error", (code, message)); plus
    the echoed request's fields."""
    top = fields(resp)
    orig = fields(top[2][0]) if 2 in top else {}
    if 4 in top:
        names = [descriptor_pb2.FileDescriptorProto.FromString(b).name
                 for b in fields(top[4][0]).get(1, [])]
        return "files", names, orig
    if 5 in top:
        e = fields(top[5][0])
        return "extensions", (e[1][0].decode(), e.get(2, [])), orig
    if 6 in top:
        svcs = [fields(s)[1][0].decode()
                for s in fields(top[6][0]).get(1, [])]
        return "services", svcs, orig
    if 7 in top:
        e = fields(top[7][0])
        return "error", (e[1][0], e[2][0].decode()), orig
    raise AssertionError("no message_response in %r" % resp)


def reflection(ch):
    return ch.stream_stream(METHOD)


def test_pipelined_requests_answered_in_order(hosts):
    h = hosts(manifest=manifest_path("default.json"))
    symbols = ["plugin.GRPCStdio", "no.such.Thing", "plugin.ConnInfo",
               "grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING",
               "grpc.health.v1.HealthCheckResponse.SERVING",
               "plugin.GRPCController.Shutdown", "plugin.StdioData.data",
               "grpc.reflection.v1alpha.ServerReflectionRequest."
               "message_request"]
    reqs = [request(4, symbols[i % len(symbols)], host="h%d" % i)
            for i in range(400)]
    out = list(reflection(h.channel())(iter(reqs), timeout=60 * SLOW))
    assert len(out) == len(reqs)
    for i, resp in enumerate(out):
        kind, value, orig = answer(resp)
        sym = symbols[i % len(symbols)]
        assert orig[4][0].decode() == sym
        assert fields(resp)[1][0] == b"h%d" % i  # valid_host
        if sym.startswith("no."):
            assert kind == "error" and value[0] == 5, (i, kind, value)
        else:
            assert kind == "files" and value[0].endswith(".proto"), \
                (i, sym, kind, value)
    # Enum values are siblings of their enum (HealthCheckResponse.SERVING
    # above), not of the enclosing message's scope.
    out = [answer(r) for r in reflection(h.channel())(
        iter([request(4, "grpc.health.v1.SERVING"),
              request(6, "plugin.StdioData"),
              request(6, "no.such.Message"),
              request(7, "")]), timeout=30 * SLOW)]
    assert out[0][:2] == ("error", (5, "unknown symbol: "
                                       "grpc.health.v1.SERVING"))
    assert out[1][:2] == ("extensions", ("plugin.StdioData", []))
    assert out[2][:2] == ("error", (5, "unknown type: no.such.Message"))
    assert out[3][:2] == ("services", INFRA)


@pytest.mark.parametrize("bad", [b"", b"\x0a\x01h", b"\xff\xff\xff"])
def test_bad_requests_end_the_stream(hosts, bad):
    """No message_request (grpc-go: INVALID_ARGUMENT), or bytes that do not
    decode; the host goes on serving."""
    h = hosts(manifest=manifest_path("default.json"))
    ch = h.channel()
    with pytest.raises(grpc.RpcError) as e:
        list(reflection(ch)(iter([request(7, ""), bad, request(7, "")]),
                            timeout=30 * SLOW))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert answer(list(reflection(ch)(iter([request(7, "")]),
                                      timeout=30 * SLOW))[0])[1] == INFRA


def test_open_stream_at_shutdown(hosts):
    """A client that keeps its stream open: Shutdown ends it, the host
    exits 0 (the call is cancelled and the handler lets it go)."""
    h = hosts(manifest=manifest_path("default.json"))
    ch = h.channel()
    q = queue.Queue()
    q.put(request(7, ""))

    def reqs():
        while True:
            item = q.get()
            if item is None:
                return
            yield item

    it = reflection(ch)(reqs(), timeout=60 * SLOW)
    assert answer(next(it))[1] == INFRA
    h.shutdown(h.channel())
    try:
        for _ in it:
            pass
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.CANCELLED), code
    q.put(None)
    assert h.wait(timeout=20) == 0
