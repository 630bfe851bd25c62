"""The measured paths of ``python -m bench``: each returns its rows, baselines included.

Every path starts its own destination (storescp) and node, and stops them before it
returns, so paths can run alone (``--only``) and leave nothing behind.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, build_context, evt

from bench.filemode import measure_deid, measure_plain, warm_cache
from bench.ocr import pixel_stage_alone
from bench.passthrough import install_checkpoint, nodelay
from bench.measure import Row, RssSampler, SpoolSampler, measure, megabytes, wait_for
from bench.peers import PDU, SECRET, Node, OrthancPeer, StoreSCP
from bench.synthetic import to_bytes, us_multiframe, us_rgb_with_text, write_ct_multiframe
from router.config import DEFAULT_OPTIONS

#: Every default de-identification option but the OCR of pixels.
METADATA_OPTIONS = sorted(DEFAULT_OPTIONS - {"clean-pixel-data"})
PASS_THROUGH = "pass-through"
ORTHANC = "storescu -> Orthanc"
ORTHANC_NO_FSYNC = "storescu -> Orthanc, no fsync"
ROUTER = "deid-router"
ROUTER_TO_ORTHANC = "storescu -> deid-router -> Orthanc"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def network(work: Path, files: list[Path], workers: int, *, path: str = "network", senders: int = 1,
            ceiling: bool = True) -> list[Row]:
    """storescu -> X -> storescp for X = nothing, the pass-through, the router; and storescu -> Orthanc."""
    label = f", {_plural(senders, 'sender')}" if path == "senders" else ""
    rows = []
    scp = StoreSCP(work / "scp")
    try:
        if ceiling:
            rows.append(measure(path, f"storescu -> storescp{label}", files, port=scp.port, aet=scp.aet,
                                delivered=scp.count, tree_pid=scp.process.pid, senders=senders,
                                note="the machine's ceiling"))
            scp.clear()
        passthrough = Node(work / "passthrough", scp, "pass-through")
        try:
            rows.append(measure(path, PASS_THROUGH + label, files, port=passthrough.port, aet=passthrough.aet,
                                delivered=scp.count, tree_pid=passthrough.pid, node=passthrough, scp=scp,
                                senders=senders, note="pynetdicom, receive and forward unchanged"))
        finally:
            passthrough.stop()
        scp.clear()
        for name, sync, note in ((ORTHANC, True, "ingest only, as shipped: each file fsynced before the answer"),
                                 (ORTHANC_NO_FSYNC, False, "ingest only, SyncStorageArea false: not durable")):
            orthanc = OrthancPeer(work / ("orthanc" if sync else "orthanc-no-fsync"), sync=sync)
            try:
                rows.append(measure(path, name + label, files, port=orthanc.port, aet=orthanc.aet,
                                    delivered=orthanc.count, tree_pid=orthanc.process.pid, senders=senders,
                                    note=note))
            finally:
                orthanc.stop()
        router = Node(work / "router", scp, "router", options=METADATA_OPTIONS, workers=workers)
        try:
            rows.append(measure(path, ROUTER + label, files, port=router.port, aet=router.aet, delivered=scp.count,
                                tree_pid=router.pid, node=router, scp=scp, senders=senders,
                                baselines=(PASS_THROUGH + label, ORTHANC + label, ORTHANC_NO_FSYNC + label),
                                note=f"all default options but clean-pixel-data, {_plural(workers, 'worker')}"))
        finally:
            router.stop()
        if path == "network":
            # As sites deploy it: the research PACS is Orthanc, on the same two cores.
            orthanc = OrthancPeer(work / "orthanc-destination")
            router = Node(work / "router-orthanc", orthanc, "router", options=METADATA_OPTIONS, workers=workers)
            try:
                rows.append(measure(path, ROUTER_TO_ORTHANC, files, port=router.port, aet=router.aet,
                                    delivered=orthanc.count, tree_pid=router.pid, node=router,
                                    baselines=(ORTHANC,), note="the router forwarding into Orthanc (fsync on)"))
            finally:
                router.stop()
                orthanc.stop()
    finally:
        scp.stop()
    return rows


def large(work: Path, kind: str, files: list[Path], workers: int) -> list[Row]:
    """The metadata path with large instances (ultrasound clips): storescu -> storescp,
    storescu -> Orthanc and storescu -> deid-router -> storescp, one sender."""
    rows = []
    scp = StoreSCP(work / "scp")
    try:
        rows.append(measure("network", f"{kind}: storescu -> storescp", files, port=scp.port, aet=scp.aet,
                            delivered=scp.count, tree_pid=scp.process.pid, note="the machine's ceiling"))
        scp.clear()
        orthanc = OrthancPeer(work / "orthanc")
        try:
            rows.append(measure("network", f"{kind}: {ORTHANC}", files, port=orthanc.port, aet=orthanc.aet,
                                delivered=orthanc.count, tree_pid=orthanc.process.pid,
                                note="ingest only, as shipped: each file fsynced before the answer"))
        finally:
            orthanc.stop()
        router = Node(work / "router", scp, "router", options=METADATA_OPTIONS, workers=workers)
        try:
            rows.append(measure("network", f"{ROUTER}: {kind}", files, port=router.port, aet=router.aet,
                                delivered=scp.count, tree_pid=router.pid, node=router, scp=scp,
                                baselines=(f"{kind}: {ORTHANC}",),
                                note=f"all default options but clean-pixel-data, {_plural(workers, 'worker')}"))
        finally:
            router.stop()
    finally:
        scp.stop()
    return rows


def _pixel_stage_alone(files: list[Path]) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # models out of this process
        return pool.apply(pixel_stage_alone, (files,))


def ocr(work: Path, kind: str, files: list[Path], workers: int) -> list[Row]:
    """The pixel stage alone in one process (the baseline: OCR itself), then the router
    with the default options (OCR of every frame), 1 worker and ``workers``. The pixel
    stage runs just before and just after the 1-worker row and the baseline is their mean:
    this VM's speed drifts within minutes, and the overhead is a ratio of the two."""
    before = _pixel_stage_alone(files)
    alone_name = f"{kind}, OCR alone"
    rows: list[Row] = []
    scp = StoreSCP(work / "scp")
    try:
        for count in sorted({1, workers}):
            scp.clear()
            router = Node(work / f"router-{count}", scp, "router", workers=count)
            try:
                row = measure("ocr", f"{kind}, {_plural(count, 'worker')}", files, port=router.port,
                              aet=router.aet, delivered=scp.count, tree_pid=router.pid, node=router, scp=scp,
                              baselines=(f"{kind}, 1 worker",) if count > 1 else (alone_name,),
                              note="default options: OCR of every frame")
                deid_ms = sorted(float(e["deid_ms"]) for e in router.events("deidentified") if "deid_ms" in e)
                row.extra["deid_ms_median"] = deid_ms[len(deid_ms) // 2] if deid_ms else None
                row.extra["workers"] = count
                rows.append(row)
            finally:
                router.stop()
            if count == 1:
                after = _pixel_stage_alone(files)
    finally:
        scp.stop()
    detect_ms = sorted(1000 * s for s in before["detect_seconds"] + after["detect_seconds"])
    seconds = [sum(before["clean_seconds"]), sum(after["clean_seconds"])]
    alone = Row("ocr", alone_name, len(files), sum(seconds) / 2, megabytes(files),
                note="the pixel stage in one process, no node (decode, OCR, mask, encode); "
                     "the mean of runs just before and after the 1-worker row",
                extra={"detect_ms_median": detect_ms[len(detect_ms) // 2] if detect_ms else None,
                       "detector_calls_per_instance": round(len(detect_ms) / len(files) / 2, 2),
                       "seconds_before_after": [round(x, 3) for x in seconds]})
    return [alone, *rows]


def filemode(work: Path, files: list[Path], workers: int) -> list[Row]:
    """``deid-router deid`` on a folder vs a plain pydicom read + write of the same files."""
    src = work / "src"  # exactly these files: deid walks the whole folder
    src.mkdir(parents=True)
    for p in files:
        os.link(p, src / p.name)
    files = sorted(src.iterdir())
    config = work / "filemode.toml"
    config.write_text(f'[deid]\nsecret = "{SECRET}"\noptions = {json.dumps(METADATA_OPTIONS)}\n'
                      '[logging]\nlevel = "warning"\n')
    input_bytes = warm_cache(files)
    plain = measure_plain("plain pydicom read+write", files, work, 1, input_bytes, fsync=False)
    deid = measure_deid("deid-router deid", src, files, work, config, 1, input_bytes, workers)
    rows = []
    for m, baselines, note in ((plain, (), "one process, no fsync"),
                               (deid, (plain.name,), f"{_plural(workers, 'worker')}, fsync, incl. start-up")):
        if not m.ok:
            raise RuntimeError(f"filemode/{m.name}: {m.error}")
        rows.append(Row("filemode", m.name, m.instances, m.best, input_bytes / 1e6, peak_rss_mb=m.peak_rss_mb,
                        baselines=baselines, note=note))
    return rows


def scaling(work: Path, ct: list[Path], sizes: list[int], workers: int) -> list[Row]:
    """The metadata path with growing studies: time per instance and peak RSS should stay flat."""
    rows = []
    first = None
    for size in sizes:
        files = ct[:size]
        name = f"{ROUTER} x{size} ({megabytes(files) / 1000:.1f} GB study)"
        scp = StoreSCP(work / f"scp-{size}")
        try:
            router = Node(work / f"router-{size}", scp, "router", options=METADATA_OPTIONS, workers=workers)
            try:
                rows.append(measure("scaling", name, files, port=router.port, aet=router.aet, delivered=scp.count,
                                    tree_pid=router.pid, node=router, scp=scp,
                                    baselines=(first,) if first else (), note="one study, one series"))
            finally:
                router.stop()
        finally:
            scp.stop()
        first = first or name
    return rows


def large_with_ocr(work: Path, frames: int, workers: int) -> list[Row]:
    """One large multi-frame with a name on every frame through the router with the default
    options (OCR on), ``workers`` workers: the whole node's peak RSS (target < 1.5 GiB)."""
    path = write_ct_multiframe(work / "multiframe.dcm", frames)
    name = f"{ROUTER} + OCR: 1 x {megabytes([path]):.0f} MB multi-frame"
    scp = StoreSCP(work / "scp")
    try:
        router = Node(work / "router", scp, "router", workers=workers)
        try:
            row = measure("scaling", name, [path], port=router.port, aet=router.aet, delivered=scp.count,
                          tree_pid=router.pid, node=router, scp=scp,
                          note=f"the default options, {_plural(workers, 'worker')}: memory, not speed")
        finally:
            router.stop()
    finally:
        scp.stop()
        shutil.rmtree(work, ignore_errors=True)
    return [row]


def senders(work: Path, files: list[Path], workers: int, counts: tuple[int, ...] = (1, 2, 4)) -> list[Row]:
    """The metadata path and its baselines with several storescu processes at once."""
    rows = []
    for count in counts:
        rows += network(work / f"senders-{count}", files, workers, path="senders", senders=count, ceiling=False)
    return rows


def backpressure(work: Path, files: list[Path], workers: int, limit_instances: int = 4) -> list[Row]:
    """OCR on, a spool limit of a few instances, a fast sender that resends what was refused.

    Shows that the node answers 0xA700 once the spool holds ``max_spool_bytes`` instead of
    growing without bound, and that every instance it acknowledged reaches the destination.
    """
    largest = max(p.stat().st_size for p in files)
    limit = limit_instances * largest
    scp = StoreSCP(work / "scp")
    router = Node(work / "router", scp, "router", workers=workers, max_spool_bytes=limit)
    rss, spool = RssSampler(router.pid), SpoolSampler(router.spool)
    rss.start()
    spool.start()
    acknowledged: set[str] = set()
    statuses: dict[str, int] = {}
    started = time.perf_counter()
    try:
        ae = AE(ae_title="FASTSENDER")
        ae.maximum_pdu_size = PDU
        metas = {(m.MediaStorageSOPClassUID, m.TransferSyntaxUID) for m in (dcmread(p, stop_before_pixels=True)
                                                                               .file_meta for p in files)}
        contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in sorted(metas)]
        assoc = None
        pending = list(files)
        while pending:
            retry = []
            for p in pending:
                if assoc is None or not assoc.is_established:
                    assoc = ae.associate("127.0.0.1", router.port, contexts=contexts, ae_title=router.aet,
                                         max_pdu=PDU, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
                    install_checkpoint(assoc)
                status = assoc.send_c_store(p) if assoc.is_established else None
                code = f"0x{status.Status:04X}" if status and "Status" in status else "no response"
                statuses[code] = statuses.get(code, 0) + 1
                if code == "0x0000":
                    acknowledged.add(p.name)
                else:
                    retry.append(p)
                    if code == "no response":
                        assoc = None
            if retry:
                time.sleep(0.2)  # a modality resends refused instances a little later
            pending = retry
        if assoc is not None and assoc.is_established:
            assoc.release()
        acked_seconds = time.perf_counter() - started
        try:
            wait_for(lambda: scp.count() >= len(acknowledged), 600, "every acknowledged instance delivered", 0.05)
        except RuntimeError:
            pass  # reported below: delivered < acknowledged
        seconds = time.perf_counter() - started
    finally:
        rss.stop()
        spool.stop()
        router.stop()
        scp.stop()
    delivered = scp.count()
    quarantined = sum(len(f) for _d, _s, f in os.walk(router.spool / "quarantine"))
    refused = statuses.get("0xA700", 0)
    forwarded = len(router.events("forwarded"))  # more than acknowledged would mean duplicates sent
    extra = {"max_spool_bytes": limit, "spool_peak_bytes": spool.peak_bytes, "instance_bytes": largest,
             "statuses": statuses,
             "refused_0xA700": refused, "acknowledged": len(acknowledged), "delivered": delivered, "forwarded": forwarded,
             "quarantined": quarantined, "acked_seconds": round(acked_seconds, 3)}
    note = (f"spool peak on disk {spool.peak_bytes / 1e6:.1f} MB, limit {limit / 1e6:.1f} MB "
            f"({(spool.peak_bytes - limit) / largest:+.1f} instances); {refused} x 0xA700 "
            f"(resent); {len(acknowledged)} acknowledged, {delivered} delivered ({forwarded} sends), "
            f"{quarantined} quarantined")
    return [Row("backpressure", "deid-router, OCR, small spool limit", len(files), seconds, megabytes(files),
                peak_rss_mb=rss.peak_kb / 1024, peak_process_mb=rss.by_role(router.roles()), note=note, extra=extra)]


def write_us(folder: Path, count: int, clip_frames: int, clips: int) -> tuple[list[Path], list[Path]]:
    """Ultrasound images (800x600 RGB, burned-in text) and multi-frame clips."""
    folder.mkdir(parents=True, exist_ok=True)
    images, cine = [], []
    for i in range(count):
        ds, _boxes = us_rgb_with_text([f"DOE^JANE {i:03d}", "PID-0001", "2023-04-11 09:35"], seed=i)
        path = folder / f"us_{i:04d}.dcm"
        path.write_bytes(to_bytes(ds))
        images.append(path)
    for i in range(clips):
        ds, _boxes = us_multiframe(clip_frames, seed=1000 + i)
        path = folder / f"cine_{i:03d}.dcm"
        path.write_bytes(to_bytes(ds))
        cine.append(path)
    return images, cine
