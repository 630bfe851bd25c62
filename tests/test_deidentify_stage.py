"""The de-identify stage on its own: real worker processes, a real spool, no network."""

from __future__ import annotations

import collections
import faulthandler
import json
import multiprocessing
import os
import shutil
import signal
import stat
import threading
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from test_node_support import NODE_TEST_OPTIONS, fill_file_system

from bench.synthetic import write_ct_series
from router import config as config_module
from router.decode import decoded_pixel_bytes
from router import deidentify
from router.deidentify import (
    DURABLE_AFTER_SECONDS,
    LARGE_INSTANCE_BYTES,
    MAX_KILLS_PER_INSTANCE,
    DeidStage,
    Routed,
    _Task,
    _Worker,
)
from router.spool import Spool


def _config(spool_dir: Path, workers: int):
    options = ", ".join(f'"{o}"' for o in NODE_TEST_OPTIONS)
    return config_module.parse(f"""
[node]
spool_dir = "{spool_dir}"
workers = {workers}
[deid]
secret = "stage-tests-secret-0123456789abcdef"
options = [{options}]
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 11112
""")


def _stage(spool_dir: Path, workers: int) -> tuple[Spool, list[Routed], DeidStage]:
    """A new spool and a stage on it (not started) that lists what it routes."""
    config = _config(spool_dir, workers)
    spool = Spool(config.node.spool_dir, ["pacs"])
    spool.create()
    routed: list[Routed] = []
    return spool, routed, DeidStage(config, b"k" * 32, spool, lambda dest, item: routed.append(item))


def _incoming(spool: Spool, files: list[Path]) -> list[Path]:
    paths = []
    for i, src in enumerate(files):
        path = spool.incoming / f"{i:032x}.dcm"
        shutil.copyfile(src, path)
        paths.append(path)
    return paths


def _run_stage(stage: DeidStage, spool: Spool, files: list[Path], settle=None) -> None:
    """Submit files and wait until the stage holds none of them and incoming/ is empty."""
    for path in _incoming(spool, files):
        stage.submit(path)
    deadline = time.monotonic() + 120
    while (stage.pending() or list(spool.incoming.iterdir())) and time.monotonic() < deadline:
        if settle:
            settle()
        time.sleep(0.05)
    assert stage.pending() == 0
    assert stage.in_flight_bytes() == 0


def test_outputs_not_delivered_in_time_are_made_durable_then_their_originals_go(tmp_path: Path) -> None:
    """Outputs are linked into outgoing/ volatile (not fsynced, the sticky bit set) while
    their originals stay in incoming/; with no forwarder to deliver them, each is made durable
    (mark cleared) after DURABLE_AFTER_SECONDS, and only then does its original go."""
    config = _config(tmp_path / "spool", workers=2)
    spool = Spool(config.node.spool_dir, ["pacs"])
    spool.create()
    files = write_ct_series(tmp_path / "ct", 40, patient_id="PID-STAGE-1")
    routed: list[Routed] = []
    volatile_when_routed: list[bool] = []
    lock = threading.Lock()

    def on_routed(dest: str, item: Routed) -> None:
        with lock:
            routed.append(item)
            volatile_when_routed.append(bool(item.path.stat().st_mode & stat.S_ISVTX))

    stage = DeidStage(config, b"k" * 32, spool, on_routed)
    stage.start()
    started = time.monotonic()
    try:
        _run_stage(stage, spool, files)
    finally:
        assert stage.stop() == 0
    assert time.monotonic() - started >= DURABLE_AFTER_SECONDS
    assert len(routed) == len(files) == len({r.sop_instance_uid for r in routed})
    assert all(volatile_when_routed)
    assert list(spool.incoming.iterdir()) == []
    assert sorted(p.name for p in spool.outgoing("pacs").iterdir()) == sorted(r.path.name for r in routed)
    assert all(r.path.stat().st_size == r.bytes > 0 for r in routed)
    assert not any(r.path.stat().st_mode & stat.S_ISVTX for r in routed)
    assert list(spool.tmp.iterdir()) == []
    assert stage.stats["deidentified"] == len(files)


