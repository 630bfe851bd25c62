"""Reading a Part 10 file into the dataset pydicom's ``dcmread`` would give, faster.

pydicom reads a file element by element through a buffered file: two reads and a
``tell`` (an ``lseek`` system call) per element, ~0.5 ms for a CT slice's 120 elements,
a sixth of what a worker spends on a slice. Here the file's head is read in one call and
its elements are cut out of those bytes; the last element (the pixel data, as a rule) is
read straight from the file into its own bytes (Pixel Data into a bytearray: the pixel
stage masks native pixels in place), so a large instance costs no more memory than with
pydicom. The result is what ``dcmread(path, force=True)`` returns for the same
file: the same raw elements (tag, VR, length, value, position), undefined-length
sequences parsed by pydicom's own ``read_sequence``, the same file meta and encoding (a
test compares both over the corpus and damaged files). Whatever is not the common shape
(big endian, deflate, no preamble, a command set, an unknown VR, a truncated value, an
undefined length on anything but pixel data and sequences, an element past the head that
is not the last...) returns None and is read by pydicom, which then decides how it fails.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

from pydicom.config import settings
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import dcmread, read_sequence
from pydicom.tag import BaseTag
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian,
                         PrivateTransferSyntaxes)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pydicom.values import convert_string

#: Read in one call: a CT slice's header and more. What lies beyond is the last element's
#: value (read on its own) or the rest of the file.
HEAD_BYTES = 256 * 1024
UNDEFINED = 0xFFFFFFFF
CHARSET = 0x00080005
PIXEL_DATA = 0x7FE00010
ITEM = 0xFFFEE000
#: An item tag as it is written (little endian): what encapsulated pixel data are made of.
ITEM_TAG = struct.pack("<HH", 0xFFFE, 0xE000)
SEQUENCE_END = 0xFFFEE0DD

_VRS = {str(vr).encode(): str(vr) for vr in VR}
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_explicit = struct.Struct("<HH2sH").unpack_from
_implicit = struct.Struct("<HHL").unpack_from
_long_length = struct.Struct("<L").unpack_from
_NOT_HERE = frozenset({ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, *PrivateTransferSyntaxes})


#: One BaseTag object per tag number read. A dict lookup by a plain int finds a BaseTag key
#: only through BaseTag.__eq__ (Python, ~200 ns); by the key object itself it takes ~40 ns,
#: and the engine looks elements up several hundred times per instance.
TAGS: dict[int, BaseTag] = {}
TAGS_HELD = 1 << 16


def tag_object(number: int) -> BaseTag:
    """The BaseTag object for this tag number (the same one every time, while room lasts)."""
    tag = TAGS.get(number)
    if tag is None:
        tag = BaseTag(number)
        if len(TAGS) < TAGS_HELD:
            TAGS[number] = tag
    return tag


class _NotCommon(Exception):
    """The file is not of the shape read here: pydicom reads it."""


def read_part10(path: Path | str) -> FileDataset | None:
    """The file's dataset as ``dcmread(path, force=True)`` gives it, or None (not handled)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(min(size, HEAD_BYTES))
        if len(head) < 132 or head[128:132] != b"DICM":
            return None
        try:
            meta_elements, pos = _elements(head, 132, False, f, size, meta=True)
            file_meta = FileMetaDataset(meta_elements)
            file_meta.set_original_encoding(False, True, default_encoding)
            if not file_meta._dict:
                return None
            file_meta[next(iter(file_meta._dict))]  # as pydicom does: converts the first
            syntax = file_meta.get("TransferSyntaxUID")
            if syntax is None or syntax in _NOT_HERE or pos + 6 > len(head):
                return None
            implicit = syntax == ImplicitVRLittleEndian
            if implicit == all(0x40 < byte < 0x5B for byte in head[pos + 4:pos + 6]):
                return None  # explicit VR under an implicit syntax or the reverse: pydicom guesses
            elements, _end = _elements(head, pos, implicit, f, size)
        except _NotCommon:
            return None
    dataset = Dataset(elements, parent_encoding=default_encoding)
    encoding = default_encoding
    if CHARSET in elements:
        encoding = convert_encodings(convert_raw_data_element(elements[CHARSET]).value)
    dataset.set_original_encoding(implicit, True, encoding)
    ds = FileDataset(str(path), dataset, head[:128], file_meta, implicit, True)
    ds.set_original_encoding(implicit, True, dataset._character_set)
    return ds


