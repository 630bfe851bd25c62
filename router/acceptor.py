"""One association the node accepts, run on one thread of its own.

pynetdicom ran every accepted association on two threads (the DUL reading the socket, the
reactor turning PDUs into DIMSE messages) and handed each received PDU from one to the
other, and the node had to patch a dozen of its internals to stream data sets into the
spool. Here the connection's thread reads the PDUs and answers them itself (PS3.8 9.3):
the receiving process's user CPU per CT slice went from 1.0-1.2 ms to 0.6-0.8 ms.
Negotiation keeps pynetdicom's PDU classes and its acceptor's rules for an unrestricted
storage service (``pynetdicom.presentation``: every storage SOP class in the first
transfer syntax proposed, Verification in the usual ones; see ``_negotiate_contexts``).

Data set fragments are not collected: each PDV's value is read from the socket in pieces
into one buffer per association and handed to the service's sink as it arrives. A
command set is read whole (it is small), then decoded by hand (``router.commands``).

The service (``router.receive.Receiver``) decides: who may associate, what a C-ECHO and
a C-STORE answer, where a data set goes. Anything the peer does that PS3.8 does not allow
aborts the association with a PHI-free reason; nothing here raises into the node.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pydicom.uid import UID
from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import negotiate_as_acceptor, negotiate_unrestricted
from pynetdicom.sop_class import Verification

from router import commands
from router.association import (
    APPLICATION_CONTEXT,
    PDU_ABORT,
    PDU_ASSOCIATE_AC,
    PDU_ASSOCIATE_RJ,
    PDU_ASSOCIATE_RQ,
    PDU_HEADER,
    PDU_P_DATA,
    PDU_RELEASE_RP,
    PDU_RELEASE_RQ,
    RELEASE_RP,
    abort_pdu,
    bytes_pdus,
    fragment_size,
)

_PDV_HEADER = struct.Struct(">IBB")
#: A-ASSOCIATE-RQ larger than this is not one (128 contexts take ~15 KB).
_LARGEST_REQUEST = 1 << 20
#: Command sets larger than this are not C-STORE or C-ECHO requests.
_LARGEST_COMMAND = 1 << 16
#: A P-DATA-TF PDU longer than 4x the maximum the node announced (at least this) is refused
#: at once: a peer must stay within the maximum; this only stops absurd lengths.
_MIN_PDU_LIMIT = 16 * 1024 * 1024
_BUFFER = 256 * 1024
_C_STORE_RQ, _C_ECHO_RQ, _C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
_UNRECOGNIZED_OPERATION = 0x0211
_VERIFICATION = [build_context(Verification)]


class ProtocolError(Exception):
    """What the peer sent breaks PS3.8: the association is aborted (message: PHI-free)."""


@dataclass(frozen=True)
class Request:
    """An association request, as the service judges it."""

    calling_ae: str
    called_ae: str
    address: str
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1


class DataSetSink(Protocol):
    """Where a C-STORE's data set goes as it arrives (``router.receive.SpoolFile``)."""

    def write(self, data: memoryview) -> object: ...
    def discard(self) -> None: ...


class Service(Protocol):
    """What the node does with an association (``router.receive.Receiver``)."""

    def refusal(self, request: Request) -> tuple[int, int, int] | None: ...
    def accepted(self, assoc: InboundAssociation) -> None: ...
    def echo(self, assoc: InboundAssociation) -> int: ...
    def open_data_set(self, assoc: InboundAssociation, sop_class: str, sop_instance: str,
                      transfer_syntax: str) -> DataSetSink: ...
    def store(self, assoc: InboundAssociation, sink: DataSetSink | None, sop_class: str,
              transfer_syntax: str, failure: OSError | None) -> int: ...
    def ended(self, assoc: InboundAssociation, how: str) -> None: ...


