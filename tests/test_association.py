"""The forwarders' C-STORE association (router.association) against peers that behave and
peers that do not: pynetdicom SCPs (limits, rejections, aborts, idle release, statuses,
silence) and raw sockets for what pynetdicom will not send (broken answers)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmwrite
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage

from bench.synthetic import ct_series
from router.association import (
    AssociationError,
    Lost,
    Rejected,
    StoreAssociation,
    bytes_pdus,
    file_pdus,
)

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
IMPLEMENTATION = ("1.2.826.0.1.3680043.10.1234", "TEST")


class Peer:
    """A pynetdicom storage SCP on a free loopback port; ``on_store(event)`` answers."""

    def __init__(self, on_store: Callable | None = None, max_pdu: int = 131072, require_aet: bool = False,
                 network_timeout: float | None = None, idle_response: str = "A-ABORT"):
        self.received: list[bytes] = []
        self.on_store = on_store or (lambda event: 0x0000)
        ae = AE(ae_title="PEER")
        ae.maximum_pdu_size = max_pdu
        ae.require_called_aet = require_aet
        if network_timeout is not None:
            ae.network_timeout = network_timeout
        ae.add_supported_context(CTImageStorage, [EXPLICIT])
        self.ae = ae
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_CONN_OPEN, self._opened)]
        self.idle_response = idle_response
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _opened(self, event) -> None:
        event.assoc.network_timeout_response = self.idle_response

    def _store(self, event):
        self.received.append(event.request.DataSet.getvalue())
        return self.on_store(event)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def ct_file(tmp_path: Path) -> tuple[Path, int]:
    """A CT slice as the spool holds it, and where its data set starts."""
    ds = next(iter(ct_series(1, rows=64, columns=64)))
    path = tmp_path / "ct.dcm"
    dcmwrite(path, ds, enforce_file_format=True)
    raw = path.read_bytes()
    offset = 132 + 12 + struct.unpack_from("<I", raw, 140)[0]
    return path, offset


def associate(port: int, called: str = "PEER", timeout: float = 5.0,
              proposed: list[tuple[str, str]] | None = None) -> StoreAssociation:
    return StoreAssociation.request("127.0.0.1", port, "ROUTER", called, proposed or [(CTImageStorage, EXPLICIT)],
                                    timeout=timeout, max_pdu=131072, implementation=IMPLEMENTATION)


def store(assoc: StoreAssociation, path: Path, offset: int, uid: str = "1.2.3.4"):
    context_id = assoc.contexts[(CTImageStorage, EXPLICIT)]
    with open(path, "rb") as file:
        return assoc.send(context_id, CTImageStorage, uid, file_pdus(file, offset, context_id, assoc.fragment_size))


@pytest.fixture
def peer_factory() -> Iterator[Callable[..., Peer]]:
    peers: list[Peer] = []

    def make(**kwargs) -> Peer:
        peers.append(Peer(**kwargs))
        return peers[-1]

    previous = _config.STORE_RECV_CHUNKED_DATASET
    _config.STORE_RECV_CHUNKED_DATASET = False
    yield make
    _config.STORE_RECV_CHUNKED_DATASET = previous
    for peer in peers:
        peer.stop()


@pytest.mark.parametrize("peer_max_pdu", [16384, 0])
def test_stores_the_data_set_byte_for_byte_within_the_peers_pdu_limit(peer_factory, ct_file, peer_max_pdu) -> None:
    peer = peer_factory(max_pdu=peer_max_pdu)
    path, offset = ct_file
    assoc = associate(peer.port)
    assert assoc.fragment_size == (16384 - 6 if peer_max_pdu else 131072 - 6)
    assert assoc.contexts == {(CTImageStorage, EXPLICIT): 1}
    for n in range(3):  # several requests on one association, message IDs counting up
        assert store(assoc, path, offset, uid=f"1.2.3.{n}") == 0x0000
    context_id = assoc.contexts[(CTImageStorage, EXPLICIT)]
    data = path.read_bytes()[offset:]
    assert assoc.send(context_id, CTImageStorage, "1.2.3.9", bytes_pdus(data, context_id, assoc.fragment_size)) == 0
    assoc.release()
    assert not assoc.open
    assert peer.received == [data] * 4


def test_only_accepted_contexts_are_offered_for_sending(peer_factory) -> None:
    peer = peer_factory()
    assoc = associate(peer.port, proposed=[(CTImageStorage, IMPLICIT), (CTImageStorage, EXPLICIT),
                                           ("1.2.840.10008.5.1.4.1.1.4", EXPLICIT)])
    assert assoc.contexts == {(CTImageStorage, EXPLICIT): 3}
    assoc.release()


def test_failure_status_is_reported_and_the_association_goes_on(peer_factory, ct_file) -> None:
    def refuse(event):
        answer = Dataset()
        answer.Status, answer.ErrorComment = 0xA900, "no room"
        return answer

    peer = peer_factory(on_store=refuse)
    assoc = associate(peer.port)
    assert store(assoc, *ct_file) == 0xA900  # its comment (the peer's text) is not kept
    assert assoc.open  # a failure status is an answer: the association goes on
    assoc.release()


def test_rejection_says_why(peer_factory) -> None:
    peer = peer_factory(require_aet=True)
    with pytest.raises(Rejected, match="service user, reason Called AE title not recognised"):
        associate(peer.port, called="SOMEONE-ELSE")


def test_connection_refused_is_an_association_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AssociationError, match="cannot connect: ConnectionRefusedError"):
        associate(port)


def test_abort_during_the_store_loses_the_association_with_the_request_sent(peer_factory, ct_file) -> None:
    def abort(event):
        event.assoc.abort()
        return 0x0000

    peer = peer_factory(on_store=abort)
    assoc = associate(peer.port)
    with pytest.raises(Lost) as lost:
        store(assoc, *ct_file)
    assert lost.value.sent and not assoc.open


def test_silent_peer_times_out(peer_factory, ct_file) -> None:
    answer = threading.Event()

    def hang(event):
        answer.wait(10)
        return 0x0000

    peer = peer_factory(on_store=hang)
    assoc = associate(peer.port, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(Lost, match="timed out") as lost:
        store(assoc, *ct_file)
    answer.set()
    assert lost.value.sent and time.monotonic() - started < 3


def test_a_data_set_file_cut_short_while_sent_is_not_a_lost_connection(peer_factory, tmp_path: Path) -> None:
    """The file shrinks between two fragments (sent by sendfile): the association is
    aborted, and the reason names the file."""
    path = tmp_path / "spooled.dcm"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB: 8 fragments
    peer = peer_factory()
    assoc = associate(peer.port)
    context_id = assoc.contexts[(CTImageStorage, EXPLICIT)]
    with open(path, "rb") as file:
        pdus = file_pdus(file, 0, context_id, assoc.fragment_size)

        def cut_after_the_first():
            yield next(pdus)
            os.truncate(path, 200_000)
            yield from pdus

        with pytest.raises(Lost, match="could not be read: data set file shorter than when its sending began") as lost:
            assoc.send(context_id, CTImageStorage, "1.2.3.4", cut_after_the_first())
    assert lost.value.sent and not assoc.open
    assert peer.received == []


def test_a_peer_that_stops_reading_times_the_send_out(tmp_path: Path) -> None:
    """sendfile on the forwarder's non-blocking socket waits for room at most the time-out."""
    path = tmp_path / "spooled.dcm"
    path.write_bytes(bytes(64 * 1024 * 1024))
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock = socket.create_connection(server.getsockname())
        reader, _ = server.accept()  # never reads
        sock.settimeout(0.5)
        assoc = StoreAssociation(sock, {(CTImageStorage, EXPLICIT): 1}, 16384)
        started = time.monotonic()
        with open(path, "rb") as file, pytest.raises(Lost, match="connection lost during the C-STORE: timed out"):
            assoc.send(1, CTImageStorage, "1.2.3.4", file_pdus(file, 0, 1, assoc.fragment_size))
        assert time.monotonic() - started < 3 and not assoc.open
        reader.close()


