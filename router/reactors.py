"""pynetdicom's reactor threads wake when there is work, instead of every millisecond.

Each association runs two threads that poll: the DUL reactor (the socket, PDUs to send)
and the association reactor (messages received, release and abort). Both sleep 1 ms
between empty polls, so an idle association cost ~14% of a core on each side of the node,
and a busy one kept waking between its PDUs. Here those two sleeps wait instead for what
ends them: data on the socket or a PDU to send (the DUL reactor), a message or an
indication received, or a paused reactor wanted (the association reactor); and a DUL
reactor being stopped is woken. The timers the loops also check (ARTIM, idle) and the
end of the other thread are seen within ``CEILING`` seconds.
Every other sleep in pynetdicom is left as it is. Sockets are watched with poll, not
select: select fails on descriptors of 1024 and more, where pynetdicom then took the
connection for closed.
"""

from __future__ import annotations

import collections
import os
import queue
import select
import ssl
import sys
import threading
import time
import weakref

from pynetdicom import association as association_module
from pynetdicom import dul as dul_module
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

#: Longest wait between two polls of an idle association (the 1 ms sleeps it replaces).
CEILING = 0.05

_DUL_LOOP = DULServiceProvider.run_reactor.__code__
_ASSOCIATION_LOOP = Association._run_reactor.__code__


class _Wakeups:
    """What wakes one association's two reactor threads."""

    def __init__(self) -> None:
        self.dul_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.association = threading.Event()
        self._poller = select.poll()
        self._polled_fd = -2  # the socket descriptor _poller watches (-1: none)

    def wake_dul(self) -> None:
        try:
            os.eventfd_write(self.dul_fd, 1)
        except OSError:
            pass  # closed: the association is gone

    def wake_association(self) -> None:
        self.association.set()

    def wait_dul(self, dul: DULServiceProvider) -> None:
        sock = getattr(dul.socket, "socket", None)
        fd = -1
        if sock is not None:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted data waiting: poll cannot see it
            fd = sock.fileno()
        try:
            if fd != self._polled_fd:  # connected (or closed) since the last wait
                self._poller = select.poll()
                self._poller.register(self.dul_fd, select.POLLIN)
                if fd >= 0:
                    self._poller.register(fd, select.POLLIN)
                self._polled_fd = fd
            self._poller.poll(CEILING * 1000)
            os.eventfd_read(self.dul_fd)
        except BlockingIOError:
            pass  # woken by the socket or the ceiling
        except (OSError, ValueError):
            time.sleep(0.001)  # a socket closed under us: poll as pynetdicom does

    def wait_association(self) -> None:
        self.association.wait(CEILING)
        self.association.clear()  # before the loop looks: a later put sets it again


class _WakingQueue:
    """What pynetdicom uses of ``queue.Queue`` (put, get, and the ``queue`` deque it peeks
    at), on a deque: put and a non-blocking get take no lock (queue.Queue's lock and
    conditions cost ~5 us per call, 30-40 calls per instance on each side). put wakes the
    reactor that waits for the queue, unless that reactor is the caller: the DUL loop goes
    on after its own puts, and waking itself cost it an empty round (select, eventfd)."""

    def __init__(self, wake=None, reactor: threading.Thread | None = None) -> None:
        self.queue: collections.deque = collections.deque()
        self._wake = wake
        self._reactor = reactor
        self._ready = threading.Condition(threading.Lock())
        self._waiters = 0

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        self.queue.append(item)
        if self._waiters:  # read after the append: a getter counted later sees the item
            with self._ready:
                self._ready.notify()
        if self._wake is not None and (self._reactor is None or threading.current_thread() is not self._reactor):
            self._wake()

    def get(self, block: bool = True, timeout: float | None = None):
        try:
            return self.queue.popleft()
        except IndexError:
            if not block:
                raise queue.Empty from None
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            self._waiters += 1
            try:
                while True:
                    try:
                        return self.queue.popleft()
                    except IndexError:
                        pass
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise queue.Empty
                    self._ready.wait(remaining)
            finally:
                self._waiters -= 1

    def empty(self) -> bool:
        return not self.queue

    def qsize(self) -> int:
        return len(self.queue)


