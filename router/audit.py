"""The local audit store: what happened to every instance, and (optionally) the crosswalk.

A SQLite file (``[audit] path``), created owner-only (0600, its folder 0700) and never
forwarded. Table ``events``: one row per stage event of an instance (received,
deidentified, forwarded, quarantined, refused) with the time, the calling AE title,
the destination, the node's spool id and the NEW identifiers (pseudonymous UIDs, patient
pseudonym) and a PHI-free reason. A "received" row gets the instance's new identifiers
once it is de-identified, so "what happened to instance X" is ``SELECT * FROM events
WHERE sop_instance_uid = X`` (see ``instance_history``, which also takes an original UID).

PHI, only when asked for: with ``[audit] crosswalk = true`` the table ``crosswalk`` maps
ORIGINAL identifiers to their pseudonyms (PatientID, AccessionNumber, Study/Series/SOP
Instance UIDs), for an honest broker; with ``[audit] pixel_text = true`` the table
``pixel_text`` keeps the text read off masked pixel regions.

One writer thread batches inserts (one transaction per ~100 ms or per ``MAX_BATCH`` rows),
so a busy node pays a queue append per event. The crosswalk and pixel text have no other
copy once the original is gone: ``after_written`` runs a function once everything queued
before it is committed (and, with either on, synced to disk), and the de-identify stage
removes an instance's original only then. A kill loses at most events, never a crosswalk
row of an instance whose original was removed. ``deid-router crosswalk export`` and
``deid-router audit`` read it back.
"""

from __future__ import annotations

import csv
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from router.log import get_logger

