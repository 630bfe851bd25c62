"""``deid-router requeue``: send quarantined instances through their stage again.

Once the cause of a quarantine is fixed (a SOP class the destination now accepts, a
routing filter, a release that reads what an earlier one refused), the operator names
quarantine folders and their instances go back where they came from:

- ``<destination>``: ``quarantine/<destination>/`` -> ``outgoing/<destination>/``;
- ``unrouted``: routed again by the config's destination filters (source AE title and
  modality, from each reason file) into every ``outgoing/<destination>/`` that matches;
- ``deidentify``: the originals -> ``incoming/`` (under new spool ids);
- with ``--to <destination>``, a destination's (even one no longer configured) or
  ``unrouted`` -> ``outgoing/<destination>/``, whatever the filters say.

Each file is hard-linked into its new place before its quarantine entry and reason file
go, so an interruption leaves it in one place or both, never in none. An instance whose
name is already waiting in ``outgoing/`` (a newer version of it) is left in quarantine and
counted. A node running on the spool is then sent SIGHUP (its pid is in the spool's lock
file), on which it looks at ``incoming/`` and ``outgoing/`` again at once; a stopped node
reads them when it starts.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from router.config import Config
from router.deidentify import routes_to
from router.spool import (
    DEIDENTIFY_QUARANTINE,
    REASON_SUFFIX,
    SUFFIX,
    UNROUTED_QUARANTINE,
    Spool,
    SpoolInUse,
    fsync_dir,
    new_id,
)

ALREADY_WAITING = "a version of it already waits in outgoing/"


@dataclass
class Outcome:
    """What happened to one quarantine folder's instances."""

    moved: Counter = field(default_factory=Counter)  # target folder -> instances
    left: Counter = field(default_factory=Counter)  # why an instance stayed -> instances
    reasons: Counter = field(default_factory=Counter)  # quarantine reason -> instances (a listing)


def requeue(config: Config, where: str, dry_run: bool = False, to: str | None = None) -> Outcome:
    """Requeue every instance of quarantine/<where>/, or send the de-identified ones ``to``
    another destination (one renamed, a PACS replaced); raises ValueError for a folder or
    destination the config does not know."""
    destinations = {d.name: d for d in config.destinations}
    spool = Spool(config.node.spool_dir, list(destinations), config.node.keep_delivered)
    folder = spool.quarantine_dir(where)
    if to is not None:
        if to not in destinations:
            raise ValueError(f"no destination {to!r} in this config (one of: {', '.join(destinations)})")
        if where == DEIDENTIFY_QUARANTINE or not folder.is_dir():
            raise ValueError(f"--to takes a quarantine folder of de-identified instances: a destination's "
                             f"or {UNROUTED_QUARANTINE} (quarantine/{where}/ is not one)")
    elif where not in destinations and where not in (UNROUTED_QUARANTINE, DEIDENTIFY_QUARANTINE):
        known = ", ".join([*destinations, UNROUTED_QUARANTINE, DEIDENTIFY_QUARANTINE])
        raise ValueError(f"no quarantine folder {where!r} in this config (one of: {known}; "
                         "--to DESTINATION sends another's)")
    outcome = Outcome()
    if not folder.is_dir():
        return outcome
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        record = _reason(path)
        outcome.reasons[record.get("reason", "(no reason file)")] += 1
        if to is not None:
            targets = [spool.outgoing(to) / path.name]
        elif where == DEIDENTIFY_QUARANTINE:
            targets = [spool.incoming / f"{new_id()}{SUFFIX}"]
        elif where == UNROUTED_QUARANTINE:
            if not record:
                outcome.left["no reason file to route it by"] += 1
                continue
            targets = [spool.outgoing(d.name) / path.name for d in config.destinations
                       if routes_to(d, record.get("source_ae_title", ""), record.get("modality", ""))]
            if not targets:
                outcome.left["still matches no destination"] += 1
                continue
        else:
            targets = [spool.outgoing(where) / path.name]
        problem = _waiting(spool, targets) if dry_run else _move(spool, path, targets)
        if problem:
            outcome.left[problem] += 1
        else:
            for target in targets:
                outcome.moved[_relative(spool, target.parent)] += 1
    return outcome


def tell_node(config: Config) -> int | None:
    """SIGHUP to the node running on the spool, if one does (its pid, else None)."""
    spool = Spool(config.node.spool_dir)
    try:
        locked = spool.lock()
    except SpoolInUse as exc:
        if exc.pid:
            os.kill(exc.pid, signal.SIGHUP)
        return exc.pid
    except FileNotFoundError:
        return None
    if locked:
        spool.unlock()
    return None


def _waiting(spool: Spool, targets: list[Path]) -> str | None:
    """What ``_move`` would find in the way (a dry run)."""
    return ALREADY_WAITING if any(t.exists() for t in targets if t.parent != spool.incoming) else None


def _move(spool: Spool, path: Path, targets: list[Path]) -> str | None:
    """Link ``path`` at every target, then remove it and its reason file; None when done,
    else why it stays (and nothing of it moved)."""
    linked: list[Path] = []
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except FileExistsError:
            for done in linked:
                done.unlink()
            return ALREADY_WAITING
        linked.append(target)
    for target in linked:
        fsync_dir(target.parent)
    path.unlink()
    _reason_path(path).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return None


def _reason_path(path: Path) -> Path:
    return path.with_name(path.name[: -len(SUFFIX)] + REASON_SUFFIX)


def _reason(path: Path) -> dict:
    try:
        record = json.loads(_reason_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _relative(spool: Spool, folder: Path) -> str:
    return f"{folder.relative_to(spool.root)}/"