class _WakingEvent(threading.Event):
    """``Association._reactor_checkpoint``: clearing it (to pause the reactor) wakes the reactor."""

    def __init__(self, wake) -> None:
        super().__init__()
        self._wake = wake

    def clear(self) -> None:
        super().clear()
        self._wake()


class _ReactorClock:
    """Stands in for the time module inside pynetdicom's dul and association modules."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        loop = sys._getframe(1).f_code
        if loop is _DUL_LOOP or loop is _ASSOCIATION_LOOP:
            thread = threading.current_thread()  # the DUL provider or the association
            assoc = getattr(thread, "assoc", None) if loop is _DUL_LOOP else thread
            wakeups = getattr(assoc, "_router_wakeups", None)
            if wakeups is not None:
                if loop is _DUL_LOOP:
                    wakeups.wait_dul(thread)
                else:
                    wakeups.wait_association()
                return
        time.sleep(seconds)


def socket_ready(self: AssociationSocket) -> bool:
    """``AssociationSocket.ready`` with poll instead of select: select fails on descriptors
    of 1024 and more (pynetdicom then takes the connection for closed), which a busy node
    reaches (the service allows 65,536)."""
    sock = self.socket
    if sock is None or self._is_connected is False:
        return False
    try:
        fd = sock.fileno()
        cached = getattr(self, "_router_poller", None)
        if cached is None or cached[0] != fd:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            cached = self._router_poller = (fd, poller)
        ready = bool(cached[1].poll(0))
    except (OSError, TimeoutError, ValueError):
        self.event_queue.put("Evt17")  # transport closed, as pynetdicom does
        return False
    if isinstance(sock, ssl.SSLSocket):
        return ready or bool(sock.pending())  # decrypted data poll cannot see
    return ready


def wake_reactor(assoc: Association) -> None:
    """Wake assoc's reactor now (e.g. to pause it before a send)."""
    wakeups = getattr(assoc, "_router_wakeups", None)
    if wakeups is not None:
        wakeups.wake_association()


def _wake_dul(dul: DULServiceProvider) -> None:
    wakeups = getattr(dul.assoc, "_router_wakeups", None)
    if wakeups is not None:
        wakeups.wake_dul()


def install() -> None:
    """Make the reactors of associations created from now on wait for work (once per process)."""
    if isinstance(dul_module.time, _ReactorClock):
        return
    original_init = Association.__init__

    def init(self: Association, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        # Nothing runs yet: the queues are empty and may be swapped for waking ones.
        wakeups = _Wakeups()
        weakref.finalize(self, os.close, wakeups.dul_fd)
        # The association's loop sleeps at the top of every round: its queues always wake it.
        self.dul.to_provider_queue = _WakingQueue(wakeups.wake_dul, self.dul)
        self.dul.event_queue = _WakingQueue(wakeups.wake_dul, self.dul)
        self.dul._recv_pdu = _WakingQueue()  # the DUL's own: put and taken by its thread
        self.dul.to_user_queue = _WakingQueue(wakeups.wake_association)
        self.dimse.msg_queue = _WakingQueue(wakeups.wake_association)
        checkpoint = _WakingEvent(wakeups.wake_association)
        if self._reactor_checkpoint.is_set():
            checkpoint.set()
        self._reactor_checkpoint = checkpoint
        self._router_wakeups = wakeups

    original_kill_dul = DULServiceProvider.kill_dul
    original_stop_dul = DULServiceProvider.stop_dul

    def kill_dul(self: DULServiceProvider) -> None:
        original_kill_dul(self)
        _wake_dul(self)

    def stop_dul(self: DULServiceProvider) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True  # as the original does, then waits for the thread to end
            _wake_dul(self)
        return original_stop_dul(self)

    Association.__init__ = init
    AssociationSocket.ready = property(socket_ready)
    DULServiceProvider.kill_dul = kill_dul
    DULServiceProvider.stop_dul = stop_dul
    clock = _ReactorClock()
    dul_module.time = clock
    association_module.time = clock
