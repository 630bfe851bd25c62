"""Every real file of ../shared/corpus through the file mode: written or refused, never lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_node_support import fill_file_system

from router.config import DeidConfig
from router.profile import Deidentifier, InstanceRefused, read_instance, transfer_syntax_of, write_instance

#: Broken or incomplete files in the corpus, and why they must be refused.
EXPECTED_REFUSALS = {
    "pydicom__MR_truncated.dcm": "truncated",
    "pydicom__badVR.dcm": "Number of Frames",
    "pydicom__no_meta.dcm": "not a DICOM dataset",
    "pydicom__empty_charset_LEI.dcm": "SOP Class UID",
    "pydicom__UN_sequence.dcm": "not a DICOM dataset",
    "pydicom__nested_priv_SQ.dcm": "not a DICOM dataset",
    "pydicom__priv_SQ.dcm": "not a DICOM dataset",
}
OPTIONS = frozenset({"retain-longitudinal-modified-dates", "clean-descriptors", "retain-safe-private"})


def corpus_files(corpus_dir: Path) -> list[Path]:
    return sorted(corpus_dir.glob("*.dcm"))


def pixels(path: Path):
    """The decoded pixel data of a file, or None where pydicom cannot decode it."""
    try:
        ds = pydicom.dcmread(path)
        return ds.pixel_array if "PixelData" in ds else None
    except Exception:  # noqa: BLE001 - the input's own decodability is what we compare
        return None


def test_every_corpus_file_is_written_or_refused_with_a_reason(corpus_dir, tmp_path):
    files = corpus_files(corpus_dir)
    assert len(files) == 59
    deid = Deidentifier(DeidConfig(options=OPTIONS), b"corpus-test-secret")
    written = 0
    for src in files:
        dst = tmp_path / (src.stem + ".out.dcm")
        try:
            deid.process_file(src, dst)
        except InstanceRefused as exc:
            assert src.name in EXPECTED_REFUSALS, f"{src.name} refused: {exc.reason}"
            assert EXPECTED_REFUSALS[src.name] in exc.reason
            assert not dst.exists()
            continue
        assert src.name not in EXPECTED_REFUSALS, f"{src.name} should have been refused"
        written += 1
        original = pydicom.dcmread(src, force=True)
        out = pydicom.dcmread(dst)
        data = dst.read_bytes()
        assert out.PatientIdentityRemoved == "YES"
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.SOPInstanceUID != original.SOPInstanceUID
        for keyword in ("PatientID", "PatientName", "AccessionNumber", "InstitutionName", "StationName"):
            value = str(original.get(keyword, "") or "").strip()
            if len(value) >= 5:
                assert value.encode("latin-1", "ignore") not in data, f"{src.name}: {keyword} survived"
        if "PixelData" in original:
            assert out.file_meta.TransferSyntaxUID == transfer_syntax_of(original)
            before = pixels(src)
            if before is not None:
                after = pixels(dst)
                assert after is not None, f"{src.name}: output pixels no longer decode"
                assert np.array_equal(before, after), f"{src.name}: pixels changed"
    assert written == len(files) - len(EXPECTED_REFUSALS)


def test_corpus_character_sets_survive(corpus_dir, tmp_path):
    deid = Deidentifier(DeidConfig(options=frozenset({"clean-descriptors"})), b"corpus-test-secret")
    for name in ("orthanc__Encodings_Lena-shift-jis.dcm", "orthanc__Encodings_Lena-utf8.dcm", "orthanc__MarekLatin2_SR.dcm"):
        src = corpus_dir / name
        ds = read_instance(src)
        deid.deidentify(ds)
        write_instance(ds, tmp_path / name)
        out = pydicom.dcmread(tmp_path / name)
        original = pydicom.dcmread(src)
        assert out.SpecificCharacterSet == original.SpecificCharacterSet
        for elem in out.iterall():
            if elem.VR in ("LO", "SH", "LT", "ST", "UT", "PN") and elem.value:
                str(elem.value)  # decodes without error


def test_cli_deid_on_the_corpus(corpus_dir, tmp_path):
    config = tmp_path / "router.toml"
    config.write_text(f'[node]\nspool_dir = "{tmp_path / "spool"}"\n[deid]\nsecret = "cli-test-secret"\n'
                      'options = ["retain-longitudinal-modified-dates"]\n')
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "router", "deid", str(corpus_dir), str(out), "--config", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]  # the corpus has broken and non-DICOM files
    summary = done.stdout.splitlines()[0]
    assert summary.startswith("read 62, written ")
    refused_lines = [line for line in done.stdout.splitlines() if line.strip().startswith("refused ")]
    assert len(refused_lines) == len(EXPECTED_REFUSALS) + 3  # plus MANIFEST.tsv, README.md, boxes.json
    assert all(": " in line for line in refused_lines)
    files = list(out.rglob("*.dcm"))
    assert files and all(p.name.startswith("2.25.") for p in files)
    for path in files:
        assert all(part.startswith(("DEID-", "2.25.")) for part in path.relative_to(out).parts)
    # Logs name no patient: no original PatientName/ID of the corpus in them.
    for name in ("SIMPSON", "KAUFMAN", "2020202020202", "ZZZDOWNTIME"):
        assert name not in done.stderr


def test_cli_deid_single_file_success(corpus_dir, tmp_path):
    config = tmp_path / "router.toml"
    config.write_text(f'[node]\nspool_dir = "{tmp_path / "spool"}"\n')
    done = subprocess.run([sys.executable, "-m", "router", "deid", str(corpus_dir / "pydicom__CT_small.dcm"),
                           str(tmp_path / "out"), "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "spool" / "site-secret").exists()  # generated once, kept beside the spool
    assert "site_secret.generated" in done.stderr
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1


def test_cli_deid_says_when_the_output_file_system_is_full(corpus_dir, tmp_path, small_filesystem):
    """A full output disk is named as such (strerror, no path: a file name may hold PHI),
    not as an internal error, and the exit code says something was not written."""
    (small_filesystem / "out").mkdir()
    fill_file_system(small_filesystem)
    config = tmp_path / "router.toml"
    config.write_text('[deid]\nsecret = "full-disk-secret"\noptions = ["retain-longitudinal-modified-dates"]\n')
    done = subprocess.run([sys.executable, "-m", "router", "deid", str(corpus_dir / "pydicom__liver_1frame.dcm"),
                           str(small_filesystem / "out"), "--config", str(config)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    assert "pydicom__liver_1frame.dcm: file system error: No space left on device" in done.stdout


def test_cli_deid_output_folder_that_cannot_be_made(corpus_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "router.toml"
    config.write_text('[deid]\nsecret = "some-secret-here"\n')
    done = subprocess.run([sys.executable, "-m", "router", "deid", str(corpus_dir / "pydicom__CT_small.dcm"),
                           str(blocker / "out"), "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "cannot make the output folder: Not a directory" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cli_workers_give_the_same_output(corpus_dir, tmp_path, workers):
    config = tmp_path / "router.toml"
    config.write_text('[deid]\nsecret = "same-secret-here"\noptions = ["retain-longitudinal-modified-dates"]\n')
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "router", "deid", str(corpus_dir), str(out), "--config", str(config),
                    "--workers", workers], capture_output=True, text=True, timeout=300)
    names = sorted(p.name for p in out.rglob("*.dcm"))
    assert len(names) > 40
    assert names[0].startswith("2.25.")
