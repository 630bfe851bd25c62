"""Network benchmark: storescu -> deid-router -> dcmtk storescp, next to a bare pass-through.

    python -m bench.network [--count 500] [--workers N] [--keep DIR]

Both forwarders run as subprocesses on loopback and get the same synthetic CT series
(512x512 int16 slices, bench.synthetic) from one dcmtk storescu, and forward it to one
dcmtk storescp (TCP_NODELAY=1 for dcmtk, 128 KiB PDUs everywhere). The clock runs from
storescu's start until storescp holds every instance (end to end, not just acknowledged:
the router acknowledges once an instance is durably spooled). The pass-through
(bench/passthrough.py) receives and forwards unchanged, with no spool and no
de-identification. Printed: instances/s and MB/s of each, acknowledgement rate, their
ratio, and peak resident memory of all the processes of each forwarder (sampled every
20 ms; plus the sum of each process's own peak, an upper bound). The two alternate
``--repeat`` times (the machine is shared and noisy): the median ratio is printed.

Not a test: the figures depend on the machine. Compare the ratio, not absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.synthetic import write_ct_series

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo(port: int, aet: str) -> bool:
    return subprocess.run([ECHOSCU, "-aec", aet, "127.0.0.1", str(port)], env=DCMTK_ENV,
                          capture_output=True, timeout=10).returncode == 0


def wait_echo(port: int, aet: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{aet} exited with {process.returncode}")
        if echo(port, aet):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{aet} did not answer C-ECHO on {port}")


def family(pid: int) -> list[int]:
    """pid and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    result, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            result.append(child)
            todo.append(child)
    return result


def status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    """Peak of the summed RSS of a process tree, and the sum of each process's own peak."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kb = 0
        self.hwm: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.02):
            pids = family(self.pid)
            self.peak_kb = max(self.peak_kb, sum(status_kb(p, "VmRSS") for p in pids))
            for p in pids:
                self.hwm[p] = max(self.hwm.get(p, 0), status_kb(p, "VmHWM"))
                if p not in self.names:
                    try:
                        with open(f"/proc/{p}/cmdline", "rb") as f:
                            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        cmd = "?"
                    self.names[p] = ("worker/forkserver" if "multiprocessing" in cmd
                                     else cmd.split(" -m ")[-1].split()[0] if " -m " in cmd else cmd[:30])

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def run_one(name: str, command: list[str], port: int, aet: str, files: list[Path], scp_dir: Path,
            log: Path) -> dict:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=log.parent, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        wait_echo(port, aet, process)
        sampler = RssSampler(process.pid)
        sampler.start()
        before = count_files(scp_dir)
        started = time.perf_counter()
        sent = subprocess.run([STORESCU, "-aec", aet, "--max-pdu", "131072", "127.0.0.1", str(port),
                               *map(str, files)], env=DCMTK_ENV, capture_output=True, text=True, timeout=900)
        acked = time.perf_counter() - started
        if sent.returncode != 0:
            raise RuntimeError(f"storescu -> {name} failed: {sent.stderr[-2000:]}")
        deadline = time.monotonic() + 600
        while count_files(scp_dir) - before < len(files):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: only {count_files(scp_dir) - before} of {len(files)} delivered")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        sampler.stop()
        return {"name": name, "elapsed": elapsed, "acked": acked, "peak_rss_mb": sampler.peak_kb / 1024,
                "per_process": sorted(((sampler.names.get(p, "?"), kb / 1024) for p, kb in sampler.hwm.items()),
                                      key=lambda x: -x[1]),
                "hwm_sum_mb": sum(sampler.hwm.values()) / 1024, "processes": len(sampler.hwm)}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.network", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="router de-identification workers")
    parser.add_argument("--repeat", type=int, default=2, help="alternate the two forwarders this many times")
    parser.add_argument("--keep", type=Path, help="keep the work folder (logs, spool) here")
    parser.add_argument("--ocr-ct", action="store_true",
                        help="OCR the CT slices too (the product default: ~1 s per slice); by default the router "
                             "gets a site pixel policy that skips OCR for CT (skip_modalities = [\"CT\"])")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-network-"))
    try:
        print(f"writing {args.count} synthetic CT slices ...", flush=True)
        files = write_ct_series(work / "ct", args.count)
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        scp_dir = work / "storescp"
        scp_dir.mkdir()
        scp_port = free_port()
        scp = subprocess.Popen([STORESCP, "-aet", "STORESCP", "-od", str(scp_dir), "+xa", "-pm", "--max-pdu",
                                "131072", "-dhl", "+uf", str(scp_port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            wait_echo(scp_port, "STORESCP", scp)
            policy = work / "pixels.toml"
            policy.write_text('[select]\nskip_modalities = ["CT"]\n')
            pixel_policy = "" if args.ocr_ct else f'pixel_policy = "{policy}"\n'
            runs: list[tuple[dict, dict]] = []
            for run in range(args.repeat):
                port = free_port()
                base = run_one(
                    "pass-through", [sys.executable, "-m", "bench.passthrough", str(port), "127.0.0.1",
                                     str(scp_port), "STORESCP"],
                    port, "PASSTHROUGH", files, scp_dir, work / f"passthrough-{run}.log")
                port = free_port()
                config = work / f"router-{run}.toml"
                config.write_text(
                    f'[node]\nbind = "127.0.0.1"\nport = {port}\nspool_dir = "{work / f"spool-{run}"}"\n'
                    f'workers = {args.workers}\n'
                    f'[deid]\nsecret = "bench-secret-0123456789abcdef"\n{pixel_policy}[logging]\nformat = "json"\n'
                    f'[[destinations]]\nname = "storescp"\nae_title = "STORESCP"\nhost = "127.0.0.1"\n'
                    f'port = {scp_port}\n')
                router = run_one("deid-router", [sys.executable, "-m", "router", "serve", "--config", str(config)],
                                 port, "DEID_ROUTER", files, scp_dir, work / f"router-{run}.log")
                runs.append((base, router))
        finally:
            scp.send_signal(signal.SIGTERM)
            scp.wait(30)
        print(f"\n{args.count} CT slices, {total_mb:.1f} MB, storescu -> forwarder -> storescp on loopback, "
              f"{os.cpu_count()} cores, router workers: {args.workers}, default de-identification options, "
              f"{'OCR of CT slices on' if args.ocr_ct else 'site pixel policy: no OCR for CT'}\n")
        print(f"{'run':5}{'':14}{'inst/s':>9}{'MB/s':>9}{'acked inst/s':>14}{'peak RSS MB':>13}{'sum of peaks':>14}"
              f"{'procs':>7}")
        for run, pair in enumerate(runs, 1):
            for r in pair:
                print(f"{run:<5}{r['name']:14}{args.count / r['elapsed']:9.1f}{total_mb / r['elapsed']:9.1f}"
                      f"{args.count / r['acked']:14.1f}{r['peak_rss_mb']:13.0f}{r['hwm_sum_mb']:14.0f}"
                      f"{r['processes']:7d}")
        for r in runs[-1]:
            print(f"  {r['name']} peak RSS per process (MB): "
                  + ", ".join(f"{name} {mb:.0f}" for name, mb in r["per_process"]))
        ratios = sorted(base["elapsed"] / router["elapsed"] for base, router in runs)
        print(f"\nratio router / pass-through (end to end, inst/s): median {statistics.median(ratios):.2f}"
              f" (runs: {', '.join(f'{x:.2f}' for x in ratios)})")
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("ct", "storescp"))
            print(f"logs kept in {args.keep}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
