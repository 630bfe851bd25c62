"""The de-identify stage: worker processes move instances from incoming/ to outgoing/<dest>/.

The main process owns the queue and keeps each worker process (``node.workers`` of them,
started from a fork server; each builds one ``profile.Deidentifier``) one incoming file
ahead of the one it computes (``PREFETCH``). A worker de-identifies the file into tmp/, routes it
(``Destination.from_ae_titles`` against the calling AE title kept in the file meta,
``Destination.modalities`` against the instance's modality; an empty filter matches all),
links it into every routed outgoing/<dest>/ (the last by a rename) and reports it.

The output is not fsynced: it is marked volatile (see router.spool) and the main process
hands it to the forwarders at once, keeping its original in incoming/. When every
destination has it (or has quarantined it) the original goes; an output still waiting
DURABLE_AFTER_SECONDS later is made durable (fsync, mark cleared, outgoing directory
fsynced) and then the original goes. Originals are removed in batches, once the audit store
holds their records. A crash before that finds the original in incoming/ and de-identifies
it again, to the same file under the same name; volatile outputs are deleted at start.
Most outputs are delivered within a second and never fsynced: the disk writes each CT
slice once, not twice.

An instance that cannot be de-identified (``InstanceRefused`` or any exception) goes to
quarantine/deidentify/ with a PHI-free reason (the exception type and where it was raised,
never its message: pydicom messages can quote header values). An instance no destination
wants goes to quarantine/unrouted/. A worker that dies (a codec segfault, the OOM killer)
or hangs does not lose its instance: the main process sees it, retries the instance once
on a new worker, quarantines it if that dies too, and restarts the worker.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import multiprocessing
import os
import queue
import selectors
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from router.config import Config, Destination
from router.decode import decoded_pixel_bytes
from router.log import get_logger
from router.spool import DEIDENTIFY_QUARANTINE, SUFFIX, UNROUTED_QUARANTINE, Spool, is_out_of_space, safe_name

log = get_logger("router.deidentify")

#: A worker busy longer than this on one instance (plus SECONDS_PER_MB of the memory it
#: needs, ``_Task.memory``: the pixel stage OCRs every frame, ~1 s per 640x480 frame on
#: one core) is considered hung and killed.
INSTANCE_TIMEOUT_SECONDS = 600.0
SECONDS_PER_MB = 4.0
#: A worker that dies twice on the same instance gets it quarantined.
MAX_CRASHES_PER_INSTANCE = 2
#: A worker ended by SIGKILL while the kernel killed nothing for want of memory was killed
#: from outside (an operator, a supervisor, a test; workers ignore SIGTERM): no fault of
#: its instance, which is retried without a crash counted, and quarantined only after
#: this many such kills.
MAX_KILLS_PER_INSTANCE = 5
#: Delay before retrying an instance whose processing failed for a transient reason
#: (an I/O error), and how many such failures quarantine it (a full file system counts
#: none: the instance waits for space).
TRANSIENT_RETRY_SECONDS = 10.0
MAX_TRANSIENT_FAILURES = 5
#: Files in incoming/ this recent are the receiver's to submit (``DeidStage.rescan``).
RESCAN_MIN_AGE_SECONDS = 5.0
#: Originals of delivered or durable outputs are removed in batches: at most this long, or
#: this many instances. Small ones: the files go to recycle/, and bursts larger than it
#: holds left new files to be created meanwhile (~20% of them with 64 per 0.2 s).
RETIRE_SECONDS = 0.02
RETIRE_BATCH = 16
#: An output not delivered this long after it was published is made durable.
DURABLE_AFTER_SECONDS = 2.0
#: Instances sent to a worker ahead of its answer about the one it computes: it takes the
#: next from its pipe at once instead of waiting for the dispatcher (which shares a busy
#: process with the receiving threads: ~2 ms per instance with 4 senders here).
PREFETCH = 2
#: A worker holds an instance in memory (compressed pixel data also decoded and encoded
#: again, ``_Task.memory``): one needing more than this goes to a worker only while no
#: other worker holds such a one (the next smaller instances go ahead meanwhile), so that
#: several very large multi-frames never sit in memory side by side.
LARGE_INSTANCE_BYTES = 256 * 1024 * 1024
#: How far past a large instance the dispatcher looks for a smaller one.
LOOK_PAST = 64


@dataclass(frozen=True)
class Routed:
    """An outgoing file for one destination, with what the forwarders need to know."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_pseudonym: str
    bytes: int


