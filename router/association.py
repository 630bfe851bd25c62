"""One C-STORE SCU association, run on the forwarder's own thread.

pynetdicom runs every association on two threads of its own (the DUL reading the socket,
the reactor turning PDUs into DIMSE messages) beside the caller's: a C-STORE of a CT
slice crossed threads ~18 times, and the forwarder spent ~1.3 ms of CPU per slice, ~0.7
on one thread (measured in the node with 4 senders). Sending is all a forwarder does, so here the caller's thread
writes the PDUs and reads the answers itself, one request at a time. The association's
PDUs are still pynetdicom's (negotiation is encoded and decoded by ``pynetdicom.pdu``);
only the data transfer phase (P-DATA, release, abort; PS3.8 9.3) is written here.

Every wait on the peer is bounded by ``timeout``; anything unexpected from it aborts the
association. Errors are ``AssociationError`` with a PHI-free reason.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from router import commands

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: PS3.8 9.3: every PDU starts with its type, a reserved byte and its length.
PDU_HEADER = struct.Struct(">BBI")
PDU_ASSOCIATE_RQ, PDU_ASSOCIATE_AC, PDU_ASSOCIATE_RJ, PDU_P_DATA, PDU_RELEASE_RQ, PDU_RELEASE_RP, PDU_ABORT = range(1, 8)
RELEASE_RQ = PDU_HEADER.pack(PDU_RELEASE_RQ, 0, 4) + bytes(4)
RELEASE_RP = PDU_HEADER.pack(PDU_RELEASE_RP, 0, 4) + bytes(4)
_PDATA_HEADER = struct.Struct(">BBIIBB")
#: An answer PDU larger than this is not a C-STORE response: the peer is broken.
_LARGEST_ANSWER = 1 << 20
#: Fragment size when the peer sets no maximum PDU length (0: unlimited), and the largest
#: sent whatever the peer allows (a peer announcing 4 GB must not make a 4 GB buffer).
_UNLIMITED_FRAGMENT = 131072 - 6
_LARGEST_FRAGMENT = 4 * 1024 * 1024 - 6
_REJECT_SOURCES = {1: "service user", 2: "service provider (ACSE)", 3: "service provider (presentation)"}


def abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    """A-ABORT (PS3.8 9.3.8): source 0 is the service user, 2 the provider (reason given)."""
    return PDU_HEADER.pack(PDU_ABORT, 0, 4) + bytes((0, 0, source, reason))


class AssociationError(Exception):
    """The association could not be made or was lost; the message says why (no PHI)."""


class Rejected(AssociationError):
    """The peer answered A-ASSOCIATE-RJ."""


class Lost(AssociationError):
    """The association ended (abort, release, closed connection, time-out); ``sent`` is
    whether a request was under way (its outcome unknown), ``released`` whether the peer
    ended it in order (an A-RELEASE-RQ: its idle time-out crossing our request)."""

    def __init__(self, reason: str, sent: bool = False, released: bool = False):
        super().__init__(reason)
        self.sent = sent
        self.released = released


class StoreAssociation:
    """An established association: ``send`` C-STOREs (or ``echo``), then ``release`` (or
    ``abort``)."""

    def __init__(self, sock: socket.socket, contexts: dict[tuple[str, str], int], peer_max_pdu: int):
        self._sock = sock
        #: (abstract syntax, transfer syntax) -> presentation context ID, accepted ones only.
        self.contexts = contexts
        self.fragment_size = fragment_size(peer_max_pdu)
        self._message_id = 0
        self.open = True

    # ------------------------------------------------------------------ negotiation
    @classmethod
    def request(cls, host: str, port: int, calling_ae: str, called_ae: str, proposed: list[tuple[str, str]],
                timeout: float, max_pdu: int, implementation: tuple[str, str],
                tls: tuple[ssl.SSLContext, str] | None = None,
                negotiation_timeout: float | None = None) -> StoreAssociation:
        """Connect and negotiate: one presentation context per (SOP class, transfer syntax).

        ``timeout`` bounds every wait on the association; ``negotiation_timeout`` (default:
        the same) bounds connecting and the destination's answer to the request."""
        try:
            sock = socket.create_connection((host, port), timeout=negotiation_timeout or timeout)
        except OSError as exc:
            raise AssociationError(f"cannot connect: {type(exc).__name__}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if tls is not None:
                sock = tls[0].wrap_socket(sock, server_hostname=tls[1])  # handshakes (bounded by timeout)
            primitive = A_ASSOCIATE()
            primitive.application_context_name = APPLICATION_CONTEXT
            primitive.calling_ae_title = calling_ae
            primitive.called_ae_title = called_ae
            definitions = []
            for n, (sop, syntax) in enumerate(proposed):
                context = PresentationContext()
                context.context_id = 2 * n + 1
                context.abstract_syntax = sop
                context.transfer_syntax = [syntax]
                definitions.append(context)
            primitive.presentation_context_definition_list = definitions
            length = MaximumLengthNotification()
            length.maximum_length_received = max_pdu
            class_uid = ImplementationClassUIDNotification()
            class_uid.implementation_class_uid = implementation[0]
            version = ImplementationVersionNameNotification()
            version.implementation_version_name = implementation[1]
            primitive.user_information = [length, class_uid, version]
            pdu = A_ASSOCIATE_RQ()
            pdu.from_primitive(primitive)
            sock.sendall(pdu.encode())
            kind, body = _read_pdu(sock)
        except ssl.SSLError:
            sock.close()
            raise
        except (OSError, EOFError) as exc:
            sock.close()
            raise AssociationError(f"association request failed: {_why(exc)}") from None
        except BaseException:
            sock.close()
            raise
        if kind == PDU_ASSOCIATE_RJ:
            sock.close()
            reject = A_ASSOCIATE_RJ()
            try:
                reject.decode(PDU_HEADER.pack(kind, 0, len(body)) + body)
            except Exception:  # noqa: BLE001 - a malformed answer is the peer's fault
                raise Rejected("association rejected (malformed A-ASSOCIATE-RJ)") from None
            raise Rejected(f"association rejected (result {reject.result_str}, source "
                           f"{_REJECT_SOURCES.get(reject.source, reject.source)}, reason {reject.reason_str})")
        if kind != PDU_ASSOCIATE_AC:
            _abort(sock)
            raise AssociationError(f"association failed: the peer answered PDU type 0x{kind:02X}")
        accept = A_ASSOCIATE_AC()
        try:
            accept.decode(PDU_HEADER.pack(kind, 0, len(body)) + body)
            answer = accept.to_primitive()
        except Exception as exc:  # noqa: BLE001 - a malformed answer is the peer's fault
            _abort(sock)
            raise AssociationError(f"association failed: malformed A-ASSOCIATE-AC ({type(exc).__name__})") from None
        by_id = {c.context_id: c for c in definitions}
        contexts = {}
        for result in answer.presentation_context_definition_results_list:
            asked = by_id.get(result.context_id)
            if asked is not None and result.result == 0 and result.transfer_syntax \
                    and str(result.transfer_syntax[0]) == str(asked.transfer_syntax[0]):
                contexts[(str(asked.abstract_syntax), str(asked.transfer_syntax[0]))] = result.context_id
        peer_max = next((item.maximum_length_received for item in answer.user_information
                         if isinstance(item, MaximumLengthNotification)), 0) or 0
        sock.settimeout(timeout)
        return cls(sock, contexts, peer_max)

    # ------------------------------------------------------------------ transfer
    def check_idle(self) -> None:
        """Raise Lost if the peer ended the association while it was idle (its idle
        time-out, a restart): the next request must go on a new association."""
        if not self.open:
            raise Lost("association closed")
        pending = isinstance(self._sock, ssl.SSLSocket) and self._sock.pending()
        poll = select.poll()  # not select(): descriptors above 1024 are fine
        poll.register(self._sock, select.POLLIN)
        if not pending and not poll.poll(0):
            return
        try:
            kind, _ = _read_pdu(self._sock)
        except (OSError, EOFError):
            self._close()
            raise Lost("the peer closed the connection") from None
        if kind == PDU_RELEASE_RQ:
            self._send_quietly(RELEASE_RP)
            self._close()
            raise Lost("the peer released the association", released=True)
        if kind == PDU_ABORT:
            self._close()
            raise Lost("the peer aborted the association")
        self.abort()
        raise Lost(f"unexpected PDU type 0x{kind:02X} while idle")

    def send(self, context_id: int, sop_class: str, sop_instance: str, data: Iterable[FilePdu | bytes]) -> int:
        """C-STORE a data set given as its P-DATA-TF PDUs (``file_pdus``, ``bytes_pdus`` with
        this association's ``fragment_size``); the status answered, or Lost. (The answer's
        Error Comment is not read: it is the peer's text, and may quote the instance.)"""
        self._message_id = self._message_id % 0xFFFF + 1
        command = commands.store_request_command(self._message_id, sop_class, sop_instance)
        if command is None:
            raise ValueError("SOP class or instance UID is not plain ASCII")
        fragments = iter(data)
        try:
            self._sock.sendall(_PDATA_HEADER.pack(PDU_P_DATA, 0, 6 + len(command), 2 + len(command), context_id, 0x03)
                               + command)
            while True:
                try:
                    fragment = next(fragments)
                    if isinstance(fragment, FilePdu):
                        self._send_file_pdu(fragment)
                    else:
                        self._sock.sendall(fragment)
                except StopIteration:
                    break
                except _Unreadable as exc:  # the file being sent, not the connection
                    self.abort()
                    raise Lost(f"the data set could not be read: {exc}", sent=True) from None
            return self._response(0x8001, "C-STORE")
        except (OSError, EOFError) as exc:
            self.abort()
            raise Lost(f"connection lost during the C-STORE: {_why(exc)}", sent=True) from None

    def _send_file_pdu(self, pdu: FilePdu) -> None:
        """The header, then the value straight from the page cache (sendfile: no copy through
        this process, a third less CPU per byte here); through TLS, read and sent."""
        if isinstance(self._sock, ssl.SSLSocket):
            try:
                value = os.pread(pdu.fd, pdu.length, pdu.start)
            except OSError as exc:
                raise _Unreadable(_why(exc)) from None
            if len(value) != pdu.length:
                raise _Unreadable("data set file shorter than when its sending began")
            self._sock.sendall(pdu.header + value)
            return
        self._sock.sendall(pdu.header, socket.MSG_MORE)
        sent = 0
        while sent < pdu.length:
            try:
                count = os.sendfile(self._sock.fileno(), pdu.fd, pdu.start + sent, pdu.length - sent)
            except BlockingIOError:  # the socket has a time-out, so it is non-blocking
                poll = select.poll()
                poll.register(self._sock, select.POLLOUT)
                timeout = self._sock.gettimeout()
                if not poll.poll(None if timeout is None else int(timeout * 1000)):
                    raise TimeoutError("timed out") from None
                continue
            if not count:
                raise _Unreadable("data set file shorter than when its sending began")
            sent += count

    def echo(self, context_id: int) -> int:
        """C-ECHO on a Verification context; the status answered, or Lost."""
        self._message_id = self._message_id % 0xFFFF + 1
        command = commands.echo_request_command(self._message_id)
        try:
            self._sock.sendall(_PDATA_HEADER.pack(PDU_P_DATA, 0, 6 + len(command), 2 + len(command), context_id, 0x03)
                               + command)
            return self._response(0x8030, "C-ECHO")
        except (OSError, EOFError) as exc:
            self.abort()
            raise Lost(f"connection lost during the C-ECHO: {_why(exc)}", sent=True) from None

    def _response(self, field: int, what: str) -> int:
        """The status of the response (Command Field ``field``) to the request just sent."""
        command = bytearray()
        while True:
            kind, body = _read_pdu(self._sock)
            if kind == PDU_ABORT:
                self._close()
                raise Lost(f"the peer aborted the association during the {what}", sent=True)
            if kind == PDU_RELEASE_RQ:
                self._send_quietly(RELEASE_RP)
                self._close()
                raise Lost(f"the peer released the association during the {what}", sent=True, released=True)
            if kind != PDU_P_DATA:
                self.abort()
                raise Lost(f"unexpected PDU type 0x{kind:02X} during the {what}", sent=True)
            offset = 0
            while offset + 6 <= len(body):
                length, _context, header = struct.unpack_from(">IBB", body, offset)
                if length < 2 or offset + 4 + length > len(body):
                    self.abort()
                    raise Lost("malformed P-DATA-TF from the peer", sent=True)
                if not header & 0x01:
                    self.abort()
                    raise Lost(f"the peer sent a data set where a {what} response was due", sent=True)
                command += body[offset + 6:offset + 4 + length]
                offset += 4 + length
                if header & 0x02:
                    return self._status(bytes(command), field, what)
            if offset != len(body):
                self.abort()
                raise Lost("malformed P-DATA-TF from the peer", sent=True)

    def _status(self, command: bytes, field: int, what: str) -> int:
        elements = commands.command_elements(command)
        status = commands.us_value(elements, 0x0900) if elements is not None else None
        if status is None or commands.us_value(elements, 0x0100) != field:
            self.abort()
            raise Lost(f"the peer's answer is not a {what} response", sent=True)
        if 0x0120 in elements and commands.us_value(elements, 0x0120) != self._message_id:
            self.abort()
            raise Lost("the peer answered another message ID", sent=True)
        return status

    # ------------------------------------------------------------------ ending
    def release(self) -> None:
        """A-RELEASE; a peer that does not answer within the time-out is aborted."""
        if not self.open:
            return
        try:
            self._sock.sendall(RELEASE_RQ)
            while True:
                kind, _ = _read_pdu(self._sock)
                if kind in (PDU_RELEASE_RP, PDU_ABORT):
                    break
                if kind == PDU_RELEASE_RQ:  # release collision (PS3.8 7.2.2): we requested first
                    self._sock.sendall(RELEASE_RP)
                elif kind != PDU_P_DATA:
                    break
        except (OSError, EOFError):  # no answer in time, or the connection went: abort
            self._send_quietly(abort_pdu())
        self._close()

    def abort(self) -> None:
        if self.open:
            self._send_quietly(abort_pdu())
            self._close()

    def _send_quietly(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError:
            pass

    def _close(self) -> None:
        self.open = False
        try:
            self._sock.close()
        except OSError:
            pass


def fragment_size(peer_max_pdu: int) -> int:
    """The data of one P-DATA-TF PDU (one PDV) that a peer's maximum PDU length allows; at
    most 4 MiB whatever it allows (0: no limit), as through TLS each is read into one buffer."""
    return max(1, min(peer_max_pdu - 6, _LARGEST_FRAGMENT)) if peer_max_pdu else _UNLIMITED_FRAGMENT


@dataclass(frozen=True)
class FilePdu:
    """A P-DATA-TF PDU whose value is ``length`` bytes of an open file at ``start``: its
    header is built, its value never read into this process (``StoreAssociation.send``)."""

    header: bytes
    fd: int
    start: int
    length: int


class _Unreadable(Exception):
    """The data set file, not the connection, failed during a send."""


def file_pdus(file: BinaryIO, offset: int, context_id: int, fragment: int) -> Iterator[FilePdu]:
    """P-DATA-TF PDUs of the data set stored in an open file from offset on."""
    size = os.fstat(file.fileno()).st_size - offset
    for start in range(offset, offset + max(size, 1), fragment):
        length = max(min(fragment, offset + size - start), 0)
        last = start + length >= offset + size
        yield FilePdu(_PDATA_HEADER.pack(PDU_P_DATA, 0, 6 + length, 2 + length, context_id, 0x02 if last else 0),
                      file.fileno(), start, length)


def bytes_pdus(data: bytes, context_id: int, fragment: int, command: bool = False) -> Iterator[bytes]:
    """P-DATA-TF PDUs of an encoded data set (or, ``command``, a command set) held in memory."""
    kind = 0x01 if command else 0x00
    for start in range(0, max(len(data), 1), fragment):
        chunk = data[start:start + fragment]
        last = start + fragment >= len(data)
        yield _PDATA_HEADER.pack(PDU_P_DATA, 0, 6 + len(chunk), 2 + len(chunk), context_id,
                                 kind | 0x02 if last else kind) + chunk


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    kind, _, length = PDU_HEADER.unpack(_read_exactly(sock, 6))
    if length > _LARGEST_ANSWER:
        raise EOFError(f"PDU of {length} bytes")
    return kind, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        count = sock.recv_into(view[got:])
        if not count:
            raise EOFError("connection closed")
        got += count
    return bytes(buffer)


def _abort(sock: socket.socket) -> None:
    try:
        sock.sendall(abort_pdu())
    except OSError:
        pass
    sock.close()


def _why(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    return type(exc).__name__
