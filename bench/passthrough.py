"""A bare pynetdicom pass-through forwarder: the baseline of ``python -m bench``.

Receives C-STOREs and forwards them unchanged to one destination: no spool (no fsync), no
de-identification, no routing, no retries. The handler streams each dataset to a temp
file (pynetdicom's ``STORE_RECV_CHUNKED_DATASET``), acknowledges it, and one thread sends
the files on a kept-open association, streamed from the file
(``STORE_SEND_CHUNKED_DATASET``). Prints ``acked UID TIME`` per instance, from which the
benchmark computes acknowledgement-to-delivery latency. TCP_NODELAY, 128 KiB PDUs, pynetdicom's log handlers off and a fix for pynetdicom's send
race (``install_checkpoint``), so that the comparison is about what the router adds
(durable spool, de-identification, routing, retries; its forwarders send on their own
thread, ``router.association``, not with pynetdicom's SCU). A send that
gets no response is resent on a new association.

    python -m bench.passthrough PORT DEST_HOST DEST_PORT DEST_AET
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from pynetdicom import AE, _config, build_context, evt
from pynetdicom.sop_class import Verification


class _Checkpoint:
    """A drop-in for ``Association._reactor_checkpoint`` that really parks the reactor.

    pynetdicom 3.0.4 pauses its reactor before a send by clearing an Event and polling
    ``_is_paused``; but ``_is_paused`` is set *before* the reactor waits on the Event, so
    the sender can see it set while the reactor is already past the wait, and the reactor
    then takes the C-STORE response off the queue ("Received unexpected C-STORE service
    message"): the send waits out the DIMSE timeout and the association aborts. Here
    ``clear()`` returns only once the reactor is blocked inside ``wait()``.
    """

    def __init__(self, assoc):
        self._assoc = assoc
        self._cond = threading.Condition()
        self._open = True
        self._parked = False

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False
            if threading.current_thread() is self._assoc:
                return  # the reactor itself: nothing to wait for
            deadline = time.monotonic() + 5.0
            while not self._parked and time.monotonic() < deadline:
                if not self._assoc.is_alive() or getattr(self._assoc, "_kill", False):
                    return
                self._cond.wait(0.05)

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if self._open:
                return True
            self._parked = True
            self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: self._open, timeout)
            finally:
                self._parked = False
            return self._open


def install_checkpoint(assoc) -> None:
    assoc._reactor_checkpoint = _Checkpoint(assoc)



def nodelay(event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def main(argv: list[str]) -> int:
    port, dest_host, dest_port, dest_aet = int(argv[0]), argv[1], int(argv[2]), argv[3]
    work = Path(tempfile.mkdtemp(prefix="passthrough-"))
    tempfile.tempdir = str(work)
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.LOG_HANDLER_LEVEL = "none"  # as the router: no per-PDU log formatting
    todo: queue.Queue = queue.Queue()

    def on_store(event) -> int:
        # pynetdicom deletes its temp file after the handler: keep it under another name.
        kept = work / f"{event.request.MessageID}-{threading.get_ident()}-{os.urandom(4).hex()}.dcm"
        os.link(event.dataset_path, kept)
        todo.put((str(event.request.AffectedSOPClassUID), str(event.context.transfer_syntax), kept))
        print(f"acked {event.request.AffectedSOPInstanceUID} {time.time():.6f}", flush=True)  # for latency
        return 0x0000

    def forward() -> None:
        ae = AE(ae_title="PASSTHROUGH")
        ae.maximum_pdu_size = 131072
        assoc, proposed = None, set()
        while True:
            item = todo.get()
            if item is None:
                break
            sop_class, syntax, path = item
            if assoc is None or not assoc.is_established or (sop_class, syntax) not in proposed:
                if assoc is not None and assoc.is_established:
                    assoc.release()
                proposed |= {(sop_class, syntax)}
                contexts = [build_context(s, [t]) for s, t in sorted(proposed)][:128]
                assoc = ae.associate(dest_host, dest_port, contexts=contexts, ae_title=dest_aet,
                                     max_pdu=131072, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
                install_checkpoint(assoc)
            try:
                status = assoc.send_c_store(path) if assoc.is_established else None
            except (RuntimeError, ValueError, OSError) as exc:
                print(f"send failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                status = None
            if not status:  # no association, no response (timeout or abort): reconnect and resend
                print("no response: resending on a new association", file=sys.stderr, flush=True)
                assoc = None
                time.sleep(0.2)
                todo.put(item)
                continue
            path.unlink()
        if assoc is not None and assoc.is_established:
            assoc.release()

    sender = threading.Thread(target=forward, daemon=True)
    sender.start()
    ae = AE(ae_title="PASSTHROUGH")
    ae.maximum_pdu_size = 131072
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", port), block=False,
                    evt_handlers=[(evt.EVT_CONN_OPEN, nodelay), (evt.EVT_C_STORE, on_store)])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    ae.shutdown()
    todo.put(None)
    sender.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
