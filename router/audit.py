"""The local audit store: what happened to every instance, and (optionally) the crosswalk.

A SQLite file (``[audit] path``), created owner-only (0600, its folder 0700) and never
forwarded. Table ``events``: one row per stage event of an instance (received,
deidentified, forwarded, quarantined, refused) with the time, the calling AE title,
the destination, the node's spool id and the NEW identifiers (pseudonymous UIDs, patient
pseudonym) and a PHI-free reason. With ``[audit] crosswalk = true`` the table
``crosswalk`` also maps ORIGINAL identifiers to their pseudonyms (PatientID, AccessionNumber,
Study/Series/SOP Instance UIDs), for an honest broker: that table holds PHI.

One writer thread batches inserts (a transaction every ~200 ms), so a busy node pays a
queue append per event. ``deid-router crosswalk export`` reads it back as CSV.
"""

from __future__ import annotations

import csv
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from router.log import get_logger

log = get_logger("router.audit")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
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
CREATE TABLE IF NOT EXISTS crosswalk (
    kind TEXT NOT NULL,             -- patient_id | accession | study_uid | series_uid | sop_instance_uid
    original TEXT NOT NULL,         -- PHI
    pseudonym TEXT NOT NULL,
    first_seen TEXT NOT NULL,
    PRIMARY KEY (kind, original)
);
"""

EVENT_COLUMNS = ("time", "event", "spool_id", "calling_ae", "destination", "patient", "study_uid", "series_uid",
                 "sop_instance_uid", "reason")
CROSSWALK_KINDS = ("patient_id", "accession", "study_uid", "series_uid", "sop_instance_uid")
BATCH_SECONDS = 0.2


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def create_private(path: Path) -> None:
    """The store's file (and folder) with owner-only permissions, before SQLite opens it.

    SQLite gives its -wal/-shm files the permissions of the database file.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


class AuditStore:
    """Records node events (and the crosswalk) in the background; thread-safe."""

    def __init__(self, path: Path, crosswalk: bool = False):
        self.path = Path(path)
        self.crosswalk = crosswalk
        create_private(self.path)
        connection = sqlite3.connect(self.path)
        connection.executescript(SCHEMA)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.close()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="audit", daemon=True)
        self._thread.start()

    def event(self, event: str, **fields: str | None) -> None:
        self._queue.put(("event", tuple([now(), event, *(fields.get(c) for c in EVENT_COLUMNS[2:])])))

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

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _write(self) -> None:
        connection = sqlite3.connect(self.path, check_same_thread=False)
        connection.execute("PRAGMA synchronous=NORMAL")
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            time.sleep(BATCH_SECONDS)  # one transaction for what arrives meanwhile
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events, maps = [], []
            for item in batch:
                if item is None:
                    stopping = True
                elif item[0] == "event":
                    events.append(item[1])
                else:
                    maps.extend(item[1])
            try:
                with connection:
                    connection.executemany(
                        f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})",
                        events)
                    connection.executemany("INSERT OR IGNORE INTO crosswalk VALUES (?, ?, ?, ?)", maps)
            except sqlite3.Error as exc:
                log.error("audit_write_failed", error=type(exc).__name__, rows=len(events) + len(maps))
        connection.close()


def export_crosswalk(path: Path, out: TextIO, kinds: Iterable[str] = CROSSWALK_KINDS) -> int:
    """Write the crosswalk as CSV (kind, original, pseudonym, first_seen); returns the rows."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        kinds = tuple(kinds)
        rows = connection.execute(
            f"SELECT kind, original, pseudonym, first_seen FROM crosswalk WHERE kind IN ({', '.join('?' * len(kinds))})"
            " ORDER BY kind, first_seen, original", kinds).fetchall()
    finally:
        connection.close()
    writer = csv.writer(out)
    writer.writerow(["kind", "original", "pseudonym", "first_seen"])
    writer.writerows(rows)
    return len(rows)


def export_events(path: Path, out: TextIO) -> int:
    """Write the events table as CSV; returns the rows."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = connection.execute(f"SELECT {', '.join(EVENT_COLUMNS)} FROM events ORDER BY id").fetchall()
    finally:
        connection.close()
    writer = csv.writer(out)
    writer.writerow(EVENT_COLUMNS)
    writer.writerows(rows)
    return len(rows)
