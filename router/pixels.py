"""The pixel stage: find text burned into the pixels and mask it, on every frame.

``PixelCleaner.clean(ds, identifying)`` runs before the header is de-identified (it reads
Modality, Manufacturer, the SOP class and the instance's identifying values). It decodes
every frame of any transfer syntax pydicom can decode, renders each to 8 bits for the
text detector (``router.ocr``), masks the text boxes with the value that renders black,
clears overlay bits hidden in the unused high bits of native Pixel Data, and writes the
pixels back losslessly (native stays native; encapsulated becomes RLE Lossless or
explicit VR little endian), with the transfer syntax, Photometric Interpretation, Planar
Configuration and Lossy Image Compression attributes made consistent. An instance whose
pixels cannot be decoded or re-encoded is refused (``InstanceRefused``): pixels that
needed cleaning are never returned uncleaned. ``clean_overlays`` clears the text found in
overlay bitmaps (60xx,3000) the same way (Clean Graphics).

What was masked, with the recognised text (the "crosswalk"), is returned in
``PixelReport.regions``; it must never be logged or forwarded.
"""

from __future__ import annotations

import itertools
import re
import time
import tomllib
import zlib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, convert_color_space, get_decoder, get_encoder, pack_bits
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from router.decode import PIXEL_DATA
from router.encode import EncodedFrames
from router.ocr import Box, DetectorSettings, RapidOcrDetector, TextDetector, render_text
from router.profile import InstanceRefused, transfer_syntax_of

#: Deflated Image Frame Compression (2023): not known to pydicom 3.0; inflated here.
DEFLATED_IMAGE_FRAME = UID("1.2.840.10008.1.2.8.1")

