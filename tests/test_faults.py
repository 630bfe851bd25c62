"""Faults, bounded in time, loopback only: repeated SIGKILL during 500 instances, a destination
down then back, failing one SOP class, hanging; a spool over its limit and a really full file
system; every corpus file and 1,000 damaged data sets over the network. In every run the
node's log, its spool's file names and its reason files hold none of the PHI that was sent.

The node is a black box here: a config, ``python -m router serve``, its spool directories
and its JSON log. What it acknowledged is what a pynetdicom SCU got 0x0000 for, per
instance. Random choices come from DEID_FAULT_SEED (printed, so a failure can be replayed).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmwrite
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage, Verification

import mutations
from bench.passthrough import install_checkpoint, nodelay
from bench.synthetic import ct_series
from peers import StoreSCP, free_port
from test_node_support import (
    REPO_ROOT,
    ROUTER_AET,
    Router,
    descendants,
    dicom_destination,
    fill_file_system,
    folder_destination,
    new_uid,
    wait_until,
)

SEED = int(os.environ.get("DEID_FAULT_SEED", "20261122"))
#: Every identifying value sent holds this token; none may reach a log or a file name.
MARKER = "PHIFAULT"
PHI = {
    "PatientName": "PHIFAULT^ZEBULON^Q",
    "PatientID": "PHIFAULT-PID-7731",
    "AccessionNumber": "PHIFAULTACC99",
    "InstitutionName": "PHIFAULT Memorial Hospital",
    "InstitutionAddress": "7 PHIFAULT Road, Springfield",
    "ReferringPhysicianName": "PHIFAULT^REFERRER",
    "OtherPatientIDs": "PHIFAULT-MRN-31",
    "PatientAddress": "PHIFAULT Lane 12",
}
#: What identifies in each value beyond the marker (the engine cuts known name tokens out of
#: kept text, so a value that escaped the profile may show only these).
PHI_REMNANTS = (b"ZEBULON", b"PID-7731", b"ACC99", b"Memorial", b"7 PHIFAULT Road", b"REFERRER", b"MRN-31", b"Lane 12")
OUT_OF_RESOURCES = 0xA700


@pytest.fixture(autouse=True)
def seed_and_raw_sending() -> Iterator[None]:
    """Print the seed (shown with a failure) and send files' bytes as they are, undecoded."""
    print(f"DEID_FAULT_SEED={SEED}")
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


# ---------------------------------------------------------------------------- instances
def phi_series(count: int, rows: int = 64, series_number: int = 2) -> list[Dataset]:
    """A CT series with the PHI markers planted (64x64: 500 of them take seconds)."""
    slices = []
    for ds in ct_series(count, patient_id=PHI["PatientID"], patient_name=PHI["PatientName"], rows=rows,
                        columns=rows, series_number=series_number, accession_number=PHI["AccessionNumber"]):
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        slices.append(ds)
    return slices


