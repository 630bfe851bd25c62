"""Text detection for the pixel stage: a small engine interface and its PP-OCR implementation.

The pixel stage (``router.pixels``) only needs two things from an OCR engine: where text
is (``detect``) and, for the crosswalk and the "phi" masking mode, what it says
(``recognize``). ``TextDetector`` is that interface, so a site could plug in another
engine (PaddleOCR with local model folders, say) without touching the pixel stage.

``RapidOcrDetector`` runs PaddleOCR's PP-OCRv4 mobile detection model, shipped in this
package (``router/models``, see its README: ~4x faster than the PP-OCRv6 small model of
the rapidocr wheel, and it finds the same text on the corpus), and the PP-OCRv6 small
recognition model that the pinned ``rapidocr`` wheel ships (any model the wheel does not
bundle would be downloaded at run time, which must never happen here). Both run on
OpenVINO's CPU runtime, single-threaded: parallelism comes from worker processes, one
engine each. An engine is not thread-safe.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

#: Text detection: PP-OCRv4 mobile (Apache-2.0), as the rapidocr 3.8.4 wheel shipped it.
DETECTION_MODEL = "PP-OCRv4_det_mobile.onnx"
DETECTION_MODEL_SHA256 = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
#: Recognition: the model file inside the rapidocr wheel (rapidocr==3.10.0).
RAPIDOCR_REC_MODEL = "PP-OCRv6_rec_small.onnx"
#: Detector inputs above this many pixels (larger than 1024x1024) are searched in tiles,
#: so a worker needs what a tile needs (~0.4 GB at peak for a 2400-pixel radiograph), not
#: what the whole image would (~1.06 GB; 1.33 GB on ONNX Runtime; 0.52 GB at 1216x1216).
TILED_ABOVE_PIXELS = 1024 * 1024
#: Tiles of larger inputs: their side and how much neighbours overlap (multiples of 32).
TILE_SIDE = 1024
TILE_OVERLAP = 128
#: Input shapes whose prepared kernels OpenVINO keeps per model (a series repeats its image
#: size; text widths are rounded up to REC_WIDTH_STEP so that they repeat too).
RUNTIME_CACHE_SHAPES = 16
REC_WIDTH_STEP = 160
#: glibc mallopt parameters: blocks up to MMAP_THRESHOLD (glibc's largest) come from the
#: heap, and up to TRIM_THRESHOLD of free heap is kept for reuse (larger blocks are mapped
#: and unmapped). An 18 MB clip frees ~55-90 MB at once (file, decoded frames, re-encoded
#: frames): with 64 MiB, that was given back and page-faulted in again for the next clip
#: (~60 MB of faults, ~20 ms per clip here).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 128 * 1024 * 1024


@dataclass(frozen=True)
class Box:
    """An axis-aligned text box in image pixel coordinates, x1/y1 exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float = 1.0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


@runtime_checkable
class TextDetector(Protocol):
    """What the pixel stage needs from an OCR engine. One instance per worker process."""

    def detect(self, image: np.ndarray) -> list[Box]:
        """Text boxes in an 8-bit image, (H, W) grey or (H, W, 3) RGB."""
        ...

    def recognize(self, image: np.ndarray, box: Box) -> tuple[str, float]:
        """The text inside box and a confidence in [0, 1]; ("", 0.0) when none is read."""
        ...


class OcrUnavailable(RuntimeError):
    """The OCR engine cannot be loaded (missing package or model file)."""


@dataclass(frozen=True)
class DetectorSettings:
    """Detection settings; the defaults are what was measured to work on this kind of data."""

    #: Images whose shorter side is below this are upscaled to it (so 5-7 px text on small
    #: matrices becomes legible to the detector); 0 disables upscaling.
    min_side: int = 736
    #: Images whose longer side is above this are downscaled to it (bounds time and memory).
    max_side: int = 2400
    #: ... but never by more than this factor (tiny matrices upscaled 10x grow false text).
    max_upscale: float = 4.0
    #: DB post-processing (PaddleOCR's names).
    thresh: float = 0.3
    box_thresh: float = 0.3
    unclip_ratio: float = 1.6
    max_candidates: int = 1000
    #: Recognition: crops are resized to this height.
    rec_height: int = 48


