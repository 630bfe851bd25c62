"""The node's accepting side (router.receive + router.acceptor) against peers that behave
and peers that do not: pynetdicom and dcmtk senders, and raw sockets for what neither will
send. Each runs a real Receiver on a loopback port over a spool on disk."""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import CTImageStorage, Verification

from bench.synthetic import write_ct_series
from router import commands, receive
from router.association import StoreAssociation, bytes_pdus
from router.config import NodeConfig
from router.forward import echo
from router.receive import Receiver
from router.spool import Spool

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLEMENTATION = ("1.2.826.0.1.3680043.10.1234", "TEST")


class Node:
    """A Receiver over a spool in tmp_path; ``acknowledged`` lists what it handed on."""

    def __init__(self, tmp_path: Path, events=None, bind: str = "127.0.0.1", **node):
        self.spool = Spool(tmp_path / "spool", ["pacs"])
        self.spool.create()
        self.acknowledged: list[Path] = []
        self.receiver = Receiver(NodeConfig(bind=bind, port=0, spool_dir=self.spool.root, min_free_bytes=0,
                                            **node), self.spool, self.acknowledged.append, events=events)
        self.receiver.start()
        self.port = self.receiver.port

    def associate(self, contexts=((CT, EXPLICIT),)) -> StoreAssociation:
        return StoreAssociation.request("127.0.0.1", self.port, "SENDER", "DEID_ROUTER", list(contexts), 5.0, 131072,
                                        IMPLEMENTATION)

    def settled(self) -> None:
        """Every association has ended (its thread cleaned up)."""
        deadline = time.monotonic() + 5
        while self.receiver.active_associations() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not self.receiver.active_associations()


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[dict]]:
    """The receiver's log events, kept here instead of printed."""
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.receiver.stop_accepting()
    n.receiver.drain(grace_seconds=1)