@pytest.mark.parametrize(("idle_response", "why"), [("A-RELEASE", "released"), ("A-ABORT", "aborted")])
def test_the_end_of_an_idle_association_is_noticed_before_the_next_send(peer_factory, ct_file, idle_response,
                                                                        why) -> None:
    peer = peer_factory(network_timeout=0.3, idle_response=idle_response)  # ends an idle association
    assoc = associate(peer.port)
    assert store(assoc, *ct_file) == 0
    assoc.check_idle()  # nothing yet
    time.sleep(1.0)
    with pytest.raises(Lost, match=why) as lost:
        assoc.check_idle()
    assert not lost.value.sent and not assoc.open


class RawPeer:
    """Accepts one association (any context proposed first, Explicit VR LE) and then answers
    each C-STORE with ``answer(message_id)``: raw PDU bytes."""

    def __init__(self, answer: Callable[[int], bytes]):
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            kind, body = read_pdu(conn)
            assert kind == 1
            context = b"\x01\x00\x00\x00" + item(0x40, EXPLICIT.encode())
            user = item(0x50, item(0x51, struct.pack(">I", 131072)))
            application = item(0x10, b"1.2.840.10008.3.1.1.1")
            ac = struct.pack(">HH", 1, 0) + body[4:68] + application + item(0x21, context) + user
            conn.sendall(struct.pack(">BBI", 2, 0, len(ac)) + ac)
            command = b""
            while True:
                try:
                    kind, body = read_pdu(conn)
                except EOFError:
                    return
                if kind != 4:
                    return
                header = body[5]
                if header & 1:
                    command += body[6:]
                if header == 0x02:  # the data set's last fragment
                    message_id = struct.unpack_from("<H", command, command.index(b"\x00\x00\x10\x01") + 8)[0]
                    conn.sendall(self.answer(message_id))
                    command = b""


