"""Seeded damage to DICOM data sets, for sending malformed input to the node.

``mutants(bases, count, seed)`` yields ``count`` damaged copies of the given well-formed
instances (Explicit VR Little Endian data sets), each with the transfer syntax it is to
be sent as: truncated, wrong or huge declared lengths, bad VRs, deeply nested sequences,
garbage in values, absurd image dimensions, elements out of order or repeated, a
transfer syntax that does not match the encoding... Deterministic for a seed (every
random choice, garbage bytes included, comes from one ``random.Random``).

``part10(mutant)`` is a file pynetdicom can send as it is (its file meta names the SOP
class, instance and transfer syntax; the data set bytes follow, untouched).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
#: Transfer syntaxes a damaged instance may claim (with Explicit VR LE bytes inside).
WRONG_SYNTAXES = (IMPLICIT_LE, EXPLICIT_BE, DEFLATED, JPEG_BASELINE, JPEG2000_LOSSLESS, RLE)
SYNTAXES = (EXPLICIT_LE, *WRONG_SYNTAXES)

#: VRs whose length field is 4 bytes (after 2 reserved bytes) in explicit VR.
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
TEXT_VRS = {b"AE", b"AS", b"CS", b"DA", b"DS", b"DT", b"IS", b"LO", b"LT", b"PN", b"SH", b"ST", b"TM", b"UI",
            b"UC", b"UT"}
UNDEFINED = 0xFFFFFFFF
ITEM = b"\xfe\xff\x00\xe0"
ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


@dataclass(frozen=True)
class Base:
    """A well-formed instance: its UIDs and its data set, Explicit VR Little Endian."""

    sop_class: str
    sop_instance: str
    data: bytes


@dataclass(frozen=True)
class Mutant:
    kind: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    data: bytes


@dataclass(frozen=True)
class Element:
    """A top-level data element: where its header starts, its value starts and ends."""

    start: int
    tag: tuple[int, int]
    vr: bytes
    value_start: int
    length: int

    @property
    def end(self) -> int:
        return self.value_start + self.length

    @property
    def long_form(self) -> bool:
        return self.vr in LONG_VRS

    @property
    def length_at(self) -> int:
        return self.start + (8 if self.long_form else 6)


def elements(data: bytes) -> list[Element]:
    """The top-level elements of an Explicit VR Little Endian data set (undefined-length
    sequences skipped to their delimiter)."""
    result, at = [], 0
    while at + 8 <= len(data):
        group, number = struct.unpack_from("<HH", data, at)
        vr = data[at + 4:at + 6]
        if vr in LONG_VRS:
            length = struct.unpack_from("<I", data, at + 8)[0]
            value_start = at + 12
        else:
            length = struct.unpack_from("<H", data, at + 6)[0]
            value_start = at + 8
        if length == UNDEFINED:
            end = data.find(SEQUENCE_END, value_start)
            if end < 0:
                break
            length = end + len(SEQUENCE_END) - value_start
        result.append(Element(at, (group, number), vr, value_start, length))
        at = value_start + length
    return result


def garbage(rng: random.Random, size: int) -> bytes:
    """Bytes a broken device might put in a value: NULs, escapes, backslashes, high bytes."""
    alphabet = b"\x00\x1b\\^=$()*+,-./0123456789ABCZabcz \x7f\x80\x8e\xa0\xc3\xe9\xff"
    return bytes(rng.choice(alphabet) if rng.random() < 0.7 else rng.randrange(256) for _ in range(size))


def header(tag: tuple[int, int], vr: bytes, length: int) -> bytes:
    if vr in LONG_VRS:
        return struct.pack("<HH2s2xI", tag[0], tag[1], vr, length)
    return struct.pack("<HH2sH", tag[0], tag[1], vr, length)


def _pick(rng: random.Random, data: bytes, want: Callable[[Element], bool] = lambda e: True) -> Element:
    candidates = [e for e in elements(data) if want(e)]
    return rng.choice(candidates)


def with_length(data: bytes, element: Element, length: int) -> bytes:
    out = bytearray(data)
    if element.long_form:
        struct.pack_into("<I", out, element.length_at, length & 0xFFFFFFFF)
    else:
        struct.pack_into("<H", out, element.length_at, length & 0xFFFF)
    return bytes(out)


def replace_value(data: bytes, element: Element, value: bytes, vr: bytes | None = None) -> bytes:
    return data[:element.start] + header(element.tag, vr or element.vr, len(value)) + value + data[element.end:]


# ------------------------------------------------------------------- the damage
def truncated(rng: random.Random, base: Base) -> tuple[bytes, str]:
    data = base.data
    cut = rng.choice([rng.randrange(1, len(data)), rng.randrange(1, min(400, len(data))), len(data) - rng.randint(1, 9)])
    return data[:cut], EXPLICIT_LE


def wrong_length(rng: random.Random, base: Base) -> tuple[bytes, str]:
    element = _pick(rng, base.data, lambda e: e.length > 0)
    delta = rng.choice([-3, -2, -1, 1, 2, 3, 8, 64, -element.length])
    return with_length(base.data, element, max(0, element.length + delta)), EXPLICIT_LE


def huge_length(rng: random.Random, base: Base) -> tuple[bytes, str]:
    element = _pick(rng, base.data, lambda e: e.long_form or rng.random() < 0.3)
    huge = rng.choice([0xFFFFFFFE, 0x7FFFFFFF, 0xFFFFFFF0, 0x80000000, 0x40000000]) if element.long_form else 0xFFFF
    return with_length(base.data, element, huge), EXPLICIT_LE


def undefined_length(rng: random.Random, base: Base) -> tuple[bytes, str]:
    """Undefined length (0xFFFFFFFF) on an element that is not a sequence or encapsulated."""
    element = _pick(rng, base.data, lambda e: e.long_form and e.vr != b"SQ")
    return with_length(base.data, element, UNDEFINED), EXPLICIT_LE


def bad_vr(rng: random.Random, base: Base) -> tuple[bytes, str]:
    element = _pick(rng, base.data)
    vr = rng.choice([b"ZZ", b"\x00\x00", b"ds", b"\xff\xfe", b"SQ", b"OB", b"UN", b"US", b"FD", b"AT", b"UI"])
    out = bytearray(base.data)
    out[element.start + 4:element.start + 6] = vr
    return bytes(out), EXPLICIT_LE


def deep_sequence(rng: random.Random, base: Base) -> tuple[bytes, str]:
    """Sequences nested hundreds to thousands deep, undefined lengths, closed or not."""
    depth = rng.choice([64, 300, 1000, 3000, 20000])
    opening = header((0x0008, 0x1115), b"SQ", UNDEFINED) + ITEM + b"\xff\xff\xff\xff"
    closing = ITEM_END + SEQUENCE_END
    nested = opening * depth + (closing * depth if rng.random() < 0.5 else b"")
    at = rng.choice(elements(base.data)[:12]).start  # before PixelData, somewhere in the header
    return base.data[:at] + nested + base.data[at:], EXPLICIT_LE


def garbage_value(rng: random.Random, base: Base) -> tuple[bytes, str]:
    element = _pick(rng, base.data, lambda e: e.vr in TEXT_VRS)
    size = rng.choice([element.length, rng.randint(1, 80), rng.randint(200, 5000)])
    return replace_value(base.data, element, garbage(rng, size + (size & 1))), EXPLICIT_LE


def absurd_image(rng: random.Random, base: Base) -> tuple[bytes, str]:
    """Image attributes that would ask a decoder for gigabytes, or make no sense."""
    data = base.data
    for tag, vr, value in rng.sample([((0x0028, 0x0010), b"US", struct.pack("<H", 65535)),
                                      ((0x0028, 0x0011), b"US", struct.pack("<H", 65535)),
                                      ((0x0028, 0x0008), b"IS", b"2147483647"),
                                      ((0x0028, 0x0100), b"US", struct.pack("<H", rng.choice([0, 3, 64, 65535]))),
                                      ((0x0028, 0x0101), b"US", struct.pack("<H", 99)),
                                      ((0x0028, 0x0002), b"US", struct.pack("<H", rng.choice([0, 4, 65535]))),
                                      ((0x0028, 0x0004), b"CS", b"YBR_FULL_422")], rng.randint(1, 4)):
        present = [e for e in elements(data) if e.tag == tag]
        if present:
            data = replace_value(data, present[0], value, vr)
        else:  # insert before the first element with a higher tag
            after = next((e for e in elements(data) if e.tag > tag), None)
            at = after.start if after else len(data)
            data = data[:at] + header(tag, vr, len(value)) + value + data[at:]
    return data, EXPLICIT_LE


def reordered(rng: random.Random, base: Base) -> tuple[bytes, str]:
    """Two elements swapped, or one repeated (tags out of ascending order)."""
    found = elements(base.data)
    a, b = sorted(rng.sample(range(len(found)), 2))
    ea, eb = found[a], found[b]
    chunk = lambda e: base.data[e.start:e.end]  # noqa: E731
    if rng.random() < 0.5:
        data = base.data[:ea.start] + chunk(eb) + base.data[ea.end:eb.start] + chunk(ea) + base.data[eb.end:]
    else:
        data = base.data[:eb.end] + chunk(ea) + base.data[eb.end:]
    return data, EXPLICIT_LE


def flipped_bytes(rng: random.Random, base: Base) -> tuple[bytes, str]:
    out = bytearray(base.data)
    header_end = next(e.start for e in elements(base.data) if e.tag == (0x7FE0, 0x0010))
    for _ in range(rng.randint(1, 40)):
        out[rng.randrange(header_end)] = rng.randrange(256)  # in the header: pixel bytes are noise anyway
    return bytes(out), EXPLICIT_LE


def inserted_garbage(rng: random.Random, base: Base) -> tuple[bytes, str]:
    at = rng.choice([rng.randrange(len(base.data)), rng.choice(elements(base.data)).start])
    return base.data[:at] + garbage(rng, rng.randint(1, 64)) + base.data[at:], EXPLICIT_LE


def wrong_syntax(rng: random.Random, base: Base) -> tuple[bytes, str]:
    """Explicit VR Little Endian bytes sent as another transfer syntax (meta mismatch)."""
    return base.data, rng.choice(WRONG_SYNTAXES)


def bad_uids(rng: random.Random, base: Base) -> tuple[bytes, str]:
    """UIDs in the data set that are not UIDs: too long, letters, the patient's ID, empty."""
    element = _pick(rng, base.data, lambda e: e.vr == b"UI")
    value = rng.choice([b"1." * 60, b"PHIFAULT-UID-0001", b"", b"\x00" * 8, b"1.2.840.10008.5.1.4.1.1.2 \\2.3",
                        garbage(rng, 64)])
    return replace_value(base.data, element, value + b"\x00" * (len(value) & 1)), EXPLICIT_LE