#: Transfer syntaxes that always lose information.
LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
}
#: Transfer syntaxes that may or may not lose information (read from the codestream).
MAYBE_LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K
}
NATIVE_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Width of the band just outside a masked region whose pixels give its fill (mask.fill
#: "background"), and how many of them at most are taken (evenly spread: a clip's regions
#: cost ~1.4 ms instead of ~5).
BACKGROUND_BAND_PX = 2
BACKGROUND_SAMPLES = 256


class Region(NamedTuple):
    """One masked rectangle: frame index (0-based), x0, y0, x1, y1 (exclusive) and its text."""

    frame: int
    x0: int
    y0: int
    x1: int
    y1: int
    text: str


@dataclass
class PixelReport:
    #: The pixels were examined and any text found was masked.
    cleaned: bool
    #: What was masked (the crosswalk: keep it local, never log it).
    regions: list[Region] = field(default_factory=list)
    #: Why the pixels were not examined (PHI-free), when they were not.
    skipped_reason: str | None = None
    #: Overlay bits in the unused high bits of Pixel Data were found and cleared.
    overlay_bits_cleared: bool = False
    #: Text read but kept (mode "phi"), for review: (frame, x0, y0, x1, y1, text).
    kept: list[Region] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class OverlayReport:
    #: Overlay groups (0x6000, 0x6002 ...) whose bitmaps were examined and cleaned.
    cleaned: set[int] = field(default_factory=set)
    #: What was cleared, by group (the crosswalk: keep it local, never log it).
    regions: list[tuple[int, Region]] = field(default_factory=list)


def load_policy(site: dict | None = None) -> dict:
    """rules/pixels.toml, with a site's policy (``[deid] pixel_policy``) laid over it table by table."""
    policy = tomllib.loads(resources.files("router.rule_tables").joinpath("pixels.toml").read_text(encoding="utf-8"))
    for key, value in (site or {}).items():
        policy[key] = {**policy.get(key, {}), **value} if isinstance(value, dict) else value
    return policy


# -- the cleaner -------------------------------------------------------------------------


class PixelCleaner:
    """One per worker process: holds the OCR engine (not thread-safe)."""

    def __init__(self, policy: dict | None = None, engine: TextDetector | None = None, read_text: bool = True):
        """``read_text``: whether masked regions are read when the policy says "auto"
        (the node reads them only for a text crosswalk: recognition costs ~30 ms a box)."""
        self.policy = _with_defaults(policy if policy is not None else load_policy())
        det = self.policy["detect"]
        self.mode = self.policy["mode"]
        if self.mode not in ("all", "phi"):
            raise ValueError(f'pixel policy: mode must be "all" or "phi", not {self.mode!r}')
        if self.policy["output"]["encapsulated"] not in ("rle", "explicit-little-endian"):
            raise ValueError('pixel policy: output.encapsulated must be "rle" or "explicit-little-endian"')
        self.renderings = tuple(det["renderings"])
        if not self.renderings or set(self.renderings) - {"minmax", "window"}:
            raise ValueError('pixel policy: detect.renderings must name "minmax" and/or "window"')
        self.patterns = [re.compile(p, re.IGNORECASE) for p in self.policy["phi"]["patterns"]]
        if self.policy["mask"]["fill"] not in ("background", "black"):
            raise ValueError('pixel policy: mask.fill must be "background" or "black"')
        recognize = self.policy["mask"]["recognize"]
        if recognize not in (True, False, "auto"):
            raise ValueError('pixel policy: mask.recognize must be true, false or "auto"')
        self.recognize = self.mode == "phi" or (read_text if recognize == "auto" else recognize)
        if engine is None:
            settings = DetectorSettings(
                min_side=int(det["min_side"]), max_side=int(det["max_side"]), max_upscale=float(det["max_upscale"]),
                thresh=float(det["thresh"]),
                box_thresh=float(det["box_thresh"]), unclip_ratio=float(det["unclip_ratio"]),
            )
            try:
                engine = RapidOcrDetector(settings)
            except RuntimeError as exc:
                raise RuntimeError(f"pixel stage: OCR engine unavailable: {exc}") from None
        self.engine = engine
        self.self_test()

    # -- start-up check ----------------------------------------------------------------

    def self_test(self) -> None:
        """Render a known string into a 16-bit grey image; it must be found (and read)."""
        known = "ID 0123456789"
        image = np.zeros((120, 360), dtype=np.uint16)
        yy, xx = np.mgrid[0:120, 0:360]
        image[:] = (300 + 200 * np.sin(xx / 37.0) * np.cos(yy / 23.0)).astype(np.uint16)
        bitmap = render_text(known, scale=2)
        y, x = 40, 30
        image[y:y + bitmap.shape[0], x:x + bitmap.shape[1]][bitmap] = 2000
        try:
            boxes = self._detect_frame([_minmax(image.astype(np.float32))], image.shape)
        except Exception as exc:  # noqa: BLE001 - any failure of the engine fails the start-up
            raise RuntimeError(f"pixel stage self-test failed: the OCR engine raised {type(exc).__name__}: {exc}") from None
        covered = np.zeros(image.shape, dtype=bool)
        for b in boxes:
            covered[b.y0:b.y1, b.x0:b.x1] = True
        text_pixels = np.zeros(image.shape, dtype=bool)
        text_pixels[y:y + bitmap.shape[0], x:x + bitmap.shape[1]] = bitmap
        coverage = covered[text_pixels].mean()
        if coverage < 0.98:
            raise RuntimeError(
                f"pixel stage self-test failed: the OCR engine found {coverage:.0%} of a known rendered string "
                "(expected all of it); refusing to start without working text detection"
            )
        if self.recognize:
            texts = [self.engine.recognize(_as_rgb(_minmax(image.astype(np.float32))), b)[0] for b in boxes]
            digits = re.sub(r"\D", "", "".join(texts))
            if "0123456789" not in digits:
                raise RuntimeError(
                    "pixel stage self-test failed: the OCR engine did not read a known rendered string "
                    "(text recognition is needed for mode \"phi\" and the crosswalk)"
                )

    # -- one instance --------------------------------------------------------------------

    def clean(self, ds: Dataset, identifying: set[str]) -> PixelReport:
        started = time.perf_counter()
        report = self._clean(ds, identifying)
        report.seconds = time.perf_counter() - started
        return report

    def _clean(self, ds: Dataset, identifying: set[str]) -> PixelReport:
        keyword = next((k for k in PIXEL_KEYWORDS if k in ds), None)
        if keyword is None or ds.get(keyword) is None or ds.get_item(keyword).value in (None, b""):
            return PixelReport(False, skipped_reason="no pixel data")
        if "Rows" not in ds or "Columns" not in ds:
            raise InstanceRefused("pixel data without Rows/Columns: cannot be checked for burned-in text")
        ts = transfer_syntax_of(ds)
        encapsulated = _is_encapsulated(ts, ds)
        skip = self._skip_reason(ds)
        # overlay planes hidden in the unused high bits of native Pixel Data are cleared
        # whatever the OCR policy says
        high_bits = keyword == "PixelData" and not encapsulated and _high_bits_set(ds, ts)
        if skip is not None and not high_bits:
            return PixelReport(False, skipped_reason=skip)

        stored = None if encapsulated or high_bits else _stored_pixels(ds, ts, keyword)
        if stored is not None:
            # masked in place: the file's own bytes, not a decoded copy (a large
            # instance would hold its pixels twice, three times while written back)
            arr, photometric, lossy = stored, _photometric(ds), _lossy(ds, ts)
        else:
            arr, photometric, lossy = _decode(ds, ts)  # (frames, rows, cols, samples)
        frames, rows, cols, samples = arr.shape
        if rows != int(ds.Rows) or cols != int(ds.Columns):
            raise InstanceRefused("decoded pixel data does not match Rows/Columns")
        if skip is not None:  # only the overlay bits to clear
            _write(ds, arr, photometric, ts, encapsulated, lossy, self.policy["output"]["encapsulated"], keyword)
            _drop_embedded_overlays(ds)
            return PixelReport(False, skipped_reason=skip, overlay_bits_cleared=True)

        fill = _fill_value(ds, arr, photometric)
        regions: list[Region] = []
        kept: list[Region] = []
        for rule_box in self._known_regions(ds, rows, cols):
            for f in range(frames):
                regions.append(Region(f, *rule_box, ""))
        detection = self._renderer(ds, arr, photometric)
        projected = frames >= int(self.policy["detect"]["projection_min_frames"]) > 0
        # A clip: text is found once on the brightest and darkest value each pixel takes
        # over all frames (every frame's light and dark text shows there), and each box
        # is masked on every frame.
        targets = [(range(frames), _projections(detection, frames))] if projected else \
            [((f,), detection(f)) for f in range(frames)]
        for masked_frames, images in targets:
            self._find_text(masked_frames, images, (rows, cols), identifying, regions, kept)
        masked = self._margined(regions, rows, cols)
        if masked:
            fills = _background_fills(masked, arr, fill, photometric) if self.policy["mask"]["fill"] == "background" \
                else [fill] * len(masked)
            for r, value in zip(masked, fills):
                arr[r.frame, r.y0:r.y1, r.x0:r.x1, :] = value
        if masked and stored is not None:
            ds[keyword].VR = "OB" if arr.dtype.itemsize == 1 else "OW"  # as _write gives it
        elif masked or high_bits:
            _write(ds, arr, photometric, ts, encapsulated, lossy, self.policy["output"]["encapsulated"], keyword)
        if high_bits:
            _drop_embedded_overlays(ds)
        ds.BurnedInAnnotation = "NO"
        return PixelReport(True, regions=masked, overlay_bits_cleared=high_bits, kept=kept)

    def clean_overlays(self, ds: Dataset, identifying: set[str]) -> OverlayReport:
        """Clear the text in each overlay's bitmap (60xx,3000), for the Clean Graphics
        option: overlays hold annotations, names among them. An overlay whose attributes
        do not describe its bitmap is left out of ``cleaned`` (the profile then removes its
        group whole). Runs before the pixel stage may change the transfer syntax."""
        report = OverlayReport()
        if transfer_syntax_of(ds) == ExplicitVRBigEndian:  # OW words swapped: removed whole
            return report
        for group in range(0x6000, 0x6020, 2):
            if (group << 16 | 0x3000) not in ds:
                continue
            try:
                overlay = _overlay_bits(ds, group)
            except Exception:  # noqa: BLE001 - an attribute pydicom cannot read: removed whole
                overlay = None
            if overlay is None:
                continue
            all_bits, bits = overlay
            frames, rows, cols = bits.shape
            regions: list[Region] = []
            if bits.any():
                image = np.where(bits.any(axis=0), 255, 0).astype(np.uint8)
                self._find_text(range(frames), [image], (rows, cols), identifying, regions, kept=[])
            masked = self._margined(regions, rows, cols)
            for r in masked:
                bits[r.frame, r.y0:r.y1, r.x0:r.x1] = 0
            if masked:
                ds[group << 16 | 0x3000].value = np.packbits(all_bits, bitorder="little").tobytes()
            report.cleaned.add(group)
            report.regions += [(group, r) for r in masked]
        return report

    def _find_text(self, masked_frames, images: list[np.ndarray], shape: tuple[int, int], identifying: set[str],
                   regions: list[Region], kept: list[Region]) -> None:
        """Detect text on the renderings of some frames; each box found goes to ``regions``
        (to mask) or, read and not PHI in mode "phi", to ``kept``, once per frame."""
        if not images:
            return  # a constant frame holds no text
        for box in self._detect_frame(images, shape):
            text, score = ("", 0.0)
            if self.recognize:
                text, score = self._read(images, box)
            keep = self.mode == "phi" and not self._is_phi(text, score, identifying)
            for f in masked_frames:
                (kept if keep else regions).append(Region(f, box.x0, box.y0, box.x1, box.y1, text))

    def _margined(self, regions: list[Region], rows: int, cols: int) -> list[Region]:
        margin = int(self.policy["mask"]["margin"])
        clipped = [_clip_region(r, margin, rows, cols) for r in regions]
        return [r for r in clipped if r is not None]

    # -- selection -----------------------------------------------------------------------

    def _skip_reason(self, ds: Dataset) -> str | None:
        select = self.policy["select"]
        modality = str(ds.get("Modality", "") or "").strip().upper()
        sop_class = str(ds.get("SOPClassUID", "") or "").strip()
        if modality and modality in {m.upper() for m in select["skip_modalities"]}:
            return f"policy: modality {modality} not OCR'd"
        if select["only_modalities"] and modality not in {m.upper() for m in select["only_modalities"]}:
            return f"policy: modality {modality or '(none)'} not OCR'd"
        if sop_class in set(select["skip_sop_classes"]):
            return f"policy: SOP class {sop_class} not OCR'd"
        if select["trust_burned_in_annotation_no"] and str(ds.get("BurnedInAnnotation", "")).strip().upper() == "NO":
            return "policy: BurnedInAnnotation is NO"
        return None

    def _known_regions(self, ds: Dataset, rows: int, cols: int) -> list[tuple[int, int, int, int]]:
        out = []
        manufacturer = str(ds.get("Manufacturer", "") or "")
        model = str(ds.get("ManufacturerModelName", "") or "")
        modality = str(ds.get("Modality", "") or "").strip().upper()
        for rule in self.policy.get("regions", []):
            if "manufacturer" in rule and not re.search(rule["manufacturer"], manufacturer, re.IGNORECASE):
                continue
            if "model" in rule and not re.search(rule["model"], model, re.IGNORECASE):
                continue
            if "modality" in rule and rule["modality"].upper() != modality:
                continue
            if rule.get("rows", rows) != rows or rule.get("columns", cols) != cols:
                continue
            for x0, y0, x1, y1 in rule["boxes"]:
                out.append((int(x0), int(y0), int(x1), int(y1)))
        return out

    # -- detection -----------------------------------------------------------------------

    def _renderer(self, ds: Dataset, arr: np.ndarray, photometric: str):
        """A function frame index -> list of 8-bit renderings of that frame for the detector."""
        samples = arr.shape[3]
        if photometric == "PALETTE COLOR":
            def palette(f: int) -> list[np.ndarray]:
                rgb = apply_color_lut(arr[f, :, :, 0], ds)
                return [_to_uint8_rgb(rgb)] if rgb.min() != rgb.max() else []
            return palette
        if samples == 3:
            def colour(f: int) -> list[np.ndarray]:
                frame = arr[f]
                if photometric.startswith("YBR"):
                    frame = convert_color_space(frame, "YBR_FULL", "RGB") if frame.dtype == np.uint8 else frame
                return [_to_uint8_rgb(frame)] if frame.min() != frame.max() else []
            return colour
        window = _header_window(ds) if "window" in self.renderings else None
        invert = photometric == "MONOCHROME1"

        def grey(f: int) -> list[np.ndarray]:
            frame = arr[f, :, :, 0].astype(np.float32)
            lo, hi = float(frame.min()), float(frame.max())
            if lo == hi:
                return []
            images = []
            if "minmax" in self.renderings:
                images.append(_minmax(frame))
            if window is not None:
                low, high = window
                # only when the window shows a clearly different part of the value range
                if (min(high, hi) - max(low, lo)) < 0.9 * (hi - lo):
                    images.append(_windowed(frame, low, high))
            if invert:
                images = [255 - im for im in images]
            return images
        return grey

    def _detect_frame(self, images: list[np.ndarray], shape: tuple[int, int]) -> list[Box]:
        rows, cols = shape[:2]
        boxes: list[Box] = []
        for image in images:
            for b in self.engine.detect(image):
                # a box inside one already taken (the same text found in another
                # rendering) adds nothing to the mask: not read again to confirm it
                if any(_inside(b, taken) for taken in boxes) or self._plausible(image, b, rows, cols):
                    boxes.append(b)
        pad, pad_max = float(self.policy["mask"]["pad_along"]), int(self.policy["mask"]["pad_along_max_px"])
        padded = [_pad_along(b, pad, pad_max, rows, cols) for b in boxes]
        flat_sigma = float(self.policy["mask"]["trim_flat_sigma"])
        merged = _merge(padded)
        return [_trimmed(b, images, flat_sigma) for b in merged] if flat_sigma > 0 else merged

    def _plausible(self, image: np.ndarray, box: Box, rows: int, cols: int) -> bool:
        """Is a detected box text? Detectors return boxes over large smooth regions (and
        over anatomy on upscaled small matrices): a box thicker (across its text
        direction) than ordinary text is kept only if it also reads as text, which large
        lettering does and those regions do not. Thin boxes are always kept: small text
        often reads poorly, and masking from detection is the safe side."""
        det = self.policy["detect"]
        horizontal = box.width >= box.height
        thickness = box.height if horizontal else box.width
        extent = rows if horizontal else cols
        if thickness <= max(float(det["confirm_height_fraction"]) * extent, int(det["confirm_min_px"])):
            return True
        very_thick = thickness > max(float(det["max_text_height_fraction"]) * extent, int(det["min_filtered_px"]))
        recognize = getattr(self.engine, "recognize", None)
        if recognize is None:
            return not very_thick
        text, score = recognize(_as_rgb(image), box)
        chars = len(_squeeze(text))
        if very_thick:
            return chars >= 2 and score >= 0.9
        return chars >= 1 and score >= float(det["confirm_min_score"])

    def _read(self, images: list[np.ndarray], box: Box) -> tuple[str, float]:
        best = ("", 0.0)
        for image in images:  # the next rendering only when this one reads poorly
            text, score = self.engine.recognize(_as_rgb(image), box)
            if score > best[1]:
                best = (text, score)
            if best[1] >= float(self.policy["phi"]["min_confidence"]):
                break
        return best

    def _is_phi(self, text: str, score: float, identifying: set[str]) -> bool:
        phi = self.policy["phi"]
        if not text.strip() or score < float(phi["min_confidence"]):
            return True  # unread text is masked: it could say anything
        for pattern in self.patterns:
            if pattern.search(text):
                return True
        squeezed = _squeeze(text)
        words = {_squeeze(w) for w in re.split(r"[^0-9A-Za-z]+", text) if w}
        for value in identifying:
            v = _squeeze(value)
            if len(v) < int(phi["min_value_length"]):
                continue
            if len(v) <= int(phi["whole_word_max_length"]):
                if v in words:
                    return True
            elif v in squeezed:
                return True
        return False


def _projections(detection, frames: int) -> list[np.ndarray]:
    """Per rendering, the pixel-wise maximum and minimum over all frames' renderings."""
    highs: list[np.ndarray] = []
    lows: list[np.ndarray] = []
    for f in range(frames):
        for i, image in enumerate(detection(f)):
            if i == len(highs):
                highs.append(image.copy())
                lows.append(image.copy())
            elif image.shape == highs[i].shape:
                np.maximum(highs[i], image, out=highs[i])
                np.minimum(lows[i], image, out=lows[i])
    return [image for pair in zip(highs, lows) for image in pair if image.min() != image.max()]


# -- decoding ----------------------------------------------------------------------------


def _is_encapsulated(ts: UID, ds: Dataset) -> bool:
    if ts.is_transfer_syntax:
        return ts.is_encapsulated
    raw = ds.get_item(0x7FE00010)
    return raw is not None and getattr(raw, "length", 0) == 0xFFFFFFFF


def inflated(ds: Dataset) -> Dataset:
    """A native (Explicit VR Little Endian) copy of a Deflated Image Frame Compression
    instance (PS3.5 A.4.11: each frame a raw deflate stream), which pydicom 3.0 cannot
    decode. Raises InstanceRefused if the frames do not inflate to the stated size."""
    frames = _frames(ds)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples, allocated = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
        streams = list(generate_frames(ds.PixelData, number_of_frames=frames))
    except Exception as exc:  # noqa: BLE001 - malformed encapsulation is the input's fault
        raise InstanceRefused(f"deflated image frames cannot be read ({type(exc).__name__})") from None
    frame_bits = rows * cols * samples * allocated
    if len(streams) != frames or (allocated == 1 and frame_bits % 8):
        raise InstanceRefused("deflated image frames do not match Number of Frames / Rows x Columns")
    data = []
    for stream in streams:
        inflater = zlib.decompressobj(-15)
        try:
            frame = inflater.decompress(stream, frame_bits // 8 + 1)
        except zlib.error:
            raise InstanceRefused("deflated image frame cannot be inflated") from None
        if len(frame) != frame_bits // 8:
            raise InstanceRefused("deflated image frame does not inflate to Rows x Columns x Bits Allocated")
        data.append(frame)
    native = Dataset()
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames"):
        if keyword in ds:
            native[keyword] = ds[keyword]
    native.file_meta = FileMetaDataset()
    native.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pixels = b"".join(data)
    native.PixelData = pixels + (b"\0" if len(pixels) % 2 else b"")
    native["PixelData"].VR = "OB" if allocated <= 8 else "OW"
    return native


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "") or "").strip().upper()