log = get_logger("router.audit")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,             -- UTC, ISO 8601
    event TEXT NOT NULL,            -- received | deidentified | forwarded | quarantined | refused
    spool_id TEXT,
    calling_ae TEXT,
    destination TEXT,
    patient TEXT,                   -- patient pseudonym
    study_uid TEXT,                 -- new (pseudonymous) UIDs
    series_uid TEXT,
    sop_instance_uid TEXT,
    reason TEXT                     -- PHI-free
);
CREATE INDEX IF NOT EXISTS events_sop ON events (sop_instance_uid);
CREATE INDEX IF NOT EXISTS events_spool ON events (spool_id);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS crosswalk (
    kind TEXT NOT NULL,             -- patient_id | accession | study_uid | series_uid | sop_instance_uid
    original TEXT NOT NULL,         -- PHI
    pseudonym TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    PRIMARY KEY (kind, original)
);
CREATE TABLE IF NOT EXISTS pixel_text (
    time TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL, -- new UID
    frame INTEGER NOT NULL,
    x0 INTEGER NOT NULL, y0 INTEGER NOT NULL, x1 INTEGER NOT NULL, y1 INTEGER NOT NULL,
    text TEXT NOT NULL              -- PHI
);
CREATE INDEX IF NOT EXISTS pixel_text_sop ON pixel_text (sop_instance_uid);
"""

EVENT_COLUMNS = ("time", "event", "spool_id", "calling_ae", "destination", "patient", "study_uid", "series_uid",
                 "sop_instance_uid", "reason")
EVENTS = ("received", "deidentified", "forwarded", "quarantined", "refused")
CROSSWALK_KINDS = ("patient_id", "accession", "study_uid", "series_uid", "sop_instance_uid")
#: Names for several kinds at once (``--kind uids``: the MIDI-B validator's UID mapping).
KIND_GROUPS = {"uids": ("study_uid", "series_uid", "sop_instance_uid")}
PIXEL_TEXT_COLUMNS = ("time", "sop_instance_uid", "frame", "x0", "y0", "x1", "y1", "text")
BATCH_SECONDS = 0.1
MAX_BATCH = 5000
#: The new identifiers a "received" row gets from its "deidentified" row.
_LINK = ("UPDATE events SET patient = ?, study_uid = ?, series_uid = ?, sop_instance_uid = ?"
         " WHERE spool_id = ? AND event = 'received' AND sop_instance_uid IS NULL")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def utc_time(text: str) -> str:
    """An ISO 8601 date or time (UTC unless it says otherwise) as the store writes times."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def create_private(path: Path) -> None:
    """The store's file (and folder) with owner-only permissions, before SQLite opens it.

    SQLite gives its -wal/-shm files the permissions of the database file.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


class AuditStoreError(Exception):
    """The store cannot be created or opened (the message names the path and why)."""


class AuditStore:
    """Records node events (and, when on, the crosswalk and pixel text) in the background.

    Thread-safe: every call appends to a queue that one writer thread drains.
    """

    def __init__(self, path: Path, crosswalk: bool = False, pixel_text: bool = False):
        self.path = Path(path)
        self.crosswalk = crosswalk
        self.pixel_text = pixel_text
        try:
            create_private(self.path)
            connection = sqlite3.connect(self.path)
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.executescript(SCHEMA)
            finally:
                connection.close()
        except (OSError, sqlite3.Error) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise AuditStoreError(f"cannot open the audit store {self.path}: {reason}") from None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="audit", daemon=True)
        self._thread.start()

    def event(self, event: str, **fields: str | None) -> None:
        """One row of ``events``; fields are EVENT_COLUMNS (time is now)."""
        self._queue.put(("event", (now(), event, *(fields.get(c) for c in EVENT_COLUMNS[2:]))))

    def map(self, originals: dict[str, str], pseudonyms: dict[str, str]) -> None:
        """Crosswalk rows kind -> (original, pseudonym); ignored unless crosswalk is on."""
        if not self.crosswalk:
            return
        stamp = now()
        # An accession number is usually emptied: it maps to the study's new UID then.
        new = {**pseudonyms, "accession": pseudonyms.get("accession") or pseudonyms.get("study_uid", "")}
        rows = [(kind, originals[kind], new[kind], stamp) for kind in CROSSWALK_KINDS
                if originals.get(kind) and new.get(kind)]
        if rows:
            self._queue.put(("map", rows))

    def record_pixel_text(self, rows: Iterable[tuple[str, int, int, int, int, int, str]]) -> None:
        """Text read off masked regions: (new SOP Instance UID, frame, x0, y0, x1, y1, text).

        Ignored unless pixel_text is on (the text is PHI)."""
        if not self.pixel_text:
            return
        stamp = now()
        batch = [(stamp, *row) for row in rows]
        if batch:
            self._queue.put(("text", batch))

    def after_written(self, function: Callable[[], None]) -> None:
        """Call function (on the writer's thread) once every row queued so far is committed."""
        self._queue.put(("after", function))

    def close(self) -> None:
        """Write what is queued and stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _write(self) -> None:
        connection = sqlite3.connect(self.path, check_same_thread=False)
        # FULL syncs the log at each commit (one fsync per batch): the crosswalk must
        # survive a power cut as the spool does. Events alone need not.
        connection.execute(f"PRAGMA synchronous={'FULL' if self.crosswalk or self.pixel_text else 'NORMAL'}")
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            deadline = time.monotonic() + BATCH_SECONDS  # one transaction for what arrives meanwhile
            while batch[-1] is not None and len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            events, links, maps, texts, afterwards = [], [], [], [], []
            for item in batch:
                if item is None:
                    stopping = True
                elif item[0] == "after":
                    afterwards.append(item[1])
                elif item[0] == "event":
                    row = item[1]
                    events.append(row)
                    if row[1] == "deidentified" and row[2] and row[8]:
                        links.append((row[5], row[6], row[7], row[8], row[2]))
                elif item[0] == "map":
                    maps.extend(item[1])
                else:
                    texts.extend(item[1])
            try:
                with connection:
                    connection.executemany(
                        f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})",
                        events)
                    connection.executemany(_LINK, links)
                    connection.executemany("INSERT OR IGNORE INTO crosswalk VALUES (?, ?, ?, ?)", maps)
                    connection.executemany(
                        f"INSERT INTO pixel_text VALUES ({', '.join('?' * len(PIXEL_TEXT_COLUMNS))})", texts)
            except sqlite3.Error as exc:
                log.error("audit_write_failed", error=type(exc).__name__, rows=len(events) + len(maps) + len(texts))
            for function in afterwards:  # after a failed write too: it is logged, the node goes on
                try:
                    function()
                except Exception as exc:  # noqa: BLE001 - the writer must outlive its callers' errors
                    log.error("audit_callback_failed", error=type(exc).__name__)
        connection.close()


# -- reading ------------------------------------------------------------------------------


def open_read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{Path(path).absolute()}?mode=ro", uri=True)


def expand_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """Crosswalk kinds, with group names (``uids``) spelled out."""
    out: list[str] = []
    for kind in kinds:
        for k in KIND_GROUPS.get(kind, (kind,)):
            if k not in CROSSWALK_KINDS:
                raise ValueError(f"unknown crosswalk kind {k!r}")
            if k not in out:
                out.append(k)
    return tuple(out)


def export_crosswalk(path: Path, out: TextIO, kinds: Iterable[str] = CROSSWALK_KINDS, id_map: bool = False) -> int:
    """Write the crosswalk as CSV; returns the rows.

    Columns kind, original, pseudonym, first_seen; with ``id_map`` just id_old, id_new (the
    mapping files of the MIDI-B validation script: ``--kind uids`` and ``--kind patient_id``).
    """
    kinds = expand_kinds(kinds)
    connection = open_read_only(path)
    try:
        rows = connection.execute(
            f"SELECT kind, original, pseudonym, first_seen FROM crosswalk WHERE kind IN ({', '.join('?' * len(kinds))})"
            " ORDER BY kind, first_seen, original", kinds).fetchall()
    finally:
        connection.close()
    writer = csv.writer(out)
    if id_map:
        writer.writerow(["id_old", "id_new"])
        writer.writerows((original, pseudonym) for _kind, original, pseudonym, _seen in rows)
    else:
        writer.writerow(["kind", "original", "pseudonym", "first_seen"])
        writer.writerows(rows)
    return len(rows)


def export_pixel_text(path: Path, out: TextIO) -> int:
    """Write the pixel text table as CSV (the columns of ``[deid] text_crosswalk``); returns the rows."""
    connection = open_read_only(path)
    try:
        rows = connection.execute(f"SELECT {', '.join(PIXEL_TEXT_COLUMNS)} FROM pixel_text ORDER BY rowid").fetchall()
    finally:
        connection.close()
    writer = csv.writer(out)
    writer.writerow(PIXEL_TEXT_COLUMNS)
    writer.writerows(rows)
    return len(rows)


def export_events(path: Path, out: TextIO, since: str | None = None, sop_instance_uid: str | None = None) -> int:
    """Write events as CSV (all, those at or after ``since`` (see utc_time), or one
    instance's history); returns the rows."""
    if sop_instance_uid:
        rows = instance_history(path, sop_instance_uid)
    else:
        connection = open_read_only(path)
        try:
            rows = connection.execute(
                f"SELECT {', '.join(EVENT_COLUMNS)} FROM events WHERE time >= ? ORDER BY id", (since or "",)).fetchall()
        finally:
            connection.close()
    writer = csv.writer(out)
    writer.writerow(EVENT_COLUMNS)
    writer.writerows(rows)
    return len(rows)


def instance_history(path: Path, sop_instance_uid: str) -> list[tuple]:
    """Every event of one instance, by its new SOP Instance UID, (crosswalk on) its original
    one, or its spool id (an instance quarantined before it had a new UID)."""
    connection = open_read_only(path)
    try:
        uid = sop_instance_uid
        mapped = connection.execute("SELECT pseudonym FROM crosswalk WHERE kind = 'sop_instance_uid' AND original = ?",
                                    (uid,)).fetchone()
        if mapped:
            uid = mapped[0]
        columns = ", ".join(EVENT_COLUMNS)
        rows = connection.execute(
            f"SELECT id, {columns} FROM events WHERE sop_instance_uid = :uid OR spool_id = :uid"
            f" UNION SELECT id, {columns} FROM events WHERE sop_instance_uid IS NULL AND spool_id IN"
            " (SELECT spool_id FROM events WHERE sop_instance_uid = :uid AND spool_id IS NOT NULL)"
            " ORDER BY id", {"uid": uid}).fetchall()
        return [row[1:] for row in rows]
    finally:
        connection.close()
