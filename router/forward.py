"""The export stage: one forwarder per destination, working through outgoing/<dest>/.

DICOM destinations: a C-STORE SCU on a thread of the forwarder (``router.association``;
our calling AE title toward it: ``Destination.calling_ae_title``) keeps an association
open across instances and releases it after ``idle_timeout_seconds`` without work; one the
destination ended while idle is noticed before the next send and made again. Up to
``associations`` of them send at once while a backlog waits (see ``Forwarder``). Its
presentation contexts are built from what is waiting to be sent (SOP class x {the file's
transfer syntax, Explicit VR LE, Implicit VR LE}, at most 128); a new SOP class or
transfer syntax means a new association. An instance goes in its own transfer syntax,
streamed from the spool file without decoding it; if the destination accepts its SOP
class only uncompressed, it is decompressed losslessly and sent Explicit (or Implicit) VR
Little Endian, frame by frame through a nameless scratch file (``write_decompressed``).

Success (0x0000) and warning (0x0001, 0xBxxx) statuses complete an instance: its outgoing
link is deleted (or moved to done/<dest>/). A failure status, an abort or a time-out while
sending it, or a SOP class the destination does not accept count as an attempt: the
instance waits ``retry_initial_seconds`` doubling up to ``retry_max_seconds`` while the
others go on, and after ``max_attempts`` it goes to quarantine/<dest>/ with a reason file
(after ``refused_attempts``, 3: seconds, not minutes, where the destination refused it
outright: a failure status but 0xA7xx, its SOP class not accepted; waiting changes nothing).
When the destination cannot be reached at all (connection refused, association rejected),
no instance is charged: the whole destination backs off the same way and everything stays
queued in outgoing/<dest>/ until it is back (an outage must not empty the queue into the
quarantine). So when a failure may be the destination's state rather than the instance's
fault: 0xA7xx (Refused: Out of Resources: a PACS whose disk is full), no answer (the
association lost or timed out during the C-STORE: a PACS crashing or hanging), a folder
that cannot be written (full, read-only, a share gone). Unless the destination took other
instances between two such failures of one instance: then it is that instance it cannot
take, and from then on its failures count as attempts; or, for no answer with nothing else
waiting, the destination answers a C-ECHO right after (``Forwarder._stuck_alone``).

Folder destinations: ``<path>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` (new UIDs),
written atomically (tmp + fsync + rename).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import multiprocessing
import os
import shutil
import signal
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode, split_dataset

from router.association import AssociationError, Lost, StoreAssociation, bytes_pdus, file_pdus
from router.commands import VERIFICATION
from router.config import Config, Destination, NodeConfig
from router.encode import PIXEL_DATA, element_header, read_meta_uids
from router.deidentify import (Routed, StartError, configure_logging, describe_exception, kill_process,
                               process_alive)
from router.profile import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from router.log import get_logger
from router.spool import SUFFIX, Spool, fsync_dir, safe_name
from router.tls import client_context

log = get_logger("router.forward")

MAX_CONTEXTS = 128
MAX_PDU = 131072
#: How far ahead in the queue the forwarder looks when it plans an association's contexts.
LOOKAHEAD = 256
#: Look for outgoing files nobody told us about (a lost notification) this often when idle.
RESCAN_SECONDS = 60.0
#: The main process's message asking a forwarder process to look at outgoing/ again.
LOOK_AGAIN = "look-again"
#: An extra association (a second lane) must be accepted within this, else the lane rests
#: this long and the destination keeps one association.
EXTRA_ASSOCIATION_SECONDS = 3.0
EXTRA_REST_SECONDS = 60.0
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


# --------------------------------------------------------------------------- statuses
def status_category(status: int) -> str:
    if status == 0x0000:
        return "success"
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


def status_text(status: int) -> str:
    try:
        from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, GENERAL_STATUS

        for table in (STORAGE_SERVICE_CLASS_STATUS, GENERAL_STATUS):
            if status in table:
                category, description = table[status]
                return f"0x{status:04X} ({category}: {description})" if description else f"0x{status:04X} ({category})"
        if 0xA700 <= status <= 0xA7FF:
            return f"0x{status:04X} (Failure: Refused: Out of Resources)"
        if 0xA900 <= status <= 0xA9FF:
            return f"0x{status:04X} (Failure: Data Set does not match SOP Class)"
        if 0xC000 <= status <= 0xCFFF:
            return f"0x{status:04X} (Failure: Cannot Understand)"
    except ImportError:
        pass
    return f"0x{status:04X}"


# ------------------------------------------------------------------------------- echo
def echo(host: str, port: int, called_ae: str = "ANY-SCP", calling_ae: str = "DEID_ROUTER",
         timeout: float = 10.0) -> bool:
    """C-ECHO a peer; print and log the outcome (a rejection with its reason). True on
    status 0x0000."""
    started = time.perf_counter()
    ok = False
    try:
        assoc = StoreAssociation.request(host, port, calling_ae, called_ae, [(VERIFICATION, ImplicitVRLittleEndian)],
                                         timeout, 16384, (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION))
        context_id = assoc.contexts.get((VERIFICATION, ImplicitVRLittleEndian))
        if context_id is None:
            assoc.abort()
            detail = "the peer did not accept the Verification SOP Class"
        else:
            code = assoc.echo(context_id)
            assoc.release()
            ok = code == 0x0000
            detail = status_text(code)
    except AssociationError as exc:
        detail = str(exc)
    except (OSError, ValueError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
    ms = round((time.perf_counter() - started) * 1000, 1)
    event = log.info if ok else log.error
    event("echo", host=host, port=port, called_ae=called_ae, calling_ae=calling_ae, ok=ok, detail=detail, ms=ms)
    print(f"C-ECHO {called_ae}@{host}:{port}: {'success' if ok else 'FAILED'} ({detail}, {ms} ms)")
    return ok


# ------------------------------------------------------------------------------ items
@dataclass
class Item:
    path: Path
    info: Routed | None = None
    attempts: int = 0
    free_retries: int = 0
    enqueued: float = field(default_factory=time.monotonic)
    #: Where the file's data set starts, when its meta was read just before the send.
    dataset_offset: int | None = None
    #: The file sent (its inode, found just before the send): a re-sent instance may replace
    #: the file of the same name meanwhile, and that one is still to be sent.
    inode: int | None = None
    #: The destination's count of delivered instances at this one's last "ambiguous"
    #: failure (see Forwarder._fails_alone), or None; and whether it took others since.
    failed_at: int | None = None
    fails_alone: bool = False


def read_info(path: Path) -> Routed:
    ds = dcmread(path, stop_before_pixels=True,
                 specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
    meta = ds.file_meta
    return Routed(
        path=path,
        sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")),
        patient_pseudonym="",
        bytes=path.stat().st_size,
    )


@dataclass
class Outcome:
    #: "delivered", "failed" (charged to the instance), "unavailable" (the destination),
    #: "retry" (free), "ambiguous" (the destination's or the instance's: Forwarder._fails_alone)
    kind: str
    detail: str = ""
    status: int | None = None
    mode: str = ""


# -------------------------------------------------------------------------- senders
class DicomSender:
    """One kept-open association toward a DICOM destination (``router.association``)."""

    def __init__(self, dest: Destination, node: NodeConfig, scratch_file: Callable[[], BinaryIO],
                 negotiation_timeout: float | None = None):
        self.dest = dest
        #: Where a decompressed copy is written to be sent (``Spool.scratch_file``).
        self.scratch_file = scratch_file
        self.negotiation_timeout = negotiation_timeout
        self.calling_ae = dest.calling_ae_title or node.ae_title
        self.assoc: StoreAssociation | None = None
        self.tls_args = client_context(dest) if dest.tls else None
        self.covered: set[tuple[str, str]] = set()
        self.accepted: dict[str, set[str]] = {}
        self.last_used = 0.0
        self.sent_on_assoc = 0
        #: Pairs sent lately, most recent last: proposed again so that a retry of one
        #: kind does not force a new association for the others.
        self.recent: dict[tuple[str, str], None] = {}

    @property
    def connected(self) -> bool:
        return self.assoc is not None and self.assoc.open

    def close(self, reason: str = "idle") -> None:
        assoc, self.assoc = self.assoc, None
        self.covered, self.accepted = set(), {}
        if assoc is None or not assoc.open:
            return
        assoc.release()
        log.info("association_released", destination=self.dest.name, reason=reason, instances=self.sent_on_assoc)

    def answers_echo(self) -> bool:
        """Whether the destination takes an association of its own and answers a C-ECHO
        with success now."""
        try:
            assoc = self._associate([(VERIFICATION, ImplicitVRLittleEndian)])
        except (AssociationError, OSError):  # ssl.SSLError too
            return False
        try:
            context_id = assoc.contexts.get((VERIFICATION, ImplicitVRLittleEndian))
            ok = context_id is not None and assoc.echo(context_id) == 0x0000
        except AssociationError:
            return False
        if ok:
            assoc.release()
        else:
            assoc.abort()
        return ok

    def plan(self, pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], set[tuple[str, str]]]:
        """Presentation contexts for pairs (head first), at most 128, and the pairs covered."""
        by_class: dict[str, list[str]] = {}
        for sop, ts in pairs:
            by_class.setdefault(sop, [])
            if ts not in by_class[sop]:
                by_class[sop].append(ts)
        contexts: list[tuple[str, str]] = []
        covered = set()
        for sop, syntaxes in by_class.items():
            wanted = [ts for ts in syntaxes if ts not in UNCOMPRESSED] + list(UNCOMPRESSED)
            if len(contexts) + len(wanted) > MAX_CONTEXTS:
                if contexts:
                    continue
                wanted = wanted[:MAX_CONTEXTS]
            contexts += [(sop, ts) for ts in wanted]
            covered.update((sop, ts) for ts in syntaxes)
        return contexts, covered

    def _associate(self, contexts: list[tuple[str, str]]) -> StoreAssociation:
        """An association with the destination proposing these contexts, as this node calls it."""
        return StoreAssociation.request(
            self.dest.host, self.dest.port, self.calling_ae, self.dest.ae_title, contexts,
            timeout=self.dest.timeout_seconds, max_pdu=MAX_PDU,
            implementation=(IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION), tls=self.tls_args,
            negotiation_timeout=self.negotiation_timeout)

    def connect(self, pairs: list[tuple[str, str]]) -> str | None:
        """(Re)associate for these pairs; returns a problem or None."""
        self.close(reason="new presentation contexts")
        contexts, covered = self.plan(pairs)
        try:
            assoc = self._associate(contexts)
        except ssl.SSLError as exc:
            failure = self.tls_args[0].take_failure() if self.tls_args else None
            return f"TLS handshake failed: {failure or exc.reason or type(exc).__name__}"
        except AssociationError as exc:
            return str(exc)
        self.assoc = assoc
        self.covered = covered
        self.accepted = {}
        for sop, ts in assoc.contexts:
            self.accepted.setdefault(sop, set()).add(ts)
        self.sent_on_assoc = 0
        self.last_used = time.monotonic()
        log.info("association_opened", destination=self.dest.name, proposed=len(contexts),
                 accepted=len(assoc.contexts))
        return None

    def send(self, item: Item, lookahead) -> Outcome:
        info = item.info
        pair = (info.sop_class_uid, info.transfer_syntax_uid)
        if self.connected:
            try:
                self.assoc.check_idle()
            except Lost as exc:
                self.close(reason="lost")
                log.info("association_lost", destination=self.dest.name, reason=str(exc))
        if not self.connected or pair not in self.covered:
            wanted = dict.fromkeys([pair, *lookahead(), *reversed(self.recent)])
            problem = self.connect(list(wanted))
            if problem:
                return Outcome("unavailable", problem)
        self.recent.pop(pair, None)
        self.recent[pair] = None
        while len(self.recent) > MAX_CONTEXTS:
            del self.recent[next(iter(self.recent))]
        accepted = self.accepted.get(info.sop_class_uid, set())
        if info.transfer_syntax_uid in accepted:
            mode = "as-is"
            syntax = info.transfer_syntax_uid
        elif accepted & set(UNCOMPRESSED):
            mode = "decompressed" if _is_compressed(info.transfer_syntax_uid) else "re-encoded"
            syntax = next(ts for ts in UNCOMPRESSED if ts in accepted)
        else:
            return Outcome("failed", "the destination accepted no presentation context for this SOP class "
                                     f"({info.sop_class_uid}) in {info.transfer_syntax_uid} or uncompressed")
        assoc = self.assoc
        context_id = assoc.contexts[(info.sop_class_uid, syntax)]
        source = None
        if mode == "as-is":
            try:
                offset = item.dataset_offset if item.dataset_offset is not None else _dataset_offset(item.path)
            except FileNotFoundError:
                raise
            except Exception as exc:
                return Outcome("failed", f"outgoing file unreadable: {describe_exception(exc)}")
            source = open(item.path, "rb", buffering=0)  # noqa: SIM115 - closed below
            fragments = file_pdus(source, offset, context_id, assoc.fragment_size)
        elif mode == "decompressed" and frame_by_frame(info.transfer_syntax_uid):
            source = self.scratch_file()
            try:
                write_decompressed(item.path, syntax, source)
            except FileNotFoundError:
                source.close()
                raise
            except Exception as exc:
                source.close()
                if isinstance(exc, OSError) and exc.errno is not None:  # the spool's disk, as a folder's
                    return Outcome("ambiguous", f"cannot write the decompressed copy: {exc.strerror}")
                return self._conversion_failed(info, exc)  # a decoder's OSError has no errno
            fragments = file_pdus(source, 0, context_id, assoc.fragment_size)
        else:
            try:
                fragments = bytes_pdus(encode_dataset(load_uncompressed(item.path), syntax), context_id,
                                       assoc.fragment_size)
            except FileNotFoundError:
                raise
            except Exception as exc:
                return self._conversion_failed(info, exc)
        try:
            code = assoc.send(context_id, info.sop_class_uid, info.sop_instance_uid, fragments)
        except Lost as exc:
            self.close(reason="lost")
            if exc.released:  # it ended the association in order, unanswered: send again, free
                return Outcome("retry", str(exc), mode=mode)
            return Outcome("ambiguous", f"no response ({exc})", mode=mode)
        except ValueError as exc:
            return Outcome("failed", f"send failed: {describe_exception(exc)}", mode=mode)
        finally:
            if source is not None:
                source.close()
        self.last_used = time.monotonic()
        self.sent_on_assoc += 1
        if status_category(code) in ("success", "warning"):
            return Outcome("delivered", status=code, mode=mode)
        kind = "ambiguous" if 0xA700 <= code <= 0xA7FF else "failed"  # Refused: Out of Resources
        return Outcome(kind, f"destination answered {status_text(code)}", status=code, mode=mode)

    @staticmethod
    def _conversion_failed(info: Routed, exc: Exception) -> Outcome:
        return Outcome("failed", f"the destination takes SOP class {info.sop_class_uid} only uncompressed "
                                 f"and converting from {info.transfer_syntax_uid} failed: {describe_exception(exc)}")


def _dataset_offset(path: Path) -> int:
    """Where the data set starts in a Part 10 file (after its meta group)."""
    uids = read_meta_uids(path)
    return uids[1] if uids is not None else split_dataset(path)[1]


def encode_dataset(ds, syntax: str) -> bytes:
    """ds encoded in an uncompressed little endian transfer syntax, for the network."""
    encoded = encode(ds, syntax == ImplicitVRLittleEndian, True)
    if encoded is None:
        raise ValueError("the data set could not be encoded")
    return encoded


def _is_compressed(syntax: str) -> bool:
    try:
        return UID(syntax).is_compressed
    except ValueError:
        return True  # a syntax pydicom does not know: nothing to do but decode its pixel data


def frame_by_frame(syntax: str) -> bool:
    """Whether pydicom decodes this compressed syntax frame by frame (all but Deflated
    Image Frame Compression, which ``router.pixels.inflated`` handles whole)."""
    return syntax != "1.2.840.10008.1.2.8.1" and _is_compressed(syntax) and UID(syntax).is_transfer_syntax


def write_decompressed(path: Path, syntax: str, out: BinaryIO) -> None:
    """The instance's data set with its pixel data decompressed (losslessly, as
    ``Dataset.decompress`` does) in an uncompressed little endian syntax, written to out
    frame by frame: the compressed bytes and one decoded frame in memory, not a clip's
    decoded frames and their encoding besides."""
    ds = dcmread(path)
    frames = get_decoder(ds.file_meta.TransferSyntaxUID).iter_array(ds, as_rgb=True)
    first, image_pixel = next(frames)
    count = int(ds.get("NumberOfFrames") or 1)
    length = first.nbytes * count
    if length >= 0xFFFFFFFF:
        raise ValueError("the decompressed pixel data would exceed the 4 GB a value can hold")
    ds.PhotometricInterpretation = image_pixel["photometric_interpretation"]
    if image_pixel["samples_per_pixel"] > 1:
        ds.PlanarConfiguration = image_pixel["planar_configuration"]
    after = Dataset()  # elements after Pixel Data (rare), written after it
    for tag in [tag for tag in ds.keys() if tag > PIXEL_DATA]:
        after[tag] = ds.get_item(tag)
        del ds[tag]
    vr = "OB" if ds.BitsAllocated <= 8 else "OW"
    del ds.PixelData
    out.write(encode_dataset(ds, syntax))
    out.write(element_header(PIXEL_DATA, vr, length + length % 2, syntax == ImplicitVRLittleEndian))
    written = 0
    for arr in itertools.chain([first], (arr for arr, _ in frames)):
        if arr.nbytes != first.nbytes or written == length:
            raise ValueError("the frames decode to different sizes or more than Number of Frames")
        out.write(arr.data if arr.flags.c_contiguous else arr.tobytes())
        written += arr.nbytes
    if written != length:
        raise ValueError(f"{written // first.nbytes} frames decoded of the {count} Number of Frames says")
    if length % 2:
        out.write(b"\0")
    if len(after):
        after.set_original_encoding(*ds.original_encoding)
        out.write(encode_dataset(after, syntax))
    out.flush()


def load_uncompressed(path: Path):
    """The instance as a dataset in an uncompressed little endian syntax (lossless)."""
    ds = dcmread(path)
    ts = UID(ds.file_meta.TransferSyntaxUID)
    if ts == "1.2.840.10008.1.2.8.1":  # Deflated Image Frame Compression: pydicom cannot decode it
        from router.pixels import inflated

        native = inflated(ds)
        ds.PixelData = native.PixelData
        ds["PixelData"].VR = native["PixelData"].VR
        ds["PixelData"].is_undefined_length = False
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    elif _is_compressed(ts):
        ds.decompress(generate_instance_uid=False)
    elif not ts.is_little_endian:
        _big_to_little(ds)
    elif ts.is_deflated:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _big_to_little(ds) -> None:
    """Re-encode a big endian dataset's values as little endian (retired syntax)."""
    import numpy as np

    widths = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
    for elem in ds.iterall():  # also converts every raw element from big endian
        width = widths.get(elem.VR)
        if width and isinstance(elem.value, (bytes, bytearray)) and len(elem.value) % width == 0:
            dtype = np.dtype(f">u{width}")
            elem.value = np.frombuffer(elem.value, dtype=dtype).astype(dtype.newbyteorder("<")).tobytes()
    ds.set_original_encoding(False, True, ds.original_character_set)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


