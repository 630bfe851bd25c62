"""structlog set-up: JSON lines when not on a terminal, readable lines when on one.

Events carry pseudonymous identifiers only (new UIDs, patient pseudonyms, hashes); never
pass an original header value to a logger.
"""

from __future__ import annotations

import logging
import os
import threading

import structlog

from router.config import LoggingConfig


def configure(config: LoggingConfig = LoggingConfig(), stream=None) -> None:
    """Log set-up for every process of the node and for the command line tools."""
    stream = stream or LineStream()
    fmt = config.format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, config.level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    quiet_libraries()


class LineStream:
    """stderr for structured logs from several processes: one write(2) per whole line.

    ``sys.stderr`` is write-through, so ``print(line)`` makes two system calls (the line,
    then the newline) and lines from the node's processes interleave. Here each line goes
    out in one call (atomic on a pipe up to PIPE_BUF bytes, and on an O_APPEND file).
    """

    def __init__(self, fd: int = 2):
        self._fd = fd
        self._parts: list[str] = []
        self._lock = threading.Lock()
        try:
            self._tty = os.isatty(fd)
        except OSError:
            self._tty = False

    def isatty(self) -> bool:
        return self._tty

    def write(self, text: str) -> int:
        with self._lock:
            self._parts.append(text)
            if "\n" in text:
                self._flush_locked()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._parts:
            return
        data = memoryview("".join(self._parts).encode("utf-8", "replace"))
        self._parts.clear()
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:
            pass


def quiet_libraries() -> None:
    """Keep header values out of the node's output.

    pydicom reports invalid values by quoting them, as a Python warning and on its
    logger (e.g. "Invalid value for VR UI: '<an original UID>'"): silence both in every
    node process, and never validate values we only pass through.
    """
    import logging
    import warnings

    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    # pynetdicom (`deid-router echo`, the PDU classes) logs through the standard library at
    # DEBUG with dataset dumps (PHI): keep it at WARNING whatever our level is, and unbind
    # its standard handlers, which format a log line for every PDU that nobody prints.
    from pynetdicom import _config as pynetdicom_config

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"


def get_logger(name: str):
    return structlog.get_logger(name)
