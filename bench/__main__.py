"""The benchmark suite: every path of the router next to its baselines, in one run.

    python -m bench [--quick] [--only PATH,...] [--workers N] [--repeat R] [--keep DIR]
    python -m bench --compare OLD.json [NEW.json]

Generates its own data (bench.synthetic: 512x512 int16 CT slices with realistic headers,
800x600 RGB ultrasound with burned-in text, multi-frame ultrasound clips), runs each path
and its baselines on loopback, prints one table and writes bench/results/suite-<time>.json.

Paths (rows; the ratio column compares a row's inst/s with its baselines'):
- network: storescu -> storescp (the machine's ceiling); storescu -> pass-through ->
  storescp (bench/passthrough.py: pynetdicom, receive and forward unchanged);
  storescu -> Orthanc (what a site would otherwise put there: as shipped, fsync on, and
  without fsync); storescu -> deid-router ->
  storescp with every default option but clean-pixel-data. Ratios router / pass-through
  and router / Orthanc. Then storescu -> deid-router -> Orthanc (as a site deploys it)
  against storescu -> Orthanc. Then large instances (the ultrasound clips, 18 MB each):
  storescu -> storescp, storescu -> Orthanc and storescu -> deid-router -> storescp.
- ocr: the pixel stage alone in one process (OCR itself: decode, detect, mask, encode;
  with the detector's time per call), then the router with the default options (OCR of
  every frame) on CT, on ultrasound images and on ultrasound clips, 1 worker and N
  workers; ratio 1 worker / OCR alone gives the pipeline's overhead, N / 1 the speed-up.
- filemode: `deid-router deid` on CT slices vs a plain pydicom read + write of the same.
- scaling: the metadata path with one study of 250, 1,000 and 4,000 slices (the last is
  a ~2.1 GB study): inst/s (ratio to the smallest) and peak RSS should stay flat; and one
  315 MB multi-frame with a name on every frame, OCR on: the whole node's peak RSS.
- senders: network's rows (but the ceiling) with 1, 2 and 4 concurrent storescu processes.
- backpressure: OCR on, max_spool_bytes of four instances and a fast sender that resends
  what is refused: spool peak vs limit, 0xA700 answers, every acknowledged instance delivered.

inst/s and MB/s are end to end: from the first C-STORE until the destination holds every
instance. Latency p50/p95 is from an instance's acknowledgement to the destination's
success response (router: its `forwarded` events' latency_ms; pass-through: its
acknowledgement time vs storescp's file time); "-" where there is no hop to measure.
RSS MB is the peak of the summed RSS of the process tree (node + workers + forwarders),
sampled every 100 ms; "1 proc MB" is the largest single process's peak (VmHWM). CPU ms is
the whole machine's CPU time (every process: senders, node, destination, kernel) per
instance during the row, and busy the share of all cores it kept busy: on a saturated
machine inst/s is at most cores * 1000 / CPU ms, so a row that needs more CPU per instance
than its baseline cannot keep up with it once both are saturated. dcmtk and
Orthanc run with TCP_NODELAY=1, every peer with 128 KiB PDUs. The machine may be shared:
compare ratios within a run, not absolute numbers across runs (each row records the load
average before and after it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pydicom
import pynetdicom

from bench import paths
from bench.measure import Row
from bench.peers import REPO_ROOT
from bench.synthetic import write_ct_series

RESULTS_DIR = REPO_ROOT / "bench" / "results"
PATHS = ("network", "ocr", "filemode", "scaling", "senders", "backpressure")


class Sizes:
    """Instance counts of a run: ``--quick`` keeps the whole suite to a few minutes."""

    def __init__(self, quick: bool):
        self.network = 150 if quick else 1000
        self.senders = 100 if quick else 1000
        self.filemode = 200 if quick else 1000
        self.scaling = [100, 400] if quick else [250, 1000, 4000]
        self.large_frames = 100 if quick else 600  # 52 or 315 MB
        # 120 images: a row of ~10 s, where filling and draining the pipeline and OpenVINO's
        # first call on a new image size (~50 ms) weigh ~2% (~6% in the 3-4 s rows of 40)
        self.ocr_ct = 6 if quick else 120
        self.ocr_us = 6 if quick else 120
        # 48 clips: 24 rounds per worker with 2. Filling and draining the pipeline (receiving
        # the first 18 MB clip, one worker idle while the other finishes the last) left the
        # machine idle ~12% of a 16-clip run (2.5 s) and ~5% of a 48-clip one (7 s) here
        self.clip_frames, self.clips = (6, 2) if quick else (20, 48)
        self.backpressure = 8 if quick else 24


def run(args: argparse.Namespace, work: Path, rows: list[Row]) -> None:
    only = args.only
    sizes = Sizes(args.quick)
    workers = args.workers
    generating = time.perf_counter()
    ct_count = max([sizes.network if "network" in only else 0, sizes.senders if "senders" in only else 0,
                    sizes.filemode if "filemode" in only else 0,
                    max(sizes.scaling) if "scaling" in only else 0, sizes.ocr_ct if "ocr" in only else 0])
    print(f"writing {ct_count} synthetic CT slices ...", flush=True)
    ct = write_ct_series(work / "ct", ct_count) if ct_count else []
    us, cine = [], []
    if only & {"network", "ocr", "backpressure"}:
        print("writing ultrasound images and clips ...", flush=True)
        us, cine = paths.write_us(work / "us", max(sizes.ocr_us, sizes.backpressure), sizes.clip_frames, sizes.clips)
    print(f"   {time.perf_counter() - generating:.0f} s", flush=True)

    def step(name: str, function, *a) -> None:
        if name.split("/")[0] not in only:
            return
        runs: list[list[Row]] = []
        for repetition in range(args.repeat):
            print(f"-- {name}{f' ({repetition + 1} of {args.repeat})' if args.repeat > 1 else ''} ...", flush=True)
            started = time.perf_counter()
            runs.append(function(work / f"{name.replace('/', '-')}-{repetition + 1}", *a, workers))
            print(f"   {time.perf_counter() - started:.0f} s", flush=True)
        rows.extend(median_rows(runs))

    step("network", paths.network, ct[:sizes.network])
    step("network/large", paths.large, f"US clips {sizes.clip_frames} frames", cine)
    step("ocr/ct", paths.ocr, "CT 512x512", ct[:sizes.ocr_ct])
    step("ocr/us", paths.ocr, "US 800x600 RGB", us[:sizes.ocr_us])
    step("ocr/clip", paths.ocr, f"US clip {sizes.clip_frames} frames", cine)
    step("filemode", paths.filemode, ct[:sizes.filemode])
    step("scaling", paths.scaling, ct, sizes.scaling)
    step("scaling/large", paths.large_with_ocr, sizes.large_frames)
    step("senders", paths.senders, ct[:sizes.senders])
    step("backpressure", paths.backpressure, us[:sizes.backpressure])


def median_rows(runs: list[list[Row]]) -> list[Row]:
    """Of each row repeated over runs, the run with the median inst/s; every run's inst/s in extra."""
    if len(runs) == 1:
        return runs[0]
    chosen = []
    for same in zip(*runs):
        ranked = sorted(same, key=lambda r: r.rate)
        row = ranked[(len(ranked) - 1) // 2]
        row.extra["runs_instances_per_second"] = [round(r.rate, 2) for r in same]
        chosen.append(row)
    return chosen


def ratios(row: Row, rows: list[Row]) -> dict[str, float]:
    """inst/s of the row / inst/s of each of its baselines (same path)."""
    by_name = {(r.path, r.name): r for r in rows}
    found = {}
    for name in row.baselines:
        base = by_name.get((row.path, name))
        if base and base.rate:
            found[name] = round(row.rate / base.rate, 3)
    return found


def print_table(rows: list[Row]) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else "-"

    header = (f"{'path':13}{'row':40}{'inst':>6}{'inst/s':>8}{'MB/s':>7}{'p50 ms':>8}{'p95 ms':>8}{'RSS MB':>8}"
              f"{'1 proc MB':>10}{'CPU ms':>8}{'busy':>6}  ratio (inst/s) vs baseline")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        ratio = ", ".join(f"{v:.2f} x {k}" for k, v in ratios(r, rows).items())
        one = max(r.peak_process_mb.values()) if r.peak_process_mb else None
        print(f"{r.path:13}{r.name[:39]:40}{r.instances:6d}{r.rate:8.1f}{r.mb_per_second:7.1f}"
              f"{fmt(r.latency_p50_ms, '.0f'):>8}{fmt(r.latency_p95_ms, '.0f'):>8}{fmt(r.peak_rss_mb, '.0f'):>8}"
              f"{fmt(one, '.0f'):>10}{fmt(r.cpu_ms_per_instance, '.1f'):>8}"
              f"{fmt(r.machine_busy * 100 if r.machine_busy is not None else None, '.0f'):>5}%  {ratio}")
    by_name = {(r.path, r.name): r for r in rows}
    for r in rows:
        if r.name.endswith("OCR alone") and r.extra.get("detect_ms_median") is not None:
            print(f"  {r.path}/{r.name}: {1000 * r.seconds / r.instances:.0f} ms per instance; text detection "
                  f"{r.extra['detect_ms_median']:.0f} ms per call (median, one thread), "
                  f"{r.extra['detector_calls_per_instance']:g} calls per instance (renderings)")
        alone = next((by_name.get((r.path, b)) for b in r.baselines if b.endswith("OCR alone")), None)
        if alone and r.rate:
            print(f"  {r.path}/{r.name}: pipeline overhead beyond OCR {alone.rate / r.rate - 1:+.0%} "
                  "(1 worker end to end vs the pixel stage alone)")
        if r.path in ("backpressure", "ocr") and r.peak_process_mb:
            roles = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r.peak_process_mb.items()))
            worker_ms = r.extra.get("deid_ms_median")
            ocr = (f"; de-identification in a worker {worker_ms:.0f} ms (median, OCR included), end to end "
                   f"{1000 * r.seconds * r.extra['workers'] / r.instances:.0f} ms per instance per worker"
                   if worker_ms else "")
            print(f"  {r.path}/{r.name}: peak MB by role: {roles}{ocr}")
        roles = r.extra.get("cpu_ms_per_instance_by_role")
        if r.path == "ocr" and r.extra.get("workers", 1) > 1 and roles and roles.get("worker") and r.cpu_ms_per_instance:
            # the speed-up N workers can reach on these cores when one worker is saturated:
            # cores x the worker's CPU per instance / the whole machine's
            cores, worker, total = min(r.extra["workers"], os.cpu_count() or 1), roles["worker"], r.cpu_ms_per_instance
            rest = total - sum(roles.values())
            print(f"  {r.path}/{r.name}: CPU ms per instance: " + ", ".join(
                f"{role} {ms:.1f}" for role, ms in roles.items() if ms >= 0.05)
                + f", the rest of the machine (sender, destination, kernel) {rest:.1f}; speed-up over 1 worker "
                f"on {cores} cores at most {cores * worker / total:.2f}x with these costs, "
                f"{cores * worker / (worker + rest):.2f}x if receiving and forwarding cost nothing")
        if r.path == "backpressure":
            print(f"  backpressure: {r.note}")
    for r in rows:
        cheaper = [(b, by_name[(r.path, b)]) for b in r.baselines if (r.path, b) in by_name
                   and by_name[(r.path, b)].cpu_ms_per_instance and r.cpu_ms_per_instance]
        roles = r.extra.get("cpu_ms_per_instance_by_role")
        if r.path in ("network", "senders") and r.name.startswith(paths.ROUTER) and roles and r.cpu_ms_per_instance:
            print(f"  {r.path}/{r.name}: CPU ms per instance by role: "
                  + ", ".join(f"{role} {ms:.1f}" for role, ms in roles.items() if ms >= 0.05)
                  + f"; the rest of the machine (senders, destination, kernel threads) "
                  f"{r.cpu_ms_per_instance - sum(roles.values()):.1f}")
        if r.path in ("network", "senders") and cheaper:
            print(f"  {r.path}/{r.name}: machine CPU per instance x baseline's (and the inst/s ratio it "
                  "allows when both saturate the cores): " + "; ".join(
                      f"{r.cpu_ms_per_instance / b.cpu_ms_per_instance:.2f} ({b.cpu_ms_per_instance / r.cpu_ms_per_instance:.2f}) "
                      f"{name}" for name, b in cheaper))
    loads = [x for r in rows for x in r.extra.get("load_average_1min", [])]
    if loads:
        print(f"  load average (1 min) during the rows: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores")
    scaling = [r for r in rows if r.path == "scaling" and r.name.startswith(f"{paths.ROUTER} x")]
    if scaling:
        print("  scaling: ms per instance " + ", ".join(f"{1000 / r.rate:.1f}" for r in scaling)
              + "; peak RSS MB " + ", ".join(f"{r.peak_rss_mb:.0f}" for r in scaling)
              + f" (for {', '.join(str(r.instances) for r in scaling)} instances)")