def routes_to(dest: Destination, source_ae_title: str, modality: str) -> bool:
    if dest.from_ae_titles and (source_ae_title or "").strip() not in {t.strip() for t in dest.from_ae_titles}:
        return False
    if dest.modalities and (modality or "").strip().upper() not in {m.upper() for m in dest.modalities}:
        return False
    return True


def describe_exception(exc: BaseException) -> str:
    """Exception type and where it was raised: PHI-free (never the message)."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ in ("builtins", None) else f"{kind.__module__}.{kind.__qualname__}"
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    where = ""
    if frames:
        last = frames[-1]
        where = f" at {Path(last.filename).name}:{last.lineno} in {last.name}"
        ours = [f for f in frames if f"{os.sep}router{os.sep}" in f.filename]
        if ours and ours[-1] is not last:
            where += f" (via {Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name})"
    return f"{name}{where}"


def process_alive(process) -> bool:
    """Is this child process (started through the forkserver) still running?

    ``Process.is_alive()`` asks the forkserver, which reports exit code 255 for every child
    once it has itself died (killed, or by the OOM killer): the children may well run on.
    The process table says whether the child does."""
    if process.pid is None:
        return False
    try:
        os.kill(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process by now: not ours to judge, taken as running
    return True


def kill_process(process) -> None:
    """SIGKILL a child and reap it (``Process.kill`` does nothing once the forkserver said 255)."""
    if process_alive(process):
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.join(timeout=5)


def configure_logging(config: Config) -> None:
    """The node's logging set-up, in the main process and in every worker."""
    from router import log as log_module

    log_module.configure(config.logging)


# ------------------------------------------------------------------------------ worker
def worker_main(conn, config: Config, secret: bytes, spool_root: str, index: int) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the main process's "look again" (a closed terminal's too)
    configure_logging(config)
    worker_log = get_logger("router.deidentify").bind(worker=index)
    spool = Spool(spool_root, [d.name for d in config.destinations], config.node.keep_delivered)
    try:
        from router.profile import Deidentifier

        deid = Deidentifier(config.deid, secret)
        deid.keep_originals = config.audit.crosswalk
        deid.keep_pixel_text = config.audit.pixel_text
        deid.start()  # loads and self-tests the OCR models: fail here, not on the first instance
    except Exception as exc:
        worker_log.error("worker_init_failed", error=describe_exception(exc))
        conn.send(("init_failed", describe_exception(exc)))
        return
    volatile = spool.marks_volatile()
    if not _send(conn, ("ready", os.getpid())):
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the main process is gone
        if message is None:
            return
        spool_id, path = message
        try:
            reply = process_one(deid, spool, config, spool_id, Path(path), worker_log, volatile)
        except Exception as exc:
            # Quarantining or linking failed (e.g. the disk is full): not the instance's
            # fault; it stays in incoming/ and is tried again later.
            _unlink(_output_path(spool, spool_id))
            worker_log.error("deidentify_failed", spool_id=spool_id, error=describe_exception(exc))
            full = isinstance(exc, OSError) and is_out_of_space(exc)
            reply = ("transient", spool_id, describe_exception(exc), full)
        if not _send(conn, reply):
            return


def _send(conn, reply: tuple) -> bool:
    """Send to the main process; False if it is gone."""
    try:
        conn.send(reply)
    except (EOFError, OSError):
        return False
    return True


def _publish(spool: Spool, src: Path, dst: Path, name: str, routes: list[str], volatile: bool) -> int:
    """Link an output into every routed outgoing/<dest>/ (the last by a rename); returns
    its inode, which tells it from an output of the same name it replaces (a re-send).

    Not fsynced: marked volatile instead (``Spool.make_volatile``), its original stays in
    incoming/ until it is delivered or made durable (see DeidStage). Where the mark cannot
    be set (``Spool.marks_volatile``), fsynced here.
    """
    # The outgoing file carries the receive time as its mtime: the forwarder measures
    # latency from it, and sends oldest first after a restart.
    received = os.stat(src)
    os.utime(dst, ns=(received.st_atime_ns, received.st_mtime_ns))
    if volatile:
        spool.make_volatile(dst)
    else:
        spool.make_durable(dst)
    inode = os.stat(dst).st_ino
    *linked, last = routes
    for dest in linked:
        spool.link_outgoing(dst, dest, name)
    spool.move_outgoing(dst, last, name)
    return inode


def _output_path(spool: Spool, spool_id: str) -> Path:
    """Where a worker writes an instance's output in tmp/ (the same for every attempt)."""
    return spool.tmp / f"{spool_id}.deid{SUFFIX}"