def write_all(folder: Path, datasets: Iterable[Dataset]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"i{index:04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def new_uids(datasets: Iterable[Dataset]) -> set[str]:
    return {new_uid(str(ds.SOPInstanceUID)) for ds in datasets}


def assert_no_phi(router: Router, originals: Iterable[str] = ()) -> None:
    """No marker (nor any original UID given) in the node's output, spool names or reasons."""
    needles = [MARKER, MARKER.lower(), *originals]
    text = router.log_text()
    for needle in needles:
        assert needle not in text, f"{needle!r} in the node's log"
    for path in router.spool.rglob("*"):
        assert not any(needle in str(path.relative_to(router.spool)) for needle in needles), path
        if path.name.endswith(".reason.json"):
            reason = path.read_text(errors="replace")
            assert not any(needle in reason for needle in needles), path


# ---------------------------------------------------------------------------- peers
class Sender:
    """A pynetdicom SCU sending Part 10 files undecoded, one C-STORE each; ``send`` returns
    the status the node answered, or None when there was no answer (aborted, node gone)."""

    def __init__(self, port: int, standing: Iterable[tuple[str, str]] = ()):
        self.port = port
        self.standing = list(standing)  # (SOP class, transfer syntax) pairs proposed every time
        self.ae = AE(ae_title="FAULTSCU")
        self.ae.maximum_pdu_size = 131072
        # A C-STORE the node neither answers nor aborts costs this much (see the full file
        # system test: it happens after an ENOSPC while receiving).
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 10
        self.assoc = None

    def _pairs(self) -> set[tuple[str, str]]:
        if self.assoc is None or not self.assoc.is_established:
            return set()
        return {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in self.assoc.accepted_contexts}

    def send(self, path: Path) -> int | None:
        meta = read_file_meta_info(path)
        pair = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        if pair not in self._pairs():
            self.close()
            pairs = list(dict.fromkeys([pair, *self.standing]))[:128]
            contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
            self.assoc = self.ae.associate("127.0.0.1", self.port, contexts=contexts, ae_title=ROUTER_AET,
                                           evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
            if not self.assoc.is_established:
                return None
            # pynetdicom's send race (field notes): without Nagle's delays the node's answers
            # come fast enough to lose one now and then to pynetdicom's reactor
            install_checkpoint(self.assoc)
        try:
            answer = self.assoc.send_c_store(path)
        except (RuntimeError, ValueError, OSError):
            return None
        return int(answer.Status) if answer is not None and "Status" in answer else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None


def send_all(port: int, paths: Iterable[Path], standing: Iterable[tuple[str, str]] = (), senders: int = 1
             ) -> dict[Path, int | None]:
    """Send paths over ``senders`` associations at once; the status of each."""
    paths = list(paths)
    answers: dict[Path, int | None] = {}

    def run(share: list[Path]) -> None:
        sender = Sender(port, [(str(CTImageStorage), mutations.EXPLICIT_LE), *standing])
        try:
            for path in share:
                answers[path] = sender.send(path)
        finally:
            sender.close()

    threads = [threading.Thread(target=run, args=(paths[i::senders],)) for i in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {path: answers.get(path) for path in paths}


class RecordingSCP:
    """A pynetdicom Storage SCP (and Verification SCP) that keeps a hash of every data set
    it is sent, per SOP Instance UID, answers ``status_for(sop_class, sop_instance)``,
    aborts the association where ``aborts_for(sop_instance)`` and can be made to hang."""

    def __init__(self, status_for=lambda sop_class, sop_instance: 0x0000, port: int | None = None,
                 seconds_per_store: float = 0.0, aborts_for=lambda sop_instance: False):
        self.status_for = status_for
        self.aborts_for = aborts_for
        self.seconds_per_store = seconds_per_store
        self.storing = 0  # C-STOREs being answered now, and the most at once
        self.most_storing = 0
        self.received: dict[str, list[str]] = {}
        self.hang = threading.Event()
        self.hanging = threading.Event()  # a C-STORE is waiting for ``released``
        self.released = threading.Event()
        self.port = port or free_port()
        self.lock = threading.Lock()
        self.ae = AE(ae_title="RECORDER")
        self.ae.maximum_pdu_size = 131072
        for context in (CTImageStorage, SecondaryCaptureImageStorage):
            self.ae.add_supported_context(context, [mutations.EXPLICIT_LE, mutations.IMPLICIT_LE])
        self.ae.add_supported_context(Verification)
        self.server = None

    def start(self) -> RecordingSCP:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def _store(self, event) -> int:
        if self.aborts_for(str(event.request.AffectedSOPInstanceUID)):
            with self.lock:
                self.received.setdefault(str(event.request.AffectedSOPInstanceUID), []).append("aborted")
            event.assoc.abort()
            return 0xC000
        if self.hang.is_set():
            self.hanging.set()
            self.released.wait(120)
        with self.lock:
            self.storing += 1
            self.most_storing = max(self.most_storing, self.storing)
        time.sleep(self.seconds_per_store)  # a PACS writing and fsyncing the file
        data = event.encoded_dataset(include_meta=False)
        with self.lock:
            self.storing -= 1
            self.received.setdefault(str(event.request.AffectedSOPInstanceUID), []).append(
                hashlib.sha256(data).hexdigest())
        return self.status_for(str(event.request.AffectedSOPClassUID), str(event.request.AffectedSOPInstanceUID))

    def uids(self) -> set[str]:
        with self.lock:
            return set(self.received)

    def stop(self) -> None:
        self.released.set()
        if self.server is not None:
            self.server.shutdown()


# ---------------------------------------------------------------------------- SIGKILL
def test_three_sigkills_during_500_instances(tmp_path: Path) -> None:
    """SIGKILL the node (and its processes) at random points three times while 500 instances
    come in; after each restart the sender goes on with what was not acknowledged. Every
    acknowledged instance is delivered; one delivered twice is delivered identically."""
    rng = random.Random(SEED)
    series = phi_series(500)
    files = write_all(tmp_path / "ct", series)
    uid_of = {path: new_uid(str(ds.SOPInstanceUID)) for path, ds in zip(files, series)}
    scp = RecordingSCP().start()
    router = Router(tmp_path, [dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER")])
    acknowledged: set[Path] = set()
    try:
        for round_ in range(3):
            remaining = [p for p in files if p not in acknowledged]
            kill_after, extra_ms = rng.randint(10, 150), rng.randint(0, 40)
            statuses: dict[Path, int | None] = {}

            def sending() -> None:
                sender = Sender(router.port)
                for path in remaining:
                    statuses[path] = sender.send(path)
                    if statuses[path] is None:
                        return  # the node is gone
                sender.close()

            with router.start():
                thread = threading.Thread(target=sending, daemon=True)
                thread.start()
                wait_until(lambda: len(statuses) >= kill_after or not thread.is_alive(), timeout=120, interval=0.005,
                           what=f"round {round_}: {kill_after} sent (seed {SEED})")
                time.sleep(extra_ms / 1000)
                router.kill()
                thread.join(60)
            assert not thread.is_alive()
            acknowledged |= {p for p, status in statuses.items() if status == 0x0000}
            assert not [s for s in statuses.values() if s not in (0x0000, None)], f"refusals (seed {SEED})"
        assert len(acknowledged) < len(files), f"the kills came too late to test anything (seed {SEED})"

        with router.start():
            rest = send_all(router.port, [p for p in files if p not in acknowledged])
            assert set(rest.values()) <= {0x0000}, f"refused after the restarts (seed {SEED})"
            expected = set(uid_of.values())
            wait_until(lambda: expected <= scp.uids(), timeout=120, interval=0.2,
                       what=f"every acknowledged instance delivered (seed {SEED})")
            with scp.lock:
                assert set(scp.received) == expected, f"unexpected instances delivered (seed {SEED})"
                changed = [uid for uid, hashes in scp.received.items() if len(set(hashes)) > 1]
                assert not changed, f"{len(changed)} re-deliveries differ from the first (seed {SEED})"
            wait_until(lambda: not router.files("incoming") and not router.files("outgoing", "recorder"),
                       timeout=30, what="an empty spool")
            assert not list((router.spool / "quarantine").rglob("*.dcm"))
            assert router.stop() == 0
        assert_no_phi(router, [str(ds.SOPInstanceUID) for ds in series[:50]] + [str(series[0].StudyInstanceUID)])
    finally:
        scp.stop()


def test_a_killed_forwarder_process_is_restarted_and_loses_nothing(tmp_path: Path) -> None:
    series = phi_series(20)
    files = write_all(tmp_path / "ct", series)
    out = tmp_path / "out"
    with Router(tmp_path, [folder_destination("out", out)]) as router:
        assert set(send_all(router.port, files[:10]).values()) == {0x0000}
        wait_until(lambda: len(list(out.rglob("*.dcm"))) == 10, timeout=30, what="first half delivered")
        [started] = router.events("forwarder_started")
        os.kill(started["pid"], 9)
        assert set(send_all(router.port, files[10:]).values()) == {0x0000}
        wait_until(lambda: len(list(out.rglob("*.dcm"))) == 20, timeout=60, what="second half delivered")
        assert {p.stem for p in out.rglob("*.dcm")} == new_uids(series)
        assert router.events("forwarder_died") and len(router.events("forwarder_started")) == 2
        assert router.stop() == 0
    assert_no_phi(router)


def test_a_killed_forkserver_kills_no_worker_and_blames_no_instance(tmp_path: Path) -> None:
    """The workers and forwarders are forked by multiprocessing's forkserver process. When it
    dies (kill -9, the OOM killer), it reports every child as dead (exit 255) although they
    run on: the node must not take them for dead (a worker's instance would be blamed, and
    quarantined the second time; a replacement would work beside the old one), and it must
    still stop them when it stops."""
    series = phi_series(20)
    files = write_all(tmp_path / "ct", series)
    out = tmp_path / "out"
    with Router(tmp_path, [folder_destination("out", out)]) as router:
        workers = router.worker_pids()
        [forwarder] = [event["pid"] for event in router.events("forwarder_started")]
        forkserver = int(Path(f"/proc/{workers[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
        assert forkserver != router.process.pid
        os.kill(forkserver, signal.SIGKILL)
        assert set(send_all(router.port, files).values()) == {0x0000}
        wait_until(lambda: len(list(out.rglob("*.dcm"))) == 20, timeout=30, what="all 20 written")
        assert not router.events("worker_died") and not router.events("worker_restarted")
        assert all(Path(f"/proc/{pid}").exists() for pid in workers)  # the same workers (init's children now)
        assert router.process.poll() is None
        assert router.stop() == 0
    for pid in (*workers, forwarder):
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert not router.files("quarantine", "deidentify")


# ---------------------------------------------------------------------------- destinations
@pytest.mark.parametrize("status", [0xA900, 0xC000], ids=["0xA900", "0xC000"])
def test_destination_failing_one_sop_class_quarantines_only_that_class(tmp_path: Path, status: int) -> None:
    series = phi_series(4)
    captures = phi_series(2, series_number=3)
    for ds in captures:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    files = write_all(tmp_path / "in", [*series, *captures])
    scp = RecordingSCP(lambda sop_class, _uid: status if sop_class == SecondaryCaptureImageStorage else 0x0000).start()
    try:
        dest = dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", max_attempts=2,
                                 retry_initial_seconds=0.2, retry_max_seconds=0.4)
        with Router(tmp_path, [dest]) as router:
            assert set(send_all(router.port, files).values()) == {0x0000}
            wait_until(lambda: len(router.reasons("recorder")) == 2, timeout=30, what="the SC instances quarantined")
            reasons = router.reasons("recorder")
            assert {r["sop_instance_uid"] for r in reasons} == new_uids(captures)
            assert all(f"0x{status:04X}" in r["reason"] and r["attempts"] == 2 for r in reasons)
            assert new_uids(series) <= scp.uids()
            with scp.lock:  # each SC instance tried exactly max_attempts times
                assert all(len(scp.received[uid]) == 2 for uid in new_uids(captures))
            # What sits in quarantine/<dest>/ is the de-identified instance.
            for path in router.files("quarantine", "recorder"):
                assert MARKER.encode() not in path.read_bytes()
            wait_until(lambda: not router.files("outgoing", "recorder"), timeout=10, what="an empty outgoing/")
            assert router.stop() == 0
        assert_no_phi(router)
    finally:
        scp.stop()


def test_instances_refused_outright_reach_the_quarantine_in_seconds(tmp_path: Path) -> None:
    """A failure status (0xC000) or a SOP class the destination does not take is its answer
    whatever the wait: with the default max_attempts (10, ~100 s at this backoff) such an
    instance is quarantined after refused_attempts (3) while the rest is delivered."""
    series = phi_series(3)
    captures = phi_series(1, series_number=3)
    for ds in captures:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    unsupported = phi_series(1, series_number=4)
    for ds in unsupported:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage  # the SCP has no context for it
    files = write_all(tmp_path / "in", [*series, *captures, *unsupported])
    scp = RecordingSCP(lambda sop_class, _uid: 0xC000 if sop_class == SecondaryCaptureImageStorage else 0x0000).start()
    try:
        dest = dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", retry_initial_seconds=0.2)
        with Router(tmp_path, [dest]) as router:
            started = time.monotonic()
            assert set(send_all(router.port, files).values()) == {0x0000}
            wait_until(lambda: len(router.reasons("recorder")) == 2, timeout=30, what="both refused instances quarantined")
            assert time.monotonic() - started < 30
            reasons = {r["sop_instance_uid"]: r for r in router.reasons("recorder")}
            [capture] = new_uids(captures)
            [mr] = new_uids(unsupported)
            assert set(reasons) == {capture, mr}
            assert "0xC000" in reasons[capture]["reason"] and reasons[capture]["attempts"] == 3
            assert "accepted no presentation context" in reasons[mr]["reason"] and reasons[mr]["attempts"] == 3
            with scp.lock:
                assert len(scp.received[capture]) == 3 and mr not in scp.received
            assert new_uids(series) <= scp.uids()
            assert router.stop() == 0
        assert_no_phi(router)
    finally:
        scp.stop()


def test_requeue_sends_quarantined_instances_through_their_stage_again(tmp_path: Path) -> None:
    """Once a quarantine's cause is fixed, `deid-router requeue` puts its instances back:
    quarantine/<dest>/ into outgoing/<dest>/ and deidentify/ into incoming/ while the node
    runs (it is told by SIGHUP and delivers them at once), unrouted/ routed again by a new
    config's filters while it is stopped (it takes them when it starts)."""
    refused = phi_series(2, series_number=3)
    for ds in refused:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    unrouted = phi_series(2, series_number=4)
    for ds in unrouted:
        ds.Modality = "MR"
    unread = phi_series(1, series_number=5)  # an original an earlier release refused
    refusing = threading.Event()
    refusing.set()
    scp = RecordingSCP(lambda sop_class, _uid: 0xA900 if refusing.is_set() and sop_class == SecondaryCaptureImageStorage
                       else 0x0000).start()

    def requeue(router: Router, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "router", "requeue", "--config", str(router.config_path), *args],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})

    try:
        dest = dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", max_attempts=1, modalities=["CT"])
        with Router(tmp_path, [dest]) as router:
            assert set(send_all(router.port, write_all(tmp_path / "in", [*refused, *unrouted])).values()) == {0x0000}
            wait_until(lambda: len(router.reasons("recorder")) == 2 and len(router.reasons("unrouted")) == 2,
                       timeout=30, what="both kinds quarantined")
            quarantined = router.spool / "quarantine" / "deidentify"
            [original] = write_all(tmp_path / "unread", unread)
            (quarantined / f"{'ab' * 16}.dcm").write_bytes(original.read_bytes())
            os.utime(quarantined / f"{'ab' * 16}.dcm", (time.time() - 3600, time.time() - 3600))  # received earlier
            (quarantined / f"{'ab' * 16}.reason.json").write_text('{"reason": "pixel data cannot be decoded"}')
            listing = requeue(router, "recorder", "deidentify", "--dry-run")
            assert listing.returncode == 0, listing.stderr
            assert "would move 2 to outgoing/recorder/" in listing.stdout and "would move 1 to incoming/" in listing.stdout
            assert "1 x pixel data cannot be decoded" in listing.stdout
            assert len(router.files("quarantine", "recorder")) == 2  # a dry run moves nothing
            refusing.clear()  # the destination takes Secondary Capture now
            started = time.monotonic()
            done = requeue(router, "recorder", "deidentify")
            assert done.returncode == 0, done.stderr
            assert f"running node (pid {router.process.pid}) is looking at them now" in done.stdout
            wanted = new_uids([*refused, *unread])
            wait_until(lambda: wanted <= scp.uids(), timeout=30, what="requeued instances delivered by the running node")
            assert time.monotonic() - started < 20  # told, not found by the minute's rescan
            assert router.events("outgoing_put_back") and not router.events("outgoing_found")
            for where in ("recorder", "deidentify"):
                assert list((router.spool / "quarantine" / where).iterdir()) == []  # reason files gone too
            assert router.stop() == 0
        dest["modalities"] = ["CT", "MR"]  # MR is routed to it now
        fixed = Router(tmp_path, [dest])
        stopped = requeue(fixed, "unrouted")
        assert stopped.returncode == 0 and "takes them when it starts" in stopped.stdout
        assert list((fixed.spool / "quarantine" / "unrouted").iterdir()) == []
        assert requeue(fixed, "elsewhere").returncode == 2
        assert MARKER not in listing.stdout + done.stdout + stopped.stdout
        with fixed:
            wait_until(lambda: new_uids(unrouted) <= scp.uids(), timeout=30, what="the unrouted instances delivered")
            assert fixed.stop() == 0
        assert_no_phi(fixed)
    finally:
        scp.stop()


def test_requeue_to_another_destination(tmp_path: Path) -> None:
    """--to sends a quarantine's de-identified instances to another destination: one a
    renamed or replaced PACS's quarantine held (its name no longer in the config)."""
    router = Router(tmp_path, [dicom_destination("newpacs", "127.0.0.1", 1, "NEWPACS")])
    old = router.spool / "quarantine" / "oldpacs"
    old.mkdir(parents=True)
    (old / "2.25.1.dcm").write_bytes(b"de-identified")
    (old / "2.25.1.reason.json").write_text('{"reason": "not delivered after 10 attempt(s): no response"}')

    def requeue(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "router", "requeue", "--config", str(router.config_path), *args],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})

    assert requeue("oldpacs").returncode == 2  # not a folder of this config without --to
    assert requeue("oldpacs", "--to", "elsewhere").returncode == 2
    assert requeue("deidentify", "--to", "newpacs").returncode == 2  # originals are de-identified first
    moved = requeue("oldpacs", "--to", "newpacs")
    assert moved.returncode == 0, moved.stderr
    assert "moved 1 to outgoing/newpacs/" in moved.stdout
    assert (router.spool / "outgoing" / "newpacs" / "2.25.1.dcm").read_bytes() == b"de-identified"
    assert list(old.iterdir()) == []


def test_a_destination_out_of_resources_for_a_while_gets_everything_later(tmp_path: Path) -> None:
    """0xA700 (Refused: Out of Resources: a PACS whose disk is full) for longer than
    max_attempts allows: the destination's state, like an outage, so nothing goes to the
    quarantine and everything is delivered once it takes instances again."""
    series = phi_series(4)
    files = write_all(tmp_path / "ct", series)
    full = threading.Event()
    full.set()
    scp = RecordingSCP(lambda _class, _uid: OUT_OF_RESOURCES if full.is_set() else 0x0000).start()

    def refusals() -> int:
        with scp.lock:
            return sum(len(hashes) for hashes in scp.received.values())

    try:
        dest = dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", max_attempts=2,
                                 retry_initial_seconds=0.1, retry_max_seconds=0.2)
        with Router(tmp_path, [dest]) as router:
            assert set(send_all(router.port, files).values()) == {0x0000}
            # every instance refused more often than max_attempts would allow a failure
            wait_until(lambda: refusals() >= 4 * 3, timeout=30, what="a dozen refusals")
            assert router.reasons("recorder") == []
            full.clear()
            wait_until(lambda: len(router.events("forwarded")) == 4, timeout=30, what="all 4 delivered")
            assert new_uids(series) <= scp.uids()
            assert router.reasons("recorder") == [] and not router.files("quarantine", "recorder")
            assert any("0xA700" in e["reason"] for e in router.events("destination_unavailable"))
            assert router.stop() == 0
        assert_no_phi(router)
    finally:
        scp.stop()


def test_an_instance_a_destination_never_has_room_for_is_quarantined_the_others_delivered(tmp_path: Path) -> None:
    """0xA700 for one instance while the destination takes the others: that instance is
    what it cannot take (too large, say), so its refusals count as attempts (all but the
    first: until then the destination may have been full)."""
    series = phi_series(6)
    files = write_all(tmp_path / "ct", series)
    refused = new_uid(str(series[0].SOPInstanceUID))
    scp = RecordingSCP(lambda _class, uid: OUT_OF_RESOURCES if uid == refused else 0x0000).start()
    try:
        dest = dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", max_attempts=2,
                                 retry_initial_seconds=0.1, retry_max_seconds=0.2)
        with Router(tmp_path, [dest]) as router:
            scp.hang.set()  # the first C-STORE waits until every instance is queued
            assert set(send_all(router.port, files).values()) == {0x0000}
            wait_until(lambda: scp.hanging.is_set() and len(router.events("deidentified")) == 6, timeout=30,
                       what="all queued")
            scp.hang.clear()
            scp.released.set()
            wait_until(lambda: len(router.reasons("recorder")) == 1, timeout=30, what="one instance quarantined")
            [reason] = router.reasons("recorder")
            assert reason["sop_instance_uid"] == refused and "0xA700" in reason["reason"]
            assert reason["attempts"] == 2
            with scp.lock:
                assert len(scp.received[refused]) == 3
            wait_until(lambda: len(router.events("forwarded")) == 5, timeout=30, what="the other 5 delivered")
            assert new_uids(series) - {refused} <= scp.uids()
            assert router.stop() == 0
        assert_no_phi(router)
    finally:
        scp.stop()