def pdata(context_id: int, control: int, value: bytes) -> bytes:
    return struct.pack(">BBIIBB", 4, 0, 6 + len(value), 2 + len(value), context_id, control) + value


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0, b""  # closed
        header += chunk
    kind, _, length = struct.unpack(">BBI", header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return kind, body


def status_of(body: bytes) -> int:
    """The Status of the one command set in a P-DATA-TF body."""
    elements = commands.command_elements(body[6:])
    assert elements is not None
    return struct.unpack("<H", elements[0x0900])[0]


def data_set(path: Path) -> bytes:
    data = path.read_bytes()
    return data[132 + 12 + struct.unpack_from("<I", data, 140)[0]:]


def test_a_c_store_lands_in_incoming_byte_for_byte_under_the_nodes_meta(node: Node, tmp_path: Path) -> None:
    [path] = write_ct_series(tmp_path / "ct", 1)
    assoc = node.associate()
    body = data_set(path)
    ds = dcmread(path, stop_before_pixels=True)
    status = assoc.send(assoc.contexts[(CT, EXPLICIT)], CT, ds.SOPInstanceUID, bytes_pdus(body, 1, 4000))
    assoc.release()
    assert status == 0x0000
    [spooled] = node.acknowledged
    assert spooled.parent == node.spool.incoming
    assert data_set(spooled) == body  # 4000-byte fragments make it whole
    meta = dcmread(spooled, stop_before_pixels=True).file_meta
    assert (meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID, meta.SourceApplicationEntityTitle) == (
        ds.SOPInstanceUID, EXPLICIT, "SENDER")
    node.settled()
    assert list(node.spool.tmp.iterdir()) == []


def test_dcmtk_and_pynetdicom_senders_echo_and_store(node: Node, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", 3)
    echo = subprocess.run(["/usr/bin/echoscu", "-aet", "MODALITY", "-aec", "DEID_ROUTER", "127.0.0.1", str(node.port)],
                          capture_output=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    sent = subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "DEID_ROUTER", "-xs", "--max-pdu", "16384",
                           "127.0.0.1", str(node.port), *map(str, files[:2])], capture_output=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage, [EXPLICIT])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DEID_ROUTER")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assert assoc.send_c_store(dcmread(files[2])).Status == 0x0000
    assoc.release()
    assert sorted(data_set(p) for p in node.acknowledged) == sorted(data_set(p) for p in files)
    callers = sorted(dcmread(p, stop_before_pixels=True).file_meta.SourceApplicationEntityTitle
                     for p in node.acknowledged)
    assert callers == ["MODALITY", "MODALITY", "PYNETDICOM"]


def test_requests_the_node_does_not_serve_are_answered_and_the_association_goes_on(node: Node, tmp_path: Path) -> None:
    """A C-STORE request without a data set (0xC000), a C-FIND with one (0x0211, once its
    data set is read), a command set split in three; then an ordinary C-STORE."""
    assoc = node.associate()
    sock = assoc._sock
    no_data = commands.command_set([(0x0002, "UI", CT), (0x0100, "US", 0x0001), (0x0110, "US", 7),
                                    (0x0800, "US", 0x0101), (0x1000, "UI", "1.2.3")])
    sock.sendall(pdata(1, 0x03, no_data))
    kind, body = read_pdu(sock)
    assert (kind, status_of(body)) == (4, 0xC000)
    find = commands.command_set([(0x0002, "UI", CT), (0x0100, "US", 0x0020), (0x0110, "US", 8),
                                 (0x0800, "US", 0x0001)])
    sock.sendall(pdata(1, 0x01, find[:10]) + pdata(1, 0x01, find[10:30]) + pdata(1, 0x03, find[30:])
                 + pdata(1, 0x00, b"\x08\x00\x52\x00\x06\x00STUDY ") + pdata(1, 0x02, b""))
    kind, body = read_pdu(sock)
    assert (kind, status_of(body)) == (4, 0x0211)
    [path] = write_ct_series(tmp_path / "ct", 1)
    uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert assoc.send(1, CT, uid, bytes_pdus(data_set(path), 1, 131066)) == 0x0000
    assoc.release()
    assert len(node.acknowledged) == 1


@pytest.mark.parametrize("violation", ["data set with no request", "unaccepted context", "release inside a message",
                                       "unknown PDU type", "second association request", "huge release request"])
def test_a_protocol_violation_aborts_that_association_and_keeps_nothing_of_it(node: Node, violation: str,
                                                                           logs: list[dict]) -> None:
    assoc = node.associate()
    sock = assoc._sock
    request = commands.store_request_command(1, CT, "1.2.3.4")
    if violation == "data set with no request":
        sock.sendall(pdata(1, 0x02, b"\x08\x00\x16\x00"))
    elif violation == "unaccepted context":
        sock.sendall(pdata(3, 0x03, request))
    elif violation == "release inside a message":
        sock.sendall(pdata(1, 0x03, request) + pdata(1, 0x00, b"\x08\x00\x16\x00\x00\x00\x00\x00"))
        sock.sendall(struct.pack(">BBI", 5, 0, 4) + bytes(4))
    elif violation == "huge release request":
        sock.sendall(struct.pack(">BBI", 5, 0, 1 << 31) + bytes(4096))
    elif violation == "unknown PDU type":
        sock.sendall(struct.pack(">BBI", 0x09, 0, 4) + bytes(4))
    else:
        sock.sendall(struct.pack(">BBI", 1, 0, 4) + bytes(4))
    kind, body = read_pdu(sock)
    assert kind == 7, violation  # A-ABORT
    assert read_pdu(sock)[0] == 0  # then closed
    node.settled()
    [ended] = [e for e in logs if e["event"] == "association_ended"]
    assert ended["how"].startswith("aborted: ") and ended["log_level"] == "warning", ended
    assert list(node.spool.tmp.iterdir()) == [] and not node.acknowledged
    assoc = node.associate()  # the node goes on
    assoc.release()


def _request_pdu(application_context: str = "1.2.840.10008.3.1.1.1", calling_ae: str = "SENDER") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = application_context
    primitive.calling_ae_title, primitive.called_ae_title = calling_ae, "DEID_ROUTER"
    context = PresentationContext()
    context.context_id, context.abstract_syntax, context.transfer_syntax = 1, CT, [EXPLICIT]
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def test_rejections_say_why(tmp_path: Path, monkeypatch, logs: list[dict]) -> None:
    """An unknown application context (permanent, 0x02), one association too many
    (transient, local limit exceeded), a calling AE title not on the allow-list (0x03)."""
    monkeypatch.setattr(receive, "MAX_ASSOCIATIONS", 1)
    node = Node(tmp_path, allowed_ae_titles=("SENDER",))
    try:
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
            sock.sendall(_request_pdu("1.2.3.4"))
            assert read_pdu(sock) == (3, bytes((0, 1, 1, 2)))
        node.settled()
        first = node.associate()
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
            sock.sendall(_request_pdu())
            assert read_pdu(sock) == (3, bytes((0, 2, 3, 2)))
        first.release()
        node.settled()
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
            sock.sendall(_request_pdu(calling_ae="STRANGER"))
            assert read_pdu(sock) == (3, bytes((0, 1, 1, 3)))
        node.settled()
        assert node.associate().contexts  # the limit is free again
        reasons = [e["reason"] for e in logs if e["event"] == "association_rejected"]
        assert reasons == ["not the DICOM application context", "more than 1 associations at once",
                           "calling AE title not on the allow-list"]
    finally:
        node.receiver.stop_accepting()
        node.receiver.drain(grace_seconds=1)


def test_silent_connections_and_associations_are_ended(tmp_path: Path, monkeypatch) -> None:
    """No A-ASSOCIATE-RQ within the request time-out: closed; an association silent for the
    idle time-out: aborted, its partial data set deleted."""
    monkeypatch.setattr(receive, "REQUEST_SECONDS", 0.5)
    monkeypatch.setattr(receive, "IDLE_SECONDS", 0.5)
    node = Node(tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
            started = time.monotonic()
            assert read_pdu(sock)[0] in (0, 7)
            assert time.monotonic() - started < 3
        assoc = node.associate()
        assoc._sock.sendall(pdata(1, 0x03, commands.store_request_command(1, CT, "1.2.3")) + pdata(1, 0x00, b"x" * 64))
        started = time.monotonic()
        assert read_pdu(assoc._sock)[0] == 7
        assert time.monotonic() - started < 3
        node.settled()
        assert list(node.spool.tmp.iterdir()) == [] and not node.acknowledged
    finally:
        node.receiver.stop_accepting()


def test_a_large_fragmented_data_set_and_small_peer_pdus(node: Node) -> None:
    """A 3 MB data set in PDUs of the peer's choosing (odd sizes, one PDV per PDU and several
    per PDU): the spooled bytes are the sent ones; the answer fits the peer's 16 KiB limit."""
    body = bytes(range(256)) * (3 * 4096) + b"\x00"
    assoc = node.associate()
    sock = assoc._sock
    request = commands.store_request_command(5, CT, "1.2.3.4.5")
    pieces = [body[i:i + 12345] for i in range(0, len(body), 12345)]
    stream = pdata(1, 0x03, request)
    for n, piece in enumerate(pieces):
        stream += pdata(1, 0x02 if n == len(pieces) - 1 else 0x00, piece)
    sock.sendall(stream)
    kind, answer = read_pdu(sock)
    assert (kind, status_of(answer)) == (4, 0x0000)
    assoc.release()
    [path] = node.acknowledged
    assert data_set(path) == body


def test_storage_and_verification_are_accepted_other_services_rejected(node: Node) -> None:
    """Any storage SOP class (standard, private, a standard UID newer than pydicom) in the
    first transfer syntax proposed, and Verification; a worklist query is rejected."""
    from pynetdicom.sop_class import ModalityWorklistInformationFind

    ae = AE(ae_title="MIXED")
    proposed = {CT: [EXPLICIT, "1.2.840.10008.1.2"], "1.2.840.10008.5.1.4.1.1.999": ["1.2.840.10008.1.2"],
                "1.3.6.1.4.1.9590.100.1.2.999": [EXPLICIT], ModalityWorklistInformationFind: [EXPLICIT],
                Verification: ["1.2.840.10008.1.2"]}
    for sop, syntaxes in proposed.items():
        ae.add_requested_context(sop, syntaxes)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DEID_ROUTER")
    assert assoc.is_established
    accepted = {str(c.abstract_syntax): str(c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    assert accepted == {CT: EXPLICIT, "1.2.840.10008.5.1.4.1.1.999": "1.2.840.10008.1.2",
                        "1.3.6.1.4.1.9590.100.1.2.999": EXPLICIT, str(Verification): "1.2.840.10008.1.2"}
    [rejected] = assoc.rejected_contexts
    assert (rejected.abstract_syntax, rejected.result) == (ModalityWorklistInformationFind, 0x03)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_echo_says_how_it_went(tmp_path: Path, capsys) -> None:
    """`deid-router echo` (the administrator's check of an AE title): success, or the
    rejection with its reason, or why no association was made."""
    node = Node(tmp_path, allowed_ae_titles=("SENDER",))
    try:
        assert echo("127.0.0.1", node.port, called_ae="DEID_ROUTER", calling_ae="SENDER")
        assert "success (0x0000 (Success)," in capsys.readouterr().out
        for _ in range(20):  # the rejection is reported as one every time
            assert not echo("127.0.0.1", node.port, called_ae="DEID_ROUTER", calling_ae="STRANGER")
            assert "association rejected (result Rejected (Permanent), source service user, " \
                   "reason Calling AE title not recognised)" in capsys.readouterr().out
        node.settled()
    finally:
        node.receiver.stop_accepting()
        node.receiver.drain(grace_seconds=1)
    assert not echo("127.0.0.1", node.port, called_ae="DEID_ROUTER", calling_ae="SENDER", timeout=2)
    assert "cannot connect: ConnectionRefusedError" in capsys.readouterr().out


def test_associations_are_counted_by_outcome(tmp_path: Path) -> None:
    from router.metrics import NodeMetrics
    from router.node import NodeEvents

    metrics = NodeMetrics(["pacs"])
    node = Node(tmp_path, events=NodeEvents(metrics, None), allowed_ae_titles=("SENDER",))
    try:
        assoc = node.associate()
        assert metrics.value("deid_router_associations_open") == 1
        assert not echo("127.0.0.1", node.port, called_ae="DEID_ROUTER", calling_ae="STRANGER")
        assoc.release()
        node.settled()
        assert metrics.value("deid_router_associations_open") == 0
        assert metrics.value("deid_router_associations_total", outcome="accepted") == 1
        assert metrics.value("deid_router_associations_total", outcome="calling_ae_not_allowed") == 1
        assert 'deid_router_associations_total{outcome="accepted"} 1' in metrics.render_prometheus()
    finally:
        node.receiver.stop_accepting()


def test_a_node_bound_to_all_ipv6_addresses_takes_ipv4_callers_too(tmp_path: Path, logs: list[dict]) -> None:
    if not socket.has_dualstack_ipv6():
        pytest.skip("this machine has no dual-stack IPv6")
    node = Node(tmp_path, bind="::", allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),
                                                       ipaddress.ip_network("::1/128")))
    try:
        for host in ("127.0.0.1", "::1"):
            assoc = StoreAssociation.request(host, node.port, "SENDER", "DEID_ROUTER", [(CT, EXPLICIT)], 5.0, 131072,
                                             IMPLEMENTATION)
            assert assoc.contexts
            assoc.release()
        node.settled()
        assert [e["peer"] for e in logs if e["event"] == "association_accepted"] == ["127.0.0.1", "::1"]
    finally:
        node.receiver.stop_accepting()
