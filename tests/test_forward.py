"""The export stage's conversion for a destination that takes a SOP class only uncompressed."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from bench.synthetic import us_multiframe
from router.forward import encode_dataset, load_uncompressed, write_decompressed
from router.spool import Spool

FRAMES = 40


def test_decompressed_copy_holds_one_frame_at_a_time(tmp_path: Path) -> None:
    """An RLE clip (the pixel stage's output) is decoded into the scratch file frame by
    frame: the bytes equal the whole-instance conversion's, and the memory it takes is the
    compressed value and a frame or two, not the decoded clip (57.6 MB here) and its
    encoding besides. An element after Pixel Data stays after it."""
    clip, _boxes = us_multiframe(FRAMES, seed=3)
    clip.compress(RLELossless, encoding_plugin="pylibjpeg")
    clip.add_new(0x7FE00020, "OW", b"\x01\x00\x02\x00")  # Coefficients SDVN (retired), after Pixel Data
    path = tmp_path / "clip.dcm"
    clip.save_as(path, enforce_file_format=True)
    frame_bytes = clip.Rows * clip.Columns * 3
    spool = Spool(tmp_path / "spool")
    spool.create()
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        with spool.scratch_file() as scratch:
            assert os.listdir(spool.tmp) == []  # nameless: nothing to clean after a kill -9
            tracemalloc.start()
            try:
                write_decompressed(path, syntax, scratch)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            scratch.seek(0)
            written = scratch.read()
        assert written == encode_dataset(load_uncompressed(path), syntax)
        assert written.endswith(b"\x01\x00\x02\x00")
        assert peak < path.stat().st_size + 4 * frame_bytes, f"{peak / 1e6:.1f} MB"
    decoded = dcmread(path).pixel_array
    assert decoded.shape == (FRAMES, clip.Rows, clip.Columns, 3) and np.any(decoded)
