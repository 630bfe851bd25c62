"""router.encode writes what pydicom's writer writes, for every corpus instance.

The fast writer copies kept elements verbatim; it must not change a byte pydicom would
have written, except the preamble (always zeros here: an input's preamble can hold
anything) and explicit VR UN elements, which it writes with their dictionary VR.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from router import config as config_module
from router.encode import fast_syntax, part10_bytes
from router.profile import Deidentifier, InstanceRefused, read_instance

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
SECRET = b"encode-test-secret-0123456789"


def corpus_files() -> list[Path]:
    return sorted(CORPUS.rglob("*.dcm"))


@pytest.fixture(scope="module")
def deidentifier() -> Deidentifier:
    config = config_module.parse('[deid]\nsecret = "encode-test-secret"\noptions = ["retain-longitudinal-modified-dates", '
                                 '"retain-safe-private", "clean-descriptors", "clean-structured-content"]\n')
    return Deidentifier(config.deid, SECRET)


def empty_as_none(value):
    if value is None or isinstance(value, (int, float)):
        return value
    return None if not len(value if isinstance(value, (bytes, list)) else str(value)) else value


def same_elements(ours: Dataset, theirs: Dataset, where: str = "") -> list[str]:
    problems = []
    if set(ours.keys()) != set(theirs.keys()):
        return [f"{where}: tags differ: {sorted(set(ours.keys()) ^ set(theirs.keys()))}"]
    for tag in ours.keys():
        a, b = ours.get_item(tag), theirs.get_item(tag)
        if a.VR != b.VR and "UN" not in (a.VR, b.VR):
            problems.append(f"{where}{tag}: VR {a.VR} != {b.VR}")
        elif ours[tag].VR == "SQ":
            items_a, items_b = ours[tag].value, theirs[tag].value
            if len(items_a) != len(items_b):
                problems.append(f"{where}{tag}: {len(items_a)} items != {len(items_b)}")
            for n, (x, y) in enumerate(zip(items_a, items_b)):
                problems += same_elements(x, y, f"{where}{tag}[{n}].")
        elif empty_as_none(ours[tag].value) != empty_as_none(theirs[tag].value):
            problems.append(f"{where}{tag}: value differs")
    return problems


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_fast_writer_matches_pydicom(path: Path, deidentifier: Deidentifier):
    try:
        ours_ds = read_instance(path)
        deidentifier.deidentify(ours_ds)
    except InstanceRefused:
        return  # refused input never reaches a writer
    implicit = fast_syntax(ours_ds.file_meta.TransferSyntaxUID)
    if implicit is None:
        return  # big endian and deflated datasets are written by pydicom itself
    ours = b"".join(part10_bytes(ours_ds, implicit))
    theirs_ds = read_instance(path)
    deidentifier.deidentify(theirs_ds)
    out = io.BytesIO()
    if not theirs_ds.file_meta.TransferSyntaxUID.is_transfer_syntax:
        # A syntax newer than pydicom (Deflated Image Frame Compression): its writer
        # refuses it, so check that ours reads back as what was de-identified.
        assert same_elements(dcmread(io.BytesIO(ours)), theirs_ds) == []
        return
    theirs_ds.save_as(out, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    theirs = out.getvalue()
    assert ours[:128] == b"\0" * 128
    if ours[128:] != theirs[128:]:
        assert same_elements(dcmread(io.BytesIO(ours)), dcmread(io.BytesIO(theirs))) == []
        assert b"UN" in theirs  # only explicit VR UN elements may be written differently