def _lossy(ds: Dataset, ts: UID) -> bool:
    """Are the stored pixels lossy-compressed (now, or before they were stored natively)?"""
    return ts in LOSSY_SYNTAXES or (ts in MAYBE_LOSSY_SYNTAXES and _codestream_lossy(ds, ts)) \
        or str(ds.get("LossyImageCompression", "")).strip() == "01"


def _stored_pixels(ds: Dataset, ts: UID, keyword: str) -> np.ndarray | None:
    """Native little-endian Pixel Data as a writable (frames, rows, cols, samples) view of
    the element's own bytes, where that view holds exactly what the decoder would return:
    8, 16 or 32 bits allocated, samples interleaved, no chroma subsampling, unused high bits
    empty (signed: the sign's extension). None otherwise (then decoded into a copy).

    The reader gives the last element (the pixel data) as a bytearray (``router.decode``);
    a value read any other way is bytes, read-only: None.
    """
    try:
        value = ds.get_item(keyword).value if keyword == "PixelData" else None
        if not isinstance(value, bytearray) or not ts.is_transfer_syntax or ts.is_encapsulated \
                or ts in (ExplicitVRBigEndian, DEFLATED_IMAGE_FRAME):
            return None
        rows, cols, frames = int(ds.Rows), int(ds.Columns), _frames(ds)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        allocated, stored = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated))
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        high_bit = int(ds.get("HighBit", stored - 1))
        planar = int(ds.get("PlanarConfiguration", 0) or 0)
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    if allocated not in (8, 16, 32) or not 0 < stored <= allocated or high_bit != stored - 1 \
            or samples not in (1, 3) or (samples == 3 and planar != 0) \
            or _photometric(ds) not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL") \
            or min(rows, cols) <= 0:
        return None
    count = frames * rows * cols * samples
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    if len(value) < count * dtype.itemsize:
        return None
    arr = np.frombuffer(value, dtype=dtype, count=count).reshape(frames, rows, cols, samples)
    if stored < allocated and not _in_stored_range(arr, stored, signed):
        return None
    return arr


