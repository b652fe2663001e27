"""Helpers for the tests of the reference host program rpcplugin-host
(tests/integration/test_host_*.py).

PluginHost starts rpcplugin-host the way a go-plugin client starts a plugin:
the magic cookie and PLUGIN_PROTOCOL_VERSIONS in the environment, stdout a
pipe whose first line is the handshake, stderr a pipe the client logs.  The
socket directory (PLUGIN_UNIX_SOCKET_DIR) is a fresh temporary folder per
host, so a test can check that the host removes what it created.

Stdio collects a StreamStdio call in a thread, so a test waits for bytes
with a timeout instead of sleeping.

Environment (as conftest.py): RP_BUILD (the host is RP_BUILD/bin/
rpcplugin-host), RP_WRAPPER (a command prefix, e.g. valgrind), RP_SLOW.
"""
import base64
import os
import queue
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time

import grpc
from google.protobuf import empty_pb2

from conftest import (BUILD, REPO, SLOW, controller_shutdown, health_check,
                      manifest_path, stream_stdio)
import grpc_controller_pb2
import health_pb2

HOST_BIN = os.path.join(BUILD, "bin", "rpcplugin-host")
COOKIE_KEY = "RPCPLUGIN_HOST_TEST_COOKIE"
COOKIE_VALUE = "d5a0b1c2-host-test"
COOKIE_OPT = "--magic-cookie=%s=%s" % (COOKIE_KEY, COOKIE_VALUE)
HANDSHAKE_RE = re.compile(
    r"^1\|(?P<app>\d+)\|(?P<net>unix|tcp)\|(?P<addr>[^|]+)\|grpc"
    r"(?:\|(?P<cert>[A-Za-z0-9+/]*))?(?:\|(?P<mux>true|false))?$")

HOST_MANIFEST = manifest_path("host.json")
DEFAULT_MANIFEST = manifest_path("default.json")


def wait_until(pred, timeout, what):
    """Poll pred() until true; for conditions with no event to wait on
    (a file appearing, a process disappearing)."""
    deadline = time.monotonic() + timeout * SLOW
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out waiting for " + what)
        time.sleep(0.005)


def pid_gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    except FileNotFoundError:
        return True


class Handshake:
    def __init__(self, line):
        m = HANDSHAKE_RE.match(line)
        if not m:
            raise AssertionError("not a handshake line: %r" % line)
        self.line = line
        self.app_version = int(m.group("app"))
        self.network = m.group("net")
        self.address = m.group("addr")
        self.cert_b64 = m.group("cert") or None
        self.mux = m.group("mux")  # None: no 7th field

    @property
    def target(self):
        if self.network == "unix":
            return "unix:" + self.address
        return self.address

    def server_cert_pem(self):
        """The AutoMTLS certificate (unpadded base64 DER) as PEM."""
        b64 = self.cert_b64 + "=" * (-len(self.cert_b64) % 4)
        return ssl.DER_cert_to_PEM_cert(base64.b64decode(b64)).encode()


