"""The node's figures: counters, gauges and latency histograms, in Prometheus text format.

Kept in the main process (the workers and forwarders report to it), thread-safe, standard
library only. Labels are destination names, stage names and short PHI-free reason kinds:
never an identifier, so the cardinality stays bounded.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

#: Histogram buckets (seconds) for stage durations and delivery latency.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
LAST_ERRORS = 20


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value
        self.count += 1


@dataclass(frozen=True)
class Probe:
    """What the spool holds at scrape time."""

    queues: dict[str, int]  # stage ("incoming", "outgoing/<dest>", "quarantine/<where>") -> instances
    spool_bytes: int


#: name -> (type, help)
METRICS = {
    "deid_router_instances_received_total": ("counter", "C-STOREs acknowledged with 0x0000 (spooled durably)."),
    "deid_router_instances_refused_total": ("counter", "C-STOREs answered with a failure status at receive."),
    "deid_router_instances_deidentified_total": ("counter", "Instances de-identified and routed."),
    "deid_router_instances_forwarded_total": ("counter", "Instances delivered to a destination."),
    "deid_router_instances_retried_total": ("counter", "Sends to a destination that will be retried."),
    "deid_router_instances_quarantined_total": ("counter", "Instances moved to a quarantine, with a reason file."),
    "deid_router_pixel_regions_masked_total": ("counter", "Burned-in text regions masked in pixel data."),
    "deid_router_received_bytes_total": ("counter", "Bytes of the instances received."),
    "deid_router_associations_total": ("counter", "Association requests: accepted, or rejected and why."),
    "deid_router_associations_open": ("gauge", "Associations the node is serving now."),
    "deid_router_queue_depth": ("gauge", "Instances waiting in a spool stage."),
    "deid_router_spool_bytes": ("gauge", "Bytes the spool holds (incoming, outgoing, quarantine)."),
    "deid_router_destination_up": ("gauge", "1 while the destination takes associations, 0 while it is down."),
    "deid_router_stage_seconds": ("histogram", "Time spent per instance in a stage."),
    "deid_router_delivery_latency_seconds": ("histogram", "From the C-STORE acknowledgement to delivery."),
}


class NodeMetrics:
    """Everything /metrics and the status page show."""

    def __init__(self, destinations: Sequence[str]):
        self._lock = threading.Lock()
        self.started = time.time()
        self.destinations = list(destinations)
        self._counters: dict[tuple[str, tuple], float] = {}
        self._histograms: dict[tuple[str, tuple], Histogram] = {}
        self._state = {d: ("up", None, None) for d in destinations}  # state, detail, since
        self._errors: deque[tuple[str, str, str, int]] = deque(maxlen=LAST_ERRORS)  # time, stage, message, times
        self._probe: Callable[[], Probe] = lambda: Probe({}, 0)
        for dest in destinations:  # zero rows exist from the start
            for name in ("deid_router_instances_forwarded_total", "deid_router_instances_retried_total"):
                self._counters[(name, (("destination", dest),))] = 0
        for name in ("deid_router_instances_received_total", "deid_router_instances_deidentified_total",
                     "deid_router_pixel_regions_masked_total", "deid_router_received_bytes_total",
                     "deid_router_associations_open"):
            self._counters[(name, ())] = 0
        self._counters[("deid_router_associations_total", (("outcome", "accepted"),))] = 0

    # -- events --------------------------------------------------------------------------
    def _add(self, name: str, labels: dict[str, str] | None = None, value: float = 1) -> None:
        key = (name, tuple(sorted((labels or {}).items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def _observe(self, name: str, labels: dict[str, str], value: float) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._histograms.setdefault(key, Histogram()).observe(value)

    def received(self, calling_ae: str, nbytes: int) -> None:
        self._add("deid_router_instances_received_total")
        self._add("deid_router_received_bytes_total", value=nbytes)

    def association(self, outcome: str) -> None:
        """"accepted", "ended", or the kind of a rejection."""
        if outcome == "ended":
            self._add("deid_router_associations_open", value=-1)
            return
        self._add("deid_router_associations_total", {"outcome": outcome})
        if outcome == "accepted":
            self._add("deid_router_associations_open")

    def refused(self, reason: str) -> None:
        self._add("deid_router_instances_refused_total", {"reason": reason})

    def deidentified(self, seconds: float, regions_masked: int) -> None:
        self._add("deid_router_instances_deidentified_total")
        if regions_masked:
            self._add("deid_router_pixel_regions_masked_total", value=regions_masked)
        self._observe("deid_router_stage_seconds", {"stage": "deidentify"}, seconds)

    def quarantined(self, stage: str, where: str) -> None:
        self._add("deid_router_instances_quarantined_total", {"stage": stage, "where": where})

    def forwarded(self, dest: str, seconds: float, latency_seconds: float | None) -> None:
        self._add("deid_router_instances_forwarded_total", {"destination": dest})
        self._observe("deid_router_stage_seconds", {"stage": "forward"}, seconds)
        if latency_seconds is not None:
            self._observe("deid_router_delivery_latency_seconds", {"destination": dest}, latency_seconds)

    def retried(self, dest: str) -> None:
        self._add("deid_router_instances_retried_total", {"destination": dest})

    def destination_state(self, dest: str, state: str, detail: str | None = None) -> None:
        with self._lock:
            self._state[dest] = (state, detail, _now())

    def error(self, stage: str, message: str) -> None:
        """Record an error; a repeat of one still listed moves it up with a count, so an
        outage retried every minute does not push every other error off the page."""
        with self._lock:
            times = 1
            for index, (_time, listed_stage, listed_message, listed_times) in enumerate(self._errors):
                if listed_stage == stage and listed_message == message:
                    times += listed_times
                    del self._errors[index]
                    break
            self._errors.append((_now(), stage, message, times))

    def set_probe(self, probe: Callable[[], Probe]) -> None:
        self._probe = probe

    # -- reading -------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The figures as plain data: counters and gauges by (name, labels), histograms'
        count and sum, destination states and the last errors."""
        probe = self._probe()
        with self._lock:
            values = {(n, labels): v for (n, labels), v in self._counters.items()}
            histograms = {key: (h.count, h.total, list(h.counts)) for key, h in self._histograms.items()}
            states = dict(self._state)
            errors = [(time_, stage, message if times == 1 else f"{message} ({times} times)")
                      for time_, stage, message, times in self._errors]
        for stage, depth in probe.queues.items():
            values[("deid_router_queue_depth", (("stage", stage),))] = depth
        values[("deid_router_spool_bytes", ())] = probe.spool_bytes
        for dest, (state, _detail, _since) in states.items():
            values[("deid_router_destination_up", (("destination", dest),))] = 1 if state == "up" else 0
        return {"values": values, "histograms": histograms, "destinations": states, "errors": errors,
                "uptime_seconds": time.time() - self.started}

    def value(self, name: str, **labels: str) -> float:
        return self.snapshot()["values"].get((name, tuple(sorted(labels.items()))), 0)

    def render_prometheus(self) -> str:
        snap = self.snapshot()
        lines: list[str] = []
        for name, (kind, help_text) in METRICS.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                for (n, labels), (count, total, counts) in sorted(snap["histograms"].items()):
                    if n != name:
                        continue
                    cumulative = 0
                    for bound, c in zip((*BUCKETS, float("inf")), counts):
                        cumulative += c
                        le = "+Inf" if bound == float("inf") else repr(bound)
                        lines.append(f"{name}_bucket{_labels(labels + (('le', le),))} {cumulative}")
                    lines.append(f"{name}_sum{_labels(labels)} {total!r}")
                    lines.append(f"{name}_count{_labels(labels)} {count}")
            else:
                for (n, labels), value in sorted(snap["values"].items()):
                    if n == name:
                        lines.append(f"{name}{_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), " ")}"'
               for k, v in labels)
    return "{" + ",".join(escaped) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
