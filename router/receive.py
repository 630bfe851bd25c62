"""The receiving side of the node: a pynetdicom SCP that spools what it is sent.

C-ECHO, and C-STORE of any storage SOP class (standard, retired or private) in whatever
transfer syntax the sender proposes first: the node never transcodes on receive. The
C-STORE handler never decodes the dataset: pynetdicom streams the received bytes into a
file in the spool's tmp/ (``STORE_RECV_CHUNKED_DATASET``, see ``install_receive_hooks``),
under a new File Meta Information whose (0002,0016) Source Application Entity Title is the
calling AE title (routing uses it); the handler fsyncs it, renames it into incoming/, and
only then answers 0x0000. When the instance would take the spool over its size limit, the
file system is short of space, or the write fails, it answers 0xA700 (Refused: Out of
Resources) and keeps running.

Unknown callers are rejected at association (allow-lists of AE titles and networks).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dsutils import decode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket

from router.profile import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from router.config import NodeConfig
from router.log import get_logger
from router import commands, reactors
from router.encode import PREAMBLE, meta_group
from router.spool import Spool, fsync_file, new_id, reusable
from router.tls import finish_handshake, server_context

log = get_logger("router.receive")


STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700

#: Reject reasons (A-ASSOCIATE-RJ: result permanent, source service user).
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # calling AE title not recognised
_REJECT_NO_REASON = (0x01, 0x01, 0x01)


def set_nodelay(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def on_conn_open_nodelay(event) -> None:
    """EVT_CONN_OPEN handler: pynetdicom leaves Nagle on (~40 ms per message)."""
    try:
        set_nodelay(event.assoc.dul.socket.socket)
    except AttributeError:
        pass


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group the spool stores a received
    instance under: (0002,0016) Source Application Entity Title is the calling AE title."""
    return PREAMBLE + _meta_group(sop_class, sop_instance, transfer_syntax, source_ae)


def _meta_group(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    group = meta_group([(0x0002, "UI", _uid(sop_class)), (0x0003, "UI", _uid(sop_instance)),
                        (0x0010, "UI", _uid(transfer_syntax)), (0x0012, "UI", IMPLEMENTATION_CLASS_UID),
                        (0x0013, "SH", IMPLEMENTATION_VERSION), (0x0016, "AE", _ascii(source_ae).strip()[:16])])
    assert group is not None  # ASCII values of the VRs it encodes
    return group


def _ascii(text) -> str:
    return str(text or "").encode("ascii", "replace").decode("ascii")


def _uid(text) -> str:
    return _ascii(text).strip("\0 ")[:64]


# -- receiving a C-STORE dataset straight into the spool -----------------------------------
#
# With STORE_RECV_CHUNKED_DATASET pynetdicom writes each received fragment of a C-STORE
# dataset to a NamedTemporaryFile (behind a preamble and a File Meta group it encodes with
# pydicom) in the association's reactor thread, before the handler runs. For a node's own
# associations the hooks below make that file the spool file itself: created in the spool's
# tmp/, written unbuffered, under the meta group the spool keeps (calling AE title
# included). The handler then only fsyncs and renames it: no copy, no second meta.


class _Receiving(threading.local):
    """The node receiver and association whose PDU this reactor thread is decoding."""

    receiver: "Receiver | None" = None
    assoc = None


_receiving = _Receiving()
_receivers: "weakref.WeakKeyDictionary[AE, Receiver]" = weakref.WeakKeyDictionary()


#: Received bytes handed to the kernel's writeback at a time (Linux sync_file_range).
_WRITEBACK_CHUNK = 256 * 1024


_sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)


