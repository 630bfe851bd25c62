"""structlog set-up: JSON lines when not on a terminal, readable lines when on one.

Events carry pseudonymous identifiers only (new UIDs, patient pseudonyms, hashes); never
pass an original header value to a logger.
"""

from __future__ import annotations

import logging
import sys

import structlog

from router.config import LoggingConfig


def configure(config: LoggingConfig = LoggingConfig(), stream=None) -> None:
    stream = stream or sys.stderr
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
    # pynetdicom logs through the standard library at DEBUG with dataset dumps (PHI):
    # keep it at WARNING whatever our level is.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def get_logger(name: str):
    return structlog.get_logger(name)
