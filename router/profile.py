"""The de-identification engine: applies the PS3.15 confidentiality profile to one instance.

This is the one place where an instance's header is de-identified; the file mode and the
node's de-identify stage both call ``Deidentifier``. It works on pydicom's raw elements
and converts only the elements it must read or change, so values it keeps are written
back byte for byte (whatever their character set) and the pixel data is never decoded.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import functools
import io
import itertools
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.charset import decode_bytes
from pydicom.datadict import DicomDictionary, dictionary_VM, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.multival import MultiValue
from pydicom.valuerep import VR
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from router import __version__
from router.config import BASIC_PROFILE_CODE, OPTIONS, DeidConfig
from router.decode import ITEM_TAG, PIXEL_DATA, TAGS, read_part10, tag_object
from router.encode import ConstantElement, fast_syntax, materialized, part10_bytes, write_chunks
from router.names import PersonNames, unaccented
from router.pseudonyms import Pseudonymizer
from router.rules import Action, Profile
from router.spool import reusable

if TYPE_CHECKING:
    from router.pixels import PixelCleaner

#: Our implementation class UID (a fixed 2.25 UID) and version name, for the file meta.
IMPLEMENTATION_CLASS_UID = UID("2.25.158783364585436617185016425961838233617")
IMPLEMENTATION_VERSION = f"DEID_ROUTER_{__version__.replace('.', '')}"[:16]

TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})
#: The longest value an explicit VR element with a 2-byte length can hold (LO, SH, ST ...).
_SHORT_LENGTH_MAX = 0xFFFE
DATE_VRS = frozenset({"DA", "DT"})
NUMERIC_VRS = frozenset({"FL", "FD", "SL", "SS", "UL", "US", "SV", "UV", "AT"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: Pixel Data, Float and Double Float Pixel Data: the pixel stage looks at what they show.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
#: What a D sequence's items have replaced by dummies: every VR that can name or date someone.
_DUMMIED_IN_ITEMS = TEXT_VRS | DATE_VRS | BINARY_VRS | {"TM", "AE", "AS", "UR"}
#: Top-level sequences up to this size are de-identified once per process and patient
#: (``Deidentifier._sequence_key``); this many are remembered.
SEQUENCE_CACHE_BYTES = 16 * 1024
SEQUENCE_CACHE_ENTRIES = 256
#: Top-level element values up to this size are de-identified once per patient (see
#: ``_element_once``); at most this many per patient, for this many patients (~20 MB at
#: worst, measured; a few hundred kB for a CT series).
ELEMENT_CACHE_BYTES = 256
ELEMENT_CACHE_ENTRIES = 2048
ELEMENT_CACHE_PATIENTS = 8
#: Identifying values (and the pattern cutting them from text) are worked out once per set
#: of identifying elements: this many sets, with values up to SEQUENCE_CACHE_BYTES.
IDENTITY_CACHE_ENTRIES = 64
#: Identifiers an audit crosswalk maps from original to pseudonym.
CROSSWALK_TAGS = {"patient_id": 0x00100020, "accession": 0x00080050, "study_uid": 0x0020000D,
                  "series_uid": 0x0020000E, "sop_instance_uid": 0x00080018}
#: File meta elements that name the systems an instance passed through: not forwarded.
META_KEPT = ("MediaStorageSOPClassUID", "TransferSyntaxUID")

# pydicom: keep reading values that break a VR's rules rather than failing the instance;
# the engine rewrites or removes what it must and validates what it relies on.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE


class InstanceRefused(Exception):
    """An instance that cannot be de-identified safely; ``reason`` is PHI-free."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class InstanceResult:
    """What a stage may log or route on: pseudonymous identifiers only."""

    sop_class_uid: str
    sop_instance_uid: str  # the new (pseudonymous) SOP Instance UID
    study_instance_uid: str  # new
    series_instance_uid: str  # new
    patient_pseudonym: str
    modality: str
    transfer_syntax_uid: str
    #: The AE title that sent it (file meta SourceApplicationEntityTitle of the input), for routing.
    source_ae_title: str
    #: Burned-in text regions the pixel stage masked (their text is never in a result).
    pixel_regions_masked: int
    bytes_in: int
    bytes_out: int
    #: Only with ``Deidentifier.keep_originals`` (the audit crosswalk): original -> new
    #: identifiers by kind. PHI: never log it.
    crosswalk: tuple[dict[str, str], dict[str, str]] | None = None
    #: Only with ``Deidentifier.keep_pixel_text``: the text read off each masked region,
    #: (frame, x0, y0, x1, y1, text). PHI: never log it.
    pixel_text: tuple[tuple[int, int, int, int, int, str], ...] = ()


@functools.lru_cache(maxsize=8192)
def _needs_cleaning(text: str, scrub: re.Pattern[str] | None, patterns: re.Pattern[str] | None,
                    names: PersonNames | None, dates: bool, uids: bool) -> bool:
    """Cached: a series repeats most kept text values (and a patient's scrub pattern is one
    object, from re's cache) instance after instance."""
    return (scrub is not None and scrub.search(text) is not None) or (
        patterns is not None and patterns.search(text) is not None) or (
        names is not None and names.search(text)) or (
        dates and _TEXT_DATE.search(text) is not None) or (uids and _TEXT_UID.search(text) is not None)


@dataclass
class _Patient:
    """Per-instance state: who the patient is, as far as the pseudonyms need to know."""

    key: str
    shift_days: int | None  # None: dates are not shifted
    scrub: re.Pattern[str] | None  # identifying values to cut out of kept text
    patterns: re.Pattern[str] | None  # kinds of identifiers cut whatever the header holds
    names: PersonNames | None  # person names the header does not hold, cut with the patterns
    text_dates: str  # dates written in kept text: "keep", "shift" or "remove"
    new_uid: Callable[[str], str] | None  # UIDs written in kept text are remapped (None: kept)

    @functools.cached_property
    def signature(self) -> tuple:
        """Everything about the patient that decides how a value is de-identified."""
        return (self.key, self.shift_days, self.scrub.pattern if self.scrub is not None else None,
                self.patterns.pattern if self.patterns is not None else None, self.names is not None, self.text_dates,
                self.new_uid is not None)

    @functools.cached_property
    def for_recorded_text(self) -> _Patient:
        """This patient for text that identifies a device or records its software (serial
        numbers, station names, versions): its numbers and dates are not the patient's, so
        only the instance's identifying values are cut from it, not the kinds of identifier."""
        return dataclasses.replace(self, text_dates="keep", patterns=None, names=None)

    def needs_cleaning(self, text: str) -> bool:
        return _needs_cleaning(text, self.scrub, self.patterns, self.names, self.text_dates != "keep",
                               self.new_uid is not None)

    def clean_text(self, text: str) -> str:
        """Cut identifying values out of text; shift or remove its dates, remap its UIDs."""
        if self.new_uid is not None:  # first: a UID's digits must not be read as a date or ID
            text = _TEXT_UID.sub(lambda m: self.new_uid(m.group(0)), text)
        if self.patterns is not None:  # "Dr. <name>" before the name goes
            text = self.patterns.sub("", text)
        if self.names is not None:  # "Mary Johnson" whole, before the header's "JOHN" is cut from it
            text = self.names.cut(text)
        if self.scrub is not None:
            text = self.scrub.sub("", text)
        if self.text_dates != "keep":
            text = _TEXT_DATE.sub(lambda m: _replace_text_date(m, self.shift_days), text)
        return re.sub(r"[ \t]{2,}", " ", text).strip(" \t")  # the gaps cuts leave; not the line breaks


