"""Person names in free text that the header does not hold ("seen by Jane Roe").

The header's own names are cut from kept text by value (``Deidentifier._scrub_pattern``)
and titled names by a pattern (rules/policy.toml); this finds the others by their shape,
with the census name lists of rules/person-names.json (see rules/generate_names.py):

- a given name, an optional middle initial and a surname: "Jane Roe", "Mary Q. Johnson";
- a surname, a comma and a given name or an initial: "Smith, Anna", "Smith, Anna M.",
  "Smith, J." (a surname of the list there);
- the particles before a surname go with it: "van der Berg, Anna", "Anna van der Berg";
  and a given name joined by "and": "John and Mary Smith";
- a surname of the list and a given name: "SMITH JOHN", "Smith John" (not after a word
  that begins place names: "SAN JOSE", "WEST VIRGINIA");
- a given name and an initial: "Karen W.";
- an initial (or two) with a full stop and a surname of the list: "J. Smith", "J. A. Smith"
  (not R. or L., sides: "R. Hand");
- a given name alone after a word that announces a person: "seen by Karen", "tech: Karen";
- a DICOM person name written into text, both parts on the lists: "SMITH^ANNA".

A surname is a word of the surname list or, in text that is not all capitals, any
capitalised word ("Okonkwo"): in all-capital text ("CT HEAD JANE ROE") only the lists
tell a name from a word. A lone given name is not cut (too many are words), nor an
eponym ("Barrett Esophagus", "Arnold Chiari malformation": the next word says so), nor
the words rules/policy.toml ``[names]`` (and a site's ``deid.not_names``) lists as not
names ("MAY", "IRIS", "MAX").
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

_WORD = re.compile(r"[^\W\d_](?:[^\W\d_]|['\u2019-])*\.?")  # letters of any script: "FRANÇAIS" is one word
_SPACE = re.compile(r"[ \t]+")
_COMMA = re.compile(r"[ \t]*,[ \t]*")
_CUE_GAP = re.compile(r"[ \t]*[:=-]?[ \t]*")
_TITLE_CASE = re.compile(r"(?:Mc|Mac|O'|De|Van|Le)?[A-Z][a-z'\u2019]+(?:-[A-Z][a-z'\u2019]+)?")
#: Words that begin surnames: "van der Berg", "De La Cruz", "von Braun".
_PARTICLES = frozenset({"VAN", "VON", "DER", "DEN", "DE", "DEL", "DELLA", "DA", "DI", "DOS", "DU", "LA", "LE",
                        "TEN", "TER"})
#: Initials that are sides in radiology text ("R. Hand", "L. Hill-Sachs"), not a name's.
_SIDES = frozenset({"R", "L"})
_CARET_NAME = re.compile(r"(?<![\w^])[A-Za-z'\u2019-]{2,}(?:\^[A-Za-z'\u2019.-]*)+")


def _key(word: str) -> str:
    """A word as the lists spell it: capitals, no apostrophe, no possessive or full stop."""
    word = word.rstrip(".")
    if word[-2:].lower() in ("'s", "\u2019s"):
        word = word[:-2]
    word = word.replace("'", "").replace("\u2019", "").upper()
    return word if word.isascii() else unaccented(word)  # "GARCÍA": the lists spell names without accents


def unaccented(text: str) -> str:
    """text without its accents and other combining marks: "Müller" -> "Muller"."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


