"""Benchmark: ``deid-router deid`` on a folder of CT slices vs a plain pydicom read+write.

    python -m bench.filemode [--count 1000] [--workdir DIR] [--runs 2] [--keep]

Writes ``count`` synthetic 512x512 CT slices (bench.synthetic, ~0.5 MB each) into
WORKDIR/src (reused on the next run with the same WORKDIR and count), reads them all once
to warm the page cache, then times, best of ``runs``:

* plain:        dcmread + save_as of every file into another folder, in this process;
* plain+fsync:  the same, each file written to a temp name, fsynced and renamed (what
                the router's writer does for every output);
* deid:         ``python -m router deid SRC DST --config CONFIG`` as a subprocess
                (default worker count), and once more with ``--workers 1``.

The deid timings include the interpreter start-up (measured separately and printed).
Prints a table (instances/s, MB/s of input, time relative to plain) and writes the
results as JSON to bench/results/filemode-<timestamp>.json (git-ignored).
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy
import pydicom
from pydicom import dcmread

from bench.measure import RssSampler
from bench.synthetic import write_ct_series

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

CONFIG = """\
# deid-router config for bench.filemode: a fixed secret and typical options.
[node]
spool_dir = "spool"

[deid]
secret = "bench-filemode-secret-0123456789abcdef"
options = [
    "clean-descriptors",
    "retain-longitudinal-modified-dates",
    "retain-patient-characteristics",
    "retain-device-identity",
    "retain-safe-private",
]