class Deidentifier:
    """De-identifies instances with one site secret; build once per process and reuse."""

    def __init__(self, config: DeidConfig, secret: bytes):
        self.config = config
        self.profile = Profile(config)
        self.keys = Pseudonymizer(secret, config.pseudonym_prefix, config.date_shift_min_days, config.date_shift_max_days)
        self.shift_dates = "retain-longitudinal-modified-dates" in config.options
        self.clean_pixels = "clean-pixel-data" in config.options
        self._pixels: tuple[int, PixelCleaner] | None = None  # (pid, cleaner): one per process
        self._marks: dict[bool, tuple[ConstantElement, ...]] = {}
        #: Top-level sequences de-identified already, see ``_sequence_key``.
        self._sequences: dict[tuple, ConstantElement] = {}
        #: What became of top-level elements, by what they depend on, see ``_element_once``.
        self._elements: dict[tuple, dict[tuple, ConstantElement | bool]] = {}
        #: Identifying values and their pattern, by the elements they come from, see ``_identity``.
        self._identities: dict[tuple, tuple[frozenset[str], re.Pattern[str] | None]] = {}
        self._instance: Dataset | None = None  # the dataset being de-identified
        self._overlays_kept: frozenset[int] = frozenset()  # its overlay groups the pixel stage cleaned
        #: Return the original identifiers with each result (for an audit crosswalk).
        self.keep_originals = False
        #: Read the text of masked regions and return it with each result (for the audit store).
        self.keep_pixel_text = False

    def start(self) -> None:
        """Load what de-identification needs in this process (the OCR models, self-tested).

        Call it once per worker at start-up, so a broken installation fails there with a
        clear message rather than on the first instance. Raises RuntimeError.
        """
        if self.clean_pixels:
            self._pixel_cleaner()

    def _pixel_cleaner(self) -> PixelCleaner:
        if self._pixels is None or self._pixels[0] != os.getpid():
            from router.pixels import PixelCleaner  # the OCR stack loads only when it is used

            from router.pixels import load_policy

            try:
                self._pixels = (os.getpid(), PixelCleaner(load_policy(self.config.pixel_policy),
                                                          read_text=self.config.text_crosswalk is not None
                                                          or self.keep_pixel_text))
            except ValueError as exc:
                raise RuntimeError(str(exc)) from None
        return self._pixels[1]

    # -- files ---------------------------------------------------------------------------

    def process_file(self, src: Path, dst: Path | Callable[[InstanceResult], Path], durable: bool = True,
                     reuse: Callable[[Path, int], bool] | None = None, atomic: bool = True) -> InstanceResult:
        """Read the Part 10 (or raw dataset) file src, de-identify it, write Part 10 dst.

        dst is a path, or a function naming the path from the (pseudonymous) result. It is
        written completely (and, if durable, fsynced) or not at all (unless not ``atomic``:
        a path of the caller's own, see ``write_instance``). ``reuse`` (the spool's)
        may give the file to write over, see ``write_instance``. Raises InstanceRefused for
        anything in the input that cannot be read, de-identified or written back.
        """
        ds = read_instance(src)
        size_in = os.path.getsize(src)
        try:
            result = self.deidentify(ds)
            size = write_instance(ds, Path(dst(result) if callable(dst) else dst), durable,
                                  reuse=reuse, size_hint=size_in, atomic=atomic)
        except InstanceRefused:
            raise
        except (ValueError, TypeError, KeyError, NotImplementedError, OverflowError, EOFError, struct.error, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # a real I/O failure (disk full...) is the node's problem, not the instance's
            raise InstanceRefused(f"malformed element or value: {_safe_message(exc)}") from None
        return _with_sizes(result, size_in, size)

    # -- datasets ------------------------------------------------------------------------

    def deidentify(self, ds: Dataset) -> InstanceResult:
        """De-identify ds in place (header, sequences, private tags, file meta)."""
        meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        source_ae = str(meta.get("SourceApplicationEntityTitle", "") or "").strip()
        identifying, scrub = self._identity(ds)
        originals = {kind: _text(ds, tag) for kind, tag in CROSSWALK_TAGS.items()} if self.keep_originals else None
        trim_pixel_data(ds)
        strip_codestream_text(ds)
        # overlays first: the pixel stage may change the transfer syntax their bytes follow
        overlays = self._pixel_cleaner().clean_overlays(ds, identifying) \
            if self.clean_pixels and self.profile.cleans_overlays else None
        pixels = self._pixel_cleaner().clean(ds, identifying) if self.clean_pixels else None
        transfer_syntax = transfer_syntax_of(ds)  # after the pixel stage, which may re-encode
        patient = self._patient(ds, scrub)
        self._instance = ds
        self._overlays_kept = frozenset(overlays.cleaned) if overlays else frozenset()
        try:
            self._apply(ds, patient)
        finally:
            self._instance = None
        self._mark(ds, pixels_cleaned=bool(pixels and pixels.cleaned))
        sop_class = _text(ds, 0x00080016)
        sop_instance = _text(ds, 0x00080018)
        if pixels and pixels.regions and self.config.text_crosswalk:
            record_text_crosswalk(self.config.text_crosswalk, sop_instance, pixels.regions)
        new_meta = FileMetaDataset()
        new_meta.MediaStorageSOPClassUID = sop_class
        new_meta.MediaStorageSOPInstanceUID = sop_instance
        new_meta.TransferSyntaxUID = transfer_syntax
        new_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        new_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        ds.file_meta = new_meta
        return InstanceResult(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            study_instance_uid=_text(ds, 0x0020000D),
            series_instance_uid=_text(ds, 0x0020000E),
            patient_pseudonym=_text(ds, 0x00100020),
            modality=_text(ds, 0x00080060).upper(),
            transfer_syntax_uid=str(transfer_syntax),
            source_ae_title=source_ae,
            pixel_regions_masked=(len(pixels.regions) if pixels else 0) + (len(overlays.regions) if overlays else 0),
            bytes_in=0,
            bytes_out=0,
            crosswalk=None if originals is None else (
                originals, {kind: _text(ds, tag) for kind, tag in CROSSWALK_TAGS.items()}),
            pixel_text=tuple(tuple(r) for r in pixels.regions) if pixels and self.keep_pixel_text else (),
        )

    def _identity(self, ds: Dataset) -> tuple[frozenset[str], re.Pattern[str] | None]:
        """The instance's identifying values and the pattern cutting them from kept text,
        worked out once per set of the elements they come from: a series repeats them
        slice after slice (~0.1 ms per CT slice)."""
        key = _identity_key(ds)
        found = self._identities.get(key) if key is not None else None
        if found is None:
            values = frozenset(identifying_values(ds, "retain-institution-identity" not in self.config.options))
            found = (values, self._scrub_pattern(values))
            if key is not None:
                if len(self._identities) >= IDENTITY_CACHE_ENTRIES:
                    self._identities.clear()
                self._identities[key] = found
        return found

    def _patient(self, ds: Dataset, scrub: re.Pattern[str] | None) -> _Patient:
        key = _text(ds, 0x00100020) or _text(ds, 0x00100010) or _text(ds, 0x0020000D)
        shift = self.keys.date_offset_days(key) if self.shift_dates else None
        text_dates = "keep" if "retain-longitudinal-full-dates" in self.config.options else (
            "shift" if shift is not None else "remove")
        new_uid = None if "retain-uids" in self.config.options else self.keys.uid
        return _Patient(key, shift, scrub, self.profile.scrub_patterns, self.profile.person_names, text_dates, new_uid)

    def _scrub_pattern(self, values: frozenset[str]) -> re.Pattern[str] | None:
        tokens = {t for t in (v.strip() for v in values)
                  if len(t) >= self.profile.scrub_min_length and t.upper() not in self.profile.scrub_placeholders}
        if not tokens:
            return None
        short = self.profile.scrub_whole_word_max
        # The classes hold both cases already: compiled case-sensitively ("(?-i:...)"),
        # which takes a quarter of the time (~1.5 against ~6 ms for a patient's ~40 values)
        alnum, letter = "(?-i:[0-9A-Za-z])", "(?-i:[A-Za-z])"
        parts = []
        for t in sorted(tokens, key=len, reverse=True):
            if len(t) <= short:
                parts.append(rf"(?<!{alnum}){re.escape(t)}(?!{alnum})")
            elif _WORDS.fullmatch(t):
                # a name or a place: as a word, with one more letter ("JSMITH", "SMITHS") or
                # a title ("DRSMITH", "SMITHJR"), not inside another word ("Mary" in
                # "PRIMARY", "Tate" in "PROSTATE"); glued to another part of the same name
                # ("JOHNSMITH"), that is a value too
                parts.append(rf"(?<!{letter})(?:DR|MRS?|MS|{letter})?{re.escape(t)}(?:JR|SR|MD|{letter})?(?!{letter})")
            else:
                parts.append(re.escape(t))  # a number, an ID: anywhere
        return re.compile("|".join(parts), re.IGNORECASE)

    def _apply(self, ds: Dataset, patient: _Patient) -> None:
        """Apply the profile to every element of ds, recursing into sequences."""
        private: list[int] = []
        done = self._elements_done(ds, patient) if ds is self._instance else None
        for tag in list(ds._dict):
            group, element = tag >> 16, tag & 0xFFFF
            if group == 0x0002:
                del ds[tag]  # file meta does not belong in the dataset
            elif group & 1:
                private.append(tag)
            elif element == 0 or (self.profile.removes_group(group)
                                  and not (ds is self._instance and group in self._overlays_kept)):
                del ds[tag]  # group lengths (now wrong) and whole curve/overlay groups (not cleaned ones)
            elif done is not None:
                self._element_once(ds, tag, patient, done)
            else:
                self._element(ds, tag, patient)
        if private:
            self._private(ds, private, patient)

    def _elements_done(self, ds: Dataset, patient: _Patient) -> dict[tuple, ConstantElement | bool]:
        """The elements de-identified already for this patient in this character set."""
        charset = ds._character_set
        key = (patient.signature, charset if isinstance(charset, str) else tuple(charset))
        done = self._elements.get(key)
        if done is None:
            if len(self._elements) >= ELEMENT_CACHE_PATIENTS:
                self._elements.clear()
            done = self._elements[key] = {}
        return done

    def _element_once(self, ds: Dataset, tag: int, patient: _Patient, done: dict) -> None:
        """``_element`` for a top-level element, remembered: a series repeats most values
        slice after slice (equipment, study, series, protocol...). What an element becomes
        depends only on its tag and encoded value, the patient (pseudonyms, date shift,
        values cut from text: ``done`` is the patient's) and the character set, never on
        the other elements; it is kept (True), removed (False) or replaced by an element
        that nothing changes afterwards (a ConstantElement, encoded once)."""
        raw = ds._dict.get(tag)
        if type(raw) is not RawDataElement or raw.VR == "SQ" or type(raw.value) is not bytes \
                or len(raw.value) > ELEMENT_CACHE_BYTES:  # (pixel data: a bytearray)
            self._element(ds, tag, patient)
            return
        key = (tag, raw.VR, raw.length, raw.value, raw.is_implicit_VR, raw.is_little_endian)
        outcome = done.get(key)
        if outcome is None:
            self._element(ds, tag, patient)
            after = ds._dict.get(tag)
            if after is None:
                outcome = False
            elif after is raw:
                outcome = True
            elif type(after) is DataElement and after.VR != "SQ":
                outcome = ConstantElement(after.tag, after.VR, after.value)
            else:
                return  # a sequence (cached as such) or an element of another kind: not kept
            if len(done) >= ELEMENT_CACHE_ENTRIES:
                done.clear()
            done[key] = outcome
        if outcome is False:
            ds._dict.pop(tag, None)
        elif outcome is not True:
            ds._dict[tag] = outcome

    def _element(self, ds: Dataset, tag: int, patient: _Patient, action: Action | None = None) -> None:
        raw = _get(ds, tag)
        vr = _vr(raw, tag)
        action = action or self.profile.action(tag)
        if action is None:
            if vr is None or not _in_dictionary(tag):
                # Not in the data dictionary: cannot tell what it holds, whatever VR it came
                # with (a damaged tag number turns (0008,0050) into (00E4,0050), value intact).
                del ds[tag]
                return
            code = self.profile.unlisted.get(vr)
            if code is None:
                if tag in self.profile.equipment_text:  # records the equipment: as for K
                    patient = patient.for_recorded_text
                self._keep(ds, tag, vr, patient, shift=patient.shift_days is not None)
                return
            action = Action(code)
        code = action.code
        vr = vr or "UN"
        if code == "X":
            del ds[tag]
        elif code == "Z":
            ds[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" else None)
        elif code == "D" and vr == "SQ":
            self._dummy_sequence(ds, tag, patient)
        elif code == "D":
            ds[tag] = DataElement(tag, vr, self._dummy(vr))
        elif code == "U":
            if vr == "SQ":
                self._recurse(ds, tag, patient)
            elif vr == "UI":
                values = _strings(raw)
                ds[tag] = DataElement(tag, vr, _vm([self.keys.uid(v) for v in values if v]))
            else:
                ds[tag] = DataElement(tag, vr, self._dummy(vr))
        elif code == "K":  # device identity and the like: text kept as recorded
            self._keep(ds, tag, vr, patient.for_recorded_text if vr in TEXT_VRS else patient, shift=False)
        elif code == "C":
            if vr in DATE_VRS and patient.shift_days is None:
                ds[tag] = DataElement(tag, vr, self._dummy(vr))
            else:
                self._keep(ds, tag, vr, patient, shift=True)
        elif code == "P":
            value = self.keys.patient(patient.key) if tag in (0x00100010, 0x00100020) else None
            if value is None:
                original = "\\".join(_strings(raw))
                value = self.keys.value(tag, original) if original else None
            ds[tag] = DataElement(tag, vr, value)
        elif code == "R":
            ds[tag] = DataElement(tag, vr, action.value)
        elif code != "V":
            raise AssertionError(f"unknown action {code}")

    def _keep(self, ds: Dataset, tag: int, vr: str, patient: _Patient, shift: bool) -> None:
        """Keep an element, with what keeping still implies: recurse, shift dates, scrub text."""
        if _overrun(_get(ds, tag), tag, vr):
            raise InstanceRefused(f"malformed element: a {vr} value that does not fit its VR (wrong length?)")
        if vr == "SQ":
            self._recurse(ds, tag, patient)
        elif vr in DATE_VRS and shift and patient.shift_days is not None:
            values = _strings(_get(ds, tag))
            shifted = [shift_date(v, vr, patient.shift_days) for v in values]
            ds[tag] = DataElement(tag, vr, _vm([v for v in shifted if v is not None]))
        elif vr in TEXT_VRS:
            self._clean_text(ds, tag, vr, patient)
        elif (vr in BINARY_VRS and tag not in _PIXEL_TAGS and tag & 0xFF00FFFF != 0x60003000
              and _holds_identifying_text(_get(ds, tag), patient.scrub)):
            # A binary value that spells the patient's name or an identifier: a vendor blob
            # with text in it, or a damaged length that swallowed the elements after it.
            del ds[tag]

    def _clean_text(self, ds: Dataset, tag: int, vr: str, patient: _Patient) -> None:
        raw = _get(ds, tag)
        if isinstance(raw, RawDataElement):
            data = raw.value or b""
            if data.isascii() and not patient.needs_cleaning(data.decode("ascii")):
                return  # the common case: nothing to cut, and the raw bytes stay as they are
        elem = ds[tag]
        values = list(elem.value) if isinstance(elem.value, (list, MultiValue)) else [elem.value]
        before = [str(v) if v is not None else v for v in values]
        cleaned = [patient.clean_text(v) if v is not None and patient.needs_cleaning(v) else v for v in before]
        if cleaned != before:
            ds[tag] = DataElement(tag, vr, _vm(cleaned))

    def _recurse(self, ds: Dataset, tag: int, patient: _Patient) -> None:
        key = self._sequence_key(ds, tag, patient)
        if key is not None:
            done = self._sequences.get(key)
            if done is not None:
                ds._dict[tag] = done  # as it is: pydicom's setter would touch the shared items
                return
        elem = ds[tag]
        if elem.VR != "SQ" or not elem.value:
            return
        for item in elem.value:
            self._apply(item, patient)
        if key is not None:
            if len(self._sequences) >= SEQUENCE_CACHE_ENTRIES:
                self._sequences.clear()
            done = ConstantElement(tag, "SQ", elem.value)
            done.is_undefined_length = elem.is_undefined_length
            ds._dict[tag] = self._sequences[key] = done

    def _sequence_key(self, ds: Dataset, tag: int, patient: _Patient) -> tuple | None:
        """What a top-level sequence's de-identified form depends on: its bytes, how they are
        encoded, and the patient (pseudonyms, date shift, values cut from text). Series
        repeat most of their sequences slice after slice (request attributes, procedure
        codes, referenced images): each is de-identified once and its result reused."""
        raw = _get(ds, tag)
        if ds is not self._instance or not isinstance(raw, RawDataElement) or not isinstance(raw.value, bytes) \
                or len(raw.value) > SEQUENCE_CACHE_BYTES:
            return None
        charset = ds._character_set
        return (int(tag), raw.value, raw.is_implicit_VR, raw.is_little_endian,
                charset if isinstance(charset, str) else tuple(charset), patient.signature)

    def _private(self, ds: Dataset, tags: list[int], patient: _Patient) -> None:
        """Remove private elements, except what retain-safe-private keeps by creator."""
        kept_blocks: set[int] = set()
        creators: dict[int, str] = {}
        for tag in tags:
            if 0x10 <= tag & 0xFFFF <= 0xFF:
                creators[tag] = "".join(_strings(_get(ds, tag))).strip()
        for tag in tags:
            element = tag & 0xFFFF
            if element <= 0xFF:
                continue
            creator_tag = (tag & 0xFFFF0000) | (element >> 8)
            creator = creators.get(creator_tag)
            if creator and self.profile.is_safe_private(creator, tag >> 16, element & 0xFF):
                kept_blocks.add(creator_tag)
                raw = _get(ds, tag)
                vr = _vr(raw, tag) or "UN"
                listed = self.profile.safe_private_vr(creator, tag >> 16, element & 0xFF)
                if vr == "UN" and isinstance(raw, RawDataElement) and (listed in ("SQ", "UI") or (
                        listed in TEXT_VRS and len(raw.value or b"") <= _SHORT_LENGTH_MAX)):
                    # A sequence, UID or text the file does not call one (implicit VR, or UN:
                    # in implicit VR little endian, PS3.5 6.2.2): read as the list says, so that
                    # a sequence's items are de-identified, a UID remapped and text cleaned
                    # like any other, not kept raw (or deleted whole when it spells a name).
                    ds._dict[tag] = raw._replace(VR=listed, is_implicit_VR=True, is_little_endian=True)
                    vr = listed
                if vr == "UI" and patient.new_uid is not None \
                        and self.profile.remaps_private_uid(creator, tag >> 16, element & 0xFF):
                    # A kept private UID naming an instance or series (an analysed series, a
                    # bookmark) is remapped as the public ones are, so that it still points
                    # at the same object and does not give the original away; DICOM's own
                    # (SOP classes, transfer syntaxes: under 1.2.840.10008) stay.
                    values = _strings(_get(ds, tag))
                    remapped = [v if not v or v.startswith("1.2.840.10008.") else patient.new_uid(v) for v in values]
                    if remapped != values:
                        ds[tag] = DataElement(tag, vr, _vm(remapped))
                self._keep(ds, tag, vr, patient, shift=True)
            else:
                del ds[tag]
        for tag in tags:
            if tag & 0xFFFF <= 0xFF and tag not in kept_blocks:
                del ds[tag]

    def _dummy_sequence(self, ds: Dataset, tag: int, patient: _Patient) -> None:
        """D for a sequence: a non-empty value, so its items with their structure (codes,
        numbers, references) and every value that can name or date someone replaced by a
        dummy (text, names, dates, times, AE titles, URIs, binary data); listed UIDs are
        remapped, other UIDs (SOP classes, coding schemes) kept, private elements and
        elements not in the data dictionary dropped. Made once per series like the sequences ``_recurse`` reuses (``_sequence_key``)."""
        key = self._sequence_key(ds, tag, patient)
        done = self._sequences.get(key) if key is not None else None
        if done is None:
            items = Sequence([self._dummy_item(item) for item in _items(ds, tag) if isinstance(item, Dataset)])
            done = ConstantElement(tag, "SQ", items)
            if key is not None:
                if len(self._sequences) >= SEQUENCE_CACHE_ENTRIES:
                    self._sequences.clear()
                self._sequences[key] = done
        ds._dict[tag] = done

    def _dummy_item(self, item: Dataset) -> Dataset:
        new = Dataset()
        for tag in sorted(item._dict):
            if tag >> 16 & 1 or not tag & 0xFFFF or not _in_dictionary(tag):
                continue  # private elements, group lengths, and what cannot be told (see _element)
            vr = _vr(_get(item, tag), tag) or "UN"
            if vr == "SQ":
                new.add(DataElement(tag, vr, Sequence([self._dummy_item(i) for i in item[tag].value])))
            elif vr == "UI":
                values = _strings(_get(item, tag))
                action = self.profile.action(tag)
                if action is not None and action.code == "U":
                    values = [self.keys.uid(v) for v in values if v]
                new.add(DataElement(tag, vr, _vm(values)))
            elif vr in _DUMMIED_IN_ITEMS:
                new.add(DataElement(tag, vr, self._dummy(vr)))
            elif _overrun(_get(item, tag), tag, vr):  # kept as it is: it must be what its VR says
                raise InstanceRefused(f"malformed element: a {vr} value that does not fit its VR (wrong length?)")
            else:
                new.add(DataElement(tag, vr, item[tag].value))
        return new

    def _dummy(self, vr: str):
        if vr == "SQ":
            return Sequence()
        if vr in NUMERIC_VRS:
            return 0
        if vr in BINARY_VRS:
            return b"\x00\x00"
        return self.profile.dummy.get(vr, "ANON")

    def _mark(self, ds: Dataset, pixels_cleaned: bool) -> None:
        """Record what was done: PS3.15 E.1.1 and the CID 7050 codes.

        Clean Pixel Data is claimed only for an instance whose pixels were cleaned.
        """
        marks = self._marks.get(pixels_cleaned)
        if marks is None:
            marks = self._marks[pixels_cleaned] = self._build_marks(pixels_cleaned)
        for elem in marks:
            ds[elem.tag] = elem

    def _build_marks(self, pixels_cleaned: bool) -> tuple[ConstantElement, ...]:
        options = sorted(o for o in self.config.options if o != "clean-pixel-data" or pixels_cleaned)
        codes = [BASIC_PROFILE_CODE, *(OPTIONS[o] for o in options)]
        if self.shift_dates:
            temporal = "MODIFIED"
        elif "retain-longitudinal-full-dates" in self.config.options:
            temporal = "UNMODIFIED"
        else:
            temporal = "REMOVED"
        return (
            ConstantElement(0x00120062, "CS", "YES"),  # Patient Identity Removed
            ConstantElement(0x00120063, "LO", [f"deid-router {__version__}", "PS3.15 E.1 Basic Profile", *options][:16]),
            ConstantElement(0x00120064, "SQ", Sequence([_code(v, m) for v, m in codes])),
            ConstantElement(0x00280303, "CS", temporal),  # Longitudinal Temporal Information Modified
        )


def record_text_crosswalk(path: Path, sop_instance_uid: str, regions) -> None:
    """Append the text read off masked regions to the site's review CSV (owner-only).

    One write per instance with O_APPEND, so worker processes do not interleave rows.
    """
    out = io.StringIO()
    writer = csv.writer(out)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    for r in regions:
        writer.writerow([now, sop_instance_uid, r.frame, r.x0, r.y0, r.x1, r.y1, r.text])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size == 0:
            os.write(fd, b"time,sop_instance_uid,frame,x0,y0,x1,y1,text\r\n")
        os.write(fd, out.getvalue().encode("utf-8"))
    finally:
        os.close(fd)


# -- reading and writing ---------------------------------------------------------------


def read_instance(src: Path | str) -> Dataset:
    """Read a Part 10 file (or a bare dataset) and check what de-identification relies on."""
    try:
        ds = read_part10(src) or dcmread(src, force=True)
    except OSError as exc:
        if exc.errno is not None:
            raise  # the file system's failure, not the instance's
        raise InstanceRefused(f"not readable as DICOM: {_safe_message(exc)}") from None
    except (InvalidDicomError, EOFError, ValueError, KeyError, NotImplementedError, OverflowError) as exc:
        raise InstanceRefused(f"not readable as DICOM: {_safe_message(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is the input's fault
        raise InstanceRefused(f"not readable as DICOM ({type(exc).__name__})") from None
    try:
        validate(ds)
    except InstanceRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - a value that breaks pydicom breaks the instance
        raise InstanceRefused(f"malformed element or value: {_safe_message(exc)}") from None
    return ds


def validate(ds: Dataset) -> None:
    """Refuse what cannot be de-identified and written back faithfully."""
    if not len(ds) or not any(tag >> 16 == 0x0008 for tag in ds.keys()):
        raise InstanceRefused("not a DICOM dataset (no identifying group 0008 elements)")
    # Not a composite instance without these. A malformed SOP Instance UID is tolerated:
    # it is replaced by a keyed UID anyway (unless the site retains UIDs).
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", _text(ds, 0x00080016)):
        raise InstanceRefused("missing or invalid SOP Class UID (0008,0016): not a composite instance")
    if not _text(ds, 0x00080018):
        raise InstanceRefused("missing SOP Instance UID (0008,0018): not a composite instance")
    if len(_strings(_get(ds, 0x00080018))) > 1:
        raise InstanceRefused("SOP Instance UID (0008,0018) has several values: an instance has one")
    last = _get(ds, max(ds._dict, key=int))  # key=int: BaseTag's __lt__ is Python, 6x slower
    if isinstance(last, RawDataElement) and isinstance(last.value, (bytes, bytearray)) and last.length != 0xFFFFFFFF \
            and len(last.value) < last.length:
        raise InstanceRefused(f"file truncated: the last element ({last.tag.group:04X},{last.tag.element:04X}) "
                              f"has {len(last.value)} of {last.length} bytes")
    if 0x7FE00010 in ds:
        check_pixel_data(ds)


def check_pixel_data(ds: Dataset) -> None:
    """Native pixel data must be as long as its description; encapsulated must be items."""
    raw = _get(ds, 0x7FE00010)
    data = raw.value if isinstance(raw, RawDataElement) else ds.PixelData
    if data is None:
        return
    if is_encapsulated(ds):
        if not data.startswith(ITEM_TAG):
            raise InstanceRefused("encapsulated pixel data is not a sequence of items")
        return
    expected = native_pixel_bytes(ds)
    if len(data) < expected:
        raise InstanceRefused(f"pixel data truncated: {len(data)} of {expected} bytes")


def trim_pixel_data(ds: Dataset) -> None:
    """Cut what follows native pixel data beyond its description (and the padding byte of
    an odd length): bytes no viewer shows, in which anything may hide."""
    raw = _get(ds, 0x7FE00010)
    if raw is None or is_encapsulated(ds):
        return
    data = raw.value
    expected = native_pixel_bytes(ds)
    keep = expected + (expected & 1)
    if data is None or len(data) <= keep:
        return
    if isinstance(data, bytearray):
        del data[keep:]  # in place: no copy of a large instance
    else:
        data = data[:keep]
    if isinstance(raw, RawDataElement):
        ds._dict[raw.tag] = raw._replace(value=data, length=keep)
    elif not isinstance(data, bytearray):
        raw.value = data


#: JPEG (ISO 10918), JPEG-LS (ISO 14495) and JPEG 2000 (ISO 15444, HTJ2K too) transfer
#: syntaxes: their frames may carry text in segments of their own.
_JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
                            "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                            "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"})
#: JPEG and JPEG-LS: COM (comment), APP1 (Exif: camera owner, dates, GPS; XMP), APP13
#: (IPTC: names, places); not APP0 (JFIF), APP2 (ICC), APP8 (JPEG-LS colour transform) or
#: APP14 (Adobe colour transform), which decoders read. The header ends at SOS (or EOI).
#: JPEG 2000: COM; its main header ends at the first tile-part (SOT) or EOC.
#: A JP2 file's signature box (ISO 15444-1 I.5.1).
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
#: The JP2 boxes a decoder reads: signature, file type, reader requirements, header (image
#: header, colour specification, palette...), the contiguous codestream.
_JP2_DECODED_BOXES = frozenset({b"jP  ", b"ftyp", b"rreq", b"jp2h", b"jpch", b"jplh"})
_TEXT_MARKERS = {b"\xff\xd8": (frozenset({0xFE, *range(0xE1, 0xE8), *range(0xE9, 0xEE), 0xEF}), frozenset({0xDA, 0xD9})),
                 b"\xff\x4f": (frozenset({0x64}), frozenset({0x90, 0xD9}))}


def strip_codestream_text(ds: Dataset) -> int:
    """Remove the text segments (``_TEXT_MARKERS``: comments, every application segment but
    JFIF (APP0), JPEG-LS's colour transform (APP8, in JPEG-LS) and Adobe's (APP14): Exif and XMP, ICC
    profiles, IPTC, vendors' picture info; no decoder needs them and any camera or encoder
    may fill them: names, dates, places, a thumbnail; and JFIF's own thumbnail) from the
    headers of JPEG, JPEG-LS and JPEG 2000 frames kept as they are, and what follows a frame's
    end, also where a frame spans several items; the Basic Offset Table follows, an
    Extended Offset Table goes (it is optional). Returns how many segments went."""
    raw = _get(ds, 0x7FE00010)
    if raw is None or str(transfer_syntax_of(ds)) not in _JPEG_SYNTAXES:
        return 0
    data = memoryview(raw.value or b"")  # read, not copied, unless there is something to cut
    if data[:4] != ITEM_TAG:
        return 0
    items = []  # the items after the offset table, as (old offset, fragment)
    pos, first = 8 + int.from_bytes(data[4:8], "little"), None
    table = bytes(data[8:pos])
    while pos + 8 <= len(data) and data[pos:pos + 4] == ITEM_TAG:
        length = int.from_bytes(data[pos + 4:pos + 8], "little")
        if first is None:
            first = pos
        items.append((pos - first, data[pos + 8:pos + 8 + length]))
        pos += 8 + length
    if pos != len(data) or first is None:
        return 0  # not items to the end: left as it is (the decoder decides)
    cleaned = []
    for start, end in _frames(items):
        if end - start == 1:
            old, fragment = items[start]
            cleaned.append((old, *_without_text_segments(fragment)))
            continue
        # A frame split over several items is cleaned whole and, where anything went, kept
        # in one item (PS3.5 A.4 allows either): its segments and its end may lie anywhere.
        kept, count = _without_text_segments(memoryview(b"".join(fragment for _old, fragment in items[start:end])))
        if count:
            cleaned.append((items[start][0], kept, count))
        else:
            cleaned += [(old, fragment, 0) for old, fragment in items[start:end]]
    removed = sum(count for _old, _kept, count in cleaned)
    if not removed:
        return 0
    out, moved = bytearray(), {}
    for old, kept, _count in cleaned:
        moved[old] = len(out)
        out += ITEM_TAG + len(kept).to_bytes(4, "little") + kept
    offsets = [int.from_bytes(table[i:i + 4], "little") for i in range(0, len(table) - 3, 4)]
    if any(offset not in moved for offset in offsets):
        offsets = []  # a table that does not point at items: dropped (it is optional)
    table = b"".join(moved[offset].to_bytes(4, "little") for offset in offsets)
    value = ITEM_TAG + len(table).to_bytes(4, "little") + table + bytes(out)
    for tag in (0x7FE00001, 0x7FE00002):  # Extended Offset Table and its lengths
        ds._dict.pop(tag_object(tag), None)
    if isinstance(raw, RawDataElement):
        ds._dict[raw.tag] = raw._replace(value=value)
    else:
        ds[PIXEL_DATA] = DataElement(PIXEL_DATA, raw.VR, value, is_undefined_length=True, already_converted=True)
    return removed


def _without_text_segments(fragment: memoryview) -> tuple[bytes | memoryview, int]:
    """A frame with the text segments of its codestream's header (and anything after its
    end) removed, padded to an even length; unchanged if it does not start a codestream or
    its header is cut."""
    if bytes(fragment[:12]) == _JP2_SIGNATURE:
        return _without_jp2_text(fragment) or (fragment, 0)
    markers = _TEXT_MARKERS.get(bytes(fragment[:2]))
    if markers is None:
        return fragment, 0
    text, header_end = markers
    pos, cuts, replaced, app8, jpeg_ls = 2, [], {}, [], False
    while pos + 4 <= len(fragment):
        if fragment[pos] != 0xFF:
            return fragment, 0
        marker = fragment[pos + 1]
        if marker == 0xFF:
            pos += 1  # a fill byte
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in header_end:
            break
        end = pos + 2 + int.from_bytes(fragment[pos + 2:pos + 4], "big")
        if end > len(fragment):
            return fragment, 0
        if marker in text:
            cuts.append((pos, end))
        elif marker == 0xE8:
            app8.append((pos, end))
        elif marker == 0xF7:
            jpeg_ls = True
        elif marker == 0xE0 and fragment[:2] == b"\xff\xd8":
            jfif = _jfif_without_thumbnail(bytes(fragment[pos:end]))
            if jfif is not None:
                cuts.append((pos, end))
                replaced[pos] = jfif
        pos = end
    if fragment[:2] == b"\xff\xd8" and not jpeg_ls:  # APP8 is JPEG-LS's colour transform only
        cuts = sorted(cuts + app8)
    if fragment[:2] == b"\xff\x4f" and fragment[pos:pos + 2] == b"\xff\x90":
        whole = _without_j2k_text(fragment, pos, cuts)
        if whole is not None:
            return whole
    if fragment[:2] == b"\xff\xd8":
        # JPEG, JPEG-LS: bytes after the end of the image; a frame continued in the next
        # fragment has none here and stays whole.
        end = _jpeg_image_end(fragment, pos)
        if end is not None and bytes(fragment[end:]).strip(b"\0"):
            cuts.append((end, len(fragment)))
    if not cuts:
        return fragment, 0
    kept = bytearray()
    start = 0
    for cut_start, cut_end in cuts:
        kept += fragment[start:cut_start]
        kept += replaced.get(cut_start, b"")
        start = cut_end
    kept += fragment[start:]
    eoi = kept.rfind(b"\xff\xd9")
    if eoi >= 0 and not kept[eoi + 2:].strip(b"\0"):
        del kept[eoi + 2:]  # the padding of the odd length it had (padded again below)
    if len(kept) % 2:
        kept += b"\0"
    return bytes(kept), len(cuts)


def _without_jp2_text(fragment: memoryview) -> tuple[bytes, int] | None:
    """A JPEG 2000 codestream wrapped in a JP2 file (which PS3.5 A.4.4 forbids, and some
    writers do) with only the boxes a decoder reads (signature, file type, header with its
    colour specification, the codestream, itself stripped like a bare one): XML, UUID,
    IPR and other boxes may hold any text. The header stays: its colour specification
    changes how the codestream decodes. None if the boxes do not add up."""
    out, pos, removed = bytearray(), 0, 0
    while pos + 8 <= len(fragment):
        length, kind, header = int.from_bytes(fragment[pos:pos + 4], "big"), bytes(fragment[pos + 4:pos + 8]), 8
        if length == 1 and pos + 16 <= len(fragment):
            length, header = int.from_bytes(fragment[pos + 8:pos + 16], "big"), 16
        elif length == 0:  # the last box: to the end
            length = len(fragment) - pos
        if length < header or pos + length > len(fragment):
            return None
        if kind == b"jp2c":
            codestream, count = _without_text_segments(fragment[pos + header:pos + length])
            out += (8 + len(codestream)).to_bytes(4, "big") + kind
            out += codestream
            removed += count
        elif kind in _JP2_DECODED_BOXES:
            out += fragment[pos:pos + length]
        else:
            removed += 1
        pos += length
    if bytes(fragment[pos:]).strip(b"\0"):
        removed += 1  # bytes after the last box
    if not removed:
        return None
    return bytes(out) + b"\0" * (len(out) & 1), removed


def _frames(items: list[tuple[int, memoryview]]) -> list[tuple[int, int]]:
    """The items as frames, each a range of indexes: an item that starts a JPEG, JPEG-LS or
    JPEG 2000 codestream (or a JP2 file) with the items after it that start none."""
    starts = [bytes(fragment[:2]) in (b"\xff\xd8", b"\xff\x4f") or bytes(fragment[:12]) == _JP2_SIGNATURE
              for _old, fragment in items]
    bounds = [k for k, start in enumerate(starts) if start or not k]
    return list(zip(bounds, bounds[1:] + [len(items)]))


#: A JPEG or JPEG-LS marker where it can end entropy-coded data: FF, then a byte from C0 on
#: but a restart marker's (D0-D7). Neither coder writes one in its data (JPEG stuffs 00 after
#: FF, JPEG-LS a byte below 80); FF FF is a fill byte before a marker.
_JPEG_MARKER = re.compile(rb"\xff[\xc0-\xcf\xd8-\xfe]")


def _jpeg_image_end(data: memoryview | bytes, pos: int) -> int | None:
    """Where a JPEG or JPEG-LS image ends (just past EOI), walked from its first scan's SOS
    (or EOI) at ``pos``: marker segments by their lengths, entropy-coded data up to the next
    marker. FF D9 inside a segment (a table's bytes) or in what follows the image is not
    taken for the end. None if the image does not end within ``data``."""
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xD9:
            return pos + 2
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 1 if marker == 0xFF else 2  # a fill byte, TEM, a restart marker
            continue
        if pos + 4 > len(data):
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # SOS: the scan's entropy-coded data follows its header
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                return None
            pos = found.start()
    return None


def _jfif_without_thumbnail(segment: bytes) -> bytes | None:
    """What replaces a JPEG APP0 segment that carries a picture: a JFIF header's thumbnail
    (a miniature of the image, text and all, that no OCR looks at) dropped, b"" for any
    other APP0 (a JFXX extension's thumbnail); None to keep the segment as it is."""
    if segment[4:9] != b"JFIF\0":
        return b""
    if len(segment) <= 18 and segment[16:18] in (b"", b"\0\0"):
        return None
    return b"\xff\xe0\x00\x10" + segment[4:16] + b"\0\0"


def _without_j2k_text(fragment: memoryview, first_tile: int,
                      cuts: list[tuple[int, int]]) -> tuple[bytes | memoryview, int] | None:
    """A JPEG 2000 codestream without the comments of its main header (``cuts``) and of its
    tile-part headers, and without anything after its end (EOC): each tile-part is found by
    the length its SOT gives (ISO 15444-1 A.4.2), not by searching for marker bytes a header
    may hold. Where tile-part lengths change, a TLM (optional) goes. None if the tile-parts
    do not lead to EOC within the fragment (a frame continued in the next fragment, or a
    damaged one): then only the main header's comments go."""
    tiles, pos, removed, resized = bytearray(), first_tile, len(cuts), False
    while fragment[pos:pos + 2] == b"\xff\x90" and pos + 12 <= len(fragment):
        length = int.from_bytes(fragment[pos + 6:pos + 10], "big")
        end = pos + length if length else len(fragment)
        if end <= pos + 12 or end > len(fragment):
            return None
        header, at = bytearray(), pos + 12
        while fragment[at:at + 2] != b"\xff\x93":  # SOD: the tile-part's data follows
            if at + 4 > end or fragment[at] != 0xFF:
                return None
            segment_end = at + 2 + int.from_bytes(fragment[at + 2:at + 4], "big")
            if fragment[at + 1] == 0x64:  # COM
                removed += 1
                resized = resized or length != 0
            else:
                header += fragment[at:segment_end]
            at = segment_end
        if not length:
            # 0: the last tile-part, up to EOC, the first FFD9 after SOD (coded data never
            # holds 0xFF followed by a byte above 0x8F, A.1.1 / annex D)
            found = bytes(fragment[at + 2:]).find(b"\xff\xd9")
            if found < 0:
                return None
            end = at + 2 + found
        new_length = (12 + len(header) + end - at) if length else 0
        for part in (fragment[pos:pos + 6], new_length.to_bytes(4, "big"), fragment[pos + 10:pos + 12], header,
                     fragment[at:end]):
            tiles += part
        pos = end
    if fragment[pos:pos + 2] != b"\xff\xd9":
        return None
    if fragment[pos + 2:].tobytes().strip(b"\0"):
        removed += 1  # bytes after EOC
    if not removed:
        return fragment, 0
    main, start = bytearray(), 0
    for cut_start, cut_end in cuts:
        main += fragment[start:cut_start]
        start = cut_end
    main += fragment[start:first_tile]
    if resized:
        main = _without_segment(main, 0x55)  # TLM: the tile-part lengths it lists changed
    kept = main + tiles + b"\xff\xd9"
    if len(kept) % 2:
        kept += b"\0"
    return bytes(kept), removed


def _without_segment(header: bytearray, marker: int) -> bytearray:
    """A JPEG 2000 main header (SOC, then marker segments) without the segments of one marker."""
    out, pos = bytearray(header[:2]), 2
    while pos + 4 <= len(header):
        end = pos + 2 + int.from_bytes(header[pos + 2:pos + 4], "big")
        if header[pos + 1] != marker:
            out += header[pos:end]
        pos = end
    return out


def native_pixel_bytes(ds: Dataset) -> int:
    """The length native Pixel Data must have by the Image Pixel attributes (padding aside)."""
    sizes = {}
    for tag, name in ((0x00280010, "Rows"), (0x00280011, "Columns"), (0x00280100, "Bits Allocated"),
                      (0x00280002, "Samples per Pixel"), (0x00280008, "Number of Frames")):
        text = _text(ds, tag)
        if not text and name in ("Samples per Pixel", "Number of Frames"):
            sizes[name] = 1
            continue
        try:
            sizes[name] = int(ds[tag].value) if ds[tag].VR in ("US", "SS") else int(text)
        except (KeyError, TypeError, ValueError):
            raise InstanceRefused(f"invalid or missing {name} ({tag >> 16:04X},{tag & 0xFFFF:04X}) for pixel data") from None
    bits = sizes["Rows"] * sizes["Columns"] * sizes["Samples per Pixel"] * sizes["Number of Frames"] * sizes["Bits Allocated"]
    if _text(ds, 0x00280004).upper() in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        bits = bits * 2 // 3  # two chroma samples shared by each pair of pixels
    return (bits + 7) // 8


def is_encapsulated(ds: Dataset) -> bool:
    """Is the pixel data encapsulated? Transfer syntaxes newer than pydicom count by shape."""
    try:
        return transfer_syntax_of(ds).is_encapsulated
    except ValueError:
        raw = _get(ds, 0x7FE00010)
        return raw is not None and getattr(raw, "length", 0) == 0xFFFFFFFF


def transfer_syntax_of(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return UID(str(meta.TransferSyntaxUID).strip("\0 "))
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def write_instance(ds: Dataset, dst: Path, durable: bool = True,
                   reuse: Callable[[Path, int], bool] | None = None, size_hint: int = 0, atomic: bool = True) -> int:
    """Write ds as a Part 10 file, atomically: a temporary file, fsync if durable, rename.
    Not ``atomic``: straight to dst (a path nobody else reads, deleted if the write fails).

    ``reuse(tmp, size_hint)``, if given, may rename a recycled file to tmp (``Spool.reuse``):
    it is written over from its start and cut to the new length (checked).
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp") if atomic else dst
    ts = ds.file_meta.TransferSyntaxUID
    implicit = fast_syntax(ts)
    recycled = reuse is not None and reuse(tmp, size_hint)
    try:
        with open(tmp, "r+b" if recycled else "wb") as out:
            if implicit is not None:
                write_chunks(out, part10_bytes(ds, implicit))
            else:
                materialized(ds)
                ds.save_as(out, implicit_vr=False, little_endian=ts != ExplicitVRBigEndian, enforce_file_format=True)
            out.flush()
            if recycled:
                reusable(out.fileno(), out.tell())
            if durable:
                os.fsync(out.fileno())
        if atomic:
            os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return os.path.getsize(dst)


# -- values ----------------------------------------------------------------------------


#: Identifiers of the patient and the visit, and telephone numbers: cut out of kept text.
_ID_TAGS = (0x00100020, 0x00101000, 0x00080050, 0x00101090, 0x00102154, 0x00380010, 0x00080094, 0x00401103)
#: Identifiers of the order and the procedure (top level, and the items of the Request
#: Attributes and Referenced Request Sequences, accession number included there).
#: Often short numbers: kept numbers shorter than ``_MIN_ORDER_DIGITS`` are not cut.
_ORDER_TAGS = (0x00200010, 0x00401001, 0x00402016, 0x00402017, 0x00400009, 0x00400253, 0x00380060, 0x00080050)
#: Sequences whose items name an order: Request Attributes, Referenced Request (SR).
_REQUEST_SEQUENCES = (0x00400275, 0x0040A370)
_MIN_ORDER_DIGITS = 5
#: Where the patient lives and stays, and the addresses of people named in the header:
#: the whole value and each comma-separated part of 4 characters or more.
_RESIDENCE_TAGS = (0x00101040, 0x00102152, 0x00380300, 0x00380400, 0x00080092, 0x00401102)
#: The institution's name and address, likewise (kept with retain-institution-identity).
#: Not the department: its name ("Radiology") is a word of kept descriptions, not PHI.
_INSTITUTION_TAGS = (0x00080080, 0x00080081)


#: Every element ``identifying_values`` reads besides the person names and the character set.
_IDENTITY_TAGS = frozenset(_ID_TAGS + _ORDER_TAGS + _RESIDENCE_TAGS + _INSTITUTION_TAGS + _REQUEST_SEQUENCES
                           + (0x00101002, 0x00100030))


def _identity_key(ds: Dataset) -> tuple | None:
    """What ``identifying_values`` depends on: the character set and, as bytes, the elements
    it reads, every person name and every sequence that may name someone; None where one
    is no longer raw or is long."""
    charset = ds._character_set
    key: list = [charset if isinstance(charset, str) else tuple(charset)]
    for tag, raw in ds._dict.items():
        if tag not in _IDENTITY_TAGS:
            if tag >> 16 & 1:
                continue
            vr = _vr(raw, tag)
            if vr != "PN" and not (vr == "SQ" and _may_name_someone(raw)):
                continue
        if type(raw) is not RawDataElement or len(raw.value or b"") > SEQUENCE_CACHE_BYTES:
            return None
        key.append((int(tag), raw.VR, raw.value, raw.is_implicit_VR, raw.is_little_endian))
    return tuple(key)


def _pn_tags_pattern() -> re.Pattern[bytes]:
    """The tags of the dictionary's person-name attributes as a little-endian data set
    writes them, grouped by group number (a fast first-byte test)."""
    groups: dict[bytes, list[bytes]] = {}
    for tag, entry in DicomDictionary.items():
        if entry[0] == "PN" and not tag >> 16 & 1:
            groups.setdefault(struct.pack("<H", tag >> 16), []).append(struct.pack("<H", tag & 0xFFFF))
    return re.compile(b"|".join(re.escape(group) + b"(?:" + b"|".join(map(re.escape, elements)) + b")"
                                for group, elements in groups.items()))


_PN_TAGS = _pn_tags_pattern()


def _may_name_someone(raw) -> bool:
    """Could a sequence hold a person's name? A cheap test of its bytes before it is read:
    with explicit VRs the letters "PN" (a VR, or text that merely contains them), with
    implicit ones a person-name attribute's tag; a converted or big-endian one may."""
    value = raw.value
    if type(raw) is not RawDataElement or not isinstance(value, bytes) or not raw.is_little_endian:
        return True
    if not value:
        return False
    return b"PN" in value if not raw.is_implicit_VR else _PN_TAGS.search(value) is not None


def _charset_key(ds: Dataset) -> str | tuple[str, ...]:
    """The data set's character set as it was read, hashable (a key of the caches of
    sequences read by their bytes)."""
    charset = ds.original_character_set or ds._character_set
    return charset if isinstance(charset, str) else tuple(charset)


def _nested_person_names(ds: Dataset) -> list[str]:
    """The person names in the instance's (not private) sequences, at any depth."""
    charset = _charset_key(ds)
    names: list[str] = []
    for tag, raw in ds._dict.items():
        if tag >> 16 & 1 or _vr(raw, tag) != "SQ" or not _may_name_someone(raw):
            continue
        if type(raw) is RawDataElement and len(raw.value or b"") <= SEQUENCE_CACHE_BYTES:
            names += _sequence_person_names(raw._replace(value_tell=0), charset)  # read once a series
        else:
            names += _sequence_person_names.__wrapped__(raw, charset)
    return names


@functools.lru_cache(maxsize=64)
def _sequence_person_names(elem, charset: str | tuple[str, ...]) -> tuple[str, ...]:
    try:
        if isinstance(elem, RawDataElement):
            elem = convert_raw_data_element(elem, encoding=charset if isinstance(charset, str) else list(charset))
        names: list[str] = []
        _collect_person_names(elem.value, names, depth=0)
    except Exception:  # noqa: BLE001 - an unreadable sequence names nobody we can read
        return ()
    return tuple(names)


def _collect_person_names(items, names: list[str], depth: int) -> None:
    if depth > _MAX_NAME_DEPTH or not isinstance(items, Sequence):
        return
    for item in items:
        if not isinstance(item, Dataset):
            continue
        for tag in list(item._dict):
            if tag >> 16 & 1:
                continue
            try:
                elem = item[tag]
            except Exception:  # noqa: BLE001 - an unreadable element names nobody we can read
                continue
            if elem.VR == "PN":
                values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
                names += [str(v).strip("\0 ") for v in values if v is not None and str(v).strip("\0 ")]
            elif elem.VR == "SQ":
                _collect_person_names(elem.value, names, depth + 1)


#: How deep names are looked for in nested sequences (real data nests a few levels; damaged
#: data may nest thousands).
_MAX_NAME_DEPTH = 32


def identifying_values(ds: Dataset, institution: bool = True) -> set[str]:
    """Values of the instance's own identifying elements, to be cut out of kept text.

    ``institution``: include the institution's name and address (False where they are kept).
    """
    values: set[str] = set()
    for tag in _ID_TAGS:
        values.update(_strings(_get(ds, tag)))  # IDs, accession, record locator, phones
    for item in _items(ds, 0x00101002):  # Other Patient IDs Sequence
        values.update(_strings(_get(item, 0x00100020)))
    values.update(_order_numbers(ds))
    for tag in _REQUEST_SEQUENCES:
        request = _get(ds, tag)
        if isinstance(request, RawDataElement) and len(request.value or b"") <= SEQUENCE_CACHE_BYTES:  # once a series
            values.update(_request_order_numbers(request._replace(value_tell=0), _charset_key(ds)))
        else:
            for item in _items(ds, tag):
                values.update(_order_numbers(item))
    places: set[str] = set()
    for tag in _RESIDENCE_TAGS + (_INSTITUTION_TAGS if institution else ()):
        for place in _decoded(ds, tag):
            places.add(place)
            # parts as short as a state or country code ("IN", "OR", "US") are words of
            # kept text too: only longer parts are cut on their own
            places.update(part.strip() for part in re.split(r"[,;\r\n]+", place) if len(part.strip()) >= 4)
    if not institution:  # the patient's town is often the hospital's: its kept name stays whole
        kept = " ".join(v for tag in _INSTITUTION_TAGS for v in _decoded(ds, tag)).lower()
        places = {p for p in places if p.lower() not in kept}
    values |= places
    person_names = [tag for tag, raw in ds._dict.items() if not tag >> 16 & 1 and _vr(raw, tag) == "PN"]
    # the patient's names and every other person named in the header, at any depth
    for name in [name for tag in person_names for name in _decoded(ds, tag)] + _nested_person_names(ds):
        values.add(name)
        components = [c for c in re.split(r"[\^=,\s]+", name) if c]  # of every group
        values.update(components)
        values.update(a + b for a, b in itertools.permutations(components[:5], 2))  # "JOHNSMITH", "SMITHJOHN"
        values.update(v for c in components for v in _spellings(c))
    for birth_date in _strings(_get(ds, 0x00100030)):
        values.update(date_spellings(birth_date))
    return {v for v in values if v.strip("^= ")}


#: How German umlauts are written without them: "Müller" is "Mueller" as often as "Muller".
_TRANSLITERATED = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "AE", "Ö": "OE", "Ü": "UE", "ß": "ss"})


def _spellings(component: str) -> set[str]:
    """Other ways text writes a name's component: without its accents ("MULLER", "NGUYEN",
    "JOSE"), umlauts spelled out ("MUELLER"), and the parts of a hyphenated or apostrophed
    one, alone and joined ("SMITH", "JONES", "SMITHJONES"; "OBRIEN")."""
    plain = unaccented(component)
    out = {plain, component.translate(_TRANSLITERATED)} - {component}
    if any(c.isdigit() for c in component):
        return out  # an ID where a name belongs ("PID-0001"): cut whole, not by its parts
    for spelling in (component, plain):
        parts = [part for part in re.split(r"[-'\u2019]+", spelling) if part]
        if len(parts) > 1:
            out.update(parts)
            out.add("".join(parts))
    return out


def _order_numbers(ds: Dataset) -> list[str]:
    return [v for tag in _ORDER_TAGS for v in _strings(_get(ds, tag)) if not v.isdigit() or len(v) >= _MIN_ORDER_DIGITS]


@functools.lru_cache(maxsize=64)
def _request_order_numbers(raw: RawDataElement, charset: str | tuple[str, ...]) -> tuple[str, ...]:
    """The order numbers in a request sequence's items, from its bytes."""
    try:
        items = convert_raw_data_element(raw, encoding=charset if isinstance(charset, str) else list(charset)).value
    except Exception:  # noqa: BLE001 - an unreadable sequence has no usable items
        return ()
    return tuple(v for item in items if isinstance(item, Dataset) for v in _order_numbers(item))


def date_spellings(value: str) -> set[str]:
    """A DA value as it may be written in free text: 19510829, 1951-08-29, 08/29/1951 ..."""
    try:
        d = dt.datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return {value.strip()} if len(value.strip()) >= 6 else set()  # e.g. "0" is no date to look for
    y, m, dd = f"{d.year:04d}", f"{d.month:02d}", f"{d.day:02d}"
    spellings = {y + m + dd}
    for sep in "-/.":
        spellings |= {sep.join((y, m, dd)), sep.join((m, dd, y)), sep.join((dd, m, y))}
    spellings |= {f"{d.month}/{d.day}/{y}", f"{d.day}.{d.month}.{y}", f"{d.day}/{d.month}/{y}"}
    for month in {_MONTHS[d.month - 1], _MONTHS[d.month - 1][:3]}:  # 29 Aug 1951, August 29, 1951 ...
        for day in {dd, str(d.day)}:
            spellings |= {f"{day} {month} {y}", f"{day}-{month}-{y}", f"{day}{month}{y}", f"{month} {day}, {y}",
                          f"{month} {day} {y}"}
    return spellings


#: A value made of words (a name, a place), which kept text loses only where it stands as a
#: word (Deidentifier._scrub_pattern).
_WORDS = re.compile(r"[^\W\d_]+(?:[ '\u2019.-]+[^\W\d_]+)*\.?")

_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d*(?:\.\d*)?)([+-]\d{4})?")


def shift_date(value: str, vr: str, days: int) -> str | None:
    """value minus days, at the value's own precision; None where it is not a date."""
    text = value.strip()
    if not text:
        return text
    if vr == "DA":
        compact = text.replace(".", "") if re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", text) else text
        try:
            if len(compact) == 8 and compact.isascii() and compact.isdigit():
                d = dt.date(int(compact[:4]), int(compact[4:6]), int(compact[6:]))
            else:
                d = dt.datetime.strptime(compact, "%Y%m%d").date()
            d -= dt.timedelta(days=days)
        except (ValueError, OverflowError):
            return None
        return f"{d.year:04d}{d.month:02d}{d.day:02d}"
    m = _DT.fullmatch(text)
    if not m:
        return None
    year, month, day, rest, zone = m.groups()
    try:
        d = dt.date(int(year), int(month or 1), int(day or 1)) - dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    date = f"{d.year:04d}" + (f"{d.month:02d}" if month else "") + (f"{d.day:02d}" if day else "")
    return date + (rest or "") + (zone or "")


#: UIDs written in free text (at least five components, so versions such as 3.5.1 stay).
_TEXT_UID = re.compile(r"(?<![\w.])[0-2](?:\.(?:0|[1-9]\d*)){4,}(?!\w|\.\d)")  # "... UID 1.2.3.4.5."

#: Dates as people write them in free text: 08/29/1951, 29.08.1951, 1951-08-29, 19510829,
#: 8/29/51, 29.08.51, 29 Aug 1951, 29-AUG-51, August 29, 1951, Aug 1951. Each match is
#: checked to be a real date before it is touched. A full stop after one ends a sentence
#: ("on 08/29/1951."); followed by a digit it is part of a longer number.
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december")
_MONTH = r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?" \
         r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
_TEXT_DATE = re.compile(
    r"(?<!\d)(?<!\d\.)(?:(?P<y1>(?:19|20)\d\d)(?P<s1>[-/.])(?P<m1>\d{1,2})(?P=s1)(?P<d1>\d{1,2})"
    r"|(?P<a2>\d{1,2})(?P<s2>[-/.])(?P<b2>\d{1,2})(?P=s2)(?P<y2>(?:19|20)\d\d)"
    r"|(?P<a3>\d{1,2})/(?P<b3>\d{1,2})/(?P<y3>\d\d)"
    r"|(?P<a9>\d\d)(?P<s9>[-.])(?P<b9>\d\d)(?P=s9)(?P<y9>\d\d)"  # 14.03.61, 14-03-61
    r"|(?P<y4>(?:19|20)\d\d)(?P<m4>0[1-9]|1[0-2])(?P<d4>0[1-9]|[12]\d|3[01]))(?!\d|\.\d)"
    # 17 May 2023, 17-MAY-2023, 17MAY2023; May 17, 2023, Sept. 3rd 2021
    rf"|(?<![\w.])(?P<d5>\d{{1,2}})(?P<o5>st|nd|rd|th)?(?: of)?[ -]?(?P<n5>(?i:{_MONTH}))\.?[ ,-]*"
    r"(?P<y5>(?:19|20)\d\d)(?!\d)"  # ... 14th of March 1961
    rf"|(?<![\w.])(?P<d8>\d{{1,2}})(?P<s8>[ -]?)(?P<n8>(?i:{_MONTH}))(?P=s8)(?P<y8>\d\d)(?!\w)"  # 14-MAR-61
    rf"|(?<![\w.])(?P<n6>(?i:{_MONTH}))\.? ?(?P<d6>\d{{1,2}})(?P<o6>st|nd|rd|th)?,? (?P<y6>(?:19|20)\d\d)(?!\d)"
    # May 2023, SEP-2021 (a month and a year)
    rf"|(?<![\w.])(?P<n7>(?i:{_MONTH}))\.?[ ,-]*(?P<y7>(?:19|20)\d\d)(?!\d)"
)


def _replace_text_date(m: re.Match[str], shift_days: int | None) -> str:
    """A date found in free text, shifted in its own spelling (or removed without a shift)."""
    g = m.groupdict()
    if g["n5"] or g["n6"] or g["n8"]:
        return _replace_named_month_date(m, shift_days)
    if g["n7"]:
        return _replace_month_and_year(m, shift_days)
    if g["y1"]:
        order, year, parts, sep = "ymd", int(g["y1"]), (int(g["m1"]), int(g["d1"])), g["s1"]
    elif g["y4"]:
        order, year, parts, sep = "ymd", int(g["y4"]), (int(g["m4"]), int(g["d4"])), ""
    else:
        if g["y2"]:
            a, b, year, sep = int(g["a2"]), int(g["b2"]), int(g["y2"]), g["s2"]
        else:  # a two-digit year
            k = "3" if g["y3"] else "9"
            a, b, year, sep = int(g[f"a{k}"]), int(g[f"b{k}"]), _century(g[f"y{k}"]), g["s9"] or "/"
        order, parts = ("mdy", (a, b)) if a <= 12 and (b > 12 or sep == "/") else ("dmy", (b, a))
    try:
        original = dt.date(year, *parts)
    except ValueError:
        return m.group(0)  # not a date after all (a ratio, a version number ...)
    if shift_days is None:
        return ""
    new = original - dt.timedelta(days=shift_days)
    text = m.group(0)
    width = lambda i: len(text.split(sep)[i]) if sep else 2  # noqa: E731
    if g["y4"]:
        return new.strftime("%Y%m%d")
    year_text = f"{new.year:04d}" if not (g["y3"] or g["y9"]) else f"{new.year % 100:02d}"
    if order == "ymd":
        return sep.join((year_text, f"{new.month:0{width(1)}d}", f"{new.day:0{width(2)}d}"))
    if order == "mdy":
        return sep.join((f"{new.month:0{width(0)}d}", f"{new.day:0{width(1)}d}", year_text))
    return sep.join((f"{new.day:0{width(0)}d}", f"{new.month:0{width(1)}d}", year_text))


def _replace_named_month_date(m: re.Match[str], shift_days: int | None) -> str:
    """"17 May 2023", "May 17, 2023" ...: shifted in place, the month in its own spelling."""
    n = "5" if m.group("n5") else "6" if m.group("n6") else "8"
    day, name, year = m.group(f"d{n}"), m.group(f"n{n}"), m.group(f"y{n}")
    if n == "8" and name == "may":
        return m.group(0)  # "3 may 12": the verb
    month = _month_number(name)
    try:
        original = dt.date(_century(year) if n == "8" else int(year), month, int(day))
    except ValueError:
        return m.group(0)
    if shift_days is None:
        return ""
    new = original - dt.timedelta(days=shift_days)
    parts = [(f"d{n}", f"{new.day:0{len(day)}d}"), (f"n{n}", _spell_month(new.month, name)),
             (f"y{n}", f"{new.year % 100:02d}" if n == "8" else f"{new.year:04d}")]
    ordinal = m.group(f"o{n}") if n in ("5", "6") else None
    if ordinal:
        suffix = "th" if 10 <= new.day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(new.day % 10, "th")
        parts.append((f"o{n}", suffix.upper() if ordinal.isupper() else suffix))
    return _with_groups(m, parts)


def _century(year: str) -> int:
    """A two-digit year as people mean it: 00-49 this century, 50-99 the last."""
    return 2000 + int(year) if int(year) < 50 else 1900 + int(year)


def _with_groups(m: re.Match[str], parts: list[tuple[str, str]]) -> str:
    """The match's text with each named group in parts replaced by its new value."""
    start, text = m.start(), m.group(0)
    for group, value in sorted(parts, key=lambda gv: m.start(gv[0]), reverse=True):
        a, b = m.start(group) - start, m.end(group) - start
        text = text[:a] + value + text[b:]
    return text


def _month_number(name: str) -> int:
    """1-12 for a month name or its abbreviation (any case)."""
    return next(i for i, full in enumerate(_MONTHS, 1) if full.startswith(name.lower()[:3]))


def _spell_month(month: int, like: str) -> str:
    """Month number month written as the month name like was: full or three letters, in
    its case."""
    full = _MONTHS[month - 1]
    spelled = full if len(like) > 4 or like.lower() in _MONTHS else full[:3]  # "May", "June": full names
    return spelled.upper() if like.isupper() else spelled.capitalize() if like[0].isupper() else spelled


def _replace_month_and_year(m: re.Match[str], shift_days: int | None) -> str:
    """"May 2023": the month and year the 15th of that month is shifted to, in the same
    spelling (or removed without a shift). The word "may" in lower case is a verb, left
    alone."""
    name, year = m.group("n7"), int(m.group("y7"))
    if name == "may":
        return m.group(0)
    if shift_days is None:
        return ""
    new = dt.date(year, _month_number(name), 15) - dt.timedelta(days=shift_days)
    return _with_groups(m, [("n7", _spell_month(new.month, name)), ("y7", f"{new.year:04d}")])


#: The value representations of PS3.5 6.2: an explicit VR outside them means the data set
#: is damaged, and whatever its length swallowed (other elements, PHI) cannot be judged.
VALID_VRS = frozenset(vr.value for vr in VR)  # with the dictionary's ambiguous "US or SS"


def _vr(raw, tag: int) -> str | None:
    vr = raw.VR if raw is not None else None
    if vr and vr != "UN":
        if vr not in VALID_VRS:
            raise InstanceRefused("malformed element: invalid value representation")
        return vr
    known = _dictionary_vr(tag)
    return vr if known is None else known  # "UN" stays UN; None (implicit, unknown tag) stays None


@functools.lru_cache(maxsize=8192)
def _dictionary_vr(tag: int) -> str | None:
    """The data dictionary's VR (the first of "US or SS"), None if not in it. Cached: the
    dictionary's lookup converts the tag and checks repeating groups (~4 us, ~100 per instance)."""
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return None


#: C0 control characters no string value holds (PS3.5 6.1.3; ESC, TAB, LF, FF, CR allowed).
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f]")
_NUMERIC_SIZES = {"FL": 4, "FD": 8, "SL": 4, "SS": 2, "UL": 4, "US": 2, "SV": 8, "UV": 8, "AT": 4}


