"""Trials as Ray tasks: the recipe search's and the sweep's compiles, on this machine or on a cluster.

    with ray_trials() as map_trials:                # ray.init() here: a local instance, no set-up
        results = map_trials(run_trial, specs)       # one task per spec, results in spec order

A trial is a picklable spec in and a picklable result out (`qcompiler.recipe_search.run_trial`,
`qcompiler.sweep.run_cell`), so Ray's scheduler is the whole runner: no process pool of our
own. Each task asks for one CPU; the local instance offers every core, so a 2-core machine
compiles two candidates at once. A cluster is named by ``address`` (``host:port`` of its
head, ``ray://host:port`` for Ray Client, or ``auto``); one that does not answer is one
sentence before any trial starts, never Ray's minutes of reconnecting. An exception a trial
did not turn into a result is re-raised here as itself, so a qcompiler bug in a worker
still reads as one.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import Any, Callable, Iterator, Sequence

from qcompiler.errors import QCompilerError, first_line
from qcompiler.progress import logger

MapTrials = Callable[[Callable[[Any], Any], Sequence[Any]], list]
CONNECT_TIMEOUT_S = 5.0


@contextlib.contextmanager
def ray_trials(address: str | None = None) -> Iterator[MapTrials]:
    """A ``map_trials`` running each trial as a Ray task; Ray is joined at the first trial, shut down on exit.

    Joining lazily spares a sweep whose cells are all reused the seconds Ray takes to start.
    """
    import ray

    if address is not None and address not in ("auto", "local"):
        check_answers(address)  # now, before the caller writes anything
    started = []

    def map_trials(function: Callable[[Any], Any], specs: Sequence[Any]) -> list:
        if specs and not ray.is_initialized():
            _connect(ray, address)
            started.append(True)
        return _map(ray, function, specs)

    try:
        yield map_trials
    finally:
        if started:
            ray.shutdown()


def serial_trials(function: Callable[[Any], Any], specs: Sequence[Any]) -> list:
    """The in-process ``map_trials``: one trial after another (``--no-ray``)."""
    return [function(spec) for spec in specs]


def _connect(ray: Any, address: str | None) -> None:
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    except ConnectionError as exc:
        raise QCompilerError(f"No Ray cluster answers at '{address}' ({first_line(exc)}); start one (ray start --head) or drop "
                             "--ray-address to run on this machine.") from None


def check_answers(address: str) -> None:
    """One TCP connection to the head, with a short timeout: Ray itself retries for minutes."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise QCompilerError(f"The Ray address '{address}' is not host:port (or ray://host:port, or auto).")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise QCompilerError(f"No Ray cluster answers at '{address}' ({reason.lower()}); start one "
                             "(ray start --head) or drop --ray-address to run on this machine.") from None


def _in_worker(function: Callable[[Any], Any], spec: Any) -> Any:
    """One trial in a Ray worker, which shares the machine: one thread per session, like Ray's own OMP_NUM_THREADS."""
    from qcompiler.runtime import share_cores

    share_cores(1)
    return function(spec)


def _map(ray: Any, function: Callable[[Any], Any], specs: Sequence[Any]) -> list:
    if not specs:
        return []
    task = ray.remote(num_cpus=1, max_retries=0)(_in_worker)
    started = time.perf_counter()
    refs = [task.remote(function, spec) for spec in specs]
    try:
        waiting = list(refs)
        while waiting:  # a line per finished trial: a round of compiles can take many minutes
            finished, waiting = ray.wait(waiting, num_returns=1)
            ray.get(finished)  # a failed trial raises now, not after the others
            logger.info(f"ray: {len(refs) - len(waiting)} of {len(refs)} trials done "
                        f"({time.perf_counter() - started:.0f} s)")
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
        if cause is not None:
            raise cause from None
        raise

