"""The audit store: owner-only SQLite, events per instance, the crosswalk and its export."""

from __future__ import annotations

import csv
import io
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from peers import send_files
from router.audit import AuditStore, AuditStoreError, instance_history
from test_node_support import ROUTER_AET, SECRET, Router, folder_destination, new_uid, original_ids, wait_until

FILES = ("pydicom__CT_small.dcm", "pydicom__examples_rgb_color.dcm", "orthanc__HierAnon_SR_IM0.dcm")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def rows(db: Path, query: str, *params) -> list[tuple]:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return connection.execute(query, params).fetchall()
    finally:
        connection.close()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router", *args], capture_output=True, text=True, timeout=120)


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_store_is_private_serialized_and_links_an_instance_history(tmp_path: Path):
    db = tmp_path / "audit" / "deeper" / "store.db"
    store = AuditStore(db, crosswalk=False)
    try:
        # while it is open: the file, its WAL and shared-memory files and its folders, owner-only
        store.event("received", spool_id="warm-up")
        wait_until(lambda: Path(f"{db}-wal").exists(), timeout=10, what="the WAL file")
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert mode(path) == 0o600, path
        assert mode(db.parent) == 0o700

        def instance(n: int) -> None:  # several threads, as the node's receive/deidentify/forward threads
            spool_id, uid = f"spool-{n}", f"2.25.{n}"
            store.event("received", spool_id=spool_id, calling_ae="CT01")
            store.event("deidentified", spool_id=spool_id, calling_ae="CT01", destination="research", patient="P1",
                        study_uid="2.25.1", series_uid="2.25.2", sop_instance_uid=uid)
            store.map({"patient_id": "MRN-1", "sop_instance_uid": f"1.2.{n}"}, {"patient_id": "P1", "sop_instance_uid": uid})
            store.record_pixel_text([(uid, 0, 1, 2, 3, 4, "DOE^JANE")])
            store.event("forwarded", destination="research", sop_instance_uid=uid)

        threads = [threading.Thread(target=lambda k=k: [instance(k * 1000 + i) for i in range(250)]) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        store.event("received", spool_id="broken", calling_ae="US02")
        store.event("quarantined", spool_id="broken", destination="deidentify", reason="malformed element")
    finally:
        store.close()
    assert rows(db, "SELECT count(*) FROM events") == [(1 + 1000 * 3 + 2,)]
    # "what happened to instance X" is one query on its new UID: the received row was linked
    history = rows(db, "SELECT event, calling_ae, destination, patient FROM events WHERE sop_instance_uid = ? ORDER BY id",
                   "2.25.3007")
    assert history == [("received", "CT01", None, "P1"), ("deidentified", "CT01", "research", "P1"),
                       ("forwarded", None, "research", None)]
    assert [h[1] for h in instance_history(db, "broken")] == ["received", "quarantined"]
    # crosswalk and pixel text are PHI: off unless asked for
    assert rows(db, "SELECT count(*) FROM crosswalk") == [(0,)] and rows(db, "SELECT count(*) FROM pixel_text") == [(0,)]
    assert b"MRN-1" not in db.read_bytes() and b"DOE^JANE" not in db.read_bytes()

    os.chmod(db, 0o644)  # reopened: tightened again, and the PHI tables fill when asked for
    store = AuditStore(db, crosswalk=True, pixel_text=True)
    store.map({"patient_id": "MRN-1", "sop_instance_uid": "1.2.5"}, {"patient_id": "P1", "sop_instance_uid": "2.25.5"})
    store.record_pixel_text([("2.25.5", 0, 1, 2, 3, 4, "DOE^JANE")])
    store.close()
    assert mode(db) == 0o600
    assert rows(db, "SELECT kind, original, pseudonym FROM crosswalk ORDER BY kind") == [
        ("patient_id", "MRN-1", "P1"), ("sop_instance_uid", "1.2.5", "2.25.5")]
    assert rows(db, "SELECT sop_instance_uid, text FROM pixel_text") == [("2.25.5", "DOE^JANE")]
    assert [h[1] for h in instance_history(db, "1.2.5")] == ["received", "deidentified", "forwarded"]  # original UID

    (tmp_path / "a-file").write_text("")
    with pytest.raises(AuditStoreError, match="cannot open the audit store .*a-file.store.db: File exists"):
        AuditStore(tmp_path / "a-file" / "store.db")


def test_after_written_runs_once_the_rows_queued_before_it_are_committed(tmp_path: Path):
    db = tmp_path / "store.db"
    store = AuditStore(db, crosswalk=True)
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def check() -> None:  # what another connection (a reader, a restarted node) sees by then
        seen.append((rows(db, "SELECT count(*) FROM crosswalk")[0][0], rows(db, "SELECT count(*) FROM events")[0][0]))
        done.set()

    try:
        for n in range(300):
            store.event("deidentified", spool_id=f"s{n}", sop_instance_uid=f"2.25.{n}")
            store.map({"sop_instance_uid": f"1.2.{n}"}, {"sop_instance_uid": f"2.25.{n}"})
        store.after_written(check)
        assert done.wait(10)
        assert seen == [(300, 300)]
        store.after_written(lambda: 1 / 0)  # a failing function is logged; the writer goes on
        store.after_written(check)
        done.clear()
        assert done.wait(10)
    finally:
        store.close()
    assert seen == [(300, 300), (300, 300)]


def test_file_mode_records_events_and_crosswalk(tmp_path: Path, corpus_dir: Path):
    db = tmp_path / "audit" / "store.db"
    config = tmp_path / "router.toml"
    config.write_text(f'[deid]\nsecret = "{SECRET}"\noptions = []\n[audit]\npath = "{db}"\ncrosswalk = true\n')
    src = tmp_path / "src"
    src.mkdir()
    for name in FILES:
        (src / name).write_bytes((corpus_dir / name).read_bytes())
    (src / "not-dicom.txt").write_text("hello")
    done = run_cli("deid", str(src), str(tmp_path / "out"), "--config", str(config))
    assert done.returncode == 1, done.stderr  # the text file is refused
    assert mode(db) == 0o600 and mode(db.parent) == 0o700
    events = rows(db, "SELECT event, calling_ae, sop_instance_uid, reason FROM events")
    assert sorted(e[0] for e in events) == ["deidentified"] * 3 + ["refused"]
    for name in FILES:
        ids = original_ids(corpus_dir / name)
        assert ("deidentified", None, new_uid(ids["SOPInstanceUID"]), None) in events
        walk = dict(rows(db, "SELECT kind, pseudonym FROM crosswalk WHERE original = ?", ids["StudyInstanceUID"]))
        assert walk["study_uid"] == new_uid(ids["StudyInstanceUID"])
    export = run_cli("crosswalk", "export", "--config", str(config), "--output", str(tmp_path / "walk.csv"))
    assert export.returncode == 0, export.stderr
    assert mode(tmp_path / "walk.csv") == 0o600
    exported = read_csv((tmp_path / "walk.csv").read_text())
    ct = original_ids(corpus_dir / "pydicom__CT_small.dcm")
    assert {"kind": "sop_instance_uid", "original": ct["SOPInstanceUID"],
            "pseudonym": new_uid(ct["SOPInstanceUID"])}.items() <= next(
        r for r in exported if r["original"] == ct["SOPInstanceUID"]).items()
    assert any(r["kind"] == "patient_id" and r["original"] == ct["PatientID"] for r in exported)
    only = run_cli("crosswalk", "export", "--db", str(db), "--kind", "patient_id")
    assert only.returncode == 0 and {r["kind"] for r in read_csv(only.stdout)} == {"patient_id"}
    # the MIDI-B validation script's mapping files: id_old,id_new
    uids = run_cli("crosswalk", "export", "--db", str(db), "--kind", "uids", "--format", "id-map")
    assert uids.returncode == 0, uids.stderr
    mapping = {r["id_old"]: r["id_new"] for r in read_csv(uids.stdout)}
    assert uids.stdout.startswith("id_old,id_new") and len(mapping) == 9  # 3 files x study, series, SOP
    assert all(mapping[ct[k]] == new_uid(ct[k]) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    patients = read_csv(run_cli("crosswalk", "export", "--db", str(db), "--kind", "patient_id", "--format", "id-map").stdout)
    assert {"id_old": ct["PatientID"], "id_new": walk_of(db, ct["PatientID"])} in patients
    # one instance's history, by its original UID; events since a time
    show = run_cli("audit", "show", ct["SOPInstanceUID"], "--config", str(config))
    assert [r["event"] for r in read_csv(show.stdout)] == ["deidentified"], show.stderr
    assert len(read_csv(run_cli("audit", "export", "--db", str(db), "--since", "2000-01-01").stdout)) == 4
    assert read_csv(run_cli("audit", "export", "--db", str(db), "--since", "2999-01-01").stdout) == []


def walk_of(db: Path, original: str) -> str:
    return rows(db, "SELECT pseudonym FROM crosswalk WHERE original = ?", original)[0][0]


def test_no_crosswalk_rows_unless_asked(tmp_path: Path, corpus_dir: Path):
    db = tmp_path / "store.db"
    config = tmp_path / "router.toml"
    config.write_text(f'[deid]\nsecret = "{SECRET}"\noptions = []\n[audit]\npath = "{db}"\n')
    done = run_cli("deid", str(corpus_dir / "pydicom__CT_small.dcm"), str(tmp_path / "out"), "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert rows(db, "SELECT count(*) FROM events") == [(1,)]
    assert rows(db, "SELECT count(*) FROM crosswalk") == [(0,)]
    assert ct_original_absent(db, original_ids(corpus_dir / "pydicom__CT_small.dcm"))


def ct_original_absent(db: Path, ids: dict[str, str]) -> bool:
    data = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    return all(value.encode() not in data for value in ids.values() if len(value) > 3)


def test_pixel_text_in_the_store(tmp_path: Path):
    """[audit] pixel_text: the text read off masked pixels goes to the store (file mode)."""
    from bench.synthetic import us_rgb_with_text

    ds, _boxes = us_rgb_with_text(["DOE JANE 19510829", "MRN 4711"], rows=300, columns=400)
    src = tmp_path / "us.dcm"
    ds.save_as(src, enforce_file_format=True)
    db = tmp_path / "store.db"
    config = tmp_path / "router.toml"
    config.write_text(f'[deid]\nsecret = "{SECRET}"\noptions = ["clean-pixel-data"]\n'
                      f'[audit]\npath = "{db}"\npixel_text = true\n')
    done = run_cli("deid", str(src), str(tmp_path / "out"), "--config", str(config), "--workers", "1")
    assert done.returncode == 0, done.stderr
    new = new_uid(ds.SOPInstanceUID)
    texts = rows(db, "SELECT sop_instance_uid, text FROM pixel_text")
    assert texts and {t[0] for t in texts} == {new}
    assert "MRN" in " ".join(t[1] for t in texts).upper()
    export = run_cli("crosswalk", "pixel-text", "--db", str(db))
    assert export.returncode == 0 and read_csv(export.stdout)[0]["sop_instance_uid"] == new


def test_node_records_each_stage_of_each_instance(tmp_path: Path, corpus_dir: Path):
    db = tmp_path / "node-audit.db"
    out = tmp_path / "out"
    files = [corpus_dir / name for name in FILES]
    with Router(tmp_path, [folder_destination("research", out)],
                sections={"audit": {"path": str(db), "crosswalk": True}}) as router:
        assert all(send_files("127.0.0.1", router.port, files, called_ae=ROUTER_AET, calling_ae="CT01").values())
        wait_until(lambda: len(list(out.rglob("*.dcm"))) == len(files), timeout=60, what="all delivered")
        assert router.stop() == 0
    assert mode(db) == 0o600
    for path in files:
        uid = new_uid(original_ids(path)["SOPInstanceUID"])
        history = rows(db, "SELECT event, calling_ae, destination FROM events WHERE sop_instance_uid = ? ORDER BY id", uid)
        assert [h[0] for h in history] == ["received", "deidentified", "forwarded"], history
        assert history[0][1] == "CT01" and history[2][2] == "research"
    assert len(rows(db, "SELECT * FROM crosswalk WHERE kind = 'sop_instance_uid'")) == len(files)


def test_node_records_pixel_text(tmp_path: Path):
    from bench.synthetic import us_rgb_with_text
    from test_node_support import NODE_TEST_OPTIONS

    ds, _boxes = us_rgb_with_text(["DOE JANE 19510829", "MRN 4711"], rows=300, columns=400)
    src = tmp_path / "us.dcm"
    ds.save_as(src, enforce_file_format=True)
    db = tmp_path / "node-audit.db"
    out = tmp_path / "out"
    with Router(tmp_path, [folder_destination("research", out)], node={"workers": 1},
                deid={"options": [*NODE_TEST_OPTIONS, "clean-pixel-data"]},
                sections={"audit": {"path": str(db), "pixel_text": True}}) as router:
        assert all(send_files("127.0.0.1", router.port, [src], called_ae=ROUTER_AET, calling_ae="US01").values())
        wait_until(lambda: list(out.rglob("*.dcm")), timeout=60, what="delivered")
        assert router.stop() == 0
    texts = rows(db, "SELECT sop_instance_uid, text FROM pixel_text")
    assert texts and {t[0] for t in texts} == {new_uid(ds.SOPInstanceUID)}
    assert "MRN" in " ".join(t[1] for t in texts).upper()
    assert rows(db, "SELECT count(*) FROM crosswalk") == [(0,)]
