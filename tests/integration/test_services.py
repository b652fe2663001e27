"""Per-manifest and per-implementation integration: every manifest in
manifests/ is loaded by the test host once with each implementation of the
infrastructure services the project builds (rpcplugin_services.so and
rpcplugin_recorder.so); the services it declares answer as docs/wire.md
says, all the others answer UNIMPLEMENTED, and Shutdown runs the host's
callback.  test_abi_matrix.py runs the same scenario across ABI
versions."""
import json
import os

import grpc
import pytest
from google.protobuf import empty_pb2

from conftest import (MANIFESTS, controller_shutdown, health_check,
                      manifest_services, start_stream, stream_stdio)
import grpc_broker_pb2
import grpc_controller_pb2
import health_pb2


def unimplemented(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, e.value
    return e.value


# The implementations of the four infrastructure services: module file ->
# what it logs for each call it serves (None: nothing).
IMPLEMENTATIONS = {
    "rpcplugin_services.so": None,
    "rpcplugin_recorder.so": "rpcplugin-recorder: call ",
}


def with_module(manifest, module, tmpdir):
    """manifest, copied into tmpdir with its "module" replaced."""
    with open(manifest) as f:
        m = json.load(f)
    m.pop("$schema", None)
    m["module"] = module
    path = os.path.join(str(tmpdir), os.path.basename(manifest))
    with open(path, "w") as f:
        json.dump(m, f)
    return path


@pytest.mark.parametrize("module", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("manifest", MANIFESTS, ids=os.path.basename)
def test_manifest_services(make_host, manifest, module, tmp_path):
    host = make_host(with_module(manifest, module, tmp_path))
    run_scenario(host, manifest_services(manifest))
    log = IMPLEMENTATIONS[module]
    err = host.stderr()
    if log is None:
        assert "rpcplugin-recorder" not in err
    elif "grpc.health.v1.Health" in manifest_services(manifest):
        assert log + "/grpc.health.v1.Health/Check" in err, err


def run_scenario(host, services):
    """Each of the four services answers if declared, else UNIMPLEMENTED;
    Shutdown (or SIGTERM without the controller) ends the host with 0."""
    ch = host.channel()

    # Health
    if "grpc.health.v1.Health" in services:
        for name in ("", "plugin"):
            r = health_check(ch)(health_pb2.HealthCheckRequest(service=name),
                                 timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            health_check(ch)(health_pb2.HealthCheckRequest(service="nope"),
                             timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    else:
        unimplemented(lambda: health_check(ch)(
            health_pb2.HealthCheckRequest(service="plugin"), timeout=10))

    # Stdio: a line put before the client connects arrives.
    if "plugin.GRPCStdio" in services:
        assert host.cmd("put 2 6869") == "OK put"
        it = stream_stdio(ch)(empty_pb2.Empty(), timeout=10)
        msg = next(it)
        assert msg.data == b"hi" and msg.channel == 2
        it.cancel()
    else:
        assert host.cmd("put 1 6869").startswith("ERR RPCPLUGIN_EUNSUPPORTED")
        unimplemented(lambda: list(stream_stdio(ch)(empty_pb2.Empty(),
                                                    timeout=10)))

    # Broker: a close of an unknown id answers "not found", stream goes on.
    if "plugin.GRPCBroker" in services:
        reqs = [grpc_broker_pb2.ConnInfo(
            service_id=7, knock=grpc_broker_pb2.ConnInfo.Knock(knock=False))]
        replies = list(start_stream(ch)(iter(reqs), timeout=10))
        assert len(replies) == 1
        assert replies[0].service_id == 7
        assert not replies[0].knock.ack
        assert "not found" in replies[0].knock.error
    else:
        unimplemented(lambda: list(start_stream(ch)(
            iter([grpc_broker_pb2.ConnInfo(service_id=1)]), timeout=10)))

    # A method nobody serves.
    err = unimplemented(lambda: ch.unary_unary("/no.Such/Method")(b"",
                                                                  timeout=10))
    assert "/no.Such/Method" in err.details()

    # Shutdown: Empty back, then the host's callback, then a clean exit.
    if "plugin.GRPCController" in services:
        r = controller_shutdown(ch)(grpc_controller_pb2.Empty(), timeout=10)
        assert r == grpc_controller_pb2.Empty()
        assert host.wait_event("SHUTDOWN_REQUESTED") == "SHUTDOWN_REQUESTED"
    else:
        unimplemented(lambda: controller_shutdown(ch)(
            grpc_controller_pb2.Empty(), timeout=10))
        host.terminate()
    assert host.wait_event("EXIT") == "EXIT 0"
    assert host.wait() == 0


def test_second_and_concurrent_shutdown(make_host):
    host = make_host([m for m in MANIFESTS if m.endswith("default.json")][0])
    ch = host.channel()
    sd = controller_shutdown(ch)
    futures = [sd.future(grpc_controller_pb2.Empty(), timeout=10)
               for _ in range(4)]
    for f in futures:
        try:
            assert f.result() == grpc_controller_pb2.Empty()
        except grpc.RpcError as e:
            # A call that arrives after the server stopped accepting is
            # refused by the transport; it must not crash anything.
            assert e.code() in (grpc.StatusCode.UNAVAILABLE,
                                grpc.StatusCode.CANCELLED), e
    # The callback ran exactly once: every event until the host's stdout
    # closes.
    events = []
    while not events or events[-1] != "<eof>":
        events.append(host.event(timeout=30))
    assert events.count("SHUTDOWN_REQUESTED") == 1, events
    assert "EXIT 0" in events
    assert host.wait() == 0


def test_sigterm_graceful(make_host):
    host = make_host([m for m in MANIFESTS if m.endswith("default.json")][0])
    ch = host.channel()
    assert health_check(ch)(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    host.terminate()
    assert host.wait_event("EXIT") == "EXIT 0"
    assert host.wait() == 0
