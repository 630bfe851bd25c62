"""No acknowledged instance is lost: SIGKILL, SIGTERM, a destination down, a failure status,
dying workers. Real peers (Orthanc, dcmtk, a pynetdicom SCP), the router as a subprocess.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from bench.synthetic import write_ct_series
from peers import Orthanc, StoreSCP, parse_storescu_output, storescu
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


@pytest.fixture(scope="module")
def ct300(tmp_path_factory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("ct300"), 300, patient_id="PID-DUR-0001",
                           patient_name="DURABLE^DANA")


def expected_uids(files: list[Path]) -> set[str]:
    return {new_uid(original_ids(p)["SOPInstanceUID"]) for p in files}


def acknowledged(log: Path, files: list[Path]) -> list[Path]:
    answers = parse_storescu_output(log.read_text(errors="replace"))
    return [p for p in files if answers.get(str(p))]


def test_sigkill_mid_transfer_loses_no_acknowledged_instance(tmp_path: Path, ct300: list[Path]) -> None:
    audit = tmp_path / "audit.db"
    with Orthanc(tmp_path) as pacs:
        router = Router(tmp_path, [dicom_destination("pacs", "127.0.0.1", pacs.dicom_port, pacs.aet)],
                        sections={"audit": {"path": str(audit), "crosswalk": True}})
        with router:
            sender = storescu_background(router.port, ct300, tmp_path / "storescu-1.log")
            wait_until(lambda: len(router.events("received")) >= 100, timeout=60, interval=0.02,
                       what="100 instances received")
            router.kill()  # the router and its workers, mid-transfer
            sender.wait(60)
        first = acknowledged(tmp_path / "storescu-1.log", ct300)
        assert 100 <= len(first) < len(ct300)
        # Acknowledged and still in the spool, to be resumed: not yet delivered, or delivered
        # with its original not yet removed (the node can keep up with storescu, so at the
        # kill Orthanc may already hold every acknowledged instance).
        parked = len(router.files("incoming"))
        assert parked or router.files("outgoing", "pacs")
        recycled = len(router.files("recycle", suffix=""))

        with router.start():
            rest = [p for p in ct300 if p not in set(first)]
            proc = storescu("127.0.0.1", router.port, rest, called_ae=ROUTER_AET, timeout=180)
            assert proc.returncode == 0, proc.stderr
            wait_until(lambda: pacs.count() >= len(ct300), timeout=120, interval=0.5, what="300 instances in Orthanc")
            assert set(pacs.sop_instance_uids()) == expected_uids(ct300)
            assert bool([e for e in router.events("resumed") if e["instances"] > 0]) == bool(parked)
            assert router.events("spool_opened")[-1]["removed_recycled"] == recycled  # the killed node's
            wait_until(lambda: not router.files("incoming") and not router.files("outgoing", "pacs"),
                       timeout=30, what="an empty spool")
            assert router.files("quarantine", "deidentify") == []
            assert router.stop() == 0
        # The crosswalk maps every delivered instance: an original is removed only after its
        # row is in the audit store, so the kill lost none (a killed node re-does the rest).
        connection = sqlite3.connect(f"file:{audit}?mode=ro", uri=True)
        try:
            mapped = dict(connection.execute("SELECT original, pseudonym FROM crosswalk WHERE kind = 'sop_instance_uid'"))
        finally:
            connection.close()
        assert {mapped.get(original_ids(p)["SOPInstanceUID"]) for p in ct300} == expected_uids(ct300)


def test_sigterm_exits_zero_and_accounts_for_every_acknowledged_instance(tmp_path: Path, ct300: list[Path]) -> None:
    files = ct300[:150]
    with StoreSCP(tmp_path / "scp") as scp:
        router = Router(tmp_path, [dicom_destination("scp", "127.0.0.1", scp.port, scp.aet)])
        with router:
            sender = storescu_background(router.port, files, tmp_path / "storescu.log")
            wait_until(lambda: len(router.events("received")) >= 50, timeout=60, interval=0.02,
                       what="50 instances received")
            wait_until(lambda: router.files("recycle", suffix=""), timeout=30,
                       what="removed originals kept in recycle/ to be written over")
            started = time.monotonic()
            assert router.stop(signal.SIGTERM, timeout=60) == 0
            assert not router.files("recycle", suffix="")  # no removed original's bytes stay
            assert time.monotonic() - started < 45
            sender.wait(60)
            acked = acknowledged(tmp_path / "storescu.log", files)
            assert len(acked) >= 50
            assert [e for e in router.events("stopped")]
            # Every acknowledged instance is delivered, or in the spool (incoming by its
            # original SOP Instance UID, outgoing by its new one): nothing unaccounted for.
            delivered = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.files()}
            incoming = {str(read_file_meta_info(p).MediaStorageSOPInstanceUID) for p in router.files("incoming")}
            outgoing = {p.name[:-4] for p in router.files("outgoing", "scp")}
            for path in acked:
                original = original_ids(path)["SOPInstanceUID"]
                assert new_uid(original) in delivered | outgoing or original in incoming, path.name
            assert not router.files("tmp", suffix="")
            # What was parked is delivered after a restart.
            router.start()
            wait_until(lambda: len(scp.files()) >= len(acked), timeout=60, what="the parked instances")
            delivered = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.files()}
            assert expected_uids(acked) <= delivered
            assert router.stop() == 0


def test_destination_down_queues_then_delivers_without_restart(tmp_path: Path, ct300: list[Path]) -> None:
    files = ct300[:20]
    pacs = Orthanc(tmp_path).start()
    pacs.stop()  # its ports are fixed now; it comes back on them
    try:
        # max_attempts=2: an outage must not use up the instances' attempts.
        dest = dicom_destination("pacs", "127.0.0.1", pacs.dicom_port, pacs.aet, max_attempts=2,
                                 retry_initial_seconds=0.2, retry_max_seconds=1.0)
        with Router(tmp_path, [dest]) as router:
            proc = storescu("127.0.0.1", router.port, files, called_ae=ROUTER_AET)
            assert proc.returncode == 0, proc.stderr
            wait_until(lambda: len(router.files("outgoing", "pacs")) == len(files), timeout=60,
                       what="20 instances queued in outgoing/pacs")
            wait_until(lambda: len(router.events("destination_unavailable")) >= 4, timeout=30,
                       what="several reconnection attempts")
            assert len(router.files("outgoing", "pacs")) == len(files)
            pacs.start()
            wait_until(lambda: pacs.count() >= len(files), timeout=30, interval=0.2, what="20 instances in Orthanc")
            assert set(pacs.sop_instance_uids()) == expected_uids(files)
            wait_until(lambda: not router.files("outgoing", "pacs"), timeout=10, what="an empty outgoing/pacs")
            assert router.files("quarantine", "pacs") == []
            assert router.events("destination_available")
            assert router.stop() == 0
    finally:
        pacs.kill()


def test_outputs_volatile_at_a_kill_are_made_again_not_sent_as_found(tmp_path: Path, ct300: list[Path]) -> None:
    """Outputs are not fsynced until delivered or DURABLE_AFTER_SECONDS old: a crash (here
    SIGKILL; after a power loss such a file may hold anything) leaves them marked volatile
    beside their originals. At the next start they are deleted before anything is sent and
    made again from the originals: the destination gets every instance, never what was found."""
    files = ct300[:30]
    pacs = Orthanc(tmp_path).start()
    pacs.stop()  # down while the outputs wait
    try:
        router = Router(tmp_path, [dicom_destination("pacs", "127.0.0.1", pacs.dicom_port, pacs.aet)])
        with router:
            proc = storescu("127.0.0.1", router.port, files, called_ae=ROUTER_AET)
            assert proc.returncode == 0, proc.stderr
            wait_until(lambda: len(router.events("deidentified")) >= len(files), timeout=60, interval=0.02,
                       what="30 instances de-identified")
            router.kill()
        volatile = [p for p in router.files("outgoing", "pacs") if p.stat().st_mode & stat.S_ISVTX]
        assert volatile, "the last outputs are younger than DURABLE_AFTER_SECONDS"
        assert len(router.files("incoming")) >= len(volatile)  # their originals
        found = b"NOT-WHAT-THE-ROUTER-WROTE " * 1000
        for path in volatile:
            path.write_bytes(found)
        pacs.start()
        with router.start():
            wait_until(lambda: pacs.count() >= len(files), timeout=60, interval=0.2, what="30 instances in Orthanc")
            assert set(pacs.sop_instance_uids()) == expected_uids(files)
            wait_until(lambda: not router.files("incoming") and not router.files("outgoing", "pacs"),
                       timeout=30, what="an empty spool")
            assert router.files("quarantine", "pacs") == []  # nothing unreadable was sent or tried
            assert router.events("spool_opened")[-1]["dropped_volatile"] == len(volatile)
            assert router.stop() == 0
    finally:
        pacs.kill()


class FailingSCP:
    """A pynetdicom Storage SCP that answers ``status`` for one SOP Instance UID, 0x0000 for others."""

    def __init__(self, fail_uid: str, status: int):
        self.fail_uid = fail_uid
        self.status = status
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.ae = AE(ae_title="FAILSCP")
        self.ae.maximum_pdu_size = 131072
        self.ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])

        def on_open(event):
            import socket

            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def on_store(event):
            uid = str(event.request.AffectedSOPInstanceUID)
            with self.lock:
                self.requests.append(uid)
            return self.status if uid == self.fail_uid else 0x0000

        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)])
        self.port = self.server.server_address[1]

    def close(self) -> None:
        self.ae.shutdown()


@pytest.mark.parametrize("status", [0x0110, 0xC000], ids=["0x0110", "0xC000"])
def test_failure_status_quarantines_that_instance_only(tmp_path: Path, ct300: list[Path], status: int) -> None:
    files = ct300[:12]
    bad = new_uid(original_ids(files[0])["SOPInstanceUID"])
    scp = FailingSCP(bad, status)
    try:
        dest = dicom_destination("research", "127.0.0.1", scp.port, "FAILSCP", max_attempts=3,
                                 retry_initial_seconds=0.3, retry_max_seconds=0.6)
        with Router(tmp_path, [dest]) as router:
            proc = storescu("127.0.0.1", router.port, files, called_ae=ROUTER_AET)
            assert proc.returncode == 0, proc.stderr
            wait_until(lambda: router.reasons("research"), timeout=30, what="a reason file in quarantine/research")
            [reason] = router.reasons("research")
            assert reason["attempts"] == 3 and reason["status"] == f"0x{status:04X}"
            assert reason["sop_instance_uid"] == bad and f"0x{status:04X}" in reason["reason"]
            assert [p.name for p in router.files("quarantine", "research")] == [f"{bad}.dcm"]
            wait_until(lambda: not router.files("outgoing", "research"), timeout=30, what="an empty outgoing")
            with scp.lock:
                requests = list(scp.requests)
            assert requests.count(bad) == 3
            assert set(requests) - {bad} == expected_uids(files) - {bad}
            # The others did not wait for the failing one's retries.
            assert max(i for i, u in enumerate(requests) if u != bad) > requests.index(bad)
            assert len(router.events("retried")) == 2 and len(router.events("quarantined")) == 1
            assert router.stop() == 0
    finally:
        scp.close()


def test_dying_workers_lose_nothing(tmp_path: Path, ct300: list[Path]) -> None:
    files = ct300[:80]
    out = tmp_path / "out"
    with Router(tmp_path, [folder_destination("folder", out)]) as router:
        sender = storescu_background(router.port, files, tmp_path / "storescu.log")
        killed, done_at_kill = 0, -10
        deadline = time.monotonic() + 60
        while sender.poll() is None and killed < 3 and time.monotonic() < deadline:
            # The next kill only once the instance of the last one had time to be redone:
            # an instance whose worker dies twice is quarantined as a poison instance.
            done = len(router.events("deidentified"))
            if len(router.events("received")) > 10 * (killed + 1) and done >= done_at_kill + 4:
                alive = router.worker_pids()
                if alive:
                    os.kill(alive[-1], signal.SIGKILL)
                    killed, done_at_kill = killed + 1, done
            time.sleep(0.05)
        sender.wait(60)
        assert killed >= 1
        assert len(acknowledged(tmp_path / "storescu.log", files)) == len(files)
        wait_until(lambda: len(list(out.rglob("*.dcm"))) >= len(files), timeout=60, what="80 files delivered")
        assert {p.stem for p in out.rglob("*.dcm")} == expected_uids(files)
        assert len(router.events("worker_died")) >= killed
        assert router.files("quarantine", "deidentify") == []
        assert router.echo_ok()
        assert router.stop() == 0
