"""A soak: many instances through a real node while it is made to fail, then a verdict.

    python tests/soak.py [--instances 4000] [--senders 4] [--chaos] [--ocr] [--tmpfs 3m]
                         [--spool-limit BYTES] [--audit] [--graceful] [--rounds 10] [--seed 7] [--workdir DIR]

Each round starts the node (``deid-router serve``), sends what it has not acknowledged yet
from ``--senders`` pynetdicom associations, sends it SIGHUP every 0.3 s, takes the
destination (a pynetdicom SCP) down now and then, with ``--chaos`` SIGKILLs a random
process of the node (a worker, a forwarder, the forkserver) now and then, and after 3-8 s
SIGKILLs the whole node. After the rounds it sends the rest without faults and checks:
every acknowledged instance reached the destination, every re-delivery is byte-identical,
the spool empties and nothing is quarantined. Exit code 0 when all holds.

``--ocr`` uses the product's default options (pixel data cleaned); ``--tmpfs`` puts the spool
on a tmpfs of that size with no free-space floor; ``--spool-limit`` sets max_spool_bytes;
``--audit`` keeps an audit store with the crosswalk (SQLite under kill -9); ``--graceful``
stops the node with SIGTERM (it must exit 0) instead of killing it.
Not part of the test suite (minutes, not seconds); the findings it led to are tests there.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_faults import RecordingSCP, Sender, phi_series, write_all  # noqa: E402
from test_node_support import Router, descendants, dicom_destination, new_uid, wait_until  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=4000)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--chaos", action="store_true", help="SIGKILL random processes of the node too")
    parser.add_argument("--ocr", action="store_true", help="the product's default options (pixel data cleaned)")
    parser.add_argument("--tmpfs", help="the spool on a tmpfs of this size (e.g. 3m), min_free_bytes = 0 (root)")
    parser.add_argument("--spool-limit", type=int, help="max_spool_bytes")
    parser.add_argument("--audit", action="store_true", help="an audit store with the crosswalk")
    parser.add_argument("--graceful", action="store_true", help="stop the node with SIGTERM (exit 0 asked) instead of kill -9")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deid-soak-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    series = phi_series(args.instances)
    files = write_all(work / "ct", series)
    uid_of = {p: new_uid(str(ds.SOPInstanceUID)) for p, ds in zip(files, series)}
    scp = RecordingSCP().start()
    node: dict = {}
    if args.spool_limit:
        node["max_spool_bytes"] = args.spool_limit
    if args.tmpfs:
        node["min_free_bytes"] = 0
    dest = dicom_destination("recorder", "127.0.0.1", scp.port, "RECORDER", retry_initial_seconds=0.2,
                             retry_max_seconds=2)
    sections = {"audit": {"path": work / "audit.db", "crosswalk": True}} if args.audit else None
    router = Router(work, [dest], node=node, deid={"options": None} if args.ocr else None, sections=sections)
    if args.tmpfs:
        router.spool.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs}", "tmpfs", str(router.spool)], check=True)
    acknowledged: set[Path] = set()
    lock = threading.Lock()
    started = time.time()
    try:
        for round_ in range(1, args.rounds + 1):
            remaining = [p for p in files if p not in acknowledged]
            if not remaining:
                break
            router.start()
            stop = threading.Event()

            def disturb() -> None:
                while not stop.is_set():
                    try:
                        os.kill(router.process.pid, signal.SIGHUP)
                    except ProcessLookupError:
                        return
                    family = descendants(router.process.pid)
                    if args.chaos and family and rng.random() < 0.1:
                        try:
                            os.kill(rng.choice(family), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    time.sleep(0.3)

            def send(share: list[Path]) -> None:
                sender = Sender(router.port)
                for path in share:
                    if stop.is_set():
                        return
                    status = sender.send(path)
                    if status == 0x0000:
                        with lock:
                            acknowledged.add(path)
                    elif status is None:
                        time.sleep(0.2)
                        sender = Sender(router.port)
                sender.close()

            senders = [threading.Thread(target=send, args=(remaining[i::args.senders],), daemon=True)
                       for i in range(args.senders)]
            disturber = threading.Thread(target=disturb, daemon=True)
            for thread in (*senders, disturber):
                thread.start()
            deadline = time.time() + rng.uniform(3, 8)
            while time.time() < deadline and any(t.is_alive() for t in senders):
                time.sleep(0.2)
                if rng.random() < 0.02:  # the destination down for a moment
                    scp.server.shutdown()
                    time.sleep(rng.uniform(0.5, 3))
                    scp.start()
            finished = not any(t.is_alive() for t in senders)
            if not finished and args.graceful:
                stop.set()  # no SIGHUP or kill during the stop
                disturber.join(5)
                code = router.stop()
                assert code == 0, f"exit code {code} after SIGTERM"
            elif not finished:
                router.kill()
            stop.set()
            for thread in (*senders, disturber):
                thread.join(30)
            how = "stopped" if args.graceful else "killed"
            print(f"round {round_}: {len(acknowledged)} acknowledged{'' if finished else ', node ' + how}", flush=True)
            if finished:
                break
        if router.process is None or router.process.poll() is not None:
            router.start()
        sender = Sender(router.port)
        for path in [p for p in files if p not in acknowledged]:
            if sender.send(path) == 0x0000:
                acknowledged.add(path)
        sender.close()
        expected = {uid_of[p] for p in acknowledged}
        try:
            wait_until(lambda: expected <= scp.uids(), timeout=600, interval=0.5,
                       what="every acknowledged instance delivered")
        except AssertionError:
            held = {stage: len(list((router.spool / stage).rglob("*.dcm")))
                    for stage in ("tmp", "incoming", "outgoing", "quarantine", "recycle")}
            print(f"NOT DELIVERED: {len(expected - scp.uids())} of {len(expected)}; the spool holds {held}")
            print(subprocess.run(["df", "-k", str(router.spool)], capture_output=True, text=True).stdout)
            raise
        wait_until(lambda: not router.files("incoming") and not router.files("outgoing", "recorder"), timeout=120,
                   what="an empty spool")
        with scp.lock:
            changed = [uid for uid, hashes in scp.received.items() if len(set(hashes)) > 1]
            again = sum(len(hashes) - 1 for hashes in scp.received.values())
        quarantined = list((router.spool / "quarantine").rglob("*.dcm"))
        events = collections.Counter(e.get("event") for e in router.events()
                                     if e.get("level") in ("warning", "error") and e.get("event") != "refused")
        code = router.stop()
        print(f"{len(acknowledged)} acknowledged of {len(files)}, all delivered; {again} re-deliveries, "
              f"{len(changed)} of them different; {len(quarantined)} quarantined; exit code {code}; "
              f"{time.time() - started:.0f} s")
        print(f"warnings and errors: {dict(events)}")
        return 0 if not changed and not quarantined and code == 0 else 1
    finally:
        if router.process is not None and router.process.poll() is None:
            router.kill()
        scp.stop()
        if args.tmpfs:
            subprocess.run(["umount", "-l", str(router.spool)], check=False)


if __name__ == "__main__":
    sys.exit(main())