def test_a_lone_instance_the_destination_aborts_on_is_quarantined(tmp_path: Path) -> None:
    """A destination that aborts the association whenever it is sent one instance: sent
    alone, nothing delivered in between tells its fault from the destination's state, but
    the destination answering a C-ECHO right after does. It ends in the quarantine with its
    reason after its attempts, not retried as an outage for ever; the next one is delivered."""
    series = phi_series(2)
    files = write_all(tmp_path / "ct", series)
    aborted = new_uid(str(series[0].SOPInstanceUID))
    scp = RecordingSCP(aborts_for=lambda uid: uid == aborted).start()
    try:
        dest = dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", max_attempts=2,
                                 retry_initial_seconds=0.1, retry_max_seconds=0.2)
        with Router(tmp_path, [dest]) as router:
            assert set(send_all(router.port, files[:1]).values()) == {0x0000}
            wait_until(lambda: len(router.reasons("recorder")) == 1, timeout=60, what="the instance quarantined")
            [reason] = router.reasons("recorder")
            assert reason["sop_instance_uid"] == aborted and "no response" in reason["reason"]
            assert reason["attempts"] == 2
            assert set(send_all(router.port, files[1:]).values()) == {0x0000}
            wait_until(lambda: len(router.events("forwarded")) == 1, timeout=30, what="the other delivered")
            assert scp.uids() == new_uids(series)
            assert router.stop() == 0
        assert_no_phi(router)
    finally:
        scp.stop()


