"""Synthetic DICOM instances for tests and benchmarks.

Everything here is made up: names, identifiers, institutions and UIDs are derived from
the arguments (deterministically), and pixel values are generated with numpy.

* :func:`ct_series` / :func:`write_ct_series`: one study, one series of CT Image Storage
  slices with the header a real scanner writes (patient, study, series, equipment,
  image plane, CT image, request attributes, references, a private block) and a CT-like
  512x512 picture (body ellipse, lungs, spine, aorta, noise) in HU.
* :func:`phi_instance`: one CT instance with planted PHI in every kind of place a
  de-identifier must handle, each planted value recorded in a :class:`Plant`.
* :func:`us_rgb_with_text` / :func:`us_multiframe`: ultrasound images with text burned
  into the pixels (a small built-in bitmap font), returning the text boxes.

Several patients: pass other ``patient_id`` / ``patient_name`` (see :func:`patient_kwargs`)
to :func:`ct_series`, or ``patient=2, 3, ...`` to :func:`phi_instance`. Patient
characteristics (birth date, sex, address, ...) depend only on the patient ID and name;
study-level values (UIDs, date, accession) on the patient ID and ``seed``, so two
``ct_series`` calls for one patient with different seeds are two studies of that patient,
and the same seed with another ``series_number`` is a second series of the same study.

UIDs are 2.25 UIDs of name-based (version 5) UUIDs of the arguments: deterministic.
(pydicom 3.0's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores entropy_srcs and
returns a random UID, so it cannot be used for this.)
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import math
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmwrite
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_is_retired, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

__all__ = [
    "CT_IMAGE_STORAGE",
    "US_IMAGE_STORAGE",
    "US_MULTIFRAME_IMAGE_STORAGE",
    "PatientInfo",
    "Plant",
    "TextBox",
    "PHI_CHARSETS",
    "ct_series",
    "write_ct_series",
    "phi_instance",
    "phi_name",
    "patient_info",
    "patient_kwargs",
    "us_rgb_with_text",
    "us_multiframe",
    "render_text",
    "to_bytes",
    "find_needles",
    "surviving",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
RAW_DATA_STORAGE = "1.2.840.10008.5.1.4.1.1.66"
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
DETACHED_PATIENT_SOP_CLASS = "1.2.840.10008.3.1.2.1.1"
DETACHED_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"

IMPLEMENTATION_VERSION_NAME = "DEIDBENCH_1"
_ENTROPY_ROOT = "deid-router-bench-synthetic"

#: The SpecificCharacterSet variants :func:`phi_instance` can build.
PHI_CHARSETS = ("ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87")


_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:deid-router:bench:synthetic")


def _uid(*parts: object) -> str:
    """A deterministic 2.25 UID from the parts (a name-based, version 5 UUID).

    Not pydicom's ``generate_uid(prefix=None, entropy_srcs=...)``: with prefix None,
    pydicom 3.0 ignores entropy_srcs and returns a random UUID-based UID.
    """
    return f"2.25.{uuid.uuid5(_UUID_NAMESPACE, chr(31).join(map(str, parts))).int}"


_IMPLEMENTATION_CLASS_UID = _uid("implementation-class")


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(map(str, (_ENTROPY_ROOT, *parts))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _ds(value: float, decimals: int = 6) -> str:
    """A DS string (at most 16 characters), without trailing zeros."""
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------- patients

_FAMILY = ["DOE", "ROE", "SMITH", "JOHNSON", "NAKAMURA", "OKAFOR", "LINDQVIST", "MORENO", "KOWALSKI", "HASSAN"]
_GIVEN_F = ["JANE", "MARY", "AMINA", "SOFIA", "HANNA", "ELIF", "GRACE", "LUCIA"]
_GIVEN_M = ["JOHN", "RICHARD", "KOFI", "MATEO", "ERIK", "OMAR", "PETER", "TOMAS"]
_STREETS = ["Maple Street", "Harbour Road", "Station Lane", "Elm Avenue", "Mill Road", "Park Crescent"]
_TOWNS = ["Springfield", "Riverton", "Lakeside", "Fairview", "Kingsbridge", "Oakham"]


@dataclass(frozen=True)
class PatientInfo:
    """Patient module values; :func:`patient_info` derives the ones not given."""

    patient_id: str
    patient_name: str
    birth_date: str  # YYYYMMDD
    sex: str  # M / F / O
    weight_kg: str  # DS
    size_m: str  # DS
    address: str
    telephone: str
    other_patient_id: str
    issuer_of_patient_id: str
    mother_birth_name: str


def patient_info(patient_id: str, patient_name: str, *, birth_date: str | None = None,
                 sex: str | None = None) -> PatientInfo:
    """The patient's characteristics, derived from ID and name (stable across series)."""
    rng = _rng("patient", patient_id, patient_name)
    if birth_date is None:
        day = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 70 * 365)))
        birth_date = day.strftime("%Y%m%d")
    else:
        rng.integers(0, 70 * 365)  # keep the stream aligned
    drawn_sex = "F" if rng.random() < 0.5 else "M"
    given = (patient_name.split("^") + [""])[1].split(" ")[0].upper()
    if given in _GIVEN_F or given in _GIVEN_M:
        drawn_sex = "F" if given in _GIVEN_F else "M"
    sex = sex or drawn_sex
    weight = 50 + rng.random() * 50
    size = 1.50 + rng.random() * 0.40
    number = int(rng.integers(1, 200))
    address = f"{number} {_choice(rng, _STREETS)}^^{_choice(rng, _TOWNS)}^^{int(rng.integers(10000, 99999))}"
    telephone = f"555-{int(rng.integers(1000, 9999))}"
    other = f"MRN{int(rng.integers(10**7, 10**8))}"
    mother = f"{_choice(rng, _FAMILY)}^{_choice(rng, _GIVEN_F)}"
    return PatientInfo(
        patient_id=patient_id,
        patient_name=patient_name,
        birth_date=birth_date,
        sex=sex,
        weight_kg=_ds(weight, 1),
        size_m=_ds(size, 2),
        address=address,
        telephone=telephone,
        other_patient_id=other,
        issuer_of_patient_id="SPRINGFIELD-GH",
        mother_birth_name=mother,
    )


