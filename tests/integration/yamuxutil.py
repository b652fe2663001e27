"""A small yamux client (hashicorp/yamux spec.md) for the multiplexing tests.

The conformance tests use a Go client on Debian's hashicorp/yamux
(tests/go/.../gpmux); this one exists for what a well-behaved peer never
does: garbage frames, a stream reset in the middle of a message, a reader
that stops reading, raw frame checks.  It is deliberately plain: one
reader thread, blocking sends, the default 256 KiB window.

Session(sock) runs the session on a connected socket; Session.proxy(path)
listens on a unix socket and turns each connection into a new stream, so a
grpcio channel to "unix:PATH" talks to the plugin through yamux.
"""
import os
import socket
import struct
import threading
import time

DATA, WINDOW_UPDATE, PING, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8
WINDOW = 256 * 1024
HDR = struct.Struct(">BBHII")


def frame(typ, flags, sid, length, payload=b""):
    return HDR.pack(0, typ, flags, sid, length) + payload


class Stream:
    def __init__(self, session, sid):
        self.session = session
        self.sid = sid
        self.buf = bytearray()
        self.fin = False       # the peer half-closed
        self.reset = False     # the peer reset it
        self.acked = False
        self.send_window = WINDOW
        self.unacked_consumed = 0
        self.received = 0

    # Called with the session's lock held.
    def _on_data(self, data):
        self.buf += data
        self.received += len(data)

    def recv(self, n=65536, timeout=10):
        """Up to n bytes; b"" at FIN; raises on reset or timeout."""
        s = self.session
        with s.cv:
            if not s.cv.wait_for(lambda: self.buf or self.fin or self.reset
                                 or s.closed, timeout):
                raise TimeoutError("stream %d: nothing to read" % self.sid)
            if self.buf:
                data = bytes(self.buf[:n])
                del self.buf[:n]
                self.unacked_consumed += len(data)
                upd = 0
                if self.unacked_consumed >= WINDOW // 2:
                    upd, self.unacked_consumed = self.unacked_consumed, 0
            elif self.reset:
                raise ConnectionResetError("stream %d reset" % self.sid)
            else:
                return b""
        if upd:
            s.send_raw(frame(WINDOW_UPDATE, 0, self.sid, upd))
        return data

    def send(self, data, timeout=10):
        s = self.session
        view = memoryview(data)
        while view:
            with s.cv:
                if not s.cv.wait_for(lambda: self.send_window > 0 or
                                     self.reset or s.closed, timeout):
                    raise TimeoutError("stream %d: send window closed" %
                                       self.sid)
                if self.reset or s.closed:
                    raise ConnectionResetError("stream %d gone" % self.sid)
                n = min(len(view), self.send_window, 65536)
                self.send_window -= n
            s.send_raw(frame(DATA, 0, self.sid, n, bytes(view[:n])))
            view = view[n:]

    def close(self):
        self.session.send_raw(frame(WINDOW_UPDATE, FIN, self.sid, 0))

    def rst(self):
        self.session.send_raw(frame(WINDOW_UPDATE, RST, self.sid, 0))


class Session:
    def __init__(self, sock, on_stream=None):
        self.sock = sock
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.wlock = threading.Lock()
        self.streams = {}
        self.next_id = 1
        self.closed = False
        self.go_away = None      # code of the peer's GO_AWAY
        self.pongs = set()
        self.pings_seen = 0
        self.frames = []          # (type, flags, sid, length) received
        self.on_stream = on_stream  # called (in a thread) for peer streams
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @classmethod
    def connect(cls, network, address, **kw):
        if network == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(address)
        else:
            host, port = address.rsplit(":", 1)
            s = socket.create_connection((host, int(port)))
        return cls(s, **kw)

    def send_raw(self, data):
        with self.wlock:
            self.sock.sendall(data)

    def _recv_exact(self, n):
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                return None
            out += chunk
        return bytes(out)

    def _read(self):
        try:
            while True:
                h = self._recv_exact(12)
                if h is None:
                    break
                ver, typ, flags, sid, length = HDR.unpack(h)
                payload = b""
                if typ == DATA and length:
                    payload = self._recv_exact(length)
                    if payload is None:
                        break
                self._dispatch(typ, flags, sid, length, payload)
        except OSError:
            pass
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def _dispatch(self, typ, flags, sid, length, payload):
        new = None
        with self.cv:
            self.frames.append((typ, flags, sid, length))
            if typ == PING:
                if flags & SYN:
                    self.pings_seen += 1
                    threading.Thread(target=self.send_raw, args=(
                        frame(PING, ACK, 0, length),), daemon=True).start()
                else:
                    self.pongs.add(length)
            elif typ == GO_AWAY:
                self.go_away = length
            else:
                st = self.streams.get(sid)
                if st is None and flags & SYN:
                    st = self.streams[sid] = Stream(self, sid)
                    new = st
                if st is not None:
                    if flags & ACK:
                        st.acked = True
                    if typ == WINDOW_UPDATE:
                        st.send_window += length
                    elif payload:
                        st._on_data(payload)
                    if flags & FIN:
                        st.fin = True
                    if flags & RST:
                        st.reset = True
            self.cv.notify_all()
        if new is not None:
            self.send_raw(frame(WINDOW_UPDATE, ACK, new.sid, 0))
            if self.on_stream:
                threading.Thread(target=self.on_stream, args=(new,),
                                 daemon=True).start()

    def open(self):
        with self.cv:
            sid = self.next_id
            self.next_id += 2
            st = self.streams[sid] = Stream(self, sid)
        self.send_raw(frame(WINDOW_UPDATE, SYN, sid, 0))
        return st

    def ping(self, opaque, timeout=10):
        self.send_raw(frame(PING, SYN, 0, opaque))
        with self.cv:
            if not self.cv.wait_for(lambda: opaque in self.pongs or
                                    self.closed, timeout):
                raise TimeoutError("no pong for %d" % opaque)
            return opaque in self.pongs

    def wait_closed(self, timeout=10):
        with self.cv:
            return self.cv.wait_for(lambda: self.closed, timeout)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # -- a local endpoint for grpcio
    def proxy(self, path):
        """Listen on unix socket path; each connection becomes a stream."""
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(16)

        def accept_loop():
            while True:
                try:
                    c, _ = lsock.accept()
                except OSError:
                    return
                bridge(c, self.open())

        threading.Thread(target=accept_loop, daemon=True).start()
        return lsock


def bridge(conn, st):
    """Copy bytes both ways between a socket and a stream until both end."""
    def up():
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    st.close()
                    return
                st.send(data, timeout=60)
        except (OSError, TimeoutError):
            try:
                st.rst()
            except OSError:
                pass

    def down():
        try:
            while True:
                data = st.recv(timeout=3600)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    return
                conn.sendall(data)
        except (OSError, TimeoutError, ConnectionResetError):
            try:
                conn.close()
            except OSError:
                pass

    threading.Thread(target=up, daemon=True).start()
    threading.Thread(target=down, daemon=True).start()