@dataclass(frozen=True, eq=False)
class PersonNames:
    given: frozenset[str]
    surnames: frozenset[str]
    #: Words after a name that make it an eponym (a disease, a sign, a fracture).
    eponym_nouns: frozenset[str]
    #: Words after which a given name alone is a person ("seen by Karen").
    cues: frozenset[str]
    #: Words that begin place names ("SAN JOSE", "WEST VIRGINIA"): no surname before a given name.
    place_words: frozenset[str]

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of each person's name found in text."""
        found = [m.span() for m in _CARET_NAME.finditer(text) if self._is_caret_name(m.group())]
        words = list(_WORD.finditer(text))
        capitals = not any(c.islower() for c in text)
        i = 0
        while i < len(words):
            end = self._name_from(text, words, i, capitals)
            if end is None:
                i += 1
                continue
            found.append((words[self._start_of(text, words, i, capitals)].start(), words[end].end()))
            i = end + 1
        return sorted(found)

    def _start_of(self, text: str, words: list[re.Match[str]], i: int, capitals: bool) -> int:
        """The first word of a name found from word i: with the particles before a surname
        ("van der Berg, Anna") and a given name joined by "and" ("John and Mary Smith")."""
        first = i
        while first > 0 and _key(words[first - 1].group()) in _PARTICLES and _spaced(text, words, first - 1):
            first -= 1
        if first > 1 and _key(words[first - 1].group()) == "AND" and _spaced(text, words, first - 2) \
                and _spaced(text, words, first - 1) and self._is_given(words[first - 2].group(), capitals) \
                and self._is_given(words[first].group(), capitals):
            first -= 2
        return first

    def search(self, text: str) -> bool:
        return bool(self.spans(text))

    def cut(self, text: str) -> str:
        for start, end in reversed(_merged(self.spans(text))):
            text = text[:start] + text[end:]
        return text

    # -- shapes --------------------------------------------------------------------------

    def _name_from(self, text: str, words: list[re.Match[str]], i: int, capitals: bool) -> int | None:
        """The index of the last word of a name starting at word i, or None."""
        word = words[i].group()
        if self._is_given(word, capitals) and _spaced(text, words, i):
            j = i + 1
            if _is_initial(words[j].group()) and _spaced(text, words, j) \
                    and self._is_surname(words[j + 1].group(), capitals):
                j += 1
            while _key(words[j].group()) in _PARTICLES and _spaced(text, words, j):
                j += 1  # "Anna van der Berg"
            if self._is_surname(words[j].group(), capitals) and not self._eponym_after(text, words, j, False):
                return j
            if j == i + 1 and _is_initial(words[j].group()) and words[j].group().endswith("."):
                return j  # "Karen W."
        if (_key(word) in self.surnames and _key(word) not in self.place_words and self._is_surname(word, capitals)
                and _spaced(text, words, i)
                and self._is_given(words[i + 1].group(), capitals) and not self._eponym_after(text, words, i + 1)):
            j = i + 1  # "SMITH JOHN", "Smith John": a surname of the list first
            if _spaced(text, words, j) and (self._is_given(words[j + 1].group(), capitals)
                                            or _is_initial(words[j + 1].group())):
                j += 1  # "JONES MARY ANN", "SMITH JOHN A"
            return j
        if _is_initial(word) and word.endswith(".") and _key(word) not in _SIDES and _spaced(text, words, i):
            j = i + 1
            if _is_initial(words[j].group()) and words[j].group().endswith(".") and _spaced(text, words, j):
                j += 1  # "J. A. Smith"
            after = words[j].group()
            if _key(after) in self.surnames and self._is_surname(after, capitals) \
                    and not self._eponym_after(text, words, j, False):
                return j  # "J. Smith": a surname of the list
        if (self._is_given(word, capitals) and i > 0 and _key(words[i - 1].group()) in self.cues
                and _CUE_GAP.fullmatch(text, words[i - 1].end(), words[i].start()) is not None):
            return i  # "seen by Karen", "tech: Karen"
        if (self._is_surname(word, capitals) and i + 1 < len(words)
                and _COMMA.fullmatch(text, words[i].end(), words[i + 1].start()) is not None):
            after = words[i + 1].group()
            if self._is_given(after, capitals):
                if _spaced(text, words, i + 1) and _is_initial(words[i + 2].group()):
                    return i + 2  # "Smith, Anna M."
                return i + 1  # "Smith, Anna"
            if _is_initial(after) and after.endswith(".") and _key(word) in self.surnames:
                return i + 1  # "Smith, J."
        return None

    def _is_caret_name(self, value: str) -> bool:
        """FAMILY^GIVEN on the lists ("Abdomen^Liver", a study description, is not)."""
        family, given = (value.split("^") + [""])[:2]
        return _key(family) in self.surnames and _key(given or "-") in self.given

    def _is_given(self, word: str, capitals: bool) -> bool:
        key = _key(word)
        return (capitals or word[0].isupper()) and (key in self.given or (
            "-" in key and all(part in self.given for part in key.split("-"))))  # "Mary-Jane"

    def _is_surname(self, word: str, capitals: bool) -> bool:
        key = _key(word)
        if len(key) < 2 or key in self.eponym_nouns:
            return False
        if key in self.surnames:
            return capitals or word[0].isupper()
        return not capitals and _TITLE_CASE.fullmatch(word.rstrip(".")) is not None

    def _eponym_after(self, text: str, words: list[re.Match[str]], j: int, possessive: bool = True) -> bool:
        """Is word j an eponym's name: a noun of the list after it ("Barrett Esophagus") or,
        unless a given name or an initial comes first ("John Smith's scan" is a person's),
        a possessive ("Barrett's")?"""
        return (_spaced(text, words, j) and _key(words[j + 1].group()) in self.eponym_nouns) \
            or (possessive and words[j].group().lower().endswith(("'s", "\u2019s")))


def _spaced(text: str, words: list[re.Match[str]], a: int) -> bool:
    """Is word a followed by another, with only blanks between?"""
    return a + 1 < len(words) and _SPACE.fullmatch(text, words[a].end(), words[a + 1].start()) is not None


def _is_initial(word: str) -> bool:
    return len(word.rstrip(".")) == 1 and word[0].isupper()


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        else:
            out.append((start, end))
    return out


def load(not_names: Iterable[str], eponym_nouns: Iterable[str], cues: Iterable[str],
         place_words: Iterable[str]) -> PersonNames:
    """The census lists of rules/person-names.json less the words a site says are not names."""
    table = json.loads(resources.files("router.rule_tables").joinpath("person-names.json").read_text(encoding="utf-8"))
    excluded = {_key(w) for w in not_names}
    return PersonNames(frozenset(table["given"]) - excluded, frozenset(table["surnames"]) - excluded,
                       frozenset(_key(w) for w in eponym_nouns), frozenset(_key(w) for w in cues),
                       frozenset(_key(w) for w in place_words))
