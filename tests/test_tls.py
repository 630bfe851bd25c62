"""DICOM TLS: dcmtk storescu over TLS -> the node (client certificates verified) -> a TLS
storescp destination (the router authenticated by its certificate); plain TCP, a client
without a certificate and TLS older than 1.2 are refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from peers import DCMTK_ENV, free_port
from test_node_support import ROUTER_AET, Router, wait_until

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
            # TLS 1.1: refused at the handshake
            old = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{router.port}", "-tls1_1",
                                  "-cert", str(pki / "client.crt"), "-key", str(pki / "client.key")],
                                 input="", capture_output=True, text=True, timeout=30)
            assert old.returncode != 0
            assert len(router.events("received")) == 1
            assert router.stop() == 0
    finally:
        scp.terminate()
        scp.wait(10)
    assert len(list(out.iterdir())) == 1


def test_tls_config_errors_name_the_key(tmp_path: Path):
    from router import config as config_module

    with pytest.raises(config_module.ConfigError) as error:
        config_module.parse(f'[node.tls]\ncertificate = "{tmp_path}/missing.crt"\n')
    text = str(error.value)
    assert "node.tls.certificate: no such file" in text and "needs certificate and private_key" in text