def test_hanging_destination_times_out_and_the_node_keeps_receiving(tmp_path: Path) -> None:
    series = phi_series(6)
    files = write_all(tmp_path / "ct", series)
    scp = RecordingSCP().start()
    scp.hang.set()  # associations accepted, C-STOREs never answered
    try:
        dest = dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", timeout_seconds=2,
                                 retry_initial_seconds=0.5, retry_max_seconds=1)
        with Router(tmp_path, [dest]) as router:
            assert set(send_all(router.port, files[:3]).values()) == {0x0000}
            # a destination that answers nothing may be hanging or crashing as a whole: an
            # outage, charging no instance
            wait_until(lambda: len(router.events("destination_unavailable")) >= 2, timeout=30,
                       what="two sends timed out")
            started = time.monotonic()
            assert set(send_all(router.port, files[3:]).values()) == {0x0000}
            assert time.monotonic() - started < 10  # receiving does not wait for the destination
            assert router.echo_ok()
            scp.hang.clear()
            scp.released.set()
            wait_until(lambda: new_uids(series) <= scp.uids(), timeout=60, what="all delivered once it answers")
            assert router.reasons("recorder") == [] and not router.events("retried")
            assert router.stop() == 0
        assert_no_phi(router)
    finally:
        scp.stop()