def tiny(rng: random.Random, base: Base) -> tuple[bytes, str]:
    """Next to nothing: an empty data set, one header, a sequence delimiter, a Part 10 preamble."""
    return rng.choice([b"", base.data[:8], SEQUENCE_END, ITEM_END, b"\x00" * 128 + b"DICM" + base.data[:200],
                       header((0x7FE0, 0x0010), b"OW", UNDEFINED)]), rng.choice(SYNTAXES)


KINDS: dict[str, Callable[[random.Random, Base], tuple[bytes, str]]] = {
    f.__name__: f for f in (truncated, wrong_length, huge_length, undefined_length, bad_vr, deep_sequence,
                            garbage_value, absurd_image, reordered, flipped_bytes, inserted_garbage, wrong_syntax,
                            bad_uids, tiny)
}


def mutants(bases: Sequence[Base], count: int, seed: int) -> Iterator[Mutant]:
    """``count`` damaged instances, round-robin over the kinds; each gets a SOP Instance UID
    of its own (in its data set before the damage, and in its file meta)."""
    rng = random.Random(seed)
    names = sorted(KINDS)
    for index in range(count):
        kind = names[index % len(names)]
        base = rng.choice(bases)
        uid = f"2.25.{seed}{index:06d}"
        [element] = [e for e in elements(base.data) if e.tag == (0x0008, 0x0018)]
        own = Base(base.sop_class, uid, replace_value(base.data, element, uid.encode() + b"\x00" * (len(uid) & 1)))
        data, syntax = KINDS[kind](rng, own)
        yield Mutant(kind, base.sop_class, uid, syntax, data)


def part10(sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes) -> bytes:
    """Preamble, a File Meta Information group (always Explicit VR Little Endian) and data."""
    def element(number: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2s2xI", 0x0002, number, vr, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, number, vr, len(value)) + value

    def uid(text: str) -> bytes:
        raw = text.encode("ascii")
        return raw + b"\x00" * (len(raw) & 1)

    body = b"".join([element(0x0001, b"OB", b"\x00\x01"), element(0x0002, b"UI", uid(sop_class)),
                     element(0x0003, b"UI", uid(sop_instance)), element(0x0010, b"UI", uid(transfer_syntax)),
                     element(0x0012, b"UI", uid("1.2.826.0.1.3680043.10.1199.1")),
                     element(0x0013, b"SH", b"FAULTTEST ")])
    return b"\x00" * 128 + b"DICM" + element(0x0000, b"UL", struct.pack("<I", len(body))) + body + data