def _overrun(raw, tag: int, vr: str) -> bool:
    """Whether a value cannot be what its VR says: a wrong declared length made it swallow
    the elements that followed (binary tags in a string, too many numbers). Kept as it is,
    it would carry those elements, PHI included, past the profile."""
    value = raw.value if raw is not None else None
    if value is None or vr == "SQ" or vr in BINARY_VRS or " or " in vr:
        return False
    if vr in _NUMERIC_SIZES:
        if isinstance(value, (bytes, bytearray)):
            if len(value) % _NUMERIC_SIZES[vr]:
                return True
            count = len(value) // _NUMERIC_SIZES[vr]
        else:
            count = len(value) if isinstance(value, (list, tuple, MultiValue)) else 1
        return count > _max_vm(tag)
    if not isinstance(value, (bytes, bytearray)):
        items = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        value = "\\".join(str(v) for v in items).encode("utf-8", "replace")
    return _CONTROL.search(value.rstrip(b"\x00 ")) is not None


def _in_dictionary(tag: int) -> bool:
    return _dictionary_vr(tag) is not None  # repeating groups included


@functools.lru_cache(maxsize=8192)
def _max_vm(tag: int) -> float:
    """The largest value multiplicity the data dictionary allows (infinite if open or unknown)."""
    try:
        vm = dictionary_VM(tag)
    except KeyError:
        return float("inf")
    last = vm.rsplit("-", 1)[-1]
    return float(last) if last.isdigit() else float("inf")