def _in_stored_range(arr: np.ndarray, stored: int, signed: bool) -> bool:
    """Does every value fit in Bits Stored (the bits above empty, or signed: the sign's
    extension), as the decoder returns them?"""
    flat = arr.reshape(-1)
    low, high = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if signed else (0, (1 << stored) - 1)
    for start in range(0, flat.size, _SCAN_VALUES):  # in slices: no temporary of the data's size
        part = flat[start:start + _SCAN_VALUES]
        if part.size and (int(part.min()) < low or int(part.max()) > high):
            return False
    return True


def _decode(ds: Dataset, ts: UID) -> tuple[np.ndarray, str, bool]:
    """Every frame as (frames, rows, cols, samples), the photometric interpretation of
    that array, and whether the stored pixels are lossy-compressed."""
    photometric_in = _photometric(ds)
    lossy = _lossy(ds, ts)
    # Lossy YCbCr (JPEG) becomes RGB, as any viewer shows it; lossless data stays in
    # its colour space (no rounding through a colour conversion).
    as_rgb = ts in LOSSY_SYNTAXES and photometric_in.startswith("YBR")
    if ts == DEFLATED_IMAGE_FRAME:
        ds, ts = inflated(ds), ExplicitVRLittleEndian
    try:
        decoder = get_decoder(ts)
        if not decoder.is_available:
            raise InstanceRefused(f"pixel data cannot be decoded: no decoder available for {ts.name}")
        # raw: YCbCr becomes RGB below, a frame at a time (pydicom converts all frames at
        # once through float64 temporaries: a clip took 8x its decoded size). Native data
        # read by the worker (a bytearray) may be decoded in place: the unused high bits
        # cleared or the sign extended into them, the same values by PS3.5 8.1.1.
        arr, meta = decoder.as_array(ds, raw=True)
    except InstanceRefused:
        raise
    except NotImplementedError:
        raise InstanceRefused(f"pixel data cannot be decoded: transfer syntax {ts} is not supported") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the pixels cannot be cleaned
        raise InstanceRefused(f"pixel data cannot be decoded ({type(exc).__name__})") from None
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = _frames(ds)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None] if (samples > 1 and frames == 1) else arr[..., None]
    if arr.ndim != 4 or arr.shape[0] != frames:
        raise InstanceRefused("decoded pixel data does not match Number of Frames / Samples per Pixel")
    photometric = str(meta.get("photometric_interpretation", photometric_in) or photometric_in).upper()
    arr = np.ascontiguousarray(arr)
    if as_rgb and photometric in ("YBR_FULL", "YBR_FULL_422"):  # what pydicom converts
        if not arr.flags.writeable:
            arr = arr.copy()
        for f in range(frames):
            arr[f] = convert_color_space(arr[f], "YBR_FULL", "RGB")
        photometric = "RGB"
    if photometric in ("YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420") and not as_rgb:
        photometric = "YBR_FULL"  # decoders return every chroma sample
    if photometric in ("YBR_RCT", "YBR_ICT"):
        photometric = "RGB"
    return arr, photometric, lossy


