"""The real-peer helpers work: Orthanc, storescp, storescu, echoscu, send_files."""

from __future__ import annotations

import io
import time
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
from pydicom import dcmread

from peers import (
    PROPOSE_FLAGS,
    Orthanc,
    StoreSCP,
    dataset_key,
    echoscu,
    free_port,
    parse_storescu_output,
    send_files,
    storescu,
)

CT = "pydicom__CT_small.dcm"

#: Corpus files dcmtk 3.6.7 cannot send (reasons in peers.py's docstring).
DCMTK_CANNOT_SEND = {
    "pdd__HTJ2K_08_RGB.dcm",
    "pdd__liver_deflate.dcm",
    "pdd__explicit_VR-UN.dcm",
    "pydicom__MR_truncated.dcm",
    "pydicom__UN_sequence.dcm",
    "pydicom__empty_charset_LEI.dcm",
    "pydicom__nested_priv_SQ.dcm",
    "pydicom__no_meta.dcm",
    "pydicom__priv_SQ.dcm",
}


def sop_uid(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some corpus files hold invalid UIs on purpose
        return str(dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


def test_orthanc_answers_rest_and_echo(orthanc: Orthanc) -> None:
    system = orthanc.get("/system")
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert system["HttpPort"] == orthanc.http_port
    assert orthanc.instances() == []
    ok = echoscu("127.0.0.1", orthanc.dicom_port, called_ae=orthanc.aet)
    assert ok.returncode == 0, ok.stderr
    refused = echoscu("127.0.0.1", free_port(), called_ae=orthanc.aet, timeout=10)
    assert refused.returncode != 0


def test_storescu_one_file_to_orthanc(orthanc: Orthanc, corpus_dir: Path) -> None:
    path = corpus_dir / CT
    proc = storescu("127.0.0.1", orthanc.dicom_port, path, called_ae=orthanc.aet, calling_ae="MODALITY")
    assert proc.returncode == 0, proc.stderr
    [oid] = orthanc.wait_for_instances(1, timeout=10)
    expected = sop_uid(path)
    assert orthanc.instance_tags(oid)["SOPInstanceUID"] == expected
    assert orthanc.get(f"/instances/{oid}/tags?simplify")["SOPInstanceUID"] == expected
    assert dcmread(io.BytesIO(orthanc.instance_file(oid))).SOPInstanceUID == expected
    assert orthanc.sop_instance_uids() == {expected: oid}
    assert orthanc.instance_metadata(oid, "RemoteAET") == "MODALITY"
    assert orthanc.instance_metadata(oid, "CalledAET") == "ORTHANC"
    assert orthanc.transfer_syntax(oid) == "1.2.840.10008.1.2.1"


def test_wait_for_instances_times_out_with_the_count(orthanc: Orthanc) -> None:
    with pytest.raises(AssertionError, match="holds 0 instances"):
        orthanc.wait_for_instances(1, timeout=0.2)


def test_storescp_receives_a_file(storescp: StoreSCP, corpus_dir: Path) -> None:
    path = corpus_dir / CT
    assert storescp.files() == []
    proc = storescu("127.0.0.1", storescp.port, path, called_ae=storescp.aet)
    assert proc.returncode == 0, proc.stderr
    [received] = storescp.wait_for_files(1, timeout=10)
    assert sop_uid(received) == sop_uid(path)
    assert dcmread(received).pixel_array.shape == (128, 128)


def test_compressed_files_need_their_syntax_proposed(orthanc: Orthanc, corpus_dir: Path) -> None:
    """Plain storescu fails on compressed files; the PROPOSE_FLAGS flag sends each as is."""
    jpeg = corpus_dir / "deid__ctbrain1.dcm"
    plain = storescu("127.0.0.1", orthanc.dicom_port, jpeg, called_ae=orthanc.aet)
    assert "Store Failed" in plain.stderr
    assert orthanc.count() == 0

    by_syntax: dict[str, Path] = {}
    for path in sorted(corpus_dir.glob("*.dcm")):
        key = dataset_key(path)
        if key and key[1] in PROPOSE_FLAGS and path.name not in DCMTK_CANNOT_SEND:
            by_syntax.setdefault(key[1], path)
    assert len(by_syntax) >= 8, sorted(by_syntax)  # every family in the corpus is tried
    for syntax, path in by_syntax.items():
        proc = storescu("127.0.0.1", orthanc.dicom_port, path, called_ae=orthanc.aet,
                        extra_args=(PROPOSE_FLAGS[syntax], "-R"))
        assert proc.returncode == 0 and "Store Failed" not in proc.stderr, (path.name, proc.stderr)
    stored = orthanc.sop_instance_uids()
    assert len(stored) == len(by_syntax)
    for syntax, path in by_syntax.items():
        assert orthanc.transfer_syntax(stored[sop_uid(path)]) == syntax, path.name


def test_orthanc_restart_keeps_instances(tmp_path: Path, corpus_dir: Path) -> None:
    with Orthanc(tmp_path, aet="KEEPER") as pacs:
        ports = (pacs.dicom_port, pacs.http_port)
        assert storescu("127.0.0.1", pacs.dicom_port, corpus_dir / CT).returncode == 0
        [oid] = pacs.wait_for_instances(1)

        started = time.monotonic()
        pacs.stop()  # graceful: SIGTERM
        assert not pacs.running
        assert time.monotonic() - started < 10
        assert echoscu("127.0.0.1", ports[0], timeout=10).returncode != 0

        pacs.start()
        assert (pacs.dicom_port, pacs.http_port) == ports
        assert pacs.instances() == [oid]
        assert pacs.instance_tags(oid)["SOPInstanceUID"] == sop_uid(corpus_dir / CT)

        pacs.restart(graceful=False)  # SIGKILL loses nothing committed either
        assert pacs.instances() == [oid]
        rgb = corpus_dir / "pydicom__examples_rgb_color.dcm"
        assert storescu("127.0.0.1", pacs.dicom_port, rgb).returncode == 0
        assert len(pacs.wait_for_instances(2)) == 2
    assert not pacs.running


def test_send_files_whole_corpus(orthanc: Orthanc, corpus_dir: Path) -> None:
    started = time.monotonic()
    result = send_files("127.0.0.1", orthanc.dicom_port, corpus_dir, called_ae=orthanc.aet)
    elapsed = time.monotonic() - started
    files = sorted(corpus_dir.glob("*.dcm"))
    # The folder is walked recursively: MANIFEST.tsv, README.md, ground_truth/ are not DICOM.
    assert set(files) < set(result)
    assert not any(ok for p, ok in result.items() if p.suffix != ".dcm")
    assert {p.name for p, ok in result.items() if not ok and p.suffix == ".dcm"} == DCMTK_CANNOT_SEND
    accepted = [p for p, ok in result.items() if ok]
    assert len(accepted) == len(files) - len(DCMTK_CANNOT_SEND)

    # Orthanc keeps one instance per SOP Instance UID: duplicates in the corpus collapse.
    by_uid: dict[str, list[Path]] = defaultdict(list)
    for path in accepted:
        by_uid[sop_uid(path)].append(path)
    orthanc.wait_for_instances(len(by_uid), timeout=20)
    stored = orthanc.sop_instance_uids()
    assert set(stored) == set(by_uid)
    assert orthanc.count() == len(by_uid) < len(accepted)
    # Each file went in its own transfer syntax (the first file of a UID is the one kept).
    for uid, paths in by_uid.items():
        assert orthanc.transfer_syntax(stored[uid]) == dataset_key(paths[0])[1], paths[0].name
    assert elapsed < 20


def test_parse_storescu_output() -> None:
    output = "\n".join([
        "I: Sending file: /a.dcm",
        "I: Received Store Response (Success)",
        "I: Sending file: /b.dcm",
        "E: Store Failed, file: /b.dcm:",
        "I: Sending file: /c.dcm",
        "I: Received Store Response (Warning: Coercion of Data Elements)",
        "I: Sending file: /d.dcm",
        "I: Received Store Response (Refused: Out of Resources)",
        "I: Sending file: /e.dcm",
    ])
    assert parse_storescu_output(output) == {
        "/a.dcm": True, "/b.dcm": False, "/c.dcm": True, "/d.dcm": False, "/e.dcm": False}


def test_orthanc_start_failure_shows_the_log(tmp_path: Path) -> None:
    bad = Orthanc(tmp_path, config={"DicomPort": "not a port"})
    with pytest.raises(RuntimeError, match="exited with code") as info:
        bad.start(timeout=5)
    assert '"DicomPort" must be an integer' in str(info.value)  # the log tail is in the error
    assert not bad.running