def _start_writeback(fd: int, offset: int, count: int) -> None:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): start writeback, do not wait (Python's
    os module lacks it). Halves the fsync before each answer (~1.9 -> ~1.0 ms median here).
    Elsewhere, and on any failure, nothing happens: the fsync does it all."""
    if _sync_file_range is not None:
        _sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(count), ctypes.c_uint(2))


class SpoolFile:
    """A received dataset's file in the spool's tmp/, as pynetdicom's chunked receive uses
    it (``write``, ``file.flush``, ``close``, ``name``). Writes go straight to the file: a
    recycled one where the spool has one (``Spool.reuse``), cut to length by ``finish``."""

    def __init__(self, spool: Spool):
        path = spool.tmp_path()
        self.name = str(path)
        self.file = self
        self._recycled = spool.reuse(path)
        flags = os.O_WRONLY if self._recycled else os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self._fd = os.open(path, flags, 0o600)
        self._written = self._started = 0

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._written += len(data)
        if self._written - self._started >= _WRITEBACK_CHUNK:
            # start writing back what arrived so far: the fsync before the answer then
            # waits for the last fragment only
            _start_writeback(self._fd, self._started, self._written - self._started)
            self._started = self._written
        return len(data)

    def flush(self) -> None:
        """Nothing buffered."""

    def finish(self) -> int:
        """The data set is complete: cut a recycled file to what was written (raises OSError
        if that fails). Returns the file's size."""
        if self._recycled:
            reusable(self._fd, self._written)
            self._recycled = False
        return self._written

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


@dataclass(frozen=True)
class _MetaRequest:
    sop_class: str
    sop_instance: str
    transfer_syntax: str


def install_receive_hooks() -> None:
    """Patch pynetdicom (once per process) for the node's associations, see above; and make
    a failed write end the association, not the reactor: a full file system raises inside
    the reactor thread, which killed it and left the association hanging. The association
    is aborted instead; the instance was not acknowledged, so the sender keeps it and
    retries (as after 0xA700). Associations of other AEs in the process are left alone."""
    commands.install()
    reactors.install()
    if getattr(DIMSEMessage.decode_msg, "router_hook", False):
        return
    original_decode = DIMSEMessage.decode_msg
    original_temporary = dimse_messages.NamedTemporaryFile
    original_create_meta = dimse_messages.create_file_meta
    original_write_meta = dimse_messages.write_file_meta_info

    @functools.wraps(original_decode)
    def decode_msg(self, primitive, assoc=None):
        receiver = _receivers.get(assoc.ae) if assoc is not None else None
        _receiving.receiver, _receiving.assoc = receiver, assoc
        try:
            if receiver is not None and _start_store(self, primitive, assoc, receiver):
                return False  # the data set follows
            return original_decode(self, primitive, assoc)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it ends this association, not the reactor
            if receiver is None:
                raise
            partial = getattr(self, "_data_set_file", None)
            if partial is not None:
                try:
                    partial.close()
                    os.unlink(partial.name)
                except OSError:
                    pass
                self._data_set_file = None
            if isinstance(exc, OSError):
                receiver._write_failed(exc)
            else:  # a message pynetdicom cannot decode: the association is aborted
                log.error("receive_failed", error=type(exc).__name__, status="A-ABORT")
            if not getattr(assoc, "_guard_aborting", False):
                assoc._guard_aborting = True
                _abort_now(assoc)
            return False
        finally:
            _receiving.receiver = _receiving.assoc = None

    def temporary_file(*args, **kwargs):
        receiver = _receiving.receiver
        if receiver is None:
            return original_temporary(*args, **kwargs)
        return SpoolFile(receiver.spool)

    def create_file_meta(*, sop_class_uid, sop_instance_uid, transfer_syntax):
        if _receiving.receiver is None:
            return original_create_meta(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                                        transfer_syntax=transfer_syntax)
        return _MetaRequest(str(sop_class_uid or ""), str(sop_instance_uid or ""), str(transfer_syntax or ""))

    def write_file_meta_info(fp, meta, *args, **kwargs):
        if not isinstance(meta, _MetaRequest):
            return original_write_meta(fp, meta, *args, **kwargs)
        calling = _calling_ae(_receiving.assoc)
        fp.write(_meta_group(meta.sop_class, meta.sop_instance, meta.transfer_syntax, calling))

    decode_msg.router_hook = True
    DIMSEMessage.decode_msg = decode_msg
    AssociationSocket.recv = read_exactly
    DULServiceProvider._read_pdu_data = read_pdu
    dimse_messages.NamedTemporaryFile = temporary_file
    dimse_messages.create_file_meta = create_file_meta
    dimse_messages.write_file_meta_info = write_file_meta_info


