"""Faults, bounded in time, loopback only: repeated SIGKILL, a destination failing one SOP
class, a hanging destination, a full file system, 1,000 mutated datasets. In every run
the node's log and spool file names must hold none of the PHI that was sent."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage

from bench.synthetic import write_ct_series
from peers import free_port, parse_storescu_output, storescu
from test_node_support import (
    ROUTER_AET,
    Router,
    dicom_destination,
    folder_destination,
    new_uid,
    original_ids,
    storescu_background,
    wait_until,
)

PHI = {"patient_id": "PHIFAULT7731", "patient_name": "PHIMARKER^FAULTY", "accession_number": "ACCFAULT99"}
MARKERS = ("PHIFAULT7731", "PHIMARKER", "FAULTY", "ACCFAULT99")
SEED = int(os.environ.get("DEID_FAULT_SEED", "20261122"))


def small_ct(folder: Path, count: int, **kw) -> list[Path]:
    return write_ct_series(folder, count, rows=64, columns=64, **{**PHI, **kw})


def assert_no_phi_in_logs_or_names(router: Router) -> None:
    text = router.log_text()
    for marker in MARKERS:
        assert marker not in text, f"{marker} in the node's log"
    for path in router.spool.rglob("*"):
        assert not any(marker in path.name for marker in MARKERS), path


class RecordingSCP:
    """A pynetdicom Storage SCP that keeps a hash of every dataset it is sent, per SOP
    Instance UID, answers ``status_for(sop_class)`` and can be made to hang."""

    def __init__(self, status_for=lambda sop_class: 0x0000):
        self.status_for = status_for
        self.received: dict[str, list[str]] = {}
        self.hang = threading.Event()
        self.released = threading.Event()
        self.port = free_port()
        self.ae = AE(ae_title="RECORDER")
        self.ae.maximum_pdu_size = 131072
        for context in (CTImageStorage, SecondaryCaptureImageStorage):
            self.ae.add_supported_context(context, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.lock = threading.Lock()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        if self.hang.is_set():
            self.released.wait(120)
        data = event.encoded_dataset(include_meta=False)
        uid = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            self.received.setdefault(uid, []).append(hashlib.sha256(data).hexdigest())
        return self.status_for(str(event.request.AffectedSOPClassUID))

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()


def test_three_sigkills_during_500_instances(tmp_path: Path) -> None:
    """Kill -9 at random points three times; every acknowledged instance is delivered, and
    an instance delivered twice is delivered with the same content."""
    files = small_ct(tmp_path / "ct", 500)
    rng = random.Random(SEED)
    scp = RecordingSCP()
    router = Router(tmp_path, [dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER")])
    remaining = list(files)
    acknowledged: set[Path] = set()
    try:
        for round_ in range(3):
            with router.start():
                before = len(router.events("received"))
                kill_after = rng.randint(20, 120)
                log = tmp_path / f"storescu-{round_}.log"
                sender = storescu_background(router.port, remaining, log)
                wait_until(lambda: len(router.events("received")) - before >= kill_after or sender.poll() is not None,
                           timeout=120, interval=0.01, what=f"{kill_after} received (seed {SEED})")
                router.kill()
                sender.wait(60)
            answers = parse_storescu_output(log.read_text(errors="replace"))
            acked = {p for p in remaining if answers.get(str(p))}
            acknowledged |= acked
            remaining = [p for p in remaining if p not in acked]
        with router.start():
            done = storescu("127.0.0.1", router.port, remaining, called_ae=ROUTER_AET, timeout=300)
            assert done.returncode == 0, done.stderr
            acknowledged |= set(remaining)
            expected = {new_uid(original_ids(p)["SOPInstanceUID"]) for p in acknowledged}
            wait_until(lambda: expected <= set(scp.received), timeout=180, interval=0.2,
                       what=f"every acknowledged instance delivered (seed {SEED})")
            assert len(acknowledged) == 500
            assert all(len(set(hashes)) == 1 for hashes in scp.received.values()), "a re-delivery differed"
            assert set(scp.received) == expected
            assert router.stop() == 0
        assert_no_phi_in_logs_or_names(router)
    finally:
        scp.stop()


def test_a_killed_forwarder_process_is_restarted_and_loses_nothing(tmp_path: Path) -> None:
    files = small_ct(tmp_path / "ct", 20)
    out = tmp_path / "out"
    with Router(tmp_path, [folder_destination("out", out)]) as router:
        assert storescu("127.0.0.1", router.port, files[:10], called_ae=ROUTER_AET).returncode == 0
        wait_until(lambda: len(list(out.rglob("*.dcm"))) == 10, timeout=30, what="first half delivered")
        [started] = router.events("forwarder_started")
        os.kill(started["pid"], 9)
        assert storescu("127.0.0.1", router.port, files[10:], called_ae=ROUTER_AET).returncode == 0
        wait_until(lambda: len(list(out.rglob("*.dcm"))) == 20, timeout=60, what="second half delivered")
        assert router.events("forwarder_died") and len(router.events("forwarder_started")) == 2
        assert router.stop() == 0
    assert_no_phi_in_logs_or_names(router)


def test_destination_failing_one_sop_class_quarantines_only_that_class(tmp_path: Path) -> None:
    ct = small_ct(tmp_path / "ct", 3)
    sc = tmp_path / "sc.dcm"
    ds = dcmread(ct[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(sc, enforce_file_format=True)
    scp = RecordingSCP(lambda sop_class: 0xA900 if sop_class == SecondaryCaptureImageStorage else 0x0000)
    try:
        with Router(tmp_path, [dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", max_attempts=2,
                                                 retry_initial_seconds=0.2, retry_max_seconds=0.4)]) as router:
            done = storescu("127.0.0.1", router.port, [*ct, sc], called_ae=ROUTER_AET)
            assert done.returncode == 0, done.stderr
            wait_until(lambda: router.reasons("recorder"), timeout=30, what="the SC instance quarantined")
            [reason] = router.reasons("recorder")
            assert "0xA900" in reason["reason"] and reason["attempts"] == 2
            assert reason["sop_instance_uid"] == new_uid(original_ids(sc)["SOPInstanceUID"])
            assert {new_uid(original_ids(p)["SOPInstanceUID"]) for p in ct} <= set(scp.received)
            assert router.stop() == 0
        assert_no_phi_in_logs_or_names(router)
    finally:
        scp.stop()


def test_hanging_destination_times_out_and_the_node_keeps_receiving(tmp_path: Path) -> None:
    files = small_ct(tmp_path / "ct", 6)
    scp = RecordingSCP()
    scp.hang.set()
    try:
        with Router(tmp_path, [dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", timeout_seconds=2,
                                                 retry_initial_seconds=0.5, retry_max_seconds=1)]) as router:
            assert storescu("127.0.0.1", router.port, files[:3], called_ae=ROUTER_AET).returncode == 0
            wait_until(lambda: router.events("retried"), timeout=30, what="a send timed out and was retried")
            started = time.monotonic()
            assert storescu("127.0.0.1", router.port, files[3:], called_ae=ROUTER_AET).returncode == 0
            assert time.monotonic() - started < 10  # receiving does not wait for the destination
            assert router.echo_ok()
            scp.hang.clear()
            scp.released.set()
            expected = {new_uid(original_ids(p)["SOPInstanceUID"]) for p in files}
            wait_until(lambda: expected <= set(scp.received), timeout=60, what="all delivered once it answers")
            assert router.stop() == 0
        assert_no_phi_in_logs_or_names(router)
    finally:
        scp.stop()


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """An 8 MB tmpfs for the spool (the suite runs as root, as CI does)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_file_system_answers_out_of_resources_and_recovers(tmp_path: Path, small_filesystem: Path) -> None:
    files = write_ct_series(tmp_path / "ct", 40, **PHI)  # 512x512: ~0.5 MB each, 20 MB in all
    out = tmp_path / "out"
    router = Router(tmp_path, [dicom_destination("pacs", "127.0.0.1", free_port(), "NOBODY", retry_max_seconds=1)],
                    node={"spool_dir": small_filesystem / "spool", "min_free_bytes": 0})
    with router:
        done = storescu("127.0.0.1", router.port, files, called_ae=ROUTER_AET, extra_args=["-v"])
        answers = parse_storescu_output(done.stdout + done.stderr)
        accepted = [p for p in files if answers.get(str(p))]
        assert 0 < len(accepted) < len(files), "the 8 MB file system should fill up"
        assert router.events("refused") and router.echo_ok()
        refused = [p for p in files if p not in set(accepted)]
        router.stop()
    # Space returns: the destination is a folder now; the node drains and takes the rest.
    router = Router(tmp_path, [folder_destination("pacs", out)], name="router",
                    node={"spool_dir": small_filesystem / "spool", "min_free_bytes": 0})
    with router:
        wait_until(lambda: len(list(out.rglob("*.dcm"))) == len(accepted), timeout=60, what="the backlog delivered")
        # The sender retries what was refused, a few at a time, as space keeps returning.
        pending, rounds = list(refused), 0
        while pending and rounds < 30:
            rounds += 1
            done = storescu("127.0.0.1", router.port, pending[:4], called_ae=ROUTER_AET, timeout=60,
                            extra_args=["-v"])
            answers = parse_storescu_output(done.stdout + done.stderr)
            pending = [p for p in pending if not answers.get(str(p))]
            delivered_so_far = len(files) - len(pending)
            wait_until(lambda: len(list(out.rglob("*.dcm"))) >= delivered_so_far, timeout=60, what="delivered")
        assert not pending, f"{len(pending)} never accepted after space returned"
        wait_until(lambda: len(list(out.rglob("*.dcm"))) == len(files), timeout=60, what="everything delivered")
        assert router.stop() == 0
    assert_no_phi_in_logs_or_names(router)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A damaged copy of a data set (explicit VR little endian)."""
    kind = rng.randrange(6)
    data = bytearray(data)
    if kind == 0:  # truncated anywhere
        return bytes(data[: rng.randrange(1, len(data))])
    if kind == 1:  # random bytes flipped
        for _ in range(rng.randint(1, 40)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 2:  # a huge declared length somewhere
        at = rng.randrange(0, len(data) - 8)
        data[at:at + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\xfe\xff\xff\xff", b"\x00\x00\x00\x80"])
        return bytes(data)
    if kind == 3:  # a bad VR
        at = data.find(b"LO", rng.randrange(0, len(data) // 2))
        if at > 0:
            data[at:at + 2] = rng.choice([b"ZZ", b"\x00\x00", b"SQ", b"OB"])
        return bytes(data)
    if kind == 4:  # deep nesting: sequences of undefined length inside each other
        depth = rng.randint(50, 400)
        nest = (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff") * depth
        return bytes(data[:200]) + nest
    insert = rng.randrange(len(data))  # garbage inserted
    return bytes(data[:insert] + os.urandom(rng.randint(1, 64)) + data[insert:])


def test_corpus_and_1000_mutated_datasets_never_crash_the_node(tmp_path: Path, corpus_dir: Path) -> None:
    rng = random.Random(SEED)
    base = small_ct(tmp_path / "base", 4)
    out = tmp_path / "out"
    sources = []
    for i in range(1000):
        ds = dcmread(base[i % len(base)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1{i:05d}"
        path = tmp_path / "mutated" / f"m{i:04d}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        raw = path.read_bytes()
        offset = 144 + int.from_bytes(raw[140:144], "little")
        path.write_bytes(raw[:offset] + mutate(raw[offset:], rng))
        sources.append(path)
    corpus = sorted(p for p in corpus_dir.glob("*.dcm"))
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are, undecoded
    accepted = refused = 0
    try:
        with Router(tmp_path, [folder_destination("out", out)]) as router:
            ae = AE(ae_title="FUZZER")
            ae.maximum_pdu_size = 131072
            assoc = None
            for path in [*sources, *corpus]:
                try:
                    meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
                    context = build_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
                except Exception:  # noqa: BLE001 - a file even the sender cannot describe
                    continue
                if assoc is None or not assoc.is_established or context.abstract_syntax not in {
                        c.abstract_syntax for c in assoc.accepted_contexts if c.transfer_syntax[0] == context.transfer_syntax[0]}:
                    if assoc is not None and assoc.is_established:
                        assoc.release()
                    assoc = ae.associate("127.0.0.1", router.port, contexts=[context], ae_title=ROUTER_AET)
                    assert assoc.is_established, "the node stopped accepting associations"
                try:
                    status = assoc.send_c_store(path)
                except Exception:  # noqa: BLE001 - pynetdicom itself may refuse to send it
                    continue
                if status and status.get("Status") == 0x0000:
                    accepted += 1
                else:
                    refused += 1
            if assoc is not None and assoc.is_established:
                assoc.release()
            assert accepted > 300 and router.process.poll() is None

            def accounted() -> int:
                return len(router.events("deidentified")) + len(router.events("quarantined"))

            wait_until(lambda: accounted() >= accepted and not router.files("incoming"), timeout=180,
                       what="every accepted instance de-identified or quarantined")
            assert accounted() == accepted  # none silently dropped
            assert all(r["reason"] for r in router.reasons("deidentify"))
            rss_kb = sum(int(line.split()[1]) for pid in [router.process.pid]
                         for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
            assert rss_kb < 1024 * 1024, f"node main process uses {rss_kb} kB"
            assert router.echo_ok()
            assert router.stop() == 0
        assert_no_phi_in_logs_or_names(router)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