class FolderSender:
    """<path>/<Study>/<Series>/<SOPInstance>.dcm, written atomically."""

    def __init__(self, dest: Destination):
        self.dest = dest
        self.root = Path(dest.path).absolute()
        self.connected = False

    def close(self, reason: str = "") -> None:
        pass

    def send(self, item: Item, lookahead) -> Outcome:
        info = item.info
        folder = self.root / safe_name(info.study_instance_uid) / safe_name(info.series_instance_uid)
        final = folder / f"{safe_name(info.sop_instance_uid)}{SUFFIX}"
        try:
            created = _makedirs(folder)
            temp = folder / f".{final.name}.{uuid.uuid4().hex}.tmp"
            try:
                with open(item.path, "rb") as src, open(temp, "xb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                os.rename(temp, final)
            except BaseException:
                try:
                    temp.unlink()
                except OSError:
                    pass
                raise
            fsync_dir(folder)
            for parent in created:
                fsync_dir(parent.parent)
        except FileNotFoundError:
            if not item.path.exists():
                raise
            return Outcome("ambiguous", "cannot write to the folder: FileNotFoundError")
        except OSError as exc:
            return Outcome("ambiguous", f"cannot write to the folder: {exc.strerror or type(exc).__name__}")
        return Outcome("delivered", status=0, mode="file")


def _makedirs(folder: Path) -> list[Path]:
    created = []
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    for path in reversed(missing):
        try:
            path.mkdir()
            created.append(path)
        except FileExistsError:
            pass
    return created


# ------------------------------------------------------------------------ forwarder
class Forwarder:
    """Works through outgoing/<dest>/ oldest first, on one thread per association (lane).

    A DICOM destination gets up to ``associations`` lanes: the first always sends; the
    others take an instance only while another lane is busy, so a second association
    sends while the first waits for the destination's answer (a PACS that fsyncs every
    file answers in milliseconds). An extra lane whose association is not accepted within
    EXTRA_ASSOCIATION_SECONDS (dcmtk's storescp without --fork serves one association at
    a time; a PACS may limit them) hands its instance back and rests EXTRA_REST_SECONDS:
    only the first lane decides that a destination is down.
    """

    def __init__(self, dest: Destination, spool: Spool, node: NodeConfig,
                 on_event: Callable[..., None] = lambda *event: None):
        self.dest = dest
        self.spool = spool
        #: ("delivered", freed bytes, send s, latency s, sop uid, study uid, series uid, patient, file name,
        #: inode), ("retried", sop uid, detail), ("quarantined", sop uid, reason, file name, inode),
        #: ("state", up|down, detail)
        self.on_event = on_event
        if dest.type == "folder":
            self.senders: list[FolderSender | DicomSender] = [FolderSender(dest)]
        else:
            self.senders = [DicomSender(dest, node, spool.scratch_file)] + [
                DicomSender(dest, node, spool.scratch_file,
                            negotiation_timeout=min(dest.timeout_seconds, EXTRA_ASSOCIATION_SECONDS))
                for _ in range(dest.associations - 1)]
        self._cond = threading.Condition()
        self._ready: collections.deque[Item] = collections.deque()
        self._delayed: list[tuple[float, int, Item]] = []
        self._seq = itertools.count()
        self._known: set[Path] = set()
        self._stopping = False
        self._unavailable_until = 0.0
        self._outage_backoff = 0.0
        self._outage_started: float | None = None
        self._last_rescan = time.monotonic()
        self._asked_to_look = False  # look_again: files put back are expected, not lost notifications
        self._busy = 0  # lanes sending now
        self._resting_until = [0.0] * len(self.senders)
        self._threads = [threading.Thread(target=self._run, args=(lane,), name=f"forward-{dest.name}-{lane}",
                                          daemon=True) for lane in range(len(self.senders))]
        self.stats = collections.Counter()

    # -------------------------------------------------------------- interface
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def enqueue(self, routed: Routed) -> None:
        self._add(Item(routed.path, routed))

    def resume(self) -> int:
        paths = self.spool.list_outgoing(self.dest.name)
        for path in paths:
            self._add(Item(path))
        return len(paths)

    def pending(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._delayed) + self._busy

    def look_again(self) -> None:
        """Look for files in outgoing/<dest>/ it does not know (put back by ``deid-router
        requeue``) as soon as nothing is ready to send, not a minute later."""
        with self._cond:
            self._last_rescan = -RESCAN_SECONDS
            self._asked_to_look = True
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _add(self, item: Item) -> None:
        with self._cond:
            if item.path in self._known:
                return
            self._known.add(item.path)
            self._ready.append(item)
            self._cond.notify_all()

    def _forget(self, item: Item) -> None:
        with self._cond:
            self._known.discard(item.path)

    def _count(self, what: str) -> None:
        with self._cond:
            self.stats[what] += 1

    def _lookahead(self) -> list[tuple[str, str]]:
        with self._cond:
            items = list(itertools.islice(self._ready, LOOKAHEAD))
        pairs = []
        for item in items:
            if item.info is None:
                try:
                    item.info = read_info(item.path)
                except Exception:
                    continue
            pairs.append((item.info.sop_class_uid, item.info.transfer_syntax_uid))
        return pairs

    # -------------------------------------------------------------------- loop
    def _run(self, lane: int) -> None:
        sender = self.senders[lane]
        while True:
            item = None
            join = False  # an extra lane's first step: an association, before it takes anything
            with self._cond:
                if self._stopping:
                    break
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    _due, _seq, due_item = heapq.heappop(self._delayed)
                    self._ready.appendleft(due_item)
                if now < self._unavailable_until:
                    self._cond.wait(self._unavailable_until - now)
                    continue
                # An extra lane helps only while another one is busy on an association (not
                # during an outage), and not while it rests.
                if self._ready and (lane == 0 or (self._busy and self.senders[0].connected
                                                  and now >= self._resting_until[lane])):
                    if lane and not sender.connected:
                        join = True
                    else:
                        item = self._ready.popleft()
                        self._busy += 1
                        if self._ready and len(self.senders) > 1:
                            self._cond.notify_all()  # a backlog: an extra lane may help now
                else:
                    waits = [RESCAN_SECONDS - (now - self._last_rescan)]
                    if self._delayed:
                        waits.append(self._delayed[0][0] - now)
                    if sender.connected:
                        waits.append(sender.last_used + self.dest.idle_timeout_seconds - now)
                    if lane and self._resting_until[lane] > now:
                        waits.append(self._resting_until[lane] - now)
                    self._cond.wait(max(0.01, min(waits)))
            if join:
                self._join(lane)
                continue
            if item is None:
                self._idle_chores(lane)
                continue
            try:
                self._handle(item, lane)
            except Exception as exc:
                log.error("forward_error", destination=self.dest.name, error=describe_exception(exc))
                self._schedule_retry(item, f"internal error: {describe_exception(exc)}", None, "error")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()
        sender.close(reason="stopping")

    def _idle_chores(self, lane: int) -> None:
        now = time.monotonic()
        sender = self.senders[lane]
        if sender.connected and now - sender.last_used >= self.dest.idle_timeout_seconds:
            sender.close(reason="idle")
        if lane or now - self._last_rescan < RESCAN_SECONDS:
            return
        with self._cond:
            self._last_rescan, asked, self._asked_to_look = now, self._asked_to_look, False
        found = 0
        for path in self.spool.list_outgoing(self.dest.name):
            with self._cond:
                known = path in self._known
            if not known:
                self._add(Item(path))
                found += 1
        if found and asked:
            log.info("outgoing_put_back", destination=self.dest.name, count=found)
        elif found:
            log.warning("outgoing_found", destination=self.dest.name, count=found,
                        note="in outgoing/ without the de-identify stage's notice")

    def _handle(self, item: Item, lane: int = 0) -> None:
        if item.info is None:
            try:
                item.info = read_info(item.path)
            except FileNotFoundError:
                self._forget(item)
                return
            except Exception as exc:
                self._quarantine(item, f"outgoing file unreadable: {describe_exception(exc)}", None)
                return
        else:
            # The file may have been replaced since it was queued (another instance with
            # the same SOP Instance UID): send what the file is, not what it was.
            try:
                uids = read_meta_uids(item.path)
                meta = uids[0] if uids is not None else read_file_meta_info(item.path)
                item.dataset_offset = uids[1] if uids is not None else None
            except FileNotFoundError:
                self._forget(item)
                return
            except Exception as exc:
                self._quarantine(item, f"outgoing file unreadable: {describe_exception(exc)}", None)
                return
            sop_class = str(meta.get("MediaStorageSOPClassUID", "") or item.info.sop_class_uid)
            syntax = str(meta.get("TransferSyntaxUID", "") or item.info.transfer_syntax_uid)
            if (sop_class, syntax) != (item.info.sop_class_uid, item.info.transfer_syntax_uid):
                item.info = replace(item.info, sop_class_uid=sop_class, transfer_syntax_uid=syntax)
        try:
            found = os.stat(item.path)
        except FileNotFoundError:
            self._forget(item)
            return
        acknowledged = found.st_mtime  # set to the receive time by the de-identify stage
        item.inode = found.st_ino
        started = time.perf_counter()
        try:
            outcome = self.senders[lane].send(item, self._lookahead)
        except FileNotFoundError:
            self._forget(item)  # a duplicate of an instance already delivered
            return
        seconds = time.perf_counter() - started
        info = item.info
        if outcome.kind == "delivered":
            item.attempts += 1
            self._recovered()
            freed = self.spool.delivered(item.path, self.dest.name, item.inode)
            sent = item.inode
            if freed is None:
                self._send_again(item)
            else:
                self._forget(item)
            self._count("forwarded")
            latency = max(0.0, time.time() - acknowledged)
            self.on_event("delivered", freed or 0, seconds, latency, info.sop_instance_uid, info.study_instance_uid,
                          info.series_instance_uid, info.patient_pseudonym, item.path.name, sent)
            log.info("forwarded", destination=self.dest.name, sop_instance_uid=info.sop_instance_uid,
                     patient=info.patient_pseudonym or None, bytes=info.bytes, ms=round(seconds * 1000, 2),
                     latency_ms=round(latency * 1000, 1), status=f"0x{outcome.status:04X}",
                     attempts=item.attempts, mode=outcome.mode)
            if outcome.status:
                log.warning("forwarded_with_warning", destination=self.dest.name,
                            sop_instance_uid=info.sop_instance_uid, status=status_text(outcome.status))
        elif outcome.kind == "unavailable" and lane:
            self._rest(lane, item, outcome.detail)
        elif outcome.kind == "unavailable":
            self._unavailable(item, outcome.detail)
        elif outcome.kind == "ambiguous" and not self._fails_alone(item) and not self._stuck_alone(lane, outcome):
            self._unavailable(item, outcome.detail, last=True)
        elif outcome.kind == "retry" and item.free_retries < 2:
            item.free_retries += 1
            with self._cond:
                self._ready.appendleft(item)
        else:
            item.attempts += 1
            self._recovered()
            self._schedule_retry(item, outcome.detail, outcome.status, outcome.mode, refused=outcome.kind == "failed")

    def _send_again(self, item: Item) -> None:
        """The file was replaced while it was being sent (the same instance received again,
        maybe changed): the new one is sent too, first, with attempts of its own."""
        log.info("replaced_while_sent", destination=self.dest.name,
                 sop_instance_uid=item.info.sop_instance_uid if item.info else None)
        item.attempts = item.free_retries = 0
        item.dataset_offset = item.inode = item.failed_at = None
        item.fails_alone = False
        with self._cond:
            self._ready.appendleft(item)
            self._cond.notify_all()

    def _schedule_retry(self, item: Item, detail: str, status: int | None, mode: str, refused: bool = False) -> None:
        """Send ``item`` again later, or quarantine it after its last attempt (fewer where the
        destination refused it outright: ``Destination.refused_attempts``)."""
        info = item.info
        uid = info.sop_instance_uid if info else None
        limit = min(self.dest.max_attempts, self.dest.refused_attempts) if refused else self.dest.max_attempts
        if item.attempts >= limit:
            self._quarantine(item, detail, status)
            return
        delay = min(self.dest.retry_max_seconds, self.dest.retry_initial_seconds * 2 ** max(0, item.attempts - 1))
        self._count("retried")
        self.on_event("retried", uid, detail)
        log.warning("retried", destination=self.dest.name, sop_instance_uid=uid, attempt=item.attempts,
                    max_attempts=limit, reason=detail,
                    status=f"0x{status:04X}" if status is not None else None, retry_in_s=round(delay, 3))
        with self._cond:
            heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._seq), item))

    def _quarantine(self, item: Item, detail: str, status: int | None) -> None:
        info = item.info
        uid = info.sop_instance_uid if info else None
        reason = f"not delivered after {item.attempts} attempt(s): {detail}"
        inode = None
        try:
            inode = os.stat(item.path).st_ino
            if item.inode is not None and inode != item.inode:
                self._send_again(item)  # what failed is gone; its replacement is tried afresh
                return
            self.spool.quarantine(item.path, self.dest.name, item.path.name, reason, stage="forward",
                                  destination=self.dest.name, attempts=item.attempts,
                                  status=f"0x{status:04X}" if status is not None else None,
                                  sop_instance_uid=uid)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("quarantine_failed", destination=self.dest.name, sop_instance_uid=uid,
                      error=describe_exception(exc))
            with self._cond:
                heapq.heappush(self._delayed, (time.monotonic() + self.dest.retry_max_seconds, next(self._seq), item))
            return
        self._forget(item)
        self._count("quarantined")
        self.on_event("quarantined", uid, reason, item.path.name, inode)
        log.warning("quarantined", stage="forward", destination=self.dest.name, sop_instance_uid=uid,
                    reason=reason, attempts=item.attempts,
                    status=f"0x{status:04X}" if status is not None else None)

    def _join(self, lane: int) -> None:
        """An extra lane associates first, holding no instance: a destination that serves
        one association at a time must not keep an instance waiting for its answer."""
        problem = self.senders[lane].connect(self._lookahead())
        if problem:
            self._rest(lane, None, problem)

    def _rest(self, lane: int, item: Item | None, detail: str) -> None:
        """An extra lane's association was not accepted: its instance (if it held one) goes
        back to the head of the queue, for the first lane, and the lane rests."""
        with self._cond:
            if item is not None:
                self._ready.appendleft(item)
            self._resting_until[lane] = time.monotonic() + EXTRA_REST_SECONDS
            self._cond.notify_all()
        log.info("extra_association_refused", destination=self.dest.name, lane=lane, reason=detail,
                 retry_in_s=EXTRA_REST_SECONDS)

    def _fails_alone(self, item: Item) -> bool:
        """Sending ``item`` failed in a way that may be the destination's state (0xA7xx: a
        full disk; no answer: a crashing or hanging PACS; a folder not writable), which is
        like an outage: nothing charged. Unless the destination ever took other instances
        between two such failures of this one: then it is this one it cannot take (too
        large, say, or one that crashes it), and from then on its failures are charged."""
        with self._cond:
            delivered = self.stats["forwarded"]
        if item.failed_at is not None and delivered > item.failed_at:
            item.fails_alone = True
        item.failed_at = delivered
        return item.fails_alone

    def _stuck_alone(self, lane: int, outcome: Outcome) -> bool:
        """An instance sent with nothing else waiting went unanswered (the association
        aborted, lost or timed out): the destination answering a C-ECHO on an association of
        its own right after tells that it is alive and that it is this instance it aborts or
        hangs on, charged as a failure (others waiting tell the same by being delivered,
        ``_fails_alone``; without either it would wait as an outage for ever). Not a refusal
        for lack of room (0xA7xx) or a folder destination."""
        sender = self.senders[lane]
        if outcome.status is not None or not isinstance(sender, DicomSender):
            return False
        return self.pending() == 1 and sender.answers_echo()

    def _unavailable(self, item: Item, detail: str, last: bool = False) -> None:
        """The destination cannot take instances now: nothing is charged, everything waits
        while it backs off. ``item`` goes back first in line, or ``last`` (it failed: the
        others are tried before it again)."""
        now = time.monotonic()
        with self._cond:
            if self._outage_started is None:
                self._outage_started = now
            self._outage_backoff = min(self.dest.retry_max_seconds,
                                       max(self.dest.retry_initial_seconds, self._outage_backoff * 2))
            if last:
                self._ready.append(item)
            else:
                self._ready.appendleft(item)
            self._unavailable_until = now + self._outage_backoff
            queued = len(self._ready) + len(self._delayed) + self._busy - 1
            backoff, started = self._outage_backoff, self._outage_started
            self.stats["unavailable"] += 1
        self.on_event("state", "down", detail)
        log.warning("destination_unavailable", destination=self.dest.name, reason=detail, queued=queued,
                    retry_in_s=round(backoff, 3), down_for_s=round(now - started, 1))

    def _recovered(self) -> None:
        with self._cond:
            started, self._outage_started = self._outage_started, None
            self._outage_backoff = 0.0
        if started is not None:
            self.on_event("state", "up", None)
            log.info("destination_available", destination=self.dest.name,
                     down_for_s=round(time.monotonic() - started, 1))


