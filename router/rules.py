"""The rule table: which action applies to which tag, for a given config.

Reads the generated standard table (rules/ps3.15-e1-1.json), the product policy
(rules/policy.toml), the safe private list (rules/safe-private.toml) and the site's
overrides from the config, and resolves them to one action per tag:

X remove, Z empty, D dummy, U new UID, K keep, C clean, and three the standard does not
name: P keyed pseudonym, R replace with the site's value, V keep verbatim (a site's
explicit "keep": not even free-text scrubbing applies).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from router.config import DeidConfig, SafePrivate, parse_tag
from router.names import PersonNames
from router.names import load as load_person_names

#: Combined codes resolved without the IOD's attribute type. "conservative" keeps the
#: attribute in its dummy or empty form, which is valid whether the IOD makes it Type 1,
#: 2 or 3; "remove" deletes it whenever the standard allows that for some type.
COMBINED = {
    "conservative": {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"},
    "remove": {"X/Z": "X", "X/D": "X", "Z/D": "Z", "X/Z/D": "X", "X/Z/U*": "X"},
}
SITE_ACTIONS = {"keep": "V", "remove": "X", "empty": "Z", "dummy": "D", "replace": "R", "pseudonym": "P", "uid": "U"}


@dataclass(frozen=True)
class Action:
    code: str
    value: str | None = None  # for R


@cache
def standard_table() -> dict:
    return json.loads(resources.files("router.rule_tables").joinpath("ps3.15-e1-1.json").read_text(encoding="utf-8"))


@cache
def policy() -> dict:
    return tomllib.loads(resources.files("router.rule_tables").joinpath("policy.toml").read_text(encoding="utf-8"))


@cache
def _safe_private_table() -> tuple[dict, ...]:
    """The rows of rules/safe-private.toml (PS3.15 Table E.3.10-1)."""
    path = resources.files("router.rule_tables").joinpath("safe-private.toml")
    if not path.is_file():
        return ()
    return tuple(tomllib.loads(path.read_text(encoding="utf-8")).get("safe", []))


@cache
def standard_safe_private() -> tuple[SafePrivate, ...]:
    return tuple(SafePrivate(row["creator"].strip(), row["group"], row["element"]) for row in _safe_private_table())


@cache
def standard_safe_private_rows() -> dict[tuple[str, int, int], tuple[str, str]]:
    """(VR, name) of each (creator, group, element) on the standard's safe list."""
    return {(row["creator"].strip(), row["group"], row["element"]): (row.get("vr", ""), row.get("name", ""))
            for row in _safe_private_table()}


@cache
def person_names(not_names: tuple[str, ...], eponym_nouns: tuple[str, ...], cues: tuple[str, ...],
                 place_words: tuple[str, ...]) -> PersonNames:
    """The census name lists (rules/person-names.json), read once per process."""
    return load_person_names(not_names, eponym_nouns, cues, place_words)


def resolve(code: str, options: frozenset[str], row_options: dict[str, str], combined: str) -> str:
    """The standard's action for one row under the selected options.

    Where several selected options name an action for the row, the more protective one
    wins (C, clean, over K, keep).
    """
    chosen = [row_options[o] for o in sorted(options) if o in row_options]
    if chosen:
        code = "C" if "C" in chosen else "K"
    return COMBINED[combined].get(code, code)


class Profile:
    """Actions by tag for one config; built once per process, then read-only."""

    def __init__(self, config: DeidConfig):
        self.options = config.options
        self.exact: dict[int, Action] = {}
        self.private_code = "X"
        self.cleans_overlays = False
        for row in standard_table()["rules"]:
            code = resolve(row["basic"], config.options, row["options"], config.combined_codes)
            tag = row["tag"]
            if tag == "private":
                self.private_code = code
            elif tag == "60xx3000":
                #: Overlays are kept once the pixel stage has cleaned their bitmaps (C,
                #: Clean Graphics), removed otherwise: see policy.toml [repeating_groups].
                self.cleans_overlays = code == "C"
            elif "x" not in tag:  # (50xx,xxxx) and (60xx,...): see policy.toml [repeating_groups]
                self.exact[int(tag, 16)] = Action(code)
        pol = policy()
        for name, action in pol.get("overrides", {}).items():
            self.exact[parse_tag(name)] = Action(SITE_ACTIONS[action])
        for tag, override in config.overrides.items():
            self.exact[tag] = Action(SITE_ACTIONS[override.action], override.value)
        #: High bytes of the repeating groups removed whole (0x50 curves, 0x60 overlays).
        self.removed_group_bases = frozenset(int(p[:2], 16) for p in pol["repeating_groups"]["remove"])
        self.dummy: dict[str, str] = pol["dummy"]
        self.unlisted: dict[str, str] = {vr: SITE_ACTIONS[a] for vr, a in pol.get("unlisted", {}).items()}
        self.scrub_min_length: int = pol["scrub"]["min_length"]
        self.scrub_whole_word_max: int = pol["scrub"]["whole_word_max_length"]
        self.scrub_placeholders: frozenset[str] = frozenset(v.upper() for v in pol["scrub"].get("placeholders", []))
        #: Unlisted attributes that record the equipment: cleaned like what the profile keeps.
        self.equipment_text: frozenset[int] = frozenset(parse_tag(t) for t in pol["scrub"].get("equipment_text", []))
        patterns = pol["scrub"].get("patterns", [])
        #: Identifiers removed from kept text whatever the header holds (e-mail, phone ...).
        self.scrub_patterns: re.Pattern[str] | None = re.compile("|".join(patterns)) if patterns else None
        names = pol.get("names", {})
        #: Person names the header does not hold, cut where the patterns are (router/names.py).
        self.person_names: PersonNames | None = person_names(
            tuple(names.get("not_names", ())) + config.not_names, tuple(names.get("eponym_nouns", ())),
            tuple(names.get("cues", ())), tuple(names.get("place_words", ()))) \
            if names.get("enabled") and config.find_names else None
        self.keep_safe_private = self.private_code == "C"
        #: creator -> the (group, element) pairs kept; None in either place matches any.
        self.safe_private: dict[str, set[tuple[int | None, int | None]]] = {}
        for entry in standard_safe_private() + config.safe_private:
            self.safe_private.setdefault(entry.creator, set()).add((entry.group, entry.element))

    def action(self, tag: int) -> Action | None:
        """The action for a public tag, or None where nothing is listed (keep)."""
        return self.exact.get(tag)

    def removes_group(self, group: int) -> bool:
        """Is this one of the even repeating groups (50xx, 60xx) removed whole?"""
        return not group & 1 and group & 0xFF <= 0x1E and group >> 8 in self.removed_group_bases

    def is_safe_private(self, creator: str, group: int, element: int) -> bool:
        """Is (group, xx element) of this private creator on the safe list?"""
        kept = self.safe_private.get(creator) if self.keep_safe_private else None
        if not kept:
            return False
        return bool({(group, element), (None, element), (group, None), (None, None)} & kept)

    def safe_private_vr(self, creator: str, group: int, element: int) -> str:
        """The VR the standard's safe list gives this private attribute ("" if none): what an
        implicit VR file, or UN, does not say."""
        return standard_safe_private_rows().get((creator, group, element), ("", ""))[0]

    def remaps_private_uid(self, creator: str, group: int, element: int) -> bool:
        """Is a kept private UID remapped? Yes, unless the standard's safe list names it a
        version (a format's version, read by the vendor's software), not an object."""
        return "Version" not in standard_safe_private_rows().get((creator, group, element), ("", ""))[1]