def git_state() -> dict:
    def git(*a: str) -> str | None:
        done = subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(status) if status is not None else None}


def write_results(args: argparse.Namespace, rows: list[Row], started: float) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"suite-{dt.datetime.fromtimestamp(started).strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({
        "benchmark": "suite", "format": 2,
        "started": dt.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1), "quick": args.quick, "only": sorted(args.only),
        "workers": args.workers, "repeat": args.repeat,
        "environment": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "pydicom": pydicom.__version__, "pynetdicom": pynetdicom.__version__,
                        "platform": platform.platform(), "git": git_state(),
                        "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "rows": [{**asdict(r), "baselines": list(r.baselines), "instances_per_second": round(r.rate, 2),
                  "mb_per_second": round(r.mb_per_second, 2), "ratios": ratios(r, rows)} for r in rows],
    }, indent=2) + "\n")
    return out


def compare(old_path: Path, new_path: Path | None) -> int:
    """inst/s, p95 and peak RSS of two result files, row by row (the newest file if NEW is omitted)."""
    if new_path is None:
        new_path = max(RESULTS_DIR.glob("suite-*.json"), key=lambda p: p.stat().st_mtime)
    old, new = (json.loads(Path(p).read_text()) for p in (old_path, new_path))
    before = {(r["path"], r["name"]): r for r in old["rows"]}
    print(f"old: {old_path} ({old['started']})\nnew: {new_path} ({new['started']})\n")
    print(f"{'path':13}{'row':40}{'inst/s old':>11}{'new':>8}{'x':>6}{'p95 old':>9}{'new':>7}{'RSS old':>9}{'new':>7}")
    for r in new["rows"]:
        o = before.get((r["path"], r["name"]))
        if not o:
            continue
        x = r["instances_per_second"] / o["instances_per_second"] if o["instances_per_second"] else float("nan")

        def f(v):
            return f"{v:.0f}" if v is not None else "-"

        print(f"{r['path']:13}{r['name'][:39]:40}{o['instances_per_second']:11.1f}{r['instances_per_second']:8.1f}"
              f"{x:6.2f}{f(o['latency_p95_ms']):>9}{f(r['latency_p95_ms']):>7}{f(o['peak_rss_mb']):>9}"
              f"{f(r['peak_rss_mb']):>7}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a few minutes)")
    parser.add_argument("--only", default=",".join(PATHS), help=f"comma-separated paths: {','.join(PATHS)}")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="router de-identification workers (the N of the ocr path; default: cores)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each path this many times and report, per row, the run with the median inst/s")
    parser.add_argument("--keep", type=Path, help="copy the work folder (logs, configs) here")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="JSON",
                        help="compare two result files (OLD [NEW]; NEW defaults to the newest) and exit")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args.compare[0], args.compare[1] if len(args.compare) > 1 else None)
    args.only = set(filter(None, args.only.split(",")))
    if args.only - set(PATHS):
        parser.error(f"unknown paths: {sorted(args.only - set(PATHS))}; choose from {', '.join(PATHS)}")
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
                            ignore=shutil.ignore_patterns("*.dcm", "storage", "index", "storescp", "ct", "us"))
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    print(f"\nresults: {write_results(args, rows, started)} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