def _get(ds: Dataset, tag: int):
    """``ds.get_item(tag)`` for an int tag, without pydicom's argument conversion (~2 us,
    and the engine looks elements up ~500 times per instance). A plain int is looked up
    as the BaseTag object the reader keyed the element with (``router.decode.TAGS``)."""
    return ds._dict.get(TAGS.get(tag, tag) if type(tag) is int else tag)


def _holds_identifying_text(raw, scrub: re.Pattern[str] | None) -> bool:
    """Does a binary value contain one of the instance's identifying values, as ASCII,
    Latin-1 or UTF-8 text?"""
    value = raw.value if isinstance(raw, (RawDataElement, DataElement)) else None
    if scrub is None or not isinstance(value, (bytes, bytearray)) or not value:
        return False
    if scrub.search(value.decode("latin-1")):
        return True
    return not value.isascii() and scrub.search(value.decode("utf-8", "ignore")) is not None


def _strings(raw) -> list[str]:
    """The values of a string element, decoded as ASCII-compatible text."""
    if raw is None:
        return []
    value = raw.value
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("latin-1").rstrip("\0 ").split("\\")
    elif isinstance(value, str) or not isinstance(value, (list, MultiValue)):
        value = [str(value)]
    return [str(v).strip("\0 ") for v in value]


