"""Shared fixtures for the integration tests.

The tests drive build/tests/test_host (a small C host that loads a manifest's
module through the loader) with real clients: Debian's Python grpcio here,
go-plugin and grpc-js elsewhere.  Environment:
  RP_BUILD      build directory (default: <repo>/build)
  RP_WRAPPER    command prefix for the host, e.g. "valgrind --leak-check=full"
  RP_SLOW       time multiplier for deadlines (valgrind, sanitizers)
"""
import glob
import json
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("RP_BUILD", os.path.join(REPO, "build"))
SLOW = float(os.environ.get("RP_SLOW", "1"))
sys.path.insert(0, os.path.join(BUILD, "py"))

import grpc  # noqa: E402
from google.protobuf import empty_pb2  # noqa: E402
import grpc_broker_pb2  # noqa: E402,F401
import grpc_controller_pb2  # noqa: E402,F401
import grpc_stdio_pb2  # noqa: E402,F401
import health_pb2  # noqa: E402,F401

MANIFESTS = sorted(glob.glob(os.path.join(REPO, "manifests", "*.json")))
MANIFESTS = [m for m in MANIFESTS if not m.endswith(".schema.json")]

ALL_SERVICES = ["plugin.GRPCBroker", "plugin.GRPCStdio",
                "plugin.GRPCController", "grpc.health.v1.Health"]


def manifest_services(path):
    with open(path) as f:
        return json.load(f)["services"]


class Host:
    """A running test_host: send commands, watch events, connect clients."""

    def __init__(self, manifest, tmpdir, address=None, env=None, wrapper="",
                 program="test_host"):
        self.sock = os.path.join(tmpdir, "host.sock")
        self.address = address or "unix:" + self.sock
        e = dict(os.environ)
        e["RPCPLUGIN_MODULE_PATH"] = os.path.join(BUILD, "lib")
        if env:
            e.update(env)
        cmd = shlex.split(wrapper) + shlex.split(
            os.environ.get("RP_WRAPPER", "")) + [
            os.path.join(BUILD, "tests", program), manifest, self.address]
        self.stderr_path = os.path.join(tmpdir, "host.stderr")
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=e, text=True,
                                     bufsize=1)
        self.replies = queue.Queue()
        self.events = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ev = self.event(timeout=30 * SLOW)
        if not ev.startswith("READY"):
            raise RuntimeError("host did not start: %r\n%s" % (ev, self.stderr()))
        self.port = int(ev.split()[1])
        if self.address.startswith("unix:"):
            self.target = self.address
        else:
            host = self.address.rsplit(":", 1)[0]
            self.target = "%s:%d" % (host, self.port)
        self._channels = []

    def _read(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("OK") or line.startswith("ERR"):
                self.replies.put(line)
            else:
                self.events.put(line)
        self.events.put("<eof>")

    def stderr(self):
        self._stderr.flush()
        with open(self.stderr_path) as f:
            return f.read()

    def event(self, timeout=10):
        return self.events.get(timeout=timeout * SLOW)

    def wait_event(self, prefix, timeout=10):
        deadline = time.monotonic() + timeout * SLOW
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no event %r" % prefix)
            ev = self.events.get(timeout=left)
            if ev.startswith(prefix):
                return ev

    def cmd(self, line, timeout=30):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        try:
            return self.replies.get(timeout=timeout * SLOW)
        except queue.Empty:
            raise AssertionError(
                "no reply to %r (host %s); its stderr:\n%s" % (
                    line, "alive" if self.proc.poll() is None
                    else "exited %s" % self.proc.returncode,
                    self.stderr()[-4000:])) from None

    def stats(self):
        r = self.cmd("stats")
        assert r.startswith("OK "), r
        return {k: int(v) for k, v in (kv.split("=") for kv in r.split()[1:])}

    def channel(self):
        ch = grpc.insecure_channel(self.target)
        self._channels.append(ch)
        return ch

    def terminate(self, sig=15):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout=20):
        return self.proc.wait(timeout=timeout * SLOW)

    def close(self):
        for ch in self._channels:
            ch.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20 * SLOW)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


@pytest.fixture
def make_host():
    hosts = []
    dirs = []

    def make(manifest, **kw):
        d = tempfile.mkdtemp(prefix="rp-")
        dirs.append(d)
        h = Host(manifest, d, **kw)
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        h.close()


@pytest.fixture
def hosts():
    """Start rpcplugin-host processes (hostutil.PluginHost); all are closed
    after the test."""
    from hostutil import PluginHost
    started = []

    def make(*a, **kw):
        h = PluginHost(*a, **kw)
        started.append(h)
        return h

    yield make
    for h in started:
        h.close()


def manifest_path(name):
    return os.path.join(REPO, "manifests", name)


def write_manifest(tmpdir, services=None, config=None, name="test"):
    """A manifest in tmpdir for the module in the build tree."""
    m = {
        "manifest_version": 1,
        "name": name,
        "module": "rpcplugin_services.so",
        "abi_version": "1.0",
        "protocol_version": 1,
        "services": services or ALL_SERVICES,
    }
    if config is not None:
        m["config"] = config
    path = os.path.join(str(tmpdir), name + ".json")
    with open(path, "w") as f:
        json.dump(m, f)
    return path


# Client stubs without grpc_tools: method handles on a channel.
def health_check(ch):
    return ch.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString)


def controller_shutdown(ch):
    return ch.unary_unary(
        "/plugin.GRPCController/Shutdown",
        request_serializer=grpc_controller_pb2.Empty.SerializeToString,
        response_deserializer=grpc_controller_pb2.Empty.FromString)


def stream_stdio(ch):
    return ch.unary_stream(
        "/plugin.GRPCStdio/StreamStdio",
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=grpc_stdio_pb2.StdioData.FromString)


def start_stream(ch):
    return ch.stream_stream(
        "/plugin.GRPCBroker/StartStream",
        request_serializer=grpc_broker_pb2.ConnInfo.SerializeToString,
        response_deserializer=grpc_broker_pb2.ConnInfo.FromString)
