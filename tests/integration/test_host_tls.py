"""rpcplugin-host with go-plugin's AutoMTLS (PLUGIN_CLIENT_CERT): a fresh
self-signed server certificate appended to the handshake line (unpadded
base64 DER), TLS that requires and verifies the client's certificate, so
that only the client holding the certificate it announced gets in."""
import base64
import os

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from hostutil import Stdio, make_cert


@pytest.fixture(scope="module")
def client_cert():
    return make_cert()


def creds(server_pem, cert_key=None):
    if cert_key is None:
        return grpc.ssl_channel_credentials(root_certificates=server_pem)
    return grpc.ssl_channel_credentials(root_certificates=server_pem,
                                        private_key=cert_key[1],
                                        certificate_chain=cert_key[0])


@pytest.mark.parametrize("network", ["unix", "tcp"])
def test_automtls(hosts, client_cert, network):
    h = hosts(options=["--network", network, "--no-exit-with-child"],
              env={"PLUGIN_CLIENT_CERT": client_cert[0].decode()},
              command=["/bin/sh", "-c", "echo secret"])
    hs = h.handshake
    assert hs.network == network and hs.cert_b64
    # Go's base64.RawStdEncoding: no padding, standard alphabet.
    assert "=" not in hs.cert_b64 and "\n" not in hs.cert_b64
    der = base64.b64decode(hs.cert_b64 + "=" * (-len(hs.cert_b64) % 4))
    cert = x509.load_der_x509_certificate(der)
    assert cert.issuer == cert.subject  # self-signed
    san = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert cert.extensions.get_extension_for_class(
        x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    server_pem = hs.server_cert_pem()

    # The client with the announced certificate gets in.
    good = h.channel(creds(server_pem, client_cert))
    assert h.health(good) == 1
    out = Stdio(good)
    # Another client certificate, or none, is refused by the handshake.
    for who in (creds(server_pem, make_cert()), creds(server_pem)):
        with pytest.raises(grpc.RpcError) as e:
            h.health(h.channel(who), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # And plaintext gets nowhere either.
    with pytest.raises(grpc.RpcError):
        h.health(h.channel(), timeout=5)
    out.wait_contains(1, b"secret\n")
    assert h.health(good) == 1
    h.shutdown(good)
    assert h.wait() == 0


def test_certificates_are_fresh(hosts, client_cert):
    env = {"PLUGIN_CLIENT_CERT": client_cert[0].decode()}
    a = hosts(env=env)
    b = hosts(env=env)
    assert a.handshake.cert_b64 != b.handshake.cert_b64


def test_bad_client_cert_env(hosts):
    h = hosts(env={"PLUGIN_CLIENT_CERT": "not a certificate"},
              wait_handshake=False)
    assert h.wait() == 1
    assert h.next_line() is None
    assert "PLUGIN_CLIENT_CERT" in h.stderr_until("PLUGIN_CLIENT_CERT")
    assert not os.listdir(h.sockdir)


def test_empty_client_cert_means_plaintext(hosts):
    h = hosts(env={"PLUGIN_CLIENT_CERT": ""})
    assert h.handshake.cert_b64 is None
    assert h.health(h.channel()) == 1


def process_memory(pid):
    """The writable mappings of a running process (the test's own child:
    readable through /proc/PID/mem)."""
    out = []
    with open("/proc/%d/maps" % pid) as maps, \
            open("/proc/%d/mem" % pid, "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in addr.split("-"))
            if not perms.startswith("rw") or hi - lo > (512 << 20):
                continue
            try:
                mem.seek(lo)
                out.append(mem.read(hi - lo))
            except OSError:
                pass
    return b"".join(out)


def test_private_key_never_at_rest(tmp_path, client_cert):
    """The AutoMTLS private key lives in memory only: at the highest
    verbosity, with stdio, health and the broker used and a Shutdown, it is
    in no file the host could have written (its folders, /tmp, /var/tmp,
    /dev/shm), not on its stderr and not in what it streamed.  The key
    searched for is the real one: read from the host's memory and checked
    against the certificate it announced."""
    import re
    import time
    from cryptography.hazmat.primitives import serialization
    from hostutil import PluginHost
    from conftest import start_stream
    import grpc_broker_pb2

    t0 = time.time()
    work = tmp_path / "work"
    work.mkdir()
    h = PluginHost(options=["-v", "-v", "--no-exit-with-child"],
                   env={"PLUGIN_CLIENT_CERT": client_cert[0].decode()},
                   command=["/bin/sh", "-c", "echo hello; echo oops >&2"],
                   cwd=str(work), tmpdir=str(tmp_path / "tmp"))
    try:
        server_pem = h.handshake.server_cert_pem()
        ch = h.channel(creds(server_pem, client_cert))
        assert h.health(ch) == 1
        out = Stdio(ch)
        out.wait_contains(1, b"hello\n", timeout=10)
        replies = list(start_stream(ch)(iter([grpc_broker_pb2.ConnInfo(
            service_id=0)]), timeout=10))
        assert replies and replies[0].knock.error

        # The key, from the host's memory, proved by its public half.
        mem = process_memory(h.proc.pid)
        pems = set(re.findall(
            rb"-----BEGIN (?:EC |RSA )?PRIVATE KEY-----[A-Za-z0-9+/=\r\n]+"
            rb"-----END (?:EC |RSA )?PRIVATE KEY-----", mem))
        from cryptography import x509
        served = x509.load_pem_x509_certificate(server_pem).public_key()
        key = None
        for pem in pems:
            k = serialization.load_pem_private_key(pem, password=None)
            if k.public_key().public_numbers() == served.public_numbers():
                key = k
        assert key is not None, "the served key was not found in memory"

        h.shutdown(ch)
        assert out.wait_end(timeout=30) == grpc.StatusCode.OK
        assert h.wait(30) == 0
        streamed = bytes(out.data[1]) + bytes(out.data[2])
        stderr = h.stderr().encode() if isinstance(h.stderr(), str) \
            else h.stderr()
    finally:
        h.close()

    der = key.private_bytes(serialization.Encoding.DER,
                            serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    raw = key.private_numbers().private_value.to_bytes(
        (key.key_size + 7) // 8, "big")
    pem_body = [ln for ln in key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).splitlines() if not ln.startswith(b"-")]
    # The key's own bytes, anywhere; any PEM private key at all in what the
    # host wrote itself (its stderr, its stream, its folders).
    needles = [der, raw] + [ln for ln in pem_body if len(ln) >= 32]

    def leaks(data, own=False):
        return [n[:16] for n in needles + ([b"PRIVATE KEY"] if own else [])
                if n in data]

    # The search finds the key where it is (a clean machine may give it no
    # file at all to look into).
    assert leaks(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), True) != []
    assert leaks(b"x" + der + b"y") != []
    assert leaks(streamed, True) == [], "a key went out on the stdio stream"
    assert leaks(stderr, True) == [], "a key is on the host's stderr"
    for top in (str(tmp_path), "/tmp", "/var/tmp", "/dev/shm"):
        for root, dirs, files in os.walk(top):
            for f in files:
                p = os.path.join(root, f)
                try:
                    st = os.lstat(p)
                    if not os.path.isfile(p) or st.st_mtime < t0 - 1 or \
                            st.st_size > (64 << 20):
                        continue
                    with open(p, "rb") as fh:
                        data = fh.read()
                except OSError:
                    continue
                own = p.startswith(str(tmp_path))
                assert leaks(data, own) == [], "the key is in %s" % p
