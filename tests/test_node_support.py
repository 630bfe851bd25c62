"""Helpers for the node tests (tests/test_node_*.py): the router as a real subprocess.

No tests here. ``Router`` writes a TOML config into a temp dir, runs
``python -m router serve --config ...`` and waits for it to answer C-ECHO; its JSON log
lines are parsed with ``events()``.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from peers import DCMTK_ENV, echoscu, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "node-tests-secret-0123456789abcdef"
ROUTER_AET = "DEID_ROUTER"


def _node_test_options() -> list[str]:
    from router.config import DEFAULT_OPTIONS

    return sorted(DEFAULT_OPTIONS - {"clean-pixel-data"})


#: The product's default options without the pixel stage (OCR costs ~1 s per CT slice on
#: 2 cores: these tests are about the node; the pixel stage has its own tests, and one
#: node test runs it in the workers). Pass deid={"options": ...} to change it.
NODE_TEST_OPTIONS = _node_test_options()


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def fill_file_system(folder: Path) -> Path:
    """Fill the file system holding ``folder`` to the last byte; the filler, to delete for room."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:  # unbuffered: nothing left to flush at close
        try:
            while True:
                out.write(bytes(1 << 16))
        except OSError:
            pass
    return filler


def descendants(pid: int) -> list[int]:
    """Every live descendant of a process (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    result, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            result.append(child)
            todo.append(child)
    return result


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, e.g. tls = { certificate = "..." }
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def dicom_destination(name: str, host: str, port: int, ae_title: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "dicom", "host": host, "port": port, "ae_title": ae_title, **extra}


def folder_destination(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "folder", "path": path, **extra}


#: Routers started here and maybe still running: killed (with their workers) at exit, so
#: that a failed test leaves no node behind.
_LIVE: set[Router] = set()


@atexit.register
def _kill_leftovers() -> None:
    for router in list(_LIVE):
        router.kill()


class Router:
    """deid-router serve in a subprocess, on a free loopback port."""

    def __init__(self, workdir: Path, destinations: Iterable[dict[str, Any]], node: dict[str, Any] | None = None,
                 deid: dict[str, Any] | None = None, name: str = "router",
                 sections: dict[str, dict[str, Any]] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.spool = self.workdir / f"{name}-spool"
        self.config_path = self.workdir / f"{name}.toml"
        self.log_path = self.workdir / f"{name}.log"
        self.process: subprocess.Popen | None = None
        node = {"bind": "127.0.0.1", "port": self.port, "spool_dir": self.spool, "workers": 2, **(node or {})}
        deid = {"secret": SECRET, "options": NODE_TEST_OPTIONS, **(deid or {})}
        if deid["options"] is None:  # the product default
            del deid["options"]
        lines = ["[node]"] + [f"{k} = {toml_value(v)}" for k, v in node.items()]
        lines += ["", "[deid]"] + [f"{k} = {toml_value(v)}" for k, v in deid.items()]
        lines += ["", "[logging]", 'format = "json"', 'level = "info"']
        for section, values in (sections or {}).items():  # e.g. {"status": {...}, "audit": {...}}
            lines += ["", f"[{section}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
        for dest in destinations:
            lines += ["", "[[destinations]]"] + [f"{k} = {toml_value(v)}" for k, v in dest.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.destinations = [d["name"] for d in destinations]

    # -------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 30.0, echo_aet: str | None = "ECHOSCU") -> Router:
        """Start; ready when it answers C-ECHO from echo_aet (None: when it logs node_started)."""
        self._starts_before = len(self.events("node_started"))
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "router", "serve", "--config", str(self.config_path)],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            )
        _LIVE.add(self)
        self.wait_ready(timeout, echo_aet)
        return self

    def wait_ready(self, timeout: float = 30.0, echo_aet: str | None = "ECHOSCU") -> None:
        deadline = time.monotonic() + timeout
        starts = getattr(self, "_starts_before", 0)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"router exited with {self.process.returncode}:\n{self.log_tail()}")
            if echo_aet is None:
                if len(self.events("node_started")) > starts:
                    return
            elif echoscu("127.0.0.1", self.port, called_ae=ROUTER_AET, calling_ae=echo_aet, timeout=5).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"router did not answer C-ECHO within {timeout} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send sig and wait for the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"router did not exit within {timeout} s after {signal.Signals(sig).name}")
        _LIVE.discard(self)
        return code

    def kill(self) -> None:
        """SIGKILL the router and all its processes at once, as a power cut would."""
        if self.process is None:
            return
        family = descendants(self.process.pid) if self.process.poll() is None else []
        for pid in [self.process.pid, *family]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        _LIVE.discard(self)

    def worker_pids(self) -> list[int]:
        """Live worker processes of the running router (pids from its log, checked)."""
        logged: list[int] = []
        for event in self.events():
            if event.get("event") == "workers_started":
                logged += event.get("pids", [])
            elif event.get("event") == "worker_restarted":
                logged.append(event["pid"])
        family = set(descendants(self.process.pid)) if self.process and self.process.poll() is None else set()
        return [pid for pid in logged if pid in family]

    def __enter__(self) -> Router:
        if self.process is None or self.process.poll() is not None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()

    # ------------------------------------------------------------------- logs
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        result = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or event.get("event") == name:
                result.append(event)
        return result

    def logged_strings(self) -> str:
        """Every string in the log (keys and values, lines that are not JSON whole), but not
        numbers nor the clock's timestamps: a six-digit patient ID would match a timestamp's
        microseconds or a byte count by chance."""
        def strings(value: Any) -> Iterator[str]:
            if isinstance(value, str):
                yield value
            elif isinstance(value, dict):
                for key, item in value.items():
                    yield key
                    if key != "timestamp":
                        yield from strings(item)
            elif isinstance(value, list):
                for item in value:
                    yield from strings(item)

        found: list[str] = []
        for line in self.log_text().splitlines():
            try:
                found.extend(strings(json.loads(line)))
            except json.JSONDecodeError:
                found.append(line)
        return "\n".join(found)

    def non_json_lines(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if line.strip() and not line.startswith("{")]

    # ------------------------------------------------------------------ spool
    def files(self, *parts: str, suffix: str = ".dcm") -> list[Path]:
        folder = self.spool.joinpath(*parts)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.name.endswith(suffix))

    def reasons(self, where: str) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in self.files("quarantine", where, suffix=".reason.json")]

    def echo_ok(self, calling_ae: str = "ECHOSCU") -> bool:
        return echoscu("127.0.0.1", self.port, called_ae=ROUTER_AET, calling_ae=calling_ae, timeout=10).returncode == 0


def storescu_background(port: int, paths: Iterable[Path], out: Path, calling_ae: str = "STORESCU",
                        called_ae: str = ROUTER_AET, extra: Iterable[str] = ()) -> subprocess.Popen:
    """dcmtk storescu -v in the background (its log in ``out``, for parse_storescu_output)."""
    from peers import MAX_PDU, STORESCU

    args = [STORESCU, "-v", "-aet", calling_ae, "-aec", called_ae, "--max-pdu", str(MAX_PDU), *extra,
            "127.0.0.1", str(port), *map(str, paths)]
    with open(out, "wb") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV, stdin=subprocess.DEVNULL)


def original_ids(path: Path) -> dict[str, str]:
    """PatientName, PatientID and the three instance-hierarchy UIDs of a file, as written."""
    import warnings

    from pydicom import dcmread

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path, stop_before_pixels=True, force=True)
    return {
        "PatientName": str(ds.get("PatientName", "") or ""),
        "PatientID": str(ds.get("PatientID", "") or ""),
        "StudyInstanceUID": str(ds.get("StudyInstanceUID", "") or ""),
        "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "") or ""),
        "SOPInstanceUID": str(ds.get("SOPInstanceUID", "") or ""),
    }


def new_uid(original: str) -> str:
    """The pseudonymous UID the router gives an original UID (keyed with SECRET)."""
    from router.pseudonyms import Pseudonymizer

    return Pseudonymizer(SECRET.encode()).uid(original)
