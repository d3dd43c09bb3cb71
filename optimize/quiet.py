"""Third-party noise, silenced where the library is called and nowhere else.

``quieted(...)`` wraps one call into a library: for its duration the named loggers (and their
children) pass only records at ``level`` or above, records that the library logs on the root
logger and that match ``messages`` are dropped, and matching warnings are ignored. Everything is
restored afterwards: no global logger level or warning filter is changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from typing import Iterator


class _Drop(logging.Filter):
    def __init__(self, patterns: tuple[re.Pattern[str], ...]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


@contextlib.contextmanager
def quieted(loggers: tuple[str, ...] = (), level: int = logging.ERROR, messages: tuple[str, ...] = (),
            warning_messages: tuple[tuple[type[Warning], str], ...] = ()) -> Iterator[None]:
    """Within the block: ``loggers`` pass only records at ``level`` or above; root-logger records
    matching one of ``messages`` are dropped; warnings of (category, message pattern) are ignored
    (as ``warnings.filterwarnings`` reads them: the pattern matches from the message's start)."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(level)
    drop = _Drop(tuple(re.compile(m) for m in messages))
    root = logging.getLogger()
    # ``logging.warning(...)`` on a root logger without handlers calls ``basicConfig()``, which would
    # leave a handler printing every library's warnings for the rest of the process.
    placeholder = logging.NullHandler()
    if messages:
        root.addFilter(drop)
        root.addHandler(placeholder)
    try:
        with warnings.catch_warnings():
            for category, pattern in warning_messages:
                warnings.filterwarnings("ignore", message=pattern, category=category)
            yield
    finally:
        root.removeFilter(drop)
        root.removeHandler(placeholder)
        for name, previous in saved.items():
            logging.getLogger(name).setLevel(previous)


def on_terminal() -> bool:
    """Progress bars are drawn only on a terminal: redirected output gets a line per stage instead
    of a flood of carriage returns."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


@contextlib.contextmanager
def progress_off_stdout() -> Iterator[None]:
    """For a library that draws its progress bars on stdout (NNCF's): on a terminal they go to
    stderr, redirected they go nowhere. Stdout stays for the tables and report paths."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sys.stderr if on_terminal() else sink):
        yield
