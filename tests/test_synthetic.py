"""bench.synthetic makes valid, readable, deterministic instances with the PHI it claims."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package

from bench import synthetic  # noqa: E402
from bench.synthetic import PHI_CHARSETS, ct_series, phi_instance, to_bytes, write_ct_series  # noqa: E402


def reread(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


# ------------------------------------------------------------------ CT series


@pytest.fixture(scope="module")
def small_series() -> list[pydicom.Dataset]:
    return list(ct_series(4, rows=64, columns=64))


def test_ct_series_reads_back_with_ct_pixels(small_series):
    ds = reread(small_series[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == synthetic.CT_IMAGE_STORAGE
    assert (ds.Modality, ds.PhotometricInterpretation, ds.BitsAllocated, ds.PixelRepresentation) == (
        "CT", "MONOCHROME2", 16, 1)
    assert float(ds.RescaleIntercept) == -1024
    pixels = ds.pixel_array
    assert pixels.shape == (64, 64) and pixels.dtype == np.int16
    assert pixels.min() >= -(1 << (ds.BitsStored - 1)) and pixels.max() < 1 << (ds.BitsStored - 1)
    hu = pixels.astype(np.int32) + int(float(ds.RescaleIntercept))
    assert (hu < -900).any() and (hu > 0).any()  # air/lung and tissue/bone
    assert (pixels == ds.PixelPaddingValue).any()  # outside the scan field of view


def test_full_size_slice_is_half_a_megabyte():
    ds = next(ct_series(1))
    assert (ds.Rows, ds.Columns) == (512, 512)
    assert len(ds.PixelData) == 512 * 512 * 2
    assert reread(ds).pixel_array.shape == (512, 512)


def test_uids_unique_per_slice_shared_per_series(small_series):
    assert len({ds.SOPInstanceUID for ds in small_series}) == len(small_series)
    assert len({ds.StudyInstanceUID for ds in small_series}) == 1
    assert len({ds.SeriesInstanceUID for ds in small_series}) == 1
    assert len({ds.FrameOfReferenceUID for ds in small_series}) == 1
    for ds in small_series:
        assert pydicom.uid.UID(ds.SOPInstanceUID).is_valid
        assert ds.SOPInstanceUID.startswith("2.25.") and len(ds.SOPInstanceUID) <= 64
    assert [ds.InstanceNumber for ds in small_series] == [1, 2, 3, 4]
    z = [float(ds.ImagePositionPatient[2]) for ds in small_series]
    assert z == sorted(z, reverse=True) and len(set(z)) == len(z)
    assert [float(ds.SliceLocation) for ds in small_series] == z


def test_header_has_the_identifying_modules(small_series):
    ds = reread(small_series[0])
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
                    "PatientAddress", "OtherPatientIDsSequence", "AccessionNumber", "ReferringPhysicianName",
                    "StudyID", "StudyDescription", "OperatorsName", "PerformingPhysicianName", "InstitutionName",
                    "InstitutionAddress", "StationName", "DeviceSerialNumber", "SoftwareVersions",
                    "InstanceCreationDate", "ReferencedImageSequence", "SourceImageSequence",
                    "RequestAttributesSequence", "KVP", "PixelSpacing", "ImagePositionPatient"):
        assert keyword in ds, keyword
    block = ds.private_block(0x0009, "ACME 1.1")
    assert str(block[0x02].value) == str(ds.PatientName)
    assert "ScheduledProtocolCodeSequence" in ds.RequestAttributesSequence[0]


def test_deterministic_and_independent():
    a = list(ct_series(2, rows=32, columns=32, seed=5))
    b = list(ct_series(2, rows=32, columns=32, seed=5))
    assert [to_bytes(x) for x in a] == [to_bytes(x) for x in b]
    a[0].PatientName = "CHANGED^NAME"
    a[0].RequestAttributesSequence[0].AccessionNumber = "X"
    assert a[1].PatientName == "DOE^JANE"
    assert a[1].RequestAttributesSequence[0].AccessionNumber != "X"


def test_other_patients_studies_and_series():
    one = next(ct_series(1, rows=32, columns=32))
    other = next(ct_series(1, rows=32, columns=32, **synthetic.patient_kwargs(2)))
    again = next(ct_series(1, rows=32, columns=32, seed=1))  # same patient, another study
    second = next(ct_series(1, rows=32, columns=32, series_number=3))  # same study, another series
    assert other.PatientID != one.PatientID and other.PatientName != one.PatientName
    assert other.StudyInstanceUID != one.StudyInstanceUID
    assert again.PatientBirthDate == one.PatientBirthDate and again.StudyInstanceUID != one.StudyInstanceUID
    assert second.StudyInstanceUID == one.StudyInstanceUID
    assert second.SeriesInstanceUID != one.SeriesInstanceUID
    names = {synthetic.patient_kwargs(n)["patient_name"] for n in range(1, 30)}
    assert len(names) == 29


def test_write_ct_series(tmp_path):
    paths = write_ct_series(tmp_path / "series", 3, seed=2, rows=32, columns=32)
    assert [p.name for p in paths] == ["ct_0001.dcm", "ct_0002.dcm", "ct_0003.dcm"]
    expected = list(ct_series(3, seed=2, rows=32, columns=32))
    for path, ds in zip(paths, expected):
        assert path.read_bytes() == to_bytes(ds)
        assert path.read_bytes()[128:132] == b"DICM"


def test_non_latin_patient_name_gets_utf8():
    ds = reread(next(ct_series(1, rows=16, columns=16, patient_name="Иванова^Анна")))
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.PatientName == "Иванова^Анна"


# ------------------------------------------------------------------ planted PHI


@pytest.fixture(scope="module", params=PHI_CHARSETS)
def planted(request):
    ds, plants = phi_instance(request.param)
    return request.param, ds, plants, to_bytes(ds)


def test_every_plant_is_in_the_written_bytes(planted):
    _, _, plants, data = planted
    missing = {m: p.needles for m, p in plants.items() if len(p.found_in(data)) != len(p.needles)}
    assert not missing
    assert synthetic.find_needles(data, plants).keys() == plants.keys()


def test_plants_cover_every_kind_of_place(planted):
    _, _, plants, _ = planted
    kinds = {p.kind for p in plants.values()}
    assert {"patient", "date", "uid", "name", "free-text", "private", "overlay", "curve", "un", "structured",
            "institution", "device", "descriptor"} <= kinds
    assert max(p.depth for p in plants.values()) >= 3
    assert any(p.retired for p in plants.values())
    charset = planted[0]
    for marker, plant in plants.items():
        assert (marker.startswith("PHIMARK-") or marker.startswith("2.25.") and plant.vr in ("UI",)
                or marker.isdigit() and len(marker) == 8 or marker == synthetic.phi_name(charset)), marker
    tokens = [m for m in plants if m.startswith("PHIMARK-")]
    assert not [a for a in tokens for b in tokens if a != b and a in b]  # no marker inside another


def test_plants_locations_match_the_dataset(planted):
    _, ds, plants, _ = planted

    def holds(items: list[pydicom.Dataset], tags: tuple[int, ...]) -> bool:
        if len(tags) == 1:
            return any(tags[0] in item for item in items)
        inner = [child for item in items if tags[0] in item for child in item[tags[0]].value]
        return holds(inner, tags[1:])

    for plant in plants.values():
        assert len(plant.tag_paths) == len(plant.locations)
        for tag_path in plant.tag_paths:
            assert holds([ds], tag_path), (plant.marker, plant.locations)


def test_charsets_decode_back(planted):
    charset, ds, plants, data = planted
    back = pydicom.dcmread(io.BytesIO(data))
    expected = synthetic.phi_name(charset)
    assert str(back.PatientName) == expected
    assert expected in plants
    assert str(back.private_block(0x0009, "ACME 1.1")[0x02].value) == expected
    assert "Follow-up of" in back.ImageComments
    for part in synthetic._name_parts("=".join(expected.split("=")[:2])):  # alphabetic and ideographic
        assert part in back.ImageComments and part in back.PatientComments
    if charset == "ISO 2022 IR 87":
        assert back.SpecificCharacterSet == ["", "ISO 2022 IR 87"]
        assert back.PatientName.ideographic == "山田^太郎"
        assert back.PatientName.phonetic == "やまだ^たろう"
        assert b"\x1b$B" in data
    elif charset == "ISO_IR 100":
        assert "é" in expected or "ü" in expected or "ë" in expected
        assert expected.encode("latin-1") in data
    else:
        assert not expected.isascii() and expected.encode("utf-8") in data


def test_un_and_private_elements_are_written_as_planted(planted):
    _, ds, plants, data = planted
    assert b"\x32\x00\x32\x10UN" in data  # RequestingPhysician (0032,1032) written with VR UN
    assert b"\x09\x00\x20\x10UN" in data
    back = pydicom.dcmread(io.BytesIO(data))
    assert "PHIMARK-UNPN" in str(back[0x00321032].value)  # pydicom restores the dictionary VR on reading
    assert 0x00110010 not in back and 0x00111001 in back  # the orphan private element
    assert back[0x00091010].VR == "SQ" and back[0x00091010].value[0][0x00090010].value == "ACME 1.1"
    assert back.pixel_array.shape == (back.Rows, back.Columns)
    assert 0x60003000 in back and 0x50003000 in back


def test_other_patients_have_other_markers():
    _, one = phi_instance("ISO_IR 100", patient=1)
    _, two = phi_instance("ISO_IR 100", patient=2)
    assert not set(one) & set(two)
    assert synthetic.phi_name("ISO_IR 100", 5) != synthetic.phi_name("ISO_IR 100", 1)


# ------------------------------------------------------------------ ultrasound


def test_us_rgb_with_text_boxes():
    ds, boxes = synthetic.us_rgb_with_text(["DOE^JANE", "PID-0001"], rows=120, columns=160)
    back = reread(ds)
    image = back.pixel_array
    assert image.shape == (120, 160, 3) and image.dtype == np.uint8
    assert back.BurnedInAnnotation == "YES" and back.PhotometricInterpretation == "RGB"
    assert [b.text for b in boxes] == ["DOE^JANE", "PID-0001"]
    for box in boxes:
        region = image[box.top:box.bottom, box.left:box.right]
        assert (region == 255).all(axis=2).any()  # white glyph pixels inside the box
    outside = image.copy()
    for box in boxes:
        outside[box.top:box.bottom, box.left:box.right] = 0
    assert not (outside == 255).all(axis=2)[:, :140].any()  # no white text outside the boxes (bar is at right)


def test_us_multiframe():
    ds, boxes = synthetic.us_multiframe(3, rows=96, columns=128)
    back = reread(ds)
    assert back.NumberOfFrames == 3
    frames = back.pixel_array
    assert frames.shape == (3, 96, 128, 3)
    assert not np.array_equal(frames[0], frames[1])
    assert boxes and all((frames[:, b.top:b.bottom, b.left:b.right] == 255).all(axis=3).any() for b in boxes)


def test_render_text():
    mask = synthetic.render_text(["AB", "1"], scale=1)
    assert mask.shape == (7 + 3 + 7, 11)
    assert mask[:7, :5].any() and not mask[:7, 5].any()