def process_one(deid, spool: Spool, config: Config, spool_id: str, src: Path, worker_log,
                volatile: bool) -> tuple:
    """De-identify one incoming file into outgoing/<dest>/ for each routed destination
    (volatile: see ``_publish``), or quarantine it (the reply says why)."""
    from router.profile import InstanceRefused

    started = time.perf_counter()
    dst = _output_path(spool, spool_id)
    try:
        # dst, in tmp/, is this instance's own until _publish links it: written in place
        result = deid.process_file(src, dst, durable=False, reuse=spool.reuse, atomic=False)
    except InstanceRefused as exc:
        return _quarantine(spool, src, dst, spool_id, exc.reason, "InstanceRefused", worker_log)
    except OSError as exc:
        # A real I/O failure (disk full, EIO) is the node's problem, not the instance's:
        # the main process retries it later (and quarantines it if that keeps failing).
        _unlink(dst)
        spool.write_failed(exc)
        raise
    except Exception as exc:
        return _quarantine(spool, src, dst, spool_id, "de-identification failed: " + describe_exception(exc),
                           type(exc).__name__, worker_log)
    deid_ms = (time.perf_counter() - started) * 1000
    name = safe_name(result.sop_instance_uid) + SUFFIX
    routes = [d.name for d in config.destinations if routes_to(d, result.source_ae_title, result.modality)]
    fields = dict(spool_id=spool_id, sop_instance_uid=result.sop_instance_uid, patient=result.patient_pseudonym,
                  modality=result.modality, sop_class=result.sop_class_uid, transfer_syntax=result.transfer_syntax_uid,
                  bytes_in=result.bytes_in, bytes_out=result.bytes_out)
    if not routes:
        reason = "no destination matches this instance (source AE title / modality filters)"
        spool.quarantine(dst, UNROUTED_QUARANTINE, name, reason, stage="route", spool_id=spool_id,
                         source_ae_title=result.source_ae_title, modality=result.modality,
                         sop_instance_uid=result.sop_instance_uid)
        _unlink(src)
        worker_log.warning("quarantined", stage="route", where=UNROUTED_QUARANTINE, reason=reason,
                           source_ae=result.source_ae_title, **fields)
        return ("unrouted", spool_id, reason)
    info = dict(name=name, routes=routes, sop_class_uid=result.sop_class_uid,
                sop_instance_uid=result.sop_instance_uid, study_instance_uid=result.study_instance_uid,
                series_instance_uid=result.series_instance_uid, transfer_syntax_uid=result.transfer_syntax_uid,
                patient_pseudonym=result.patient_pseudonym, bytes_in=result.bytes_in, bytes_out=result.bytes_out,
                regions=result.pixel_regions_masked, source_ae=result.source_ae_title,
                crosswalk=result.crosswalk, pixel_text=result.pixel_text)
    info["inode"] = _publish(spool, src, dst, name, routes, volatile)
    seconds = time.perf_counter() - started
    worker_log.info("deidentified", destinations=routes, ms=round(seconds * 1000, 2), deid_ms=round(deid_ms, 2),
                    **fields)
    return ("ok", spool_id, {**info, "seconds": seconds})


def _quarantine(spool: Spool, src: Path, dst: Path, spool_id: str, reason: str, kind: str, worker_log) -> tuple:
    _unlink(dst)
    spool.quarantine(src, DEIDENTIFY_QUARANTINE, spool_id + SUFFIX, reason, stage="deidentify",
                     spool_id=spool_id, exception=kind, attempts=1)
    worker_log.warning("quarantined", stage="deidentify", where=DEIDENTIFY_QUARANTINE, spool_id=spool_id,
                       reason=reason, exception=kind)
    return ("quarantined", spool_id, reason)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# -------------------------------------------------------------------------- main side
class StartError(RuntimeError):
    pass


@dataclass
class _Task:
    spool_id: str
    path: Path
    size: int  # the input's size
    decoded: int = 0  # its compressed pixel data's decoded size (``decoded_pixel_bytes``)
    started: float = 0.0  # when the worker began it (it computes its tasks in order)

    @property
    def memory(self) -> int:
        """What the worker holds for it at most: the file, and compressed pixel data
        decoded (encoded again a frame at a time while the output is written)."""
        return self.size + self.decoded

    @property
    def output(self) -> int:
        """About what its output takes: the input's size, or masked compressed pixel data
        encoded again losslessly (RLE: about their decoded size)."""
        return max(self.size, self.decoded)


