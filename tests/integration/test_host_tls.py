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