def _start_store(msg: DIMSEMessage, primitive, assoc, receiver: Receiver) -> bool:
    """Take a C-STORE request's command set as pynetdicom's decode_msg would, from values
    read by hand (pynetdicom converts them through pydicom, ~0.3 ms per instance), and
    open the spool file its data set streams into. False (pynetdicom's way) for any other
    message, or a command set not in one piece."""
    whole = commands.whole_command(msg, primitive) if _config.STORE_RECV_CHUNKED_DATASET else None
    if whole is None:
        return False
    context_id, command = whole
    request = commands.store_request(command)
    if request is None:
        return False
    transfer_syntax = str(assoc._accepted_cx[context_id].transfer_syntax[0])
    msg.encoded_command_set.write(command)
    msg.context_id = context_id
    if assoc.get_handlers(evt.EVT_DIMSE_RECV):  # they read the Dataset; the primitive comes from the bytes
        msg.command_set = decode(msg.encoded_command_set, True, True)
    msg.__class__ = C_STORE_RQ
    spool_file = SpoolFile(receiver.spool)
    msg._data_set_file, msg._data_set_path = spool_file, Path(spool_file.name)
    sop_class, sop_instance = request
    spool_file.write(file_meta_bytes(sop_class, sop_instance, transfer_syntax, _calling_ae(assoc)))
    return True


