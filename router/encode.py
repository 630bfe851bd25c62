"""Encoding a de-identified dataset to Part 10 bytes, copying what was kept verbatim.

pydicom's writer spends ~100 us per element even on elements it only copies; the engine
keeps most of an instance's elements as raw bytes (never converted), so here those are
written back as they came (tag, VR, length, value) and only the elements the engine
created or changed go through pydicom's ``write_data_element``. A dataset whose encoding
changes (implicit -> explicit VR, another character set) is written by pydicom entirely.
The output is byte for byte what ``Dataset.save_as(enforce_file_format=True)`` writes (a
test checks this over the corpus); sequences and items are written with undefined
lengths, as pydicom does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.uid import ImplicitVRLittleEndian

#: Explicit VR: these VRs have a 2-byte reserved field and a 4-byte length.
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"})
#: VRs whose values pydicom holds as str and which are written as the string, padded.
ASCII_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
#: Binary VRs whose values pydicom writes as the bytes they hold.
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: Binary number VRs written here with struct (little endian), by their struct code.
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
UNDEFINED = 0xFFFFFFFF
ITEM_START = struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED)
ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
PREAMBLE = b"\0" * 128 + b"DICM"
PIXEL_DATA = 0x7FE00010

_implicit_header = _item_header = struct.Struct("<HHI").pack


class EncodedFrames:
    """Encapsulated Pixel Data whose frames are encoded while the file is written: one
    frame's encoding in memory, not a whole clip's beside its decoded frames. The Basic
    Offset Table (PS3.5 A.4) is written as zeros, then filled in once the frames are: the
    output must be seekable. ``value()`` gives the whole value, for pydicom's writer. The
    frames are encoded once: written, or made a value, not both."""

    def __init__(self, count: int, frames: Iterator[bytes]):
        self.count = count
        self.frames = frames  # each frame's encoded bytes, in order

    def write(self, out: BinaryIO) -> None:
        start = out.tell()
        out.write(self._table([0] * self.count))
        offsets = []
        for item in self._items(offsets):
            out.write(item)
        end = out.tell()
        out.seek(start)
        out.write(self._table(offsets))
        out.seek(end)

    def value(self) -> bytes:
        offsets: list[int] = []
        items = b"".join(self._items(offsets))
        return self._table(offsets) + items

    def _table(self, offsets: list[int]) -> bytes:
        return _item_header(0xFFFE, 0xE000, 4 * self.count) + struct.pack(f"<{self.count}I", *offsets)

    def _items(self, offsets: list[int]) -> Iterator[bytes]:
        """Each frame as one item (odd lengths padded), noting where each starts."""
        position = 0
        for frame in self.frames:
            if len(offsets) == self.count or position > 0xFFFFFFFF:
                raise ValueError("more frames than Number of Frames, or offsets past 4 GB")
            offsets.append(position)
            padded = len(frame) + (len(frame) & 1)
            yield _item_header(0xFFFE, 0xE000, padded)
            yield frame
            if len(frame) & 1:
                yield b"\0"
            position += 8 + padded
        if len(offsets) != self.count:
            raise ValueError(f"{len(offsets)} frames encoded of the {self.count} Number of Frames says")


def materialized(ds: Dataset) -> None:
    """Replace EncodedFrames values by their bytes: for pydicom's writer."""
    for tag, elem in ds._dict.items():
        if isinstance(getattr(elem, "value", None), EncodedFrames):
            ds._dict[tag] = DataElement(tag, elem.VR, elem.value.value(), is_undefined_length=True,
                                        already_converted=True)


def write_chunks(out: BinaryIO, chunks: list) -> None:
    """Write what ``part10_bytes`` gives: bytes, and EncodedFrames written frame by frame."""
    run: list = []
    for chunk in chunks:
        if isinstance(chunk, EncodedFrames):
            out.writelines(run)
            run = []
            chunk.write(out)
        else:
            run.append(chunk)
    out.writelines(run)
_explicit_short = struct.Struct("<HH2sH").pack
_explicit_long = struct.Struct("<HH2s2xI").pack


class ConstantElement(DataElement):
    """An element with the same value in every instance (the de-identification marks).

    Encoded once per encoding and reused; never modify one after it was first written.
    """

    def __init__(self, tag: int, vr: str, value) -> None:
        super().__init__(tag, vr, value)
        self.encoded: dict[tuple, bytes] = {}


def fast_syntax(transfer_syntax: str) -> bool | None:
    """Whether the dataset of this transfer syntax is implicit VR; None if not handled here.

    Every syntax but implicit VR, big endian and deflate encodes the dataset as explicit
    VR little endian (only the pixel data differs).
    """
    if transfer_syntax == ImplicitVRLittleEndian:
        return True
    if transfer_syntax in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):
        return None  # big endian, deflated dataset: pydicom's writer
    return False