def _frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        raise InstanceRefused("invalid Number of Frames (0028,0008)") from None


def _codestream_lossy(ds: Dataset, ts: UID) -> bool:
    """Does the first frame's codestream use a lossy mode (J2K 9-7 wavelet, JPEG-LS NEAR > 0)?"""
    from pydicom.encaps import generate_fragmented_frames

    try:
        first = b"".join(next(generate_fragmented_frames(ds.PixelData, number_of_frames=_frames(ds))))
    except Exception:  # noqa: BLE001 - unknown: treat as lossy, the conservative label
        return True
    if ts == "1.2.840.10008.1.2.4.81":
        at = first.find(b"\xff\xda")  # SOS: Ls(2) Ns(1) Ns*(Cs, Tm) NEAR(1)
        if at < 0 or at + 5 >= len(first):
            return True
        ns = first[at + 4]
        near_at = at + 5 + 2 * ns
        return near_at >= len(first) or first[near_at] != 0
    at = first.find(b"\xff\x52")  # COD: Lcod(2) Scod(1) SGcod(4) SPcod: levels, cbw, cbh, style, transform
    if at < 0 or at + 13 >= len(first):
        return True
    return first[at + 13] == 0  # 0: 9-7 irreversible


def _has_high_bits(ds: Dataset, ts: UID) -> bool:
    try:
        return int(ds.BitsAllocated) > int(ds.BitsStored) and int(ds.BitsAllocated) in (16, 32) and not _is_encapsulated(ts, ds)
    except (AttributeError, TypeError, ValueError):
        return False


def _high_bits_set(ds: Dataset, ts: UID) -> bool:
    """Do the bits outside the stored range hold anything but the sign extension?"""
    if not _has_high_bits(ds, ts):
        return False
    allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
    high_bit = int(ds.get("HighBit", stored - 1))
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype(f"{'>' if ts == ExplicitVRBigEndian else '<'}u{allocated // 8}")
    data = ds.get_item("PixelData").value or b""  # the bytes as read (no conversion, no copy)
    raw = np.frombuffer(data, dtype=dtype, count=len(data) // dtype.itemsize)
    low = high_bit - stored + 1
    if signed and low == 0:
        # Above the sign bit: nothing, or the sign's extension (all ones with the sign set).
        full = (1 << (allocated - stored + 1)) - 1

        def holds_bits(part: np.ndarray) -> bool:
            top = part >> (stored - 1)
            return bool(np.any((top > 1) & (top != full)))
    else:
        outside = raw.dtype.type(((1 << allocated) - 1) ^ (((1 << stored) - 1) << low))

        def holds_bits(part: np.ndarray) -> bool:
            return bool(np.any(part & outside))
    # In slices: a temporary array the size of the pixel data would double a large
    # instance's memory.
    return any(holds_bits(raw[start:start + _SCAN_VALUES]) for start in range(0, len(raw), _SCAN_VALUES))


#: Pixel values checked at once for bits outside the stored range (4 MB of 16-bit values).
_SCAN_VALUES = 2 * 1024 * 1024


#: Six or more printable ASCII bytes: in an overlay's bitmap these are characters, not
#: pixels (eight pixels a byte; real overlays hold none, a dashed line repeats one byte).
_PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]{6,}")


