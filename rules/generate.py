"""Generate ps3.15-e1-1.json, the rule table the engine loads, from PS3.15 Table E.1-1.

Run from the repository root (the standard's table sits in ../shared/standard):

    python rules/generate.py [--source PATH] [--check]

The output keeps every row and every option column of the standard as published; the
engine resolves combined codes (X/Z, X/D, ...) and option precedence at load time, so
this file stays a faithful copy of the standard with VR and keyword added for
convenience. Nobody edits the output by hand: change this script or the source instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pydicom.datadict import dictionary_is_retired, dictionary_VR, keyword_for_tag

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent / "shared" / "standard" / "ps3.15-table-e1-1.json"
OUTPUT = HERE / "ps3.15-e1-1.json"

#: The standard table's option columns, by the option names the config uses.
OPTION_COLUMNS = {
    "rtnSafePrivOpt": "retain-safe-private",
    "rtnUIDsOpt": "retain-uids",
    "rtnDevIdOpt": "retain-device-identity",
    "rtnInstIdOpt": "retain-institution-identity",
    "rtnPatCharsOpt": "retain-patient-characteristics",
    "rtnLongFullDatesOpt": "retain-longitudinal-full-dates",
    "rtnLongModifDatesOpt": "retain-longitudinal-modified-dates",
    "cleanDescOpt": "clean-descriptors",
    "cleanStructContOpt": "clean-structured-content",
    "cleanGraphOpt": "clean-graphics",
}
ACTION_CODES = {"X", "Z", "D", "U", "K", "C", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}


def convert(row: dict) -> dict:
    """One standard row -> one rule: tag (or pattern), keyword, VR, actions."""
    text = row["tag"].strip()
    rule: dict = {"name": row["name"]}
    if text.startswith("(GGGG,EEEE)"):
        rule["tag"] = "private"
    else:
        m = re.fullmatch(r"\(([0-9A-Fx]{4}),([0-9A-Fx]{4})\)", text, re.IGNORECASE)
        if not m:
            raise ValueError(f"unexpected tag {text!r}")
        pattern = (m.group(1) + m.group(2)).upper().replace("X", "x")
        rule["tag"] = pattern
        if "x" not in pattern:
            tag = int(pattern, 16)
            rule["keyword"] = keyword_for_tag(tag)
            rule["vr"] = dictionary_VR(tag)
            rule["retired"] = bool(dictionary_is_retired(tag))
    rule["in_standard_iod"] = row["stdCompIOD"] == "Y"
    if row["basicProfile"] not in ACTION_CODES:
        raise ValueError(f"unexpected action {row['basicProfile']!r} for {text}")
    rule["basic"] = row["basicProfile"]
    options = {name: row[column] for column, name in OPTION_COLUMNS.items() if column in row}
    for code in options.values():
        if code not in ACTION_CODES:
            raise ValueError(f"unexpected option action {code!r} for {text}")
    rule["options"] = options
    return rule


def generate(source: Path) -> str:
    rows = json.loads(source.read_text(encoding="utf-8"))
    unknown = {key for row in rows for key in row} - set(OPTION_COLUMNS) - {"name", "tag", "id", "stdCompIOD", "basicProfile"}
    if unknown:
        raise ValueError(f"columns this generator does not know: {sorted(unknown)}")
    rules = sorted((convert(row) for row in rows), key=lambda r: r["tag"])
    document = {
        "source": "DICOM PS3.15 2024b Table E.1-1, Application Level Confidentiality Profile Attributes",
        "generated_by": "rules/generate.py",
        "rules": rules,
    }
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed output is stale")
    args = parser.parse_args(argv)
    text = generate(args.source)
    if args.check:
        stale = not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text
        print(f"{OUTPUT.name}: {'stale, run rules/generate.py' if stale else 'up to date'}")
        return int(stale)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT} ({text.count(chr(10) + '  {')} rules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
