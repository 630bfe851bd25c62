"""The receiving stage: the node's SCP, which spools what it is sent.

C-ECHO, and C-STORE of any storage SOP class (standard, retired or private) in whatever
transfer syntax the sender proposes first: the node never transcodes on receive. Each
accepted association runs on a thread of its own (``router.acceptor``), which streams a
C-STORE's data set straight into a file in the spool's tmp/, behind a File Meta
Information whose (0002,0016) Source Application Entity Title is the calling AE title
(routing uses it); nothing is decoded. Once the data set is complete the file is fsynced
and renamed into incoming/, and only then is 0x0000 answered. When the instance would take
the spool over its size limit, the file system is short of space, or a write fails, the
answer is 0xA700 (Refused: Out of Resources) and the node keeps running.

Unknown callers are rejected at association (allow-lists of AE titles and networks).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from router.acceptor import APPLICATION_CONTEXT, InboundAssociation, Request
from router.config import NodeConfig
from router.encode import PREAMBLE, meta_group
from router.log import get_logger
from router.profile import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from router.spool import DURABLE_MODE, Spool, new_id, reusable, start_writeback
from router.tls import finish_handshake, server_context

log = get_logger("router.receive")


STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700

#: Reject (result, source, reason), PS3.8 9.3.4.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user: calling AE title not recognised
_REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user: no reason given
_REJECT_CONTEXT_NAME = (0x01, 0x01, 0x02)  # permanent, service user: application context name not supported
_REJECT_VERSION = (0x01, 0x02, 0x02)  # permanent, ACSE: protocol version not supported
_REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, presentation: local limit exceeded
#: Associations served at once; more are rejected (transient: local limit exceeded).
MAX_ASSOCIATIONS = 32
#: A connection has this long to send its A-ASSOCIATE-RQ (the ARTIM timer).
REQUEST_SECONDS = 30.0
#: An association silent this long is aborted.
IDLE_SECONDS = 120.0


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group the spool stores a received
    instance under: (0002,0016) Source Application Entity Title is the calling AE title."""
    group = meta_group([(0x0002, "UI", _uid(sop_class)), (0x0003, "UI", _uid(sop_instance)),
                        (0x0010, "UI", _uid(transfer_syntax)), (0x0012, "UI", IMPLEMENTATION_CLASS_UID),
                        (0x0013, "SH", IMPLEMENTATION_VERSION), (0x0016, "AE", _ascii(source_ae).strip()[:16])])
    assert group is not None  # ASCII values of the VRs it encodes
    return PREAMBLE + group


def _address(host: str) -> str:
    """A caller's address as logged and checked: an IPv4 caller of a dual-stack "::"
    listener is shown as IPv4 (127.0.0.1, not ::ffff:127.0.0.1)."""
    try:
        mapped = getattr(ipaddress.ip_address(host.split("%", 1)[0]), "ipv4_mapped", None)
    except ValueError:
        return host
    return str(mapped) if mapped else host


def _ascii(text) -> str:
    return str(text or "").encode("ascii", "replace").decode("ascii")


def _uid(text) -> str:
    return _ascii(text).strip("\0 ")[:64]


#: Received bytes handed to the kernel's writeback at a time (Linux sync_file_range).
_WRITEBACK_CHUNK = 256 * 1024


