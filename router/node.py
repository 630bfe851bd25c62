"""The DICOM node: wires receive -> spool -> de-identify -> forward, and its lifecycle.

``run(config) -> int`` (``deid-router serve``):

1. create the spool and lock it (exit 1 if another node holds it), resolve the site
   secret (generated and kept in the spool directory on first start: said once, at
   warning level, never its value), delete leftovers of partial writes in tmp/ and
   volatile outputs (made again from incoming/) (exit 1, saying why, if the directory
   cannot be used);
2. start the de-identification worker processes (and fail fast, exit 1, if the
   de-identifier cannot be built from the config);
3. start one forwarder process per destination (it resumes what outgoing/<dest>/ holds);
4. queue what incoming/ already holds, then start the SCP (exit 1 if the port is taken).

Every minute, and at once on SIGHUP: recount the spool, sweep stale tmp files, and queue
what incoming/ holds that the node does not know (originals put back by ``deid-router
requeue``).

On SIGTERM or SIGINT: stop accepting associations, let in-flight C-STOREs finish (then
abort the associations still open: their senders retry what was not acknowledged), stop
feeding the workers and wait for their current instances (bounded), stop the forwarders
(the current send finishes), log what each stage still holds, and return 0. Whatever is
left stays in the spool and is resumed at the next start.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

from router import config as config_module
from router.config import Config
from router.deidentify import DeidStage, StartError, configure_logging
from router.audit import AuditStore, AuditStoreError
from router.forward import ForwarderProcess
from router.metrics import NodeMetrics, Probe
from router.log import get_logger
from router.receive import Receiver
from router.spool import RESERVED_NAMES, Spool, SpoolInUse
from router.status import StatusServer

log = get_logger("router.node")

#: How often the node recounts the spool's bytes and sweeps stale tmp files.
HOUSEKEEPING_SECONDS = 60.0
#: tmp files untouched this long belong to aborted transfers.
STALE_TMP_SECONDS = 3600.0
#: Recycled files (removed originals' bytes) that lay unused this long are deleted: an idle
#: node keeps none for more than about this plus HOUSEKEEPING_SECONDS.
RECYCLED_IDLE_SECONDS = 60.0


def run(config: Config) -> int:
    stop = threading.Event()
    received_signal: list[str] = []

    def on_signal(signum, _frame):
        received_signal.append(signal.Signals(signum).name)
        stop.set()

    def on_hangup(_signum, _frame):
        stop.set()  # wakes the main loop: with no stopping signal received, it looks at the spool again

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    try:
        return _run(config, stop, received_signal)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(config: Config, stop: threading.Event, received_signal: list[str]) -> int:
    node = config.node
    configure_logging(config)
    clash = sorted(RESERVED_NAMES & {d.name for d in config.destinations})
    if clash:
        log.error("invalid_config", reason=f"destination name(s) {clash} are reserved for quarantine folders")
        return 2
    if not config.destinations:
        log.warning("no_destinations", note="every instance will end in quarantine/unrouted")

    spool = Spool(node.spool_dir, [d.name for d in config.destinations], node.keep_delivered)
    try:
        return _serve(config, spool, stop, received_signal)
    finally:
        spool.unlock()


def _serve(config: Config, spool: Spool, stop: threading.Event, received_signal: list[str]) -> int:
    node = config.node
    try:
        spool.create()
        if not spool.lock():  # before anything in the spool is touched
            log.warning("spool_not_locked", path=str(spool.root),
                        note="this file system has no locks: make sure no other node uses this spool directory")
        secret, generated = config_module.resolve_secret(config)
        removed = spool.clean_tmp()
        dropped = spool.drop_volatile()  # before anything is sent: made again from incoming/
        drained = spool.drain_recycled()  # a killed node's: earlier originals' bytes
        spool.rescan()
    except SpoolInUse as exc:
        log.error("spool_in_use", path=str(spool.root), pid=exc.pid,
                  note="another node runs on this spool directory; stop it first, or give this one its own")
        return 1
    except OSError as exc:
        log.error("spool_unusable", path=str(node.spool_dir.absolute()), error=exc.strerror or type(exc).__name__,
                  note="the spool directory (and the site secret kept in it) must be a writable directory")
        return 1
    if generated:
        log.warning("site_secret_generated", path=str((node.spool_dir / config_module.SECRET_FILE_NAME).absolute()),
                    note="a new site secret was generated; keep this file (and a backup): the same secret "
                         "gives the same pseudonyms, a lost one cannot be recovered")
    log.info("spool_opened", path=str(spool.root), bytes=spool.usage, removed_partial=removed,
             dropped_volatile=dropped, removed_recycled=drained, stages=spool.stage_counts())

    metrics = NodeMetrics([d.name for d in config.destinations])
    metrics.set_probe(lambda: Probe(spool.stage_counts(), spool.usage))
    try:
        audit = AuditStore(config.audit.path, config.audit.crosswalk, config.audit.pixel_text) if config.audit.path else None
    except AuditStoreError as exc:
        log.error("audit_store_failed", reason=str(exc))
        return 1
    events = NodeEvents(metrics, audit)
    def on_forward_event(dest: str, event: tuple) -> None:
        events.forward_event(dest, event)
        if event[0] in ("delivered", "quarantined"):
            stage.settled(dest, *event[-2:])  # (file name, inode): its original may go

    forwarders = {d.name: ForwarderProcess(config, d, spool, on_forward_event) for d in config.destinations}
    events.spool = spool

    def on_routed(dest, routed):
        forwarders[dest].enqueue(routed)

    stage = DeidStage(config, secret, spool, on_routed, events=events)
    try:
        stage.start()
    except StartError as exc:
        log.error("workers_failed", reason=str(exc))
        if audit:
            audit.close()
        return 1

    try:
        for forwarder in forwarders.values():
            forwarder.start()  # each resumes what outgoing/<dest>/ already holds
    except StartError as exc:
        log.error("forwarders_failed", reason=str(exc))
        _stop_pipeline(stage, forwarders, audit)
        return 1

    resumed = stage.resume(spool.list_incoming())
    if resumed:
        log.info("resumed", stage="deidentify", instances=resumed)

    receiver = Receiver(node, spool, stage.submit, events=events, reserved_bytes=stage.in_flight_bytes)
    status = None
    listening = (node.bind, node.port, "dicom")
    try:
        receiver.start()
        if config.status.enabled:
            listening = (config.status.bind, config.status.port, "status")
            stopping = threading.Event()
            status = StatusServer(metrics, config.status.bind, config.status.port,
                                  health=lambda: _health(stopping, stage, forwarders))
            log.info("status_listening", bind=config.status.bind, port=status.start())
    except OSError as exc:
        bind, port, service = listening
        log.error("listen_failed", service=service, bind=bind, port=port, error=exc.strerror or type(exc).__name__)
        receiver.stop_accepting()
        _stop_pipeline(stage, forwarders, audit)
        return 1

    log.info("node_started", ae_title=node.ae_title, port=receiver.port, workers=stage.count,
             destinations=[d.name for d in config.destinations])
    next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
    while not received_signal:
        hangup = stop.wait(1.0) and not received_signal
        if hangup:  # deid-router requeue sends SIGHUP: look at the spool again now
            stop.clear()
            next_housekeeping = 0.0
            for forwarder in forwarders.values():
                forwarder.look_again()
        if time.monotonic() >= next_housekeeping:
            next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
            try:
                swept = spool.sweep_tmp(STALE_TMP_SECONDS)
                spool.drain_recycled(RECYCLED_IDLE_SECONDS)
                spool.rescan()
                found = stage.rescan()
                if swept:
                    log.info("tmp_swept", files=swept)
                if found:
                    log.info("resumed", stage="deidentify", instances=found)
            except OSError as exc:
                log.error("housekeeping_failed", error=exc.strerror or type(exc).__name__)

    log.info("stopping", signal=received_signal[0] if received_signal else None)
    if status:
        stopping.set()  # /healthz answers 503 from now on
    started = time.monotonic()
    receiver.stop_accepting()
    aborted = receiver.drain()
    _stop_pipeline(stage, forwarders, audit)
    spool.drain_recycled()
    if status:
        status.stop()
    log.info("stopped", seconds=round(time.monotonic() - started, 2), aborted_associations=aborted,
             received=receiver.received, refused=receiver.refused, stages=spool.stage_counts())
    return 0


def _health(stopping: threading.Event, stage: DeidStage, forwarders: dict[str, ForwarderProcess]) -> tuple[bool, str]:
    """For load balancers: 503 while stopping or while a stage has no live process."""
    if stopping.is_set():
        return False, "stopping"
    if not stage.alive():
        return False, "no de-identification worker is running"
    dead = [name for name, f in forwarders.items() if not f.alive()]
    if dead:
        return False, f"forwarder not running: {', '.join(dead)}"
    return True, "ok"


class NodeEvents:
    """What the stages report about instances, counted (metrics) and recorded (audit store).

    Called from several threads of the main process; only pseudonymous identifiers reach
    the metrics, and original identifiers reach only the audit store's crosswalk.
    """

    def __init__(self, metrics: NodeMetrics, audit: AuditStore | None):
        self.metrics = metrics
        self.audit = audit
        self.spool: Spool | None = None

    def received(self, spool_id: str, calling_ae: str, nbytes: int) -> None:
        self.metrics.received(calling_ae, nbytes)
        if self.audit:
            self.audit.event("received", spool_id=spool_id, calling_ae=calling_ae)

    def association(self, outcome: str) -> None:
        """An association was accepted ("accepted"), rejected (the kind of reason) or ended ("ended")."""
        self.metrics.association(outcome)

    def refused(self, kind: str, calling_ae: str | None = None) -> None:
        self.metrics.refused(kind)
        if self.audit:
            self.audit.event("refused", calling_ae=calling_ae, reason=kind)

    def deidentified(self, spool_id: str, info: dict) -> None:
        self.metrics.deidentified(info["seconds"], info["regions"])
        if self.audit:
            self.audit.event("deidentified", spool_id=spool_id, calling_ae=info["source_ae"],
                             destination=",".join(info["routes"]), patient=info["patient_pseudonym"],
                             study_uid=info["study_instance_uid"], series_uid=info["series_instance_uid"],
                             sop_instance_uid=info["sop_instance_uid"])
            if info.get("crosswalk"):
                self.audit.map(*info["crosswalk"])
            if info.get("pixel_text"):
                self.audit.record_pixel_text((info["sop_instance_uid"], *region) for region in info["pixel_text"])

    def after_recorded(self, function: Callable[[], None]) -> None:
        """Call function once what was reported so far is in the audit store (at once
        without one): originals may go only after their crosswalk rows are written."""
        if self.audit:
            self.audit.after_written(function)
        else:
            function()

    def quarantined(self, stage: str, where: str, reason: str, spool_id: str | None = None,
                    sop_instance_uid: str | None = None) -> None:
        self.metrics.quarantined(stage, where)
        self.metrics.error(stage, f"quarantined in {where}: {reason}")
        if self.audit:
            self.audit.event("quarantined", spool_id=spool_id, destination=where, sop_instance_uid=sop_instance_uid,
                             reason=reason)

    def forward_event(self, dest: str, event: tuple) -> None:
        """Events a forwarder process reports (see router.forward.Forwarder.on_event)."""
        kind = event[0]
        if kind == "delivered":
            _kind, freed, seconds, latency, uid, study, series, patient, _name, _inode = event
            if self.spool:
                self.spool.add_usage(-freed)
            self.metrics.forwarded(dest, seconds, latency)
            if self.audit:
                self.audit.event("forwarded", destination=dest, sop_instance_uid=uid, study_uid=study,
                                 series_uid=series, patient=patient or None)
        elif kind == "retried":
            self.metrics.retried(dest)
        elif kind == "quarantined":
            self.quarantined("forward", dest, event[2], sop_instance_uid=event[1])
        elif kind == "state":
            self.metrics.destination_state(dest, event[1], event[2])
            if event[1] == "down":
                self.metrics.error("forward", f"{dest} unavailable: {event[2]}")


def _stop_pipeline(stage: DeidStage, forwarders: dict[str, ForwarderProcess], audit: AuditStore | None) -> None:
    left = stage.stop(timeout=30.0)
    if left:
        log.info("parked", stage="deidentify", instances=left, note="left in incoming/, resumed at next start")
    for forwarder in forwarders.values():
        forwarder.request_stop()
    deadline = time.monotonic() + 30.0
    for forwarder in forwarders.values():
        forwarder.wait_stopped(deadline - time.monotonic())
    if audit:
        audit.close()
