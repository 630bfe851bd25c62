"""DICOM TLS: dcmtk storescu over TLS -> the node (client certificates verified) -> a TLS
storescp destination (the router authenticated by its certificate); plain TCP, a client
without a certificate and TLS older than 1.2 are refused; a silent connection does not stop
the SCP. The contexts of router/tls.py on their own: client certificates required or
optional, a destination's name checked."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from peers import DCMTK_ENV, free_port
from router import config as config_module
from router.config import Destination, TlsConfig
from router.tls import client_context, server_context
from test_node_support import ROUTER_AET, Router, wait_until

#: The handshake probe offers TLS 1.1 on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=deid-router test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client", "router"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def send(port: int, path: Path, *tls: str) -> subprocess.CompletedProcess:
    return subprocess.run([STORESCU, "-aec", ROUTER_AET, *tls, "127.0.0.1", str(port), str(path)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=60)


def handshake(port: int, pki: Path, version: ssl.TLSVersion, certificate: bool = True) -> str:
    """A TLS handshake limited to one version (OpenSSL's own floor lowered so 1.1 is offered);
    returns "ok" or OpenSSL's reason for the failure.

    With TLS 1.3 the server checks the client's certificate after the client's handshake
    is done: "ok" means no alert came within a second after it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = version
    context.load_verify_locations(str(pki / "ca.crt"))
    if certificate:
        context.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.settimeout(1.0)
                try:
                    tls.recv(1)
                except TimeoutError:
                    pass
        return "ok"
    except ssl.SSLError as exc:
        return exc.reason or type(exc).__name__


def test_tls_end_to_end_and_refusals(tmp_path: Path, pki: Path, corpus_dir: Path):
    out = tmp_path / "scp-out"
    out.mkdir()
    scp_port = free_port()
    scp = subprocess.Popen([STORESCP, "-aet", "TLS_PACS", "-od", str(out), "+tls", str(pki / "server.key"),
                            str(pki / "server.crt"), "+cf", str(pki / "ca.crt"), "-rc", str(scp_port)],
                           env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node_tls = {"certificate": str(pki / "server.crt"), "private_key": str(pki / "server.key"),
                "ca_certificates": str(pki / "ca.crt")}
    destination = {"name": "pacs", "ae_title": "TLS_PACS", "host": "127.0.0.1", "port": scp_port,
                   "tls": {"ca_certificates": str(pki / "ca.crt"), "certificate": str(pki / "router.crt"),
                           "private_key": str(pki / "router.key")}}
    try:
        router = Router(tmp_path, [destination], node={"tls": node_tls})
        with router.start(echo_aet=None):
            # a client that connects and says nothing must not hold up the others
            with socket.create_connection(("127.0.0.1", router.port)):
                ct = corpus_dir / "pydicom__CT_small.dcm"
                client = ("+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"))
                done = send(router.port, ct, *client)
                assert done.returncode == 0, done.stdout + done.stderr
            wait_until(lambda: list(out.iterdir()), timeout=30, what="the instance at the TLS destination")
            assert router.events("forwarded")
            # plain TCP to the TLS port: no association, nothing spooled
            plain = send(router.port, ct)
            assert plain.returncode != 0
            # TLS without a client certificate: refused (certificates are required)
            anonymous = send(router.port, ct, "+tla", "+cf", str(pki / "ca.crt"))
            assert anonymous.returncode != 0
            assert handshake(router.port, pki, ssl.TLSVersion.TLSv1_3, certificate=False) == \
                "TLSV13_ALERT_CERTIFICATE_REQUIRED"
            # TLS 1.1: the node answers with a protocol_version alert; 1.2 is accepted
            assert handshake(router.port, pki, ssl.TLSVersion.TLSv1_1) == "TLSV1_ALERT_PROTOCOL_VERSION"
            assert handshake(router.port, pki, ssl.TLSVersion.TLSv1_2) == "ok"
            assert len(router.events("received")) == 1
            assert router.stop() == 0
            refusals = [e["reason"] for e in router.events("tls_refused")]
            for reason in ("WRONG_VERSION_NUMBER", "PEER_DID_NOT_RETURN_A_CERTIFICATE", "UNSUPPORTED_PROTOCOL"):
                assert reason in refusals, refusals  # plain TCP, no client certificate, TLS 1.1
    finally:
        scp.terminate()
        scp.wait(10)
    assert len(list(out.iterdir())) == 1


class TlsEcho:
    """A one-thread TLS server with a context of router/tls.py: answers "?" with "!"."""

    def __init__(self, context: ssl.SSLContext):
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    if tls.recv(1) == b"?":
                        tls.sendall(b"!")
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.listener.close()


def test_contexts_client_certificates_and_destination_names(pki: Path):
    required = TlsConfig(certificate=pki / "server.crt", private_key=pki / "server.key", ca_certificates=pki / "ca.crt")
    optional = TlsConfig(certificate=pki / "server.crt", private_key=pki / "server.key", ca_certificates=pki / "ca.crt",
                         require_client_certificate=False)
    for tls, anonymous in ((required, "TLSV13_ALERT_CERTIFICATE_REQUIRED"), (optional, "ok")):
        server = TlsEcho(server_context(tls))
        try:
            assert handshake(server.port, pki, ssl.TLSVersion.TLSv1_3, certificate=False) == anonymous
            assert handshake(server.port, pki, ssl.TLSVersion.TLSv1_3) == "ok"
            assert handshake(server.port, pki, ssl.TLSVersion.TLSv1_1) == "TLSV1_ALERT_PROTOCOL_VERSION"
        finally:
            server.close()
    server = TlsEcho(server_context(optional))
    try:
        def reach(**tls) -> str:
            context, name = client_context(Destination(name="d", host="127.0.0.1", port=server.port,
                                                       tls=TlsConfig(ca_certificates=pki / "ca.crt", **tls)))
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                    with context.wrap_socket(raw, server_hostname=name) as conn:
                        conn.sendall(b"?")
                        return conn.recv(1).decode()
            except ssl.SSLError as exc:
                return exc.reason

        assert reach() == "!"  # its certificate names 127.0.0.1
        assert reach(server_name="localhost") == "!"
        assert reach(server_name="pacs.example.org") == "CERTIFICATE_VERIFY_FAILED"
    finally:
        server.close()


def test_tls_config_errors_name_the_key(tmp_path: Path, pki: Path):
    with pytest.raises(config_module.ConfigError) as error:
        config_module.parse(f'[node.tls]\ncertificate = "{tmp_path}/missing.crt"\n')
    text = str(error.value)
    assert "node.tls.certificate: no such file" in text and "needs certificate and private_key" in text
    with pytest.raises(config_module.ConfigError) as error:
        config_module.parse(f'[node.tls]\ncertificate = "{pki}/server.crt"\nprivate_key = "{pki}/client.key"\n'
                            f'require_client_certificate = true\n')
    text = str(error.value)
    assert ":2: node.tls.certificate: cannot use it with private_key: KEY_VALUES_MISMATCH" in text
    assert ":4: node.tls.require_client_certificate: needs ca_certificates" in text
    with pytest.raises(config_module.ConfigError) as error:
        config_module.parse(f'[[destinations]]\nname = "d"\nae_title = "D"\nhost = "h"\nport = 104\n'
                            f'tls = {{ ca_certificates = "{pki}/client.key" }}\n')
    assert ":6: destinations.0.tls.ca_certificates: no usable PEM certificate" in str(error.value)


def test_a_destination_handshake_failure_says_why(pki: Path):
    """pynetdicom swallows the client's ssl.SSLError: the context keeps its reason for the forwarder."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    scp = AE("TLS_SCP")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False, ssl_context=server_context(
        TlsConfig(certificate=pki / "server.crt", private_key=pki / "server.key")))
    try:
        port = server.server_address[1]
        for name, expected in (("127.0.0.1", None), ("pacs.example.org", "CERTIFICATE_VERIFY_FAILED")):
            context, server_name = client_context(Destination(
                name="d", host="127.0.0.1", port=port, tls=TlsConfig(ca_certificates=pki / "ca.crt", server_name=name)))
            scu = AE("ROUTER")
            scu.add_requested_context(Verification)
            assoc = scu.associate("127.0.0.1", port, ae_title="TLS_SCP", tls_args=(context, server_name))
            assert assoc.is_established == (expected is None)
            if assoc.is_established:
                assoc.release()
            assert context.take_failure() == expected and context.take_failure() is None
    finally:
        server.shutdown()