def _decoded(ds: Dataset, tag: int) -> list[str]:
    """The values of a text element, decoded with the dataset's character set."""
    if tag not in ds._dict:
        return []
    raw = _get(ds, tag)
    if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
        try:
            encodings = ds._character_set
            text = decode_bytes(raw.value, [encodings] if isinstance(encodings, str) else encodings, {0x5C, 0x5E, 0x3D})
        except (LookupError, ValueError):
            text = raw.value.decode("latin-1")
        return [v.strip("\0 ") for v in text.split("\\") if v.strip("\0 ")]
    return [v for v in _strings(ds[tag]) if v]


def _text(ds: Dataset, tag: int) -> str:
    values = _strings(_get(ds, tag)) if tag in ds._dict else []
    return values[0] if values else ""


def _items(ds: Dataset, tag: int) -> list[Dataset]:
    """A sequence's items, read without converting the element in ds (which would keep a
    repeated sequence from being de-identified once and reused, see ``_sequence_key``)."""
    elem = ds._dict.get(tag)
    if elem is None:
        return []
    try:
        if isinstance(elem, RawDataElement):
            elem = convert_raw_data_element(elem, encoding=ds.original_character_set or ds._character_set, ds=ds)
        value = elem.value
    except Exception:  # noqa: BLE001 - an unreadable sequence has no usable items
        return []
    return list(value) if isinstance(value, Sequence) else []


def _vm(values: list):
    return values[0] if len(values) == 1 else (values or None)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _safe_message(exc: BaseException) -> str:
    """An exception's message without quoted values (which may hold header text)."""
    text = re.sub(r"(['\"]).*?\1", "'…'", str(exc))
    text = re.sub(r"b'…'|\\x[0-9a-f]{2}", "…", text)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _with_sizes(result: InstanceResult, bytes_in: int, bytes_out: int) -> InstanceResult:
    return InstanceResult(**{**result.__dict__, "bytes_in": bytes_in, "bytes_out": bytes_out})
