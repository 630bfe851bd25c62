"""DIMSE command sets encoded by hand, for pynetdicom.

pynetdicom encodes every command set (C-STORE-RQ, C-STORE-RSP, ...) with pydicom's dataset
writer, twice per message (once to compute the group length). That was ~1 ms of CPU per
instance on each side of the node (receive answers, forwarders send). A command set is a
handful of group 0000 elements in Implicit VR Little Endian; ``encode_command_set`` writes
those byte for byte as pydicom does (a test compares them) and hands anything unusual back
to pydicom.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from pydicom.dataset import Dataset
from pynetdicom import dimse_messages

_header = struct.Struct("<HHI").pack
_INTS = {"US": "H", "UL": "I", "SS": "h", "SL": "i"}
_TEXT = frozenset({"AE", "CS", "LO", "SH", "ST", "LT", "UI"})


def encode_command_set(ds: Dataset) -> bytes | None:
    """ds (group 0000 elements) in Implicit VR Little Endian; None where pydicom must do it."""
    out = []
    for elem in ds:
        tag, vr, value = elem.tag, elem.VR, elem.value
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
        elif vr == "AT" and isinstance(value, int):
            data = struct.pack("<HH", value >> 16, value & 0xFFFF)
        else:
            return None
        out.append(_header(tag >> 16, tag & 0xFFFF, len(data)))
        out.append(data)
    return b"".join(out)


def install() -> None:
    """Use ``encode_command_set`` in pynetdicom's DIMSE messages (once per process)."""
    original = dimse_messages.encode
    if getattr(original, "router_hook", False):
        return

    def encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
        if is_implicit_vr and is_little_endian and not deflated:
            data = encode_command_set(ds)
            if data is not None:
                return data
        return original(ds, is_implicit_vr, is_little_endian, deflated)

    encode.router_hook = True
    dimse_messages.encode = encode
