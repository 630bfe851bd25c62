"""The receiving side of the node: a pynetdicom SCP that spools what it is sent.

C-ECHO, and C-STORE of any storage SOP class (standard, retired or private) in whatever
transfer syntax the sender proposes first: the node never transcodes on receive. The
C-STORE handler never decodes the dataset: pynetdicom streams the received bytes to a file
in the spool's tmp/ (``STORE_RECV_CHUNKED_DATASET``); the handler writes the instance
under a new File Meta Information whose (0002,0016) Source Application Entity Title is the
calling AE title (routing uses it), fsyncs it, renames it into incoming/, and only then
answers 0x0000. When the spool is over its size limit, the file system is short of space,
or the write fails, it answers 0xA700 (Refused: Out of Resources) and keeps running.

Unknown callers are rejected at association (allow-lists of AE titles and networks).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.sop_class import Verification

from router.profile import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from router.config import NodeConfig
from router.log import get_logger
from router.spool import Spool, is_out_of_space, new_id, write_durably
from router.tls import finish_handshake, server_context

log = get_logger("router.receive")

#: Our Implementation Class UID (a fixed UUID-derived 2.25 UID) and version name.

#: Stream received datasets to a file instead of holding them in memory. Measured with
#: 200 CT slices (storescu -> the node, workers paused, two fsyncs per instance, 2 cores):
#: 67-86 inst/s streamed vs 81-87 inst/s with event.encoded_dataset(): the same within
#: noise, and streaming never holds a multi-GB instance in memory (twice, as
#: encoded_dataset() does).
CHUNKED = True

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
    """Preamble, 'DICM' and a File Meta Information group, encoded (by hand: this runs
    for every received instance, and pydicom's writer costs ~1 ms for these 8 elements)."""
    elements = [
        _meta_element(0x0001, "OB", b"\x00\x01"),
        _meta_element(0x0002, "UI", _uid_bytes(sop_class)),
        _meta_element(0x0003, "UI", _uid_bytes(sop_instance)),
        _meta_element(0x0010, "UI", _uid_bytes(transfer_syntax)),
        _meta_element(0x0012, "UI", _uid_bytes(IMPLEMENTATION_CLASS_UID)),
        _meta_element(0x0013, "SH", _text_bytes(IMPLEMENTATION_VERSION, 16)),
    ]
    if source_ae:
        elements.append(_meta_element(0x0016, "AE", _text_bytes(source_ae, 16)))
    body = b"".join(elements)
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, "UL", struct.pack("<I", len(body))) + body


def _meta_element(element: int, vr: str, value: bytes) -> bytes:
    if vr == "OB":
        return struct.pack("<HH2s2xI", 0x0002, element, b"OB", len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr.encode("ascii"), len(value)) + value


def _uid_bytes(uid: str) -> bytes:
    data = str(uid).strip("\0 ").encode("ascii", "replace")[:64]
    return data + b"\0" if len(data) & 1 else data


def _text_bytes(text: str, limit: int) -> bytes:
    data = str(text).strip().encode("ascii", "replace")[:limit]
    return data + b" " if len(data) & 1 else data