#: File meta elements encoded by hand (element number -> VR); others go to pydicom.
_META_VRS = {0x0002: "UI", 0x0003: "UI", 0x0010: "UI", 0x0012: "UI", 0x0013: "SH", 0x0016: "AE"}
_META_VERSION = struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01"


def file_meta_group(meta) -> bytes | None:
    """The File Meta Information group (with its group length and version) of a
    FileMetaDataset holding the usual elements, encoded as pydicom's ``write_file_meta_info``
    does, ~50x faster; None for anything else (pydicom then writes it)."""
    items = []
    for elem in meta:
        if elem.tag == 0x00020000 or (elem.tag == 0x00020001 and elem.value == b"\x00\x01"):
            continue  # the group length is recomputed, the version is always 00 01
        if elem.tag >> 16 != 0x0002:
            return None
        items.append((elem.tag & 0xFFFF, elem.VR, elem.value))
    return meta_group(items)


def meta_group(items) -> bytes | None:
    """The File Meta Information group of (element number, VR, value) items; empty values
    are left out. None unless every item is an ASCII string of the VR it must have.
    Runs once per instance on receive and on write."""
    body = [_META_VERSION]
    for number, vr, value in sorted(items):
        if not value:
            continue
        if _META_VRS.get(number) != vr or not isinstance(value, str) or not value.isascii():
            return None
        body.append(meta_element(number, vr, value))
    data = b"".join(body)
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(data)) + data


def meta_element(number: int, vr: str, value: str) -> bytes:
    """One (0002,xxxx) UI/SH/AE element, explicit VR little endian, padded as pydicom pads."""
    data = value.encode("ascii", "replace")
    if len(data) & 1:
        data += b"\0" if vr == "UI" else b" "
    return _explicit_short(0x0002, number, vr.encode("ascii"), len(data)) + data


#: The file meta UIDs ``read_meta_uids`` returns, by element number.
_META_UIDS = {0x0002: "MediaStorageSOPClassUID", 0x0003: "MediaStorageSOPInstanceUID", 0x0010: "TransferSyntaxUID"}
_meta_header = struct.Struct("<HH2sH")


def read_meta_uids(path) -> tuple[dict[str, str], int] | None:
    """The SOP class, SOP instance and transfer syntax UIDs of a Part 10 file's meta group,
    and where its dataset starts; None for a file not laid out as ``meta_group`` writes
    (pydicom reads those). ~20 us instead of pydicom's ~300 us: the forwarder reads every
    outgoing file's meta before it sends it."""
    with open(path, "rb") as f:
        head = f.read(2048)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        return None
    end = 144 + struct.unpack_from("<I", head, 140)[0]
    if end + 2 > len(head) or struct.unpack_from("<H", head, end)[0] == 0x0002:
        return None  # a group longer than read, or a group length that stops short
    values: dict[str, str] = {}
    offset = 144
    while offset < end:
        group, number, vr, length = _meta_header.unpack_from(head, offset)
        offset += 8
        if vr in (b"OB", b"UN", b"UT", b"UC", b"UR"):  # 2 reserved bytes (read as length), then 4 of length
            length = struct.unpack_from("<I", head, offset)[0]
            offset += 4
        if group != 0x0002:
            return None
        if number in _META_UIDS:
            values[_META_UIDS[number]] = head[offset:offset + length].decode("ascii", "replace").rstrip("\0 ")
        offset += length
    return (values, end) if offset == end else None


def part10_bytes(ds: Dataset, implicit: bool) -> list:
    """Preamble, file meta and dataset of ``ds`` (meta from ``ds.file_meta``), as chunks:
    bytes, and EncodedFrames (``write_chunks`` writes both)."""
    group = file_meta_group(ds.file_meta)
    if group is None:
        meta = DicomBytesIO()
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        group = meta.getvalue()
    chunks = [PREAMBLE, group]
    _encode(ds, implicit, "iso8859", chunks)
    return chunks


def _encode(ds: Dataset, implicit: bool, parent_encoding, out: list[bytes]) -> int:
    """Append the encoded elements of ds to out; returns how many bytes that was."""
    if ds.original_encoding not in ((implicit, True), (None, None)) or ds.original_character_set != ds._character_set:
        materialized(ds)
        data = _pydicom_dataset(ds, implicit, parent_encoding)
        out.append(data)
        return len(data)
    encodings = None
    elements = ds._dict
    size = 0
    for tag in sorted(elements, key=int):  # key=int: BaseTag's __lt__ is Python, 3x slower
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # retired group lengths are never written (PS3.5 7.2)
        elem = elements[tag]
        if isinstance(elem, RawDataElement):
            value = elem.value or b""
            vr = elem.VR
            if implicit or (vr and vr not in ("SQ", "UN")):
                if elem.length != UNDEFINED and not len(value) & 1 and vr != "SQ":
                    header = element_header(tag, vr, len(value), implicit)
                    out += (header, value)
                    size += len(header) + len(value)
                    continue
                if tag == PIXEL_DATA and elem.length == UNDEFINED:
                    header = element_header(tag, vr, UNDEFINED, implicit)  # encapsulated: the items as read
                    out += (header, value, SEQUENCE_END)
                    size += len(header) + len(value) + len(SEQUENCE_END)
                    continue
            elem = ds[tag]  # converted: UN gets its dictionary VR, as pydicom writes it
        if encodings is None:
            encodings = ds.get("SpecificCharacterSet", parent_encoding)
        if type(elem) is ConstantElement:
            key = (implicit, str(encodings))
            data = elem.encoded.get(key)
            if data is None:
                chunks: list[bytes] = []
                _encode_converted(tag, elem, implicit, encodings, chunks)
                data = elem.encoded[key] = b"".join(chunks)
            out.append(data)
            size += len(data)
        else:
            size += _encode_converted(tag, elem, implicit, encodings, out)
    return size


