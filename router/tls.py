"""DICOM TLS: SSL contexts for the node's SCP and for its associations to destinations.

TLS 1.2 or newer (BCP 195), certificates verified: the node verifies clients against
``ca_certificates`` when given; the router verifies every destination (its CA file, else
the system store) and the destination's name (``server_name``, else its host).
"""

from __future__ import annotations

import socket
import ssl

from router.config import Destination, TlsConfig

#: A client has this long to complete its handshake; then its connection is closed.
HANDSHAKE_SECONDS = 30.0


class ServerContext(ssl.SSLContext):
    """Wraps a client's socket without its TLS handshake, which ``finish_handshake`` then
    does on the connection's own thread (``router.receive``), bounded by HANDSHAKE_SECONDS
    and with OpenSSL's reason kept when it fails: a silent TCP connection holds only its
    own thread, never the listener."""

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    *args, **kwargs) -> ssl.SSLSocket:
        if server_side:
            sock.settimeout(HANDSHAKE_SECONDS)
            return super().wrap_socket(sock, True, False, *args, **kwargs)
        return super().wrap_socket(sock, server_side, do_handshake_on_connect, *args, **kwargs)


class _RecordingSocket(ssl.SSLSocket):
    """Notes why a client handshake failed on its context (pynetdicom keeps only a log line)."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            self.context.failure = getattr(exc, "reason", None) or type(exc).__name__
            raise


class ClientContext(ssl.SSLContext):
    """A destination's context; ``take_failure()`` tells why its last handshake failed."""

    sslsocket_class = _RecordingSocket
    failure: str | None = None

    def take_failure(self) -> str | None:
        failure, self.failure = self.failure, None
        return failure


def finish_handshake(sock: socket.socket) -> str | None:
    """Complete a handshake ServerContext deferred; None when done, else why it failed
    (OpenSSL's reason, PHI-free), the connection then shut down.

    Once done the socket blocks again, so the association's own timeouts apply."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        sock.do_handshake()
    except OSError as exc:  # ssl.SSLError, TimeoutError, ConnectionResetError...
        reason = getattr(exc, "reason", None) or ("timeout" if isinstance(exc, TimeoutError) else type(exc).__name__)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return reason
    sock.settimeout(None)
    return None


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key), password=b"")
    if tls.ca_certificates:
        context.load_verify_locations(str(tls.ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(dest: Destination) -> tuple[ClientContext, str]:
    """The context and the name to check the destination's certificate against."""
    tls = dest.tls
    assert tls is not None
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the name
    if tls.ca_certificates:
        context.load_verify_locations(str(tls.ca_certificates))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key), password=b"")
    return context, tls.server_name or dest.host