class _Worker:
    def __init__(self, index: int, process, conn):
        self.index = index
        self.process = process
        self.conn = conn
        self.ready = False
        #: Sent, not yet answered, in the worker's order: the first is being computed.
        self.tasks: collections.deque[_Task] = collections.deque()
        self.dead = False
        #: The forkserver died: its exit-status pipe (the sentinel) says nothing more, the
        #: worker's own pipe tells when it ends.
        self.sentinel_lost = False

    def held(self) -> int:
        """Instances this worker holds."""
        return len(self.tasks)

    def held_bytes(self) -> int:
        return sum(task.output for task in self.tasks)

    def deadline(self) -> float:
        """When the instance being computed counts as hung."""
        task = self.tasks[0]
        return task.started + INSTANCE_TIMEOUT_SECONDS + SECONDS_PER_MB * task.memory / 1e6

    def next_started(self) -> None:
        """The first task was answered: the worker begins the next one now."""
        self.tasks.popleft()
        if self.tasks:
            self.tasks[0].started = time.monotonic()


@dataclass
class _Held:
    """A de-identified instance whose original stays in incoming/ until each of its
    outputs is delivered (or quarantined) or durable."""

    path: Path  # the original
    size: int
    name: str  # of its outputs in outgoing/<dest>/
    inode: int  # of its outputs (one file, linked once per destination)
    waiting: set[str]  # destinations whose output is neither delivered nor durable