# ------------------------------------------------------------------ forwarder processes
def forwarder_main(conn, config: Config, spool_root: str, dest_name: str) -> None:
    """A destination's forwarder process: instances come in on the pipe, events go out.

    In a process of its own, sending does not compete with the receive side for the main
    process's GIL.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the main process's "look again" (a closed terminal's too)
    configure_logging(config)
    dest = next(d for d in config.destinations if d.name == dest_name)
    spool = Spool(spool_root, [d.name for d in config.destinations], config.node.keep_delivered)
    lock = threading.Lock()

    def send(*message) -> None:
        with lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                pass  # the main process is gone: it resumes from outgoing/ when it starts again

    forwarder = Forwarder(dest, spool, config.node, on_event=send)
    queued = forwarder.resume()
    if queued:
        log.info("resumed", stage="forward", destination=dest.name, instances=queued)
    forwarder.start()
    log.info("forwarder_started", destination=dest.name, pid=os.getpid())
    send("ready", os.getpid())
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = None
        if message is None:
            break
        if message == LOOK_AGAIN:
            forwarder.look_again()
            continue
        forwarder.enqueue(message)
    forwarder.stop(timeout=30.0)
    send("stopped", forwarder.pending())


class ForwarderProcess:
    """The main process's handle on one destination's forwarder process.

    ``on_event(dest, event)`` receives what the forwarder reports (deliveries, retries,
    quarantines, destination state). A process that dies is started again after a pause;
    the new one resumes from outgoing/<dest>/, so nothing queued is lost.
    """

    RESTART_SECONDS = 1.0

    def __init__(self, config: Config, dest: Destination, spool: Spool,
                 on_event: Callable[[str, tuple], None]):
        self.config = config
        self.dest = dest
        self.spool = spool
        self.on_event = on_event
        self.ctx = multiprocessing.get_context("forkserver")
        self.process = None
        self._conn = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._stopping = False
        self._reader: threading.Thread | None = None
        self.restarts = 0

    def start(self, timeout: float = 60.0) -> None:
        self._spawn()
        self._reader = threading.Thread(target=self._read, name=f"forward-{self.dest.name}-events", daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            self._kill()
            raise StartError(f"the forwarder for {self.dest.name} did not start within {timeout:.0f} s")

    def _spawn(self) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(target=forwarder_main, name=f"forward-{self.dest.name}", daemon=True,
                                   args=(child, self.config, str(self.spool.root), self.dest.name))
        process.start()
        child.close()
        with self._lock:
            self.process, self._conn = process, parent

    def enqueue(self, routed: Routed) -> None:
        with self._lock:
            try:
                self._conn.send(routed)
            except (OSError, ValueError):
                pass  # the process is being restarted: it will find the file in outgoing/

    def look_again(self) -> None:
        """See ``Forwarder.look_again``."""
        with self._lock:
            try:
                self._conn.send(LOOK_AGAIN)
            except (OSError, ValueError, AttributeError):
                pass  # not started, or being restarted: a new process reads outgoing/ anyway

    def alive(self) -> bool:
        return self.process is not None and process_alive(self.process)

    def request_stop(self) -> None:
        """Ask the process to finish its current send and exit (see ``wait_stopped``)."""
        self._stopping = True
        if self._conn is None:
            self._stopped.set()
            return
        with self._lock:
            try:
                self._conn.send(None)
            except (OSError, ValueError):
                pass

    def wait_stopped(self, timeout: float) -> None:
        if not self._stopped.wait(max(0.0, timeout)):
            log.warning("forwarder_stop_timeout", destination=self.dest.name, seconds=round(timeout, 1))
        self._kill()

    def _kill(self) -> None:
        process = self.process
        if process is None:
            return
        process.join(timeout=5)
        kill_process(process)

    def _read(self) -> None:
        while True:
            conn = self._conn
            try:
                message = conn.recv()
            except (EOFError, OSError):
                if self._stopping:
                    self._stopped.set()
                    return
                self.process.join(timeout=5)
                log.error("forwarder_died", destination=self.dest.name,
                          exit=self.process.exitcode, action="restarting; it resumes from outgoing/")
                time.sleep(self.RESTART_SECONDS)
                if self._stopping:
                    self._stopped.set()
                    return
                self.restarts += 1
                self._spawn()
                continue
            kind = message[0]
            if kind == "ready":
                self._ready.set()
            elif kind == "stopped":
                self._stopped.set()
                return
            else:
                try:
                    self.on_event(self.dest.name, message)
                except Exception as exc:
                    log.error("event_failed", destination=self.dest.name, error=describe_exception(exc))
