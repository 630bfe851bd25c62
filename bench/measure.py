"""What a benchmark row records, and the samplers behind it.

A row is one path measured end to end: from the first C-STORE until the destination holds
every instance. Memory is the summed RSS of the process tree under test (sampled from
/proc every 100 ms) and each process's own peak (VmHWM), by role. Latency is from an
instance's acknowledgement to its delivery, per instance.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers import Node, StoreSCP, storescu

SAMPLE_SECONDS = 0.1
#: Samples between two walks of /proc for the process tree (RssSampler).
TREE_EVERY = 10


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
    #: Peak RSS of one process, by role (receiver, worker, forwarder, other): the largest of that role.
    peak_process_mb: dict[str, float] = field(default_factory=dict)
    #: Names of rows of the same path this one is compared with (rate ratio).
    baselines: tuple[str, ...] = ()
    note: str = ""
    #: CPU time of the whole machine (every process: peers, node, kernel) per instance, ms,
    #: and the share of both cores it kept busy: with the cores saturated, inst/s cannot
    #: exceed cores * 1000 / cpu_ms_per_instance.
    cpu_ms_per_instance: float | None = None
    machine_busy: float | None = None
    #: Path-specific figures (acknowledged seconds, refusals, spool peak, load average, ...).
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def process_tree(pid: int) -> list[int]:
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


def status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB; zeros once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


class Sampler(threading.Thread):
    """Calls ``sample()`` every 100 ms from start() to stop()."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stopping = threading.Event()

    def run(self) -> None:
        self.sample()
        while not self.stopping.wait(SAMPLE_SECONDS):
            self.sample()

    def sample(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.sample()


def cpu_ticks(pid: int) -> int | None:
    """User + system clock ticks a process has used; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


class RssSampler(Sampler):
    """Peak of the summed RSS of a process tree, each process's own peak, and its CPU time."""

    def __init__(self, pid: int):
        super().__init__()
        self.pid = pid
        self.peak_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.ticks: dict[int, tuple[int, int]] = {}  # pid -> (first seen, last seen)
        self.tree: list[int] = []
        self.samples = 0

    def sample(self) -> None:
        # Walking all of /proc for the tree cost ~1.5% of the machine at every 100 ms (in
        # the rows measured, router's and baselines' alike): once a second, and the known
        # processes in between (a respawned worker is seen within a second; its own peak,
        # VmHWM, is read whenever it is).
        if self.samples % TREE_EVERY == 0:
            self.tree = process_tree(self.pid)
        self.samples += 1
        total = 0
        for pid in self.tree:
            rss, hwm = status_kb(pid)
            total += rss
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), hwm)
            ticks = cpu_ticks(pid)
            if ticks is not None:
                self.ticks[pid] = (self.ticks.get(pid, (ticks, 0))[0], ticks)
        self.peak_kb = max(self.peak_kb, total)

    def cpu_ms_by_role(self, roles: dict[int, str], instances: int) -> dict[str, float]:
        """CPU ms per instance the tree's processes used while sampled, summed by role."""
        used: dict[str, float] = {}
        for pid, (first, last) in self.ticks.items():
            role = roles.get(pid, "other")
            used[role] = used.get(role, 0.0) + (last - first) * 1000 / os.sysconf("SC_CLK_TCK")
        return {role: round(ms / instances, 2) for role, ms in sorted(used.items())} if instances else {}

    def by_role(self, roles: dict[int, str]) -> dict[str, float]:
        peaks: dict[str, float] = {}
        for pid, kb in self.hwm_kb.items():
            role = roles.get(pid, "other")
            peaks[role] = max(peaks.get(role, 0.0), round(kb / 1024, 1))
        return peaks


class SpoolSampler(Sampler):
    """Peak bytes in a router spool (tmp, incoming, outgoing, quarantine; hard links once)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root
        self.peak_bytes = 0

    def sample(self) -> None:
        seen: set[int] = set()
        total = 0
        for stage in ("tmp", "incoming", "outgoing", "quarantine"):
            for folder, _dirs, files in os.walk(self.root / stage):
                for name in files:
                    try:
                        st = os.stat(os.path.join(folder, name))
                    except FileNotFoundError:
                        continue
                    if st.st_ino not in seen:
                        seen.add(st.st_ino)
                        total += st.st_size
        self.peak_bytes = max(self.peak_bytes, total)


def machine_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot, from /proc/stat.

    Busy is user, nice, system, irq and softirq; idle, iowait and time stolen by the
    hypervisor are not the benchmark's work.
    """
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


def cpu_figures(before: tuple[int, int], after: tuple[int, int], instances: int) -> tuple[float | None, float | None]:
    """(ms of CPU per instance, share of the machine busy) between two ``machine_cpu()`` readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    if not instances or not total:
        return None, None
    return round(busy * 1000 / os.sysconf("SC_CLK_TCK") / instances, 2), round(busy / total, 3)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def megabytes(files: list[Path]) -> float:
    return sum(p.stat().st_size for p in files) / 1e6


def measure(path: str, name: str, files: list[Path], *, port: int, aet: str, delivered: Callable[[], int],
            tree_pid: int | None = None, node: Node | None = None, scp: StoreSCP | None = None, senders: int = 1,
            baselines: tuple[str, ...] = (), note: str = "") -> Row:
    """Send ``files`` with storescu to port, wait until ``delivered()`` counts them all, record the row.

    ``delivered`` must count from zero (a fresh destination). Latency is measured for the
    router (its ``forwarded`` events carry ``latency_ms``) and for the pass-through (its
    acknowledgement times against storescp's file times, matched by SOP Instance UID).
    """
    # The previous row's files are still being written back (~1 GB for a clip row): flush
    # them first, so that their writeback does not share this row's two cores.
    os.sync()
    load_before = os.getloadavg()[0]
    rss = RssSampler(tree_pid) if tree_pid else None
    if rss:
        rss.start()
    forwarded_before = len(node.events("forwarded")) if node and node.kind == "router" else 0
    started = time.perf_counter()
    cpu_before = machine_cpu()
    try:
        acked_seconds = storescu(port, aet, files, senders)
    except RuntimeError as exc:
        raise RuntimeError(f"{path}/{name}: {exc}") from None
    wait_for(lambda: delivered() >= len(files), 3600, f"{path}/{name}: {len(files)} instances at the destination")
    seconds = time.perf_counter() - started
    cpu_ms, busy = cpu_figures(cpu_before, machine_cpu(), len(files))
    if rss:
        rss.stop()
    latencies: list[float] = []
    if node and node.kind == "router":
        # The forwarder logs after the destination's response: give the last lines a moment.
        try:
            wait_for(lambda: len(node.events("forwarded")) - forwarded_before >= len(files), 10,
                     "forwarded events", poll=0.2)
        except RuntimeError:
            pass
        latencies = [float(e["latency_ms"]) for e in node.events("forwarded")[forwarded_before:] if "latency_ms" in e]
    elif node and scp:
        acked = node.acked()
        latencies = [(t - acked[uid]) * 1000 for uid, t in scp.arrivals().items() if uid in acked]
    return Row(path, name, len(files), seconds, megabytes(files), percentile(latencies, 50),
               percentile(latencies, 95), rss.peak_kb / 1024 if rss else None,
               rss.by_role(node.roles() if node else {tree_pid: "receiver"}) if rss else {},
               baselines, note, cpu_ms, busy,
               {"acked_seconds": round(acked_seconds, 3), "senders": senders,
                "cpu_ms_per_instance_by_role": rss.cpu_ms_by_role(
                    node.roles() if node else {tree_pid: "receiver"}, len(files)) if rss else {},
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]})
