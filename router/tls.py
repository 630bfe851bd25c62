"""DICOM TLS: SSL contexts for the node's SCP and for its associations to destinations.

TLS 1.2 or newer (BCP 195), certificates verified: the node verifies clients against
``ca_certificates`` when given; the router verifies every destination (its CA file, else
the system store) and the destination's name (``server_name``, else its host).
"""

from __future__ import annotations

import ssl

from router.config import Destination, TlsConfig


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates:
        context.load_verify_locations(str(tls.ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(dest: Destination) -> tuple[ssl.SSLContext, str]:
    """The context and the name to check the destination's certificate against."""
    tls = dest.tls
    assert tls is not None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(tls.ca_certificates) if tls.ca_certificates else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context, tls.server_name or dest.host