def _elements(head: bytes, pos: int, implicit: bool, f, size: int, meta: bool = False
              ) -> tuple[dict, int]:
    """The elements from pos: of group 0002 only (meta), or to the end of the file."""
    elements: dict = {}
    encoding: str | list[str] = default_encoding
    limit = len(head)
    while pos < size:
        if pos + 8 > limit:
            raise _NotCommon  # a header beyond the head, or trailing bytes
        if meta and head[pos:pos + 2] != b"\x02\x00":
            return elements, pos  # the end of group 0002, whatever the dataset's encoding
        if implicit:
            group, number, length = _implicit(head, pos)
            vr = None
            start = pos + 8
        else:
            group, number, code, length = _explicit(head, pos)
            vr = _VRS.get(code)
            if vr is None:
                raise _NotCommon
            if vr in _LONG_VRS:
                if pos + 12 > limit:
                    raise _NotCommon
                length = _long_length(head, pos + 8)[0]
                start = pos + 12
            else:
                start = pos + 8
        tag = group << 16 | number
        if group == 0 or tag == 0xFFFEE00D:
            raise _NotCommon  # a command set, or a stray delimiter
        if length == UNDEFINED:
            element, pos = _undefined_length(head, start, tag, vr, implicit, encoding, size)
            elements[tag_object(tag)] = element
            continue
        end = start + length
        if end <= limit and tag == PIXEL_DATA and length:
            value = bytearray(head[start:end])  # masked in place, as below
        elif end <= limit:
            value = head[start:end] if length else empty_value_for_VR(vr, raw=True)
        elif end == size and start <= limit:
            f.seek(start)
            # the last element: its own bytes, no copy of the head; pixel data in a
            # bytearray, which the pixel stage masks in place (``router.pixels``)
            if tag == PIXEL_DATA:
                value = bytearray(length)
                got = f.readinto(value)
            else:
                value = f.read(length)
                got = len(value)
            if got != length:
                raise _NotCommon
        else:
            raise _NotCommon  # an element ending past the head before the file's end
        if tag == CHARSET:
            encoding = convert_encodings(convert_string(value or b"", True))
        key = tag_object(tag)
        elements[key] = RawDataElement(key, vr, length, value, start, implicit, True)
        pos = end
    if pos != size:
        raise _NotCommon
    return elements, pos


def _undefined_length(head: bytes, start: int, tag: int, vr: str | None, implicit: bool,
                      encoding, size: int) -> tuple[RawDataElement | DataElement, int]:
    """An undefined-length sequence (parsed by pydicom) or encapsulated pixel data."""
    if vr == VR.UN and settings.infer_sq_for_un_vr:
        vr = VR.SQ
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise _NotCommon from None
    if vr == VR.SQ:
        fp = DicomBytesIO(head)
        fp.is_little_endian, fp.is_implicit_VR = True, implicit
        fp.seek(start)
        try:
            sequence = read_sequence(fp, implicit, True, UNDEFINED, encoding)
        except Exception:  # noqa: BLE001 - damaged or past the head: pydicom reads the file
            raise _NotCommon from None
        if fp.tell() >= len(head) and len(head) < size:
            raise _NotCommon  # it may run on past the head: cut short here, not in the file
        return DataElement(tag_object(tag), vr, sequence, start, is_undefined_length=True), fp.tell()
    if tag != PIXEL_DATA or implicit:
        raise _NotCommon
    pos = start
    limit = len(head)
    while True:  # items of fragments, up to the sequence delimiter
        if pos + 8 > limit:
            raise _NotCommon
        group, number, length = _implicit(head, pos)
        item = group << 16 | number
        if item == SEQUENCE_END and length == 0:
            value = head[start:pos]
            return RawDataElement(tag_object(tag), vr, UNDEFINED, value, start, False, True), pos + 8
        if item != ITEM or length == UNDEFINED:
            raise _NotCommon
        pos += 8 + length


#: Files smaller than this are not looked into for compressed pixel data.
ESTIMATE_MIN_BYTES = 4 * 1024 * 1024


def decoded_pixel_bytes(path: Path | str, size: int) -> int:
    """The size of the file's pixel data decoded, where they are encapsulated (compressed)
    and the file is ESTIMATE_MIN_BYTES or more, else 0. A worker that cleans them holds them
    decoded beside the file (and encodes them again a frame at a time): a 29 MB JPEG clip
    decodes to 184 MB. Only the first HEAD_BYTES are read: a Part 10 header (the file meta
    says the transfer syntax); 0 when that says nothing usable."""
    if size < ESTIMATE_MIN_BYTES:
        return 0
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
        ds = dcmread(io.BytesIO(head), stop_before_pixels=True,
                     specific_tags=[0x00280002, 0x00280008, 0x00280010, 0x00280011, 0x00280100])
        if not ds.file_meta.TransferSyntaxUID.is_encapsulated:
            return 0
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) \
            * max(1, (int(ds.BitsAllocated) + 7) // 8) * max(1, frames)
    except Exception:  # noqa: BLE001 - not readable here: the worker will say why
        return 0