def patient_kwargs(n: int) -> dict[str, str]:
    """``patient_id`` and ``patient_name`` of the n-th synthetic patient (n >= 1).

    ``patient_kwargs(1)`` is the default patient of :func:`ct_series` (PID-0001, DOE^JANE).
    """
    if n < 1:
        raise ValueError("patients are numbered from 1")
    if n == 1:
        return {"patient_id": "PID-0001", "patient_name": "DOE^JANE"}
    family = _FAMILY[(n - 1) % len(_FAMILY)]
    givens = _GIVEN_M if n % 2 == 0 else _GIVEN_F
    given = givens[((n - 1) // 2) % len(givens)]
    if n > len(_FAMILY):
        family = f"{family}{(n - 1) // len(_FAMILY) + 1}"  # keep names distinct
    return {"patient_id": f"PID-{n:04d}", "patient_name": f"{family}^{given}"}


def _age(birth_date: str, on: str) -> str:
    b = dt.datetime.strptime(birth_date, "%Y%m%d").date()
    d = dt.datetime.strptime(on, "%Y%m%d").date()
    years = d.year - b.year - ((d.month, d.day) < (b.month, b.day))
    return f"{max(years, 0):03d}Y"


def _charset_for(*texts: str) -> str:
    try:
        for text in texts:
            text.encode("latin-1")
    except UnicodeEncodeError:
        return "ISO_IR 192"
    return "ISO_IR 100"


# --------------------------------------------------------------------------- CT phantom


class _CTPhantom:
    """A CT-like axial slice generator: fixed anatomy precomputed, lungs/liver per z.

    Values are stored values (HU + 1024) in int16; outside the scan field of view the
    padding value -2000 (PixelPaddingValue).
    """

    PADDING = -2000
    NOISE_PAD = 8191

    def __init__(self, rows: int, columns: int, rng: np.random.Generator, noise_hu: float = 12.0):
        self.rows, self.columns = rows, columns
        v = ((np.arange(rows, dtype=np.float32) + 0.5) / rows - 0.5)[:, None]
        u = ((np.arange(columns, dtype=np.float32) + 0.5) / columns - 0.5)[None, :]

        def ellipse(cu: float, cv: float, au: float, av: float) -> np.ndarray:
            return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2

        def hu(value: float) -> int:
            return int(round(value)) + 1024

        img = np.full((rows, columns), hu(-1000), dtype=np.int16)
        # couch: two thin curved shells below the body
        couch = (np.abs(v - 0.33 - 0.25 * u**2) < 0.006) & (np.abs(u) < 0.42)
        img[couch] = hu(250)
        couch2 = (np.abs(v - 0.355 - 0.25 * u**2) < 0.004) & (np.abs(u) < 0.40)
        img[couch2] = hu(150)
        img[ellipse(0.0, 0.02, 0.40, 0.28) < 1] = hu(-100)  # subcutaneous fat
        img[ellipse(0.0, 0.02, 0.37, 0.25) < 1] = hu(40)  # soft tissue
        img[ellipse(0.0, 0.13, 0.045, 0.045) < 1] = hu(650)  # vertebral body, cortex
        img[ellipse(0.0, 0.13, 0.033, 0.033) < 1] = hu(250)  # trabecular bone
        img[ellipse(0.0, 0.195, 0.028, 0.022) < 1] = hu(700)  # posterior arch
        img[ellipse(0.0, 0.19, 0.014, 0.014) < 1] = hu(20)  # spinal canal
        img[ellipse(0.035, 0.06, 0.022, 0.022) < 1] = hu(160)  # aorta, contrast
        img[ellipse(-0.03, 0.04, 0.02, 0.02) < 1] = hu(120)  # vena cava
        for side in (-1, 1):  # ribs
            for k in range(5):
                angle = 0.45 + 0.45 * k
                ru, rv = 0.355 * math.cos(angle) * side, 0.235 * math.sin(angle) + 0.02
                img[ellipse(ru, rv, 0.01, 0.01) < 1] = hu(800)
        self.base = img
        self.outside = ellipse(0.0, 0.0, 0.5, 0.5) >= 1
        self.lungs = np.minimum(ellipse(-0.19, -0.005, 0.12, 0.19), ellipse(0.19, -0.005, 0.12, 0.19))
        self.liver = ellipse(-0.15, -0.02, 0.17, 0.13)
        self.lung_value = hu(-850)
        self.liver_value = hu(60)
        noise = rng.normal(0.0, noise_hu, size=rows * columns + self.NOISE_PAD + 1)
        self.noise = np.rint(noise).astype(np.int16)
        self._mask = np.empty((rows, columns), dtype=bool)

    def slice(self, index: int, count: int) -> np.ndarray:
        """Slice ``index`` of ``count`` (head to feet): lungs above, liver below."""
        t = (index + 0.5) / max(count, 1)
        img = self.base.copy()
        if t > 0.4:
            np.less(self.liver, min(1.0, (t - 0.4) * 4), out=self._mask)
            np.putmask(img, self._mask, self.liver_value)
        if t < 0.65:
            scale = math.sin(math.pi * min(t / 0.65, 1.0) * 0.5 + 0.15) ** 0.5
            np.less(self.lungs, scale * scale, out=self._mask)
            np.putmask(img, self._mask, self.lung_value)
        offset = (index * 1237) % self.NOISE_PAD
        img += self.noise[offset:offset + img.size].reshape(img.shape)
        np.putmask(img, self.outside, self.PADDING)
        return img


# --------------------------------------------------------------------------- CT series


def _file_meta(sop_class: str, sop_instance: str, source_ae: str = "CT01_SOMATOM") -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = source_ae
    return meta


def _item(**elements: Any) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _add_private_block(ds: Dataset, patient_name: str, series_uid: str) -> None:
    block = ds.private_block(0x0009, "ACME 1.1", create=True)
    block.add_new(0x01, "LO", "ACME_THORAX_ROUTINE_V3")
    block.add_new(0x02, "PN", patient_name)
    block.add_new(0x03, "DS", ["1.25", "0.6"])
    block.add_new(0x04, "UL", 184)
    block.add_new(0x05, "UI", series_uid)
    block.add_new(0x06, "SH", "RECON_02")


def _ct_header(info: PatientInfo, *, seed: int, rows: int, columns: int, series_number: int,
               study_date: str | None, accession_number: str | None) -> tuple[Dataset, dict[str, Any]]:
    """The header shared by every slice of one series, and the values slices derive from."""
    pid = info.patient_id
    srng = _rng("study", pid, seed)
    if study_date is None:
        day = dt.date(2022, 1, 3) + dt.timedelta(days=int(srng.integers(0, 900)))
        study_date = day.strftime("%Y%m%d")
    else:
        srng.integers(0, 900)
    hour, minute, second = int(srng.integers(7, 18)), int(srng.integers(0, 60)), int(srng.integers(0, 60))
    study_time = f"{hour:02d}{minute:02d}{second:02d}.{int(srng.integers(0, 1000)):03d}000"
    series_start = dt.datetime.strptime(study_date + study_time[:6], "%Y%m%d%H%M%S") + dt.timedelta(
        seconds=60 + 40 * series_number)
    if accession_number is None:
        accession_number = f"A{int(srng.integers(10**8, 10**9))}"
    study_uid = _uid("study", pid, seed)
    series_uid = _uid("series", pid, seed, series_number)
    frame_uid = _uid("frame-of-reference", pid, seed)
    charset = _charset_for(info.patient_name)
    fov = 380.0 if columns >= 256 else 0.742 * columns
    spacing = fov / columns
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"]
    ds.InstanceCreationDate = study_date
    ds.InstanceCreationTime = series_start.strftime("%H%M%S.%f")
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.AcquisitionDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = study_time
    ds.SeriesTime = series_start.strftime("%H%M%S.%f")
    ds.AccessionNumber = accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "SIEMENS"
    ds.InstitutionName = "Springfield General Hospital"
    ds.InstitutionAddress = "1 Hospital Way, Springfield, SP1 2AB"
    ds.ReferringPhysicianName = "WELBY^MARCUS^^DR"
    ds.StationName = "CTAWP73245"
    ds.StudyDescription = "CT Thorax Abdomen Pelvis w contrast"
    ds.ProcedureCodeSequence = [_code("CTTAP", "99SPRGH", "CT Thorax Abdomen Pelvis w contrast")]
    ds.SeriesDescription = f"Thorax 1.0 Br40 {series_number}"
    ds.InstitutionalDepartmentName = "Radiology"
    ds.PerformingPhysicianName = "HOUSE^GREGORY"
    ds.OperatorsName = ["NIGHTINGALE^FLORENCE"]
    ds.ManufacturerModelName = "SOMATOM Definition AS+"
    ds.ReferencedPerformedProcedureStepSequence = [_item(
        ReferencedSOPClassUID=MPPS_SOP_CLASS, ReferencedSOPInstanceUID=_uid("mpps", pid, seed))]
    ds.ReferencedImageSequence = [
        _item(ReferencedSOPClassUID=CT_IMAGE_STORAGE, ReferencedSOPInstanceUID=_uid("topogram", pid, seed, k))
        for k in (1, 2)
    ]
    ds.SourceImageSequence = [_item(
        ReferencedSOPClassUID=RAW_DATA_STORAGE, ReferencedSOPInstanceUID=_uid("raw", pid, seed, series_number))]
    _add_private_block(ds, info.patient_name, series_uid)
    ds.PatientName = info.patient_name
    ds.PatientID = pid
    ds.IssuerOfPatientID = info.issuer_of_patient_id
    ds.PatientBirthDate = info.birth_date
    ds.PatientSex = info.sex
    ds.OtherPatientIDs = info.other_patient_id
    ds.OtherPatientIDsSequence = [_item(
        PatientID=info.other_patient_id, IssuerOfPatientID="SPRINGFIELD-RIS", TypeOfPatientID="TEXT")]
    ds.PatientAge = _age(info.birth_date, study_date)
    ds.PatientSize = info.size_m
    ds.PatientWeight = info.weight_kg
    ds.PatientAddress = info.address
    ds.PatientTelephoneNumbers = info.telephone
    ds.PatientMotherBirthName = info.mother_birth_name
    ds.PatientIdentityRemoved = "NO"
    ds.BodyPartExamined = "CHEST"
    ds.ContrastBolusAgent = "Omnipaque 350"
    ds.ScanOptions = "HELICAL_CT"
    ds.SliceThickness = "1"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = "73245"
    ds.SoftwareVersions = "syngo CT VA48A"
    ds.ProtocolName = "Thorax_Abd_Pelvis_Routine"
    ds.ReconstructionDiameter = _ds(fov)
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "152"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = 285
    ds.Exposure = 142
    ds.FilterType = "FLAT"
    ds.GeneratorPower = 34
    ds.FocalSpots = "1.2"
    ds.DateOfLastCalibration = study_date
    ds.TimeOfLastCalibration = "071512.000000"
    ds.ConvolutionKernel = "B40f"
    ds.PatientPosition = "HFS"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.6
    ds.TotalCollimationWidth = 38.4
    ds.TableSpeed = 92.2
    ds.TableFeedPerRotation = 46.1
    ds.SpiralPitchFactor = 1.2
    ds.ExposureModulationType = "XYZ_EC"
    ds.CTDIvol = 8.62
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(1 + seed % 9999)
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 2
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 1
    ds.add_new(0x00280120, "SS", _CTPhantom.PADDING)  # PixelPaddingValue
    ds.WindowCenter = ["40", "-600"]
    ds.WindowWidth = ["400", "1200"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenterWidthExplanation = ["WINDOW1", "WINDOW2"]
    ds.LossyImageCompression = "00"
    ds.RequestingPhysician = "WELBY^MARCUS^^DR"
    ds.RequestedProcedureDescription = "CT Thorax Abdomen Pelvis w contrast"
    ds.PerformedProcedureStepStartDate = study_date
    ds.PerformedProcedureStepStartTime = study_time
    ds.PerformedProcedureStepID = f"PPS{int(srng.integers(10**5, 10**6))}"
    ds.PerformedProcedureStepDescription = "CT Thorax Abdomen Pelvis w contrast"
    ds.RequestAttributesSequence = [_item(
        AccessionNumber=accession_number,
        StudyInstanceUID=study_uid,
        RequestedProcedureDescription="CT Thorax Abdomen Pelvis w contrast",
        RequestedProcedureCodeSequence=[_code("CTTAP", "99SPRGH", "CT Thorax Abdomen Pelvis w contrast")],
        ScheduledProcedureStepDescription="CT TAP",
        ScheduledProtocolCodeSequence=[_code("CTTAP-R", "99SPRGH", "Thorax Abdomen Pelvis routine")],
        ScheduledProcedureStepID=f"SPS{int(srng.integers(10**5, 10**6))}",
        RequestedProcedureID=f"RP{int(srng.integers(10**5, 10**6))}",
        ReferencedStudySequence=[_item(
            ReferencedSOPClassUID=DETACHED_STUDY_SOP_CLASS, ReferencedSOPInstanceUID=study_uid)],
    )]
    ds.IrradiationEventUID = _uid("irradiation-event", pid, seed, series_number)
    ds.ContributingEquipmentSequence = [_item(
        Manufacturer="SIEMENS",
        InstitutionName="Springfield General Hospital",
        StationName="CTAWP73245",
        PurposeOfReferenceCodeSequence=[_code("109101", "DCM", "Acquisition Equipment")],
        ContributionDateTime=study_date + study_time,
    )]
    start = dt.datetime.strptime(study_date + ds.SeriesTime[:6], "%Y%m%d%H%M%S")
    per_slice = {
        "start": start,
        "spacing": spacing,
        "x0": -(columns / 2 - 0.5) * spacing,
        "y0": -(rows / 2 - 0.5) * spacing - 30.0,
        "z0": -40.0 - (2.0 * seed) % 50,
        "pid": pid,
        "seed": seed,
    }
    return ds, per_slice


def _clone(ds: Dataset) -> Dataset:
    """A copy of a header built here, independent where it matters, ~2x faster than deepcopy."""
    elements = {}
    for elem in ds.elements():
        if elem.VR == "SQ":
            clone = DataElement(elem.tag, "SQ", DicomSequence([_clone(item) for item in elem.value]))
        else:
            clone = copy.copy(elem)
            if isinstance(elem.value, MultiValue):
                clone.value = list(elem.value)
        elements[elem.tag] = clone
    return Dataset(elements)


def ct_series(
    count: int,
    *,
    patient_id: str = "PID-0001",
    patient_name: str = "DOE^JANE",
    seed: int = 0,
    rows: int = 512,
    columns: int = 512,
    series_number: int = 2,
    slice_spacing: float = 1.0,
    birth_date: str | None = None,
    sex: str | None = None,
    study_date: str | None = None,
    accession_number: str | None = None,
) -> Iterator[Dataset]:
    """``count`` slices of one CT series (Explicit VR Little Endian, with file meta).

    Deterministic given the arguments. Slices are independent Datasets (safe to modify).
    ``series_number`` selects the series within the study (same study for the same
    patient_id and seed). ``birth_date``, ``sex``, ``study_date`` (YYYYMMDD) and
    ``accession_number`` override the derived values.
    """
    return _ct_slices(count, patient_id=patient_id, patient_name=patient_name, seed=seed, rows=rows,
                      columns=columns, series_number=series_number, slice_spacing=slice_spacing,
                      birth_date=birth_date, sex=sex, study_date=study_date,
                      accession_number=accession_number, independent=True)


def _ct_slices(count: int, *, patient_id: str, patient_name: str, seed: int, rows: int, columns: int,
               series_number: int, slice_spacing: float, birth_date: str | None, sex: str | None,
               study_date: str | None, accession_number: str | None, independent: bool) -> Iterator[Dataset]:
    """The slices of ct_series; independent=False yields one dataset, updated per slice (for writing)."""
    info = patient_info(patient_id, patient_name, birth_date=birth_date, sex=sex)
    header, p = _ct_header(info, seed=seed, rows=rows, columns=columns, series_number=series_number,
                           study_date=study_date, accession_number=accession_number)
    phantom = _CTPhantom(rows, columns, _rng("noise", seed))
    x0, y0, z0 = _ds(p["x0"]), _ds(p["y0"]), p["z0"]
    for index in range(count):
        sop_uid = _uid("sop", p["pid"], p["seed"], series_number, index)
        ds = _clone(header) if independent else header
        ds.file_meta = _file_meta(CT_IMAGE_STORAGE, sop_uid)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = index + 1
        z = _ds(z0 - index * slice_spacing, 3)
        ds.ImagePositionPatient = [x0, y0, z]
        ds.SliceLocation = z
        moment = (p["start"] + dt.timedelta(seconds=5 + index * 0.0217)).strftime("%H%M%S.%f")
        ds.AcquisitionTime = moment
        ds.ContentTime = moment
        ds.PixelData = phantom.slice(index, count).tobytes()
        ds["PixelData"].VR = "OW"
        yield ds


def write_ct_series(
    folder: Path,
    count: int,
    *,
    patient_id: str = "PID-0001",
    patient_name: str = "DOE^JANE",
    seed: int = 0,
    **options: Any,
) -> list[Path]:
    """Write :func:`ct_series` as Part 10 files ``ct_0001.dcm`` ... into folder (created).

    ``options`` go to :func:`ct_series` (rows, columns, series_number, study_date, ...).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    width = max(4, len(str(count)))
    settings: dict[str, Any] = dict(rows=512, columns=512, series_number=2, slice_spacing=1.0, birth_date=None,
                                    sex=None, study_date=None, accession_number=None)
    unknown = set(options) - set(settings)
    if unknown:
        raise TypeError(f"write_ct_series: unknown options {sorted(unknown)}")
    settings.update(options)
    slices = _ct_slices(count, patient_id=patient_id, patient_name=patient_name, seed=seed,
                        independent=False, **settings)
    for index, ds in enumerate(slices, start=1):
        path = folder / f"ct_{index:0{width}d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_ct_multiframe(path: Path, frames: int, *, text_lines: Sequence[str] = ("DOE^JANE", "PID-0001")) -> Path:
    """One CT instance of ``frames`` 512x512 frames (a slice repeated, 0.5 MB each) with the
    text burned into every frame at the top left, as a Part 10 file at path: a large
    instance for the node's memory."""
    ds = next(iter(ct_series(1)))
    picture = ds.pixel_array
    mask = render_text(text_lines)
    picture[20:20 + mask.shape[0], 20:20 + mask.shape[1]][mask] = picture.max()
    ds.NumberOfFrames = frames
    ds.PixelData = np.repeat(picture[None], frames, axis=0).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def to_bytes(ds: Dataset) -> bytes:
    """The Part 10 file bytes of ds (which needs file_meta)."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------- planted PHI


@dataclass(frozen=True)
class Plant:
    """One planted identifying value in :func:`phi_instance`.

    ``marker`` is the key in the returned dict: for text an ASCII token
    ``PHIMARK-<LABEL>-<patient:03d>`` contained in the value; for UIDs, dates and the
    patient's own (possibly non-ASCII) name the value itself; for binary data (overlay,
    curve) the ASCII token written into the bytes.

    ``needles`` are byte strings present in the written file (encoded in the instance's
    character set) whose survival in a de-identified output means the value survived.
    Some values are also quoted as substrings elsewhere (name components and IDs in the
    free-text elements; the study date in date-times), so a needle found in the output
    may come from another location: ``surviving`` reports per plant.
    """

    marker: str
    value: str
    kind: str  # patient, date, uid, name, free-text, descriptor, institution, device, private, overlay, curve, structured, retired, un
    vr: str  # the VR written in the file
    locations: tuple[str, ...]  # e.g. "ContributingEquipmentSequence[0].OperatorIdentificationSequence[0].InstitutionName"
    tag_paths: tuple[tuple[int, ...], ...]  # the same as tags: (seq tag, ..., element tag)
    needles: tuple[bytes, ...]
    depth: int = 0  # sequence nesting of the (first) location; 0 = top level
    retired: bool = False

    def found_in(self, data: bytes) -> list[bytes]:
        return [needle for needle in self.needles if needle in data]


def find_needles(data: bytes, plants: dict[str, Plant] | Iterable[Plant]) -> dict[str, list[bytes]]:
    """For each plant with a needle in data: marker -> the needles found."""
    values = plants.values() if isinstance(plants, dict) else plants
    return {p.marker: found for p in values if (found := p.found_in(data))}


surviving = find_needles


# Names per charset: patient n uses entry (n-1) % len, suffixed beyond the list.
_PHI_NAMES: dict[str, list[str]] = {
    "ISO_IR 100": ["Müller^Zoë", "Sørensen^Jürgen", "Gómez^Inés", "Lefèvre^Hélène"],
    "ISO_IR 192": ["Παπαδοπούλου^Ελένη", "Иванова^Анна", "Wang^XiaoDong=王^小東", "Κωνσταντίνου^Δημήτρης"],
    "ISO 2022 IR 87": [
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "Suzuki^Hanako=鈴木^花子=すずき^はなこ",
        "Tanaka^Ichirou=田中^一郎=たなか^いちろう",
    ],
}


def phi_name(charset: str, patient: int = 1) -> str:
    """The PatientName :func:`phi_instance` uses for this charset and patient."""
    names = _PHI_NAMES[charset]
    name = names[(patient - 1) % len(names)]
    if patient > len(names):
        family, rest = name.split("^", 1)
        name = f"{family}{(patient - 1) // len(names) + 1}^{rest}"
    return name


def _name_parts(name: str) -> list[str]:
    """The non-empty components of a PN value, all groups."""
    return [part for group in name.split("=") for part in group.split("^") if part]


class _Planter:
    def __init__(self, encodings: list[str], patient: int):
        self.encodings = encodings
        self.patient = patient
        self.plants: dict[str, Plant] = {}

    def token(self, label: str) -> str:
        return f"PHIMARK-{label}-{self.patient:03d}"

    def encode(self, text: str) -> bytes:
        encoded = encode_string(text, self.encodings)
        # pydicom may open a text value with an escape to ASCII (ESC ( B); not part of the needle
        return encoded[3:] if encoded.startswith(b"\x1b(B") else encoded

    def put(self, container: Dataset, path: tuple[tuple[int, int], ...], tag: int, vr: str, value: Any, *,
            kind: str, marker: str | None = None, needles: Sequence[bytes] | None = None,
            raw: bytes | None = None) -> Any:
        """Set tag in container (at sequence path) and record it under marker (or the value)."""
        if vr == "UN":
            # DataElement() turns UN into the dictionary VR of a standard tag: set UN afterwards
            elem = DataElement(tag, "OB", raw if raw is not None else value)
            elem.VR = "UN"
        else:
            elem = DataElement(tag, vr, raw if raw is not None else value)
        container.add(elem)
        self.record(marker or str(value), str(value), kind, vr, path, tag, needles)
        return value

    def record(self, marker: str, value: str, kind: str, vr: str, path: tuple[tuple[int, int], ...], tag: int,
               needles: Sequence[bytes] | None = None) -> None:
        location = "".join(f"{_name(t)}[{i}]." for t, i in path) + _name(tag)
        tag_path = (*(t for t, _ in path), tag)
        if marker in self.plants:  # the same value at another location
            old = self.plants[marker]
            self.plants[marker] = Plant(old.marker, old.value, old.kind, old.vr, (*old.locations, location),
                                        (*old.tag_paths, tag_path), old.needles, old.depth, old.retired)
            return
        if needles is None:
            needles = (marker.encode("ascii"),) if marker.isascii() else (self.encode(marker),)
        self.plants[marker] = Plant(marker, value, kind, vr, (location,), (tag_path,), tuple(needles),
                                    len(path), _is_retired(tag))


def _name(tag: int) -> str:
    """The keyword of a standard tag; "(gggg,eeee)" for private and repeating-group (50xx, 60xx) ones."""
    group = tag >> 16
    keyword = keyword_for_tag(tag) if group % 2 == 0 and group & 0xFF00 not in (0x5000, 0x6000) else ""
    return keyword or f"({group:04X},{tag & 0xFFFF:04X})"


def _is_retired(tag: int) -> bool:
    try:
        return bool((tag >> 16) % 2 == 0 and dictionary_is_retired(tag))
    except KeyError:
        return False


def _tag(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag


def phi_instance(
    charset: str = "ISO_IR 100",
    *,
    patient: int = 1,
    seed: int = 0,
    rows: int = 64,
    columns: int = 64,
) -> tuple[Dataset, dict[str, Plant]]:
    """One CT instance with planted PHI everywhere; returns it and marker -> :class:`Plant`.

    ``charset`` is the SpecificCharacterSet ("ISO_IR 100" Latin-1 name with accents,
    "ISO_IR 192" UTF-8 non-Latin name, "ISO 2022 IR 87" Japanese name with ideographic
    and phonetic groups, written as "\\ISO 2022 IR 87"). ``patient`` (1, 2, ...) picks
    another name, ID, birth date, markers and UIDs; ``seed`` varies the UIDs too.
    """
    if charset not in PHI_CHARSETS:
        raise ValueError(f"charset must be one of {PHI_CHARSETS}")
    specific = ["", "ISO 2022 IR 87"] if charset == "ISO 2022 IR 87" else charset
    encodings = convert_encodings(specific if isinstance(specific, list) else [specific])
    p = _Planter(encodings, patient)
    tok = p.token
    T = _tag
    key = ("phi", charset, patient, seed)
    rng = _rng(*key)

    name = phi_name(charset, patient)
    parts = _name_parts(name)
    alpha_family, alpha_given = name.split("=")[0].split("^")[:2]
    ideographic = " ".join(_name_parts(name.split("=")[1])) if "=" in name else ""
    spoken = f"{alpha_family} {alpha_given}" + (f" {ideographic}" if ideographic else "")
    patient_id = tok("PID")
    accession = tok("ACC")
    birth = (dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60 * 365)))).strftime("%Y%m%d")
    study_day = dt.date(2021, 1, 4) + dt.timedelta(days=int(rng.integers(0, 1000)))
    study_date = study_day.strftime("%Y%m%d")
    other_dates = [(study_day - dt.timedelta(days=d)).strftime("%Y%m%d") for d in (3, 17, 41, 97, 5, 230)]
    uids = {label: _uid(*key, label) for label in (
        "study", "series", "sop", "frame", "irradiation", "ref-image", "source-image", "mpps",
        "ref-patient", "ref-study", "sr-uid", "private-uid")}

    ds = Dataset()
    top: tuple[tuple[int, int], ...] = ()
    ds.SpecificCharacterSet = specific
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    p.put(ds, top, T("SOPInstanceUID"), "UI", uids["sop"], kind="uid")
    p.put(ds, top, T("StudyInstanceUID"), "UI", uids["study"], kind="uid")
    p.put(ds, top, T("SeriesInstanceUID"), "UI", uids["series"], kind="uid")
    p.put(ds, top, T("FrameOfReferenceUID"), "UI", uids["frame"], kind="uid")
    p.put(ds, top, T("IrradiationEventUID"), "UI", uids["irradiation"], kind="uid")
    ds.file_meta = _file_meta(CT_IMAGE_STORAGE, uids["sop"], source_ae="PHI_SCANNER")

    # patient module
    p.put(ds, top, T("PatientName"), "PN", name, kind="patient",
          needles=[p.encode(part) for part in parts])
    p.put(ds, top, T("PatientID"), "LO", patient_id, kind="patient")
    p.put(ds, top, T("IssuerOfPatientID"), "LO", tok("IPID"), kind="patient")
    p.put(ds, top, T("PatientBirthDate"), "DA", birth, kind="date")
    ds.PatientSex = "F" if patient % 2 else "M"
    ds.PatientAge = _age(birth, study_date)
    ds.PatientWeight = "71.5"
    ds.PatientSize = "1.68"
    p.put(ds, top, T("OtherPatientNames"), "PN", f"{tok('OPN')}^{alpha_given}", kind="patient",
          marker=tok("OPN"))
    p.put(ds, top, T("OtherPatientIDs"), "LO", tok("OPID"), kind="retired")
    opid_item = Dataset()
    p.put(opid_item, ((T("OtherPatientIDsSequence"), 0),), T("PatientID"), "LO", tok("OPIDSQ"), kind="patient")
    opid_item.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [opid_item]
    p.put(ds, top, T("PatientAddress"), "LO", f"{tok('ADDR')} 12 Harbour Road^^Riverton", kind="patient",
          marker=tok("ADDR"))
    p.put(ds, top, T("PatientTelephoneNumbers"), "SH", tok("TEL"), kind="patient")
    p.put(ds, top, T("PatientMotherBirthName"), "PN", f"{tok('MBN')}^Maria", kind="patient", marker=tok("MBN"))
    p.put(ds, top, T("MedicalRecordLocator"), "LO", tok("MRL"), kind="retired")
    p.put(ds, top, T("PatientComments"), "LT",
          f"{tok('PCOM')} Patient {spoken}, ID {patient_id}, accession {accession}; allergic to iodine.",
          kind="free-text", marker=tok("PCOM"))
    p.put(ds, top, T("AdditionalPatientHistory"), "LT",
          f"{tok('HIST')} {alpha_family} ({patient_id}) had a prior CT on {other_dates[5]}; "
          f"referred by Dr. Welby.", kind="free-text", marker=tok("HIST"))

    # general study
    p.put(ds, top, T("StudyDate"), "DA", study_date, kind="date")
    for keyword in ("SeriesDate", "AcquisitionDate", "ContentDate"):
        p.put(ds, top, T(keyword), "DA", study_date, kind="date")
    ds.StudyTime = "101530.250000"
    ds.SeriesTime = "102004.000000"
    ds.AcquisitionTime = "102011.125000"
    ds.ContentTime = "102011.125000"
    p.put(ds, top, T("AcquisitionDateTime"), "DT", study_date + "102011.125000", kind="date",
          marker=study_date, needles=[study_date.encode()])
    p.put(ds, top, T("AccessionNumber"), "SH", accession, kind="patient")
    p.put(ds, top, T("StudyID"), "SH", tok("SID"), kind="patient")
    p.put(ds, top, T("ReferringPhysicianName"), "PN", f"{tok('RPN')}^Marcus^^Dr", kind="name", marker=tok("RPN"))
    p.put(ds, top, T("NameOfPhysiciansReadingStudy"), "PN", f"{tok('NPR')}^Lisa", kind="name", marker=tok("NPR"))
    p.put(ds, top, T("StudyDescription"), "LO", f"{tok('SDSC')} CT {alpha_family} {patient_id}",
          kind="free-text", marker=tok("SDSC"))
    ds.Modality = "CT"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    p.put(ds, top, T("SeriesDescription"), "LO", f"{tok('SRDS')} {alpha_given} {alpha_family} thorax",
          kind="free-text", marker=tok("SRDS"))
    p.put(ds, top, T("ProtocolName"), "LO", f"{tok('PROT')} Thorax", kind="descriptor", marker=tok("PROT"))
    p.put(ds, top, T("OperatorsName"), "PN", f"{tok('OPER')}^Florence", kind="name", marker=tok("OPER"))
    p.put(ds, top, T("PerformingPhysicianName"), "PN", f"{tok('PERF')}^Gregory", kind="name", marker=tok("PERF"))
    p.put(ds, top, T("PerformedProcedureStepDescription"), "LO", f"{tok('PPSD')} CT chest", kind="descriptor",
          marker=tok("PPSD"))
    p.put(ds, top, T("ImageComments"), "LT",
          f"{tok('IMGC')} Follow-up of {spoken} (MRN {patient_id}), accession {accession}.",
          kind="free-text", marker=tok("IMGC"))
    ds.BodyPartExamined = "CHEST"

    # equipment
    ds.Manufacturer = "ACME Medical"
    ds.ManufacturerModelName = "ACME CT 64"
    ds.SoftwareVersions = "1.1"
    p.put(ds, top, T("InstitutionName"), "LO", f"{tok('INST')} General Hospital", kind="institution",
          marker=tok("INST"))
    p.put(ds, top, T("InstitutionAddress"), "ST", f"{tok('IADR')} 1 Hospital Way, Springfield",
          kind="institution", marker=tok("IADR"))
    p.put(ds, top, T("InstitutionalDepartmentName"), "LO", tok("DEPT"), kind="institution")
    p.put(ds, top, T("StationName"), "SH", tok("STN"), kind="device")
    p.put(ds, top, T("DeviceSerialNumber"), "LO", tok("DSN"), kind="device")

    # references with UIDs
    for keyword, sop_class, label in (
        ("ReferencedImageSequence", CT_IMAGE_STORAGE, "ref-image"),
        ("SourceImageSequence", RAW_DATA_STORAGE, "source-image"),
        ("ReferencedStudySequence", DETACHED_STUDY_SOP_CLASS, "ref-study"),
        ("ReferencedPerformedProcedureStepSequence", MPPS_SOP_CLASS, "mpps"),
        ("ReferencedPatientSequence", DETACHED_PATIENT_SOP_CLASS, "ref-patient"),
    ):
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        p.put(item, ((T(keyword), 0),), T("ReferencedSOPInstanceUID"), "UI", uids[label], kind="uid")
        setattr(ds, keyword, [item])

    # RequestAttributesSequence > ReferencedStudySequence / ScheduledProtocolCodeSequence
    ras = ((T("RequestAttributesSequence"), 0),)
    request = Dataset()
    p.put(request, ras, T("AccessionNumber"), "SH", accession, kind="patient")
    p.put(request, ras, T("StudyInstanceUID"), "UI", uids["study"], kind="uid")
    p.put(request, ras, T("RequestedProcedureID"), "SH", tok("RQID"), kind="patient")
    p.put(request, ras, T("ScheduledProcedureStepID"), "SH", tok("SPID"), kind="patient")
    p.put(request, ras, T("RequestedProcedureDescription"), "LO", f"{tok('RQPD')} CT for {alpha_family}",
          kind="free-text", marker=tok("RQPD"))
    p.put(request, ras, T("ReasonForTheRequestedProcedure"), "LO", f"{tok('RFRP')} cough, {alpha_given}",
          kind="free-text", marker=tok("RFRP"))
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = DETACHED_STUDY_SOP_CLASS
    p.put(study_ref, (*ras, (T("ReferencedStudySequence"), 0)), T("ReferencedSOPInstanceUID"), "UI",
          uids["study"], kind="uid")
    request.ReferencedStudySequence = [study_ref]
    protocol = _code("CTCH", "99ACME", "CT chest routine")
    request.ScheduledProtocolCodeSequence = [protocol]
    ds.RequestAttributesSequence = [request]

    # ContributingEquipmentSequence (no action of its own) > OperatorIdentificationSequence
    #   > PersonIdentificationCodeSequence: PHI 3 levels down inside a retained sequence
    ces = ((T("ContributingEquipmentSequence"), 0),)
    equipment = Dataset()
    equipment.Manufacturer = "ACME Medical"
    equipment.PurposeOfReferenceCodeSequence = [_code("109101", "DCM", "Acquisition Equipment")]
    p.put(equipment, ces, T("InstitutionName"), "LO", f"{tok('CEIN')} Imaging Center", kind="institution",
          marker=tok("CEIN"))
    p.put(equipment, ces, T("StationName"), "SH", tok("CESN"), kind="device")
    p.put(equipment, ces, T("ContributionDateTime"), "DT", other_dates[0] + "080000", kind="date",
          marker=other_dates[0])
    p.put(equipment, ces, T("ContributionDescription"), "ST", f"{tok('CEDS')} re-sent for {alpha_family}",
          kind="free-text", marker=tok("CEDS"))
    ois = (*ces, (T("OperatorIdentificationSequence"), 0))
    operator = Dataset()
    p.put(operator, ois, T("InstitutionName"), "LO", f"{tok('OIIN')} Clinic", kind="institution",
          marker=tok("OIIN"))
    p.put(operator, ois, T("PersonAddress"), "ST", f"{tok('OIAD')} 4 Elm Avenue", kind="name", marker=tok("OIAD"))
    p.put(operator, ois, T("PersonTelephoneNumbers"), "LO", tok("OITE"), kind="name")
    pic = (*ois, (T("PersonIdentificationCodeSequence"), 0))
    person_code = Dataset()
    p.put(person_code, pic, T("CodeValue"), "SH", tok("PICV"), kind="name")
    person_code.CodingSchemeDesignator = "99ACME"
    p.put(person_code, pic, T("CodeMeaning"), "LO", f"{tok('PICM')} Nightingale", kind="name", marker=tok("PICM"))
    operator.PersonIdentificationCodeSequence = [person_code]
    equipment.OperatorIdentificationSequence = [operator]
    ds.ContributingEquipmentSequence = [equipment]

    # ContentSequence 3 levels deep: TEXT, PNAME, DATE, DATETIME, UIDREF items
    cs = T("ContentSequence")
    root = _item(ValueType="CONTAINER", RelationshipType="CONTAINS", ContinuityOfContent="SEPARATE",
                 ConceptNameCodeSequence=[_code("121070", "DCM", "Findings")])
    middle = _item(ValueType="CONTAINER", RelationshipType="CONTAINS", ContinuityOfContent="SEPARATE",
                   ConceptNameCodeSequence=[_code("121071", "DCM", "Finding")])
    leaf_path = ((cs, 0), (cs, 0))
    leaves = []
    for index, (value_type, keyword, vr, value, kind, marker) in enumerate((
        ("TEXT", "TextValue", "UT", f"{tok('SRTX')} {spoken} {patient_id} nodule stable", "structured",
         tok("SRTX")),
        ("PNAME", "PersonName", "PN", f"{tok('SRPN')}^Observer", "name", tok("SRPN")),
        ("DATE", "Date", "DA", other_dates[1], "date", None),
        ("DATETIME", "DateTime", "DT", other_dates[2] + "143000", "date", other_dates[2]),
        ("UIDREF", "UID", "UI", uids["sr-uid"], "uid", None),
    )):
        leaf = _item(ValueType=value_type, RelationshipType="CONTAINS",
                     ConceptNameCodeSequence=[_code("121106", "DCM", "Comment")])
        p.put(leaf, (*leaf_path, (cs, index)), T(keyword), vr, value, kind=kind, marker=marker)
        leaves.append(leaf)
    middle.ContentSequence = leaves
    root.ContentSequence = [middle]
    ds.ContentSequence = [root]

    # retired elements from the PS3.15 table
    p.put(ds, top, T("VerbalSourceTrial"), "PN", f"{tok('VSRC')}^Nurse", kind="retired", marker=tok("VSRC"))
    p.put(ds, top, T("StudyComments"), "LT", f"{tok('STCM')} {alpha_family} {patient_id}", kind="retired",
          marker=tok("STCM"))
    p.put(ds, top, T("ReasonForStudy"), "LO", f"{tok('RFS')} chest pain", kind="retired", marker=tok("RFS"))
    p.put(ds, top, T("IdentifyingComments"), "LT", f"{tok('IDCM')} {spoken}", kind="retired",
          marker=tok("IDCM"))
    p.put(ds, top, T("InterpretationAuthor"), "PN", f"{tok('INTA')}^Lisa", kind="retired", marker=tok("INTA"))
    p.put(ds, top, T("TextComments"), "LT", f"{tok('TXCM')} {alpha_given}", kind="retired",
          marker=tok("TXCM"))
    p.put(ds, top, T("ScheduledStudyLocation"), "LO", tok("SSLO"), kind="retired")
    p.put(ds, top, T("CurveDate"), "DA", other_dates[3], kind="retired")

    # a standard PN element written with VR UN
    requesting = f"{tok('UNPN')}^Gregory"
    raw = p.encode(requesting)
    p.put(ds, top, T("RequestingPhysician"), "UN", requesting, kind="un", marker=tok("UNPN"),
          raw=raw + b" " * (len(raw) % 2))

    # private: a block, a private sequence with its own creator, a UN element, an orphan
    ds.add_new(0x00090010, "LO", "ACME 1.1")
    p.put(ds, top, 0x00091001, "LO", f"{tok('PRIV')} private note", kind="private", marker=tok("PRIV"))
    p.put(ds, top, 0x00091002, "PN", name, kind="private", marker=tok("PRPN"),
          needles=[p.encode(part) for part in parts])
    p.put(ds, top, 0x00091003, "UI", uids["private-uid"], kind="private")
    private_item = Dataset()
    private_item.add_new(0x00090010, "LO", "ACME 1.1")
    pseq = ((0x00091010, 0),)
    p.put(private_item, pseq, 0x00091011, "LO", f"{tok('PRSQ')} {alpha_family}", kind="private",
          marker=tok("PRSQ"))
    p.put(private_item, pseq, 0x00091012, "DA", birth, kind="private", marker=tok("PRDA"),
          needles=[birth.encode()])
    ds.add_new(0x00091010, "SQ", [private_item])
    unraw = tok("PRUN").encode() + b" "
    p.put(ds, top, 0x00091020, "UN", tok("PRUN"), kind="private", raw=unraw + b" " * (len(unraw) % 2))
    p.put(ds, top, 0x00111001, "LO", tok("ORPH"), kind="private")  # no creator in (0011,0010)

    # image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = ["0.742", "0.742"]
    ds.ImagePositionPatient = ["-190", "-220", "-40"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = "-40"
    ds.SliceThickness = "1"
    ds.KVP = "120"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = _CTPhantom(rows, columns, _rng(*key, "noise")).slice(0, 3).tobytes()
    ds["PixelData"].VR = "OW"

    # overlay plane 0x6000: text elements, and data whose bytes start with a marker
    _plant_overlay(p, ds, rows, columns, other_dates[4])
    # curve 0x5000 (retired)
    _plant_curve(p, ds)
    return ds, p.plants


def _plant_overlay(p: _Planter, ds: Dataset, rows: int, columns: int, overlay_date: str) -> None:
    top: tuple[tuple[int, int], ...] = ()
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", columns)
    p.put(ds, top, 0x60000022, "LO", f"{p.token('OVLD')} annotation", kind="overlay", marker=p.token("OVLD"))
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    p.put(ds, top, 0x60001500, "LO", p.token("OVLL"), kind="overlay")
    p.put(ds, top, 0x60004000, "LT", f"{p.token('OVLC')} drawn by operator", kind="overlay",
          marker=p.token("OVLC"))
    bits = np.zeros((rows, columns), dtype=bool)
    text = render_text(["PHI"], scale=1)
    h, w = min(text.shape[0], rows - 4), min(text.shape[1], columns - 4)
    bits[rows - 4 - h:rows - 4, 2:2 + w] = text[:h, :w]
    packed = bytearray(np.packbits(bits.ravel(), bitorder="little").tobytes())
    marker = p.token("OVLDATA").encode()
    packed[:len(marker)] = marker[:len(packed)]
    if len(packed) % 2:
        packed.append(0)
    ds.add_new(0x60003000, "OW", bytes(packed))
    p.record(p.token("OVLDATA"), "(bit-packed overlay data starting with the marker)", "overlay", "OW", top,
             0x60003000)
    p.put(ds, top, 0x00080024, "DA", overlay_date, kind="retired")  # OverlayDate


def _plant_curve(p: _Planter, ds: Dataset) -> None:
    top: tuple[tuple[int, int], ...] = ()
    ds.add_new(0x50000005, "US", 1)  # CurveDimensions
    ds.add_new(0x50000010, "US", 16)  # NumberOfPoints
    ds.add_new(0x50000020, "CS", "ECG")  # TypeOfData
    p.put(ds, top, 0x50000022, "LO", f"{p.token('CRVD')} ECG lead II", kind="curve", marker=p.token("CRVD"))
    ds.add_new(0x50000103, "US", 0)  # DataValueRepresentation
    p.put(ds, top, 0x50002500, "LO", p.token("CRVL"), kind="curve")  # CurveLabel
    marker = p.token("CRVDATA").encode()
    data = marker + b"\x00" * (len(marker) % 2) + np.arange(16, dtype="<u2").tobytes()
    ds.add_new(0x50003000, "OB", data)
    p.record(p.token("CRVDATA"), "(curve data starting with the marker)", "curve", "OB", top, 0x50003000)


# --------------------------------------------------------------------------- bitmap font

_GLYPH_ROWS = 7
_GLYPH_COLS = 5
_FONT_SOURCE = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    " ": "..... ..... ..... ..... ..... ..... .....",
    "-": "..... ..... ..... ##### ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "^": "..#.. .#.#. #...# ..... ..... ..... .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "'": "..#.. ..#.. .#... ..... ..... ..... .....",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#.. .....",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
}
_FONT = {
    char: np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool)
    for char, rows in _FONT_SOURCE.items()
}


def render_text(lines: Sequence[str], *, scale: int = 2, line_gap: int = 3) -> np.ndarray:
    """A bool mask of the text (5x7 glyphs, 1 column gap, upper case; unknown -> '?')."""
    advance, height = _GLYPH_COLS + 1, _GLYPH_ROWS + line_gap
    width = max((len(line) for line in lines), default=0) * advance
    mask = np.zeros((max(len(lines) * height - line_gap, 0), max(width - 1, 0)), dtype=bool)
    for row, line in enumerate(lines):
        for col, char in enumerate(line.upper()):
            glyph = _FONT.get(char, _FONT["?"])
            top, left = row * height, col * advance
            mask[top:top + _GLYPH_ROWS, left:left + _GLYPH_COLS] = glyph
    if scale > 1:
        mask = mask.repeat(scale, axis=0).repeat(scale, axis=1)
    return mask


@dataclass(frozen=True)
class TextBox:
    """Where a line of burned-in text is: rows top..bottom-1, columns left..right-1."""

    text: str
    top: int
    left: int
    bottom: int
    right: int
    frame: int | None = None  # None: the same box on every frame


def _burn(image: np.ndarray, lines: Sequence[str], top: int, left: int, color: Sequence[int],
          scale: int = 2) -> list[TextBox]:
    """Burn text lines into an (rows, columns, 3) uint8 image; return the boxes that fit."""
    boxes = []
    step = (_GLYPH_ROWS + 3) * scale
    for index, line in enumerate(lines):
        if not line:
            continue
        mask = render_text([line], scale=scale)
        y, x = top + index * step, left
        h = min(mask.shape[0], image.shape[0] - y)
        w = min(mask.shape[1], image.shape[1] - x)
        if h <= 0 or w <= 0:
            continue
        image[y:y + h, x:x + w][mask[:h, :w]] = color
        boxes.append(TextBox(line, y, x, y + h, x + w))
    return boxes


# --------------------------------------------------------------------------- ultrasound


def _us_header(sop_class: str, rows: int, columns: int, seed: int, patient_id: str, patient_name: str,
               label: str) -> Dataset:
    info = patient_info(patient_id, patient_name)
    rng = _rng("us", patient_id, seed, label)
    day = (dt.date(2022, 1, 3) + dt.timedelta(days=int(rng.integers(0, 900)))).strftime("%Y%m%d")
    sop_uid = _uid("us-sop", patient_id, seed, label)
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid, source_ae="US_LOGIQ07")
    ds.SpecificCharacterSet = _charset_for(patient_name)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = day
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093512.000000"
    ds.AccessionNumber = f"U{int(rng.integers(10**8, 10**9))}"
    ds.Modality = "US"
    ds.Manufacturer = "ACME Medical"
    ds.ManufacturerModelName = "ACME Sono 7"
    ds.InstitutionName = "Springfield General Hospital"
    ds.StationName = "USROOM07"
    ds.ReferringPhysicianName = "WELBY^MARCUS^^DR"
    ds.StudyDescription = "US Abdomen"
    ds.SeriesDescription = "Abdomen"
    ds.OperatorsName = "NIGHTINGALE^FLORENCE"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = info.birth_date
    ds.PatientSex = info.sex
    ds.PatientAge = _age(info.birth_date, day)
    ds.StudyInstanceUID = _uid("us-study", patient_id, seed)
    ds.SeriesInstanceUID = _uid("us-series", patient_id, seed, label)
    ds.StudyID = str(1 + seed % 9999)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    return ds


class _Sector:
    """A B-mode sector picture (speckle in a fan) on a black background."""

    def __init__(self, rows: int, columns: int, rng: np.random.Generator):
        self.rows, self.columns = rows, columns
        self.apex = (int(rows * 0.12), columns // 2)
        y = np.arange(rows, dtype=np.float32)[:, None] - self.apex[0]
        x = np.arange(columns, dtype=np.float32)[None, :] - self.apex[1]
        r = np.hypot(y, x)
        theta = np.arctan2(x, np.maximum(y, 1e-3))
        self.radius = rows * 0.84
        self.fan = (r < self.radius) & (r > rows * 0.03) & (np.abs(theta) < 0.62) & (y > 0)
        self.depth = r / self.radius
        self.theta = theta
        pad = 4099
        self.pad = pad
        self.speckle = rng.rayleigh(0.5, size=rows * columns + pad * 64).astype(np.float32)

    def frame(self, index: int) -> np.ndarray:
        offset = (index * self.pad) % (self.pad * 63)
        speckle = self.speckle[offset:offset + self.rows * self.columns].reshape(self.rows, self.columns)
        # tissue: brighter bands, a dark round "cyst" that drifts a little per frame
        tissue = 0.6 + 0.3 * np.sin(self.depth * 18.0 + 0.15 * index) * np.cos(self.theta * 5.0)
        cy, cx = 0.55 + 0.01 * math.sin(index / 5), 0.1 * math.cos(index / 7)
        cyst = ((self.depth - cy) / 0.1) ** 2 + ((self.theta - cx) / 0.15) ** 2 < 1
        gray = speckle * tissue * (1.0 - 0.5 * self.depth) * 200.0
        gray[cyst] *= 0.15
        gray = np.clip(gray, 0, 235).astype(np.uint8)  # pure white (255) is left to burned-in text
        gray[~self.fan] = 0
        return gray


def _us_picture(sector: _Sector, index: int, text_lines: Sequence[str]) -> tuple[np.ndarray, list[TextBox]]:
    gray = sector.frame(index)
    image = np.repeat(gray[:, :, None], 3, axis=2)
    rows, columns = gray.shape
    # gray bar on the right (not text), like a scanner's display
    bar = np.linspace(235, 0, rows // 2).astype(np.uint8)[:, None]
    image[rows // 4:rows // 4 + rows // 2, columns - 24:columns - 12] = bar[:, :, None]
    boxes = _burn(image, text_lines, top=8, left=8, color=(255, 255, 255))
    return image, boxes


def _us_regions(sector: _Sector) -> list[Dataset]:
    fan_rows, fan_cols = np.nonzero(sector.fan)
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0 = int(fan_cols.min())
    region.RegionLocationMinY0 = int(fan_rows.min())
    region.RegionLocationMaxX1 = int(fan_cols.max())
    region.RegionLocationMaxY1 = int(fan_rows.max())
    region.ReferencePixelX0 = sector.apex[1]
    region.ReferencePixelY0 = sector.apex[0]
    region.PhysicalUnitsXDirection = 3
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = 0.03
    region.PhysicalDeltaY = 0.03
    return [region]


def us_rgb_with_text(
    text_lines: Sequence[str],
    rows: int = 600,
    columns: int = 800,
    seed: int = 0,
    *,
    patient_id: str = "PID-0001",
    patient_name: str = "DOE^JANE",
) -> tuple[Dataset, list[TextBox]]:
    """An RGB ultrasound image with ``text_lines`` burned in at the top left.

    Returns the dataset (Ultrasound Image Storage, BurnedInAnnotation YES) and one
    :class:`TextBox` per non-empty line drawn (white 10x14-pixel glyphs, upper case).
    """
    ds = _us_header(US_IMAGE_STORAGE, rows, columns, seed, patient_id, patient_name, "single")
    sector = _Sector(rows, columns, _rng("us-speckle", seed))
    image, boxes = _us_picture(sector, 0, text_lines)
    ds.SequenceOfUltrasoundRegions = _us_regions(sector)
    ds.PixelData = image.tobytes()
    ds["PixelData"].VR = "OB"
    return ds, boxes


def us_multiframe(
    frames: int,
    *,
    text_lines: Sequence[str] = ("DOE^JANE", "PID-0001", "2023-04-11 09:35"),
    rows: int = 480,
    columns: int = 640,
    seed: int = 0,
    patient_id: str = "PID-0001",
    patient_name: str = "DOE^JANE",
) -> tuple[Dataset, list[TextBox]]:
    """A multi-frame RGB ultrasound cine with the same text burned into every frame."""
    ds = _us_header(US_MULTIFRAME_IMAGE_STORAGE, rows, columns, seed, patient_id, patient_name, "cine")
    sector = _Sector(rows, columns, _rng("us-speckle", seed))
    pictures = []
    boxes: list[TextBox] = []
    for index in range(frames):
        image, boxes = _us_picture(sector, index, text_lines)
        pictures.append(image)
    ds.NumberOfFrames = frames
    ds.FrameTime = "33.333"
    ds.FrameIncrementPointer = 0x00181063  # FrameTime
    ds.CineRate = 30
    ds.RecommendedDisplayFrameRate = 30
    ds.SequenceOfUltrasoundRegions = _us_regions(sector)
    ds.PixelData = np.stack(pictures).tobytes() if pictures else b""
    ds["PixelData"].VR = "OB"
    return ds, boxes
