"""router.decode reads a Part 10 file as pydicom's dcmread does, or leaves it to pydicom.

Every file it reads must give the very dataset dcmread(force=True) gives (raw values and
their positions, sequences, file meta, encodings), and a file dcmread refuses must not be
read here: the corpus, and damaged data sets of every kind in tests/mutations.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mutations
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from test_faults import base_instances

from router.decode import read_part10

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def assert_same(ours: Dataset, theirs: Dataset) -> None:
    assert list(ours._dict) == list(theirs._dict)
    assert (ours.original_encoding, ours._character_set) == (theirs.original_encoding, theirs._character_set)
    for tag, x in ours._dict.items():
        y = theirs._dict[tag]
        assert type(x) is type(y)
        if isinstance(x, RawDataElement):
            assert tuple(x) == tuple(y)
        elif x.VR == "SQ":
            assert (x.file_tell, x.is_undefined_length, len(x.value)) == (y.file_tell, y.is_undefined_length, len(y.value))
            for item, other in zip(x.value, y.value):
                assert_same(item, other)
        else:
            assert x.value == y.value


def compare(path: Path) -> str:
    """'fallback' (left to pydicom), 'same' (read here as dcmread reads it) or 'refused'
    (both raise); fails on any difference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            theirs, refused = dcmread(path, force=True), None
        except Exception as exc:  # noqa: BLE001 - whatever pydicom raises, we must raise too
            theirs, refused = None, exc
        try:
            ours = read_part10(path)
        except Exception as exc:  # noqa: BLE001
            assert refused is not None and type(exc) is type(refused), path.name
            return "refused"
    if ours is None:
        return "fallback"
    assert refused is None, f"{path.name}: read here, refused by pydicom ({refused!r})"
    assert_same(ours, theirs)
    assert_same(ours.file_meta, theirs.file_meta)
    assert (ours.preamble, ours.is_implicit_VR, ours.is_little_endian) == \
        (theirs.preamble, theirs.is_implicit_VR, theirs.is_little_endian)
    return "same"


def test_corpus_is_read_as_dcmread_reads_it() -> None:
    outcomes = [compare(path) for path in sorted(CORPUS.rglob("*.dcm"))]
    # explicit and implicit VR little endian, compressed, with undefined-length sequences
    assert outcomes.count("same") >= 40


def test_damaged_data_sets_are_read_as_dcmread_reads_them_or_left_to_it(tmp_path: Path) -> None:
    path = tmp_path / "mutant.dcm"
    outcomes: dict[str, set[str]] = {}
    for mutant in mutations.mutants(base_instances(), 600, seed=11):
        path.write_bytes(mutations.part10(mutant.sop_class, mutant.sop_instance, mutant.transfer_syntax, mutant.data))
        outcomes.setdefault(mutant.kind, set()).add(compare(path))
    assert "same" in outcomes["reordered"] and "fallback" in outcomes["truncated"]