[logging]
level = "warning"
"""


@dataclass
class Measurement:
    name: str
    runs_seconds: list[float] = field(default_factory=list)
    instances: int = 0
    input_bytes: int = 0
    output_files: int | None = None
    ok: bool = True
    error: str | None = None
    command: list[str] | None = None
    #: Peak of the summed RSS of the deid process tree (sampled every 100 ms).
    peak_rss_mb: float | None = None

    @property
    def best(self) -> float | None:
        return min(self.runs_seconds) if self.runs_seconds else None

    def rate(self) -> float | None:
        return self.instances / self.best if self.best else None

    def mb_per_s(self) -> float | None:
        return self.input_bytes / 1e6 / self.best if self.best else None


def prepare_source(src: Path, count: int) -> tuple[list[Path], float | None]:
    """The source files: reused if src holds this count from this generator, else written."""
    stamp = src.with_name(src.name + ".json")  # beside src: deid walks src and refuses non-DICOM files
    wanted = {"generator": "bench.synthetic.write_ct_series", "version": 1, "count": count}
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()) == wanted:
                files = sorted(src.glob("ct_*.dcm"))
                if len(files) == count:
                    return files, None
        except (OSError, ValueError):
            pass
    if src.exists():
        shutil.rmtree(src)
    stamp.unlink(missing_ok=True)
    start = time.perf_counter()
    files = write_ct_series(src, count)
    seconds = time.perf_counter() - start
    stamp.write_text(json.dumps(wanted))
    return files, seconds


def warm_cache(files: list[Path]) -> int:
    total = 0
    for path in files:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                total += len(chunk)
    return total


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def plain_copy(files: list[Path], dst: Path, *, fsync: bool) -> None:
    for path in files:
        ds = dcmread(path)
        target = dst / path.name
        if not fsync:
            ds.save_as(target, enforce_file_format=True)
            continue
        tmp = target.with_name(target.name + ".part")
        with open(tmp, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    if fsync:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def count_outputs(dst: Path) -> int:
    return sum(1 for p in dst.rglob("*") if p.is_file())


def measure_plain(name: str, files: list[Path], workdir: Path, runs: int, input_bytes: int,
                  *, fsync: bool) -> Measurement:
    m = Measurement(name, instances=len(files), input_bytes=input_bytes)
    for run in range(runs):
        dst = fresh(workdir / f"out-{slug(name)}-{run}")
        os.sync()
        start = time.perf_counter()
        plain_copy(files, dst, fsync=fsync)
        m.runs_seconds.append(time.perf_counter() - start)
        m.output_files = count_outputs(dst)
        shutil.rmtree(dst)
    return m


def measure_deid(name: str, src: Path, files: list[Path], workdir: Path, config: Path, runs: int,
                 input_bytes: int, workers: int | None) -> Measurement:
    m = Measurement(name, instances=len(files), input_bytes=input_bytes)
    for run in range(runs):
        dst = workdir / f"out-{slug(name)}-{run}"
        if dst.exists():
            shutil.rmtree(dst)
        command = [sys.executable, "-m", "router", "deid", str(src), str(dst), "--config", str(config)]
        if workers is not None:
            command += ["--workers", str(workers)]
        m.command = command
        os.sync()
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rss = RssSampler(proc.pid)
        rss.start()
        out, err = proc.communicate()
        seconds = time.perf_counter() - start
        rss.stop()
        m.peak_rss_mb = max(m.peak_rss_mb or 0.0, rss.peak_kb / 1024)
        produced = count_outputs(dst) if dst.exists() else 0
        if proc.returncode != 0:
            tail = "\n".join((err or out).strip().splitlines()[-15:])
            m.ok, m.error = False, f"exit status {proc.returncode}:\n{tail}"
            m.output_files = produced
            break
        m.runs_seconds.append(seconds)
        m.output_files = produced
        if produced < len(files):
            m.error = f"only {produced} output files for {len(files)} inputs"
        if dst.exists():
            shutil.rmtree(dst)
    return m


def startup_seconds() -> float | None:
    """Wall time of ``python -m router --version`` (best of 3): the fixed cost in each deid run."""
    best = None
    for _ in range(3):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "router", "--version"], capture_output=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            return None
        best = seconds if best is None else min(best, seconds)
    return best


def git_state() -> dict[str, str | bool | None]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def print_table(results: list[Measurement], baseline: Measurement) -> None:
    header = f"{'measurement':<16} {'best s':>8} {'inst/s':>9} {'MB/s':>8} {'x plain time':>13}  runs (s)"
    print(header)
    print("-" * len(header))
    for m in results:
        if not m.ok or m.best is None:
            print(f"{m.name:<16} {'FAILED':>8}  {m.error.splitlines()[0] if m.error else ''}")
            continue
        ratio = m.best / baseline.best if baseline.best else float("nan")
        runs = ", ".join(f"{s:.2f}" for s in m.runs_seconds)
        print(f"{m.name:<16} {m.best:>8.2f} {m.rate():>9.1f} {m.mb_per_s():>8.1f} {ratio:>13.2f}  {runs}")
        if m.error:
            print(f"{'':<16} warning: {m.error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.filemode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="CT slices (default 1000)")
    parser.add_argument("--workdir", type=Path, help="work folder (default: a temp folder, removed after)")
    parser.add_argument("--runs", type=int, default=2, help="runs per measurement, the best is reported")
    parser.add_argument("--keep", action="store_true", help="keep the temp work folder")
    parser.add_argument("--no-deid", action="store_true", help="only the plain pydicom measurements")
    parser.add_argument("--no-json", action="store_true", help="do not write bench/results/*.json")
    args = parser.parse_args(argv)

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="deid-bench-")) if own_workdir else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, workdir)
    finally:
        if own_workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif own_workdir:
            print(f"work folder kept: {workdir}")


def run(args: argparse.Namespace, workdir: Path) -> int:
    src = workdir / "src"
    print(f"work folder {workdir}; {args.count} CT slices")
    files, gen_seconds = prepare_source(src, args.count)
    if gen_seconds is None:
        print(f"reusing {len(files)} source files in {src}")
    else:
        print(f"generated and wrote {len(files)} files in {gen_seconds:.1f} s "
              f"({len(files) / gen_seconds:.0f} files/s)")
    input_bytes = warm_cache(files)
    warm_cache(files)
    print(f"input {input_bytes / 1e6:.1f} MB ({input_bytes / len(files) / 1e3:.0f} kB per file), page cache warmed")

    results = [
        measure_plain("plain", files, workdir, args.runs, input_bytes, fsync=False),
        measure_plain("plain+fsync", files, workdir, args.runs, input_bytes, fsync=True),
    ]
    baseline = results[0]
    startup = None
    if not args.no_deid:
        config = workdir / "bench-config.toml"
        config.write_text(CONFIG)
        startup = startup_seconds()
        if startup is None:
            print("note: `python -m router --version` failed; is the package installed (pip install -e .)?")
        for name, workers in (("deid", None), ("deid workers=1", 1)):
            m = measure_deid(name, src, files, workdir, config, args.runs, input_bytes, workers)
            results.append(m)
            if not m.ok:
                print(f"\nERROR: {name}: `{' '.join(m.command or [])}` failed with {m.error}\n", file=sys.stderr)
    print()
    print_table(results, baseline)
    if startup is not None:
        print(f"(deid times include interpreter start-up: `python -m router --version` takes {startup:.2f} s)")
    cores = os.cpu_count()
    print(f"{cores} CPU(s); Python {platform.python_version()}, pydicom {pydicom.__version__}, numpy {numpy.__version__}")

    if not args.no_json:
        RESULTS_DIR.mkdir(exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        out = RESULTS_DIR / f"filemode-{stamp}.json"
        payload = {
            "benchmark": "filemode",
            "timestamp": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "count": args.count,
            "runs": args.runs,
            "input_bytes": input_bytes,
            "generation_seconds": gen_seconds,
            "router_startup_seconds": startup,
            "environment": {
                "python": platform.python_version(),
                "pydicom": pydicom.__version__,
                "numpy": numpy.__version__,
                "cpu_count": cores,
                "platform": platform.platform(),
                "workdir": str(workdir),
                "git": git_state(),
            },
            "results": [
                {**asdict(m), "best_seconds": m.best, "instances_per_second": m.rate(),
                 "input_mb_per_second": m.mb_per_s(),
                 "time_vs_plain": (m.best / baseline.best) if m.best and baseline.best else None}
                for m in results
            ],
        }
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"results: {out}")
    return 0 if all(m.ok for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