def _encode_converted(tag: int, elem: DataElement, implicit: bool, encodings, out: list[bytes]) -> int:
    """An element pydicom holds converted: sequences item by item, others by pydicom."""
    vr = elem.VR
    if vr == "SQ":
        return _sequence(tag, elem, implicit, encodings, out)
    value = elem.value
    if isinstance(value, EncodedFrames):  # top level only: its length is known once written
        out += (element_header(tag, vr, UNDEFINED, implicit), value, SEQUENCE_END)
        return 0
    if vr in ASCII_TEXT_VRS:
        data = _ascii_value(value, vr)
    elif vr in _NUMBER_FORMATS:
        data = _number_value(value, _NUMBER_FORMATS[vr])
    elif vr == "PN":
        data = _ascii_value(str(value) if isinstance(value, PersonName) else value, vr)
    elif vr in _BYTES_VRS and type(value) in (bytes, bytearray) and not len(value) & 1 \
            and (tag == PIXEL_DATA or not elem.is_undefined_length):
        # Pixel data (masked, or converted to be looked at) as it is: pydicom's writer would
        # copy it twice, a second and third copy of a large instance in memory.
        if elem.is_undefined_length:  # encapsulated: its items as they are, then the delimiter
            header = element_header(tag, vr, UNDEFINED, implicit)
            out += (header, value, SEQUENCE_END)
            return len(header) + len(value) + len(SEQUENCE_END)
        data = value
    else:
        data = None
    if data is not None and (implicit or vr in LONG_VRS or len(data) <= 0xFFFF):
        header = element_header(tag, vr, len(data), implicit)
        out += (header, data)
        return len(header) + len(data)
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, True
    write_data_element(fp, elem, encodings)
    data = fp.getvalue()
    out.append(data)
    return len(data)


def _sequence(tag: int, elem: DataElement, implicit: bool, encodings, out: list[bytes]) -> int:
    """A sequence with its items, defined or undefined lengths as pydicom writes them."""
    body: list[bytes] = []
    length = 0
    for item in elem.value or ():
        content: list[bytes] = []
        item_length = _encode(item, implicit, encodings, content)
        if getattr(item, "is_undefined_length_sequence_item", False):
            body += (ITEM_START, *content, ITEM_END)
            length += item_length + 16
        else:
            body += (_item_header(0xFFFE, 0xE000, item_length), *content)
            length += item_length + 8
    if elem.is_undefined_length:
        header = element_header(tag, "SQ", UNDEFINED, implicit)
        out += (header, *body, SEQUENCE_END)
        return len(header) + length + len(SEQUENCE_END)
    header = element_header(tag, "SQ", length, implicit)
    out += (header, *body)
    return len(header) + length


def _ascii_value(value, vr: str) -> bytes | None:
    """A string value (or list of them) that is plain ASCII, encoded and padded; else None."""
    if value is None:
        return b""
    if not isinstance(value, str):
        if not isinstance(value, (list, MultiValue)) or not all(isinstance(v, str) for v in value):
            return None
        value = "\\".join(value)
    if not value.isascii():
        return None  # the character set decides: pydicom's writer
    data = value.encode("ascii")
    if len(data) & 1:
        data += b"\0" if vr == "UI" else b" "
    return data


def _number_value(value, code: str) -> bytes | None:
    """Binary numbers (an int or float, or a list of them), little endian; else None."""
    if value is None:
        return b""
    values = value if isinstance(value, (list, MultiValue)) else (value,)
    if not all(type(v) is int or (type(v) is float and code in "fd") for v in values):
        return None  # anything else (numpy numbers, bools...): pydicom's writer
    return struct.pack(f"<{len(values)}{code}", *values)


def element_header(tag: int, vr: str, length: int, implicit: bool) -> bytes:
    if implicit:
        return _implicit_header(tag >> 16, tag & 0xFFFF, length)
    if vr in LONG_VRS:
        return _explicit_long(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)
    return _explicit_short(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)


def _pydicom_dataset(ds: Dataset, implicit: bool, parent_encoding) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, True
    write_dataset(fp, ds, parent_encoding)
    return fp.getvalue()

