"""Helpers for the broker tests: a StartStream driver that can send raw
bytes, real target servers, and a TCP listener that records connections."""
import queue
import socket
import threading
from concurrent import futures

import grpc

from conftest import SLOW
import grpc_broker_pb2
import health_pb2

ConnInfo = grpc_broker_pb2.ConnInfo
Knock = grpc_broker_pb2.ConnInfo.Knock


def knock_open(sid, network, address):
    return ConnInfo(service_id=sid, network=network, address=address,
                    knock=Knock(knock=True))


def knock_close(sid):
    return ConnInfo(service_id=sid, knock=Knock(knock=False))


class BrokerStream:
    """One StartStream call: send() ConnInfo or raw bytes, recv() replies."""

    _END = object()

    def __init__(self, channel, timeout=120):
        self._out = queue.Queue()
        self.replies = queue.Queue()
        method = channel.stream_stream(
            "/plugin.GRPCBroker/StartStream",
            request_serializer=lambda b: b,
            response_deserializer=ConnInfo.FromString)
        self.call = method(self._requests(), timeout=timeout * SLOW)
        self.error = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self):
        while True:
            item = self._out.get()
            if item is self._END:
                return
            yield item

    def _read(self):
        try:
            for r in self.call:
                self.replies.put(r)
        except grpc.RpcError as e:
            self.error = e
        self.replies.put(None)

    def wait_open(self):
        self.call.initial_metadata()

    def send(self, msg):
        self._out.put(msg if isinstance(msg, bytes) else msg.SerializeToString())

    def recv(self, timeout=20):
        r = self.replies.get(timeout=timeout * SLOW)
        assert r is not None, "stream ended: %r" % self.error
        return r

    def close_send(self):
        self._out.put(self._END)

    def end(self, timeout=20):
        """Half-close and wait for the end of the stream; returns leftovers."""
        self.close_send()
        rest = []
        while True:
            r = self.replies.get(timeout=timeout * SLOW)
            if r is None:
                return rest
            rest.append(r)

    def cancel(self):
        self.call.cancel()


def health_server(address):
    """A real gRPC server answering Health/Check with SERVING.  Returns
    (server, bound port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(
            lambda req, ctx: health_pb2.HealthCheckResponse(status=1),
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)
    server.start()
    return server, port


class Recorder:
    """A TCP listener that counts the connections it accepts and, if given
    a target, forwards their bytes there (a recording proxy).  With a gate
    (a threading.Event) it holds every connection, accepted and silent,
    until the gate is set: a knock through it stays connecting until then."""

    def __init__(self, host="127.0.0.1", target=None, port=0, gate=None):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.target = target
        self.gate = gate
        self.count = 0
        self._lock = threading.Lock()
        self._conns = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.count += 1
                self._conns.append(c)
            if self.target:
                threading.Thread(target=self._forward, args=(c,),
                                 daemon=True).start()

    def _forward(self, c):
        if self.gate is not None and not self.gate.wait(120):
            return
        try:
            up = socket.create_connection(self.target)
        except OSError:
            c.close()
            return
        with self._lock:
            self._conns.append(up)
        for a, b in ((c, up), (up, c)):
            threading.Thread(target=self._pump, args=(a, b),
                             daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self._stop = True
        self.sock.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass


def closed_port():
    """A loopback port nobody listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
