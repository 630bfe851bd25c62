"""The durable on-disk spool: one directory per stage, every move an atomic rename.

Layout under ``node.spool_dir`` (one file system, so renames and hard links are atomic)::

    tmp/                      partial writes; never acknowledged; emptied at start
    incoming/<id>.dcm         received and acknowledged, not yet de-identified
    outgoing/<dest>/<uid>.dcm de-identified, waiting for delivery (a hard link per destination)
    done/<dest>/<uid>.dcm     delivered (only with node.keep_delivered)
    quarantine/<where>/<name>.dcm + <name>.reason.json
                              instances that could not be de-identified ("deidentify"),
                              routed nowhere ("unrouted") or delivered ("<dest>")
    recycle/<bytes>-<id>      files no stage needs any more, kept to be written over
    node.lock                 held by the running node (``Spool.lock``)

``<id>`` is 32 hex digits (a random prefix per process and a scrambled counter, see
``new_id``), ``<uid>`` the NEW (pseudonymous) SOP Instance UID: no original identifier ever
appears in a file name. A received file is written completely and fsynced in ``tmp/`` and
only then renamed into incoming/, and the directory is fsynced, so a crash at any moment
leaves every acknowledged instance in at least one stage.

A de-identified file is not fsynced when it is linked into outgoing/: it is *volatile*
(``VOLATILE_MODE``: the sticky bit marks it) and its original stays in incoming/ until the
file is delivered, or is made durable (``make_durable``: fsync, mark cleared, fsync) if it
waits longer. Most are delivered within a second and never written to disk. At start,
before anything is sent, volatile files are deleted (``drop_volatile``; after a power loss
one may hold anything, even the earlier bytes of a recycled file) and made again from their
originals. A crash can leave an instance in two stages (say incoming/ and outgoing/):
de-identification is deterministic (keyed pseudonyms), so processing it again yields the
same file under the same name, and the duplicate is harmless.

Files leave a stage by a rename into recycle/ (a few, up to RECYCLE_BYTES) or are deleted.
A new file in tmp/ is, where one is there, a recycled file written over from its start and
cut to its new length: writing over pages the kernel already caches costs ~0.2 ms per MB
here, against 0.4-0.9 ms per MB to fill new pages and later delete them, and an fsync of
blocks already allocated has less to commit. ``reusable`` cuts and checks
the length, so nothing of the file's previous content can follow the new one.

Reason files hold a PHI-free reason (exception types, status codes, stage, attempts),
never a header value.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import json
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

TMP = "tmp"
INCOMING = "incoming"
OUTGOING = "outgoing"
DONE = "done"
QUARANTINE = "quarantine"
RECYCLE = "recycle"
#: What recycle/ may hold: files, bytes, and the largest file kept. recycle() and reuse()
#: list the folder (four times per instance): 32 names take ~20 us to scan, 128 took ~80.
#: 32 is still several times what is in flight between the stages at once.
RECYCLE_FILES = 32
RECYCLE_BYTES = 96 * 1024 * 1024
RECYCLE_MAX_FILE_BYTES = 32 * 1024 * 1024

#: Quarantine folders used by stages (destination names must not collide with them).
DEIDENTIFY_QUARANTINE = "deidentify"
UNROUTED_QUARANTINE = "unrouted"
RESERVED_NAMES = frozenset({DEIDENTIFY_QUARANTINE, UNROUTED_QUARANTINE})

#: Modes of spool files: a file written but not fsynced carries the sticky bit, which no
#: umask sets and Linux ignores on files; hard links share it.
DURABLE_MODE = 0o600
VOLATILE_MODE = stat.S_ISVTX | DURABLE_MODE

#: Room kept per de-identified output beyond its input's size (marks, block rounding).
OUTPUT_SLACK_BYTES = 64 * 1024
#: How long a free-space figure far above the minimum is trusted (see Spool._free_space).
FREE_SPACE_CHECK_SECONDS = 0.1

SUFFIX = ".dcm"
#: Held (flock) by the node that runs on the spool, for as long as its process lives.
LOCK_FILE = "node.lock"
REASON_SUFFIX = ".reason.json"

_SAFE_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def safe_name(uid: str) -> str:
    """A file/directory name for a UID: the UID itself when it is a plain UID, else a hash.

    With the retain-uids option the UIDs are the sender's: never let one be a path.
    """
    uid = (uid or "").strip().rstrip("\0")
    if 0 < len(uid) <= 64 and _SAFE_UID.fullmatch(uid):
        return uid
    import hashlib

    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _new_id_prefix() -> None:
    """A random prefix per process (again in every forked child) and a counter: spool ids
    unique across processes and restarts without a getrandom call (and a hand-off of the
    GIL) per id, three per instance."""
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(8).hex()
    _id_counter = itertools.count(int.from_bytes(os.urandom(8), "little"))


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)

#: An odd 64-bit multiplier: counter values map one to one onto scrambled ones, so that an id
#: shows no run of zeros and small numbers, which a short numeric identifier (of a patient,
#: an accession) could match by chance where ids are logged.
_ID_MIX = 0x9E3779B97F4A7C15


def new_id() -> str:
    """32 hex digits, like a uuid4's."""
    return f"{_id_prefix}{next(_id_counter) * _ID_MIX & 0xFFFFFFFFFFFFFFFF:016x}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class DirSyncer:
    """fsync of one directory, shared by concurrent callers (group commit).

    A caller that has just renamed a file into the directory calls ``sync()``; it returns
    once an fsync of the directory that *started* after the call has completed. Callers
    arriving while an fsync runs share the next one instead of queueing one each.
    """

    def __init__(self, path: Path):
        self.path = path
        self._cond = threading.Condition()
        self._requested = 0
        self._done = 0
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._done < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                target = self._requested
                self._cond.release()
                try:
                    fsync_dir(self.path)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._done = max(self._done, target)


