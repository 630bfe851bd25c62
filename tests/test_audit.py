"""The audit store: owner-only SQLite, events per instance, the crosswalk and its export."""

from __future__ import annotations

import csv
import io
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from peers import send_files
from test_node_support import ROUTER_AET, SECRET, Router, folder_destination, new_uid, original_ids, wait_until

FILES = ("pydicom__CT_small.dcm", "pydicom__examples_rgb_color.dcm", "orthanc__HierAnon_SR_IM0.dcm")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def rows(db: Path, query: str) -> list[tuple]:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return connection.execute(query).fetchall()
    finally:
        connection.close()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router", *args], capture_output=True, text=True, timeout=120)


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
    events = rows(db, "SELECT event, sop_instance_uid, reason FROM events")
    assert sorted(e[0] for e in events) == ["deidentified"] * 3 + ["refused"]
    for name in FILES:
        ids = original_ids(corpus_dir / name)
        assert ("deidentified", new_uid(ids["SOPInstanceUID"]), None) in events
        walk = dict(rows(db, f"SELECT kind, pseudonym FROM crosswalk WHERE original = '{ids['StudyInstanceUID']}'"))
        assert walk["study_uid"] == new_uid(ids["StudyInstanceUID"])
    export = run_cli("crosswalk", "export", "--config", str(config), "--output", str(tmp_path / "walk.csv"))
    assert export.returncode == 0, export.stderr
    assert mode(tmp_path / "walk.csv") == 0o600
    exported = list(csv.DictReader(io.StringIO((tmp_path / "walk.csv").read_text())))
    ct = original_ids(corpus_dir / "pydicom__CT_small.dcm")
    assert {"kind": "sop_instance_uid", "original": ct["SOPInstanceUID"],
            "pseudonym": new_uid(ct["SOPInstanceUID"])}.items() <= next(
        r for r in exported if r["original"] == ct["SOPInstanceUID"]).items()
    assert any(r["kind"] == "patient_id" and r["original"] == ct["PatientID"] for r in exported)
    only = run_cli("crosswalk", "export", "--db", str(db), "--kind", "patient_id")
    assert only.returncode == 0 and {r["kind"] for r in csv.DictReader(io.StringIO(only.stdout))} == {"patient_id"}


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
        history = rows(db, "SELECT event, calling_ae, destination FROM events WHERE spool_id IN "
                           f"(SELECT spool_id FROM events WHERE sop_instance_uid = '{uid}') OR sop_instance_uid = '{uid}'"
                           " ORDER BY id")
        assert [h[0] for h in history] == ["received", "deidentified", "forwarded"], history
        assert history[0][1] == "CT01" and history[2][2] == "research"
    assert len(rows(db, "SELECT * FROM crosswalk WHERE kind = 'sop_instance_uid'")) == len(files)
