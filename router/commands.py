"""DIMSE command sets encoded and decoded by hand, for pynetdicom.

pynetdicom builds every command set as a pydicom Dataset: a C-STORE response is created
with all its elements, filled attribute by attribute and encoded twice (once for the group
length), and a request is decoded through pydicom's value converters before it becomes a
primitive. That was ~0.5 ms of CPU per instance on the receive side. Here a C-STORE
request is decoded straight from its bytes and a response encoded straight from its
primitive, and any other command set is encoded from its Dataset without pydicom's
writer (the forwarders' side, ``router.association``, uses ``store_request_command`` and
``command_elements`` without pynetdicom). Whatever is unusual (a value pydicom would
convert in its own way, a handler that wants the Dataset) goes pynetdicom's way; tests
compare both ways byte for byte and attribute for attribute.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom import dimse_messages, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

_header = struct.Struct("<HHI")
_US = struct.Struct("<H")
_INTS = {"US": "H", "UL": "I", "SS": "h", "SL": "i"}
_TEXT = frozenset({"AE", "CS", "LO", "SH", "ST", "LT", "UI"})

#: C-STORE command elements after the group length, in tag order: (element, VR, primitive
#: attribute); None: CommandField and CommandDataSetType, which the message type decides.
_STORE_RQ = ((0x0002, "UI", "AffectedSOPClassUID"), (0x0100, "US", None), (0x0110, "US", "MessageID"),
             (0x0700, "US", "Priority"), (0x0800, "US", None), (0x1000, "UI", "AffectedSOPInstanceUID"),
             (0x1030, "AE", "MoveOriginatorApplicationEntityTitle"), (0x1031, "US", "MoveOriginatorMessageID"))
_STORE_RSP = ((0x0002, "UI", "AffectedSOPClassUID"), (0x0100, "US", None), (0x0120, "US", "MessageIDBeingRespondedTo"),
              (0x0800, "US", None), (0x0900, "US", "Status"), (0x0901, "AT", "OffendingElement"),
              (0x0902, "LO", "ErrorComment"), (0x1000, "UI", "AffectedSOPInstanceUID"))
#: What a hand decode reads: the elements it converts itself (OffendingElement and
#: ErrorComment, rare and multi-valued or text, go pynetdicom's way).
_DECODED = {C_STORE_RQ: {e: (vr, name) for e, vr, name in _STORE_RQ},
            C_STORE_RSP: {e: (vr, name) for e, vr, name in _STORE_RSP if e not in (0x0901, 0x0902)}}
_NO_DATA_SET = 0x0101
#: pynetdicom's own decoders, for what the hand decoders leave to them.
pynetdicom_message_to_primitive = DIMSEMessage.message_to_primitive
pynetdicom_decode_msg = DIMSEMessage.decode_msg


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


def encode_command_set(ds: Dataset) -> bytes | None:
    """ds (group 0000 elements) in Implicit VR Little Endian; None where pydicom must do it."""
    return encode_elements((elem.tag, elem.VR, elem.value) for elem in ds)


def store_command_set(primitive: C_STORE) -> bytes | None:
    """The command set pynetdicom would send for a C-STORE request or response primitive,
    group length included; None where pynetdicom must build it."""
    response = primitive.MessageIDBeingRespondedTo is not None
    has_data = (not response and bool(primitive.DataSet)) or bool(getattr(primitive, "_dataset_path", None))
    fixed = {0x0100: 0x8001 if response else 0x0001, 0x0800: 0x0001 if has_data else _NO_DATA_SET}
    elements = []
    for element, vr, name in _STORE_RSP if response else _STORE_RQ:
        value = fixed[element] if name is None else getattr(primitive, name)
        if value is not None:
            elements.append((element, vr, value))
    return _with_group_length(encode_elements(elements))


def store_request_command(message_id: int, sop_class: str, sop_instance: str) -> bytes | None:
    """The command set of a C-STORE request (medium priority, a data set following), group
    length included, as ``store_command_set`` encodes it from a primitive; None if a UID is
    not plain ASCII."""
    fixed = {0x0100: 0x0001, 0x0110: message_id, 0x0700: 0, 0x0800: 0x0001, 0x0002: sop_class, 0x1000: sop_instance}
    return _with_group_length(encode_elements((element, vr, fixed[element]) for element, vr, _name in _STORE_RQ
                                              if element in fixed))


def _with_group_length(body: bytes | None) -> bytes | None:
    return None if body is None else _header.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


class EncodedCommandSet(bytes):
    """A command set encoded already, in place of a message's Dataset: ``encode`` passes it on."""


def store_message(primitive: C_STORE) -> DIMSEMessage | None:
    """The C-STORE message of primitive as pynetdicom's ``primitive_to_message`` leaves it,
    without building its Dataset; None where pynetdicom must build it."""
    encoded = store_command_set(primitive)
    if encoded is None:
        return None
    response = primitive.MessageIDBeingRespondedTo is not None
    msg = _bare_message(C_STORE_RSP if response else C_STORE_RQ)
    msg.command_set = EncodedCommandSet(encoded)
    msg.data_set = BytesIO() if response else primitive.DataSet
    msg._data_set_path = getattr(primitive, "_dataset_path", None)
    return msg