class SpoolFile:
    """A received data set's file in the spool's tmp/. Writes go straight to the file: a
    recycled one where the spool has one (``Spool.reuse``), cut to length by ``finish``.
    ``head`` (the file meta) goes out with the first write, in one system call."""

    def __init__(self, spool: Spool, head: bytes = b""):
        path = spool.tmp_path()
        self.name = str(path)
        self._recycled = spool.reuse(path)
        flags = os.O_WRONLY if self._recycled else os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self._fd = os.open(path, flags, DURABLE_MODE)
        if self._recycled:
            os.fchmod(self._fd, DURABLE_MODE)  # it may have been a volatile output
        self._head = head
        self._written = self._started = 0

    def write(self, data) -> int:
        parts = [self._head, data] if self._head else [data]
        total = sum(len(part) for part in parts)
        done = os.writev(self._fd, parts)
        if done < total:  # a short write (rare on a regular file): the rest, in order
            rest = memoryview(b"".join(parts))[done:]
            while rest:
                rest = rest[os.write(self._fd, rest):]
        self._head = b""
        self._written += total
        if self._written - self._started >= _WRITEBACK_CHUNK:
            # start writing back what arrived so far: the fsync before the answer then
            # waits for the last fragment only
            start_writeback(self._fd, self._started, self._written - self._started)
            self._started = self._written
        return len(data)

    @property
    def size(self) -> int:
        """Bytes written so far (the head counts once it is out)."""
        return self._written

    def finish(self) -> int:
        """The data set is complete: cut a recycled file to what was written, fsync it and
        close it (raises OSError if any of that fails). Returns the file's size."""
        if self._head:  # an empty data set
            self.write(b"")
        if self._recycled:
            reusable(self._fd, self._written)
            self._recycled = False
        os.fsync(self._fd)
        self.close()
        return self._written

    def discard(self) -> None:
        """The data set will not be kept: close and delete the file."""
        self.close()
        try:
            os.unlink(self.name)
        except OSError:
            pass

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


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
        self.received = 0
        self.refused = 0
        self._listener: socket.socket | None = None
        self._ssl_context = None
        self._lock = threading.Lock()
        self._associations: set[InboundAssociation] = set()

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Bind and serve in background threads. Raises OSError if the port is taken."""
        self._ssl_context = server_context(self.node.tls) if self.node.tls else None
        family = socket.getaddrinfo(self.node.bind, self.node.port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        self._listener = socket.create_server(  # "::" takes IPv4 callers too, as mapped addresses
            (self.node.bind, self.node.port), family=family, backlog=64,
            dualstack_ipv6=family == socket.AF_INET6 and socket.has_dualstack_ipv6())
        threading.Thread(target=self._accept, args=(self._listener,), name="receive-accept", daemon=True).start()
        log.info("listening", ae_title=self.node.ae_title, bind=self.node.bind, port=self.port,
                 max_pdu=self.node.max_pdu, tls=self._ssl_context is not None)

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1] if self._listener else self.node.port

    def stop_accepting(self) -> None:
        """Close the listening socket; running associations go on."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
            except OSError:
                pass
            listener.close()

    def active_associations(self) -> list[InboundAssociation]:
        with self._lock:
            return list(self._associations)

    def drain(self, grace_seconds: float = 15.0, quiet_seconds: float = 1.0) -> int:
        """Let in-flight C-STOREs finish, then abort the associations still open.

        Waits until every association is closed, or none is inside a message and no PDU
        arrived for ``quiet_seconds`` (the senders are between instances: everything
        acknowledged is spooled), at most ``grace_seconds``. Returns how many were aborted.
        """
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            assocs = self.active_associations()
            if not assocs:
                return 0
            now = time.monotonic()
            if not any(a.in_message or now - a.last_pdu < quiet_seconds for a in assocs):
                break
            time.sleep(0.05)
        assocs = self.active_associations()
        for assoc in assocs:
            assoc.abort()
        return len(assocs)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, address = listener.accept()
            except OSError:
                if self._listener is not listener:
                    return  # stop_accepting
                time.sleep(0.1)  # out of descriptors, say: try again
                continue
            try:
                threading.Thread(target=self._serve, args=(sock, _address(address[0])), name="receive",
                                 daemon=True).start()
            except RuntimeError:  # no thread to be had (a process limit): this caller retries later
                log.error("association_refused", reason="cannot start a thread", peer=str(address[0]))
                sock.close()

    def _serve(self, sock: socket.socket, address: str) -> None:
        """A connection's thread: TLS handshake, then the association."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl_context is not None:
                sock = self._ssl_context.wrap_socket(sock, server_side=True)
                failed = finish_handshake(sock)
                if failed:
                    log.warning("tls_refused", peer=address, reason=failed)
                    sock.close()
                    return
        except OSError:
            sock.close()
            return
        assoc = InboundAssociation(sock, address, self, self.node.max_pdu,
                                   (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION), REQUEST_SECONDS, IDLE_SECONDS)
        with self._lock:
            self._associations.add(assoc)
        assoc.run()

    # ----------------------------------------------------- the association's service
    def refusal(self, request: Request) -> tuple[int, int, int] | None:
        """The A-ASSOCIATE-RJ reason for a request the node will not serve (logged and
        counted by kind), or None."""
        reason, reject, kind = None, _REJECT_NO_REASON, ""
        if not request.protocol_version & 1:
            reason, reject, kind = "protocol version not supported", _REJECT_VERSION, "protocol_version"
        elif request.application_context != APPLICATION_CONTEXT:
            reason, reject, kind = "not the DICOM application context", _REJECT_CONTEXT_NAME, "application_context"
        else:
            reason = self._refusal(request.calling_ae, request.address)
            if reason and reason.startswith("calling"):
                reject, kind = _REJECT_CALLING_AE, "calling_ae_not_allowed"
            elif reason:
                kind = "address_not_allowed"
        if reason is None:
            with self._lock:
                if len(self._associations) > MAX_ASSOCIATIONS:
                    reason, reject, kind = (f"more than {MAX_ASSOCIATIONS} associations at once", _REJECT_LIMIT,
                                            "too_many")
        if reason is None:
            return None
        log.warning("association_rejected", reason=reason, calling_ae=request.calling_ae, peer=request.address,
                    called_ae=request.called_ae)
        if self.events:
            self.events.association(kind)
        return reject

    def _refusal(self, calling: str, address: str) -> str | None:
        if self.titles and calling not in self.titles:
            return "calling AE title not on the allow-list"
        if self.networks:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return "client address not understood"
            if not any(ip in net for net in self.networks):
                return "client address not in an allowed network"
        return None

    def accepted(self, assoc: InboundAssociation) -> None:
        log.info("association_accepted", calling_ae=assoc.calling_ae, peer=assoc.address, contexts=len(assoc.contexts))
        if self.events:
            self.events.association("accepted")

    def ended(self, assoc: InboundAssociation, how: str) -> None:
        if assoc.established:
            # the peer's own end (some modalities abort instead of releasing) is no fault here
            event = log.info if how in ("released", "aborted by the peer") else log.warning
            event("association_ended", how=how, calling_ae=assoc.calling_ae, peer=assoc.address, stored=assoc.stored)
            if self.events:
                self.events.association("ended")
        with self._lock:
            self._associations.discard(assoc)

    def echo(self, assoc: InboundAssociation) -> int:
        log.info("echo", calling_ae=assoc.calling_ae, peer=assoc.address)
        return STATUS_SUCCESS

    def open_data_set(self, assoc: InboundAssociation, sop_class: str, sop_instance: str,
                      transfer_syntax: str) -> SpoolFile:
        return SpoolFile(self.spool, file_meta_bytes(sop_class, sop_instance, transfer_syntax, assoc.calling_ae))

    def store(self, assoc: InboundAssociation, spool_file: SpoolFile | None, sop_class: str, transfer_syntax: str,
              failure: OSError | None) -> int:
        """A C-STORE's data set has arrived (into spool_file, unless failure): keep it
        durably and answer 0x0000, or refuse it with 0xA700. Never raises."""
        started = time.perf_counter()
        calling, address = assoc.calling_ae, assoc.address
        spool_id = new_id()
        try:
            if failure is not None:
                raise failure
            assert spool_file is not None
            size = spool_file.size
            problem = self.spool.capacity_problem(self.node.max_spool_bytes, self.node.min_free_bytes, size,
                                                  self.reserved_bytes())
            if problem:
                spool_file.discard()
                self._refused("spool_full" if "spool" in problem else "disk_full", calling)
                log.warning("refused", reason=problem, status="0xA700", calling_ae=calling, peer=address)
                return STATUS_OUT_OF_RESOURCES
            spool_file.finish()
            final = self.spool.commit_incoming(Path(spool_file.name), spool_id)
        except OSError as exc:
            if spool_file is not None:
                spool_file.discard()
            kind, reason = self._write_failure(exc)
            self._refused(kind, calling)
            log.error("refused", reason=reason, status="0xA700", calling_ae=calling, peer=address, spool_id=spool_id)
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # noqa: BLE001 - the sender hears a refusal, the node goes on
            if spool_file is not None:
                spool_file.discard()
            self._refused("receive_failed", calling)
            log.error("refused", reason=f"receive failed: {type(exc).__name__}", status="0xA700",
                      calling_ae=calling, peer=address, spool_id=spool_id)
            return STATUS_OUT_OF_RESOURCES
        self.spool.add_usage(size)
        with self._lock:  # associations store concurrently
            self.received += 1
        if self.events:
            self.events.received(spool_id, calling, size)
        log.info("received", spool_id=spool_id, calling_ae=calling, peer=address, sop_class=sop_class,
                 transfer_syntax=transfer_syntax, bytes=size, ms=round((time.perf_counter() - started) * 1000, 2))
        try:
            self.on_received(final)
        except Exception as exc:  # noqa: BLE001 - it is spooled: resumed at the next start at worst
            log.error("notify_failed", spool_id=spool_id, error=type(exc).__name__)
        return STATUS_SUCCESS

    def _write_failure(self, exc: OSError) -> tuple[str, str]:
        """(kind, PHI-free reason) of a failed spool write; a full file system gets the
        recycled files back (``Spool.write_failed``)."""
        if self.spool.write_failed(exc):
            return "disk_full", "out of space"
        return "write_failed", f"write failed: {exc.strerror or type(exc).__name__}"

    def _refused(self, kind: str, calling_ae: str | None = None) -> None:
        with self._lock:
            self.refused += 1
        if self.events:
            self.events.refused(kind, calling_ae)
