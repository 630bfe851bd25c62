"""router.encode writes what pydicom's writer writes, for every corpus instance.

The fast writer copies kept elements verbatim; it must not change a byte pydicom would
have written, except the preamble (always zeros here: an input's preamble can hold
anything) and explicit VR UN elements, which it writes with their dictionary VR.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from router import config as config_module
from router.encode import fast_syntax, part10_bytes
from router.profile import Deidentifier, InstanceRefused, read_instance

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
SECRET = b"encode-test-secret-0123456789"


def corpus_files() -> list[Path]:
    return sorted(CORPUS.rglob("*.dcm"))


@pytest.fixture(scope="module")
def deidentifier() -> Deidentifier:
    config = config_module.parse('[deid]\nsecret = "encode-test-secret"\noptions = ["retain-longitudinal-modified-dates", '
                                 '"retain-safe-private", "clean-descriptors", "clean-structured-content"]\n')
    return Deidentifier(config.deid, SECRET)


def empty_as_none(value):
    if value is None or isinstance(value, (int, float)):
        return value
    return None if not len(value if isinstance(value, (bytes, list)) else str(value)) else value


def same_elements(ours: Dataset, theirs: Dataset, where: str = "") -> list[str]:
    problems = []
    if set(ours.keys()) != set(theirs.keys()):
        return [f"{where}: tags differ: {sorted(set(ours.keys()) ^ set(theirs.keys()))}"]
    for tag in ours.keys():
        a, b = ours.get_item(tag), theirs.get_item(tag)
        if a.VR != b.VR and "UN" not in (a.VR, b.VR):
            problems.append(f"{where}{tag}: VR {a.VR} != {b.VR}")
        elif ours[tag].VR == "SQ":
            items_a, items_b = ours[tag].value, theirs[tag].value
            if len(items_a) != len(items_b):
                problems.append(f"{where}{tag}: {len(items_a)} items != {len(items_b)}")
            for n, (x, y) in enumerate(zip(items_a, items_b)):
                problems += same_elements(x, y, f"{where}{tag}[{n}].")
        elif empty_as_none(ours[tag].value) != empty_as_none(theirs[tag].value):
            problems.append(f"{where}{tag}: value differs")
    return problems


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_fast_writer_matches_pydicom(path: Path, deidentifier: Deidentifier):
    try:
        ours_ds = read_instance(path)
        deidentifier.deidentify(ours_ds)
    except InstanceRefused:
        return  # refused input never reaches a writer
    implicit = fast_syntax(ours_ds.file_meta.TransferSyntaxUID)
    if implicit is None:
        return  # big endian and deflated datasets are written by pydicom itself
    ours = b"".join(part10_bytes(ours_ds, implicit))
    theirs_ds = read_instance(path)
    deidentifier.deidentify(theirs_ds)
    out = io.BytesIO()
    if not theirs_ds.file_meta.TransferSyntaxUID.is_transfer_syntax:
        # A syntax newer than pydicom (Deflated Image Frame Compression): its writer
        # refuses it, so check that ours reads back as what was de-identified.
        assert same_elements(dcmread(io.BytesIO(ours)), theirs_ds) == []
        return
    theirs_ds.save_as(out, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    theirs = out.getvalue()
    assert ours[:128] == b"\0" * 128
    if ours[128:] != theirs[128:]:
        assert same_elements(dcmread(io.BytesIO(ours)), dcmread(io.BytesIO(theirs))) == []
        assert b"UN" in theirs  # only explicit VR UN elements may be written differently


def test_binary_values_are_written_as_they_are_held() -> None:
    """Masked pixel data is a bytes value pydicom would copy twice on writing: a large
    instance would need three times its size in memory."""
    ds = read_instance(CORPUS / "pydicom__CT_small.dcm")
    masked = bytes(len(ds.PixelData))  # as the pixel stage sets it: a new bytes value
    ds.PixelData = masked
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    chunks = part10_bytes(ds, implicit=False)
    assert any(chunk is masked for chunk in chunks)
    written = b"".join(chunks)
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    assert written[128:] == out.getvalue()[128:]


def test_numbers_and_names_are_written_as_pydicom_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Converted binary numbers and person names (the pixel check and pydicom's own lookups
    convert Rows, Columns and the like in place) are encoded here, not by pydicom."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import PersonName

    ds = read_instance(CORPUS / "pydicom__CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.add_new(0x00280010, "US", 7)
    ds.add_new(0x00181310, "US", [0, 512, 65535, 3])
    ds.add_new(0x00189219, "SS", -5)
    ds.add_new(0x00181063, "UL", 4000000000)
    ds.add_new(0x00189306, "FD", [1.5, -2.25e-10])
    ds.add_new(0x00189307, "FL", 0.1)
    ds.add_new(0x00189308, "FD", None)
    ds.add_new(0x00100010, "PN", PersonName("Pseudo^Name^^Dr"))
    ds.add_new(0x00080090, "PN", None)
    ds.add_new(0x00081070, "PN", "Odd^Length")
    ds.add_new(0x00081060, "PN", MultiValue(PersonName, ["A^B", "C^D"]))
    ds.add_new(0x00321032, "PN", "Müller^Jörg")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.set_original_encoding(False, True, ds._character_set)
    from router import encode

    by_pydicom = []
    write_data_element = encode.write_data_element
    monkeypatch.setattr(encode, "write_data_element",
                        lambda fp, elem, encodings: (by_pydicom.append(elem.tag), write_data_element(fp, elem, encodings)))
    written = b"".join(part10_bytes(ds, implicit=False))
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    assert written[128:] == out.getvalue()[128:]
    assert set(by_pydicom) <= {0x00081060, 0x00321032}  # a list of names; not ASCII


def command_sets() -> list[Dataset]:
    from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
    from pynetdicom.dimse_primitives import C_ECHO

    def message(kind, primitive):
        msg = kind()
        msg.primitive_to_message(primitive)
        return msg.command_set

    sets = [message(C_STORE_RSP if p.MessageIDBeingRespondedTo is not None else C_STORE_RQ, p)
            for p in store_primitives()]
    echo = C_ECHO()
    echo.MessageID = 1
    sets.append(message(C_ECHO_RQ, echo))
    echo.MessageIDBeingRespondedTo, echo.Status = 1, 0
    sets.append(message(C_ECHO_RSP, echo))
    return sets


def store_primitives(spooled: Path = Path("spooled.dcm")):
    """C-STORE requests and responses, plain and unusual (one streamed from spooled, which
    is read only when the message is encoded)."""
    from pynetdicom.dimse_primitives import C_STORE

    for odd in (False, True):
        rq = C_STORE()
        rq.MessageID, rq.Priority = 65535, 2
        rq.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        rq.AffectedSOPInstanceUID = "1.2.3.4.5" + ("6" if odd else "")
        rq.DataSet = io.BytesIO(b"\x08\x00\x16\x00")
        if odd:
            rq.MoveOriginatorApplicationEntityTitle, rq.MoveOriginatorMessageID = "MOVER", 3
            rq.DataSet = None
            rq._dataset_path = (spooled, 4)  # streamed from a file
        yield rq
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 1
        rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID
        rsp.Status = 0xA700 if odd else 0
        if odd:
            rsp.ErrorComment, rsp.OffendingElement = "out of space", [0x00100010, 0x00100020]
        yield rsp
    bare = C_STORE()  # a response with no UIDs (pynetdicom leaves them out)
    bare.MessageIDBeingRespondedTo, bare.Status = 7, 0xC000
    yield bare


def test_command_sets_are_the_bytes_pynetdicom_sends() -> None:
    """The node's C-STORE and C-ECHO requests and its C-STORE and C-ECHO responses:
    pynetdicom's bytes, and read back by hand as pydicom reads them."""
    from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
    from pynetdicom.dimse_primitives import C_ECHO
    from pynetdicom.dsutils import decode, encode

    from router import commands

    def pynetdicoms(kind, primitive) -> bytes:
        message = kind()
        message.primitive_to_message(primitive)
        return encode(message.command_set, True, True)

    checked = 0
    for primitive in store_primitives():
        if primitive.MessageIDBeingRespondedTo is not None:
            if primitive.ErrorComment or primitive.OffendingElement:
                continue  # the node never sends these
            ours = commands.response_command(0x8001, primitive.MessageIDBeingRespondedTo,
                                             primitive.AffectedSOPClassUID or "", primitive.AffectedSOPInstanceUID,
                                             primitive.Status)
            if not primitive.AffectedSOPClassUID:
                continue  # the node always names the class
            assert ours == pynetdicoms(C_STORE_RSP, primitive)
        elif not primitive.MoveOriginatorApplicationEntityTitle:
            primitive.Priority = 0  # the node's requests are of medium priority
            ours = commands.store_request_command(primitive.MessageID, primitive.AffectedSOPClassUID,
                                                  primitive.AffectedSOPInstanceUID)
            assert ours == pynetdicoms(C_STORE_RQ, primitive)
        else:
            continue
        elements = commands.command_elements(ours)
        read = decode(io.BytesIO(ours), True, True)
        assert {e.tag & 0xFFFF for e in read} == set(elements)
        checked += 1
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo, echo.Status, echo.AffectedSOPClassUID = 9, 0, "1.2.840.10008.1.1"
    assert commands.response_command(0x8030, 9, "1.2.840.10008.1.1", None, 0) == pynetdicoms(C_ECHO_RSP, echo)
    request = C_ECHO()
    request.MessageID, request.AffectedSOPClassUID = 11, "1.2.840.10008.1.1"
    assert commands.echo_request_command(11) == pynetdicoms(C_ECHO_RQ, request)
    assert checked == 2
    assert commands.command_elements(b"\x08\x00\x16\x00\x00\x00\x00\x00") is None  # not group 0000