def _bare_message(cls: type[DIMSEMessage]) -> DIMSEMessage:
    """A message with the attributes ``DIMSEMessage.__init__`` sets, but not its empty
    command set Dataset (filled attribute by attribute, ~40 us, and replaced at once)."""
    msg = cls.__new__(cls)
    msg.context_id = None
    msg.encoded_command_set = BytesIO()
    msg.data_set = BytesIO()
    msg._data_set_path = None
    msg._data_set_file = None
    return msg


def whole_command(msg: DIMSEMessage, primitive: P_DATA) -> tuple[int, bytes] | None:
    """(presentation context ID, command set) of a P-DATA whose one PDV is a message's whole
    command set, nothing of it received before; None for anything else."""
    pdvs = primitive.presentation_data_value_list
    if len(pdvs) != 1 or msg.encoded_command_set.tell():
        return None
    context_id, data = pdvs[0]
    if data[0] & 3 != 3:  # not a command set's last (and only) fragment
        return None
    return context_id, bytes(data[1:])


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


def _plain_values(elements: dict[int, bytes], fields: dict[int, tuple[str, str | None]]) -> dict[int, int | str] | None:
    """The values of elements, converted as pydicom converts them; None for an element not
    in fields or a value that is not plain (empty, several values, not ASCII)."""
    values: dict[int, int | str] = {}
    for element, value in elements.items():
        if element == 0x0000:
            continue  # group length
        vr_name = fields.get(element)
        if vr_name is None:
            return None
        vr = vr_name[0]
        if vr == "US":
            if len(value) != 2:
                return None
            values[element] = _US.unpack(value)[0]
        else:  # UI, AE
            if not value or not value.isascii() or b"\\" in value:
                return None
            text = value.decode("ascii")
            values[element] = text.rstrip("\0 ") if vr == "UI" else text.strip()
    return values


def store_request(data: bytes) -> tuple[str, str] | None:
    """(SOP class, SOP instance) of an encoded command set that is a plain C-STORE request
    with a data set to follow; None for anything else."""
    elements = command_elements(data)
    values = _plain_values(elements, _DECODED[C_STORE_RQ]) if elements is not None else None
    if not values or values.get(0x0100) != 0x0001 or values.get(0x0800, _NO_DATA_SET) == _NO_DATA_SET:
        return None
    return str(values.get(0x0002, "")), str(values.get(0x1000, ""))


def store_primitive(msg: DIMSEMessage) -> C_STORE | None:
    """The primitive of a received C-STORE message, as ``message_to_primitive`` makes it from
    the decoded Dataset; None for anything but plain values of the usual elements."""
    fields = _DECODED.get(type(msg))
    if fields is None:
        return None
    elements = command_elements(msg.encoded_command_set.getvalue())
    values = _plain_values(elements, fields) if elements is not None else None
    if values is None:
        return None
    primitive = C_STORE()
    for element, value in sorted(values.items()):
        name = fields[element][1]
        if name is not None:  # CommandField, CommandDataSetType: the message's class has them
            setattr(primitive, name, value)  # the primitive's setters validate, as for pynetdicom
    if type(msg) is C_STORE_RQ:
        primitive.DataSet = msg.data_set
    primitive._context_id = msg.context_id
    primitive._dataset_path = msg._data_set_path
    primitive._dataset_file = msg._data_set_file
    return primitive


def install() -> None:
    """Use the hand encoders and decoders in pynetdicom (once per process)."""
    original_encode = dimse_messages.encode
    if getattr(original_encode, "router_hook", False):
        return
    original_send = DIMSEServiceProvider.send_msg

    def encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
        if isinstance(ds, EncodedCommandSet):
            return bytes(ds)
        if is_implicit_vr and is_little_endian and not deflated:
            data = encode_command_set(ds)
            if data is not None:
                return data
        return original_encode(ds, is_implicit_vr, is_little_endian, deflated)

    def send_msg(self: DIMSEServiceProvider, primitive, context_id: int) -> None:
        # A handler of EVT_DIMSE_SENT gets the message with its Dataset: pynetdicom's way.
        if type(primitive) is C_STORE and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            msg = store_message(primitive)
            if msg is not None:
                for pdata in msg.encode_msg(context_id, self.maximum_pdu_size):
                    self.dul.send_pdu(pdata)
                return
        original_send(self, primitive, context_id)

    def message_to_primitive(self: DIMSEMessage):
        primitive = store_primitive(self)
        if primitive is not None:
            return primitive
        if not len(self.command_set) and self.encoded_command_set.tell():  # read by hand only, so far
            self.command_set = decode(self.encoded_command_set, True, True)
        return pynetdicom_message_to_primitive(self)

    encode.router_hook = True
    dimse_messages.encode = encode
    DIMSEServiceProvider.send_msg = send_msg
    DIMSEMessage.message_to_primitive = message_to_primitive
