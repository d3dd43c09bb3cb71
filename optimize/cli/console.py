"""The console the CLI owns: the ``optimize.*`` loggers' records on stderr, one line each.

The library only logs; a command installs this handler once (again and again in one process, as
the tests call the CLI, it stays one handler). Tables and report paths go to stdout with
``click.echo``; progress, notes and warnings go here. ``--quiet`` keeps warnings and errors,
``--verbose`` adds debug records with their logger's name.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "optimize"
PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (click's test runner swaps it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno < logging.INFO:
            text = f"debug {record.name}: {text}"
        else:
            text = PREFIX.get(record.levelno, "") + text
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def install(quiet: bool = False, verbose: bool = False) -> logging.Logger:
    """Route the ``optimize`` loggers to stderr at INFO (WARNING with ``quiet``, DEBUG with
    ``verbose``); idempotent."""
    logger = logging.getLogger(LOGGER)
    handler = next((h for h in logger.handlers if isinstance(h, StderrHandler)), None)
    if handler is None:
        handler = StderrHandler()
        handler.setFormatter(ConsoleFormatter())
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False  # a root handler some library configured would print every line twice
    return logger


def hand_to_root() -> None:
    """For a command that configures logging itself (``optimize serve``: timestamps, --log-level):
    the ``optimize`` loggers go through the root logger's handlers only."""
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [h for h in logger.handlers if not isinstance(h, StderrHandler)]
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
