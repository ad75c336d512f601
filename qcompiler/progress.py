"""Progress of long steps (calibration, GPTQ, searches): a bar on a terminal, a log line now and then otherwise.

GPTQ on a large model or a smoothing search runs for minutes; silence there reads as a
hang, in CI logs and notebooks as much as on a terminal. Every message goes through the
``qcompiler`` logger, so a notebook or service routes it like any library's; the
``qcompile`` command installs a handler (`configure_console`) unless ``--quiet``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

logger = logging.getLogger("qcompiler")
# Without a terminal, one line per step at most this often (and one when the step ends).
LOG_INTERVAL_S = 10.0


@contextlib.contextmanager
def progress(label: str, total: int, bar: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n=1)``: a transient bar on a terminal (with ``bar``), else ``label: done/total`` log lines.

    The log lines go to the ``qcompiler`` logger at INFO, every `LOG_INTERVAL_S` and when a
    step that took longer ends; whoever configures logging decides whether they show.
    """
    if bar and total > 1 and sys.stderr.isatty():
        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True) as shown:
            task = shown.add_task(label, total=total)
            yield lambda n=1: shown.advance(task, n)
        return
    start = last = time.monotonic()
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= LOG_INTERVAL_S:
            last = now
            logger.info("%s: %d/%d (%.0f s)", label, done, total, now - start)

    yield advance
    if time.monotonic() - start >= LOG_INTERVAL_S:
        logger.info("%s: done, %d in %.0f s", label, done, time.monotonic() - start)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message comes (a test runner or notebook may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_console(quiet: bool) -> None:
    """The command line's handler: plain lines on stderr, nothing but errors with ``quiet``."""
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers = [handler]
    logger.setLevel(logging.ERROR if quiet else logging.INFO)
    logger.propagate = False
