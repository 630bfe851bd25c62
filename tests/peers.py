"""Real DICOM peers for tests: Orthanc, dcmtk's storescp, storescu and echoscu.

Everything talks to 127.0.0.1 on free ports, and every dcmtk/Orthanc process gets
``DCMTK_ENV`` (``TCP_NODELAY=1``): without it Nagle costs ~40 ms per C-STORE.

Binaries are called by absolute path (``/usr/bin/storescu`` ...): pynetdicom installs
its own ``storescu``/``storescp``/``echoscu`` console scripts, which come first on
PATH here and take different arguments.

Sending compressed files with dcmtk
-----------------------------------
dcmtk's storescu (3.6.7) proposes only uncompressed transfer syntaxes by default and,
as built by Debian, cannot decompress: a JPEG/RLE/JPEG 2000 file sent over an
uncompressed context fails with "unable to convert dataset" (0006:020e). Two ways:

- one storescu run per transfer-syntax family with the flag from ``PROPOSE_FLAGS``
  (``-xy`` JPEG baseline, ``-xx`` JPEG extended, ``-xs`` JPEG lossless SV1, ``-xt``
  JPEG-LS lossless, ``-xv`` JPEG 2000 lossless, ``-xw`` JPEG 2000, ``-xr`` RLE, ``-xd``
  deflate; each also proposes the uncompressed syntaxes), best with ``-R``;
- ``storescu(..., propose_all=True)`` / ``send_files()``: a generated association
  profile (``-xf FILE PROFILE``) proposes one presentation context per (SOP class,
  transfer syntax) pair found in the files, so ONE storescu run sends every file in its
  own transfer syntax (storescu picks the accepted context matching the file's
  syntax). An association holds at most 128 contexts; ``send_files`` splits bigger
  sets into several runs.

storescu's exit code is 0 even when stores fail with ``-nh``: ``send_files`` parses its
``-v`` output ("Sending file: X" followed by "Received Store Response (Success|Warning
...)" or "Store Failed").

Corpus files dcmtk cannot send (measured: send_files on /work/shared/corpus to Orthanc
1.10.1 accepts 50 of 59 files, which Orthanc stores as 45 instances because three groups
of files share SOP Instance UIDs: pdd__OBXXXX1A_rle / _rle_2frame /
pydicom__examples_palette, pdd__emri_small_RLE / _jpeg_2k_lossless / _jpeg_ls_lossless,
presidio__0_ORIGINAL_compressed / _no_pixels; Orthanc keeps the first of each):

- pdd__HTJ2K_08_RGB.dcm (1.2.840.10008.1.2.4.203, HTJ2K) and pdd__liver_deflate.dcm
  (1.2.840.10008.1.2.8.1, Deflated Image Frame Compression): transfer syntaxes unknown
  to dcmtk 3.6.7, which then parses the data set as explicit little endian and fails
  ("unable to convert dataset"). Orthanc 1.10.1 also rejects both syntaxes at
  association time (tried with pynetdicom), so no destination here can take them as is.
- pdd__explicit_VR-UN.dcm: every data element is encoded with VR UN; dcmtk does not
  resolve UN to the dictionary VR, finds no SOP Class/Instance UID and skips the file
  (pynetdicom sends it and Orthanc stores it).
- pydicom__MR_truncated.dcm: Pixel Data longer than the file ("premature end of
  stream"), dcmtk refuses to read it.
- pydicom__UN_sequence.dcm, pydicom__empty_charset_LEI.dcm, pydicom__nested_priv_SQ.dcm,
  pydicom__no_meta.dcm, pydicom__priv_SQ.dcm: no SOP Class UID / SOP Instance UID at all
  (data-set fragments), nothing to send them as.

orthanc__PrivateMDNTags.dcm has no file meta information; storescu reads it as a bare
data set (implicit VR) and sends it fine.

Orthanc 1.10.1 notes: there is no HTTP bind-address option (``RemoteAccessAllowed:
false`` makes it refuse non-loopback HTTP clients) and its DICOM port listens on all
interfaces. Working REST endpoints: ``/system``, ``/statistics``, ``/instances``,
``/instances?expand``, ``/instances/ID/simplified-tags``, ``/instances/ID/tags?simplify``,
``/instances/ID/file``, ``/instances/ID/metadata/TransferSyntax`` (also RemoteAET,
CalledAET, RemoteIP, SopClassUid). A second C-STORE of a stored SOP Instance UID is
answered Success and discarded ("OverwriteInstances": false).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"

MAX_PDU = 131072
#: Most presentation contexts one association may propose.
MAX_CONTEXTS = 128

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

#: storescu flag proposing a compressed transfer syntax (plus the uncompressed ones).
PROPOSE_FLAGS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended (Process 2 and 4)
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless, SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
}

_IMPLICIT_LE = "1.2.840.10008.1.2"

# Processes started here and not yet stopped: killed at interpreter exit, so a crashed
# test run leaves no Orthanc or storescp behind.
_LIVE: set[subprocess.Popen] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _LIVE.clear()


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=DCMTK_ENV)
    _LIVE.add(proc)
    return proc


def _terminate(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _LIVE.discard(proc)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class Orthanc:
    """A throwaway Orthanc 1.10 on loopback; data in ``workdir/orthanc-<aet>/``.

    Ports are chosen once, so ``stop()`` then ``start()`` is a restart that keeps the
    stored instances. ``config`` entries are merged over the defaults.
    """

    def __init__(self, workdir: Path, aet: str = "ORTHANC", config: dict[str, Any] | None = None):
        self.aet = aet
        self.root = Path(workdir) / f"orthanc-{aet}"
        self.dicom_port, self.http_port = _free_ports(2)
        self.extra_config = dict(config or {})
        self.process: subprocess.Popen | None = None
        self._started_once = False

    # -- lifecycle ----------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": f"test-{self.aet}",
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "MaximumPduLength": MAX_PDU,
            "SyncStorageArea": False,
            "Plugins": [],
            "StableAge": 1,
            "SaveJobs": False,
            "HttpThreadsCount": 10,
            **self.extra_config,
        }

    def start(self, timeout: float = 20.0) -> Orthanc:
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        # On the very first start a port may have been taken meanwhile: pick new ones.
        for attempt in range(1 if self._started_once else 3):
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            self.process = _spawn([ORTHANC, f"--logdir={self.log_dir}", str(self.config_path)],
                                  self.root / "stdout.log")
            if self._wait_ready(timeout):
                self._started_once = True
                return self
            if self.process.poll() is None:
                break  # alive but not answering: not a port clash
            self.process.wait()
            _LIVE.discard(self.process)
            if not self._started_once:
                self.dicom_port, self.http_port = _free_ports(2)
        code = self.process.poll()
        tail = self.log_tail()
        _terminate(self.process)
        self.process = None
        why = f"exited with code {code}" if code is not None else f"did not answer within {timeout} s"
        raise RuntimeError(f"Orthanc ({self.url}) {why}:\n{tail}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "/system", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop: SIGTERM (Orthanc 1.10 takes ~3.5 s), SIGKILL after ``timeout`` s."""
        _terminate(self.process, timeout)
        self.process = None

    def kill(self) -> None:
        """Immediate stop (SIGKILL). Stored instances survive: SQLite commits each one."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            _LIVE.discard(self.process)
        self.process = None

    def restart(self, graceful: bool = True) -> Orthanc:
        """Stop and start again on the same ports with the same data."""
        self.stop() if graceful else self.kill()
        return self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        logs = sorted(self.log_dir.glob("Orthanc.log*"), key=lambda p: p.stat().st_mtime)
        parts = [_tail(logs[-1], lines)] if logs else []
        parts.append(_tail(self.root / "stdout.log", lines))
        return "\n".join(parts)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        # kill, not stop: a graceful stop costs ~3.5 s per test and the data are throwaway.
        self.kill()

    def __repr__(self) -> str:
        return f"Orthanc(aet={self.aet!r}, dicom_port={self.dicom_port}, http_port={self.http_port})"

    # -- REST -----------------------------------------------------------------------
    def get_bytes(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def get(self, path: str) -> Any:
        """GET ``path`` (e.g. "/statistics") and parse the JSON answer."""
        return json.loads(self.get_bytes(path))

    def count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def instances(self) -> list[str]:
        return self.get("/instances")

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """Tags by keyword, values as strings (sequences as lists of dicts)."""
        return self.get(f"/instances/{orthanc_id}/simplified-tags")

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get_bytes(f"/instances/{orthanc_id}/file")

    def instance_metadata(self, orthanc_id: str, name: str) -> str:
        """One metadata item: TransferSyntax, RemoteAET, CalledAET, RemoteIP, SopClassUid..."""
        return self.get_bytes(f"/instances/{orthanc_id}/metadata/{name}").decode()

    def transfer_syntax(self, orthanc_id: str) -> str:
        return self.instance_metadata(orthanc_id, "TransferSyntax")

    def sop_instance_uids(self) -> dict[str, str]:
        """SOPInstanceUID -> Orthanc instance id, for every stored instance."""
        return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in self.get("/instances?expand")}

    def wait_for_instances(self, n: int, timeout: float = 10.0) -> list[str]:
        """Poll until at least ``n`` instances are stored; return their ids."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.count()
            if count >= n:
                return self.instances()
            if time.monotonic() > deadline:
                raise AssertionError(f"Orthanc {self.aet} holds {count} instances, expected >= {n} "
                                     f"after {timeout} s")
            time.sleep(0.05)