def test_a_delivered_output_lets_its_original_go_without_being_made_durable(tmp_path: Path) -> None:
    """What a forwarder settles (delivered: deleted from outgoing/) frees its original at
    once; the output was never fsynced, so never marked durable."""
    spool, routed, stage = _stage(tmp_path / "spool", workers=1)
    files = write_ct_series(tmp_path / "ct", 10, patient_id="PID-STAGE-3")
    durable: list[Path] = []
    make_durable = spool.make_durable
    spool.make_durable = lambda path: (durable.append(path), make_durable(path))
    stage.start()
    started = time.monotonic()

    def deliver() -> None:
        while routed:
            item = routed.pop()
            found = item.path.stat()
            assert found.st_mode & stat.S_ISVTX
            spool.delivered(item.path, "pacs", found.st_ino)
            stage.settled("pacs", item.path.name, found.st_ino)

    try:
        _run_stage(stage, spool, files, settle=deliver)
        assert time.monotonic() - started < DURABLE_AFTER_SECONDS
    finally:
        assert stage.stop() == 0
    assert durable == []
    assert list(spool.outgoing("pacs").iterdir()) == []
    assert stage.stats["deidentified"] == len(files)


def test_volatile_outputs_are_dropped_at_start_and_durable_ones_kept(tmp_path: Path) -> None:
    """After a crash a volatile output may hold anything (even a recycled file's earlier
    bytes): the spool deletes those before anything is sent; their originals are in incoming/."""
    spool = Spool(tmp_path / "spool", ["pacs"])
    spool.create()
    assert spool.marks_volatile()
    volatile, durable = spool.outgoing("pacs") / "1.2.3.dcm", spool.outgoing("pacs") / "1.2.4.dcm"
    for path in (volatile, durable):
        path.write_bytes(b"PHI-LIKE BYTES OF AN EARLIER LIFE")
    spool.make_volatile(volatile)
    spool.make_volatile(durable)
    spool.make_durable(durable)
    assert spool.drop_volatile() == 1
    assert not volatile.exists() and durable.exists()
    assert stat.S_IMODE(durable.stat().st_mode) == 0o600


def test_a_dead_worker_blames_only_the_instance_it_was_computing(tmp_path: Path) -> None:
    """Instances a dead worker had been sent but not begun are done again without counting a
    crash against them; the one it was computing counts one, and a second crash
    quarantines it."""
    config = _config(tmp_path / "spool", workers=1)
    spool = Spool(config.node.spool_dir, ["pacs"])
    spool.create()
    computing, waiting = _incoming(spool, write_ct_series(tmp_path / "ct", 2, patient_id="PID-STAGE-2"))
    stage = DeidStage(config, b"k" * 32, spool, lambda dest, item: None)
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    parent, _child = multiprocessing.Pipe()
    stage._feeding = False  # no restarts: this worker is not real
    stage._closed = True

    for crash in (1, 2):
        worker = _Worker(0, dead, parent)
        worker.tasks.extend([_Task(computing.stem, computing, 1, started=time.monotonic()),
                             _Task(waiting.stem, waiting, 1)])
        stage._workers = [worker]
        stage._queue.clear()
        stage._died(worker)
        assert stage._crashes.get(waiting, 0) == 0
        if crash == 1:
            assert list(stage._queue) == [computing, waiting]
            assert stage._crashes[computing] == 1
        else:
            assert list(stage._queue) == [waiting]
            assert not computing.exists()
            assert [p.name for p in spool.quarantine_dir("deidentify").glob("*.dcm")] == [computing.name]
    assert waiting.exists()


def _sleep_quietly(ready) -> None:
    faulthandler.disable()  # pytest's, inherited: no traceback printed for the SIGSEGV
    ready.set()
    time.sleep(30)


