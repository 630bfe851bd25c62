"""Shared fixtures: the real-DICOM corpus and real peers (see tests/peers.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# `import peers` and `import bench.synthetic` whatever pytest's import mode.
for _path in (str(REPO_ROOT), str(TESTS_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from peers import Orthanc, StoreSCP  # noqa: E402

CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The third-party DICOM corpus in ../shared/corpus (read-only). Missing = failure."""
    if not (CORPUS_DIR / "MANIFEST.tsv").is_file():
        pytest.fail(f"DICOM corpus not found at {CORPUS_DIR}: clone the repo next to shared/", pytrace=False)
    return CORPUS_DIR


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A started Orthanc (AE title ORTHANC) with its data in tmp_path; stopped afterwards."""
    with Orthanc(tmp_path) as pacs:
        yield pacs


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """A started dcmtk storescp (AE title STORESCP) writing into tmp_path/storescp."""
    with StoreSCP(tmp_path / "storescp") as scp:
        yield scp


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs (the suite runs as root, as CI does): a spool or an output that fills."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