def read_exactly(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: nr_bytes from the socket, fewer if the peer closed it.

    pynetdicom's reads 4 KiB per call and appends each piece (32 calls per 128 KiB PDU);
    this reads whatever has arrived straight into one buffer.
    """
    buffer = bytearray(nr_bytes)
    nr_read = 0
    with memoryview(buffer) as view:
        while nr_read < nr_bytes:
            count = self.socket.recv_into(view[nr_read:])
            if not count:
                break
            nr_read += count
    if nr_read < nr_bytes:
        del buffer[nr_read:]
    return buffer


_PDU_HEADER = struct.Struct(">BBL")
_ITEM_LENGTH = struct.Struct(">L")
_MIN_PDU_LIMIT = 16 * 1024 * 1024
#: pynetdicom's own PDU reader, for PDUs other than P-DATA-TF and anything unusual.
pynetdicom_read_pdu = DULServiceProvider._read_pdu_data


def read_pdu(self: DULServiceProvider) -> None:
    """``DULServiceProvider._read_pdu_data``: a P-DATA-TF PDU is read into one buffer and its
    values are views of it.

    pynetdicom copied every PDU five times before the data set fragment reached the spool
    file (appending to the header, bytes() of that, the PDU's variable part, each item, the
    value after its control header): ~40 ms of CPU for an 18 MB clip. Command fragments
    become bytes, as pynetdicom has them. Other PDU types and items that do not add up are
    decoded by pynetdicom, with its events; an EVT_DATA_RECV handler (it wants the raw
    bytes) gets pynetdicom's reader. A length far beyond the maximum the node announced
    aborts the association before anything is allocated (pynetdicom would wait for it all).
    """
    if self.assoc.get_handlers(evt.EVT_DATA_RECV):
        return pynetdicom_read_pdu(self)
    try:
        header = self.socket.recv(6)
        if len(header) < 6:
            self.event_queue.put("Evt17")  # closed
            return
        pdu_type, _, length = _PDU_HEADER.unpack(header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            log.error("receive_failed", error=f"unknown PDU type 0x{pdu_type:02X}")
            self.event_queue.put("Evt19")
            return
        if length > _largest_pdu(self.assoc):
            log.error("receive_failed", error=f"PDU of {length} bytes announced")
            self.event_queue.put("Evt19")
            return
        body = self.socket.recv(length)
    except (OSError, TimeoutError):
        self.event_queue.put("Evt17")
        return
    if len(body) != length:
        log.error("receive_failed", error="connection closed inside a PDU")
        self.event_queue.put("Evt17")
        return
    pdu = _received_p_data(body) if pdu_type == 0x04 else None
    if pdu is None:
        _decode_whole(self, header + body)
        return
    evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
    self.event_queue.put("Evt10")
    self._recv_pdu.put(pdu)


def _largest_pdu(assoc) -> float:
    """The largest PDU taken from the peer: 4x the maximum length we announced, at least
    16 MiB (a peer must stay within the maximum; this only stops absurd lengths); no limit
    if we announced none."""
    ours = (assoc.acceptor if assoc.is_acceptor else assoc.requestor).maximum_length
    return max(4 * ours, _MIN_PDU_LIMIT) if ours else float("inf")


def _decode_whole(dul: DULServiceProvider, data: bytearray) -> None:
    """The end of pynetdicom's ``_read_pdu_data``: decode, then queue the event and the PDU."""
    try:
        pdu, event = dul._decode_pdu(data)
        dul.event_queue.put(event)
    except Exception as exc:  # noqa: BLE001 - pynetdicom's answer to any undecodable PDU
        log.error("receive_failed", error=f"undecodable PDU ({type(exc).__name__})")
        dul.event_queue.put("Evt19")
        return
    dul._recv_pdu.put(pdu)


def _received_p_data(body: bytearray) -> P_DATA_TF | None:
    """The P-DATA-TF PDU whose variable part is body, data set values as views of it; None
    if its items do not exactly fill it."""
    pdu = P_DATA_TF()
    view = memoryview(body)
    offset, end = 0, len(body)
    while offset < end:
        if offset + 6 > end:
            return None
        item_end = offset + 4 + _ITEM_LENGTH.unpack_from(body, offset)[0]
        if item_end > end or item_end < offset + 6:
            return None
        item = PresentationDataValueItem()
        item.presentation_context_id = body[offset + 4]
        value = view[offset + 5:item_end]
        item.presentation_data_value = bytes(value) if value[0] & 1 else value  # command: bytes
        pdu.presentation_data_value_items.append(item)
        offset = item_end
    return pdu if pdu.presentation_data_value_items else None


#: A-ABORT PDU (PS3.8 9.3.8): source 2 (service provider), reason 0 (not specified).
_A_ABORT = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0))