def item(kind: int, data: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(data)) + data


def read_pdu(conn: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 6:
        chunk = conn.recv(6 - len(head))
        if not chunk:
            raise EOFError
        head += chunk
    kind, _, length = struct.unpack(">BBI", head)
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise EOFError
        body += chunk
    return kind, body


def response(message_id: int, status: int = 0, command_field: int = 0x8001, control: int = 0x03,
             responding_to: bytes | None = None) -> bytes:
    responding_to = struct.pack("<H", message_id) if responding_to is None else responding_to
    elements = [(0x0100, struct.pack("<H", command_field)), (0x0120, responding_to),
                (0x0800, struct.pack("<H", 0x0101)), (0x0900, struct.pack("<H", status))]
    body = b"".join(struct.pack("<HHI", 0, e, len(v)) + v for e, v in elements)
    command = struct.pack("<HHII", 0, 0, 4, len(body)) + body
    return struct.pack(">BBIIBB", 4, 0, 6 + len(command), 2 + len(command), 1, control) + command


@pytest.mark.parametrize(("answer", "why"), [
    (lambda mid: response(mid + 1), "another message ID"),
    (lambda mid: response(mid, responding_to=struct.pack("<I", mid)), "another message ID"),
    (lambda mid: response(mid, command_field=0x8020), "not a C-STORE response"),
    (lambda mid: response(mid, control=0x02), "data set where a C-STORE response was due"),
    (lambda mid: struct.pack(">BBI", 9, 0, 4) + bytes(4), "unexpected PDU type 0x09"),
    (lambda mid: struct.pack(">BBI", 4, 0, 4) + struct.pack(">I", 1000), "malformed P-DATA-TF"),
])
def test_a_broken_answer_aborts_the_association(ct_file, answer, why) -> None:
    peer = RawPeer(answer)
    assoc = associate(peer.port, called="RAW")
    with pytest.raises(Lost, match=why) as lost:
        store(assoc, *ct_file)
    assert lost.value.sent and not assoc.open


def test_a_release_crossing_the_request_is_answered_and_reported(ct_file) -> None:
    peer = RawPeer(lambda mid: struct.pack(">BBI", 5, 0, 4) + bytes(4))  # A-RELEASE-RQ, not a response
    assoc = associate(peer.port, called="RAW")
    with pytest.raises(Lost, match="released the association during the C-STORE") as lost:
        store(assoc, *ct_file)
    assert lost.value.sent and lost.value.released and not assoc.open


def test_a_plain_raw_answer_is_taken(ct_file) -> None:
    peer = RawPeer(lambda mid: response(mid, status=0xB000))
    assoc = associate(peer.port, called="RAW")
    assert store(assoc, *ct_file) == 0xB000
    assert store(assoc, *ct_file) == 0xB000
    assoc.abort()
