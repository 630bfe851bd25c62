"""The spool's recycled files: written over, cut to length, never carrying old bytes on."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydicom import dcmread

from bench.synthetic import write_ct_series
from router import spool as spool_module
from router.config import embedded_default
from router.profile import Deidentifier, write_instance
from router.receive import SpoolFile
from router.spool import RECYCLE_BYTES, RECYCLE_FILES, Spool

OLD = b"PHI-OF-ANOTHER-PATIENT " * 50_000  # ~1.1 MB: longer than what is written over it


def _spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool", ["pacs"])
    spool.create()
    return spool


def _recycled(spool: Spool, content: bytes = OLD) -> Path:
    old = spool.incoming / "old.dcm"
    old.write_bytes(content)
    spool.recycle(old)
    assert not old.exists()
    return next(spool.recycle_dir.iterdir())


def test_a_received_file_written_over_a_recycled_one_holds_only_the_new_bytes(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    pooled = _recycled(spool)
    received = SpoolFile(spool)
    assert not pooled.exists()  # it became the new file
    received.write(b"DICM" * 1000)
    received.write(memoryview(b"x" * 1234))
    assert received.finish() == 5234
    received.close()
    assert Path(received.name).read_bytes() == b"DICM" * 1000 + b"x" * 1234
    assert SpoolFile(spool).finish() == 0  # the pool is empty: a new file


def test_a_worker_output_written_over_a_recycled_file_is_byte_identical_to_a_new_one(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    src = write_ct_series(tmp_path / "ct", 1)[0]
    deid = Deidentifier(embedded_default().deid, b"k" * 32)
    fresh = deid.process_file(src, tmp_path / "fresh.dcm", durable=False)
    _recycled(spool, OLD * 2)  # larger than the output
    over = deid.process_file(src, tmp_path / "over.dcm", durable=False, reuse=spool.reuse)
    assert list(spool.recycle_dir.iterdir()) == []  # it was used
    assert over.bytes_out == fresh.bytes_out == os.path.getsize(tmp_path / "over.dcm")
    assert (tmp_path / "over.dcm").read_bytes() == (tmp_path / "fresh.dcm").read_bytes()
    assert b"PHI-OF-ANOTHER" not in (tmp_path / "over.dcm").read_bytes()
    dcmread(tmp_path / "over.dcm")


def test_a_recycled_file_that_cannot_be_cut_is_not_used(tmp_path: Path, monkeypatch) -> None:
    """If the cut fails the write fails (and its file goes): never a file with a stale tail."""
    spool = _spool(tmp_path)
    _recycled(spool)
    ds = dcmread(write_ct_series(tmp_path / "ct", 1)[0])
    monkeypatch.setattr(os, "ftruncate", lambda fd, length: None)  # a cut that does nothing
    dst = tmp_path / "out.dcm"
    try:
        write_instance(ds, dst, durable=False, reuse=spool.reuse)
    except OSError:
        pass
    else:
        raise AssertionError("a file still holding old bytes was written")
    assert not dst.exists() and list(tmp_path.glob(".out.dcm.*")) == []


def test_recycle_keeps_a_bounded_pool_and_deletes_the_rest(tmp_path: Path, monkeypatch) -> None:
    spool = _spool(tmp_path)
    monkeypatch.setattr(spool_module, "RECYCLE_BYTES", 3 * len(OLD))
    for i in range(5):
        path = spool.incoming / f"{i}.dcm"
        path.write_bytes(OLD)
        spool.recycle(path)
        assert not path.exists()
    assert len(list(spool.recycle_dir.iterdir())) == 3
    empty = spool.incoming / "empty.dcm"
    empty.write_bytes(b"")
    spool.recycle(empty)
    assert not empty.exists() and len(list(spool.recycle_dir.iterdir())) == 3
    assert RECYCLE_FILES >= 16 and RECYCLE_BYTES <= 128 * 1024 * 1024
    # the closest in size is taken first
    small = spool.incoming / "small.dcm"
    small.write_bytes(b"s" * 1000)
    monkeypatch.setattr(spool_module, "RECYCLE_BYTES", 4 * len(OLD))
    spool.recycle(small)
    target = spool.tmp / "taken"
    assert spool.reuse(target, size_hint=900)
    assert target.stat().st_size == 1000


def test_a_file_system_short_of_space_gets_the_recycled_files_back(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    _recycled(spool)
    free = spool.free_bytes()
    # more free space asked for than there is: the pool is emptied before refusing
    assert spool.capacity_problem(0, free + 10 * 1024**3) is not None
    assert list(spool.recycle_dir.iterdir()) == []
    assert spool.capacity_problem(0, 1) is None


def test_a_deleted_recycle_folder_still_removes_files_from_their_stage(tmp_path: Path) -> None:
    """recycle/ may be deleted at any time: files leaving a stage are then deleted."""
    spool = _spool(tmp_path)
    spool.recycle_dir.rmdir()
    for size in (None, len(OLD)):
        path = spool.incoming / "done.dcm"
        path.write_bytes(OLD)
        spool.recycle(path, size)
        assert not path.exists()
    assert not spool.reuse(spool.tmp / "new")


def test_recycled_files_that_lay_unused_are_deleted_and_fresh_ones_kept(tmp_path: Path) -> None:
    """An idle node keeps no removed original's bytes for long: housekeeping deletes the
    recycled files that lay there longer than it allows; those just recycled stay."""
    spool = _spool(tmp_path)
    old = _recycled(spool)
    time.sleep(0.6)
    fresh = spool.incoming / "fresh.dcm"
    fresh.write_bytes(b"x" * 1000)
    spool.recycle(fresh)
    assert spool.drain_recycled(idle_seconds=0.5) == 1
    remaining = list(spool.recycle_dir.iterdir())
    assert old not in remaining and len(remaining) == 1
    assert spool.drain_recycled() == 1
    assert list(spool.recycle_dir.iterdir()) == []