class _Waiter:
    """``multiprocessing.connection.wait`` without a new selector each time: the dispatcher
    waits a few times per instance on the same pipes and sentinels (~20 us saved each)."""

    def __init__(self) -> None:
        self._selector: selectors.BaseSelector | None = None
        self._objects: tuple = ()

    def wait(self, objects: list, timeout: float) -> list:
        if tuple(objects) != self._objects:  # a worker died or was restarted
            self.close()
            self._selector = selectors.DefaultSelector()
            for item in objects:
                self._selector.register(item, selectors.EVENT_READ)
            self._objects = tuple(objects)
        return [key.fileobj for key, _events in self._selector.select(timeout)]

    def close(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector, self._objects = None, ()


class DeidStage:
    """Feeds incoming files to worker processes; calls ``on_routed(dest, Routed)``."""

    def __init__(self, config: Config, secret: bytes, spool: Spool,
                 on_routed: Callable[[str, Routed], None], workers: int | None = None, events=None):
        self.events = events  # router.node.NodeEvents: what happened to each instance
        self.config = config
        self.secret = secret
        self.spool = spool
        self.on_routed = on_routed
        self.count = workers or config.node.workers
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["router.deidentify", "router.profile"])
        self._lock = threading.Lock()
        self._queue: collections.deque[Path] = collections.deque()
        self._known: set[Path] = set()
        #: Queued files the dispatcher looked past, measured (``_next_for``).
        self._looked_past: dict[Path, _Task] = {}
        self._delayed: list[tuple[float, str, Path]] = []
        self._crashes: dict[Path, int] = {}
        self._kills: dict[Path, int] = {}  # killed from outside (MAX_KILLS_PER_INSTANCE)
        self._oom_kills = oom_kills()
        self._transient: dict[Path, int] = {}
        self._workers: list[_Worker] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._feeding = True
        self._closed = False
        self._thread: threading.Thread | None = None
        self._restart_after: dict[int, float] = {}
        #: De-identified instances whose originals wait for their outputs, oldest first
        #: (by spool id), the same by output ((destination, file name) -> spool ids), and
        #: when each is due to be made durable.
        self._held: dict[str, _Held] = {}
        self._by_output: dict[tuple[str, str, int], list[str]] = {}
        self._due: collections.deque[tuple[float, str]] = collections.deque()
        #: Settled instances whose originals are removed in the next batch.
        self._retire: list[_Held] = []
        self._retire_since = 0.0
        self._promotions: queue.SimpleQueue[list[tuple[str, str, list[str]]] | None] = queue.SimpleQueue()
        self._promoter: threading.Thread | None = None
        self._idle_deaths: dict[int, int] = {}
        self._waiter = _Waiter()
        self.stats = collections.Counter()

    # -------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 120.0) -> None:
        """Start the workers and wait until each has built its Deidentifier."""
        for index in range(self.count):
            self._workers.append(self._spawn(index))
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            remaining = max(0.1, deadline - time.monotonic())
            if not worker.conn.poll(remaining):
                self._kill_all()
                raise StartError(f"worker {worker.index} did not start within {timeout:.0f} s")
            try:
                message = worker.conn.recv()
            except EOFError:
                self._kill_all()
                raise StartError(f"worker {worker.index} exited during start (exit code {worker.process.exitcode})")
            if message[0] != "ready":
                self._kill_all()
                raise StartError(f"worker {worker.index} could not build the de-identifier: {message[1]}")
            worker.ready = True
        self._thread = threading.Thread(target=self._loop, name="deid-dispatch", daemon=True)
        self._thread.start()
        self._promoter = threading.Thread(target=self._promote_loop, name="deid-durable", daemon=True)
        self._promoter.start()
        log.info("workers_started", workers=self.count, pids=[w.process.pid for w in self._workers])

    def _spawn(self, index: int) -> _Worker:
        parent, child = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(
            target=worker_main, name=f"deid-worker-{index}",
            args=(child, self.config, self.secret, str(self.spool.root), index), daemon=True,
        )
        process.start()
        child.close()
        return _Worker(index, process, parent)

    def in_flight_bytes(self) -> int:
        """Input bytes of the instances now in workers (each writes its output first)."""
        return sum(w.held_bytes() for w in self._workers)

    def submit(self, path: Path) -> None:
        with self._lock:
            if path in self._known:
                return
            self._known.add(path)
            self._queue.append(path)
        self._wake()

    def resume(self, paths: list[Path]) -> int:
        for path in paths:
            self.submit(path)
        return len(paths)

    def rescan(self) -> int:
        """Submit what incoming/ holds that this stage does not know (originals an operator
        moved back there, say with ``deid-router requeue``); only while nothing waits to be
        sent to a worker, since a backlog is all known. Every path stays known from its
        submission until its original leaves incoming/, so nothing is submitted twice; a file
        younger than RESCAN_MIN_AGE_SECONDS is left to the receiver, which submits it right
        after committing it. Returns how many were new."""
        with self._lock:
            if self._queue:
                return 0
        new = 0
        for path in self.spool.list_incoming():
            with self._lock:
                if path in self._known:
                    continue
            try:  # after the check: an original leaves incoming/ before it is forgotten
                if os.stat(path).st_mtime > time.time() - RESCAN_MIN_AGE_SECONDS:
                    continue  # just received: the receiver submits it (put back ones keep their age)
            except FileNotFoundError:
                continue
            self.submit(path)
            new += 1
        return new

    def alive(self) -> bool:
        """Is at least one worker process running?"""
        return any(not w.dead and process_alive(w.process) for w in self._workers)

    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + len(self._delayed) + sum(w.held() for w in self._workers)

    def stop(self, timeout: float = 30.0) -> int:
        """Stop feeding, let the workers finish what they hold (bounded), stop them.

        Returns how many instances were left in incoming/ (resumed at the next start).
        """
        self._feeding = False
        self._wake()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = [w for w in self._workers if w.held() and not w.dead]
            if not busy:
                break
            time.sleep(0.02)
        self._closed = True
        self._wake()
        if self._thread:
            self._thread.join(timeout=5)
        if self._promoter:
            self._promotions.put(None)
            self._promoter.join(timeout=max(0.1, deadline - time.monotonic()))
        with self._lock:  # what is still waiting for a destination is made durable now
            waiting = [(spool_id, held.name, sorted(held.waiting)) for spool_id, held in self._held.items()]
        if waiting:
            self._promote(waiting)
        if self._retire:
            self._retire_batch()
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=max(0.1, deadline - time.monotonic()))
            while process_alive(worker.process) and time.monotonic() < deadline:  # the forkserver died
                time.sleep(0.05)
        self._kill_all()
        return self.pending()

    def _kill_all(self) -> None:
        for worker in self._workers:
            kill_process(worker.process)

    # ----------------------------------------------------------- dispatching
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def _loop(self) -> None:
        while not self._closed:
            try:
                self._step()
            except Exception as exc:  # keep dispatching whatever happens
                log.error("dispatch_error", error=describe_exception(exc))
                self._waiter.close()
                time.sleep(0.5)
        self._waiter.close()

    def _step(self) -> None:
        now = time.monotonic()
        with self._lock:
            while self._delayed and self._delayed[0][0] <= now:
                _due, _id, path = heapq.heappop(self._delayed)
                self._queue.appendleft(path)
        if self._feeding:
            self._assign()
        waitables = [self._wake_r]
        for worker in self._workers:
            if not worker.dead:
                waitables += [worker.conn] if worker.sentinel_lost else [worker.conn, worker.process.sentinel]
        timeout = 1.0
        if self._delayed:
            timeout = min(timeout, max(0.0, self._delayed[0][0] - now))
        if self._restart_after:
            timeout = min(timeout, max(0.0, min(self._restart_after.values()) - now))
        if self._retire or self._held:  # settled by the forwarders' events meanwhile
            timeout = min(timeout, RETIRE_SECONDS)
        for ready in self._waiter.wait(waitables, timeout):
            if ready is self._wake_r:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                continue
            for worker in self._workers:
                if ready is worker.conn and not worker.dead:
                    self._receive(worker)
                elif ready == worker.process.sentinel and not worker.dead and not worker.conn.poll():
                    if process_alive(worker.process):  # the forkserver died, not the worker
                        worker.sentinel_lost = True
                        log.warning("forkserver_died", worker=worker.index, note="the worker goes on")
                    else:
                        self._died(worker)
        now = time.monotonic()
        for worker in self._workers:
            if worker.tasks and not worker.dead and now > worker.deadline():
                log.error("worker_hung", worker=worker.index, spool_id=worker.tasks[0].spool_id,
                          seconds=round(now - worker.tasks[0].started))
                kill_process(worker.process)
                self._died(worker, hung=True)
        for index, when in list(self._restart_after.items()):
            if when <= now and not self._closed:
                del self._restart_after[index]
                self._restart(index)
        self._promote_due(now)
        if self._retire and (len(self._retire) >= RETIRE_BATCH or now - self._retire_since >= RETIRE_SECONDS):
            self._retire_batch()

    # ------------------------------------------------------- outputs and originals
    def settled(self, dest: str, name: str, inode: int) -> None:
        """outgoing/<dest>/<name>, that file (inode), was delivered (or quarantined): its
        originals may go once their other outputs have too (not those of a newer file of
        the same name). Called by the thread reading a forwarder's events."""
        with self._lock:
            for spool_id in self._by_output.pop((dest, name, inode), []):
                self._settle(spool_id, dest)

    def _hold(self, spool_id: str, path: Path, size: int, name: str, inode: int, routes: list[str]) -> None:
        with self._lock:
            self._held[spool_id] = _Held(path, size, name, inode, set(routes))
            for dest in routes:
                self._by_output.setdefault((dest, name, inode), []).append(spool_id)
            self._due.append((time.monotonic() + DURABLE_AFTER_SECONDS, spool_id))

    def _settle(self, spool_id: str, dest: str) -> None:
        """(self._lock held) One output of a held instance needs its original no more."""
        held = self._held.get(spool_id)
        if held is None or dest not in held.waiting:
            return
        held.waiting.discard(dest)
        key = (dest, held.name, held.inode)
        others = self._by_output.get(key)
        if others and spool_id in others:
            others.remove(spool_id)
            if not others:
                del self._by_output[key]
        if not held.waiting:
            del self._held[spool_id]
            if not self._retire:
                self._retire_since = time.monotonic()
            self._retire.append(held)

    def _promote_due(self, now: float) -> None:
        """Hand outputs still waiting DURABLE_AFTER_SECONDS after publication to the thread
        that makes them durable."""
        due = []
        with self._lock:
            while self._due and self._due[0][0] <= now:
                _when, spool_id = self._due.popleft()
                held = self._held.get(spool_id)
                if held is not None:
                    due.append((spool_id, held.name, sorted(held.waiting)))
        if due:
            self._promotions.put(due)

    def _promote_loop(self) -> None:
        while (batch := self._promotions.get()) is not None:
            self._promote(batch)

    def _promote(self, batch: list[tuple[str, str, list[str]]]) -> None:
        """Make a batch of outputs durable (each file, then their outgoing directories);
        their originals may go then."""
        try:
            for _spool_id, name, dests in batch:
                for dest in dests:
                    try:
                        self.spool.make_durable(self.spool.outgoing(dest) / name)
                    except FileNotFoundError:
                        pass  # delivered meanwhile (quarantined ones are made durable there)
            self.spool.sync_outgoing(sorted({dest for _spool_id, _name, dests in batch for dest in dests}))
        except OSError as exc:
            log.error("sync_failed", error=describe_exception(exc), action="incoming files kept, tried again")
            with self._lock:
                retry = time.monotonic() + DURABLE_AFTER_SECONDS
                self._due.extendleft((retry, spool_id) for spool_id, _name, _dests in reversed(batch))
            return
        with self._lock:
            for spool_id, _name, dests in batch:
                for dest in dests:
                    self._settle(spool_id, dest)

    def _retire_batch(self) -> None:
        """Remove the originals of settled instances once the audit store holds their
        records (the crosswalk: see router.audit)."""
        with self._lock:
            batch, self._retire = self._retire, []

        def remove_originals() -> None:
            self.spool.recycle_all([(held.path, held.size) for held in batch])
            self.spool.add_usage(-sum(held.size for held in batch))
            for held in batch:
                self._forget(held.path)

        if self.events:
            self.events.after_recorded(remove_originals)
        else:
            remove_originals()

    def _assign(self) -> None:
        """Idle workers first, then one more for each (PREFETCH): two instances never wait
        in one worker while another is idle."""
        for depth in range(PREFETCH):
            for worker in self._workers:
                if worker.dead or not worker.ready or len(worker.tasks) != depth:
                    continue
                with self._lock:
                    if not self._queue:
                        return
                    taken = self._next_for(worker)
                if taken is None:
                    continue  # only large instances wait, and another worker holds one
                taken.started = time.monotonic()
                worker.tasks.append(taken)
                try:
                    worker.conn.send((taken.spool_id, str(taken.path)))
                except (OSError, ValueError):
                    self._died(worker)

    def _next_for(self, worker: _Worker) -> _Task | None:
        """Take the next queued instance this worker may have (self._lock held): the head,
        unless it needs much memory while another worker holds one that does."""
        large_elsewhere = any(task.memory > LARGE_INSTANCE_BYTES for other in self._workers
                              if other is not worker and not other.dead for task in other.tasks)
        for index, path in enumerate(itertools.islice(self._queue, LOOK_PAST if large_elsewhere else 1)):
            task = self._looked_past.pop(path, None) or self._task(path)
            if not large_elsewhere or task.memory <= LARGE_INSTANCE_BYTES:
                del self._queue[index]
                return task
            self._looked_past[path] = task  # not read again next time
        return None

    @staticmethod
    def _task(path: Path) -> _Task:
        spool_id = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.stem
        try:
            size = path.stat().st_size
        except OSError:
            return _Task(spool_id, path, 0)  # gone or unreadable: the worker says so
        return _Task(spool_id, path, size, decoded_pixel_bytes(path, size))

    def _receive(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._died(worker)
            return
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            self._idle_deaths.pop(worker.index, None)
            log.info("worker_restarted", worker=worker.index, pid=message[1])
            return
        if kind == "init_failed":
            log.error("worker_init_failed", worker=worker.index, error=message[1])
            return  # it exits; _died schedules a delayed restart
        spool_id = message[1]
        if not worker.tasks or worker.tasks[0].spool_id != spool_id:
            return
        task = worker.tasks[0]
        path = task.path
        worker.next_started()
        with self._lock:
            self._crashes.pop(path, None)
            self._kills.pop(path, None)
            if kind != "transient":
                self._transient.pop(path, None)
        if kind == "ok":
            info = message[2]
            self.stats["deidentified"] += 1
            self.spool.add_usage(info["bytes_out"])
            self._hold(spool_id, path, task.size, info["name"], info["inode"], info["routes"])
            for dest in info["routes"]:
                routed = Routed(
                    path=self.spool.outgoing(dest) / info["name"], sop_class_uid=info["sop_class_uid"],
                    sop_instance_uid=info["sop_instance_uid"], study_instance_uid=info["study_instance_uid"],
                    series_instance_uid=info["series_instance_uid"],
                    transfer_syntax_uid=info["transfer_syntax_uid"],
                    patient_pseudonym=info["patient_pseudonym"], bytes=info["bytes_out"],
                )
                try:
                    self.on_routed(dest, routed)
                except Exception as exc:
                    log.error("notify_failed", destination=dest, error=describe_exception(exc))
            if self.events:
                self.events.deidentified(spool_id, info)
        elif kind in ("quarantined", "unrouted"):
            self.stats[kind] += 1
            self._forget(path)
            if self.events:
                where = DEIDENTIFY_QUARANTINE if kind == "quarantined" else UNROUTED_QUARANTINE
                self.events.quarantined("deidentify" if kind == "quarantined" else "route", where, message[2],
                                        spool_id=spool_id)
        elif kind == "transient" and not path.exists():
            # Nothing left to de-identify (removed from incoming/ by hand): retrying would
            # fail every 10 s for ever.
            log.error("incoming_gone", spool_id=spool_id, error=message[2])
            with self._lock:
                self._transient.pop(path, None)
            self._forget(path)
        elif kind == "transient":
            self.stats["transient"] += 1
            full = message[3]  # the spool's file system is full: its state, not the instance's
            with self._lock:
                failures = self._transient.get(path, 0) + (0 if full else 1)
                self._transient[path] = failures
            if not full and failures >= MAX_TRANSIENT_FAILURES and path.exists():
                reason = f"de-identification failed {failures} times with an I/O error: {message[2]}"
                self._quarantine_here(path, spool_id, reason, failures, "OSError")
                with self._lock:
                    self._transient.pop(path, None)
                self._forget(path)
            else:
                log.warning("deidentify_waiting_for_space" if full else "deidentify_retry", spool_id=spool_id,
                            error=message[2], attempt=failures, retry_in_s=TRANSIENT_RETRY_SECONDS)
                with self._lock:
                    heapq.heappush(self._delayed, (time.monotonic() + TRANSIENT_RETRY_SECONDS, spool_id, path))

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._known.discard(path)

    def _died(self, worker: _Worker, hung: bool = False) -> None:
        if worker.dead:
            return
        worker.dead = True
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        how = "hung (killed)" if hung else _exit_description(code)
        try:
            worker.conn.close()
        except OSError:
            pass
        task = worker.tasks.popleft() if worker.tasks else None
        with self._lock:
            for waiting in reversed(worker.tasks):  # sent, not begun: no attempt spent
                self._queue.appendleft(waiting.path)
        worker.tasks.clear()
        ooms, self._oom_kills = self._oom_kills, oom_kills()
        from_outside = not hung and code == -signal.SIGKILL and ooms is not None and ooms == self._oom_kills
        if task is not None:
            spool_id, path = task.spool_id, task.path
            counts, limit = (self._kills, MAX_KILLS_PER_INSTANCE) if from_outside else \
                (self._crashes, MAX_CRASHES_PER_INSTANCE)
            with self._lock:
                times = counts.get(path, 0) + 1
                counts[path] = times
            _unlink(_output_path(self.spool, spool_id))
            if not path.exists():
                self._forget(path)  # it had finished, only the report was lost
            elif times >= limit:
                cause = "was killed from outside (signal SIGKILL)" if from_outside else how
                reason = f"the worker process {cause} while de-identifying this instance ({times} times)"
                self._quarantine_here(path, spool_id, reason, times, "WorkerDied")
                with self._lock:
                    self._crashes.pop(path, None)
                    self._kills.pop(path, None)
                self._forget(path)
            else:
                log.warning("worker_died", worker=worker.index, exit=how, spool_id=spool_id,
                            action="retrying the instance on a new worker" + (
                                " (killed from outside: not counted against the instance)" if from_outside else ""))
                with self._lock:
                    self._queue.appendleft(path)
        else:
            log.warning("worker_died", worker=worker.index, exit=how)
        if self._closed or not self._feeding:
            return
        deaths = self._idle_deaths.get(worker.index, 0) + (0 if task else 1)
        self._idle_deaths[worker.index] = deaths
        delay = 0.0 if task else min(30.0, 0.5 * 2 ** min(deaths, 6))
        self._restart_after[worker.index] = time.monotonic() + delay

    def _quarantine_here(self, path: Path, spool_id: str, reason: str, attempts: int, kind: str) -> None:
        try:
            self.spool.quarantine(path, DEIDENTIFY_QUARANTINE, spool_id + SUFFIX, reason, stage="deidentify",
                                  spool_id=spool_id, attempts=attempts, exception=kind)
        except OSError as exc:
            log.error("quarantine_failed", spool_id=spool_id, error=describe_exception(exc))
            return
        self.stats["quarantined"] += 1
        if self.events:
            self.events.quarantined("deidentify", DEIDENTIFY_QUARANTINE, reason, spool_id=spool_id)
        log.warning("quarantined", stage="deidentify", where=DEIDENTIFY_QUARANTINE, spool_id=spool_id,
                    reason=reason, attempts=attempts, exception=kind)

    def _restart(self, index: int) -> None:
        old = self._workers[index]
        if not old.dead:
            return
        new = self._spawn(index)
        self._workers[index] = new
        self.stats["worker_restarts"] += 1


def oom_kills() -> int | None:
    """How many processes the kernel has killed for want of memory since boot (/proc/vmstat,
    Linux 4.13+; a memory cgroup's kills included), None if unknown."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _exit_description(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            return f"died of signal {signal.Signals(-code).name}"
        except ValueError:
            return f"died of signal {-code}"
    return f"exited with code {code}"
