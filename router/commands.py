"""DIMSE command sets encoded and decoded by hand, for pynetdicom.

pynetdicom builds every command set as a pydicom Dataset: a C-STORE response is created
with all its elements, filled attribute by attribute and encoded twice (once for the group
length), and a request is decoded through pydicom's value converters before it becomes a
primitive. That was ~0.5 ms of CPU per instance on each side of the node (the receive side
answers, the forwarders send). Here a C-STORE request or response is encoded straight from
its primitive and decoded straight from its bytes, and any other command set is encoded
from its Dataset without pydicom's writer. Whatever is unusual (a value pydicom would
convert in its own way, a handler that wants the Dataset) goes pynetdicom's way; tests
compare both ways byte for byte and attribute for attribute.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import dimse_messages, evt, fsm
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

_header = struct.Struct("<HHI")
#: A P-DATA-TF PDU with one PDV: PDU type, reserved, PDU length; item length, presentation
#: context ID, message control header (PS3.8 9.3.5, E.2).
_PDATA_HEADER = struct.Struct(">BBIIBB")
#: Fragment size when the peer sets no maximum PDU length (0: unlimited), and the largest
#: sent whatever the peer allows (each message's buffer is one fragment: a peer announcing
#: a 4 GB maximum must not make a 4 GB buffer).
_UNLIMITED_FRAGMENT = 131072 - 6
_LARGEST_FRAGMENT = 4 * 1024 * 1024 - 6
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


def _encode_elements(elements: Iterable[tuple[int, str, object]]) -> bytes | None:
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
    return _encode_elements((elem.tag, elem.VR, elem.value) for elem in ds)


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
    body = _encode_elements(elements)
    if body is None:
        return None
    return _header.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


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


def decode_store_response(msg: DIMSEMessage, primitive: P_DATA) -> bool:
    """Take a C-STORE response that arrives whole in one PDV as pynetdicom's ``decode_msg``
    would, without decoding its command set into a Dataset (``message_to_primitive`` reads
    it by hand); False (pynetdicom's way) for anything else."""
    whole = whole_command(msg, primitive)
    if whole is None:
        return False
    context_id, command = whole
    elements = _elements(command)
    values = _plain_values(elements, _DECODED[C_STORE_RSP]) if elements is not None else None
    if not values or values.get(0x0100) != 0x8001 or values.get(0x0800) != _NO_DATA_SET:
        return False
    msg.encoded_command_set.write(command)
    msg.context_id = context_id
    msg.__class__ = C_STORE_RSP
    return True


def _elements(data: bytes) -> dict[int, bytes] | None:
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
    elements = _elements(data)
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
    elements = _elements(msg.encoded_command_set.getvalue())
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


class FileFragment(P_DATA):
    """A fragment of a data set that is sent from a file, read only when its PDU is sent.

    pynetdicom reads every fragment of a file's data set into its own P-DATA at once (the
    whole data set waits in the DUL's queue), then copies it three more times (the PDV
    item, the PDU, what is left after each partial socket send): ~10 ms of CPU and page
    faults for an 18 MB clip on each send. Here the DUL reads each fragment into one buffer
    per message just before sending it, and sends from that buffer.
    """

    def __init__(self, source: _FileSource, offset: int, length: int, last: bool):
        super().__init__()
        self.source = source
        self.offset = offset
        self.length = length
        self.last = last

    def encode(self) -> memoryview:
        """The PDU's bytes; valid until the next fragment of the message is encoded (the DUL
        sends each PDU before it encodes the next)."""
        return self.source.pdu(self.offset, self.length, self.last)


class _FileSource:
    """A data set file being sent, and the one PDU buffer its fragments are read into."""

    def __init__(self, path: Path | str, context_id: int, fragment_size: int):
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed after the last fragment
        self.context_id = context_id
        self.buffer = bytearray(_PDATA_HEADER.size + fragment_size)

    def pdu(self, offset: int, length: int, last: bool) -> memoryview:
        view = memoryview(self.buffer)[:_PDATA_HEADER.size + length]
        _PDATA_HEADER.pack_into(self.buffer, 0, 0x04, 0, 6 + length, 2 + length, self.context_id, 0x02 if last else 0x00)
        read = os.preadv(self.file.fileno(), [view[_PDATA_HEADER.size:]], offset)
        if last:
            self.file.close()
        if read != length:  # outgoing files are replaced by rename, never changed in place
            raise OSError(f"data set file shorter than when its sending began ({read} of {length} bytes)")
        return view


def file_fragments(path: Path | str, offset: int, context_id: int, max_pdu_length: int) -> Iterator[FileFragment]:
    """The data set fragments of a message whose data set is the file path from offset on
    (an empty data set is one empty last fragment, as pynetdicom sends it)."""
    size = os.path.getsize(path) - offset
    fragment_size = min(max_pdu_length - 6, _LARGEST_FRAGMENT) if max_pdu_length else _UNLIMITED_FRAGMENT
    source = _FileSource(path, context_id, min(fragment_size, size))
    for start in range(offset, offset + max(size, 1), fragment_size):
        length = min(fragment_size, offset + size - start)
        yield FileFragment(source, start, length, start + length >= offset + size)


def _pdu_to_send(primitive: P_DATA) -> P_DATA_TF | FileFragment:
    """pynetdicom's state machine makes each P-DATA's PDU with this: a file fragment is its own."""
    return primitive if type(primitive) is FileFragment else P_DATA_TF(primitive)


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
                path = msg._data_set_path
                from_file = path is not None and not (
                    self.assoc.get_handlers(evt.EVT_PDU_SENT) or self.assoc.get_handlers(evt.EVT_DATA_SENT))
                if from_file:
                    msg._data_set_path = None  # encode_msg: the command set only
                for pdata in msg.encode_msg(context_id, self.maximum_pdu_size):
                    self.dul.send_pdu(pdata)
                if from_file:
                    for fragment in file_fragments(path[0], path[1], context_id, self.maximum_pdu_size):
                        self.dul.send_pdu(fragment)
                return
        original_send(self, primitive, context_id)

    def message_to_primitive(self: DIMSEMessage):
        primitive = store_primitive(self)
        if primitive is not None:
            return primitive
        if not len(self.command_set) and self.encoded_command_set.tell():  # read by hand only, so far
            self.command_set = decode(self.encoded_command_set, True, True)
        return pynetdicom_message_to_primitive(self)

    def decode_msg(self: DIMSEMessage, primitive, assoc=None) -> bool:
        if (type(primitive) is P_DATA and assoc is not None and assoc.is_requestor
                and not assoc.get_handlers(evt.EVT_DIMSE_RECV) and decode_store_response(self, primitive)):
            return True
        return pynetdicom_decode_msg(self, primitive, assoc)

    encode.router_hook = True
    dimse_messages.encode = encode
    DIMSEMessage.decode_msg = decode_msg
    DIMSEServiceProvider.send_msg = send_msg
    DIMSEMessage.message_to_primitive = message_to_primitive
    fsm.P_DATA_TF = _pdu_to_send