def test_a_full_folder_destination_keeps_everything_queued_until_it_has_room(tmp_path: Path,
                                                                              small_filesystem: Path) -> None:
    """A folder destination on a full file system (a share, a disk): the folder's state,
    like an outage, however many times max_attempts over; delivered once there is room."""
    series = phi_series(4)
    files = write_all(tmp_path / "ct", series)
    filler = fill_file_system(small_filesystem)
    out = small_filesystem / "out"
    dest = folder_destination("out", out, max_attempts=2, retry_initial_seconds=0.1, retry_max_seconds=0.2)
    with Router(tmp_path, [dest]) as router:
        assert set(send_all(router.port, files).values()) == {0x0000}
        wait_until(lambda: len(router.events("destination_unavailable")) >= 4 * 3, timeout=30,
                   what="a dozen failed writes")
        assert router.reasons("out") == [] and not router.events("retried")
        filler.unlink()
        wait_until(lambda: len(list(out.rglob("*.dcm"))) == 4, timeout=30, what="all 4 written")
        assert {p.stem for p in out.rglob("*.dcm")} == new_uids(series)
        assert router.reasons("out") == []
        assert router.stop() == 0
    assert_no_phi(router)


def test_an_instance_received_again_changed_while_it_is_sent_reaches_the_destination_changed(
        tmp_path: Path) -> None:
    """A modality sends an instance, then a corrected one with the same SOP Instance UID
    while the destination still holds the first C-STORE unanswered: the corrected output
    replaces the first in outgoing/, and once the first is delivered the corrected one is
    sent too (it was deleted unsent before), and both originals leave incoming/."""
    first = phi_series(1)[0]
    second = phi_series(1)[0]
    second.SOPInstanceUID = first.SOPInstanceUID
    second.PixelData = bytes(b ^ 0x5A for b in first.PixelData)
    files = write_all(tmp_path / "first", [first]) + write_all(tmp_path / "second", [second])
    uid = new_uid(str(first.SOPInstanceUID))
    scp = RecordingSCP().start()
    scp.hang.set()

    def outgoing_inode() -> int | None:
        try:
            return router.files("outgoing", "recorder")[0].stat().st_ino
        except (IndexError, FileNotFoundError):
            return None

    try:
        dest = dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", timeout_seconds=60)
        with Router(tmp_path, [dest]) as router:
            assert send_all(router.port, files[:1]) == {files[0]: 0x0000}
            wait_until(scp.hanging.is_set, timeout=30, what="the first version being sent")
            sent = outgoing_inode()
            assert sent is not None
            assert send_all(router.port, files[1:]) == {files[1]: 0x0000}
            wait_until(lambda: outgoing_inode() not in (sent, None), timeout=30, what="the second version published")
            scp.hang.clear()
            scp.released.set()
            wait_until(lambda: len(scp.received.get(uid, [])) >= 2, timeout=30, what="the second version sent")
            wait_until(lambda: not router.files("incoming") and not router.files("outgoing", "recorder"),
                       timeout=30, what="both originals and outputs gone")
            assert len(scp.received[uid]) == 2 and len(set(scp.received[uid])) == 2  # the first, then the second
            assert router.reasons("recorder") == []
            assert router.stop() == 0
        assert_no_phi(router)
    finally:
        scp.stop()


