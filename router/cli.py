"""The ``deid-router`` command: serve, deid, scan, check-config, echo, requeue, crosswalk, audit."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from pathlib import Path

from router import __version__, config as config_module, log
from router.audit import CROSSWALK_KINDS, KIND_GROUPS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deid-router", description=__doc__)
    parser.add_argument("--version", action="version", version=f"deid-router {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the DICOM node: receive, de-identify, forward")
    serve.add_argument("--config", type=Path, help="TOML config (default: the embedded default)")

    deid = commands.add_parser("deid", help="de-identify files offline")
    deid.add_argument("src", type=Path, help="a DICOM file or a folder (walked recursively)")
    deid.add_argument("dst", type=Path, help="output folder")
    deid.add_argument("--config", type=Path, help="TOML config (its [deid] table is used)")
    deid.add_argument("--workers", type=int, default=None, help="worker processes (default: cores)")

    scan = commands.add_parser("scan", help="report the burned-in text the pixel stage would mask (no output images)")
    scan.add_argument("src", type=Path, help="a DICOM file or a folder (walked recursively)")
    scan.add_argument("--config", type=Path, help="TOML config (its [deid] pixel_policy is used)")

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file", type=Path)

    echo = commands.add_parser("echo", help="C-ECHO a DICOM peer")
    echo.add_argument("host")
    echo.add_argument("port", type=int)
    echo.add_argument("--aet", default="DEID_ROUTER", help="our (calling) AE title")
    echo.add_argument("--aec", default="ANY-SCP", help="the peer's (called) AE title")
    echo.add_argument("--timeout", type=float, default=10.0)

    requeue = commands.add_parser("requeue", help="send quarantined instances through their stage again")
    requeue.add_argument("where", nargs="+",
                         help="quarantine folders: a destination's name (back to its outgoing/), unrouted "
                              "(routed again by the config's filters), deidentify (back to incoming/)")
    requeue.add_argument("--config", type=Path, help="TOML config (default: the embedded default)")
    requeue.add_argument("--to", metavar="DESTINATION",
                         help="send them to this destination instead (a destination's quarantine, even one no "
                              "longer configured, or unrouted)")
    requeue.add_argument("--dry-run", action="store_true", help="say why they are there and where they would go")

    crosswalk = commands.add_parser("crosswalk", help="the audit store's crosswalk (original -> pseudonym): PHI")
    crosswalk_commands = crosswalk.add_subparsers(dest="action", required=True)
    export = crosswalk_commands.add_parser("export", help="write the crosswalk as CSV (it holds PHI)")
    store_arguments(export)
    export.add_argument("--format", choices=["csv", "id-map"], default="csv",
                        help="csv: kind,original,pseudonym,first_seen; id-map: id_old,id_new "
                             "(the MIDI-B validation script's uid/patid mapping files)")
    export.add_argument("--kind", action="append", choices=[*CROSSWALK_KINDS, *KIND_GROUPS],
                        help="only these identifiers (repeatable; uids = study, series and SOP instance UIDs; "
                             "default: all)")
    pixel_text = crosswalk_commands.add_parser("pixel-text", help="write the text read off masked pixels as CSV (PHI)")
    store_arguments(pixel_text)

    audit = commands.add_parser("audit", help="the audit store's events (pseudonymous identifiers only)")
    audit_commands = audit.add_subparsers(dest="action", required=True)
    events = audit_commands.add_parser("export", help="write events as CSV")
    store_arguments(events)
    events.add_argument("--since", help="only events at or after this UTC time (ISO 8601, e.g. 2026-11-22 or "
                                        "2026-11-22T10:00)")
    show = audit_commands.add_parser("show", help="what happened to one instance, as CSV")
    show.add_argument("uid", help="its new SOP Instance UID, its original one (crosswalk on) or its spool id")
    store_arguments(show)

    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command in ("crosswalk", "audit"):
        return export_audit(args)
    try:
        config = config_module.load(args.config) if getattr(args, "config", None) else config_module.embedded_default()
    except config_module.ConfigError as exc:
        print(f"deid-router: invalid config:\n{exc}", file=sys.stderr)
        return 2
    log.configure(config.logging)
    if args.command == "deid":
        from router import filemode

        return filemode.run(args.src, args.dst, config, workers=args.workers)
    if args.command == "scan":
        from router import scan

        return scan.run(args.src, config)
    if args.command == "requeue":
        return requeue_quarantined(config, args.where, args.dry_run, args.to)
    if args.command == "serve":
        from router import node

        return node.run(config)
    from router import forward

    return 0 if forward.echo(args.host, args.port, called_ae=args.aec, calling_ae=args.aet, timeout=args.timeout) else 1


def requeue_quarantined(config: config_module.Config, folders: list[str], dry_run: bool, to: str | None) -> int:
    from router.requeue import requeue, tell_node

    code, moved = 0, 0
    for where in folders:
        try:
            outcome = requeue(config, where, dry_run, to)
        except ValueError as exc:
            print(f"deid-router: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"deid-router: {where}: file system error: {exc.strerror or type(exc).__name__}", file=sys.stderr)
            code = 1
            continue
        count = sum(outcome.reasons.values())
        print(f"quarantine/{where}/: {count} instance{'' if count == 1 else 's'}")
        for reason, count in outcome.reasons.most_common():
            print(f"  {count} x {reason}")
        verb = "would move" if dry_run else "moved"
        for folder, count in sorted(outcome.moved.items()):
            print(f"  {verb} {count} to {folder}")
            moved += count
        for why, count in outcome.left.most_common():
            print(f"  left {count}: {why}")
            code = 1
    if moved and not dry_run:
        try:
            pid = tell_node(config)
        except OSError as exc:
            print(f"the running node could not be told ({exc.strerror}): it finds them within a minute")
        else:
            print(f"the running node (pid {pid}) is looking at them now" if pid else
                  "no node runs on this spool now: it takes them when it starts")
    return code


def store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config whose [audit] path is the store")
    parser.add_argument("--db", type=Path, help="the audit store file (instead of --config)")
    parser.add_argument("--output", type=Path, help="file to write (default: standard output), created 0600")


def export_audit(args: argparse.Namespace) -> int:
    from router import audit

    if args.db:
        db = args.db
    else:
        try:
            config = config_module.load(args.config) if args.config else config_module.embedded_default()
        except config_module.ConfigError as exc:
            print(f"deid-router: invalid config:\n{exc}", file=sys.stderr)
            return 2
        db = config.audit.path
    if db is None or not Path(db).is_file():
        print(f"deid-router: no audit store {'at ' + str(db) if db else 'configured ([audit] path)'}", file=sys.stderr)
        return 2
    since = None
    if getattr(args, "since", None):
        try:
            since = audit.utc_time(args.since)
        except ValueError:
            print(f"deid-router: --since {args.since!r} is not an ISO 8601 date or time", file=sys.stderr)
            return 2
    out = sys.stdout
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file too: it holds PHI
        out = os.fdopen(fd, "w", newline="", encoding="utf-8")
    try:
        if args.command == "crosswalk" and args.action == "export":
            rows = audit.export_crosswalk(db, out, args.kind or audit.CROSSWALK_KINDS, id_map=args.format == "id-map")
        elif args.command == "crosswalk":
            rows = audit.export_pixel_text(db, out)
        elif args.action == "show":
            rows = audit.export_events(db, out, sop_instance_uid=args.uid)
        else:
            rows = audit.export_events(db, out, since=since)
    except sqlite3.Error as exc:
        print(f"deid-router: cannot read the audit store {db}: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.output:
            out.close()
    print(f"{rows} rows", file=sys.stderr)
    return 0


def check_config(path: Path) -> int:
    try:
        config_module.load(path)
    except config_module.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    print(f"{path}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