class _Reader:
    """Reads a socket through one buffer: small reads (headers) cost no system call when
    the data has arrived already, large ones (data set fragments) go to a sink in pieces."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffer = bytearray(_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0

    def take(self, n: int) -> bytes:
        """The next n bytes (n <= the buffer's size)."""
        self._fill(n)
        data = bytes(self._view[self._start:self._start + n])
        self._start += n
        return data

    def pipe(self, n: int, write: Callable[[memoryview], object]) -> None:
        """Pass the next n bytes to write, in pieces of up to the buffer's size: one write per
        full piece, not per recv (a fragment's first bytes often come with its header)."""
        while n:
            self._fill(min(n, _BUFFER))
            count = min(self._end - self._start, n)
            write(self._view[self._start:self._start + count])
            self._start += count
            n -= count

    def _fill(self, want: int) -> None:
        """Have at least ``want`` bytes (<= the buffer's size) buffered; what is left moves to
        the buffer's start only when the rest would not fit behind it."""
        if self._end - self._start >= want:
            return
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start + want > _BUFFER:
            self._buffer[:self._end - self._start] = self._view[self._start:self._end]
            self._end -= self._start
            self._start = 0
        while self._end - self._start < want:
            self._recv_some()

    def _recv_some(self) -> None:
        count = self._sock.recv_into(self._view[self._end:])
        if not count:
            raise EOFError("the peer closed the connection")
        self._end += count


class _Discard:
    """A data set nobody wants (an unsupported operation's)."""

    def write(self, data: memoryview) -> None:
        pass

    def discard(self) -> None:
        pass


@dataclass
class _Message:
    """A request whose data set is being received."""

    context_id: int
    command: int
    message_id: int
    sop_class: str
    sop_instance: str
    sink: DataSetSink | None
    failure: OSError | None = None

    def write(self, data: memoryview) -> None:
        if self.failure is None and self.sink is not None:
            try:
                self.sink.write(data)
            except OSError as exc:  # the rest is read and dropped; the answer is a refusal
                self.failure = exc


class InboundAssociation:
    """An accepted connection, from its A-ASSOCIATE-RQ to its release or abort: ``run`` on
    the connection's thread; ``abort`` from any thread."""

    def __init__(self, sock: socket.socket, address: str, service: Service, max_pdu: int,
                 implementation: tuple[str, str], request_timeout: float, idle_timeout: float):
        self.address = address
        self.calling_ae = ""
        self.established = False  # accepted (its A-ASSOCIATE-AC is sent next)
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted: ID -> (abstract, transfer syntax)
        self.last_pdu = time.monotonic()
        self.in_message = False  # a request received, its answer not yet sent
        self.stored = 0
        self._sock = sock
        self._service = service
        self._max_pdu = max_pdu
        self._implementation = implementation
        self._request_timeout = request_timeout
        self._idle_timeout = idle_timeout
        self._reader = _Reader(sock)
        self._send_lock = threading.Lock()
        self._fragment = fragment_size(0)
        self._pdu_limit = max(4 * max_pdu, _MIN_PDU_LIMIT) if max_pdu else float("inf")
        self._message: _Message | None = None  # the request whose data set is arriving
        self._closed = False

    # -------------------------------------------------------------------- the thread
    def run(self) -> None:
        how = "closed"
        try:
            self._sock.settimeout(self._request_timeout)
            if not self._negotiate():
                return
            self._sock.settimeout(self._idle_timeout)
            how = self._transfer()
        except ProtocolError as exc:
            how = f"aborted: {exc}"
            self._send(abort_pdu(source=2, reason=2))
        except (TimeoutError, socket.timeout):
            how = "aborted: no PDU within the time-out"
            self._send(abort_pdu(source=2))
        except (EOFError, OSError) as exc:
            how = "aborted by the node" if self._closed else f"connection lost ({type(exc).__name__})"
        except Exception as exc:  # noqa: BLE001 - whatever it is, it ends this association, not the node
            how = f"aborted: {type(exc).__name__}"
            self._send(abort_pdu(source=2))
        finally:
            if self._message is not None and self._message.sink is not None:
                self._message.sink.discard()  # a data set cut short: nothing was acknowledged
            self._close()
            self._service.ended(self, how)

    def abort(self) -> None:
        """Abort now (the node is stopping): the peer hears A-ABORT, the thread ends."""
        self._send(abort_pdu(source=2))
        self._close()

    # ------------------------------------------------------------------ negotiation
    def _negotiate(self) -> bool:
        kind, length = PDU_HEADER.unpack(self._reader.take(6))[::2]
        if kind != PDU_ASSOCIATE_RQ or length > _LARGEST_REQUEST:
            raise ProtocolError(f"PDU type 0x{kind:02X} where an association request was due")
        body = self._take_long(length)
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(PDU_HEADER.pack(kind, 0, length) + body)
            rq = pdu.to_primitive()
        except Exception as exc:  # noqa: BLE001 - a malformed request is the peer's fault
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ ({type(exc).__name__})") from None
        self.calling_ae = str(rq.calling_ae_title or "").strip()
        request = Request(self.calling_ae, str(rq.called_ae_title or "").strip(), self.address,
                          str(rq.application_context_name or ""), pdu.protocol_version)
        reject = self._service.refusal(request)
        if reject is not None:
            self._send(PDU_HEADER.pack(PDU_ASSOCIATE_RJ, 0, 4) + bytes((0, *reject)))
            self._close()
            return False
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in rq.user_information
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
        results, role_items = _negotiate_contexts(rq.presentation_context_definition_list, roles)
        self.contexts = {c.context_id: (str(c.abstract_syntax), str(c.transfer_syntax[0]))
                         for c in results if c.result == 0}
        peer_max = next((item.maximum_length_received for item in rq.user_information
                         if isinstance(item, MaximumLengthNotification)), 0) or 0
        self._fragment = fragment_size(peer_max)
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result, ac.result_source = 0, 1
        ac.presentation_context_definition_results_list = results
        length_item = MaximumLengthNotification()
        length_item.maximum_length_received = self._max_pdu
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = self._implementation[0]
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = self._implementation[1]
        ac.user_information = [length_item, class_uid, version, *role_items]
        accept = A_ASSOCIATE_AC()
        accept.from_primitive(ac)
        self.established = True  # counted before the peer hears it, so that the count is never behind
        self._service.accepted(self)
        self._send(accept.encode(), strict=True)
        return True

    # --------------------------------------------------------------------- transfer
    def _transfer(self) -> str:
        """Read PDUs until the association ends; how it ended."""
        command = bytearray()
        command_context = None
        while True:
            kind, length = PDU_HEADER.unpack(self._reader.take(6))[::2]
            self.last_pdu = time.monotonic()
            if kind == PDU_P_DATA:
                if length > self._pdu_limit:
                    raise ProtocolError(f"PDU of {length} bytes announced")
                command_context = self._p_data(length, command, command_context)
            elif kind == PDU_RELEASE_RQ:
                if length > 64:  # 4 by PS3.8 9.3.6
                    raise ProtocolError(f"A-RELEASE-RQ of {length} bytes")
                self._take_long(length)
                if self._message is not None or command:
                    raise ProtocolError("release requested inside a message")
                self._send(RELEASE_RP)
                return "released"
            elif kind == PDU_ABORT:
                return "aborted by the peer"
            elif kind in (PDU_ASSOCIATE_RQ, PDU_ASSOCIATE_AC, PDU_ASSOCIATE_RJ, PDU_RELEASE_RP):
                raise ProtocolError(f"unexpected PDU type 0x{kind:02X}")
            else:
                raise ProtocolError(f"unknown PDU type 0x{kind:02X}")

    def _p_data(self, length: int, command: bytearray, command_context: int | None) -> int | None:
        while length:
            if length < 6:
                raise ProtocolError("malformed P-DATA-TF")
            item_length, context_id, control = _PDV_HEADER.unpack(self._reader.take(6))
            if item_length < 2 or item_length + 4 > length:
                raise ProtocolError("malformed P-DATA-TF")
            length -= 4 + item_length
            value_length = item_length - 2
            if context_id not in self.contexts:
                raise ProtocolError("a PDV on a presentation context not accepted")
            message = self._message
            if control & 0x01:  # command
                if message is not None:
                    raise ProtocolError("a command where a data set was due")
                if command_context is not None and context_id != command_context:
                    raise ProtocolError("a command set's fragments on two presentation contexts")
                if len(command) + value_length > _LARGEST_COMMAND:
                    raise ProtocolError("command set too long")
                command += self._take_long(value_length)
                command_context = context_id
                if control & 0x02:
                    self.in_message = True
                    self._command(context_id, bytes(command))
                    command.clear()
                    command_context = None
            else:  # data set
                if message is None or context_id != message.context_id:
                    raise ProtocolError("a data set fragment no request announced")
                self._reader.pipe(value_length, message.write)
                if control & 0x02:
                    self._message = None
                    self._answer_with_data_set(message)
        return command_context

    def _command(self, context_id: int, command: bytes) -> None:
        elements = commands.command_elements(command)
        if elements is None:
            raise ProtocolError("undecodable command set")
        field = commands.us_value(elements, 0x0100)
        message_id = commands.us_value(elements, 0x0110) or 0
        has_data_set = commands.us_value(elements, 0x0800) != commands.NO_DATA_SET
        abstract, transfer = self.contexts[context_id]
        sop_class = _uid(elements.get(0x0002)) or abstract
        if field == _C_CANCEL_RQ:
            self.in_message = False
            return
        if field == _C_STORE_RQ and has_data_set:
            sop_instance = _uid(elements.get(0x1000))
            try:
                sink, failure = self._service.open_data_set(self, sop_class, sop_instance, transfer), None
            except OSError as exc:
                sink, failure = None, exc
            self._message = _Message(context_id, field, message_id, sop_class, sop_instance, sink, failure)
            return
        if has_data_set:  # answered once its data set has been read
            self._message = _Message(context_id, field or 0, message_id, sop_class, "", _Discard())
            return
        if field == _C_ECHO_RQ:
            status = self._service.echo(self)
        elif field == _C_STORE_RQ:
            status = 0xC000  # a C-STORE request without a data set: cannot understand
        else:
            status = _UNRECOGNIZED_OPERATION
        self._respond(context_id, (field or 0) | 0x8000, message_id, sop_class, None, status)

    def _answer_with_data_set(self, message: _Message) -> None:
        if message.command == _C_STORE_RQ:
            transfer = self.contexts[message.context_id][1]
            status = self._service.store(self, message.sink, message.sop_class, transfer, message.failure)
            self.stored += status == 0
            self._respond(message.context_id, 0x8001, message.message_id, message.sop_class, message.sop_instance,
                          status)
        else:
            self._respond(message.context_id, message.command | 0x8000, message.message_id, message.sop_class, None,
                          _UNRECOGNIZED_OPERATION)

    def _respond(self, context_id: int, field: int, message_id: int, sop_class: str, sop_instance: str | None,
                 status: int) -> None:
        command = commands.response_command(field, message_id, sop_class, sop_instance, status)
        self._send(b"".join(bytes_pdus(command, context_id, self._fragment, command=True)), strict=True)
        self.in_message = False

    # ------------------------------------------------------------------------ helpers
    def _take_long(self, n: int) -> bytes:
        parts: list[bytes] = []
        self._reader.pipe(n, lambda view: parts.append(bytes(view)))
        return b"".join(parts)

    def _send(self, data: bytes, strict: bool = False) -> None:
        """Send whole PDUs (under a lock: ``abort`` may come from another thread); a failed
        send raises only if strict."""
        with self._send_lock:
            if self._closed:
                if strict:
                    raise EOFError("association closed")
                return
            try:
                self._sock.sendall(data)
            except OSError:
                if strict:
                    raise

    def _close(self) -> None:
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def _negotiate_contexts(proposed: list, roles: dict) -> tuple[list, list]:
    """Accepted and rejected presentation contexts, and role selection answers: every
    storage SOP class (standard, retired, private, or a standard UID newer than pydicom) in
    the first transfer syntax proposed (pynetdicom's unrestricted storage service), and
    Verification; any other known SOP class (a worklist query, print management) is
    rejected, where pynetdicom's rule would take an unfamiliar one for storage."""
    storage, other = [], []
    for context in proposed:
        uid = UID(str(context.abstract_syntax))
        (storage if uid.is_private or uid.name == uid or "Storage" in uid.name else other).append(context)
    accepted, storage_roles = negotiate_unrestricted(storage, [], roles)
    rest, other_roles = negotiate_as_acceptor(other, _VERIFICATION, roles)
    return sorted(accepted + rest, key=lambda c: c.context_id), storage_roles + other_roles


def _uid(value: bytes | None) -> str:
    return value.decode("ascii", "replace").strip("\0 ") if value else ""
