"""The de-identification engine: applies the PS3.15 confidentiality profile to one instance.

(Work in progress: the public interface below is what the file mode and the node use.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from router.config import DeidConfig


class InstanceRefused(Exception):
    """An instance that cannot be de-identified safely; ``reason`` is PHI-free."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class InstanceResult:
    """What a stage may log or route on: pseudonymous identifiers only."""

    sop_class_uid: str
    sop_instance_uid: str  # the new (pseudonymous) SOP Instance UID
    study_instance_uid: str  # new
    series_instance_uid: str  # new
    patient_pseudonym: str
    modality: str
    transfer_syntax_uid: str
    #: The AE title that sent it (file meta SourceApplicationEntityTitle of the input), for routing.
    source_ae_title: str
    bytes_in: int
    bytes_out: int


class Deidentifier:
    """De-identifies instances with one site secret; safe to share within a process."""

    def __init__(self, config: DeidConfig, secret: bytes): ...

    def process_file(self, src: Path, dst: Path) -> InstanceResult:
        """Read the Part 10 (or raw dataset) file src, de-identify it, write Part 10 dst.

        dst is written completely (and fsynced) or not at all. Raises InstanceRefused.
        """
        raise NotImplementedError