class SpoolInUse(Exception):
    """Another process holds the spool's lock: a node runs on it (``pid``, if it said)."""

    def __init__(self, pid: int | None):
        super().__init__(f"the spool is in use by process {pid}" if pid else "the spool is in use")
        self.pid = pid


class Spool:
    """Paths and atomic moves of the spool. Thread-safe; may be used by several processes.

    ``usage`` is an approximate byte count of what the spool holds (done/ excluded), kept
    up to date by the process that owns the receive side and corrected by ``rescan()``.
    """

    def __init__(self, root: Path | str, destinations: Iterable[str] = (), keep_delivered: bool = False):
        self.root = Path(root).absolute()
        self.destinations = tuple(destinations)
        self.keep_delivered = keep_delivered
        self.tmp = self.root / TMP
        self.incoming = self.root / INCOMING
        self.outgoing_root = self.root / OUTGOING
        self.done_root = self.root / DONE
        self.quarantine_root = self.root / QUARANTINE
        self.recycle_dir = self.root / RECYCLE
        self._lock = threading.Lock()
        self._free_checked = (-FREE_SPACE_CHECK_SECONDS, 0)  # (monotonic time, free bytes)
        self._usage = 0
        self._incoming_sync = DirSyncer(self.incoming)
        self._lock_fd: int | None = None

    # ----------------------------------------------------------------- layout
    def outgoing(self, dest: str) -> Path:
        return self.outgoing_root / dest

    def done(self, dest: str) -> Path:
        return self.done_root / dest

    def quarantine_dir(self, where: str) -> Path:
        return self.quarantine_root / where

    def create(self) -> None:
        """Make every stage directory (and make their creation durable)."""
        dirs = [self.tmp, self.incoming, self.outgoing_root, self.quarantine_root, self.recycle_dir,
                self.quarantine_dir(DEIDENTIFY_QUARANTINE), self.quarantine_dir(UNROUTED_QUARANTINE)]
        for dest in self.destinations:
            dirs += [self.outgoing(dest), self.quarantine_dir(dest)]
            if self.keep_delivered:
                dirs.append(self.done(dest))
        for path in dirs:
            path.mkdir(parents=True, exist_ok=True)
        for path in {p.parent for p in dirs} | set(dirs):
            fsync_dir(path)

    def lock(self) -> bool:
        """Take the spool for this process (raises SpoolInUse if another holds it); False
        where the file system has no locks (some network shares): the spool is then used
        without one.

        Two nodes on one spool would delete each other's partial and volatile files, each
        de-identify and send what the other does, and remove originals the other still
        needs. The kernel drops the lock when the process ends, kill -9 included, so a
        crash leaves nothing to clean up. The lock file says which process holds it.
        """
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, DURABLE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise SpoolInUse(int(text) if text.isdigit() else None) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # before the next holder can write its pid: no truncation here
            self._lock_fd = None

    def drop_volatile(self) -> int:
        """Delete every volatile file in outgoing/ (at start, before anything is sent): its
        original is still in incoming/ and is de-identified again. Returns how many."""
        count = 0
        for folder in _subfolders(self.outgoing_root):
            for entry in os.scandir(folder):
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mode & stat.S_ISVTX:
                        os.unlink(entry.path)
                        count += 1
                except FileNotFoundError:
                    pass
        return count

    def marks_volatile(self) -> bool:
        """Can files here carry the volatile mark? (Linux file systems can; without it,
        every de-identified file is fsynced before it is linked.)"""
        probe = self.tmp_path(".probe")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DURABLE_MODE)
            try:
                os.fchmod(fd, VOLATILE_MODE)
                return bool(os.fstat(fd).st_mode & stat.S_ISVTX)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError:
            return False

    @staticmethod
    def make_volatile(path: Path) -> None:
        """Mark a file written but not fsynced, before it is linked into outgoing/ (the
        mark is in the inode: the journal has it no later than the link)."""
        os.chmod(path, VOLATILE_MODE)

    @staticmethod
    def make_durable(path: Path) -> None:
        """fsync a file and clear its volatile mark: its bytes reach the disk before the
        mark goes, so a file without the mark is whole after any crash."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            if os.fstat(fd).st_mode & stat.S_ISVTX:
                os.fchmod(fd, DURABLE_MODE)
                os.fsync(fd)
        finally:
            os.close(fd)

    def clean_tmp(self) -> int:
        """Delete leftovers of partial writes (never acknowledged). Returns how many."""
        count = 0
        for entry in os.scandir(self.tmp):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                count += 1
            except FileNotFoundError:
                pass
        return count

    def sweep_tmp(self, older_than_seconds: float) -> int:
        """Delete tmp files not touched for a while (left by aborted transfers)."""
        limit = time.time() - older_than_seconds
        count = 0
        for entry in os.scandir(self.tmp):
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < limit:
                    os.unlink(entry.path)
                    count += 1
            except FileNotFoundError:
                pass
        return count

    def tmp_path(self, suffix: str = SUFFIX) -> Path:
        return self.tmp / f"{new_id()}{suffix}"

    def scratch_file(self) -> BinaryIO:
        """An open file in tmp/ with no name: it is gone when closed, even after kill -9."""
        try:
            fd = os.open(self.tmp, os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            path = self.tmp_path(".scratch")  # a file system without O_TMPFILE
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.unlink(path)
        return os.fdopen(fd, "w+b")

    # ---------------------------------------------------------------- recycling
    def recycle(self, path: Path, size: int | None = None) -> None:
        """Remove ``path`` from its stage: into recycle/ while that has room, else deleted."""
        try:
            if size is None:
                size = os.stat(path).st_size
        except FileNotFoundError:
            return
        self.recycle_all([(path, size)])

    def recycle_all(self, files: list[tuple[Path, int]]) -> None:
        """``recycle`` for (path, size) pairs, looking at recycle/ once."""
        try:
            names = os.listdir(self.recycle_dir)
        except OSError:
            names = None  # no recycle/ (deleted, or an older spool): delete
        count = len(names) if names is not None else RECYCLE_FILES
        held = sum(_recycled_size(name) for name in names) if names else 0
        for path, size in files:
            if 0 < size <= RECYCLE_MAX_FILE_BYTES and count < RECYCLE_FILES and held + size <= RECYCLE_BYTES:
                try:
                    os.rename(path, self.recycle_dir / f"{size}-{new_id()}")
                    count, held = count + 1, held + size
                    continue
                except OSError:
                    pass  # gone already, or recycle/ is: delete
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def write_failed(self, exc: OSError) -> bool:
        """A write into the spool failed: if the file system is full, give the recycled files
        back first (they are the spool's own slack). True if it is full."""
        full = is_out_of_space(exc)
        if full:
            self.drain_recycled()
        return full

    def drain_recycled(self, idle_seconds: float = 0.0) -> int:
        """Delete the recycled files: every one (the file system is short of space, or the
        node starts or stops), or those that lay in recycle/ ``idle_seconds`` (the node is
        idle): they hold the bytes of removed originals, PHI the spool needs no more.
        Returns how many."""
        limit = time.time() - idle_seconds
        count = 0
        try:
            entries = list(os.scandir(self.recycle_dir))
        except OSError:
            return 0
        for entry in entries:
            try:
                # a rename into recycle/ sets the file's ctime
                if not idle_seconds or entry.stat(follow_symlinks=False).st_ctime < limit:
                    os.unlink(entry.path)
                    count += 1
            except OSError:
                pass  # taken by reuse() meanwhile
        return count

    def reuse(self, target: Path, size_hint: int = 0) -> bool:
        """Rename a recycled file (the closest in size to ``size_hint``) to ``target`` (in
        tmp/, not existing). False if there is none: create ``target`` instead. The caller
        must write it from its start and then call ``reusable`` (or delete it)."""
        try:
            names = os.listdir(self.recycle_dir)
        except OSError:
            return False
        if size_hint:
            names.sort(key=lambda name: abs(_recycled_size(name) - size_hint))
        for name in names:
            try:
                os.rename(self.recycle_dir / name, target)
                return True
            except FileNotFoundError:
                continue  # another process took it
            except OSError:
                return False
        return False

    # ------------------------------------------------------------- accounting
    @property
    def usage(self) -> int:
        return self._usage

    def add_usage(self, delta: int) -> None:
        with self._lock:
            self._usage = max(0, self._usage + delta)

    def rescan(self) -> int:
        """Recount the bytes the spool holds (hard links counted once; done/ excluded)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for top in (self.tmp, self.incoming, self.outgoing_root, self.quarantine_root):
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    try:
                        st = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    key = (st.st_dev, st.st_ino)
                    if key not in seen:
                        seen.add(key)
                        total += st.st_size
        with self._lock:
            self._usage = total
        return total

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _free_space(self, needed: int, taking: int) -> int:
        """``free_bytes``, looked up at most every FREE_SPACE_CHECK_SECONDS while far above
        what is ``needed`` (a statvfs per instance was one more GIL hand-off), every time
        near it; between look-ups each call takes ``taking`` off the figure, so it never
        runs ahead of the disk."""
        now = time.monotonic()
        checked, free = self._free_checked
        if now - checked < FREE_SPACE_CHECK_SECONDS and free > 2 * needed:
            self._free_checked = (checked, free - taking)
            return free
        free = self.free_bytes()
        self._free_checked = (now, free)
        return free

    def capacity_problem(self, max_spool_bytes: int, min_free_bytes: int, incoming: int = 0,
                         reserved: int = 0) -> str | None:
        """Why the spool cannot take another instance of ``incoming`` bytes now, or None.

        ``reserved``: bytes the spool is about to hold besides its usage (the outputs of
        instances being de-identified, written before their inputs are removed). An instance
        larger than the limit is still taken into an empty spool. The file system must keep
        ``min_free_bytes`` and room for those outputs and this instance's own (the instance
        is on disk already): without it de-identification would stop with incoming/ full,
        and nothing could ever leave the spool.
        """
        held = self._usage + reserved
        if max_spool_bytes and held and held + incoming > max_spool_bytes:
            return f"spool holds {held} bytes (with those being de-identified), limit {max_spool_bytes}"
        # outputs are a little larger than their inputs (the de-identification marks) and
        # take whole blocks: a slack per output, so that "room for one" is room for one
        needed = min_free_bytes + reserved + incoming + OUTPUT_SLACK_BYTES * (1 + reserved // max(incoming, 1))
        free = self._free_space(needed, 2 * incoming)
        if free < needed and self.drain_recycled():
            free = self.free_bytes()
        if free < needed:
            return (f"file system has {free} bytes free, needs {needed}: minimum {min_free_bytes} and room "
                    f"for de-identified outputs")
        return None

    # ----------------------------------------------------------------- stages
    def commit_incoming(self, tmp_file: Path, spool_id: str) -> Path:
        """Rename a complete, fsynced tmp file into incoming/ and make that durable."""
        final = self.incoming / f"{spool_id}{SUFFIX}"
        os.rename(tmp_file, final)
        self._incoming_sync.sync()
        return final

    def list_incoming(self) -> list[Path]:
        return _oldest_first(self.incoming)

    def list_outgoing(self, dest: str) -> list[Path]:
        return _oldest_first(self.outgoing(dest))

    def link_outgoing(self, src: Path, dest: str, name: str) -> Path:
        """Hard-link a de-identified file into outgoing/<dest>/<name>, replacing a duplicate.

        The caller fsyncs the outgoing directories (``sync_outgoing``) before it removes
        the instance from the previous stage.
        """
        final = self.outgoing(dest) / name
        try:
            os.link(src, final)
        except FileExistsError:
            # The same instance again (a re-send, or a resume after a crash): identical
            # content by construction; replace it atomically.
            temp = self.tmp_path(".link")
            os.link(src, temp)
            os.rename(temp, final)
        return final

    def move_outgoing(self, src: Path, dest: str, name: str) -> Path:
        """Rename a de-identified file into outgoing/<dest>/<name> (its last destination),
        replacing a duplicate atomically; see ``link_outgoing``."""
        final = self.outgoing(dest) / name
        os.rename(src, final)
        return final

    def sync_outgoing(self, dests: Iterable[str]) -> None:
        for dest in dests:
            fsync_dir(self.outgoing(dest))

    def delivered(self, path: Path, dest: str, inode: int | None = None) -> int | None:
        """An outgoing file (``inode``, if given) reached its destination: delete it, or
        keep it in done/.

        Returns the bytes freed from the accounted spool (0 while other links remain), or
        None if ``path`` is another file by now (a re-sent instance replaced it), left as is.
        """
        with self._lock:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return 0
            if inode is not None and st.st_ino != inode:
                return None
            if self.keep_delivered:
                self.make_durable(path)
                target_dir = self.done(dest)
                target_dir.mkdir(parents=True, exist_ok=True)
                os.replace(path, target_dir / path.name)
            elif st.st_nlink <= 1:
                self.recycle(path, st.st_size)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    return 0
            freed = st.st_size if st.st_nlink <= 1 else 0
            self._usage = max(0, self._usage - freed)
            return freed

    def quarantine(self, path: Path, where: str, name: str, reason: str, stage: str, **details) -> Path:
        """Move ``path`` (made durable) into quarantine/<where>/<name>.dcm next to a PHI-free
        reason file."""
        self.make_durable(path)
        qdir = self.quarantine_dir(where)
        qdir.mkdir(parents=True, exist_ok=True)
        base = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
        record = {"reason": reason, "stage": stage, "time": now_iso(), **details}
        reason_tmp = self.tmp_path(".reason")
        with open(reason_tmp, "w", encoding="utf-8") as out:
            json.dump(record, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.rename(reason_tmp, qdir / f"{base}{REASON_SUFFIX}")
        final = qdir / f"{base}{SUFFIX}"
        os.rename(path, final)
        fsync_dir(qdir)
        return final

    def stage_counts(self) -> dict[str, int]:
        """How many instances each stage holds (for start-up and shutdown logs)."""
        counts = {INCOMING: _count(self.incoming)}
        for dest in self.destinations:
            counts[f"{OUTGOING}/{dest}"] = _count(self.outgoing(dest))
        if self.quarantine_root.is_dir():
            for entry in os.scandir(self.quarantine_root):
                if entry.is_dir():
                    counts[f"{QUARANTINE}/{entry.name}"] = _count(Path(entry.path))
        return counts


def _subfolders(folder: Path) -> list[str]:
    try:
        return [e.path for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _count(folder: Path) -> int:
    try:
        return sum(1 for e in os.scandir(folder) if e.name.endswith(SUFFIX) and e.is_file())
    except FileNotFoundError:
        return 0


def _oldest_first(folder: Path) -> list[Path]:
    entries = []
    try:
        it = os.scandir(folder)
    except FileNotFoundError:
        return []
    with it:
        for entry in it:
            if not entry.name.endswith(SUFFIX):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, entry.name, Path(entry.path)))
    entries.sort()
    return [path for _m, _n, path in entries]


def _recycled_size(name: str) -> int:
    try:
        return int(name.split("-", 1)[0])
    except ValueError:
        return 0


def reusable(fd: int, length: int) -> None:
    """Cut a file written over from its start to the ``length`` bytes just written, and check
    it: no byte of what it held before may follow (a recycled file held another instance)."""
    os.ftruncate(fd, length)
    if os.fstat(fd).st_size != length:
        raise OSError(errno.EIO, "a recycled spool file could not be cut to its new length")


_sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)


def start_writeback(fd: int, offset: int = 0, count: int = 0) -> None:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): start writing ``count`` bytes from
    ``offset`` (0: to the end) back to disk, do not wait (Python's os module lacks it). The
    fsync that follows later waits for less (~1.9 -> ~1.0 ms median for a CT slice here).
    Elsewhere, and on any failure, nothing happens: the fsync does it all."""
    if _sync_file_range is not None:
        _sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(count), ctypes.c_uint(2))


def is_out_of_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
