"""End to end through real peers: storescu -> deid-router -> Orthanc (the research PACS).

The whole corpus (every file dcmtk can send, each in its own transfer syntax) plus a
synthetic 200-slice CT series go through the router; Orthanc's REST API then shows that
every instance the router could de-identify arrived, with no original identifier left
outside the pixel data, under the study/series hierarchy of the input (new UIDs).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, _config, build_context

from bench.synthetic import us_multiframe, write_ct_series
from peers import Orthanc, StoreSCP, send_files, storescu
from router.config import DeidConfig
from router.pixels import inflated
from router.profile import Deidentifier, InstanceRefused
from test_node_support import (
    NODE_TEST_OPTIONS,
    ROUTER_AET,
    SECRET,
    Router,
    dicom_destination,
    folder_destination,
    new_uid,
    original_ids,
    wait_until,
)

PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
#: Name parts that are words, not identifiers (e.g. a code meaning "PATIENT").
GENERIC = {"patient", "anonymous", "anonymized", "unknown", "last name", "first name"}


def outside_pixel_data(data: bytes) -> bytes:
    """The bytes of a Part 10 file before its (last) Pixel Data element."""
    index = data.rfind(PIXEL_DATA_TAG)
    return data[:index] if index > 0 else data


def needles_of(ids: dict[str, str]) -> set[bytes]:
    """Original identifying values worth searching for (short or generic ones would match by chance)."""
    found = set()
    for key, value in ids.items():
        value = value.strip()
        if key.endswith("UID"):
            if len(value) >= 8:
                found.add(value.encode())
        else:
            for part in {value, *value.split("^")}:
                part = part.strip()
                if len(part) >= 6 and not part.lower().startswith("anonym") and part.lower() not in GENERIC:
                    found.add(part.encode("utf-8", "replace"))
    return found


def expected_results(files: list[Path], tmp: Path) -> dict[Path, object]:
    """What the engine makes of each file (its result, or the InstanceRefused)."""
    engine = Deidentifier(DeidConfig(secret=SECRET.encode(), options=frozenset(NODE_TEST_OPTIONS)), SECRET.encode())
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[Path, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, path in enumerate(files):
            try:
                results[path] = engine.process_file(path, tmp / f"{index}.dcm", durable=False)
            except InstanceRefused as exc:
                results[path] = exc
    return results


def test_corpus_and_ct_series_end_to_end(tmp_path: Path, corpus_dir: Path) -> None:
    ct_dir = tmp_path / "ct"
    ct_files = write_ct_series(ct_dir, 200, patient_id="PID-E2E-0001", patient_name="EXAMPLE^EVELYN")
    with Orthanc(tmp_path) as pacs, Router(tmp_path, [dicom_destination("pacs", "127.0.0.1", pacs.dicom_port, pacs.aet)],
                                           node={"workers": 2}) as router:
        accepted = send_files("127.0.0.1", router.port, corpus_dir, called_ae=ROUTER_AET)
        sent_corpus = sorted(path for path, ok in accepted.items() if ok)
        proc = storescu("127.0.0.1", router.port, [ct_dir], called_ae=ROUTER_AET, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # dcmtk sends every corpus file with a SOP class, broken ones included: the router
        # acknowledges them all (it never decodes in the C-STORE handler).
        assert len(sent_corpus) >= 50, sorted(p.name for p, ok in accepted.items() if not ok)

        sent = sent_corpus + ct_files
        results = expected_results(sent, tmp_path / "oracle")
        refused = [p for p in sent if isinstance(results[p], InstanceRefused)]
        delivered = [p for p in sent if p not in refused]
        assert {p.name for p in refused} >= {"pydicom__badVR.dcm"}
        expected_uids = {results[p].sop_instance_uid for p in delivered}

        wait_until(lambda: pacs.count() >= len(expected_uids) and
                   len(router.files("quarantine", "deidentify")) >= len(refused),
                   timeout=180, interval=0.5, what=f"{len(expected_uids)} instances in Orthanc")
        stored = pacs.sop_instance_uids()
        assert set(stored) == expected_uids

        # Refused instances: quarantined with the engine's (PHI-free) reason, nothing else.
        reasons = router.reasons("deidentify")
        assert sorted(r["reason"] for r in reasons) == sorted(results[p].reason for p in refused)
        assert all(r["stage"] == "deidentify" and r["exception"] == "InstanceRefused" for r in reasons)

        # The hierarchy: instance -> series -> study, under the new UIDs, as in the input.
        series_uid = {s["ID"]: s["MainDicomTags"]["SeriesInstanceUID"] for s in pacs.get("/series?expand")}
        study_uid = {s["ID"]: s["MainDicomTags"]["StudyInstanceUID"] for s in pacs.get("/studies?expand")}
        series_study = {s["ID"]: s["ParentStudy"] for s in pacs.get("/series?expand")}
        placed = {}
        for instance in pacs.get("/instances?expand"):
            parent = instance["ParentSeries"]
            placed[instance["MainDicomTags"]["SOPInstanceUID"]] = (study_uid[series_study[parent]], series_uid[parent])
        allowed = defaultdict(set)  # some corpus files share a SOP Instance UID: Orthanc keeps one
        originals: dict[Path, dict[str, str]] = {p: original_ids(p) for p in delivered}
        for path in delivered:
            r = results[path]
            allowed[r.sop_instance_uid].add((r.study_instance_uid, r.series_instance_uid))
        for uid, where in placed.items():
            assert where in allowed[uid], uid
        input_series = {(o["StudyInstanceUID"], o["SeriesInstanceUID"]) for o in originals.values()}
        output_series = {(results[p].study_instance_uid, results[p].series_instance_uid) for p in delivered}
        assert len(output_series) == len(input_series)
        assert len({s for s, _ in output_series}) == len({s for s, _ in input_series})
        assert len(study_uid) == len({s for s, _ in input_series})
        assert len(series_uid) == len(input_series)
        # The CT series: one study, one series, 200 instances under the keyed new UIDs.
        ct = originals[ct_files[0]]
        ct_series = [uid for uid, where in placed.items()
                     if where == (new_uid(ct["StudyInstanceUID"]), new_uid(ct["SeriesInstanceUID"]))]
        assert sorted(ct_series) == sorted(new_uid(original_ids(p)["SOPInstanceUID"]) for p in ct_files)

        # No original identifier outside the pixel data of any stored file, nor in the log.
        needles = set().union(*(needles_of(o) for o in originals.values()))
        needles |= set().union(*(needles_of(original_ids(p)) for p in refused))
        assert len(needles) > 250
        leaks = {}
        for uid, orthanc_id in stored.items():
            head = outside_pixel_data(pacs.instance_file(orthanc_id))
            if found := [n for n in needles if n in head]:
                leaks[uid] = found
            tags = pacs.instance_tags(orthanc_id)
            assert tags.get("PatientIdentityRemoved") == "YES"
            assert tags.get("PatientID", "") in ("", tags.get("PatientName")), tags.get("PatientID")
            assert tags.get("PatientID", "").startswith("DEID-") or not tags.get("PatientID")
        log = router.logged_strings().encode("utf-8", "replace")
        assert not [n for n in needles if n in log]
        assert not router.non_json_lines(), router.non_json_lines()[:5]

        # One event per instance per stage.
        assert len(router.events("received")) == len(sent)
        assert len(router.events("deidentified")) == len(delivered)
        forwarded = {e["sop_instance_uid"] for e in router.events("forwarded")}
        assert forwarded == expected_uids
        assert router.stop() == 0
        assert not leaks, leaks


@pytest.fixture
def chunked_send():
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


def test_syntax_the_destination_refuses_is_sent_decompressed(tmp_path: Path, corpus_dir: Path, chunked_send) -> None:
    """A destination that takes JPEG 2000 / JPEG-LS / Deflated Image Frames only
    uncompressed gets them decompressed, losslessly."""
    j2k = corpus_dir / "pdd__RG3_J2KI.dcm"
    jpeg_ls = corpus_dir / "pdd__emri_small_jpeg_ls_lossless.dcm"
    deflate = corpus_dir / "pdd__liver_deflate.dcm"  # Orthanc 1.10 refuses it; pydicom 3.0 cannot decode it
    refuse = {"Jpeg2000TransferSyntaxAccepted": False, "JpegLosslessTransferSyntaxAccepted": False}
    with Orthanc(tmp_path, config=refuse) as pacs, Router(tmp_path, [dicom_destination(
            "pacs", "127.0.0.1", pacs.dicom_port, pacs.aet, max_attempts=2, retry_initial_seconds=0.2,
            retry_max_seconds=0.5)]) as router:
        ae = AE(ae_title="MODALITY")
        files = [j2k, jpeg_ls, deflate]
        contexts = []
        for path in files:
            meta = dcmread(path, stop_before_pixels=True).file_meta
            contexts.append(build_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID]))
        assoc = ae.associate("127.0.0.1", router.port, contexts=contexts, ae_title=ROUTER_AET)
        assert assoc.is_established
        for path in files:
            assert assoc.send_c_store(path).Status == 0x0000
        assoc.release()

        pacs.wait_for_instances(3, timeout=60)
        stored = pacs.sop_instance_uids()
        for path in files:
            orthanc_id = stored[new_uid(original_ids(path)["SOPInstanceUID"])]
            assert pacs.transfer_syntax(orthanc_id) in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
            received = dcmread(DicomBytesIO(pacs.instance_file(orthanc_id)))
            original = dcmread(path)
            expected = inflated(original).pixel_array if path == deflate else original.pixel_array
            assert np.array_equal(received.pixel_array, expected)  # lossless
        assert sorted(e["mode"] for e in router.events("forwarded")) == ["decompressed"] * 3
        assert router.files("quarantine", "pacs") == []
        assert router.files("outgoing", "pacs") == []
        assert router.stop() == 0


def test_compressed_clip_reaches_storescp_decompressed(tmp_path: Path) -> None:
    """dcmtk's storescp takes only uncompressed syntaxes: an RLE clip (what the pixel stage
    writes) arrives Explicit VR Little Endian with the same pixels, decoded frame by frame
    into a nameless scratch file of the spool that is gone once sent."""
    clip_path = tmp_path / "clip.dcm"
    clip, _boxes = us_multiframe(12, seed=7)
    clip.compress(RLELossless, encoding_plugin="pylibjpeg")
    clip.save_as(clip_path, enforce_file_format=True)
    uncompressed_only = ["+x="]  # storescp's default; the helper's "+xa" before it is overridden
    with StoreSCP(tmp_path / "scp", extra_args=uncompressed_only) as scp, Router(tmp_path, [dicom_destination(
            "scp", "127.0.0.1", scp.port, scp.aet)]) as router:
        ae = AE(ae_title="MODALITY")
        assoc = ae.associate("127.0.0.1", router.port, ae_title=ROUTER_AET,
                             contexts=[build_context(clip.SOPClassUID, [RLELossless])])
        assert assoc.is_established
        assert assoc.send_c_store(clip_path).Status == 0x0000
        assoc.release()
        [received] = scp.wait_for_files(1, timeout=60)
        arrived = dcmread(received)
        assert arrived.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        assert arrived.NumberOfFrames == 12
        assert np.array_equal(arrived.pixel_array, dcmread(clip_path).pixel_array)
        assert [e["mode"] for e in router.events("forwarded")] == ["decompressed"]
        assert not router.files("tmp", suffix="")
        assert router.stop() == 0


def test_product_default_options_clean_pixels_in_the_workers(tmp_path: Path, corpus_dir: Path) -> None:
    """The default options include clean-pixel-data: the OCR stage runs in the worker processes."""
    files = [corpus_dir / "orthanc__TS_1.2.840.10008.1.2.4.50_ATL_US.dcm", corpus_dir / "pdd__OBXXXX1A_rle.dcm"]
    out = tmp_path / "out"
    with Router(tmp_path, [folder_destination("folder", out)], deid={"options": None}) as router:
        accepted = send_files("127.0.0.1", router.port, files, called_ae=ROUTER_AET)
        assert all(accepted.values())
        wait_until(lambda: len(list(out.rglob("*.dcm"))) == len(files), timeout=120, interval=0.5,
                   what="two instances with burned-in text delivered")
        for path in files:
            [result] = out.rglob(f"{new_uid(original_ids(path)['SOPInstanceUID'])}.dcm")
            cleaned, original = dcmread(result), dcmread(path)
            assert "clean-pixel-data" not in NODE_TEST_OPTIONS
            assert "113101" in str(cleaned.get("DeidentificationMethodCodeSequence", ""))  # Clean Pixel Data
            assert not np.array_equal(cleaned.pixel_array, original.pixel_array)  # text masked
        assert router.stop() == 0


def test_a_pacs_auto_routing_to_the_node(tmp_path: Path, corpus_dir: Path) -> None:
    """A PACS (Orthanc) sends what it holds to the node as one of its modalities (its own
    association habits: a context per class and syntax, several associations); the node
    de-identifies it all into the research PACS (another Orthanc)."""
    import json
    import urllib.request

    names = ["pydicom__CT_small.dcm", "pydicom__rtplan.dcm", "pydicom__test-SR.dcm", "pydicom__waveform_ecg.dcm",
             "pydicom__JPGExtended.dcm", "orthanc__Encodings_Lena-utf8.dcm", "deid__ctbrain1.dcm",
             "presidio__2_ORIGINAL.dcm"]
    files = [corpus_dir / n for n in names]
    with Orthanc(tmp_path, aet="RESEARCH") as research, Router(tmp_path, [dicom_destination(
            "research", "127.0.0.1", research.dicom_port, research.aet)]) as router:
        source = Orthanc(tmp_path, aet="SOURCEPACS",
                         config={"DicomModalities": {"router": [ROUTER_AET, "127.0.0.1", router.port]}}).start()
        try:
            ids = []
            for path in files:
                upload = urllib.request.Request(source.url + "/instances", data=path.read_bytes(), method="POST")
                with urllib.request.urlopen(upload, timeout=30) as answer:
                    ids.append(json.loads(answer.read())["ID"])
            store = urllib.request.Request(source.url + "/modalities/router/store", method="POST",
                                           data=json.dumps({"Resources": ids, "Synchronous": True}).encode())
            with urllib.request.urlopen(store, timeout=120) as answer:
                outcome = json.loads(answer.read())
            assert (outcome["InstancesCount"], outcome["FailedInstancesCount"]) == (len(files), 0)
        finally:
            source.stop()
        research.wait_for_instances(len(files), timeout=60)
        expected = {new_uid(original_ids(path)["SOPInstanceUID"]) for path in files}
        assert set(research.sop_instance_uids()) == expected
        assert {e["calling_ae"] for e in router.events("received")} == {"SOURCEPACS"}
        assert {e["how"] for e in router.events("association_ended")} == {"released"}
        assert router.stop() == 0
