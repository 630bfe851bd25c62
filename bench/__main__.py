"""The benchmark suite: every path of the router next to its baselines, in one run.

    python -m bench [--quick] [--only network,ocr,filemode,scaling,senders,backpressure]

Generates its own data (bench.synthetic: 512x512 int16 CT slices with realistic headers,
800x600 RGB ultrasound with burned-in text, a multi-frame ultrasound clip), runs each path
and its baselines on loopback, prints one table and writes bench/results/suite-<time>.json.

Rows, per path:
- network: storescu -> X -> storescp for X = nothing (storescu -> storescp: the machine's
  ceiling), the bare pynetdicom pass-through (bench/passthrough.py), the router with
  every de-identification option but clean-pixel-data; and storescu -> Orthanc (what a
  site would otherwise put there). Ratios router / pass-through and router / Orthanc.
- ocr: the router with the default options (clean-pixel-data: OCR of every frame) on CT
  and on ultrasound, 1 worker and N workers; ratio N / 1 (the speed-up).
- filemode: `deid-router deid` on CT slices vs a plain pydicom read + write of the same.
- scaling: the metadata path with 250, 1,000 and 4,000 instances of one study (4,000
  slices are ~2.1 GB): seconds per instance and peak RSS should stay flat.
- senders: the metadata path with 1, 2 and 4 concurrent storescu processes.
- backpressure: OCR on, a spool limit of a few instances and a fast sender: the node
  answers 0xA700 when the spool is full, stays within its memory, and delivers every
  instance it acknowledged (the sender retries what was refused, as a modality does).

inst/s and MB/s are end to end: from the first send until the destination holds every
instance. Latency p50/p95 is from the router's acknowledgement of an instance to the
destination's success response (the router's `forwarded` log events). Peak RSS is the
sum over the process tree (node + workers + forwarders), sampled every 20 ms. dcmtk and
Orthanc run with TCP_NODELAY=1, every peer with 128 KiB PDUs. The machine is shared and
noisy: compare ratios within a run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt

from bench.filemode import CONFIG as FILEMODE_CONFIG
from bench.filemode import measure_deid, measure_plain, warm_cache
from bench.network import DCMTK_ENV, REPO_ROOT, STORESCP, STORESCU, RssSampler, count_files, free_port, wait_echo
from bench.synthetic import to_bytes, us_multiframe, us_rgb_with_text, write_ct_series
from router.config import DEFAULT_OPTIONS

RESULTS_DIR = REPO_ROOT / "bench" / "results"
ORTHANC = "/usr/sbin/Orthanc"
METADATA_OPTIONS = sorted(DEFAULT_OPTIONS - {"clean-pixel-data"})
PATHS = ("network", "ocr", "filemode", "scaling", "senders", "backpressure")
CORES = os.cpu_count() or 1


@dataclass
class Row:
    path: str
    name: str
    instances: int
    seconds: float
    megabytes: float
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    peak_rss_mb: float | None = None
    baseline: str | None = None  # name of the row (same path) this one is compared with
    note: str = ""

    @property
    def rate(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------------------- peers
class StoreSCP:
    """dcmtk storescp writing every instance to a folder: the destination of each path."""

    def __init__(self, work: Path):
        self.folder = work / "storescp"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = subprocess.Popen(
            [STORESCP, "-aet", "STORESCP", "-od", str(self.folder), "+xa", "-pm", "--max-pdu", "131072", "-dhl",
             "+uf", str(self.port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_echo(self.port, "STORESCP", self.process)

    def count(self) -> int:
        return count_files(self.folder)

    def clear(self) -> None:
        for path in self.folder.iterdir():
            path.unlink()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


class OrthancPeer:
    """Orthanc (Debian package) on loopback ports, storage in a temp folder."""

    def __init__(self, work: Path):
        work.mkdir(parents=True, exist_ok=True)
        self.port, self.http = free_port(), free_port()
        config = {"Name": "bench", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
                  "DicomAet": "ORTHANC", "DicomPort": self.port, "HttpPort": self.http, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
                  "UnknownSopClassAccepted": True, "MaximumPduLength": 131072, "SyncStorageArea": False,
                  "Plugins": []}
        (work / "orthanc.json").write_text(json.dumps(config))
        self.process = subprocess.Popen([ORTHANC, f"--logdir={work}", str(work / "orthanc.json")], env=DCMTK_ENV,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_echo(self.port, "ORTHANC", self.process)

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics", timeout=10) as response:
            return int(json.load(response)["CountInstances"])

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


class Forwarder:
    """The router or the pass-through as a subprocess in front of a StoreSCP."""

    def __init__(self, work: Path, scp: StoreSCP, kind: str, *, workers: int = CORES, ocr: bool = False,
                 max_spool_bytes: int | None = None):
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = work / f"{kind}.log"
        if kind == "pass-through":
            self.aet = "PASSTHROUGH"
            command = [sys.executable, "-m", "bench.passthrough", str(self.port), "127.0.0.1", str(scp.port),
                       "STORESCP"]
        else:
            self.aet = "DEID_ROUTER"
            options = "" if ocr else f"options = {json.dumps(METADATA_OPTIONS)}\n"
            limit = f"max_spool_bytes = {max_spool_bytes}\n" if max_spool_bytes else ""
            config = work / "router.toml"
            config.write_text(
                f'[node]\nbind = "127.0.0.1"\nport = {self.port}\nspool_dir = "{work / "spool"}"\n'
                f"workers = {workers}\n{limit}"
                f'[deid]\nsecret = "bench-secret-0123456789abcdef"\n{options}[logging]\nformat = "json"\n'
                f'[[destinations]]\nname = "storescp"\nae_title = "STORESCP"\nhost = "127.0.0.1"\n'
                f"port = {scp.port}\n")
            command = [sys.executable, "-m", "router", "serve", "--config", str(config)]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=work, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        wait_echo(self.port, self.aet, self.process, timeout=180)

    def latencies_ms(self) -> list[float]:
        values = []
        for line in self.log.read_text(errors="replace").splitlines():
            if '"forwarded"' in line:
                try:
                    values.append(float(json.loads(line)["latency_ms"]))
                except (ValueError, KeyError):
                    pass
        return values

    def events(self, name: str) -> int:
        return sum(1 for line in self.log.read_text(errors="replace").splitlines() if f'"event": "{name}"' in line)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -------------------------------------------------------------------------- sending
def storescu(port: int, aet: str, files: list[Path], senders: int = 1) -> None:
    """dcmtk storescu, ``senders`` processes at once, each with its share of the files."""
    shares = [files[i::senders] for i in range(senders)]
    processes = [subprocess.Popen([STORESCU, "-aec", aet, "--max-pdu", "131072", "127.0.0.1", str(port),
                                   *map(str, share)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for share in shares if share]
    for process in processes:
        _out, err = process.communicate(timeout=3600)
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-1500:]}")


def measure(path: str, name: str, files: list[Path], send_port: int, send_aet: str, delivered, *,
            pid: int | None = None, forwarder: Forwarder | None = None, senders: int = 1,
            baseline: str | None = None, note: str = "") -> Row:
    """Send files, wait until ``delivered()`` counts them all, and record the row."""
    sampler = RssSampler(pid) if pid else None
    if sampler:
        sampler.start()
    before = delivered()
    started = time.perf_counter()
    storescu(send_port, send_aet, files, senders)
    deadline = time.monotonic() + 3600
    while delivered() - before < len(files):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}/{name}: only {delivered() - before} of {len(files)} delivered")
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    if sampler:
        sampler.stop()
    latencies = forwarder.latencies_ms()[-len(files):] if forwarder and forwarder.aet == "DEID_ROUTER" else []
    return Row(path, name, len(files), seconds, sum(p.stat().st_size for p in files) / 1e6,
               _percentile(latencies, 50), _percentile(latencies, 95),
               sampler.peak_kb / 1024 if sampler else None, baseline, note)


def _percentile(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# ---------------------------------------------------------------------------- paths
def network_path(work: Path, files: list[Path], path: str = "network", senders: int = 1,
                 with_baselines: bool = True, label: str = "") -> list[Row]:
    rows = []
    scp = StoreSCP(work / "scp")
    try:
        if with_baselines:
            rows.append(measure(path, f"storescu -> storescp{label}", files, scp.port, "STORESCP", scp.count,
                                pid=scp.process.pid, senders=senders, note="the machine's ceiling"))
            passthrough = Forwarder(work / "passthrough", scp, "pass-through")
            try:
                rows.append(measure(path, f"pass-through{label}", files, passthrough.port, passthrough.aet,
                                    scp.count, pid=passthrough.process.pid, senders=senders,
                                    note="pynetdicom, forwards unchanged"))
            finally:
                passthrough.stop()
            orthanc = OrthancPeer(work / "orthanc")
            try:
                rows.append(measure(path, f"storescu -> Orthanc{label}", files, orthanc.port, "ORTHANC",
                                    orthanc.count, pid=orthanc.process.pid, senders=senders, note="ingest only"))
            finally:
                orthanc.stop()
        router = Forwarder(work / "router", scp, "router")
        try:
            rows.append(measure(path, f"deid-router{label}", files, router.port, router.aet, scp.count,
                                pid=router.process.pid, forwarder=router, senders=senders,
                                baseline=f"pass-through{label}" if with_baselines else None,
                                note="all options but clean-pixel-data"))
        finally:
            router.stop()
    finally:
        scp.stop()
    return rows


def ocr_path(work: Path, kind: str, files: list[Path]) -> list[Row]:
    rows = []
    scp = StoreSCP(work / "scp")
    try:
        for workers in sorted({1, CORES}):
            router = Forwarder(work / f"router-{workers}", scp, "router", workers=workers, ocr=True)
            try:
                rows.append(measure("ocr", f"{kind}, {workers} worker{'s' if workers > 1 else ''}", files,
                                    router.port, router.aet, scp.count, pid=router.process.pid, forwarder=router,
                                    baseline=f"{kind}, 1 worker" if workers > 1 else None,
                                    note="default options (OCR of every frame)"))
            finally:
                router.stop()
    finally:
        scp.stop()
    return rows


def filemode_path(work: Path, files: list[Path]) -> list[Row]:
    src = work / "src"  # exactly these files (deid walks the whole folder)
    src.mkdir(parents=True)
    files = [Path(os.link(p, src / p.name) or src / p.name) for p in files]
    config = work / "filemode.toml"
    config.write_text(FILEMODE_CONFIG)
    input_bytes = warm_cache(files)
    rows = []
    for m, baseline in ((measure_plain("plain pydicom read+write", files, work, 1, input_bytes, fsync=False), None),
                        (measure_deid("deid-router deid", src, files, work, config, 1, input_bytes, None),
                         "plain pydicom read+write")):
        if not m.ok:
            raise RuntimeError(f"filemode/{m.name}: {m.error}")
        rows.append(Row("filemode", m.name, m.instances, m.best, input_bytes / 1e6, baseline=baseline,
                        note=f"{CORES} workers" if baseline else "one process"))
    return rows


def backpressure_path(work: Path, files: list[Path]) -> list[Row]:
    """OCR on, a spool of a few instances, a fast pynetdicom sender that retries refusals."""
    scp = StoreSCP(work / "scp")
    limit = 4 * max(p.stat().st_size for p in files)
    router = Forwarder(work / "router", scp, "router", ocr=True, max_spool_bytes=limit)
    sampler = RssSampler(router.process.pid)
    sampler.start()
    refused = 0
    started = time.perf_counter()
    try:
        ae = AE(ae_title="FASTSENDER")
        ae.maximum_pdu_size = 131072
        syntax = dcmread(files[0], stop_before_pixels=True).file_meta
        ae.add_requested_context(syntax.MediaStorageSOPClassUID, syntax.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", router.port, ae_title=router.aet, max_pdu=131072,
                             evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
        pending = list(files)
        while pending:
            retry = []
            for path in pending:
                status = assoc.send_c_store(path)
                if status.get("Status") != 0x0000:
                    refused += 1
                    retry.append(path)
            if retry:
                time.sleep(0.5)  # a modality retries refused instances a little later
            pending = retry
        assoc.release()
        deadline = time.monotonic() + 3600
        while scp.count() < len(files) and time.monotonic() < deadline:
            time.sleep(0.05)
        delivered = scp.count()
    finally:
        seconds = time.perf_counter() - started
        sampler.stop()
        router.stop()
        scp.stop()
    note = (f"spool limit {limit / 1e6:.1f} MB: {refused} C-STOREs answered 0xA700 and resent; "
            f"{delivered} of {len(files)} delivered")
    return [Row("backpressure", "deid-router, OCR, spool limit", len(files), seconds,
                sum(p.stat().st_size for p in files) / 1e6, peak_rss_mb=sampler.peak_kb / 1024, note=note)]


def _nodelay(event) -> None:
    import socket

    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ----------------------------------------------------------------------------- data
def write_us(folder: Path, count: int, clip_frames: int, clips: int) -> tuple[list[Path], list[Path]]:
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


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace, work: Path, rows: list[Row]) -> None:
    quick = args.quick
    only = set(args.only.split(",")) if args.only else set(PATHS)
    unknown = only - set(PATHS)
    if unknown:
        raise SystemExit(f"unknown paths: {sorted(unknown)}; choose from {', '.join(PATHS)}")
    sizes = [100, 400] if quick else [250, 1000, 4000]
    count = 200 if quick else 1000
    print(f"writing {max(sizes) if 'scaling' in only else count} synthetic CT slices ...", flush=True)
    ct = write_ct_series(work / "ct", max(sizes) if "scaling" in only else count)

    def step(name: str, function, *a, **kw) -> None:
        if name.split("/")[0] in only:
            print(f"-- {name} ...", flush=True)
            rows.extend(function(*a, **kw))

    step("network", network_path, work / "network", ct[:count])
    if "ocr" in only or "backpressure" in only:
        print("writing ultrasound images and clips ...", flush=True)
    us, cine = write_us(work / "us", 8 if quick else 40, 10 if quick else 30, 1 if quick else 2) \
        if ("ocr" in only or "backpressure" in only) else ([], [])
    step("ocr/ct", ocr_path, work / "ocr-ct", "CT 512x512", ct[:12 if quick else 60])
    step("ocr/us", ocr_path, work / "ocr-us", "US 800x600 RGB", us)
    step("ocr/cine", ocr_path, work / "ocr-cine", f"US clip {10 if quick else 30} frames", cine)
    step("filemode", filemode_path, work / "filemode", ct[:count])
    for size in sizes:
        step("scaling", network_path, work / f"scaling-{size}", ct[:size], path="scaling", with_baselines=False,
             label=f" x{size}")
    for senders in (1, 2, 4):
        step("senders", network_path, work / f"senders-{senders}", ct[:count], path="senders", senders=senders,
             with_baselines=False, label=f", {senders} sender{'s' if senders > 1 else ''}")
    step("backpressure", backpressure_path, work / "backpressure", us)


def print_table(rows: list[Row]) -> None:
    by_name = {(r.path, r.name): r for r in rows}
    header = f"{'path':13}{'row':38}{'inst':>6}{'inst/s':>9}{'MB/s':>8}{'p50 ms':>8}{'p95 ms':>8}{'RSS MB':>8}  ratio"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        base = by_name.get((r.path, r.baseline)) if r.baseline else None
        ratio = f"{r.rate / base.rate:.2f} x {base.name}" if base and base.rate else ""
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{r.path:13}{r.name[:37]:38}{r.instances:6d}{r.rate:9.1f}{r.megabytes / r.seconds:8.1f}"
              f"{fmt(r.latency_p50_ms, '8.0f'):>8}{fmt(r.latency_p95_ms, '8.0f'):>8}{fmt(r.peak_rss_mb, '8.0f'):>8}"
              f"  {ratio}")
    orthanc = by_name.get(("network", "storescu -> Orthanc"))
    router = by_name.get(("network", "deid-router"))
    if orthanc and router:
        print(f"\nrouter / Orthanc ingest (network): {router.rate / orthanc.rate:.2f}")
    for r in rows:
        if r.note and r.path == "backpressure":
            print(f"backpressure: {r.note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a few minutes)")
    parser.add_argument("--only", help=f"comma-separated paths: {','.join(PATHS)}")
    parser.add_argument("--keep", type=Path, help="keep the work folder (logs, spools) here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-suite-"))
    started = time.time()
    rows: list[Row] = []
    try:
        run(args, work, rows)
    except BaseException:
        print_table(rows)  # what was measured before the failure
        raise
    finally:
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.dcm", "storage", "index"))
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"suite-{dt.datetime.now().strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({
        "benchmark": "suite", "quick": args.quick, "seconds": round(time.time() - started, 1),
        "environment": {"cpu_count": CORES, "python": platform.python_version(), "platform": platform.platform()},
        "rows": [{**asdict(r), "instances_per_second": r.rate, "mb_per_second": r.megabytes / r.seconds}
                 for r in rows],
    }, indent=2) + "\n")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