class RapidOcrDetector:
    """PP-OCRv4 mobile detection and PP-OCRv6 small recognition, on OpenVINO."""

    def __init__(self, settings: DetectorSettings | None = None, threads: int = 1):
        self.settings = settings or DetectorSettings()
        # openvino's package imports its model converter (openvino.tools.ovc), and that
        # import starts Intel's usage telemetry: a client id written under ~/intel and an
        # event sent out (a DNS query at every worker start). A node never converts models
        # and must not call out: the converter is marked unimportable, which openvino's
        # package skips silently.
        sys.modules.setdefault("openvino.tools.ovc", None)  # type: ignore[arg-type]
        try:
            import openvino
            from rapidocr.ch_ppocr_det.utils import DBPostProcess
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise OcrUnavailable(
                f"the OCR engine needs the packages rapidocr and openvino ({exc.name} is not installed)"
            ) from None
        import cv2

        # OpenCV's own thread pool (resizing) spun in sched_yield between calls: ~2% of the
        # machine with two workers on two cores, for resizes that take ~1.7 ms.
        cv2.setNumThreads(threads)
        self._cv2 = cv2
        det_path = Path(str(resources.files("router") / "models" / DETECTION_MODEL))
        rec_path = Path(str(resources.files("rapidocr") / "models" / RAPIDOCR_REC_MODEL))
        for path in (det_path, rec_path):
            if not path.is_file():
                raise OcrUnavailable(
                    f"OCR model file {path} is missing: reinstall deid-router and the pinned rapidocr wheel, "
                    "which ship them (models are never downloaded at run time)"
                )
        if hashlib.sha256(det_path.read_bytes()).hexdigest() != DETECTION_MODEL_SHA256:
            raise OcrUnavailable(f"OCR model file {det_path} is not the one this version ships (checksum differs)")
        # A heap that keeps freed blocks lets every call reuse the memory of the last one
        # (each call page-faulted its tensors afresh: a fifth of a CT slice's OCR time).
        _keep_freed_memory()
        # OpenVINO's CPU runtime: the same models and results (f32: 1e-7 to 1e-5 apart) as
        # ONNX Runtime in ~0.7x its time (detection) or the same (recognition); ~0.5-0.6x
        # with bfloat16 where the CPU computes it natively (AVX512-BF16, AMX).
        try:
            core = openvino.Core()
            bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            # Not pinned to a core: OpenVINO pins each process's thread to the first core, so
            # two workers took turns on one core (measured: 2 workers no faster than 1).
            # Each input shape's prepared kernels and buffers are cached: by default 5000 of
            # them, which grew a worker by ~3 MB per new image size (~140 MB after 60) and
            # ~0.7 GB over 900 text widths; the last RUNTIME_CACHE_SHAPES stay.
            config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "ENABLE_CPU_PINNING": False,
                      "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_SHAPES}
            self._det_compiled = core.compile_model(core.read_model(str(det_path)), "CPU", config)
            self._det = self._det_compiled.create_infer_request()
            rec_model = core.read_model(str(rec_path))
            self._rec_compiled = core.compile_model(rec_model, "CPU", config)
            self._rec = self._rec_compiled.create_infer_request()
            characters = rec_model.get_rt_info(["framework", "character"]).astype(str) \
                if rec_model.has_rt_info(["framework", "character"]) else ""
        except Exception as exc:  # noqa: BLE001 - any load failure means no engine
            raise OcrUnavailable(f"cannot load the OCR models: {type(exc).__name__}: {exc}") from None
        if not characters:
            raise OcrUnavailable(f"the recognition model {rec_path.name} carries no character list")
        # CTC classes: 0 is the blank, then the model's characters, then a space.
        self._chars = ["", *characters.splitlines(), " "]
        s = self.settings
        self._post = DBPostProcess(
            thresh=s.thresh, box_thresh=s.box_thresh, max_candidates=s.max_candidates,
            unclip_ratio=s.unclip_ratio, score_mode="fast", use_dilation=True,
        )

    # -- detection -----------------------------------------------------------------------

    def detect(self, image: np.ndarray) -> list[Box]:
        rgb = _as_rgb_uint8(image)
        h, w = rgb.shape[:2]
        if h < 4 or w < 4:
            return []
        ratio = 1.0
        s = self.settings
        if s.min_side and min(h, w) < s.min_side:
            ratio = min(s.min_side / min(h, w), max(1.0, s.max_upscale))
        if s.max_side and max(h, w) * ratio > s.max_side:
            ratio = s.max_side / max(h, w)
        rh = max(32, int(round(h * ratio / 32)) * 32)
        rw = max(32, int(round(w * ratio / 32)) * 32)
        interpolation = self._cv2.INTER_LINEAR if rh * rw >= h * w else self._cv2.INTER_AREA
        resized = self._cv2.resize(rgb, (rw, rh), interpolation=interpolation)
        tensor = (resized.astype(np.float32) * (2.0 / 255.0) - 1.0).transpose(2, 0, 1)[None]
        pred = self._tiled(tensor) if rh * rw > TILED_ABOVE_PIXELS else self._det.infer({0: tensor})[0]
        quads, scores = self._post(pred, (h, w))
        boxes = []
        for quad, score in zip(quads, scores):
            quad = np.asarray(quad)
            x0, y0 = np.floor(quad.min(axis=0)).astype(int)
            x1, y1 = np.ceil(quad.max(axis=0)).astype(int) + 1
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
            if x1 > x0 and y1 > y0:
                boxes.append(Box(int(x0), int(y0), int(x1), int(y1), float(score)))
        return boxes

    def _tiled(self, tensor: np.ndarray) -> np.ndarray:
        """The text probability map of a large input, computed tile by tile: the network's
        working memory grows with the input (~0.7 GB at 2400x1984), a tile's stays within
        what TILE_SIDE needs (~0.2 GB). As few tiles per side as fit, of equal size, overlap
        by TILE_OVERLAP or more and each gives the map only its inner part (beyond half the
        overlap from an inner edge), where it sees most of what the whole image shows around
        every pixel: the map differs from the whole image's at a few text edges, the boxes
        found agree (measured on lines across tile edges)."""
        _, _, height, width = tensor.shape
        pred = np.zeros((1, 1, height, width), dtype=np.float32)
        half = TILE_OVERLAP // 2
        for y0, y1 in _tiles(height):
            for x0, x1 in _tiles(width):
                tile = self._det.infer({0: np.ascontiguousarray(tensor[:, :, y0:y1, x0:x1])})[0]
                # keep what lies beyond half the overlap from an edge shared with a neighbour
                ky0 = y0 + half if y0 > 0 else 0
                kx0 = x0 + half if x0 > 0 else 0
                ky1 = y1 - half if y1 < height else height
                kx1 = x1 - half if x1 < width else width
                pred[:, :, ky0:ky1, kx0:kx1] = tile[:, :, ky0 - y0:ky1 - y0, kx0 - x0:kx1 - x0]
        return pred

    # -- recognition ---------------------------------------------------------------------

    def recognize(self, image: np.ndarray, box: Box) -> tuple[str, float]:
        text, score, _ = self.recognize_chars(image, box)
        return text, score

    def recognize_chars(self, image: np.ndarray, box: Box) -> tuple[str, float, list[tuple[str, float, float]]]:
        """Text, mean confidence and each character with its (x_start, x_end) in image coordinates.

        Vertical boxes (much taller than wide) are read rotated by 90 degrees both ways and
        the more confident reading wins; character positions are then not horizontal and
        are returned empty.
        """
        rgb = _as_rgb_uint8(image)
        crop = rgb[box.y0:box.y1, box.x0:box.x1]
        if crop.size == 0 or crop.shape[0] < 2 or crop.shape[1] < 2:
            return "", 0.0, []
        if crop.shape[0] > 1.5 * crop.shape[1]:
            best = ("", 0.0, [])
            for k in (1, 3):
                text, score, _ = self._read(np.ascontiguousarray(np.rot90(crop, k)))
                if score > best[1]:
                    best = (text, score, [])
            return best
        text, score, chars = self._read(crop)
        return text, score, [(c, box.x0 + a, box.x0 + b) for c, a, b in chars]

    def _read(self, crop: np.ndarray) -> tuple[str, float, list[tuple[str, float, float]]]:
        h, w = crop.shape[:2]
        height = self.settings.rec_height
        width = max(8, int(math.ceil(height * w / h)))
        width = min(width, 3200)
        resized = self._cv2.resize(crop, (width, height), interpolation=self._cv2.INTER_LINEAR)
        padded_width = max(320, -(-width // REC_WIDTH_STEP) * REC_WIDTH_STEP)
        tensor = np.zeros((1, 3, height, padded_width), dtype=np.float32)
        tensor[0, :, :, :width] = resized.astype(np.float32).transpose(2, 0, 1) * (2.0 / 255.0) - 1.0
        pred = self._rec.infer({0: tensor})[0][0]  # (T, classes)
        index = pred.argmax(axis=1)
        prob = pred.max(axis=1)
        steps = len(index)
        scale = padded_width / steps * (w / width)  # time step -> crop x
        chars, probs = [], []
        previous = -1
        for t, cls in enumerate(index):
            if cls != 0 and cls != previous and cls < len(self._chars):
                chars.append((self._chars[cls], t * scale, (t + 1) * scale))
                probs.append(float(prob[t]))
            previous = cls
        text = "".join(c for c, _, _ in chars)
        # widen each character to the start of the next one, for masking by character
        spans = []
        for i, (c, a, b) in enumerate(chars):
            end = chars[i + 1][1] if i + 1 < len(chars) else max(b, min(w, b + scale))
            spans.append((c, a, end))
        return text.strip(), (float(np.mean(probs)) if probs else 0.0), spans


def _tiles(length: int) -> list[tuple[int, int]]:
    """Where the tiles of a side of ``length`` (a multiple of 32) start and end: as few as
    TILE_SIDE allows, all of one size (a multiple of 32), each overlapping the next by at
    least TILE_OVERLAP."""
    count = max(1, math.ceil((length - TILE_OVERLAP) / (TILE_SIDE - TILE_OVERLAP)))
    side = min(length, math.ceil((length + (count - 1) * TILE_OVERLAP) / count / 32) * 32)
    starts = [min(k * (side - TILE_OVERLAP), length - side) for k in range(count)]
    return [(start, start + side) for start in starts]


def _keep_freed_memory() -> None:
    """Tune glibc's allocator of this process (a worker's) for repeated same-sized images
    (nothing changes where the C library is not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise TypeError(f"the detector takes 8-bit images, not {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    raise ValueError(f"unsupported image shape {image.shape}")


# -- a tiny bitmap font, for the self-test (and tests) without any font file -----------------

#: 5x7 glyphs, one byte per column, least significant bit at the top.
_FONT_5X7: dict[str, tuple[int, ...]] = {
    " ": (0x00, 0x00, 0x00, 0x00, 0x00), ".": (0x00, 0x60, 0x60, 0x00, 0x00),
    ",": (0x00, 0x50, 0x30, 0x00, 0x00), ":": (0x00, 0x36, 0x36, 0x00, 0x00),
    "-": (0x08, 0x08, 0x08, 0x08, 0x08), "/": (0x20, 0x10, 0x08, 0x04, 0x02),
    "^": (0x04, 0x02, 0x01, 0x02, 0x04), "#": (0x14, 0x7F, 0x14, 0x7F, 0x14),
    "0": (0x3E, 0x51, 0x49, 0x45, 0x3E), "1": (0x00, 0x42, 0x7F, 0x40, 0x00),
    "2": (0x42, 0x61, 0x51, 0x49, 0x46), "3": (0x21, 0x41, 0x45, 0x4B, 0x31),
    "4": (0x18, 0x14, 0x12, 0x7F, 0x10), "5": (0x27, 0x45, 0x45, 0x45, 0x39),
    "6": (0x3C, 0x4A, 0x49, 0x49, 0x30), "7": (0x01, 0x71, 0x09, 0x05, 0x03),
    "8": (0x36, 0x49, 0x49, 0x49, 0x36), "9": (0x06, 0x49, 0x49, 0x29, 0x1E),
    "A": (0x7E, 0x11, 0x11, 0x11, 0x7E), "B": (0x7F, 0x49, 0x49, 0x49, 0x36),
    "C": (0x3E, 0x41, 0x41, 0x41, 0x22), "D": (0x7F, 0x41, 0x41, 0x22, 0x1C),
    "E": (0x7F, 0x49, 0x49, 0x49, 0x41), "F": (0x7F, 0x09, 0x09, 0x09, 0x01),
    "G": (0x3E, 0x41, 0x49, 0x49, 0x7A), "H": (0x7F, 0x08, 0x08, 0x08, 0x7F),
    "I": (0x00, 0x41, 0x7F, 0x41, 0x00), "J": (0x20, 0x40, 0x41, 0x3F, 0x01),
    "K": (0x7F, 0x08, 0x14, 0x22, 0x41), "L": (0x7F, 0x40, 0x40, 0x40, 0x40),
    "M": (0x7F, 0x02, 0x0C, 0x02, 0x7F), "N": (0x7F, 0x04, 0x08, 0x10, 0x7F),
    "O": (0x3E, 0x41, 0x41, 0x41, 0x3E), "P": (0x7F, 0x09, 0x09, 0x09, 0x06),
    "Q": (0x3E, 0x41, 0x51, 0x21, 0x5E), "R": (0x7F, 0x09, 0x19, 0x29, 0x46),
    "S": (0x46, 0x49, 0x49, 0x49, 0x31), "T": (0x01, 0x01, 0x7F, 0x01, 0x01),
    "U": (0x3F, 0x40, 0x40, 0x40, 0x3F), "V": (0x1F, 0x20, 0x40, 0x20, 0x1F),
    "W": (0x3F, 0x40, 0x38, 0x40, 0x3F), "X": (0x63, 0x14, 0x08, 0x14, 0x63),
    "Y": (0x07, 0x08, 0x70, 0x08, 0x07), "Z": (0x61, 0x51, 0x49, 0x45, 0x43),
}


def render_text(text: str, scale: int = 2) -> np.ndarray:
    """A boolean bitmap of text in the 5x7 font (upper case), 7*scale pixels tall."""
    columns: list[np.ndarray] = []
    for ch in text.upper():
        glyph = _FONT_5X7.get(ch, _FONT_5X7[" "])
        bits = np.array([[(col >> row) & 1 for col in glyph] for row in range(7)], dtype=bool)
        columns.append(bits)
        columns.append(np.zeros((7, 1), dtype=bool))
    bitmap = np.concatenate(columns, axis=1) if columns else np.zeros((7, 0), dtype=bool)
    return np.kron(bitmap, np.ones((scale, scale), dtype=bool))
