"""The rule table: generated from the standard, complete, and resolved per option."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from router.config import OPTIONS, DeidConfig
from router.rules import COMBINED, Profile, standard_table

ROOT = Path(__file__).resolve().parents[1]
STANDARD = ROOT.parent / "shared" / "standard" / "ps3.15-table-e1-1.json"


def test_generated_table_is_up_to_date():
    assert STANDARD.exists(), "the standard's table must be beside the project in ../shared"
    done = subprocess.run([sys.executable, "rules/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_row_and_option_column_is_kept():
    source = json.loads(STANDARD.read_text())
    rules = standard_table()["rules"]
    assert len(rules) == len(source) == 621
    assert sum(len(r["options"]) for r in rules) == sum(len(row) - 5 for row in source)
    tags = {r["tag"] for r in rules}
    assert {"50xxxxxx", "60xx4000", "60xx3000", "private"} <= tags


def test_combined_codes_resolve_to_kept_forms_by_default():
    profile = Profile(DeidConfig(options=frozenset()))
    rows = {r["tag"]: r for r in standard_table()["rules"]}
    for tag, row in rows.items():
        if tag in ("private",) or "x" in tag:
            continue
        code = profile.action(int(tag, 16)).code
        if row["basic"] in COMBINED["conservative"] and tag not in ("00100010", "00100020"):
            assert code == COMBINED["conservative"][row["basic"]], tag
    remove = Profile(DeidConfig(options=frozenset(), combined_codes="remove"))
    assert remove.action(0x00080080).code == "X"  # Institution Name, X/Z/D
    assert remove.action(0x00080023).code == "Z"  # Content Date, Z/D


@pytest.mark.parametrize("option", sorted(set(OPTIONS) - {"clean-pixel-data", "clean-recognizable-visual-features"}))
def test_each_option_changes_exactly_its_column(option):
    base = Profile(DeidConfig(options=frozenset()))
    with_option = Profile(DeidConfig(options=frozenset({option})))
    changed = {tag for tag in base.exact if base.action(tag) != with_option.action(tag)}
    expected = set()
    for row in standard_table()["rules"]:
        if option in row["options"] and row["tag"] not in ("private",) and "x" not in row["tag"]:
            if row["tag"] not in ("00100010", "00100020"):  # product pseudonyms override
                expected.add(int(row["tag"], 16))
    assert changed == expected
    if option == "retain-safe-private":
        assert with_option.keep_safe_private and not base.keep_safe_private


def test_more_protective_option_wins():
    # Date of Last Detector Calibration: K under device identity, C under modified dates.
    both = Profile(DeidConfig(options=frozenset({"retain-device-identity", "retain-longitudinal-modified-dates"})))
    assert both.action(0x0018700C).code == "C"


def test_safe_private_list_from_the_standard_loads():
    profile = Profile(DeidConfig(options=frozenset({"retain-safe-private"})))
    assert sum(map(len, profile.safe_private.values())) > 400
    assert profile.is_safe_private("SIEMENS MR HEADER", 0x0019, 0x0C)
    assert not profile.is_safe_private("SIEMENS MR HEADER", 0x0019, 0x01)


def test_person_names_are_generated_from_the_census_files(tmp_path):
    """rules/generate_names.py on a small stand-in of the `names` source package: given names
    of 3+ letters, surnames by rank, DICOM dictionary words left out; the shipped file has
    the same form."""
    import io
    import tarfile

    sys.path.insert(0, str(ROOT / "rules"))
    try:
        import generate_names
    finally:
        sys.path.pop(0)
    files = {"female": "MARY 2.6 2.6 1\nAL 0.1 2.7 3\nMAX 0.1 2.8 2\n", "male": "JOHN 3.2 3.2 1\n",
             "last": "JOHNSON 0.8 1.8 2\nSMITH 1.0 1.0 1\nHEAD 0.1 1.9 3\n"}
    source = tmp_path / "names-0.3.0.tar.gz"
    with tarfile.open(source, "w:gz") as archive:
        for key, member in generate_names.MEMBERS.items():
            data = files[key].encode("ascii")
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    table = generate_names.generate(source)
    assert table["given"] == ["JOHN", "MARY"]  # "AL" too short, "MAX" a dictionary word
    assert table["surnames"] == ["JOHNSON", "SMITH"]  # "HEAD" a dictionary word
    shipped = json.loads((ROOT / "rules" / "person-names.json").read_text())
    assert shipped["generated_by"] == "rules/generate_names.py"
    assert len(shipped["given"]) > 5000 and len(shipped["surnames"]) > 29000
    assert shipped["given"] == sorted(shipped["given"]) and min(map(len, shipped["given"])) >= 3
    assert not {"MAX", "HEAD", "ANGLE"} & (set(shipped["given"]) | set(shipped["surnames"]))