def _abort_now(assoc) -> None:
    """Abort from inside the reactor thread, at once: the A-ABORT goes out on the socket,
    which is then shut down (queued through pynetdicom, the reactor stopped before sending
    it and the sender heard nothing until its own time-out)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.sendall(_A_ABORT)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    assoc.abort(block=False)


def _calling_ae(assoc) -> str:
    requestor = assoc.requestor
    return str(getattr(requestor.primitive, "calling_ae_title", None) or requestor.ae_title or "").strip()


class Receiver:
    """The node's SCP. ``on_received(path)`` is called for every acknowledged instance;
    ``events`` (see router.node.NodeEvents) hears of every acknowledgement and refusal."""

    def __init__(self, node: NodeConfig, spool: Spool, on_received: Callable[[Path], None], events=None,
                 reserved_bytes: Callable[[], int] = lambda: 0):
        self.node = node
        self.spool = spool
        self.on_received = on_received
        self.reserved_bytes = reserved_bytes  # spool bytes about to be written (de-identify outputs)
        self.events = events
        self.networks = tuple(node.allowed_networks)
        self.titles = frozenset(t.strip() for t in node.allowed_ae_titles)
        self.ae: AE | None = None
        self.server = None
        self._lock = threading.Lock()
        self._in_handler = 0
        self._last_pdu = 0.0
        self.received = 0
        self.refused = 0

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Bind and serve in background threads. Raises OSError if the port is taken."""
        _config.UNRESTRICTED_STORAGE_SERVICE = True  # every storage-like SOP class
        _config.STORE_RECV_CHUNKED_DATASET = True
        install_receive_hooks()
        ae = AE(ae_title=self.node.ae_title)
        _receivers[ae] = self
        ae.maximum_pdu_size = self.node.max_pdu
        ae.maximum_associations = 32
        ae.network_timeout = 120
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open if self.node.tls else on_conn_open_nodelay),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_PDU_RECV, self._on_pdu),
        ]
        self.ae = ae
        ssl_context = server_context(self.node.tls) if self.node.tls else None
        self.server = ae.start_server((self.node.bind, self.node.port), block=False, evt_handlers=handlers,
                                      ssl_context=ssl_context)
        log.info("listening", ae_title=self.node.ae_title, bind=self.node.bind, port=self.port,
                 max_pdu=self.node.max_pdu, tls=ssl_context is not None)

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.node.port

    def stop_accepting(self) -> None:
        """Close the listening socket; running associations go on."""
        if self.server is not None:
            self.server.shutdown()

    def active_associations(self) -> list:
        return list(self.ae.active_associations) if self.ae else []

    def drain(self, grace_seconds: float = 15.0, quiet_seconds: float = 1.0) -> int:
        """Let in-flight C-STOREs finish, then abort the associations still open.

        Waits until every association is closed, or no C-STORE handler runs and no PDU
        arrived for ``quiet_seconds`` (the senders are between instances: everything
        acknowledged is spooled), at most ``grace_seconds``. Returns how many were aborted.
        """
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            assocs = self.active_associations()
            if not assocs:
                return 0
            with self._lock:
                busy = self._in_handler > 0 or time.monotonic() - self._last_pdu < quiet_seconds
            if not busy:
                break
            time.sleep(0.05)
        assocs = self.active_associations()
        for assoc in assocs:
            assoc.abort()
        return len(assocs)

    # --------------------------------------------------------------- handlers
    def _on_pdu(self, event) -> None:
        self._last_pdu = time.monotonic()

    def _on_conn_open(self, event) -> None:
        """With TLS: the handshake, on the connection's thread (see router.tls.ServerContext)."""
        on_conn_open_nodelay(event)
        failed = finish_handshake(event.assoc.dul.socket.socket)
        if failed:
            log.warning("tls_refused", peer=str(event.address[0]), reason=failed)

    def _caller(self, event) -> tuple[str, str]:
        return _calling_ae(event.assoc), str(event.assoc.requestor.address)

    def _refusal(self, calling: str, address: str) -> str | None:
        if self.titles and calling not in self.titles:
            return "calling AE title not on the allow-list"
        if self.networks:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return "client address not understood"
            if getattr(ip, "ipv4_mapped", None):
                ip = ip.ipv4_mapped
            if not any(ip in net for net in self.networks):
                return "client address not in an allowed network"
        return None

    def _on_requested(self, event) -> None:
        calling, address = self._caller(event)
        reason = self._refusal(calling, address)
        if reason is None:
            return
        log.warning("association_rejected", reason=reason, calling_ae=calling, peer=address,
                    called_ae=str(getattr(event.assoc.requestor.primitive, "called_ae_title", "")).strip())
        assoc = event.assoc
        rsd = _REJECT_CALLING_AE if reason.startswith("calling") else _REJECT_NO_REASON
        assoc.acse.send_reject(*rsd)
        assoc.kill()

    def _on_accepted(self, event) -> None:
        calling, address = self._caller(event)
        log.info("association_accepted", calling_ae=calling, peer=address,
                 contexts=len(event.assoc.accepted_contexts))

    def _on_echo(self, event) -> int:
        calling, address = self._caller(event)
        log.info("echo", calling_ae=calling, peer=address)
        return STATUS_SUCCESS

    def _on_store(self, event) -> int:
        with self._lock:
            self._in_handler += 1
        try:
            return self._store(event)
        finally:
            with self._lock:
                self._in_handler -= 1

    def _store(self, event) -> int:
        started = time.perf_counter()
        calling, address = self._caller(event)
        request = event.request
        sop_class = str(request.AffectedSOPClassUID or "")
        transfer_syntax = str(event.context.transfer_syntax)
        spool_file = getattr(request, "_dataset_file", None)
        try:
            incoming = spool_file.finish() if isinstance(spool_file, SpoolFile) else os.path.getsize(event.dataset_path)
        except (OSError, TypeError):
            incoming = -1  # no file, or a recycled one not cut to length: refused below
        problem = self.spool.capacity_problem(self.node.max_spool_bytes, self.node.min_free_bytes, max(0, incoming),
                                              self.reserved_bytes())
        if problem:
            self.refused += 1
            self._refused("spool_full" if "spool" in problem else "disk_full", calling)
            log.warning("refused", reason=problem, status="0xA700", calling_ae=calling, peer=address)
            return STATUS_OUT_OF_RESOURCES
        spool_id = new_id()
        tmp = Path(event.dataset_path)
        try:
            if tmp.parent != self.spool.tmp:
                raise OSError("the dataset was not received into the spool")  # the hooks are not installed
            if incoming < 0:
                raise OSError(errno.EIO, "the received data set's file could not be completed")
            fsync_file(tmp)
            size = incoming
            final = self.spool.commit_incoming(tmp, spool_id)
        except OSError as exc:
            self.refused += 1
            try:
                tmp.unlink()
            except OSError:
                pass
            kind, reason = self._write_failure(exc)
            self._refused(kind, calling)
            log.error("refused", reason=reason, status="0xA700", calling_ae=calling, peer=address, spool_id=spool_id)
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # never let a handler exception become pynetdicom's 0xC211
            self.refused += 1
            try:
                tmp.unlink()
            except OSError:
                pass
            self._refused("receive_failed", calling)
            log.error("refused", reason=f"receive failed: {type(exc).__name__}", status="0xA700",
                      calling_ae=calling, peer=address, spool_id=spool_id)
            return STATUS_OUT_OF_RESOURCES
        self.spool.add_usage(size)
        self.received += 1
        if self.events:
            self.events.received(spool_id, calling, size)
        log.info("received", spool_id=spool_id, calling_ae=calling, peer=address, sop_class=sop_class,
                 transfer_syntax=transfer_syntax, bytes=size,
                 ms=round((time.perf_counter() - started) * 1000, 2))
        try:
            self.on_received(final)
        except Exception as exc:  # it is spooled: resumed at the next start at worst
            log.error("notify_failed", spool_id=spool_id, error=type(exc).__name__)
        return STATUS_SUCCESS

    def _write_failed(self, exc: OSError) -> None:
        self.refused += 1
        kind, reason = self._write_failure(exc)
        self._refused(kind)
        log.error("refused", reason=reason, status="A-ABORT", note="the sender keeps the instance and retries")

    def _write_failure(self, exc: OSError) -> tuple[str, str]:
        """(kind, PHI-free reason) of a failed spool write; a full file system gets the
        recycled files back (``Spool.write_failed``)."""
        if self.spool.write_failed(exc):
            return "disk_full", "out of space"
        return "write_failed", f"write failed: {exc.strerror or type(exc).__name__}"

    def _refused(self, kind: str, calling_ae: str | None = None) -> None:
        if self.events:
            self.events.refused(kind, calling_ae)