# ------------------------------------------------------------------- associations
def test_a_slow_destination_gets_a_second_association_while_a_backlog_waits(tmp_path: Path) -> None:
    series = phi_series(24)
    files = write_all(tmp_path / "ct", series)
    scp = RecordingSCP(seconds_per_store=0.2).start()  # slower than the sender: a backlog
    try:
        with Router(tmp_path, [dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER")]) as router:
            assert set(send_all(router.port, files).values()) == {0x0000}
            wait_until(lambda: new_uids(series) <= scp.uids(), timeout=60, what="all delivered")
            assert scp.most_storing == 2  # two associations sending at once, never more
            assert all(len(hashes) == 1 for hashes in scp.received.values())  # each instance once
            assert not router.events("destination_unavailable") and not router.events("retried")
            assert router.stop() == 0
    finally:
        scp.stop()


def test_a_destination_serving_one_association_at_a_time_keeps_one_and_waits_for_none(tmp_path: Path) -> None:
    """dcmtk's storescp without --fork answers a second association only after the first
    ends: the extra lane gives up after a few seconds holding no instance, rests, and the
    destination is not taken for down."""
    series = phi_series(60)
    files = write_all(tmp_path / "ct", series)
    scp = StoreSCP(tmp_path / "scp")  # not listening yet: the instances queue up
    dest = dicom_destination("scp", "127.0.0.1", scp.port, scp.aet, retry_initial_seconds=0.5, retry_max_seconds=0.5)
    with Router(tmp_path, [dest]) as router:
        assert set(send_all(router.port, files).values()) == {0x0000}
        wait_until(lambda: len(router.files("outgoing", "scp")) == len(files), timeout=60, what="a backlog")
        with scp.start():
            wait_until(lambda: len(router.events("forwarded")) >= len(files), timeout=60, what="all forwarded")
            wait_until(lambda: router.events("extra_association_refused"), timeout=10, what="the extra lane refused")
            assert len(scp.files()) == len(files)
        assert not router.events("retried")  # an outage charges no instance
        assert len(router.events("destination_unavailable")) >= 1 and router.events("destination_available")
        # The extra lane held no instance while it waited for storescp's answer (3 s): the
        # deliveries follow one another without a pause.
        times = sorted(dt.datetime.fromisoformat(e["timestamp"].rstrip("Z")) for e in router.events("forwarded"))
        assert max((b - a).total_seconds() for a, b in zip(times, times[1:])) < 2.0
        assert router.stop() == 0


# ---------------------------------------------------------------------------- space
def send_until_accepted(router: Router, paths: list[Path], rounds: int = 40) -> None:
    """Send, and send again what was refused, as a modality does, until all is accepted."""
    pending = list(paths)
    for _ in range(rounds):
        answers = send_all(router.port, pending)
        assert set(answers.values()) <= {0x0000, OUT_OF_RESOURCES, None}, answers
        pending = [p for p in pending if answers[p] != 0x0000]
        if not pending:
            return
        time.sleep(0.5)
    raise AssertionError(f"{len(pending)} instances never accepted once space returned")


def test_spool_over_its_limit_refuses_while_the_destination_is_down_then_recovers(tmp_path: Path) -> None:
    """The destination is down for a while: the spool fills to max_spool_bytes, the node
    answers 0xA700 and goes on answering C-ECHO; the destination comes back, the backlog is
    delivered and what was refused is accepted when sent again."""
    series = phi_series(20)
    files = write_all(tmp_path / "ct", series)
    size = files[0].stat().st_size
    scp = RecordingSCP()  # not listening yet
    try:
        dest = dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", max_attempts=2,
                                 retry_initial_seconds=0.2, retry_max_seconds=0.5)
        with Router(tmp_path, [dest], node={"max_spool_bytes": size * 6}) as router:
            answers = send_all(router.port, files)
            accepted = [p for p in files if answers[p] == 0x0000]
            # an instance counts twice (its original and its output) until the output is
            # delivered or made durable (DURABLE_AFTER_SECONDS): 3 at least
            assert 3 <= len(accepted) <= 9, answers
            assert {answers[p] for p in files if p not in accepted} == {OUT_OF_RESOURCES}
            wait_until(lambda: len(router.events("destination_unavailable")) >= 3, timeout=30, what="an outage")
            assert router.echo_ok()
            scp.start()
            accepted_uids = {new_uid(str(ds.SOPInstanceUID)) for p, ds in zip(files, series) if p in accepted}
            wait_until(lambda: accepted_uids <= scp.uids(), timeout=30, what="the backlog delivered")
            send_until_accepted(router, [p for p in files if p not in accepted])
            wait_until(lambda: new_uids(series) <= scp.uids(), timeout=30, what="all 20 delivered")
            assert router.reasons("recorder") == []  # the outage used up no attempts
            assert router.stop() == 0
        assert_no_phi(router)
    finally:
        scp.stop()


def test_full_file_system_answers_out_of_resources_and_recovers(tmp_path: Path, small_filesystem: Path) -> None:
    """An 8 MB file system under the spool, the destination down: first the free-space
    floor (min_free_bytes) refuses with 0xA700; then, with no floor, the file system really
    fills (ENOSPC while receiving and de-identifying). The node stays up, loses nothing it
    acknowledged, and takes the rest once the destination is back and space returns."""
    series = phi_series(36, rows=512)  # ~0.5 MB each: 18 MB in all
    files = write_all(tmp_path / "ct", series)
    scp = RecordingSCP()  # down
    spool = small_filesystem / "spool"
    dest = dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", max_attempts=2,
                             retry_initial_seconds=0.2, retry_max_seconds=0.5)
    accepted: list[Path] = []
    try:
        with Router(tmp_path, [dest], node={"spool_dir": spool, "min_free_bytes": 3 * 2**20}, name="floor") as router:
            answers = send_all(router.port, files[:18])
            accepted += [p for p in files[:18] if answers[p] == 0x0000]
            assert 0 < len(accepted) < 18
            assert {answers[p] for p in files[:18] if p not in accepted} == {OUT_OF_RESOURCES}
            assert router.echo_ok()
            assert router.stop() == 0
        assert_no_phi(router)

        router = Router(tmp_path, [dest], node={"spool_dir": spool, "min_free_bytes": 0}, name="nofloor")
        with router:
            # Until the second refusal: after one, a C-STORE may go unanswered until the
            # sender's time-out (see Sender), and there is no need to wait for many.
            sender, answers = Sender(router.port), {}
            for path in files[18:]:
                answers[path] = sender.send(path)
                if sum(status != 0x0000 for status in answers.values()) == 2:
                    break
            sender.close()
            accepted += [p for p in answers if answers[p] == 0x0000]
            refused = [p for p in files if p not in accepted]
            assert {answers[p] for p in answers if p not in accepted} <= {OUT_OF_RESOURCES, None}
            assert router.events("refused")
            assert router.process.poll() is None and router.echo_ok()
            scp.start()
            accepted_uids = {new_uid(str(ds.SOPInstanceUID)) for p, ds in zip(files, series) if p in accepted}
            wait_until(lambda: accepted_uids <= scp.uids(), timeout=60, what="every accepted instance delivered")
            send_until_accepted(router, refused)
            wait_until(lambda: new_uids(series) <= scp.uids(), timeout=60, what="all 36 delivered")
            assert not list((spool / "quarantine").rglob("*.dcm"))
            assert router.stop() == 0
        assert_no_phi(router)
    finally:
        scp.stop()