@pytest.mark.parametrize("max_pdu", [16382, 131072, 0])
@pytest.mark.parametrize("size", [1, 16376, 16377, 40000])
def test_forwarded_data_sets_are_the_pdus_pynetdicom_sends(tmp_path: Path, max_pdu: int, size: int) -> None:
    """A data set streamed from a file or sent from memory by the forwarders' association:
    P-DATA-TF PDUs byte for byte as pynetdicom encodes them."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.pdu import P_DATA_TF

    from router.association import bytes_pdus, file_pdus, fragment_size

    spooled = tmp_path / "spooled.dcm"
    spooled.write_bytes(b"meta" + bytes(range(251)) * (size // 251) + bytes(size % 251))
    message = C_STORE_RQ()
    message.primitive_to_message(next(store_primitives(spooled)))
    message.data_set, message._data_set_path = None, (spooled, 4)
    theirs = [P_DATA_TF(p).encode() for p in message.encode_msg(3, max_pdu)][1:]  # after the command set
    with open(spooled, "rb") as file:
        assert [pdu.header + os.pread(pdu.fd, pdu.length, pdu.start)
                for pdu in file_pdus(file, 4, 3, fragment_size(max_pdu))] == theirs
    assert list(bytes_pdus(spooled.read_bytes()[4:], 3, fragment_size(max_pdu))) == theirs


def test_forwarded_fragments_stay_small_whatever_the_peer_allows(tmp_path: Path) -> None:
    """A peer announcing a huge maximum PDU length gets fragments of at most 4 MiB (each is
    read into one buffer through TLS), which together are the whole data set."""
    from router.association import file_pdus, fragment_size

    spooled = tmp_path / "spooled.dcm"
    spooled.write_bytes(b"meta" + bytes(range(256)) * (40 * 1024 * 1024 // 256))
    lengths, data = [], []
    with open(spooled, "rb") as file:
        for pdu in file_pdus(file, 4, 1, fragment_size(2**32 - 1)):
            lengths.append(pdu.length)
            data.append(os.pread(pdu.fd, pdu.length, pdu.start))
    assert lengths == [4 * 1024 * 1024 - 6] * 10 + [60]
    assert b"".join(data) == spooled.read_bytes()[4:]


def test_command_sets_encode_as_pynetdicom_does() -> None:
    from pynetdicom.dsutils import encode

    from router.commands import encode_elements

    for command_set in command_sets():
        expected = encode(command_set, True, True)
        actual = encode_elements((elem.tag, elem.VR, elem.value) for elem in command_set)
        assert actual is None or actual == expected, command_set
    assert encode_elements((e.tag, e.VR, e.value) for e in command_sets()[0]) is not None
    foreign = Dataset()
    foreign.PatientName = "X"
    assert encode_elements((e.tag, e.VR, e.value) for e in foreign) is None  # not a command set


def test_file_meta_group_is_what_pydicom_writes() -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    from router.encode import file_meta_group

    for source_ae in ("", "CT1", "STORESCU"):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = "1.2.3.45" + "6" * len(source_ae)
        meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        meta.ImplementationClassUID = "2.25.1234"
        meta.ImplementationVersionName = "DEID_ROUTER_01"[: 13 + len(source_ae) % 2]
        if source_ae:
            meta.SourceApplicationEntityTitle = source_ae
        ours = file_meta_group(meta)
        written = DicomBytesIO()
        write_file_meta_info(written, meta, enforce_standard=True)
        assert ours == written.getvalue()
    meta.PrivateInformationCreatorUID = "1.2.3"
    assert file_meta_group(meta) is None  # anything else: pydicom writes it


def test_meta_uids_read_by_hand_are_what_pynetdicom_reads(tmp_path: Path, deidentifier: Deidentifier) -> None:
    """The forwarder reads an outgoing file's meta by hand: the same UIDs and dataset offset
    as pynetdicom's split_dataset, or None (then pydicom reads it)."""
    from pynetdicom.dsutils import split_dataset

    from router.encode import read_meta_uids

    checked = 0
    for n, src in enumerate(corpus_files()):
        for path in (src, tmp_path / f"{n}.dcm"):
            if path != src:
                try:
                    deidentifier.process_file(src, path, durable=False)
                except InstanceRefused:
                    continue
            read = read_meta_uids(path)
            if read is None:
                assert path == src  # everything the router writes is read by hand
                continue
            meta, offset = split_dataset(path)
            assert read[1] == offset
            assert read[0] == {k: str(meta[k].value).rstrip("\0 ") for k in read[0]}
            assert set(read[0]) >= {"MediaStorageSOPClassUID", "TransferSyntaxUID"} & set(meta.dir())
            checked += 1
    assert checked > 50
    data = (tmp_path / "0.dcm").read_bytes() if (tmp_path / "0.dcm").exists() else None
    assert data is not None
    (tmp_path / "cut.dcm").write_bytes(data[:150])  # the meta group cut short
    assert read_meta_uids(tmp_path / "cut.dcm") is None
    (tmp_path / "bare.dcm").write_bytes(data[132:])  # no preamble
    assert read_meta_uids(tmp_path / "bare.dcm") is None