class StoreSCP:
    """dcmtk storescp on a free port, writing each received instance into ``outdir``.

    Accepts every storage SOP class it knows plus unknown ones (``-pm``, promiscuous)
    in every transfer syntax (``+xa``); max PDU 131072. It listens on all interfaces
    (storescp 3.6.7 has no bind option).
    """

    def __init__(self, outdir: Path, aet: str = "STORESCP", extra_args: Iterable[str] = ()):
        self.outdir = Path(outdir)
        self.aet = aet
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None
        self.log = self.outdir.parent / f"storescp-{self.aet}-{self.port}.log"

    def start(self, timeout: float = 10.0) -> StoreSCP:
        if self.running:
            return self
        self.outdir.mkdir(parents=True, exist_ok=True)
        args = [STORESCP, "-aet", self.aet, "-od", str(self.outdir), "+xa", "-pm",
                "--max-pdu", str(MAX_PDU), "-dhl", *self.extra_args, str(self.port)]
        self.process = _spawn(args, self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if echoscu("127.0.0.1", self.port, called_ae=self.aet, timeout=5).returncode == 0:
                    return self
            except subprocess.TimeoutExpired:
                # Connected but unanswered: storescp (one association at a time) is serving
                # someone else already, e.g. a router that was waiting for it.
                if self.process.poll() is None:
                    return self
            time.sleep(0.05)
        tail = _tail(self.log)
        self.stop()
        raise RuntimeError(f"storescp did not answer C-ECHO on port {self.port}:\n{tail}")

    def stop(self, timeout: float = 10.0) -> None:
        _terminate(self.process, timeout)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def files(self) -> list[Path]:
        """Received files, sorted by name (storescp names them <modality>.<SOPInstanceUID>)."""
        if not self.outdir.exists():
            return []
        return sorted(p for p in self.outdir.rglob("*") if p.is_file())

    def wait_for_files(self, n: int, timeout: float = 10.0) -> list[Path]:
        """Wait until ``n`` files are there and their sizes stop changing."""
        deadline = time.monotonic() + timeout
        previous: dict[Path, int] | None = None
        while True:
            sizes = {p: p.stat().st_size for p in self.files()}
            if len(sizes) >= n and sizes == previous:
                return sorted(sizes)
            if time.monotonic() > deadline:
                raise AssertionError(f"storescp {self.aet} received {len(sizes)} files, expected >= {n} "
                                     f"after {timeout} s")
            previous = sizes
            time.sleep(0.05)

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _as_paths(paths: Path | str | Iterable[Path | str]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _expand(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return files


def dataset_key(path: Path) -> tuple[str, str] | None:
    """(SOP Class UID, transfer syntax UID) of a file, or None if it has no SOP class."""
    from pydicom import dcmread

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corpus holds invalid values on purpose
        try:
            ds = dcmread(path, stop_before_pixels=True, force=True)
            meta = ds.file_meta or {}
            sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
            if not sop_class or not ds.get("SOPInstanceUID"):
                return None
            syntax = meta.get("TransferSyntaxUID") or _IMPLICIT_LE
        except Exception:
            return None
    return str(sop_class).strip(), str(syntax).strip()


def write_profile(pairs: Iterable[tuple[str, str]], path: Path, name: str = "Files") -> Path:
    """An association profile for storescu ``-xf path name``: one context per pair."""
    pairs = sorted(set(pairs))
    if len(pairs) > MAX_CONTEXTS:
        raise ValueError(f"{len(pairs)} (SOP class, transfer syntax) pairs, at most {MAX_CONTEXTS} per association")
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    lines += [f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts)}" for n, (sop, ts) in enumerate(pairs, 1)]
    lines += ["[[Profiles]]", f"[{name}]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n")
    return path


def storescu(host: str, port: int, paths: Path | str | Iterable[Path | str], called_ae: str = "ANY-SCP",
             calling_ae: str = "STORESCU", extra_args: Iterable[str] = (), timeout: float = 120.0,
             propose_all: bool = False) -> subprocess.CompletedProcess:
    """Run dcmtk storescu (max PDU 131072, ``+sd +r`` for folders); output captured as text.

    Default proposals are uncompressed only. ``propose_all=True`` proposes exactly the
    (SOP class, transfer syntax) pairs of the files (read with pydicom), so compressed
    files go in their own syntax; files without a SOP class are left to storescu to
    skip. Add ``"-nh"`` to ``extra_args`` to go on after a failed store (storescu then
    still exits 0: use ``send_files`` to know which files were accepted).
    """
    paths = _as_paths(paths)
    args = [STORESCU, "-aet", calling_ae, "-aec", called_ae, "--max-pdu", str(MAX_PDU)]
    if any(p.is_dir() for p in paths):
        args += ["+sd", "+r"]
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        if propose_all:
            pairs = {key for f in _expand(paths) if (key := dataset_key(f))}
            if not pairs:
                raise ValueError("no file with a SOP class to propose")
            args += ["-xf", str(write_profile(pairs, Path(tmp) / "profile.cfg")), "Files"]
        args += [*extra_args, host, str(port), *map(str, paths)]
        return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout,
                              env=DCMTK_ENV, stdin=subprocess.DEVNULL)


_SENDING = re.compile(r"^I: Sending file: (.*)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((\w+)")


def parse_storescu_output(output: str) -> dict[str, bool]:
    """File name as given to storescu -> accepted (Success or Warning status)."""
    result: dict[str, bool] = {}
    current: str | None = None
    for line in output.splitlines():
        if m := _SENDING.match(line):
            current = m.group(1)
            result[current] = False
        elif current is not None and (m := _RESPONSE.match(line)):
            result[current] = m.group(1) in ("Success", "Warning")
            current = None
    return result


def send_files(host: str, port: int, paths: Path | str | Iterable[Path | str], called_ae: str = "ANY-SCP",
               calling_ae: str = "STORESCU", timeout: float = 300.0) -> dict[Path, bool]:
    """Send files (folders are expanded) each in its own transfer syntax; say which were accepted.

    Files pydicom finds no SOP class in are not sent (False). The rest go in as few
    storescu runs as the 128-context limit allows (one for the whole corpus).
    """
    files = _expand(_as_paths(paths))
    result: dict[Path, bool] = {f: False for f in files}
    chunks: list[tuple[set[tuple[str, str]], list[Path]]] = []
    for f in files:
        if (key := dataset_key(f)) is None:
            continue
        for pairs, members in chunks:
            if key in pairs or len(pairs) < MAX_CONTEXTS:
                pairs.add(key)
                members.append(f)
                break
        else:
            chunks.append(({key}, [f]))
    for _, members in chunks:
        by_name = {str(f.absolute()): f for f in members}
        proc = storescu(host, port, list(by_name), called_ae=called_ae, calling_ae=calling_ae,
                        extra_args=("-v", "-nh"), timeout=timeout, propose_all=True)
        for name, ok in parse_storescu_output(proc.stderr + "\n" + proc.stdout).items():
            if name in by_name:
                result[by_name[name]] = ok
    return result


def echoscu(host: str, port: int, called_ae: str = "ANY-SCP", calling_ae: str = "ECHOSCU",
            extra_args: Iterable[str] = (), timeout: float = 30.0) -> subprocess.CompletedProcess:
    """dcmtk echoscu (C-ECHO); returncode 0 when the peer answered."""
    args = [ECHOSCU, "-aet", calling_ae, "-aec", called_ae, "--max-pdu", str(MAX_PDU), *extra_args,
            host, str(port)]
    return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout,
                          env=DCMTK_ENV, stdin=subprocess.DEVNULL)
