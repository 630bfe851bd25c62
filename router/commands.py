"""DIMSE command sets encoded and decoded by hand (PS3.7 9.3, 9.1.1).

pynetdicom builds every command set as a pydicom Dataset, filled attribute by attribute
and encoded twice (once for the group length), and decodes one through pydicom's value
converters. The node's associations (``router.acceptor`` receiving, ``router.association``
sending) need only a few elements of group 0000 in Implicit VR Little Endian: they are
read and written here from and to bytes. Tests compare the bytes with pynetdicom's.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

_header = struct.Struct("<HHI")
_INTS = {"US": "H", "UL": "I", "SS": "h", "SL": "i"}
_TEXT = frozenset({"AE", "CS", "LO", "SH", "ST", "LT", "UI"})
#: (0000,0800) Command Data Set Type: no data set follows.
NO_DATA_SET = 0x0101
#: The Verification SOP Class (C-ECHO).
VERIFICATION = "1.2.840.10008.1.1"


def encode_elements(elements: Iterable[tuple[int, str, object]]) -> bytes | None:
    """(tag, VR, value) of group 0000 in Implicit VR Little Endian, as pydicom writes them;
    None for anything this does not handle."""
    out = []
    for tag, vr, value in elements:
        if tag >> 16:
            return None
        if value is None or value == "" or (isinstance(value, Iterable) and not isinstance(value, str)
                                            and len(value) == 0):
            data = b""
        elif vr in _INTS:
            values = [value] if isinstance(value, int) else list(value)
            if not all(isinstance(v, int) for v in values):
                return None
            try:
                data = struct.pack(f"<{len(values)}{_INTS[vr]}", *values)
            except struct.error:
                return None
        elif vr in _TEXT and isinstance(value, str) and value.isascii():
            data = value.encode("ascii")
            if len(data) & 1:
                data += b"\0" if vr == "UI" else b" "
        elif vr == "AT":
            values = [value] if isinstance(value, int) else list(value)
            if not all(isinstance(v, int) and 0 <= v <= 0xFFFFFFFF for v in values):
                return None
            data = b"".join(struct.pack("<HH", v >> 16, v & 0xFFFF) for v in values)
        else:
            return None
        out.append(_header.pack(tag >> 16, tag & 0xFFFF, len(data)))
        out.append(data)
    return b"".join(out)


def store_request_command(message_id: int, sop_class: str, sop_instance: str) -> bytes | None:
    """The command set of a C-STORE request (medium priority, a data set following), group
    length included; None if a UID is not plain ASCII."""
    return command_set([(0x0002, "UI", sop_class), (0x0100, "US", 0x0001), (0x0110, "US", message_id),
                        (0x0700, "US", 0), (0x0800, "US", 0x0001), (0x1000, "UI", sop_instance)])


def echo_request_command(message_id: int) -> bytes:
    """The command set of a C-ECHO request (Verification SOP Class, no data set)."""
    command = command_set([(0x0002, "UI", VERIFICATION), (0x0100, "US", 0x0030), (0x0110, "US", message_id),
                           (0x0800, "US", NO_DATA_SET)])
    assert command is not None  # constants
    return command


def response_command(field: int, message_id: int, sop_class: str, sop_instance: str | None, status: int) -> bytes:
    """The command set answering a request (field: the response's Command Field), with no
    data set; a UID that is not plain ASCII is left out."""
    elements = [(0x0002, "UI", sop_class), (0x0100, "US", field), (0x0120, "US", message_id),
                (0x0800, "US", NO_DATA_SET), (0x0900, "US", status)]
    if sop_instance:
        elements.append((0x1000, "UI", sop_instance))
    command = command_set(elements)
    if command is None:
        command = command_set([e for e in elements if e[1] != "UI"])
    assert command is not None  # integers in range
    return command


def command_set(elements: Iterable[tuple[int, str, object]]) -> bytes | None:
    """A command set of (element, VR, value) in element order, its group length first;
    None for anything ``encode_elements`` does not handle."""
    return _with_group_length(encode_elements(elements))


def _with_group_length(body: bytes | None) -> bytes | None:
    return None if body is None else _header.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


def command_elements(data: bytes) -> dict[int, bytes] | None:
    """A command set's elements (element number -> value), None unless all are group 0000."""
    elements = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = _header.unpack_from(data, offset)
        offset += 8
        value = data[offset:offset + length]
        offset += length
        if group != 0 or len(value) != length or element in elements:
            return None
        elements[element] = value
    return elements


def us_value(elements: dict[int, bytes], element: int) -> int | None:
    """A US element of ``command_elements``; None when absent or not two bytes long."""
    value = elements.get(element)
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None