def _overlay_bits(ds: Dataset, group: int) -> tuple[np.ndarray, np.ndarray] | None:
    """An overlay's bitmap, unpacked: every bit of its value, and a (frames, rows, cols)
    view of those its attributes describe; None where they do not describe its value (one
    bit per pixel at bit 0, enough bits for every frame) or where its bytes spell text."""
    def number(element: int, default: int | None) -> int | None:
        item = ds.get(group << 16 | element)
        if item is None or item.value in (None, "", b""):
            return default
        value = item.value[0] if _is_multi(item.value) else item.value
        return int(value)

    try:
        rows, cols = number(0x0010, None), number(0x0011, None)
        frames = number(0x0015, 1)
        bits_allocated, bit_position = number(0x0100, 1), number(0x0102, 0)
    except (TypeError, ValueError, IndexError):  # not numbers
        return None
    data = ds[group << 16 | 0x3000].value
    if (not rows or not cols or not frames or rows < 0 or cols < 0 or frames < 0 or bits_allocated != 1
            or bit_position != 0 or not isinstance(data, bytes) or len(data) * 8 < rows * cols * frames):
        return None
    if any(len(set(run.group())) >= 3 for run in _PRINTABLE_RUN.finditer(data)):
        return None  # text written into the bytes: not a picture of anything
    all_bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    return all_bits, all_bits[:rows * cols * frames].reshape(frames, rows, cols)


def _drop_embedded_overlays(ds: Dataset) -> None:
    """Overlay groups whose bitmap lived in the (now cleared) high bits of Pixel Data."""
    for group in range(0x6000, 0x6020, 2):
        if (group << 16 | 0x3000) in ds:
            continue  # overlay data of its own: the profile decides
        if (group << 16 | 0x0010) in ds:
            for tag in [t for t in ds.keys() if t >> 16 == group]:
                del ds[tag]


# -- rendering for the detector ------------------------------------------------------------


def _header_window(ds: Dataset) -> tuple[float, float] | None:
    """The first header window as a range of stored values, or None."""
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        center = float(center[0] if _is_multi(center) else center)
        width = float(width[0] if _is_multi(width) else width)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError, IndexError):
        return None
    if width <= 1 or slope == 0:
        return None
    low, high = (center - 0.5 - (width - 1) / 2 - intercept) / slope, (center - 0.5 + (width - 1) / 2 - intercept) / slope
    return (min(low, high), max(low, high))