def test_received_originals_never_fill_the_room_their_outputs_need(tmp_path: Path, small_filesystem: Path) -> None:
    """With no free-space floor (min_free_bytes = 0) and de-identification stalled (the
    worker stopped, as by a long OCR backlog), received originals would fill the file
    system to the last byte: no output could be written, so no original could ever leave,
    and nothing would be delivered again. The receiver keeps room for the outputs (0xA700
    before that), so once the worker runs again everything it acknowledged is delivered."""
    series = phi_series(40, rows=384)  # ~0.3 MB each: 12 MB for an 8 MB file system
    files = write_all(tmp_path / "ct", series)
    scp = RecordingSCP().start()
    spool = small_filesystem / "spool"
    dest = dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER")
    try:
        with Router(tmp_path, [dest], node={"spool_dir": spool, "min_free_bytes": 0, "workers": 1}) as router:
            [worker] = router.worker_pids()
            os.kill(worker, signal.SIGSTOP)
            try:
                sender, answers = Sender(router.port), {}
                for path in files:
                    answers[path] = sender.send(path)
                    if sum(status != 0x0000 for status in answers.values()) == 2:
                        break
                sender.close()
            finally:
                os.kill(worker, signal.SIGCONT)
            accepted = [p for p in answers if answers[p] == 0x0000]
            assert 0 < len(accepted) < len(files)
            accepted_uids = {new_uid(str(ds.SOPInstanceUID)) for p, ds in zip(files, series) if p in accepted}
            wait_until(lambda: accepted_uids <= scp.uids(), timeout=60, what="every accepted instance delivered")
            send_until_accepted(router, [p for p in files if p not in accepted])
            wait_until(lambda: new_uids(series) <= scp.uids(), timeout=60, what="all 40 delivered")
            assert router.stop() == 0
    finally:
        scp.stop()