class PluginHost:
    """A running rpcplugin-host, started like a go-plugin client does."""

    def __init__(self, manifest=HOST_MANIFEST, command=None, options=(),
                 env=None, cookie=True, versions="1", tmpdir=None,
                 wait_handshake=True, cwd=None):
        self._own_tmpdir = tmpdir is None
        self.tmpdir = tmpdir or tempfile.mkdtemp(prefix="rph-")
        self.sockdir = os.path.join(self.tmpdir, "sockets")
        os.makedirs(self.sockdir, exist_ok=True)
        e = dict(os.environ)
        for k in list(e):
            if k.startswith("PLUGIN_") or k == COOKIE_KEY:
                del e[k]
        e["RPCPLUGIN_MODULE_PATH"] = os.path.join(BUILD, "lib")
        e["PLUGIN_UNIX_SOCKET_DIR"] = self.sockdir
        e["TMPDIR"] = self.tmpdir
        if cookie:
            e[COOKIE_KEY] = COOKIE_VALUE
        if versions is not None:
            e["PLUGIN_PROTOCOL_VERSIONS"] = versions
        if env:
            for k, v in env.items():
                if v is None:
                    e.pop(k, None)
                else:
                    e[k] = v
        self.argv = (shlex.split(os.environ.get("RP_WRAPPER", "")) +
                     [HOST_BIN, COOKIE_OPT] + list(options) + [manifest])
        if command:
            self.argv += ["--"] + list(command)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=e,
                                     cwd=cwd)
        self.lines = queue.Queue()
        self._stderr = []
        self._stderr_cv = threading.Condition()
        self.stderr_eof = threading.Event()
        self._t_out = threading.Thread(target=self._read_stdout, daemon=True)
        self._t_err = threading.Thread(target=self._read_stderr, daemon=True)
        self._t_out.start()
        self._t_err.start()
        self._channels = []
        self.handshake = None
        if wait_handshake:
            line = self.next_line(timeout=30)
            if line is None:
                self.proc.wait(timeout=10 * SLOW)
                raise AssertionError("no handshake (exit %s): %s" %
                                     (self.proc.returncode, self.stderr()))
            self.handshake = Handshake(line)

    # -- pipes
    def _read_stdout(self):
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def _read_stderr(self):
        while True:
            chunk = self.proc.stderr.read1(65536)
            with self._stderr_cv:
                if chunk:
                    self._stderr.append(chunk)
                else:
                    self.stderr_eof.set()
                self._stderr_cv.notify_all()
            if not chunk:
                break

    def next_line(self, timeout=10):
        """Next stdout line, None at EOF."""
        return self.lines.get(timeout=timeout * SLOW)

    def stderr(self):
        with self._stderr_cv:
            return b"".join(self._stderr).decode(errors="replace")

    def stderr_until(self, needle, timeout=10):
        """The host's (original) stderr once it contains needle."""
        deadline = time.monotonic() + timeout * SLOW
        with self._stderr_cv:
            while True:
                text = b"".join(self._stderr).decode(errors="replace")
                if needle in text:
                    return text
                left = deadline - time.monotonic()
                if left <= 0 or self.stderr_eof.is_set():
                    raise AssertionError("%r not on stderr: %r" %
                                         (needle, text))
                self._stderr_cv.wait(left)

    def wait_stderr_eof(self, timeout=10):
        if not self.stderr_eof.wait(timeout * SLOW):
            raise AssertionError("stderr still open")

    # -- clients
    def channel(self, credentials=None, options=()):
        if credentials is None:
            ch = grpc.insecure_channel(self.handshake.target, options=options)
        else:
            ch = grpc.secure_channel(
                self.handshake.target, credentials,
                options=[("grpc.ssl_target_name_override", "localhost")] +
                list(options))
        self._channels.append(ch)
        return ch

    def health(self, ch, service="plugin", timeout=10):
        return health_check(ch)(health_pb2.HealthCheckRequest(service=service),
                                timeout=timeout * SLOW).status

    def shutdown(self, ch, timeout=10):
        return controller_shutdown(ch)(grpc_controller_pb2.Empty(),
                                       timeout=timeout * SLOW)

    # -- process
    def signal(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout=10):
        return self.proc.wait(timeout=timeout * SLOW)

    def close(self):
        for ch in self._channels:
            ch.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._own_tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


class Stdio:
    """A StreamStdio call read by a thread: per-channel bytes, message count,
    and the final status (None while open, grpc.StatusCode.OK at a clean
    end)."""

    def __init__(self, ch, timeout=60):
        self.call = stream_stdio(ch)(empty_pb2.Empty(), timeout=timeout * SLOW)
        self.data = {1: bytearray(), 2: bytearray()}
        self.messages = 0
        self.status = None
        self.error = None
        self._cv = threading.Condition()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        status, error = grpc.StatusCode.OK, None
        try:
            for msg in self.call:
                with self._cv:
                    self.data[msg.channel].extend(msg.data)
                    self.messages += 1
                    self._cv.notify_all()
        except grpc.RpcError as e:
            status, error = e.code(), e
        with self._cv:
            self.status, self.error = status, error
            self._cv.notify_all()

    def wait_for(self, pred, timeout=10, what="stdio data"):
        deadline = time.monotonic() + timeout * SLOW
        with self._cv:
            while not pred(self):
                left = deadline - time.monotonic()
                if left <= 0 or (self.status is not None and not pred(self)):
                    raise AssertionError(
                        "%s: not seen (status %s); stdout=%r stderr=%r" %
                        (what, self.status, bytes(self.data[1][-500:]),
                         bytes(self.data[2][-500:])))
                self._cv.wait(left)

    def wait_contains(self, channel, needle, timeout=10):
        self.wait_for(lambda s: needle in s.data[channel], timeout,
                      "%r on channel %d" % (needle, channel))

    def wait_end(self, timeout=10):
        self.wait_for(lambda s: s.status is not None, timeout, "end of stream")
        return self.status


def make_cert(common_name="localhost"):
    """A self-signed EC certificate like go-plugin's AutoMTLS client makes;
    returns (cert_pem, key_pem) as bytes."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.utcnow()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=30))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                           critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=True, data_encipherment=False,
                key_agreement=True, key_cert_sign=True, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH,
                 ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(common_name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def free_port_pair():
    """Two consecutive loopback ports, the first held busy by the returned
    listening socket: (busy_socket, first_port)."""
    import socket
    for _ in range(50):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        if port >= 65535:
            s.close()
            continue
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", port + 1))
        except OSError:
            s.close()
            continue
        finally:
            t.close()
        s.listen(1)
        return s, port
    raise RuntimeError("no two consecutive free ports")


__all__ = ["HOST_BIN", "COOKIE_KEY", "COOKIE_VALUE", "COOKIE_OPT",
           "HOST_MANIFEST", "DEFAULT_MANIFEST", "Handshake", "PluginHost",
           "Stdio", "make_cert", "free_port_pair", "wait_until", "pid_gone",
           "REPO", "SLOW"]