def dataset_offset(path: Path) -> int:
    """Where the dataset starts in a Part 10 file written by pynetdicom (after its meta)."""
    with open(path, "rb") as f:
        head = f.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("unexpected file meta layout")
    return 144 + int.from_bytes(head[140:144], "little")


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy count bytes from src at offset to the current end of dst, in the kernel."""
    copied = 0
    try:
        while copied < count:
            n = os.copy_file_range(src_fd, dst_fd, count - copied, offset + copied)
            if n == 0:
                break
            copied += n
    except OSError:
        if copied:
            raise
        os.lseek(src_fd, offset, os.SEEK_SET)
        while copied < count:
            chunk = os.read(src_fd, min(1 << 20, count - copied))
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst_fd, view):]
            copied += len(chunk)
    if copied != count:
        raise OSError(f"short copy: {copied} of {count} bytes")


def guard_receive_writes(on_failure: Callable[[OSError], None]) -> None:
    """Make a failed write of a received dataset end the association, not the node's reactor.

    With STORE_RECV_CHUNKED_DATASET pynetdicom writes each received fragment to a temp file
    inside the association's reactor thread, before our handler runs: a full file system
    raises there, kills the reactor thread and leaves the association hanging. Here the
    association is aborted instead; the instance was not acknowledged, so the sender keeps
    it and retries (as after 0xA700).
    """
    original = getattr(DIMSEMessage.decode_msg, "__wrapped__", DIMSEMessage.decode_msg)

    @functools.wraps(original)
    def decode_msg(self, primitive, assoc=None):
        try:
            return original(self, primitive, assoc)
        except (OSError, ValueError) as exc:  # ValueError: later fragments, file already closed
            partial = getattr(self, "_data_set_file", None)
            if partial is not None:
                try:
                    partial.close()
                    os.unlink(partial.name)
                except OSError:
                    pass
                self._data_set_file = None
                if isinstance(exc, OSError):
                    on_failure(exc)
            if assoc is not None and not getattr(assoc, "_guard_aborting", False):
                assoc._guard_aborting = True
                assoc.abort(block=False)  # we are in the reactor thread: queue the A-ABORT
            return False

    DIMSEMessage.decode_msg = decode_msg


class Receiver:
    """The node's SCP. ``on_received(path)`` is called for every acknowledged instance;
    ``events`` (see router.node.NodeEvents) hears of every acknowledgement and refusal."""

    def __init__(self, node: NodeConfig, spool: Spool, on_received: Callable[[Path], None], events=None):
        self.node = node
        self.spool = spool
        self.on_received = on_received
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
        _config.STORE_RECV_CHUNKED_DATASET = CHUNKED
        guard_receive_writes(self._write_failed)
        if CHUNKED:
            # pynetdicom writes its temporary files with tempfile: keep them in the spool
            # (same file system, cleaned at start).
            tempfile.tempdir = str(self.spool.tmp)
        ae = AE(ae_title=self.node.ae_title)
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
                 max_pdu=self.node.max_pdu, chunked=CHUNKED, tls=ssl_context is not None)

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
        requestor = event.assoc.requestor
        calling = getattr(requestor.primitive, "calling_ae_title", None) or requestor.ae_title or ""
        return str(calling).strip(), str(requestor.address)

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
        problem = self.spool.capacity_problem(self.node.max_spool_bytes, self.node.min_free_bytes)
        if problem:
            self.refused += 1
            self._refused("spool_full" if "spool" in problem else "disk_full", calling)
            log.warning("refused", reason=problem, status="0xA700", calling_ae=calling, peer=address)
            return STATUS_OUT_OF_RESOURCES
        spool_id = new_id()
        tmp = self.spool.tmp_path()
        try:
            head = file_meta_bytes(sop_class, str(request.AffectedSOPInstanceUID or ""), transfer_syntax, calling)
            if CHUNKED:
                size = self._write_from_file(Path(event.dataset_path), tmp, head)
            else:
                size = write_durably(tmp, [head, event.encoded_dataset(include_meta=False)])
            final = self.spool.commit_incoming(tmp, spool_id)
        except OSError as exc:
            self.refused += 1
            try:
                tmp.unlink()
            except OSError:
                pass
            reason = "out of space" if is_out_of_space(exc) else f"write failed: {exc.strerror or type(exc).__name__}"
            self._refused("disk_full" if is_out_of_space(exc) else "write_failed", calling)
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
        kind = "disk_full" if is_out_of_space(exc) else "write_failed"
        self._refused(kind)
        log.error("refused", reason=("out of space" if kind == "disk_full" else
                                     f"write failed: {exc.strerror or type(exc).__name__}"),
                  status="A-ABORT", note="the sender keeps the instance and retries")

    def _refused(self, kind: str, calling_ae: str | None = None) -> None:
        if self.events:
            self.events.refused(kind, calling_ae)

    @staticmethod
    def _write_from_file(src: Path, dst: Path, head: bytes) -> int:
        offset = dataset_offset(src)
        count = os.path.getsize(src) - offset
        fd_in = os.open(src, os.O_RDONLY)
        try:
            fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(head)
                while view:
                    view = view[os.write(fd_out, view):]
                copy_range(fd_in, fd_out, offset, count)
                os.fsync(fd_out)
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)
        return len(head) + count