# ---------------------------------------------------------------------------- malformed input
class MemoryWatch:
    """Samples the resident memory of a process and its descendants (from /proc)."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.peak_main_kb = self.peak_total_kb = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def rss_kb(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            return 0

    def _run(self) -> None:
        while not self.done.wait(self.interval):
            main = self.rss_kb(self.pid)
            total = main + sum(self.rss_kb(child) for child in descendants(self.pid))
            self.peak_main_kb, self.peak_total_kb = max(self.peak_main_kb, main), max(self.peak_total_kb, total)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def base_instances() -> list[mutations.Base]:
    bases = []
    for ds in phi_series(4):
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        raw = buffer.getvalue()
        bases.append(mutations.Base(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                    raw[144 + int.from_bytes(raw[140:144], "little"):]))
    return bases


def corpus_as_sent(corpus_dir: Path, folder: Path) -> list[Path]:
    """Every corpus file as a sendable Part 10 file: its own file meta, or (a bare data set,
    no SOP class) sent as a CT in Implicit VR Little Endian."""
    folder.mkdir(parents=True, exist_ok=True)
    result = []
    for path in sorted(corpus_dir.glob("*.dcm")):
        raw = path.read_bytes()
        meta, offset = split_dataset(path) if raw[128:132] == b"DICM" else (Dataset(), 0)
        data = raw[offset:]
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") or CTImageStorage)
        sop_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or generate_uid())
        syntax = str(meta.get("TransferSyntaxUID", "") or mutations.IMPLICIT_LE)
        out = folder / path.name
        out.write_bytes(mutations.part10(sop_class, sop_instance, syntax, data))
        result.append(out)
    return result


def test_corpus_and_1000_mutated_datasets_never_crash_the_node(tmp_path: Path, corpus_dir: Path) -> None:
    """Each is refused at receive (a non-success status or an abort) or acknowledged, and
    then every acknowledged one is delivered or quarantined with a reason: none dropped.
    The node stays up, in bounded memory, and takes a good instance at the end."""
    bases = base_instances()
    folder = tmp_path / "mutants"
    folder.mkdir()
    sent: list[Path] = []
    kinds: dict[Path, str] = {}
    for index, mutant in enumerate(mutations.mutants(bases, 1000, SEED)):
        path = folder / f"m{index:04d}.dcm"
        path.write_bytes(mutations.part10(mutant.sop_class, mutant.sop_instance, mutant.transfer_syntax, mutant.data))
        sent.append(path)
        kinds[path] = mutant.kind
    sent += corpus_as_sent(corpus_dir, tmp_path / "corpus")
    good = write_all(tmp_path / "good", phi_series(1, series_number=9))
    out = tmp_path / "out"
    standing = [(str(CTImageStorage), syntax) for syntax in mutations.SYNTAXES]
    with Router(tmp_path, [folder_destination("out", out)]) as router:
        memory = MemoryWatch(router.process.pid)
        started = time.monotonic()
        answers = send_all(router.port, sent, standing, senders=4)
        print(f"sent in {time.monotonic() - started:.1f} s")
        acknowledged = [p for p in sent if answers[p] == 0x0000]
        outcome = Counter((kinds.get(p, "corpus"), answers[p] == 0x0000) for p in sent)
        print("acknowledged / refused per kind:", sorted(outcome.items()))
        assert len(acknowledged) > 500
        assert router.process.poll() is None

        # Every acknowledged instance: received, then de-identified (and delivered) or quarantined.
        def settled() -> bool:
            return (len(router.events("received")) >= len(acknowledged) and not router.files("incoming")
                    and not router.files("outgoing", "out"))

        wait_until(settled, timeout=180, what="every acknowledged instance settled")
        print(f"settled after {time.monotonic() - started:.1f} s")
        received = {e["spool_id"] for e in router.events("received")}
        assert len(received) == len(acknowledged)
        deidentified = {e["spool_id"]: e["sop_instance_uid"] for e in router.events("deidentified")}
        quarantined = {e["spool_id"] for e in router.events("quarantined") if e.get("stage") == "deidentify"}
        assert received == set(deidentified) | quarantined, "an acknowledged instance was dropped"
        assert not set(deidentified) & quarantined
        reasons = {p.name.removesuffix(".reason.json") for p in router.files("quarantine", "deidentify",
                                                                            suffix=".reason.json")}
        assert reasons == quarantined, "a quarantined instance without its reason file"
        assert all(r["reason"] for r in router.reasons("deidentify"))
        forwarded = {e["sop_instance_uid"] for e in router.events("forwarded")}
        assert set(deidentified.values()) == forwarded
        assert len(list(out.rglob("*.dcm"))) == len(forwarded)
        for path in out.rglob("*.dcm"):  # nothing identifying went out either
            data = path.read_bytes()
            assert not [n for n in (MARKER.encode(), *PHI_REMNANTS) if n in data], path

        # Still serving: C-ECHO and a good instance, delivered.
        assert router.echo_ok()
        assert send_all(router.port, good) == {good[0]: 0x0000}
        uid = new_uid(str(read_file_meta_info(good[0]).MediaStorageSOPInstanceUID))
        wait_until(lambda: (out.rglob(f"{uid}.dcm") and list(out.rglob(f"{uid}.dcm"))), timeout=30,
                   what="the good instance delivered")
        memory.stop()
        print(f"peak RSS: node {memory.peak_main_kb} kB, with its processes {memory.peak_total_kb} kB")
        assert memory.peak_main_kb < 256 * 1024 and memory.peak_total_kb < 768 * 1024
        assert not router.non_json_lines(), "raw output (a traceback?) in the node's log"
        assert not router.events("worker_died"), "a damaged instance killed a de-identification worker"
        assert router.process.poll() is None
        assert router.stop() == 0
    assert_no_phi(router, [b.sop_instance for b in bases])


def overrun(base: mutations.Base, damage: str) -> bytes:
    """One element damaged so that reading it swallows the elements after it, among them
    the Request Attributes Sequence (which holds the accession number)."""
    found = {e.tag: e for e in mutations.elements(base.data)}
    until = found[(0x0040, 0x0275)].end
    if damage == "uid_one_byte_longer":  # every element after it is read one byte off
        element = found[(0x0020, 0x0052)]
        return mutations.with_length(base.data, element, element.length + 1)
    if damage == "tag_number_damaged":  # the accession numbers under a tag no dictionary has
        return base.data.replace(b"\x08\x00\x50\x00SH", b"\xe4\x00\x50\x00SH")
    if damage == "invalid_vr":  # a VR that is none, its length reaching past the sequence
        element = found[(0x0040, 0x0254)]
        head = struct.pack("<HH2sH", 0x0040, 0x0254, b"O\x00", until - element.value_start)
        return base.data[:element.start] + head + base.data[element.value_start:]
    element = found[{"time_overrun": (0x0040, 0x0245), "number_overrun": (0x0028, 0x0120)}[damage]]
    return mutations.with_length(base.data, element, until - element.value_start)


@pytest.mark.parametrize("damage", ["uid_one_byte_longer", "invalid_vr", "time_overrun", "number_overrun",
                                    "tag_number_damaged"])
def test_a_value_that_overran_its_element_carries_no_phi_out(tmp_path: Path, damage: str) -> None:
    """Found by the mutations above: a wrong length or VR made a kept element swallow the
    ones after it, and the engine wrote it out verbatim with the PHI inside; a damaged tag
    number put the accession number under a tag the engine kept. Such an instance is
    refused (quarantined), or written without the PHI."""
    from router.config import DeidConfig
    from router.profile import Deidentifier, InstanceRefused
    from test_node_support import NODE_TEST_OPTIONS, SECRET

    [base] = base_instances()[:1]
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    src.write_bytes(mutations.part10(base.sop_class, base.sop_instance, mutations.EXPLICIT_LE, overrun(base, damage)))
    engine = Deidentifier(DeidConfig(secret=SECRET.encode(), options=frozenset(NODE_TEST_OPTIONS)), SECRET.encode())
    try:
        engine.process_file(src, dst, durable=False)
    except InstanceRefused as refused:
        assert MARKER not in refused.reason
        assert not dst.exists()
        return
    data = dst.read_bytes()
    assert not [needle for needle in (MARKER.encode(), *PHI_REMNANTS) if needle in data]
