"""The processes a benchmark runs on loopback: dcmtk peers, Orthanc, and the node under test.

dcmtk and Orthanc run with TCP_NODELAY=1 (Nagle otherwise costs ~40 ms per C-STORE) and
every peer with 128 KiB PDUs. The destination is dcmtk's storescp writing bit-preserved
files named by SOP Instance UID, so a folder count is the number of distinct instances
delivered and a file's mtime is when it arrived.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
REPO_ROOT = Path(__file__).resolve().parent.parent
PDU = 131072
SECRET = "bench-secret-0123456789abcdef"


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


def stop(process: subprocess.Popen, timeout: float = 90) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class StoreSCP:
    """dcmtk storescp: the destination of every network path."""

    aet = "STORESCP"

    def __init__(self, work: Path):
        self.folder = work / "storescp"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cleared = 0
        self.port = free_port()
        self.process = subprocess.Popen(
            [STORESCP, "-aet", self.aet, "-od", str(self.folder), "+xa", "-pm", "+B", "-dhl", "--max-pdu", str(PDU),
             str(self.port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_echo(self.port, self.aet, self.process)

    def count(self) -> int:
        return len(os.listdir(self.folder))

    def arrivals(self) -> dict[str, float]:
        """SOP Instance UID -> arrival time (file mtime); storescp names files MODALITY.UID."""
        return {entry.name.split(".", 1)[1]: entry.stat().st_mtime for entry in os.scandir(self.folder)}

    def clear(self) -> None:
        """An empty folder for the next row: the full one is renamed away (deleted with the
        bench's work folder at the end). Deleting a row's thousand files just before the next
        row made every file creation in that row slow on ext4 without a journal (as here: a
        new inode skips, one by one, those freed in the last 30 s), 20-25% of a router row's
        CPU through storescp and the spool, a cost the Orthanc rows did not pay."""
        self._cleared += 1
        self.folder.rename(self.folder.with_name(f"{self.folder.name}-{self._cleared}"))
        self.folder.mkdir()

    def stop(self) -> None:
        stop(self.process, 30)


class OrthancPeer:
    """Orthanc (Debian package) on loopback ports, storage in a temp folder: a site's usual ingest.

    ``sync``: Orthanc's SyncStorageArea, true by default since Orthanc 1.7.4 (each file is
    fsynced before the C-STORE is answered, as the router does); false answers before the
    file reaches the disk (faster, not durable).
    """

    aet = "ORTHANC"

    def __init__(self, work: Path, sync: bool = True):
        work.mkdir(parents=True, exist_ok=True)
        self.port, self.http = free_port(), free_port()
        config = {"Name": "bench", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
                  "DicomAet": self.aet, "DicomPort": self.port, "HttpPort": self.http, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
                  "UnknownSopClassAccepted": True, "MaximumPduLength": PDU, "SyncStorageArea": sync,
                  "Plugins": []}
        (work / "orthanc.json").write_text(json.dumps(config))
        self.process = subprocess.Popen([ORTHANC, f"--logdir={work}", str(work / "orthanc.json")], env=DCMTK_ENV,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_echo(self.port, self.aet, self.process)

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics", timeout=10) as response:
            return int(json.load(response)["CountInstances"])

    def stop(self) -> None:
        stop(self.process, 60)


class Node:
    """The node under test (``python -m router serve``) or the bare pass-through, as a subprocess.

    Its stdout is a log file: the router's JSON events, the pass-through's ``acked UID TIME``
    lines; both give the roles of its processes and per-instance latencies.
    """

    def __init__(self, work: Path, scp: StoreSCP, kind: str, *, options: list[str] | None = None,
                 workers: int | None = None, max_spool_bytes: int | None = None):
        work.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        self.port = free_port()
        self.log = work / f"{kind}.log"
        self.spool = work / "spool"
        if kind == "pass-through":
            self.aet = "PASSTHROUGH"
            command = [sys.executable, "-m", "bench.passthrough", str(self.port), "127.0.0.1", str(scp.port), scp.aet]
        elif kind == "router":
            self.aet = "DEID_ROUTER"
            lines = ["[node]", 'bind = "127.0.0.1"', f"port = {self.port}", f'spool_dir = "{self.spool}"',
                     f"max_pdu = {PDU}"]
            lines += [f"workers = {workers}"] if workers else []
            lines += [f"max_spool_bytes = {max_spool_bytes}"] if max_spool_bytes else []
            lines += ["[deid]", f'secret = "{SECRET}"']
            lines += [f"options = {json.dumps(sorted(options))}"] if options is not None else []
            lines += ["[logging]", 'format = "json"', "[[destinations]]", 'name = "storescp"',
                      f'ae_title = "{scp.aet}"', 'host = "127.0.0.1"', f"port = {scp.port}"]
            self.config = work / "router.toml"
            self.config.write_text("\n".join(lines) + "\n")
            command = [sys.executable, "-m", "router", "serve", "--config", str(self.config)]
        else:
            raise ValueError(kind)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=work, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        wait_echo(self.port, self.aet, self.process, timeout=180)

    @property
    def pid(self) -> int:
        return self.process.pid

    def events(self, name: str) -> list[dict]:
        """The router's JSON log events of this name, in order."""
        marker = f'"event": "{name}"'
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if marker in line:
                try:
                    found.append(json.loads(line))
                except ValueError:
                    pass
        return found

    def acked(self) -> dict[str, float]:
        """Pass-through: SOP Instance UID -> acknowledgement time."""
        times = {}
        for line in self.log.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "acked":
                times[parts[1]] = float(parts[2])
        return times

    def roles(self) -> dict[int, str]:
        """pid -> role, from the router's start events (the rest of its tree is 'other')."""
        roles = {self.pid: "receiver"}
        if self.kind == "router":
            for event in self.events("workers_started"):
                roles.update({pid: "worker" for pid in event.get("pids", [])})
            for event in self.events("worker_restarted"):
                roles[event["pid"]] = "worker"
            for event in self.events("forwarder_started"):
                roles[event["pid"]] = "forwarder"
        return roles

    def stop(self) -> None:
        stop(self.process)


def storescu(port: int, aet: str, files: list[Path], senders: int = 1) -> float:
    """dcmtk storescu, ``senders`` processes at once, each with its share of the files.

    Returns the seconds until the last storescu exited (every instance acknowledged).
    """
    started = time.perf_counter()
    shares = [files[i::senders] for i in range(senders)]
    processes = [subprocess.Popen([STORESCU, "-aec", aet, "--max-pdu", str(PDU), "127.0.0.1", str(port),
                                   *map(str, share)], env=DCMTK_ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) for share in shares if share]
    for process in processes:
        out, _err = process.communicate(timeout=3600)
        if process.returncode != 0:
            # exit code 167 with no message: a C-STORE was answered with a failure status
            raise RuntimeError(f"storescu failed (exit code {process.returncode}): "
                               f"{out.decode(errors='replace')[-1500:]}")
    return time.perf_counter() - started
