"""Generate person-names.json, the given names and surnames the engine uses to find a
person's name in free text when the header does not hold it ("seen by Jane Roe").

The source is the US Census Bureau's 1990 frequent-name files (public domain), as the
PyPI source package ``names`` 0.3.0 (MIT) ships them. Fetch it from the package registry
and run from the repository root:

    pip download names==0.3.0 --no-deps --no-binary :all: -d /tmp/names
    python rules/generate_names.py /tmp/names/names-0.3.0.tar.gz

Kept: every given name of three letters or more (the female and male lists)
and the SURNAMES most frequent surnames (of 88,799; the people they name are 82% of those
counted, the whole list 90%). Words that also name DICOM attributes' parts ("MAX", "ANGLE", "HEAD", "BONE")
are left out here; words of ordinary and clinical text that are also names ("MAY",
"IRIS", "FRANK") are left out at load time by rules/policy.toml ``[names] not_names``
and a site's ``deid.not_names``. Nobody edits the output by hand: change this script instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import tarfile
from pathlib import Path

from pydicom.datadict import DicomDictionary

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "person-names.json"
SURNAMES = 30000
MEMBERS = {"female": "names-0.3.0/names/dist.female.first", "male": "names-0.3.0/names/dist.male.first",
           "last": "names-0.3.0/names/dist.all.last"}


def names_in(text: str) -> list[str]:
    """The names of a census file (name, frequency %, cumulative %, rank), by rank."""
    rows = [line.split() for line in text.splitlines() if line.strip()]
    return [row[0] for row in sorted(rows, key=lambda row: int(row[3]))]


def dictionary_words() -> set[str]:
    """Words (3+ letters) of the DICOM data dictionary's attribute names."""
    words: set[str] = set()
    for _vr, _vm, name, _retired, _keyword in DicomDictionary.values():
        words.update(word.upper() for word in re.findall(r"[A-Za-z]{3,}", name))
    return words


def generate(source: Path) -> dict:
    data = source.read_bytes()
    with tarfile.open(source) as archive:
        files = {key: archive.extractfile(member).read().decode("ascii") for key, member in MEMBERS.items()}
    words = dictionary_words()
    given = {name for key in ("female", "male") for name in names_in(files[key]) if len(name) >= 3} - words
    surnames = [name for name in names_in(files["last"])[:SURNAMES] if len(name) >= 2 and name not in words]
    return {
        "source": f"US Census Bureau 1990 frequent names (public domain), from {source.name} "
                  f"(sha256 {hashlib.sha256(data).hexdigest()})",
        "generated_by": "rules/generate_names.py",
        "given": sorted(given),
        "surnames": sorted(surnames),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="names-0.3.0.tar.gz")
    args = parser.parse_args()
    table = generate(args.source)
    OUTPUT.write_text(json.dumps(table, indent=0) + "\n", encoding="utf-8")
    print(f"{OUTPUT}: {len(table['given'])} given names, {len(table['surnames'])} surnames")


if __name__ == "__main__":
    main()
