"""``deid-router deid SRC DST``: the same de-identification as the node, on files.

Output files are named by pseudonyms only: DST/<patient>/<study>/<series>/<instance>.dcm
with the new UIDs, so no PHI reaches a path. Input paths (which the operator chose and
may name patients) appear only in the summary printed to the operator, never in logs.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from router import log
from router.audit import AuditStore, AuditStoreError
from router.config import Config, resolve_secret
from router.profile import Deidentifier, InstanceRefused, InstanceResult

_deidentifier: Deidentifier | None = None
_dst: Path | None = None


@dataclass(frozen=True)
class Outcome:
    src: Path
    result: InstanceResult | None = None
    reason: str | None = None
    output: Path | None = None
    seconds: float = 0.0


def output_path(dst: Path, result: InstanceResult) -> Path:
    return dst / result.patient_pseudonym / result.study_instance_uid / result.series_instance_uid / f"{result.sop_instance_uid}.dcm"


def process(src: Path) -> Outcome:
    """De-identify one file into the output tree (runs in a worker process)."""
    assert _deidentifier is not None and _dst is not None
    start = time.perf_counter()
    try:
        result = _deidentifier.process_file(src, lambda r: output_path(_dst, r), durable=False)  # a batch can be rerun
    except InstanceRefused as exc:
        return Outcome(src, reason=exc.reason, seconds=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run
        if isinstance(exc, OSError) and exc.strerror:  # the file system's failure (a full disk)
            reason = f"file system error: {exc.strerror}"
        else:
            reason = f"internal error while de-identifying ({type(exc).__name__})"
        return Outcome(src, reason=reason, seconds=time.perf_counter() - start)
    return Outcome(src, result=result, output=output_path(_dst, result), seconds=time.perf_counter() - start)


def _init(deidentifier: Deidentifier, dst: Path) -> None:
    global _deidentifier, _dst
    _deidentifier, _dst = deidentifier, dst
    deidentifier.start()


def _init_worker(config: Config, secret: bytes, dst: Path) -> None:
    """A worker process (from the forkserver: the OCR runtime's threads do not survive a
    fork of a process that ran it) builds its own de-identifier."""
    _init(_deidentifier_for(config, secret), dst)


def _deidentifier_for(config: Config, secret: bytes) -> Deidentifier:
    deidentifier = Deidentifier(config.deid, secret)
    deidentifier.keep_originals = config.audit.crosswalk
    deidentifier.keep_pixel_text = config.audit.pixel_text
    return deidentifier


def inputs(src: Path) -> list[Path]:
    if src.is_dir():
        return sorted(p for p in src.rglob("*") if p.is_file())
    return [src]


def run(src: Path, dst: Path, config: Config, workers: int | None = None) -> int:
    logger = log.get_logger("deid")
    if not src.exists():
        print(f"deid-router: {src}: no such file or folder", file=sys.stderr)
        return 2
    try:
        secret, generated = resolve_secret(config)
    except OSError as exc:
        print(f"deid-router: cannot keep the site secret in {config.node.spool_dir}: {exc.strerror}", file=sys.stderr)
        return 2
    if generated:
        logger.warning("site_secret.generated", path=str(config.node.spool_dir / "site-secret"),
                       note="pseudonyms depend on it: keep it, and give it to every node of this site")
    paths = inputs(src)
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"deid-router: {dst}: cannot make the output folder: {exc.strerror}", file=sys.stderr)
        return 2
    deidentifier = _deidentifier_for(config, secret)
    try:
        deidentifier.start()  # fail here, clearly, if the OCR models cannot run
    except RuntimeError as exc:
        print(f"deid-router: cannot start de-identification: {exc}", file=sys.stderr)
        return 2
    try:
        audit = AuditStore(config.audit.path, config.audit.crosswalk, config.audit.pixel_text) if config.audit.path else None
    except AuditStoreError as exc:
        print(f"deid-router: {exc}", file=sys.stderr)
        return 2
    workers = max(1, min(workers or os.cpu_count() or 1, len(paths) or 1))
    progress = _Progress(len(paths)) if sys.stderr.isatty() else None
    # On a terminal the progress bar and the summary say it all; logs keep the detail.
    instance_level, refused_level = ("debug", "debug") if progress else ("info", "warning")
    written: dict[Path, Path] = {}
    refused: list[Outcome] = []
    duplicates = 0
    started = time.perf_counter()
    if workers == 1:
        _init(deidentifier, dst)
        outcomes = map(process, paths)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=_init_worker, initargs=(config, secret, dst))
        outcomes = pool.map(process, paths, chunksize=8)
    for outcome in outcomes:
        if outcome.result is None:
            refused.append(outcome)
            getattr(logger, refused_level)("instance.refused", input=deidentifier.keys.fingerprint(str(outcome.src)), reason=outcome.reason)
            if audit:
                audit.event("refused", spool_id=deidentifier.keys.fingerprint(str(outcome.src)), reason=outcome.reason)
        else:
            r = outcome.result
            if outcome.output in written:
                duplicates += 1
            written[outcome.output] = outcome.src
            if audit:
                audit.event("deidentified", patient=r.patient_pseudonym, study_uid=r.study_instance_uid,
                            series_uid=r.series_instance_uid, sop_instance_uid=r.sop_instance_uid)
                if r.crosswalk:
                    audit.map(*r.crosswalk)
                if r.pixel_text:
                    audit.record_pixel_text((r.sop_instance_uid, *region) for region in r.pixel_text)
            getattr(logger, instance_level)(
                "instance.deidentified", sop_instance_uid=r.sop_instance_uid, patient=r.patient_pseudonym,
                modality=r.modality, bytes_in=r.bytes_in, bytes_out=r.bytes_out, ms=round(outcome.seconds * 1000, 1))
        if progress:
            progress.update(len(written) + duplicates, len(refused))
    if workers > 1:
        pool.shutdown()
    if audit:
        audit.close()
    if progress:
        progress.finish()
    seconds = time.perf_counter() - started
    print(f"read {len(paths)}, written {len(written)}"
          + (f" ({duplicates} duplicate instances overwrote an earlier copy)" if duplicates else "")
          + f", refused {len(refused)} in {seconds:.1f} s")
    for outcome in refused:
        print(f"  refused {_relative(outcome.src, src)}: {outcome.reason}")
    getattr(logger, instance_level)("deid.summary", read=len(paths), written=len(written), duplicates=duplicates,
                refused=len(refused), seconds=round(seconds, 2))
    return 1 if refused else 0


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) if root.is_dir() else str(path)
    except ValueError:
        return str(path)


class _Progress:
    """A one-line progress bar on the terminal."""

    def __init__(self, total: int):
        self.total = total
        self.last = 0.0

    def update(self, done: int, refused: int) -> None:
        now = time.monotonic()
        count = done + refused
        if now - self.last < 0.1 and count < self.total:
            return
        self.last = now
        width = 30
        filled = width * count // max(self.total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {count}/{self.total}  refused {refused}")
        sys.stderr.flush()

    def finish(self) -> None:
        sys.stderr.write("\n")