def _died_of(sig: int):
    """A finished process that died of this signal (as a worker would)."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    process = ctx.Process(target=_sleep_quietly, args=(ready,))
    process.start()
    assert ready.wait(10)
    os.kill(process.pid, sig)
    process.join()
    return process


@pytest.mark.parametrize(("sig", "ooms", "quarantined_after", "why"), [
    (signal.SIGKILL, [3], MAX_KILLS_PER_INSTANCE, "was killed from outside (signal SIGKILL)"),
    (signal.SIGKILL, [3, 4, 5], 2, "died of signal SIGKILL"),  # the kernel killed for memory meanwhile
    (signal.SIGKILL, [None], 2, "died of signal SIGKILL"),  # no /proc/vmstat: counted
    (signal.SIGSEGV, [3], 2, "died of signal SIGSEGV"),
])
def test_a_worker_killed_from_outside_is_not_its_instances_fault(tmp_path: Path, monkeypatch, sig, ooms,
                                                                   quarantined_after, why) -> None:
    """kill -9 of a worker by an operator or a test (no out-of-memory kill in the kernel's
    count meanwhile) retries its instance without counting a crash: five such kills
    quarantine it. An out-of-memory kill, or a crash, counts: the second quarantines it."""
    counts = iter(ooms * 10)
    monkeypatch.setattr(deidentify, "oom_kills", lambda: next(counts))
    config = _config(tmp_path / "spool", workers=1)
    spool = Spool(config.node.spool_dir, ["pacs"])
    spool.create()
    [computing] = _incoming(spool, write_ct_series(tmp_path / "ct", 1, patient_id="PID-STAGE-K"))
    stage = DeidStage(config, b"k" * 32, spool, lambda dest, item: None)
    stage._feeding = False  # no restarts: these workers are not real
    stage._closed = True
    parent, _child = multiprocessing.Pipe()
    for death in range(1, quarantined_after + 1):
        worker = _Worker(0, _died_of(sig), parent)
        worker.tasks.append(_Task(computing.stem, computing, 1, started=time.monotonic()))
        stage._workers = [worker]
        stage._queue.clear()
        stage._died(worker)
        if death < quarantined_after:
            assert list(stage._queue) == [computing]
    assert not stage._queue and not computing.exists()
    [reason] = [json.loads(p.read_text())["reason"] for p in spool.quarantine_dir("deidentify").glob("*.reason.json")]
    assert reason == f"the worker process {why} while de-identifying this instance ({quarantined_after} times)"


def test_large_instances_never_wait_in_two_workers_at_once_and_smaller_ones_go_ahead(tmp_path: Path) -> None:
    config = _config(tmp_path / "spool", workers=2)
    spool = Spool(config.node.spool_dir, ["pacs"])
    spool.create()
    large = LARGE_INSTANCE_BYTES + 1
    names = ["large-1", "small-1", "large-2", "small-2"]
    paths = []
    for name in names:
        path = spool.incoming / f"{name}.dcm"
        path.write_bytes(b"")
        os.truncate(path, large if name.startswith("large") else 1000)  # sparse: no disk used
        paths.append(path)
    stage = DeidStage(config, b"k" * 32, spool, lambda dest, item: None)
    parent, _child = multiprocessing.Pipe()
    busy, idle = _Worker(0, None, parent), _Worker(1, None, parent)
    stage._workers = [busy, idle]
    stage._queue.extend(paths)

    busy.tasks.append(_Task("other", tmp_path / "other.dcm", large))  # another large one in memory
    taken = [stage._next_for(idle), stage._next_for(idle)]
    assert [(t.spool_id, t.size) for t in taken] == [("small-1", 1000), ("small-2", 1000)]
    assert stage._next_for(idle) is None  # only large ones left: they wait
    assert list(stage._queue) == [paths[0], paths[2]]
    assert stage._next_for(busy).path == paths[0]  # the worker holding one may take the next

    busy.tasks.clear()
    assert (stage._next_for(idle).path, stage._queue) == (paths[2], collections.deque())


def test_a_compressed_clip_counts_as_large_by_its_decoded_size(tmp_path: Path) -> None:
    """A worker decodes compressed pixel data (and encodes them again): a 5 MB JPEG clip of
    100 frames of 1024 x 1024 RGB needs ~0.6 GB, so it waits while another worker holds a
    large instance, like a native one of that size; a native 5 MB file counts as 5 MB. Its
    output, about its decoded size, is what the receiver keeps room for."""
    config = _config(tmp_path / "spool", workers=2)
    spool = Spool(config.node.spool_dir, ["pacs"])
    spool.create()
    clip = make_clip(spool.incoming / "clip.dcm", JPEGBaseline8Bit)
    native = make_clip(spool.incoming / "native.dcm", ExplicitVRLittleEndian)
    small = spool.incoming / "small.dcm"
    small.write_bytes(b"\0" * 1000)
    decoded = 1024 * 1024 * 3 * 100
    assert decoded_pixel_bytes(clip, clip.stat().st_size) == decoded
    assert decoded_pixel_bytes(native, native.stat().st_size) == 0
    stage = DeidStage(config, b"k" * 32, spool, lambda dest, item: None)
    parent, _child = multiprocessing.Pipe()
    busy, idle = _Worker(0, None, parent), _Worker(1, None, parent)
    stage._workers = [busy, idle]
    stage._queue.extend([clip, native, small])
    busy.tasks.append(_Task("other", tmp_path / "other.dcm", 1000, LARGE_INSTANCE_BYTES))
    assert [stage._next_for(idle).path for _ in range(2)] == [native, small]
    assert stage._next_for(idle) is None
    busy.tasks.clear()
    task = stage._next_for(idle)
    assert task.path == clip and task.memory > LARGE_INSTANCE_BYTES
    idle.tasks.append(task)
    assert stage.in_flight_bytes() == decoded


def make_clip(path: Path, syntax: str) -> Path:
    """A 5 MB file whose header describes 100 frames of 1024 x 1024 RGB (the pixel data are
    filler: only the header is read)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.NumberOfFrames = 1024, 1024, 3, 100
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "YBR_FULL_422"
    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = b"\0" * (5 * 1024 * 1024)
    else:
        ds.PixelData = encapsulate([b"\0" * (5 * 1024 * 1024)])
        ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_full_file_system_keeps_instances_waiting_not_quarantined(tmp_path: Path, small_filesystem: Path,
                                                                    monkeypatch) -> None:
    """Outputs cannot be written while the spool's file system is full (ENOSPC): the file
    system's state, not the instances' fault. They wait in incoming/ however many times
    they fail (an I/O error otherwise quarantines an instance after MAX_TRANSIENT_FAILURES)
    and are de-identified once there is room."""
    from router import deidentify

    monkeypatch.setattr(deidentify, "TRANSIENT_RETRY_SECONDS", 0.05)
    spool, routed, stage = _stage(small_filesystem / "spool", workers=1)
    paths = _incoming(spool, write_ct_series(tmp_path / "ct", 2, patient_id="PID-STAGE-FULL"))
    filler = fill_file_system(small_filesystem)
    stage.start()
    try:
        for path in paths:
            stage.submit(path)
        deadline = time.monotonic() + 60
        while stage.stats["transient"] < 2 * (deidentify.MAX_TRANSIENT_FAILURES + 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stage.stats["transient"] >= 2 * (deidentify.MAX_TRANSIENT_FAILURES + 2)
        assert all(p.exists() for p in paths) and not routed
        assert not list(spool.quarantine_dir("deidentify").glob("*"))
        filler.unlink()
        deadline = time.monotonic() + 60
        while len(routed) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(routed) == 2
    finally:
        assert stage.stop() == 0
    assert not list(spool.quarantine_dir("deidentify").glob("*"))


def test_rescan_takes_what_it_does_not_know_and_an_input_gone_is_forgotten(tmp_path: Path, monkeypatch) -> None:
    """``rescan`` submits originals put into incoming/ by hand (deid-router requeue) and
    nothing the stage already holds; an input removed from incoming/ before its worker
    read it is forgotten with an error, not retried every 10 s for ever."""
    from router import deidentify

    monkeypatch.setattr(deidentify, "TRANSIENT_RETRY_SECONDS", 0.05)
    spool, routed, stage = _stage(tmp_path / "spool", workers=1)
    files = write_ct_series(tmp_path / "ct", 4, patient_id="PID-STAGE-RESCAN")
    stage.start()
    try:
        def wait_for(count: int) -> None:
            deadline = time.monotonic() + 60
            while (stage.pending() or len(routed) < count) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(routed) == count and stage.pending() == 0

        stage.submit(spool.incoming / f"{'f' * 32}.dcm")  # gone before the worker reads it
        first, second, third, receiving = _incoming(spool, files)
        for put_back in (second, third):  # received a while ago (a file just received is the receiver's)
            os.utime(put_back, (time.time() - 60, time.time() - 60))
        os.utime(receiving, (time.time() + 3600, time.time() + 3600))  # the receiver's, however long this takes
        stage.submit(first)
        wait_for(1)
        assert stage.rescan() == 2  # the two put there by hand; first is held until delivered, and not the new one
        wait_for(3)
        assert stage.rescan() == 0
        time.sleep(0.5)
        assert stage.stats["transient"] == 0  # the missing input was not retried
    finally:
        assert stage.stop() == 0
