"""Benchmark the pixel stage: images/s for 512x512 CT slices and 800x600 RGB ultrasound
frames through PixelCleaner.clean, with 1 and with N worker processes (one engine each),
plus detection-only time per image and peak RSS per worker.

    python bench/ocr.py [--images 12] [--workers 2]

Synthetic images with burned-in text are generated here; nothing is read or written
outside memory. Figures on a shared machine are noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from router.ocr import render_text  # noqa: E402

_cleaner = None


def _image(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "ct":
        rows, cols = 512, 512
        yy, xx = np.mgrid[0:rows, 0:cols]
        body = ((yy - 256) / 200.0) ** 2 + ((xx - 256) / 220.0) ** 2 < 1
        image = np.where(body, 40 + 60 * np.sin(xx / 11.0) * np.cos(yy / 17.0), -1000) + rng.normal(0, 10, (rows, cols))
        image = image.astype(np.int16)
        for y, text in ((8, f"PATIENT^NAME {seed:05d}"), (26, "DOB 01/02/1950"), (490, "ACC 20240101E12345")):
            bitmap = render_text(text, 2)
            image[y:y + bitmap.shape[0], 8:8 + bitmap.shape[1]][bitmap] = 1500
        return image
    rows, cols = 600, 800
    yy, xx = np.mgrid[0:rows, 0:cols]
    sector = (np.hypot(yy + 50, xx - 400) < 600) & (np.abs(xx - 400) < (yy + 50) * 0.8)
    grey = np.where(sector, 60 + 50 * np.sin(xx / 5.0 + yy / 7.0) + rng.normal(0, 20, (rows, cols)), 0)
    image = np.clip(np.stack([grey] * 3, axis=-1), 0, 255).astype(np.uint8)
    for y, text in ((6, f"HOSPITAL NAME  DOE JANE {seed:04d}"), (24, "12/31/2023 10:22:33")):
        bitmap = render_text(text, 2)
        image[y:y + bitmap.shape[0], 10:10 + bitmap.shape[1]][bitmap] = (230, 230, 120)
    return image


def _dataset(image: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    colour = image.ndim == 3
    ds.Modality = "US" if colour else "CT"
    ds.Rows, ds.Columns = image.shape[:2]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = image.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if image.dtype.kind == "i" else 0
    if not colour:
        ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = image.tobytes()
    return ds


def _init() -> None:
    global _cleaner
    from router.pixels import PixelCleaner

    _cleaner = PixelCleaner()


def _clean(args: tuple[str, int]) -> tuple[float, int, int]:
    kind, seed = args
    ds = _dataset(_image(kind, seed))
    started = time.perf_counter()
    report = _cleaner.clean(ds, set())
    return time.perf_counter() - started, len(report.regions), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def pixel_stage_alone(files: list[Path]) -> dict:
    """The pixel stage on files in this process, no node around it: ``clean`` seconds per
    instance, and each detector call's seconds (one per rendering of a frame or projection).

    The OCR-alone baseline of the ocr path: what the node adds beyond it is its overhead.
    """
    from router.pixels import PixelCleaner
    from router.profile import read_instance

    cleaner = PixelCleaner(read_text=False)  # as the node's workers without a text crosswalk
    detect = cleaner.engine.detect
    calls: list[float] = []

    def timed(image):
        started = time.perf_counter()
        try:
            return detect(image)
        finally:
            calls.append(time.perf_counter() - started)

    cleaner.engine.detect = timed
    datasets = [read_instance(p) for p in files]  # the worker's reader: native pixels masked in place
    cleaner.clean(read_instance(files[0]), set())  # warm
    calls.clear()
    clean = []
    for ds in datasets:
        started = time.perf_counter()
        cleaner.clean(ds, set())
        clean.append(time.perf_counter() - started)
    return {"clean_seconds": clean, "detect_seconds": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="images per kind and run")
    parser.add_argument("--workers", type=int, default=mp.cpu_count() or 1)
    args = parser.parse_args()

    from router.ocr import RapidOcrDetector
    from router.pixels import _as_rgb, _minmax

    engine = RapidOcrDetector()
    for kind in ("ct", "us"):
        image = _image(kind, 0)
        view = _minmax(image.astype(np.float32)) if image.ndim == 2 else image
        engine.detect(view)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            boxes = engine.detect(view)
            times.append(time.perf_counter() - started)
        rec = []
        for b in boxes:
            started = time.perf_counter()
            engine.recognize(_as_rgb(view), b)
            rec.append(time.perf_counter() - started)
        print(f"{kind}: {image.shape[1]}x{image.shape[0]} detection only, one thread: median "
              f"{statistics.median(times) * 1000:.0f} ms; recognition {sum(rec) * 1000:.0f} ms for {len(rec)} boxes")
    del engine

    for kind in ("ct", "us"):
        for workers in sorted({1, args.workers}):
            jobs = [(kind, i) for i in range(args.images)]
            with mp.get_context("spawn").Pool(workers, initializer=_init) as pool:
                pool.map(_clean, [(kind, 1000 + i) for i in range(workers)])  # warm every worker
                started = time.perf_counter()
                results = pool.map(_clean, jobs, chunksize=1)
                wall = time.perf_counter() - started
            per_image = statistics.median(r[0] for r in results)
            rss = max(r[2] for r in results) / 1024
            print(f"{kind}: {workers} worker(s): {len(jobs) / wall:.2f} images/s, median {per_image * 1000:.0f} ms "
                  f"per image in a worker, {statistics.mean(r[1] for r in results):.1f} regions, "
                  f"peak RSS per worker {rss:.0f} MB")


if __name__ == "__main__":
    main()