def _is_multi(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def _minmax(frame: np.ndarray) -> np.ndarray:
    lo, hi = float(frame.min()), float(frame.max())
    if hi <= lo:
        return np.zeros(frame.shape, dtype=np.uint8)
    return np.clip((frame - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _windowed(frame: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((frame - low) * (255.0 / (high - low)) + 0.5, 0, 255).astype(np.uint8)


def _to_uint8_rgb(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    return _minmax(rgb.astype(np.float32))


def _as_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


# -- boxes -----------------------------------------------------------------------------------


def _pad_along(b: Box, pad: float, pad_max: int, rows: int, cols: int) -> Box:
    if b.width >= b.height:
        d = min(pad_max, int(round(pad * b.height)))
        return Box(max(0, b.x0 - d), b.y0, min(cols, b.x1 + d), b.y1, b.score)
    d = min(pad_max, int(round(pad * b.width)))
    return Box(b.x0, max(0, b.y0 - d), b.x1, min(rows, b.y1 + d), b.score)


#: A box's pixel differs from its border's level (in an 8-bit rendering) when by more
#: than this many sigmas of the border's noise, and never by less than TRIM_MIN_LEVELS.
TRIM_SIGMAS = 4.0
TRIM_MIN_LEVELS = 2.0


def _trimmed(box: Box, images: list[np.ndarray], flat_sigma: float) -> Box:
    """box shrunk to 1 px around the pixels that differ from its border in any rendering,
    where every rendering's border is even (its noise at most flat_sigma of 255 levels):
    padding and the detector's overshoot over an even background (air, a black border)
    would change pixels where there is no text. A side stops at the first pixel that is
    not background, so text the detector stopped short of stays inside; over texture
    (anatomy, speckle) and where nothing differs the box stays whole."""
    if box.width < 3 or box.height < 3:
        return box
    ink_x0, ink_y0, ink_x1, ink_y1 = box.x1, box.y1, box.x0, box.y0
    for image in images:
        block = image[box.y0:box.y1, box.x0:box.x1].astype(np.float32)
        if block.ndim == 2:
            block = block[:, :, None]
        border = np.concatenate([block[0], block[-1], block[1:-1, 0], block[1:-1, -1]])  # (n, samples)
        level = np.median(border, axis=0)
        sigma = 1.4826 * float(np.median(np.abs(border - level)))
        if sigma > flat_sigma:
            return box
        differs = (np.abs(block - level) > max(TRIM_MIN_LEVELS, TRIM_SIGMAS * sigma)).any(axis=2)
        ys = np.flatnonzero(differs.any(axis=1))
        if not len(ys):
            continue
        xs = np.flatnonzero(differs.any(axis=0))
        ink_x0, ink_x1 = min(ink_x0, box.x0 + int(xs[0])), max(ink_x1, box.x0 + int(xs[-1]) + 1)
        ink_y0, ink_y1 = min(ink_y0, box.y0 + int(ys[0])), max(ink_y1, box.y0 + int(ys[-1]) + 1)
    if ink_x1 <= ink_x0:
        return box  # nothing differs in any rendering: what the detector saw stays masked
    return Box(max(box.x0, ink_x0 - 1), max(box.y0, ink_y0 - 1), min(box.x1, ink_x1 + 1), min(box.y1, ink_y1 + 1),
               box.score)


def _inside(b: Box, outer: Box) -> bool:
    """b within outer, both along the same text direction (so b's padding stays within
    outer's too)."""
    return (outer.x0 <= b.x0 and outer.y0 <= b.y0 and b.x1 <= outer.x1 and b.y1 <= outer.y1
            and (b.width >= b.height) == (outer.width >= outer.height))


def _merge(boxes: list[Box]) -> list[Box]:
    """Merge boxes that overlap (after padding): neighbours on one line, and the boxes of
    two renderings of one frame."""
    boxes = sorted(boxes, key=lambda b: (b.y0, b.x0))
    merged = True
    while merged:
        merged = False
        out: list[Box] = []
        for b in boxes:
            for i, o in enumerate(out):
                if _joinable(o, b):
                    out[i] = Box(min(o.x0, b.x0), min(o.y0, b.y0), max(o.x1, b.x1), max(o.y1, b.y1), max(o.score, b.score))
                    merged = True
                    break
            else:
                out.append(b)
        boxes = out
    return boxes


def _joinable(a: Box, b: Box) -> bool:
    ix = min(a.x1, b.x1) - max(a.x0, b.x0)
    iy = min(a.y1, b.y1) - max(a.y0, b.y0)
    if ix < 0 or iy < 0:
        return False
    # same line (or same column) — or one box mostly inside the other. Two lines of text
    # can overlap by half a box (detectors pad boxes), so a line shares most of its height.
    if iy >= 0.7 * min(a.height, b.height) and (a.width >= a.height) == (b.width >= b.height) and a.width >= a.height:
        return True
    if ix >= 0.7 * min(a.width, b.width) and a.width < a.height and b.width < b.height:
        return True
    inter = ix * iy
    return inter >= 0.7 * min(a.width * a.height, b.width * b.height)


def _clip_region(r: Region, margin: int, rows: int, cols: int) -> Region | None:
    x0, y0 = max(0, r.x0 - margin), max(0, r.y0 - margin)
    x1, y1 = min(cols, r.x1 + margin), min(rows, r.y1 + margin)
    if x1 <= x0 or y1 <= y0:
        return None
    return Region(r.frame, x0, y0, x1, y1, r.text)


def _squeeze(text: str) -> str:
    return re.sub(r"[^0-9A-Z]", "", text.upper())


# -- masking and writing ---------------------------------------------------------------------


def _background_fills(regions: list[Region], arr: np.ndarray, black: np.ndarray, photometric: str) -> list[np.ndarray]:
    """Each region's fill: the median of the pixels in a band just outside it that no region
    covers (a palette's most frequent index there), taken before anything is filled. A mask
    is larger than its text (margin, padding along the line, the detector's unclipping:
    ~2.5x the words' boxes): filled with the background, the pixels around the text stay
    what they were (or within the noise) instead of turning black. Black where no such
    pixel exists. Frames with the same rectangles (every frame of a clip) are done at once."""
    _, rows, cols, _ = arr.shape
    band = BACKGROUND_BAND_PX
    rectangles: dict[int, list[tuple[int, int, int, int]]] = {}
    for r in regions:
        rectangles.setdefault(r.frame, []).append((r.x0, r.y0, r.x1, r.y1))
    frames_of: dict[tuple, list[int]] = {}
    for frame, rects in rectangles.items():
        frames_of.setdefault(tuple(sorted(set(rects))), []).append(frame)
    fill_of: dict[tuple[int, tuple[int, int, int, int]], np.ndarray] = {}
    for rects, frames in frames_of.items():
        covered = np.zeros((rows, cols), dtype=bool)
        for x0, y0, x1, y1 in rects:
            covered[y0:y1, x0:x1] = True
        for rect in rects:
            x0, y0, x1, y1 = rect
            y0, y1, x0, x1 = max(0, y0 - band), min(rows, y1 + band), max(0, x0 - band), min(cols, x1 + band)
            outside = np.flatnonzero(~covered[y0:y1, x0:x1])
            if not len(outside):
                continue
            # at most BACKGROUND_SAMPLES pixels, evenly spread around the region
            outside = outside[np.linspace(0, len(outside) - 1, min(len(outside), BACKGROUND_SAMPLES)).astype(np.int64)]
            window = arr[frames, y0:y1, x0:x1]
            around = window.reshape(len(frames), -1, window.shape[-1])[:, outside]  # (frames, pixels, samples)
            if photometric == "PALETTE COLOR":
                typical = np.array([np.bincount(a[:, 0].astype(np.int64) - a.min()).argmax() + a.min()
                                    for a in around])[:, None]
            else:
                typical = np.median(around, axis=1)
                if arr.dtype.kind in "iu":
                    typical = np.rint(typical)
            for frame, value in zip(frames, typical.astype(arr.dtype)):
                fill_of[frame, rect] = value
    return [fill_of.get((r.frame, (r.x0, r.y0, r.x1, r.y1)), black) for r in regions]


def _fill_value(ds: Dataset, arr: np.ndarray, photometric: str) -> np.ndarray:
    """The value that renders black: per sample, for this image."""
    samples = arr.shape[3]
    if photometric == "PALETTE COLOR":
        info = ds.get("RedPaletteColorLookupTableDescriptor")
        entries, first = (int(info[0]) or 65536, int(info[1])) if info is not None else (256, 0)
        candidates = np.arange(first, first + entries, dtype=np.int64)
        info_dtype = arr.dtype
        candidates = candidates[(candidates >= np.iinfo(info_dtype).min) & (candidates <= np.iinfo(info_dtype).max)]
        try:
            rgb = apply_color_lut(candidates.astype(info_dtype), ds).astype(np.float64)
            luminance = rgb @ np.array([0.299, 0.587, 0.114])
            return np.array([candidates[int(np.argmin(luminance))]], dtype=arr.dtype)
        except Exception:  # noqa: BLE001 - no usable LUT: the smallest index
            return np.array([arr.min()], dtype=arr.dtype)
    if samples == 3 and photometric.startswith("YBR"):
        mid = 128 if arr.dtype == np.uint8 else 1 << (int(ds.get("BitsStored", 16)) - 1)
        return np.array([arr[..., 0].min(), mid, mid], dtype=arr.dtype)
    if samples == 3:
        return np.zeros(3, dtype=arr.dtype)
    if photometric == "MONOCHROME1":
        return np.array([arr.max()], dtype=arr.dtype)
    return np.array([arr.min()], dtype=arr.dtype)


def _write(ds: Dataset, arr: np.ndarray, photometric: str, ts: UID, encapsulated: bool, lossy: bool,
           encapsulated_output: str, keyword: str) -> None:
    """Write the (masked) frames back losslessly and make the attributes consistent."""
    frames, rows, cols, samples = arr.shape
    ts_in = ts
    compressed_bytes = len(ds.get_item(keyword).value or b"") if encapsulated else 0
    for tag in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if tag in ds:
            del ds[tag]
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    elif "PlanarConfiguration" in ds:
        del ds["PlanarConfiguration"]
    shaped = arr
    if samples == 1:
        shaped = shaped[..., 0]
    if frames == 1:
        shaped = shaped[0]
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    written = False
    if encapsulated and encapsulated_output == "rle" and keyword == "PixelData":
        try:
            value = _rle_frames(np.ascontiguousarray(shaped), ds)
            if value is None:  # may pass 4 GB encoded: pydicom's extended offset table
                ds.compress(RLELossless, np.ascontiguousarray(shaped), generate_instance_uid=False)
            else:
                ds[keyword] = DataElement(PIXEL_DATA, "OB", value, is_undefined_length=True,
                                          already_converted=True)
                ds.file_meta.TransferSyntaxUID = RLELossless
            if samples > 1:
                ds.PlanarConfiguration = 1  # PS3.5 G.2: RLE segments are colour-by-plane
            written = True
        except Exception:  # noqa: BLE001 - RLE cannot take every layout: fall back to native
            written = False
    if not written:
        allocated = int(ds.get("BitsAllocated", arr.dtype.itemsize * 8))
        if allocated == 1:
            data = pack_bits(np.ascontiguousarray(arr).ravel())
        else:
            # big endian input stays big endian: pydicom writes a dataset read that way only
            # in its own byte order, and Pixel Data bytes are written as they are
            order = ">" if ts_in == ExplicitVRBigEndian and not encapsulated else "<"
            del ds[keyword]  # the stored pixels, decoded in arr: not a third copy in memory
            data = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder(order), copy=False)).tobytes()
            expected = frames * rows * cols * samples * allocated // 8
            if len(data) != expected:
                raise InstanceRefused("masked pixel data cannot be re-encoded with the stated Bits Allocated")
        if len(data) % 2:
            data += b"\0"
        setattr(ds, keyword, data)
        elem = ds[keyword]
        elem.is_undefined_length = False
        if keyword == "PixelData":
            elem.VR = "OB" if allocated <= 8 else "OW"
        if encapsulated or not ts_in.is_transfer_syntax:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        else:
            ds.file_meta.TransferSyntaxUID = ts_in
    ds._pixel_array = None
    ds._pixel_id = {}
    if lossy:
        ds.LossyImageCompression = "01"
        method = LOSSY_SYNTAXES.get(ts_in) or MAYBE_LOSSY_SYNTAXES.get(ts_in)
        if "LossyImageCompressionMethod" not in ds and method:
            ds.LossyImageCompressionMethod = method
        if "LossyImageCompressionRatio" not in ds and compressed_bytes:
            ratio = frames * rows * cols * samples * int(ds.get("BitsAllocated", 8)) / 8 / compressed_bytes
            ds.LossyImageCompressionRatio = f"{ratio:.2f}"[:16]


def _rle_frames(arr: np.ndarray, ds: Dataset) -> EncodedFrames | None:
    """The frames of arr as RLE Lossless, encoded while the output file is written, one at a
    time (``router.encode.EncodedFrames``): byte for byte what ``Dataset.compress`` gives,
    without the encoded clip in memory beside its decoded frames (compress keeps every
    encoded frame and then joins them twice). The first frame is encoded now, so that a
    layout RLE cannot take fails here (and is kept, not encoded twice). None if the offsets
    could pass 4 GB."""
    frames = _frames(ds)
    options = as_pixel_options(ds)
    encoder = get_encoder(RLELossless)
    # PackBits adds at most a byte per 128, each frame a 64-byte header and an item's 8 + 1
    if arr.nbytes + arr.nbytes // 128 + 73 * frames > 0xFFFFFFFF:
        return None
    encoded = encoder.iter_encode(arr, **options)
    first = next(encoded)
    return EncodedFrames(frames, itertools.chain([first], encoded))


# -- policy defaults -------------------------------------------------------------------------

_DEFAULTS: dict[str, Any] = {
    "mode": "all",
    "select": {"skip_modalities": [], "skip_sop_classes": [], "only_modalities": [], "trust_burned_in_annotation_no": False},
    "detect": {"renderings": ["minmax", "window"], "min_side": 512, "max_side": 2400, "thresh": 0.3, "box_thresh": 0.3,
               "unclip_ratio": 1.6, "max_upscale": 4.0, "max_text_height_fraction": 0.15, "min_filtered_px": 32,
               "confirm_height_fraction": 0.05, "confirm_min_px": 20, "confirm_min_score": 0.8,
               "projection_min_frames": 8},
    "mask": {"margin": 2, "pad_along": 0.5, "pad_along_max_px": 16, "trim_flat_sigma": 3.0, "fill": "background",
             "recognize": "auto"},
    "phi": {"min_confidence": 0.6, "whole_word_max_length": 3, "min_value_length": 2, "patterns": []},
    "output": {"encapsulated": "rle"},
    "regions": [],
}


def _with_defaults(policy: dict) -> dict:
    out: dict[str, Any] = {}
    for key, default in _DEFAULTS.items():
        value = policy.get(key, default)
        if isinstance(default, dict):
            value = {**default, **(value or {})}
        out[key] = value
    unknown = set(policy) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"pixel policy: unknown keys {sorted(unknown)}")
    return out
